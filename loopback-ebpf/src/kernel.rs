//! Reads of kernel memory through offsets resolved at load time (no compile-time struct layout).
use aya_ebpf::helpers::{bpf_get_current_task, bpf_get_current_task_btf, bpf_probe_read_kernel};
use loopback_common::counter;

use crate::maps::{SCOPE, TARGET_NETNS, count};

macro_rules! off {
    ($f:ident) => {
        // SAFETY: a plain read of a read-only global the loader wrote before loading.
        unsafe { core::ptr::read_volatile(&$crate::maps::OFFSETS.$f) } as u64
    };
}
pub(crate) use off;

/// How a program may read kernel memory.
pub trait Mem {
    /// tp_btf: pointer arguments are typed by BTF, so a plain load through them (and through the
    /// pointers read from them) is checked by the verifier and JITed as a faulting-safe load: no
    /// helper call. The offsets come from frozen read-only data, which the verifier sees as
    /// constants. Raw tracepoints get untyped words and must use `bpf_probe_read_kernel`.
    const DIRECT: bool;
}

/// Untyped access (`bpf_probe_read_kernel`), for programs without BTF-typed pointers (tc, XDP).
pub struct ProbeMem;
impl Mem for ProbeMem {
    const DIRECT: bool = false;
}

/// Reads a `T` at `base + offset`; `None` (and a READ_FAILED count) when the read faults.
#[inline(always)]
pub fn read<M: Mem, T>(base: u64, offset: u64) -> Option<T> {
    if base == 0 {
        return None;
    }
    if M::DIRECT {
        // SAFETY: a BTF-typed load; the JIT turns a fault into a zero result.
        return Some(unsafe { core::ptr::read_volatile((base + offset) as *const T) });
    }
    probe::<T>(base, offset)
}

/// Reads a `T` at `base + offset` with `bpf_probe_read_kernel`, for untyped pointers.
#[inline(always)]
pub fn probe<T>(base: u64, offset: u64) -> Option<T> {
    if base == 0 {
        return None;
    }
    // SAFETY: the helper checks the kernel address and reports a fault as an error.
    match unsafe { bpf_probe_read_kernel((base + offset) as *const T) } {
        Ok(v) => Some(v),
        Err(_) => {
            count(counter::READ_FAILED);
            None
        }
    }
}

#[inline(always)]
fn target() -> u32 {
    // SAFETY: a plain read of a read-only global the loader wrote before loading.
    unsafe { core::ptr::read_volatile(&TARGET_NETNS) }
}

/// Namespace inode of a `struct net *`.
#[inline(always)]
fn net_inum<M: Mem>(net: u64) -> Option<u32> {
    read::<M, u32>(net, off!(net_inum))
}

#[inline(always)]
pub fn net_in_scope<M: Mem>(net: u64) -> bool {
    net_inum::<M>(net) == Some(target())
}

/// The namespace inode of `dev` (a `struct net_device *`).
#[inline(always)]
pub fn dev_netns<M: Mem>(dev: u64) -> Option<u32> {
    net_inum::<M>(read::<M, u64>(dev, off!(dev_nd_net))?)
}

/// Whether `dev` lives in the traced namespace.
#[inline(always)]
pub fn dev_in_scope<M: Mem>(dev: u64) -> bool {
    dev_netns::<M>(dev) == Some(target())
}

#[inline(always)]
pub fn skb_dev<M: Mem>(skb: u64) -> u64 {
    read::<M, u64>(skb, off!(skb_dev)).unwrap_or(0)
}

/// Whether the current task's network namespace is the traced one.
#[inline(always)]
pub fn task_in_scope<M: Mem>() -> bool {
    task_netns::<M>() == Some(target())
}

/// The namespace inode of the current task.
#[inline(always)]
pub fn task_netns<M: Mem>() -> Option<u32> {
    // The BTF-typed task pointer allows direct loads; the plain one needs probe reads.
    let task = if M::DIRECT {
        // SAFETY: a helper call without arguments.
        unsafe { bpf_get_current_task_btf() as u64 }
    } else {
        // SAFETY: a helper call without arguments.
        unsafe { bpf_get_current_task() }
    };
    let nsproxy = read::<M, u64>(task, off!(task_nsproxy))?;
    net_inum::<M>(read::<M, u64>(nsproxy, off!(nsproxy_net_ns))?)
}

#[inline(always)]
pub fn tracked(skb: u64) -> bool {
    SCOPE.get_ptr(skb).is_some()
}

/// Takes `skb` into scope unless it already is (a lookup is much cheaper than an LRU update,
/// which allocates a new element even for a key that exists). True when it was not in scope.
#[inline(always)]
pub fn ensure_tracked(skb: u64) -> bool {
    if tracked(skb) {
        return false;
    }
    track(skb);
    true
}

#[inline(always)]
pub fn track(skb: u64) {
    if SCOPE.insert(skb, 1, 0).is_err() {
        count(counter::SCOPE_FULL);
    }
}

#[inline(always)]
pub fn untrack(skb: u64) {
    let _ = SCOPE.remove(skb);
}
