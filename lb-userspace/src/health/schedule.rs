//! One task per backend: run its check every `interval` (minus a little jitter, so checks of many
//! backends spread out and detection never takes longer than configured) and report each result.
//! The first check runs at once, so a backend can enter service as soon as it passes.

use std::{sync::Arc, time::Duration};

use tokio::{sync::mpsc, task::JoinHandle, time::Instant};

use super::check::{CheckOutcome, CheckTarget, HealthCheck};

/// When and how long to check.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub interval: Duration,
    pub timeout: Duration,
    /// Fraction of `interval` by which a check may come early (0.0 = exact, for tests).
    pub jitter: f64,
}

/// The default jitter: checks come up to 10% of an interval early.
pub const DEFAULT_JITTER: f64 = 0.1;

/// Which checker a result comes from: the backend's data-plane id (stable across reloads) and
/// the checker's generation. A reload that changes a backend's check settings starts a new
/// generation; results of the old checker still queued are then recognised and ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CheckerKey {
    pub backend: u32,
    pub generation: u64,
}

#[derive(Clone, Debug)]
pub struct CheckReport {
    pub checker: CheckerKey,
    pub outcome: CheckOutcome,
    /// When the check finished.
    pub at: Instant,
}

/// Spawns the checker task of one backend; it ends when the receiver is dropped or the handle is
/// aborted.
pub fn spawn_checker(
    checker: CheckerKey,
    check: Arc<dyn HealthCheck>,
    target: CheckTarget,
    schedule: Schedule,
    reports: mpsc::Sender<CheckReport>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut jitter = Jitter::new(checker);
        loop {
            let started = Instant::now();
            let outcome = check.check(&target, schedule.timeout).await;
            let report = CheckReport {
                checker,
                outcome,
                at: Instant::now(),
            };
            if reports.send(report).await.is_err() {
                return;
            }
            let early = schedule
                .interval
                .mul_f64(schedule.jitter * jitter.next_unit());
            tokio::time::sleep_until(started + schedule.interval - early).await;
        }
    })
}

/// A tiny deterministic xorshift per backend: jitter needs spread, not cryptographic randomness.
struct Jitter(u64);

impl Jitter {
    fn new(
        CheckerKey {
            backend,
            generation,
        }: CheckerKey,
    ) -> Self {
        Self(
            0x9e37_79b9_7f4a_7c15
                ^ (generation << 32)
                ^ u64::from(backend).wrapping_mul(0x2545_f491_4f6c_dd1d)
                | 1,
        )
    }

    /// Uniform in [0, 1).
    fn next_unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}
