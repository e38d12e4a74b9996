//! What this node tells the rest of the network it can serve: route health injection for a
//! routing daemon (a host route per servable VIP address in a kernel routing table, which BIRD or
//! FRR export over BGP) and a health file for keepalived (`track_file`).
//!
//! Data flows one way: the balancer's model → [`decide`] (which VIPs can serve, which addresses
//! to announce) → [`Announcer::update`], which brings the routing table and the file in line
//! with the decision and logs each change. lb only decides and signals; the routing and VRRP
//! protocols are the engines' own.
//!
//! Restarts: while the daemon is stopped or restarting, the routes and the file stay as they
//! were, since the pinned data plane goes on forwarding. A daemon that adopts pinned state
//! leaves them alone until its first health results are in; a daemon that starts from nothing
//! (nothing was forwarding) withdraws lb's routes through its interface and writes the number of
//! all its VIPs, then announces only once its first results are in.

mod decision;
pub mod health_file;
pub mod routes;
#[cfg(test)]
mod tests;

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use tracing::{info, warn};

pub use decision::{AddressDecision, Decision, VipDecision, decide, decide_vips};
pub use routes::{LB_ROUTE_PROTOCOL, LbRoute};

use crate::{
    balancer::Balancer,
    config::{AnnounceConfig, Config},
    net::NetlinkHandle,
};

#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("netlink: {request} failed: {source}")]
    Netlink {
        request: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("writing the health file {}: {source}", path.display())]
    HealthFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Keeps the route table and the health file in line with what the node can serve.
pub struct Announcer {
    settings: AnnounceConfig,
    netlink: NetlinkHandle,
    /// The interface the program is attached to: lb's routes go through it, and lb touches only
    /// its own routes through it (another `lb` on another interface may share the table).
    ifindex: u32,
    interface: String,
    /// False until the first health results are in and the program is attached.
    ready: bool,
    /// The addresses lb's routes in `route_table` lead to now.
    routes: BTreeSet<IpAddr>,
    /// What the health file holds, as far as this daemon knows.
    health_value: Option<u32>,
    decision: Decision,
    /// The last error of each failing write (a route, the file), so a write retried on every
    /// loop turn warns once per new error, not once per retry.
    failing: std::collections::BTreeMap<String, String>,
}

impl Announcer {
    /// Takes over the table and the file. `adopted` says whether a previous daemon's data plane
    /// is still forwarding (its announcements then stay until the first results are in);
    /// otherwise lb's old routes through `interface` are withdrawn and the file says that no
    /// VIP can serve yet.
    pub async fn start(
        settings: AnnounceConfig,
        netlink: NetlinkHandle,
        interface: &crate::net::Interface,
        adopted: bool,
        balancer: &Balancer,
    ) -> Self {
        let mut announcer = Announcer {
            settings,
            netlink,
            ifindex: interface.index,
            interface: interface.name.clone(),
            ready: false,
            routes: BTreeSet::new(),
            health_value: None,
            decision: decide(balancer, false),
            failing: std::collections::BTreeMap::new(),
        };
        announcer.take_over_table(adopted).await;
        if let Some(path) = announcer.settings.health_file.clone() {
            let left = health_file::read(&path);
            match (adopted, left) {
                (true, Some(value)) => {
                    info!(
                        "health file {} keeps {value} from the previous daemon until the first \
                         health results are in",
                        path.display()
                    );
                    announcer.health_value = Some(value);
                }
                _ => announcer.write_health_file(announcer.decision.unservable_vips()),
            }
        }
        announcer
    }

    /// The first health results are in and the program is attached: announce from now on.
    pub async fn set_ready(&mut self, balancer: &Balancer) {
        self.ready = true;
        self.update(balancer).await;
    }

    /// Brings the table and the file in line with what `balancer` can serve now. Cheap when
    /// nothing changed (no system call); a failed route change is retried on the next call.
    pub async fn update(&mut self, balancer: &Balancer) {
        let started = Instant::now();
        let decision = decide(balancer, self.ready);
        if self.ready {
            self.apply_routes(&decision, started).await;
            let value = decision.unservable_vips();
            if self.settings.health_file.is_some() && self.health_value != Some(value) {
                self.write_health_file(value);
            }
        }
        self.log_vip_changes(&decision);
        self.decision = decision;
    }

    /// Re-reads what the kernel table and the file hold, so the next [`Announcer::update`]
    /// repairs whatever changed under lb: the kernel deletes IPv4 routes through an interface
    /// that goes down (a link loss), an operator may delete a route or the file.
    pub async fn resync(&mut self) {
        if !self.ready {
            return;
        }
        if let Some(table) = self.settings.route_table {
            match routes::list(&self.netlink, Some(table), Some(self.ifindex)).await {
                Ok(found) => {
                    let found: BTreeSet<IpAddr> = found.iter().map(|r| r.address).collect();
                    if found != self.routes {
                        warn!(
                            "announce: table {table} holds {} of lb's routes via {}, {} expected \
                             (removed or added by somebody else, or the link went down); repairing",
                            found.len(),
                            self.interface,
                            self.routes.len()
                        );
                        self.routes = found;
                    }
                }
                Err(e) => warn!("announce: reading table {table}: {e}"),
            }
        }
        if let Some(path) = &self.settings.health_file
            && health_file::read(path) != self.health_value
        {
            warn!(
                "announce: health file {} changed under lb; rewriting it",
                path.display()
            );
            self.health_value = None;
        }
    }

    /// Applies a reloaded `[announce]`. A new table gets the routes and the old one loses
    /// them; a new health file is written (the old one is left as it is, for whoever reads it).
    /// Returns one line per change, for `lb reload`.
    pub async fn reconfigure(
        &mut self,
        settings: AnnounceConfig,
        balancer: &Balancer,
    ) -> Vec<String> {
        let mut changes = Vec::new();
        let old = std::mem::replace(&mut self.settings, settings);
        if old.route_table != self.settings.route_table {
            for address in std::mem::take(&mut self.routes) {
                if let Some(table) = old.route_table {
                    self.withdraw(
                        address,
                        table,
                        "route_table changed on a reload",
                        Instant::now(),
                    )
                    .await;
                }
            }
            self.take_over_table(true).await;
            changes.push(format!(
                "announce: route_table {} -> {}",
                describe_option(old.route_table),
                describe_option(self.settings.route_table)
            ));
        }
        if old.health_file != self.settings.health_file {
            self.health_value = None;
            changes.push(format!(
                "announce: health_file {} -> {}",
                old.health_file
                    .as_ref()
                    .map_or("none".into(), |p| p.display().to_string()),
                self.settings
                    .health_file
                    .as_ref()
                    .map_or("none".into(), |p| p.display().to_string())
            ));
        }
        self.update(balancer).await;
        changes
    }

    /// The daemon stops without leaving a data plane behind (nothing was pinned): nothing will
    /// forward, so withdraw everything and say that no VIP can serve.
    pub async fn withdraw_all(&mut self, why: &str) {
        if let Some(table) = self.settings.route_table {
            for address in std::mem::take(&mut self.routes) {
                self.withdraw(address, table, why, Instant::now()).await;
            }
        }
        if self.settings.health_file.is_some() {
            self.write_health_file(self.decision.vips.len() as u32);
        }
    }

    /// The last decision.
    pub fn decision(&self) -> &Decision {
        &self.decision
    }

    /// Whether the first health results are in (nothing is announced before).
    pub fn ready(&self) -> bool {
        self.ready
    }

    pub fn settings(&self) -> &AnnounceConfig {
        &self.settings
    }

    /// What the health file holds, if lb keeps one.
    pub fn health_value(&self) -> Option<u32> {
        self.settings.health_file.as_ref().and(self.health_value)
    }

    /// Reads lb's routes through our interface in the configured table; without `adopted`
    /// withdraws them (they are left from a daemon whose data plane is gone).
    async fn take_over_table(&mut self, adopted: bool) {
        let Some(table) = self.settings.route_table else {
            return;
        };
        let found = match routes::list(&self.netlink, Some(table), Some(self.ifindex)).await {
            Ok(found) => found,
            Err(e) => {
                warn!("announce: reading table {table}: {e}; announcing from an empty table");
                Vec::new()
            }
        };
        self.routes = found.iter().map(|r| r.address).collect();
        if adopted {
            if !self.routes.is_empty() {
                info!(
                    "announce: table {table} keeps {} route(s) of the previous daemon until the \
                     first health results are in",
                    self.routes.len()
                );
            }
            return;
        }
        for address in std::mem::take(&mut self.routes) {
            self.withdraw(
                address,
                table,
                "left by a daemon whose data plane is gone",
                Instant::now(),
            )
            .await;
        }
    }

    async fn apply_routes(&mut self, decision: &Decision, started: Instant) {
        let Some(table) = self.settings.route_table else {
            return;
        };
        let wanted: BTreeSet<IpAddr> = decision
            .addresses
            .iter()
            .filter(|(_, d)| d.announce)
            .map(|(a, _)| *a)
            .collect();
        let gone: Vec<IpAddr> = self.routes.difference(&wanted).copied().collect();
        for address in gone {
            let why = decision.addresses.get(&address).map_or_else(
                || "no VIP has this address any more".to_owned(),
                |d| d.reason.clone(),
            );
            self.withdraw(address, table, &why, started).await;
        }
        let new: Vec<IpAddr> = wanted.difference(&self.routes).copied().collect();
        for address in new {
            let route = self.route(address, table);
            match routes::add(&self.netlink, route).await {
                Ok(()) => {
                    self.routes.insert(address);
                    self.recovered(&address.to_string());
                    let why = &decision.addresses[&address].reason;
                    info!(
                        address = %address,
                        table,
                        route_update_us = started.elapsed().as_micros() as u64,
                        "announce: {address} announced ({why}); route added to table {table} via {} in {}us",
                        self.interface,
                        started.elapsed().as_micros()
                    );
                }
                Err(e) => self.failed(&address.to_string(), &e),
            }
        }
    }

    /// Removes lb's route to `address`; `started` is when the decision began, for the log.
    async fn withdraw(&mut self, address: IpAddr, table: u32, why: &str, started: Instant) {
        let route = self.route(address, table);
        match routes::delete(&self.netlink, route).await {
            Ok(()) => {
                self.routes.remove(&address);
                self.recovered(&address.to_string());
                warn!(
                    address = %address,
                    table,
                    route_update_us = started.elapsed().as_micros() as u64,
                    "announce: {address} withdrawn ({why}); route removed from table {table} in {}us",
                    started.elapsed().as_micros()
                );
            }
            Err(e) => {
                // Keep it listed, so the next update retries.
                self.routes.insert(address);
                self.failed(&address.to_string(), &e);
            }
        }
    }

    fn route(&self, address: IpAddr, table: u32) -> LbRoute {
        LbRoute {
            address,
            table,
            ifindex: self.ifindex,
        }
    }

    fn write_health_file(&mut self, value: u32) {
        let Some(path) = self.settings.health_file.clone() else {
            return;
        };
        match health_file::write(&path, value) {
            Ok(()) => {
                let what = path.display().to_string();
                self.recovered(&what);
                info!(
                    health_file = %path.display(),
                    value,
                    "announce: health file {} now {value} ({})",
                    path.display(),
                    if value == 0 {
                        "every VIP can serve".to_owned()
                    } else {
                        format!("{value} VIP(s) cannot serve")
                    }
                );
                self.health_value = Some(value);
            }
            Err(source) => {
                let e = AnnounceError::HealthFile {
                    path: path.clone(),
                    source,
                };
                let what = path.display().to_string();
                self.failed(&what, &e);
                self.health_value = None;
            }
        }
    }

    /// Logs a failed write of `what` (a route's address, the file's path) unless it failed the
    /// same way last time.
    fn failed(&mut self, what: &str, error: &AnnounceError) {
        let message = error.to_string();
        if self.failing.get(what) != Some(&message) {
            warn!("announce: {message}; retrying on every change and every second");
            self.failing.insert(what.to_owned(), message);
        }
    }

    /// A write of `what` worked: say so if it had been failing.
    fn recovered(&mut self, what: &str) {
        if self.failing.remove(what).is_some() {
            info!("announce: {what}: written again after failing");
        }
    }

    /// One line per VIP whose ability to serve changed.
    fn log_vip_changes(&self, decision: &Decision) {
        for vip in &decision.vips {
            let before = self
                .decision
                .vips
                .iter()
                .find(|v| v.name == vip.name)
                .map(|v| v.can_serve);
            if before.is_some_and(|b| b != vip.can_serve) {
                let now = if vip.can_serve {
                    "can serve"
                } else {
                    "cannot serve"
                };
                info!(vip = %vip.name, can_serve = vip.can_serve, "vip {}: {now} ({})", vip.name, vip.reason);
            }
        }
    }
}

fn describe_option(table: Option<u32>) -> String {
    table.map_or("none".to_owned(), |t| t.to_string())
}

/// Shortest and longest flow hold of a node in a group.
const MIN_FLOW_HOLD: Duration = Duration::from_secs(1);
const MAX_FLOW_HOLD: Duration = Duration::from_secs(10);

/// How long a backend that this node's checks take down keeps its established flows
/// ([`crate::balancer::Balancer::flow_hold`]): zero for a node on its own (no `[announce]`);
/// in a group, twice the longest check interval (the other backends of a VIP whose checks fail
/// from this node only go down within about one interval of the first, and the hand-over
/// follows within milliseconds), between 1 s and 10 s.
pub fn flow_hold(config: &Config) -> Duration {
    let AnnounceConfig {
        route_table,
        health_file,
    } = &config.announce;
    if route_table.is_none() && health_file.is_none() {
        return Duration::ZERO;
    }
    let longest = config
        .vips
        .iter()
        .flat_map(|v| &v.backends)
        .map(|b| b.health.interval)
        .max()
        .unwrap_or_default();
    (longest * 2).clamp(MIN_FLOW_HOLD, MAX_FLOW_HOLD)
}

/// `lb detach`: withdraws lb's routes through `ifindex`, in every table. Returns them.
pub async fn withdraw_routes_via(
    netlink: &NetlinkHandle,
    ifindex: u32,
) -> Result<Vec<LbRoute>, AnnounceError> {
    let found = routes::list(netlink, None, Some(ifindex)).await?;
    for route in &found {
        routes::delete(netlink, *route).await?;
    }
    Ok(found)
}
