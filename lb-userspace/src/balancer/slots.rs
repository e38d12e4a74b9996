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
    /// Exactly what the live table holds, once [`SlotHistory::live_is_exact`]. Changed in place
    /// only through [`SlotHistory::set_live`].
    pub(super) live: Vec<RingSlot>,
    /// Whether `live` equals the live table slot for slot. Not for a VIP never published (its
    /// tables hold whatever the map held) nor right after priors were dropped from `live`
    /// (the table keeps them until the next publish).
    live_is_exact: bool,
    /// What is known of the VIP's other table, the one the next publish writes.
    inactive: Option<InactiveTable>,
    /// The Maglev table `live`'s owners come from, once a publish made it live.
    live_owners: Option<OwnerTable>,
    /// The one [`SlotHistory::stage`] last staged.
    staged_owners: Option<OwnerTable>,
    /// Per slot, the kernel-clock time (ns, `CLOCK_MONOTONIC_COARSE`) of its last owner
    /// change; only meaningful for changed slots.
    pub(super) changed_at: Vec<u64>,
    /// Keep priors at all: TCP VIPs only (UDP records every flow, the prior is never used).
    pub(super) tracks_priors: bool,
    /// Where the table [`SlotHistory::stage`] computed differs from `live`, as (index, new
    /// slot): `live` becomes that table once [`SlotHistory::published`] says so.
    staged: Vec<(u32, RingSlot)>,
}

/// A Maglev table as turn positions, and the backend ids of the positions: the next table is
/// compared with it position by position (two streams of `u32`), not through the ids against
/// `live` (twice the bytes, and a lookup per slot).
#[derive(Clone, Debug)]
struct OwnerTable {
    positions: Vec<u32>,
    ids: Vec<u32>,
}

/// The table of a VIP that the XDP program does not read, as far as it is known: it equals
/// `live` except at `differs`. The next publish then writes it by touching those slots and the
/// slots that change, instead of reading all of it back (half a megabyte at M = 65537).
#[derive(Clone, Debug)]
struct InactiveTable {
    /// Its index in `RINGS`.
    table: u32,
    /// Slots where it may differ from `live` (duplicates allowed).
    differs: Vec<u32>,
}

impl SlotHistory {
    /// A VIP with nothing published yet: every slot unchanged and empty.
    pub(super) fn empty(ring_size: u32, tracks_priors: bool) -> Self {
        Self {
            live_table: 0,
            live: vec![RingSlot::unchanged(NO_BACKEND); ring_size as usize],
            changed_at: vec![0; ring_size as usize],
            tracks_priors,
            live_is_exact: false,
            inactive: None,
            live_owners: None,
            staged_owners: None,
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
            live_is_exact: tcp,
            inactive: None,
            live_owners: None,
            staged_owners: None,
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
            self.live_is_exact = false;
            self.inactive = None;
        }
        self.tracks_priors = tcp;
    }

    /// Changes slot `index` of `live`, for a caller that writes the same slot into the live
    /// table (`RingMemory::write_slot`) right after.
    pub(super) fn set_live(&mut self, index: usize, slot: RingSlot) {
        debug_assert_eq!(
            self.live[index].owner, slot.owner,
            "owners change only by publishing"
        );
        self.live[index] = slot;
        if let Some(inactive) = &mut self.inactive {
            inactive.differs.push(index as u32);
        }
    }

    /// The table to publish for the new owners at `now`, written into `out` (the inactive ring,
    /// table `out_table` of `RINGS`) and kept for [`SlotHistory::published`]. Slot `i`'s new owner
    /// is `ids[owners[i]]`, or none where `owners[i]` is `NO_BACKEND` (a Maglev table of indices,
    /// mapped to backend ids on the way). A slot whose owner changes remembers its old owner as
    /// `prior` if it was unchanged, and keeps its `prior` if it was changed already (connections
    /// from before the window began there); either way its change time is `now`. A slot that had no
    /// owner stays unchanged: no connection can be on it.
    ///
    /// Only the change times are updated here; [`SlotHistory::published`] records the table once
    /// it is live.
    ///
    /// # Panics
    ///
    /// If `out` is not of the ring's size, or an owner index is neither `NO_BACKEND` nor below
    /// `ids.len()`.
    pub(super) fn stage(
        &mut self,
        owners: Vec<u32>,
        ids: &[u32],
        now: u64,
        out_table: u32,
        out: &mut [RingSlot],
    ) {
        debug_assert_eq!(owners.len(), self.live.len(), "ring size changed");
        assert_eq!(out.len(), self.live.len(), "ring size changed");
        self.staged.clear();
        let inactive = self
            .inactive
            .take()
            .filter(|inactive| inactive.table == out_table && out_table != self.live_table);
        let live_owners = self.live_owners.take();
        match (inactive, &live_owners) {
            (Some(inactive), Some(live_owners)) if live_owners.ids == ids => {
                self.stage_by_position(&owners, &live_owners.positions, ids, now);
                // `out` is `live` but at `differs`: make it `live` there, then the new table.
                for &index in &inactive.differs {
                    out[index as usize] = self.live[index as usize];
                }
                for &(index, slot) in &self.staged {
                    out[index as usize] = slot;
                }
            }
            // Either table unknown (a first publish, new ids): compare every slot.
            _ => self.stage_comparing(&owners, ids, now, out),
        }
        self.live_owners = live_owners;
        self.staged_owners = Some(OwnerTable {
            positions: owners,
            ids: ids.to_vec(),
        });
        // `out` now is `live` but at the staged slots, whatever happens next.
        self.inactive = Some(InactiveTable {
            table: out_table,
            differs: self.staged.iter().map(|&(index, _)| index).collect(),
        });
    }

    /// [`SlotHistory::stage`]'s staging alone, for an `out` whose content is known, given the
    /// positions table `live`'s owners come from (with the same ids): a slot changes where its
    /// position does. Two streams of `u32`; nothing written but the slots that change.
    fn stage_by_position(&mut self, owners: &[u32], live_positions: &[u32], ids: &[u32], now: u64) {
        // A change moves few slots (a backend's share and a few more): most chunks are equal,
        // and comparing a chunk as a whole (memcmp, vectorised) is several times faster than
        // a branch per slot.
        const CHUNK: usize = 64;
        let tracks_priors = self.tracks_priors;
        let chunks = owners.chunks(CHUNK).zip(live_positions.chunks(CHUNK));
        for (c, (new, old)) in chunks.enumerate() {
            if new == old {
                continue;
            }
            for (k, (&index, &live_index)) in new.iter().zip(old).enumerate() {
                if index != live_index {
                    let i = c * CHUNK + k;
                    let live = self.live[i];
                    let owner = owner_id(index, ids);
                    debug_assert_ne!(owner, live.owner, "slot {i}: positions and owners disagree");
                    let slot =
                        changed_slot(live, owner, tracks_priors, &mut self.changed_at[i], now);
                    self.staged.push((i as u32, slot));
                }
            }
        }
    }

    /// [`SlotHistory::stage`] into an `out` of unknown content: every slot compared, the
    /// differing ones written.
    fn stage_comparing(&mut self, owners: &[u32], ids: &[u32], now: u64, out: &mut [RingSlot]) {
        let tracks_priors = self.tracks_priors;
        // One pass over the ring, reading more than writing (it is memory-bound: the ring is
        // half a megabyte): `out` still holds an older table, which differs from the new one in
        // few slots, and so does `live`.
        for (i, (((&live, &index), changed_at), out)) in self
            .live
            .iter()
            .zip(owners)
            .zip(self.changed_at.iter_mut())
            .zip(out.iter_mut())
            .enumerate()
        {
            let owner = owner_id(index, ids);
            let slot = if owner == live.owner {
                live
            } else {
                changed_slot(live, owner, tracks_priors, changed_at, now)
            };
            if *out != slot {
                *out = slot;
            }
            if live != slot {
                self.staged.push((i as u32, slot));
            }
        }
    }

    /// The table [`SlotHistory::stage`] last computed went live in `RINGS` table `live_table`.
    /// Returns the owners table it replaces, a buffer for the next build.
    pub(super) fn published(&mut self, live_table: u32) -> Option<Vec<u32>> {
        let old_table = self.live_table;
        // The table that was live holds the old `live` (if that was exact): it differs from
        // the new one at the staged slots.
        // `stage` noted the staged slots as the differences of the table it wrote.
        let exact = self.live_is_exact && old_table != live_table;
        self.inactive =
            self.inactive
                .take()
                .filter(|_| exact)
                .map(|InactiveTable { differs, .. }| InactiveTable {
                    table: old_table,
                    differs,
                });
        self.live_table = live_table;
        for &(index, slot) in &self.staged {
            self.live[index as usize] = slot;
        }
        self.live_is_exact = true;
        std::mem::replace(&mut self.live_owners, self.staged_owners.take()).map(|t| t.positions)
    }

    /// Slots whose `prior` is backend `id`, which is going away (its id may be reused by a
    /// new backend that must not inherit old connections): each stays changed with
    /// [`PRIOR_GONE`] as prior, so its unrecorded packets go to whatever the owner is then.
    /// Returns the slots rewritten, as (index, new slot), for the live map.
    pub(super) fn forget_prior(&mut self, id: u32) -> Vec<(u32, RingSlot)> {
        let rewritten: Vec<(u32, RingSlot)> = self
            .live
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.prior == id && slot.is_changed())
            .map(|(i, slot)| {
                (
                    i as u32,
                    RingSlot {
                        prior: PRIOR_GONE,
                        ..*slot
                    },
                )
            })
            .collect();
        for &(i, slot) in &rewritten {
            self.set_live(i as usize, slot);
        }
        rewritten
    }

    /// Changed slots.
    pub(super) fn changed(&self) -> usize {
        self.live.iter().filter(|s| s.is_changed()).count()
    }
}

/// The backend id of a Maglev table entry (a position in `ids`, or `NO_BACKEND`).
fn owner_id(index: u32, ids: &[u32]) -> u32 {
    if index == NO_BACKEND {
        NO_BACKEND
    } else {
        ids[index as usize]
    }
}

/// A slot whose owner becomes `owner` (another than `live`'s): it remembers the owner it had
/// while unchanged as its prior, and its change time is `now`. Without priors (UDP) it only
/// takes the new owner.
fn changed_slot(
    live: RingSlot,
    owner: u32,
    tracks_priors: bool,
    changed_at: &mut u64,
    now: u64,
) -> RingSlot {
    if !tracks_priors {
        return RingSlot {
            owner,
            prior: live.prior,
        };
    }
    *changed_at = now;
    let prior = if live.is_changed() {
        live.prior
    } else {
        live.owner
    };
    RingSlot { owner, prior }
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
        h.stage(owners.to_vec(), &ids, now, 1, &mut table);
        h.published(1);
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

    /// The next publish writes only the slots known to differ into its table; it must leave
    /// exactly what comparing every slot leaves, through failed publishes (staged, never
    /// flipped), in-place edits of the live table and priors turned off and on.
    #[test]
    fn a_known_inactive_table_ends_as_a_full_comparison_leaves_it() {
        const M: usize = 61;
        let ids = [0, A, B, C];
        // The two tables of one VIP in `RINGS`, holding whatever they held before.
        let mut tables = [vec![slot(C, A); M], vec![slot(B, C); M]];
        let mut h = SlotHistory::empty(M as u32, true);
        let mut live = 0;
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as u32
        };
        let mut known_path_used = 0;
        for round in 0..400_u64 {
            match round % 100 {
                60 => h.track_priors(false),
                80 => h.track_priors(true),
                _ => {}
            }
            // Few slots change per publish, as in production.
            let owners: Vec<u32> = h
                .live
                .iter()
                .map(|slot| match next() % 16 {
                    0 => NO_BACKEND,
                    1..=3 => next() % 3 + 1,
                    _ if slot.owner == NO_BACKEND => 1,
                    _ => slot.owner,
                })
                .collect();
            let out = 1 - live;
            let mut reference = h.clone();
            reference.inactive = None;
            let mut reference_table = tables[out].clone();
            reference.stage(
                owners.clone(),
                &ids,
                round,
                out as u32,
                &mut reference_table,
            );
            if h.inactive.as_ref().is_some_and(|i| i.table == out as u32) {
                known_path_used += 1;
            }
            h.stage(owners, &ids, round, out as u32, &mut tables[out]);
            assert_eq!(
                tables[out], reference_table,
                "table written in round {round}"
            );
            assert_eq!(h.staged, reference.staged, "slots staged in round {round}");
            if next() % 8 == 0 {
                // The VIP record's write failed: nothing flips.
                continue;
            }
            h.published(out as u32);
            live = out;
            assert_eq!(tables[live], h.live, "live table after round {round}");
            match next() % 4 {
                0 => {
                    let i = next() as usize % M;
                    let returned = RingSlot::unchanged(h.live[i].owner);
                    h.set_live(i, returned);
                    tables[live][i] = returned;
                }
                1 => {
                    for (i, slot) in h.forget_prior(A) {
                        tables[live][i as usize] = slot;
                    }
                }
                _ => {}
            }
            assert_eq!(
                tables[live], h.live,
                "live table after the edits of round {round}"
            );
        }
        assert!(
            known_path_used > 200,
            "the known-table path ran {known_path_used} times"
        );
    }
}
