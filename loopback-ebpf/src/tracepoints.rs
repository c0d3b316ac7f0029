//! tp_btf programs along the loopback path. Above each: the tracepoint prototype it relies on
//! (stable since the kernel named), read from the running kernel's BTF.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::{
    macros::{btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use loopback_common::{Hook, LOOPBACK_IFINDEX, NAME_LEN, NET_RX_SOFTIRQ, OFFSET_UNKNOWN, hdr_kind};

use crate::{
    emit::{
        AtXmit, Hit, at_xmit, emit, emit_hit, free_in_run, last_run_skb, network_header, open_run, run_skb, run_stage,
        set_dev, skb_data, skb_len, split_unseen,
    },
    kernel::{
        Mem, dev_in_scope, ensure_tracked, net_in_scope, off, probe, read, skb_dev, task_in_scope, track, tracked,
        untrack,
    },
    maps::{CONSUME_SKB_ARGS, KFREE_SKB_ARGS, LO_INGRESS, MISS_SPLIT_FREE, RX_SKB, SEND_SYSCALLS, SOFTIRQ},
};

/// `skb->protocol` of IPv4 / IPv6 as a little-endian load of the big-endian field reads it.
pub(crate) const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
pub(crate) const ETH_P_IPV6_BE: u16 = 0x86DDu16.to_be();

/// Whether `dev` is its namespace's loopback device.
#[inline(always)]
fn is_lo<M: Mem>(dev: u64) -> bool {
    read::<M, u32>(dev, off!(dev_ifindex)) == Some(LOOPBACK_IFINDEX)
}

/// A hook of the transmit chain after the first: staged into the open run of this skb, or its own
/// record when none is open (a device other than `lo`) and the skb is in scope. These tracepoints
/// fire for every packet of the host, so `hit` reads the skb only once it is known to be ours.
#[inline(always)]
fn tx_hook<M: Mem>(hook: Hook, skb: u64, close: bool, hit: impl FnOnce() -> Hit) {
    if run_skb() == skb {
        run_stage::<M>(hook, hit(), close);
    } else if tracked(skb) {
        emit_hit::<M>(hook, skb, hit());
    }
}

/// Tracepoint arguments (`TP_PROTO` order), the same for tp_btf and raw tracepoints.
pub trait Args: Mem {
    fn arg(&self, n: usize) -> u64;
}
impl Mem for BtfTracePointContext {
    const DIRECT: bool = true;
}
impl Mem for RawTracePointContext {
    const DIRECT: bool = false;
}
impl Args for BtfTracePointContext {
    #[inline(always)]
    fn arg(&self, n: usize) -> u64 {
        BtfTracePointContext::arg(self, n)
    }
}
impl Args for RawTracePointContext {
    #[inline(always)]
    fn arg(&self, n: usize) -> u64 {
        RawTracePointContext::arg(self, n)
    }
}

/// Every hook point is built twice from one body: a tp_btf program (preferred) and a raw
/// tracepoint twin named `raw_<tracepoint>` that the loader falls back to when tp_btf is refused.
macro_rules! twin {
    ($name:tt, $btf:ident, $raw:ident, $body:ident) => {
        #[btf_tracepoint(function = $name)]
        pub fn $btf(ctx: BtfTracePointContext) -> i32 {
            if crate::silent() {
                return 0;
            }
            $body(&ctx)
        }
        #[raw_tracepoint(tracepoint = $name)]
        pub fn $raw(ctx: RawTracePointContext) -> i32 {
            if crate::silent() {
                return 0;
            }
            $body(&ctx)
        }
    };
}
pub(crate) use twin;

#[inline(always)]
fn set_rx_skb(skb: u64) {
    if let Some(p) = RX_SKB.get_ptr_mut(0) {
        // SAFETY: `p` is this CPU's RX_SKB slot from get_ptr_mut, valid for the program run.
        unsafe { *p = skb };
    }
}

// net_dev_queue(struct sk_buff *skb) — `__dev_queue_xmit`, since 3.x.
// Entry point of the transmit half: decides whether the skb belongs to the traced namespace.
twin!("net_dev_queue", net_dev_queue, raw_net_dev_queue, net_dev_queue_body);
#[inline(always)]
fn net_dev_queue_body<A: Args>(ctx: &A) -> i32 {
    let skb: u64 = ctx.arg(0);
    let dev = skb_dev::<A>(skb);
    if !dev_in_scope::<A>(dev) {
        untrack(skb);
        return 0;
    }
    let mut hit = Hit {
        len: skb_len::<A>(skb),
        dev,
        ..Hit::default()
    };
    // tc egress on lo runs first: it has opened this skb's run, with the bytes.
    if run_skb() == skb {
        run_stage::<A>(Hook::DevQueue, hit, false);
        return 0;
    }
    let fresh = ensure_tracked(skb);
    if fresh {
        hit.capture_at::<A>(hdr_kind::L3, skb, network_header::<A>(skb));
    }
    if is_lo::<A>(dev) {
        open_run::<A>(Hook::DevQueue, skb, hit, !fresh);
    } else {
        emit_hit::<A>(Hook::DevQueue, skb, hit);
    }
    0
}

// net_dev_start_xmit(const struct sk_buff *skb, const struct net_device *dev) — since 4.x.
twin!(
    "net_dev_start_xmit",
    net_dev_start_xmit,
    raw_net_dev_start_xmit,
    net_dev_start_xmit_body
);
#[inline(always)]
fn net_dev_start_xmit_body<A: Args>(ctx: &A) -> i32 {
    let skb: u64 = ctx.arg(0);
    let dev: u64 = ctx.arg(1);
    let hit = || Hit {
        len: skb_len::<A>(skb),
        dev,
        ..Hit::default()
    };
    // The hot path: a hook of this skb's open run (as `tx_hook`, with a segment's case between
    // the run and the scope).
    if run_skb() == skb {
        run_stage::<A>(Hook::Xmit, hit(), false);
        return 0;
    }
    // A GSO segment of the skb split just before on this CPU (`validate_xmit_skb`): a new skb,
    // first seen here. Its own run, its own bytes, the split skb's address in `arg1`. Checked
    // before the scope: a segment may be allocated at the address of an skb whose free fired
    // no tracepoint and is still in scope.
    //
    // The split skb's own free (`consume_skb` inside `validate_xmit_skb`) may never reach us:
    // the kernel skips a program that is already running on this CPU (its recursion misses),
    // e.g. a softirq's transmit that interrupted a task's `consume_skb`. Then the first segment
    // says it: on lo without a queue, the only skb that reaches the driver while this CPU's
    // run waits for its own transmit is what `validate_xmit_skb` made of it.
    //
    // (The namespace test: another namespace's segments may follow ours on this CPU, and its
    // split skb, never in scope, does not reset the parent.)
    let parent = match at_xmit() {
        AtXmit::Nothing => 0,
        _ if !(is_lo::<A>(dev) && dev_in_scope::<A>(dev)) => 0,
        AtXmit::SegmentOf(parent) => parent,
        AtXmit::Waiting(_) if dequeued::<A>(skb, dev) => 0,
        AtXmit::Waiting(waiting) => {
            untrack(waiting);
            split_unseen::<A>()
        }
    };
    if parent != 0 {
        ensure_tracked(skb);
        let mut head = Hit { arg1: parent, ..hit() };
        // The frame as the driver gets it (`skb->data` is the Ethernet header here), like tc
        // egress captures it: the segment's own bytes, for the record and for pcapng.
        head.capture_at::<A>(hdr_kind::ETH, skb, skb_data::<A>(skb));
        open_run::<A>(Hook::Xmit, skb, head, false);
    } else if tracked(skb) {
        if dev_in_scope::<A>(dev) {
            // Another device's transmit of a traced skb (it left through a veth).
            emit_hit::<A>(Hook::Xmit, skb, hit());
        } else {
            // Not ours: an skb of this namespace freed where no tracepoint fires (TCP) is still in
            // scope, and another namespace's GSO segment (which passes no `net_dev_queue`, where
            // foreign skbs leave scope) was allocated at its address. A traced skb is never sent
            // by a device of another namespace: once through a veth it is followed no further.
            untrack(skb);
        }
    }
    0
}

/// Whether `skb`, reaching `dev`'s driver while this CPU's run waits for another skb's transmit,
/// may be an older skb dequeued from a queueing discipline someone added (it passed
/// `net_dev_queue`, so it is in scope; a segment never passed it). On lo's own noqueue (no
/// `enqueue`) nothing is queued. When the kernel's BTF gave no offsets, any tracked skb may be.
#[inline(always)]
fn dequeued<A: Args>(skb: u64, dev: u64) -> bool {
    let (dq, enq) = (off!(dev_qdisc), off!(qdisc_enqueue));
    let queues = dq == OFFSET_UNKNOWN as u64
        || match probe::<u64>(dev, dq) {
            Some(q) if q != 0 => probe::<u64>(q, enq).is_none_or(|f| f != 0),
            _ => true,
        };
    queues && tracked(skb)
}

// netif_rx(struct sk_buff *skb) — `netif_rx_internal`, before `enqueue_to_backlog`.
twin!("netif_rx", netif_rx, raw_netif_rx, netif_rx_body);
#[inline(always)]
fn netif_rx_body<A: Args>(ctx: &A) -> i32 {
    let skb: u64 = ctx.arg(0);
    tx_hook::<A>(Hook::BacklogEnqueue, skb, false, || Hit {
        len: skb_len::<A>(skb),
        ..Hit::default()
    });
    0
}

// net_dev_xmit(struct sk_buff *skb, int rc, struct net_device *dev, unsigned int skb_len).
// The skb must not be read here: the driver may already have handed it on.
twin!("net_dev_xmit", net_dev_xmit, raw_net_dev_xmit, net_dev_xmit_body);
#[inline(always)]
fn net_dev_xmit_body<A: Args>(ctx: &A) -> i32 {
    let skb: u64 = ctx.arg(0);
    let rc: u64 = ctx.arg(1);
    let len: u64 = ctx.arg(3);
    // The end of the transmit chain: closes the run.
    tx_hook::<A>(Hook::XmitDone, skb, true, || Hit {
        len: len as u32,
        arg0: rc as i32 as i64 as u64,
        dev: ctx.arg(2),
        ..Hit::default()
    });
    0
}

// softirq_raise(unsigned int vec_nr) — irq:softirq_raise.
twin!("softirq_raise", softirq_raise, raw_softirq_raise, softirq_raise_body);
#[inline(always)]
fn softirq_raise_body<A: Args>(ctx: &A) -> i32 {
    let vec: u64 = ctx.arg(0);
    if vec as u32 == NET_RX_SOFTIRQ
        && let Some(s) = SOFTIRQ.get_ptr_mut(0)
    {
        // SAFETY: `s` is this CPU's SOFTIRQ slot from get_ptr_mut, valid for the program run.
        unsafe { (*s).raise_ts = bpf_ktime_get_ns() };
    }
    0
}

// softirq_entry(unsigned int vec_nr) — irq:softirq_entry.
twin!("softirq_entry", softirq_entry, raw_softirq_entry, softirq_entry_body);
#[inline(always)]
fn softirq_entry_body<A: Args>(ctx: &A) -> i32 {
    let vec: u64 = ctx.arg(0);
    if vec as u32 == NET_RX_SOFTIRQ
        && let Some(s) = SOFTIRQ.get_ptr_mut(0)
    {
        // SAFETY: `s` is this CPU's SOFTIRQ slot from get_ptr_mut, valid for the program run.
        unsafe { (*s).entry_ts = bpf_ktime_get_ns() };
    }
    0
}

// netif_receive_skb(struct sk_buff *skb) — `__netif_receive_skb_core`, in the NET_RX softirq,
// before generic XDP and tc ingress. Entry point of the receive half.
twin!(
    "netif_receive_skb",
    netif_receive_skb,
    raw_netif_receive_skb,
    netif_receive_skb_body
);
#[inline(always)]
fn netif_receive_skb_body<A: Args>(ctx: &A) -> i32 {
    let skb: u64 = ctx.arg(0);
    let dev = skb_dev::<A>(skb);
    if !dev_in_scope::<A>(dev) {
        // A packet of ours arriving on another namespace's device (through a veth): say so once,
        // so user space ends its path instead of mixing it with a later skb at this address.
        if tracked(skb) {
            emit(Hook::LeftNetns, skb, false, |e| set_dev::<A>(e, dev));
            untrack(skb);
        }
        set_rx_skb(0);
        return 0;
    }
    set_rx_skb(skb);
    let mut hit = Hit {
        len: skb_len::<A>(skb),
        dev,
        ..Hit::default()
    };
    if let Some(s) = SOFTIRQ.get(0) {
        hit.arg0 = s.entry_ts;
        hit.arg1 = s.raise_ts;
    }
    // A packet received on lo right after its own transmit on this CPU is in scope already (every
    // lo packet went through our tc egress); any other is looked up, and taken into scope with its
    // header when new (it came in through a veth).
    let lo = is_lo::<A>(dev);
    let fresh = !(lo && skb == last_run_skb()) && ensure_tracked(skb);
    if fresh {
        hit.capture_at::<A>(hdr_kind::L3, skb, skb_data::<A>(skb));
    }
    // The run is closed by our tc ingress program, so only while it is attached.
    if lo && LO_INGRESS.get(0).is_some_and(|v| *v != 0) {
        open_run::<A>(Hook::Receive, skb, hit, !fresh);
    } else {
        emit_hit::<A>(Hook::Receive, skb, hit);
    }
    0
}

// skb_copy_datagram_iovec(const struct sk_buff *skb, int len) — data copied to the application.
// Raw sockets receive clones the transmit hooks never saw: those are taken in scope when the
// receiving task lives in the traced namespace.
twin!(
    "skb_copy_datagram_iovec",
    skb_copy_datagram_iovec,
    raw_skb_copy_datagram_iovec,
    skb_copy_datagram_iovec_body
);
#[inline(always)]
fn skb_copy_datagram_iovec_body<A: Args>(ctx: &A) -> i32 {
    let skb: u64 = ctx.arg(0);
    let fresh = !tracked(skb);
    if fresh {
        // A copy seen first here (a raw socket's clone) is one of ours only if it is an IP
        // packet: netlink, packet sockets and others copy datagrams through here too.
        let proto = read::<A, u16>(skb, off!(skb_protocol)).unwrap_or(0);
        if (proto != ETH_P_IP_BE && proto != ETH_P_IPV6_BE) || !task_in_scope::<A>() {
            return 0;
        }
        track(skb);
    }
    let len: u64 = ctx.arg(1);
    let mut hit = Hit {
        len: skb_len::<A>(skb),
        arg0: len as u32 as u64,
        ..Hit::default()
    };
    // Only a clone seen here first (raw sockets) needs its header.
    if fresh {
        hit.capture_at::<A>(hdr_kind::L3, skb, network_header::<A>(skb));
    }
    emit_hit::<A>(Hook::CopyToUser, skb, hit);
    0
}

// kfree_skb(struct sk_buff *skb, void *location, enum skb_drop_reason reason, struct sock *rx_sk):
// `reason` only where the kernel's BTF prototype has it (KFREE_SKB_ARGS); `rx_sk` is not read.
// — the 4-argument form is 6.11+; older kernels have 3 (rx_sk is not read).
twin!("kfree_skb", kfree_skb, raw_kfree_skb, kfree_skb_body);
#[inline(always)]
fn kfree_skb_body<A: Args>(ctx: &A) -> i32 {
    let skb: u64 = ctx.arg(0);
    let location: u64 = ctx.arg(1);
    // SAFETY: a plain read of a read-only global the loader wrote before loading.
    let reason: u64 = if unsafe { core::ptr::read_volatile(&KFREE_SKB_ARGS) } >= 3 {
        ctx.arg(2)
    } else {
        0
    };
    let hit = Hit {
        arg0: reason as u32 as u64,
        arg1: location,
        ..Hit::default()
    };
    freed::<A>(Hook::Free, skb, hit);
    0
}

// consume_skb(struct sk_buff *skb, void *location): `location` only where the kernel's BTF
// prototype has it (CONSUME_SKB_ARGS).
twin!("consume_skb", consume_skb, raw_consume_skb, consume_skb_body);
#[inline(always)]
fn consume_skb_body<A: Args>(ctx: &A) -> i32 {
    let skb: u64 = ctx.arg(0);
    // SAFETY: a plain read of a read-only global the loader wrote before loading.
    let location: u64 = if unsafe { core::ptr::read_volatile(&CONSUME_SKB_ARGS) } >= 2 {
        ctx.arg(1)
    } else {
        0
    };
    let hit = Hit {
        arg1: location,
        ..Hit::default()
    };
    freed::<A>(Hook::Consume, skb, hit);
    0
}

/// A free ends the skb's scope; freed inside its own run (a drop in the transmit or receive
/// chain), it ends the run too.
#[inline(always)]
pub fn freed<A: Args>(hook: Hook, skb: u64, hit: Hit) {
    if run_skb() == skb {
        // SAFETY: a plain read of a read-only global the loader wrote before loading.
        if unsafe { core::ptr::read_volatile(&MISS_SPLIT_FREE) } != 0
            && hook == Hook::Consume
            && matches!(at_xmit(), AtXmit::Waiting(w) if w == skb)
        {
            return;
        }
        untrack(skb);
        free_in_run::<A>(hook, hit);
        return;
    }
    if !tracked(skb) {
        return;
    }
    untrack(skb);
    emit_hit::<A>(hook, skb, hit);
}

#[inline(always)]
fn route_event<A: Args>(family: u8, table: u64, err: u64, nhc: u64, dst: u64, src: u64, addr_len: u64) {
    emit(Hook::Route, 0, false, |e| {
        e.arg0 = table;
        e.arg1 = err;
        if nhc != 0 {
            let dev = read::<A, u64>(nhc, off!(nhc_dev)).unwrap_or(0);
            if dev != 0 {
                e.ifname = read::<A, [u8; NAME_LEN]>(dev, off!(dev_name)).unwrap_or([0; NAME_LEN]);
                e.ifindex = read::<A, u32>(dev, off!(dev_ifindex)).unwrap_or(0);
            }
        }
        e.hdr = [0; loopback_common::HDR_CAP];
        e.hdr[0] = family;
        if addr_len == 4 {
            if let Some(d) = read::<A, [u8; 4]>(dst, 0) {
                e.hdr[4..8].copy_from_slice(&d);
            }
            if let Some(s) = read::<A, [u8; 4]>(src, 0) {
                e.hdr[20..24].copy_from_slice(&s);
            }
        } else {
            if let Some(d) = read::<A, [u8; 16]>(dst, 0) {
                e.hdr[4..20].copy_from_slice(&d);
            }
            if let Some(s) = read::<A, [u8; 16]>(src, 0) {
                e.hdr[20..36].copy_from_slice(&s);
            }
        }
        e.hdr_kind = hdr_kind::ROUTE;
        e.hdr_len = 36;
    });
}

// fib_table_lookup(u32 tb_id, const struct flowi4 *flp, const struct fib_nh_common *nhc, int err)
// — fib:fib_table_lookup, 4.19+. No namespace argument: scoped by the calling task's namespace.
twin!(
    "fib_table_lookup",
    fib_table_lookup,
    raw_fib_table_lookup,
    fib_table_lookup_body
);
#[inline(always)]
fn fib_table_lookup_body<A: Args>(ctx: &A) -> i32 {
    if !task_in_scope::<A>() {
        return 0;
    }
    let tb_id: u64 = ctx.arg(0);
    let flp: u64 = ctx.arg(1);
    let nhc: u64 = ctx.arg(2);
    let err: u64 = ctx.arg(3);
    route_event::<A>(
        4,
        tb_id as u32 as u64,
        err as i32 as i64 as u64,
        nhc,
        flp + off!(flowi4_daddr),
        flp + off!(flowi4_saddr),
        4,
    );
    0
}

// fib6_table_lookup(const struct net *net, const struct fib6_result *res,
//                   struct fib6_table *table, const struct flowi6 *flp) — 4.19+.
twin!(
    "fib6_table_lookup",
    fib6_table_lookup,
    raw_fib6_table_lookup,
    fib6_table_lookup_body
);
#[inline(always)]
fn fib6_table_lookup_body<A: Args>(ctx: &A) -> i32 {
    let net: u64 = ctx.arg(0);
    if !net_in_scope::<A>(net) {
        return 0;
    }
    let res: u64 = ctx.arg(1);
    let table: u64 = ctx.arg(2);
    let flp: u64 = ctx.arg(3);
    let tb_id = read::<A, u32>(table, off!(fib6_table_id)).unwrap_or(0) as u64;
    let nh = read::<A, u64>(res, off!(fib6_res_nh)).unwrap_or(0);
    route_event::<A>(6, tb_id, 0, nh, flp + off!(flowi6_daddr), flp + off!(flowi6_saddr), 16);
    0
}

/// `sk` is a UDP socket (`sk_protocol` IPPROTO_UDP), or the kernel's BTF does not say (then
/// every socket counts). The socket queue and read hooks serve one purpose in user space:
/// matching a UDP application's reads to its datagrams (the tracker keeps a queue per socket
/// only for UDP packets). On other sockets (TCP above all: a queueing and a read per segment
/// under bulk transfer) their records would be decoded and thrown away.
#[inline(always)]
pub fn udp_socket<A: Args>(sk: u64) -> bool {
    const IPPROTO_UDP: u16 = 17;
    let off = off!(sock_protocol);
    if off == OFFSET_UNKNOWN as u64 {
        return true;
    }
    read::<A, u16>(sk, off).is_none_or(|p| p == IPPROTO_UDP)
}

// sk_data_ready(const struct sock *sk) — sock:sk_data_ready, 6.7+. Runs while the receive
// softirq processes the skb in RX_SKB (UDP/raw enqueue); the user side keeps it only
// for a packet still being received.
twin!("sk_data_ready", sk_data_ready, raw_sk_data_ready, sk_data_ready_body);
#[inline(always)]
pub fn sk_data_ready_body<A: Args>(ctx: &A) -> i32 {
    let skb = RX_SKB.get(0).copied().unwrap_or(0);
    let sk: u64 = ctx.arg(0);
    // The socket's protocol (one load) before the scope (a map lookup): under bulk TCP this
    // returns at the load.
    if skb == 0 || !udp_socket::<A>(sk) || (skb != last_run_skb() && !tracked(skb)) {
        return 0;
    }
    emit(Hook::SockQueue, skb, false, |e| e.arg0 = sk);
    0
}

// sock_recv_length(struct sock *sk, int ret, int flags) — sock:sock_recv_length, 6.4+.
twin!(
    "sock_recv_length",
    sock_recv_length,
    raw_sock_recv_length,
    sock_recv_length_body
);
#[inline(always)]
fn sock_recv_length_body<A: Args>(ctx: &A) -> i32 {
    let ret: u64 = ctx.arg(1);
    let sk: u64 = ctx.arg(0);
    if (ret as i32) < 0 || !udp_socket::<A>(sk) || !task_in_scope::<A>() {
        return 0;
    }
    emit(Hook::AppRecv, 0, false, |e| {
        e.arg0 = sk;
        e.arg1 = ret as i32 as u64;
    });
    0
}

// sys_enter(struct pt_regs *regs, long id) — raw_syscalls:sys_enter. Fires for every syscall on
// the machine, so the syscall number is checked first (a few compares) and the namespace only
// for the send family.
twin!("sys_enter", sys_enter, raw_sys_enter, sys_enter_body);
#[inline(always)]
fn sys_enter_body<A: Args>(ctx: &A) -> i32 {
    let id: u64 = ctx.arg(1);
    // SAFETY: a plain read of a read-only global the loader wrote before loading.
    let nrs = unsafe { core::ptr::read_volatile(&SEND_SYSCALLS) };
    if id != nrs[0] && id != nrs[1] && id != nrs[2] && id != nrs[3] {
        return 0;
    }
    if !task_in_scope::<A>() {
        return 0;
    }
    emit(Hook::AppSend, 0, false, |e| e.arg0 = id);
    0
}
