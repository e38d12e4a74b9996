//! lb's host routes in the kernel routing table a routing daemon exports (`RTM_NEWROUTE`,
//! `RTM_DELROUTE`, `RTM_GETROUTE` dumps over rtnetlink).
//!
//! Each route is `ADDRESS/32` (or `/128`) `dev IF table N proto 76`: a device route through the
//! interface the program is attached to. Protocol 76 ([`LB_ROUTE_PROTOCOL`]) marks the routes as
//! lb's: lb lists, adds and deletes only routes with it and a host prefix, so it never touches
//! a route somebody else put in the table. (`echo "76 lb" > /etc/iproute2/rt_protos.d/lb.conf`
//! makes `ip route` print it as `proto lb`.)

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::RouteMessageBuilder;

use super::AnnounceError;
use crate::net::NetlinkHandle;

/// The `proto` of lb's routes (unassigned in iproute2's `rt_protos`; BIRD is 12, keepalived 18).
pub const LB_ROUTE_PROTOCOL: u8 = 76;

/// One of lb's routes as the kernel holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct LbRoute {
    pub address: IpAddr,
    pub table: u32,
    /// The interface it goes through.
    pub ifindex: u32,
}

impl LbRoute {
    fn message(&self) -> RouteMessage {
        let prefix = match self.address {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        let builder = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(self.address, prefix)
            .expect("a host prefix of the address's own family is valid")
            .output_interface(self.ifindex)
            .table_id(self.table)
            .protocol(RouteProtocol::from(LB_ROUTE_PROTOCOL))
            .kind(RouteType::Unicast);
        // A device route without a gateway is link-scoped in IPv4 (as `ip route add ... dev IF`
        // makes it); IPv6 has no route scopes.
        match self.address {
            IpAddr::V4(_) => builder.scope(RouteScope::Link),
            IpAddr::V6(_) => builder,
        }
        .build()
    }
}

/// Adds `route`, or replaces a route to the same prefix in that table.
pub async fn add(netlink: &NetlinkHandle, route: LbRoute) -> Result<(), AnnounceError> {
    netlink
        .rtnetlink()
        .route()
        .add(route.message())
        .replace()
        .execute()
        .await
        .map_err(|source| AnnounceError::Netlink {
            request: format!("adding the route {}", describe(&route)),
            source,
        })
}

/// Deletes `route`; a route already gone is no error.
pub async fn delete(netlink: &NetlinkHandle, route: LbRoute) -> Result<(), AnnounceError> {
    match netlink
        .rtnetlink()
        .route()
        .del(route.message())
        .execute()
        .await
    {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e))
            if e.code.map(|c| c.get().abs()) == Some(libc::ESRCH) =>
        {
            Ok(())
        }
        Err(source) => Err(AnnounceError::Netlink {
            request: format!("deleting the route {}", describe(&route)),
            source,
        }),
    }
}

/// lb's routes (protocol [`LB_ROUTE_PROTOCOL`], host prefix), in `table` if given, through
/// `ifindex` if given; both families.
pub async fn list(
    netlink: &NetlinkHandle,
    table: Option<u32>,
    ifindex: Option<u32>,
) -> Result<Vec<LbRoute>, AnnounceError> {
    let mut routes = Vec::new();
    for dump in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let mut messages = netlink.rtnetlink().route().get(dump).execute();
        loop {
            let message = messages
                .try_next()
                .await
                .map_err(|source| AnnounceError::Netlink {
                    request: "listing routes (RTM_GETROUTE dump)".to_owned(),
                    source,
                })?;
            let Some(message) = message else { break };
            if let Some(route) = lb_route(&message)
                && table.is_none_or(|t| t == route.table)
                && ifindex.is_none_or(|i| i == route.ifindex)
            {
                routes.push(route);
            }
        }
    }
    routes.sort();
    Ok(routes)
}

/// `message` as one of lb's routes, if it is one.
fn lb_route(message: &RouteMessage) -> Option<LbRoute> {
    let header = &message.header;
    if u8::from(header.protocol) != LB_ROUTE_PROTOCOL || header.kind != RouteType::Unicast {
        return None;
    }
    let mut table = u32::from(header.table);
    let mut address = None;
    let mut ifindex = None;
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(a)) => address = Some(IpAddr::V4(*a)),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => address = Some(IpAddr::V6(*a)),
            RouteAttribute::Oif(i) => ifindex = Some(*i),
            _ => {}
        }
    }
    let address = address?;
    let host_prefix = match address {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    };
    if header.destination_prefix_length != host_prefix
        || table == u32::from(RouteHeader::RT_TABLE_UNSPEC)
    {
        return None;
    }
    Some(LbRoute {
        address,
        table,
        ifindex: ifindex?,
    })
}

/// `10.0.0.100/32 dev #2 table 200 proto 76`, as `ip route` would say it.
pub fn describe(route: &LbRoute) -> String {
    let prefix = if route.address.is_ipv4() { 32 } else { 128 };
    format!(
        "{}/{prefix} dev #{} table {} proto {LB_ROUTE_PROTOCOL}",
        route.address, route.ifindex, route.table
    )
}
