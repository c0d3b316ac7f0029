//! Event layout shared by the kernel programs (`loopback-ebpf`) and the loader (`loopback-user`).
//!
//! Everything here is `#[repr(C)]`, fixed size and free of enums: the kernel writes plain
//! integers, and user space converts them with `TryFrom` (never a transmute).
#![no_std]

/// Bytes of packet header carried by each event that captures packet bytes.
/// 96 bytes hold an Ethernet header, an IPv6 header and a TCP header with most options.
pub const HDR_CAP: usize = 96;

/// Most packet bytes a tc egress record may carry past `RawEvent` (`--snaplen`); a power of two.
pub const SNAP_EXTRA: usize = 2048;

/// Length of a kernel task name (`TASK_COMM_LEN`) and of an interface name (`IFNAMSIZ`).
pub const NAME_LEN: usize = 16;

/// The loopback device's interface index in every network namespace (`LOOPBACK_IFINDEX`).
pub const LOOPBACK_IFINDEX: u32 = 1;

/// NET_RX_SOFTIRQ vector number.
pub const NET_RX_SOFTIRQ: u32 = 3;

/// Default ring buffer size in bytes (power of two, multiple of the page size).
pub const DEFAULT_RING_BYTES: u32 = 16 << 20;

/// Capacity of the in-kernel map of sk_buffs currently in scope.
pub const SCOPE_MAP_ENTRIES: u32 = 65536;

/// A hook point along the loopback path. Stored as `u8` in [`RawEvent::hook`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    /// `fib:fib_table_lookup` / `fib6:fib6_table_lookup`: route decision (no skb yet).
    Route = 1,
    /// `net:net_dev_queue`: `__dev_queue_xmit`, the packet enters the device layer.
    DevQueue = 2,
    /// tc egress (tcx) program on the traced namespace's `lo`.
    TcEgress = 3,
    /// `net:net_dev_start_xmit`: `dev_hard_start_xmit` -> `loopback_xmit`.
    Xmit = 4,
    /// `net:netif_rx`: `netif_rx_internal`, enqueue to the per-CPU backlog.
    BacklogEnqueue = 5,
    /// `net:net_dev_xmit`: the driver returned (`rc` in `arg0`).
    XmitDone = 6,
    /// `net:netif_receive_skb`: `__netif_receive_skb_core`, inside the NET_RX softirq.
    Receive = 7,
    /// Generic-mode XDP program on the traced namespace's `lo`.
    Xdp = 8,
    /// tc ingress (tcx) program on the traced namespace's `lo`.
    TcIngress = 9,
    /// `skb:skb_copy_datagram_iovec`: the data is copied to the receiving application.
    CopyToUser = 10,
    /// `skb:kfree_skb`: freed with a drop reason (`arg0`), location in `arg1`.
    Free = 11,
    /// `skb:consume_skb`: freed normally.
    Consume = 12,
    /// `sock:sk_data_ready`: queued to a socket (in the softirq); `arg0` = socket address.
    SockQueue = 13,
    /// `sock:sock_recv_length`: the application's recvmsg returned; no skb, `arg0` = socket
    /// address, `arg1` = return value. Ends UDP packets, whose copy and free fire no tracepoint.
    AppRecv = 14,
    /// Emitted by the `netif_receive_skb` program: a traced skb is being received by a device of
    /// another namespace (it left through a veth); it is no longer followed. Device in `ifname`.
    LeftNetns = 15,
    /// `raw_syscalls:sys_enter` for a send-family syscall (sendto, sendmsg, sendmmsg) by a task
    /// of the traced namespace; `arg0` = syscall number. No skb: linked to that thread's next
    /// transmit.
    AppSend = 16,
    /// fentry/kprobe on `inet_sendmsg` / `inet6_sendmsg` (`sock_sendmsg`): the socket layer's
    /// send, by a task of the traced namespace; `arg0` = `struct socket` address. No skb: linked
    /// to that thread's next transmit.
    SockSend = 17,
}

/// [`Hook::Consume`] `arg0` when the skb was freed inside its own transmit run before reaching
/// the driver: `validate_xmit_skb` split it into GSO segments, whose runs follow on this CPU
/// (their head is [`Hook::Xmit`] with the split skb's address in `arg1`). 0 otherwise.
pub const CONSUME_GSO_SPLIT: u64 = 1;
/// Like [`CONSUME_GSO_SPLIT`], when the split skb's free never reached lotrace (the kernel
/// skipped the `consume_skb` program: it was already running on this CPU, a recursion miss)
/// and the split was recognised by its first segment's transmit instead. Staged then, with
/// that transmit's time.
pub const CONSUME_GSO_SPLIT_UNSEEN: u64 = 2;

impl Hook {
    pub const ALL: [Hook; 17] = [
        Hook::Route,
        Hook::DevQueue,
        Hook::TcEgress,
        Hook::Xmit,
        Hook::BacklogEnqueue,
        Hook::XmitDone,
        Hook::Receive,
        Hook::Xdp,
        Hook::TcIngress,
        Hook::CopyToUser,
        Hook::Free,
        Hook::Consume,
        Hook::SockQueue,
        Hook::AppRecv,
        Hook::LeftNetns,
        Hook::AppSend,
        Hook::SockSend,
    ];
}

/// Set in [`RawEvent::hook`] when `comm` was left empty because the previous event reserved on
/// the same CPU came from the same task (`pid_tgid`) and carried its name: the name costs a helper
/// call, and most hooks of one packet run in one task. User space keeps the last name per CPU.
pub const HOOK_COMM_CACHED: u8 = 0x80;

/// Set in [`RawEvent::hook`] of a *run record*: the record is a [`RunRecord`] whose head is the
/// first of several consecutive hooks of one skb on one CPU (the `lo` transmit chain, or the `lo`
/// receive chain), and whose tail lists the others. The kernel stages those hooks in per-CPU
/// memory and sends one record per chain instead of one per hook (a ring reservation costs more
/// than everything else a hook does).
pub const HOOK_RUN: u8 = 0x40;

/// Hook bits of [`RawEvent::hook`] that are flags, not the hook id.
pub const HOOK_FLAGS: u8 = HOOK_COMM_CACHED | HOOK_RUN;

/// Most hooks in the tail of a run record (a power of two).
pub const MAX_RUN: usize = 8;

/// One hook of a run after the first. Task, CPU and skb are the head's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RunStage {
    pub ts_ns: u64,
    pub arg0: u64,
    pub arg1: u64,
    pub len: u32,
    /// Device index (the head's `ifname` names it when the indexes match); 0: no device.
    pub ifindex: u32,
    /// [`Hook`] as `u8`.
    pub hook: u8,
    pub _pad: [u8; 7],
}

/// What follows the head of a run record.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RunTail {
    /// Valid entries in `stages` (1 ..= MAX_RUN).
    pub n: u8,
    /// Which hook of the run captured the head's `hdr`: 0 is the head, i is `stages[i - 1]`.
    pub hdr_stage: u8,
    pub _pad: [u8; 6],
    pub stages: [RunStage; MAX_RUN],
}

/// A run record: the head is an ordinary event (the run's first hook), the tail the others. Only
/// `RAW_EVENT_SIZE + RUN_TAIL_FIXED + n * RUN_STAGE_SIZE` bytes of it are sent.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RunRecord {
    pub head: RawEvent,
    pub tail: RunTail,
}

pub const RUN_STAGE_SIZE: usize = core::mem::size_of::<RunStage>();
pub const RUN_TAIL_FIXED: usize = 8;
pub const RUN_RECORD_SIZE: usize = core::mem::size_of::<RunRecord>();
const _: () = assert!(RUN_STAGE_SIZE == 40);
const _: () = assert!(RUN_RECORD_SIZE == RAW_EVENT_SIZE + RUN_TAIL_FIXED + MAX_RUN * RUN_STAGE_SIZE);

impl TryFrom<u8> for Hook {
    type Error = u8;
    /// One bounds check and one load: `ALL` holds the hooks in the order of their numbers,
    /// from 1 (checked at compile time below).
    #[inline]
    fn try_from(v: u8) -> Result<Self, u8> {
        match Hook::ALL.get((v as usize).wrapping_sub(1)) {
            Some(h) => Ok(*h),
            None => Err(v),
        }
    }
}

const _: () = {
    let mut i = 0;
    while i < Hook::ALL.len() {
        assert!(
            Hook::ALL[i] as usize == i + 1,
            "Hook::ALL is in the order of the hooks' numbers"
        );
        i += 1;
    }
};

/// Send-family syscall numbers of the host architecture, written into the programs at load time
/// (the eBPF target itself is architecture-neutral). Unused slots hold `u64::MAX`.
pub const SEND_SYSCALL_SLOTS: usize = 4;

/// What [`RawEvent::hdr`] holds.
pub mod hdr_kind {
    /// Nothing captured.
    pub const NONE: u8 = 0;
    /// Starts at the network (IP) header.
    pub const L3: u8 = 1;
    /// Starts at the Ethernet header (bytes seen by the `lo` programs).
    pub const ETH: u8 = 2;
    /// A route lookup: `[family, 0, 0, 0, dst(16), src(16)]`.
    pub const ROUTE: u8 = 3;
}

/// One hook hit. The header (`ts_ns` .. `hook`) comes first in every event.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RawEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// Kernel address of the `struct sk_buff` (0 when the hook has none).
    pub skb: u64,
    /// `bpf_get_current_pid_tgid()`: tgid in the upper half, tid in the lower.
    pub pid_tgid: u64,
    /// Hook specific (see [`Hook`]): drop reason, rc, route table, softirq entry time...
    pub arg0: u64,
    /// Hook specific: free location, route error, NET_RX raise time...
    pub arg1: u64,
    /// `current->comm`.
    pub comm: [u8; NAME_LEN],
    /// Device name at device hooks, route's next-hop device at [`Hook::Route`].
    pub ifname: [u8; NAME_LEN],
    /// CPU the hook ran on.
    pub cpu: u32,
    /// `skb->len` (or the packet length seen by the `lo` programs).
    pub len: u32,
    /// Device index at device hooks (0 elsewhere).
    pub ifindex: u32,
    /// [`Hook`] as `u8`.
    pub hook: u8,
    /// [`hdr_kind`].
    pub hdr_kind: u8,
    /// Number of valid bytes in `hdr`.
    pub hdr_len: u16,
    pub hdr: [u8; HDR_CAP],
}

pub const RAW_EVENT_SIZE: usize = core::mem::size_of::<RawEvent>();
const _: () = assert!(RAW_EVENT_SIZE == 184);
const _: () = assert!(RAW_EVENT_SIZE.is_multiple_of(8));

/// Kernel struct member offsets, read from the running kernel's BTF at load time and written
/// into the programs' read-only data. `u32::MAX` would mean "unknown"; the loader refuses to load
/// when one the programs need is missing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub skb_dev: u32,
    pub skb_len: u32,
    /// `struct sk_buff` -> `data_len`: the bytes in page fragments, past the linear data.
    pub skb_data_len: u32,
    pub skb_head: u32,
    pub skb_data: u32,
    pub skb_network_header: u32,
    pub dev_nd_net: u32,
    pub dev_ifindex: u32,
    pub dev_name: u32,
    /// `struct net` -> `ns.inum`.
    pub net_inum: u32,
    /// `struct task_struct` -> `nsproxy`.
    pub task_nsproxy: u32,
    /// `struct nsproxy` -> `net_ns`.
    pub nsproxy_net_ns: u32,
    /// `struct flowi4` -> `saddr` / `daddr`.
    pub flowi4_saddr: u32,
    pub flowi4_daddr: u32,
    /// `struct flowi6` -> `saddr` / `daddr`.
    pub flowi6_saddr: u32,
    pub flowi6_daddr: u32,
    /// `struct fib_nh_common` -> `nhc_dev`.
    pub nhc_dev: u32,
    /// `struct fib6_result` -> `nh` (a `struct fib6_nh *`, whose first member is a fib_nh_common).
    pub fib6_res_nh: u32,
    /// `struct fib6_table` -> `tb6_id`.
    pub fib6_table_id: u32,
    /// `struct sk_buff` -> `protocol` (`__be16`, the ethertype).
    pub skb_protocol: u32,
    /// `struct sock` -> `sk_protocol` (a `u16`), or [`OFFSET_UNKNOWN`] where the kernel's BTF has
    /// no such plain member (a bitfield on older kernels): then every socket counts as UDP.
    pub sock_protocol: u32,
    /// `struct net_device` -> `qdisc` (a `struct Qdisc *`) and `struct Qdisc` -> `enqueue`, or
    /// [`OFFSET_UNKNOWN`]: whether `lo` has a queueing discipline (noqueue has no `enqueue`).
    pub dev_qdisc: u32,
    pub qdisc_enqueue: u32,
    /// `struct sk_buff` -> `end` (on 64-bit kernels an offset from `head`: the shared info) and
    /// `struct skb_shared_info` -> `dataref`, or [`OFFSET_UNKNOWN`]: whether a clone of a
    /// dropped skb is still alive (a raw socket's copy of a ping reply), read by the agent.
    pub skb_end: u32,
    pub shinfo_dataref: u32,
    /// `struct sock_common` (at the start of every `struct sock`) -> `skc_num`, the local port in
    /// host order, or [`OFFSET_UNKNOWN`]: the agent's UDP delivery matches a socket's reads to
    /// the datagrams received for its port.
    pub sock_num: u32,
}

/// An offset the kernel's BTF does not give for an optional field.
pub const OFFSET_UNKNOWN: u32 = u32::MAX;

/// Index of each counter in the per-CPU `COUNTERS` array.
pub mod counter {
    /// Ring buffer reservations that failed: events lost.
    pub const RING_LOST: u32 = 0;
    /// Insertions into the scope map that failed.
    pub const SCOPE_FULL: u32 = 1;
    /// Kernel reads (`bpf_probe_read_kernel`) that failed; the event was still sent.
    pub const READ_FAILED: u32 = 2;
    /// Events reserved and submitted (the reader's count must reach this).
    pub const EMITTED: u32 = 3;
    /// Agent mode: samples of a namespace that found the per-namespace map full (`--max-netns`).
    pub const AGENT_NETNS_FULL: u32 = 4;
    /// Agent mode: drops whose (namespace, reason) series found the drop map full.
    pub const AGENT_DROPS_FULL: u32 = 5;
    /// Agent mode: lo packets seen at transmit whose in-flight entry could not be stored.
    pub const AGENT_FLIGHT_FULL: u32 = 6;
    pub const COUNT: u32 = 7;
}

/// Agent mode (`lotrace agent`): what the kernel counts per network namespace, so that no
/// per-packet record crosses to user space. Read by user space when Prometheus scrapes.
pub mod agent {
    /// Protocols packets and bytes are counted by (`PROTO_NAMES` order).
    pub const PROTOS: usize = 6;
    pub const PROTO_ICMP: usize = 0;
    pub const PROTO_ICMPV6: usize = 1;
    pub const PROTO_UDP: usize = 2;
    pub const PROTO_TCP: usize = 3;
    /// Another IP protocol (SCTP, IGMP, ...).
    pub const PROTO_OTHER_IP: usize = 4;
    /// Not IPv4 or IPv6 (ARP has no place on lo, but a packet socket may send anything).
    pub const PROTO_NON_IP: usize = 5;
    pub const PROTO_NAMES: [&str; PROTOS] = ["icmp", "icmpv6", "udp", "tcp", "other_ip", "non_ip"];

    /// Latency stages, each a log2 histogram (`STAGE_NAMES` order).
    pub const STAGES: usize = 3;
    /// `net_dev_start_xmit` -> `netif_rx`: `loopback_xmit` up to the backlog enqueue.
    pub const STAGE_XMIT: usize = 0;
    /// `netif_rx` -> `netif_receive_skb`: waiting in the per-CPU backlog for the NET_RX softirq.
    pub const STAGE_BACKLOG: usize = 1;
    /// `net_dev_start_xmit` -> `netif_receive_skb`: the whole lo crossing. (Not from
    /// `net_dev_queue`: on 6.18 about one TCP segment in ten on lo reached the driver without
    /// that tracepoint firing, and every crossing must be timed.)
    pub const STAGE_CROSSING: usize = 2;
    pub const STAGE_NAMES: [&str; STAGES] = ["xmit", "backlog", "crossing"];

    /// Delivery stages of a lo packet an application read (`DELIVERY_NAMES` order): from
    /// `netif_receive_skb` to its first `skb_copy_datagram_iovec` (the application's recvmsg
    /// copying it), and from lo's driver to that copy (end to end). TCP: a UDP datagram on a
    /// linear skb is copied by `copy_linear_skb`, which fires no tracepoint, and a raw socket
    /// reads a clone, not the packet itself; neither is in them.
    pub const DELIVERIES: usize = 2;
    pub const DELIVERY_TO_APP: usize = 0;
    pub const DELIVERY_END_TO_END: usize = 1;
    pub const DELIVERY_NAMES: [&str; DELIVERIES] = ["receive_to_app", "end_to_end"];

    /// Log2 buckets in nanoseconds: bucket `i` counts latencies below `2^(i+1)` ns and at
    /// least `2^i` ns (bucket 0 also holds 0 and 1 ns); the last bucket holds everything from
    /// `2^(BUCKETS-1)` ns (about 1.07 s) up.
    pub const BUCKETS: usize = 31;

    /// Which context ran the NET_RX softirq that received a lo packet (`CONTEXT_NAMES` order).
    pub const CONTEXTS: usize = 3;
    /// The sending task itself, when it re-enabled bottom halves after its transmit.
    pub const CTX_INLINE: usize = 0;
    /// The CPU's `ksoftirqd` thread (the softirq was deferred).
    pub const CTX_KSOFTIRQD: usize = 1;
    /// Any other task (an interrupt exit on whatever ran, another task's bottom-half enable).
    pub const CTX_OTHER: usize = 2;
    pub const CONTEXT_NAMES: [&str; CONTEXTS] = ["inline", "ksoftirqd", "other"];

    /// One namespace's counters on one CPU (a per-CPU hash map value keyed by netns inode).
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct NetnsCounters {
        /// lo packets received from the backlog (what lo's tx and rx counters count), by protocol.
        pub packets: [u64; PROTOS],
        /// Their bytes (`skb->len` without the Ethernet header, as lo's counters count it).
        pub bytes: [u64; PROTOS],
        /// `netif_rx` enqueues onto the per-CPU backlog.
        pub backlog_enqueues: u64,
        /// Received lo packets by the context that ran the softirq.
        pub softirq: [u64; CONTEXTS],
        /// Packets that should have stayed on lo but a device other than lo transmitted (what
        /// `lotrace prove` would call DISPROVEN), by destination (`ESCAPE_NAMES`): a loopback
        /// address (127.0.0.0/8, ::1), or an address of the namespace's own interfaces.
        pub escaped: [u64; ESCAPES],
        /// Received lo packets whose stage times were not all known (in flight when the agent
        /// started, or their in-flight entry was evicted): counted, not timed.
        pub untimed: u64,
        /// Per stage: log2 buckets and the sum of the latencies in nanoseconds.
        pub hist: [[u64; BUCKETS]; STAGES],
        pub hist_sum_ns: [u64; STAGES],
        /// Per delivery stage (`DELIVERY_NAMES`), for the lo packets an application read (their
        /// first copy to user space): log2 buckets and the sum in nanoseconds.
        pub delivery: [[u64; BUCKETS]; DELIVERIES],
        pub delivery_sum_ns: [u64; DELIVERIES],
    }

    impl NetnsCounters {
        pub const ZERO: Self = Self {
            packets: [0; PROTOS],
            bytes: [0; PROTOS],
            backlog_enqueues: 0,
            softirq: [0; CONTEXTS],
            escaped: [0; ESCAPES],
            untimed: 0,
            hist: [[0; BUCKETS]; STAGES],
            hist_sum_ns: [0; STAGES],
            delivery: [[0; BUCKETS]; DELIVERIES],
            delivery_sum_ns: [0; DELIVERIES],
        };

        /// Adds another CPU's counters.
        pub fn add(&mut self, o: &Self) {
            for i in 0..PROTOS {
                self.packets[i] += o.packets[i];
                self.bytes[i] += o.bytes[i];
            }
            self.backlog_enqueues += o.backlog_enqueues;
            for i in 0..CONTEXTS {
                self.softirq[i] += o.softirq[i];
            }
            self.untimed += o.untimed;
            for (a, b) in self.escaped.iter_mut().zip(o.escaped) {
                *a += b;
            }
            for s in 0..STAGES {
                for b in 0..BUCKETS {
                    self.hist[s][b] += o.hist[s][b];
                }
                self.hist_sum_ns[s] += o.hist_sum_ns[s];
            }
            for d in 0..DELIVERIES {
                for b in 0..BUCKETS {
                    self.delivery[d][b] += o.delivery[d][b];
                }
                self.delivery_sum_ns[d] += o.delivery_sum_ns[d];
            }
        }
    }

    /// The log2 bucket of a latency in nanoseconds.
    #[inline(always)]
    pub fn bucket(ns: u64) -> usize {
        let b = if ns < 2 { 0 } else { 63 - ns.leading_zeros() as usize };
        if b >= BUCKETS { BUCKETS - 1 } else { b }
    }

    /// Destinations of escaped packets (`NetnsCounters::escaped`, `ESCAPE_NAMES` order).
    pub const ESCAPES: usize = 2;
    pub const ESCAPED_LOOPBACK: usize = 0;
    pub const ESCAPED_LOCAL: usize = 1;
    pub const ESCAPE_NAMES: [&str; ESCAPES] = ["loopback", "local_address"];

    /// An address of a namespace's own interfaces (not a loopback one), which user space keeps
    /// in `AGENT_LOCAL`: a packet to it that another device transmits escaped.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub struct LocalAddr {
        pub netns: u32,
        /// 4 or 6.
        pub family: u32,
        /// IPv4 in the first 4 bytes (the rest 0), IPv6 in all 16, in network order.
        pub addr: [u8; 16],
    }

    /// Datagrams received for one UDP port of one namespace, oldest first, until a socket of that
    /// port reads them (`sock:sock_recv_length`): a ring of `UDPQ_SLOTS`; `tail - head` are
    /// waiting (older ones are overwritten, and then not timed).
    pub const UDPQ_SLOTS: usize = 16;
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct UdpQKey {
        pub netns: u32,
        pub port: u32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct UdpQ {
        pub head: u32,
        pub tail: u32,
        pub skb: [u64; UDPQ_SLOTS],
        pub received_ns: [u64; UDPQ_SLOTS],
    }
    /// Most UDP ports with datagrams waiting to be timed, over all namespaces (an LRU map).
    pub const MAX_UDP_PORTS: u32 = 4096;

    /// Key of the drop counters: a namespace and a kernel drop reason (`enum skb_drop_reason`).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct DropKey {
        pub netns: u32,
        pub reason: u32,
    }

    /// A lo packet between its transmit and its free (LRU hash keyed by skb address).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct InFlight {
        pub xmit_ns: u64,
        pub enqueued_ns: u64,
        /// The task that sent it (to tell an inline softirq from another context).
        pub pid_tgid: u64,
        /// When the receive half took it from the backlog (0: not yet).
        pub received_ns: u64,
        pub netns: u32,
        /// 1 once its delivery was counted (a TCP segment read in pieces is delivered once).
        pub copied: u16,
        /// Its `PROTO_*` index, from its receive on.
        pub proto: u16,
    }

    /// `DropKey::reason` of an original freed while its clone lives on: the copy was delivered
    /// (a raw socket's copy of a ping reply), not a drop.
    pub const COPY_DELIVERED: u32 = u32::MAX;

    /// Default bounds (flags of `lotrace agent`).
    pub const DEFAULT_MAX_NETNS: u32 = 256;
    pub const DEFAULT_MAX_DROP_SERIES: u32 = 4096;
    pub const DEFAULT_MAX_IN_FLIGHT: u32 = 65536;
    pub const DEFAULT_MAX_LOCAL_ADDRS: u32 = 4096;
}

/// Per-CPU NET_RX softirq state kept by the softirq hooks and folded into receive events.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SoftirqState {
    pub raise_ts: u64,
    pub entry_ts: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain old data, every bit pattern is valid, no padding holes that matter.
    unsafe impl aya::Pod for super::RawEvent {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::SoftirqState {}
    unsafe impl aya::Pod for super::RunRecord {}
    unsafe impl aya::Pod for super::agent::NetnsCounters {}
    unsafe impl aya::Pod for super::agent::DropKey {}
    unsafe impl aya::Pod for super::agent::InFlight {}
    unsafe impl aya::Pod for super::agent::LocalAddr {}
    unsafe impl aya::Pod for super::agent::UdpQKey {}
    unsafe impl aya::Pod for super::agent::UdpQ {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_counters_are_the_size_the_docs_give() {
        // docs/agent.md and `lotrace agent --help` give the kernel's preallocation per namespace.
        assert_eq!(core::mem::size_of::<agent::NetnsCounters>(), 1432);
        assert_eq!(agent::bucket(0), 0);
        assert_eq!(agent::bucket(1023), 9);
        assert_eq!(agent::bucket(1024), 10);
        assert_eq!(agent::bucket(u64::MAX), agent::BUCKETS - 1);
    }

    #[test]
    fn hook_round_trips_and_rejects_unknown() {
        for h in Hook::ALL {
            assert_eq!(Hook::try_from(h as u8), Ok(h));
        }
        // Every other byte is refused.
        for v in 0..=u8::MAX {
            if !Hook::ALL.iter().any(|h| *h as u8 == v) {
                assert_eq!(Hook::try_from(v), Err(v));
            }
        }
        for h in Hook::ALL {
            assert_eq!(h as u8 & HOOK_FLAGS, 0, "{h:?} collides with a flag bit");
        }
    }
}
