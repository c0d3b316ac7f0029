//! The exit summary: what was traced, what was lost and where, and what it cost the kernel.
use std::fmt::Write as _;

use serde_json::{Value, json};

use super::text::fmt_ns;
use crate::{
    counters::{KernelCounters, ProgramCost},
    path::Stats,
};

/// Totals shown when tracing ends. Nothing lost is ever left out.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub printed: u64,
    /// Packets that passed the filter but were not printed: stdout (or the pcapng file) could
    /// not take them as fast as they finished (`trace`'s printing never holds up the ring
    /// reader; what it cannot keep up with is counted here).
    pub unprinted: u64,
    pub kernel: KernelCounters,
    pub undecodable: u64,
    /// Records read from the ring buffer (equals `kernel.emitted` when the reader kept up).
    pub received: u64,
    /// Records whose task name could not be restored (the record naming it was lost).
    pub unnamed: u64,
    /// Kernel-side cost per program (BPF run-time statistics).
    pub costs: Vec<ProgramCost>,
    /// Why there are no costs (the kernel refused statistics).
    pub costs_unavailable: Option<String>,
    /// The namespace traced: what it was called, its inode and whose it is.
    pub netns: Option<(String, u32, Option<crate::owner::Owner>)>,
}

fn costs_json(costs: &[ProgramCost]) -> Value {
    Value::Array(
        costs
            .iter()
            .map(|c| {
                json!({"program": c.program, "runs": c.runs, "total_ns": c.total_ns,
                       "ns_per_run": c.total_ns.checked_div(c.runs).unwrap_or(0)})
            })
            .collect(),
    )
}

pub fn summary_json(stats: &Stats, sum: &Summary) -> Value {
    let stages: serde_json::Map<String, Value> = stats
        .stage_latency
        .iter()
        .map(|(k, h)| {
            (
                k.as_str().to_string(),
                json!({"count": h.len(), "p50_ns": h.value_at_quantile(0.5), "p99_ns": h.value_at_quantile(0.99)}),
            )
        })
        .collect();
    json!({
        "summary": {
            "packets": stats.packets,
            "printed": sum.printed,
            "unprinted": sum.unprinted,
            "complete": stats.complete,
            "complete_pct": pct(stats.complete, stats.packets),
            "drops": stats.drops,
            "lost_events": sum.kernel.ring_lost,
            "skipped_runs": sum.kernel.skipped_runs,
            "scope_overflow": sum.kernel.scope_full,
            "read_failures": sum.kernel.read_failed,
            "undecodable_events": sum.undecodable,
            "events_emitted": sum.kernel.emitted,
            "events_received": sum.received,
            "unnamed_events": sum.unnamed,
            "unlinked_lo_events": stats.unlinked_lo_events,
            "gso_splits": stats.gso_splits,
            "tc_only": stats.tc_only,
            "frees_after_end": stats.frees_after_end,
            "copies": stats.copies,
            "expired": stats.expired,
            "in_flight_at_end": stats.in_flight_at_end,
            "in_flight_at_start": stats.in_flight_at_start,
            "softirq_context": stats.by_context(),
            "stage_latency": stages,
            "bpf_programs": costs_json(&sum.costs),
            "bpf_stats_unavailable": sum.costs_unavailable,
            "netns": sum.netns.as_ref().map(|(label, inode, owner)| json!({"label": label, "inode": inode, "owner": owner})),
        }
    })
}

/// `a` as a percentage of `b`, to one decimal; None when `b` is 0 (an empty run is not "100%
/// complete": JSON `null`, text "n/a").
fn pct(a: u64, b: u64) -> Option<f64> {
    (b > 0).then(|| (a as f64 * 1000.0 / b as f64).round() / 10.0)
}

/// `pct` for text: "12.5%" or "n/a".
fn pct_text(a: u64, b: u64) -> String {
    pct(a, b).map_or_else(|| "n/a".to_string(), |p| format!("{p}%"))
}

pub fn summary_text(stats: &Stats, sum: &Summary) -> String {
    let mut s = String::new();
    let drops = if stats.drops.is_empty() {
        "none".to_string()
    } else {
        stats
            .drops
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // Packets cut by the start or the end of tracing are no packets of the run's: said apart.
    let mut cut = String::new();
    if stats.in_flight_at_start > 0 {
        let _ = write!(cut, ", {} in flight at start", stats.in_flight_at_start);
    }
    if stats.in_flight_at_end > 0 {
        let _ = write!(cut, ", {} in flight at stop", stats.in_flight_at_end);
    }
    if !cut.is_empty() {
        cut.push_str(" (not counted; --partial prints them)");
    }
    let _ = writeln!(
        s,
        "--- lotrace summary: {} packets ({} printed), {} complete ({}), drops: {}{cut}",
        stats.packets,
        sum.printed,
        stats.complete,
        pct_text(stats.complete, stats.packets),
        drops
    );
    if sum.unprinted > 0 {
        let _ = writeln!(
            s,
            "    NOT printed: {} packets (the output could not keep up; tracing went on)",
            sum.unprinted
        );
    }
    let _ = writeln!(
        s,
        "    events: {} emitted, {} received | lost events: {} | skipped program runs: {} | scope overflow: {} | read failures: {} | undecodable: {} | unlinked lo events: {} | GSO splits: {} | seen by tc only: {} crossings at ingress, {} at egress and ingress, {} transmits | frees after the end: {} | socket copies: {} | expired: {} | in flight at end: {}",
        sum.kernel.emitted,
        sum.received,
        sum.kernel.ring_lost,
        sum.kernel.skipped_runs,
        sum.kernel.scope_full,
        sum.kernel.read_failed,
        sum.undecodable,
        stats.unlinked_lo_events,
        stats.gso_splits,
        stats.tc_only.ingress,
        stats.tc_only.both,
        stats.tc_only.egress,
        stats.frees_after_end,
        stats.copies,
        stats.expired,
        stats.in_flight_at_end
    );
    let contexts = stats.by_context();
    if !contexts.is_empty() {
        let c: Vec<String> = contexts.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(s, "    softirq context: {}", c.join(", "));
    }
    if let Some(why) = &sum.costs_unavailable {
        let _ = writeln!(s, "    kernel cost: not measured ({why})");
    }
    if !sum.costs.is_empty() {
        let runs: u64 = sum.costs.iter().map(|c| c.runs).sum();
        let ns: u64 = sum.costs.iter().map(|c| c.total_ns).sum();
        let mut top = sum.costs.clone();
        top.sort_by_key(|c| std::cmp::Reverse(c.total_ns));
        let top: Vec<String> = top
            .iter()
            .take(3)
            .map(|c| {
                format!(
                    "{} {}/run",
                    c.program,
                    fmt_ns(c.total_ns.checked_div(c.runs).unwrap_or(0))
                )
            })
            .collect();
        let _ = writeln!(
            s,
            "    kernel cost: {runs} program runs, {} in total ({}/run); most: {}",
            fmt_ns(ns),
            fmt_ns(ns.checked_div(runs).unwrap_or(0)),
            top.join(", ")
        );
    }
    if !stats.stage_latency.is_empty() {
        let _ = writeln!(s, "    stage (from previous)     count        p50        p99");
        for (k, h) in stats.stage_latency.iter() {
            let _ = writeln!(
                s,
                "    {:<22} {:>8} {:>10} {:>10}",
                k,
                h.len(),
                fmt_ns(h.value_at_quantile(0.5)),
                fmt_ns(h.value_at_quantile(0.99))
            );
        }
    }
    s
}
