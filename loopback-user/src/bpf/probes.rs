//! THE table of hook points: every stage of the loopback path, which program serves it and how
//! it attaches. The attach code, `doctor`'s plan and the README's hook table all come from here.
use loopback_common::Hook;

/// How a program attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// BTF-typed raw tracepoint on the named tracepoint.
    TpBtf(&'static str),
    /// XDP in generic (SKB) mode on the traced namespace's `lo`.
    XdpLo,
    /// tcx egress on the traced namespace's `lo`.
    TcEgressLo,
    /// tcx ingress on the traced namespace's `lo`.
    TcIngressLo,
}

impl Attach {
    pub fn kind(&self) -> &'static str {
        match self {
            Attach::TpBtf(_) => "tp_btf",
            Attach::XdpLo => "xdp_generic",
            Attach::TcEgressLo | Attach::TcIngressLo => "tcx",
        }
    }
    pub fn target(&self) -> String {
        match self {
            Attach::TpBtf(tp) => (*tp).to_string(),
            Attach::XdpLo => "lo (generic XDP)".into(),
            Attach::TcEgressLo => "lo egress".into(),
            Attach::TcIngressLo => "lo ingress".into(),
        }
    }
}

/// One hook point.
#[derive(Clone, Copy, Debug)]
pub struct HookPoint {
    /// Program name in the eBPF object.
    pub program: &'static str,
    pub attach: Attach,
    /// The stage it reports ([`Hook::Route`] etc.); `None` for state-only hooks.
    pub hook: Option<Hook>,
    /// Kernel function the stage sits in (for people reading the plan).
    pub kernel_fn: &'static str,
    /// Without it, tracing cannot reconstruct paths at all.
    pub required: bool,
    /// Fallback program (same body, raw tracepoint) used when the tp_btf attach is refused.
    pub fallback: Option<&'static str>,
}

/// A tracepoint hook: program `program` (tp_btf) with its raw tracepoint twin `raw`.
const fn tp(
    program: &'static str,
    raw: &'static str,
    hook: Option<Hook>,
    kernel_fn: &'static str,
    required: bool,
) -> HookPoint {
    HookPoint {
        program,
        attach: Attach::TpBtf(program),
        hook,
        kernel_fn,
        required,
        fallback: Some(raw),
    }
}

/// In path order. Fallback chain per tracepoint hook: tp_btf, then its raw tracepoint twin (same
/// body, untyped arguments). fentry and kprobes are deliberately absent: every stage is served by
/// tracepoints plus the `lo` programs, which work where fentry/kprobes do not (see doctor), and
/// fentry would add nothing the tracepoints do not already give.
pub const PLAN: &[HookPoint] = &[
    tp(
        "sys_enter",
        "raw_sys_enter",
        Some(Hook::AppSend),
        "syscall entry: sendto/sendmsg/sendmmsg (the sending task)",
        false,
    ),
    tp(
        "fib_table_lookup",
        "raw_fib_table_lookup",
        Some(Hook::Route),
        "fib_table_lookup (IPv4 route)",
        false,
    ),
    tp(
        "fib6_table_lookup",
        "raw_fib6_table_lookup",
        Some(Hook::Route),
        "fib6_table_lookup (IPv6 route)",
        false,
    ),
    tp(
        "net_dev_queue",
        "raw_net_dev_queue",
        Some(Hook::DevQueue),
        "__dev_queue_xmit",
        true,
    ),
    HookPoint {
        program: "lo_tc_egress",
        attach: Attach::TcEgressLo,
        hook: Some(Hook::TcEgress),
        kernel_fn: "sch_handle_egress (tcx)",
        required: false,
        fallback: None,
    },
    tp(
        "net_dev_start_xmit",
        "raw_net_dev_start_xmit",
        Some(Hook::Xmit),
        "dev_hard_start_xmit -> loopback_xmit",
        true,
    ),
    tp(
        "netif_rx",
        "raw_netif_rx",
        Some(Hook::BacklogEnqueue),
        "netif_rx_internal -> enqueue_to_backlog",
        true,
    ),
    tp(
        "softirq_raise",
        "raw_softirq_raise",
        None,
        "__raise_softirq_irqoff (NET_RX)",
        false,
    ),
    tp(
        "net_dev_xmit",
        "raw_net_dev_xmit",
        Some(Hook::XmitDone),
        "dev_hard_start_xmit (after loopback_xmit)",
        true,
    ),
    tp(
        "softirq_entry",
        "raw_softirq_entry",
        None,
        "handle_softirqs -> net_rx_action",
        false,
    ),
    tp(
        "netif_receive_skb",
        "raw_netif_receive_skb",
        Some(Hook::Receive),
        "process_backlog -> __netif_receive_skb_core",
        true,
    ),
    HookPoint {
        program: "lo_xdp",
        attach: Attach::XdpLo,
        hook: Some(Hook::Xdp),
        kernel_fn: "do_xdp_generic",
        required: false,
        fallback: None,
    },
    HookPoint {
        program: "lo_tc_ingress",
        attach: Attach::TcIngressLo,
        hook: Some(Hook::TcIngress),
        kernel_fn: "sch_handle_ingress (tcx)",
        required: false,
        fallback: None,
    },
    tp(
        "sk_data_ready",
        "raw_sk_data_ready",
        Some(Hook::SockQueue),
        "sock_def_readable (queued to the socket)",
        false,
    ),
    tp(
        "skb_copy_datagram_iovec",
        "raw_skb_copy_datagram_iovec",
        Some(Hook::CopyToUser),
        "skb_copy_datagram_iter (recvmsg)",
        false,
    ),
    tp(
        "sock_recv_length",
        "raw_sock_recv_length",
        Some(Hook::AppRecv),
        "sock_recvmsg returns (application read)",
        false,
    ),
    tp(
        "kfree_skb",
        "raw_kfree_skb",
        Some(Hook::Free),
        "kfree_skb_reason (drop)",
        true,
    ),
    tp(
        "consume_skb",
        "raw_consume_skb",
        Some(Hook::Consume),
        "consume_skb (normal free)",
        true,
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stage_hook_is_served_exactly_once() {
        for h in Hook::ALL {
            if h == Hook::LeftNetns {
                continue; // a by-product of netif_receive_skb, not a hook point of its own
            }
            let n = PLAN.iter().filter(|p| p.hook == Some(h)).count();
            let expect = if h == Hook::Route { 2 } else { 1 };
            assert_eq!(n, expect, "{h:?}");
        }
        let mut names: Vec<_> = PLAN.iter().map(|p| p.program).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), PLAN.len(), "program names are unique");
        for hp in PLAN {
            if let (Attach::TpBtf(tp), Some(raw)) = (hp.attach, hp.fallback) {
                assert_eq!(raw, format!("raw_{tp}"), "fallback twin of {tp}");
            }
        }
    }
}
