//! Under load: nothing lost that is not counted, two tracers at once, sustained pressure.
use std::{
    process::{Command, Stdio},
    time::Duration,
};

use loopback_user::{netns::Sandbox, traffic};

use serde_json::Value;

use crate::support::*;

#[test]
fn flood_ping_loses_nothing_with_or_without_lotrace() {
    if !privileged() {
        return;
    }
    let sb = Sandbox::new("lt-flood").expect("sandbox");
    const N: u32 = 10_000;
    assert_eq!(flood_ping(&sb, N), (N as u64, N as u64), "untraced");
    // Default (tc on lo) and with generic XDP on lo as well: the lo programs always pass.
    // The packets are recorded to a file (a flood's JSON would outrun a test's pipe) and counted
    // from the replay.
    let rec = std::env::temp_dir().join(format!("lotrace-flood-{}.lotrace", std::process::id()));
    let rec_s = rec.to_str().expect("utf8").to_string();
    for extra in [&[][..], &["--xdp"][..]] {
        let before = lo_tx_packets(&sb);
        let args: Vec<&str> = ["--format", "json", "--write", &rec_s]
            .iter()
            .chain(extra)
            .copied()
            .collect();
        let (mut child, _, err) = launch(&sb, &args, &[], Stdio::null());
        let err_rx = read_all(err);
        // ping has its replies (or gave up) when it returns: every event is in the ring, and
        // lotrace drains it on SIGINT.
        let got = flood_ping(&sb, N);
        signal(child.id(), libc::SIGINT);
        assert!(child.wait().expect("wait").success());
        let err = err_rx.recv_timeout(Duration::from_secs(10)).expect("stderr");
        let summary = summary_of(&err);
        assert_eq!(
            got,
            (N as u64, N as u64),
            "traced {extra:?}: the same loss as untraced (none)"
        );
        let s = &summary["summary"];
        let (rc, out, rerr) = run_bin(&["replay", &rec_s, "--format", "json"]);
        assert_eq!(rc, 0, "{rerr}");
        let on_lo = out
            .lines()
            .filter(|l| serde_json::from_str::<Value>(l).expect("json")["tx_dev"] == "lo")
            .count() as u64;
        let sent = lo_tx_packets(&sb) - before;
        // A flood is ~1.4 M events/s; if the reader was ever descheduled long enough for the ring
        // to fill, the loss must be reported, and only then may a packet be missing.
        match s["lost_events"].as_u64().expect("lost") {
            0 => assert_eq!(on_lo, sent, "{extra:?}: every lo packet reconstructed"),
            lost => {
                eprintln!("flood {extra:?}: {lost} events lost and reported; {on_lo} of {sent} lo packets whole");
                assert!(on_lo <= sent && on_lo + lost >= sent, "{extra:?}: {s}");
            }
        }
        assert!(sent >= 2 * N as u64);
    }
    let _ = std::fs::remove_file(&rec);
}

#[test]
fn two_lotraces_at_once_both_see_everything() {
    if !privileged() {
        return;
    }
    let sb = Sandbox::new("lt-two").expect("sandbox");
    let (a, b) = (start(&sb, &["--filter", "icmp"]), start(&sb, &["--filter", "icmp"]));
    assert_eq!(tcx_on_lo(&sb).len(), 4, "both tracers' tc programs, side by side");
    for seq in 1..=3 {
        sb.netns
            .run(|| traffic::icmp_echo("127.0.0.1".parse().expect("ip"), 0, 0x2a2a, seq, Duration::from_secs(2)))
            .expect("netns")
            .expect("echo");
    }
    for (name, t) in [("first", a), ("second", b)] {
        let (ps, summary) = stop(t);
        let req: Vec<&Value> = ps
            .iter()
            .filter(|p| p["icmp"]["type"] == 8 && p["icmp"]["id"] == 0x2a2a)
            .collect();
        assert_eq!(req.len(), 3, "{name}: {ps:#?}");
        for p in req {
            assert_eq!(core_stages(p), LO_PATH, "{name}: {p}");
        }
        assert_eq!(summary["summary"]["lost_events"], 0);
    }
    assert!(tcx_on_lo(&sb).is_empty());
}

#[test]
fn honest_under_sustained_load() {
    if !privileged() {
        return;
    }
    let secs: u64 = std::env::var("LOTRACE_PRESSURE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let sb = Sandbox::new("lt-load").expect("sandbox");
    let before = lo_tx_packets(&sb);
    // The packets, to show some incomplete ones when the counts disagree.
    let out_path = std::env::temp_dir().join(format!("lotrace-load-{}.json", std::process::id()));
    let out = std::fs::File::create(&out_path).expect("output file");
    let (mut child, _, err) = launch(&sb, &["--format", "json"], &[], Stdio::from(out));
    let err_rx = read_all(err);
    pressure(&sb, secs);
    let hwm_kib: u64 = std::fs::read_to_string(format!("/proc/{}/status", child.id()))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM");
    signal(child.id(), libc::SIGINT);
    assert!(child.wait().expect("wait").success());
    let err = err_rx.recv_timeout(Duration::from_secs(10)).expect("stderr");
    let s = summary_of(&err);
    let s = &s["summary"];
    let sent = lo_tx_packets(&sb) - before;
    // Packets cut by the start or the end of tracing are counted apart from `packets`.
    let packets = ["packets", "in_flight_at_start", "in_flight_at_end"]
        .iter()
        .map(|k| s[k].as_u64().expect(k))
        .sum::<u64>();
    let lost = s["lost_events"].as_u64().expect("lost") + s["scope_overflow"].as_u64().expect("scope");
    // (An emulated guest sharing its host with other work once sent 6,147 in the 5 s.)
    assert!(sent > 2_000, "the load ran: {sent} packets");
    // (summary_of checked events_emitted == events_received: the off-by-one this test once hit.)
    // Every lo packet is a reconstructed packet (complete, expired or in flight) unless events
    // were lost, and then the loss is reported: never fewer packets than sent without a count.
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    let incomplete: Vec<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|p| p["complete"] == false)
        .take(3)
        .map(|p| {
            let stages: Vec<&str> = p["stages"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s["stage"].as_str())
                .collect();
            format!("{} {} {}: {}", p["proto"], p["len"], p["verdict"], stages.join(","))
        })
        .collect();
    // Where the kernel ran no tracing program for some packets (seen by lo's tc programs only,
    // `tc_only`: softirqs on top of one process of this host), a few such crossings have been
    // found at addresses holding other packets; they are counted there, never silently.
    let unseen = tc_only_records(s) + s["tc_only"]["egress"].as_u64().expect("tc_only");
    if lost == 0 && unseen == 0 {
        assert_eq!(packets, sent, "{s}\nincomplete, for example: {incomplete:#?}");
    } else {
        assert!(
            packets <= sent + lost && sent <= packets + lost + unseen,
            "sent {sent}: {s}"
        );
    }
    assert!(hwm_kib < 64 * 1024, "peak RSS {hwm_kib} KiB");
}

/// A reader of stdout that does not keep up never holds up the ring reader: while nobody reads
/// the pipe, lotrace goes on reconstructing; what it could not print is counted (`unprinted`),
/// and every packet is either printed or counted.
#[test]
fn a_stalled_stdout_never_stalls_tracing_and_what_is_not_printed_is_counted() {
    if !privileged() {
        return;
    }
    let sb = Sandbox::new("lt-stall").expect("sandbox");
    // stdout is a pipe this test does not read until lotrace has been told to stop.
    let (mut child, _, err) = launch(&sb, &["--format", "json"], &[], Stdio::piped());
    let err_rx = read_all(err);
    const N: u32 = 3_000;
    let got = flood_ping(&sb, N);
    assert_eq!(got, (N as u64, N as u64), "the traffic is untouched");
    signal(child.id(), libc::SIGINT);
    let out_rx = read_all(child.stdout.take().expect("stdout"));
    assert!(child.wait().expect("wait").success());
    let out = out_rx.recv_timeout(Duration::from_secs(30)).expect("stdout");
    let err = err_rx.recv_timeout(Duration::from_secs(10)).expect("stderr");
    let summary = summary_of(&err);
    let s = &summary["summary"];
    let num = |k: &str| s[k].as_u64().unwrap_or_else(|| panic!("{k} in {s}"));
    // 2 x 3,000 lo packets and 3,000 socket copies cannot wait in a queue of 4,096 plus a pipe.
    assert!(num("unprinted") > 0, "{s}");
    assert_eq!(num("printed") + num("unprinted"), num("packets") + num("copies"), "{s}");
    assert_eq!(out.lines().count() as u64, num("printed"), "{s}");
    assert!(
        num("packets") + num("lost_events") >= 2 * N as u64,
        "every lo packet was reconstructed, or its loss counted: {s}"
    );
}

/// `ping -f -c N` inside the sandbox: (transmitted, received).
pub(crate) fn flood_ping(sb: &Sandbox, n: u32) -> (u64, u64) {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &sb.name,
            tools::require("ping"),
            "-f",
            "-q",
            "-c",
            &n.to_string(),
            "-W",
            "2",
            "127.0.0.1",
        ])
        .output()
        .expect("ping");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("ping said: {text} {}", String::from_utf8_lossy(&out.stderr)));
    let num = |key: &str| -> u64 {
        line.split(',')
            .find(|p| p.contains(key))
            .and_then(|p| p.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {line}"))
    };
    (num("transmitted"), num("received"))
}

/// Sustained UDP flood plus TCP bulk on lo for `secs`, from two threads in the sandbox.
pub(crate) fn pressure(sb: &Sandbox, secs: u64) {
    sb.netns
        .run(|| {
            use std::io::Write as _;
            let stop = std::time::Instant::now() + Duration::from_secs(secs);
            std::thread::scope(|s| {
                s.spawn(|| {
                    let rx = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
                    rx.set_nonblocking(true).expect("nb");
                    let tx = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
                    let to = rx.local_addr().expect("addr");
                    let mut buf = [0u8; 2048];
                    while std::time::Instant::now() < stop {
                        for _ in 0..64 {
                            let _ = tx.send_to(&[1u8; 64], to);
                        }
                        while rx.recv_from(&mut buf).is_ok() {}
                    }
                });
                s.spawn(|| {
                    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp");
                    let addr = l.local_addr().expect("addr");
                    let sink = std::thread::spawn(move || {
                        if let Ok((mut c, _)) = l.accept() {
                            let _ = std::io::copy(&mut c, &mut std::io::sink());
                        }
                    });
                    let mut c = std::net::TcpStream::connect(addr).expect("connect");
                    let chunk = vec![7u8; 64 * 1024];
                    while std::time::Instant::now() < stop {
                        c.write_all(&chunk).expect("write");
                    }
                    drop(c);
                    let _ = sink.join();
                });
            });
        })
        .expect("netns");
}

/// Tracing started and stopped in the middle of 1 kHz UDP ping-pong: the programs start at once
/// when the whole plan is attached (no packet is caught by the hooks attached first only), and a
/// packet caught part-way at the start or still in flight at the stop is counted apart
/// (`in_flight_at_start`, `in_flight_at_end`), never as a broken packet. Every counted packet is
/// complete, in every run (LOTRACE_CUT_RUNS, default 5; the README's 20 were run with it).
#[test]
fn tracing_started_and_stopped_amid_traffic_counts_only_whole_packets() {
    if !privileged() {
        return;
    }
    let runs: u32 = std::env::var("LOTRACE_CUT_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let sb = Sandbox::new("lt-cut").expect("sandbox");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let lo = "127.0.0.1".parse().expect("ip");
    let (cut_start, cut_end) = std::thread::scope(|s| {
        let pong = s.spawn(|| {
            sb.netns
                .run(|| traffic::udp_ping_pong(lo, Duration::from_millis(1), Duration::from_secs(600), &stop))
                .expect("netns")
        });
        // The ping-pong stops however this scope ends (a failed assertion too).
        struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let _stop = StopOnDrop(&stop);
        let (mut at_start, mut at_end) = (0, 0);
        for run in 1..=runs {
            let (mut child, _, err) = launch(
                &sb,
                &["--format", "json", "--filter", "udp", "--count", "100"],
                &[],
                Stdio::piped(),
            );
            let out_rx = read_all(child.stdout.take().expect("stdout"));
            let err_rx = read_all(err);
            // It ends by itself once 100 packets are printed (2 per exchange: 50 ms of traffic);
            // one that has not within 60 s is stopped, and its summary says why.
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            let mut stopped = false;
            let status = loop {
                if let Some(st) = child.try_wait().expect("wait") {
                    break st;
                }
                if !stopped && std::time::Instant::now() > deadline {
                    signal(child.id(), libc::SIGINT);
                    stopped = true;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let err = err_rx.recv_timeout(Duration::from_secs(10)).expect("stderr");
            assert!(status.success(), "run {run}: {err}");
            let out = out_rx.recv_timeout(Duration::from_secs(10)).expect("stdout");
            let s = summary_of(&err);
            let s = &s["summary"];
            let num = |k: &str| s[k].as_u64().unwrap_or_else(|| panic!("{k} in {s}"));
            assert_eq!(num("printed"), 100, "run {run} (stopped at 60 s: {stopped}): {s}");
            // Every counted packet is whole, but those the kernel ran no tracing program for
            // (`tc_only`, see the README's Identity: a host quirk, counted, never hidden).
            let unseen = tc_only_records(s);
            assert_eq!(
                num("complete") + unseen,
                num("packets"),
                "run {run}: every counted packet is whole: {s}"
            );
            if unseen == 0 {
                assert_eq!(s["complete_pct"].as_f64(), Some(100.0), "run {run}");
            }
            for l in out.lines() {
                let p: Value = serde_json::from_str(l).expect("json");
                let tc_seen = !stages(&p).contains(&"xmit");
                assert!(p["complete"] == true || tc_seen, "run {run}: {p}");
                assert!(
                    p.get("in_flight_at_start").is_none(),
                    "not printed without --partial: {p}"
                );
            }
            at_start += num("in_flight_at_start");
            at_end += num("in_flight_at_end");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(pong.join().expect("ping-pong").expect("udp") > 0);
        (at_start, at_end)
    });
    // What was cut is said, and bounded: at most one exchange in flight at each edge.
    assert!(
        cut_start <= 2 * runs as u64 && cut_end <= 2 * runs as u64,
        "{cut_start} {cut_end}"
    );
}
