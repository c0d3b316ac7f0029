//! The engine every command shares: ring records enter through the [`Intake`] (decode, record,
//! track), finished packets leave through the [`Printer`] (filter, text or JSON, pcapng,
//! summary). `trace`, `replay`, `prove` and the dashboard differ only in where records come from
//! and where packets go. The clocks ([`crate::clock`]) are re-exported here.
mod intake;
mod printer;
mod queue;

pub use crate::clock::{clock_ns, kernel_release, monotonic_ns};
pub use intake::{Intake, pump};
pub use printer::{Format, PrintOpts, Printer, outputs, summary, wanted};
pub use queue::PrintQueue;
