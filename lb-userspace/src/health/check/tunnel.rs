//! `check_through_tunnel = true`: besides the backend's own check, a TCP SYN to the VIP is sent
//! to the backend encapsulated as client traffic is (IPIP, or GUE inside UDP to the GUE port) and
//! must be answered by a SYN-ACK from the VIP. That proves what the plain check cannot: the
//! backend decapsulates, holds the VIP and serves it. (Katran's health-check forwarding does the
//! same with a TC program; here the kernel builds the outer headers: a raw IPIP socket, or a
//! UDP socket whose payload is the inner packet.)
//!
//! The SYN comes from the address this host would use towards the VIP; the backend answers it
//! directly, the SYN-ACK reaches this host's stack (the XDP program passes it: it is not
//! addressed to a VIP), a raw TCP socket sees it, and the kernel resets the half-open connection
//! because no socket of its own owns it.

use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use etherparse::{PacketBuilder, TcpHeaderSlice};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::time::Instant;

use super::{CheckFuture, CheckOutcome, CheckTarget, HealthCheck, io_reason};
use crate::config::Forward;

const IPPROTO_IPIP: i32 = 4;
const IPPROTO_IPV6: i32 = 41;

/// The backend's own check, then the probe through the tunnel; healthy when both pass.
#[derive(Debug)]
pub struct TunnelCheck {
    pub inner: std::sync::Arc<dyn HealthCheck>,
    /// The VIP (address and port) the probe's SYN goes to.
    pub vip: SocketAddr,
    /// How the VIP's packets are encapsulated (`Ipip` or `Gue`).
    pub forward: Forward,
}

impl HealthCheck for TunnelCheck {
    fn check<'a>(&'a self, target: &'a CheckTarget, timeout: Duration) -> CheckFuture<'a> {
        Box::pin(async move {
            let started = Instant::now();
            let own = self.inner.check(target, timeout).await;
            if !own.healthy {
                return own;
            }
            let left = timeout.saturating_sub(started.elapsed());
            let (backend, vip, forward) = (target.address, self.vip, self.forward);
            let probe =
                tokio::task::spawn_blocking(move || probe(backend, vip, forward, left)).await;
            let latency = started.elapsed();
            match probe {
                Ok(Ok(())) => CheckOutcome::ok(latency),
                Ok(Err(ProbeError::Timeout)) => CheckOutcome::failed(
                    format!(
                        "through the tunnel: no answer from {vip} within {}",
                        super::format_duration(timeout)
                    ),
                    latency,
                ),
                Ok(Err(ProbeError::Refused)) => CheckOutcome::failed(
                    format!("through the tunnel: {vip} refused (RST)"),
                    latency,
                ),
                Ok(Err(ProbeError::Io(what, error))) => CheckOutcome::failed(
                    format!("through the tunnel: {what}: {}", io_reason(&error)),
                    latency,
                ),
                Err(_) => CheckOutcome::failed("through the tunnel: probe task failed", latency),
            }
        })
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
}

enum ProbeError {
    Timeout,
    Refused,
    Io(&'static str, io::Error),
}

fn io_error(what: &'static str) -> impl FnOnce(io::Error) -> ProbeError {
    move |error| ProbeError::Io(what, error)
}

/// Sends one encapsulated SYN to `vip` through `backend` and waits up to `timeout` for the
/// answer. Blocking (raw sockets); run off the runtime.
fn probe(
    backend: IpAddr,
    vip: SocketAddr,
    forward: Forward,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let deadline = std::time::Instant::now() + timeout;
    // The source this host uses towards the VIP: where the backend's answer comes back to.
    let wildcard: SocketAddr = if vip.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let route = UdpSocket::bind(wildcard).map_err(io_error("binding a socket"))?;
    route
        .connect(vip)
        .map_err(io_error("finding the source towards the VIP"))?;
    let source = route.local_addr().map_err(io_error("reading it"))?.ip();
    let (sport, seq) = random_port_and_sequence();

    // Listen before sending: only TCP from the VIP, as the raw socket is connected to it.
    let domain = if vip.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let answers = Socket::new(domain, Type::RAW, Some(Protocol::TCP))
        .map_err(io_error("opening a raw TCP socket"))?;
    answers
        .connect(&SockAddr::from(SocketAddr::new(vip.ip(), 0)))
        .map_err(io_error("filtering it to the VIP"))?;

    let syn = build_syn(source, sport, vip, seq);
    match forward {
        Forward::Gue { port } => {
            let socket = UdpSocket::bind(if backend.is_ipv4() {
                SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))
            } else {
                SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
            })
            .map_err(io_error("binding the GUE socket"))?;
            socket
                .send_to(&syn, SocketAddr::new(backend, port))
                .map_err(io_error("sending the GUE probe"))?;
        }
        Forward::Ipip | Forward::L2 => {
            let (domain, protocol) = match (backend, vip.ip()) {
                (IpAddr::V4(_), _) => (Domain::IPV4, IPPROTO_IPIP),
                (IpAddr::V6(_), IpAddr::V4(_)) => (Domain::IPV6, IPPROTO_IPIP),
                (IpAddr::V6(_), IpAddr::V6(_)) => (Domain::IPV6, IPPROTO_IPV6),
            };
            let socket = Socket::new(domain, Type::RAW, Some(Protocol::from(protocol)))
                .map_err(io_error("opening a raw IPIP socket"))?;
            socket
                .send_to(&syn, &SockAddr::from(SocketAddr::new(backend, 0)))
                .map_err(io_error("sending the IPIP probe"))?;
        }
    }

    let mut buffer = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(ProbeError::Timeout);
        }
        answers
            .set_read_timeout(Some(left))
            .map_err(io_error("setting the timeout"))?;
        let length = match (&answers).read(&mut buffer) {
            Ok(length) => length,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ProbeError::Timeout);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ProbeError::Io("receiving", e)),
        };
        // IPv4 raw sockets deliver the IP header too; IPv6 ones only the payload.
        let segment = if vip.is_ipv4() {
            let header = usize::from(buffer[0] & 0x0f) * 4;
            buffer.get(header..length).unwrap_or(&[])
        } else {
            &buffer[..length]
        };
        let Ok(tcp) = TcpHeaderSlice::from_slice(segment) else {
            continue;
        };
        if tcp.source_port() != vip.port() || tcp.destination_port() != sport {
            continue;
        }
        if tcp.rst() {
            return Err(ProbeError::Refused);
        }
        if tcp.syn() && tcp.ack() && tcp.acknowledgment_number() == seq.wrapping_add(1) {
            return Ok(());
        }
    }
}

/// A TCP SYN from `source:sport` to the VIP, checksums and all.
fn build_syn(source: IpAddr, sport: u16, vip: SocketAddr, seq: u32) -> Vec<u8> {
    let builder = match (source, vip.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
        // The source was chosen by a socket connected to the VIP: always its family.
        _ => unreachable!("source {source} and VIP {vip} of different families"),
    }
    .tcp(sport, vip.port(), seq, 64240)
    .syn();
    let mut packet = Vec::with_capacity(builder.size(0));
    builder
        .write(&mut packet, &[])
        .expect("writing into a Vec cannot fail");
    packet
}

/// An ephemeral port and an initial sequence number that differ between probes.
fn random_port_and_sequence() -> (u16, u32) {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    let bits = hasher.finish();
    (49152 + (bits as u16) % 16384, (bits >> 32) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_syn_is_a_valid_syn_to_the_vip() {
        let vip: SocketAddr = "10.20.100.1:80".parse().unwrap();
        let packet = build_syn("10.20.2.2".parse().unwrap(), 50000, vip, 7);
        let sliced = etherparse::SlicedPacket::from_ip(&packet).expect("an IP packet");
        let Some(etherparse::NetSlice::Ipv4(ip)) = sliced.net else {
            panic!("not IPv4: {sliced:?}");
        };
        assert_eq!(ip.header().destination(), [10, 20, 100, 1]);
        assert_eq!(ip.header().source(), [10, 20, 2, 2]);
        let Some(etherparse::TransportSlice::Tcp(tcp)) = sliced.transport else {
            panic!("not TCP");
        };
        assert!(tcp.syn() && !tcp.ack());
        assert_eq!((tcp.source_port(), tcp.destination_port()), (50000, 80));
        assert_eq!(tcp.sequence_number(), 7);
        let checksum = tcp
            .to_header()
            .calc_checksum_ipv4(&ip.header().to_header(), &[])
            .unwrap();
        assert_eq!(tcp.checksum(), checksum);
    }
}
