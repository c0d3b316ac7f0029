//! Loading the programs, attaching the plan in one step, and reading counters.
//! Everything attaches through bpf_link / tcx / fd-owned raw tracepoints: when the process exits,
//! however it exits (even `kill -9`), the kernel closes the fds and detaches everything.
use std::collections::HashMap;

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray, RingBuf},
    programs::{
        BtfTracePoint, FEntry, KProbe, LinkOrder, RawTracePoint, SchedClassifier, TcAttachType, Xdp, XdpMode,
        tc::TcAttachOptions,
    },
};
use loopback_common::{DEFAULT_RING_BYTES, KernelOffsets, LOOPBACK_IFINDEX, counter};
use serde::Serialize;

use super::{btf::KernelBtf, object};
use crate::bpf::{classic_tc::ClassicTc, switch::Switch};
use crate::counters::{KernelCounters, ProgramCost};
use crate::hooks::{Attach, Candidate, Dir, HookPoint, PLAN};
use crate::netns::Netns;

/// Why the exit summary has no kernel cost when `--kernel-cost` was not given.
pub const NOT_REQUESTED: &str =
    "not requested: add --kernel-cost (the kernel's statistics add two clock reads to every BPF program run)";

#[derive(Clone, Debug)]
pub struct SessionOptions {
    pub netns: Netns,
    pub ring_bytes: u32,
    /// Also attach generic XDP on `lo`. Off by default: for every loopback skb (too little
    /// headroom) generic XDP makes the kernel copy the packet into a new skb and free the original
    /// (`do_xdp_generic` -> `skb_cow_data_for_xdp`), which costs a copy per packet and can drop a
    /// packet when that copy fails. tcx ingress sees the same bytes without touching the skb.
    pub xdp: bool,
    /// Attach the raw tracepoint twins instead of tp_btf (what lotrace falls back to per hook
    /// when tp_btf is refused; forcing it tests that path and helps with a broken tp_btf).
    pub raw_tp: bool,
    /// Turn on the kernel's per-program run-time statistics (`BPF_ENABLE_STATS`). Off by
    /// default: while on, the kernel reads the clock twice around every run of every BPF program
    /// on the machine, which on the loopback path costs more than some of our programs.
    pub kernel_cost: bool,
    /// Packet bytes to capture on lo (tc egress); 0 or up to `HDR_CAP`: the header capture only.
    pub snaplen: u32,
    /// Open even when a required hook cannot attach (`doctor`, which reports the whole plan).
    pub keep_going: bool,
}

impl SessionOptions {
    /// Bytes the tc egress record carries past the fixed header capture.
    pub fn snap_extra(&self) -> u32 {
        self.snaplen
            .saturating_sub(loopback_common::HDR_CAP as u32)
            .min(loopback_common::SNAP_EXTRA as u32 - 1)
    }

    pub fn new(netns: Netns) -> Self {
        Self {
            netns,
            ring_bytes: DEFAULT_RING_BYTES,
            xdp: false,
            raw_tp: false,
            kernel_cost: false,
            snaplen: 0,
            keep_going: false,
        }
    }
}

/// The XDP program already on `lo` in `netns` (id, name), if there is one.
pub fn lo_xdp_prog(netns: &Netns) -> Option<(u64, Option<String>)> {
    let v = netns.ip_json(&["-d", "link", "show", "dev", "lo"]).ok()?.ok()?;
    let prog = &v[0]["xdp"]["prog"];
    Some((prog["id"].as_u64()?, prog["name"].as_str().map(str::to_string)))
}

/// [`lo_xdp_prog`], described: "lo already carries XDP program 42 (name)".
pub fn lo_xdp(netns: &Netns) -> Option<String> {
    let (id, name) = lo_xdp_prog(netns)?;
    Some(format!(
        "lo already carries XDP program {id} ({})",
        name.as_deref().unwrap_or("unnamed")
    ))
}

/// What happened to one hook point.
#[derive(Clone, Debug, Serialize)]
pub struct AttachOutcome {
    /// The hook point's name ([`HookPoint::name`]).
    pub program: &'static str,
    /// The stage it serves (`None`: per-CPU softirq state).
    pub stage: Option<&'static str>,
    /// Attach kind of the candidate used (of the last one tried, when none attached).
    pub kind: &'static str,
    pub target: String,
    pub attached: bool,
    pub required: bool,
    /// The program actually attached (e.g. the raw tracepoint twin after a fallback).
    pub used: &'static str,
    /// Why the preferred candidates were not used, when a later one was (one line).
    pub fallback_reason: Option<String>,
    /// Every candidate tried before the one used (or all of them, when none attached), with why
    /// the kernel refused it.
    pub refused: Vec<Refusal>,
    /// False for hooks left out on purpose (XDP without `--xdp`): not a failure.
    pub requested: bool,
    pub error: Option<String>,
}

/// One candidate the kernel refused.
#[derive(Clone, Debug, Serialize)]
pub struct Refusal {
    pub kind: &'static str,
    pub program: &'static str,
    pub target: String,
    pub reason: String,
}

pub struct Session {
    pub ebpf: Ebpf,
    /// Holds kernel BPF run-time statistics on while the session lives (None if refused).
    stats_fd: Option<std::os::fd::OwnedFd>,
    /// Why the kernel refused run-time statistics, if it did.
    pub stats_error: Option<String>,
    pub outcomes: Vec<AttachOutcome>,
    pub drop_reasons: HashMap<u64, String>,
    pub netns: Netns,
    /// The `lo` programs attached as classic tc filters (kernels without tcx); removed on drop.
    pub classic_tc: ClassicTc,
    /// What lotrace cleaned up before attaching (filters a killed lotrace left behind).
    pub notes: Vec<String>,
    /// The programs' switch: off until [`Session::start`], off again in [`Session::stop`].
    pub switch: Switch,
}

/// Root, or CAP_BPF + CAP_PERFMON + CAP_NET_ADMIN (or CAP_SYS_ADMIN).
pub fn privileges() -> Privileges {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    let euid = unsafe { libc::geteuid() };
    let cap_eff = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0);
    let has = |bit: u32| cap_eff & (1u64 << bit) != 0;
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    Privileges {
        euid,
        cap_bpf: has(CAP_BPF) || has(CAP_SYS_ADMIN),
        cap_perfmon: has(CAP_PERFMON) || has(CAP_SYS_ADMIN),
        cap_net_admin: has(CAP_NET_ADMIN),
    }
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Privileges {
    pub euid: u32,
    pub cap_bpf: bool,
    pub cap_perfmon: bool,
    pub cap_net_admin: bool,
}

impl Privileges {
    pub fn sufficient(&self) -> bool {
        self.cap_bpf && self.cap_perfmon && self.cap_net_admin
    }
    pub fn require(&self) -> Result<()> {
        if !self.sufficient() {
            bail!("lotrace needs root (or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN): run it with sudo");
        }
        Ok(())
    }

    /// What the agent needs: it attaches only tracepoints (no tc, no XDP), so CAP_BPF and
    /// CAP_PERFMON (CAP_SYS_PTRACE, to see other processes' namespaces, is checked by use).
    pub fn require_tracing(&self) -> Result<()> {
        if !(self.cap_bpf && self.cap_perfmon) {
            bail!("lotrace agent needs root (or CAP_BPF and CAP_PERFMON): run it with sudo");
        }
        Ok(())
    }
}

/// The errno inside an aya/io error chain, if any.
pub fn errno_of(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(n) = io.raw_os_error()
        {
            return Some(n);
        }
        if let Some(aya::programs::ProgramError::SyscallError(s)) = err.downcast_ref::<aya::programs::ProgramError>()
            && let Some(n) = s.io_error.raw_os_error()
        {
            return Some(n);
        }
        if let Some(aya::programs::ProgramError::LoadError { io_error, .. }) =
            err.downcast_ref::<aya::programs::ProgramError>()
            && let Some(n) = io_error.raw_os_error()
        {
            return Some(n);
        }
        cur = err.source();
    }
    None
}

/// A one-line explanation of an attach/load failure: errno name and plain-language cause.
/// The verifier's log inside an error's text, if there is one (for `doctor --verbose`).
pub fn verifier_log(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let text = e.to_string();
    text.split_once("Verifier output:")
        .map(|(_, log)| log.trim().to_string())
}

/// An error's text on one line: a verifier log (dozens of lines of register states) is cut to
/// the line that says why, e.g. "unknown func bpf_get_current_pid_tgid#14".
pub fn one_line(text: &str) -> String {
    let Some((head, log)) = text.split_once("Verifier output:") else {
        return text.split_whitespace().collect::<Vec<_>>().join(" ");
    };
    let lines: Vec<&str> = log.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    // The reason is the last line before the statistics the verifier prints at the end.
    let end = lines
        .iter()
        .position(|l| l.starts_with("verification time") || l.starts_with("processed "))
        .unwrap_or(lines.len());
    let why = lines[..end]
        .iter()
        .rev()
        .find(|l| {
            !l.starts_with(';')
                && !l.starts_with(|c: char| c.is_ascii_digit())
                && !l.starts_with("R")
                && !l.starts_with("frame")
        })
        .copied();
    match why {
        Some(why) => format!("{} verifier: {why}", head.trim().trim_end_matches('.')),
        // An empty log (the kernel refused before verifying): the errno says it all.
        None if lines.is_empty() => head.trim().trim_end_matches('.').to_string(),
        None => format!(
            "{} (verifier log: `lotrace doctor --verbose`)",
            head.trim().trim_end_matches('.')
        ),
    }
}

pub fn explain(e: &(dyn std::error::Error + 'static), kind: &str) -> String {
    let msg = one_line(&e.to_string());
    match errno_of(e) {
        Some(libc::EPERM) => format!(
            "EPERM: the kernel refused ({}): {msg}",
            match kind {
                "fentry" | "fexit" => "ftrace function patching is not permitted on this kernel",
                _ => "missing privilege or a lockdown/LSM policy",
            }
        ),
        Some(libc::ENOENT) if kind == "kprobe" => {
            format!("ENOENT: no kprobe PMU on this kernel (CONFIG_KPROBES unset): {msg}")
        }
        Some(libc::ENOENT) => format!("ENOENT: the hook does not exist on this kernel: {msg}"),
        Some(libc::EBUSY) | Some(libc::EEXIST) => {
            format!("EBUSY: another program is already attached there; lotrace never replaces it: {msg}")
        }
        Some(libc::EOPNOTSUPP) | Some(ENOTSUPP) => {
            format!("EOPNOTSUPP: this attach type is not supported by this kernel: {msg}")
        }
        Some(libc::EINVAL) => format!("EINVAL: the kernel rejected the request (too old or misconfigured): {msg}"),
        Some(libc::ENODEV) => format!("ENODEV: no such device: {msg}"),
        Some(n) => format!("errno {n}: {msg}"),
        None => msg,
    }
}

/// Kernel-internal ENOTSUPP (524), which BPF returns for some unsupported attach types.
const ENOTSUPP: i32 = 524;

impl Session {
    /// Loads the object with this kernel's struct offsets and the target namespace, and attaches
    /// the whole plan. Required hooks that fail abort with the reason; optional ones are reported.
    pub fn open(opts: &SessionOptions) -> Result<Self> {
        let obj = object::check_built()?;
        privileges().require()?;
        let kbtf = KernelBtf::load()?;
        let offsets: KernelOffsets = kbtf.offsets()?;
        let drop_reasons = kbtf.drop_reasons();
        let shape = KernelShape::of(Some(&kbtf));
        // Free btf-rs's parse before aya parses the same BTF: the two together set the process's
        // peak memory.
        drop(kbtf);
        let btf = aya::Btf::from_sys_fs().context("parsing kernel BTF for tp_btf programs")?;
        let mut loader = EbpfLoader::new();
        shape.apply(&mut loader);
        let mut ebpf = loader
            .override_global("OFFSETS", &offsets, true)
            .override_global("TARGET_NETNS", &opts.netns.inode, true)
            .override_global("SEND_SYSCALLS", &send_syscalls(), true)
            .override_global("SNAP_EXTRA_BYTES", &opts.snap_extra(), true)
            .map_max_entries("EVENTS", opts.ring_bytes)
            .load(obj)
            .map_err(|e| anyhow!("loading the eBPF object failed: {}", explain(&e, "load")))?;
        // Classic tc filters a killed lotrace left behind go first (they are not fd-owned).
        let notes = crate::bpf::classic_tc::remove_leftovers();
        let mut classic_tc = ClassicTc::new(&opts.netns);
        let mut kind_refused = HashMap::new();
        let outcomes: Vec<AttachOutcome> = PLAN
            .iter()
            .map(|hp| attach_point(&mut ebpf, hp, opts, &btf, &mut classic_tc, &mut kind_refused))
            .collect();
        if !opts.keep_going
            && let Some(o) = outcomes.iter().find(|o| o.required && !o.attached)
        {
            bail!(
                "cannot attach {} ({}): {}",
                o.program,
                o.target,
                o.error.as_deref().unwrap_or("refused")
            );
        }
        let switch = Switch::map(ebpf.map("ON").ok_or_else(|| anyhow!("ON map missing"))?)?;
        // The receive hook stages the lo receive chain into one record only while our tc ingress
        // program is there to close it.
        if outcomes.iter().any(|o| o.attached && o.program == "lo_tc_ingress") {
            let map = ebpf
                .map_mut("LO_INGRESS")
                .ok_or_else(|| anyhow!("LO_INGRESS map missing"))?;
            let mut flag: Array<&mut MapData, u32> = Array::try_from(map)?;
            flag.set(0, 1, 0).context("setting LO_INGRESS")?;
        }
        // Run time and count per program, for the exit summary (the kernel keeps counting only
        // while some fd holds stats on; a few ns per program run).
        let (stats_fd, stats_error) = if !opts.kernel_cost {
            (None, Some(NOT_REQUESTED.to_string()))
        } else {
            match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
                Ok(fd) => (Some(fd), None),
                Err(e) => (None, Some(explain(&e, "stats"))),
            }
        };
        Ok(Self {
            ebpf,
            stats_fd,
            stats_error,
            outcomes,
            drop_reasons,
            netns: opts.netns.clone(),
            classic_tc,
            notes,
            switch,
        })
    }

    /// Every attached program starts at once (until now they returned at their first
    /// instruction: no packet is caught by the hooks attached first and missed by the rest).
    pub fn start(&mut self) {
        self.switch.on();
    }

    /// Stops every program and collects what they left: turns the switch off, waits until no
    /// program run is in flight, drains the ring through `drain` (which returns how many events
    /// the reader has received in all) and reads the kernel's counters. The kernel's count of
    /// submitted events then equals the reader's: nothing can be submitted after the last drain.
    /// Where the kernel cannot confirm that the runs are over (`membarrier` refused), it drains
    /// until the counts agree, for up to a second.
    pub fn stop(&mut self, mut drain: impl FnMut() -> Result<u64>) -> Result<KernelCounters> {
        let settled = self.switch.off();
        let mut received = drain()?;
        let mut kernel = self.counters()?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while !settled && kernel.emitted > received && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
            received = drain()?;
            kernel = self.counters()?;
        }
        Ok(kernel)
    }

    pub fn take_ring(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .ok_or_else(|| anyhow!("EVENTS map missing"))?;
        Ok(RingBuf::try_from(map)?)
    }

    pub fn counters(&self) -> Result<KernelCounters> {
        let map = self
            .ebpf
            .map("COUNTERS")
            .ok_or_else(|| anyhow!("COUNTERS map missing"))?;
        let arr: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
        let sum = |i: u32| -> Result<u64> { Ok(arr.get(&i, 0)?.iter().sum()) };
        Ok(KernelCounters {
            ring_lost: sum(counter::RING_LOST)?,
            scope_full: sum(counter::SCOPE_FULL)?,
            read_failed: sum(counter::READ_FAILED)?,
            emitted: sum(counter::EMITTED)?,
            skipped_runs: self
                .attached_programs()
                .filter_map(|(_, p)| recursion_misses(std::os::fd::AsFd::as_fd(p.fd().ok()?)))
                .sum(),
        })
    }

    /// Every attached program, with its name in the object.
    fn attached_programs(&self) -> impl Iterator<Item = (&str, &aya::programs::Program)> {
        self.outcomes
            .iter()
            .filter(|o| o.attached)
            .filter_map(|o| Some((o.used, self.ebpf.program(o.used)?)))
    }

    /// Run count and time of every attached program (empty when the kernel refused statistics).
    pub fn program_costs(&self) -> Vec<ProgramCost> {
        if self.stats_fd.is_none() {
            return Vec::new();
        }
        self.attached_programs()
            .filter_map(|(used, p)| {
                let info = p.info().ok()?;
                Some(ProgramCost {
                    program: used.to_string(),
                    runs: info.run_count(),
                    total_ns: info.run_time().as_nanos() as u64,
                })
            })
            .collect()
    }

    /// The capabilities lotrace must keep after attaching: those that remove classic tc filters
    /// at exit, when it added some; none otherwise.
    pub fn caps_to_keep(&self) -> u64 {
        if self.classic_tc.is_empty() {
            0
        } else {
            crate::caps::CLASSIC_TC_CAPS
        }
    }

    /// Hook points that could not be attached (optional ones; required ones abort `open`).
    /// Hooks left out on purpose are not missing.
    pub fn missing(&self) -> impl Iterator<Item = &AttachOutcome> {
        self.outcomes.iter().filter(|o| o.requested && !o.attached)
    }
}

/// The hooks that could not attach, on one line: `name (why)`, hooks refused for the same
/// reason grouped (`a, b (why)`), e.g. every fentry/kprobe hook on a kernel with neither.
pub fn describe_missing(outcomes: &[AttachOutcome]) -> String {
    let mut groups: Vec<(Vec<&str>, &str)> = Vec::new();
    for o in outcomes.iter().filter(|o| o.requested && !o.attached) {
        let why = o.error.as_deref().unwrap_or("?");
        match groups.iter_mut().find(|(_, w)| *w == why) {
            Some((names, _)) => names.push(o.program),
            None => groups.push((vec![o.program], why)),
        }
    }
    groups
        .iter()
        .map(|(names, why)| format!("{} ({why})", names.join(", ")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// sendto, sendmsg, sendmmsg on the host architecture (unused slots: u64::MAX).
pub fn send_syscalls() -> [u64; loopback_common::SEND_SYSCALL_SLOTS] {
    let mut nrs = [u64::MAX; loopback_common::SEND_SYSCALL_SLOTS];
    let ours = [libc::SYS_sendto, libc::SYS_sendmsg, libc::SYS_sendmmsg];
    for (slot, nr) in nrs.iter_mut().zip(ours) {
        *slot = nr as u64;
    }
    nrs
}

type DynErr = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Tries `hp`'s candidates in order until one loads and attaches; records why each earlier one
/// was refused. Hooks left out on purpose (XDP without `--xdp`, XDP already on `lo`) are not tried.
fn attach_point(
    ebpf: &mut Ebpf,
    hp: &HookPoint,
    opts: &SessionOptions,
    btf: &aya::Btf,
    classic: &mut ClassicTc,
    kind_refused: &mut HashMap<&'static str, String>,
) -> AttachOutcome {
    let first = hp.candidates[0];
    let mut out = AttachOutcome {
        program: hp.name,
        stage: hp.hook.map(|h| crate::hooks::StageKind::of(h).as_str()),
        kind: first.attach.kind(),
        target: first.attach.target(),
        attached: false,
        required: hp.required,
        used: first.program,
        fallback_reason: None,
        refused: Vec::new(),
        requested: true,
        error: None,
    };
    if first.attach == Attach::XdpLo {
        let why = if !opts.xdp {
            out.requested = false;
            Some("not requested (--xdp): generic XDP would make the kernel copy every lo packet".to_string())
        } else {
            // Never replace someone else's program: XDP on a device is exclusive.
            lo_xdp(&opts.netns).map(|x| format!("{x}: left in place; ingress bytes come from tc"))
        };
        if why.is_some() {
            out.error = why;
            return out;
        }
    }
    // Fault injection (README, Tests): LOTRACE_FAULT=refuse-hook:NAME makes every candidate of
    // that hook fail as on a kernel without it, to test how lotrace degrades.
    if crate::fault::refused_hook() == Some(hp.name) {
        out.error = Some("refused (LOTRACE_FAULT: simulating a kernel without this hook)".into());
        return out;
    }
    for cand in hp.candidates {
        let kind = cand.attach.kind();
        let res = if opts.raw_tp && matches!(cand.attach, Attach::TpBtf(_)) {
            Err("raw tracepoints requested (--raw-tp)".to_string())
        } else if let Some(why) = kind_refused.get(kind) {
            // The kernel refused this attach kind as a whole for an earlier hook: the same
            // answer, without loading and verifying one more program (start-up time).
            Err(why.clone())
        } else {
            attach_candidate(ebpf, cand, btf, &opts.netns, classic).inspect_err(|why| {
                if refuses_whole_kind(kind, why) {
                    kind_refused.insert(kind, why.clone());
                }
            })
        };
        (out.kind, out.target, out.used) = (kind, cand.attach.target(), cand.program);
        match res {
            Ok(()) => {
                out.attached = true;
                out.fallback_reason = (!out.refused.is_empty()).then(|| refusals_line(&out.refused));
                return out;
            }
            Err(reason) => out.refused.push(Refusal {
                kind,
                program: cand.program,
                target: cand.attach.target(),
                reason,
            }),
        }
    }
    out.error = Some(match out.refused.as_slice() {
        [only] => only.reason.clone(),
        all => refusals_line(all),
    });
    out
}

/// Refused candidates on one line: `kind: reason; kind: reason`.
fn refusals_line(refused: &[Refusal]) -> String {
    refused
        .iter()
        .map(|r| format!("{}: {}", r.kind, r.reason))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Whether refusal `why` of a `kind` attach holds for every hook of that kind on this kernel:
/// fentry refused with EPERM (no ftrace patching), kprobes without a kprobe PMU. Other refusals
/// (a function missing or inlined, a verifier complaint) are about one hook and are not reused.
fn refuses_whole_kind(kind: &str, why: &str) -> bool {
    match kind {
        "fentry" => why.starts_with("EPERM"),
        "kprobe" => why.contains("no kprobe PMU"),
        _ => false,
    }
}

/// Loads (if not yet loaded) and attaches one candidate; the error as one line.
fn attach_candidate(
    ebpf: &mut Ebpf,
    cand: &Candidate,
    btf: &aya::Btf,
    netns: &Netns,
    classic: &mut ClassicTc,
) -> Result<(), String> {
    let kind = cand.attach.kind();
    let Some(prog) = ebpf.program_mut(cand.program) else {
        return Err(format!("program {} missing from the eBPF object", cand.program));
    };
    let r: Result<(), DynErr> = (|| {
        match cand.attach {
            Attach::Fentry(f) => {
                if *crate::fault::get() == crate::fault::Fault::NoFentry {
                    return Err("refused (LOTRACE_FAULT=no-fentry: simulating a kernel without fentry)".into());
                }
                let p: &mut FEntry = prog.try_into()?;
                p.load(f, btf)?;
                p.attach()?;
            }
            Attach::Kprobe(f) => {
                let p: &mut KProbe = prog.try_into()?;
                p.load()?;
                p.attach(f, 0)?;
            }
            Attach::TpBtf(tp) => {
                let p: &mut BtfTracePoint = prog.try_into()?;
                p.load(tp, btf)?;
                p.attach()?;
            }
            Attach::RawTp(tp) => {
                let p: &mut RawTracePoint = prog.try_into()?;
                p.load()?;
                p.attach(tp)?;
            }
            Attach::XdpLo => {
                let p: &mut Xdp = prog.try_into()?;
                p.load()?;
                // The link is created in the target namespace, on its lo (ifindex 1 in every netns).
                netns
                    .run(|| p.attach_to_if_index(LOOPBACK_IFINDEX, XdpMode::Skb).map(|_| ()))
                    .map_err(|e| -> DynErr { e.into() })??;
            }
            Attach::TcxLo(dir) => {
                let p: &mut SchedClassifier = prog.try_into()?;
                p.load()?;
                if *crate::fault::get() == crate::fault::Fault::NoTcx {
                    return Err("refused (LOTRACE_FAULT=no-tcx: simulating a kernel without tcx)".into());
                }
                // tcx links append after existing programs and never replace them.
                netns
                    .run(|| {
                        p.attach_with_options("lo", tc_dir(dir), TcAttachOptions::TcxOrder(LinkOrder::default()))
                            .map(|_| ())
                    })
                    .map_err(|e| -> DynErr { e.into() })??;
            }
            Attach::ClassicTcLo(dir) => {
                // The program may already be loaded by the tcx attempt.
                let p: &mut SchedClassifier = prog.try_into()?;
                if p.fd().is_err() {
                    p.load()?;
                }
                classic
                    .attach(p, tc_dir(dir))
                    .map_err(|e| -> DynErr { one_line(&format!("{e:#}")).into() })?;
            }
        }
        Ok(())
    })();
    r.map_err(|e| explain(e.as_ref(), kind))
}

fn tc_dir(d: Dir) -> TcAttachType {
    match d {
        Dir::Egress => TcAttachType::Egress,
        Dir::Ingress => TcAttachType::Ingress,
    }
}

/// What the programs must know about the running kernel's shape before they are loaded (the
/// verifier sees these read-only globals as constants and drops what the kernel cannot serve).
/// Found by reading its BTF and by trying, never from its version number. `trace`, `prove`,
/// `tui` and `doctor` all load the object with the same shape.
#[derive(Clone, Copy, Debug)]
pub struct KernelShape {
    /// Arguments of the `consume_skb` tracepoint (2 since `location` was added, else 1).
    pub consume_skb_args: u32,
    /// Arguments of the `kfree_skb` tracepoint (2 to 4).
    pub kfree_skb_args: u32,
    /// tc and XDP programs may call the task helpers (1) or not (0).
    pub lo_task_helpers: u32,
    /// Tests only (`LOTRACE_FAULT=miss-split-free`): 1 makes the programs act as if the kernel
    /// skipped the `consume_skb` program at every GSO split (see `MISS_SPLIT_FREE`).
    pub miss_split_free: u32,
}

impl KernelShape {
    /// From the kernel's BTF (None: unknown, the compiled-in defaults) and a load attempt.
    pub fn of(btf: Option<&KernelBtf>) -> Self {
        let args = |tp: &str, default: u32| btf.and_then(|b| b.tracepoint_args(tp)).unwrap_or(default);
        Self {
            consume_skb_args: args("consume_skb", 2),
            kfree_skb_args: args("kfree_skb", 3),
            lo_task_helpers: u32::from(lo_task_helpers_allowed()),
            miss_split_free: u32::from(*crate::fault::get() == crate::fault::Fault::MissSplitFree),
        }
    }

    pub fn apply<'a>(&'a self, loader: &mut EbpfLoader<'a>) {
        loader
            .override_global("CONSUME_SKB_ARGS", &self.consume_skb_args, true)
            .override_global("KFREE_SKB_ARGS", &self.kfree_skb_args, true)
            .override_global("LO_TASK_HELPERS", &self.lo_task_helpers, true)
            .override_global("MISS_SPLIT_FREE", &self.miss_split_free, true);
    }
}

/// How many runs of the program the kernel skipped because it was already running on that CPU
/// (`recursion_misses` of `struct bpf_prog_info`, through `BPF_OBJ_GET_INFO_BY_FD`; aya does not
/// expose it); None when the kernel does not say (older than the member, Linux 5.12).
fn recursion_misses(fd: std::os::fd::BorrowedFd<'_>) -> Option<u64> {
    use std::os::fd::AsRawFd;

    use aya_obj::generated::{bpf_attr, bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, bpf_prog_info};
    // SAFETY: plain C structs of integers, for which all zeroes is a valid value.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.info.bpf_fd = fd.as_raw_fd() as u32;
    attr.info.info_len = std::mem::size_of::<bpf_prog_info>() as u32;
    attr.info.info = &mut info as *mut bpf_prog_info as u64;
    // SAFETY: `attr` is a valid bpf_attr for the command; the kernel writes at most `info_len`
    // bytes to `info`, which outlives the call, and the length it filled back into `attr`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD as libc::c_long,
            &mut attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>() as u32,
        )
    };
    // SAFETY: the union's `info` member is the one written above and by the kernel.
    let filled = unsafe { attr.info.info_len } as usize;
    let end = std::mem::offset_of!(bpf_prog_info, recursion_misses) + 8;
    (rc == 0 && filled >= end).then_some(info.recursion_misses)
}

/// `struct bpf_insn`: code, dst:4 | src:4 (`regs`), off (0 here), imm.
fn insn(code: u8, regs: u8, imm: i32) -> [u8; 8] {
    let i = imm.to_le_bytes();
    [code, regs, 0, 0, i[0], i[1], i[2], i[3]]
}

/// Whether the kernel accepts `insns` as a program of type `prog_type` (loaded, then closed).
fn loads(prog_type: u32, insns: &[[u8; 8]]) -> bool {
    const BPF_PROG_LOAD: libc::c_long = 5;
    let prog: Vec<u8> = insns.concat();
    let license = c"GPL";
    // union bpf_attr for BPF_PROG_LOAD: prog_type, insn_cnt, insns, license; the rest zero.
    let mut attr = [0u8; 144];
    attr[0..4].copy_from_slice(&prog_type.to_ne_bytes());
    attr[4..8].copy_from_slice(&(insns.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(prog.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    // SAFETY: `attr` is a valid bpf_attr image whose pointers outlive the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, attr.as_ptr(), attr.len() as u32) };
    if fd >= 0 {
        // SAFETY: the kernel just returned this fd to us; nothing else owns it.
        unsafe { libc::close(fd as i32) };
    }
    fd >= 0
}

const SCHED_CLS: u32 = 3;
const XDP: u32 = 6;

/// Whether this kernel lets networking programs (tc and XDP, the `lo` programs) call
/// `bpf_get_current_comm` and `bpf_get_current_pid_tgid`: found by loading, for each of the two
/// types, a program that calls both and returns. Refused means no: Debian 12's 6.1 refuses
/// both, 6.12 the name.
pub fn lo_task_helpers_allowed() -> bool {
    const GET_CURRENT_PID_TGID: i32 = 14;
    const GET_CURRENT_COMM: i32 = 16;
    let prog = [
        insn(0xbf, 0xa1, 0),                 // r1 = r10
        insn(0x07, 0x01, -16),               // r1 += -16
        insn(0xb7, 0x02, 16),                // r2 = 16
        insn(0x85, 0, GET_CURRENT_COMM),     // call bpf_get_current_comm(r1, r2)
        insn(0x85, 0, GET_CURRENT_PID_TGID), // call bpf_get_current_pid_tgid()
        insn(0xb7, 0, 0),                    // r0 = 0
        insn(0x95, 0, 0),                    // exit
    ];
    [SCHED_CLS, XDP].iter().all(|&ty| loads(ty, &prog))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recursion_misses_is_read_where_the_uapi_puts_it() {
        // Offset 208 of the uapi's struct bpf_prog_info: the bindings read are the kernel's.
        assert_eq!(
            std::mem::offset_of!(aya_obj::generated::bpf_prog_info, recursion_misses),
            208
        );
    }

    #[test]
    fn a_verifier_log_becomes_its_reason_on_one_line() {
        let text = "the BPF_PROG_LOAD syscall returned Invalid argument (os error 22). Verifier output: 0: R1=ctx(off=0,imm=0) R10=fp0\n; let skb = ctx.skb\n1: (bf) r7 = r1\n R6=pkt(off=0)\nunknown func bpf_get_current_pid_tgid#14\nverification time 3248 usec\nstack depth 72\nprocessed 172 insns\n";
        assert_eq!(
            one_line(text),
            "the BPF_PROG_LOAD syscall returned Invalid argument (os error 22) verifier: unknown func bpf_get_current_pid_tgid#14"
        );
        assert_eq!(one_line("plain\nerror"), "plain error");
        assert_eq!(
            one_line("refused (os error 1). Verifier output: "),
            "refused (os error 1)"
        );
    }

    /// The probe mechanism answers both ways (as root): a program that only returns loads, one
    /// calling a helper id no kernel has is refused. So a "no" from the task-helper probe is the
    /// kernel's refusal, not a malformed request.
    #[test]
    fn a_probe_program_loads_or_is_refused_by_the_kernel() {
        // SAFETY: geteuid(2) cannot fail and touches no memory.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let ret = [insn(0xb7, 0, 0), insn(0x95, 0, 0)];
        let bogus = [insn(0x85, 0, 99_999), insn(0xb7, 0, 0), insn(0x95, 0, 0)];
        for ty in [SCHED_CLS, XDP] {
            assert!(loads(ty, &ret), "type {ty}");
            assert!(!loads(ty, &bogus), "type {ty}");
        }
    }
}
