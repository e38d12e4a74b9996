//! Packet tests of failover in the data plane: primary/standby pools and `on_all_down`, with the
//! real program and maps through BPF_PROG_TEST_RUN, health set directly on the daemon's model.

use lb::{health::Health, pool::ActivePool};
use lb_common::{PROTO_TCP, Reason};
use lb_tests::{
    frames::{FrameSpec, L4, LB_MAC},
    packet_lab::{PacketLab, XDP_DROP, XDP_PASS, XDP_TX, backend_mac, flow_key},
};

const CONFIG: &str = r#"
interface = "lab0"
ring_size = 65537
max_vips = 4
max_backends = 16
flow_table_size = 4096

[[vip]]
name = "pooled"
address = "10.0.1.100"
port = 80
protocol = "tcp"
min_healthy = 2
on_all_down = "pass"
[[vip.backend]]
address = "10.0.1.11"
[[vip.backend]]
address = "10.0.1.12"
[[vip.backend]]
address = "10.0.1.13"
standby = true

[[vip]]
name = "dark"
address = "10.0.1.101"
port = 80
protocol = "tcp"
[[vip.backend]]
address = "10.0.1.21"
"#;

const POOLED: usize = 0;
const DARK: usize = 1;
const P1: usize = 0;
const P2: usize = 1;
const STANDBY: usize = 2;

fn syn(sport: u16, vip: &str) -> FrameSpec {
    FrameSpec::tcp_syn(
        "192.0.2.50".parse().unwrap(),
        sport,
        vip.parse().unwrap(),
        80,
    )
}

fn ack(spec: &FrameSpec) -> FrameSpec {
    FrameSpec {
        l4: L4::Tcp { flags: 0x10 },
        ..spec.clone()
    }
}

/// Sends a frame, asserts XDP_TX with exactly the expected MACs, returns the backend index.
fn forwarded_to(lab: &mut PacketLab, spec: &FrameSpec) -> usize {
    let frame = spec.build();
    let (verdict, out) = lab.run(&frame);
    assert_eq!(verdict, XDP_TX, "verdict for {spec:?}");
    assert_eq!(&out[6..12], &LB_MAC, "source MAC");
    assert_eq!(
        &out[12..],
        &frame[12..],
        "everything after the MACs is unchanged"
    );
    let backends = &lab.balancer.vips[POOLED].backends;
    backends
        .iter()
        .position(|b| backend_mac(b.id) == out[0..6])
        .unwrap_or_else(|| panic!("frame went to an unknown MAC {:02x?}", &out[0..6]))
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn the_standby_takes_new_flows_only_below_min_healthy_and_healthy_flows_never_move() {
    let mut lab = PacketLab::new(CONFIG);
    assert_eq!(lab.balancer.vips[POOLED].active_pool, ActivePool::Primary);
    let flows: Vec<FrameSpec> = (10_000..10_300).map(|p| syn(p, "10.0.1.100")).collect();
    let first: Vec<usize> = flows.iter().map(|f| forwarded_to(&mut lab, f)).collect();
    assert!(
        !first.contains(&STANDBY),
        "the standby got a new flow while the primaries were healthy"
    );
    assert!(
        first.contains(&P1) && first.contains(&P2),
        "both primaries serve: {first:?}"
    );

    // One of two primaries down, min_healthy = 2: the standby pool takes over.
    let flip = lab
        .balancer
        .set_health(POOLED, P1, Health::Down)
        .expect("P1 down");
    assert_eq!(
        (flip.pool_before, flip.pool_after),
        (ActivePool::Primary, ActivePool::Standby)
    );
    let mut moved = Vec::new();
    for (flow, &before) in flows.iter().zip(&first) {
        let now = forwarded_to(&mut lab, &ack(flow));
        match before {
            P1 => assert_eq!(
                now, STANDBY,
                "flow {} of the dead primary must move to the standby pool",
                flow.sport
            ),
            _ => assert_eq!(now, P2, "flow {} on the healthy primary moved", flow.sport),
        }
        moved.push(now);
    }
    for sport in 20_000..20_100 {
        assert_eq!(
            forwarded_to(&mut lab, &syn(sport, "10.0.1.100")),
            STANDBY,
            "new flow {sport} after the flip"
        );
    }

    // The primary is back: new flows go to the primaries again; flows on the standby stay.
    let back = lab
        .balancer
        .set_health(POOLED, P1, Health::Up)
        .expect("P1 up");
    assert_eq!(
        (back.pool_before, back.pool_after),
        (ActivePool::Standby, ActivePool::Primary)
    );
    for (flow, &backend) in flows.iter().zip(&moved) {
        assert_eq!(
            forwarded_to(&mut lab, &ack(flow)),
            backend,
            "flow {} moved on the flip back",
            flow.sport
        );
    }
    for sport in 30_000..30_100 {
        assert_ne!(
            forwarded_to(&mut lab, &syn(sport, "10.0.1.100")),
            STANDBY,
            "new flow {sport} after the flip back"
        );
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn with_nothing_healthy_pass_hands_packets_to_the_host_and_drop_drops() {
    let mut lab = PacketLab::new(CONFIG);
    let established = syn(40_000, "10.0.1.100");
    forwarded_to(&mut lab, &established);
    for b in [P1, P2, STANDBY] {
        lab.balancer
            .set_health(POOLED, b, Health::Down)
            .expect("down");
    }
    assert_eq!(lab.balancer.vips[POOLED].active_pool, ActivePool::None);
    for spec in [syn(40_001, "10.0.1.100"), ack(&established)] {
        let frame = spec.build();
        let (verdict, out) = lab.run(&frame);
        assert_eq!(verdict, XDP_PASS, "on_all_down = pass: {spec:?}");
        assert_eq!(out, frame, "a passed frame is untouched");
    }
    let passed = lab
        .balancer
        .dataplane
        .maps
        .reason_counters(Reason::PassAllDown)
        .expect("REASONS");
    assert_eq!(passed.packets, 2);

    lab.balancer
        .set_health(DARK, 0, Health::Down)
        .expect("down");
    let (verdict, _) = lab.run(&syn(40_002, "10.0.1.101").build());
    assert_eq!(verdict, XDP_DROP, "on_all_down = drop (the default)");
    let dropped = lab
        .balancer
        .dataplane
        .maps
        .reason_counters(Reason::DropNoBackend)
        .expect("REASONS");
    assert_eq!(dropped.packets, 1);

    // One backend back: traffic flows again, to the ring's choice.
    lab.balancer
        .set_health(POOLED, STANDBY, Health::Up)
        .expect("up");
    let spec = syn(40_003, "10.0.1.100");
    let key = flow_key(spec.src, spec.sport, spec.dst, spec.dport, PROTO_TCP);
    let expected = lab.expected_backend(POOLED, &key);
    assert_eq!(expected, lab.balancer.vips[POOLED].backends[STANDBY].id);
    assert_eq!(forwarded_to(&mut lab, &spec), STANDBY);
}
