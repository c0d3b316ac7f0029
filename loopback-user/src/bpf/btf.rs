//! The running kernel's BTF: struct member offsets (so the programs carry no compile-time kernel
//! layout) and enum names (drop reasons shift between kernels).
use std::collections::HashMap;

use anyhow::{Context, Result, anyhow, bail};
use btf_rs::{Btf, Type};
use loopback_common::{KernelOffsets, OFFSET_UNKNOWN};

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Whether the kernel exposes its BTF (`LOTRACE_FAULT=no-btf` simulates a kernel without it,
/// for the degradation test).
pub fn kernel_has_btf() -> bool {
    *crate::fault::get() != crate::fault::Fault::NoBtf && std::path::Path::new(VMLINUX_BTF).exists()
}

pub struct KernelBtf {
    btf: Btf,
}

impl KernelBtf {
    pub fn load() -> Result<Self> {
        if !kernel_has_btf() {
            return Err(anyhow!(
                "this kernel has no BTF ({VMLINUX_BTF} missing): lotrace needs CONFIG_DEBUG_INFO_BTF=y; nothing was attached"
            ));
        }
        // Memory-mapped and read on demand: lotrace looks up a dozen types, and a full parse of
        // the 5 MB file (btf-rs's default) was most of its start-up time. Kernels that cannot map
        // the file (before 6.16) get it read whole and parsed from memory.
        let btf = Btf::from_file_with_backend(VMLINUX_BTF, btf_rs::Backend::Mmap)
            .or_else(|_| {
                let bytes = std::fs::read(VMLINUX_BTF)?;
                Btf::from_bytes(&bytes)
            })
            .map_err(|e| {
                anyhow!("cannot read kernel BTF at {VMLINUX_BTF}: {e} (CONFIG_DEBUG_INFO_BTF=y is required)")
            })?;
        Ok(Self { btf })
    }

    fn struct_type(&self, name: &str) -> Result<btf_rs::Struct> {
        let types = self
            .btf
            .resolve_types_by_name(name)
            .map_err(|e| anyhow!("BTF has no type {name}: {e}"))?;
        types
            .into_iter()
            .find_map(|t| match t {
                Type::Struct(s) if !s.members.is_empty() => Some(s),
                _ => None,
            })
            .ok_or_else(|| anyhow!("BTF has no struct {name}"))
    }

    /// Strips typedefs and qualifiers.
    fn resolve(&self, mut t: Type) -> Result<Type> {
        for _ in 0..16 {
            t = match &t {
                Type::Typedef(x) => self.btf.resolve_chained_type(x)?,
                Type::Const(x) => self.btf.resolve_chained_type(x)?,
                Type::Volatile(x) => self.btf.resolve_chained_type(x)?,
                Type::Restrict(x) => self.btf.resolve_chained_type(x)?,
                Type::TypeTag(x) => self.btf.resolve_chained_type(x)?,
                _ => return Ok(t),
            };
        }
        bail!("BTF type chain too long")
    }

    /// Byte offset of `field` in `s`, descending into anonymous structs and unions.
    /// Returns the offset and the member's (resolved) type.
    fn find_member(&self, s: &btf_rs::Struct, field: &str, depth: u32) -> Result<Option<(u32, Type)>> {
        if depth > 8 {
            return Ok(None);
        }
        for m in &s.members {
            let name = self.btf.resolve_name(m).unwrap_or_default();
            if name == field {
                if m.bitfield_size().is_some_and(|b| b != 0) || m.bit_offset() % 8 != 0 {
                    bail!("member {field} is a bitfield");
                }
                let t = self.resolve(self.btf.resolve_chained_type(m)?)?;
                return Ok(Some((m.bit_offset() / 8, t)));
            }
            if name.is_empty() {
                let t = self.resolve(self.btf.resolve_chained_type(m)?)?;
                if let Type::Struct(inner) | Type::Union(inner) = &t
                    && let Some((off, t)) = self.find_member(inner, field, depth + 1)?
                {
                    return Ok(Some((m.bit_offset() / 8 + off, t)));
                }
            }
        }
        Ok(None)
    }

    /// Offset of a dotted member path, e.g. `net.ns.inum` (embedded structs only, no pointers).
    pub fn offset_of(&self, path: &str) -> Result<u32> {
        let mut parts = path.split('.');
        let root = parts.next().ok_or_else(|| anyhow!("empty path"))?;
        let mut s = self.struct_type(root)?;
        let mut total = 0u32;
        let mut rest = parts.peekable();
        while let Some(field) = rest.next() {
            let (off, t) = self
                .find_member(&s, field, 0)?
                .ok_or_else(|| anyhow!("kernel struct has no member {path}"))?;
            total += off;
            if rest.peek().is_some() {
                s = match t {
                    Type::Struct(x) | Type::Union(x) => x,
                    _ => bail!("{path}: {field} is not an embedded struct"),
                };
            }
        }
        Ok(total)
    }

    /// Offset of member `field` of struct `parent` when it is a plain 2-byte integer (a
    /// bitfield is refused by `find_member`).
    fn u16_offset(&self, parent: &str, field: &str) -> Result<u32> {
        match self.find_member(&self.struct_type(parent)?, field, 0)? {
            Some((off, Type::Int(i))) if i.size() == 2 => Ok(off),
            Some(_) => bail!("{parent}.{field} is not a 2-byte integer"),
            None => bail!("kernel struct {parent} has no member {field}"),
        }
    }

    pub fn offsets(&self) -> Result<KernelOffsets> {
        let o = |p: &str| {
            self.offset_of(p)
                .with_context(|| format!("resolving {p} in kernel BTF"))
        };
        // Optional, together: only the rare case of another skb reaching lo's driver while a
        // run waits for its own transmit reads them (see `loopback_common::KernelOffsets`).
        let (dev_qdisc, qdisc_enqueue) = match (self.offset_of("net_device.qdisc"), self.offset_of("Qdisc.enqueue")) {
            (Ok(d), Ok(e)) => (d, e),
            _ => (OFFSET_UNKNOWN, OFFSET_UNKNOWN),
        };
        let (skb_end, shinfo_dataref) = match (self.offset_of("sk_buff.end"), self.offset_of("skb_shared_info.dataref"))
        {
            (Ok(e), Ok(d)) => (e, d),
            _ => (OFFSET_UNKNOWN, OFFSET_UNKNOWN),
        };
        Ok(KernelOffsets {
            skb_dev: o("sk_buff.dev")?,
            skb_len: o("sk_buff.len")?,
            skb_data_len: o("sk_buff.data_len")?,
            skb_head: o("sk_buff.head")?,
            skb_data: o("sk_buff.data")?,
            skb_network_header: o("sk_buff.network_header")?,
            skb_protocol: o("sk_buff.protocol")?,
            dev_nd_net: o("net_device.nd_net")?,
            dev_ifindex: o("net_device.ifindex")?,
            dev_name: o("net_device.name")?,
            net_inum: o("net.ns.inum")?,
            task_nsproxy: o("task_struct.nsproxy")?,
            nsproxy_net_ns: o("nsproxy.net_ns")?,
            flowi4_saddr: o("flowi4.saddr")?,
            flowi4_daddr: o("flowi4.daddr")?,
            flowi6_saddr: o("flowi6.saddr")?,
            flowi6_daddr: o("flowi6.daddr")?,
            nhc_dev: o("fib_nh_common.nhc_dev")?,
            fib6_res_nh: o("fib6_result.nh")?,
            fib6_table_id: o("fib6_table.tb6_id")?,
            // Optional: only a filter (UDP sockets) reads it.
            sock_protocol: self.u16_offset("sock", "sk_protocol").unwrap_or(OFFSET_UNKNOWN),
            dev_qdisc,
            qdisc_enqueue,
            skb_end,
            shinfo_dataref,
            // Optional: only the agent's UDP delivery reads it.
            sock_num: self.offset_of("sock_common.skc_num").unwrap_or(OFFSET_UNKNOWN),
        })
    }

    /// The kernel's drop reasons (`enum skb_drop_reason`), value -> short name (`NO_SOCKET`);
    /// empty when its BTF has none.
    pub fn drop_reasons(&self) -> HashMap<u64, String> {
        self.enum_names("skb_drop_reason")
            .map(|m| {
                m.into_iter()
                    .map(|(k, v)| (k, short_drop_reason(&v).to_string()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Values of a kernel enum, e.g. `skb_drop_reason`, as value -> name.
    pub fn enum_names(&self, name: &str) -> Result<HashMap<u64, String>> {
        let types = self.btf.resolve_types_by_name(name)?;
        let mut out = HashMap::new();
        for t in types {
            match t {
                Type::Enum(e) => {
                    for m in &e.members {
                        out.insert(m.val() as u64, self.btf.resolve_name(m)?);
                    }
                }
                Type::Enum64(e) => {
                    for m in &e.members {
                        out.insert(m.val(), self.btf.resolve_name(m)?);
                    }
                }
                _ => {}
            }
        }
        if out.is_empty() {
            bail!("BTF has no enum {name}");
        }
        Ok(out)
    }

    /// How many arguments the tracepoint `name` passes on this kernel, from its BTF prototype
    /// `typedef void (*btf_trace_<name>)(void *__data, ARGS...)`; None when the kernel has no
    /// such tracepoint. This is how lotrace knows a tracepoint's shape without a version number.
    pub fn tracepoint_args(&self, name: &str) -> Option<u32> {
        let types = self.btf.resolve_types_by_name(&format!("btf_trace_{name}")).ok()?;
        types.into_iter().find_map(|t| {
            let Type::Typedef(td) = t else { return None };
            let Type::Ptr(p) = self.btf.resolve_chained_type(&td).ok()? else {
                return None;
            };
            match self.btf.resolve_chained_type(&p).ok()? {
                Type::FuncProto(f) => Some(f.parameters.len().saturating_sub(1) as u32),
                _ => None,
            }
        })
    }

    pub fn inner(&self) -> &Btf {
        &self.btf
    }
}

/// `SKB_DROP_REASON_NO_SOCKET` -> `NO_SOCKET`.
pub fn short_drop_reason(name: &str) -> &str {
    name.strip_prefix("SKB_DROP_REASON_").unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_reason_prefix_is_stripped() {
        assert_eq!(short_drop_reason("SKB_DROP_REASON_NO_SOCKET"), "NO_SOCKET");
        assert_eq!(short_drop_reason("OTHER"), "OTHER");
    }

    /// Needs only a readable /sys/kernel/btf/vmlinux (no root): resolves every offset and checks
    /// relations that hold on every kernel.
    #[test]
    fn resolves_offsets_from_running_kernel() {
        let Ok(k) = KernelBtf::load() else {
            eprintln!("skipped: no {VMLINUX_BTF}");
            return;
        };
        let o = k.offsets().expect("offsets");
        assert!(o.skb_len > o.skb_dev, "sk_buff.len comes after the list/dev union");
        assert!(o.skb_data > o.skb_head || o.skb_head > 0);
        assert_ne!(o.dev_name, o.dev_ifindex);
        assert_eq!(o.flowi4_daddr, o.flowi4_saddr + 4, "flowi4: saddr then daddr");
        // Every kernel lotrace runs on has these (the guests check 6.1 and 6.12).
        assert_ne!(o.dev_qdisc, OFFSET_UNKNOWN, "net_device.qdisc");
        assert_ne!(o.qdisc_enqueue, OFFSET_UNKNOWN, "Qdisc.enqueue");
        // The tracepoints' shapes come from BTF: net_dev_xmit(skb, rc, dev, len) everywhere;
        // consume_skb has 1 or 2 arguments, kfree_skb 2 to 4, depending on the kernel.
        assert_eq!(k.tracepoint_args("net_dev_xmit"), Some(4));
        assert!(k.tracepoint_args("consume_skb").is_some_and(|n| (1..=2).contains(&n)));
        assert!(k.tracepoint_args("kfree_skb").is_some_and(|n| (2..=4).contains(&n)));
        assert_eq!(k.tracepoint_args("no_such_tracepoint_here"), None);
        let reasons = k.enum_names("skb_drop_reason").expect("drop reasons");
        assert!(reasons.values().any(|n| n == "SKB_DROP_REASON_NO_SOCKET"));
    }
}
