//! Minimal programs used only by `lotrace doctor` to find out, by loading and attaching them,
//! which attach types this kernel allows. None of them does anything.
use aya_ebpf::{
    macros::{fentry, kprobe, raw_tracepoint, tracepoint},
    programs::{FEntryContext, ProbeContext, RawTracePointContext, TracePointContext},
};

#[fentry(function = "__dev_queue_xmit")]
pub fn doctor_fentry(_ctx: FEntryContext) -> u32 {
    0
}

#[kprobe]
pub fn doctor_kprobe(_ctx: ProbeContext) -> u32 {
    0
}

#[raw_tracepoint(tracepoint = "softirq_entry")]
pub fn doctor_raw_tp(_ctx: RawTracePointContext) -> i32 {
    0
}

#[tracepoint(category = "irq", name = "softirq_entry")]
pub fn doctor_tracepoint(_ctx: TracePointContext) -> u32 {
    0
}

#[aya_ebpf::macros::btf_tracepoint(function = "softirq_exit")]
pub fn doctor_tp_btf(_ctx: aya_ebpf::programs::BtfTracePointContext) -> i32 {
    0
}
