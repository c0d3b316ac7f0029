//! The plan: the sandbox's scenarios (which addresses, in which state) or the user's targets,
//! as steps to run.

use std::time::Duration;

use anyhow::Result;

use super::*;
use crate::{
    netns::{Netns, list_named},
    usage::usage,
};

/// Prefix of the sandboxes `prove` creates (`lotrace-prove-PID-N`).
pub const SANDBOX_PREFIX: &str = "lotrace-prove";
/// The sandbox's interface, its veth peer and their addresses (documentation ranges: the sandbox
/// has no link to anything, so they can never collide with a real network).
pub const SANDBOX_DEV: &str = "lt0";
pub const SANDBOX_PEER: &str = "lt0p";
pub const SANDBOX_V4: &str = "192.0.2.1";
pub const SANDBOX_V6: &str = "2001:db8::1";
pub(super) const ECHO_TIMEOUT: Duration = Duration::from_secs(1);

pub(super) enum Step {
    /// Change the sandbox's state, then describe it.
    Scenario {
        name: &'static str,
        about: String,
        ip: Vec<Vec<&'static str>>,
    },
    Probe(Target),
}

/// Removes sandboxes left by a `prove` that was killed (kill -9 cannot be caught).
pub(super) fn remove_stale_sandboxes() {
    for name in list_named() {
        let Some(rest) = name.strip_prefix(&format!("{SANDBOX_PREFIX}-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let ok = std::process::Command::new("ip")
                .args(["netns", "del", &name])
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                eprintln!("lotrace: removed sandbox {name} left by a killed run (pid {pid})");
            }
        }
    }
}

pub(super) struct Ids(pub(super) u16);
impl Ids {
    fn next(&mut self) -> u16 {
        self.0 = self.0.wrapping_add(1);
        self.0
    }
}

pub(super) fn literal(scenario: &'static str, addr: &str, ids: &mut Ids, expect: Verdict) -> Target {
    Target {
        scenario,
        spec: addr.to_string(),
        addr: addr.parse().expect("built-in address"),
        scope_id: 0,
        source: "literal".into(),
        expect,
        icmp_id: ids.next(),
    }
}

/// The default plan inside a fresh sandbox: three states of its interface.
pub(super) fn sandbox_plan(netns: &Netns, ids: &mut Ids) -> Result<Vec<Step>> {
    use Verdict::*;
    let mut steps = vec![Step::Scenario {
        name: "up",
        about: format!("{SANDBOX_DEV} up, carrier up (veth peer {SANDBOX_PEER} up)"),
        ip: vec![],
    }];
    for a in ["127.0.0.1", "127.1.2.3", "::1", SANDBOX_V4, SANDBOX_V6] {
        let mut t = literal("up", a, ids, Proven);
        if a == SANDBOX_V4 || a == SANDBOX_V6 {
            t.source = format!("address of {SANDBOX_DEV}");
        }
        steps.push(Step::Probe(t));
    }
    for (addr, source) in resolve(netns, "localhost")? {
        steps.push(Step::Probe(Target {
            scenario: "up",
            spec: "localhost".into(),
            addr,
            scope_id: 0,
            source,
            expect: Proven,
            icmp_id: ids.next(),
        }));
    }
    steps.push(Step::Probe(literal("up", "0.0.0.0", ids, Proven)));
    steps.push(Step::Scenario {
        name: "no-carrier",
        about: format!("cable pulled: {SANDBOX_PEER} set down, so {SANDBOX_DEV} is up but NO-CARRIER"),
        ip: vec![vec!["link", "set", SANDBOX_PEER, "down"]],
    });
    for a in ["127.0.0.1", SANDBOX_V4, SANDBOX_V6] {
        let mut t = literal("no-carrier", a, ids, Proven);
        if a != "127.0.0.1" {
            t.source = format!("address of {SANDBOX_DEV}");
        }
        steps.push(Step::Probe(t));
    }
    steps.push(Step::Scenario {
        name: "admin-down",
        about: format!("{SANDBOX_DEV} set administratively down"),
        ip: vec![vec!["link", "set", SANDBOX_DEV, "down"]],
    });
    let mut t = literal("admin-down", SANDBOX_V4, ids, Proven);
    t.source = format!("address of {SANDBOX_DEV} (IPv4 keeps it while down)");
    steps.push(Step::Probe(t));
    let mut t = literal("admin-down", SANDBOX_V6, ids, Unreachable);
    t.source = format!("address of {SANDBOX_DEV} until it went down");
    steps.push(Step::Probe(t));
    Ok(steps)
}

/// The plan for `--target`s and/or `--host` in an existing namespace.
pub(super) fn user_plan(netns: &Netns, cfg: &ProveConfig, ids: &mut Ids) -> Result<Vec<Step>> {
    let mut steps = Vec::new();
    let mut links: Option<Vec<LocalAddr>> = None;
    for spec in &cfg.targets {
        match parse_spec(spec).map_err(usage)? {
            Spec::Addr(addr, scope) => {
                let scope_id = match scope {
                    Some(ifname) => {
                        let l = links.get_or_insert(local_addrs(netns)?);
                        l.iter()
                            .find(|a| a.ifname == ifname)
                            .map(|a| a.ifindex)
                            .ok_or_else(|| usage(format!("no interface {ifname:?} with addresses in the namespace")))?
                    }
                    None if is_link_local(&addr) => {
                        return Err(usage(format!(
                            "{spec}: a link-local address needs its interface, e.g. {spec}%eth0"
                        )));
                    }
                    None => 0,
                };
                steps.push(Step::Probe(Target {
                    scenario: "given",
                    spec: spec.clone(),
                    addr,
                    scope_id,
                    source: "literal".into(),
                    expect: Verdict::Proven,
                    icmp_id: ids.next(),
                }));
            }
            Spec::Name(name) => {
                for (addr, source) in resolve(netns, &name)? {
                    steps.push(Step::Probe(Target {
                        scenario: "given",
                        spec: name.clone(),
                        addr,
                        scope_id: 0,
                        source,
                        expect: Verdict::Proven,
                        icmp_id: ids.next(),
                    }));
                }
            }
        }
    }
    if cfg.host {
        for a in local_addrs(netns)? {
            if let Some(why) = &a.unusable {
                eprintln!("lotrace: skipping {} on {}: address is {why}", a.addr, a.ifname);
                continue;
            }
            steps.push(Step::Probe(Target {
                scenario: "host",
                spec: format!("{} ({})", a.addr, a.ifname),
                addr: a.addr,
                scope_id: if is_link_local(&a.addr) { a.ifindex } else { 0 },
                source: format!("address of {}", a.ifname),
                expect: Verdict::Proven,
                icmp_id: ids.next(),
            }));
        }
    }
    if steps.is_empty() {
        return Err(usage("nothing to prove: the namespace has no usable local address"));
    }
    Ok(steps)
}
