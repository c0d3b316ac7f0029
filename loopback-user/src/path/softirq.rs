//! The NET_RX softirq of a packet, derived from its receive event: who ran it, on which CPU,
//! and whether this packet raised it or started the run.
use super::{PacketPath, Softirq, SoftirqContext, Stage, StageKind};

/// Softirq context from the receive event: who ran it, and whether this packet raised it.
#[inline(always)]
pub(super) fn derive(p: &mut PacketPath) {
    let Some(recv) = p.stages.iter().find(|s| s.stage == StageKind::Receive).cloned() else {
        return;
    };
    let enq = p
        .stages
        .iter()
        .find(|s| s.stage == StageKind::BacklogEnqueue)
        .map(|s| s.t_ns);
    let (entry_ts, raise_ts) = p.receive_arg.unwrap_or((0, 0));
    let after_enqueue = |t: u64| enq.is_some_and(|q| t >= q && t <= recv.t_ns);
    let raised = after_enqueue(raise_ts);
    let new_run = after_enqueue(entry_ts);
    let context = if recv.comm.as_bytes().starts_with(b"ksoftirqd/") {
        SoftirqContext::Ksoftirqd
    } else if p.sender().is_some_and(|s| s.tid == recv.tid) {
        SoftirqContext::Inline
    } else {
        SoftirqContext::Other
    };
    let mk = |stage, t_ns| Stage {
        stage,
        t_ns,
        cpu: recv.cpu,
        pid: recv.pid,
        tid: recv.tid,
        comm: recv.comm,
        dev: None,
    };
    // Placed where a stable sort by time puts them: after every stage at or before their time
    // (a sort of the whole path when the path is not in time order, which hooks on different
    // CPUs can make it).
    let sorted = p.stages.is_sorted_by_key(|s| s.t_ns);
    for (added, kind, t) in [
        (raised, StageKind::SoftirqRaise, raise_ts),
        (new_run, StageKind::SoftirqEntry, entry_ts),
    ] {
        if !added {
            continue;
        }
        if sorted {
            let at = p.stages.partition_point(|s| s.t_ns <= t);
            p.stages.insert(at, mk(kind, t));
        } else {
            p.stages.push(mk(kind, t));
        }
    }
    if !sorted && (raised || new_run) {
        p.stages.sort_by_key(|s| s.t_ns);
    }
    p.softirq = Some(Softirq {
        cpu: recv.cpu,
        context,
        task: recv.comm,
        pid: recv.pid,
        raised,
        new_run,
    });
}
