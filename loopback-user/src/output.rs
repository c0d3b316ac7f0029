//! Sinks: one JSON object per packet per line, readable text blocks, and the exit summary.
use std::fmt::Write as _;

use std::net::IpAddr;

use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    bpf::session::{KernelCounters, ProgramCost},
    decode::{Icmp, Name, Tcp, proto_name},
    path::{PacketPath, StageKind, Stats},
};

/// Route table ids with a name (include/uapi/linux/rtnetlink.h).
pub fn table_name(id: u32) -> String {
    match id {
        255 => "local".into(),
        254 => "main".into(),
        253 => "default".into(),
        n => n.to_string(),
    }
}

/// One packet as JSON: the schema documented in the README ("JSON output"). Every key is always
/// present. Serialized straight from borrowed fields (no intermediate `Value`): this is the hot
/// path of `trace --format json`.
#[derive(Serialize)]
pub struct PacketOut<'a> {
    id: u64,
    t_ns: u64,
    proto: Option<String>,
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    len: u32,
    sport: Option<u16>,
    dport: Option<u16>,
    icmp: Option<Icmp>,
    tcp: Option<Tcp>,
    tx_dev: Option<Name>,
    rx_dev: Option<Name>,
    left_host: bool,
    complete: bool,
    verdict: &'static str,
    drop_reason: &'a Option<String>,
    reply_of: Option<u64>,
    clone_of: Option<u64>,
    route: Option<RouteOut<'a>>,
    softirq: Option<SoftirqOut>,
    latency_ns: u64,
    stages: Vec<StageOut>,
}

#[derive(Serialize)]
pub struct RouteOut<'a> {
    table: u32,
    table_name: String,
    dev: &'a str,
    dst: IpAddr,
    src: IpAddr,
    err: i32,
}

#[derive(Serialize)]
pub struct SoftirqOut {
    cpu: u32,
    context: &'static str,
    task: Name,
    pid: u32,
    raised: bool,
    new_run: bool,
}

#[derive(Serialize)]
pub struct StageOut {
    stage: &'static str,
    t_ns: u64,
    delta_ns: u64,
    cpu: u32,
    pid: u32,
    tid: u32,
    comm: Name,
    dev: Option<Name>,
}

/// A packet's stages with their deltas, as they appear in every JSON output.
pub fn stages_out(p: &PacketPath) -> Vec<StageOut> {
    p.timed_stages()
        .map(|(s, d)| {
            StageOut {
                stage: s.stage.as_str(),
                t_ns: s.t_ns,
                delta_ns: d,
                cpu: s.cpu,
                pid: s.pid,
                tid: s.tid,
                comm: s.comm,
                dev: s.dev,
            }
        })
        .collect()
}

impl<'a> From<&'a PacketPath> for PacketOut<'a> {
    fn from(p: &'a PacketPath) -> Self {
        let info = p.info.as_ref();
        let first = p.first_ts();
        let stages = stages_out(p);
        PacketOut {
            id: p.id,
            t_ns: first,
            proto: info.map(|i| proto_name(i.proto)),
            src: info.map(|i| i.src),
            dst: info.map(|i| i.dst),
            len: p.len,
            sport: info.and_then(|i| i.sport),
            dport: info.and_then(|i| i.dport),
            icmp: info.and_then(|i| i.icmp),
            tcp: info.and_then(|i| i.tcp),
            tx_dev: p.tx_dev,
            rx_dev: p.rx_dev,
            left_host: p.left_host(),
            complete: p.complete,
            verdict: p.verdict.as_str(),
            drop_reason: &p.drop_reason,
            reply_of: p.reply_of,
            clone_of: p.clone_of,
            route: p.route.as_ref().map(|r| RouteOut {
                table: r.table,
                table_name: table_name(r.table),
                dev: &r.dev,
                dst: r.dst,
                src: r.src,
                err: r.err,
            }),
            softirq: p.softirq.as_ref().map(|s| SoftirqOut {
                cpu: s.cpu,
                context: s.context.as_str(),
                task: s.task,
                pid: s.pid,
                raised: s.raised,
                new_run: s.new_run,
            }),
            latency_ns: p.last_ts().saturating_sub(first),
            stages,
        }
    }
}

/// One JSON line for a packet, written straight to `w`: byte for byte what serde_json makes of
/// [`PacketOut`] (a test compares them), written by hand because this is the hot path of
/// `trace --format json` and serde_json spends most of its time escaping the same key names for
/// every stage. Formatting goes into a reused buffer, then one write.
pub fn write_packet_json(w: &mut impl std::io::Write, p: &PacketPath) -> std::io::Result<()> {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUF.with_borrow_mut(|b| {
        b.clear();
        json::packet(b, p);
        b.push(b'\n');
        w.write_all(b)
    })
}

/// The hand-written JSON of [`write_packet_json`]. Keys are written as literals (they need no
/// escaping); every string that comes from the kernel or the user is escaped as serde_json does.
mod json {
    use std::{io::Write, net::IpAddr};

    use super::{proto_name, table_name};
    use crate::{decode::Name, path::PacketPath};

    fn num(b: &mut Vec<u8>, n: impl itoa::Integer) {
        b.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    }

    fn opt_num(b: &mut Vec<u8>, n: Option<impl itoa::Integer>) {
        match n {
            Some(n) => num(b, n),
            None => b.extend_from_slice(b"null"),
        }
    }

    fn boolean(b: &mut Vec<u8>, v: bool) {
        b.extend_from_slice(if v { b"true" } else { b"false" });
    }

    /// A JSON string, escaped exactly like serde_json (`"`, `\\`, control characters).
    pub(super) fn string(b: &mut Vec<u8>, s: &str) {
        bytes(b, s.as_bytes());
    }

    /// A string known to need no escaping (this program's own stage and verdict names).
    fn plain(b: &mut Vec<u8>, s: &'static str) {
        debug_assert!(!s.bytes().any(needs_escape));
        b.push(b'"');
        b.extend_from_slice(s.as_bytes());
        b.push(b'"');
    }

    fn needs_escape(c: u8) -> bool {
        c < 0x20 || c == b'"' || c == b'\\'
    }

    fn bytes(b: &mut Vec<u8>, bytes: &[u8]) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        b.push(b'"');
        if !bytes.iter().any(|&c| needs_escape(c)) {
            b.extend_from_slice(bytes);
            b.push(b'"');
            return;
        }
        let mut start = 0;
        for (i, &c) in bytes.iter().enumerate() {
            let esc: &[u8] = match c {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0x08 => b"\\b",
                0x0c => b"\\f",
                0..=0x1f => {
                    b.extend_from_slice(&bytes[start..i]);
                    b.extend_from_slice(b"\\u00");
                    b.push(HEX[(c >> 4) as usize]);
                    b.push(HEX[(c & 0xf) as usize]);
                    start = i + 1;
                    continue;
                }
                _ => continue,
            };
            b.extend_from_slice(&bytes[start..i]);
            b.extend_from_slice(esc);
            start = i + 1;
        }
        b.extend_from_slice(&bytes[start..]);
        b.push(b'"');
    }

    fn opt_string(b: &mut Vec<u8>, s: Option<&str>) {
        match s {
            Some(s) => string(b, s),
            None => b.extend_from_slice(b"null"),
        }
    }

    fn opt_name(b: &mut Vec<u8>, n: Option<Name>) {
        match n {
            Some(n) => bytes(b, n.as_bytes()),
            None => b.extend_from_slice(b"null"),
        }
    }

    fn ip(b: &mut Vec<u8>, a: Option<IpAddr>) {
        match a {
            Some(IpAddr::V4(v4)) => {
                let [x, y, z, w] = v4.octets();
                b.push(b'"');
                num(b, x);
                for o in [y, z, w] {
                    b.push(b'.');
                    num(b, o);
                }
                b.push(b'"');
            }
            Some(a) => {
                let _ = write!(b, "\"{a}\"");
            }
            None => b.extend_from_slice(b"null"),
        }
    }

    pub(super) fn packet(b: &mut Vec<u8>, p: &PacketPath) {
        let info = p.info.as_ref();
        let first = p.first_ts();
        b.extend_from_slice(b"{\"id\":");
        num(b, p.id);
        b.extend_from_slice(b",\"t_ns\":");
        num(b, first);
        b.extend_from_slice(b",\"proto\":");
        opt_string(b, info.map(|i| proto_name(i.proto)).as_deref());
        b.extend_from_slice(b",\"src\":");
        ip(b, info.map(|i| i.src));
        b.extend_from_slice(b",\"dst\":");
        ip(b, info.map(|i| i.dst));
        b.extend_from_slice(b",\"len\":");
        num(b, p.len);
        b.extend_from_slice(b",\"sport\":");
        opt_num(b, info.and_then(|i| i.sport));
        b.extend_from_slice(b",\"dport\":");
        opt_num(b, info.and_then(|i| i.dport));
        b.extend_from_slice(b",\"icmp\":");
        match info.and_then(|i| i.icmp) {
            Some(c) => {
                b.extend_from_slice(b"{\"type\":");
                num(b, c.ty);
                b.extend_from_slice(b",\"code\":");
                num(b, c.code);
                b.extend_from_slice(b",\"id\":");
                num(b, c.id);
                b.extend_from_slice(b",\"seq\":");
                num(b, c.seq);
                b.push(b'}');
            }
            None => b.extend_from_slice(b"null"),
        }
        b.extend_from_slice(b",\"tcp\":");
        match info.and_then(|i| i.tcp) {
            Some(t) => {
                b.extend_from_slice(b"{\"seq\":");
                num(b, t.seq);
                b.extend_from_slice(b",\"ack\":");
                num(b, t.ack);
                b.extend_from_slice(b",\"flags\":");
                num(b, t.flags);
                b.push(b'}');
            }
            None => b.extend_from_slice(b"null"),
        }
        b.extend_from_slice(b",\"tx_dev\":");
        opt_name(b, p.tx_dev);
        b.extend_from_slice(b",\"rx_dev\":");
        opt_name(b, p.rx_dev);
        b.extend_from_slice(b",\"left_host\":");
        boolean(b, p.left_host());
        b.extend_from_slice(b",\"complete\":");
        boolean(b, p.complete);
        b.extend_from_slice(b",\"verdict\":");
        plain(b, p.verdict.as_str());
        b.extend_from_slice(b",\"drop_reason\":");
        opt_string(b, p.drop_reason.as_deref());
        b.extend_from_slice(b",\"reply_of\":");
        opt_num(b, p.reply_of);
        b.extend_from_slice(b",\"clone_of\":");
        opt_num(b, p.clone_of);
        b.extend_from_slice(b",\"route\":");
        match &p.route {
            Some(r) => {
                b.extend_from_slice(b"{\"table\":");
                num(b, r.table);
                b.extend_from_slice(b",\"table_name\":");
                string(b, &table_name(r.table));
                b.extend_from_slice(b",\"dev\":");
                string(b, &r.dev);
                b.extend_from_slice(b",\"dst\":");
                ip(b, Some(r.dst));
                b.extend_from_slice(b",\"src\":");
                ip(b, Some(r.src));
                b.extend_from_slice(b",\"err\":");
                num(b, r.err);
                b.push(b'}');
            }
            None => b.extend_from_slice(b"null"),
        }
        b.extend_from_slice(b",\"softirq\":");
        match &p.softirq {
            Some(s) => {
                b.extend_from_slice(b"{\"cpu\":");
                num(b, s.cpu);
                b.extend_from_slice(b",\"context\":");
                plain(b, s.context.as_str());
                b.extend_from_slice(b",\"task\":");
                bytes(b, s.task.as_bytes());
                b.extend_from_slice(b",\"pid\":");
                num(b, s.pid);
                b.extend_from_slice(b",\"raised\":");
                boolean(b, s.raised);
                b.extend_from_slice(b",\"new_run\":");
                boolean(b, s.new_run);
                b.push(b'}');
            }
            None => b.extend_from_slice(b"null"),
        }
        b.extend_from_slice(b",\"latency_ns\":");
        num(b, p.last_ts().saturating_sub(first));
        b.extend_from_slice(b",\"stages\":[");
        for (i, (s, d)) in p.timed_stages().enumerate() {
            if i > 0 {
                b.push(b',');
            }
            b.extend_from_slice(b"{\"stage\":");
            plain(b, s.stage.as_str());
            b.extend_from_slice(b",\"t_ns\":");
            num(b, s.t_ns);
            b.extend_from_slice(b",\"delta_ns\":");
            num(b, d);
            b.extend_from_slice(b",\"cpu\":");
            num(b, s.cpu);
            b.extend_from_slice(b",\"pid\":");
            num(b, s.pid);
            b.extend_from_slice(b",\"tid\":");
            num(b, s.tid);
            b.extend_from_slice(b",\"comm\":");
            bytes(b, s.comm.as_bytes());
            b.extend_from_slice(b",\"dev\":");
            opt_name(b, s.dev);
            b.push(b'}');
        }
        b.extend_from_slice(b"]}");
    }
}

/// The same as a `Value` (tests and callers that post-process).
pub fn packet_json(p: &PacketPath) -> Value {
    serde_json::to_value(PacketOut::from(p)).unwrap_or(Value::Null)
}

pub fn fmt_ns(ns: u64) -> String {
    if ns < 1_000 {
        format!("{ns}ns")
    } else if ns < 1_000_000 {
        format!("{:.1}us", ns as f64 / 1e3)
    } else {
        format!("{:.2}ms", ns as f64 / 1e6)
    }
}

pub struct TextStyle {
    pub color: bool,
    /// CLOCK_REALTIME - CLOCK_MONOTONIC, to print wall time.
    pub wall_offset_ns: i128,
}

fn wall(ts: u64, off: i128) -> String {
    let t = ts as i128 + off;
    if t <= 0 {
        return format!("{ts}");
    }
    let secs = (t / 1_000_000_000) as i64;
    let us = ((t % 1_000_000_000) / 1_000) as i64;
    let day = secs.rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}.{:06}", day / 3600, day / 60 % 60, day % 60, us)
}

pub fn packet_text(p: &PacketPath, st: &TextStyle) -> String {
    let mut s = String::new();
    let paint = |code: &str, text: &str| {
        if st.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    };
    let what = match &p.info {
        Some(i) => {
            let mut w = format!("{} {} -> {}", proto_name(i.proto), i.src, i.dst);
            if let (Some(sp), Some(dp)) = (i.sport, i.dport) {
                w = format!("{} {}:{} -> {}:{}", proto_name(i.proto), i.src, sp, i.dst, dp);
            }
            if let Some(ic) = i.icmp {
                let kind = match (i.proto, ic.ty) {
                    (1, 8) | (58, 128) => "echo-request".to_string(),
                    (1, 0) | (58, 129) => "echo-reply".to_string(),
                    (_, t) => format!("type {t}"),
                };
                let _ = write!(w, " {kind} id {} seq {}", ic.id, ic.seq);
            }
            if let Some(t) = i.tcp {
                let _ = write!(w, " [{}] seq {} ack {}", tcp_flags(t.flags), t.seq, t.ack);
            }
            w
        }
        None => "(no headers seen)".into(),
    };
    let verdict = match p.drop_reason.as_deref() {
        Some(r) if p.is_drop() => paint("31", &format!("DROPPED {r}")),
        _ if !p.complete => paint("33", p.verdict.as_str()),
        _ => paint("32", p.verdict.as_str()),
    };
    let devices = if p.is_copy() {
        // Not a lo crossing: a copy the socket layer made (it has no devices of its own).
        match p.clone_of {
            Some(c) => format!("socket copy of #{c}"),
            None => "socket copy (raw socket clone or GSO segment cut at receive)".to_string(),
        }
    } else {
        format!(
            "{}->{}",
            p.tx_dev.as_deref().unwrap_or("?"),
            p.rx_dev.as_deref().unwrap_or("?")
        )
    };
    let _ = write!(
        s,
        "{} #{} {} len {} {} {devices}",
        wall(p.first_ts(), st.wall_offset_ns),
        p.id,
        what,
        p.len,
        verdict,
    );
    if p.left_host() {
        let _ = write!(s, " {}", paint("35", "LEFT HOST"));
    }
    if let Some(r) = p.reply_of {
        let _ = write!(s, " reply-of #{r}");
    }
    if let (Some(c), false) = (p.clone_of, p.is_copy()) {
        let _ = write!(s, " clone-of #{c}");
    }
    if let Some(si) = &p.softirq {
        let _ = write!(s, " softirq {} cpu{} ({})", si.context.as_str(), si.cpu, si.task);
    }
    let _ = writeln!(s, " total {}", fmt_ns(p.last_ts().saturating_sub(p.first_ts())));
    for (stg, d) in p.timed_stages() {
        let extra = match &p.route {
            Some(r) if stg.stage == StageKind::Route => format!("table {} dev {}", table_name(r.table), r.dev),
            _ => stg.dev.map(|d| d.to_string()).unwrap_or_default(),
        };
        let _ = writeln!(
            s,
            "    +{:<9} {:<16} cpu{:<3} {}/{:<8} {}",
            fmt_ns(d),
            stg.stage,
            stg.cpu,
            stg.comm,
            stg.tid,
            extra
        );
    }
    s
}

fn tcp_flags(f: u8) -> String {
    let names = [
        (0x02, 'S'),
        (0x10, '.'),
        (0x08, 'P'),
        (0x01, 'F'),
        (0x04, 'R'),
        (0x20, 'U'),
    ];
    names.iter().filter(|(b, _)| f & b != 0).map(|(_, c)| *c).collect()
}

/// Totals shown when tracing ends. Nothing lost is ever left out.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub printed: u64,
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
            "complete": stats.complete,
            "complete_pct": pct(stats.complete, stats.packets),
            "drops": stats.drops,
            "lost_events": sum.kernel.ring_lost,
            "scope_overflow": sum.kernel.scope_full,
            "read_failures": sum.kernel.read_failed,
            "undecodable_events": sum.undecodable,
            "events_emitted": sum.kernel.emitted,
            "events_received": sum.received,
            "unnamed_events": sum.unnamed,
            "unlinked_lo_events": stats.unlinked_lo_events,
            "gso_splits": stats.gso_splits,
            "copies": stats.copies,
            "expired": stats.expired,
            "in_flight_at_end": stats.in_flight_at_end,
            "softirq_context": stats.by_context,
            "stage_latency": stages,
            "bpf_programs": costs_json(&sum.costs),
            "bpf_stats_unavailable": sum.costs_unavailable,
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
    let _ = writeln!(
        s,
        "--- lotrace summary: {} packets ({} printed), {} complete ({}), drops: {}",
        stats.packets,
        sum.printed,
        stats.complete,
        pct_text(stats.complete, stats.packets),
        drops
    );
    let _ = writeln!(
        s,
        "    events: {} emitted, {} received | lost events: {} | scope overflow: {} | read failures: {} | undecodable: {} | unlinked lo events: {} | GSO splits: {} | socket copies: {} | expired: {} | in flight at end: {}",
        sum.kernel.emitted,
        sum.received,
        sum.kernel.ring_lost,
        sum.kernel.scope_full,
        sum.kernel.read_failed,
        sum.undecodable,
        stats.unlinked_lo_events,
        stats.gso_splits,
        stats.copies,
        stats.expired,
        stats.in_flight_at_end
    );
    if !stats.by_context.is_empty() {
        let c: Vec<String> = stats.by_context.iter().map(|(k, v)| format!("{k} {v}")).collect();
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
        for (k, h) in &stats.stage_latency {
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::{
        decode::RouteInfo,
        path::{Stage, Tracker, TrackerConfig, tests::raw_ping_sequence},
    };

    /// An empty run is not "100% complete": the share is unknown (JSON null, text "n/a").
    #[test]
    fn an_empty_run_has_no_complete_share() {
        let sum = Summary::default();
        let empty = Stats::default();
        assert_eq!(summary_json(&empty, &sum)["summary"]["complete_pct"], Value::Null);
        assert!(summary_text(&empty, &sum).contains("0 complete (n/a)"));
        let (_, stats) = paths();
        assert!(summary_json(&stats, &sum)["summary"]["complete_pct"].as_f64().is_some());
        assert!(summary_text(&stats, &sum).contains("%)"));
    }

    fn paths() -> (Vec<PacketPath>, Stats) {
        let mut t = Tracker::new(TrackerConfig::default(), HashMap::from([(2, "NO_SOCKET".into())]));
        let mut out = Vec::new();
        for e in raw_ping_sequence() {
            out.extend(t.push(e));
        }
        out.extend(t.flush());
        (out, t.stats)
    }

    /// Every packet of the fixture session, plus variants that fill every optional field and
    /// put characters that need escaping into every string from the kernel.
    fn json_corpus() -> Vec<PacketPath> {
        let mut d = crate::decode::Decoder::default();
        let mut t = Tracker::new(
            TrackerConfig::default(),
            crate::fixture::drop_reasons().into_iter().collect(),
        );
        let mut ps = Vec::new();
        for b in crate::fixture::session(12) {
            d.decode_each(&b, |e| ps.extend(t.push(e))).expect("decodes");
        }
        ps.extend(t.flush());
        ps.extend(paths().0);
        let odd = Name::from_bytes(b"a\"b\\c\x01\n\t\x1f/\x7f");
        let mut extra = Vec::new();
        for (i, base) in ps.iter().take(8).enumerate() {
            let mut p = base.clone();
            p.route = Some(RouteInfo {
                dst: "::1".parse().expect("ip"),
                src: "fe80::1".parse().expect("ip"),
                table: [255, 254, 253, 7][i % 4],
                err: -113,
                dev: "e\"th\u{1}0".into(),
            });
            if let Some(info) = &mut p.info {
                info.tcp = Some(crate::decode::Tcp {
                    seq: u32::MAX,
                    ack: 7,
                    flags: 0x12,
                });
                info.proto = [6, 17, 1, 58, 132][i % 5];
            }
            p.drop_reason = Some("WEIRD \"reason\"\\".into());
            p.tx_dev = Some(odd);
            p.reply_of = Some(u64::MAX);
            p.clone_of = Some(0);
            if let Some(s) = &mut p.softirq {
                s.task = odd;
            }
            for st in &mut p.stages {
                st.comm = odd;
                st.dev = if st.dev.is_some() { None } else { Some(odd) };
            }
            extra.push(p);
            let mut q = base.clone();
            q.info = None;
            q.softirq = None;
            q.stages.clear();
            extra.push(q);
        }
        ps.extend(extra);
        ps
    }

    #[test]
    fn hand_written_json_is_byte_for_byte_serde_json() {
        let ps = json_corpus();
        assert!(ps.len() > 40);
        let mut n_route = 0;
        for p in &ps {
            let mut fast = Vec::new();
            write_packet_json(&mut fast, p).expect("write");
            let mut slow = serde_json::to_vec(&PacketOut::from(p)).expect("serde");
            slow.push(b'\n');
            assert_eq!(String::from_utf8_lossy(&fast), String::from_utf8_lossy(&slow));
            n_route += p.route.is_some() as usize;
        }
        assert!(n_route >= 8, "the variants with every optional field were checked");
    }

    /// The JSON schema, byte for byte: every line the corpus makes (README, "JSON output").
    #[test]
    fn json_lines_are_the_documented_schema_byte_for_byte() {
        let mut out = Vec::new();
        for p in &json_corpus() {
            write_packet_json(&mut out, p).expect("write");
        }
        insta::assert_snapshot!("json_corpus", String::from_utf8_lossy(&out));
    }

    #[test]
    fn json_has_every_documented_key() {
        let (ps, _) = paths();
        for p in &ps {
            let v = packet_json(p);
            for k in [
                "id",
                "t_ns",
                "proto",
                "src",
                "dst",
                "len",
                "sport",
                "dport",
                "icmp",
                "tcp",
                "tx_dev",
                "rx_dev",
                "left_host",
                "complete",
                "verdict",
                "drop_reason",
                "reply_of",
                "clone_of",
                "route",
                "softirq",
                "latency_ns",
                "stages",
            ] {
                assert!(v.get(k).is_some(), "missing {k} in {v}");
            }
            for s in v["stages"].as_array().expect("stages") {
                for k in ["stage", "t_ns", "delta_ns", "cpu", "pid", "tid", "comm", "dev"] {
                    assert!(s.get(k).is_some(), "stage lacks {k}");
                }
            }
        }
        let req = packet_json(&ps[0]);
        assert_eq!(req["icmp"]["type"], 8);
        assert_eq!(req["softirq"]["context"], "inline");
        assert_eq!(packet_json(&ps[1])["reply_of"], req["id"]);
    }

    #[test]
    fn text_and_summary_mention_what_matters() {
        let (ps, stats) = paths();
        let st = TextStyle {
            color: false,
            wall_offset_ns: 0,
        };
        let t = packet_text(&ps[0], &st);
        assert!(
            t.contains("echo-request id 77 seq 1") && t.contains("softirq inline") && t.contains("backlog_enqueue"),
            "{t}"
        );
        assert!(!t.contains('\x1b'), "no colour when not asked");
        // The route stage names table and device in full (longer than a 16-byte kernel name).
        let mut routed = ps[0].clone();
        routed.stages.insert(
            0,
            Stage {
                stage: StageKind::Route,
                ..routed.stages[0].clone()
            },
        );
        routed.route = Some(RouteInfo {
            dst: "127.0.0.1".parse().unwrap(),
            src: "127.0.0.1".parse().unwrap(),
            table: 254,
            err: 0,
            dev: "lo".into(),
        });
        let t = packet_text(&routed, &st);
        assert!(t.contains("table main dev lo\n"), "{t}");
        let sum = Summary {
            printed: 3,
            kernel: KernelCounters {
                ring_lost: 7,
                emitted: 40,
                ..Default::default()
            },
            undecodable: 0,
            received: 33,
            unnamed: 1,
            costs: vec![
                ProgramCost {
                    program: "net_dev_queue".into(),
                    runs: 10,
                    total_ns: 1_500,
                },
                ProgramCost {
                    program: "consume_skb".into(),
                    runs: 10,
                    total_ns: 500,
                },
            ],
            costs_unavailable: None,
        };
        let s = summary_text(&stats, &sum);
        assert!(
            s.contains("kernel cost: 20 program runs, 2.0us in total (100ns/run); most: net_dev_queue 150ns/run"),
            "{s}"
        );
        let j = summary_json(&stats, &sum);
        assert_eq!(j["summary"]["bpf_programs"][0]["ns_per_run"], 150);
        assert!(
            s.contains("2 packets (3 printed)")
                && s.contains("socket copies: 1")
                && s.contains("lost events: 7")
                && s.contains("drops: none"),
            "{s}"
        );
        assert_eq!(summary_json(&stats, &sum)["summary"]["lost_events"], 7);
        assert!(s.contains("events: 40 emitted, 33 received"), "{s}");
        assert_eq!(
            (
                j["summary"]["events_emitted"].as_u64(),
                j["summary"]["events_received"].as_u64()
            ),
            (Some(40), Some(33))
        );
    }
}
