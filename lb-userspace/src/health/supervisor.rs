//! Turns the stream of check results into health transitions, one tracker per backend, and owns
//! the checker tasks: started, restarted and stopped as the config says (at start-up and on every
//! reload), keyed by the backend's data-plane id so a reload never disturbs an unchanged backend.

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use tokio::{sync::mpsc, task::JoinHandle};

use super::{
    check::{CheckOutcome, CheckTarget, HealthCheck, TunnelCheck},
    checker_for,
    schedule::{CheckReport, CheckerKey, DEFAULT_JITTER, Schedule, spawn_checker},
    state::{Health, HealthTracker, Transition},
};
use crate::config::HealthConfig;

/// What a backend is checked as: a change to any of it restarts its checker.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckSpec {
    pub vip: String,
    pub address: IpAddr,
    pub settings: HealthConfig,
    /// `check_through_tunnel`: the VIP's address and port and its encapsulation; the backend
    /// must also answer a SYN to it sent through the tunnel.
    pub through_tunnel: Option<(std::net::SocketAddr, crate::config::Forward)>,
}

/// What [`Supervisor::sync`] did to one backend's checker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckerChange {
    Started,
    /// Its settings changed: a new checker continues from the backend's current health.
    Restarted,
    Stopped,
}

struct Supervised {
    spec: CheckSpec,
    generation: u64,
    tracker: HealthTracker,
    last: Option<CheckOutcome>,
    task: JoinHandle<()>,
}

/// Health of every checked backend, and the tasks that check them.
pub struct Supervisor {
    reports: mpsc::Sender<CheckReport>,
    backends: HashMap<u32, Supervised>,
    next_generation: u64,
}

impl Supervisor {
    /// Checkers started later report to `reports`.
    pub fn new(reports: mpsc::Sender<CheckReport>) -> Self {
        Self {
            reports,
            backends: HashMap::new(),
            next_generation: 0,
        }
    }

    /// Makes the running checkers match `wanted` (backend id → what to check, and the health to
    /// start from when it is new): new backends get a checker, backends whose spec changed get a
    /// new one that continues from their current health, backends no longer wanted lose theirs.
    /// Unchanged backends are not touched. Returns what changed, by backend id.
    pub fn sync(&mut self, wanted: Vec<(u32, CheckSpec, Health)>) -> Vec<(u32, CheckerChange)> {
        let mut changes = Vec::new();
        let keep: std::collections::HashSet<u32> = wanted.iter().map(|(id, ..)| *id).collect();
        let mut gone: Vec<u32> = self
            .backends
            .keys()
            .copied()
            .filter(|id| !keep.contains(id))
            .collect();
        gone.sort_unstable();
        for id in gone {
            if let Some(old) = self.backends.remove(&id) {
                old.task.abort();
                changes.push((id, CheckerChange::Stopped));
            }
        }
        for (id, spec, initial) in wanted {
            let (state, change) = match self.backends.get(&id) {
                Some(current) if current.spec == spec => continue,
                Some(current) => (current.tracker.state(), CheckerChange::Restarted),
                None => (initial, CheckerChange::Started),
            };
            if let Some(old) = self.backends.remove(&id) {
                old.task.abort();
            }
            self.start(id, spec, state);
            changes.push((id, change));
        }
        changes
    }

    fn start(&mut self, id: u32, spec: CheckSpec, state: Health) {
        let generation = self.next_generation;
        self.next_generation += 1;
        let mut check: Arc<dyn HealthCheck> = checker_for(&spec.settings, &spec.vip);
        if let Some((vip, forward)) = spec.through_tunnel {
            check = Arc::new(TunnelCheck {
                inner: check,
                vip,
                forward,
            });
        }
        let target = CheckTarget {
            address: spec.address,
            port: spec.settings.port,
        };
        let schedule = Schedule {
            interval: spec.settings.interval,
            timeout: spec.settings.timeout,
            jitter: DEFAULT_JITTER,
            confirm_first_failure: state == Health::Unknown,
        };
        let task = spawn_checker(
            CheckerKey {
                backend: id,
                generation,
            },
            check,
            target,
            schedule,
            self.reports.clone(),
        );
        let tracker = HealthTracker::resuming(spec.settings.rise, spec.settings.fall, state);
        self.backends.insert(
            id,
            Supervised {
                spec,
                generation,
                tracker,
                last: None,
                task,
            },
        );
    }

    /// Records a result; returns the transition it caused, if any. Results of a checker that
    /// has since been stopped or replaced are ignored.
    pub fn record(&mut self, report: &CheckReport) -> Option<Transition> {
        let backend = self.backends.get_mut(&report.checker.backend)?;
        if backend.generation != report.checker.generation {
            return None;
        }
        backend.last = Some(report.outcome.clone());
        backend.tracker.record(report.outcome.healthy)
    }

    /// Whether a report comes from a checker that is still current.
    pub fn is_current(&self, checker: CheckerKey) -> bool {
        self.backends
            .get(&checker.backend)
            .is_some_and(|b| b.generation == checker.generation)
    }

    pub fn health(&self, backend: u32) -> Health {
        self.backends
            .get(&backend)
            .map_or(Health::Unknown, |b| b.tracker.state())
    }

    /// The state one more disagreeing result will take a backend to (see
    /// [`HealthTracker::on_the_brink`]).
    pub fn on_the_brink(&self, backend: u32) -> Option<Health> {
        self.backends.get(&backend)?.tracker.on_the_brink()
    }

    /// The latest result of a backend's check.
    pub fn last_outcome(&self, backend: u32) -> Option<&CheckOutcome> {
        self.backends.get(&backend)?.last.as_ref()
    }

    /// The longest check timeout of the backends still without a result (a failed first check
    /// is repeated before it is reported, so a first result can take twice this).
    pub fn longest_pending_timeout(&self) -> Option<std::time::Duration> {
        self.backends
            .values()
            .filter(|b| b.tracker.state() == Health::Unknown)
            .map(|b| b.spec.settings.timeout)
            .max()
    }

    /// Backends without a first result yet.
    pub fn pending(&self) -> usize {
        self.backends
            .values()
            .filter(|b| b.tracker.state() == Health::Unknown)
            .count()
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        for backend in self.backends.values() {
            backend.task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{HealthConfig, Protocol};

    fn spec(address: &str, interval_ms: u64) -> CheckSpec {
        let mut settings = HealthConfig::defaults(80, Protocol::Udp); // check = none: always up
        settings.interval = Duration::from_millis(interval_ms);
        settings.timeout = Duration::from_millis(interval_ms / 2);
        CheckSpec {
            vip: "web".to_owned(),
            address: address.parse().unwrap(),
            settings,
            through_tunnel: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sync_touches_only_what_changed_and_ignores_replaced_checkers() {
        let (tx, mut rx) = mpsc::channel(64);
        let mut supervisor = Supervisor::new(tx);
        let started = supervisor.sync(vec![
            (0, spec("10.0.0.1", 1000), Health::Unknown),
            (1, spec("10.0.0.2", 1000), Health::Unknown),
        ]);
        assert_eq!(
            started,
            [(0, CheckerChange::Started), (1, CheckerChange::Started)]
        );
        for _ in 0..2 {
            let report = rx.recv().await.expect("first results");
            assert!(supervisor.record(&report).is_some(), "unknown -> up");
        }
        assert_eq!(supervisor.health(0), Health::Up);
        let first_generation_of_0 = supervisor.backends[&0].generation;

        // Same specs: nothing happens. A new interval for 1 restarts it, keeping `up`; 0 stays.
        assert_eq!(
            supervisor.sync(vec![
                (0, spec("10.0.0.1", 1000), Health::Unknown),
                (1, spec("10.0.0.2", 1000), Health::Unknown),
            ]),
            []
        );
        let old_key_of_1 = CheckerKey {
            backend: 1,
            generation: supervisor.backends[&1].generation,
        };
        assert_eq!(
            supervisor.sync(vec![
                (0, spec("10.0.0.1", 1000), Health::Unknown),
                (1, spec("10.0.0.2", 500), Health::Unknown),
                (2, spec("10.0.0.3", 1000), Health::Up),
            ]),
            [(1, CheckerChange::Restarted), (2, CheckerChange::Started)]
        );
        assert_eq!(supervisor.backends[&0].generation, first_generation_of_0);
        assert_eq!(
            supervisor.health(1),
            Health::Up,
            "a restart keeps the state"
        );
        assert_eq!(
            supervisor.health(2),
            Health::Up,
            "started from the given state"
        );
        assert!(!supervisor.is_current(old_key_of_1));
        let stale = CheckReport {
            checker: old_key_of_1,
            outcome: CheckOutcome::failed("late", Duration::ZERO),
            at: tokio::time::Instant::now(),
        };
        for _ in 0..10 {
            assert_eq!(supervisor.record(&stale), None, "stale results are ignored");
        }
        assert_eq!(supervisor.health(1), Health::Up);

        // Removed: stopped, and its results no longer count.
        assert_eq!(
            supervisor.sync(vec![(0, spec("10.0.0.1", 1000), Health::Unknown)]),
            [(1, CheckerChange::Stopped), (2, CheckerChange::Stopped)]
        );
        assert_eq!(supervisor.health(1), Health::Unknown);
        assert_eq!(supervisor.pending(), 0);
    }
}
