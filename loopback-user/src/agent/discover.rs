//! Finding the machine's network namespaces: the host's, every `ip netns` one and every one a
//! process is in (containers, pods). Told apart by nsfs inode, never by path: a hostNetwork pod
//! or a shell in the host namespace is the host's namespace.
use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// Where a namespace was found (the `source` label of `lotrace_netns_info`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// `host`, `netns` (a bind mount under /run/netns) or `process`.
    pub source: &'static str,
    /// The `ip netns` name, `host`, or `pid:N` (its lowest process id).
    pub name: String,
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
                out.entry(ino).or_insert(Found { source: "netns", name });
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
                out.entry(ino).or_insert_with(|| Found {
                    source: "process",
                    name: format!("pid:{pid}"),
                });
            }
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
