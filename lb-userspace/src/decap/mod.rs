//! `lb decap`: decapsulation on a backend with no tunnel device. The `lb_decap` XDP program (in
//! the same object as the balancer) strips the balancer's IPIP/GUE outer headers from packets for
//! the configured VIPs and passes the inner packet to the stack; this module attaches it, pinned
//! like the balancer so it outlives the command, keeps its VIP map up to date in place (hitless:
//! the link and program stay), does the host set-up the inner packets need ([`host`]) and undoes
//! exactly that on `--detach`.
//!
//! Pins: `<bpffs>/lb-decap/<if>` (or `.../lb-decap/netns/<ns>/<if>`, as the balancer's): the link,
//! the `DECAP_*` maps, and the host-change records.

pub mod config;
pub mod error;
pub mod host;
mod status;

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{Array, HashMap, Map, MapData},
    programs::{Xdp, XdpMode, links::FdLink},
};
use aya_obj::EbpfSectionKind;
use lb_common::decap::{
    DECAP_MAX_VIPS, DecapConfig, DecapVip, MAP_DECAP_CONFIG, MAP_DECAP_VIPS, is_decap_map,
};

pub use config::DecapSpec;
pub use error::DecapError;
pub use status::{DecapStatus, status};

use crate::{
    config::XdpModeSetting,
    dataplane::{
        AttachMode, PinDir,
        pins::{self, LINK_PIN, PinLocation, link::pinned_link_facts, location},
    },
    net::Interface,
};

/// The decapsulating program in the object.
pub const PROGRAM_NAME: &str = "lb_decap";

/// What `lb decap` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachReport {
    pub interface: String,
    pub dir: PathBuf,
    /// A new link was made (`false`: the one already there was kept, only its maps updated).
    pub attached: bool,
    /// The mode of the new link (`None` when kept: a link keeps its mode).
    pub mode: Option<AttachMode>,
    pub gue_port: u16,
    pub vips_added: Vec<IpAddr>,
    pub vips_removed: Vec<IpAddr>,
    pub lo_added: Vec<IpAddr>,
    pub lo_removed: Vec<IpAddr>,
    pub rp_filter_loosened: Vec<String>,
}

impl std::fmt::Display for AttachReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |a: &[IpAddr]| {
            a.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        if self.attached {
            write!(
                f,
                "lb decap attached to {} ({} XDP, pinned in {})",
                self.interface,
                self.mode.map_or("unknown", AttachMode::name),
                self.dir.display()
            )?;
        } else {
            write!(
                f,
                "lb decap on {} updated in place (link and program kept)",
                self.interface
            )?;
        }
        write!(f, "; GUE port {}", self.gue_port)?;
        if !self.vips_added.is_empty() {
            write!(f, "\nVIPs added: {}", list(&self.vips_added))?;
        }
        if !self.vips_removed.is_empty() {
            write!(f, "\nVIPs removed: {}", list(&self.vips_removed))?;
        }
        if !self.lo_added.is_empty() {
            write!(f, "\nadded to lo: {}", list(&self.lo_added))?;
        }
        if !self.lo_removed.is_empty() {
            write!(f, "\nremoved from lo: {}", list(&self.lo_removed))?;
        }
        for name in &self.rp_filter_loosened {
            write!(
                f,
                "\nnet.ipv4.conf.{name}.rp_filter: 1 (strict) -> 2 (loose)"
            )?;
        }
        Ok(())
    }
}

/// What `lb decap --detach` removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DetachReport {
    pub pins: pins::DetachReport,
    pub host: host::HostChanges,
}

impl std::fmt::Display for DetachReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some(dir) = &self.pins.dir else {
            return write!(f, "lb decap is not on {}", self.pins.interface);
        };
        write!(
            f,
            "lb decap removed from {}{} ({})",
            self.pins.interface,
            if self.pins.link {
                ": XDP program detached"
            } else {
                ""
            },
            dir.display()
        )?;
        for address in &self.host.lo_addresses {
            write!(f, "\nremoved from lo: {address}")?;
        }
        for (name, old) in &self.host.rp_filter {
            write!(f, "\nnet.ipv4.conf.{name}.rp_filter restored to {old}")?;
        }
        Ok(())
    }
}

/// The map key of a VIP.
pub fn vip_key(address: IpAddr) -> DecapVip {
    match address {
        IpAddr::V4(v4) => DecapVip::v4(v4.octets()),
        IpAddr::V6(v6) => DecapVip::v6(v6.octets()),
    }
}

fn key_address(key: &DecapVip) -> Option<IpAddr> {
    match key.family {
        lb_common::FAMILY_V4 => {
            let [a, b, c, d, ..] = key.addr;
            Some(IpAddr::from([a, b, c, d]))
        }
        lb_common::FAMILY_V6 => Some(IpAddr::from(key.addr)),
        _ => None,
    }
}

/// Where `interface`'s decap pins are in this network namespace (`mount`: mount a bpffs if none).
pub fn location(interface: &str, mount: bool) -> Result<Option<PinLocation>, DecapError> {
    let Some(root) = location::bpffs_root(mount)? else {
        return Ok(None);
    };
    Ok(Some(PinLocation::under_top(
        root,
        location::DECAP_TOP,
        interface,
    )?))
}

fn interface(name: &str) -> Result<Interface, DecapError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| DecapError::Io {
            what: "starting a tokio runtime for",
            path: PathBuf::from("netlink"),
            source,
        })?;
    Ok(runtime.block_on(crate::net::interface_by_name(name))?)
}

/// Attaches `lb_decap` to `interface` for `spec`, or updates the instance already there in place.
/// Idempotent.
pub fn attach(
    interface_name: &str,
    spec: &DecapSpec,
    mode: XdpModeSetting,
) -> Result<AttachReport, DecapError> {
    if spec.vips.len() > DECAP_MAX_VIPS as usize {
        return Err(DecapError::TooManyVips {
            max: DECAP_MAX_VIPS,
            given: spec.vips.len(),
        });
    }
    let interface = interface(interface_name)?;
    let location = location(interface_name, true)?.ok_or(DecapError::NoBpffs)?;
    let top = location.top();
    let pins = PinDir::open_at(location, interface_name)?;
    let dir = pins.path().to_path_buf();
    if live_link(&pins.pin_path(LINK_PIN), interface.index)? {
        return apply(&dir, interface_name, spec).map(|(lo_added, lo_removed, loosened, vips)| {
            AttachReport {
                interface: interface_name.to_owned(),
                dir: dir.clone(),
                attached: false,
                mode: None,
                gue_port: spec.gue_port,
                vips_added: vips.0,
                vips_removed: vips.1,
                lo_added,
                lo_removed,
                rp_filter_loosened: loosened,
            }
        });
    }
    let fresh = || -> Result<AttachReport, DecapError> {
        let mut ebpf = load(Some(&dir))?;
        // Host and maps are ready before the first packet meets the program.
        let (lo_added, lo_removed, rp_filter_loosened, (vips_added, vips_removed)) =
            apply(&dir, interface_name, spec)?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(DecapError::MissingProgram(PROGRAM_NAME))?
            .try_into()
            .map_err(DecapError::Program)?;
        let mode = attach_pinned(program, &interface, mode, &pins.pin_path(LINK_PIN))?;
        Ok(AttachReport {
            interface: interface_name.to_owned(),
            dir: dir.clone(),
            attached: true,
            mode: Some(mode),
            gue_port: spec.gue_port,
            vips_added,
            vips_removed,
            lo_added,
            lo_removed,
            rp_filter_loosened,
        })
    };
    fresh().inspect_err(|_| {
        // Nothing attached: leave the host and bpffs as they were.
        if let Err(e) = host::undo(&dir) {
            tracing::warn!("undoing the host changes after a failed attach: {e}");
        }
        if let Err(e) = pins::remove_pins(&dir, &top, interface_name) {
            tracing::warn!("removing {} after a failed attach: {e}", dir.display());
        }
    })
}

type Applied = (
    Vec<IpAddr>,
    Vec<IpAddr>,
    Vec<String>,
    (Vec<IpAddr>, Vec<IpAddr>),
);

/// The host set-up, then the maps: (lo added, lo removed, rp_filter loosened, (VIPs added, VIPs
/// removed)). Host first: a packet decapsulated before its VIP is on lo would be dropped.
fn apply(dir: &Path, interface: &str, spec: &DecapSpec) -> Result<Applied, DecapError> {
    let (lo_added, lo_removed) = host::sync_lo(dir, &spec.vips)?;
    let loosened = host::loosen_rp_filter(dir, interface)?;
    let vips = write_maps(dir, spec)?;
    Ok((lo_added, lo_removed, loosened, vips))
}

/// Whether a link pinned at `path` is attached to `ifindex`; a defunct one (its interface gone,
/// or another interface has the name now) is unpinned.
fn live_link(path: &Path, ifindex: u32) -> Result<bool, DecapError> {
    match pinned_link_facts(path) {
        Ok(facts) if facts.xdp_ifindex == Some(ifindex) => Ok(true),
        Ok(_) => {
            std::fs::remove_file(path).map_err(|source| DecapError::Io {
                what: "removing the defunct link",
                path: path.to_path_buf(),
                source,
            })?;
            Ok(false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(DecapError::Io {
            what: "reading the link pinned at",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Loads the object with the `DECAP_*` maps pinned in `dir` (adopted when there; `None`: not
/// pinned, for tests) and `lb_decap` verified. The balancer's maps in the same object are created
/// too (aya makes every map of an object) but small, and never pinned: this program does not use
/// them.
pub fn load(dir: Option<&Path>) -> Result<aya::Ebpf, DecapError> {
    let object = crate::ebpf_object();
    if object.is_empty() {
        return Err(DecapError::NoObject);
    }
    let parsed =
        aya_obj::Object::parse(object).map_err(|e| DecapError::Pins(pins::PinError::Object(e)))?;
    let mut loader = EbpfLoader::new();
    for (name, map) in &parsed.maps {
        if matches!(
            map.section_kind(),
            EbpfSectionKind::Bss | EbpfSectionKind::Data | EbpfSectionKind::Rodata
        ) {
            continue;
        }
        if is_decap_map(name) {
            if let Some(dir) = dir {
                loader.map_pin_path(name, dir.join(name));
            }
        } else if map.map_type() == aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_RINGBUF as u32 {
            // A ring buffer is a power-of-two number of pages.
            loader.map_max_entries(name, 4096);
        } else {
            // Per-CPU LRU lists need an entry per CPU; 256 covers the machines we know.
            loader.map_max_entries(name, 256);
        }
    }
    let mut ebpf = loader.load(object).map_err(DecapError::Load)?;
    let program: &mut Xdp = ebpf
        .program_mut(PROGRAM_NAME)
        .ok_or(DecapError::MissingProgram(PROGRAM_NAME))?
        .try_into()
        .map_err(DecapError::Program)?;
    program.load().map_err(DecapError::Program)?;
    Ok(ebpf)
}

/// Attaches as `mode` asks (`auto`: generic on a veth, else native with a fallback to generic,
/// like `lb run`) and pins the link at `path`.
fn attach_pinned(
    program: &mut Xdp,
    interface: &Interface,
    mode: XdpModeSetting,
    path: &Path,
) -> Result<AttachMode, DecapError> {
    let try_mode = |program: &mut Xdp, mode: AttachMode| {
        let xdp_mode = match mode {
            AttachMode::Native => XdpMode::Driver,
            AttachMode::Skb => XdpMode::Skb,
        };
        program
            .attach_to_if_index(interface.index, xdp_mode)
            .map_err(|source| {
                if matches!(
                    crate::dataplane::error::os_error(&source),
                    Some(libc::EEXIST | libc::EBUSY)
                ) {
                    DecapError::AlreadyAttached {
                        interface: interface.name.clone(),
                    }
                } else {
                    DecapError::Attach {
                        interface: interface.name.clone(),
                        mode: mode.name(),
                        source,
                    }
                }
            })
    };
    let (id, mode) = match mode {
        XdpModeSetting::Native => (try_mode(program, AttachMode::Native)?, AttachMode::Native),
        XdpModeSetting::Skb => (try_mode(program, AttachMode::Skb)?, AttachMode::Skb),
        XdpModeSetting::Auto if interface.kind.as_deref() == Some("veth") => {
            (try_mode(program, AttachMode::Skb)?, AttachMode::Skb)
        }
        XdpModeSetting::Auto => match try_mode(program, AttachMode::Native) {
            Ok(id) => (id, AttachMode::Native),
            Err(e @ DecapError::AlreadyAttached { .. }) => return Err(e),
            Err(e) => {
                tracing::warn!("{e}; falling back to generic (skb) XDP");
                (try_mode(program, AttachMode::Skb)?, AttachMode::Skb)
            }
        },
    };
    let link = program.take_link(id).map_err(DecapError::Program)?;
    let link = FdLink::try_from(link).map_err(|_| {
        DecapError::Pins(pins::PinError::LinkNotPinnable {
            interface: interface.name.clone(),
        })
    })?;
    // On failure the link is dropped, and with it the attachment.
    link.pin(path).map_err(|source| {
        DecapError::Pins(pins::PinError::PinLink {
            path: path.to_path_buf(),
            source,
        })
    })?;
    Ok(mode)
}

fn map_error<'a>(
    map: &'static str,
    dir: &'a Path,
) -> impl Fn(aya::maps::MapError) -> DecapError + 'a {
    move |source| DecapError::Map {
        map,
        dir: dir.to_path_buf(),
        source,
    }
}

/// Opens the decap map `name` pinned in `dir`.
pub(crate) fn pinned_map(dir: &Path, name: &'static str) -> Result<MapData, DecapError> {
    MapData::from_pin(dir.join(name)).map_err(map_error(name, dir))
}

/// Writes the GUE port and makes `DECAP_VIPS` hold exactly `spec.vips` (new ones inserted before
/// old ones go, each a single map update, so a VIP in both sets is never missing). Returns
/// (added, removed).
fn write_maps(dir: &Path, spec: &DecapSpec) -> Result<(Vec<IpAddr>, Vec<IpAddr>), DecapError> {
    let mut config: Array<MapData, DecapConfig> =
        Array::try_from(Map::Array(pinned_map(dir, MAP_DECAP_CONFIG)?))
            .map_err(map_error(MAP_DECAP_CONFIG, dir))?;
    let value = DecapConfig {
        gue_port_be: spec.gue_port.to_be(),
        _pad: [0; 6],
    };
    config
        .set(0, value, 0)
        .map_err(map_error(MAP_DECAP_CONFIG, dir))?;
    let mut vips: HashMap<MapData, DecapVip, u32> =
        HashMap::try_from(Map::HashMap(pinned_map(dir, MAP_DECAP_VIPS)?))
            .map_err(map_error(MAP_DECAP_VIPS, dir))?;
    let present: BTreeSet<DecapVip> = vips.keys().filter_map(Result::ok).collect();
    let mut added = Vec::new();
    for &address in &spec.vips {
        let key = vip_key(address);
        if !present.contains(&key) {
            vips.insert(key, 1, 0)
                .map_err(map_error(MAP_DECAP_VIPS, dir))?;
            added.push(address);
        }
    }
    let wanted: BTreeSet<DecapVip> = spec.vips.iter().copied().map(vip_key).collect();
    let mut removed = Vec::new();
    for key in present.difference(&wanted) {
        vips.remove(key).map_err(map_error(MAP_DECAP_VIPS, dir))?;
        removed.extend(key_address(key));
    }
    Ok((added, removed))
}

/// Removes `lb decap` from `interface`: undoes the recorded host changes, unpins the link (the
/// program detaches) and the maps, and removes the directory. Nothing there is not an error.
pub fn detach(interface: &str) -> Result<DetachReport, DecapError> {
    let nothing = || DetachReport {
        pins: pins::DetachReport {
            interface: interface.to_owned(),
            dir: None,
            link: false,
            pins: Vec::new(),
        },
        host: host::HostChanges::default(),
    };
    let Some(location) = location(interface, false)? else {
        return Ok(nothing());
    };
    if !location.dir.is_dir() {
        return Ok(nothing());
    }
    let top = location.top();
    let pin_dir = PinDir::open_at(location, interface)?;
    let dir = pin_dir.path().to_path_buf();
    let host = host::undo(&dir)?;
    let report = pins::remove_pins(&dir, &top, interface)?;
    drop(pin_dir);
    Ok(DetachReport { pins: report, host })
}
