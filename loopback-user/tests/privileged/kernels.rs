//! What this kernel allows and what lotrace does about it: doctor's plan, missing hooks, the
//! kprobe twins where fentry is refused, classic tc where tcx is missing.
use std::{
    net::IpAddr,
    process::{Command, Stdio},
    time::Duration,
};

use loopback_user::{netns::Sandbox, traffic};

use serde_json::Value;

use crate::support::*;

#[test]
fn doctor_tries_every_attach_type_and_detaches() {
    if !privileged() {
        return;
    }
    let (code, out, err) = run_bin(&["doctor", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).expect("doctor JSON");
    let kinds: Vec<&str> = v["attach_types"]
        .as_array()
        .expect("kinds")
        .iter()
        .map(|a| a["kind"].as_str().expect("kind"))
        .collect();
    assert_eq!(
        kinds,
        [
            "fentry",
            "kprobe",
            "tp_btf",
            "raw_tracepoint",
            "tracepoint",
            "xdp_generic",
            "tcx",
            "tc_classic"
        ]
    );
    for a in v["attach_types"].as_array().expect("kinds") {
        assert!(a.get("available").is_some() && a.get("error").is_some());
        assert_eq!(
            a["available"].as_bool() == Some(false),
            a["error"].is_string(),
            "a failure says why: {a}"
        );
    }
    let avail = |k: &str| {
        v["attach_types"]
            .as_array()
            .expect("kinds")
            .iter()
            .any(|a| a["kind"] == k && a["available"] == true)
    };
    assert!(
        avail("tp_btf") && (avail("tcx") || avail("tc_classic")) && avail("xdp_generic"),
        "{v}"
    );
    // Each refusal is one line (a verifier log is cut to its reason; --verbose has it whole).
    for a in v["attach_types"].as_array().expect("kinds") {
        assert!(!a["error"].as_str().unwrap_or("").contains('\n'), "{a}");
        assert!(a.get("log").is_none(), "no log without --verbose: {a}");
    }
    assert_eq!(v["can_trace"], true);
    // The plan is the one `trace` attaches (same code, in a throwaway namespace): every hook
    // served by the first candidate the kernel accepted, and why earlier ones were refused.
    let plan = v["plan"].as_array().expect("plan");
    for r in plan {
        assert!(r["available"] == true || r["required"] == false, "{r}");
        if r["available"] == false {
            assert!(!r["refused"].as_array().expect("refused").is_empty(), "{r}");
        }
    }
    let row = |h: &str| {
        plan.iter()
            .find(|r| r["hook"] == h)
            .unwrap_or_else(|| panic!("no {h} in the plan"))
    };
    let tc = if avail("tcx") { "tcx" } else { "tc (classic)" };
    assert_eq!(row("lo_tc_egress")["attach"], tc, "{v}");
    assert_eq!(row("lo_tc_ingress")["attach"], tc, "{v}");
    // The socket-send stage and the untraced frees: fentry where the kernel allows it, else a
    // kprobe, else not served (as on a kernel with neither).
    for h in ["inet_sendmsg", "inet6_sendmsg", "kfree_skb_fn", "skb_defer_free"] {
        let r = row(h);
        match (avail("fentry"), avail("kprobe")) {
            (true, _) => assert_eq!((&r["attach"], &r["available"]), (&"fentry".into(), &true.into()), "{r}"),
            (false, true) => assert_eq!((&r["attach"], &r["available"]), (&"kprobe".into(), &true.into()), "{r}"),
            (false, false) => assert_eq!(r["available"], false, "{r}"),
        }
    }
    assert!(our_programs_loaded().is_empty(), "doctor left programs behind");
}

#[test]
fn a_missing_hook_degrades_to_partial_tracing_and_a_missing_required_one_is_one_line() {
    if !privileged() {
        return;
    }
    let sb = Sandbox::new("lt-degr").expect("sandbox");
    // An optional hook missing (as on a kernel before 6.7 without sock:sk_data_ready): tracing
    // goes on without that stage, and the first line says what is missing and why.
    let t = start_env(
        &sb,
        &["--format", "json", "--filter", "icmp"],
        &[("LOTRACE_FAULT", "refuse-hook:sk_data_ready")],
    );
    let line = t.first_line.clone();
    // "N/M hooks attached" with N < M, and the missing one named with why (on a kernel without
    // the tracepoint, the kernel's own reason comes first).
    let counts = line
        .split_whitespace()
        .find_map(|w| {
            w.split_once('/')
                .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
        })
        .expect("N/M hooks attached");
    assert!(counts.0 < counts.1, "{line}");
    assert!(
        line.contains("NOT attached: ")
            && (line.contains("sk_data_ready (refused") || line.contains("sk_data_ready (ENOENT")),
        "{line}"
    );
    sb.netns
        .run(|| traffic::icmp_echo("127.0.0.1".parse().expect("ip"), 0, 0x6e6e, 1, Duration::from_secs(2)))
        .expect("netns")
        .expect("echo");
    let (ps, _) = stop(t);
    assert_eq!(core_stages(find_echo(&ps, 8, 0x6e6e)), LO_PATH);
    // A required hook missing: nothing is traced, one line says which and why, exit 1.
    let out = Command::new(BIN)
        .args(["trace", "--netns", &sb.name, "--count", "1"])
        .env("LOTRACE_FAULT", "refuse-hook:net_dev_queue")
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot attach net_dev_queue") && err.contains("refused"),
        "{err}"
    );
    assert!(our_programs_loaded().is_empty());
}

#[test]
fn kprobes_serve_the_function_hooks_where_fentry_is_refused() {
    if !privileged() {
        return;
    }
    let sb = Sandbox::new("lt-kprobe").expect("sandbox");
    let t = start_env(
        &sb,
        &["--format", "json", "--filter", "udp"],
        &[("LOTRACE_FAULT", "no-fentry")],
    );
    let line = t.first_line.clone();
    let lo: IpAddr = "127.0.0.1".parse().expect("ip");
    sb.netns
        .run(|| traffic::udp_exchange(lo, &[5u8; 32]))
        .expect("netns")
        .expect("udp");
    let (ps, _) = stop(t);
    assert!(!ps.is_empty(), "{line}");
    if hooked(&line, "inet_sendmsg") {
        // A kernel with kprobes: the same hooks, through the kprobe twins, the same paths.
        for h in ["inet_sendmsg", "kfree_skb_fn", "consume_stateless"] {
            assert!(line.contains(&format!("{h} as kprobe")), "{h}: {line}");
        }
        for p in &ps {
            assert_eq!(core_stages(p), LO_PATH, "{p}");
            assert_eq!(p["verdict"], "consumed", "{p}");
        }
        // The socket send is linked to the packet its thread transmits within 10 ms. Under
        // software emulation a kprobe hit costs milliseconds, so the first packet of the run
        // can miss that window (seen on 6.12 under TCG); the exchange's other packet has it.
        assert!(ps.iter().any(|p| stages(p).contains(&"sock_send")), "{line}: {ps:?}");
    } else {
        // No kprobes either (this host): the function hooks are absent, each saying why, and
        // the paths are those of the tracepoints alone.
        assert!(line.contains("no-fentry") && line.contains("kprobe"), "{line}");
        assert!(ps.iter().all(|p| !stages(p).contains(&"sock_send")), "{ps:?}");
    }
}

/// Kernels without tcx (before 6.6; simulated here with `LOTRACE_FAULT=no-tcx`): the lo
/// programs go in as classic tc filters with the same promises. They trace the full path; they
/// are removed on exit, with the clsact qdisc lotrace added; someone else's qdisc and filter
/// stay; and after `kill -9` the next run, or doctor, removes what the killed one left.
#[test]
fn without_tcx_lo_programs_are_classic_filters_and_leave_nothing() {
    if !privileged() {
        return;
    }
    let sb = Sandbox::new("lt-ctc").expect("sandbox");
    let no_tcx = [("LOTRACE_FAULT", "no-tcx")];
    let echo = |id: u16| {
        sb.netns
            .run(|| traffic::icmp_echo("127.0.0.1".parse().expect("ip"), 0, id, 1, Duration::from_secs(2)))
            .expect("netns")
            .expect("echo");
    };
    let ours = |sb: &Sandbox| -> Vec<String> {
        let mut v: Vec<String> = classic_filters(sb)
            .into_iter()
            .filter(|n| n.starts_with("lo_tc_"))
            .collect();
        v.sort();
        v
    };
    // 1. lo had no qdisc: lotrace adds clsact and its two filters, and removes all of it.
    assert!(!has_clsact(&sb));
    let (mut child, line, err) = launch(&sb, &["--format", "json", "--filter", "icmp"], &no_tcx, Stdio::piped());
    assert!(line.contains("but CAP_NET_ADMIN and CAP_SYS_ADMIN"), "{line}");
    assert_eq!(ours(&sb), ["lo_tc_egress", "lo_tc_ingress"], "while running");
    assert!(has_clsact(&sb));
    let t = Tracer {
        stdout_rx: read_all(child.stdout.take().expect("stdout")),
        stderr_rx: read_all(err),
        first_line: line,
        child,
    };
    echo(0x7c01);
    let (ps, _) = stop(t);
    assert_eq!(core_stages(find_echo(&ps, 8, 0x7c01)), LO_PATH);
    assert!(ours(&sb).is_empty(), "filters left behind");
    assert!(!has_clsact(&sb), "the clsact lotrace added is removed");
    assert!(our_programs_loaded().is_empty());

    // 2. Someone else's clsact and filter: used and left as they were.
    tc_in(&sb, &["qdisc", "add", "dev", "lo", "clsact"]);
    // A u32 filter that matches nothing (no IP header starts with 0xff): present, harmless.
    tc_in(
        &sb,
        &[
            "filter", "add", "dev", "lo", "egress", "protocol", "all", "prio", "10", "u32", "match", "u8", "0xff",
            "0xff", "at", "0", "flowid", "1:1",
        ],
    );
    let theirs = |sb: &Sandbox| {
        tc_in(sb, &["filter", "show", "dev", "lo", "egress"])
            .matches("flowid 1:1")
            .count()
    };
    assert_eq!(theirs(&sb), 1);
    let (mut child, _, _stderr) = launch(&sb, &["--format", "json"], &no_tcx, Stdio::null());
    assert_eq!(ours(&sb).len(), 2);
    signal(child.id(), libc::SIGINT);
    assert!(child.wait().expect("wait").success());
    assert!(ours(&sb).is_empty());
    assert!(
        has_clsact(&sb) && theirs(&sb) == 1,
        "someone else's qdisc and filter stay"
    );

    // 3. kill -9: the filters outlive the process; the next run removes them and says so.
    let (mut child, _, _stderr) = launch(&sb, &["--format", "json"], &no_tcx, Stdio::null());
    child.kill().expect("kill");
    child.wait().expect("wait");
    assert_eq!(ours(&sb).len(), 2, "a killed run leaves its classic filters");
    let (mut child, line, _) = launch(&sb, &["--format", "json"], &no_tcx, Stdio::null());
    assert!(line.contains("removed 2 classic tc filter(s)"), "{line}");
    assert_eq!(ours(&sb).len(), 2, "only the new run's own");
    signal(child.id(), libc::SIGINT);
    assert!(child.wait().expect("wait").success());
    // ... and doctor does the same.
    let (mut child, _, _stderr) = launch(&sb, &["--format", "json"], &no_tcx, Stdio::null());
    child.kill().expect("kill");
    child.wait().expect("wait");
    let (code, out, err) = run_bin(&["doctor"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("cleaned     removed 2 classic tc filter(s)"), "{out}");
    assert!(ours(&sb).is_empty());
    assert!(
        has_clsact(&sb) && theirs(&sb) == 1,
        "someone else's qdisc and filter stay"
    );
    assert!(our_programs_loaded().is_empty(), "programs left behind");
}

/// Whether the namespace's lo has a clsact qdisc.
pub(crate) fn has_clsact(sb: &Sandbox) -> bool {
    tc_in(sb, &["qdisc", "show", "dev", "lo"]).contains("clsact")
}
