//! What a scrape returns: the kernel's per-namespace counters, read at the scrape and encoded by
//! `prometheus-client` (OpenMetrics text). The names, labels and their bounds are listed in
//! docs/agent.md; `every_metric_is_documented` keeps the two in step.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use loopback_common::agent::{
    self, CONTEXT_NAMES, DELIVERY_NAMES, DropKey, ESCAPE_NAMES, LocalAddr, NetnsCounters, PROTO_NAMES, STAGE_NAMES,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};

use super::{
    bpf::{AgentBpf, AgentMaps},
    discover::{self, Found, Wanted},
};
use crate::owner::{self, CgroupOwner, Names, Owner, Sources};

/// Lowest histogram bound exported: 2^7 ns = 128 ns (the kernel's finer buckets are summed
/// into it); the highest is 2^30 ns, about 1.07 s; above it, +Inf.
const FIRST_BOUND_LOG2: usize = 7;

/// Every this many scans, each namespace's addresses are read again (a new namespace's at once).
const ADDRS_EVERY: u64 = 5;

/// Everything the agent knows, shared by the scanner and the scrapes.
pub struct State {
    pub bpf: AgentBpf,
    pub maps: AgentMaps,
    pub proc: PathBuf,
    pub run_netns: PathBuf,
    /// `--netns`: None watches every namespace.
    pub wanted: Option<Vec<Wanted>>,
    /// The last scan's namespaces (within `--netns`).
    pub found: BTreeMap<u32, Found>,
    /// Namespaces any scan found (one that is gone is released at once).
    ever_found: BTreeSet<u32>,
    /// Namespaces the kernel counted that no scan found: their packet count at the last scan
    /// (released once it stops moving).
    unfound: HashMap<u32, u64>,
    /// Namespaces released because they went away.
    pub released: u64,
    pub scans: u64,
    pids: discover::PidCache,
    /// Each namespace's own interface addresses as `AGENT_LOCAL` holds them.
    pub local: HashMap<u32, BTreeSet<LocalAddr>>,
    /// Where owners' names come from, and what they said last.
    pub sources: Sources,
    pub names: Names,
    /// What the cgroups of each namespace's process (the lowest pid) name, read once per pid.
    cgroups: HashMap<u32, (u32, CgroupOwner)>,
    /// Each found namespace's owner, from `cgroups` and `names` (again at every scan and CRI
    /// listing).
    pub owners: BTreeMap<u32, Owner>,
    /// A cgroup names a container or pod no source knows yet: the CRI listing is due now.
    pub cri_due: bool,
    /// When the CRI sockets were last listed, and the ids they did not know then (asked
    /// again only at the next periodic listing).
    pub cri_listed: Option<Instant>,
    cri_unknown: BTreeSet<String>,
    /// Each CRI socket's listings and failures so far.
    pub cri_health: BTreeMap<PathBuf, owner::CriCounts>,
    /// Namespaces that went away: their last counters, still served for `forget_after`.
    gone: HashMap<u32, Gone>,
    /// OTLP exports (`--otlp`): sent, dropped.
    pub otlp_exports: (u64, u64),
    pub otlp: bool,
    pub forget_after: Duration,
}

/// Every namespace's counters now (gone ones' last), drops by name, owners: what an export
/// carries.
pub struct Snapshot {
    pub totals: Vec<(u32, NetnsCounters)>,
    /// (namespace, drop reason, count), copies delivered aside.
    pub drops: Vec<(u32, String, u64)>,
    /// (namespace, packets freed as dropped while a copy was delivered).
    pub copies: Vec<(u32, u64)>,
    pub owners: BTreeMap<u32, Owner>,
}

impl State {
    pub fn snapshot(&self) -> Snapshot {
        let mut totals = self.maps.netns_totals();
        let live: BTreeSet<u32> = totals.iter().map(|(k, _)| *k).collect();
        totals.extend(
            self.gone
                .iter()
                .filter(|(k, _)| !live.contains(k))
                .map(|(k, g)| (*k, g.counters)),
        );
        totals.sort_by_key(|(k, _)| *k);
        let mut all = self.maps.drop_totals();
        let live: BTreeSet<u32> = all.iter().map(|(k, _)| k.netns).collect();
        for (ino, g) in &self.gone {
            if !live.contains(ino) {
                all.extend(g.drops.iter().cloned());
            }
        }
        let mut copies: Vec<(u32, u64)> = all
            .iter()
            .filter(|(k, _)| k.reason == agent::COPY_DELIVERED)
            .map(|(k, n)| (k.netns, *n))
            .collect();
        copies.sort();
        let mut drops: Vec<(u32, String, u64)> = all
            .into_iter()
            .filter(|(k, _)| k.reason != agent::COPY_DELIVERED)
            .map(|(k, n)| {
                let r = self
                    .bpf
                    .drop_reasons
                    .get(&(k.reason as u64))
                    .cloned()
                    .unwrap_or_else(|| k.reason.to_string());
                (k.netns, r, n)
            })
            .collect();
        drops.sort();
        let mut owners = self.owners.clone();
        for (ino, g) in &self.gone {
            owners.entry(*ino).or_insert_with(|| g.owner.clone());
        }
        Snapshot {
            totals,
            drops,
            copies,
            owners,
        }
    }
}

/// A namespace that went away, as it was last counted.
#[derive(Clone, Debug)]
struct Gone {
    at: Instant,
    counters: NetnsCounters,
    drops: Vec<(DropKey, u64)>,
    owner: Owner,
}

impl State {
    pub fn new(
        bpf: AgentBpf,
        maps: AgentMaps,
        wanted: Option<Vec<Wanted>>,
        sources: Sources,
        forget_after: Duration,
    ) -> Self {
        Self {
            bpf,
            maps,
            proc: PathBuf::from("/proc"),
            run_netns: PathBuf::from("/run/netns"),
            wanted,
            found: BTreeMap::new(),
            ever_found: BTreeSet::new(),
            unfound: HashMap::new(),
            released: 0,
            scans: 0,
            pids: discover::PidCache::default(),
            local: HashMap::new(),
            sources,
            names: Names::default(),
            cgroups: HashMap::new(),
            owners: BTreeMap::new(),
            cri_due: true,
            cri_listed: None,
            cri_unknown: BTreeSet::new(),
            cri_health: BTreeMap::new(),
            gone: HashMap::new(),
            forget_after,
            otlp_exports: (0, 0),
            otlp: false,
        }
    }

    /// Looks for namespaces again: new ones are allowed in (with `--netns`), gone ones released.
    pub fn rescan(&mut self) {
        let mut found = discover::scan_with(&self.proc, &self.run_netns, &mut self.pids);
        if let Some(wanted) = &self.wanted {
            let inodes: BTreeSet<u32> = wanted.iter().filter_map(|w| w.resolve(&self.run_netns)).collect();
            found.retain(|ino, _| inodes.contains(ino));
            // A wanted namespace that no scan finds (held only by a file descriptor) is still
            // wanted: it is listed under the name it was given.
            for (w, ino) in wanted.iter().filter_map(|w| Some((w, w.resolve(&self.run_netns)?))) {
                found.entry(ino).or_insert_with(|| Found {
                    pid: None,
                    source: "netns",
                    name: match w {
                        Wanted::Name(n) => n.clone(),
                        Wanted::Path(p) => p.display().to_string(),
                        Wanted::Inode(i) => i.to_string(),
                    },
                });
            }
            let allowed: BTreeSet<u32> = self.maps.allow.keys().filter_map(|k| k.ok()).collect();
            for ino in found.keys().filter(|i| !allowed.contains(i)) {
                let _ = self.maps.allow.insert(*ino, 1, 0);
            }
            for ino in allowed.iter().filter(|i| !found.contains_key(i)) {
                let _ = self.maps.allow.remove(ino);
            }
        }
        // The namespace map is read once (every CPU's value of every key).
        let full: HashMap<u32, NetnsCounters> = self.maps.netns_totals().into_iter().collect();
        let totals: HashMap<u32, u64> = full
            .iter()
            .map(|(k, c)| (*k, c.packets.iter().sum::<u64>() + c.backlog_enqueues))
            .collect();
        let drops = self.maps.drop_totals();
        let mut counted: BTreeSet<u32> = totals.keys().copied().collect();
        counted.extend(drops.iter().map(|(k, _)| k.netns));
        let now_t = Instant::now();
        for ino in counted.into_iter().filter(|i| !found.contains_key(i)) {
            let now = totals.get(&ino).copied().unwrap_or(0);
            let gone = self.ever_found.contains(&ino);
            let idle = self.unfound.get(&ino) == Some(&now);
            if gone || idle {
                if gone && !self.forget_after.is_zero() {
                    // Its last counts stay served for a while: the scrape after it went away
                    // still sees what it did last.
                    self.gone.insert(
                        ino,
                        Gone {
                            at: now_t,
                            counters: full.get(&ino).copied().unwrap_or(NetnsCounters::ZERO),
                            drops: drops.iter().filter(|(k, _)| k.netns == ino).cloned().collect(),
                            owner: self
                                .owners
                                .get(&ino)
                                .cloned()
                                .unwrap_or_else(|| Owner::unowned("process")),
                        },
                    );
                }
                self.maps.release(ino);
                self.unfound.remove(&ino);
                self.ever_found.remove(&ino);
                self.released += 1;
            } else {
                self.unfound.insert(ino, now);
            }
        }
        for ino in self.ever_found.clone() {
            if !found.contains_key(&ino) {
                self.ever_found.remove(&ino);
                self.released += 1;
            }
        }
        self.ever_found.extend(found.keys().copied());
        let forget = self.forget_after;
        // A namespace found again under a gone one's inode (the kernel reuses them) replaces it.
        self.gone
            .retain(|ino, g| now_t.duration_since(g.at) < forget && !found.contains_key(ino));
        self.refresh_local(&found);
        self.cgroups.retain(|ino, _| found.contains_key(ino));
        for (ino, f) in &found {
            let Some(pid) = f.pid else { continue };
            if self.cgroups.get(ino).is_none_or(|(p, _)| *p != pid) {
                self.cgroups.insert(*ino, (pid, owner::cgroup_of(&self.proc, pid)));
            }
        }
        self.found = found;
        self.names.refresh_files(&self.sources);
        self.rename();
        self.scans += 1;
    }

    /// Each found namespace's owner from what the sources said last.
    pub fn rename(&mut self) {
        let unknown = self.name_all();
        let new = !unknown.is_subset(&self.cri_unknown);
        self.cri_due |= new && self.sources.cri.iter().any(|(s, explicit)| *explicit || s.exists());
        self.cri_unknown.retain(|id| unknown.contains(id));
    }

    /// Sets every found namespace's owner; the container ids and pod UIDs no source names.
    fn name_all(&mut self) -> BTreeSet<String> {
        let empty = CgroupOwner::default();
        let mut owners = BTreeMap::new();
        let mut unknown = BTreeSet::new();
        for (ino, f) in &self.found {
            let cg = self.cgroups.get(ino).map_or(&empty, |(_, c)| c);
            if !self.names.knows(cg) {
                unknown.extend(cg.container_id.iter().chain(&cg.pod_uid).cloned());
            }
            owners.insert(*ino, self.names.owner(&self.sources, f.source, cg));
        }
        self.owners = owners;
        unknown
    }

    /// Whether the CRI sockets should be listed now: something is unnamed, or the last listing
    /// is older than `every` (names and containers change without new namespaces).
    pub fn cri_listing_due(&self, every: Duration) -> bool {
        self.cri_due || self.cri_listed.is_none_or(|t| t.elapsed() >= every)
    }

    /// A CRI listing came in.
    pub fn cri_listed(&mut self, listings: BTreeMap<PathBuf, owner::cri::Listing>) {
        self.names.cri = listings;
        self.cri_listed = Some(Instant::now());
        // What is still unknown after a fresh listing waits for the next periodic one.
        self.cri_unknown = self.name_all();
        self.cri_due = false;
    }

    /// Keeps `AGENT_LOCAL` to the addresses of the namespaces found: a new one's are read at
    /// once, every one's each `ADDRS_EVERY` scans, a gone one's removed.
    fn refresh_local(&mut self, found: &BTreeMap<u32, Found>) {
        let gone: Vec<u32> = self.local.keys().filter(|i| !found.contains_key(i)).copied().collect();
        for ino in gone {
            if let Some(have) = self.local.remove(&ino) {
                self.maps.set_local(&have, &BTreeSet::new());
            }
        }
        let all = self.scans.is_multiple_of(ADDRS_EVERY);
        for (ino, f) in found {
            let Some(pid) = f.pid else { continue };
            if !all && self.local.contains_key(ino) {
                continue;
            }
            let want = discover::local_addrs(&self.proc, pid, *ino);
            let have = self.local.get(ino).cloned().unwrap_or_default();
            if have != want {
                let now = self.maps.set_local(&have, &want);
                self.local.insert(*ino, now);
            } else {
                self.local.entry(*ino).or_default();
            }
        }
    }
}

/// The Prometheus collector: reads the maps at every scrape.
#[derive(Clone)]
pub struct AgentCollector(pub Arc<Mutex<State>>);

impl std::fmt::Debug for AgentCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentCollector")
    }
}

/// Cumulative histogram buckets in seconds from the kernel's log2 nanosecond buckets.
pub fn buckets(hist: &[u64; agent::BUCKETS]) -> Vec<(f64, u64)> {
    let mut out = Vec::with_capacity(agent::BUCKETS - FIRST_BOUND_LOG2 + 1);
    // Kernel bucket i holds [2^i, 2^(i+1)) ns: bound 2^(i+1) ns.
    let low: u64 = hist[..FIRST_BOUND_LOG2].iter().sum();
    out.push(((1u64 << FIRST_BOUND_LOG2) as f64 / 1e9, low));
    for (i, &n) in hist.iter().enumerate().take(agent::BUCKETS - 1).skip(FIRST_BOUND_LOG2) {
        out.push(((1u64 << (i + 1)) as f64 / 1e9, n));
    }
    out.push((f64::INFINITY, hist[agent::BUCKETS - 1]));
    out
}

fn cpu_seconds() -> (f64, f64) {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    (t(ru.ru_utime), t(ru.ru_stime))
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// A namespace's own labels: `netns` and its owner's.
type Base = Vec<(&'static str, String)>;

fn with<'a>(base: &'a Base, extra: &[(&'static str, &'a str)]) -> Labels<'a> {
    base.iter()
        .map(|(k, v)| (*k, v.as_str()))
        .chain(extra.iter().copied())
        .collect()
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, rows: &[(Labels, f64)]) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

/// One row per namespace (labelled `netns`) of a per-namespace value.
fn per_netns<'a>(
    totals: &[(u32, NetnsCounters)],
    ns: &'a [Base],
    v: impl Fn(&NetnsCounters) -> u64,
) -> Vec<(Labels<'a>, u64)> {
    totals.iter().zip(ns).map(|((_, c), n)| (with(n, &[]), v(c))).collect()
}

/// One row per namespace and name of a per-namespace array (`label` = each of `names`).
fn per_netns_by<'a, const N: usize>(
    totals: &[(u32, NetnsCounters)],
    ns: &'a [Base],
    label: &'static str,
    names: &[&'static str; N],
    v: impl Fn(&NetnsCounters) -> [u64; N],
) -> Vec<(Labels<'a>, u64)> {
    let mut rows = Vec::new();
    for ((_, c), n) in totals.iter().zip(ns) {
        for (name, x) in names.iter().zip(v(c)) {
            rows.push((with(n, &[(label, name)]), x));
        }
    }
    rows
}

/// A histogram family in seconds: per namespace and stage (`names`), the kernel's log2
/// nanosecond buckets and sum.
fn histograms<const N: usize>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    totals: &[(u32, NetnsCounters)],
    ns: &[Base],
    names: &[&'static str; N],
    v: impl Fn(&NetnsCounters) -> (&[[u64; agent::BUCKETS]; N], &[u64; N]),
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
    for ((_, c), n) in totals.iter().zip(ns) {
        let (hist, sums) = v(c);
        for ((stage, h), sum) in names.iter().zip(hist).zip(sums) {
            let labels = with(n, &[("stage", stage)]);
            m.encode_family(&labels)?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    *sum as f64 / 1e9,
                    h.iter().sum(),
                    &buckets(h),
                    None,
                )?;
        }
    }
    Ok(())
}

impl Collector for AgentCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let st = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Live namespaces and, for a while, gone ones' last counts (a live one under the same
        // inode wins).
        let Snapshot {
            totals,
            drops,
            copies,
            owners,
        } = st.snapshot();
        let base_of = |ino: u32| -> Base {
            let mut b = vec![("netns", ino.to_string())];
            if let Some(o) = owners.get(&ino) {
                b.extend(o.labels());
            }
            b
        };
        let names: Vec<Base> = totals.iter().map(|(k, _)| base_of(*k)).collect();

        let mut rows = Vec::new();
        let mut bytes = Vec::new();
        for (i, (_, c)) in totals.iter().enumerate() {
            for (p, name) in PROTO_NAMES.iter().enumerate() {
                if c.packets[p] != 0 {
                    rows.push((with(&names[i], &[("proto", name)]), c.packets[p]));
                    bytes.push((with(&names[i], &[("proto", name)]), c.bytes[p]));
                }
            }
        }
        counter(
            &mut enc,
            "lotrace_lo_packets",
            "Packets that crossed a namespace's lo (received from the backlog), by protocol",
            None,
            &rows,
        )?;
        counter(
            &mut enc,
            "lotrace_lo",
            "Their bytes, as lo's own counters count them",
            Some(&Unit::Bytes),
            &bytes,
        )?;

        counter(
            &mut enc,
            "lotrace_lo_backlog_enqueues",
            "netif_rx enqueues of lo packets onto the per-CPU backlog",
            None,
            &per_netns(&totals, &names, |c| c.backlog_enqueues),
        )?;
        counter(
            &mut enc,
            "lotrace_lo_softirq_packets",
            "lo packets by the context that ran the NET_RX softirq receiving them",
            None,
            &per_netns_by(&totals, &names, "context", &CONTEXT_NAMES, |c| c.softirq),
        )?;
        counter(
            &mut enc,
            "lotrace_lo_escaped_packets",
            "Packets that should have stayed on lo but a device other than lo transmitted: to a loopback address (127.0.0.0/8, ::1) or to an address of the namespace's own interfaces",
            None,
            &per_netns_by(&totals, &names, "to", &ESCAPE_NAMES, |c| c.escaped),
        )?;
        counter(
            &mut enc,
            "lotrace_lo_untimed_packets",
            "lo packets counted without stage times (in flight when the agent started, or their in-flight entry was evicted)",
            None,
            &per_netns(&totals, &names, |c| c.untimed),
        )?;

        histograms(
            &mut enc,
            "lotrace_lo_latency",
            "Time through each stage of the lo path (crossing: net_dev_start_xmit to netif_receive_skb)",
            &totals,
            &names,
            &STAGE_NAMES,
            |c| (&c.hist, &c.hist_sum_ns),
        )?;
        histograms(
            &mut enc,
            "lotrace_lo_delivery_latency",
            "For lo packets an application read: receive to its delivery (receive_to_app), and lo's driver to it (end_to_end); TCP at its first copy to user space, UDP at its socket's read",
            &totals,
            &names,
            &DELIVERY_NAMES,
            |c| (&c.delivery, &c.delivery_sum_ns),
        )?;

        let drop_ns: Vec<Base> = drops.iter().map(|(n, _, _)| base_of(*n)).collect();
        let rows: Vec<_> = drops
            .iter()
            .zip(&drop_ns)
            .map(|((_, r, v), b)| (with(b, &[("reason", r.as_str())]), *v))
            .collect();
        counter(
            &mut enc,
            "lotrace_lo_drops",
            "lo packets freed as dropped, by the kernel's drop reason",
            None,
            &rows,
        )?;
        let copy_ns: Vec<(Base, u64)> = copies.iter().map(|(n, v)| (base_of(*n), *v)).collect();
        let rows: Vec<_> = copy_ns.iter().map(|(b, v)| (with(b, &[]), *v)).collect();
        counter(
            &mut enc,
            "lotrace_lo_copy_delivered_packets",
            "lo packets the kernel freed as dropped while a copy of them was delivered (a raw socket's copy of a ping reply)",
            None,
            &rows,
        )?;

        let inos: Vec<Base> = st.found.keys().map(|k| base_of(*k)).collect();
        let pod_containers: Vec<String> = st
            .found
            .keys()
            .map(|k| {
                st.owners
                    .get(k)
                    .and_then(|o| o.pod.as_ref())
                    .map(|p| p.containers.join(","))
                    .unwrap_or_default()
            })
            .collect();
        let info: Vec<(Labels, f64)> = st
            .found
            .values()
            .zip(&inos)
            .zip(&pod_containers)
            .map(|((f, b), cs)| {
                let mut l = with(b, &[("source", f.source), ("name", f.name.as_str())]);
                if !cs.is_empty() {
                    l.push(("k8s_container_names", cs.as_str()));
                }
                (l, 1.0)
            })
            .collect();
        gauge(
            &mut enc,
            "lotrace_netns_info",
            "A namespace the agent watches: where it was found and its name (join on netns)",
            &info,
        )?;
        let local: Vec<(Labels, f64)> = st
            .found
            .iter()
            .zip(&inos)
            .filter(|((i, _), _)| st.local.contains_key(i))
            .map(|((i, _), b)| (with(b, &[]), st.local.get(i).map_or(0, |a| a.len()) as f64))
            .collect();
        gauge(
            &mut enc,
            "lotrace_netns_local_addresses",
            "Addresses of a namespace's own interfaces the agent watches for escaped packets (read through a process in it)",
            &local,
        )?;
        gauge(
            &mut enc,
            "lotrace_agent_netns_watched",
            "Network namespaces the agent watches now",
            &[(vec![], st.found.len() as f64)],
        )?;
        counter(
            &mut enc,
            "lotrace_agent_netns_released",
            "Namespaces released because they went away",
            None,
            &[(vec![], st.released)],
        )?;
        let socks: Vec<(String, owner::CriCounts)> = st
            .cri_health
            .iter()
            .map(|(p, c)| (p.display().to_string(), *c))
            .collect();
        let rows: Vec<_> = socks
            .iter()
            .map(|(p, c)| (vec![("socket", p.as_str())], c.listings))
            .collect();
        counter(
            &mut enc,
            "lotrace_agent_cri_listings",
            "Listings of pods and containers asked of each CRI socket (--cri-socket)",
            None,
            &rows,
        )?;
        let rows: Vec<_> = socks
            .iter()
            .map(|(p, c)| (vec![("socket", p.as_str())], c.failures))
            .collect();
        counter(
            &mut enc,
            "lotrace_agent_cri_failures",
            "Of those, the ones that failed (socket missing, refusing, or slower than 2 s): pods are then named from cgroups only",
            None,
            &rows,
        )?;
        let rows: Vec<_> = socks
            .iter()
            .map(|(p, c)| (vec![("socket", p.as_str())], f64::from(u8::from(c.up))))
            .collect();
        gauge(
            &mut enc,
            "lotrace_agent_cri_up",
            "Whether the last listing of each CRI socket answered (1) or not (0)",
            &rows,
        )?;
        if st.otlp {
            let (sent, dropped) = st.otlp_exports;
            counter(
                &mut enc,
                "lotrace_agent_otlp_exports",
                "Exports to the OTLP collector (--otlp), by outcome: dropped ones (collector down, slow or refusing) are not retried",
                None,
                &[
                    (vec![("outcome", "sent")], sent),
                    (vec![("outcome", "dropped")], dropped),
                ],
            )?;
        }
        let overflow = st.maps.overflow();
        let rows: Vec<_> = overflow.iter().map(|(m, v)| (vec![("map", *m)], *v)).collect();
        counter(
            &mut enc,
            "lotrace_agent_overflow",
            "Samples not counted because a bounded map was full (--max-netns, --max-drop-series, --max-in-flight, --max-local-addrs)",
            None,
            &rows,
        )?;
        counter(
            &mut enc,
            "lotrace_agent_read_failures",
            "Kernel memory reads that failed in the agent's programs",
            None,
            &[(vec![], st.maps.counter(loopback_common::counter::READ_FAILED))],
        )?;
        let fails: Vec<(Labels, f64)> = st
            .bpf
            .failures
            .iter()
            .map(|f| (vec![("hook", f.hook), ("reason", f.reason.as_str())], 1.0))
            .collect();
        gauge(
            &mut enc,
            "lotrace_agent_attach_failures",
            "Hooks the agent could not attach (1 each), with the kernel's reason",
            &fails,
        )?;
        let hooks: Vec<(Labels, f64)> = st
            .bpf
            .attached
            .iter()
            .map(|a| (vec![("hook", a.hook), ("kind", a.kind)], 1.0))
            .collect();
        gauge(
            &mut enc,
            "lotrace_agent_hooks",
            "Hooks attached (1 each) and how",
            &hooks,
        )?;
        let (user, system) = cpu_seconds();
        {
            let mut m = enc.encode_descriptor(
                "lotrace_agent_cpu",
                "CPU time of the agent process",
                Some(&Unit::Seconds),
                MetricType::Counter,
            )?;
            for (mode, v) in [("user", user), ("system", system)] {
                ConstCounter::new(v).encode(m.encode_family(&vec![("mode", mode)])?)?;
            }
        }
        let costs = st.bpf.program_costs();
        if !costs.is_empty() {
            {
                let mut m = enc.encode_descriptor(
                    "lotrace_agent_bpf_run",
                    "Run time of each agent program in the kernel (--kernel-cost)",
                    Some(&Unit::Seconds),
                    MetricType::Counter,
                )?;
                for c in &costs {
                    ConstCounter::new(c.total_ns as f64 / 1e9)
                        .encode(m.encode_family(&vec![("program", c.program.as_str())])?)?;
                }
            }
            let rows: Vec<_> = costs
                .iter()
                .map(|c| (vec![("program", c.program.as_str())], c.runs))
                .collect();
            counter(
                &mut enc,
                "lotrace_agent_bpf_runs",
                "Runs of each agent program (--kernel-cost)",
                None,
                &rows,
            )?;
        }
        Ok(())
    }
}

/// The registry a scrape encodes.
pub fn registry(state: Arc<Mutex<State>>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(AgentCollector(state)));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_buckets_become_cumulative_bounds_in_seconds() {
        let mut h = [0u64; agent::BUCKETS];
        h[0] = 1; // 0-1 ns
        h[6] = 2; // 64-127 ns: below the first exported bound, 128 ns
        h[10] = 3; // 1024-2047 ns: bound 2048 ns
        h[agent::BUCKETS - 1] = 4; // >= 2^30 ns: +Inf
        let b = buckets(&h);
        assert_eq!(b[0], (128e-9, 3));
        let at = b
            .iter()
            .position(|(le, _)| (*le - 2048e-9).abs() < 1e-15)
            .expect("2048 ns bound");
        assert_eq!(b[at].1, 3);
        assert_eq!(*b.last().expect("+Inf"), (f64::INFINITY, 4));
        assert_eq!(b.iter().map(|(_, n)| n).sum::<u64>(), h.iter().sum::<u64>());
        // Bounds strictly increase.
        assert!(b.windows(2).all(|w| w[0].0 < w[1].0));
    }
}
