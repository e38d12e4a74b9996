//! Which ring slots of a TCP VIP changed owner recently (DESIGN §8), so only their connections
//! need the flow table.
//!
//! Each slot of the live ring carries its `owner` and, once its owner changes, its `prior`: the
//! owner it had while it was last unchanged. Connections of an unchanged slot are all on the
//! owner, and the data plane sends them there without a flow-table lookup. A changed slot stays
//! changed (and its `prior` stays, through any number of further changes) until the flow sweep
//! returns it: `tcp_idle_timeout` after its last change, once the flow table holds no live flow
//! of the slot on a backend other than its owner.
//!
//! A [`SlotHistory`] mirrors one VIP's live ring and remembers when each slot last changed. It
//! belongs to the data plane's state, not to the config model: a rolled-back reload republishes
//! against it (a slot that flipped back and forth stays changed, as it must).

use lb_common::{NO_BACKEND, PRIOR_GONE, RingSlot};

/// One VIP's live ring as last published, and when each slot last changed owner.
#[derive(Clone, Debug)]
pub(super) struct SlotHistory {
    /// The live table's index in `RINGS` (`2 * vip id + active ring`).
    pub(super) live_table: u32,
    /// Exactly what the live table holds.
    pub(super) live: Vec<RingSlot>,
    /// Per slot, the kernel-clock time (ns, `CLOCK_MONOTONIC_COARSE`) of its last owner
    /// change; only meaningful for changed slots.
    pub(super) changed_at: Vec<u64>,
    /// Keep priors at all: TCP VIPs only (UDP records every flow, the prior is never used).
    pub(super) tracks_priors: bool,
    /// Where the table [`SlotHistory::stage`] computed differs from `live`, as (index, new
    /// slot): `live` becomes that table once [`SlotHistory::published`] says so.
    staged: Vec<(u32, RingSlot)>,
}

impl SlotHistory {
    /// A VIP with nothing published yet: every slot unchanged and empty.
    pub(super) fn empty(ring_size: u32, tracks_priors: bool) -> Self {
        Self {
            live_table: 0,
            live: vec![RingSlot::unchanged(NO_BACKEND); ring_size as usize],
            changed_at: vec![0; ring_size as usize],
            tracks_priors,
            staged: Vec::new(),
        }
    }

    /// A VIP adopted from pinned maps: its live table as found. The change times are not
    /// pinned, so every changed slot counts as changed `now` (the conservative choice).
    pub(super) fn adopted(live_table: u32, live: Vec<RingSlot>, now: u64, tcp: bool) -> Self {
        let changed_at = vec![now; live.len()];
        let mut history = Self {
            live_table,
            live,
            changed_at,
            tracks_priors: tcp,
            staged: Vec::new(),
        };
        if !tcp {
            for slot in &mut history.live {
                slot.prior = NO_BACKEND;
            }
        }
        history
    }

    /// Starts or stops keeping priors (a reload may turn a TCP VIP into a UDP one). Stopping
    /// forgets every prior; the next published table has none.
    pub(super) fn track_priors(&mut self, tcp: bool) {
        if self.tracks_priors && !tcp {
            for slot in &mut self.live {
                slot.prior = NO_BACKEND;
            }
        }
        self.tracks_priors = tcp;
    }

    /// The table to publish for the new owners at `now`, written into `out` (the inactive ring)
    /// and kept for [`SlotHistory::published`]. Slot `i`'s new owner is `ids[owners[i]]`, or
    /// none where `owners[i]` is `NO_BACKEND` (a Maglev table of indices, mapped to backend ids
    /// on the way). A slot whose owner changes remembers its old owner as `prior` if it was
    /// unchanged, and keeps its `prior` if it was changed already (connections from before the
    /// window began there); either way its change time is `now`. A slot that had no owner stays
    /// unchanged: no connection can be on it.
    ///
    /// Only the change times are updated here; [`SlotHistory::published`] records the table once
    /// it is live.
    ///
    /// # Panics
    ///
    /// If `out` is not of the ring's size, or an owner index is neither `NO_BACKEND` nor below
    /// `ids.len()`.
    pub(super) fn stage(&mut self, owners: &[u32], ids: &[u32], now: u64, out: &mut [RingSlot]) {
        debug_assert_eq!(owners.len(), self.live.len(), "ring size changed");
        assert_eq!(out.len(), self.live.len(), "ring size changed");
        let tracks_priors = self.tracks_priors;
        self.staged.clear();
        // One pass over the ring, reading more than writing (it is memory-bound: the ring is
        // half a megabyte): `out` still holds an older table, which differs from the new one in
        // few slots, and so does `live`.
        for (i, (((live, &index), changed_at), out)) in self
            .live
            .iter()
            .zip(owners)
            .zip(self.changed_at.iter_mut())
            .zip(out.iter_mut())
            .enumerate()
        {
            let owner = if index == NO_BACKEND {
                NO_BACKEND
            } else {
                ids[index as usize]
            };
            let slot = if owner == live.owner || !tracks_priors {
                RingSlot {
                    owner,
                    prior: live.prior,
                }
            } else {
                *changed_at = now;
                let prior = if live.is_changed() {
                    live.prior
                } else {
                    live.owner
                };
                RingSlot { owner, prior }
            };
            if *out != slot {
                *out = slot;
            }
            if *live != slot {
                self.staged.push((i as u32, slot));
            }
        }
    }

    /// The table [`SlotHistory::stage`] last computed went live in `RINGS` table `live_table`.
    pub(super) fn published(&mut self, live_table: u32) {
        self.live_table = live_table;
        for &(index, slot) in &self.staged {
            self.live[index as usize] = slot;
        }
    }

    /// Slots whose `prior` is backend `id`, which is going away (its id may be reused by a
    /// new backend that must not inherit old connections): each stays changed with
    /// [`PRIOR_GONE`] as prior, so its unrecorded packets go to whatever the owner is then.
    /// Returns the slots rewritten, as (index, new slot), for the live map.
    pub(super) fn forget_prior(&mut self, id: u32) -> Vec<(u32, RingSlot)> {
        let mut rewritten = Vec::new();
        for (i, slot) in self.live.iter_mut().enumerate() {
            if slot.prior == id && slot.is_changed() {
                slot.prior = PRIOR_GONE;
                rewritten.push((i as u32, *slot));
            }
        }
        rewritten
    }

    /// Changed slots.
    pub(super) fn changed(&self) -> usize {
        self.live.iter().filter(|s| s.is_changed()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: u32 = 1;
    const B: u32 = 2;
    const C: u32 = 3;

    /// Owners are given as backend ids: `stage` maps indices through the identity.
    fn publish(h: &mut SlotHistory, owners: &[u32], now: u64) -> Vec<RingSlot> {
        let ids = [0, A, B, C];
        let mut table = vec![RingSlot::unchanged(NO_BACKEND); owners.len()];
        h.stage(owners, &ids, now, &mut table);
        h.published(0);
        table
    }

    fn slot(owner: u32, prior: u32) -> RingSlot {
        RingSlot { owner, prior }
    }

    #[test]
    fn a_first_owner_is_no_change() {
        let mut h = SlotHistory::empty(3, true);
        let t = publish(&mut h, &[A, A, B], 10);
        assert_eq!(
            t,
            vec![
                RingSlot::unchanged(A),
                RingSlot::unchanged(A),
                RingSlot::unchanged(B)
            ]
        );
        assert_eq!(h.changed(), 0);
    }

    #[test]
    fn a_to_b_to_c_keeps_a_as_prior() {
        let mut h = SlotHistory::empty(2, true);
        publish(&mut h, &[A, A], 1);
        assert_eq!(
            publish(&mut h, &[B, A], 2),
            vec![slot(B, A), RingSlot::unchanged(A)]
        );
        assert_eq!(
            publish(&mut h, &[C, A], 3),
            vec![slot(C, A), RingSlot::unchanged(A)]
        );
        assert_eq!(
            h.changed_at[0], 3,
            "the change time moves with every change"
        );
    }

    #[test]
    fn a_to_b_and_back_stays_changed() {
        let mut h = SlotHistory::empty(1, true);
        publish(&mut h, &[A], 1);
        publish(&mut h, &[B], 2);
        assert_eq!(publish(&mut h, &[A], 3), vec![slot(A, A)]);
        assert_eq!(h.changed(), 1);
    }

    #[test]
    fn an_emptied_slot_remembers_its_owner() {
        let mut h = SlotHistory::empty(1, true);
        publish(&mut h, &[A], 1);
        assert_eq!(publish(&mut h, &[NO_BACKEND], 2), vec![slot(NO_BACKEND, A)]);
    }

    #[test]
    fn udp_never_keeps_priors() {
        let mut h = SlotHistory::empty(1, false);
        publish(&mut h, &[A], 1);
        assert_eq!(publish(&mut h, &[B], 2), vec![RingSlot::unchanged(B)]);
    }

    #[test]
    fn a_removed_prior_is_gone_for_good() {
        let mut h = SlotHistory::empty(3, true);
        publish(&mut h, &[A, A, B], 1);
        publish(&mut h, &[B, C, C], 2);
        let gone = |owner| slot(owner, PRIOR_GONE);
        assert_eq!(h.forget_prior(A), vec![(0, gone(B)), (1, gone(C))]);
        assert_eq!(h.live, vec![gone(B), gone(C), slot(C, B)]);
        assert_eq!(h.changed(), 3, "the slots stay changed");
        // A later change keeps the slot's prior gone (no backend inherits its connections).
        assert_eq!(publish(&mut h, &[A, C, C], 3)[0], gone(A));
    }
}
