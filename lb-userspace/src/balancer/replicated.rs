//! Flows other lb nodes recorded (see [`crate::sync`]): the records this node sends (its own
//! flow table, by address), and the installation of its peers' records into its flow table.
//!
//! A peer's record names its VIP, client and backend by address, since ids are node-local.
//! It is installed when this node has that VIP and, in it, a backend at that address, unless
//! this node's own entry for the flow was seen more recently. A TCP flow that lands in a slot
//! this node keeps unchanged, on a backend other than the slot's owner, marks the slot changed
//! with its owner as prior: the data plane then consults the flow table there (finding the
//! replicated flow), while unrecorded packets still go where they went (the owner). The sweep
//! returns the slot to unchanged once the flow is idle, as for local flows.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};

use aya::maps::{IterableMap, MapError};
use lb_common::{
    FAMILY_V4, FAMILY_V6, FLOW_REFRESH_NS, FlowKey, FlowState, PROTO_TCP, RingSlot, flow_hash,
};

use super::{Balancer, PublishError, family, publish::record_address};
use crate::config::Protocol;
use crate::dataplane::flows::{read_flows, write_flows};
use crate::sync::wire::FlowRecord;

/// Why a replicated flow was not installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// This node has no VIP at that address, port and protocol.
    UnknownVip,
    /// The VIP has no backend at that address here.
    UnknownBackend,
    /// This node saw the flow more recently than the peer did (or as recently, on the same
    /// backend: within the data plane's one-second refresh of a flow's last-seen time).
    LocalNewer,
}

impl SkipReason {
    pub const ALL: [SkipReason; 3] = [
        SkipReason::UnknownVip,
        SkipReason::UnknownBackend,
        SkipReason::LocalNewer,
    ];

    /// The label in `lb status` and the metrics.
    pub fn label(self) -> &'static str {
        match self {
            SkipReason::UnknownVip => "unknown_vip",
            SkipReason::UnknownBackend => "unknown_backend",
            SkipReason::LocalNewer => "local_newer",
        }
    }
}

/// What one installation did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstallReport {
    pub installed: usize,
    /// Per [`SkipReason::ALL`] entry.
    pub skipped: [usize; 3],
    /// Slots this node kept unchanged that now consult the flow table.
    pub slots_marked: usize,
}

impl InstallReport {
    fn skip(&mut self, reason: SkipReason) {
        let index = SkipReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or_default();
        self.skipped[index] += 1;
    }
}

/// The data plane's key for a flow from `client` to `vip`; `None` when the families differ.
pub fn flow_key(vip: SocketAddr, proto: u8, client: SocketAddr) -> Option<FlowKey> {
    if vip.is_ipv4() != client.is_ipv4() {
        return None;
    }
    Some(FlowKey {
        src: record_address(client.ip()),
        dst: record_address(vip.ip()),
        sport_be: client.port().to_be(),
        dport_be: vip.port().to_be(),
        proto,
        family: family(vip.ip()),
        _pad: [0; 2],
    })
}

/// The client of a flow key (`None` for an unknown family).
fn client_of(key: &FlowKey) -> Option<SocketAddr> {
    let port = u16::from_be(key.sport_be);
    match key.family {
        FAMILY_V4 => {
            let [a, b, c, d, ..] = key.src;
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(a, b, c, d)), port))
        }
        FAMILY_V6 => Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(key.src)), port)),
        _ => None,
    }
}

fn protocol_number(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => lb_common::PROTO_TCP,
        Protocol::Udp => lb_common::PROTO_UDP,
    }
}

impl Balancer {
    /// This node's flow table as records for a peer (a full copy), ages as of kernel-clock
    /// `now_ns`; with `since_ns`, only flows seen after it (the periodic refresh). Entries of
    /// VIPs or backends this node no longer has are left out.
    pub fn flow_records(
        &self,
        now_ns: u64,
        since_ns: Option<u64>,
    ) -> Result<Vec<FlowRecord>, PublishError> {
        let entries = read_flows(&self.dataplane.maps.flows)?;
        Ok(entries
            .iter()
            .filter(|(_, state)| since_ns.is_none_or(|since| state.last_seen_ns > since))
            .filter_map(|(key, state)| self.record_of(key, state, now_ns))
            .collect())
    }

    /// One flow-table entry by address.
    pub fn record_of(&self, key: &FlowKey, state: &FlowState, now_ns: u64) -> Option<FlowRecord> {
        let (v, b) = self.locate(state.backend)?;
        let vip = &self.vips[v];
        if vip.id != state.vip_id || key.dport_be != vip.port.to_be() {
            return None;
        }
        let age_ns = now_ns.saturating_sub(state.last_seen_ns);
        Some(FlowRecord {
            vip: SocketAddr::new(vip.address, vip.port),
            proto: key.proto,
            client: client_of(key)?,
            backend: vip.backends[b].address,
            age_ms: u32::try_from(age_ns / 1_000_000).unwrap_or(u32::MAX),
        })
    }

    /// Installs a peer's `records` at kernel-clock time `now_ns` (see the module docs).
    pub fn install_replicated(
        &mut self,
        records: &[FlowRecord],
        now_ns: u64,
    ) -> Result<InstallReport, PublishError> {
        let mut report = InstallReport::default();
        let mut keys = Vec::with_capacity(records.len());
        let mut states = Vec::with_capacity(records.len());
        // (VIP id, slot, backend id) of TCP flows, for the slots they may need changed.
        let mut tcp_slots = Vec::new();
        let ring_size = self.dataplane.maps.rings.ring_size();
        for record in records {
            let Some(vip) = self.vips.iter().find(|v| {
                v.address == record.vip.ip()
                    && v.port == record.vip.port()
                    && protocol_number(v.protocol) == record.proto
            }) else {
                report.skip(SkipReason::UnknownVip);
                continue;
            };
            let Some(key) = flow_key(record.vip, record.proto, record.client) else {
                report.skip(SkipReason::UnknownVip);
                continue;
            };
            let Some(backend) = vip.backends.iter().find(|b| b.address == record.backend) else {
                report.skip(SkipReason::UnknownBackend);
                continue;
            };
            let last_seen_ns = now_ns.saturating_sub(u64::from(record.age_ms) * 1_000_000);
            match self.dataplane.maps.flows.get(&key, 0) {
                // The same backend seen within the data plane's refresh granularity is the same
                // news (a copy relayed by another peer, its age rounded down on the way).
                Ok(local)
                    if local.last_seen_ns >= last_seen_ns
                        || (local.backend == backend.id
                            && local.last_seen_ns + FLOW_REFRESH_NS >= last_seen_ns) =>
                {
                    report.skip(SkipReason::LocalNewer);
                    continue;
                }
                Ok(_) | Err(MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(PublishError::Map {
                        what: "FLOWS",
                        source,
                    });
                }
            }
            if key.proto == PROTO_TCP {
                tcp_slots.push((vip.id, flow_hash(&key) % ring_size, backend.id));
            }
            keys.push(key);
            states.push(FlowState {
                backend: backend.id,
                vip_id: vip.id,
                last_seen_ns,
            });
        }
        let fd = IterableMap::map(&self.dataplane.maps.flows)
            .fd()
            .as_fd()
            .as_raw_fd();
        // The flows first, then the slots: a slot that consults the table before its flow is
        // there would send the connection's next packet to the prior owner and record it there.
        write_flows(fd, &keys, &states)?;
        report.installed = keys.len();
        for (vip_id, slot, backend) in tcp_slots {
            // Not `tracks_priors`: a node starting from nothing keeps no priors of its own
            // until it is attached, yet the flows it pulled then must be found.
            let Some(history) = self.slots.get_mut(&vip_id) else {
                continue;
            };
            let Some(&live) = history.live.get(slot as usize) else {
                continue;
            };
            if live.is_changed() || live.owner == backend {
                continue;
            }
            let marked = RingSlot {
                owner: live.owner,
                prior: live.owner,
            };
            history.set_live(slot as usize, marked);
            history.changed_at[slot as usize] = now_ns;
            self.dataplane
                .maps
                .rings
                .write_slot(history.live_table, slot, marked)?;
            report.slots_marked += 1;
        }
        Ok(report)
    }
}
