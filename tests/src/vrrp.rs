//! Two load balancer nodes, active/standby behind one next-hop address that keepalived (VRRP)
//! moves between them: the [`DsrTopology`] (its LB is node 0) with a second LB node on the
//! same switch, and the client routing the VIPs via the next hop instead of an LB's own address.
//!
//! ```text
//!                           switch namespace: br0
//!    p-client ──── p-lb (flood off) ──── p-lb2 (flood off) ──── p-b0 … p-b<N-1>
//!       │               │                      │                    │
//!  client: eth0     node 0: eth0           node 1: eth0        backend i: eth0, VIPs on lo
//!  10.100.0.1       10.100.0.2             10.100.0.3          10.100.0.(11+i)
//!  VIPs via         keepalived's master holds 10.100.0.50 (NEXT_HOP),
//!  10.100.0.50      answers ARP for it and sends gratuitous ARP when it takes it over
//! ```
//!
//! Unknown-unicast flooding is off on both nodes' bridge ports (DESIGN §7): a frame for a MAC
//! the bridge does not know (a node whose link just went down) is not flooded to the other node,
//! whose XDP program would forward it whatever its destination MAC. So the client's traffic
//! reaches the new master only once the gratuitous ARP has moved the next hop, as with a
//! switch with port security, and the failover times the tests measure are keepalived's.
//!
//! IPv4 only: VRRP moves one IPv4 address here.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::links::{
    self, MacAddress, VethEnd, add_address, add_bridge_port, create_veth_pair,
    disable_tx_checksum_offload, set_up,
};
use crate::netns::NetNs;
use crate::topology::{BRIDGE, DEFAULT_VIP_V4, DsrTopology, DsrTopologyOptions, HOST_INTERFACE};

/// The address keepalived moves between the nodes; the client routes the VIPs via it.
pub const NEXT_HOP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 50);
/// Host number of the second LB node (the first is the topology's LB, host 2).
pub const SECOND_NODE_HOST_NUMBER: u8 = 3;
/// How many LB nodes there are.
pub const NODES: usize = 2;

const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// An LB node: its namespace, address, MAC and bridge port.
#[derive(Clone, Copy, Debug)]
pub struct Node<'a> {
    pub namespace: &'a NetNs,
    pub ipv4: Ipv4Addr,
    pub mac: MacAddress,
    pub bridge_port: &'a str,
}

/// The second node's own parts (the first is the [`DsrTopology`]'s LB).
#[derive(Debug)]
struct SecondNode {
    namespace: NetNs,
    ipv4: Ipv4Addr,
    mac: MacAddress,
    bridge_port: String,
}

/// See the module documentation. Dropping it deletes every namespace.
#[derive(Debug)]
pub struct VrrpTopology {
    second: SecondNode,
    dsr: DsrTopology,
}

impl VrrpTopology {
    /// Builds the network with `backend_count` backends and the VIPs `vips` (on every backend's
    /// `lo`), namespaces named `"<prefix>-<pid>-<counter>-..."`, and waits until it is usable.
    pub fn new(prefix: &str, backend_count: usize, vips: &[Ipv4Addr]) -> Result<Self> {
        let vips = if vips.is_empty() {
            vec![DEFAULT_VIP_V4]
        } else {
            vips.to_vec()
        };
        let dsr = DsrTopology::new(
            backend_count,
            DsrTopologyOptions {
                name_prefix: prefix.to_owned(),
                vips_v4: vips.clone(),
                vips_v6: Vec::new(),
            },
        )?;
        let second = Self::add_second_node(&dsr)?;
        let topology = Self { second, dsr };
        let client = topology.client();
        for vip in &vips {
            client
                .ip([
                    "-4",
                    "route",
                    "replace",
                    &format!("{vip}/32"),
                    "via",
                    &NEXT_HOP.to_string(),
                ])
                .with_context(|| format!("routing {vip} via the next hop {NEXT_HOP}"))?;
        }
        for node in 0..NODES {
            topology.set_unknown_unicast_flood(node, false)?;
        }
        Ok(topology)
    }

    fn add_second_node(dsr: &DsrTopology) -> Result<SecondNode> {
        let switch = dsr.switch();
        let number = SECOND_NODE_HOST_NUMBER;
        let namespace = NetNs::with_name(&format!("{}-lb2", dsr.name_prefix()))?;
        let bridge_port = "p-lb2".to_owned();
        // Host numbers read the same in the MAC as in the address (see the topology module).
        let mac = MacAddress::local(0, number);
        create_veth_pair(
            VethEnd {
                namespace: switch,
                name: &bridge_port,
                mac: Some(MacAddress::local(1, number)),
            },
            VethEnd {
                namespace: &namespace,
                name: HOST_INTERFACE,
                mac: Some(mac),
            },
        )?;
        add_bridge_port(switch, BRIDGE, &bridge_port)?;
        let ipv4 = Ipv4Addr::new(10, 100, 0, number);
        add_address(&namespace, HOST_INTERFACE, IpAddr::V4(ipv4), 24)?;
        disable_tx_checksum_offload(&namespace, HOST_INTERFACE)?;
        namespace.set_sysctl("net.ipv4.ip_forward", "0")?;
        set_up(&namespace, HOST_INTERFACE)?;
        links::wait_for_carrier(&namespace, HOST_INTERFACE, READY_TIMEOUT)?;
        links::wait_for_bridge_port_forwarding(switch, &bridge_port, READY_TIMEOUT)?;
        Ok(SecondNode {
            namespace,
            ipv4,
            mac,
            bridge_port,
        })
    }

    /// The underlying topology (client, backends, switch; its LB is node 0).
    pub fn dsr(&self) -> &DsrTopology {
        &self.dsr
    }

    /// `"<prefix>-<pid>-<counter>"`, for [`crate::topology::leftovers`].
    pub fn name_prefix(&self) -> &str {
        self.dsr.name_prefix()
    }

    /// The client's namespace.
    pub fn client(&self) -> &NetNs {
        self.dsr.client()
    }

    /// LB node `index` (0 or 1). Panics on another index.
    pub fn node(&self, index: usize) -> Node<'_> {
        match index {
            0 => {
                let host = self.dsr.lb_host();
                Node {
                    namespace: host.namespace(),
                    ipv4: host.ipv4(),
                    mac: host.mac(),
                    bridge_port: host.bridge_port(),
                }
            }
            1 => Node {
                namespace: &self.second.namespace,
                ipv4: self.second.ipv4,
                mac: self.second.mac,
                bridge_port: &self.second.bridge_port,
            },
            _ => panic!("node index {index} out of range: there are {NODES} LB nodes"),
        }
    }

    /// Which node `mac` belongs to, if any.
    pub fn node_of_mac(&self, mac: MacAddress) -> Option<usize> {
        (0..NODES).find(|&index| self.node(index).mac == mac)
    }

    /// Turns unknown-unicast flooding on or off on node `index`'s bridge port.
    pub fn set_unknown_unicast_flood(&self, index: usize, on: bool) -> Result<()> {
        let port = self.node(index).bridge_port;
        let switch = self.dsr.switch();
        switch
            .ip([
                "link",
                "set",
                "dev",
                port,
                "type",
                "bridge_slave",
                "flood",
                if on { "on" } else { "off" },
            ])
            .with_context(|| format!("setting flood on {}/{port}", switch.name()))?;
        let output = switch.ip(["-d", "-o", "link", "show", "dev", port])?;
        let text = String::from_utf8_lossy(&output.stdout);
        let expected = format!(" flood {} ", if on { "on" } else { "off" });
        if !text.contains(&expected) {
            bail!(
                "{port} does not show `{}` after setting it: {text}",
                expected.trim()
            );
        }
        Ok(())
    }
}
