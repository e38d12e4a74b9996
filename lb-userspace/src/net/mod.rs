//! What the daemon needs to know about the host's network to forward at L2: interfaces (index, MAC,
//! kind) and, for each backend, the egress interface and the backend's MAC.
//!
//! Everything goes through rtnetlink (`RTM_GETLINK`, `RTM_GETROUTE`, `RTM_GETNEIGH`,
//! `RTM_NEWNEIGH`), never through `/sys/class/net`: under `nsenter --net` `/sys` still shows the
//! host's devices, while a netlink socket always talks to the network namespace it was created in.
//!
//! [`NetlinkHandle`] owns one netlink connection; share it (it is cheap to clone) for repeated
//! lookups. The free functions [`interface_by_name`], [`interface_by_index`] and
//! [`resolve_backend`] open a connection of their own per call, which is simplest for one-off use.
//!
//! Network namespaces: a netlink socket belongs to the namespace of the thread that created it.
//! Create the [`NetlinkHandle`] (and run the free functions) on a thread of the namespace you mean;
//! the daemon runs entirely in one namespace, so this only matters to tests that `setns` a thread.

mod interface;
mod neighbour;
mod route;
#[cfg(test)]
mod testns;
mod tunnel;

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

pub use interface::Interface;
pub use neighbour::BackendPath;
pub use tunnel::TunnelPath;

/// Errors of interface lookup and backend resolution. Every message names the address and the
/// interface concerned and, where an operator can do something about it, what to check.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The netlink socket could not be opened (no `NETLINK_ROUTE` support, or out of descriptors).
    #[error("cannot open a netlink route socket: {0}")]
    Socket(#[source] io::Error),

    /// The connection task needs a tokio runtime to run on.
    #[error(
        "a netlink connection needs a running tokio runtime: create the NetlinkHandle from async code"
    )]
    NoRuntime,

    /// A netlink request failed in a way no more specific variant describes.
    #[error("netlink {request} failed: {source}")]
    Netlink {
        /// What was asked, e.g. "RTM_GETLINK for interface eth0".
        request: String,
        #[source]
        source: rtnetlink::Error,
    },

    /// An interface name that the kernel can never accept (empty, too long, or with '/' or a space).
    #[error("{name:?} is not a valid interface name (1 to 15 bytes, no '/', ':' or whitespace)")]
    InvalidInterfaceName { name: String },

    /// No interface of that name in this network namespace.
    #[error(
        "no interface named {name:?} in this network namespace (see `ip link show`; under \
         `ip netns exec`/`nsenter --net`, the interface must be in that namespace)"
    )]
    NoSuchInterface { name: String },

    /// No interface with that index in this network namespace.
    #[error("no interface with index {index} in this network namespace")]
    NoSuchIndex { index: u32 },

    /// The interface exists but has no 6-byte Ethernet address (loopback, tun, wireguard, ...).
    #[error(
        "interface {name} (index {index}) is not an Ethernet interface (link type {link_type}): \
         L2 direct server return rewrites Ethernet MAC addresses and needs one"
    )]
    NotEthernet {
        name: String,
        index: u32,
        link_type: String,
    },

    /// The address cannot be a backend at all (multicast, unspecified, IPv6 link-local...).
    #[error("backend address {address} cannot be used: {reason}")]
    InvalidAddress {
        address: IpAddr,
        reason: &'static str,
    },

    /// The kernel has no usable route to the address.
    #[error(
        "no route to backend {address}: {reason} (check `ip route get {address}`: the backend must \
         be on a network directly connected to this host)"
    )]
    NoRoute { address: IpAddr, reason: String },

    /// The address belongs to this host.
    #[error(
        "backend {address} is an address of this host (`ip route get {address}` says local): a \
         backend must be another machine on the same L2 segment"
    )]
    LocalAddress { address: IpAddr },

    /// The kernel reaches the address through a router: its MAC is not on our segment.
    #[error(
        "backend {address} is not on a directly connected network: the kernel routes it via gateway \
         {gateway} on {interface}; L2 direct server return can only reach backends on the same L2 \
         segment (put the backend in a subnet connected to {interface}, or use another forwarding mode)"
    )]
    NotOnLink {
        address: IpAddr,
        gateway: IpAddr,
        interface: String,
    },

    /// An encapsulated backend's next hop, a router, could not be resolved.
    #[error("backend {backend} is reached through gateway {gateway}: {source}")]
    Gateway {
        backend: IpAddr,
        gateway: IpAddr,
        #[source]
        source: Box<NetError>,
    },

    /// No outer source address for an encapsulated backend.
    #[error(
        "no source address for packets encapsulated to backend {backend}: the route through \
         {interface} names none (`ip route get {backend}` shows no `src`); give the interface an \
         address of that family or set the VIP's encap_source"
    )]
    NoSource { backend: IpAddr, interface: String },

    /// Neither way of asking the kernel to resolve the address worked.
    #[error("cannot start resolving the MAC address of backend {address} on {interface}: {source}")]
    Solicit {
        address: IpAddr,
        interface: String,
        #[source]
        source: io::Error,
    },

    /// The neighbour table did not learn the backend's MAC within the time allowed.
    #[error(
        "could not resolve the MAC address of backend {address} on {interface} within {waited:?} \
         (neighbour state: {state}); check that the backend is up, holds {address} on an interface \
         in the same L2 segment as {interface}, and answers {protocol} (firewall, arp_ignore or \
         arp_filter settings, a VLAN mismatch); `ip neigh show {address} dev {interface}` shows \
         what the kernel knows"
    )]
    Unresolved {
        address: IpAddr,
        interface: String,
        waited: Duration,
        /// The last neighbour state seen, e.g. "INCOMPLETE", "FAILED" or "absent".
        state: String,
        /// "ARP requests" or "IPv6 neighbour solicitations".
        protocol: &'static str,
    },
}

/// A netlink route connection bound to the network namespace it was created in.
///
/// The connection is driven by a task on the tokio runtime that was current at [`NetlinkHandle::new`];
/// the task is aborted when the last clone of the handle is dropped. Requests made after that
/// runtime shut down fail with [`NetError::Netlink`].
#[derive(Clone)]
pub struct NetlinkHandle {
    handle: rtnetlink::Handle,
    _connection: Arc<ConnectionTask>,
}

impl fmt::Debug for NetlinkHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetlinkHandle").finish_non_exhaustive()
    }
}

/// Aborts the connection task when dropped, so a handle never leaks a socket or a task.
struct ConnectionTask(tokio::task::JoinHandle<()>);

impl Drop for ConnectionTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl NetlinkHandle {
    /// Opens a `NETLINK_ROUTE` socket in the calling thread's network namespace and spawns the task
    /// that drives it on the current tokio runtime.
    ///
    /// Fails with [`NetError::NoRuntime`] outside a tokio runtime and [`NetError::Socket`] when the
    /// socket cannot be opened. Needs no privilege; only resolution's neighbour trigger uses
    /// `CAP_NET_ADMIN`, and falls back to an unprivileged way without it.
    pub fn new() -> Result<Self, NetError> {
        // Check first: creating the tokio-backed socket outside a runtime would panic.
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| NetError::NoRuntime)?;
        let (connection, handle, _unsolicited) =
            rtnetlink::new_connection().map_err(NetError::Socket)?;
        let task = runtime.spawn(connection);
        Ok(Self {
            handle,
            _connection: Arc::new(ConnectionTask(task)),
        })
    }

    /// The underlying rtnetlink handle, for requests this module does not wrap.
    pub fn rtnetlink(&self) -> &rtnetlink::Handle {
        &self.handle
    }
}

/// Looks `name` up with a netlink connection of its own; see [`NetlinkHandle::interface_by_name`].
pub async fn interface_by_name(name: &str) -> Result<Interface, NetError> {
    NetlinkHandle::new()?.interface_by_name(name).await
}

/// Looks `index` up with a netlink connection of its own; see [`NetlinkHandle::interface_by_index`].
pub async fn interface_by_index(index: u32) -> Result<Interface, NetError> {
    NetlinkHandle::new()?.interface_by_index(index).await
}

/// Resolves a backend with a netlink connection of its own; see [`NetlinkHandle::resolve_backend`].
pub async fn resolve_backend(address: IpAddr, timeout: Duration) -> Result<BackendPath, NetError> {
    NetlinkHandle::new()?
        .resolve_backend(address, timeout)
        .await
}

/// Formats a MAC address the way `ip link` prints it: `02:00:00:00:00:01`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

/// The errno a netlink error reply carries, if the error is one.
fn errno(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => message.code.map(|code| code.get().abs()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_mac_like_iproute2() {
        assert_eq!(
            format_mac(&[0x02, 0x77, 0, 0xab, 0x0c, 0xff]),
            "02:77:00:ab:0c:ff"
        );
    }

    #[test]
    fn new_outside_a_runtime_is_an_error_not_a_panic() {
        assert!(matches!(NetlinkHandle::new(), Err(NetError::NoRuntime)));
    }

    #[test]
    fn messages_name_address_and_interface() {
        let unresolved = NetError::Unresolved {
            address: "10.0.0.9".parse().unwrap(),
            interface: "eth1".into(),
            waited: Duration::from_secs(1),
            state: "INCOMPLETE".into(),
            protocol: "ARP requests",
        }
        .to_string();
        for needle in [
            "10.0.0.9",
            "eth1",
            "1s",
            "INCOMPLETE",
            "ARP requests",
            "ip neigh show",
        ] {
            assert!(
                unresolved.contains(needle),
                "{needle:?} missing from: {unresolved}"
            );
        }
        let not_on_link = NetError::NotOnLink {
            address: "10.99.0.5".parse().unwrap(),
            gateway: "10.77.0.2".parse().unwrap(),
            interface: "eth0".into(),
        }
        .to_string();
        for needle in ["10.99.0.5", "10.77.0.2", "eth0", "same L2 segment"] {
            assert!(
                not_on_link.contains(needle),
                "{needle:?} missing from: {not_on_link}"
            );
        }
    }

    /// Works anywhere (no root, no namespace): the host always has a loopback interface.
    #[tokio::test(flavor = "current_thread")]
    async fn loopback_is_found_but_is_not_ethernet() {
        let net = NetlinkHandle::new().unwrap();
        match net.interface_by_name("lo").await {
            Err(NetError::NotEthernet {
                name,
                index,
                link_type,
            }) => {
                assert_eq!(name, "lo");
                assert_eq!(index, 1);
                assert_eq!(link_type, "LOOPBACK");
            }
            other => panic!("expected NotEthernet for lo, got {other:?}"),
        }
        assert!(matches!(
            net.interface_by_index(1).await,
            Err(NetError::NotEthernet { index: 1, .. })
        ));
    }
}
