//! The filter's unit tests: the tcpdump oracle is the privileged test `filter.rs`.
use super::*;
use crate::path::tests::icmp_info;

fn names() -> Names {
    Names::from_files(
        "127.0.0.1 localhost\n::1 localhost ip6-localhost # comment\n10.0.0.1 other\n",
        "domain 53/tcp\ndomain 53/udp\nhttp 80/tcp www\nsyslog 514/udp\nodd 7/tcp\nodd 9/udp\n",
    )
}

fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> PacketInfo {
    PacketInfo {
        proto: PROTO_UDP,
        sport: Some(sport),
        dport: Some(dport),
        icmp: None,
        ..icmp_info(src, dst, 0, 0, 0)
    }
}

fn m(f: &str, p: &PacketInfo) -> bool {
    mb(f, p, None)
}

fn mb(f: &str, p: &PacketInfo, frame: Option<&[u8]>) -> bool {
    let e = parse_with(f, &names()).unwrap_or_else(|e| panic!("{f}: {e}"));
    e.matches(&Packet {
        info: p,
        frame,
        len: frame.map_or(0, |f| f.len() as u32),
    })
}

#[test]
fn primitives_and_operators() {
    let u = udp("127.0.0.1", 5000, "127.0.0.2", 53);
    let i6 = icmp_info("::1", "::1", 128, 1, 1);
    assert!(m("udp", &u) && !m("tcp", &u) && !m("icmp", &u));
    assert!(m("icmp6", &i6) && m("ip6", &i6) && !m("ip", &i6));
    assert!(m("host 127.0.0.2", &u) && m("dst host 127.0.0.2", &u) && !m("src host 127.0.0.2", &u));
    assert!(m("net 127.0.0.0/8", &u) && !m("net 10.0.0.0/8", &u) && m("net ::/0", &i6));
    assert!(m("port 53", &u) && m("src port 5000", &u) && !m("dst port 5000", &u));
    assert!(m("udp and port 53", &u) && !m("udp and port 54", &u));
    assert!(m("tcp or udp", &u) && m("not tcp", &u) && m("! tcp", &u));
    assert!(m("(tcp or udp) and not (port 22 or port 80)", &u));
    assert!(m("udp && (port 1 || port 53)", &u));
    assert!(!m("icmp", &i6), "icmp means ICMPv4 as in tcpdump");
}

#[test]
fn tcpdump_forms() {
    let u = udp("127.0.0.1", 5000, "127.0.0.2", 53);
    let t = PacketInfo {
        proto: PROTO_TCP,
        ..u.clone()
    };
    assert!(m("udp port 53", &u) && !m("tcp port 53", &u) && m("tcp port 53", &t));
    assert!(m("udp dst port 53", &u) && !m("udp src port 53", &u));
    assert!(m("port domain", &u) && m("udp port domain", &u) && !m("port http", &u));
    assert!(m("ip proto 17", &u) && m("ip proto \\udp", &u) && !m("ip6 proto 17", &u) && m("proto 17", &u));
    assert!(m("src 127.0.0.1", &u) && !m("dst 127.0.0.1", &u) && m("src or dst 127.0.0.2", &u));
    assert!(!m("src and dst host 127.0.0.1", &u));
    assert!(m("portrange 50-60", &u) && m("udp portrange 60-50", &u) && !m("portrange 1-52", &u));
    assert!(m("dst host localhost", &icmp_info("::1", "::1", 128, 1, 1)) && !m("dst host localhost", &u));
    assert!(m("src host localhost", &u) && m("ip host localhost", &u));
    assert!(m("net 127", &u) && m("net 127.0.0.0 mask 255.0.0.0", &u) && m("net 127/8", &u));
    assert!(m("port 53 or 80", &u) && m("port 80 or 53", &u) && !m("port 80 or 81", &u));
    assert!(m("host 10.0.0.1 or 127.0.0.2", &u) && !m("host 127.0.0.1 and not 127.0.0.2", &u));
    assert!(m("ip multicast", &udp("127.0.0.1", 1, "224.0.0.1", 2)) && !m("ip multicast", &u));
    // and and or have the same precedence, left to right, as in tcpdump.
    assert!(m("tcp and port 1 or udp", &u), "(tcp and port 1) or udp");
    assert!(!m("udp or tcp and port 1", &u), "(udp or tcp) and port 1");
    // A service with different ports per protocol.
    assert!(m("port odd", &udp("127.0.0.1", 9, "127.0.0.1", 1)));
    assert!(
        !m("port odd", &udp("127.0.0.1", 7, "127.0.0.1", 1)),
        "odd is 7 for tcp only"
    );
}

/// An Ethernet + IPv4 + TCP frame with these flags.
fn tcp_frame(flags: u8, ihl_words: u8) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend([0x08, 0x00]);
    let ihl = ihl_words as usize * 4;
    let mut ip = vec![0u8; ihl];
    ip[0] = 0x40 | ihl_words;
    ip[9] = PROTO_TCP;
    f.extend(ip);
    let mut tcp = vec![0u8; 20];
    tcp[12] = 0x50;
    tcp[13] = flags;
    f.extend(tcp);
    f
}

#[test]
fn header_bytes() {
    let t = PacketInfo {
        proto: PROTO_TCP,
        ..udp("127.0.0.1", 1, "127.0.0.1", 2)
    };
    let syn = tcp_frame(0x02, 5);
    let ack = tcp_frame(0x10, 6);
    for f in [
        "tcp[tcpflags] & tcp-syn != 0",
        "tcp[13] & 2 != 0",
        "tcp[13] = 2",
        "ip[9] == 6",
        "len >= 54",
        "less 54",
        "greater 54",
    ] {
        assert!(mb(f, &t, Some(&syn)), "{f}");
    }
    assert!(!mb("tcp[13] & 2 != 0", &t, Some(&ack)), "options move the TCP header");
    assert!(mb("tcp[13] = tcp-ack", &t, Some(&ack)));
    assert!(mb("tcp[12:1] >> 4 = 5", &t, Some(&ack)));
    assert!(mb("(tcp[12] & 0xf0) >> 2 = 20", &t, Some(&ack)));
    assert!(mb("tcp[0:4] = 0 and ip[0] & 0xf = 6", &t, Some(&ack)));
    assert!(!mb("udp[0] = 0", &t, Some(&syn)), "not UDP");
    assert!(
        mb("not udp[0] = 0", &t, Some(&syn)),
        "a header that is not there is a false test"
    );
    // Past the captured bytes: the packet is rejected, even under `not` (BPF).
    assert!(!mb("tcp[100] = 0", &t, Some(&syn)) && !mb("not tcp[100] = 0", &t, Some(&syn)));
    assert!(!mb("tcp[13] = 2", &t, None), "no bytes kept: no byte test passes");
    assert!(
        !mb("tcp[0] / (tcp[0]) = 1", &t, Some(&syn)),
        "division by zero at run time rejects"
    );
    assert!(mb(
        "2 + 3 * 4 = 14 and 1 << 4 | 1 = 17 and -1 = 0xffffffff and 017 = 15",
        &t,
        Some(&syn)
    ));
    let e = parse_with("tcp[13] & 2 != 0", &names()).expect("parses");
    assert!(e.reads_bytes() && !parse_with("tcp", &names()).expect("parses").reads_bytes());
    assert!(e.check_capture(96).is_ok());
    let far = parse_with("ip[100:2] = 1", &names()).expect("parses");
    let err = far.check_capture(96).expect_err("beyond 96");
    assert!(
        err.contains("ip[100:2]") && err.contains("116") && err.contains("96"),
        "{err}"
    );
    assert!(far.check_capture(200).is_ok());
}

#[test]
fn errors_point_at_the_problem() {
    let cases = [
        ("", 1, "empty"),
        ("host", 5, "needs a value"),
        ("host 1.2.3", 6, "invalid address"),
        ("port 70000", 6, "illegal port"),
        ("net 10.0.0.0/33", 14, "prefix"),
        ("net 10.0.0.1/8", 5, "non-network bits"),
        ("udp tcp", 5, "missing"),
        ("(udp or tcp", 12, "expected ')'"),
        ("bogus", 1, "unknown keyword"),
        ("udp and", 8, "ends too early"),
        (")", 1, "unexpected \")\""),
        ("ether host 0:0:0:0:0:0", 1, "no link layer"),
        ("arp", 1, "no ARP"),
        ("vlan 10", 1, "VLAN"),
        ("tcp host 127.0.0.1", 10, "cannot qualify a host"),
        ("ip port 53", 9, "cannot qualify a port"),
        ("host nosuchname", 6, "does not ask DNS"),
        ("port nosuchservice", 6, "/etc/services"),
        ("tcp[13:3] = 1", 8, "1, 2 or 4"),
        ("tcp[13] > 1 / 0", 15, "division by zero"),
        ("tcp[13]", 8, "expected a comparison"),
        ("ip6 host 127.0.0.1", 10, "no IPv6 address"),
        ("inbound", 1, "both outbound and inbound"),
        ("udp $", 5, "unexpected character"),
        ("less", 5, "needs a number"),
    ];
    for (f, col, needle) in cases {
        let e = parse_with(f, &names()).expect_err(f);
        assert!(e.to_string().contains(needle), "{f}: {e}");
        assert_eq!(e.col, col, "{f}: {e}");
    }
}
