//! Recordings: replay equals the live run, and pcapng export.
use std::{
    net::IpAddr,
    process::{Command, Stdio},
    time::Duration,
};

use loopback_user::{netns::Sandbox, traffic};

use serde_json::Value;

use crate::support::*;

#[test]
fn recordings_replay_exactly_and_export_pcapng() {
    if !privileged() {
        return;
    }
    let sb = Sandbox::new("lt-rec").expect("sandbox");
    let dir = std::env::temp_dir().join(format!("lotrace-rec-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let rec = dir.join("run.lotrace");
    let pcap = dir.join("run.pcapng");
    let (rec_s, pcap_s) = (rec.to_str().expect("utf8"), pcap.to_str().expect("utf8"));

    // JSON: replay prints byte for byte what the live run printed, and the same summary counts.
    let (live, live_err) = record_run(
        &sb,
        "json",
        &["--write", rec_s, "--pcapng", pcap_s, "--snaplen", "1500"],
    );
    let packets = live.lines().count();
    assert!(packets >= 8, "{live}");
    let (rc, replayed, rerr) = run_bin(&["replay", rec_s, "--format", "json"]);
    assert_eq!(rc, 0, "{rerr}");
    assert_eq!(replayed, live, "replay differs from the live run");
    let (ls, rs) = (summary_of(&live_err), summary_of(&rerr));
    for k in [
        "packets",
        "complete",
        "expired",
        "events_emitted",
        "events_received",
        "lost_events",
    ] {
        assert_eq!(ls["summary"][k], rs["summary"][k], "{k}");
    }
    // The kernel staged each lo chain into one run record: every packet that crossed lo is one
    // transmit run (tc egress is on its own here, for --snaplen) and one receive run.
    let crossed_lo = live
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|p| stages(p).contains(&"xmit_done") && stages(p).contains(&"tc_ingress"))
        .count() as u64;
    let bytes = std::fs::read(&rec).expect("rec");
    let mut reader = loopback_user::record::Reader::new(bytes.as_slice()).expect("reader");
    let (mut runs, mut events) = (0u64, 0u64);
    while let Some(frame) = reader.next_frame().expect("frame") {
        if let loopback_user::record::Frame::Event(b) = frame {
            let k = loopback_user::decode::record_events(&b);
            events += k;
            runs += (k > 1) as u64;
        }
    }
    assert!(crossed_lo >= 8, "{live}");
    assert_eq!(runs, 2 * crossed_lo, "one transmit and one receive run per lo packet");
    assert_eq!(Value::from(events), ls["summary"]["events_received"]);
    // Filters apply to replays like to live runs; replay needs no privileges at all.
    let (rc, icmp_only, _) = run_bin(&["replay", rec_s, "--format", "json", "--filter", "icmp or icmp6"]);
    assert_eq!(rc, 0);
    assert_eq!(
        icmp_only.lines().count(),
        4 + 2,
        "2 echoes, 2 replies, 2 delivered clones: {icmp_only}"
    );
    let (rc, err) = run_as_nobody(&["replay", rec_s, "--count", "1"]);
    assert_eq!(rc, 0, "replay as nobody: {err}");

    // pcapng: one block per packet that crossed lo, readable by tcpdump, the path in a comment.
    let written: u64 = live_err
        .lines()
        .find_map(|l| l.strip_prefix("lotrace: pcapng: "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .expect("pcapng line");
    let mut reader = pcap_file::pcapng::PcapNgReader::new(std::fs::File::open(&pcap).expect("open")).expect("pcapng");
    let (mut blocks, mut long) = (0u64, 0u64);
    while let Some(b) = reader.next_block() {
        if let pcap_file::pcapng::Block::EnhancedPacket(epb) = b.expect("block") {
            blocks += 1;
            let comment = epb
                .options
                .iter()
                .find_map(|o| match o {
                    pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketOption::Comment(c) => Some(c.to_string()),
                    _ => None,
                })
                .expect("comment");
            assert!(
                comment.starts_with("lotrace ") && comment.contains("tc_egress"),
                "{comment}"
            );
            let p = etherparse::LaxSlicedPacket::from_ethernet(&epb.data).expect("ethernet");
            assert!(p.net.is_some(), "IP packet");
            // --snaplen 1500: whole packets up to 1500 bytes, the first 1500 of longer ones.
            assert_eq!(epb.data.len(), (epb.original_len as usize).min(1500), "{comment}");
            if epb.data.len() > 96 {
                long += 1;
            }
        }
    }
    assert_eq!(blocks, written);
    assert!(
        long >= 2,
        "the TCP data segments are longer than the 96-byte header capture"
    );
    assert!(written >= 8, "{live_err}");
    let td = Command::new(tools::require("tcpdump"))
        .args(["-nn", "-r", pcap_s])
        .output()
        .expect("tcpdump");
    assert!(td.status.success(), "{}", String::from_utf8_lossy(&td.stderr));
    assert_eq!(String::from_utf8_lossy(&td.stdout).lines().count() as u64, written);
    let (rc, _, err) = run_bin(&[
        "replay",
        rec_s,
        "--pcapng",
        dir.join("re.pcapng").to_str().expect("utf8"),
    ]);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(
        std::fs::read(dir.join("re.pcapng")).expect("re"),
        std::fs::read(&pcap).expect("pcap")
    );

    // Text: the same, with wall-clock times from the recorded clock reference.
    let (live_text, _) = record_run(&sb, "text", &["--write", rec_s]);
    let (rc, replay_text, _) = run_bin(&["replay", rec_s]);
    assert_eq!(rc, 0);
    assert!(live_text.contains("echo-request"), "{live_text}");
    assert_eq!(replay_text, live_text);

    // Broken files: one line naming the problem (and the byte), exit 2, never a panic.
    let bytes = std::fs::read(&rec).expect("rec");
    let cut = dir.join("cut.lotrace");
    std::fs::write(&cut, &bytes[..bytes.len() - 7]).expect("write");
    let newer = dir.join("newer.lotrace");
    let mut nb = bytes.clone();
    nb[8] = 200;
    std::fs::write(&newer, &nb).expect("write");
    for (file, want) in [
        (cut.to_str().expect("utf8"), "truncated frame"),
        (newer.to_str().expect("utf8"), "newer"),
        ("/etc/hostname", "not a lotrace recording"),
        ("/nonexistent/x.lotrace", "cannot read"),
    ] {
        let (rc, _, err) = run_bin(&["replay", file]);
        assert_eq!(rc, 2, "{file}: {err}");
        let last = err.lines().last().unwrap_or("");
        assert!(last.starts_with("lotrace: ") && last.contains(want), "{file}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let (_, _, err) = run_bin(&["replay", cut.to_str().expect("utf8")]);
    assert!(err.contains("byte "), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `lotrace trace` on the sandbox with a recording (and more `extra`), sends ICMP (v4, v6),
/// UDP and TCP, stops it; returns (stdout, stderr).
pub(crate) fn record_run(sb: &Sandbox, format: &str, extra: &[&str]) -> (String, String) {
    let args: Vec<&str> = ["--format", format].iter().chain(extra).copied().collect();
    let (mut child, line, err) = launch(sb, &args, &[], Stdio::piped());
    let out_rx = read_all(child.stdout.take().expect("stdout"));
    let err_rx = read_all(err);
    sb.netns
        .run(|| {
            for (i, dst) in ["127.0.0.1", "::1"].iter().enumerate() {
                traffic::icmp_echo(
                    dst.parse().expect("ip"),
                    0,
                    0x5150 + i as u16,
                    1,
                    Duration::from_secs(2),
                )
                .expect("echo");
            }
            let lo: IpAddr = "127.0.0.1".parse().expect("ip");
            traffic::udp_exchange(lo, &[7u8; 64]).expect("udp");
            traffic::tcp_exchange(lo, &[9u8; 3000]).expect("tcp");
        })
        .expect("netns");
    signal(child.id(), libc::SIGINT);
    let st = child.wait().expect("wait");
    let out = out_rx.recv_timeout(Duration::from_secs(10)).expect("stdout");
    let err = err_rx.recv_timeout(Duration::from_secs(10)).expect("stderr");
    assert!(st.success(), "lotrace failed: {err}");
    (out, line + &err)
}
