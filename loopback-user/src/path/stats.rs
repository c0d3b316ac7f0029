//! Totals for the exit summary, accounted as each packet finishes.
use std::collections::BTreeMap;

use hdrhistogram::Histogram;

use super::{PacketPath, SoftirqContext, StageKind, Verdict};

/// Totals for the exit summary.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub packets: u64,
    pub complete: u64,
    pub expired: u64,
    pub in_flight_at_end: u64,
    pub drops: BTreeMap<String, u64>,
    /// Events of the `lo` programs that could not be linked to an skb.
    pub unlinked_lo_events: u64,
    /// skbs split into GSO segments before `lo` (each segment is a packet of its own).
    pub gso_splits: u64,
    /// Frees at an address with no packet in flight: the free of a packet that had ended
    /// already (a UDP datagram delivered by its read and freed later, deferred to the CPU that
    /// allocated it; or an expired one). Not packets.
    pub frees_after_end: u64,
    /// Packets lo's tc programs saw while the kernel ran no tracing program for them.
    pub tc_only: TcOnly,
    /// Copies first seen at the socket ([`PacketPath::is_copy`]): printed, not counted as
    /// packets.
    pub copies: u64,
    /// Per stage: latency from the previous stage, in ns.
    pub stage_latency: StageLatency,
    /// Packets per softirq context, indexed by [`SoftirqContext`] (see [`Stats::by_context`]).
    contexts: [u64; SoftirqContext::ALL.len()],
}

/// Packets that lo's tc programs saw but no tracepoint program did: the kernel ran no BPF
/// tracing program there (measured on one host: softirqs run on top of one particular process,
/// where bpftrace's programs did not run either, while ftrace saw the tracepoints).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TcOnly {
    /// Crossings seen at tc ingress only: printed (incomplete), counted as packets.
    pub ingress: u64,
    /// Transmits seen at tc egress only, which never crossed as themselves (their GSO segments
    /// did, seen at tc ingress only): not packets, not printed.
    pub egress: u64,
}

/// One latency histogram per stage, indexed by the stage itself (no map lookup per stage of
/// every packet); iterated in stage order.
#[derive(Clone, Debug, Default)]
pub struct StageLatency([Option<Histogram<u64>>; StageKind::ALL.len()]);

impl StageLatency {
    pub fn record(&mut self, k: StageKind, ns: u64) {
        let h = self.0[k as usize]
            .get_or_insert_with(|| Histogram::new_with_bounds(1, 60_000_000_000, 2).expect("valid histogram bounds"));
        let _ = h.record(ns.max(1));
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(Option::is_none)
    }

    /// The stages with a histogram, in stage order.
    pub fn iter(&self) -> impl Iterator<Item = (StageKind, &Histogram<u64>)> {
        StageKind::ALL
            .iter()
            .zip(&self.0)
            .filter_map(|(k, h)| h.as_ref().map(|h| (*k, h)))
    }
}

impl Stats {
    /// Packets per softirq context, by name (the contexts seen).
    pub fn by_context(&self) -> BTreeMap<&'static str, u64> {
        SoftirqContext::ALL
            .iter()
            .zip(self.contexts)
            .filter(|(_, n)| *n > 0)
            .map(|(c, n)| (c.as_str(), n))
            .collect()
    }

    pub(super) fn account(&mut self, p: &PacketPath) {
        let s = self;
        if p.is_copy() {
            s.copies += 1;
            return;
        }
        s.packets += 1;
        if p.stages.first().is_some_and(|st| st.stage == StageKind::TcIngress) {
            s.tc_only.ingress += 1;
        }
        if p.complete {
            s.complete += 1;
        }
        if p.verdict == Verdict::Expired {
            s.expired += 1;
        }
        if p.verdict == Verdict::InFlight {
            s.in_flight_at_end += 1;
        }
        if p.is_drop() {
            // The reason is copied into the map once, not for every drop.
            let r = p.drop_reason.as_deref().unwrap_or("unknown");
            match s.drops.get_mut(r) {
                Some(n) => *n += 1,
                None => {
                    s.drops.insert(r.to_string(), 1);
                }
            }
        }
        if let Some(si) = &p.softirq {
            s.contexts[si.context as usize] += 1;
        }
        for (stage, d) in p.timed_stages().skip(1) {
            s.stage_latency.record(stage.stage, d);
        }
    }
}
