//! The flow table only where the ring changed (issue 11, DESIGN §8), at the packet level: the
//! real program and maps (`BPF_PROG_TEST_RUN`), filled by the daemon's own `Balancer`.
//!
//! - A TCP packet in an unchanged slot goes to the slot's owner and the flow table is neither
//!   read nor written: a million established flows pass through a 1,024-entry table that stays
//!   empty, and a million-SYN flood cannot evict a live connection.
//! - In a changed slot, a connection that began before the change goes to the slot's prior owner
//!   (also on a node that never saw it), one that began in the window keeps its backend (A to B
//!   to C, A to B and back to A), and a new one goes to the owner.
//! - The sweep forgets idle flows and returns a changed slot to unchanged `tcp_idle_timeout`
//!   after its last change unless a live flow of the slot is on another backend than its owner.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use lb::dataplane::flows::kernel_now_ns;
use lb_common::{FlowKey, NO_BACKEND, PROTO_TCP, PROTO_UDP, RingSlot, flow_hash};
use lb_tests::{
    frames::{FrameSpec, LB_MAC},
    fuzz::rng::Rng,
    packet_lab::{PacketLab, XDP_TX, backend_mac, flow_key, two_vip_config},
};

const WEB: usize = 0;
const DNS: usize = 1;
const M: u32 = 65537;
/// Room for every backend of every test (a reload cannot change it).
const MAX_BACKENDS: u32 = 128;

/// web (TCP) with `backends` backends from 10.0.0.11 on, dns (UDP) with two.
fn config(backends: u32, flow_table_size: u32, tcp_idle_timeout: &str) -> String {
    two_vip_config(
        M,
        MAX_BACKENDS,
        flow_table_size,
        backends,
        &format!("tcp_idle_timeout = \"{tcp_idle_timeout}\"\n"),
    )
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

/// A TCP connection to web.
#[derive(Clone, Copy, Debug)]
struct Conn {
    src: IpAddr,
    sport: u16,
}

impl Conn {
    fn key(&self) -> FlowKey {
        flow_key(self.src, self.sport, ip("10.0.0.100"), 80, PROTO_TCP)
    }
    fn syn(&self) -> FrameSpec {
        FrameSpec::tcp_syn(self.src, self.sport, ip("10.0.0.100"), 80)
    }
    fn ack(&self) -> FrameSpec {
        FrameSpec::tcp_ack(self.src, self.sport, ip("10.0.0.100"), 80)
    }
}

fn conns(client: &str, count: u16) -> Vec<Conn> {
    (0..count)
        .map(|i| Conn {
            src: ip(client),
            sport: 20_000 + i,
        })
        .collect()
}

/// Sends `frame`; asserts XDP_TX and exactly the MAC rewrite; returns the backend id.
fn send(lab: &mut PacketLab, frame: &FrameSpec) -> u32 {
    let bytes = frame.build();
    let (verdict, out) = lab.run(&bytes);
    assert_eq!(verdict, XDP_TX, "verdict for {frame:?}");
    let id = u32::from(out[4]) << 8 | u32::from(out[5]);
    let mut expected = bytes.clone();
    expected[0..6].copy_from_slice(&backend_mac(id));
    expected[6..12].copy_from_slice(&LB_MAC);
    assert_eq!(out, expected, "rewritten bytes for {frame:?}");
    id
}

/// Opens each connection (SYN, then an ACK to the same backend); returns their backends.
fn open(lab: &mut PacketLab, conns: &[Conn]) -> Vec<u32> {
    conns
        .iter()
        .map(|c| {
            let backend = send(lab, &c.syn());
            assert_eq!(
                send(lab, &c.ack()),
                backend,
                "{c:?}: the ACK left the SYN's backend"
            );
            backend
        })
        .collect()
}

fn slot_index(key: &FlowKey) -> usize {
    (flow_hash(key) % M) as usize
}

/// The flow table's keys.
fn table_keys(lab: &PacketLab) -> HashSet<FlowKey> {
    lab.flow_entries().into_iter().map(|(k, _)| k).collect()
}

/// Reload with one more web backend (it comes up at once): about 1/(n+1) of the slots change.
fn add_backends(lab: &mut PacketLab, now_backends: u32, flow_table_size: u32, idle: &str) {
    lab.reload(&config(now_backends, flow_table_size, idle));
}

/// A fast IPv4 TCP frame to web: a template with the source address and port patched in (the
/// program does not check checksums).
struct FrameTemplate {
    bytes: Vec<u8>,
}

impl FrameTemplate {
    fn new(flags: u8) -> Self {
        let mut spec = FrameSpec::tcp_syn(ip("192.0.2.1"), 1, ip("10.0.0.100"), 80);
        spec.l4 = lb_tests::frames::L4::Tcp { flags };
        Self {
            bytes: spec.build(),
        }
    }
    fn frame(&mut self, src: Ipv4Addr, sport: u16) -> &[u8] {
        self.bytes[26..30].copy_from_slice(&src.octets());
        self.bytes[34..36].copy_from_slice(&sport.to_be_bytes());
        &self.bytes
    }
}

fn random_client(rng: &mut Rng) -> (Ipv4Addr, u16) {
    let a = rng.next_u64();
    let src = Ipv4Addr::new(
        11 + (a % 200) as u8,
        (a >> 8) as u8,
        (a >> 16) as u8,
        (a >> 24) as u8,
    );
    (src, 1024 + ((a >> 32) % 64_000) as u16)
}

/// Runs `frame` and returns the backend its destination MAC names (asserting XDP_TX).
fn forward_fast(lab: &mut PacketLab, frame: &[u8]) -> u32 {
    let (verdict, out) = lab.run(frame);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(&out[6..12], &LB_MAC);
    u32::from(out[4]) << 8 | u32::from(out[5])
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn unchanged_slots_never_touch_the_flow_table_and_udp_records_every_flow() {
    let mut lab = PacketLab::new(&config(10, 65536, "10m"));
    let ring = lab.live_ring(WEB);
    assert!(
        ring.iter()
            .all(|s| !s.is_changed() && s.owner != NO_BACKEND),
        "backends brought up in one publish leave every slot unchanged"
    );
    assert_eq!(lab.balancer.changed_slots(WEB), 0);
    let conns = conns("192.0.2.10", 2000);
    let backends = open(&mut lab, &conns);
    for (c, &b) in conns.iter().zip(&backends) {
        assert_eq!(
            b,
            ring[slot_index(&c.key())].owner,
            "{c:?} goes to its slot's owner"
        );
        let mut fin = c.ack();
        fin.l4 = lb_tests::frames::L4::Tcp { flags: 0x11 };
        assert_eq!(send(&mut lab, &fin), b, "{c:?}: FIN");
    }
    assert!(lab.flow_entries().is_empty(), "no TCP flow was recorded");
    let udp: Vec<FrameSpec> = (0..100)
        .map(|i| FrameSpec::udp(ip("192.0.2.11"), 30_000 + i, ip("10.0.0.100"), 53, b"q"))
        .collect();
    let udp_backends: Vec<u32> = udp.iter().map(|f| send(&mut lab, f)).collect();
    let entries = lab.flow_entries();
    assert_eq!(entries.len(), 100, "every UDP flow is recorded");
    assert!(entries.iter().all(|(k, _)| k.proto == PROTO_UDP));
    for (f, b) in udp.iter().zip(&udp_backends) {
        let key = flow_key(f.src, f.sport, f.dst, f.dport, PROTO_UDP);
        let state = entries.iter().find(|(k, _)| *k == key).expect("recorded").1;
        assert_eq!(state.backend, *b);
        assert_eq!(state.vip_id, lab.balancer.vips[DNS].id);
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn connections_keep_their_backend_through_a_to_b_to_c_and_a_to_b_to_a() {
    let mut lab = PacketLab::new(&config(10, 65536, "10m"));
    let ring0 = lab.live_ring(WEB);
    let old = conns("192.0.2.20", 6000);
    let old_backends = open(&mut lab, &old);

    // A to B: .21 joins and takes about 1/11 of the slots.
    add_backends(&mut lab, 11, 65536, "10m");
    let ring1 = lab.live_ring(WEB);
    let b21 = lab.id("web", "10.0.0.21");
    let changed1: Vec<usize> = (0..M as usize).filter(|&i| ring1[i].is_changed()).collect();
    assert!(changed1.len() > 4000, "{} slots changed", changed1.len());
    for i in 0..M as usize {
        if ring1[i].owner == ring0[i].owner {
            assert_eq!(ring1[i], RingSlot::unchanged(ring0[i].owner), "slot {i}");
        } else {
            assert_eq!(ring1[i].prior, ring0[i].owner, "slot {i}: A is the prior");
        }
    }
    assert!(changed1.iter().filter(|&&i| ring1[i].owner == b21).count() > 4000);
    let during1 = conns("192.0.2.21", 6000);
    let during1_backends = open(&mut lab, &during1);

    // B to C: .22 joins and takes slots from .21 too (their prior stays A).
    add_backends(&mut lab, 12, 65536, "10m");
    let ring2 = lab.live_ring(WEB);
    let twice: Vec<usize> = changed1
        .iter()
        .copied()
        .filter(|&i| ring2[i].owner != ring1[i].owner)
        .collect();
    assert!(!twice.is_empty(), "some slot went A to B to C");
    for &i in &twice {
        assert_eq!(
            ring2[i].prior, ring0[i].owner,
            "A stays the prior of slot {i}"
        );
    }
    let during2 = conns("192.0.2.22", 6000);
    let during2_backends = open(&mut lab, &during2);

    // Back to A: .21 and .22 are drained (up, no new flows): the owners are ring0's again.
    for address in ["10.0.0.21", "10.0.0.22"] {
        let b = lab.balancer.vips[WEB]
            .backends
            .iter()
            .position(|b| b.address == ip(address))
            .unwrap();
        lab.balancer.set_weight(WEB, b, 0).expect("drain");
    }
    let ring3 = lab.live_ring(WEB);
    let back: Vec<usize> = (0..M as usize)
        .filter(|&i| ring3[i].is_changed() && ring3[i].owner == ring3[i].prior)
        .collect();
    assert!(back.len() > 4000, "slots A to B to A: {}", back.len());
    for i in 0..M as usize {
        assert_eq!(ring3[i].owner, ring0[i].owner, "slot {i} is A's again");
    }

    // Everyone is where they began, whatever their slot went through.
    let mut seen_twice = 0;
    let mut seen_back_on_b = 0;
    for (set, backends) in [
        (&old, &old_backends),
        (&during1, &during1_backends),
        (&during2, &during2_backends),
    ] {
        for (c, &b) in set.iter().zip(backends) {
            let i = slot_index(&c.key());
            seen_twice += usize::from(twice.contains(&i));
            seen_back_on_b += usize::from(back.contains(&i) && b != ring3[i].owner);
            assert_eq!(send(&mut lab, &c.ack()), b, "{c:?} (slot {i}) moved");
        }
    }
    assert!(seen_twice > 10, "connections in A-B-C slots: {seen_twice}");
    assert!(
        seen_back_on_b > 100,
        "connections begun on B in A-B-A slots: {seen_back_on_b}"
    );
    // New connections go to the owner, in changed and unchanged slots alike.
    let new = conns("192.0.2.23", 3000);
    for (c, b) in new.iter().zip(open(&mut lab, &new)) {
        assert_eq!(b, ring3[slot_index(&c.key())].owner, "{c:?}");
    }
    // The table holds flows of changed slots only.
    for (key, _) in lab.flow_entries() {
        if key.proto == PROTO_TCP {
            assert!(
                ring3[slot_index(&key)].is_changed(),
                "{key:?} recorded in an unchanged slot"
            );
        }
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn idle_connections_across_a_change_and_the_sweep() {
    let idle = "2s";
    let mut lab = PacketLab::new(&config(10, 65536, idle));
    let old = conns("192.0.2.30", 3000);
    let old_backends = open(&mut lab, &old);
    // Silent since before the change ...
    add_backends(&mut lab, 11, 65536, idle);
    let changed_at = Instant::now();
    let ring = lab.live_ring(WEB);
    let in_changed: Vec<usize> = (0..old.len())
        .filter(|&k| ring[slot_index(&old[k].key())].is_changed())
        .collect();
    assert!(
        in_changed.len() > 100,
        "{} connections in changed slots",
        in_changed.len()
    );
    // ... one connection of a changed slot speaks again: it reaches its backend (the prior
    // owner) and is recorded; it then keeps talking.
    let talker = in_changed[0];
    let talker_slot = slot_index(&old[talker].key());
    assert_eq!(send(&mut lab, &old[talker].ack()), old_backends[talker]);
    assert_ne!(old_backends[talker], ring[talker_slot].owner);
    // A sweep before the timeout returns nothing.
    let report = lab.balancer.sweep_flows(kernel_now_ns()).expect("sweep");
    assert_eq!(report.returned, 0);
    assert_eq!(report.flows, 1);
    assert_eq!(lab.balancer.recorded_flows(WEB), 1);
    let changed = lab.balancer.changed_slots(WEB);
    while changed_at.elapsed() < Duration::from_millis(2600) {
        assert_eq!(send(&mut lab, &old[talker].ack()), old_backends[talker]);
        std::thread::sleep(Duration::from_millis(200));
    }
    // After the timeout: every changed slot without a live flow on a non-owner is unchanged
    // again; the talker's slot stays changed.
    let report = lab.balancer.sweep_flows(kernel_now_ns()).expect("sweep");
    assert_eq!(report.returned, changed - 1, "{report:?}");
    assert_eq!(lab.balancer.changed_slots(WEB), 1);
    let ring = lab.live_ring(WEB);
    assert!(ring[talker_slot].is_changed());
    // Connections idle longer than tcp_idle_timeout across the change now go to their slot's
    // new owner (the documented limit); the talker and any connection sharing its slot stay.
    let mut sharing = 0;
    for &k in &in_changed[1..] {
        let slot = slot_index(&old[k].key());
        let now = send(&mut lab, &old[k].ack());
        if slot == talker_slot {
            sharing += 1;
            assert_eq!(
                now, old_backends[k],
                "{:?} shares the talker's changed slot",
                old[k]
            );
        } else {
            assert_eq!(now, ring[slot].owner, "{:?}", old[k]);
        }
    }
    assert_eq!(send(&mut lab, &old[talker].ack()), old_backends[talker]);
    // The talker goes quiet: its entry is forgotten and its slot returns too.
    std::thread::sleep(Duration::from_millis(3200));
    let report = lab.balancer.sweep_flows(kernel_now_ns()).expect("sweep");
    assert_eq!(report.expired, 1 + sharing, "{report:?}");
    assert_eq!(report.returned, 1, "{report:?}");
    assert_eq!(lab.balancer.changed_slots(WEB), 0);
    assert!(lab.flow_entries().is_empty());
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_syn_flood_with_a_ring_change_evicts_no_connection() {
    const TABLE: u32 = 65536;
    let mut lab = PacketLab::new(&config(20, TABLE, "10m"));
    let long_lived = conns("192.0.2.40", 1000);
    let backends = open(&mut lab, &long_lived);
    let mut rng = Rng::new(0x5eed_f100d);
    let mut syn = FrameTemplate::new(0x02);
    let mut ring = lab.live_ring(WEB);
    let mut expected: HashSet<FlowKey> = HashSet::new();
    let mut changed = false;
    for i in 0..1_000_000u32 {
        if i == 500_000 {
            add_backends(&mut lab, 21, TABLE, "10m");
            ring = lab.live_ring(WEB);
            changed = true;
        }
        let (src, sport) = random_client(&mut rng);
        let backend = forward_fast(&mut lab, syn.frame(src, sport));
        let key = flow_key(IpAddr::V4(src), sport, ip("10.0.0.100"), 80, PROTO_TCP);
        let slot = ring[slot_index(&key)];
        assert_eq!(backend, slot.owner, "flood SYN {i} goes to the owner");
        if changed && slot.is_changed() {
            expected.insert(key);
        }
        if i % 1000 == 0 {
            let k = (i / 1000) as usize % long_lived.len();
            let c = long_lived[k];
            assert_eq!(
                send(&mut lab, &c.ack()),
                backends[k],
                "{c:?} moved during the flood"
            );
            if changed && ring[slot_index(&c.key())].is_changed() {
                expected.insert(c.key());
            }
        }
    }
    for (c, &b) in long_lived.iter().zip(&backends) {
        assert_eq!(send(&mut lab, &c.ack()), b, "{c:?} moved after the flood");
        if ring[slot_index(&c.key())].is_changed() {
            expected.insert(c.key());
        }
    }
    let table = table_keys(&lab);
    for key in &table {
        assert!(
            ring[slot_index(key)].is_changed(),
            "{key:?} recorded in an unchanged slot"
        );
    }
    assert!(
        expected.len() > 10_000,
        "{} flows of changed slots",
        expected.len()
    );
    assert!(
        expected.len() < (TABLE / 2) as usize,
        "the change must not overflow one CPU's LRU"
    );
    assert_eq!(
        table.len(),
        expected.len(),
        "the table holds exactly the changed slots' flows"
    );
    assert_eq!(table, expected);
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_million_established_flows_pass_a_1024_entry_table_that_stays_empty() {
    let mut lab = PacketLab::new(&config(100, 1024, "10m"));
    let ring = lab.live_ring(WEB);
    let mut rng = Rng::new(0x1_000_000);
    let mut ack = FrameTemplate::new(0x10);
    let mut seen = HashSet::with_capacity(1_000_000);
    while seen.len() < 1_000_000 {
        let (src, sport) = random_client(&mut rng);
        let key = flow_key(IpAddr::V4(src), sport, ip("10.0.0.100"), 80, PROTO_TCP);
        if !seen.insert(key) {
            continue;
        }
        let backend = forward_fast(&mut lab, ack.frame(src, sport));
        assert_eq!(
            backend,
            ring[slot_index(&key)].owner,
            "flow {} ({key:?})",
            seen.len()
        );
    }
    assert!(lab.flow_entries().is_empty(), "the flow table stays empty");
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_node_that_never_saw_a_connection_sends_it_to_the_backend_it_began_on() {
    let cfg = config(10, 65536, "10m");
    let mut a = PacketLab::new(&cfg);
    let mut b = PacketLab::new(&cfg);
    let flows = conns("192.0.2.50", 6000);
    let began = open(&mut a, &flows);
    // The slot owners change on both nodes (the same config change), then ECMP moves the
    // connections to node B, which has never seen them.
    for lab in [&mut a, &mut b] {
        add_backends(lab, 11, 65536, "10m");
    }
    assert_eq!(
        a.live_ring(WEB),
        b.live_ring(WEB),
        "both nodes hold the same slots"
    );
    let ring = b.live_ring(WEB);
    let mut in_changed = 0;
    let address = |lab: &PacketLab, id: u32| {
        lab.balancer.vips[WEB]
            .backends
            .iter()
            .find(|x| x.id == id)
            .unwrap()
            .address
    };
    for (c, &first) in flows.iter().zip(&began) {
        in_changed += usize::from(ring[slot_index(&c.key())].is_changed());
        let on_b = send(&mut b, &c.ack());
        assert_eq!(
            address(&b, on_b),
            address(&a, first),
            "{c:?} left its backend on node B"
        );
    }
    assert!(
        in_changed > 300,
        "{in_changed} connections in changed slots"
    );
    // New connections get the same backend on both nodes.
    for c in conns("192.0.2.51", 2000) {
        let on_a = send(&mut a, &c.syn());
        let on_b = send(&mut b, &c.syn());
        assert_eq!(address(&a, on_a), address(&b, on_b));
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_removed_prior_passes_nothing_to_a_backend_that_reuses_its_id_and_restarts_keep_priors() {
    // Exactly as many backend ids as the config needs, so a new backend reuses a freed id.
    let exact = |text: String| {
        text.replace(
            &format!("max_backends = {MAX_BACKENDS}"),
            "max_backends = 13",
        )
    };
    let mut lab = PacketLab::new(&exact(config(10, 65536, "10m")));
    let old = conns("192.0.2.60", 6000);
    let old_backends = open(&mut lab, &old);
    // .21 joins: slots change with priors of the ten.
    lab.reload(&exact(config(11, 65536, "10m")));
    // A restart keeps the changed slots and their priors (change times restart: conservative).
    let (mut lab, _, _) = lab.restart(&exact(config(11, 65536, "10m")));
    assert!(lab.balancer.changed_slots(WEB) > 4000);
    for (c, &b) in old.iter().zip(&old_backends) {
        assert_eq!(send(&mut lab, &c.ack()), b, "{c:?} moved over the restart");
    }
    // .11 goes and .31 comes, with .11's old id: the connections that were on .11 are
    // re-chosen from the ring, and none is handed to .31 as if it had begun there.
    let b11 = lab.id("web", "10.0.0.11");
    let text = exact(config(11, 65536, "10m"))
        .replace("address = \"10.0.0.11\"\n", "address = \"10.0.0.31\"\n");
    lab.reload(&text);
    let b31 = lab.id("web", "10.0.0.31");
    assert_eq!(b31, b11, "the freed id is reused");
    let ring = lab.live_ring(WEB);
    assert!(
        ring.iter().all(|s| s.prior != b31),
        "no slot names the reused id as its prior"
    );
    let mut were_on_11 = 0;
    for (c, &b) in old.iter().zip(&old_backends) {
        let now = send(&mut lab, &c.ack());
        if b == b11 {
            were_on_11 += 1;
            assert_eq!(
                now,
                ring[slot_index(&c.key())].owner,
                "{c:?} (was on .11) re-chosen"
            );
        } else {
            assert_eq!(now, b, "{c:?} moved");
        }
    }
    assert!(were_on_11 > 300, "{were_on_11} connections were on .11");
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_starting_daemon_keeps_no_priors_until_its_program_is_attached() {
    // A daemon starting from nothing publishes as its backends come up one by one, before the
    // program is attached (`keeps_priors` off): two nodes whose backends came up in other orders
    // still hold the same, unchanged slots.
    let mut a = PacketLab::new(&config(0, 65536, "10m"));
    let mut b = PacketLab::new(&config(0, 65536, "10m"));
    for (lab, order) in [
        (&mut a, (0..10).collect::<Vec<_>>()),
        (&mut b, (0..10).rev().collect()),
    ] {
        lab.balancer.keeps_priors = false;
        let mut text = config(0, 65536, "10m");
        for i in order {
            // One backend more per reload (each comes up and is published on its own).
            text = text.replacen(
                "\n[[vip]]\nname = \"dns\"",
                &format!(
                    "[[vip.backend]]\naddress = \"10.0.0.{}\"\n\n[[vip]]\nname = \"dns\"",
                    11 + i
                ),
                1,
            );
            lab.reload(&text);
        }
        lab.balancer.keeps_priors = true;
        assert_eq!(
            lab.balancer.changed_slots(WEB),
            0,
            "start-up changes keep no prior"
        );
    }
    let owners = |lab: &PacketLab| {
        lab.live_ring(WEB)
            .iter()
            .map(|s| s.owner)
            .collect::<Vec<_>>()
    };
    let address = |lab: &PacketLab, id: u32| {
        lab.balancer.vips[WEB]
            .backends
            .iter()
            .find(|x| x.id == id)
            .map(|x| x.address)
    };
    let (ra, rb) = (owners(&a), owners(&b));
    assert!(
        ra.iter()
            .zip(&rb)
            .all(|(x, y)| address(&a, *x) == address(&b, *y))
    );
    // Once attached, changes keep priors again.
    add_backends(&mut a, 11, 65536, "10m");
    assert!(a.balancer.changed_slots(WEB) > 4000);
}
