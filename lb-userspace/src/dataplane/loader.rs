//! Loading the XDP object with the capacities chosen in the config, and attaching it.

use aya::{
    Ebpf, EbpfLoader,
    programs::{Xdp, XdpMode, xdp::XdpLinkId},
};
use lb_common::{
    GLOBAL_RING_SIZE, MAP_BACKEND_STATS, MAP_BACKENDS, MAP_FLOWS, MAP_RINGS, MAP_TX_PORTS,
    MAP_VIP_STATS, MAP_VIPS,
};

use super::{error::DataPlaneError, maps::Maps};

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

/// The loaded program and its maps. Dropping it detaches the program.
pub struct DataPlane {
    ebpf: Ebpf,
    pub maps: Maps,
    pub capacity: Capacity,
    link: Option<XdpLinkId>,
}

impl DataPlane {
    /// Loads the embedded object with `capacity` and verifies the program.
    pub fn load(capacity: Capacity) -> Result<Self, DataPlaneError> {
        Self::load_object(crate::ebpf_object(), capacity)
    }

    pub fn load_object(object: &[u8], capacity: Capacity) -> Result<Self, DataPlaneError> {
        if object.is_empty() {
            return Err(DataPlaneError::NoObject);
        }
        let Capacity {
            ring_size,
            max_vips,
            max_backends,
            flow_table_size,
        } = capacity;
        let ring_tables = max_vips * 2;
        let mut ebpf = EbpfLoader::new()
            .override_global(GLOBAL_RING_SIZE, &ring_size, true)
            .map_max_entries(MAP_VIPS, max_vips)
            .map_max_entries(MAP_VIP_STATS, max_vips)
            .map_max_entries(MAP_RINGS, ring_tables * ring_size)
            .map_max_entries(MAP_BACKENDS, max_backends)
            .map_max_entries(MAP_BACKEND_STATS, max_backends)
            .map_max_entries(MAP_TX_PORTS, max_backends)
            .map_max_entries(MAP_FLOWS, flow_table_size)
            .load(object)
            .map_err(DataPlaneError::Load)?;
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
            link: None,
        })
    }

    /// The balancing program (for attaching, or running it with `BPF_PROG_TEST_RUN`).
    pub fn program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROGRAM_NAME)
            .and_then(|p| <&mut Xdp>::try_from(p).ok())
            .expect("checked at load")
    }

    /// Attaches the balancing program to `interface` (`ifindex`) in `mode`.
    pub fn attach(
        &mut self,
        interface: &str,
        ifindex: u32,
        mode: AttachMode,
    ) -> Result<(), DataPlaneError> {
        let link = self
            .program()
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
            })?;
        self.link = Some(link);
        Ok(())
    }

    /// Detaches the program (dropping `DataPlane` does too).
    pub fn detach(&mut self) -> Result<(), DataPlaneError> {
        if let Some(link) = self.link.take() {
            self.program()
                .detach(link)
                .map_err(|source| DataPlaneError::Program {
                    name: PROGRAM_NAME,
                    source,
                })?;
        }
        Ok(())
    }
}
