//! Every node picks the same backend for a flow (issue: several lb nodes). Two daemons' models
//! and maps, each with the real program (`BPF_PROG_TEST_RUN`), given the same VIP, backends,
//! weights and health but different ids, config orders and histories, must send every 5-tuple to
//! the same backend address: node A sees a connection's SYN, node B only its later packets (as
//! when an ECMP router moves the connection), and both choose alike.

use std::net::IpAddr;

use lb_tests::{
    frames::{FrameSpec, L4},
    packet_lab::PacketLab,
};

/// A header with room for the backends of every history below.
fn config(backends: &[(&str, u32)]) -> String {
    let mut text = String::from(
        "interface = \"lab0\"\nring_size = 65537\nmax_vips = 2\nmax_backends = 16\nflow_table_size = 65536\n\n\
         [[vip]]\nname = \"web\"\naddress = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\n",
    );
    for (address, weight) in backends {
        text.push_str(&format!(
            "[[vip.backend]]\naddress = \"{address}\"\nweight = {weight}\n"
        ));
    }
    text
}

const BACKENDS: [(&str, u32); 4] = [
    ("10.0.0.11", 100),
    ("10.0.0.12", 200),
    ("10.0.0.13", 100),
    ("10.0.0.14", 50),
];

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

/// The address of the backend `lab` sends `frame` to.
fn address_of(lab: &mut PacketLab, frame: &FrameSpec) -> IpAddr {
    let id = lab.backend_of(&frame.build());
    lab.balancer.vips[0]
        .backends
        .iter()
        .find(|b| b.id == id)
        .unwrap_or_else(|| panic!("backend id {id} is not web's"))
        .address
}

/// 3000 flows from many clients and ports; each `round` has clients of its own, so no flow is
/// in a node's flow table from an earlier round (a flow pinned before a ring change is the
/// business of flow-state sharing, not of identical rings).
fn flows(round: u32) -> Vec<FrameSpec> {
    (0..3000u32)
        .map(|i| {
            let client = ip(&format!("10.{round}.{}.{}", i % 7, 1 + i % 251));
            FrameSpec::tcp_syn(
                client,
                10_000 + (i * 13 % 50_000) as u16,
                ip("10.0.0.100"),
                80,
            )
        })
        .collect()
}

fn ack(flow: &FrameSpec) -> FrameSpec {
    let mut next = flow.clone();
    next.l4 = L4::Tcp { flags: 0x10 };
    next
}

/// Node A opens every flow with its SYN; node B sees only the flow's next packet. Both must pick
/// the same backend address for every flow, and report the same ring digest.
#[track_caller]
fn assert_same_choices(a: &mut PacketLab, b: &mut PacketLab, round: u32, what: &str) {
    assert_eq!(
        a.balancer.live_ring_digest(0).unwrap(),
        b.balancer.live_ring_digest(0).unwrap(),
        "{what}: ring digests differ"
    );
    let mut per_backend = std::collections::BTreeMap::<IpAddr, usize>::new();
    for flow in flows(round) {
        let on_a = address_of(a, &flow);
        let on_b = address_of(b, &ack(&flow));
        assert_eq!(
            on_a, on_b,
            "{what}: flow {}:{} went to {on_a} on node A but {on_b} on node B",
            flow.src, flow.sport
        );
        *per_backend.entry(on_a).or_default() += 1;
    }
    // Not a degenerate ring: every backend that is up took flows.
    let up = a.balancer.vips[0]
        .backends
        .iter()
        .filter(|b| b.reachable() && b.effective_weight() > 0)
        .count();
    assert_eq!(per_backend.len(), up, "{what}: spread {per_backend:?}");
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn nodes_with_other_ids_orders_and_histories_choose_the_same_backend() {
    let mut plain = PacketLab::new(&config(&BACKENDS));

    // Another config order.
    let mut reversed: Vec<_> = BACKENDS.to_vec();
    reversed.reverse();
    let mut reordered = PacketLab::new(&config(&reversed));
    assert_ne!(
        plain.balancer.backend_id("web", ip("10.0.0.11")),
        reordered.balancer.backend_id("web", ip("10.0.0.11")),
        "the orders should give other ids, or the test proves nothing"
    );
    assert_same_choices(&mut plain, &mut reordered, 1, "reversed config order");

    // A history: two backends that came and went (ids taken, then freed) before these four
    // were added in yet another order.
    let mut history = PacketLab::new(&config(&[("10.0.0.9", 100), ("10.0.0.8", 100)]));
    let mut shuffled = vec![
        BACKENDS[2],
        ("10.0.0.9", 100),
        BACKENDS[0],
        BACKENDS[3],
        BACKENDS[1],
    ];
    history.reload(&config(&shuffled));
    shuffled.retain(|(a, _)| *a != "10.0.0.9");
    history.reload(&config(&shuffled));
    assert_same_choices(&mut plain, &mut history, 2, "backends added and removed");

    // A restarted daemon that adopted the maps of the last one.
    let (mut restarted, adopted, _) = history.restart(&config(&shuffled));
    assert_eq!(adopted.backends, 4, "the restart adopted every backend");
    assert_same_choices(&mut plain, &mut restarted, 3, "restarted and adopted");

    // The same health change on both nodes keeps them alike (a backend down, the pool shrinks).
    for lab in [&mut plain, &mut restarted] {
        let (v, b) = lab
            .balancer
            .locate(lab.balancer.backend_id("web", ip("10.0.0.12")).unwrap())
            .unwrap();
        lab.balancer.set_up(v, b, false).unwrap();
    }
    assert_same_choices(&mut plain, &mut restarted, 4, "one backend down on both");
}
