//! Issue 13's choice of next hop, measured: an encapsulating VIP's backend record carries the
//! next hop's MAC (resolved by the daemon), so the data plane does no route lookup. The way not
//! taken is `bpf_fib_lookup` per packet; `bench_fib` does that lookup (and writes the MACs it
//! returns) beside `bench_reflect` (MAC swap), both on the same 54-byte IPv4 TCP ACK, repeat=1
//! calls, interleaved trials.
//!
//! The lookup needs a routing table with forwarding on (the kernel answers "forwarding disabled"
//! otherwise, before any lookup), so the calls run in a namespace of their own: one veth pair,
//! `ip_forward = 1`, a route to the frame's destination via a permanent neighbour. The helper's
//! return code is checked to be `BPF_FIB_LKUP_RET_SUCCESS` (0): the whole lookup, neighbour
//! included, was timed.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, Result, ensure};
use aya::{Ebpf, TestRun as _, TestRunOptions, maps::PerCpuArray, programs::Xdp};

use super::Figure;
use crate::{
    frames::FrameSpec,
    links::{VethEnd, add_address, create_veth_pair, set_up},
    netns::NetNs,
};

pub const GROUP: &str = "next_hop";
pub const REFLECTOR: &str = "next_hop/reflector";
pub const FIB_LOOKUP: &str = "next_hop/fib_lookup";

const CALLS_PER_TRIAL: usize = 20_000;
const QUICK_CALLS_PER_TRIAL: usize = 2_000;

/// Builds the namespace and measures both programs; one figure each (gross ns per call, the
/// lookup's beside the reflector's).
pub fn run(trials: usize, quick: bool, cpu: usize) -> Result<Vec<Figure>> {
    let namespace = NetNs::new("lbb-fib")?;
    namespace.set_sysctl("net.ipv4.ip_forward", "1")?;
    create_veth_pair(
        VethEnd {
            namespace: &namespace,
            name: "fib0",
            mac: None,
        },
        VethEnd {
            namespace: &namespace,
            name: "fib1",
            mac: None,
        },
    )?;
    for interface in ["lo", "fib0", "fib1"] {
        set_up(&namespace, interface)?;
    }
    namespace.set_sysctl("net.ipv4.conf.all.forwarding", "1")?;
    add_address(
        &namespace,
        "fib0",
        IpAddr::V4(Ipv4Addr::new(10, 254, 0, 1)),
        24,
    )?;
    namespace.ip([
        "neigh",
        "replace",
        "10.254.0.2",
        "lladdr",
        "02:fb:00:00:00:02",
        "dev",
        "fib0",
        "nud",
        "permanent",
    ])?;
    namespace.ip(["route", "add", "10.200.0.0/16", "via", "10.254.0.2"])?;

    let mut ebpf = Ebpf::load(lb::bench_object()).context("loading the bench object")?;
    for name in ["bench_reflect", "bench_fib"] {
        let xdp: &mut Xdp = ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?;
        xdp.load().with_context(|| format!("loading {name}"))?;
    }
    let frame = FrameSpec {
        l4: crate::frames::L4::Tcp { flags: 0x10 },
        ..FrameSpec::tcp_syn(
            IpAddr::V4(Ipv4Addr::new(198, 19, 0, 1)),
            40_000,
            IpAddr::V4(Ipv4Addr::new(10, 200, 0, 1)),
            80,
        )
    }
    .build();
    let calls = if quick {
        QUICK_CALLS_PER_TRIAL
    } else {
        CALLS_PER_TRIAL
    };
    let (reflector, fib) = namespace.try_run(|| -> Result<(Vec<f64>, Vec<f64>)> {
        let mut set = nix::sched::CpuSet::new();
        set.set(cpu).context("cpu number")?;
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
            .context("pinning the measuring thread")?;
        let (mut reflector, mut fib) = (Vec::new(), Vec::new());
        // One warm-up trial of each, then interleaved trials.
        for trial in 0..=trials {
            let r = time_calls(&mut ebpf, "bench_reflect", &frame, calls)?;
            let f = time_calls(&mut ebpf, "bench_fib", &frame, calls)?;
            if trial > 0 {
                reflector.push(r);
                fib.push(f);
            }
        }
        let codes: PerCpuArray<_, u64> =
            PerCpuArray::try_from(ebpf.map("BENCH_COUNTERS").context("BENCH_COUNTERS")?)?;
        let rc = codes.get(&2, 0)?[cpu];
        ensure!(
            rc == 0,
            "bpf_fib_lookup returned {rc}, not BPF_FIB_LKUP_RET_SUCCESS: the timed lookup is not \
             the whole path"
        );
        Ok((reflector, fib))
    })??;
    let figure = |name: &str, samples: Vec<f64>, baseline: Option<&str>, note: &str| Figure {
        group: GROUP.to_owned(),
        name: name.to_owned(),
        unit: "ns".to_owned(),
        samples,
        baseline: baseline.map(str::to_owned),
        params: BTreeMap::from([
            ("method".to_owned(), "call".to_owned()),
            ("runs_per_trial".to_owned(), calls.to_string()),
            ("note".to_owned(), note.to_owned()),
        ]),
    };
    Ok(vec![
        figure(
            REFLECTOR,
            reflector,
            None,
            "bench_reflect (MAC swap + XDP_TX) in the lookup's namespace, repeat=1 calls, gross",
        ),
        figure(
            FIB_LOOKUP,
            fib,
            Some(REFLECTOR),
            "bench_fib: bpf_fib_lookup of the IPv4 destination (route via a permanent \
             neighbour: BPF_FIB_LKUP_RET_SUCCESS), its MACs written, XDP_TX; repeat=1 calls, \
             gross",
        ),
    ])
}

/// Mean kernel-timed ns per call of `calls` repeat=1 runs of `program` on `frame` (each must
/// return XDP_TX).
fn time_calls(ebpf: &mut Ebpf, program: &str, frame: &[u8], calls: usize) -> Result<f64> {
    let xdp: &mut Xdp = ebpf
        .program_mut(program)
        .context("loaded above")?
        .try_into()?;
    let mut total = 0u128;
    for _ in 0..calls {
        let result = xdp
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ..TestRunOptions::new()
            })
            .with_context(|| format!("test run of {program}"))?;
        ensure!(
            result.return_value == 3,
            "{program} returned {} (not XDP_TX)",
            result.return_value
        );
        total += result.duration.as_nanos();
    }
    Ok(total as f64 / calls as f64)
}
