//! Command line (clap derive) and dispatch. Errors are one line; bad input exits 2.
use anyhow::Result;
use clap::{Parser, Subcommand};
use std::{path::PathBuf, time::Duration};

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use tokio::signal::unix::{SignalKind, signal};

use crate::{
    bpf::doctor,
    engine::{Format, PrintOpts},
    filter,
    netns::Netns,
    owner, prove,
    trace::{self, TraceConfig},
    usage::{output_closed, usage, write_stdout},
};

#[derive(Parser, Debug)]
#[command(
    name = "lotrace",
    version,
    about = "Trace packets through the Linux loopback path with eBPF"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Report what this kernel allows (by trying) and the hook plan tracing will use.
    Doctor {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Also print the verifier's whole log for each attach type the kernel refused.
        #[arg(long)]
        verbose: bool,
    },
    /// Trace every packet of a network namespace through the kernel, one block per packet.
    Trace {
        /// Network namespace to trace: a name from `ip netns` or a path such as /proc/PID/ns/net
        /// (default: the namespace lotrace runs in).
        #[arg(long, value_name = "NAME|PATH")]
        netns: Option<String>,
        #[command(flatten)]
        owner: OwnerArgs,
        #[command(flatten)]
        print: PrintArgs,
        /// Stop after SECS seconds (fractions allowed).
        #[arg(long, value_name = "SECS", value_parser = parse_secs)]
        duration: Option<Duration>,
        /// Also attach generic XDP on lo. Off by default: generic XDP makes the kernel copy every
        /// loopback packet into a new skb (and drop it if that copy fails); tc ingress sees the
        /// same bytes without that.
        #[arg(long)]
        xdp: bool,
        /// Attach every tracepoint hook as a raw tracepoint instead of tp_btf (lotrace falls back
        /// to this per hook by itself when the kernel refuses tp_btf).
        #[arg(long)]
        raw_tp: bool,
        /// Measure the kernel-side cost of every lotrace program (run count and time, from the
        /// kernel's BPF statistics) and print it in the exit summary. The statistics themselves
        /// add two clock reads to every BPF program run, so they are off unless asked for.
        #[arg(long)]
        kernel_cost: bool,
        /// Record the raw events to FILE (replay it later, anywhere, without root).
        #[arg(long, value_name = "FILE")]
        write: Option<PathBuf>,
        /// Write the packets seen on lo to OUT as pcapng, each with its kernel path as a comment.
        #[arg(long, value_name = "OUT")]
        pcapng: Option<PathBuf>,
        /// Packet bytes to capture per packet on lo for --pcapng / --write (the first 96 are
        /// always captured for the headers; more are copied by the tc egress program).
        #[arg(long, value_name = "BYTES", default_value = "96", value_parser = clap::value_parser!(u32).range(14..=2048))]
        snaplen: u32,
    },
    /// Live dashboard of the loopback path (root), or of a recording (--replay, no root needed).
    Tui {
        /// Network namespace to watch (name from `ip netns` or a path; default: lotrace's own).
        #[arg(long, value_name = "NAME|PATH", conflicts_with = "replay")]
        netns: Option<String>,
        #[command(flatten)]
        owner: OwnerArgs,
        /// Initial filter (edit it in the dashboard with `/`).
        #[arg(long, value_name = "EXPR")]
        filter: Option<String>,
        /// Drive the dashboard from a recording made with `trace --write`.
        #[arg(long, value_name = "FILE")]
        replay: Option<PathBuf>,
        /// Replay speed: 1 = as recorded, 10 = ten times faster, 0 = as fast as possible.
        #[arg(long, value_name = "X", default_value = "1", value_parser = parse_speed, requires = "replay")]
        speed: f64,
    },
    /// Reconstruct and print a recording made with `trace --write`, exactly as the live run did.
    Replay {
        /// The recording.
        file: PathBuf,
        #[command(flatten)]
        print: PrintArgs,
        /// Write the recorded lo packets to OUT as pcapng with their kernel paths as comments.
        #[arg(long, value_name = "OUT")]
        pcapng: Option<PathBuf>,
    },
    /// Always on: count the lo of every network namespace in the kernel (the host's, every
    /// `ip netns` one, every container's and pod's) and serve it to Prometheus at /metrics.
    /// Runs until SIGINT or SIGTERM.
    Agent {
        /// Address and port to serve /metrics on.
        #[arg(long, value_name = "ADDR:PORT", default_value = crate::agent::DEFAULT_LISTEN, value_parser = crate::agent::parse_listen)]
        listen: std::net::SocketAddr,
        /// Watch only this namespace (an `ip netns` name, a path such as /proc/PID/ns/net, or an
        /// nsfs inode number); repeatable. A name that does not exist yet is watched once it does.
        #[arg(long, value_name = "NAME|PATH|INODE")]
        netns: Vec<String>,
        /// Most namespaces counted at once; the kernel preallocates
        /// max-netns x CPUs x 1,432 bytes. Samples of namespaces beyond it are counted in
        /// lotrace_agent_overflow_total{map="netns"}.
        #[arg(long, value_name = "N", default_value_t = loopback_common::agent::DEFAULT_MAX_NETNS, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        max_netns: u32,
        /// Most (namespace, drop reason) series; beyond it, lotrace_agent_overflow_total{map="drops"}.
        #[arg(long, value_name = "N", default_value_t = loopback_common::agent::DEFAULT_MAX_DROP_SERIES, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        max_drop_series: u32,
        /// Most lo packets timed at once (between their transmit and their free).
        #[arg(long, value_name = "N", default_value_t = loopback_common::agent::DEFAULT_MAX_IN_FLIGHT, value_parser = clap::value_parser!(u32).range(64..=16_000_000))]
        max_in_flight: u32,
        /// Most interface addresses watched over all namespaces (a packet to one of its own
        /// namespace's addresses that another device than lo transmits escaped); beyond it,
        /// lotrace_agent_overflow_total{map="local_addrs"}.
        #[arg(long, value_name = "N", default_value_t = loopback_common::agent::DEFAULT_MAX_LOCAL_ADDRS, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        max_local_addrs: u32,
        /// Attach the raw tracepoint twins instead of tp_btf.
        #[arg(long)]
        raw_tp: bool,
        /// Export each program's run time in the kernel (lotrace_agent_bpf_run_seconds_total);
        /// the kernel's statistics add two clock reads to every BPF program run.
        #[arg(long)]
        kernel_cost: bool,
        /// A container runtime's CRI socket, for pod names, namespaces and containers
        /// (repeatable; default: /run/containerd/containerd.sock and /run/crio/crio.sock when
        /// present). Without one, pods are known by the UID their cgroup names.
        #[arg(long, value_name = "PATH")]
        cri_socket: Vec<PathBuf>,
        /// podman's storage root, for container names (repeatable; default
        /// /var/lib/containers/storage).
        #[arg(long, value_name = "DIR")]
        podman_root: Vec<PathBuf>,
        /// docker's data root, for container names (default /var/lib/docker).
        #[arg(long, value_name = "DIR")]
        docker_root: Option<PathBuf>,
        /// The node's name, on the host namespace's series (default: $NODE_NAME, else the host
        /// name).
        #[arg(long, value_name = "NAME")]
        node_name: Option<String>,
        /// How long a namespace that went away (a stopped container or pod) keeps its last
        /// counts on /metrics before its series are removed; 0 removes them at once.
        #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse_secs_or_zero)]
        forget_after: Duration,
        /// Also push the metrics to an OpenTelemetry collector, OTLP/HTTP protobuf, at URL
        /// (e.g. http://127.0.0.1:4318; /v1/metrics is added).
        #[arg(long, value_name = "URL", value_parser = crate::agent::otlp::parse_url)]
        otlp: Option<hyper::Uri>,
        /// How often to push with --otlp.
        #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_secs, requires = "otlp")]
        otlp_every: Duration,
    },
    /// Prove, with evidence from the running kernel, that traffic to local addresses stays on lo.
    /// With no target: builds a throwaway sandbox namespace and proves 127.0.0.1, another 127/8
    /// address, ::1, an interface's own IPv4/IPv6 addresses, localhost and 0.0.0.0, then repeats
    /// with the interface's cable pulled and with the interface down.
    Prove {
        /// Address (IPv6 link-local as ADDR%IFACE) or host name to prove; repeatable. Without
        /// --netns, proven in the namespace lotrace runs in.
        #[arg(long, value_name = "ADDR|NAME")]
        target: Vec<String>,
        /// Prove inside this existing network namespace (name from `ip netns` or a path).
        #[arg(long, value_name = "NAME|PATH")]
        netns: Option<String>,
        /// Target every local address (all interfaces, both families) of the namespace.
        #[arg(long)]
        host: bool,
        /// Echo requests per target.
        #[arg(long, value_name = "N", default_value = "3", value_parser = clap::value_parser!(u16).range(1..=1000))]
        count: u16,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
}

/// What to print: shared by `trace` and `replay`.
#[derive(clap::Args, Debug)]
pub struct PrintArgs {
    /// tcpdump-like filter, e.g. "icmp or (udp and port 53)".
    #[arg(long, value_name = "EXPR")]
    filter: Option<String>,
    /// Only packets sent or received by this process id.
    #[arg(long, value_name = "N")]
    pid: Option<u32>,
    /// Stop after printing N packets.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    /// Also print the packets cut by the start or end of tracing (caught part-way through when
    /// the programs were switched on, or still in flight at stop); the summary counts them apart.
    #[arg(long)]
    partial: bool,
}

impl PrintArgs {
    /// Parses the filter; a bad one is a usage error.
    fn opts(self) -> Result<PrintOpts> {
        Ok(PrintOpts {
            filter: self.filter.as_deref().map(filter::parse).transpose().map_err(usage)?,
            pid: self.pid,
            count: self.count,
            format: self.format,
            partial: self.partial,
        })
    }
}

fn parse_speed(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1e6).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a speed (a number from 0 to 1000000)")),
    }
}

fn parse_secs_or_zero(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    parse_secs(s)
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(v > 0.0 && v < 1e9) {
        return Err(format!("{s:?} must be a positive number of seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// `--netns NAME|PATH`, resolved; a bad one is a usage error.
fn given_netns(spec: Option<String>) -> Result<Option<Netns>> {
    spec.as_deref().map(Netns::resolve).transpose().map_err(usage)
}

/// Picking the namespace by whose it is.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct OwnerArgs {
    /// Trace the network namespace of this container (its name or id, 12 hex digits at
    /// least), as podman, docker or the CRI runtime name it.
    #[arg(long, value_name = "NAME|ID", conflicts_with_all = ["netns", "pod"])]
    container: Option<String>,
    /// Trace this Kubernetes pod's network namespace (as the node's CRI runtime names it).
    #[arg(long, value_name = "[NS/]NAME", conflicts_with = "netns")]
    pod: Option<String>,
    /// The CRI socket that names pods for --pod/--container (repeatable; default
    /// /run/containerd/containerd.sock and /run/crio/crio.sock when present).
    #[arg(long, value_name = "PATH")]
    cri_socket: Vec<PathBuf>,
    /// podman's storage root, for --container (repeatable; default /var/lib/containers/storage).
    #[arg(long, value_name = "DIR")]
    podman_root: Vec<PathBuf>,
}

impl OwnerArgs {
    fn pick(&self) -> Result<Option<crate::owner::Pick>> {
        use crate::owner::Pick;
        if let Some(c) = &self.container {
            if c.is_empty() {
                return Err(usage("--container: empty name"));
            }
            return Ok(Some(Pick::Container(c.clone())));
        }
        let Some(p) = &self.pod else { return Ok(None) };
        let (namespace, name) = match p.split_once('/') {
            Some((n, name)) => (Some(n.to_string()), name.to_string()),
            None => (None, p.clone()),
        };
        if name.is_empty() || namespace.as_deref() == Some("") || name.contains('/') {
            return Err(usage(format!("--pod {p:?}: expected NAME or NAMESPACE/NAME")));
        }
        Ok(Some(Pick::Pod { namespace, name }))
    }
}

/// The namespace `pick` names: a process in it, its inode and its owner. Every namespace on
/// the machine is looked at (names from the default sources); none, or more than one, is an error.
async fn find_owned(pick: &crate::owner::Pick, src: owner::Sources) -> Result<(u32, u32, owner::Owner), String> {
    let mut names = owner::Names::default();
    names.refresh_files(&src);
    let mut errs = Vec::new();
    names.cri = owner::list_cri(
        &src,
        &mut std::collections::HashMap::new(),
        &mut owner::CriHealth::default(),
        |l| errs.push(l),
    )
    .await;
    let proc = std::path::Path::new("/proc");
    let found = crate::agent::discover::scan(proc, std::path::Path::new("/run/netns"));
    let mut hits = Vec::new();
    for (ino, f) in &found {
        let Some(pid) = f.pid else { continue };
        let o = names.owner(&src, f.source, &owner::cgroup_of(proc, pid));
        if pick.matches(&o) {
            hits.push((pid, *ino, o));
        }
    }
    match hits.len() {
        1 => Ok(hits.remove(0)),
        0 => Err(format!(
            "no {} found on this machine{}",
            pick.describe(),
            if errs.is_empty() {
                String::new()
            } else {
                format!(" ({})", errs.join("; "))
            }
        )),
        n => Err(format!(
            "{} matches {n} namespaces: give the full container id or NAMESPACE/NAME",
            pick.describe()
        )),
    }
}

/// Whose the namespace of a `--netns /proc/PID/ns/net` (or the host's) is, from files only:
/// the cgroup of PID, podman's and docker's state (no runtime call at start).
fn owner_of_path(n: &Netns, owner: &OwnerArgs) -> Option<owner::Owner> {
    let proc = std::path::Path::new("/proc");
    let host = crate::agent::discover::inode_of(&proc.join("1/ns/net"));
    let src = owner::Sources::new(&owner.cri_socket, &owner.podman_root, None, None);
    let mut names = owner::Names::default();
    names.refresh_files(&src);
    if host == Some(n.inode) {
        return Some(names.owner(&src, "host", &owner::CgroupOwner::default()));
    }
    let pid: u32 = n
        .path
        .strip_prefix("/proc")
        .ok()?
        .iter()
        .next()?
        .to_str()?
        .parse()
        .ok()?;
    let o = names.owner(&src, "process", &owner::cgroup_of(proc, pid));
    (o.kind == "container" || o.kind == "pod").then_some(o)
}

/// `--netns`, or the namespace `--container`/`--pod` names (with its owner).
async fn chosen_netns(spec: Option<String>, owner: &OwnerArgs) -> Result<Option<Netns>> {
    let Some(pick) = owner.pick()? else {
        let mut n = given_netns(spec)?;
        if let Some(n) = n.as_mut() {
            n.owner = owner_of_path(n, owner);
        }
        return Ok(n);
    };
    let src = owner::Sources::new(&owner.cri_socket, &owner.podman_root, None, None);
    let (pid, _, o) = find_owned(&pick, src).await.map_err(usage)?;
    let mut n = Netns::resolve(&format!("/proc/{pid}/ns/net")).map_err(usage)?;
    n.label = pick.describe();
    n.owner = Some(o);
    Ok(Some(n))
}

pub async fn dispatch(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Doctor { json, verbose } => {
            let r = doctor::run(verbose)?;
            let text = if json {
                serde_json::to_string_pretty(&r)? + "\n"
            } else {
                doctor::render_text(&r)
            };
            write_stdout(&text)?;
            if let Err(e) = doctor::require_can_trace(&r) {
                eprintln!("lotrace: {e}");
                return Ok(1);
            }
            Ok(0)
        }
        Cmd::Trace {
            netns,
            owner,
            print,
            duration,
            xdp,
            raw_tp,
            kernel_cost,
            write,
            pcapng,
            snaplen,
        } => {
            let print = print.opts()?;
            let netns = match chosen_netns(netns, &owner).await? {
                Some(n) => n,
                None => {
                    let mut n = Netns::current()?;
                    n.owner = owner_of_path(&n, &owner);
                    n
                }
            };
            trace::run(TraceConfig {
                netns,
                print,
                duration,
                xdp,
                raw_tp,
                kernel_cost,
                write,
                pcapng,
                snaplen,
            })
            .await?;
            Ok(0)
        }
        Cmd::Tui {
            netns,
            owner,
            filter: f,
            replay,
            speed,
        } => {
            let filter = match f {
                Some(text) => Some((text.clone(), filter::parse(&text).map_err(usage)?)),
                None => None,
            };
            if replay.is_some() && owner.pick()?.is_some() {
                return Err(usage("--container and --pod pick a live namespace: not with --replay"));
            }
            let netns = chosen_netns(netns, &owner).await?;
            crate::tui::run(crate::tui::TuiConfig {
                netns,
                filter,
                replay,
                speed,
            })
            .await?;
            Ok(0)
        }
        Cmd::Agent {
            listen,
            netns,
            max_netns,
            max_drop_series,
            max_in_flight,
            max_local_addrs,
            raw_tp,
            kernel_cost,
            cri_socket,
            podman_root,
            docker_root,
            node_name,
            forget_after,
            otlp,
            otlp_every,
        } => {
            crate::agent::run(crate::agent::AgentConfig {
                sources: crate::owner::Sources::new(&cri_socket, &podman_root, docker_root, node_name),
                forget_after,
                otlp: otlp.map(|url| crate::agent::otlp::OtlpConfig { url, every: otlp_every }),
                listen,
                netns,
                bounds: crate::agent::bpf::Bounds {
                    max_netns,
                    max_drop_series,
                    max_in_flight,
                    max_local_addrs,
                },
                raw_tp,
                kernel_cost,
            })
            .await
        }
        Cmd::Replay { file, print, pcapng } => {
            trace::replay(trace::ReplayConfig {
                file,
                print: print.opts()?,
                pcapng,
            })?;
            Ok(0)
        }
        Cmd::Prove {
            target,
            netns,
            host,
            count,
            format,
        } => {
            let netns = given_netns(netns)?;
            let cfg = prove::ProveConfig {
                targets: target,
                netns,
                host,
                count,
                format,
            };
            // Ctrl-C and SIGTERM set a flag the prover checks between echoes, so the sandbox and
            // the programs are always removed on the way out.
            let cancel = Arc::new(AtomicBool::new(false));
            let mut sigint = signal(SignalKind::interrupt())?;
            let mut sigterm = signal(SignalKind::terminate())?;
            let flag = cancel.clone();
            let mut job = tokio::task::spawn_blocking(move || prove::run(cfg, &flag));
            let res = tokio::select! {
                r = &mut job => r,
                _ = sigint.recv() => { cancel.store(true, Ordering::Relaxed); job.await }
                _ = sigterm.recv() => { cancel.store(true, Ordering::Relaxed); job.await }
            };
            match res.map_err(|e| anyhow::anyhow!("prover thread failed: {e}"))? {
                Ok(code) => Ok(code),
                Err(e) if cancel.load(Ordering::Relaxed) => {
                    eprintln!("lotrace: {e:#}; everything lotrace set up was removed");
                    Ok(130)
                }
                // Every prove failure is exit 2 (bad target, unresolvable name, no privileges,
                // cannot trace): 1 is reserved for "disproven".
                Err(e) if output_closed(&e) => Err(e),
                Err(e) => Err(usage(format!("{e:#}"))),
            }
        }
    }
}
