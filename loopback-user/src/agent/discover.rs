//! Finding the machine's network namespaces: the host's, every `ip netns` one and every one a
//! process is in (containers, pods). Told apart by nsfs inode, never by path: a hostNetwork pod
//! or a shell in the host namespace is the host's namespace.
use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use loopback_common::agent::LocalAddr;

/// Where a namespace was found (the `source` label of `lotrace_netns_info`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// `host`, `netns` (a bind mount under /run/netns) or `process`.
    pub source: &'static str,
    /// The `ip netns` name, `host`, or `pid:N` (its lowest process id).
    pub name: String,
    /// A process in it (the lowest pid), through which its addresses are read
    /// (`/proc/PID/net`); None for an `ip netns` namespace no process is in.
    pub pid: Option<u32>,
}

/// The inode of an nsfs file (None when it cannot be read: the process is gone, or not ours to see).
pub fn inode_of(path: &Path) -> Option<u32> {
    std::fs::metadata(path).ok().map(|m| m.ino() as u32)
}

/// The namespace of each process seen at the last scan: a process that was there before is not
/// looked at again (a node with 10,000 processes would otherwise cost 10,000 `stat` calls a
/// second); one that is gone is forgotten. A process that changes namespace with setns(2) keeps
/// its first one here (a container's processes are born in theirs).
#[derive(Default, Debug)]
pub struct PidCache(std::collections::HashMap<u32, u32>);

/// Every network namespace on the machine now, by inode. `proc` and `run_netns` are /proc and
/// /run/netns (parameters for the tests).
pub fn scan(proc: &Path, run_netns: &Path) -> BTreeMap<u32, Found> {
    scan_with(proc, run_netns, &mut PidCache::default())
}

/// [`scan`], looking only at the processes `cache` has not seen.
pub fn scan_with(proc: &Path, run_netns: &Path, cache: &mut PidCache) -> BTreeMap<u32, Found> {
    let mut out = BTreeMap::new();
    if let Some(ino) = inode_of(&proc.join("1/ns/net")) {
        out.insert(
            ino,
            Found {
                source: "host",
                name: "host".into(),
                pid: Some(1),
            },
        );
    }
    if let Ok(dir) = std::fs::read_dir(run_netns) {
        let mut names: Vec<(String, PathBuf)> = dir
            .filter_map(|e| e.ok())
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .collect();
        names.sort();
        for (name, path) in names {
            if let Some(ino) = inode_of(&path) {
                out.entry(ino).or_insert(Found {
                    source: "netns",
                    name,
                    pid: None,
                });
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir(proc) {
        let mut pids: Vec<u32> = dir
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        pids.sort_unstable();
        let alive: std::collections::HashSet<u32> = pids.iter().copied().collect();
        cache.0.retain(|pid, _| alive.contains(pid));
        for pid in pids {
            let ino = match cache.0.get(&pid) {
                Some(ino) => Some(*ino),
                None => {
                    let ino = inode_of(&proc.join(format!("{pid}/ns/net")));
                    if let Some(i) = ino {
                        cache.0.insert(pid, i);
                    }
                    ino
                }
            };
            if let Some(ino) = ino {
                let f = out.entry(ino).or_insert_with(|| Found {
                    source: "process",
                    name: format!("pid:{pid}"),
                    pid: None,
                });
                f.pid.get_or_insert(pid);
            }
        }
    }
    out
}

/// The addresses of a namespace's own interfaces, loopback ones aside, read through a process
/// in it: IPv4 from `/proc/PID/net/fib_trie` (its `/32 host LOCAL` entries), IPv6 from
/// `/proc/PID/net/if_inet6`. Empty when the process is gone.
pub fn local_addrs(proc: &Path, pid: u32, netns: u32) -> BTreeSet<LocalAddr> {
    let read = |f: &str| std::fs::read_to_string(proc.join(format!("{pid}/net/{f}"))).unwrap_or_default();
    parse_local_addrs(&read("fib_trie"), &read("if_inet6"), netns)
}

pub fn parse_local_addrs(fib_trie: &str, if_inet6: &str, netns: u32) -> BTreeSet<LocalAddr> {
    let mut out = BTreeSet::new();
    let mut last: Option<std::net::Ipv4Addr> = None;
    for l in fib_trie.lines() {
        let t = l.trim_start();
        if let Some(a) = t.strip_prefix("|-- ") {
            last = a.trim().parse().ok();
        } else if t.starts_with("/32 host LOCAL")
            && let Some(a) = last
            && a.octets()[0] != 127
        {
            let mut addr = [0; 16];
            addr[..4].copy_from_slice(&a.octets());
            out.insert(LocalAddr { netns, family: 4, addr });
        }
    }
    for l in if_inet6.lines() {
        let Some(hex) = l.split_whitespace().next().filter(|h| h.len() == 32) else {
            continue;
        };
        let Ok(v) = u128::from_str_radix(hex, 16) else { continue };
        if v != 1 {
            out.insert(LocalAddr {
                netns,
                family: 6,
                addr: v.to_be_bytes(),
            });
        }
    }
    out
}

/// A `--netns` argument: an `ip netns` name, a path to an nsfs file, or an inode number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wanted {
    Name(String),
    Path(PathBuf),
    Inode(u32),
}

impl Wanted {
    pub fn parse(spec: &str) -> Result<Self, String> {
        if spec.contains('/') {
            return Ok(Self::Path(PathBuf::from(spec)));
        }
        if let Ok(ino) = spec.parse::<u32>() {
            return Ok(Self::Inode(ino));
        }
        crate::netns::validate_name(spec).map_err(|e| format!("--netns {spec:?}: {e}"))?;
        Ok(Self::Name(spec.to_string()))
    }

    /// Its inode now (a name or path that does not exist yet resolves later: the agent looks
    /// again at every scan).
    pub fn resolve(&self, run_netns: &Path) -> Option<u32> {
        match self {
            Self::Name(n) => inode_of(&run_netns.join(n)),
            Self::Path(p) => inode_of(p),
            Self::Inode(i) => Some(*i),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_addresses_are_the_namespaces_own_but_loopback() {
        let fib = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     +-- 10.201.0.0/24 2 0 2\n        |-- 10.201.0.0\n           /24 link UNICAST\n        |-- 10.201.0.1\n           /32 host LOCAL\n        |-- 10.201.0.255\n           /32 link BROADCAST\n     +-- 127.0.0.0/8 2 0 2\n        |-- 127.0.0.1\n           /32 host LOCAL\nLocal:\n        |-- 10.201.0.1\n           /32 host LOCAL\n";
        let v6 = "00000000000000000000000000000001 01 80 10 80       lo\nfd000000000000000000000000000001 02 40 00 80      lt0\n";
        let got = parse_local_addrs(fib, v6, 7);
        let mut want4 = [0u8; 16];
        want4[..4].copy_from_slice(&[10, 201, 0, 1]);
        let mut want6 = [0u8; 16];
        want6[0] = 0xfd;
        want6[15] = 1;
        let want: BTreeSet<LocalAddr> = [(4, want4), (6, want6)]
            .into_iter()
            .map(|(family, addr)| LocalAddr { netns: 7, family, addr })
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_netns_argument_is_a_name_a_path_or_an_inode() {
        assert_eq!(Wanted::parse("blue"), Ok(Wanted::Name("blue".into())));
        assert_eq!(
            Wanted::parse("/proc/1/ns/net"),
            Ok(Wanted::Path("/proc/1/ns/net".into()))
        );
        assert_eq!(Wanted::parse("4026531840"), Ok(Wanted::Inode(4026531840)));
        assert!(Wanted::parse("bad name").unwrap_err().contains("invalid character"));
    }

    #[test]
    fn a_cached_scan_finds_the_same_and_forgets_the_gone() {
        let mut cache = PidCache::default();
        let first = scan_with(Path::new("/proc"), Path::new("/nonexistent"), &mut cache);
        assert!(!cache.0.is_empty());
        cache.0.insert(u32::MAX, 1); // a pid that is not running
        let again = scan_with(Path::new("/proc"), Path::new("/nonexistent"), &mut cache);
        assert!(!cache.0.contains_key(&u32::MAX), "a gone process is forgotten");
        let mine = inode_of(Path::new("/proc/self/ns/net")).expect("own netns");
        assert!(first.contains_key(&mine) && again.contains_key(&mine));
    }

    #[test]
    fn the_scan_finds_this_process_namespace_and_names_the_host() {
        let found = scan(Path::new("/proc"), Path::new("/nonexistent"));
        let mine = inode_of(Path::new("/proc/self/ns/net")).expect("own netns");
        assert!(found.contains_key(&mine), "{found:?}");
        // Whatever pid 1 is in is called the host's.
        if let Some(host) = inode_of(Path::new("/proc/1/ns/net")) {
            assert_eq!(found[&host].name, "host");
        }
    }
}
