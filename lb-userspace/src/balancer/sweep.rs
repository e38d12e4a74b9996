//! The flow sweep: every few seconds the daemon reads the flow table (small now: it holds only
//! UDP flows and TCP flows of changed slots), forgets flows idle longer than their protocol's
//! idle timeout, and returns changed slots to unchanged where nothing needs them any more:
//! `tcp_idle_timeout` after the slot's last change, when no live flow of the slot is recorded on
//! a backend (up in the VIP) other than the slot's owner. Such a slot's connections are then all
//! on its owner, or idle for longer than the timeout.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lb_common::{BACKEND_F_UP, FlowKey, PROTO_TCP, RingSlot, flow_hash};

use super::{Balancer, PublishError};
use crate::dataplane::flows::{delete_flows, read_flows};

/// How long flows may be idle before the sweep forgets them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdleTimeouts {
    pub tcp: Duration,
    pub udp: Duration,
}

impl IdleTimeouts {
    /// How often the daemon sweeps: a fifth of the shorter timeout, 1 to 10 seconds.
    pub fn sweep_interval(&self) -> Duration {
        (self.tcp.min(self.udp) / 5).clamp(Duration::from_secs(1), Duration::from_secs(10))
    }

    fn of(&self, key: &FlowKey) -> Duration {
        if key.proto == PROTO_TCP {
            self.tcp
        } else {
            self.udp
        }
    }
}

impl Default for IdleTimeouts {
    fn default() -> Self {
        Self {
            tcp: crate::config::DEFAULT_TCP_IDLE_TIMEOUT,
            udp: crate::config::DEFAULT_UDP_IDLE_TIMEOUT,
        }
    }
}

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Flows left in the table.
    pub flows: usize,
    /// Flows forgotten for being idle.
    pub expired: usize,
    /// Slots returned to unchanged, over all VIPs.
    pub returned: usize,
    /// Slots still changed, over all VIPs.
    pub changed: usize,
    pub elapsed: Duration,
}

/// One bit per ring slot.
struct SlotSet(Vec<u64>);

impl SlotSet {
    fn new(slots: usize) -> Self {
        Self(vec![0; slots.div_ceil(64)])
    }
    fn insert(&mut self, slot: usize) {
        self.0[slot / 64] |= 1 << (slot % 64);
    }
    fn contains(&self, slot: usize) -> bool {
        self.0[slot / 64] & (1 << (slot % 64)) != 0
    }
}

impl Balancer {
    /// Sweeps the flow table at kernel-clock time `now_ns` (see the module docs and
    /// [`crate::dataplane::flows::kernel_now_ns`]).
    pub fn sweep_flows(&mut self, now_ns: u64) -> Result<SweepReport, PublishError> {
        let started = Instant::now();
        let idle = self.idle;
        let entries = read_flows(&self.dataplane.maps.flows)?;
        let ring_size = self.dataplane.maps.rings.ring_size();
        let live_vips: Vec<u32> = self.vips.iter().map(|v| v.id).collect();
        // Slots of TCP VIPs that a live flow on another backend than the owner still needs.
        let mut needed: HashMap<u32, SlotSet> = HashMap::new();
        let mut census: HashMap<u32, usize> = HashMap::new();
        let mut expired = Vec::new();
        for (key, state) in &entries {
            let idle_for = Duration::from_nanos(now_ns.saturating_sub(state.last_seen_ns));
            if idle_for > idle.of(key) {
                expired.push(*key);
                continue;
            }
            *census.entry(state.vip_id).or_default() += 1;
            if key.proto != PROTO_TCP {
                continue;
            }
            let Some(history) = self.slots.get(&state.vip_id) else {
                continue;
            };
            let slot = (flow_hash(key) % ring_size) as usize;
            let Some(live) = history.live.get(slot) else {
                continue;
            };
            // A flow on a backend that is down (or gone) would be re-chosen anyway: it does
            // not hold the slot.
            let usable = self
                .written
                .get(state.backend)
                .is_some_and(|r| r.flags & BACKEND_F_UP != 0 && r.vip_id == state.vip_id);
            if live.is_changed() && state.backend != live.owner && usable {
                needed
                    .entry(state.vip_id)
                    .or_insert_with(|| SlotSet::new(ring_size as usize))
                    .insert(slot);
            }
        }
        let expired_count = delete_flows(&mut self.dataplane.maps.flows, &expired)?;
        let timeout_ns = u64::try_from(idle.tcp.as_nanos()).unwrap_or(u64::MAX);
        let mut returned = 0;
        let mut changed = 0;
        for (&vip_id, history) in self.slots.iter_mut() {
            if !history.tracks_priors || !live_vips.contains(&vip_id) {
                continue;
            }
            let needed = needed.get(&vip_id);
            for i in 0..history.live.len() {
                let slot = history.live[i];
                if !slot.is_changed() {
                    continue;
                }
                let quiet = now_ns.saturating_sub(history.changed_at[i]) >= timeout_ns;
                if quiet && !needed.is_some_and(|n| n.contains(i)) {
                    let unchanged = RingSlot::unchanged(slot.owner);
                    history.set_live(i, unchanged);
                    self.dataplane.maps.rings.write_slot(
                        history.live_table,
                        i as u32,
                        unchanged,
                    )?;
                    returned += 1;
                } else {
                    changed += 1;
                }
            }
        }
        self.census = census;
        Ok(SweepReport {
            flows: entries.len() - expired.len(),
            expired: expired_count,
            returned,
            changed,
            elapsed: started.elapsed(),
        })
    }

    /// Deletes the flows recorded on backends `ids` (new backends that may have been given the
    /// id of a removed one).
    pub(super) fn forget_flows_of(&mut self, ids: &[u32]) -> Result<usize, PublishError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let ids: std::collections::HashSet<u32> = ids.iter().copied().collect();
        let stale: Vec<FlowKey> = read_flows(&self.dataplane.maps.flows)?
            .into_iter()
            .filter(|(_, state)| ids.contains(&state.backend))
            .map(|(key, _)| key)
            .collect();
        Ok(delete_flows(&mut self.dataplane.maps.flows, &stale)?)
    }

    /// Changed slots of the VIP at `vip_index`'s live ring.
    pub fn changed_slots(&self, vip_index: usize) -> usize {
        self.vips
            .get(vip_index)
            .and_then(|vip| self.slots.get(&vip.id))
            .map_or(0, |history| history.changed())
    }

    /// Flows the table held for the VIP at `vip_index` at the last sweep.
    pub fn recorded_flows(&self, vip_index: usize) -> usize {
        self.vips
            .get(vip_index)
            .and_then(|vip| self.census.get(&vip.id))
            .copied()
            .unwrap_or(0)
    }
}
