//! `lotrace prove`: prove with evidence from the running kernel that traffic to local addresses
//! stays on `lo`. lotrace sends its own ICMP/ICMPv6 echoes, traces them with the same engine as
//! `lotrace trace`, and judges each target from the reconstructed paths.
//!
//! The judgement (`evaluate`) is pure and unit-tested on recorded event sequences; `run` does
//! the I/O: sandbox, tracing session, echoes, `ip route get`.
mod judge;
mod plan;
mod render;
mod targets;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Result, anyhow, bail};
use aya::maps::{MapData, RingBuf};

use crate::{
    bpf::session::{Session, SessionOptions, privileges},
    engine::{Format, Intake, pump},
    netns::{Netns, Sandbox},
    path::{PacketPath, Tracker, TrackerConfig},
    traffic::{EchoError, icmp_echo},
    usage::usage,
};

pub use judge::evaluate;
use plan::*;
pub use plan::{SANDBOX_DEV, SANDBOX_PEER, SANDBOX_PREFIX, SANDBOX_V4, SANDBOX_V6};
pub use render::{render_text, report_json};
use targets::*;
pub use targets::{LocalAddr, Spec, parse_addrs, parse_route_get, parse_spec};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every request and reply was transmitted and received on `lo`, and every echo answered.
    Proven,
    /// A packet left through a device other than `lo`.
    Disproven,
    /// The kernel refused to send: no route to the address (nothing was transmitted).
    Unreachable,
    /// Not enough evidence either way (no reply, or packets the tracer did not see).
    Unproven,
}

impl Verdict {
    pub fn as_str(&self) -> &'static str {
        match self {
            Verdict::Proven => "PROVEN",
            Verdict::Disproven => "DISPROVEN",
            Verdict::Unreachable => "UNREACHABLE",
            Verdict::Unproven => "UNPROVEN",
        }
    }
}

/// One address to prove, in one state of the namespace.
#[derive(Clone, Debug)]
pub struct Target {
    /// Which state of the namespace this runs in (sandbox scenarios), e.g. "no-carrier".
    pub scenario: &'static str,
    /// What was asked for: a literal address, a name, or an interface's address.
    pub spec: String,
    pub addr: IpAddr,
    /// Interface index for IPv6 link-local addresses, else 0.
    pub scope_id: u32,
    /// Where the address came from: "literal", "/etc/hosts:1", "address of lt0", ...
    pub source: String,
    pub expect: Verdict,
    /// ICMP echo identifier used for this target only: how its packets are found in the trace.
    pub icmp_id: u16,
}

/// The kernel's own answer to `ip route get ADDR` (RTM_GETROUTE) at probe time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelRoute {
    pub kind: Option<String>,
    pub table: Option<String>,
    pub dev: Option<String>,
    pub error: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Echo {
    pub seq: u16,
    /// The kernel accepted the request (sendto succeeded).
    pub sent: bool,
    pub rtt: Option<Duration>,
    pub error: Option<String>,
}

/// Everything observed for one target, before judging.
#[derive(Clone, Debug)]
pub struct Probe {
    pub target: Target,
    pub route_get: KernelRoute,
    /// Interface holding exactly this address at probe time.
    pub owner: Option<String>,
    pub echoes: Vec<Echo>,
}

#[derive(Clone, Debug)]
pub struct Report {
    pub probe: Probe,
    pub verdict: Verdict,
    pub evidence: Vec<String>,
    pub tx_devs: BTreeSet<String>,
    pub rx_devs: BTreeSet<String>,
    pub contexts: BTreeMap<&'static str, u64>,
    pub requests: Vec<PacketPath>,
    pub replies: Vec<PacketPath>,
}

pub struct ProveConfig {
    pub targets: Vec<String>,
    pub netns: Option<Netns>,
    pub host: bool,
    pub count: u16,
    pub format: Format,
}

pub(super) fn drain(
    rb: &mut RingBuf<MapData>,
    tracker: &mut Tracker,
    out: &mut Vec<PacketPath>,
    intake: &mut Intake,
) -> Result<()> {
    pump(rb, intake, tracker, |ps| {
        out.append(ps);
        Ok(())
    })
}

pub(super) fn interrupted(cancel: &AtomicBool) -> Result<()> {
    if cancel.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

pub(super) fn probe_one(netns: &Netns, t: &Target, count: u16, cancel: &AtomicBool) -> Result<Probe> {
    let addr = t.addr.to_string();
    let mut args = vec!["route", "get", addr.as_str()];
    let dev_name;
    if t.scope_id != 0 {
        dev_name = local_addrs(netns)?
            .into_iter()
            .find(|a| a.ifindex == t.scope_id)
            .map(|a| a.ifname)
            .unwrap_or_default();
        args.extend(["oif", dev_name.as_str()]);
    }
    let route_get = parse_route_get(&netns.ip_json(&args)?);
    let owner = local_addrs(netns)?
        .into_iter()
        .find(|a| a.addr == t.addr)
        .map(|a| a.ifname);
    let (addr, scope, id) = (t.addr, t.scope_id, t.icmp_id);
    let echoes = netns.run(|| {
        let mut v = Vec::new();
        for seq in 1..=count {
            if cancel.load(Ordering::Relaxed) {
                break;
            }
            v.push(match icmp_echo(addr, scope, id, seq, ECHO_TIMEOUT) {
                Ok(rtt) => Echo {
                    seq,
                    sent: true,
                    rtt: Some(rtt),
                    error: None,
                },
                Err(e @ EchoError::Send { .. }) => Echo {
                    seq,
                    sent: false,
                    rtt: None,
                    error: Some(e.to_string()),
                },
                Err(e @ EchoError::NoReply(..)) => Echo {
                    seq,
                    sent: true,
                    rtt: None,
                    error: Some(e.to_string()),
                },
                Err(e @ EchoError::Socket(_)) => return Err(anyhow!("{e}")),
            });
        }
        Ok(v)
    })??;
    Ok(Probe {
        target: t.clone(),
        route_get,
        owner,
        echoes,
    })
}

pub fn run(cfg: ProveConfig, cancel: &AtomicBool) -> Result<i32> {
    privileges().require().map_err(usage)?;
    let mut ids = Ids((std::process::id() as u16).wrapping_mul(7919));
    let use_sandbox = cfg.netns.is_none() && cfg.targets.is_empty() && !cfg.host;
    let sandbox = if use_sandbox {
        remove_stale_sandboxes();
        let sb = Sandbox::new(SANDBOX_PREFIX)?;
        sb.add_veth(
            SANDBOX_DEV,
            SANDBOX_PEER,
            &[&format!("{SANDBOX_V4}/24"), &format!("{SANDBOX_V6}/64")],
            true,
        )?;
        Some(sb)
    } else {
        None
    };
    let netns = match (&sandbox, &cfg.netns) {
        (Some(sb), _) => sb.netns.clone(),
        (None, Some(n)) => n.clone(),
        (None, None) => Netns::current()?,
    };
    let steps = if sandbox.is_some() {
        sandbox_plan(&netns, &mut ids)?
    } else {
        user_plan(&netns, &cfg, &mut ids)?
    };
    let mut session = Session::open(&SessionOptions::new(netns.clone()))?;
    let missing: Vec<&str> = session.missing().map(|o| o.program).collect();
    let mut ring = session.take_ring()?;
    let mut tracker = Tracker::new(TrackerConfig::default(), session.drop_reasons.clone());
    let where_ = match &sandbox {
        Some(sb) => format!(
            "sandbox network namespace {} ({SANDBOX_DEV} {SANDBOX_V4}/24 {SANDBOX_V6}/64, veth peer {SANDBOX_PEER}, no link outside; removed afterwards)",
            sb.name
        ),
        None => format!("network namespace {} (inode {})", netns.label, netns.inode),
    };
    eprintln!(
        "lotrace prove: {where_}; {} echo request(s) per target{}",
        cfg.count,
        if missing.is_empty() {
            String::new()
        } else {
            format!("; hooks NOT attached: {}", missing.join(", "))
        }
    );
    let mut paths = Vec::new();
    let mut intake = Intake::default();
    session.start();
    let mut probes = Vec::new();
    let mut scenarios: Vec<(&'static str, String)> = Vec::new();
    for step in &steps {
        interrupted(cancel)?;
        match step {
            Step::Scenario { name, about, ip } => {
                if let Some(sb) = &sandbox {
                    for args in ip {
                        sb.ip(args)?;
                    }
                }
                scenarios.push((name, about.clone()));
            }
            Step::Probe(t) => {
                probes.push(probe_one(&netns, t, cfg.count, cancel)?);
                interrupted(cancel)?;
                drain(&mut ring, &mut tracker, &mut paths, &mut intake)?;
            }
        }
    }
    // Every program goes silent, then everything in the ring and still held.
    let kernel = session.stop(|| {
        drain(&mut ring, &mut tracker, &mut paths, &mut intake)?;
        Ok(intake.received)
    })?;
    paths.extend(tracker.flush());
    drop(session);
    drop(sandbox);

    let reports: Vec<Report> = probes.into_iter().map(|p| evaluate(p, &paths)).collect();
    let text = match cfg.format {
        Format::Json => reports.iter().map(|r| report_json(r).to_string() + "\n").collect(),
        Format::Text => render_text(&reports, &scenarios),
    };
    crate::usage::write_stdout(&text)?;
    let proven = reports.iter().filter(|r| r.verdict == Verdict::Proven).count();
    let unexpected: Vec<&Report> = reports.iter().filter(|r| !r.ok()).collect();
    let bad = intake.undecodable;
    let lost = kernel.ring_lost + kernel.scope_full + bad;
    eprintln!(
        "lotrace prove: {} target(s): {proven} proven, {} as expected; lost events {} (ring full {}, scope full {}, undecodable {bad}){}",
        reports.len(),
        reports.len() - unexpected.len(),
        lost,
        kernel.ring_lost,
        kernel.scope_full,
        if unexpected.is_empty() {
            String::new()
        } else {
            format!(
                "; NOT as expected: {}",
                unexpected
                    .iter()
                    .map(|r| format!(
                        "{} {} ({})",
                        r.probe.target.addr,
                        r.verdict.as_str(),
                        r.probe.target.scenario
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    );
    Ok(if unexpected.is_empty() { 0 } else { 1 })
}
