//! Sinks: one JSON object per packet per line ([`json`]), readable text blocks ([`text`]), and
//! the exit summary ([`summary`]).
mod json;
mod summary;
#[cfg(test)]
mod tests;
mod text;

#[cfg(any(test, feature = "test-support"))]
pub use json::packet_json;
pub use json::{JsonLines, stages_json};
pub use summary::{Summary, summary_json, summary_text};
pub use text::{TextStyle, fmt_ns, packet_text, table_name};
