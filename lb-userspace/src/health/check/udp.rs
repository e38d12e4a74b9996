//! UDP request/response check.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use super::{CheckFuture, CheckOutcome, CheckTarget, HealthCheck, io_reason};

/// The largest reply read; a longer datagram is cut there.
const MAX_REPLY: usize = 65_536;

/// Sends `send` from a connected UDP socket and waits for one reply. Healthy when a reply arrives
/// within the timeout and `expect` is `None` or found somewhere in the reply.
///
/// Reasons: `reply did not match`, `timeout after 500ms` (no reply), and `connection refused`
/// as soon as the backend's ICMP port unreachable comes back (a connected socket reports it as
/// `ECONNREFUSED`), without waiting for the timeout; likewise `host unreachable` and
/// `network unreachable`, from an ICMP error or from the host's own failed ARP or neighbour
/// discovery (the socket has `IP_RECVERR` on for that).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpCheck {
    pub send: Vec<u8>,
    pub expect: Option<Vec<u8>>,
}

impl UdpCheck {
    /// Whether `reply` passes.
    pub fn matches(&self, reply: &[u8]) -> bool {
        match &self.expect {
            None => true,
            Some(expect) if expect.is_empty() => true,
            Some(expect) => reply.windows(expect.len()).any(|window| window == expect),
        }
    }

    /// Sends the request and returns the first reply, or the failure's reason.
    async fn exchange(&self, target: &CheckTarget) -> Result<Vec<u8>, String> {
        let local = match target.address {
            IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            IpAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        };
        let socket = UdpSocket::bind(local)
            .await
            .map_err(|error| io_reason(&error))?;
        // Without IP_RECVERR a UDP socket reports only "fatal" ICMP errors (port unreachable);
        // with it, host and network unreachable too (from a router, or from this host when ARP
        // or neighbour discovery for the backend fails), instead of waiting for the timeout.
        let recverr = match target.address {
            IpAddr::V4(_) => setsockopt(&socket, sockopt::Ipv4RecvErr, &true),
            IpAddr::V6(_) => setsockopt(&socket, sockopt::Ipv6RecvErr, &true),
        };
        recverr.map_err(|errno| format!("IP_RECVERR: {}", errno.desc()))?;
        socket
            .connect(target.socket_addr())
            .await
            .map_err(|error| io_reason(&error))?;
        socket
            .send(&self.send)
            .await
            .map_err(|error| io_reason(&error))?;
        let mut reply = vec![0; MAX_REPLY];
        let length = socket
            .recv(&mut reply)
            .await
            .map_err(|error| io_reason(&error))?;
        reply.truncate(length);
        Ok(reply)
    }
}

impl HealthCheck for UdpCheck {
    fn check<'a>(&'a self, target: &'a CheckTarget, timeout: Duration) -> CheckFuture<'a> {
        Box::pin(async move {
            let started = Instant::now();
            let result = tokio::time::timeout(timeout, self.exchange(target)).await;
            let latency = started.elapsed();
            match result {
                Ok(Ok(reply)) if self.matches(&reply) => CheckOutcome::ok(latency),
                Ok(Ok(_)) => CheckOutcome::failed("reply did not match", latency),
                Ok(Err(reason)) => CheckOutcome::failed(reason, latency),
                Err(_) => CheckOutcome::timed_out(timeout, latency),
            }
        })
    }

    fn kind(&self) -> &'static str {
        "udp"
    }
}
