//! Links inside namespaces: veth pairs across two namespaces, bridges, addresses, offloads, and
//! waiting until a link is usable (carrier, no tentative IPv6 address, bridge port forwarding).
//!
//! Everything is configured with `ip -n` / `ip netns exec`, and veth ends are created directly in
//! their namespaces, so nothing ever appears in the host's namespace even for a moment.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::{MAX_INTERFACE_NAME_LEN, NetNs};

/// An Ethernet address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// `02:00:00:00:<group>:<host>`: locally administered, unicast, deterministic.
    pub const fn local(group: u8, host: u8) -> Self {
        Self([0x02, 0, 0, 0, group, host])
    }

    /// The six bytes, in wire order.
    pub const fn octets(self) -> [u8; 6] {
        self.0
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, f] = self.0;
        write!(formatter, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
    }
}

impl FromStr for MacAddress {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> Result<Self> {
        let mut octets = [0u8; 6];
        let mut parts = text.split(':');
        for octet in &mut octets {
            let part = parts
                .next()
                .with_context(|| format!("MAC address {text:?} has fewer than 6 octets"))?;
            *octet = u8::from_str_radix(part, 16)
                .with_context(|| format!("MAC address {text:?}: bad octet {part:?}"))?;
        }
        if parts.next().is_some() {
            bail!("MAC address {text:?} has more than 6 octets");
        }
        Ok(Self(octets))
    }
}

/// One end of a veth pair to be created: its namespace, name and (optional) MAC address.
#[derive(Clone, Copy, Debug)]
pub struct VethEnd<'a> {
    pub namespace: &'a NetNs,
    pub name: &'a str,
    pub mac: Option<MacAddress>,
}

fn check_interface_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_INTERFACE_NAME_LEN {
        bail!("interface name {name:?} must have 1 to {MAX_INTERFACE_NAME_LEN} characters");
    }
    Ok(())
}

/// Creates a veth pair with `first` in its namespace and `second` in its own, both down.
pub fn create_veth_pair(first: VethEnd<'_>, second: VethEnd<'_>) -> Result<()> {
    check_interface_name(first.name)?;
    check_interface_name(second.name)?;
    let mut args: Vec<String> = vec!["link".into(), "add".into(), first.name.into()];
    if let Some(mac) = first.mac {
        args.extend(["address".into(), mac.to_string()]);
    }
    args.extend(["type", "veth", "peer", "name", second.name].map(String::from));
    if let Some(mac) = second.mac {
        args.extend(["address".into(), mac.to_string()]);
    }
    args.extend(["netns".into(), second.namespace.name().into()]);
    first.namespace.ip(&args).with_context(|| {
        format!(
            "cannot create veth {}/{} <-> {}/{}",
            first.namespace.name(),
            first.name,
            second.namespace.name(),
            second.name
        )
    })?;
    Ok(())
}

/// Brings `interface` up.
pub fn set_up(namespace: &NetNs, interface: &str) -> Result<()> {
    namespace.ip(["link", "set", interface, "up"])?;
    Ok(())
}

/// Adds `address/prefix_len` to `interface`; IPv6 addresses get `nodad` (usable at once).
pub fn add_address(
    namespace: &NetNs,
    interface: &str,
    address: IpAddr,
    prefix_len: u8,
) -> Result<()> {
    let cidr = format!("{address}/{prefix_len}");
    match address {
        IpAddr::V4(_) => namespace.ip(["-4", "addr", "add", &cidr, "dev", interface])?,
        IpAddr::V6(_) => namespace.ip(["-6", "addr", "add", &cidr, "dev", interface, "nodad"])?,
    };
    Ok(())
}

/// Adds a host route to `destination` via `gateway` (same family).
pub fn add_host_route(namespace: &NetNs, destination: IpAddr, gateway: IpAddr) -> Result<()> {
    let (family, prefix_len) = match destination {
        IpAddr::V4(_) => ("-4", 32),
        IpAddr::V6(_) => ("-6", 128),
    };
    let destination = format!("{destination}/{prefix_len}");
    let gateway = gateway.to_string();
    namespace.ip([family, "route", "add", &destination, "via", &gateway])?;
    Ok(())
}

/// `ethtool -K <interface> tx off`: a sender's veth must finish checksums itself, or frames that
/// an XDP program bounces with `XDP_TX` arrive with bad checksums (DESIGN §5, trap 2).
pub fn disable_tx_checksum_offload(namespace: &NetNs, interface: &str) -> Result<()> {
    namespace
        .exec("ethtool", ["-K", interface, "tx", "off"])
        .with_context(|| format!("cannot turn tx checksum offload off on {interface}"))?;
    Ok(())
}

/// Creates bridge `name`, with STP off, forward delay 0 (ports forward as soon as they are up)
/// and multicast snooping off (IPv6 neighbour discovery is flooded, never filtered), and brings it
/// up.
pub fn create_bridge(namespace: &NetNs, name: &str) -> Result<()> {
    check_interface_name(name)?;
    namespace
        .ip([
            "link",
            "add",
            name,
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
            "mcast_snooping",
            "0",
        ])
        .with_context(|| format!("cannot create bridge {name} in {}", namespace.name()))?;
    set_up(namespace, name)
}

/// Enslaves `port` to `bridge` and brings it up.
pub fn add_bridge_port(namespace: &NetNs, bridge: &str, port: &str) -> Result<()> {
    namespace.ip(["link", "set", port, "master", bridge, "up"])?;
    Ok(())
}

/// The interface index of `interface` inside `namespace`.
pub fn interface_index(namespace: &NetNs, interface: &str) -> Result<u32> {
    let index = namespace
        .try_run(|| nix::net::if_::if_nametoindex(interface))?
        .with_context(|| format!("no interface {interface} in {}", namespace.name()))?;
    Ok(index)
}

/// Polls `condition` every 20 ms until it returns `Ok(true)` or `timeout` passes; `what`
/// describes the awaited state for the error.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let last_error = match condition() {
            Ok(true) => return Ok(()),
            Ok(false) => None,
            Err(error) => Some(error),
        };
        if Instant::now() >= deadline {
            return match last_error {
                Some(error) => {
                    Err(error.context(format!("timed out after {timeout:?} waiting for {what}")))
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `interface` has carrier (`LOWER_UP`): for a veth, both ends are up.
pub fn wait_for_carrier(namespace: &NetNs, interface: &str, timeout: Duration) -> Result<()> {
    wait_until(
        &format!("carrier on {}/{interface}", namespace.name()),
        timeout,
        || {
            let output = namespace.ip(["-o", "link", "show", "dev", interface])?;
            Ok(String::from_utf8_lossy(&output.stdout).contains("LOWER_UP"))
        },
    )
}

/// Waits until no IPv6 address in the namespace is tentative; fails at once if DAD failed.
pub fn wait_for_ipv6_addresses(namespace: &NetNs, timeout: Duration) -> Result<()> {
    wait_until(
        &format!(
            "IPv6 addresses in {} to leave the tentative state",
            namespace.name()
        ),
        timeout,
        || {
            let output = namespace.ip(["-6", "-o", "addr", "show"])?;
            let text = String::from_utf8_lossy(&output.stdout);
            if let Some(line) = text.lines().find(|line| line.contains("dadfailed")) {
                bail!("duplicate address detection failed: {line}");
            }
            Ok(!text.contains("tentative"))
        },
    )
}

/// Waits until bridge port `port` is in the forwarding state.
pub fn wait_for_bridge_port_forwarding(
    namespace: &NetNs,
    port: &str,
    timeout: Duration,
) -> Result<()> {
    wait_until(
        &format!("bridge port {}/{port} to forward", namespace.name()),
        timeout,
        || {
            let output = namespace.ip(["-d", "-o", "link", "show", "dev", port])?;
            Ok(String::from_utf8_lossy(&output.stdout).contains("state forwarding"))
        },
    )
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn mac_address_text_round_trip() {
        let mac = MacAddress::local(1, 0x11);
        assert_eq!(mac.to_string(), "02:00:00:00:01:11");
        assert_eq!(
            "02:00:00:00:01:11"
                .parse::<MacAddress>()
                .expect("valid MAC"),
            mac
        );
        assert!("02:00:00:00:01".parse::<MacAddress>().is_err());
        assert!("02:00:00:00:01:11:22".parse::<MacAddress>().is_err());
        assert!("02:00:00:00:01:zz".parse::<MacAddress>().is_err());
    }
}
