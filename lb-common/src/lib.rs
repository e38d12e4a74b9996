//! Everything that crosses the kernel/user boundary: map names, map key and value layouts, flag
//! bits, drop/pass reasons and the flow hash. One definition used by both `lb-ebpf` and
//! `lb-userspace`, so the two sides cannot disagree about a byte.
//!
//! Every struct is `#[repr(C)]` with explicit padding (the kernel compares keys byte for byte, so
//! no byte may be left undefined), and its size is asserted at compile time.
#![no_std]

pub mod decap;
pub mod hash;
pub mod maps;
pub mod reason;

pub use hash::{
    flow_hash, ring_index, ring_size_inverse, vip_index_slot, vip_index_slot_of, vip_key_tail,
};
pub use maps::*;
pub use reason::Reason;
