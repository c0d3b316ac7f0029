//! `lotrace agent`: always on, every network namespace's lo, counted in the kernel and served to
//! Prometheus at `/metrics`.
//!
//! One set of global tracepoint programs counts every namespace (told apart by the namespace of
//! the packet's `lo`); user space only reads the counters when scraped, and looks for namespaces
//! once a second to name them and to release the ones that went away.
pub mod bpf;
pub mod discover;
pub mod metrics;
pub mod otlp;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Result;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes};
use prometheus_client::registry::Registry;
use tokio::signal::unix::{SignalKind, signal};

use self::{
    bpf::{AgentBpf, Bounds},
    discover::Wanted,
    metrics::State,
};
use crate::usage::usage;

/// Where `/metrics` is served unless `--listen` says otherwise. Prometheus's list of default
/// exporter ports (9100-9999) has been fully allocated since 2023, so lotrace takes a port
/// outside it that is neither privileged nor in Linux's ephemeral range (docs/agent.md).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:19477";

/// How often the agent looks for new and vanished namespaces.
pub const SCAN_EVERY: Duration = Duration::from_secs(1);

/// CAP_SYS_PTRACE: what reading other processes' `/proc/PID/ns/net` needs. Every other
/// capability is dropped once the programs are attached (map reads and writes go through the
/// file descriptors the agent already holds).
const KEEP_CAPS: u64 = 1 << 19;

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub listen: SocketAddr,
    pub netns: Vec<String>,
    pub bounds: Bounds,
    pub raw_tp: bool,
    pub kernel_cost: bool,
    /// Where owners' names come from (`--cri-socket`, `--podman-root`, `--docker-root`,
    /// `--node-name`).
    pub sources: crate::owner::Sources,
    /// How long a gone namespace's last counts are still served.
    pub forget_after: Duration,
    /// `--otlp URL`: push the metrics to an OpenTelemetry collector too.
    pub otlp: Option<otlp::OtlpConfig>,
}

/// How often the CRI sockets are listed when nothing new asks for it sooner.
pub const CRI_EVERY: Duration = Duration::from_secs(10);
/// How often the CRI lister looks whether a listing is due.
const CRI_POLL: Duration = Duration::from_millis(250);

/// Lists the CRI sockets whenever the scanner found a container or pod no source names (and
/// every [`CRI_EVERY`]), outside the lock: a slow or dead runtime never holds up a scrape.
async fn cri_lister(state: Arc<Mutex<State>>) {
    let sources = lock(&state).sources.clone();
    if sources.cri.is_empty() {
        return;
    }
    let mut clients = std::collections::HashMap::new();
    let mut health = crate::owner::CriHealth::default();
    let mut tick = tokio::time::interval(CRI_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !lock(&state).cri_listing_due(CRI_EVERY) {
            continue;
        }
        let listings = crate::owner::list_cri(&sources, &mut clients, &mut health, |line| {
            eprintln!("lotrace agent: {line}")
        })
        .await;
        let mut st = lock(&state);
        st.cri_health = health.1.clone();
        st.cri_listed(listings);
    }
}

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn respond(req: &Request<hyper::body::Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, ctype: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", ctype)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, registry) {
                Ok(()) => reply(StatusCode::OK, OPENMETRICS, text),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("encoding failed: {e}\n"),
                ),
            }
        }
        (&Method::GET, "/") => reply(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "lotrace agent: metrics at /metrics\n".into(),
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found: try /metrics\n".into()),
    }
}

async fn serve(stream: tokio::net::TcpStream, registry: Arc<Registry>) {
    let io = hyper_util::rt::TokioIo::new(stream);
    let svc = hyper::service::service_fn(move |req| {
        let registry = registry.clone();
        async move { Ok::<_, Infallible>(respond(&req, &registry)) }
    });
    // A client that goes away mid-request is its own business.
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, svc)
        .await;
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

pub async fn run(cfg: AgentConfig) -> Result<i32> {
    let wanted = if cfg.netns.is_empty() {
        None
    } else {
        Some(
            cfg.netns
                .iter()
                .map(|s| Wanted::parse(s))
                .collect::<Result<Vec<_>, _>>()
                .map_err(usage)?,
        )
    };
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    // The port first: a port in use is found out before anything is loaded.
    let listener =
        std::net::TcpListener::bind(cfg.listen).map_err(|e| usage(format!("cannot listen on {}: {e}", cfg.listen)))?;
    listener.set_nonblocking(true)?;
    // Port 0 asks the kernel for one: say which.
    let bound = listener.local_addr().unwrap_or(cfg.listen);
    let mut bpf = AgentBpf::open(&cfg.bounds, wanted.is_some(), cfg.raw_tp, cfg.kernel_cost)?;
    let maps = bpf.take_maps()?;
    let state = Arc::new(Mutex::new(State::new(
        bpf,
        maps,
        wanted,
        cfg.sources.clone(),
        cfg.forget_after,
    )));
    {
        let mut st = lock(&state);
        // With --netns, the allowed namespaces are in the kernel's map before the first packet.
        st.rescan();
        st.bpf.start();
    }
    if let Err(e) = crate::caps::drop_all_but(KEEP_CAPS) {
        eprintln!("lotrace agent: keeping its capabilities: {e:#}");
    }
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let registry = Arc::new(metrics::registry(state.clone()));
    {
        let st = lock(&state);
        let raw = st.bpf.attached.iter().filter(|a| a.kind == "raw_tracepoint").count();
        eprintln!(
            "lotrace agent: serving http://{}/metrics; {} namespaces; {} hooks attached{}{}",
            bound,
            st.found.len(),
            st.bpf.attached.len(),
            if raw > 0 {
                format!(" ({raw} as raw tracepoints)")
            } else {
                String::new()
            },
            if st.bpf.failures.is_empty() {
                String::new()
            } else {
                format!(
                    "; not attached: {}",
                    st.bpf
                        .failures
                        .iter()
                        .map(|f| format!("{} ({})", f.hook, f.reason))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
    }
    let lister = tokio::spawn(cri_lister(state.clone()));
    let exporter = cfg.otlp.clone().map(|o| {
        lock(&state).otlp = true;
        tokio::spawn(otlp::run(state.clone(), o))
    });
    let mut tick = tokio::time::interval(SCAN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let why = loop {
        tokio::select! {
            _ = tick.tick() => lock(&state).rescan(),
            acc = listener.accept() => {
                if let Ok((stream, _)) = acc {
                    tokio::spawn(serve(stream, registry.clone()));
                }
            }
            _ = sigint.recv() => break "SIGINT",
            _ = sigterm.recv() => break "SIGTERM",
        }
    };
    lister.abort();
    if let Some(e) = exporter {
        e.abort();
    }
    let mut st = lock(&state);
    st.bpf.stop();
    let packets: u64 = st
        .maps
        .netns_totals()
        .iter()
        .map(|(_, c)| c.packets.iter().sum::<u64>())
        .sum();
    let overflow: Vec<String> = st
        .maps
        .overflow()
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(m, n)| format!("{n} {m}"))
        .collect();
    eprintln!(
        "lotrace agent: {why}: stopped; {} namespaces watched, {packets} lo packets counted, {}",
        st.found.len(),
        if overflow.is_empty() {
            "nothing overflowed".to_string()
        } else {
            format!("overflowed: {}", overflow.join(", "))
        }
    );
    Ok(0)
}

/// `--listen ADDR:PORT`.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .map_err(|_| format!("{s:?} is not an address and port (e.g. 127.0.0.1:19477 or [::1]:19477)"))
}
