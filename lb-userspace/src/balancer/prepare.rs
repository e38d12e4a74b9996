//! The likely next Maglev table, built before the check result that needs it.
//!
//! A health change is announced one result early: with `fall = 3` the second failure in a row
//! means the next failure takes the backend down, and with `rise = 2` the first pass of a down
//! backend means the next pass brings it back. The daemon then asks for the table its VIP would
//! have after that change ([`Balancer::prepare_health`]), and when the deciding result comes,
//! `publish` finds the table already built and skips the Maglev build, the bulk of a state
//! change (about 1 ms of 1.3 at 1000 backends and M = 65537).
//!
//! A prepared table is used only for exactly the weights it was built from, in the same turn
//! order (it lives in its VIP's `RingOrder`, which is rebuilt without it when the backends
//! change), so it is always the table a build at that moment would make; when the change does
//! not come, or another one comes first, it is simply not used. A VIP keeps the last
//! [`PREPARED_PER_VIP`] tables prepared for it (so one spurious hint, say a slow check of a
//! healthy backend, does not push out the table of the backend that is really failing), and a
//! publish that uses one uses it up.

use std::time::{Duration, Instant};

use super::{Balancer, PublishError, VipState, publish::RingOrder};
use crate::health::Health;

/// Prepared tables kept per VIP (4 bytes per ring slot each: 256 KiB at M = 65537).
pub const PREPARED_PER_VIP: usize = 2;

/// A Maglev table, as turn positions of its `RingOrder`, and what it was built from.
#[derive(Debug)]
struct PreparedTable {
    weights: Vec<u32>,
    ring_size: u32,
    table: Vec<u32>,
    built_at: Instant,
}

impl PreparedTable {
    /// Whether this is the table of `weights` in a ring of `ring_size` slots.
    fn is_for(&self, weights: &[u32], ring_size: u32) -> bool {
        self.ring_size == ring_size && self.weights == weights
    }
}

/// The tables prepared for one VIP, oldest first; at most [`PREPARED_PER_VIP`].
#[derive(Debug, Default)]
pub(super) struct PreparedTables {
    tables: Vec<PreparedTable>,
}

impl PreparedTables {
    /// Where the table of exactly `weights` is kept.
    fn position(&self, weights: &[u32], ring_size: u32) -> Option<usize> {
        self.tables
            .iter()
            .position(|p| p.is_for(weights, ring_size))
    }

    /// The table of exactly `weights`, removed; `None` if none was prepared.
    pub(super) fn take(&mut self, weights: &[u32], ring_size: u32) -> Option<Vec<u32>> {
        let position = self.position(weights, ring_size)?;
        Some(self.tables.remove(position).table)
    }

    /// Keeps the table of `weights` ready, built with `build(weights, table)` unless it already
    /// is; the oldest table goes when there are too many (its buffer is reused).
    fn prepare(
        &mut self,
        weights: Vec<u32>,
        ring_size: u32,
        build: impl FnOnce(&[u32], &mut Vec<u32>),
    ) {
        if let Some(position) = self.position(&weights, ring_size) {
            let mut again = self.tables.remove(position);
            again.built_at = Instant::now();
            self.tables.push(again);
            return;
        }
        let mut table = if self.tables.len() >= PREPARED_PER_VIP {
            self.tables.remove(0).table
        } else {
            Vec::new()
        };
        build(&weights, &mut table);
        self.tables.push(PreparedTable {
            weights,
            ring_size,
            table,
            built_at: Instant::now(),
        });
    }

    fn newest(&self) -> Option<&PreparedTable> {
        self.tables.last()
    }

    /// How many tables are kept.
    fn len(&self) -> usize {
        self.tables.len()
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

        let mut prepared = std::mem::take(&mut order.prepared);
        prepared.prepare(weights, ring_size, |weights, table| {
            order.build(weights, ring_size, table)
        });
        order.prepared = prepared;
        Ok(())
    }

    /// How long ago VIP `vip_index`'s newest prepared table was built (or asked for again);
    /// `None` if it holds none.
    pub fn prepared_age(&self, vip_index: usize) -> Option<Duration> {
        let newest = self.prepared_tables(vip_index)?.newest()?;
        Some(newest.built_at.elapsed())
    }

    /// How many prepared tables VIP `vip_index` holds.
    pub fn prepared_count(&self, vip_index: usize) -> usize {
        self.prepared_tables(vip_index)
            .map_or(0, PreparedTables::len)
    }

    fn prepared_tables(&self, vip_index: usize) -> Option<&PreparedTables> {
        let vip: &VipState = self.vips.get(vip_index)?;
        Some(&self.ring_orders.get(&vip.id)?.prepared)
    }
}
