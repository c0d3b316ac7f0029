//! The filter expression parser on arbitrary text, and what it parses evaluated on a packet
//! (its headers and its bytes): no panic, no overflow, whatever the expression.
#![no_main]
use libfuzzer_sys::fuzz_target;
use loopback_user::{decode::parse_eth, filter::Packet};

/// Ethernet + IPv4 (with options) + TCP SYN: byte tests reach every header and run past the end.
const FRAME: [u8; 58] = [
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x08, 0x00, // Ethernet, IPv4
    0x46, 0, 0, 44, 0, 1, 0x40, 0, 64, 6, 0, 0, 127, 0, 0, 1, 127, 0, 0, 2, 1, 1, 1, 0, // IPv4, 4 bytes of options
    0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0, // TCP SYN
];

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(e) = loopback_user::filter::parse(s)
        && let Some(info) = parse_eth(&FRAME)
    {
        for frame in [Some(&FRAME[..]), Some(&FRAME[..30]), None] {
            let _ = e.matches(&Packet { info: &info, frame, len: FRAME.len() as u32 });
        }
        let _ = e.check_capture(96);
        let _ = e.reads_bytes();
    }
});
