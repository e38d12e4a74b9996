//! Keeping every backend's L2 path (egress interface and MAC) current.

use std::{net::IpAddr, time::Duration};

use tracing::{info, warn};

use super::RunError;
use crate::{
    balancer::{Balancer, L2Path},
    net::{Interface, NetlinkHandle, format_mac},
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
    let lookups = targets
        .iter()
        .map(|&(_, _, address)| netlink.resolve_backend(address, RESOLVE_TIMEOUT));
    let results = futures_util::future::join_all(lookups).await;
    let mut changed_vips = Vec::new();
    for (&(v, b, address), result) in targets.iter().zip(results) {
        let vip_name = balancer.vips[v].name.clone();
        let new_path = match result {
            Ok(path) => Some(L2Path {
                dst_mac: path.mac,
                src_mac: path.egress.mac,
                ifindex: path.egress.index,
                redirect: path.egress.index != interface.index,
            }),
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
            if let Some(p) = &new_path {
                info!(
                    vip = %vip_name,
                    backend = %address,
                    mac = %format_mac(&p.dst_mac),
                    via = if p.redirect { "redirect" } else { "XDP_TX" },
                    "backend reachable at {}",
                    format_mac(&p.dst_mac)
                );
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
