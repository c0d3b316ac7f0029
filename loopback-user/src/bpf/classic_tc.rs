//! The `lo` programs the classic way, for kernels without tcx (before 6.6): a `clsact` qdisc and
//! a direct-action bpf filter per direction, created over netlink inside the traced namespace.
//!
//! The promises are those of tcx, kept by hand, because a classic filter is not owned by a file
//! descriptor and outlives a killed lotrace:
//! - Never replace or remove anything of someone else's: the filter gets a priority and handle
//!   of its own (the kernel picks them, ahead of existing filters; ours always returns
//!   TC_ACT_UNSPEC, so the filters after it still run), an existing `clsact` is used as it is
//!   and left in place, and only a `clsact` lotrace created is removed, and only once no filter
//!   at all is left on it.
//! - Remove what lotrace added however it exits: on every normal exit `ClassicTc` is dropped and
//!   deletes exactly its filters (by priority and handle) inside the namespace. For `kill -9`, a
//!   state file per process (`/run/lotrace/classic-tc/<netns inode>-<pid>.json`) names them; the
//!   next lotrace run (and `doctor`) removes the filters of processes that no longer exist, and
//!   says so.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use aya::programs::{
    Link as _, SchedClassifier, TcAttachType,
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
};
use serde::{Deserialize, Serialize};

use crate::netns::Netns;

const STATE_DIR: &str = "/run/lotrace/classic-tc";

/// One of lotrace's filters, as the state file names it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct Filter {
    /// `egress` or `ingress`.
    dir: String,
    priority: u16,
    handle: u32,
}

/// The state file of one lotrace process.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
struct State {
    pid: u32,
    netns_path: PathBuf,
    netns_inode: u32,
    /// lotrace created the `clsact` qdisc (it existed before otherwise).
    qdisc_ours: bool,
    filters: Vec<Filter>,
}

fn dir_name(dir: TcAttachType) -> &'static str {
    match dir {
        TcAttachType::Ingress => "ingress",
        _ => "egress",
    }
}

fn parse_dir(s: &str) -> TcAttachType {
    if s == "ingress" {
        TcAttachType::Ingress
    } else {
        TcAttachType::Egress
    }
}

/// lotrace's classic tc filters on the traced namespace's `lo`; removed when dropped. They are
/// kept as (direction, priority, handle), never as aya link objects: such an object detaches on
/// drop in whatever namespace the dropping thread is in, which could name a filter of the
/// same priority and handle on another namespace's `lo`.
pub struct ClassicTc {
    netns: Netns,
    state: State,
}

impl ClassicTc {
    pub fn new(netns: &Netns) -> Self {
        Self {
            netns: netns.clone(),
            state: State {
                pid: std::process::id(),
                netns_path: netns.path.clone(),
                netns_inode: netns.inode,
                ..State::default()
            },
        }
    }

    fn state_file(&self) -> PathBuf {
        Path::new(STATE_DIR).join(format!("{}-{}.json", self.state.netns_inode, self.state.pid))
    }

    fn save(&self) -> Result<()> {
        std::fs::create_dir_all(STATE_DIR).with_context(|| format!("creating {STATE_DIR}"))?;
        let f = self.state_file();
        std::fs::write(&f, serde_json::to_vec(&self.state)?).with_context(|| format!("writing {}", f.display()))
    }

    /// Attaches the loaded program `p` to `lo` in direction `dir`, adding `clsact` if `lo` has
    /// none, and records the filter before anything else can happen to this process.
    pub fn attach(&mut self, p: &mut SchedClassifier, dir: TcAttachType) -> Result<()> {
        let (priority, handle) = self.netns.run(|| -> Result<(u16, TcHandle)> {
            match tc::qdisc_add_clsact("lo") {
                Ok(()) => {
                    self.state.qdisc_ours = true;
                    let _ = std::fs::create_dir_all(STATE_DIR);
                    let _ = std::fs::write(clsact_marker(self.state.netns_inode), b"");
                }
                Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(anyhow!("adding a clsact qdisc to lo: {e}")),
            }
            let id = p
                .attach_with_options("lo", dir, TcAttachOptions::Netlink(NlOptions::default()))
                .map_err(|e| anyhow!("{}", crate::bpf::session::explain(&e, "tc")))?;
            let link = p.take_link(id)?;
            let found = (link.priority()?, link.handle()?);
            std::mem::forget(link); // removed by (priority, handle), inside the namespace
            Ok(found)
        })??;
        self.state.filters.push(Filter {
            dir: dir_name(dir).to_string(),
            priority,
            handle: u32::from(handle),
        });
        self.save()
    }

    pub fn is_empty(&self) -> bool {
        self.state.filters.is_empty()
    }
}

/// Detaches `filters` from `lo` (run inside the namespace); how many went.
fn detach_all(filters: &[Filter]) -> usize {
    filters
        .iter()
        .filter(|f| {
            SchedClassifierLink::attached("lo", parse_dir(&f.dir), f.priority, TcHandle::from(f.handle), None)
                .is_ok_and(|l| l.detach().is_ok())
        })
        .count()
}

impl Drop for ClassicTc {
    fn drop(&mut self) {
        if self.state.filters.is_empty() && !self.state.qdisc_ours {
            return;
        }
        let inode = self.state.netns_inode;
        let done = self.netns.run(|| {
            detach_all(&self.state.filters);
            remove_lotraces_clsact(inode);
        });
        if done.is_ok() {
            let _ = std::fs::remove_file(self.state_file());
        }
    }
}

/// Marks that a lotrace added `lo`'s clsact in the namespace with this inode: whichever lotrace
/// leaves it empty removes it (two lotraces may share it; the one that added it need not be the
/// last to go).
fn clsact_marker(inode: u32) -> PathBuf {
    Path::new(STATE_DIR).join(format!("{inode}.clsact"))
}

/// Removes `lo`'s clsact if a lotrace added it and no filter is left on it (inside the
/// namespace). Whether it did.
fn remove_lotraces_clsact(inode: u32) -> bool {
    let marker = clsact_marker(inode);
    if marker.exists() && remove_clsact_if_empty() {
        let _ = std::fs::remove_file(marker);
        return true;
    }
    false
}

/// Whether process `pid` exists.
fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes `lo`'s `clsact` qdisc if no filter of anyone is left on it (asks `tc`, from
/// iproute2; without it the qdisc stays, which filters nothing). Runs inside the namespace.
fn remove_clsact_if_empty() -> bool {
    let empty = |dir: &str| {
        std::process::Command::new("tc")
            .args(["filter", "show", "dev", "lo", dir])
            .output()
            .is_ok_and(|o| o.status.success() && o.stdout.iter().all(u8::is_ascii_whitespace))
    };
    empty("ingress")
        && empty("egress")
        && std::process::Command::new("tc")
            .args(["qdisc", "del", "dev", "lo", "clsact"])
            .status()
            .is_ok_and(|s| s.success())
}

/// Removes the classic tc filters left by lotrace processes that no longer exist (`kill -9`),
/// in every namespace that still exists, and returns one line per process cleaned up.
pub fn remove_leftovers() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(STATE_DIR) else {
        return Vec::new();
    };
    let mut said = Vec::new();
    for e in entries.filter_map(|e| e.ok()) {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let Ok(state) = std::fs::read(&path)
            .map_err(anyhow::Error::from)
            .and_then(|b| Ok(serde_json::from_slice::<State>(&b)?))
        else {
            continue;
        };
        if alive(state.pid) {
            continue;
        }
        // The namespace is reachable by the path lotrace traced it by, if it still exists
        // (same inode); a namespace that is gone took its filters with it.
        let netns = Netns::resolve(&state.netns_path.to_string_lossy())
            .ok()
            .filter(|n| n.inode == state.netns_inode);
        let Some(netns) = netns else {
            let _ = std::fs::remove_file(&path);
            continue;
        };
        let removed = netns.run(|| (detach_all(&state.filters), remove_lotraces_clsact(state.netns_inode)));
        if let Ok((n, qdisc)) = removed {
            let _ = std::fs::remove_file(&path);
            said.push(format!(
                "removed {n} classic tc filter(s){} that lotrace (pid {}, no longer running) left on lo of network namespace {}",
                if qdisc { " and the clsact qdisc lotrace had added" } else { "" },
                state.pid,
                netns.label
            ));
        }
    }
    said
}
