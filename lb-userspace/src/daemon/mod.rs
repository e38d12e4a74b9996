//! `lb run`: load the program (adopting what a previous daemon left pinned), start the health
//! checks, fill the maps, attach; then apply every health change, path change, operator command
//! and reload (`lb reload`, SIGHUP) as it happens; on SIGINT or SIGTERM report the final counters
//! and leave the program forwarding on the pinned state (or, with nothing pinned, detach it).

mod attach;
mod control;
mod events;
mod paths;
mod reload;
mod startup;
mod sync;
mod telemetry;

use std::{path::Path, time::Duration};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{info, warn};

use crate::{
    announce::Announcer,
    api::model::Command,
    balancer::{Balancer, ReconcileError},
    config::Config,
    daemon::{control::ReloadReply, reload::Running, telemetry::Telemetry},
    dataplane::{AttachMode, PinnedState},
    health::{
        Health,
        schedule::CheckReport,
        supervisor::{CheckSpec, Supervisor},
    },
    net::NetlinkHandle,
    stats::Snapshot,
};

/// How often unresolved backends are retried and resolved ones re-checked (a backend's MAC can
/// change when its address moves to another host).
const REFRESH_INTERVAL: Duration = Duration::from_secs(5);
/// How often the metrics are refreshed from the data plane's counters.
const METRICS_INTERVAL: Duration = Duration::from_secs(1);
/// Most check results applied together (one map update per VIP for the lot).
const MAX_BATCH: usize = 1024;
/// Least time between two path refreshes made because a backend came up without a path (a
/// refresh may wait for ARP).
const EARLY_REFRESH_SPACING: Duration = Duration::from_secs(1);
/// How often flow holds are checked for their end (they last a second or more).
const HOLD_TICK: Duration = Duration::from_millis(50);
/// How often the loop checks whether a flow sweep is due.
const SWEEP_CHECK: Duration = Duration::from_secs(1);
/// How often the announcements are checked against the kernel table and the file (and failed
/// writes retried).
const ANNOUNCE_RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// Extra time, beyond the longest check timeout, that start-up waits for every first result.
const FIRST_RESULTS_GRACE: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    #[error(transparent)]
    DataPlane(#[from] crate::dataplane::DataPlaneError),
    #[error(transparent)]
    Publish(#[from] crate::balancer::PublishError),
    #[error(transparent)]
    Reconcile(Box<ReconcileError>),
    #[error(transparent)]
    Telemetry(#[from] telemetry::TelemetryError),
    #[error(transparent)]
    Dns(#[from] crate::dns::DnsError),
    #[error("installing the signal handler: {0}")]
    Signal(#[source] std::io::Error),
}

impl From<ReconcileError> for RunError {
    fn from(e: ReconcileError) -> Self {
        RunError::Reconcile(Box::new(e))
    }
}

/// Runs the load balancer on `config` (read from `path`, which reloads re-read) until SIGINT or
/// SIGTERM; returns the final counters.
pub async fn run(config: Config, path: &Path) -> Result<Snapshot, RunError> {
    // Taken over first: a signal during start-up (a reload, a stop) waits for the loop instead
    // of killing the process half-way through pinning and attaching.
    let mut sigterm = signal(SignalKind::terminate()).map_err(RunError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(RunError::Signal)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(RunError::Signal)?;
    let netlink = NetlinkHandle::new()?;
    let interface = netlink.interface_by_name(&config.interface).await?;
    attach::raise_memlock_limit();

    let (dataplane, pinned) = startup::load(&config)?;
    let adopting = pinned == Some(PinnedState::Adopted);
    let mut balancer = Balancer::empty(dataplane);
    // Until the program is attached nothing is forwarded (unless a previous daemon's program
    // is: adoption), so the rings' start-up changes, backends coming up one by one, get no
    // priors: every node starts with the same unchanged slots whatever order its checks and
    // MACs came in.
    balancer.keeps_priors = adopting;
    if adopting {
        let adopted = balancer.adopt(&config)?;
        startup::log_adopted(&balancer, &adopted);
    }
    balancer.reconcile(&config)?;
    balancer.flow_hold = crate::announce::flow_hold(&config);
    // Before any check runs: a node that starts from nothing withdraws what a dead daemon left
    // announced; one that adopts a forwarding data plane keeps its announcements for now.
    let mut announcer = Announcer::start(
        config.announce.clone(),
        netlink.clone(),
        &interface,
        adopting,
        &balancer,
    )
    .await;
    let (report_tx, mut reports) = mpsc::channel::<CheckReport>(1024);
    let mut supervisor = Supervisor::new(report_tx);
    supervisor.sync(wanted_checks(&balancer, &config));

    // Before attaching: every backend's first check result and L2 path, so the first packet
    // already finds the healthy backends in their rings and no dead one.
    paths::refresh_paths(&netlink, &interface, &mut balancer).await?;
    startup::collect_first_results(&mut balancer, &mut supervisor, &mut reports).await?;
    balancer.publish_all()?;
    // Before attaching and announcing: the flows the peers recorded, so connections that began
    // on another node inside a change window keep their backends when they come here.
    let mut sync_handle = sync::start(config.sync.as_ref(), &mut balancer, true);
    if let Some(handle) = sync_handle.as_mut() {
        sync::pull(&mut balancer, handle).await;
    }
    // The control API is on by default (`api` has a default path), so a clash with another
    // daemon's socket must not keep the load balancer from balancing: it runs without its API
    // and says so loudly.
    let (command_tx, mut commands) = mpsc::channel::<Command>(64);
    let (api_stop, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let api_server = match crate::api::server::bind(&config.api) {
        Ok(listener) => Some(tokio::spawn(crate::api::server::serve_on(
            listener,
            command_tx,
            async {
                let _ = api_stopped.await;
            },
        ))),
        Err(e) => {
            tracing::error!(
                "control API disabled: {e}; `lb status` and friends cannot reach this daemon \
                 (give each lb its own `api` path)"
            );
            None
        }
    };
    let telemetry = match config.metrics {
        Some(address) => Some(Telemetry::start(address, &balancer).await?),
        None => None,
    };

    let requested = attach::attach(&mut balancer.dataplane, &interface, config.xdp_mode)?;
    let attachment = balancer.dataplane.attachment();
    // An adopted link keeps the mode it was made with; the kernel says which.
    let mode = attachment.and_then(|a| a.mode).unwrap_or(requested);
    if attachment.is_some_and(|a| a.adopted) {
        info!(
            interface = %interface.name,
            "took over the running XDP link on {}: the new program replaced the old one atomically",
            interface.name
        );
        if mode != requested && config.xdp_mode != crate::config::XdpModeSetting::Auto {
            warn!(
                "xdp_mode = \"{}\" asks for {} mode, but the adopted link runs in {} mode (a \
                 link keeps its mode); `lb detach --interface {}` and a restart change it",
                config.xdp_mode,
                requested.name(),
                mode.name(),
                interface.name
            );
        }
    }
    startup::log_attached(&balancer, &interface.name, mode);
    balancer.keeps_priors = true;
    // First results in, rings published, program attached: now the node may pull traffic.
    announcer.set_ready(&balancer).await;
    if mode == AttachMode::Native && interface.kind.as_deref() == Some("veth") {
        warn!(
            "{} is a veth: frames sent with native XDP_TX reach its peer only if the peer runs an XDP \
             program (an XDP_PASS one will do), and senders on veths need `ethtool -K <if> tx off` \
             (see README, \"Containers and veth\")",
            interface.name
        );
    }

    // After the announcements are ready: a VIP address is answered once it can serve.
    let dns = match &config.dns {
        Some(settings) => {
            Some(crate::dns::DnsService::start(settings, &config.vips, announcer.decision()).await?)
        }
        None => None,
    };

    let mut running = Running {
        path: path.to_path_buf(),
        config,
        telemetry,
        announcer,
        sync: sync_handle,
        parked_events: None,
        dns,
    };
    let mut refresh = tokio::time::interval(REFRESH_INTERVAL);
    refresh.tick().await; // the first tick is immediate; paths were just resolved
    let mut metrics_tick = tokio::time::interval(METRICS_INTERVAL);
    // The flow sweep (see `Balancer::sweep_flows`) runs every `sweep_interval`, checked each
    // second so a reload that changes the idle timeouts takes effect without a new timer.
    let mut sweep_tick = tokio::time::interval(SWEEP_CHECK);
    let mut last_sweep = std::time::Instant::now();
    // Ends flow holds (several nodes: a backend taken down keeps its flows for a moment).
    let mut hold_tick = tokio::time::interval(HOLD_TICK);
    let mut last_early_refresh = std::time::Instant::now();
    // Repairs announcements the kernel or somebody else changed, and retries failed writes.
    let mut announce_tick = tokio::time::interval(ANNOUNCE_RETRY_INTERVAL);
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { info!("SIGINT: stopping"); break; }
            Some(report) = reports.recv() => {
                // Take whatever else is already waiting, so simultaneous failures are applied
                // with one map update per VIP.
                let mut batch = vec![report];
                while batch.len() < MAX_BATCH {
                    match reports.try_recv() {
                        Ok(more) => batch.push(more),
                        Err(_) => break,
                    }
                }
                if let Some(telemetry) = &running.telemetry {
                    telemetry.observe(&balancer, &batch);
                }
                match events::on_check_reports(&mut balancer, &mut supervisor, &batch, true) {
                    // A backend passes its checks again but lost its MAC (a link went down and
                    // up): resolve now rather than at the next periodic refresh.
                    Ok(true) if last_early_refresh.elapsed() >= EARLY_REFRESH_SPACING => {
                        last_early_refresh = std::time::Instant::now();
                        if let Err(e) = paths::refresh_paths(&netlink, &interface, &mut balancer).await {
                            warn!("resolving backends that came up failed: {e}");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => warn!("applying a health change failed: {e}"),
                }
            }
            _ = metrics_tick.tick(), if running.telemetry.is_some() => {
                if let Some(telemetry) = &running.telemetry {
                    telemetry.refresh(&balancer, running.announcer.decision(), running.sync.as_ref());
                    telemetry.set_dns(running.dns.as_ref());
                }
            }
            _ = sweep_tick.tick(), if last_sweep.elapsed() >= balancer.idle.sweep_interval() => {
                last_sweep = std::time::Instant::now();
                sweep(&mut balancer, running.telemetry.as_ref());
                if let Some(handle) = running.sync.as_mut() {
                    sync::refresh(&balancer, handle);
                }
            }
            Some(message) = sync::next(&mut running.sync) => {
                if let Some(handle) = running.sync.as_mut() {
                    sync::handle(message, &mut balancer, handle);
                }
            }
            _ = sighup.recv() => {
                info!("SIGHUP: reloading {}", running.path.display());
                reload_then_resolve(&mut running, &mut balancer, &mut supervisor, &netlink, &interface, None).await;
            }
            Some(command) = commands.recv() => {
                if let Some(reply) = control::handle(&mut balancer, &supervisor, &running.announcer, running.sync.as_ref(), running.dns.as_ref(), command) {
                    reload_then_resolve(&mut running, &mut balancer, &mut supervisor, &netlink, &interface, Some(reply)).await;
                }
            }
            _ = announce_tick.tick() => running.announcer.resync().await,
            Some(report) = next_dns_report(&mut running.dns) => {
                if let Some(dns) = running.dns.as_mut() {
                    dns.record(&report);
                }
            }
            _ = hold_tick.tick(), if balancer.holds_flows() => {
                match balancer.end_flow_holds(std::time::Instant::now()) {
                    Ok(released) => events::log_released(&balancer, &released),
                    Err(e) => warn!("ending a flow hold failed: {e}"),
                }
            }
            _ = refresh.tick() => {
                if let Err(e) = paths::refresh_paths(&netlink, &interface, &mut balancer).await {
                    warn!("refreshing backend paths failed: {e}");
                }
            }
        }
        // Whatever happened may have changed what this node can serve: the announcements
        // follow at once (a cheap comparison when nothing changed).
        running.announcer.update(&balancer).await;
        if let Some(dns) = running.dns.as_mut() {
            dns.update(running.announcer.decision());
        }
        if let Some(handle) = &running.sync {
            handle.update_view(&balancer);
        }
    }
    drop(supervisor);
    running.dns = None;
    if let Some(handle) = running.sync.take() {
        handle.stop().await;
    }
    // Nobody reads the events until the next daemon turns them on again.
    if let Err(e) = balancer.dataplane.set_flow_events(false) {
        warn!("sync: switching the data plane's flow events off: {e}");
    }
    if let Some(telemetry) = running.telemetry.take() {
        telemetry.stop().await;
    }
    let _ = api_stop.send(());
    if let Some(api_server) = api_server {
        let _ = api_server.await;
    }
    let snapshot = Snapshot::read(&balancer)?;
    match balancer.dataplane.pinned() {
        Some(dir) => info!(
            interface = %interface.name,
            "leaving the XDP program on {} forwarding with the last state (maps and link pinned \
             in {}): health checks have stopped, so backend failures are no longer acted on; \
             the next `lb run` takes over without dropping a flow, `lb detach --interface {}` \
             removes it",
            interface.name,
            dir.display(),
            interface.name
        ),
        None => {
            balancer.dataplane.detach()?;
            info!("detached from {}", interface.name);
            running
                .announcer
                .withdraw_all("the daemon stopped and its program is detached")
                .await;
        }
    }
    Ok(snapshot)
}

/// The DNS responder's next check report; pending forever without `[dns]`.
async fn next_dns_report(dns: &mut Option<crate::dns::DnsService>) -> Option<CheckReport> {
    match dns {
        Some(service) => service.next_report().await,
        None => std::future::pending().await,
    }
}

/// What the supervisor should be checking for `config`: every backend, by its data-plane id,
/// starting from the health the model has for it (unknown for a new one, up for one a restarted
/// daemon adopted as up). After a reconcile the model lists VIPs and backends in config order.
/// One flow sweep: idle flows forgotten, quiet changed slots returned to unchanged; the
/// metrics get the flow table's size per VIP.
fn sweep(balancer: &mut Balancer, telemetry: Option<&telemetry::Telemetry>) {
    match balancer.sweep_flows(crate::dataplane::flows::kernel_now_ns()) {
        Ok(report) => {
            if report.expired > 0 || report.returned > 0 {
                info!(
                    flows = report.flows,
                    expired = report.expired,
                    returned_slots = report.returned,
                    changed_slots = report.changed,
                    sweep_us = report.elapsed.as_micros() as u64,
                    "flow sweep: {} idle flows forgotten, {} ring slots unchanged again",
                    report.expired,
                    report.returned
                );
            }
            if let Some(telemetry) = telemetry {
                telemetry.set_flow_tables(balancer, report.flows as u64);
            }
        }
        Err(e) => warn!("flow sweep failed: {e}"),
    }
}

fn wanted_checks(balancer: &Balancer, config: &Config) -> Vec<(u32, CheckSpec, Health)> {
    config
        .vips
        .iter()
        .zip(&balancer.vips)
        .flat_map(|(vip, model)| {
            debug_assert_eq!(vip.name, model.name, "the model is in config order");
            vip.backends
                .iter()
                .zip(&model.backends)
                .map(|(backend, state)| {
                    debug_assert_eq!(backend.address, state.address);
                    let spec = CheckSpec {
                        vip: vip.name.clone(),
                        address: backend.address,
                        settings: backend.health.clone(),
                        through_tunnel: vip.check_through_tunnel.then_some((
                            std::net::SocketAddr::new(vip.address, vip.port),
                            vip.forward,
                        )),
                    };
                    (state.id, spec, state.health)
                })
        })
        .collect()
}

/// Reloads (on SIGHUP, or for `lb reload`, whose answer goes to `reply` before anything else),
/// then resolves the L2 paths of the backends the reload added: now, not at the next periodic
/// refresh.
async fn reload_then_resolve(
    running: &mut Running,
    balancer: &mut Balancer,
    supervisor: &mut Supervisor,
    netlink: &NetlinkHandle,
    interface: &crate::net::Interface,
    reply: Option<ReloadReply>,
) {
    let result = reload::reload(running, balancer, supervisor).await;
    let reloaded = result.is_ok();
    if reloaded {
        running.sync = sync::reconfigure(
            running.sync.take(),
            running.config.sync.as_ref(),
            balancer,
            &mut running.parked_events,
        )
        .await;
    }
    if let Some(reply) = reply {
        let _ = reply.send(result);
    }
    let unresolved = balancer
        .vips
        .iter()
        .flat_map(|v| &v.backends)
        .any(|b| b.path.is_none());
    if reloaded
        && unresolved
        && let Err(e) = paths::refresh_paths(netlink, interface, balancer).await
    {
        warn!("resolving the paths of reloaded backends failed: {e}");
    }
}
