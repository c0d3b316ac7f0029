//! The report, as text or JSON.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use super::*;
use crate::{
    output::{self, fmt_ns, table_name},
    path::{PacketPath, SoftirqContext},
};

pub(super) fn stages_json(p: Option<&PacketPath>) -> Value {
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
            "dev": rt.map(|x| x.dev),
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

pub(super) fn path_line(p: &PacketPath) -> String {
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

pub(super) fn softirq_line(p: &PacketPath) -> Option<String> {
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
