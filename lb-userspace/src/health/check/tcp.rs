//! TCP connect check.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{CheckFuture, CheckOutcome, CheckTarget, HealthCheck, io_reason};

/// Healthy when a TCP connection to the backend is established; the connection is closed at once
/// (a normal FIN, so the backend sees an ordinary short connection).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpCheck;

impl HealthCheck for TcpCheck {
    fn check<'a>(&'a self, target: &'a CheckTarget, timeout: Duration) -> CheckFuture<'a> {
        Box::pin(async move {
            let started = Instant::now();
            let result =
                tokio::time::timeout(timeout, TcpStream::connect(target.socket_addr())).await;
            let latency = started.elapsed();
            match result {
                Ok(Ok(stream)) => {
                    drop(stream);
                    CheckOutcome::ok(latency)
                }
                Ok(Err(error)) => CheckOutcome::failed(io_reason(&error), latency),
                Err(_) => CheckOutcome::timed_out(timeout, latency),
            }
        })
    }

    fn kind(&self) -> &'static str {
        "tcp"
    }
}
