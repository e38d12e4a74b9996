//! `[dns]`: the listen addresses, the zone, the TTL and every `[[dns.name]]` with its addresses
//! and how the ones that are not VIPs of this node are checked.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use toml::Spanned;

use super::super::raw::{RawDns, RawDnsName};
use super::super::{
    CheckKind, ConfigError, DEFAULT_DNS_TTL, DnsAllDown, DnsConfig, DnsNameConfig, MAX_DNS_TTL,
    Protocol, VipConfig,
};
use super::{Layers, Owner, Validator};

/// Longest name in presentation form without the final dot (RFC 1035: 255 octets on the wire).
const MAX_NAME_CHARS: usize = 253;
/// Longest label (RFC 1035).
const MAX_LABEL_CHARS: usize = 63;

impl Validator<'_> {
    pub(super) fn dns(
        &self,
        raw: &Spanned<RawDns>,
        vips: &[VipConfig],
    ) -> Result<DnsConfig, ConfigError> {
        let RawDns {
            listen,
            zone,
            ttl,
            name,
        } = raw.get_ref();
        if listen.get_ref().is_empty() {
            return Err(self.error(
                listen.span(),
                "listen is empty: give at least one address:port to answer on",
            ));
        }
        let mut seen = HashSet::new();
        let mut listen_addresses = Vec::with_capacity(listen.get_ref().len());
        for value in listen.get_ref() {
            let address = self.dns_listen(value)?;
            if !seen.insert(address) {
                return Err(self.error(value.span(), format!("listen {address} is listed twice")));
            }
            listen_addresses.push(address);
        }
        let zone_name = self.zone(zone)?;
        let ttl = match ttl {
            None => DEFAULT_DNS_TTL,
            Some(value) => {
                let ttl = self.duration("ttl", value)?;
                if ttl > MAX_DNS_TTL {
                    return Err(self.error(
                        value.span(),
                        format!(
                            "ttl {} is longer than {}",
                            humantime::format_duration(ttl),
                            humantime::format_duration(MAX_DNS_TTL)
                        ),
                    ));
                }
                ttl
            }
        };
        let vip_addresses: HashSet<IpAddr> = vips.iter().map(|vip| vip.address).collect();
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut configs = Vec::with_capacity(name.len());
        for raw_name in name {
            let line = self.line_of(raw_name.span());
            let config = self.dns_name(raw_name.get_ref(), &zone_name, &vip_addresses)?;
            if let Some(first_line) = names.insert(config.name.clone(), line) {
                return Err(self.error(
                    raw_name.get_ref().name.span(),
                    format!(
                        "duplicate dns name `{}`: the name on line {first_line} has it",
                        config.name
                    ),
                ));
            }
            configs.push(config);
        }
        Ok(DnsConfig {
            listen: listen_addresses,
            zone: zone_name,
            ttl,
            names: configs,
        })
    }

    fn dns_listen(&self, value: &Spanned<String>) -> Result<SocketAddr, ConfigError> {
        let text = value.get_ref();
        let problem = match text.parse::<SocketAddr>() {
            Ok(address) if address.port() == 0 => "has port 0".to_owned(),
            Ok(address) if address.ip().is_multicast() => "is a multicast address".to_owned(),
            Ok(address) => return Ok(address),
            Err(_) => {
                "is not an address and port such as \"10.0.0.2:53\" or \"[fd00::2]:53\"".to_owned()
            }
        };
        Err(self.error(value.span(), format!("listen `{text}` {problem}")))
    }

    /// A fully qualified name: ends with `.`, valid labels; returned in lower case (DNS names
    /// compare without case).
    fn zone(&self, value: &Spanned<String>) -> Result<String, ConfigError> {
        let text = value.get_ref();
        let Some(relative) = text.strip_suffix('.') else {
            return Err(self.error(
                value.span(),
                format!("zone `{text}` does not end in `.`: write the full name, `{text}.`"),
            ));
        };
        if relative.is_empty() {
            return Err(self.error(
                value.span(),
                "zone `.` is the root; give lb a zone of its own (\"svc.example.\")",
            ));
        }
        if let Some(problem) = name_problem(relative) {
            return Err(self.error(value.span(), format!("zone `{text}` {problem}")));
        }
        Ok(text.to_ascii_lowercase())
    }

    fn dns_name(
        &self,
        raw: &RawDnsName,
        zone: &str,
        vip_addresses: &HashSet<IpAddr>,
    ) -> Result<DnsNameConfig, ConfigError> {
        let RawDnsName {
            name,
            addresses,
            on_all_down,
            health,
        } = raw;
        let text = name.get_ref();
        if text.ends_with('.') {
            return Err(self.error(
                name.span(),
                format!(
                    "dns name `{text}` ends in `.`: names are relative to the zone (`www` is www.{zone})"
                ),
            ));
        }
        if text == "@" {
            return Err(self.error(
                name.span(),
                "dns name `@` (the apex) holds lb's SOA and NS only; give the name a label",
            ));
        }
        if let Some(problem) = name_problem(text) {
            return Err(self.error(name.span(), format!("dns name `{text}` {problem}")));
        }
        if text.len() + 1 + zone.len() > MAX_NAME_CHARS + 1 {
            return Err(self.error(
                name.span(),
                format!(
                    "dns name `{text}` is longer than {MAX_NAME_CHARS} characters with the zone"
                ),
            ));
        }
        let lower = text.to_ascii_lowercase();
        if addresses.get_ref().is_empty() {
            return Err(self.error(
                addresses.span(),
                format!("dns name `{text}` has no addresses"),
            ));
        }
        let mut seen = HashSet::new();
        let mut parsed = Vec::with_capacity(addresses.get_ref().len());
        for value in addresses.get_ref() {
            let address = self.address("dns", value)?;
            if !seen.insert(address) {
                return Err(self.error(
                    value.span(),
                    format!("address {address} is listed twice in dns name `{text}`"),
                ));
            }
            parsed.push(address);
        }
        let health = match health {
            None => None,
            Some(table) => {
                if parsed.iter().all(|a| vip_addresses.contains(a)) {
                    return Err(self.error(
                        name.span(),
                        format!(
                            "dns name `{text}` has a health table, but every address of it is a \
                             VIP of this node (a VIP address is up while its VIP can serve); \
                             health applies to other addresses only"
                        ),
                    ));
                }
                // Port 0 stands for "not given": there is no VIP port to default to.
                let settings = self.health(
                    &Layers {
                        vip: Some(table),
                        backend: None,
                    },
                    (0, Protocol::Tcp),
                    &Owner::DnsName(text),
                )?;
                let needs_port = matches!(
                    settings.check,
                    CheckKind::Tcp | CheckKind::Http | CheckKind::Udp
                );
                if needs_port && settings.port == 0 {
                    return Err(self.error(
                        name.span(),
                        format!(
                            "dns name `{text}`: a {} check needs `port` in its health table",
                            settings.check
                        ),
                    ));
                }
                Some(settings)
            }
        };
        Ok(DnsNameConfig {
            name: lower,
            addresses: parsed,
            on_all_down: on_all_down
                .as_ref()
                .map_or(DnsAllDown::All, |v| *v.get_ref()),
            health,
        })
    }
}

/// Why `name` (labels separated by `.`, no final dot) is not a host name, if it is not: labels
/// of 1..=63 letters, digits, `-` and `_`, not starting or ending with `-`.
fn name_problem(name: &str) -> Option<String> {
    if name.len() > MAX_NAME_CHARS {
        return Some(format!("is longer than {MAX_NAME_CHARS} characters"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Some("has an empty label (two dots in a row, or a leading dot)".to_owned());
        }
        if label.len() > MAX_LABEL_CHARS {
            return Some(format!(
                "has a label longer than {MAX_LABEL_CHARS} characters"
            ));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Some(format!(
                "has label `{label}`: a label is letters, digits, `-` and `_`"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Some(format!(
                "has label `{label}`, which starts or ends with `-`"
            ));
        }
    }
    None
}
