//! An `AF_PACKET` socket on one interface: sends hand-built frames and captures what comes back,
//! to see exactly what a host answered (addresses, ports, flags, sequence numbers).

use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use etherparse::{NetHeaders, PacketHeaders, TransportHeader};

/// A TCP segment seen on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpSegment {
    pub source: IpAddr,
    pub source_port: u16,
    pub destination: IpAddr,
    pub destination_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub syn: bool,
    pub ack_flag: bool,
    pub rst: bool,
    /// The IP protocol right after the outermost IP header (6 for a plain TCP segment): an
    /// encapsulated answer would show 4, 41 or 17 and is never decoded as a segment.
    pub outer_protocol: u8,
}

impl TcpSegment {
    /// Parses a plain (not encapsulated) TCP segment in an Ethernet frame.
    pub fn parse(frame: &[u8]) -> Option<Self> {
        let headers = PacketHeaders::from_ethernet_slice(frame).ok()?;
        let (source, destination, outer_protocol) = match headers.net? {
            NetHeaders::Ipv4(ip, _) => (
                IpAddr::from(ip.source),
                IpAddr::from(ip.destination),
                ip.protocol.0,
            ),
            NetHeaders::Ipv6(ip, _) => (
                IpAddr::from(ip.source),
                IpAddr::from(ip.destination),
                ip.next_header.0,
            ),
            NetHeaders::Arp(_) => return None,
        };
        let Some(TransportHeader::Tcp(tcp)) = headers.transport else {
            return None;
        };
        Some(Self {
            source,
            source_port: tcp.source_port,
            destination,
            destination_port: tcp.destination_port,
            seq: tcp.sequence_number,
            ack: tcp.acknowledgment_number,
            syn: tcp.syn,
            ack_flag: tcp.ack,
            rst: tcp.rst,
            outer_protocol,
        })
    }
}

/// A raw socket bound to one interface (all protocols), created in the calling thread's network
/// namespace (so create it inside [`crate::NetNs::run`]).
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    pub fn bind(ifindex: u32) -> Result<Self> {
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2); the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(protocol),
            )
        };
        if raw < 0 {
            bail!("socket(AF_PACKET): {}", std::io::Error::last_os_error());
        }
        // SAFETY: the descriptor was just returned to us and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let ifindex = i32::try_from(ifindex).context("interface index out of range")?;
        let address = link_address(ifindex, protocol);
        // SAFETY: a valid socket and a sockaddr_ll of the size passed.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&address as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if bound != 0 {
            bail!(
                "binding AF_PACKET to ifindex {ifindex}: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(Self { fd, ifindex })
    }

    /// Sends one Ethernet frame out of the interface.
    pub fn send(&self, frame: &[u8]) -> Result<()> {
        let address = link_address(self.ifindex, 0);
        // SAFETY: a valid socket, a buffer of the length passed, a sockaddr_ll of the size passed.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&address as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if usize::try_from(sent).ok() != Some(frame.len()) {
            bail!(
                "sendto on AF_PACKET ({} bytes): {}",
                frame.len(),
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// Discards whatever has been captured so far.
    pub fn drain(&self) {
        while self.receive(Duration::ZERO).is_some() {}
    }

    /// Incoming frames (not our own outgoing ones) until one makes `keep` return `Some`, or
    /// until `timeout`; `None` on timeout.
    pub fn wait_for<T>(
        &self,
        timeout: Duration,
        mut keep: impl FnMut(&[u8]) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = self.receive(left)?;
            if let Some(found) = keep(&frame) {
                return Some(found);
            }
        }
    }

    /// One incoming frame within `timeout` (outgoing frames are skipped).
    fn receive(&self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut poll = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let millis = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&mut poll, 1, millis) };
            if ready <= 0 {
                return None;
            }
            let mut buffer = vec![0u8; 65536];
            // SAFETY: an all-zero sockaddr_ll is a valid output buffer.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut from_len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: a valid socket, a buffer of the length passed, an output address of the
            // size passed.
            let length = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    libc::MSG_DONTWAIT,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut from_len,
                )
            };
            let Ok(length) = usize::try_from(length) else {
                continue;
            };
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            buffer.truncate(length);
            return Some(buffer);
        }
    }
}

fn link_address(ifindex: i32, protocol: u16) -> libc::sockaddr_ll {
    // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set below.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = protocol;
    address.sll_ifindex = ifindex;
    address
}
