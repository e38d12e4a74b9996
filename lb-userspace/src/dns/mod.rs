//! `[dns]`: an authoritative responder for one zone, answering each configured name with the
//! addresses that are up, in round robin.
//!
//! An address that is one of this node's VIPs is up while that VIP address is announced (the
//! rule of [`crate::announce::decide`]: some VIP on it can serve); any other address is checked
//! with the backends' checkers and rise/fall when its name has a `health` table, and is always
//! up when it has none. When none of a name's addresses is up it answers all of them or none
//! (`on_all_down`).
//!
//! Data flows one way, like the announcements: the daemon's loop hands every new
//! [`Decision`] and every check report to [`DnsService`], which recomputes the answer sets
//! and swaps them into the [`Zone`] the socket tasks read ([`server`]). The answers themselves
//! are [`answer`]'s pure function of the zone and the query.

pub mod answer;
pub mod server;
pub mod stats;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, PoisonError, RwLock};

use tokio::sync::mpsc;
use tracing::info;

use crate::announce::Decision;
use crate::api::model::{DnsAddressStatus, DnsNameStatus, DnsQueryCount, DnsStatus};
use crate::config::{DnsAllDown, DnsConfig, HealthConfig, VipConfig};
use crate::health::Health;
use crate::health::schedule::CheckReport;
use crate::health::supervisor::{CheckSpec, Supervisor};
use answer::{Zone, ZoneError};
use server::{ListenError, Listener};
use stats::QueryStats;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("dns: {0}")]
    Zone(#[from] ZoneError),
}

/// Why an address is up or down, as last computed.
#[derive(Clone, Debug, PartialEq, Eq)]
struct AddressState {
    up: bool,
    reason: String,
}

/// The responder: its sockets, the zone they answer from, and the checks of addresses that are
/// not VIPs.
pub struct DnsService {
    config: DnsConfig,
    zone: Arc<RwLock<Zone>>,
    stats: Arc<QueryStats>,
    listeners: Vec<(SocketAddr, Listener)>,
    supervisor: Supervisor,
    reports: mpsc::Receiver<CheckReport>,
    /// Checker id → the address and settings it checks (one checker per distinct pair).
    checks: Vec<(u32, IpAddr, HealthConfig)>,
    next_check_id: u32,
    /// This node's VIP addresses, from the config.
    vip_addresses: HashSet<IpAddr>,
    /// The latest decision's view of each VIP address: announced, and why.
    announced: BTreeMap<IpAddr, (bool, String)>,
    /// Per name (config order), per address (config order).
    states: Vec<Vec<AddressState>>,
}

/// Sockets bound for a new config, not yet serving it ([`DnsService::prepare`]).
pub struct Prepared {
    config: DnsConfig,
    zone: Zone,
    /// New listen addresses with their sockets; addresses kept keep their old sockets.
    bound: Vec<(SocketAddr, Listener)>,
}

impl DnsService {
    /// Binds every listen address and starts the checks; answers follow `decision` from now on.
    pub async fn start(
        config: &DnsConfig,
        vips: &[VipConfig],
        decision: &Decision,
    ) -> Result<Self, DnsError> {
        let zone = Arc::new(RwLock::new(build_zone(config)?));
        let stats = Arc::new(QueryStats::default());
        let mut listeners = Vec::with_capacity(config.listen.len());
        for &address in &config.listen {
            let listener = server::listen(address, Arc::clone(&zone), Arc::clone(&stats)).await?;
            info!(
                "dns: answering for {} on {address} (udp and tcp)",
                config.zone
            );
            listeners.push((address, listener));
        }
        let (report_tx, reports) = mpsc::channel(256);
        let mut service = DnsService {
            config: config.clone(),
            zone,
            stats,
            listeners,
            supervisor: Supervisor::new(report_tx),
            reports,
            checks: Vec::new(),
            next_check_id: 0,
            vip_addresses: vips.iter().map(|v| v.address).collect(),
            announced: BTreeMap::new(),
            states: Vec::new(),
        };
        service.sync_checks();
        service.update(decision);
        Ok(service)
    }

    /// The next report of a check of a non-VIP address.
    pub async fn next_report(&mut self) -> Option<CheckReport> {
        self.reports.recv().await
    }

    /// Applies a check result; the answers change at once if an address went up or down.
    pub fn record(&mut self, report: &CheckReport) {
        if let Some(transition) = self.supervisor.record(report) {
            let address = self
                .checks
                .iter()
                .find(|(id, ..)| *id == report.checker.backend)
                .map(|(_, address, _)| *address);
            if let Some(address) = address {
                info!(
                    "dns: {address} {} -> {} ({})",
                    transition.from.as_str(),
                    transition.to.as_str(),
                    report.outcome.reason
                );
            }
            self.refresh();
        }
    }

    /// Takes what this node can serve now; cheap when nothing changed.
    pub fn update(&mut self, decision: &Decision) {
        let announced: BTreeMap<IpAddr, (bool, String)> = decision
            .addresses
            .iter()
            .map(|(address, d)| (*address, (d.announce, d.reason.clone())))
            .collect();
        if announced != self.announced || self.states.is_empty() {
            self.announced = announced;
            self.refresh();
        }
    }

    /// Binds the listen addresses `new` adds (nothing changes if one cannot be had) and builds
    /// its zone; [`DnsService::commit`] then switches to it.
    pub async fn prepare(&self, new: &DnsConfig) -> Result<Prepared, DnsError> {
        let zone = build_zone(new)?;
        let mut bound = Vec::new();
        for &address in &new.listen {
            if !self.listeners.iter().any(|(a, _)| *a == address) {
                bound.push((
                    address,
                    server::listen(address, Arc::clone(&self.zone), Arc::clone(&self.stats))
                        .await?,
                ));
            }
        }
        Ok(Prepared {
            config: new.clone(),
            zone,
            bound,
        })
    }

    /// Serves `prepared`'s config: the new sockets are already answering (from the running
    /// zone until now), then the old ones that are no longer listed close. Returns what changed, for the
    /// reload's report.
    pub fn commit(
        &mut self,
        prepared: Prepared,
        vips: &[VipConfig],
        decision: &Decision,
    ) -> Vec<String> {
        let Prepared {
            config,
            zone,
            bound,
        } = prepared;
        let mut changes = Vec::new();
        let vip_addresses: HashSet<IpAddr> = vips.iter().map(|v| v.address).collect();
        if config == self.config && vip_addresses == self.vip_addresses {
            return changes;
        }
        // Every socket reads this one zone: the new contents reach them all at once.
        *self.zone.write().unwrap_or_else(PoisonError::into_inner) = zone;
        for (address, listener) in bound {
            changes.push(format!("dns: now answering on {address}"));
            self.listeners.push((address, listener));
        }
        self.listeners.retain(|(address, _)| {
            let keep = config.listen.contains(address);
            if !keep {
                changes.push(format!("dns: no longer answering on {address}"));
            }
            keep
        });
        if config.zone != self.config.zone {
            changes.push(format!("dns: zone {} -> {}", self.config.zone, config.zone));
        }
        if config.names != self.config.names || config.ttl != self.config.ttl {
            changes.push("dns: names or ttl changed".to_owned());
        }
        self.config = config;
        self.vip_addresses = vip_addresses;
        self.states.clear();
        self.sync_checks();
        self.update(decision);
        changes
    }

    /// `[dns]` as it runs, for `lb status` and the metrics.
    pub fn status(&self) -> DnsStatus {
        let zone = self.read_zone();
        let names = self
            .config
            .names
            .iter()
            .zip(&self.states)
            .map(|(name, states)| DnsNameStatus {
                name: format!("{}.{}", name.name, self.config.zone),
                answer: zone
                    .addresses(&name.name)
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                on_all_down: name.on_all_down.as_str().to_owned(),
                addresses: name
                    .addresses
                    .iter()
                    .zip(states)
                    .map(|(address, state)| DnsAddressStatus {
                        address: address.to_string(),
                        up: state.up,
                        reason: state.reason.clone(),
                    })
                    .collect(),
            })
            .collect();
        DnsStatus {
            zone: self.config.zone.clone(),
            listen: self.listeners.iter().map(|(a, _)| a.to_string()).collect(),
            ttl_seconds: ttl_seconds(&self.config),
            names,
            queries: self
                .stats
                .snapshot()
                .into_iter()
                .map(|((qtype, rcode), count)| DnsQueryCount {
                    qtype: qtype.to_owned(),
                    rcode: rcode.to_owned(),
                    count,
                })
                .collect(),
            truncated: self.stats.truncated(),
        }
    }

    fn read_zone(&self) -> std::sync::RwLockReadGuard<'_, Zone> {
        self.zone.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// One checker per distinct (address, settings) of the names' non-VIP addresses.
    fn sync_checks(&mut self) {
        let mut wanted: Vec<(IpAddr, HealthConfig)> = Vec::new();
        for name in &self.config.names {
            let Some(settings) = &name.health else {
                continue;
            };
            for address in &name.addresses {
                let pair = (*address, settings.clone());
                if !self.vip_addresses.contains(address) && !wanted.contains(&pair) {
                    wanted.push(pair);
                }
            }
        }
        let mut checks = Vec::with_capacity(wanted.len());
        for (address, settings) in wanted {
            let id = match self
                .checks
                .iter()
                .find(|(_, a, s)| *a == address && *s == settings)
            {
                Some((id, ..)) => *id,
                None => {
                    self.next_check_id += 1;
                    self.next_check_id
                }
            };
            checks.push((id, address, settings));
        }
        self.supervisor.sync(
            checks
                .iter()
                .map(|(id, address, settings)| {
                    let spec = CheckSpec {
                        vip: "dns".to_owned(),
                        address: *address,
                        settings: settings.clone(),
                        through_tunnel: None,
                    };
                    (*id, spec, Health::Unknown)
                })
                .collect(),
        );
        self.checks = checks;
    }

    /// Recomputes every address's state and every name's answer; logs the answers that changed.
    fn refresh(&mut self) {
        let mut states = Vec::with_capacity(self.config.names.len());
        let mut answers = Vec::with_capacity(self.config.names.len());
        for name in &self.config.names {
            let name_states: Vec<AddressState> = name
                .addresses
                .iter()
                .map(|address| self.address_state(*address, name.health.as_ref()))
                .collect();
            let up: Vec<IpAddr> = name
                .addresses
                .iter()
                .zip(&name_states)
                .filter(|(_, s)| s.up)
                .map(|(a, _)| *a)
                .collect();
            let answer = match (up.is_empty(), name.on_all_down) {
                (false, _) => up,
                (true, DnsAllDown::All) => name.addresses.clone(),
                (true, DnsAllDown::None) => Vec::new(),
            };
            states.push(name_states);
            answers.push(answer);
        }
        let mut zone = self.zone.write().unwrap_or_else(PoisonError::into_inner);
        for (name, answer) in self.config.names.iter().zip(answers) {
            if zone.set_addresses(&name.name, answer.clone()) {
                info!(
                    "dns: {}.{} now answers [{}]",
                    name.name,
                    self.config.zone,
                    answer
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        drop(zone);
        self.states = states;
    }

    fn address_state(&self, address: IpAddr, health: Option<&HealthConfig>) -> AddressState {
        if self.vip_addresses.contains(&address) {
            return match self.announced.get(&address) {
                Some((up, reason)) => AddressState {
                    up: *up,
                    reason: reason.clone(),
                },
                None => AddressState {
                    up: false,
                    reason: "a VIP of this node, not decided yet".to_owned(),
                },
            };
        }
        let Some(settings) = health else {
            return AddressState {
                up: true,
                reason: "not checked (no health table)".to_owned(),
            };
        };
        let id = self
            .checks
            .iter()
            .find(|(_, a, s)| *a == address && s == settings)
            .map(|(id, ..)| *id);
        let health = id.map_or(Health::Unknown, |id| self.supervisor.health(id));
        let last = id
            .and_then(|id| self.supervisor.last_outcome(id))
            .map_or_else(|| "no result yet".to_owned(), |o| o.reason.clone());
        AddressState {
            up: health == Health::Up,
            reason: format!("{} check: {} ({last})", settings.check, health.as_str()),
        }
    }
}

fn ttl_seconds(config: &DnsConfig) -> u32 {
    u32::try_from(config.ttl.as_secs()).unwrap_or(u32::MAX)
}

fn build_zone(config: &DnsConfig) -> Result<Zone, ZoneError> {
    // The serial only has to grow from one config to the next: seconds since the epoch do.
    let serial = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_secs() as u32);
    Zone::new(
        &config.zone,
        ttl_seconds(config),
        serial,
        config.names.iter().map(|n| n.name.as_str()),
    )
}
