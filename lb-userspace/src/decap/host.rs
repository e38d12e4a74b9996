//! The host set-up decapsulation needs, done for the operator and undone exactly:
//!
//! - each VIP on `lo` (`/32` or `/128`, `noprefixroute`), so the stack takes the inner packet as
//!   its own;
//! - reverse-path filtering loose (2) on the interface and on `all`, each only where it was
//!   strict (1): the inner packet's source (the client) is not routed back through the interface
//!   it arrived on (the kernel uses the larger of `all` and the interface's value).
//!
//! Every change is recorded in the instance's pin directory as a symlink (bpffs holds pins,
//! directories and symlinks, no regular files, and refuses names with a dot):
//! `host_lo_<address, dots as _>` → the address, `host_rp_filter_if` / `host_rp_filter_all` →
//! `<conf name>=<old value>`. `lb decap --detach` undoes what the records say and
//! nothing else; an address that was on `lo` already, or a value that was not strict, is not
//! recorded and so never touched.

use std::{
    collections::BTreeSet,
    fs, io,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
};

use super::DecapError;

const LO_PREFIX: &str = "host_lo_";
const RP_FILTER_PREFIX: &str = "host_rp_filter_";

/// The record's name for an address on lo (bpffs refuses dots in names).
fn lo_record(address: IpAddr) -> String {
    format!("{LO_PREFIX}{}", address.to_string().replace('.', "_"))
}

/// The record's name for the rp_filter of the interface (`if`) or `all`.
fn rp_filter_record(conf: &str) -> String {
    let which = if conf == "all" { "all" } else { "if" };
    format!("{RP_FILTER_PREFIX}{which}")
}

/// What `lb decap` changed on the host, as recorded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostChanges {
    /// Addresses `lb decap` put on `lo`.
    pub lo_addresses: BTreeSet<IpAddr>,
    /// `(interface or "all", old value)` of each rp_filter set to loose.
    pub rp_filter: Vec<(String, String)>,
}

/// Reads the records in `dir`.
pub fn recorded(dir: &Path) -> Result<HostChanges, DecapError> {
    let mut changes = HostChanges::default();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(changes),
        Err(source) => return Err(io_error("listing", dir, source)),
    };
    for entry in entries {
        let entry = entry.map_err(|source| io_error("listing", dir, source))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(LO_PREFIX) && !name.starts_with(RP_FILTER_PREFIX) {
            continue;
        }
        let target = fs::read_link(entry.path())
            .map_err(|source| io_error("reading", &entry.path(), source))?;
        let target = target.to_string_lossy();
        if name.starts_with(LO_PREFIX) {
            if let Ok(address) = target.parse() {
                changes.lo_addresses.insert(address);
            }
        } else if let Some((conf, old)) = target.rsplit_once('=') {
            changes.rp_filter.push((conf.to_owned(), old.to_owned()));
        }
    }
    changes.rp_filter.sort();
    Ok(changes)
}

fn io_error(what: &'static str, path: &Path, source: io::Error) -> DecapError {
    DecapError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn record(dir: &Path, name: &str, value: &str) -> Result<(), DecapError> {
    let path = dir.join(name);
    match std::os::unix::fs::symlink(value, &path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(io_error("recording a host change in", &path, source)),
    }
}

fn forget(dir: &Path, name: &str) -> Result<(), DecapError> {
    let path = dir.join(name);
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(io_error("removing", &path, source)),
    }
}

/// Makes `lo` carry exactly `vips` among the addresses `lb decap` added (adding what is missing,
/// removing what it added before and is no longer wanted), recording each change in `dir`.
/// Returns (added, removed).
pub fn sync_lo(
    dir: &Path,
    vips: &BTreeSet<IpAddr>,
) -> Result<(Vec<IpAddr>, Vec<IpAddr>), DecapError> {
    let ours = recorded(dir)?.lo_addresses;
    let present = lo_addresses()?;
    let mut added = Vec::new();
    for &vip in vips {
        if present.contains(&vip) {
            continue;
        }
        // Record first: a crash between the two leaves a record for an address that is not
        // there, which `--detach` tolerates; the other order would leave an address nobody
        // removes.
        record(dir, &lo_record(vip), &vip.to_string())?;
        ip(&[
            "addr",
            "add",
            &format!("{vip}/{}", full_prefix(vip)),
            "dev",
            "lo",
            "noprefixroute",
        ])?;
        added.push(vip);
    }
    let mut removed = Vec::new();
    for &address in ours.difference(vips) {
        remove_lo_address(address, &present)?;
        forget(dir, &lo_record(address))?;
        removed.push(address);
    }
    Ok((added, removed))
}

fn remove_lo_address(address: IpAddr, present: &BTreeSet<IpAddr>) -> Result<(), DecapError> {
    if present.contains(&address) {
        ip(&[
            "addr",
            "del",
            &format!("{address}/{}", full_prefix(address)),
            "dev",
            "lo",
        ])?;
    }
    Ok(())
}

fn full_prefix(address: IpAddr) -> u8 {
    if address.is_ipv4() { 32 } else { 128 }
}

/// The addresses on `lo` now.
pub fn lo_addresses() -> Result<BTreeSet<IpAddr>, DecapError> {
    let output = ip(&["-o", "addr", "show", "dev", "lo"])?;
    // `1: lo    inet 127.0.0.1/8 scope host lo\ ...`: the word after `inet`/`inet6`.
    Ok(output
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "inet" || *w == "inet6")?;
            words.next()?.split('/').next()?.parse().ok()
        })
        .collect())
}

fn rp_filter_path(interface: &str) -> PathBuf {
    PathBuf::from(format!("/proc/sys/net/ipv4/conf/{interface}/rp_filter"))
}

/// Sets rp_filter loose on `interface` and on `all` where it is strict, recording the old
/// values. Returns the names changed.
pub fn loosen_rp_filter(dir: &Path, interface: &str) -> Result<Vec<String>, DecapError> {
    let mut changed = Vec::new();
    for name in [interface, "all"] {
        let path = rp_filter_path(name);
        let old = fs::read_to_string(&path).map_err(|source| io_error("reading", &path, source))?;
        let old = old.trim();
        if old != "1" {
            continue;
        }
        record(dir, &rp_filter_record(name), &format!("{name}={old}"))?;
        fs::write(&path, "2").map_err(|source| io_error("writing", &path, source))?;
        changed.push(name.to_owned());
    }
    Ok(changed)
}

/// Undoes every recorded change and removes its record.
pub fn undo(dir: &Path) -> Result<HostChanges, DecapError> {
    let changes = recorded(dir)?;
    let present = lo_addresses()?;
    for &address in &changes.lo_addresses {
        remove_lo_address(address, &present)?;
        forget(dir, &lo_record(address))?;
    }
    for (name, old) in &changes.rp_filter {
        let path = rp_filter_path(name);
        // The interface may be gone, and its setting with it.
        if path.exists() {
            fs::write(&path, old).map_err(|source| io_error("writing", &path, source))?;
        }
        forget(dir, &rp_filter_record(name))?;
    }
    Ok(changes)
}

fn ip(args: &[&str]) -> Result<String, DecapError> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| DecapError::Ip {
            command: format!("ip {}", args.join(" ")),
            message: source.to_string(),
        })?;
    if !output.status.success() {
        return Err(DecapError::Ip {
            command: format!("ip {}", args.join(" ")),
            message: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
