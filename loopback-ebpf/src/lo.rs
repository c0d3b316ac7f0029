//! Programs attached to the traced namespace's `lo`. They always let the packet go on.
//!
//! tc programs get the kernel `struct sk_buff *` itself as their context; a privileged loader
//! (CAP_PERFMON) may read that pointer's value, which names the skb exactly. Note that tc egress
//! runs in `__dev_queue_xmit` *before* the `net_dev_queue` tracepoint, so it is the first hook
//! to see a transmitted skb and takes it into scope itself (it only runs on the traced `lo`).
//! Generic XDP sees an `xdp_buff`, not the skb: the per-CPU RX_SKB slot written just before by
//! `netif_receive_skb` on the same CPU links it.
use aya_ebpf::{
    bindings::{TC_ACT_UNSPEC, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use aya_ebpf::helpers::generated::bpf_skb_load_bytes;
use loopback_common::{HDR_CAP, Hook, LOOPBACK_IFINDEX, SNAP_EXTRA, counter, hdr_kind};

use crate::{
    emit::{capture, emit, emit_long},
    kernel::ensure_tracked,
    maps::{RX_SKB, SNAP_EXTRA_BYTES, count},
};

/// The part every `lo` record shares: device, length, the first bytes of the frame.
#[inline(always)]
fn fill_lo(e: &mut loopback_common::RawEvent, data: usize, len: u32) {
    e.len = len;
    e.ifindex = LOOPBACK_IFINDEX;
    e.ifname[..2].copy_from_slice(b"lo");
    capture(e, hdr_kind::ETH, data as u64, len);
}

#[inline(always)]
fn lo_bytes(hook: Hook, skb: u64, data: usize, len: u32) {
    emit(hook, skb, |e| fill_lo(e, data, len));
}

/// Generic-mode XDP on `lo` (runs in `__netif_receive_skb_core` after `netif_receive_skb`).
/// `frags`: the kernel need not linearise large loopback packets for us.
#[xdp(frags)]
pub fn lo_xdp(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u32;
    let skb = RX_SKB.get(0).copied().unwrap_or(0);
    lo_bytes(Hook::Xdp, skb, ctx.data(), len);
    xdp_action::XDP_PASS
}

/// tcx egress on `lo` (runs in `__dev_queue_xmit` after `net_dev_queue`). With `--snaplen`
/// beyond the header capture, its record carries that many more packet bytes (for pcapng): each
/// packet crosses tc egress exactly once.
#[classifier]
pub fn lo_tc_egress(ctx: TcContext) -> i32 {
    let skb = ctx.skb.skb as u64;
    ensure_tracked(skb);
    let want = unsafe { core::ptr::read_volatile(&SNAP_EXTRA_BYTES) };
    let len = ctx.len();
    if want == 0 || len <= HDR_CAP as u32 {
        lo_bytes(Hook::TcEgress, skb, ctx.data(), len);
        return TC_ACT_UNSPEC;
    }
    let data = ctx.data();
    emit_long(Hook::TcEgress, skb, |e, tail| {
        fill_lo(e, data, len);
        let mut extra = len - HDR_CAP as u32;
        if extra > want {
            extra = want;
        }
        // Bounded for the verifier: 1 ..= SNAP_EXTRA - 1.
        let extra = extra & (SNAP_EXTRA as u32 - 1);
        if extra == 0 {
            return 0;
        }
        let rc = unsafe {
            bpf_skb_load_bytes(
                ctx.skb.skb as *const _,
                HDR_CAP as u32,
                tail as *mut core::ffi::c_void,
                extra,
            )
        };
        if rc != 0 {
            count(counter::READ_FAILED);
            return 0;
        }
        extra
    });
    TC_ACT_UNSPEC // TCX_NEXT: continue, the verdict is never ours
}

/// tcx ingress on `lo`.
#[classifier]
pub fn lo_tc_ingress(ctx: TcContext) -> i32 {
    let skb = ctx.skb.skb as u64;
    ensure_tracked(skb);
    lo_bytes(Hook::TcIngress, skb, ctx.data(), ctx.len());
    TC_ACT_UNSPEC
}
