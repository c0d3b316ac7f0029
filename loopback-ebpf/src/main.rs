//! lotrace kernel programs. Every program observes only: the `lo` programs always let the packet
//! continue (XDP_PASS / TCX_NEXT) and the tracepoints never change kernel state.
#![no_std]
// Inline BPF assembly for the atomic counter add (the build already runs with RUSTC_BOOTSTRAP=1
// for -Z build-std).
#![feature(asm_experimental_arch)]
#![no_main]

mod agent;
mod doctor;
mod emit;
mod functions;
mod kernel;
mod lo;
mod maps;
mod tracepoints;

/// Set in the bench's empty-hook floor build (feature `floor`) only: every program returns at
/// once. A read-only global the loader never writes rather than a constant, so that the compiler
/// keeps each program's body (and every map and global the loader sets up); the verifier knows
/// the value and drops the body as dead code.
#[cfg(feature = "floor")]
#[unsafe(no_mangle)]
static FLOOR: u8 = 1;

/// Whether this program returns at once (the bench's empty-hook floor build).
#[inline(always)]
pub fn floor() -> bool {
    #[cfg(feature = "floor")]
    {
        // SAFETY: a plain read of a read-only global.
        unsafe { core::ptr::read_volatile(&FLOOR) != 0 }
    }
    #[cfg(not(feature = "floor"))]
    {
        false
    }
}

/// Whether this program returns at once: the floor build always, every build while the loader's
/// switch is off (see [`maps::ON`]).
#[inline(always)]
pub fn silent() -> bool {
    floor() || !maps::on()
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
