//! Rise/fall debouncing of one backend's check results.
//!
//! A backend starts `Unknown` and takes the state of its first result at once (so no traffic
//! waits `rise` intervals at start-up, and none goes to a backend that failed its first check;
//! the checker repeats a failed first check before it reports it, see `schedule`).
//! After that it goes down only after `fall` consecutive failures and comes back only after
//! `rise` consecutive passes, so a backend flapping faster than that never changes state.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// No result yet: not in service.
    Unknown,
    Up,
    Down,
}

impl Health {
    pub const fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Up => "up",
            Health::Down => "down",
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state change: `from` → `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: Health,
    pub to: Health,
}

#[derive(Clone, Debug)]
pub struct HealthTracker {
    rise: u32,
    fall: u32,
    state: Health,
    /// Consecutive results that disagree with `state` (passes while down, failures while up).
    streak: u32,
}

impl HealthTracker {
    /// `rise` and `fall` are at least 1 (the config guarantees it; 0 is treated as 1).
    pub fn new(rise: u32, fall: u32) -> Self {
        Self {
            rise: rise.max(1),
            fall: fall.max(1),
            state: Health::Unknown,
            streak: 0,
        }
    }

    /// A tracker that continues from `state` (a backend whose check settings a reload changed,
    /// or whose state a restarted daemon adopted): no transition until the results disagree
    /// with it `rise` or `fall` times in a row.
    pub fn resuming(rise: u32, fall: u32, state: Health) -> Self {
        Self {
            state,
            ..Self::new(rise, fall)
        }
    }

    pub fn state(&self) -> Health {
        self.state
    }

    /// The state the next disagreeing result will move the backend to, when the results have
    /// already begun to disagree and exactly one more is needed (`fall - 1` failures while up,
    /// `rise - 1` passes while down). `None` otherwise, and always with `rise` or `fall` = 1: the
    /// change is then never announced by an earlier result. The daemon prepares the likely next
    /// ring on it, so the deciding result goes live without a Maglev build.
    pub fn on_the_brink(&self) -> Option<Health> {
        let (threshold, next) = match self.state {
            Health::Up => (self.fall, Health::Down),
            Health::Down => (self.rise, Health::Up),
            Health::Unknown => return None,
        };
        (self.streak >= 1 && self.streak + 1 == threshold).then_some(next)
    }

    /// Records one check result; returns the transition it caused, if any.
    pub fn record(&mut self, healthy: bool) -> Option<Transition> {
        let from = self.state;
        let to = match (from, healthy) {
            (Health::Unknown, true) => Health::Up,
            (Health::Unknown, false) => Health::Down,
            (Health::Up, true) | (Health::Down, false) => {
                self.streak = 0;
                return None;
            }
            (Health::Up, false) => {
                self.streak += 1;
                if self.streak < self.fall {
                    return None;
                }
                Health::Down
            }
            (Health::Down, true) => {
                self.streak += 1;
                if self.streak < self.rise {
                    return None;
                }
                Health::Up
            }
        };
        self.state = to;
        self.streak = 0;
        Some(Transition { from, to })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(tracker: &mut HealthTracker, results: &[bool]) -> Vec<Option<Health>> {
        results
            .iter()
            .map(|&r| tracker.record(r).map(|t| t.to))
            .collect()
    }

    #[test]
    fn the_first_result_decides_at_once() {
        assert_eq!(
            HealthTracker::new(2, 3).record(true),
            Some(Transition {
                from: Health::Unknown,
                to: Health::Up
            })
        );
        assert_eq!(
            HealthTracker::new(2, 3).record(false),
            Some(Transition {
                from: Health::Unknown,
                to: Health::Down
            })
        );
    }

    #[test]
    fn down_after_exactly_fall_failures_up_after_exactly_rise_passes() {
        let mut t = HealthTracker::new(2, 3);
        let got = feed(&mut t, &[true, false, false, false, true, true, true]);
        let up = Some(Health::Up);
        let down = Some(Health::Down);
        assert_eq!(got, vec![up, None, None, down, None, up, None]);
    }

    #[test]
    fn a_broken_streak_starts_over() {
        let mut t = HealthTracker::new(2, 3);
        t.record(true);
        // Two failures, a pass, two failures: never three in a row.
        assert_eq!(
            feed(&mut t, &[false, false, true, false, false]),
            vec![None; 5]
        );
        assert_eq!(t.state(), Health::Up);
        assert_eq!(
            t.record(false),
            Some(Transition {
                from: Health::Up,
                to: Health::Down
            })
        );
        // Down: one pass, one failure, one pass: never two passes in a row.
        assert_eq!(feed(&mut t, &[true, false, true, false]), vec![None; 4]);
        assert_eq!(t.state(), Health::Down);
    }

    #[test]
    fn rise_and_fall_of_one_react_to_every_change() {
        let mut t = HealthTracker::new(1, 1);
        let got = feed(&mut t, &[true, false, true, true, false]);
        assert_eq!(
            got,
            vec![
                Some(Health::Up),
                Some(Health::Down),
                Some(Health::Up),
                None,
                Some(Health::Down)
            ]
        );
    }

    #[test]
    fn on_the_brink_one_result_before_the_change_and_never_with_a_threshold_of_one() {
        let mut t = HealthTracker::new(2, 3);
        assert_eq!(t.on_the_brink(), None, "unknown");
        t.record(true);
        assert_eq!(t.on_the_brink(), None, "up, no failure yet");
        t.record(false);
        assert_eq!(t.on_the_brink(), None, "one failure of three");
        t.record(false);
        assert_eq!(t.on_the_brink(), Some(Health::Down), "two of three");
        t.record(true);
        assert_eq!(t.on_the_brink(), None, "a pass ends the streak");
        t.record(false);
        t.record(false);
        assert_eq!(t.record(false).map(|t| t.to), Some(Health::Down));
        assert_eq!(t.on_the_brink(), None, "just went down");
        t.record(true);
        assert_eq!(t.on_the_brink(), Some(Health::Up), "one pass of two");
        assert_eq!(t.record(true).map(|t| t.to), Some(Health::Up));
        assert_eq!(t.on_the_brink(), None);

        let mut hair_trigger = HealthTracker::new(1, 1);
        hair_trigger.record(true);
        assert_eq!(hair_trigger.on_the_brink(), None);
        hair_trigger.record(false);
        assert_eq!(hair_trigger.on_the_brink(), None);
    }
}
