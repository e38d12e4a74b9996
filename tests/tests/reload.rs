//! Reload and restart at the packet level: the daemon's reconcile (and a restarted daemon's
//! adoption) applied to the real program and maps (`BPF_PROG_TEST_RUN`). Established flows of
//! kept backends stay exactly where they were, flows of removed backends are re-chosen from the
//! new ring, operator overrides survive, removed VIPs stop being balanced and ids are reused
//! without inheriting counters.

use std::net::IpAddr;

use lb::api::model::Admin;
use lb_common::{PROTO_TCP, Reason};
use lb_tests::{
    frames::{FrameSpec, L4},
    packet_lab::{PacketLab, XDP_PASS, XDP_TX, flow_key},
};

/// Six backend slots: the first config uses five.
const BEFORE: &str = r#"
interface = "lab0"
ring_size = 65537
max_vips = 2
max_backends = 6
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
"#;

/// .11 reweighted (the ring changes a lot), .13 removed, .14 added; dns unchanged.
fn after() -> String {
    BEFORE
        .replacen(
            "address = \"10.0.0.11\"\n",
            "address = \"10.0.0.11\"\nweight = 300\n",
            1,
        )
        .replace("10.0.0.13", "10.0.0.14")
}

const WEB: usize = 0;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn backend_of(lab: &mut PacketLab, spec: &FrameSpec) -> u32 {
    lab.backend_of(&spec.build())
}

fn id_of(lab: &PacketLab, vip: &str, address: &str) -> u32 {
    lab.balancer
        .backend_id(vip, ip(address))
        .unwrap_or_else(|| panic!("no backend {address} in vip {vip}"))
}

fn ack(flow: &FrameSpec) -> FrameSpec {
    let mut next = flow.clone();
    next.l4 = L4::Tcp { flags: 0x10 };
    next
}

/// The (packets, new flows) totals of VIP `vip` and the `tx` packets: sums of the backends'
/// counters and the carries of removed ones (the program counts a forward once).
fn totals(lab: &PacketLab, vip: &str) -> ((u64, u64), u64) {
    let balancer = &lab.balancer;
    let at = balancer.vip_index(vip).expect("VIP");
    let c = balancer
        .vip_counters(&balancer.vips[at])
        .expect("VIP totals");
    let tx = balancer.reason_counters(Reason::Tx).expect("tx");
    ((c.packets, c.new_flows), tx.packets)
}

/// The ids of web's .11, .12 and .13.
fn web_ids(lab: &PacketLab) -> [u32; 3] {
    ["10.0.0.11", "10.0.0.12", "10.0.0.13"].map(|a| id_of(lab, "web", a))
}

/// New TCP flows from `client` to web, one per source port; returns them and their backends.
fn open_web_flows(
    lab: &mut PacketLab,
    client: &str,
    ports: std::ops::Range<u16>,
) -> (Vec<FrameSpec>, Vec<u32>) {
    let flows: Vec<FrameSpec> = ports
        .map(|sport| FrameSpec::tcp_syn(ip(client), sport, ip("10.0.0.100"), 80))
        .collect();
    let backends = flows.iter().map(|f| backend_of(lab, f)).collect();
    (flows, backends)
}

/// Sends the next packet of every flow: a flow that was on `removed` must take the backend the
/// new ring predicts, every other one must stay on its backend. Returns where the moved went.
fn assert_only_flows_of_removed_moved(
    lab: &mut PacketLab,
    flows: &[FrameSpec],
    before: &[u32],
    removed: u32,
) -> Vec<u32> {
    let mut moved = Vec::new();
    for (flow, &old) in flows.iter().zip(before) {
        let now = backend_of(lab, &ack(flow));
        if old == removed {
            let key = flow_key(flow.src, flow.sport, flow.dst, flow.dport, PROTO_TCP);
            assert_eq!(now, lab.expected_backend(WEB, &key), "flow {}", flow.sport);
            moved.push(now);
        } else {
            assert_eq!(now, old, "flow {} of a kept backend moved", flow.sport);
        }
    }
    moved
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_reload_moves_only_the_flows_of_removed_backends() {
    let mut lab = PacketLab::new(BEFORE);
    let (flows, before) = open_web_flows(&mut lab, "192.0.2.30", 3000..3400);
    let [b11, b12, b13] = web_ids(&lab);
    for id in [b11, b12, b13] {
        assert!(
            before.iter().filter(|&&b| b == id).count() > 60,
            "400 flows must reach every backend: {before:?}"
        );
    }
    // An operator drain before the reload must still hold after it.
    lab.balancer
        .set_admin(WEB, 1, Admin::Drained)
        .expect("drain");

    let changes: Vec<String> = lab
        .reload(&after())
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        changes,
        [
            "vip web: backend 10.0.0.13 removed",
            "vip web: backend 10.0.0.11: weight 100 -> 300",
            "vip web: backend 10.0.0.14 added",
        ],
        "the dns VIP did not change and must not be listed"
    );
    assert_eq!(
        id_of(&lab, "web", "10.0.0.11"),
        b11,
        "kept backends keep their id"
    );
    assert_eq!(id_of(&lab, "web", "10.0.0.12"), b12);
    let b14 = id_of(&lab, "web", "10.0.0.14");
    assert_ne!(
        b14, b13,
        "a free slot was there: the removed backend's id is not reused yet"
    );
    assert_eq!(
        lab.balancer.vips[WEB].backends[1].admin,
        Admin::Drained,
        "the drain survives the reload"
    );

    // Re-chosen from the new ring (which has no .13 and, drained, no .12).
    let moved = assert_only_flows_of_removed_moved(&mut lab, &flows, &before, b13);
    assert!(
        moved.iter().all(|&b| b == b11 || b == b14),
        "moved flows went to {moved:?}"
    );
    let moved = moved.len();
    assert!(moved > 60, "only {moved} flows were on the removed backend");

    // New flows: the ring has .11 (weight 300) and .14 (100), not the drained .12.
    let fresh: Vec<u32> = (5000..5400)
        .map(|sport| {
            backend_of(
                &mut lab,
                &FrameSpec::tcp_syn(ip("192.0.2.31"), sport, ip("10.0.0.100"), 80),
            )
        })
        .collect();
    let to = |id| fresh.iter().filter(|&&b| b == id).count();
    assert_eq!(to(b12), 0, "a drained backend gets no new flow");
    assert!(
        to(b14) > 50 && to(b11) > 2 * to(b14),
        "{} / {}",
        to(b11),
        to(b14)
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn removed_and_moved_vips_stop_being_balanced_and_reused_ids_start_from_zero() {
    let mut lab = PacketLab::new(BEFORE);
    let dns = FrameSpec::udp(ip("192.0.2.40"), 4000, ip("10.0.0.100"), 53, b"q");
    let (verdict, _) = lab.run(&dns.build());
    assert_eq!(verdict, XDP_TX);
    let web80 = FrameSpec::tcp_syn(ip("192.0.2.40"), 4001, ip("10.0.0.100"), 80);
    let b13 = id_of(&lab, "web", "10.0.0.13");
    for sport in 6000..6100 {
        backend_of(
            &mut lab,
            &FrameSpec::tcp_syn(ip("192.0.2.41"), sport, ip("10.0.0.100"), 80),
        );
    }
    assert!(
        lab.balancer
            .dataplane
            .maps
            .backend_counters(b13)
            .unwrap()
            .packets
            > 0,
        ".13 must have counted traffic for the reuse check to mean something"
    );
    assert_eq!(
        totals(&lab, "web"),
        ((100, 100), 101),
        "web's SYNs, dns's one"
    );

    // dns removed; web moved to port 8080 with .13 replaced by .15 and .16.
    let moved = after().replace("port = 80\n", "port = 8080\n").replace(
        "address = \"10.0.0.14\"",
        "address = \"10.0.0.15\"\n[[vip.backend]]\naddress = \"10.0.0.16\"",
    );
    let without_dns = &moved[..moved.find("[[vip]]\nname = \"dns\"").unwrap()];
    let changes: Vec<String> = lab
        .reload(without_dns)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        changes,
        [
            "vip web: backend 10.0.0.13 removed",
            "vip dns: removed",
            "vip web: address 10.0.0.100:80/tcp -> 10.0.0.100:8080/tcp",
            "vip web: backend 10.0.0.11: weight 100 -> 300",
            "vip web: backend 10.0.0.15 added",
            "vip web: backend 10.0.0.16 added",
        ]
    );

    let frame = dns.build();
    let (verdict, out) = lab.run(&frame);
    assert_eq!(
        (verdict, &out),
        (XDP_PASS, &frame),
        "a removed VIP passes untouched"
    );
    let frame = web80.build();
    let (verdict, out) = lab.run(&frame);
    assert_eq!(
        (verdict, &out),
        (XDP_PASS, &frame),
        "the old port is no VIP any more"
    );
    let web8080 = FrameSpec::tcp_syn(ip("192.0.2.40"), 4001, ip("10.0.0.100"), 8080);
    let key = flow_key(web8080.src, web8080.sport, web8080.dst, 8080, PROTO_TCP);
    let expected = lab.expected_backend(WEB, &key);
    assert_eq!(backend_of(&mut lab, &web8080), expected);

    // Six slots, five in use before: .15 took the free sixth; .16 found none and took the
    // last id this reload freed, .13's, and starts counting from zero.
    assert_eq!(id_of(&lab, "web", "10.0.0.15"), 5);
    let b16 = id_of(&lab, "web", "10.0.0.16");
    assert_eq!(b16, b13, "the pool was full: .16 reuses .13's slot");
    let c16 = lab.balancer.dataplane.maps.backend_counters(b16).unwrap();
    let only_the_probe = u64::from(expected == b16);
    assert_eq!(
        c16.new_flows, only_the_probe,
        "backend .16 inherited .13's counters"
    );
    // .13's counts went into web's carry before .16 took its id, dns's into the removed VIPs':
    // nothing counted is lost or counted twice.
    assert_eq!(
        totals(&lab, "web"),
        ((101, 101), 102),
        "web's totals and tx after the reload and the probe"
    );
    let not_vip = lab
        .balancer
        .dataplane
        .maps
        .reason_counters(Reason::PassNotVip)
        .unwrap();
    assert_eq!(
        not_vip.packets, 2,
        "the dns and :80 frames after the reload"
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_restarted_daemon_adopts_ids_health_and_drains_and_applies_a_changed_config() {
    let mut lab = PacketLab::new(BEFORE);
    let (flows, before) = open_web_flows(&mut lab, "192.0.2.50", 7000..7300);
    let [b11, b12, b13] = web_ids(&lab);
    lab.balancer
        .set_admin(WEB, 1, Admin::Drained)
        .expect("drain");
    let dns_ids = (
        id_of(&lab, "dns", "10.0.0.21"),
        id_of(&lab, "dns", "10.0.0.22"),
    );

    // The daemon dies; the next one starts with the changed config (.13 gone, .14 new, .11
    // reweighted) on the same maps.
    let web_before = totals(&lab, "web");
    assert_eq!(web_before, ((300, 300), 300));
    let (mut lab, adopted, changes) = lab.restart(&after());
    assert_eq!(
        totals(&lab, "web"),
        web_before,
        "a restart that drops .13 keeps what it counted in web's totals and tx"
    );
    assert_eq!(
        adopted,
        lb::balancer::Adopted {
            vips: 2,
            backends: 4,
            up: 4,
            stale_vips: 0,
            stale_backends: 1,
        },
        "web's .11 and .12, dns's two; .13's record is cleared"
    );
    let changes: Vec<String> = changes.iter().map(ToString::to_string).collect();
    assert_eq!(
        changes,
        ["vip web: backend 10.0.0.14 added"],
        "adopted backends take the new config's weights; only .14 is new"
    );
    assert_eq!(id_of(&lab, "web", "10.0.0.11"), b11);
    assert_eq!(id_of(&lab, "web", "10.0.0.12"), b12);
    assert_eq!(
        (
            id_of(&lab, "dns", "10.0.0.21"),
            id_of(&lab, "dns", "10.0.0.22")
        ),
        dns_ids
    );
    assert_eq!(
        lab.balancer.vips[WEB].backends[1].admin,
        Admin::Drained,
        "the drain is read back from the pinned record"
    );

    assert_only_flows_of_removed_moved(&mut lab, &flows, &before, b13);
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_vip_may_take_over_the_address_another_vip_leaves_in_the_same_reload() {
    let mut lab = PacketLab::new(BEFORE);
    // web leaves 10.0.0.100:80/tcp for :81; dns moves onto :80/tcp in the same reload.
    let moved = BEFORE.replacen("port = 80\n", "port = 81\n", 1).replacen(
        "port = 53\nprotocol = \"udp\"",
        "port = 80\nprotocol = \"tcp\"",
        1,
    );
    let changes: Vec<String> = lab.reload(&moved).iter().map(ToString::to_string).collect();
    assert_eq!(
        changes,
        [
            "vip web: address 10.0.0.100:80/tcp -> 10.0.0.100:81/tcp",
            "vip dns: address 10.0.0.100:53/udp -> 10.0.0.100:80/tcp",
        ]
    );
    // web's old key is dns's now: removing web's old record must not have taken it.
    let dns_ids = [
        id_of(&lab, "dns", "10.0.0.21"),
        id_of(&lab, "dns", "10.0.0.22"),
    ];
    let to80 = FrameSpec::tcp_syn(ip("192.0.2.60"), 5555, ip("10.0.0.100"), 80);
    assert!(
        dns_ids.contains(&backend_of(&mut lab, &to80)),
        "80/tcp is dns's"
    );
    let web_ids = web_ids(&lab);
    let to81 = FrameSpec::tcp_syn(ip("192.0.2.60"), 5556, ip("10.0.0.100"), 81);
    assert!(
        web_ids.contains(&backend_of(&mut lab, &to81)),
        "81/tcp is web's"
    );
    let frame = FrameSpec::udp(ip("192.0.2.60"), 5557, ip("10.0.0.100"), 53, b"q").build();
    let (verdict, out) = lab.run(&frame);
    assert_eq!(
        (verdict, &out),
        (XDP_PASS, &frame),
        "53/udp is no VIP any more"
    );
}

/// What a packet-level observer can see of the data plane: where each of `flows` goes next
/// (backend ids), the web VIP's live ring digest, and the verdict and output of a probe frame to
/// the VIP the new config adds and to the one it removes.
type Observed = (Vec<u32>, String, Vec<(u32, Vec<u8>)>);

fn observe(lab: &mut PacketLab, flows: &[FrameSpec]) -> Observed {
    let next: Vec<u32> = flows.iter().map(|f| backend_of(lab, &ack(f))).collect();
    let digest = lab.balancer.live_ring_digest(WEB).expect("ring digest");
    let probes = [
        FrameSpec::tcp_syn(ip("192.0.2.60"), 6000, ip("10.0.0.100"), 443),
        FrameSpec::udp(ip("192.0.2.60"), 6001, ip("10.0.0.100"), 53, b"q"),
    ];
    let verdicts = probes.iter().map(|p| lab.run(&p.build())).collect();
    (next, digest, verdicts)
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_reload_that_fails_part_way_leaves_the_old_config_running_exactly() {
    // The new config removes .13, reweights .11, adds .14, and replaces the VIP dns (53/udp)
    // with tls (443/tcp): removals, changes and additions, each a place to fail.
    let new = after()
        .replace("name = \"dns\"", "name = \"tls\"")
        .replace(
            "port = 53\nprotocol = \"udp\"",
            "port = 443\nprotocol = \"tcp\"",
        )
        .replace("10.0.0.21", "10.0.0.31");
    let mut failures = 0;
    for writes in 0.. {
        let mut lab = PacketLab::new(BEFORE);
        let (flows, _) = open_web_flows(&mut lab, "192.0.2.50", 7000..7300);
        let names = |lab: &PacketLab| -> Vec<(String, Vec<(IpAddr, u32)>)> {
            lab.balancer
                .vips
                .iter()
                .map(|v| {
                    let backends = v.backends.iter().map(|b| (b.address, b.id)).collect();
                    (v.name.clone(), backends)
                })
                .collect()
        };
        let model_before = names(&lab);
        let seen_before = observe(&mut lab, &flows);
        lab.balancer.inject_map_write_failure(Some(writes));
        let counted_before = (totals(&lab, "web"), totals(&lab, "dns"));
        match lab.try_reload(&new) {
            Ok(_) => {
                // Enough writes allowed: the reload went through, with the new VIP.
                assert!(failures >= 5, "only {failures} failure points were tried");
                println!("a reload failing at each of its first {failures} map writes rolled back");
                let (_, _, verdicts) = observe(&mut lab, &flows);
                assert_eq!(verdicts[0].0, XDP_TX, "the new VIP is balanced");
                assert_eq!(verdicts[1].0, XDP_PASS, "the removed VIP is not");
                break;
            }
            Err(e) => {
                failures += 1;
                let message = e.to_string();
                assert!(
                    message.contains("injected failure")
                        && message.contains("rolled back: the previous config runs unchanged"),
                    "after {writes} writes: {message}"
                );
                // The model and everything a packet sees are as before the reload.
                assert_eq!(names(&lab), model_before, "after {writes} writes");
                assert_eq!(
                    (totals(&lab, "web"), totals(&lab, "dns")),
                    counted_before,
                    "the totals changed (after {writes} writes)"
                );
                let seen_after = observe(&mut lab, &flows);
                assert_eq!(
                    seen_after.0, seen_before.0,
                    "flows moved (after {writes} writes)"
                );
                assert_eq!(
                    seen_after.1, seen_before.1,
                    "web's ring changed (after {writes} writes)"
                );
                assert_eq!(
                    seen_after.2, seen_before.2,
                    "another VIP is balanced differently (after {writes} writes)"
                );
                assert_eq!(seen_after.2[0].0, XDP_PASS, "the new VIP is not there");
                assert_eq!(
                    seen_after.2[1].0, XDP_TX,
                    "the old VIP dns is still balanced"
                );
                // And the same reload, without the fault, still applies.
                let changes = lab.try_reload(&new).expect("the reload without a fault");
                assert!(changes.len() >= 4, "{changes:?}");
            }
        }
    }
}
