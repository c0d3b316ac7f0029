//! What a process's cgroup path says about who runs it: the container runtime, the container's
//! id and, under Kubernetes, the pod's UID. Read from `/proc/PID/cgroup`; the layouts are those
//! of the cgroupfs and systemd drivers of podman, docker, containerd and CRI-O, and kubelet's
//! `kubepods` tree. A path none of them matches says nothing (the namespace keeps its inode only).

/// What one process's cgroups name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupOwner {
    /// `podman`, `docker`, `containerd` or `cri-o`; None when the path holds an id but not whose
    /// (kubelet's cgroupfs layout: `/kubepods/besteffort/pod<uid>/<id>`).
    pub runtime: Option<&'static str>,
    /// The container's id (64 hex digits).
    pub container_id: Option<String>,
    /// The Kubernetes pod's UID (dashed, as the API shows it).
    pub pod_uid: Option<String>,
}

impl CgroupOwner {
    pub fn is_empty(&self) -> bool {
        self.container_id.is_none() && self.pod_uid.is_none()
    }
}

fn is_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `<prefix><64 hex>` with an optional `.scope`: the id.
fn prefixed<'a>(part: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = part.strip_prefix(prefix)?;
    let id = rest.strip_suffix(".scope").unwrap_or(rest);
    is_id(id).then_some(id)
}

/// A pod UID from `pod<uid>` (cgroupfs: dashes) or `kubepods-<qos>-pod<uid>.slice` (systemd:
/// underscores for dashes).
fn pod_uid(part: &str) -> Option<String> {
    let p = part.strip_suffix(".slice").unwrap_or(part);
    let at = p.rfind("pod")?;
    if at != 0 && !p[..at].ends_with('-') {
        return None;
    }
    if at != 0 && !p.starts_with("kubepods") {
        return None;
    }
    let uid = p[at + 3..].replace('_', "-");
    let ok = uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| {
            if [8, 13, 18, 23].contains(&i) {
                b == b'-'
            } else {
                b.is_ascii_hexdigit()
            }
        });
    ok.then_some(uid)
}

/// What one cgroup path names.
pub fn parse_path(path: &str) -> CgroupOwner {
    let mut out = CgroupOwner::default();
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    for (i, part) in parts.iter().enumerate() {
        if out.pod_uid.is_none()
            && let Some(uid) = pod_uid(part)
        {
            out.pod_uid = Some(uid);
            continue;
        }
        // conmon, the monitor podman and CRI-O run beside each container, is not the container.
        if part.starts_with("libpod-conmon-") || part.starts_with("crio-conmon-") {
            continue;
        }
        let found = [
            ("libpod-", "podman"),
            ("docker-", "docker"),
            ("cri-containerd-", "containerd"),
            ("crio-", "cri-o"),
        ]
        .iter()
        .find_map(|(prefix, rt)| Some((prefixed(part, prefix)?, Some(*rt))));
        let found = found.or_else(|| {
            is_id(part).then(|| {
                // A bare id: its parent says whose (docker's and containerd's cgroupfs layouts).
                let rt = match i.checked_sub(1).map(|j| parts[j]) {
                    Some("docker") => Some("docker"),
                    Some("k8s.io") => Some("containerd"),
                    Some(p) if p.starts_with("libpod") => Some("podman"),
                    _ => None,
                };
                (*part, rt)
            })
        });
        if let Some((id, rt)) = found {
            out.container_id = Some(id.to_string());
            out.runtime = rt;
        }
    }
    out
}

/// What a `/proc/PID/cgroup` file names: the first of its lines (cgroup v2's `0::` line, or the
/// v1 hierarchies in turn) that names a container or a pod.
pub fn parse(text: &str) -> CgroupOwner {
    let mut lines: Vec<&str> = text.lines().collect();
    // v2's unified line first: it is the one the runtime placed the container in.
    lines.sort_by_key(|l| !l.starts_with("0::"));
    lines
        .into_iter()
        .filter_map(|l| l.splitn(3, ':').nth(2))
        .map(parse_path)
        .find(|o| !o.is_empty())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "e14a56bd5100099c7fa9cd58b3295eaf5f41af119d453e16e3d1253f8267d96e";
    const UID: &str = "5f3c1a2b-0d4e-4f6a-8b7c-9d0e1f2a3b4c";

    fn own(rt: Option<&'static str>, id: Option<&str>, uid: Option<&str>) -> CgroupOwner {
        CgroupOwner {
            runtime: rt,
            container_id: id.map(String::from),
            pod_uid: uid.map(String::from),
        }
    }

    #[test]
    fn each_runtimes_layout_names_its_container() {
        let cases = [
            // podman, cgroupfs and systemd drivers
            (
                format!("/libpod_parent/libpod-{ID}"),
                own(Some("podman"), Some(ID), None),
            ),
            (
                format!("/machine.slice/libpod-{ID}.scope/container"),
                own(Some("podman"), Some(ID), None),
            ),
            // docker
            (format!("/docker/{ID}"), own(Some("docker"), Some(ID), None)),
            (
                format!("/system.slice/docker-{ID}.scope"),
                own(Some("docker"), Some(ID), None),
            ),
            // containerd outside Kubernetes
            (format!("/k8s.io/{ID}"), own(Some("containerd"), Some(ID), None)),
            // kubelet's trees: systemd driver with containerd and CRI-O, cgroupfs driver
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{ID}.scope",
                    UID.replace('-', "_")
                ),
                own(Some("containerd"), Some(ID), Some(UID)),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-pod{}.slice/crio-{ID}.scope",
                    UID.replace('-', "_")
                ),
                own(Some("cri-o"), Some(ID), Some(UID)),
            ),
            (
                format!("/kubepods/besteffort/pod{UID}/{ID}"),
                own(None, Some(ID), Some(UID)),
            ),
            (format!("/kubepods/pod{UID}"), own(None, None, Some(UID))),
        ];
        for (path, want) in cases {
            assert_eq!(parse_path(&path), want, "{path}");
        }
    }

    #[test]
    fn a_path_no_runtime_made_names_nothing() {
        for path in [
            "/",
            "/user.slice/user-0.slice/session-3.scope",
            "/system.slice/ssh.service",
            "/init.scope",
            "/libpod_parent/conmon",
            &format!("/machine.slice/libpod-conmon-{ID}.scope"),
            "/docker/not-an-id",
            "/kubepods/besteffort/podnot-a-uid",
            "/my-pod1234/x",
        ] {
            assert!(parse_path(path).is_empty(), "{path}: {:?}", parse_path(path));
        }
    }

    #[test]
    fn the_unified_line_is_read_first_and_v1_lines_serve_when_it_names_nothing() {
        let v1 = format!("4:memory:/docker/{ID}\n0::/\n");
        assert_eq!(parse(&v1), own(Some("docker"), Some(ID), None));
        let both = format!("4:memory:/user.slice\n0::/libpod_parent/libpod-{ID}\n");
        assert_eq!(parse(&both), own(Some("podman"), Some(ID), None));
        assert!(parse("0::/init.scope\n").is_empty());
        assert!(parse("").is_empty());
        assert!(parse("garbage without colons\n").is_empty());
    }
}
