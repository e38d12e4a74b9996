//! TCP connect check.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{CheckFuture, CheckOutcome, CheckTarget, HealthCheck, io_reason};

/// Healthy when a TCP connection to the backend is established; the connection is then reset at
/// once (`SO_LINGER` 0): closing it with a FIN would leave a TIME_WAIT socket on the load
/// balancer for every check (about 60 per backend at one check a second), which is what
/// HAProxy's checks avoid the same way.
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
                    close_without_time_wait(stream);
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

/// Closes `stream` with a reset, so no TIME_WAIT socket stays behind on this host. With a zero
/// linger the close does not block (the reason tokio deprecates other linger values).
fn close_without_time_wait(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}
