//! lotrace kernel programs. Every program observes only: the `lo` programs always let the packet
//! continue (XDP_PASS / TCX_NEXT) and the tracepoints never change kernel state.
#![no_std]
// Inline BPF assembly for the atomic counter add (the build already runs with RUSTC_BOOTSTRAP=1
// for -Z build-std).
#![feature(asm_experimental_arch)]
#![no_main]

mod doctor;
mod emit;
mod functions;
mod kernel;
mod lo;
mod maps;
mod tracepoints;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
