//! The sync service's counters, shared with the daemon's loop for `lb status` and the metrics
//! (the service writes them, the loop only reads a copy).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

use super::wire::DropReason;
use crate::api::model::{PeerStatus, SyncStatus};
use crate::balancer::SkipReason;

/// Per [`DropReason::ALL`] entry.
pub type DropCounts = [u64; DropReason::ALL.len()];

pub fn drop_index(reason: DropReason) -> usize {
    DropReason::ALL
        .iter()
        .position(|r| *r == reason)
        .unwrap_or_default()
}

fn by_label(counts: &DropCounts) -> BTreeMap<String, u64> {
    DropReason::ALL
        .iter()
        .zip(counts)
        .map(|(reason, &count)| (reason.label().to_owned(), count))
        .collect()
}

/// One peer as the service sees it.
#[derive(Clone, Debug)]
pub struct PeerCounters {
    pub address: SocketAddr,
    /// Heard from within [`super::service::PEER_TIMEOUT`].
    pub up: bool,
    pub last_heard: Option<Instant>,
    pub flows_sent: u64,
    pub flows_received: u64,
    pub datagrams_sent: u64,
    pub datagrams_received: u64,
    /// UDP payload bytes of the datagrams sent to it and received from it (authenticated).
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Datagrams from this peer's address that were dropped, and records for it that its full
    /// queue dropped (`queue_full`).
    pub drops: DropCounts,
    /// Records waiting to be sent to it.
    pub queued: usize,
}

impl PeerCounters {
    pub fn new(address: SocketAddr) -> Self {
        Self {
            address,
            up: false,
            last_heard: None,
            flows_sent: 0,
            flows_received: 0,
            datagrams_sent: 0,
            datagrams_received: 0,
            bytes_sent: 0,
            bytes_received: 0,
            drops: [0; DropReason::ALL.len()],
            queued: 0,
        }
    }
}

/// Everything the service counts.
#[derive(Clone, Debug)]
pub struct ServiceCounters {
    pub listen: SocketAddr,
    pub peers: Vec<PeerCounters>,
    /// Datagrams dropped that came from no configured peer's address.
    pub unattributed_drops: DropCounts,
    /// The start-up pull is over (every peer answered, or was silent until the timeout).
    pub pulled: bool,
    /// Flows the start-up pull received.
    pub pulled_flows: u64,
    /// Data-plane events whose ids this node's model did not know (a reload raced them).
    pub unnamed_events: u64,
}

impl ServiceCounters {
    /// Counters of a service that pulls at start (`pulling`) or not (a reload's restart).
    pub fn new(listen: SocketAddr, peers: &[SocketAddr], pulling: bool) -> Self {
        Self {
            listen,
            peers: peers.iter().copied().map(PeerCounters::new).collect(),
            unattributed_drops: [0; DropReason::ALL.len()],
            pulled: !pulling,
            pulled_flows: 0,
            unnamed_events: 0,
        }
    }
}

/// What the daemon's loop counts: what became of the flows the service handed it.
#[derive(Clone, Debug, Default)]
pub struct InstallCounters {
    pub installed: u64,
    /// Per [`SkipReason::ALL`] entry.
    pub skipped: [u64; SkipReason::ALL.len()],
    /// Flows the loop had no room for (the service's hand-over queue was full).
    pub backlog_dropped: u64,
}

/// The `sync` object of `lb status`.
pub fn status(
    service: &ServiceCounters,
    installs: &InstallCounters,
    events_lost: u64,
    now: Instant,
) -> SyncStatus {
    let mut drops = service.unattributed_drops;
    for peer in &service.peers {
        for (total, count) in drops.iter_mut().zip(peer.drops) {
            *total += count;
        }
    }
    SyncStatus {
        listen: service.listen.to_string(),
        pulled: service.pulled,
        pulled_flows: service.pulled_flows,
        flows_sent: service.peers.iter().map(|p| p.flows_sent).sum(),
        flows_received: service.peers.iter().map(|p| p.flows_received).sum(),
        flows_installed: installs.installed,
        flows_skipped: SkipReason::ALL
            .iter()
            .zip(installs.skipped)
            .map(|(reason, count)| (reason.label().to_owned(), count))
            .collect(),
        drops: by_label(&drops),
        events_lost,
        peers: service
            .peers
            .iter()
            .map(|peer| PeerStatus {
                address: peer.address.to_string(),
                up: peer.up,
                last_heard_ms: peer
                    .last_heard
                    .map(|at| now.saturating_duration_since(at).as_millis() as u64),
                flows_sent: peer.flows_sent,
                flows_received: peer.flows_received,
                datagrams_sent: peer.datagrams_sent,
                datagrams_received: peer.datagrams_received,
                bytes_sent: peer.bytes_sent,
                bytes_received: peer.bytes_received,
                queued: peer.queued as u64,
                drops: by_label(&peer.drops),
            })
            .collect(),
    }
}
