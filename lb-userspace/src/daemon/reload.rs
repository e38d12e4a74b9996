//! `lb reload` and SIGHUP: re-read the config file and apply only the difference.
//!
//! An invalid file is refused with its `FILE:LINE:COL` error, and so is a change to a setting
//! that sizes or places the data plane (only a restart can apply those); either way the running
//! config stays as it was. Otherwise VIPs and backends are reconciled by identity (a VIP by
//! name, a backend by VIP and address), so nothing is detached, no flow is flushed, unchanged
//! backends keep their checker and state, and `lb drain`/`lb disable` stay in force.

use std::path::{Path, PathBuf};

use tracing::{error, info};

use super::{telemetry::Telemetry, wanted_checks};
use crate::{
    announce::Announcer,
    api::model::ReloadReport,
    balancer::Balancer,
    config::Config,
    health::supervisor::{CheckerChange, Supervisor},
};

/// The config file the daemon was started with, what of it runs now, and the parts of the
/// daemon a reload replaces or reconfigures besides the balancer and the checkers.
pub(super) struct Running {
    pub path: PathBuf,
    pub config: Config,
    /// The metrics endpoint, while `metrics` is set.
    pub telemetry: Option<Telemetry>,
    pub announcer: Announcer,
    /// The sync service, while `[sync]` is set.
    pub sync: Option<crate::sync::SyncHandle>,
    /// The data plane's event reader while `[sync]` is off after a reload removed it.
    pub parked_events: Option<crate::dataplane::FlowEvents>,
    /// The DNS responder, while `[dns]` is set.
    pub dns: Option<crate::dns::DnsService>,
}

/// Why a setting cannot change on a reload, or `None` when none of them did.
fn fixed_setting_changed(path: &Path, old: &Config, new: &Config) -> Option<String> {
    let Config {
        interface,
        xdp_mode,
        ring_size,
        max_vips,
        max_backends,
        flow_table_size,
        api,
        // Applied by a reload:
        tcp_idle_timeout: _,
        udp_idle_timeout: _,
        metrics: _,
        announce: _,
        sync: _,
        dns: _,
        vips: _,
    } = new;
    let file = path.display();
    let sized = |key: &str, from: u32, to: u32| {
        format!(
            "{file}: `{key}` changed ({from} -> {to}): it sizes a kernel map, which a reload \
             cannot do; restore it, or apply it with `lb detach --interface {}` and a restart \
             (that drops established flows)",
            old.interface
        )
    };
    if *interface != old.interface {
        return Some(format!(
            "{file}: `interface` changed ({} -> {interface}): restart lb to move it (and \
             `lb detach --interface {}` to take it off the old one)",
            old.interface, old.interface
        ));
    }
    if *xdp_mode != old.xdp_mode {
        return Some(format!(
            "{file}: `xdp_mode` changed ({} -> {xdp_mode}): the attachment's mode is fixed; \
             restore it, or apply it with `lb detach --interface {}` and a restart",
            old.xdp_mode, old.interface
        ));
    }
    if *ring_size != old.ring_size {
        return Some(sized("ring_size", old.ring_size, *ring_size));
    }
    if *max_vips != old.max_vips {
        return Some(sized("max_vips", old.max_vips, *max_vips));
    }
    if *max_backends != old.max_backends {
        return Some(sized("max_backends", old.max_backends, *max_backends));
    }
    if *flow_table_size != old.flow_table_size {
        return Some(sized(
            "flow_table_size",
            old.flow_table_size,
            *flow_table_size,
        ));
    }
    if *api != old.api {
        return Some(format!(
            "{file}: `api` changed ({} -> {}): the control socket moves on a restart; restore \
             it to reload",
            old.api.display(),
            api.display()
        ));
    }
    None
}

/// Reloads `running.path`; on success `running.config` is the new config. Logs the outcome.
pub(super) async fn reload(
    running: &mut Running,
    balancer: &mut Balancer,
    supervisor: &mut Supervisor,
) -> Result<ReloadReport, String> {
    let result = apply(running, balancer, supervisor).await;
    match &result {
        Ok(report) => {
            info!(
                config = %report.config,
                changes = report.changes.len(),
                "reloaded {}: {} changes",
                report.config,
                report.changes.len()
            );
            for change in &report.changes {
                info!(config = %report.config, "reload: {change}");
            }
        }
        Err(message) => error!("reload refused: {message}; still running the previous config"),
    }
    result
}

async fn apply(
    running: &mut Running,
    balancer: &mut Balancer,
    supervisor: &mut Supervisor,
) -> Result<ReloadReport, String> {
    let path = running.path.clone();
    let new = Config::load(&path).map_err(|e| e.to_string())?;
    if let Some(why) = fixed_setting_changed(&path, &running.config, &new) {
        return Err(why);
    }
    // The new metrics endpoint first: if its address cannot be had, nothing has changed yet.
    let new_telemetry = if new.metrics != running.config.metrics {
        match new.metrics {
            Some(address) => Some(Some(
                Telemetry::start(address, balancer)
                    .await
                    .map_err(|e| format!("{}: {e}", path.display()))?,
            )),
            None => Some(None),
        }
    } else {
        None
    };
    // The new DNS sockets next, for the same reason; the old ones close only once the new
    // config is in.
    let new_dns = match (&running.dns, &new.dns) {
        (Some(service), Some(config)) => Some(DnsStep::Reconfigure(Box::new(
            service
                .prepare(config)
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?,
        ))),
        (None, Some(config)) => Some(DnsStep::Start(Box::new(
            crate::dns::DnsService::start(config, &new.vips, running.announcer.decision())
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?,
        ))),
        (Some(_), None) => Some(DnsStep::Stop),
        (None, None) => None,
    };
    let mut changes: Vec<String> = match balancer.reconcile(&new) {
        Ok(changes) => changes.iter().map(ToString::to_string).collect(),
        Err(e) => {
            if let Some(Some(started)) = new_telemetry {
                started.stop().await;
            }
            drop(new_dns);
            // The error says whether the maps went back to the old config.
            return Err(format!("{}: applying it failed: {e}", path.display()));
        }
    };
    for (id, change) in supervisor.sync(wanted_checks(balancer, &new)) {
        // Started and stopped checkers belong to added and removed backends, already listed.
        if change == CheckerChange::Restarted
            && let Some((v, b)) = balancer.locate(id)
        {
            let vip = &balancer.vips[v];
            changes.push(format!(
                "vip {}: backend {}: health check changed (checker restarted, state kept)",
                vip.name, vip.backends[b].address
            ));
        }
    }
    if let Some(replacement) = new_telemetry {
        if let Some(old) = std::mem::replace(&mut running.telemetry, replacement) {
            old.stop().await;
        }
        changes.push(match new.metrics {
            Some(address) => format!("metrics: now served on {address}"),
            None => "metrics: no longer served".to_owned(),
        });
    }
    balancer.flow_hold = crate::announce::flow_hold(&new);
    // After the VIPs: a dropped address is withdrawn, a new table gets what can serve now.
    changes.extend(
        running
            .announcer
            .reconfigure(new.announce.clone(), balancer)
            .await,
    );
    // After the announcements: VIP addresses answer by the decision for the new VIPs.
    let decision = running.announcer.decision();
    match new_dns {
        Some(DnsStep::Reconfigure(prepared)) => {
            if let Some(service) = running.dns.as_mut() {
                changes.extend(service.commit(*prepared, &new.vips, decision));
            }
        }
        Some(DnsStep::Start(mut service)) => {
            service.update(decision);
            running.dns = Some(*service);
            changes.push("dns: responder started".to_owned());
        }
        Some(DnsStep::Stop) => {
            running.dns = None;
            changes.push("dns: responder stopped".to_owned());
        }
        None => {}
    }
    running.config = new;
    Ok(ReloadReport {
        config: path.display().to_string(),
        changes,
    })
}

/// What a reload does to the DNS responder, decided (and its sockets bound) before anything
/// else changes.
enum DnsStep {
    Reconfigure(Box<crate::dns::Prepared>),
    Start(Box<crate::dns::DnsService>),
    Stop,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let text = format!(
            "interface = \"eth0\"\n{extra}\n[[vip]]\nname = \"web\"\naddress = \"10.0.0.1\"\nport = 80\nprotocol = \"tcp\"\n"
        );
        Config::parse(&text, Path::new("lb.toml")).expect("test config is valid")
    }

    #[test]
    fn settings_a_reload_cannot_apply_are_named_with_the_file() {
        let old = config("");
        let path = Path::new("/etc/lb/lb.toml");
        assert_eq!(fixed_setting_changed(path, &old, &config("")), None);
        assert_eq!(
            fixed_setting_changed(path, &old, &config("metrics = \"127.0.0.1:9100\"")),
            None,
            "metrics moves on a reload"
        );
        for (extra, key) in [
            (
                "flow_table_size = 4096",
                "`flow_table_size` changed (1048576 -> 4096)",
            ),
            ("max_vips = 8", "`max_vips` changed (64 -> 8)"),
            ("ring_size = 1021", "`ring_size` changed (65537 -> 1021)"),
            ("xdp_mode = \"skb\"", "`xdp_mode` changed (auto -> skb)"),
            (
                "api = \"/tmp/other.sock\"",
                "`api` changed (/run/lb/lb.sock -> /tmp/other.sock)",
            ),
        ] {
            let why = fixed_setting_changed(path, &old, &config(extra))
                .unwrap_or_else(|| panic!("{extra} must be refused"));
            assert!(
                why.starts_with("/etc/lb/lb.toml: ") && why.contains(key),
                "{extra}: {why}"
            );
        }
    }
}
