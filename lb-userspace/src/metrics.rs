//! Prometheus metrics: the data plane's counters, the backends' health and the VIPs' pools, and
//! the health checks' latencies, in the Prometheus text exposition format (version 0.0.4), served
//! at `GET /metrics`.
//!
//! | family | type | labels | value |
//! | --- | --- | --- | --- |
//! | `lb_vip_packets_total` | counter | `vip` | packets to the VIP (data plane) |
//! | `lb_vip_bytes_total` | counter | `vip` | bytes to the VIP (data plane) |
//! | `lb_backend_packets_total` | counter | `vip`, `backend` | packets sent to the backend |
//! | `lb_backend_bytes_total` | counter | `vip`, `backend` | bytes sent to the backend |
//! | `lb_backend_new_flows_total` | counter | `vip`, `backend` | new flows assigned to the backend |
//! | `lb_backend_up` | gauge | `vip`, `backend` | 1 while the health checks say up, else 0 (down, or not checked yet) |
//! | `lb_vip_active_pool` | gauge | `vip`, `pool` | one series per pool (`primary`, `standby`, `none`): 1 for the pool serving new flows, 0 for the two others |
//! | `lb_vip_announced` | gauge | `vip` | 1 while this node announces the VIP's address (some VIP on it can serve), else 0 |
//! | `lb_health_check_duration_seconds` | histogram | `vip`, `backend` | each check's latency, 100µs to 5s buckets |
//! | `lb_xdp_verdicts_total` | counter | `reason` | packets per verdict reason ([`Reason::name`]), every reason, zeros included |
//! | `lb_flow_table_entries` | gauge | | entries in the flow table (at the last flow sweep) |
//! | `lb_vip_ring_slots_changed` | gauge | `vip` | slots of the VIP's live ring whose owner changed within `tcp_idle_timeout`: only their TCP connections use the flow table |
//! | `lb_vip_flow_table_entries` | gauge | `vip` | the flow table's entries for the VIP (at the last flow sweep) |
//! | `lb_sync_flows_sent_total` | counter | `peer` | flow records sent to the peer (`[sync]`) |
//! | `lb_sync_flows_received_total` | counter | `peer` | flow records received from the peer |
//! | `lb_sync_peer_up` | gauge | `peer` | 1 while the peer was heard within 3 s, else 0 |
//! | `lb_sync_drops_total` | counter | `reason` | datagrams dropped: `truncated`, `malformed`, `unauthenticated`, `replayed`, `stale`, `unknown_peer`; records a full peer queue dropped: `queue_full` |
//! | `lb_sync_flows_skipped_total` | counter | `reason` | received flows not installed: `unknown_vip`, `unknown_backend`, `local_newer` |
//! | `lb_sync_flows_installed_total` | counter | | received flows written into the flow table |
//! | `lb_sync_events_lost_total` | counter | | flow inserts the data plane could not report (event ring full) |
//! | `lb_dns_queries_total` | counter | `qtype`, `rcode` | DNS queries answered (`[dns]`): qtype `A`, `AAAA`, `SOA`, `NS`, `ANY`, `other`, `none`; rcode `NOERROR`, `NXDOMAIN`, `REFUSED`, `FORMERR`, `NOTIMP`, `SERVFAIL`, `dropped` (no reply) |
//! | `lb_dns_truncated_total` | counter | | UDP answers sent with TC set |
//! | `lb_dns_name_up_addresses` | gauge | `name` | addresses each DNS name answers with now |
//!
//! `backend` is the backend's address as the config spells it (`10.0.0.11`, `2001:db8::11`),
//! `vip` the VIP's name.
//!
//! Counters are not counted here: [`Metrics::update_from`] takes a [`Snapshot`] of the data
//! plane's own per-CPU counters (summed) and every scrape prints exactly those totals, so a
//! counter in the exposition always equals the map's value at the last update. Series follow the
//! VIPs and backends of the last update: a backend removed from the config disappears from every
//! family, histograms included. Every family's `# HELP` and `# TYPE` lines are printed even before
//! the first update, when it has no samples yet.
//!
//! [`serve`] answers `GET /metrics` (and `HEAD`) with [`CONTENT_TYPE`], 405 for other methods on
//! that path and 404 elsewhere.

mod dns;
mod sync;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONTENT_TYPE as CONTENT_TYPE_HEADER, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use lb_common::Reason;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::info;

use crate::balancer::VipState;
use crate::health::Health;
use crate::pool::ActivePool;
use crate::stats::Snapshot;

/// The `Content-Type` of [`Metrics::encode`]'s output: Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Upper bounds of `lb_health_check_duration_seconds`' buckets, in seconds: 100µs (a check on
/// the same host) to 5s (a long timeout); `+Inf` is added.
pub const CHECK_DURATION_BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The pools in the order `lb_vip_active_pool` lists them.
const POOLS: [ActivePool; 3] = [ActivePool::Primary, ActivePool::Standby, ActivePool::None];

/// The daemon's metrics: a registry whose one collector prints the state of the last
/// [`Metrics::update_from`] and the check latencies of [`Metrics::observe_check`].
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    state: Arc<Mutex<State>>,
}

/// What the next scrape prints.
#[derive(Debug, Default)]
struct State {
    /// The data plane's counters at the last update.
    snapshot: Option<Snapshot>,
    /// Health and pools at the last update, in config order.
    vips: Vec<VipGauges>,
    flow_entries: Option<u64>,
    /// (vip, whether its address is announced), in config order.
    announced: Vec<(String, bool)>,
    /// (vip, changed ring slots, flow-table entries), in config order.
    flow_tables: Vec<(String, u64, u64)>,
    /// Check latencies by (vip, backend).
    checks: BTreeMap<(String, String), Histogram>,
    /// `[sync]` at the last update; `None` when off.
    sync: Option<crate::api::model::SyncStatus>,
    /// `[dns]` at the last update; `None` when off.
    dns: Option<crate::api::model::DnsStatus>,
}

#[derive(Debug)]
struct VipGauges {
    name: String,
    active_pool: ActivePool,
    /// (address, up)
    backends: Vec<(String, bool)>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every family, without samples until the first [`Metrics::update_from`].
    pub fn new() -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Exposition {
            state: Arc::clone(&state),
        }));
        Self { registry, state }
    }

    /// Takes the data plane's totals from `snapshot`, health and pools from `vips` and the flow
    /// table's size. Counters are set to the snapshot's values, not added to. Series of VIPs and
    /// backends no longer in `vips` (a reload removed them) are dropped, check latencies too.
    pub fn update_from(&self, snapshot: &Snapshot, vips: &[VipState], flow_entries: u64) {
        let gauges: Vec<VipGauges> = vips
            .iter()
            .map(|vip| VipGauges {
                name: vip.name.clone(),
                active_pool: vip.active_pool,
                backends: vip
                    .backends
                    .iter()
                    .map(|b| (b.address.to_string(), b.health == Health::Up))
                    .collect(),
            })
            .collect();
        let known: HashSet<(&str, &str)> = gauges
            .iter()
            .flat_map(|vip| {
                vip.backends
                    .iter()
                    .map(|(address, _)| (vip.name.as_str(), address.as_str()))
            })
            .collect();
        let mut state = self.lock();
        state
            .checks
            .retain(|(vip, backend), _| known.contains(&(vip.as_str(), backend.as_str())));
        state.snapshot = Some(snapshot.clone());
        state.vips = gauges;
        state.flow_entries = Some(flow_entries);
    }

    /// Takes each VIP's changed ring slots and flow-table entries: (vip, slots, entries).
    pub fn set_flow_tables(&self, per_vip: Vec<(String, u64, u64)>) {
        self.lock().flow_tables = per_vip;
    }

    /// Takes the DNS responder's status (`None`: `[dns]` is off).
    pub fn set_dns(&self, status: Option<crate::api::model::DnsStatus>) {
        self.lock().dns = status;
    }

    /// Takes the sync service's status (`None`: replication is off).
    pub fn set_sync(&self, status: Option<crate::api::model::SyncStatus>) {
        self.lock().sync = status;
    }

    /// Takes which VIPs' addresses are announced from the announcer's last decision.
    pub fn set_announcements(&self, decision: &crate::announce::Decision) {
        let announced = decision
            .vips
            .iter()
            .map(|vip| (vip.name.clone(), decision.announces(vip.address)))
            .collect();
        self.lock().announced = announced;
    }

    /// Records one health check's latency for `backend` (its address) of VIP `vip` (its name).
    pub fn observe_check(&self, vip: &str, backend: &str, latency: Duration) {
        let histogram = {
            let mut state = self.lock();
            state
                .checks
                .entry((vip.to_owned(), backend.to_owned()))
                .or_insert_with(|| Histogram::new(CHECK_DURATION_BUCKETS))
                .clone()
        };
        histogram.observe(latency.as_secs_f64());
    }

    /// The exposition, in the Prometheus text format ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is always whole between statements: a panic elsewhere cannot leave it
        // half-updated, so a poisoned lock is still good to read.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The registry's collector: prints [`State`] on every scrape.
#[derive(Debug)]
struct Exposition {
    state: Arc<Mutex<State>>,
}

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let snapshot_vips = state.snapshot.as_ref().map_or(&[][..], |s| &s.vips[..]);
        let vip_counter = |name, help, value: fn(&lb_common::Counters) -> u64| Family {
            name,
            help,
            metric_type: MetricType::Counter,
            samples: snapshot_vips
                .iter()
                .map(move |vip| {
                    (
                        [("vip", vip.name.as_str())],
                        ConstCounter::new(value(&vip.counters)),
                    )
                })
                .collect::<Vec<_>>(),
        };
        let backend_counter = |name, help, value: fn(&lb_common::Counters) -> u64| Family {
            name,
            help,
            metric_type: MetricType::Counter,
            samples: snapshot_vips
                .iter()
                .flat_map(|vip| {
                    vip.backends.iter().map(move |b| {
                        (
                            [("vip", vip.name.as_str()), ("backend", b.address.as_str())],
                            ConstCounter::new(value(&b.counters)),
                        )
                    })
                })
                .collect::<Vec<_>>(),
        };

        vip_counter(
            "lb_vip_packets",
            "Packets to the VIP, from the data plane's counters.",
            |c| c.packets,
        )
        .encode(&mut encoder)?;
        vip_counter(
            "lb_vip_bytes",
            "Bytes to the VIP, from the data plane's counters.",
            |c| c.bytes,
        )
        .encode(&mut encoder)?;
        backend_counter(
            "lb_backend_packets",
            "Packets sent to the backend, from the data plane's counters.",
            |c| c.packets,
        )
        .encode(&mut encoder)?;
        backend_counter(
            "lb_backend_bytes",
            "Bytes sent to the backend, from the data plane's counters.",
            |c| c.bytes,
        )
        .encode(&mut encoder)?;
        backend_counter(
            "lb_backend_new_flows",
            "New flows assigned to the backend, from the data plane's counters.",
            |c| c.new_flows,
        )
        .encode(&mut encoder)?;

        Family {
            name: "lb_backend_up",
            help: "1 while the backend's health checks say up, 0 when down or not checked yet.",
            metric_type: MetricType::Gauge,
            samples: state
                .vips
                .iter()
                .flat_map(|vip| {
                    vip.backends.iter().map(|(address, up)| {
                        (
                            [("vip", vip.name.as_str()), ("backend", address.as_str())],
                            ConstGauge::new(i64::from(*up)),
                        )
                    })
                })
                .collect(),
        }
        .encode(&mut encoder)?;

        Family {
            name: "lb_vip_active_pool",
            help: "1 for the pool serving the VIP's new flows (primary, standby, or none: \
                   nothing healthy), 0 for the others.",
            metric_type: MetricType::Gauge,
            samples: state
                .vips
                .iter()
                .flat_map(|vip| {
                    POOLS.iter().map(|&pool| {
                        (
                            [("vip", vip.name.as_str()), ("pool", pool.as_str())],
                            ConstGauge::new(i64::from(vip.active_pool == pool)),
                        )
                    })
                })
                .collect(),
        }
        .encode(&mut encoder)?;

        Family {
            name: "lb_vip_announced",
            help: "1 while this node announces the VIP's address (a VIP on it can serve new \
                   flows), else 0.",
            metric_type: MetricType::Gauge,
            samples: state
                .announced
                .iter()
                .map(|(vip, announced)| {
                    (
                        [("vip", vip.as_str())],
                        ConstGauge::new(i64::from(*announced)),
                    )
                })
                .collect(),
        }
        .encode(&mut encoder)?;

        Family {
            name: "lb_vip_ring_slots_changed",
            help: "Slots of the VIP's live ring whose owner changed within tcp_idle_timeout; \
                   only their TCP connections use the flow table.",
            metric_type: MetricType::Gauge,
            samples: state
                .flow_tables
                .iter()
                .map(|(vip, changed, _)| ([("vip", vip.as_str())], ConstGauge::new(*changed)))
                .collect(),
        }
        .encode(&mut encoder)?;

        Family {
            name: "lb_vip_flow_table_entries",
            help: "Entries of the flow table for the VIP, at the last flow sweep.",
            metric_type: MetricType::Gauge,
            samples: state
                .flow_tables
                .iter()
                .map(|(vip, _, entries)| ([("vip", vip.as_str())], ConstGauge::new(*entries)))
                .collect(),
        }
        .encode(&mut encoder)?;

        Family {
            name: "lb_health_check_duration_seconds",
            help: "How long each health check of the backend took, until its result or timeout.",
            metric_type: MetricType::Histogram,
            samples: state
                .checks
                .iter()
                .map(|((vip, backend), histogram)| {
                    (
                        [("vip", vip.as_str()), ("backend", backend.as_str())],
                        histogram.clone(),
                    )
                })
                .collect(),
        }
        .encode(&mut encoder)?;

        let reasons = state.snapshot.as_ref().map_or(&[][..], |s| &s.reasons[..]);
        Family {
            name: "lb_xdp_verdicts",
            help: "Packets by the XDP program's verdict reason.",
            metric_type: MetricType::Counter,
            samples: reasons
                .iter()
                .map(|(reason, counters)| {
                    (
                        [("reason", Reason::name(*reason))],
                        ConstCounter::new(counters.packets),
                    )
                })
                .collect(),
        }
        .encode(&mut encoder)?;

        let flow_entries = encoder.encode_descriptor(
            "lb_flow_table_entries",
            "Entries in the flow (connection) table.",
            None,
            MetricType::Gauge,
        )?;
        if let Some(entries) = state.flow_entries {
            ConstGauge::new(entries).encode(flow_entries)?;
        }
        sync::encode(state.sync.as_ref(), &mut encoder)?;
        dns::encode(state.dns.as_ref(), &mut encoder)?;
        Ok(())
    }
}

/// One metric family: its descriptor and its labelled samples, in order.
struct Family<L, M> {
    /// Without the `_total` of a counter: the encoder adds it.
    name: &'static str,
    help: &'static str,
    metric_type: MetricType,
    samples: Vec<(L, M)>,
}

impl<L: EncodeLabelSet, M: EncodeMetric> Family<L, M> {
    fn encode(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let mut family = encoder.encode_descriptor(self.name, self.help, None, self.metric_type)?;
        for (labels, metric) in &self.samples {
            metric.encode(family.encode_family(labels)?)?;
        }
        Ok(())
    }
}

/// Serves `GET /metrics` on `addr` until `shutdown` completes. Fails only if `addr` cannot be
/// bound; see [`serve_on`].
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: impl Future,
) -> io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    serve_on(listener, metrics, shutdown).await;
    Ok(())
}

/// Serves `GET /metrics` on a bound `listener` until `shutdown` completes, then closes every
/// connection. HTTP/1.1 with keep-alive, within [`crate::http_server::LIMITS`] (64
/// connections, 5 s to send headers, bodies over 64 KiB refused 413, ...).
pub async fn serve_on(listener: TcpListener, metrics: Arc<Metrics>, shutdown: impl Future) {
    if let Ok(local) = listener.local_addr() {
        info!("serving metrics on http://{local}/metrics");
    }
    let respond = move |request: Request<Incoming>| {
        let response = respond(&metrics, &request);
        async move { response }
    };
    crate::http_server::serve("metrics", listener, respond, shutdown).await;
}

fn respond(metrics: &Metrics, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            (StatusCode::OK, CONTENT_TYPE, metrics.encode())
        }
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET and HEAD\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: metrics are at /metrics\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE_HEADER, HeaderValue::from_static(content_type));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    response
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::net::IpAddr;

    use lb_common::Counters;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::balancer::{BackendState, vip_key};
    use crate::config::{OnAllDown, Protocol};
    use crate::stats::{BackendCounters, VipCounters};

    /// Every family, with its type, as `# TYPE` names it.
    const FAMILIES: [(&str, &str); 23] = [
        ("lb_vip_packets_total", "counter"),
        ("lb_vip_bytes_total", "counter"),
        ("lb_backend_packets_total", "counter"),
        ("lb_backend_bytes_total", "counter"),
        ("lb_backend_new_flows_total", "counter"),
        ("lb_backend_up", "gauge"),
        ("lb_vip_active_pool", "gauge"),
        ("lb_vip_announced", "gauge"),
        ("lb_vip_ring_slots_changed", "gauge"),
        ("lb_vip_flow_table_entries", "gauge"),
        ("lb_health_check_duration_seconds", "histogram"),
        ("lb_xdp_verdicts_total", "counter"),
        ("lb_flow_table_entries", "gauge"),
        ("lb_sync_flows_sent_total", "counter"),
        ("lb_sync_flows_received_total", "counter"),
        ("lb_sync_peer_up", "gauge"),
        ("lb_sync_drops_total", "counter"),
        ("lb_sync_flows_skipped_total", "counter"),
        ("lb_sync_flows_installed_total", "counter"),
        ("lb_sync_events_lost_total", "counter"),
        ("lb_dns_queries_total", "counter"),
        ("lb_dns_truncated_total", "counter"),
        ("lb_dns_name_up_addresses", "gauge"),
    ];

    #[test]
    fn dns_families_print_queries_by_type_and_rcode() {
        let metrics = Metrics::new();
        let query = |qtype: &str, rcode: &str, count| crate::api::model::DnsQueryCount {
            qtype: qtype.into(),
            rcode: rcode.into(),
            count,
        };
        metrics.set_dns(Some(crate::api::model::DnsStatus {
            zone: "svc.example.".into(),
            listen: vec!["10.0.0.2:53".into()],
            ttl_seconds: 5,
            names: vec![crate::api::model::DnsNameStatus {
                name: "www.svc.example.".into(),
                answer: vec!["10.0.0.100".into(), "192.0.2.1".into()],
                ..Default::default()
            }],
            queries: vec![query("A", "NOERROR", 10), query("A", "NXDOMAIN", 2)],
            truncated: 3,
        }));
        let text = metrics.encode();
        for line in [
            "lb_dns_queries_total{qtype=\"A\",rcode=\"NOERROR\"} 10",
            "lb_dns_queries_total{qtype=\"A\",rcode=\"NXDOMAIN\"} 2",
            "lb_dns_truncated_total 3",
            "lb_dns_name_up_addresses{name=\"www.svc.example.\"} 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in:\n{text}"
            );
        }
        parse_strict(&text);
        metrics.set_dns(None);
        assert!(
            !metrics.encode().contains("qtype=\""),
            "no dns samples without [dns]"
        );
    }

    #[test]
    fn sync_families_print_each_peer_and_reason() {
        let metrics = Metrics::new();
        let drops = |pairs: &[(&str, u64)]| {
            pairs
                .iter()
                .map(|(r, c)| (r.to_string(), *c))
                .collect::<BTreeMap<_, _>>()
        };
        metrics.set_sync(Some(crate::api::model::SyncStatus {
            listen: "10.0.0.2:7946".into(),
            pulled: true,
            pulled_flows: 3,
            flows_sent: 12,
            flows_received: 7,
            flows_installed: 6,
            flows_skipped: drops(&[("local_newer", 1), ("unknown_backend", 0)]),
            drops: drops(&[("replayed", 2), ("unauthenticated", 5)]),
            events_lost: 4,
            peers: vec![
                crate::api::model::PeerStatus {
                    address: "10.0.0.3:7946".into(),
                    up: true,
                    flows_sent: 10,
                    flows_received: 7,
                    ..Default::default()
                },
                crate::api::model::PeerStatus {
                    address: "10.0.0.4:7946".into(),
                    up: false,
                    flows_sent: 2,
                    ..Default::default()
                },
            ],
        }));
        let text = metrics.encode();
        for line in [
            "lb_sync_flows_sent_total{peer=\"10.0.0.3:7946\"} 10",
            "lb_sync_flows_sent_total{peer=\"10.0.0.4:7946\"} 2",
            "lb_sync_flows_received_total{peer=\"10.0.0.3:7946\"} 7",
            "lb_sync_peer_up{peer=\"10.0.0.3:7946\"} 1",
            "lb_sync_peer_up{peer=\"10.0.0.4:7946\"} 0",
            "lb_sync_drops_total{reason=\"replayed\"} 2",
            "lb_sync_drops_total{reason=\"unauthenticated\"} 5",
            "lb_sync_flows_skipped_total{reason=\"local_newer\"} 1",
            "lb_sync_flows_skipped_total{reason=\"unknown_backend\"} 0",
            "lb_sync_flows_installed_total 6",
            "lb_sync_events_lost_total 4",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in:\n{text}"
            );
        }
        parse_strict(&text);
        metrics.set_sync(None);
        assert!(
            !metrics.encode().contains("peer=\""),
            "no sync samples without [sync]"
        );
    }

    fn counters(packets: u64, bytes: u64, new_flows: u64) -> Counters {
        Counters {
            packets,
            bytes,
            new_flows,
        }
    }

    fn backend(id: u32, address: &str, standby: bool, health: Health) -> BackendState {
        BackendState {
            id,
            address: address.parse().unwrap(),
            weight: 100,
            standby,
            health,
            path: None,
            admin: crate::balancer::Admin::Enabled,
            held_until: None,
        }
    }

    fn vip(
        id: u32,
        name: &str,
        address: &str,
        port: u16,
        active_pool: ActivePool,
        backends: Vec<BackendState>,
    ) -> VipState {
        let address: IpAddr = address.parse().unwrap();
        VipState {
            id,
            name: name.to_owned(),
            key: vip_key(address, port, Protocol::Tcp.number()),
            address,
            port,
            protocol: Protocol::Tcp,
            active_ring: 0,
            min_healthy: 1,
            on_all_down: OnAllDown::Drop,
            forward: crate::config::Forward::L2,
            encap_source: Vec::new(),
            check_through_tunnel: false,
            active_pool,
            backends,
        }
    }

    /// `web` (two primaries, one up, and a standby) serving from its primaries, and `v6` (one
    /// backend, not checked yet) with nothing healthy.
    fn vips() -> Vec<VipState> {
        vec![
            vip(
                0,
                "web",
                "10.0.0.100",
                80,
                ActivePool::Primary,
                vec![
                    backend(0, "10.0.0.11", false, Health::Up),
                    backend(1, "10.0.0.12", false, Health::Down),
                    backend(2, "10.0.0.13", true, Health::Up),
                ],
            ),
            vip(
                1,
                "v6",
                "2001:db8::100",
                443,
                ActivePool::None,
                vec![backend(3, "2001:db8::11", false, Health::Unknown)],
            ),
        ]
    }

    /// The data plane's counters for [`vips`]; `scale` multiplies every value.
    fn snapshot(scale: u64) -> Snapshot {
        let backend = |address: &str, c: Counters| BackendCounters {
            address: address.to_owned(),
            counters: c,
        };
        Snapshot {
            vips: vec![
                VipCounters {
                    name: "web".into(),
                    endpoint: "10.0.0.100:80/tcp".into(),
                    counters: counters(50 * scale, 5000 * scale, 9 * scale),
                    backends: vec![
                        backend("10.0.0.11", counters(42 * scale, 4200 * scale, 7 * scale)),
                        backend("10.0.0.12", counters(8 * scale, 800 * scale, 2 * scale)),
                        backend("10.0.0.13", counters(0, 0, 0)),
                    ],
                },
                VipCounters {
                    name: "v6".into(),
                    endpoint: "[2001:db8::100]:443/tcp".into(),
                    counters: counters(3 * scale, 300 * scale, scale),
                    backends: vec![backend("2001:db8::11", counters(0, 0, 0))],
                },
            ],
            reasons: Reason::ALL
                .iter()
                .map(|&r| {
                    let packets = match r {
                        Reason::Tx => 50 * scale,
                        Reason::PassNotVip => 12 * scale,
                        Reason::DropNoBackend => 3 * scale,
                        _ => 0,
                    };
                    (r, counters(packets, packets * 100, 0))
                })
                .collect(),
        }
    }

    #[track_caller]
    fn assert_lines(text: &str, expected: &[&str]) {
        let lines: BTreeSet<&str> = text.lines().collect();
        for line in expected {
            assert!(lines.contains(line), "no line {line:?} in:\n{text}");
        }
    }

    /// A strict check of the Prometheus text format (0.0.4): `# HELP` and `# TYPE` once per
    /// family, before its samples; every sample `name{label="value",...} value` of a declared
    /// family (histograms: `_bucket`, `_sum`, `_count`), its value a number, no sample twice.
    /// Returns the samples as `(name, labels, value)`.
    fn parse_strict(text: &str) -> Vec<(String, String, f64)> {
        assert!(text.ends_with('\n'), "no final newline");
        let mut types: BTreeMap<String, String> = BTreeMap::new();
        let mut helps: BTreeSet<String> = BTreeSet::new();
        let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP without text");
                assert!(!help.is_empty() && helps.insert(name.to_owned()), "{line}");
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE without type");
                assert!(helps.contains(name), "TYPE before HELP: {line}");
                assert!(
                    ["counter", "gauge", "histogram"].contains(&kind),
                    "type: {line}"
                );
                assert!(
                    types.insert(name.to_owned(), kind.to_owned()).is_none(),
                    "TYPE twice: {line}"
                );
                continue;
            }
            assert!(!line.starts_with('#'), "unexpected comment: {line}");
            let (series, value) = line.rsplit_once(' ').expect("sample without value");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("value: {line}")),
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.strip_suffix('}').expect("unclosed labels")),
                None => (series, ""),
            };
            assert!(
                !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "name: {line}"
            );
            for label in labels.split(',').filter(|l| !l.is_empty()) {
                let (key, quoted) = label.split_once('=').expect("label without =");
                assert!(
                    key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "label name: {line}"
                );
                assert!(
                    quoted.len() >= 2 && quoted.starts_with('"') && quoted.ends_with('"'),
                    "label value: {line}"
                );
            }
            let family = [name, "_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    let base = if *suffix == name {
                        name
                    } else {
                        name.strip_suffix(suffix)?
                    };
                    let kind = types.get(base)?;
                    (*suffix == name || kind == "histogram").then_some(base)
                })
                .unwrap_or_else(|| panic!("sample of an undeclared family: {line}"));
            assert!(types.contains_key(family));
            assert!(
                seen.insert((name.to_owned(), labels.to_owned())),
                "sample twice: {line}"
            );
            samples.push((name.to_owned(), labels.to_owned(), value));
        }
        let declared: BTreeSet<(&str, &str)> = types
            .iter()
            .map(|(n, t)| (n.as_str(), t.as_str()))
            .collect();
        assert_eq!(declared, FAMILIES.into_iter().collect(), "families");
        samples
    }

    #[test]
    fn every_family_is_declared_before_the_first_update() {
        let metrics = Metrics::new();
        let text = metrics.encode();
        assert!(
            parse_strict(&text).is_empty(),
            "samples before any update:\n{text}"
        );
    }

    #[test]
    fn counters_are_the_data_planes_totals() {
        let metrics = Metrics::new();
        metrics.update_from(&snapshot(1), &vips(), 17);
        let text = metrics.encode();
        assert_lines(
            &text,
            &[
                "# TYPE lb_vip_packets_total counter",
                r#"lb_vip_packets_total{vip="web"} 50"#,
                r#"lb_vip_packets_total{vip="v6"} 3"#,
                r#"lb_vip_bytes_total{vip="web"} 5000"#,
                r#"lb_vip_bytes_total{vip="v6"} 300"#,
                r#"lb_backend_packets_total{vip="web",backend="10.0.0.11"} 42"#,
                r#"lb_backend_packets_total{vip="web",backend="10.0.0.12"} 8"#,
                r#"lb_backend_packets_total{vip="web",backend="10.0.0.13"} 0"#,
                r#"lb_backend_packets_total{vip="v6",backend="2001:db8::11"} 0"#,
                r#"lb_backend_bytes_total{vip="web",backend="10.0.0.11"} 4200"#,
                r#"lb_backend_new_flows_total{vip="web",backend="10.0.0.11"} 7"#,
                r#"lb_backend_new_flows_total{vip="web",backend="10.0.0.12"} 2"#,
                "# TYPE lb_backend_up gauge",
                r#"lb_backend_up{vip="web",backend="10.0.0.11"} 1"#,
                r#"lb_backend_up{vip="web",backend="10.0.0.12"} 0"#,
                r#"lb_backend_up{vip="web",backend="10.0.0.13"} 1"#,
                r#"lb_backend_up{vip="v6",backend="2001:db8::11"} 0"#,
                r#"lb_vip_active_pool{vip="web",pool="primary"} 1"#,
                r#"lb_vip_active_pool{vip="web",pool="standby"} 0"#,
                r#"lb_vip_active_pool{vip="web",pool="none"} 0"#,
                r#"lb_vip_active_pool{vip="v6",pool="primary"} 0"#,
                r#"lb_vip_active_pool{vip="v6",pool="standby"} 0"#,
                r#"lb_vip_active_pool{vip="v6",pool="none"} 1"#,
                "# TYPE lb_xdp_verdicts_total counter",
                r#"lb_xdp_verdicts_total{reason="tx"} 50"#,
                r#"lb_xdp_verdicts_total{reason="pass_not_vip"} 12"#,
                r#"lb_xdp_verdicts_total{reason="drop_no_backend"} 3"#,
                r#"lb_xdp_verdicts_total{reason="pass_all_down"} 0"#,
                "# TYPE lb_flow_table_entries gauge",
                "lb_flow_table_entries 17",
            ],
        );
        let samples = parse_strict(&text);
        // Every reason is there, zeros included.
        for reason in Reason::ALL {
            let labels = format!("reason=\"{}\"", reason.name());
            assert!(
                samples
                    .iter()
                    .any(|(n, l, _)| n == "lb_xdp_verdicts_total" && *l == labels),
                "no sample for {labels}"
            );
        }
        // 2 VIPs x 2 families + 4 backends x (3 counters + up) + 2 VIPs x 3 pools + reasons + 1.
        assert_eq!(samples.len(), 4 + 16 + 6 + Reason::ALL.len() + 1, "{text}");
    }

    #[test]
    fn flow_tables_are_two_gauges_per_vip() {
        let metrics = Metrics::new();
        metrics.set_flow_tables(vec![("web".into(), 120, 7), ("v6".into(), 0, 0)]);
        assert_lines(
            &metrics.encode(),
            &[
                "# TYPE lb_vip_ring_slots_changed gauge",
                r#"lb_vip_ring_slots_changed{vip="web"} 120"#,
                r#"lb_vip_ring_slots_changed{vip="v6"} 0"#,
                "# TYPE lb_vip_flow_table_entries gauge",
                r#"lb_vip_flow_table_entries{vip="web"} 7"#,
                r#"lb_vip_flow_table_entries{vip="v6"} 0"#,
            ],
        );
    }

    #[test]
    fn announcements_are_a_gauge_per_vip() {
        let metrics = Metrics::new();
        let mut vips = vips();
        for vip in &mut vips {
            for backend in &mut vip.backends {
                backend.path = Some(crate::balancer::L2Path {
                    dst_mac: [2, 0, 0, 0, 0, 11],
                    src_mac: [2, 0, 0, 0, 0, 2],
                    ifindex: 2,
                    redirect: false,
                    tunnel: None,
                });
            }
            vip.active_pool = vip.select_pool();
        }
        metrics.set_announcements(&crate::announce::decide_vips(&vips, true));
        let text = metrics.encode();
        assert_lines(
            &text,
            &[
                "# TYPE lb_vip_announced gauge",
                r#"lb_vip_announced{vip="web"} 1"#,
                r#"lb_vip_announced{vip="v6"} 0"#,
            ],
        );
        // Before the first health results nothing is announced.
        metrics.set_announcements(&crate::announce::decide_vips(&vips, false));
        assert_lines(&metrics.encode(), &[r#"lb_vip_announced{vip="web"} 0"#]);
    }

    #[test]
    fn a_second_update_prints_the_new_totals() {
        let metrics = Metrics::new();
        metrics.update_from(&snapshot(1), &vips(), 17);
        let mut vips = vips();
        vips[0].backends[1].health = Health::Up;
        vips[0].active_pool = ActivePool::Standby;
        metrics.update_from(&snapshot(1000), &vips, 12345);
        let text = metrics.encode();
        assert_lines(
            &text,
            &[
                r#"lb_vip_packets_total{vip="web"} 50000"#,
                r#"lb_backend_packets_total{vip="web",backend="10.0.0.11"} 42000"#,
                r#"lb_backend_bytes_total{vip="web",backend="10.0.0.11"} 4200000"#,
                r#"lb_backend_new_flows_total{vip="web",backend="10.0.0.11"} 7000"#,
                r#"lb_backend_up{vip="web",backend="10.0.0.12"} 1"#,
                r#"lb_vip_active_pool{vip="web",pool="primary"} 0"#,
                r#"lb_vip_active_pool{vip="web",pool="standby"} 1"#,
                r#"lb_xdp_verdicts_total{reason="tx"} 50000"#,
                "lb_flow_table_entries 12345",
            ],
        );
        assert!(
            !text.contains("} 42\n"),
            "the old total is still printed:\n{text}"
        );
        parse_strict(&text);

        // Totals far beyond 2^53 print exactly.
        let mut huge = snapshot(1);
        huge.vips[0].backends[0].counters.bytes = u64::MAX - 1;
        metrics.update_from(&huge, &vips, 0);
        assert_lines(
            &metrics.encode(),
            &[
                r#"lb_backend_bytes_total{vip="web",backend="10.0.0.11"} 18446744073709551614"#,
                "lb_flow_table_entries 0",
            ],
        );
    }

    #[test]
    fn check_latencies_are_a_histogram() {
        let metrics = Metrics::new();
        metrics.observe_check("web", "10.0.0.11", Duration::from_micros(50));
        metrics.observe_check("web", "10.0.0.11", Duration::from_millis(250));
        metrics.observe_check("web", "10.0.0.11", Duration::from_millis(1500));
        metrics.observe_check("web", "10.0.0.11", Duration::from_secs(7));
        metrics.observe_check("v6", "2001:db8::11", Duration::from_micros(300));
        let text = metrics.encode();
        let web = r#"vip="web",backend="10.0.0.11""#;
        let expected: Vec<String> = [
            ("0.0001", 1),
            ("0.00025", 1),
            ("0.001", 1),
            ("0.1", 1),
            ("0.25", 2),
            ("0.5", 2),
            ("1", 2),
            ("2.5", 3),
            ("5", 3),
            ("+Inf", 4),
        ]
        .iter()
        .map(|(le, n)| format!("lb_health_check_duration_seconds_bucket{{{web},le=\"{le}\"}} {n}"))
        .chain([
            format!("lb_health_check_duration_seconds_sum{{{web}}} 8.75005"),
            format!("lb_health_check_duration_seconds_count{{{web}}} 4"),
            r#"lb_health_check_duration_seconds_bucket{vip="v6",backend="2001:db8::11",le="0.00025"} 0"#.into(),
            r#"lb_health_check_duration_seconds_bucket{vip="v6",backend="2001:db8::11",le="0.0005"} 1"#.into(),
            r#"lb_health_check_duration_seconds_count{vip="v6",backend="2001:db8::11"} 1"#.into(),
        ])
        .collect();
        let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
        assert_lines(&text, &expected);
        let buckets = text
            .lines()
            .filter(|l| l.starts_with("lb_health_check_duration_seconds_bucket{vip=\"web\""))
            .count();
        assert_eq!(buckets, CHECK_DURATION_BUCKETS.len() + 1, "{text}");
        parse_strict(&text);
    }

    #[test]
    fn removed_backends_and_vips_disappear() {
        let metrics = Metrics::new();
        metrics.observe_check("web", "10.0.0.12", Duration::from_millis(1));
        metrics.observe_check("v6", "2001:db8::11", Duration::from_millis(1));
        metrics.update_from(&snapshot(1), &vips(), 17);
        assert!(metrics.encode().contains(r#"backend="10.0.0.12""#));

        // A reload removed 10.0.0.12 from web, and the VIP v6.
        let mut vips = vips();
        vips[0].backends.remove(1);
        vips.truncate(1);
        let mut snapshot = snapshot(2);
        snapshot.vips[0].backends.remove(1);
        snapshot.vips.truncate(1);
        metrics.update_from(&snapshot, &vips, 17);
        let text = metrics.encode();
        assert!(!text.contains("10.0.0.12"), "{text}");
        assert!(!text.contains("v6"), "{text}");
        assert_lines(
            &text,
            &[
                r#"lb_backend_packets_total{vip="web",backend="10.0.0.11"} 84"#,
                r#"lb_backend_up{vip="web",backend="10.0.0.13"} 1"#,
            ],
        );
        parse_strict(&text);
    }

    #[test]
    fn the_exposition_parses_as_prometheus_text() {
        let metrics = Metrics::new();
        metrics.observe_check("web", "10.0.0.11", Duration::from_millis(3));
        metrics.update_from(&snapshot(3), &vips(), 99);
        let text = metrics.encode();
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parse");
        let value = |metric: &str, labels: &[(&str, &str)]| {
            scrape
                .samples
                .iter()
                .find(|s| {
                    s.metric == metric
                        && s.labels.len() == labels.len()
                        && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
                })
                .unwrap_or_else(|| panic!("no {metric} {labels:?} in:\n{text}"))
                .value
                .clone()
        };
        use prometheus_parse::Value;
        assert_eq!(
            value(
                "lb_backend_packets_total",
                &[("vip", "web"), ("backend", "10.0.0.11")]
            ),
            Value::Counter(126.0)
        );
        assert_eq!(
            value("lb_xdp_verdicts_total", &[("reason", "tx")]),
            Value::Counter(150.0)
        );
        assert_eq!(
            value(
                "lb_backend_up",
                &[("vip", "v6"), ("backend", "2001:db8::11")]
            ),
            Value::Gauge(0.0)
        );
        assert_eq!(value("lb_flow_table_entries", &[]), Value::Gauge(99.0));
        match value(
            "lb_health_check_duration_seconds",
            &[("vip", "web"), ("backend", "10.0.0.11")],
        ) {
            Value::Histogram(buckets) => {
                assert_eq!(buckets.len(), CHECK_DURATION_BUCKETS.len() + 1);
                assert_eq!(buckets.last().unwrap().count, 1.0);
            }
            other => panic!("not a histogram: {other:?}"),
        }
        // Every sample line became a sample (a histogram's bucket lines one sample together, its
        // `_sum` and `_count` one each): nothing was skipped as unparsable.
        let lines = text.lines().filter(|l| !l.starts_with('#')).count();
        let bucket_lines = text.lines().filter(|l| l.contains("_bucket{")).count();
        let histograms = scrape
            .samples
            .iter()
            .filter(|s| matches!(s.value, Value::Histogram(_)))
            .count();
        assert_eq!(histograms, 1);
        assert_eq!(scrape.samples.len(), lines - bucket_lines + histograms);
    }

    /// Sends one HTTP/1.1 request and reads the whole answer; returns status, headers, body.
    async fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(
                format!("{method} {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .expect("send");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("read");
        let (head, body) = answer.split_once("\r\n\r\n").expect("no end of headers");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line: {head}"));
        (status, head.to_ascii_lowercase(), body.to_owned())
    }

    #[tokio::test]
    async fn serves_get_metrics_and_404_elsewhere() {
        let metrics = Arc::new(Metrics::new());
        metrics.update_from(&snapshot(1), &vips(), 17);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_on(listener, Arc::clone(&metrics), stopped));

        let (status, head, body) = request(addr, "GET", "/metrics").await;
        assert_eq!(status, 200, "{head}");
        assert!(
            head.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{head}"
        );
        assert_eq!(body, metrics.encode());
        assert_lines(
            &body,
            &[r#"lb_backend_packets_total{vip="web",backend="10.0.0.11"} 42"#],
        );
        parse_strict(&body);

        // A scrape sees the latest update.
        metrics.update_from(&snapshot(2), &vips(), 17);
        let (status, _, body) = request(addr, "GET", "/metrics?x=1").await;
        assert_eq!(status, 200);
        assert_lines(
            &body,
            &[r#"lb_backend_packets_total{vip="web",backend="10.0.0.11"} 84"#],
        );

        let (status, head, body) = request(addr, "HEAD", "/metrics").await;
        assert_eq!(status, 200, "{head}");
        assert!(body.is_empty(), "HEAD with a body: {body}");

        for path in ["/other", "/", "/metrics/", "/metricsx"] {
            let (status, head, _) = request(addr, "GET", path).await;
            assert_eq!(status, 404, "{path}: {head}");
        }
        let (status, head, _) = request(addr, "POST", "/metrics").await;
        assert_eq!(status, 405, "{head}");
        assert!(head.contains("allow: get, head"), "{head}");

        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server did not stop")
            .unwrap();
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "still listening after shutdown"
        );
    }

    #[tokio::test]
    async fn shutdown_closes_idle_keep_alive_connections() {
        let metrics = Arc::new(Metrics::new());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_on(listener, metrics, stopped));
        // A keep-alive connection that stays open after its answer, as Prometheus keeps one.
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: lb\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("an idle connection kept the server running")
            .unwrap();
    }

    #[tokio::test]
    async fn serve_binds_its_address() {
        // Taken: serve reports the bind error.
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let error = serve(addr, Arc::new(Metrics::new()), std::future::pending::<()>())
            .await
            .expect_err("bound an address in use");
        assert_eq!(error.kind(), io::ErrorKind::AddrInUse);
        drop(taken);

        // Free again: serve answers there until shutdown.
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(addr, Arc::new(Metrics::new()), stopped));
        let mut status = 0;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                status = request(addr, "GET", "/metrics").await.0;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(status, 200);
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server did not stop")
            .unwrap()
            .unwrap();
    }
}
