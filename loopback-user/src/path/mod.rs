//! Path reconstruction: pure, driven only by decoded events (unit-tested on recorded sequences).
//!
//! Identity: an skb address names one packet from its first hook until a free hook; the next
//! event on the same address starts a new packet (address + generation). Clones (raw sockets)
//! start at `copy_to_user` and are linked to their original by headers; ICMP echo replies and
//! TCP ACKs are linked to what they answer (`reply_of`).
mod model;
mod pairing;
mod softirq;
mod stats;
#[cfg(test)]
pub(crate) mod tests;
mod tracker;

pub use model::{PacketPath, Softirq, SoftirqContext, Stage, StageKind, Verdict, Wire, is_complete, seen_from_start};
pub use pairing::{is_echo_reply, is_echo_request};
pub use stats::Stats;
pub use tracker::{Tracker, TrackerConfig};
