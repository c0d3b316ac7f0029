//! `lotrace agent --otlp URL`: the metrics pushed over OTLP/HTTP protobuf to a receiver made here
//! from the official protocol definitions (opentelemetry-proto's messages, decoded with prost):
//! the exported counters equal each namespace's lo counters; a receiver that answers errors or
//! never answers gets its exports dropped and counted, said once, while /metrics keeps working.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpListener,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use loopback_user::{netns::Sandbox, traffic};
use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::any_value,
    metrics::v1::{Metric, metric, number_data_point},
};
use prost::Message as _;

use crate::{
    agent::{Agent, wait_for},
    support::{lo_tx_packets, privileged},
};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Accept,
    Fail,
    Stall,
}

/// An OTLP/HTTP receiver on 127.0.0.1: keeps every request it decoded; stopped on drop.
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    fn start(mode: Mode) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        l.set_nonblocking(true).expect("nonblocking");
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, s) = (got.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let Ok((c, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                if mode == Mode::Stall {
                    held.push(c);
                    continue;
                }
                let (g, s) = (g.clone(), s.clone());
                std::thread::spawn(move || serve(c, mode, &g, &s));
            }
        });
        Self {
            port,
            got,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// HTTP/1.1 requests on one connection (keep-alive), each answered 200 or 500.
fn serve(c: std::net::TcpStream, mode: Mode, got: &Mutex<Vec<ExportMetricsServiceRequest>>, stop: &AtomicBool) {
    let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
    let mut w = c.try_clone().expect("clone");
    let mut r = BufReader::new(c);
    while !stop.load(Ordering::Relaxed) {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    continue;
                }
                Err(_) => return,
            }
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        let mut body = vec![0; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let ok = head.starts_with("POST /v1/metrics ")
            && head
                .to_ascii_lowercase()
                .contains("content-type: application/x-protobuf");
        let answer = match (mode, ok, ExportMetricsServiceRequest::decode(body.as_slice())) {
            (Mode::Accept, true, Ok(req)) => {
                got.lock().expect("lock").push(req);
                "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n"
            }
            _ => "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n",
        };
        if w.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

fn attr<'a>(attrs: &'a [opentelemetry_proto::tonic::common::v1::KeyValue], k: &str) -> Option<&'a str> {
    attrs
        .iter()
        .find(|a| a.key == k)
        .and_then(|a| match &a.value.as_ref()?.value {
            Some(any_value::Value::StringValue(s)) => Some(s.as_str()),
            _ => None,
        })
}

/// The metrics of namespace `ino` in the newest request that has it.
fn metrics_of(got: &Mutex<Vec<ExportMetricsServiceRequest>>, ino: u32) -> Option<Vec<Metric>> {
    let g = got.lock().expect("lock");
    g.iter().rev().find_map(|req| {
        let rm = req.resource_metrics.iter().find(|rm| {
            rm.resource
                .as_ref()
                .is_some_and(|r| attr(&r.attributes, "lotrace.netns") == Some(&ino.to_string()))
        })?;
        Some(rm.scope_metrics.iter().flat_map(|s| s.metrics.clone()).collect())
    })
}

fn sum_of(ms: &[Metric], name: &str) -> Option<u64> {
    let m = ms.iter().find(|m| m.name == name)?;
    let Some(metric::Data::Sum(s)) = &m.data else {
        return None;
    };
    Some(
        s.data_points
            .iter()
            .map(|p| match p.value {
                Some(number_data_point::Value::AsInt(v)) => v as u64,
                _ => 0,
            })
            .sum(),
    )
}

fn counter(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[test]
fn otlp_export_carries_each_namespaces_counters_exactly() {
    if !privileged() {
        return;
    }
    let rx = Receiver::start(Mode::Accept);
    let sb = Sandbox::new("lt-otlp").expect("sandbox");
    let agent = Agent::start(&["--otlp", &rx.url(), "--otlp-every", "0.5"]);
    let before = lo_tx_packets(&sb);
    sb.netns
        .run(|| {
            for seq in 0..5 {
                traffic::icmp_echo(std::net::Ipv4Addr::LOCALHOST.into(), 0, 31, seq, Duration::from_secs(2))
                    .expect("echo");
            }
            traffic::udp_exchange(std::net::Ipv4Addr::LOCALHOST.into(), b"otlp").expect("udp");
        })
        .expect("traffic");
    let sent = lo_tx_packets(&sb) - before;
    assert!(sent >= 12, "{sent}");
    let ino = sb.netns.inode;
    let ms = wait_for(15, "an export with the namespace's packets", || {
        let ms = metrics_of(&rx.got, ino)?;
        (sum_of(&ms, "lotrace.lo.packets")? == lo_tx_packets(&sb)).then_some(ms)
    });
    // The crossing histogram: every packet timed, the kernel's buckets as they are.
    let lat = ms.iter().find(|m| m.name == "lotrace.lo.latency").expect("latency");
    let Some(metric::Data::Histogram(h)) = &lat.data else {
        panic!("latency is not a histogram")
    };
    let crossing = h
        .data_points
        .iter()
        .find(|p| attr(&p.attributes, "stage") == Some("crossing"))
        .expect("crossing");
    assert_eq!(crossing.bucket_counts.len(), crossing.explicit_bounds.len() + 1);
    assert_eq!(crossing.bucket_counts.iter().sum::<u64>(), crossing.count);
    assert_eq!(crossing.count, lo_tx_packets(&sb), "every packet timed");
    assert!(crossing.explicit_bounds.windows(2).all(|w| w[0] < w[1]));
    assert!(lat.unit == "s" && crossing.sum.is_some_and(|s| s > 0.0));
    let text = agent.metrics();
    assert!(
        counter(&text, "lotrace_agent_otlp_exports_total{outcome=\"sent\"}") >= Some(1.0),
        "{text}"
    );
    assert_eq!(
        counter(&text, "lotrace_agent_otlp_exports_total{outcome=\"dropped\"}"),
        Some(0.0)
    );
    let (rc, err) = agent.stop();
    assert_eq!(rc, 0, "{err}");
    assert!(!err.contains("OTLP export"), "{err}");
}

#[test]
fn a_collector_that_fails_or_stalls_costs_only_its_exports() {
    if !privileged() {
        return;
    }
    for mode in [Mode::Fail, Mode::Stall] {
        let rx = Receiver::start(mode);
        let agent = Agent::start(&["--otlp", &rx.url(), "--otlp-every", "0.2"]);
        // Failed exports are counted (a stalled one after its 5 s timeout); every scrape is
        // answered meanwhile.
        let mut scrapes = 0;
        wait_for(30, "two exports dropped", || {
            scrapes += 1;
            let t = agent.metrics();
            (counter(&t, "lotrace_agent_otlp_exports_total{outcome=\"dropped\"}")? >= 2.0).then_some(())
        });
        assert!(scrapes >= 1);
        let t = agent.metrics();
        assert_eq!(
            counter(&t, "lotrace_agent_otlp_exports_total{outcome=\"sent\"}"),
            Some(0.0)
        );
        let (rc, err) = agent.stop();
        assert_eq!(rc, 0, "{err}");
        let warnings = err.lines().filter(|l| l.contains("OTLP export")).count();
        assert_eq!(warnings, 1, "said once a minute at most: {err}");
    }
}
