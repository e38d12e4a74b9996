//! The rules TOML cannot express: ranges, address families, uniqueness, capacities, health-check
//! settings. Turns the [`RawConfig`] into a [`Config`], or reports the first broken rule with the
//! position of the value that breaks it.
//!
//! Health settings come in layers: a backend's `health` table over its VIP's `[vip.health]` over
//! the defaults. Each key is taken from the most specific layer that has it, and the rules are
//! checked on the merged result. When a rule involves several keys, the error points at the one
//! written in the backend's table if any (the override is what broke a VIP-level table that was
//! valid on its own), else at the key the rule is about.

mod announce;
mod dns;
mod forward;
mod sync;

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::time::Duration;

use lb_common::{DEFAULT_FLOW_TABLE_SIZE, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS, NO_BACKEND};
use toml::Spanned;

use super::raw::{RawBackend, RawConfig, RawDuration, RawHealth, RawVip};
use super::{
    BackendConfig, CheckKind, Config, ConfigError, DEFAULT_API, DEFAULT_MIN_HEALTHY,
    DEFAULT_TCP_IDLE_TIMEOUT, DEFAULT_UDP_IDLE_TIMEOUT, DEFAULT_WEIGHT, HealthConfig,
    MAX_API_PATH_BYTES, MAX_IDLE_TIMEOUT, MAX_RING_SIZE, MIN_FLOW_TABLE_SIZE, MIN_IDLE_TIMEOUT,
    MIN_INTERVAL, MIN_RING_SIZE, OnAllDown, Protocol, VipConfig, XdpModeSetting,
};
use crate::maglev::is_prime;

/// Linux's IFNAMSIZ (16) minus the terminating NUL.
const MAX_INTERFACE_NAME_BYTES: usize = 15;

/// What a duration looks like, for messages.
pub(super) const DURATION_FORMAT: &str =
    "a number and a unit, such as \"100ms\", \"1s\", \"1.5s\" or \"2m\"";

/// Longest accepted duration string, and most digits in one of its numbers (see `duration`).
const MAX_DURATION_CHARS: usize = 64;
const MAX_DURATION_DIGITS: usize = 9;

/// The health-check keys that apply to one check kind only, in the order they are checked.
const KIND_SPECIFIC_KEYS: [(&str, CheckKind); 6] = [
    ("path", CheckKind::Http),
    ("expect_status", CheckKind::Http),
    ("host", CheckKind::Http),
    ("send", CheckKind::Udp),
    ("expect", CheckKind::Udp),
    ("command", CheckKind::Exec),
];

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
        // Backend ids index an array map and stay below NO_BACKEND - 1: NO_BACKEND marks an
        // empty ring slot, PRIOR_GONE (NO_BACKEND - 1) a changed slot whose prior was removed.
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
        let tcp_idle_timeout = self.idle_timeout(
            "tcp_idle_timeout",
            raw.tcp_idle_timeout.as_ref(),
            DEFAULT_TCP_IDLE_TIMEOUT,
        )?;
        let udp_idle_timeout = self.idle_timeout(
            "udp_idle_timeout",
            raw.udp_idle_timeout.as_ref(),
            DEFAULT_UDP_IDLE_TIMEOUT,
        )?;
        let api = self.api(raw.api.as_ref())?;
        let metrics = raw
            .metrics
            .as_ref()
            .map(|value| self.metrics(value))
            .transpose()?;
        let announce = self.announce(raw.announce.as_ref())?;
        let sync = raw.sync.as_ref().map(|raw| self.sync(raw)).transpose()?;
        let vips = self.vips(&raw.vip, &max_vips, &max_backends)?;
        let dns = raw
            .dns
            .as_ref()
            .map(|raw| self.dns(raw, &vips))
            .transpose()?;
        Ok(Config {
            interface,
            xdp_mode,
            ring_size: ring_size.value,
            max_vips: max_vips.value,
            max_backends: max_backends.value,
            flow_table_size: flow_table_size.value,
            tcp_idle_timeout,
            udp_idle_timeout,
            api,
            metrics,
            announce,
            sync,
            dns,
            vips,
        })
    }

    /// `tcp_idle_timeout` or `udp_idle_timeout`: a duration in
    /// [`MIN_IDLE_TIMEOUT`]..=[`MAX_IDLE_TIMEOUT`].
    fn idle_timeout(
        &self,
        key: &str,
        raw: Option<&Spanned<RawDuration>>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let Some(raw) = raw else {
            return Ok(default);
        };
        let value = self.duration(key, raw)?;
        if !(MIN_IDLE_TIMEOUT..=MAX_IDLE_TIMEOUT).contains(&value) {
            return Err(self.error(
                raw.span(),
                format!(
                    "{key} {} is out of range {}..={} (flows refresh their last-seen time once a \
                     second, so shorter timeouts would forget flows that are sending)",
                    humantime::format_duration(value),
                    humantime::format_duration(MIN_IDLE_TIMEOUT),
                    humantime::format_duration(MAX_IDLE_TIMEOUT)
                ),
            ));
        }
        Ok(value)
    }

    /// The control API's socket path: absolute (the daemon may run from any directory), and
    /// short enough for a Unix socket address.
    fn api(&self, value: Option<&Spanned<String>>) -> Result<PathBuf, ConfigError> {
        let Some(value) = value else {
            return Ok(PathBuf::from(DEFAULT_API));
        };
        let text = value.get_ref();
        let problem = if !text.starts_with('/') {
            Some("is not an absolute path".to_string())
        } else if text.len() > MAX_API_PATH_BYTES {
            Some(format!(
                "is longer than {MAX_API_PATH_BYTES} bytes, the most a Unix socket path can have"
            ))
        } else if text.contains('\0') {
            Some("contains a NUL character".to_string())
        } else if text.ends_with('/') {
            Some("names a directory, not a socket file".to_string())
        } else {
            None
        };
        match problem {
            Some(problem) => Err(self.error(value.span(), format!("api `{text}` {problem}"))),
            None => Ok(PathBuf::from(text)),
        }
    }

    /// The metrics listener: an IP address and a port (no host names: nothing is resolved).
    fn metrics(&self, value: &Spanned<String>) -> Result<SocketAddr, ConfigError> {
        let text = value.get_ref();
        match text.parse::<SocketAddr>() {
            Ok(address) if address.port() == 0 => Err(self.error(
                value.span(),
                format!("metrics `{text}` has port 0; give the port Prometheus scrapes (1..=65535)"),
            )),
            Ok(address) => Ok(address),
            Err(_) => Err(self.error(
                value.span(),
                format!(
                    "metrics `{text}` is not an address and port such as \"127.0.0.1:9100\" or \"[::1]:9100\""
                ),
            )),
        }
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

            let min_healthy = match &raw_vip.min_healthy {
                None => DEFAULT_MIN_HEALTHY,
                Some(value) => self.integer_in("min_healthy", value, 1..=u32::MAX)?,
            };
            let on_all_down = raw_vip
                .on_all_down
                .as_ref()
                .map_or(OnAllDown::Drop, |value| *value.get_ref());
            let vip_health = raw_vip.health.as_ref();
            let health = self.health(
                &Layers {
                    vip: vip_health,
                    backend: None,
                },
                (port, protocol),
                &Owner::Vip(name),
            )?;

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
                let backend =
                    self.backend(raw_backend, raw_vip, address, (port, protocol), vip_health)?;
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
            self.enough_primaries(raw_vip, min_healthy, &backends)?;
            let forward::ForwardSettings {
                forward,
                encap_source,
                check_through_tunnel,
            } = self.forward(raw_vip)?;

            vips.push(VipConfig {
                name: name.to_string(),
                address,
                port,
                protocol,
                min_healthy,
                on_all_down,
                forward,
                encap_source,
                check_through_tunnel,
                health,
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

    /// `min_healthy` primaries must exist for the primary pool ever to serve; a VIP without
    /// backends is allowed (its traffic is dropped and counted).
    fn enough_primaries(
        &self,
        raw_vip: &RawVip,
        min_healthy: u32,
        backends: &[BackendConfig],
    ) -> Result<(), ConfigError> {
        let primaries = backends.iter().filter(|backend| !backend.standby).count();
        if backends.is_empty() || primaries >= min_healthy as usize {
            return Ok(());
        }
        let name = raw_vip.name.get_ref();
        match &raw_vip.min_healthy {
            Some(value) => Err(self.error(
                value.span(),
                format!(
                    "min_healthy = {min_healthy} but vip `{name}` has only {primaries} primary backends (standby ones do not count)"
                ),
            )),
            // The default, 1, is only broken when every backend is a standby: point at the first.
            None => {
                let span = raw_vip
                    .backend
                    .iter()
                    .find_map(|backend| backend.get_ref().standby.as_ref())
                    .map_or_else(|| raw_vip.name.span(), Spanned::span);
                Err(self.error(
                    span,
                    format!(
                        "min_healthy = {min_healthy} (the default) but vip `{name}` has only {primaries} primary backends: every backend is a standby"
                    ),
                ))
            }
        }
    }

    fn backend(
        &self,
        raw: &RawBackend,
        raw_vip: &RawVip,
        vip_address: IpAddr,
        vip_service: (u16, Protocol),
        vip_health: Option<&RawHealth>,
    ) -> Result<BackendConfig, ConfigError> {
        let vip_name = raw_vip.name.get_ref().as_str();
        let address = self.address("backend", &raw.address)?;
        if let Some(kind) = forward::encapsulation(raw_vip)
            && address.is_ipv4() != vip_address.is_ipv4()
        {
            // IPv4 in IPv6 is one of the wire formats; IPv6 in IPv4 is not (`lb decap` and the
            // usual ip6tnl/fou set-ups take IPv4 in IPv4, IPv6 in IPv6 and IPv4 in IPv6).
            if vip_address.is_ipv6() {
                return Err(self.error(
                    raw.address.span(),
                    format!(
                        "backend {address} of vip `{vip_name}` is IPv4, but an IPv6 VIP is \
                         encapsulated in IPv6 only (forward = \"{kind}\"): give its backends IPv6 \
                         addresses"
                    ),
                ));
            }
        } else if address.is_ipv4() != vip_address.is_ipv4() {
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
        let standby = raw
            .standby
            .as_ref()
            .is_some_and(|standby| *standby.get_ref());
        let health = self.health(
            &Layers {
                vip: vip_health,
                backend: raw.health.as_ref(),
            },
            vip_service,
            &Owner::Backend {
                vip: vip_name,
                address,
            },
        )?;
        Ok(BackendConfig {
            address,
            weight,
            standby,
            health,
        })
    }

    /// The effective health settings for `layers`, with every rule checked on the merged result.
    fn health(
        &self,
        layers: &Layers<'_>,
        (vip_port, vip_protocol): (u16, Protocol),
        owner: &Owner<'_>,
    ) -> Result<HealthConfig, ConfigError> {
        let mut health = HealthConfig::defaults(vip_port, vip_protocol);

        let check = layers.get(|table| table.check.as_ref());
        if let Some(check) = &check {
            health.check = *check.value.get_ref();
        }

        let interval = layers.get(|table| table.interval.as_ref());
        if let Some(interval) = &interval {
            health.interval = self.duration("interval", interval.value)?;
            if health.interval < MIN_INTERVAL {
                return Err(self.error(
                    interval.value.span(),
                    format!(
                        "interval {} is shorter than the minimum, {}",
                        humantime::format_duration(health.interval),
                        humantime::format_duration(MIN_INTERVAL)
                    ),
                ));
            }
        }
        let timeout = layers.get(|table| table.timeout.as_ref());
        if let Some(timeout) = &timeout {
            health.timeout = self.duration("timeout", timeout.value)?;
            if health.timeout.is_zero() {
                return Err(self.error(
                    timeout.value.span(),
                    "timeout must be greater than 0 (and at most the interval)",
                ));
            }
        }
        if let Some(rise) = layers.get(|table| table.rise.as_ref()) {
            health.rise = self.integer_in("rise", rise.value, 1..=u32::MAX)?;
        }
        if let Some(fall) = layers.get(|table| table.fall.as_ref()) {
            health.fall = self.integer_in("fall", fall.value, 1..=u32::MAX)?;
        }
        if let Some(port) = layers.get(|table| table.port.as_ref()) {
            health.port = self.port(port.value)?;
        }

        self.kind_specific_keys(layers, &check, health.check, owner)?;

        if let Some(path) = layers.get(|table| table.path.as_ref()) {
            let text = path.value.get_ref();
            if !text.starts_with('/') {
                return Err(self.error(
                    path.value.span(),
                    format!("path `{text}` must start with `/`"),
                ));
            }
            if has_space_or_control(text) {
                return Err(self.error(
                    path.value.span(),
                    format!("path {text:?} must not contain whitespace or control characters"),
                ));
            }
            health.path = text.clone();
        }
        if let Some(statuses) = layers.get(|table| table.expect_status.as_ref()) {
            if statuses.value.get_ref().is_empty() {
                return Err(self.error(
                    statuses.value.span(),
                    "expect_status must not be empty: list the HTTP statuses that mean healthy",
                ));
            }
            health.expect_status = statuses
                .value
                .get_ref()
                .iter()
                .map(|status| {
                    // 100..=599 fits a u16.
                    self.integer_in("expect_status", status, 100..=599)
                        .map(|status| status as u16)
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(host) = layers.get(|table| table.host.as_ref()) {
            let text = host.value.get_ref();
            if text.is_empty() || has_space_or_control(text) {
                return Err(self.error(
                    host.value.span(),
                    format!(
                        "host {text:?} must be a non-empty Host header value without whitespace or control characters (leave `host` out to send none)"
                    ),
                ));
            }
            health.host = Some(text.clone());
        }
        if let Some(send) = layers.get(|table| table.send.as_ref()) {
            if send.value.get_ref().is_empty() {
                return Err(self.error(
                    send.value.span(),
                    "send must not be empty: it is the payload of the UDP check",
                ));
            }
            health.send = send.value.get_ref().as_bytes().to_vec();
        }
        if let Some(expect) = layers.get(|table| table.expect.as_ref()) {
            if expect.value.get_ref().is_empty() {
                return Err(self.error(
                    expect.value.span(),
                    "expect must not be empty (leave it out to accept any reply)",
                ));
            }
            health.expect = Some(expect.value.get_ref().as_bytes().to_vec());
        }
        if let Some(command) = layers.get(|table| table.command.as_ref()) {
            let words = command.value.get_ref();
            match words.first() {
                None => {
                    return Err(self.error(
                        command.value.span(),
                        "command must not be empty: it needs at least the program to run",
                    ));
                }
                Some(program) if program.get_ref().is_empty() => {
                    return Err(self.error(
                        program.span(),
                        "the program (the first word of command) must not be empty",
                    ));
                }
                Some(_) => {}
            }
            health.command = words.iter().map(|word| word.get_ref().clone()).collect();
        }

        // Keys of other kinds (inherited from the VIP, see `kind_specific_keys`) do not apply.
        let defaults = HealthConfig::defaults(vip_port, vip_protocol);
        if health.check != CheckKind::Http {
            health.path = defaults.path;
            health.expect_status = defaults.expect_status;
            health.host = defaults.host;
        }
        if health.check != CheckKind::Udp {
            health.send = defaults.send;
            health.expect = defaults.expect;
        }
        if health.check != CheckKind::Exec {
            health.command = defaults.command;
        }

        // A check kind that needs a key: `check` was written (the default, tcp, needs nothing).
        let required = match health.check {
            CheckKind::Udp if health.send.is_empty() => {
                Some("`send`, the payload to send (a non-empty string)")
            }
            CheckKind::Exec if health.command.is_empty() => {
                Some("`command`, the program and its arguments (a non-empty array of strings)")
            }
            _ => None,
        };
        if let (Some(required), Some(check)) = (required, &check) {
            return Err(self.error(
                check.value.span(),
                format!(
                    "check = \"{}\" needs {required}, and {owner} has none",
                    health.check
                ),
            ));
        }

        // A timeout nobody wrote next to the interval follows a shorter interval: the default
        // 500ms, or the VIP's timeout under a backend's own shorter interval.
        let timeout_layer = timeout.as_ref().map(|t| t.layer);
        let interval_layer = interval.as_ref().map(|i| i.layer);
        let timeout_is_inherited = matches!(
            (timeout_layer, interval_layer),
            (None, _) | (Some(Layer::Vip), Some(Layer::Backend))
        );
        if health.timeout > health.interval && timeout_is_inherited {
            health.timeout = health.interval;
        }
        if health.timeout > health.interval {
            let span = blame(&[
                timeout.as_ref().map(Written::at),
                interval.as_ref().map(Written::at),
            ]);
            return Err(self.error(
                span,
                format!(
                    "timeout {} ({}) is longer than interval {} ({}) for {owner}: the timeout must be > 0 and <= interval",
                    humantime::format_duration(health.timeout),
                    self.origin(timeout.as_ref()),
                    humantime::format_duration(health.interval),
                    self.origin(interval.as_ref()),
                ),
            ));
        }
        Ok(health)
    }

    /// A key of one check kind in the merged settings of another kind is an error.
    fn kind_specific_keys(
        &self,
        layers: &Layers<'_>,
        check: &Option<Written<'_, CheckKind>>,
        kind: CheckKind,
        owner: &Owner<'_>,
    ) -> Result<(), ConfigError> {
        for (key, applies_to) in KIND_SPECIFIC_KEYS {
            if applies_to == kind {
                continue;
            }
            let Some(written) = layers.key_at(key) else {
                continue;
            };
            // A backend that switches to another check kind simply does not use the VIP's keys
            // for the old kind (they were checked against the VIP's own kind already).
            if written.1 == Layer::Vip && matches!(owner, Owner::Backend { .. }) {
                continue;
            }
            let span = blame(&[Some(written.clone()), check.as_ref().map(Written::at)]);
            // The key is what is wrong, so point at it rather than at its value; when the
            // backend's `check` made an inherited key wrong, point at that `check`'s value.
            let (span, key_elsewhere) = if span == written.0 {
                (self.key_span(key, span), String::new())
            } else {
                let line = self.line_of(written.0);
                (span, format!("; `{key}` is set on line {line}"))
            };
            return Err(self.error(
                span,
                format!(
                    "`{key}` only applies to check = \"{applies_to}\", but {owner} has check = \"{kind}\" ({}){key_elsewhere}",
                    self.origin(check.as_ref())
                ),
            ));
        }
        Ok(())
    }

    /// Where `key` is written, given where its value is: the key just before the `=` that
    /// precedes the value (bare, quoted, or the last part of a dotted key). Falls back to the
    /// value when the text there looks otherwise.
    fn key_span(&self, key: &str, value: Range<usize>) -> Range<usize> {
        let before = self.text[..value.start].trim_end_matches([' ', '\t']);
        let Some(before) = before.strip_suffix('=') else {
            return value;
        };
        let before = before.trim_end_matches([' ', '\t']);
        for written in [key.to_string(), format!("\"{key}\""), format!("'{key}'")] {
            if let Some(rest) = before.strip_suffix(written.as_str()) {
                let whole = !rest
                    .chars()
                    .next_back()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                if whole {
                    return rest.len()..before.len();
                }
            }
        }
        value
    }

    /// "line N" for a value written in the file, "the default" for one that was not.
    fn origin<T>(&self, written: Option<&Written<'_, T>>) -> String {
        match written {
            Some(written) => format!("line {}", self.line_of(written.value.span())),
            None => "the default".to_string(),
        }
    }

    /// Parses a humantime duration (`"100ms"`, `"1.5s"`, `"2m"`); an error points at the value.
    fn duration(&self, key: &str, raw: &Spanned<RawDuration>) -> Result<Duration, ConfigError> {
        let text = raw.get_ref().0.as_str();
        let error = |why: &str| {
            self.error(
                raw.span(),
                format!("{key} {text:?} is not a duration ({why}): write {DURATION_FORMAT}"),
            )
        };
        // humantime 2.4 panics (Duration::new overflow) on a sum that lands exactly on u64::MAX
        // seconds; numbers of at most 9 digits in a short string stay far below that.
        if text.len() > MAX_DURATION_CHARS
            || text
                .split(|c: char| !c.is_ascii_digit())
                .any(|digits| digits.len() > MAX_DURATION_DIGITS)
        {
            return Err(error("too many digits"));
        }
        humantime::parse_duration(text).map_err(|parse_error| {
            let why = match &parse_error {
                humantime::DurationError::Empty => "it is empty".to_string(),
                humantime::DurationError::UnknownUnit { unit, .. } if unit.is_empty() => {
                    "it has no unit".to_string()
                }
                humantime::DurationError::UnknownUnit { unit, .. } => {
                    format!("unknown unit `{unit}`")
                }
                humantime::DurationError::NumberExpected(_) => "a number is missing".to_string(),
                humantime::DurationError::NumberOverflow => {
                    "too large, or finer than a nanosecond".to_string()
                }
                _ => parse_error.to_string(),
            };
            error(&why)
        })
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

/// Which table a health value was written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layer {
    /// The VIP's `[vip.health]`.
    Vip,
    /// A backend's `health` table.
    Backend,
}

/// A health value as written, and in which table.
struct Written<'r, T> {
    value: &'r Spanned<T>,
    layer: Layer,
}

impl<T> Written<'_, T> {
    fn at(&self) -> (Range<usize>, Layer) {
        (self.value.span(), self.layer)
    }
}

/// The health tables that apply to a backend (or, with `backend: None`, to a VIP's defaults).
struct Layers<'r> {
    vip: Option<&'r RawHealth>,
    backend: Option<&'r RawHealth>,
}

impl<'r> Layers<'r> {
    /// A key from the most specific table that has it.
    fn get<T>(
        &self,
        key: impl Fn(&'r RawHealth) -> Option<&'r Spanned<T>>,
    ) -> Option<Written<'r, T>> {
        let from = |table: Option<&'r RawHealth>, layer| {
            table.and_then(&key).map(|value| Written { value, layer })
        };
        from(self.backend, Layer::Backend).or_else(|| from(self.vip, Layer::Vip))
    }

    /// Where a kind-specific key (one of [`KIND_SPECIFIC_KEYS`]) was written, if it was.
    fn key_at(&self, key: &str) -> Option<(Range<usize>, Layer)> {
        match key {
            "path" => self.get(|table| table.path.as_ref()).map(|w| w.at()),
            "expect_status" => self
                .get(|table| table.expect_status.as_ref())
                .map(|w| w.at()),
            "host" => self.get(|table| table.host.as_ref()).map(|w| w.at()),
            "send" => self.get(|table| table.send.as_ref()).map(|w| w.at()),
            "expect" => self.get(|table| table.expect.as_ref()).map(|w| w.at()),
            "command" => self.get(|table| table.command.as_ref()).map(|w| w.at()),
            _ => unreachable!("`{key}` is not a kind-specific health key"),
        }
    }
}

/// Whose health settings are being checked, for messages.
enum Owner<'a> {
    Vip(&'a str),
    DnsName(&'a str),
    Backend { vip: &'a str, address: IpAddr },
}

impl fmt::Display for Owner<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Vip(name) => write!(f, "vip `{name}`"),
            Owner::DnsName(name) => write!(f, "dns name `{name}`"),
            Owner::Backend { vip, address } => write!(f, "backend {address} of vip `{vip}`"),
        }
    }
}

/// Where an error about several keys points: the first of `keys` (most relevant first) written in
/// the backend's table, else the first written at all.
fn blame(keys: &[Option<(Range<usize>, Layer)>]) -> Range<usize> {
    let written = || keys.iter().flatten();
    written()
        .find(|(_, layer)| *layer == Layer::Backend)
        .or_else(|| written().next())
        .map_or(0..0, |(span, _)| span.clone())
}

/// HTTP paths and Host values go into the request as they are: no room for whitespace or
/// control characters (which could also smuggle headers).
fn has_space_or_control(text: &str) -> bool {
    text.chars().any(|c| c.is_whitespace() || c.is_control())
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
