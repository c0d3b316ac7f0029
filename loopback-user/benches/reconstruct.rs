//! Offline reconstruction speed: ring-buffer bytes -> decode -> path reconstruction, one core.
//! Target (issue 7): at least 5 million events per second. `cargo xtask bench` runs this and
//! puts the throughput in its table.
use std::collections::HashMap;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use loopback_common::{Hook, RawEvent, hdr_kind};
use loopback_user::{
    decode::{decode, encode},
    path::{Tracker, TrackerConfig},
};

/// IPv4 + UDP header of a 64-byte datagram 127.0.0.1:40000 -> 127.0.0.1:11111.
fn ip_udp(seq: u16) -> Vec<u8> {
    let mut h = vec![
        0x45, 0, 0, 92, 0, 0, 0x40, 0, 64, 17, 0, 0, 127, 0, 0, 1, 127, 0, 0, 1, // IPv4
        0x9c, 0x40, 0x2b, 0x67, 0, 72, 0, 0, // UDP
    ];
    h[4..6].copy_from_slice(&seq.to_be_bytes());
    h
}

fn raw(hook: Hook, ts: u64, skb: u64, hdr: Option<(&[u8], u8)>) -> RawEvent {
    // SAFETY: RawEvent is plain old data; all-zero is a valid value.
    let mut e: RawEvent = unsafe { std::mem::zeroed() };
    e.ts_ns = ts;
    e.skb = skb;
    e.pid_tgid = (4242u64 << 32) | 4242;
    e.comm[..8].copy_from_slice(b"sockperf");
    e.ifname[..2].copy_from_slice(b"lo");
    e.ifindex = 1;
    e.len = 92;
    e.hook = hook as u8;
    if let Some((bytes, kind)) = hdr {
        e.hdr[..bytes.len()].copy_from_slice(bytes);
        e.hdr_len = bytes.len() as u16;
        e.hdr_kind = kind;
    }
    e
}

/// The events of `n` UDP datagrams through lo, as the kernel would put them in the ring:
/// app_send, tc_egress, dev_queue, xmit, backlog_enqueue, xmit_done, receive, tc_ingress,
/// sock_queue, app_recv (10 per packet).
fn recording(n: u64) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(n as usize * 10);
    let mut ts = 1_000_000u64;
    for i in 0..n {
        let skb = 0xffff_8880_0000_0000 + (i % 512) * 0x100;
        let l3 = ip_udp(i as u16);
        let mut eth = vec![0u8; 12];
        eth.extend_from_slice(&[0x08, 0x00]);
        eth.extend_from_slice(&l3);
        let mut push = |h: Hook, skb: u64, hdr: Option<(&[u8], u8)>, arg0: u64, arg1: u64| {
            ts += 300;
            let mut e = raw(h, ts, skb, hdr);
            e.arg0 = arg0;
            e.arg1 = arg1;
            out.push(encode(&e));
        };
        push(Hook::AppSend, 0, None, 44, 0);
        push(Hook::TcEgress, skb, Some((&eth, hdr_kind::ETH)), 0, 0);
        push(Hook::DevQueue, skb, Some((&l3, hdr_kind::L3)), 0, 0);
        push(Hook::Xmit, skb, None, 0, 0);
        push(Hook::BacklogEnqueue, skb, None, 0, 0);
        push(Hook::XmitDone, skb, None, 0, 0);
        push(Hook::Receive, skb, Some((&l3, hdr_kind::L3)), 0, 0);
        push(Hook::TcIngress, skb, Some((&eth, hdr_kind::ETH)), 0, 0);
        push(Hook::SockQueue, skb, None, 0xdead_0000, 0);
        push(Hook::AppRecv, 0, None, 0xdead_0000, 64);
    }
    out
}

fn replay(events: &[Vec<u8>]) -> u64 {
    let mut t = Tracker::new(TrackerConfig::default(), HashMap::new());
    let mut finished = 0u64;
    for b in events {
        let e = decode(b).expect("valid event");
        finished += t.push(e).len() as u64;
    }
    finished + t.flush().len() as u64
}

fn bench(c: &mut Criterion) {
    let events = recording(20_000);
    assert_eq!(replay(&events), 20_000, "every datagram reconstructed");
    let mut g = c.benchmark_group("reconstruct");
    g.throughput(Throughput::Elements(events.len() as u64));
    g.sample_size(20);
    g.bench_function("udp_lo_events", |b| b.iter(|| replay(&events)));
    g.bench_function("decode_only", |b| {
        b.iter(|| events.iter().filter(|e| decode(e).is_ok()).count())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
