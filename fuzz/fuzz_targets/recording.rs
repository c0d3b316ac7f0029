//! The recording reader, then the whole replay pipeline (decode + path reconstruction), on
//! arbitrary bytes: errors are fine, panics are not.
#![no_main]
use libfuzzer_sys::fuzz_target;
use loopback_user::{
    decode::Decoder,
    path::{Tracker, TrackerConfig},
    record::{Frame, Reader},
};

fuzz_target!(|data: &[u8]| {
    let Ok(mut r) = Reader::new(data) else { return };
    let mut decoder = Decoder::keeping_wire();
    let mut tracker = Tracker::new(TrackerConfig::default(), Default::default());
    while let Ok(Some(f)) = r.next_frame() {
        match f {
            Frame::Event(b) => {
                let _ = decoder.decode_each(&b, |e| {
                    let _ = tracker.push(e);
                });
            }
            Frame::Tick(now) => {
                let _ = tracker.expire(now);
            }
            Frame::Trailer(_) => {}
        }
    }
    let _ = tracker.flush();
});
