//! End to end: the redirect path. The LB attaches to `eth0` (facing the client) while the backends
//! sit on a second segment behind the LB's `eth1`, so every VIP packet leaves through
//! `XDP_REDIRECT` (the `TX_PORTS` DEVMAP) instead of `XDP_TX`.
//!
//! ```text
//!   client ns                lb ns                         switch ns              backends
//!   eth0 10.120.0.1 ──── eth0 10.120.0.2 (lb XDP)
//!   VIP via .0.2             eth1 10.121.0.2 ──── p-lb1 (xdp_pass) ─┐
//!                            ip_forward 1                    br0 ──┼── p-b11 ── eth0 10.121.0.11
//!                                                                  └── p-b12 ── eth0 10.121.0.12
//! ```
//!
//! Requests: client → LB eth0 → XDP redirect → eth1 → bridge → backend. Replies (direct server
//! return): backend → its default route, the LB host's kernel (ip_forward) → client. The return
//! path is plain routing, not the load balancer.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use aya::programs::XdpMode;
use lb_tests::{
    daemon::{Launch, LbDaemon},
    links::{
        MacAddress, VethEnd, add_address, add_bridge_port, add_host_route, create_bridge,
        create_veth_pair, disable_tx_checksum_offload, set_up, wait_for_bridge_port_forwarding,
        wait_for_carrier,
    },
    netns::{NetNs, unique_name},
    servers::{TcpIdentityServer, tcp_requests},
    topology::leftovers,
    xdp::attach_xdp_program,
};

const PREFIX: &str = "lbredir";
const VIP: Ipv4Addr = Ipv4Addr::new(10, 120, 9, 100);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 120, 0, 1);
const LB_FRONT: Ipv4Addr = Ipv4Addr::new(10, 120, 0, 2);
const LB_BACK: Ipv4Addr = Ipv4Addr::new(10, 121, 0, 2);
const BACKENDS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 121, 0, 11), Ipv4Addr::new(10, 121, 0, 12)];
const CONNECTIONS: usize = 100;
const TIMEOUT: Duration = Duration::from_secs(3);
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Every namespace of one run, named `"<prefix>-<pid>-<n>-<role>"`. Fields drop in order, each
/// deleting its namespace (and the veths in it), also when the test panics.
struct Namespaces {
    client: NetNs,
    lb: NetNs,
    switch: NetNs,
    backends: Vec<NetNs>,
}

/// A fresh namespace for IPv4-only traffic: IPv6 off before any interface exists, so no
/// link-local addresses, router solicitations or DAD to wait for.
fn namespace(base: &str, role: &str) -> NetNs {
    let ns = NetNs::with_name(&format!("{base}-{role}"))
        .unwrap_or_else(|e| panic!("namespace {role}: {e:#}"));
    for scope in ["all", "default"] {
        ns.set_sysctl(&format!("net.ipv6.conf.{scope}.disable_ipv6"), "1")
            .expect("disable IPv6");
    }
    ns
}

fn build() -> Namespaces {
    let base = unique_name(PREFIX);
    let client = namespace(&base, "client");
    let lb = namespace(&base, "lb");
    let switch = namespace(&base, "switch");
    let backends: Vec<NetNs> = BACKENDS
        .iter()
        .map(|b| namespace(&base, &format!("b{}", b.octets()[3])))
        .collect();

    // The LB forwards the backends' direct replies to the client (the return path), and must not
    // drop them by reverse-path filtering: their source, the VIP, is not routed via eth1 here.
    // Set before eth0/eth1 exist so they inherit it (namespaces copy the host's IPv4 defaults).
    lb.set_sysctl("net.ipv4.ip_forward", "1")
        .expect("ip_forward");
    for scope in ["all", "default"] {
        lb.set_sysctl(&format!("net.ipv4.conf.{scope}.rp_filter"), "0")
            .expect("rp_filter");
    }

    // Segment 1: client eth0 <-> lb eth0, a plain veth.
    create_veth_pair(
        VethEnd {
            namespace: &client,
            name: "eth0",
            mac: Some(MacAddress::local(0x20, 0x01)),
        },
        VethEnd {
            namespace: &lb,
            name: "eth0",
            mac: Some(MacAddress::local(0x20, 0x02)),
        },
    )
    .expect("client <-> lb veth");
    add_address(&client, "eth0", IpAddr::V4(CLIENT), 24).expect("client address");
    add_address(&lb, "eth0", IpAddr::V4(LB_FRONT), 24).expect("lb eth0 address");

    // Segment 2: a bridge in the switch namespace with the LB's eth1 and the backends.
    create_bridge(&switch, "br0").expect("bridge");
    create_veth_pair(
        VethEnd {
            namespace: &lb,
            name: "eth1",
            mac: Some(MacAddress::local(0x21, 0x02)),
        },
        VethEnd {
            namespace: &switch,
            name: "p-lb1",
            mac: Some(MacAddress::local(0x31, 0x02)),
        },
    )
    .expect("lb eth1 <-> switch veth");
    add_bridge_port(&switch, "br0", "p-lb1").expect("bridge port p-lb1");
    add_address(&lb, "eth1", IpAddr::V4(LB_BACK), 24).expect("lb eth1 address");

    for (ns, &address) in backends.iter().zip(&BACKENDS) {
        let host = address.octets()[3];
        let port = format!("p-b{host}");
        create_veth_pair(
            VethEnd {
                namespace: &switch,
                name: &port,
                mac: Some(MacAddress::local(0x31, host)),
            },
            VethEnd {
                namespace: ns,
                name: "eth0",
                mac: Some(MacAddress::local(0x21, host)),
            },
        )
        .expect("switch <-> backend veth");
        add_bridge_port(&switch, "br0", &port).expect("bridge port");
        for scope in ["all", "eth0"] {
            // Answer ARP only for eth0's own address, never for the VIP on lo...
            ns.set_sysctl(&format!("net.ipv4.conf.{scope}.arp_ignore"), "1")
                .expect("arp_ignore");
            // ...and never use the VIP as the source of our own ARP requests.
            ns.set_sysctl(&format!("net.ipv4.conf.{scope}.arp_announce"), "2")
                .expect("arp_announce");
        }
        add_address(ns, "eth0", IpAddr::V4(address), 24).expect("backend address");
        add_address(ns, "lo", IpAddr::V4(VIP), 32).expect("VIP on lo");
        disable_tx_checksum_offload(ns, "eth0").expect("backend tx offload off");
        set_up(ns, "eth0").expect("backend eth0 up");
        ns.ip(["route", "add", "default", "via", &LB_BACK.to_string()])
            .expect("backend default route via the LB");
    }

    // DESIGN §5 trap 2: senders finish their checksums themselves.
    disable_tx_checksum_offload(&client, "eth0").expect("client tx offload off");
    for interface in ["eth0", "eth1"] {
        disable_tx_checksum_offload(&lb, interface).expect("lb tx offload off");
    }
    set_up(&client, "eth0").expect("client eth0 up");
    set_up(&lb, "eth0").expect("lb eth0 up");
    set_up(&lb, "eth1").expect("lb eth1 up");
    add_host_route(&client, IpAddr::V4(VIP), IpAddr::V4(LB_FRONT)).expect("client VIP route");

    wait_for_carrier(&client, "eth0", READY_TIMEOUT).expect("client carrier");
    wait_for_carrier(&lb, "eth0", READY_TIMEOUT).expect("lb eth0 carrier");
    wait_for_carrier(&lb, "eth1", READY_TIMEOUT).expect("lb eth1 carrier");
    wait_for_bridge_port_forwarding(&switch, "p-lb1", READY_TIMEOUT).expect("p-lb1 forwarding");
    for (ns, address) in backends.iter().zip(&BACKENDS) {
        wait_for_carrier(ns, "eth0", READY_TIMEOUT).expect("backend carrier");
        let port = format!("p-b{}", address.octets()[3]);
        wait_for_bridge_port_forwarding(&switch, &port, READY_TIMEOUT).expect("port forwarding");
    }

    Namespaces {
        client,
        lb,
        switch,
        backends,
    }
}

fn config() -> String {
    let backends: String = BACKENDS
        .iter()
        .map(|b| format!("[[vip.backend]]\naddress = \"{b}\"\n"))
        .collect();
    format!(
        r#"interface = "eth0"
xdp_mode = "native"
flow_table_size = 4096
max_vips = 2

[[vip]]
name = "web"
address = "{VIP}"
port = 80
protocol = "tcp"
{backends}"#
    )
}

/// Interface statistics and neighbours of the LB, printed when an assertion is about to fail.
fn diagnostics(ns: &Namespaces) -> String {
    let mut text = String::new();
    let mut add = |title: &str, namespace: &NetNs, args: &[&str]| {
        let out = namespace
            .ip(args)
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| format!("{e:#}"));
        text.push_str(&format!("--- {title}\n{out}"));
    };
    add("lb ip -s link", &ns.lb, &["-s", "link"]);
    add("lb ip neigh", &ns.lb, &["neigh"]);
    add("switch ip -s link", &ns.switch, &["-s", "link"]);
    for backend in &ns.backends {
        add(
            "backend ip -s link",
            backend,
            &["-s", "link", "show", "eth0"],
        );
    }
    text
}

/// `text` without ANSI escape sequences (`ESC [ ... letter`): `lb` colours its log even when
/// stderr is a pipe, which splits `via="redirect"` into `via`, colour codes, `="redirect"`.
fn strip_ansi(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

/// The daemon's `backend reachable` log line for each of [`BACKENDS`], waiting for them (a
/// backend that did not resolve before the attach is retried in the background).
fn reachable_lines(daemon: &LbDaemon) -> Vec<String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let log = strip_ansi(&daemon.log());
        let lines: Vec<Option<String>> = BACKENDS
            .iter()
            .map(|address| {
                let field = format!("backend={address}");
                log.lines()
                    .find(|l| {
                        l.contains("backend reachable at")
                            && l.split_whitespace().any(|word| word == field)
                    })
                    .map(str::to_owned)
            })
            .collect();
        if lines.iter().all(Option::is_some) {
            return lines.into_iter().flatten().collect();
        }
        assert!(
            Instant::now() < deadline,
            "not every backend became reachable within {READY_TIMEOUT:?}; lb's log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn backends_behind_another_interface_are_reached_by_redirect() {
    {
        let ns = build();
        // DESIGN §5 trap 1: frames redirected into the LB's eth1 only come out of its peer when
        // the peer runs an XDP program. Declared after `ns`, so it detaches before they go.
        let _xdp_pass = attach_xdp_program(
            &ns.switch,
            "p-lb1",
            lb::ebpf_object(),
            "xdp_pass",
            XdpMode::Driver,
        )
        .expect("xdp_pass on the bridge side of the LB's eth1");

        let servers: Vec<TcpIdentityServer> = ns
            .backends
            .iter()
            .zip(&BACKENDS)
            .map(|(backend, address)| {
                TcpIdentityServer::start(
                    backend,
                    "0.0.0.0:80".parse().expect("bind address"),
                    address.to_string(),
                )
                .expect("tcp server")
            })
            .collect();

        let daemon = LbDaemon::start(&ns.lb, &config(), Launch::Nsenter).expect("lb run");
        // Both backends resolved, each through eth1 (not the attached eth0): redirect.
        let lines = reachable_lines(&daemon);
        for (address, line) in BACKENDS.iter().zip(&lines) {
            assert!(
                line.contains("via=\"redirect\""),
                "{address} is not reached by redirect: {line}"
            );
        }

        let vip = SocketAddr::new(IpAddr::V4(VIP), 80);
        // One connection first: if the path is broken, fail after one timeout, not a hundred.
        let mut outcome = tcp_requests(&ns.client, vip, 1, TIMEOUT).expect("client");
        if outcome.failures.is_empty() {
            let rest = tcp_requests(&ns.client, vip, CONNECTIONS - 1, TIMEOUT).expect("client");
            for (identity, count) in rest.per_identity {
                *outcome.per_identity.entry(identity).or_default() += count;
            }
            outcome.failures.extend(rest.failures);
        }
        if !outcome.failures.is_empty() {
            eprintln!("{}", diagnostics(&ns));
        }
        assert!(
            outcome.failures.is_empty(),
            "connections failed ({} answered): {:?}",
            outcome.answered(),
            outcome.failures
        );
        assert_eq!(
            outcome.answered(),
            CONNECTIONS as u64,
            "answers: {:?}",
            outcome.per_identity
        );
        for address in BACKENDS {
            let got = outcome
                .per_identity
                .get(&address.to_string())
                .copied()
                .unwrap_or(0);
            assert!(
                got > 0,
                "backend {address} got no connection: {:?}",
                outcome.per_identity
            );
        }

        let counters = daemon.stop().expect("lb stops cleanly on SIGTERM");
        eprintln!("final counters: {counters:?}");
        for (server, address) in servers.iter().zip(&BACKENDS) {
            let address = address.to_string();
            assert_eq!(
                counters.new_flows("web", &address),
                outcome.per_identity[&address],
                "LB new flows vs connections answered by {address}: {counters:?}"
            );
            // Accepts also include the LB's TCP health checks, which do not cross XDP.
            assert!(
                server.accepted() >= outcome.per_identity[&address],
                "{address}: accepted fewer than answered"
            );
        }
        let (vip_packets, _, vip_new_flows) = counters.vips["web"];
        assert_eq!(vip_new_flows, CONNECTIONS as u64, "web new flows");
        assert_eq!(
            counters.reasons.get("redirect").copied(),
            Some(vip_packets),
            "every VIP packet must leave by redirect: {counters:?}"
        );
        assert_eq!(
            counters.reasons.get("tx").copied().unwrap_or(0),
            0,
            "no VIP packet may leave by XDP_TX: {counters:?}"
        );
        assert_eq!(
            counters
                .reasons
                .get("drop_redirect_failed")
                .copied()
                .unwrap_or(0),
            0,
            "redirects refused: {counters:?}"
        );
    }
    assert_eq!(
        leftovers(PREFIX),
        Vec::<String>::new(),
        "namespaces or links left behind"
    );
}
