//! Several lb nodes behind a router that spreads VIP traffic over them with ECMP, learned over
//! BGP (with BFD) from each node's BIRD, which in turn learns the VIP routes `lb` keeps in its
//! kernel table (DESIGN §7).
//!
//! ```text
//!   client 10.200.0.2 ── eth1 ┐
//!                 router 10.200.0.1 / 10.100.0.1 eth0: BIRD, BGP+BFD to every node,
//!                 multipath route for each VIP (kernel protocol `merge paths on`), ip_forward 1,
//!                 fib_multipath_hash_policy 1
//!                             │
//!       switch namespace: br0 ── p-rt ── p-n0 … p-n<N-1> (flood off) ── p-b0 … p-b<M-1>
//!                                          │                              │
//!        lb node i: eth0 10.100.0.(2+i)    `lb run` + BIRD            backend j: eth0
//!          table 200 ← lb's VIP routes ← BIRD kernel protocol        10.100.0.(11+j), VIPs on lo,
//!          → BGP (next hop self) to 10.100.0.1                      default via 10.100.0.1 (DSR)
//! ```
//!
//! Host numbers follow [`crate::topology`]: `10.100.0.NN`, MAC `02:00:00:00:00:NN`, bridge port
//! MAC `02:00:00:00:01:NN`. The lb nodes' bridge ports do not flood: a bridge that forgot a dead
//! node's MAC would otherwise hand its frames to the other node's XDP program, which forwards them
//! (DESIGN §7, trap), and the router's failover would never be seen.
//!
//! [`EcmpLab`] adds the processes: identity servers on the backends, the router's BIRD, and per
//! node `lb run` and BIRD, with "the node dies" and "the node comes back" as single calls. Its
//! nodes may replicate flow state to each other (`[sync]`, [`EcmpLab::enable_sync`]), and its
//! config may leave backends out that a reload adds later ([`EcmpLab::set_backends_in_config`],
//! [`EcmpLab::add_backend`]).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::bird::Bird;
use crate::bpffs::PinnedFlow;
pub use crate::daemon::lb_status;
use crate::daemon::{Launch, LbDaemon, api_socket_for, lb_detach, lb_reload};
use crate::links::{
    self, MacAddress, VethEnd, add_address, add_bridge_port, create_bridge, create_veth_pair,
    disable_tx_checksum_offload, set_up, wait_until,
};
use crate::load::Attempt;
use crate::netns::{self, NetNs, run_command};
use crate::servers::TcpIdentityServer;
use crate::topology::{BRIDGE, FIRST_BACKEND_HOST_NUMBER, HOST_INTERFACE, LB_NETNS_PINS};

/// The kernel table lb announces into (`[announce] route_table`).
pub const ROUTE_TABLE: u32 = 200;
/// The `proto` number of lb's routes in that table.
pub const LB_ROUTE_PROTO: u32 = 76;
/// The router's AS number and the nodes' (all nodes share one, so their routes are equal for
/// `merge paths`).
pub const ROUTER_AS: u32 = 65000;
pub const NODE_AS: u32 = 65001;
/// The router's address on the switch segment (the backends' default gateway).
pub const ROUTER_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
/// The client and the router's side of its link.
pub const CLIENT_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
pub const ROUTER_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// The router's interface towards the client.
pub const ROUTER_CLIENT_INTERFACE: &str = "eth1";
/// Host number of lb node 0 (node i is this + i).
pub const FIRST_NODE_HOST_NUMBER: u8 = 2;
/// The BIRD config of an lb node, shipped for operators: the tests run it with only its
/// `define` lines changed.
pub const NODE_BIRD_CONFIG_EXAMPLE: &str = include_str!("../../dist/bird.conf.example");

const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long BGP sessions may take to come up (connect delay 1 s, then a few round trips).
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(15);
/// The port every node's `[sync]` listens on (its own segment address).
pub const SYNC_PORT: u16 = 7946;

/// One host on the switch segment (an lb node or a backend).
#[derive(Debug)]
pub struct SegmentHost {
    namespace: NetNs,
    ipv4: Ipv4Addr,
    mac: MacAddress,
    bridge_port: String,
}

impl SegmentHost {
    pub fn namespace(&self) -> &NetNs {
        &self.namespace
    }
    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }
    pub fn mac(&self) -> MacAddress {
        self.mac
    }
    /// Its port on the switch's bridge.
    pub fn bridge_port(&self) -> &str {
        &self.bridge_port
    }
}

/// The network of the module documentation, without processes. Dropping it deletes every
/// namespace (and with them every veth and the bridge).
#[derive(Debug)]
pub struct EcmpTopology {
    name_prefix: String,
    vips: Vec<Ipv4Addr>,
    client: NetNs,
    router: NetNs,
    nodes: Vec<SegmentHost>,
    backends: Vec<SegmentHost>,
    switch: NetNs,
}

/// The MAC octet that prints as the decimal digits of `number` (11 → 0x11).
fn mac_octet(number: u8) -> u8 {
    (number / 10) * 16 + number % 10
}

impl EcmpTopology {
    /// Builds `nodes` lb nodes and `backends` backends with `vips` on the backends' `lo`.
    pub fn new(
        name_prefix: &str,
        nodes: usize,
        backends: usize,
        vips: &[Ipv4Addr],
    ) -> Result<Self> {
        if nodes == 0
            || FIRST_NODE_HOST_NUMBER as usize + nodes > FIRST_BACKEND_HOST_NUMBER as usize
        {
            bail!("1 to 9 lb nodes, asked for {nodes}");
        }
        if backends == 0 || FIRST_BACKEND_HOST_NUMBER as usize + backends > 99 {
            bail!("1 to 88 backends, asked for {backends}");
        }
        let name_prefix = netns::unique_name(name_prefix);
        let switch = NetNs::with_name(&format!("{name_prefix}-switch"))?;
        switch.set_sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        switch.set_sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        create_bridge(&switch, BRIDGE)?;

        let router = NetNs::with_name(&format!("{name_prefix}-router"))?;
        let client = NetNs::with_name(&format!("{name_prefix}-client"))?;
        Self::plug(&switch, &router, "p-rt", 1)?;
        create_veth_pair(
            VethEnd {
                namespace: &router,
                name: ROUTER_CLIENT_INTERFACE,
                mac: Some(MacAddress::local(2, 1)),
            },
            VethEnd {
                namespace: &client,
                name: HOST_INTERFACE,
                mac: Some(MacAddress::local(2, 2)),
            },
        )?;
        add_address(
            &router,
            ROUTER_CLIENT_INTERFACE,
            ROUTER_CLIENT_SIDE.into(),
            24,
        )?;
        add_address(&client, HOST_INTERFACE, CLIENT_ADDRESS.into(), 24)?;
        for (namespace, interface) in [
            (&router, ROUTER_CLIENT_INTERFACE),
            (&client, HOST_INTERFACE),
        ] {
            disable_tx_checksum_offload(namespace, interface)?;
            set_up(namespace, interface)?;
        }
        client.ip([
            "route",
            "add",
            "default",
            "via",
            &ROUTER_CLIENT_SIDE.to_string(),
        ])?;
        router.set_sysctl("net.ipv4.ip_forward", "1")?;
        // ECMP by 5-tuple, not by addresses only (one client would use one node).
        router.set_sysctl("net.ipv4.fib_multipath_hash_policy", "1")?;
        for scope in ["all", "default", HOST_INTERFACE, ROUTER_CLIENT_INTERFACE] {
            router.set_sysctl(&format!("net.ipv4.conf.{scope}.rp_filter"), "0")?;
        }

        let mut node_hosts = Vec::with_capacity(nodes);
        for index in 0..nodes {
            let number = FIRST_NODE_HOST_NUMBER + u8::try_from(index).context("checked above")?;
            let host = Self::segment_host(
                &switch,
                &name_prefix,
                &format!("node{index}"),
                &format!("p-n{index}"),
                number,
            )?;
            host.namespace.set_sysctl("net.ipv4.ip_forward", "0")?;
            // A real switch with port security: frames for an unknown MAC are not flooded here.
            switch.exec(
                "bridge",
                ["link", "set", "dev", &host.bridge_port, "flood", "off"],
            )?;
            node_hosts.push(host);
        }
        let mut backend_hosts = Vec::with_capacity(backends);
        for index in 0..backends {
            let number =
                FIRST_BACKEND_HOST_NUMBER + u8::try_from(index).context("checked above")?;
            let host = Self::segment_host(
                &switch,
                &name_prefix,
                &format!("backend{index}"),
                &format!("p-b{index}"),
                number,
            )?;
            let namespace = &host.namespace;
            for scope in ["all", HOST_INTERFACE] {
                namespace.set_sysctl(&format!("net.ipv4.conf.{scope}.arp_ignore"), "1")?;
                namespace.set_sysctl(&format!("net.ipv4.conf.{scope}.arp_announce"), "2")?;
            }
            for &vip in vips {
                add_address(namespace, "lo", vip.into(), 32)?;
            }
            // Direct server return: replies go straight to the router.
            namespace.ip([
                "route",
                "add",
                "default",
                "via",
                &ROUTER_ADDRESS.to_string(),
            ])?;
            backend_hosts.push(host);
        }
        let topology = Self {
            name_prefix,
            vips: vips.to_vec(),
            client,
            router,
            nodes: node_hosts,
            backends: backend_hosts,
            switch,
        };
        topology.wait_until_ready()?;
        Ok(topology)
    }

    /// `namespace`'s `eth0` on bridge port `port`, as host `number` (IPv4 only, IPv6 off).
    fn plug(switch: &NetNs, namespace: &NetNs, port: &str, number: u8) -> Result<Ipv4Addr> {
        namespace.set_sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        namespace.set_sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        let mac = MacAddress::local(0, mac_octet(number));
        create_veth_pair(
            VethEnd {
                namespace: switch,
                name: port,
                mac: Some(MacAddress::local(1, mac_octet(number))),
            },
            VethEnd {
                namespace,
                name: HOST_INTERFACE,
                mac: Some(mac),
            },
        )?;
        add_bridge_port(switch, BRIDGE, port)?;
        let ipv4 = Ipv4Addr::new(10, 100, 0, number);
        add_address(namespace, HOST_INTERFACE, ipv4.into(), 24)?;
        disable_tx_checksum_offload(namespace, HOST_INTERFACE)?;
        set_up(namespace, HOST_INTERFACE)?;
        Ok(ipv4)
    }

    /// A namespace named `<prefix>-<role>` plugged in as host `number` on `port`.
    fn segment_host(
        switch: &NetNs,
        name_prefix: &str,
        role: &str,
        port: &str,
        number: u8,
    ) -> Result<SegmentHost> {
        let namespace = NetNs::with_name(&format!("{name_prefix}-{role}"))?;
        let ipv4 = Self::plug(switch, &namespace, port, number)?;
        Ok(SegmentHost {
            namespace,
            ipv4,
            mac: MacAddress::local(0, mac_octet(number)),
            bridge_port: port.to_owned(),
        })
    }

    fn wait_until_ready(&self) -> Result<()> {
        links::wait_for_carrier(&self.client, HOST_INTERFACE, READY_TIMEOUT)?;
        links::wait_for_carrier(&self.router, HOST_INTERFACE, READY_TIMEOUT)?;
        links::wait_for_bridge_port_forwarding(&self.switch, "p-rt", READY_TIMEOUT)?;
        for host in self.nodes.iter().chain(&self.backends) {
            links::wait_for_carrier(&host.namespace, HOST_INTERFACE, READY_TIMEOUT)?;
            links::wait_for_bridge_port_forwarding(&self.switch, &host.bridge_port, READY_TIMEOUT)?;
        }
        Ok(())
    }

    /// Every namespace of this topology starts with it (see [`crate::topology::leftovers`]).
    pub fn name_prefix(&self) -> &str {
        &self.name_prefix
    }
    pub fn client(&self) -> &NetNs {
        &self.client
    }
    pub fn router(&self) -> &NetNs {
        &self.router
    }
    pub fn switch(&self) -> &NetNs {
        &self.switch
    }
    /// Lb node `index`. Panics if there is none.
    pub fn node(&self, index: usize) -> &SegmentHost {
        &self.nodes[index]
    }
    pub fn nodes(&self) -> &[SegmentHost] {
        &self.nodes
    }
    /// Backend `index`. Panics if there is none.
    pub fn backend(&self, index: usize) -> &SegmentHost {
        &self.backends[index]
    }
    pub fn backends(&self) -> &[SegmentHost] {
        &self.backends
    }
    pub fn vips(&self) -> &[Ipv4Addr] {
        &self.vips
    }

    /// The router's BIRD config: BGP with BFD to every node, everything learned installed in the
    /// kernel with several next hops per prefix. Timers as short as a test wants them: BFD 100 ms
    /// x 3, reconnect after 1 s.
    pub fn router_bird_config(&self) -> String {
        let mut config = format!(
            "router id {ROUTER_ADDRESS};\nlog stderr all;\n\
             protocol device {{ scan time 10; }}\n\
             protocol kernel {{\n  ipv4 {{ import none; export all; }};\n  merge paths on;\n}}\n\
             protocol bfd {{\n  interface \"{HOST_INTERFACE}\" {{ min rx interval 100 ms; min tx interval 100 ms; multiplier 3; }};\n}}\n\
             template bgp lb_node {{\n  local {ROUTER_ADDRESS} as {ROUTER_AS};\n  \
             ipv4 {{ import all; export none; }};\n  bfd on;\n  \
             connect delay time 1;\n  connect retry time 1;\n  error wait time 1, 2;\n  graceful restart off;\n}}\n"
        );
        for (index, node) in self.nodes.iter().enumerate() {
            config.push_str(&format!(
                "protocol bgp {} from lb_node {{ neighbor {} as {NODE_AS}; }}\n",
                Self::router_session(index),
                node.ipv4
            ));
        }
        config
    }

    /// The router's BGP protocol for node `index`.
    pub fn router_session(index: usize) -> String {
        format!("node{index}")
    }

    /// Node `index`'s BIRD config: `dist/bird.conf.example` with its `define` lines set to this
    /// node.
    pub fn node_bird_config(&self, index: usize) -> Result<String> {
        let node = self.node(index);
        node_bird_config(&[
            ("ROUTER_ID", node.ipv4.to_string()),
            ("LOCAL_ADDRESS", node.ipv4.to_string()),
            ("LOCAL_AS", NODE_AS.to_string()),
            ("UPSTREAM_ADDRESS", ROUTER_ADDRESS.to_string()),
            ("UPSTREAM_AS", ROUTER_AS.to_string()),
            ("LB_TABLE", ROUTE_TABLE.to_string()),
            ("LB_PROTO", LB_ROUTE_PROTO.to_string()),
        ])
    }

    /// The next hops of the router's kernel route for `vip` (empty: no route).
    pub fn router_next_hops(&self, vip: Ipv4Addr) -> Result<BTreeSet<Ipv4Addr>> {
        let output = self
            .router
            .ip(["-j", "route", "show", &format!("{vip}/32")])?;
        parse_next_hops(&String::from_utf8_lossy(&output.stdout))
    }

    /// Waits until the router's route for `vip` has exactly the next hops of `nodes` (indices).
    pub fn wait_for_router_next_hops(
        &self,
        vip: Ipv4Addr,
        nodes: &[usize],
        timeout: Duration,
    ) -> Result<Duration> {
        let wanted: BTreeSet<Ipv4Addr> = nodes.iter().map(|&i| self.node(i).ipv4).collect();
        let start = Instant::now();
        let mut last = BTreeSet::new();
        wait_until(
            &format!("the router's route for {vip} to have next hops {wanted:?}"),
            timeout,
            || {
                last = self.router_next_hops(vip)?;
                Ok(last == wanted)
            },
        )
        .with_context(|| format!("its next hops are {last:?}"))?;
        Ok(start.elapsed())
    }

    /// Destinations of lb's routes (`proto 76`) in node `index`'s table 200.
    /// A table that never had a route does not exist yet: that is an empty list too.
    pub fn node_table_routes(&self, index: usize) -> Result<Vec<String>> {
        lb_table_routes(self.node(index).namespace.name())
    }

    /// The node the router sends a client's TCP flow from `client_port` to `vip:port` through
    /// (`ip route get` with the 5-tuple: the router's own multipath hash).
    pub fn node_for_flow(&self, client_port: u16, vip: SocketAddr) -> Result<Option<usize>> {
        let output = self.router.ip([
            "-j",
            "route",
            "get",
            &vip.ip().to_string(),
            "from",
            &CLIENT_ADDRESS.to_string(),
            "iif",
            ROUTER_CLIENT_INTERFACE,
            "ipproto",
            "tcp",
            "sport",
            &client_port.to_string(),
            "dport",
            &vip.port().to_string(),
        ])?;
        let hops = parse_next_hops(&String::from_utf8_lossy(&output.stdout))?;
        Ok(hops
            .first()
            .and_then(|hop| self.nodes.iter().position(|node| node.ipv4 == *hop)))
    }

    /// Node `index`'s cable: its switch port down (nothing in or out, as with a dead host) or up.
    pub fn set_node_link(&self, index: usize, up: bool) -> Result<()> {
        let port = &self.node(index).bridge_port;
        self.switch
            .ip(["link", "set", port, if up { "up" } else { "down" }])?;
        if up {
            links::wait_for_bridge_port_forwarding(&self.switch, port, READY_TIMEOUT)?;
            links::wait_for_carrier(&self.node(index).namespace, HOST_INTERFACE, READY_TIMEOUT)?;
        }
        Ok(())
    }
}

/// Destinations of lb's routes (`proto 76`) in table 200 of the namespace named `namespace` (by
/// name, so a watcher thread can poll it while the lab is borrowed elsewhere). A table that never
/// had a route does not exist yet: that is an empty list too.
pub fn lb_table_routes(namespace: &str) -> Result<Vec<String>> {
    let mut command = Command::new("ip");
    command.args(["-n", namespace]).args([
        "-j",
        "route",
        "show",
        "table",
        &ROUTE_TABLE.to_string(),
        "proto",
        &LB_ROUTE_PROTO.to_string(),
    ]);
    let output = command.output().context("ip route show table")?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        if stderr.contains("FIB table does not exist") {
            return Ok(Vec::new());
        }
        bail!("ip route show table {ROUTE_TABLE} failed: {stderr}");
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let routes: serde_json::Value = if text.trim().is_empty() {
        serde_json::Value::Array(Vec::new())
    } else {
        serde_json::from_str(&text).with_context(|| format!("ip -j route: {text}"))?
    };
    Ok(routes
        .as_array()
        .context("ip -j route prints an array")?
        .iter()
        .filter_map(|route| route["dst"].as_str().map(str::to_owned))
        .collect())
}

/// `dist/bird.conf.example` with the value of each `define NAME = ...;` line in `values` replaced.
pub fn node_bird_config(values: &[(&str, String)]) -> Result<String> {
    let mut config = String::with_capacity(NODE_BIRD_CONFIG_EXAMPLE.len());
    let mut replaced = BTreeSet::new();
    for line in NODE_BIRD_CONFIG_EXAMPLE.lines() {
        let define = line
            .strip_prefix("define ")
            .and_then(|rest| rest.split_once(" = "))
            .map(|(name, _)| name.trim());
        match define.and_then(|name| values.iter().find(|(n, _)| *n == name)) {
            Some((name, value)) => {
                config.push_str(&format!("define {name} = {value};"));
                replaced.insert(*name);
            }
            None => config.push_str(line),
        }
        config.push('\n');
    }
    if let Some((missing, _)) = values.iter().find(|(name, _)| !replaced.contains(name)) {
        bail!("dist/bird.conf.example has no `define {missing} = ...;` line");
    }
    Ok(config)
}

/// The gateways in `ip -j route show|get` output: `gateway` of a single-path route, the
/// `nexthops` of a multipath one.
fn parse_next_hops(json: &str) -> Result<BTreeSet<Ipv4Addr>> {
    if json.trim().is_empty() {
        return Ok(BTreeSet::new());
    }
    let routes: serde_json::Value =
        serde_json::from_str(json).with_context(|| format!("ip -j route: {json}"))?;
    let mut hops = BTreeSet::new();
    for route in routes.as_array().context("ip -j route prints an array")? {
        let gateways = std::iter::once(&route["gateway"]).chain(
            route["nexthops"]
                .as_array()
                .map(|hops| hops.iter().map(|hop| &hop["gateway"]))
                .into_iter()
                .flatten(),
        );
        for gateway in gateways.filter_map(serde_json::Value::as_str) {
            hops.insert(
                gateway
                    .parse()
                    .with_context(|| format!("gateway {gateway:?}"))?,
            );
        }
    }
    Ok(hops)
}

/// A TCP VIP of an [`EcmpLab`]: every backend runs an identity server on its port.
#[derive(Clone, Debug)]
pub struct EcmpVip {
    pub name: String,
    pub address: Ipv4Addr,
    pub port: u16,
}

impl EcmpVip {
    pub fn new(name: &str, address: Ipv4Addr, port: u16) -> Self {
        Self {
            name: name.to_owned(),
            address,
            port,
        }
    }

    pub fn socket_address(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.address), self.port)
    }
}

/// What runs on one lb node: `lb run` and its BIRD (either may be stopped).
#[derive(Default)]
pub struct NodeProcesses {
    /// Declared first: BIRD stops after lb on drop (no difference to the router: both go).
    pub lb: Option<LbDaemon>,
    pub bird: Option<Bird>,
}

/// The shared key of a lab's `[sync]` (`key_file`): 64 hex characters (32 random bytes, as
/// `openssl rand -hex 32` writes them) in a file of its own temp directory, mode 0600. Dropping
/// it removes the directory.
#[derive(Debug)]
pub struct SyncKey {
    dir: PathBuf,
    path: PathBuf,
}

impl SyncKey {
    /// A fresh random key in `<temp>/lb-sync-<name>/sync.key`.
    pub fn create(name: &str) -> Result<Self> {
        use std::io::Read as _;
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};

        let dir = std::env::temp_dir().join(format!("lb-sync-{name}"));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let key = Self {
            path: dir.join("sync.key"),
            dir,
        };
        let mut bytes = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut random| random.read_exact(&mut bytes))
            .context("reading /dev/urandom")?;
        let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key.path)
            .with_context(|| format!("creating {}", key.path.display()))?;
        std::io::Write::write_all(&mut file, format!("{hex}\n").as_bytes())
            .with_context(|| format!("writing {}", key.path.display()))?;
        Ok(key)
    }

    /// The key file (`key_file` of `[sync]`).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SyncKey {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// [`EcmpTopology`] with its processes (see the module documentation). On drop: the nodes' lb
/// (SIGTERM, `lb detach`) and BIRD, their health files, then the fields in order: servers, the
/// router's BIRD, the sync key, the namespaces.
pub struct EcmpLab {
    pub servers: Vec<TcpIdentityServer>,
    pub nodes: Vec<NodeProcesses>,
    pub router_bird: Bird,
    pub vips: Vec<EcmpVip>,
    /// `[vip.health]` of every VIP.
    pub health: String,
    /// The nodes' config has `[sync]` with this key ([`EcmpLab::enable_sync`]); `None`: no sync.
    sync_key: Option<SyncKey>,
    /// How many of the topology's backends (the first ones) the nodes' config lists.
    backends_in_config: usize,
    pub topo: EcmpTopology,
}

/// Health checks of the lab's VIPs: fast, so failures and recoveries are quick to see.
pub const FAST_HEALTH: &str =
    "check = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 2\nfall = 2";

impl EcmpLab {
    /// The topology with `nodes` lb nodes and `backends` backends serving `vips`, the servers and
    /// the router's BIRD. No lb node runs yet: [`EcmpLab::start_node`].
    pub fn new(prefix: &str, nodes: usize, backends: usize, vips: Vec<EcmpVip>) -> Result<Self> {
        let addresses: Vec<Ipv4Addr> = vips
            .iter()
            .map(|vip| vip.address)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let topo = EcmpTopology::new(prefix, nodes, backends, &addresses)?;
        let mut servers = Vec::new();
        for backend in topo.backends() {
            let ports: BTreeSet<u16> = vips.iter().map(|vip| vip.port).collect();
            for port in ports {
                servers.push(TcpIdentityServer::start(
                    backend.namespace(),
                    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
                    backend.ipv4().to_string(),
                )?);
            }
        }
        let router_bird = Bird::start(topo.router(), "router", &topo.router_bird_config())?;
        Ok(Self {
            servers,
            nodes: (0..nodes).map(|_| NodeProcesses::default()).collect(),
            router_bird,
            vips,
            health: FAST_HEALTH.to_owned(),
            sync_key: None,
            backends_in_config: backends,
            topo,
        })
    }

    /// From now on the nodes' config has `[sync]` (see [`EcmpLab::sync_section`]) with a key
    /// this lab writes (and removes on drop). Nodes started before keep their config until
    /// restarted or reloaded. Returns the key file.
    pub fn enable_sync(&mut self) -> Result<&Path> {
        if self.sync_key.is_none() {
            self.sync_key = Some(SyncKey::create(self.topo.name_prefix())?);
        }
        Ok(self.sync_key.as_ref().context("just created")?.path())
    }

    /// Whether the nodes' config has `[sync]`.
    pub fn sync_enabled(&self) -> bool {
        self.sync_key.is_some()
    }

    /// Where node `index` receives flow state: its own segment address, port [`SYNC_PORT`].
    pub fn sync_address(&self, index: usize) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.topo.node(index).ipv4()), SYNC_PORT)
    }

    /// Node `index`'s `[sync]` section: it listens on [`EcmpLab::sync_address`], its peers are
    /// every other node's, and the key is the lab's. Empty without [`EcmpLab::enable_sync`].
    pub fn sync_section(&self, index: usize) -> String {
        let Some(key) = &self.sync_key else {
            return String::new();
        };
        let peers: Vec<String> = (0..self.nodes.len())
            .filter(|&other| other != index)
            .map(|other| format!("\"{}\"", self.sync_address(other)))
            .collect();
        format!(
            "\n[sync]\nlisten = \"{}\"\npeers = [{}]\nkey_file = \"{}\"\n",
            self.sync_address(index),
            peers.join(", "),
            key.path().display()
        )
    }

    /// The nodes' config lists only the first `count` backends of the topology (the others run
    /// their servers but get no traffic until [`EcmpLab::add_backend`]). Takes effect for nodes
    /// started or reloaded afterwards.
    pub fn set_backends_in_config(&mut self, count: usize) -> Result<()> {
        if count == 0 || count > self.topo.backends().len() {
            bail!(
                "the lab has {} backends, cannot configure {count}",
                self.topo.backends().len()
            );
        }
        self.backends_in_config = count;
        Ok(())
    }

    /// How many backends the nodes' config lists.
    pub fn backends_in_config(&self) -> usize {
        self.backends_in_config
    }

    /// The next backend of the topology joins the config of every VIP: each running node's
    /// config file is rewritten and `lb reload` applies it (one node after the other, in index
    /// order). Returns the backend's address. Does not wait for its checks: see
    /// [`EcmpLab::wait_for_backend_up`].
    pub fn add_backend(&mut self) -> Result<Ipv4Addr> {
        let index = self.backends_in_config;
        let address = self
            .topo
            .backends()
            .get(index)
            .with_context(|| format!("all {index} backends of the lab are configured already"))?
            .ipv4();
        self.backends_in_config += 1;
        for node in (0..self.nodes.len()).filter(|&n| self.node_alive(n)) {
            let report = self
                .reload_node(node)
                .with_context(|| format!("adding backend {address} on node {node}"))?;
            if !report.contains(&format!("backend {address} added")) {
                bail!("node {node}'s reload did not add {address}: {report}");
            }
        }
        Ok(address)
    }

    /// Rewrites node `index`'s config file with [`EcmpLab::lb_config`] and runs `lb reload`;
    /// returns its report.
    pub fn reload_node(&self, index: usize) -> Result<String> {
        let config = self.lb_config(index);
        let namespace = self.topo.node(index).namespace();
        self.nodes[index]
            .lb
            .as_ref()
            .with_context(|| format!("lb does not run on node {index}"))?
            .rewrite_config(namespace, &config)
            .with_context(|| format!("rewriting node {index}'s config"))?;
        lb_reload(&api_socket_for(namespace)).with_context(|| format!("lb reload on node {index}"))
    }

    /// Waits until every running node reports backend `address` up in every VIP (its checks
    /// passed and the rings that include it are published).
    pub fn wait_for_backend_up(&self, address: Ipv4Addr, timeout: Duration) -> Result<()> {
        let address = address.to_string();
        let mut last = String::new();
        wait_until(
            &format!("backend {address} to be up on every node"),
            timeout,
            || {
                for node in (0..self.nodes.len()).filter(|&n| self.node_alive(n)) {
                    let status = self.status(node)?;
                    for vip in &self.vips {
                        let state = backend_state(&status, &vip.name, &address)?;
                        if state != "up" {
                            last = format!("node {node}, vip {}: {state}", vip.name);
                            return Ok(false);
                        }
                    }
                }
                Ok(true)
            },
        )
        .with_context(|| format!("last seen: {last}"))
    }

    /// Where node `index`'s lb pins its maps (`lb run` under `nsenter --net`: see
    /// [`LB_NETNS_PINS`]).
    pub fn pin_dir(&self, index: usize) -> PathBuf {
        Path::new(LB_NETNS_PINS)
            .join(self.topo.node(index).namespace().name())
            .join(HOST_INTERFACE)
    }

    /// Node `index`'s flow table, read from its pinned `FLOWS` (live, not the status's
    /// periodic count), with backend addresses.
    pub fn pinned_flows(&self, index: usize) -> Result<Vec<PinnedFlow>> {
        crate::bpffs::pinned_flows(&self.pin_dir(index))
            .with_context(|| format!("node {index}'s flow table"))
    }

    /// Where node `index`'s lb writes its health file.
    pub fn health_file(&self, index: usize) -> std::path::PathBuf {
        std::env::temp_dir().join(format!(
            "lb-health-{}",
            self.topo.node(index).namespace().name()
        ))
    }

    /// The lb config of node `index`: every VIP over every backend (weight 100; the first
    /// [`EcmpLab::backends_in_config`] of them), announced in table [`ROUTE_TABLE`], with
    /// [`EcmpLab::sync_section`] when sync is on. The same on every node but for the health
    /// file's path and the sync addresses.
    pub fn lb_config(&self, index: usize) -> String {
        let mut config = format!(
            "interface = \"{HOST_INTERFACE}\"\nflow_table_size = 65536\nmax_vips = 8\n\n\
             [announce]\nroute_table = {ROUTE_TABLE}\nhealth_file = \"{}\"\n{}",
            self.health_file(index).display(),
            self.sync_section(index)
        );
        for vip in &self.vips {
            config.push_str(&format!(
                "\n[[vip]]\nname = \"{}\"\naddress = \"{}\"\nport = {}\nprotocol = \"tcp\"\n[vip.health]\n{}\n",
                vip.name, vip.address, vip.port, self.health
            ));
            for backend in &self.topo.backends()[..self.backends_in_config] {
                config.push_str(&format!(
                    "[[vip.backend]]\naddress = \"{}\"\nweight = 100\n",
                    backend.ipv4()
                ));
            }
        }
        config
    }

    /// Starts `lb run` (config [`EcmpLab::lb_config`]) and BIRD on node `index`. Does not wait for
    /// the router: [`EcmpLab::wait_for_session`].
    pub fn start_node(&mut self, index: usize) -> Result<()> {
        self.start_node_with(index, &self.lb_config(index))
    }

    /// [`EcmpLab::start_node`] with another lb config.
    pub fn start_node_with(&mut self, index: usize, config: &str) -> Result<()> {
        self.start_node_with_timed(index, config).map(|_| ())
    }

    /// [`EcmpLab::start_node`], returning how long `lb run` took from its launch until it logged
    /// that it attached (seen by polling its log every 50 ms: an upper bound by that much; BIRD's
    /// start afterwards is not included).
    pub fn start_node_timed(&mut self, index: usize) -> Result<Duration> {
        self.start_node_with_timed(index, &self.lb_config(index))
    }

    fn start_node_with_timed(&mut self, index: usize, config: &str) -> Result<Duration> {
        let namespace = self.topo.node(index).namespace();
        let launched = Instant::now();
        let lb = LbDaemon::start(namespace, config, Launch::Nsenter)
            .with_context(|| format!("lb run on node {index}"))?;
        let attached = launched.elapsed();
        self.nodes[index].lb = Some(lb);
        let bird = Bird::start(namespace, "node", &self.topo.node_bird_config(index)?)
            .with_context(|| format!("BIRD on node {index}"))?;
        self.nodes[index].bird = Some(bird);
        Ok(attached)
    }

    /// Waits until the router's BGP session with node `index` is Established.
    pub fn wait_for_session(&self, index: usize) -> Result<()> {
        self.router_bird
            .wait_established(&[&EcmpTopology::router_session(index)], SESSION_TIMEOUT)
    }

    /// Node `index` dies as a host does: its cable goes first (nothing in or out from that
    /// instant, which is returned), then its lb and BIRD are killed with SIGKILL, and what the
    /// host's memory held goes with it: `lb detach` removes the XDP program, the pinned maps and
    /// lb's routes in table 200 (an error if it leaves any), as a reboot would. The link stays down until
    /// [`EcmpLab::revive_node`].
    pub fn kill_node(&mut self, index: usize) -> Result<Instant> {
        self.topo.set_node_link(index, false)?;
        let died = Instant::now();
        let processes = &mut self.nodes[index];
        if let Some(bird) = processes.bird.take() {
            bird.kill()?;
        }
        if let Some(lb) = processes.lb.take() {
            lb.kill()?;
        }
        let namespace = self.topo.node(index).namespace();
        lb_detach(&namespace.path(), HOST_INTERFACE)
            .with_context(|| format!("wiping node {index}'s lb state"))?;
        // A rebooted host has an empty table 200: `lb detach` withdrew lb's routes.
        let left = self.topo.node_table_routes(index)?;
        if !left.is_empty() {
            bail!("lb detach left node {index}'s routes in table {ROUTE_TABLE}: {left:?}");
        }
        Ok(died)
    }

    /// Node `index` comes back after [`EcmpLab::kill_node`]: cable in, then lb and BIRD start as
    /// at boot; waits until the router has it as a next hop for every VIP address again, and
    /// returns how long that took after the link came up.
    pub fn revive_node(&mut self, index: usize) -> Result<Duration> {
        self.topo.set_node_link(index, true)?;
        let start = Instant::now();
        self.start_node(index)?;
        self.wait_for_session(index)?;
        let all: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.node_alive(i))
            .collect();
        for vip in &self.vips {
            self.topo
                .wait_for_router_next_hops(vip.address, &all, SESSION_TIMEOUT)?;
        }
        Ok(start.elapsed())
    }

    /// Whether node `index`'s lb runs.
    pub fn node_alive(&self, index: usize) -> bool {
        self.nodes[index].lb.is_some()
    }

    /// `lb status --json` of node `index`.
    pub fn status(&self, index: usize) -> Result<serde_json::Value> {
        let socket = api_socket_for(self.topo.node(index).namespace());
        lb_status(&socket)
    }

    /// Node `index`'s lb (panics if it does not run).
    pub fn lb(&mut self, index: usize) -> &mut LbDaemon {
        self.nodes[index]
            .lb
            .as_mut()
            .unwrap_or_else(|| panic!("lb does not run on node {index}"))
    }

    /// Node `index`'s BIRD (panics if it does not run).
    pub fn bird(&self, index: usize) -> &Bird {
        self.nodes[index]
            .bird
            .as_ref()
            .unwrap_or_else(|| panic!("BIRD does not run on node {index}"))
    }
}

impl Drop for EcmpLab {
    fn drop(&mut self) {
        // lb first (it writes the health file until it stops), then its file.
        for node in &mut self.nodes {
            node.lb.take();
            node.bird.take();
        }
        for index in 0..self.nodes.len() {
            let _ = std::fs::remove_file(self.health_file(index));
        }
    }
}

/// The VIP object named `name` in an `lb status --json` answer.
pub fn status_vip<'a>(status: &'a serde_json::Value, name: &str) -> Result<&'a serde_json::Value> {
    status["vips"]
        .as_array()
        .context("status has no vips array")?
        .iter()
        .find(|vip| vip["name"] == name)
        .with_context(|| format!("no vip {name} in {status}"))
}

/// The state (`up`, `down`, ...) of backend `address` of VIP `name` in an `lb status --json`
/// answer.
pub fn backend_state(status: &serde_json::Value, name: &str, address: &str) -> Result<String> {
    let vip = status_vip(status, name)?;
    vip["backends"]
        .as_array()
        .with_context(|| format!("vip {name} has no backends array"))?
        .iter()
        .find(|backend| backend["address"] == address)
        .and_then(|backend| backend["state"].as_str())
        .map(str::to_owned)
        .with_context(|| format!("vip {name} has no backend {address} with a state: {vip}"))
}

/// The top-level `sync` object of an `lb status --json` answer (issue 12): the one place the
/// tests read it, so its shape is spelt out here only.
pub fn sync_status(status: &serde_json::Value) -> Result<&serde_json::Value> {
    let sync = &status["sync"];
    if !sync.is_object() {
        let keys: Vec<&String> = status
            .as_object()
            .map(|object| object.keys().collect())
            .unwrap_or_default();
        bail!("lb status --json has no `sync` object (its keys: {keys:?})");
    }
    Ok(sync)
}

/// New flows node's lb counted for VIP `name` (the VIP's `flows`).
pub fn vip_flows(status: &serde_json::Value, name: &str) -> Result<u64> {
    status_vip(status, name)?["flows"]
        .as_u64()
        .with_context(|| format!("vip {name} has no flows counter"))
}

/// Packets node's lb forwarded for VIP `name`.
pub fn vip_packets(status: &serde_json::Value, name: &str) -> Result<u64> {
    status_vip(status, name)?["packets"]
        .as_u64()
        .with_context(|| format!("vip {name} has no packets counter"))
}

/// Everything left of labs named `prefix`: [`crate::topology::leftovers`], lb health files and
/// BIRD processes whose directory names one of their namespaces. Empty after a lab dropped cleanly.
pub fn leftovers(prefix: &str) -> Vec<String> {
    let mut left = crate::topology::leftovers(prefix);
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        left.extend(
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with(&format!("lb-health-{prefix}-")))
                .map(|name| format!("health file {name}")),
        );
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        left.extend(
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with(&format!("lb-sync-{prefix}-")))
                .map(|name| format!("sync key directory {name}")),
        );
    }
    if let Ok(output) = run_command("pgrep", ["-a", "-x", "bird"]) {
        let text = String::from_utf8_lossy(&output.stdout);
        left.extend(
            text.lines()
                .filter(|line| line.contains(&format!("lb-bird-{prefix}-")))
                .map(|line| format!("bird process {line}")),
        );
    }
    left
}

/// How new connections fared around a node failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// From the failure until new connections succeeded again: the start of the first attempt
    /// that succeeded after the last one that failed (zero when none failed).
    pub recovered: Duration,
    /// Attempts in the window that failed.
    pub failed: usize,
    /// Attempts in the window.
    pub attempts: usize,
}

impl Recovery {
    /// Looks at the attempts that started between `died - timeout` (their SYN may have reached
    /// the node just before it died; `timeout` is the attempts' own bound) and `until`.
    pub fn measure(attempts: &[Attempt], died: Instant, until: Instant, timeout: Duration) -> Self {
        let window: Vec<&Attempt> = attempts
            .iter()
            .filter(|a| a.start + timeout >= died && a.start <= until)
            .collect();
        let last_failure = window.iter().filter(|a| a.failed()).map(|a| a.start).max();
        let recovered = match last_failure {
            None => Duration::ZERO,
            Some(last) => window
                .iter()
                .filter(|a| !a.failed() && a.start > last)
                .map(|a| a.start)
                .min()
                .unwrap_or(until)
                .saturating_duration_since(died),
        };
        Self {
            recovered,
            failed: window.iter().filter(|a| a.failed()).count(),
            attempts: window.len(),
        }
    }
}
