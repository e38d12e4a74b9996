//! Does what is pinned fit this build and config? aya's `map_pin_path` reuses any map pinned
//! under a name without looking at it, and a program verified against a 16-byte value reading a
//! pinned map of 8-byte values would read out of bounds in one direction or another; so each
//! pinned map's type, key and value size, capacity and flags are compared with what this build's
//! object and the configured capacities would create, before anything is loaded.

use std::{collections::BTreeMap, fmt, path::Path};

use aya::maps::{MapInfo, MapType};
use aya_obj::{EbpfSectionKind, generated::bpf_map_type};

use super::{LINK_PIN, PinError};
use crate::dataplane::loader::{Capacity, map_capacities};

/// What a map is, as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapShape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// The balancer's maps in this build's object with `capacity`, by name (aya's
/// `.rodata`/`.bss`/`.data` maps for globals left out: they are created per load and never
/// pinned; so are the decapsulator's `DECAP_*` maps, which `lb decap` pins elsewhere, so a
/// balancer pinned by a build without them stays adoptable).
pub fn expected_maps(
    object: &[u8],
    capacity: Capacity,
) -> Result<BTreeMap<String, MapShape>, PinError> {
    let object = aya_obj::Object::parse(object).map_err(PinError::Object)?;
    let capacities = map_capacities(capacity);
    let mut maps = BTreeMap::new();
    for (name, map) in &object.maps {
        if matches!(
            map.section_kind(),
            EbpfSectionKind::Bss | EbpfSectionKind::Data | EbpfSectionKind::Rodata
        ) || lb_common::decap::is_decap_map(name)
        {
            continue;
        }
        let max_entries = capacities
            .iter()
            .find(|(map_name, _, _)| map_name == name)
            .map_or(map.max_entries(), |&(_, entries, _)| entries);
        maps.insert(
            name.clone(),
            MapShape {
                map_type: map.map_type(),
                key_size: map.key_size(),
                value_size: value_size_override(map.map_type()).unwrap_or(map.value_size()),
                max_entries,
                flags: map.map_flags() | kernel_added_flags(map.map_type()),
            },
        );
    }
    Ok(maps)
}

/// The value sizes aya's loader puts in place of the object's (aya 0.14 `value_size_override`):
/// devmaps and cpumaps carry a program id next to the target where the kernel supports it.
fn value_size_override(map_type: u32) -> Option<u32> {
    let features = aya::features();
    match bpf_map_type::try_from(map_type).ok()? {
        bpf_map_type::BPF_MAP_TYPE_DEVMAP | bpf_map_type::BPF_MAP_TYPE_DEVMAP_HASH => {
            Some(if features.devmap_prog_id() { 8 } else { 4 })
        }
        bpf_map_type::BPF_MAP_TYPE_CPUMAP => Some(if features.cpumap_prog_id() { 8 } else { 4 }),
        _ => None,
    }
}

/// Flags the kernel adds at creation and then reports: a devmap's lookup hands the program a
/// pointer into the entry, so the kernel makes it read-only for programs
/// (`BPF_F_RDONLY_PROG`, seen on Linux 6.18 as flags 0x80 on `TX_PORTS`).
fn kernel_added_flags(map_type: u32) -> u32 {
    match bpf_map_type::try_from(map_type) {
        Ok(bpf_map_type::BPF_MAP_TYPE_DEVMAP | bpf_map_type::BPF_MAP_TYPE_DEVMAP_HASH) => {
            aya_obj::generated::BPF_F_RDONLY_PROG
        }
        _ => 0,
    }
}

/// What is pinned in a directory: the maps (by file name) and whether a link is there.
#[derive(Debug, Default)]
pub struct Pinned {
    pub maps: BTreeMap<String, Result<MapShape, String>>,
    pub link: bool,
}

impl Pinned {
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty() && !self.link
    }
}

/// Reads every pin in `dir`: `link`, and everything else as a map.
pub fn read_pinned(dir: &Path) -> Result<Pinned, PinError> {
    let mut pinned = Pinned::default();
    let entries = std::fs::read_dir(dir).map_err(|source| PinError::Io {
        what: "listing",
        path: dir.to_path_buf(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| PinError::Io {
            what: "listing",
            path: dir.to_path_buf(),
            source,
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == LINK_PIN {
            pinned.link = true;
            continue;
        }
        let shape = MapInfo::from_pin(entry.path())
            .map(|info| MapShape {
                // An unknown type reads as "type 0"; it differs from ours all the same.
                map_type: info.map_type().map_or(0, |t| t as u32),
                key_size: info.key_size(),
                value_size: info.value_size(),
                max_entries: info.max_entries(),
                flags: info.map_flags(),
            })
            .map_err(|e| format!("not a BPF map ({e})"));
        pinned.maps.insert(name, shape);
    }
    Ok(pinned)
}

/// Why pinned state cannot be adopted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    /// A map's capacity follows a config setting that changed.
    Capacity {
        map: String,
        pinned: u32,
        needed: u32,
        setting: &'static str,
    },
    /// A map's type, key size, value size, flags (or a capacity no setting controls) differ:
    /// another build of lb made it.
    Build {
        map: String,
        what: &'static str,
        pinned: String,
        needed: String,
    },
    /// This build has a map that is not pinned.
    Missing { map: String },
    /// Something pinned that this build does not have.
    Unexpected {
        name: String,
        detail: Option<String>,
    },
}

/// The first mismatch between `pinned` and `expected`, if any (maps in name order).
pub fn compare(
    pinned: &Pinned,
    expected: &BTreeMap<String, MapShape>,
    capacity: Capacity,
) -> Option<Mismatch> {
    let settings = map_capacities(capacity);
    for (name, shape) in &pinned.maps {
        let Some(needed) = expected.get(name) else {
            return Some(Mismatch::Unexpected {
                name: name.clone(),
                detail: shape.as_ref().err().cloned(),
            });
        };
        let shape = match shape {
            Ok(shape) => shape,
            Err(detail) => {
                return Some(Mismatch::Unexpected {
                    name: name.clone(),
                    detail: Some(detail.clone()),
                });
            }
        };
        let build = |what, pinned: String, needed: String| {
            Some(Mismatch::Build {
                map: name.clone(),
                what,
                pinned,
                needed,
            })
        };
        if shape.map_type != needed.map_type {
            return build(
                "type",
                type_name(shape.map_type),
                type_name(needed.map_type),
            );
        }
        if shape.key_size != needed.key_size {
            return build(
                "key size",
                format!("{} bytes", shape.key_size),
                format!("{} bytes", needed.key_size),
            );
        }
        if shape.value_size != needed.value_size {
            return build(
                "value size",
                format!("{} bytes", shape.value_size),
                format!("{} bytes", needed.value_size),
            );
        }
        if shape.flags != needed.flags {
            return build(
                "flags",
                format!("{:#x}", shape.flags),
                format!("{:#x}", needed.flags),
            );
        }
        if shape.max_entries != needed.max_entries {
            return match settings.iter().find(|(map, _, _)| map == name) {
                Some(&(_, _, setting)) => Some(Mismatch::Capacity {
                    map: name.clone(),
                    pinned: shape.max_entries,
                    needed: needed.max_entries,
                    setting,
                }),
                None => build(
                    "capacity",
                    format!("{} entries", shape.max_entries),
                    format!("{} entries", needed.max_entries),
                ),
            };
        }
    }
    expected
        .keys()
        .find(|name| !pinned.maps.contains_key(*name))
        .map(|name| Mismatch::Missing { map: name.clone() })
}

fn type_name(map_type: u32) -> String {
    bpf_map_type::try_from(map_type)
        .ok()
        .and_then(|t| MapType::try_from(t).ok())
        .map_or_else(|| format!("type {map_type}"), |t| format!("{t:?}"))
}

/// A refusal to adopt, with what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutMismatch {
    pub dir: std::path::PathBuf,
    pub interface: String,
    pub mismatch: Mismatch,
}

impl fmt::Display for LayoutMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            dir,
            interface,
            mismatch,
        } = self;
        let dir = dir.display();
        let detach = format!(
            "run `lb detach --interface {interface}` first (established flows are dropped)"
        );
        match mismatch {
            Mismatch::Capacity {
                map,
                pinned,
                needed,
                setting,
            } => write!(
                f,
                "pinned state in {dir} does not match this lb: {map} holds {pinned} entries, \
                 this config needs {needed} ({setting}); keep the old setting, or {detach}"
            ),
            Mismatch::Build {
                map,
                what,
                pinned,
                needed,
            } => write!(
                f,
                "pinned state in {dir} was made by a different build of lb: {map} has {what} \
                 {pinned}, this build needs {needed}; run the lb that made it, or {detach}"
            ),
            Mismatch::Missing { map } => write!(
                f,
                "pinned state in {dir} was made by a different build of lb (or a start that was \
                 interrupted): map {map} is not pinned there; {detach}"
            ),
            Mismatch::Unexpected { name, detail } => {
                write!(
                    f,
                    "pinned state in {dir} was made by a different build of lb: it holds {name}"
                )?;
                if let Some(detail) = detail {
                    write!(f, " ({detail})")?;
                }
                write!(f, ", which this build does not have; {detach}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPACITY: Capacity = Capacity {
        ring_size: 1021,
        max_vips: 4,
        max_backends: 16,
        flow_table_size: 1024,
    };

    fn expected() -> BTreeMap<String, MapShape> {
        expected_maps(crate::ebpf_object(), CAPACITY).expect("object parses")
    }

    fn pinned_as(expected: &BTreeMap<String, MapShape>) -> Pinned {
        Pinned {
            maps: expected
                .iter()
                .map(|(name, shape)| (name.clone(), Ok(*shape)))
                .collect(),
            link: true,
        }
    }

    #[test]
    fn the_object_has_the_balancers_maps_and_no_globals() {
        let names: Vec<_> = expected().into_keys().collect();
        assert_eq!(
            names,
            [
                "BACKENDS",
                "BACKEND_STATS",
                "COUNTER_CARRY",
                "FLOWS",
                "FLOW_EVENTS",
                "FLOW_EVENTS_LOST",
                "FLOW_EVENTS_ON",
                "REASONS",
                "RINGS",
                "TOO_BIG_BUDGET",
                "TX_PORTS",
                "VIPS",
                "VIP_INDEX"
            ]
        );
        assert_eq!(expected()["RINGS"].max_entries, 4 * 2 * 1021);
        assert_eq!(expected()["FLOWS"].max_entries, 1024);
        assert_eq!(
            expected()["FLOW_EVENTS"].max_entries,
            lb_common::FLOW_EVENTS_BYTES
        );
    }

    #[test]
    fn the_decap_maps_in_the_object_are_not_the_balancers() {
        // A balancer pinned by a build without `lb decap` must stay adoptable: the object has
        // the decap maps, the balancer's expected layout does not.
        let object = aya_obj::Object::parse(crate::ebpf_object()).expect("object parses");
        for name in lb_common::decap::DECAP_MAPS {
            assert!(object.maps.contains_key(name), "{name} in the object");
            assert!(!expected().contains_key(name), "{name} not the balancer's");
        }
    }

    #[test]
    fn pinned_state_from_before_flow_events_is_refused() {
        let expected = expected();
        let mut pinned = pinned_as(&expected);
        for name in ["FLOW_EVENTS", "FLOW_EVENTS_LOST", "FLOW_EVENTS_ON"] {
            pinned.maps.remove(name);
        }
        let mismatch = compare(&pinned, &expected, CAPACITY).expect("mismatch");
        assert_eq!(
            mismatch,
            Mismatch::Missing {
                map: "FLOW_EVENTS".into()
            }
        );
    }

    #[test]
    fn the_same_layout_matches() {
        let expected = expected();
        assert_eq!(compare(&pinned_as(&expected), &expected, CAPACITY), None);
    }

    #[test]
    fn a_changed_capacity_names_its_setting() {
        let expected = expected();
        let mut pinned = pinned_as(&expected);
        if let Some(Ok(flows)) = pinned.maps.get_mut("FLOWS") {
            flows.max_entries = 1 << 20;
        }
        let mismatch = compare(&pinned, &expected, CAPACITY).expect("mismatch");
        let message = LayoutMismatch {
            dir: "/sys/fs/bpf/lb/eth0".into(),
            interface: "eth0".into(),
            mismatch,
        }
        .to_string();
        assert_eq!(
            message,
            "pinned state in /sys/fs/bpf/lb/eth0 does not match this lb: FLOWS holds 1048576 \
             entries, this config needs 1024 (flow_table_size); keep the old setting, or run \
             `lb detach --interface eth0` first (established flows are dropped)"
        );
    }

    #[test]
    fn a_changed_value_size_is_another_build() {
        let expected = expected();
        let mut pinned = pinned_as(&expected);
        if let Some(Ok(vips)) = pinned.maps.get_mut("VIPS") {
            vips.value_size = 8;
        }
        let mismatch = compare(&pinned, &expected, CAPACITY).expect("mismatch");
        assert_eq!(
            mismatch,
            Mismatch::Build {
                map: "VIPS".into(),
                what: "value size",
                pinned: "8 bytes".into(),
                needed: "16 bytes".into()
            }
        );
    }

    #[test]
    fn missing_and_unexpected_maps_are_refused() {
        let expected = expected();
        let mut pinned = pinned_as(&expected);
        pinned.maps.remove("REASONS");
        assert_eq!(
            compare(&pinned, &expected, CAPACITY),
            Some(Mismatch::Missing {
                map: "REASONS".into()
            })
        );
        let mut pinned = pinned_as(&expected);
        pinned
            .maps
            .insert("OLD_MAP".into(), Err("not a BPF map".into()));
        assert!(matches!(
            compare(&pinned, &expected, CAPACITY),
            Some(Mismatch::Unexpected { name, .. }) if name == "OLD_MAP"
        ));
    }
}
