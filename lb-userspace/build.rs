//! Builds the XDP program (`lb-ebpf`) for `bpfel-unknown-none` and leaves the object in OUT_DIR,
//! where `src/dataplane/object.rs` embeds it.
//!
//! The eBPF build needs a toolchain with rust-src and a bpf-linker matching its LLVM
//! (`cargo xtask setup` installs both; see DESIGN.md §2). `LB_EBPF_TOOLCHAIN` names the rustup
//! toolchain to use (default `distro`: Debian's rustc-web linked with
//! `rustup toolchain link distro /usr`); `AYA_BUILD_SKIP=1` skips the build (the embedded object
//! is then empty and loading fails with a clear error).

use std::env;

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=LB_EBPF_TOOLCHAIN");
    println!("cargo:rerun-if-changed=../lb-common");
    let toolchain = env::var("LB_EBPF_TOOLCHAIN").unwrap_or_else(|_| "distro".to_owned());

    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        let out_dir = env::var("OUT_DIR").context("OUT_DIR not set")?;
        for object in ["lb-ebpf", "lb-bench-progs"] {
            std::fs::write(format!("{out_dir}/{object}"), b"").context("writing empty object")?;
        }
    }

    // The distro toolchain is a stable rustc; `-Z build-std=core` needs unstable features, which
    // RUSTC_BOOTSTRAP=1 unlocks (how the Linux kernel builds its Rust, too). Scoped to the nested
    // eBPF build: aya-build passes our environment to it.
    // SAFETY: build scripts are single-threaded; nothing reads the environment concurrently.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };

    let package = Package {
        name: "lb-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::Custom(&toolchain)).with_context(|| {
        format!(
            "building the XDP program with toolchain `{toolchain}` failed; \
             run `cargo xtask setup` (it installs rust-src and bpf-linker)"
        )
    })
}
