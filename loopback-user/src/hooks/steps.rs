//! The loopback path in the steps the dashboard draws, top to bottom: each step groups the stages
//! that show it.
use super::StageKind;

/// One step of the loopback path as the dashboard draws it, top to bottom.
pub struct Step {
    pub name: &'static str,
    /// Stages  that belong to this step; empty: not observable here.
    pub stages: &'static [StageKind],
    /// Why it is not observable (when `stages` is empty, or every hook point of the plan that
    /// serves its stages is missing here).
    pub why_not: &'static str,
}

pub const STEPS: &[Step] = &[
    Step {
        name: "app send",
        stages: &[StageKind::AppSend],
        why_not: "",
    },
    Step {
        name: "socket send",
        stages: &[StageKind::SockSend],
        why_not: "no tracepoint; needs fentry or kprobes",
    },
    Step {
        name: "route",
        stages: &[StageKind::Route],
        why_not: "",
    },
    Step {
        name: "IP out, dev queue",
        stages: &[StageKind::TcEgress, StageKind::DevQueue, StageKind::GsoSegment],
        why_not: "",
    },
    Step {
        name: "lo transmit",
        stages: &[StageKind::Xmit, StageKind::XmitDone],
        why_not: "",
    },
    Step {
        name: "backlog (per CPU)",
        stages: &[StageKind::BacklogEnqueue],
        why_not: "",
    },
    Step {
        name: "NET_RX softirq",
        stages: &[StageKind::SoftirqRaise, StageKind::SoftirqEntry],
        why_not: "",
    },
    Step {
        name: "IP receive",
        stages: &[StageKind::Receive, StageKind::TcIngress, StageKind::Xdp],
        why_not: "",
    },
    Step {
        name: "socket queue",
        stages: &[StageKind::SockQueue, StageKind::CopyToUser],
        why_not: "",
    },
    Step {
        name: "app recv",
        stages: &[StageKind::AppRecv],
        why_not: "",
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Every stage shows in exactly one step, but the ends of a path (its free, consume or leaving
    /// the namespace), which the dashboard counts apart.
    #[test]
    fn every_stage_but_the_ends_is_in_exactly_one_step() {
        for k in StageKind::ALL {
            let n = STEPS.iter().filter(|s| s.stages.contains(k)).count();
            let end = matches!(k, StageKind::Free | StageKind::Consume | StageKind::LeftNetns);
            assert_eq!(n, usize::from(!end), "{k} is in {n} steps");
        }
    }
}
