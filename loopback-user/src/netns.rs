//! Network namespaces: naming them, entering them on a helper thread, and throwaway sandboxes.
use std::{
    fs::File,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, anyhow, bail};

/// `NS_GET_NSTYPE` ioctl: `_IO(0xb7, 0x3)`.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// A network namespace to trace, identified by its nsfs inode.
#[derive(Clone, Debug)]
pub struct Netns {
    pub path: PathBuf,
    /// What the user called it (name, path, or "current").
    pub label: String,
    pub inode: u32,
    /// Whose it is (`trace --container`, `--pod`, or found for a path or name).
    pub owner: Option<crate::owner::Owner>,
}

/// Checks a namespace name the way `ip netns` stores it: one path component, no odd characters.
pub fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() {
        bail!("empty namespace name");
    }
    if name.len() > 255 {
        bail!("namespace name is longer than 255 bytes");
    }
    if name == "." || name == ".." {
        bail!("invalid namespace name {name:?}");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | '+' | ':')))
    {
        bail!("invalid character {c:?} in namespace name {name:?}");
    }
    Ok(())
}

impl Netns {
    /// The namespace lotrace itself runs in.
    pub fn current() -> Result<Self> {
        Self::open_path(Path::new("/proc/self/ns/net"), "current")
    }

    /// `NAME` (as created by `ip netns add NAME`, i.e. /run/netns/NAME) or a path to an nsfs
    /// file (anything containing '/', e.g. /proc/PID/ns/net).
    pub fn resolve(spec: &str) -> Result<Self> {
        if spec.contains('/') {
            return Self::open_path(Path::new(spec), spec);
        }
        validate_name(spec)?;
        let path = PathBuf::from("/run/netns").join(spec);
        if !path.exists() {
            bail!("network namespace {spec:?} not found (no {})", path.display());
        }
        Self::open_path(&path, spec)
    }

    fn open_path(path: &Path, label: &str) -> Result<Self> {
        let f = File::open(path).map_err(|e| anyhow!("cannot open network namespace {}: {e}", path.display()))?;
        // SAFETY: an argument-less ioctl on an open file; an answer other than CLONE_NEWNET is rejected.
        let ty = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_NSTYPE as _) };
        if ty != libc::CLONE_NEWNET {
            bail!("{} is not a network namespace", path.display());
        }
        let inode = f.metadata()?.ino() as u32;
        Ok(Self {
            path: path.to_path_buf(),
            label: label.to_string(),
            inode,
            owner: None,
        })
    }

    /// Runs `f` on a new thread that has joined this namespace (setns only affects the calling
    /// thread, so the rest of the process stays where it is).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = File::open(&self.path).with_context(|| format!("open {}", self.path.display()))?;
        std::thread::scope(|s| {
            // Named so that traced packets sent from here show "lotrace" as their task.
            std::thread::Builder::new()
                .name("lotrace".into())
                .spawn_scoped(s, move || -> Result<T> {
                    // SAFETY: setns(2) on an open nsfs file; it changes only this worker thread's namespace.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        bail!("setns({}): {}", self.path.display(), std::io::Error::last_os_error());
                    }
                    Ok(f())
                })
                .map_err(|e| anyhow!("cannot start a namespace worker thread: {e}"))?
                .join()
                .map_err(|_| anyhow!("namespace worker thread panicked"))?
        })
    }
}

impl Netns {
    /// `ip -j ARGS` run inside this namespace, parsed. `Ok(Err(msg))` when `ip` itself refused
    /// (e.g. `route get` with no route: the kernel's own answer, which callers report).
    pub fn ip_json(&self, args: &[&str]) -> Result<std::result::Result<serde_json::Value, String>> {
        let out = self.run(|| Command::new("ip").arg("-j").args(args).output())?;
        let out = out.map_err(|e| anyhow!("cannot run `ip` (iproute2): {e}"))?;
        if !out.status.success() {
            let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Ok(Err(msg.strip_prefix("RTNETLINK answers: ").unwrap_or(&msg).to_string()));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        if text.trim().is_empty() {
            return Ok(Ok(serde_json::Value::Array(vec![])));
        }
        Ok(Ok(
            serde_json::from_str(&text).map_err(|e| anyhow!("ip -j {}: bad JSON: {e}", args.join(" ")))?
        ))
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| anyhow!("cannot run `ip` (iproute2): {e}"))?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

static SANDBOX_SEQ: AtomicU32 = AtomicU32::new(0);

/// A throwaway network namespace (`ip netns add`) with `lo` up, removed on drop.
pub struct Sandbox {
    pub name: String,
    pub netns: Netns,
}

impl Sandbox {
    pub fn new(prefix: &str) -> Result<Self> {
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            SANDBOX_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        validate_name(&name)?;
        ip(&["netns", "add", &name])?;
        // From here on, Drop removes it whatever happens next.
        let mut sb = Self {
            netns: Netns {
                path: PathBuf::new(),
                label: name.clone(),
                inode: 0,
                owner: None,
            },
            name,
        };
        sb.netns = Netns::resolve(&sb.name)?;
        sb.ip(&["link", "set", "lo", "up"])?;
        Ok(sb)
    }

    /// `ip -n NAME args...`
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Adds a veth pair inside the sandbox and puts `addrs` on `dev` (the peer stays without
    /// addresses). Both ends are brought up unless `peer_up` is false (a "pulled cable").
    /// No IPv6 link-local address is generated on either end (`addrgenmode none`), so the
    /// sandbox holds exactly the addresses given, none of them tentative.
    pub fn add_veth(&self, dev: &str, peer: &str, addrs: &[&str], peer_up: bool) -> Result<()> {
        self.ip(&["link", "add", dev, "type", "veth", "peer", "name", peer])?;
        self.ip(&["link", "set", "dev", dev, "addrgenmode", "none"])?;
        self.ip(&["link", "set", "dev", peer, "addrgenmode", "none"])?;
        self.add_addrs(dev, addrs)?;
        self.ip(&["link", "set", dev, "up"])?;
        if peer_up {
            self.ip(&["link", "set", peer, "up"])?;
        }
        Ok(())
    }

    fn add_addrs(&self, dev: &str, addrs: &[&str]) -> Result<()> {
        for a in addrs {
            let mut args = vec!["addr", "add", a, "dev", dev];
            if a.contains(':') {
                args.push("nodad");
            }
            self.ip(&args)?;
        }
        Ok(())
    }

    /// A veth pair from this sandbox (`dev`, holding `addrs`) to `other` (`peer`, holding
    /// `peer_addrs`): a "remote" host reachable only through a real device.
    pub fn link_to(&self, dev: &str, addrs: &[&str], other: &Sandbox, peer: &str, peer_addrs: &[&str]) -> Result<()> {
        self.ip(&[
            "link",
            "add",
            dev,
            "type",
            "veth",
            "peer",
            "name",
            peer,
            "netns",
            &other.name,
        ])?;
        self.ip(&["link", "set", "dev", dev, "addrgenmode", "none"])?;
        other.ip(&["link", "set", "dev", peer, "addrgenmode", "none"])?;
        self.add_addrs(dev, addrs)?;
        other.add_addrs(peer, peer_addrs)?;
        self.ip(&["link", "set", dev, "up"])?;
        other.ip(&["link", "set", peer, "up"])?;
        Ok(())
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Lists `ip netns` names (for cleanup checks).
pub fn list_named() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(validate_name("lt-test_1.a").is_ok());
        for bad in ["", ".", "..", "a b", "a;rm", "x\n", &"a".repeat(300)] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn unknown_name_is_a_clear_error() {
        let e = Netns::resolve("lotrace-no-such-ns-xyz").unwrap_err().to_string();
        assert!(e.contains("not found"), "{e}");
    }

    #[test]
    fn a_file_that_is_not_a_namespace_is_rejected() {
        let e = Netns::resolve("/etc/hostname").unwrap_err().to_string();
        assert!(
            e.contains("not a network namespace") || e.contains("cannot open"),
            "{e}"
        );
    }
}
