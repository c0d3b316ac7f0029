//! The event decoder and path reconstruction on arbitrary kernel record bytes: a sequence of
//! records, each a little-endian u16 length then that many bytes (ordinary 184-byte records, run
//! records, or anything else): "unexpected kernel event bytes" must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use loopback_user::{
    decode::{Decoder, record_events},
    path::{Tracker, TrackerConfig},
};

fuzz_target!(|data: &[u8]| {
    let mut decoder = Decoder::keeping_wire();
    let mut tracker = Tracker::new(TrackerConfig::default(), Default::default());
    let mut rest = data;
    while rest.len() >= 2 {
        let n = (u16::from_le_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
        let record = &rest[2..2 + n];
        rest = &rest[2 + n..];
        let events = record_events(record);
        let mut seen = 0u64;
        if let Ok(k) = decoder.decode_each(record, |e| {
            seen += 1;
            let _ = tracker.push(e);
        }) {
            assert_eq!((k, seen), (events, events), "a decoded record hands on all its events");
        } else {
            assert_eq!(seen, 0, "a bad record hands on nothing");
        }
    }
    let _ = tracker.flush();
});
