//! tcpdump's filter language (pcap-filter(7)), with tcpdump's meaning, over reconstructed
//! packets. The grammar is libpcap's, as far as it applies to IP on `lo`:
//!
//! ```text
//! expr      := term ( ("and" | "&&" | "or" | "||") (term | id) )*   equal precedence, left to right
//! term      := ("not" | "!") term | "(" expr ")" | head id | pname | relation
//!            | "less" NUM | "greater" NUM | pname "multicast"
//! head      := [pname] [dir] [kind] | pname ("proto" | "protochain")   (at least one qualifier)
//! dir       := "src" | "dst" | "src or dst" | "src and dst" | "dst or src" | "dst and src"
//! kind      := "host" | "net" | "port" | "portrange"
//! pname     := "ip" | "ip6" | "tcp" | "udp" | "sctp" | "icmp" | "icmp6" | "igmp" | "ah" | "esp"
//!            | "pim" | "vrrp"
//! id        := value | ("not" | "!") id | "(" id ( ("and" | "or") id )* ")"
//!              (a bare value after and/or takes the qualifiers of the primitive before it:
//!               "port 53 or 80", "host 127.0.0.1 and not 127.0.0.2")
//! value     := address | name (/etc/hosts, /etc/services) | NUM | A/LEN | A "mask" M | N-M
//! relation  := arith ("=" | "==" | "!=" | "<" | "<=" | ">" | ">=") arith
//! arith     := arith op arith | "-" arith | "(" arith ")" | NUM | "len"
//!            | pname "[" arith [":" (1|2|4)] "]"
//!              op, loosest first: "|" "^", "&", "<<" ">>", "+" "-", "*" "/" "%"
//! ```
//!
//! Meanings follow libpcap's code generator, checked against tcpdump by a test that runs both on
//! one capture: `port` and `portrange` mean TCP, UDP or SCTP unless qualified; `icmp` is ICMPv4
//! only; `tcp[...]`, `udp[...]`, `icmp[...]` index the transport header of an IPv4 packet that is
//! not a later fragment (libpcap indexes no IPv6 transport but ICMPv6's, at a fixed 40 bytes);
//! `ip[...]` and `ip6[...]` index the IP header; a byte beyond what was captured rejects the
//! packet, as in BPF. Host names come from /etc/hosts only (lotrace never asks DNS: a tracer
//! sends no traffic), service names from /etc/services. What cannot apply on `lo` (link-layer,
//! ARP, VLAN and other non-IP primitives, direction) is refused in one line that says why.
//! Errors name the problem and the column (1-based) where it was found.
use std::{collections::HashMap, net::IpAddr, sync::OnceLock};

use crate::{
    decode::{PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, PacketInfo},
    path::PacketPath,
};

const PROTO_SCTP: u8 = 132;
const ETH_LEN: usize = 14;
const ETH_IPV4: u16 = 0x0800;
const ETH_IPV6: u16 = 0x86dd;

/// Which address or port a primitive tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// No qualifier, or `src or dst`.
    Any,
    Src,
    Dst,
    /// `src and dst`.
    Both,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fam {
    V4,
    V6,
}

/// The header a byte test indexes (`ip[..]`, `tcp[..]`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Base {
    Ip,
    Ip6,
    /// The transport header of an IPv4 packet of this protocol (first fragment only).
    V4Transport(u8),
    Icmp6,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Add,
    Sub,
    Mul,
    Div,
    Mod,
    And,
    Or,
    Xor,
    Shl,
    Shr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rel {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// An arithmetic expression of a relation: 32-bit unsigned, as in BPF.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Arith {
    Num(u32),
    /// The packet's length on the wire (`len`).
    Len,
    Load {
        base: Base,
        /// What the expression was written as, for errors (`tcp[13]`).
        name: &'static str,
        off: Box<Arith>,
        size: u8,
    },
    Bin(Op, Box<Arith>, Box<Arith>),
    Neg(Box<Arith>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expr {
    /// `[ip|ip6] [dir] host A`: any of the addresses (a name may have several).
    Host(Dir, Vec<IpAddr>),
    Net(Dir, IpAddr, u8),
    /// `[tcp|udp|sctp] [dir] port N` (`lo == hi`) or `portrange LO-HI`; no protocol: any of
    /// the three.
    Port {
        proto: Option<u8>,
        dir: Dir,
        lo: u16,
        hi: u16,
    },
    /// `ip proto N`, `ip6 proto N`, `proto N`, and the protocol names (`tcp`, `icmp`, ...).
    Proto(Option<Fam>, u8),
    Family(Fam),
    /// `ip multicast` (224.0.0.0 and above), `ip6 multicast` (ff00::/8).
    Multicast(Fam),
    Rel(Arith, Rel, Arith),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("filter: {msg} at column {col}")]
pub struct FilterError {
    pub msg: String,
    pub col: usize,
}

/// Host and service names, as tcpdump would resolve them here (files only).
#[derive(Debug, Default, Clone)]
pub struct Names {
    /// Name (lower case) -> addresses, in the file's order.
    pub hosts: HashMap<String, Vec<IpAddr>>,
    /// (name, "tcp" | "udp" | "sctp") -> port.
    pub services: HashMap<(String, String), u16>,
}

impl Names {
    /// Reads `/etc/hosts` and `/etc/services` (a missing file is an empty table).
    pub fn system() -> &'static Names {
        static NAMES: OnceLock<Names> = OnceLock::new();
        NAMES.get_or_init(|| {
            let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
            Names::from_files(&read("/etc/hosts"), &read("/etc/services"))
        })
    }

    pub fn from_files(hosts: &str, services: &str) -> Names {
        let mut n = Names::default();
        let fields = |l: &str| {
            l.split('#')
                .next()
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        for l in hosts.lines() {
            let f = fields(l);
            let Some(addr) = f.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                continue;
            };
            for name in &f[1..] {
                let v = n.hosts.entry(name.to_ascii_lowercase()).or_default();
                if !v.contains(&addr) {
                    v.push(addr);
                }
            }
        }
        for l in services.lines() {
            let f = fields(l);
            let Some((port, proto)) = f.get(1).and_then(|p| p.split_once('/')) else {
                continue;
            };
            let Ok(port) = port.parse::<u16>() else { continue };
            for name in f.iter().take(1).chain(f.iter().skip(2)) {
                n.services.entry((name.clone(), proto.to_string())).or_insert(port);
            }
        }
        n
    }
}

mod parse;
pub use parse::{parse, parse_with};

// ---- evaluation ----

fn mask(a: &IpAddr, len: u8) -> IpAddr {
    match a {
        IpAddr::V4(a) => {
            let m = if len == 0 { 0 } else { u32::MAX << (32 - len as u32) };
            IpAddr::from((u32::from(*a) & m).to_be_bytes())
        }
        IpAddr::V6(a) => {
            let m = if len == 0 { 0 } else { u128::MAX << (128 - len as u32) };
            IpAddr::from((u128::from(*a) & m).to_be_bytes())
        }
    }
}

fn in_net(a: &IpAddr, net: &IpAddr, len: u8) -> bool {
    a.is_ipv4() == net.is_ipv4() && mask(a, len) == mask(net, len)
}

fn by_dir<T: Copy>(dir: Dir, s: Option<T>, d: Option<T>, f: impl Fn(T) -> bool) -> bool {
    let (s, d) = (s.is_some_and(&f), d.is_some_and(&f));
    match dir {
        Dir::Src => s,
        Dir::Dst => d,
        Dir::Any => s || d,
        Dir::Both => s && d,
    }
}

/// What a filter looks at: the headers, and the frame as captured on lo (Ethernet header
/// first) for byte tests.
#[derive(Clone, Copy, Debug)]
pub struct Packet<'a> {
    pub info: &'a PacketInfo,
    pub frame: Option<&'a [u8]>,
    /// The frame's length on the wire (`len`).
    pub len: u32,
}

/// A byte test read past the captured bytes: BPF rejects the packet (the whole filter is false).
#[derive(Debug)]
struct Reject;

fn be(frame: &[u8], at: usize, size: usize) -> Result<u32, Reject> {
    let b = frame.get(at..at + size).ok_or(Reject)?;
    Ok(b.iter().fold(0u32, |a, x| (a << 8) | *x as u32))
}

impl Base {
    /// Whether the packet has this header, and where it starts in the frame.
    fn start(self, f: &[u8]) -> Result<Option<usize>, Reject> {
        let ethertype = be(f, 12, 2)? as u16;
        Ok(match self {
            Base::Ip => (ethertype == ETH_IPV4).then_some(ETH_LEN),
            Base::Ip6 => (ethertype == ETH_IPV6).then_some(ETH_LEN),
            Base::Icmp6 => {
                (ethertype == ETH_IPV6 && be(f, ETH_LEN + 6, 1)? == PROTO_ICMPV6 as u32).then_some(ETH_LEN + 40)
            }
            Base::V4Transport(proto) => {
                if ethertype != ETH_IPV4
                    || be(f, ETH_LEN + 9, 1)? != proto as u32
                    || be(f, ETH_LEN + 6, 2)? & 0x1fff != 0
                {
                    None
                } else {
                    Some(ETH_LEN + 4 * (be(f, ETH_LEN, 1)? as usize & 0xf))
                }
            }
        })
    }
    /// The least offset its header may start at.
    fn min_start(self) -> usize {
        match self {
            Base::Ip | Base::Ip6 => ETH_LEN,
            Base::V4Transport(_) => ETH_LEN + 20,
            Base::Icmp6 => ETH_LEN + 40,
        }
    }
}

impl Op {
    /// BPF's 32-bit unsigned arithmetic; None for a division by zero (BPF rejects the packet).
    fn apply(self, a: u32, b: u32) -> Option<u32> {
        Some(match self {
            Op::Add => a.wrapping_add(b),
            Op::Sub => a.wrapping_sub(b),
            Op::Mul => a.wrapping_mul(b),
            Op::Div => a.checked_div(b)?,
            Op::Mod => a.checked_rem(b)?,
            Op::And => a & b,
            Op::Or => a | b,
            Op::Xor => a ^ b,
            Op::Shl => a.checked_shl(b).unwrap_or(0),
            Op::Shr => a.checked_shr(b).unwrap_or(0),
        })
    }
}

impl Arith {
    /// Whether every header this expression indexes is there (libpcap tests them all before
    /// reading a byte).
    fn present(&self, k: &Packet) -> Result<bool, Reject> {
        Ok(match self {
            Arith::Num(_) | Arith::Len => true,
            Arith::Load { base, off, .. } => off.present(k)? && base.start(k.frame.ok_or(Reject)?)?.is_some(),
            Arith::Bin(_, a, b) => a.present(k)? && b.present(k)?,
            Arith::Neg(a) => a.present(k)?,
        })
    }

    fn value(&self, k: &Packet) -> Result<u32, Reject> {
        Ok(match self {
            Arith::Num(n) => *n,
            Arith::Len => k.len,
            Arith::Load { base, off, size, .. } => {
                let f = k.frame.ok_or(Reject)?;
                let start = base.start(f)?.ok_or(Reject)?;
                let at = start.checked_add(off.value(k)? as usize).ok_or(Reject)?;
                be(f, at, *size as usize)?
            }
            Arith::Neg(a) => a.value(k)?.wrapping_neg(),
            Arith::Bin(op, a, b) => op.apply(a.value(k)?, b.value(k)?).ok_or(Reject)?,
        })
    }

    fn constant(&self) -> Option<u32> {
        match self {
            Arith::Num(n) => Some(*n),
            Arith::Neg(a) => Some(a.constant()?.wrapping_neg()),
            Arith::Bin(op, a, b) => op.apply(a.constant()?, b.constant()?),
            _ => None,
        }
    }

    fn loads(&self, f: &mut impl FnMut(&Arith)) {
        match self {
            Arith::Load { off, .. } => {
                f(self);
                off.loads(f);
            }
            Arith::Bin(_, a, b) => {
                a.loads(f);
                b.loads(f);
            }
            Arith::Neg(a) => a.loads(f),
            Arith::Num(_) | Arith::Len => {}
        }
    }
}

impl Expr {
    /// Whether a finished packet passes: its headers match (one with no headers seen never
    /// does). The one filter of `trace`, `replay` and the dashboard.
    pub fn passes(&self, p: &PacketPath) -> bool {
        let Some(info) = p.info.as_ref() else { return false };
        self.matches(&Packet {
            info,
            frame: p.wire.as_ref().map(|w| &*w.bytes),
            len: p.wire.as_ref().map_or(p.len, |w| w.orig_len),
        })
    }

    pub fn matches(&self, k: &Packet) -> bool {
        self.eval(k).unwrap_or(false)
    }

    fn eval(&self, k: &Packet) -> Result<bool, Reject> {
        let p = k.info;
        Ok(match self {
            Expr::Host(d, addrs) => addrs.iter().any(|a| by_dir(*d, Some(p.src), Some(p.dst), |x| x == *a)),
            Expr::Net(d, n, l) => by_dir(*d, Some(p.src), Some(p.dst), |x| in_net(&x, n, *l)),
            Expr::Port { proto, dir, lo, hi } => {
                let ok = match proto {
                    Some(n) => p.proto == *n,
                    None => matches!(p.proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP),
                };
                ok && by_dir(*dir, p.sport, p.dport, |x| (*lo..=*hi).contains(&x))
            }
            Expr::Proto(f, n) => f.is_none_or(|f| (f == Fam::V6) == p.src.is_ipv6()) && p.proto == *n,
            Expr::Family(f) => (*f == Fam::V6) == p.src.is_ipv6(),
            Expr::Multicast(Fam::V4) => matches!(p.dst, IpAddr::V4(a) if a.octets()[0] >= 224),
            Expr::Multicast(Fam::V6) => matches!(p.dst, IpAddr::V6(a) if a.octets()[0] == 0xff),
            Expr::Rel(a, rel, b) => {
                if !(a.present(k)? && b.present(k)?) {
                    return Ok(false);
                }
                let (a, b) = (a.value(k)?, b.value(k)?);
                match rel {
                    Rel::Eq => a == b,
                    Rel::Ne => a != b,
                    Rel::Lt => a < b,
                    Rel::Le => a <= b,
                    Rel::Gt => a > b,
                    Rel::Ge => a >= b,
                }
            }
            Expr::Not(e) => !e.eval(k)?,
            Expr::And(a, b) => a.eval(k)? && b.eval(k)?,
            Expr::Or(a, b) => a.eval(k)? || b.eval(k)?,
        })
    }

    fn each_rel(&self, f: &mut impl FnMut(&Arith)) {
        match self {
            Expr::Rel(a, _, b) => {
                a.loads(f);
                b.loads(f);
            }
            Expr::Not(e) => e.each_rel(f),
            Expr::And(a, b) | Expr::Or(a, b) => {
                a.each_rel(f);
                b.each_rel(f);
            }
            _ => {}
        }
    }

    /// Whether the filter tests packet bytes (so they must be kept for it).
    pub fn reads_bytes(&self) -> bool {
        let mut any = false;
        self.each_rel(&mut |_| any = true);
        any
    }

    /// Refuses a byte test that could never be evaluated on `captured` bytes per packet (a
    /// fixed offset past them even where its header starts earliest): tcpdump would silently
    /// reject every packet.
    pub fn check_capture(&self, captured: usize) -> Result<(), String> {
        let mut bad = None;
        self.each_rel(&mut |l| {
            if let Arith::Load { base, name, off, size } = l
                && let Some(o) = off.constant()
            {
                let end = base.min_start() + o as usize + *size as usize;
                if end > captured && bad.is_none() {
                    bad = Some(format!(
                        "filter: {name}[{o}:{size}] needs frame byte {end} at the least, but each packet's first {captured} bytes only are captured (--snaplen {captured})"
                    ));
                }
            }
        });
        bad.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests;
