//! Loading the XDP object with the capacities chosen in the config, and attaching it.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use lb_common::{
    GLOBAL_RING_SIZE, GLOBAL_RING_SIZE_INVERSE, MAP_BACKEND_STATS, MAP_BACKENDS, MAP_COUNTER_CARRY,
    MAP_FLOWS, MAP_RINGS, MAP_TX_PORTS, MAP_VIPS,
};

use super::{
    error::DataPlaneError,
    maps::Maps,
    pins::{self, LINK_PIN, LayoutMismatch, PinDir, PinError, layout},
};

/// The XDP program that balances; `xdp_pass` is the other one in the object.
pub const PROGRAM_NAME: &str = "lb_xdp";
/// A program in the same object that passes everything, for the peer of a veth (DESIGN.md §5);
/// the daemon does not load it.
pub const PASS_PROGRAM_NAME: &str = "xdp_pass";

/// Sizes fixed at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub ring_size: u32,
    pub max_vips: u32,
    pub max_backends: u32,
    pub flow_table_size: u32,
}

/// How the program ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// In the driver (`XDP_FLAGS_DRV_MODE`): the fast path.
    Native,
    /// Generic XDP in the network stack (`XDP_FLAGS_SKB_MODE`): works everywhere, slower.
    Skb,
}

impl AttachMode {
    pub const fn name(self) -> &'static str {
        match self {
            AttachMode::Native => "native",
            AttachMode::Skb => "skb",
        }
    }

    fn xdp_mode(self) -> XdpMode {
        match self {
            AttachMode::Native => XdpMode::Driver,
            AttachMode::Skb => XdpMode::Skb,
        }
    }
}

/// Each map whose capacity the config sets: its name, its `max_entries` for `capacity`, and the
/// config setting behind it (the loader applies these, the pin layout check compares with them).
pub(crate) fn map_capacities(capacity: Capacity) -> [(&'static str, u32, &'static str); 7] {
    let Capacity {
        ring_size,
        max_vips,
        max_backends,
        flow_table_size,
    } = capacity;
    [
        (MAP_VIPS, max_vips, "max_vips"),
        // One entry per VIP, and one for the VIPs removed.
        (MAP_COUNTER_CARRY, max_vips + 1, "max_vips"),
        (
            MAP_RINGS,
            max_vips * 2 * ring_size,
            "max_vips and ring_size",
        ),
        (MAP_BACKENDS, max_backends, "max_backends"),
        (MAP_BACKEND_STATS, max_backends, "max_backends"),
        (MAP_TX_PORTS, max_backends, "max_backends"),
        (MAP_FLOWS, flow_table_size, "flow_table_size"),
    ]
}

/// Whether the maps of a pinned load were there already.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinnedState {
    /// Nothing was pinned: new, empty maps were created and pinned.
    Fresh,
    /// The pinned maps (flows, counters, VIPs, rings) were adopted, contents and all.
    Adopted,
}

/// How the program is attached after [`DataPlane::attach`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// The pinned link of a previous daemon was taken over (its program atomically replaced by
    /// ours); `false` for a new attachment.
    pub adopted: bool,
    /// The mode the program runs in. For an adopted link this is the mode it was made with (a
    /// link's mode cannot change); `None` when the kernel did not say.
    pub mode: Option<AttachMode>,
    /// The kernel's id of the XDP link (0 for an unpinned attachment).
    pub link_id: u32,
    /// The kernel's id of our program.
    pub program_id: u32,
}

/// The program's attachment, if any.
enum Link {
    None,
    /// Owned by aya's program: dropping the `DataPlane` or `detach` detaches it.
    Local(XdpLinkId),
    /// Pinned in the `PinDir`: dropping only closes our fd, the pin keeps it attached.
    Pinned {
        _fd: FdLink,
    },
}

/// The loaded program and its maps. Dropping it detaches the program, unless it was attached
/// with pins ([`Self::load_pinned`]): then the program stays attached and the maps stay pinned
/// for the next daemon.
pub struct DataPlane {
    ebpf: Ebpf,
    pub maps: Maps,
    pub capacity: Capacity,
    link: Link,
    attachment: Option<Attachment>,
    /// Dropped last: the lock outlives the link and maps handles.
    pins: Option<PinDir>,
}

impl DataPlane {
    /// Loads the embedded object with `capacity` and verifies the program. Nothing is pinned.
    pub fn load(capacity: Capacity) -> Result<Self, DataPlaneError> {
        Self::load_object(crate::ebpf_object(), capacity)
    }

    pub fn load_object(object: &[u8], capacity: Capacity) -> Result<Self, DataPlaneError> {
        Self::load_with(object, capacity, None)
    }

    /// Loads the embedded object with every map pinned by name in `pins`: maps already pinned
    /// there are adopted (after checking that they fit this build and `capacity`; a mismatch is
    /// refused with what to do, and leaves the pins alone), missing ones are created and pinned.
    /// The `DataPlane` keeps `pins` (and its lock) for its life.
    pub fn load_pinned(
        capacity: Capacity,
        pins: PinDir,
    ) -> Result<(Self, PinnedState), DataPlaneError> {
        Self::load_object_pinned(crate::ebpf_object(), capacity, pins)
    }

    pub fn load_object_pinned(
        object: &[u8],
        capacity: Capacity,
        pins: PinDir,
    ) -> Result<(Self, PinnedState), DataPlaneError> {
        if object.is_empty() {
            return Err(DataPlaneError::NoObject);
        }
        let expected = layout::expected_maps(object, capacity)?;
        if pins::orphans::link_is_defunct(pins.path()) {
            // The interface these pins were for is gone: deleted, or destroyed with its
            // namespace, and this one (a new interface, or a new namespace reusing the name)
            // only has its name. Its flows, MACs and ports mean nothing here: start fresh.
            let memory = pins::orphans::clear_defunct(pins.path())?;
            tracing::warn!(
                "{} held the pinned state of an earlier {} whose interface is gone (its XDP link \
                 is defunct: the interface, or the network namespace of that name, was deleted \
                 and made again): removed it ({}), starting with an empty flow table",
                pins.path().display(),
                pins.interface(),
                pins::orphans::megabytes(memory)
            );
        }
        let pinned = pins.pinned()?;
        let state = if pinned.maps.is_empty() {
            PinnedState::Fresh
        } else {
            if let Some(mismatch) = layout::compare(&pinned, &expected, capacity) {
                return Err(PinError::Layout(Box::new(LayoutMismatch {
                    dir: pins.path().to_path_buf(),
                    interface: pins.interface().to_owned(),
                    mismatch,
                }))
                .into());
            }
            PinnedState::Adopted
        };
        let names: Vec<String> = expected.into_keys().collect();
        let dataplane = Self::load_with(object, capacity, Some((pins, &names)))?;
        Ok((dataplane, state))
    }

    fn load_with(
        object: &[u8],
        capacity: Capacity,
        pins: Option<(PinDir, &[String])>,
    ) -> Result<Self, DataPlaneError> {
        if object.is_empty() {
            return Err(DataPlaneError::NoObject);
        }
        let Capacity {
            ring_size,
            max_vips,
            ..
        } = capacity;
        let ring_tables = max_vips * 2;
        let mut loader = EbpfLoader::new();
        loader.override_global(GLOBAL_RING_SIZE, &ring_size, true);
        let inverse = lb_common::ring_size_inverse(ring_size);
        loader.override_global(GLOBAL_RING_SIZE_INVERSE, &inverse, true);
        for (name, max_entries, _) in map_capacities(capacity) {
            loader.map_max_entries(name, max_entries);
        }
        if let Some((pins, names)) = &pins {
            // aya opens what is pinned under each path, or creates the map and pins it there.
            for name in *names {
                loader.map_pin_path(name, pins.pin_path(name));
            }
        }
        let mut ebpf = loader.load(object).map_err(DataPlaneError::Load)?;
        // Only the balancer is verified and loaded; `xdp_pass` in the same object is for veth
        // peers (tests and container set-ups load it themselves).
        let name = PROGRAM_NAME;
        let program: &mut Xdp = ebpf
            .program_mut(name)
            .ok_or(DataPlaneError::MissingProgram(name))?
            .try_into()
            .map_err(|source| DataPlaneError::Program { name, source })?;
        program
            .load()
            .map_err(|source| DataPlaneError::Program { name, source })?;
        let maps = Maps::take(&mut ebpf, ring_size, ring_tables)?;
        Ok(Self {
            ebpf,
            maps,
            capacity,
            link: Link::None,
            attachment: None,
            pins: pins.map(|(pins, _)| pins),
        })
    }

    /// The pin directory when loaded with pins (then dropping this leaves the program attached
    /// and the maps pinned); `None` when nothing is pinned (dropping detaches).
    pub fn pinned(&self) -> Option<&Path> {
        self.pins.as_ref().map(PinDir::path)
    }

    /// `<root>/lb` of the bpffs the pins are in, where the orphan scan looks.
    pub fn pin_top(&self) -> Option<PathBuf> {
        self.pins.as_ref().map(PinDir::top)
    }

    /// How the program is attached, once [`Self::attach`] succeeded.
    pub fn attachment(&self) -> Option<Attachment> {
        self.attachment
    }

    /// The flow-event reader, moved out for its own task ([`Maps::take_flow_events`]).
    pub fn take_flow_events(&mut self) -> Result<super::FlowEvents, DataPlaneError> {
        self.maps.take_flow_events()
    }

    /// Turns flow events on or off ([`Maps::set_flow_events`]).
    pub fn set_flow_events(&mut self, on: bool) -> Result<(), DataPlaneError> {
        self.maps.set_flow_events(on)
    }

    /// Flow events lost to a full ring ([`Maps::flow_events_lost`]).
    pub fn flow_events_lost(&self) -> Result<u64, DataPlaneError> {
        self.maps.flow_events_lost()
    }

    /// The balancing program (for attaching, or running it with `BPF_PROG_TEST_RUN`).
    pub fn program(&mut self) -> &mut Xdp {
        program(&mut self.ebpf)
    }

    /// Attaches the balancing program to `interface` (`ifindex`) in `mode`.
    ///
    /// Loaded with pins, the attachment is a pinned XDP link: the link a previous daemon pinned
    /// is adopted when it is still attached to `ifindex` (our program replaces the old one
    /// atomically, so no packet meets no program; the link keeps its mode, whatever `mode`
    /// says), else a new link is made and pinned (a defunct pinned link, whose interface was
    /// deleted, is unpinned first). [`Self::attachment`] tells which.
    pub fn attach(
        &mut self,
        interface: &str,
        ifindex: u32,
        mode: AttachMode,
    ) -> Result<(), DataPlaneError> {
        let attachment = match self.pins.take() {
            None => {
                let link = attach_new(&mut self.ebpf, interface, ifindex, mode)?;
                self.link = Link::Local(link);
                Attachment {
                    adopted: false,
                    mode: Some(mode),
                    link_id: 0,
                    program_id: program_id(&mut self.ebpf)?,
                }
            }
            Some(pins) => {
                let result = self.attach_pinned(&pins, interface, ifindex, mode);
                self.pins = Some(pins);
                result?
            }
        };
        self.attachment = Some(attachment);
        Ok(())
    }

    fn attach_pinned(
        &mut self,
        pins: &PinDir,
        interface: &str,
        ifindex: u32,
        mode: AttachMode,
    ) -> Result<Attachment, DataPlaneError> {
        let path = pins.pin_path(LINK_PIN);
        if let Some(link) = adopt_link(&mut self.ebpf, &path, ifindex)? {
            let info = link.info().map_err(|source| PinError::AdoptLink {
                path: path.clone(),
                source: source.into(),
            })?;
            let attachment = Attachment {
                adopted: true,
                mode: pins::mode::attached_mode(ifindex),
                link_id: info.id(),
                program_id: info.program_id(),
            };
            self.link = Link::Pinned { _fd: link };
            return Ok(attachment);
        }
        let id = attach_new(&mut self.ebpf, interface, ifindex, mode)?;
        let link =
            program(&mut self.ebpf)
                .take_link(id)
                .map_err(|source| DataPlaneError::Program {
                    name: PROGRAM_NAME,
                    source,
                })?;
        // A netlink attachment (kernels before 5.9) has no fd to pin; dropping it detaches.
        let link = FdLink::try_from(link).map_err(|_| PinError::LinkNotPinnable {
            interface: interface.to_owned(),
        })?;
        // On failure the link is dropped, and with it the attachment.
        let link: FdLink = link
            .pin(&path)
            .map_err(|source| PinError::PinLink {
                path: path.clone(),
                source,
            })?
            .into();
        let info = link.info().map_err(|source| PinError::AdoptLink {
            path,
            source: source.into(),
        })?;
        self.link = Link::Pinned { _fd: link };
        Ok(Attachment {
            adopted: false,
            mode: Some(mode),
            link_id: info.id(),
            program_id: info.program_id(),
        })
    }

    /// Detaches the program (dropping an unpinned `DataPlane` does too). A pinned attachment is
    /// left alone: it stays until `lb detach` ([`super::pins::detach_interface`]) removes it.
    pub fn detach(&mut self) -> Result<(), DataPlaneError> {
        match std::mem::replace(&mut self.link, Link::None) {
            Link::None => {}
            Link::Local(link) => {
                self.attachment = None;
                self.program()
                    .detach(link)
                    .map_err(|source| DataPlaneError::Program {
                        name: PROGRAM_NAME,
                        source,
                    })?;
            }
            pinned @ Link::Pinned { .. } => {
                tracing::debug!("detach of a pinned attachment: left attached");
                self.link = pinned;
            }
        }
        Ok(())
    }
}

fn program(ebpf: &mut Ebpf) -> &mut Xdp {
    ebpf.program_mut(PROGRAM_NAME)
        .and_then(|p| <&mut Xdp>::try_from(p).ok())
        .expect("checked at load")
}

fn program_id(ebpf: &mut Ebpf) -> Result<u32, DataPlaneError> {
    program(ebpf)
        .info()
        .map(|info| info.id())
        .map_err(|source| DataPlaneError::Program {
            name: PROGRAM_NAME,
            source,
        })
}

/// A new attachment of the balancing program, owned by aya's program.
fn attach_new(
    ebpf: &mut Ebpf,
    interface: &str,
    ifindex: u32,
    mode: AttachMode,
) -> Result<XdpLinkId, DataPlaneError> {
    program(ebpf)
        .attach_to_if_index(ifindex, mode.xdp_mode())
        .map_err(|source| {
            // Another program (in any mode) already holds the interface.
            if matches!(
                super::error::os_error(&source),
                Some(libc::EEXIST | libc::EBUSY)
            ) {
                DataPlaneError::AlreadyAttached {
                    interface: interface.to_owned(),
                }
            } else {
                DataPlaneError::Attach {
                    interface: interface.to_owned(),
                    mode: mode.name(),
                    source,
                }
            }
        })
}

/// Takes over the XDP link pinned at `path` if it is still attached to `ifindex`, putting our
/// program in it. `Ok(None)` when there is no pinned link, or a defunct one (unpinned here).
fn adopt_link(
    ebpf: &mut Ebpf,
    path: &Path,
    ifindex: u32,
) -> Result<Option<FdLink>, DataPlaneError> {
    let facts = match pins::link::pinned_link_facts(path) {
        Ok(facts) => facts,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(PinError::AdoptLink {
                path: path.to_path_buf(),
                source: source.into(),
            }
            .into());
        }
    };
    match facts.xdp_ifindex {
        None => {
            return Err(PinError::NotXdpLink {
                path: path.to_path_buf(),
            }
            .into());
        }
        Some(linked) if linked != ifindex => {
            // The interface it was made for is gone (0) or another one has its name now.
            tracing::info!(
                "the XDP link pinned at {} is defunct (its interface is gone); attaching anew",
                path.display()
            );
            std::fs::remove_file(path).map_err(|source| PinError::Io {
                what: "removing the defunct link",
                path: path.to_path_buf(),
                source,
            })?;
            return Ok(None);
        }
        Some(_) => {}
    }
    let adopt_error = |source: Box<dyn std::error::Error + Send + Sync>| PinError::AdoptLink {
        path: path.to_path_buf(),
        source,
    };
    let link: FdLink = PinnedLink::from_pin(path)
        .map_err(|e| adopt_error(e.into()))?
        .into();
    let link = XdpLink::try_from(link).map_err(|e| adopt_error(e.into()))?;
    // BPF_LINK_UPDATE: the kernel swaps the link's program in one step.
    let program = program(ebpf);
    let id = program
        .attach_to_link(link)
        .map_err(|e| adopt_error(e.into()))?;
    // Out of aya's hands again, so dropping the program does not drop (close) it: we keep it.
    let link = program.take_link(id).map_err(|e| adopt_error(e.into()))?;
    let link = FdLink::try_from(link).map_err(|e| adopt_error(e.into()))?;
    Ok(Some(link))
}
