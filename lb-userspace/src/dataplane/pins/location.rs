//! Where the pins of one interface live: the bpffs to use, and a directory per (network
//! namespace, interface) in it.
//!
//! ```text
//! <root>/lb/<ifname>                    in PID 1's network namespace
//! <root>/lb/netns/<name>/<ifname>       in a namespace named /run/netns/<name>
//! <root>/lb/netns/ino-<inode>/<ifname>  in an unnamed namespace
//! ```
//!
//! `<root>` is `/sys/fs/bpf` when it is a bpffs; under `ip netns exec` (own mount namespace, fresh
//! /sys without the host's bpffs) it is the host's bpffs seen through the root of PID 1
//! (`/proc/1/root/sys/fs/bpf`) or, when that is not ours to look at, of the nearest ancestor
//! process that sees it (`/proc/<pid>/root/sys/fs/bpf`). Either way the directory is the same one
//! a daemon started with `nsenter --net` uses. Pinning, `BPF_OBJ_GET`, mkdir and flock all work
//! through such a path (checked on Linux 6.18 from an `ip netns exec` shell).

use std::{
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use nix::sys::statfs::{BPF_FS_MAGIC, statfs};

use super::PinError;

/// The usual bpffs mount point.
pub const BPFFS: &str = "/sys/fs/bpf";
/// The host's bpffs as seen from a process with its own mount namespace (`ip netns exec`).
const BPFFS_THROUGH_PID1: &str = "/proc/1/root/sys/fs/bpf";
/// Our top directory in a bpffs.
pub const TOP: &str = "lb";
/// `lb decap`'s top directory, beside [`TOP`] (its instances are laid out the same way).
pub const DECAP_TOP: &str = "lb-decap";
/// Where `ip netns add` keeps its named namespaces.
const NAMED_NETNS: &str = "/run/netns";

/// Inode numbers of the initial network and mount namespaces: fixed since Linux 6.18
/// (`NET_NS_INIT_INO`, `MNT_NS_INIT_INO` in uapi `linux/nsfs.h`); earlier kernels number them like
/// any other namespace, from 0xF0000000 up, so these never match another namespace. Used only
/// when `/proc/1/ns/*` cannot be read: a ptrace access check guards them, and a PID 1 with more
/// capabilities than we have (seen in sandboxes) makes it fail even for root.
const NET_NS_INIT_INO: u64 = 0xEFFF_FFF9;
const MNT_NS_INIT_INO: u64 = 0xEFFF_FFF8;

/// A bpffs root and the directory of one interface's pins under it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinLocation {
    /// The bpffs mount (or the path that reaches it).
    pub root: PathBuf,
    /// `<root>/lb/...`: the interface's directory (it may not exist yet).
    pub dir: PathBuf,
}

impl PinLocation {
    /// Where `interface`'s pins go in the current network namespace, mounting a bpffs on
    /// `/sys/fs/bpf` if none is there and we may (see [`bpffs_root`]). `Ok(None)`: pinning is not
    /// possible here; restarts then cannot be hitless.
    pub fn for_interface(interface: &str) -> Result<Option<Self>, PinError> {
        let Some(root) = bpffs_root(true)? else {
            return Ok(None);
        };
        Self::under(root, interface).map(Some)
    }

    /// As [`Self::for_interface`], without ever mounting (for `lb detach`: where nothing is
    /// mounted, nothing can be pinned).
    pub fn existing(interface: &str) -> Result<Option<Self>, PinError> {
        let Some(root) = bpffs_root(false)? else {
            return Ok(None);
        };
        Self::under(root, interface).map(Some)
    }

    /// The location of `interface`'s pins under the bpffs `root`, for the current network
    /// namespace.
    pub fn under(root: PathBuf, interface: &str) -> Result<Self, PinError> {
        Self::under_top(root, TOP, interface)
    }

    /// [`Self::under`] in another top directory (`lb decap`'s [`DECAP_TOP`]).
    pub fn under_top(root: PathBuf, top: &str, interface: &str) -> Result<Self, PinError> {
        check_interface_name(interface)?;
        let mut dir = root.join(top);
        if let Some(subdir) = netns_subdir()? {
            dir.push(subdir);
        }
        dir.push(interface);
        Ok(Self { root, dir })
    }

    /// `<root>/lb` (or `<root>/lb-decap`): the highest directory that is ours.
    pub fn top(&self) -> PathBuf {
        let top = self
            .dir
            .strip_prefix(&self.root)
            .ok()
            .and_then(|rest| rest.components().next())
            .map_or_else(
                || Path::new(TOP).to_path_buf(),
                |c| PathBuf::from(c.as_os_str()),
            );
        self.root.join(top)
    }
}

/// The bpffs to pin in: `/sys/fs/bpf` if it is one; else `/proc/1/root/sys/fs/bpf` if that is one
/// (we run in a mount namespace of our own, as under `ip netns exec`); else, with `mount`, when we
/// are in PID 1's mount namespace and `/sys/fs/bpf` exists, a bpffs mounted there (as bpftool
/// does). `Ok(None)` when none of these works.
pub fn bpffs_root(mount: bool) -> Result<Option<PathBuf>, PinError> {
    for candidate in [BPFFS, BPFFS_THROUGH_PID1] {
        if is_bpffs(Path::new(candidate)) {
            return Ok(Some(PathBuf::from(candidate)));
        }
    }
    if let Some(through_ancestor) = bpffs_through_ancestor() {
        return Ok(Some(through_ancestor));
    }
    if !mount || !Path::new(BPFFS).is_dir() || !in_initial_mount_namespace() {
        // A bpffs mounted in a private mount namespace would die with it (and with us): no use
        // for pins that must outlive the daemon.
        return Ok(None);
    }
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|errno| PinError::Mount {
        path: PathBuf::from(BPFFS),
        source: errno.into(),
    })?;
    tracing::info!("mounted a bpffs on {BPFFS} for lb's pinned maps and link");
    Ok(Some(PathBuf::from(BPFFS)))
}

/// The host's bpffs through the root of the nearest ancestor process that sees one. PID 1's root
/// is guarded by a ptrace access check that fails when PID 1 holds capabilities we lack (seen in
/// sandboxes and containers), while the process that ran `ip netns exec lb ...` (a shell, a
/// service manager) is usually ours to look at and still sees the host's mounts.
fn bpffs_through_ancestor() -> Option<PathBuf> {
    const MOST_ANCESTORS: usize = 8;
    let mut pid = std::os::unix::process::parent_id();
    for _ in 0..MOST_ANCESTORS {
        if pid <= 1 {
            return None;
        }
        let candidate = PathBuf::from(format!("/proc/{pid}/root{BPFFS}"));
        if is_bpffs(&candidate) {
            return Some(candidate);
        }
        pid = parent_of(pid)?;
    }
    None
}

/// The parent pid of `pid`, from `/proc/<pid>/stat` (`pid (comm) state ppid ...`; `comm` may hold
/// spaces and parentheses, so the fields are counted after its last `)`).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(1)?.parse().ok()
}

/// Whether `path` is the root of (or inside) a bpffs. Errors (missing, no permission) say no.
pub fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|fs| fs.filesystem_type() == BPF_FS_MAGIC)
}

/// Nothing for PID 1's network namespace, else `netns/<name>` (the `/run/netns` entry that is this
/// namespace, like `ip netns identify`) or `netns/ino-<inode>`.
fn netns_subdir() -> Result<Option<PathBuf>, PinError> {
    // `thread-self`, not `self`: test threads `setns` into a namespace, and `/proc/self/ns/net` is
    // the main thread's.
    let ours = namespace_inode("/proc/thread-self/ns/net")?;
    let init = namespace_inode("/proc/1/ns/net").unwrap_or(NET_NS_INIT_INO);
    if ours == init {
        return Ok(None);
    }
    let name = named_netns(ours).unwrap_or_else(|| format!("ino-{ours}"));
    Ok(Some(Path::new("netns").join(name)))
}

/// The inode of a namespace file (`/proc/.../ns/net` or a bind mount of one).
fn namespace_inode(path: &str) -> Result<u64, PinError> {
    std::fs::metadata(path)
        .map(|meta| meta.ino())
        .map_err(|source| PinError::Io {
            what: "reading the namespace of",
            path: PathBuf::from(path),
            source,
        })
}

/// The name under /run/netns whose namespace has inode `inode`.
fn named_netns(inode: u64) -> Option<String> {
    let entries = std::fs::read_dir(NAMED_NETNS).ok()?;
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|entry| entry.metadata().is_ok_and(|meta| meta.ino() == inode))
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect();
    // Two names for one namespace (`ip netns attach`): take the same one every time.
    names.sort();
    names.into_iter().next()
}

fn in_initial_mount_namespace() -> bool {
    let Ok(ours) = namespace_inode("/proc/thread-self/ns/mnt") else {
        return false;
    };
    ours == namespace_inode("/proc/1/ns/mnt").unwrap_or(MNT_NS_INIT_INO)
}

/// An interface name must be one path component (the kernel's own rules are stricter).
fn check_interface_name(interface: &str) -> Result<(), PinError> {
    let valid = !interface.is_empty()
        && interface.len() <= 15
        && interface != "."
        && interface != ".."
        && !interface.contains('/')
        && !interface.contains('\0');
    if valid {
        Ok(())
    } else {
        Err(PinError::InvalidInterface {
            interface: interface.to_owned(),
        })
    }
}

/// Removes `dir` if it is empty, then each empty parent up to and including `top`. Stops quietly
/// at the first directory that is not empty (or already gone).
pub fn remove_empty_dirs(dir: &Path, top: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let mut current = Some(dir);
    while let Some(path) = current {
        if !path.starts_with(top) {
            break;
        }
        match std::fs::remove_dir(path) {
            Ok(()) => removed.push(path.to_path_buf()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::ENOENT)) => break,
            Err(e) => return Err(e),
        }
        if path == top {
            break;
        }
        current = path.parent();
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_that_are_not_one_path_component_are_refused() {
        for bad in ["", ".", "..", "a/b", "sixteen-chars-xx"] {
            assert!(check_interface_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_interface_name("eth0").is_ok());
    }

    #[test]
    fn empty_directories_are_removed_up_to_the_top() {
        let base = std::env::temp_dir().join(format!("lb-pins-rmdir-{}", std::process::id()));
        let top = base.join("lb");
        let dir = top.join("netns/a/eth0");
        std::fs::create_dir_all(&dir).expect("create");
        std::fs::create_dir_all(top.join("netns/b")).expect("create");
        let removed = remove_empty_dirs(&dir, &top).expect("remove");
        assert_eq!(removed, vec![dir.clone(), top.join("netns/a")]);
        std::fs::remove_dir(top.join("netns/b")).expect("cleanup");
        let removed = remove_empty_dirs(&top.join("netns"), &top).expect("remove");
        assert_eq!(removed, vec![top.join("netns"), top.clone()]);
        std::fs::remove_dir(&base).expect("cleanup");
    }
}
