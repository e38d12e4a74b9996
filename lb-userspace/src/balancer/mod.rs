//! The daemon's model of what the data plane should hold, and the one place that writes it.
//!
//! Ids are assigned from the config: VIP `i` gets id `i` (its stats slot and ring tables `2i`,
//! `2i+1`); backends get consecutive ids across VIPs. A VIP's ring is republished whenever the
//! set of usable backends (up, L2 path known, weight > 0) changes: the new Maglev table goes into
//! the inactive table and the VIP record is flipped with one map update.

mod publish;

use std::net::IpAddr;

use lb_common::{FAMILY_V4, FAMILY_V6, VipKey};

pub use crate::api::model::Admin;
use crate::{
    config::{Config, OnAllDown, VipConfig},
    dataplane::{Capacity, DataPlane},
    health::Health,
    pool::{self, ActivePool, Member},
};

pub use publish::{PublishError, PublishReport, ring_for};

/// How the data plane reaches a backend at layer 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L2Path {
    /// The backend's MAC.
    pub dst_mac: [u8; 6],
    /// The MAC of the interface the frame leaves by.
    pub src_mac: [u8; 6],
    /// That interface.
    pub ifindex: u32,
    /// True when it is not the interface the program is attached to (redirect, not `XDP_TX`).
    pub redirect: bool,
}

#[derive(Clone, Debug)]
pub struct BackendState {
    pub id: u32,
    pub address: IpAddr,
    pub weight: u32,
    /// In the standby pool (serves only when the primaries cannot).
    pub standby: bool,
    /// From the health checks; anything but `Up` takes the backend out of service and moves its
    /// flows.
    pub health: Health,
    /// Unknown until the neighbour table gives the backend's MAC.
    pub path: Option<L2Path>,
    /// The operator's override (`lb drain`, `lb disable`, `lb enable`).
    pub admin: Admin,
}

impl BackendState {
    /// May receive packets: healthy, reachable and not disabled. Established flows stay on such
    /// a backend whatever the pools do.
    pub fn reachable(&self) -> bool {
        self.health == Health::Up && self.path.is_some() && self.admin != Admin::Disabled
    }

    /// The weight new flows see: 0 while draining.
    pub fn effective_weight(&self) -> u32 {
        match self.admin {
            Admin::Drained => 0,
            Admin::Enabled | Admin::Disabled => self.weight,
        }
    }

    fn member(&self) -> Member {
        Member {
            standby: self.standby,
            usable: self.reachable(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct VipState {
    pub id: u32,
    pub name: String,
    pub key: VipKey,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: crate::config::Protocol,
    /// Which of the two tables is live (0 or 1).
    pub active_ring: u32,
    pub min_healthy: u32,
    pub on_all_down: OnAllDown,
    /// The pool of the live table.
    pub active_pool: ActivePool,
    pub backends: Vec<BackendState>,
}

impl VipState {
    /// The pool that should serve new flows now.
    pub fn select_pool(&self) -> ActivePool {
        let members: Vec<Member> = self.backends.iter().map(BackendState::member).collect();
        pool::select(&members, self.min_healthy)
    }

    /// Whether `backend` takes new flows under `pool`.
    pub fn takes_new_flows(backend: &BackendState, pool: ActivePool) -> bool {
        backend.reachable()
            && backend.effective_weight() > 0
            && pool::in_pool(backend.member(), pool)
    }
}

/// Owns the loaded data plane and the state it mirrors.
pub struct Balancer {
    pub dataplane: DataPlane,
    pub vips: Vec<VipState>,
    /// What each `BACKENDS` slot was last written with, so a publish writes only the records
    /// that changed (one syscall each: at 1000 backends, rewriting all costs a millisecond).
    written: std::collections::HashMap<u32, lb_common::Backend>,
}

/// The capacity a config asks for.
pub fn capacity_of(config: &Config) -> Capacity {
    Capacity {
        ring_size: config.ring_size,
        max_vips: config.max_vips,
        max_backends: config.max_backends,
        flow_table_size: config.flow_table_size,
    }
}

/// The data plane's key for a VIP.
pub fn vip_key(address: IpAddr, port: u16, protocol: u8) -> VipKey {
    match address {
        IpAddr::V4(a) => VipKey::v4(a.octets(), port, protocol),
        IpAddr::V6(a) => VipKey::v6(a.octets(), port, protocol),
    }
}

/// Address family constant of an address, as the data plane stores it.
pub fn family(address: IpAddr) -> u8 {
    match address {
        IpAddr::V4(_) => FAMILY_V4,
        IpAddr::V6(_) => FAMILY_V6,
    }
}

impl Balancer {
    /// Builds the model for `config`. Backends start with unknown health and no L2 path, so
    /// nothing is in a ring until their first check passes and their MAC is known.
    pub fn new(dataplane: DataPlane, config: &Config) -> Self {
        let mut next_backend = 0u32;
        let vips = config
            .vips
            .iter()
            .enumerate()
            .map(|(i, vip)| Self::vip_state(i as u32, vip, &mut next_backend))
            .collect();
        Self {
            dataplane,
            vips,
            written: std::collections::HashMap::new(),
        }
    }

    fn vip_state(id: u32, vip: &VipConfig, next_backend: &mut u32) -> VipState {
        let backends = vip
            .backends
            .iter()
            .map(|b| {
                let id = *next_backend;
                *next_backend += 1;
                BackendState {
                    id,
                    address: b.address,
                    weight: b.weight,
                    standby: b.standby,
                    health: Health::Unknown,
                    path: None,
                    admin: Admin::Enabled,
                }
            })
            .collect();
        VipState {
            id,
            name: vip.name.clone(),
            key: vip_key(vip.address, vip.port, vip.protocol.number()),
            address: vip.address,
            port: vip.port,
            protocol: vip.protocol,
            active_ring: 0,
            min_healthy: vip.min_healthy,
            on_all_down: vip.on_all_down,
            active_pool: ActivePool::None,
            backends,
        }
    }

    /// Finds a VIP by name.
    pub fn vip_index(&self, name: &str) -> Option<usize> {
        self.vips.iter().position(|v| v.name == name)
    }
}
