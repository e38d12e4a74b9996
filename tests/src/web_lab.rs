//! The set-up most daemon tests share: a [`DsrTopology`], a TCP identity server on port 80 in
//! every backend (answering with the backend's IPv4 address), and configs of one TCP VIP `web`
//! over them.

use std::net::{IpAddr, SocketAddr};

use crate::{
    servers::TcpIdentityServer,
    topology::{DsrTopology, DsrTopologyOptions},
};

pub struct WebLab {
    /// Declared first: the servers stop before their namespaces go.
    pub servers: Vec<TcpIdentityServer>,
    pub topo: DsrTopology,
}

impl WebLab {
    /// `backends` backends, namespaces named after `prefix` (see [`crate::topology::leftovers`]).
    pub fn new(prefix: &str, backends: usize) -> Self {
        let options = DsrTopologyOptions {
            name_prefix: prefix.to_owned(),
            ..Default::default()
        };
        let topo = DsrTopology::new(backends, options).expect("topology");
        let servers = (0..backends)
            .map(|i| {
                TcpIdentityServer::start(
                    topo.backend(i),
                    "0.0.0.0:80".parse().expect("bind address"),
                    topo.backend_host(i).ipv4().to_string(),
                )
                .unwrap_or_else(|e| panic!("server on backend {i}: {e:#}"))
            })
            .collect();
        Self { servers, topo }
    }

    /// The VIP `web`: the topology's IPv4 VIP, port 80.
    pub fn vip(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.topo.vip_v4()), 80)
    }

    /// Backend `i`'s address, which is also what its server answers.
    pub fn address(&self, i: usize) -> String {
        self.topo.backend_host(i).ipv4().to_string()
    }

    /// A config with `extra` top-level keys and the VIP `web` over `backends` (address, weight),
    /// its `[vip.health]` table holding `health` (e.g. `interval = "200ms"`).
    pub fn config(&self, extra: &str, health: &str, backends: &[(String, u32)]) -> String {
        let mut config = format!(
            "interface = \"eth0\"\nflow_table_size = 65536\nmax_vips = 2\n{extra}\n\n[[vip]]\nname = \"web\"\naddress = \"{}\"\nport = 80\nprotocol = \"tcp\"\n[vip.health]\n{health}\n",
            self.topo.vip_v4()
        );
        for (address, weight) in backends {
            config.push_str(&format!(
                "[[vip.backend]]\naddress = \"{address}\"\nweight = {weight}\n"
            ));
        }
        config
    }

    /// [`WebLab::config`] over every backend, weight 100 each.
    pub fn config_all(&self, extra: &str, health: &str) -> String {
        let all: Vec<(String, u32)> = (0..self.servers.len())
            .map(|i| (self.address(i), 100))
            .collect();
        self.config(extra, health, &all)
    }
}
