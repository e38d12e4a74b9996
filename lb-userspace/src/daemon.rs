//! `lb run`: load, fill the maps, attach, keep the backends' L2 paths fresh, and on SIGINT or
//! SIGTERM detach and report the final counters.

use std::{net::IpAddr, time::Duration};

use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{
    balancer::{Balancer, L2Path, capacity_of},
    config::{Config, XdpModeSetting},
    dataplane::{AttachMode, DataPlane},
    net::{Interface, NetlinkHandle, format_mac},
    stats::Snapshot,
};

/// How long one backend's ARP/ND resolution may take before it counts as unresolved for now.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often unresolved backends are retried and resolved ones re-checked (a backend's MAC can
/// change when its address moves to another host).
const REFRESH_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    #[error(transparent)]
    DataPlane(#[from] crate::dataplane::DataPlaneError),
    #[error(transparent)]
    Publish(#[from] crate::balancer::PublishError),
    #[error("installing the signal handler: {0}")]
    Signal(#[source] std::io::Error),
}

/// Runs the load balancer until SIGINT or SIGTERM; returns the final counters.
pub async fn run(config: Config) -> Result<Snapshot, RunError> {
    let netlink = NetlinkHandle::new()?;
    let interface = netlink.interface_by_name(&config.interface).await?;
    raise_memlock_limit();

    let dataplane = DataPlane::load(capacity_of(&config))?;
    let mut balancer = Balancer::new(dataplane, &config);
    refresh_paths(&netlink, &interface, &mut balancer).await?;

    let mode = attach(&mut balancer.dataplane, &interface, config.xdp_mode)?;
    let backends: usize = balancer.vips.iter().map(|v| v.backends.len()).sum();
    info!(
        interface = %interface.name,
        mode = mode.name(),
        vips = balancer.vips.len(),
        backends,
        "XDP load balancer attached to {} in {} mode",
        interface.name,
        mode.name()
    );
    if mode == AttachMode::Native && interface.kind.as_deref() == Some("veth") {
        warn!(
            "{} is a veth: frames sent with native XDP_TX reach its peer only if the peer runs an XDP \
             program (an XDP_PASS one will do), and senders on veths need `ethtool -K <if> tx off` \
             (see README, \"Containers and veth\")",
            interface.name
        );
    }

    let mut sigterm = signal(SignalKind::terminate()).map_err(RunError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(RunError::Signal)?;
    let mut refresh = tokio::time::interval(REFRESH_INTERVAL);
    refresh.tick().await; // the first tick is immediate; paths were just resolved
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: detaching"); break; }
            _ = sigint.recv() => { info!("SIGINT: detaching"); break; }
            _ = refresh.tick() => {
                if let Err(e) = refresh_paths(&netlink, &interface, &mut balancer).await {
                    warn!("refreshing backend paths failed: {e}");
                }
            }
        }
    }
    let snapshot = Snapshot::read(&balancer)?;
    balancer.dataplane.detach()?;
    info!("detached from {}", interface.name);
    Ok(snapshot)
}

/// Attaches as the config asks; `auto` tries native first and falls back to generic (skb) XDP.
fn attach(
    dataplane: &mut DataPlane,
    interface: &Interface,
    setting: XdpModeSetting,
) -> Result<AttachMode, RunError> {
    let native = || AttachMode::Native;
    match setting {
        XdpModeSetting::Native => dataplane.attach(&interface.name, interface.index, native())?,
        XdpModeSetting::Skb => {
            dataplane.attach(&interface.name, interface.index, AttachMode::Skb)?
        }
        XdpModeSetting::Auto => {
            if let Err(e) = dataplane.attach(&interface.name, interface.index, native()) {
                warn!(
                    "native XDP on {} failed ({e}); falling back to generic (skb) mode",
                    interface.name
                );
                dataplane.attach(&interface.name, interface.index, AttachMode::Skb)?;
                return Ok(AttachMode::Skb);
            }
        }
    }
    Ok(match setting {
        XdpModeSetting::Skb => AttachMode::Skb,
        XdpModeSetting::Native | XdpModeSetting::Auto => AttachMode::Native,
    })
}

/// Resolves every backend's MAC and egress interface (concurrently) and republishes the VIPs
/// whose paths changed. An unresolved backend is out of its ring until it resolves.
async fn refresh_paths(
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
        balancer.publish(v)?;
    }
    Ok(())
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it so big rings load there too.
/// Newer kernels charge the memory cgroup instead, so failing here is only worth a debug line.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass and has no other effect on memory.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(
            "could not raise RLIMIT_MEMLOCK ({}); only kernels before 5.11 need it",
            std::io::Error::last_os_error()
        );
    }
}
