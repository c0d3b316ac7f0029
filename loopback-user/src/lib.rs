//! lotrace: trace packets through the Linux loopback path with eBPF.
pub mod bpf;
pub mod caps;
pub mod cli;
pub mod decode;
pub mod fault;
pub mod filter;
pub mod fixture;
pub mod hooks;
pub mod netns;
pub mod output;
pub mod path;
pub mod pcap;
pub mod prove;
pub mod record;
pub mod trace;
pub mod traffic;
pub mod tui;
