//! Targets: parsing what the user wrote, resolving names, listing local addresses, reading
//! `ip route get`.

use std::net::{IpAddr, ToSocketAddrs};

use anyhow::{Result, anyhow, bail};
use serde_json::Value;

use super::*;
use crate::{netns::Netns, usage::usage};

/// A target as the user wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Spec {
    Addr(IpAddr, Option<String>),
    Name(String),
}

/// `ADDR`, `ADDR%IFACE` (IPv6 link-local) or a host name. Anything that looks like an address but
/// is not one is rejected here rather than handed to the resolver (glibc reads "1.2.3" as 1.2.0.3).
pub fn parse_spec(s: &str) -> Result<Spec> {
    let (a, scope) = match s.split_once('%') {
        Some((a, i)) => (a, Some(i)),
        None => (s, None),
    };
    if let Ok(ip) = a.parse::<IpAddr>() {
        if let Some(i) = scope {
            crate::netns::validate_name(i).map_err(|_| anyhow!("malformed interface name {i:?} in target {s:?}"))?;
            if !ip.is_ipv6() {
                bail!("malformed target {s:?}: %interface only applies to IPv6 addresses");
            }
        }
        return Ok(Spec::Addr(ip, scope.map(str::to_string)));
    }
    let numeric = !s.is_empty() && s.chars().all(|c| c.is_ascii_digit() || c == '.');
    if numeric || s.contains(':') || scope.is_some() {
        bail!("malformed address {s:?}");
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    let name = s.strip_suffix('.').unwrap_or(s);
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        bail!("malformed target {s:?}: not an IP address or host name");
    }
    Ok(Spec::Name(s.to_string()))
}

/// Where a name's address came from: the /etc/hosts line, else the resolver configuration.
pub(super) fn name_source(name: &str, addr: IpAddr) -> String {
    if let Ok(hosts) = std::fs::read_to_string("/etc/hosts") {
        for (n, line) in hosts.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("");
            let mut words = line.split_whitespace();
            if words.next().and_then(|a| a.parse::<IpAddr>().ok()) == Some(addr)
                && words.any(|w| w.eq_ignore_ascii_case(name))
            {
                return format!(
                    "/etc/hosts:{} ({})",
                    n + 1,
                    line.split_whitespace().collect::<Vec<_>>().join(" ")
                );
            }
        }
    }
    let nss = std::fs::read_to_string("/etc/nsswitch.conf")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.trim()
                    .strip_prefix("hosts:")
                    .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            })
        })
        .unwrap_or_else(|| "?".into());
    format!("system resolver (nsswitch hosts: {nss})")
}

/// Resolves a name with the system resolver (getaddrinfo) inside `netns`, so a sandbox's lookups
/// cannot reach any outside DNS server.
pub(super) fn resolve(netns: &Netns, name: &str) -> Result<Vec<(IpAddr, String)>> {
    let n = name.to_string();
    let found = netns.run(move || (n.as_str(), 0u16).to_socket_addrs().map(|it| it.collect::<Vec<_>>()))?;
    let addrs = found.map_err(|e| usage(format!("cannot resolve {name:?}: {e}")))?;
    let mut out: Vec<(IpAddr, String)> = Vec::new();
    for a in addrs {
        if !out.iter().any(|(x, _)| *x == a.ip()) {
            out.push((a.ip(), name_source(name, a.ip())));
        }
    }
    if out.is_empty() {
        return Err(usage(format!("cannot resolve {name:?}: no address")));
    }
    Ok(out)
}

/// One address of one interface (`ip -j addr show`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalAddr {
    pub ifname: String,
    pub ifindex: u32,
    pub addr: IpAddr,
    /// Why it cannot be used yet (tentative, dadfailed), if so.
    pub unusable: Option<String>,
}

/// Parses `ip -j addr show` output.
pub fn parse_addrs(v: &Value) -> Vec<LocalAddr> {
    let mut out = Vec::new();
    for link in v.as_array().into_iter().flatten() {
        let ifname = link["ifname"].as_str().unwrap_or("?").to_string();
        let ifindex = link["ifindex"].as_u64().unwrap_or(0) as u32;
        for a in link["addr_info"].as_array().into_iter().flatten() {
            let Some(addr) = a["local"].as_str().and_then(|s| s.parse::<IpAddr>().ok()) else {
                continue;
            };
            let unusable = ["tentative", "dadfailed"]
                .into_iter()
                .find(|f| a[*f].as_bool() == Some(true))
                .map(str::to_string);
            out.push(LocalAddr {
                ifname: ifname.clone(),
                ifindex,
                addr,
                unusable,
            });
        }
    }
    out
}

pub(super) fn local_addrs(netns: &Netns) -> Result<Vec<LocalAddr>> {
    match netns.ip_json(&["addr", "show"])? {
        Ok(v) => Ok(parse_addrs(&v)),
        Err(e) => bail!("ip addr show: {e}"),
    }
}

/// Parses `ip -j route get` output.
pub fn parse_route_get(v: &std::result::Result<Value, String>) -> KernelRoute {
    match v {
        Err(e) => KernelRoute {
            error: Some(e.clone()),
            ..Default::default()
        },
        Ok(v) => {
            let r = &v[0];
            let s = |k: &str| r[k].as_str().map(str::to_string);
            KernelRoute {
                // `ip -j` leaves the type out for ordinary unicast routes.
                kind: s("type").or_else(|| Some("unicast".into())),
                // IPv4 answers omit the table when it is main.
                table: s("table").or_else(|| r.get("dst").map(|_| "main".to_string())),
                dev: s("dev"),
                error: None,
            }
        }
    }
}

pub(super) fn is_link_local(a: &IpAddr) -> bool {
    matches!(a, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}
