//! Writing the model into the maps, in the order that keeps every packet consistent:
//! backend records first, then the inactive ring table, then the VIP record that flips to it.

use lb_common::{BACKEND_F_REDIRECT, BACKEND_F_UP, Backend, NO_BACKEND, VipInfo};

use super::{BackendState, Balancer, VipState};
use crate::{
    dataplane::DataPlaneError,
    maglev::{MaglevBackend, build_table},
};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("no VIP with index {0}")]
    NoSuchVip(usize),
    #[error("no backend with index {backend} in VIP `{vip}`")]
    NoSuchBackend { vip: String, backend: usize },
    #[error(transparent)]
    DataPlane(#[from] DataPlaneError),
    #[error("writing {what}: {source}")]
    Map {
        what: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("writing TX_PORTS: {0}")]
    TxPort(#[source] aya::maps::xdp::XdpMapError),
}

fn backend_record(vip_id: u32, backend: &BackendState) -> Backend {
    let mut addr = [0u8; 16];
    match backend.address {
        std::net::IpAddr::V4(a) => addr[..4].copy_from_slice(&a.octets()),
        std::net::IpAddr::V6(a) => addr = a.octets(),
    }
    let (dst_mac, src_mac, ifindex, redirect) = match backend.path {
        Some(p) => (p.dst_mac, p.src_mac, p.ifindex, p.redirect),
        None => ([0; 6], [0; 6], 0, false),
    };
    let mut flags = 0;
    if backend.reachable() {
        flags |= BACKEND_F_UP;
    }
    if redirect {
        flags |= BACKEND_F_REDIRECT;
    }
    Backend {
        addr,
        dst_mac,
        src_mac,
        flags,
        ifindex,
        vip_id,
    }
}

/// The Maglev table of a VIP's usable backends, as backend ids.
pub fn ring_for(vip: &VipState, ring_size: u32) -> Vec<u32> {
    let keys: Vec<Vec<u8>> = vip
        .backends
        .iter()
        .map(|b| b.address.to_string().into_bytes())
        .collect();
    let candidates: Vec<MaglevBackend<'_>> = vip
        .backends
        .iter()
        .zip(&keys)
        .map(|(b, key)| MaglevBackend {
            key,
            weight: if b.in_ring() { b.weight } else { 0 },
        })
        .collect();
    build_table(&candidates, ring_size)
        .into_iter()
        .map(|i| {
            if i == NO_BACKEND {
                NO_BACKEND
            } else {
                vip.backends[i as usize].id
            }
        })
        .collect()
}

impl Balancer {
    /// Writes every VIP (used at start-up, before the program is attached).
    pub fn publish_all(&mut self) -> Result<(), PublishError> {
        for i in 0..self.vips.len() {
            self.publish(i)?;
        }
        Ok(())
    }

    /// Writes one VIP: its backend records, a fresh Maglev table into the inactive ring, then
    /// the VIP record pointing at it. Packets in flight see either the old table or the new one.
    pub fn publish(&mut self, vip_index: usize) -> Result<(), PublishError> {
        let vip = self
            .vips
            .get(vip_index)
            .ok_or(PublishError::NoSuchVip(vip_index))?;
        let maps = &mut self.dataplane.maps;
        for backend in &vip.backends {
            let record = backend_record(vip.id, backend);
            if record.flags & BACKEND_F_REDIRECT != 0 {
                maps.tx_ports
                    .set(backend.id, record.ifindex, None, 0)
                    .map_err(PublishError::TxPort)?;
            }
            maps.backends
                .set(backend.id, record, 0)
                .map_err(|source| PublishError::Map {
                    what: "BACKENDS",
                    source,
                })?;
        }
        let table = ring_for(vip, maps.rings.ring_size());
        let next = 1 - (vip.active_ring & 1);
        maps.rings.write_table(vip.id * 2 + next, &table)?;
        let info = VipInfo {
            id: vip.id,
            flags: 0,
            active_ring: next,
            _pad: 0,
        };
        maps.vips
            .insert(vip.key, info, 0)
            .map_err(|source| PublishError::Map {
                what: "VIPS",
                source,
            })?;
        self.vips[vip_index].active_ring = next;
        Ok(())
    }

    /// Updates a backend's L2 path and republishes its VIP.
    pub fn set_path(
        &mut self,
        vip_index: usize,
        backend_index: usize,
        path: Option<super::L2Path>,
    ) -> Result<(), PublishError> {
        self.backend_mut(vip_index, backend_index)?.path = path;
        self.publish(vip_index)
    }

    /// Marks a backend up or down and republishes its VIP.
    pub fn set_up(
        &mut self,
        vip_index: usize,
        backend_index: usize,
        up: bool,
    ) -> Result<(), PublishError> {
        self.backend_mut(vip_index, backend_index)?.up = up;
        self.publish(vip_index)
    }

    /// Changes a backend's weight (0 drains) and republishes its VIP.
    pub fn set_weight(
        &mut self,
        vip_index: usize,
        backend_index: usize,
        weight: u32,
    ) -> Result<(), PublishError> {
        self.backend_mut(vip_index, backend_index)?.weight = weight;
        self.publish(vip_index)
    }

    fn backend_mut(
        &mut self,
        vip_index: usize,
        backend_index: usize,
    ) -> Result<&mut BackendState, PublishError> {
        let vip = self
            .vips
            .get_mut(vip_index)
            .ok_or(PublishError::NoSuchVip(vip_index))?;
        let name = vip.name.clone();
        vip.backends
            .get_mut(backend_index)
            .ok_or(PublishError::NoSuchBackend {
                vip: name,
                backend: backend_index,
            })
    }
}
