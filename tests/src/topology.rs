//! The L2 direct-server-return test network: one switch (a bridge in its own namespace), a client,
//! the load balancer and N backends, each host in its own namespace with an `eth0` plugged into
//! the bridge.
//!
//! ```text
//!                      switch namespace: br0 (STP off, forward delay 0)
//!        p-client ─────────── p-lb ─────────── p-b0 … p-b<N-1>        (bridge-side veth ends)
//!           │                   │                 │
//!   client: eth0          lb: eth0          backend i: eth0, VIPs on lo
//!   10.100.0.1            10.100.0.2        10.100.0.(11+i)
//!   fd00:100::1           fd00:100::2       fd00:100::(11+i)
//!   VIP routes via lb     ip_forward 0      arp_ignore 1, arp_announce 2
//! ```
//!
//! Every host's number `NN` (1, 2, 11, 12, …) is written the same way in its IPv4 address
//! (`10.100.0.NN`), its IPv6 address (`fd00:100::NN`), its MAC (`02:00:00:00:00:NN`) and its
//! bridge port's MAC (`02:00:00:00:01:NN`), so packet dumps read easily.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use aya::Ebpf;
use aya::programs::xdp::XdpMode;

use crate::links::{
    self, MacAddress, VethEnd, add_address, add_bridge_port, add_host_route, create_bridge,
    create_veth_pair, disable_tx_checksum_offload, set_up,
};
use crate::netns::{self, NetNs, run_command};

/// Name of every host's interface towards the switch.
pub const HOST_INTERFACE: &str = "eth0";
/// Name of the bridge in the switch namespace.
pub const BRIDGE: &str = "br0";
/// The test subnet (IPv4, /24).
pub const SUBNET_V4: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 0);
/// The test subnet (IPv6, /64).
pub const SUBNET_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 0);
/// Default IPv4 VIP.
pub const DEFAULT_VIP_V4: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 100);
/// Default IPv6 VIP.
pub const DEFAULT_VIP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 0x100);
/// Host number of the client.
pub const CLIENT_HOST_NUMBER: u8 = 1;
/// Host number of the load balancer.
pub const LB_HOST_NUMBER: u8 = 2;
/// Host number of backend 0 (backend i is this + i).
pub const FIRST_BACKEND_HOST_NUMBER: u8 = 11;
/// Host numbers stay two decimal digits, so they read the same in the MAC and IPv6 address.
pub const MAX_BACKENDS: usize = 99 - FIRST_BACKEND_HOST_NUMBER as usize + 1;

/// How long set-up waits for links, bridge ports and IPv6 addresses to become usable.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Options of a [`DsrTopology`].
#[derive(Clone, Debug)]
pub struct DsrTopologyOptions {
    /// Namespace names start with `"<name_prefix>-<pid>-<counter>-"`.
    pub name_prefix: String,
    /// IPv4 VIPs: on every backend's `lo`, routed by the client via the LB.
    pub vips_v4: Vec<Ipv4Addr>,
    /// IPv6 VIPs, likewise.
    pub vips_v6: Vec<Ipv6Addr>,
}

impl Default for DsrTopologyOptions {
    fn default() -> Self {
        Self {
            name_prefix: "lbt".to_owned(),
            vips_v4: vec![DEFAULT_VIP_V4],
            vips_v6: vec![DEFAULT_VIP_V6],
        }
    }
}

/// One host of the topology: its namespace, addresses and MAC, and the bridge port it plugs into.
#[derive(Debug)]
pub struct Host {
    namespace: NetNs,
    number: u8,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
    mac: MacAddress,
    bridge_port: String,
    bridge_port_mac: MacAddress,
}

impl Host {
    /// The host's namespace.
    pub fn namespace(&self) -> &NetNs {
        &self.namespace
    }
    /// The host's number `NN` (1 client, 2 LB, 11.. backends).
    pub fn number(&self) -> u8 {
        self.number
    }
    /// Its interface towards the switch (always [`HOST_INTERFACE`]).
    pub fn interface(&self) -> &str {
        HOST_INTERFACE
    }
    /// `10.100.0.NN`.
    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }
    /// `fd00:100::NN`.
    pub fn ipv6(&self) -> Ipv6Addr {
        self.ipv6
    }
    /// The address of the given family.
    pub fn ip(&self, ipv6: bool) -> IpAddr {
        if ipv6 {
            IpAddr::V6(self.ipv6)
        } else {
            IpAddr::V4(self.ipv4)
        }
    }
    /// MAC of its `eth0`: `02:00:00:00:00:NN`.
    pub fn mac(&self) -> MacAddress {
        self.mac
    }
    /// Name of the bridge-side veth end in the switch namespace (`p-client`, `p-lb`, `p-b<i>`).
    pub fn bridge_port(&self) -> &str {
        &self.bridge_port
    }
    /// MAC of the bridge-side veth end: `02:00:00:00:01:NN`.
    pub fn bridge_port_mac(&self) -> MacAddress {
        self.bridge_port_mac
    }
}

/// The L2 DSR test network (see the module documentation). Dropping it detaches the XDP programs
/// it attached and deletes every namespace (their veths and the bridge go with them).
#[derive(Debug)]
pub struct DsrTopology {
    name_prefix: String,
    vips_v4: Vec<Ipv4Addr>,
    vips_v6: Vec<Ipv6Addr>,
    /// Programs attached by [`DsrTopology::attach_xdp_pass_on_lb_port`]; first to drop.
    attached_programs: Mutex<Vec<AttachedProgram>>,
    client: Host,
    lb: Host,
    backends: Vec<Host>,
    switch: NetNs,
}

struct AttachedProgram {
    description: String,
    _ebpf: Ebpf,
}

impl std::fmt::Debug for AttachedProgram {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.description)
    }
}

/// `fd00:100::NN` with `NN` read as hexadecimal digits, so `::11` is host 11.
fn ipv6_for_host(number: u8) -> Ipv6Addr {
    let group = u16::from_str_radix(&number.to_string(), 16)
        .expect("a decimal number's digits are valid hexadecimal digits");
    let segments = SUBNET_V6.segments();
    Ipv6Addr::new(segments[0], segments[1], 0, 0, 0, 0, 0, group)
}

/// The MAC octet that prints as the decimal digits of `number` (11 → 0x11).
fn mac_octet_for_host(number: u8) -> u8 {
    debug_assert!(number <= 99, "host numbers have at most two decimal digits");
    (number / 10) * 16 + number % 10
}

impl DsrTopology {
    /// Builds the network with `backend_count` backends and waits until it is usable: carriers
    /// up, bridge ports forwarding, no tentative IPv6 address.
    pub fn new(backend_count: usize, options: DsrTopologyOptions) -> Result<Self> {
        if backend_count > MAX_BACKENDS {
            bail!("at most {MAX_BACKENDS} backends, asked for {backend_count}");
        }
        let name_prefix = netns::unique_name(&options.name_prefix);
        let switch = NetNs::with_name(&format!("{name_prefix}-switch"))?;
        // The switch is pure L2: no IPv6 link-local addresses, router solicitations or MLD noise.
        switch.set_sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        switch.set_sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        create_bridge(&switch, BRIDGE)?;

        let client = Self::add_host(
            &switch,
            &name_prefix,
            "client",
            "p-client",
            CLIENT_HOST_NUMBER,
        )?;
        let lb = Self::add_host(&switch, &name_prefix, "lb", "p-lb", LB_HOST_NUMBER)?;
        let mut backends = Vec::with_capacity(backend_count);
        for index in 0..backend_count {
            let number = FIRST_BACKEND_HOST_NUMBER
                + u8::try_from(index).context("backend index checked against MAX_BACKENDS")?;
            backends.push(Self::add_host(
                &switch,
                &name_prefix,
                &format!("backend{index}"),
                &format!("p-b{index}"),
                number,
            )?);
        }
        let topology = Self {
            name_prefix,
            vips_v4: options.vips_v4,
            vips_v6: options.vips_v6,
            attached_programs: Mutex::new(Vec::new()),
            client,
            lb,
            backends,
            switch,
        };
        topology.configure_roles()?;
        topology.wait_until_ready()?;
        Ok(topology)
    }

    /// Creates the host's namespace and its veth to the bridge, with addresses, MACs, offloads.
    fn add_host(
        switch: &NetNs,
        name_prefix: &str,
        role: &str,
        bridge_port: &str,
        number: u8,
    ) -> Result<Host> {
        let namespace = NetNs::with_name(&format!("{name_prefix}-{role}"))?;
        // Before eth0 exists, so it inherits the defaults: no duplicate address detection, also
        // for the link-local address (nobody else uses our addresses on this private bridge).
        for scope in ["all", "default"] {
            namespace.set_sysctl(&format!("net.ipv6.conf.{scope}.accept_dad"), "0")?;
        }
        let mac = MacAddress::local(0, mac_octet_for_host(number));
        let bridge_port_mac = MacAddress::local(1, mac_octet_for_host(number));
        create_veth_pair(
            VethEnd {
                namespace: switch,
                name: bridge_port,
                mac: Some(bridge_port_mac),
            },
            VethEnd {
                namespace: &namespace,
                name: HOST_INTERFACE,
                mac: Some(mac),
            },
        )?;
        add_bridge_port(switch, BRIDGE, bridge_port)?;
        let ipv4 = Ipv4Addr::new(10, 100, 0, number);
        let ipv6 = ipv6_for_host(number);
        add_address(&namespace, HOST_INTERFACE, IpAddr::V4(ipv4), 24)?;
        add_address(&namespace, HOST_INTERFACE, IpAddr::V6(ipv6), 64)?;
        disable_tx_checksum_offload(&namespace, HOST_INTERFACE)?;
        set_up(&namespace, HOST_INTERFACE)?;
        Ok(Host {
            namespace,
            number,
            ipv4,
            ipv6,
            mac,
            bridge_port: bridge_port.to_owned(),
            bridge_port_mac,
        })
    }

    /// Client routes to the VIPs via the LB; backends own the VIPs on `lo` without announcing
    /// them; the LB does not forward.
    fn configure_roles(&self) -> Result<()> {
        for &vip in &self.vips_v4 {
            add_host_route(
                &self.client.namespace,
                IpAddr::V4(vip),
                IpAddr::V4(self.lb.ipv4),
            )?;
        }
        for &vip in &self.vips_v6 {
            add_host_route(
                &self.client.namespace,
                IpAddr::V6(vip),
                IpAddr::V6(self.lb.ipv6),
            )?;
        }

        let lb = &self.lb.namespace;
        lb.set_sysctl("net.ipv4.ip_forward", "0")?;
        lb.set_sysctl("net.ipv6.conf.all.forwarding", "0")?;

        for backend in &self.backends {
            let namespace = &backend.namespace;
            for scope in ["all", HOST_INTERFACE] {
                // Answer ARP only for addresses on the receiving interface (not the VIP on lo)...
                namespace.set_sysctl(&format!("net.ipv4.conf.{scope}.arp_ignore"), "1")?;
                // ...and never use the VIP as the source of our own ARP requests.
                namespace.set_sysctl(&format!("net.ipv4.conf.{scope}.arp_announce"), "2")?;
            }
            for &vip in &self.vips_v4 {
                add_address(namespace, "lo", IpAddr::V4(vip), 32)?;
            }
            for &vip in &self.vips_v6 {
                add_address(namespace, "lo", IpAddr::V6(vip), 128)?;
            }
        }
        Ok(())
    }

    fn wait_until_ready(&self) -> Result<()> {
        for host in self.hosts() {
            links::wait_for_carrier(&host.namespace, HOST_INTERFACE, READY_TIMEOUT)?;
            links::wait_for_bridge_port_forwarding(&self.switch, &host.bridge_port, READY_TIMEOUT)?;
            links::wait_for_ipv6_addresses(&host.namespace, READY_TIMEOUT)?;
        }
        Ok(())
    }

    /// `"<prefix>-<pid>-<counter>"`: every namespace of this topology starts with it; pass it to
    /// [`leftovers`] after the topology dropped.
    pub fn name_prefix(&self) -> &str {
        &self.name_prefix
    }

    /// The client's namespace.
    pub fn client(&self) -> &NetNs {
        &self.client.namespace
    }
    /// The load balancer's namespace.
    pub fn lb(&self) -> &NetNs {
        &self.lb.namespace
    }
    /// Backend `index`'s namespace. Panics if there is no such backend.
    pub fn backend(&self, index: usize) -> &NetNs {
        &self.backend_host(index).namespace
    }
    /// The switch's namespace (holds [`BRIDGE`] and the `p-*` ports).
    pub fn switch(&self) -> &NetNs {
        &self.switch
    }

    /// The client host (addresses, MAC, bridge port).
    pub fn client_host(&self) -> &Host {
        &self.client
    }
    /// The load balancer host.
    pub fn lb_host(&self) -> &Host {
        &self.lb
    }
    /// Backend `index`. Panics if there is no such backend.
    pub fn backend_host(&self, index: usize) -> &Host {
        self.backends.get(index).unwrap_or_else(|| {
            panic!(
                "backend index {index} out of range: the topology has {} backends",
                self.backends.len()
            )
        })
    }
    /// All backends, in index order.
    pub fn backend_hosts(&self) -> &[Host] {
        &self.backends
    }
    /// Number of backends.
    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }
    /// Client, LB and backends.
    pub fn hosts(&self) -> impl Iterator<Item = &Host> {
        [&self.client, &self.lb].into_iter().chain(&self.backends)
    }

    /// The first IPv4 VIP. Panics if the options had none.
    pub fn vip_v4(&self) -> Ipv4Addr {
        *self
            .vips_v4
            .first()
            .expect("the topology was built without IPv4 VIPs")
    }
    /// The first IPv6 VIP. Panics if the options had none.
    pub fn vip_v6(&self) -> Ipv6Addr {
        *self
            .vips_v6
            .first()
            .expect("the topology was built without IPv6 VIPs")
    }
    /// All IPv4 VIPs.
    pub fn vips_v4(&self) -> &[Ipv4Addr] {
        &self.vips_v4
    }
    /// All IPv6 VIPs.
    pub fn vips_v6(&self) -> &[Ipv6Addr] {
        &self.vips_v6
    }

    /// Name, in the switch namespace, of the bridge-side end of the LB's veth: frames the LB sends
    /// with native `XDP_TX` only reach the bridge if this end runs an XDP program (DESIGN §5, 1).
    pub fn lb_bridge_port(&self) -> &str {
        &self.lb.bridge_port
    }

    /// Loads `program_name` (an XDP program that passes everything, e.g. `xdp_pass`) from
    /// `program_object` and attaches it natively to the LB's bridge port. It stays attached until
    /// the topology drops. Every map of the object is created (memory) but none is pinned unless
    /// the object asks for pinning by name.
    pub fn attach_xdp_pass_on_lb_port(
        &self,
        program_object: &[u8],
        program_name: &str,
    ) -> Result<()> {
        let port = self.lb.bridge_port.clone();
        let ebpf = crate::xdp::attach_xdp_program(
            &self.switch,
            &port,
            program_object,
            program_name,
            XdpMode::Driver,
        )?;
        self.attached_programs
            .lock()
            .map_err(|_| anyhow!("the list of attached XDP programs is poisoned"))?
            .push(AttachedProgram {
                description: format!("{program_name} on {}/{port}", self.switch.name()),
                _ebpf: ebpf,
            });
        Ok(())
    }
}

impl Drop for DsrTopology {
    fn drop(&mut self) {
        // Detach while the interfaces still exist; namespaces go afterwards with the fields.
        match self.attached_programs.get_mut() {
            Ok(programs) => programs.clear(),
            Err(poisoned) => poisoned.into_inner().clear(),
        }
    }
}

/// Everything left on this machine named `prefix` or `"<prefix>-..."`: network namespaces from
/// `ip netns list` and links in the host namespace (so `"lbt-12-1"` does not match
/// `"lbt-12-10-client"`). Empty after a topology (or [`NetNs`]) with
/// that prefix dropped cleanly. A failure to list is reported as an entry, so an assertion that
/// the list is empty fails loudly.
pub fn leftovers(prefix: &str) -> Vec<String> {
    let matches = |name: &str| {
        name.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
    };
    let mut found = Vec::new();
    match netns::list_namespaces() {
        Ok(names) => found.extend(
            names
                .into_iter()
                .filter(|name| matches(name))
                .map(|name| format!("network namespace {name}")),
        ),
        Err(error) => found.push(format!("cannot list network namespaces: {error:#}")),
    }
    match run_command("ip", ["-o", "link", "show"]) {
        Ok(output) => found.extend(
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .filter_map(|line| line.split(": ").nth(1))
                .map(|name| name.split('@').next().unwrap_or(name))
                .filter(|name| matches(name))
                .map(|name| format!("host link {name}")),
        ),
        Err(error) => found.push(format!("cannot list host links: {error:#}")),
    }
    // What `lb run` pinned for an interface in one of these namespaces (`lb detach` removes it).
    let pinned = std::path::Path::new(LB_NETNS_PINS);
    if let Ok(entries) = std::fs::read_dir(pinned) {
        found.extend(
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .filter(|name| matches(name))
                .map(|name| format!("bpffs {}", pinned.join(name).display())),
        );
    }
    found
}

/// Where `lb run` pins the state of an interface in namespace `<name>`: `LB_NETNS_PINS/<name>/<if>`.
pub const LB_NETNS_PINS: &str = "/sys/fs/bpf/lb/netns";

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn host_numbers_read_the_same_everywhere() {
        assert_eq!(ipv6_for_host(11).to_string(), "fd00:100::11");
        assert_eq!(ipv6_for_host(2).to_string(), "fd00:100::2");
        assert_eq!(
            MacAddress::local(0, mac_octet_for_host(11)).to_string(),
            "02:00:00:00:00:11"
        );
        assert_eq!(
            MacAddress::local(1, mac_octet_for_host(99)).to_string(),
            "02:00:00:00:01:99"
        );
    }
}
