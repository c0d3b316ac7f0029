//! Agent mode (`lotrace agent`): the lo path of every network namespace, counted in the kernel.
//!
//! No record crosses the ring buffer: these programs add to per-CPU counters and log2 latency
//! histograms keyed by the namespace inode of the packet's `lo`, which user space reads when it
//! is scraped. They are global (tracepoints), so one set serves every namespace; nothing is
//! attached per namespace. A packet is one `lo` crossing, as lo's own counters count it: it is
//! counted when the receive half takes it from the backlog (`netif_receive_skb` on a `lo`), with
//! the stage times its transmit left in `AGENT_FLIGHT`.
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{btf_tracepoint, map, raw_tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuHashMap},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use loopback_common::{
    LOOPBACK_IFINDEX,
    agent::{self, DropKey, InFlight, LocalAddr, NetnsCounters, UDPQ_SLOTS, UdpQ, UdpQKey},
    counter,
};

use crate::{
    emit::{network_header, skb_data, skb_len},
    kernel::{Mem, dev_netns, off, probe, read, skb_dev, task_netns},
    maps::{KFREE_SKB_ARGS, atomic_add as add, count},
    tracepoints::{Args, ETH_P_IP_BE, ETH_P_IPV6_BE, twin, udp_socket},
};

/// Per namespace (inode), per CPU: what [`NetnsCounters`] says. Sized by `--max-netns`.
#[map]
pub static AGENT_NETNS: PerCpuHashMap<u32, NetnsCounters> =
    PerCpuHashMap::with_max_entries(agent::DEFAULT_MAX_NETNS, 0);

/// Drops of lo packets by namespace and kernel drop reason. Sized by `--max-drop-series`.
#[map]
pub static AGENT_DROPS: PerCpuHashMap<DropKey, u64> =
    PerCpuHashMap::with_max_entries(agent::DEFAULT_MAX_DROP_SERIES, 0);

/// lo packets between `net_dev_queue` and their free, by skb address. LRU: the frees that fire
/// no tracepoint (some TCP paths) age out instead of filling it. Sized by `--max-in-flight`.
#[map]
pub static AGENT_FLIGHT: LruHashMap<u64, InFlight> = LruHashMap::with_max_entries(agent::DEFAULT_MAX_IN_FLIGHT, 0);

/// The addresses of each namespace's own interfaces (loopback ones aside), kept by user space.
/// Sized by `--max-local-addrs`.
#[map]
pub static AGENT_LOCAL: HashMap<LocalAddr, u8> = HashMap::with_max_entries(agent::DEFAULT_MAX_LOCAL_ADDRS, 0);

/// UDP datagrams received per (namespace, port), waiting for a socket of the port to read them.
#[map]
pub static AGENT_UDPQ: LruHashMap<UdpQKey, UdpQ> = LruHashMap::with_max_entries(agent::MAX_UDP_PORTS, 0);

/// The empty queue a port's first datagram inserts (too large for the stack).
#[map]
pub static AGENT_UDPQ_ZERO: Array<UdpQ> = Array::with_max_entries(1, 0);

/// The zero value a namespace's first sample inserts (a map value: too large for the stack).
#[map]
pub static AGENT_ZERO: Array<NetnsCounters> = Array::with_max_entries(1, 0);

/// With `--netns`: the namespaces to count (user space keeps it up to date); see `AGENT_FILTER`.
#[map]
pub static AGENT_ALLOW: HashMap<u32, u8> = HashMap::with_max_entries(agent::DEFAULT_MAX_NETNS, 0);

/// `SKB_DROP_REASON_NO_SOCKET`'s value in this kernel's BTF (0: unknown; written at load time).
#[unsafe(no_mangle)]
pub static AGENT_NO_SOCKET: u32 = 0;

/// 1 when `--netns` limits the agent to `AGENT_ALLOW` (written at load time).
#[unsafe(no_mangle)]
pub static AGENT_FILTER: u32 = 0;

const BPF_NOEXIST: u64 = 1;

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: a helper call without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// The namespace inode of a `lo`, or None when `dev` is not a loopback device.
#[inline(always)]
fn lo_netns<M: Mem>(dev: u64) -> Option<u32> {
    if read::<M, u32>(dev, off!(dev_ifindex))? != LOOPBACK_IFINDEX {
        return None;
    }
    dev_netns::<M>(dev)
}

/// Whether this namespace is counted (every one, unless `--netns` limits it).
#[inline(always)]
fn wanted(netns: u32) -> bool {
    // SAFETY: a plain read of a read-only global the loader wrote before loading.
    if unsafe { core::ptr::read_volatile(&AGENT_FILTER) } == 0 {
        return true;
    }
    AGENT_ALLOW.get_ptr(netns).is_some()
}

/// This CPU's counters of `netns`, inserted on its first sample; None (counted) when the map
/// holds `--max-netns` namespaces already.
#[inline(always)]
fn counters(netns: u32) -> Option<*mut NetnsCounters> {
    if let Some(p) = AGENT_NETNS.get_ptr_mut(netns) {
        return Some(p);
    }
    let zero = AGENT_ZERO.get(0)?;
    // Another CPU may insert the same namespace meanwhile (EEXIST): the lookup below finds it.
    let _ = AGENT_NETNS.insert(netns, zero, BPF_NOEXIST);
    let p = AGENT_NETNS.get_ptr_mut(netns);
    if p.is_none() {
        count(counter::AGENT_NETNS_FULL);
    }
    p
}

/// The flight of `skb`, if its transmit was seen.
#[inline(always)]
fn flight(skb: u64) -> Option<*mut InFlight> {
    AGENT_FLIGHT.get_ptr_mut(skb)
}

/// The flight of `skb` and a copy of it (the entry may be changed or removed meanwhile).
#[inline(always)]
fn flight_copy(skb: u64) -> Option<(*mut InFlight, InFlight)> {
    let p = flight(skb)?;
    // SAFETY: a live LRU value, copied out.
    Some((p, unsafe { *p }))
}

// net_dev_start_xmit(const struct sk_buff *skb, const struct net_device *dev): lo's driver gets
// the packet; its flight starts.
twin!(
    "net_dev_start_xmit",
    agent_net_dev_start_xmit,
    agent_raw_net_dev_start_xmit,
    start_xmit_body
);
#[inline(always)]
fn start_xmit_body<A: Args>(ctx: &A) -> i32 {
    let skb: u64 = ctx.arg(0);
    let dev: u64 = ctx.arg(1);
    let Some(netns) = lo_netns::<A>(dev) else {
        escaped::<A>(skb, dev);
        return 0;
    };
    if !wanted(netns) {
        return 0;
    }
    let f = InFlight {
        xmit_ns: now_ns(),
        pid_tgid: bpf_get_current_pid_tgid(),
        netns,
        ..InFlight::default()
    };
    if AGENT_FLIGHT.insert(skb, f, 0).is_err() {
        count(counter::AGENT_FLIGHT_FULL);
    }
    0
}

/// A packet to a loopback address, or to an address of its namespace's own interfaces, that a
/// device other than lo is transmitting is counted in the device's namespace (`escaped`). Every
/// IP transmit on the machine passes here: its destination is read, and looked up in
/// `AGENT_LOCAL` when it is not a loopback one.
#[inline(always)]
fn escaped<A: Args>(skb: u64, dev: u64) {
    let l3 = read::<A, u16>(skb, off!(skb_protocol)).unwrap_or(0);
    let nh = network_header::<A>(skb);
    let mut key = LocalAddr {
        netns: 0,
        family: 0,
        addr: [0; 16],
    };
    let loopback = match l3 {
        // IPv4 destination at 16: 127.0.0.0/8.
        ETH_P_IP_BE => {
            let Some(d) = probe::<[u8; 4]>(nh, 16) else { return };
            key.family = 4;
            key.addr[..4].copy_from_slice(&d);
            d[0] == 127
        }
        // IPv6 destination at 24: ::1.
        ETH_P_IPV6_BE => {
            let Some(d) = probe::<[u8; 16]>(nh, 24) else { return };
            key.family = 6;
            key.addr = d;
            u128::from_be_bytes(d) == 1
        }
        _ => return,
    };
    let Some(netns) = dev_netns::<A>(dev).filter(|n| wanted(*n)) else {
        return;
    };
    let to = if loopback {
        agent::ESCAPED_LOOPBACK
    } else {
        key.netns = netns;
        // SAFETY: a lookup of a plain key; the value is not read.
        if unsafe { AGENT_LOCAL.get(key) }.is_none() {
            return;
        }
        agent::ESCAPED_LOCAL
    };
    if let Some(c) = counters(netns) {
        // SAFETY: an in-bounds field of a live per-CPU map value.
        add(unsafe { &raw mut (*c).escaped[to] }, 1);
    }
}

// netif_rx(struct sk_buff *skb): `loopback_xmit` enqueues it onto this CPU's backlog.
twin!("netif_rx", agent_netif_rx, agent_raw_netif_rx, netif_rx_body);
#[inline(always)]
fn netif_rx_body<A: Args>(ctx: &A) -> i32 {
    let skb: u64 = ctx.arg(0);
    let Some(netns) = lo_netns::<A>(skb_dev::<A>(skb)) else {
        return 0;
    };
    if !wanted(netns) {
        return 0;
    }
    if let Some(f) = flight(skb) {
        // SAFETY: as in `start_xmit_body`.
        unsafe { (*f).enqueued_ns = now_ns() };
    }
    if let Some(c) = counters(netns) {
        // SAFETY: a live per-CPU map value; the field is a u64 inside it.
        add(unsafe { &raw mut (*c).backlog_enqueues }, 1);
    }
    0
}

/// The protocol slot of a received lo packet, its IP header (`skb->data` by now) and whether
/// that is IPv6.
#[inline(always)]
fn proto_of<A: Args>(skb: u64) -> (usize, u64, bool) {
    let l3 = read::<A, u16>(skb, off!(skb_protocol)).unwrap_or(0);
    let data = skb_data::<A>(skb);
    let (at, v6) = match l3 {
        ETH_P_IP_BE => (9, false),
        ETH_P_IPV6_BE => (6, true),
        _ => return (agent::PROTO_NON_IP, data, false),
    };
    // Packet bytes are not BTF-typed memory: always a probe read.
    let proto = match probe::<u8>(data, at) {
        Some(1) if !v6 => agent::PROTO_ICMP,
        Some(58) if v6 => agent::PROTO_ICMPV6,
        Some(17) => agent::PROTO_UDP,
        Some(6) => agent::PROTO_TCP,
        _ => agent::PROTO_OTHER_IP,
    };
    (proto, data, v6)
}

/// Whether the current task is a `ksoftirqd/N` thread.
#[inline(always)]
fn in_ksoftirqd() -> bool {
    match bpf_get_current_comm() {
        Ok(c) => c[..10] == *b"ksoftirqd/",
        Err(_) => false,
    }
}

/// Adds one latency to a log2 histogram and its sum (fields of a live per-CPU map value, which a
/// nested program may be adding to as well: raw pointers, atomic adds).
#[inline(always)]
fn observe(hist: *mut [u64; agent::BUCKETS], sum: *mut u64, ns: u64) {
    let b = agent::bucket(ns);
    if b < agent::BUCKETS {
        // SAFETY: in-bounds element of the histogram the caller points at.
        add(unsafe { &raw mut (*hist)[b] }, 1);
        add(sum, ns);
    }
}

// netif_receive_skb(struct sk_buff *skb): in the NET_RX softirq, the receive half takes the packet
// from the backlog. One lo crossing: counted here, with its stage times.
twin!(
    "netif_receive_skb",
    agent_netif_receive_skb,
    agent_raw_netif_receive_skb,
    receive_body
);
#[inline(always)]
fn receive_body<A: Args>(ctx: &A) -> i32 {
    let skb: u64 = ctx.arg(0);
    let Some(netns) = lo_netns::<A>(skb_dev::<A>(skb)) else {
        return 0;
    };
    if !wanted(netns) {
        return 0;
    }
    let Some(c) = counters(netns) else {
        return 0;
    };
    let now = now_ns();
    let (proto, ip, v6) = proto_of::<A>(skb);
    let len = skb_len::<A>(skb) as u64;
    if proto < agent::PROTOS {
        // SAFETY: in-bounds fields of a live per-CPU map value.
        unsafe {
            add(&raw mut (*c).packets[proto], 1);
            add(&raw mut (*c).bytes[proto], len);
        }
    }
    let slot = flight_copy(skb);
    let f = slot.map(|(_, f)| f);
    if let Some((p, _)) = slot {
        // SAFETY: a live LRU value; only this packet's own hooks write it, one after another.
        unsafe {
            (*p).received_ns = now;
            (*p).proto = proto as u16;
        }
        if proto == agent::PROTO_UDP {
            udp_received(skb, ip, v6, netns, now);
        }
    }
    let ctx_slot = if in_ksoftirqd() {
        agent::CTX_KSOFTIRQD
    } else if f.is_some_and(|f| f.pid_tgid == bpf_get_current_pid_tgid()) {
        agent::CTX_INLINE
    } else {
        agent::CTX_OTHER
    };
    // SAFETY: in-bounds field of a live per-CPU map value.
    add(unsafe { &raw mut (*c).softirq[ctx_slot] }, 1);
    match f {
        Some(f) if f.xmit_ns != 0 && f.enqueued_ns >= f.xmit_ns && now >= f.enqueued_ns => {
            for (stage, ns) in [
                (agent::STAGE_XMIT, f.enqueued_ns - f.xmit_ns),
                (agent::STAGE_BACKLOG, now - f.enqueued_ns),
                (agent::STAGE_CROSSING, now - f.xmit_ns),
            ] {
                // SAFETY: fields of a live per-CPU map value (constant, in-bounds stages).
                unsafe { observe(&raw mut (*c).hist[stage], &raw mut (*c).hist_sum_ns[stage], ns) };
            }
        }
        // SAFETY: in-bounds field of a live per-CPU map value.
        _ => add(unsafe { &raw mut (*c).untimed }, 1),
    }
    0
}

/// Queues a received UDP datagram (its IP header at `ip`) under its namespace and destination
/// port, for the read that will deliver it (`sock_recv_length`). IPv6: a fixed 40-byte header
/// (extension headers are not followed; lo packets carry none).
#[inline(always)]
fn udp_received(skb: u64, ip: u64, v6: bool, netns: u32, now: u64) {
    let l4 = if v6 {
        40
    } else {
        match probe::<u8>(ip, 0) {
            Some(b) => (b & 0xf) as u64 * 4,
            None => return,
        }
    };
    let Some(dport) = probe::<u16>(ip + l4, 2) else { return };
    let key = UdpQKey {
        netns,
        port: u16::from_be(dport) as u32,
    };
    let q = match AGENT_UDPQ.get_ptr_mut(key) {
        Some(q) => q,
        None => {
            let Some(zero) = AGENT_UDPQ_ZERO.get(0) else { return };
            let _ = AGENT_UDPQ.insert(key, zero, BPF_NOEXIST);
            match AGENT_UDPQ.get_ptr_mut(key) {
                Some(q) => q,
                None => return,
            }
        }
    };
    // SAFETY: a live LRU value. Two CPUs receiving for one port at once may race on `tail`:
    // then one datagram is not timed (its slot holds the other's), never mis-timed.
    unsafe {
        let t = (*q).tail;
        let i = t as usize & (UDPQ_SLOTS - 1);
        (*q).skb[i] = skb;
        (*q).received_ns[i] = now;
        (*q).tail = t.wrapping_add(1);
        if t.wrapping_add(1).wrapping_sub((*q).head) > UDPQ_SLOTS as u32 {
            (*q).head = t.wrapping_add(1).wrapping_sub(UDPQ_SLOTS as u32);
        }
    }
}

// sock_recv_length(struct sock *sk, int ret, int flags): a socket's recvmsg returned. For a UDP
// socket that read a datagram (not a peek, not an error), the oldest datagram waiting for its
// port is the one read: delivered now. Entries whose datagram was dropped meanwhile (its
// flight ended in kfree_skb) are passed over.
twin!(
    "sock_recv_length",
    agent_sock_recv_length,
    agent_raw_sock_recv_length,
    recv_length_body
);
#[inline(always)]
fn recv_length_body<A: Args>(ctx: &A) -> i32 {
    const MSG_PEEK: u64 = 2;
    let sk: u64 = ctx.arg(0);
    let ret: u64 = ctx.arg(1);
    let flags: u64 = ctx.arg(2);
    if (ret as i32) < 0 || flags & MSG_PEEK != 0 || off!(sock_num) == loopback_common::OFFSET_UNKNOWN as u64 {
        return 0;
    }
    if !udp_socket::<A>(sk) {
        return 0;
    }
    let (Some(port), Some(netns)) = (read::<A, u16>(sk, off!(sock_num)), task_netns::<A>()) else {
        return 0;
    };
    let Some(q) = AGENT_UDPQ.get_ptr_mut(UdpQKey { netns, port: port as u32 }) else {
        return 0;
    };
    for _ in 0..4 {
        // SAFETY: a live LRU value (see `udp_received`).
        let (h, t) = unsafe { ((*q).head, (*q).tail) };
        if h == t {
            break;
        }
        let i = h as usize & (UDPQ_SLOTS - 1);
        // SAFETY: as above; `i` is within the ring.
        let (skb, received) = unsafe {
            (*q).head = h.wrapping_add(1);
            ((*q).skb[i], (*q).received_ns[i])
        };
        let Some((_, f)) = flight_copy(skb) else { continue };
        if f.received_ns != received {
            continue;
        }
        let _ = AGENT_FLIGHT.remove(skb);
        if f.copied == 0 && f.xmit_ns != 0 {
            delivered(&f);
        }
        break;
    }
    0
}

// skb_copy_datagram_iovec(const struct sk_buff *skb, int len): an application's recvmsg copies
// the packet's data: delivered. Timed once per packet (a TCP segment may be read in pieces).
twin!(
    "skb_copy_datagram_iovec",
    agent_skb_copy_datagram_iovec,
    agent_raw_skb_copy_datagram_iovec,
    copy_body
);
#[inline(always)]
fn copy_body<A: Args>(ctx: &A) -> i32 {
    let skb: u64 = ctx.arg(0);
    let Some((p, f)) = flight_copy(skb) else {
        return 0;
    };
    if f.copied != 0 || f.received_ns == 0 || f.xmit_ns == 0 {
        return 0;
    }
    // SAFETY: as above; marks it delivered.
    unsafe { (*p).copied = 1 };
    delivered(&f);
    0
}

/// Times the delivery of a received packet to the application, now.
#[inline(always)]
fn delivered(f: &InFlight) {
    let now = now_ns();
    if now < f.received_ns || f.received_ns < f.xmit_ns {
        return;
    }
    if let Some(c) = counters(f.netns) {
        for (d, ns) in [
            (agent::DELIVERY_TO_APP, now - f.received_ns),
            (agent::DELIVERY_END_TO_END, now - f.xmit_ns),
        ] {
            // SAFETY: fields of a live per-CPU map value (constant, in-bounds stages).
            unsafe { observe(&raw mut (*c).delivery[d], &raw mut (*c).delivery_sum_ns[d], ns) };
        }
    }
}

// kfree_skb(skb, location, reason[, rx_sk]): a lo packet dropped, with the kernel's reason.
twin!("kfree_skb", agent_kfree_skb, agent_raw_kfree_skb, kfree_body);
#[inline(always)]
fn kfree_body<A: Args>(ctx: &A) -> i32 {
    let skb: u64 = ctx.arg(0);
    let Some(f) = flight(skb) else {
        return 0;
    };
    // SAFETY: a live LRU value.
    let netns = unsafe { (*f).netns };
    let _ = AGENT_FLIGHT.remove(skb);
    // An entry whose free fired no tracepoint (some TCP paths) outlives its skb; an skb at the
    // same address that now sits on another device is not ours. (UDP reuses `skb->dev` as
    // scratch once queued to a socket: a read that finds no device, ifindex 0, is not a sign.)
    let dev = skb_dev::<A>(skb);
    if let Some(ifindex) = read::<A, u32>(dev, off!(dev_ifindex))
        && ifindex != 0
        && ifindex != LOOPBACK_IFINDEX
    {
        return 0;
    }
    // SAFETY: a plain read of a read-only global the loader wrote before loading.
    let reason: u64 = if unsafe { core::ptr::read_volatile(&KFREE_SKB_ARGS) } >= 3 {
        ctx.arg(2)
    } else {
        0
    };
    // The kernel frees the original of a packet a raw socket took a copy of (a ping reply to a
    // raw-socket ping) as NO_SOCKET: its copy was delivered. Counted as such, not as a drop.
    let reason = if clone_alive::<A>(skb) {
        COPY_DELIVERED
    } else {
        reason as u32
    };
    let key = DropKey { netns, reason };
    if let Some(p) = AGENT_DROPS.get_ptr_mut(key) {
        add(p, 1);
        return 0;
    }
    let _ = AGENT_DROPS.insert(key, 0u64, BPF_NOEXIST);
    match AGENT_DROPS.get_ptr_mut(key) {
        Some(p) => add(p, 1),
        None => {
            count(counter::AGENT_DROPS_FULL);
        }
    }
    0
}

/// The `reason` of [`DropKey`] for an original freed while a clone of it lives on (not a
/// kernel drop reason: those are small numbers).
pub const COPY_DELIVERED: u32 = agent::COPY_DELIVERED;

/// Whether another skb still shares this one's data (`skb_shared_info.dataref` above 1).
#[inline(always)]
fn clone_alive<A: Args>(skb: u64) -> bool {
    let (end_off, dataref_off) = (off!(skb_end), off!(shinfo_dataref));
    if end_off == loopback_common::OFFSET_UNKNOWN as u64 || dataref_off == loopback_common::OFFSET_UNKNOWN as u64 {
        return false;
    }
    let head = read::<A, u64>(skb, off!(skb_head)).unwrap_or(0);
    let end = read::<A, u32>(skb, end_off).unwrap_or(0) as u64;
    if head == 0 || end == 0 {
        return false;
    }
    // `dataref` counts the skbs sharing the data in its low 16 bits (the high ones: payload-only refs).
    probe::<u32>(head + end, dataref_off).is_some_and(|d| d & 0xffff > 1)
}

// consume_skb(skb[, location]): freed normally; its flight ends. Where the kernel frees a read
// UDP datagram with this tracepoint (`__consume_stateless_skb` on 6.12; 6.18 frees it without
// one), that is its delivery: timed here and marked, and its flight is left for the read
// (`sock_recv_length`) to end, so the port's queue stays in step.
twin!("consume_skb", agent_consume_skb, agent_raw_consume_skb, consume_body);
#[inline(always)]
fn consume_body<A: Args>(ctx: &A) -> i32 {
    let skb: u64 = ctx.arg(0);
    let Some((p, f)) = flight_copy(skb) else { return 0 };
    if f.proto as usize == agent::PROTO_UDP && f.received_ns != 0 && f.copied == 0 {
        // SAFETY: as above.
        unsafe { (*p).copied = 1 };
        delivered(&f);
        return 0;
    }
    let _ = AGENT_FLIGHT.remove(skb);
    0
}
