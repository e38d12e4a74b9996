//! No check: the backend is always healthy.

use std::time::Duration;

use super::{CheckFuture, CheckOutcome, CheckTarget, HealthCheck};

/// Always healthy, reason `no check`, latency 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoneCheck;

impl HealthCheck for NoneCheck {
    fn check<'a>(&'a self, _target: &'a CheckTarget, _timeout: Duration) -> CheckFuture<'a> {
        Box::pin(async {
            CheckOutcome {
                healthy: true,
                reason: "no check".to_owned(),
                latency: Duration::ZERO,
            }
        })
    }

    fn kind(&self) -> &'static str {
        "none"
    }
}
