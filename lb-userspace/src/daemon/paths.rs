//! Keeping every backend's path current: egress interface and MAC (the backend's own for L2
//! DSR, the next hop's for encapsulating VIPs, with the tunnel's source address and MTU).

use std::{net::IpAddr, time::Duration};

use tracing::{info, warn};

use super::RunError;
use crate::{
    balancer::{Balancer, L2Path, TunnelEnd},
    config::Forward,
    net::{Interface, NetError, NetlinkHandle, format_mac},
};

/// How long one backend's ARP/ND resolution may take before it counts as unresolved for now.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Resolves every backend's MAC and egress interface (concurrently) and republishes the VIPs
/// whose paths changed. An unresolved backend is out of its ring until it resolves.
pub(super) async fn refresh_paths(
    netlink: &NetlinkHandle,
    interface: &Interface,
    balancer: &mut Balancer,
) -> Result<(), RunError> {
    let targets: Vec<(usize, usize, IpAddr)> = balancer
        .vips
        .iter()
        .enumerate()
        .flat_map(|(v, vip)| {
            vip.backends
                .iter()
                .enumerate()
                .map(move |(b, be)| (v, b, be.address))
        })
        .collect();
    let lookups = targets.iter().map(|&(v, _, address)| {
        let vip = &balancer.vips[v];
        resolve(netlink, interface, address, vip.forward, &vip.encap_source)
    });
    let results = futures_util::future::join_all(lookups).await;
    let mut changed_vips = Vec::new();
    for (&(v, b, address), result) in targets.iter().zip(results) {
        let vip_name = balancer.vips[v].name.clone();
        let new_path = match result {
            Ok(path) => Some(path),
            Err(e) => {
                if balancer.vips[v].backends[b].path.is_some() {
                    warn!(vip = %vip_name, backend = %address, "backend no longer resolvable, out of the ring: {e}");
                } else {
                    warn!(vip = %vip_name, backend = %address, "backend unresolved, out of the ring until it resolves: {e}");
                }
                None
            }
        };
        let backend = &mut balancer.vips[v].backends[b];
        if backend.path != new_path {
            match &new_path {
                Some(p @ L2Path { tunnel: None, .. }) => info!(
                    vip = %vip_name,
                    backend = %address,
                    mac = %format_mac(&p.dst_mac),
                    via = if p.redirect { "redirect" } else { "XDP_TX" },
                    "backend reachable at {}",
                    format_mac(&p.dst_mac)
                ),
                Some(
                    p @ L2Path {
                        tunnel: Some(t), ..
                    },
                ) => info!(
                    vip = %vip_name,
                    backend = %address,
                    next_hop_mac = %format_mac(&p.dst_mac),
                    source = %t.source,
                    mtu = t.mtu,
                    via = if p.redirect { "redirect" } else { "XDP_TX" },
                    "backend reachable through a tunnel from {} (next hop {}, MTU {})",
                    t.source,
                    format_mac(&p.dst_mac),
                    t.mtu
                ),
                None => {}
            }
            backend.path = new_path;
            if !changed_vips.contains(&v) {
                changed_vips.push(v);
            }
        }
    }
    for v in changed_vips {
        let published = balancer.publish(v)?;
        super::events::log_flip(balancer, v, &published);
    }
    Ok(())
}

/// One backend's path for its VIP's forwarding mode.
async fn resolve(
    netlink: &NetlinkHandle,
    interface: &Interface,
    address: IpAddr,
    forward: Forward,
    encap_source: &[IpAddr],
) -> Result<L2Path, NetError> {
    if !forward.encapsulates() {
        let path = netlink.resolve_backend(address, RESOLVE_TIMEOUT).await?;
        return Ok(L2Path {
            dst_mac: path.mac,
            src_mac: path.egress.mac,
            ifindex: path.egress.index,
            redirect: path.egress.index != interface.index,
            tunnel: None,
        });
    }
    let path = netlink
        .resolve_tunnel(address, encap_source, RESOLVE_TIMEOUT)
        .await?;
    Ok(L2Path {
        dst_mac: path.mac,
        src_mac: path.egress.mac,
        ifindex: path.egress.index,
        redirect: path.egress.index != interface.index,
        tunnel: Some(TunnelEnd {
            source: path.source,
            mtu: u16::try_from(path.mtu).unwrap_or(u16::MAX),
        }),
    })
}
