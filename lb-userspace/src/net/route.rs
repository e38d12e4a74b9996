//! Which interface the kernel would send a backend's packets out of (`RTM_GETROUTE`).

use std::net::IpAddr;

use futures_util::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteType, RouteVia,
};

use super::{NetError, NetlinkHandle, errno};

/// The kernel's route to an address, as far as forwarding to it cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Hop {
    /// The output interface.
    pub oif: u32,
    /// The router the packet goes to, or `None` when the address is on a connected network.
    pub gateway: Option<IpAddr>,
    /// The source address the kernel would pick (`RTA_PREFSRC`).
    pub source: Option<IpAddr>,
    /// A route MTU (`ip route ... mtu N`), if the route has one.
    pub mtu: Option<u32>,
}

impl NetlinkHandle {
    /// The index of the interface that directly reaches `address`, as the kernel's routing decides
    /// (policy rules and all). DSR forwards at L2, so the route must have no gateway: the backend has
    /// to be a neighbour on that interface.
    pub(super) async fn on_link_egress(&self, address: IpAddr) -> Result<u32, NetError> {
        let hop = self.hop(address).await?;
        if let Some(gateway) = hop.gateway {
            return Err(NetError::NotOnLink {
                address,
                gateway,
                interface: self.interface_label(hop.oif).await,
            });
        }
        Ok(hop.oif)
    }

    /// The kernel's route to `address`: output interface, gateway (if any), preferred source
    /// and route MTU. Errors for local, broadcast, multicast and unreachable addresses.
    pub(super) async fn hop(&self, address: IpAddr) -> Result<Hop, NetError> {
        let route = self.route_get(address).await?;
        let mut oif = None;
        let mut gateway = None;
        let mut source = None;
        let mut mtu = None;
        for attribute in &route.attributes {
            match attribute {
                RouteAttribute::Oif(index) => oif = Some(*index),
                RouteAttribute::Gateway(gw) => gateway = gateway.or(route_address_ip(gw)),
                RouteAttribute::Via(via) => gateway = gateway.or(via_ip(via)),
                RouteAttribute::PrefSource(src) => source = route_address_ip(src),
                RouteAttribute::Metrics(metrics) => {
                    mtu = metrics.iter().find_map(|m| match m {
                        RouteMetric::Mtu(value) => Some(*value),
                        _ => None,
                    });
                }
                // A lookup answers with the chosen next hop, but be safe with a multipath reply.
                RouteAttribute::MultiPath(hops) => {
                    if let Some(hop) = hops.first() {
                        oif = oif.or(Some(hop.interface_index));
                        gateway = gateway.or(hop.attributes.iter().find_map(|a| match a {
                            RouteAttribute::Gateway(gw) => route_address_ip(gw),
                            RouteAttribute::Via(via) => via_ip(via),
                            _ => None,
                        }));
                    }
                }
                _ => {}
            }
        }
        match route.header.kind {
            RouteType::Unicast => {}
            RouteType::Local => {
                return Err(NetError::LocalAddress { address });
            }
            RouteType::Broadcast => {
                return Err(NetError::InvalidAddress {
                    address,
                    reason: "the kernel routes it as a broadcast address",
                });
            }
            RouteType::Multicast | RouteType::Anycast => {
                return Err(NetError::InvalidAddress {
                    address,
                    reason: "the kernel routes it as a multicast or anycast address",
                });
            }
            other => {
                return Err(NetError::NoRoute {
                    address,
                    reason: format!(
                        "the route is of type {}",
                        format!("{other:?}").to_lowercase()
                    ),
                });
            }
        }
        let Some(oif) = oif else {
            return Err(NetError::NoRoute {
                address,
                reason: "the kernel's route names no output interface".into(),
            });
        };
        Ok(Hop {
            oif,
            gateway,
            source,
            mtu,
        })
    }

    /// `ip route get ADDRESS`.
    async fn route_get(&self, address: IpAddr) -> Result<RouteMessage, NetError> {
        let mut request = RouteMessage::default();
        let (family, prefix_len, destination) = match address {
            IpAddr::V4(v4) => (AddressFamily::Inet, 32, RouteAddress::Inet(v4)),
            IpAddr::V6(v6) => (AddressFamily::Inet6, 128, RouteAddress::Inet6(v6)),
        };
        request.header.address_family = family;
        request.header.destination_prefix_length = prefix_len;
        request
            .attributes
            .push(RouteAttribute::Destination(destination));

        let replies = self.handle.route().get(request).execute();
        let mut replies = std::pin::pin!(replies);
        let mut found = None;
        loop {
            match replies.try_next().await {
                Ok(Some(route)) => {
                    found.get_or_insert(route);
                }
                Ok(None) => break,
                // ENETUNREACH, EHOSTUNREACH, EACCES (prohibit), EINVAL (blackhole): no way there.
                Err(source) => {
                    return Err(match errno(&source) {
                        Some(code) => NetError::NoRoute {
                            address,
                            reason: std::io::Error::from_raw_os_error(code).to_string(),
                        },
                        None => NetError::Netlink {
                            request: format!("RTM_GETROUTE for {address}"),
                            source,
                        },
                    });
                }
            }
        }
        found.ok_or_else(|| NetError::NoRoute {
            address,
            reason: "the kernel answered the route lookup with nothing".into(),
        })
    }

    /// A name for messages: the interface's name if it can be found, else its index.
    pub(super) async fn interface_label(&self, index: u32) -> String {
        match self.interface_by_index(index).await {
            Ok(interface) => interface.name,
            Err(NetError::NotEthernet { name, .. }) => name,
            Err(_) => format!("interface index {index}"),
        }
    }
}

fn route_address_ip(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn via_ip(via: &RouteVia) -> Option<IpAddr> {
    match via {
        RouteVia::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteVia::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}
