//! Reads of kernel memory through offsets resolved at load time (no compile-time struct layout).
use aya_ebpf::helpers::{bpf_get_current_task, bpf_probe_read_kernel};
use loopback_common::counter;

use crate::maps::{SCOPE, TARGET_NETNS, count};

macro_rules! off {
    ($f:ident) => {
        unsafe { core::ptr::read_volatile(&$crate::maps::OFFSETS.$f) } as u64
    };
}
pub(crate) use off;

/// Reads a `T` at `base + offset`; `None` (and a READ_FAILED count) when the read faults.
#[inline(always)]
pub fn read<T>(base: u64, offset: u64) -> Option<T> {
    if base == 0 {
        return None;
    }
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
    unsafe { core::ptr::read_volatile(&TARGET_NETNS) }
}

/// Namespace inode of a `struct net *`.
#[inline(always)]
fn net_inum(net: u64) -> Option<u32> {
    read::<u32>(net, off!(net_inum))
}

#[inline(always)]
pub fn net_in_scope(net: u64) -> bool {
    net_inum(net) == Some(target())
}

/// Whether `dev` (a `struct net_device *`) lives in the traced namespace.
#[inline(always)]
pub fn dev_in_scope(dev: u64) -> bool {
    match read::<u64>(dev, off!(dev_nd_net)) {
        Some(net) => net_in_scope(net),
        None => false,
    }
}

#[inline(always)]
pub fn skb_dev(skb: u64) -> u64 {
    read::<u64>(skb, off!(skb_dev)).unwrap_or(0)
}

/// Whether the current task's network namespace is the traced one.
#[inline(always)]
pub fn task_in_scope() -> bool {
    let task = unsafe { bpf_get_current_task() };
    let Some(nsproxy) = read::<u64>(task, off!(task_nsproxy)) else {
        return false;
    };
    match read::<u64>(nsproxy, off!(nsproxy_net_ns)) {
        Some(net) => net_in_scope(net),
        None => false,
    }
}

#[inline(always)]
pub fn tracked(skb: u64) -> bool {
    SCOPE.get_ptr(&skb).is_some()
}

#[inline(always)]
pub fn track(skb: u64) {
    if SCOPE.insert(&skb, &1, 0).is_err() {
        count(counter::SCOPE_FULL);
    }
}

#[inline(always)]
pub fn untrack(skb: u64) {
    let _ = SCOPE.remove(&skb);
}
