//! Backends two routed hops away from the load balancer: the network encapsulating VIPs
//! (`forward = "ipip"` / `"gue"`) are for. Every link is a veth pair; every host its own
//! namespace.
//!
//! ```text
//!   client ── r1 ── r2 ── backend 0
//!              │     ├─── backend 1
//!              lb    └─── backend …
//! ```
//!
//! - client `10.20.1.1` / `fd20:1::1`, default route via r1 (`10.20.1.254`).
//! - lb `10.20.2.2` / `fd20:2::2` on `eth0`, default route via r1 (`10.20.2.254`): its only
//!   neighbour, so every encapsulated packet leaves by `XDP_TX` to r1's MAC.
//! - r1 routes the VIPs to lb and the backend networks to r2 (`10.20.3.2`); r2 routes everything
//!   else back to r1.
//! - backend i `10.20.(10+i).2` / `fd20:(10+i)::2`, default route via r2. Its VIPs are put on `lo`
//!   by `lb decap`; it answers the client directly (r2, r1), never through lb.
//!
//! Routers forward with `rp_filter` off (the backends' answers come from VIPs routed elsewhere);
//! every veth has tx checksum offload off (frames bounced by XDP need finished checksums).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::links::{
    self, VethEnd, add_address, create_veth_pair, disable_tx_checksum_offload, set_up,
};
use crate::netns::{self, NetNs};

/// Every host's interface name towards its neighbour (routers name theirs after the peer).
pub const HOST_INTERFACE: &str = "eth0";
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Backend i sits on network `10.20.(FIRST_BACKEND_NET + i).0/24`.
const FIRST_BACKEND_NET: u8 = 10;
pub const MAX_BACKENDS: usize = 40;

/// One end host (client, lb or backend) of the routed network.
#[derive(Debug)]
pub struct RoutedHost {
    namespace: NetNs,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
}

impl RoutedHost {
    pub fn namespace(&self) -> &NetNs {
        &self.namespace
    }
    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }
    pub fn ipv6(&self) -> Ipv6Addr {
        self.ipv6
    }
    pub fn ip(&self, ipv6: bool) -> IpAddr {
        if ipv6 {
            self.ipv6.into()
        } else {
            self.ipv4.into()
        }
    }
}

/// The network of the module documentation. Dropping it deletes every namespace (their veths go
/// with them).
#[derive(Debug)]
pub struct RoutedTopology {
    name_prefix: String,
    // Hosts first: dropped before the routers, whose links they share.
    client: RoutedHost,
    lb: RoutedHost,
    backends: Vec<RoutedHost>,
    r1: NetNs,
    r2: NetNs,
}

fn v4(net: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 20, net, host)
}

fn v6(net: u8, host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd20, u16::from(net), 0, 0, 0, 0, 0, u16::from(host))
}

impl RoutedTopology {
    /// Builds the network with `backend_count` backends; `vips` are routed by r1 to lb.
    pub fn new(backend_count: usize, vips: &[IpAddr]) -> Result<Self> {
        if backend_count > MAX_BACKENDS {
            bail!("at most {MAX_BACKENDS} backends, asked for {backend_count}");
        }
        let name_prefix = netns::unique_name("lbr");
        let r1 = Self::router(&format!("{name_prefix}-r1"))?;
        let r2 = Self::router(&format!("{name_prefix}-r2"))?;
        let client = Self::host(&name_prefix, "client", &r1, "to-client", 1, 1)?;
        let lb = Self::host(&name_prefix, "lb", &r1, "to-lb", 2, 2)?;
        // r1 <-> r2 on network 3.
        create_veth_pair(
            VethEnd {
                namespace: &r1,
                name: "to-r2",
                mac: None,
            },
            VethEnd {
                namespace: &r2,
                name: "to-r1",
                mac: None,
            },
        )?;
        for (router, interface, host) in [(&r1, "to-r2", 1), (&r2, "to-r1", 2)] {
            add_address(router, interface, v4(3, host).into(), 24)?;
            add_address(router, interface, v6(3, host).into(), 64)?;
            disable_tx_checksum_offload(router, interface)?;
            set_up(router, interface)?;
        }
        let mut backends = Vec::with_capacity(backend_count);
        for index in 0..backend_count {
            let net = FIRST_BACKEND_NET + u8::try_from(index).context("checked above")?;
            let backend = Self::host(
                &name_prefix,
                &format!("backend{index}"),
                &r2,
                &format!("to-b{index}"),
                net,
                2,
            )?;
            // r1 reaches the backend networks through r2.
            r1.ip([
                "-4",
                "route",
                "add",
                &format!("{}/24", v4(net, 0)),
                "via",
                &v4(3, 2).to_string(),
            ])?;
            r1.ip([
                "-6",
                "route",
                "add",
                &format!("{}/64", v6(net, 0)),
                "via",
                &v6(3, 2).to_string(),
            ])?;
            backends.push(backend);
        }
        // r2 sends everything else (client, lb, answers from the VIPs) back to r1.
        r2.ip([
            "-4",
            "route",
            "add",
            "default",
            "via",
            &v4(3, 1).to_string(),
        ])?;
        r2.ip([
            "-6",
            "route",
            "add",
            "default",
            "via",
            &v6(3, 1).to_string(),
        ])?;
        for vip in vips {
            let (family, prefix, via) = match vip {
                IpAddr::V4(_) => ("-4", 32, IpAddr::from(v4(2, 2))),
                IpAddr::V6(_) => ("-6", 128, IpAddr::from(v6(2, 2))),
            };
            r1.ip([
                family,
                "route",
                "add",
                &format!("{vip}/{prefix}"),
                "via",
                &via.to_string(),
            ])?;
        }
        let topology = Self {
            name_prefix,
            client,
            lb,
            backends,
            r1,
            r2,
        };
        topology.wait_until_ready()?;
        Ok(topology)
    }

    fn router(name: &str) -> Result<NetNs> {
        let router = NetNs::with_name(name)?;
        for scope in ["all", "default"] {
            router.set_sysctl(&format!("net.ipv6.conf.{scope}.accept_dad"), "0")?;
            router.set_sysctl(&format!("net.ipv4.conf.{scope}.rp_filter"), "0")?;
        }
        router.set_sysctl("net.ipv4.ip_forward", "1")?;
        router.set_sysctl("net.ipv6.conf.all.forwarding", "1")?;
        set_up(&router, "lo")?;
        Ok(router)
    }

    /// An end host on network `net` as host `.host`, linked to `router` (which is `.254` there
    /// and the host's default gateway).
    fn host(
        name_prefix: &str,
        role: &str,
        router: &NetNs,
        router_interface: &str,
        net: u8,
        host: u8,
    ) -> Result<RoutedHost> {
        let namespace = NetNs::with_name(&format!("{name_prefix}-{role}"))?;
        for scope in ["all", "default"] {
            namespace.set_sysctl(&format!("net.ipv6.conf.{scope}.accept_dad"), "0")?;
        }
        create_veth_pair(
            VethEnd {
                namespace: router,
                name: router_interface,
                mac: None,
            },
            VethEnd {
                namespace: &namespace,
                name: HOST_INTERFACE,
                mac: None,
            },
        )?;
        add_address(router, router_interface, v4(net, 254).into(), 24)?;
        add_address(router, router_interface, v6(net, 254).into(), 64)?;
        disable_tx_checksum_offload(router, router_interface)?;
        set_up(router, router_interface)?;
        let (ipv4, ipv6) = (v4(net, host), v6(net, host));
        add_address(&namespace, HOST_INTERFACE, ipv4.into(), 24)?;
        add_address(&namespace, HOST_INTERFACE, ipv6.into(), 64)?;
        disable_tx_checksum_offload(&namespace, HOST_INTERFACE)?;
        set_up(&namespace, HOST_INTERFACE)?;
        set_up(&namespace, "lo")?;
        namespace.ip([
            "-4",
            "route",
            "add",
            "default",
            "via",
            &v4(net, 254).to_string(),
        ])?;
        namespace.ip([
            "-6",
            "route",
            "add",
            "default",
            "via",
            &v6(net, 254).to_string(),
        ])?;
        Ok(RoutedHost {
            namespace,
            ipv4,
            ipv6,
        })
    }

    fn wait_until_ready(&self) -> Result<()> {
        for host in self.hosts() {
            links::wait_for_carrier(&host.namespace, HOST_INTERFACE, READY_TIMEOUT)?;
            links::wait_for_ipv6_addresses(&host.namespace, READY_TIMEOUT)?;
        }
        for router in [&self.r1, &self.r2] {
            links::wait_for_ipv6_addresses(router, READY_TIMEOUT)?;
        }
        Ok(())
    }

    /// `"<prefix>-<pid>-<counter>"`: every namespace of this topology starts with it.
    pub fn name_prefix(&self) -> &str {
        &self.name_prefix
    }
    pub fn client(&self) -> &RoutedHost {
        &self.client
    }
    pub fn lb(&self) -> &RoutedHost {
        &self.lb
    }
    pub fn backend(&self, index: usize) -> &RoutedHost {
        &self.backends[index]
    }
    pub fn backends(&self) -> &[RoutedHost] {
        &self.backends
    }
    pub fn hosts(&self) -> impl Iterator<Item = &RoutedHost> {
        [&self.client, &self.lb].into_iter().chain(&self.backends)
    }
    /// The first router (next to the client and lb).
    pub fn r1(&self) -> &NetNs {
        &self.r1
    }
}
