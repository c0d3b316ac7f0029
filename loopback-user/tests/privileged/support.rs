//! What every privileged test shares: the sandbox checks, launching and stopping lotrace,
//! reading its output, and what the kernel has attached.
#![allow(dead_code)]
use std::{
    io::{BufRead, BufReader, Read},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use loopback_user::netns::Sandbox;

use serde_json::Value;

pub(crate) use crate::tools;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_lotrace");

/// Our program names as the kernel lists them (truncated to 15 characters): every candidate
/// of the hook plan, so a hook added to the plan is covered here without another list.
pub(crate) fn our_program_names() -> Vec<String> {
    loopback_user::hooks::PLAN
        .iter()
        .flat_map(|hp| hp.candidates)
        .map(|c| c.program.chars().take(15).collect())
        .collect()
}

pub(crate) fn privileged() -> bool {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but not root: privileged tests must run in CI (use `cargo xtask test` as root)");
    }
    eprintln!("skipped: privileged test needs root (run `sudo cargo xtask test`)");
    false
}

pub(crate) fn our_programs_now() -> Vec<String> {
    let names = our_program_names();
    aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .filter_map(|p| p.name_as_str().map(str::to_string))
        .filter(|n| names.contains(n))
        .collect()
}

/// lotrace's programs still loaded. The kernel frees a program asynchronously (RCU) after its
/// last fd closes, so this waits up to 5 s for them to go before reporting what remains.
pub(crate) fn our_programs_loaded() -> Vec<String> {
    let start = std::time::Instant::now();
    loop {
        let left = our_programs_now();
        if left.is_empty() || start.elapsed() > Duration::from_secs(5) {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) struct Tracer {
    pub(crate) child: Child,
    /// lotrace's first line (what is attached).
    pub(crate) first_line: String,
    pub(crate) stdout_rx: mpsc::Receiver<String>,
    pub(crate) stderr_rx: mpsc::Receiver<String>,
}

/// A test that fails midway still ends the lotrace it started (by its pid, our own child), so
/// one failure does not leave programs attached for the tests after it.
impl Drop for Tracer {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reads `r` to its end on a thread; the text arrives on the returned channel.
pub(crate) fn read_all(mut r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        let _ = tx.send(s);
    });
    rx
}

/// Spawns `lotrace trace --netns SANDBOX ARGS...` (stderr piped) and waits for its first line;
/// asserts it attached. Returns the child, that line and the rest of stderr.
pub(crate) fn launch(
    sb: &Sandbox,
    args: &[&str],
    env: &[(&str, &str)],
    stdout: Stdio,
) -> (Child, String, BufReader<std::process::ChildStderr>) {
    let mut child = Command::new(BIN)
        .args(["trace", "--netns", &sb.name])
        .args(args)
        .envs(env.iter().copied())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lotrace");
    let mut err = BufReader::new(child.stderr.take().expect("stderr"));
    // Lines before the "hooks attached" one say what lotrace cleaned up first; they are kept.
    let mut line = String::new();
    while !line.contains("hooks attached") {
        let before = line.len();
        err.read_line(&mut line).expect("read stderr");
        assert!(line.len() > before, "lotrace did not start: {line}");
    }
    (child, line, err)
}

/// Starts `lotrace trace --format json` on the sandbox and waits until it says it is attached.
pub(crate) fn start(sb: &Sandbox, extra: &[&str]) -> Tracer {
    let args: Vec<&str> = ["--format", "json"].iter().chain(extra).copied().collect();
    let t = start_env(sb, &args, &[]);
    if extra.contains(&"--raw-tp") {
        assert!(t.first_line.contains("as raw_tracepoint"), "{}", t.first_line);
    }
    t
}

/// `lotrace trace ARGS` on the sandbox with environment `env` (fault switches), once attached;
/// both pipes are drained in the background (the summary is stderr's last JSON line).
pub(crate) fn start_env(sb: &Sandbox, args: &[&str], env: &[(&str, &str)]) -> Tracer {
    let (mut child, line, err) = launch(sb, args, env, Stdio::piped());
    Tracer {
        stdout_rx: read_all(child.stdout.take().expect("stdout")),
        stderr_rx: read_all(err),
        first_line: line,
        child,
    }
}

/// Sends signal `sig` to process `pid`, one this test started and has not yet waited for.
pub(crate) fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) touches no memory of ours; the pid is our own unreaped child's, so it
    // cannot name another process.
    unsafe { libc::kill(pid as i32, sig) };
}

/// Sends SIGINT, waits for exit, returns (packets, summary). No waiting beforehand: the traffic
/// helpers return only once their exchange is over (on lo the receive side runs inline in the
/// sender's system call, and TCP waits for its close handshake), so every event of theirs is in
/// the ring buffer already, and lotrace drains the ring and prints what is in flight on SIGINT.
pub(crate) fn stop(mut t: Tracer) -> (Vec<Value>, Value) {
    signal(t.child.id(), libc::SIGINT);
    let status = t.child.wait().expect("wait");
    let out = t.stdout_rx.recv_timeout(Duration::from_secs(10)).expect("stdout");
    let err = t.stderr_rx.recv_timeout(Duration::from_secs(10)).expect("stderr");
    assert!(status.success(), "lotrace failed: {status}: {err}");
    let packets: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    (packets, summary_of(&err))
}

/// Records of crossings seen by lo's tc programs only (the kernel ran no tracing program for
/// them: `tc_only.ingress` and `tc_only.both` of summary `s`, the `summary` object).
pub(crate) fn tc_only_records(s: &Value) -> u64 {
    ["ingress", "both"]
        .iter()
        .map(|k| s["tc_only"][k].as_u64().expect("tc_only"))
        .sum()
}

/// The JSON summary in lotrace's stderr: its last JSON line (a note such as "pcapng: N
/// packet(s) written" may follow it). Every summary any test reads is checked here for what
/// lotrace promises of every run: no event the kernel submitted goes unaccounted. The kernel
/// counts what it submitted (`events_emitted`) and, apart, what it could not
/// (`lost_events`: the ring was full); the reader counts what it read (`events_received`).
/// The programs are silenced and the ring drained before the counters are read, so every
/// event the programs tried to send is either received or counted lost:
/// `events_emitted + lost_events == events_received + lost_events`, i.e. emitted == received.
pub(crate) fn summary_of(err: &str) -> Value {
    let v: Value = serde_json::from_str(
        err.lines()
            .rev()
            .find(|l| l.starts_with("{\"summary\""))
            .expect("summary line"),
    )
    .expect("summary JSON");
    let s = &v["summary"];
    let num = |k: &str| s[k].as_u64().unwrap_or_else(|| panic!("{k} in {s}"));
    assert_eq!(
        num("events_emitted"),
        num("events_received"),
        "every submitted event was received (lost apart: {}): {s}",
        num("lost_events")
    );
    v
}

/// Whether hook point `hook` attached, from lotrace's first line ("NOT attached: a, b (why)").
pub(crate) fn hooked(first_line: &str, hook: &str) -> bool {
    let Some((_, missing)) = first_line.split_once("NOT attached: ") else {
        return true;
    };
    !missing
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(|w| w == hook)
}

pub(crate) fn stages(p: &Value) -> Vec<&str> {
    p["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|s| s["stage"].as_str().expect("stage"))
        .collect()
}

/// lo tx packets of the sandbox, from the kernel's own counters.
pub(crate) fn lo_tx_packets(sb: &Sandbox) -> u64 {
    let out = Command::new("ip")
        .args(["-n", &sb.name, "-s", "-j", "link", "show", "dev", "lo"])
        .output()
        .expect("ip");
    let v: Value = serde_json::from_slice(&out.stdout).expect("ip -j");
    v[0]["stats64"]["tx"]["packets"].as_u64().expect("tx packets")
}

pub(crate) fn find_echo(ps: &[Value], ty: u64, id: u16) -> &Value {
    ps.iter()
        .find(|p| p["icmp"]["type"] == ty && p["icmp"]["id"] == id && p["clone_of"].is_null())
        .unwrap_or_else(|| panic!("no ICMP type {ty} id {id} in {ps:#?}"))
}

/// The lo transmit + receive stages every locally delivered packet must show, in order
/// (softirq_raise / softirq_entry appear only when this packet started the softirq run).
pub(crate) const LO_PATH: &[&str] = &[
    "tc_egress",
    "dev_queue",
    "xmit",
    "backlog_enqueue",
    "xmit_done",
    "receive",
    "tc_ingress",
];

pub(crate) fn core_stages(p: &Value) -> Vec<&str> {
    stages(p).into_iter().filter(|s| LO_PATH.contains(s)).collect()
}

pub(crate) fn run_bin(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().expect("run lotrace");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

pub(crate) fn run_as_nobody(args: &[&str]) -> (i32, String) {
    let out = Command::new(tools::require("setpriv"))
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            BIN,
        ])
        .args(args)
        .output()
        .expect("setpriv");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// `lotrace prove` sandboxes of process `pid` that still exist.
pub(crate) fn prove_sandboxes_of(pid: u32) -> Vec<String> {
    let prefix = format!("lotrace-prove-{pid}-");
    loopback_user::netns::list_named()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

/// lotrace's programs on the namespace's lo, by name: tcx links, and classic tc filters (the
/// way lotrace attaches on kernels without tcx).
pub(crate) fn tcx_on_lo(sb: &Sandbox) -> Vec<String> {
    use aya::programs::{SchedClassifier, TcAttachType};
    let mut names = sb
        .netns
        .run(|| {
            let mut names = Vec::new();
            for dir in [TcAttachType::Ingress, TcAttachType::Egress] {
                if let Ok((_, progs)) = SchedClassifier::query_tcx("lo", dir) {
                    names.extend(progs.iter().filter_map(|p| p.name_as_str().map(str::to_string)));
                }
            }
            names
        })
        .expect("netns");
    names.extend(classic_filters(sb).into_iter().filter(|n| n.starts_with("lo_tc_")));
    names
}

/// Classic tc filters on the namespace's lo (both directions), by the name `tc` shows.
pub(crate) fn classic_filters(sb: &Sandbox) -> Vec<String> {
    let mut names = Vec::new();
    for dir in ["ingress", "egress"] {
        for l in tc_in(sb, &["filter", "show", "dev", "lo", dir]).lines() {
            if let Some(i) = l.find(" bpf ") {
                // "filter protocol all pref 49152 bpf chain 0 handle 0x1 NAME direct-action ..."
                let after: Vec<&str> = l[i..].split_whitespace().collect();
                if let Some(pos) = after.iter().position(|w| w.starts_with("0x") || *w == "handle") {
                    let name = after
                        .iter()
                        .skip(pos)
                        .find(|w| !w.starts_with("0x") && **w != "handle" && **w != "[not_in_hw]");
                    names.push(name.map_or_else(|| l.to_string(), |n| n.to_string()));
                }
            }
        }
    }
    names
}

/// `tc ARGS` run in the sandbox; its stdout. A failing `tc` fails the test.
pub(crate) fn tc_in(sb: &Sandbox, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &sb.name, tools::require("tc")])
        .args(args)
        .output()
        .expect("tc");
    assert!(
        out.status.success(),
        "tc {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
