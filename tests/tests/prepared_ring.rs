//! Tables prepared one check early (`Balancer::prepare_health`): a publish that finds the table
//! it needs already built puts exactly the ring a cold build would have made live, and a prepared
//! table made for any other state is never used. Each scenario runs twice on the real program
//! and maps, with and without the preparation, and the two live rings (owner and prior of every
//! slot) must be identical; packets must reach the backend the daemon's own Maglev table names.

use lb::{balancer::PublishReport, health::Health, pool::ActivePool};
use lb_common::PROTO_TCP;
use lb_tests::{
    frames::FrameSpec,
    packet_lab::{PacketLab, flow_key},
};

/// A weighted VIP (the scheduled Maglev build) with a standby pool, and an equal-weight VIP
/// (the round-robin build).
const CONFIG: &str = r#"
interface = "lab0"
ring_size = 65537
max_vips = 4
max_backends = 32
flow_table_size = 4096

[[vip]]
name = "weighted"
address = "10.0.2.100"
port = 80
protocol = "tcp"
min_healthy = 3
[[vip.backend]]
address = "10.0.2.11"
weight = 3
[[vip.backend]]
address = "10.0.2.12"
[[vip.backend]]
address = "10.0.2.13"
weight = 2
[[vip.backend]]
address = "10.0.2.14"
[[vip.backend]]
address = "10.0.2.21"
standby = true
[[vip.backend]]
address = "10.0.2.22"
standby = true

[[vip]]
name = "equal"
address = "10.0.2.101"
port = 443
protocol = "tcp"
[[vip.backend]]
address = "10.0.2.31"
[[vip.backend]]
address = "10.0.2.32"
[[vip.backend]]
address = "10.0.2.33"
[[vip.backend]]
address = "10.0.2.34"
[[vip.backend]]
address = "10.0.2.35"
"#;

const WEIGHTED: usize = 0;
const EQUAL: usize = 1;

/// Two labs on the same config: `prepared` gets the hints, `cold` does not.
struct Twins {
    prepared: PacketLab,
    cold: PacketLab,
    /// The next client port: every check sends new flows (a recorded one keeps its backend).
    next_port: u16,
}

impl Twins {
    fn new() -> Self {
        Self {
            prepared: PacketLab::new(CONFIG),
            cold: PacketLab::new(CONFIG),
            next_port: 10_000,
        }
    }

    fn prepare(&mut self, vip: usize, backend: usize, health: Health) {
        self.prepared
            .balancer
            .prepare_health(vip, backend, health)
            .unwrap_or_else(|e| panic!("preparing vip {vip} backend {backend} {health}: {e}"));
        assert!(
            self.prepared.balancer.prepared_age(vip).is_some(),
            "vip {vip} holds its prepared table"
        );
    }

    /// The same health change on both; returns the prepared twin's report after checking that
    /// both put the same ring live and route new flows by the daemon's own table.
    fn set_health(&mut self, vip: usize, backend: usize, health: Health) -> PublishReport {
        let report = self
            .prepared
            .balancer
            .set_health(vip, backend, health)
            .expect("publish (prepared twin)");
        let cold = self
            .cold
            .balancer
            .set_health(vip, backend, health)
            .expect("publish (cold twin)");
        assert!(!cold.prepared, "the cold twin never prepares");
        assert_eq!(
            (report.pool_before, report.pool_after, report.in_ring),
            (cold.pool_before, cold.pool_after, cold.in_ring),
            "vip {vip} backend {backend} -> {health}: the same pools and ring members"
        );
        let (with, without) = (self.prepared.live_ring(vip), self.cold.live_ring(vip));
        let differing = with.iter().zip(&without).filter(|(a, b)| a != b).count();
        assert_eq!(
            differing,
            0,
            "vip {vip} backend {backend} -> {health}: the live rings differ in {differing} of {} \
             slots (prepared: {}; both must be the cold build's ring)",
            with.len(),
            report.prepared
        );
        self.check_new_flows(vip);
        report
    }

    /// 200 new flows' SYNs reach, in the prepared twin, the backend the cold Maglev table names.
    fn check_new_flows(&mut self, vip: usize) {
        let model = &self.prepared.balancer.vips[vip];
        let (address, port) = (model.address, model.port);
        let first = self.next_port;
        self.next_port += 200;
        for sport in first..first + 200 {
            let spec = FrameSpec::tcp_syn("192.0.2.77".parse().unwrap(), sport, address, port);
            let key = flow_key(spec.src, sport, address, port, PROTO_TCP);
            let expected = self.prepared.expected_backend(vip, &key);
            assert_eq!(
                self.prepared.backend_of(&spec.build()),
                expected,
                "vip {vip}: SYN from port {sport}"
            );
        }
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_prepared_table_puts_the_cold_builds_ring_live_for_down_up_and_a_pool_flip() {
    let mut twins = Twins::new();

    // Equal weights: one down, prepared; then back up, prepared.
    twins.prepare(EQUAL, 2, Health::Down);
    let down = twins.set_health(EQUAL, 2, Health::Down);
    assert!(down.prepared, "the prepared table was used: {down:?}");
    assert_eq!(twins.prepared.balancer.prepared_age(EQUAL), None, "used up");
    twins.prepare(EQUAL, 2, Health::Up);
    assert!(twins.set_health(EQUAL, 2, Health::Up).prepared);

    // Weighted: the first primary down keeps 3 of 4 healthy (min_healthy 3): no flip.
    twins.prepare(WEIGHTED, 0, Health::Down);
    let first = twins.set_health(WEIGHTED, 0, Health::Down);
    assert!(first.prepared);
    assert_eq!(first.pool_after, ActivePool::Primary);
    // The second one down flips the VIP to its standbys: prepared too.
    twins.prepare(WEIGHTED, 1, Health::Down);
    let flip = twins.set_health(WEIGHTED, 1, Health::Down);
    assert!(flip.prepared, "the flip's table was prepared: {flip:?}");
    assert_eq!(
        (flip.pool_before, flip.pool_after),
        (ActivePool::Primary, ActivePool::Standby)
    );
    // And back.
    twins.prepare(WEIGHTED, 1, Health::Up);
    let back = twins.set_health(WEIGHTED, 1, Health::Up);
    assert!(back.prepared);
    assert_eq!(back.pool_after, ActivePool::Primary);
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_table_prepared_for_another_state_is_never_used() {
    let mut twins = Twins::new();

    // Prepared for backend 1 going down, but backend 3 goes down first: built cold.
    twins.prepare(EQUAL, 1, Health::Down);
    let other = twins.set_health(EQUAL, 3, Health::Down);
    assert!(
        !other.prepared,
        "a table for another change was used: {other:?}"
    );
    // The table without backend 1 still has backend 3 in it: no longer the one needed.
    let stale = twins.set_health(EQUAL, 1, Health::Down);
    assert!(
        !stale.prepared,
        "a stale prepared table was used: {stale:?}"
    );
    // Backend 3 back: now the VIP is in exactly the state the table was built for (1 down, 3
    // up), so it is used, and it is the cold build's ring (`set_health` compares every slot).
    assert!(twins.set_health(EQUAL, 3, Health::Up).prepared);

    // Prepared on one VIP, the change on the other: built cold; the table stays for its VIP.
    twins.prepare(WEIGHTED, 3, Health::Down);
    assert!(!twins.set_health(EQUAL, 4, Health::Down).prepared);
    assert!(twins.set_health(WEIGHTED, 3, Health::Down).prepared);

    // A reload that changes the VIP's backends drops its prepared table (the turn order it was
    // built for is gone), even when the weights would line up again.
    twins.prepare(EQUAL, 0, Health::Down);
    let added = CONFIG.replace(
        "address = \"10.0.2.35\"",
        "address = \"10.0.2.35\"\n[[vip.backend]]\naddress = \"10.0.2.36\"",
    );
    let removed_again = CONFIG;
    for lab in [&mut twins.prepared, &mut twins.cold] {
        lab.reload(&added);
        lab.reload(removed_again);
    }
    assert_eq!(
        twins.prepared.balancer.prepared_age(EQUAL),
        None,
        "the reload dropped the prepared table"
    );
    assert!(!twins.set_health(EQUAL, 0, Health::Down).prepared);
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_vip_keeps_its_last_two_prepared_tables() {
    let mut twins = Twins::new();

    // Two hints, then the older one's change: its table is still there.
    twins.prepare(EQUAL, 0, Health::Down);
    twins.prepare(EQUAL, 1, Health::Down);
    assert_eq!(twins.prepared.balancer.prepared_count(EQUAL), 2);
    assert!(
        twins.set_health(EQUAL, 0, Health::Down).prepared,
        "the older of two prepared tables was used"
    );
    assert_eq!(
        twins.prepared.balancer.prepared_count(EQUAL),
        1,
        "the used one is gone, the other (now stale) stays"
    );

    // Three more: the oldest go. The same hint twice builds nothing more.
    twins.prepare(EQUAL, 2, Health::Down);
    twins.prepare(EQUAL, 3, Health::Down);
    twins.prepare(EQUAL, 4, Health::Down);
    twins.prepare(EQUAL, 4, Health::Down);
    assert_eq!(twins.prepared.balancer.prepared_count(EQUAL), 2, "capped");
    assert!(
        !twins.set_health(EQUAL, 2, Health::Down).prepared,
        "backend 2's table was pushed out by newer ones"
    );
    assert!(!twins.set_health(EQUAL, 2, Health::Up).prepared);
    assert!(
        twins.set_health(EQUAL, 4, Health::Down).prepared,
        "the newest table is kept"
    );
    assert!(!twins.set_health(EQUAL, 4, Health::Up).prepared);
    assert!(
        twins.set_health(EQUAL, 3, Health::Down).prepared,
        "the second newest too"
    );
}
