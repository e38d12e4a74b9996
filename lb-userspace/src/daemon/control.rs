//! The daemon's side of the control API: answering `Command`s from the API server with the
//! balancer's state, and applying operator overrides.

use tracing::{info, warn};

use tokio::sync::oneshot;

use crate::{
    announce::Announcer,
    api::model::{
        AddressStatus, Admin, AnnounceStatus, BackendStatus, Command, ReloadReport, StatusReport,
        VipStatus,
    },
    balancer::{BackendState, Balancer},
    health::{Health, supervisor::Supervisor},
    stats::Snapshot,
};

/// Where the answer to a reload goes.
pub(super) type ReloadReply = oneshot::Sender<Result<ReloadReport, String>>;

/// Answers one command from the API server. A reload is handed back: it needs the checkers and
/// the metrics endpoint too, which the daemon's loop owns.
pub(super) fn handle(
    balancer: &mut Balancer,
    supervisor: &Supervisor,
    announcer: &Announcer,
    sync: Option<&crate::sync::SyncHandle>,
    dns: Option<&crate::dns::DnsService>,
    command: Command,
) -> Option<ReloadReply> {
    match command {
        Command::Status(reply) => {
            let mut report = status(balancer, supervisor, announcer, sync);
            report.dns = dns.map(crate::dns::DnsService::status);
            let _ = reply.send(report);
        }
        Command::SetAdmin {
            vip,
            backend,
            admin,
            reply,
        } => {
            let _ = reply.send(set_admin(balancer, &vip, &backend, admin));
        }
        Command::Reload(reply) => return Some(reply),
    }
    None
}

fn state_name(backend: &BackendState) -> &'static str {
    match (backend.admin, backend.health) {
        (Admin::Disabled, _) => "disabled",
        (_, Health::Unknown) => "unknown",
        (_, Health::Down) => "down",
        (Admin::Drained, Health::Up) => "draining",
        (Admin::Enabled, Health::Up) if backend.path.is_none() => "unresolved",
        (Admin::Enabled, Health::Up) => "up",
    }
}

/// Everything `lb status` shows.
pub(super) fn status(
    balancer: &Balancer,
    supervisor: &Supervisor,
    announcer: &Announcer,
    sync: Option<&crate::sync::SyncHandle>,
) -> StatusReport {
    let decision = announcer.decision();
    let snapshot = match Snapshot::read(balancer) {
        Ok(snapshot) => Some(snapshot),
        Err(e) => {
            warn!("status: reading the data plane's counters failed: {e}");
            None
        }
    };
    let vips = balancer
        .vips
        .iter()
        .enumerate()
        .map(|(v, vip)| {
            let counters = snapshot.as_ref().and_then(|s| s.vips.get(v));
            let backends = vip
                .backends
                .iter()
                .enumerate()
                .map(|(b, backend)| {
                    let c = counters
                        .and_then(|c| c.backends.get(b))
                        .map(|b| b.counters)
                        .unwrap_or_default();
                    let last = supervisor.last_outcome(backend.id);
                    BackendStatus {
                        address: backend.address.to_string(),
                        standby: backend.standby,
                        state: state_name(backend).to_owned(),
                        weight: backend.effective_weight(),
                        configured_weight: backend.weight,
                        last_check: last.map(|o| o.reason.clone()),
                        last_check_latency_ms: last.map(|o| o.latency.as_secs_f64() * 1000.0),
                        packets: c.packets,
                        bytes: c.bytes,
                        flows: c.new_flows,
                    }
                })
                .collect();
            let c = counters.map(|c| c.counters).unwrap_or_default();
            let serves = decision.vips.iter().find(|d| d.name == vip.name);
            let ring_digest = balancer.live_ring_digest(v).unwrap_or_else(|e| {
                warn!("status: reading the live ring of vip {}: {e}", vip.name);
                String::new()
            });
            VipStatus {
                name: vip.name.clone(),
                address: vip.address.to_string(),
                port: vip.port,
                protocol: vip.protocol.as_str().to_owned(),
                forward: match vip.forward {
                    crate::config::Forward::Gue { port } => format!("gue:{port}"),
                    other => other.as_str().to_owned(),
                },
                active_pool: vip.active_pool.as_str().to_owned(),
                can_serve: serves.is_some_and(|d| d.can_serve),
                announced: decision.announces(vip.address),
                announce_reason: serves.map(|d| d.reason.clone()).unwrap_or_default(),
                ring_digest,
                ring_slots_changed: balancer.changed_slots(v) as u64,
                flow_table_entries: balancer.recorded_flows(v) as u64,
                packets: c.packets,
                bytes: c.bytes,
                flows: c.new_flows,
                backends,
            }
        })
        .collect();
    let settings = announcer.settings();
    let announce = AnnounceStatus {
        route_table: settings.route_table,
        health_file: settings
            .health_file
            .as_ref()
            .map(|p| p.display().to_string()),
        health_value: announcer.health_value(),
        ready: announcer.ready(),
        addresses: decision
            .addresses
            .iter()
            .map(|(address, d)| AddressStatus {
                address: address.to_string(),
                announced: d.announce,
                reason: d.reason.clone(),
            })
            .collect(),
    };
    let orphans = balancer
        .dataplane
        .pin_top()
        .map(|top| crate::dataplane::pins::orphans::scan(&top))
        .unwrap_or_default();
    StatusReport {
        announce,
        vips,
        orphans,
        sync: sync.map(|s| s.status(balancer.dataplane.flow_events_lost().unwrap_or(0))),
        dns: None,
    }
}

/// `lb drain|disable|enable VIP BACKEND`.
pub(super) fn set_admin(
    balancer: &mut Balancer,
    vip: &str,
    backend: &str,
    admin: Admin,
) -> Result<(), String> {
    let v = balancer
        .vip_index(vip)
        .ok_or_else(|| format!("no vip named {vip}"))?;
    let b = balancer.vips[v]
        .backends
        .iter()
        .position(|be| {
            be.address.to_string() == backend || backend.parse().ok() == Some(be.address)
        })
        .ok_or_else(|| format!("vip {vip} has no backend {backend}"))?;
    let before = balancer.vips[v].backends[b].admin;
    let published = balancer.set_admin(v, b, admin).map_err(|e| e.to_string())?;
    info!(
        vip,
        backend,
        from = ?before,
        to = ?admin,
        "backend {backend} of vip {vip}: admin {before:?} -> {admin:?} (operator); map updated in {}us",
        published.elapsed.as_micros()
    );
    super::events::log_flip(balancer, v, &published);
    Ok(())
}
