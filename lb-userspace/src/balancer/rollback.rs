//! All-or-nothing reconciles: when a map write fails part-way through applying a config, the
//! model and the maps go back to what they were, so the old config keeps running as it ran.
//!
//! The model is small and cloned before a reconcile. The maps are put back from it: every VIP
//! record and backend record the failed attempt wrote that the old model does not have is
//! removed, and every VIP of the old model is republished (its backend records rewritten, its
//! ring rebuilt into the table the data plane is not reading, its record flipped to it). Rings
//! are a function of the model, so the rebuilt tables equal the old ones and established flows
//! stay where they were. The counter carries are read before and written back, and so are the
//! counters of ids the attempt reused (it zeroed them), so no total changes either.

use std::collections::HashSet;

use lb_common::{Backend, VipKey};

use super::{Balancer, PublishError, ReconcileError, VipState, ids::IdPool};

/// What a reconcile may change in the model.
pub(super) struct Snapshot {
    vips: Vec<VipState>,
    vip_ids: IdPool,
    backend_ids: IdPool,
    /// The counter carries (see [`super::counters`]): a removal the failed attempt carried must
    /// not count twice once the backend is back.
    carries: Vec<lb_common::Counters>,
}

/// Test-only fault injection: the map write after `writes_left` more fails, as a full or broken
/// map would. Off (`None`) in the daemon.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct FaultInjection {
    pub(super) writes_left: Option<usize>,
}

impl Balancer {
    pub(super) fn snapshot(&self) -> Result<Snapshot, crate::dataplane::DataPlaneError> {
        Ok(Snapshot {
            vips: self.vips.clone(),
            vip_ids: self.vip_ids.clone(),
            backend_ids: self.backend_ids.clone(),
            carries: self.carries()?,
        })
    }

    /// Puts the model back to `before` and the maps in line with it (see the module docs).
    pub(super) fn restore(&mut self, before: Snapshot) -> Result<(), ReconcileError> {
        // The rollback itself must not trip the injected fault.
        self.faults.writes_left = None;
        let Snapshot {
            mut vips,
            vip_ids,
            backend_ids,
            carries,
        } = before;
        self.restore_carries(&carries)?;
        // Counters of reused ids, as they were before the attempt zeroed them.
        for (id, held) in std::mem::take(&mut self.zeroed_counters).into_iter().rev() {
            self.dataplane.maps.put_backend_counters(id, held)?;
        }
        let keys: HashSet<VipKey> = vips.iter().map(|v| v.key).collect();
        let ids: HashSet<u32> = vips
            .iter()
            .flat_map(|v| v.backends.iter().map(|b| b.id))
            .collect();
        let maps = &self.dataplane.maps;
        let added_keys: Vec<VipKey> = maps
            .vips
            .keys()
            .filter_map(Result::ok)
            .filter(|key| !keys.contains(key))
            .collect();
        let zero: Backend = bytemuck::Zeroable::zeroed();
        let added_ids: Vec<u32> = (0..self.dataplane.capacity.max_backends)
            .filter(|id| !ids.contains(id))
            .filter(|id| maps.backends.get(id, 0).is_ok_and(|r| r != zero))
            .collect();
        // Records first, so the VIPS map has room for the old config's records again.
        for key in &added_keys {
            self.remove_vip_record(key)?;
        }
        for id in added_ids {
            self.clear_backend(id)?;
        }
        // Rebuild into the table the data plane is not reading now (the failed attempt may
        // have flipped some VIPs already).
        for vip in &mut vips {
            if let Ok(info) = self.dataplane.maps.vips.get(&vip.key, 0) {
                vip.active_ring = info.active_ring & 1;
            }
        }
        // Slot histories mirror the rings, which the republish below builds on; only those of
        // VIPs the failed attempt added go.
        self.slots.retain(|id, _| vips.iter().any(|v| v.id == *id));
        self.vips = vips;
        self.vip_ids = vip_ids;
        self.backend_ids = backend_ids;
        // What the failed attempt wrote is unknown: rewrite every backend record.
        self.written.clear();
        self.reindex();
        for v in 0..self.vips.len() {
            self.publish(v)?;
        }
        self.index_rebuild()?;
        Ok(())
    }

    /// Makes the map write after `writes` more fail (`None`: never), to test that a reconcile
    /// that fails part-way leaves the old config running. Not for production use.
    #[doc(hidden)]
    pub fn inject_map_write_failure(&mut self, writes: Option<usize>) {
        self.faults.writes_left = writes;
    }

    /// Counts one map write of `what` against the injected fault, failing when it is due.
    pub(super) fn map_write(&mut self, what: &'static str) -> Result<(), PublishError> {
        match self.faults.writes_left {
            Some(0) => {
                self.faults.writes_left = None;
                Err(PublishError::Injected { what })
            }
            Some(n) => {
                self.faults.writes_left = Some(n - 1);
                Ok(())
            }
            None => Ok(()),
        }
    }
}
