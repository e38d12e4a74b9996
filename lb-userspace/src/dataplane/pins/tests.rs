//! Pinning, adopting, locking and detaching on a veth in a private network namespace.
//!
//! Most tests pin into a bpffs mounted for the test alone (a new bpffs instance per mount), so
//! they can assert that nothing of lb's is left in it without racing other tests; one test goes
//! through the real `/sys/fs/bpf`. Unmounting the private bpffs (drop guard) releases every pin
//! in it, and deleting the namespace removes the interface, so a panicking test leaves nothing.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use aya::maps::{MapInfo, PerCpuValues};
use lb_common::{Counters, FlowKey, FlowState, PROTO_TCP};

use super::{
    DetachReport, LINK_PIN, PinDir, PinError, PinLocation, detach_at, detach_interface,
    layout::read_pinned,
    location::{self, BPFFS},
};
use crate::{
    dataplane::{AttachMode, Capacity, DataPlane, DataPlaneError, PinnedState},
    testing::netns::{End, NsPair, run, run_in},
};

const CAPACITY: Capacity = Capacity {
    ring_size: 1021,
    max_vips: 4,
    max_backends: 16,
    flow_table_size: 1024,
};

const MAP_NAMES: [&str; 13] = [
    "BACKENDS",
    "BACKEND_STATS",
    "COUNTER_CARRY",
    "FLOWS",
    "FLOW_EVENTS",
    "FLOW_EVENTS_LOST",
    "FLOW_EVENTS_ON",
    "REASONS",
    "RINGS",
    "TOO_BIG_BUDGET",
    "TX_PORTS",
    "VIPS",
    "VIP_INDEX",
];

/// A bpffs mounted on a fresh temporary directory; unmounted (releasing every pin) on drop.
struct PrivateBpffs {
    root: PathBuf,
}

impl PrivateBpffs {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let root = std::env::temp_dir().join(format!(
            "lb-pins-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&root).expect("create mount point");
        let guard = Self { root };
        run(
            "mount",
            &["-t", "bpf", "bpf", guard.root.to_str().expect("utf-8")],
        );
        assert!(location::is_bpffs(&guard.root));
        guard
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.root, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.root);
    }
}

/// A namespace with a veth end `eth0` (its peer in a second namespace).
fn namespace() -> (NsPair, String) {
    let pair = NsPair::new(
        "lbpin",
        [
            End::new("lb", "eth0", "10.77.9.1/24"),
            End::new("peer", "eth1", "10.77.9.2/24"),
        ],
    );
    let ns = pair.names()[0].clone();
    (pair, ns)
}

fn ifindex(interface: &str) -> u32 {
    nix::net::if_::if_nametoindex(interface).expect("interface exists")
}

/// `ip -d link show dev eth0` in `ns`: the id of the XDP program on it, if any.
fn xdp_program_on(pair: &NsPair, ns: &str) -> Option<u32> {
    let shown = pair.ip(ns, &["-d", "link", "show", "dev", "eth0"]);
    let after = shown.split("prog/xdp id ").nth(1)?;
    after.split_whitespace().next()?.parse().ok()
}

fn flow_key() -> FlowKey {
    FlowKey {
        src: [10, 77, 9, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        dst: [10, 77, 9, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        sport_be: 40000u16.to_be(),
        dport_be: 80u16.to_be(),
        proto: PROTO_TCP,
        family: lb_common::FAMILY_V4,
        _pad: [0; 2],
    }
}

fn map_ids(dir: &Path) -> Vec<(String, u32)> {
    MAP_NAMES
        .iter()
        .filter_map(|name| {
            MapInfo::from_pin(dir.join(name))
                .ok()
                .map(|info| (name.to_string(), info.id()))
        })
        .collect()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn pin_directories_are_per_namespace() {
    let (_pair, ns) = namespace();
    let named = run_in(&ns, || async { PinLocation::existing("eth0") });
    let named = named.expect("no error").expect("a bpffs");
    assert_eq!(named.root, Path::new(BPFFS));
    assert_eq!(
        named.dir,
        Path::new(BPFFS).join("lb/netns").join(&ns).join("eth0")
    );
    // A namespace without a name under /run/netns goes by its inode.
    let unnamed = std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
        let inode = std::os::unix::fs::MetadataExt::ino(
            &std::fs::metadata("/proc/thread-self/ns/net").expect("stat"),
        );
        (PinLocation::existing("eth0"), inode)
    });
    let (location, inode) = unnamed.join().expect("thread");
    assert_eq!(
        location.expect("no error").expect("a bpffs").dir,
        Path::new(BPFFS)
            .join("lb/netns")
            .join(format!("ino-{inode}"))
            .join("eth0")
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_restart_adopts_maps_and_link_and_detach_removes_everything() {
    let bpffs = PrivateBpffs::new();
    let (pair, ns) = namespace();
    let root = bpffs.root.clone();
    let location = run_in(&ns, move || async move {
        PinLocation::under(root, "eth0").expect("location")
    });
    let dir = location.dir.clone();

    // First daemon: fresh maps and link, pinned; state written; then it "dies".
    let loc = location.clone();
    let (first, cpus) = run_in(&ns, move || async move {
        let pins = PinDir::open_at(loc, "eth0").expect("lock");
        let (mut dp, state) = DataPlane::load_pinned(CAPACITY, pins).expect("load");
        assert_eq!(state, PinnedState::Fresh);
        assert!(dp.pinned().is_some());
        dp.attach("eth0", ifindex("eth0"), AttachMode::Skb)
            .expect("attach");
        let state = FlowState {
            backend: 7,
            vip_id: 1,
            last_seen_ns: 42,
        };
        dp.maps
            .flows
            .insert(flow_key(), state, 0)
            .expect("flow written");
        let cpus = aya::util::nr_cpus().expect("cpus");
        let counters = Counters {
            packets: 5,
            bytes: 500,
            new_flows: 1,
        };
        let values = PerCpuValues::try_from(vec![counters; cpus]).expect("values");
        dp.maps
            .backend_stats
            .set(1, values, 0)
            .expect("counter written");
        dp.maps.set_carry(1, counters).expect("carry written");
        let attachment = dp.attachment().expect("attached");
        assert!(!attachment.adopted);
        assert_eq!(attachment.mode, Some(AttachMode::Skb));
        drop(dp);
        (attachment, cpus)
    });
    let mut expected: Vec<String> = MAP_NAMES.iter().map(|s| s.to_string()).collect();
    expected.push(LINK_PIN.to_owned());
    assert_eq!(entries(&dir), expected, "every map and the link pinned");
    assert_eq!(
        xdp_program_on(&pair, &ns),
        Some(first.program_id),
        "dropping the DataPlane left the program attached"
    );

    // Second daemon: adopts the maps (the flow and the counter are there) and the link.
    let loc = location.clone();
    let second = run_in(&ns, move || async move {
        let pins = PinDir::open_at(loc.clone(), "eth0").expect("lock");
        let (mut dp, state) = DataPlane::load_pinned(CAPACITY, pins).expect("load");
        assert_eq!(state, PinnedState::Adopted);
        let flow = dp.maps.flows.get(&flow_key(), 0).expect("flow adopted");
        assert_eq!(flow.backend, 7);
        let counters = dp.maps.backend_counters(1).expect("counters");
        assert_eq!(counters.packets, 5 * cpus as u64);
        let carry = dp.maps.carry(1).expect("carry");
        assert_eq!(carry.packets, 5, "the counter carry is pinned too");
        // Native asked, but an adopted link keeps its mode.
        dp.attach("eth0", ifindex("eth0"), AttachMode::Native)
            .expect("attach");
        let attachment = dp.attachment().expect("attached");

        // While it runs: no second daemon, no detach.
        let again = PinDir::open_at(loc.clone(), "eth0").expect_err("locked");
        assert!(matches!(again, PinError::Locked { .. }));
        assert_eq!(
            again.to_string(),
            format!(
                "another `lb run` is running on eth0 (it holds {})",
                loc.dir.display()
            )
        );
        let detach = detach_at(&loc, "eth0").expect_err("still running");
        assert_eq!(
            detach.to_string(),
            "an `lb run` is still running on eth0; stop it first (systemctl stop lb)"
        );
        drop(dp);
        attachment
    });
    assert!(second.adopted);
    assert_eq!(second.mode, Some(AttachMode::Skb), "the link's own mode");
    assert_eq!(second.link_id, first.link_id, "same link");
    assert_ne!(second.program_id, first.program_id, "new program in it");
    assert_eq!(xdp_program_on(&pair, &ns), Some(second.program_id));

    // `lb detach`: nothing left in bpffs, no program on the interface.
    let loc = location.clone();
    let report = run_in(&ns, move || async move { detach_at(&loc, "eth0") }).expect("detach");
    assert!(report.link);
    assert_eq!(report.pins, MAP_NAMES);
    assert_eq!(report.dir.as_deref(), Some(dir.as_path()));
    // (A fresh bpffs holds the kernel's `maps.debug` and `progs.debug`; nothing else.)
    assert_eq!(entries(&bpffs.root), ["maps.debug", "progs.debug"]);
    assert_eq!(xdp_program_on(&pair, &ns), None);

    // Again: nothing there.
    let loc = location.clone();
    let report = run_in(&ns, move || async move { detach_at(&loc, "eth0") }).expect("detach");
    assert_eq!(report.dir, None);
    assert_eq!(report.to_string(), "nothing of lb's on eth0");
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_layout_mismatch_is_refused_and_leaves_the_pins_alone() {
    let bpffs = PrivateBpffs::new();
    let (_pair, ns) = namespace();
    let root = bpffs.root.clone();
    let location = run_in(&ns, move || async move {
        PinLocation::under(root, "eth0").expect("location")
    });
    let dir = location.dir.clone();
    let loc = location.clone();
    run_in(&ns, move || async move {
        let pins = PinDir::open_at(loc, "eth0").expect("lock");
        let (mut dp, _) = DataPlane::load_pinned(CAPACITY, pins).expect("load");
        dp.attach("eth0", ifindex("eth0"), AttachMode::Skb)
            .expect("attach");
    });
    let before = map_ids(&dir);
    assert_eq!(before.len(), MAP_NAMES.len());

    let loc = location.clone();
    let error = run_in(&ns, move || async move {
        let pins = PinDir::open_at(loc, "eth0").expect("lock");
        let bigger = Capacity {
            flow_table_size: 2048,
            ..CAPACITY
        };
        DataPlane::load_pinned(bigger, pins)
            .map(|_| ())
            .expect_err("refused")
    });
    assert_eq!(
        error.to_string(),
        format!(
            "pinned state in {} does not match this lb: FLOWS holds 1024 entries, this config \
             needs 2048 (flow_table_size); keep the old setting, or run `lb detach --interface \
             eth0` first (established flows are dropped)",
            dir.display()
        )
    );
    assert_eq!(map_ids(&dir), before, "pins untouched");
    assert!(dir.join(LINK_PIN).exists());
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_map_of_another_build_is_refused() {
    let bpffs = PrivateBpffs::new();
    let (_pair, ns) = namespace();
    let root = bpffs.root.clone();
    let error = run_in(&ns, move || async move {
        let location = PinLocation::under(root, "eth0").expect("location");
        let pins = PinDir::open_at(location, "eth0").expect("lock");
        // VIPS as an older build might have made it: 8-byte values instead of 16.
        pin_hash_map(&pins.pin_path("VIPS"), 20, 8, CAPACITY.max_vips);
        let id = MapInfo::from_pin(pins.pin_path("VIPS"))
            .expect("pinned")
            .id();
        let error = DataPlane::load_pinned(CAPACITY, pins)
            .map(|_| ())
            .expect_err("refused");
        (error, id)
    });
    let (error, id) = error;
    assert!(matches!(&error, DataPlaneError::Pins(e) if matches!(**e, PinError::Layout(_))));
    let dir = run_in(&ns, {
        let root = bpffs.root.clone();
        move || async move { PinLocation::under(root, "eth0").expect("location").dir }
    });
    assert_eq!(
        error.to_string(),
        format!(
            "pinned state in {} was made by a different build of lb: VIPS has value size 8 \
             bytes, this build needs 16 bytes; run the lb that made it, or run `lb detach \
             --interface eth0` first (established flows are dropped)",
            dir.display()
        )
    );
    assert_eq!(entries(&dir), ["VIPS"], "nothing else pinned");
    assert_eq!(
        MapInfo::from_pin(dir.join("VIPS"))
            .expect("still pinned")
            .id(),
        id
    );
    assert!(
        read_pinned(&dir)
            .expect("readable")
            .maps
            .contains_key("VIPS")
    );
}

/// Creates a hash map with the given sizes and pins it at `path` (raw `bpf()`: aya keeps map
/// creation to itself).
fn pin_hash_map(path: &Path, key_size: u32, value_size: u32, max_entries: u32) {
    use aya_obj::generated::{bpf_cmd, bpf_map_type};
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let mut create = MapCreate {
        map_type: bpf_map_type::BPF_MAP_TYPE_HASH as u32,
        key_size,
        value_size,
        max_entries,
        map_flags: 0,
    };
    let fd = super::link::bpf(bpf_cmd::BPF_MAP_CREATE, &mut create).expect("map created");
    // SAFETY: BPF_MAP_CREATE returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).expect("fd")) };
    let c_path = std::ffi::CString::new(path.to_str().expect("utf-8")).expect("no NUL");
    let mut pin = ObjPin {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    super::link::bpf(bpf_cmd::BPF_OBJ_PIN, &mut pin).expect("pinned");
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn through_sys_fs_bpf_drop_keeps_forwarding_and_detach_cleans_up() {
    let (pair, ns) = namespace();
    // Whatever happens, nothing of this namespace stays in the host's bpffs.
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let ns = self.0.clone();
            let _ = std::thread::spawn(move || run_in(&ns, || async { detach_interface("eth0") }))
                .join();
        }
    }
    let _cleanup = Cleanup(ns.clone());
    let (dir, program_id) = run_in(&ns, || async {
        let pins = PinDir::open("eth0").expect("no error").expect("a bpffs");
        let dir = pins.path().to_path_buf();
        let (mut dp, state) = DataPlane::load_pinned(CAPACITY, pins).expect("load");
        assert_eq!(state, PinnedState::Fresh);
        dp.attach("eth0", ifindex("eth0"), AttachMode::Skb)
            .expect("attach");
        let id = dp.attachment().expect("attached").program_id;
        (dir, id)
    });
    assert_eq!(
        dir,
        Path::new(BPFFS).join("lb/netns").join(&ns).join("eth0")
    );
    assert_eq!(xdp_program_on(&pair, &ns), Some(program_id));
    let report: DetachReport = run_in(&ns, || async { detach_interface("eth0") }).expect("detach");
    assert!(report.link);
    assert_eq!(
        report.to_string(),
        format!(
            "removed from eth0: the XDP program and its link and {} pinned maps ({}) ({})",
            MAP_NAMES.len(),
            MAP_NAMES.join(", "),
            dir.display()
        )
    );
    assert!(!dir.exists());
    assert!(!Path::new(BPFFS).join("lb/netns").join(&ns).exists());
    assert_eq!(xdp_program_on(&pair, &ns), None);
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn detach_with_nothing_pinned_reports_nothing() {
    let (_pair, ns) = namespace();
    let report = run_in(&ns, || async { detach_interface("eth0") }).expect("detach");
    assert_eq!(report.dir, None);
    assert!(!report.link && report.pins.is_empty());
    assert_eq!(report.to_string(), "nothing of lb's on eth0");
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn an_unpinned_data_plane_still_detaches_on_drop() {
    let (pair, ns) = namespace();
    run_in(&ns, || async {
        let mut dp = DataPlane::load(CAPACITY).expect("load");
        assert!(dp.pinned().is_none());
        dp.attach("eth0", ifindex("eth0"), AttachMode::Skb)
            .expect("attach");
    });
    assert_eq!(xdp_program_on(&pair, &ns), None);
}
