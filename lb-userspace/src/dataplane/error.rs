//! Errors of the data-plane layer.

use aya::{EbpfError, maps::MapError, programs::ProgramError};

#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    #[error(
        "this lb was built without its XDP program (AYA_BUILD_SKIP); rebuild after `cargo xtask setup`"
    )]
    NoObject,
    #[error("loading the XDP object failed: {0}")]
    Load(#[source] EbpfError),
    #[error("the XDP object has no map `{0}`: it was built from a different map layout")]
    MissingMap(&'static str),
    #[error("the XDP object has no program `{0}`")]
    MissingProgram(&'static str),
    #[error("reading or pruning FLOWS in batches: {0}")]
    FlowBatch(#[source] std::io::Error),
    #[error("map `{name}`: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("program `{name}`: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching XDP to {interface} in {mode} mode failed: {source}")]
    Attach {
        interface: String,
        mode: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error(
        "{interface} already has an XDP program attached (another `lb run` on it?); \
         stop that one (its program goes with it), or remove a leftover one with \
         `ip link set dev {interface} xdp off`"
    )]
    AlreadyAttached { interface: String },
    #[error("reading the possible CPUs (/sys/devices/system/cpu/possible): {0}")]
    PossibleCpus(#[source] std::io::Error),
    /// Boxed: pin errors carry paths and messages, and every map write returns this type.
    #[error(transparent)]
    Pins(Box<super::pins::PinError>),
    #[error("memory-mapping map `RINGS` failed: {0}")]
    RingMmap(#[source] std::io::Error),
    #[error("the flow-event reader was already taken (there is one per data plane)")]
    FlowEventsTaken,
    #[error("registering FLOW_EVENTS with the tokio reactor: {0}")]
    FlowEventsPoll(#[source] std::io::Error),
    #[error("{what} {index} is out of range (capacity {capacity})")]
    OutOfRange {
        what: &'static str,
        index: u32,
        capacity: u32,
    },
}

impl From<super::pins::PinError> for DataPlaneError {
    fn from(error: super::pins::PinError) -> Self {
        Self::Pins(Box::new(error))
    }
}

pub(crate) fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DataPlaneError {
    move |source| DataPlaneError::Map { name, source }
}

/// The OS error at the bottom of an error's source chain, if there is one.
pub(crate) fn os_error(error: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(code) = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
        {
            return Some(code);
        }
        current = e.source();
    }
    None
}
