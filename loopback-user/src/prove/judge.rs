//! The judgement: from a probe's echoes and the reconstructed paths to a verdict with its
//! evidence. Pure; unit-tested on recorded event sequences.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use super::*;
use crate::{
    output::table_name,
    path::{PacketPath, is_echo_reply, is_echo_request},
};

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

pub(super) fn is_request(p: &PacketPath) -> bool {
    p.info.as_ref().is_some_and(is_echo_request)
}

pub(super) fn is_reply(p: &PacketPath) -> bool {
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

pub(super) fn judge(r: &Report) -> (Verdict, Vec<String>) {
    let t = &r.probe.target;
    let sent = r.sent();
    let answered = r.answered();
    let req = r.first_request();
    let route_dev = req.and_then(|p| p.route.as_ref()).map(|rt| rt.dev);
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
