//! The single reserve / fill / submit path of every event.
use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
    generated::bpf_probe_read_kernel as probe_read_raw,
};
use aya_ebpf::helpers::generated::bpf_ringbuf_output;
use loopback_common::{HDR_CAP, HOOK_COMM_CACHED, Hook, NAME_LEN, RAW_EVENT_SIZE, RawEvent, SNAP_EXTRA, counter, hdr_kind};

use crate::{
    kernel::{Mem, off, read},
    maps::{EVENTS, LAST_TASK, SCRATCH, count, peek},
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
}

impl Task {
    #[inline(always)]
    fn current() -> Self {
        let pid_tgid = bpf_get_current_pid_tgid();
        let last = LAST_TASK.get_ptr_mut(0);
        let cached = last.is_some_and(|p| unsafe { *p } == pid_tgid);
        Self { pid_tgid, last, cached }
    }
}

/// Fills the common header, lets `fill` add the hook-specific part, submits.
/// A failed reservation is counted as lost (never silent).
#[inline(always)]
pub fn emit(hook: Hook, skb: u64, fill: impl FnOnce(&mut RawEvent)) {
    let task = Task::current();
    let Some(mut entry) = EVENTS.reserve::<RawEvent>(0) else {
        count(counter::RING_LOST);
        return;
    };
    let e = unsafe { &mut *entry.as_mut_ptr() };
    fill_common(e, hook, skb, &task);
    fill(e);
    entry.submit(wakeup_flags(count(counter::EMITTED)));
}

/// Like [`emit`], for a record followed by `extra` more bytes that `fill` writes (up to
/// `SNAP_EXTRA`): built in a per-CPU scratch buffer and copied into the ring (a reservation
/// must have a constant size). A failed output is counted as lost, not as emitted.
#[inline(always)]
pub fn emit_long(hook: Hook, skb: u64, fill: impl FnOnce(&mut RawEvent, *mut u8) -> u32) {
    let task = Task::current();
    let Some(buf) = SCRATCH.get_ptr_mut(0) else {
        count(counter::RING_LOST);
        return;
    };
    let base = buf as *mut u8;
    let e = unsafe { &mut *(base as *mut RawEvent) };
    fill_common(e, hook, skb, &task);
    let extra = fill(e, unsafe { base.add(RAW_EVENT_SIZE) });
    let size = (RAW_EVENT_SIZE as u32 + (extra & (SNAP_EXTRA as u32 - 1))) as u64;
    let rc = unsafe {
        bpf_ringbuf_output(
            &EVENTS as *const _ as *mut core::ffi::c_void,
            base as *mut core::ffi::c_void,
            size,
            wakeup_flags(peek(counter::EMITTED) + 1),
        )
    };
    if rc == 0 {
        count(counter::EMITTED);
    } else {
        count(counter::RING_LOST);
        // The record that carried the task name is gone: the next event must name it again.
        if let Some(p) = task.last {
            unsafe { *p = u64::MAX };
        }
    }
}

/// Batched wake-ups: waking the reader costs the traced task an irq_work per event when the
/// reader keeps up. Wake it once per WAKEUP_EVERY events of this CPU (`n`: this CPU's emitted
/// count; no helper call); it also drains on a 10 ms timer.
#[inline(always)]
fn wakeup_flags(n: u64) -> u64 {
    if n & (WAKEUP_EVERY - 1) == 0 {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

#[inline(always)]
fn fill_common(e: &mut RawEvent, hook: Hook, skb: u64, task: &Task) {
    e.ts_ns = unsafe { bpf_ktime_get_ns() };
    e.skb = skb;
    e.pid_tgid = task.pid_tgid;
    e.arg0 = 0;
    e.arg1 = 0;
    if task.cached {
        e.comm = [0; NAME_LEN];
    } else {
        e.comm = bpf_get_current_comm().unwrap_or([0; NAME_LEN]);
        if let Some(p) = task.last {
            unsafe { *p = task.pid_tgid };
        }
    }
    e.ifname = [0; NAME_LEN];
    e.cpu = unsafe { bpf_get_smp_processor_id() };
    e.len = 0;
    e.ifindex = 0;
    e.hook = hook as u8 | if task.cached { HOOK_COMM_CACHED } else { 0 };
    e.hdr_kind = hdr_kind::NONE;
    e.hdr_len = 0;
}

/// Copies `HDR_CAP` bytes of packet header starting at kernel address `src`.
/// `avail` is how many of them belong to the packet.
#[inline(always)]
pub fn capture(e: &mut RawEvent, kind: u8, src: u64, avail: u32) {
    if src == 0 {
        return;
    }
    let rc = unsafe { probe_read_raw(e.hdr.as_mut_ptr() as *mut _, HDR_CAP as u32, src as *const _) };
    if rc != 0 {
        count(counter::READ_FAILED);
        return;
    }
    e.hdr_kind = kind;
    e.hdr_len = if avail as usize > HDR_CAP {
        HDR_CAP as u16
    } else {
        avail as u16
    };
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

/// Packet header from `skb->head + skb->network_header` (valid from IP output onwards).
#[inline(always)]
pub fn capture_network_header<M: Mem>(e: &mut RawEvent, skb: u64) {
    let head = read::<M, u64>(skb, off!(skb_head)).unwrap_or(0);
    let nh = read::<M, u16>(skb, off!(skb_network_header)).unwrap_or(0);
    if head != 0 && nh != u16::MAX {
        capture(e, hdr_kind::L3, head + nh as u64, e.len);
    }
}

/// Packet header from `skb->data` (at receive, after `eth_type_trans`, this is the IP header).
#[inline(always)]
pub fn capture_data<M: Mem>(e: &mut RawEvent, skb: u64) {
    let data = read::<M, u64>(skb, off!(skb_data)).unwrap_or(0);
    capture(e, hdr_kind::L3, data, e.len);
}

#[inline(always)]
pub fn skb_len<M: Mem>(skb: u64) -> u32 {
    read::<M, u32>(skb, off!(skb_len)).unwrap_or(0)
}
