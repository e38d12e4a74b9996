//! Health checkers: each runs ONE check against a backend and reports the outcome. Scheduling,
//! intervals, jitter and rise/fall live elsewhere (`health::schedule`, `health::state`).
//!
//! One small trait, [`HealthCheck`], one implementation per kind:
//!
//! | kind   | type          | healthy when                                                       |
//! | ------ | ------------- | ------------------------------------------------------------------ |
//! | `tcp`  | [`TcpCheck`]  | a TCP connection is established (and closed at once)               |
//! | `http` | [`HttpCheck`] | an HTTP/1.1 `GET` answers with one of the expected status codes    |
//! | `udp`  | [`UdpCheck`]  | a datagram is answered (with a reply containing the expected bytes) |
//! | `exec` | [`ExecCheck`] | a command exits 0                                                  |
//! | `none` | [`NoneCheck`] | always                                                             |
//!
//! [`TunnelCheck`] wraps any of them for `check_through_tunnel = true`: the backend must also
//! answer a SYN to the VIP sent through the tunnel.
//!
//! Every check finishes within its timeout (plus the few milliseconds an exec check needs to kill
//! and reap its command), never panics and never hangs. Dropping a check's future cancels it; an
//! exec check then still kills its command's process group.
//!
//! [`CheckOutcome::reason`] is short and meant for logs and `lb status`: `ok`, `no check`,
//! `connection refused`, `timeout after 500ms`, `HTTP 503`, `exit 2`, `killed by signal 9`,
//! `killed after timeout 500ms`, `reply did not match`, `network unreachable`,
//! `host unreachable`, `cannot run /path: No such file or directory`, or the OS error text
//! (`Connection reset by peer`).

mod exec;
mod http;
mod none;
mod tcp;
mod tunnel;
mod udp;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::time::Duration;

pub use exec::ExecCheck;
pub use http::HttpCheck;
pub use none::NoneCheck;
pub use tcp::TcpCheck;
pub use tunnel::TunnelCheck;
pub use udp::UdpCheck;

/// What to check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckTarget {
    pub address: IpAddr,
    pub port: u16,
}

impl CheckTarget {
    pub fn new(address: IpAddr, port: u16) -> Self {
        Self { address, port }
    }

    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }
}

/// One check's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckOutcome {
    pub healthy: bool,
    /// Short and human, for logs and `lb status`; see the module documentation for the forms.
    pub reason: String,
    /// From the start of the check to its outcome (for a timeout: about the timeout).
    pub latency: Duration,
}

impl CheckOutcome {
    /// A passed check, reason `ok`.
    pub fn ok(latency: Duration) -> Self {
        Self {
            healthy: true,
            reason: "ok".to_owned(),
            latency,
        }
    }

    /// A failed check.
    pub fn failed(reason: impl Into<String>, latency: Duration) -> Self {
        Self {
            healthy: false,
            reason: reason.into(),
            latency,
        }
    }

    /// A check that ran out of time: reason `timeout after 500ms`.
    pub fn timed_out(timeout: Duration, latency: Duration) -> Self {
        Self::failed(
            format!("timeout after {}", format_duration(timeout)),
            latency,
        )
    }
}

/// The future a [`HealthCheck`] returns.
pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = CheckOutcome> + Send + 'a>>;

/// A health check, pingora-style: one small trait, one impl per kind.
pub trait HealthCheck: Send + Sync + std::fmt::Debug {
    /// Runs one check; finishes within `timeout` (+ a few ms), never panics, never hangs.
    fn check<'a>(&'a self, target: &'a CheckTarget, timeout: Duration) -> CheckFuture<'a>;

    /// `"tcp"`, `"http"`, `"udp"`, `"exec"` or `"none"`.
    fn kind(&self) -> &'static str;
}

/// Formats a duration with one short unit, like the config's: `500ms`, `1s`, `1.5s`, `250us`,
/// `0s`. Durations of a second or more are in seconds (`90s`), shorter ones in the largest unit
/// that keeps a whole part; fractions keep only their significant digits.
pub fn format_duration(duration: Duration) -> String {
    let nanos = duration.as_nanos();
    if nanos == 0 {
        return "0s".to_owned();
    }
    let (per_unit, unit, digits) = if nanos >= 1_000_000_000 {
        (1_000_000_000, "s", 9)
    } else if nanos >= 1_000_000 {
        (1_000_000, "ms", 6)
    } else if nanos >= 1_000 {
        (1_000, "us", 3)
    } else {
        (1, "ns", 0)
    };
    let whole = nanos / per_unit;
    let fraction = nanos % per_unit;
    if fraction == 0 {
        format!("{whole}{unit}")
    } else {
        let fraction = format!("{fraction:0digits$}");
        format!("{whole}.{}{unit}", fraction.trim_end_matches('0'))
    }
}

/// The reason for a failed socket operation: `connection refused`, `network unreachable`,
/// `host unreachable`, or the OS error text (`Connection reset by peer`).
pub(crate) fn io_reason(error: &io::Error) -> String {
    match error.raw_os_error() {
        Some(libc::ECONNREFUSED) => "connection refused".to_owned(),
        Some(libc::ENETUNREACH) => "network unreachable".to_owned(),
        Some(libc::EHOSTUNREACH) => "host unreachable".to_owned(),
        Some(_) => os_error_text(error),
        None => match error.kind() {
            io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
            io::ErrorKind::NetworkUnreachable => "network unreachable".to_owned(),
            io::ErrorKind::HostUnreachable => "host unreachable".to_owned(),
            _ => error.to_string(),
        },
    }
}

/// The OS's text for an error, without std's ` (os error N)` suffix: `No such file or directory`.
pub(crate) fn os_error_text(error: &io::Error) -> String {
    match error.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_owned(),
        None => error.to_string(),
    }
}
