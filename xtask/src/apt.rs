//! Debian packages: what is installed (dpkg-query), what can be installed (apt-cache policy),
//! and installing only what is missing.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

use crate::cmd;

/// A Debian package the project needs.
#[derive(Debug)]
pub struct Package {
    pub name: &'static str,
    /// Skipped with a note when the archive has no version of it.
    pub optional: bool,
    /// Lowest acceptable `major.minor` version (the Rust packages must be the 1.96 ones).
    pub min_version: Option<(u32, u32)>,
}

const fn pkg(name: &'static str) -> Package {
    Package {
        name,
        optional: false,
        min_version: None,
    }
}

/// Network tools the tests and the demo use.
const TOOLS: &[Package] = &[
    pkg("iproute2"),
    pkg("ethtool"),
    pkg("nftables"),
    pkg("iputils-ping"),
    pkg("procps"),
    // `setpriv`: the least-privilege test runs lb with only the unit's capabilities.
    pkg("util-linux"),
    // The multi-node tests and demo: BGP (with BFD) and VRRP engines.
    pkg("bird2"),
    pkg("keepalived"),
    // The DNS tests (issue 14) query lb's responder with a real resolver tool, `dig`.
    pkg("bind9-dnsutils"),
    Package {
        name: "bpftool",
        optional: true,
        min_version: None,
    },
];

/// The guest kernel under qemu (the interop tests with a real kernel's ipip and fou, issue 13):
/// the emulator, a static busybox for the initramfs, depmod/modprobe, cpio, and xz to extract
/// `vmlinux` from the bzImage.
const VM: &[Package] = &[
    pkg("qemu-system-x86"),
    pkg("busybox-static"),
    pkg("kmod"),
    pkg("cpio"),
    pkg("xz-utils"),
];

/// What `cargo install bpf-linker --features llvm-22` builds against.
const LLVM: &[Package] = &[
    pkg("llvm-22-dev"),
    pkg("libpolly-22-dev"),
    pkg("libzstd-dev"),
];

/// rustc 1.96 with rust-src, from bookworm-security.
const RUST: &[Package] = &[
    rust_web("rustc-web"),
    rust_web("cargo-web"),
    rust_web("rust-web-src"),
];

const fn rust_web(name: &'static str) -> Package {
    Package {
        name,
        optional: false,
        min_version: Some((1, 96)),
    }
}

/// Whether this is a Debian-like system we can install on.
pub fn is_debian_like() -> bool {
    cmd::on_path("apt-get") && Path::new("/etc/debian_version").exists()
}

/// The packages needed; the Rust ones only when the eBPF toolchain is Debian's.
pub fn wanted(distro_toolchain: bool) -> Vec<&'static Package> {
    let rust = if distro_toolchain { RUST } else { &[] };
    TOOLS.iter().chain(VM).chain(LLVM).chain(rust).collect()
}

/// Installs whichever of `packages` are missing or too old.
pub fn ensure(packages: &[&'static Package]) -> Result<()> {
    let missing = missing(packages)?;
    if missing.is_empty() {
        println!("ok: Debian packages installed: {}", names(packages));
        return Ok(());
    }
    println!("missing: Debian packages {}", names(&missing));
    // An optional package the apt sources do not have is no reason to update or to need root.
    let needed = skip_unavailable_optional(&missing, &apt_candidates(&missing)?);
    if needed.is_empty() {
        return Ok(());
    }
    let wanted = names(&needed);
    cmd::require_root(
        "installing Debian packages",
        &[
            "apt-get update".to_owned(),
            format!("apt-get install -y {wanted}"),
        ],
    )?;
    let installable = installable(&needed)?;
    if !installable.is_empty() {
        install(&installable)?;
    }
    check_installed(&installable)
}

/// Which of `packages` are not installed, or installed in a version below their minimum.
fn missing(packages: &[&'static Package]) -> Result<Vec<&'static Package>> {
    let mut query = Command::new("dpkg-query");
    query
        .arg("-W")
        .arg("-f=${Package}\t${Status}\t${Version}\n")
        .args(packages.iter().map(|p| p.name));
    // dpkg-query exits 1 when it knows nothing of a package: stdout still lists the others.
    let out = cmd::capture(&mut query)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let installed: HashMap<&str, &str> = stdout
        .lines()
        .filter_map(|line| {
            let mut fields = line.split('\t');
            let (name, status, version) = (fields.next()?, fields.next()?, fields.next()?);
            let is_installed = status.split_whitespace().nth(2) == Some("installed");
            is_installed.then_some((name, version))
        })
        .collect();
    Ok(packages
        .iter()
        .copied()
        .filter(|p| !installed.get(p.name).is_some_and(|v| p.accepts(v)))
        .collect())
}

/// The `needed` packages apt can install, after one `apt-get update` if some had no
/// suitable candidate. Optional ones still without a candidate are skipped; required ones fail.
fn installable(needed: &[&'static Package]) -> Result<Vec<&'static Package>> {
    let lacking = without_candidate(needed, &apt_candidates(needed)?);
    if lacking.is_empty() {
        return Ok(needed.to_vec());
    }
    println!(
        "updating: apt-get update (no suitable candidate yet for {})",
        names(&lacking)
    );
    cmd::run(apt_get().arg("update"))?;
    let candidates = apt_candidates(needed)?;
    let installable = skip_unavailable_optional(needed, &candidates);
    let required = without_candidate(&installable, &candidates);
    if !required.is_empty() {
        bail!(
            "apt has no installable version of {}: the LLVM 22 and rustc 1.96 (rustc-web) packages \
             come from Debian's security suite; add `bookworm-security` (URI \
             http://deb.debian.org/debian-security, component main) to /etc/apt/sources.list.d/ \
             and run `cargo xtask setup` again",
            names(&required)
        );
    }
    Ok(installable)
}

/// `packages` without the optional ones that have no candidate (each skipped with a note).
fn skip_unavailable_optional(
    packages: &[&'static Package],
    candidates: &HashMap<String, String>,
) -> Vec<&'static Package> {
    let unavailable = without_candidate(packages, candidates);
    let (skipped, kept): (Vec<&Package>, Vec<&Package>) = packages
        .iter()
        .copied()
        .partition(|p| p.optional && unavailable.iter().any(|u| u.name == p.name));
    for p in skipped {
        println!(
            "skip: {} (optional) has no install candidate in the apt sources",
            p.name
        );
    }
    kept
}

fn without_candidate(
    packages: &[&'static Package],
    candidates: &HashMap<String, String>,
) -> Vec<&'static Package> {
    packages
        .iter()
        .copied()
        .filter(|p| !candidates.get(p.name).is_some_and(|v| p.accepts(v)))
        .collect()
}

/// Package name → candidate version, from `apt-cache policy` (absent: none).
fn apt_candidates(packages: &[&'static Package]) -> Result<HashMap<String, String>> {
    let mut policy = Command::new("apt-cache");
    policy.arg("policy").args(packages.iter().map(|p| p.name));
    let out = cmd::capture(&mut policy)?;
    Ok(parse_policy(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_policy(text: &str) -> HashMap<String, String> {
    let mut candidates = HashMap::new();
    let mut current = None;
    for line in text.lines() {
        if !line.starts_with(' ') {
            current = line.strip_suffix(':').map(str::to_owned);
        } else if let (Some(name), Some(version)) =
            (&current, line.trim().strip_prefix("Candidate: "))
            && version != "(none)"
        {
            candidates.insert(name.clone(), version.to_owned());
        }
    }
    candidates
}

fn install(packages: &[&'static Package]) -> Result<()> {
    let mut install = apt_get();
    install
        .args(["install", "-y"])
        .args(packages.iter().map(|p| p.name));
    println!("installing: {}", cmd::display(&install));
    cmd::run(&mut install)
}

fn check_installed(installed: &[&'static Package]) -> Result<()> {
    let still = missing(installed)?;
    if !still.is_empty() {
        bail!(
            "apt-get install finished but {} are still missing or too old: check `apt-cache policy {}`",
            names(&still),
            names(&still)
        );
    }
    Ok(())
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

fn names(packages: &[&'static Package]) -> String {
    packages
        .iter()
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(" ")
}

impl Package {
    /// Whether a Debian version string satisfies this package's minimum.
    fn accepts(&self, version: &str) -> bool {
        match self.min_version {
            None => true,
            Some(min) => major_minor(version).is_some_and(|v| v >= min),
        }
    }
}

/// `major.minor` of a Debian version such as `1:22.1.8-1~deb12u1` or `1.96.0+dfsg1-1`.
pub fn major_minor(version: &str) -> Option<(u32, u32)> {
    let upstream = version.split_once(':').map_or(version, |(_, rest)| rest);
    let mut parts = upstream.split('.').map(|part| {
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().ok()
    });
    Some((parts.next()??, parts.next()??))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(major_minor("1:22.1.8-1~deb12u1"), Some((22, 1)));
        assert_eq!(major_minor("1.96.0+dfsg1-1~deb12u2"), Some((1, 96)));
        assert_eq!(major_minor("garbage"), None);
        assert!(rust_web("rustc-web").accepts("1.96.0+dfsg1-1~deb12u2"));
        assert!(!rust_web("rustc-web").accepts("1.85.0+dfsg3-1~deb12u3"));
    }

    #[test]
    fn policy() {
        let text = "rustc-web:\n  Installed: (none)\n  Candidate: 1.96.0+dfsg1-1~deb12u2\n  \
                    Version table:\n     1.85.0+dfsg3-1~deb12u3 500\nbpftool:\n  Installed: (none)\n  \
                    Candidate: (none)\n";
        let candidates = parse_policy(text);
        assert_eq!(
            candidates.get("rustc-web").map(String::as_str),
            Some("1.96.0+dfsg1-1~deb12u2")
        );
        assert!(!candidates.contains_key("bpftool"));
    }
}
