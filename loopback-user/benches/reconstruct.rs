//! Offline reconstruction speed: ring-buffer bytes -> decode -> path reconstruction, one core.
//! Target (issue 19): at least 15 million events per second. `cargo xtask bench` runs this and
//! puts the throughput in its table. Input: the fixture session (UDP request/response through
//! lo with ICMP echoes, drops and ksoftirqd receives mixed in), shaped like the kernel's records
//! (the lo chains staged into run records), laid end to end in one buffer as the ring buffer and
//! a recording hold them (23 MB for 8,000 rounds).
//!
//! `lo_session_events_scattered` reads the same records each from a heap allocation of its own,
//! as this bench did before: the scattered 101,332 allocations cost cache misses that neither
//! the ring nor `replay`'s reader has (the same code ran about a third slower that way).
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use loopback_user::{
    decode::{self, Decoder},
    fixture, output,
    path::{Tracker, TrackerConfig},
};

fn replay<B: AsRef<[u8]>>(events: &[B]) -> u64 {
    let mut t = Tracker::new(TrackerConfig::default(), fixture::drop_reasons().into_iter().collect());
    let mut d = Decoder::default();
    let mut finished = 0u64;
    // One vector for the finished packets, reused as the engine does.
    let mut done = Vec::new();
    for b in events {
        d.decode_each(b.as_ref(), |e| {
            t.push_into(e, &mut done);
            finished += done.len() as u64;
            done.clear();
        })
        .expect("valid record");
    }
    finished + t.flush().len() as u64
}

/// The whole user-space pipeline of `trace --format json`: decode, reconstruct, one JSON line per
/// packet (into memory, so no write is timed).
fn to_json(events: &[&[u8]], out: &mut output::JsonLines) -> usize {
    out.clear();
    let mut t = Tracker::new(TrackerConfig::default(), fixture::drop_reasons().into_iter().collect());
    let mut d = Decoder::default();
    let mut done = Vec::new();
    for b in events {
        d.decode_each(b, |e| {
            t.push_into(e, &mut done);
            for p in done.drain(..) {
                out.push(&p);
            }
        })
        .expect("valid record");
    }
    for p in t.flush() {
        out.push(&p);
    }
    out.len()
}

/// The records of `events` in `flat`, the buffer that holds them end to end (`events.concat()`,
/// as the ring buffer and a recording hold them), in order.
fn records<'a>(flat: &'a [u8], events: &[Vec<u8>]) -> Vec<&'a [u8]> {
    let mut at = 0;
    events
        .iter()
        .map(|b| {
            let r = &flat[at..at + b.len()];
            at += b.len();
            r
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let rounds = 8_000;
    let scattered = fixture::session(rounds);
    let flat = scattered.concat();
    let events = records(&flat, &scattered);
    // 2 UDP per round, an ICMP pair every 4th, a drop every 6th.
    let packets = rounds * 2 + rounds / 4 * 2 + rounds / 6;
    assert_eq!(replay(&events), packets, "every packet reconstructed");
    assert_eq!(replay(&scattered), packets, "the same records");
    let mut g = c.benchmark_group("reconstruct");
    // Throughput in hook events (a run record of the lo chain holds several).
    let hook_events: u64 = events.iter().map(|b| decode::record_events(b)).sum();
    g.throughput(Throughput::Elements(hook_events));
    g.sample_size(20);
    g.bench_function("lo_session_events", |b| b.iter(|| replay(&events)));
    g.bench_function("lo_session_events_scattered", |b| b.iter(|| replay(&scattered)));
    g.bench_function("decode_only", |b| {
        b.iter(|| {
            let mut d = Decoder::default();
            events.iter().filter_map(|e| d.decode_each(e, |_| {}).ok()).sum::<u64>()
        })
    });
    g.finish();
    // Per packet: what `trace --format json` costs in user space for each packet it prints.
    let mut g = c.benchmark_group("json");
    g.throughput(Throughput::Elements(packets));
    g.sample_size(20);
    let mut out = output::JsonLines::default();
    g.bench_function("lo_session_packets", |b| b.iter(|| to_json(&events, &mut out)));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
