//! The readable form of a packet: one block per packet, a line per stage.
use std::fmt::Write as _;

use crate::{
    decode::proto_name,
    path::{PacketPath, StageKind},
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
                    (_, t) => format!("type {t} code {}", ic.code),
                };
                let _ = write!(w, " {kind}");
                if let Some((id, seq)) = i.icmp_echo() {
                    let _ = write!(w, " id {id} seq {seq}");
                }
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
