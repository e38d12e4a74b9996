//! Pinned instances nothing can use any more: an interface or a named network namespace went
//! away (a container deleted after `lb run` stopped) while lb's pins stayed, each holding the
//! flow table and rings (about 190 MB at the default sizes) until removed.
//!
//! An instance (a directory `<root>/lb/<if>` or `<root>/lb/netns/<ns>/<if>`) is an orphan when no
//! daemon holds its lock and either
//! - its pinned XDP link is defunct: the kernel reports the link's interface as ifindex 0 once
//!   the netdev it was attached to is gone (deleted, or destroyed with its namespace), or
//! - it has no pinned link and its named namespace is gone (`/run/netns/<ns>` missing).
//!
//! A link attached to a live interface is never an orphan, whatever its directory's name says (a
//! namespace whose name was deleted while a process still keeps it alive still forwards), and
//! neither is a locked directory (a daemon runs there). Detection only reads: the lock is looked
//! up in `/proc/locks`, never taken, so a scan cannot make a starting `lb run` fail; removal
//! ([`detach_orphan`]) takes the lock and looks again under it.

use std::{
    collections::HashSet,
    fmt, fs, io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{DetachReport, LINK_PIN, PinError, io_error, link, location, lock, remove_pins};

/// Where `ip netns add` keeps its named namespaces.
const NAMED_NETNS: &str = "/run/netns";

/// What is gone for an orphan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Gone {
    /// The interface the pinned link was attached to (the link is defunct, its namespace, if
    /// named, exists: the interface was deleted, or the namespace deleted and made again).
    Interface,
    /// The named network namespace (`/run/netns/<name>` is missing).
    Namespace,
}

/// One orphaned pinned instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Orphan {
    /// The pin directory.
    pub dir: String,
    /// The named namespace it was for (`None`: PID 1's, or an unnamed one `ino-<inode>`).
    pub namespace: Option<String>,
    pub interface: String,
    pub gone: Gone,
    /// Kernel memory its maps hold (their `memlock`), in bytes.
    pub memory_bytes: u64,
}

impl Orphan {
    /// "interface eth0 (netns a) is gone", or "netns a is gone".
    pub fn what_is_gone(&self) -> String {
        match (self.gone, &self.namespace) {
            (Gone::Namespace, Some(ns)) => {
                format!("network namespace {ns} is gone ({NAMED_NETNS}/{ns} is missing)")
            }
            (_, Some(ns)) => format!(
                "interface {} of network namespace {ns} is gone (its pinned XDP link is \
                 defunct: the interface, or the namespace that had this name, was deleted)",
                self.interface
            ),
            (_, None) => format!(
                "interface {} is gone (its pinned XDP link is defunct)",
                self.interface
            ),
        }
    }
}

impl fmt::Display for Orphan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "orphaned pinned state in {}: {}; it holds {} of kernel memory; remove it with \
             `lb detach --orphans`",
            self.dir,
            self.what_is_gone(),
            megabytes(self.memory_bytes)
        )
    }
}

/// `190.3 MB`.
pub fn megabytes(bytes: u64) -> String {
    // Display only: the precision lost in the conversion does not matter.
    #[allow(clippy::cast_precision_loss)]
    let mb = bytes as f64 / 1e6;
    format!("{mb:.1} MB")
}

/// One instance directory found under `<root>/lb`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Instance {
    dir: PathBuf,
    namespace: Option<String>,
    interface: String,
}

/// Every instance directory under `top` (`<root>/lb`): `top/<if>` and `top/netns/<ns>/<if>`.
fn instances(top: &Path) -> Vec<Instance> {
    let mut found = Vec::new();
    for (name, path) in subdirs(top) {
        if name == "netns" {
            for (ns, ns_path) in subdirs(&path) {
                let namespace = (!ns.starts_with("ino-")).then(|| ns.clone());
                for (interface, dir) in subdirs(&ns_path) {
                    found.push(Instance {
                        dir,
                        namespace: namespace.clone(),
                        interface,
                    });
                }
            }
        } else {
            found.push(Instance {
                dir: path,
                namespace: None,
                interface: name,
            });
        }
    }
    found
}

/// The directories in `dir`, by name (nothing when it cannot be read).
fn subdirs(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut dirs: Vec<(String, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .collect();
    dirs.sort();
    dirs
}

/// Whether the instance is an orphan and why, not looking at its lock.
fn classify(instance: &Instance) -> Option<Gone> {
    let namespace_gone = instance
        .namespace
        .as_ref()
        .is_some_and(|ns| !Path::new(NAMED_NETNS).join(ns).exists());
    let link_path = instance.dir.join(LINK_PIN);
    match link::pinned_link_facts(&link_path) {
        // Defunct: the netdev it was attached to is gone.
        Ok(facts) if facts.xdp_ifindex == Some(0) => Some(if namespace_gone {
            Gone::Namespace
        } else {
            Gone::Interface
        }),
        // Attached to a live interface (or not an XDP link, not ours to judge): live.
        Ok(_) => None,
        // No link (or unreadable): only a namespace known to be gone makes it an orphan.
        Err(_) => namespace_gone.then_some(Gone::Namespace),
    }
}

/// The `(device, inode)` of every file with a lock in `/proc/locks` (`1: FLOCK ADVISORY WRITE
/// 123 00:1f:4567 0 EOF`, the device as hex major:minor, the inode in decimal).
fn locked_inodes() -> HashSet<(u32, u32, u64)> {
    let Ok(text) = fs::read_to_string("/proc/locks") else {
        return HashSet::new();
    };
    text.lines()
        .filter(|line| !line.contains("->"))
        .filter_map(|line| {
            let id = line.split_whitespace().nth(5)?;
            let mut parts = id.split(':');
            let major = u32::from_str_radix(parts.next()?, 16).ok()?;
            let minor = u32::from_str_radix(parts.next()?, 16).ok()?;
            let inode = parts.next()?.parse().ok()?;
            Some((major, minor, inode))
        })
        .collect()
}

fn device_and_inode(path: &Path) -> Option<(u32, u32, u64)> {
    let meta = fs::metadata(path).ok()?;
    let dev = meta.dev();
    // The kernel's `new_encode_dev`, undone (glibc's `major`/`minor`).
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    Some((
        u32::try_from(major).ok()?,
        u32::try_from(minor).ok()?,
        meta.ino(),
    ))
}

/// The kernel memory of the maps pinned in `dir`: the `memlock` the kernel reports for each.
fn memory_of(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name() != LINK_PIN)
        .filter_map(|e| memlock(&e.path()).ok())
        .sum()
}

/// `memlock:` of the BPF object pinned at `path`, from its fdinfo.
fn memlock(path: &Path) -> io::Result<u64> {
    let fd = link::obj_get(path)?;
    let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    info.lines()
        .find_map(|line| line.strip_prefix("memlock:"))
        .and_then(|value| value.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no memlock in fdinfo"))
}

fn orphan_of(instance: &Instance, gone: Gone) -> Orphan {
    Orphan {
        dir: instance.dir.display().to_string(),
        namespace: instance.namespace.clone(),
        interface: instance.interface.clone(),
        gone,
        memory_bytes: memory_of(&instance.dir),
    }
}

/// The orphans under `top` (`<root>/lb`), in directory order. Reads only: no lock is taken.
pub fn scan(top: &Path) -> Vec<Orphan> {
    let locked = locked_inodes();
    instances(top)
        .iter()
        .filter(|i| device_and_inode(&i.dir).is_none_or(|id| !locked.contains(&id)))
        .filter_map(|i| classify(i).map(|gone| orphan_of(i, gone)))
        .collect()
}

/// [`scan`] in the bpffs this process would pin in (never mounting one); nothing without one.
pub fn scan_here() -> Result<Vec<Orphan>, PinError> {
    Ok(location::bpffs_root(false)?
        .map(|root| scan(&root.join(location::TOP)))
        .unwrap_or_default())
}

/// What `lb detach --orphans` did with one orphan.
#[derive(Debug)]
pub enum OrphanOutcome {
    Removed {
        orphan: Orphan,
        report: DetachReport,
    },
    /// A daemon took it (its lock is held) or it is no longer an orphan: left alone.
    Skipped {
        orphan: Orphan,
        why: String,
    },
    Failed {
        orphan: Orphan,
        error: PinError,
    },
}

/// Removes every orphan under `top`: each under its lock, after looking again.
pub fn detach_orphans(top: &Path) -> Vec<OrphanOutcome> {
    scan(top)
        .into_iter()
        .map(|orphan| detach_orphan(top, orphan))
        .collect()
}

/// Removes one orphan found by [`scan`] if, under its lock, it still is one.
pub fn detach_orphan(top: &Path, orphan: Orphan) -> OrphanOutcome {
    let dir = PathBuf::from(&orphan.dir);
    let Ok(_lock) = lock(&dir) else {
        return OrphanOutcome::Skipped {
            orphan,
            why: "an `lb run` holds it now".to_owned(),
        };
    };
    let instance = Instance {
        dir: dir.clone(),
        namespace: orphan.namespace.clone(),
        interface: orphan.interface.clone(),
    };
    if classify(&instance).is_none() {
        return OrphanOutcome::Skipped {
            orphan,
            why: "it is attached again".to_owned(),
        };
    }
    match remove_pins(&dir, top, &orphan.interface) {
        Ok(report) => OrphanOutcome::Removed { orphan, report },
        Err(error) => OrphanOutcome::Failed { orphan, error },
    }
}

/// Whether the link pinned in `dir` is defunct (its interface is gone). Used before adopting:
/// the maps next to such a link belong to an interface or a namespace that no longer exists.
pub fn link_is_defunct(dir: &Path) -> bool {
    link::pinned_link_facts(&dir.join(LINK_PIN)).is_ok_and(|f| f.xdp_ifindex == Some(0))
}

/// Empties `dir` (we hold its lock) of the pins of a defunct instance, keeping the directory:
/// what start-up does before starting fresh there.
pub fn clear_defunct(dir: &Path) -> Result<u64, PinError> {
    let memory = memory_of(dir);
    let entries = fs::read_dir(dir).map_err(io_error("listing", dir))?;
    for entry in entries {
        let path = entry.map_err(io_error("listing", dir))?.path();
        fs::remove_file(&path).map_err(io_error("removing", &path))?;
    }
    Ok(memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_are_found_in_both_layouts() {
        let base = std::env::temp_dir().join(format!("lb-orphans-{}", std::process::id()));
        let top = base.join("lb");
        for dir in ["eth0", "netns/a/veth0", "netns/ino-4026532000/eth1"] {
            fs::create_dir_all(top.join(dir)).expect("create");
        }
        let found = instances(&top);
        fs::remove_dir_all(&base).expect("cleanup");
        assert_eq!(
            found,
            vec![
                Instance {
                    dir: top.join("eth0"),
                    namespace: None,
                    interface: "eth0".into()
                },
                Instance {
                    dir: top.join("netns/a/veth0"),
                    namespace: Some("a".into()),
                    interface: "veth0".into()
                },
                Instance {
                    dir: top.join("netns/ino-4026532000/eth1"),
                    namespace: None,
                    interface: "eth1".into()
                },
            ]
        );
    }

    #[test]
    fn a_missing_named_namespace_without_a_link_is_an_orphan() {
        let instance = Instance {
            dir: PathBuf::from("/nonexistent/lb/netns/x/eth0"),
            namespace: Some("lb-surely-not-a-namespace-name".into()),
            interface: "eth0".into(),
        };
        assert_eq!(classify(&instance), Some(Gone::Namespace));
        let unnamed = Instance {
            namespace: None,
            ..instance
        };
        assert_eq!(classify(&unnamed), None);
    }

    #[test]
    fn orphans_say_what_is_gone_and_how_to_remove_them() {
        let orphan = Orphan {
            dir: "/sys/fs/bpf/lb/netns/c1/eth0".into(),
            namespace: Some("c1".into()),
            interface: "eth0".into(),
            gone: Gone::Namespace,
            memory_bytes: 190_300_000,
        };
        assert_eq!(
            orphan.to_string(),
            "orphaned pinned state in /sys/fs/bpf/lb/netns/c1/eth0: network namespace c1 is \
             gone (/run/netns/c1 is missing); it holds 190.3 MB of kernel memory; remove it \
             with `lb detach --orphans`"
        );
    }
}
