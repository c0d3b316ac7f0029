//! Pure, bounds-checked decoding: ring-buffer bytes -> [`Event`]. No transmutes: the record's
//! fields are read where they lie (at their `offset_of`, in the host's byte order, as the kernel
//! wrote them), the hook id goes through `TryFrom`, headers through etherparse.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{LaxIpSlice, LaxNetSlice, LaxSlicedPacket};
use loopback_common::{
    HDR_CAP, HOOK_COMM_CACHED, HOOK_FLAGS, HOOK_RUN, Hook, MAX_RUN, NAME_LEN, RAW_EVENT_SIZE, RUN_STAGE_SIZE,
    RUN_TAIL_FIXED, RawEvent, RunStage, hdr_kind,
};
use serde::Serialize;

/// Field `$f` of the [`RawEvent`] at the start of `$b` (checked to be that long), read where it
/// lies: the record is not copied out whole (184 bytes, a `memcpy` call per record).
macro_rules! field {
    ($b:expr, $f:ident : $t:ty) => {{
        const AT: usize = std::mem::offset_of!(RawEvent, $f);
        <$t>::from_ne_bytes(match $b[AT..AT + size_of::<$t>()].try_into() {
            Ok(a) => a,
            Err(_) => unreachable!("a fixed-size slice"),
        })
    }};
}

/// The bytes of array field `$f` of the [`RawEvent`] at the start of `$b`, in place.
macro_rules! array {
    ($b:expr, $f:ident : $n:expr) => {{
        const AT: usize = std::mem::offset_of!(RawEvent, $f);
        match <&[u8; $n]>::try_from(&$b[AT..AT + $n]) {
            Ok(a) => a,
            Err(_) => unreachable!("a fixed-size slice"),
        }
    }};
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("event record is {0} bytes, expected {RAW_EVENT_SIZE}")]
    Size(usize),
    #[error("unknown hook id {0}")]
    Hook(u8),
    #[error("run record of {0} bytes does not match its hook count")]
    Run(usize),
    #[error("a run record holds several events")]
    Several,
}

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Icmp {
    #[serde(rename = "type")]
    pub ty: u8,
    pub code: u8,
    pub id: u16,
    pub seq: u16,
}

impl PacketInfo {
    /// The ICMP message's identifier and sequence number, which only echo requests and replies
    /// have (in other messages, such as port unreachable, those bytes mean something else).
    pub fn icmp_echo(&self) -> Option<(u16, u16)> {
        let ic = self.icmp?;
        matches!((self.proto, ic.ty), (PROTO_ICMP, 0 | 8) | (PROTO_ICMPV6, 128 | 129)).then_some((ic.id, ic.seq))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Tcp {
    pub seq: u32,
    pub ack: u32,
    /// FIN=0x01 SYN=0x02 RST=0x04 PSH=0x08 ACK=0x10 URG=0x20 ...
    pub flags: u8,
}

/// Header fields of one packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketInfo {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number of the transport (after IPv6 extension headers).
    pub proto: u8,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    pub icmp: Option<Icmp>,
    pub tcp: Option<Tcp>,
    /// Transport payload bytes according to the IP header (TCP/UDP payload length).
    pub l4_payload_len: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteInfo {
    pub dst: IpAddr,
    pub src: IpAddr,
    pub table: u32,
    pub err: i32,
    pub dev: Name,
}

/// A kernel name (task `comm`, device name): at most 16 bytes, stored inline and `Copy`, so an
/// event costs no allocation for them. Non-ASCII bytes become '?'.
/// Whether a byte must be escaped inside a JSON string (`"`, `\\`, control characters): the
/// JSON writer's rule, here because [`Name`] caches it when a name is made.
pub fn json_escaped(c: u8) -> bool {
    c < 0x20 || c == b'"' || c == b'\\'
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Name {
    len: u8,
    /// Some byte needs escaping in JSON (`"`, `\\`, a control character): known once, when
    /// the name is made, so the JSON writer copies the others without looking at each byte.
    escape: bool,
    bytes: [u8; NAME_LEN],
}

impl Name {
    pub fn from_bytes(b: &[u8]) -> Self {
        let mut n = Name::default();
        for (i, &c) in b.iter().take(NAME_LEN).take_while(|&&c| c != 0).enumerate() {
            n.bytes[i] = if c.is_ascii() { c } else { b'?' };
            n.escape |= json_escaped(c);
            n.len = i as u8 + 1;
        }
        n
    }
    /// A kernel's fixed 16-byte name field, the same as [`Self::from_bytes`] but a word at a
    /// time: the length is the first zero byte, and one test each finds non-ASCII bytes (the
    /// rare case, done byte by byte) and bytes JSON must escape. Two names per event made the
    /// byte loop a tenth of decoding.
    pub fn from_array(a: &[u8; NAME_LEN]) -> Self {
        if a[0] == 0 {
            // No name (most device fields of events that are not about a device).
            return Name::default();
        }
        const ONES: u128 = u128::MAX / 0xff;
        const HIGH: u128 = ONES << 7;
        // Per byte, whether it is zero / below `c` (exact for the lowest such byte, and for
        // whether there is one at all, when every byte is ASCII).
        let zero = |x: u128| x.wrapping_sub(ONES) & !x & HIGH;
        let below = |x: u128, c: u8| x.wrapping_sub(ONES * c as u128) & !x & HIGH;
        let v = u128::from_le_bytes(*a);
        let z = zero(v);
        let len = if z == 0 {
            NAME_LEN
        } else {
            z.trailing_zeros() as usize / 8
        };
        let keep = if len == NAME_LEN {
            u128::MAX
        } else {
            (1u128 << (len * 8)) - 1
        };
        let w = v & keep;
        if w & HIGH != 0 {
            return Self::from_bytes(a);
        }
        // Past the name: a letter, which needs no escaping.
        let x = w | (!keep & (ONES * b'a' as u128));
        let escape = below(x, 0x20) | zero(x ^ (ONES * b'"' as u128)) | zero(x ^ (ONES * b'\\' as u128));
        Name {
            len: len as u8,
            escape: escape != 0,
            bytes: w.to_le_bytes(),
        }
    }
    /// Whether the name is empty (the kernel gave none).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Whether the name needs escaping in a JSON string.
    pub fn needs_escape(&self) -> bool {
        self.escape
    }
    /// The name's whole inline array (zeros past its length) and its length.
    pub fn raw(&self) -> (&[u8; NAME_LEN], usize) {
        (&self.bytes, self.len as usize)
    }
    pub fn as_str(&self) -> &str {
        // Only ASCII is ever stored.
        std::str::from_utf8(self.as_bytes()).unwrap_or("?")
    }
    /// The name's bytes (ASCII).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Self {
        Name::from_bytes(s.as_bytes())
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, o: &&str) -> bool {
        self.as_str() == *o
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub ts_ns: u64,
    pub skb: u64,
    pub tgid: u32,
    pub tid: u32,
    pub comm: Name,
    pub ifname: Name,
    pub ifindex: u32,
    pub cpu: u32,
    pub len: u32,
    pub hook: Hook,
    pub arg0: u64,
    pub arg1: u64,
    pub packet: Option<PacketInfo>,
    pub route: Option<RouteInfo>,
    /// Packet bytes from the link layer on, as the `lo` programs saw them; kept only when the
    /// decoder was asked to (`--pcapng`).
    pub wire: Option<Box<[u8]>>,
}

/// Decodes records in stream order, restoring task names the kernel left out
/// ([`HOOK_COMM_CACHED`]): it keeps the last named task of every CPU.
#[derive(Default)]
pub struct Decoder {
    last: Vec<(u64, Name)>,
    /// Keep the packet bytes of `lo` events ([`Event::wire`]).
    pub keep_wire: bool,
    /// At most this many of them (`--snaplen`: what the pcapng file and the filter see).
    pub wire_cap: Option<usize>,
    /// Records whose name could not be restored (the record that carried it was lost).
    pub unnamed: u64,
    /// The last device name made ([`Self::dev_name`]).
    last_dev: Name,
}

/// CPUs beyond this are not cached (their names show as "?").
const MAX_CPUS: usize = 4096;

impl Decoder {
    /// A decoder that also keeps the `lo` programs' packet bytes ([`Event::wire`]).
    pub fn keeping_wire() -> Self {
        Self {
            keep_wire: true,
            ..Self::default()
        }
    }

    /// Decodes a record that holds one event (an error for a run record: see [`Self::decode_each`]).
    pub fn decode(&mut self, bytes: &[u8]) -> Result<Event, DecodeError> {
        let mut one = None;
        let mut several = false;
        self.decode_each(bytes, |e| {
            several |= one.is_some();
            one = Some(e.clone());
        })?;
        match one {
            Some(e) if !several => Ok(e),
            _ => Err(DecodeError::Several),
        }
    }

    /// The task's name: the record's own, or, when the kernel left it out ([`HOOK_COMM_CACHED`]),
    /// the one this CPU last named for the same task. A name this CPU already holds for the task
    /// is taken as it is when the record's 16 bytes are the same (not read again).
    fn task_name(&mut self, cpu: usize, pid_tgid: u64, cached: bool, raw: &[u8; NAME_LEN]) -> Name {
        let known = self.last.get(cpu).filter(|(p, _)| *p == pid_tgid).map(|(_, n)| *n);
        if cached {
            return known.unwrap_or_else(|| {
                self.unnamed += 1;
                Name::from("?")
            });
        }
        if let Some(n) = known.filter(|n| n.raw().0 == raw) {
            return n;
        }
        let name = Name::from_array(raw);
        if cpu < MAX_CPUS {
            if self.last.len() <= cpu {
                self.last.resize(cpu + 1, (u64::MAX, Name::default()));
            }
            self.last[cpu] = (pid_tgid, name);
        }
        name
    }

    /// A device name: the last one made again when its 16 bytes are the same (a run of records
    /// on `lo` names it in each), else made from the bytes.
    fn dev_name(&mut self, raw: &[u8; NAME_LEN]) -> Name {
        if raw[0] == 0 {
            return Name::default();
        }
        if self.last_dev.raw().0 != raw {
            self.last_dev = Name::from_array(raw);
        }
        self.last_dev
    }

    /// Decodes one ring record into its events, in the order the hooks ran: one for an ordinary
    /// record, the head and then each staged hook for a run record ([`HOOK_RUN`]). Returns how
    /// many events it handed to `f` (nothing on error).
    ///
    /// `f` gets one event, rewritten in place for each staged hook (what they share, the task,
    /// CPU and skb, is decoded once; nothing is cloned or moved per event). It may take the
    /// event's `packet` and `wire`: they belong to the one hook that captured them.
    pub fn decode_each(&mut self, bytes: &[u8], mut f: impl FnMut(&mut Event)) -> Result<u64, DecodeError> {
        let run = run_stages(bytes)?;
        let (b, hook, cached) = checked(bytes)?;
        let mut e = event_of(b, hook);
        e.comm = self.task_name(
            e.cpu as usize,
            field!(b, pid_tgid: u64),
            cached,
            array!(b, comm: NAME_LEN),
        );
        e.ifname = self.dev_name(array!(b, ifname: NAME_LEN));
        // Whole frames (hdr_kind ETH: the lo programs, and a GSO segment's first hook) are wire
        // bytes; `wire_bytes` leaves every other capture out.
        let mut wire = if self.keep_wire {
            wire_bytes(bytes, run.n == 0, self.wire_cap.unwrap_or(usize::MAX))
        } else {
            None
        };
        // The captured bytes go to the hook that captured them (0: the head).
        let mut packet = e.packet.take();
        if run.hdr_at == 0 {
            e.packet = packet.take();
            e.wire = wire.take();
        }
        let (head_ifindex, head_ifname) = (e.ifindex, e.ifname);
        f(&mut e);
        for (i, st) in run.stages(bytes).enumerate() {
            e.ts_ns = st.ts_ns;
            e.hook = Hook::try_from(st.hook).map_err(DecodeError::Hook)?;
            e.len = st.len;
            e.arg0 = st.arg0;
            e.arg1 = st.arg1;
            e.ifindex = st.ifindex;
            e.ifname = if st.ifindex == 0 || st.ifindex != head_ifindex {
                Name::default()
            } else {
                head_ifname
            };
            if i + 1 == run.hdr_at {
                e.packet = packet.take();
                e.wire = wire.take();
            } else {
                e.packet = None;
                e.wire = None;
            }
            f(&mut e);
        }
        Ok(1 + run.n as u64)
    }
}

/// How many events a raw record holds (1 unless it is a well-formed run record).
pub fn record_events(bytes: &[u8]) -> u64 {
    run_stages(bytes).map(|s| 1 + s.n as u64).unwrap_or(1)
}

/// The staged hooks of a run record, checked, read in place when iterated.
struct Run {
    n: usize,
    /// Which event captured the head's bytes: 0 the head, i the i-th staged hook.
    hdr_at: usize,
}

impl Run {
    /// The staged hooks of `bytes` (the record this was checked on), in order.
    fn stages(&self, bytes: &[u8]) -> impl Iterator<Item = RunStage> {
        let base = RAW_EVENT_SIZE + RUN_TAIL_FIXED;
        // None for an ordinary record (no stages, no tail).
        let at = bytes.get(base..base + self.n * RUN_STAGE_SIZE).unwrap_or_default();
        at.chunks_exact(RUN_STAGE_SIZE)
            // SAFETY: each chunk is RUN_STAGE_SIZE bytes; RunStage is plain old data.
            .map(|c| unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<RunStage>()) })
    }
}

/// The staged hooks of a run record (none for an ordinary record), checked: the count must
/// match the length exactly and every hook id must be known.
fn run_stages(bytes: &[u8]) -> Result<Run, DecodeError> {
    let hook_at = std::mem::offset_of!(RawEvent, hook);
    let Some(&hook) = bytes.get(hook_at) else {
        return Err(DecodeError::Size(bytes.len()));
    };
    if hook & HOOK_RUN == 0 {
        return Ok(Run { n: 0, hdr_at: 0 });
    }
    let n = bytes.get(RAW_EVENT_SIZE).copied().unwrap_or(0) as usize;
    let hdr_at = bytes.get(RAW_EVENT_SIZE + 1).copied().unwrap_or(0) as usize;
    if n == 0 || n > MAX_RUN || hdr_at > n || bytes.len() != RAW_EVENT_SIZE + RUN_TAIL_FIXED + n * RUN_STAGE_SIZE {
        return Err(DecodeError::Run(bytes.len()));
    }
    let run = Run { n, hdr_at };
    // Every hook id is checked before any event is handed out.
    let hook_in_stage = std::mem::offset_of!(RunStage, hook);
    for i in 0..n {
        let id = bytes[RAW_EVENT_SIZE + RUN_TAIL_FIXED + i * RUN_STAGE_SIZE + hook_in_stage];
        Hook::try_from(id).map_err(DecodeError::Hook)?;
    }
    Ok(run)
}

/// The kernel time of a raw record (its first field), without decoding it; 0 if too short.
pub fn record_ts(bytes: &[u8]) -> u64 {
    bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

/// Decodes one record on its own (a name left out by the kernel shows as "?").
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    if run_stages(bytes)?.n != 0 {
        return Err(DecodeError::Several);
    }
    let (b, hook, cached) = checked(bytes)?;
    let mut e = event_of(b, hook);
    e.comm = if cached {
        Name::from("?")
    } else {
        Name::from_array(array!(b, comm: NAME_LEN))
    };
    e.ifname = Name::from_array(array!(b, ifname: NAME_LEN));
    Ok(e)
}

/// The link-layer bytes of an `lo` record: the header capture, then whatever an ordinary record
/// carries past the fixed part (`--snaplen`; a run record's tail is not packet bytes).
fn wire_bytes(bytes: &[u8], with_tail: bool, cap: usize) -> Option<Box<[u8]>> {
    // Most records carry no frame: look at the one byte before copying the record.
    if bytes.get(std::mem::offset_of!(RawEvent, hdr_kind)) != Some(&hdr_kind::ETH) {
        return None;
    }
    let b = bytes.first_chunk::<RAW_EVENT_SIZE>()?;
    let n = (field!(b, hdr_len: u16) as usize).min(HDR_CAP);
    let mut v = array!(b, hdr: HDR_CAP)[..n].to_vec();
    if n == HDR_CAP && with_tail {
        v.extend_from_slice(&bytes[RAW_EVENT_SIZE..]);
    }
    v.truncate(cap);
    Some(v.into_boxed_slice())
}

/// The fixed part of a record and its hook, checked: the record is long enough and its hook
/// known. Also whether the kernel left the task's name out ([`HOOK_COMM_CACHED`]).
#[inline(always)]
fn checked(bytes: &[u8]) -> Result<(&[u8; RAW_EVENT_SIZE], Hook, bool), DecodeError> {
    let Some(b) = bytes.first_chunk::<RAW_EVENT_SIZE>() else {
        return Err(DecodeError::Size(bytes.len()));
    };
    let raw = field!(b, hook: u8);
    let hook = Hook::try_from(raw & !HOOK_FLAGS).map_err(DecodeError::Hook)?;
    Ok((b, hook, raw & HOOK_COMM_CACHED != 0))
}

/// The event of a checked record ([`checked`]), with its task's name and device name left to
/// the caller. Built where it is returned (no `Result` around it: moving the event out of one
/// cost a `memcpy` per record).
#[inline(always)]
fn event_of(b: &[u8; RAW_EVENT_SIZE], hook: Hook) -> Event {
    let n = (field!(b, hdr_len: u16) as usize).min(HDR_CAP);
    let hdr = &array!(b, hdr: HDR_CAP)[..n];
    let (arg0, arg1) = (field!(b, arg0: u64), field!(b, arg1: u64));
    let (packet, route) = match field!(b, hdr_kind: u8) {
        hdr_kind::L3 => (parse_l3(hdr), None),
        hdr_kind::ETH => (parse_eth(hdr), None),
        hdr_kind::ROUTE => (None, parse_route(hdr, arg0, arg1, array!(b, ifname: NAME_LEN))),
        _ => (None, None),
    };
    let pid_tgid = field!(b, pid_tgid: u64);
    Event {
        ts_ns: field!(b, ts_ns: u64),
        skb: field!(b, skb: u64),
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        comm: Name::default(),
        ifname: Name::default(),
        ifindex: field!(b, ifindex: u32),
        cpu: field!(b, cpu: u32),
        len: field!(b, len: u32),
        hook,
        arg0,
        arg1,
        packet,
        route,
        wire: None,
    }
}

fn parse_route(h: &[u8], arg0: u64, arg1: u64, ifname: &[u8; NAME_LEN]) -> Option<RouteInfo> {
    if h.len() < 36 {
        return None;
    }
    let (dst, src): (IpAddr, IpAddr) = match h[0] {
        4 => (
            Ipv4Addr::new(h[4], h[5], h[6], h[7]).into(),
            Ipv4Addr::new(h[20], h[21], h[22], h[23]).into(),
        ),
        6 => {
            let d: [u8; 16] = h[4..20].try_into().ok()?;
            let s: [u8; 16] = h[20..36].try_into().ok()?;
            (Ipv6Addr::from(d).into(), Ipv6Addr::from(s).into())
        }
        _ => return None,
    };
    Some(RouteInfo {
        dst,
        src,
        table: arg0 as u32,
        err: arg1 as i64 as i32,
        dev: Name::from_array(ifname),
    })
}

/// Header fields of a link-layer capture. IPv4 and IPv6 frames (all of `lo`'s) go straight to
/// the IP layer (etherparse's full packet slicer also slices the transport header, which is
/// read by hand below, and copies its state at each layer: a fifth of decoding); other ether
/// types (VLAN tags) go through the full slicer.
pub fn parse_eth(h: &[u8]) -> Option<PacketInfo> {
    const IPV4: u16 = etherparse::EtherType::IPV4.0;
    const IPV6: u16 = etherparse::EtherType::IPV6.0;
    if let Some(&[t0, t1]) = h.get(12..14)
        && matches!(u16::from_be_bytes([t0, t1]), IPV4 | IPV6)
    {
        return parse_l3(&h[14..]);
    }
    from_net(LaxSlicedPacket::from_ethernet(h).ok()?.net?)
}

/// Header fields of what etherparse's full slicer found at the network layer.
fn from_net(net: LaxNetSlice<'_>) -> Option<PacketInfo> {
    match net {
        LaxNetSlice::Ipv4(v4) => from_ip(&LaxIpSlice::Ipv4(v4)),
        LaxNetSlice::Ipv6(v6) => from_ip(&LaxIpSlice::Ipv6(v6)),
        LaxNetSlice::Arp(_) => None,
    }
}

/// Header fields of a capture that starts at the IP header.
pub fn parse_l3(h: &[u8]) -> Option<PacketInfo> {
    from_ip(&LaxIpSlice::from_slice(h).ok()?.0)
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn from_ip(net: &LaxIpSlice<'_>) -> Option<PacketInfo> {
    let (src, dst, total_payload): (IpAddr, IpAddr, Option<u32>) = match net {
        LaxIpSlice::Ipv4(v4) => {
            let h = v4.header();
            let total = h.total_len() as u32;
            let hl = h.ihl() as u32 * 4;
            (
                h.source_addr().into(),
                h.destination_addr().into(),
                total.checked_sub(hl),
            )
        }
        LaxIpSlice::Ipv6(v6) => {
            let h = v6.header();
            let ext = v6.extensions().slice().len() as u32;
            (
                h.source_addr().into(),
                h.destination_addr().into(),
                (h.payload_length() as u32).checked_sub(ext),
            )
        }
    };
    let pl = net.payload();
    let proto = pl.ip_number.0;
    // Transport fields are read by hand: the capture is a fixed 96 bytes and etherparse's
    // transport slicers reject headers whose options run past it; we need only fixed fields.
    let b = pl.payload;
    let mut info = PacketInfo {
        src,
        dst,
        proto,
        sport: None,
        dport: None,
        icmp: None,
        tcp: None,
        l4_payload_len: None,
    };
    match proto {
        PROTO_TCP => {
            info.sport = be16(b, 0);
            info.dport = be16(b, 2);
            if let (Some(seq), Some(ack), Some(&off), Some(&flags)) = (be32(b, 4), be32(b, 8), b.get(12), b.get(13)) {
                info.tcp = Some(Tcp { seq, ack, flags });
                info.l4_payload_len = total_payload.and_then(|t| t.checked_sub((off >> 4) as u32 * 4));
            }
        }
        PROTO_UDP => {
            info.sport = be16(b, 0);
            info.dport = be16(b, 2);
            info.l4_payload_len = be16(b, 4).and_then(|l| (l as u32).checked_sub(8));
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            if let (Some(&ty), Some(&code)) = (b.first(), b.get(1)) {
                info.icmp = Some(Icmp {
                    ty,
                    code,
                    id: be16(b, 4).unwrap_or(0),
                    seq: be16(b, 6).unwrap_or(0),
                });
            }
        }
        _ => {}
    }
    Some(info)
}

/// The name of a transport protocol this program knows ([`proto_name`] names the others).
pub const fn proto_str(p: u8) -> Option<&'static str> {
    Some(match p {
        PROTO_ICMP => "icmp",
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        PROTO_ICMPV6 => "icmp6",
        _ => return None,
    })
}

pub fn proto_name(p: u8) -> String {
    proto_str(p).map_or_else(|| format!("proto-{p}"), String::from)
}

#[cfg(any(test, feature = "test-support"))]
/// Encodes an event back into its raw record (tests, fixtures and recordings).
pub fn encode(raw: &RawEvent) -> Vec<u8> {
    // SAFETY: RawEvent is repr(C) plain old data.
    unsafe { std::slice::from_raw_parts((raw as *const RawEvent).cast::<u8>(), RAW_EVENT_SIZE) }.to_vec()
}

#[cfg(any(test, feature = "test-support"))]
/// The bytes of a run record as the kernel sends it: `head` with [`HOOK_RUN`], then one stage per
/// event of `rest` (their task, CPU, skb and captured bytes are the head's), `hdr_stage` naming
/// the hook that captured the head's bytes (0: the head). For fixtures and tests.
pub fn encode_run(head: &RawEvent, rest: &[RawEvent], hdr_stage: u8) -> Vec<u8> {
    let mut h = *head;
    h.hook |= HOOK_RUN;
    let mut out = encode(&h);
    out.extend_from_slice(&[rest.len() as u8, hdr_stage, 0, 0, 0, 0, 0, 0]);
    for e in rest {
        let st = RunStage {
            ts_ns: e.ts_ns,
            arg0: e.arg0,
            arg1: e.arg1,
            len: e.len,
            ifindex: e.ifindex,
            hook: e.hook & !HOOK_FLAGS,
            _pad: [0; 7],
        };
        // SAFETY: RunStage is repr(C) plain old data.
        out.extend_from_slice(unsafe {
            std::slice::from_raw_parts((&st as *const RunStage).cast::<u8>(), RUN_STAGE_SIZE)
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_read_a_word_at_a_time_is_the_name_read_byte_by_byte() {
        let check = |a: [u8; NAME_LEN]| {
            let (fast, slow) = (Name::from_array(&a), Name::from_bytes(&a));
            assert_eq!(fast, slow, "{a:?}");
            assert_eq!(fast.needs_escape(), slow.needs_escape(), "{a:?}");
        };
        // Every byte value at every place, after a name of every length.
        for len in 0..=NAME_LEN {
            for at in 0..NAME_LEN {
                for c in 0..=255u8 {
                    let mut a = [0u8; NAME_LEN];
                    a[..len].fill(b'k');
                    a[at] = c;
                    check(a);
                }
            }
        }
        // And pseudo-random names drawn from the bytes that matter.
        let mut xs = crate::fixture::xorshift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..200_000 {
            let mut a = [0u8; NAME_LEN];
            for b in &mut a {
                let x = xs.next().unwrap_or_default();
                let pick = b"\0\0ab/\"\\\x1f\x20\x21\x7f\x80\xff\n";
                *b = pick[(x % pick.len() as u64) as usize];
            }
            check(a);
        }
    }

    pub(crate) fn blank(hook: Hook) -> RawEvent {
        RawEvent {
            ts_ns: 1,
            skb: 0xffff_8880_0000_1000,
            pid_tgid: (42u64 << 32) | 43,
            arg0: 0,
            arg1: 0,
            comm: *b"ping\0\0\0\0\0\0\0\0\0\0\0\0",
            ifname: *b"lo\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
            cpu: 1,
            len: 84,
            ifindex: 1,
            hook: hook as u8,
            hdr_kind: 0,
            hdr_len: 0,
            hdr: [0; HDR_CAP],
        }
    }

    #[test]
    fn run_record_expands_to_its_hooks_in_order() {
        let mut head = blank(Hook::TcEgress);
        let eth: Vec<u8> = [vec![0u8; 12], vec![0x08, 0x00], icmp_echo_v4()].concat();
        head.hdr[..eth.len().min(HDR_CAP)].copy_from_slice(&eth[..eth.len().min(HDR_CAP)]);
        head.hdr_kind = hdr_kind::ETH;
        head.hdr_len = eth.len().min(HDR_CAP) as u16;
        let rest: Vec<RawEvent> = [Hook::DevQueue, Hook::Xmit, Hook::BacklogEnqueue, Hook::XmitDone]
            .iter()
            .enumerate()
            .map(|(i, &h)| RawEvent {
                ts_ns: 10 + i as u64,
                arg0: i as u64 * 7,
                ifindex: if h == Hook::BacklogEnqueue { 0 } else { 1 },
                ..blank(h)
            })
            .collect();
        let bytes = encode_run(&head, &rest, 0);
        assert_eq!(record_events(&bytes), 5);
        let mut d = Decoder::keeping_wire();
        let mut got = Vec::new();
        assert_eq!(d.decode_each(&bytes, |e| got.push(e.clone())), Ok(5));
        let hooks: Vec<Hook> = got.iter().map(|e| e.hook).collect();
        assert_eq!(
            hooks,
            [
                Hook::TcEgress,
                Hook::DevQueue,
                Hook::Xmit,
                Hook::BacklogEnqueue,
                Hook::XmitDone
            ]
        );
        assert_eq!(got.iter().map(|e| e.ts_ns).collect::<Vec<_>>(), [1, 10, 11, 12, 13]);
        assert_eq!(got[4].arg0, 21);
        assert!(
            got.iter()
                .all(|e| e.skb == head.skb && e.tid == 43 && e.comm == "ping" && e.cpu == 1)
        );
        // The device name follows the index; the captured bytes stay with the hook that took them.
        assert_eq!((got[2].ifname.as_str(), got[3].ifname.as_str()), ("lo", ""));
        assert!(got[0].packet.as_ref().is_some_and(|p| p.proto == PROTO_ICMP) && got[0].wire.is_some());
        assert!(got[1..].iter().all(|e| e.packet.is_none() && e.wire.is_none()));
        // A single-event API refuses a run rather than dropping its tail.
        assert_eq!(d.decode(&bytes), Err(DecodeError::Several));
        assert_eq!(decode(&bytes), Err(DecodeError::Several));

        // Captured by a later hook: the bytes go to that hook.
        let bytes = encode_run(&head, &rest, 2);
        let mut got = Vec::new();
        d.decode_each(&bytes, |e| got.push(e.clone())).expect("decodes");
        assert!(got[0].packet.is_none() && got[2].packet.is_some());
    }

    #[test]
    fn malformed_run_records_are_refused_whole() {
        let head = blank(Hook::Receive);
        let rest = [blank(Hook::TcIngress)];
        let good = encode_run(&head, &rest, 0);
        let mut d = Decoder::default();
        let mut n = 0;
        // Cut, padded, a count that disagrees with the length, an unknown stage hook.
        for bad in [
            good[..good.len() - 1].to_vec(),
            [good.clone(), vec![0; 8]].concat(),
            {
                let mut b = good.clone();
                b[RAW_EVENT_SIZE] = 2;
                b
            },
            {
                let mut b = good.clone();
                b[RAW_EVENT_SIZE] = 0;
                b
            },
            {
                let mut b = good.clone();
                b[RAW_EVENT_SIZE + RUN_TAIL_FIXED + std::mem::offset_of!(RunStage, hook)] = 99;
                b
            },
        ] {
            assert!(d.decode_each(&bad, |_| n += 1).is_err());
            assert_eq!(record_events(&bad), 1);
        }
        assert_eq!(n, 0, "nothing of a bad record is handed on");
        assert_eq!(d.decode_each(&good, |_| n += 1), Ok(2));
    }

    fn icmp_echo_v4() -> Vec<u8> {
        let b = etherparse::PacketBuilder::ipv4([127, 0, 0, 1], [127, 0, 0, 2], 64).icmpv4_echo_request(0x1234, 7);
        let mut out = Vec::new();
        b.write(&mut out, &[0u8; 56]).expect("build");
        out
    }

    #[test]
    fn decodes_icmp_from_l3_capture() {
        let mut r = blank(Hook::DevQueue);
        let pkt = icmp_echo_v4();
        r.hdr_kind = hdr_kind::L3;
        r.hdr_len = pkt.len() as u16;
        r.hdr[..pkt.len()].copy_from_slice(&pkt);
        let e = decode(&encode(&r)).expect("decode");
        let p = e.packet.expect("packet");
        assert_eq!(p.src, "127.0.0.1".parse::<IpAddr>().expect("ip"));
        assert_eq!(p.dst, "127.0.0.2".parse::<IpAddr>().expect("ip"));
        assert_eq!(
            p.icmp,
            Some(Icmp {
                ty: 8,
                code: 0,
                id: 0x1234,
                seq: 7
            })
        );
        assert_eq!(
            (e.tgid, e.tid, e.comm.as_str(), e.ifname.as_str()),
            (42, 43, "ping", "lo")
        );
    }

    #[test]
    fn decodes_tcp_over_ipv6_with_truncated_options() {
        let b = etherparse::PacketBuilder::ipv6([0; 16], [0; 16], 64)
            .tcp(40000, 80, 1000, 65535)
            .syn()
            .options(&[etherparse::TcpOptionElement::MaximumSegmentSize(65476); 1])
            .expect("opts");
        let mut pkt = Vec::new();
        b.write(&mut pkt, &[1u8; 200]).expect("build");
        let p = parse_l3(&pkt[..HDR_CAP]).expect("parsed");
        assert_eq!((p.proto, p.sport, p.dport), (PROTO_TCP, Some(40000), Some(80)));
        assert_eq!(p.tcp.map(|t| (t.seq, t.flags & 0x02)), Some((1000, 0x02)));
        assert_eq!(p.l4_payload_len, Some(200));
    }

    #[test]
    fn decodes_ethernet_capture() {
        let b = etherparse::PacketBuilder::ethernet2([0; 6], [0; 6])
            .ipv4([127, 0, 0, 1], [127, 0, 0, 1], 64)
            .udp(5000, 6000);
        let mut pkt = Vec::new();
        b.write(&mut pkt, &[0u8; 64]).expect("build");
        let p = parse_eth(&pkt).expect("parsed");
        assert_eq!(
            (p.proto, p.sport, p.dport, p.l4_payload_len),
            (PROTO_UDP, Some(5000), Some(6000), Some(64))
        );
    }

    #[test]
    fn rejects_short_records_and_unknown_hooks() {
        assert_eq!(decode(&[0u8; 10]), Err(DecodeError::Size(10)));
        let mut r = blank(Hook::DevQueue);
        r.hook = 33;
        assert_eq!(decode(&encode(&r)), Err(DecodeError::Hook(33)));
        // The run flag on a record without a valid tail.
        r.hook = Hook::DevQueue as u8 | HOOK_RUN;
        assert_eq!(decode(&encode(&r)), Err(DecodeError::Run(RAW_EVENT_SIZE)));
    }

    #[test]
    fn restores_names_the_kernel_left_out_per_cpu() {
        let mut d = Decoder::default();
        let first = blank(Hook::DevQueue);
        let mut same = blank(Hook::Xmit);
        same.comm = [0; NAME_LEN];
        same.hook |= HOOK_COMM_CACHED;
        assert_eq!(d.decode(&encode(&first)).expect("first").comm, "ping");
        assert_eq!(d.decode(&encode(&same)).expect("cached").comm, "ping");
        // Another CPU has no named event yet; another task on this CPU does not match.
        let mut other_cpu = same;
        other_cpu.cpu = 0;
        assert_eq!(d.decode(&encode(&other_cpu)).expect("cpu0").comm, "?");
        let mut other_task = same;
        other_task.pid_tgid += 1;
        assert_eq!(d.decode(&encode(&other_task)).expect("task").comm, "?");
        assert_eq!(d.unnamed, 2);
        // The stateless decoder never invents a name.
        assert_eq!(decode(&encode(&same)).expect("plain").comm, "?");
    }

    #[test]
    fn garbage_headers_never_panic() {
        let mut r = blank(Hook::Receive);
        for kind in [hdr_kind::L3, hdr_kind::ETH, hdr_kind::ROUTE, 77] {
            for fill in [0u8, 0x45, 0x60, 0xff] {
                r.hdr_kind = kind;
                r.hdr = [fill; HDR_CAP];
                r.hdr_len = u16::MAX; // larger than the buffer: must be clamped
                let _ = decode(&encode(&r)).expect("decodes");
            }
        }
    }

    /// The fields the full slicer finds (the way headers were parsed before the IP fast path).
    fn through_full_slicer(p: Option<LaxSlicedPacket<'_>>) -> Option<PacketInfo> {
        from_net(p?.net?)
    }

    #[test]
    fn headers_read_at_the_ip_layer_are_what_the_full_slicer_reads() {
        let mut frames: Vec<Vec<u8>> = vec![icmp_echo_v4()];
        // Real headers of every kind, then the same cut short and with bytes flipped.
        let v4 = || etherparse::PacketBuilder::ethernet2([1; 6], [2; 6]).ipv4([127, 0, 0, 1], [127, 0, 0, 2], 64);
        let v6 = || etherparse::PacketBuilder::ethernet2([1; 6], [2; 6]).ipv6([1; 16], [2; 16], 64);
        for b in [v4().tcp(1, 2, 3, 4), v6().tcp(1, 2, 3, 4)] {
            let mut f = Vec::new();
            b.write(&mut f, &[7; 40]).expect("writes");
            frames.push(f);
        }
        for b in [v4().udp(5, 6), v6().udp(5, 6)] {
            let mut f = Vec::new();
            b.write(&mut f, &[7; 40]).expect("writes");
            frames.push(f);
        }
        let vlan = etherparse::PacketBuilder::ethernet2([1; 6], [2; 6])
            .single_vlan(etherparse::VlanId::try_new(5).expect("vlan id"))
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(1, 2);
        let mut f = Vec::new();
        vlan.write(&mut f, &[1; 8]).expect("writes");
        frames.push(f);
        let mut cases = Vec::new();
        for f in &frames {
            for cut in 0..=f.len().min(HDR_CAP) {
                cases.push(f[..cut].to_vec());
            }
            for x in crate::fixture::xorshift(0x9e37_79b9_7f4a_7c15).take(2000) {
                let mut g = f[..f.len().min(HDR_CAP)].to_vec();
                let at = (x as usize) % g.len();
                g[at] ^= (x >> 32) as u8 | 1;
                cases.push(g);
            }
        }
        for c in &cases {
            assert_eq!(
                parse_eth(c),
                through_full_slicer(LaxSlicedPacket::from_ethernet(c).ok()),
                "{c:02x?}"
            );
            let l3 = c.get(14..).unwrap_or_default();
            assert_eq!(
                parse_l3(l3),
                through_full_slicer(LaxSlicedPacket::from_ip(l3).ok()),
                "{l3:02x?}"
            );
        }
    }
}
