//! Making the model and the maps match a config: at start-up (from nothing, or from what a
//! restarted daemon adopted) and on every reload.
//!
//! A VIP is the same VIP while its name stays; a backend is the same backend while its VIP and
//! address stay. Those keep their data-plane ids, health, L2 path and operator override, so their
//! flows stay where they are. Removals are written first (the VIP's new ring, then the cleared
//! backend record; a removed VIP's record goes before its backends'; the old record of a VIP
//! that moves to another address), then additions and changes, so ids and map room freed by a
//! reload can serve the additions of the same reload.

use std::{fmt, net::IpAddr};

use super::{BackendState, Balancer, PublishError, VipState, vip_key};
use crate::{
    api::model::Admin,
    config::{BackendConfig, Config, VipConfig},
    dataplane::DataPlaneError,
    health::Health,
    pool::ActivePool,
};

/// One difference a reconcile applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    VipAdded {
        vip: String,
    },
    VipRemoved {
        vip: String,
    },
    /// `what`: `min_healthy 1 -> 2`, `address 10.0.0.1:80/tcp -> 10.0.0.2:80/tcp`, ...
    VipChanged {
        vip: String,
        what: String,
    },
    BackendAdded {
        vip: String,
        backend: IpAddr,
    },
    BackendRemoved {
        vip: String,
        backend: IpAddr,
    },
    /// `what`: `weight 100 -> 50`, `standby false -> true`.
    BackendChanged {
        vip: String,
        backend: IpAddr,
        what: String,
    },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::VipAdded { vip } => write!(f, "vip {vip}: added"),
            Change::VipRemoved { vip } => write!(f, "vip {vip}: removed"),
            Change::VipChanged { vip, what } => write!(f, "vip {vip}: {what}"),
            Change::BackendAdded { vip, backend } => {
                write!(f, "vip {vip}: backend {backend} added")
            }
            Change::BackendRemoved { vip, backend } => {
                write!(f, "vip {vip}: backend {backend} removed")
            }
            Change::BackendChanged { vip, backend, what } => {
                write!(f, "vip {vip}: backend {backend}: {what}")
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("no free VIP slot: every one of max_vips = {0} is in use")]
    NoVipSlot(u32),
    #[error("no free backend slot: every one of max_backends = {0} is in use")]
    NoBackendSlot(u32),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error(transparent)]
    DataPlane(#[from] DataPlaneError),
    /// A reconcile failed part-way and was undone (or, with `rollback`, could not be).
    #[error("{failed}; {}", match rollback {
        None => "rolled back: the previous config runs unchanged".to_owned(),
        Some(e) => format!("rolling back failed too ({e}): the maps may hold part of the new config"),
    })]
    RolledBack {
        failed: Box<ReconcileError>,
        rollback: Option<Box<ReconcileError>>,
    },
}

/// Ids a reconcile removed. An addition of the same reconcile takes one of them only when the
/// pool has no other: flows of a removed backend should be re-chosen from the ring, not land on
/// whatever new backend inherits its id.
#[derive(Default)]
struct Freed {
    /// In the order they were freed; reused oldest first, like the pools do.
    vips: std::collections::VecDeque<u32>,
    backends: std::collections::VecDeque<u32>,
    /// Ids given to new backends (fresh or reused).
    allocated: Vec<u32>,
}

fn endpoint(address: IpAddr, port: u16, protocol: crate::config::Protocol) -> String {
    format!("{}/{protocol}", std::net::SocketAddr::new(address, port))
}

impl Balancer {
    /// Makes the model and the maps match `config` and returns what changed. Only VIPs that
    /// changed are republished; nothing else is written. All or nothing: if a map write fails
    /// part-way, the model and the maps go back to what they were (see [`super::rollback`]) and
    /// the error says so.
    pub fn reconcile(&mut self, config: &Config) -> Result<Vec<Change>, ReconcileError> {
        let before = self.snapshot()?;
        self.zeroed_counters.clear();
        match self.apply(config) {
            Ok(changes) => {
                self.zeroed_counters.clear();
                self.idle = super::IdleTimeouts {
                    tcp: config.tcp_idle_timeout,
                    udp: config.udp_idle_timeout,
                };
                Ok(changes)
            }
            Err(failed) => {
                let rollback = self.restore(before).err().map(Box::new);
                Err(ReconcileError::RolledBack {
                    failed: Box::new(failed),
                    rollback,
                })
            }
        }
    }

    fn apply(&mut self, config: &Config) -> Result<Vec<Change>, ReconcileError> {
        let mut changes = Vec::new();
        let mut freed = Freed::default();
        self.remove_missing(config, &mut changes, &mut freed)?;
        let mut republish = Vec::new();
        let mut vips = Vec::with_capacity(config.vips.len());
        let mut current = std::mem::take(&mut self.vips);
        for wanted in &config.vips {
            let (state, changed) = match current.iter().position(|v| v.name == wanted.name) {
                Some(at) => {
                    let mut vip = current.swap_remove(at);
                    let old_key = vip.key;
                    let changed = self.update_vip(&mut vip, wanted, &mut changes, &mut freed)?;
                    if vip.key != old_key {
                        // Out before any new record goes in: the map never holds more VIPs
                        // than the old or the new config has (it may be sized to exactly
                        // that), and another VIP of this config may take the key over.
                        self.remove_vip_record(&old_key)?;
                    }
                    (vip, changed)
                }
                None => {
                    let vip = self.new_vip(wanted, &mut freed)?;
                    changes.push(Change::VipAdded {
                        vip: wanted.name.clone(),
                    });
                    (vip, true)
                }
            };
            if changed {
                republish.push(vips.len());
            }
            vips.push(state);
        }
        debug_assert!(current.is_empty(), "remove_missing took the rest");
        // Ids this reload freed and did not need go back to the pools only now, so the
        // additions above took fresh ones where they could (see `Freed`).
        for id in freed.vips {
            self.vip_ids.release(id);
        }
        for id in freed.backends {
            self.backend_ids.release(id);
        }
        self.vips = vips;
        self.reindex();
        // A reused id must not inherit the flows its previous backend had recorded (the new
        // backend is not up yet, so no packet followed them to it).
        self.forget_flows_of(&freed.allocated)?;
        for v in republish {
            self.publish(v)?;
        }
        // Slots of removed and moved VIPs go to VIPs that were waiting for them.
        self.index_rebuild()?;
        Ok(changes)
    }

    /// First half of a reconcile: VIPs and backends the config no longer has leave the maps and
    /// free their ids.
    fn remove_missing(
        &mut self,
        config: &Config,
        changes: &mut Vec<Change>,
        freed: &mut Freed,
    ) -> Result<(), ReconcileError> {
        let mut v = 0;
        while v < self.vips.len() {
            let Some(wanted) = config.vips.iter().find(|w| w.name == self.vips[v].name) else {
                let vip = self.vips.remove(v);
                self.remove_vip_record(&vip.key)?;
                self.carry_vip(vip.id, vip.backends.iter().map(|b| b.id))?;
                for backend in &vip.backends {
                    self.clear_backend(backend.id)?;
                    freed.backends.push_back(backend.id);
                }
                freed.vips.push_back(vip.id);
                changes.push(Change::VipRemoved { vip: vip.name });
                continue;
            };
            let vip = &mut self.vips[v];
            let (kept, gone): (Vec<BackendState>, Vec<BackendState>) =
                std::mem::take(&mut vip.backends)
                    .into_iter()
                    .partition(|b| wanted.backends.iter().any(|w| w.address == b.address));
            vip.backends = kept;
            if !gone.is_empty() {
                // The ring without them first, then their records: a packet never finds a
                // cleared backend in a live ring.
                self.publish(v)?;
                for backend in gone {
                    self.carry_backend(self.vips[v].id, backend.id)?;
                    self.clear_backend(backend.id)?;
                    freed.backends.push_back(backend.id);
                    changes.push(Change::BackendRemoved {
                        vip: self.vips[v].name.clone(),
                        backend: backend.address,
                    });
                }
            }
            v += 1;
        }
        self.reindex();
        Ok(())
    }

    pub(super) fn remove_vip_record(
        &mut self,
        key: &lb_common::VipKey,
    ) -> Result<(), ReconcileError> {
        self.index_remove(key)?;
        self.map_write("VIPS")?;
        match self.dataplane.maps.vips.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(PublishError::Map {
                what: "VIPS",
                source,
            }
            .into()),
        }
    }

    /// Brings a kept VIP's settings and backends in line with `wanted` (its removed backends
    /// are already gone); true if it needs republishing.
    fn update_vip(
        &mut self,
        vip: &mut VipState,
        wanted: &VipConfig,
        changes: &mut Vec<Change>,
        freed: &mut Freed,
    ) -> Result<bool, ReconcileError> {
        let name = wanted.name.clone();
        let mut changed = false;
        let mut note = |changed: &mut bool, what: String| {
            *changed = true;
            changes.push(Change::VipChanged {
                vip: name.clone(),
                what,
            });
        };
        if (vip.address, vip.port, vip.protocol) != (wanted.address, wanted.port, wanted.protocol) {
            note(
                &mut changed,
                format!(
                    "address {} -> {}",
                    endpoint(vip.address, vip.port, vip.protocol),
                    endpoint(wanted.address, wanted.port, wanted.protocol)
                ),
            );
            vip.address = wanted.address;
            vip.port = wanted.port;
            vip.protocol = wanted.protocol;
            vip.key = vip_key(wanted.address, wanted.port, wanted.protocol.number());
        }
        if vip.min_healthy != wanted.min_healthy {
            note(
                &mut changed,
                format!("min_healthy {} -> {}", vip.min_healthy, wanted.min_healthy),
            );
            vip.min_healthy = wanted.min_healthy;
        }
        if vip.on_all_down != wanted.on_all_down {
            note(
                &mut changed,
                format!("on_all_down {} -> {}", vip.on_all_down, wanted.on_all_down),
            );
            vip.on_all_down = wanted.on_all_down;
        }
        // Another way to the backends: every path is resolved anew (gateway MACs, sources).
        let reroute = vip.forward.encapsulates() != wanted.forward.encapsulates()
            || vip.encap_source != wanted.encap_source;
        if vip.forward != wanted.forward {
            note(
                &mut changed,
                format!("forward {} -> {}", vip.forward, wanted.forward),
            );
            vip.forward = wanted.forward;
        }
        if vip.encap_source != wanted.encap_source {
            note(
                &mut changed,
                format!(
                    "encap_source {:?} -> {:?}",
                    vip.encap_source, wanted.encap_source
                ),
            );
            vip.encap_source = wanted.encap_source.clone();
        }
        if vip.check_through_tunnel != wanted.check_through_tunnel {
            note(
                &mut changed,
                format!(
                    "check_through_tunnel {} -> {}",
                    vip.check_through_tunnel, wanted.check_through_tunnel
                ),
            );
            vip.check_through_tunnel = wanted.check_through_tunnel;
        }
        if reroute {
            for backend in &mut vip.backends {
                backend.path = None;
            }
        }
        let mut backends = Vec::with_capacity(wanted.backends.len());
        let mut current = std::mem::take(&mut vip.backends);
        for config in &wanted.backends {
            let backend = match current.iter().position(|b| b.address == config.address) {
                Some(at) => {
                    let mut backend = current.swap_remove(at);
                    for what in update_backend(&mut backend, config) {
                        changed = true;
                        changes.push(Change::BackendChanged {
                            vip: wanted.name.clone(),
                            backend: config.address,
                            what,
                        });
                    }
                    backend
                }
                None => {
                    changed = true;
                    changes.push(Change::BackendAdded {
                        vip: wanted.name.clone(),
                        backend: config.address,
                    });
                    self.new_backend(config, freed)?
                }
            };
            backends.push(backend);
        }
        // The config's order is the status order; Maglev does not depend on it.
        vip.backends = backends;
        Ok(changed)
    }

    fn new_vip(
        &mut self,
        wanted: &VipConfig,
        freed: &mut Freed,
    ) -> Result<VipState, ReconcileError> {
        let id = self
            .vip_ids
            .allocate()
            .or_else(|| freed.vips.pop_front())
            .ok_or(ReconcileError::NoVipSlot(self.dataplane.capacity.max_vips))?;
        self.start_carry(id)?;
        // Whatever a previous VIP of this id left in its rings is not this VIP's history.
        self.slots.remove(&id);
        let backends = wanted
            .backends
            .iter()
            .map(|b| self.new_backend(b, freed))
            .collect::<Result<_, _>>()?;
        Ok(VipState {
            id,
            name: wanted.name.clone(),
            key: vip_key(wanted.address, wanted.port, wanted.protocol.number()),
            address: wanted.address,
            port: wanted.port,
            protocol: wanted.protocol,
            active_ring: 0,
            min_healthy: wanted.min_healthy,
            on_all_down: wanted.on_all_down,
            forward: wanted.forward,
            encap_source: wanted.encap_source.clone(),
            check_through_tunnel: wanted.check_through_tunnel,
            active_pool: ActivePool::None,
            backends,
        })
    }

    fn new_backend(
        &mut self,
        config: &BackendConfig,
        freed: &mut Freed,
    ) -> Result<BackendState, ReconcileError> {
        let id = self
            .backend_ids
            .allocate()
            .or_else(|| freed.backends.pop_front())
            .ok_or(ReconcileError::NoBackendSlot(
                self.dataplane.capacity.max_backends,
            ))?;
        let held = self.dataplane.maps.take_backend_counters(id)?;
        self.zeroed_counters.push((id, held));
        freed.allocated.push(id);
        Ok(BackendState {
            id,
            address: config.address,
            weight: config.weight,
            standby: config.standby,
            health: Health::Unknown,
            path: None,
            admin: Admin::Enabled,
            held_until: None,
        })
    }
}

/// Applies a kept backend's new weight and pool; returns what changed.
fn update_backend(backend: &mut BackendState, config: &BackendConfig) -> Vec<String> {
    let mut what = Vec::new();
    if backend.weight != config.weight {
        what.push(format!("weight {} -> {}", backend.weight, config.weight));
        backend.weight = config.weight;
    }
    if backend.standby != config.standby {
        let pool = |standby: bool| if standby { "standby" } else { "primary" };
        what.push(format!(
            "pool {} -> {}",
            pool(backend.standby),
            pool(config.standby)
        ));
        backend.standby = config.standby;
    }
    what
}
