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

use serde::Deserialize;
use toml::Spanned;

use super::{Protocol, XdpModeSetting};

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
    /// `[[vip]]` tables; the span of each is its `[[vip]]` header through its last key.
    #[serde(default)]
    pub vip: Vec<Spanned<RawVip>>,
}

/// One `[[vip]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVip {
    pub name: Spanned<String>,
    pub address: Spanned<String>,
    pub port: Spanned<i64>,
    pub protocol: Spanned<Protocol>,
    /// `[[vip.backend]]` tables.
    #[serde(default)]
    pub backend: Vec<Spanned<RawBackend>>,
}

/// One `[[vip.backend]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    pub address: Spanned<String>,
    #[serde(default)]
    pub weight: Option<Spanned<i64>>,
}
