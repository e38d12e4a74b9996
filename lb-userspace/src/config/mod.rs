//! The TOML config of `lb run --config FILE` and `lb check-config --config FILE`.
//!
//! ```toml
//! interface = "eth0"           # required
//! xdp_mode = "auto"            # auto | native | skb
//! ring_size = 65537            # Maglev table size M: prime, 1021..=1000003
//! max_vips = 64
//! max_backends = 4096          # over all VIPs
//! flow_table_size = 1048576
//! tcp_idle_timeout = "10m"     # a TCP connection idle this long may move when its ring slot
//!                              # changes; 2s..=24h
//! udp_idle_timeout = "30s"     # a UDP flow idle this long is forgotten; 2s..=24h
//! api = "/run/lb/lb.sock"      # control API's Unix socket: an absolute path (this is the default)
//! metrics = "127.0.0.1:9100"   # Prometheus `GET /metrics` on this address:port; unset: off
//!
//! [announce]                   # optional; both keys off by default
//! route_table = 200            # a host route per servable VIP address in this kernel table
//! health_file = "/run/lb/health"   # keepalived track_file: VIPs that cannot serve
//!
//! [sync]                       # optional: flow-state replication with the other lb nodes
//! listen = "10.0.0.2:7946"     # address:port this node receives on (a specific address: it is
//!                              # this node's identity to its peers)
//! peers = ["10.0.0.3:7946"]    # the other nodes' listen addresses, same address family
//! key_file = "/etc/lb/sync.key"    # shared secret: 64 hex characters (`openssl rand -hex 32`)
//!
//! [dns]                        # optional: authoritative DNS for names over VIPs and other addresses
//! listen = ["10.0.0.2:53"]     # UDP and TCP on each
//! zone = "svc.example."        # SOA and NS answered at the apex
//! ttl = "5s"                   # TTL of every answer; 0s..=1d
//!
//! [[dns.name]]
//! name = "www"                 # www.svc.example.
//! addresses = ["10.0.0.100", "192.0.2.100"]   # a VIP of this node is up while it can serve
//! on_all_down = "all"          # all | none: what to answer when no address is up
//! health = { check = "tcp", port = 443 }   # for addresses that are not VIPs; unset: always up
//!
//! [[vip]]
//! name = "web"                 # unique, [A-Za-z0-9_.-]+
//! address = "10.0.0.100"       # IPv4 or IPv6
//! port = 80
//! protocol = "tcp"             # tcp | udp
//! min_healthy = 1              # >= 1, <= the primary backends; fewer healthy: standbys serve
//! on_all_down = "drop"         # drop | pass: what happens to new flows when nothing is healthy
//!
//! [vip.health]                 # defaults for this VIP's backends; optional, as is every key
//! check = "http"               # tcp | http | udp | exec | none; default tcp (none for udp VIPs)
//! interval = "1s"              # humantime: "100ms", "1.5s", "2m"; >= 10ms
//! timeout = "500ms"            # > 0 and <= interval
//! rise = 2                     # consecutive successes to go up
//! fall = 3                     # consecutive failures to go down
//! port = 8080                  # default: the VIP's port
//! path = "/healthz"            # http only; default "/"
//! expect_status = [200, 204]   # http only; default [200]
//! host = "www.example.com"     # http only; Host header
//! # send = "ping"              # udp only, required there: the payload
//! # expect = "pong"            # udp only: the reply must contain it
//! # command = ["/usr/local/bin/check", "--fast"]   # exec only, required there
//!
//! [[vip.backend]]
//! address = "10.0.0.11"        # same family as the VIP
//! weight = 100                 # relative; 0 drains (no new flows)
//!
//! [[vip.backend]]
//! address = "10.0.0.12"
//! standby = true               # serves only when fewer than min_healthy primaries are healthy
//! health = { port = 8081, rise = 5 }   # per key over [vip.health]; keys of another check
//!                                       # kind than the effective one are errors here too
//! ```
//!
//! A backend's effective health settings are, key by key, its own `health` table, else the VIP's
//! `[vip.health]`, else the defaults ([`HealthConfig::defaults`]); the rules (kind-specific keys,
//! `timeout <= interval`, ...) are checked on that merged result, and an error points at the
//! value that breaks it, in the backend's table when it comes from there.
//!
//! Loading happens in two steps, each in its own module: [`raw`] deserialises the text into
//! shapes that mirror the file and remember where every value was written, then [`validate`]
//! checks the rules TOML cannot express and builds the [`Config`] the rest of the daemon uses.
//! Every error names the file, line and column ([`ConfigError`]), and unknown keys are errors.
//!
//! Adding a key: add it to the matching struct in [`raw`] (as `Option<Spanned<_>>` if it has a
//! default, so errors can point at it), add the checked field to the public struct here, and
//! convert one into the other in [`validate`]. Tests go in `tests.rs`.

mod error;
mod raw;
#[cfg(test)]
mod tests;
mod validate;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use error::ConfigError;

/// Weight of a backend that does not say.
pub const DEFAULT_WEIGHT: u32 = 100;
/// `min_healthy` of a VIP that does not say.
pub const DEFAULT_MIN_HEALTHY: u32 = 1;
/// Health-check `interval` when neither the backend nor its VIP says.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// Health-check `timeout` when neither the backend nor its VIP says.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);
/// Shortest accepted health-check `interval`.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);
/// Consecutive successful checks that bring a backend up, by default.
pub const DEFAULT_RISE: u32 = 2;
/// Consecutive failed checks that take a backend down, by default.
pub const DEFAULT_FALL: u32 = 3;
/// Smallest accepted `ring_size` (the largest prime below 1024). Maglev spreads load evenly only
/// when the table is much larger than the number of backends (the paper suggests M > 100 N).
pub const MIN_RING_SIZE: u32 = 1021;
/// Largest accepted `ring_size` (a prime). Each VIP holds two tables of M 8-byte slots in the kernel.
pub const MAX_RING_SIZE: u32 = 1_000_003;
/// Smallest accepted `flow_table_size`: below this the LRU would evict live flows constantly.
pub const MIN_FLOW_TABLE_SIZE: u32 = 1024;
/// `tcp_idle_timeout` when the config does not say: a changed ring slot keeps using the flow
/// table this long after its last change, and a recorded TCP flow idle this long is forgotten.
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// `udp_idle_timeout` when the config does not say: a UDP flow idle this long is forgotten.
pub const DEFAULT_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Shortest accepted idle timeout: the data plane refreshes a flow's last-seen time at most once
/// a second, so a shorter timeout could forget a flow that is sending.
pub const MIN_IDLE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest accepted idle timeout.
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Where the control API listens when the config does not say (`api`).
pub const DEFAULT_API: &str = "/run/lb/lb.sock";
/// Longest accepted `api` path in bytes: a Unix socket address holds 108 bytes, NUL included.
pub const MAX_API_PATH_BYTES: usize = 107;

/// A validated config: every address parsed, every range and cross-reference checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Interface the XDP program attaches to.
    pub interface: String,
    pub xdp_mode: XdpModeSetting,
    /// Maglev table size M (prime).
    pub ring_size: u32,
    /// Capacity of the VIP map (at least the number of configured VIPs).
    pub max_vips: u32,
    /// Capacity of the backend map (at least the number of backends over all VIPs).
    pub max_backends: u32,
    /// Capacity of the connection-tracking LRU map.
    pub flow_table_size: u32,
    /// How long a changed ring slot of a TCP VIP keeps sending unrecorded packets to its prior
    /// owner, and how long an idle recorded TCP flow is kept.
    pub tcp_idle_timeout: Duration,
    /// How long an idle UDP flow is kept.
    pub udp_idle_timeout: Duration,
    /// Unix socket of the control API (`lb status`, `lb reload`, ...): an absolute path,
    /// [`DEFAULT_API`] unless the config says otherwise.
    pub api: PathBuf,
    /// Where `GET /metrics` (Prometheus text) is served; `None` (the default): not served.
    pub metrics: Option<SocketAddr>,
    /// `[announce]`: route health injection and keepalived's health file; both off by default.
    pub announce: AnnounceConfig,
    /// `[sync]`: flow-state replication; `None` (the default): off.
    pub sync: Option<SyncConfig>,
    /// `[dns]`: the authoritative DNS responder; `None` (the default): off.
    pub dns: Option<DnsConfig>,
    /// In file order.
    pub vips: Vec<VipConfig>,
}

/// The authoritative DNS responder (`[dns]`, see [`crate::dns`]).
#[derive(Debug, Clone, PartialEq)]
pub struct DnsConfig {
    /// Each address is served over UDP and TCP; unique, in file order.
    pub listen: Vec<SocketAddr>,
    /// The zone lb is authoritative for: lower case, ends with `.` (`svc.example.`).
    pub zone: String,
    /// TTL of every record lb answers with.
    pub ttl: Duration,
    /// In file order; names unique.
    pub names: Vec<DnsNameConfig>,
}

/// TTL of the answers when `[dns]` does not say.
pub const DEFAULT_DNS_TTL: Duration = Duration::from_secs(5);
/// Longest accepted `ttl` (a day; answers should follow health).
pub const MAX_DNS_TTL: Duration = Duration::from_secs(86_400);

/// One `[[dns.name]]`: a name in the zone and the addresses it answers with.
#[derive(Debug, Clone, PartialEq)]
pub struct DnsNameConfig {
    /// Relative to the zone, lower case (`www`, or `a.b`); `@` is not allowed (the apex holds
    /// SOA and NS only).
    pub name: String,
    /// Unique, in file order.
    pub addresses: Vec<IpAddr>,
    pub on_all_down: DnsAllDown,
    /// How addresses that are not VIPs of this node are checked: `None` when `health` is not
    /// given (they are then always up). VIP addresses follow their VIPs.
    pub health: Option<HealthConfig>,
}

/// What a name answers when none of its addresses is up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DnsAllDown {
    /// Every configured address (clients may still reach one; better than nothing).
    #[default]
    All,
    /// An empty answer (NOERROR, no records).
    None,
}

impl DnsAllDown {
    /// The spelling used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            DnsAllDown::All => "all",
            DnsAllDown::None => "none",
        }
    }
}

/// How this node tells others which VIP addresses it can serve (`[announce]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AnnounceConfig {
    /// Kernel routing table that holds a host route per servable VIP address, for a routing
    /// daemon (BIRD, FRR) to export. Never 0, 253, 254 or 255 (the kernel's own tables).
    pub route_table: Option<u32>,
    /// keepalived `track_file`: the number of this node's VIPs that cannot serve. An absolute
    /// path.
    pub health_file: Option<PathBuf>,
}

/// Flow-state replication with the other lb nodes (`[sync]`, see [`crate::sync`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncConfig {
    /// Where this node receives its peers' datagrams, and its identity in the ones it sends.
    pub listen: SocketAddr,
    /// The other nodes' `listen` addresses, in file order.
    pub peers: Vec<SocketAddr>,
    /// Where `key` was read from (an absolute path).
    pub key_file: PathBuf,
    /// The shared secret, read when the config was loaded (a reload reads it again).
    pub key: crate::sync::key::SyncKey,
}

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeSetting {
    /// Native (driver) mode where the driver supports it, else generic (skb) mode.
    Auto,
    /// Driver mode only; attaching fails if the driver cannot.
    Native,
    /// Generic mode: works everywhere, slower.
    Skb,
}

impl XdpModeSetting {
    /// The spelling used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            XdpModeSetting::Auto => "auto",
            XdpModeSetting::Native => "native",
            XdpModeSetting::Skb => "skb",
        }
    }
}

impl fmt::Display for XdpModeSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One virtual service: packets to `address:port/protocol` are spread over `backends`.
#[derive(Debug, Clone, PartialEq)]
pub struct VipConfig {
    /// Unique, `[A-Za-z0-9_.-]+`: used in metric labels and on the command line.
    pub name: String,
    pub address: IpAddr,
    /// 1..=65535.
    pub port: u16,
    pub protocol: Protocol,
    /// At least this many primary (non-standby) backends must be healthy for the primaries to
    /// serve new flows; below it the standbys take over. `>= 1`, and at most the number of
    /// primary backends when the VIP has backends.
    pub min_healthy: u32,
    /// What happens to new flows when no backend is healthy.
    pub on_all_down: OnAllDown,
    /// How packets reach the backends: L2 DSR, or encapsulated to routed backends.
    pub forward: Forward,
    /// `encap_source`: the outer source address of encapsulated packets, at most one per family;
    /// a family not given uses the kernel's preferred source on the route to each backend.
    pub encap_source: Vec<IpAddr>,
    /// `check_through_tunnel`: each backend's health check also sends a probe through the
    /// tunnel (encapsulated to the VIP, as client traffic is), so a backend whose decapsulation
    /// is broken goes down.
    pub check_through_tunnel: bool,
    /// The VIP's `[vip.health]` over the defaults: the settings of a backend that has no `health`
    /// table of its own. Each backend carries its own effective copy in [`BackendConfig::health`].
    pub health: HealthConfig,
    /// In file order; possibly empty (the data plane then drops the VIP's traffic).
    pub backends: Vec<BackendConfig>,
}

/// How a VIP's packets reach its backends (`forward`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forward {
    /// L2 direct server return: only the Ethernet addresses change; every backend is a neighbour
    /// on one of this node's segments.
    L2,
    /// IP in IP to the backend's address, through the kernel's route to it (gateways allowed).
    Ipip,
    /// IP in UDP (GUE, "direct IP") to `port` on the backend.
    Gue { port: u16 },
}

/// The UDP port GUE goes to when `gue_port` is not given (also `lb decap`'s default).
pub const DEFAULT_GUE_PORT: u16 = 6080;

impl Forward {
    /// The spelling used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Forward::L2 => "l2",
            Forward::Ipip => "ipip",
            Forward::Gue { .. } => "gue",
        }
    }

    /// Whether packets are encapsulated (the backend may be behind routers).
    pub fn encapsulates(self) -> bool {
        !matches!(self, Forward::L2)
    }
}

impl fmt::Display for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Forward::Gue { port } => write!(f, "gue (port {port})"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// What a VIP does with new flows when none of its backends is healthy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnAllDown {
    /// Drop them (counted).
    Drop,
    /// Pass them to the host's own stack untouched.
    Pass,
}

impl OnAllDown {
    /// The spelling used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            OnAllDown::Drop => "drop",
            OnAllDown::Pass => "pass",
        }
    }
}

impl fmt::Display for OnAllDown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a backend's health is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connection to the check port is accepted.
    Tcp,
    /// An HTTP/1.1 `GET path` answers with one of `expect_status`.
    Http,
    /// A UDP datagram `send` gets a reply (containing `expect`, when given).
    Udp,
    /// `command` exits with status 0.
    Exec,
    /// No check: the backend is always considered healthy.
    None,
}

impl CheckKind {
    /// The spelling used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckKind::Tcp => "tcp",
            CheckKind::Http => "http",
            CheckKind::Udp => "udp",
            CheckKind::Exec => "exec",
            CheckKind::None => "none",
        }
    }
}

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The effective health-check settings of one backend (or the defaults of one VIP): every key
/// resolved, every rule checked. Fields of other check kinds keep their defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    pub check: CheckKind,
    /// Time between the starts of two checks; at least [`MIN_INTERVAL`].
    pub interval: Duration,
    /// How long one check may take; `0 < timeout <= interval`.
    pub timeout: Duration,
    /// Consecutive successes that bring a backend up (`>= 1`).
    pub rise: u32,
    /// Consecutive failures that take a backend down (`>= 1`).
    pub fall: u32,
    /// Port the check connects to: the `port` key, else the VIP's port.
    pub port: u16,
    /// HTTP: the request path; starts with `/`.
    pub path: String,
    /// HTTP: the statuses that mean healthy; non-empty, each in 100..=599.
    pub expect_status: Vec<u16>,
    /// HTTP: the `Host` header, if any.
    pub host: Option<String>,
    /// UDP: the payload sent; non-empty when `check` is [`CheckKind::Udp`].
    pub send: Vec<u8>,
    /// UDP: bytes the reply must contain; any reply counts when `None`.
    pub expect: Option<Vec<u8>>,
    /// Exec: program and arguments; non-empty when `check` is [`CheckKind::Exec`].
    pub command: Vec<String>,
}

impl HealthConfig {
    /// The settings of a backend of a VIP on `vip_port` when the config says nothing.
    /// The defaults for a VIP's service: a TCP connect check for a TCP VIP; none for a UDP VIP,
    /// because UDP has no generic probe (configure `check = "udp"` with `send`, or `exec`).
    pub fn defaults(vip_port: u16, vip_protocol: Protocol) -> Self {
        HealthConfig {
            check: match vip_protocol {
                Protocol::Tcp => CheckKind::Tcp,
                Protocol::Udp => CheckKind::None,
            },
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
            port: vip_port,
            path: "/".to_string(),
            expect_status: vec![200],
            host: None,
            send: Vec::new(),
            expect: None,
            command: Vec::new(),
        }
    }
}

/// Transport protocol of a VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number, as the data plane matches it.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }

    /// The spelling used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A real server behind a VIP.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    /// Same address family as the VIP.
    pub address: IpAddr,
    /// Relative share of new flows; 0 drains the backend (existing flows stay, no new ones).
    pub weight: u32,
    /// In the standby pool: takes new flows only while fewer than the VIP's `min_healthy`
    /// primaries are healthy.
    pub standby: bool,
    /// Effective health-check settings: the backend's `health` table over the VIP's over the
    /// defaults.
    pub health: HealthConfig,
}

impl Config {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let bytes = std::fs::read(path).map_err(|io| ConfigError::Read {
            path: path.to_path_buf(),
            io,
        })?;
        Config::parse_bytes(&bytes, path)
    }

    /// Validates config `bytes` like [`Config::parse`]; bytes that are not UTF-8 are an error
    /// at the first invalid one (TOML files are UTF-8).
    pub fn parse_bytes(bytes: &[u8], path: &Path) -> Result<Config, ConfigError> {
        match std::str::from_utf8(bytes) {
            Ok(text) => Config::parse(text, path),
            Err(e) => Err(ConfigError::invalid_utf8(path, bytes, e.valid_up_to())),
        }
    }

    /// Validates config `text`; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig =
            toml::from_str(text).map_err(|error| ConfigError::from_toml(path, text, &error))?;
        validate::validate(raw, text, path)
    }
}
