//! Flow-state replication (issue 12) under load: how long a flow recorded by node A's data plane
//! takes to be in node B's flow table, what the two daemons cost in CPU meanwhile, and how many
//! bytes a replicated flow costs on the wire.
//!
//! # Setup
//!
//! An [`EcmpLab`] with two lb nodes and two backends; both nodes run the real `lb run` (release
//! binary) with `[sync]` towards each other and one UDP VIP (`check = "none"`): every new UDP
//! flow is recorded in `FLOWS`, so every generated flow is a replication event. The generator
//! ([`generator`]) sits in the router's namespace and sends each flow's one packet straight to
//! node A's MAC through the switch (a static bridge entry keeps it on A's port), so all of them
//! go through A whatever the router's ECMP route says; B sees no traffic but A's sync datagrams.
//! The backends have no UDP server: their ICMP answers are rate-limited by the kernel and end
//! in a blackhole route on the router.
//!
//! `udp_idle_timeout = "10m"` keeps the daemons' refresh (every half of it) and flow sweep
//! (every 10 s here) from re-sending or scanning during a phase, as far as it can: the sweep may
//! still fall into one (then it is part of the CPU figure, as in production).
//!
//! # Phases
//!
//! After a warm-up (a few hundred flows, until one is seen on B), one phase per rate of
//! [`RATES`], each [`PHASE`] long ([`QUICK_PHASE`] with `--quick`), with new flow numbers:
//!
//! - Lag: the watcher ([`watch`]) looks up sampled flows (every flow at 1k/s, every 50th at
//!   50k/s: about a thousand a second) in B's pinned `FLOWS` by key; the lag is from t0 (just
//!   before the generator's `sendmmsg` of the flow's packet) to the lookup that found it.
//!   Sampled flows not found within [`SAMPLE_TIMEOUT`] are counted as missed.
//! - Counts, for every flow (not only the sampled): from `lb status` before and after (once B's
//!   counters have settled), A's new flows for the VIP (what its data plane recorded), A's
//!   `events_lost` and `queue_full`, A's `flows_sent`, B's `flows_received` and
//!   `flows_installed`. The `reached_peer` figure is B's installs over the flows generated.
//! - CPU: `utime + stime` of both `lb` processes ([`cpu`]) over the generator's window, in % of
//!   one core, one sample per second (the window's mean in the params).
//! - Bytes: A's `bytes_sent` to B (UDP payload of authenticated datagrams, heartbeats
//!   included: one a second) over A's `flows_sent` in the phase; the params also give it with
//!   IPv4 and UDP headers ([`HEADER_BYTES`] per datagram, no Ethernet).
//!
//! A phase is an error (the part "could not run") when A's data plane recorded fewer than half
//! the flows generated, when B installed none, or when no sampled flow was seen on B: then the
//! path is broken, not slow. Anything short of that is reported as measured.

mod counters;
pub mod cpu;
pub mod generator;
pub mod watch;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use lb_common::{MAP_FLOWS, PROTO_UDP};

use self::counters::NodeCounters;
use self::cpu::CpuClock;
use self::generator::{Frames, Pace, PacketSocket, Sent};
use self::watch::Seen;
use super::Figure;
use crate::ecmp::{EcmpLab, EcmpVip, sync_status};
use crate::links::{MacAddress, interface_index, wait_until};
use crate::packet_lab::flow_key;
use crate::topology::HOST_INTERFACE;

/// The group of every figure made here.
pub const GROUP: &str = "sync";
/// New recorded flows per second, one phase each.
pub const RATES: [u32; 2] = [1_000, 50_000];
/// Length of a phase, and with `--quick`.
pub const PHASE: Duration = Duration::from_secs(3);
pub const QUICK_PHASE: Duration = Duration::from_secs(1);
/// How long a sampled flow may take to reach B before it counts as missed.
pub const SAMPLE_TIMEOUT: Duration = Duration::from_secs(2);
/// IPv4 (20) and UDP (8) headers of a sync datagram.
pub const HEADER_BYTES: u64 = 28;
/// Lab names start with this (see [`crate::ecmp::leftovers`]).
pub const LAB_PREFIX: &str = "lbbsync";

const VIP_NAME: &str = "bench_udp";
const VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 100);
const VIP_PORT: u16 = 53;
/// Room for every flow of a run (warm-up + 3 s x 1k + 3 s x 50k) on both nodes.
const FLOW_TABLE_SIZE: u32 = 262_144;
const BACKENDS: usize = 2;
/// The generator's client addresses (see [`generator::client_of`]): the router drops what the
/// backends answer to them.
const CLIENT_RANGE: &str = "10.202.0.0/16";
/// The router's segment interface MAC (host number 1, see [`crate::ecmp`]).
const ROUTER_MAC: MacAddress = MacAddress::local(0, 0x01);
const WARMUP_FLOWS: u32 = 300;
/// Node A sends, node B receives.
const A: usize = 0;
const B: usize = 1;
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// B's counters must hold still this long after a phase before they are read.
const SETTLE: Duration = Duration::from_millis(300);

#[derive(Clone, Debug, Default)]
pub struct SyncOptions {
    /// Shorter phases, for smoke tests.
    pub quick: bool,
}

/// Figure names.
pub mod names {
    pub fn lag(rate: u32) -> String {
        format!("sync/lag/rate={rate}")
    }
    pub fn reached_peer(rate: u32) -> String {
        format!("sync/reached_peer/rate={rate}")
    }
    pub fn cpu_sender(rate: u32) -> String {
        format!("sync/cpu_sender/rate={rate}")
    }
    pub fn cpu_receiver(rate: u32) -> String {
        format!("sync/cpu_receiver/rate={rate}")
    }
    pub fn bytes_per_flow(rate: u32) -> String {
        format!("sync/bytes_per_flow/rate={rate}")
    }
}

/// Every flow at 1k/s, then about a thousand samples a second.
pub fn sample_every(rate: u32) -> u32 {
    (rate / 1000).max(1)
}

/// Node `index`'s lb config: the UDP VIP over every backend, and `[sync]` to the other node.
fn lb_config(lab: &EcmpLab, index: usize) -> String {
    let mut config = format!(
        "interface = \"{HOST_INTERFACE}\"\nflow_table_size = {FLOW_TABLE_SIZE}\nmax_vips = 2\n\
         udp_idle_timeout = \"10m\"\n{}\n[[vip]]\nname = \"{VIP_NAME}\"\naddress = \"{VIP}\"\n\
         port = {VIP_PORT}\nprotocol = \"udp\"\n[vip.health]\ncheck = \"none\"\n",
        lab.sync_section(index)
    );
    for backend in lab.topo.backends() {
        config.push_str(&format!(
            "[[vip.backend]]\naddress = \"{}\"\n",
            backend.ipv4()
        ));
    }
    config
}

/// What one phase measured.
struct Phase {
    pace: Pace,
    every: u32,
    sent: Sent,
    seen: Seen,
    /// Counter changes on A and B over the phase.
    a: NodeCounters,
    b: NodeCounters,
    /// Per second of the window, % of one core: [A, B].
    cpu_seconds: [Vec<f64>; 2],
    /// Over the whole window: [A, B].
    cpu_window: [f64; 2],
    window: Duration,
}

/// The lab with both nodes running and each having heard the other.
struct Bench {
    lab: EcmpLab,
    socket: PacketSocket,
    frames: Frames,
    clocks: [CpuClock; 2],
}

impl Bench {
    fn new() -> Result<Self> {
        let mut lab = EcmpLab::new(
            LAB_PREFIX,
            2,
            BACKENDS,
            vec![EcmpVip::new(VIP_NAME, VIP, VIP_PORT)],
        )?;
        lab.enable_sync()?;
        for node in [A, B] {
            let config = lb_config(&lab, node);
            lab.start_node_with(node, &config)
                .with_context(|| format!("node {node} (config:\n{config})"))?;
        }
        wait_until(
            "both nodes to have pulled and to hear each other",
            READY_TIMEOUT,
            || {
                for node in [A, B] {
                    let status = lab.status(node)?;
                    let sync = sync_status(&status)?;
                    if sync["pulled"] != true || sync["peers"][0]["up"] != true {
                        return Ok(false);
                    }
                }
                Ok(true)
            },
        )?;
        let router = lab.topo.router();
        let node_a = lab.topo.node(A);
        // A's port only, even if the bridge forgets A's MAC (its ports do not flood).
        lab.topo.switch().exec(
            "bridge",
            [
                "fdb",
                "replace",
                &node_a.mac().to_string(),
                "dev",
                node_a.bridge_port(),
                "master",
                "static",
            ],
        )?;
        router.ip(["route", "add", "blackhole", CLIENT_RANGE])?;
        let ifindex = interface_index(router, HOST_INTERFACE)?;
        let socket = router.try_run(|| PacketSocket::bind(ifindex))??;
        let clocks = [A, B].map(|node| -> Result<CpuClock> {
            let pid = lab.nodes[node]
                .lb
                .as_ref()
                .and_then(|lb| lb.pid())
                .with_context(|| format!("node {node}'s lb does not run"))?;
            CpuClock::new(pid, "lb")
        });
        let [a, b] = clocks;
        Ok(Self {
            frames: Frames {
                src_mac: ROUTER_MAC,
                dst_mac: node_a.mac(),
                vip: VIP,
                port: VIP_PORT,
            },
            lab,
            socket,
            clocks: [a?, b?],
        })
    }

    fn counters(&self, node: usize) -> Result<NodeCounters> {
        NodeCounters::of(&self.lab.status(node)?, VIP_NAME)
            .with_context(|| format!("node {node}'s counters"))
    }

    /// Waits until B's received and installed flows hold still for [`SETTLE`] and A has
    /// nothing queued (or 5 s pass); returns both nodes' counters then.
    fn settled(&self) -> Result<(NodeCounters, NodeCounters)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut last = (self.counters(A)?, self.counters(B)?);
        let mut still_since = Instant::now();
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            let now = (self.counters(A)?, self.counters(B)?);
            let moved = (now.1.flows_received, now.1.flows_installed)
                != (last.1.flows_received, last.1.flows_installed)
                || now.0.queued > 0;
            last = now;
            if moved {
                still_since = Instant::now();
            } else if still_since.elapsed() >= SETTLE {
                break;
            }
        }
        Ok(last)
    }

    /// Sends `pace`, samples every `every`-th flow, measures everything of the module docs.
    fn phase(&self, pace: Pace, every: u32) -> Result<Phase> {
        let (before_a, before_b) = (self.counters(A)?, self.counters(B)?);
        let flows_pin = self.lab.pin_dir(B).join(MAP_FLOWS);
        let (samples, sampled) = mpsc::channel();
        let stop = AtomicBool::new(false);
        let (sent, seen, readings) = std::thread::scope(|scope| -> Result<_> {
            let watcher = scope.spawn(move || watch::watch(&flows_pin, &sampled, SAMPLE_TIMEOUT));
            let clocks = &self.clocks;
            let stop = &stop;
            let sampler = scope.spawn(move || -> Result<Vec<cpu::Reading>> {
                let mut readings = vec![cpu::read(clocks)?];
                let mut next = readings[0].at + Duration::from_secs(1);
                while !stop.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(5));
                    if Instant::now() >= next {
                        readings.push(cpu::read(clocks)?);
                        next += Duration::from_secs(1);
                    }
                }
                readings.push(cpu::read(clocks)?);
                Ok(readings)
            });
            let sent = generator::run(&self.socket, &self.frames, pace, |n, t0| {
                if (n - pace.first_flow).is_multiple_of(every) {
                    let (client, port) = generator::client_of(n);
                    let key = flow_key(
                        IpAddr::V4(client),
                        port,
                        IpAddr::V4(VIP),
                        VIP_PORT,
                        PROTO_UDP,
                    );
                    // The watcher only goes away by failing; its error is reported below.
                    let _ = samples.send((key, t0));
                }
            });
            stop.store(true, Ordering::Release);
            drop(samples);
            let readings = sampler.join().expect("the CPU sampler panicked");
            let seen = watcher.join().expect("the watcher panicked");
            Ok((sent?, seen?, readings?))
        })?;
        let (after_a, after_b) = self.settled()?;
        let first = readings.first().context("no CPU reading")?;
        let last = readings.last().context("no CPU reading")?;
        // Whole seconds only: the last, partial one is in the window's mean.
        let per_second = |i: usize| -> Vec<f64> {
            let whole: Vec<f64> = readings
                .windows(2)
                .filter(|w| w[1].at.duration_since(w[0].at) >= Duration::from_millis(900))
                .map(|w| cpu::percent(&w[0], &w[1], i))
                .collect();
            if whole.is_empty() {
                vec![cpu::percent(first, last, i)]
            } else {
                whole
            }
        };
        Ok(Phase {
            pace,
            every,
            sent,
            seen,
            a: after_a.since(&before_a),
            b: after_b.since(&before_b),
            cpu_seconds: [per_second(0), per_second(1)],
            cpu_window: [cpu::percent(first, last, 0), cpu::percent(first, last, 1)],
            window: last.at.duration_since(first.at),
        })
    }
}

impl Phase {
    /// The checks of the module docs: the path works, whatever its speed.
    fn check(&self) -> Result<()> {
        let generated = u64::from(self.sent.flows);
        ensure!(
            self.a.vip_flows * 2 >= generated,
            "node A's data plane recorded {} of the {generated} flows generated: the generator \
             does not reach it",
            self.a.vip_flows
        );
        ensure!(
            self.b.flows_installed > 0,
            "node B installed none of the {generated} flows (A sent {}, B received {})",
            self.a.flows_sent,
            self.b.flows_received
        );
        ensure!(
            !self.seen.lags.is_empty(),
            "none of the {} sampled flows appeared in node B's flow table",
            self.seen.missed
        );
        Ok(())
    }

    fn params(&self) -> BTreeMap<String, String> {
        let p = |k: &str, v: String| (k.to_owned(), v);
        BTreeMap::from([
            p("rate", self.pace.rate.to_string()),
            p("achieved_rate", format!("{:.0}", self.sent.rate())),
            p("phase_s", format!("{:.2}", self.sent.elapsed.as_secs_f64())),
            p("flows_generated", self.sent.flows.to_string()),
            p("generator_batches", self.sent.batches.to_string()),
            p(
                "generator_max_behind_ms",
                format!("{:.3}", self.sent.max_behind.as_secs_f64() * 1e3),
            ),
            p("recorded_by_a", self.a.vip_flows.to_string()),
            p("events_lost_a", self.a.events_lost.to_string()),
            p("queue_full_a", self.a.queue_full.to_string()),
            p("flows_sent_a", self.a.flows_sent.to_string()),
            p("datagrams_sent_a", self.a.datagrams_sent.to_string()),
            p("bytes_sent_a", self.a.bytes_sent.to_string()),
            p("flows_received_b", self.b.flows_received.to_string()),
            p("flows_installed_b", self.b.flows_installed.to_string()),
            p("flows_skipped_b", self.b.flows_skipped.to_string()),
            p("queue_full_b", self.b.queue_full.to_string()),
            p("other_drops_b", self.b.other_drops.to_string()),
            p("bytes_received_b", self.b.bytes_received.to_string()),
            p("sample_every", self.every.to_string()),
            p(
                "sampled",
                (self.seen.lags.len() + self.seen.missed).to_string(),
            ),
            p("sampled_found", self.seen.lags.len().to_string()),
            p("sampled_missed", self.seen.missed.to_string()),
            p("poll_us", watch::POLL.as_micros().to_string()),
            p("watch_rounds", self.seen.rounds.to_string()),
        ])
    }

    fn figures(&self) -> Vec<Figure> {
        let rate = self.pace.rate;
        let params = self.params();
        let figure = |name: String, unit: &str, samples: Vec<f64>, extra: &[(&str, String)]| {
            let mut params = params.clone();
            params.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
            Figure {
                group: GROUP.to_owned(),
                name,
                unit: unit.to_owned(),
                samples,
                baseline: None,
                params,
            }
        };
        let mut lags: Vec<f64> = self
            .seen
            .lags
            .iter()
            .map(|d| d.as_secs_f64() * 1e3)
            .collect();
        lags.sort_by(f64::total_cmp);
        let p99 = lags[((lags.len() - 1) as f64 * 0.99).round() as usize];
        let generated = f64::from(self.sent.flows);
        let flows = self.a.flows_sent.max(1) as f64;
        let bytes = self.a.bytes_sent as f64;
        let datagrams = self.a.datagrams_sent as f64;
        let cpu = |i: usize, who: &str| {
            figure(
                if i == 0 {
                    names::cpu_sender(rate)
                } else {
                    names::cpu_receiver(rate)
                },
                "%",
                self.cpu_seconds[i].clone(),
                &[
                    ("node", who.to_owned()),
                    ("window_percent", format!("{:.2}", self.cpu_window[i])),
                    ("window_s", format!("{:.2}", self.window.as_secs_f64())),
                    (
                        "what",
                        "utime+stime of the lb process (/proc/PID/stat) over the generator's \
                         window, % of one core, one sample per whole second"
                            .to_owned(),
                    ),
                ],
            )
        };
        vec![
            figure(
                names::lag(rate),
                "ms",
                lags.clone(),
                &[
                    ("p99_ms", format!("{p99:.3}")),
                    (
                        "what",
                        "t0 (before the sendmmsg of the flow's only packet to node A) to the \
                         key lookup in node B's pinned FLOWS that found it"
                            .to_owned(),
                    ),
                ],
            ),
            figure(
                names::reached_peer(rate),
                "%",
                vec![self.b.flows_installed as f64 / generated * 100.0],
                &[(
                    "what",
                    "flows installed in node B's table over the flows generated".to_owned(),
                )],
            ),
            cpu(0, "A (sender)"),
            cpu(1, "B (receiver)"),
            figure(
                names::bytes_per_flow(rate),
                "B",
                vec![bytes / flows],
                &[
                    (
                        "with_ip_udp_headers",
                        format!("{:.2}", (bytes + datagrams * HEADER_BYTES as f64) / flows),
                    ),
                    (
                        "flows_per_datagram",
                        format!("{:.2}", flows / datagrams.max(1.0)),
                    ),
                    (
                        "what",
                        "node A's bytes_sent to B (UDP payload, heartbeats included) over its \
                         flows_sent in the phase"
                            .to_owned(),
                    ),
                ],
            ),
        ]
    }

    fn summary(&self) -> String {
        format!(
            "{} flows/s asked, {:.0} sent ({} flows in {:.2} s); A recorded {}, sent {} \
             (events lost {}, queue_full {}); B received {}, installed {}; lag of {} sampled: \
             {} found, {} missed; CPU A {:.1}%, B {:.1}%; {} B in {} datagrams",
            self.pace.rate,
            self.sent.rate(),
            self.sent.flows,
            self.sent.elapsed.as_secs_f64(),
            self.a.vip_flows,
            self.a.flows_sent,
            self.a.events_lost,
            self.a.queue_full,
            self.b.flows_received,
            self.b.flows_installed,
            self.seen.lags.len() + self.seen.missed,
            self.seen.lags.len(),
            self.seen.missed,
            self.cpu_window[0],
            self.cpu_window[1],
            self.a.bytes_sent,
            self.a.datagrams_sent
        )
    }
}

/// The whole part (needs root).
pub fn run(opts: &SyncOptions) -> Result<Vec<Figure>> {
    let duration = if opts.quick { QUICK_PHASE } else { PHASE };
    let bench = Bench::new()?;
    // Warm-up: ARP and neighbour entries, the daemons' first batches.
    let warmup = Pace {
        rate: 1_000,
        duration: Duration::from_millis(u64::from(WARMUP_FLOWS)),
        first_flow: 0,
    };
    let phase = bench.phase(warmup, 1)?;
    if let Err(e) = phase.check() {
        bail!("warm-up: {e:#}; {}", phase.summary());
    }
    eprintln!("sync bench: warm-up: {}", phase.summary());
    let mut next_flow = WARMUP_FLOWS;
    let mut figures = Vec::new();
    for rate in RATES {
        let pace = Pace {
            rate,
            duration,
            first_flow: next_flow,
        };
        next_flow += pace.flows();
        let phase = bench.phase(pace, sample_every(rate))?;
        eprintln!("sync bench: {}", phase.summary());
        phase
            .check()
            .with_context(|| format!("at {rate} flows/s: {}", phase.summary()))?;
        figures.extend(phase.figures());
    }
    Ok(figures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_about_a_thousand_a_second() {
        assert_eq!(sample_every(1_000), 1);
        assert_eq!(sample_every(50_000), 50);
        assert_eq!(sample_every(10), 1);
    }

    #[test]
    fn every_flow_of_a_run_fits_in_the_table() {
        let flows: u32 = WARMUP_FLOWS
            + RATES
                .iter()
                .map(|&rate| (f64::from(rate) * PHASE.as_secs_f64()) as u32)
                .sum::<u32>();
        assert!(flows < FLOW_TABLE_SIZE, "{flows} flows");
    }
}
