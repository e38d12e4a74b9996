//! One task per backend: run its check every `interval` (minus a little jitter, so checks of many
//! backends spread out and detection never takes longer than configured) and report each result.
//! The first check runs at once, so a backend can enter service as soon as it passes. A backend
//! without a state yet that fails its first check is checked again at once and only that second
//! result is reported: one slow answer while a node starts (its own start-up loads the CPU) must
//! not keep a healthy backend out of the first ring, because taking it in a moment later changes
//! ring slots on this node alone, and connections that move here from a peer then go astray.

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
    /// Repeat a failed first check at once and report only the repeat (for a backend that has
    /// no state yet; a checker that resumes a known state reports every result).
    pub confirm_first_failure: bool,
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
        let mut confirm = schedule.confirm_first_failure;
        loop {
            let started = Instant::now();
            let mut outcome = check.check(&target, schedule.timeout).await;
            if std::mem::take(&mut confirm) && !outcome.healthy {
                outcome = check.check(&target, schedule.timeout).await;
            }
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::health::check::{CheckFuture, CheckOutcome};

    /// Fails its first `failures` calls, then passes; counts the calls.
    #[derive(Debug)]
    struct FailsFirst {
        failures: u32,
        calls: AtomicU32,
    }

    impl HealthCheck for FailsFirst {
        fn check<'a>(&'a self, _target: &'a CheckTarget, _timeout: Duration) -> CheckFuture<'a> {
            let call = self.calls.fetch_add(1, Ordering::SeqCst);
            let healthy = call >= self.failures;
            Box::pin(async move {
                if healthy {
                    CheckOutcome::ok(Duration::ZERO)
                } else {
                    CheckOutcome::failed("timed out", Duration::ZERO)
                }
            })
        }

        fn kind(&self) -> &'static str {
            "fails-first"
        }
    }

    /// The first two reports of a checker whose check fails `failures` times, and the number of
    /// checks run by the time the second report came.
    async fn first_reports(failures: u32, confirm_first_failure: bool) -> (Vec<bool>, u32) {
        let check = Arc::new(FailsFirst {
            failures,
            calls: AtomicU32::new(0),
        });
        let (tx, mut rx) = mpsc::channel(4);
        let task = spawn_checker(
            CheckerKey {
                backend: 7,
                generation: 0,
            },
            check.clone(),
            CheckTarget {
                address: [127, 0, 0, 1].into(),
                port: 80,
            },
            Schedule {
                interval: Duration::from_secs(1),
                timeout: Duration::from_millis(300),
                jitter: 0.0,
                confirm_first_failure,
            },
            tx,
        );
        let mut healthy = Vec::new();
        for _ in 0..2 {
            let report = rx.recv().await.expect("the checker reports");
            healthy.push(report.outcome.healthy);
        }
        task.abort();
        (healthy, check.calls.load(Ordering::SeqCst))
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_first_check_of_a_new_backend_is_repeated_before_it_counts() {
        // One slow first answer: the repeat passes, and that is the first result.
        assert_eq!(first_reports(1, true).await, (vec![true, true], 3));
        // A backend that is really down: reported down after two checks, then checked on schedule.
        assert_eq!(first_reports(5, true).await, (vec![false, false], 3));
        // A checker resuming a known state reports every result.
        assert_eq!(first_reports(1, false).await, (vec![false, true], 2));
    }
}
