//! The likely next Maglev table, built before the check result that needs it.
//!
//! A health change is announced one result early: with `fall = 3` the second failure in a row
//! means the next failure takes the backend down, and with `rise = 2` the first pass of a down
//! backend means the next pass brings it back. The daemon then asks for the table its VIP would
//! have after that change ([`Balancer::prepare_health`]), and when the deciding result comes,
//! `publish` finds the table already built and skips the Maglev build, the bulk of a state
//! change (about 1 ms of 1.2 at 1000 backends and M = 65537).
//!
//! A prepared table is used only for exactly the weights it was built from, in the same turn
//! order (it lives in its VIP's `RingOrder`, which is rebuilt without it when the backends
//! change), so it is always the table a build at that moment would make; when the change does
//! not come, or another one comes first, it is simply not used. One per VIP: a newer hint
//! replaces it, and a publish that uses it uses it up.

use std::time::{Duration, Instant};

use super::{Balancer, PublishError, VipState, publish::RingOrder};
use crate::health::Health;

/// A Maglev table, as turn positions of its `RingOrder`, and what it was built from.
#[derive(Debug)]
pub(super) struct PreparedTable {
    weights: Vec<u32>,
    ring_size: u32,
    table: Vec<u32>,
    built_at: Instant,
}

impl PreparedTable {
    /// Whether this is the table of `weights` in a ring of `ring_size` slots.
    pub(super) fn is_for(&self, weights: &[u32], ring_size: u32) -> bool {
        self.ring_size == ring_size && self.weights == weights
    }

    pub(super) fn into_table(self) -> Vec<u32> {
        self.table
    }
}

impl Balancer {
    /// Builds the table that VIP `vip_index` will need if backend `backend_index` gets `health`
    /// (and nothing else changes first), for the publish that makes that change live. Changes
    /// nothing in the model or the maps.
    pub fn prepare_health(
        &mut self,
        vip_index: usize,
        backend_index: usize,
        health: Health,
    ) -> Result<(), PublishError> {
        let ring_size = self.dataplane.maps.rings.ring_size();
        let backend = self.backend_mut(vip_index, backend_index)?;
        let actual = backend.health;
        backend.health = health;
        let vip = &self.vips[vip_index];
        let order = RingOrder::kept(&mut self.ring_orders, vip);
        let weights = order.weights(vip, vip.select_pool());
        self.vips[vip_index].backends[backend_index].health = actual;

        let mut table = order
            .prepared
            .take()
            .map(PreparedTable::into_table)
            .unwrap_or_default();
        order.build(&weights, ring_size, &mut table);
        order.prepared = Some(PreparedTable {
            weights,
            ring_size,
            table,
            built_at: Instant::now(),
        });
        Ok(())
    }

    /// How long ago VIP `vip_index`'s prepared table was built; `None` if it holds none.
    pub fn prepared_age(&self, vip_index: usize) -> Option<Duration> {
        let vip: &VipState = self.vips.get(vip_index)?;
        let prepared = self.ring_orders.get(&vip.id)?.prepared.as_ref()?;
        Some(prepared.built_at.elapsed())
    }
}
