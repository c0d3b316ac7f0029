//! The JSON schema of a packet (README, "JSON output"), in one encoder: written by hand, key
//! by key, because this is the hot path of `trace --format json` (serde_json spent most of its
//! time escaping the same key names for every stage). Every key is always present; strings from
//! the kernel or the user are escaped as JSON requires (as serde_json does). A snapshot test
//! pins the output byte for byte.
use std::{io::Write, net::IpAddr};

use serde_json::Value;

use super::text::table_name;
use crate::{
    decode::{Name, json_escaped, proto_name, proto_str},
    hooks::StageKind,
    path::PacketPath,
};

/// One JSON line for a packet, written straight to `w`. Formatting goes into a reused buffer,
/// then one write.
pub fn write_packet_json(w: &mut impl std::io::Write, p: &PacketPath) -> std::io::Result<()> {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUF.with_borrow_mut(|b| {
        b.clear();
        packet(b, p);
        b.push(b'\n');
        w.write_all(b)
    })
}

#[cfg(any(test, feature = "test-support"))]
/// The same as a `Value` (tests).
pub fn packet_json(p: &PacketPath) -> Value {
    let mut b = Vec::new();
    packet(&mut b, p);
    serde_json::from_slice(&b).unwrap_or(Value::Null)
}

/// A packet's `stages` array as a `Value` (`prove`'s report embeds it).
pub fn stages_json(p: &PacketPath) -> Value {
    let mut b = Vec::new();
    stages(&mut b, p);
    serde_json::from_slice(&b).unwrap_or(Value::Null)
}

/// "00" to "99": two digits per step.
const PAIRS: &[u8; 200] = b"\
0001020304050607080910111213141516171819\
2021222324252627282930313233343536373839\
4041424344454647484950515253545556575859\
6061626364656667686970717273747576777879\
8081828384858687888990919293949596979899";

/// An unsigned number in decimal, its digits written straight into the buffer's spare room
/// (itoa writes into its own buffer, which then costs a `memcpy` call of a variable length).
/// Numbers are cut into runs of 8 digits done in 32-bit arithmetic, two digits per step.
#[inline]
fn num(b: &mut Vec<u8>, n: impl Into<u64>) {
    const E8: u64 = 100_000_000;
    let n: u64 = n.into();
    b.reserve(20);
    let start = b.len();
    let Some(out) = b.spare_capacity_mut().first_chunk_mut::<20>() else {
        unreachable!("20 bytes were reserved")
    };
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
    // SAFETY: upto8 and eight wrote every one of the `len` bytes (at most 20) past `start`,
    // inside the room reserved above.
    unsafe { b.set_len(start + len) };
}

type Room = [std::mem::MaybeUninit<u8>; 20];

#[inline(always)]
fn pair(out: &mut Room, at: usize, d: u32) {
    let d = d as usize * 2;
    out[at].write(PAIRS[d]);
    out[at + 1].write(PAIRS[d + 1]);
}

/// `n` (below 10^8) without leading zeros at the start of `out`; returns its length.
#[inline(always)]
fn upto8(out: &mut Room, mut n: u32) -> usize {
    let len = n.checked_ilog10().map_or(1, |l| l as usize + 1);
    let mut i = len;
    while n >= 100 {
        i -= 2;
        pair(out, i, n % 100);
        n /= 100;
    }
    if n >= 10 {
        pair(out, 0, n);
    } else {
        out[0].write(b'0' + n as u8);
    }
    len
}

/// `n` (below 10^8) as exactly 8 digits at `at`.
#[inline(always)]
fn eight(out: &mut Room, at: usize, n: u32) {
    let (hi, lo) = (n / 10_000, n % 10_000);
    pair(out, at, hi / 100);
    pair(out, at + 2, hi % 100);
    pair(out, at + 4, lo / 100);
    pair(out, at + 6, lo % 100);
}

/// A signed number (a route lookup's error).
fn signed(b: &mut Vec<u8>, n: i32) {
    if n < 0 {
        b.push(b'-');
    }
    num(b, n.unsigned_abs());
}

/// A kernel name as a JSON string. A name that needs no escaping (nearly all) is copied as its
/// fixed 16 bytes and cut to its length; the others are escaped byte by byte.
fn name(b: &mut Vec<u8>, n: Name) {
    if n.needs_escape() {
        return bytes(b, n.as_bytes());
    }
    let (raw, len) = n.raw();
    let mut out = [b'"'; 18];
    out[1..17].copy_from_slice(raw);
    out[1 + len] = b'"';
    let start = b.len();
    b.extend_from_slice(&out);
    b.truncate(start + len + 2);
}

fn opt_num(b: &mut Vec<u8>, n: Option<impl Into<u64>>) {
    match n {
        Some(n) => num(b, n),
        None => b.extend_from_slice(b"null"),
    }
}

fn boolean(b: &mut Vec<u8>, v: bool) {
    b.extend_from_slice(if v { b"true" } else { b"false" });
}

/// A JSON string, escaped exactly like serde_json (`"`, `\\`, control characters).
fn string(b: &mut Vec<u8>, s: &str) {
    bytes(b, s.as_bytes());
}

/// A string known to need no escaping (this program's own stage and verdict names).
fn plain(b: &mut Vec<u8>, s: &'static str) {
    debug_assert!(!s.bytes().any(json_escaped));
    b.push(b'"');
    b.extend_from_slice(s.as_bytes());
    b.push(b'"');
}

fn bytes(b: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    b.push(b'"');
    if !bytes.iter().any(|&c| json_escaped(c)) {
        b.extend_from_slice(bytes);
        b.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &c) in bytes.iter().enumerate() {
        let esc: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => {
                b.extend_from_slice(&bytes[start..i]);
                b.extend_from_slice(b"\\u00");
                b.push(HEX[(c >> 4) as usize]);
                b.push(HEX[(c & 0xf) as usize]);
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        b.extend_from_slice(&bytes[start..i]);
        b.extend_from_slice(esc);
        start = i + 1;
    }
    b.extend_from_slice(&bytes[start..]);
    b.push(b'"');
}

fn opt_string(b: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => string(b, s),
        None => b.extend_from_slice(b"null"),
    }
}

fn opt_name(b: &mut Vec<u8>, n: Option<Name>) {
    match n {
        Some(n) => name(b, n),
        None => b.extend_from_slice(b"null"),
    }
}

fn ip(b: &mut Vec<u8>, a: Option<IpAddr>) {
    match a {
        Some(IpAddr::V4(v4)) => {
            let [x, y, z, w] = v4.octets();
            b.push(b'"');
            num(b, x);
            for o in [y, z, w] {
                b.push(b'.');
                num(b, o);
            }
            b.push(b'"');
        }
        Some(a) => {
            let _ = write!(b, "\"{a}\"");
        }
        None => b.extend_from_slice(b"null"),
    }
}

fn packet(b: &mut Vec<u8>, p: &PacketPath) {
    let info = p.info.as_ref();
    let first = p.first_ts();
    b.extend_from_slice(b"{\"id\":");
    num(b, p.id);
    b.extend_from_slice(b",\"t_ns\":");
    num(b, first);
    b.extend_from_slice(b",\"proto\":");
    match info {
        Some(i) => match proto_str(i.proto) {
            Some(s) => plain(b, s),
            None => string(b, &proto_name(i.proto)),
        },
        None => b.extend_from_slice(b"null"),
    }
    b.extend_from_slice(b",\"src\":");
    ip(b, info.map(|i| i.src));
    b.extend_from_slice(b",\"dst\":");
    ip(b, info.map(|i| i.dst));
    b.extend_from_slice(b",\"len\":");
    num(b, p.len);
    b.extend_from_slice(b",\"sport\":");
    opt_num(b, info.and_then(|i| i.sport));
    b.extend_from_slice(b",\"dport\":");
    opt_num(b, info.and_then(|i| i.dport));
    b.extend_from_slice(b",\"icmp\":");
    match info.and_then(|i| i.icmp) {
        Some(c) => {
            b.extend_from_slice(b"{\"type\":");
            num(b, c.ty);
            b.extend_from_slice(b",\"code\":");
            num(b, c.code);
            b.extend_from_slice(b",\"id\":");
            num(b, c.id);
            b.extend_from_slice(b",\"seq\":");
            num(b, c.seq);
            b.push(b'}');
        }
        None => b.extend_from_slice(b"null"),
    }
    b.extend_from_slice(b",\"tcp\":");
    match info.and_then(|i| i.tcp) {
        Some(t) => {
            b.extend_from_slice(b"{\"seq\":");
            num(b, t.seq);
            b.extend_from_slice(b",\"ack\":");
            num(b, t.ack);
            b.extend_from_slice(b",\"flags\":");
            num(b, t.flags);
            b.push(b'}');
        }
        None => b.extend_from_slice(b"null"),
    }
    b.extend_from_slice(b",\"tx_dev\":");
    opt_name(b, p.tx_dev);
    b.extend_from_slice(b",\"rx_dev\":");
    opt_name(b, p.rx_dev);
    b.extend_from_slice(b",\"left_host\":");
    boolean(b, p.left_host());
    b.extend_from_slice(b",\"complete\":");
    boolean(b, p.complete);
    b.extend_from_slice(b",\"verdict\":");
    plain(b, p.verdict.as_str());
    b.extend_from_slice(b",\"drop_reason\":");
    opt_string(b, p.drop_reason.as_deref());
    b.extend_from_slice(b",\"reply_of\":");
    opt_num(b, p.reply_of);
    b.extend_from_slice(b",\"clone_of\":");
    opt_num(b, p.clone_of);
    b.extend_from_slice(b",\"route\":");
    match &p.route {
        Some(r) => {
            b.extend_from_slice(b"{\"table\":");
            num(b, r.table);
            b.extend_from_slice(b",\"table_name\":");
            string(b, &table_name(r.table));
            b.extend_from_slice(b",\"dev\":");
            name(b, r.dev);
            b.extend_from_slice(b",\"dst\":");
            ip(b, Some(r.dst));
            b.extend_from_slice(b",\"src\":");
            ip(b, Some(r.src));
            b.extend_from_slice(b",\"err\":");
            signed(b, r.err);
            b.push(b'}');
        }
        None => b.extend_from_slice(b"null"),
    }
    b.extend_from_slice(b",\"softirq\":");
    match &p.softirq {
        Some(s) => {
            b.extend_from_slice(b"{\"cpu\":");
            num(b, s.cpu);
            b.extend_from_slice(b",\"context\":");
            plain(b, s.context.as_str());
            b.extend_from_slice(b",\"task\":");
            name(b, s.task);
            b.extend_from_slice(b",\"pid\":");
            num(b, s.pid);
            b.extend_from_slice(b",\"raised\":");
            boolean(b, s.raised);
            b.extend_from_slice(b",\"new_run\":");
            boolean(b, s.new_run);
            b.push(b'}');
        }
        None => b.extend_from_slice(b"null"),
    }
    b.extend_from_slice(b",\"latency_ns\":");
    num(b, p.last_ts().saturating_sub(first));
    b.extend_from_slice(b",\"stages\":");
    stages(b, p);
    b.push(b'}');
}

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

/// A stage's opening up to its time: one fixed-size copy (inlined, no `memcpy` call), cut back.
fn stage_head(b: &mut Vec<u8>, k: StageKind) {
    let (bytes, len) = &HEADS[k as usize];
    let start = b.len();
    b.extend_from_slice(bytes);
    b.truncate(start + len);
}

/// A packet's stages with their deltas: the `stages` array of every JSON output.
fn stages(b: &mut Vec<u8>, p: &PacketPath) {
    b.push(b'[');
    // `,"cpu":…,"pid":…,"tid":…,"comm":"…"` is nearly always the previous stage's (one task
    // runs a packet's path from send to receive): copied from where it was written, not
    // formatted again.
    type Task = (u32, u32, u32, Name);
    let mut task: Option<(Task, std::ops::Range<usize>)> = None;
    for (i, (s, d)) in p.timed_stages().enumerate() {
        if i > 0 {
            b.push(b',');
        }
        stage_head(b, s.stage);
        num(b, s.t_ns);
        b.extend_from_slice(b",\"delta_ns\":");
        num(b, d);
        let key = (s.cpu, s.pid, s.tid, s.comm);
        match &task {
            Some((k, at)) if *k == key => b.extend_from_within(at.clone()),
            _ => {
                let start = b.len();
                b.extend_from_slice(b",\"cpu\":");
                num(b, s.cpu);
                b.extend_from_slice(b",\"pid\":");
                num(b, s.pid);
                b.extend_from_slice(b",\"tid\":");
                num(b, s.tid);
                b.extend_from_slice(b",\"comm\":");
                name(b, s.comm);
                task = Some((key, start..b.len()));
            }
        }
        b.extend_from_slice(b",\"dev\":");
        opt_name(b, s.dev);
        b.push(b'}');
    }
    b.push(b']');
}

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
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Every magnitude, not only 20-digit numbers.
            edges.push(x >> (x % 64));
        }
        let mut b = b"prefix".to_vec();
        for n in edges {
            b.truncate(6);
            num(&mut b, n);
            assert_eq!(&b[6..], n.to_string().as_bytes());
        }
        for n in [0, 1, -1, 42, -42, i32::MIN, i32::MAX] {
            b.clear();
            signed(&mut b, n);
            assert_eq!(b, n.to_string().as_bytes());
        }
    }
}
