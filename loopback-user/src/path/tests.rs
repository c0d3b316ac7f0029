//! Reconstruction from recorded event sequences.
use std::net::IpAddr;

use std::collections::HashMap;

use loopback_common::{CONSUME_GSO_SPLIT, CONSUME_GSO_SPLIT_UNSEEN, Hook};

use super::{
    tracker::{SEND_LINK_INET_NS, SEND_LINK_NS},
    *,
};
use crate::decode::{Event, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, PacketInfo};
use crate::decode::{Icmp, Tcp};

pub(crate) struct Seq {
    pub t: u64,
    pub events: Vec<Event>,
}

pub(crate) fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

pub(crate) fn icmp_info(src: &str, dst: &str, ty: u8, id: u16, seq: u16) -> PacketInfo {
    PacketInfo {
        src: ip(src),
        dst: ip(dst),
        proto: if src.contains(':') { PROTO_ICMPV6 } else { PROTO_ICMP },
        sport: None,
        dport: None,
        icmp: Some(Icmp { ty, code: 0, id, seq }),
        tcp: None,
        l4_payload_len: None,
    }
}

impl Seq {
    pub fn new() -> Self {
        Self {
            t: 1_000,
            events: Vec::new(),
        }
    }
    #[allow(clippy::too_many_arguments)]
    pub fn ev(
        &mut self,
        hook: Hook,
        skb: u64,
        tid: u32,
        comm: &str,
        dev: &str,
        info: Option<PacketInfo>,
        arg0: u64,
        arg1: u64,
    ) -> u64 {
        self.t += 100;
        self.events.push(Event {
            ts_ns: self.t,
            skb,
            tgid: tid,
            tid,
            comm: comm.into(),
            ifname: dev.into(),
            ifindex: 1,
            cpu: 0,
            len: 84,
            hook,
            arg0,
            arg1,
            packet: info,
            route: None,
            wire: None,
        });
        self.t
    }
    /// The lo transmit + inline receive of one skb, up to (not including) its end.
    pub fn lo_path(&mut self, skb: u64, tid: u32, comm: &str, info: PacketInfo, raise: bool) {
        self.ev(Hook::TcEgress, skb, tid, comm, "lo", Some(info.clone()), 0, 0);
        self.ev(Hook::DevQueue, skb, tid, comm, "lo", Some(info.clone()), 0, 0);
        self.ev(Hook::Xmit, skb, tid, comm, "lo", None, 0, 0);
        let enq = self.ev(Hook::BacklogEnqueue, skb, tid, comm, "", None, 0, 0);
        self.ev(Hook::XmitDone, skb, tid, comm, "lo", None, 0, 0);
        let raise_ts = if raise { enq + 10 } else { 0 };
        let entry_ts = if raise { enq + 150 } else { 0 };
        self.ev(
            Hook::Receive,
            skb,
            tid,
            comm,
            "lo",
            Some(info.clone()),
            entry_ts,
            raise_ts,
        );
        self.ev(Hook::Xdp, skb, tid, comm, "lo", Some(info), 0, 0);
    }
}

fn drops() -> HashMap<u64, String> {
    HashMap::from([(2, "NO_SOCKET".to_string()), (5, "NOT_SPECIFIED".to_string())])
}

fn run(events: Vec<Event>) -> (Vec<PacketPath>, Stats) {
    crate::fixture::reconstruct_events(events, drops())
}

#[test]
fn an_skb_split_into_gso_segments_gives_one_record_per_segment() {
    gso_split(CONSUME_GSO_SPLIT);
}

/// The split skb's free never reached the program (a recursion miss): the kernel program
/// found the split at the first segment's transmit and staged it then, marked so.
#[test]
fn a_split_found_at_its_first_segment_gives_the_same_records() {
    gso_split(CONSUME_GSO_SPLIT_UNSEEN);
}

fn gso_split(marker: u64) {
    let mut s = Seq::new();
    let big = icmp_info("127.0.0.1", "127.0.0.1", 8, 1, 1);
    // An older packet at 0xc0 whose free fired no tracepoint: still open there.
    s.lo_path(0xc0, 9, "other", icmp_info("127.0.0.1", "127.0.0.1", 8, 9, 9), false);
    s.ev(Hook::AppSend, 0, 7, "app", "", None, 44, 0);
    s.ev(Hook::TcEgress, 0xa0, 7, "app", "lo", Some(big.clone()), 0, 0);
    s.ev(Hook::DevQueue, 0xa0, 7, "app", "lo", None, 0, 0);
    // validate_xmit_skb: segmented, the original consumed before the driver.
    s.ev(Hook::Consume, 0xa0, 7, "app", "", None, marker, 0);
    for (seg, n) in [(0xb0, 1u16), (0xc0, 2)] {
        let info = icmp_info("127.0.0.1", "127.0.0.1", 8, 1, n);
        s.ev(Hook::Xmit, seg, 7, "app", "lo", Some(info.clone()), 0, 0xa0);
        s.ev(Hook::BacklogEnqueue, seg, 7, "app", "", None, 0, 0);
        s.ev(Hook::XmitDone, seg, 7, "app", "lo", None, 0, 0);
        s.ev(Hook::Receive, seg, 7, "app", "lo", Some(info), 0, 0);
        s.ev(Hook::TcIngress, seg, 7, "app", "lo", None, 0, 0);
        s.ev(Hook::Consume, seg, 7, "app", "", None, 0, 0);
    }
    let (ps, stats) = run(s.events);
    // The old packet at 0xc0 ends where the segment at its address starts; the split skb
    // is no record of its own: the two segments are.
    assert_eq!(ps.len(), 3, "{ps:#?}");
    let id = |p: &PacketPath| p.info.as_ref().and_then(|i| i.icmp).map(|i| i.id);
    assert_eq!(ps.iter().filter(|p| id(p) == Some(9)).count(), 1, "the old packet");
    assert_eq!(stats.gso_splits, 1);
    assert_eq!(stats.packets, 3);
    let segs: Vec<&PacketPath> = ps.iter().filter(|p| id(p) == Some(1)).collect();
    assert_eq!(segs.len(), 2);
    for (p, n) in segs.into_iter().zip([1u16, 2]) {
        let kinds: Vec<_> = p.stages.iter().map(|s| s.stage).collect();
        assert_eq!(
            kinds[..5],
            [
                StageKind::AppSend,
                StageKind::TcEgress,
                StageKind::DevQueue,
                StageKind::GsoSegment,
                StageKind::Xmit
            ]
        );
        assert_eq!(kinds.iter().filter(|k| **k == StageKind::Xmit).count(), 1);
        assert_eq!(
            p.info.as_ref().and_then(|i| i.icmp).map(|i| i.seq),
            Some(n),
            "own headers"
        );
        assert!(p.complete);
        assert_eq!(p.verdict, Verdict::Consumed);
    }
}

#[test]
fn a_send_syscall_starts_its_threads_next_packet_only_if_recent() {
    let mut s = Seq::new();
    let info = icmp_info("127.0.0.1", "127.0.0.1", 8, 1, 1);
    s.ev(Hook::AppSend, 0, 7, "app", "", None, 44, 0);
    s.ev(Hook::AppSend, 0, 8, "other", "", None, 44, 0);
    s.lo_path(0xa0, 7, "app", info.clone(), true);
    s.ev(Hook::Consume, 0xa0, 7, "app", "", None, 0, 0);
    // A send whose thread transmits only twice the link window later (e.g. it was a UNIX
    // socket): not linked.
    s.ev(Hook::AppSend, 0, 7, "app", "", None, 46, 0);
    s.t += 2 * SEND_LINK_NS;
    s.lo_path(0xb0, 7, "app", info, true);
    s.ev(Hook::Consume, 0xb0, 7, "app", "", None, 0, 0);
    let (ps, _) = run(s.events);
    assert_eq!(ps[0].stages[0].stage, StageKind::AppSend);
    assert_eq!(ps[0].stages[0].tid, 7, "linked by thread, not to thread 8's send");
    assert_eq!(ps[0].stages[1].stage, StageKind::TcEgress);
    assert_eq!(ps[1].stages[0].stage, StageKind::TcEgress, "stale send not linked");
    assert!(ps.iter().all(|p| p.complete));
}

#[test]
fn an_inet_send_links_its_transmit_even_when_slow() {
    // Seen at the socket layer, the send is an inet send: its transmit is linked beyond the
    // short window (an emulated guest took 13.6 ms), up to the longer bound.
    let mut s = Seq::new();
    let info = icmp_info("::1", "::1", 128, 1, 1);
    for gap in [2 * SEND_LINK_NS, 2 * SEND_LINK_INET_NS] {
        s.ev(Hook::AppSend, 0, 7, "ping", "", None, 44, 0);
        s.ev(Hook::SockSend, 0, 7, "ping", "", None, 0xf00, 0);
        s.t += gap;
        let skb = 0xa0 + gap;
        s.lo_path(skb, 7, "ping", info.clone(), true);
        s.ev(Hook::Consume, skb, 7, "ping", "", None, 0, 0);
    }
    let (ps, _) = run(s.events);
    let first = |p: &PacketPath| p.stages.iter().take(2).map(|s| s.stage).collect::<Vec<_>>();
    assert_eq!(first(&ps[0]), [StageKind::AppSend, StageKind::SockSend]);
    assert_eq!(
        first(&ps[1])[0],
        StageKind::TcEgress,
        "beyond the longer bound: not linked"
    );
}

#[test]
fn a_socket_layer_send_follows_the_syscall_in_its_threads_next_packet() {
    let mut s = Seq::new();
    let info = icmp_info("127.0.0.1", "127.0.0.1", 8, 1, 1);
    s.ev(Hook::AppSend, 0, 7, "app", "", None, 44, 0);
    s.ev(Hook::SockSend, 0, 7, "app", "", None, 0xf00, 0);
    s.lo_path(0xa0, 7, "app", info.clone(), true);
    s.ev(Hook::Consume, 0xa0, 7, "app", "", None, 0, 0);
    // A later syscall without a socket-layer send (its hook missing) links the syscall alone.
    s.ev(Hook::SockSend, 0, 7, "app", "", None, 0xf00, 0);
    s.ev(Hook::AppSend, 0, 7, "app", "", None, 44, 0);
    s.lo_path(0xb0, 7, "app", info, true);
    s.ev(Hook::Consume, 0xb0, 7, "app", "", None, 0, 0);
    let (ps, _) = run(s.events);
    let kinds = |p: &PacketPath| p.stages.iter().take(3).map(|s| s.stage).collect::<Vec<_>>();
    assert_eq!(
        kinds(&ps[0]),
        [StageKind::AppSend, StageKind::SockSend, StageKind::TcEgress]
    );
    assert_eq!(
        kinds(&ps[1])[..2],
        [StageKind::AppSend, StageKind::TcEgress],
        "a socket send older than the syscall is not this packet's"
    );
    assert!(ps.iter().all(|p| p.complete));
}

/// ping 127.0.0.1 over a raw socket: request, reply (original freed NO_SOCKET), clone delivered.
pub(crate) fn raw_ping_sequence() -> Vec<Event> {
    let mut s = Seq::new();
    let req = icmp_info("127.0.0.1", "127.0.0.1", 8, 77, 1);
    let rep = icmp_info("127.0.0.1", "127.0.0.1", 0, 77, 1);
    s.lo_path(0xa000, 500, "ping", req, true);
    // icmp_echo builds the reply inside the softirq, in the sender's task.
    s.lo_path(0xb000, 500, "ping", rep.clone(), false);
    s.ev(Hook::Consume, 0xa000, 500, "ping", "", None, 0, 0);
    s.ev(Hook::Free, 0xb000, 500, "ping", "", None, 2, 0);
    s.ev(Hook::CopyToUser, 0xc000, 500, "ping", "", Some(rep), 64, 0);
    s.ev(Hook::Consume, 0xc000, 500, "ping", "", None, 0, 0);
    s.events
}

/// The clone's socket copy reaches the ring before the original's free (the reader ran on the
/// other CPU while the softirq was still finishing the original): the same verdicts, and the
/// original is not held waiting for a clone that was seen already, however long its free takes.
#[test]
fn a_clone_read_before_its_original_is_freed_still_makes_the_original_delivered_clone() {
    let mut evs = raw_ping_sequence();
    let free = evs.iter().position(|e| e.hook == Hook::Free).expect("free");
    let copy = evs.iter().position(|e| e.hook == Hook::CopyToUser).expect("copy");
    let mut f = evs.remove(free);
    // Long after the copy (far beyond the clone wait): time decides nothing.
    f.ts_ns = evs[copy - 1].ts_ns + 10_000_000_000;
    evs.insert(copy, f);
    let mut t = Tracker::new(TrackerConfig::default(), drops());
    let mut done = Vec::new();
    for mut e in evs {
        t.push_into(&mut e, &mut done);
    }
    let rep = done
        .iter()
        .find(|p| p.skb == 0xb000)
        .expect("reply finished at its free, not held")
        .clone();
    assert_eq!(rep.verdict, Verdict::DeliveredClone, "{rep:#?}");
    assert!(rep.complete);
    done.extend(t.flush());
    let clone = done.iter().find(|p| p.skb == 0xc000).expect("clone");
    assert_eq!(clone.clone_of, Some(rep.id));
    assert!(t.stats.drops.is_empty(), "{:?}", t.stats.drops);
    assert!(t.clone_read.is_empty());
}

#[test]
fn raw_ping_is_reconstructed_paired_and_not_a_drop() {
    let (paths, stats) = run(raw_ping_sequence());
    assert_eq!(paths.len(), 3, "{paths:#?}");
    let req = paths.iter().find(|p| p.skb == 0xa000).expect("request");
    let rep = paths.iter().find(|p| p.skb == 0xb000).expect("reply");
    let clone = paths.iter().find(|p| p.skb == 0xc000).expect("clone");
    assert_eq!(
        req.stage_names(),
        [
            "tc_egress",
            "dev_queue",
            "xmit",
            "backlog_enqueue",
            "softirq_raise",
            "xmit_done",
            "softirq_entry",
            "receive",
            "xdp",
            "consume"
        ]
    );
    assert_eq!(req.verdict, Verdict::Consumed);
    assert!(req.complete && !req.left_host());
    assert_eq!((req.tx_dev.as_deref(), req.rx_dev.as_deref()), (Some("lo"), Some("lo")));
    let si = req.softirq.as_ref().expect("softirq");
    assert_eq!(
        (si.context, si.raised, si.new_run),
        (SoftirqContext::Inline, true, true)
    );
    // The reply rode the already-running softirq: no raise, no new run.
    assert!(!rep.has(StageKind::SoftirqRaise) && !rep.has(StageKind::SoftirqEntry));
    assert_eq!(rep.reply_of, Some(req.id));
    assert_eq!(rep.verdict, Verdict::DeliveredClone);
    assert!(rep.complete);
    assert_eq!(clone.clone_of, Some(rep.id));
    assert_eq!(clone.reply_of, Some(req.id));
    assert!(
        stats.drops.is_empty(),
        "NO_SOCKET with a delivered clone is not a drop: {:?}",
        stats.drops
    );
    // Two lo crossings; the clone is a copy, printed but not a packet.
    assert_eq!((stats.packets, stats.complete, stats.copies), (2, 2, 1));
}

#[test]
fn no_socket_without_clone_is_a_drop_after_the_wait() {
    let mut s = Seq::new();
    let rep = icmp_info("127.0.0.1", "127.0.0.1", 0, 1, 1);
    s.lo_path(0xb000, 9, "x", rep, true);
    s.ev(Hook::Free, 0xb000, 9, "x", "", None, 2, 0);
    let mut t = Tracker::new(TrackerConfig::default(), drops());
    let mut out = Vec::new();
    for mut e in s.events {
        out.extend(t.push(&mut e));
    }
    assert!(out.is_empty(), "held while waiting for a clone");
    out.extend(t.expire(s.t + 2_000_000_000));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].verdict, Verdict::Dropped);
    assert_eq!(t.stats.drops.get("NO_SOCKET"), Some(&1));
}

#[test]
fn address_reuse_starts_a_new_packet() {
    let mut s = Seq::new();
    let a = icmp_info("127.0.0.1", "127.0.0.2", 8, 1, 1);
    let b = icmp_info("127.0.0.1", "127.0.0.2", 8, 1, 2);
    s.lo_path(0x1000, 1, "a", a, true);
    s.ev(Hook::Consume, 0x1000, 1, "a", "", None, 0, 0);
    s.lo_path(0x1000, 1, "a", b, true);
    s.ev(Hook::Consume, 0x1000, 1, "a", "", None, 0, 0);
    let (paths, _) = run(s.events);
    assert_eq!(paths.len(), 2);
    assert_ne!(paths[0].id, paths[1].id);
    assert_eq!(paths[0].info.as_ref().and_then(|i| i.icmp).map(|i| i.seq), Some(1));
    assert_eq!(paths[1].info.as_ref().and_then(|i| i.icmp).map(|i| i.seq), Some(2));
}

/// Measured on one host: where a softirq ran on top of one particular process, the kernel ran
/// no BPF tracing program (nor bpftrace's), while lo's tc programs still saw each packet. Each
/// crossing passes tc egress and tc ingress once, so a second one at an address is a new
/// packet: nothing is merged, and the count stays the kernel's.
#[test]
fn a_second_tc_egress_or_ingress_at_an_address_is_a_new_packet() {
    let mut s = Seq::new();
    let a = icmp_info("127.0.0.1", "127.0.0.1", 8, 1, 1);
    let b = icmp_info("127.0.0.1", "127.0.0.1", 8, 1, 2);
    // A crossing seen in full, whose free fired no tracepoint.
    s.lo_path(0xa0, 1, "a", a.clone(), false);
    s.ev(Hook::TcIngress, 0xa0, 1, "a", "lo", None, 0, 0);
    // Two crossings at its address seen at tc ingress only (GSO segments of an skb seen at
    // tc egress only, at 0xb0).
    s.ev(Hook::TcEgress, 0xb0, 1, "a", "lo", Some(b.clone()), 0, 0);
    s.ev(Hook::TcIngress, 0xa0, 1, "a", "lo", Some(b.clone()), 0, 0);
    s.ev(Hook::TcIngress, 0xa0, 1, "a", "lo", Some(b.clone()), 0, 0);
    // A crossing at 0xa0 whose transmit hooks did not run, received where they do.
    s.ev(Hook::Receive, 0xa0, 1, "a", "lo", Some(b.clone()), 0, 0);
    s.ev(Hook::TcIngress, 0xa0, 1, "a", "lo", None, 0, 0);
    // A later transmit at 0xb0, seen in full.
    s.lo_path(0xb0, 1, "a", b, false);
    s.ev(Hook::TcIngress, 0xb0, 1, "a", "lo", None, 0, 0);
    s.ev(Hook::Consume, 0xb0, 1, "a", "", None, 0, 0);
    s.ev(Hook::Consume, 0xa0, 1, "a", "", None, 0, 0);
    let (ps, stats) = run(s.events);
    let count = |p: &PacketPath, k: StageKind| p.stages.iter().filter(|s| s.stage == k).count();
    for p in &ps {
        assert!(count(p, StageKind::TcEgress) <= 1, "{p:#?}");
        assert_eq!(count(p, StageKind::TcIngress), 1, "{p:#?}");
        assert!(count(p, StageKind::Receive) <= 1, "{p:#?}");
    }
    assert_eq!(ps.len(), 5, "{ps:#?}");
    assert_eq!(stats.packets, 5);
    assert_eq!((stats.tc_only.ingress, stats.tc_only.egress), (2, 1));
    let only_ingress: Vec<_> = ps
        .iter()
        .filter(|p| p.stages[0].stage == StageKind::TcIngress)
        .collect();
    assert_eq!(only_ingress.len(), 2);
    assert!(
        only_ingress.iter().all(|p| !p.complete),
        "a crossing seen at tc ingress only is not complete"
    );
    assert_eq!(ps.iter().filter(|p| p.complete).count(), 2);
}

/// Seen in CI: a TCP ACK sent from a softirq on top of this host's PID 1, for which the kernel
/// ran no tracing program at all, passed lo's tc egress and tc ingress and nothing between. It
/// is one crossing and one record, but not a complete one, and `tc_only.both` counts it.
#[test]
fn a_crossing_seen_by_tc_programs_only_is_its_own_incomplete_record_and_counted() {
    let mut s = Seq::new();
    let a = icmp_info("127.0.0.1", "127.0.0.1", 8, 1, 1);
    let b = icmp_info("127.0.0.1", "127.0.0.1", 8, 1, 2);
    s.lo_path(0xa0, 1, "a", a, false);
    s.ev(Hook::TcIngress, 0xa0, 1, "a", "lo", None, 0, 0);
    s.ev(Hook::TcEgress, 0xa0, 1, "a", "lo", Some(b.clone()), 0, 0);
    s.ev(Hook::TcIngress, 0xa0, 1, "a", "lo", Some(b), 0, 0);
    s.ev(Hook::Consume, 0xa0, 1, "a", "", None, 0, 0);
    let (ps, stats) = run(s.events);
    assert_eq!(ps.len(), 2, "{ps:#?}");
    assert_eq!(stats.packets, 2);
    assert!(ps[0].complete, "{:#?}", ps[0]);
    assert_eq!(ps[1].stage_names(), ["tc_egress", "tc_ingress", "consume"]);
    assert!(!ps[1].complete, "no transmit, backlog or receive seen: {:#?}", ps[1]);
    assert_eq!(stats.complete, 1);
    assert_eq!(
        (stats.tc_only.ingress, stats.tc_only.both, stats.tc_only.egress),
        (0, 1, 0)
    );
}

#[test]
fn ksoftirqd_and_other_contexts_are_told_apart() {
    let mut s = Seq::new();
    let info = icmp_info("::1", "::1", 128, 1, 1);
    s.ev(Hook::DevQueue, 0x1, 10, "sender", "lo", Some(info.clone()), 0, 0);
    s.ev(Hook::Xmit, 0x1, 10, "sender", "lo", None, 0, 0);
    s.ev(Hook::BacklogEnqueue, 0x1, 10, "sender", "", None, 0, 0);
    s.ev(Hook::Receive, 0x1, 15, "ksoftirqd/0", "lo", None, 0, 0);
    s.ev(Hook::Consume, 0x1, 15, "ksoftirqd/0", "", None, 0, 0);
    s.ev(Hook::DevQueue, 0x2, 10, "sender", "lo", Some(info.clone()), 0, 0);
    s.ev(Hook::Xmit, 0x2, 10, "sender", "lo", None, 0, 0);
    s.ev(Hook::BacklogEnqueue, 0x2, 10, "sender", "", None, 0, 0);
    s.ev(Hook::Receive, 0x2, 77, "bash", "lo", None, 0, 0);
    s.ev(Hook::Consume, 0x2, 77, "bash", "", None, 0, 0);
    let (paths, stats) = run(s.events);
    let ctx: Vec<_> = paths.iter().map(|p| p.softirq.as_ref().map(|s| s.context)).collect();
    assert_eq!(ctx, [Some(SoftirqContext::Ksoftirqd), Some(SoftirqContext::Other)]);
    assert_eq!(stats.by_context().get("ksoftirqd"), Some(&1));
}

#[allow(clippy::too_many_arguments)] // a TCP header's fields, in header order
fn tcp(src: &str, sport: u16, dst: &str, dport: u16, seq: u32, ack: u32, flags: u8, payload: u32) -> PacketInfo {
    PacketInfo {
        src: ip(src),
        dst: ip(dst),
        proto: PROTO_TCP,
        sport: Some(sport),
        dport: Some(dport),
        icmp: None,
        tcp: Some(Tcp { seq, ack, flags }),
        l4_payload_len: Some(payload),
    }
}

#[test]
fn tcp_segments_pair_with_their_acks_and_untraced_frees_are_complete() {
    let mut s = Seq::new();
    // SYN, SYN-ACK, ACK, data 100 bytes, ACK of data. No free tracepoints at all (TCP).
    let segs = [
        tcp("10.0.0.1", 40000, "10.0.0.1", 80, 1000, 0, 0x02, 0),
        tcp("10.0.0.1", 80, "10.0.0.1", 40000, 5000, 1001, 0x12, 0),
        tcp("10.0.0.1", 40000, "10.0.0.1", 80, 1001, 5001, 0x10, 0),
        tcp("10.0.0.1", 40000, "10.0.0.1", 80, 1001, 5001, 0x18, 100),
        tcp("10.0.0.1", 80, "10.0.0.1", 40000, 5001, 1101, 0x10, 0),
    ];
    for (i, seg) in segs.iter().enumerate() {
        s.lo_path(0x100 + i as u64, 3, "curl", seg.clone(), i == 0);
    }
    let (paths, stats) = run(s.events);
    assert_eq!(paths.len(), 5);
    assert_eq!(paths[1].reply_of, Some(paths[0].id), "SYN-ACK answers SYN");
    assert_eq!(paths[2].reply_of, Some(paths[1].id), "ACK answers SYN-ACK");
    assert_eq!(paths[3].reply_of, None, "data carries no new ACK");
    assert_eq!(paths[4].reply_of, Some(paths[3].id), "ACK answers data");
    assert!(paths.iter().all(|p| p.verdict == Verdict::FreedUntraced && p.complete));
    assert_eq!(stats.complete, 5);
}

#[test]
fn idle_packets_expire_and_are_counted() {
    let mut s = Seq::new();
    let info = icmp_info("127.0.0.1", "127.0.0.1", 8, 1, 1);
    s.ev(Hook::DevQueue, 0x9, 1, "a", "lo", Some(info), 0, 0);
    let mut t = Tracker::new(TrackerConfig::default(), drops());
    for mut e in s.events {
        assert!(t.push(&mut e).is_empty());
    }
    assert!(t.expire(s.t + 1_000).is_empty(), "not idle yet");
    let out = t.expire(s.t + 3_000_000_000);
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].verdict, out[0].complete), (Verdict::Expired, false));
    assert_eq!(t.stats.expired, 1);
    assert_eq!(t.inflight(), 0);
}

#[test]
fn inflight_is_bounded() {
    let cfg = TrackerConfig {
        max_inflight: 10,
        ..TrackerConfig::default()
    };
    let mut t = Tracker::new(cfg, drops());
    let mut s = Seq::new();
    for i in 0..50u64 {
        s.ev(Hook::DevQueue, 0x1000 + i, 1, "a", "lo", None, 0, 0);
    }
    let mut out = Vec::new();
    for mut e in s.events {
        out.extend(t.push(&mut e));
    }
    assert!(t.inflight() <= 10);
    assert_eq!(out.len(), 40);
    assert_eq!(t.stats.expired, 40);
}

#[test]
fn udp_is_delivered_by_the_applications_read() {
    let mut s = Seq::new();
    let info = PacketInfo {
        proto: PROTO_UDP,
        sport: Some(1),
        dport: Some(2),
        icmp: None,
        ..icmp_info("127.0.0.1", "127.0.0.1", 0, 0, 0)
    };
    s.lo_path(0x7, 1, "a", info.clone(), true);
    s.ev(Hook::SockQueue, 0x7, 1, "a", "", None, 0xfeed, 0);
    s.ev(Hook::SockQueue, 0x7, 1, "a", "", None, 0xfeed, 0); // duplicate: ignored
    s.ev(Hook::AppRecv, 0, 2, "b", "", None, 0xbeef, 64); // other socket: nothing
    s.ev(Hook::AppRecv, 0, 2, "b", "", None, 0xfeed, 64);
    // Its free, deferred to the CPU that allocated it (`skb_defer_free_flush`), comes after
    // the read: the end of a packet that ended, no packet of its own.
    s.ev(Hook::Consume, 0x7, 3, "c", "", None, 0, 0);
    let (paths, stats) = run(s.events);
    assert_eq!(paths.len(), 1, "{paths:#?}");
    assert_eq!((stats.packets, stats.frees_after_end), (1, 1));
    assert_eq!(paths[0].verdict, Verdict::Delivered);
    assert!(paths[0].complete);
    assert_eq!(paths[0].stage_names().iter().filter(|s| **s == "sock_queue").count(), 1);
    assert_eq!(
        paths[0].stages.last().map(|s| (s.stage, s.tid)),
        Some((StageKind::AppRecv, 2))
    );
}

#[test]
fn a_read_whose_packet_its_free_already_ended_delivers_no_other() {
    // Where a function hook sees UDP's free (inside recvmsg), each read shows as the packet's
    // own `consume`, then the read. Two packets queued: each read is its own packet's, and the
    // second packet is not delivered by the first read (nor its free left over as a packet).
    let udp = |sport| PacketInfo {
        proto: PROTO_UDP,
        sport: Some(sport),
        dport: Some(2),
        icmp: None,
        ..icmp_info("127.0.0.1", "127.0.0.1", 0, 0, 0)
    };
    let mut s = Seq::new();
    for (skb, sport) in [(0x7, 1), (0x8, 3)] {
        s.lo_path(skb, 1, "a", udp(sport), true);
        s.ev(Hook::SockQueue, skb, 1, "a", "", None, 0xfeed, 0);
    }
    for skb in [0x7, 0x8] {
        s.ev(Hook::Consume, skb, 2, "b", "", None, 0, 0);
        s.ev(Hook::AppRecv, 0, 2, "b", "", None, 0xfeed, 64);
    }
    let (paths, stats) = run(s.events);
    let got: Vec<_> = paths.iter().map(|p| (p.skb, p.verdict, p.complete)).collect();
    assert_eq!(got, [(0x7, Verdict::Consumed, true), (0x8, Verdict::Consumed, true)]);
    assert_eq!(stats.packets, 2);

    // Without that hook, each read delivers; a packet dropped from the queue was not read.
    let mut s = Seq::new();
    for (skb, sport) in [(0x7, 1), (0x8, 3), (0x9, 5)] {
        s.lo_path(skb, 1, "a", udp(sport), true);
        s.ev(Hook::SockQueue, skb, 1, "a", "", None, 0xfeed, 0);
    }
    s.ev(Hook::Free, 0x7, 1, "a", "", None, 2, 0);
    s.ev(Hook::AppRecv, 0, 2, "b", "", None, 0xfeed, 64);
    s.ev(Hook::AppRecv, 0, 2, "b", "", None, 0xfeed, 64);
    let (paths, _) = run(s.events);
    let got: Vec<_> = paths.iter().map(|p| (p.skb, p.verdict)).collect();
    assert_eq!(
        got,
        [
            (0x7, Verdict::Dropped),
            (0x8, Verdict::Delivered),
            (0x9, Verdict::Delivered)
        ]
    );
}

#[test]
fn packet_sent_on_another_device_left_the_host() {
    let mut s = Seq::new();
    let info = PacketInfo {
        proto: PROTO_UDP,
        ..icmp_info("10.1.0.1", "10.1.0.2", 8, 1, 1)
    };
    s.ev(Hook::DevQueue, 0x5, 1, "a", "veth0", Some(info), 0, 0);
    s.ev(Hook::Xmit, 0x5, 1, "a", "veth0", None, 0, 0);
    s.ev(Hook::Consume, 0x5, 1, "a", "", None, 0, 0);
    let (paths, _) = run(s.events);
    assert!(paths[0].left_host());
    assert_eq!(paths[0].tx_dev.as_deref(), Some("veth0"));
    assert!(paths[0].complete);
}

/// Tracing switched on while a ping's request was half-way through lo: its path starts at its
/// transmit, without the hooks that ran before the switch, on a CPU where no transmit had
/// started yet. It is one caught in flight at the start, counted apart and not in `packets`; its
/// reply, seen whole, is a packet. The same broken path after a transmit started on that CPU is
/// an incomplete packet, however soon after the switch (no time window decides it); without the
/// switch (an old recording) too.
#[test]
fn a_packet_caught_part_way_when_tracing_starts_is_counted_apart() {
    let cut: Vec<Event> = raw_ping_sequence()
        .into_iter()
        .filter(|e| !(e.skb == 0xa000 && matches!(e.hook, Hook::TcEgress | Hook::DevQueue)))
        .collect();
    let run = |since: u64, evs: &[Event]| {
        let mut t = Tracker::new(
            TrackerConfig {
                tracing_since_ns: since,
                ..TrackerConfig::default()
            },
            drops(),
        );
        let mut done = Vec::new();
        for e in evs {
            t.push_into(&mut e.clone(), &mut done);
        }
        done.extend(t.flush());
        (done, t.stats)
    };
    let (ps, stats) = run(1, &cut);
    let req = ps.iter().find(|p| p.skb == 0xa000).expect("request");
    assert!(req.in_flight_at_start && !req.complete && req.partial(), "{req:#?}");
    assert_eq!((stats.packets, stats.complete, stats.in_flight_at_start), (1, 1, 1));
    // A whole ping first (other addresses), 50 us earlier: then the cut one is a broken packet.
    let mut after: Vec<Event> = raw_ping_sequence()
        .into_iter()
        .map(|mut e| {
            e.skb += 0x100;
            e
        })
        .collect();
    after.extend(cut.iter().cloned().map(|mut e| {
        e.ts_ns += 50_000;
        e
    }));
    let (ps, stats) = run(1, &after);
    assert!(!ps.iter().any(|p| p.in_flight_at_start));
    assert_eq!((stats.packets, stats.complete, stats.in_flight_at_start), (4, 3, 0));
    let (_, stats) = run(0, &cut);
    assert_eq!((stats.packets, stats.in_flight_at_start), (2, 0));
}

/// A packet still in flight when tracing stops is not a packet of the run: `--count 2` on a
/// ping-pong says "2 packets, 2 complete (100%), 1 in flight at stop".
#[test]
fn a_packet_in_flight_at_stop_is_counted_apart() {
    let mut evs = raw_ping_sequence();
    let mut s = Seq::new();
    s.t = evs.last().expect("events").ts_ns;
    let next = icmp_info("127.0.0.1", "127.0.0.1", 8, 77, 2);
    s.ev(Hook::TcEgress, 0xd000, 500, "ping", "lo", Some(next.clone()), 0, 0);
    s.ev(Hook::DevQueue, 0xd000, 500, "ping", "lo", Some(next), 0, 0);
    evs.extend(s.events);
    let (ps, stats) = run(evs);
    let cut = ps.iter().find(|p| p.skb == 0xd000).expect("in flight");
    assert_eq!(cut.verdict, Verdict::InFlight);
    assert!(cut.partial());
    assert_eq!((stats.packets, stats.complete, stats.in_flight_at_end), (2, 2, 1));
}
