//! lotrace: trace packets through the Linux loopback path with eBPF.
pub mod agent;
pub mod bpf;
pub mod caps;
pub mod cli;
pub mod clock;
pub mod counters;
pub mod decode;
pub mod engine;
pub mod fault;
pub mod filter;
#[cfg(any(test, feature = "test-support"))]
pub mod fixture;
pub mod hooks;
pub mod netns;
pub mod output;
pub mod owner;
pub mod path;
pub mod pcap;
pub mod prove;
pub mod record;
pub mod trace;
pub mod traffic;
pub mod tui;
pub mod usage;
