//! Turns the stream of check results into health transitions, one tracker per backend, and
//! starts the checker tasks from the config.

use std::{collections::HashMap, sync::Arc};

use tokio::{sync::mpsc, task::JoinHandle};

use super::{
    check::{CheckOutcome, CheckTarget, HealthCheck},
    checker_for,
    schedule::{BackendKey, CheckReport, DEFAULT_JITTER, Schedule, spawn_checker},
    state::{Health, HealthTracker, Transition},
};
use crate::config::Config;

/// Health of every backend of a config.
pub struct Supervisor {
    trackers: HashMap<BackendKey, HealthTracker>,
    last: HashMap<BackendKey, CheckOutcome>,
}

impl Supervisor {
    pub fn new(config: &Config) -> Self {
        let trackers = config
            .vips
            .iter()
            .enumerate()
            .flat_map(|(v, vip)| {
                vip.backends.iter().enumerate().map(move |(b, be)| {
                    ((v, b), HealthTracker::new(be.health.rise, be.health.fall))
                })
            })
            .collect();
        Self {
            trackers,
            last: HashMap::new(),
        }
    }

    /// Records a result; returns the transition it caused, if any.
    pub fn record(&mut self, report: &CheckReport) -> Option<Transition> {
        self.last.insert(report.backend, report.outcome.clone());
        self.trackers
            .get_mut(&report.backend)?
            .record(report.outcome.healthy)
    }

    pub fn health(&self, backend: BackendKey) -> Health {
        self.trackers
            .get(&backend)
            .map_or(Health::Unknown, HealthTracker::state)
    }

    /// The latest result of a backend's check.
    pub fn last_outcome(&self, backend: BackendKey) -> Option<&CheckOutcome> {
        self.last.get(&backend)
    }

    /// Backends without a first result yet.
    pub fn pending(&self) -> usize {
        self.trackers
            .values()
            .filter(|t| t.state() == Health::Unknown)
            .count()
    }
}

/// Starts one checker task per backend of `config`, reporting to `reports`.
pub fn spawn_checkers(config: &Config, reports: &mpsc::Sender<CheckReport>) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    for (v, vip) in config.vips.iter().enumerate() {
        for (b, backend) in vip.backends.iter().enumerate() {
            let check: Arc<dyn HealthCheck> = checker_for(&backend.health, &vip.name);
            let target = CheckTarget {
                address: backend.address,
                port: backend.health.port,
            };
            let schedule = Schedule {
                interval: backend.health.interval,
                timeout: backend.health.timeout,
                jitter: DEFAULT_JITTER,
            };
            tasks.push(spawn_checker(
                (v, b),
                check,
                target,
                schedule,
                reports.clone(),
            ));
        }
    }
    tasks
}
