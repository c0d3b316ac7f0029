//! Test support (the `test-support` feature; never in a normal build): synthetic ring-buffer
//! records of a small loopback session, shaped exactly like the kernel's, for the dashboard's
//! snapshot tests, its terminal test and the reconstruction benchmark; and the one
//! reconstruct helper every test uses. Deterministic: the same arguments give the same bytes.
use std::collections::{BTreeMap, HashMap};

use loopback_common::{Hook, RawEvent, hdr_kind};

use crate::{
    decode::{Decoder, Event, encode},
    path::{PacketPath, Stats, Tracker, TrackerConfig},
};

/// Reconstructs decoded events to finished paths (the tracker flushed at the end), with the
/// drop reason names given.
pub fn reconstruct_events(
    events: impl IntoIterator<Item = Event>,
    drop_names: HashMap<u64, String>,
) -> (Vec<PacketPath>, Stats) {
    let mut t = Tracker::new(TrackerConfig::default(), drop_names);
    let mut out = Vec::new();
    for mut e in events {
        out.extend(t.push(&mut e));
    }
    out.extend(t.flush());
    (out, t.stats)
}

/// Decodes and reconstructs ring-buffer records (the fixture's drop names), handing the paths
/// each record finished to `each` and the flushed rest last; returns the statistics.
pub fn reconstruct_each<B: AsRef<[u8]>>(
    records: impl IntoIterator<Item = B>,
    mut each: impl FnMut(Vec<PacketPath>, u64),
) -> Stats {
    let mut d = Decoder::default();
    let mut t = Tracker::new(TrackerConfig::default(), drop_reasons().into_iter().collect());
    for b in records {
        let mut done = Vec::new();
        let events = d
            .decode_each(b.as_ref(), |e| done.extend(t.push(e)))
            .expect("a fixture record decodes");
        each(done, events);
    }
    each(t.flush(), 0);
    t.stats
}

/// Decodes and reconstructs ring-buffer records (the fixture's drop names) to all their paths.
pub fn reconstruct<B: AsRef<[u8]>>(records: impl IntoIterator<Item = B>) -> (Vec<PacketPath>, Stats) {
    let mut all = Vec::new();
    let stats = reconstruct_each(records, |ps, _| all.extend(ps));
    (all, stats)
}

/// Drop reason numbers used by the fixture, with their names.
pub fn drop_reasons() -> BTreeMap<u64, String> {
    BTreeMap::from([(2, "NO_SOCKET".to_string()), (5, "SOCKET_RCVBUFF".to_string())])
}

fn ipv4(proto: u8, src: [u8; 4], dst: [u8; 4], id: u16, l4: &[u8]) -> Vec<u8> {
    let total = (20 + l4.len()) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&[0x40, 0, 64, proto, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(l4);
    h
}

fn udp(sport: u16, dport: u16, payload: u16) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&(8 + payload).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u
}

fn icmp(ty: u8, id: u16, seq: u16) -> Vec<u8> {
    let mut i = vec![ty, 0, 0, 0];
    i.extend_from_slice(&id.to_be_bytes());
    i.extend_from_slice(&seq.to_be_bytes());
    i
}

struct Gen {
    ts: u64,
    out: Vec<Vec<u8>>,
}

#[derive(Clone, Copy)]
struct Task {
    pid: u32,
    comm: &'static [u8],
    cpu: u32,
}

const CLIENT: Task = Task {
    pid: 4242,
    comm: b"client",
    cpu: 0,
};
const SERVER: Task = Task {
    pid: 4343,
    comm: b"server",
    cpu: 1,
};
const PINGER: Task = Task {
    pid: 777,
    comm: b"ping",
    cpu: 1,
};
const KSOFTIRQD: Task = Task {
    pid: 15,
    comm: b"ksoftirqd/0",
    cpu: 0,
};

impl Gen {
    fn push(&mut self, h: Hook, task: Task, skb: u64, step: u64, f: impl FnOnce(&mut RawEvent)) -> u64 {
        self.ts += step;
        // SAFETY: RawEvent is plain old data; all-zero is a valid value.
        let mut e: RawEvent = unsafe { std::mem::zeroed() };
        e.ts_ns = self.ts;
        e.skb = skb;
        e.pid_tgid = ((task.pid as u64) << 32) | task.pid as u64;
        e.comm[..task.comm.len()].copy_from_slice(task.comm);
        e.cpu = task.cpu;
        e.hook = h as u8;
        f(&mut e);
        self.out.push(encode(&e));
        self.ts
    }

    /// One packet through lo: send side in `tx`, softirq in `rx_ctx` (the sender: inline).
    fn lo_packet(&mut self, skb: u64, l3: &[u8], tx: Task, rx_ctx: Task, end: End) {
        let mut eth = vec![0u8; 12];
        eth.extend_from_slice(&[0x08, 0x00]);
        eth.extend_from_slice(l3);
        let dev = |e: &mut RawEvent| {
            e.ifname[..2].copy_from_slice(b"lo");
            e.ifindex = 1;
            e.len = l3.len() as u32;
        };
        let cap = |e: &mut RawEvent, bytes: &[u8], kind: u8| {
            let n = bytes.len().min(loopback_common::HDR_CAP);
            e.hdr[..n].copy_from_slice(&bytes[..n]);
            e.hdr_len = n as u16;
            e.hdr_kind = kind;
        };
        self.push(Hook::AppSend, tx, 0, 2_000, |e| e.arg0 = 44);
        self.push(Hook::TcEgress, tx, skb, 900, |e| {
            dev(e);
            cap(e, &eth, hdr_kind::ETH);
        });
        self.push(Hook::DevQueue, tx, skb, 400, dev);
        self.push(Hook::Xmit, tx, skb, 450, dev);
        let enq = self.push(Hook::BacklogEnqueue, tx, skb, 500, dev);
        self.push(Hook::XmitDone, tx, skb, 350, dev);
        let entry = self.ts + if rx_ctx.pid == tx.pid { 300 } else { 9_000 };
        self.ts = entry;
        self.push(Hook::Receive, Task { cpu: tx.cpu, ..rx_ctx }, skb, 500, |e| {
            dev(e);
            e.arg0 = entry;
            e.arg1 = enq + 100;
        });
        self.push(Hook::TcIngress, Task { cpu: tx.cpu, ..rx_ctx }, skb, 400, |e| {
            dev(e);
            cap(e, &eth, hdr_kind::ETH);
        });
        match end {
            End::Socket(rx) => {
                self.push(Hook::SockQueue, Task { cpu: tx.cpu, ..rx_ctx }, skb, 1_000, |e| {
                    e.arg0 = 0xdead_0000
                });
                self.push(Hook::AppRecv, rx, 0, 3_000, |e| {
                    e.arg0 = 0xdead_0000;
                    e.arg1 = 64;
                });
            }
            End::Consume => {
                self.push(Hook::Consume, Task { cpu: tx.cpu, ..rx_ctx }, skb, 2_000, |_| {});
            }
            End::Drop(reason) => {
                self.push(Hook::Free, Task { cpu: tx.cpu, ..rx_ctx }, skb, 2_000, |e| {
                    e.arg0 = reason
                });
            }
        }
    }
}

#[derive(Clone, Copy)]
enum End {
    Socket(Task),
    Consume,
    Drop(u64),
}

/// `rounds` rounds of: a UDP request (client -> server) and its response, plus every 4th round
/// an ICMP echo and reply, every 6th a UDP datagram to a closed port (dropped NO_SOCKET), and every
/// 5th round's request received by ksoftirqd. Rounds are 100 us apart.
/// The session as the kernel sends it: the `lo` transmit and receive chains staged into run
/// records (see [`pack_runs`]).
pub fn session(rounds: u64) -> Vec<Vec<u8>> {
    pack_runs(&unstaged_session(rounds))
}

/// The session with one record per hook.
pub fn unstaged_session(rounds: u64) -> Vec<Vec<u8>> {
    let mut g = Gen {
        ts: 1_000_000_000,
        out: Vec::new(),
    };
    let lo = [127, 0, 0, 1];
    for i in 0..rounds {
        let start = g.ts;
        let skb = |k: u64| 0xffff_8880_0000_0000 + ((i * 4 + k) % 1024) * 0x100;
        let req = ipv4(17, lo, lo, i as u16, &udp(40000, 11111, 64));
        let rx_ctx = if i % 5 == 4 { KSOFTIRQD } else { CLIENT };
        g.lo_packet(skb(0), &req, CLIENT, rx_ctx, End::Socket(SERVER));
        let resp = ipv4(17, lo, lo, i as u16, &udp(11111, 40000, 64));
        g.lo_packet(skb(1), &resp, SERVER, SERVER, End::Socket(CLIENT));
        if i % 4 == 0 {
            let id = 0x77;
            let q = ipv4(1, lo, [127, 0, 0, 2], i as u16, &icmp(8, id, i as u16));
            g.lo_packet(skb(2), &q, PINGER, PINGER, End::Consume);
            let r = ipv4(1, [127, 0, 0, 2], lo, i as u16, &icmp(0, id, i as u16));
            g.lo_packet(skb(3), &r, PINGER, PINGER, End::Consume);
        }
        if i % 6 == 5 {
            let d = ipv4(17, lo, lo, i as u16, &udp(40001, 9, 16));
            g.lo_packet(skb(2), &d, CLIENT, CLIENT, End::Drop(2));
        }
        g.ts = g.ts.max(start + 100_000);
    }
    g.out
}

/// Stages one-record-per-hook input the way the kernel programs do: the `lo` transmit chain
/// (tc egress .. net_dev_xmit) and the `lo` receive chain (netif_receive_skb .. tc ingress) of
/// one skb on one CPU become one run record each. The receive chain of a packet whose bytes were
/// captured at transmit captures none again.
pub fn pack_runs(records: &[Vec<u8>]) -> Vec<Vec<u8>> {
    use loopback_common::RAW_EVENT_SIZE;
    let mut out = Vec::new();
    let mut run: Vec<RawEvent> = Vec::new();
    // Sends the staged run (and empties it).
    let flush = |run: &mut Vec<RawEvent>, out: &mut Vec<Vec<u8>>| match std::mem::take(run).as_slice() {
        [] => {}
        [one] => out.push(encode(one)),
        run => {
            let hdr_stage = run.iter().position(|e| e.hdr_kind != hdr_kind::NONE).unwrap_or(0);
            let mut head = run[0];
            if hdr_stage != 0 {
                head.hdr = run[hdr_stage].hdr;
                head.hdr_kind = run[hdr_stage].hdr_kind;
                head.hdr_len = run[hdr_stage].hdr_len;
            }
            out.push(crate::decode::encode_run(&head, &run[1..], hdr_stage as u8));
        }
    };
    for b in records {
        if b.len() != RAW_EVENT_SIZE {
            flush(&mut run, &mut out);
            out.push(b.clone());
            continue;
        }
        // SAFETY: length checked; plain old data.
        let mut e: RawEvent = unsafe { std::ptr::read_unaligned(b.as_ptr().cast()) };
        let hook = Hook::try_from(e.hook).ok();
        let same = run.first().is_some_and(|h| h.skb == e.skb && h.cpu == e.cpu);
        match hook {
            Some(Hook::TcEgress) | Some(Hook::Receive) if e.ifindex == 1 => {
                flush(&mut run, &mut out);
                run.push(e);
            }
            Some(Hook::DevQueue | Hook::Xmit | Hook::BacklogEnqueue | Hook::Xdp) if same => run.push(e),
            Some(Hook::XmitDone | Hook::TcIngress) if same => {
                if hook == Some(Hook::TcIngress) && run[0].hook == Hook::Receive as u8 {
                    e.hdr_kind = hdr_kind::NONE;
                    e.hdr_len = 0;
                }
                run.push(e);
                flush(&mut run, &mut out);
            }
            _ => out.push(b.clone()),
        }
    }
    flush(&mut run, &mut out);
    out
}

/// Writes `session(rounds)` as a recording (for tests of `replay` and `tui --replay`).
pub fn write_recording(path: &std::path::Path, rounds: u64) -> std::io::Result<()> {
    use crate::record::{FORMAT_VERSION, Header, HookInfo, Trailer, Writer};
    let header = Header {
        format_version: FORMAT_VERSION,
        lotrace_version: env!("CARGO_PKG_VERSION").to_string(),
        kernel_release: "fixture".into(),
        record_size: loopback_common::RAW_EVENT_SIZE as u32,
        netns_label: "fixture".into(),
        netns_inode: 4026531840,
        owner: None,
        monotonic_ns: 1_000_000_000,
        realtime_ns: 1_767_225_600_000_000_000, // 2026-01-01T00:00:00Z
        snaplen: 96,
        tracing_since_ns: 0,
        hooks: ["sys_enter", "fib_table_lookup", "net_dev_queue", "lo_tc_egress"]
            .iter()
            .map(|p| HookInfo {
                program: p.to_string(),
                kind: "tp_btf".into(),
                attached: *p != "fib_table_lookup",
                fallback_reason: None,
            })
            .collect(),
        drop_reasons: drop_reasons(),
    };
    let mut w = Writer::create(path, &header)?;
    for e in session(rounds) {
        w.event(&e)?;
    }
    w.finish(&Trailer::default())
}

/// A fixed pseudo-random sequence (xorshift64) from `seed` (not 0): the tests' inputs beyond
/// the hand-picked edges, the same on every run.
pub fn xorshift(seed: u64) -> impl Iterator<Item = u64> {
    std::iter::successors(Some(seed), |&x| {
        let x = x ^ x << 13;
        let x = x ^ x >> 7;
        Some(x ^ x << 17)
    })
    .skip(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::Verdict;

    /// Reconstructs `records` to the finished paths, debug-printed.
    fn paths_of(records: &[Vec<u8>]) -> Vec<String> {
        reconstruct(records).0.iter().map(|p| format!("{p:?}")).collect()
    }

    #[test]
    fn staged_runs_reconstruct_exactly_like_one_record_per_hook() {
        let flat = unstaged_session(12);
        let staged = session(12);
        assert!(
            staged.len() * 2 < flat.len(),
            "the lo chains were staged: {} records for {}",
            staged.len(),
            flat.len()
        );
        assert_eq!(
            staged.iter().map(|b| crate::decode::record_events(b)).sum::<u64>(),
            flat.len() as u64,
            "every hook is still there"
        );
        let (a, b) = (paths_of(&flat), paths_of(&staged));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x, y);
        }
    }

    #[test]
    fn fixture_reconstructs_to_complete_paths_with_every_context() {
        let (done, stats) = reconstruct(session(12));
        // 24 UDP + 3 ICMP pairs + 2 drops
        assert_eq!(done.len(), 24 + 6 + 2);
        assert_eq!(done.iter().filter(|p| p.verdict == Verdict::Dropped).count(), 2);
        assert!(
            done.iter().all(|p| p.complete),
            "{:?}",
            done.iter().find(|p| !p.complete)
        );
        let contexts = stats.by_context();
        assert!(contexts.contains_key("ksoftirqd") && contexts.contains_key("inline"));
    }
}
