//! Queries counted by type and result, for `lb status` and `lb_dns_queries_total`.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use super::answer::Outcome;

/// Counts by (qtype, rcode); both come from fixed sets (see [`Outcome`]), so the map stays small.
#[derive(Debug, Default)]
pub struct QueryStats {
    counts: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    truncated: std::sync::atomic::AtomicU64,
}

impl QueryStats {
    pub fn count(&self, outcome: &Outcome) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        *counts.entry((outcome.qtype, outcome.rcode)).or_default() += 1;
        if outcome.truncated {
            self.truncated
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Every (qtype, rcode) seen so far with its count.
    pub fn snapshot(&self) -> Vec<((&'static str, &'static str), u64)> {
        let counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        counts.iter().map(|(k, v)| (*k, *v)).collect()
    }

    /// UDP answers sent truncated (TC set).
    pub fn truncated(&self) -> u64 {
        self.truncated.load(std::sync::atomic::Ordering::Relaxed)
    }
}
