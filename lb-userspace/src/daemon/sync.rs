//! The daemon's side of `[sync]`: starting the service (and the data plane's flow events),
//! the start-up pull, installing what peers send, answering their pulls, refreshing the flows
//! in use, and applying a reload's `[sync]`.

use std::time::Duration;

use tracing::{info, warn};

use crate::{
    balancer::Balancer,
    config::SyncConfig,
    dataplane::{FlowEvents, flows::kernel_now_ns},
    sync::{FlowView, FromService, SyncHandle, ToService},
};

/// Starts replication for `config` (or turns the data plane's flow events off without it).
/// With `pull_at_start`, the service asks every peer for its flows at once: wait for them with
/// [`pull`] before announcing.
pub(super) fn start(
    config: Option<&SyncConfig>,
    balancer: &mut Balancer,
    pull_at_start: bool,
) -> Option<SyncHandle> {
    let Some(config) = config else {
        set_events(balancer, false);
        return None;
    };
    let events = take_events(balancer);
    start_with(config, balancer, events, pull_at_start)
}

fn start_with(
    config: &SyncConfig,
    balancer: &mut Balancer,
    events: Option<FlowEvents>,
    pull_at_start: bool,
) -> Option<SyncHandle> {
    if events.is_none() {
        warn!(
            "sync: the data plane's flow events are not available; this node's new flows are \
             sent only in full copies and refreshes"
        );
    }
    match SyncHandle::start(config, events, FlowView::of(balancer), pull_at_start) {
        Ok(handle) => {
            set_events(balancer, true);
            info!(
                listen = %config.listen,
                peers = config.peers.len(),
                "sync: replicating recorded flows with {} peers from {}",
                config.peers.len(),
                config.listen
            );
            Some(handle)
        }
        Err(e) => {
            // Balancing goes on without replication, loudly: a wrong listen address must not
            // take the node's VIPs down.
            tracing::error!("{e}; running without flow replication");
            set_events(balancer, false);
            None
        }
    }
}

/// The data plane's event reader (taken once per daemon).
fn take_events(balancer: &mut Balancer) -> Option<FlowEvents> {
    match balancer.dataplane.take_flow_events() {
        Ok(events) => Some(events),
        Err(e) => {
            warn!("sync: the data plane's flow events: {e}");
            None
        }
    }
}

fn set_events(balancer: &mut Balancer, on: bool) {
    if let Err(e) = balancer.dataplane.set_flow_events(on) {
        warn!(
            "sync: switching the data plane's flow events {}: {e}",
            if on { "on" } else { "off" }
        );
    }
}

/// The start-up pull: installs what the peers send until the service says the copies are in,
/// answering the peers' own pulls meanwhile (two nodes may start together).
pub(super) async fn pull(balancer: &mut Balancer, sync: &mut SyncHandle) {
    let started = std::time::Instant::now();
    while let Some(message) = sync.from_service.recv().await {
        if let FromService::Pulled { flows } = message {
            info!(
                flows,
                pull_ms = started.elapsed().as_millis() as u64,
                "sync: pulled {flows} flows from the peers in {:?}",
                started.elapsed()
            );
            return;
        }
        handle(message, balancer, sync);
    }
}

/// One message of the service.
pub(super) fn handle(message: FromService, balancer: &mut Balancer, sync: &mut SyncHandle) {
    match message {
        FromService::Install(records) => {
            match balancer.install_replicated(&records, kernel_now_ns()) {
                Ok(report) => sync.count(&report),
                Err(e) => warn!("sync: installing {} replicated flows: {e}", records.len()),
            }
        }
        FromService::Dump { peer, asked } => match balancer.flow_records(kernel_now_ns(), None) {
            Ok(records) => sync.send(ToService::Dump {
                peer,
                asked,
                records,
            }),
            Err(e) => warn!("sync: reading the flow table for {peer}: {e}"),
        },
        FromService::Pulled { .. } => {}
    }
}

/// After a sweep: the flows seen since the last refresh go to the peers again every half of
/// the shorter idle timeout, so their copies of flows that keep sending here do not expire.
pub(super) fn refresh(balancer: &Balancer, sync: &mut SyncHandle) {
    let now = kernel_now_ns();
    let shortest = balancer.idle.tcp.min(balancer.idle.udp);
    let Some(since) = sync.refresh_due(now, duration_ns(shortest)) else {
        return;
    };
    match balancer.flow_records(now, Some(since)) {
        Ok(records) if !records.is_empty() => sync.send(ToService::Refresh(records)),
        Ok(_) => {}
        Err(e) => warn!("sync: reading the flow table for a refresh: {e}"),
    }
}

fn duration_ns(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// A reload's `[sync]`: unchanged, nothing; changed, the service restarts with the new
/// settings (a new session: the peers accept it as a restart), keeping the data plane's event
/// reader; removed, it stops and the reader waits in `parked` for a later `[sync]`.
pub(super) async fn reconfigure(
    current: Option<SyncHandle>,
    wanted: Option<&SyncConfig>,
    balancer: &mut Balancer,
    parked: &mut Option<FlowEvents>,
) -> Option<SyncHandle> {
    if current.as_ref().map(|s| &s.config) == wanted {
        return current;
    }
    let events = match current {
        Some(handle) => handle.stop().await,
        None => parked.take().or_else(|| take_events(balancer)),
    };
    match wanted {
        Some(config) => start_with(config, balancer, events, false),
        None => {
            info!("sync: replication stopped (no [sync] in the config)");
            set_events(balancer, false);
            *parked = events;
            None
        }
    }
}

/// The next message of the service; pending forever without one.
pub(super) async fn next(sync: &mut Option<SyncHandle>) -> Option<FromService> {
    match sync {
        Some(sync) => sync.from_service.recv().await,
        None => std::future::pending().await,
    }
}
