//! Maps and load-time globals shared by every program.
use aya_ebpf::{
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
};
use loopback_common::{DEFAULT_RING_BYTES, KernelOffsets, RunRecord, SCOPE_MAP_ENTRIES, SoftirqState, counter};

/// Every event goes through this one ring buffer: one buffer shared by all CPUs keeps the
/// events of one sk_buff in the order they happened, even when they come from different CPUs.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

/// sk_buffs known to belong to the traced namespace, keyed by address. Entry hooks insert,
/// the free hooks remove. LRU: frees that fire no tracepoint (some TCP paths) age out.
///
/// One LRU shared by all CPUs (the kernel still hands out free nodes from per-CPU batches), not
/// `BPF_F_NO_COMMON_LRU`: an skb is inserted on the sending CPU and removed wherever it is freed,
/// often another CPU, and per-CPU lists made that cost more (TCP on lo: tc egress 556 -> 500 ns,
/// 3.4 -> 3.2 us of BPF time per packet); they would also split the capacity by CPU count, so
/// one busy CPU could evict its own live entries long before the map is full.
#[map]
pub static SCOPE: LruHashMap<u64, u8> = LruHashMap::with_max_entries(SCOPE_MAP_ENTRIES, 0);

/// The skb being received on this CPU (written by `netif_receive_skb`; read by generic XDP and
/// `sk_data_ready`, which run inside that receive on the same CPU with bottom halves disabled).
#[map]
pub static RX_SKB: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// NET_RX softirq raise/entry times on this CPU.
#[map]
pub static SOFTIRQ: PerCpuArray<SoftirqState> = PerCpuArray::with_max_entries(1, 0);

/// The task (`pid_tgid`) whose name the last event reserved on this CPU carried.
#[map]
pub static LAST_TASK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Where a record longer than `RawEvent` (tc egress with `--snaplen`) is built.
#[map]
pub static SCRATCH: PerCpuArray<[u8; loopback_common::RAW_EVENT_SIZE + loopback_common::SNAP_EXTRA]> =
    PerCpuArray::with_max_entries(1, 0);

/// This CPU's open run: consecutive hooks of one skb staged here and sent as one record
/// (see `emit::open_run`).
#[repr(C)]
pub struct RunSlot {
    /// The skb of the open run; 0 when none is open.
    pub open: u64,
    /// The skb of the last run sent from this CPU (in scope and tracked: a packet received
    /// right after its own transmit needs no scope lookup).
    pub last: u64,
    /// The open run's packet bytes were captured by an earlier record: its hooks capture none.
    pub hdr_known: u64,
    /// The skb that `validate_xmit_skb` just split into GSO segments on this CPU (consumed
    /// inside its own transmit run): the segments that reach `net_dev_start_xmit` next are its
    /// pieces. Cleared when the next run opens.
    pub gso_parent: u64,
    pub rec: RunRecord,
}

#[map]
pub static RUN: PerCpuArray<RunSlot> = PerCpuArray::with_max_entries(1, 0);

/// Whether our tc ingress program is attached on the traced `lo` (written by the loader after
/// attaching it): only then may the receive hook open a run that tc ingress closes.
#[map]
pub static LO_INGRESS: Array<u32> = Array::with_max_entries(1, 0);

/// `BPF_F_MMAPABLE`: user space maps the array's values into its memory.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// The switch every program reads first: 0 (silent) until the loader has attached the whole
/// hook plan, 1 while tracing, 0 again when the loader stops (it then waits one RCU grace period,
/// after which no program run that could still emit is in flight, and drains the ring: the
/// kernel's counts and the reader's then agree exactly). Memory-mapped by the loader, so that
/// flipping it needs no system call (and no capability, which lotrace has dropped by then).
/// Packets caught part-way through when it flips are told apart in user space
/// (`in_flight_at_start`, `in_flight_at_end`).
#[map]
pub static ON: Array<u32> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Whether tracing is on (see [`ON`]).
#[inline(always)]
pub fn on() -> bool {
    // SAFETY: a volatile read of a live array slot (the loader writes it through its mapping).
    ON.get_ptr(0)
        .is_some_and(|p| unsafe { core::ptr::read_volatile(p) } != 0)
}

/// Packet bytes to capture per packet on lo beyond the fixed header capture (0: none).
/// Written at load time (`--snaplen`).
#[unsafe(no_mangle)]
pub static SNAP_EXTRA_BYTES: u32 = 0;

/// Loss counters, see `loopback_common::counter`.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Member offsets of kernel structs, from the running kernel's BTF (written at load time).
#[unsafe(no_mangle)]
pub static OFFSETS: KernelOffsets = KernelOffsets {
    skb_dev: 0,
    skb_len: 0,
    skb_data_len: 0,
    skb_head: 0,
    skb_data: 0,
    skb_network_header: 0,
    dev_nd_net: 0,
    dev_ifindex: 0,
    dev_name: 0,
    net_inum: 0,
    task_nsproxy: 0,
    nsproxy_net_ns: 0,
    flowi4_saddr: 0,
    flowi4_daddr: 0,
    flowi6_saddr: 0,
    flowi6_daddr: 0,
    nhc_dev: 0,
    fib6_res_nh: 0,
    fib6_table_id: 0,
    skb_protocol: 0,
    sock_protocol: loopback_common::OFFSET_UNKNOWN,
    dev_qdisc: loopback_common::OFFSET_UNKNOWN,
    qdisc_enqueue: loopback_common::OFFSET_UNKNOWN,
    skb_end: loopback_common::OFFSET_UNKNOWN,
    shinfo_dataref: loopback_common::OFFSET_UNKNOWN,
    sock_num: loopback_common::OFFSET_UNKNOWN,
};

/// How many arguments the running kernel's `consume_skb` and `kfree_skb` tracepoints have, from
/// its BTF (`btf_trace_<name>` prototypes; written at load time). `consume_skb` gained `location`
/// (2 arguments), `kfree_skb` its `reason` (3) and `rx_sk` (4) over the years; a program that
/// reads an argument the tracepoint lacks is refused at load (tp_btf) or attach (raw
/// tracepoint). The verifier sees these as constants and drops the branch that would read it.
#[unsafe(no_mangle)]
pub static CONSUME_SKB_ARGS: u32 = 2;
#[unsafe(no_mangle)]
pub static KFREE_SKB_ARGS: u32 = 3;

/// Whether the `lo` programs (tc, XDP) may ask for the current task
/// (`bpf_get_current_pid_tgid`, `bpf_get_current_comm`): not every kernel gives those helpers to
/// networking programs (Debian 12's 6.1 does not). The loader finds out by loading a
/// three-instruction program that calls it, and writes 0 or 1 here; the verifier then sees a
/// constant and drops the calls the kernel would refuse. Without them a run that a `lo`
/// program opens takes its task from the first tracepoint that joins it.
#[unsafe(no_mangle)]
pub static LO_TASK_HELPERS: u32 = 1;

/// Inode number of the traced network namespace (written at load time).
#[unsafe(no_mangle)]
pub static TARGET_NETNS: u32 = 0;

/// Send-family syscall numbers of the host architecture (written at load time).
#[unsafe(no_mangle)]
pub static SEND_SYSCALLS: [u64; loopback_common::SEND_SYSCALL_SLOTS] = [u64::MAX; loopback_common::SEND_SYSCALL_SLOTS];

/// A per-CPU counter's current value on this CPU.
#[inline(always)]
pub fn peek(idx: u32) -> u64 {
    COUNTERS.get(idx).copied().unwrap_or(0)
}

/// Adds one to a per-CPU counter; returns the new value (0 if the slot is missing).
#[inline(always)]
pub fn count(idx: u32) -> u64 {
    count_by(idx, 1)
}

/// Adds `by` to a per-CPU counter; returns the new value (0 if the slot is missing).
#[inline(always)]
pub fn count_by(idx: u32, by: u64) -> u64 {
    if let Some(p) = COUNTERS.get_ptr_mut(idx) {
        atomic_add(p, by);
        // The value read back may include a nested increment; callers use it only for pacing.
        // SAFETY: `p` is a live per-CPU map slot from get_ptr_mut.
        return unsafe { core::ptr::read_volatile(p) };
    }
    0
}

/// Adds `by` to a u64 in a map value. Per-CPU slots too: a program can be interrupted on its
/// CPU by another one (a softirq program nested in a task-context one), and an atomic add loses
/// no count. (core's AtomicU64 has no read-modify-write on this target, so the instruction is
/// written out: BPF_ATOMIC | BPF_ADD.)
#[inline(always)]
pub fn atomic_add(p: *mut u64, by: u64) {
    // SAFETY: callers pass a pointer into a live map value; the instruction adds to that u64 only.
    unsafe { core::arch::asm!("lock *(u64 *)({p} + 0) += {v}", p = in(reg) p, v = in(reg) by) };
}

/// Tests only (the loader writes 1 under `LOTRACE_FAULT=miss-split-free`): the free of an skb
/// split into GSO segments inside its own transmit run is ignored, as when the kernel skips
/// the `consume_skb` program for a recursion miss. 0 otherwise, and the verifier then drops
/// the test's branch.
#[unsafe(no_mangle)]
pub static MISS_SPLIT_FREE: u32 = 0;
