//! `lotrace prove`: prove with evidence from the running kernel that traffic to local addresses
//! stays on `lo`. lotrace sends its own ICMP/ICMPv6 echoes, traces them with the same engine as
//! `lotrace trace`, and judges each target from the reconstructed paths.
//!
//! The judgement (`evaluate`) is pure and unit-tested on recorded event sequences; `run` does
//! the I/O: sandbox, tracing session, echoes, `ip route get`.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, ToSocketAddrs},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Result, anyhow, bail};
use aya::maps::{MapData, RingBuf};
use serde_json::{Value, json};

use crate::{
    bpf::session::{Session, SessionOptions, privileges},
    engine::{Format, Intake, pump},
    netns::{Netns, Sandbox, list_named},
    output::{self, fmt_ns, table_name},
    path::{PacketPath, SoftirqContext, Tracker, TrackerConfig, is_echo_reply, is_echo_request},
    traffic::{EchoError, icmp_echo},
    usage::usage,
};

/// Prefix of the sandboxes `prove` creates (`lotrace-prove-PID-N`).
pub const SANDBOX_PREFIX: &str = "lotrace-prove";
/// The sandbox's interface, its veth peer and their addresses (documentation ranges: the sandbox
/// has no link to anything, so they can never collide with a real network).
pub const SANDBOX_DEV: &str = "lt0";
pub const SANDBOX_PEER: &str = "lt0p";
pub const SANDBOX_V4: &str = "192.0.2.1";
pub const SANDBOX_V6: &str = "2001:db8::1";
const ECHO_TIMEOUT: Duration = Duration::from_secs(1);

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

impl Report {
    pub fn ok(&self) -> bool {
        self.verdict == self.probe.target.expect
    }
    pub fn sent(&self) -> usize {
        self.probe.echoes.iter().filter(|e| e.sent).count()
    }
    pub fn answered(&self) -> usize {
        self.probe.echoes.iter().filter(|e| e.rtt.is_some()).count()
    }
    /// Median round-trip time measured by the sender.
    pub fn rtt(&self) -> Option<Duration> {
        let mut v: Vec<Duration> = self.probe.echoes.iter().filter_map(|e| e.rtt).collect();
        v.sort();
        v.get(v.len().saturating_sub(1) / 2).copied()
    }
    /// The request whose route stage was seen (the first request otherwise).
    pub fn first_request(&self) -> Option<&PacketPath> {
        self.requests
            .iter()
            .find(|p| p.route.is_some())
            .or(self.requests.first())
    }
    pub fn reply_to(&self, req: &PacketPath) -> Option<&PacketPath> {
        self.replies.iter().find(|r| r.reply_of == Some(req.id)).or_else(|| {
            let seq = req.info.as_ref()?.icmp?.seq;
            self.replies
                .iter()
                .find(|r| r.info.as_ref().and_then(|i| i.icmp).map(|i| i.seq) == Some(seq))
        })
    }
}

fn is_request(p: &PacketPath) -> bool {
    p.info.as_ref().is_some_and(is_echo_request)
}

fn is_reply(p: &PacketPath) -> bool {
    p.info.as_ref().is_some_and(is_echo_reply)
}

/// Judges one target from what was probed and the reconstructed paths of the whole run.
pub fn evaluate(probe: Probe, paths: &[PacketPath]) -> Report {
    let id = probe.target.icmp_id;
    let mine =
        |p: &&PacketPath| p.clone_of.is_none() && p.info.as_ref().and_then(|i| i.icmp).is_some_and(|ic| ic.id == id);
    let requests: Vec<PacketPath> = paths.iter().filter(mine).filter(|p| is_request(p)).cloned().collect();
    let replies: Vec<PacketPath> = paths.iter().filter(mine).filter(|p| is_reply(p)).cloned().collect();
    let mut tx_devs = BTreeSet::new();
    let mut rx_devs = BTreeSet::new();
    let mut contexts = BTreeMap::new();
    for p in requests.iter().chain(&replies) {
        tx_devs.extend(p.tx_dev.map(|d| d.to_string()));
        rx_devs.extend(p.rx_dev.map(|d| d.to_string()));
        if let Some(s) = &p.softirq {
            *contexts.entry(s.context.as_str()).or_insert(0) += 1;
        }
    }
    let mut r = Report {
        probe,
        verdict: Verdict::Unproven,
        evidence: Vec::new(),
        tx_devs,
        rx_devs,
        contexts,
        requests,
        replies,
    };
    let (verdict, evidence) = judge(&r);
    r.verdict = verdict;
    r.evidence = evidence;
    r
}

fn judge(r: &Report) -> (Verdict, Vec<String>) {
    let t = &r.probe.target;
    let sent = r.sent();
    let answered = r.answered();
    let req = r.first_request();
    let route_dev = req.and_then(|p| p.route.as_ref()).map(|rt| rt.dev.clone());
    // 1. Anything that left through another device disproves it, whatever came back.
    if let Some(p) = r.requests.iter().chain(&r.replies).find(|p| p.left_host()) {
        let dev = p.tx_dev.unwrap_or_default();
        let what = if is_request(p) { "request" } else { "reply" };
        let mut ev = vec![format!(
            "the echo {what} was transmitted on {dev}, not lo: it left the host through {dev}"
        )];
        if let Some(rt) = req.and_then(|p| p.route.as_ref()) {
            ev.push(format!(
                "route lookup: table {} ({}) names dev {}{}",
                rt.table,
                table_name(rt.table),
                rt.dev,
                r.probe
                    .route_get
                    .kind
                    .as_ref()
                    .map(|k| format!(", route type {k}"))
                    .unwrap_or_default()
            ));
        }
        return (Verdict::Disproven, ev);
    }
    // 2. Nothing could be sent: the kernel has no route.
    if sent == 0 {
        let why = r
            .probe
            .echoes
            .iter()
            .find_map(|e| e.error.clone())
            .unwrap_or_else(|| "no request was sent".into());
        let mut ev = vec![format!("the kernel refused to send: {why}")];
        let mut second = match &r.probe.route_get.error {
            Some(e) => format!("ip route get {}: {e}", t.addr),
            None => format!(
                "ip route get {}: {} dev {}",
                t.addr,
                r.probe.route_get.kind.as_deref().unwrap_or("?"),
                r.probe.route_get.dev.as_deref().unwrap_or("?")
            ),
        };
        if r.probe.owner.is_none() && !t.addr.is_unspecified() {
            second.push_str(&format!("; no interface holds {} now", t.addr));
        }
        ev.push(second);
        return (Verdict::Unreachable, ev);
    }
    // 3. All on lo, all answered, all traced.
    let all_lo = |ps: &[PacketPath]| {
        ps.iter()
            .all(|p| p.tx_dev.as_deref() == Some("lo") && p.rx_dev.as_deref() == Some("lo"))
    };
    let traced = r.requests.len() >= sent && r.replies.len() >= answered;
    if answered == sent && traced && all_lo(&r.requests) && all_lo(&r.replies) {
        let cpus: BTreeSet<u32> = r
            .requests
            .iter()
            .chain(&r.replies)
            .filter_map(|p| p.softirq.as_ref().map(|s| s.cpu))
            .collect();
        let cpus = cpus.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(",");
        let mut ev = vec![format!(
            "all {} requests and {} replies were transmitted on lo (loopback_xmit), queued to the backlog of cpu {cpus} and received on lo; nothing left the host",
            r.requests.len(),
            r.replies.len()
        )];
        let header_dst = req.and_then(|p| p.info.as_ref()).map(|i| i.dst);
        if t.addr.is_unspecified() {
            ev.push(format!(
                "{} is not a real destination: the kernel rewrote it to {} (packet header) and sent it to lo without a FIB lookup",
                t.addr,
                header_dst.map(|d| d.to_string()).unwrap_or_else(|| "?".into())
            ));
        } else if let Some(dev) = route_dev.as_deref().filter(|d| *d != "lo") {
            ev.push(format!(
                "the {} route names {dev} (the interface owning {}), yet the kernel transmitted on lo: local delivery always goes through the loopback device{}",
                r.probe.route_get.kind.as_deref().unwrap_or("local"),
                t.addr,
                if t.scenario == "no-carrier" {
                    format!(", so {dev} having no carrier does not matter")
                } else if t.scenario == "admin-down" {
                    format!(", so {dev} being down does not matter")
                } else {
                    String::new()
                }
            ));
        } else if let Some(dev) = route_dev {
            ev.push(format!(
                "the route lookup (table {}) named dev {dev}",
                req.and_then(|p| p.route.as_ref())
                    .map(|rt| format!("{} {}", rt.table, table_name(rt.table)))
                    .unwrap_or_default()
            ));
        }
        return (Verdict::Proven, ev);
    }
    // 4. Not enough to say.
    let mut ev = Vec::new();
    if answered < sent {
        ev.push(format!("{} of {sent} echo requests got no reply", sent - answered));
    }
    if !traced {
        ev.push(format!(
            "traced {} of {sent} requests and {} of {answered} replies (see lost events)",
            r.requests.len(),
            r.replies.len()
        ));
    }
    if let Some(p) = r
        .requests
        .iter()
        .chain(&r.replies)
        .find(|p| p.tx_dev.as_deref() != Some("lo") || p.rx_dev.as_deref() != Some("lo"))
    {
        ev.push(format!(
            "packet {} was transmitted on {} and received on {}",
            p.id,
            p.tx_dev.as_deref().unwrap_or("(not seen)"),
            p.rx_dev.as_deref().unwrap_or("(not seen)")
        ));
    }
    if ev.is_empty() {
        ev.push("no evidence collected".into());
    }
    (Verdict::Unproven, ev)
}

// ---------------------------------------------------------------------------------------------
// Targets: parsing, resolving, listing local addresses.

/// A target as the user wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Spec {
    Addr(IpAddr, Option<String>),
    Name(String),
}

/// `ADDR`, `ADDR%IFACE` (IPv6 link-local) or a host name. Anything that looks like an address but
/// is not one is rejected here rather than handed to the resolver (glibc reads "1.2.3" as 1.2.0.3).
pub fn parse_spec(s: &str) -> Result<Spec> {
    let (a, scope) = match s.split_once('%') {
        Some((a, i)) => (a, Some(i)),
        None => (s, None),
    };
    if let Ok(ip) = a.parse::<IpAddr>() {
        if let Some(i) = scope {
            crate::netns::validate_name(i).map_err(|_| anyhow!("malformed interface name {i:?} in target {s:?}"))?;
            if !ip.is_ipv6() {
                bail!("malformed target {s:?}: %interface only applies to IPv6 addresses");
            }
        }
        return Ok(Spec::Addr(ip, scope.map(str::to_string)));
    }
    let numeric = !s.is_empty() && s.chars().all(|c| c.is_ascii_digit() || c == '.');
    if numeric || s.contains(':') || scope.is_some() {
        bail!("malformed address {s:?}");
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    let name = s.strip_suffix('.').unwrap_or(s);
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        bail!("malformed target {s:?}: not an IP address or host name");
    }
    Ok(Spec::Name(s.to_string()))
}

/// Where a name's address came from: the /etc/hosts line, else the resolver configuration.
fn name_source(name: &str, addr: IpAddr) -> String {
    if let Ok(hosts) = std::fs::read_to_string("/etc/hosts") {
        for (n, line) in hosts.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("");
            let mut words = line.split_whitespace();
            if words.next().and_then(|a| a.parse::<IpAddr>().ok()) == Some(addr)
                && words.any(|w| w.eq_ignore_ascii_case(name))
            {
                return format!(
                    "/etc/hosts:{} ({})",
                    n + 1,
                    line.split_whitespace().collect::<Vec<_>>().join(" ")
                );
            }
        }
    }
    let nss = std::fs::read_to_string("/etc/nsswitch.conf")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.trim()
                    .strip_prefix("hosts:")
                    .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            })
        })
        .unwrap_or_else(|| "?".into());
    format!("system resolver (nsswitch hosts: {nss})")
}

/// Resolves a name with the system resolver (getaddrinfo) inside `netns`, so a sandbox's lookups
/// cannot reach any outside DNS server.
fn resolve(netns: &Netns, name: &str) -> Result<Vec<(IpAddr, String)>> {
    let n = name.to_string();
    let found = netns.run(move || (n.as_str(), 0u16).to_socket_addrs().map(|it| it.collect::<Vec<_>>()))?;
    let addrs = found.map_err(|e| usage(format!("cannot resolve {name:?}: {e}")))?;
    let mut out: Vec<(IpAddr, String)> = Vec::new();
    for a in addrs {
        if !out.iter().any(|(x, _)| *x == a.ip()) {
            out.push((a.ip(), name_source(name, a.ip())));
        }
    }
    if out.is_empty() {
        return Err(usage(format!("cannot resolve {name:?}: no address")));
    }
    Ok(out)
}

/// One address of one interface (`ip -j addr show`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalAddr {
    pub ifname: String,
    pub ifindex: u32,
    pub addr: IpAddr,
    /// Why it cannot be used yet (tentative, dadfailed), if so.
    pub unusable: Option<String>,
}

/// Parses `ip -j addr show` output.
pub fn parse_addrs(v: &Value) -> Vec<LocalAddr> {
    let mut out = Vec::new();
    for link in v.as_array().into_iter().flatten() {
        let ifname = link["ifname"].as_str().unwrap_or("?").to_string();
        let ifindex = link["ifindex"].as_u64().unwrap_or(0) as u32;
        for a in link["addr_info"].as_array().into_iter().flatten() {
            let Some(addr) = a["local"].as_str().and_then(|s| s.parse::<IpAddr>().ok()) else {
                continue;
            };
            let unusable = ["tentative", "dadfailed"]
                .into_iter()
                .find(|f| a[*f].as_bool() == Some(true))
                .map(str::to_string);
            out.push(LocalAddr {
                ifname: ifname.clone(),
                ifindex,
                addr,
                unusable,
            });
        }
    }
    out
}

fn local_addrs(netns: &Netns) -> Result<Vec<LocalAddr>> {
    match netns.ip_json(&["addr", "show"])? {
        Ok(v) => Ok(parse_addrs(&v)),
        Err(e) => bail!("ip addr show: {e}"),
    }
}

/// Parses `ip -j route get` output.
pub fn parse_route_get(v: &std::result::Result<Value, String>) -> KernelRoute {
    match v {
        Err(e) => KernelRoute {
            error: Some(e.clone()),
            ..Default::default()
        },
        Ok(v) => {
            let r = &v[0];
            let s = |k: &str| r[k].as_str().map(str::to_string);
            KernelRoute {
                // `ip -j` leaves the type out for ordinary unicast routes.
                kind: s("type").or_else(|| Some("unicast".into())),
                // IPv4 answers omit the table when it is main.
                table: s("table").or_else(|| r.get("dst").map(|_| "main".to_string())),
                dev: s("dev"),
                error: None,
            }
        }
    }
}

fn is_link_local(a: &IpAddr) -> bool {
    matches!(a, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

// ---------------------------------------------------------------------------------------------
// Running it.

pub struct ProveConfig {
    pub targets: Vec<String>,
    pub netns: Option<Netns>,
    pub host: bool,
    pub count: u16,
    pub format: Format,
}

enum Step {
    /// Change the sandbox's state, then describe it.
    Scenario {
        name: &'static str,
        about: String,
        ip: Vec<Vec<&'static str>>,
    },
    Probe(Target),
}

/// Removes sandboxes left by a `prove` that was killed (kill -9 cannot be caught).
fn remove_stale_sandboxes() {
    for name in list_named() {
        let Some(rest) = name.strip_prefix(&format!("{SANDBOX_PREFIX}-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let ok = std::process::Command::new("ip")
                .args(["netns", "del", &name])
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                eprintln!("lotrace: removed sandbox {name} left by a killed run (pid {pid})");
            }
        }
    }
}

struct Ids(u16);
impl Ids {
    fn next(&mut self) -> u16 {
        self.0 = self.0.wrapping_add(1);
        self.0
    }
}

fn literal(scenario: &'static str, addr: &str, ids: &mut Ids, expect: Verdict) -> Target {
    Target {
        scenario,
        spec: addr.to_string(),
        addr: addr.parse().expect("built-in address"),
        scope_id: 0,
        source: "literal".into(),
        expect,
        icmp_id: ids.next(),
    }
}

/// The default plan inside a fresh sandbox: three states of its interface.
fn sandbox_plan(netns: &Netns, ids: &mut Ids) -> Result<Vec<Step>> {
    use Verdict::*;
    let mut steps = vec![Step::Scenario {
        name: "up",
        about: format!("{SANDBOX_DEV} up, carrier up (veth peer {SANDBOX_PEER} up)"),
        ip: vec![],
    }];
    for a in ["127.0.0.1", "127.1.2.3", "::1", SANDBOX_V4, SANDBOX_V6] {
        let mut t = literal("up", a, ids, Proven);
        if a == SANDBOX_V4 || a == SANDBOX_V6 {
            t.source = format!("address of {SANDBOX_DEV}");
        }
        steps.push(Step::Probe(t));
    }
    for (addr, source) in resolve(netns, "localhost")? {
        steps.push(Step::Probe(Target {
            scenario: "up",
            spec: "localhost".into(),
            addr,
            scope_id: 0,
            source,
            expect: Proven,
            icmp_id: ids.next(),
        }));
    }
    steps.push(Step::Probe(literal("up", "0.0.0.0", ids, Proven)));
    steps.push(Step::Scenario {
        name: "no-carrier",
        about: format!("cable pulled: {SANDBOX_PEER} set down, so {SANDBOX_DEV} is up but NO-CARRIER"),
        ip: vec![vec!["link", "set", SANDBOX_PEER, "down"]],
    });
    for a in ["127.0.0.1", SANDBOX_V4, SANDBOX_V6] {
        let mut t = literal("no-carrier", a, ids, Proven);
        if a != "127.0.0.1" {
            t.source = format!("address of {SANDBOX_DEV}");
        }
        steps.push(Step::Probe(t));
    }
    steps.push(Step::Scenario {
        name: "admin-down",
        about: format!("{SANDBOX_DEV} set administratively down"),
        ip: vec![vec!["link", "set", SANDBOX_DEV, "down"]],
    });
    let mut t = literal("admin-down", SANDBOX_V4, ids, Proven);
    t.source = format!("address of {SANDBOX_DEV} (IPv4 keeps it while down)");
    steps.push(Step::Probe(t));
    let mut t = literal("admin-down", SANDBOX_V6, ids, Unreachable);
    t.source = format!("address of {SANDBOX_DEV} until it went down");
    steps.push(Step::Probe(t));
    Ok(steps)
}

/// The plan for `--target`s and/or `--host` in an existing namespace.
fn user_plan(netns: &Netns, cfg: &ProveConfig, ids: &mut Ids) -> Result<Vec<Step>> {
    let mut steps = Vec::new();
    let mut links: Option<Vec<LocalAddr>> = None;
    for spec in &cfg.targets {
        match parse_spec(spec).map_err(usage)? {
            Spec::Addr(addr, scope) => {
                let scope_id = match scope {
                    Some(ifname) => {
                        let l = links.get_or_insert(local_addrs(netns)?);
                        l.iter()
                            .find(|a| a.ifname == ifname)
                            .map(|a| a.ifindex)
                            .ok_or_else(|| usage(format!("no interface {ifname:?} with addresses in the namespace")))?
                    }
                    None if is_link_local(&addr) => {
                        return Err(usage(format!(
                            "{spec}: a link-local address needs its interface, e.g. {spec}%eth0"
                        )));
                    }
                    None => 0,
                };
                steps.push(Step::Probe(Target {
                    scenario: "given",
                    spec: spec.clone(),
                    addr,
                    scope_id,
                    source: "literal".into(),
                    expect: Verdict::Proven,
                    icmp_id: ids.next(),
                }));
            }
            Spec::Name(name) => {
                for (addr, source) in resolve(netns, &name)? {
                    steps.push(Step::Probe(Target {
                        scenario: "given",
                        spec: name.clone(),
                        addr,
                        scope_id: 0,
                        source,
                        expect: Verdict::Proven,
                        icmp_id: ids.next(),
                    }));
                }
            }
        }
    }
    if cfg.host {
        for a in local_addrs(netns)? {
            if let Some(why) = &a.unusable {
                eprintln!("lotrace: skipping {} on {}: address is {why}", a.addr, a.ifname);
                continue;
            }
            steps.push(Step::Probe(Target {
                scenario: "host",
                spec: format!("{} ({})", a.addr, a.ifname),
                addr: a.addr,
                scope_id: if is_link_local(&a.addr) { a.ifindex } else { 0 },
                source: format!("address of {}", a.ifname),
                expect: Verdict::Proven,
                icmp_id: ids.next(),
            }));
        }
    }
    if steps.is_empty() {
        return Err(usage("nothing to prove: the namespace has no usable local address"));
    }
    Ok(steps)
}

fn drain(
    rb: &mut RingBuf<MapData>,
    tracker: &mut Tracker,
    out: &mut Vec<PacketPath>,
    intake: &mut Intake,
) -> Result<()> {
    pump(rb, intake, tracker, |ps| {
        out.extend(ps);
        Ok(())
    })
}

fn interrupted(cancel: &AtomicBool) -> Result<()> {
    if cancel.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

fn probe_one(netns: &Netns, t: &Target, count: u16, cancel: &AtomicBool) -> Result<Probe> {
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
    // Let the last frees land, then take everything.
    std::thread::sleep(Duration::from_millis(50));
    drain(&mut ring, &mut tracker, &mut paths, &mut intake)?;
    paths.extend(tracker.flush());
    let kernel = session.counters()?;
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

// ---------------------------------------------------------------------------------------------
// Output.

fn stages_json(p: Option<&PacketPath>) -> Value {
    p.map(output::stages_json).unwrap_or_else(|| Value::Array(Vec::new()))
}

/// One object per target (schema in the README, "prove JSON").
pub fn report_json(r: &Report) -> Value {
    let t = &r.probe.target;
    let req = r.first_request();
    let rt = req.and_then(|p| p.route.as_ref());
    let lookup = rt.map(|_| {
        if t.addr.is_ipv6() {
            "fib6_table_lookup"
        } else {
            "fib_table_lookup"
        }
    });
    json!({
        "scenario": t.scenario,
        "target": t.spec,
        "address": t.addr.to_string(),
        "source": t.source,
        "verdict": r.verdict.as_str(),
        "expected": t.expect.as_str(),
        "ok": r.ok(),
        "evidence": r.evidence,
        "route": {
            "table": rt.map(|x| x.table),
            "table_name": rt.map(|x| table_name(x.table)),
            "dev": rt.map(|x| x.dev.clone()),
            "lookup": lookup,
            "type": r.probe.route_get.kind,
            "kernel_table": r.probe.route_get.table,
            "kernel_dev": r.probe.route_get.dev,
            "error": r.probe.route_get.error,
        },
        "owner": r.probe.owner,
        "tx_devs": r.tx_devs,
        "rx_devs": r.rx_devs,
        "softirq": req.and_then(|p| p.softirq.as_ref()).map(|s| json!({
            "cpu": s.cpu, "context": s.context.as_str(), "task": s.task, "pid": s.pid,
        })),
        "softirq_contexts": r.contexts,
        "sent": r.sent(),
        "replies": r.answered(),
        "traced": {"requests": r.requests.len(), "replies": r.replies.len()},
        "rtt_ns": r.rtt().map(|d| d.as_nanos() as u64),
        "stages": stages_json(req),
        "reply_stages": stages_json(req.and_then(|q| r.reply_to(q))),
        "errors": r.probe.echoes.iter().filter_map(|e| e.error.clone()).collect::<BTreeSet<_>>(),
    })
}

fn path_line(p: &PacketPath) -> String {
    p.timed_stages()
        .enumerate()
        .map(|(i, (s, d))| {
            if i == 0 {
                s.stage.to_string()
            } else {
                format!("{} +{}", s.stage, fmt_ns(d))
            }
        })
        .collect::<Vec<_>>()
        .join(" > ")
}

fn softirq_line(p: &PacketPath) -> Option<String> {
    let s = p.softirq.as_ref()?;
    let how = match s.context {
        SoftirqContext::Inline => format!("inline in the sending task {}[{}]", s.task, s.pid),
        SoftirqContext::Ksoftirqd => format!("by {}", s.task),
        SoftirqContext::Other => format!("in another context ({}[{}])", s.task, s.pid),
    };
    Some(format!("NET_RX on cpu {} {how}", s.cpu))
}

pub fn render_text(reports: &[Report], scenarios: &[(&'static str, String)]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let mut last = "";
    for r in reports {
        let t = &r.probe.target;
        if t.scenario != last {
            last = t.scenario;
            let about = scenarios
                .iter()
                .find(|(n, _)| *n == t.scenario)
                .map(|(_, a)| a.as_str())
                .unwrap_or(t.scenario);
            let _ = writeln!(s, "\n== {about}");
        }
        let expect = if r.ok() || t.expect == Verdict::Proven {
            if r.ok() && t.expect != Verdict::Proven {
                " (expected)"
            } else {
                ""
            }
        } else {
            " (NOT as expected)"
        };
        let name = if t.spec == t.addr.to_string() {
            t.spec.clone()
        } else {
            format!("{} -> {}", t.spec, t.addr)
        };
        let _ = writeln!(
            s,
            "{:<12}{name}  [{}]  {}/{} replies{}{expect}",
            r.verdict.as_str(),
            t.source,
            r.answered(),
            r.probe.echoes.len(),
            r.rtt()
                .map(|d| format!(", rtt {}", fmt_ns(d.as_nanos() as u64)))
                .unwrap_or_default(),
        );
        let req = r.first_request();
        let mut route = match req.and_then(|p| p.route.as_ref()) {
            Some(rt) => format!(
                "table {} ({}), names dev {} [{}]",
                rt.table,
                table_name(rt.table),
                rt.dev,
                if t.addr.is_ipv6() {
                    "fib6_table_lookup"
                } else {
                    "fib_table_lookup"
                }
            ),
            None => "no FIB lookup traced".into(),
        };
        match (&r.probe.route_get.kind, &r.probe.route_get.error) {
            (_, Some(e)) => {
                let _ = write!(route, "; ip route get: {e}");
            }
            (Some(k), None) => {
                let _ = write!(
                    route,
                    "; ip route get: {k} dev {}",
                    r.probe.route_get.dev.as_deref().unwrap_or("?")
                );
            }
            _ => {}
        }
        let _ = writeln!(s, "            route    {route}");
        if !r.tx_devs.is_empty() || !r.rx_devs.is_empty() {
            let devs = |d: &BTreeSet<String>| {
                if d.is_empty() {
                    "-".to_string()
                } else {
                    d.iter().cloned().collect::<Vec<_>>().join(",")
                }
            };
            let _ = writeln!(
                s,
                "            devices  transmitted on {}, received on {}",
                devs(&r.tx_devs),
                devs(&r.rx_devs)
            );
        }
        if let Some(line) = req.and_then(softirq_line) {
            let _ = writeln!(s, "            softirq  {line}");
        }
        if let Some(p) = req {
            let _ = writeln!(s, "            request  {}", path_line(p));
            if let Some(rep) = r.reply_to(p) {
                let _ = writeln!(s, "            reply    {}", path_line(rep));
            }
        }
        for e in &r.evidence {
            let _ = writeln!(s, "            why      {e}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use loopback_common::Hook;

    use super::*;
    use crate::path::tests::{Seq, icmp_info, raw_ping_sequence};

    fn paths(events: Vec<crate::decode::Event>) -> Vec<PacketPath> {
        let mut t = Tracker::new(
            TrackerConfig::default(),
            std::collections::HashMap::from([(2, "NO_SOCKET".to_string())]),
        );
        let mut out = Vec::new();
        for e in events {
            out.extend(t.push(e));
        }
        out.extend(t.flush());
        out
    }

    fn probe(addr: &str, id: u16, echoes: Vec<Echo>) -> Probe {
        Probe {
            target: Target {
                scenario: "up",
                spec: addr.into(),
                addr: addr.parse().unwrap(),
                scope_id: 0,
                source: "literal".into(),
                expect: Verdict::Proven,
                icmp_id: id,
            },
            route_get: KernelRoute {
                kind: Some("local".into()),
                table: Some("local".into()),
                dev: Some("lo".into()),
                error: None,
            },
            owner: Some("lo".into()),
            echoes,
        }
    }

    fn answered(n: u16) -> Vec<Echo> {
        (1..=n)
            .map(|seq| Echo {
                seq,
                sent: true,
                rtt: Some(Duration::from_micros(20 + seq as u64)),
                error: None,
            })
            .collect()
    }

    #[test]
    fn a_ping_through_lo_is_proven() {
        let r = evaluate(probe("127.0.0.1", 77, answered(1)), &paths(raw_ping_sequence()));
        assert_eq!(r.verdict, Verdict::Proven, "{:?}", r.evidence);
        assert!(r.ok());
        assert_eq!(r.requests.len(), 1);
        assert_eq!(r.replies.len(), 1);
        assert_eq!(r.tx_devs, BTreeSet::from(["lo".to_string()]));
        assert_eq!(r.rx_devs, BTreeSet::from(["lo".to_string()]));
        assert!(r.evidence[0].contains("backlog of cpu 0"), "{:?}", r.evidence);
        assert_eq!(r.contexts.get("inline"), Some(&2), "request and reply");
        let j = report_json(&r);
        assert_eq!(j["verdict"], "PROVEN");
        assert_eq!(j["tx_devs"][0], "lo");
        assert_eq!(j["stages"][0]["stage"], "tc_egress");
        assert_eq!(j["reply_stages"][0]["stage"], "tc_egress");
        assert_eq!(j["rtt_ns"], 21_000);
    }

    #[test]
    fn packets_of_other_targets_are_not_evidence() {
        // Same trace, but the target used another ICMP id: nothing of it was traced.
        let r = evaluate(probe("127.0.0.1", 78, answered(1)), &paths(raw_ping_sequence()));
        assert_eq!(r.verdict, Verdict::Unproven);
        assert!(
            r.evidence.iter().any(|e| e.contains("traced 0 of 1")),
            "{:?}",
            r.evidence
        );
    }

    #[test]
    fn a_request_leaving_through_a_veth_is_disproven_and_names_it() {
        let mut s = Seq::new();
        let req = icmp_info("198.51.100.1", "198.51.100.2", 8, 9, 1);
        s.ev(Hook::DevQueue, 0xa0, 1, "lotrace", "lra", Some(req), 0, 0);
        s.ev(Hook::Xmit, 0xa0, 1, "lotrace", "lra", None, 0, 0);
        s.ev(Hook::BacklogEnqueue, 0xa0, 1, "lotrace", "", None, 0, 0);
        s.ev(Hook::LeftNetns, 0xa0, 1, "lotrace", "lrb", None, 0, 0);
        let rep = icmp_info("198.51.100.2", "198.51.100.1", 0, 9, 1);
        s.ev(Hook::Receive, 0xb0, 1, "lotrace", "lra", Some(rep), 0, 0);
        s.ev(Hook::Consume, 0xb0, 1, "lotrace", "", None, 0, 0);
        let ps = paths(s.events);
        assert_eq!(ps[0].verdict.as_str(), "left_netns");
        let r = evaluate(probe("198.51.100.2", 9, answered(1)), &ps);
        assert_eq!(r.verdict, Verdict::Disproven);
        assert!(!r.ok());
        assert!(r.evidence[0].contains("transmitted on lra"), "{:?}", r.evidence);
        assert_eq!(r.tx_devs, BTreeSet::from(["lra".to_string()]));
    }

    #[test]
    fn a_refused_send_is_unreachable_with_the_route_answer() {
        let mut p = probe("2001:db8::1", 5, vec![]);
        p.echoes = vec![Echo {
            seq: 1,
            sent: false,
            rtt: None,
            error: Some("sendto 2001:db8::1: Network is unreachable (os error 101)".into()),
        }];
        p.route_get = parse_route_get(&Err("Network is unreachable".into()));
        p.owner = None;
        p.target.expect = Verdict::Unreachable;
        let r = evaluate(p, &[]);
        assert_eq!(r.verdict, Verdict::Unreachable);
        assert!(r.ok());
        assert!(r.evidence[0].contains("Network is unreachable"));
        assert!(
            r.evidence[1].contains("no interface holds 2001:db8::1"),
            "{:?}",
            r.evidence
        );
    }

    #[test]
    fn an_unanswered_echo_is_not_proven() {
        let mut echoes = answered(1);
        echoes.push(Echo {
            seq: 2,
            sent: true,
            rtt: None,
            error: Some("no echo reply".into()),
        });
        let r = evaluate(probe("127.0.0.1", 77, echoes), &paths(raw_ping_sequence()));
        assert_eq!(r.verdict, Verdict::Unproven);
        assert!(
            r.evidence
                .iter()
                .any(|e| e.contains("1 of 2 echo requests got no reply"))
        );
    }

    #[test]
    fn zero_address_evidence_names_the_rewritten_destination() {
        let r = evaluate(probe("0.0.0.0", 77, answered(1)), &paths(raw_ping_sequence()));
        assert_eq!(r.verdict, Verdict::Proven);
        assert!(r.evidence[1].contains("rewrote it to 127.0.0.1"), "{:?}", r.evidence);
    }

    #[test]
    fn targets_are_parsed_strictly() {
        assert_eq!(
            parse_spec("127.0.0.1").unwrap(),
            Spec::Addr("127.0.0.1".parse().unwrap(), None)
        );
        assert_eq!(
            parse_spec("fe80::1%lt0").unwrap(),
            Spec::Addr("fe80::1".parse().unwrap(), Some("lt0".into()))
        );
        assert_eq!(parse_spec("localhost").unwrap(), Spec::Name("localhost".into()));
        assert_eq!(parse_spec("a.example.").unwrap(), Spec::Name("a.example.".into()));
        for bad in [
            "300.1.2.3",
            "1.2.3",
            "::g",
            "",
            "a b",
            "-x",
            "a..b",
            "1.2.3.4%lo",
            "fe80::1%a/b",
        ] {
            assert!(parse_spec(bad).is_err(), "{bad:?} accepted");
        }
        assert!(
            parse_spec("1.2.3")
                .unwrap_err()
                .to_string()
                .contains("malformed address")
        );
    }

    #[test]
    fn ip_json_answers_are_parsed() {
        let v: Value = serde_json::from_str(
            r#"[{"ifindex":1,"ifname":"lo","addr_info":[{"family":"inet","local":"127.0.0.1"},
                {"family":"inet6","local":"::1"}]},
               {"ifindex":3,"ifname":"lt0","addr_info":[{"family":"inet6","local":"fe80::1","tentative":true}]}]"#,
        )
        .unwrap();
        let a = parse_addrs(&v);
        assert_eq!(a.len(), 3);
        assert_eq!(a[2].ifindex, 3);
        assert_eq!(a[2].unusable.as_deref(), Some("tentative"));
        assert_eq!(a[0].unusable, None);
        let r = parse_route_get(&Ok(serde_json::from_str(
            r#"[{"type":"local","dst":"192.0.2.1","dev":"lo","prefsrc":"192.0.2.1"}]"#,
        )
        .unwrap()));
        assert_eq!(r.kind.as_deref(), Some("local"));
        assert_eq!(r.table.as_deref(), Some("main"));
        assert_eq!(r.dev.as_deref(), Some("lo"));
        let r = parse_route_get(&Ok(
            serde_json::from_str(r#"[{"dst":"198.51.100.2","dev":"lra"}]"#).unwrap()
        ));
        assert_eq!(r.kind.as_deref(), Some("unicast"));
    }
}
