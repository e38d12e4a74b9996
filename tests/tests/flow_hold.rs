//! The flow hold of a node in a group, at the packet level: a backend that the node's checks
//! take down leaves the ring at once (no new flow goes to it) but keeps its established flows
//! until the hold ends, so a node whose view is wrong hands the VIP over before it resets a
//! connection; then the flows are re-chosen. Without a hold (a node on its own) they move at once.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use lb::health::Health;
use lb_tests::{
    frames::{FrameSpec, L4},
    packet_lab::PacketLab,
};

const CONFIG: &str = r#"
interface = "lab0"
ring_size = 65537
max_vips = 2
max_backends = 8
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
"#;

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

fn ack(flow: &FrameSpec) -> FrameSpec {
    let mut next = flow.clone();
    next.l4 = L4::Tcp { flags: 0x10 };
    next
}

/// 300 new flows; returns them with their backends.
fn open_flows(lab: &mut PacketLab, client: &str) -> Vec<(FrameSpec, u32)> {
    (0..300u16)
        .map(|i| {
            let flow = FrameSpec::tcp_syn(ip(client), 20_000 + i, ip("10.0.0.100"), 80);
            let backend = lab.backend_of(&flow.build());
            (flow, backend)
        })
        .collect()
}

/// Takes `.12` down the way the daemon does on a failed check (mark, then publish).
fn take_down(lab: &mut PacketLab) -> (u32, Option<Instant>) {
    let id = lab.balancer.backend_id("web", ip("10.0.0.12")).unwrap();
    let (v, b) = lab.balancer.locate(id).unwrap();
    let held = lab.balancer.mark_health(v, b, Health::Down).unwrap();
    lab.balancer.publish(v).unwrap();
    (id, held)
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_downed_backend_keeps_its_flows_for_the_hold_then_they_move() {
    let mut lab = PacketLab::new(CONFIG);
    lab.balancer.flow_hold = Duration::from_secs(2);
    let flows = open_flows(&mut lab, "198.51.100.1");
    let (down, held) = take_down(&mut lab);
    let until = held.expect("a backend that goes from up to down is held");
    let on_down = flows.iter().filter(|(_, b)| *b == down).count();
    assert!(
        on_down > 50,
        "only {on_down} flows on the backend taken down"
    );

    // During the hold: every established flow stays where it was, the downed backend's too...
    for (flow, backend) in &flows {
        assert_eq!(
            lab.backend_of(&ack(flow).build()),
            *backend,
            "flow {} moved during the hold",
            flow.sport
        );
    }
    // ... but no new flow goes to it.
    for (_, backend) in open_flows(&mut lab, "198.51.100.2") {
        assert_ne!(backend, down, "a new flow went to a backend that is down");
    }
    assert!(lab.balancer.holds_flows());
    assert_eq!(
        lab.balancer
            .end_flow_holds(until - Duration::from_millis(1))
            .unwrap(),
        []
    );

    // The hold ends: the downed backend's flows are re-chosen (and stay re-chosen), the others
    // stay.
    let released = lab.balancer.end_flow_holds(until).unwrap();
    assert_eq!(released.len(), 1);
    assert!(!lab.balancer.holds_flows());
    for (flow, backend) in &flows {
        let now = lab.backend_of(&ack(flow).build());
        if *backend == down {
            assert_ne!(
                now, down,
                "flow {} is still on the downed backend",
                flow.sport
            );
            assert_eq!(lab.backend_of(&ack(flow).build()), now, "re-chosen twice");
        } else {
            assert_eq!(now, *backend, "flow {} of a live backend moved", flow.sport);
        }
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_backend_back_up_within_the_hold_kept_its_flows_and_without_a_hold_they_move_at_once() {
    let mut lab = PacketLab::new(CONFIG);
    lab.balancer.flow_hold = Duration::from_secs(2);
    let flows = open_flows(&mut lab, "198.51.100.1");
    let (down, _) = take_down(&mut lab);
    let (v, b) = lab.balancer.locate(down).unwrap();
    lab.balancer.set_health(v, b, Health::Up).unwrap();
    assert!(!lab.balancer.holds_flows(), "coming back up ends the hold");
    for (flow, backend) in &flows {
        assert_eq!(
            lab.backend_of(&ack(flow).build()),
            *backend,
            "flow {}",
            flow.sport
        );
    }

    // A node on its own (no hold): the flows of a downed backend move on their next packet.
    lab.balancer.flow_hold = Duration::ZERO;
    let (down, held) = take_down(&mut lab);
    assert_eq!(held, None);
    let mut moved = 0;
    for (flow, backend) in flows.iter().filter(|(_, b)| *b == down) {
        assert_ne!(lab.backend_of(&ack(flow).build()), *backend);
        moved += 1;
    }
    assert!(moved > 50, "{moved}");
}
