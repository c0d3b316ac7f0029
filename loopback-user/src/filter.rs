//! A tcpdump-like filter language over reconstructed packets:
//!
//! ```text
//! expr    := and ( ("or" | "||") and )*
//! and     := unary ( ("and" | "&&") unary )*
//! unary   := ("not" | "!") unary | "(" expr ")" | primitive
//! primitive := [src|dst] host ADDR | [src|dst] net ADDR/LEN | [src|dst] port N
//!            | icmp | icmp6 | tcp | udp | ip | ip6
//! ```
//! Errors name the problem and the column (1-based) where it was found.
use std::net::IpAddr;

use crate::decode::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, PacketInfo};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dir {
    Any,
    Src,
    Dst,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expr {
    Host(Dir, IpAddr),
    Net(Dir, IpAddr, u8),
    Port(Dir, u16),
    Proto(u8),
    Family(bool), // true = IPv6
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

#[derive(Clone, Debug)]
struct Tok {
    text: String,
    col: usize,
}

fn lex(s: &str) -> Vec<Tok> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut start = 0;
    for (i, c) in s.char_indices() {
        if c.is_whitespace() || c == '(' || c == ')' || c == '!' {
            if !cur.is_empty() {
                out.push(Tok {
                    text: std::mem::take(&mut cur),
                    col: start + 1,
                });
            }
            if !c.is_whitespace() {
                out.push(Tok {
                    text: c.to_string(),
                    col: i + 1,
                });
            }
        } else {
            if cur.is_empty() {
                start = i;
            }
            cur.push(c);
        }
    }
    if !cur.is_empty() {
        out.push(Tok {
            text: cur,
            col: start + 1,
        });
    }
    out
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    end_col: usize,
}

impl Parser {
    fn peek(&self) -> Option<&str> {
        self.toks.get(self.pos).map(|t| t.text.as_str())
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
    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }
    fn or(&mut self) -> Result<Expr, FilterError> {
        let mut l = self.and()?;
        while matches!(self.peek(), Some("or") | Some("||")) {
            self.pos += 1;
            let r = self.and()?;
            l = Expr::Or(Box::new(l), Box::new(r));
        }
        Ok(l)
    }
    fn and(&mut self) -> Result<Expr, FilterError> {
        let mut l = self.unary()?;
        while matches!(self.peek(), Some("and") | Some("&&")) {
            self.pos += 1;
            let r = self.unary()?;
            l = Expr::And(Box::new(l), Box::new(r));
        }
        Ok(l)
    }
    fn unary(&mut self) -> Result<Expr, FilterError> {
        match self.peek() {
            Some("not") | Some("!") => {
                self.pos += 1;
                Ok(Expr::Not(Box::new(self.unary()?)))
            }
            Some("(") => {
                self.pos += 1;
                let e = self.or()?;
                if self.peek() != Some(")") {
                    return self.err("expected ')'");
                }
                self.pos += 1;
                Ok(e)
            }
            Some(")") => self.err("unexpected ')'"),
            None => self.err("expression ends too early"),
            Some(_) => self.primitive(),
        }
    }
    fn primitive(&mut self) -> Result<Expr, FilterError> {
        let dir = match self.peek() {
            Some("src") => Dir::Src,
            Some("dst") => Dir::Dst,
            _ => Dir::Any,
        };
        if dir != Dir::Any {
            self.pos += 1;
        }
        let col = self.col();
        let Some(kw) = self.next() else {
            return self.err("expected host, net or port");
        };
        let kw_text = kw.text.to_ascii_lowercase();
        match kw_text.as_str() {
            "host" | "net" | "port" => {
                let Some(arg) = self.next() else {
                    self.pos -= 1;
                    return Err(FilterError {
                        msg: format!("{kw_text} needs a value"),
                        col: self.end_col,
                    });
                };
                let bad = |m: String| Err(FilterError { msg: m, col: arg.col });
                match kw_text.as_str() {
                    "host" => match arg.text.parse::<IpAddr>() {
                        Ok(a) => Ok(Expr::Host(dir, a)),
                        Err(_) => bad(format!("invalid address {:?}", arg.text)),
                    },
                    "net" => {
                        let (a, l) = arg.text.split_once('/').unwrap_or((arg.text.as_str(), ""));
                        let Ok(addr) = a.parse::<IpAddr>() else {
                            return bad(format!("invalid network {:?}", arg.text));
                        };
                        let max = if addr.is_ipv4() { 32 } else { 128 };
                        let len = if l.is_empty() {
                            max
                        } else {
                            match l.parse::<u8>() {
                                Ok(n) if n <= max => n,
                                _ => return bad(format!("invalid prefix length in {:?}", arg.text)),
                            }
                        };
                        Ok(Expr::Net(dir, addr, len))
                    }
                    _ => match arg.text.parse::<u16>() {
                        Ok(p) => Ok(Expr::Port(dir, p)),
                        Err(_) => bad(format!("invalid port {:?}", arg.text)),
                    },
                }
            }
            _ if dir != Dir::Any => Err(FilterError {
                msg: format!("expected host, net or port after direction, found {:?}", kw.text),
                col,
            }),
            "icmp" => Ok(Expr::Proto(PROTO_ICMP)),
            "icmp6" => Ok(Expr::Proto(PROTO_ICMPV6)),
            "tcp" => Ok(Expr::Proto(PROTO_TCP)),
            "udp" => Ok(Expr::Proto(PROTO_UDP)),
            "ip" => Ok(Expr::Family(false)),
            "ip6" => Ok(Expr::Family(true)),
            _ => Err(FilterError {
                msg: format!("unknown keyword {:?}", kw.text),
                col,
            }),
        }
    }
}

pub fn parse(s: &str) -> Result<Expr, FilterError> {
    let toks = lex(s);
    let mut p = Parser {
        toks,
        pos: 0,
        end_col: s.chars().count() + 1,
    };
    if p.peek().is_none() {
        return p.err("empty filter");
    }
    let e = p.or()?;
    if p.peek().is_some() {
        return p.err(format!(
            "unexpected {:?} (missing 'and'/'or'?)",
            p.peek().unwrap_or_default()
        ));
    }
    Ok(e)
}

fn in_net(a: &IpAddr, net: &IpAddr, len: u8) -> bool {
    match (a, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let m = if len == 0 { 0 } else { u32::MAX << (32 - len as u32) };
            u32::from(*a) & m == u32::from(*n) & m
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let m = if len == 0 { 0 } else { u128::MAX << (128 - len as u32) };
            u128::from(*a) & m == u128::from(*n) & m
        }
        _ => false,
    }
}

fn by_dir<T>(dir: &Dir, s: Option<T>, d: Option<T>, f: impl Fn(T) -> bool) -> bool {
    match dir {
        Dir::Src => s.is_some_and(&f),
        Dir::Dst => d.is_some_and(&f),
        Dir::Any => s.is_some_and(&f) || d.is_some_and(&f),
    }
}

impl Expr {
    /// Whether a finished packet passes: its headers match (one with no headers seen never
    /// does). The one filter of `trace`, `replay` and the dashboard.
    pub fn passes(&self, p: &crate::path::PacketPath) -> bool {
        p.info.as_ref().is_some_and(|i| self.matches(i))
    }

    pub fn matches(&self, p: &PacketInfo) -> bool {
        match self {
            Expr::Host(d, a) => by_dir(d, Some(p.src), Some(p.dst), |x| x == *a),
            Expr::Net(d, n, l) => by_dir(d, Some(p.src), Some(p.dst), |x| in_net(&x, n, *l)),
            Expr::Port(d, port) => by_dir(d, p.sport, p.dport, |x| x == *port),
            Expr::Proto(n) => p.proto == *n,
            Expr::Family(v6) => p.src.is_ipv6() == *v6,
            Expr::Not(e) => !e.matches(p),
            Expr::And(a, b) => a.matches(p) && b.matches(p),
            Expr::Or(a, b) => a.matches(p) || b.matches(p),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::tests::icmp_info;

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
        parse(f).unwrap_or_else(|e| panic!("{f}: {e}")).matches(p)
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
    fn errors_point_at_the_problem() {
        let cases = [
            ("", 1, "empty"),
            ("host", 5, "needs a value"),
            ("host 1.2.3", 6, "invalid address"),
            ("port 70000", 6, "invalid port"),
            ("net 10.0.0.0/33", 5, "prefix"),
            ("udp tcp", 5, "missing"),
            ("(udp or tcp", 12, "expected ')'"),
            ("src icmp", 5, "after direction"),
            ("bogus", 1, "unknown keyword"),
            ("udp and", 8, "ends too early"),
            (")", 1, "unexpected ')'"),
        ];
        for (f, col, needle) in cases {
            let e = parse(f).expect_err(f);
            assert_eq!(e.col, col, "{f}: {e}");
            assert!(e.to_string().contains(needle), "{f}: {e}");
        }
    }
}
