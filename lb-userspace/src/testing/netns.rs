//! Two network namespaces joined by a veth pair, built per test and deleted by a drop guard even
//! when the test panics; and threads that run an async body inside one of them.
//!
//! ```text
//!   <prefix>-<pid>-<n>-<end 0 suffix>            <prefix>-<pid>-<n>-<end 1 suffix>
//!   <if 0> <mac 0>          ──── veth ────          <if 1> <mac 1>
//!   <ipv4 0> [<ipv6 0>]                             <ipv4 1> [<ipv6 1>]
//! ```
//!
//! Sockets (netlink ones included) belong to the namespace of the thread that creates them, so
//! code under test runs on a thread that `setns`es into a namespace first ([`spawn_in`],
//! [`run_in`]). Creating namespaces needs root.

use std::fs::File;
use std::future::Future;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};

use crate::net::format_mac;

/// One end of an [`NsPair`]: its namespace and the veth end inside it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct End<'a> {
    /// Appended to the pair's unique prefix to name this end's namespace.
    pub(crate) suffix: &'a str,
    /// The veth end's interface name.
    pub(crate) interface: &'a str,
    /// The interface's MAC address; `None` keeps the kernel's random one.
    pub(crate) mac: Option<[u8; 6]>,
    /// IPv4 address with prefix length, e.g. `10.77.0.1/24`.
    pub(crate) ipv4: &'a str,
    /// IPv6 address with prefix length, e.g. `fd00:77::1/64`; `None` for none.
    pub(crate) ipv6: Option<&'a str>,
}

impl<'a> End<'a> {
    /// An end with IPv4 only and the kernel's random MAC.
    pub(crate) fn new(suffix: &'a str, interface: &'a str, ipv4: &'a str) -> Self {
        Self {
            suffix,
            interface,
            mac: None,
            ipv4,
            ipv6: None,
        }
    }

    /// Sets the interface's MAC address.
    pub(crate) fn mac(self, mac: [u8; 6]) -> Self {
        Self {
            mac: Some(mac),
            ..self
        }
    }

    /// Adds an IPv6 address (with prefix length).
    pub(crate) fn ipv6(self, ipv6: &'a str) -> Self {
        Self {
            ipv6: Some(ipv6),
            ..self
        }
    }
}

/// Two namespaces and the veth between them; `Drop` deletes both namespaces (and so the veth).
pub(crate) struct NsPair {
    names: [String; 2],
}

impl NsPair {
    /// Builds the pair: namespaces `<prefix>-<pid>-<n>-<suffix>` (unique per process and pair),
    /// the veth between them with the ends' names, MACs and addresses, each end and `lo` up.
    ///
    /// When an end has an IPv6 address, duplicate address detection is off in both namespaces and
    /// this returns only once IPv6 runs on both ends (see [`Self::wait_ipv6_ready`]).
    pub(crate) fn new(prefix: &str, ends: [End<'_>; 2]) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let unique = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        // The guard exists before the first namespace does, so a failure below still cleans up.
        let pair = Self {
            names: ends.map(|end| format!("{unique}-{}", end.suffix)),
        };
        let [first, second] = &pair.names;
        for ns in &pair.names {
            run("ip", &["netns", "add", ns]);
        }
        let ipv6 = ends.iter().any(|end| end.ipv6.is_some());
        if ipv6 {
            // No duplicate address detection on the links' link-local addresses: while it runs
            // (1-2 s after link-up) the kernel sends no neighbour solicitation from them, and IPv6
            // resolution on a brand-new link would measure DAD, not resolution.
            for ns in &pair.names {
                run(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        ns,
                        "sysctl",
                        "-qw",
                        "net.ipv6.conf.default.accept_dad=0",
                    ],
                );
            }
        }
        pair.ip(
            first,
            &[
                "link",
                "add",
                ends[0].interface,
                "type",
                "veth",
                "peer",
                "name",
                ends[1].interface,
                "netns",
                second,
            ],
        );
        for (ns, end) in pair.names.iter().zip(&ends) {
            let dev = end.interface;
            if let Some(mac) = &end.mac {
                pair.ip(
                    ns,
                    &["link", "set", "dev", dev, "address", &format_mac(mac)],
                );
            }
            pair.ip(ns, &["addr", "add", end.ipv4, "dev", dev]);
            if let Some(v6) = end.ipv6 {
                pair.ip(ns, &["-6", "addr", "add", v6, "dev", dev, "nodad"]);
            }
            pair.ip(ns, &["link", "set", "dev", dev, "up"]);
            pair.ip(ns, &["link", "set", "dev", "lo", "up"]);
        }
        if ipv6 {
            pair.wait_ipv6_ready(ends.map(|end| end.interface));
        }
        pair
    }

    /// Waits until IPv6 runs on both ends. The kernel starts IPv6 on a link only once it has seen
    /// the carrier come up (linkwatch, up to a second after `link set up`); until then the peer
    /// has not joined its solicited-node group and ignores neighbour solicitations. The link-local
    /// address appears at that moment, so it is the signal.
    fn wait_ipv6_ready(&self, interfaces: [&str; 2]) {
        let deadline = Instant::now() + Duration::from_secs(5);
        for (ns, dev) in self.names.iter().zip(interfaces) {
            loop {
                let link_local = self.ip(ns, &["-6", "addr", "show", "dev", dev, "scope", "link"]);
                if link_local.contains("inet6 fe80") && !link_local.contains("tentative") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "IPv6 not up on {dev} in {ns}: {link_local}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// The two namespaces' names, in the order of the ends given to [`Self::new`].
    pub(crate) fn names(&self) -> [String; 2] {
        self.names.clone()
    }

    /// `ip -n NS ARGS...`, which must succeed; returns its standard output.
    pub(crate) fn ip(&self, ns: &str, args: &[&str]) -> String {
        let mut all = vec!["-n", ns];
        all.extend_from_slice(args);
        run("ip", &all)
    }
}

impl Drop for NsPair {
    fn drop(&mut self) {
        for ns in &self.names {
            // Ignore failures: the namespace may not have been created.
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Runs `body` on a new thread inside namespace `ns`, on a current-thread tokio runtime built
/// there after `setns` (so its sockets are created in `ns`).
pub(crate) fn spawn_in<F, Fut, T>(ns: &str, body: F) -> JoinHandle<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        setns(&file, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
            .block_on(body())
    })
}

/// Like [`spawn_in`], waiting for the result (re-raising the body's panic).
pub(crate) fn run_in<F, Fut, T>(ns: &str, body: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    spawn_in(ns, body)
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Runs `program ARGS...`, which must succeed; returns its standard output.
pub(crate) fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}
