//! The agent's kernel side: the `agent_*` programs of the one eBPF object, loaded with this
//! kernel's offsets and attached as tp_btf (raw tracepoint where the kernel refuses tp_btf).
//! Every attachment is a global tracepoint link owned by a file descriptor: nothing is attached
//! per namespace, so nothing can stay behind in one, however the agent ends (kill -9 included).
use std::collections::{BTreeSet, HashMap};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap},
    programs::{BtfTracePoint, RawTracePoint},
};
use loopback_common::{
    KernelOffsets,
    agent::{DropKey, LocalAddr, NetnsCounters},
    counter,
};

use crate::bpf::{
    btf::KernelBtf,
    object,
    session::{KernelShape, explain, privileges},
    switch::Switch,
};
use crate::counters::ProgramCost;

/// The tracepoints the agent counts at, and whether it cannot count without them.
pub const HOOKS: [(&str, bool); 7] = [
    ("netif_receive_skb", true),
    ("net_dev_start_xmit", false),
    ("netif_rx", false),
    ("kfree_skb", false),
    ("consume_skb", false),
    ("skb_copy_datagram_iovec", false),
    // UDP delivery: a socket's read (6.4+; older kernels have no such tracepoint).
    ("sock_recv_length", false),
];

#[derive(Clone, Debug)]
pub struct Bounds {
    pub max_netns: u32,
    pub max_drop_series: u32,
    pub max_in_flight: u32,
    pub max_local_addrs: u32,
}

/// A hook the agent could not attach, and why (exported as a metric).
#[derive(Clone, Debug)]
pub struct AttachFailure {
    pub hook: &'static str,
    pub reason: String,
}

/// A hook attached, and how.
#[derive(Clone, Debug)]
pub struct Attached {
    pub hook: &'static str,
    pub kind: &'static str,
    pub program: String,
}

pub struct AgentBpf {
    ebpf: Ebpf,
    switch: Switch,
    stats_fd: Option<std::os::fd::OwnedFd>,
    pub attached: Vec<Attached>,
    pub failures: Vec<AttachFailure>,
    pub drop_reasons: HashMap<u64, String>,
}

/// The maps user space reads at each scrape (taken out of the object so that the scraper can
/// own them apart from the programs).
pub struct AgentMaps {
    pub netns: PerCpuHashMap<MapData, u32, NetnsCounters>,
    pub drops: PerCpuHashMap<MapData, DropKey, u64>,
    pub allow: BpfHashMap<MapData, u32, u8>,
    pub local: BpfHashMap<MapData, LocalAddr, u8>,
    /// Namespace addresses that did not fit in `local` (`--max-local-addrs`).
    pub local_full: u64,
    pub counters: PerCpuArray<MapData, u64>,
}

impl AgentBpf {
    pub fn open(bounds: &Bounds, filter: bool, raw_tp: bool, kernel_cost: bool) -> Result<Self> {
        let obj = object::check_built()?;
        privileges().require_tracing()?;
        let kbtf = KernelBtf::load()?;
        let offsets: KernelOffsets = kbtf.offsets()?;
        let drop_reasons = kbtf.drop_reasons();
        let shape = KernelShape::of(Some(&kbtf));
        drop(kbtf);
        let btf = aya::Btf::from_sys_fs().context("parsing kernel BTF for tp_btf programs")?;
        let filter = u32::from(filter);
        let no_socket = drop_reasons
            .iter()
            .find(|(_, n)| n.as_str() == "NO_SOCKET")
            .map_or(0, |(v, _)| *v as u32);
        let mut loader = EbpfLoader::new();
        shape.apply(&mut loader);
        let ebpf = loader
            .override_global("OFFSETS", &offsets, true)
            .override_global("AGENT_FILTER", &filter, true)
            .override_global("AGENT_NO_SOCKET", &no_socket, true)
            // The tracing maps are not used in agent mode: their smallest sizes.
            .map_max_entries("EVENTS", 4096)
            .map_max_entries("SCOPE", 256)
            .map_max_entries("AGENT_NETNS", bounds.max_netns)
            .map_max_entries("AGENT_ALLOW", bounds.max_netns)
            .map_max_entries("AGENT_DROPS", bounds.max_drop_series)
            .map_max_entries("AGENT_FLIGHT", bounds.max_in_flight)
            .map_max_entries("AGENT_LOCAL", bounds.max_local_addrs)
            .load(obj)
            .map_err(|e| anyhow!("loading the eBPF object failed: {}", explain(&e, "load")))?;
        let switch = Switch::map(ebpf.map("ON").ok_or_else(|| anyhow!("ON map missing"))?)?;
        let mut me = Self {
            ebpf,
            switch,
            stats_fd: None,
            attached: Vec::new(),
            failures: Vec::new(),
            drop_reasons,
        };
        for (hook, required) in HOOKS {
            match me.attach(hook, &btf, raw_tp) {
                Ok(a) => me.attached.push(a),
                Err(reason) if required => bail!("cannot attach the agent's {hook} tracepoint: {reason}"),
                Err(reason) => me.failures.push(AttachFailure { hook, reason }),
            }
        }
        if kernel_cost {
            me.stats_fd = Some(
                aya::sys::enable_stats(aya::sys::Stats::RunTime)
                    .map_err(|e| anyhow!("--kernel-cost: {}", explain(&e, "stats")))?,
            );
        }
        Ok(me)
    }

    /// tp_btf first; the raw tracepoint twin when the kernel refuses it (decided by trying).
    fn attach(&mut self, hook: &'static str, btf: &aya::Btf, raw_tp: bool) -> Result<Attached, String> {
        let btf_name = format!("agent_{hook}");
        let raw_name = format!("agent_raw_{hook}");
        let mut refused = String::new();
        if !raw_tp {
            let r: Result<(), Box<dyn std::error::Error>> = (|| {
                let p: &mut BtfTracePoint = self
                    .ebpf
                    .program_mut(&btf_name)
                    .ok_or("program missing from the eBPF object")?
                    .try_into()?;
                p.load(hook, btf)?;
                p.attach()?;
                Ok(())
            })();
            match r {
                Ok(()) => {
                    return Ok(Attached {
                        hook,
                        kind: "tp_btf",
                        program: btf_name,
                    });
                }
                Err(e) => refused = format!("tp_btf: {}; ", explain(e.as_ref(), "tp_btf")),
            }
        }
        let r: Result<(), Box<dyn std::error::Error>> = (|| {
            let p: &mut RawTracePoint = self
                .ebpf
                .program_mut(&raw_name)
                .ok_or("program missing from the eBPF object")?
                .try_into()?;
            p.load()?;
            p.attach(hook)?;
            Ok(())
        })();
        match r {
            Ok(()) => Ok(Attached {
                hook,
                kind: "raw_tracepoint",
                program: raw_name,
            }),
            Err(e) => Err(format!(
                "{refused}raw_tracepoint: {}",
                explain(e.as_ref(), "raw_tracepoint")
            )),
        }
    }

    pub fn take_maps(&mut self) -> Result<AgentMaps> {
        let mut take = |name: &str| {
            self.ebpf
                .take_map(name)
                .ok_or_else(|| anyhow!("{name} map missing from the eBPF object"))
        };
        Ok(AgentMaps {
            netns: PerCpuHashMap::try_from(take("AGENT_NETNS")?)?,
            drops: PerCpuHashMap::try_from(take("AGENT_DROPS")?)?,
            allow: BpfHashMap::try_from(take("AGENT_ALLOW")?)?,
            local: BpfHashMap::try_from(take("AGENT_LOCAL")?)?,
            local_full: 0,
            counters: PerCpuArray::try_from(take("COUNTERS")?)?,
        })
    }

    pub fn start(&mut self) {
        self.switch.on();
    }

    pub fn stop(&mut self) {
        self.switch.off();
    }

    /// Run count and time per attached program (`--kernel-cost`), else empty.
    pub fn program_costs(&self) -> Vec<ProgramCost> {
        if self.stats_fd.is_none() {
            return Vec::new();
        }
        self.attached
            .iter()
            .filter_map(|a| {
                let info = self.ebpf.program(&a.program)?.info().ok()?;
                Some(ProgramCost {
                    program: a.program.clone(),
                    runs: info.run_count(),
                    total_ns: info.run_time().as_nanos() as u64,
                })
            })
            .collect()
    }
}

impl AgentMaps {
    /// A loss counter summed over CPUs.
    pub fn counter(&self, idx: u32) -> u64 {
        self.counters.get(&idx, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }

    /// Every namespace the kernel has counted, its counters summed over CPUs.
    pub fn netns_totals(&self) -> Vec<(u32, NetnsCounters)> {
        self.netns
            .iter()
            .filter_map(|r| r.ok())
            .map(|(k, per_cpu)| {
                let mut sum = NetnsCounters::ZERO;
                for c in per_cpu.iter() {
                    sum.add(c);
                }
                (k, sum)
            })
            .collect()
    }

    pub fn drop_totals(&self) -> Vec<(DropKey, u64)> {
        self.drops
            .iter()
            .filter_map(|r| r.ok())
            .map(|(k, per_cpu)| (k, per_cpu.iter().sum()))
            .collect()
    }

    /// Forgets a namespace that went away: its counters and drop series.
    pub fn release(&mut self, netns: u32) {
        let _ = self.netns.remove(&netns);
        let keys: Vec<DropKey> = self
            .drops
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.netns == netns)
            .collect();
        for k in keys {
            let _ = self.drops.remove(&k);
        }
        let _ = self.allow.remove(&netns);
    }

    pub fn overflow(&self) -> [(&'static str, u64); 4] {
        [
            ("netns", self.counter(counter::AGENT_NETNS_FULL)),
            ("drops", self.counter(counter::AGENT_DROPS_FULL)),
            ("in_flight", self.counter(counter::AGENT_FLIGHT_FULL)),
            ("local_addrs", self.local_full),
        ]
    }

    /// Makes `local` hold exactly `want` (a namespace's addresses, after a read): adds the new
    /// ones, removes the ones gone.
    pub fn set_local(&mut self, have: &BTreeSet<LocalAddr>, want: &BTreeSet<LocalAddr>) -> BTreeSet<LocalAddr> {
        let mut now = have.clone();
        for a in have.difference(want) {
            let _ = self.local.remove(a);
            now.remove(a);
        }
        for a in want.difference(have) {
            if self.local.insert(*a, 1, 0).is_ok() {
                now.insert(*a);
            } else {
                self.local_full += 1;
            }
        }
        now
    }
}
