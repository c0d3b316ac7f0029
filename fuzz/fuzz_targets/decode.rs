//! The event decoder and path reconstruction on arbitrary kernel record bytes (a sequence of
//! 184-byte records): "unexpected kernel event bytes" must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use loopback_common::RAW_EVENT_SIZE;
use loopback_user::{
    decode::Decoder,
    path::{Tracker, TrackerConfig},
};

fuzz_target!(|data: &[u8]| {
    let mut decoder = Decoder::keeping_wire();
    let mut tracker = Tracker::new(TrackerConfig::default(), Default::default());
    // Whole records, then whatever is left (too short: an error, not a panic).
    for chunk in data.chunks(RAW_EVENT_SIZE) {
        if let Ok(e) = decoder.decode(chunk) {
            let _ = tracker.push(e);
        }
    }
    let _ = tracker.flush();
});
