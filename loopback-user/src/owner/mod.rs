//! Whose network namespace it is: the node's, a container's or a Kubernetes pod's, from what the
//! node itself knows, never the API server. In order of preference: the container runtime's CRI
//! API (containerd, CRI-O: pod name, namespace, UID and labels, container names), the runtime's
//! own state (podman's containers.json, docker's config.v2.json: container names), and always
//! `/proc/PID/cgroup` of a process in the namespace (runtime, container id, pod UID). A cgroup
//! path none of these know leaves the namespace to its inode.
pub mod cgroup;
pub mod cri;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};

pub use cgroup::CgroupOwner;

/// The default CRI sockets (containerd's, CRI-O's): used when present, silent when absent.
pub const DEFAULT_CRI_SOCKETS: &[&str] = &["/run/containerd/containerd.sock", "/run/crio/crio.sock"];
/// podman's default storage (root's).
pub const DEFAULT_PODMAN_ROOT: &str = "/var/lib/containers/storage";
/// docker's default data root.
pub const DEFAULT_DOCKER_ROOT: &str = "/var/lib/docker";

/// A Kubernetes pod.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// What made it, from the labels the controllers set: the Deployment of a ReplicaSet's pod,
    /// the StatefulSet, DaemonSet or Job; the pod's own name for a bare pod.
    pub workload: String,
    /// Its containers' names (the runtime's listing).
    pub containers: Vec<String>,
}

/// Whose a namespace is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Owner {
    /// `node`, `pod`, `container`; for a namespace no runtime owns, where it was found
    /// (`netns`: an `ip netns` one, `process`).
    pub kind: String,
    /// The node's name (the host namespace's owner).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// `podman`, `docker`, `containerd`, `cri-o`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// The container's id (for a pod: its sandbox's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<Pod>,
}

impl Owner {
    pub fn unowned(source: &str) -> Self {
        Self {
            kind: source.to_string(),
            ..Self::default()
        }
    }

    /// What names it, once for both exports: (Prometheus label, OpenTelemetry resource
    /// attribute where the semantic conventions have one, value); empty values left out
    /// (Prometheus treats an empty label as absent anyway).
    pub fn identity(&self) -> Vec<(&'static str, Option<&'static str>, String)> {
        let pod = self.pod.as_ref();
        let fields = [
            ("node", Some("k8s.node.name"), self.node.as_deref()),
            ("container_runtime", Some("container.runtime"), self.runtime.as_deref()),
            ("container_id", Some("container.id"), self.container_id.as_deref()),
            ("container_name", Some("container.name"), self.container_name.as_deref()),
            ("k8s_pod_name", Some("k8s.pod.name"), pod.map(|p| p.name.as_str())),
            (
                "k8s_namespace_name",
                Some("k8s.namespace.name"),
                pod.map(|p| p.namespace.as_str()),
            ),
            ("k8s_pod_uid", Some("k8s.pod.uid"), pod.map(|p| p.uid.as_str())),
            ("k8s_workload_name", None, pod.map(|p| p.workload.as_str())),
        ];
        fields
            .into_iter()
            .filter_map(|(label, attr, v)| Some((label, attr, v.filter(|v| !v.is_empty())?.to_string())))
            .collect()
    }

    /// Its labels on every agent series (besides `netns`): `owner`, and what names it.
    pub fn labels(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![("owner", self.kind.clone())];
        out.extend(self.identity().into_iter().map(|(label, _, v)| (label, v)));
        out
    }

    /// One line for a header: `pod default/web-1 (uid …, containerd)`, `container web (podman
    /// e14a56bd5100)`, `node n1`; None for a namespace no one owns.
    pub fn describe(&self) -> Option<String> {
        let short = |id: &Option<String>| id.as_deref().map(|i| i[..i.len().min(12)].to_string());
        match self.kind.as_str() {
            "node" => Some(format!("node {}", self.node.as_deref().unwrap_or("?"))),
            "pod" => {
                let p = self.pod.as_ref()?;
                let mut about = vec![format!("uid {}", p.uid)];
                about.extend(self.runtime.clone());
                if !p.containers.is_empty() {
                    about.push(format!("containers {}", p.containers.join(",")));
                }
                let name = if p.name.is_empty() {
                    "(unnamed)".to_string()
                } else {
                    format!("{}/{}", p.namespace, p.name)
                };
                Some(format!("pod {name} ({})", about.join(", ")))
            }
            "container" => Some(format!(
                "container {} ({} {})",
                self.container_name.as_deref().unwrap_or("(unnamed)"),
                self.runtime.as_deref().unwrap_or("unknown runtime"),
                short(&self.container_id).unwrap_or_default()
            )),
            _ => None,
        }
    }
}

/// The workload a pod belongs to, from its name and the labels its controller set.
pub fn workload_of(name: &str, labels: &BTreeMap<String, String>) -> String {
    let strip_random = |n: &str| n.rsplit_once('-').map_or(n.to_string(), |(w, _)| w.to_string());
    if let Some(job) = labels
        .get("job-name")
        .or_else(|| labels.get("batch.kubernetes.io/job-name"))
    {
        return job.clone();
    }
    if let Some(hash) = labels.get("pod-template-hash") {
        // Deployment → ReplicaSet `<deploy>-<hash>` → pod `<deploy>-<hash>-<random>`.
        let rs = strip_random(name);
        if let Some(d) = rs.strip_suffix(&format!("-{hash}")) {
            return d.to_string();
        }
        return rs;
    }
    if labels.contains_key("statefulset.kubernetes.io/pod-name") {
        return strip_random(name); // `<sts>-<ordinal>`
    }
    if labels.contains_key("controller-revision-hash") || labels.contains_key("pod-template-generation") {
        return strip_random(name); // DaemonSet: `<ds>-<random>`
    }
    name.to_string()
}

/// Where names come from.
#[derive(Clone, Debug)]
pub struct Sources {
    /// CRI sockets; `true` when given explicitly (its failures are told even if it is absent).
    pub cri: Vec<(PathBuf, bool)>,
    /// podman storage roots (their `*-containers/containers.json`).
    pub podman_roots: Vec<PathBuf>,
    pub docker_root: PathBuf,
    /// The node's name (the host namespace's owner).
    pub node: String,
}

impl Sources {
    /// The defaults, with `cri` and `podman` given explicitly replacing them.
    pub fn new(cri: &[PathBuf], podman: &[PathBuf], docker: Option<PathBuf>, node: Option<String>) -> Self {
        let cri = if cri.is_empty() {
            DEFAULT_CRI_SOCKETS.iter().map(|p| (PathBuf::from(p), false)).collect()
        } else {
            cri.iter().map(|p| (p.clone(), true)).collect()
        };
        let podman_roots = if podman.is_empty() {
            vec![PathBuf::from(DEFAULT_PODMAN_ROOT)]
        } else {
            podman.to_vec()
        };
        Self {
            cri,
            podman_roots,
            docker_root: docker.unwrap_or_else(|| PathBuf::from(DEFAULT_DOCKER_ROOT)),
            node: node
                .or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()))
                .unwrap_or_else(hostname),
        }
    }
}

/// This machine's host name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Names as the runtimes last told them.
#[derive(Debug, Default)]
pub struct Names {
    /// Each CRI socket's last good listing (by socket).
    pub cri: BTreeMap<PathBuf, cri::Listing>,
    /// podman: container id → name, and each containers.json's mtime when read.
    podman: HashMap<String, String>,
    podman_read: HashMap<PathBuf, SystemTime>,
    /// docker: container id → name (None: no such container there).
    docker: HashMap<String, Option<String>>,
}

impl Names {
    /// Reads podman's containers.json files again where they changed.
    pub fn refresh_files(&mut self, src: &Sources) {
        let mut files = Vec::new();
        for root in &src.podman_roots {
            if let Ok(dir) = std::fs::read_dir(root) {
                for e in dir.filter_map(|e| e.ok()) {
                    let n = e.file_name();
                    if n.to_string_lossy().ends_with("-containers") {
                        files.push(e.path().join("containers.json"));
                    }
                }
            }
        }
        let mtimes: Vec<(PathBuf, SystemTime)> = files
            .into_iter()
            .filter_map(|f| Some((f.clone(), std::fs::metadata(&f).ok()?.modified().ok()?)))
            .collect();
        let same =
            mtimes.len() == self.podman_read.len() && mtimes.iter().all(|(f, t)| self.podman_read.get(f) == Some(t));
        if same {
            return;
        }
        self.podman.clear();
        self.podman_read.clear();
        for (f, t) in mtimes {
            let Ok(text) = std::fs::read(&f) else { continue };
            #[derive(serde::Deserialize)]
            struct C {
                id: String,
                #[serde(default)]
                names: Vec<String>,
            }
            if let Ok(cs) = serde_json::from_slice::<Vec<C>>(&text) {
                for c in cs {
                    if let Some(n) = c.names.into_iter().next() {
                        self.podman.insert(c.id, n);
                    }
                }
            }
            self.podman_read.insert(f, t);
        }
        // docker's are read on demand; a container seen as absent is looked at again later.
        self.docker.retain(|_, n| n.is_some());
    }

    fn docker_name(&mut self, src: &Sources, id: &str) -> Option<String> {
        self.docker
            .entry(id.to_string())
            .or_insert_with(|| {
                let f = src.docker_root.join("containers").join(id).join("config.v2.json");
                let v: serde_json::Value = serde_json::from_slice(&std::fs::read(f).ok()?).ok()?;
                Some(v.get("Name")?.as_str()?.trim_start_matches('/').to_string())
            })
            .clone()
    }

    /// The pod a sandbox or container id, or a pod UID, belongs to, from the CRI listings.
    fn pod_of(&self, c: &CgroupOwner) -> Option<(String, &cri::Sandbox, &cri::Listing)> {
        for l in self.cri.values() {
            let by_id = c.container_id.as_deref().and_then(|id| {
                l.sandboxes.iter().find(|s| s.id == id).or_else(|| {
                    let sid = &l.containers.iter().find(|x| x.id == id)?.sandbox_id;
                    l.sandboxes.iter().find(|s| &s.id == sid)
                })
            });
            let by_uid = || {
                let uid = c.pod_uid.as_deref()?;
                l.sandboxes.iter().find(|s| s.uid == uid)
            };
            if let Some(s) = by_id.or_else(by_uid) {
                return Some((l.runtime.clone(), s, l));
            }
        }
        None
    }

    /// Whether any source knows the container or pod `c` names (else a CRI refresh may).
    pub fn knows(&self, c: &CgroupOwner) -> bool {
        c.is_empty()
            || self.pod_of(c).is_some()
            || c.container_id.as_ref().is_some_and(|id| self.podman.contains_key(id))
            || c.container_id
                .as_ref()
                .is_some_and(|id| self.docker.get(id).is_some_and(|n| n.is_some()))
    }

    /// The owner of a namespace found at `source` whose process has cgroups `c`.
    pub fn owner(&mut self, src: &Sources, source: &str, c: &CgroupOwner) -> Owner {
        if source == "host" {
            return Owner {
                kind: "node".into(),
                node: Some(src.node.clone()),
                ..Owner::default()
            };
        }
        if let Some((runtime, s, l)) = self.pod_of(c) {
            let mut containers: Vec<String> = l
                .containers
                .iter()
                .filter(|x| x.sandbox_id == s.id)
                .map(|x| x.name.clone())
                .collect();
            containers.sort();
            containers.dedup();
            return Owner {
                kind: "pod".into(),
                runtime: Some(runtime),
                container_id: Some(s.id.clone()),
                pod: Some(Pod {
                    name: s.name.clone(),
                    namespace: s.namespace.clone(),
                    uid: s.uid.clone(),
                    workload: workload_of(&s.name, &s.labels),
                    containers,
                }),
                ..Owner::default()
            };
        }
        if let Some(uid) = &c.pod_uid {
            // A pod the runtime did not list (no CRI socket): its UID from the cgroup.
            return Owner {
                kind: "pod".into(),
                runtime: c.runtime.map(String::from),
                container_id: c.container_id.clone(),
                pod: Some(Pod {
                    uid: uid.clone(),
                    ..Pod::default()
                }),
                ..Owner::default()
            };
        }
        let Some(id) = &c.container_id else {
            return Owner::unowned(source);
        };
        let (runtime, name) = match self.podman.get(id) {
            Some(n) => (Some("podman".to_string()), Some(n.clone())),
            None => match self.docker_name(src, id) {
                Some(n) => (Some("docker".to_string()), Some(n)),
                None => (c.runtime.map(String::from), None),
            },
        };
        Owner {
            kind: "container".into(),
            runtime,
            container_id: Some(id.clone()),
            container_name: name,
            ..Owner::default()
        }
    }
}

/// What `/proc/PID/cgroup` names (empty when the process is gone).
pub fn cgroup_of(proc: &Path, pid: u32) -> CgroupOwner {
    std::fs::read_to_string(proc.join(format!("{pid}/cgroup")))
        .map(|t| cgroup::parse(&t))
        .unwrap_or_default()
}

/// Which CRI sockets failed, so that each failure is told once and its recovery once; and
/// every socket's listings and failures (`lotrace_agent_cri_*`).
#[derive(Debug, Default, Clone)]
pub struct CriHealth(HashSet<PathBuf>, pub BTreeMap<PathBuf, CriCounts>);

/// One CRI socket's record.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CriCounts {
    pub listings: u64,
    pub failures: u64,
    /// Whether its last listing answered.
    pub up: bool,
}

impl CriHealth {
    /// Counts one listing of `socket`.
    pub fn count(&mut self, socket: &Path, ok: bool) {
        let c = self.1.entry(socket.to_path_buf()).or_default();
        c.listings += 1;
        c.failures += u64::from(!ok);
        c.up = ok;
    }

    /// Records one attempt's outcome on `socket`; the line to print, if any.
    pub fn record(&mut self, socket: &Path, explicit: bool, r: &Result<(), String>) -> Option<String> {
        match r {
            Ok(()) => self
                .0
                .remove(socket)
                .then(|| format!("CRI socket {} answers again", socket.display())),
            Err(_) if !explicit && !socket.exists() => None,
            Err(e) => self.0.insert(socket.to_path_buf()).then(|| {
                format!(
                    "CRI socket {}: {e}; pods are named from cgroups only (pod UID) until it answers (retrying)",
                    socket.display()
                )
            }),
        }
    }
}

/// Lists every CRI socket of `src` once, all at once (each call bounded: a slow runtime delays
/// no other), telling failures through `say`.
pub async fn list_cri(
    src: &Sources,
    clients: &mut HashMap<PathBuf, cri::RuntimeServiceClient<tonic::transport::Channel>>,
    health: &mut CriHealth,
    mut say: impl FnMut(String),
) -> BTreeMap<PathBuf, cri::Listing> {
    let mut calls = tokio::task::JoinSet::new();
    for (sock, explicit) in &src.cri {
        if !explicit && !sock.exists() {
            continue;
        }
        let mut c = clients
            .entry(sock.clone())
            .or_insert_with(|| cri::client(sock.clone()))
            .clone();
        let (sock, explicit) = (sock.clone(), *explicit);
        calls.spawn(async move { (sock, explicit, cri::list(&mut c).await) });
    }
    // Each told as it finishes: a slow one holds up no other's line.
    let mut out = BTreeMap::new();
    while let Some(r) = calls.join_next().await {
        let Ok((sock, explicit, r)) = r else { continue };
        let outcome = r.as_ref().map(|_| ()).map_err(Clone::clone);
        if let Some(line) = health.record(&sock, explicit, &outcome) {
            say(line);
        }
        health.count(&sock, outcome.is_ok());
        if let Ok(l) = r {
            out.insert(sock, l);
        }
    }
    out
}

/// One namespace found by its owner: `--container NAME|ID` or `--pod [NS/]NAME`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pick {
    Container(String),
    Pod { namespace: Option<String>, name: String },
}

impl Pick {
    pub fn matches(&self, o: &Owner) -> bool {
        match self {
            Self::Container(want) => {
                o.kind == "container"
                    && (o.container_name.as_deref() == Some(want)
                        || (want.len() >= 12
                            && o.container_id
                                .as_deref()
                                .is_some_and(|id| id.starts_with(want.as_str()))))
            }
            Self::Pod { namespace, name } => o
                .pod
                .as_ref()
                .is_some_and(|p| &p.name == name && namespace.as_ref().is_none_or(|n| n == &p.namespace)),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Container(c) => format!("container {c:?}"),
            Self::Pod {
                namespace: Some(n),
                name,
            } => format!("pod {n}/{name}"),
            Self::Pod { namespace: None, name } => format!("pod {name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_pods_workload_comes_from_its_controllers_labels() {
        assert_eq!(
            workload_of("web-7d4b9c8f5-x2x9k", &labels(&[("pod-template-hash", "7d4b9c8f5")])),
            "web"
        );
        assert_eq!(
            workload_of("db-2", &labels(&[("statefulset.kubernetes.io/pod-name", "db-2")])),
            "db"
        );
        assert_eq!(
            workload_of("lotrace-agent-abcde", &labels(&[("pod-template-generation", "1")])),
            "lotrace-agent"
        );
        assert_eq!(
            workload_of("migrate-x1y2z", &labels(&[("job-name", "migrate")])),
            "migrate"
        );
        assert_eq!(workload_of("bare", &labels(&[])), "bare");
    }

    fn listing() -> cri::Listing {
        cri::Listing {
            runtime: "containerd".into(),
            sandboxes: vec![cri::Sandbox {
                id: "a".repeat(64),
                name: "web-1".into(),
                namespace: "shop".into(),
                uid: "5f3c1a2b-0d4e-4f6a-8b7c-9d0e1f2a3b4c".into(),
                labels: BTreeMap::new(),
            }],
            containers: vec![
                cri::Container {
                    id: "b".repeat(64),
                    name: "app".into(),
                    sandbox_id: "a".repeat(64),
                },
                cri::Container {
                    id: "c".repeat(64),
                    name: "sidecar".into(),
                    sandbox_id: "a".repeat(64),
                },
            ],
        }
    }

    fn src() -> Sources {
        Sources::new(
            &[],
            &[PathBuf::from("/nonexistent")],
            Some("/nonexistent".into()),
            Some("n1".into()),
        )
    }

    #[test]
    fn a_sandbox_or_its_container_or_its_uid_names_the_pod() {
        let mut n = Names::default();
        n.cri.insert("/s".into(), listing());
        for c in [
            CgroupOwner {
                container_id: Some("a".repeat(64)),
                ..Default::default()
            },
            CgroupOwner {
                container_id: Some("c".repeat(64)),
                runtime: Some("containerd"),
                ..Default::default()
            },
            CgroupOwner {
                pod_uid: Some("5f3c1a2b-0d4e-4f6a-8b7c-9d0e1f2a3b4c".into()),
                ..Default::default()
            },
        ] {
            let o = n.owner(&src(), "netns", &c);
            assert_eq!(o.kind, "pod", "{c:?}");
            let p = o.pod.as_ref().expect("pod");
            assert_eq!((p.name.as_str(), p.namespace.as_str()), ("web-1", "shop"));
            assert_eq!(p.containers, ["app", "sidecar"]);
            assert!(n.knows(&c));
            let l = o.labels();
            assert!(l.contains(&("k8s_pod_name", "web-1".into())), "{l:?}");
            assert!(l.contains(&("k8s_namespace_name", "shop".into())));
            assert!(l.contains(&("container_runtime", "containerd".into())));
            assert_eq!(
                o.describe().as_deref(),
                Some("pod shop/web-1 (uid 5f3c1a2b-0d4e-4f6a-8b7c-9d0e1f2a3b4c, containerd, containers app,sidecar)")
            );
            assert!(
                Pick::Pod {
                    namespace: Some("shop".into()),
                    name: "web-1".into()
                }
                .matches(&o)
            );
            assert!(
                !Pick::Pod {
                    namespace: Some("other".into()),
                    name: "web-1".into()
                }
                .matches(&o)
            );
        }
    }

    #[test]
    fn without_a_runtime_listing_the_cgroup_alone_labels_what_it_can() {
        let mut n = Names::default();
        let uid = CgroupOwner {
            pod_uid: Some("u".into()),
            container_id: Some("d".repeat(64)),
            runtime: Some("cri-o"),
        };
        let o = n.owner(&src(), "process", &uid);
        assert_eq!((o.kind.as_str(), o.runtime.as_deref()), ("pod", Some("cri-o")));
        assert!(!n.knows(&uid), "an unlisted pod asks for a CRI refresh");
        let c = CgroupOwner {
            container_id: Some("e".repeat(64)),
            runtime: Some("podman"),
            pod_uid: None,
        };
        let o = n.owner(&src(), "process", &c);
        assert_eq!(o.kind, "container");
        assert_eq!(o.container_name, None);
        assert!(
            Pick::Container("e".repeat(12)).matches(&o),
            "an id prefix of 12 picks it"
        );
        assert!(
            !Pick::Container("e".repeat(11)).matches(&o),
            "a shorter prefix does not"
        );
        assert_eq!(
            n.owner(&src(), "process", &CgroupOwner::default()),
            Owner::unowned("process")
        );
        let host = n.owner(&src(), "host", &CgroupOwner::default());
        assert_eq!(host.labels(), [("owner", "node".to_string()), ("node", "n1".into())]);
    }

    #[test]
    fn podman_names_come_from_its_containers_json_and_are_reread_when_it_changes() {
        let dir = std::env::temp_dir().join(format!("lotrace-owner-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("overlay-containers")).expect("mkdir");
        let f = dir.join("overlay-containers/containers.json");
        let id = "f".repeat(64);
        std::fs::write(&f, format!(r#"[{{"id":"{id}","names":["web"],"image":"x"}}]"#)).expect("write");
        let src = Sources::new(&[], std::slice::from_ref(&dir), Some("/nonexistent".into()), None);
        let mut n = Names::default();
        n.refresh_files(&src);
        let c = CgroupOwner {
            container_id: Some(id.clone()),
            runtime: Some("podman"),
            pod_uid: None,
        };
        assert_eq!(n.owner(&src, "process", &c).container_name.as_deref(), Some("web"));
        std::fs::write(&f, "[]").expect("write");
        // A later mtime (the file system's clock may be coarse).
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&f)
            .and_then(|h| h.set_modified(later))
            .expect("touch");
        n.refresh_files(&src);
        assert_eq!(n.owner(&src, "process", &c).container_name, None);
        std::fs::write(&f, "not json").expect("write");
        std::fs::File::options()
            .write(true)
            .open(&f)
            .and_then(|h| h.set_modified(later + std::time::Duration::from_secs(5)))
            .expect("touch");
        n.refresh_files(&src);
        assert_eq!(
            n.owner(&src, "process", &c).kind,
            "container",
            "a broken file names nothing"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn docker_names_come_from_config_v2_json() {
        let dir = std::env::temp_dir().join(format!("lotrace-docker-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let id = "d".repeat(64);
        std::fs::create_dir_all(dir.join("containers").join(&id)).expect("mkdir");
        std::fs::write(
            dir.join("containers").join(&id).join("config.v2.json"),
            r#"{"ID":"x","Name":"/redis-1","State":{}}"#,
        )
        .expect("write");
        let src = Sources::new(&[], &[PathBuf::from("/nonexistent")], Some(dir.clone()), None);
        let mut n = Names::default();
        let c = CgroupOwner {
            container_id: Some(id.clone()),
            runtime: Some("docker"),
            pod_uid: None,
        };
        let o = n.owner(&src, "process", &c);
        assert_eq!(
            (o.runtime.as_deref(), o.container_name.as_deref()),
            (Some("docker"), Some("redis-1"))
        );
        assert!(n.knows(&c));
        assert!(Pick::Container("redis-1".into()).matches(&o));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failing_cri_socket_is_told_once_and_its_recovery_once() {
        let mut h = CriHealth::default();
        let s = Path::new("/nonexistent/cri.sock");
        assert_eq!(
            h.record(s, false, &Err("x".into())),
            None,
            "an absent default is silent"
        );
        assert!(
            h.record(s, true, &Err("refused".into()))
                .expect("told")
                .contains("refused")
        );
        assert_eq!(h.record(s, true, &Err("refused".into())), None, "once");
        assert!(h.record(s, true, &Ok(())).expect("told").contains("answers again"));
        assert_eq!(h.record(s, true, &Ok(())), None);
    }
}
