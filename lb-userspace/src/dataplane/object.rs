//! The XDP object embedded at build time.

/// Aligned wrapper so the ELF parser can read the embedded bytes in place.
#[repr(C, align(32))]
pub struct Aligned<T: ?Sized>(pub T);

/// The bytes of `lb-ebpf`'s ELF object (empty when built with `AYA_BUILD_SKIP=1`).
pub static OBJECT: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/lb-ebpf")));

/// The benchmarks' reference programs (`lb-ebpf/src/bench.rs`): pass, reflect, drop, generate.
pub static BENCH_OBJECT: &Aligned<[u8]> =
    &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/lb-bench-progs")));

impl Aligned<[u8]> {
    pub fn as_slice(&'static self) -> &'static [u8] {
        &self.0
    }
}
