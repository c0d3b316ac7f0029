//! `lotrace prove`: the built-in sandbox, a remote address, bad targets and interrupts.
use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use loopback_user::netns::Sandbox;

use serde_json::Value;

use crate::support::*;

#[test]
fn prove_default_sandbox_proves_every_target_and_removes_it() {
    if !privileged() {
        return;
    }
    let child = Command::new(BIN)
        .args(["prove", "--format", "json", "--count", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let out = child.wait_with_output().expect("wait");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stderr}\n{stdout}");
    let rs = json_lines(&stdout);
    let find = |scenario: &str, addr: &str| -> &Value {
        rs.iter()
            .find(|r| r["scenario"] == scenario && r["address"] == addr)
            .unwrap_or_else(|| panic!("no {addr} in {scenario}: {stdout}"))
    };
    // Every target of the default plan, each as expected.
    for (scenario, addr) in [
        ("up", "127.0.0.1"),
        ("up", "127.1.2.3"),
        ("up", "::1"),
        ("up", "192.0.2.1"),
        ("up", "2001:db8::1"),
        ("up", "0.0.0.0"),
        ("no-carrier", "127.0.0.1"),
        ("no-carrier", "192.0.2.1"),
        ("no-carrier", "2001:db8::1"),
        ("admin-down", "192.0.2.1"),
    ] {
        let r = find(scenario, addr);
        assert_eq!(r["verdict"], "PROVEN", "{r}");
        assert_eq!(r["tx_devs"], serde_json::json!(["lo"]), "{r}");
        assert_eq!(r["rx_devs"], serde_json::json!(["lo"]), "{r}");
        assert_eq!(r["replies"], 2, "{r}");
        assert_eq!(r["traced"]["requests"], 2, "{r}");
        assert_eq!(r["traced"]["replies"], 2, "{r}");
        assert!(r["rtt_ns"].as_u64().is_some_and(|n| n > 0), "{r}");
        assert!(r["softirq"]["cpu"].is_u64(), "{r}");
        let st: Vec<&str> = r["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["stage"].as_str().unwrap())
            .collect();
        for must in ["dev_queue", "xmit", "backlog_enqueue", "receive"] {
            assert!(st.contains(&must), "{addr}: {st:?}");
        }
    }
    // The interface's own address: the route names the interface, the packets use lo.
    let own = find("up", "192.0.2.1");
    assert_eq!(own["route"]["dev"], "lt0", "{own}");
    assert_eq!(own["route"]["type"], "local", "{own}");
    assert_eq!(find("up", "::1")["route"]["table"], 255);
    // 0.0.0.0 goes to lo without a FIB lookup; the header says 127.0.0.1.
    let zero = find("up", "0.0.0.0");
    assert!(zero["route"]["table"].is_null(), "{zero}");
    assert!(zero["evidence"][1].as_str().unwrap().contains("127.0.0.1"), "{zero}");
    // localhost resolved through the system resolver, and says from where.
    let lh: Vec<&Value> = rs.iter().filter(|r| r["target"] == "localhost").collect();
    assert!(!lh.is_empty(), "{stdout}");
    assert!(
        lh.iter()
            .all(|r| r["verdict"] == "PROVEN" && r["source"].as_str().unwrap() != "")
    );
    // Admin down: IPv6 loses the address (unreachable, as expected), IPv4 keeps answering.
    let v6 = find("admin-down", "2001:db8::1");
    assert_eq!(v6["verdict"], "UNREACHABLE", "{v6}");
    assert_eq!(v6["expected"], "UNREACHABLE", "{v6}");
    assert_eq!(v6["sent"], 0, "{v6}");
    assert!(v6["route"]["error"].is_string(), "{v6}");
    assert!(rs.iter().all(|r| r["ok"] == true), "{stdout}");
    assert!(prove_sandboxes_of(pid).is_empty(), "sandbox left behind");
    assert!(our_programs_loaded().is_empty(), "programs left behind");
}

#[test]
fn prove_a_remote_address_is_disproven_naming_the_device() {
    if !privileged() {
        return;
    }
    let a = Sandbox::new("lt-pra").expect("sandbox a");
    let b = Sandbox::new("lt-prb").expect("sandbox b");
    a.link_to("lra", &["198.51.100.1/24"], &b, "lrb", &["198.51.100.2/24"])
        .expect("veth between namespaces");
    let (code, out, err) = run_bin(&[
        "prove",
        "--netns",
        &a.name,
        "--target",
        "198.51.100.2",
        "--count",
        "2",
        "--format",
        "json",
    ]);
    assert_eq!(code, 1, "{err}\n{out}");
    let rs = json_lines(&out);
    assert_eq!(rs.len(), 1, "{out}");
    let r = &rs[0];
    assert_eq!(r["verdict"], "DISPROVEN", "{r}");
    assert_eq!(r["tx_devs"], serde_json::json!(["lra"]), "{r}");
    assert_eq!(r["route"]["dev"], "lra", "{r}");
    assert!(r["evidence"][0].as_str().unwrap().contains("lra"), "{r}");
    // The same in text, and the local addresses of that namespace are still proven.
    let (code, out, err) = run_bin(&["prove", "--netns", &a.name, "--target", "198.51.100.2", "--count", "1"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        out.contains("DISPROVEN") && out.contains("left the host through lra"),
        "{out}"
    );
    let (code, out, err) = run_bin(&[
        "prove", "--netns", &a.name, "--host", "--count", "1", "--format", "json",
    ]);
    assert_eq!(code, 0, "{err}\n{out}");
    let addrs: Vec<String> = json_lines(&out)
        .iter()
        .map(|r| r["address"].as_str().unwrap().to_string())
        .collect();
    for want in ["127.0.0.1", "::1", "198.51.100.1"] {
        assert!(addrs.iter().any(|a| a == want), "{want} missing from --host: {addrs:?}");
    }
    assert!(our_programs_loaded().is_empty(), "programs left behind");
}

#[test]
fn prove_bad_targets_and_interrupts() {
    if !privileged() {
        return;
    }
    let sb = Sandbox::new("lt-prbad").expect("sandbox");
    // Resolution happens inside the namespace: no lookup can leave this machine.
    for (target, says) in [
        ("300.1.2.3", "malformed address"),
        ("1.2.3", "malformed address"),
        ("no-such-host.invalid", "cannot resolve"),
        ("bad name!", "malformed target"),
        ("fe80::1", "needs its interface"),
    ] {
        let (code, _, err) = run_bin(&["prove", "--netns", &sb.name, "--target", target]);
        assert_eq!((code, err.lines().count()), (2, 1), "{target}: {err}");
        assert!(err.contains(says), "{target}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let (code, err) = run_as_nobody(&["prove"]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("sudo"), "{err}");
    // Ctrl-C and SIGTERM in the middle of a long run: exit 130, sandbox and programs gone.
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let mut child = Command::new(BIN)
            .args(["prove", "--count", "1000", "--format", "json"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let pid = child.id();
        let mut err = BufReader::new(child.stderr.take().expect("stderr"));
        let mut line = String::new();
        err.read_line(&mut line).expect("read");
        assert!(line.contains("sandbox network namespace"), "{line}");
        assert_eq!(prove_sandboxes_of(pid).len(), 1, "sandbox exists while running");
        signal(pid, sig);
        let status = child.wait().expect("wait");
        let rest = read_all(err).recv_timeout(Duration::from_secs(10)).unwrap_or_default();
        assert_eq!(status.code(), Some(130), "signal {sig}: {rest}");
        assert!(rest.contains("interrupted"), "{rest}");
        assert!(prove_sandboxes_of(pid).is_empty(), "sandbox left after signal {sig}");
    }
    // kill -9 cannot be caught: the next run removes the orphaned sandbox.
    let mut child = Command::new(BIN)
        .args(["prove", "--count", "1000"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let mut err = BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    err.read_line(&mut line).expect("read");
    signal(pid, libc::SIGKILL);
    child.wait().expect("wait");
    assert_eq!(prove_sandboxes_of(pid).len(), 1, "a killed run leaves its sandbox");
    let (code, _, err) = run_bin(&["prove", "--count", "1", "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("removed sandbox"), "{err}");
    assert!(prove_sandboxes_of(pid).is_empty(), "orphaned sandbox not removed");
    assert!(our_programs_loaded().is_empty(), "programs left behind after kill -9");
}

pub(crate) fn json_lines(out: &str) -> Vec<Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}
