//! Taking over the state a previous daemon left in pinned maps, so a restart moves no flow.
//!
//! The maps are the record of what was running: each VIP record carries its id and live ring,
//! each backend record its VIP's id, address, L2 path, whether it was up and the operator's
//! override. A VIP of the config found in `VIPS` keeps its id and live ring; a backend found in
//! `BACKENDS` (same VIP id, same address) keeps its id, health (up, or not yet known), path and
//! override, so the first publish computes exactly the table that was live. Records of VIPs and
//! backends the config no longer has are removed; the rest of the config is added by
//! [`Balancer::reconcile`] as on a reload.

use lb_common::{
    BACKEND_F_ADDR_V6, BACKEND_F_HELD, BACKEND_F_REDIRECT, BACKEND_F_UP, Backend, VipInfo, VipKey,
};
use tracing::warn;

use super::{
    BackendState, Balancer, L2Path, ReconcileError, TunnelEnd, VipState,
    publish::{admin_from_flags, record_address},
    slots::SlotHistory,
    vip_key,
};
use crate::dataplane::flows::kernel_now_ns;
use crate::{
    config::{Config, Forward},
    health::Health,
    pool::ActivePool,
};

/// What [`Balancer::adopt`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Adopted {
    pub vips: usize,
    pub backends: usize,
    /// Of `backends`, those that were up.
    pub up: usize,
    /// VIP records of VIPs the config no longer has (removed).
    pub stale_vips: usize,
    /// Backend records of backends the config no longer has (cleared).
    pub stale_backends: usize,
}

impl Balancer {
    /// Adopts what the pinned maps hold for `config` (see the module docs). Must be called on an
    /// [`Balancer::empty`] model, before [`Balancer::reconcile`].
    pub fn adopt(&mut self, config: &Config) -> Result<Adopted, ReconcileError> {
        debug_assert!(self.vips.is_empty(), "adopt starts from an empty model");
        let maps = &self.dataplane.maps;
        let pinned_vips: Vec<(VipKey, VipInfo)> = maps.vips.iter().filter_map(Result::ok).collect();
        let zero: Backend = bytemuck::Zeroable::zeroed();
        let mut records: Vec<(u32, Backend)> = (0..self.dataplane.capacity.max_backends)
            .filter_map(|id| maps.backends.get(&id, 0).ok().map(|r| (id, r)))
            .filter(|(_, r)| *r != zero)
            .collect();
        let mut adopted = Adopted::default();
        let mut kept_keys = Vec::new();
        for wanted in &config.vips {
            let key = vip_key(wanted.address, wanted.port, wanted.protocol.number());
            let Some((_, info)) = pinned_vips.iter().find(|(k, _)| *k == key) else {
                continue;
            };
            if !self.vip_ids.reserve(info.id) {
                warn!(vip = %wanted.name, "pinned VIP record has an unusable id {}; starting it afresh", info.id);
                continue;
            }
            kept_keys.push(key);
            let mut backends = Vec::new();
            for config in &wanted.backends {
                let addr = record_address(config.address);
                let Some(at) = records
                    .iter()
                    .position(|(_, r)| r.vip_id == info.id && r.addr == addr)
                else {
                    continue;
                };
                let (id, record) = records.swap_remove(at);
                if !self.backend_ids.reserve(id) {
                    continue;
                }
                // A backend whose flows were only held (its checks had taken it down) was not up.
                let up = record.flags & BACKEND_F_UP != 0 && record.flags & BACKEND_F_HELD == 0;
                adopted.up += usize::from(up);
                backends.push(BackendState {
                    id,
                    address: config.address,
                    weight: config.weight,
                    standby: config.standby,
                    // Down is not carried over: a backend that was not up gets its first check
                    // result like a new one.
                    health: if up { Health::Up } else { Health::Unknown },
                    path: adopted_path(&record, wanted.forward),
                    admin: admin_from_flags(record.flags),
                    held_until: None,
                });
                self.written.insert(id, record);
            }
            adopted.vips += 1;
            adopted.backends += backends.len();
            let live_table = info.id * 2 + (info.active_ring & 1);
            let live = self.dataplane.maps.rings.read_table(live_table)?;
            let tcp = wanted.protocol == crate::config::Protocol::Tcp;
            self.slots.insert(
                info.id,
                SlotHistory::adopted(live_table, live, kernel_now_ns(), tcp),
            );
            self.vips.push(VipState {
                id: info.id,
                name: wanted.name.clone(),
                key,
                address: wanted.address,
                port: wanted.port,
                protocol: wanted.protocol,
                active_ring: info.active_ring & 1,
                min_healthy: wanted.min_healthy,
                on_all_down: wanted.on_all_down,
                forward: wanted.forward,
                encap_source: wanted.encap_source.clone(),
                check_through_tunnel: wanted.check_through_tunnel,
                active_pool: ActivePool::None,
                backends,
            });
        }
        // What the stale ones counted goes into the carries (see `counters`): a backend's into
        // its VIP's, if the VIP stays; everything of a VIP that goes into the removed VIPs'.
        let kept_vips: Vec<u32> = self.vips.iter().map(|v| v.id).collect();
        for (id, record) in &records {
            if kept_vips.contains(&record.vip_id) {
                self.carry_backend(record.vip_id, *id)?;
            }
        }
        for (key, info) in pinned_vips.iter().filter(|(k, _)| !kept_keys.contains(k)) {
            self.remove_vip_record(key)?;
            let stale_backends = records
                .iter()
                .filter(|(_, record)| record.vip_id == info.id)
                .map(|(id, _)| *id);
            // An id a kept VIP reserved is not this record's any more (it was unusable).
            if !kept_vips.contains(&info.id) {
                self.carry_vip(info.id, stale_backends)?;
            }
            adopted.stale_vips += 1;
        }
        for (id, _) in records {
            self.clear_backend(id)?;
            adopted.stale_backends += 1;
        }
        self.reindex();
        Ok(adopted)
    }
}

/// The path a pinned backend record names, if it suits the VIP's configured `forward`: a record
/// written for the other kind of forwarding is resolved anew.
fn adopted_path(record: &Backend, forward: Forward) -> Option<L2Path> {
    if record.dst_mac == [0; 6] {
        return None;
    }
    let tunnel = match (forward.encapsulates(), record.mtu) {
        (false, 0) => None,
        (true, mtu) if mtu != 0 => Some(TunnelEnd {
            source: record_ip(&record.encap_src, record.flags & BACKEND_F_ADDR_V6 != 0),
            mtu,
        }),
        _ => return None,
    };
    Some(L2Path {
        dst_mac: record.dst_mac,
        src_mac: record.src_mac,
        ifindex: record.ifindex,
        redirect: record.flags & BACKEND_F_REDIRECT != 0,
        tunnel,
    })
}

/// An address as `record_address` wrote it.
fn record_ip(bytes: &[u8; 16], v6: bool) -> std::net::IpAddr {
    if v6 {
        std::net::Ipv6Addr::from(*bytes).into()
    } else {
        std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).into()
    }
}
