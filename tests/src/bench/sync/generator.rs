//! The sync bench's traffic: one UDP packet per new flow, paced at a given rate, sent as
//! ready-made Ethernet frames through an `AF_PACKET` socket on the router's segment interface,
//! addressed to node A's MAC. That is the frame the router would forward to A, minus the
//! router's own forwarding work (2 shared cores: the daemons need the rest), and it goes to A
//! whatever the router's ECMP route says.
//!
//! Flow `n` comes from [`client_of`]`(n)`: 16384 source ports per client address, addresses
//! from 10.202.0.0 up, so every flow number is another 5-tuple and a new flow for A's data plane
//! (each phase of the bench uses its own range of numbers).
//!
//! Pacing: flow `k` of a phase is due `k / rate` seconds after its start. The generator sends
//! whatever is due in one `sendmmsg` (at most [`BATCH`] frames), then sleeps until the next flow
//! is due. At 50k flows/s that is about 50 frames per millisecond wake-up; a generator that falls
//! behind sends back to back and the achieved rate (flows sent over the phase's wall time) shows
//! it. A flow's t0 is the instant just before the `sendmmsg` that carries its only packet.

use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::frames::FrameSpec;
use crate::links::MacAddress;

/// Frames per `sendmmsg` at most (a veth backlog holds 1000).
pub const BATCH: usize = 64;
/// The first client address; flows count up from it.
const CLIENT_BASE: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 0);
/// Source ports per client address, from [`PORT_BASE`].
const PORTS_PER_ADDRESS: u32 = 16_384;
const PORT_BASE: u32 = 16_384;
/// UDP payload: 18 bytes make the minimum Ethernet frame (60 bytes without FCS).
const PAYLOAD: [u8; 18] = *b"lb-sync-bench-flow";

/// The client (address and source port) of flow `n`.
pub fn client_of(n: u32) -> (Ipv4Addr, u16) {
    let address = Ipv4Addr::from(u32::from(CLIENT_BASE) + n / PORTS_PER_ADDRESS);
    // At most PORT_BASE + PORTS_PER_ADDRESS - 1 = 32767.
    let port = (PORT_BASE + n % PORTS_PER_ADDRESS) as u16;
    (address, port)
}

/// The addresses every frame carries.
#[derive(Clone, Copy, Debug)]
pub struct Frames {
    pub src_mac: MacAddress,
    pub dst_mac: MacAddress,
    pub vip: Ipv4Addr,
    pub port: u16,
}

impl Frames {
    /// The one packet of flow `n` (valid IPv4 and UDP checksums).
    pub fn frame(&self, n: u32) -> Vec<u8> {
        let (client, sport) = client_of(n);
        let mut spec = FrameSpec::udp(
            IpAddr::V4(client),
            sport,
            IpAddr::V4(self.vip),
            self.port,
            &PAYLOAD,
        );
        spec.src_mac = self.src_mac.octets();
        spec.dst_mac = self.dst_mac.octets();
        spec.build()
    }
}

/// A raw `AF_PACKET` socket bound to one interface, for sending only (protocol 0: it receives
/// nothing). Sends skip the qdisc (`PACKET_QDISC_BYPASS`): a veth has none anyway.
#[derive(Debug)]
pub struct PacketSocket(OwnedFd);

impl PacketSocket {
    /// Bound to interface `ifindex` of the calling thread's network namespace; the socket stays
    /// in that namespace whichever thread uses it later.
    pub fn bind(ifindex: u32) -> Result<Self> {
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            bail!("socket(AF_PACKET): {}", std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a descriptor we just opened and own.
        let socket = Self(unsafe { OwnedFd::from_raw_fd(fd) });
        let one: libc::c_int = 1;
        // SAFETY: a valid socket and a pointer to a c_int of the size passed. Best effort.
        unsafe {
            libc::setsockopt(
                socket.0.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set below.
        let mut address: libc::sockaddr_ll = unsafe { zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_ifindex = i32::try_from(ifindex)?;
        // SAFETY: a valid socket and a sockaddr_ll of the size passed.
        let rc = unsafe {
            libc::bind(
                socket.0.as_raw_fd(),
                (&address as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            bail!(
                "binding AF_PACKET to ifindex {ifindex}: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(socket)
    }

    /// Sends every frame of `frames` (in as many `sendmmsg` calls as the kernel needs).
    pub fn send(&self, frames: &[Vec<u8>]) -> Result<()> {
        let mut iovecs: Vec<libc::iovec> = frames
            .iter()
            .map(|f| libc::iovec {
                iov_base: f.as_ptr() as *mut libc::c_void,
                iov_len: f.len(),
            })
            .collect();
        let mut messages: Vec<libc::mmsghdr> = iovecs
            .iter_mut()
            .map(|iov| {
                // SAFETY: an all-zero msghdr is valid (no name, no control data).
                let mut header: libc::msghdr = unsafe { zeroed() };
                header.msg_iov = iov;
                header.msg_iovlen = 1;
                libc::mmsghdr {
                    msg_hdr: header,
                    msg_len: 0,
                }
            })
            .collect();
        let mut done = 0;
        while done < messages.len() {
            let rest = &mut messages[done..];
            // SAFETY: `rest` points at mmsghdrs whose iovecs point into `frames`, all alive and
            // unchanged for the call.
            let sent = unsafe {
                libc::sendmmsg(
                    self.0.as_raw_fd(),
                    rest.as_mut_ptr(),
                    rest.len() as libc::c_uint,
                    0,
                )
            };
            if sent < 0 {
                let error = std::io::Error::last_os_error();
                if error.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                bail!("sendmmsg on AF_PACKET: {error}");
            }
            done += sent as usize;
        }
        Ok(())
    }
}

/// One phase of traffic.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    /// New flows per second asked for.
    pub rate: u32,
    pub duration: Duration,
    /// The flow number of the phase's first flow.
    pub first_flow: u32,
}

impl Pace {
    /// The flows the phase sends in all at its rate.
    pub fn flows(&self) -> u32 {
        (f64::from(self.rate) * self.duration.as_secs_f64()).round() as u32
    }
}

/// What a phase sent.
#[derive(Clone, Copy, Debug)]
pub struct Sent {
    pub flows: u32,
    /// Before the first flow's `sendmmsg` .. after the last one returned.
    pub started: Instant,
    pub elapsed: Duration,
    /// `sendmmsg` calls.
    pub batches: u64,
    /// The latest a batch went out after its first flow was due.
    pub max_behind: Duration,
}

impl Sent {
    /// Flows per second achieved.
    pub fn rate(&self) -> f64 {
        f64::from(self.flows) / self.elapsed.as_secs_f64()
    }
}

/// Sends the phase `pace` through `socket`, calling `sent(flow, t0)` for every flow after its
/// batch went (t0: just before that batch's `sendmmsg`).
pub fn run(
    socket: &PacketSocket,
    frames: &Frames,
    pace: Pace,
    mut sent: impl FnMut(u32, Instant),
) -> Result<Sent> {
    let total = pace.flows();
    let per_flow = Duration::from_secs_f64(1.0 / f64::from(pace.rate.max(1)));
    let due = |k: u32| per_flow * k;
    let mut batch: Vec<Vec<u8>> = Vec::with_capacity(BATCH);
    let mut next = 0u32;
    let mut batches = 0u64;
    let mut max_behind = Duration::ZERO;
    let started = Instant::now();
    while next < total {
        let now = started.elapsed();
        if due(next) > now {
            std::thread::sleep(due(next) - now);
            continue;
        }
        max_behind = max_behind.max(now - due(next));
        batch.clear();
        let first = next;
        while next < total && batch.len() < BATCH && due(next) <= now {
            batch.push(frames.frame(pace.first_flow + next));
            next += 1;
        }
        let t0 = Instant::now();
        socket.send(&batch)?;
        batches += 1;
        for k in first..next {
            sent(pace.first_flow + k, t0);
        }
    }
    Ok(Sent {
        flows: total,
        started,
        elapsed: started.elapsed(),
        batches,
        max_behind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_are_distinct_clients() {
        let mut seen = std::collections::BTreeSet::new();
        for n in (0..200_000).step_by(7) {
            assert!(seen.insert(client_of(n)), "flow {n} repeats a client");
        }
        assert_eq!(client_of(0), (Ipv4Addr::new(10, 202, 0, 0), 16_384));
        assert_eq!(client_of(16_384), (Ipv4Addr::new(10, 202, 0, 1), 16_384));
    }

    #[test]
    fn frames_are_minimal_udp() {
        let frames = Frames {
            src_mac: MacAddress([2, 0, 0, 0, 0, 1]),
            dst_mac: MacAddress([2, 0, 0, 0, 0, 2]),
            vip: Ipv4Addr::new(10, 100, 0, 100),
            port: 53,
        };
        let frame = frames.frame(16_385);
        assert_eq!(frame.len(), 60);
        assert_eq!(&frame[..6], &[2, 0, 0, 0, 0, 2]);
        assert_eq!(frame[23], 17, "UDP");
        assert_eq!(&frame[26..30], &[10, 202, 0, 1]);
        assert_eq!(u16::from_be_bytes([frame[34], frame[35]]), 16_385);
    }
}
