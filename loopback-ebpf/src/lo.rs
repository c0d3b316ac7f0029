//! Programs attached to the traced namespace's `lo`. They always let the packet go on.
//!
//! tc programs get the kernel `struct sk_buff *` itself as their context; a privileged loader
//! (CAP_PERFMON) may read that pointer's value, which names the skb exactly. Note that tc egress
//! runs in `__dev_queue_xmit` *before* the `net_dev_queue` tracepoint, so it is the first hook
//! to see a transmitted skb and takes it into scope itself (it only runs on the traced `lo`).
//! Generic XDP sees an `xdp_buff`, not the skb: the per-CPU RX_SKB slot written just before by
//! `netif_receive_skb` on the same CPU links it.
use aya_ebpf::helpers::generated::bpf_skb_load_bytes;
use aya_ebpf::{
    bindings::{TC_ACT_UNSPEC, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use loopback_common::{HDR_CAP, Hook, SNAP_EXTRA, counter, hdr_kind};

use crate::{
    emit::{Hit, close_run, emit_hit, emit_long, open_run, run_skb, run_stage},
    kernel::{ProbeMem, ensure_tracked},
    maps::{RX_SKB, SNAP_EXTRA_BYTES, count},
};

/// What every `lo` record carries: the device, the length, the first bytes of the frame (of
/// its `linear` bytes at `data`: the rest may be in page fragments).
#[inline(always)]
fn lo_hit(data: usize, len: u32, linear: usize) -> Hit {
    Hit {
        len,
        lo: true,
        cap_kind: hdr_kind::ETH,
        cap_src: data as u64,
        cap_len: linear as u32,
        ..Hit::default()
    }
}

/// Generic-mode XDP on `lo` (runs in `__netif_receive_skb_core` after `netif_receive_skb`).
/// `frags`: the kernel need not linearise large loopback packets for us.
#[xdp(frags)]
pub fn lo_xdp(ctx: XdpContext) -> u32 {
    if crate::silent() {
        return xdp_action::XDP_PASS;
    }
    let linear = ctx.data_end() - ctx.data();
    let skb = RX_SKB.get(0).copied().unwrap_or(0);
    let hit = lo_hit(ctx.data(), linear as u32, linear);
    if skb != 0 && run_skb() == skb {
        run_stage::<ProbeMem>(Hook::Xdp, hit, false);
    } else {
        emit_hit::<ProbeMem>(Hook::Xdp, skb, hit);
    }
    xdp_action::XDP_PASS
}

/// tcx egress on `lo` (runs in `__dev_queue_xmit` before `net_dev_queue`): the first hook of a
/// transmitted skb, so it takes the skb into scope and opens its run. With `--snaplen` beyond the
/// header capture, its record carries that many more packet bytes (for pcapng) and goes out on
/// its own: each packet crosses tc egress exactly once.
#[classifier]
pub fn lo_tc_egress(ctx: TcContext) -> i32 {
    if crate::silent() {
        return TC_ACT_UNSPEC;
    }
    let skb = ctx.skb.skb as u64;
    ensure_tracked(skb);
    // SAFETY: a plain read of a read-only global the loader wrote before loading.
    let want = unsafe { core::ptr::read_volatile(&SNAP_EXTRA_BYTES) };
    let len = ctx.len();
    let linear = ctx.data_end() - ctx.data();
    if want == 0 || len <= HDR_CAP as u32 {
        open_run::<ProbeMem>(Hook::TcEgress, skb, lo_hit(ctx.data(), len, linear), false);
        return TC_ACT_UNSPEC;
    }
    close_run();
    emit_long(Hook::TcEgress, skb, |e, tail| {
        // The header capture too through the helper, which reads page fragments: a TCP
        // segment's linear data on lo is its headers only, and its payload starts inside the
        // first HDR_CAP bytes.
        Hit {
            len,
            lo: true,
            ..Hit::default()
        }
        .head::<ProbeMem>(e);
        // SAFETY: `e.hdr` has HDR_CAP bytes and the packet is longer (`len > HDR_CAP`).
        let rc = unsafe {
            bpf_skb_load_bytes(
                ctx.skb.skb as *const _,
                0,
                e.hdr.as_mut_ptr() as *mut core::ffi::c_void,
                HDR_CAP as u32,
            )
        };
        if rc != 0 {
            count(counter::READ_FAILED);
            return 0;
        }
        e.hdr_kind = hdr_kind::ETH;
        e.hdr_len = HDR_CAP as u16;
        let mut extra = len - HDR_CAP as u32;
        if extra > want {
            extra = want;
        }
        if extra == 0 {
            return 0;
        }
        // Bounded for the verifier as 1 ..= SNAP_EXTRA by arithmetic, not by the `== 0` test
        // above: older verifiers (6.1) do not raise a range's minimum on `!= 0`, and refuse a
        // size that may be 0. Exact for every `extra` up to SNAP_EXTRA (the loader caps `want`).
        let extra = ((extra - 1) & (SNAP_EXTRA as u32 - 1)) + 1;
        // SAFETY: `tail` has room for SNAP_EXTRA bytes (emit_long) and `extra` is at most that;
        // the helper bounds the read by the skb.
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

/// tcx ingress on `lo`: the end of the receive chain's run.
#[classifier]
pub fn lo_tc_ingress(ctx: TcContext) -> i32 {
    if crate::silent() {
        return TC_ACT_UNSPEC;
    }
    let skb = ctx.skb.skb as u64;
    let hit = lo_hit(ctx.data(), ctx.len(), ctx.data_end() - ctx.data());
    if run_skb() == skb {
        run_stage::<ProbeMem>(Hook::TcIngress, hit, true);
    } else {
        ensure_tracked(skb);
        emit_hit::<ProbeMem>(Hook::TcIngress, skb, hit);
    }
    TC_ACT_UNSPEC
}
