//! The counters of one node that the sync bench compares before and after a phase, from its
//! `lb status --json` (each node of the bench has exactly one peer, so the per-peer and the
//! node-wide sync counters are the same traffic).

use anyhow::{Context, Result};
use serde_json::Value;

use crate::ecmp::{sync_status, vip_flows};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeCounters {
    /// New flows the node's data plane counted for the bench's VIP.
    pub vip_flows: u64,
    pub flows_sent: u64,
    pub flows_received: u64,
    pub flows_installed: u64,
    /// Received but not installed (any reason).
    pub flows_skipped: u64,
    /// Flow inserts the data plane could not report (its event ring was full).
    pub events_lost: u64,
    /// Records dropped by a full queue (to the peer, or to the daemon's loop).
    pub queue_full: u64,
    /// Datagrams dropped for any other reason.
    pub other_drops: u64,
    pub datagrams_sent: u64,
    pub datagrams_received: u64,
    /// UDP payload bytes (heartbeats included).
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Records waiting to be sent.
    pub queued: u64,
}

fn count(value: &Value, key: &str) -> Result<u64> {
    value[key]
        .as_u64()
        .with_context(|| format!("no counter {key} in {value}"))
}

fn sum(value: &Value, key: &str) -> Result<u64> {
    let map = value[key]
        .as_object()
        .with_context(|| format!("no object {key} in {value}"))?;
    Ok(map.values().filter_map(Value::as_u64).sum())
}

impl NodeCounters {
    /// From `status` (an `lb status --json` answer), for VIP `vip`.
    pub fn of(status: &Value, vip: &str) -> Result<Self> {
        let sync = sync_status(status)?;
        let peers = sync["peers"]
            .as_array()
            .context("sync has no peers array")?;
        let peer_sum =
            |key: &str| -> Result<u64> { peers.iter().map(|p| count(p, key)).sum::<Result<u64>>() };
        let queue_full = sync["drops"]["queue_full"].as_u64().unwrap_or(0);
        Ok(Self {
            vip_flows: vip_flows(status, vip)?,
            flows_sent: count(sync, "flows_sent")?,
            flows_received: count(sync, "flows_received")?,
            flows_installed: count(sync, "flows_installed")?,
            flows_skipped: sum(sync, "flows_skipped")?,
            events_lost: count(sync, "events_lost")?,
            queue_full,
            other_drops: sum(sync, "drops")? - queue_full,
            datagrams_sent: peer_sum("datagrams_sent")?,
            datagrams_received: peer_sum("datagrams_received")?,
            bytes_sent: peer_sum("bytes_sent")?,
            bytes_received: peer_sum("bytes_received")?,
            queued: peer_sum("queued")?,
        })
    }

    /// What changed since `before` (`queued` is the current value).
    pub fn since(&self, before: &Self) -> Self {
        Self {
            vip_flows: self.vip_flows.saturating_sub(before.vip_flows),
            flows_sent: self.flows_sent.saturating_sub(before.flows_sent),
            flows_received: self.flows_received.saturating_sub(before.flows_received),
            flows_installed: self.flows_installed.saturating_sub(before.flows_installed),
            flows_skipped: self.flows_skipped.saturating_sub(before.flows_skipped),
            events_lost: self.events_lost.saturating_sub(before.events_lost),
            queue_full: self.queue_full.saturating_sub(before.queue_full),
            other_drops: self.other_drops.saturating_sub(before.other_drops),
            datagrams_sent: self.datagrams_sent.saturating_sub(before.datagrams_sent),
            datagrams_received: self
                .datagrams_received
                .saturating_sub(before.datagrams_received),
            bytes_sent: self.bytes_sent.saturating_sub(before.bytes_sent),
            bytes_received: self.bytes_received.saturating_sub(before.bytes_received),
            queued: self.queued,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_a_status_and_subtracts() {
        let status = |flows: u64, sent: u64| {
            json!({
                "vips": [{ "name": "u", "flows": flows }],
                "sync": {
                    "flows_sent": sent, "flows_received": 1, "flows_installed": 1,
                    "flows_skipped": { "local_newer": 2 }, "events_lost": 0,
                    "drops": { "queue_full": 3, "stale": 1 },
                    "peers": [{ "datagrams_sent": 4, "datagrams_received": 5,
                                "bytes_sent": 600, "bytes_received": 700, "queued": 0 }]
                }
            })
        };
        let before = NodeCounters::of(&status(10, 20), "u").expect("parses");
        assert_eq!(before.queue_full, 3);
        assert_eq!(before.other_drops, 1);
        assert_eq!(before.flows_skipped, 2);
        let after = NodeCounters::of(&status(110, 70), "u").expect("parses");
        let delta = after.since(&before);
        assert_eq!(
            (delta.vip_flows, delta.flows_sent, delta.bytes_sent),
            (100, 50, 0)
        );
        assert!(NodeCounters::of(&json!({ "vips": [] }), "u").is_err());
    }
}
