//! The JSON schema of a packet (README, "JSON output"), in one encoder: written by hand, key
//! by key, because this is the hot path of `trace --format json` (serde_json spent most of its
//! time escaping the same key names for every stage). Every key is always present; strings from
//! the kernel or the user are escaped as JSON requires (as serde_json does). A snapshot test
//! pins the output byte for byte.
//!
//! How it is cheap: a line is written into a reused buffer already grown to a bound on the
//! packet's line ([`room`]), through [`Out`], whose pieces are copies of a fixed size (a few
//! moves each, no `memcpy` call, no capacity check) cut back to their length; numbers are
//! written in place; a stage's task fields, nearly always the previous stage's, are copied
//! from where they were written. Everything is bounds-checked slice access: no `unsafe`.
use std::net::IpAddr;

use serde_json::Value;

use super::text::table_name;
use crate::{
    decode::{Name, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, json_escaped, proto_name, proto_str},
    hooks::StageKind,
    path::{PacketPath, SoftirqContext, Verdict},
};

/// JSON lines, written straight into one buffer (grown to a bound on each line, zeroed once,
/// then reused) that is handed on whole: the printer writes it to stdout in large writes, with
/// no copy of each line into a second buffer.
#[derive(Default)]
pub struct JsonLines {
    buf: Vec<u8>,
    filled: usize,
}

impl JsonLines {
    /// Appends the packet's line (and its newline).
    pub fn push(&mut self, p: &PacketPath) {
        let need = self.filled + room(p) + 1;
        if self.buf.len() < need {
            self.buf.resize(need, 0);
        }
        let mut o = Out {
            b: &mut self.buf[self.filled..],
            at: 0,
        };
        o.packet(p);
        o.byte(b'\n');
        self.filled += o.at;
    }

    /// The lines written since the last [`Self::clear`].
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.filled]
    }

    pub fn len(&self) -> usize {
        self.filled
    }

    pub fn is_empty(&self) -> bool {
        self.filled == 0
    }

    pub fn clear(&mut self) {
        self.filled = 0;
    }
}

#[cfg(any(test, feature = "test-support"))]
/// The same as a `Value` (tests).
pub fn packet_json(p: &PacketPath) -> Value {
    serde_json::from_slice(&written(room(p), |o| o.packet(p))).unwrap_or(Value::Null)
}

/// A packet's `stages` array as a `Value` (`prove`'s report embeds it).
pub fn stages_json(p: &PacketPath) -> Value {
    serde_json::from_slice(&written(room(p), |o| o.stages(p))).unwrap_or(Value::Null)
}

/// What `f` writes, in a buffer of its own.
fn written(room: usize, f: impl FnOnce(&mut Out)) -> Vec<u8> {
    let mut b = Vec::new();
    let mut o = Out::new(&mut b, room);
    f(&mut o);
    let n = o.at;
    b.truncate(n);
    b
}

/// The most bytes one stage takes, with the slack of the fixed-size copies: `{"stage":`
/// and its name (40), two numbers of up to 20 digits and four of up to 10, the keys (about 60),
/// two names escaped at up to 6 bytes per byte (2 × 98), the 64-byte copy of the task fields.
const STAGE_ROOM: usize = 512;

/// Room for a packet's line: the fixed keys and values (IPv6 addresses, the softirq task and
/// route device escaped, a routing table's name) within 2 KiB, the drop reason escaped at up
/// to 6 bytes per byte, and each stage. A piece past it would panic (an internal error, one
/// line), never write elsewhere.
fn room(p: &PacketPath) -> usize {
    2048 + 6 * p.drop_reason.as_ref().map_or(0, String::len) + STAGE_ROOM * p.stages.len()
}

/// "00" to "99": two digits per step.
const PAIRS: &[u8; 200] = b"\
0001020304050607080910111213141516171819\
2021222324252627282930313233343536373839\
4041424344454647484950515253545556575859\
6061626364656667686970717273747576777879\
8081828384858687888990919293949596979899";

/// Room for any u64 in decimal.
type Digits = [u8; 20];

#[inline(always)]
fn pair(out: &mut Digits, at: usize, d: u32) {
    let d = d as usize * 2;
    out[at] = PAIRS[d];
    out[at + 1] = PAIRS[d + 1];
}

/// How many decimal digits `n` (below 10^8) has (1 for 0): from its bit length, whose
/// logarithm `* 1233 >> 12` (log10(2) in 12 bits) is the digit count or one more, then one
/// comparison (`ilog10` took about 17 instructions, a tenth of writing the JSON line's numbers).
#[inline(always)]
fn digits(n: u32) -> usize {
    const POW10: [u32; 9] = [1, 10, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000, 100_000_000];
    let m = n | 1;
    let t = (((32 - m.leading_zeros()) * 1233) >> 12) as usize;
    t + 1 - usize::from(m < POW10[t])
}

/// `n` (below 10^8) without leading zeros at the start of `out`; returns its length.
#[inline(always)]
fn upto8(out: &mut Digits, mut n: u32) -> usize {
    let len = digits(n);
    let mut i = len;
    while n >= 100 {
        i -= 2;
        pair(out, i, n % 100);
        n /= 100;
    }
    if n >= 10 {
        pair(out, 0, n);
    } else {
        out[0] = b'0' + n as u8;
    }
    len
}

/// `n` (below 10^8) as exactly 8 digits at `at`.
#[inline(always)]
fn eight(out: &mut Digits, at: usize, n: u32) {
    let (hi, lo) = (n / 10_000, n % 10_000);
    pair(out, at, hi / 100);
    pair(out, at + 2, hi % 100);
    pair(out, at + 4, lo / 100);
    pair(out, at + 6, lo % 100);
}

/// "0" to "255", each in 4 bytes, with its length.
const OCTETS: [([u8; 4], usize); 256] = {
    let mut t = [([0u8; 4], 0usize); 256];
    let mut n = 0;
    while n < 256 {
        let (h, d, u) = ((n / 100) as u8, (n / 10 % 10) as u8, (n % 10) as u8);
        t[n] = if n >= 100 {
            ([b'0' + h, b'0' + d, b'0' + u, 0], 3)
        } else if n >= 10 {
            ([b'0' + d, b'0' + u, 0, 0], 2)
        } else {
            ([b'0' + u, 0, 0, 0], 1)
        };
        n += 1;
    }
    t
};

/// Room for the longest `{"stage":"NAME","t_ns":` (backlog_enqueue: 34 bytes).
const HEAD: usize = 40;

/// `{"stage":"NAME","t_ns":` of every stage, zero-padded to [`HEAD`] bytes, with its length.
const HEADS: [([u8; HEAD], usize); StageKind::ALL.len()] = {
    let mut t = [([0u8; HEAD], 0usize); StageKind::ALL.len()];
    let (pre, post) = (b"{\"stage\":\"", b"\",\"t_ns\":");
    let mut k = 0;
    while k < StageKind::ALL.len() {
        let name = StageKind::ALL[k].as_str().as_bytes();
        let mut i = 0;
        while i < pre.len() {
            t[k].0[i] = pre[i];
            i += 1;
        }
        let mut j = 0;
        while j < name.len() {
            t[k].0[i + j] = name[j];
            j += 1;
        }
        let mut m = 0;
        while m < post.len() {
            t[k].0[i + j + m] = post[m];
            m += 1;
        }
        t[k].1 = i + j + m;
        k += 1;
    }
    t
};

/// Room for the longest piece of [`TAILS`]: `,"dev":null}` (12 bytes), then `,` and the
/// longest [`HEADS`] entry (35 bytes).
const TAIL: usize = 48;

/// The end of a stage whose device is none or `lo`, with the opening of the stage after it, as
/// one piece: `TAILS[dev][next]` is `,"dev":null}` (dev 0) or `,"dev":"lo"}` (dev 1), then
/// `,{"stage":"NEXT","t_ns":` of stage kind `next`, or `]` (next = the number of kinds: the
/// last stage). Nearly every stage's device is one of the two: one fixed-size copy where there
/// were five writes.
const TAILS: [[([u8; TAIL], usize); StageKind::ALL.len() + 1]; 2] = {
    let mut t = [[([0u8; TAIL], 0usize); StageKind::ALL.len() + 1]; 2];
    let devs: [&[u8; 12]; 2] = [b",\"dev\":null}", b",\"dev\":\"lo\"}"];
    let mut d = 0;
    while d < 2 {
        let mut k = 0;
        while k <= StageKind::ALL.len() {
            let (piece, len) = &mut t[d][k];
            let mut i = 0;
            while i < 12 {
                piece[i] = devs[d][i];
                i += 1;
            }
            if k == StageKind::ALL.len() {
                piece[i] = b']';
                i += 1;
            } else {
                piece[i] = b',';
                i += 1;
                let (head, n) = &HEADS[k];
                let mut j = 0;
                while j < *n {
                    piece[i] = head[j];
                    i += 1;
                    j += 1;
                }
            }
            *len = i;
            k += 1;
        }
        d += 1;
    }
    t
};

/// Room for a short string this program writes, quoted.
const SHORT: usize = 24;

/// `"s"`, zero-padded to [`SHORT`] bytes, with its length: a string known when the program is
/// built, written as one fixed-size copy (a `memcpy` call of its length cost more).
const fn quoted(s: &str) -> ([u8; SHORT], usize) {
    let b = s.as_bytes();
    assert!(b.len() + 2 <= SHORT);
    let mut q = [0u8; SHORT];
    q[0] = b'"';
    let mut i = 0;
    while i < b.len() {
        q[i + 1] = b[i];
        i += 1;
    }
    q[i + 1] = b'"';
    (q, i + 2)
}

/// The names of `$t::ALL`, quoted, indexed by the value they name (checked when the program is
/// built).
macro_rules! quoted_names {
    ($t:ty) => {{
        let mut t = [([0u8; SHORT], 0); <$t>::ALL.len()];
        let mut i = 0;
        while i < t.len() {
            assert!(<$t>::ALL[i] as usize == i);
            t[i] = quoted(<$t>::ALL[i].as_str());
            i += 1;
        }
        t
    }};
}

/// Each verdict's name, quoted, indexed by the verdict.
const VERDICTS: [([u8; SHORT], usize); Verdict::ALL.len()] = quoted_names!(Verdict);

/// Each softirq context's name, quoted, indexed by the context.
const CONTEXTS: [([u8; SHORT], usize); SoftirqContext::ALL.len()] = quoted_names!(SoftirqContext);

/// The name of a transport protocol this program knows, quoted (see [`proto_str`]).
fn proto_quoted(p: u8) -> Option<&'static ([u8; SHORT], usize)> {
    const fn q(p: u8) -> ([u8; SHORT], usize) {
        match proto_str(p) {
            Some(s) => quoted(s),
            None => panic!("a known protocol"),
        }
    }
    const ICMP: ([u8; SHORT], usize) = q(PROTO_ICMP);
    const TCP: ([u8; SHORT], usize) = q(PROTO_TCP);
    const UDP: ([u8; SHORT], usize) = q(PROTO_UDP);
    const ICMPV6: ([u8; SHORT], usize) = q(PROTO_ICMPV6);
    Some(match p {
        PROTO_ICMP => &ICMP,
        PROTO_TCP => &TCP,
        PROTO_UDP => &UDP,
        PROTO_ICMPV6 => &ICMPV6,
        _ => return None,
    })
}

/// A line being written: `b` is the whole room, `at` how much is written.
struct Out<'a> {
    b: &'a mut [u8],
    at: usize,
}

impl<'a> Out<'a> {
    /// Writes from the start of `buf`, grown (zeroed once, then reused) to at least `room`.
    fn new(buf: &'a mut Vec<u8>, room: usize) -> Self {
        if buf.len() < room {
            buf.resize(room, 0);
        }
        Out { b: buf, at: 0 }
    }

    /// A literal: its size is known, so the copy is a few moves.
    #[inline(always)]
    fn lit<const N: usize>(&mut self, s: &[u8; N]) {
        self.b[self.at..self.at + N].copy_from_slice(s);
        self.at += N;
    }

    /// The first `len` bytes of `s`, copied as all of its N (a fixed size) and cut back.
    #[inline(always)]
    fn cut<const N: usize>(&mut self, s: &[u8; N], len: usize) {
        self.b[self.at..self.at + N].copy_from_slice(s);
        self.at += len.min(N);
    }

    #[inline(always)]
    fn byte(&mut self, c: u8) {
        self.b[self.at] = c;
        self.at += 1;
    }

    fn bytes(&mut self, s: &[u8]) {
        self.b[self.at..self.at + s.len()].copy_from_slice(s);
        self.at += s.len();
    }

    /// Writes again the `len` bytes written at `from`: as a fixed N-byte copy when they are
    /// that short and N bytes lie written behind `from` (what follows them is cut back).
    #[inline(always)]
    fn again<const N: usize>(&mut self, from: usize, len: usize) {
        if len <= N && from + N <= self.at {
            let (done, free) = self.b.split_at_mut(self.at);
            free[..N].copy_from_slice(&done[from..from + N]);
        } else {
            self.b.copy_within(from..from + len, self.at);
        }
        self.at += len;
    }

    /// Room for the longest number, where the next byte goes.
    #[inline(always)]
    fn digits_at(&mut self) -> &mut Digits {
        let Some(out) = self.b[self.at..].first_chunk_mut::<20>() else {
            panic!("a JSON line outgrew its room");
        };
        out
    }

    /// An unsigned number in decimal, written in place: cut into runs of 8 digits done in
    /// 32-bit arithmetic, two digits per step. (itoa writes into a buffer of its own, copied
    /// after with a `memcpy` call of a variable length: about a third of its cost here.)
    #[inline(always)]
    fn num(&mut self, n: impl Into<u64>) {
        const E8: u64 = 100_000_000;
        let n: u64 = n.into();
        let out = self.digits_at();
        let len = if n < E8 {
            upto8(out, n as u32)
        } else if n < E8 * E8 {
            let l = upto8(out, (n / E8) as u32);
            eight(out, l, (n % E8) as u32);
            l + 8
        } else {
            let l = upto8(out, (n / (E8 * E8)) as u32);
            eight(out, l, (n / E8 % E8) as u32);
            eight(out, l + 8, (n % E8) as u32);
            l + 16
        };
        self.at += len;
    }

    /// A stage's time. Its digits above the last eight (whole tenths of a second) are nearly
    /// always the stage before's: copied from where they were written (`prev`: their value,
    /// where and how long), not formatted again. The last eight are written in place.
    #[inline(always)]
    fn time(&mut self, t: u64, prev: &mut Option<(u64, usize, usize)>) {
        const E8: u64 = 100_000_000;
        let high = t / E8;
        if high == 0 {
            return self.num(t);
        }
        if high < 100 {
            // Up to 10 digits (less than 10 s since boot: fixtures, fresh guests), written whole.
            let out = self.digits_at();
            let l = if high >= 10 {
                pair(out, 0, high as u32);
                2
            } else {
                out[0] = b'0' + high as u8;
                1
            };
            eight(out, l, (t % E8) as u32);
            self.at += l + 8;
            return;
        }
        match *prev {
            // At most 12 digits: a fixed 16-byte copy.
            Some((h, from, len)) if h == high => self.again::<16>(from, len),
            _ => {
                let from = self.at;
                self.num(high);
                *prev = Some((high, from, self.at - from));
            }
        }
        eight(self.digits_at(), 0, (t % E8) as u32);
        self.at += 8;
    }

    /// A signed number (a route lookup's error).
    fn signed(&mut self, n: i32) {
        if n < 0 {
            self.byte(b'-');
        }
        self.num(n.unsigned_abs());
    }

    fn opt_num(&mut self, n: Option<impl Into<u64>>) {
        match n {
            Some(n) => self.num(n),
            None => self.lit(b"null"),
        }
    }

    fn boolean(&mut self, v: bool) {
        if v { self.lit(b"true") } else { self.lit(b"false") }
    }

    /// A kernel name as a JSON string. A name that needs no escaping (nearly all) is copied as
    /// its fixed 16 bytes and cut to its length; the others are escaped byte by byte.
    #[inline]
    fn name(&mut self, n: Name) {
        if n.needs_escape() {
            return self.string(n.as_bytes());
        }
        let (raw, len) = n.raw();
        self.byte(b'"');
        self.cut(raw, len);
        self.byte(b'"');
    }

    fn opt_name(&mut self, n: Option<Name>) {
        match n {
            Some(n) => self.name(n),
            None => self.lit(b"null"),
        }
    }

    /// A string known to need no escaping (this program's own names, an IPv6 address).
    fn plain(&mut self, s: &str) {
        debug_assert!(!s.bytes().any(json_escaped));
        self.byte(b'"');
        self.bytes(s.as_bytes());
        self.byte(b'"');
    }

    /// A JSON string, escaped exactly like serde_json (`"`, `\\`, control characters).
    fn string(&mut self, s: &[u8]) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        self.byte(b'"');
        let mut start = 0;
        for (i, &c) in s.iter().enumerate() {
            if !json_escaped(c) {
                continue;
            }
            self.bytes(&s[start..i]);
            start = i + 1;
            match c {
                b'"' => self.lit(b"\\\""),
                b'\\' => self.lit(b"\\\\"),
                b'\n' => self.lit(b"\\n"),
                b'\r' => self.lit(b"\\r"),
                b'\t' => self.lit(b"\\t"),
                0x08 => self.lit(b"\\b"),
                0x0c => self.lit(b"\\f"),
                _ => self.lit(&[b'\\', b'u', b'0', b'0', HEX[(c >> 4) as usize], HEX[(c & 0xf) as usize]]),
            }
        }
        self.bytes(&s[start..]);
        self.byte(b'"');
    }

    fn opt_string(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.string(s.as_bytes()),
            None => self.lit(b"null"),
        }
    }

    /// An address byte in decimal, from a table: one 4-byte copy.
    #[inline(always)]
    fn octet(&mut self, o: u8) {
        let (digits, len) = &OCTETS[o as usize];
        self.cut(digits, *len);
    }

    fn ip(&mut self, a: Option<IpAddr>) {
        match a {
            Some(IpAddr::V4(v4)) => {
                let [x, y, z, w] = v4.octets();
                self.byte(b'"');
                self.octet(x);
                for o in [y, z, w] {
                    self.byte(b'.');
                    self.octet(o);
                }
                self.byte(b'"');
            }
            Some(a) => self.plain(&a.to_string()),
            None => self.lit(b"null"),
        }
    }

    fn packet(&mut self, p: &PacketPath) {
        let info = p.info.as_ref();
        let first = p.first_ts();
        self.lit(b"{\"id\":");
        self.num(p.id);
        self.lit(b",\"t_ns\":");
        self.num(first);
        self.lit(b",\"proto\":");
        match info {
            Some(i) => match proto_quoted(i.proto) {
                Some((q, len)) => self.cut(q, *len),
                None => self.plain(&proto_name(i.proto)),
            },
            None => self.lit(b"null"),
        }
        self.lit(b",\"src\":");
        self.ip(info.map(|i| i.src));
        self.lit(b",\"dst\":");
        self.ip(info.map(|i| i.dst));
        self.lit(b",\"len\":");
        self.num(p.len);
        self.lit(b",\"sport\":");
        self.opt_num(info.and_then(|i| i.sport));
        self.lit(b",\"dport\":");
        self.opt_num(info.and_then(|i| i.dport));
        self.lit(b",\"icmp\":");
        match info.and_then(|i| i.icmp.map(|c| (c, i.icmp_echo()))) {
            Some((c, echo)) => {
                self.lit(b"{\"type\":");
                self.num(c.ty);
                self.lit(b",\"code\":");
                self.num(c.code);
                // Only echo messages have an identifier and a sequence number.
                self.lit(b",\"id\":");
                self.opt_num(echo.map(|e| e.0));
                self.lit(b",\"seq\":");
                self.opt_num(echo.map(|e| e.1));
                self.byte(b'}');
            }
            None => self.lit(b"null"),
        }
        self.lit(b",\"tcp\":");
        match info.and_then(|i| i.tcp) {
            Some(t) => {
                self.lit(b"{\"seq\":");
                self.num(t.seq);
                self.lit(b",\"ack\":");
                self.num(t.ack);
                self.lit(b",\"flags\":");
                self.num(t.flags);
                self.byte(b'}');
            }
            None => self.lit(b"null"),
        }
        self.lit(b",\"tx_dev\":");
        self.opt_name(p.tx_dev);
        self.lit(b",\"rx_dev\":");
        self.opt_name(p.rx_dev);
        self.lit(b",\"left_host\":");
        self.boolean(p.left_host());
        self.lit(b",\"complete\":");
        self.boolean(p.complete);
        if p.in_flight_at_start {
            self.lit(b",\"in_flight_at_start\":true");
        }
        self.lit(b",\"verdict\":");
        let (q, len) = &VERDICTS[p.verdict as usize];
        self.cut(q, *len);
        self.lit(b",\"drop_reason\":");
        self.opt_string(p.drop_reason.as_deref());
        self.lit(b",\"reply_of\":");
        self.opt_num(p.reply_of);
        self.lit(b",\"clone_of\":");
        self.opt_num(p.clone_of);
        self.lit(b",\"route\":");
        match &p.route {
            Some(r) => {
                self.lit(b"{\"table\":");
                self.num(r.table);
                self.lit(b",\"table_name\":");
                self.string(table_name(r.table).as_bytes());
                self.lit(b",\"dev\":");
                self.name(r.dev);
                self.lit(b",\"dst\":");
                self.ip(Some(r.dst));
                self.lit(b",\"src\":");
                self.ip(Some(r.src));
                self.lit(b",\"err\":");
                self.signed(r.err);
                self.byte(b'}');
            }
            None => self.lit(b"null"),
        }
        self.lit(b",\"softirq\":");
        match &p.softirq {
            Some(s) => {
                self.lit(b"{\"cpu\":");
                self.num(s.cpu);
                self.lit(b",\"context\":");
                let (q, len) = &CONTEXTS[s.context as usize];
                self.cut(q, *len);
                self.lit(b",\"task\":");
                self.name(s.task);
                self.lit(b",\"pid\":");
                self.num(s.pid);
                self.lit(b",\"raised\":");
                self.boolean(s.raised);
                self.lit(b",\"new_run\":");
                self.boolean(s.new_run);
                self.byte(b'}');
            }
            None => self.lit(b"null"),
        }
        self.lit(b",\"latency_ns\":");
        self.num(p.last_ts().saturating_sub(first));
        self.lit(b",\"stages\":");
        self.stages(p);
        self.byte(b'}');
    }

    /// A packet's stages with their deltas: the `stages` array of every JSON output.
    fn stages(&mut self, p: &PacketPath) {
        let Some(first) = p.stages.first() else {
            return self.lit(b"[]");
        };
        self.byte(b'[');
        let (head, len) = &HEADS[first.stage as usize];
        self.cut(head, *len);
        // `,"cpu":…,"pid":…,"tid":…,"comm":"…"` is nearly always the previous stage's (one task
        // runs a packet's path from send to receive): copied from where it was written, not
        // formatted again.
        type Task = (u32, u32, u32, Name);
        let mut task: Option<(Task, usize, usize)> = None;
        let mut high = None;
        let mut stages = p.timed_stages().peekable();
        while let Some((s, d)) = stages.next() {
            // (The stage's opening is written already: by the end of the stage before.)
            self.time(s.t_ns, &mut high);
            self.lit(b",\"delta_ns\":");
            self.num(d);
            let key = (s.cpu, s.pid, s.tid, s.comm);
            match task {
                Some((k, from, len)) if k == key => self.again::<64>(from, len),
                _ => {
                    let from = self.at;
                    self.lit(b",\"cpu\":");
                    self.num(s.cpu);
                    self.lit(b",\"pid\":");
                    self.num(s.pid);
                    self.lit(b",\"tid\":");
                    self.num(s.tid);
                    self.lit(b",\"comm\":");
                    self.name(s.comm);
                    task = Some((key, from, self.at - from));
                }
            }
            let next = stages.peek().map_or(StageKind::ALL.len(), |(n, _)| n.stage as usize);
            let dev = match s.dev {
                None => Some(0),
                Some(d) if d.raw() == (&LO, 2) => Some(1),
                Some(_) => None,
            };
            match dev {
                Some(dev) => {
                    let (piece, len) = &TAILS[dev][next];
                    self.cut(piece, *len);
                }
                None => {
                    self.lit(b",\"dev\":");
                    self.opt_name(s.dev);
                    self.byte(b'}');
                    match HEADS.get(next) {
                        Some((head, len)) => {
                            self.byte(b',');
                            self.cut(head, *len);
                        }
                        None => self.byte(b']'),
                    }
                }
            }
        }
    }
}

/// `lo`'s name as [`Name::raw`] holds it.
const LO: [u8; loopback_common::NAME_LEN] = {
    let mut a = [0; loopback_common::NAME_LEN];
    a[0] = b'l';
    a[1] = b'o';
    a
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_written_as_std_writes_them() {
        let mut edges = vec![0, u64::MAX, u64::MAX - 1];
        for p in 0..20u32 {
            let t = 10u64.pow(p);
            edges.extend([t - 1, t, t + 1]);
        }
        // Every magnitude, not only 20-digit numbers.
        edges.extend(
            crate::fixture::xorshift(0x2545_f491_4f6c_dd1d)
                .take(100_000)
                .map(|x| x >> (x % 64)),
        );
        for n in edges {
            assert_eq!(written(64, |o| o.num(n)), n.to_string().as_bytes());
        }
        for n in [0, 1, -1, 42, -42, i32::MIN, i32::MAX] {
            assert_eq!(written(64, |o| o.signed(n)), n.to_string().as_bytes());
        }
    }

    #[test]
    fn digit_counts_are_those_of_std() {
        for n in (0..100_000_000u32)
            .step_by(97)
            .chain([0, 1, 9, 10, 99, 100, 99_999_999])
        {
            assert_eq!(digits(n), n.to_string().len(), "{n}");
        }
        for p in 0..8 {
            let t = 10u32.pow(p);
            for n in [t - 1, t, t + 1] {
                assert_eq!(digits(n), n.to_string().len(), "{n}");
            }
        }
    }

    #[test]
    fn addresses_are_written_as_std_writes_them() {
        for o in 0..=255u8 {
            let a = IpAddr::from([o, 255 - o, o / 3, 7]);
            assert_eq!(written(64, |w| w.ip(Some(a))), format!("\"{a}\"").as_bytes());
        }
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let mut s: Vec<u8> = (0u8..0x80).collect();
        s.extend_from_slice("é✓ plain".as_bytes());
        let text = String::from_utf8(s).expect("utf-8");
        let mine = written(8 * text.len(), |o| o.string(text.as_bytes()));
        assert_eq!(mine, serde_json::to_vec(&text).expect("serializes"));
    }

    /// Stage times of every size, whose digits above the last eight stay, change, or are none:
    /// each is read back as written (the copied high digits and the eight written in place).
    #[test]
    fn stage_times_of_every_size_are_written_exactly() {
        let (ps, _) = crate::fixture::reconstruct(crate::fixture::session(1));
        let base = ps.iter().max_by_key(|p| p.stages.len()).expect("a packet").clone();
        let starts = [
            0,
            5,
            99_999_990,
            100_000_000,
            1_000_002_000,
            9_999_999_999,
            10_000_000_000,
            86_400_099_999_999,
            u64::MAX / 2,
            u64::MAX - 1_000_000_000,
        ];
        for start in starts {
            for step in [0, 1, 37_000_000, 99_999_999, 100_000_000, 3_000_000_001] {
                let mut p = base.clone();
                for (i, st) in p.stages.iter_mut().enumerate() {
                    st.t_ns = start.saturating_add(step * i as u64);
                }
                let v = packet_json(&p);
                let stages = v["stages"].as_array().expect("stages");
                assert_eq!(stages.len(), p.stages.len());
                let mut prev = p.first_ts();
                for (st, j) in p.stages.iter().zip(stages) {
                    assert_eq!(j["t_ns"].as_u64(), Some(st.t_ns), "start {start} step {step}");
                    assert_eq!(j["delta_ns"].as_u64(), Some(st.t_ns - prev));
                    prev = st.t_ns;
                }
            }
        }
    }

    #[test]
    fn repeated_bytes_are_the_bytes_written_before_short_or_long() {
        for len in [0, 1, 17, 63, 64, 65, 200] {
            let text: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            for gap in [0, 1, 16, 64, 300] {
                let mut want = text.clone();
                want.extend(vec![b'-'; gap]);
                want.extend(&text);
                // Both copy sizes the writer uses (the task fields, a time's high digits).
                let got = written(2048, |o| {
                    o.bytes(&text);
                    o.bytes(&vec![b'-'; gap]);
                    o.again::<64>(0, text.len());
                });
                assert_eq!(got, want, "len {len} gap {gap}");
                let got = written(2048, |o| {
                    o.bytes(&text);
                    o.bytes(&vec![b'-'; gap]);
                    o.again::<16>(0, text.len());
                });
                assert_eq!(got, want, "len {len} gap {gap} (16)");
            }
        }
    }
}
