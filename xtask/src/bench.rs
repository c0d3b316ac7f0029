//! `cargo xtask bench`: the traced workload's cost, as ratios against an untraced baseline
//! measured in the same run (never absolute targets). Workloads run on 127.0.0.1 inside a
//! throwaway network namespace; modes are interleaved per repetition so drift hits all alike.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

use crate::{ensure_tools, tools::Need};
use serde_json::Value;

/// The tracepoints lotrace attaches (see loopback-user/src/bpf/probes.rs), as bpftrace names them.
const TRACEPOINTS: &[&str] = &[
    "raw_syscalls:sys_enter",
    "fib:fib_table_lookup",
    "fib6:fib6_table_lookup",
    "net:net_dev_queue",
    "net:net_dev_start_xmit",
    "net:netif_rx",
    "irq:softirq_raise",
    "net:net_dev_xmit",
    "irq:softirq_entry",
    "net:netif_receive_skb",
    "sock:sk_data_ready",
    "skb:skb_copy_datagram_iovec",
    "sock:sock_recv_length",
    "skb:kfree_skb",
    "skb:consume_skb",
];

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Mode {
    Untraced,
    Lotrace,
    /// The same lotrace with the empty-hook floor object (every program returns at once): what
    /// the hooks themselves cost, the floor lotrace's own programs cannot go below.
    Floor,
    /// lotrace with `--kernel-cost`: gives the kernel time per packet, and shows what the
    /// kernel's own statistics cost.
    LotraceCost,
    Bpftrace,
    /// `lotrace agent`: every namespace counted in the kernel, no per-packet records.
    Agent,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, clap::ValueEnum)]
pub enum Workload {
    /// sockperf UDP ping-pong, client and server pinned to one CPU: median latency (us).
    PingPong,
    /// sockperf one-way UDP stream of 64-byte messages: message rate (msg/s).
    UdpStream,
    /// iperf3 TCP bulk transfer: throughput (Gbit/s).
    TcpBulk,
    /// sockperf TCP ping-pong, client and server pinned to one CPU: median latency (us). TCP's
    /// cost as a latency, which this VM measures steadily where iperf3's throughput swings.
    TcpPingPong,
}

impl Workload {
    fn name(&self) -> &'static str {
        match self {
            Workload::PingPong => "UDP ping-pong p50 latency (us), 1 CPU",
            Workload::UdpStream => "UDP one-way 64 B message rate (msg/s)",
            Workload::TcpBulk => "TCP bulk throughput (Gbit/s, iperf3)",
            Workload::TcpPingPong => "TCP ping-pong p50 latency (us), 1 CPU",
        }
    }
    fn target(&self) -> &'static str {
        match self {
            Workload::PingPong => "floor + 0.20x",
            Workload::UdpStream => ">= 0.80x",
            Workload::TcpBulk => ">= 0.90x",
            Workload::TcpPingPong => "ahead of bpftrace",
        }
    }
    /// A latency: lower is better (else a rate: higher is better).
    fn is_latency(&self) -> bool {
        matches!(self, Workload::PingPong | Workload::TcpPingPong)
    }
}

/// In how many repetitions `a` did better than `b` (`latency`: lower is better), of those where
/// both ran: "k/n".
/// The agent's slowdown as a share of trace's (each |ratio - 1|): 0.5 = half of trace's cost.
fn slowdown_share(agent: f64, trace: f64) -> f64 {
    (agent - 1.0).abs() / (trace - 1.0).abs().max(1e-9)
}

fn ahead_in(a: &[f64], b: &[f64], latency: bool) -> String {
    let n = a.len().min(b.len());
    let k = a
        .iter()
        .zip(b)
        .filter(|(x, y)| if latency { x < y } else { x > y })
        .count();
    format!("{k}/{n}")
}

struct Netns(String);

impl Netns {
    fn new() -> Result<Self> {
        let name = format!("lotrace-bench-{}", std::process::id());
        run_ok(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns(name);
        run_ok(Command::new("ip").args(["-n", &ns.0, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }
    fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, prog]);
        c
    }
    /// Starts a workload's server (`cmd`, made by [`Self::cmd`]) and returns once it listens on
    /// `port` (`tcp`, else UDP); a server that does not within 10 s is stopped.
    fn server(&self, cmd: &mut Command, tcp: bool, port: u16) -> Result<Child> {
        let mut server = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
        if let Err(e) = self.wait_listening(if tcp { "-t" } else { "-u" }, port) {
            let _ = server.kill();
            let _ = server.wait();
            return Err(e);
        }
        Ok(server)
    }

    /// Waits until a socket listens on `port` in the namespace (`proto`: `ss`'s `-t` or `-u`),
    /// at most 10 s.
    fn wait_listening(&self, proto: &str, port: u16) -> Result<()> {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let out = self
                .cmd("ss")
                .args(["-H", "-l", "-n", proto, "sport", "=", &format!(":{port}")])
                .output()
                .context("ss")?;
            if out.status.success() && !out.stdout.trim_ascii().is_empty() {
                return Ok(());
            }
            if Instant::now() >= until {
                bail!("no server listened on port {port} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run_ok(c: &mut Command) -> Result<()> {
    let out = c.output().with_context(|| format!("{c:?}"))?;
    if !out.status.success() {
        bail!("{c:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn read_lines(r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines().map_while(|l| l.ok()) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

/// What lotrace said about one run.
#[derive(Default, Clone, Debug)]
struct LotraceRun {
    /// "N/M" of its "N/M hooks attached" line.
    hooks: String,
    /// Events its programs emitted (0 for the empty-hook floor).
    emitted: u64,
    attach_ms: f64,
    peak_rss_kib: u64,
    packets: u64,
    complete_pct: f64,
    lost: u64,
    expired: u64,
    /// Kernel time of all lotrace programs (BPF run-time stats), per reconstructed packet.
    kernel_ns_per_packet: f64,
}

enum Tracer {
    None,
    Lotrace {
        child: Child,
        err: mpsc::Receiver<String>,
        attach_ms: f64,
        hooks: String,
    },
    Bpftrace {
        child: Child,
    },
    Agent {
        child: Child,
        /// CPU seconds (user + system) when it started serving, and when.
        cpu0: f64,
        t0: Instant,
    },
}

/// What the agent cost during one run.
#[derive(Clone, Copy)]
struct AgentRun {
    /// Its user-space CPU while the workload ran, as a share of one core.
    cpu_share: f64,
    peak_rss_kib: u64,
}

/// CPU seconds (user + system) of a process, from /proc/PID/stat.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) ends with ')': utime is the 12th after it.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf with a constant argument.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) / hz
}

/// The lotrace binaries the bench runs: the release build and the empty-hook floor build.
struct Binaries<'a> {
    lotrace: &'a Path,
    floor: &'a Path,
}

fn start(mode: Mode, bin: &Binaries, ns: &Netns) -> Result<Tracer> {
    match mode {
        Mode::Untraced => Ok(Tracer::None),
        Mode::Lotrace | Mode::LotraceCost | Mode::Floor => {
            let t0 = Instant::now();
            let exe = if mode == Mode::Floor { bin.floor } else { bin.lotrace };
            let mut child = crate::signals::defaults(&mut Command::new(exe))
                .args(["trace", "--netns", &ns.0, "--format", "json"])
                .args(if mode == Mode::LotraceCost {
                    &["--kernel-cost"][..]
                } else {
                    &[]
                })
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .context("start lotrace")?;
            let err = read_lines(child.stderr.take().expect("stderr"));
            let first = err
                .recv_timeout(Duration::from_secs(20))
                .map_err(|_| anyhow!("lotrace did not start"))?;
            let Some(hooks) = hooks_attached(&first) else {
                bail!("lotrace did not start: {first}");
            };
            Ok(Tracer::Lotrace {
                child,
                err,
                attach_ms: t0.elapsed().as_secs_f64() * 1e3,
                hooks,
            })
        }
        Mode::Agent => {
            let mut child = crate::signals::defaults(&mut Command::new(bin.lotrace))
                .args(["agent", "--listen", "127.0.0.1:0"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .context("start lotrace agent")?;
            let err = read_lines(child.stderr.take().expect("stderr"));
            let first = err
                .recv_timeout(Duration::from_secs(20))
                .map_err(|_| anyhow!("lotrace agent did not start"))?;
            if !first.contains("serving http://") {
                bail!("lotrace agent did not start: {first}");
            }
            std::thread::spawn(move || while err.recv().is_ok() {});
            Ok(Tracer::Agent {
                cpu0: cpu_secs(child.id()),
                t0: Instant::now(),
                child,
            })
        }
        Mode::Bpftrace => {
            let prog = format!(
                "{} {{ @[probe] = count(); }}",
                TRACEPOINTS
                    .iter()
                    .map(|t| format!("tracepoint:{t}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            // tracefs is mounted in a private mount namespace only, and only when the host has not
            // mounted it already: the host is left as it is.
            let mut child = crate::signals::defaults(&mut Command::new("unshare"))
                .args([
                    "-m",
                    "sh",
                    "-c",
                    "{ mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing; } && exec bpftrace -e \"$0\"",
                    &prog,
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .context("start bpftrace")?;
            let out = read_lines(child.stdout.take().expect("stdout"));
            let first = out
                .recv_timeout(Duration::from_secs(30))
                .map_err(|_| anyhow!("bpftrace did not start"))?;
            if !first.contains("Attaching") {
                bail!("bpftrace did not start: {first}");
            }
            std::thread::sleep(Duration::from_millis(500)); // attach finishes after the message
            std::thread::spawn(move || while out.recv().is_ok() {});
            Ok(Tracer::Bpftrace { child })
        }
    }
}

/// "N/M" from lotrace's "...: N/M hooks attached..." line.
fn hooks_attached(line: &str) -> Option<String> {
    let before = line
        .split(" hooks attached")
        .next()
        .filter(|_| line.contains(" hooks attached"))?;
    let n = before.rsplit(' ').next()?;
    let (a, b) = n.split_once('/')?;
    (a.parse::<u32>().is_ok() && b.parse::<u32>().is_ok()).then(|| n.to_string())
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

/// One HTTP/1.0 GET of 127.0.0.1:port/metrics; the body.
fn scrape(port: u16) -> Option<String> {
    use std::io::Write as _;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some(text.split_once("\r\n\r\n")?.1.to_string())
}

/// The agent at scale: its peak RSS with 100 idle namespaces, and the time from `ip netns add`
/// to the new namespace's first packet showing in /metrics. Returns the table's lines.
fn agent_scale(lotrace: &Path) -> Result<String> {
    struct Spaces(Vec<String>);
    impl Drop for Spaces {
        fn drop(&mut self) {
            for n in &self.0 {
                let _ = Command::new("ip").args(["netns", "del", n]).status();
            }
        }
    }
    let mut spaces = Spaces(Vec::new());
    for i in 0..100 {
        let n = format!("lotrace-bench-idle-{}-{i}", std::process::id());
        run_ok(Command::new("ip").args(["netns", "add", &n]))?;
        spaces.0.push(n);
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut child = crate::signals::defaults(&mut Command::new(lotrace))
        .args(["agent", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start lotrace agent")?;
    let res = (|| -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let watched = |t: &str| {
            t.lines()
                .find_map(|l| l.strip_prefix("lotrace_agent_netns_watched "))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        while scrape(port).is_none_or(|t| watched(&t) < 101.0) {
            if Instant::now() > deadline {
                bail!("the agent did not see the 100 idle namespaces within 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let rss = vm_hwm_kib(child.id());
        let n = format!("lotrace-bench-new-{}", std::process::id());
        let t0 = Instant::now();
        run_ok(Command::new("ip").args(["netns", "add", &n]))?;
        spaces.0.push(n.clone());
        run_ok(Command::new("ip").args(["-n", &n, "link", "set", "lo", "up"]))?;
        let ino = std::fs::metadata(format!("/run/netns/{n}"))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .context("stat the new namespace")?;
        run_ok(
            Command::new("ip")
                .args(["netns", "exec", &n, "ping", "-c", "1", "-W", "1", "127.0.0.1"])
                .stdout(Stdio::null()),
        )?;
        let want = format!("lotrace_lo_packets_total{{netns=\"{ino}\"");
        while scrape(port).is_none_or(|t| !t.contains(&want)) {
            if Instant::now() > deadline + Duration::from_secs(10) {
                bail!("the new namespace's packets did not show within 10 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let first = t0.elapsed();
        Ok(format!(
            "\n| lotrace agent at scale | |\n|---|---|\n| peak RSS with 100 idle namespaces (101 watched) | {:.1} MiB |\n| `ip netns add` to its first ping counted in /metrics | {:.0} ms |\n",
            rss as f64 / 1024.0,
            first.as_secs_f64() * 1e3
        ))
    })();
    let _ = interrupt(&mut child, "lotrace agent");
    res
}

/// What a run of a tracer left to report.
enum Report {
    None,
    Lotrace(LotraceRun),
    Agent(AgentRun),
}

fn stop(t: Tracer) -> Result<Report> {
    match t {
        Tracer::None => Ok(Report::None),
        Tracer::Bpftrace { mut child } => {
            interrupt(&mut child, "bpftrace")?;
            Ok(Report::None)
        }
        Tracer::Agent { mut child, cpu0, t0 } => {
            let cpu = cpu_secs(child.id()) - cpu0;
            let wall = t0.elapsed().as_secs_f64();
            let rss = vm_hwm_kib(child.id());
            let st = interrupt(&mut child, "lotrace agent")?;
            if !st.success() {
                bail!("lotrace agent failed ({st})");
            }
            Ok(Report::Agent(AgentRun {
                cpu_share: cpu / wall.max(1e-9),
                peak_rss_kib: rss,
            }))
        }
        Tracer::Lotrace {
            mut child,
            err,
            attach_ms,
            hooks,
        } => {
            std::thread::sleep(Duration::from_millis(200));
            let rss = vm_hwm_kib(child.id());
            let st = interrupt(&mut child, "lotrace")?;
            let lines: Vec<String> = err.iter().collect();
            if !st.success() {
                bail!("lotrace failed: {}", lines.join(" / "));
            }
            let last = lines.last().ok_or_else(|| anyhow!("lotrace printed no summary"))?;
            let v: Value = serde_json::from_str(last).with_context(|| format!("summary: {last}"))?;
            let s = &v["summary"];
            Ok(Report::Lotrace(LotraceRun {
                hooks,
                emitted: s["events_emitted"].as_u64().unwrap_or(0),
                attach_ms,
                peak_rss_kib: rss,
                packets: s["packets"].as_u64().unwrap_or(0),
                complete_pct: s["complete_pct"].as_f64().unwrap_or(0.0),
                lost: s["lost_events"].as_u64().unwrap_or(0)
                    + s["scope_overflow"].as_u64().unwrap_or(0)
                    + s["undecodable_events"].as_u64().unwrap_or(0),
                expired: s["expired"].as_u64().unwrap_or(0),
                kernel_ns_per_packet: {
                    let total: u64 = s["bpf_programs"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|p| p["total_ns"].as_u64()).sum())
                        .unwrap_or(0);
                    total as f64 / s["packets"].as_u64().unwrap_or(1).max(1) as f64
                },
            }))
        }
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// Stops a tracer we started the way Ctrl-C does, and waits for it. SIGINT is sent again every
/// 2 s while it runs (bpftrace once missed a first SIGINT and waited in epoll for good, which hung
/// a whole bench), and after 10 s it is killed and the bench fails saying so.
fn interrupt(child: &mut std::process::Child, what: &str) -> Result<std::process::ExitStatus> {
    for _ in 0..5 {
        // SAFETY: kill(2) of a child we started and have not yet reaped (no pid reuse).
        unsafe { libc_kill(child.id() as i32, 2) };
        let until = std::time::Instant::now() + Duration::from_secs(2);
        while std::time::Instant::now() < until {
            if let Some(st) = child.try_wait()? {
                return Ok(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    child.kill()?;
    child.wait()?;
    bail!("{what} did not stop within 10 s of SIGINT (killed)")
}

fn field_after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.split_once(key).map(|(_, r)| r.trim()))
        .and_then(|r| r.split_whitespace().next())
}

/// Runs one workload once; returns its metric.
fn workload(w: Workload, ns: &Netns, secs: u32) -> Result<f64> {
    let t = secs.to_string();
    match w {
        Workload::PingPong | Workload::UdpStream | Workload::TcpPingPong => {
            let is_tcp = w == Workload::TcpPingPong;
            let tcp: &[&str] = if is_tcp { &["--tcp"] } else { &[] };
            let mut server = ns.server(
                ns.cmd("taskset")
                    .args(["-c", "0", "sockperf", "sr", "-i", "127.0.0.1", "-p", "11111"])
                    .args(tcp),
                is_tcp,
                11111,
            )?;
            let mode = if w.is_latency() { "pp" } else { "tp" };
            let out = ns
                .cmd("taskset")
                .args([
                    "-c",
                    "0",
                    "sockperf",
                    mode,
                    "-i",
                    "127.0.0.1",
                    "-p",
                    "11111",
                    "-t",
                    &t,
                    "-m",
                    "64",
                ])
                .args(tcp)
                .output();
            let _ = server.kill();
            let _ = server.wait();
            let out = out?;
            let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
            let v = if w.is_latency() {
                field_after(&text, "percentile 50.000 =")
            } else {
                field_after(&text, "Message Rate is")
            };
            v.and_then(|s| s.parse::<f64>().ok())
                .ok_or_else(|| anyhow!("sockperf {mode}: no result in {text}"))
        }
        Workload::TcpBulk => {
            let mut server = ns.server(ns.cmd("iperf3").args(["-s", "-1", "-p", "5201"]), true, 5201)?;
            let out = ns
                .cmd("iperf3")
                .args(["-c", "127.0.0.1", "-p", "5201", "-t", &t, "-J"])
                .output();
            let _ = server.wait();
            let out = out?;
            let v: Value = serde_json::from_slice(&out.stdout).context("iperf3 -J")?;
            v["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .map(|b| b / 1e9)
                .ok_or_else(|| anyhow!("iperf3: no result"))
        }
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Criterion's estimates for the user-space benches, in elements per second.
struct UserSpeed {
    /// Decode + path reconstruction, in hook events per second (records laid end to end, as
    /// the ring buffer and a recording hold them).
    recon_events: f64,
    /// The same, each record in a heap allocation of its own (how this was measured before).
    recon_scattered: f64,
    /// Decode + reconstruction + one JSON line per packet, in packets per second.
    json_packets: f64,
}

/// Runs the criterion benches of `loopback-user/benches/reconstruct.rs`.
fn criterion(root: &Path) -> Result<UserSpeed> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root)
        .args([
            "bench",
            "-p",
            "loopback-user",
            "--bench",
            "reconstruct",
            "--",
            "--noplot",
        ])
        .output()
        .context("cargo bench")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("cargo bench failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let get = |id: &str| throughput(&text, id).ok_or_else(|| anyhow!("no throughput for {id} in criterion output"));
    Ok(UserSpeed {
        recon_events: get("reconstruct/lo_session_events")?,
        recon_scattered: get("reconstruct/lo_session_events_scattered")?,
        json_packets: get("json/lo_session_packets")?,
    })
}

/// The estimate of the first `thrpt:` line after bench `id`'s name, in elements per second.
/// "thrpt:  [2.7794 Melem/s 2.8509 Melem/s 2.9232 Melem/s]": the middle one is the estimate (a
/// later "change" block repeats `thrpt:` with percentages; only the first counts).
fn throughput(text: &str, id: &str) -> Option<f64> {
    // The name alone, or followed by "time:" on the same line (not a longer name it begins).
    let mut lines = text.lines().skip_while(|l| l.split_whitespace().next() != Some(id));
    let first = lines.next()?;
    let line = std::iter::once(first).chain(lines).find(|l| l.contains("thrpt:"))?;
    let nums: Vec<(f64, &str)> = line
        .split('[')
        .nth(1)?
        .split_whitespace()
        .collect::<Vec<_>>()
        .chunks(2)
        .filter_map(|c| Some((c[0].parse::<f64>().ok()?, *c.get(1)?)))
        .collect();
    let (v, unit) = nums.get(1).copied()?;
    Some(match unit.trim_end_matches(']') {
        "Gelem/s" => v * 1e9,
        "Melem/s" => v * 1e6,
        "Kelem/s" => v * 1e3,
        "elem/s" => v,
        _ => return None,
    })
}

/// User-space instructions per packet of `lotrace replay --format json` (decode, reconstruction,
/// one JSON line), counted by callgrind on the fixture recording of `rounds` rounds: what a
/// recording of `rounds` costs minus what an empty one costs (start-up, clap, the summary),
/// divided by its packets. Deterministic: the same build gives the same count on any machine.
fn instructions_per_packet(root: &Path, lotrace: &Path, rounds: u32) -> Result<(f64, u64)> {
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let count = |rounds: u32| -> Result<(u64, u64)> {
        let rec = dir.join(format!("fixture-{rounds}.lotrace"));
        run_ok(
            Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .current_dir(root)
                .args([
                    "run",
                    "-q",
                    "--release",
                    "-p",
                    "loopback-user",
                    "--features",
                    "test-support",
                ])
                .args(["--example", "fixture_recording", "--"])
                .arg(&rec)
                .arg(rounds.to_string()),
        )?;
        let out = Command::new(crate::tools::path_of("valgrind").map_err(|e| anyhow!(e))?)
            .arg("--tool=callgrind")
            .arg(format!("--callgrind-out-file={}", dir.join("callgrind.out").display()))
            .arg(lotrace)
            .args(["replay"])
            .arg(&rec)
            .args(["--format", "json"])
            .stdout(Stdio::null())
            .output()
            .context("valgrind")?;
        let err = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!("callgrind of lotrace replay failed: {err}");
        }
        callgrind_counts(&err).ok_or_else(|| anyhow!("no instruction or packet count in: {err}"))
    };
    let (empty, _) = count(0)?;
    let (full, packets) = count(rounds)?;
    if packets == 0 {
        bail!("the fixture recording reconstructed to no packets");
    }
    Ok((full.saturating_sub(empty) as f64 / packets as f64, packets))
}

/// (instructions, packets) from callgrind's stderr around `lotrace replay`'s: the "Collected :"
/// line and the JSON summary's `packets`.
fn callgrind_counts(err: &str) -> Option<(u64, u64)> {
    let ir = err
        .lines()
        .find_map(|l| l.split("Collected :").nth(1))
        .and_then(|n| n.trim().parse().ok())?;
    let packets = err
        .lines()
        .filter(|l| l.starts_with("{\"summary\""))
        .find_map(|l| l.split("\"packets\":").nth(1))
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())?;
    Some((ir, packets))
}

/// Builds lotrace with the empty-hook floor object (loopback-ebpf's `floor` feature) in a target
/// directory of its own, so that no other build ever embeds it.
fn floor_lotrace(root: &Path) -> Result<std::path::PathBuf> {
    let dir = root.join("target/bench/floor");
    run_ok(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(root)
            .args(["build", "-q", "--release", "-p", "loopback-user", "--bin", "lotrace"])
            .env("LOTRACE_EBPF_FLOOR", "1")
            .env("CARGO_TARGET_DIR", &dir),
    )
    .context("building the empty-hook floor lotrace")?;
    Ok(dir.join("release/lotrace"))
}

/// target/release/lotrace copied to target/bench/lotrace (see [`bench`]).
fn own_copy(root: &Path) -> Result<std::path::PathBuf> {
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let copy = dir.join("lotrace");
    std::fs::copy(root.join("target/release/lotrace"), &copy).context("copying target/release/lotrace aside")?;
    Ok(copy)
}

/// The floor measures the same hooks doing nothing: it must attach what lotrace attaches and
/// emit no event.
fn floor_is_comparable(runs: &BTreeMap<(Workload, Mode), Vec<LotraceRun>>, w: Workload) -> Result<()> {
    let (Some(lo), Some(fl)) = (
        runs.get(&(w, Mode::Lotrace)).and_then(|r| r.last()),
        runs.get(&(w, Mode::Floor)).and_then(|r| r.last()),
    ) else {
        return Ok(());
    };
    if lo.hooks != fl.hooks || fl.emitted != 0 {
        bail!(
            "the empty-hook floor is not comparable: lotrace attached {} hooks, the floor {} (and emitted {} events)",
            lo.hooks,
            fl.hooks,
            fl.emitted
        );
    }
    Ok(())
}

pub fn bench(root: &Path, reps: usize, secs: u32, workloads: &[Workload]) -> Result<()> {
    ensure_tools("bench", Need::Test)?;
    ensure_tools("bench", Need::Bench)?;
    // The release build `cargo xtask bench` just made, copied aside before anything else builds:
    // the criterion benches and the fixture recording build the crate with its `test-support`
    // feature, and cargo puts that build's binary at target/release/lotrace too (the bench used to
    // measure that build: a different binary, 1.4% more instructions per packet).
    let lotrace = own_copy(root)?;
    eprintln!("xtask bench: building the empty-hook floor (every program returns at once)...");
    let floor = floor_lotrace(root)?;
    let bins = Binaries {
        lotrace: &lotrace,
        floor: &floor,
    };
    eprintln!("xtask bench: offline reconstruction (criterion)...");
    let user = criterion(root)?;
    eprintln!("xtask bench: user-space instructions per packet (callgrind)...");
    let (ipp, ipp_packets) = instructions_per_packet(root, &lotrace, 2_000)?;
    let ns = Netns::new()?;
    let modes = [
        Mode::Untraced,
        Mode::Lotrace,
        Mode::Floor,
        Mode::LotraceCost,
        Mode::Bpftrace,
        Mode::Agent,
    ];
    let mut results: BTreeMap<(Workload, Mode), Vec<f64>> = BTreeMap::new();
    let mut runs: BTreeMap<(Workload, Mode), Vec<LotraceRun>> = BTreeMap::new();
    let mut agent_runs: BTreeMap<Workload, Vec<AgentRun>> = BTreeMap::new();
    for rep in 0..reps {
        for &w in workloads {
            for m in modes {
                eprint!("xtask bench: rep {}/{reps} {w:?} {m:?}... ", rep + 1);
                let tracer = start(m, &bins, &ns)?;
                let v = workload(w, &ns, secs);
                let lr = stop(tracer)?;
                let v = v?;
                eprintln!("{v:.3}");
                results.entry((w, m)).or_default().push(v);
                match lr {
                    Report::Lotrace(lr) => runs.entry((w, m)).or_default().push(lr),
                    Report::Agent(ar) => agent_runs.entry(w).or_default().push(ar),
                    Report::None => {}
                }
                floor_is_comparable(&runs, w)?;
            }
        }
    }
    let machine = format!(
        "{} CPUs, kernel {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let mut t = String::new();
    t += &format!(
        "Medians of {reps} interleaved runs of {secs} s each; ratio = the median of each repetition's traced / untraced ({machine}).\n\n"
    );
    t += "| workload | untraced | lotrace | ratio | empty hooks | ratio | lotrace - floor | target | lotrace --kernel-cost | ratio | bpftrace (count 15 tp) | ratio | lotrace ahead of bpftrace | agent | ratio | agent's slowdown / trace's | agent ahead of bpftrace |\n";
    t += "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for &w in workloads {
        let runs_of = |mode| results.get(&(w, mode)).map(|v| v.as_slice()).unwrap_or(&[]);
        let m = |mode| median(runs_of(mode));
        // Each ratio is the median of the repetitions' own ratios (a run against the untraced
        // run of the same repetition): the machine's speed drifts between repetitions, and
        // this VM's did by 1.5x within one bench.
        let per_rep = |f: &dyn Fn(usize) -> f64| median(&(0..runs_of(Mode::Untraced).len()).map(f).collect::<Vec<_>>());
        let at = |mode, i: usize| runs_of(mode).get(i).copied().unwrap_or(f64::NAN);
        let ratio = |mode| per_rep(&|i| at(mode, i) / at(Mode::Untraced, i));
        let above_floor = per_rep(&|i| (at(Mode::Lotrace, i) - at(Mode::Floor, i)) / at(Mode::Untraced, i));
        let (base, lo, fl, lc, bt) = (
            m(Mode::Untraced),
            m(Mode::Lotrace),
            m(Mode::Floor),
            m(Mode::LotraceCost),
            m(Mode::Bpftrace),
        );
        let fmt = |v: f64| {
            if v >= 1000.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            }
        };
        t += &format!(
            "| {} | {} | {} | {:.2}x | {} | {:.2}x | {:+.2}x | {} | {} | {:.2}x | {} | {:.2}x | in {} repetitions | {} | {:.2}x | {:.2} | in {} repetitions |\n",
            w.name(),
            fmt(base),
            fmt(lo),
            ratio(Mode::Lotrace),
            fmt(fl),
            ratio(Mode::Floor),
            above_floor,
            w.target(),
            fmt(lc),
            ratio(Mode::LotraceCost),
            fmt(bt),
            ratio(Mode::Bpftrace),
            ahead_in(runs_of(Mode::Lotrace), runs_of(Mode::Bpftrace), w.is_latency()),
            fmt(m(Mode::Agent)),
            ratio(Mode::Agent),
            slowdown_share(ratio(Mode::Agent), ratio(Mode::Lotrace)),
            ahead_in(runs_of(Mode::Agent), runs_of(Mode::Bpftrace), w.is_latency())
        );
    }
    t += "\nempty hooks: the same lotrace and hooks, every program returning at once (the floor, built by the bench alone); \
          lotrace - floor: the difference of their ratios, what lotrace's programs and user space add to the hooks; \
          lotrace ahead of bpftrace: the repetitions in which lotrace's run did better than bpftrace's (same repetition, same workload).\n";
    t += "agent: `lotrace agent` (every namespace, counted in the kernel); agent's slowdown / trace's: how much of trace's cost above untraced the agent has (a slowdown is |ratio - 1|; goal on UDP ping-pong <= 0.5).\n";
    t += "\n| lotrace agent, per workload | user-space CPU (share of a core) | peak RSS |\n|---|---|---|\n";
    for &w in workloads {
        let rs = agent_runs.get(&w).cloned().unwrap_or_default();
        let cpu = median(&rs.iter().map(|r| r.cpu_share).collect::<Vec<_>>());
        let rss = rs.iter().map(|r| r.peak_rss_kib).max().unwrap_or(0);
        t += &format!(
            "| {} | {:.2}% | {:.1} MiB |\n",
            w.name(),
            cpu * 100.0,
            rss as f64 / 1024.0
        );
    }
    t += "\n| lotrace, per workload (both modes) | packets | complete | lost events | expired | kernel time per packet (--kernel-cost) | peak RSS | start to attached |\n";
    t += "|---|---|---|---|---|---|---|---|\n";
    for &w in workloads {
        let mut rs = runs.get(&(w, Mode::Lotrace)).cloned().unwrap_or_default();
        let costed = runs.get(&(w, Mode::LotraceCost)).cloned().unwrap_or_default();
        let kns = median(&costed.iter().map(|r| r.kernel_ns_per_packet).collect::<Vec<_>>());
        rs.extend(costed);
        let packets: u64 = rs.iter().map(|r| r.packets).sum();
        let lost: u64 = rs.iter().map(|r| r.lost).sum();
        let expired: u64 = rs.iter().map(|r| r.expired).sum();
        let complete = median(&rs.iter().map(|r| r.complete_pct).collect::<Vec<_>>());
        let rss = rs.iter().map(|r| r.peak_rss_kib).max().unwrap_or(0);
        let attach = median(&rs.iter().map(|r| r.attach_ms).collect::<Vec<_>>());
        t += &format!(
            "| {} | {packets} | {complete:.1}% | {lost} | {expired} | {kns:.0} ns | {:.1} MiB | {attach:.0} ms |\n",
            w.name(),
            rss as f64 / 1024.0
        );
    }
    t += &format!(
        "\nOffline reconstruction (decode + path reconstruction, one core, criterion, records laid end to end as in the ring and a recording): {:.2} M events/s (target >= 15); {:.2} M events/s with each record in an allocation of its own.\n",
        user.recon_events / 1e6,
        user.recon_scattered / 1e6
    );
    t += &format!(
        "User space per packet of `trace --format json` (decode + reconstruction + JSON line, criterion, fixture session): {:.2} µs.\n",
        1e6 / user.json_packets
    );
    t += &format!(
        "User space per packet of `lotrace replay --format json` (decode + reconstruction + JSON line, callgrind, fixture recording of {ipp_packets} packets, start-up subtracted): {ipp:.0} instructions (target <= 5,000).\n"
    );
    eprintln!("xtask bench: the agent with 100 idle namespaces...");
    t += &agent_scale(&lotrace)?;
    println!("\n{t}");
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("latest.md"), &t)?;
    eprintln!("xtask bench: table written to target/bench/latest.md");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{ahead_in, callgrind_counts, interrupt, throughput};

    #[test]
    fn lotrace_is_ahead_where_its_latency_is_lower_or_its_rate_higher_in_the_same_repetition() {
        assert_eq!(ahead_in(&[1.0, 3.0, 2.0], &[2.0, 2.0, 2.0], true), "1/3");
        assert_eq!(ahead_in(&[1.0, 3.0, 2.0], &[2.0, 2.0, 2.0], false), "1/3");
        // Only repetitions where both ran count.
        assert_eq!(ahead_in(&[5.0, 1.0], &[4.0, 2.0, 9.0], false), "1/2");
        assert_eq!(ahead_in(&[], &[1.0], true), "0/0");
    }

    #[test]
    fn a_tracer_that_misses_sigint_gets_it_again_and_one_that_ignores_it_is_killed() {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        // A shell that sets its SIGINT trap, says so, then loops; returned once it has said so.
        let ready = |trap: &str| {
            let mut c = crate::signals::defaults(&mut Command::new("sh"))
                .args(["-c", &format!("{trap}; echo ready; while :; do sleep 0.05; done")])
                .stdout(Stdio::piped())
                .spawn()
                .expect("sh");
            let mut line = String::new();
            std::io::BufReader::new(c.stdout.take().expect("stdout"))
                .read_line(&mut line)
                .expect("read");
            assert_eq!(line, "ready\n");
            c
        };
        // Survives the first SIGINT (its trap only restores the default), stops at the second.
        let mut once = ready("trap 'trap - INT' INT");
        let st = interrupt(&mut once, "once").expect("stopped by the second SIGINT");
        assert!(!st.success());
        let mut deaf = ready("trap '' INT");
        let err = interrupt(&mut deaf, "deaf").expect_err("killed");
        assert_eq!(err.to_string(), "deaf did not stop within 10 s of SIGINT (killed)");
        assert!(deaf.try_wait().expect("reaped").is_some());
    }

    #[test]
    fn attached_hooks_are_read_from_the_start_line() {
        let l = "lotrace: tracing network namespace x (inode 4026532177): 17/23 hooks attached; NOT attached: a";
        assert_eq!(super::hooks_attached(l).as_deref(), Some("17/23"));
        assert_eq!(
            super::hooks_attached("lotrace: 23/23 hooks attached").as_deref(),
            Some("23/23")
        );
        assert_eq!(super::hooks_attached("lotrace: error: no hooks attached"), None);
    }

    #[test]
    fn callgrind_and_summary_counts_are_read() {
        let err = "==2768== Callgrind, a call-graph generating cache profiler\n\
                   lotrace: replaying x: recorded by lotrace 0.1.0\n\
                   {\"summary\":{\"bpf_programs\":[],\"packets\":5333,\"printed\":5333}}\n\
                   ==2768== Collected : 148057674\n==2768== I   refs:      148,057,674\n";
        assert_eq!(callgrind_counts(err), Some((148_057_674, 5_333)));
        assert_eq!(callgrind_counts("==1== Collected : 5\n"), None);
    }

    /// Criterion's own layout: a bench's name, its time, its throughput, then a "change" block
    /// that repeats `thrpt:` with percentages; short names share the line with `time:`.
    const OUT: &str = "\
reconstruct/lo_session_events_scattered
                        time:   [17.485 ms 18.714 ms 20.193 ms]
                        thrpt:  [10.300 Melem/s 11.114 Melem/s 11.895 Melem/s]
reconstruct/lo_session_events
                        time:   [34.893 ms 34.950 ms 35.019 ms]
                        thrpt:  [5.9395 Melem/s 5.9513 Melem/s 5.9611 Melem/s]
                 change:
                        time:   [-8.2387% -1.8303% +3.8629%] (p = 0.62 > 0.05)
                        thrpt:  [-3.7192% +1.8645% +8.9784%]
reconstruct/decode_only time:   [12.698 ms 12.764 ms 12.819 ms]
                        thrpt:  [16.226 Melem/s 16.296 Melem/s 16.380 Melem/s]
json/lo_session_packets time:   [62.858 ms 63.053 ms 63.240 ms]
                        thrpt:  [337.33 Kelem/s 338.34 Kelem/s 339.38 Kelem/s]
";

    fn close(got: Option<f64>, want: f64) -> bool {
        got.is_some_and(|g| (g - want).abs() < want * 1e-9)
    }

    #[test]
    fn criterion_estimates_are_read_per_bench() {
        // A name is matched whole: not at a longer name it begins.
        assert!(close(throughput(OUT, "reconstruct/lo_session_events"), 5.9513e6));
        assert!(close(
            throughput(OUT, "reconstruct/lo_session_events_scattered"),
            11.114e6
        ));
        assert!(close(throughput(OUT, "reconstruct/decode_only"), 16.296e6));
        assert!(close(throughput(OUT, "json/lo_session_packets"), 338.34e3));
        assert_eq!(throughput(OUT, "json/missing"), None);
        assert_eq!(
            throughput("json/x time: [1 ms]\n thrpt: [-1% +2% +3%]\n", "json/x"),
            None
        );
    }
}
