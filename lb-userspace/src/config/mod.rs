//! The TOML config of `lb run --config FILE` and `lb check-config --config FILE`.
//!
//! ```toml
//! interface = "eth0"           # required
//! xdp_mode = "auto"            # auto | native | skb
//! ring_size = 65537            # Maglev table size M: prime, 1021..=1000003
//! max_vips = 64
//! max_backends = 4096          # over all VIPs
//! flow_table_size = 1048576
//!
//! [[vip]]
//! name = "web"                 # unique, [A-Za-z0-9_.-]+
//! address = "10.0.0.100"       # IPv4 or IPv6
//! port = 80
//! protocol = "tcp"             # tcp | udp
//!
//! [[vip.backend]]
//! address = "10.0.0.11"        # same family as the VIP
//! weight = 100                 # relative; 0 drains (no new flows)
//! ```
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
use std::net::IpAddr;
use std::path::Path;

use serde::Deserialize;

pub use error::ConfigError;

/// Weight of a backend that does not say.
pub const DEFAULT_WEIGHT: u32 = 100;
/// Smallest accepted `ring_size` (the largest prime below 1024). Maglev spreads load evenly only
/// when the table is much larger than the number of backends (the paper suggests M > 100 N).
pub const MIN_RING_SIZE: u32 = 1021;
/// Largest accepted `ring_size` (a prime). Each VIP holds two tables of M 8-byte slots in the kernel.
pub const MAX_RING_SIZE: u32 = 1_000_003;
/// Smallest accepted `flow_table_size`: below this the LRU would evict live flows constantly.
pub const MIN_FLOW_TABLE_SIZE: u32 = 1024;

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
    /// In file order.
    pub vips: Vec<VipConfig>,
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
    /// In file order; possibly empty (the data plane then drops the VIP's traffic).
    pub backends: Vec<BackendConfig>,
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
}

impl Config {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|io| ConfigError::Read {
            path: path.to_path_buf(),
            io,
        })?;
        Config::parse(&text, path)
    }

    /// Validates config `text`; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig =
            toml::from_str(text).map_err(|error| ConfigError::from_toml(path, text, &error))?;
        validate::validate(raw, text, path)
    }
}
