//! The `lb` daemon's library: config, Maglev, the data-plane loader and map writer.

pub mod balancer;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod health;
pub mod maglev;
pub mod net;
pub mod pool;
pub mod stats;

/// The compiled XDP object (built by build.rs for bpfel-unknown-none).
pub fn ebpf_object() -> &'static [u8] {
    dataplane::object::OBJECT.as_slice()
}
