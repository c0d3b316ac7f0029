//! The stages a packet's path is made of: one per hook, and those derived from them.
use loopback_common::Hook;

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
    /// Every stage, in path order.
    pub const ALL: &[Self] = &[
        Self::AppSend,
        Self::SockSend,
        Self::Route,
        Self::TcEgress,
        Self::DevQueue,
        Self::GsoSegment,
        Self::Xmit,
        Self::BacklogEnqueue,
        Self::SoftirqRaise,
        Self::XmitDone,
        Self::SoftirqEntry,
        Self::Receive,
        Self::Xdp,
        Self::TcIngress,
        Self::SockQueue,
        Self::CopyToUser,
        Self::AppRecv,
        Self::Free,
        Self::Consume,
        Self::LeftNetns,
    ];

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

#[cfg(test)]
mod tests {
    use super::*;

    /// `ALL` lists every stage in declaration order, so a stage indexes tables by `as usize`
    /// (the per-stage histograms) and `ALL[k as usize] == k`.
    #[test]
    fn all_is_in_declaration_order() {
        for (i, k) in StageKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i, "{k}");
        }
        assert_eq!(StageKind::ALL.len(), StageKind::LeftNetns as usize + 1);
    }
}
