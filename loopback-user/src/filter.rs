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
    decode::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, PacketInfo},
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

// ---- lexer ----

#[derive(Clone, Debug, PartialEq)]
enum T {
    Word(String),
    Op(&'static str),
}

#[derive(Clone, Debug)]
struct Tok {
    t: T,
    col: usize,
}

const OPS: [&str; 25] = [
    "!=", "==", "<=", ">=", "<<", ">>", "&&", "||", "(", ")", "[", "]", ":", "!", "=", "<", ">", "&", "|", "+", "-",
    "*", "/", "%", "^",
];

/// Most words and symbols in a filter, and parentheses and brackets open at once: bounds on
/// the parser's recursion (no one writes more; a fuzzer does).
const MAX_TOKENS: usize = 1024;
const MAX_NESTING: usize = 64;

fn lex(s: &str) -> Result<Vec<Tok>, FilterError> {
    let chars: Vec<char> = s.chars().collect();
    let (mut out, mut i, mut depth, mut nest) = (Vec::new(), 0, 0usize, 0usize);
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let word_start = c.is_ascii_alphanumeric() || c == '_' || c == '\\' || (c == ':' && depth == 0);
        if word_start {
            let start = i;
            i += 1;
            while i < chars.len() {
                let c = chars[i];
                if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') || (c == ':' && depth == 0) {
                    i += 1;
                } else {
                    break;
                }
            }
            let w: String = chars[start..i].iter().collect();
            if out.len() >= MAX_TOKENS {
                return Err(FilterError {
                    msg: format!("too long (at most {MAX_TOKENS} words and symbols)"),
                    col: start + 1,
                });
            }
            out.push(Tok {
                t: T::Word(w.strip_prefix('\\').map(str::to_string).unwrap_or(w)),
                col: start + 1,
            });
            continue;
        }
        let rest: String = chars[i..chars.len().min(i + 2)].iter().collect();
        let Some(op) = OPS.iter().find(|o| rest.starts_with(**o)) else {
            return Err(FilterError {
                msg: format!("unexpected character {c:?}"),
                col: i + 1,
            });
        };
        match *op {
            "[" => depth += 1,
            "]" => depth = depth.saturating_sub(1),
            _ => {}
        }
        match *op {
            "[" | "(" => nest += 1,
            "]" | ")" => nest = nest.saturating_sub(1),
            _ => {}
        }
        if nest > MAX_NESTING || out.len() >= MAX_TOKENS {
            return Err(FilterError {
                msg: format!(
                    "too long or too deeply nested (at most {MAX_TOKENS} words and symbols, {MAX_NESTING} levels)"
                ),
                col: i + 1,
            });
        }
        out.push(Tok {
            t: T::Op(op),
            col: i + 1,
        });
        i += op.len();
    }
    Ok(out)
}

// ---- vocabulary ----

/// A protocol qualifier: its name, the IP family it implies, and its IP protocol (none: `ip`
/// and `ip6` themselves).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pname {
    name: &'static str,
    fam: Option<Fam>,
    proto: Option<u8>,
}

const PNAMES: [Pname; 12] = {
    const fn p(name: &'static str, fam: Option<Fam>, proto: Option<u8>) -> Pname {
        Pname { name, fam, proto }
    }
    [
        p("ip", Some(Fam::V4), None),
        p("ip6", Some(Fam::V6), None),
        p("tcp", None, Some(PROTO_TCP)),
        p("udp", None, Some(PROTO_UDP)),
        p("sctp", None, Some(PROTO_SCTP)),
        p("icmp", Some(Fam::V4), Some(PROTO_ICMP)),
        p("icmp6", Some(Fam::V6), Some(PROTO_ICMPV6)),
        p("igmp", Some(Fam::V4), Some(2)),
        p("ah", None, Some(51)),
        p("esp", None, Some(50)),
        p("pim", None, Some(103)),
        p("vrrp", Some(Fam::V4), Some(112)),
    ]
};

fn pname(w: &str) -> Option<Pname> {
    PNAMES.iter().find(|p| p.name == w).copied()
}

impl Pname {
    /// The primitive the name alone is (libpcap's `gen_proto_abbrev`).
    fn primitive(self) -> Expr {
        match (self.fam, self.proto) {
            (Some(f), None) => Expr::Family(f),
            (f, Some(n)) => Expr::Proto(f, n),
            (None, None) => Expr::Family(Fam::V4),
        }
    }
    /// The family `ip` and `ip6` give a host or net; the others cannot qualify one.
    fn family(self) -> Option<Fam> {
        self.proto.is_none().then_some(self.fam).flatten()
    }
    /// The header `name[...]` indexes (libpcap's `gen_load`).
    fn load_base(self) -> Option<Base> {
        Some(match (self.fam, self.proto) {
            (Some(Fam::V4), None) => Base::Ip,
            (Some(Fam::V6), None) => Base::Ip6,
            (_, Some(PROTO_ICMPV6)) => Base::Icmp6,
            (_, Some(50 | 51)) | (None, None) => return None,
            (_, Some(n)) => Base::V4Transport(n),
        })
    }
    fn port_proto(self) -> Option<u8> {
        self.proto.filter(|n| matches!(*n, PROTO_TCP | PROTO_UDP | PROTO_SCTP))
    }
}

/// Words libpcap reads as numbers (its named constants).
fn named_number(w: &str) -> Option<u32> {
    Some(match w {
        "icmptype" | "icmp6type" => 0,
        "icmpcode" | "icmp6code" => 1,
        "tcpflags" => 13,
        "tcp-fin" => 0x01,
        "tcp-syn" => 0x02,
        "tcp-rst" => 0x04,
        "tcp-push" => 0x08,
        "tcp-ack" => 0x10,
        "tcp-urg" => 0x20,
        "tcp-ece" => 0x40,
        "tcp-cwr" => 0x80,
        "icmp-echoreply" => 0,
        "icmp-unreach" => 3,
        "icmp-sourcequench" => 4,
        "icmp-redirect" => 5,
        "icmp-echo" => 8,
        "icmp-routeradvert" => 9,
        "icmp-routersolicit" => 10,
        "icmp-timxceed" => 11,
        "icmp-paramprob" => 12,
        "icmp-tstamp" => 13,
        "icmp-tstampreply" => 14,
        "icmp-ireq" => 15,
        "icmp-ireqreply" => 16,
        "icmp-maskreq" => 17,
        "icmp-maskreply" => 18,
        "icmp6-destinationunreach" => 1,
        "icmp6-packettoobig" => 2,
        "icmp6-timeexceeded" => 3,
        "icmp6-parameterproblem" => 4,
        "icmp6-echo" => 128,
        "icmp6-echoreply" => 129,
        "icmp6-multicastlistenerquery" => 130,
        "icmp6-multicastlistenerreportv1" => 131,
        "icmp6-multicastlistenerdone" => 132,
        "icmp6-routersolicit" => 133,
        "icmp6-routeradvert" => 134,
        "icmp6-neighborsolicit" => 135,
        "icmp6-neighboradvert" => 136,
        "icmp6-redirect" => 137,
        "icmp6-routerrenum" => 138,
        "icmp6-multicastlistenerreportv2" => 143,
        _ => return None,
    })
}

/// A number as libpcap reads one: decimal, 0x hex, 0 octal, or a named constant.
fn number(w: &str) -> Option<u32> {
    if let Some(h) = w.strip_prefix("0x").or_else(|| w.strip_prefix("0X")) {
        return u32::from_str_radix(h, 16).ok();
    }
    if w.len() > 1
        && let Some(o) = w.strip_prefix('0')
    {
        return u32::from_str_radix(o, 8).ok();
    }
    if w.bytes().all(|b| b.is_ascii_digit()) {
        return w.parse().ok();
    }
    named_number(w)
}

/// IP protocol names `proto` takes (`ip proto \udp`).
fn proto_number(w: &str) -> Option<u8> {
    if let Some(n) = number(w) {
        return u8::try_from(n).ok();
    }
    Some(match w {
        "icmp" => 1,
        "igmp" => 2,
        "tcp" => 6,
        "udp" => 17,
        "ipv6" => 41,
        "gre" => 47,
        "esp" => 50,
        "ah" => 51,
        "icmp6" | "ipv6-icmp" => 58,
        "pim" => 103,
        "vrrp" => 112,
        "sctp" => 132,
        _ => return None,
    })
}

/// Why a pcap-filter keyword cannot apply to what lotrace sees, if it is one of those.
fn refused(w: &str) -> Option<&'static str> {
    Some(match w {
        "ether" | "link" | "fddi" | "tr" | "wlan" | "ppp" | "slip" | "radio" | "llc" => {
            "lo has no link layer to test: its Ethernet header is all zeros"
        }
        "arp" | "rarp" => "lo carries no ARP: it resolves no addresses",
        "vlan" | "mpls" | "pppoed" | "pppoes" | "geneve" => "lo carries no VLAN, MPLS, PPPoE or Geneve encapsulation",
        "gateway" => "'gateway' needs the Ethernet address of a host, which lo does not have",
        "broadcast" => "'broadcast' needs the interface's netmask, which lo has none of",
        "inbound" | "outbound" => "on lo every packet is both outbound and inbound",
        "decnet" | "iso" | "esis" | "isis" | "clnp" | "stp" | "ipx" | "netbeui" | "atalk" | "aarp" | "lat" | "sca"
        | "moprc" | "mopdl" | "l1" | "l2" | "iih" | "lsp" | "snp" | "csnp" | "psnp" | "carp" | "igrp" | "ifname"
        | "on" | "rnr" | "rulenum" | "reason" | "rset" | "ruleset" | "srnr" | "subrulenum" | "action" | "type"
        | "subtype" | "dir" | "ifindex" | "byte" => "lotrace follows IP, TCP, UDP, SCTP and ICMP packets only",
        _ => return None,
    })
}

fn is_keyword(w: &str) -> bool {
    pname(w).is_some()
        || refused(w).is_some()
        || matches!(
            w,
            "src"
                | "dst"
                | "host"
                | "net"
                | "port"
                | "portrange"
                | "proto"
                | "protochain"
                | "less"
                | "greater"
                | "len"
                | "and"
                | "or"
                | "not"
                | "multicast"
                | "mask"
        )
}

// ---- parser ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Default,
    Host,
    Net,
    Port,
    Portrange,
}

/// The qualifiers of a primitive: a bare value after and/or inherits them.
#[derive(Clone, Copy, Debug)]
struct Quals {
    proto: Option<Pname>,
    dir: Dir,
    kind: Kind,
}

struct Parser<'n> {
    toks: Vec<Tok>,
    pos: usize,
    end_col: usize,
    names: &'n Names,
    last: Option<Quals>,
}

fn is_relop(t: Option<&T>) -> bool {
    matches!(t, Some(T::Op("=" | "==" | "!=" | "<" | "<=" | ">" | ">=")))
}

fn is_arith_op(t: Option<&T>) -> bool {
    matches!(
        t,
        Some(T::Op("+" | "-" | "*" | "/" | "%" | "&" | "|" | "^" | "<<" | ">>"))
    )
}

impl Parser<'_> {
    fn at(&self, k: usize) -> Option<&T> {
        self.toks.get(self.pos + k).map(|t| &t.t)
    }
    fn word(&self, k: usize) -> Option<&str> {
        match self.at(k) {
            Some(T::Word(w)) => Some(w.as_str()),
            _ => None,
        }
    }
    fn is_op(&self, k: usize, op: &str) -> bool {
        matches!(self.at(k), Some(T::Op(o)) if *o == op)
    }
    fn col(&self) -> usize {
        self.toks.get(self.pos).map(|t| t.col).unwrap_or(self.end_col)
    }
    fn err<T>(&self, msg: impl Into<String>) -> Result<T, FilterError> {
        Err(FilterError {
            msg: msg.into(),
            col: self.col(),
        })
    }
    fn err_at<T>(col: usize, msg: impl Into<String>) -> Result<T, FilterError> {
        Err(FilterError { msg: msg.into(), col })
    }
    fn describe(&self) -> String {
        match self.at(0) {
            Some(T::Word(w)) => format!("{w:?}"),
            Some(T::Op(o)) => format!("{o:?}"),
            None => "the end".into(),
        }
    }
    fn conj(&self) -> Option<bool> {
        match self.at(0) {
            Some(T::Word(w)) if w == "and" => Some(true),
            Some(T::Word(w)) if w == "or" => Some(false),
            Some(T::Op("&&")) => Some(true),
            Some(T::Op("||")) => Some(false),
            _ => None,
        }
    }

    fn expr(&mut self) -> Result<Expr, FilterError> {
        let mut l = self.term()?;
        while let Some(and) = self.conj() {
            self.pos += 1;
            let r = self.term()?;
            l = if and {
                Expr::And(Box::new(l), Box::new(r))
            } else {
                Expr::Or(Box::new(l), Box::new(r))
            };
        }
        Ok(l)
    }

    /// A value with no qualifier before it: an address, a name, or a number that is not the
    /// start of a relation.
    fn bare_value_at(&self, k: usize) -> bool {
        match self.word(k) {
            Some(w) if !is_keyword(w) => {
                !(number(w).is_some() && (is_relop(self.at(k + 1)) || is_arith_op(self.at(k + 1))))
            }
            _ => false,
        }
    }

    fn term(&mut self) -> Result<Expr, FilterError> {
        if let Some(q) = self.last
            && self.inherits()
        {
            return self.id(q);
        }
        if matches!(self.word(0), Some("not")) || self.is_op(0, "!") {
            self.pos += 1;
            return Ok(Expr::Not(Box::new(self.term()?)));
        }
        if self.is_op(0, "(") {
            let save = self.pos;
            if let Some(rel) = self.try_relation()? {
                return Ok(rel);
            }
            self.pos = save + 1;
            let e = self.expr()?;
            if !self.is_op(0, ")") {
                return self.err(format!("expected ')', found {}", self.describe()));
            }
            self.pos += 1;
            return Ok(e);
        }
        let Some(w) = self.word(0).map(str::to_string) else {
            return match self.at(0) {
                None => self.err("expression ends too early"),
                Some(T::Op("-")) => self.relation(),
                Some(_) => self.err(format!("unexpected {}", self.describe())),
            };
        };
        if let Some(why) = refused(&w) {
            return self.err(format!("{w:?} cannot apply: {why}"));
        }
        if w == "len" || number(&w).is_some() || (pname(&w).is_some() && self.is_op(1, "[")) {
            return self.relation();
        }
        match w.as_str() {
            "less" | "greater" => {
                self.pos += 1;
                let Some(n) = self.word(0).and_then(number) else {
                    return self.err(format!("{w} needs a number"));
                };
                self.pos += 1;
                let rel = if w == "less" { Rel::Le } else { Rel::Ge };
                return Ok(Expr::Rel(Arith::Len, rel, Arith::Num(n)));
            }
            "multicast" => {
                return self
                    .err("\"multicast\" alone tests the Ethernet address: say \"ip multicast\" or \"ip6 multicast\"");
            }
            _ => {}
        }
        let p = pname(&w);
        if let Some(p) = p {
            match self.word(1) {
                Some("proto") | Some("protochain") => {
                    self.pos += 2;
                    return self.proto_value(p.family(), &w);
                }
                Some("multicast") => {
                    self.pos += 2;
                    return match p.family() {
                        Some(f) => Ok(Expr::Multicast(f)),
                        None => Self::err_at(
                            self.toks[self.pos - 1].col,
                            format!("\"{w} multicast\" is not a test: only ip and ip6 have multicast addresses"),
                        ),
                    };
                }
                Some("broadcast") => {
                    self.pos += 1;
                    return self.err(format!(
                        "\"broadcast\" cannot apply: {}",
                        refused("broadcast").unwrap_or_default()
                    ));
                }
                Some("src" | "dst" | "host" | "net" | "port" | "portrange") => {
                    self.pos += 1;
                }
                _ => {
                    self.pos += 1;
                    self.last = None;
                    return Ok(p.primitive());
                }
            }
        } else if matches!(w.as_str(), "proto" | "protochain") {
            self.pos += 1;
            return self.proto_value(None, &w);
        }
        let q = self.head(p)?;
        self.last = Some(q);
        self.id(q)
    }

    /// Whether what follows is a value that takes the qualifiers of the primitive before it.
    fn inherits(&self) -> bool {
        let mut k = 0;
        loop {
            if matches!(self.word(k), Some("not")) || self.is_op(k, "!") || self.is_op(k, "(") {
                k += 1;
            } else {
                return self.bare_value_at(k);
            }
        }
    }

    /// `[dir] [kind]` after an optional protocol: at least one of them.
    fn head(&mut self, proto: Option<Pname>) -> Result<Quals, FilterError> {
        let mut dir = Dir::Any;
        let had_dir = matches!(self.word(0), Some("src" | "dst"));
        if had_dir {
            let src = self.word(0) == Some("src");
            self.pos += 1;
            let other = if src { "dst" } else { "src" };
            dir = if src { Dir::Src } else { Dir::Dst };
            if let Some(and) = self.conj()
                && self.word(1) == Some(other)
            {
                self.pos += 2;
                dir = if and { Dir::Both } else { Dir::Any };
            }
        }
        let kind = match self.word(0) {
            Some("host") => Kind::Host,
            Some("net") => Kind::Net,
            Some("port") => Kind::Port,
            Some("portrange") => Kind::Portrange,
            _ if had_dir => Kind::Default,
            _ => {
                return self.err(format!(
                    "unknown keyword {} (expected a primitive: host, net, port, portrange, a protocol, ...)",
                    self.describe()
                ));
            }
        };
        if kind != Kind::Default {
            self.pos += 1;
        }
        Ok(Quals { proto, dir, kind })
    }

    fn proto_value(&mut self, fam: Option<Fam>, kw: &str) -> Result<Expr, FilterError> {
        let Some(w) = self.word(0) else {
            return self.err(format!("{kw} needs a protocol number or name"));
        };
        let Some(n) = proto_number(w) else {
            return self.err(format!("unknown protocol {w:?}"));
        };
        self.pos += 1;
        Ok(Expr::Proto(fam, n))
    }

    /// A value, `not` a value, or a parenthesised and/or of values, with the qualifiers given.
    fn id(&mut self, q: Quals) -> Result<Expr, FilterError> {
        if matches!(self.word(0), Some("not")) || self.is_op(0, "!") {
            self.pos += 1;
            return Ok(Expr::Not(Box::new(self.id(q)?)));
        }
        if self.is_op(0, "(") {
            self.pos += 1;
            let mut l = self.id(q)?;
            while let Some(and) = self.conj() {
                self.pos += 1;
                let r = self.id(q)?;
                l = if and {
                    Expr::And(Box::new(l), Box::new(r))
                } else {
                    Expr::Or(Box::new(l), Box::new(r))
                };
            }
            if !self.is_op(0, ")") {
                return self.err(format!("expected ')', found {}", self.describe()));
            }
            self.pos += 1;
            return Ok(l);
        }
        let col = self.col();
        let what = match q.kind {
            Kind::Default | Kind::Host => "host",
            Kind::Net => "net",
            Kind::Port => "port",
            Kind::Portrange => "portrange",
        };
        let Some(v) = self.word(0).map(str::to_string) else {
            return self.err(format!("{what} needs a value"));
        };
        if is_keyword(&v) {
            return self.err(format!("{what} needs a value, found {v:?}"));
        }
        self.pos += 1;
        match q.kind {
            Kind::Default | Kind::Host => self.host(q, &v, col),
            Kind::Net => self.net(q, &v, col),
            Kind::Port | Kind::Portrange => self.port(q, &v, col),
        }
    }

    fn host(&mut self, q: Quals, v: &str, col: usize) -> Result<Expr, FilterError> {
        let fam = match q.proto {
            None => None,
            Some(p) => match p.family() {
                Some(f) => Some(f),
                None => {
                    return Self::err_at(
                        col,
                        format!("'{}' cannot qualify a host (say \"{} and host {v}\")", p.name, p.name),
                    );
                }
            },
        };
        let addrs: Vec<IpAddr> = match v.parse::<IpAddr>() {
            Ok(a) => vec![a],
            Err(_) if v.bytes().all(|b| b.is_ascii_digit() || b == b'.') => {
                return Self::err_at(col, format!("invalid address {v:?}"));
            }
            Err(_) => match self.names.hosts.get(&v.to_ascii_lowercase()) {
                Some(a) => a.clone(),
                None => {
                    return Self::err_at(
                        col,
                        format!("unknown host {v:?} (lotrace reads names from /etc/hosts; it does not ask DNS)"),
                    );
                }
            },
        };
        let addrs: Vec<IpAddr> = addrs
            .into_iter()
            .filter(|a| fam.is_none_or(|f| (f == Fam::V6) == a.is_ipv6()))
            .collect();
        if addrs.is_empty() {
            let f = if fam == Some(Fam::V6) { "IPv6" } else { "IPv4" };
            return Self::err_at(col, format!("{v:?} has no {f} address"));
        }
        Ok(Expr::Host(q.dir, addrs))
    }

    fn net(&mut self, q: Quals, v: &str, col: usize) -> Result<Expr, FilterError> {
        let bad = |m: String| Self::err_at(col, m);
        if q.proto.is_some_and(|p| p.family().is_none()) {
            let p = q.proto.map(|p| p.name).unwrap_or_default();
            return bad(format!("'{p}' cannot qualify a net (say \"{p} and net {v}\")"));
        }
        // A v4 network may be written short: "127" is 127.0.0.0/8, "10.1" 10.1.0.0/16.
        let (addr, natural) = match v.parse::<IpAddr>() {
            Ok(a) => (a, if a.is_ipv4() { 32 } else { 128 }),
            Err(_) => {
                let parts: Vec<&str> = v.split('.').collect();
                let octets: Option<Vec<u8>> = parts.iter().map(|p| p.parse::<u8>().ok()).collect();
                match octets {
                    Some(o) if (1..=3).contains(&o.len()) => {
                        let mut b = [0u8; 4];
                        b[..o.len()].copy_from_slice(&o);
                        (IpAddr::from(b), 8 * o.len() as u8)
                    }
                    _ => return bad(format!("invalid network {v:?}")),
                }
            }
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = if self.is_op(0, "/") {
            self.pos += 1;
            match self.word(0).and_then(|w| w.parse::<u8>().ok()) {
                Some(n) if n <= max => {
                    self.pos += 1;
                    n
                }
                _ => return self.err(format!("invalid prefix length after {v:?}")),
            }
        } else if self.word(0) == Some("mask") {
            self.pos += 1;
            let m = self.word(0).and_then(|w| w.parse::<IpAddr>().ok());
            let len = match (m, addr) {
                (Some(IpAddr::V4(m)), IpAddr::V4(_)) => {
                    let m = u32::from(m);
                    (m.leading_ones() + m.trailing_zeros() == 32).then_some(m.leading_ones() as u8)
                }
                _ => None,
            };
            let Some(len) = len else {
                return self.err("mask needs an IPv4 netmask of contiguous ones (255.255.0.0)");
            };
            self.pos += 1;
            len
        } else {
            natural
        };
        if mask(&addr, len) != addr {
            return bad(format!("non-network bits set in \"{v}/{len}\""));
        }
        if let Some(f) = q.proto.and_then(Pname::family)
            && (f == Fam::V6) != addr.is_ipv6()
        {
            return bad(format!(
                "{v:?} is not an {} network",
                if f == Fam::V6 { "IPv6" } else { "IPv4" }
            ));
        }
        Ok(Expr::Net(q.dir, addr, len))
    }

    fn port(&mut self, q: Quals, v: &str, col: usize) -> Result<Expr, FilterError> {
        let proto = match q.proto {
            None => None,
            Some(p) => match p.port_proto() {
                Some(n) => Some(n),
                None => {
                    return Self::err_at(
                        col,
                        format!("'{}' cannot qualify a port (only tcp, udp and sctp have ports)", p.name),
                    );
                }
            },
        };
        let protos: &[&str] = match proto {
            Some(PROTO_TCP) => &["tcp"],
            Some(PROTO_UDP) => &["udp"],
            Some(_) => &["sctp"],
            None => &["tcp", "udp", "sctp"],
        };
        // One port: a number, or a service name (per protocol: a name's tcp and udp ports may differ).
        let one = |s: &str| -> Result<Vec<(Option<u8>, u16)>, String> {
            if let Some(n) = number(s) {
                return u16::try_from(n)
                    .map(|p| vec![(proto, p)])
                    .map_err(|_| format!("illegal port number {n} > 65535"));
            }
            let found: Vec<(u8, u16)> = protos
                .iter()
                .filter_map(|pr| {
                    let n = match *pr {
                        "tcp" => PROTO_TCP,
                        "udp" => PROTO_UDP,
                        _ => PROTO_SCTP,
                    };
                    self.names
                        .services
                        .get(&(s.to_string(), pr.to_string()))
                        .map(|p| (n, *p))
                })
                .collect();
            if found.is_empty() {
                return Err(format!(
                    "unknown port {s:?} (not a number, nor a service in /etc/services)"
                ));
            }
            // One port under every protocol that names it: one test with the qualifier's protocol
            // (libpcap's); different ports: one test per protocol.
            if found.iter().all(|f| f.1 == found[0].1) && (found.len() > 1 || protos.len() == 1) {
                return Ok(vec![(proto, found[0].1)]);
            }
            Ok(found.into_iter().map(|(n, p)| (Some(n), p)).collect())
        };
        let alts: Vec<(Option<u8>, u16, u16)> = if q.kind == Kind::Portrange {
            let split = (1..v.len())
                .filter(|&i| v.as_bytes()[i] == b'-')
                .find_map(|i| Some((one(&v[..i]).ok()?, one(&v[i + 1..]).ok()?)));
            let Some((a, b)) = split else {
                return Self::err_at(col, format!("invalid port range {v:?} (expected LOW-HIGH)"));
            };
            let (a, b) = (a[0].1, b[0].1);
            vec![(proto, a.min(b), a.max(b))]
        } else {
            one(v)
                .or_else(|m| Self::err_at(col, m))?
                .into_iter()
                .map(|(pr, p)| (pr, p, p))
                .collect()
        };
        let mut it = alts.into_iter().map(|(proto, lo, hi)| Expr::Port {
            proto,
            dir: q.dir,
            lo,
            hi,
        });
        let first = it.next().unwrap_or(Expr::Port {
            proto,
            dir: q.dir,
            lo: 0,
            hi: 0,
        });
        Ok(it.fold(first, |a, b| Expr::Or(Box::new(a), Box::new(b))))
    }

    // ---- relations ----

    /// A relation if what follows is one; `None` (and nothing consumed) if it is no arithmetic
    /// followed by a comparison, so a parenthesis can open a group instead.
    fn try_relation(&mut self) -> Result<Option<Expr>, FilterError> {
        let save = self.pos;
        match self.arith(0) {
            Ok(_) if is_relop(self.at(0)) => {
                self.pos = save;
                self.relation().map(Some)
            }
            _ => {
                self.pos = save;
                Ok(None)
            }
        }
    }

    fn relation(&mut self) -> Result<Expr, FilterError> {
        let l = self.arith(0)?;
        let rel = match self.at(0) {
            Some(T::Op("=" | "==")) => Rel::Eq,
            Some(T::Op("!=")) => Rel::Ne,
            Some(T::Op("<")) => Rel::Lt,
            Some(T::Op("<=")) => Rel::Le,
            Some(T::Op(">")) => Rel::Gt,
            Some(T::Op(">=")) => Rel::Ge,
            _ => {
                return self.err(format!(
                    "expected a comparison (=, !=, <, <=, >, >=), found {}",
                    self.describe()
                ));
            }
        };
        self.pos += 1;
        let r = self.arith(0)?;
        Ok(Expr::Rel(l, rel, r))
    }

    /// Precedence climbing: level 0 is the loosest operator.
    fn arith(&mut self, level: usize) -> Result<Arith, FilterError> {
        const LEVELS: [&[(&str, Op)]; 5] = [
            &[("|", Op::Or), ("^", Op::Xor)],
            &[("&", Op::And)],
            &[("<<", Op::Shl), (">>", Op::Shr)],
            &[("+", Op::Add), ("-", Op::Sub)],
            &[("*", Op::Mul), ("/", Op::Div), ("%", Op::Mod)],
        ];
        if level == LEVELS.len() {
            return self.unary_arith();
        }
        let mut l = self.arith(level + 1)?;
        while let Some(T::Op(o)) = self.at(0) {
            let Some(&(_, op)) = LEVELS[level].iter().find(|(s, _)| s == o) else {
                break;
            };
            self.pos += 1;
            let col = self.col();
            let r = self.arith(level + 1)?;
            if matches!(op, Op::Div | Op::Mod) && r == Arith::Num(0) {
                return Self::err_at(col, "division by zero");
            }
            l = Arith::Bin(op, Box::new(l), Box::new(r));
        }
        Ok(l)
    }

    fn unary_arith(&mut self) -> Result<Arith, FilterError> {
        if self.is_op(0, "-") {
            self.pos += 1;
            return Ok(Arith::Neg(Box::new(self.unary_arith()?)));
        }
        if self.is_op(0, "(") {
            self.pos += 1;
            let a = self.arith(0)?;
            if !self.is_op(0, ")") {
                return self.err(format!("expected ')', found {}", self.describe()));
            }
            self.pos += 1;
            return Ok(a);
        }
        let Some(w) = self.word(0).map(str::to_string) else {
            return self.err(format!(
                "expected a number, len or a header byte, found {}",
                self.describe()
            ));
        };
        if w == "len" {
            self.pos += 1;
            return Ok(Arith::Len);
        }
        if let Some(n) = number(&w) {
            self.pos += 1;
            return Ok(Arith::Num(n));
        }
        if let Some(r) = refused(&w)
            && self.is_op(1, "[")
        {
            return self.err(format!("{w:?} cannot apply: {r}"));
        }
        let Some(p) = pname(&w) else {
            return self.err(format!("expected a number, len or a header byte, found {w:?}"));
        };
        if !self.is_op(1, "[") {
            return self.err(format!("expected '[' after {w:?} in arithmetic"));
        }
        let Some(base) = p.load_base() else {
            return self.err(format!("{w:?} has no header lotrace can index"));
        };
        self.pos += 2;
        let off = self.arith(0)?;
        let mut size = 1u8;
        if self.is_op(0, ":") {
            self.pos += 1;
            size = match self.word(0).and_then(number) {
                Some(n @ (1 | 2 | 4)) => n as u8,
                _ => return self.err("data size must be 1, 2 or 4"),
            };
            self.pos += 1;
        }
        if !self.is_op(0, "]") {
            return self.err(format!("expected ']', found {}", self.describe()));
        }
        self.pos += 1;
        Ok(Arith::Load {
            base,
            name: p.name,
            off: Box::new(off),
            size,
        })
    }
}

/// Parses a filter with the names of this machine (/etc/hosts, /etc/services).
pub fn parse(s: &str) -> Result<Expr, FilterError> {
    parse_with(s, Names::system())
}

pub fn parse_with(s: &str, names: &Names) -> Result<Expr, FilterError> {
    let toks = lex(s)?;
    let mut p = Parser {
        toks,
        pos: 0,
        end_col: s.chars().count() + 1,
        names,
        last: None,
    };
    if p.at(0).is_none() {
        return p.err("empty filter");
    }
    let e = p.expr()?;
    if p.at(0).is_some() {
        return p.err(format!("unexpected {} (missing 'and'/'or'?)", p.describe()));
    }
    Ok(e)
}

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
            Arith::Bin(op, a, b) => {
                let (a, b) = (a.value(k)?, b.value(k)?);
                match op {
                    Op::Add => a.wrapping_add(b),
                    Op::Sub => a.wrapping_sub(b),
                    Op::Mul => a.wrapping_mul(b),
                    Op::Div => a.checked_div(b).ok_or(Reject)?,
                    Op::Mod => a.checked_rem(b).ok_or(Reject)?,
                    Op::And => a & b,
                    Op::Or => a | b,
                    Op::Xor => a ^ b,
                    Op::Shl => a.checked_shl(b).unwrap_or(0),
                    Op::Shr => a.checked_shr(b).unwrap_or(0),
                }
            }
        })
    }

    fn constant(&self) -> Option<u32> {
        match self {
            Arith::Num(n) => Some(*n),
            Arith::Neg(a) => Some(a.constant()?.wrapping_neg()),
            Arith::Bin(op, a, b) => {
                let (a, b) = (a.constant()?, b.constant()?);
                Some(match op {
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
mod tests {
    use super::*;
    use crate::path::tests::icmp_info;

    fn names() -> Names {
        Names::from_files(
            "127.0.0.1 localhost\n::1 localhost ip6-localhost # comment\n10.0.0.1 other\n",
            "domain 53/tcp\ndomain 53/udp\nhttp 80/tcp www\nsyslog 514/udp\nodd 7/tcp\nodd 9/udp\n",
        )
    }

    fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> PacketInfo {
        PacketInfo {
            proto: PROTO_UDP,
            sport: Some(sport),
            dport: Some(dport),
            icmp: None,
            ..icmp_info(src, dst, 0, 0, 0)
        }
    }

    fn m(f: &str, p: &PacketInfo) -> bool {
        mb(f, p, None)
    }

    fn mb(f: &str, p: &PacketInfo, frame: Option<&[u8]>) -> bool {
        let e = parse_with(f, &names()).unwrap_or_else(|e| panic!("{f}: {e}"));
        e.matches(&Packet {
            info: p,
            frame,
            len: frame.map_or(0, |f| f.len() as u32),
        })
    }

    #[test]
    fn primitives_and_operators() {
        let u = udp("127.0.0.1", 5000, "127.0.0.2", 53);
        let i6 = icmp_info("::1", "::1", 128, 1, 1);
        assert!(m("udp", &u) && !m("tcp", &u) && !m("icmp", &u));
        assert!(m("icmp6", &i6) && m("ip6", &i6) && !m("ip", &i6));
        assert!(m("host 127.0.0.2", &u) && m("dst host 127.0.0.2", &u) && !m("src host 127.0.0.2", &u));
        assert!(m("net 127.0.0.0/8", &u) && !m("net 10.0.0.0/8", &u) && m("net ::/0", &i6));
        assert!(m("port 53", &u) && m("src port 5000", &u) && !m("dst port 5000", &u));
        assert!(m("udp and port 53", &u) && !m("udp and port 54", &u));
        assert!(m("tcp or udp", &u) && m("not tcp", &u) && m("! tcp", &u));
        assert!(m("(tcp or udp) and not (port 22 or port 80)", &u));
        assert!(m("udp && (port 1 || port 53)", &u));
        assert!(!m("icmp", &i6), "icmp means ICMPv4 as in tcpdump");
    }

    #[test]
    fn tcpdump_forms() {
        let u = udp("127.0.0.1", 5000, "127.0.0.2", 53);
        let t = PacketInfo {
            proto: PROTO_TCP,
            ..u.clone()
        };
        assert!(m("udp port 53", &u) && !m("tcp port 53", &u) && m("tcp port 53", &t));
        assert!(m("udp dst port 53", &u) && !m("udp src port 53", &u));
        assert!(m("port domain", &u) && m("udp port domain", &u) && !m("port http", &u));
        assert!(m("ip proto 17", &u) && m("ip proto \\udp", &u) && !m("ip6 proto 17", &u) && m("proto 17", &u));
        assert!(m("src 127.0.0.1", &u) && !m("dst 127.0.0.1", &u) && m("src or dst 127.0.0.2", &u));
        assert!(!m("src and dst host 127.0.0.1", &u));
        assert!(m("portrange 50-60", &u) && m("udp portrange 60-50", &u) && !m("portrange 1-52", &u));
        assert!(m("dst host localhost", &icmp_info("::1", "::1", 128, 1, 1)) && !m("dst host localhost", &u));
        assert!(m("src host localhost", &u) && m("ip host localhost", &u));
        assert!(m("net 127", &u) && m("net 127.0.0.0 mask 255.0.0.0", &u) && m("net 127/8", &u));
        assert!(m("port 53 or 80", &u) && m("port 80 or 53", &u) && !m("port 80 or 81", &u));
        assert!(m("host 10.0.0.1 or 127.0.0.2", &u) && !m("host 127.0.0.1 and not 127.0.0.2", &u));
        assert!(m("ip multicast", &udp("127.0.0.1", 1, "224.0.0.1", 2)) && !m("ip multicast", &u));
        // and and or have the same precedence, left to right, as in tcpdump.
        assert!(m("tcp and port 1 or udp", &u), "(tcp and port 1) or udp");
        assert!(!m("udp or tcp and port 1", &u), "(udp or tcp) and port 1");
        // A service with different ports per protocol.
        assert!(m("port odd", &udp("127.0.0.1", 9, "127.0.0.1", 1)));
        assert!(
            !m("port odd", &udp("127.0.0.1", 7, "127.0.0.1", 1)),
            "odd is 7 for tcp only"
        );
    }

    /// An Ethernet + IPv4 + TCP frame with these flags.
    fn tcp_frame(flags: u8, ihl_words: u8) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend([0x08, 0x00]);
        let ihl = ihl_words as usize * 4;
        let mut ip = vec![0u8; ihl];
        ip[0] = 0x40 | ihl_words;
        ip[9] = PROTO_TCP;
        f.extend(ip);
        let mut tcp = vec![0u8; 20];
        tcp[12] = 0x50;
        tcp[13] = flags;
        f.extend(tcp);
        f
    }

    #[test]
    fn header_bytes() {
        let t = PacketInfo {
            proto: PROTO_TCP,
            ..udp("127.0.0.1", 1, "127.0.0.1", 2)
        };
        let syn = tcp_frame(0x02, 5);
        let ack = tcp_frame(0x10, 6);
        for f in [
            "tcp[tcpflags] & tcp-syn != 0",
            "tcp[13] & 2 != 0",
            "tcp[13] = 2",
            "ip[9] == 6",
            "len >= 54",
            "less 54",
            "greater 54",
        ] {
            assert!(mb(f, &t, Some(&syn)), "{f}");
        }
        assert!(!mb("tcp[13] & 2 != 0", &t, Some(&ack)), "options move the TCP header");
        assert!(mb("tcp[13] = tcp-ack", &t, Some(&ack)));
        assert!(mb("tcp[12:1] >> 4 = 5", &t, Some(&ack)));
        assert!(mb("(tcp[12] & 0xf0) >> 2 = 20", &t, Some(&ack)));
        assert!(mb("tcp[0:4] = 0 and ip[0] & 0xf = 6", &t, Some(&ack)));
        assert!(!mb("udp[0] = 0", &t, Some(&syn)), "not UDP");
        assert!(
            mb("not udp[0] = 0", &t, Some(&syn)),
            "a header that is not there is a false test"
        );
        // Past the captured bytes: the packet is rejected, even under `not` (BPF).
        assert!(!mb("tcp[100] = 0", &t, Some(&syn)) && !mb("not tcp[100] = 0", &t, Some(&syn)));
        assert!(!mb("tcp[13] = 2", &t, None), "no bytes kept: no byte test passes");
        assert!(
            !mb("tcp[0] / (tcp[0]) = 1", &t, Some(&syn)),
            "division by zero at run time rejects"
        );
        assert!(mb(
            "2 + 3 * 4 = 14 and 1 << 4 | 1 = 17 and -1 = 0xffffffff and 017 = 15",
            &t,
            Some(&syn)
        ));
        let e = parse_with("tcp[13] & 2 != 0", &names()).expect("parses");
        assert!(e.reads_bytes() && !parse_with("tcp", &names()).expect("parses").reads_bytes());
        assert!(e.check_capture(96).is_ok());
        let far = parse_with("ip[100:2] = 1", &names()).expect("parses");
        let err = far.check_capture(96).expect_err("beyond 96");
        assert!(
            err.contains("ip[100:2]") && err.contains("116") && err.contains("96"),
            "{err}"
        );
        assert!(far.check_capture(200).is_ok());
    }

    #[test]
    fn errors_point_at_the_problem() {
        let cases = [
            ("", 1, "empty"),
            ("host", 5, "needs a value"),
            ("host 1.2.3", 6, "invalid address"),
            ("port 70000", 6, "illegal port"),
            ("net 10.0.0.0/33", 14, "prefix"),
            ("net 10.0.0.1/8", 5, "non-network bits"),
            ("udp tcp", 5, "missing"),
            ("(udp or tcp", 12, "expected ')'"),
            ("bogus", 1, "unknown keyword"),
            ("udp and", 8, "ends too early"),
            (")", 1, "unexpected \")\""),
            ("ether host 0:0:0:0:0:0", 1, "no link layer"),
            ("arp", 1, "no ARP"),
            ("vlan 10", 1, "VLAN"),
            ("tcp host 127.0.0.1", 10, "cannot qualify a host"),
            ("ip port 53", 9, "cannot qualify a port"),
            ("host nosuchname", 6, "does not ask DNS"),
            ("port nosuchservice", 6, "/etc/services"),
            ("tcp[13:3] = 1", 8, "1, 2 or 4"),
            ("tcp[13] > 1 / 0", 15, "division by zero"),
            ("tcp[13]", 8, "expected a comparison"),
            ("ip6 host 127.0.0.1", 10, "no IPv6 address"),
            ("inbound", 1, "both outbound and inbound"),
            ("udp $", 5, "unexpected character"),
            ("less", 5, "needs a number"),
        ];
        for (f, col, needle) in cases {
            let e = parse_with(f, &names()).expect_err(f);
            assert!(e.to_string().contains(needle), "{f}: {e}");
            assert_eq!(e.col, col, "{f}: {e}");
        }
    }
}
