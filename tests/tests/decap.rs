//! `lb decap`: the `lb_decap` XDP program on hand-built frames (BPF_PROG_TEST_RUN, byte-exact
//! against an independently built inner frame), and `lb decap` end to end in namespaces.
//! Needs root: `cargo test -p tests --test decap -- --include-ignored`.

use std::net::IpAddr;

use lb_common::decap::DecapReason;
use lb_tests::{
    decap_lab::DecapLab,
    frames::{CLIENT_MAC, FrameSpec, LB_MAC},
    packet_lab::XDP_PASS,
    tunnel::{Tunnel, encapsulate, ethernet},
};

const GUE_PORT: u16 = 6080;
const VIP4: &str = "10.100.0.1";
const VIP6: &str = "fd00:100::1";

fn ip(text: &str) -> IpAddr {
    text.parse().expect("an address")
}

fn lab() -> DecapLab {
    DecapLab::new(&[ip(VIP4), ip(VIP6)], GUE_PORT)
}

/// The client's SYN to the VIP of `family` as a whole frame (what the backend's stack must get).
fn inner_frame(v6: bool) -> Vec<u8> {
    if v6 {
        FrameSpec::tcp_syn(ip("2001:db8:c::7"), 40123, ip(VIP6), 80).build()
    } else {
        FrameSpec::tcp_syn(ip("198.51.100.7"), 40123, ip(VIP4), 80).build()
    }
}

fn outer(v6: bool) -> (IpAddr, IpAddr) {
    if v6 {
        (ip("2001:db8:1b::1"), ip("2001:db8:be::1"))
    } else {
        (ip("192.0.2.1"), ip("192.0.2.10"))
    }
}

/// `inner` (an Ethernet frame) encapsulated, in a frame with the same MACs.
fn encapsulated(inner: &[u8], tunnel: Tunnel, outer_v6: bool) -> Vec<u8> {
    let (src, dst) = outer(outer_v6);
    ethernet(
        LB_MAC,
        CLIENT_MAC,
        &encapsulate(&inner[14..], &tunnel, src, dst, 64, 0),
    )
}

const GUE: Tunnel = Tunnel::Gue {
    port: GUE_PORT,
    source_port: 51000,
};
const GUE_V0: Tunnel = Tunnel::GueV0 {
    port: GUE_PORT,
    source_port: 51000,
};

/// Every wire form of the contract: (name, tunnel, outer IPv6, inner IPv6, counted as).
const FORMS: [(&str, Tunnel, bool, bool, DecapReason); 10] = [
    (
        "ipip 4in4",
        Tunnel::Ipip,
        false,
        false,
        DecapReason::DecapIpip,
    ),
    (
        "ipip 6in6",
        Tunnel::Ipip,
        true,
        true,
        DecapReason::DecapIpip,
    ),
    (
        "ipip 4in6",
        Tunnel::Ipip,
        true,
        false,
        DecapReason::DecapIpip,
    ),
    (
        "gue direct 4 over 4",
        GUE,
        false,
        false,
        DecapReason::DecapGue,
    ),
    (
        "gue direct 6 over 4",
        GUE,
        false,
        true,
        DecapReason::DecapGue,
    ),
    (
        "gue direct 4 over 6",
        GUE,
        true,
        false,
        DecapReason::DecapGue,
    ),
    (
        "gue direct 6 over 6",
        GUE,
        true,
        true,
        DecapReason::DecapGue,
    ),
    (
        "gue v0 4 over 4",
        GUE_V0,
        false,
        false,
        DecapReason::DecapGue,
    ),
    (
        "gue v0 6 over 4",
        GUE_V0,
        false,
        true,
        DecapReason::DecapGue,
    ),
    ("gue v0 6 over 6", GUE_V0, true, true, DecapReason::DecapGue),
];

#[test]
#[ignore = "needs root (BPF_PROG_TEST_RUN)"]
fn every_wire_form_is_decapsulated_to_the_exact_inner_frame() {
    let mut lab = lab();
    for (name, tunnel, outer_v6, inner_v6, _) in FORMS {
        let inner = inner_frame(inner_v6);
        let (verdict, out) = lab.run(&encapsulated(&inner, tunnel, outer_v6));
        assert_eq!(verdict, XDP_PASS, "{name}");
        assert_eq!(
            out, inner,
            "{name}: the output is the inner frame, byte for byte"
        );
    }
    let ipip = FORMS
        .iter()
        .filter(|f| f.4 == DecapReason::DecapIpip)
        .count() as u64;
    assert_eq!(
        lab.counts(),
        [
            (DecapReason::DecapIpip, ipip),
            (DecapReason::DecapGue, FORMS.len() as u64 - ipip),
            (DecapReason::PassNotEncapsulated, 0),
            (DecapReason::PassNotVip, 0),
            (DecapReason::PassMalformed, 0),
        ]
    );
}

/// Recomputes an IPv4 header checksum at `at` (after a field was changed).
fn fix_ipv4_checksum(frame: &mut [u8], at: usize) {
    frame[at + 10] = 0;
    frame[at + 11] = 0;
    let header_len = usize::from(frame[at] & 0x0f) * 4;
    let sum = lb_tests::frames::checksum(&[&frame[at..at + header_len]]);
    frame[at + 10..at + 12].copy_from_slice(&sum.to_be_bytes());
}

#[test]
#[ignore = "needs root (BPF_PROG_TEST_RUN)"]
fn everything_else_is_passed_untouched_and_counted() {
    let mut lab = lab();
    let v4 = inner_frame(false);
    let v6 = inner_frame(true);
    let mut cases: Vec<(&str, Vec<u8>, DecapReason)> = Vec::new();

    // Not encapsulated.
    cases.push((
        "a plain SYN to the VIP",
        v4.clone(),
        DecapReason::PassNotEncapsulated,
    ));
    cases.push((
        "a plain IPv6 SYN to the VIP",
        v6.clone(),
        DecapReason::PassNotEncapsulated,
    ));
    let other_port = Tunnel::Gue {
        port: GUE_PORT + 1,
        source_port: 51000,
    };
    cases.push((
        "GUE to another port",
        encapsulated(&v4, other_port, false),
        DecapReason::PassNotEncapsulated,
    ));
    cases.push((
        "GUE over IPv6 to another port",
        encapsulated(&v6, other_port, true),
        DecapReason::PassNotEncapsulated,
    ));
    let mut six_in_four = encapsulated(&v4, Tunnel::Ipip, false);
    // 6in4 is not a form the balancer sends: protocol 41 over IPv4 (with an IPv6 inner).
    let (src, dst) = outer(false);
    six_in_four = {
        let mut outer = encapsulate(&v6[14..], &Tunnel::Ipip, src, dst, 64, 0);
        assert_eq!(outer[9], 41);
        fix_ipv4_checksum(&mut outer, 0);
        drop(std::mem::take(&mut six_in_four));
        ethernet(LB_MAC, CLIENT_MAC, &outer)
    };
    cases.push(("6in4", six_in_four, DecapReason::PassNotEncapsulated));
    // IPv6 outer with a hop-by-hop header before the IPIP payload.
    let mut hop_by_hop = encapsulated(&v6, Tunnel::Ipip, true);
    {
        let payload = hop_by_hop.split_off(14 + 40);
        let mut ext = vec![41u8, 0, 1, 4, 0, 0, 0, 0];
        ext.extend_from_slice(&payload);
        hop_by_hop[14 + 6] = 0;
        let len = u16::try_from(ext.len()).unwrap();
        hop_by_hop[14 + 4..14 + 6].copy_from_slice(&len.to_be_bytes());
        hop_by_hop.extend_from_slice(&ext);
    }
    cases.push((
        "IPv6 outer with an extension header",
        hop_by_hop,
        DecapReason::PassNotEncapsulated,
    ));
    cases.push((
        "ARP",
        lb_tests::frames::arp_request([192, 0, 2, 1], [192, 0, 2, 10]),
        DecapReason::PassNotEncapsulated,
    ));
    // BPF_PROG_TEST_RUN wants at least an Ethernet header.
    cases.push((
        "an Ethernet header alone",
        v4[..14].to_vec(),
        DecapReason::PassNotEncapsulated,
    ));
    cases.push((
        "a cut IPv4 header",
        v4[..24].to_vec(),
        DecapReason::PassNotEncapsulated,
    ));

    // Not a VIP.
    let other = FrameSpec::tcp_syn(ip("198.51.100.7"), 40123, ip("10.100.0.2"), 80).build();
    cases.push((
        "IPIP to another address",
        encapsulated(&other, Tunnel::Ipip, false),
        DecapReason::PassNotVip,
    ));
    cases.push((
        "GUE to another address",
        encapsulated(&other, GUE, true),
        DecapReason::PassNotVip,
    ));
    let other6 = FrameSpec::tcp_syn(ip("2001:db8:c::7"), 40123, ip("fd00:100::2"), 80).build();
    cases.push((
        "6in6 to another address",
        encapsulated(&other6, Tunnel::Ipip, true),
        DecapReason::PassNotVip,
    ));

    // Malformed: truncated, inconsistent lengths, fragments, unknown GUE.
    for (name, tunnel, outer_v6, inner_v6, _) in FORMS {
        let mut frame = encapsulated(&inner_frame(inner_v6), tunnel, outer_v6);
        frame.truncate(frame.len() - 1);
        cases.push((name, frame, DecapReason::PassMalformed));
    }
    let mut longer = v4[14..].to_vec();
    longer.push(0);
    let (src, dst) = outer(false);
    cases.push((
        "inner shorter than the outer says",
        ethernet(
            LB_MAC,
            CLIENT_MAC,
            &encapsulate(&longer, &Tunnel::Ipip, src, dst, 64, 0),
        ),
        DecapReason::PassMalformed,
    ));
    let mut fragment = encapsulated(&v4, Tunnel::Ipip, false);
    fragment[14 + 6] |= 0x20; // more fragments
    fix_ipv4_checksum(&mut fragment, 14);
    cases.push(("IPIP first fragment", fragment, DecapReason::PassMalformed));
    let mut gue_fragment = encapsulated(&v4, GUE, false);
    gue_fragment[14 + 6] |= 0x20;
    fix_ipv4_checksum(&mut gue_fragment, 14);
    cases.push((
        "GUE first fragment",
        gue_fragment,
        DecapReason::PassMalformed,
    ));
    let mut later_fragment = encapsulated(&v4, Tunnel::Ipip, false);
    later_fragment[14 + 7] = 1; // offset 8 bytes
    fix_ipv4_checksum(&mut later_fragment, 14);
    cases.push((
        "IPIP later fragment",
        later_fragment,
        DecapReason::PassMalformed,
    ));
    let mut gue_unknown = encapsulated(&v4, GUE, false);
    gue_unknown[14 + 20 + 8] = 0x80; // GUE variant 2
    cases.push((
        "GUE of an unknown variant",
        gue_unknown,
        DecapReason::PassMalformed,
    ));
    let mut gue_flags = encapsulated(&v4, GUE_V0, false);
    gue_flags[14 + 20 + 8 + 2] = 0x80; // a flag set: an option follows
    cases.push(("GUE v0 with flags", gue_flags, DecapReason::PassMalformed));
    let mut gue_proto = encapsulated(&v4, GUE_V0, false);
    gue_proto[14 + 20 + 8 + 1] = 17;
    cases.push(("GUE v0 carrying UDP", gue_proto, DecapReason::PassMalformed));
    let mut udp_len = encapsulated(&v4, GUE, false);
    udp_len[14 + 20 + 5] += 1;
    cases.push((
        "a UDP length that disagrees",
        udp_len,
        DecapReason::PassMalformed,
    ));
    let mut garbage = encapsulated(&v4, Tunnel::Ipip, false);
    for (i, byte) in garbage.iter_mut().enumerate().skip(14 + 20) {
        *byte = (i as u8).wrapping_mul(37);
    }
    cases.push(("IPIP carrying garbage", garbage, DecapReason::PassMalformed));

    let mut expected = std::collections::BTreeMap::new();
    for (name, frame, reason) in &cases {
        let (verdict, out) = lab.run(frame);
        assert_eq!(verdict, XDP_PASS, "{name}");
        assert_eq!(&out, frame, "{name}: passed byte for byte");
        *expected.entry(*reason as u32).or_insert(0u64) += 1;
        assert_eq!(
            lab.count(*reason),
            expected[&(*reason as u32)],
            "{name} counted as {reason:?}"
        );
    }
    assert_eq!(lab.count(DecapReason::DecapIpip), 0);
    assert_eq!(lab.count(DecapReason::DecapGue), 0);
}
