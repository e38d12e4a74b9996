//! `cargo xtask setup`: install what is missing, one checked step at a time.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd::{self, EBPF_TOOLCHAIN_ENV};
use crate::{apt, toolchain, vm};

const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_SERIES: &str = "0.13.";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPFFS: &str = "/sys/fs/bpf";
/// Commands the tests and the demo use (checked by name where we cannot install them).
const TOOL_COMMANDS: &[&str] = &[
    "ip",
    "ethtool",
    "nft",
    "ping",
    "ps",
    "bird",
    "birdc",
    "keepalived",
    "dig",
];

/// Runs every set-up step and returns the eBPF toolchain to build with.
pub fn run() -> Result<String> {
    let toolchain = toolchain::choose();
    let distro = toolchain == toolchain::DISTRO;
    if apt::is_debian_like() {
        apt::ensure(&apt::wanted(distro))?;
    } else {
        check_non_debian()?;
    }
    if distro {
        toolchain::ensure_distro_link()?;
    }
    toolchain::verify(&toolchain)?;
    ensure_bpf_linker()?;
    ensure_bpffs()?;
    if apt::is_debian_like() {
        vm::ensure_guest()?;
    } else {
        println!(
            "skip: the VM tests' guest kernel (Debian's linux-image, DESIGN §9) is prepared only \
             on Debian-like systems; `cargo xtask test --vm` will say it is missing"
        );
    }
    println!(
        "ok: set-up complete; cargo commands run by xtask get {EBPF_TOOLCHAIN_ENV}={toolchain} \
         (export it for plain cargo builds)"
    );
    Ok(toolchain)
}

/// Without apt we cannot install: go on only if everything is already there.
fn check_non_debian() -> Result<()> {
    let missing: Vec<_> = TOOL_COMMANDS.iter().filter(|c| !cmd::on_path(c)).collect();
    let linker_ok = bpf_linker_version().is_some_and(|v| v.starts_with(BPF_LINKER_SERIES));
    if missing.is_empty() && linker_ok {
        println!("ok: not Debian-like, but the network tools and bpf-linker are present");
        return Ok(());
    }
    bail!(
        "this is not a Debian-like system (no apt-get or /etc/debian_version), so setup cannot \
         install for you{}. Install with your package manager:\n\
         \x20 - iproute2 (ip), ethtool, nftables (nft), iputils ping, procps (ps, sysctl), and bpftool if available\n\
         \x20 - BIRD 2 (bird, birdc) and keepalived, for the multi-node tests and the demo\n\
         \x20 - dig (bind9-dnsutils or bind-utils), for the DNS tests\n\
         \x20 - LLVM 22 development files (llvm-config, libLLVM, Polly) and zstd development files\n\
         \x20 - a Rust toolchain built on LLVM 22 with rust-src, reachable through rustup: a nightly \
         (`rustup component add rust-src --toolchain nightly`), or rustc >= 1.96 from your distribution \
         linked with `rustup toolchain link distro <prefix>`\n\
         \x20 - bpf-linker {BPF_LINKER_VERSION}: `PATH=<llvm-22>/bin:$PATH LLVM_SYS_221_PREFIX=<llvm-22> \
         cargo install --locked bpf-linker@{BPF_LINKER_VERSION} --no-default-features --features llvm-22`\n\
         then run `cargo xtask setup` again",
        if missing.is_empty() {
            String::new()
        } else {
            format!(
                " (missing commands: {})",
                missing.iter().map(|c| **c).collect::<Vec<_>>().join(", ")
            )
        }
    );
}

/// Installs bpf-linker 0.13 against LLVM 22 unless it is on PATH already.
fn ensure_bpf_linker() -> Result<()> {
    let found = bpf_linker_version();
    if let Some(version) = found
        .as_deref()
        .filter(|v| v.starts_with(BPF_LINKER_SERIES))
    {
        println!("ok: bpf-linker {version} present");
        return Ok(());
    }
    let llvm_config = Path::new(LLVM_PREFIX).join("bin/llvm-config");
    if !llvm_config.is_file() {
        bail!(
            "bpf-linker needs LLVM 22 to build and {} is missing: install llvm-22-dev libpolly-22-dev libzstd-dev",
            llvm_config.display()
        );
    }
    let mut install = bpf_linker_install();
    let was = found.map_or("not on PATH".to_owned(), |v| format!("found {v}"));
    println!(
        "installing: {} ({was}; about a minute)",
        cmd::display(&install)
    );
    cmd::run(&mut install).context("building bpf-linker failed: see cargo's output above")?;
    match bpf_linker_version() {
        Some(v) if v.starts_with(BPF_LINKER_SERIES) => Ok(()),
        other => bail!(
            "bpf-linker {BPF_LINKER_VERSION} was installed but `bpf-linker --version` gives {}: \
             put cargo's bin directory (~/.cargo/bin) first on PATH",
            other.unwrap_or_else(|| "nothing (not on PATH)".to_owned())
        ),
    }
}

fn bpf_linker_install() -> Command {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut llvm_first = std::ffi::OsString::from(format!("{LLVM_PREFIX}/bin:"));
    llvm_first.push(path);
    let mut install = Command::new(cmd::cargo_program());
    install
        .env("PATH", llvm_first)
        .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
        .args(["install", "--locked"])
        .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
        .args(["--no-default-features", "--features", "llvm-22"]);
    install
}

/// The version `bpf-linker --version` reports (`bpf-linker 0.13.0` → `0.13.0`).
fn bpf_linker_version() -> Option<String> {
    let out = cmd::probe(Command::new("bpf-linker").arg("--version"))?;
    out.split_whitespace().nth(1).map(str::to_owned)
}

/// Mounts bpffs on /sys/fs/bpf unless it is mounted (pinned maps and links live there).
fn ensure_bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    if is_bpffs_mounted(&mounts) {
        println!("ok: bpffs mounted on {BPFFS}");
        return Ok(());
    }
    let mut mount = Command::new("mount");
    mount.args(["-t", "bpf", "bpf", BPFFS]);
    cmd::require_root("mounting bpffs", &[cmd::display(&mount)])?;
    println!("mounting: {}", cmd::display(&mount));
    cmd::run(&mut mount)
}

fn is_bpffs_mounted(mounts: &str) -> bool {
    mounts.lines().any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        fields.next() == Some(BPFFS) && fields.next() == Some("bpf")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpffs_detection() {
        let mounts = "sysfs /sys sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw,relatime 0 0\n";
        assert!(is_bpffs_mounted(mounts));
        assert!(!is_bpffs_mounted(
            "sysfs /sys sysfs rw 0 0\nnone /sys/fs/bpf tmpfs rw 0 0\n"
        ));
    }
}
