//! The sinks on reconstructed fixture paths.
use std::collections::HashMap;

use serde_json::Value;

use super::*;
use crate::{
    counters::{KernelCounters, ProgramCost},
    decode::{Name, RouteInfo},
    path::{PacketPath, Stage, StageKind, Stats, tests::raw_ping_sequence},
};

/// An empty run is not "100% complete": the share is unknown (JSON null, text "n/a").
#[test]
fn an_empty_run_has_no_complete_share() {
    let sum = Summary::default();
    let empty = Stats::default();
    assert_eq!(summary_json(&empty, &sum)["summary"]["complete_pct"], Value::Null);
    assert!(summary_text(&empty, &sum).contains("0 complete (n/a)"));
    let (_, stats) = paths();
    assert!(summary_json(&stats, &sum)["summary"]["complete_pct"].as_f64().is_some());
    assert!(summary_text(&stats, &sum).contains("%)"));
}

fn paths() -> (Vec<PacketPath>, Stats) {
    crate::fixture::reconstruct_events(raw_ping_sequence(), HashMap::from([(2, "NO_SOCKET".into())]))
}

/// Every packet of the fixture session, plus variants that fill every optional field and
/// put characters that need escaping into every string from the kernel.
fn json_corpus() -> Vec<PacketPath> {
    let (mut ps, _) = crate::fixture::reconstruct(crate::fixture::session(12));
    ps.extend(paths().0);
    let odd = Name::from_bytes(b"a\"b\\c\x01\n\t\x1f/\x7f");
    let mut extra = Vec::new();
    for (i, base) in ps.iter().take(8).enumerate() {
        let mut p = base.clone();
        p.route = Some(RouteInfo {
            dst: "::1".parse().expect("ip"),
            src: "fe80::1".parse().expect("ip"),
            table: [255, 254, 253, 7][i % 4],
            err: -113,
            dev: "e\"th\u{1}0".into(),
        });
        if let Some(info) = &mut p.info {
            info.tcp = Some(crate::decode::Tcp {
                seq: u32::MAX,
                ack: 7,
                flags: 0x12,
            });
            info.proto = [6, 17, 1, 58, 132][i % 5];
        }
        p.drop_reason = Some("WEIRD \"reason\"\\".into());
        p.tx_dev = Some(odd);
        p.reply_of = Some(u64::MAX);
        p.clone_of = Some(0);
        if let Some(s) = &mut p.softirq {
            s.task = odd;
        }
        for st in &mut p.stages {
            st.comm = odd;
            st.dev = if st.dev.is_some() { None } else { Some(odd) };
        }
        extra.push(p);
        let mut q = base.clone();
        q.info = None;
        q.softirq = None;
        q.stages.clear();
        extra.push(q);
    }
    ps.extend(extra);
    ps
}

/// The JSON schema, byte for byte: every line the corpus makes (README, "JSON output").
#[test]
fn json_lines_are_the_documented_schema_byte_for_byte() {
    let mut out = JsonLines::default();
    for p in &json_corpus() {
        out.push(p);
    }
    insta::assert_snapshot!("json_corpus", String::from_utf8_lossy(out.as_bytes()));
}

#[test]
fn json_has_every_documented_key() {
    let (ps, _) = paths();
    for p in &ps {
        let v = packet_json(p);
        for k in [
            "id",
            "t_ns",
            "proto",
            "src",
            "dst",
            "len",
            "sport",
            "dport",
            "icmp",
            "tcp",
            "tx_dev",
            "rx_dev",
            "left_host",
            "complete",
            "verdict",
            "drop_reason",
            "reply_of",
            "clone_of",
            "route",
            "softirq",
            "latency_ns",
            "stages",
        ] {
            assert!(v.get(k).is_some(), "missing {k} in {v}");
        }
        for s in v["stages"].as_array().expect("stages") {
            for k in ["stage", "t_ns", "delta_ns", "cpu", "pid", "tid", "comm", "dev"] {
                assert!(s.get(k).is_some(), "stage lacks {k}");
            }
        }
    }
    let req = packet_json(&ps[0]);
    assert_eq!(req["icmp"]["type"], 8);
    assert_eq!(req["softirq"]["context"], "inline");
    assert_eq!(packet_json(&ps[1])["reply_of"], req["id"]);
}

#[test]
fn text_and_summary_mention_what_matters() {
    let (ps, stats) = paths();
    let st = TextStyle {
        color: false,
        wall_offset_ns: 0,
    };
    let t = packet_text(&ps[0], &st);
    assert!(
        t.contains("echo-request id 77 seq 1") && t.contains("softirq inline") && t.contains("backlog_enqueue"),
        "{t}"
    );
    assert!(!t.contains('\x1b'), "no colour when not asked");
    // The route stage names table and device in full (longer than a 16-byte kernel name).
    let mut routed = ps[0].clone();
    routed.stages.insert(
        0,
        Stage {
            stage: StageKind::Route,
            ..routed.stages[0].clone()
        },
    );
    routed.route = Some(RouteInfo {
        dst: "127.0.0.1".parse().unwrap(),
        src: "127.0.0.1".parse().unwrap(),
        table: 254,
        err: 0,
        dev: "lo".into(),
    });
    let t = packet_text(&routed, &st);
    assert!(t.contains("table main dev lo\n"), "{t}");
    let sum = Summary {
        printed: 3,
        unprinted: 5,
        kernel: KernelCounters {
            ring_lost: 7,
            emitted: 40,
            ..Default::default()
        },
        undecodable: 0,
        received: 33,
        unnamed: 1,
        costs: vec![
            ProgramCost {
                program: "net_dev_queue".into(),
                runs: 10,
                total_ns: 1_500,
            },
            ProgramCost {
                program: "consume_skb".into(),
                runs: 10,
                total_ns: 500,
            },
        ],
        costs_unavailable: None,
        netns: None,
    };
    let s = summary_text(&stats, &sum);
    assert!(
        s.contains("kernel cost: 20 program runs, 2.0us in total (100ns/run); most: net_dev_queue 150ns/run"),
        "{s}"
    );
    let j = summary_json(&stats, &sum);
    assert_eq!(j["summary"]["bpf_programs"][0]["ns_per_run"], 150);
    assert!(
        s.contains("2 packets (3 printed)")
            && s.contains("socket copies: 1")
            && s.contains("lost events: 7")
            && s.contains("drops: none"),
        "{s}"
    );
    assert_eq!(summary_json(&stats, &sum)["summary"]["lost_events"], 7);
    assert_eq!(j["summary"]["unprinted"], 5);
    assert!(s.contains("NOT printed: 5 packets"), "{s}");
    assert!(s.contains("events: 40 emitted, 33 received"), "{s}");
    assert_eq!(
        (
            j["summary"]["events_emitted"].as_u64(),
            j["summary"]["events_received"].as_u64()
        ),
        (Some(40), Some(33))
    );
}

/// Packets cut by the start or the end of tracing are said apart, not as broken packets: the
/// `--count 2` ping-pong of issue 30 ends "2 packets (2 printed), 2 complete (100%), ... 1 in
/// flight at stop".
#[test]
fn the_summary_says_what_was_cut_by_start_and_stop_apart_from_the_packets() {
    let mut stats = Stats::default();
    (stats.packets, stats.complete, stats.in_flight_at_end) = (2, 2, 1);
    let sum = Summary {
        printed: 2,
        ..Default::default()
    };
    let s = summary_text(&stats, &sum);
    assert!(
        s.starts_with("--- lotrace summary: 2 packets (2 printed), 2 complete (100%), drops: none, 1 in flight at stop (not counted; --partial prints them)\n"),
        "{s}"
    );
    stats.in_flight_at_start = 3;
    let j = summary_json(&stats, &sum);
    assert_eq!(
        (
            j["summary"]["in_flight_at_start"].as_u64(),
            j["summary"]["complete_pct"].as_f64()
        ),
        (Some(3), Some(100.0))
    );
    (stats.in_flight_at_start, stats.in_flight_at_end) = (0, 0);
    let first = summary_text(&stats, &sum).lines().next().map(str::to_string);
    assert!(first.is_some_and(|l| !l.contains("in flight")));
}

/// Only ICMP echo messages have an identifier and a sequence number: a port unreachable shows
/// neither (JSON null), where an echo request shows both.
#[test]
fn icmp_errors_carry_no_echo_id_or_seq() {
    let (ps, _) = paths();
    let mut unreach = ps[0].clone();
    if let Some(info) = &mut unreach.info
        && let Some(ic) = &mut info.icmp
    {
        (ic.ty, ic.code) = (3, 3);
    }
    let st = TextStyle {
        color: false,
        wall_offset_ns: 0,
    };
    let j = packet_json(&unreach);
    assert_eq!(
        (
            j["icmp"]["type"].as_u64(),
            j["icmp"]["id"].clone(),
            j["icmp"]["seq"].clone()
        ),
        (Some(3), Value::Null, Value::Null)
    );
    let t = packet_text(&unreach, &st);
    assert!(t.contains("type 3 code 3") && !t.contains(" id "), "{t}");
    let j = packet_json(&ps[0]);
    assert_eq!(
        (j["icmp"]["id"].as_u64(), j["icmp"]["seq"].as_u64()),
        (Some(77), Some(1))
    );
}
