//! The lexer and the recursive-descent parser of the filter language (grammar: `super`).
use std::net::IpAddr;

use super::{Arith, Base, Dir, Expr, Fam, FilterError, Names, Op, PROTO_SCTP, Rel, mask};
use crate::decode::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

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
            Ok(l) if is_relop(self.at(0)) => self.relation_after(l).map(Some),
            _ => {
                self.pos = save;
                Ok(None)
            }
        }
    }

    fn relation(&mut self) -> Result<Expr, FilterError> {
        let l = self.arith(0)?;
        self.relation_after(l)
    }

    /// The comparison and right side of a relation whose left side is `l`.
    fn relation_after(&mut self, l: Arith) -> Result<Expr, FilterError> {
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
