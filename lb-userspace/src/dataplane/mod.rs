//! Everything that touches the kernel: loading and attaching the XDP program, writing its maps.

pub mod error;
pub mod flow_events;
pub mod flows;
pub mod loader;
pub mod maps;
pub mod object;
pub mod pins;
pub mod ring;

pub use error::DataPlaneError;
pub use flow_events::FlowEvents;
pub use loader::{AttachMode, Attachment, Capacity, DataPlane, PinnedState};
pub use pins::{DetachReport, PinDir, PinError, detach_interface};
