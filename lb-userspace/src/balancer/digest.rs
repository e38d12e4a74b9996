//! A digest of a VIP's live ring by backend address, for `lb status`: two nodes whose digests
//! are equal send every new flow of that VIP to the same backend.

use super::{Balancer, VipState};
use crate::{dataplane::DataPlaneError, maglev::table_digest};

/// The digest of `table` (slots as backend ids of `vip`) with each id replaced by its backend's
/// address: 16 hex digits. Ids are node-local, addresses are not.
pub fn ring_digest(vip: &VipState, table: &[u32]) -> String {
    let keys: std::collections::HashMap<u32, Vec<u8>> = vip
        .backends
        .iter()
        .map(|b| (b.id, b.address.to_string().into_bytes()))
        .collect();
    // An id that is no backend of this VIP (an empty slot) digests as an empty owner.
    let owners = table
        .iter()
        .map(|id| keys.get(id).map_or(&[][..], Vec::as_slice));
    format!("{:016x}", table_digest(owners))
}

impl Balancer {
    /// [`ring_digest`] of the table the data plane is using now for the VIP at `vip_index`.
    pub fn live_ring_digest(&self, vip_index: usize) -> Result<String, DataPlaneError> {
        let vip = &self.vips[vip_index];
        let table = self
            .dataplane
            .maps
            .rings
            .read_table(vip.id * 2 + (vip.active_ring & 1))?;
        Ok(ring_digest(vip, &table))
    }
}
