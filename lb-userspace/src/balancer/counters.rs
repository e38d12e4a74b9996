//! VIP and `tx` totals, made of the backends' counters.
//!
//! The data plane counts a forwarded packet once, on its backend (`BACKEND_STATS`): a VIP's
//! counter and the `tx` reason counter would be two more per-CPU updates per packet. So a VIP's
//! totals are its carry (what its removed backends had counted) plus its backends' counters,
//! and `tx` is the sum over VIPs plus the carry of removed VIPs, less what was redirected (the
//! redirect outcomes are still counted per packet: a backend's counter cannot tell them).
//!
//! A removal moves a backend's counts into its VIP's carry, and a VIP's totals into the carry of
//! removed VIPs, before its id can be reused (which zeroes the id's counters): totals never go
//! down. The carries are the pinned `COUNTER_CARRY` map, so totals survive restarts like the
//! counters they complete; a rolled-back reload puts them back with the rest (`rollback`).

use lb_common::{Counters, Reason};

use super::{Balancer, VipState};
use crate::dataplane::DataPlaneError;

/// `tx` from the sum of everything forwarded (every VIP's totals and the removed VIPs' carry)
/// and the two redirect outcomes counted apart. Saturating: a counter read a moment later than
/// another must not make `tx` wrap.
pub fn derive_tx(forwarded: Counters, redirect: Counters, redirect_failed: Counters) -> Counters {
    Counters {
        packets: forwarded
            .packets
            .saturating_sub(redirect.packets)
            .saturating_sub(redirect_failed.packets),
        bytes: forwarded
            .bytes
            .saturating_sub(redirect.bytes)
            .saturating_sub(redirect_failed.bytes),
        new_flows: 0,
    }
}

impl Balancer {
    /// The carry entry of removed VIPs (after the one of each VIP id).
    fn removed_vips_carry(&self) -> u32 {
        self.dataplane.capacity.max_vips
    }

    /// `vip`'s totals: its carry plus its backends' counters.
    pub fn vip_counters(&self, vip: &VipState) -> Result<Counters, DataPlaneError> {
        self.totals(vip.id, vip.backends.iter().map(|b| b.id))
    }

    /// The carry of VIP `vip_id` plus the counters of `backend_ids`.
    fn totals(
        &self,
        vip_id: u32,
        backend_ids: impl IntoIterator<Item = u32>,
    ) -> Result<Counters, DataPlaneError> {
        let maps = &self.dataplane.maps;
        backend_ids
            .into_iter()
            .try_fold(maps.carry(vip_id)?, |sum, id| {
                Ok(sum + maps.backend_counters(id)?)
            })
    }

    /// Everything forwarded so far: every VIP's totals and the removed VIPs' carry.
    pub fn forwarded_counters(&self) -> Result<Counters, DataPlaneError> {
        self.vips
            .iter()
            .try_fold(self.removed_vips_counters()?, |sum, vip| {
                Ok(sum + self.vip_counters(vip)?)
            })
    }

    /// The counters of one verdict reason, `tx` derived (see the module docs).
    pub fn reason_counters(&self, reason: Reason) -> Result<Counters, DataPlaneError> {
        let maps = &self.dataplane.maps;
        match reason {
            Reason::Tx => Ok(derive_tx(
                self.forwarded_counters()?,
                maps.reason_counters(Reason::Redirect)?,
                maps.reason_counters(Reason::DropRedirectFailed)?,
            )),
            _ => maps.reason_counters(reason),
        }
    }

    /// The carry of removed VIPs, for a snapshot that sums the VIPs itself.
    pub fn removed_vips_counters(&self) -> Result<Counters, DataPlaneError> {
        self.dataplane.maps.carry(self.removed_vips_carry())
    }

    /// Adds what backend `backend_id` counted to the carry of VIP `vip_id` (the backend leaves
    /// it; its id may be reused and zeroed).
    pub(super) fn carry_backend(
        &mut self,
        vip_id: u32,
        backend_id: u32,
    ) -> Result<(), DataPlaneError> {
        let maps = &mut self.dataplane.maps;
        let carry = maps.carry(vip_id)? + maps.backend_counters(backend_id)?;
        maps.set_carry(vip_id, carry)
    }

    /// Moves the totals of VIP `vip_id` with backends `backend_ids` (its carry and their
    /// counters) into the carry of removed VIPs, and zeroes its own carry.
    pub(super) fn carry_vip(
        &mut self,
        vip_id: u32,
        backend_ids: impl IntoIterator<Item = u32>,
    ) -> Result<(), DataPlaneError> {
        let removed = self.removed_vips_carry();
        let total = self.removed_vips_counters()? + self.totals(vip_id, backend_ids)?;
        let maps = &mut self.dataplane.maps;
        maps.set_carry(removed, total)?;
        maps.set_carry(vip_id, Counters::default())
    }

    /// Starts a new VIP's carry at zero: whatever an earlier VIP of that id left was moved to
    /// the removed VIPs' carry when it went.
    pub(super) fn start_carry(&mut self, vip_id: u32) -> Result<(), DataPlaneError> {
        self.dataplane.maps.set_carry(vip_id, Counters::default())
    }

    /// Every carry entry, for a rollback to put back.
    pub(super) fn carries(&self) -> Result<Vec<Counters>, DataPlaneError> {
        (0..=self.removed_vips_carry())
            .map(|index| self.dataplane.maps.carry(index))
            .collect()
    }

    /// Writes back what [`Balancer::carries`] read.
    pub(super) fn restore_carries(&mut self, carries: &[Counters]) -> Result<(), DataPlaneError> {
        for (index, &carry) in (0..).zip(carries) {
            self.dataplane.maps.set_carry(index, carry)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(packets: u64, bytes: u64, new_flows: u64) -> Counters {
        Counters {
            packets,
            bytes,
            new_flows,
        }
    }

    #[test]
    fn tx_is_what_was_forwarded_less_the_redirects() {
        assert_eq!(
            derive_tx(
                counters(10, 1000, 4),
                counters(3, 300, 0),
                counters(1, 60, 0)
            ),
            counters(6, 640, 0)
        );
        // A redirect counted a moment after the backends were read must not wrap.
        assert_eq!(
            derive_tx(counters(2, 100, 1), counters(3, 300, 0), counters(0, 0, 0)),
            counters(0, 0, 0)
        );
    }

    #[test]
    fn counters_add_field_by_field() {
        assert_eq!(
            counters(1, 2, 3) + counters(10, 20, 30),
            counters(11, 22, 33)
        );
    }
}
