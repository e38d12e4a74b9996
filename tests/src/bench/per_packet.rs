//! Per-packet cost of the real XDP program, through `BPF_PROG_TEST_RUN` on the real maps (filled
//! by the daemon's own `Balancer`), minus a trivial program measured the same way in the same run
//! (DESIGN.md §6).
//!
//! Two ways of running a program, and every figure names its own:
//!
//! - **repeat**: one test run with `repeat = N`. The kernel feeds the program's output back in as
//!   the next input, so this is only used for paths whose output is a valid input for the same
//!   path (an established flow: the rewritten frame belongs to the same flow; a non-VIP frame
//!   passes unchanged; the reflector's swapped frame is swapped back). The per-run cost is the
//!   thread's CPU time over the call divided by N: the kernel's own figure is rounded down to
//!   whole nanoseconds, too coarse for differences of a few ns. (The kernel's is kept as a param.)
//! - **loop**: `repeat = 1` calls, a fresh frame per call (a new source port for "new flow"); the
//!   per-call cost is the kernel-reported duration of each run (exact nanoseconds), averaged.
//! - **call** (issue 11's method, group `per_call`): `repeat = 1` calls on the SAME frame, the
//!   kernel-reported duration averaged, kept GROSS (the trivial program is not subtracted: the
//!   harness's fixed cost is in every figure, the reflector's included), beside the MAC-swap
//!   reflector measured the same way in the same trial; the ratio is path gross median over
//!   reflector gross median. The same frame every call is right for these paths: in an unchanged
//!   ring slot nothing is written (no flow-table insert, not even for a SYN), and the changed-slot
//!   flow is recorded once in the warm-up and then hit on every call.
//!
//! Every case is measured in every trial, trial k of all cases before trial k+1, with a rotating
//! order. A case's net cost in trial k is its cost minus the trivial program's (`bench_pass`)
//! in trial k by the same method; figures hold the net per-trial values. Every VIP path (new
//! IPv4 flow; established IPv4, IPv6 and UDP flows, one hot flow and spread over the table) covers
//! the whole backends × flows grid; the non-VIP path, which reads no backend set, each fill level.
//!
//! Ring slots. The lab brings every backend up in one publish, so every slot of the nine grid VIPs
//! is unchanged (issue 11: a slot going from "no backend" to an owner is not a change). A tenth
//! VIP (IPv4 TCP, [`CHANGED_VIP_BACKENDS`] backends, not pre-filled) gets one ring change after
//! that (one backend's weight doubled, one publish), so some of its slots are changed; its hot
//! flow is chosen in such a slot and is a flow-table hit on every measured call: the
//! `tcp_ack_v4_changed_hit` figures show what the flow table costs. Every run is checked outside
//! the timed part: the verdict, the VIP's `new_flows` counter (a SYN in an unchanged slot counts
//! one new flow per call, an ACK none) and the flow table (an unchanged-slot flow is not in it
//! after the trial, the changed-slot flow is). A probe at start-up finds whether the loaded data
//! plane records every flow (before issue 11); then the unchanged-slot checks are only the
//! verdict and the figures say so (`data_plane` in params).
//!
//! Flow events (issue 12): a new UDP flow per call (each one a flow-table insert) to the UDP VIP
//! of [`REPRESENTATIVE_BACKENDS`] backends, with `FLOW_EVENTS_ON` set and not, at every fill
//! level, in the same trials; after each trial the events are read (one per run when on, none
//! when off, none lost) so the ring never fills. The difference of the two is what telling the
//! daemon about an insert costs.
//!
//! The flow table is pre-filled from userspace with established flows of the lab's VIPs pointing
//! at real backends, split evenly over the CPUs (the table has per-CPU LRU lists, each holding
//! `capacity / possible CPUs` entries, and a userspace insert lands in the list of the CPU it runs
//! on). The measuring thread is pinned to one CPU.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd as _, AsRawFd as _, RawFd},
    path::Path,
    time::Instant,
};

use anyhow::{Context as _, Result, ensure};
use aya::{Ebpf, TestRun as _, TestRunOptions, maps::IterableMap as _, programs::Xdp};
use lb::{balancer::capacity_of, config::Config, dataplane::FlowEvents};
use lb_common::{FlowKey, FlowState, PROTO_TCP, PROTO_UDP};
use nix::{
    sched::{CpuSet, sched_getaffinity, sched_setaffinity},
    unistd::Pid,
};

use super::Figure;
use crate::{
    frames::{FrameSpec, L4},
    packet_lab::{PacketLab, XDP_PASS, XDP_TX, flow_key},
};

/// The group of the repeat- and loop-method figures made here.
pub const GROUP: &str = "per_packet";
/// The group of the call-method figures (repeat=1 on the same frame, gross).
pub const CALL_GROUP: &str = "per_call";
/// Backends of the VIP whose ring is changed after the lab is up.
pub const CHANGED_VIP_BACKENDS: u32 = 100;

/// Backend counts of the grid.
pub const BACKENDS: [u32; 3] = [1, 100, 1000];
/// Flow-table fill levels of the grid.
pub const FLOWS: [u32; 3] = [1_000, 100_000, 1_000_000];
/// Fill levels in `--quick` mode.
pub const QUICK_FLOWS: [u32; 2] = [1_000, 10_000];
/// The backend count of the one single-point figure (`vip_established_v4_loop`, a cross-check
/// of the two methods) and of the IPv6 and UDP lines in the report's plot.
pub const REPRESENTATIVE_BACKENDS: u32 = 100;
/// Maglev table size of the lab (the production default).
pub const RING_SIZE: u32 = 65537;

#[derive(Clone, Debug)]
pub struct PerPacketOptions {
    /// Small counts, for smoke tests: the figures exist but mean little.
    pub quick: bool,
    /// Interleaved trials (the median of at least 5 is what the issue asks for).
    pub trials: usize,
    /// Where `bpftool prog dump xlated|jited` of the measured programs go, if bpftool is
    /// installed (`<program>.xlated.txt`, `<program>.jited.txt`).
    pub dump_dir: Option<std::path::PathBuf>,
}

impl PerPacketOptions {
    pub fn flows(&self) -> &'static [u32] {
        if self.quick { &QUICK_FLOWS } else { &FLOWS }
    }

    /// The fill level of the single-point figure: the middle of the grid.
    pub fn representative_flows(&self) -> u32 {
        let flows = self.flows();
        flows[flows.len() / 2]
    }

    fn repeat(&self) -> u32 {
        if self.quick { 200_000 } else { 1_000_000 }
    }

    fn loop_calls(&self) -> usize {
        if self.quick { 300 } else { 20_000 }
    }

    fn working_set(&self) -> usize {
        if self.quick { 256 } else { 16_384 }
    }
}

/// Figure names, shared with the report and the smoke test.
pub mod names {
    pub const TRIVIAL_REPEAT: &str = "trivial/repeat";
    pub const TRIVIAL_LOOP: &str = "trivial/loop";
    pub const REFLECTOR_REPEAT: &str = "reflector/repeat";
    pub const REFLECTOR_LOOP: &str = "reflector/loop";
    /// One hot established IPv4 TCP flow, repeat method: the grid the targets are about.
    pub const ESTABLISHED_V4: &str = "vip_established_v4";
    /// The same flow through repeat=1 calls (a cross-check of the repeat method).
    pub const ESTABLISHED_V4_LOOP: &str = "vip_established_v4_loop";
    /// Established IPv4 flows, a different pre-filled flow on every call (cache-cold entries).
    pub const ESTABLISHED_V4_SPREAD: &str = "vip_established_v4_spread";
    pub const NEW_FLOW_V4: &str = "vip_new_flow_v4";
    /// One hot established IPv6 TCP flow, repeat method.
    pub const ESTABLISHED_V6: &str = "vip_established_v6";
    /// Established IPv6 TCP flows, a different pre-filled flow on every call.
    pub const ESTABLISHED_V6_SPREAD: &str = "vip_established_v6_spread";
    /// One hot established IPv4 UDP flow, repeat method.
    pub const ESTABLISHED_UDP: &str = "vip_established_udp";
    /// Established IPv4 UDP flows, a different pre-filled flow on every call.
    pub const ESTABLISHED_UDP_SPREAD: &str = "vip_established_udp_spread";
    /// No VIP: the same at every backend count, so named by the fill level only.
    pub const NON_VIP_PASS: &str = "non_vip_pass";
    /// A new IPv4 UDP flow per call (recorded in the flow table) with flow events on (issue 12:
    /// each insert is told to the daemon through the `FLOW_EVENTS` ring buffer).
    pub const NEW_FLOW_UDP_EVENTS_ON: &str = "vip_new_flow_udp_events_on";
    /// The same path with flow events off (no ring-buffer work).
    pub const NEW_FLOW_UDP_EVENTS_OFF: &str = "vip_new_flow_udp_events_off";

    /// Call method (gross): the trivial program and the reflector on the 54-byte IPv4 TCP ACK.
    pub const TRIVIAL_CALL: &str = "trivial/call";
    pub const REFLECTOR_CALL: &str = "reflector/call";
    /// IPv4 TCP ACK of an established flow in an unchanged slot (54 bytes).
    pub const CALL_ACK_V4: &str = "tcp_ack_v4_unchanged";
    /// IPv6 TCP ACK of an established flow in an unchanged slot (74 bytes).
    pub const CALL_ACK_V6: &str = "tcp_ack_v6_unchanged";
    /// IPv4 TCP SYN of a new flow in an unchanged slot (54 bytes; nothing is recorded).
    pub const CALL_SYN_V4: &str = "tcp_syn_v4_unchanged";
    /// IPv4 TCP ACK to an address that is no VIP (passed to the host).
    pub const CALL_NON_VIP: &str = "non_vip_v4_tcp";
    /// IPv4 TCP ACK in a changed slot, its flow in the table (a flow-table hit).
    pub const CALL_ACK_V4_CHANGED: &str = "tcp_ack_v4_changed_hit";
    /// IPv4 TCP ACK in an unchanged slot of a `forward = "ipip"` VIP (issue 13: encapsulated).
    pub const CALL_ACK_V4_IPIP: &str = "tcp_ack_v4_ipip";
    /// The same through a `forward = "gue"` VIP.
    pub const CALL_ACK_V4_GUE: &str = "tcp_ack_v4_gue";

    /// The call-method VIP paths measured over the whole backends × flows grid.
    pub const CALL_GRID_PATHS: [&str; 3] = [CALL_ACK_V4, CALL_ACK_V6, CALL_SYN_V4];

    /// The VIP paths measured over the whole backends × flows grid, in report order.
    pub const GRID_PATHS: [&str; 7] = [
        ESTABLISHED_V4,
        ESTABLISHED_V4_SPREAD,
        NEW_FLOW_V4,
        ESTABLISHED_V6,
        ESTABLISHED_V6_SPREAD,
        ESTABLISHED_UDP,
        ESTABLISHED_UDP_SPREAD,
    ];

    pub fn point(path: &str, backends: u32, flows: u32) -> String {
        format!("{path}/backends={backends}/flows={flows}")
    }

    /// A figure of a path that does not depend on the backend count.
    pub fn flows_point(path: &str, flows: u32) -> String {
        format!("{path}/flows={flows}")
    }
}

// ---------------------------------------------------------------------------------------------
// The lab: one loaded program per fill level, each with the same nine VIPs: IPv4 TCP, IPv6 TCP
// and IPv4 UDP, each with 1, 100 and 1000 backends.

struct VipSpec {
    name: &'static str,
    address: IpAddr,
    port: u16,
    protocol: u8,
    backends: u32,
    /// The VIP's `forward` key.
    forward: &'static str,
}

fn vip_specs() -> Vec<VipSpec> {
    const NAMES: [[&str; BACKENDS.len()]; 3] = [
        ["v4_tcp_a", "v4_tcp_b", "v4_tcp_c"],
        ["v6_tcp_a", "v6_tcp_b", "v6_tcp_c"],
        ["v4_udp_a", "v4_udp_b", "v4_udp_c"],
    ];
    let v4 = |d| IpAddr::V4(Ipv4Addr::new(10, 200, 0, d));
    let v6 = |d| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, d));
    NAMES
        .iter()
        .enumerate()
        .flat_map(|(kind, names)| {
            BACKENDS
                .iter()
                .zip(names)
                .enumerate()
                .map(move |(i, (&backends, &name))| {
                    let (address, port, protocol) = match kind {
                        0 => (v4(i as u8 + 1), 80, PROTO_TCP),
                        1 => (v6(i as u16 + 1), 80, PROTO_TCP),
                        _ => (v4(i as u8 + 10), 53, PROTO_UDP),
                    };
                    VipSpec {
                        name,
                        address,
                        port,
                        protocol,
                        backends,
                        forward: "l2",
                    }
                })
        })
        .collect()
}

/// The VIP whose ring is changed after the lab is up (config index: after the grid's nine). Not
/// pre-filled: its only flows are the ones the measurement records.
fn changed_vip_spec() -> VipSpec {
    VipSpec {
        name: "v4_tcp_changed",
        address: IpAddr::V4(Ipv4Addr::new(10, 200, 0, 20)),
        port: 80,
        protocol: PROTO_TCP,
        backends: CHANGED_VIP_BACKENDS,
        forward: "l2",
    }
}

/// The encapsulating VIPs (config index: after the changed-slot VIP): IPv4 TCP with
/// [`REPRESENTATIVE_BACKENDS`] backends, `forward = "ipip"` and `"gue"`. Not pre-filled: their
/// TCP flows in unchanged slots need no table.
fn encap_vip_specs() -> [VipSpec; 2] {
    let spec = |name, d, forward| VipSpec {
        name,
        address: IpAddr::V4(Ipv4Addr::new(10, 200, 0, d)),
        port: 80,
        protocol: PROTO_TCP,
        backends: REPRESENTATIVE_BACKENDS,
        forward,
    };
    [
        spec("v4_tcp_ipip", 30, "ipip"),
        spec("v4_tcp_gue", 31, "gue"),
    ]
}

/// An address that is no VIP (same port and protocol as the TCP VIPs).
const NOT_A_VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 99);

fn backend_address(vip: usize, j: u32, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0xdb8,
            0x210 + vip as u16,
            0,
            0,
            0,
            0,
            j as u16 + 1,
        ))
    } else {
        IpAddr::V4(Ipv4Addr::new(
            10,
            10 + vip as u8,
            (j / 200) as u8,
            (j % 200) as u8 + 1,
        ))
    }
}

/// The lab's config: the grid's VIPs (`specs`, in order) and then the changed-slot VIP.
fn lab_config(specs: &[VipSpec], flow_table_size: u32) -> String {
    let mut toml = format!(
        "interface = \"bench0\"\nring_size = {RING_SIZE}\nmax_vips = 16\nmax_backends = 4096\n\
         flow_table_size = {flow_table_size}\n"
    );
    let changed = changed_vip_spec();
    let encap = encap_vip_specs();
    for (v, spec) in specs.iter().chain([&changed]).chain(&encap).enumerate() {
        let protocol = if spec.protocol == PROTO_UDP {
            "udp"
        } else {
            "tcp"
        };
        toml.push_str(&format!(
            "\n[[vip]]\nname = \"{}\"\naddress = \"{}\"\nport = {}\nprotocol = \"{protocol}\"\n\
             forward = \"{}\"\n[vip.health]\ncheck = \"none\"\n",
            spec.name, spec.address, spec.port, spec.forward
        ));
        for j in 0..spec.backends {
            toml.push_str(&format!(
                "[[vip.backend]]\naddress = \"{}\"\n",
                backend_address(v, j, spec.address.is_ipv6())
            ));
        }
    }
    toml
}

/// Pre-filled flow number `i`: its VIP (index into the specs) and source.
fn prefill_flow(specs: &[VipSpec], i: u32) -> (usize, IpAddr, u16) {
    let vip = i as usize % specs.len();
    let sport = 1024 + (i % 60_000) as u16;
    let host = i / 60_000;
    let src = if specs[vip].address.is_ipv6() {
        IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0xdb8,
            0xff00,
            0,
            0,
            0,
            (host >> 16) as u16,
            host as u16 + 1,
        ))
    } else {
        IpAddr::V4(Ipv4Addr::from(
            u32::from(Ipv4Addr::new(100, 64, 0, 1)) + host,
        ))
    };
    (vip, src, sport)
}

fn frame(spec: &VipSpec, src: IpAddr, sport: u16, l4: L4) -> Vec<u8> {
    let mut f = match l4 {
        L4::Udp => FrameSpec::udp(src, sport, spec.address, spec.port, &[0x5a; 18]),
        _ => FrameSpec::tcp_syn(src, sport, spec.address, spec.port),
    };
    f.l4 = l4;
    f.build()
}

const TCP_ACK: L4 = L4::Tcp { flags: 0x10 };
const TCP_SYN: L4 = L4::Tcp { flags: 0x02 };

fn l4_of(spec: &VipSpec) -> L4 {
    if spec.protocol == PROTO_UDP {
        L4::Udp
    } else {
        TCP_ACK
    }
}

struct Lab {
    flows: u32,
    capacity: u32,
    lab: PacketLab,
    specs: Vec<VipSpec>,
    /// Entries counted after the fill.
    filled: usize,
    /// The changed-slot VIP's hot flow (source, source port): its slot changed owner.
    changed_flow: (IpAddr, u16),
    /// The daemon's flow-event reader, drained after each trial with events on.
    events: FlowEvents,
}

/// The data plane's flow timestamps (`bpf_ktime_get_coarse_ns`): CLOCK_MONOTONIC_COARSE.
fn monotonic_coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; CLOCK_MONOTONIC_COARSE always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; the thread CPU clock always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPUs this process may run on.
pub fn allowed_cpus() -> Result<Vec<usize>> {
    let set = sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity")?;
    Ok((0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect())
}

fn possible_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| {
            s.trim()
                .split(',')
                .map(|range| match range.split_once('-') {
                    Some((a, b)) => Some(b.parse::<usize>().ok()? - a.parse::<usize>().ok()? + 1),
                    None => range.parse::<usize>().ok().map(|_| 1),
                })
                .sum::<Option<usize>>()
        })
        .unwrap_or(1)
}

/// Pins the calling thread to `cpu`; returns the previous affinity.
fn pin_to(cpu: usize) -> Result<CpuSet> {
    let previous = sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity")?;
    let mut set = CpuSet::new();
    set.set(cpu).context("cpu number")?;
    sched_setaffinity(Pid::from_raw(0), &set).with_context(|| format!("pinning to CPU {cpu}"))?;
    Ok(previous)
}

/// Writes `keys`/`values` into the flow table behind `fd` in batches
/// ([`lb::dataplane::flows::write_flows`]).
fn update_batch(fd: RawFd, keys: &[FlowKey], values: &[FlowState]) -> Result<()> {
    lb::dataplane::flows::write_flows(fd, keys, values).context("writing FLOWS")
}

impl Lab {
    /// Loads a lab whose flow table holds `flows` pre-filled entries (plus head-room for the
    /// flows the measurement itself inserts) and fills it.
    fn new(flows: u32, loop_calls: usize, cpus: &[usize]) -> Result<Self> {
        let specs = vip_specs();
        // Each CPU's LRU list holds capacity / possible CPUs entries; the fill puts
        // flows / allowed CPUs into each allowed CPU's list, and the measuring CPU also takes the
        // measurement's own flows.
        let per_cpu = (flows as usize).div_ceil(cpus.len()) + loop_calls + 4096;
        let capacity = (per_cpu * possible_cpus())
            .max(lb_common::DEFAULT_FLOW_TABLE_SIZE as usize)
            .try_into()
            .context("flow table too large")?;
        let config_text = lab_config(&specs, capacity);
        // Validate first so a bad config is an error, not a panic.
        Config::parse(&config_text, Path::new("bench-lab.toml"))
            .map(|c| capacity_of(&c))
            .map_err(|e| anyhow::anyhow!("bench lab config: {e}"))?;
        let mut lab = PacketLab::new(&config_text);
        // Registered with the runtime `run` entered; only `drain` is used, no task polls it.
        let events = lab
            .balancer
            .dataplane
            .take_flow_events()
            .context("taking the flow-event reader")?;
        let mut lab = Lab {
            flows,
            capacity,
            lab,
            specs,
            filled: 0,
            changed_flow: (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            events,
        };
        lab.fill(cpus)?;
        lab.changed_flow = lab.change_ring()?;
        // The unchanged-slot figures are only that if the grid's rings are all unchanged (one
        // publish brought every backend up), and the changed-slot VIP must have changed slots.
        let balancer = &lab.lab.balancer;
        for v in 0..lab.specs.len() {
            let changed = balancer.changed_slots(v);
            ensure!(
                changed == 0,
                "{}: {changed} changed ring slots after the lab came up",
                lab.specs[v].name
            );
        }
        ensure!(
            balancer.changed_slots(lab.changed_vip()) > 0,
            "the ring change left no changed slot"
        );
        Ok(lab)
    }

    /// Index of the changed-slot VIP in the balancer (after the grid's VIPs).
    fn changed_vip(&self) -> usize {
        self.specs.len()
    }

    /// Index of encapsulating VIP `k` of [`encap_vip_specs`] in the balancer.
    fn encap_vip(&self, k: usize) -> usize {
        self.specs.len() + 1 + k
    }

    /// One ring change on the changed-slot VIP after the lab is up: its first backend's weight
    /// doubled, one publish, so the slots that move to that backend become changed. Returns a
    /// flow whose slot changed owner (from the daemon's own ring before and after).
    fn change_ring(&mut self) -> Result<(IpAddr, u16)> {
        let v = self.changed_vip();
        let spec = changed_vip_spec();
        let src = IpAddr::V4(Ipv4Addr::new(198, 19, 1, 1));
        let key = |sport: u16| flow_key(src, sport, spec.address, spec.port, PROTO_TCP);
        const CANDIDATES: u16 = 4096;
        let before: Vec<u32> = (0..CANDIDATES)
            .map(|n| self.lab.expected_backend(v, &key(40_000 + n)))
            .collect();
        let balancer = &mut self.lab.balancer;
        let weight = balancer.vips[v].backends[0].weight.max(1);
        balancer
            .set_weight(v, 0, weight * 2)
            .map_err(|e| anyhow::anyhow!("publishing the ring change of {}: {e}", spec.name))?;
        (0..CANDIDATES)
            .find(|&n| self.lab.expected_backend(v, &key(40_000 + n)) != before[usize::from(n)])
            .map(|n| (src, 40_000 + n))
            .with_context(|| {
                format!(
                    "no flow of {CANDIDATES} candidates in a changed slot of {}",
                    spec.name
                )
            })
    }

    /// Whether the loaded data plane records every flow (before issue 11): one SYN of a fresh
    /// flow to an IPv4 TCP VIP, all of whose slots are unchanged, and a look at the table.
    fn records_every_flow(&mut self) -> Result<bool> {
        let v = self.vip_index(BACKENDS[0], PROTO_TCP, false);
        let spec = &self.specs[v];
        let src = IpAddr::V4(Ipv4Addr::new(198, 18, 250, 1));
        let key = flow_key(src, 1000, spec.address, spec.port, PROTO_TCP);
        let syn = frame(spec, src, 1000, TCP_SYN);
        let result = self
            .lab
            .balancer
            .dataplane
            .program()
            .test_run(TestRunOptions {
                data_in: Some(&syn),
                ..TestRunOptions::new()
            })
            .context("test run of the probe SYN")?;
        ensure!(
            result.return_value == XDP_TX,
            "probe SYN: verdict {} instead of XDP_TX",
            result.return_value
        );
        let flows = &mut self.lab.balancer.dataplane.maps.flows;
        let recorded = flows.get(&key, 0).is_ok();
        if recorded {
            flows.remove(&key).context("removing the probe flow")?;
        }
        Ok(recorded)
    }

    fn is_recorded(&self, key: &FlowKey) -> bool {
        self.lab.balancer.dataplane.maps.flows.get(key, 0).is_ok()
    }

    fn fill(&mut self, cpus: &[usize]) -> Result<()> {
        let now = monotonic_coarse_ns();
        let balancer = &self.lab.balancer;
        let (keys, values): (Vec<FlowKey>, Vec<FlowState>) = (0..self.flows)
            .map(|i| {
                let (v, src, sport) = prefill_flow(&self.specs, i);
                let spec = &self.specs[v];
                let vip = &balancer.vips[v];
                let backend = &vip.backends[i as usize / self.specs.len() % vip.backends.len()];
                (
                    flow_key(src, sport, spec.address, spec.port, spec.protocol),
                    FlowState {
                        backend: backend.id,
                        vip_id: vip.id,
                        last_seen_ns: now,
                    },
                )
            })
            .unzip();
        let fd = balancer.dataplane.maps.flows.map().fd().as_fd().as_raw_fd();
        let n = cpus.len();
        std::thread::scope(|scope| {
            let workers: Vec<_> = cpus
                .iter()
                .enumerate()
                .map(|(c, &cpu)| {
                    let keys: Vec<FlowKey> = keys.iter().skip(c).step_by(n).copied().collect();
                    let values: Vec<FlowState> =
                        values.iter().skip(c).step_by(n).copied().collect();
                    scope.spawn(move || -> Result<()> {
                        pin_to(cpu)?;
                        update_batch(fd, &keys, &values)
                    })
                })
                .collect();
            workers
                .into_iter()
                .try_for_each(|w| w.join().expect("fill thread panicked"))
        })?;
        self.filled = self.count();
        ensure!(
            self.filled == self.flows as usize,
            "the flow table holds {} entries after inserting {} (capacity {}): the LRU evicted",
            self.filled,
            self.flows,
            self.capacity
        );
        Ok(())
    }

    fn count(&self) -> usize {
        self.lab.balancer.dataplane.maps.flow_count().unwrap_or(0)
    }

    fn vip_index(&self, backends: u32, protocol: u8, v6: bool) -> usize {
        self.specs
            .iter()
            .position(|s| {
                s.backends == backends && s.protocol == protocol && s.address.is_ipv6() == v6
            })
            .expect("the lab has this VIP")
    }

    fn set_flow_events(&mut self, on: bool) -> Result<()> {
        self.lab
            .balancer
            .dataplane
            .set_flow_events(on)
            .context("setting FLOW_EVENTS_ON")
    }

    /// Reads every pending flow event; returns how many there were.
    fn drain_flow_events(&mut self) -> usize {
        let mut out = Vec::new();
        self.events.drain(&mut out)
    }

    fn new_flows_counter(&self, vip: usize) -> Result<u64> {
        let balancer = &self.lab.balancer;
        Ok(balancer.vip_counters(&balancer.vips[vip])?.new_flows)
    }
}

// ---------------------------------------------------------------------------------------------
// Cases

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    Repeat,
    Loop,
    /// repeat=1 calls on the same frame, gross (issue 11).
    Call,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Repeat => "repeat",
            Method::Loop => "loop",
            Method::Call => "call",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Program {
    Trivial,
    Reflector,
    /// The load balancer of lab number `usize`.
    Lb(usize),
}

/// What a case expects of every run, checked outside the timed part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// This verdict, and no new flow in the VIP's counters.
    Established { verdict: u32, vip: usize },
    /// XDP_TX and one new flow per call.
    NewFlows { vip: usize },
    /// XDP_TX in an unchanged slot: one new flow per call for a SYN, none for an ACK, and the
    /// case's `probe` flow not in the table (unless the data plane records every flow).
    Unchanged { vip: usize, syn: bool },
    /// XDP_TX in a changed slot, no new flow after the warm-up, and the case's `probe` flow in
    /// the table: every measured call is a flow-table hit.
    ChangedHit { vip: usize },
    /// This verdict.
    Verdict(u32),
}

struct Case {
    name: String,
    path: &'static str,
    method: Method,
    program: Program,
    frames: Vec<Vec<u8>>,
    /// Runs per trial of the loop and call methods (the call method runs `frames[0]` each time).
    calls: usize,
    /// Flow keys the case inserts (new flows), removed after each trial (where present).
    inserted: Vec<FlowKey>,
    /// The flow of the case's frame, for the flow-table checks of `Unchanged` and `ChangedHit`.
    probe: Option<FlowKey>,
    /// `Some(on)`: `FLOW_EVENTS_ON` is set to `on` for the trial (and off after it); the events
    /// are read after the trial and counted: one per run when on, none when off.
    flow_events: Option<bool>,
    expect: Expect,
    backends: Option<u32>,
    flows: Option<u32>,
    note: &'static str,
    /// Per trial: ns per run, gross.
    samples: Vec<f64>,
    /// Per trial: the kernel's own ns per run (rounded down by the kernel for repeat runs).
    kernel_samples: Vec<f64>,
    /// Size of the program as the kernel holds it (for "where the time goes").
    program_info: Vec<(&'static str, String)>,
    /// What the probe found the loaded data plane to do with flows.
    data_plane: &'static str,
}

struct Bench {
    ebpf: Ebpf,
}

const TRIVIAL_PROGRAM: &str = "bench_pass";
const REFLECTOR_PROGRAM: &str = "bench_reflect";

impl Bench {
    fn load() -> Result<Self> {
        let mut ebpf = Ebpf::load(lb::bench_object()).context("loading the bench object")?;
        for name in [TRIVIAL_PROGRAM, REFLECTOR_PROGRAM] {
            let xdp: &mut Xdp = ebpf
                .program_mut(name)
                .with_context(|| format!("no program {name} in the bench object"))?
                .try_into()
                .with_context(|| format!("{name} is not an XDP program"))?;
            xdp.load()
                .with_context(|| format!("loading {name} (run as root)"))?;
        }
        Ok(Self { ebpf })
    }

    fn xdp(&mut self, name: &str) -> &mut Xdp {
        self.ebpf
            .program_mut(name)
            .and_then(|p| <&mut Xdp>::try_from(p).ok())
            .expect("checked at load")
    }
}

struct Runner<'a> {
    bench: &'a mut Bench,
    labs: &'a mut [Lab],
    /// The data plane records every flow (before issue 11): slot state is not checked.
    records_every_flow: bool,
}

/// `repeat = 1` runs of `program` on `frames`, each checked for `want` (outside the timed part:
/// the kernel times each run itself). Returns (mean kernel ns per run, runs).
fn run_calls<'f>(
    program: &mut Xdp,
    name: &str,
    frames: impl Iterator<Item = &'f Vec<u8>>,
    want: u32,
) -> Result<(f64, u64)> {
    let mut kernel_ns = 0u128;
    let mut wrong = 0usize;
    let mut calls = 0u64;
    for frame in frames {
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ..TestRunOptions::new()
            })
            .with_context(|| format!("test run of {name}"))?;
        kernel_ns += result.duration.as_nanos();
        wrong += usize::from(result.return_value != want);
        calls += 1;
    }
    ensure!(calls > 0, "{name}: no runs");
    ensure!(
        wrong == 0,
        "{name}: {wrong} of {calls} runs returned another verdict than {want}"
    );
    Ok((kernel_ns as f64 / calls as f64, calls))
}

impl Runner<'_> {
    fn program(&mut self, program: Program) -> &mut Xdp {
        match program {
            Program::Trivial => self.bench.xdp(TRIVIAL_PROGRAM),
            Program::Reflector => self.bench.xdp(REFLECTOR_PROGRAM),
            Program::Lb(lab) => self.labs[lab].lab.balancer.dataplane.program(),
        }
    }

    /// Runs one trial of `case`: returns (gross ns per run, kernel ns per run). The warm-up
    /// trial may create the established flows it then uses.
    fn trial(&mut self, case: &Case, repeat: u32, warmup: bool) -> Result<(f64, f64)> {
        let lab = match case.program {
            Program::Lb(lab) => Some(lab),
            _ => None,
        };
        let counter_vip = match case.expect {
            Expect::Established { vip, .. }
            | Expect::NewFlows { vip }
            | Expect::Unchanged { vip, .. }
            | Expect::ChangedHit { vip } => Some(vip),
            Expect::Verdict(_) => None,
        };
        let new_before = match (lab, counter_vip) {
            (Some(l), Some(v)) => self.labs[l].new_flows_counter(v)?,
            _ => 0,
        };
        let lost_before = match (lab, case.flow_events) {
            (Some(l), Some(on)) => {
                ensure!(
                    self.labs[l].drain_flow_events() == 0,
                    "{}: flow events pending before the trial",
                    case.name
                );
                self.labs[l].set_flow_events(on)?;
                self.labs[l].lab.balancer.dataplane.flow_events_lost()?
            }
            _ => 0,
        };
        let want = match case.expect {
            Expect::Established { verdict, .. } => verdict,
            Expect::NewFlows { .. } | Expect::Unchanged { .. } | Expect::ChangedHit { .. } => {
                XDP_TX
            }
            Expect::Verdict(v) => v,
        };
        let runs;
        let measured = match case.method {
            Method::Repeat => {
                let frame = &case.frames[0];
                let program = self.program(case.program);
                let cpu_before = thread_cpu_ns();
                let result = program
                    .test_run(TestRunOptions {
                        data_in: Some(frame),
                        repeat,
                        ..TestRunOptions::new()
                    })
                    .with_context(|| format!("test run of {}", case.name))?;
                let cpu = thread_cpu_ns() - cpu_before;
                ensure!(
                    result.return_value == want,
                    "{}: verdict {} instead of {want}",
                    case.name,
                    result.return_value
                );
                runs = u64::from(repeat);
                (
                    cpu as f64 / f64::from(repeat),
                    result.duration.as_nanos() as f64,
                )
            }
            Method::Loop => {
                let program = self.program(case.program);
                let (per_call, calls) = run_calls(program, &case.name, case.frames.iter(), want)?;
                runs = calls;
                (per_call, per_call)
            }
            Method::Call => {
                let program = self.program(case.program);
                let frames = std::iter::repeat_n(&case.frames[0], case.calls);
                let (per_call, calls) = run_calls(program, &case.name, frames, want)?;
                runs = calls;
                (per_call, per_call)
            }
        };
        if let (Some(l), Some(v)) = (lab, counter_vip) {
            let new_flows = self.labs[l].new_flows_counter(v)? - new_before;
            match case.expect {
                Expect::Established { .. } => ensure!(
                    warmup || new_flows == 0,
                    "{}: {new_flows} new flows on an established path",
                    case.name
                ),
                Expect::NewFlows { .. } => ensure!(
                    new_flows == runs,
                    "{}: {new_flows} new flows in {runs} runs",
                    case.name
                ),
                // Before issue 11 every flow is recorded: the first run records it, the rest
                // are hits; only the verdict is checked then.
                Expect::Unchanged { .. } if self.records_every_flow => {}
                Expect::Unchanged { syn, .. } => {
                    let want_new = if syn { runs } else { 0 };
                    ensure!(
                        new_flows == want_new,
                        "{}: {new_flows} new flows in {runs} runs (expected {want_new})",
                        case.name
                    );
                    if let Some(key) = &case.probe {
                        ensure!(
                            !self.labs[l].is_recorded(key),
                            "{}: the flow of an unchanged slot is in the flow table",
                            case.name
                        );
                    }
                }
                Expect::ChangedHit { .. } => {
                    ensure!(
                        warmup || new_flows == 0,
                        "{}: {new_flows} new flows on a flow-table hit",
                        case.name
                    );
                    if let Some(key) = &case.probe {
                        ensure!(
                            self.labs[l].is_recorded(key),
                            "{}: the changed slot's flow is not in the flow table, so the \
                             calls were not flow-table hits",
                            case.name
                        );
                    }
                }
                Expect::Verdict(_) => {}
            }
        }
        if let (Some(l), Some(on)) = (lab, case.flow_events) {
            let lab = &mut self.labs[l];
            lab.set_flow_events(false)?;
            let read = lab.drain_flow_events() as u64;
            let lost = lab.lab.balancer.dataplane.flow_events_lost()? - lost_before;
            let want = if on { runs } else { 0 };
            ensure!(
                read == want && lost == 0,
                "{}: {read} flow events read and {lost} lost in {runs} runs (expected {want})",
                case.name
            );
        }
        if let Some(l) = lab {
            let flows = &mut self.labs[l].lab.balancer.dataplane.maps.flows;
            // Since issue 11 a SYN in an unchanged slot is not recorded: remove what is there.
            for key in &case.inserted {
                if flows.get(key, 0).is_ok() {
                    flows
                        .remove(key)
                        .with_context(|| format!("{}: removing a measured new flow", case.name))?;
                }
            }
        }
        Ok(measured)
    }
}

fn point_name(path: &str, backends: Option<u32>, flows: Option<u32>) -> String {
    match (backends, flows) {
        (Some(b), Some(f)) => names::point(path, b, f),
        (None, Some(f)) => names::flows_point(path, f),
        _ => path.to_owned(),
    }
}

/// Fresh IPv4 TCP SYNs to `spec`, one per call: (source, source port, frame). `base` keeps the
/// sources of different uses apart.
fn syn_frames(spec: &VipSpec, base: u8, calls: usize) -> Vec<(IpAddr, u16, Vec<u8>)> {
    (0..calls)
        .map(|n| {
            let src = IpAddr::V4(Ipv4Addr::new(198, 18, base, (n / 50_000) as u8 + 1));
            let sport = 1024 + (n % 50_000) as u16;
            (src, sport, frame(spec, src, sport, TCP_SYN))
        })
        .collect()
}

/// Fresh IPv4 UDP flows to `spec`, one per call (see [`syn_frames`]).
fn udp_frames(spec: &VipSpec, base: u8, calls: usize) -> Vec<(IpAddr, u16, Vec<u8>)> {
    (0..calls)
        .map(|n| {
            let src = IpAddr::V4(Ipv4Addr::new(198, 18, base, (n / 50_000) as u8 + 1));
            let sport = 1024 + (n % 50_000) as u16;
            (src, sport, frame(spec, src, sport, L4::Udp))
        })
        .collect()
}

/// Indices of pre-filled flows of VIP `v` (of `vips`) in a table filled with `flows`: a working
/// set of min(`working_set`, flows of the VIP), spread evenly over the fill order.
fn spread_indices(flows: u32, vips: usize, v: usize, working_set: usize) -> Vec<u32> {
    // Pre-filled flow i belongs to VIP i % vips: this VIP has the i < flows with i ≡ v.
    let of_vip = (flows as usize).saturating_sub(v).div_ceil(vips);
    let set = of_vip.min(working_set).max(1);
    let stride = (of_vip / set).max(1);
    (0..set).map(|n| ((n * stride) * vips + v) as u32).collect()
}

/// `calls` frames of established flows of VIP `v` from the pre-filled table (`spread_indices`),
/// visited in a scrambled order.
fn spread_frames(lab: &Lab, v: usize, calls: usize, working_set: usize) -> Vec<Vec<u8>> {
    let spec = &lab.specs[v];
    let frames: Vec<Vec<u8>> = spread_indices(lab.flows, lab.specs.len(), v, working_set)
        .into_iter()
        .map(|i| {
            let (pv, src, sport) = prefill_flow(&lab.specs, i);
            debug_assert_eq!(pv, v);
            frame(spec, src, sport, l4_of(spec))
        })
        .collect();
    // Visit them in a scrambled order, `calls` times in all.
    let mut order: Vec<usize> = (0..calls).map(|n| n % frames.len()).collect();
    let mut x = 0x9e37_79b9_u32;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        order.swap(i, x as usize % (i + 1));
    }
    order.into_iter().map(|n| frames[n].clone()).collect()
}

/// The order of the paths in the report (cases are sorted by it, then by backends and flows).
const PATH_ORDER: [&str; 18] = [
    names::ESTABLISHED_V4,
    names::ESTABLISHED_V4_SPREAD,
    names::ESTABLISHED_V4_LOOP,
    names::NEW_FLOW_V4,
    names::NEW_FLOW_UDP_EVENTS_OFF,
    names::NEW_FLOW_UDP_EVENTS_ON,
    names::ESTABLISHED_V6,
    names::ESTABLISHED_V6_SPREAD,
    names::ESTABLISHED_UDP,
    names::ESTABLISHED_UDP_SPREAD,
    names::NON_VIP_PASS,
    names::CALL_ACK_V4,
    names::CALL_ACK_V6,
    names::CALL_SYN_V4,
    names::CALL_NON_VIP,
    names::CALL_ACK_V4_CHANGED,
    names::CALL_ACK_V4_IPIP,
    names::CALL_ACK_V4_GUE,
];

fn build_cases(opts: &PerPacketOptions, labs: &[Lab]) -> Vec<Case> {
    let calls = opts.loop_calls();
    let rep_flows = opts.representative_flows();
    let mut cases = Vec::new();
    let case = |path: &'static str,
                method: Method,
                program: Program,
                frames: Vec<Vec<u8>>,
                expect: Expect,
                backends: Option<u32>,
                flows: Option<u32>,
                note: &'static str| Case {
        name: match program {
            Program::Lb(_) => point_name(path, backends, flows),
            _ => format!("{path}/{}", method.name()),
        },
        path,
        method,
        program,
        calls: if method == Method::Call {
            calls
        } else {
            frames.len()
        },
        frames,
        inserted: Vec::new(),
        probe: None,
        flow_events: None,
        expect,
        backends,
        flows,
        note,
        samples: Vec::new(),
        kernel_samples: Vec::new(),
        program_info: Vec::new(),
        data_plane: "",
    };

    // Frames for loop runs of the reference programs: a fresh SYN per call, like "new flow".
    let specs = vip_specs();
    let reference_frames: Vec<Vec<u8>> = syn_frames(&specs[1], 0, calls)
        .into_iter()
        .map(|(_, _, f)| f)
        .collect();
    let hot = IpAddr::V4(Ipv4Addr::new(198, 19, 0, 1));
    let hot6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 1));
    let reflect_frame = frame(&specs[1], hot, 40_000, TCP_ACK);
    for method in [Method::Repeat, Method::Loop, Method::Call] {
        let frames = match method {
            Method::Repeat | Method::Call => vec![reflect_frame.clone()],
            Method::Loop => reference_frames.clone(),
        };
        cases.push(case(
            "trivial",
            method,
            Program::Trivial,
            frames.clone(),
            Expect::Verdict(XDP_PASS),
            None,
            None,
            "bench_pass: returns XDP_PASS (gross cost; subtracted from every repeat and loop \
             figure; the call method keeps figures gross)",
        ));
        cases.push(case(
            "reflector",
            method,
            Program::Reflector,
            frames,
            Expect::Verdict(XDP_TX),
            None,
            None,
            "bench_reflect: MAC swap + XDP_TX, the floor of any L2 forwarder",
        ));
    }

    let mut lb_cases = Vec::new();
    for (l, lab) in labs.iter().enumerate() {
        let f = lab.flows;
        for &b in &BACKENDS {
            // The three kinds of VIP with this backend count: the established paths.
            for (path, spread_path, protocol, v6, src, note, spread_note) in [
                (
                    names::ESTABLISHED_V4,
                    names::ESTABLISHED_V4_SPREAD,
                    PROTO_TCP,
                    false,
                    hot,
                    "one established IPv4 TCP flow, repeat=N (idempotent: the output is the \
                     same flow)",
                    "established IPv4 TCP flows from the pre-filled table, a different one per \
                     call (working set of min(16384, flows of the VIP)), repeat=1 calls",
                ),
                (
                    names::ESTABLISHED_V6,
                    names::ESTABLISHED_V6_SPREAD,
                    PROTO_TCP,
                    true,
                    hot6,
                    "one established IPv6 TCP flow, repeat=N",
                    "established IPv6 TCP flows from the pre-filled table, a different one per \
                     call (working set of min(16384, flows of the VIP)), repeat=1 calls",
                ),
                (
                    names::ESTABLISHED_UDP,
                    names::ESTABLISHED_UDP_SPREAD,
                    PROTO_UDP,
                    false,
                    hot,
                    "one established IPv4 UDP flow (18-byte payload), repeat=N",
                    "established IPv4 UDP flows (18-byte payload) from the pre-filled table, a \
                     different one per call (working set of min(16384, flows of the VIP)), \
                     repeat=1 calls",
                ),
            ] {
                let v = lab.vip_index(b, protocol, v6);
                let spec = &lab.specs[v];
                let hot_frame = frame(spec, src, 40_000, l4_of(spec));
                let established = Expect::Established {
                    verdict: XDP_TX,
                    vip: v,
                };
                lb_cases.push(case(
                    path,
                    Method::Repeat,
                    Program::Lb(l),
                    vec![hot_frame.clone()],
                    established,
                    Some(b),
                    Some(f),
                    note,
                ));
                lb_cases.push(case(
                    spread_path,
                    Method::Loop,
                    Program::Lb(l),
                    spread_frames(lab, v, calls, opts.working_set()),
                    established,
                    Some(b),
                    Some(f),
                    spread_note,
                ));
                if path == names::ESTABLISHED_V4 && f == rep_flows && b == REPRESENTATIVE_BACKENDS {
                    lb_cases.push(case(
                        names::ESTABLISHED_V4_LOOP,
                        Method::Loop,
                        Program::Lb(l),
                        vec![hot_frame; calls],
                        established,
                        Some(b),
                        Some(f),
                        "the one established IPv4 TCP flow of vip_established_v4, repeat=1 calls",
                    ));
                }
            }
            // New flows to the IPv4 TCP VIP with this backend count.
            let v = lab.vip_index(b, PROTO_TCP, false);
            let spec = &lab.specs[v];
            let fresh = syn_frames(spec, 1, calls);
            let mut new_flow = case(
                names::NEW_FLOW_V4,
                Method::Loop,
                Program::Lb(l),
                fresh.iter().map(|(_, _, f)| f.clone()).collect(),
                Expect::NewFlows { vip: v },
                Some(b),
                Some(f),
                "IPv4 TCP SYN of a flow not in the table (a fresh source port per call; the flows \
                 are removed after each trial so the fill level stays), repeat=1 calls",
            );
            new_flow.inserted = fresh
                .iter()
                .map(|&(src, sport, _)| flow_key(src, sport, spec.address, spec.port, PROTO_TCP))
                .collect();
            lb_cases.push(new_flow);

            // Call method (issue 11's targets): the same frame every call, unchanged slots.
            let syn_src = IpAddr::V4(Ipv4Addr::new(198, 19, 0, 2));
            for (path, v6, src, l4, note) in [
                (
                    names::CALL_ACK_V4,
                    false,
                    hot,
                    TCP_ACK,
                    "54-byte IPv4 TCP ACK of an established flow in an unchanged slot (no flow \
                     table access), repeat=1 calls on the same frame, gross",
                ),
                (
                    names::CALL_ACK_V6,
                    true,
                    hot6,
                    TCP_ACK,
                    "74-byte IPv6 TCP ACK of an established flow in an unchanged slot, repeat=1 \
                     calls on the same frame, gross",
                ),
                (
                    names::CALL_SYN_V4,
                    false,
                    syn_src,
                    TCP_SYN,
                    "54-byte IPv4 TCP SYN of a new flow in an unchanged slot (not recorded, so \
                     the same frame is a new flow every call), repeat=1 calls, gross",
                ),
            ] {
                let v = lab.vip_index(b, PROTO_TCP, v6);
                let spec = &lab.specs[v];
                let mut c = case(
                    path,
                    Method::Call,
                    Program::Lb(l),
                    vec![frame(spec, src, 40_000, l4)],
                    Expect::Unchanged {
                        vip: v,
                        syn: l4 == TCP_SYN,
                    },
                    Some(b),
                    Some(f),
                    note,
                );
                c.probe = Some(flow_key(src, 40_000, spec.address, spec.port, PROTO_TCP));
                lb_cases.push(c);
            }
        }
        let not_vip = FrameSpec {
            l4: TCP_ACK,
            ..FrameSpec::tcp_syn(hot, 40_000, IpAddr::V4(NOT_A_VIP), 80)
        }
        .build();
        lb_cases.push(case(
            names::CALL_NON_VIP,
            Method::Call,
            Program::Lb(l),
            vec![not_vip.clone()],
            Expect::Verdict(XDP_PASS),
            None,
            Some(f),
            "54-byte IPv4 TCP ACK to an address that is no VIP (XDP_PASS), repeat=1 calls on \
             the same frame, gross",
        ));
        let changed = changed_vip_spec();
        let (src, sport) = lab.changed_flow;
        let mut changed_hit = case(
            names::CALL_ACK_V4_CHANGED,
            Method::Call,
            Program::Lb(l),
            vec![frame(&changed, src, sport, TCP_ACK)],
            Expect::ChangedHit {
                vip: lab.changed_vip(),
            },
            Some(CHANGED_VIP_BACKENDS),
            Some(f),
            "54-byte IPv4 TCP ACK in a changed slot (one ring change after the lab was up), \
             its flow recorded in the warm-up: a flow-table hit every call; repeat=1 calls on \
             the same frame, gross",
        );
        changed_hit.probe = Some(flow_key(
            src,
            sport,
            changed.address,
            changed.port,
            PROTO_TCP,
        ));
        lb_cases.push(changed_hit);

        // Issue 13: the same ACK through encapsulating VIPs (outer headers written in XDP).
        for (k, (spec, path, note)) in encap_vip_specs()
            .iter()
            .zip([
                (
                    names::CALL_ACK_V4_IPIP,
                    "54-byte IPv4 TCP ACK in an unchanged slot of a forward = \"ipip\" VIP: \
                     leaves as a 74-byte IPv4-in-IPv4 frame; repeat=1 calls on the same frame, \
                     gross",
                ),
                (
                    names::CALL_ACK_V4_GUE,
                    "the same through a forward = \"gue\" VIP: an 82-byte IPv4/UDP/IPv4 \
                     frame; repeat=1 calls, gross",
                ),
            ])
            .map(|(spec, (path, note))| (spec, path, note))
            .enumerate()
        {
            let mut c = case(
                path,
                Method::Call,
                Program::Lb(l),
                vec![frame(spec, hot, 40_000, TCP_ACK)],
                Expect::Unchanged {
                    vip: lab.encap_vip(k),
                    syn: false,
                },
                Some(REPRESENTATIVE_BACKENDS),
                Some(f),
                note,
            );
            c.probe = Some(flow_key(hot, 40_000, spec.address, spec.port, PROTO_TCP));
            lb_cases.push(c);
        }

        // Issue 12: what telling the daemon about each insert costs. New UDP flows (every one
        // is recorded) to the representative UDP VIP, flow events on and off, a fresh flow per
        // call; the flows are removed and the events read after each trial.
        let v = lab.vip_index(REPRESENTATIVE_BACKENDS, PROTO_UDP, false);
        let spec = &lab.specs[v];
        for (path, on, base, note) in [
            (
                names::NEW_FLOW_UDP_EVENTS_OFF,
                false,
                2,
                "IPv4 UDP packet of a flow not in the table (recorded: a flow-table insert), \
                 flow events off (FLOW_EVENTS_ON = 0: no ring-buffer work); a fresh flow per \
                 call, removed after each trial; repeat=1 calls",
            ),
            (
                names::NEW_FLOW_UDP_EVENTS_ON,
                true,
                3,
                "the same with flow events on: each insert also reserves and submits a 48-byte \
                 FlowEvent in FLOW_EVENTS (adaptive wake-up; the reader drains after the trial, \
                 so the ring never fills); repeat=1 calls",
            ),
        ] {
            let fresh = udp_frames(spec, base, calls);
            let mut c = case(
                path,
                Method::Loop,
                Program::Lb(l),
                fresh.iter().map(|(_, _, f)| f.clone()).collect(),
                Expect::NewFlows { vip: v },
                Some(REPRESENTATIVE_BACKENDS),
                Some(f),
                note,
            );
            c.inserted = fresh
                .iter()
                .map(|&(src, sport, _)| flow_key(src, sport, spec.address, spec.port, PROTO_UDP))
                .collect();
            c.flow_events = Some(on);
            lb_cases.push(c);
        }
        lb_cases.push(case(
            names::NON_VIP_PASS,
            Method::Repeat,
            Program::Lb(l),
            vec![not_vip],
            Expect::Verdict(XDP_PASS),
            None,
            Some(f),
            "IPv4 TCP to an address that is no VIP: parse, VIP lookup miss, XDP_PASS; repeat=N \
             (no backend set is read: the same at every backend count)",
        ));
    }
    // Report order: by path, then backends, then flows (the labs are in fill order).
    let rank = |c: &Case| PATH_ORDER.iter().position(|p| *p == c.path);
    lb_cases.sort_by_key(|c| (rank(c), c.backends));
    cases.extend(lb_cases);
    cases
}

/// Measures every case; returns the figures (net of the trivial program, except the trivial
/// program's own).
pub fn run(opts: &PerPacketOptions) -> Result<Vec<Figure>> {
    ensure!(opts.trials >= 1, "at least one trial");
    let cpus = allowed_cpus()?;
    ensure!(!cpus.is_empty(), "no CPU to run on");
    let measure_cpu = *cpus.last().expect("not empty");

    // The flow-event readers register with a reactor; declared first, so dropped after the labs.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("a tokio runtime for the flow-event readers")?;
    let _entered = runtime.enter();
    let mut bench = Bench::load()?;
    let mut labs = Vec::new();
    for &flows in opts.flows() {
        let started = Instant::now();
        let lab = Lab::new(flows, opts.loop_calls(), &cpus)?;
        eprintln!(
            "per-packet: lab with {flows} flows in a table of {} ready in {:.1} s",
            lab.capacity,
            started.elapsed().as_secs_f64()
        );
        labs.push(lab);
    }
    let previous = pin_to(measure_cpu)?;
    let result = measure(opts, &mut bench, &mut labs, measure_cpu);
    sched_setaffinity(Pid::from_raw(0), &previous).context("restoring the CPU affinity")?;
    let cases = result?;
    let next_hop = super::next_hop::run(opts.trials, opts.quick, measure_cpu)?;
    for lab in &labs {
        let count = lab.count();
        if count.abs_diff(lab.filled) > lab.filled / 100 + 16 {
            eprintln!(
                "warning: the table of the {}-flow lab holds {count} entries after the run",
                lab.flows
            );
        }
    }
    let mut figures = figures(&cases, &labs, opts, measure_cpu);
    figures.extend(next_hop);
    Ok(figures)
}

fn measure(
    opts: &PerPacketOptions,
    bench: &mut Bench,
    labs: &mut [Lab],
    cpu: usize,
) -> Result<Vec<Case>> {
    let mut cases = build_cases(opts, labs);
    let repeat = opts.repeat();
    let records_every_flow = match labs.first_mut() {
        Some(lab) => lab.records_every_flow()?,
        None => false,
    };
    if records_every_flow {
        eprintln!(
            "per-packet: this data plane records every flow (before issue 11): unchanged-slot \
             figures are checked by verdict only"
        );
    }
    let mut runner = Runner {
        bench,
        labs,
        records_every_flow,
    };
    // One untimed round: inserts the hot flows, warms caches and the JIT'd code.
    for case in &cases {
        runner.trial(case, repeat / 10, true)?;
    }
    eprintln!(
        "per-packet: {} cases x {} trials on CPU {cpu} (repeat={repeat}, loop={} calls)",
        cases.len(),
        opts.trials,
        opts.loop_calls()
    );
    let n = cases.len();
    for trial in 0..opts.trials {
        let started = Instant::now();
        for i in 0..n {
            let c = (i + trial * 7) % n;
            let (gross, kernel) = runner.trial(&cases[c], repeat, false)?;
            cases[c].samples.push(gross);
            cases[c].kernel_samples.push(kernel);
        }
        eprintln!(
            "per-packet: trial {}/{} done in {:.1} s",
            trial + 1,
            opts.trials,
            started.elapsed().as_secs_f64()
        );
    }
    let data_plane = if records_every_flow {
        "records every flow (before issue 11)"
    } else {
        "flow table only in changed slots (issue 11)"
    };
    let mut dumped = Vec::new();
    for case in &mut cases {
        case.data_plane = data_plane;
        if let (Some(dir), Ok(info)) = (&opts.dump_dir, runner.program(case.program).info()) {
            let name = info.name_as_str().unwrap_or("prog").to_owned();
            if !dumped.contains(&name) {
                dump_program(dir, &name, info.id());
                dumped.push(name);
            }
        }
        if let Ok(info) = runner.program(case.program).info() {
            let name = info.name_as_str().unwrap_or("?").to_owned();
            case.program_info = vec![
                ("program", name),
                (
                    "program_xlated_insns",
                    info.size_translated()
                        .map_or("?".to_owned(), |b| (b / 8).to_string()),
                ),
                ("program_jited_bytes", info.size_jitted().to_string()),
                (
                    "program_verified_insns",
                    info.verified_instruction_count()
                        .map_or("?".to_owned(), |n| n.to_string()),
                ),
            ];
        }
    }
    Ok(cases)
}

/// `bpftool prog dump xlated` and `jited` of program `id` into `dir`, and `bpftool prog show` on
/// stderr; a note on stderr instead where bpftool is missing or fails (this is optional).
fn dump_program(dir: &Path, name: &str, id: u32) {
    let bpftool = |args: &[&str]| {
        std::process::Command::new("bpftool")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| o.stdout)
    };
    let id = id.to_string();
    let Some(show) = bpftool(&["prog", "show", "id", &id]) else {
        eprintln!("per-packet: no bpftool prog show for {name} (id {id}): dumps skipped");
        return;
    };
    eprint!("per-packet: {}", String::from_utf8_lossy(&show));
    if let Err(e) = std::fs::create_dir_all(dir) {
        eprintln!("per-packet: cannot create {}: {e}", dir.display());
        return;
    }
    for kind in ["xlated", "jited"] {
        let path = dir.join(format!("{name}.{kind}.txt"));
        match bpftool(&["prog", "dump", kind, "id", &id]) {
            Some(text) => match std::fs::write(&path, text) {
                Ok(()) => eprintln!("per-packet: wrote {}", path.display()),
                Err(e) => eprintln!("per-packet: writing {}: {e}", path.display()),
            },
            None => eprintln!("per-packet: bpftool prog dump {kind} id {id} failed"),
        }
    }
}

fn median(values: &[f64]) -> f64 {
    Figure {
        group: String::new(),
        name: String::new(),
        unit: String::new(),
        samples: values.to_vec(),
        baseline: None,
        params: BTreeMap::new(),
    }
    .median()
}

fn figures(cases: &[Case], labs: &[Lab], opts: &PerPacketOptions, cpu: usize) -> Vec<Figure> {
    let trivial = |method: Method| {
        cases
            .iter()
            .find(|c| c.program == Program::Trivial && c.method == method)
            .expect("trivial case")
    };
    cases
        .iter()
        .map(|case| {
            let mut params = BTreeMap::new();
            params.insert("path".to_owned(), case.path.to_owned());
            params.insert("method".to_owned(), case.method.name().to_owned());
            params.insert(
                "runs_per_trial".to_owned(),
                match case.method {
                    Method::Repeat => opts.repeat().to_string(),
                    Method::Loop | Method::Call => case.calls.to_string(),
                },
            );
            params.insert("frame_bytes".to_owned(), case.frames[0].len().to_string());
            params.insert("cpu".to_owned(), cpu.to_string());
            if let Program::Lb(l) = case.program {
                let v = labs[l].changed_vip();
                params.insert(
                    "changed_vip_changed_slots".to_owned(),
                    labs[l].lab.balancer.changed_slots(v).to_string(),
                );
            }
            for (key, value) in &case.program_info {
                params.insert((*key).to_owned(), value.clone());
            }
            if let Some(on) = case.flow_events {
                params.insert(
                    "flow_events".to_owned(),
                    if on { "on" } else { "off" }.to_owned(),
                );
            }
            params.insert("what".to_owned(), case.note.to_owned());
            params.insert(
                "gross_median_ns".to_owned(),
                format!("{:.2}", median(&case.samples)),
            );
            params.insert(
                "kernel_median_ns".to_owned(),
                format!("{:.2}", median(&case.kernel_samples)),
            );
            match (case.backends, case.program) {
                (Some(b), _) => {
                    params.insert("backends".to_owned(), b.to_string());
                }
                (None, Program::Lb(_)) => {
                    params.insert(
                        "backends".to_owned(),
                        "n/a: not a VIP, no backend set is read (the cost does not depend on \
                         the backend count)"
                            .to_owned(),
                    );
                }
                _ => {}
            }
            if let Some(f) = case.flows {
                params.insert("flows".to_owned(), f.to_string());
            }
            if let Program::Lb(l) = case.program {
                params.insert(
                    "flow_table_capacity".to_owned(),
                    labs[l].capacity.to_string(),
                );
                params.insert("ring_size".to_owned(), RING_SIZE.to_string());
            }
            if let Program::Lb(_) = case.program {
                params.insert("data_plane".to_owned(), case.data_plane.to_owned());
            }
            let (samples, baseline) = if case.method == Method::Call {
                // Gross: the harness's fixed cost stays in, the reflector's as well.
                let base = trivial(case.method);
                params.insert("gross".to_owned(), "true".to_owned());
                params.insert(
                    "net_median_ns".to_owned(),
                    format!("{:.2}", median(&case.samples) - median(&base.samples)),
                );
                let baseline = match case.program {
                    Program::Lb(_) => Some(names::REFLECTOR_CALL.to_owned()),
                    _ => None,
                };
                (case.samples.clone(), baseline)
            } else if case.program == Program::Trivial {
                (case.samples.clone(), None)
            } else {
                let base = trivial(case.method);
                params.insert("minus".to_owned(), base.name.clone());
                let net = case
                    .samples
                    .iter()
                    .zip(&base.samples)
                    .map(|(g, t)| g - t)
                    .collect();
                let baseline = match case.program {
                    Program::Lb(_) => Some(format!("reflector/{}", case.method.name())),
                    _ => None,
                };
                (net, baseline)
            };
            Figure {
                group: if case.method == Method::Call {
                    CALL_GROUP
                } else {
                    GROUP
                }
                .to_owned(),
                name: case.name.clone(),
                unit: "ns".to_owned(),
                samples,
                baseline,
                params,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_config_parses_and_has_the_grid() {
        let text = lab_config(&vip_specs(), 1 << 20);
        let config = Config::parse(&text, Path::new("t.toml")).expect("valid");
        let counts: Vec<usize> = config.vips.iter().map(|v| v.backends.len()).collect();
        assert_eq!(
            counts,
            [
                1,
                100,
                1000,
                1,
                100,
                1000,
                1,
                100,
                1000,
                CHANGED_VIP_BACKENDS as usize,
                REPRESENTATIVE_BACKENDS as usize,
                REPRESENTATIVE_BACKENDS as usize
            ]
        );
        // The last two are the encapsulating VIPs (issue 13), everything else L2.
        let forwards: Vec<_> = config.vips.iter().map(|v| v.forward.as_str()).collect();
        let mut want = vec!["l2"; 10];
        want.extend(["ipip", "gue"]);
        assert_eq!(forwards, want);
    }

    #[test]
    fn spread_flows_are_prefilled_flows_of_their_vip() {
        let vips = vip_specs().len();
        for flows in FLOWS.into_iter().chain(QUICK_FLOWS) {
            for v in 0..vips {
                let of_vip = (0..flows).filter(|i| *i as usize % vips == v).count();
                let indices = spread_indices(flows, vips, v, 16_384);
                assert_eq!(indices.len(), of_vip.min(16_384), "flows {flows}, vip {v}");
                assert!(indices.iter().all(|&i| i < flows && i as usize % vips == v));
                let distinct: std::collections::HashSet<_> = indices.iter().collect();
                assert_eq!(distinct.len(), indices.len());
            }
        }
    }

    #[test]
    fn prefilled_flows_are_distinct() {
        let specs = vip_specs();
        let mut seen = std::collections::HashSet::new();
        for i in 0..300_000 {
            let (v, src, sport) = prefill_flow(&specs, i);
            let s = &specs[v];
            assert!(seen.insert(flow_key(src, sport, s.address, s.port, s.protocol)));
        }
    }
}
