//! `lotrace agent`: every namespace's lo counted in the kernel, checked against each namespace's
//! own lo counters, scraped directly and through a real Prometheus server (Debian's).
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use loopback_user::{netns::Sandbox, traffic};
use serde_json::Value;

use crate::support::{BIN, lo_tx_packets, privileged, tools};

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A free TCP port on 127.0.0.1 (the kernel's pick; released for the caller to bind).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// One HTTP GET to 127.0.0.1:port; the body, or None when nothing answers.
fn get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then(|| body.to_string())
}

/// Waits up to `secs` for `f` to give Some, polling every 100 ms; panics with `what` otherwise.
pub(crate) fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out after {secs} s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(crate) struct Agent {
    child: Child,
    pub(crate) port: u16,
    stderr: std::sync::mpsc::Receiver<String>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Agent {
    /// `lotrace agent --listen 127.0.0.1:PORT ARGS`, once it serves.
    pub(crate) fn start(args: &[&str]) -> Self {
        Self::start_in(Command::new(BIN), args)
    }

    /// The same, with only the capabilities `caps` (e.g. `BPF`) in its bounding set, as a
    /// container given exactly those would run it.
    pub(crate) fn start_with_caps(caps: &[String], args: &[&str]) -> Self {
        let set: String = caps.iter().map(|c| format!(",+{}", c.to_lowercase())).collect();
        let mut c = Command::new(tools::require("setpriv"));
        c.arg(format!("--bounding-set=-all{set}")).arg("--").arg(BIN);
        Self::start_in(c, args)
    }

    fn start_in(mut cmd: Command, args: &[&str]) -> Self {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut child = cmd
            .args(["agent", "--listen", &listen])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn lotrace agent");
        let mut err = BufReader::new(child.stderr.take().expect("stderr"));
        let mut line = String::new();
        err.read_line(&mut line).expect("read stderr");
        assert!(line.contains("serving http://"), "the agent did not start: {line}");
        Self {
            child,
            port,
            stderr: crate::support::read_all(err),
        }
    }

    pub(crate) fn metrics(&self) -> String {
        get(self.port, "/metrics").expect("the agent answers /metrics")
    }

    /// Stops it with SIGTERM; its last stderr line.
    pub(crate) fn stop(mut self) -> (i32, String) {
        crate::support::signal(self.child.id(), libc::SIGTERM);
        let status = self.child.wait().expect("wait agent");
        let err = self.stderr.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
        (status.code().unwrap_or(-1), err)
    }
}

/// The labels every series of a namespace carries beside `netns`: its owner's.
const OWNER_LABELS: &[&str] = &[
    "owner",
    "node",
    "container_runtime",
    "container_id",
    "container_name",
    "k8s_pod_name",
    "k8s_namespace_name",
    "k8s_pod_uid",
    "k8s_workload_name",
];

/// The samples of an OpenMetrics text whose name is `name` and whose labels include `netns`,
/// by their other labels but the owner's (as `k="v",...`).
pub(crate) fn samples(text: &str, name: &str, netns: u32) -> BTreeMap<String, f64> {
    let want = format!("netns=\"{netns}\"");
    text.lines()
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, labels) = series.split_once('{')?;
            if n != name {
                return None;
            }
            let labels = labels.trim_end_matches('}');
            let mut rest: Vec<&str> = labels.split(',').collect();
            let at = rest.iter().position(|l| *l == want)?;
            rest.remove(at);
            rest.retain(|l| !OWNER_LABELS.iter().any(|k| l.starts_with(&format!("{k}=\""))));
            Some((rest.join(","), value.parse().ok()?))
        })
        .collect()
}

fn total(text: &str, name: &str, netns: u32) -> u64 {
    samples(text, name, netns).values().sum::<f64>() as u64
}

fn lo_tx_bytes(sb: &Sandbox) -> u64 {
    let out = Command::new("ip")
        .args(["-n", &sb.name, "-s", "-j", "link", "show", "dev", "lo"])
        .output()
        .expect("ip");
    let v: Value = serde_json::from_slice(&out.stdout).expect("ip -j");
    v[0]["stats64"]["tx"]["bytes"].as_u64().expect("tx bytes")
}

/// Known traffic in three namespaces: ICMP echoes, UDP exchanges, a TCP bulk transfer.
fn traffic_in(sbs: &[Sandbox]) {
    sbs[0]
        .netns
        .run(|| {
            for seq in 0..40 {
                traffic::icmp_echo(LOCAL, 0, 0x5a5a, seq, Duration::from_secs(2)).expect("echo");
            }
        })
        .expect("ping in netns");
    sbs[1]
        .netns
        .run(|| {
            for _ in 0..30 {
                traffic::udp_exchange(LOCAL, b"agent").expect("udp");
            }
        })
        .expect("udp in netns");
    sbs[2]
        .netns
        .run(|| traffic::tcp_bulk(LOCAL, 200, 16 << 10).expect("tcp bulk"))
        .expect("tcp in netns");
}

/// The agent's counts of each namespace equal that namespace's lo counters exactly (packets and
/// bytes), every stage histogram counts every packet, and nothing overflowed.
fn check_exact(text: &str, sb: &Sandbox, sent: u64, bytes: u64) -> Result<(), String> {
    let ino = sb.netns.inode;
    let got = total(text, "lotrace_lo_packets_total", ino);
    let got_bytes = total(text, "lotrace_lo_bytes_total", ino);
    if got != sent || got_bytes != bytes {
        return Err(format!(
            "{}: agent {got} packets / {got_bytes} bytes, lo counters {sent} / {bytes}",
            sb.name
        ));
    }
    for stage in ["xmit", "backlog", "crossing"] {
        let counts = samples(text, "lotrace_lo_latency_seconds_count", ino);
        let n = counts.get(&format!("stage=\"{stage}\"")).copied().unwrap_or(-1.0) as i64;
        if n != sent as i64 {
            return Err(format!(
                "{}: stage {stage} histogram counts {n}, packets {sent}",
                sb.name
            ));
        }
    }
    Ok(())
}

#[test]
fn agent_counts_each_namespace_exactly_as_its_lo_does() {
    if !privileged() {
        return;
    }
    let sbs = [
        Sandbox::new("lt-agent").expect("sandbox"),
        Sandbox::new("lt-agent").expect("sandbox"),
        Sandbox::new("lt-agent").expect("sandbox"),
    ];
    let agent = Agent::start(&["--forget-after", "2"]);
    let before: Vec<(u64, u64)> = sbs.iter().map(|s| (lo_tx_packets(s), lo_tx_bytes(s))).collect();
    traffic_in(&sbs);
    let sent: Vec<(u64, u64)> = sbs
        .iter()
        .zip(&before)
        .map(|(s, b)| (lo_tx_packets(s) - b.0, lo_tx_bytes(s) - b.1))
        .collect();
    for (sb, (n, _)) in sbs.iter().zip(&sent) {
        assert!(*n >= 60, "{}: only {n} lo packets: the traffic did not run", sb.name);
    }
    // Counted in the kernel as they happen: the first scrape after the traffic has them all.
    let text = agent.metrics();
    for (sb, (n, b)) in sbs.iter().zip(&sent) {
        check_exact(&text, sb, *n, *b).unwrap_or_else(|e| panic!("{e}"));
    }
    // Delivery: the TCP bulk was read by its server (a segment read in pieces counts once, so at
    // most its packets); each of the 30 UDP exchanges is two datagrams read, matched to their
    // socket's reads by port (`sock:sock_recv_length`, where the kernel has it: 6.4+); the pings
    // are read by a raw socket as clones: none.
    let udp_reads = !text.contains("lotrace_agent_attach_failures{hook=\"sock_recv_length\"");
    for stage in ["receive_to_app", "end_to_end"] {
        let delivered = |sb: &Sandbox| {
            samples(&text, "lotrace_lo_delivery_latency_seconds_count", sb.netns.inode)
                .get(&format!("stage=\"{stage}\""))
                .copied()
                .unwrap_or(0.0) as u64
        };
        let tcp = delivered(&sbs[2]);
        assert!(tcp > 0 && tcp <= sent[2].0, "TCP segments read, {stage}: {tcp}");
        // Without that tracepoint, a kernel that frees a read datagram with `consume_skb`
        // still shows its delivery; one that does not, none.
        let udp = delivered(&sbs[1]);
        assert!(
            udp == 60 || (!udp_reads && udp == 0),
            "UDP datagrams read, {stage}: {udp}"
        );
        assert_eq!(delivered(&sbs[0]), 0, "ping replies are read as clones, {stage}");
    }
    // Every metric the agent serves is documented.
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/agent.md")).expect("docs/agent.md");
    for name in text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
    {
        let suffix = if text.contains(&format!("# TYPE {name} counter")) {
            "_total"
        } else {
            ""
        };
        let shown = format!("`{name}{suffix}`");
        assert!(docs.contains(&shown), "{shown} is not in docs/agent.md");
    }
    // Each namespace's own protocol: the ICMP one has only ICMP, and so on.
    assert!(samples(&text, "lotrace_lo_packets_total", sbs[0].netns.inode).contains_key("proto=\"icmp\""));
    assert!(samples(&text, "lotrace_lo_packets_total", sbs[1].netns.inode).contains_key("proto=\"udp\""));
    assert!(samples(&text, "lotrace_lo_packets_total", sbs[2].netns.inode).contains_key("proto=\"tcp\""));
    for map in ["netns", "drops", "in_flight"] {
        assert!(
            text.contains(&format!("lotrace_agent_overflow_total{{map=\"{map}\"}} 0")),
            "overflow of {map}:\n{text}"
        );
    }
    // A namespace made now is watched within 2 s (the agent looks once a second).
    let late = Sandbox::new("lt-agent").expect("sandbox");
    let made = Instant::now();
    let info = format!("source=\"netns\",name=\"{}\"", late.name);
    wait_for(10, "the new namespace in /metrics", || {
        let t = agent.metrics();
        (samples(&t, "lotrace_netns_info", late.netns.inode).get(&info) == Some(&1.0)).then_some(())
    });
    let took = made.elapsed();
    let before = lo_tx_packets(&late);
    late.netns
        .run(|| traffic::icmp_echo(LOCAL, 0, 7, 1, Duration::from_secs(2)).expect("echo"))
        .expect("ping");
    let n = lo_tx_packets(&late) - before;
    assert_eq!(total(&agent.metrics(), "lotrace_lo_packets_total", late.netns.inode), n);
    // One that goes away is released: its info series goes at once, its last counts stay for
    // --forget-after (2 s), then they go too.
    let gone = late.netns.inode;
    drop(late);
    let t = wait_for(10, "the removed namespace's info series to go", || {
        let t = agent.metrics();
        samples(&t, "lotrace_netns_info", gone).is_empty().then_some(t)
    });
    assert_eq!(
        total(&t, "lotrace_lo_packets_total", gone),
        n,
        "a gone namespace's last counts are still served for --forget-after"
    );
    wait_for(10, "the removed namespace's series to go", || {
        let t = agent.metrics();
        (!t.contains(&format!("netns=\"{gone}\""))).then_some(())
    });
    let (rc, last) = agent.stop();
    assert_eq!(rc, 0, "{last}");
    assert!(
        last.contains("stopped") && last.contains("nothing overflowed"),
        "{last}"
    );
    assert!(
        took < Duration::from_secs(3),
        "a new namespace took {took:?} to be watched"
    );
    assert_nothing_left("SIGTERM");
}

fn agent_programs_now() -> Vec<String> {
    aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .filter_map(|p| p.name_as_str().map(str::to_string))
        .filter(|n| n.starts_with("agent_"))
        .collect()
}

/// No program of an agent stays loaded (the kernel frees them asynchronously: up to 5 s).
fn assert_nothing_left(after: &str) {
    let start = Instant::now();
    let mut left = agent_programs_now();
    while !left.is_empty() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
        left = agent_programs_now();
    }
    assert!(left.is_empty(), "still loaded after {after}: {left:?}");
}

/// Of namespaces that each sent `sent` lo packets, against a bound that some of them are beyond:
/// every one with series is counted exactly, the packets of the others are in the netns
/// overflow (two samples each: backlog enqueue, receive). Returns how many have series.
fn counted_within_the_bound(text: &str, sbs: &[Sandbox], sent: &[u64]) -> usize {
    let (mut present, mut absent_packets) = (0, 0);
    for (sb, n) in sbs.iter().zip(sent) {
        if text.contains(&format!("lotrace_lo_packets_total{{netns=\"{}\"", sb.netns.inode)) {
            let got = total(text, "lotrace_lo_packets_total", sb.netns.inode);
            assert_eq!(got, *n, "{}: a namespace within the bound is counted exactly", sb.name);
            present += 1;
        } else {
            absent_packets += n;
        }
    }
    let overflow = text
        .lines()
        .find_map(|l| l.strip_prefix("lotrace_agent_overflow_total{map=\"netns\"} "))
        .and_then(|v| v.parse::<u64>().ok())
        .expect("netns overflow metric");
    assert!(
        absent_packets > 0 && overflow >= 2 * absent_packets,
        "overflow {overflow}, packets of namespaces beyond the bound {absent_packets}"
    );
    present
}

#[test]
fn agent_beyond_its_namespace_bound_counts_the_overflow_and_stays_exact_within_it() {
    if !privileged() {
        return;
    }
    let sbs: Vec<Sandbox> = (0..8).map(|_| Sandbox::new("lt-agentb").expect("sandbox")).collect();
    let agent = Agent::start(&["--max-netns", "4"]);
    let mut sent = Vec::new();
    for sb in &sbs {
        let before = lo_tx_packets(sb);
        sb.netns
            .run(|| {
                for seq in 0..5 {
                    traffic::icmp_echo(LOCAL, 0, 0x0b0b, seq, Duration::from_secs(2)).expect("echo");
                }
            })
            .expect("ping");
        sent.push(lo_tx_packets(sb) - before);
    }
    let present = counted_within_the_bound(&agent.metrics(), &sbs, &sent);
    assert!(
        (1..=4).contains(&present),
        "{present} of 8 namespaces counted with --max-netns 4"
    );
    let (rc, last) = agent.stop();
    assert_eq!(rc, 0, "{last}");
    assert!(last.contains("overflowed:") && last.contains(" netns"), "{last}");
}

/// The value of an unlabelled sample.
fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} "))?.parse().ok())
}

/// A thousand namespaces with traffic against the default bound of 256: no crash, every one
/// counted is counted exactly, the rest is counted as overflow, and all are released once gone.
/// (Host only: a thousand namespaces in an emulated guest take minutes.)
#[test]
fn thousand_namespaces_beyond_the_bound_are_overflow_and_all_are_released() {
    if !privileged() {
        return;
    }
    let agent = Agent::start(&["--forget-after", "0"]);
    let baseline = gauge(&agent.metrics(), "lotrace_agent_netns_watched").expect("watched gauge");
    let sbs: Vec<Sandbox> = (0..1000).map(|_| Sandbox::new("lt-agentk").expect("sandbox")).collect();
    let mut sent = Vec::new();
    for sb in &sbs {
        let before = lo_tx_packets(sb);
        sb.netns
            .run(|| traffic::icmp_echo(LOCAL, 0, 0x0c0c, 1, Duration::from_secs(2)).expect("echo"))
            .expect("ping");
        sent.push(lo_tx_packets(sb) - before);
    }
    let present = counted_within_the_bound(&agent.metrics(), &sbs, &sent);
    // The bound holds the host's namespace and any others this machine had too.
    assert!(
        (200..=256).contains(&present),
        "{present} of 1000 namespaces counted with the default bound of 256"
    );
    let inodes: Vec<u32> = sbs.iter().map(|s| s.netns.inode).collect();
    drop(sbs);
    // All released (series gone, watched back to where it was) within a few scans.
    let text = wait_for(10, "the thousand namespaces released", || {
        let t = agent.metrics();
        let watched = gauge(&t, "lotrace_agent_netns_watched")?;
        let any = inodes.iter().any(|i| t.contains(&format!("netns=\"{i}\"")));
        (watched <= baseline && !any).then_some(t)
    });
    assert!(
        gauge(&text, "lotrace_agent_netns_released_total").unwrap_or(0.0) >= 1000.0,
        "released count"
    );
    let (rc, last) = agent.stop();
    assert_eq!(rc, 0, "{last}");
}

/// Forty namespaces that live for milliseconds (a process that enters its own, sends two packets
/// and exits) while the agent scans: each can vanish between being found and being opened. The
/// agent stays up, answers every scrape, says nothing went wrong, and keeps none of them.
#[test]
fn agent_survives_namespaces_that_vanish_while_it_scans() {
    if !privileged() {
        return;
    }
    use std::os::unix::process::CommandExt;
    let agent = Agent::start(&[]);
    let baseline = gauge(&agent.metrics(), "lotrace_agent_netns_watched").expect("watched gauge");
    let script = format!(
        "{} link set lo up && {} -c 1 -W 1 127.0.0.1 >/dev/null",
        tools::require("ip"),
        tools::require("ping")
    );
    // Scrapes all the while, every one answered (a count, not a rate: guests are slow).
    let port = agent.port;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = done.clone();
    let scraper = std::thread::spawn(move || {
        let (mut asked, mut answered) = (0u32, 0u32);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            asked += 1;
            answered += get(port, "/metrics").is_some_and(|b| b.contains("lotrace_agent_netns_watched")) as u32;
            std::thread::sleep(Duration::from_millis(20));
        }
        (asked, answered)
    });
    for _ in 0..40 {
        let mut c = Command::new("sh");
        c.args(["-c", &script]).stdout(Stdio::null()).stderr(Stdio::null());
        // SAFETY: unshare(2) in the child between fork and exec touches no memory of ours.
        unsafe {
            c.pre_exec(|| {
                if libc::unshare(libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let st = c.status().expect("a short-lived namespace");
        assert!(st.success(), "ping in a fresh namespace: {st}");
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (asked, answered) = scraper.join().expect("scraper");
    assert!(asked > 0 && answered == asked, "{answered} of {asked} scrapes answered");
    wait_for(5, "the short-lived namespaces released", || {
        (gauge(&agent.metrics(), "lotrace_agent_netns_watched")? <= baseline).then_some(())
    });
    let (rc, err) = agent.stop();
    assert_eq!(rc, 0, "{err}");
    for bad in ["error", "panicked", "cannot"] {
        assert!(!err.to_lowercase().contains(bad), "the agent said {bad:?}: {err}");
    }
}

#[test]
fn agent_killed_or_scraped_while_stopping_leaves_nothing() {
    if !privileged() {
        return;
    }
    // Scrapes racing SIGTERM: answered or refused, never a crash; exit 0.
    let agent = Agent::start(&[]);
    let port = agent.port;
    let scraper = std::thread::spawn(move || {
        let mut answered = 0;
        for _ in 0..200 {
            if get(port, "/metrics").is_some_and(|b| b.contains("lotrace_agent_netns_watched")) {
                answered += 1;
            }
        }
        answered
    });
    std::thread::sleep(Duration::from_millis(50));
    let (rc, last) = agent.stop();
    let answered = scraper.join().expect("scraper");
    assert_eq!(rc, 0, "{last}");
    assert!(last.contains("SIGTERM: stopped"), "{last}");
    assert!(answered >= 1, "no scrape was answered before the stop");
    assert_nothing_left("SIGTERM during scrapes");
    // kill -9: the kernel closes its descriptors; nothing is attached per namespace.
    let mut agent = Agent::start(&[]);
    assert!(
        !agent_programs_now().is_empty(),
        "the agent's programs are loaded while it runs"
    );
    crate::support::signal(agent.child.id(), libc::SIGKILL);
    let _ = agent.child.wait();
    assert_nothing_left("kill -9");
    // And the next one starts as usual.
    let agent = Agent::start(&[]);
    assert!(agent.metrics().contains("lotrace_agent_hooks"));
    let (rc, last) = agent.stop();
    assert_eq!(rc, 0, "{last}");
}

#[test]
fn agent_with_netns_counts_only_those_and_a_bad_listen_is_one_line() {
    if !privileged() {
        return;
    }
    // Bad input: one line, exit 2, nothing loaded.
    let (rc, _, err) = crate::support::run_bin(&["agent", "--listen", "nowhere"]);
    assert_eq!(rc, 2, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("not an address and port"), "{err}");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = busy.local_addr().expect("addr").port();
    let (rc, _, err) = crate::support::run_bin(&["agent", "--listen", &format!("127.0.0.1:{port}")]);
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("cannot listen on") && err.contains("in use"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let a = Sandbox::new("lt-agentf").expect("sandbox");
    let b = Sandbox::new("lt-agentf").expect("sandbox");
    let agent = Agent::start(&["--netns", &a.name]);
    for sb in [&a, &b] {
        sb.netns
            .run(|| traffic::icmp_echo(LOCAL, 0, 9, 1, Duration::from_secs(2)).expect("echo"))
            .expect("ping");
    }
    let text = agent.metrics();
    assert_eq!(total(&text, "lotrace_lo_packets_total", a.netns.inode), 2, "{text}");
    assert!(!text.contains(&format!("netns=\"{}\"", b.netns.inode)), "{text}");
    assert!(text.contains("lotrace_agent_netns_watched 1"), "{text}");
    let (rc, last) = agent.stop();
    assert_eq!(rc, 0, "{last}");
}

/// A real Prometheus server (Debian's), in a throwaway directory, scraping the agent every
/// second; stopped and removed by Drop.
pub(crate) struct Prometheus {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Prometheus {
    fn start(target_port: u16) -> Self {
        Self::start_with(target_port, None)
    }

    /// Scraping the agent on `target_port`, evaluating the rules file `rules` (if any) every
    /// second.
    pub(crate) fn start_with(target_port: u16, rules: Option<&std::path::Path>) -> Self {
        let bin = tools::path_of("prometheus").unwrap_or_else(|e| panic!("{e}"));
        let dir = std::env::temp_dir().join(format!("lotrace-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).expect("prometheus dir");
        let rule_files = rules.map_or(String::new(), |r| format!("rule_files:\n  - {}\n", r.display()));
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n{rule_files}scrape_configs:\n  - job_name: lotrace\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("prometheus.yml");
        let port = free_port();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("log")).expect("log"))
            .spawn()
            .expect("start prometheus");
        let p = Self { child, port, dir };
        wait_for(60, "Prometheus to scrape the agent (up == 1)", || {
            (p.query("up{job=\"lotrace\"}")?.first()?.1 == 1.0).then_some(())
        });
        p
    }

    /// An instant query: (labels, value) per series; None while Prometheus does not answer.
    pub(crate) fn query(&self, q: &str) -> Option<Vec<(Value, f64)>> {
        let enc: String = q
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let body = get(self.port, &format!("/api/v1/query?query={enc}"))?;
        let v: Value = serde_json::from_str(&body).ok()?;
        if v["status"] != "success" {
            return None;
        }
        Some(
            v["data"]["result"]
                .as_array()?
                .iter()
                .filter_map(|r| Some((r["metric"].clone(), r["value"][1].as_str()?.parse().ok()?)))
                .collect(),
        )
    }

    fn scalar(&self, q: &str) -> Option<f64> {
        Some(self.query(q)?.first()?.1)
    }
}

#[test]
fn prometheus_scrapes_every_namespace_exactly() {
    if !privileged() {
        return;
    }
    let mut sbs: Vec<Sandbox> = (0..3).map(|_| Sandbox::new("lt-prom").expect("sandbox")).collect();
    let agent = Agent::start(&["--forget-after", "0"]);
    let prom = Prometheus::start(agent.port);
    for sb in &sbs {
        let q = format!("lotrace_netns_info{{netns=\"{}\"}}", sb.netns.inode);
        wait_for(30, &format!("{} in Prometheus", sb.name), || {
            (prom.scalar(&q)? == 1.0).then_some(())
        });
    }
    let before: Vec<(u64, u64)> = sbs.iter().map(|s| (lo_tx_packets(s), lo_tx_bytes(s))).collect();
    traffic_in(&sbs);
    for (sb, b) in sbs.iter().zip(&before) {
        let (n, bytes) = (lo_tx_packets(sb) - b.0, lo_tx_bytes(sb) - b.1);
        let ino = sb.netns.inode;
        let q = format!("sum(lotrace_lo_packets_total{{netns=\"{ino}\"}})");
        // Prometheus has it once a scrape after the traffic landed; then it must be exact.
        let got = wait_for(30, &format!("{}'s packets in Prometheus", sb.name), || {
            let v = prom.scalar(&q)? as u64;
            (v >= n).then_some(v)
        });
        assert_eq!(got, n, "{}: Prometheus {got} packets, lo tx {n}", sb.name);
        let got_bytes = prom
            .scalar(&format!("sum(lotrace_lo_bytes_total{{netns=\"{ino}\"}})"))
            .expect("bytes") as u64;
        assert_eq!(got_bytes, bytes, "{}: bytes", sb.name);
        for (labels, count) in prom
            .query(&format!("lotrace_lo_latency_seconds_count{{netns=\"{ino}\"}}"))
            .expect("histogram counts")
        {
            assert_eq!(
                count as u64, n,
                "{}: histogram {labels} counts {count}, packets {n}",
                sb.name
            );
        }
        // A quantile Prometheus computes from our buckets: a crossing takes some time, under 1 s.
        let p50 = prom
            .scalar(&format!(
                "histogram_quantile(0.5, lotrace_lo_latency_seconds_bucket{{netns=\"{ino}\",stage=\"crossing\"}})"
            ))
            .expect("p50");
        assert!(p50 > 0.0 && p50 < 1.0, "{}: crossing p50 {p50}", sb.name);
    }
    // A namespace made during the run appears; one removed stops being scraped.
    let late = Sandbox::new("lt-prom").expect("sandbox");
    let q = format!("lotrace_netns_info{{netns=\"{}\"}}", late.netns.inode);
    wait_for(30, "the new namespace in Prometheus", || {
        (prom.scalar(&q)? == 1.0).then_some(())
    });
    let gone = sbs.remove(0);
    let ino = gone.netns.inode;
    drop(gone);
    // Gone from a scrape, its series are marked stale: an instant query no longer returns them.
    wait_for(30, "the removed namespace to leave Prometheus", || {
        prom.query(&format!("{{netns=\"{ino}\"}}"))?.is_empty().then_some(())
    });
    let (rc, last) = agent.stop();
    assert_eq!(rc, 0, "{last}");
}

#[test]
fn agent_counts_loopback_traffic_that_left_through_another_device() {
    if !privileged() {
        return;
    }
    // A namespace whose routes send 127.0.0.99 out of a veth (route_localnet allows it, a
    // permanent neighbour entry spares the ARP): what `prove` would call DISPROVEN.
    let sb = Sandbox::new("lt-agente").expect("sandbox");
    sb.add_veth("lt0", "lt0p", &["10.201.0.1/24"], true).expect("veth");
    sb.netns
        .run(|| std::fs::write("/proc/sys/net/ipv4/conf/lt0/route_localnet", "1"))
        .expect("netns")
        .expect("route_localnet");
    sb.ip(&["route", "add", "127.0.0.99/32", "dev", "lt0", "table", "local"])
        .expect("route");
    sb.ip(&[
        "neigh",
        "add",
        "127.0.0.99",
        "lladdr",
        "02:00:00:00:00:01",
        "dev",
        "lt0",
        "nud",
        "permanent",
    ])
    .expect("neigh");
    let agent = Agent::start(&[]);
    let ino = sb.netns.inode;
    let before = total(&agent.metrics(), "lotrace_lo_escaped_packets_total", ino);
    sb.netns
        .run(|| {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
            for _ in 0..3 {
                s.send_to(b"leak", "127.0.0.99:9")
                    .expect("send to 127.0.0.99 through lt0");
            }
        })
        .expect("netns");
    let text = wait_for(10, "the escaped packets", || {
        let t = agent.metrics();
        (total(&t, "lotrace_lo_escaped_packets_total", ino) >= before + 3).then_some(t)
    });
    // Traffic that stays on lo is not counted as escaped.
    sb.netns
        .run(|| traffic::icmp_echo(LOCAL, 0, 3, 1, Duration::from_secs(2)).expect("echo"))
        .expect("ping");
    let after = total(&agent.metrics(), "lotrace_lo_escaped_packets_total", ino);
    assert_eq!(
        after,
        total(&text, "lotrace_lo_escaped_packets_total", ino),
        "ping on lo counted as escaped"
    );
    let escaped_to = |t: &str, to: &str| {
        samples(t, "lotrace_lo_escaped_packets_total", ino)
            .get(&format!("to=\"{to}\""))
            .copied()
            .unwrap_or(0.0) as u64
    };
    assert_eq!(
        escaped_to(&text, "local_address"),
        0,
        "nothing to an own address left yet"
    );

    // The namespace's own address, 10.201.0.1, routed out of lt0 (a rule ahead of the local
    // table sends it to table 100): its addresses are read through a process in it.
    let mut holder = Command::new(tools::require("ip"))
        .args(["netns", "exec", &sb.name, "sleep", "60"])
        .spawn()
        .expect("a process in the namespace");
    wait_for(10, "the namespace's own addresses", || {
        (total(&agent.metrics(), "lotrace_netns_local_addresses", ino) >= 1).then_some(())
    });
    for args in [
        &["route", "add", "10.201.0.1/32", "dev", "lt0", "table", "100"][..],
        &["rule", "add", "pref", "10", "to", "10.201.0.1", "lookup", "100"],
        &["rule", "del", "pref", "0"],
        &["rule", "add", "pref", "100", "lookup", "local"],
        &[
            "neigh",
            "add",
            "10.201.0.1",
            "lladdr",
            "02:00:00:00:00:02",
            "dev",
            "lt0",
            "nud",
            "permanent",
        ],
    ] {
        sb.ip(args).expect("policy routing");
    }
    sb.netns
        .run(|| {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
            for _ in 0..3 {
                s.send_to(b"leak", "10.201.0.1:9")
                    .expect("send to 10.201.0.1 through lt0");
            }
        })
        .expect("netns");
    let text = wait_for(10, "the packets to an own address", || {
        let t = agent.metrics();
        (escaped_to(&t, "local_address") >= 3).then_some(t)
    });
    assert_eq!(escaped_to(&text, "local_address"), 3, "exactly the three datagrams");
    // SAFETY: kill(2) of our own unreaped child.
    unsafe { libc::kill(holder.id() as i32, libc::SIGKILL) };
    let _ = holder.wait();
    let (rc, last) = agent.stop();
    assert_eq!(rc, 0, "{last}");
}
