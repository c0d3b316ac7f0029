//! Offline reconstruction speed: ring-buffer bytes -> decode -> path reconstruction, one core.
//! Target (issue 7): at least 5 million events per second. `cargo xtask bench` runs this and
//! puts the throughput in its table. Input: the fixture session (UDP request/response through
//! lo with ICMP echoes, drops and ksoftirqd receives mixed in), shaped like the kernel's records
//! (the lo chains staged into run records).
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use loopback_user::{
    decode::{self, Decoder},
    fixture,
    path::{Tracker, TrackerConfig},
};

fn replay(events: &[Vec<u8>]) -> u64 {
    let mut t = Tracker::new(TrackerConfig::default(), fixture::drop_reasons().into_iter().collect());
    let mut d = Decoder::default();
    let mut finished = 0u64;
    for b in events {
        d.decode_each(b, |e| finished += t.push(e).len() as u64)
            .expect("valid record");
    }
    finished + t.flush().len() as u64
}

fn bench(c: &mut Criterion) {
    let rounds = 8_000;
    let events = fixture::session(rounds);
    // 2 UDP per round, an ICMP pair every 4th, a drop every 6th.
    let packets = rounds * 2 + rounds / 4 * 2 + rounds / 6;
    assert_eq!(replay(&events), packets, "every packet reconstructed");
    let mut g = c.benchmark_group("reconstruct");
    // Throughput in hook events (a run record of the lo chain holds several).
    let hook_events: u64 = events.iter().map(|b| decode::record_events(b)).sum();
    g.throughput(Throughput::Elements(hook_events));
    g.sample_size(20);
    g.bench_function("lo_session_events", |b| b.iter(|| replay(&events)));
    g.bench_function("decode_only", |b| {
        b.iter(|| {
            let mut d = Decoder::default();
            events.iter().filter_map(|e| d.decode_each(e, |_| {}).ok()).sum::<u64>()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
