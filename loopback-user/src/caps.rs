//! Dropping privileges once everything is attached. Afterwards lotrace only reads the ring buffer
//! and maps through file descriptors it already holds, asks for program statistics on them, and
//! detaches by closing them; none of that needs a capability. So every capability goes: bounding
//! set, ambient, inheritable, permitted and effective. Capabilities belong to threads, so this
//! must run while the process has one thread (lotrace's runtime is single-threaded, and the
//! tracing commands start no thread before this).
use anyhow::{Result, bail};

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// Highest capability number the running kernel knows.
fn last_cap() -> u64 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

#[repr(C)]
struct Header {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Threads of this process (a capability drop covers only the calling thread).
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(0)
}

/// CAP_NET_ADMIN and CAP_SYS_ADMIN: what removing classic tc filters at exit needs (a netlink
/// request inside the traced namespace, entered with setns). Kept only when lotrace added such
/// filters (kernels without tcx); tcx and every other attachment go away by closing fds.
pub const CLASSIC_TC_CAPS: u64 = (1 << 12) | (1 << 21);

/// Drops every capability of the process for good, except those in the mask `keep` (bit N is
/// capability N), which stay permitted and effective (and in the bounding set).
pub fn drop_all_but(keep: u64) -> Result<()> {
    let threads = thread_count();
    if threads != 1 {
        bail!("{threads} threads are running (capabilities are per thread)");
    }
    // The bounding set needs CAP_SETPCAP, which is still effective now.
    for cap in (0..=last_cap()).filter(|c| keep & (1 << c) == 0) {
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
    }
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) };
    let mut hdr = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    // A capability the process does not have cannot be kept (capset refuses to add it): a
    // process started with fewer keeps what it has of `keep`.
    let keep = keep & permitted().unwrap_or(u64::MAX);
    let lo = keep as u32;
    let hi = (keep >> 32) as u32;
    let data = [
        Data {
            effective: lo,
            permitted: lo,
            inheritable: 0,
        },
        Data {
            effective: hi,
            permitted: hi,
            inheritable: 0,
        },
    ];
    // SAFETY: capset(2) with a live header and a live two-element data array, as the ABI wants.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut hdr as *mut Header, data.as_ptr()) };
    if rc != 0 {
        bail!("capset: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn status_mask(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/thread-self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix(key))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

/// This thread's effective capability mask, from /proc (for messages and tests).
pub fn effective() -> Option<u64> {
    status_mask("CapEff:")
}

/// This thread's permitted capability mask.
pub fn permitted() -> Option<u64> {
    status_mask("CapPrm:")
}
