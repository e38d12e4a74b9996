//! The `lb` daemon's library: config, Maglev, the data-plane loader and map writer.

pub mod announce;
pub mod api;
pub mod balancer;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod decap;
pub mod dns;
pub mod health;
pub mod http_server;
pub mod maglev;
pub mod metrics;
pub mod net;
pub mod pool;
pub mod stats;
pub mod sync;
#[cfg(test)]
pub(crate) mod testing;

/// The compiled XDP object (built by build.rs for bpfel-unknown-none).
pub fn ebpf_object() -> &'static [u8] {
    dataplane::object::OBJECT.as_slice()
}

/// The benchmarks' reference XDP programs: `bench_pass`, `bench_reflect`, `bench_drop`,
/// `bench_gen`, and their `BENCH_COUNTERS` map.
pub fn bench_object() -> &'static [u8] {
    dataplane::object::BENCH_OBJECT.as_slice()
}
