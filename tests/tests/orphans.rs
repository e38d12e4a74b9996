//! Orphaned pinned state: an interface or a named namespace deleted after `lb run` stopped leaves
//! its pins (and their memory) behind. `lb run` and `lb status` warn about it, `lb detach
//! --orphans` removes it and nothing live, and a new namespace reusing the name starts fresh.

use std::{path::Path, sync::Mutex, time::Duration};

use lb::dataplane::pins::link::pinned_link_facts;
use lb_tests::{
    daemon::{Launch, LbDaemon, api_socket_for, lb_status},
    netns::unique_name,
    orphan_lab::{PinsGuard, SOLO_IF, SoloNs, lb_detach_orphans, wait_until},
    topology::leftovers,
};

/// `lb detach --orphans` removes every orphan: the tests here must not remove each other's.
static SERIAL: Mutex<()> = Mutex::new(());

const PREFIX: &str = "lborph";

fn link_defunct(pins: &Path) -> bool {
    pinned_link_facts(&pins.join("link")).is_ok_and(|f| f.xdp_ifindex == Some(0))
}

fn link_attached(pins: &Path) -> bool {
    pinned_link_facts(&pins.join("link")).is_ok_and(|f| f.xdp_ifindex.is_some_and(|i| i != 0))
}

/// Runs lb in a new namespace `name`, stops it leaving its pins, and deletes the namespace; waits
/// until the kernel has destroyed its interface (namespaces are torn down asynchronously).
fn abandon_namespace(name: &str) {
    let doomed = SoloNs::with_name(name).expect("namespace");
    let daemon = LbDaemon::start(&doomed.ns, &SoloNs::config(), Launch::Nsenter).expect("lb run");
    daemon.stop_leaving_attached().expect("lb stops");
    let pins = doomed.pins();
    assert!(
        link_attached(&pins),
        "{} has no attached link",
        pins.display()
    );
    drop(doomed);
    assert!(
        wait_until(Duration::from_secs(10), || link_defunct(&pins)),
        "the link in {} is not defunct 10 s after its namespace was deleted",
        pins.display()
    );
}

fn detach_orphans() -> (String, String) {
    let out = lb_detach_orphans().expect("lb detach --orphans");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "lb detach --orphans failed: {stderr}");
    (stdout, stderr)
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_deleted_namespace_is_reported_and_removed_and_its_name_is_not_adopted() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let name = unique_name(PREFIX);
    {
        let _guard = PinsGuard::new(&name);
        let live = SoloNs::with_name(&unique_name(PREFIX)).expect("live namespace");
        let _live_guard = PinsGuard::new(live.ns.name());
        let daemon =
            LbDaemon::start(&live.ns, &SoloNs::config(), Launch::Nsenter).expect("live lb run");
        let socket = api_socket_for(&live.ns);

        abandon_namespace(&name);
        let orphan_dir = lb_tests::orphan_lab::pins_of(&name);
        let orphan_text = orphan_dir.display().to_string();

        // `lb status` (the daemon scans its bpffs) names it, what is gone and its memory.
        let status = lb_status(&socket).expect("lb status");
        let orphans = status["orphans"].as_array().expect("orphans in the status");
        let found = orphans
            .iter()
            .find(|o| o["dir"] == orphan_text.as_str())
            .unwrap_or_else(|| panic!("{orphan_text} not in {orphans:?}"));
        assert_eq!(found["gone"], "namespace", "{found}");
        assert_eq!(found["namespace"], name.as_str(), "{found}");
        let memory = found["memory_bytes"].as_u64().expect("memory_bytes");
        assert!(memory > 100_000, "{memory} bytes");
        assert!(
            !orphans.iter().any(|o| o["dir"]
                .as_str()
                .is_some_and(|d| d.contains(live.ns.name()))),
            "the live instance called an orphan: {orphans:?}"
        );
        let table = std::process::Command::new(lb_tests::daemon::lb_binary())
            .args(["status", "--api"])
            .arg(&socket)
            .output()
            .expect("lb status");
        let table = String::from_utf8_lossy(&table.stdout);
        assert!(
            table.contains(&format!("warning: orphaned pinned state in {orphan_text}"))
                && table.contains("lb detach --orphans"),
            "{table}"
        );

        // `lb run` elsewhere warns at start-up (here: the live one restarting, and adopting).
        daemon.stop_leaving_attached().expect("live lb stops");
        let daemon = LbDaemon::start(&live.ns, &SoloNs::config(), Launch::Nsenter)
            .expect("live lb run again");
        let log = daemon.log();
        assert!(log.contains("adopted the pinned state"), "{log}");
        assert!(
            log.contains(&format!("orphaned pinned state in {orphan_text}"))
                && log.contains(&format!("network namespace {name} is gone")),
            "{log}"
        );

        // `lb detach --orphans` removes it, says so, and leaves the live instance alone.
        let (removed, _) = detach_orphans();
        println!("lb detach --orphans:\n{removed}");
        assert!(
            removed.contains(&format!("removed orphan {orphan_text}")) && removed.contains("freed"),
            "{removed}"
        );
        assert!(
            !removed.contains(live.ns.name()),
            "a live instance was removed: {removed}"
        );
        assert!(!orphan_dir.exists(), "{orphan_text} is still there");
        assert!(!orphan_dir.parent().expect("parent").exists());
        assert!(link_attached(&live.pins()), "the live link was touched");
        lb_status(&socket).expect("the live daemon still answers");

        // A new namespace reusing the name does not adopt an orphan's pins: lb starts fresh.
        abandon_namespace(&name);
        let reborn = SoloNs::with_name(&name).expect("the name again");
        let fresh = LbDaemon::start(&reborn.ns, &SoloNs::config(), Launch::Nsenter)
            .expect("lb run in the new namespace");
        let log = fresh.log();
        assert!(
            log.contains("whose interface is gone") && log.contains("starting with an empty flow"),
            "{log}"
        );
        assert!(!log.contains("adopted the pinned state"), "{log}");
        assert!(link_attached(&reborn.pins()), "no new link");
        let status = lb_status(&api_socket_for(&reborn.ns)).expect("lb status");
        assert_eq!(status["vips"][0]["name"], "solo", "{status}");
        drop(fresh);
        assert!(!reborn.pins().exists(), "lb detach on drop left pins");
        drop(daemon);
    }
    assert_eq!(leftovers(PREFIX), Vec::<String>::new());
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn an_interface_deleted_while_its_namespace_stays_is_an_orphan() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    {
        let solo = SoloNs::with_name(&unique_name(PREFIX)).expect("namespace");
        let _guard = PinsGuard::new(solo.ns.name());
        let daemon = LbDaemon::start(&solo.ns, &SoloNs::config(), Launch::Nsenter).expect("lb");
        daemon.stop_leaving_attached().expect("lb stops");
        let pins = solo.pins();
        assert!(link_attached(&pins));
        // A stopped instance whose interface is there is not an orphan.
        let (nothing, _) = detach_orphans();
        assert!(!nothing.contains(&pins.display().to_string()), "{nothing}");
        assert!(link_attached(&pins));

        solo.ns.ip(["link", "del", SOLO_IF]).expect("ip link del");
        assert!(wait_until(Duration::from_secs(10), || link_defunct(&pins)));
        let (removed, _) = detach_orphans();
        println!("lb detach --orphans:\n{removed}");
        assert!(
            removed.contains(&format!("removed orphan {}", pins.display()))
                && removed.contains(&format!(
                    "interface {SOLO_IF} of network namespace {} is gone",
                    solo.ns.name()
                )),
            "{removed}"
        );
        assert!(!pins.exists());
        let (again, _) = detach_orphans();
        assert!(!again.contains(&pins.display().to_string()), "{again}");
    }
    assert_eq!(leftovers(PREFIX), Vec::<String>::new());
}
