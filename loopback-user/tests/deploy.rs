//! deploy/: the Kubernetes manifests validate against the Kubernetes schemas (PyPI's
//! kubernetes-validate, installed by `cargo xtask test` into target/pytools), agree with each
//! other and with lotrace's own command line; the Prometheus rules pass `promtool check rules`;
//! the image recipe runs a command lotrace accepts. (The dashboard's queries are run against a
//! real Prometheus scraping the agent in tests/privileged/containers.rs.)
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use clap::Parser as _;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// target/pytools, or None (skipped, saying why) outside CI when `cargo xtask test` has not
/// installed it; under CI=true its absence fails.
fn pytools() -> Option<PathBuf> {
    let d = repo().join("target/pytools");
    if d.join("kubernetes_validate").is_dir() {
        return Some(d);
    }
    let why = "target/pytools has no kubernetes-validate: `cargo xtask test` installs it";
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{why}");
    }
    eprintln!("skipped: {why}");
    None
}

/// Every document of a YAML file, as JSON (PyYAML from target/pytools).
fn yaml_docs(py: &Path, file: &Path) -> Vec<Value> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json,sys,yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
        ])
        .arg(file)
        .env("PYTHONPATH", py)
        .output()
        .expect("python3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn manifests() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy/kubernetes"))
        .expect("deploy/kubernetes")
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    v.sort();
    v
}

#[test]
fn every_manifest_validates_against_the_kubernetes_schemas() {
    let Some(py) = pytools() else { return };
    let files = manifests();
    assert!(files.len() >= 2, "{files:?}");
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .args(&files)
        .env("PYTHONPATH", &py)
        .output()
        .expect("kubernetes-validate");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    for kind in ["namespace", "serviceaccount", "daemonset", "service"] {
        assert!(
            text.contains(&format!("passed for resource {kind}/")),
            "{kind} not validated: {text}"
        );
    }
    // The one kind it has no schema for is the Prometheus Operator's (a CRD): checked below.
    let unchecked: Vec<&str> = text.lines().filter(|l| l.contains("Couldn't find schema")).collect();
    assert!(
        unchecked.iter().all(|l| l.contains("kind ServiceMonitor")),
        "{unchecked:?}"
    );
}

#[test]
fn the_manifests_agree_with_each_other_and_with_lotraces_command_line() {
    let Some(py) = pytools() else { return };
    let docs: Vec<Value> = manifests().iter().flat_map(|f| yaml_docs(&py, f)).collect();
    let of = |kind: &str| -> &Value {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} in deploy/kubernetes"))
    };
    let (ns, sa, ds, svc, sm) = (
        of("Namespace"),
        of("ServiceAccount"),
        of("DaemonSet"),
        of("Service"),
        of("ServiceMonitor"),
    );
    let name = ns["metadata"]["name"].as_str().expect("namespace name");
    for d in [sa, ds, svc, sm] {
        assert_eq!(d["metadata"]["namespace"], name, "{} in another namespace", d["kind"]);
    }
    let pod = &ds["spec"]["template"];
    let spec = &pod["spec"];
    assert_eq!(spec["serviceAccountName"], sa["metadata"]["name"]);
    assert_eq!(
        spec["hostPID"], true,
        "the agent finds namespaces through the node's /proc"
    );
    assert_eq!(spec["automountServiceAccountToken"], false, "no API server access");
    // Selectors: the DaemonSet's pods carry its selector's labels, the Service selects them,
    // the ServiceMonitor selects the Service.
    let has_all = |labels: &Value, sel: &Value| {
        sel.as_object()
            .expect("selector")
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    };
    assert!(has_all(
        &pod["metadata"]["labels"],
        &ds["spec"]["selector"]["matchLabels"]
    ));
    assert!(has_all(&pod["metadata"]["labels"], &svc["spec"]["selector"]));
    assert!(has_all(
        &svc["metadata"]["labels"],
        &sm["spec"]["selector"]["matchLabels"]
    ));
    // One port everywhere: the agent's --listen, the container port, the scrape annotations,
    // the Service's and the ServiceMonitor's.
    let c = &spec["containers"][0];
    let args: Vec<String> = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("arg").to_string())
        .collect();
    let listen = args
        .iter()
        .find_map(|a| a.strip_prefix("--listen="))
        .expect("--listen in the DaemonSet's args");
    let port: u64 = listen.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
    assert_eq!(c["ports"][0]["containerPort"], port);
    assert_eq!(pod["metadata"]["annotations"]["prometheus.io/port"], port.to_string());
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], c["ports"][0]["name"]);
    assert_eq!(sm["spec"]["endpoints"][0]["port"], svc["spec"]["ports"][0]["name"]);
    // lotrace accepts the DaemonSet's arguments.
    let argv = std::iter::once("lotrace".to_string()).chain(args.iter().cloned());
    if let Err(e) = loopback_user::cli::Cli::try_parse_from(argv) {
        panic!("the DaemonSet's args are not lotrace's: {e}");
    }
    // Every socket the agent is told to use is mounted.
    let mounts: Vec<&str> = c["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .map(|m| m["mountPath"].as_str().expect("mountPath"))
        .collect();
    for a in &args {
        if let Some(sock) = a.strip_prefix("--cri-socket=") {
            assert!(mounts.contains(&sock), "{sock} is not mounted: {mounts:?}");
        }
    }
    // The least capabilities, nothing else, and requests within limits.
    let sc = &c["securityContext"];
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let add: Vec<&str> = sc["capabilities"]["add"]
        .as_array()
        .expect("add")
        .iter()
        .map(|v| v.as_str().expect("cap"))
        .collect();
    assert_eq!(add, ["BPF", "PERFMON", "SYS_PTRACE"], "the tested least set");
    assert!(sc.get("privileged").is_none_or(|p| p == false));
    let r = &c["resources"];
    for k in ["cpu", "memory"] {
        assert!(r["requests"][k].is_string() && r["limits"][k].is_string(), "{k}: {r}");
    }
}

#[test]
fn the_image_recipe_builds_with_xtask_and_runs_a_command_lotrace_accepts() {
    let text = std::fs::read_to_string(repo().join("deploy/Containerfile")).expect("Containerfile");
    assert!(text.contains("cargo xtask build"), "built the project's way");
    let cmd = text
        .lines()
        .find_map(|l| l.strip_prefix("CMD "))
        .expect("CMD in the Containerfile");
    let args: Vec<String> = serde_json::from_str(cmd).expect("CMD in exec form");
    let argv = std::iter::once("lotrace".to_string()).chain(args);
    if let Err(e) = loopback_user::cli::Cli::try_parse_from(argv) {
        panic!("the image's CMD is not lotrace's: {e}");
    }
    // The build context leaves the build output out (gigabytes, and stale).
    let ignore = std::fs::read_to_string(repo().join(".containerignore")).expect(".containerignore");
    assert!(
        ignore.lines().any(|l| l == "target"),
        "the build context leaves target/ out"
    );
}

#[test]
fn the_prometheus_rules_pass_promtool() {
    let promtool = ["/usr/bin/promtool", "/usr/local/bin/promtool"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let Some(promtool) = promtool else {
        let why = "promtool (Debian package prometheus) is missing: `cargo xtask test` installs it";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{why}");
        }
        eprintln!("skipped: {why}");
        return;
    };
    let out = Command::new(promtool)
        .args(["check", "rules"])
        .arg(repo().join("deploy/prometheus/lotrace-rules.yaml"))
        .output()
        .expect("promtool");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("SUCCESS"), "{text}");
}

#[test]
fn the_dashboard_is_grafana_json_whose_every_panel_has_a_query() {
    let text = std::fs::read_to_string(repo().join("deploy/grafana/lotrace.json")).expect("dashboard");
    let d: Value = serde_json::from_str(&text).expect("JSON");
    assert!(d["title"].is_string() && d["uid"].is_string());
    let panels = d["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8);
    for p in panels {
        let t = p["targets"].as_array().expect("targets");
        assert!(!t.is_empty(), "{}", p["title"]);
        for q in t {
            let e = q["expr"].as_str().expect("expr");
            assert!(e.contains("lotrace_"), "{e}");
        }
    }
}
