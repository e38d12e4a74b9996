//! A VIP's `forward` mode and its encapsulation keys (`gue_port`, `encap_source`,
//! `check_through_tunnel`): each key only where its mode uses it, and address families the wire
//! formats can carry.

use std::net::IpAddr;

use toml::Spanned;

use super::super::raw::{ForwardKind, OneOrMany, RawVip};
use super::super::{ConfigError, DEFAULT_GUE_PORT, Forward, Protocol};
use super::Validator;

/// `forward` as written, when it encapsulates ("ipip" or "gue").
pub(super) fn encapsulation(raw: &RawVip) -> Option<&'static str> {
    match raw.forward.as_ref().map(|kind| *kind.get_ref()) {
        Some(ForwardKind::Ipip) => Some("ipip"),
        Some(ForwardKind::Gue) => Some("gue"),
        Some(ForwardKind::L2) | None => None,
    }
}

/// What the encapsulation keys of one VIP came to.
pub(super) struct ForwardSettings {
    pub forward: Forward,
    pub encap_source: Vec<IpAddr>,
    pub check_through_tunnel: bool,
}

impl Validator<'_> {
    pub(super) fn forward(&self, raw: &RawVip) -> Result<ForwardSettings, ConfigError> {
        let kind = raw
            .forward
            .as_ref()
            .map_or(ForwardKind::L2, |k| *k.get_ref());
        let name = raw.name.get_ref();
        let forward = match kind {
            ForwardKind::L2 => Forward::L2,
            ForwardKind::Ipip => Forward::Ipip,
            ForwardKind::Gue => Forward::Gue {
                port: match &raw.gue_port {
                    Some(port) => self.port(port)?,
                    None => DEFAULT_GUE_PORT,
                },
            },
        };
        if let (Some(port), false) = (&raw.gue_port, matches!(forward, Forward::Gue { .. })) {
            return Err(self.error(
                port.span(),
                format!(
                    "gue_port is only for forward = \"gue\"; vip `{name}` forwards with {}",
                    forward.as_str()
                ),
            ));
        }
        let not_encapsulating = |key: &str, span| {
            self.error(
                span,
                format!(
                    "{key} is only for encapsulating VIPs (forward = \"ipip\" or \"gue\"); \
                     vip `{name}` forwards with l2"
                ),
            )
        };
        let encap_source = match &raw.encap_source {
            None => Vec::new(),
            Some(_) if !forward.encapsulates() => {
                return Err(not_encapsulating(
                    "encap_source",
                    raw.encap_source.as_ref().map_or(0..0, Spanned::span),
                ));
            }
            Some(sources) => self.encap_sources(sources)?,
        };
        let check_through_tunnel = match &raw.check_through_tunnel {
            Some(value) if *value.get_ref() && !forward.encapsulates() => {
                return Err(not_encapsulating("check_through_tunnel", value.span()));
            }
            Some(value) if *value.get_ref() && *raw.protocol.get_ref() != Protocol::Tcp => {
                return Err(self.error(
                    value.span(),
                    format!(
                        "check_through_tunnel needs a TCP VIP (its probe is a TCP handshake with \
                         the VIP); vip `{name}` is {}",
                        raw.protocol.get_ref()
                    ),
                ));
            }
            Some(value) => *value.get_ref(),
            None => false,
        };
        Ok(ForwardSettings {
            forward,
            encap_source,
            check_through_tunnel,
        })
    }

    /// `encap_source`: unicast addresses, at most one IPv4 and one IPv6.
    fn encap_sources(&self, value: &Spanned<OneOrMany>) -> Result<Vec<IpAddr>, ConfigError> {
        let texts: Vec<&String> = match value.get_ref() {
            OneOrMany::One(text) => vec![text],
            OneOrMany::Many(texts) => texts.iter().collect(),
        };
        let mut sources: Vec<IpAddr> = Vec::with_capacity(texts.len());
        for text in texts {
            let spanned = Spanned::new(value.span(), text.clone());
            let address = self.address("encap_source", &spanned)?;
            if sources.iter().any(|s| s.is_ipv4() == address.is_ipv4()) {
                return Err(self.error(
                    value.span(),
                    format!(
                        "encap_source has two {} addresses; give at most one per family",
                        if address.is_ipv4() { "IPv4" } else { "IPv6" }
                    ),
                ));
            }
            sources.push(address);
        }
        if sources.is_empty() {
            return Err(self.error(
                value.span(),
                "encap_source is empty; leave it out to use the route's source address",
            ));
        }
        Ok(sources)
    }
}
