//! The `lb_sync_*` families: flow-state replication (`[sync]`), from the status the sync
//! service keeps. Without `[sync]` they are printed without samples.

use std::collections::BTreeMap;
use std::fmt;

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::Family;
use crate::api::model::SyncStatus;

fn by_reason<'a>(
    name: &'static str,
    help: &'static str,
    map: Option<&'a BTreeMap<String, u64>>,
) -> Family<[(&'static str, &'a str); 1], ConstCounter> {
    Family {
        name,
        help,
        metric_type: MetricType::Counter,
        samples: map
            .into_iter()
            .flatten()
            .map(|(reason, count)| ([("reason", reason.as_str())], ConstCounter::new(*count)))
            .collect(),
    }
}

pub(super) fn encode(status: Option<&SyncStatus>, encoder: &mut DescriptorEncoder) -> fmt::Result {
    let peers = status.map_or(&[][..], |s| &s.peers[..]);
    let per_peer = |name, help, value: fn(&crate::api::model::PeerStatus) -> u64| Family {
        name,
        help,
        metric_type: MetricType::Counter,
        samples: peers
            .iter()
            .map(|p| ([("peer", p.address.as_str())], ConstCounter::new(value(p))))
            .collect::<Vec<_>>(),
    };
    per_peer(
        "lb_sync_flows_sent",
        "Flow records sent to the peer (new flows, refreshes and full copies).",
        |p| p.flows_sent,
    )
    .encode(encoder)?;
    per_peer(
        "lb_sync_flows_received",
        "Flow records received from the peer in authenticated datagrams.",
        |p| p.flows_received,
    )
    .encode(encoder)?;
    Family {
        name: "lb_sync_peer_up",
        help: "1 while the peer was heard from within the last 3 seconds, else 0.",
        metric_type: MetricType::Gauge,
        samples: peers
            .iter()
            .map(|p| {
                (
                    [("peer", p.address.as_str())],
                    ConstGauge::new(i64::from(p.up)),
                )
            })
            .collect(),
    }
    .encode(encoder)?;
    by_reason(
        "lb_sync_drops",
        "Datagrams dropped (truncated, malformed, unauthenticated, replayed, stale, \
         unknown_peer) and records a full peer queue dropped (queue_full).",
        status.map(|s| &s.drops),
    )
    .encode(encoder)?;
    by_reason(
        "lb_sync_flows_skipped",
        "Received flows not installed: unknown_vip, unknown_backend, local_newer.",
        status.map(|s| &s.flows_skipped),
    )
    .encode(encoder)?;
    let single = |name, help, value: Option<u64>| Family {
        name,
        help,
        metric_type: MetricType::Counter,
        samples: value
            .map(|v| ([("", ""); 0], ConstCounter::new(v)))
            .into_iter()
            .collect::<Vec<_>>(),
    };
    single(
        "lb_sync_flows_installed",
        "Received flows written into this node's flow table.",
        status.map(|s| s.flows_installed),
    )
    .encode(encoder)?;
    single(
        "lb_sync_events_lost",
        "Flow inserts the data plane could not report to the daemon (its event ring was full).",
        status.map(|s| s.events_lost),
    )
    .encode(encoder)?;
    Ok(())
}
