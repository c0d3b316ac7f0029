//! The tracker: feeds decoded events into per-skb paths and finishes them (identity,
//! address reuse, GSO segments, clones held for their original, expiry).
use std::collections::{HashMap, VecDeque};

use loopback_common::{CONSUME_GSO_SPLIT, CONSUME_GSO_SPLIT_UNSEEN, Hook};
// FxHash: the tracker's maps are keyed by skb addresses and small tuples, on the per-event hot
// path; SipHash's DoS resistance buys nothing here and costs a third of the lookup time.
use rustc_hash::{FxHashMap, FxHashSet};

use super::{PacketPath, Stage, StageKind, Stats, Verdict, Wire, is_complete, pairing::Pairing, seen_from_start};
use crate::decode::{Event, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, RouteInfo};

#[derive(Clone, Copy, Debug)]
pub struct TrackerConfig {
    /// A packet with no event for this long (event clock) is finished as expired.
    pub max_idle_ns: u64,
    /// At most this many packets in flight; the oldest are expired beyond it.
    pub max_inflight: usize,
    /// How long a NO_SOCKET-freed ICMP packet waits for its delivered clone.
    pub clone_wait_ns: u64,
    /// When the kernel programs were switched on (event clock; 0: unknown, e.g. a recording
    /// made before lotrace recorded it, whose start was not atomic). Every hook was on from
    /// then, so a packet not seen from its start whose first event came on a CPU before any
    /// transmit started there is one caught part-way through at that moment
    /// (`in_flight_at_start`), not a broken one: what it lacks ran before the switch. (No time
    /// window: a run shorter than any window would hide every broken packet in it.)
    pub tracing_since_ns: u64,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            max_idle_ns: 2_000_000_000,
            max_inflight: 65_536,
            clone_wait_ns: 1_000_000_000,
            tracing_since_ns: 0,
        }
    }
}

/// A send syscall links to its thread's next transmit only if that comes within this time (a
/// send that transmitted nothing, e.g. on a UNIX socket, must not claim a later packet).
/// Syscall entry to the first transmit hook takes microseconds on hardware, but up to about
/// 1.1 ms was measured inside an emulated (TCG) guest with classic tc; 10 ms keeps the link
/// there while a thread's later send syscall still replaces its pending one.
pub(super) const SEND_LINK_NS: u64 = 10_000_000;

/// The same once the thread's socket-layer send (`inet_sendmsg`) was seen after its syscall: an
/// inet send, which transmits; only a send that may transmit nothing needs the short window.
/// Its transmit came 13.6 ms after the syscall once in an emulated guest whose two vCPUs share
/// one host thread. Bounded all the same, so that a send that failed does not claim the
/// thread's transmits much later.
pub(super) const SEND_LINK_INET_NS: u64 = 1_000_000_000;

/// What a thread did before its next transmit: its latest route lookup (which that transmit
/// used), send-family syscall entry, and socket-layer send (`sock_sendmsg`, fentry/kprobe).
#[derive(Default)]
struct Sending {
    route: Option<(Stage, RouteInfo)>,
    send: Option<Stage>,
    sock_send: Option<Stage>,
}

pub struct Tracker {
    pub(super) cfg: TrackerConfig,
    /// Boxed: a packet moves out of and back into the map on the events that may end it or start
    /// another at its address (the others add their stage where it lies).
    pub(super) inflight: FxHashMap<u64, Box<PacketPath>>,
    next_id: u64,
    /// Per thread: what it did before its next transmit (one map lookup for all three).
    threads: FxHashMap<u32, Sending>,
    pairing: Pairing,
    /// Finished packets held back until their delivered clone shows up (or the wait ends).
    pub(super) awaiting_clone: VecDeque<PacketPath>,
    /// CPUs on which a transmit started (tc egress or `net_dev_queue`) since tracing began.
    started_cpus: FxHashSet<u32>,
    /// Paths (ids) still in flight whose clone was read already: the clone's socket copy can
    /// reach the ring before the original's free (another CPU), and that free then ends the
    /// original as delivered through its clone at once, whatever the time between them.
    pub(super) clone_read: FxHashSet<u64>,
    /// Per socket: UDP packets queued to it, oldest first (matched to the application's reads).
    sock_queues: FxHashMap<u64, VecDeque<(u64, u64)>>,
    /// Queued UDP packets (path ids) that their own free ended before the application's read
    /// was seen (where a function hook sees UDP's free, in recvmsg before it returns): that read
    /// was theirs, not the next packet's.
    read_while_queued: FxHashSet<u64>,
    /// Per CPU: the skb just split into GSO segments there (address, path so far, segments
    /// seen). Its segments follow on the same CPU, inside the same `__dev_queue_xmit`.
    gso_parents: FxHashMap<u32, (u64, Box<PacketPath>, u32)>,
    drop_names: HashMap<u64, String>,
    pub stats: Stats,
}

impl Tracker {
    pub fn new(cfg: TrackerConfig, drop_names: HashMap<u64, String>) -> Self {
        Self {
            cfg,
            inflight: FxHashMap::default(),
            next_id: 1,
            threads: FxHashMap::default(),
            pairing: Pairing::default(),
            awaiting_clone: VecDeque::new(),
            clone_read: FxHashSet::default(),
            started_cpus: FxHashSet::default(),
            sock_queues: FxHashMap::default(),
            read_while_queued: FxHashSet::default(),
            gso_parents: FxHashMap::default(),
            drop_names,
            stats: Stats::default(),
        }
    }

    pub fn inflight(&self) -> usize {
        self.inflight.len() + self.awaiting_clone.len()
    }

    /// A new path, built in its box (not built aside and copied in).
    fn new_packet(&mut self, e: &Event) -> Box<PacketPath> {
        let id = self.next_id;
        self.next_id += 1;
        Box::write(
            Box::new_uninit(),
            PacketPath {
                id,
                skb: e.skb,
                // A lo crossing has up to about 16 stages: no regrowth on the way.
                stages: Vec::with_capacity(16),
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
                in_flight_at_start: false,
                opened_before_first_start: false,
                receive_arg: None,
                passed_tc_ingress: false,
                wire: None,
            },
        )
    }

    /// Feeds one event; returns the packets it finished (in order). The steps: events about a
    /// thread rather than an skb ([`Self::thread_event`]), then the skb's path is found or
    /// started ([`Self::open`]), the event is added to it ([`record`]), and the path ends
    /// or stays in flight ([`Self::end_or_keep`]).
    pub fn push(&mut self, e: &mut Event) -> Vec<PacketPath> {
        let mut done = Vec::new();
        self.push_into(e, &mut done);
        done
    }

    /// [`Self::push`], appending the finished packets to `done` (the engine reuses one vector:
    /// no allocation per event).
    pub fn push_into(&mut self, e: &mut Event, done: &mut Vec<PacketPath>) {
        if !self.awaiting_clone.is_empty() {
            self.release_clone_waiters(e.ts_ns, done);
        }
        if self.thread_event(e, done) {
            return;
        }
        if e.skb == 0 {
            self.stats.unlinked_lo_events += 1;
            return;
        }
        // Most events add a stage to a path in flight: done where the path lies in the map (one
        // lookup; a path moves out of the map only when it may end or give way to another).
        if let Some(p) = self.inflight.get_mut(&e.skb)
            && Self::continues(e, p)
        {
            record(&mut self.pairing, p, e);
            return;
        }
        if e.hook == Hook::SockQueue {
            // Only meaningful for a UDP packet still being received, queued once.
            let Some(p) = self.inflight.get_mut(&e.skb).filter(|p| {
                p.has(StageKind::Receive)
                    && !p.has(StageKind::SockQueue)
                    && p.info.as_ref().is_some_and(|i| i.proto == PROTO_UDP)
            }) else {
                return;
            };
            self.sock_queues.entry(e.arg0).or_default().push_back((e.skb, p.id));
            record(&mut self.pairing, p, e);
            return;
        }
        // A free with nothing in flight at its address ends a packet that ended already: a
        // UDP datagram delivered by its read, freed later on the CPU that allocated it
        // (`skb_defer_free_flush`), or one that expired. It starts no packet.
        let mut p = if matches!(e.hook, Hook::Consume | Hook::Free) {
            match self.inflight.remove(&e.skb) {
                Some(p) => p,
                None => {
                    self.stats.frees_after_end += 1;
                    return;
                }
            }
        } else {
            if matches!(e.hook, Hook::TcEgress | Hook::DevQueue) && self.started_cpus.len() < 4096 {
                self.started_cpus.insert(e.cpu);
            }
            let mut p = self.open(e, done);
            p.opened_before_first_start = self.cfg.tracing_since_ns != 0 && !self.started_cpus.contains(&e.cpu);
            p
        };
        record(&mut self.pairing, &mut p, e);
        self.end_or_keep(p, e, done);
        if self.inflight.len() > self.cfg.max_inflight {
            self.expire_oldest(done);
        }
    }

    /// Whether the event adds a stage to `p`, the path in flight at its address: not a GSO
    /// segment (a new skb), not an end, not a socket queueing (which is checked first), not a
    /// crossing that [`Self::reuses`] the address.
    #[inline(always)]
    fn continues(e: &Event, p: &PacketPath) -> bool {
        match e.hook {
            Hook::Consume | Hook::LeftNetns | Hook::Free | Hook::SockQueue => false,
            Hook::Xmit => e.arg1 == 0,
            _ => !Self::reuses(e, p),
        }
    }

    /// Whether the event is another crossing at the address of `p`, whose free fired no
    /// tracepoint (TCP paths): a transmit start on a path that passed it already, or a tc
    /// egress, tc ingress or receive on a path that passed tc ingress. On lo each crossing passes
    /// each exactly once (seen where the kernel ran no tracing program for a packet, which lo's
    /// tc programs still saw: see `Stats::tc_only`).
    #[inline(always)]
    fn reuses(e: &Event, p: &PacketPath) -> bool {
        match e.hook {
            Hook::TcEgress => p.has(StageKind::DevQueue) || p.has(StageKind::TcEgress),
            Hook::DevQueue => p.has(StageKind::DevQueue),
            Hook::Receive | Hook::TcIngress => p.passed_tc_ingress,
            _ => false,
        }
    }

    /// Events about a thread rather than an skb: its route lookup, send syscall and socket
    /// send (kept for its next transmit), and its UDP read (which delivers a queued packet).
    fn thread_event(&mut self, e: &Event, done: &mut Vec<PacketPath>) -> bool {
        match e.hook {
            Hook::Route => {
                if let Some(r) = e.route {
                    let st = Stage::of(e, (!r.dev.is_empty()).then_some(r.dev));
                    self.threads.entry(e.tid).or_default().route = Some((st, r));
                }
            }
            Hook::AppRecv => self.app_recv(e, done),
            Hook::AppSend => {
                let t = self.threads.entry(e.tid).or_default();
                t.send = Some(Stage::of(e, None));
                t.sock_send = None;
            }
            Hook::SockSend => {
                self.threads.entry(e.tid).or_default().sock_send = Some(Stage::of(e, None));
            }
            _ => return false,
        }
        true
    }

    /// The path the event belongs to: the one in flight at its address, or a new one (a GSO
    /// segment inherits its split skb's path; a first transmit takes its thread's send and
    /// route). What was open at a reused address ends first.
    fn open(&mut self, e: &Event, done: &mut Vec<PacketPath>) -> Box<PacketPath> {
        // A GSO segment (the head of its own transmit run, the split skb in `arg1`) is a new
        // skb: whatever was open at its address ended unseen (its free fired no tracepoint).
        let segment_of = (e.hook == Hook::Xmit && e.arg1 != 0).then_some(e.arg1);
        match self.inflight.remove(&e.skb) {
            // (`push_into` added every other event to the path in flight at its address.)
            Some(old) if segment_of.is_some() => {
                let v = self.idle_verdict(&old);
                self.finish_unseen(old, v, done);
            }
            // Another crossing at the address: its previous packet ended unseen.
            Some(old) if Self::reuses(e, &old) => self.finish_unseen(old, Verdict::FreedUntraced, done),
            Some(p) => return p,
            None => {}
        }
        match segment_of {
            Some(_) => {
                let mut p = self.new_packet(e);
                // Its path so far is the split skb's (send, route, tc egress, dev queue, split).
                if let Some((parent, pp, n)) = self.gso_parents.get_mut(&e.cpu)
                    && Some(*parent) == segment_of
                {
                    *n += 1;
                    p.stages.extend(pp.stages.iter().cloned());
                    p.route = pp.route;
                    p.tx_dev = pp.tx_dev;
                }
                p
            }
            None => {
                let mut p = self.new_packet(e);
                if matches!(e.hook, Hook::DevQueue | Hook::TcEgress)
                    && let Some(t) = self.threads.get_mut(&e.tid)
                {
                    // The send syscall this thread entered just before, and its socket-layer
                    // send (fentry/kprobe on `sock_sendmsg`, where the kernel allows them).
                    let window = if t.sock_send.is_some() {
                        SEND_LINK_INET_NS
                    } else {
                        SEND_LINK_NS
                    };
                    for st in [t.send.take(), t.sock_send.take()].into_iter().flatten() {
                        if e.ts_ns.saturating_sub(st.t_ns) <= window {
                            p.stages.push(st);
                        }
                    }
                    // Its route lookup, when it was for this destination.
                    if let Some((st, r)) = t.route.take()
                        && e.packet.as_ref().is_none_or(|i| i.dst == r.dst)
                    {
                        p.stages.push(st);
                        p.route = Some(r);
                    }
                }
                p
            }
        }
    }

    /// Ends the path at a free, consume or namespace exit (a GSO split is held for its
    /// segments, a NO_SOCKET ICMP drop waits for its delivered clone), else keeps it in flight.
    fn end_or_keep(&mut self, mut p: Box<PacketPath>, e: &Event, done: &mut Vec<PacketPath>) {
        match e.hook {
            // Split into GSO segments before the driver (the kernel program says so), which
            // follow on this CPU. Held to start their paths.
            // (`CONSUME_GSO_SPLIT_UNSEEN`: the split skb's free did not reach the program, its
            // first segment's transmit said it, at that time.)
            Hook::Consume if e.arg0 == CONSUME_GSO_SPLIT || e.arg0 == CONSUME_GSO_SPLIT_UNSEEN => {
                if let Some(last) = p.stages.last_mut() {
                    last.stage = StageKind::GsoSegment;
                }
                match self.gso_parents.insert(e.cpu, (e.skb, p, 0)) {
                    Some((_, old, 0)) => self.unsplit(*old, done),
                    Some(_) => self.stats.gso_splits += 1,
                    None => {}
                }
            }
            Hook::Consume => self.finish(p, Verdict::Consumed, done),
            Hook::LeftNetns => self.finish(p, Verdict::LeftNetns, done),
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
                if waits_for_clone && self.clone_read.contains(&p.id) {
                    self.finish(p, Verdict::DeliveredClone, done);
                } else if waits_for_clone {
                    p.verdict = Verdict::Dropped;
                    self.awaiting_clone.push_back(*p);
                } else {
                    self.finish(p, Verdict::Dropped, done);
                }
            }
            Hook::CopyToUser if p.stages.len() == 1 && p.clone_of.is_none() => {
                // A clone first seen at the socket: link it to its original.
                self.link_clone(&mut p, done);
                self.inflight.insert(e.skb, p);
            }
            _ => {
                self.inflight.insert(e.skb, p);
            }
        }
    }

    /// The application read from socket `arg0`: one datagram, the oldest still queued to it.
    /// Still in flight, it is delivered. Ended by its own free already (a function hook saw the
    /// free inside this read), the read was its own and nothing else happens: the next queued
    /// packet is not the one read. Ended otherwise (dropped from the queue, expired), it was
    /// not read, and the next one is looked at.
    fn app_recv(&mut self, e: &Event, done: &mut Vec<PacketPath>) {
        let Some(q) = self.sock_queues.get_mut(&e.arg0) else {
            return;
        };
        let mut read = None;
        while let Some((skb, id)) = q.pop_front() {
            if self.inflight.get(&skb).is_some_and(|p| p.id == id) {
                read = self.inflight.remove(&skb);
                break;
            }
            if self.read_while_queued.remove(&id) {
                break;
            }
        }
        // An emptied queue stays (its socket is likely read again: no allocation per datagram);
        // `expire` drops the empty ones.
        if let Some(mut p) = read {
            p.stages.push(Stage::of(e, None));
            self.finish(p, Verdict::Delivered, done);
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
                self.finish_unseen(p, v, done);
            }
        }
    }

    fn idle_verdict(&self, p: &PacketPath) -> Verdict {
        let tcp = p.info.as_ref().is_some_and(|i| i.proto == PROTO_TCP);
        // (A crossing seen at tc ingress only was received too: see `Stats::tc_only`.)
        if tcp && (p.receive_arg.is_some() || p.passed_tc_ingress) {
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
            self.finish_unseen(p, v, &mut done);
        }
        // What no transmit can link any more goes (a send links within its window).
        let old = |st: &Stage, limit: u64| now.saturating_sub(st.t_ns) > limit;
        let (idle, window) = (self.cfg.max_idle_ns, SEND_LINK_INET_NS.max(SEND_LINK_NS));
        self.threads.retain(|_, t| {
            t.route.take_if(|(st, _)| old(st, idle));
            t.send.take_if(|st| old(st, window));
            t.sock_send.take_if(|st| old(st, window));
            t.route.is_some() || t.send.is_some() || t.sock_send.is_some()
        });
        self.sock_queues.retain(|_, q| !q.is_empty());
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
            let v = if p.info.as_ref().is_some_and(|i| i.proto == PROTO_TCP)
                && (p.has(StageKind::Receive) || p.passed_tc_ingress)
            {
                Verdict::FreedUntraced
            } else {
                Verdict::InFlight
            };
            self.finish_unseen(p, v, &mut done);
        }
        done
    }

    /// [`Self::finish`] for a path that ends unseen (its address reused, idle, or at the end).
    /// A path seen by tc egress on lo and by nothing after it is no packet: the kernel ran no
    /// tracing program for that transmit, and it never crossed lo as itself (else its own tc
    /// ingress would be on it): a GSO split whose segments were seen at tc ingress only.
    fn finish_unseen(&mut self, mut p: impl Held, verdict: Verdict, done: &mut Vec<PacketPath>) {
        if !self.tc_egress_only(p.path()) {
            self.finish(p, verdict, done);
        }
    }

    /// Whether the path is a transmit seen at tc egress only (counted: no packet).
    #[inline]
    fn tc_egress_only(&mut self, p: &PacketPath) -> bool {
        let only = p.stages.len() == 1 && p.stages[0].stage == StageKind::TcEgress;
        if only {
            self.stats.tc_only.egress += 1;
        }
        only
    }

    /// Seals the path and hands it on in `done`: a path in its box (where it lay in flight) is
    /// moved once, into `done`, not first out of the box.
    #[inline]
    pub(super) fn finish(&mut self, mut p: impl Held, verdict: Verdict, done: &mut Vec<PacketPath>) {
        self.seal(p.path(), verdict);
        done.push(p.into_path());
    }

    /// Everything [`Self::finish`] does but handing the path on: its verdict, softirq,
    /// completeness and statistics.
    #[inline]
    fn seal(&mut self, p: &mut PacketPath, verdict: Verdict) {
        p.verdict = verdict;
        if !self.clone_read.is_empty() {
            self.clone_read.remove(&p.id);
        }
        if verdict == Verdict::Consumed && p.has(StageKind::SockQueue) {
            // Bounded: without the application's reads (no `sock_recv_length`) nothing removes
            // these; a read that finds its packet gone then looks at the next one, as before.
            if self.read_while_queued.len() >= 65_536 {
                self.read_while_queued.clear();
            }
            self.read_while_queued.insert(p.id);
        }
        // Only a drop, or a clone-delivered original (kept for the record, no drop), has a reason.
        if !matches!(verdict, Verdict::Dropped | Verdict::DeliveredClone) {
            p.drop_reason = None;
        }
        super::softirq::derive(p);
        p.complete = is_complete(p);
        p.in_flight_at_start = !p.complete
            && p.opened_before_first_start
            && !seen_from_start(p)
            && p.first_skb_stage() != Some(StageKind::TcIngress);
        self.stats.account(p);
    }
}

/// A path being finished, where it lies: in its box (taken from the map) or out of it.
pub(super) trait Held {
    fn path(&mut self) -> &mut PacketPath;
    fn into_path(self) -> PacketPath;
}

impl Held for PacketPath {
    fn path(&mut self) -> &mut PacketPath {
        self
    }
    fn into_path(self) -> PacketPath {
        self
    }
}

impl Held for Box<PacketPath> {
    fn path(&mut self) -> &mut PacketPath {
        self
    }
    fn into_path(self) -> PacketPath {
        *self
    }
}

/// Adds the event to its path: captured bytes, headers, the crossing's length, devices, the
/// receive's softirq arguments, and the stage itself. A path that just got its headers, from a
/// hook other than the socket copy, is paired at once: packets are paired in transmit order,
/// since they finish late (TCP frees fire no tracepoint) and an ACK may finish before what it
/// acknowledges. (A free function: it runs on a path where it lies in the map.)
fn record(pairing: &mut Pairing, p: &mut PacketPath, e: &mut Event) {
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
        p.info = e.packet.take();
        if e.hook != Hook::CopyToUser {
            pairing.pair(p);
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
        Hook::TcIngress => p.passed_tc_ingress = true,
        _ => {}
    }
    p.stages.push(Stage::of(e, dev));
}
