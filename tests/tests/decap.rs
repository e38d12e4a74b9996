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

/// The client's SYN to the VIP of `family`.
fn inner_spec(v6: bool) -> FrameSpec {
    if v6 {
        FrameSpec::tcp_syn(ip("2001:db8:c::7"), 40123, ip(VIP6), 80)
    } else {
        FrameSpec::tcp_syn(ip("198.51.100.7"), 40123, ip(VIP4), 80)
    }
}

/// The client's SYN as a whole frame (what the backend's stack must get).
fn inner_frame(v6: bool) -> Vec<u8> {
    inner_spec(v6).build()
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
    // The same with an 802.1Q tag, which is kept.
    for (name, tunnel, outer_v6, inner_v6, _) in FORMS {
        let mut spec = inner_spec(inner_v6);
        spec.vlan = Some(100);
        let inner = spec.build();
        let (src, dst) = outer(outer_v6);
        let frame = lb_tests::tunnel::ethernet_vlan(
            LB_MAC,
            CLIENT_MAC,
            100,
            &encapsulate(&inner[18..], &tunnel, src, dst, 64, 0),
        );
        let (verdict, out) = lab.run(&frame);
        assert_eq!(verdict, XDP_PASS, "{name} tagged");
        assert_eq!(
            out, inner,
            "{name} tagged: the inner frame with the tag, byte for byte"
        );
    }
    let ipip = 2 * FORMS
        .iter()
        .filter(|f| f.4 == DecapReason::DecapIpip)
        .count() as u64;
    assert_eq!(
        lab.counts(),
        [
            (DecapReason::DecapIpip, ipip),
            (DecapReason::DecapGue, 2 * FORMS.len() as u64 - ipip),
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
    let mut tagged = inner_spec(false);
    tagged.vlan = Some(7);
    cases.push((
        "a tagged plain SYN",
        tagged.build(),
        DecapReason::PassNotEncapsulated,
    ));
    let (src, dst) = outer(false);
    let mut tagged_cut = lb_tests::tunnel::ethernet_vlan(
        LB_MAC,
        CLIENT_MAC,
        7,
        &encapsulate(&v4[14..], &Tunnel::Ipip, src, dst, 64, 0),
    );
    tagged_cut.truncate(tagged_cut.len() - 3);
    cases.push((
        "a tagged truncated IPIP",
        tagged_cut,
        DecapReason::PassMalformed,
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

mod end_to_end {
    use std::{
        net::{IpAddr, SocketAddr, TcpListener},
        path::PathBuf,
        time::Duration,
    };

    use lb_tests::{
        bpffs_entries_under,
        decap_lab::{
            BACKEND_MAC, BACKEND_V4, BACKEND_V6, DecapHosts, SENDER_MAC, SENDER_V4, SENDER_V6,
            tcp_of,
        },
        frames::FrameSpec,
        tunnel::{Tunnel, encapsulate, ethernet},
    };

    use super::ip;

    const TCP_SYN: u8 = 0x02;
    const TCP_ACK: u8 = 0x10;

    /// Where this test's backend namespace keeps its decap pins.
    fn pin_dir(hosts: &DecapHosts) -> PathBuf {
        PathBuf::from("/sys/fs/bpf/lb-decap/netns")
            .join(hosts.backend.name())
            .join("eth0")
    }

    /// Listens on port 80 of every address in the backend, both families (a dual-stack `[::]`
    /// socket; the VIPs are on its lo).
    fn serve(hosts: &DecapHosts) -> TcpListener {
        hosts
            .backend
            .run(|| TcpListener::bind("[::]:80").expect("listening on [::]:80"))
    }

    /// Sends the client's SYN `client -> vip:80` encapsulated by `tunnel` from the sender, and
    /// waits for the backend's SYN-ACK `vip:80 -> client` on the sender's wire. Returns how many
    /// times the SYN was sent.
    fn syn_gets_syn_ack(
        hosts: &DecapHosts,
        client: SocketAddr,
        vip: IpAddr,
        tunnel: Tunnel,
    ) -> u64 {
        let socket = hosts.sender_socket().expect("AF_PACKET socket");
        let inner = FrameSpec::tcp_syn(client.ip(), client.port(), vip, 80).build();
        let (outer_src, outer_dst) = if vip.is_ipv4() {
            (ip(SENDER_V4), ip(BACKEND_V4))
        } else {
            (ip(SENDER_V6), ip(BACKEND_V6))
        };
        let frame = ethernet(
            BACKEND_MAC,
            SENDER_MAC,
            &encapsulate(&inner[14..], &tunnel, outer_src, outer_dst, 64, 0),
        );
        let want = (SocketAddr::new(vip, 80), client);
        // The first frame may wait for the backend's neighbour resolution of the sender: send
        // again (a new SYN of the same connection) until the answer comes.
        for sent in 1..=5 {
            socket.send(&frame).expect("sending the encapsulated SYN");
            let answer = socket.wait_for(Duration::from_secs(1), |frame| {
                tcp_of(frame).is_some_and(|(src, dst, flags)| {
                    (src, dst) == want && flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
                })
            });
            if let Some(answer) = answer {
                let (src, dst, _) = tcp_of(&answer).expect("a TCP frame");
                assert_eq!((src, dst), want, "{tunnel:?}");
                assert_eq!(&answer[..6], &SENDER_MAC, "answered to the sender's MAC");
                return sent;
            }
        }
        panic!("no SYN-ACK from {vip}:80 to {client} for a SYN through {tunnel:?}");
    }

    fn counter(status: &serde_json::Value, name: &str) -> u64 {
        status["counters"][name]["packets"]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name} in {status}"))
    }

    /// Every wire form through `lb decap` attached in `mode`: each SYN answered from the VIP,
    /// each counted once per time it was sent.
    fn syns_are_answered(mode: &str, expect_mode: &str) {
        let hosts = DecapHosts::new().expect("namespaces");
        let _server = serve(&hosts);
        let report = hosts
            .lb_decap(&[
                "--vip",
                super::VIP4,
                "--vip",
                super::VIP6,
                "--xdp-mode",
                mode,
            ])
            .expect("lb decap");
        assert!(
            report.contains(&format!("lb decap attached to eth0 ({expect_mode} XDP")),
            "{report}"
        );
        let gue = |source_port| Tunnel::Gue {
            port: 6080,
            source_port,
        };
        let gue_v0 = |source_port| Tunnel::GueV0 {
            port: 6080,
            source_port,
        };
        let client4 = ip("198.51.100.7");
        let client6 = ip("2001:db8:c::7");
        let vip4 = ip(super::VIP4);
        let vip6 = ip(super::VIP6);
        let cases = [
            (SocketAddr::new(client4, 41001), vip4, Tunnel::Ipip),
            (SocketAddr::new(client4, 41002), vip4, gue(50001)),
            (SocketAddr::new(client4, 41003), vip4, gue_v0(50002)),
            (SocketAddr::new(client6, 41004), vip6, Tunnel::Ipip),
            (SocketAddr::new(client6, 41005), vip6, gue(50003)),
            (SocketAddr::new(client6, 41006), vip6, gue_v0(50004)),
        ];
        let (mut ipip, mut gue_sent) = (0, 0);
        for (client, vip, tunnel) in cases {
            let sent = syn_gets_syn_ack(&hosts, client, vip, tunnel);
            if tunnel == Tunnel::Ipip {
                ipip += sent;
            } else {
                gue_sent += sent;
            }
        }
        let status = hosts.status().expect("lb decap --status --json");
        assert_eq!(status["attached"], true);
        assert_eq!(counter(&status, "decapsulated_ipip"), ipip, "{status}");
        assert_eq!(counter(&status, "decapsulated_gue"), gue_sent, "{status}");
        assert_eq!(counter(&status, "passed_not_a_vip"), 0, "{status}");
        assert_eq!(counter(&status, "passed_malformed"), 0, "{status}");
        let text = hosts.lb_decap(&["--status"]).expect("lb decap --status");
        assert!(text.contains("decapsulated_gue"), "{text}");
        hosts.lb_decap(&["--detach"]).expect("lb decap --detach");
        assert!(bpffs_entries_under(pin_dir(&hosts)).is_empty());
        assert!(!pin_dir(&hosts).exists());
    }

    #[test]
    #[ignore = "needs root and network namespaces"]
    fn encapsulated_syns_are_answered_from_the_vip() {
        // `auto` takes generic XDP on a veth.
        syns_are_answered("auto", "skb");
    }

    #[test]
    #[ignore = "needs root and network namespaces"]
    fn encapsulated_syns_are_answered_in_native_mode() {
        syns_are_answered("native", "native");
    }

    #[test]
    #[ignore = "needs root and network namespaces"]
    fn rerun_updates_in_place_and_detach_undoes_exactly_its_changes() {
        let hosts = DecapHosts::new().expect("namespaces");
        let _servers = serve(&hosts);
        let backend = &hosts.backend;
        // Strict reverse-path filtering, and one VIP the operator had on lo already.
        backend
            .set_sysctl("net.ipv4.conf.all.rp_filter", "1")
            .unwrap();
        backend
            .set_sysctl("net.ipv4.conf.eth0.rp_filter", "1")
            .unwrap();
        backend
            .ip(["addr", "add", "10.100.0.2/32", "dev", "lo"])
            .unwrap();
        let lo_before = hosts.backend_lo_addresses().unwrap();

        hosts
            .lb_decap(&["--vip", "10.100.0.1", "--vip", "10.100.0.2"])
            .expect("lb decap");
        let first = hosts.status().unwrap();
        assert_eq!(
            first["vips"],
            serde_json::json!(["10.100.0.1", "10.100.0.2"])
        );
        assert_eq!(first["gue_port"], 6080);
        let mut lo = lo_before.clone();
        lo.insert(ip("10.100.0.1"));
        assert_eq!(hosts.backend_lo_addresses().unwrap(), lo);
        assert_eq!(backend.sysctl("net.ipv4.conf.all.rp_filter").unwrap(), "2");
        assert_eq!(backend.sysctl("net.ipv4.conf.eth0.rp_filter").unwrap(), "2");
        // Idempotent: the same again changes nothing.
        let again = hosts
            .lb_decap(&["--vip", "10.100.0.1", "--vip", "10.100.0.2"])
            .expect("lb decap again");
        assert!(again.contains("updated in place"), "{again}");
        assert_eq!(hosts.backend_lo_addresses().unwrap(), lo);

        // Another VIP set and GUE port: same link and program, maps and lo updated.
        let update = hosts
            .lb_decap(&[
                "--vip",
                "10.100.0.2",
                "--vip",
                "10.100.0.3",
                "--gue-port",
                "7000",
            ])
            .expect("lb decap with new VIPs");
        assert!(update.contains("updated in place"), "{update}");
        let second = hosts.status().unwrap();
        assert_eq!(second["link_id"], first["link_id"]);
        assert_eq!(second["program_id"], first["program_id"]);
        assert_eq!(
            second["vips"],
            serde_json::json!(["10.100.0.2", "10.100.0.3"])
        );
        assert_eq!(second["gue_port"], 7000);
        let mut lo = lo_before.clone();
        lo.insert(ip("10.100.0.3"));
        assert_eq!(hosts.backend_lo_addresses().unwrap(), lo);
        syn_gets_syn_ack(
            &hosts,
            SocketAddr::new(ip("198.51.100.9"), 42001),
            ip("10.100.0.3"),
            Tunnel::Gue {
                port: 7000,
                source_port: 50003,
            },
        );

        let detached = hosts.lb_decap(&["--detach"]).expect("lb decap --detach");
        assert!(detached.contains("XDP program detached"), "{detached}");
        assert_eq!(hosts.backend_lo_addresses().unwrap(), lo_before);
        assert_eq!(backend.sysctl("net.ipv4.conf.all.rp_filter").unwrap(), "1");
        assert_eq!(backend.sysctl("net.ipv4.conf.eth0.rp_filter").unwrap(), "1");
        assert!(!pin_dir(&hosts).exists());
        let output = backend.ip(["link", "show", "eth0"]).unwrap();
        assert!(
            !String::from_utf8_lossy(&output.stdout).contains("xdp"),
            "no XDP program left on eth0"
        );
        // Detaching again finds nothing and is no error.
        let nothing = hosts.lb_decap(&["--detach"]).expect("a second --detach");
        assert!(nothing.contains("not on eth0"), "{nothing}");
    }

    #[test]
    #[ignore = "needs root and network namespaces"]
    fn a_failed_attach_leaves_the_host_and_bpffs_as_they_were() {
        let hosts = DecapHosts::new().expect("namespaces");
        let backend = &hosts.backend;
        backend
            .set_sysctl("net.ipv4.conf.eth0.rp_filter", "1")
            .unwrap();
        let lo_before = hosts.backend_lo_addresses().unwrap();
        // Another XDP program holds the interface.
        let _other = lb_tests::xdp::attach_xdp_program(
            backend,
            "eth0",
            lb::bench_object(),
            "bench_pass",
            aya::programs::xdp::XdpMode::Skb,
        )
        .expect("attaching another program");
        let error = hosts
            .lb_decap(&["--vip", super::VIP4])
            .expect_err("the interface is taken");
        assert!(
            error
                .to_string()
                .contains("another XDP program is attached to eth0"),
            "{error:#}"
        );
        assert_eq!(hosts.backend_lo_addresses().unwrap(), lo_before);
        assert_eq!(backend.sysctl("net.ipv4.conf.eth0.rp_filter").unwrap(), "1");
        assert!(!pin_dir(&hosts).exists());
    }
}

mod orphans {
    use std::{
        path::Path,
        time::{Duration, Instant},
    };

    use lb::dataplane::pins::orphans::{self, Gone, OrphanOutcome};
    use lb_tests::decap_lab::DecapHosts;

    #[test]
    #[ignore = "needs root and network namespaces"]
    fn decap_pins_of_a_deleted_namespace_are_found_and_removed_as_orphans() {
        let hosts = DecapHosts::new().expect("namespaces");
        hosts.lb_decap(&["--vip", super::VIP4]).expect("lb decap");
        let DecapHosts { sender, backend } = hosts;
        let name = backend.name().to_owned();
        let top = Path::new("/sys/fs/bpf/lb-decap");
        let dir = top.join("netns").join(&name).join("eth0");
        assert!(dir.is_dir());
        drop(backend);
        drop(sender);
        // The kernel destroys a namespace (and its interfaces, making the link defunct) a moment
        // after its last reference goes.
        let deadline = Instant::now() + Duration::from_secs(10);
        let orphan = loop {
            let found = orphans::scan(top)
                .into_iter()
                .find(|o| Path::new(&o.dir) == dir);
            if let Some(orphan) = found {
                break orphan;
            }
            assert!(
                Instant::now() < deadline,
                "{} never became an orphan",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(orphan.namespace.as_deref(), Some(name.as_str()));
        assert!(matches!(orphan.gone, Gone::Namespace | Gone::Interface));
        match orphans::detach_orphan(top, orphan) {
            OrphanOutcome::Removed { report, .. } => assert!(report.pins.len() >= 3, "{report:?}"),
            other => panic!("not removed: {other:?}"),
        }
        assert!(!dir.exists());
    }
}
