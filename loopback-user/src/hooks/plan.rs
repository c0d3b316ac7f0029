//! THE table of hook points: every stage of the loopback path, which programs can serve it and
//! how they attach. The attach code and `doctor`'s plan come from here, and a test checks the
//! README's hook table against it.
use loopback_common::Hook;

/// How a program attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// fentry on the named kernel function (BTF trampoline).
    Fentry(&'static str),
    /// kprobe on the named kernel function.
    Kprobe(&'static str),
    /// BTF-typed raw tracepoint on the named tracepoint.
    TpBtf(&'static str),
    /// Raw tracepoint (untyped arguments) on the named tracepoint.
    RawTp(&'static str),
    /// XDP in generic (SKB) mode on the traced namespace's `lo`.
    XdpLo,
    /// tcx egress / ingress on the traced namespace's `lo`.
    TcxLo(Dir),
    /// Classic tc on the traced namespace's `lo`: a clsact qdisc (added only if absent) and a
    /// direct-action bpf filter, for kernels without tcx.
    ClassicTcLo(Dir),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    Egress,
    Ingress,
}

impl Attach {
    pub fn kind(&self) -> &'static str {
        match self {
            Attach::Fentry(_) => "fentry",
            Attach::Kprobe(_) => "kprobe",
            Attach::TpBtf(_) => "tp_btf",
            Attach::RawTp(_) => "raw_tracepoint",
            Attach::XdpLo => "xdp_generic",
            Attach::TcxLo(_) => "tcx",
            Attach::ClassicTcLo(_) => "tc (classic)",
        }
    }
    pub fn target(&self) -> String {
        match self {
            Attach::Fentry(f) | Attach::Kprobe(f) => (*f).to_string(),
            Attach::TpBtf(tp) | Attach::RawTp(tp) => (*tp).to_string(),
            Attach::XdpLo => "lo (generic XDP)".into(),
            Attach::TcxLo(Dir::Egress) | Attach::ClassicTcLo(Dir::Egress) => "lo egress".into(),
            Attach::TcxLo(Dir::Ingress) | Attach::ClassicTcLo(Dir::Ingress) => "lo ingress".into(),
        }
    }
}

/// One way to serve a hook point: a program of the eBPF object and how it attaches.
#[derive(Clone, Copy, Debug)]
pub struct Candidate {
    pub program: &'static str,
    pub attach: Attach,
}

/// One hook point.
#[derive(Clone, Copy, Debug)]
pub struct HookPoint {
    /// The hook point's name (its first candidate's program; stable, used by `--raw-tp` tests,
    /// `LOTRACE_FAULT=refuse-hook:NAME` and the attach report).
    pub name: &'static str,
    /// Tried in order on the running kernel; the first that loads and attaches serves the hook,
    /// and why each earlier one was refused is recorded.
    pub candidates: &'static [Candidate],
    /// The stage it reports ([`Hook::Route`] etc.); `None` for state-only hooks.
    pub hook: Option<Hook>,
    /// Kernel function the stage sits in (for people reading the plan).
    pub kernel_fn: &'static str,
    /// Without it, tracing cannot reconstruct paths at all.
    pub required: bool,
}

const fn c(program: &'static str, attach: Attach) -> Candidate {
    Candidate { program, attach }
}

/// A tracepoint hook: tp_btf program `name`, then its raw tracepoint twin `raw_<name>` (same body,
/// untyped arguments), then the function candidates `more` (for tracepoints older kernels lack).
macro_rules! tp {
    ($name:literal, $hook:expr, $kernel_fn:literal, $required:expr $(, $more:expr)*) => {
        HookPoint {
            name: $name,
            candidates: &[
                c($name, Attach::TpBtf($name)),
                c(concat!("raw_", $name), Attach::RawTp($name)),
                $($more,)*
            ],
            hook: $hook,
            kernel_fn: $kernel_fn,
            required: $required,
        }
    };
}

/// A kernel-function hook with no tracepoint: fentry `fentry_<x>`, then kprobe `kprobe_<x>`.
macro_rules! func {
    ($name:literal, $func:literal, $hook:expr, $kernel_fn:literal) => {
        HookPoint {
            name: $name,
            candidates: &[
                c(concat!("fentry_", $name), Attach::Fentry($func)),
                c(concat!("kprobe_", $name), Attach::Kprobe($func)),
            ],
            hook: $hook,
            kernel_fn: $kernel_fn,
            required: false,
        }
    };
}

const TC_EGRESS: &[Candidate] = &[
    c("lo_tc_egress", Attach::TcxLo(Dir::Egress)),
    c("lo_tc_egress", Attach::ClassicTcLo(Dir::Egress)),
];
const TC_INGRESS: &[Candidate] = &[
    c("lo_tc_ingress", Attach::TcxLo(Dir::Ingress)),
    c("lo_tc_ingress", Attach::ClassicTcLo(Dir::Ingress)),
];

/// A `lo` tc hook: tcx, then classic tc (the same program).
const fn tc_lo(name: &'static str, dir: Dir, hook: Hook, kernel_fn: &'static str) -> HookPoint {
    HookPoint {
        name,
        candidates: match dir {
            Dir::Egress => TC_EGRESS,
            Dir::Ingress => TC_INGRESS,
        },
        hook: Some(hook),
        kernel_fn,
        required: false,
    }
}

/// In path order. Each hook point lists its candidates, best first: fentry before kprobe (a
/// trampoline costs less than a breakpoint), tp_btf before its raw twin (typed, direct loads).
/// This kernel's answer for each is in `lotrace doctor`; the README's table says the same.
pub const PLAN: &[HookPoint] = &[
    tp!(
        "sys_enter",
        Some(Hook::AppSend),
        "syscall entry: sendto/sendmsg/sendmmsg (the sending task)",
        false
    ),
    func!(
        "inet_sendmsg",
        "inet_sendmsg",
        Some(Hook::SockSend),
        "sock_sendmsg -> inet_sendmsg (IPv4 socket send; no tracepoint)"
    ),
    func!(
        "inet6_sendmsg",
        "inet6_sendmsg",
        Some(Hook::SockSend),
        "sock_sendmsg -> inet6_sendmsg (IPv6 socket send; no tracepoint)"
    ),
    tp!(
        "fib_table_lookup",
        Some(Hook::Route),
        "fib_table_lookup (IPv4 route)",
        false
    ),
    tp!(
        "fib6_table_lookup",
        Some(Hook::Route),
        "fib6_table_lookup (IPv6 route)",
        false
    ),
    tp!("net_dev_queue", Some(Hook::DevQueue), "__dev_queue_xmit", true),
    tc_lo(
        "lo_tc_egress",
        Dir::Egress,
        Hook::TcEgress,
        "sch_handle_egress (tcx or clsact)",
    ),
    tp!(
        "net_dev_start_xmit",
        Some(Hook::Xmit),
        "dev_hard_start_xmit -> loopback_xmit",
        true
    ),
    tp!(
        "netif_rx",
        Some(Hook::BacklogEnqueue),
        "netif_rx_internal -> enqueue_to_backlog",
        true
    ),
    tp!("softirq_raise", None, "__raise_softirq_irqoff (NET_RX)", false),
    tp!(
        "net_dev_xmit",
        Some(Hook::XmitDone),
        "dev_hard_start_xmit (after loopback_xmit)",
        true
    ),
    tp!("softirq_entry", None, "handle_softirqs -> net_rx_action", false),
    tp!(
        "netif_receive_skb",
        Some(Hook::Receive),
        "process_backlog -> __netif_receive_skb_core",
        true
    ),
    HookPoint {
        name: "lo_xdp",
        candidates: &[c("lo_xdp", Attach::XdpLo)],
        hook: Some(Hook::Xdp),
        kernel_fn: "do_xdp_generic",
        required: false,
    },
    tc_lo(
        "lo_tc_ingress",
        Dir::Ingress,
        Hook::TcIngress,
        "sch_handle_ingress (tcx or clsact)",
    ),
    tp!(
        "sk_data_ready",
        Some(Hook::SockQueue),
        "sock_def_readable (queued to the socket)",
        false,
        c("fentry_sock_def_readable", Attach::Fentry("sock_def_readable")),
        c("kprobe_sock_def_readable", Attach::Kprobe("sock_def_readable"))
    ),
    tp!(
        "skb_copy_datagram_iovec",
        Some(Hook::CopyToUser),
        "skb_copy_datagram_iter (recvmsg)",
        false
    ),
    tp!(
        "sock_recv_length",
        Some(Hook::AppRecv),
        "sock_recvmsg returns (application read)",
        false
    ),
    tp!("kfree_skb", Some(Hook::Free), "kfree_skb_reason (drop)", true),
    tp!("consume_skb", Some(Hook::Consume), "consume_skb (normal free)", true),
    func!(
        "kfree_skb_fn",
        "__kfree_skb",
        Some(Hook::Consume),
        "__kfree_skb (TCP: pure ACKs, acknowledged segments)"
    ),
    func!(
        "kfree_skb_partial",
        "kfree_skb_partial",
        Some(Hook::Consume),
        "kfree_skb_partial (TCP: coalesced on receive)"
    ),
    func!(
        "skb_defer_free",
        "skb_attempt_defer_free",
        Some(Hook::Consume),
        "skb_attempt_defer_free (TCP: read by the application)"
    ),
    func!(
        "consume_stateless",
        "__consume_stateless_skb",
        Some(Hook::Consume),
        "__consume_stateless_skb (UDP: read by the application)"
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stage_hook_is_served_and_names_are_unique() {
        for h in Hook::ALL {
            if h == Hook::LeftNetns {
                continue; // a by-product of netif_receive_skb, not a hook point of its own
            }
            let n = PLAN.iter().filter(|p| p.hook == Some(h)).count();
            let expect = match h {
                Hook::Route | Hook::SockSend => 2, // IPv4 and IPv6
                Hook::Consume => 5,                // consume_skb and four untraced free functions
                _ => 1,
            };
            assert_eq!(n, expect, "{h:?}");
        }
        let mut names: Vec<_> = PLAN.iter().map(|p| p.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), PLAN.len(), "hook point names are unique");
        for hp in PLAN {
            assert!(
                hp.candidates[0].program.ends_with(hp.name),
                "a hook point is named by its first candidate: {}",
                hp.name
            );
            if let Attach::TpBtf(tp) = hp.candidates[0].attach {
                assert_eq!(hp.candidates[1].attach, Attach::RawTp(tp), "raw twin of {tp}");
                assert_eq!(hp.candidates[1].program, format!("raw_{tp}"), "raw twin of {tp}");
            }
            // fentry before kprobe, tp_btf before raw: the cheaper one first.
            let rank = |a: &Attach| match a {
                Attach::TpBtf(_) => 0,
                Attach::RawTp(_) => 1,
                Attach::Fentry(_) => 2,
                Attach::Kprobe(_) => 3,
                _ => 0,
            };
            assert!(
                hp.candidates
                    .windows(2)
                    .all(|w| rank(&w[0].attach) <= rank(&w[1].attach)),
                "{}",
                hp.name
            );
        }
    }

    /// The hook table of docs/hook-plan.md is written from this one: a stage, hook or attach kind added or
    /// renamed here without that table (or the other way round) fails here.
    #[test]
    fn the_readme_hook_table_says_what_the_plan_does() {
        use crate::hooks::StageKind;
        let readme = include_str!("../../../docs/hook-plan.md");
        let section = readme
            .split("## Hook plan")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("docs/hook-plan.md has a Hook plan section");
        let rows: Vec<(Vec<&str>, &str)> = section
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| stage") && !l.starts_with("|---"))
            .map(|l| {
                let first = l.trim_start_matches("| ").split(" |").next().unwrap_or("");
                (first.split(" / ").map(str::trim).collect(), l)
            })
            .collect();
        assert!(rows.len() >= 15, "{rows:?}");
        for hp in PLAN {
            let key = hp.hook.map(|h| StageKind::of(h).as_str()).unwrap_or(hp.name);
            let mine: Vec<&str> = rows.iter().filter(|(k, _)| k.contains(&key)).map(|(_, l)| *l).collect();
            assert!(!mine.is_empty(), "README hook table has no row for stage {key}");
            for c in hp.candidates {
                let (kind, token) = match c.attach {
                    Attach::TpBtf(tp) => ("tp_btf", format!("`{tp}`")),
                    Attach::RawTp(tp) => ("tp_btf", format!("`{tp}`")),
                    Attach::Fentry(f) => ("fentry", format!("`{f}`")),
                    Attach::Kprobe(f) => ("kprobe", format!("`{f}`")),
                    Attach::XdpLo => ("XDP", "`lo`".to_string()),
                    Attach::TcxLo(_) => ("tcx", "`lo`".to_string()),
                    Attach::ClassicTcLo(_) => ("classic tc", "`lo`".to_string()),
                };
                assert!(
                    mine.iter().any(|l| l.contains(kind) && l.contains(&token)),
                    "README hook table, stage {key}: no row names {kind} {token} ({})",
                    c.program
                );
            }
        }
        // Every stage the README names exists.
        let known: Vec<&str> = StageKind::ALL.iter().map(|k| k.as_str()).collect();
        for (keys, l) in &rows {
            for k in keys {
                assert!(known.contains(k), "README hook table names an unknown stage {k}: {l}");
            }
        }
    }
}
