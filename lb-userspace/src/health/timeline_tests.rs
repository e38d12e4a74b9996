//! The health machinery on a paused tokio clock: checker schedule + rise/fall + pool choice,
//! with scripted check results, asserting the exact (virtual) times of every transition.

use std::{sync::Arc, time::Duration};

use tokio::{sync::mpsc, time::Instant};

use super::{
    check::{CheckFuture, CheckOutcome, CheckTarget, HealthCheck},
    schedule::{CheckReport, CheckerKey, Schedule, spawn_checker},
    state::{Health, HealthTracker},
};
use crate::pool::{self, ActivePool, Member};

/// A check whose result is a function of the time since the test started.
struct Scripted {
    start: Instant,
    healthy_at: Box<dyn Fn(Duration) -> bool + Send + Sync>,
}

impl std::fmt::Debug for Scripted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scripted")
    }
}

impl HealthCheck for Scripted {
    fn check<'a>(&'a self, _target: &'a CheckTarget, _timeout: Duration) -> CheckFuture<'a> {
        let healthy = (self.healthy_at)(self.start.elapsed());
        Box::pin(async move {
            if healthy {
                CheckOutcome::ok(Duration::ZERO)
            } else {
                CheckOutcome::failed("connection refused", Duration::ZERO)
            }
        })
    }

    fn kind(&self) -> &'static str {
        "scripted"
    }
}

const SECOND: Duration = Duration::from_secs(1);

struct Backend {
    standby: bool,
    healthy_at: Box<dyn Fn(Duration) -> bool + Send + Sync>,
}

/// What happened, at which virtual time since the start.
#[derive(Debug, PartialEq)]
enum Event {
    Backend {
        index: usize,
        to: Health,
        at: Duration,
    },
    Pool {
        to: ActivePool,
        at: Duration,
    },
}

/// Runs the backends' checkers for `duration` (interval 1 s, no jitter) and returns every health
/// transition and pool change in order.
async fn timeline(
    backends: Vec<Backend>,
    rise: u32,
    fall: u32,
    min_healthy: u32,
    duration: Duration,
) -> Vec<Event> {
    let start = Instant::now();
    let (tx, mut rx) = mpsc::channel::<CheckReport>(64);
    let schedule = Schedule {
        interval: SECOND,
        timeout: Duration::from_millis(500),
        jitter: 0.0,
        // As the daemon starts checkers of new backends (a scripted repeat at the same virtual
        // instant gives the same result, so the timelines are those of single checks).
        confirm_first_failure: true,
    };
    let standby: Vec<bool> = backends.iter().map(|b| b.standby).collect();
    let tasks: Vec<_> = backends
        .into_iter()
        .enumerate()
        .map(|(i, b)| {
            let check = Arc::new(Scripted {
                start,
                healthy_at: b.healthy_at,
            });
            let target = CheckTarget {
                address: [127, 0, 0, 1].into(),
                port: 80,
            };
            spawn_checker(
                CheckerKey {
                    backend: i as u32,
                    generation: 0,
                },
                check,
                target,
                schedule,
                tx.clone(),
            )
        })
        .collect();
    drop(tx);
    let mut trackers: Vec<HealthTracker> = standby
        .iter()
        .map(|_| HealthTracker::new(rise, fall))
        .collect();
    let mut pool = ActivePool::None;
    let mut events = Vec::new();
    while let Ok(Some(report)) = tokio::time::timeout_at(start + duration, rx.recv()).await {
        let index = report.checker.backend as usize;
        let at = report.at - start;
        if let Some(t) = trackers[index].record(report.outcome.healthy) {
            events.push(Event::Backend {
                index,
                to: t.to,
                at,
            });
            let members: Vec<Member> = trackers
                .iter()
                .zip(&standby)
                .map(|(t, &standby)| Member {
                    standby,
                    usable: t.state() == Health::Up,
                })
                .collect();
            let now = pool::select(&members, min_healthy);
            if now != pool {
                pool = now;
                events.push(Event::Pool { to: now, at });
            }
        }
    }
    for task in tasks {
        task.abort();
    }
    events
}

fn always(healthy: bool) -> Box<dyn Fn(Duration) -> bool + Send + Sync> {
    Box::new(move |_| healthy)
}

#[tokio::test(start_paused = true)]
async fn at_start_up_the_first_check_decides_at_once() {
    let events = timeline(
        vec![
            Backend {
                standby: false,
                healthy_at: always(true),
            },
            Backend {
                standby: false,
                healthy_at: always(false),
            },
        ],
        2,
        3,
        1,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        events,
        vec![
            Event::Backend {
                index: 0,
                to: Health::Up,
                at: Duration::ZERO
            },
            Event::Pool {
                to: ActivePool::Primary,
                at: Duration::ZERO
            },
            Event::Backend {
                index: 1,
                to: Health::Down,
                at: Duration::ZERO
            },
        ],
        "no rise wait for a healthy backend, no traffic window for a failing one"
    );
}

#[tokio::test(start_paused = true)]
async fn down_after_exactly_fall_failed_checks_up_after_exactly_rise_passes() {
    // Fails from 10.5 s to 20.5 s: failing checks at 11, 12, 13 → down at 13 (fall 3);
    // passing checks at 21, 22 → up at 22 (rise 2).
    let flaky = Box::new(|t: Duration| {
        !(t > Duration::from_millis(10_500) && t < Duration::from_millis(20_500))
    });
    let events = timeline(
        vec![
            Backend {
                standby: false,
                healthy_at: flaky,
            },
            Backend {
                standby: true,
                healthy_at: always(true),
            },
        ],
        2,
        3,
        1,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        events,
        vec![
            Event::Backend {
                index: 0,
                to: Health::Up,
                at: Duration::ZERO
            },
            Event::Pool {
                to: ActivePool::Primary,
                at: Duration::ZERO
            },
            Event::Backend {
                index: 1,
                to: Health::Up,
                at: Duration::ZERO
            },
            Event::Backend {
                index: 0,
                to: Health::Down,
                at: 13 * SECOND
            },
            Event::Pool {
                to: ActivePool::Standby,
                at: 13 * SECOND
            },
            Event::Backend {
                index: 0,
                to: Health::Up,
                at: 22 * SECOND
            },
            Event::Pool {
                to: ActivePool::Primary,
                at: 22 * SECOND
            },
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_backend_flapping_faster_than_rise_and_fall_never_flips_the_pool() {
    // Primary 0 fails two checks of every three (never `fall` = 3 in a row); primary 1 is down
    // and passes one check of every two (never `rise` = 2 in a row). With min_healthy = 1 the
    // pool must stay on the primaries for the whole minute.
    let up_flapping = Box::new(|t: Duration| (t.as_secs() % 3) == 2);
    let down_flapping = Box::new(|t: Duration| t.as_secs() > 0 && t.as_secs() % 2 == 1);
    let events = timeline(
        vec![
            Backend {
                standby: false,
                healthy_at: Box::new(move |t| t.is_zero() || up_flapping(t)),
            },
            Backend {
                standby: false,
                healthy_at: down_flapping,
            },
            Backend {
                standby: true,
                healthy_at: always(true),
            },
        ],
        2,
        3,
        1,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        events,
        vec![
            Event::Backend {
                index: 0,
                to: Health::Up,
                at: Duration::ZERO
            },
            Event::Pool {
                to: ActivePool::Primary,
                at: Duration::ZERO
            },
            Event::Backend {
                index: 1,
                to: Health::Down,
                at: Duration::ZERO
            },
            Event::Backend {
                index: 2,
                to: Health::Up,
                at: Duration::ZERO
            },
        ],
        "flapping must cause no transition and no pool flip"
    );
}
