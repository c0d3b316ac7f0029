//! What the kernel side counted during a run (loss and cost), as recorded in a recording's
//! trailer and shown in the summary. Plain data: the loader fills it, sinks and the file format
//! read it.
use serde::Serialize;

/// Kernel-side loss counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct KernelCounters {
    /// Events the kernel could not put in the ring buffer (full).
    pub ring_lost: u64,
    /// Packets that could not be put in the scope map (their later stages are missing).
    pub scope_full: u64,
    /// Kernel memory reads that failed (fields left empty).
    pub read_failed: u64,
    /// Events submitted to the ring buffer.
    pub emitted: u64,
    /// Runs of lotrace's programs that the kernel skipped because that program was already
    /// running on the CPU (a softirq interrupting it: the kernel's `recursion_misses`), summed
    /// over the programs. Each may have lost an event. (Absent from older recordings: 0.)
    #[serde(default)]
    pub skipped_runs: u64,
}

/// Kernel-side cost of one attached program (BPF_STATS_RUN_TIME, enabled while tracing).
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ProgramCost {
    pub program: String,
    pub runs: u64,
    pub total_ns: u64,
}
