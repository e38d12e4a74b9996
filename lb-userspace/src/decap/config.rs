//! `lb decap --config FILE`: a small TOML file, `vips = ["10.0.0.1", "fd00::1"]` and optionally
//! `gue_port = 6080`. Errors are `FILE:LINE:COL: message`, like the main config's.

use std::{collections::BTreeSet, net::IpAddr, path::Path};

use serde::Deserialize;
use toml::Spanned;

use crate::config::ConfigError;

/// What `lb decap` installs on an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecapSpec {
    /// Inner destinations to decapsulate for (and to put on `lo`).
    pub vips: BTreeSet<IpAddr>,
    /// The GUE UDP destination port.
    pub gue_port: u16,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    vips: Spanned<Vec<Spanned<String>>>,
    gue_port: Option<Spanned<i64>>,
}

impl DecapSpec {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|io| ConfigError::Read {
            path: path.to_path_buf(),
            io,
        })?;
        Self::parse(&text, path)
    }

    /// Parses `text` (the contents of `path`, named in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: Raw =
            toml::from_str(text).map_err(|error| ConfigError::from_toml(path, text, &error))?;
        let mut vips = BTreeSet::new();
        for vip in raw.vips.get_ref() {
            let address = parse_vip(vip.get_ref())
                .map_err(|message| ConfigError::at(path, text, vip.span(), message))?;
            if !vips.insert(address) {
                return Err(ConfigError::at(
                    path,
                    text,
                    vip.span(),
                    format!("VIP {address} is listed twice"),
                ));
            }
        }
        if vips.is_empty() {
            return Err(ConfigError::at(
                path,
                text,
                raw.vips.span(),
                "`vips` is empty: name at least one VIP address".into(),
            ));
        }
        let gue_port = match raw.gue_port {
            None => lb_common::decap::DEFAULT_GUE_PORT,
            Some(port) => u16::try_from(*port.get_ref())
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| {
                    ConfigError::at(
                        path,
                        text,
                        port.span(),
                        format!("gue_port {} is not a UDP port (1-65535)", port.get_ref()),
                    )
                })?,
        };
        Ok(Self { vips, gue_port })
    }
}

/// A VIP address: unicast, not unspecified, not loopback.
pub fn parse_vip(text: &str) -> Result<IpAddr, String> {
    let address: IpAddr = text
        .parse()
        .map_err(|_| format!("{text:?} is not an IPv4 or IPv6 address"))?;
    if address.is_unspecified() || address.is_multicast() || address.is_loopback() {
        return Err(format!(
            "{address} cannot be a VIP (unspecified, multicast or loopback)"
        ));
    }
    if let IpAddr::V4(v4) = address
        && v4.is_broadcast()
    {
        return Err(format!("{address} cannot be a VIP (broadcast)"));
    }
    Ok(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<DecapSpec, String> {
        DecapSpec::parse(text, Path::new("decap.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn vips_and_port() {
        let spec = parse("vips = [\"10.0.0.1\", \"fd00::1\"]\ngue_port = 7000\n").expect("valid");
        assert_eq!(
            spec.vips.into_iter().collect::<Vec<_>>(),
            [
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "fd00::1".parse().unwrap()
            ]
        );
        assert_eq!(spec.gue_port, 7000);
        assert_eq!(
            parse("vips = [\"10.0.0.1\"]").expect("valid").gue_port,
            6080
        );
    }

    #[test]
    fn errors_name_line_and_column() {
        assert_eq!(
            parse("vips = [\"10.0.0.1\",\n  \"10.0.0.300\"]").unwrap_err(),
            "decap.toml:2:3: \"10.0.0.300\" is not an IPv4 or IPv6 address"
        );
        assert_eq!(
            parse("vips = [\"10.0.0.1\"]\ngue_port = 70000\n").unwrap_err(),
            "decap.toml:2:12: gue_port 70000 is not a UDP port (1-65535)"
        );
        assert_eq!(
            parse("vips = [\"10.0.0.1\", \"10.0.0.1\"]").unwrap_err(),
            "decap.toml:1:21: VIP 10.0.0.1 is listed twice"
        );
        assert!(
            parse("vips = [\"10.0.0.1\"]\nport = 1\n")
                .unwrap_err()
                .starts_with("decap.toml:2:1: unknown field `port`")
        );
        assert_eq!(
            parse("vips = []").unwrap_err(),
            "decap.toml:1:8: `vips` is empty: name at least one VIP address"
        );
    }
}
