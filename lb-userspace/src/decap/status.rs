//! `lb decap --status`: what is attached, for which VIPs, and the per-reason counters.

use std::{fmt, net::IpAddr, path::PathBuf};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use lb_common::{
    Counters,
    decap::{
        DecapConfig, DecapReason, DecapVip, MAP_DECAP_CONFIG, MAP_DECAP_STATS, MAP_DECAP_VIPS,
    },
};

use super::{DecapError, host, key_address, location, map_error, pinned_map};
use crate::dataplane::pins::{LINK_PIN, link::pinned_link_facts};

/// The state of `lb decap` on one interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecapStatus {
    pub interface: String,
    pub dir: PathBuf,
    /// The pinned link's id and its program's, when a link is pinned.
    pub link: Option<(u32, u32)>,
    /// The link's interface index is 0: the interface it was made for is gone.
    pub defunct: bool,
    pub gue_port: u16,
    pub vips: Vec<IpAddr>,
    /// Packets and bytes per reason, summed over the CPUs, in [`DecapReason::ALL`] order.
    pub counters: Vec<(DecapReason, Counters)>,
    pub host: host::HostChanges,
}

/// Reads the pinned state of `lb decap` on `interface`.
pub fn status(interface: &str) -> Result<DecapStatus, DecapError> {
    let location = location(interface, false)?.ok_or(DecapError::NoBpffs)?;
    let dir = location.dir;
    let not_attached = || DecapError::NotAttached {
        interface: interface.to_owned(),
        dir: dir.clone(),
    };
    if !dir.join(MAP_DECAP_VIPS).exists() {
        return Err(not_attached());
    }
    let link = pinned_link_facts(&dir.join(LINK_PIN)).ok();
    let config: Array<MapData, DecapConfig> =
        Array::try_from(Map::Array(pinned_map(&dir, MAP_DECAP_CONFIG)?))
            .map_err(map_error(MAP_DECAP_CONFIG, &dir))?;
    let gue_port = u16::from_be(
        config
            .get(&0, 0)
            .map_err(map_error(MAP_DECAP_CONFIG, &dir))?
            .gue_port_be,
    );
    let vips_map: HashMap<MapData, DecapVip, u32> =
        HashMap::try_from(Map::HashMap(pinned_map(&dir, MAP_DECAP_VIPS)?))
            .map_err(map_error(MAP_DECAP_VIPS, &dir))?;
    let mut vips: Vec<IpAddr> = vips_map
        .keys()
        .filter_map(Result::ok)
        .filter_map(|key| key_address(&key))
        .collect();
    vips.sort();
    let stats: PerCpuArray<MapData, Counters> =
        PerCpuArray::try_from(Map::PerCpuArray(pinned_map(&dir, MAP_DECAP_STATS)?))
            .map_err(map_error(MAP_DECAP_STATS, &dir))?;
    let mut counters = Vec::new();
    for reason in DecapReason::ALL {
        let per_cpu = stats
            .get(&(reason as u32), 0)
            .map_err(map_error(MAP_DECAP_STATS, &dir))?;
        let mut sum = Counters::default();
        for c in per_cpu.iter() {
            sum.packets += c.packets;
            sum.bytes += c.bytes;
        }
        counters.push((reason, sum));
    }
    Ok(DecapStatus {
        interface: interface.to_owned(),
        host: host::recorded(&dir)?,
        dir,
        link: link.map(|l| (l.id, l.program_id)),
        defunct: link.is_some_and(|l| l.xdp_ifindex == Some(0)),
        gue_port,
        vips,
        counters,
    })
}

impl DecapStatus {
    /// The packets counted for `reason`.
    pub fn packets(&self, reason: DecapReason) -> u64 {
        self.counters
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, c)| c.packets)
    }

    /// The status as JSON (for `--json`).
    pub fn to_json(&self) -> serde_json::Value {
        let counters: serde_json::Map<String, serde_json::Value> = self
            .counters
            .iter()
            .map(|(reason, c)| {
                (
                    reason.name().to_owned(),
                    serde_json::json!({"packets": c.packets, "bytes": c.bytes}),
                )
            })
            .collect();
        serde_json::json!({
            "interface": self.interface,
            "pin_dir": self.dir.display().to_string(),
            "attached": self.link.is_some() && !self.defunct,
            "link_id": self.link.map(|l| l.0),
            "program_id": self.link.map(|l| l.1),
            "gue_port": self.gue_port,
            "vips": self.vips.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "counters": counters,
            "host_changes": {
                "lo_addresses": self.host.lo_addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "rp_filter": self.host.rp_filter.iter().map(|(name, old)| serde_json::json!({"conf": name, "was": old})).collect::<Vec<_>>(),
            },
        })
    }
}

impl fmt::Display for DecapStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.link {
            None => "not attached (no pinned link)".to_owned(),
            Some(_) if self.defunct => "link defunct (its interface is gone)".to_owned(),
            Some((link, program)) => format!("attached (link {link}, program {program})"),
        };
        writeln!(f, "lb decap on {}: {state}", self.interface)?;
        writeln!(f, "pins: {}", self.dir.display())?;
        writeln!(f, "GUE port: {}", self.gue_port)?;
        let vips: Vec<String> = self.vips.iter().map(ToString::to_string).collect();
        writeln!(f, "VIPs: {}", vips.join(", "))?;
        writeln!(f, "{:<26} {:>12} {:>14}", "reason", "packets", "bytes")?;
        for (reason, c) in &self.counters {
            writeln!(f, "{:<26} {:>12} {:>14}", reason.name(), c.packets, c.bytes)?;
        }
        for address in &self.host.lo_addresses {
            writeln!(f, "host: {address} added to lo by lb decap")?;
        }
        for (name, old) in &self.host.rp_filter {
            writeln!(
                f,
                "host: net.ipv4.conf.{name}.rp_filter set to 2 (was {old})"
            )?;
        }
        Ok(())
    }
}
