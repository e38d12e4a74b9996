//! Pinned state, so the XDP program keeps forwarding while no daemon runs and the next `lb run`
//! adopts it: every map and the XDP link pinned by name in one bpffs directory per interface
//! ([`location`]), a lock on that directory so one daemon runs per interface ([`PinDir`]), a
//! layout check before adopting ([`layout`]), and `lb detach`'s removal ([`detach_interface`]).

pub mod layout;
pub mod link;
pub mod location;
pub mod mode;
pub mod orphans;
#[cfg(test)]
mod tests;

use std::{
    fmt, fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};

pub use layout::LayoutMismatch;
pub use location::PinLocation;

/// File name of the pinned XDP link in an interface's directory (maps are pinned by their name).
pub const LINK_PIN: &str = "link";

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mounting a bpffs on {} failed: {source}", path.display())]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{interface:?} cannot name an interface's pin directory")]
    InvalidInterface { interface: String },
    #[error("another `lb run` is running on {interface} (it holds {})", dir.display())]
    Locked { interface: String, dir: PathBuf },
    #[error("an `lb run` is still running on {interface}; stop it first (systemctl stop lb)")]
    StillRunning { interface: String },
    #[error("{0}")]
    Layout(Box<LayoutMismatch>),
    #[error("parsing the XDP object for its map layout failed: {0}")]
    Object(#[source] aya_obj::ParseError),
    #[error("{} is not an XDP link; it was not made by lb: remove it by hand", path.display())]
    NotXdpLink { path: PathBuf },
    #[error("the XDP link on {interface} cannot be pinned (kernel without BPF links, before 5.9?)")]
    LinkNotPinnable { interface: String },
    #[error("pinning the XDP link at {}: {source}", path.display())]
    PinLink {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("adopting the XDP link pinned at {}: {source}", path.display())]
    AdoptLink {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PinError + 'a {
    move |source| PinError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// An interface's pin directory, created if missing and locked for as long as this value lives
/// (one daemon per interface). The lock is a `flock` on the directory itself: bpffs leaves
/// `flock` to the VFS, so it works there like anywhere (checked on Linux 6.18), and it goes away
/// with the process however it dies.
pub struct PinDir {
    location: PinLocation,
    interface: String,
    /// Held, never read: the lock lives as long as this open directory.
    _lock: Flock<fs::File>,
}

impl fmt::Debug for PinDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinDir")
            .field("dir", &self.location.dir)
            .field("interface", &self.interface)
            .finish()
    }
}

impl PinDir {
    /// Finds (mounting a bpffs if needed and allowed, see [`location::bpffs_root`]), creates and
    /// locks `interface`'s directory in the current network namespace. `Ok(None)` when nothing
    /// can be pinned here: the caller should warn that restarts will not be hitless.
    pub fn open(interface: &str) -> Result<Option<Self>, PinError> {
        match PinLocation::for_interface(interface)? {
            Some(location) => Self::open_at(location, interface).map(Some),
            None => Ok(None),
        }
    }

    /// Creates and locks the directory at `location`.
    pub fn open_at(location: PinLocation, interface: &str) -> Result<Self, PinError> {
        // A directory removed between our open and our lock (`lb detach`, or a daemon leaving an
        // empty one behind) is not ours to use: open it again.
        for _ in 0..3 {
            fs::create_dir_all(&location.dir)
                .map_err(io_error("creating the pin directory", &location.dir))?;
            let lock = lock(&location.dir).map_err(|error| {
                error.into_pin_error(&location.dir, || PinError::Locked {
                    interface: interface.to_owned(),
                    dir: location.dir.clone(),
                })
            })?;
            if still_linked(&lock, &location.dir) {
                return Ok(Self {
                    location,
                    interface: interface.to_owned(),
                    _lock: lock,
                });
            }
        }
        Err(PinError::Io {
            what: "locking",
            path: location.dir,
            source: io::Error::other("the directory keeps being removed"),
        })
    }

    /// The directory holding the pins.
    pub fn path(&self) -> &Path {
        &self.location.dir
    }

    /// `<root>/lb`: where every interface's directory is (for the orphan scan).
    pub fn top(&self) -> PathBuf {
        self.location.top()
    }

    /// The interface this directory is for.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// Where a map or the link is pinned.
    pub fn pin_path(&self, name: &str) -> PathBuf {
        self.location.dir.join(name)
    }

    /// What is pinned here now.
    pub fn pinned(&self) -> Result<layout::Pinned, PinError> {
        layout::read_pinned(self.path())
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        // A directory left empty (a start that failed before pinning anything) is removed, with
        // its empty parents, so nothing of ours stays in bpffs. Still under the lock.
        if let Err(e) = location::remove_empty_dirs(&self.location.dir, &self.location.top()) {
            tracing::debug!(
                "could not remove {}: {e}",
                self.location.dir.as_path().display()
            );
        }
    }
}

enum LockError {
    Held,
    Io(io::Error),
}

impl LockError {
    /// `held` says what a lock held by another process means to the caller.
    fn into_pin_error(self, dir: &Path, held: impl FnOnce() -> PinError) -> PinError {
        match self {
            LockError::Held => held(),
            LockError::Io(source) => PinError::Io {
                what: "locking",
                path: dir.to_path_buf(),
                source,
            },
        }
    }
}

fn lock(dir: &Path) -> Result<Flock<fs::File>, LockError> {
    let file = fs::File::open(dir).map_err(LockError::Io)?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            LockError::Held
        } else {
            LockError::Io(errno.into())
        }
    })
}

/// Whether the directory we hold open is still the one at `path`.
fn still_linked(open: &fs::File, path: &Path) -> bool {
    match (open.metadata(), fs::metadata(path)) {
        (Ok(held), Ok(now)) => held.ino() == now.ino() && held.dev() == now.dev(),
        _ => false,
    }
}

/// What `lb detach` removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetachReport {
    pub interface: String,
    /// The directory removed; `None` when there was nothing of lb's.
    pub dir: Option<PathBuf>,
    /// Whether a pinned XDP link was removed (its program detached with it).
    pub link: bool,
    /// The map pins removed (and anything else found in the directory).
    pub pins: Vec<String>,
}

impl DetachReport {
    fn nothing(interface: &str) -> Self {
        Self {
            interface: interface.to_owned(),
            dir: None,
            link: false,
            pins: Vec::new(),
        }
    }
}

impl fmt::Display for DetachReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(dir) = &self.dir else {
            return write!(f, "nothing of lb's on {}", self.interface);
        };
        let mut parts = Vec::new();
        if self.link {
            parts.push("the XDP program and its link".to_owned());
        }
        if !self.pins.is_empty() {
            parts.push(format!(
                "{} pinned maps ({})",
                self.pins.len(),
                self.pins.join(", ")
            ));
        }
        if parts.is_empty() {
            parts.push("an empty pin directory".to_owned());
        }
        write!(
            f,
            "removed from {}: {} ({})",
            self.interface,
            parts.join(" and "),
            dir.display()
        )
    }
}

/// Removes lb's pinned link (the program detaches when its last reference goes), maps and
/// directories for `interface` in the current network namespace. Refuses while an `lb run`
/// holds the directory. Nothing there is not an error.
pub fn detach_interface(interface: &str) -> Result<DetachReport, PinError> {
    match PinLocation::existing(interface)? {
        Some(location) => detach_at(&location, interface),
        None => Ok(DetachReport::nothing(interface)),
    }
}

/// [`detach_interface`] for a known location.
pub fn detach_at(location: &PinLocation, interface: &str) -> Result<DetachReport, PinError> {
    let dir = &location.dir;
    if !dir.is_dir() {
        return Ok(DetachReport::nothing(interface));
    }
    let _lock = lock(dir).map_err(|error| {
        error.into_pin_error(dir, || PinError::StillRunning {
            interface: interface.to_owned(),
        })
    })?;
    remove_pins(dir, &location.top(), interface)
}

/// Removes the link, the maps and the directory `dir` (whose lock the caller holds), and its
/// parents up to `top` when they are left empty.
pub(crate) fn remove_pins(
    dir: &Path,
    top: &Path,
    interface: &str,
) -> Result<DetachReport, PinError> {
    let mut report = DetachReport::nothing(interface);
    let link_path = dir.join(LINK_PIN);
    if link_path.exists() {
        // Unpinning drops the pin's reference; the link (and the program's attachment) goes
        // when the fd we hold is closed, right here.
        match aya::programs::links::PinnedLink::from_pin(&link_path) {
            Ok(link) => drop(link.unpin().map_err(io_error("removing", &link_path))?),
            // Not a link (or unreadable): remove the file all the same, it is in our directory.
            Err(_) => fs::remove_file(&link_path).map_err(io_error("removing", &link_path))?,
        }
        report.link = true;
    }
    let entries = fs::read_dir(dir).map_err(io_error("listing", dir))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error("listing", dir))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    for name in names {
        let path = dir.join(&name);
        fs::remove_file(&path).map_err(io_error("removing", &path))?;
        report.pins.push(name);
    }
    location::remove_empty_dirs(dir, top).map_err(io_error("removing", dir))?;
    report.dir = Some(dir.to_path_buf());
    Ok(report)
}
