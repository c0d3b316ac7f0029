//! The judgement and the report on recorded event sequences.
use loopback_common::Hook;

use serde_json::Value;

use super::*;
use crate::path::tests::{Seq, icmp_info, raw_ping_sequence};

fn paths(events: Vec<crate::decode::Event>) -> Vec<PacketPath> {
    crate::fixture::reconstruct_events(events, std::collections::HashMap::from([(2, "NO_SOCKET".to_string())])).0
}

fn probe(addr: &str, id: u16, echoes: Vec<Echo>) -> Probe {
    Probe {
        target: Target {
            scenario: "up",
            spec: addr.into(),
            addr: addr.parse().unwrap(),
            scope_id: 0,
            source: "literal".into(),
            expect: Verdict::Proven,
            icmp_id: id,
        },
        route_get: KernelRoute {
            kind: Some("local".into()),
            table: Some("local".into()),
            dev: Some("lo".into()),
            error: None,
        },
        owner: Some("lo".into()),
        echoes,
    }
}

fn answered(n: u16) -> Vec<Echo> {
    (1..=n)
        .map(|seq| Echo {
            seq,
            sent: true,
            rtt: Some(Duration::from_micros(20 + seq as u64)),
            error: None,
        })
        .collect()
}

#[test]
fn a_ping_through_lo_is_proven() {
    let r = evaluate(probe("127.0.0.1", 77, answered(1)), &paths(raw_ping_sequence()));
    assert_eq!(r.verdict, Verdict::Proven, "{:?}", r.evidence);
    assert!(r.ok());
    assert_eq!(r.requests.len(), 1);
    assert_eq!(r.replies.len(), 1);
    assert_eq!(r.tx_devs, BTreeSet::from(["lo".to_string()]));
    assert_eq!(r.rx_devs, BTreeSet::from(["lo".to_string()]));
    assert!(r.evidence[0].contains("backlog of cpu 0"), "{:?}", r.evidence);
    assert_eq!(r.contexts.get("inline"), Some(&2), "request and reply");
    let j = report_json(&r);
    assert_eq!(j["verdict"], "PROVEN");
    assert_eq!(j["tx_devs"][0], "lo");
    assert_eq!(j["stages"][0]["stage"], "tc_egress");
    assert_eq!(j["reply_stages"][0]["stage"], "tc_egress");
    assert_eq!(j["rtt_ns"], 21_000);
}

#[test]
fn packets_of_other_targets_are_not_evidence() {
    // Same trace, but the target used another ICMP id: nothing of it was traced.
    let r = evaluate(probe("127.0.0.1", 78, answered(1)), &paths(raw_ping_sequence()));
    assert_eq!(r.verdict, Verdict::Unproven);
    assert!(
        r.evidence.iter().any(|e| e.contains("traced 0 of 1")),
        "{:?}",
        r.evidence
    );
}

#[test]
fn a_request_leaving_through_a_veth_is_disproven_and_names_it() {
    let mut s = Seq::new();
    let req = icmp_info("198.51.100.1", "198.51.100.2", 8, 9, 1);
    s.ev(Hook::DevQueue, 0xa0, 1, "lotrace", "lra", Some(req), 0, 0);
    s.ev(Hook::Xmit, 0xa0, 1, "lotrace", "lra", None, 0, 0);
    s.ev(Hook::BacklogEnqueue, 0xa0, 1, "lotrace", "", None, 0, 0);
    s.ev(Hook::LeftNetns, 0xa0, 1, "lotrace", "lrb", None, 0, 0);
    let rep = icmp_info("198.51.100.2", "198.51.100.1", 0, 9, 1);
    s.ev(Hook::Receive, 0xb0, 1, "lotrace", "lra", Some(rep), 0, 0);
    s.ev(Hook::Consume, 0xb0, 1, "lotrace", "", None, 0, 0);
    let ps = paths(s.events);
    assert_eq!(ps[0].verdict.as_str(), "left_netns");
    let r = evaluate(probe("198.51.100.2", 9, answered(1)), &ps);
    assert_eq!(r.verdict, Verdict::Disproven);
    assert!(!r.ok());
    assert!(r.evidence[0].contains("transmitted on lra"), "{:?}", r.evidence);
    assert_eq!(r.tx_devs, BTreeSet::from(["lra".to_string()]));
}

#[test]
fn a_refused_send_is_unreachable_with_the_route_answer() {
    let mut p = probe("2001:db8::1", 5, vec![]);
    p.echoes = vec![Echo {
        seq: 1,
        sent: false,
        rtt: None,
        error: Some("sendto 2001:db8::1: Network is unreachable (os error 101)".into()),
    }];
    p.route_get = parse_route_get(&Err("Network is unreachable".into()));
    p.owner = None;
    p.target.expect = Verdict::Unreachable;
    let r = evaluate(p, &[]);
    assert_eq!(r.verdict, Verdict::Unreachable);
    assert!(r.ok());
    assert!(r.evidence[0].contains("Network is unreachable"));
    assert!(
        r.evidence[1].contains("no interface holds 2001:db8::1"),
        "{:?}",
        r.evidence
    );
}

#[test]
fn an_unanswered_echo_is_not_proven() {
    let mut echoes = answered(1);
    echoes.push(Echo {
        seq: 2,
        sent: true,
        rtt: None,
        error: Some("no echo reply".into()),
    });
    let r = evaluate(probe("127.0.0.1", 77, echoes), &paths(raw_ping_sequence()));
    assert_eq!(r.verdict, Verdict::Unproven);
    assert!(
        r.evidence
            .iter()
            .any(|e| e.contains("1 of 2 echo requests got no reply"))
    );
}

#[test]
fn zero_address_evidence_names_the_rewritten_destination() {
    let r = evaluate(probe("0.0.0.0", 77, answered(1)), &paths(raw_ping_sequence()));
    assert_eq!(r.verdict, Verdict::Proven);
    assert!(r.evidence[1].contains("rewrote it to 127.0.0.1"), "{:?}", r.evidence);
}

#[test]
fn targets_are_parsed_strictly() {
    assert_eq!(
        parse_spec("127.0.0.1").unwrap(),
        Spec::Addr("127.0.0.1".parse().unwrap(), None)
    );
    assert_eq!(
        parse_spec("fe80::1%lt0").unwrap(),
        Spec::Addr("fe80::1".parse().unwrap(), Some("lt0".into()))
    );
    assert_eq!(parse_spec("localhost").unwrap(), Spec::Name("localhost".into()));
    assert_eq!(parse_spec("a.example.").unwrap(), Spec::Name("a.example.".into()));
    for bad in [
        "300.1.2.3",
        "1.2.3",
        "::g",
        "",
        "a b",
        "-x",
        "a..b",
        "1.2.3.4%lo",
        "fe80::1%a/b",
    ] {
        assert!(parse_spec(bad).is_err(), "{bad:?} accepted");
    }
    assert!(
        parse_spec("1.2.3")
            .unwrap_err()
            .to_string()
            .contains("malformed address")
    );
}

#[test]
fn ip_json_answers_are_parsed() {
    let v: Value = serde_json::from_str(
        r#"[{"ifindex":1,"ifname":"lo","addr_info":[{"family":"inet","local":"127.0.0.1"},
            {"family":"inet6","local":"::1"}]},
           {"ifindex":3,"ifname":"lt0","addr_info":[{"family":"inet6","local":"fe80::1","tentative":true}]}]"#,
    )
    .unwrap();
    let a = parse_addrs(&v);
    assert_eq!(a.len(), 3);
    assert_eq!(a[2].ifindex, 3);
    assert_eq!(a[2].unusable.as_deref(), Some("tentative"));
    assert_eq!(a[0].unusable, None);
    let r = parse_route_get(&Ok(serde_json::from_str(
        r#"[{"type":"local","dst":"192.0.2.1","dev":"lo","prefsrc":"192.0.2.1"}]"#,
    )
    .unwrap()));
    assert_eq!(r.kind.as_deref(), Some("local"));
    assert_eq!(r.table.as_deref(), Some("main"));
    assert_eq!(r.dev.as_deref(), Some("lo"));
    let r = parse_route_get(&Ok(
        serde_json::from_str(r#"[{"dst":"198.51.100.2","dev":"lra"}]"#).unwrap()
    ));
    assert_eq!(r.kind.as_deref(), Some("unicast"));
}
