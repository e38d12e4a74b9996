//! End to end: the real `lb` binary in a namespace topology (client, LB, three backends on a
//! bridge), real TCP and UDP servers with the VIP on their loopback, real connections.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use lb_tests::{
    daemon::{Launch, LbDaemon, lb_detach},
    servers::{TcpIdentityServer, UdpIdentityServer, tcp_request, tcp_requests, udp_requests},
    topology::{DsrTopology, DsrTopologyOptions, LB_NETNS_PINS, leftovers},
};

const TIMEOUT: Duration = Duration::from_secs(3);

/// `xdp_mode`: "native" exercises the driver path (with XDP_PASS on the bridge port and tx
/// checksum offload off on the senders, as DESIGN.md §5 requires); "auto" takes generic XDP on a
/// veth, which needs neither.
fn config(topology: &DsrTopology, xdp_mode: &str) -> String {
    let backends_v4: String = topology
        .backend_hosts()
        .iter()
        .map(|h| format!("[[vip.backend]]\naddress = \"{}\"\n", h.ipv4()))
        .collect();
    let backends_v6: String = topology
        .backend_hosts()
        .iter()
        .map(|h| format!("[[vip.backend]]\naddress = \"{}\"\n", h.ipv6()))
        .collect();
    format!(
        r#"interface = "eth0"
xdp_mode = "{xdp_mode}"
flow_table_size = 65536
max_vips = 4

[[vip]]
name = "web"
address = "{v4}"
port = 80
protocol = "tcp"
{backends_v4}
[[vip]]
name = "web6"
address = "{v6}"
port = 443
protocol = "tcp"
{backends_v6}
[[vip]]
name = "dns"
address = "{v4}"
port = 53
protocol = "udp"
{backends_v4}"#,
        v4 = topology.vip_v4(),
        v6 = topology.vip_v6(),
    )
}

struct Lab {
    topology: DsrTopology,
    tcp: Vec<TcpIdentityServer>,
    tcp6: Vec<TcpIdentityServer>,
    udp: Vec<UdpIdentityServer>,
}

fn lab(prefix: &str) -> Lab {
    let options = DsrTopologyOptions {
        name_prefix: prefix.to_owned(),
        ..Default::default()
    };
    let topology = DsrTopology::new(3, options).expect("building the namespace topology");
    topology
        .attach_xdp_pass_on_lb_port(lb::ebpf_object(), "xdp_pass")
        .expect("XDP_PASS on the LB's bridge port (DESIGN.md §5 trap 1)");
    let mut tcp = Vec::new();
    let mut tcp6 = Vec::new();
    let mut udp = Vec::new();
    for (i, host) in topology.backend_hosts().iter().enumerate() {
        let ns = topology.backend(i);
        let id = host.ipv4().to_string();
        tcp.push(
            TcpIdentityServer::start(ns, "0.0.0.0:80".parse().unwrap(), &id).expect("tcp server"),
        );
        tcp6.push(
            TcpIdentityServer::start(ns, "[::]:443".parse().unwrap(), host.ipv6().to_string())
                .expect("tcp6 server"),
        );
        // Bound to the VIP: a UDP reply must come from the address the client sent to, and a
        // wildcard socket would answer from the backend's own address (DSR services do the same).
        let vip = SocketAddr::new(IpAddr::V4(topology.vip_v4()), 53);
        udp.push(UdpIdentityServer::start(ns, vip, &id).expect("udp server"));
    }
    Lab {
        topology,
        tcp,
        tcp6,
        udp,
    }
}

fn xdp_attached(topology: &DsrTopology) -> bool {
    let out = topology
        .lb()
        .ip(["-d", "link", "show", "dev", "eth0"])
        .expect("ip link show");
    String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn tcp_connections_spread_over_all_backends_and_the_host_is_untouched() {
    let prefix = "lbe2e4";
    {
        let lab = lab(prefix);
        let topo = &lab.topology;
        // The LB host's own service, on its own address.
        let own = TcpIdentityServer::start(
            topo.lb(),
            SocketAddr::new(IpAddr::V4(topo.lb_host().ipv4()), 8080),
            "lb-host",
        )
        .expect("lb host service");

        let daemon =
            LbDaemon::start(topo.lb(), &config(topo, "native"), Launch::Nsenter).expect("lb run");
        assert!(
            daemon.log().contains("in native mode"),
            "xdp_mode = native: {}",
            daemon.log()
        );
        assert!(
            xdp_attached(topo),
            "no XDP program on the LB's eth0 while lb runs"
        );

        let vip = SocketAddr::new(IpAddr::V4(topo.vip_v4()), 80);
        let outcome = tcp_requests(topo.client(), vip, 300, TIMEOUT).expect("client");
        assert!(
            outcome.failures.is_empty(),
            "failed connections: {:?}",
            outcome.failures
        );
        assert_eq!(
            outcome.answered(),
            300,
            "answers: {:?}",
            outcome.per_identity
        );
        assert_eq!(
            outcome.per_identity.len(),
            3,
            "backends reached: {:?}",
            outcome.per_identity
        );
        for (backend, &n) in &outcome.per_identity {
            assert!(
                n * 100 <= 45 * 300,
                "{backend} got {n} of 300 (> 45%): {:?}",
                outcome.per_identity
            );
        }

        // The host's own traffic while attached: ping (v4 and v6) and its TCP service.
        topo.client()
            .ping(IpAddr::V4(topo.lb_host().ipv4()), 2, 3)
            .expect("ping the LB host");
        topo.client()
            .ping(IpAddr::V6(topo.lb_host().ipv6()), 2, 3)
            .expect("ping6 the LB host");
        let reply = tcp_request(topo.client(), own.local_address(), TIMEOUT)
            .expect("LB host's own TCP service");
        assert_eq!(reply, "lb-host");

        // SIGTERM leaves the data plane forwarding on its last state, and says so; `lb detach`
        // then removes program, link and pins.
        let (counters, log) = daemon
            .stop_leaving_attached()
            .expect("lb stops cleanly on SIGTERM");
        assert!(
            xdp_attached(topo),
            "SIGTERM must leave the program attached"
        );
        assert!(
            log.contains("leaving the XDP program on eth0 forwarding with the last state"),
            "the log must say the program stays: {log}"
        );
        let after = tcp_requests(topo.client(), vip, 30, TIMEOUT).expect("client");
        assert!(
            after.failures.is_empty() && after.per_identity.len() == 3,
            "no daemon, still balanced: {:?} {:?}",
            after.failures,
            after.per_identity
        );
        let pins = std::path::Path::new(LB_NETNS_PINS).join(topo.lb().name());
        assert!(
            pins.join("eth0/link").exists(),
            "no pinned link in {}",
            pins.display()
        );
        let detached = lb_detach(&topo.lb().path(), "eth0").expect("lb detach");
        assert!(
            detached.starts_with("removed from eth0"),
            "lb detach said: {detached}"
        );
        assert!(
            !xdp_attached(topo),
            "XDP program still attached after lb detach"
        );
        assert!(!pins.exists(), "{} left after lb detach", pins.display());
        assert_eq!(
            lb_detach(&topo.lb().path(), "eth0").expect("a second lb detach"),
            "nothing of lb's on eth0\n"
        );
        // The LB's own counters agree with what the backends answered. (The servers' accept
        // counts also include the LB's TCP health checks, which do not pass through XDP.)
        for (i, server) in lab.tcp.iter().enumerate() {
            let address = topo.backend_host(i).ipv4().to_string();
            assert_eq!(
                counters.new_flows("web", &address),
                outcome.per_identity[&address],
                "LB new flows vs connections answered by {address}: {counters:?}"
            );
            assert!(
                server.accepted() >= outcome.per_identity[&address],
                "{address} accepted fewer than answered"
            );
        }
        assert_eq!(counters.vips["web"].2, 300, "web new flows");
        assert!(
            counters.reasons.get("pass_not_vip").copied().unwrap_or(0) > 0,
            "host traffic counted as passed"
        );
    }
    assert_eq!(
        leftovers(prefix),
        Vec::<String>::new(),
        "namespaces, links or pins left behind"
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn ipv6_tcp_and_udp_vips_work_when_started_with_ip_netns_exec() {
    let prefix = "lbe2e6";
    {
        let lab = lab(prefix);
        let topo = &lab.topology;
        let daemon = LbDaemon::start(topo.lb(), &config(topo, "auto"), Launch::IpNetnsExec)
            .expect("lb run via ip netns exec");
        assert!(
            daemon.log().contains("in skb mode"),
            "auto on a veth takes generic XDP: {}",
            daemon.log()
        );

        let vip6 = SocketAddr::new(IpAddr::V6(topo.vip_v6()), 443);
        let tcp6 = tcp_requests(topo.client(), vip6, 90, TIMEOUT).expect("client v6");
        assert!(
            tcp6.failures.is_empty(),
            "IPv6 failures: {:?}",
            tcp6.failures
        );
        assert_eq!(
            tcp6.per_identity.len(),
            3,
            "IPv6 backends reached: {:?}",
            tcp6.per_identity
        );

        let dns = SocketAddr::new(IpAddr::V4(topo.vip_v4()), 53);
        let udp = udp_requests(topo.client(), dns, 90, TIMEOUT).expect("client udp");
        assert!(udp.failures.is_empty(), "UDP failures: {:?}", udp.failures);
        assert_eq!(
            udp.per_identity.len(),
            3,
            "UDP backends reached: {:?}",
            udp.per_identity
        );

        let counters = daemon.stop().expect("lb stops cleanly");
        let mut lb_seen: BTreeMap<String, u64> = BTreeMap::new();
        for i in 0..lab.tcp6.len() {
            let address = topo.backend_host(i).ipv6().to_string();
            let answered = tcp6.per_identity.get(&address).copied().unwrap_or(0);
            assert_eq!(
                counters.new_flows("web6", &address),
                answered,
                "web6 {address}: {counters:?}"
            );
            lb_seen.insert(address, answered);
        }
        for (i, server) in lab.udp.iter().enumerate() {
            let address = topo.backend_host(i).ipv4().to_string();
            // One datagram per fresh socket: each is one flow and one packet.
            assert_eq!(
                counters.backends[&("dns".to_owned(), address.clone())].0,
                server.received(),
                "dns {address}"
            );
        }
        assert_eq!(lb_seen.values().sum::<u64>(), 90);
    }
    assert_eq!(
        leftovers(prefix),
        Vec::<String>::new(),
        "namespaces or links left behind"
    );
}
