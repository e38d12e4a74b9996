//! The Rust toolchain that builds the eBPF crate: it needs rust-src (for `-Z build-std=core`)
//! and an LLVM that bpf-linker (built with LLVM 22) can read.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::apt::major_minor;
use crate::cmd::{self, EBPF_TOOLCHAIN_ENV};

/// Debian's rustc-web, linked into rustup under this name.
pub const DISTRO: &str = "distro";
pub const NIGHTLY: &str = "nightly";
/// The LLVM major version bpf-linker is built against.
pub const LLVM_MAJOR: u32 = 22;
const DISTRO_PREFIX: &str = "/usr";
const DISTRO_MIN_RUSTC: (u32, u32) = (1, 96);
const RUST_SRC: &str = "lib/rustlib/src/rust/library";

/// Picks the eBPF toolchain: `LB_EBPF_TOOLCHAIN` if set, else a rustup nightly that has
/// rust-src, else Debian's toolchain linked as `distro`.
pub fn choose() -> String {
    if let Some(name) = env::var(EBPF_TOOLCHAIN_ENV).ok().filter(|n| !n.is_empty()) {
        println!("ok: eBPF toolchain `{name}` chosen by {EBPF_TOOLCHAIN_ENV}");
        return name;
    }
    if rustup_sysroot(NIGHTLY).is_some_and(|sysroot| has_rust_src(&sysroot)) {
        println!(
            "ok: rustup nightly has rust-src: eBPF toolchain `nightly` (no Debian rustc needed)"
        );
        return NIGHTLY.to_owned();
    }
    println!("ok: no rustup nightly with rust-src: eBPF toolchain `distro` (Debian's rustc-web)");
    DISTRO.to_owned()
}

/// Links Debian's toolchain into rustup as `distro` unless it is there already.
pub fn ensure_distro_link() -> Result<()> {
    if rustup_toolchains()?.iter().any(|t| t == DISTRO) {
        println!("ok: rustup toolchain `{DISTRO}` linked");
        return Ok(());
    }
    let rustc = Path::new(DISTRO_PREFIX).join("bin/rustc");
    let info = RustcInfo::of(Command::new(&rustc).arg("-vV")).with_context(|| {
        format!(
            "{} is missing: install rustc-web cargo-web rust-web-src",
            rustc.display()
        )
    })?;
    let new_enough = major_minor(&info.release).is_some_and(|v| v >= DISTRO_MIN_RUSTC);
    if !new_enough || !has_rust_src(Path::new(DISTRO_PREFIX)) {
        bail!(
            "{} is rustc {} {}: the eBPF build needs rustc >= 1.96 with rust-src; run \
             `apt-get update && apt-get install -y rustc-web cargo-web rust-web-src` (from bookworm-security)",
            rustc.display(),
            info.release,
            if has_rust_src(Path::new(DISTRO_PREFIX)) {
                "with rust-src"
            } else {
                "without rust-src"
            },
        );
    }
    let mut link = Command::new("rustup");
    link.args(["toolchain", "link", DISTRO, DISTRO_PREFIX]);
    println!("linking: {} (rustc {})", cmd::display(&link), info.release);
    cmd::run(&mut link)
}

/// Checks that `toolchain` runs, has rust-src, and has an LLVM bpf-linker can read.
pub fn verify(toolchain: &str) -> Result<()> {
    let info = RustcInfo::of(rustup_run(toolchain).arg("-vV")).with_context(|| {
        format!(
            "rustup cannot run toolchain `{toolchain}`: install it with `rustup toolchain install \
             {toolchain} --component rust-src`, or choose another with {EBPF_TOOLCHAIN_ENV} \
             (unset, it is `nightly` when that has rust-src, else Debian's `{DISTRO}`)"
        )
    })?;
    let sysroot = rustup_sysroot(toolchain)
        .with_context(|| format!("`rustup run {toolchain} rustc --print sysroot` failed"))?;
    if !has_rust_src(&sysroot) {
        bail!(
            "toolchain `{toolchain}` has no rust-src ({} is missing): the eBPF build needs it; \
             for a rustup toolchain run `rustup component add rust-src --toolchain {toolchain}`",
            sysroot.join(RUST_SRC).display()
        );
    }
    let llvm = info.llvm_major.unwrap_or(0);
    if llvm > LLVM_MAJOR {
        bail!(
            "toolchain `{toolchain}` uses LLVM {llvm}, newer than bpf-linker's LLVM {LLVM_MAJOR}: \
             bpf-linker could not read its bitcode; choose another one with {EBPF_TOOLCHAIN_ENV}"
        );
    }
    let note = if llvm < LLVM_MAJOR {
        " (older than bpf-linker's, usually fine)"
    } else {
        ""
    };
    println!(
        "ok: eBPF toolchain `{toolchain}`: rustc {}, LLVM {}{note}, rust-src present",
        info.release, info.llvm
    );
    Ok(())
}

/// What `rustc -vV` says about itself.
struct RustcInfo {
    release: String,
    llvm: String,
    llvm_major: Option<u32>,
}

impl RustcInfo {
    fn of(rustc_vv: &mut Command) -> Result<Self> {
        let text =
            cmd::probe(rustc_vv).with_context(|| format!("`{}` failed", cmd::display(rustc_vv)))?;
        let field = |key: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(key))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        let llvm = field("LLVM version:");
        let llvm_major = llvm.split('.').next().and_then(|m| m.parse().ok());
        Ok(Self {
            release: field("release:"),
            llvm,
            llvm_major,
        })
    }
}

fn rustup_run(toolchain: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", toolchain, "rustc"]);
    cmd
}

fn rustup_sysroot(toolchain: &str) -> Option<PathBuf> {
    cmd::probe(rustup_run(toolchain).args(["--print", "sysroot"])).map(PathBuf::from)
}

fn has_rust_src(sysroot: &Path) -> bool {
    sysroot.join(RUST_SRC).is_dir()
}

/// Names of rustup's toolchains (first word of each line of `rustup toolchain list`).
fn rustup_toolchains() -> Result<Vec<String>> {
    let text = cmd::probe(Command::new("rustup").args(["toolchain", "list"])).context(
        "`rustup toolchain list` failed: the eBPF build picks its toolchain through rustup; \
         install rustup (https://rustup.rs)",
    )?;
    Ok(text
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}
