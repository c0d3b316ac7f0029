//! The filter language with tcpdump as the oracle: one recording of mixed loopback traffic
//! (ICMP and ICMPv6 echoes and errors, UDP to two port ranges and to port 53, TCP with its
//! SYN, FIN and RST to port 80 and a closed port, both families), exported as pcapng; for each
//! expression of the corpus, `lotrace replay --filter E` writes exactly the packets that
//! `tcpdump -r FILE E` selects (compared byte for byte: addresses, ports, TCP sequence and
//! flags, ICMP type and sequence are all in those bytes).
use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::Path,
    process::Command,
    time::Duration,
};

use loopback_user::{decode::parse_eth, netns::Sandbox, traffic};

use crate::support::*;

/// (expression, whether it must select at least one packet of the capture).
const CORPUS: &[(&str, bool)] = &[
    ("icmp", true),
    ("icmp6", true),
    ("udp", true),
    ("tcp", true),
    ("ip", true),
    ("ip6", true),
    ("udp port 53", true),
    ("udp port domain", true),
    ("tcp dst port 80", true),
    ("tcp port http", true),
    ("udp src port 53", true),
    ("ip proto 17", true),
    ("ip proto \\tcp", true),
    ("ip6 proto 17", true),
    ("ip6 proto 58", true),
    ("proto 6", true),
    ("src 127.0.0.1", true),
    ("dst 127.0.0.2", true),
    ("host 127.0.0.53", true),
    ("dst host localhost", true),
    ("host localhost", true),
    ("src host ::1", true),
    ("net 127.0.0.0/8", true),
    ("net 127.0.0.0 mask 255.255.255.0", true),
    ("net 127", true),
    ("ip6 net ::/0", true),
    ("portrange 5300-5399", true),
    ("udp portrange 6300-6399", true),
    ("tcp portrange 1-1024", true),
    ("less 100", true),
    ("greater 1000", true),
    ("tcp[tcpflags] & tcp-syn != 0", true),
    ("tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn", true),
    ("tcp[13] & 2 != 0", true),
    ("tcp[tcpflags] & tcp-fin != 0", true),
    ("tcp[tcpflags] & tcp-rst != 0", true),
    ("tcp port 80 and tcp[13] = 0x12", true),
    ("icmp[icmptype] == icmp-echo", true),
    ("icmp[icmptype] == icmp-echoreply", true),
    ("icmp[icmptype] = icmp-unreach", true),
    ("icmp6[icmp6type] == icmp6-echo", true),
    ("icmp6[0] = 1", true),
    ("ip[8] = 64", true),
    ("ip[2:2] > 100", true),
    ("ip6[6] = 17", true),
    ("udp[0:2] = 53 or udp[2:2] = 53", true),
    ("tcp[((tcp[12] & 0xf0) >> 2):1] = 9", true),
    ("port 53 or 80", true),
    ("src or dst port 6301", true),
    ("src and dst host 127.0.0.1", true),
    ("not icmp and not icmp6", true),
    ("icmp or udp and port 5301", true),
    ("(tcp or udp) and not port 80", true),
    ("udp and len >= 100 and len <= 200", true),
    ("ip6 and udp port 53", true),
    ("dst port 6301 or dst port 5302", true),
    ("!udp", true),
    ("src port 80 && tcp[tcpflags] & tcp-push != 0", true),
    ("host 127.0.0.1 and not 127.0.0.2", true),
    ("ip multicast", false),
    ("len - 14 > 1000 / 2", true),
];

/// The packets of a pcap or pcapng file: their bytes.
fn packets(path: &Path) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    if bytes.starts_with(&[0x0a, 0x0d, 0x0d, 0x0a]) {
        let mut r = pcap_file::pcapng::PcapNgReader::new(bytes.as_slice()).expect("pcapng");
        while let Some(b) = r.next_block() {
            if let pcap_file::pcapng::Block::EnhancedPacket(epb) = b.expect("block") {
                out.push(epb.data.to_vec());
            }
        }
    } else {
        // Raw packets: pcap-file 2.0 refuses a packet longer than the snap length (it checks
        // orig_len, not the captured length, against it), which every cut packet is.
        let mut r = pcap_file::pcap::PcapReader::new(bytes.as_slice()).expect("pcap");
        while let Some(p) = r.next_raw_packet() {
            out.push(p.expect("packet").data.to_vec());
        }
    }
    out.sort();
    out
}

/// One packet in a line: its 5-tuple, TCP sequence and flags or ICMP type and sequence.
fn describe(frame: &[u8]) -> String {
    match parse_eth(frame) {
        Some(i) => format!(
            "{} {}:{:?} -> {}:{:?} tcp {:?} icmp {:?} ({} bytes)",
            i.proto,
            i.src,
            i.sport,
            i.dst,
            i.dport,
            i.tcp,
            i.icmp,
            frame.len()
        ),
        None => format!("undecodable frame of {} bytes", frame.len()),
    }
}

/// Mixed traffic in the sandbox: every line of the corpus needs some of it.
fn traffic_mix() {
    let v4: IpAddr = "127.0.0.1".parse().expect("ip");
    let v6: IpAddr = "::1".parse().expect("ip");
    for (i, dst) in ["127.0.0.1", "127.0.0.2", "::1"].iter().enumerate() {
        traffic::icmp_echo(
            dst.parse().expect("ip"),
            0,
            0x7100 + i as u16,
            1,
            Duration::from_secs(2),
        )
        .expect("echo");
    }
    // UDP: port 53 (both families) and two port ranges, small and large datagrams, answered.
    let servers: Vec<UdpSocket> = [
        "127.0.0.53:53",
        "[::1]:53",
        "127.0.0.1:5301",
        "127.0.0.1:5302",
        "127.0.0.2:6301",
    ]
    .iter()
    .map(|a| UdpSocket::bind(a.parse::<SocketAddr>().expect("addr")).expect("bind udp"))
    .collect();
    for s in &servers {
        let to = s.local_addr().expect("addr");
        let c = UdpSocket::bind(SocketAddr::new(if to.is_ipv4() { v4 } else { v6 }, 0)).expect("bind");
        c.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
        s.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
        for size in [20usize, 150, 1200] {
            c.send_to(&vec![7u8; size], to).expect("send");
            let mut buf = [0u8; 2048];
            let (n, from) = s.recv_from(&mut buf).expect("server recv");
            s.send_to(&buf[..n], from).expect("reply");
            c.recv_from(&mut buf).expect("client recv");
        }
    }
    // UDP to a closed port: ICMP and ICMPv6 port unreachable.
    for dst in ["127.0.0.1:9", "[::1]:9"] {
        let to: SocketAddr = dst.parse().expect("addr");
        let c = UdpSocket::bind(SocketAddr::new(if to.is_ipv4() { v4 } else { v6 }, 0)).expect("bind");
        c.connect(to).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
        c.send(b"anyone?").expect("send");
        // The error comes back as ECONNREFUSED on the connected socket: the ICMP has arrived.
        let err = c.recv(&mut [0u8; 16]).expect_err("port unreachable");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    }
    // TCP: a whole connection to port 80 (SYN, data, FIN) in both families; a refused one (RST).
    for addr in ["127.0.0.1:80", "[::1]:80"] {
        let l = TcpListener::bind(addr.parse::<SocketAddr>().expect("addr")).expect("bind tcp");
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            let mut got = Vec::new();
            s.read_to_end(&mut got).expect("read");
            s.write_all(b"ok").expect("write");
            got.len()
        });
        let mut c = TcpStream::connect(addr).expect("connect");
        c.write_all(&[9u8; 3000]).expect("write");
        c.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut reply = Vec::new();
        c.read_to_end(&mut reply).expect("read");
        assert_eq!((server.join().expect("server"), reply.as_slice()), (3000, &b"ok"[..]));
    }
    let refused = TcpStream::connect_timeout(&"127.0.0.1:81".parse().expect("addr"), Duration::from_secs(2));
    assert!(refused.is_err(), "nothing listens on port 81");
}

/// Every captured payload byte is the packet's own: the test's TCP data is all 9s, its UDP
/// data all 7s (no kernel memory past a packet's linear data in a capture).
fn assert_payloads_are_the_packets(frames: &[Vec<u8>]) {
    let mut checked = 0;
    for f in frames {
        let Ok(p) = etherparse::LaxSlicedPacket::from_ethernet(f) else {
            continue;
        };
        let (payload, want) = match &p.transport {
            Some(etherparse::TransportSlice::Tcp(t)) if t.destination_port() == 80 => (t.payload(), 9u8),
            Some(etherparse::TransportSlice::Udp(u)) if u.destination_port() != 9 => (u.payload(), 7u8),
            _ => continue,
        };
        assert!(
            payload.iter().all(|b| *b == want),
            "a capture holds bytes that are not the packet's: {}",
            describe(f)
        );
        checked += !payload.is_empty() as u32;
    }
    assert!(checked >= 10, "{checked} payloads checked");
}

/// With the default capture (the header bytes only), a TCP segment whose payload is in page
/// fragments is captured up to the end of its headers, not past them into other memory.
#[test]
fn header_captures_end_with_the_linear_data() {
    if !privileged() {
        return;
    }
    let sb = Sandbox::new("lt-linear").expect("sandbox");
    let dir = std::env::temp_dir().join(format!("lotrace-linear-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let pcap = dir.join("tcp.pcapng");
    let t = start(&sb, &["--pcapng", pcap.to_str().expect("utf8")]);
    let lo: IpAddr = "127.0.0.1".parse().expect("ip");
    sb.netns
        .run(|| traffic::tcp_exchange(lo, &[9u8; 3000]).expect("tcp"))
        .expect("netns");
    stop(t);
    let frames = packets(&pcap);
    let data: Vec<&Vec<u8>> = frames
        .iter()
        .filter(|f| parse_eth(f).is_some_and(|i| i.l4_payload_len == Some(3000)))
        .collect();
    assert!(!data.is_empty(), "the 3000-byte segments");
    for f in data {
        let p = etherparse::LaxSlicedPacket::from_ethernet(f).expect("frame");
        let Some(etherparse::TransportSlice::Tcp(t)) = &p.transport else {
            panic!("tcp")
        };
        assert!(t.payload().iter().all(|b| *b == 9), "{}", describe(f));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn filters_select_what_tcpdump_selects() {
    if !privileged() {
        return;
    }
    let tcpdump = tools::require("tcpdump");
    let sb = Sandbox::new("lt-filter").expect("sandbox");
    let dir = std::env::temp_dir().join(format!("lotrace-filter-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let rec = dir.join("mix.lotrace");
    let rec_s = rec.to_str().expect("utf8");
    // 200 bytes per packet: TCP payload bytes are in the capture (a segment's linear data on lo
    // is its headers; the rest is read from its page fragments).
    let t = start(&sb, &["--write", rec_s, "--snaplen", "200"]);
    sb.netns.run(traffic_mix).expect("netns");
    let (live, _) = stop(t);
    assert!(live.len() >= 60, "{} packets", live.len());

    // The whole capture, as replay writes it (the same packets the filtered replays choose from).
    let full = dir.join("full.pcapng");
    let (rc, _, err) = run_bin(&[
        "replay",
        rec_s,
        "--format",
        "json",
        "--pcapng",
        full.to_str().expect("utf8"),
    ]);
    assert_eq!(rc, 0, "{err}");
    let all = packets(&full);
    assert!(all.len() >= 60, "{} packets in the capture", all.len());
    assert_payloads_are_the_packets(&all);

    let mut failures = Vec::new();
    for (i, (expr, nonempty)) in CORPUS.iter().enumerate() {
        let ours = dir.join(format!("ours-{i}.pcapng"));
        let (rc, _, err) = run_bin(&[
            "replay",
            rec_s,
            "--format",
            "json",
            "--filter",
            expr,
            "--pcapng",
            ours.to_str().expect("utf8"),
        ]);
        if rc != 0 {
            failures.push(format!(
                "{expr:?}: lotrace refused it: {}",
                err.lines().last().unwrap_or("")
            ));
            continue;
        }
        let theirs = dir.join(format!("tcpdump-{i}.pcap"));
        let td = Command::new(tcpdump)
            .args([
                "-nn",
                "-r",
                full.to_str().expect("utf8"),
                "-w",
                theirs.to_str().expect("utf8"),
                expr,
            ])
            .output()
            .expect("tcpdump");
        assert!(
            td.status.success(),
            "tcpdump refused {expr:?}: {}",
            String::from_utf8_lossy(&td.stderr)
        );
        let (a, b) = (packets(&ours), packets(&theirs));
        if a != b {
            let only = |x: &[Vec<u8>], y: &[Vec<u8>]| -> Vec<String> {
                x.iter()
                    .filter(|p| !y.contains(p))
                    .take(4)
                    .map(|p| describe(p))
                    .collect()
            };
            failures.push(format!(
                "{expr:?}: lotrace {} packets, tcpdump {}; only lotrace: {:?}; only tcpdump: {:?}",
                a.len(),
                b.len(),
                only(&a, &b),
                only(&b, &a)
            ));
        } else if *nonempty && b.is_empty() {
            failures.push(format!(
                "{expr:?}: selects nothing in the capture (the traffic lacks what it tests)"
            ));
        }
    }
    assert!(CORPUS.len() >= 40);
    assert!(
        failures.is_empty(),
        "{} of {} expressions differ from tcpdump:\n{}",
        failures.len(),
        CORPUS.len(),
        failures.join("\n")
    );

    // Bad input: what tcpdump accepts but no packet's capture could answer is refused at start,
    // in one line naming the offset and the snap length; what cannot apply on lo says why.
    for (expr, want) in [
        ("tcp[200] = 1", "tcp[200:1]"),
        ("ip[300:4] != 0", "--snaplen 200"),
        ("ether host 00:00:00:00:00:00", "no link layer"),
        ("arp", "no ARP"),
        ("vlan", "VLAN"),
    ] {
        let (rc, _, err) = run_bin(&["replay", rec_s, "--filter", expr]);
        let last = err.lines().last().unwrap_or("");
        assert_eq!(rc, 2, "{expr}: {err}");
        assert!(last.starts_with("lotrace: ") && last.contains(want), "{expr}: {err}");
        assert_eq!(
            err.lines().filter(|l| l.starts_with("lotrace: filter")).count(),
            1,
            "{expr}: one line: {err}"
        );
    }
    let td = Command::new(tcpdump)
        .args(["-nn", "-r", full.to_str().expect("utf8"), "tcp[200] = 1"])
        .output()
        .expect("tcpdump");
    assert!(
        td.status.success() && td.stdout.is_empty(),
        "tcpdump accepts it and selects nothing"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
