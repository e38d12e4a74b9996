//! Throughput (issue 4 §2): packets per second through the load balancer, beside the minimal
//! MAC-swap reflector (the limit of the path) and nftables DNAT load balancing (what a user
//! without XDP would run), all on the same path so that their ratios mean something.
//!
//! # The path
//!
//! ```text
//!   generator namespace                 LB namespace
//!   ┌──────────────────────────┐        ┌─────────────────────────────────────────┐
//!   │ bench_gen (live frames)  │        │                                         │
//!   │   XDP_TX out of g0 ──────┼──veth──┼─► l0: lb / bench_reflect / bench_pass   │
//!   │ bench_drop on g0 (sink) ◄┼────────┼── XDP_TX (or nftables DNAT + forward)   │
//!   └──────────────────────────┘        └─────────────────────────────────────────┘
//! ```
//!
//! Every setup gets its own pair of namespaces, built once and kept for the whole run, so trials
//! can be interleaved (trial 1 of every setup, then trial 2 of every setup, ...) without
//! rebuilding anything between them.
//!
//! - The generator is a live-frames `BPF_PROG_TEST_RUN` of `bench_gen` (kernel >= 5.18): the
//!   kernel runs the program `repeat` times on frames from a page pool it creates for the run
//!   and, because it returns `XDP_TX`, sends every frame out of the interface named by
//!   `ingress_ifindex` in the `xdp_md` context (g0), in batches of 64. It runs on a thread that
//!   has entered the generator namespace (the kernel resolves that ifindex in the caller's
//!   namespace), pinned to one CPU.
//! - Frames: 60-byte UDP/IPv4 (no options, no VLAN), client 10.201.0.2 → VIP 10.99.0.100:53,
//!   source MAC g0, destination MAC l0, UDP checksum 0 (bench_gen rewrites the source port and
//!   does no checksum work; a zero checksum means "none" in IPv4, so conntrack accepts it).
//! - TCP frames (issue 11): 54-byte TCP/IPv4 (no options), client → VIP:80, flags ACK
//!   (`lb_tcp`, `reflector_tcp`) or SYN (`lb_tcp_syn`). bench_gen rewrites the source port the
//!   same way (it sits at the same offset) and leaves the TCP checksum stale: neither the load
//!   balancer nor the sink looks at it. Each frame is another flow; with ACKs they are
//!   established flows (in unchanged ring slots since issue 11, so the flow table is not
//!   touched), with SYNs every frame is a new flow, so the Mpps of `lb_tcp_syn` is the number of
//!   new TCP flows per second through the program. It runs on the `lb_new_flows` daemon (table
//!   of 1024 entries), so that every SYN is a new flow also for a data plane that records every
//!   flow; the daemon's `new_flows` counter of the TCP VIP must show at least 99% of its packets
//!   as new flows, or the run is an error.
//! - Flows: bench_gen writes `(counter as u16) | 0x400` into the source port, so the source port
//!   walks 32768 distinct values and the pattern repeats every 65536 packets. With a flow table
//!   larger than that, only the first pass creates flows; after the warm-up every packet is an
//!   established flow. That is what `lb` measures (flow table 1048576). `lb_new_flows` runs the
//!   same daemon with the smallest flow table the config accepts (1024 entries), which the 32768
//!   cycling flows always miss: every packet takes the new-flow path (Maglev lookup and
//!   flow-table insert with LRU eviction). The daemon's own `new_flows` counter confirms which
//!   regime each figure was in (`new_flow_fraction` in its params).
//! - The sink is `bench_drop` attached natively on g0: whatever l0 sends back arrives there.
//!   Its per-CPU counter (summed over CPUs) read right when the generator returns, minus its
//!   value before, over the wall-clock time of the generator, is the figure in Mpps. The
//!   delivered fraction compares the count once it has settled (frames still in flight when the
//!   generator returned are included) with the packets sent.
//!
//! # Recycled and fresh frames (two live-frames traps, both found here on Linux 6.18)
//!
//! 1. **Frames come back modified.** Within one test run the kernel recycles a frame's page as
//!    soon as the frame is freed, and initialises a page from `data_in` only the first time the
//!    run uses it. Whatever the path wrote into the frame is what the generator sends next time.
//!    The reflector (MAC swap) and the LB (MAC rewrite to the backend's MAC, which here is g0's)
//!    leave a frame that is still a valid input for themselves: the same VIP packet with other
//!    MACs, at the same cost (the LB's counters confirm every packet hit the VIP). The nftables
//!    path does not: after DNAT and forwarding the frame is addressed to g0's MAC and a backend
//!    with TTL 63, so l0 drops it as not for this host; a long run delivered only its first 64
//!    frames. So nftables runs with **fresh frames**: one batch (64 frames) per test run, each run
//!    with new pages initialised from `data_in`. That costs the generator 0.2 to 0.3 µs per packet
//!    more here (each run creates and destroys a page pool; compare `reflector` with
//!    `reflector_fresh_frames`), so the LB and the reflector are measured
//!    that way too (`lb_fresh_frames`, `reflector_fresh_frames`), and the LB-to-nftables ratio is
//!    taken between fresh-frame figures. The extra generator cost is in both; it can only pull the
//!    ratio towards 1, so that ratio is a lower bound. The reflector and LB figures against which
//!    the LB is judged (`lb`, `lb_new_flows`, `reflector`) use long runs (**recycled frames**).
//! 2. **Every live-frames run costs ~20 ms** unless the program is already in the kernel's XDP
//!    dispatcher: a run adds the program to the dispatcher and removes it again, each time
//!    rewriting the dispatcher image and waiting for an RCU grace period. Attaching `bench_gen`
//!    natively to an idle veth (`gx0`, down, both ends in the generator namespace) keeps it
//!    there for the whole benchmark, so a run costs microseconds.
//!
//! # Setups
//!
//! - `lb`: the real `lb run` (release binary, see [`crate::daemon::lb_binary`]) attached natively
//!   on l0, one UDP VIP with `backends` backends on l0's subnet, `check = "none"`, the backends'
//!   MACs given as permanent neighbour entries that point at g0, so the LB's `XDP_TX` lands in the
//!   sink. `lb_new_flows`: the same with `flow_table_size = 1024` (see above). Both daemons also
//!   serve a TCP VIP (`bench_tcp`, same address, port 80, same backends) for the TCP frames; the
//!   daemon brings every backend up in one publish before it attaches, so all its ring slots are
//!   unchanged.
//! - `reflector`: `bench_reflect` on l0 (swap MACs, `XDP_TX`): the limit of this path.
//! - `nftables_dnat`: `bench_pass` on l0 (a veth end must run an XDP program to receive frames sent
//!   with native `XDP_TX`, DESIGN §5 trap 1), forwarding on, `rp_filter` and `send_redirects` off,
//!   and an nftables DNAT rule spreading the VIP over the same backends with `numgen inc`; the
//!   backends are routed out of l0 with permanent neighbours pointing at g0.
//!
//! Each setup is checked to really forward: the sink must count packets, the LB's final
//! counters must show `tx` packets (and no fewer than the sink saw), and for nftables the DNAT
//! rule's counter, the conntrack table and the namespace's `ForwDatagrams` must have moved.
//!
//! # Figures
//!
//! Unit Mpps, one sample per trial, trials interleaved (trial 1 of every figure, then trial 2,
//! ...); params say `setup`, `frames` (`recycled`/`fresh`), `delivered_fraction`, `backends`,
//! `packets` and what the setup's own counters showed (`lb_packets`, `new_flow_fraction`,
//! `dnat_new_connections`, `forwarded_datagrams`, ...: these cover the whole life of that path,
//! warm-ups and every figure measured on it).
//!
//! | figure | frames | baseline |
//! |---|---|---|
//! | `throughput/lb` | recycled | `throughput/reflector` |
//! | `throughput/lb_new_flows` | recycled | `throughput/reflector` |
//! | `throughput/reflector` | recycled | |
//! | `throughput/nftables_dnat` | fresh | `throughput/reflector_fresh_frames` |
//! | `throughput/lb_fresh_frames` | fresh | `throughput/reflector_fresh_frames` |
//! | `throughput/reflector_fresh_frames` | fresh | |
//! | `throughput/lb_tcp` (TCP ACK) | recycled | `throughput/reflector_tcp` |
//! | `throughput/lb_tcp_syn` (TCP SYN, on the `lb_new_flows` daemon) | recycled | `throughput/reflector_tcp` |
//! | `throughput/reflector_tcp` (TCP ACK) | recycled | |
//!
//! The issue's targets are ratios, so they are figures too, unit `"ratio"`, one sample per trial
//! from the same trial of both figures (run seconds apart): `throughput/lb_tcp_vs_reflector_tcp`
//! (issue 11's target: at least 0.8), `throughput/lb_vs_reflector` (UDP; at least 0.8 in issue 4,
//! information since issue 11), `throughput/lb_new_flows_vs_reflector`,
//! `throughput/lb_tcp_syn_vs_reflector_tcp` and `throughput/lb_vs_nftables_dnat` (at least 5;
//! `lb_fresh_frames` over `nftables_dnat`), with params `numerator`, `denominator`, `target`.
//! With pktgen there is no recycling, so the fresh-frame figures are left out and
//! `lb_vs_nftables_dnat` divides `lb` by `nftables_dnat`; pktgen sends UDP only, so the TCP
//! figures are left out too.
//!
//! # What this measures, honestly
//!
//! With veths everything runs on one CPU: the test run transmits each batch and, when it
//! re-enables bottom halves, the veth NAPI polls of l0 and then g0 run right there, on the
//! generator's CPU. So the figure is "packets per second per core for generator + forwarder +
//! sink together", not the forwarder alone; the reflector shows what the path costs without any
//! load balancing, and the ratios are the meaningful numbers.
//!
//! # pktgen
//!
//! [`Generator::Pktgen`] drives the kernel's pktgen (per network namespace, through
//! `/proc/thread-self/net/pktgen`) from g0 instead: same frames (60 bytes, same addresses, 32768
//! sequential source ports), same sink, same timing; pktgen builds a new skb per packet, so
//! nothing is recycled. The kernels this project is developed on
//! have no pktgen, so that path is written from pktgen's documentation and has NOT been run
//! here; without `/proc/net/pktgen` it fails with [`PKTGEN_UNAVAILABLE`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use aya::maps::PerCpuArray;
use aya::programs::Xdp;
use aya::programs::xdp::XdpMode;
use aya::{Ebpf, TestRun as _, TestRunAttrs, TestRunOptions};

use super::Figure;
use crate::daemon::{FinalCounters, Launch, LbDaemon, lb_binary};
use crate::frames::FrameSpec;
use crate::links::{self, MacAddress, VethEnd};
use crate::netns::{self, NetNs, describe_command, run_checked};
use crate::xdp::attach_xdp_program;

/// The error for [`Generator::Pktgen`] on a kernel without pktgen.
pub const PKTGEN_UNAVAILABLE: &str =
    "pktgen is not available on this kernel (no /proc/net/pktgen); use the live-frames generator";

/// Namespace name prefixes (`"<prefix>-<pid>-<counter>"`).
pub const GENERATOR_NAMESPACE_PREFIX: &str = "lbtp-gen";
pub const LB_NAMESPACE_PREFIX: &str = "lbtp-lb";

/// Packets sent through every setup before its first trial: more than one full cycle of the
/// generator's source ports (65536 packets), so flow tables and conntrack hold every flow and
/// page pools are warm.
const WARMUP_PACKETS: u64 = 100_000;
/// Frames per live-frames batch (the kernel's default; at most 256). veth rings hold 256.
const LIVE_FRAMES_BATCH: u32 = 64;
/// Distinct flows the generators produce (bench_gen: source port `counter | 0x400`).
const DISTINCT_FLOWS: u32 = 32_768;
/// Ethernet frame length without FCS (the minimum) of the UDP frames.
const FRAME_BYTES: usize = 60;
/// TCP/IPv4 frame without options or payload.
const TCP_FRAME_BYTES: usize = 54;
const VIP_TCP_PORT: u16 = 80;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

const GEN_IF: &str = "g0";
const IDLE_IF: &str = "gx0";
const IDLE_PEER_IF: &str = "gx1";
const LB_IF: &str = "l0";
const GEN_MAC: MacAddress = MacAddress([0x02, 0, 0, 0xb0, 0, 0x01]);
const LB_MAC: MacAddress = MacAddress([0x02, 0, 0, 0xb0, 0, 0x02]);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 100);
const VIP_PORT: u16 = 53;
const LB_ADDRESS: &str = "10.200.0.1/16";
/// The most backends the address plan (10.200.1.1 ...) and the config's capacities allow here.
const MAX_BACKENDS: usize = 1000;
/// Flow table of `lb` (every cycling flow fits) and of `lb_new_flows` (the config's minimum).
const LARGE_FLOW_TABLE: u32 = 1_048_576;
const SMALL_FLOW_TABLE: u32 = 1024;

/// What `run` measures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThroughputOptions {
    /// Packets the generator sends per trial and setup.
    pub packets_per_trial: u64,
    /// Trials per setup, interleaved across setups (at least 5 for a meaningful median).
    pub trials: usize,
    /// Backends of the VIP (and of the nftables DNAT map), 1 to 1000.
    pub backends: usize,
    pub generator: Generator,
}

impl Default for ThroughputOptions {
    fn default() -> Self {
        Self {
            packets_per_trial: 2_000_000,
            trials: 5,
            backends: 3,
            generator: Generator::LiveFrames,
        }
    }
}

/// Where the packets come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Generator {
    /// `bench_gen` run with `BPF_PROG_TEST_RUN` in live-frames mode (kernel >= 5.18).
    LiveFrames,
    /// The kernel's pktgen, where `/proc/net/pktgen` exists. Untested on this project's machines,
    /// which have no pktgen.
    Pktgen,
}

impl Generator {
    fn name(self) -> &'static str {
        match self {
            Self::LiveFrames => "live_frames",
            Self::Pktgen => "pktgen",
        }
    }
}

/// What sits on l0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Setup {
    Lb,
    LbNewFlows,
    Reflector,
    NftablesDnat,
}

impl Setup {
    const ALL: [Self; 4] = [
        Self::Lb,
        Self::LbNewFlows,
        Self::Reflector,
        Self::NftablesDnat,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Lb => "lb",
            Self::LbNewFlows => "lb_new_flows",
            Self::Reflector => "reflector",
            Self::NftablesDnat => "nftables_dnat",
        }
    }
}

/// How the live-frames generator feeds a path (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frames {
    /// Long test runs: pages are recycled with whatever the path wrote into them.
    Recycled,
    /// One batch per test run: every frame is a copy of `data_in`.
    Fresh,
}

impl Frames {
    fn name(self) -> &'static str {
        match self {
            Self::Recycled => "recycled",
            Self::Fresh => "fresh",
        }
    }

    /// Packets per `BPF_PROG_TEST_RUN` call.
    fn per_run(self) -> u64 {
        match self {
            Self::Recycled => u64::from(u32::MAX),
            Self::Fresh => u64::from(LIVE_FRAMES_BATCH),
        }
    }
}

/// What the generator sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Traffic {
    /// 60-byte UDP to VIP:53.
    Udp,
    /// 54-byte TCP ACKs to VIP:80 (established flows).
    TcpAck,
    /// 54-byte TCP SYNs to VIP:80 (new flows).
    TcpSyn,
}

impl Traffic {
    fn name(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::TcpAck => "tcp_ack",
            Self::TcpSyn => "tcp_syn",
        }
    }

    fn frame_bytes(self) -> usize {
        match self {
            Self::Udp => FRAME_BYTES,
            Self::TcpAck | Self::TcpSyn => TCP_FRAME_BYTES,
        }
    }
}

/// One figure: a setup fed in one way.
#[derive(Clone, Copy, Debug)]
struct Measurement {
    /// Figure name without the `throughput/` group prefix.
    name: &'static str,
    setup: Setup,
    frames: Frames,
    traffic: Traffic,
    baseline: Option<&'static str>,
}

impl Measurement {
    fn figure_name(&self) -> String {
        figure_name(self.name)
    }
}

fn figure_name(name: &str) -> String {
    format!("throughput/{name}")
}

/// The figures measured with `generator`, in the order each trial round runs them.
fn plan(generator: Generator) -> Vec<Measurement> {
    let m = |name, setup, frames, baseline| Measurement {
        name,
        setup,
        frames,
        traffic: Traffic::Udp,
        baseline,
    };
    let tcp = |name, setup, traffic, baseline| Measurement {
        name,
        setup,
        frames: Frames::Recycled,
        traffic,
        baseline,
    };
    let mut plan = vec![
        m("lb", Setup::Lb, Frames::Recycled, Some("reflector")),
        m(
            "lb_new_flows",
            Setup::LbNewFlows,
            Frames::Recycled,
            Some("reflector"),
        ),
        m("reflector", Setup::Reflector, Frames::Recycled, None),
    ];
    match generator {
        Generator::LiveFrames => plan.extend([
            m(
                "nftables_dnat",
                Setup::NftablesDnat,
                Frames::Fresh,
                Some("reflector_fresh_frames"),
            ),
            m(
                "lb_fresh_frames",
                Setup::Lb,
                Frames::Fresh,
                Some("reflector_fresh_frames"),
            ),
            m(
                "reflector_fresh_frames",
                Setup::Reflector,
                Frames::Fresh,
                None,
            ),
            tcp("lb_tcp", Setup::Lb, Traffic::TcpAck, Some("reflector_tcp")),
            tcp(
                "lb_tcp_syn",
                Setup::LbNewFlows,
                Traffic::TcpSyn,
                Some("reflector_tcp"),
            ),
            tcp("reflector_tcp", Setup::Reflector, Traffic::TcpAck, None),
        ]),
        // pktgen ignores `frames`: it builds a new skb for every packet, nothing is recycled.
        Generator::Pktgen => plan.push(m(
            "nftables_dnat",
            Setup::NftablesDnat,
            Frames::Recycled,
            Some("reflector"),
        )),
    }
    plan
}

/// (numerator, denominator, target) of the ratio figures.
fn ratios(generator: Generator) -> Vec<(&'static str, &'static str, &'static str)> {
    let versus_nftables = match generator {
        Generator::LiveFrames => "lb_fresh_frames",
        Generator::Pktgen => "lb",
    };
    let mut ratios = vec![
        ("lb", "reflector", "info (issue 4: >= 0.8)"),
        ("lb_new_flows", "reflector", "info"),
        (versus_nftables, "nftables_dnat", ">= 5"),
    ];
    if generator == Generator::LiveFrames {
        ratios.extend([
            ("lb_tcp", "reflector_tcp", ">= 0.8"),
            ("lb_tcp_syn", "reflector_tcp", "info"),
        ]);
    }
    ratios
}

/// Measures every setup `opts.trials` times, interleaved, and returns one Mpps figure per setup
/// plus the ratio figures (see the module documentation). Needs root; builds and removes its
/// own namespaces.
pub fn run(opts: &ThroughputOptions) -> Result<Vec<Figure>> {
    check_options(opts)?;
    if opts.generator == Generator::Pktgen && !Path::new("/proc/net/pktgen").exists() {
        bail!(PKTGEN_UNAVAILABLE);
    }
    check_nft_present()?;
    // Namespaces left by an earlier run that was killed (no destructors ran).
    for prefix in [GENERATOR_NAMESPACE_PREFIX, LB_NAMESPACE_PREFIX] {
        netns::remove_stale_namespaces(prefix)?;
    }
    let cpu = generator_cpu()?;
    let plan = plan(opts.generator);

    let mut paths: BTreeMap<Setup, BenchPath> = BTreeMap::new();
    for setup in Setup::ALL {
        let path = BenchPath::build(setup, opts)
            .with_context(|| format!("setting up the {} throughput path", setup.name()))?;
        paths.insert(setup, path);
    }

    // Packets sent per (setup, traffic), warm-ups included: the daemons' counters cover them all.
    let mut sent_by: BTreeMap<(Setup, Traffic), u64> = BTreeMap::new();
    for measurement in &plan {
        let path = &paths[&measurement.setup];
        let warmup = path
            .send(
                opts.generator,
                measurement.frames,
                measurement.traffic,
                WARMUP_PACKETS,
                cpu,
            )
            .with_context(|| format!("warm-up of {}", measurement.name))?;
        *sent_by
            .entry((measurement.setup, measurement.traffic))
            .or_default() += warmup.sent;
        if warmup.delivered_settled == 0 {
            bail!(
                "{}: nothing reached the sink during the warm-up ({} packets sent)\n{}",
                measurement.name,
                warmup.sent,
                path.diagnostics()
            );
        }
    }

    let mut results: BTreeMap<&'static str, Vec<Trial>> = BTreeMap::new();
    for _ in 0..opts.trials {
        for measurement in &plan {
            let trial = paths[&measurement.setup]
                .send(
                    opts.generator,
                    measurement.frames,
                    measurement.traffic,
                    opts.packets_per_trial,
                    cpu,
                )
                .with_context(|| format!("trial of {}", measurement.name))?;
            *sent_by
                .entry((measurement.setup, measurement.traffic))
                .or_default() += trial.sent;
            results.entry(measurement.name).or_default().push(trial);
        }
    }

    // Stop every forwarder, check its own counters, and remove the namespaces.
    let mut checks = BTreeMap::new();
    for (setup, mut path) in std::mem::take(&mut paths) {
        let sent = |traffic| sent_by.get(&(setup, traffic)).copied().unwrap_or(0);
        checks.insert(
            setup,
            path.finish(sent(Traffic::TcpAck), sent(Traffic::TcpSyn))?,
        );
    }

    let mut figures = Vec::new();
    for measurement in &plan {
        let trials = &results[measurement.name];
        let sent: u64 = trials.iter().map(|t| t.sent).sum();
        let delivered: u64 = trials.iter().map(|t| t.delivered_settled).sum();
        ensure!(
            delivered > 0,
            "{}: the sink counted nothing in {} trials",
            measurement.name,
            trials.len()
        );
        let mut params = common_params(opts, cpu);
        params.insert("setup".into(), measurement.setup.name().into());
        params.insert("traffic".into(), measurement.traffic.name().into());
        params.insert(
            "frame_bytes".into(),
            measurement.traffic.frame_bytes().to_string(),
        );
        if opts.generator == Generator::LiveFrames {
            params.insert("frames".into(), measurement.frames.name().into());
            params.insert(
                "frames_per_test_run".into(),
                measurement
                    .frames
                    .per_run()
                    .min(opts.packets_per_trial)
                    .to_string(),
            );
        }
        params.insert(
            "delivered_fraction".into(),
            format!("{:.4}", delivered as f64 / sent.max(1) as f64),
        );
        let worst = trials
            .iter()
            .map(Trial::delivered_fraction)
            .fold(f64::INFINITY, f64::min);
        params.insert("delivered_fraction_min".into(), format!("{worst:.4}"));
        params.extend(checks[&measurement.setup].clone());
        figures.push(Figure {
            group: "throughput".into(),
            name: measurement.figure_name(),
            unit: "Mpps".into(),
            samples: trials.iter().map(Trial::mpps).collect(),
            baseline: measurement.baseline.map(figure_name),
            params,
        });
    }

    for (numerator, denominator, target) in ratios(opts.generator) {
        let top = &results[numerator];
        let bottom = &results[denominator];
        let samples = top
            .iter()
            .zip(bottom)
            .map(|(t, b)| t.mpps() / b.mpps())
            .collect();
        let mut params = common_params(opts, cpu);
        params.extend([
            ("numerator".to_owned(), figure_name(numerator)),
            ("denominator".to_owned(), figure_name(denominator)),
            ("target".to_owned(), target.to_owned()),
        ]);
        let short = numerator.strip_suffix("_fresh_frames").unwrap_or(numerator);
        figures.push(Figure {
            group: "throughput".into(),
            name: figure_name(&format!("{short}_vs_{denominator}")),
            unit: "ratio".into(),
            samples,
            baseline: None,
            params,
        });
    }
    Ok(figures)
}

fn check_options(opts: &ThroughputOptions) -> Result<()> {
    ensure!(opts.trials >= 1, "at least one trial is needed");
    ensure!(
        (1..=MAX_BACKENDS).contains(&opts.backends),
        "backends must be 1 to {MAX_BACKENDS}, not {}",
        opts.backends
    );
    ensure!(
        opts.packets_per_trial >= 1000,
        "packets_per_trial must be at least 1000, not {}",
        opts.packets_per_trial
    );
    Ok(())
}

fn common_params(opts: &ThroughputOptions, cpu: usize) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("backends".to_owned(), opts.backends.to_string()),
        ("packets".to_owned(), opts.packets_per_trial.to_string()),
        ("generator".to_owned(), opts.generator.name().to_owned()),
        ("generator_cpu".to_owned(), cpu.to_string()),
        ("distinct_flows".to_owned(), DISTINCT_FLOWS.to_string()),
    ])
}

/// One run of the generator through one path.
#[derive(Clone, Copy, Debug)]
struct Trial {
    sent: u64,
    /// Sink count when the generator returned: what got through within `elapsed`.
    delivered_at_return: u64,
    /// Sink count once it stopped moving (frames in flight at return included).
    delivered_settled: u64,
    elapsed: Duration,
}

impl Trial {
    fn mpps(&self) -> f64 {
        self.delivered_at_return as f64 / self.elapsed.as_secs_f64() / 1e6
    }

    fn delivered_fraction(&self) -> f64 {
        self.delivered_settled as f64 / self.sent.max(1) as f64
    }
}

/// What runs on l0.
enum Target {
    Daemon(LbDaemon),
    /// An XDP program attached natively; the attachment lives as long as this object.
    Program {
        _attached: Ebpf,
    },
}

/// One generator namespace and one LB namespace joined by g0 <-> l0, with the sink on g0 and the
/// setup's forwarder on l0. Fields drop in order: forwarder, sink, then the namespaces.
struct BenchPath {
    setup: Setup,
    backends: Vec<Ipv4Addr>,
    target: Option<Target>,
    /// bench object in the generator namespace: `bench_drop` attached to g0 (counts in slot 0)
    /// and `bench_gen` loaded (counts in slot 1).
    sink: Ebpf,
    g0_ifindex: u32,
    lb_ns: NetNs,
    gen_ns: NetNs,
}

impl BenchPath {
    fn build(setup: Setup, opts: &ThroughputOptions) -> Result<Self> {
        let gen_ns = NetNs::new(GENERATOR_NAMESPACE_PREFIX)?;
        let lb_ns = NetNs::new(LB_NAMESPACE_PREFIX)?;
        // No IPv6: router solicitations and neighbour discovery would reach the sink and be
        // counted as delivered.
        for ns in [&gen_ns, &lb_ns] {
            ns.set_sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
            ns.set_sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        }
        links::create_veth_pair(
            VethEnd {
                namespace: &gen_ns,
                name: GEN_IF,
                mac: Some(GEN_MAC),
            },
            VethEnd {
                namespace: &lb_ns,
                name: LB_IF,
                mac: Some(LB_MAC),
            },
        )?;
        links::set_up(&gen_ns, GEN_IF)?;
        links::set_up(&lb_ns, LB_IF)?;
        links::wait_for_carrier(&gen_ns, GEN_IF, Duration::from_secs(5))?;
        links::wait_for_carrier(&lb_ns, LB_IF, Duration::from_secs(5))?;

        let mut sink = attach_xdp_program(
            &gen_ns,
            GEN_IF,
            lb::bench_object(),
            "bench_drop",
            XdpMode::Driver,
        )
        .context("attaching the sink (bench_drop) natively on g0")?;
        let generator: &mut Xdp = sink
            .program_mut("bench_gen")
            .context("the bench object has no bench_gen")?
            .try_into()?;
        generator.load().context("loading bench_gen")?;
        // Keep bench_gen in the XDP dispatcher for the whole benchmark (trap 2 in the module
        // documentation): attached natively to an idle veth that stays down.
        links::create_veth_pair(
            VethEnd {
                namespace: &gen_ns,
                name: IDLE_IF,
                mac: None,
            },
            VethEnd {
                namespace: &gen_ns,
                name: IDLE_PEER_IF,
                mac: None,
            },
        )?;
        gen_ns
            .try_run(|| generator.attach(IDLE_IF, XdpMode::Driver))?
            .context("attaching bench_gen to an idle veth (keeps it in the XDP dispatcher)")?;
        let g0_ifindex = links::interface_index(&gen_ns, GEN_IF)?;

        let backends: Vec<Ipv4Addr> = (0..opts.backends).map(backend_address).collect();
        lb_ns.ip(["addr", "add", LB_ADDRESS, "dev", LB_IF])?;
        add_permanent_neighbours(&lb_ns, &backends, GEN_MAC)?;

        let mut path = Self {
            setup,
            backends,
            target: None,
            sink,
            g0_ifindex,
            lb_ns,
            gen_ns,
        };
        path.target = Some(match setup {
            Setup::Lb => path.start_daemon(LARGE_FLOW_TABLE)?,
            Setup::LbNewFlows => path.start_daemon(SMALL_FLOW_TABLE)?,
            Setup::Reflector => Target::Program {
                _attached: attach_xdp_program(
                    &path.lb_ns,
                    LB_IF,
                    lb::bench_object(),
                    "bench_reflect",
                    XdpMode::Driver,
                )?,
            },
            Setup::NftablesDnat => path.set_up_nftables()?,
        });
        Ok(path)
    }

    fn start_daemon(&self, flow_table_size: u32) -> Result<Target> {
        let config = lb_config(&self.backends, flow_table_size);
        let daemon = LbDaemon::start(&self.lb_ns, &config, Launch::Nsenter)
            .context("starting `lb run` (build it with `cargo build --release -p lb-userspace`, or set LB_BIN)")?;
        wait_for_unchanged_slots(&self.lb_ns)?;
        Ok(Target::Daemon(daemon))
    }

    fn set_up_nftables(&self) -> Result<Target> {
        let ns = &self.lb_ns;
        ns.set_sysctl("net.ipv4.ip_forward", "1")?;
        for scope in ["all", "default", LB_IF] {
            ns.set_sysctl(&format!("net.ipv4.conf.{scope}.rp_filter"), "0")?;
            // Packets leave through the interface they came in by: no ICMP redirects (they would
            // reach the sink), and no source validation that redirects would ask for.
            ns.set_sysctl(&format!("net.ipv4.conf.{scope}.send_redirects"), "0")?;
        }
        let rules = nft_ruleset(&self.backends);
        let mut command = ns.nsenter_command("nft");
        command.args(["-f", "-"]);
        run_with_stdin(&mut command, &rules).context("loading the nftables DNAT rules")?;
        // A veth end receives frames sent with native XDP_TX only if it runs an XDP program.
        let program =
            attach_xdp_program(ns, LB_IF, lb::bench_object(), "bench_pass", XdpMode::Driver)?;
        Ok(Target::Program { _attached: program })
    }

    /// Per-CPU counter `slot` of the bench object in the generator namespace, summed.
    fn counter(&self, slot: u32) -> Result<u64> {
        let map = self
            .sink
            .map("BENCH_COUNTERS")
            .context("the bench object has no BENCH_COUNTERS")?;
        let counters = PerCpuArray::<_, u64>::try_from(map)?;
        Ok(counters.get(&slot, 0)?.iter().sum())
    }

    fn delivered(&self) -> Result<u64> {
        self.counter(0)
    }

    /// Sends `packets` through the path and counts what arrives at the sink.
    fn send(
        &self,
        generator: Generator,
        frames: Frames,
        traffic: Traffic,
        packets: u64,
        cpu: usize,
    ) -> Result<Trial> {
        let before = self.delivered()?;
        let (sent, elapsed, at_return) = match generator {
            Generator::LiveFrames => {
                self.send_live_frames(packets, frames.per_run(), traffic, cpu)?
            }
            Generator::Pktgen => {
                ensure!(traffic == Traffic::Udp, "pktgen sends UDP only");
                self.send_pktgen(packets, cpu)?
            }
        };
        let settled = self.wait_for_sink_to_settle()?;
        Ok(Trial {
            sent,
            delivered_at_return: at_return - before,
            delivered_settled: settled - before,
            elapsed,
        })
    }

    /// `packets` frames in test runs of at most `per_run` frames each.
    fn send_live_frames(
        &self,
        packets: u64,
        per_run: u64,
        traffic: Traffic,
        cpu: usize,
    ) -> Result<(u64, Duration, u64)> {
        let frame = match traffic {
            Traffic::Udp => bench_frame(GEN_MAC, LB_MAC),
            Traffic::TcpAck => tcp_frame(GEN_MAC, LB_MAC, TCP_ACK),
            Traffic::TcpSyn => tcp_frame(GEN_MAC, LB_MAC, TCP_SYN),
        };
        let context = xdp_md(self.g0_ifindex, frame.len());
        let generator: &Xdp = self
            .sink
            .program("bench_gen")
            .context("no bench_gen")?
            .try_into()?;
        let sent_before = self.counter(1)?;
        let (elapsed, at_return) = self.gen_ns.try_run(|| -> Result<(Duration, u64)> {
            pin_current_thread(cpu)?;
            let start = Instant::now();
            let mut left = packets;
            while left > 0 {
                let repeat = u32::try_from(left.min(per_run)).unwrap_or(u32::MAX);
                generator
                    .test_run(TestRunOptions {
                        data_in: Some(&frame),
                        ctx_in: Some(&context),
                        repeat,
                        attrs: TestRunAttrs::new().xdp_live_frames(LIVE_FRAMES_BATCH),
                        ..TestRunOptions::new()
                    })
                    .context("live-frames test run of bench_gen")?;
                left -= u64::from(repeat);
            }
            let elapsed = start.elapsed();
            Ok((elapsed, self.delivered()?))
        })??;
        let sent = self.counter(1)? - sent_before;
        ensure!(
            sent == packets,
            "bench_gen ran {sent} times for {packets} packets"
        );
        Ok((sent, elapsed, at_return))
    }

    /// Untested here (no pktgen on this project's kernels): written from
    /// Documentation/networking/pktgen.rst.
    fn send_pktgen(&self, packets: u64, cpu: usize) -> Result<(u64, Duration, u64)> {
        let script = pktgen_script(cpu, packets, LB_MAC);
        self.gen_ns.try_run(|| -> Result<(u64, Duration, u64)> {
            // /proc/net follows the process's first thread; thread-self follows this thread,
            // which has entered the generator namespace.
            let root = PathBuf::from("/proc/thread-self/net/pktgen");
            if !root.join("pgctrl").exists() {
                bail!(PKTGEN_UNAVAILABLE);
            }
            for (file, command) in &script.setup {
                pktgen_write(&root.join(file), command)?;
            }
            pin_current_thread(cpu)?;
            let start = Instant::now();
            // Blocks until every pktgen thread of this namespace has sent its count.
            pktgen_write(&root.join("pgctrl"), "start")?;
            let elapsed = start.elapsed();
            let at_return = self.delivered()?;
            let report = std::fs::read_to_string(root.join(GEN_IF))
                .context("reading pktgen's report for g0")?;
            let sent = pktgen_sent(&report)
                .with_context(|| format!("no pkts-sofar in pktgen's report:\n{report}"))?;
            let _ = pktgen_write(&root.join(&script.thread_file), "rem_device_all");
            Ok((sent, elapsed, at_return))
        })?
    }

    /// Polls the sink until two reads 20 ms apart agree (at most 2 s).
    fn wait_for_sink_to_settle(&self) -> Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut last = self.delivered()?;
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let now = self.delivered()?;
            if now == last || Instant::now() > deadline {
                return Ok(now);
            }
            last = now;
        }
    }

    /// Stops the forwarder and checks, from the forwarder's own counters, that it forwarded.
    /// Returns parameters for the figure.
    /// `tcp_ack_sent` and `tcp_syn_sent`: the TCP packets the generator sent through this path
    /// (warm-ups included), for the checks of the TCP VIP's counters.
    fn finish(&mut self, tcp_ack_sent: u64, tcp_syn_sent: u64) -> Result<BTreeMap<String, String>> {
        let delivered = self.delivered()?;
        let mut params = BTreeMap::new();
        match self.setup {
            Setup::Lb | Setup::LbNewFlows => {
                let Some(Target::Daemon(daemon)) = self.target.take() else {
                    bail!("{}: the daemon is gone", self.setup.name());
                };
                let log_tail = daemon.log_tail(20);
                let counters = daemon.stop().context("stopping lb")?;
                let (packets, new_flows) =
                    check_lb_counters(&counters, delivered).with_context(|| {
                        format!(
                            "{}: {}\nlb log:\n{log_tail}",
                            self.setup.name(),
                            self.diagnostics()
                        )
                    })?;
                let table = if self.setup == Setup::Lb {
                    LARGE_FLOW_TABLE
                } else {
                    SMALL_FLOW_TABLE
                };
                params.insert("flow_table_size".into(), table.to_string());
                params.insert("lb_packets".into(), packets.to_string());
                params.insert(
                    "new_flow_fraction".into(),
                    format!("{:.4}", new_flows as f64 / packets.max(1) as f64),
                );
                let tcp = check_tcp_counters(&counters, tcp_ack_sent, tcp_syn_sent)
                    .with_context(|| format!("{}: the TCP VIP's counters", self.setup.name()))?;
                params.extend(tcp);
                params.insert("lb_binary".into(), lb_binary().display().to_string());
            }
            Setup::NftablesDnat => {
                let dnat = nft_rule_packets(&self.lb_ns)?;
                let conntrack = self.lb_ns.sysctl("net.netfilter.nf_conntrack_count")?;
                let forwarded = forwarded_datagrams(&self.lb_ns)?;
                ensure!(
                    dnat > 0 && forwarded > 0,
                    "nftables_dnat: the DNAT rule matched {dnat} new connections and the \
                     namespace forwarded {forwarded} datagrams\n{}",
                    self.diagnostics()
                );
                params.insert("dnat_new_connections".into(), dnat.to_string());
                params.insert("conntrack_entries".into(), conntrack);
                params.insert("forwarded_datagrams".into(), forwarded.to_string());
            }
            Setup::Reflector => {}
        }
        ensure!(
            delivered > 0,
            "{}: the sink counted nothing\n{}",
            self.setup.name(),
            self.diagnostics()
        );
        self.target = None;
        Ok(params)
    }

    /// Interface statistics of both ends (for error messages).
    fn diagnostics(&self) -> String {
        let mut text = String::new();
        let mut add = |title: &str, output: Result<std::process::Output>| {
            let body = match output {
                Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
                Err(e) => format!("{e:#}\n"),
            };
            let _ = write!(text, "--- {title}\n{body}");
        };
        add("generator: ip -s link", self.gen_ns.ip(["-s", "link"]));
        add("lb: ip -s link", self.lb_ns.ip(["-s", "link"]));
        add("lb: ip neigh", self.lb_ns.ip(["neigh"]));
        add(
            "generator: ethtool -S g0",
            self.gen_ns.exec("ethtool", ["-S", GEN_IF]),
        );
        add(
            "lb: ethtool -S l0",
            self.lb_ns.exec("ethtool", ["-S", LB_IF]),
        );
        if self.setup == Setup::NftablesDnat {
            add(
                "lb: nft list ruleset",
                self.lb_ns.exec("nft", ["list", "ruleset"]),
            );
        }
        text
    }
}

/// The LB's `tx` packets and new flows; an error unless it transmitted at least what reached
/// the sink.
fn check_lb_counters(counters: &FinalCounters, delivered: u64) -> Result<(u64, u64)> {
    let tx = counters.reasons.get("tx").copied().unwrap_or(0);
    let (packets, _, new_flows) = counters.vips.get("bench").copied().unwrap_or_default();
    ensure!(
        tx > 0 && tx >= delivered,
        "lb counted {tx} tx packets but the sink {delivered}; counters: {counters:?}"
    );
    Ok((packets, new_flows))
}

/// The TCP VIP's counters against what was sent to it: it saw every TCP packet, and SYNs (when
/// only SYNs were sent) were at least 99% new flows. Returns params for the figures.
fn check_tcp_counters(
    counters: &FinalCounters,
    ack_sent: u64,
    syn_sent: u64,
) -> Result<BTreeMap<String, String>> {
    let (packets, _, new_flows) = counters.vips.get(TCP_VIP).copied().unwrap_or_default();
    let sent = ack_sent + syn_sent;
    ensure!(
        packets >= sent,
        "lb counted {packets} packets on {TCP_VIP} but {sent} TCP packets were sent; \
         counters: {counters:?}"
    );
    if syn_sent > 0 && ack_sent == 0 {
        ensure!(
            new_flows as f64 >= 0.99 * syn_sent as f64,
            "{TCP_VIP}: {new_flows} new flows for {syn_sent} SYNs: not every SYN was a new flow"
        );
    }
    Ok(BTreeMap::from([
        ("tcp_vip_packets".to_owned(), packets.to_string()),
        ("tcp_vip_new_flows".to_owned(), new_flows.to_string()),
        (
            "tcp_vip_new_flow_fraction".to_owned(),
            format!("{:.4}", new_flows as f64 / packets.max(1) as f64),
        ),
    ]))
}

/// `i`-th backend: 10.200.1.1, 10.200.1.2, ... 10.200.1.250, 10.200.2.1, ... (l0 is 10.200.0.1/16).
fn backend_address(index: usize) -> Ipv4Addr {
    let third = u8::try_from(1 + index / 250).expect("at most 1000 backends");
    let fourth = u8::try_from(1 + index % 250).expect("below 251");
    Ipv4Addr::new(10, 200, third, fourth)
}

/// `tcp_idle_timeout` of the bench's daemon: the backends come up one at a time (each as its
/// path resolves), which changes ring slots, and a changed slot uses the flow table for
/// `tcp_idle_timeout` after its last change. A short one lets the sweep return every slot to
/// unchanged before the measurement, which then sees the steady state of a daemon that has run
/// for longer than its timeout.
const BENCH_TCP_IDLE_TIMEOUT: &str = "2s";

/// Waits until the TCP VIP's ring has no changed slot (`lb status`), at most 20 s.
fn wait_for_unchanged_slots(lb_ns: &NetNs) -> Result<()> {
    let socket = crate::daemon::api_socket_for(lb_ns);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = crate::daemon::lb_status(&socket)?;
        let changed = status["vips"]
            .as_array()
            .and_then(|vips| vips.iter().find(|v| v["name"] == TCP_VIP))
            .and_then(|v| v["ring_slots_changed"].as_u64());
        match changed {
            Some(0) => return Ok(()),
            Some(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(250)),
            other => bail!("{TCP_VIP} still has changed ring slots after 20 s: {other:?}"),
        }
    }
}

/// The TCP VIP's name in the daemon's config (and counters).
const TCP_VIP: &str = "bench_tcp";

/// A UDP VIP (`bench`, port 53) and a TCP VIP (`bench_tcp`, port 80) at the same address with
/// the same backends.
fn lb_config(backends: &[Ipv4Addr], flow_table_size: u32) -> String {
    let mut config = format!(
        "interface = \"{LB_IF}\"\nxdp_mode = \"native\"\nmax_vips = 2\nmax_backends = {}\n\
         flow_table_size = {flow_table_size}\ntcp_idle_timeout = \"{BENCH_TCP_IDLE_TIMEOUT}\"\n",
        (2 * backends.len()).max(16)
    );
    for (name, port, protocol) in [("bench", VIP_PORT, "udp"), (TCP_VIP, VIP_TCP_PORT, "tcp")] {
        let _ = write!(
            config,
            "\n[[vip]]\nname = \"{name}\"\naddress = \"{VIP}\"\nport = {port}\n\
             protocol = \"{protocol}\"\n\n[vip.health]\ncheck = \"none\"\n"
        );
        for backend in backends {
            let _ = write!(config, "\n[[vip.backend]]\naddress = \"{backend}\"\n");
        }
    }
    config
}

fn nft_ruleset(backends: &[Ipv4Addr]) -> String {
    let map: Vec<String> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("{i} : {b}"))
        .collect();
    format!(
        "table ip lb {{\n  chain pre {{\n    type nat hook prerouting priority -100; policy accept;\n    \
         ip daddr {VIP} udp dport {VIP_PORT} counter dnat to numgen inc mod {} map {{ {} }}\n  }}\n}}\n",
        backends.len(),
        map.join(", ")
    )
}

/// Packets counted by the DNAT rule: with conntrack NAT, only a connection's first packet runs
/// through the nat chain, so this is the number of new connections DNATed.
fn nft_rule_packets(ns: &NetNs) -> Result<u64> {
    let output = ns.exec("nft", ["list", "chain", "ip", "lb", "pre"])?;
    let text = String::from_utf8_lossy(&output.stdout);
    parse_nft_counter(&text).with_context(|| format!("no counter in the nat chain:\n{text}"))
}

fn parse_nft_counter(text: &str) -> Option<u64> {
    let rest = &text[text.find("counter packets ")? + "counter packets ".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// `Ip: ForwDatagrams` of the namespace (from /proc/thread-self/net/snmp on a thread inside it).
fn forwarded_datagrams(ns: &NetNs) -> Result<u64> {
    let snmp = ns.try_run(|| std::fs::read_to_string("/proc/thread-self/net/snmp"))??;
    parse_snmp(&snmp, "Ip", "ForwDatagrams").context("no Ip: ForwDatagrams in snmp")
}

fn parse_snmp(text: &str, group: &str, field: &str) -> Option<u64> {
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|line| line.starts_with(&prefix));
    let names = lines.next()?;
    let values = lines.next()?;
    let index = names.split_whitespace().position(|name| name == field)?;
    values.split_whitespace().nth(index)?.parse().ok()
}

/// `ip neigh replace ADDR lladdr MAC dev l0 nud permanent` for every backend, in one `ip -batch`.
fn add_permanent_neighbours(ns: &NetNs, backends: &[Ipv4Addr], mac: MacAddress) -> Result<()> {
    let mut batch = String::new();
    for backend in backends {
        let _ = writeln!(
            batch,
            "neigh replace {backend} lladdr {mac} dev {LB_IF} nud permanent"
        );
    }
    let mut command = Command::new("ip");
    command.args(["-n", ns.name(), "-batch", "-"]);
    run_with_stdin(&mut command, &batch).context("adding the backends' neighbour entries")
}

fn run_with_stdin(command: &mut Command, input: &str) -> Result<()> {
    let line = describe_command(command);
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{line}`"))?;
    child
        .stdin
        .take()
        .context("stdin pipe")?
        .write_all(input.as_bytes())
        .with_context(|| format!("writing to `{line}`"))?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "`{line}` failed ({}): {}\ninput:\n{input}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn check_nft_present() -> Result<()> {
    run_checked(Command::new("nft").arg("--version")).context(
        "nft (nftables) is needed for the nftables_dnat baseline: install nftables \
         (`cargo xtask setup` does)",
    )?;
    Ok(())
}

/// The generator's frame: UDP/IPv4, 60 bytes, UDP checksum 0 ("none": bench_gen rewrites the
/// source port without checksum work, and conntrack drops UDP with a wrong checksum).
fn bench_frame(src_mac: MacAddress, dst_mac: MacAddress) -> Vec<u8> {
    let payload = [0u8; FRAME_BYTES - 14 - 20 - 8];
    let mut spec = FrameSpec::udp(CLIENT.into(), 1024, VIP.into(), VIP_PORT, &payload);
    spec.src_mac = src_mac.octets();
    spec.dst_mac = dst_mac.octets();
    let mut frame = spec.build();
    frame[40..42].copy_from_slice(&[0, 0]);
    frame
}

/// The generator's TCP frame: TCP/IPv4 without options or payload (54 bytes), client → VIP:80,
/// with `flags`. bench_gen rewrites the source port and leaves the checksum stale (nothing on the
/// path checks it).
fn tcp_frame(src_mac: MacAddress, dst_mac: MacAddress, flags: u8) -> Vec<u8> {
    let mut spec = FrameSpec::tcp_syn(CLIENT.into(), 1024, VIP.into(), VIP_TCP_PORT);
    spec.l4 = crate::frames::L4::Tcp { flags };
    spec.src_mac = src_mac.octets();
    spec.dst_mac = dst_mac.octets();
    spec.build()
}

/// `struct xdp_md` for a live-frames run: data = 0, data_end = frame length, data_meta = 0,
/// ingress_ifindex, rx_queue_index = 0, egress_ifindex = 0 (the kernel rejects anything else
/// for data, data_end and data_meta).
fn xdp_md(ingress_ifindex: u32, frame_len: usize) -> [u8; 24] {
    let fields = [
        0,
        u32::try_from(frame_len).expect("short frame"),
        0,
        ingress_ifindex,
        0,
        0,
    ];
    let mut bytes = [0u8; 24];
    for (chunk, field) in bytes.chunks_exact_mut(4).zip(fields) {
        chunk.copy_from_slice(&field.to_ne_bytes());
    }
    bytes
}

/// The highest CPU this process may run on: the generator (and, with veths, everything it
/// triggers) runs there, the same CPU for every setup.
fn generator_cpu() -> Result<usize> {
    let allowed = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .context("sched_getaffinity")?;
    (0..nix::sched::CpuSet::count())
        .rev()
        .find(|&cpu| allowed.is_set(cpu).unwrap_or(false))
        .context("no CPU in this process's affinity mask")
}

fn pin_current_thread(cpu: usize) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .with_context(|| format!("pinning the generator thread to CPU {cpu}"))
}

/// What to write to pktgen's files (relative to `/proc/net/pktgen`) before `start`.
#[derive(Debug, PartialEq, Eq)]
struct PktgenScript {
    thread_file: String,
    setup: Vec<(String, String)>,
}

/// pktgen on CPU `cpu` sending `packets` frames from g0 like the live-frames generator: 60 bytes
/// (`pkt_size` excludes the FCS), client → VIP:53, source ports 1024..=33791 in sequence (32768
/// flows: pktgen counts from `udp_src_min` up to, not including, `udp_src_max`), no UDP
/// checksum (pktgen's default), no skb cloning (veth cannot share skbs).
fn pktgen_script(cpu: usize, packets: u64, dst_mac: MacAddress) -> PktgenScript {
    let thread_file = format!("kpktgend_{cpu}");
    let mut setup = vec![
        (thread_file.clone(), "rem_device_all".to_owned()),
        (thread_file.clone(), format!("add_device {GEN_IF}")),
    ];
    let first_port = 1024;
    for command in [
        format!("count {packets}"),
        "clone_skb 0".to_owned(),
        "burst 1".to_owned(),
        format!("pkt_size {FRAME_BYTES}"),
        "delay 0".to_owned(),
        format!("dst_mac {dst_mac}"),
        format!("dst {VIP}"),
        format!("src_min {CLIENT}"),
        format!("src_max {CLIENT}"),
        format!("udp_dst_min {VIP_PORT}"),
        format!("udp_dst_max {VIP_PORT}"),
        format!("udp_src_min {first_port}"),
        format!("udp_src_max {}", first_port + DISTINCT_FLOWS),
    ] {
        setup.push((GEN_IF.to_owned(), command));
    }
    PktgenScript { thread_file, setup }
}

/// One command, one write (pktgen parses each write as one command); then the file's `Result:`
/// line must say OK (pktgen reports most mistakes there, not as a write error).
fn pktgen_write(file: &Path, command: &str) -> Result<()> {
    let mut handle = std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .with_context(|| format!("opening {}", file.display()))?;
    handle
        .write_all(command.as_bytes())
        .with_context(|| format!("writing {command:?} to {}", file.display()))?;
    drop(handle);
    if file.file_name().is_some_and(|name| name == "pgctrl") {
        return Ok(());
    }
    let report = std::fs::read_to_string(file)?;
    match report
        .lines()
        .find_map(|l| l.trim().strip_prefix("Result:"))
    {
        Some(result) if result.trim_start().starts_with("OK") => Ok(()),
        Some(result) => bail!(
            "pktgen refused {command:?} in {}: {}",
            file.display(),
            result.trim()
        ),
        None => Ok(()),
    }
}

/// Packets sent so far, from a pktgen device report (`pkts-sofar: N`).
fn pktgen_sent(report: &str) -> Option<u64> {
    let rest = &report[report.find("pkts-sofar:")? + "pkts-sofar:".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frame_is_60_bytes_of_udp_to_the_vip_without_checksum() {
        let frame = bench_frame(GEN_MAC, LB_MAC);
        assert_eq!(frame.len(), FRAME_BYTES);
        assert_eq!(&frame[0..6], &LB_MAC.octets());
        assert_eq!(&frame[6..12], &GEN_MAC.octets());
        assert_eq!(&frame[12..14], &[0x08, 0x00]);
        assert_eq!(frame[14], 0x45, "IPv4 without options");
        assert_eq!(frame[23], 17, "UDP");
        assert_eq!(&frame[30..34], &VIP.octets());
        assert_eq!(&frame[36..38], &VIP_PORT.to_be_bytes());
        assert_eq!(&frame[40..42], &[0, 0], "no UDP checksum");
    }

    #[test]
    fn the_tcp_frames_are_54_bytes_to_the_vip_port_80() {
        for flags in [TCP_ACK, TCP_SYN] {
            let frame = tcp_frame(GEN_MAC, LB_MAC, flags);
            assert_eq!(frame.len(), TCP_FRAME_BYTES);
            assert_eq!(frame[23], 6, "TCP");
            assert_eq!(frame[14], 0x45, "IPv4 without options");
            assert_eq!(&frame[30..34], &VIP.octets());
            assert_eq!(&frame[36..38], &VIP_TCP_PORT.to_be_bytes());
            assert_eq!(frame[46] >> 4, 5, "no TCP options");
            assert_eq!(frame[47], flags);
        }
    }

    #[test]
    fn the_context_is_an_xdp_md_with_the_ingress_ifindex() {
        let md = xdp_md(7, 60);
        let field = |i: usize| u32::from_ne_bytes(md[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!(
            (field(0), field(1), field(2), field(3), field(4), field(5)),
            (0, 60, 0, 7, 0, 0)
        );
    }

    #[test]
    fn backends_stay_on_l0s_subnet_and_are_distinct() {
        assert_eq!(backend_address(0), Ipv4Addr::new(10, 200, 1, 1));
        assert_eq!(backend_address(249), Ipv4Addr::new(10, 200, 1, 250));
        assert_eq!(backend_address(250), Ipv4Addr::new(10, 200, 2, 1));
        let all: std::collections::BTreeSet<_> = (0..MAX_BACKENDS).map(backend_address).collect();
        assert_eq!(all.len(), MAX_BACKENDS);
    }

    #[test]
    fn the_config_and_the_ruleset_name_every_backend() {
        let backends: Vec<_> = (0..3).map(backend_address).collect();
        let config = lb_config(&backends, 1024);
        assert!(config.contains("flow_table_size = 1024"));
        assert!(config.contains("check = \"none\""));
        assert_eq!(config.matches("[[vip.backend]]").count(), 6);
        assert!(config.contains("name = \"bench_tcp\"") && config.contains("port = 80"));
        let rules = nft_ruleset(&backends);
        assert!(rules.contains(
            "dnat to numgen inc mod 3 map { 0 : 10.200.1.1, 1 : 10.200.1.2, 2 : 10.200.1.3 }"
        ));
    }

    #[test]
    fn counters_are_parsed() {
        let chain = "table ip lb {\n\tchain pre {\n\t\tip daddr 10.99.0.100 udp dport 53 counter packets 32768 bytes 1 dnat to ...";
        assert_eq!(parse_nft_counter(chain), Some(32768));
        let snmp = "Ip: Forwarding DefaultTTL InReceives ForwDatagrams\nIp: 1 64 100 42\nIcmp: InMsgs\nIcmp: 0\n";
        assert_eq!(parse_snmp(snmp, "Ip", "ForwDatagrams"), Some(42));
        let report = "Params: count 1000\nCurrent:\n     pkts-sofar: 1000  errors: 0\nResult: OK: 12(c1+d2) usec, 1000 (60byte,0frags)\n";
        assert_eq!(pktgen_sent(report), Some(1000));
    }

    #[test]
    fn the_pktgen_script_mirrors_the_live_frames_traffic() {
        let script = pktgen_script(1, 5000, LB_MAC);
        assert_eq!(script.thread_file, "kpktgend_1");
        let commands: Vec<&str> = script.setup.iter().map(|(_, c)| c.as_str()).collect();
        assert_eq!(&commands[..2], &["rem_device_all", "add_device g0"]);
        for expected in [
            "count 5000",
            "clone_skb 0",
            "pkt_size 60",
            "dst_mac 02:00:00:b0:00:02",
            "dst 10.99.0.100",
            "udp_src_min 1024",
            "udp_src_max 33792",
        ] {
            assert!(commands.contains(&expected), "missing {expected:?}");
        }
        assert!(script.setup[2..].iter().all(|(file, _)| file == "g0"));
    }

    #[test]
    fn every_ratio_and_baseline_names_a_measured_figure() {
        for generator in [Generator::LiveFrames, Generator::Pktgen] {
            let plan = plan(generator);
            let names: Vec<&str> = plan.iter().map(|m| m.name).collect();
            for measurement in &plan {
                if let Some(baseline) = measurement.baseline {
                    assert!(names.contains(&baseline), "{generator:?}: {baseline}");
                    let base = plan.iter().find(|m| m.name == baseline).unwrap();
                    assert_eq!(base.frames, measurement.frames, "same generator mode");
                }
            }
            for (numerator, denominator, _) in ratios(generator) {
                assert!(names.contains(&numerator) && names.contains(&denominator));
                let frames = |name| plan.iter().find(|m| m.name == name).unwrap().frames;
                assert_eq!(
                    frames(numerator),
                    frames(denominator),
                    "same generator mode"
                );
            }
            let mut sorted = names.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), names.len(), "unique names");
        }
    }

    #[test]
    fn pktgen_without_pktgen_is_a_clear_error() {
        if Path::new("/proc/net/pktgen").exists() {
            return;
        }
        let opts = ThroughputOptions {
            generator: Generator::Pktgen,
            ..ThroughputOptions::default()
        };
        let error = run(&opts).expect_err("no pktgen here");
        assert_eq!(error.to_string(), PKTGEN_UNAVAILABLE);
    }

    #[test]
    fn bad_options_are_refused() {
        let base = ThroughputOptions::default();
        assert!(check_options(&base).is_ok());
        for bad in [
            ThroughputOptions {
                backends: 0,
                ..base.clone()
            },
            ThroughputOptions {
                backends: MAX_BACKENDS + 1,
                ..base.clone()
            },
            ThroughputOptions {
                trials: 0,
                ..base.clone()
            },
        ] {
            assert!(check_options(&bad).is_err(), "{bad:?}");
        }
    }

    /// Namespaces of this process with the benchmark's prefixes.
    fn own_namespaces() -> Vec<String> {
        let pid = std::process::id();
        netns::list_namespaces()
            .expect("ip netns list")
            .into_iter()
            .filter(|name| {
                [GENERATOR_NAMESPACE_PREFIX, LB_NAMESPACE_PREFIX]
                    .iter()
                    .any(|prefix| name.starts_with(&format!("{prefix}-{pid}-")))
            })
            .collect()
    }

    #[test]
    #[ignore = "needs root: run with cargo xtask test"]
    fn every_setup_forwards_almost_everything_and_leaves_nothing_behind() {
        let opts = ThroughputOptions {
            packets_per_trial: 20_000,
            trials: 1,
            backends: 3,
            generator: Generator::LiveFrames,
        };
        let figures = run(&opts).expect("throughput run");
        for figure in &figures {
            eprintln!(
                "{}: {:.3} {} {:?}",
                figure.name,
                figure.median(),
                figure.unit,
                figure.params
            );
        }
        let plan = plan(Generator::LiveFrames);
        for measurement in &plan {
            let figure = figures
                .iter()
                .find(|f| f.name == measurement.figure_name())
                .unwrap_or_else(|| panic!("no figure {}", measurement.name));
            assert_eq!(figure.unit, "Mpps");
            assert_eq!(figure.samples.len(), 1);
            assert!(figure.samples[0] > 0.0, "{figure:?}");
            // Everything runs synchronously on one CPU and a batch (64) is smaller than a veth
            // ring (256): nothing should be lost. Measured here: 1.0000 for every figure.
            let delivered: f64 = figure.params["delivered_fraction"].parse().unwrap();
            assert!(
                delivered > 0.99,
                "{} delivered {delivered}",
                measurement.name
            );
        }
        let ratios: Vec<_> = figures.iter().filter(|f| f.unit == "ratio").collect();
        let expected_ratios = super::ratios(Generator::LiveFrames).len();
        assert_eq!(ratios.len(), expected_ratios);
        assert!(
            ratios
                .iter()
                .all(|f| f.samples.len() == 1 && f.samples[0] > 0.0)
        );
        assert_eq!(figures.len(), plan.len() + expected_ratios);
        assert!(own_namespaces().is_empty(), "left: {:?}", own_namespaces());
    }
}
