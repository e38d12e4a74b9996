//! The config file exactly as written: serde shapes that mirror the TOML, with every value wrapped
//! in [`Spanned`] so validation can point at the byte that is wrong.
//!
//! Nothing here is checked beyond TOML syntax, key names and value types; [`super::validate`]
//! turns these shapes into a [`super::Config`]. Numbers are read as `i64` (TOML's own integer
//! type) so that an out-of-range value reaches validation and gets our message rather than
//! serde's "invalid value: integer `70000`, expected u16".
//!
//! `deny_unknown_fields` on every table: a misspelt key is an error, never silently ignored.
//! (Do not use `#[serde(flatten)]` here: it disables both `deny_unknown_fields` and spans.)

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use toml::Spanned;

use super::{CheckKind, DnsAllDown, OnAllDown, Protocol, XdpModeSetting};

/// The document root.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub interface: Spanned<String>,
    #[serde(default)]
    pub xdp_mode: Option<Spanned<XdpModeSetting>>,
    #[serde(default)]
    pub ring_size: Option<Spanned<i64>>,
    #[serde(default)]
    pub max_vips: Option<Spanned<i64>>,
    #[serde(default)]
    pub max_backends: Option<Spanned<i64>>,
    #[serde(default)]
    pub flow_table_size: Option<Spanned<i64>>,
    #[serde(default)]
    pub tcp_idle_timeout: Option<Spanned<RawDuration>>,
    #[serde(default)]
    pub udp_idle_timeout: Option<Spanned<RawDuration>>,
    /// Checked in validation: an absolute path.
    #[serde(default)]
    pub api: Option<Spanned<String>>,
    /// Parsed in validation, so a bad address gets our message at the value.
    #[serde(default)]
    pub metrics: Option<Spanned<String>>,
    /// `[announce]`: how this node tells routing daemons and keepalived what it can serve.
    #[serde(default)]
    pub announce: Option<RawAnnounce>,
    /// `[sync]`: flow-state replication with other lb nodes.
    #[serde(default)]
    pub sync: Option<RawSync>,
    /// `[dns]`: the authoritative DNS responder.
    #[serde(default)]
    pub dns: Option<Spanned<RawDns>>,
    /// `[[vip]]` tables; the span of each is its `[[vip]]` header through its last key.
    #[serde(default)]
    pub vip: Vec<Spanned<RawVip>>,
}

/// The `[announce]` table.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table with route_table and health_file"
)]
pub(super) struct RawAnnounce {
    #[serde(default)]
    pub route_table: Option<Spanned<i64>>,
    #[serde(default)]
    pub health_file: Option<Spanned<String>>,
}

/// The `[sync]` table. Addresses are parsed in validation, so a bad one gets our message.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table with listen, peers and key_file"
)]
pub(super) struct RawSync {
    pub listen: Spanned<String>,
    #[serde(default)]
    pub peers: Vec<Spanned<String>>,
    pub key_file: Spanned<String>,
}

/// The `[dns]` table. Addresses and names are parsed in validation, so a bad one gets our message.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table with listen, zone, ttl and [[dns.name]] tables"
)]
pub(super) struct RawDns {
    pub listen: Spanned<Vec<Spanned<String>>>,
    pub zone: Spanned<String>,
    #[serde(default)]
    pub ttl: Option<Spanned<RawDuration>>,
    #[serde(default)]
    pub name: Vec<Spanned<RawDnsName>>,
}

/// One `[[dns.name]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDnsName {
    pub name: Spanned<String>,
    pub addresses: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    pub on_all_down: Option<Spanned<DnsAllDown>>,
    /// Not `Spanned`, like a backend's `health` (see [`RawVip::health`]).
    #[serde(default)]
    pub health: Option<RawHealth>,
}

/// One `[[vip]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVip {
    pub name: Spanned<String>,
    pub address: Spanned<String>,
    pub port: Spanned<i64>,
    pub protocol: Spanned<Protocol>,
    #[serde(default)]
    pub min_healthy: Option<Spanned<i64>>,
    #[serde(default)]
    pub on_all_down: Option<Spanned<OnAllDown>>,
    #[serde(default)]
    pub forward: Option<Spanned<ForwardKind>>,
    #[serde(default)]
    pub gue_port: Option<Spanned<i64>>,
    /// One address, or a list (one per family).
    #[serde(default)]
    pub encap_source: Option<Spanned<OneOrMany>>,
    #[serde(default)]
    pub check_through_tunnel: Option<Spanned<bool>>,
    /// `[vip.health]`: defaults for the VIP's backends. Not `Spanned`: toml cannot give a span
    /// for a table made of dotted keys (`health.check = "tcp"`), and would refuse it.
    #[serde(default)]
    pub health: Option<RawHealth>,
    /// `[[vip.backend]]` tables.
    #[serde(default)]
    pub backend: Vec<Spanned<RawBackend>>,
}

/// `forward = "l2" | "ipip" | "gue"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum ForwardKind {
    L2,
    Ipip,
    Gue,
}

/// A string, or an array of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "an address, or an array of addresses")]
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// One `[[vip.backend]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    pub address: Spanned<String>,
    #[serde(default)]
    pub weight: Option<Spanned<i64>>,
    #[serde(default)]
    pub standby: Option<Spanned<bool>>,
    /// Per-backend override of some keys of the VIP's `[vip.health]` (not `Spanned`, as above).
    #[serde(default)]
    pub health: Option<RawHealth>,
}

/// A `[vip.health]` table or a backend's `health = { ... }`: every key optional, since a key not
/// given comes from the next layer (the VIP's table, then the defaults).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table of health-check settings")]
pub(super) struct RawHealth {
    #[serde(default)]
    pub check: Option<Spanned<CheckKind>>,
    #[serde(default)]
    pub interval: Option<Spanned<RawDuration>>,
    #[serde(default)]
    pub timeout: Option<Spanned<RawDuration>>,
    #[serde(default)]
    pub rise: Option<Spanned<i64>>,
    #[serde(default)]
    pub fall: Option<Spanned<i64>>,
    #[serde(default)]
    pub port: Option<Spanned<i64>>,
    #[serde(default)]
    pub path: Option<Spanned<String>>,
    #[serde(default)]
    pub expect_status: Option<Spanned<Vec<Spanned<i64>>>>,
    #[serde(default)]
    pub host: Option<Spanned<String>>,
    #[serde(default)]
    pub send: Option<Spanned<String>>,
    #[serde(default)]
    pub expect: Option<Spanned<String>>,
    #[serde(default)]
    pub command: Option<Spanned<Vec<Spanned<String>>>>,
}

/// A duration as written: a string for [`humantime::parse_duration`], parsed in validation so
/// that its errors get our message. Anything but a string (`interval = 10`) is refused here with
/// a message that shows the accepted format.
#[derive(Debug)]
pub(super) struct RawDuration(pub String);

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;

        impl Visitor<'_> for DurationVisitor {
            type Value = RawDuration;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(super::validate::DURATION_FORMAT)
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<RawDuration, E> {
                Ok(RawDuration(text.to_string()))
            }
        }

        deserializer.deserialize_str(DurationVisitor)
    }
}
