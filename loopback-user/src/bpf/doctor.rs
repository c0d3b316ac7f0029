//! `lotrace doctor`: find out, by really loading and attaching minimal programs, what this kernel
//! allows, and which hook plan tracing will use. Every attach is done on a helper thread inside a
//! private, empty network namespace (unshare), so nothing touches the host's `lo`, and everything
//! is detached before the thread ends.
use anyhow::{Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        BtfTracePoint, FEntry, KProbe, LinkOrder, RawTracePoint, SchedClassifier, TcAttachType, TracePoint, Xdp,
        XdpMode, tc::TcAttachOptions,
    },
};
use loopback_common::{KernelOffsets, LOOPBACK_IFINDEX};
use serde::Serialize;

use crate::hooks::PLAN;

use super::{
    btf::{KernelBtf, VMLINUX_BTF},
    object,
    session::{KernelShape, Privileges, Session, SessionOptions, explain, privileges, verifier_log},
};

#[derive(Debug, Serialize)]
pub struct AttachTypeReport {
    pub kind: &'static str,
    pub available: bool,
    /// Why not, on one line (errno and a plain cause; a verifier log cut to its reason).
    pub error: Option<String>,
    /// The verifier's whole log (`--verbose` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
}

/// One hook point as `trace` attaches it on this kernel: built by the same code (`Session`),
/// in a throwaway namespace, then detached.
#[derive(Debug, Serialize)]
pub struct PlanRow {
    pub stage: String,
    /// The hook point.
    pub hook: &'static str,
    /// The program that served it (or the last one tried).
    pub program: &'static str,
    pub attach: &'static str,
    pub target: String,
    pub kernel_fn: &'static str,
    pub required: bool,
    pub available: bool,
    /// Candidates tried before (or instead of) the one used, with the kernel's reason.
    pub refused: Vec<super::session::Refusal>,
}

#[derive(Debug, Serialize)]
pub struct DoctorReport {
    pub kernel: String,
    pub btf: bool,
    pub lockdown: String,
    pub privileges: Privileges,
    pub attach_types: Vec<AttachTypeReport>,
    pub plan: Vec<PlanRow>,
    /// XDP on `lo` of the namespace doctor runs in: whose, and what `trace --xdp` does about it.
    pub lo_xdp: LoXdp,
    pub can_trace: bool,
    /// Why tracing is impossible, when it is.
    pub reason: Option<String>,
    /// What doctor cleaned up: classic tc filters a killed lotrace left behind.
    pub cleaned: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LoXdp {
    /// Program id of an XDP program already attached to lo (not ours), if any.
    pub prog_id: Option<u64>,
    pub prog_name: Option<String>,
    pub plan: String,
}

fn lo_xdp_report() -> LoXdp {
    match crate::netns::Netns::current()
        .ok()
        .and_then(|n| super::session::lo_xdp_prog(&n))
    {
        Some((id, name)) => LoXdp {
            prog_id: Some(id),
            prog_name: name,
            plan: format!(
                "lo already carries XDP program {id}: `trace --xdp` leaves it in place and takes ingress bytes from tc"
            ),
        },
        None => LoXdp {
            prog_id: None,
            prog_name: None,
            plan: "lo has no XDP program: `trace --xdp` may attach generic XDP (tc is used either way)".into(),
        },
    }
}

fn lockdown() -> String {
    match std::fs::read_to_string("/sys/kernel/security/lockdown") {
        Ok(s) => s
            .split_whitespace()
            .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
            .unwrap_or("unknown")
            .to_string(),
        Err(_) => "unknown (securityfs not mounted or no lockdown LSM)".into(),
    }
}

type DynErr = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Runs `f` on a thread inside a fresh, empty network namespace with its own copy of the object.
fn in_private_netns(f: impl FnOnce(&mut Ebpf) -> Result<(), DynErr> + Send + 'static) -> Result<(), DynErr> {
    let obj = object::check_built().map_err(|e| -> DynErr { e.to_string().into() })?;
    std::thread::spawn(move || -> Result<(), DynErr> {
        // SAFETY: unshare affects only this helper thread (CLONE_NEWNS implies CLONE_FS).
        if unsafe { libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWNS) } != 0 {
            return Err(Box::new(std::io::Error::last_os_error()));
        }
        mount_private_tracefs();
        // The same kernel shape as tracing uses (tracepoint arguments, helpers of tc/XDP).
        let shape = KernelShape::of(KernelBtf::load().ok().as_ref());
        let mut loader = EbpfLoader::new();
        shape.apply(&mut loader);
        let mut ebpf = loader
            .override_global("OFFSETS", &KernelOffsets::default(), true)
            .override_global("TARGET_NETNS", &0u32, true)
            .load(obj)?;
        let r = f(&mut ebpf);
        drop(ebpf); // detach everything before this namespace goes away
        r
    })
    .join()
    .map_err(|_| -> DynErr { "doctor worker panicked".into() })?
}

/// Classic tracepoints need tracefs (their ids are read there). A fresh boot may not have it
/// mounted: mount it in this thread's private mount namespace only, so the host is untouched
/// and the answer is about the kernel, not about the mount table.
fn mount_private_tracefs() {
    const TRACEFS: &std::ffi::CStr = c"/sys/kernel/tracing";
    if std::path::Path::new("/sys/kernel/tracing/events").exists() {
        return;
    }
    // SAFETY: mount(2) with constant, NUL-terminated strings; it only changes this thread's
    // (just unshared) mount namespace, made private first so nothing propagates to the host.
    unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        );
        libc::mount(
            c"nodev".as_ptr(),
            TRACEFS.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        );
    }
}

fn prog<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, DynErr>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf
        .program_mut(name)
        .ok_or_else(|| format!("program {name} missing"))?;
    Ok(p.try_into()?)
}

fn probe(kind: &'static str, verbose: bool) -> AttachTypeReport {
    let r = in_private_netns(move |ebpf| {
        match kind {
            "fentry" => {
                let btf = aya::Btf::from_sys_fs()?;
                let p: &mut FEntry = prog(ebpf, "doctor_fentry")?;
                p.load("__dev_queue_xmit", &btf)?;
                p.attach()?;
            }
            "kprobe" => {
                let p: &mut KProbe = prog(ebpf, "doctor_kprobe")?;
                p.load()?;
                p.attach("__dev_queue_xmit", 0)?;
            }
            "tp_btf" => {
                let btf = aya::Btf::from_sys_fs()?;
                let p: &mut BtfTracePoint = prog(ebpf, "doctor_tp_btf")?;
                p.load("softirq_exit", &btf)?;
                p.attach()?;
            }
            "raw_tracepoint" => {
                let p: &mut RawTracePoint = prog(ebpf, "doctor_raw_tp")?;
                p.load()?;
                p.attach("softirq_entry")?;
            }
            "tracepoint" => {
                let p: &mut TracePoint = prog(ebpf, "doctor_tracepoint")?;
                p.load()?;
                p.attach("irq", "softirq_entry").map_err(|e| -> DynErr {
                    let s = e.to_string();
                    if s.contains("tracefs") || s.contains("No such file") {
                        format!("{s} (tracefs is not mounted: mount -t tracefs nodev /sys/kernel/tracing)").into()
                    } else {
                        Box::new(e)
                    }
                })?;
            }
            "xdp_generic" => {
                let p: &mut Xdp = prog(ebpf, "lo_xdp")?;
                p.load()?;
                p.attach_to_if_index(LOOPBACK_IFINDEX, XdpMode::Skb)?;
            }
            "tcx" => {
                let p: &mut SchedClassifier = prog(ebpf, "lo_tc_egress")?;
                p.load()?;
                p.attach_with_options(
                    "lo",
                    TcAttachType::Egress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )?;
            }
            "tc_classic" => {
                // A clsact qdisc and a direct-action filter on this private namespace's lo;
                // both go away with the namespace when this thread ends.
                let p: &mut SchedClassifier = prog(ebpf, "lo_tc_egress")?;
                p.load()?;
                aya::programs::tc::qdisc_add_clsact("lo")?;
                p.attach_with_options(
                    "lo",
                    TcAttachType::Egress,
                    TcAttachOptions::Netlink(aya::programs::tc::NlOptions::default()),
                )?;
            }
            _ => return Err(format!("unknown kind {kind}").into()),
        }
        Ok(())
    });
    AttachTypeReport {
        kind,
        available: r.is_ok(),
        log: r
            .as_ref()
            .err()
            .and_then(|e| verifier_log(e.as_ref()))
            .filter(|_| verbose),
        error: r.err().map(|e| explain(e.as_ref(), kind)),
    }
}

/// The plan `trace` would use, found by the very code `trace` runs ([`Session::open`]) in a
/// throwaway network namespace, with `--xdp` so that XDP is tried too. Everything is detached (and
/// the namespace removed) before this returns.
fn plan_by_trying() -> Result<Vec<PlanRow>> {
    let sb = crate::netns::Sandbox::new("lotrace-doctor")?;
    let mut opts = SessionOptions::new(sb.netns.clone());
    opts.xdp = true;
    opts.keep_going = true;
    let session = Session::open(&opts)?;
    let rows = session
        .outcomes
        .iter()
        .zip(PLAN)
        .map(|(o, hp)| PlanRow {
            stage: o.stage.unwrap_or("(softirq state)").to_string(),
            hook: o.program,
            program: o.used,
            attach: o.kind,
            target: o.target.clone(),
            kernel_fn: hp.kernel_fn,
            required: o.required,
            available: o.attached,
            refused: o.refused.clone(),
        })
        .collect();
    drop(session);
    drop(sb);
    Ok(rows)
}

pub const KINDS: [&str; 8] = [
    "fentry",
    "kprobe",
    "tp_btf",
    "raw_tracepoint",
    "tracepoint",
    "xdp_generic",
    "tcx",
    "tc_classic",
];

/// `verbose`: keep each failure's whole verifier log.
pub fn run(verbose: bool) -> Result<DoctorReport> {
    let cleaned = if privileges().sufficient() {
        super::classic_tc::remove_leftovers()
    } else {
        Vec::new()
    };
    let privs = privileges();
    let btf = super::btf::kernel_has_btf();
    let mut reason = None;
    let not_tried = |why: &str| -> Vec<AttachTypeReport> {
        KINDS
            .iter()
            .map(|k| AttachTypeReport {
                kind: k,
                available: false,
                error: Some(format!("not tried: {why}")),
                log: None,
            })
            .collect()
    };
    let attach_types: Vec<AttachTypeReport> = if let Err(e) = privs.require() {
        reason = Some(e.to_string());
        not_tried("insufficient privileges")
    } else if let Err(e) = object::check_built() {
        reason = Some(e.to_string());
        not_tried("no eBPF object")
    } else {
        KINDS.iter().map(|k| probe(k, verbose)).collect()
    };
    if reason.is_none() && btf {
        // The offsets the programs need must resolve on this kernel.
        if let Err(e) = KernelBtf::load().and_then(|k| k.offsets()) {
            reason = Some(format!("kernel BTF lacks what lotrace needs: {e:#}"));
        }
    }
    let plan: Vec<PlanRow> = if reason.is_none() && btf {
        match plan_by_trying() {
            Ok(rows) => rows,
            Err(e) => {
                reason = Some(format!("cannot try the hook plan: {e:#}"));
                Vec::new()
            }
        }
    } else {
        Vec::new()
    };
    if reason.is_none() {
        if !btf {
            reason = Some(format!(
                "no kernel BTF ({VMLINUX_BTF}); lotrace needs CONFIG_DEBUG_INFO_BTF=y"
            ));
        } else if let Some(row) = plan.iter().find(|r| r.required && !r.available) {
            reason = Some(format!(
                "required hook {} ({}) cannot attach on this kernel: {}",
                row.hook,
                row.target,
                row.refused.last().map(|r| r.reason.as_str()).unwrap_or("refused")
            ));
        }
    }
    Ok(DoctorReport {
        kernel: crate::clock::kernel_release(),
        btf,
        lockdown: lockdown(),
        privileges: privs,
        attach_types,
        plan,
        lo_xdp: lo_xdp_report(),
        can_trace: reason.is_none(),
        reason,
        cleaned,
    })
}

pub fn render_text(r: &DoctorReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "kernel      {}", r.kernel);
    let _ = writeln!(
        s,
        "BTF         {}",
        if r.btf { "yes (/sys/kernel/btf/vmlinux)" } else { "NO" }
    );
    let _ = writeln!(s, "lockdown    {}", r.lockdown);
    let p = &r.privileges;
    let _ = writeln!(
        s,
        "privileges  euid {} | CAP_BPF {} | CAP_PERFMON {} | CAP_NET_ADMIN {}",
        p.euid,
        yn(p.cap_bpf),
        yn(p.cap_perfmon),
        yn(p.cap_net_admin)
    );
    let _ = writeln!(s, "\nattach types (tried for real, then detached):");
    for a in &r.attach_types {
        let _ = writeln!(
            s,
            "  {:<15} {:<4} {}",
            a.kind,
            if a.available { "yes" } else { "no" },
            a.error.as_deref().unwrap_or("")
        );
        if let Some(log) = &a.log {
            for l in log.lines() {
                let _ = writeln!(s, "      | {l}");
            }
        }
    }
    let _ = writeln!(
        s,
        "\nhook plan for tracing on this kernel (what `trace` attaches, tried for real, then detached):"
    );
    for row in &r.plan {
        let _ = writeln!(
            s,
            "  {:<17} {:<24} {:<14} {:<4} {}{}",
            row.stage,
            row.target,
            row.attach,
            if row.available { "ok" } else { "n/a" },
            row.kernel_fn,
            if row.required { " (required)" } else { "" }
        );
        for f in &row.refused {
            let _ = writeln!(s, "  {:<17}   {} {} refused: {}", "", f.kind, f.target, f.reason);
        }
    }
    let _ = writeln!(s, "\nlo XDP      {}", r.lo_xdp.plan);
    for c in &r.cleaned {
        let _ = writeln!(s, "cleaned     {c}");
    }
    let _ = writeln!(s);
    match &r.reason {
        None => {
            let _ = writeln!(s, "tracing: possible");
        }
        Some(why) => {
            let _ = writeln!(s, "tracing: NOT possible: {why}");
        }
    }
    s
}

fn yn(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

pub fn require_can_trace(r: &DoctorReport) -> Result<()> {
    match &r.reason {
        None => Ok(()),
        Some(why) => Err(anyhow!("{why}")),
    }
}
