//! What a reconstructed packet is: its stages, softirq, verdict and captured bytes.
use crate::decode::{Event, Name, PacketInfo, RouteInfo};
pub use crate::hooks::StageKind;

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
    pub const ALL: [SoftirqContext; 3] = [SoftirqContext::Inline, SoftirqContext::Ksoftirqd, SoftirqContext::Other];
    pub const fn as_str(&self) -> &'static str {
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
    /// Every verdict, in declaration order (`ALL[v as usize] == v`).
    pub const ALL: [Verdict; 8] = [
        Verdict::Consumed,
        Verdict::Delivered,
        Verdict::DeliveredClone,
        Verdict::Dropped,
        Verdict::FreedUntraced,
        Verdict::LeftNetns,
        Verdict::Expired,
        Verdict::InFlight,
    ];

    pub const fn as_str(&self) -> &'static str {
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
    /// Caught part-way through when tracing started: its first stages ran before the programs
    /// were switched on (see `TrackerConfig::tracing_since_ns`). Not a broken packet: not counted
    /// in `packets` or `complete_pct`, not printed unless asked (`--partial`).
    pub in_flight_at_start: bool,
    pub(super) receive_arg: Option<(u64, u64)>,
    /// It passed tc ingress on lo: a receive or tc ingress at its address is another crossing.
    pub(super) passed_tc_ingress: bool,
    /// Its first event came on a CPU where no transmit had started since tracing was switched
    /// on: what it lacks may have run before the switch (see `in_flight_at_start`).
    pub(super) opened_before_first_start: bool,
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
        self.tx_dev.is_some_and(|d| d.as_bytes() != b"lo")
    }
    pub fn first_ts(&self) -> u64 {
        self.stages.first().map(|s| s.t_ns).unwrap_or(0)
    }
    pub fn last_ts(&self) -> u64 {
        self.stages.last().map(|s| s.t_ns).unwrap_or(0)
    }
    /// Each stage with the time since the previous one (0 for the first): the one place where
    /// stage deltas are computed, for every output, the statistics and the dashboard.
    pub fn timed_stages(&self) -> impl Iterator<Item = (&Stage, u64)> {
        let mut prev = self.first_ts();
        self.stages.iter().map(move |s| {
            let d = s.t_ns.saturating_sub(prev);
            prev = s.t_ns;
            (s, d)
        })
    }
    pub fn has(&self, stage: StageKind) -> bool {
        self.stages.iter().any(|s| s.stage == stage)
    }
    /// The first stage seen on the skb itself (not a stage of the sending thread: its route
    /// lookup, send call or socket send).
    #[inline]
    pub fn first_skb_stage(&self) -> Option<StageKind> {
        use StageKind as K;
        self.stages
            .iter()
            .map(|s| s.stage)
            .find(|s| !matches!(s, K::Route | K::AppSend | K::SockSend))
    }
    #[cfg(test)]
    pub fn stage_names(&self) -> Vec<&'static str> {
        self.stages.iter().map(|s| s.stage.as_str()).collect()
    }
    /// Task that queued the packet for transmit (the sender), if seen.
    pub fn sender(&self) -> Option<&Stage> {
        self.stages.iter().find(|s| s.stage == StageKind::DevQueue)
    }
    /// Cut by the start or the end of tracing: caught part-way when tracing started, or still
    /// in flight when it stopped (its end came after the programs were switched off). Counted
    /// apart, not as a packet. (A socket's copy is never one: it is printed, not counted.)
    pub fn partial(&self) -> bool {
        !self.is_copy() && (self.in_flight_at_start || self.cut_at_stop())
    }
    /// Still in flight when tracing stopped.
    pub fn cut_at_stop(&self) -> bool {
        self.verdict == Verdict::InFlight
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

/// Seen from its start in the namespace: sent here (tc egress or `dev_queue` first), arrived
/// from another device (its receive first), or a clone (first seen at the socket).
#[inline(always)]
pub fn seen_from_start(p: &PacketPath) -> bool {
    use StageKind as K;
    let first = p.first_skb_stage();
    let from_outside = p.rx_dev.is_none_or(|d| d.as_bytes() != b"lo");
    matches!(first, Some(K::TcEgress | K::DevQueue | K::CopyToUser)) || (first == Some(K::Receive) && from_outside)
}

/// Seen from its start in the namespace to its end (app_send and route, when linked, come first):
/// start = tc_egress/dev_queue (sent here), receive/tc_ingress (arrived from another device)
/// or copy_to_user (a clone);
/// a packet sent on lo must show xmit, backlog enqueue and receive; the end is a free tracepoint,
/// or for TCP a receive followed by a free path that has no tracepoint.
#[inline(always)]
pub fn is_complete(p: &PacketPath) -> bool {
    use StageKind as K;
    let first = p.first_skb_stage();
    let sent_here = matches!(first, Some(K::TcEgress | K::DevQueue));
    // A path that starts at tc ingress lacks its receive hook, and one received on lo its
    // transmit (see `Stats::tc_only`); one received through another device (a veth) starts at
    // its receive.
    let started = seen_from_start(p);
    let ended = matches!(
        p.verdict,
        Verdict::Consumed
            | Verdict::Delivered
            | Verdict::Dropped
            | Verdict::DeliveredClone
            | Verdict::FreedUntraced
            | Verdict::LeftNetns
    );
    // tc programs are on lo only: a path that starts at tc egress was sent on lo, even where
    // the kernel ran no tracing program to name its device (see `Stats::tc_only`).
    let on_lo = first == Some(K::TcEgress) || p.tx_dev.is_some_and(|d| d.as_bytes() == b"lo");
    let through_lo = if sent_here && on_lo {
        p.has(StageKind::Xmit) && p.has(StageKind::BacklogEnqueue) && p.has(StageKind::Receive)
    } else {
        true
    };
    started && ended && through_lo
}
