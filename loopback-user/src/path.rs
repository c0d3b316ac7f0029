//! Path reconstruction: pure, driven only by decoded events (unit-tested on recorded sequences).
//!
//! Identity: an skb address names one packet from its first hook until a free hook; the next
//! event on the same address starts a new packet (address + generation). Clones (raw sockets)
//! start at `copy_to_user` and are linked to their original by headers; ICMP echo replies and
//! TCP ACKs are linked to what they answer (`reply_of`).
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::IpAddr,
};

use hdrhistogram::Histogram;
// FxHash: the tracker's maps are keyed by skb addresses and small tuples, on the per-event hot
// path; SipHash's DoS resistance buys nothing here and costs a third of the lookup time.
use loopback_common::{CONSUME_GSO_SPLIT, Hook};
use rustc_hash::FxHashMap;

use crate::decode::{Event, Name, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, PacketInfo, RouteInfo};

/// A stage of a packet's path. Compared and indexed as a small integer on the per-event hot
/// path; its name ([`StageKind::as_str`]) is part of the JSON schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StageKind {
    AppSend,
    SockSend,
    Route,
    TcEgress,
    DevQueue,
    /// `validate_xmit_skb` split the skb into GSO segments (its free, inside `__dev_queue_xmit`):
    /// each segment is its own lo crossing, whose path goes on from here.
    GsoSegment,
    Xmit,
    BacklogEnqueue,
    SoftirqRaise,
    XmitDone,
    SoftirqEntry,
    Receive,
    Xdp,
    TcIngress,
    SockQueue,
    CopyToUser,
    AppRecv,
    Free,
    Consume,
    LeftNetns,
}

impl StageKind {
    /// The stage a hook marks.
    pub const fn of(h: Hook) -> Self {
        match h {
            Hook::Route => Self::Route,
            Hook::DevQueue => Self::DevQueue,
            Hook::TcEgress => Self::TcEgress,
            Hook::Xmit => Self::Xmit,
            Hook::BacklogEnqueue => Self::BacklogEnqueue,
            Hook::XmitDone => Self::XmitDone,
            Hook::Receive => Self::Receive,
            Hook::Xdp => Self::Xdp,
            Hook::TcIngress => Self::TcIngress,
            Hook::CopyToUser => Self::CopyToUser,
            Hook::Free => Self::Free,
            Hook::Consume => Self::Consume,
            Hook::SockQueue => Self::SockQueue,
            Hook::AppRecv => Self::AppRecv,
            Hook::LeftNetns => Self::LeftNetns,
            Hook::AppSend => Self::AppSend,
            Hook::SockSend => Self::SockSend,
        }
    }

    /// Stable stage names (part of the JSON schema).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::AppSend => "app_send",
            Self::SockSend => "sock_send",
            Self::Route => "route",
            Self::TcEgress => "tc_egress",
            Self::DevQueue => "dev_queue",
            Self::GsoSegment => "gso_segment",
            Self::Xmit => "xmit",
            Self::BacklogEnqueue => "backlog_enqueue",
            Self::SoftirqRaise => "softirq_raise",
            Self::XmitDone => "xmit_done",
            Self::SoftirqEntry => "softirq_entry",
            Self::Receive => "receive",
            Self::Xdp => "xdp",
            Self::TcIngress => "tc_ingress",
            Self::SockQueue => "sock_queue",
            Self::CopyToUser => "copy_to_user",
            Self::AppRecv => "app_recv",
            Self::Free => "free",
            Self::Consume => "consume",
            Self::LeftNetns => "left_netns",
        }
    }
}

impl std::fmt::Display for StageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stage {
    pub stage: StageKind,
    pub t_ns: u64,
    pub cpu: u32,
    pub pid: u32,
    pub tid: u32,
    pub comm: Name,
    pub dev: Option<Name>,
}

impl Stage {
    /// The stage an event marks, taken from the event itself.
    pub fn of(e: &Event, dev: Option<Name>) -> Self {
        Stage {
            stage: StageKind::of(e.hook),
            t_ns: e.ts_ns,
            cpu: e.cpu,
            pid: e.tgid,
            tid: e.tid,
            comm: e.comm,
            dev,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SoftirqContext {
    /// Run by the sending task itself when it re-enabled bottom halves (`__local_bh_enable_ip`).
    Inline,
    /// Run by a `ksoftirqd/N` thread.
    Ksoftirqd,
    /// Run in some other task's context (another task's BH enable, or on irq exit).
    Other,
}

impl SoftirqContext {
    pub fn as_str(&self) -> &'static str {
        match self {
            SoftirqContext::Inline => "inline",
            SoftirqContext::Ksoftirqd => "ksoftirqd",
            SoftirqContext::Other => "other",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Softirq {
    /// CPU whose backlog held the packet and ran the softirq.
    pub cpu: u32,
    pub context: SoftirqContext,
    pub task: Name,
    pub pid: u32,
    /// This packet's enqueue raised NET_RX (false: NAPI was already scheduled).
    pub raised: bool,
    /// The softirq run that received it started after the packet was queued.
    pub new_run: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Freed normally (`consume_skb`).
    Consumed,
    /// Read by the application; its free fires no tracepoint (UDP `copy_linear_skb` +
    /// `__consume_stateless_skb`). Not a drop.
    Delivered,
    /// Delivered to a socket through a clone; the original was freed because no other socket
    /// wanted it (raw-socket ping: NO_SOCKET on the original). Not a drop.
    DeliveredClone,
    /// Freed with a drop reason.
    Dropped,
    /// TCP skb freed on a path that fires no tracepoint, after it was received. Not a drop.
    FreedUntraced,
    /// Received by a device of another namespace (left through a veth): followed no further.
    LeftNetns,
    /// No end seen before expiry.
    Expired,
    /// Still in flight when tracing stopped.
    InFlight,
}

impl Verdict {
    pub fn as_str(&self) -> &'static str {
        match self {
            Verdict::Consumed => "consumed",
            Verdict::Delivered => "delivered",
            Verdict::DeliveredClone => "delivered_clone",
            Verdict::Dropped => "dropped",
            Verdict::FreedUntraced => "freed_untraced",
            Verdict::LeftNetns => "left_netns",
            Verdict::Expired => "expired",
            Verdict::InFlight => "in_flight",
        }
    }
}

#[derive(Clone, Debug)]
pub struct PacketPath {
    pub id: u64,
    pub skb: u64,
    pub stages: Vec<Stage>,
    pub info: Option<PacketInfo>,
    /// Largest `skb->len` while it crossed lo (transmit and receive hooks).
    pub len: u32,
    pub tx_dev: Option<Name>,
    pub rx_dev: Option<Name>,
    pub route: Option<RouteInfo>,
    pub softirq: Option<Softirq>,
    pub verdict: Verdict,
    pub drop_reason: Option<String>,
    pub reply_of: Option<u64>,
    pub clone_of: Option<u64>,
    pub complete: bool,
    receive_arg: Option<(u64, u64)>,
    /// The packet's bytes as first seen on `lo` (only when the decoder keeps them).
    pub wire: Option<Wire>,
}

/// Captured link-layer bytes of a packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wire {
    pub ts_ns: u64,
    /// Length of the whole packet (the capture may be shorter).
    pub orig_len: u32,
    pub bytes: Box<[u8]>,
}

impl PacketPath {
    pub fn left_host(&self) -> bool {
        self.tx_dev.as_deref().is_some_and(|d| d != "lo")
    }
    pub fn first_ts(&self) -> u64 {
        self.stages.first().map(|s| s.t_ns).unwrap_or(0)
    }
    pub fn last_ts(&self) -> u64 {
        self.stages.last().map(|s| s.t_ns).unwrap_or(0)
    }
    pub fn has(&self, stage: StageKind) -> bool {
        self.stages.iter().any(|s| s.stage == stage)
    }
    pub fn stage_names(&self) -> Vec<&'static str> {
        self.stages.iter().map(|s| s.stage.as_str()).collect()
    }
    /// Task that queued the packet for transmit (the sender), if seen.
    pub fn sender(&self) -> Option<&Stage> {
        self.stages.iter().find(|s| s.stage == StageKind::DevQueue)
    }
    pub fn is_drop(&self) -> bool {
        self.verdict == Verdict::Dropped
    }
    /// The drop reason a drop is counted under (the summary's and the dashboard's `drops`);
    /// `None` when it is no drop (a NO_SOCKET original whose clone was delivered).
    pub fn drop_label(&self) -> Option<String> {
        self.is_drop()
            .then(|| self.drop_reason.clone().unwrap_or_else(|| "unknown".into()))
    }
    /// First seen at the socket (`copy_to_user`): a copy of a packet, not a `lo` crossing of its
    /// own (a raw socket's clone, or a segment UDP cut from a GSO datagram at receive).
    pub fn is_copy(&self) -> bool {
        self.stages.first().is_some_and(|s| s.stage == StageKind::CopyToUser)
    }
}

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
    /// Copies first seen at the socket ([`PacketPath::is_copy`]): printed, not counted as
    /// packets.
    pub copies: u64,
    /// Per stage: latency from the previous stage, in ns.
    pub stage_latency: BTreeMap<StageKind, Histogram<u64>>,
    pub by_context: BTreeMap<&'static str, u64>,
}

#[derive(Clone, Copy, Debug)]
pub struct TrackerConfig {
    /// A packet with no event for this long (event clock) is finished as expired.
    pub max_idle_ns: u64,
    /// At most this many packets in flight; the oldest are expired beyond it.
    pub max_inflight: usize,
    /// How long a NO_SOCKET-freed ICMP packet waits for its delivered clone.
    pub clone_wait_ns: u64,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            max_idle_ns: 2_000_000_000,
            max_inflight: 65_536,
            clone_wait_ns: 1_000_000_000,
        }
    }
}

/// A send syscall links to its thread's next transmit only if that comes within this time (a
/// send that transmitted nothing, e.g. on a UNIX socket, must not claim a later packet).
/// Syscall entry to the first transmit hook takes microseconds on hardware, but up to about
/// 1.1 ms was measured inside an emulated (TCG) guest with classic tc; 10 ms keeps the link
/// there while a thread's later send syscall still replaces its pending one.
const SEND_LINK_NS: u64 = 10_000_000;

/// Key of an ICMP echo: (id, seq, requester address).
type EchoKey = (u16, u16, IpAddr);
/// One direction of a TCP flow.
type FlowKey = (IpAddr, u16, IpAddr, u16);

pub struct Tracker {
    cfg: TrackerConfig,
    /// Boxed: a packet moves out of and back into the map on every event.
    inflight: FxHashMap<u64, Box<PacketPath>>,
    next_id: u64,
    /// Latest route lookup per thread: the next transmit of that thread used it.
    last_route: FxHashMap<u32, (Stage, RouteInfo)>,
    /// Latest send-family syscall entry per thread (linked to its next transmit).
    last_send: FxHashMap<u32, Stage>,
    /// Per thread: its last `sock_sendmsg` (fentry/kprobe), linked like `last_send`.
    last_sock_send: FxHashMap<u32, Stage>,
    echo_requests: FxHashMap<EchoKey, u64>,
    echo_order: VecDeque<EchoKey>,
    tcp_unacked: FxHashMap<FlowKey, VecDeque<(u32, u64)>>,
    /// Finished packets held back until their delivered clone shows up (or the wait ends).
    awaiting_clone: VecDeque<PacketPath>,
    /// Per socket: UDP packets queued to it, oldest first (matched to the application's reads).
    sock_queues: FxHashMap<u64, VecDeque<u64>>,
    /// Per CPU: the skb just split into GSO segments there (address, path so far, segments
    /// seen). Its segments follow on the same CPU, inside the same `__dev_queue_xmit`.
    gso_parents: FxHashMap<u32, (u64, Box<PacketPath>, u32)>,
    drop_names: HashMap<u64, String>,
    pub stats: Stats,
}

pub fn is_echo_request(p: &PacketInfo) -> bool {
    matches!(
        (p.proto, p.icmp.map(|i| i.ty)),
        (PROTO_ICMP, Some(8)) | (PROTO_ICMPV6, Some(128))
    )
}
pub fn is_echo_reply(p: &PacketInfo) -> bool {
    matches!(
        (p.proto, p.icmp.map(|i| i.ty)),
        (PROTO_ICMP, Some(0)) | (PROTO_ICMPV6, Some(129))
    )
}

/// Two captures of the same packet bytes (original and clone).
fn same_headers(a: &PacketInfo, b: &PacketInfo) -> bool {
    a.src == b.src
        && a.dst == b.dst
        && a.proto == b.proto
        && a.icmp == b.icmp
        && a.sport == b.sport
        && a.dport == b.dport
}

impl Tracker {
    pub fn new(cfg: TrackerConfig, drop_names: HashMap<u64, String>) -> Self {
        Self {
            cfg,
            inflight: FxHashMap::default(),
            next_id: 1,
            last_route: FxHashMap::default(),
            last_send: FxHashMap::default(),
            last_sock_send: FxHashMap::default(),
            echo_requests: FxHashMap::default(),
            echo_order: VecDeque::new(),
            tcp_unacked: FxHashMap::default(),
            awaiting_clone: VecDeque::new(),
            sock_queues: FxHashMap::default(),
            gso_parents: FxHashMap::default(),
            drop_names,
            stats: Stats::default(),
        }
    }

    pub fn inflight(&self) -> usize {
        self.inflight.len() + self.awaiting_clone.len()
    }

    fn new_packet(&mut self, e: &Event) -> PacketPath {
        let id = self.next_id;
        self.next_id += 1;
        PacketPath {
            id,
            skb: e.skb,
            stages: Vec::with_capacity(12),
            info: None,
            len: e.len,
            tx_dev: None,
            rx_dev: None,
            route: None,
            softirq: None,
            verdict: Verdict::InFlight,
            drop_reason: None,
            reply_of: None,
            clone_of: None,
            complete: false,
            receive_arg: None,
            wire: None,
        }
    }

    /// Feeds one event; returns the packets it finished (in order).
    pub fn push(&mut self, mut e: Event) -> Vec<PacketPath> {
        let mut done = Vec::new();
        self.release_clone_waiters(e.ts_ns, &mut done);
        if e.hook == Hook::Route {
            if let Some(r) = e.route.clone() {
                let st = Stage::of(&e, (!r.dev.is_empty()).then(|| Name::from(r.dev.as_str())));
                self.last_route.insert(e.tid, (st, r));
            }
            return done;
        }
        if e.hook == Hook::AppRecv {
            self.app_recv(&e, &mut done);
            return done;
        }
        if e.hook == Hook::AppSend {
            self.last_send.insert(e.tid, Stage::of(&e, None));
            self.last_sock_send.remove(&e.tid);
            return done;
        }
        if e.hook == Hook::SockSend {
            self.last_sock_send.insert(e.tid, Stage::of(&e, None));
            return done;
        }
        if e.skb == 0 {
            self.stats.unlinked_lo_events += 1;
            return done;
        }
        if e.hook == Hook::SockQueue {
            // Only meaningful for a UDP packet still being received, queued once.
            let queued = match self.inflight.get(&e.skb) {
                Some(p) => {
                    p.has(StageKind::Receive)
                        && !p.has(StageKind::SockQueue)
                        && p.info.as_ref().is_some_and(|i| i.proto == PROTO_UDP)
                }
                None => false,
            };
            if !queued {
                return done;
            }
            self.sock_queues.entry(e.arg0).or_default().push_back(e.skb);
        }
        // A GSO segment (the head of its own transmit run, the split skb in `arg1`) is a new
        // skb: whatever was open at its address ended unseen (its free fired no tracepoint).
        let segment_of = (e.hook == Hook::Xmit && e.arg1 != 0).then_some(e.arg1);
        if segment_of.is_some()
            && let Some(old) = self.inflight.remove(&e.skb)
        {
            let v = self.idle_verdict(&old);
            self.finish(*old, v, &mut done);
        }
        // A new transmit on an address whose previous packet got no free tracepoint (TCP
        // paths) ends that packet: the address was reused.
        if matches!(e.hook, Hook::TcEgress | Hook::DevQueue)
            && let Some(old) = self.inflight.get(&e.skb)
            && old.has(StageKind::DevQueue)
            && let Some(old) = self.inflight.remove(&e.skb)
        {
            self.finish(*old, Verdict::FreedUntraced, &mut done);
        }
        let mut p = match self.inflight.remove(&e.skb) {
            Some(p) => p,
            None if segment_of.is_some() => {
                let mut p = Box::new(self.new_packet(&e));
                // Its path so far is the split skb's (send, route, tc egress, dev queue, split).
                if let Some((parent, pp, n)) = self.gso_parents.get_mut(&e.cpu)
                    && Some(*parent) == segment_of
                {
                    *n += 1;
                    p.stages.extend(pp.stages.iter().cloned());
                    p.route = pp.route.clone();
                    p.tx_dev = pp.tx_dev;
                }
                p
            }
            None => {
                let mut p = Box::new(self.new_packet(&e));
                // The send syscall this thread entered just before, and its socket-layer send
                // (fentry/kprobe on `sock_sendmsg`, where the kernel allows them).
                if matches!(e.hook, Hook::DevQueue | Hook::TcEgress) {
                    for st in [self.last_send.remove(&e.tid), self.last_sock_send.remove(&e.tid)]
                        .into_iter()
                        .flatten()
                    {
                        if e.ts_ns.saturating_sub(st.t_ns) <= SEND_LINK_NS {
                            p.stages.push(st);
                        }
                    }
                }
                if matches!(e.hook, Hook::DevQueue | Hook::TcEgress)
                    && let Some((st, r)) = self.last_route.remove(&e.tid)
                    && e.packet.as_ref().is_none_or(|i| i.dst == r.dst)
                {
                    p.stages.push(st);
                    p.route = Some(r);
                }
                p
            }
        };
        let dev = (!e.ifname.is_empty()).then_some(e.ifname);
        if p.wire.is_none()
            && let Some(bytes) = e.wire.take()
        {
            p.wire = Some(Wire {
                ts_ns: e.ts_ns,
                orig_len: e.len.max(bytes.len() as u32),
                bytes,
            });
        }
        if p.info.is_none() && e.packet.is_some() {
            p.info = e.packet.clone();
            // Pair as soon as the headers are known, in transmit order: packets finish late
            // (TCP frees fire no tracepoint), an ACK may finish before what it acknowledges.
            if e.hook != Hook::CopyToUser {
                self.pair(&mut p);
            }
        }
        // The length of the crossing itself: after the receive, TCP may coalesce later segments
        // into this skb (`tcp_try_coalesce`), and what the socket copies is then longer than
        // what crossed lo. A copy has only the socket's length.
        if e.len > p.len && (e.hook != Hook::CopyToUser || p.stages.is_empty()) {
            p.len = e.len;
        }
        match e.hook {
            Hook::Xmit => p.tx_dev = dev,
            Hook::DevQueue if p.tx_dev.is_none() => p.tx_dev = dev,
            Hook::Receive => {
                p.rx_dev = dev;
                p.receive_arg = Some((e.arg0, e.arg1));
            }
            _ => {}
        }
        p.stages.push(Stage::of(&e, dev));
        match e.hook {
            // Split into GSO segments before the driver (the kernel program says so), which
            // follow on this CPU. Held to start their paths.
            Hook::Consume if e.arg0 == CONSUME_GSO_SPLIT => {
                if let Some(last) = p.stages.last_mut() {
                    last.stage = StageKind::GsoSegment;
                }
                match self.gso_parents.insert(e.cpu, (e.skb, p, 0)) {
                    Some((_, old, 0)) => self.unsplit(*old, &mut done),
                    Some(_) => self.stats.gso_splits += 1,
                    None => {}
                }
            }
            Hook::Consume => self.finish(*p, Verdict::Consumed, &mut done),
            Hook::LeftNetns => self.finish(*p, Verdict::LeftNetns, &mut done),
            Hook::Free => {
                let name = self
                    .drop_names
                    .get(&e.arg0)
                    .cloned()
                    .unwrap_or_else(|| format!("reason-{}", e.arg0));
                p.drop_reason = Some(name);
                let waits_for_clone = p.drop_reason.as_deref() == Some("NO_SOCKET")
                    && p.info
                        .as_ref()
                        .is_some_and(|i| i.proto == PROTO_ICMP || i.proto == PROTO_ICMPV6);
                if waits_for_clone {
                    p.verdict = Verdict::Dropped;
                    self.awaiting_clone.push_back(*p);
                } else {
                    self.finish(*p, Verdict::Dropped, &mut done);
                }
            }
            Hook::CopyToUser if p.stages.len() == 1 && p.clone_of.is_none() => {
                // A clone first seen at the socket: link it to its original.
                self.link_clone(&mut p, &mut done);
                self.inflight.insert(e.skb, p);
            }
            _ => {
                self.inflight.insert(e.skb, p);
            }
        }
        if self.inflight.len() > self.cfg.max_inflight {
            self.expire_oldest(&mut done);
        }
        done
    }

    /// The application read from socket `arg0`: the oldest UDP packet queued to it was delivered.
    fn app_recv(&mut self, e: &Event, done: &mut Vec<PacketPath>) {
        let Some(q) = self.sock_queues.get_mut(&e.arg0) else {
            return;
        };
        while let Some(skb) = q.pop_front() {
            if let Some(mut p) = self.inflight.remove(&skb) {
                p.stages.push(Stage::of(e, None));
                if q.is_empty() {
                    self.sock_queues.remove(&e.arg0);
                }
                self.finish(*p, Verdict::Delivered, done);
                return;
            }
        }
        self.sock_queues.remove(&e.arg0);
    }

    fn link_clone(&mut self, clone: &mut PacketPath, done: &mut Vec<PacketPath>) {
        let Some(ci) = clone.info.clone() else { return };
        let pos = self
            .awaiting_clone
            .iter()
            .position(|o| o.info.as_ref().is_some_and(|oi| same_headers(oi, &ci)));
        if let Some(pos) = pos
            && let Some(orig) = self.awaiting_clone.remove(pos)
        {
            clone.clone_of = Some(orig.id);
            clone.reply_of = orig.reply_of;
            self.finish(orig, Verdict::DeliveredClone, done);
            return;
        }
        // The original may still be in flight (clone read before the original was freed).
        if let Some(orig) = self
            .inflight
            .values()
            .filter(|o| !o.is_copy() && o.info.as_ref().is_some_and(|oi| same_headers(oi, &ci)))
            .max_by_key(|o| o.id)
        {
            clone.clone_of = Some(orig.id);
            clone.reply_of = orig.reply_of;
        }
    }

    fn release_clone_waiters(&mut self, now: u64, done: &mut Vec<PacketPath>) {
        while let Some(front) = self.awaiting_clone.front() {
            if now.saturating_sub(front.last_ts()) < self.cfg.clone_wait_ns {
                break;
            }
            if let Some(p) = self.awaiting_clone.pop_front() {
                self.finish(p, Verdict::Dropped, done);
            }
        }
    }

    fn expire_oldest(&mut self, done: &mut Vec<PacketPath>) {
        let excess = self.inflight.len().saturating_sub(self.cfg.max_inflight);
        let mut by_age: Vec<(u64, u64)> = self.inflight.iter().map(|(k, p)| (p.last_ts(), *k)).collect();
        by_age.sort_unstable();
        for (_, k) in by_age.into_iter().take(excess) {
            if let Some(p) = self.inflight.remove(&k) {
                let v = self.idle_verdict(&p);
                self.finish(*p, v, done);
            }
        }
    }

    fn idle_verdict(&self, p: &PacketPath) -> Verdict {
        let tcp = p.info.as_ref().is_some_and(|i| i.proto == PROTO_TCP);
        if tcp && p.has(StageKind::Receive) {
            Verdict::FreedUntraced
        } else {
            Verdict::Expired
        }
    }

    /// Finishes packets idle for longer than the configured time at event-clock `now`.
    pub fn expire(&mut self, now: u64) -> Vec<PacketPath> {
        let mut done = Vec::new();
        if self
            .gso_parents
            .values()
            .any(|(_, p, _)| now.saturating_sub(p.last_ts()) > self.cfg.max_idle_ns)
        {
            self.release_gso_parents(&mut done);
        }
        self.release_clone_waiters(now, &mut done);
        let stale: Vec<u64> = self
            .inflight
            .iter()
            .filter(|(_, p)| now.saturating_sub(p.last_ts()) > self.cfg.max_idle_ns)
            .map(|(k, _)| *k)
            .collect();
        let mut stale_paths: Vec<PacketPath> = stale
            .into_iter()
            .filter_map(|k| self.inflight.remove(&k).map(|p| *p))
            .collect();
        stale_paths.sort_by_key(|p| p.id);
        for p in stale_paths {
            let v = self.idle_verdict(&p);
            self.finish(p, v, &mut done);
        }
        self.last_route
            .retain(|_, (st, _)| now.saturating_sub(st.t_ns) <= self.cfg.max_idle_ns);
        done
    }

    /// A held GSO parent none of whose segments showed up (their hooks missing, or lost):
    /// printed as what was seen of it, a consumed skb.
    fn unsplit(&mut self, mut p: PacketPath, done: &mut Vec<PacketPath>) {
        if let Some(last) = p.stages.last_mut() {
            last.stage = StageKind::Consume;
        }
        self.finish(p, Verdict::Consumed, done);
    }

    /// Drops the held GSO parents: those with segments are accounted as splits, the others
    /// printed as they are.
    fn release_gso_parents(&mut self, done: &mut Vec<PacketPath>) {
        let mut held: Vec<_> = self.gso_parents.drain().map(|(_, v)| v).collect();
        held.sort_by_key(|(_, p, _)| p.id);
        for (_, p, n) in held {
            if n == 0 {
                self.unsplit(*p, done);
            } else {
                self.stats.gso_splits += 1;
            }
        }
    }

    /// Ends the session: everything still held is finished (in flight / awaiting clones).
    pub fn flush(&mut self) -> Vec<PacketPath> {
        let mut done = Vec::new();
        self.release_gso_parents(&mut done);
        while let Some(p) = self.awaiting_clone.pop_front() {
            self.finish(p, Verdict::Dropped, &mut done);
        }
        let mut rest: Vec<PacketPath> = self.inflight.drain().map(|(_, p)| *p).collect();
        rest.sort_by_key(|p| p.id);
        for p in rest {
            let v = if p.info.as_ref().is_some_and(|i| i.proto == PROTO_TCP) && p.has(StageKind::Receive) {
                Verdict::FreedUntraced
            } else {
                Verdict::InFlight
            };
            self.finish(p, v, &mut done);
        }
        done
    }

    fn finish(&mut self, mut p: PacketPath, verdict: Verdict, done: &mut Vec<PacketPath>) {
        p.verdict = verdict;
        // Only a drop, or a clone-delivered original (kept for the record, no drop), has a reason.
        if !matches!(verdict, Verdict::Dropped | Verdict::DeliveredClone) {
            p.drop_reason = None;
        }
        self.add_softirq_stages(&mut p);
        p.complete = is_complete(&p);
        self.account(&p);
        done.push(p);
    }

    /// Softirq context from the receive event: who ran it, and whether this packet raised it.
    fn add_softirq_stages(&self, p: &mut PacketPath) {
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
        let context = if recv.comm.starts_with("ksoftirqd/") {
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
        if raised {
            p.stages.push(mk(StageKind::SoftirqRaise, raise_ts));
        }
        if new_run {
            p.stages.push(mk(StageKind::SoftirqEntry, entry_ts));
        }
        if raised || new_run {
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

    fn pair(&mut self, p: &mut PacketPath) {
        let Some(info) = p.info.clone() else { return };
        if let Some(icmp) = info.icmp {
            if is_echo_request(&info) && p.clone_of.is_none() {
                let key = (icmp.id, icmp.seq, info.src);
                self.echo_requests.insert(key, p.id);
                self.echo_order.push_back(key);
                while self.echo_order.len() > 4096 {
                    if let Some(k) = self.echo_order.pop_front() {
                        self.echo_requests.remove(&k);
                    }
                }
            } else if is_echo_reply(&info) && p.reply_of.is_none() {
                p.reply_of = self.echo_requests.get(&(icmp.id, icmp.seq, info.dst)).copied();
            }
            return;
        }
        if info.proto != PROTO_TCP || p.clone_of.is_some() {
            return;
        }
        let (Some(tcp), Some(sport), Some(dport)) = (info.tcp, info.sport, info.dport) else {
            return;
        };
        // ACK: answers the newest segment of the reverse direction it fully covers.
        if tcp.flags & 0x10 != 0 {
            let rev = (info.dst, dport, info.src, sport);
            if let Some(q) = self.tcp_unacked.get_mut(&rev) {
                let mut answered = None;
                while let Some(&(end, id)) = q.front() {
                    if (tcp.ack.wrapping_sub(end) as i32) >= 0 {
                        answered = Some(id);
                        q.pop_front();
                    } else {
                        break;
                    }
                }
                p.reply_of = answered;
            }
        }
        let syn_fin = u32::from(tcp.flags & 0x03 != 0);
        let payload = info.l4_payload_len.unwrap_or(0);
        if payload + syn_fin > 0 {
            let fwd = (info.src, sport, info.dst, dport);
            if !self.tcp_unacked.contains_key(&fwd) && self.tcp_unacked.len() >= 4096 {
                self.tcp_unacked.clear();
            }
            let q = self.tcp_unacked.entry(fwd).or_default();
            q.push_back((tcp.seq.wrapping_add(payload + syn_fin), p.id));
            if q.len() > 1024 {
                q.pop_front();
            }
        }
    }

    fn account(&mut self, p: &PacketPath) {
        let s = &mut self.stats;
        if p.is_copy() {
            s.copies += 1;
            return;
        }
        s.packets += 1;
        if p.complete {
            s.complete += 1;
        }
        if p.verdict == Verdict::Expired {
            s.expired += 1;
        }
        if p.verdict == Verdict::InFlight {
            s.in_flight_at_end += 1;
        }
        if let Some(r) = p.drop_label() {
            *s.drops.entry(r).or_default() += 1;
        }
        if let Some(si) = &p.softirq {
            *s.by_context.entry(si.context.as_str()).or_default() += 1;
        }
        for w in p.stages.windows(2) {
            let d = w[1].t_ns.saturating_sub(w[0].t_ns);
            let h = s
                .stage_latency
                .entry(w[1].stage)
                .or_insert_with(|| Histogram::new_with_bounds(1, 60_000_000_000, 2).expect("valid histogram bounds"));
            let _ = h.record(d.max(1));
        }
    }
}

/// Seen from its start in the namespace to its end (app_send and route, when linked, come first):
/// start = tc_egress/dev_queue (sent here), receive/tc_ingress (arrived from another device)
/// or copy_to_user (a clone);
/// a packet sent on lo must show xmit, backlog enqueue and receive; the end is a free tracepoint,
/// or for TCP a receive followed by a free path that has no tracepoint.
pub fn is_complete(p: &PacketPath) -> bool {
    use StageKind as K;
    let first = p
        .stages
        .iter()
        .map(|s| s.stage)
        .find(|s| !matches!(s, K::Route | K::AppSend | K::SockSend));
    let sent_here = matches!(first, Some(K::TcEgress | K::DevQueue));
    let started = sent_here || matches!(first, Some(K::Receive | K::TcIngress | K::CopyToUser));
    let ended = matches!(
        p.verdict,
        Verdict::Consumed
            | Verdict::Delivered
            | Verdict::Dropped
            | Verdict::DeliveredClone
            | Verdict::FreedUntraced
            | Verdict::LeftNetns
    );
    let through_lo = if sent_here && p.tx_dev.as_deref() == Some("lo") {
        p.has(StageKind::Xmit) && p.has(StageKind::BacklogEnqueue) && p.has(StageKind::Receive)
    } else {
        true
    };
    started && ended && through_lo
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::IpAddr;

    use super::*;
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
        let mut t = Tracker::new(TrackerConfig::default(), drops());
        let mut out = Vec::new();
        for e in events {
            out.extend(t.push(e));
        }
        out.extend(t.flush());
        (out, t.stats)
    }

    #[test]
    fn an_skb_split_into_gso_segments_gives_one_record_per_segment() {
        let mut s = Seq::new();
        let big = icmp_info("127.0.0.1", "127.0.0.1", 8, 1, 1);
        // An older packet at 0xc0 whose free fired no tracepoint: still open there.
        s.lo_path(0xc0, 9, "other", icmp_info("127.0.0.1", "127.0.0.1", 8, 9, 9), false);
        s.ev(Hook::AppSend, 0, 7, "app", "", None, 44, 0);
        s.ev(Hook::TcEgress, 0xa0, 7, "app", "lo", Some(big.clone()), 0, 0);
        s.ev(Hook::DevQueue, 0xa0, 7, "app", "lo", None, 0, 0);
        // validate_xmit_skb: segmented, the original consumed before the driver.
        s.ev(Hook::Consume, 0xa0, 7, "app", "", None, CONSUME_GSO_SPLIT, 0);
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
        for e in s.events {
            out.extend(t.push(e));
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
        assert_eq!(stats.by_context.get("ksoftirqd"), Some(&1));
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
        for e in s.events {
            assert!(t.push(e).is_empty());
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
        for e in s.events {
            out.extend(t.push(e));
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
        let (paths, _) = run(s.events);
        assert_eq!(paths.len(), 1);
        assert_eq!(paths[0].verdict, Verdict::Delivered);
        assert!(paths[0].complete);
        assert_eq!(paths[0].stage_names().iter().filter(|s| **s == "sock_queue").count(), 1);
        assert_eq!(
            paths[0].stages.last().map(|s| (s.stage, s.tid)),
            Some((StageKind::AppRecv, 2))
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
}
