//! A namespace with one veth pair and an `lb run` on it, small enough to make, abandon and delete
//! in a test: what orphaned pinned state comes from (a container deleted after `lb run` stopped).

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::{daemon::lb_binary, netns::NetNs, topology::LB_NETNS_PINS};

/// The interface lb runs on in a [`SoloNs`].
pub const SOLO_IF: &str = "veth0";

/// A namespace holding `veth0` (10.77.0.1/24, lb's) and its peer `veth1` (10.77.0.2/24).
pub struct SoloNs {
    pub ns: NetNs,
}

impl SoloNs {
    /// Creates the namespace `name` (exactly) and its veth pair.
    pub fn with_name(name: &str) -> Result<Self> {
        let ns = NetNs::with_name(name)?;
        ns.ip([
            "link", "add", SOLO_IF, "type", "veth", "peer", "name", "veth1",
        ])?;
        ns.ip(["addr", "add", "10.77.0.1/24", "dev", SOLO_IF])?;
        ns.ip(["addr", "add", "10.77.0.2/24", "dev", "veth1"])?;
        ns.ip(["link", "set", SOLO_IF, "up"])?;
        ns.ip(["link", "set", "veth1", "up"])?;
        Ok(Self { ns })
    }

    /// The pin directory `lb run` on `veth0` uses.
    pub fn pins(&self) -> PathBuf {
        pins_of(self.ns.name())
    }

    /// A config for `veth0`: one VIP, one backend (nothing listens: it stays down, which does not
    /// matter for what is pinned).
    pub fn config() -> String {
        format!(
            "interface = \"{SOLO_IF}\"\nflow_table_size = 4096\nmax_vips = 2\n\n[[vip]]\nname = \
             \"solo\"\naddress = \"10.77.0.100\"\nport = 80\nprotocol = \"tcp\"\n[vip.health]\n\
             interval = \"200ms\"\ntimeout = \"200ms\"\n[[vip.backend]]\naddress = \"10.77.0.2\"\n"
        )
    }
}

/// `/sys/fs/bpf/lb/netns/<name>/veth0`.
pub fn pins_of(namespace: &str) -> PathBuf {
    Path::new(LB_NETNS_PINS).join(namespace).join(SOLO_IF)
}

/// Removes `/sys/fs/bpf/lb/netns/<name>` (and `lb/netns`, `lb` if left empty) on drop, whatever
/// the test did: unlinking a pinned link detaches it, unlinking a map pin frees the map.
pub struct PinsGuard {
    namespace_dir: PathBuf,
}

impl PinsGuard {
    pub fn new(namespace: &str) -> Self {
        Self {
            namespace_dir: Path::new(LB_NETNS_PINS).join(namespace),
        }
    }
}

impl Drop for PinsGuard {
    fn drop(&mut self) {
        if self.namespace_dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&self.namespace_dir)
        {
            eprintln!(
                "warning: cannot remove {}: {e}",
                self.namespace_dir.display()
            );
        }
        // Empty parents only: another test may have pins there.
        let netns = Path::new(LB_NETNS_PINS);
        let _ = std::fs::remove_dir(netns);
        if let Some(top) = netns.parent() {
            let _ = std::fs::remove_dir(top);
        }
    }
}

/// `lb detach --orphans` on the host.
pub fn lb_detach_orphans() -> Result<Output> {
    Command::new(lb_binary())
        .args(["detach", "--orphans"])
        .output()
        .context("running lb detach --orphans")
}

/// Polls `condition` every 50 ms until it holds or `timeout` passes; whether it held.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
