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
    /// Caught part-way through when tracing started ([`PacketPath::in_flight_at_start`]).
    pub in_flight_at_start: u64,
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
    /// Crossings seen at tc egress and tc ingress but at no transmit hook between (the kernel
    /// ran no tracing program for the whole crossing): printed (incomplete), counted as packets.
    pub both: u64,
    /// Transmits seen at tc egress only, which never crossed as themselves (their GSO segments
    /// did, seen at tc ingress only): not packets, not printed.
    pub egress: u64,
}

/// One latency histogram per stage, indexed by the stage itself (no map lookup per stage of
/// every packet); iterated in stage order.
///
/// Recording is on the hot path (a dozen stages per packet, `hdrhistogram`'s `record` took 5%
/// of user space): a value is counted in an array laid out exactly as `hdrhistogram`'s counts
/// for these bounds (exact below 256, then 128 sub-buckets per power of two), with one shift,
/// one comparison and one add. The histograms are built from those counts when they are read
/// (the exit summary), one `record_n` per bucket in use: the histograms a `record` per value
/// would have made (a test checks it).
#[derive(Clone, Debug, Default)]
pub struct StageLatency([Option<Box<[u64]>>; StageKind::ALL.len()]);

/// The histograms' bounds, in ns: 1 ns to 60 s, 2 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 2).expect("valid histogram bounds")
}

/// Where `hdrhistogram` (2 significant digits, lowest value 1) counts `v`: below 256 at `v`;
/// above, with `e` = log2(v) - 7, at 128·e plus `v >> e` (128 to 255).
#[inline(always)]
fn bucket(v: u64) -> usize {
    let e = (63 - (v | 1).leading_zeros()).saturating_sub(7);
    128 * e as usize + (v >> e) as usize
}

/// The lowest value counted at bucket `i` (see [`bucket`]).
fn bucket_value(i: usize) -> u64 {
    if i < 256 {
        return i as u64;
    }
    let e = i / 128 - 1;
    ((i - 128 * e) as u64) << e
}

impl StageLatency {
    #[inline(always)]
    pub fn record(&mut self, k: StageKind, ns: u64) {
        let counts = self.0[k as usize].get_or_insert_with(|| vec![0; histogram().distinct_values()].into());
        // Beyond the bounds: not counted (as `hdrhistogram` refuses it).
        if let Some(c) = counts.get_mut(bucket(ns.max(1))) {
            *c += 1;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(Option::is_none)
    }

    /// The stages with a histogram, in stage order, each built from its counts.
    pub fn iter(&self) -> impl Iterator<Item = (StageKind, Histogram<u64>)> + '_ {
        StageKind::ALL.iter().zip(&self.0).filter_map(|(k, counts)| {
            let counts = counts.as_ref()?;
            let mut h = histogram();
            for (i, &n) in counts.iter().enumerate().filter(|(_, n)| **n > 0) {
                let _ = h.record_n(bucket_value(i), n);
            }
            Some((*k, h))
        })
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

    fn count_drop(&mut self, p: &PacketPath) {
        if p.is_drop() {
            // The reason is copied into the map once, not for every drop.
            let r = p.drop_reason.as_deref().unwrap_or("unknown");
            match self.drops.get_mut(r) {
                Some(n) => *n += 1,
                None => {
                    self.drops.insert(r.to_string(), 1);
                }
            }
        }
    }

    pub(super) fn account(&mut self, p: &PacketPath) {
        let s = self;
        if p.is_copy() {
            s.copies += 1;
            return;
        }
        // Cut by the start or the end of tracing: counted apart, not as packets (a drop seen of
        // one caught at the start is still a drop).
        if p.cut_at_stop() {
            s.in_flight_at_end += 1;
            return;
        }
        if p.in_flight_at_start {
            s.in_flight_at_start += 1;
            s.count_drop(p);
            return;
        }
        s.packets += 1;
        if p.complete {
            s.complete += 1;
        } else {
            match p.first_skb_stage() {
                Some(StageKind::TcIngress) => s.tc_only.ingress += 1,
                Some(StageKind::TcEgress) if p.has(StageKind::TcIngress) && !p.has(StageKind::Xmit) => {
                    s.tc_only.both += 1
                }
                _ => {}
            }
        }
        if p.verdict == Verdict::Expired {
            s.expired += 1;
        }
        s.count_drop(p);
        if let Some(si) = &p.softirq {
            s.contexts[si.context as usize] += 1;
        }
        for (stage, d) in p.timed_stages().skip(1) {
            s.stage_latency.record(stage.stage, d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The histograms built from the bucket counts are those a `record` per value makes: every
    /// bucket boundary, every magnitude, past the upper bound.
    #[test]
    fn bucket_counts_make_the_histogram_recording_each_value_makes() {
        let mut values: Vec<u64> = vec![
            0,
            1,
            2,
            127,
            128,
            255,
            256,
            257,
            511,
            512,
            60_000_000_000,
            70_000_000_000,
        ];
        for p in 0..36 {
            let t = 1u64 << p;
            values.extend([t - 1, t, t + 1, 3 * t / 2]);
        }
        values.extend(
            crate::fixture::xorshift(0x9e37_79b9_7f4a_7c15)
                .take(50_000)
                .map(|x| x >> (x % 64)),
        );
        let mut mine = StageLatency::default();
        let mut theirs = histogram();
        for &v in &values {
            mine.record(StageKind::Xmit, v);
            let _ = theirs.record(v.max(1));
        }
        let (k, h) = mine.iter().next().expect("one stage");
        assert_eq!(k, StageKind::Xmit);
        assert_eq!(h, theirs);
        for q in [0.0, 0.01, 0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(h.value_at_quantile(q), theirs.value_at_quantile(q), "q {q}");
        }
        assert_eq!((h.len(), h.min(), h.max()), (theirs.len(), theirs.min(), theirs.max()));
        for i in 0..h.distinct_values() {
            assert_eq!(bucket(bucket_value(i)), i, "bucket {i}");
        }
    }
}
