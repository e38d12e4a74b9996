//! The fuzzer's lab: the real program and maps (a [`PacketLab`]), a snapshot of the maps for the
//! model, and the comparison of one frame's outcomes.

use std::{collections::HashMap, time::Instant};

use aya::{TestRun as _, TestRunOptions};
use lb::{balancer::L2Path, dataplane::DataPlaneError, health::Health};
use lb_common::{Counters, FlowKey, FlowState, Reason};

use super::{Difference, Options, Report, generate::Generator, generate::Target, rng::Rng};
use crate::{
    frames::LB_MAC,
    model::{self, Expected, Tables, View},
    packet_lab::{PacketLab, XDP_ABORTED, backend_mac},
};

/// Every kind of VIP: IPv4 and IPv6, TCP and UDP, one without backends (drop) and one whose only
/// backend the fuzzer takes down now and then (`on_all_down = "pass"`).
pub const CONFIG: &str = r#"
interface = "fuzz0"
ring_size = 1021
max_vips = 8
max_backends = 32
flow_table_size = 65536

[[vip]]
name = "web"
address = "10.0.0.100"
port = 80
protocol = "tcp"
[[vip.backend]]
address = "10.0.0.11"
[[vip.backend]]
address = "10.0.0.12"
[[vip.backend]]
address = "10.0.0.13"

[[vip]]
name = "dns"
address = "10.0.0.100"
port = 53
protocol = "udp"
[[vip.backend]]
address = "10.0.0.21"
[[vip.backend]]
address = "10.0.0.22"

[[vip]]
name = "web6"
address = "2001:db8::100"
port = 443
protocol = "tcp"
[[vip.backend]]
address = "2001:db8::11"
[[vip.backend]]
address = "2001:db8::12"

[[vip]]
name = "dns6"
address = "2001:db8::100"
port = 53
protocol = "udp"
[[vip.backend]]
address = "2001:db8::21"

[[vip]]
name = "empty"
address = "10.0.0.200"
port = 80
protocol = "tcp"

[[vip]]
name = "sorry"
address = "10.0.0.201"
port = 80
protocol = "tcp"
on_all_down = "pass"
[[vip.backend]]
address = "10.0.0.31"
"#;

/// Source MAC of a backend behind "another interface" (redirect).
const EGRESS_MAC: [u8; 6] = [0x02, 0xe9, 0, 0, 0, 0x01];

/// About one control-plane change (health, path, redirect) per this many frames.
const CHANGE_EVERY: usize = 1500;
/// Percent of VIP frames whose flow entry is overwritten with an arbitrary one first.
const INJECT_PERCENT: u64 = 3;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("reading the maps for the model: {0}")]
    Maps(#[from] DataPlaneError),
    #[error("reading map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("changing the lab's backends: {0}")]
    Publish(#[from] lb::balancer::PublishError),
    #[error("clearing a TX_PORTS slot: {0}")]
    TxPorts(String),
    #[error("BPF_PROG_TEST_RUN refused a {len}-byte frame: {source}")]
    TestRun {
        len: usize,
        source: aya::programs::ProgramError,
    },
}

fn map_err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> LabError {
    move |source| LabError::Map { map, source }
}

pub struct FuzzLab {
    pub lab: PacketLab,
    tables: Tables,
    /// The REASONS counters as the last frame left them (summed over CPUs).
    reasons: [Counters; Reason::COUNT as usize],
    /// What the VIP and backend counters must have gained since the start.
    vip_expected: HashMap<u32, Counters>,
    backend_expected: HashMap<u32, Counters>,
    vip_start: HashMap<u32, Counters>,
    backend_start: HashMap<u32, Counters>,
    /// Control-plane changes and flow injections.
    rng: Rng,
    out: Vec<u8>,
    expected_out: Vec<u8>,
}

impl FuzzLab {
    /// A fresh lab with [`CONFIG`] (panics, with the reason, when the program cannot load: the
    /// fuzzer needs root).
    pub fn new(seed: u64) -> Result<Self, LabError> {
        let lab = PacketLab::new(CONFIG);
        let mut fuzz = Self {
            lab,
            tables: Tables::default(),
            reasons: [Counters::default(); Reason::COUNT as usize],
            vip_expected: HashMap::new(),
            backend_expected: HashMap::new(),
            vip_start: HashMap::new(),
            backend_start: HashMap::new(),
            rng: Rng::new(seed ^ 0x5eed_0fc0_a7a7),
            out: vec![0; super::generate::MAX_FRAME + 256],
            expected_out: Vec::with_capacity(super::generate::MAX_FRAME),
        };
        fuzz.snapshot()?;
        fuzz.read_all_reasons()?;
        let balancer = &fuzz.lab.balancer;
        let maps = &balancer.dataplane.maps;
        for vip in &balancer.vips {
            fuzz.vip_start.insert(vip.id, balancer.vip_counters(vip)?);
            for b in &vip.backends {
                fuzz.backend_start
                    .insert(b.id, maps.backend_counters(b.id)?);
            }
        }
        Ok(fuzz)
    }

    /// The services the generator aims at: every VIP of the lab.
    pub fn targets(&self) -> Vec<Target> {
        self.lab
            .balancer
            .vips
            .iter()
            .map(|v| Target {
                address: v.address,
                port: v.port,
                proto: v.key.proto,
            })
            .collect()
    }

    /// Re-reads every map but the flow table, after a control-plane change.
    fn snapshot(&mut self) -> Result<(), LabError> {
        let dataplane = &self.lab.balancer.dataplane;
        let maps = &dataplane.maps;
        let capacity = dataplane.capacity;
        let mut tables = Tables {
            ring_size: maps.rings.ring_size(),
            ..Tables::default()
        };
        for entry in maps.vips.iter() {
            let (key, info) = entry.map_err(map_err("VIPS"))?;
            tables.vips.insert(key, info);
        }
        for id in 0..capacity.max_backends {
            tables
                .backends
                .push(maps.backends.get(&id, 0).map_err(map_err("BACKENDS"))?);
            tables.tx_ports.push(
                maps.tx_ports
                    .get(id, 0)
                    .is_ok_and(|port| port.if_index != 0),
            );
        }
        for table in 0..capacity.max_vips * 2 {
            tables.rings.extend(maps.rings.read_table(table)?);
        }
        self.tables = tables;
        Ok(())
    }

    fn read_all_reasons(&mut self) -> Result<(), LabError> {
        for r in Reason::ALL {
            self.reasons[r as usize] = self.lab.balancer.reason_counters(r)?;
        }
        Ok(())
    }

    /// A random control-plane change, as the daemon makes them: a backend goes down or up, loses
    /// or regains its MAC, or moves behind another interface (redirect) and back.
    fn change_state(&mut self) -> Result<(), LabError> {
        let balancer = &mut self.lab.balancer;
        let v = self.rng.below(balancer.vips.len());
        let count = balancer.vips[v].backends.len();
        if count == 0 {
            return Ok(());
        }
        let b = self.rng.below(count);
        let backend = &balancer.vips[v].backends[b];
        let lab_path = |redirect: bool| L2Path {
            dst_mac: backend_mac(backend.id),
            src_mac: if redirect { EGRESS_MAC } else { LB_MAC },
            ifindex: 1,
            redirect,
            tunnel: None,
        };
        match self.rng.below(5) {
            0 => {
                let up = backend.health == Health::Up;
                balancer.set_up(v, b, !up)?;
            }
            1 => {
                let path = match backend.path {
                    Some(_) => None,
                    None => Some(lab_path(false)),
                };
                balancer.set_path(v, b, path)?;
            }
            2 => {
                let redirect = backend.path.is_some_and(|p| p.redirect);
                let path = Some(lab_path(!redirect));
                balancer.set_path(v, b, path)?;
            }
            // What only a daemon bug (or another writer) leaves: a backend's TX_PORTS slot
            // emptied (ifindex 0 clears it), so its redirect fails ...
            3 => {
                let id = backend.id;
                balancer
                    .dataplane
                    .maps
                    .tx_ports
                    .set(id, 0, None, 0)
                    .map_err(|e| LabError::TxPorts(e.to_string()))?;
            }
            // ... or a live ring with slots naming backends past the array. The next publish of
            // that VIP rewrites both.
            _ => {
                let vip = &balancer.vips[v];
                let table = vip.id * 2 + (vip.active_ring & 1);
                let max_backends = balancer.dataplane.capacity.max_backends;
                let rings = &mut balancer.dataplane.maps.rings;
                let mut slots = rings.read_table(table)?;
                for _ in 0..slots.len() / 4 {
                    let i = self.rng.below(slots.len());
                    slots[i].owner = max_backends + self.rng.below(4) as u32;
                }
                // ... and slots marked changed with priors of any backend (of this VIP, another
                // one, or none), as a sweep or a reuse bug could leave them.
                for _ in 0..slots.len() / 4 {
                    let i = self.rng.below(slots.len());
                    slots[i].prior = self.rng.below(max_backends as usize + 2) as u32;
                }
                rings.write_table(table, &slots)?;
            }
        }
        self.snapshot()
    }

    /// Overwrites the flow entry of `key` with an arbitrary one: a backend id in or past the
    /// array, of this VIP or another (what a reload, a stale entry or a bug could leave).
    fn inject_flow(&mut self, key: &FlowKey) -> Result<(), LabError> {
        let max_backends = self.lab.balancer.dataplane.capacity.max_backends;
        let state = FlowState {
            backend: self.rng.below(max_backends as usize + 4) as u32,
            vip_id: self.rng.below(8) as u32,
            last_seen_ns: 0,
        };
        self.lab
            .balancer
            .dataplane
            .maps
            .flows
            .insert(key, state, 0)
            .map_err(map_err("FLOWS"))
    }

    /// What the model expects of `frame` with the maps as they are now.
    pub fn expect(&self, frame: &[u8]) -> Expected {
        let flows = &self.lab.balancer.dataplane.maps.flows;
        model::expect(
            frame,
            &View {
                tables: &self.tables,
                flows: |key: &FlowKey| flows.get(key, 0).ok(),
            },
        )
    }

    /// Runs `frame` through the program and the model; the model's reason and the
    /// differences, if any.
    pub fn check(&mut self, frame: &[u8]) -> Result<(Reason, Vec<String>), LabError> {
        let expected = self.expect(frame);
        // Whether the flow table held the flow before the run (to tell "not touched").
        let before = expected
            .forwarded
            .and_then(|fwd| self.lab.balancer.dataplane.maps.flows.get(&fwd.key, 0).ok());
        let result = self
            .lab
            .balancer
            .dataplane
            .program()
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut self.out),
                ..TestRunOptions::new()
            })
            .map_err(|source| LabError::TestRun {
                len: frame.len(),
                source,
            })?;
        let mut what = Vec::new();
        let verdict = result.return_value;
        if verdict == XDP_ABORTED {
            what.push("XDP_ABORTED".to_string());
        }
        if verdict != expected.verdict {
            what.push(format!(
                "verdict {} (model: {}) [1=DROP 2=PASS 3=TX 4=REDIRECT]",
                verdict, expected.verdict
            ));
        }
        expected.output_into(frame, &mut self.expected_out);
        let out = &self.out[..(result.data_size_out as usize).min(self.out.len())];
        if out != self.expected_out.as_slice() {
            let first = out
                .iter()
                .zip(&self.expected_out)
                .position(|(a, b)| a != b)
                .unwrap_or(out.len().min(self.expected_out.len()));
            what.push(format!(
                "output differs from byte {first} (lengths {} and {}): program {}, model {}",
                out.len(),
                self.expected_out.len(),
                super::corpus::to_hex(&out[first.min(out.len())..out.len().min(first + 16)]),
                super::corpus::to_hex(
                    &self.expected_out[first.min(self.expected_out.len())
                        ..self.expected_out.len().min(first + 16)]
                ),
            ));
        }
        self.check_reason(expected.reason, frame.len() as u64, &mut what)?;
        if let Some(fwd) = expected.forwarded {
            self.count(fwd.vip_id, fwd.backend_id, frame.len() as u64, fwd.new_flow);
            let flows = &self.lab.balancer.dataplane.maps.flows;
            if !fwd.records && before.is_none() && flows.get(&fwd.key, 0).is_ok() {
                what.push("a flow entry was written (model: the flow table is not touched)".into());
            }
            if fwd.records {
                match flows.get(&fwd.key, 0) {
                    Ok(s) if s.backend == fwd.backend_id && s.vip_id == fwd.vip_id => {}
                    Ok(s) => what.push(format!(
                        "flow entry {{backend {}, vip {}}} (model: {{backend {}, vip {}}})",
                        s.backend, s.vip_id, fwd.backend_id, fwd.vip_id
                    )),
                    Err(_) => what.push(format!(
                        "no flow entry (model: {{backend {}, vip {}}})",
                        fwd.backend_id, fwd.vip_id
                    )),
                }
            }
        }
        Ok((expected.reason, what))
    }

    /// The program counted exactly one frame, of `len` bytes, under `reason`.
    fn check_reason(
        &mut self,
        reason: Reason,
        len: u64,
        what: &mut Vec<String>,
    ) -> Result<(), LabError> {
        let balancer = &self.lab.balancer;
        let before = self.reasons[reason as usize];
        let now = balancer.reason_counters(reason)?;
        if now.packets == before.packets + 1 && now.bytes == before.bytes + len {
            self.reasons[reason as usize] = now;
            return Ok(());
        }
        // Find what the program counted instead.
        let mut counted = Vec::new();
        for r in Reason::ALL {
            let c = balancer.reason_counters(r)?;
            let was = self.reasons[r as usize];
            if c != was {
                counted.push(format!(
                    "{} +{} packets +{} bytes",
                    r.name(),
                    c.packets - was.packets,
                    c.bytes - was.bytes
                ));
            }
        }
        what.push(format!(
            "reason counters: {} (model: {} +1 packet +{len} bytes)",
            counted.join(", "),
            reason.name()
        ));
        self.read_all_reasons()
    }

    fn count(&mut self, vip: u32, backend: u32, bytes: u64, new_flow: bool) {
        for c in [
            self.vip_expected.entry(vip).or_default(),
            self.backend_expected.entry(backend).or_default(),
        ] {
            c.packets += 1;
            c.bytes += bytes;
            c.new_flows += u64::from(new_flow);
        }
    }

    /// The VIP and backend counters gained what the model says they must (checked at the end
    /// of a run: reading them per frame would halve the speed).
    pub fn check_totals(&self) -> Result<Vec<String>, LabError> {
        let balancer = &self.lab.balancer;
        let maps = &balancer.dataplane.maps;
        let mut what = Vec::new();
        let gained = |now: Counters, start: Counters| Counters {
            packets: now.packets - start.packets,
            bytes: now.bytes - start.bytes,
            new_flows: now.new_flows - start.new_flows,
        };
        for (&id, &start) in &self.vip_start {
            let vip = balancer
                .vips
                .iter()
                .find(|v| v.id == id)
                .expect("a VIP of the lab");
            let got = gained(balancer.vip_counters(vip)?, start);
            let want = self.vip_expected.get(&id).copied().unwrap_or_default();
            if got != want {
                what.push(format!("VIP {id} counters {got:?} (model: {want:?})"));
            }
        }
        for (&id, &start) in &self.backend_start {
            let got = gained(maps.backend_counters(id)?, start);
            let want = self.backend_expected.get(&id).copied().unwrap_or_default();
            if got != want {
                what.push(format!("backend {id} counters {got:?} (model: {want:?})"));
            }
        }
        Ok(what)
    }

    /// The fuzzing loop (see [`super::run`]).
    pub fn fuzz(&mut self, options: Options) -> Result<Report, LabError> {
        let mut generator = Generator::new(options.seed, self.targets());
        let mut frame = Vec::with_capacity(super::generate::MAX_FRAME);
        let mut report = Report {
            options,
            elapsed: Default::default(),
            reasons: [0; Reason::COUNT as usize],
            state_changes: 0,
            differences: Vec::new(),
        };
        let started = Instant::now();
        for index in 0..options.packets {
            generator.next_frame(&mut frame);
            if self.rng.below(CHANGE_EVERY) == 0 {
                self.change_state()?;
                report.state_changes += 1;
            }
            if let Ok(packet) = model::parse::parse(&frame)
                && self.rng.chance(INJECT_PERCENT)
            {
                self.inject_flow(&packet.key)?;
            }
            let (reason, what) = self.check(&frame)?;
            report.reasons[reason as usize] += 1;
            if !what.is_empty() {
                report.differences.push(Difference {
                    seed: Some(options.seed),
                    index,
                    frame: frame.clone(),
                    what,
                });
                if report.differences.len() >= options.max_differences.max(1) {
                    break;
                }
            }
        }
        report.elapsed = started.elapsed();
        let totals = self.check_totals()?;
        if !totals.is_empty() && report.differences.len() < options.max_differences.max(1) {
            report.differences.push(Difference {
                seed: Some(options.seed),
                index: options.packets.saturating_sub(1),
                frame: Vec::new(),
                what: totals,
            });
        }
        Ok(report)
    }
}
