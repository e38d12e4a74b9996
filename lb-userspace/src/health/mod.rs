//! Health checking: checkers (one small trait, one impl per kind), the per-backend schedule, the
//! rise/fall state machine, and the supervisor that ties them to the config.

pub mod check;
pub mod schedule;
pub mod state;
pub mod supervisor;
#[cfg(test)]
mod timeline_tests;

use std::sync::Arc;

use check::{ExecCheck, HealthCheck, HttpCheck, NoneCheck, TcpCheck, UdpCheck};

pub use state::{Health, HealthTracker, Transition};

use crate::config::{CheckKind, HealthConfig};

/// The checker a backend's effective health settings ask for.
pub fn checker_for(health: &HealthConfig, vip_name: &str) -> Arc<dyn HealthCheck> {
    match health.check {
        CheckKind::Tcp => Arc::new(TcpCheck),
        CheckKind::Http => Arc::new(HttpCheck {
            path: health.path.clone(),
            expect_status: health.expect_status.clone(),
            host: health.host.clone(),
        }),
        CheckKind::Udp => Arc::new(UdpCheck {
            send: health.send.clone(),
            expect: health.expect.clone(),
        }),
        CheckKind::Exec => Arc::new(ExecCheck {
            command: health.command.clone(),
            vip_name: vip_name.to_owned(),
        }),
        CheckKind::None => Arc::new(NoneCheck),
    }
}
