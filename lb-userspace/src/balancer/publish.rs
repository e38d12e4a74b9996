//! Writing the model into the maps, in the order that keeps every packet consistent:
//! backend records first, then the inactive ring table, then the VIP record that flips to it.

use std::time::{Duration, Instant};

use lb_common::{
    BACKEND_F_ADDR_V6, BACKEND_F_DISABLED, BACKEND_F_DRAINED, BACKEND_F_HELD, BACKEND_F_REDIRECT,
    BACKEND_F_UP, Backend, NO_BACKEND, VIP_F_ENCAP_GUE, VIP_F_ENCAP_IPIP, VIP_F_PASS_WHEN_EMPTY,
    VipInfo,
};

use super::{Admin, BackendState, Balancer, VipState, prepare::PreparedTables, slots::SlotHistory};
use crate::{
    config::{Forward, OnAllDown, Protocol},
    dataplane::{DataPlaneError, flows::kernel_now_ns},
    health::Health,
    maglev::{PreferenceList, build_table_from_lists},
    pool::ActivePool,
};

/// What one `publish` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublishReport {
    pub pool_before: ActivePool,
    pub pool_after: ActivePool,
    /// Backends in the new table.
    pub in_ring: usize,
    /// The table was built ahead of time, on the check result before the deciding one (see
    /// [`Balancer::prepare_health`]): no Maglev build in `elapsed`.
    pub prepared: bool,
    /// From the start of the write to the VIP record's flip: how long the change took to go live.
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("no VIP with index {0}")]
    NoSuchVip(usize),
    #[error("no backend with index {backend} in VIP `{vip}`")]
    NoSuchBackend { vip: String, backend: usize },
    #[error(transparent)]
    DataPlane(#[from] DataPlaneError),
    #[error("writing {what}: {source}")]
    Map {
        what: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("writing TX_PORTS: {0}")]
    TxPort(#[source] aya::maps::xdp::XdpMapError),
    #[error("writing {what}: injected failure (test)")]
    Injected { what: &'static str },
}

/// A backend's address as its record holds it: IPv4 in the first four bytes, the rest zero.
pub(super) fn record_address(address: std::net::IpAddr) -> [u8; 16] {
    let mut addr = [0u8; 16];
    match address {
        std::net::IpAddr::V4(a) => addr[..4].copy_from_slice(&a.octets()),
        std::net::IpAddr::V6(a) => addr = a.octets(),
    }
    addr
}

/// The record bits of an operator override ([`admin_from_flags`] reads them back).
fn admin_flags(admin: Admin) -> u32 {
    match admin {
        Admin::Enabled => 0,
        Admin::Drained => BACKEND_F_DRAINED,
        Admin::Disabled => BACKEND_F_DISABLED,
    }
}

/// The operator override a record's flags carry (see [`admin_flags`]).
pub(super) fn admin_from_flags(flags: u32) -> Admin {
    if flags & BACKEND_F_DISABLED != 0 {
        Admin::Disabled
    } else if flags & BACKEND_F_DRAINED != 0 {
        Admin::Drained
    } else {
        Admin::Enabled
    }
}

fn backend_record(vip_id: u32, backend: &BackendState, now: Instant) -> Backend {
    let (dst_mac, src_mac, ifindex, redirect, tunnel) = match backend.path {
        Some(p) => (p.dst_mac, p.src_mac, p.ifindex, p.redirect, p.tunnel),
        None => ([0; 6], [0; 6], 0, false, None),
    };
    let mut flags = admin_flags(backend.admin);
    if backend.keeps_flows(now) {
        flags |= BACKEND_F_UP;
        if !backend.reachable() {
            flags |= BACKEND_F_HELD;
        }
    }
    if redirect {
        flags |= BACKEND_F_REDIRECT;
    }
    if backend.address.is_ipv6() {
        flags |= BACKEND_F_ADDR_V6;
    }
    let (encap_src, mtu) = tunnel.map_or(([0; 16], 0), |t| (record_address(t.source), t.mtu));
    Backend {
        addr: record_address(backend.address),
        dst_mac,
        src_mac,
        flags,
        ifindex,
        vip_id,
        encap_src,
        mtu,
        _pad: 0,
    }
}

/// The Maglev table of a VIP's usable backends in its current pool, as backend ids.
pub fn ring_for(vip: &VipState, ring_size: u32) -> Vec<u32> {
    let mut order = RingOrder::of(vip);
    let ids = order.ids(vip);
    let mut table = Vec::new();
    order.build(
        &order.weights(vip, vip.select_pool()),
        ring_size,
        &mut table,
    );
    for owner in &mut table {
        if *owner != NO_BACKEND {
            *owner = ids[*owner as usize];
        }
    }
    table
}

/// A VIP's backends in the order of their Maglev turns, with their Maglev keys: what
/// [`RingOrder::build`] needs besides weights, kept between publishes (sorting and formatting
/// a thousand addresses took longer than the rest of a publish but the Maglev build).
///
/// The same table on every node (README, "Running several load balancers"): which backend owns a
/// slot depends only on the backends' addresses, their weights and which of them take new flows,
/// never on data-plane ids, the order of the config or what happened before. Each backend's
/// preference list is seeded by its address (the bytes of its `to_string()`), and the backends
/// take their turns in address order (addresses are unique in a VIP).
#[derive(Debug)]
pub(super) struct RingOrder {
    /// Index in `VipState::backends` and address of each backend, in address order.
    backends: Vec<(usize, std::net::IpAddr)>,
    /// Their Maglev keys, in the same order.
    keys: Vec<Vec<u8>>,
    /// The preference lists of those keys, for the ring size of the last build (hashing a
    /// thousand keys took 3% of a cold state change).
    lists: Vec<PreferenceList>,
    /// Tables built ahead of time for this order (dropped with it when the backends change).
    pub(super) prepared: PreparedTables,
}

impl RingOrder {
    fn of(vip: &VipState) -> Self {
        let mut backends: Vec<(usize, std::net::IpAddr)> = vip
            .backends
            .iter()
            .enumerate()
            .map(|(index, b)| (index, b.address))
            .collect();
        backends.sort_unstable_by_key(|&(_, address)| address);
        let keys = backends
            .iter()
            .map(|(_, address)| address.to_string().into_bytes())
            .collect();
        RingOrder {
            backends,
            keys,
            lists: Vec::new(),
            prepared: PreparedTables::default(),
        }
    }

    /// The order of `vip`'s backends kept in `orders`, rebuilt first if they changed.
    pub(super) fn kept<'a>(
        orders: &'a mut std::collections::HashMap<u32, RingOrder>,
        vip: &VipState,
    ) -> &'a mut RingOrder {
        match orders.entry(vip.id) {
            std::collections::hash_map::Entry::Occupied(entry) => {
                let order = entry.into_mut();
                if !order.fits(vip) {
                    *order = RingOrder::of(vip);
                }
                order
            }
            std::collections::hash_map::Entry::Vacant(entry) => entry.insert(RingOrder::of(vip)),
        }
    }

    /// Whether this is still the order of `vip`'s backends: the same number, and each index
    /// still holds the address it had (so the indices are still a permutation of them all).
    fn fits(&self, vip: &VipState) -> bool {
        self.backends.len() == vip.backends.len()
            && self
                .backends
                .iter()
                .all(|&(index, address)| vip.backends[index].address == address)
    }

    /// Data-plane ids in turn order.
    fn ids(&self, vip: &VipState) -> Vec<u32> {
        self.backends
            .iter()
            .map(|&(index, _)| vip.backends[index].id)
            .collect()
    }

    /// The Maglev weight of each of `vip`'s backends under `pool`, in this order: 0 for those
    /// that take no new flows. With the keys, all a table depends on.
    pub(super) fn weights(&self, vip: &VipState, pool: ActivePool) -> Vec<u32> {
        self.backends
            .iter()
            .map(|&(index, _)| {
                let b = &vip.backends[index];
                if VipState::takes_new_flows(b, pool) {
                    b.effective_weight()
                } else {
                    0
                }
            })
            .collect()
    }

    /// The Maglev table of these backends with `weights` (from [`RingOrder::weights`]), as
    /// positions in this order, into `table`.
    pub(super) fn build(&mut self, weights: &[u32], ring_size: u32, table: &mut Vec<u32>) {
        debug_assert_eq!(weights.len(), self.keys.len(), "weights of another order");
        if self.lists.len() != self.keys.len()
            || self.lists.first().map(|l| l.ring_size()) != Some(ring_size)
        {
            self.lists = self
                .keys
                .iter()
                .map(|key| PreferenceList::of(key, ring_size))
                .collect();
        }
        build_table_from_lists(&self.lists, weights, ring_size, table);
    }

    /// [`RingOrder::build`], or the prepared table built from exactly these weights (it is
    /// then used up). Returns whether it was.
    fn table_into(&mut self, weights: &[u32], ring_size: u32, table: &mut Vec<u32>) -> bool {
        match self.prepared.take(weights, ring_size) {
            Some(prepared) => {
                *table = prepared;
                true
            }
            None => {
                self.build(weights, ring_size, table);
                false
            }
        }
    }
}

impl Balancer {
    /// Writes every VIP (used at start-up, before the program is attached).
    pub fn publish_all(&mut self) -> Result<Vec<PublishReport>, PublishError> {
        (0..self.vips.len()).map(|i| self.publish(i)).collect()
    }

    /// Writes one VIP: its backend records, a fresh Maglev table of its active pool into the
    /// inactive ring, then the VIP record pointing at it. Packets in flight see either the old
    /// table or the new one.
    pub fn publish(&mut self, vip_index: usize) -> Result<PublishReport, PublishError> {
        let started = Instant::now();
        let vip = self
            .vips
            .get(vip_index)
            .ok_or(PublishError::NoSuchVip(vip_index))?;
        let pool_before = vip.active_pool;
        let pool_after = vip.select_pool();
        let records: Vec<(u32, Backend)> = vip
            .backends
            .iter()
            .map(|backend| (backend.id, backend_record(vip.id, backend, started)))
            .filter(|(id, record)| self.written.get(*id) != Some(record))
            .collect();
        for (id, record) in records {
            self.map_write("BACKENDS")?;
            let maps = &mut self.dataplane.maps;
            if record.flags & BACKEND_F_REDIRECT != 0 {
                maps.tx_ports
                    .set(id, record.ifindex, None, 0)
                    .map_err(PublishError::TxPort)?;
            }
            maps.backends
                .set(id, record, 0)
                .map_err(|source| PublishError::Map {
                    what: "BACKENDS",
                    source,
                })?;
            self.written.insert(id, record);
        }
        let vip = &self.vips[vip_index];
        let ring_size = self.dataplane.maps.rings.ring_size();
        let order = RingOrder::kept(&mut self.ring_orders, vip);
        let mut owners = std::mem::take(&mut self.ring_scratch);
        let weights = order.weights(vip, pool_after);
        let prepared = order.table_into(&weights, ring_size, &mut owners);
        let ids = order.ids(vip);
        let in_ring = vip
            .backends
            .iter()
            .filter(|b| VipState::takes_new_flows(b, pool_after))
            .count();
        let tcp = vip.protocol == Protocol::Tcp;
        let history = self
            .slots
            .entry(vip.id)
            .or_insert_with(|| SlotHistory::empty(ring_size, tcp));
        history.track_priors(tcp && self.keeps_priors);
        let next = 1 - (vip.active_ring & 1);
        let live_table = vip.id * 2 + next;
        // Straight into the inactive table: no copy of the ring on the way.
        let out = self.dataplane.maps.rings.table_mut(live_table)?;
        history.stage(owners, &ids, kernel_now_ns(), live_table, out);
        let key = vip.key;
        let (forward_flags, gue_port) = match vip.forward {
            Forward::L2 => (0, 0),
            Forward::Ipip => (VIP_F_ENCAP_IPIP, 0),
            Forward::Gue { port } => (VIP_F_ENCAP_GUE, port),
        };
        let flags = forward_flags
            | match vip.on_all_down {
                OnAllDown::Pass => VIP_F_PASS_WHEN_EMPTY,
                OnAllDown::Drop => 0,
            };
        let info = VipInfo {
            id: vip.id,
            flags,
            active_ring: next,
            gue_port_be: gue_port.to_be(),
            _pad: 0,
        };
        self.index_before_record(&key)?;
        self.map_write("VIPS")?;
        self.dataplane
            .maps
            .vips
            .insert(key, info, 0)
            .map_err(|source| PublishError::Map {
                what: "VIPS",
                source,
            })?;
        self.index_after_record(&key, info)?;
        if let Some(buffer) = self
            .slots
            .get_mut(&info.id)
            .and_then(|history| history.published(live_table))
        {
            self.ring_scratch = buffer;
        }
        let vip = &mut self.vips[vip_index];
        vip.active_ring = next;
        vip.active_pool = pool_after;
        Ok(PublishReport {
            pool_before,
            pool_after,
            in_ring,
            prepared,
            elapsed: started.elapsed(),
        })
    }

    /// Updates a backend's L2 path and republishes its VIP.
    pub fn set_path(
        &mut self,
        vip_index: usize,
        backend_index: usize,
        path: Option<super::L2Path>,
    ) -> Result<PublishReport, PublishError> {
        self.backend_mut(vip_index, backend_index)?.path = path;
        self.publish(vip_index)
    }

    /// Sets a backend's health and republishes its VIP.
    pub fn set_health(
        &mut self,
        vip_index: usize,
        backend_index: usize,
        health: Health,
    ) -> Result<PublishReport, PublishError> {
        self.mark_health(vip_index, backend_index, health)?;
        self.publish(vip_index)
    }

    /// Sets an operator override (drain, disable, enable) and republishes the backend's VIP.
    pub fn set_admin(
        &mut self,
        vip_index: usize,
        backend_index: usize,
        admin: super::Admin,
    ) -> Result<PublishReport, PublishError> {
        self.backend_mut(vip_index, backend_index)?.admin = admin;
        self.publish(vip_index)
    }

    /// Sets a backend's health in the model only; `publish` makes it live. A backend that goes
    /// from up to down keeps its established flows for [`Balancer::flow_hold`]; returns until
    /// when, if it does.
    pub fn mark_health(
        &mut self,
        vip_index: usize,
        backend_index: usize,
        health: Health,
    ) -> Result<Option<Instant>, PublishError> {
        let hold = self.flow_hold;
        let backend = self.backend_mut(vip_index, backend_index)?;
        let was_up = backend.health == Health::Up;
        backend.health = health;
        backend.held_until =
            (was_up && health == Health::Down && !hold.is_zero()).then(|| Instant::now() + hold);
        Ok(backend.held_until)
    }

    /// Ends the flow holds that are over at `now` and republishes their VIPs (the held
    /// backends' flows are re-chosen from then on). Returns the backends released, as (VIP
    /// index, backend index).
    pub fn end_flow_holds(&mut self, now: Instant) -> Result<Vec<(usize, usize)>, PublishError> {
        let mut released = Vec::new();
        for (v, vip) in self.vips.iter_mut().enumerate() {
            for (b, backend) in vip.backends.iter_mut().enumerate() {
                if backend.held_until.is_some_and(|until| until <= now) {
                    backend.held_until = None;
                    released.push((v, b));
                }
            }
        }
        let mut vips: Vec<usize> = released.iter().map(|(v, _)| *v).collect();
        vips.dedup();
        for v in vips {
            self.publish(v)?;
        }
        Ok(released)
    }

    /// Marks a backend up or down (shorthand for `set_health`) and republishes its VIP.
    pub fn set_up(
        &mut self,
        vip_index: usize,
        backend_index: usize,
        up: bool,
    ) -> Result<PublishReport, PublishError> {
        self.set_health(
            vip_index,
            backend_index,
            if up { Health::Up } else { Health::Down },
        )
    }

    /// Changes a backend's weight (0 drains) and republishes its VIP.
    pub fn set_weight(
        &mut self,
        vip_index: usize,
        backend_index: usize,
        weight: u32,
    ) -> Result<PublishReport, PublishError> {
        self.backend_mut(vip_index, backend_index)?.weight = weight;
        self.publish(vip_index)
    }

    /// Clears the `BACKENDS` record of a backend that is gone: flows still pinned to it see no
    /// `BACKEND_F_UP` and are re-chosen from their VIP's ring. Its id may be reused, so first no
    /// live slot may keep it as a prior (see [`SlotHistory::forget_prior`]).
    pub(super) fn clear_backend(&mut self, id: u32) -> Result<(), PublishError> {
        let vip_id = self.written.get(id).map(|r| r.vip_id);
        for (&history_vip, history) in self.slots.iter_mut() {
            if vip_id.is_some_and(|v| v != history_vip) {
                continue;
            }
            for (index, slot) in history.forget_prior(id) {
                self.dataplane
                    .maps
                    .rings
                    .write_slot(history.live_table, index, slot)?;
            }
        }
        self.map_write("BACKENDS")?;
        self.dataplane
            .maps
            .backends
            .set(id, <Backend as bytemuck::Zeroable>::zeroed(), 0)
            .map_err(|source| PublishError::Map {
                what: "BACKENDS",
                source,
            })?;
        self.written.remove(id);
        Ok(())
    }

    pub(super) fn backend_mut(
        &mut self,
        vip_index: usize,
        backend_index: usize,
    ) -> Result<&mut BackendState, PublishError> {
        let vip = self
            .vips
            .get_mut(vip_index)
            .ok_or(PublishError::NoSuchVip(vip_index))?;
        let name = vip.name.clone();
        vip.backends
            .get_mut(backend_index)
            .ok_or(PublishError::NoSuchBackend {
                vip: name,
                backend: backend_index,
            })
    }
}
