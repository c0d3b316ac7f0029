//! THE list of external programs the tests and benches run, with the Debian package that brings
//! each. `cargo xtask test` / `bench` install the missing ones (quick when all are present), and
//! the privileged tests include this same file (`#[path]`) so a test that still finds a tool
//! missing fails with one line naming the tool and its package.

/// Which step needs a tool.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Need {
    /// `cargo xtask test` (unit, pseudo-terminal and privileged tests).
    Test,
    /// `cargo xtask bench` (the workloads and the bpftrace baseline).
    Bench,
    /// The kernel guests of `cargo xtask test` (QEMU, Debian's kernel packages, an initramfs).
    Vm,
}

/// One external program: its command name (or, for one that lives off PATH such as a CNI
/// plugin, its absolute path under /usr/lib), the Debian package that installs it, who needs it.
#[derive(Clone, Copy, Debug)]
pub struct Tool {
    pub bin: &'static str,
    pub package: &'static str,
    pub need: Need,
}

const fn t(bin: &'static str, package: &'static str, need: Need) -> Tool {
    Tool { bin, package, need }
}

pub const TOOLS: &[Tool] = &[
    // Privileged tests: namespaces and veths, flood ping, reading pcapng, running as nobody.
    t("ip", "iproute2", Need::Test),
    t("tc", "iproute2", Need::Test),
    t("ping", "iputils-ping", Need::Test),
    t("tcpdump", "tcpdump", Need::Test),
    t("setpriv", "util-linux", Need::Test),
    // The agent's metrics, scraped by a real Prometheus server (promtool checks its rules).
    t("prometheus", "prometheus", Need::Test),
    t("promtool", "prometheus", Need::Test),
    // Real containers and pods the agent and trace name by owner: podman containers on runc,
    // pod sandboxes through containerd's CRI plugin with the CNI plugins, images made from
    // busybox-static (and tar).
    t("podman", "podman", Need::Test),
    t("runc", "runc", Need::Test),
    t("containerd", "containerd", Need::Test),
    t("ctr", "containerd", Need::Test),
    t("/usr/lib/cni/loopback", "containernetworking-plugins", Need::Test),
    t("/usr/lib/cni/ptp", "containernetworking-plugins", Need::Test),
    t("/usr/lib/cni/host-local", "containernetworking-plugins", Need::Test),
    t("busybox", "busybox-static", Need::Test),
    t("tar", "tar", Need::Test),
    t("nsenter", "util-linux", Need::Test),
    // The dashboard in a pseudo-terminal.
    t("script", "bsdutils", Need::Test),
    // Bench: workloads, CPU pinning, the bpftrace baseline in a private mount namespace.
    t("sockperf", "sockperf", Need::Bench),
    t("iperf3", "iperf3", Need::Test),
    t("bpftrace", "bpftrace", Need::Bench),
    t("valgrind", "valgrind", Need::Bench),
    t("taskset", "util-linux", Need::Bench),
    t("unshare", "util-linux", Need::Bench),
    t("mountpoint", "util-linux", Need::Bench),
    // Whether a workload's server listens yet.
    t("ss", "iproute2", Need::Bench),
    // Kernel guests: fetch and unpack Debian's kernel packages, build an initramfs, boot.
    t("qemu-system-x86_64", "qemu-system-x86", Need::Vm),
    t("cpio", "cpio", Need::Vm),
    t("modprobe", "kmod", Need::Vm),
    t("depmod", "kmod", Need::Vm),
    t("dpkg-deb", "dpkg", Need::Vm),
    t("xz", "xz-utils", Need::Vm),
    t("zstd", "zstd", Need::Vm),
    t("gzip", "gzip", Need::Vm),
    t("ldd", "libc-bin", Need::Vm),
];

/// Where `bin` is: the first executable file of that name on PATH (or in /usr/sbin, /sbin).
pub fn find_on_path(bin: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(std::path::PathBuf::from))
        .map(|d| d.join(bin))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// Whether `bin` is an executable file on PATH.
pub fn on_path(bin: &str) -> bool {
    find_on_path(bin).is_some()
}

/// The path of a declared tool; a missing one is an error naming its package.
#[allow(dead_code)] // used by xtask, not by the tests that include this file
pub fn path_of(bin: &str) -> Result<std::path::PathBuf, String> {
    find_on_path(bin).ok_or_else(|| match find(bin) {
        Some(t) => format!("missing tool `{bin}` (Debian package {})", t.package),
        None => format!("missing tool `{bin}`"),
    })
}

/// The declared tool `bin` (None: not in the list).
pub fn find(bin: &str) -> Option<&'static Tool> {
    TOOLS.iter().find(|t| t.bin == bin)
}

/// The tools `need` requires that are missing on this machine.
pub fn missing(need: Need) -> Vec<&'static Tool> {
    TOOLS.iter().filter(|t| t.need == need && !on_path(t.bin)).collect()
}

/// For tests: the path-free command name of a declared tool, after checking that it is present.
/// A missing one is a one-line failure naming the tool and its package.
#[allow(dead_code)] // used by the tests that include this file, not by xtask itself
pub fn require(bin: &'static str) -> &'static str {
    let Some(tool) = find(bin) else {
        panic!("test bug: `{bin}` is not declared in xtask/src/tools.rs");
    };
    if !on_path(bin) {
        panic!(
            "missing tool `{bin}` (Debian package {}): `cargo xtask test` installs it",
            tool.package
        );
    }
    bin
}
