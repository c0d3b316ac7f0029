//! `lotrace agent --otlp URL`: the same counters as `/metrics`, pushed as OTLP/HTTP protobuf to
//! `URL/v1/metrics` every `--otlp-every`. One OTLP resource per namespace, described by the
//! OpenTelemetry semantic conventions (`host.name`, `k8s.node.name`, `k8s.pod.name`,
//! `k8s.namespace.name`, `k8s.pod.uid`, `container.id`, `container.name`,
//! `container.runtime`, plus `lotrace.netns`), and one for the agent itself.
//!
//! The messages are opentelemetry-proto's (the official protocol definitions). The official
//! opentelemetry-otlp exporter is not used for metrics: it exports only what the SDK aggregated
//! itself (the SDK's data points have no public constructor), and the kernel's histograms are
//! already aggregated: re-recording them through SDK instruments would lose their buckets.
//!
//! Never blocks counting or scraping: one export at a time, bounded by a timeout, built under
//! the state lock from the maps (as a scrape is) and sent outside it. A collector that is down,
//! slow or refuses: that export is dropped and counted (`lotrace_agent_otlp_exports_total
//! {outcome}`), with one line on stderr at most once a minute.
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use loopback_common::agent::{
    self, CONTEXT_NAMES, DELIVERY_NAMES, ESCAPE_NAMES, NetnsCounters, PROTO_NAMES, STAGE_NAMES,
};
use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    metrics::v1::{
        AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics,
        ScopeMetrics, Sum, metric, number_data_point,
    },
    resource::v1::Resource,
};
use prost::Message as _;

use super::metrics::{State, buckets};
use crate::owner::Owner;

/// What one export may take before it is given up (and counted as dropped).
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// At most one warning line per this long.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Where and how often.
#[derive(Clone, Debug)]
pub struct OtlpConfig {
    /// The collector's `.../v1/metrics` URL.
    pub url: hyper::Uri,
    pub every: Duration,
}

/// `--otlp URL`: a collector's base URL (`http://host:4318`) or its metrics path.
pub fn parse_url(s: &str) -> Result<hyper::Uri, String> {
    let full = if s.trim_end_matches('/').ends_with("/v1/metrics") {
        s.to_string()
    } else {
        format!("{}/v1/metrics", s.trim_end_matches('/'))
    };
    let uri: hyper::Uri = full.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(format!(
            "{s:?}: an http:// URL of an OTLP/HTTP collector is needed (e.g. http://127.0.0.1:4318)"
        ));
    }
    Ok(uri)
}

fn kv(k: &str, v: impl Into<String>) -> KeyValue {
    KeyValue {
        key: k.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.into())),
        }),
        ..Default::default()
    }
}

/// The resource attributes of a namespace, by OpenTelemetry's semantic conventions.
pub fn resource_of(netns: u32, owner: Option<&Owner>, host: &str) -> Vec<KeyValue> {
    let mut out = vec![kv("host.name", host), kv("lotrace.netns", netns.to_string())];
    let Some(o) = owner else { return out };
    out.push(kv("lotrace.owner", o.kind.clone()));
    out.extend(o.identity().into_iter().filter_map(|(_, attr, v)| Some(kv(attr?, v))));
    out
}

struct Clock {
    start: u64,
    now: u64,
}

/// Number data points stamped with the export's times.
fn numbers<T>(
    clock: &Clock,
    points: Vec<(Vec<KeyValue>, T)>,
    value: impl Fn(T) -> number_data_point::Value,
) -> Vec<NumberDataPoint> {
    points
        .into_iter()
        .map(|(attributes, v)| NumberDataPoint {
            attributes,
            start_time_unix_nano: clock.start,
            time_unix_nano: clock.now,
            exemplars: vec![],
            flags: 0,
            value: Some(value(v)),
        })
        .collect()
}

fn sum(name: &str, desc: &str, unit: &str, clock: &Clock, points: Vec<(Vec<KeyValue>, u64)>) -> Metric {
    Metric {
        name: name.into(),
        description: desc.into(),
        unit: unit.into(),
        metadata: vec![],
        data: Some(metric::Data::Sum(Sum {
            data_points: numbers(clock, points, |v| number_data_point::Value::AsInt(v as i64)),
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: true,
        })),
    }
}

fn gauge(name: &str, desc: &str, clock: &Clock, points: Vec<(Vec<KeyValue>, f64)>) -> Metric {
    Metric {
        name: name.into(),
        description: desc.into(),
        unit: String::new(),
        metadata: vec![],
        data: Some(metric::Data::Gauge(Gauge {
            data_points: numbers(clock, points, number_data_point::Value::AsDouble),
        })),
    }
}

/// Per-stage histograms with the kernel's own buckets: the bounds of /metrics (powers of two
/// from 128 ns), counts per bucket (not cumulative, as OTLP wants), the exact sum.
fn histograms<const N: usize>(
    name: &str,
    desc: &str,
    clock: &Clock,
    names: &[&'static str; N],
    hist: &[[u64; agent::BUCKETS]; N],
    sums: &[u64; N],
) -> Metric {
    let mut points = Vec::new();
    for ((stage, h), s) in names.iter().zip(hist).zip(sums) {
        // The bounds of /metrics and each bucket's own count (OTLP's counts are not cumulative).
        let per_bucket = buckets(h);
        let bounds: Vec<f64> = per_bucket
            .iter()
            .map(|(le, _)| *le)
            .filter(|le| le.is_finite())
            .collect();
        let counts: Vec<u64> = per_bucket.iter().map(|(_, n)| *n).collect();
        points.push(HistogramDataPoint {
            attributes: vec![kv("stage", *stage)],
            start_time_unix_nano: clock.start,
            time_unix_nano: clock.now,
            count: h.iter().sum(),
            sum: Some(*s as f64 / 1e9),
            bucket_counts: counts,
            explicit_bounds: bounds,
            exemplars: vec![],
            flags: 0,
            min: None,
            max: None,
        });
    }
    Metric {
        name: name.into(),
        description: desc.into(),
        unit: "s".into(),
        metadata: vec![],
        data: Some(metric::Data::Histogram(Histogram {
            data_points: points,
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
        })),
    }
}

fn by<const N: usize>(label: &str, names: &[&'static str; N], v: &[u64; N]) -> Vec<(Vec<KeyValue>, u64)> {
    names.iter().zip(v).map(|(n, x)| (vec![kv(label, *n)], *x)).collect()
}

/// One namespace's metrics.
fn netns_metrics(c: &NetnsCounters, drops: &[(String, u64)], clock: &Clock) -> Vec<Metric> {
    let protos = |v: &[u64; agent::PROTOS]| -> Vec<(Vec<KeyValue>, u64)> {
        PROTO_NAMES
            .iter()
            .zip(v)
            .zip(&c.packets)
            .filter(|(_, n)| **n != 0)
            .map(|((p, x), _)| (vec![kv("proto", *p)], *x))
            .collect()
    };
    vec![
        sum(
            "lotrace.lo.packets",
            "Packets that crossed the namespace's lo, by protocol",
            "{packet}",
            clock,
            protos(&c.packets),
        ),
        sum(
            "lotrace.lo.bytes",
            "Their bytes, as lo's own counters count them",
            "By",
            clock,
            protos(&c.bytes),
        ),
        sum(
            "lotrace.lo.backlog_enqueues",
            "netif_rx enqueues of lo packets onto the per-CPU backlog",
            "{packet}",
            clock,
            vec![(vec![], c.backlog_enqueues)],
        ),
        sum(
            "lotrace.lo.softirq_packets",
            "lo packets by the context that ran the NET_RX softirq receiving them",
            "{packet}",
            clock,
            by("context", &CONTEXT_NAMES, &c.softirq),
        ),
        sum(
            "lotrace.lo.escaped_packets",
            "Packets that should have stayed on lo but another device transmitted",
            "{packet}",
            clock,
            by("to", &ESCAPE_NAMES, &c.escaped),
        ),
        sum(
            "lotrace.lo.untimed_packets",
            "lo packets counted without stage times",
            "{packet}",
            clock,
            vec![(vec![], c.untimed)],
        ),
        sum(
            "lotrace.lo.drops",
            "lo packets freed as dropped, by the kernel's drop reason",
            "{packet}",
            clock,
            drops.iter().map(|(r, n)| (vec![kv("reason", r.clone())], *n)).collect(),
        ),
        histograms(
            "lotrace.lo.latency",
            "Time through each stage of the lo path",
            clock,
            &STAGE_NAMES,
            &c.hist,
            &c.hist_sum_ns,
        ),
        histograms(
            "lotrace.lo.delivery_latency",
            "For lo packets an application read: receive to delivery, and lo's driver to it",
            clock,
            &DELIVERY_NAMES,
            &c.delivery,
            &c.delivery_sum_ns,
        ),
    ]
}

fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// The export request for the state now (taken under its lock, as a scrape is).
pub fn request(st: &State, started: SystemTime, exports: &[(&'static str, u64)]) -> ExportMetricsServiceRequest {
    let clock = Clock {
        start: unix_ns(started),
        now: unix_ns(SystemTime::now()),
    };
    let host = st.sources.node.clone();
    let scope = InstrumentationScope {
        name: "lotrace".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        attributes: vec![],
        dropped_attributes_count: 0,
    };
    let snap = st.snapshot();
    let mut resources = Vec::new();
    for (ino, c) in &snap.totals {
        let drops: Vec<(String, u64)> = snap
            .drops
            .iter()
            .filter(|(n, _, _)| n == ino)
            .map(|(_, r, v)| (r.clone(), *v))
            .collect();
        resources.push(ResourceMetrics {
            resource: Some(Resource {
                attributes: resource_of(*ino, snap.owners.get(ino), &host),
                dropped_attributes_count: 0,
                entity_refs: vec![],
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(scope.clone()),
                metrics: netns_metrics(c, &drops, &clock),
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        });
    }
    let agent_metrics = vec![
        gauge(
            "lotrace.agent.netns_watched",
            "Network namespaces the agent watches now",
            &clock,
            vec![(vec![], st.found.len() as f64)],
        ),
        sum(
            "lotrace.agent.netns_released",
            "Namespaces released because they went away",
            "{namespace}",
            &clock,
            vec![(vec![], st.released)],
        ),
        sum(
            "lotrace.agent.overflow",
            "Samples not counted because a bounded map was full",
            "{sample}",
            &clock,
            st.maps
                .overflow()
                .iter()
                .map(|(m, v)| (vec![kv("map", *m)], *v))
                .collect(),
        ),
        sum(
            "lotrace.agent.otlp_exports",
            "Exports to the OTLP collector, by outcome (dropped ones are not retried)",
            "{export}",
            &clock,
            exports.iter().map(|(o, v)| (vec![kv("outcome", *o)], *v)).collect(),
        ),
    ];
    resources.push(ResourceMetrics {
        resource: Some(Resource {
            attributes: vec![
                kv("service.name", "lotrace-agent"),
                kv("service.version", env!("CARGO_PKG_VERSION")),
                kv("host.name", host.clone()),
                kv("k8s.node.name", host),
            ],
            dropped_attributes_count: 0,
            entity_refs: vec![],
        }),
        scope_metrics: vec![ScopeMetrics {
            scope: Some(scope),
            metrics: agent_metrics,
            schema_url: String::new(),
        }],
        schema_url: String::new(),
    });
    ExportMetricsServiceRequest {
        resource_metrics: resources,
    }
}

/// Exports every `cfg.every` until the task is aborted; outcomes counted in the state.
pub async fn run(state: std::sync::Arc<std::sync::Mutex<State>>, cfg: OtlpConfig) {
    let started = SystemTime::now();
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let mut tick = tokio::time::interval(cfg.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned: Option<Instant> = None;
    loop {
        tick.tick().await;
        let body = {
            let st = super::lock(&state);
            let exports = st.otlp_exports;
            request(&st, started, &[("sent", exports.0), ("dropped", exports.1)]).encode_to_vec()
        };
        let req = hyper::Request::post(cfg.url.clone())
            .header("content-type", "application/x-protobuf")
            .body(Full::new(Bytes::from(body)));
        let outcome = match req {
            Err(e) => Err(e.to_string()),
            Ok(req) => match tokio::time::timeout(EXPORT_TIMEOUT, async {
                let resp = client.request(req).await.map_err(|e| format!("{e}"))?;
                let status = resp.status();
                // The body is read (and bounded by the same timeout) so the connection is reused.
                let _ = resp.into_body().collect().await;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(format!("the collector answered {status}"))
                }
            })
            .await
            {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {} s", EXPORT_TIMEOUT.as_secs())),
            },
        };
        let mut st = super::lock(&state);
        match outcome {
            Ok(()) => st.otlp_exports.0 += 1,
            Err(e) => {
                st.otlp_exports.1 += 1;
                if warned.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                    warned = Some(Instant::now());
                    eprintln!(
                        "lotrace agent: OTLP export to {} dropped: {e} (counted in lotrace_agent_otlp_exports_total{{outcome=\"dropped\"}}; said at most once a minute)",
                        cfg.url
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_otlp_url_is_a_base_or_the_metrics_path_over_http() {
        assert_eq!(
            parse_url("http://127.0.0.1:4318").unwrap().to_string(),
            "http://127.0.0.1:4318/v1/metrics"
        );
        assert_eq!(
            parse_url("http://c:4318/v1/metrics").unwrap().to_string(),
            "http://c:4318/v1/metrics"
        );
        assert!(parse_url("https://c:4318").unwrap_err().contains("http://"));
        assert!(parse_url("not a url").is_err());
    }

    #[test]
    fn a_pods_resource_uses_the_semantic_conventions() {
        let o = Owner {
            kind: "pod".into(),
            runtime: Some("containerd".into()),
            container_id: Some("abc".into()),
            pod: Some(crate::owner::Pod {
                name: "web-1".into(),
                namespace: "shop".into(),
                uid: "u".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let attrs = resource_of(7, Some(&o), "n1");
        let get = |k: &str| {
            attrs
                .iter()
                .find(|a| a.key == k)
                .and_then(|a| match &a.value.as_ref()?.value {
                    Some(any_value::Value::StringValue(s)) => Some(s.as_str()),
                    _ => None,
                })
        };
        assert_eq!(get("k8s.pod.name"), Some("web-1"));
        assert_eq!(get("k8s.namespace.name"), Some("shop"));
        assert_eq!(get("container.id"), Some("abc"));
        assert_eq!(get("host.name"), Some("n1"));
        assert_eq!(get("lotrace.netns"), Some("7"));
    }
}
