//! Real containers and pods, named by their owner: podman containers (Debian's podman and runc)
//! with a namespace holding only lo and busybox httpd + wget inside, and Kubernetes pod
//! sandboxes made through the CRI API of Debian's containerd (its built-in CRI plugin, CNI
//! plugins from containernetworking-plugins). Images are made here from busybox-static, never
//! pulled; every runtime runs on its own state in a throwaway directory (containerd inside a
//! throwaway network namespace, so what its CNI plugins set up stays there) and is stopped,
//! with everything it started, when the test ends.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use loopback_user::{
    netns::{Netns, Sandbox},
    owner::cri::{self, api},
    traffic,
};
use serde_json::Value;

use crate::{
    agent::{Agent, samples, wait_for},
    support::{BIN, privileged, read_all, summary_of, tools},
};

/// A directory of its own under /tmp, removed (after unmounting what is under it) on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Self {
        let d = std::env::temp_dir().join(format!("lotrace-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch dir");
        Self(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        unmount_under(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Unmounts every mount point under `dir`, deepest first.
fn unmount_under(dir: &Path) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| Path::new(p).starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let c = std::ffi::CString::new(p).expect("path");
        // SAFETY: umount2 on a NUL-terminated path we own; MNT_DETACH cannot block.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// A root file system of busybox-static: /bin/busybox and its applets used here.
fn busybox_rootfs(dir: &Path) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("rootfs");
    std::fs::create_dir_all(dir.join("www")).expect("rootfs");
    std::fs::write(dir.join("www/index.html"), "lotrace\n".repeat(64)).expect("index");
    std::fs::copy(
        tools::path_of("busybox").unwrap_or_else(|e| panic!("{e}")),
        bin.join("busybox"),
    )
    .expect("copy busybox");
    for applet in ["sh", "httpd", "wget", "sleep", "ping", "cat"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("applet");
    }
}

/// Debian's podman on state of its own (vfs storage: no overlay mounts to leave behind;
/// cgroupfs; no systemd, no journal), with the image `localhost/lotrace-busybox` imported from
/// a busybox root file system.
struct Podman {
    dir: Scratch,
}

impl Podman {
    fn new() -> Self {
        let dir = Scratch::new("podman");
        let rootfs = dir.0.join("rootfs");
        busybox_rootfs(&rootfs);
        let p = Self { dir };
        let mut tar = Command::new(tools::require("tar"))
            .args(["-C"])
            .arg(&rootfs)
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .expect("tar");
        let out = p
            .cmd()
            .args([
                "import",
                "--change",
                r#"CMD ["/bin/sleep","100000"]"#,
                "-",
                "localhost/lotrace-busybox:1",
            ])
            .stdin(tar.stdout.take().expect("tar stdout"))
            .output()
            .expect("podman import");
        assert!(tar.wait().expect("tar").success(), "tar of the root file system");
        assert!(
            out.status.success(),
            "podman import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        p
    }

    fn root(&self) -> PathBuf {
        self.dir.0.join("root")
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(tools::require("podman"));
        c.arg("--root")
            .arg(self.root())
            .arg("--runroot")
            .arg(self.dir.0.join("run"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "none",
                "--runtime",
            ])
            .arg(tools::require("runc"));
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).output().expect("podman");
        assert!(
            out.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `podman run -d --network none NAME` running busybox httpd on 127.0.0.1:8080; its id.
    fn run_web(&self, name: &str) -> String {
        self.ok(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "none",
            // The limits runc sets must fit under this machine's own.
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "localhost/lotrace-busybox:1",
            "/bin/sh",
            "-c",
            "httpd -p 127.0.0.1:8080 -h /www && exec sleep 100000",
        ])
    }

    /// `count` HTTP GETs inside the container, by busybox wget to its own 127.0.0.1.
    fn wget(&self, name: &str, count: u32) {
        let script = format!(
            "i=0; while [ $i -lt {count} ]; do wget -q -O /dev/null http://127.0.0.1:8080/index.html || exit 1; i=$((i+1)); done"
        );
        self.ok(&["exec", name, "/bin/sh", "-c", &script]);
    }

    fn pid(&self, name: &str) -> u32 {
        self.ok(&["inspect", "-f", "{{.State.Pid}}", name])
            .parse()
            .expect("pid")
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.cmd().args(["rm", "-f", "-a", "-t", "0"]).output();
    }
}

/// lo's transmitted packets in the namespace of process `pid` (its /proc/PID/net/dev).
fn lo_tx_of(pid: u32) -> u64 {
    let dev = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).expect("net/dev");
    let line = dev
        .lines()
        .find(|l| l.trim_start().starts_with("lo:"))
        .expect("lo in net/dev");
    let f: Vec<&str> = line.split(':').nth(1).expect("fields").split_whitespace().collect();
    f[9].parse().expect("tx packets")
}

fn netns_of(pid: u32) -> u32 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(format!("/proc/{pid}/ns/net")).expect("ns").ino() as u32
}

/// The labels of the `lotrace_netns_info` series of namespace `ino`, as a map (None: absent).
fn info_of(text: &str, ino: u32) -> Option<BTreeMap<String, String>> {
    let want = format!("netns=\"{ino}\"");
    let line = text
        .lines()
        .find(|l| l.starts_with("lotrace_netns_info{") && l.contains(&want))?;
    let labels = line.split_once('{')?.1.rsplit_once('}')?.0;
    Some(
        labels
            .split("\",")
            .filter_map(|kv| {
                let (k, v) = kv.split_once("=\"")?;
                Some((k.to_string(), v.trim_end_matches('"').to_string()))
            })
            .collect(),
    )
}

fn lo_packets(text: &str, ino: u32) -> u64 {
    samples(text, "lotrace_lo_packets_total", ino).values().sum::<f64>() as u64
}

/// `lotrace trace ARGS --format json` until it exits; its summary.
fn trace_summary(args: &[&str], during: impl FnOnce()) -> (String, Value) {
    let mut child = Command::new(BIN)
        .arg("trace")
        .args(args)
        .args(["--format", "json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lotrace trace");
    let mut err = BufReader::new(child.stderr.take().expect("stderr"));
    let mut first = String::new();
    while !first.contains("hooks attached") {
        let before = first.len();
        err.read_line(&mut first).expect("read stderr");
        assert!(first.len() > before, "lotrace trace did not start: {first}");
    }
    let rest = read_all(err);
    during();
    crate::support::signal(child.id(), libc::SIGINT);
    let st = child.wait().expect("wait trace");
    let rest = rest.recv_timeout(Duration::from_secs(20)).expect("stderr");
    assert!(st.success(), "trace failed: {rest}");
    (first, summary_of(&rest))
}

/// The capabilities deploy/kubernetes/lotrace.yaml adds (its `add: [..]` line).
fn daemonset_caps() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/lotrace.yaml");
    let text = std::fs::read_to_string(path).expect("the DaemonSet manifest");
    let list = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("add: ["))
        .and_then(|l| l.strip_suffix(']'))
        .expect("`add: [..]` in the DaemonSet");
    let caps: Vec<String> = list.split(',').map(|c| c.trim().to_string()).collect();
    assert!(caps.contains(&"BPF".to_string()), "{caps:?}");
    caps
}

#[test]
fn podman_containers_are_named_by_id_and_name_in_metrics_and_in_trace() {
    if !privileged() {
        return;
    }
    let podman = Podman::new();
    let root = podman.root();
    // With exactly the capabilities the DaemonSet gives it.
    let caps = daemonset_caps();
    let agent = Agent::start_with_caps(
        &caps,
        &["--podman-root", root.to_str().expect("utf-8"), "--forget-after", "1"],
    );
    let name = format!("lt-web-{}", std::process::id());
    let id = podman.run_web(&name);
    let started = Instant::now();
    let pid = podman.pid(&name);
    let ino = netns_of(pid);
    assert_ne!(
        ino,
        netns_of(std::process::id()),
        "the container has a namespace of its own"
    );
    // Named within 2 s of starting: the agent looks once a second.
    let info = wait_for(10, "the container named in /metrics", || {
        info_of(&agent.metrics(), ino).filter(|i| i.get("container_name") == Some(&name))
    });
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "the new container took {took:?} to be named"
    );
    for (k, v) in [
        ("owner", "container"),
        ("container_runtime", "podman"),
        ("container_id", id.as_str()),
        ("source", "process"),
    ] {
        assert_eq!(info.get(k).map(String::as_str), Some(v), "{k} in {info:?}");
    }
    // Real loopback traffic inside: busybox wget to busybox httpd, counted exactly, every
    // series of it under the container's labels.
    let before = lo_tx_of(pid);
    podman.wget(&name, 20);
    let sent = lo_tx_of(pid) - before;
    assert!(sent >= 20 * 6, "only {sent} lo packets for 20 HTTP GETs");
    let text = agent.metrics();
    assert_eq!(
        lo_packets(&text, ino),
        lo_tx_of(pid),
        "the container's lo, counted exactly"
    );
    let label = format!("container_name=\"{name}\"");
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(&format!("netns=\"{ino}\"")))
        .collect();
    assert!(series.len() > 10, "{series:?}");
    for s in &series {
        assert!(
            s.contains(&label) && s.contains(&format!("container_id=\"{id}\"")),
            "{s}"
        );
    }
    // `trace --container NAME` and `--container ID-PREFIX` trace that namespace, and say whose;
    // So does `--netns /proc/PID/ns/net` of a process in it.
    let by_path = format!("/proc/{pid}/ns/net");
    for pick in [
        ["--container", name.as_str()],
        ["--container", &id[..12]],
        ["--netns", &by_path],
    ] {
        let root = root.to_str().expect("utf-8");
        let args = [pick[0], pick[1], "--podman-root", root];
        let (first, sum) = trace_summary(&args, || podman.wget(&name, 5));
        assert!(
            first.contains(&format!("inode {ino}, container {name} (podman {})", &id[..12])),
            "{first}"
        );
        let owner = &sum["summary"]["netns"]["owner"];
        assert_eq!(sum["summary"]["netns"]["inode"], ino, "{sum}");
        assert_eq!(owner["container_name"], name.as_str(), "{sum}");
        assert_eq!(owner["container_id"], id.as_str(), "{sum}");
        assert!(sum["summary"]["packets"].as_u64() >= Some(5 * 6), "{sum}");
    }
    let (rc, _, err) = crate::support::run_bin(&[
        "trace",
        "--container",
        "lt-no-such-container",
        "--podman-root",
        root.to_str().expect("utf-8"),
    ]);
    assert_eq!(rc, 2, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no container \"lt-no-such-container\" found"), "{err}");
    // Stopped: its info series goes at the next scan, its counters after --forget-after.
    podman.ok(&["rm", "-f", "-t", "0", &name]);
    wait_for(10, "the stopped container's series to go", || {
        let t = agent.metrics();
        (!t.contains(&format!("netns=\"{ino}\""))).then_some(())
    });
    let (rc, last) = agent.stop();
    assert_eq!(rc, 0, "{last}");
}

/// A CRI socket that accepts connections and never answers, until dropped.
struct Mute {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Mute {
    fn at(path: &Path) -> Self {
        let l = std::os::unix::net::UnixListener::bind(path).expect("bind a mute socket");
        l.set_nonblocking(true).expect("nonblocking");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, _)) => held.push(c),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Mute {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runtime sockets that are missing, refuse, or never answer: an agent given only those still
/// counts the pod of namespace `ino` and labels it from its cgroup (owner pod, its UID), says
/// each once however often it retries, and answers every scrape meanwhile.
fn runtime_faults(ctrd: &mut Containerd, ino: u32, uid: &str) {
    let d = ctrd.dir.0.join("faults");
    std::fs::create_dir_all(&d).expect("dir");
    let missing = d.join("missing.sock");
    let refusing = d.join("refusing.sock");
    drop(std::os::unix::net::UnixListener::bind(&refusing).expect("bind"));
    let slow = d.join("slow.sock");
    let _mute = Mute::at(&slow);
    let socks = [&missing, &refusing, &slow].map(|p| p.display().to_string());
    let agent = Agent::start(&[
        "--cri-socket",
        &socks[0],
        "--cri-socket",
        &socks[1],
        "--cri-socket",
        &socks[2],
        "--forget-after",
        "0",
    ]);
    let info = wait_for(10, "the pod labelled from its cgroup", || {
        info_of(&agent.metrics(), ino).filter(|i| i.get("k8s_pod_uid").is_some())
    });
    assert_eq!(info.get("owner").map(String::as_str), Some("pod"), "{info:?}");
    assert_eq!(info.get("k8s_pod_uid").map(String::as_str), Some(uid), "{info:?}");
    assert_eq!(info.get("k8s_pod_name"), None, "no runtime answered: {info:?}");
    // A new pod makes the agent ask the runtimes again; every scrape meanwhile is answered
    // (the slow socket's calls wait 2 s each, in a task of their own).
    let uid_c = format!("{:08x}-0000-4000-8000-00000000000c", std::process::id());
    let (id_c, pid_c) = ctrd.run_pod("late-1", "shop", &uid_c);
    let ino_c = netns_of(pid_c);
    let mut scrapes = 0;
    wait_for(10, "the late pod labelled from its cgroup", || {
        scrapes += 1;
        info_of(&agent.metrics(), ino_c).filter(|i| i.get("k8s_pod_uid") == Some(&uid_c))
    });
    // Asked again (the late pod was new), each failure counted, while scrapes are answered.
    let failed = |t: &str, s: &str| {
        t.lines()
            .find(|l| l.starts_with("lotrace_agent_cri_failures_total{") && l.contains(&format!("socket=\"{s}\"")))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    wait_for(20, "every bad socket asked twice", || {
        scrapes += 1;
        let t = agent.metrics();
        socks.iter().all(|s| failed(&t, s) >= Some(2.0)).then_some(())
    });
    assert!(
        agent
            .metrics()
            .contains(&format!("lotrace_agent_cri_up{{socket=\"{}\"}} 0", socks[2]))
    );
    ctrd.remove_pod(&id_c);
    let (rc, err) = agent.stop();
    assert_eq!(rc, 0, "{err}");
    for s in &socks {
        let n = err.lines().filter(|l| l.contains(s.as_str())).count();
        assert_eq!(n, 1, "{s} told {n} times (once wanted): {err}");
    }
    assert!(scrapes >= 2, "scraped {scrapes} times while the runtimes failed");
}

/// Every metric family and label the agent serves is in docs/agent.md.
fn check_documented(text: &str) {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/agent.md")).expect("docs");
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let fam = rest.split(' ').next().expect("family");
            let kind = rest.split(' ').nth(1).unwrap_or("");
            let shown = match kind {
                "counter" => format!("`{fam}_total`"),
                _ => format!("`{fam}`"),
            };
            let name = if fam == "lotrace_lo" {
                "`lotrace_lo_bytes_total`".into()
            } else {
                shown
            };
            assert!(doc.contains(&name), "{name} is not in docs/agent.md");
        } else if let Some((_, labels)) = l.split_once('{') {
            for kv in labels.split("\",") {
                let Some((k, _)) = kv.split_once("=\"") else { continue };
                assert!(
                    k == "le" || doc.contains(&format!("`{k}`")),
                    "label `{k}` is not in docs/agent.md"
                );
            }
        }
    }
}

/// Runs every query of deploy/grafana/lotrace.json (its variables set to "All") and every
/// recording rule of deploy/prometheus/lotrace-rules.yaml against a real Prometheus scraping
/// `agent`, while pings run in the namespace of `pid`: each returns data.
fn check_dashboard(agent: &Agent, pid: u32) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let rules = repo.join("deploy/prometheus/lotrace-rules.yaml");
    let prom = crate::agent::Prometheus::start_with(agent.port, Some(&rules));
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(repo.join("deploy/grafana/lotrace.json")).expect("dashboard"))
            .expect("dashboard JSON");
    let exprs: Vec<(String, String)> = dash["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |t| (title.clone(), t["expr"].as_str().expect("expr").to_string()))
        })
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pinger = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let ns = Netns::resolve(&format!("/proc/{pid}/ns/net")).expect("pod netns");
            // Bounded: at most 600 pings, 50 ms apart.
            for seq in 0..600u16 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let _ = ns.run(|| {
                    traffic::icmp_echo(std::net::Ipv4Addr::LOCALHOST.into(), 0, 77, seq, Duration::from_secs(1))
                });
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    for (title, e) in &exprs {
        let q = e
            .replace("$__rate_interval", "15s")
            .replace("\"$namespace\"", "\".*\"")
            .replace("\"$owner\"", "\".*\"");
        wait_for(60, &format!("dashboard panel {title:?} to return data: {q}"), || {
            let rows = prom.query(&q)?;
            rows.iter().any(|(_, v)| v.is_finite()).then_some(())
        });
    }
    for (rec, want) in [
        ("k8s_workload:lotrace_lo_packets:rate1m", "web"),
        ("k8s_workload:lotrace_lo_drops:rate1m", "web"),
        ("k8s_workload_stage:lotrace_lo_latency_seconds_bucket:rate1m", "web"),
    ] {
        let q = format!("{rec}{{k8s_workload_name=\"{want}\",k8s_namespace_name=\"shop\"}}");
        wait_for(60, &format!("recording rule {rec}"), || {
            (!prom.query(&q)?.is_empty()).then_some(())
        });
    }
    // The dashboard's variables find the pods' namespaces.
    let ns = prom
        .query("count by (k8s_namespace_name) (lotrace_netns_info)")
        .expect("query");
    let names: Vec<&str> = ns
        .iter()
        .filter_map(|(m, _)| m["k8s_namespace_name"].as_str())
        .collect();
    assert!(names.contains(&"shop") && names.contains(&"infra"), "{names:?}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    pinger.join().expect("pinger");
    check_documented(&agent.metrics());
}

/// Debian's containerd with its CRI plugin, on state of its own, run inside a throwaway network
/// namespace; pod sandboxes get lo and a ptp link into that namespace (host-local addresses
/// from 10.250.0.0/24, leases in the scratch directory). Its sandbox image is the busybox one,
/// made by podman and imported with `ctr`.
struct Containerd {
    dir: Scratch,
    _host: Sandbox,
    child: Child,
    sock: PathBuf,
    rt: tokio::runtime::Runtime,
    client: cri::RuntimeServiceClient<tonic::transport::Channel>,
}

const PAUSE: &str = "localhost/lotrace-busybox:1";

impl Containerd {
    fn start(podman: &Podman) -> Self {
        let dir = Scratch::new("containerd");
        let d = &dir.0;
        let host = Sandbox::new("lt-ctrd").expect("sandbox for containerd");
        let archive = d.join("image.tar");
        podman.ok(&[
            "save",
            "--format",
            "docker-archive",
            "-o",
            archive.to_str().expect("utf-8"),
            PAUSE,
        ]);
        let sock = d.join("containerd.sock");
        std::fs::create_dir_all(d.join("cni")).expect("cni dir");
        std::fs::write(
            d.join("cni/10-lotrace.conflist"),
            format!(
                r#"{{"cniVersion":"0.4.0","name":"lotrace-test","plugins":[{{"type":"ptp","ipMasq":false,"ipam":{{"type":"host-local","subnet":"10.250.0.0/24","dataDir":"{}"}}}},{{"type":"loopback"}}]}}"#,
                d.join("ipam").display()
            ),
        )
        .expect("cni conf");
        tools::require("/usr/lib/cni/ptp");
        tools::require("/usr/lib/cni/host-local");
        let cni_bin = Path::new(tools::require("/usr/lib/cni/loopback"))
            .parent()
            .expect("cni bin dir")
            .to_path_buf();
        std::fs::write(
            d.join("config.toml"),
            format!(
                r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE}"
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  # The sandbox asks for oom_score_adj -998; a machine that is itself a container refuses it.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni}"
    conf_dir = "{d}/cni"
"#,
                d = d.display(),
                sock = sock.display(),
                cni = cni_bin.display(),
            ),
        )
        .expect("containerd config");
        let log = std::fs::File::create(d.join("containerd.log")).expect("log");
        // nsenter joins only the network namespace (`ip netns exec` would also remount /sys,
        // hiding the cgroup mounts runc needs).
        let child = Command::new(tools::require("nsenter"))
            .arg(format!("--net=/run/netns/{}", host.name))
            .arg("--")
            .arg(tools::require("containerd"))
            .arg("--config")
            .arg(d.join("config.toml"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn containerd");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut client = {
            let _g = rt.enter();
            cri::client(sock.clone())
        };
        let log = d.join("containerd.log");
        wait_for(30, "containerd's CRI to answer", || {
            rt.block_on(cri::list(&mut client)).ok().map(|_| ())
        });
        let out = Command::new(tools::require("ctr"))
            .arg("--address")
            .arg(&sock)
            .args(["-n", "k8s.io", "images", "import"])
            .arg(&archive)
            .output()
            .expect("ctr import");
        assert!(
            out.status.success(),
            "ctr images import: {}; containerd log: {}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Self {
            dir,
            _host: host,
            child,
            sock,
            rt,
            client,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("containerd.log")).unwrap_or_default()
    }

    /// RunPodSandbox with kubelet's metadata, labels and cgroup parent, then one container
    /// `app` in it; (sandbox id, the sandbox's process).
    fn run_pod(&mut self, name: &str, namespace: &str, uid: &str) -> (String, u32) {
        let labels: std::collections::HashMap<String, String> = [
            ("io.kubernetes.pod.name", name),
            ("io.kubernetes.pod.namespace", namespace),
            ("io.kubernetes.pod.uid", uid),
            ("pod-template-hash", "5d8f7c9b6"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let config = api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: name.into(),
                uid: uid.into(),
                namespace: namespace.into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: self.dir.0.join("logs").join(uid).display().to_string(),
            labels,
            linux: Some(api::LinuxPodSandboxConfig {
                cgroup_parent: format!("/kubepods/besteffort/pod{uid}"),
                ..Default::default()
            }),
            ..Default::default()
        };
        let id = self
            .rt
            .block_on(self.client.run_pod_sandbox(api::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            }))
            .unwrap_or_else(|e| panic!("RunPodSandbox: {}; containerd log: {}", e.message(), self.log()))
            .into_inner()
            .pod_sandbox_id;
        let c = self
            .rt
            .block_on(self.client.create_container(api::CreateContainerRequest {
                pod_sandbox_id: id.clone(),
                config: Some(api::ContainerConfig {
                    metadata: Some(api::ContainerMetadata {
                        name: "app".into(),
                        attempt: 0,
                    }),
                    image: Some(api::ImageSpec {
                        image: PAUSE.into(),
                        ..Default::default()
                    }),
                    command: vec!["/bin/sleep".into(), "100000".into()],
                    log_path: "app.log".into(),
                    ..Default::default()
                }),
                sandbox_config: Some(config),
            }))
            .unwrap_or_else(|e| panic!("CreateContainer: {}; containerd log: {}", e.message(), self.log()))
            .into_inner()
            .container_id;
        self.rt
            .block_on(
                self.client
                    .start_container(api::StartContainerRequest { container_id: c }),
            )
            .unwrap_or_else(|e| panic!("StartContainer: {}", e.message()));
        // The sandbox's process: the one whose cgroup is the sandbox's own.
        let pid = wait_for(10, "the sandbox's process", || {
            std::fs::read_dir("/proc").ok()?.filter_map(|e| e.ok()).find_map(|e| {
                let pid: u32 = e.file_name().to_str()?.parse().ok()?;
                let cg = std::fs::read_to_string(e.path().join("cgroup")).ok()?;
                cg.lines()
                    .any(|l| l.ends_with(&format!("/pod{uid}/{id}")))
                    .then_some(pid)
            })
        });
        (id, pid)
    }

    fn remove_pod(&mut self, id: &str) {
        let id = id.to_string();
        self.rt
            .block_on(self.client.stop_pod_sandbox(api::StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            }))
            .unwrap_or_else(|e| panic!("StopPodSandbox: {}", e.message()));
        self.rt
            .block_on(
                self.client
                    .remove_pod_sandbox(api::RemovePodSandboxRequest { pod_sandbox_id: id }),
            )
            .unwrap_or_else(|e| panic!("RemovePodSandbox: {}", e.message()));
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Every sandbox it still runs, then containerd, then the shims it started (they outlive
        // it by design): found by the socket address they were given.
        if let Ok(l) = self.rt.block_on(cri::list(&mut self.client)) {
            for s in l.sandboxes {
                let _ = self
                    .rt
                    .block_on(self.client.stop_pod_sandbox(api::StopPodSandboxRequest {
                        pod_sandbox_id: s.id.clone(),
                    }));
                let _ = self.rt.block_on(
                    self.client
                        .remove_pod_sandbox(api::RemovePodSandboxRequest { pod_sandbox_id: s.id }),
                );
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let me = self.sock.display().to_string();
        for e in std::fs::read_dir("/proc").into_iter().flatten().filter_map(|e| e.ok()) {
            let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
                continue;
            };
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            if args.first().is_some_and(|a| a.ends_with(b"containerd-shim-runc-v2")) && args.contains(&me.as_bytes()) {
                // SAFETY: kill(2) on a shim our own containerd started (its address is ours).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

#[test]
fn pods_made_through_containerds_cri_are_named_by_pod_and_namespace() {
    if !privileged() {
        return;
    }
    let podman = Podman::new();
    let mut ctrd = Containerd::start(&podman);
    let sock = ctrd.sock.display().to_string();
    let agent = Agent::start(&["--cri-socket", &sock, "--forget-after", "0"]);
    let uid_a = format!("{:08x}-0000-4000-8000-00000000000a", std::process::id());
    let uid_b = format!("{:08x}-0000-4000-8000-00000000000b", std::process::id());
    let started = Instant::now();
    let (id_a, pid_a) = ctrd.run_pod("web-5d8f7c9b6-abcde", "shop", &uid_a);
    let made = started.elapsed();
    let (id_b, pid_b) = ctrd.run_pod("cache-5d8f7c9b6-fghij", "infra", &uid_b);
    let (ino_a, ino_b) = (netns_of(pid_a), netns_of(pid_b));
    assert_ne!(ino_a, ino_b);
    let info = wait_for(10, "the pod named in /metrics", || {
        info_of(&agent.metrics(), ino_a).filter(|i| i.get("k8s_pod_name").is_some())
    });
    let took = started.elapsed().saturating_sub(made);
    assert!(took < Duration::from_secs(2), "the new pod took {took:?} to be named");
    for (k, v) in [
        ("owner", "pod"),
        ("container_runtime", "containerd"),
        ("container_id", id_a.as_str()),
        ("k8s_pod_name", "web-5d8f7c9b6-abcde"),
        ("k8s_namespace_name", "shop"),
        ("k8s_pod_uid", uid_a.as_str()),
        ("k8s_workload_name", "web"),
        ("k8s_container_names", "app"),
    ] {
        assert_eq!(info.get(k).map(String::as_str), Some(v), "{k} in {info:?}");
    }
    // Each pod's own loopback traffic, under its own pod name and namespace.
    for (pid, n) in [(pid_a, 7u16), (pid_b, 3)] {
        let ns = Netns::resolve(&format!("/proc/{pid}/ns/net")).expect("pod netns");
        ns.run(|| traffic::icmp_echo(std::net::Ipv4Addr::LOCALHOST.into(), 0, n, 1, Duration::from_secs(2)))
            .expect("enter the pod")
            .expect("ping");
    }
    let text = wait_for(10, "both pods named", || {
        let t = agent.metrics();
        info_of(&t, ino_b)
            .is_some_and(|i| i.get("k8s_pod_name").map(String::as_str) == Some("cache-5d8f7c9b6-fghij"))
            .then_some(t)
    });
    for (pid, ino, pod, ns) in [
        (pid_a, ino_a, "web-5d8f7c9b6-abcde", "shop"),
        (pid_b, ino_b, "cache-5d8f7c9b6-fghij", "infra"),
    ] {
        assert_eq!(lo_packets(&text, ino), lo_tx_of(pid), "{pod}: counted exactly");
        let want = format!("k8s_pod_name=\"{pod}\",k8s_namespace_name=\"{ns}\"");
        let rows: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("lotrace_lo_packets_total{") && l.contains(&format!("netns=\"{ino}\"")))
            .collect();
        assert!(!rows.is_empty() && rows.iter().all(|r| r.contains(&want)), "{rows:?}");
    }
    // A drop in pod A (a UDP datagram to a port nothing listens on), then a real Prometheus
    // scraping the agent: every dashboard panel's query and every recording rule return data.
    Netns::resolve(&format!("/proc/{pid_a}/ns/net"))
        .expect("pod netns")
        .run(|| {
            let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
            s.send_to(b"nobody listens", "127.0.0.1:9")
        })
        .expect("enter the pod")
        .expect("send");
    check_dashboard(&agent, pid_a);
    // `trace --pod NS/NAME` traces that pod's namespace and says whose it is.
    let (first, sum) = trace_summary(&["--pod", "shop/web-5d8f7c9b6-abcde", "--cri-socket", &sock], || {
        let ns = Netns::resolve(&format!("/proc/{pid_a}/ns/net")).expect("pod netns");
        ns.run(|| traffic::icmp_echo(std::net::Ipv4Addr::LOCALHOST.into(), 0, 9, 1, Duration::from_secs(2)))
            .expect("enter the pod")
            .expect("ping");
    });
    assert!(
        first.contains(&format!(
            "inode {ino_a}, pod shop/web-5d8f7c9b6-abcde (uid {uid_a}, containerd, containers app)"
        )),
        "{first}"
    );
    let pod = &sum["summary"]["netns"]["owner"]["pod"];
    assert_eq!(
        (pod["name"].as_str(), pod["namespace"].as_str()),
        (Some("web-5d8f7c9b6-abcde"), Some("shop")),
        "{sum}"
    );
    assert!(sum["summary"]["packets"].as_u64() >= Some(2), "{sum}");
    let (rc, _, err) = crate::support::run_bin(&["trace", "--pod", "shop/lt-no-such-pod", "--cri-socket", &sock]);
    assert_eq!((rc, err.lines().count()), (2, 1), "{err}");
    assert!(err.contains("no pod shop/lt-no-such-pod found"), "{err}");
    runtime_faults(&mut ctrd, ino_a, &uid_a);
    // A removed pod's series go at the next scan (--forget-after 0).
    ctrd.remove_pod(&id_a);
    wait_for(10, "the removed pod's series to go", || {
        let t = agent.metrics();
        (!t.contains(&format!("netns=\"{ino_a}\"")) && info_of(&t, ino_b).is_some()).then_some(())
    });
    let _ = id_b;
    let (rc, last) = agent.stop();
    assert_eq!(rc, 0, "{last}");
}
