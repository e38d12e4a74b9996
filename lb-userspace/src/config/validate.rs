//! The rules TOML cannot express: ranges, address families, uniqueness, capacities. Turns the
//! [`RawConfig`] into a [`Config`], or reports the first broken rule with the position of the
//! value that breaks it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::{Range, RangeInclusive};
use std::path::Path;

use lb_common::{DEFAULT_FLOW_TABLE_SIZE, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS, NO_BACKEND};
use toml::Spanned;

use super::raw::{RawBackend, RawConfig, RawVip};
use super::{
    BackendConfig, Config, ConfigError, DEFAULT_WEIGHT, MAX_RING_SIZE, MIN_FLOW_TABLE_SIZE,
    MIN_RING_SIZE, Protocol, VipConfig, XdpModeSetting,
};
use crate::maglev::is_prime;

/// Linux's IFNAMSIZ (16) minus the terminating NUL.
const MAX_INTERFACE_NAME_BYTES: usize = 15;

pub(super) fn validate(raw: RawConfig, text: &str, path: &Path) -> Result<Config, ConfigError> {
    Validator { text, path }.config(raw)
}

/// Carries what every error needs: the text (to turn spans into line:column) and the file name.
struct Validator<'a> {
    text: &'a str,
    path: &'a Path,
}

/// A numeric setting with its value and, when written in the file, where: messages about a
/// capacity say whether it was the default or which line set it.
struct Setting {
    key: &'static str,
    value: u32,
    span: Option<Range<usize>>,
}

impl Validator<'_> {
    fn error(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        ConfigError::at(self.path, self.text, span, message.into())
    }

    /// 1-based line of the start of `span`.
    fn line_of(&self, span: Range<usize>) -> usize {
        let start = span.start.min(self.text.len());
        self.text[..start].matches('\n').count() + 1
    }

    fn describe(&self, setting: &Setting) -> String {
        match &setting.span {
            Some(span) => format!(
                "{} is {} (line {})",
                setting.key,
                setting.value,
                self.line_of(span.clone())
            ),
            None => format!("{} is {} (the default)", setting.key, setting.value),
        }
    }

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let interface = self.interface(&raw.interface)?;
        let xdp_mode = raw
            .xdp_mode
            .as_ref()
            .map_or(XdpModeSetting::Auto, |mode| *mode.get_ref());
        let ring_size = self.ring_size(raw.ring_size.as_ref())?;
        let max_vips = self.setting(
            "max_vips",
            raw.max_vips.as_ref(),
            DEFAULT_MAX_VIPS,
            1..=u32::MAX,
        )?;
        // Backend ids index an array map, and NO_BACKEND marks an empty ring slot.
        let max_backends = self.setting(
            "max_backends",
            raw.max_backends.as_ref(),
            DEFAULT_MAX_BACKENDS,
            1..=NO_BACKEND - 1,
        )?;
        let flow_table_size = self.setting(
            "flow_table_size",
            raw.flow_table_size.as_ref(),
            DEFAULT_FLOW_TABLE_SIZE,
            MIN_FLOW_TABLE_SIZE..=u32::MAX,
        )?;
        self.ring_map_fits(&max_vips, &ring_size)?;
        let vips = self.vips(&raw.vip, &max_vips, &max_backends)?;
        Ok(Config {
            interface,
            xdp_mode,
            ring_size: ring_size.value,
            max_vips: max_vips.value,
            max_backends: max_backends.value,
            flow_table_size: flow_table_size.value,
            vips,
        })
    }

    /// The kernel's rules for a device name (`dev_valid_name`), so a typo fails here rather
    /// than at attach time with a less helpful errno.
    fn interface(&self, name: &Spanned<String>) -> Result<String, ConfigError> {
        let text = name.get_ref();
        let problem = if text.is_empty() {
            Some("must not be empty".to_string())
        } else if text.len() > MAX_INTERFACE_NAME_BYTES {
            Some(format!("is longer than {MAX_INTERFACE_NAME_BYTES} bytes"))
        } else if text == "." || text == ".." {
            Some("cannot be `.` or `..`".to_string())
        } else if text
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
        {
            Some("cannot contain `/`, `:` or whitespace".to_string())
        } else {
            None
        };
        match problem {
            Some(problem) => {
                Err(self.error(name.span(), format!("interface name `{text}` {problem}")))
            }
            None => Ok(text.clone()),
        }
    }

    fn ring_size(&self, value: Option<&Spanned<i64>>) -> Result<Setting, ConfigError> {
        let setting = self.setting(
            "ring_size",
            value,
            lb_common::DEFAULT_RING_SIZE,
            MIN_RING_SIZE..=MAX_RING_SIZE,
        )?;
        if !is_prime(setting.value) {
            // The default is prime, so a non-prime value was written in the file.
            let span = setting.span.clone().unwrap_or(0..0);
            let below = (MIN_RING_SIZE..setting.value).rev().find(|&n| is_prime(n));
            let above = (setting.value..=MAX_RING_SIZE).find(|&n| is_prime(n));
            let nearest = match (below, above) {
                (Some(below), Some(above)) => {
                    format!("; the nearest primes are {below} and {above}")
                }
                _ => String::new(),
            };
            return Err(self.error(
                span,
                format!(
                    "ring_size {} is not prime (Maglev needs a prime table size{nearest})",
                    setting.value
                ),
            ));
        }
        Ok(setting)
    }

    /// A `u32` setting with a default and an accepted range.
    fn setting(
        &self,
        key: &'static str,
        value: Option<&Spanned<i64>>,
        default: u32,
        range: RangeInclusive<u32>,
    ) -> Result<Setting, ConfigError> {
        match value {
            None => Ok(Setting {
                key,
                value: default,
                span: None,
            }),
            Some(value) => Ok(Setting {
                key,
                value: self.integer_in(key, value, range)?,
                span: Some(value.span()),
            }),
        }
    }

    /// `value` converted to `u32` if it lies in `range`, else an error at the value.
    fn integer_in(
        &self,
        key: &str,
        value: &Spanned<i64>,
        range: RangeInclusive<u32>,
    ) -> Result<u32, ConfigError> {
        let number = *value.get_ref();
        match u32::try_from(number) {
            Ok(number) if range.contains(&number) => Ok(number),
            _ => Err(self.error(
                value.span(),
                format!(
                    "{key} {number} is out of range {}..={}",
                    range.start(),
                    range.end()
                ),
            )),
        }
    }

    /// `RINGS` holds two tables of `ring_size` slots per VIP in one BPF array, whose size is a
    /// `u32`; refuse a combination the loader could not create.
    fn ring_map_fits(&self, max_vips: &Setting, ring_size: &Setting) -> Result<(), ConfigError> {
        let slots = 2 * u64::from(max_vips.value) * u64::from(ring_size.value);
        if slots <= u64::from(u32::MAX) {
            return Ok(());
        }
        // Both defaults fit, so at least one of the two was written in the file.
        let span = max_vips
            .span
            .clone()
            .or_else(|| ring_size.span.clone())
            .unwrap_or(0..0);
        Err(self.error(
            span,
            format!(
                "max_vips {} × 2 × ring_size {} = {slots} ring slots, more than a BPF array holds ({})",
                max_vips.value,
                ring_size.value,
                u32::MAX
            ),
        ))
    }

    fn vips(
        &self,
        raw_vips: &[Spanned<RawVip>],
        max_vips: &Setting,
        max_backends: &Setting,
    ) -> Result<Vec<VipConfig>, ConfigError> {
        // Where each name and each (address, port, protocol) was first seen, for duplicates.
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut services: HashMap<(IpAddr, u16, Protocol), (&str, usize)> = HashMap::new();
        let mut backends_so_far: u64 = 0;
        let mut vips = Vec::with_capacity(raw_vips.len());

        for (position, raw_vip) in raw_vips.iter().enumerate() {
            let vip_line = self.line_of(raw_vip.span());
            let raw_vip = raw_vip.get_ref();
            let name = raw_vip.name.get_ref().as_str();

            if position >= max_vips.value as usize {
                return Err(self.error(
                    raw_vip.name.span(),
                    format!(
                        "too many VIPs: {} and vip `{name}` is number {}",
                        self.describe(max_vips),
                        position + 1
                    ),
                ));
            }

            self.vip_name(&raw_vip.name)?;
            if let Some(first_line) = names.insert(name, vip_line) {
                return Err(self.error(
                    raw_vip.name.span(),
                    format!("duplicate vip name `{name}`: the vip on line {first_line} has it"),
                ));
            }

            let address = self.address("vip", &raw_vip.address)?;
            let port = self.port(&raw_vip.port)?;
            let protocol = *raw_vip.protocol.get_ref();
            if let Some((first_name, first_line)) =
                services.insert((address, port, protocol), (name, vip_line))
            {
                return Err(self.error(
                    raw_vip.address.span(),
                    format!(
                        "vip `{name}` has the same address, port and protocol ({}/{protocol}) as vip `{first_name}` on line {first_line}",
                        SocketAddr::new(address, port)
                    ),
                ));
            }

            let mut backends = Vec::with_capacity(raw_vip.backend.len());
            let mut seen_backends: HashMap<IpAddr, usize> = HashMap::new();
            for raw_backend in &raw_vip.backend {
                let raw_backend = raw_backend.get_ref();
                backends_so_far += 1;
                if backends_so_far > u64::from(max_backends.value) {
                    return Err(self.error(
                        raw_backend.address.span(),
                        format!(
                            "too many backends: {} and backend {} of vip `{name}` is number {backends_so_far} over all VIPs",
                            self.describe(max_backends),
                            raw_backend.address.get_ref()
                        ),
                    ));
                }
                let backend = self.backend(raw_backend, name, address)?;
                let line = self.line_of(raw_backend.address.span());
                if let Some(first_line) = seen_backends.insert(backend.address, line) {
                    return Err(self.error(
                        raw_backend.address.span(),
                        format!(
                            "backend {} is listed twice in vip `{name}` (first on line {first_line})",
                            backend.address
                        ),
                    ));
                }
                backends.push(backend);
            }

            vips.push(VipConfig {
                name: name.to_string(),
                address,
                port,
                protocol,
                backends,
            });
        }
        Ok(vips)
    }

    /// VIP names appear in metric labels and on the command line: keep them to a safe alphabet.
    fn vip_name(&self, name: &Spanned<String>) -> Result<(), ConfigError> {
        let text = name.get_ref();
        if text.is_empty() {
            return Err(self.error(name.span(), "vip name must not be empty"));
        }
        if let Some(bad) = text
            .chars()
            .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
        {
            return Err(self.error(
                name.span(),
                format!(
                    "vip name `{text}` contains {bad:?}; only letters, digits, `_`, `.` and `-` are allowed"
                ),
            ));
        }
        Ok(())
    }

    fn port(&self, port: &Spanned<i64>) -> Result<u16, ConfigError> {
        let number = *port.get_ref();
        match u16::try_from(number) {
            Ok(number) if number != 0 => Ok(number),
            _ => Err(self.error(
                port.span(),
                format!("port {number} is out of range 1..=65535"),
            )),
        }
    }

    fn backend(
        &self,
        raw: &RawBackend,
        vip_name: &str,
        vip_address: IpAddr,
    ) -> Result<BackendConfig, ConfigError> {
        let address = self.address("backend", &raw.address)?;
        if address.is_ipv4() != vip_address.is_ipv4() {
            return Err(self.error(
                raw.address.span(),
                format!(
                    "backend {address} is {} but vip `{vip_name}` is {}",
                    family(address),
                    family(vip_address)
                ),
            ));
        }
        let weight = match &raw.weight {
            None => DEFAULT_WEIGHT,
            Some(weight) => self.integer_in("weight", weight, 0..=u32::MAX)?,
        };
        Ok(BackendConfig { address, weight })
    }

    /// Parses an address that must name one unicast host; `role` ("vip" or "backend") is for
    /// the message.
    fn address(&self, role: &str, text: &Spanned<String>) -> Result<IpAddr, ConfigError> {
        let address: IpAddr = text.get_ref().parse().map_err(|_| {
            self.error(
                text.span(),
                format!(
                    "{role} address `{}` is not an IPv4 or IPv6 address",
                    text.get_ref()
                ),
            )
        })?;
        if let Some(kind) = not_unicast(address) {
            return Err(self.error(
                text.span(),
                format!("{role} address {address} is {kind}; a {role} needs a unicast address"),
            ));
        }
        Ok(address)
    }
}

/// Why `address` cannot be a VIP or a backend, if it cannot.
fn not_unicast(address: IpAddr) -> Option<&'static str> {
    if address.is_unspecified() {
        Some("the unspecified address")
    } else if address.is_multicast() {
        Some("a multicast address")
    } else if matches!(address, IpAddr::V4(v4) if v4.is_broadcast()) {
        Some("the broadcast address")
    } else {
        None
    }
}

fn family(address: IpAddr) -> &'static str {
    match address {
        IpAddr::V4(_) => "IPv4",
        IpAddr::V6(_) => "IPv6",
    }
}
