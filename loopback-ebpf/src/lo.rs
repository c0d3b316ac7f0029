//! Programs attached to the traced namespace's `lo`. They see the packet bytes but not the
//! kernel skb address: the per-CPU CUR_SKB slot written just before by `net_dev_queue` (egress)
//! or `netif_receive_skb` (ingress) on the same CPU links them. They always let the packet go on.
use aya_ebpf::{
    bindings::{TC_ACT_UNSPEC, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use loopback_common::{Hook, LOOPBACK_IFINDEX, hdr_kind};

use crate::{
    emit::{capture, emit},
    maps::CUR_SKB,
};

#[inline(always)]
fn lo_bytes(hook: Hook, slot: u32, data: usize, len: u32) {
    let skb = CUR_SKB.get(slot).copied().unwrap_or(0);
    emit(hook, skb, |e| {
        e.len = len;
        e.ifindex = LOOPBACK_IFINDEX;
        e.ifname[..2].copy_from_slice(b"lo");
        capture(e, hdr_kind::ETH, data as u64, len);
    });
}

/// Generic-mode XDP on `lo` (runs in `__netif_receive_skb_core` after `netif_receive_skb`).
/// `frags`: the kernel need not linearise large loopback packets for us.
#[xdp(frags)]
pub fn lo_xdp(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u32;
    lo_bytes(Hook::Xdp, 1, ctx.data(), len);
    xdp_action::XDP_PASS
}

/// tcx egress on `lo` (runs in `__dev_queue_xmit` after `net_dev_queue`).
#[classifier]
pub fn lo_tc_egress(ctx: TcContext) -> i32 {
    lo_bytes(Hook::TcEgress, 0, ctx.data(), ctx.len());
    TC_ACT_UNSPEC // TCX_NEXT: continue, the verdict is never ours
}

/// tcx ingress on `lo`.
#[classifier]
pub fn lo_tc_ingress(ctx: TcContext) -> i32 {
    lo_bytes(Hook::TcIngress, 1, ctx.data(), ctx.len());
    TC_ACT_UNSPEC
}
