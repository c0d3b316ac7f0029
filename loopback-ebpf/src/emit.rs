//! The single reserve / fill / submit path of every event.
use aya_ebpf::helpers::generated::bpf_ringbuf_output;
use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
    generated::bpf_probe_read_kernel as probe_read_raw,
};
use loopback_common::{
    CONSUME_GSO_SPLIT, CONSUME_GSO_SPLIT_UNSEEN, HDR_CAP, HOOK_COMM_CACHED, HOOK_RUN, Hook, LOOPBACK_IFINDEX, MAX_RUN,
    NAME_LEN, RAW_EVENT_SIZE, RUN_STAGE_SIZE, RUN_TAIL_FIXED, RawEvent, RunStage, SNAP_EXTRA, counter, hdr_kind,
};

use crate::{
    kernel::{Mem, off, read},
    maps::{EVENTS, LAST_TASK, LO_TASK_HELPERS, RUN, RunSlot, SCRATCH, count, count_by, peek},
};

const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
/// Wake the reader once per this many events per CPU (a power of two).
const WAKEUP_EVERY: u64 = 1024;

/// The current task, and whether the last event reserved on this CPU already named it.
/// Decided before the reservation: a program nested on this CPU (same task) that runs between
/// our reservation and our update of LAST_TASK then still carries the name itself.
struct Task {
    pid_tgid: u64,
    last: Option<*mut u64>,
    cached: bool,
    /// Unknown: a `lo` program on a kernel that gives it no task helpers (the record carries
    /// pid 0 and no name, and does not count as naming anyone).
    unknown: bool,
}

/// Whether a program on `lo` may call the task helpers here (see `LO_TASK_HELPERS`).
#[inline(always)]
fn lo_task_helpers() -> bool {
    // SAFETY: a plain read of a read-only global the loader wrote before loading.
    unsafe { core::ptr::read_volatile(&LO_TASK_HELPERS) != 0 }
}

impl Task {
    /// The current task; `lo`: the caller is a `lo` program (a constant at every call site).
    #[inline(always)]
    fn current(lo: bool) -> Self {
        if lo && !lo_task_helpers() {
            return Self {
                pid_tgid: 0,
                last: None,
                cached: false,
                unknown: true,
            };
        }
        let pid_tgid = bpf_get_current_pid_tgid();
        let last = LAST_TASK.get_ptr_mut(0);
        // SAFETY: a per-CPU array slot, valid for the whole program run.
        let cached = last.is_some_and(|p| unsafe { *p } == pid_tgid);
        Self {
            pid_tgid,
            last,
            cached,
            unknown: false,
        }
    }
}

/// Fills the common header, lets `fill` add the hook-specific part, submits.
/// A failed reservation is counted as lost (never silent).
#[inline(always)]
pub fn emit(hook: Hook, skb: u64, lo: bool, fill: impl FnOnce(&mut RawEvent)) {
    let task = Task::current(lo);
    let Some(mut entry) = EVENTS.reserve::<RawEvent>(0) else {
        count(counter::RING_LOST);
        return;
    };
    // SAFETY: a fresh ring reservation of exactly one RawEvent, ours until submit.
    let e = unsafe { &mut *entry.as_mut_ptr() };
    fill_common(e, hook, skb, &task);
    fill(e);
    entry.submit(wake_across(count(counter::EMITTED).wrapping_sub(1), 1));
}

/// What one hook hit carries besides the common header.
#[derive(Clone, Copy, Default)]
pub struct Hit {
    pub len: u32,
    pub arg0: u64,
    pub arg1: u64,
    /// `struct net_device *` of the hook (0: none).
    pub dev: u64,
    /// The device is the traced `lo` (the `lo` programs have no device pointer).
    pub lo: bool,
    /// Packet bytes to capture: `hdr_kind` and kernel address (0: none), and how many bytes
    /// from there are the packet's linear data ([`linear_from`]): past them lies other kernel
    /// memory, never captured.
    pub cap_kind: u8,
    pub cap_src: u64,
    pub cap_len: u32,
}

impl Hit {
    /// Captures this skb's bytes from kernel address `at` (as `kind`): as many as are its linear
    /// data from there (`self.len` is its `skb->len`).
    #[inline(always)]
    pub fn capture_at<M: Mem>(&mut self, kind: u8, skb: u64, at: u64) {
        self.cap_kind = kind;
        self.cap_src = at;
        self.cap_len = linear_from::<M>(skb, self.len, at);
    }

    /// Writes this hit into a full record.
    #[inline(always)]
    pub fn head<M: Mem>(&self, e: &mut RawEvent) {
        e.len = self.len;
        e.arg0 = self.arg0;
        e.arg1 = self.arg1;
        if self.lo {
            e.ifindex = LOOPBACK_IFINDEX;
            e.ifname[..2].copy_from_slice(b"lo");
        } else {
            set_dev::<M>(e, self.dev);
        }
        if self.cap_src != 0 {
            capture(e, self.cap_kind, self.cap_src, self.cap_len);
        }
    }
}

/// One record for one hook (not staged).
#[inline(always)]
pub fn emit_hit<M: Mem>(hook: Hook, skb: u64, hit: Hit) {
    emit(hook, skb, hit.lo, |e| hit.head::<M>(e));
}

#[inline(always)]
fn run_slot() -> Option<&'static mut RunSlot> {
    // SAFETY: this CPU's slot of a per-CPU array, valid for the program run; the staging hooks
    // that use it never nest on one CPU (see `open_run`), so no other reference exists meanwhile.
    RUN.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// The skb of this CPU's open run (0: none).
#[inline(always)]
pub fn run_skb() -> u64 {
    RUN.get(0).map(|s| s.open).unwrap_or(0)
}

/// The skb of the last run this CPU sent.
#[inline(always)]
pub fn last_run_skb() -> u64 {
    RUN.get(0).map(|s| s.last).unwrap_or(0)
}

/// Opens a run on this CPU with this hit of `skb` as its head, sending a run still open first.
///
/// Runs are staged only by hooks that run with bottom halves disabled (the `lo` transmit chain
/// inside `__dev_queue_xmit`, the `lo` receive chain inside the NET_RX softirq), and every run is
/// closed inside the same section (`net_dev_xmit`, tc ingress, or a free): no other program on
/// this CPU touches the slot meanwhile (hard interrupts run none of the staging hooks), and no
/// other CPU can see the skb before the record is sent, so the stream keeps each skb's order.
/// `hdr_known`: an earlier record of this skb carried its bytes; the run's hooks capture none.
#[inline(always)]
pub fn open_run<M: Mem>(hook: Hook, skb: u64, hit: Hit, hdr_known: bool) {
    let Some(slot) = run_slot() else {
        emit_hit::<M>(hook, skb, hit);
        return;
    };
    if slot.open != 0 {
        send_run(slot);
    }
    // A new transmit or receive: the segments of an earlier split are all sent by now (they go
    // out in one loop inside the split skb's `__dev_queue_xmit`).
    if hook != Hook::Xmit {
        slot.gso_parent = 0;
    }
    let task = Task::current(hit.lo);
    let e = &mut slot.rec.head;
    fill_common(e, hook, skb, &task);
    hit.head::<M>(e);
    slot.rec.tail.n = 0;
    slot.rec.tail.hdr_stage = 0;
    slot.hdr_known = hdr_known as u64;
    slot.open = skb;
}

/// Adds a hook to this CPU's open run (the caller checked [`run_skb`]); `close` sends the run.
#[inline(always)]
pub fn run_stage<M: Mem>(hook: Hook, hit: Hit, close: bool) {
    let Some(slot) = run_slot() else {
        return;
    };
    let n = slot.rec.tail.n as usize;
    if n >= MAX_RUN {
        // Longer than any chain: send what is staged, this hook goes on its own.
        let skb = slot.open;
        send_run(slot);
        emit_hit::<M>(hook, skb, hit);
        return;
    }
    // The index is masked from a second load of `n`: the compiler cannot drop the mask after
    // the check above (it knows nothing of a volatile load), so every verifier sees an index
    // below MAX_RUN. (Without it, 6.1's verifier refused `stages[n]` in net_dev_start_xmit's
    // raw tracepoint program: "invalid access to map value, off=10456".)
    // SAFETY: a read of a field of this CPU's slot, valid for the program run.
    let i = unsafe { core::ptr::read_volatile(&slot.rec.tail.n) } as usize & (MAX_RUN - 1);
    let st: &mut RunStage = &mut slot.rec.tail.stages[i];
    // SAFETY: a helper call without arguments.
    st.ts_ns = unsafe { bpf_ktime_get_ns() };
    st.hook = hook as u8;
    st.len = hit.len;
    st.arg0 = hit.arg0;
    st.arg1 = hit.arg1;
    st.ifindex = if hit.lo {
        LOOPBACK_IFINDEX
    } else {
        read::<M, u32>(hit.dev, off!(dev_ifindex)).unwrap_or(0)
    };
    let head = &mut slot.rec.head;
    // A `lo` program opened this run without knowing the task: the first tracepoint to join
    // it (same CPU, same context) names it.
    if !hit.lo && !lo_task_helpers() && head.pid_tgid == 0 {
        head.pid_tgid = bpf_get_current_pid_tgid();
        head.comm = bpf_get_current_comm().unwrap_or([0; NAME_LEN]);
    }
    if hit.cap_src != 0 && slot.hdr_known == 0 && head.hdr_kind == hdr_kind::NONE {
        capture(head, hit.cap_kind, hit.cap_src, hit.cap_len);
        if head.hdr_kind != hdr_kind::NONE {
            slot.rec.tail.hdr_stage = n as u8 + 1;
        }
    }
    slot.rec.tail.n = n as u8 + 1;
    if close {
        send_run(slot);
    }
}

/// What this CPU's run says of an skb that reaches a driver and is not the open run's own.
pub enum AtXmit {
    Nothing,
    /// A segment of this skb, just split into GSO segments on this CPU: the last run was its
    /// transmit run and ended with its free (see [`RunSlot::gso_parent`]).
    SegmentOf(u64),
    /// This skb's run waits for its transmit (see [`awaits_xmit`]).
    Waiting(u64),
}

/// [`AtXmit`], from one look at this CPU's run.
#[inline(always)]
pub fn at_xmit() -> AtXmit {
    match RUN.get(0) {
        Some(s) if s.open == 0 && s.gso_parent != 0 => AtXmit::SegmentOf(s.gso_parent),
        Some(s) if awaits_xmit(s) => AtXmit::Waiting(s.open),
        _ => AtXmit::Nothing,
    }
}

/// Closes the open run with its skb's free. A transmit run (opened by tc egress or
/// `net_dev_queue`) whose skb is consumed before `net_dev_start_xmit` was split by
/// `validate_xmit_skb` (GSO in software: the skb is longer than the device's `gso_max_size`):
/// the free says so ([`CONSUME_GSO_SPLIT`]) and the segments that follow are its pieces.
#[inline(always)]
pub fn free_in_run<M: Mem>(hook: Hook, mut hit: Hit) {
    let Some(slot) = run_slot() else {
        return;
    };
    if hook == Hook::Consume && awaits_xmit(slot) {
        slot.gso_parent = slot.open;
        hit.arg0 = CONSUME_GSO_SPLIT;
    }
    run_stage::<M>(hook, hit, true);
}

/// Whether the open run is a transmit that has not reached the driver: only tc egress and/or
/// `net_dev_queue` are staged.
#[inline(always)]
fn awaits_xmit(slot: &RunSlot) -> bool {
    let head = slot.rec.head.hook & !(HOOK_RUN | HOOK_COMM_CACHED);
    let n = slot.rec.tail.n as usize;
    slot.open != 0
        && (head == Hook::TcEgress as u8 || head == Hook::DevQueue as u8)
        && (n == 0 || (n == 1 && slot.rec.tail.stages[0].hook == Hook::DevQueue as u8))
}

/// Closes the open run as split into GSO segments whose split skb's free was not seen: the
/// caller saw its first segment reach the driver (see [`CONSUME_GSO_SPLIT_UNSEEN`]). Returns
/// the split skb, now [`RunSlot::gso_parent`]; the caller opens the segment's run.
#[inline(always)]
pub fn split_unseen<M: Mem>() -> u64 {
    let Some(slot) = run_slot() else {
        return 0;
    };
    let parent = slot.open;
    slot.gso_parent = parent;
    let hit = Hit {
        arg0: CONSUME_GSO_SPLIT_UNSEEN,
        ..Hit::default()
    };
    run_stage::<M>(Hook::Consume, hit, true);
    parent
}

/// Sends this CPU's open run, if any (callers: the staging hooks, see [`open_run`]).
#[inline(always)]
pub fn close_run() {
    if let Some(slot) = run_slot()
        && slot.open != 0
    {
        send_run(slot);
    }
}

/// One ring record for the whole run; lost and emitted counts are in hooks, not records.
#[inline(always)]
fn send_run(slot: &mut RunSlot) {
    let n = slot.rec.tail.n as u64;
    slot.last = slot.open;
    slot.open = 0;
    let (size, events) = if n == 0 {
        (RAW_EVENT_SIZE as u64, 1)
    } else {
        slot.rec.head.hook |= HOOK_RUN;
        const FIXED: u64 = (RAW_EVENT_SIZE + RUN_TAIL_FIXED) as u64;
        if n >= MAX_RUN as u64 {
            (FIXED + (MAX_RUN * RUN_STAGE_SIZE) as u64, MAX_RUN as u64 + 1)
        } else {
            // Below MAX_RUN, masked from a second load (see `run_stage`): the compiler knows the
            // value it just stored and would drop a plain clamp, and 6.1's verifier, which does
            // not know that bound, refused the size ("off=32 size=10392").
            // SAFETY: a read of a field of this CPU's slot, valid for the program run.
            let k = unsafe { core::ptr::read_volatile(&slot.rec.tail.n) } as u64 & (MAX_RUN as u64 - 1);
            (FIXED + k * RUN_STAGE_SIZE as u64, n + 1)
        }
    };
    let before = peek(counter::EMITTED);
    // SAFETY: EVENTS is the ring buffer map and the record is `size` bytes of live memory
    // (the run slot / the scratch slot), which the helper copies.
    let rc = unsafe {
        bpf_ringbuf_output(
            &EVENTS as *const _ as *mut core::ffi::c_void,
            &mut slot.rec as *mut _ as *mut core::ffi::c_void,
            size,
            wake_across(before, events),
        )
    };
    if rc == 0 {
        count_by(counter::EMITTED, events);
    } else {
        count_by(counter::RING_LOST, events);
        if let Some(p) = LAST_TASK.get_ptr_mut(0) {
            // SAFETY: `p` is this CPU's LAST_TASK slot from get_ptr_mut, valid for the program run.
            unsafe { *p = u64::MAX };
        }
    }
}

/// Batched wake-ups: waking the reader costs the traced task an irq_work per event when the
/// reader keeps up. Wake it when this CPU's emitted count (`before`, then `k` more events; no
/// helper call) crosses a multiple of WAKEUP_EVERY; the reader also drains on a 10 ms timer.
#[inline(always)]
fn wake_across(before: u64, k: u64) -> u64 {
    if (before + k) / WAKEUP_EVERY != before / WAKEUP_EVERY {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

/// Like [`emit`], for a record followed by `extra` more bytes that `fill` writes (up to
/// `SNAP_EXTRA`): built in a per-CPU scratch buffer and copied into the ring (a reservation
/// must have a constant size). A failed output is counted as lost, not as emitted.
/// Its only caller is tc egress on `lo`.
#[inline(always)]
pub fn emit_long(hook: Hook, skb: u64, fill: impl FnOnce(&mut RawEvent, *mut u8) -> u32) {
    let task = Task::current(true);
    let Some(buf) = SCRATCH.get_ptr_mut(0) else {
        count(counter::RING_LOST);
        return;
    };
    let base = buf as *mut u8;
    // SAFETY: SCRATCH's slot is larger than a RawEvent plus SNAP_EXTRA bytes and is this CPU's
    // alone for the run.
    let e = unsafe { &mut *(base as *mut RawEvent) };
    fill_common(e, hook, skb, &task);
    // SAFETY: RAW_EVENT_SIZE is inside the scratch slot; `fill` writes at most SNAP_EXTRA bytes.
    let extra = fill(e, unsafe { base.add(RAW_EVENT_SIZE) });
    let size = (RAW_EVENT_SIZE as u32 + (extra & (SNAP_EXTRA as u32 - 1))) as u64;
    // SAFETY: EVENTS is the ring buffer map and the record is `size` bytes of live memory
    // (the run slot / the scratch slot), which the helper copies.
    let rc = unsafe {
        bpf_ringbuf_output(
            &EVENTS as *const _ as *mut core::ffi::c_void,
            base as *mut core::ffi::c_void,
            size,
            wake_across(peek(counter::EMITTED), 1),
        )
    };
    if rc == 0 {
        count(counter::EMITTED);
    } else {
        count(counter::RING_LOST);
        // The record that carried the task name is gone: the next event must name it again.
        if let Some(p) = task.last {
            // SAFETY: `p` is this CPU's LAST_TASK slot from get_ptr_mut, valid for the program run.
            unsafe { *p = u64::MAX };
        }
    }
}

#[inline(always)]
fn fill_common(e: &mut RawEvent, hook: Hook, skb: u64, task: &Task) {
    // SAFETY: a helper call without arguments.
    e.ts_ns = unsafe { bpf_ktime_get_ns() };
    e.skb = skb;
    e.pid_tgid = task.pid_tgid;
    e.arg0 = 0;
    e.arg1 = 0;
    if task.cached || task.unknown {
        e.comm = [0; NAME_LEN];
    } else {
        e.comm = bpf_get_current_comm().unwrap_or([0; NAME_LEN]);
        if let Some(p) = task.last {
            // SAFETY: `p` is this CPU's LAST_TASK slot from get_ptr_mut, valid for the program run.
            unsafe { *p = task.pid_tgid };
        }
    }
    e.ifname = [0; NAME_LEN];
    // SAFETY: a helper call without arguments.
    e.cpu = unsafe { bpf_get_smp_processor_id() };
    e.len = 0;
    e.ifindex = 0;
    e.hook = hook as u8 | if task.cached { HOOK_COMM_CACHED } else { 0 };
    e.hdr_kind = hdr_kind::NONE;
    e.hdr_len = 0;
}

/// Copies up to `HDR_CAP` bytes of packet starting at kernel address `src`, of which `avail`
/// are the packet's linear data: only those are read (a short packet, or one whose payload
/// is in page fragments, is followed by other kernel memory, which a capture must not show).
#[inline(always)]
pub fn capture(e: &mut RawEvent, kind: u8, src: u64, avail: u32) {
    if src == 0 || avail == 0 {
        return;
    }
    let n = if avail as usize > HDR_CAP { HDR_CAP as u32 } else { avail };
    // SAFETY: the destination is HDR_CAP bytes of `e.hdr` and `n` is at most that; the helper
    // checks the kernel source address itself.
    let rc = unsafe { probe_read_raw(e.hdr.as_mut_ptr() as *mut _, n, src as *const _) };
    if rc != 0 {
        count(counter::READ_FAILED);
        return;
    }
    e.hdr_kind = kind;
    e.hdr_len = n as u16;
}

/// How many bytes from kernel address `at` are the skb's linear data (it ends at `skb->data`
/// plus `len - data_len`, `len` being its `skb->len`); 0 when `at` is unknown or not before
/// that end.
#[inline(always)]
fn linear_from<M: Mem>(skb: u64, len: u32, at: u64) -> u32 {
    let data = skb_data::<M>(skb);
    let headlen = len.saturating_sub(read::<M, u32>(skb, off!(skb_data_len)).unwrap_or(u32::MAX));
    let end = data + headlen as u64;
    if at == 0 || data == 0 || at >= end {
        0
    } else {
        (end - at) as u32
    }
}

/// Device name and index of a `struct net_device *`.
#[inline(always)]
pub fn set_dev<M: Mem>(e: &mut RawEvent, dev: u64) {
    if dev == 0 {
        return;
    }
    e.ifindex = read::<M, u32>(dev, off!(dev_ifindex)).unwrap_or(0);
    e.ifname = read::<M, [u8; NAME_LEN]>(dev, off!(dev_name)).unwrap_or([0; NAME_LEN]);
}

/// Where the packet header is: `skb->head + skb->network_header` (valid from IP output
/// onwards); 0 if unknown.
#[inline(always)]
pub fn network_header<M: Mem>(skb: u64) -> u64 {
    let head = read::<M, u64>(skb, off!(skb_head)).unwrap_or(0);
    let nh = read::<M, u16>(skb, off!(skb_network_header)).unwrap_or(0);
    if head != 0 && nh != u16::MAX {
        head + nh as u64
    } else {
        0
    }
}

/// `skb->data` (at receive, after `eth_type_trans`, the IP header).
#[inline(always)]
pub fn skb_data<M: Mem>(skb: u64) -> u64 {
    read::<M, u64>(skb, off!(skb_data)).unwrap_or(0)
}

#[inline(always)]
pub fn skb_len<M: Mem>(skb: u64) -> u32 {
    read::<M, u32>(skb, off!(skb_len)).unwrap_or(0)
}
