//! Encapsulating VIPs (`forward = "ipip"` / `"gue"`): the real XDP program through
//! BPF_PROG_TEST_RUN, every output compared byte for byte with a frame built independently
//! (etherparse, `lb_tests::tunnel`): outer headers, checksums, the GUE source port from the
//! documented hash, the IPv6 flow label, and the ICMP "too big" answers.

use std::net::IpAddr;

use etherparse::{
    Icmpv4Header, Icmpv4Type, Icmpv6Header, Icmpv6Type, IpNumber, Ipv4Header, Ipv6FlowLabel,
    Ipv6Header, icmpv4::DestUnreachableHeader,
};
use lb_common::decap::DecapReason;
use lb_common::{
    PROTO_TCP, PROTO_UDP, Reason, TOO_BIG_PER_CPU_PER_SEC, TOO_BIG_QUOTE, encap_flow_label,
    flow_hash, gue_source_port,
};
use lb_tests::{
    decap_lab::DecapLab,
    frames::{FrameSpec, LB_MAC},
    packet_lab::{
        LAB_MTU, LAB_TUNNEL_SOURCE_V4, LAB_TUNNEL_SOURCE_V6, PacketLab, XDP_DROP, XDP_PASS, XDP_TX,
        backend_mac, flow_key,
    },
    tunnel::{Tunnel, encapsulate, ethernet},
};

const GUE_PORT: u16 = 7000;

/// Six VIPs, one per mode and family pair: inner IPv4 to IPv4 backends, inner IPv6 to IPv6
/// backends and inner IPv4 to IPv6 backends, for ipip and gue; and a UDP gue VIP.
const CONFIG: &str = r#"
interface = "lab0"
ring_size = 4099
max_vips = 8
max_backends = 32
flow_table_size = 4096

[[vip]]
name = "ipip44"
address = "10.0.0.100"
port = 80
protocol = "tcp"
forward = "ipip"
[[vip.backend]]
address = "172.16.1.11"
[[vip.backend]]
address = "172.16.2.12"

[[vip]]
name = "ipip66"
address = "2001:db8:100::1"
port = 80
protocol = "tcp"
forward = "ipip"
[[vip.backend]]
address = "2001:db8:1::11"
[[vip.backend]]
address = "2001:db8:2::12"

[[vip]]
name = "ipip46"
address = "10.0.0.101"
port = 80
protocol = "tcp"
forward = "ipip"
[[vip.backend]]
address = "2001:db8:1::21"

[[vip]]
name = "gue44"
address = "10.0.0.100"
port = 443
protocol = "tcp"
forward = "gue"
gue_port = 7000
[[vip.backend]]
address = "172.16.1.31"
[[vip.backend]]
address = "172.16.2.32"

[[vip]]
name = "gue66"
address = "2001:db8:100::1"
port = 443
protocol = "tcp"
forward = "gue"
gue_port = 7000
[[vip.backend]]
address = "2001:db8:1::41"

[[vip]]
name = "gue46"
address = "10.0.0.101"
port = 443
protocol = "tcp"
forward = "gue"
gue_port = 7000
[[vip.backend]]
address = "2001:db8:1::51"

[[vip]]
name = "gue-dns"
address = "10.0.0.100"
port = 53
protocol = "udp"
forward = "gue"
gue_port = 7000
[[vip.backend]]
address = "172.16.1.61"
"#;

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

/// The lab's tunnel source for a backend of this family.
fn source_for(backend: IpAddr) -> IpAddr {
    match backend {
        IpAddr::V4(_) => LAB_TUNNEL_SOURCE_V4.into(),
        IpAddr::V6(_) => LAB_TUNNEL_SOURCE_V6.into(),
    }
}

/// Sets the inner IPv4 TOS / IPv6 traffic class and TTL / hop limit of an untagged frame
/// (fixing the IPv4 header checksum), so the tests see them copied to the outer header.
fn with_tos_ttl(mut frame: Vec<u8>, tos: u8, ttl: u8) -> Vec<u8> {
    match frame[14] >> 4 {
        4 => {
            frame[15] = tos;
            frame[22] = ttl;
            frame[24..26].fill(0);
            let sum = lb_tests::frames::checksum(&[&frame[14..34]]);
            frame[24..26].copy_from_slice(&sum.to_be_bytes());
        }
        _ => {
            frame[14] = 0x60 | (tos >> 4);
            frame[15] = (frame[15] & 0x0f) | (tos << 4);
            frame[21] = ttl;
        }
    }
    frame
}

/// What the program must send for `frame` (an untagged frame to the VIP) encapsulated to
/// `backend`: the next hop's MAC (the lab's `backend_mac(id)`), the lab's source address, the
/// inner TTL and TOS, the flow label and GUE source port from the flow hash.
fn expected(frame: &[u8], spec: &FrameSpec, backend: IpAddr, id: u32, gue: bool) -> Vec<u8> {
    let proto = if matches!(spec.l4, lb_tests::frames::L4::Udp) {
        PROTO_UDP
    } else {
        PROTO_TCP
    };
    let hash = flow_hash(&flow_key(spec.src, spec.sport, spec.dst, spec.dport, proto));
    let inner = &frame[14..];
    let (tos, ttl) = match inner[0] >> 4 {
        4 => (inner[1], inner[8]),
        _ => ((inner[0] << 4) | (inner[1] >> 4), inner[7]),
    };
    let tunnel = if gue {
        Tunnel::Gue {
            port: GUE_PORT,
            source_port: gue_source_port(hash),
        }
    } else {
        Tunnel::Ipip
    };
    let mut outer = encapsulate(inner, &tunnel, source_for(backend), backend, ttl, tos);
    if backend.is_ipv6() {
        let label = encap_flow_label(hash);
        outer[1] = (outer[1] & 0xf0) | (label >> 16) as u8;
        outer[2] = (label >> 8) as u8;
        outer[3] = label as u8;
    }
    ethernet(backend_mac(id), LB_MAC, &outer)
}

/// Runs `frame` for `vip` and asserts it left encapsulated, byte for byte; returns the backend
/// address it went to.
fn assert_encapsulated(lab: &mut PacketLab, vip: &str, frame: &[u8], spec: &FrameSpec) -> IpAddr {
    let vip_index = lab
        .balancer
        .vips
        .iter()
        .position(|v| v.name == vip)
        .expect("vip in the lab config");
    let gue = matches!(
        lab.balancer.vips[vip_index].forward,
        lb::config::Forward::Gue { .. }
    );
    let (verdict, out) = lab.run(frame);
    assert_eq!(verdict, XDP_TX, "{vip}: verdict (1=DROP 2=PASS 3=TX)");
    let backend = lab.balancer.vips[vip_index]
        .backends
        .iter()
        .find(|b| backend_mac(b.id) == out[0..6])
        .unwrap_or_else(|| panic!("{vip}: frame left for unknown MAC {:02x?}", &out[0..6]))
        .clone();
    let want = expected(frame, spec, backend.address, backend.id, gue);
    assert_eq!(
        out,
        want,
        "{vip}: encapsulated frame to {} (got {} bytes, want {})",
        backend.address,
        out.len(),
        want.len()
    );
    backend.address
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn every_mode_and_family_is_encapsulated_byte_for_byte() {
    let mut lab = PacketLab::new(CONFIG);
    let cases: [(&str, &str, u16); 7] = [
        ("ipip44", "10.0.0.100", 80),
        ("ipip66", "2001:db8:100::1", 80),
        ("ipip46", "10.0.0.101", 80),
        ("gue44", "10.0.0.100", 443),
        ("gue66", "2001:db8:100::1", 443),
        ("gue46", "10.0.0.101", 443),
        ("gue-dns", "10.0.0.100", 53),
    ];
    for (vip, address, port) in cases {
        let vip_ip = ip(address);
        let client = if vip_ip.is_ipv4() {
            ip("198.51.100.7")
        } else {
            ip("2001:db8:c::7")
        };
        let mut seen = std::collections::BTreeSet::new();
        // Enough flows that every backend of the VIP is reached, with TOS/TTL that must be
        // copied (DSCP 46 with ECT(0), TTL 57) and the plain defaults.
        for sport in 40000..40032u16 {
            let spec = if port == 53 {
                FrameSpec::udp(client, sport, vip_ip, port, b"query")
            } else {
                FrameSpec::tcp_syn(client, sport, vip_ip, port)
            };
            let frame = if sport % 2 == 0 {
                with_tos_ttl(spec.build(), 0xba, 57)
            } else {
                spec.build()
            };
            seen.insert(assert_encapsulated(&mut lab, vip, &frame, &spec));
            let next = spec.established();
            let frame = next.build();
            assert_encapsulated(&mut lab, vip, &frame, &next);
        }
        let backends = lab
            .balancer
            .vips
            .iter()
            .find(|v| v.name == vip)
            .expect("vip")
            .backends
            .len();
        assert_eq!(seen.len(), backends, "{vip}: flows reached {seen:?}");
    }
    let tx = lab.reason_packets(Reason::Tx);
    assert_eq!(tx, 7 * 32 * 2, "every encapsulated frame counted as tx");
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn ethernet_padding_is_not_carried_and_a_vlan_tag_is_kept() {
    let mut lab = PacketLab::new(CONFIG);
    // A 54-byte SYN padded to the 60-byte Ethernet minimum: the outer lengths are the
    // datagram's; the padding stays behind the new packet, outside every length.
    let spec = FrameSpec::tcp_syn(ip("198.51.100.9"), 40001, ip("10.0.0.100"), 80);
    let frame = spec.build();
    assert_eq!(frame.len(), 54);
    let mut padded = frame.clone();
    padded.resize(60, 0);
    let (verdict, out) = lab.run(&padded);
    assert_eq!(verdict, XDP_TX);
    let backend = lab.balancer.vips[0]
        .backends
        .iter()
        .find(|b| backend_mac(b.id) == out[0..6])
        .expect("a backend of ipip44")
        .clone();
    let mut want = expected(&frame, &spec, backend.address, backend.id, false);
    want.extend_from_slice(&[0; 6]);
    assert_eq!(out, want, "padded frame");

    // Tagged: the same, with the 802.1Q tag in front of the outer ethertype.
    let mut tagged_spec = spec.clone();
    tagged_spec.vlan = Some(42);
    let (verdict, out) = lab.run(&tagged_spec.build());
    assert_eq!(verdict, XDP_TX);
    let mut want_tagged = want[..12].to_vec();
    want_tagged.extend_from_slice(&[0x81, 0x00, 0x00, 42]);
    want_tagged.extend_from_slice(&want[12..want.len() - 6]);
    assert_eq!(out, want_tagged, "tagged frame");
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn truncated_frames_to_an_encapsulating_vip_pass_untouched() {
    let mut lab = PacketLab::new(CONFIG);
    for (vip, port) in [("10.0.0.100", 80u16), ("2001:db8:100::1", 443)] {
        let client = if ip(vip).is_ipv4() {
            ip("198.51.100.7")
        } else {
            ip("2001:db8:c::7")
        };
        let frame = FrameSpec::tcp_syn(client, 40000, ip(vip), port).build();
        // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header.
        for len in 14..frame.len() {
            let cut = &frame[..len];
            let (verdict, out) = lab.run(cut);
            assert_eq!(verdict, XDP_PASS, "{vip}: {len}-byte truncation");
            assert_eq!(out, cut, "{vip}: {len}-byte truncation must be untouched");
        }
    }
}

/// A TCP segment to `vip:port` whose IP datagram is `ip_len` bytes long.
fn big_segment(client: IpAddr, vip: IpAddr, port: u16, ip_len: usize, df: bool) -> Vec<u8> {
    let header = if vip.is_ipv4() { 20 + 20 } else { 40 + 20 };
    let mut spec = FrameSpec::tcp_ack(client, 40100, vip, port);
    spec.payload = (0..ip_len - header).map(|i| i as u8).collect();
    let mut frame = spec.build();
    if vip.is_ipv4() && !df {
        frame[20] &= !0x40;
        frame[24..26].fill(0);
        let sum = lb_tests::frames::checksum(&[&frame[14..34]]);
        frame[24..26].copy_from_slice(&sum.to_be_bytes());
    }
    frame
}

/// The ICMP answer a router would send for `frame` (untagged), to the client's MAC from the
/// MAC the frame was sent to, quoting `TOO_BIG_QUOTE` bytes of its IP packet.
fn expected_too_big(frame: &[u8], room: u16) -> Vec<u8> {
    let inner = &frame[14..];
    let quote = &inner[..TOO_BIG_QUOTE];
    let mut out = Vec::new();
    out.extend_from_slice(&frame[6..12]);
    out.extend_from_slice(&frame[0..6]);
    if inner[0] >> 4 == 4 {
        out.extend_from_slice(&[0x08, 0x00]);
        let icmp = Icmpv4Header::with_checksum(
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                next_hop_mtu: room,
            }),
            quote,
        );
        let mut ip = Ipv4Header::new(
            (icmp.header_len() + quote.len()) as u16,
            64,
            IpNumber::ICMP,
            inner[16..20].try_into().expect("vip"),
            inner[12..16].try_into().expect("client"),
        )
        .expect("header");
        ip.dscp = etherparse::IpDscp::try_new(0xc0 >> 2).expect("dscp");
        ip.dont_fragment = false;
        ip.identification = 0;
        ip.header_checksum = ip.calc_header_checksum();
        out.extend_from_slice(&ip.to_bytes());
        out.extend_from_slice(&icmp.to_bytes());
    } else {
        out.extend_from_slice(&[0x86, 0xdd]);
        let src: [u8; 16] = inner[24..40].try_into().expect("vip");
        let dst: [u8; 16] = inner[8..24].try_into().expect("client");
        let icmp = Icmpv6Header::with_checksum(
            Icmpv6Type::PacketTooBig { mtu: room.into() },
            src,
            dst,
            quote,
        )
        .expect("checksum");
        let ip = Ipv6Header {
            traffic_class: 0,
            flow_label: Ipv6FlowLabel::ZERO,
            payload_length: (icmp.header_len() + quote.len()) as u16,
            next_header: IpNumber::IPV6_ICMP,
            hop_limit: 64,
            source: src,
            destination: dst,
        };
        out.extend_from_slice(&ip.to_bytes());
        out.extend_from_slice(&icmp.to_bytes());
    }
    out.extend_from_slice(quote);
    out
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_packet_too_big_once_encapsulated_gets_the_icmp_answer_a_router_sends() {
    let mut lab = PacketLab::new(CONFIG);
    let mtu = usize::from(LAB_MTU);
    // (vip, port, client, outer overhead)
    let cases = [
        ("10.0.0.100", 80u16, "198.51.100.7", 20usize),
        ("10.0.0.100", 443, "198.51.100.7", 28),
        ("2001:db8:100::1", 80, "2001:db8:c::7", 40),
        ("2001:db8:100::1", 443, "2001:db8:c::7", 48),
        ("10.0.0.101", 80, "198.51.100.7", 40),
        ("10.0.0.101", 443, "198.51.100.7", 48),
    ];
    for (vip, port, client, overhead) in cases {
        let room = mtu - overhead;
        // The largest datagram that fits is encapsulated...
        let fits = big_segment(ip(client), ip(vip), port, room, true);
        let (verdict, out) = lab.run(&fits);
        assert_eq!(verdict, XDP_TX, "{vip}:{port}: {room} bytes fit");
        assert_eq!(
            out.len(),
            fits.len() + overhead,
            "{vip}:{port}: encapsulated"
        );
        // ... one byte more is answered.
        let big = big_segment(ip(client), ip(vip), port, room + 1, true);
        let (verdict, out) = lab.run(&big);
        assert_eq!(
            verdict, XDP_TX,
            "{vip}:{port}: too big is answered (XDP_TX)"
        );
        assert_eq!(
            out,
            expected_too_big(&big, room as u16),
            "{vip}:{port}: ICMP too-big answer"
        );
    }
    let answered = lab.reason_packets(Reason::IcmpTooBig);
    assert_eq!(answered, cases.len() as u64);

    // IPv4 without DF would be fragmented by a router; we cannot, so it is dropped.
    let no_df = big_segment(ip("198.51.100.7"), ip("10.0.0.100"), 80, 1481, false);
    assert_eq!(lab.run(&no_df).0, XDP_DROP, "IPv4 without DF");
    let dropped = lab.reason_packets(Reason::DropTooBig);
    assert_eq!(dropped, 1);
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn too_big_answers_are_rate_limited_per_cpu() {
    // Pin to one CPU: the budget is per CPU.
    let mut cpus = nix::sched::CpuSet::new();
    cpus.set(0).expect("cpu 0");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus).expect("pin to cpu 0");
    let mut lab = PacketLab::new(CONFIG);
    let big = big_segment(ip("198.51.100.7"), ip("10.0.0.100"), 80, 1481, true);
    let started = std::time::Instant::now();
    let mut answered = 0;
    for _ in 0..TOO_BIG_PER_CPU_PER_SEC + 50 {
        if lab.run(&big).0 == XDP_TX {
            answered += 1;
        }
    }
    // The window is one second from the first answer; this loop takes a few milliseconds.
    if started.elapsed() < std::time::Duration::from_millis(900) {
        assert_eq!(
            answered, TOO_BIG_PER_CPU_PER_SEC,
            "answers within one second"
        );
        let dropped = lab.reason_packets(Reason::DropTooBig);
        assert_eq!(dropped, 50);
    } else {
        panic!(
            "{} test runs took {:?}: too slow to check a one-second budget",
            TOO_BIG_PER_CPU_PER_SEC + 50,
            started.elapsed()
        );
    }
}

#[test]
fn ipv6_vip_with_ipv4_backends_is_refused_for_encapsulation() {
    let text = r#"
interface = "lab0"
[[vip]]
name = "v6"
address = "2001:db8:100::1"
port = 80
protocol = "tcp"
forward = "gue"
[[vip.backend]]
address = "172.16.1.11"
"#;
    let error = lb::config::Config::parse(text, std::path::Path::new("lb.toml"))
        .expect_err("an IPv6 VIP cannot be carried in IPv4");
    assert_eq!(
        error.to_string(),
        "lb.toml:10:11: backend 172.16.1.11 of vip `v6` is IPv4, but an IPv6 VIP is encapsulated \
         in IPv6 only (forward = \"gue\"): give its backends IPv6 addresses"
    );
}

/// Interop: what the balancer sends, fed to `lb_decap`, gives back the client's IP packet byte
/// for byte (every mode and family).
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn the_balancers_tunnels_are_undone_by_lb_decap() {
    let mut lab = PacketLab::new(CONFIG);
    let mut decap = DecapLab::new(
        &[ip("10.0.0.100"), ip("10.0.0.101"), ip("2001:db8:100::1")],
        7000,
    );
    let cases = [
        FrameSpec::tcp_syn(ip("198.51.100.7"), 40001, ip("10.0.0.100"), 80),
        FrameSpec::tcp_syn(ip("2001:db8:c::7"), 40002, ip("2001:db8:100::1"), 80),
        FrameSpec::tcp_syn(ip("198.51.100.7"), 40003, ip("10.0.0.101"), 80),
        FrameSpec::tcp_syn(ip("198.51.100.7"), 40004, ip("10.0.0.100"), 443),
        FrameSpec::tcp_syn(ip("2001:db8:c::7"), 40005, ip("2001:db8:100::1"), 443),
        FrameSpec::tcp_syn(ip("198.51.100.7"), 40006, ip("10.0.0.101"), 443),
        FrameSpec::udp(ip("198.51.100.7"), 40007, ip("10.0.0.100"), 53, b"query"),
    ];
    for spec in &cases {
        let frame = spec.build();
        let (verdict, encapsulated) = lab.run(&frame);
        assert_eq!(verdict, XDP_TX, "{spec:?}");
        let (verdict, out) = decap.run(&encapsulated);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(&out[..12], &encapsulated[..12], "the balancer's MACs kept");
        assert_eq!(
            &out[14..],
            &frame[14..],
            "{spec:?}: the client's packet, byte for byte"
        );
    }
    assert_eq!(decap.count(DecapReason::DecapIpip), 3);
    assert_eq!(decap.count(DecapReason::DecapGue), 4);
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_restarted_daemon_adopts_the_tunnels_and_every_flow_keeps_its_frame() {
    let mut lab = PacketLab::new(CONFIG);
    let specs: Vec<FrameSpec> = (0..64u16)
        .map(|i| {
            if i % 2 == 0 {
                FrameSpec::tcp_ack(ip("198.51.100.7"), 41000 + i, ip("10.0.0.100"), 443)
            } else {
                FrameSpec::tcp_ack(ip("2001:db8:c::7"), 41000 + i, ip("2001:db8:100::1"), 80)
            }
        })
        .collect();
    let before: Vec<Vec<u8>> = specs.iter().map(|s| lab.run(&s.build()).1).collect();
    let (mut lab, adopted, changes) = lab.restart(CONFIG);
    assert_eq!(adopted.vips, 7, "{adopted:?}");
    assert_eq!(adopted.backends, 10, "{adopted:?}");
    assert_eq!(adopted.up, 10, "{adopted:?}");
    assert!(changes.is_empty(), "nothing to reconcile: {changes:?}");
    // The adopted paths are the tunnels' (source, MTU), not re-resolved: no backend lost its path.
    for vip in &lab.balancer.vips {
        for backend in &vip.backends {
            let tunnel = backend.path.and_then(|p| p.tunnel);
            assert!(
                tunnel.is_some(),
                "{}: {} lost its tunnel",
                vip.name,
                backend.address
            );
        }
    }
    for (spec, want) in specs.iter().zip(&before) {
        let (verdict, out) = lab.run(&spec.build());
        assert_eq!(verdict, XDP_TX);
        assert_eq!(
            &out, want,
            "{spec:?}: the same encapsulated frame after the restart"
        );
    }
}
