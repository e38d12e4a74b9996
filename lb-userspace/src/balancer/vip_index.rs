//! `VIP_INDEX`, the direct-mapped copy of `VIPS` the data plane reads first (see `VipSlot` in
//! lb-common). `VIPS` stays the full record of every VIP (adoption reads it); each VIP also gets
//! its `VIP_INDEX` slot unless another VIP holds it, in which case the slot is marked
//! `VIP_SLOT_OVERFLOW` before the VIP's record goes into `VIPS`, so the data plane never misses a
//! VIP: a packet whose key does not match its slot is looked up in `VIPS` when the slot says so.
//!
//! Writes are ordered for readers: a slot is filled with its key and record first and marked
//! valid with a second write; it is marked invalid before its VIP's record leaves `VIPS`.

use std::collections::HashMap;

use lb_common::{
    VIP_INDEX_SLOTS, VIP_SLOT_OVERFLOW, VIP_SLOT_VALID, VipInfo, VipKey, VipSlot, vip_index_slot,
};

use super::{Balancer, PublishError};

fn empty_slot() -> VipSlot {
    bytemuck::Zeroable::zeroed()
}

impl Balancer {
    /// The slots as the map holds them, read once (an adopted map has content).
    fn index_slots(&mut self) -> &mut Vec<VipSlot> {
        let map = &self.dataplane.maps.vip_index;
        self.vip_index.get_or_insert_with(|| {
            (0..VIP_INDEX_SLOTS)
                .map(|i| map.get(&i, 0).unwrap_or_else(|_| empty_slot()))
                .collect()
        })
    }

    fn write_index_slot(&mut self, index: u32, slot: VipSlot) -> Result<(), PublishError> {
        self.map_write("VIP_INDEX")?;
        self.dataplane
            .maps
            .vip_index
            .set(index, slot, 0)
            .map_err(|source| PublishError::Map {
                what: "VIP_INDEX",
                source,
            })?;
        self.index_slots()[index as usize] = slot;
        Ok(())
    }

    /// Puts `key` (record `info`) into `index`, with `state`'s other bits: key and record first,
    /// then the valid bit.
    fn place(
        &mut self,
        index: u32,
        key: VipKey,
        info: VipInfo,
        state: u32,
    ) -> Result<(), PublishError> {
        let current = self.index_slots()[index as usize];
        let valid = current.state & VIP_SLOT_VALID != 0;
        let wanted = VipSlot {
            key,
            state: state | VIP_SLOT_VALID,
            info,
        };
        if valid && current.key == key {
            if current != wanted {
                // Same VIP: only the record's small fields (ring, flags) or the overflow bit
                // change, each of which a reader sees old or new.
                self.write_index_slot(index, wanted)?;
            }
            return Ok(());
        }
        debug_assert!(!valid, "placing over another VIP's slot");
        self.write_index_slot(
            index,
            VipSlot {
                state: state & !VIP_SLOT_VALID,
                ..wanted
            },
        )?;
        self.write_index_slot(index, wanted)
    }

    /// Before `key`'s record goes into `VIPS`: if another VIP holds its slot, mark the slot so
    /// the data plane looks `key` up in `VIPS`.
    pub(super) fn index_before_record(&mut self, key: &VipKey) -> Result<(), PublishError> {
        let index = vip_index_slot(key);
        let slot = self.index_slots()[index as usize];
        if slot.state & VIP_SLOT_VALID != 0
            && slot.key != *key
            && slot.state & VIP_SLOT_OVERFLOW == 0
        {
            self.write_index_slot(
                index,
                VipSlot {
                    state: slot.state | VIP_SLOT_OVERFLOW,
                    ..slot
                },
            )?;
        }
        Ok(())
    }

    /// After `key`'s record `info` went into `VIPS`: the slot gets it too, when free or its own.
    pub(super) fn index_after_record(
        &mut self,
        key: &VipKey,
        info: VipInfo,
    ) -> Result<(), PublishError> {
        let index = vip_index_slot(key);
        let slot = self.index_slots()[index as usize];
        let valid = slot.state & VIP_SLOT_VALID != 0;
        if valid && slot.key != *key {
            return Ok(()); // found through VIPS (the slot overflows)
        }
        self.place(index, *key, info, slot.state & VIP_SLOT_OVERFLOW)
    }

    /// Before `key`'s record leaves `VIPS`: its slot stops naming it.
    pub(super) fn index_remove(&mut self, key: &VipKey) -> Result<(), PublishError> {
        let index = vip_index_slot(key);
        let slot = self.index_slots()[index as usize];
        if slot.state & VIP_SLOT_VALID != 0 && slot.key == *key {
            self.invalidate(index, slot)?;
        }
        Ok(())
    }

    /// Clears `slot`'s valid bit, keeping the rest (the first of the two writes that take a
    /// slot away from its VIP).
    fn invalidate(&mut self, index: u32, slot: VipSlot) -> Result<(), PublishError> {
        self.write_index_slot(
            index,
            VipSlot {
                state: slot.state & !VIP_SLOT_VALID,
                ..slot
            },
        )
    }

    /// Makes the index match `VIPS` exactly (after records went out: a reload, a restart): a
    /// slot keeps its VIP if that is still in `VIPS`, a free slot takes a VIP of `VIPS` that
    /// maps to it, and a slot overflows exactly when some other VIP of `VIPS` maps to it.
    pub(super) fn index_rebuild(&mut self) -> Result<(), PublishError> {
        let mut by_slot: HashMap<u32, Vec<(VipKey, VipInfo)>> = HashMap::new();
        for entry in self.dataplane.maps.vips.iter() {
            let (key, info) = entry.map_err(|source| PublishError::Map {
                what: "VIPS",
                source,
            })?;
            by_slot
                .entry(vip_index_slot(&key))
                .or_default()
                .push((key, info));
        }
        for index in 0..VIP_INDEX_SLOTS {
            let slot = self.index_slots()[index as usize];
            let mut vips = by_slot.remove(&index).unwrap_or_default();
            vips.sort_unstable_by_key(|(k, _)| (k.addr, k.port_be, k.proto, k.family));
            let holder = vips
                .iter()
                .find(|(k, _)| slot.state & VIP_SLOT_VALID != 0 && *k == slot.key)
                .or(vips.first())
                .copied();
            let overflow = if vips.len() > 1 { VIP_SLOT_OVERFLOW } else { 0 };
            match holder {
                Some((key, info)) => {
                    if slot.state & VIP_SLOT_VALID != 0 && slot.key != key {
                        self.invalidate(index, slot)?;
                    }
                    self.place(index, key, info, overflow)?;
                }
                None if slot.state != 0 => {
                    // Invalid first, then the rest: a reader never sees a half-cleared key as
                    // valid.
                    if slot.state & VIP_SLOT_VALID != 0 {
                        self.index_remove(&slot.key)?;
                    }
                    self.write_index_slot(index, empty_slot())?;
                }
                None => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colliding_keys_exist_for_the_tests_that_need_them() {
        // The packet tests place two VIPs in one slot; make sure the slot function lets them.
        let a = VipKey::v4([10, 0, 0, 100], 80, 6);
        let slot = vip_index_slot(&a);
        let other = (1..=u16::MAX)
            .map(|port| VipKey::v4([10, 0, 0, 100], port, 17))
            .find(|k| vip_index_slot(k) == slot);
        assert!(
            other.is_some(),
            "no UDP port of 10.0.0.100 shares web's slot"
        );
    }
}
