//! The daemon's model of what the data plane should hold, and the one place that writes it.
//!
//! Every VIP and backend has a data-plane id (its slot in `COUNTER_CARRY`/`RINGS`, or in `BACKENDS`,
//! `BACKEND_STATS` and `TX_PORTS`), handed out by [`ids::IdPool`] and kept for as long as the VIP
//! (by name) or the backend (by VIP and address) stays in the config: reloads ([`reconcile`])
//! and restarted daemons ([`adopt`]) leave established flows where they are. A VIP's ring is
//! republished whenever the set of usable backends (up, L2 path known, weight > 0) changes: the
//! new Maglev table goes into the inactive table and the VIP record is flipped with one map
//! update.

mod adopt;
mod counters;
mod digest;
mod ids;
mod prepare;
mod publish;
mod reconcile;
mod replicated;
mod rollback;
mod slots;
mod sweep;
mod vip_index;
mod written;

pub use counters::derive_tx;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use lb_common::{FAMILY_V4, FAMILY_V6, VipKey};

pub use crate::api::model::Admin;
use crate::{
    config::{Config, Forward, OnAllDown},
    dataplane::{Capacity, DataPlane},
    health::Health,
    pool::{self, ActivePool, Member},
};

pub use adopt::Adopted;
pub use digest::ring_digest;
pub use publish::{PublishError, PublishReport, ring_for};
pub use reconcile::{Change, ReconcileError};
pub use replicated::{InstallReport, SkipReason, flow_key};
pub use sweep::{IdleTimeouts, SweepReport};

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
    /// Encapsulating VIPs: the tunnel's local end. The MACs are then the next hop's (the
    /// backend's, or the gateway's on the route to it).
    pub tunnel: Option<TunnelEnd>,
}

/// This node's end of the tunnel to an encapsulated backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelEnd {
    /// The outer source address (`encap_source`, or the route's preferred source).
    pub source: IpAddr,
    /// The egress MTU: a packet longer than this once encapsulated gets an ICMP "too big".
    pub mtu: u16,
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
    /// Until when its established flows stay on it although its checks took it down (see
    /// [`Balancer::flow_hold`]); `None` when not held.
    pub held_until: Option<Instant>,
}

impl BackendState {
    /// May receive packets: healthy, reachable and not disabled. Established flows stay on such
    /// a backend whatever the pools do.
    pub fn reachable(&self) -> bool {
        self.health == Health::Up && self.path.is_some() && self.admin != Admin::Disabled
    }

    /// Whether its established flows stay on it at `now`: it is reachable, or its checks took it
    /// down less than the flow hold ago (and the operator has not disabled it).
    pub fn keeps_flows(&self, now: Instant) -> bool {
        self.reachable() || (self.held(now) && self.admin != Admin::Disabled && self.path.is_some())
    }

    /// Down, with its flows held on it at `now`.
    pub fn held(&self, now: Instant) -> bool {
        self.health != Health::Up && self.held_until.is_some_and(|until| now < until)
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
    /// L2 DSR or encapsulation; with encapsulation every backend's path has a `tunnel`.
    pub forward: Forward,
    /// The configured outer source addresses (at most one per family).
    pub encap_source: Vec<IpAddr>,
    pub check_through_tunnel: bool,
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
    /// In config order.
    pub vips: Vec<VipState>,
    /// What each `BACKENDS` slot was last written with (see [`written`]).
    written: written::WrittenRecords,
    vip_ids: ids::IdPool,
    backend_ids: ids::IdPool,
    /// Backend id → (VIP index, backend index) in `vips`.
    index: std::collections::HashMap<u32, (usize, usize)>,
    /// How long a backend that its checks take down keeps its established flows; zero (a single
    /// node) moves them at once. A node of a group sets it: its own view of a backend may be wrong
    /// (its checks fail, the backend is fine for the other nodes), and moving a TCP connection to
    /// another backend can only reset it. If the whole VIP goes, the node hands it over (route
    /// withdrawn, keepalived FAULT) within the hold, and the connections go on through the node
    /// that takes over; if the backend is really dead, its flows move when the hold ends.
    pub flow_hold: Duration,
    /// `tcp_idle_timeout` and `udp_idle_timeout` (see [`Balancer::sweep_flows`]).
    pub idle: IdleTimeouts,
    /// Whether ring changes keep priors (DESIGN §8). The daemon turns it off while it starts
    /// from nothing, until its program is attached: before that no connection can exist, and
    /// priors from the order its backends happened to come up in would differ between nodes and
    /// send connections that move between nodes to the wrong backend. True otherwise.
    pub keeps_priors: bool,
    /// Per VIP id: its live ring with each slot's owner, prior and last change (see
    /// [`slots`]). Mirrors the data plane, not the config: a rolled-back reload keeps it.
    slots: std::collections::HashMap<u32, slots::SlotHistory>,
    /// `VIP_INDEX` as written (read from the map on first use: an adopted map has content).
    vip_index: Option<Vec<lb_common::VipSlot>>,
    /// Per VIP id: its backends in Maglev turn order with their keys, checked against the VIP
    /// at each publish and rebuilt when its backends changed.
    ring_orders: std::collections::HashMap<u32, publish::RingOrder>,
    /// The Maglev table of the last publish, as turn positions; kept so builds reuse it.
    ring_scratch: Vec<u32>,
    /// Per VIP id: flows in the table at the last sweep.
    census: std::collections::HashMap<u32, usize>,
    /// Backend counters a reconcile zeroed for reused ids, as they were, until it succeeds: a
    /// rolled-back reload puts them back (see [`rollback`]).
    zeroed_counters: Vec<(u32, aya::maps::PerCpuValues<lb_common::Counters>)>,
    /// Test-only: a map write that fails on purpose (see [`Balancer::inject_map_write_failure`]).
    faults: rollback::FaultInjection,
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
    /// A model with nothing in it yet: [`Balancer::adopt`] (a restarted daemon) and then
    /// [`Balancer::reconcile`] fill it from the config.
    pub fn empty(dataplane: DataPlane) -> Self {
        let capacity = dataplane.capacity;
        Self {
            dataplane,
            vips: Vec::new(),
            written: written::WrittenRecords::default(),
            vip_ids: ids::IdPool::new(capacity.max_vips),
            backend_ids: ids::IdPool::new(capacity.max_backends),
            index: std::collections::HashMap::new(),
            flow_hold: Duration::ZERO,
            idle: IdleTimeouts::default(),
            keeps_priors: true,
            slots: std::collections::HashMap::new(),
            vip_index: None,
            ring_orders: std::collections::HashMap::new(),
            ring_scratch: Vec::new(),
            census: std::collections::HashMap::new(),
            zeroed_counters: Vec::new(),
            faults: rollback::FaultInjection::default(),
        }
    }

    /// Builds the model for `config` and writes its VIPs. Backends start with unknown health
    /// and no L2 path, so nothing is in a ring until their first check passes and their MAC is
    /// known.
    pub fn new(dataplane: DataPlane, config: &Config) -> Result<Self, ReconcileError> {
        let mut balancer = Self::empty(dataplane);
        balancer.reconcile(config)?;
        Ok(balancer)
    }

    /// Finds a VIP by name.
    pub fn vip_index(&self, name: &str) -> Option<usize> {
        self.vips.iter().position(|v| v.name == name)
    }

    /// Where the backend with data-plane id `id` is in `vips`.
    pub fn locate(&self, id: u32) -> Option<(usize, usize)> {
        self.index.get(&id).copied()
    }

    /// The data-plane id of `vip`'s backend at `address`.
    pub fn backend_id(&self, vip: &str, address: IpAddr) -> Option<u32> {
        let vip = &self.vips[self.vip_index(vip)?];
        vip.backends
            .iter()
            .find(|b| b.address == address)
            .map(|b| b.id)
    }

    /// Whether some backend's flows are held (so [`Balancer::end_flow_holds`] has work to do).
    pub fn holds_flows(&self) -> bool {
        self.vips
            .iter()
            .flat_map(|v| &v.backends)
            .any(|b| b.held_until.is_some())
    }

    fn reindex(&mut self) {
        self.index = self
            .vips
            .iter()
            .enumerate()
            .flat_map(|(v, vip)| {
                vip.backends
                    .iter()
                    .enumerate()
                    .map(move |(b, backend)| (backend.id, (v, b)))
            })
            .collect();
    }
}
