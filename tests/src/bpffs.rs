//! Checking what is left in bpffs (pinned maps, programs and links), and reading what a running
//! daemon's pinned maps hold (as an operator's `bpftool map dump pinned` would).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap, Map, MapData};
use lb_common::{
    Backend, FAMILY_V4, FlowKey, FlowState, MAP_BACKENDS, MAP_FLOWS, MAP_RINGS, MAP_VIPS, RingSlot,
    VipInfo, VipKey, flow_hash,
};

/// Every file and directory below `path` (not `path` itself), depth first, sorted within each
/// directory. Empty if `path` does not exist or cannot be read; a subdirectory that cannot be read is
/// listed without its contents.
pub fn bpffs_entries_under(path: impl Into<PathBuf>) -> Vec<PathBuf> {
    fn walk(directory: &std::path::Path, found: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(directory) else {
            return;
        };
        let mut children: Vec<_> = entries.filter_map(|entry| entry.ok()).collect();
        children.sort_by_key(|entry| entry.file_name());
        for child in children {
            let child_path = child.path();
            let is_directory = child.file_type().map(|kind| kind.is_dir()).unwrap_or(false);
            found.push(child_path.clone());
            if is_directory {
                walk(&child_path, found);
            }
        }
    }
    let mut found = Vec::new();
    walk(&path.into(), &mut found);
    found
}

/// An address stored in a map key or value: IPv4 in the first 4 bytes when `family` says so.
fn stored_address(bytes: &[u8; 16], family: u8) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    }
}

/// One entry of a pinned `FLOWS` map, with the backend address its id has in the same
/// directory's pinned `BACKENDS` (ids are node-local; addresses compare across nodes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinnedFlow {
    pub key: FlowKey,
    pub state: FlowState,
    /// The connection's client (source address and port).
    pub client: SocketAddr,
    /// The VIP it is addressed to.
    pub vip: SocketAddr,
    /// `BACKENDS[state.backend]`'s address; `None` when that id has no backend record.
    pub backend: Option<IpAddr>,
}

/// Every entry of the `FLOWS` map pinned in `dir` (a daemon's pin directory, e.g.
/// [`crate::topology::LB_NETNS_PINS`]`/<namespace>/eth0`), with backend addresses.
pub fn pinned_flows(dir: &Path) -> Result<Vec<PinnedFlow>> {
    let flows_path = dir.join(MAP_FLOWS);
    let data = MapData::from_pin(&flows_path)
        .with_context(|| format!("opening the pinned {}", flows_path.display()))?;
    let flows: HashMap<MapData, FlowKey, FlowState> = HashMap::try_from(Map::LruHashMap(data))
        .with_context(|| format!("{} is not an LRU hash of flows", flows_path.display()))?;
    let entries = lb::dataplane::flows::read_flows(&flows)
        .with_context(|| format!("reading {}", flows_path.display()))?;
    let backends_path = dir.join(MAP_BACKENDS);
    let data = MapData::from_pin(&backends_path)
        .with_context(|| format!("opening the pinned {}", backends_path.display()))?;
    let backends: Array<MapData, Backend> = Array::try_from(Map::Array(data))
        .with_context(|| format!("{} is not an array of backends", backends_path.display()))?;
    entries
        .into_iter()
        .map(|(key, state)| {
            let record = backends
                .get(&state.backend, 0)
                .ok()
                .filter(|record| record.addr != [0; 16]);
            Ok(PinnedFlow {
                key,
                state,
                client: SocketAddr::new(
                    stored_address(&key.src, key.family),
                    u16::from_be(key.sport_be),
                ),
                vip: SocketAddr::new(
                    stored_address(&key.dst, key.family),
                    u16::from_be(key.dport_be),
                ),
                backend: record.map(|record| stored_address(&record.addr, key.family)),
            })
        })
        .collect()
}

/// The live ring slot `key` falls in, read from the maps pinned in `dir` (`VIPS` for the VIP's
/// id and live table, `RINGS` for the slot); `ring_size` is the daemon's (`ring_size`, default
/// [`lb_common::DEFAULT_RING_SIZE`]). `None` when that daemon has no such VIP.
pub fn pinned_ring_slot(dir: &Path, key: &FlowKey, ring_size: u32) -> Result<Option<RingSlot>> {
    let vips_path = dir.join(MAP_VIPS);
    let data = MapData::from_pin(&vips_path)
        .with_context(|| format!("opening the pinned {}", vips_path.display()))?;
    let vips: HashMap<MapData, VipKey, VipInfo> = HashMap::try_from(Map::HashMap(data))
        .with_context(|| format!("{} is not a hash of VIPs", vips_path.display()))?;
    let Ok(vip) = vips.get(&key.vip_key(), 0) else {
        return Ok(None);
    };
    let rings_path = dir.join(MAP_RINGS);
    let data = MapData::from_pin(&rings_path)
        .with_context(|| format!("opening the pinned {}", rings_path.display()))?;
    let rings: Array<MapData, RingSlot> = Array::try_from(Map::Array(data))
        .with_context(|| format!("{} is not an array of ring slots", rings_path.display()))?;
    let table = vip.id * 2 + (vip.active_ring & 1);
    let index = table * ring_size + flow_hash(key) % ring_size;
    let slot = rings
        .get(&index, 0)
        .with_context(|| format!("slot {index} of {}", rings_path.display()))?;
    Ok(Some(slot))
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn listing_of_a_missing_directory_is_empty() {
        assert!(bpffs_entries_under("/nonexistent/lb-tests").is_empty());
    }

    #[test]
    fn listing_is_recursive() {
        let root = std::env::temp_dir().join(format!("lb-tests-bpffs-{}", std::process::id()));
        std::fs::create_dir_all(root.join("a/b")).expect("create test directories");
        std::fs::write(root.join("a/b/c"), b"").expect("create test file");
        let found = bpffs_entries_under(&root);
        std::fs::remove_dir_all(&root).expect("remove test directories");
        assert_eq!(
            found,
            vec![root.join("a"), root.join("a/b"), root.join("a/b/c")]
        );
    }
}
