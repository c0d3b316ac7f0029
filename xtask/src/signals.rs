//! Children start with default signal dispositions, however xtask was started.
//!
//! A process started with SIGINT ignored (`cargo xtask test &` from a script, `nohup`, some
//! service managers) passes that on to every child, and a non-interactive shell cannot trap or
//! reset a signal that was ignored when it started: a test that stops a child with SIGINT then
//! never sees it stop. So every child xtask starts gets SIGINT, SIGTERM, SIGQUIT and SIGPIPE at
//! their defaults and an empty signal mask, as if started from a terminal. SIGHUP is left as it
//! is: ignoring it is what `nohup` is for.
use std::os::unix::process::CommandExt;
use std::process::Command;

/// The signals a child gets at their default action.
const RESET: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGQUIT, libc::SIGPIPE];

/// Makes `c` start its child with default dispositions of [`RESET`] and no signal blocked.
pub fn defaults(c: &mut Command) -> &mut Command {
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // async-signal-safe functions (signal, sigemptyset, sigprocmask) on its own stack memory.
    unsafe {
        c.pre_exec(|| {
            for s in RESET {
                libc::signal(s, libc::SIG_DFL);
            }
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    /// Started with SIGINT ignored (as under `nohup ... &`), a child still gets the default.
    #[test]
    fn a_child_gets_default_sigint_even_when_its_parent_ignores_it() {
        // SAFETY: signal(2) with constant arguments; this test's own process only, restored below.
        let old = unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
        let out = super::defaults(Command::new("sh").args(["-c", "grep SigIgn /proc/self/status"]))
            .output()
            .expect("sh");
        // SAFETY: as above, putting back what was there.
        unsafe { libc::signal(libc::SIGINT, old) };
        let text = String::from_utf8_lossy(&out.stdout);
        let mask = u64::from_str_radix(text.trim().trim_start_matches("SigIgn:").trim(), 16).expect("SigIgn");
        assert_eq!(mask & (1 << (libc::SIGINT - 1)), 0, "{text}");
    }
}
