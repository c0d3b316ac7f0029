//! The kernel programs' switch (`ON` in loopback-ebpf's maps.rs): off while the hook plan is
//! being attached, so that no packet is caught by half the hooks; on at once when the loader
//! says so; off again at stop, followed by one RCU grace period, after which no program run that
//! could still emit an event is in flight. Draining the ring after that leaves nothing behind:
//! the kernel's count of submitted events and the reader's count agree exactly.
//!
//! The switch is a memory-mapped array: flipping it is one store, no system call, so it needs no
//! capability (lotrace has dropped them all by the time it stops).
use std::os::fd::{AsFd, AsRawFd};

use anyhow::{Result, anyhow, bail};
use aya::maps::{Map, MapData};

use crate::clock::monotonic_ns;

/// `MEMBARRIER_CMD_GLOBAL`: returns after an RCU grace period on every CPU (`synchronize_rcu`),
/// which every BPF program run of ours sits inside (tracepoints, tc and XDP run under RCU or with
/// preemption or bottom halves disabled, which RCU waits for too).
const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;

pub struct Switch {
    ptr: *mut u32,
    len: usize,
    /// When it was last turned on (CLOCK_MONOTONIC ns, the clock of the kernel's timestamps); 0:
    /// never.
    pub on_since_ns: u64,
}

// SAFETY: the mapping belongs to the process, not to a thread; the one pointer is only written
// through `&mut self` (and read with a volatile load), so moving the Switch to another thread is sound.
unsafe impl Send for Switch {}

impl Switch {
    /// Maps the `ON` array of a loaded object (still off).
    pub fn map(map: &Map) -> Result<Self> {
        let data: &MapData = match map {
            Map::Array(d) => d,
            _ => bail!("ON is not an array map"),
        };
        // SAFETY: sysconf with a constant argument.
        let len = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        // SAFETY: a fresh shared mapping of the map's value area (one page; the kernel refuses it
        // unless the map was created BPF_F_MMAPABLE); nothing else aliases it in this process.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(anyhow!("cannot map the ON switch: {}", std::io::Error::last_os_error()));
        }
        Ok(Self {
            ptr: ptr as *mut u32,
            len,
            on_since_ns: 0,
        })
    }

    fn set(&mut self, on: bool) {
        // SAFETY: `ptr` is our live mapping of the map's first value (a u32).
        unsafe { std::ptr::write_volatile(self.ptr, on as u32) };
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    /// Every program starts emitting from now on.
    pub fn on(&mut self) {
        self.on_since_ns = monotonic_ns();
        self.set(true);
    }

    /// Every program goes silent; returns once no run that began before is still running (true),
    /// or at once if the kernel cannot say (false: `membarrier` refused, e.g. under `nohz_full`).
    pub fn off(&mut self) -> bool {
        self.set(false);
        // SAFETY: membarrier(2) with integer arguments only.
        unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) == 0 }
    }

    pub fn is_on(&self) -> bool {
        // SAFETY: `ptr` is our live mapping of the map's first value (a u32).
        unsafe { std::ptr::read_volatile(self.ptr) != 0 }
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping `map` made, once.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}
