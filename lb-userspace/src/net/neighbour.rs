//! A backend's MAC from the kernel's neighbour table (`RTM_GETNEIGH`), asking the kernel to resolve
//! it (`RTM_NEWNEIGH` with `NTF_USE`) when the table does not have it yet.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use futures_util::StreamExt;
use netlink_packet_core::{NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use tokio::time::Instant;

use super::{Interface, NetError, NetlinkHandle, errno};

/// Where a backend is at L2: the frame to it leaves `egress` with destination `mac` and source
/// `egress.mac`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendPath {
    pub address: IpAddr,
    pub mac: [u8; 6],
    pub egress: Interface,
}

/// How often the neighbour table is read while resolution is under way: first after 1 ms (an
/// ARP or ND answer on a LAN takes well under that once sent), then doubling up to 20 ms, which
/// keeps the wait short without busy polling through the kernel's 1 s retransmissions.
const FIRST_POLL: Duration = Duration::from_millis(1);
const MAX_POLL: Duration = Duration::from_millis(20);

/// The discard port (RFC 863): where the unprivileged fallback's empty datagram goes.
const DISCARD_PORT: u16 = 9;

// Neighbour states (`NUD_*`, include/uapi/linux/neighbour.h).
const NUD_INCOMPLETE: u16 = 0x01;
const NUD_REACHABLE: u16 = 0x02;
const NUD_STALE: u16 = 0x04;
const NUD_DELAY: u16 = 0x08;
const NUD_PROBE: u16 = 0x10;
const NUD_FAILED: u16 = 0x20;
const NUD_NOARP: u16 = 0x40;
const NUD_PERMANENT: u16 = 0x80;

/// States in which the entry holds a link-layer address the kernel itself sends to. STALE, DELAY
/// and PROBE are only "not recently confirmed": the address is still the best known, and the
/// kernel re-confirms it as soon as traffic flows.
const NUD_USABLE: u16 =
    NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_PERMANENT | NUD_NOARP;

/// One neighbour table entry, as far as resolution cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Neighbour {
    state: u16,
    mac: Option<[u8; 6]>,
}

impl Neighbour {
    fn usable_mac(&self) -> Option<[u8; 6]> {
        let mac = self.mac?;
        (self.state & NUD_USABLE != 0 && mac != [0; 6]).then_some(mac)
    }

    /// Whether the kernel is not (or no longer) resolving on its own and must be asked to.
    fn needs_solicit(&self) -> bool {
        self.state & (NUD_INCOMPLETE | NUD_USABLE) == 0
    }
}

impl NetlinkHandle {
    /// Finds how to reach backend `address` at L2: the egress interface from the kernel's routing,
    /// and the backend's MAC from the neighbour table on that interface.
    ///
    /// When the table has no usable entry, asks the kernel to resolve the address (ARP for IPv4,
    /// neighbour discovery for IPv6) and polls the table until it is resolved or `timeout` has
    /// passed. Entries in REACHABLE, STALE, DELAY, PROBE, PERMANENT and NOARP count as resolved;
    /// INCOMPLETE, FAILED and NONE do not.
    ///
    /// Errors: [`NetError::InvalidAddress`] (multicast, unspecified, loopback, IPv6 link-local),
    /// [`NetError::NoRoute`], [`NetError::LocalAddress`], [`NetError::NotOnLink`] when the route has
    /// a gateway, [`NetError::NotEthernet`] for a non-Ethernet egress, and
    /// [`NetError::Unresolved`] when the timeout passes.
    pub async fn resolve_backend(
        &self,
        address: IpAddr,
        timeout: Duration,
    ) -> Result<BackendPath, NetError> {
        let address = validate(address)?;
        let started = Instant::now();
        // A timeout too large to add (Duration::MAX) means "no limit" in practice: a year.
        let deadline = started
            .checked_add(timeout)
            .unwrap_or_else(|| started + Duration::from_secs(365 * 24 * 3600));
        let index = self.on_link_egress(address).await?;
        let egress = self.interface_by_index(index).await?;
        let mac = self
            .neighbour_mac(address, &egress, started, deadline)
            .await?;
        Ok(BackendPath {
            address,
            mac,
            egress,
        })
    }

    /// The MAC of neighbour `address` on `egress`, asking the kernel to resolve it and polling
    /// until `deadline` (see [`NetlinkHandle::resolve_backend`]).
    pub(super) async fn neighbour_mac(
        &self,
        address: IpAddr,
        egress: &Interface,
        started: Instant,
        deadline: Instant,
    ) -> Result<[u8; 6], NetError> {
        let mut last_seen = None;
        let mut poll = FIRST_POLL;
        loop {
            let entry = self.neighbour(address, egress).await?;
            if let Some(mac) = entry.and_then(|entry| entry.usable_mac()) {
                return Ok(mac);
            }
            last_seen = entry.or(last_seen);
            let now = Instant::now();
            if now >= deadline {
                return Err(NetError::Unresolved {
                    address,
                    interface: egress.name.clone(),
                    waited: now - started,
                    state: last_seen.map_or_else(|| "absent".into(), |n| state_name(n.state)),
                    protocol: match address {
                        IpAddr::V4(_) => "ARP requests",
                        IpAddr::V6(_) => "IPv6 neighbour solicitations",
                    },
                });
            }
            // Absent, NONE or FAILED: start (or restart) resolution. INCOMPLETE is already under
            // way, so leave the kernel's retransmission timer alone.
            if entry.is_none_or(|entry| entry.needs_solicit()) {
                self.solicit(address, egress).await?;
            }
            tokio::time::sleep(poll.min(deadline - now)).await;
            poll = (poll * 2).min(MAX_POLL);
        }
    }

    /// The neighbour entry for `address` on `interface`, if the table has one (`RTM_GETNEIGH` for a
    /// single entry, kernel 5.0 and later: no dump of a table that may hold thousands).
    async fn neighbour(
        &self,
        address: IpAddr,
        interface: &Interface,
    ) -> Result<Option<Neighbour>, NetError> {
        let mut message = NeighbourMessage::default();
        message.header.family = family(address);
        message.header.ifindex = interface.index;
        message
            .attributes
            .push(NeighbourAttribute::Destination(neighbour_address(address)));
        let mut request = NetlinkMessage::from(RouteNetlinkMessage::GetNeighbour(message));
        request.header.flags = NLM_F_REQUEST;

        let failed = |source| NetError::Netlink {
            request: format!("RTM_GETNEIGH for {address} on {}", interface.name),
            source,
        };
        let mut replies = self.handle.clone().request(request).map_err(failed)?;
        let mut found = None;
        while let Some(reply) = replies.next().await {
            match reply.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(entry)) => {
                    found.get_or_insert(entry);
                }
                NetlinkPayload::Error(error) => {
                    let error = rtnetlink::Error::NetlinkError(error);
                    // ENOENT: no entry for this address on this interface.
                    if errno(&error) == Some(libc::ENOENT) {
                        return Ok(None);
                    }
                    return Err(failed(error));
                }
                _ => {}
            }
        }
        Ok(found.map(|entry| {
            let mac = entry
                .attributes
                .iter()
                .find_map(|attribute| match attribute {
                    NeighbourAttribute::LinkLayerAddress(lladdr) => {
                        <[u8; 6]>::try_from(&lladdr[..]).ok()
                    }
                    _ => None,
                });
            Neighbour {
                state: u16::from(entry.header.state),
                mac,
            }
        }))
    }

    /// Makes the kernel start resolving `address` on `interface`.
    ///
    /// Why `RTM_NEWNEIGH` with `NTF_USE` (what `ip neigh replace ... use` would send): the kernel
    /// creates the entry if needed and treats it as used by a packet (`neigh_event_send`), which
    /// sends an ARP request or a neighbour solicitation right away and runs the usual
    /// retransmissions. It works the same for IPv4 and IPv6, targets exactly the (address,
    /// interface) pair that is read back, goes through the same netlink socket (so the same network
    /// namespace) as the lookups, and sends nothing to the backend but the solicitation. The
    /// alternative, an empty UDP datagram to the discard port, follows the socket's routing (policy
    /// rules, marks, local firewall) rather than this interface, and is delivered to the backend.
    ///
    /// One difference, measured on kernel 6.18: a solicitation without a packet behind it comes
    /// from the interface's link-local address, and none is sent while that address is still
    /// tentative (duplicate address detection, 1-2 s after the link comes up); the kernel's next
    /// retransmission (1 s later) goes out once DAD is done. So on a brand-new link IPv6 takes up to
    /// ~2 s where the datagram took ~1 s; on a settled link both take about a millisecond.
    ///
    /// `RTM_NEWNEIGH` needs `CAP_NET_ADMIN`; without it (or if the kernel refuses for another
    /// reason) the datagram is sent instead, which any user may do.
    async fn solicit(&self, address: IpAddr, interface: &Interface) -> Result<(), NetError> {
        let request = self
            .handle
            .neighbours()
            .add(interface.index, address)
            // The state is ignored with NTF_USE, but a new entry created with the request's default
            // (PERMANENT) would be exempt from garbage collection.
            .state(NeighbourState::None)
            .flags(NeighbourFlags::Use)
            // Without REPLACE the kernel answers EEXIST for an existing (e.g. FAILED) entry.
            .replace()
            .execute();
        match request.await {
            Ok(()) => Ok(()),
            Err(error) => {
                tracing::debug!(
                    %address, interface = %interface.name, %error,
                    "RTM_NEWNEIGH NTF_USE refused; soliciting with a UDP datagram instead"
                );
                send_discard_datagram(address).map_err(|source| NetError::Solicit {
                    address,
                    interface: interface.name.clone(),
                    source,
                })
            }
        }
    }
}

/// Sends one empty UDP datagram to `address`'s discard port: the kernel queues it on the
/// neighbour entry and resolves the address to deliver it. Uses the calling thread's network
/// namespace.
pub(super) fn send_discard_datagram(address: IpAddr) -> io::Result<()> {
    let local: SocketAddr = match address {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local)?;
    socket.set_nonblocking(true)?;
    socket.connect((address, DISCARD_PORT))?;
    match socket.send(&[]) {
        // A full queue still means resolution was started by an earlier packet.
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(()),
        other => other.map(drop),
    }
}

/// Rejects addresses that can never be a backend and unmaps IPv4-mapped IPv6 addresses.
pub(super) fn validate(address: IpAddr) -> Result<IpAddr, NetError> {
    let address = address.to_canonical();
    let reason = match address {
        _ if address.is_unspecified() => "it is the unspecified address",
        _ if address.is_multicast() => "it is a multicast address",
        _ if address.is_loopback() => "it is a loopback address",
        IpAddr::V4(v4) if v4.is_broadcast() => "it is the broadcast address",
        IpAddr::V6(v6) if v6.is_unicast_link_local() => {
            "an IPv6 link-local address names no interface (the same fe80::/64 is on every link); \
             give the backend a global or unique-local address"
        }
        _ => return Ok(address),
    };
    Err(NetError::InvalidAddress { address, reason })
}

fn family(address: IpAddr) -> AddressFamily {
    match address {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn neighbour_address(address: IpAddr) -> NeighbourAddress {
    match address {
        IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
        IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
    }
}

/// `ip neigh`'s name for a state.
fn state_name(state: u16) -> String {
    const NAMES: [(u16, &str); 8] = [
        (NUD_INCOMPLETE, "INCOMPLETE"),
        (NUD_REACHABLE, "REACHABLE"),
        (NUD_STALE, "STALE"),
        (NUD_DELAY, "DELAY"),
        (NUD_PROBE, "PROBE"),
        (NUD_FAILED, "FAILED"),
        (NUD_NOARP, "NOARP"),
        (NUD_PERMANENT, "PERMANENT"),
    ];
    let names: Vec<&str> = NAMES
        .iter()
        .filter(|(bit, _)| state & bit != 0)
        .map(|(_, name)| *name)
        .collect();
    if names.is_empty() {
        "NONE".into()
    } else {
        names.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usable_states_are_exactly_the_resolved_ones() {
        let mac = Some([2, 0, 0, 0, 0, 1]);
        for state in [
            NUD_REACHABLE,
            NUD_STALE,
            NUD_DELAY,
            NUD_PROBE,
            NUD_PERMANENT,
            NUD_NOARP,
        ] {
            let entry = Neighbour { state, mac };
            assert_eq!(entry.usable_mac(), mac, "{}", state_name(state));
            assert!(!entry.needs_solicit(), "{}", state_name(state));
        }
        for state in [NUD_INCOMPLETE, NUD_FAILED, 0] {
            assert_eq!(
                Neighbour { state, mac }.usable_mac(),
                None,
                "{}",
                state_name(state)
            );
        }
        assert!(
            !Neighbour {
                state: NUD_INCOMPLETE,
                mac: None
            }
            .needs_solicit()
        );
        assert!(
            Neighbour {
                state: NUD_FAILED,
                mac: None
            }
            .needs_solicit()
        );
        assert!(
            Neighbour {
                state: 0,
                mac: None
            }
            .needs_solicit()
        );
        // A usable state without an address (or an all-zero one) is not a MAC to send to.
        assert_eq!(
            Neighbour {
                state: NUD_REACHABLE,
                mac: None
            }
            .usable_mac(),
            None
        );
        assert_eq!(
            Neighbour {
                state: NUD_NOARP,
                mac: Some([0; 6])
            }
            .usable_mac(),
            None
        );
    }

    #[test]
    fn state_names_match_iproute2() {
        assert_eq!(state_name(0), "NONE");
        assert_eq!(state_name(NUD_STALE), "STALE");
        assert_eq!(state_name(NUD_FAILED), "FAILED");
    }

    #[test]
    fn rejects_addresses_that_cannot_be_backends() {
        for bad in [
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "ff02::1",
            "127.0.0.1",
            "::1",
            "255.255.255.255",
        ] {
            let address: IpAddr = bad.parse().unwrap();
            assert!(
                matches!(validate(address), Err(NetError::InvalidAddress { .. })),
                "{bad} accepted"
            );
        }
        let link_local = validate("fe80::1".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            link_local.contains("fe80::1") && link_local.contains("link-local"),
            "{link_local}"
        );
        assert_eq!(
            validate("::ffff:10.0.0.1".parse().unwrap()).unwrap(),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
        assert!(validate("fd00:77::2".parse().unwrap()).is_ok());
    }
}
