//! Kernel guests for `cargo xtask test`: Debian's own kernel packages (the newest 6.1 and 6.12),
//! booted under QEMU (software emulation) with a busybox initramfs that mounts this machine's
//! root read-only over 9p, chroots into it and runs the privileged test binary there. The guest
//! prints `LOTRACE-VM-MARKER rc=N` last (QEMU itself always exits 0 after poweroff).
//!
//! Everything is cached under `target/vm/<package>/`: a second run only boots.
use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

/// A kernel series lotrace is tested on, and how to find its newest Debian package (names
/// change with every Debian update, so they are searched, never written down).
pub struct Kernel {
    pub series: &'static str,
    package_regex: &'static str,
}

pub const KERNELS: &[Kernel] = &[
    Kernel {
        series: "6.1",
        package_regex: r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$",
    },
    Kernel {
        series: "6.12",
        package_regex: r"^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$",
    },
];

pub fn kernel(series: &str) -> Option<&'static Kernel> {
    KERNELS.iter().find(|k| k.series == series)
}

/// What the guest's own kernel prints when it dies or stops making progress: an oops, a panic,
/// a soft lockup or an RCU stall. Under software emulation with two vCPUs these follow kernel
/// code patching (static calls, jump labels) racing the other emulated CPU, or an IPI the other
/// emulated CPU never takes; a 6.1 guest once spun 600 s in a soft lockup.
const KERNEL_DEATH: &[&str] = &[
    "Oops:",
    "Kernel panic",
    "BUG: soft lockup",
    "self-detected stall on CPU",
    "rcu_preempt detected stalls",
];

fn kernel_death(line: &str) -> bool {
    KERNEL_DEATH.iter().any(|sig| line.contains(sig))
}

/// How long a guest whose kernel died keeps printing (its stack traces) before it is stopped.
const DEATH_GRACE: Duration = Duration::from_secs(10);

/// Whether the guest's own kernel died (see KERNEL_DEATH) before the payload finished.
pub fn kernel_crashed(run: &GuestRun) -> bool {
    run.rc.is_none() && run.output.lines().any(kernel_death)
}

/// What one guest run printed and how it ended.
pub struct GuestRun {
    pub package: String,
    pub output: String,
    /// The payload's exit code from the marker line (None: no marker, the guest died).
    pub rc: Option<i32>,
    pub secs: f64,
}

/// Orders Debian-ish version strings by their numeric runs ("6.1.0-9" < "6.1.0-57").
fn version_key(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().unwrap_or(0))
        .collect()
}

fn newest_package(k: &Kernel) -> Result<String> {
    let search = || -> Result<Vec<String>> {
        let out = Command::new("apt-cache")
            .args(["search", "--names-only", k.package_regex])
            .output()
            .context("apt-cache")?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect())
    };
    let mut names = search()?;
    if names.is_empty() {
        let _ = Command::new("apt-get")
            .args(crate::APT_WAITS)
            .args(["update", "-qq"])
            .status();
        names = search()?;
    }
    names.sort_by_key(|n| version_key(n));
    names
        .pop()
        .ok_or_else(|| anyhow!("no Debian package matches {} (apt-get update?)", k.package_regex))
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The uncompressed kernel inside a bzImage (QEMU boots it through its PVH entry, which saves
/// the guest several seconds of decompression): the first compressed stream that unpacks to ELF.
fn extract_vmlinux(vmlinuz: &Path, out: &Path) -> Result<()> {
    let data = std::fs::read(vmlinuz)?;
    let magics: [(&[u8], &str); 3] = [
        (b"\xfd7zXZ\x00", "xz"),
        (b"\x28\xb5\x2f\xfd", "zstd"),
        (b"\x1f\x8b\x08", "gzip"),
    ];
    for (magic, tool) in magics {
        let Some(at) = data.windows(magic.len()).position(|w| w == magic) else {
            continue;
        };
        let mut child = Command::new(tool)
            .args(["-dc"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("running {tool}"))?;
        let mut stdin = child.stdin.take().context("stdin")?;
        let tail = data[at..].to_vec();
        let feeder = std::thread::spawn(move || {
            let _ = stdin.write_all(&tail); // trailing data makes the tool complain: ignored
        });
        let got = child.wait_with_output()?.stdout;
        let _ = feeder.join();
        if got.starts_with(b"\x7fELF") {
            std::fs::write(out, got)?;
            return Ok(());
        }
    }
    bail!("no ELF kernel found inside {}", vmlinuz.display())
}

/// The guest's /init: mount what a kernel test needs, load the modules, mount the host's root
/// (read-only) and the share, chroot into the host root and run the payload.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /lib/modules/load.order); do insmod /lib/modules/$m 2>/dev/null || echo "insmod $m failed"; done
ip link set lo up
RC=99
if mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose hostroot /host; then
  for d in proc sys dev; do mount --bind /$d /host/$d; done
  mount -t debugfs debugfs /host/sys/kernel/debug 2>/dev/null
  mount -t bpf bpf /host/sys/fs/bpf
  # The guest gets its own /tmp and /run, but the repository (named in the share's `repo`
  # file) stays visible where it is, even when it lives under the host's /tmp or /run.
  mkdir -p /share /hosttmp /hostrun
  mount -t 9p -o trans=virtio,version=9p2000.L share /share
  mount --bind /host/tmp /hosttmp; mount --bind /host/run /hostrun
  mount -t tmpfs tmp /host/tmp; mount -t tmpfs run /host/run
  REPO=$(cat /share/repo)
  case "$REPO" in
    /tmp/*) mkdir -p "/host$REPO" && mount --bind "/hosttmp${REPO#/tmp}" "/host$REPO" ;;
    /run/*) mkdir -p "/host$REPO" && mount --bind "/hostrun${REPO#/run}" "/host$REPO" ;;
  esac
  mkdir -p /host/tmp/share
  mount --bind /share /host/tmp/share
  chroot /host /bin/sh /tmp/share/payload.sh; RC=$?
else
  echo "cannot mount the host root over 9p"
fi
echo "LOTRACE-VM-MARKER rc=$RC"
poweroff -f
"#;

/// Modules the guest loads at boot: Debian builds them as modules, and the guest cannot load
/// them on demand (its chroot is the host's root, whose /lib/modules is another kernel's):
/// veth and the 9p transport for the harness; the clsact qdisc and the bpf and u32 classifiers
/// for classic tc (kernels without tcx).
const GUEST_MODULES: [&str; 7] = [
    "veth",
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "sch_ingress",
    "cls_bpf",
    "cls_u32",
];

/// Bumped whenever the initramfs changes, so a cached one is rebuilt.
const INITRAMFS_VERSION: u32 = 3;

/// Builds (or reuses) the kernel and initramfs of `package`: (vmlinux, initramfs).
fn prepare(root: &Path, package: &str) -> Result<(PathBuf, PathBuf)> {
    let dir = root.join("target/vm").join(package);
    let (vmlinux, initrd) = (
        dir.join("vmlinux"),
        dir.join(format!("initramfs-v{INITRAMFS_VERSION}.cpio.gz")),
    );
    if vmlinux.is_file() && initrd.is_file() {
        return Ok((vmlinux, initrd));
    }
    eprintln!("xtask vm: preparing {package} (download, extract, initramfs)");
    let _ = std::fs::remove_dir_all(&dir);
    let k = dir.join("k");
    std::fs::create_dir_all(&k)?;
    run(Command::new("apt-get").args(["download", package]).current_dir(&dir))?;
    let deb = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| anyhow!("apt-get download {package} left no .deb"))?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&k))?;
    let _ = std::fs::remove_file(&deb);
    let release = std::fs::read_dir(k.join("lib/modules"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .ok_or_else(|| anyhow!("{package} holds no modules directory"))?;
    run(Command::new("depmod").arg("-b").arg(&k).arg(&release))?;
    extract_vmlinux(&k.join(format!("boot/vmlinuz-{release}")), &vmlinux)?;

    // The initramfs: busybox, iproute2's ip (busybox's cannot name a veth peer) with its
    // libraries, and the modules Debian builds as modules that the guest needs.
    let r = dir.join("initramfs");
    for d in [
        "bin",
        "sbin",
        "usr/sbin",
        "proc",
        "sys",
        "dev",
        "tmp",
        "host",
        "lib/modules",
    ] {
        std::fs::create_dir_all(r.join(d))?;
    }
    std::fs::copy(
        crate::tools::path_of("busybox").map_err(|e| anyhow!(e))?,
        r.join("bin/busybox"),
    )?;
    let ip = crate::tools::path_of("ip").map_err(|e| anyhow!(e))?;
    std::fs::copy(&ip, r.join("usr/sbin/ip"))?;
    let ldd = Command::new("ldd").arg(&ip).output()?;
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let to = r.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().context("lib dir")?)?;
        std::fs::copy(lib, &to)?;
    }
    let mut order = String::new();
    for m in GUEST_MODULES {
        let out = Command::new("modprobe")
            .arg("-d")
            .arg(&k)
            .args(["-S", &release, "--show-depends", m])
            .output()?;
        for ko in String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("insmod "))
            .map(str::trim)
        {
            let ko = Path::new(ko);
            let name = ko.file_name().context("module name")?.to_string_lossy().into_owned();
            let plain = name
                .trim_end_matches(".xz")
                .trim_end_matches(".zst")
                .trim_end_matches(".gz")
                .to_string();
            if order.lines().any(|l| l == plain) {
                continue;
            }
            // busybox insmod takes plain .ko files only.
            let bytes = match ko.extension().and_then(|e| e.to_str()) {
                Some(tool @ ("xz" | "zst" | "gz")) => {
                    let tool = match tool {
                        "zst" => "zstd",
                        "gz" => "gzip",
                        t => t,
                    };
                    Command::new(tool).arg("-dc").arg(ko).output()?.stdout
                }
                _ => std::fs::read(ko)?,
            };
            std::fs::write(r.join("lib/modules").join(&plain), bytes)?;
            order.push_str(&plain);
            order.push('\n');
        }
    }
    std::fs::write(r.join("lib/modules/load.order"), order)?;
    let init = r.join("init");
    std::fs::write(&init, INIT)?;
    run(Command::new("chmod").arg("+x").arg(&init))?;
    run(Command::new("sh").arg("-c").arg(format!(
        "cd '{}' && find . | cpio -o -H newc --quiet | gzip -1 > '{}'",
        r.display(),
        initrd.display()
    )))?;
    let _ = std::fs::remove_dir_all(&r);
    Ok((vmlinux, initrd))
}

/// Boots the newest kernel of `k` and runs `payload` (a shell script, run as root inside the
/// host's root, read-only, with private /tmp, /run, /proc, /sys and bpffs) there. Output lines
/// are echoed with a `[series]` prefix as they come.
/// QEMU's accelerator options for the guests. `thread=single`: both emulated CPUs on one host
/// thread, taking turns. Measured with `cargo xtask soak` (README, Kernels): over 10 boots of
/// each kernel attaching lotrace under traffic, it crashed least (the rates are in the README).
pub const ACCEL: &str = "tcg,thread=single";

pub fn run_payload(root: &Path, k: &Kernel, payload: &str, timeout: Duration) -> Result<GuestRun> {
    run_payload_with(root, k, payload, timeout, ACCEL)
}

/// [`run_payload`] with other QEMU `-accel` options (`cargo xtask soak` compares them).
pub fn run_payload_with(root: &Path, k: &Kernel, payload: &str, timeout: Duration, accel: &str) -> Result<GuestRun> {
    let package = newest_package(k)?;
    let (vmlinux, initrd) = prepare(root, &package)?;
    let share = root.join("target/vm/share");
    let _ = std::fs::remove_dir_all(&share);
    std::fs::create_dir_all(&share)?;
    std::fs::write(share.join("payload.sh"), payload)?;
    std::fs::write(share.join("repo"), root.display().to_string())?;
    let start = Instant::now();
    let mut child = crate::signals::defaults(&mut Command::new("qemu-system-x86_64"))
        // Two vCPUs, as the suite expects (one made its 2 s echo waits time out under emulation).
        .args(["-accel", accel, "-cpu", "qemu64", "-m", "2G", "-smp", "2"])
        .args([
            "-no-user-config",
            "-nodefaults",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&vmlinux)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .arg("-virtfs")
        .arg("local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap,id=hostroot")
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=share,security_model=none,id=share",
            share.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().context("qemu stdout")?;
    let stderr = child.stderr.take().context("qemu stderr")?;
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            let _ = tx.send(l);
        }
    });
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            let _ = tx2.send(format!("qemu: {l}"));
        }
    });
    let mut output = String::new();
    let mut rc = None;
    let mut died: Option<Instant> = None;
    loop {
        if died.is_some_and(|t| t.elapsed() >= DEATH_GRACE) {
            println!("[{}] xtask: the guest's kernel died; stopping the guest", k.series);
            let _ = child.kill();
            break;
        }
        let left = timeout.saturating_sub(start.elapsed());
        match rx.recv_timeout(left.min(Duration::from_secs(1))) {
            Ok(line) => {
                let line = line.replace('\r', "");
                println!("[{}] {line}", k.series);
                if let Some(v) = line.trim().strip_prefix("LOTRACE-VM-MARKER rc=") {
                    rc = v.trim().parse().ok();
                }
                if rc.is_none() && died.is_none() && kernel_death(&line) {
                    died = Some(Instant::now());
                }
                output.push_str(&line);
                output.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if child.try_wait()?.is_some() && rx.try_recv().is_err() {
                    break;
                }
                if start.elapsed() >= timeout {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("the {package} guest did not finish within {} s", timeout.as_secs());
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = child.wait();
    Ok(GuestRun {
        package,
        output,
        rc,
        secs: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_package_is_chosen_by_numbers_not_text() {
        let mut v = [
            "linux-image-6.1.0-9-amd64-unsigned",
            "linux-image-6.1.0-57-amd64-unsigned",
            "linux-image-6.1.0-10-amd64-unsigned",
        ];
        v.sort_by_key(|n| version_key(n));
        assert_eq!(v.last(), Some(&"linux-image-6.1.0-57-amd64-unsigned"));
    }

    fn run(output: &str, rc: Option<i32>) -> GuestRun {
        GuestRun {
            package: "p".into(),
            output: output.into(),
            rc,
            secs: 1.0,
        }
    }

    #[test]
    fn a_dead_or_stuck_guest_kernel_is_told_from_a_failing_suite() {
        // Lines seen in CI logs.
        let lockup = "[    36.450593] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [lotrace:160]";
        let stall = "[   33.738457] rcu: INFO: rcu_preempt self-detected stall on CPU";
        let oops = "[  41.1] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI";
        for l in [
            lockup,
            stall,
            oops,
            "[ 9.0] Kernel panic - not syncing: Fatal exception",
        ] {
            assert!(kernel_crashed(&run(&format!("test x ... {l}\n"), None)), "{l}");
        }
        // The payload finished: whatever it printed, its rc stands.
        assert!(!kernel_crashed(&run(lockup, Some(1))));
        // A failing suite is not a dead kernel.
        let failing = "test paths::x ... FAILED\npanicked at src/x.rs:1:1\nLOTRACE-VM-MARKER rc=101";
        assert!(!kernel_crashed(&run(failing, None)));
    }
}
