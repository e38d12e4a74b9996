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
        let owners: Vec<u32> = table.iter().map(|slot| slot.owner).collect();
        Ok(ring_digest(vip, &owners))
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use lb_common::{NO_BACKEND, VipKey};

    use super::*;
    use crate::{
        balancer::{Admin, BackendState, L2Path, ring_for},
        config::{OnAllDown, Protocol},
        health::Health,
        pool::ActivePool,
    };

    const RING: u32 = 65537;

    /// (address, weight, standby, up) of each backend, in config order, with these ids.
    fn vip(backends: &[(&str, u32, bool, bool)], ids: &[u32]) -> VipState {
        VipState {
            id: 0,
            name: "web".into(),
            key: VipKey::v4([10, 0, 0, 100], 80, 6),
            address: "10.0.0.100".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            active_ring: 0,
            min_healthy: 1,
            on_all_down: OnAllDown::Drop,
            forward: crate::config::Forward::L2,
            encap_source: Vec::new(),
            check_through_tunnel: false,
            active_pool: ActivePool::None,
            backends: backends
                .iter()
                .zip(ids)
                .map(|(&(address, weight, standby, up), &id)| BackendState {
                    id,
                    address: address.parse().unwrap(),
                    weight,
                    standby,
                    health: if up { Health::Up } else { Health::Down },
                    path: Some(L2Path {
                        dst_mac: [2, 0, 0, 0, 0, id as u8],
                        src_mac: [2, 0, 0, 0, 0, 2],
                        ifindex: 2,
                        redirect: false,
                        tunnel: None,
                    }),
                    admin: Admin::Enabled,
                    held_until: None,
                })
                .collect(),
        }
    }

    /// The table with each slot's owner as an address: what must be equal on every node.
    fn by_address(vip: &VipState) -> Vec<Option<IpAddr>> {
        ring_for(vip, RING)
            .into_iter()
            .map(|id| {
                (id != NO_BACKEND)
                    .then(|| vip.backends.iter().find(|b| b.id == id).unwrap().address)
            })
            .collect()
    }

    fn digest(vip: &VipState) -> String {
        ring_digest(vip, &ring_for(vip, RING))
    }

    #[test]
    fn the_ring_depends_on_addresses_weights_and_health_not_on_ids_or_order() {
        let backends = [
            ("10.0.0.11", 100, false, true),
            ("10.0.0.12", 300, false, true),
            ("10.0.0.13", 100, false, false),
            ("10.0.0.14", 100, true, true),
            ("10.0.0.15", 50, false, true),
        ];
        let node_a = vip(&backends, &[0, 1, 2, 3, 4]);
        let mut reordered = backends;
        reordered.reverse();
        reordered.swap(1, 3);
        let node_b = vip(&reordered, &[907, 12, 4000, 3, 77]);
        assert_eq!(by_address(&node_a), by_address(&node_b));
        assert_eq!(digest(&node_a), digest(&node_b));
        assert_eq!(digest(&node_a).len(), 16);

        // Equal weights take the round-robin path of the Maglev build: the same holds.
        let equal: Vec<_> = backends
            .iter()
            .map(|&(a, _, s, u)| (a, 100, s, u))
            .collect();
        let mut equal_reordered = equal.clone();
        equal_reordered.rotate_left(2);
        assert_eq!(
            by_address(&vip(&equal, &[0, 1, 2, 3, 4])),
            by_address(&vip(&equal_reordered, &[9, 8, 7, 6, 5]))
        );
    }

    #[test]
    fn the_digest_changes_with_what_decides_a_slot() {
        let backends = [
            ("10.0.0.11", 100, false, true),
            ("10.0.0.12", 100, false, true),
            ("10.0.0.13", 100, false, true),
        ];
        let base = digest(&vip(&backends, &[0, 1, 2]));
        let mut reweighted = backends;
        reweighted[0].1 = 200;
        let mut down = backends;
        down[1].3 = false;
        let mut other_address = backends;
        other_address[2].0 = "10.0.0.23";
        for (what, changed) in [
            ("a weight", reweighted),
            ("health", down),
            ("an address", other_address),
        ] {
            assert_ne!(base, digest(&vip(&changed, &[0, 1, 2])), "{what} changed");
        }
        // An empty ring has a digest too, the same everywhere.
        let none_up: Vec<_> = backends
            .iter()
            .map(|&(a, w, s, _)| (a, w, s, false))
            .collect();
        assert_eq!(
            digest(&vip(&none_up, &[0, 1, 2])),
            digest(&vip(&none_up[..1], &[5]))
        );
    }
}
