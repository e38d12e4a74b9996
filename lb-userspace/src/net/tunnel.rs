//! Where an encapsulated backend is reached: the kernel's route to it (gateways allowed), the
//! next hop's MAC, the outer source address and the egress MTU.
//!
//! Resolved by the daemon as it resolves L2 backends, not per packet with `bpf_fib_lookup`: the
//! route and the next hop's MAC change rarely and the daemon refreshes them, while a FIB lookup
//! in XDP would cost every packet (see BENCHMARKS.md).

use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

use super::{Interface, NetError, NetlinkHandle};

/// How encapsulated packets reach a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelPath {
    pub backend: IpAddr,
    /// The router on the way, or `None` when the backend is on a connected network.
    pub gateway: Option<IpAddr>,
    /// The MAC of the next hop (the gateway, or the backend itself).
    pub mac: [u8; 6],
    pub egress: Interface,
    /// The outer source: the configured one of the backend's family, else the route's preferred
    /// source.
    pub source: IpAddr,
    /// The smaller of the interface MTU and the route's MTU.
    pub mtu: u32,
}

impl NetlinkHandle {
    /// Resolves the tunnel path to `backend`. `sources` are the configured `encap_source`
    /// addresses (one per family at most).
    ///
    /// Errors as [`NetlinkHandle::resolve_backend`] (a gateway on the route is fine here), and
    /// [`NetError::NoSource`] when no source address of the backend's family is known.
    pub async fn resolve_tunnel(
        &self,
        backend: IpAddr,
        sources: &[IpAddr],
        timeout: Duration,
    ) -> Result<TunnelPath, NetError> {
        let backend = super::neighbour::validate(backend)?;
        let started = Instant::now();
        let deadline = started
            .checked_add(timeout)
            .unwrap_or_else(|| started + Duration::from_secs(365 * 24 * 3600));
        let hop = self.hop(backend).await?;
        let egress = self.interface_by_index(hop.oif).await?;
        let source = sources
            .iter()
            .copied()
            .find(|s| s.is_ipv4() == backend.is_ipv4())
            .or(hop.source)
            .ok_or_else(|| NetError::NoSource {
                backend,
                interface: egress.name.clone(),
            })?;
        let next_hop = hop.gateway.unwrap_or(backend);
        let mac = self
            .neighbour_mac(next_hop, &egress, started, deadline)
            .await
            .map_err(|source| match hop.gateway {
                Some(gateway) => NetError::Gateway {
                    backend,
                    gateway,
                    source: Box::new(source),
                },
                None => source,
            })?;
        let mtu = hop.mtu.map_or(egress.mtu, |route| route.min(egress.mtu));
        Ok(TunnelPath {
            backend,
            gateway: hop.gateway,
            mac,
            egress,
            source,
            mtu,
        })
    }
}
