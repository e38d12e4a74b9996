//! Packet tests: the real XDP program and real maps, driven through BPF_PROG_TEST_RUN.
//! Every forwarded frame is compared byte for byte with the expected rewrite; every passed frame
//! must come back unchanged.

use std::net::IpAddr;

use lb::balancer::L2Path;
use lb_common::{PROTO_TCP, PROTO_UDP, Reason};
use lb_tests::{
    frames::{FrameSpec, L4, LB_MAC, arp_request},
    packet_lab::{PacketLab, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, backend_mac, flow_key},
};

const CONFIG: &str = r#"
interface = "lab0"
ring_size = 65537
max_vips = 8
max_backends = 64
flow_table_size = 4096

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
"#;

const WEB: usize = 0;
const DNS: usize = 1;
const WEB6: usize = 2;
const DNS6: usize = 3;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// The frame the program must emit: the input with the backend's MAC as destination and the
/// LB's as source, every other byte unchanged.
fn rewritten(frame: &[u8], backend_id: u32) -> Vec<u8> {
    let mut expected = frame.to_vec();
    expected[0..6].copy_from_slice(&backend_mac(backend_id));
    expected[6..12].copy_from_slice(&LB_MAC);
    expected
}

fn proto_of(spec: &FrameSpec) -> u8 {
    match spec.l4 {
        L4::Tcp { .. } => PROTO_TCP,
        L4::Udp => PROTO_UDP,
        L4::IcmpEcho => panic!("not a VIP protocol"),
    }
}

/// Sends `spec` and asserts it is forwarded with XDP_TX to exactly the backend the daemon's
/// Maglev table and the flow hash predict. Returns that backend id.
fn assert_forwarded(lab: &mut PacketLab, vip: usize, spec: &FrameSpec) -> u32 {
    let frame = spec.build();
    let key = flow_key(spec.src, spec.sport, spec.dst, spec.dport, proto_of(spec));
    let expected_backend = lab.expected_backend(vip, &key);
    let (verdict, out) = lab.run(&frame);
    assert_eq!(verdict, XDP_TX, "verdict for {spec:?}");
    assert_eq!(
        out,
        rewritten(&frame, expected_backend),
        "rewritten bytes for {spec:?}"
    );
    expected_backend
}

fn assert_passed_unchanged(lab: &mut PacketLab, frame: &[u8], what: &str) {
    let (verdict, out) = lab.run(frame);
    assert_eq!(
        verdict, XDP_PASS,
        "{what}: verdict (0=ABORTED 1=DROP 2=PASS 3=TX)"
    );
    assert_eq!(out, frame, "{what}: a passed frame must be untouched");
}

/// The backend a frame went to, read from its destination MAC.
/// The backend the flow's next packet (an ACK, for TCP: the connection is under way) goes to.
fn backend_of(lab: &mut PacketLab, spec: &FrameSpec) -> u32 {
    lab.backend_of(&spec.established().build())
}

fn valid_vip_frames() -> Vec<(usize, FrameSpec)> {
    let client4 = ip("192.0.2.7");
    let client6 = ip("2001:db8:ffff::7");
    let mut vlan_tcp = FrameSpec::tcp_syn(client4, 40001, ip("10.0.0.100"), 80);
    vlan_tcp.vlan = Some(42);
    let mut vlan_udp6 = FrameSpec::udp(client6, 40002, ip("2001:db8::100"), 53, b"query");
    vlan_udp6.vlan = Some(4094);
    let mut with_options = FrameSpec::tcp_syn(client4, 40003, ip("10.0.0.100"), 80);
    with_options.ipv4_options = vec![0x01, 0x01, 0x01, 0x00]; // NOP NOP NOP EOL
    let mut with_payload = FrameSpec::tcp_syn(client4, 40004, ip("10.0.0.100"), 80);
    with_payload.l4 = L4::Tcp { flags: 0x18 }; // PSH|ACK
    with_payload.payload = b"GET / HTTP/1.0\r\n\r\n".to_vec();
    vec![
        (
            WEB,
            FrameSpec::tcp_syn(client4, 40000, ip("10.0.0.100"), 80),
        ),
        (
            DNS,
            FrameSpec::udp(client4, 40000, ip("10.0.0.100"), 53, b"query"),
        ),
        (
            WEB6,
            FrameSpec::tcp_syn(client6, 40000, ip("2001:db8::100"), 443),
        ),
        (
            DNS6,
            FrameSpec::udp(client6, 40000, ip("2001:db8::100"), 53, b"query"),
        ),
        (WEB, vlan_tcp),
        (DNS6, vlan_udp6),
        (WEB, with_options),
        (WEB, with_payload),
    ]
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn vip_frames_are_sent_to_the_predicted_backend_with_only_the_macs_rewritten() {
    let mut lab = PacketLab::new(CONFIG);
    for (vip, spec) in valid_vip_frames() {
        assert_forwarded(&mut lab, vip, &spec);
    }
    let tx = lab
        .balancer
        .reason_counters(Reason::Tx)
        .expect("tx counters");
    assert_eq!(
        tx.packets,
        valid_vip_frames().len() as u64,
        "Tx reason counter"
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn new_flows_spread_over_all_backends_and_counters_match() {
    let mut lab = PacketLab::new(CONFIG);
    let mut per_backend = [0u64; 3];
    let mut bytes = [0u64; 3];
    for sport in 1000..1600 {
        let spec = FrameSpec::tcp_syn(ip("192.0.2.9"), sport, ip("10.0.0.100"), 80);
        let id = assert_forwarded(&mut lab, WEB, &spec);
        per_backend[id as usize] += 1;
        bytes[id as usize] += spec.build().len() as u64;
    }
    for (id, &n) in per_backend.iter().enumerate() {
        assert!(
            n > 120,
            "backend {id} got {n} of 600 new flows: {per_backend:?}"
        );
        let c = lab
            .balancer
            .dataplane
            .maps
            .backend_counters(id as u32)
            .expect("BACKEND_STATS");
        assert_eq!(
            (c.packets, c.bytes, c.new_flows),
            (n, bytes[id], n),
            "backend {id} counters"
        );
    }
    let vip = lab
        .balancer
        .vip_counters(&lab.balancer.vips[0])
        .expect("VIP totals");
    assert_eq!(vip.packets, 600);
    assert_eq!(vip.new_flows, 600);
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn traffic_that_is_not_for_a_vip_passes_unchanged() {
    let mut lab = PacketLab::new(CONFIG);
    let client = ip("192.0.2.7");
    let cases = [
        (
            "TCP to a non-VIP address",
            FrameSpec::tcp_syn(client, 4000, ip("10.0.0.2"), 22).build(),
        ),
        (
            "TCP to the VIP on another port",
            FrameSpec::tcp_syn(client, 4000, ip("10.0.0.100"), 81).build(),
        ),
        (
            "UDP to the TCP VIP's port",
            FrameSpec::udp(client, 4000, ip("10.0.0.100"), 80, b"x").build(),
        ),
        (
            "TCP to the UDP VIP's port",
            FrameSpec::tcp_syn(client, 4000, ip("10.0.0.100"), 53).build(),
        ),
        (
            "ICMP echo to the host",
            FrameSpec {
                l4: L4::IcmpEcho,
                ..FrameSpec::tcp_syn(client, 0, ip("10.0.0.2"), 0)
            }
            .build(),
        ),
        (
            "ICMP echo to the VIP address",
            FrameSpec {
                l4: L4::IcmpEcho,
                ..FrameSpec::tcp_syn(client, 0, ip("10.0.0.100"), 0)
            }
            .build(),
        ),
        (
            "ICMPv6 echo to the VIP address",
            FrameSpec {
                l4: L4::IcmpEcho,
                ..FrameSpec::tcp_syn(ip("2001:db8::7"), 0, ip("2001:db8::100"), 0)
            }
            .build(),
        ),
        (
            "ARP request for the host",
            arp_request([192, 0, 2, 7], [10, 0, 0, 2]),
        ),
        (
            "ARP request for the VIP",
            arp_request([192, 0, 2, 7], [10, 0, 0, 100]),
        ),
    ];
    for (what, frame) in cases {
        assert_passed_unchanged(&mut lab, &frame, what);
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn fragments_extension_headers_and_bad_headers_pass_unchanged() {
    let mut lab = PacketLab::new(CONFIG);
    let client = ip("192.0.2.7");
    let syn = FrameSpec::tcp_syn(client, 4000, ip("10.0.0.100"), 80).build();

    let mut more_fragments = syn.clone();
    more_fragments[20] = 0x20; // MF, offset 0
    assert_passed_unchanged(&mut lab, &more_fragments, "first IPv4 fragment (MF)");
    let mut later_fragment = syn.clone();
    later_fragment[20] = 0x00;
    later_fragment[21] = 0x10; // offset 16 * 8 bytes
    assert_passed_unchanged(&mut lab, &later_fragment, "later IPv4 fragment");

    let mut bad_version = syn.clone();
    bad_version[14] = 0x55;
    assert_passed_unchanged(&mut lab, &bad_version, "IP version 5");
    let mut short_ihl = syn.clone();
    short_ihl[14] = 0x44;
    assert_passed_unchanged(&mut lab, &short_ihl, "IHL 4 (16-byte header)");
    let mut huge_total_len = syn.clone();
    huge_total_len[16..18].copy_from_slice(&1500u16.to_be_bytes());
    assert_passed_unchanged(
        &mut lab,
        &huge_total_len,
        "IPv4 total length beyond the frame",
    );
    let mut tcp_offset_short = syn.clone();
    tcp_offset_short[14 + 20 + 12] = 0x40;
    assert_passed_unchanged(&mut lab, &tcp_offset_short, "TCP data offset 4");

    let mut hop_by_hop =
        FrameSpec::tcp_syn(ip("2001:db8::7"), 4000, ip("2001:db8::100"), 443).build();
    hop_by_hop[14 + 6] = 0; // next header: hop-by-hop options
    assert_passed_unchanged(&mut lab, &hop_by_hop, "IPv6 with an extension header");
    let mut v6_fragment =
        FrameSpec::udp(ip("2001:db8::7"), 4000, ip("2001:db8::100"), 53, b"q").build();
    v6_fragment[14 + 6] = 44;
    assert_passed_unchanged(&mut lab, &v6_fragment, "IPv6 fragment header");

    let mut double_tag = FrameSpec::tcp_syn(client, 4000, ip("10.0.0.100"), 80);
    double_tag.vlan = Some(7);
    let mut qinq = double_tag.build();
    qinq.splice(16..16, [0x81, 0x00, 0x00, 0x08]);
    assert_passed_unchanged(&mut lab, &qinq, "two 802.1Q tags");

    let counters = lab
        .balancer
        .dataplane
        .maps
        .reason_counters(Reason::PassFragment)
        .expect("REASONS");
    assert_eq!(
        counters.packets, 4,
        "fragments and extension headers counted as pass_fragment"
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn every_truncation_of_a_vip_frame_passes_unchanged() {
    let mut lab = PacketLab::new(CONFIG);
    for (_, spec) in valid_vip_frames() {
        let frame = spec.build();
        for len in 0..frame.len() {
            let truncated = &frame[..len];
            if len < 14 {
                // The kernel refuses test runs shorter than an Ethernet header (ETH_HLEN); no
                // driver hands XDP such a frame either.
                let mut out = vec![0u8; 64];
                let refused = aya::TestRun::test_run(
                    lab.balancer.dataplane.program(),
                    aya::TestRunOptions {
                        data_in: Some(truncated),
                        data_out: Some(&mut out),
                        ..aya::TestRunOptions::new()
                    },
                );
                assert!(refused.is_err(), "kernel accepted a {len}-byte test frame");
                continue;
            }
            assert_passed_unchanged(
                &mut lab,
                truncated,
                &format!("{spec:?} truncated to {len} bytes"),
            );
        }
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_flow_keeps_its_backend_when_the_ring_changes() {
    let mut lab = PacketLab::new(CONFIG);
    let flows: Vec<FrameSpec> = (2000..2300)
        .map(|sport| FrameSpec::tcp_syn(ip("192.0.2.10"), sport, ip("10.0.0.100"), 80))
        .collect();
    let first: Vec<u32> = flows
        .iter()
        .map(|f| assert_forwarded(&mut lab, WEB, f))
        .collect();

    // Reweight: the new table sends many of these flows elsewhere if they were new.
    lab.balancer.set_weight(WEB, 2, 1000).expect("reweight");
    let moved_if_new = flows
        .iter()
        .zip(&first)
        .filter(|(f, b)| {
            let key = flow_key(f.src, f.sport, f.dst, f.dport, PROTO_TCP);
            lab.expected_backend(WEB, &key) != **b
        })
        .count();
    assert!(
        moved_if_new > 50,
        "the new ring must remap many of the flows, remapped {moved_if_new}"
    );

    for (flow, &backend) in flows.iter().zip(&first) {
        let mut next = flow.clone();
        next.l4 = L4::Tcp { flags: 0x10 }; // ACK
        assert_eq!(
            backend_of(&mut lab, &next),
            backend,
            "established flow {} moved",
            flow.sport
        );
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_flow_whose_backend_goes_down_moves_and_stays_moved() {
    let mut lab = PacketLab::new(CONFIG);
    let flows: Vec<FrameSpec> = (3000..3200)
        .map(|sport| FrameSpec::tcp_syn(ip("192.0.2.11"), sport, ip("10.0.0.100"), 80))
        .collect();
    let first: Vec<u32> = flows
        .iter()
        .map(|f| assert_forwarded(&mut lab, WEB, f))
        .collect();
    let down = lab.balancer.vips[WEB].backends[1].id;
    assert!(
        first.contains(&down),
        "some flow must use the backend we take down"
    );

    lab.balancer.set_up(WEB, 1, false).expect("mark down");
    let mut after_down = Vec::new();
    for (flow, &before) in flows.iter().zip(&first) {
        let key = flow_key(flow.src, flow.sport, flow.dst, flow.dport, PROTO_TCP);
        let got = backend_of(&mut lab, flow);
        assert_ne!(
            got, down,
            "flow {} still sent to the down backend",
            flow.sport
        );
        if before == down {
            assert_eq!(
                got,
                lab.expected_backend(WEB, &key),
                "moved flow {} re-chosen from the ring",
                flow.sport
            );
        } else {
            assert_eq!(
                got, before,
                "flow {} on a healthy backend moved",
                flow.sport
            );
        }
        after_down.push(got);
    }

    // The backend comes back: re-chosen flows stay where they went.
    lab.balancer.set_up(WEB, 1, true).expect("mark up");
    for (flow, &backend) in flows.iter().zip(&after_down) {
        assert_eq!(
            backend_of(&mut lab, flow),
            backend,
            "flow {} moved again",
            flow.sport
        );
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn weight_zero_drains_existing_flows_stay_new_ones_go_elsewhere() {
    let mut lab = PacketLab::new(CONFIG);
    let flows: Vec<FrameSpec> = (5000..5200)
        .map(|sport| FrameSpec::tcp_syn(ip("192.0.2.12"), sport, ip("10.0.0.100"), 80))
        .collect();
    let first: Vec<u32> = flows
        .iter()
        .map(|f| assert_forwarded(&mut lab, WEB, f))
        .collect();
    let drained = lab.balancer.vips[WEB].backends[0].id;
    lab.balancer.set_weight(WEB, 0, 0).expect("drain");
    for (flow, &backend) in flows.iter().zip(&first) {
        assert_eq!(
            backend_of(&mut lab, flow),
            backend,
            "existing flow {} moved on drain",
            flow.sport
        );
    }
    for sport in 6000..6300 {
        let spec = FrameSpec::tcp_syn(ip("192.0.2.12"), sport, ip("10.0.0.100"), 80);
        assert_ne!(
            assert_forwarded(&mut lab, WEB, &spec),
            drained,
            "new flow {sport} sent to a drained backend"
        );
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_vip_without_backends_drops_and_counts() {
    let mut lab = PacketLab::new(CONFIG);
    let frame = FrameSpec::tcp_syn(ip("192.0.2.7"), 4000, ip("10.0.0.200"), 80).build();
    let (verdict, _) = lab.run(&frame);
    assert_eq!(verdict, XDP_DROP);
    let c = lab
        .balancer
        .dataplane
        .maps
        .reason_counters(Reason::DropNoBackend)
        .expect("REASONS");
    assert_eq!(c.packets, 1);
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_backend_behind_another_interface_is_redirected_with_that_interfaces_mac() {
    const EGRESS_MAC: [u8; 6] = [0x02, 0xe9, 0, 0, 0, 0x01];
    let mut lab = PacketLab::new(CONFIG);
    for b in 0..3 {
        let id = lab.balancer.vips[WEB].backends[b].id;
        let path = L2Path {
            dst_mac: backend_mac(id),
            src_mac: EGRESS_MAC,
            ifindex: 1,
            redirect: true,
            tunnel: None,
        };
        lab.balancer
            .set_path(WEB, b, Some(path))
            .expect("redirect path");
    }
    let spec = FrameSpec::tcp_syn(ip("192.0.2.7"), 4321, ip("10.0.0.100"), 80);
    let frame = spec.build();
    let expected_backend = lab.expected_backend(
        WEB,
        &flow_key(spec.src, spec.sport, spec.dst, spec.dport, PROTO_TCP),
    );
    let (verdict, out) = lab.run(&frame);
    assert_eq!(verdict, XDP_REDIRECT);
    let mut expected = frame.clone();
    expected[0..6].copy_from_slice(&backend_mac(expected_backend));
    expected[6..12].copy_from_slice(&EGRESS_MAC);
    assert_eq!(out, expected, "redirected frame bytes");
    let c = lab
        .balancer
        .dataplane
        .maps
        .reason_counters(Reason::Redirect)
        .expect("REASONS");
    assert_eq!((c.packets, c.bytes), (1, frame.len() as u64));
    // Counted on the backend too; `tx`, derived from the backends, leaves it out.
    let tx = lab.balancer.reason_counters(Reason::Tx).expect("tx");
    assert_eq!((tx.packets, tx.bytes), (0, 0), "a redirect is not a tx");
    let web = lab
        .balancer
        .vip_counters(&lab.balancer.vips[WEB])
        .expect("VIP totals");
    assert_eq!((web.packets, web.new_flows), (1, 1));
}

/// Two VIPs whose keys share a `VIP_INDEX` slot: both are balanced (one from the slot, the other
/// through `VIPS`), traffic to the slot that is no VIP passes, and when the slot's holder goes
/// the other VIP takes the slot over and is still balanced.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn vips_sharing_an_index_slot_are_both_found() {
    use lb_common::{VipKey, vip_index_slot};
    let web = VipKey::v4([10, 0, 0, 100], 80, PROTO_TCP);
    let slot = vip_index_slot(&web);
    let mut sharing = (1..=u16::MAX)
        .filter(|&port| port != 80)
        .filter(|&port| vip_index_slot(&VipKey::v4([10, 0, 0, 100], port, PROTO_TCP)) == slot);
    let other = sharing
        .next()
        .expect("a TCP port of 10.0.0.100 in web's slot");
    let not_a_vip = sharing.next().expect("a second one");
    let vip = |name: &str, port: u16, backend: &str| {
        format!(
            "[[vip]]\nname = \"{name}\"\naddress = \"10.0.0.100\"\nport = {port}\nprotocol = \"tcp\"\n\
             [[vip.backend]]\naddress = \"{backend}\"\n"
        )
    };
    let head = "interface = \"lab0\"\nring_size = 1021\nmax_vips = 4\nmax_backends = 8\nflow_table_size = 1024\n";
    let both = format!(
        "{head}{}{}",
        vip("web", 80, "10.0.0.11"),
        vip("other", other, "10.0.0.21")
    );
    let mut lab = PacketLab::new(&both);
    let to = |port: u16| FrameSpec::tcp_syn(ip("192.0.2.9"), 5000, ip("10.0.0.100"), port);
    let web_id = lab.id("web", "10.0.0.11");
    let other_id = lab.id("other", "10.0.0.21");
    assert_eq!(backend_of(&mut lab, &to(80)), web_id);
    assert_eq!(backend_of(&mut lab, &to(other)), other_id);
    let frame = to(not_a_vip).build();
    assert_eq!(
        lab.run(&frame),
        (XDP_PASS, frame.clone()),
        "port {not_a_vip} is no VIP"
    );
    // web goes: `other` takes the slot over.
    lab.reload(&format!("{head}{}", vip("other", other, "10.0.0.21")));
    assert_eq!(backend_of(&mut lab, &to(other)), other_id);
    let frame = to(80).build();
    assert_eq!(lab.run(&frame), (XDP_PASS, frame.clone()), "web is gone");
    let index = lab
        .balancer
        .dataplane
        .maps
        .vip_index
        .get(&slot, 0)
        .expect("slot");
    assert_eq!(index.key, VipKey::v4([10, 0, 0, 100], other, PROTO_TCP));
    assert_eq!(
        index.state,
        lb_common::VIP_SLOT_VALID,
        "no other VIP in the slot: no overflow"
    );
}
