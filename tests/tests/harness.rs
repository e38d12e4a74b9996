//! Tests of the test harness itself: namespaces, the DSR topology without any load balancer,
//! servers and clients, clean-up. Need root: run with `cargo xtask test` (or
//! `cargo test -p tests --test harness -- --include-ignored` as root).

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use lb_tests::netns::NetNs;
use lb_tests::servers::{
    TcpIdentityServer, TcpLineClient, UdpIdentityServer, tcp_request, tcp_requests, udp_request,
    udp_requests,
};
use lb_tests::topology::{DsrTopology, DsrTopologyOptions, leftovers};

const SERVICE_PORT: u16 = 80;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Long enough for a SYN to a reachable host on a veth bridge, short enough to keep tests quick.
const UNANSWERED_TIMEOUT: Duration = Duration::from_secs(1);

fn build_topology(backend_count: usize) -> DsrTopology {
    let started = Instant::now();
    let topology = DsrTopology::new(backend_count, DsrTopologyOptions::default())
        .expect("building the DSR topology (are we root?)");
    eprintln!(
        "topology {} with {backend_count} backends built in {:?}",
        topology.name_prefix(),
        started.elapsed()
    );
    topology
}

/// Identity servers (TCP and UDP, IPv4 and IPv6 wildcard) on every backend, named `backend<i>`.
fn start_servers(topology: &DsrTopology) -> (Vec<TcpIdentityServer>, Vec<UdpIdentityServer>) {
    let mut tcp_servers = Vec::new();
    let mut udp_servers = Vec::new();
    for index in 0..topology.backend_count() {
        let namespace = topology.backend(index);
        let identity = format!("backend{index}");
        for wildcard in ["0.0.0.0", "::"] {
            let ip: IpAddr = wildcard.parse().expect("wildcard address literal");
            let mut bind = SocketAddr::new(ip, SERVICE_PORT);
            if ip.is_ipv6() {
                // The IPv6 socket would also take IPv4 (dual stack) and clash with the IPv4 one
                // on the same port; use another port for the IPv6 servers.
                bind.set_port(SERVICE_PORT + 1);
            }
            tcp_servers.push(
                TcpIdentityServer::start(namespace, bind, identity.clone()).unwrap_or_else(
                    |error| panic!("tcp server on {bind} in backend {index}: {error:#}"),
                ),
            );
            udp_servers.push(
                UdpIdentityServer::start(namespace, bind, identity.clone()).unwrap_or_else(
                    |error| panic!("udp server on {bind} in backend {index}: {error:#}"),
                ),
            );
        }
    }
    (tcp_servers, udp_servers)
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn client_reaches_lb_and_backends_directly() {
    let topology = build_topology(3);
    let (tcp_servers, udp_servers) = start_servers(&topology);

    for host in topology.hosts() {
        let features = host
            .namespace()
            .exec("ethtool", ["-k", host.interface()])
            .expect("read offload features");
        let features = String::from_utf8_lossy(&features.stdout);
        assert!(
            features.contains("tx-checksumming: off"),
            "tx checksum offload still on in {}: {features}",
            host.namespace().name()
        );
    }

    let lb = topology.lb_host();
    for ipv6 in [false, true] {
        topology
            .client()
            .ping(lb.ip(ipv6), 1, 2)
            .unwrap_or_else(|error| panic!("client cannot ping the lb: {error:#}"));
    }

    for (index, backend) in topology.backend_hosts().iter().enumerate() {
        let expected = format!("backend{index}");
        for (ipv6, port) in [(false, SERVICE_PORT), (true, SERVICE_PORT + 1)] {
            let target = SocketAddr::new(backend.ip(ipv6), port);
            let answer = tcp_request(topology.client(), target, REQUEST_TIMEOUT)
                .unwrap_or_else(|error| panic!("tcp request to {target}: {error:#}"));
            assert_eq!(answer, expected, "tcp answer from {target}");
            let answer = udp_request(topology.client(), target, REQUEST_TIMEOUT)
                .unwrap_or_else(|error| panic!("udp request to {target}: {error:#}"));
            assert_eq!(answer, expected, "udp answer from {target}");
        }
    }

    // Batches: every request answered by the one backend addressed.
    let target = SocketAddr::new(topology.backend_host(1).ip(false), SERVICE_PORT);
    let outcome = tcp_requests(topology.client(), target, 20, REQUEST_TIMEOUT)
        .expect("entering the client namespace");
    assert!(
        outcome.failures.is_empty(),
        "tcp batch failures: {:?}",
        outcome.failures
    );
    assert_eq!(
        outcome.per_identity.get("backend1"),
        Some(&20),
        "{outcome:?}"
    );
    let outcome = udp_requests(topology.client(), target, 20, REQUEST_TIMEOUT)
        .expect("entering the client namespace");
    assert!(
        outcome.failures.is_empty(),
        "udp batch failures: {:?}",
        outcome.failures
    );
    assert_eq!(
        outcome.per_identity.get("backend1"),
        Some(&20),
        "{outcome:?}"
    );

    // Servers counted what they served: backend1's IPv4 TCP server got 1 + 20 connections.
    let backend1_tcp_v4 = tcp_servers
        .iter()
        .find(|server| server.identity() == "backend1" && server.local_address().is_ipv4())
        .expect("backend1 has an IPv4 tcp server");
    assert_eq!(backend1_tcp_v4.accepted(), 21);
    let backend1_udp_v4 = udp_servers
        .iter()
        .find(|server| server.identity() == "backend1" && server.local_address().is_ipv4())
        .expect("backend1 has an IPv4 udp server");
    assert_eq!(backend1_udp_v4.received(), 21);
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn long_lived_tcp_connection_keeps_answering() {
    let topology = build_topology(1);
    let (tcp_servers, _udp_servers) = start_servers(&topology);
    let target = SocketAddr::new(topology.backend_host(0).ip(true), SERVICE_PORT + 1);
    let mut client = TcpLineClient::connect(topology.client(), target, REQUEST_TIMEOUT)
        .unwrap_or_else(|error| panic!("connect to {target}: {error:#}"));
    for round in 0..5 {
        let answer = client
            .request(&format!("line {round}"))
            .unwrap_or_else(|error| panic!("round {round} to {target}: {error:#}"));
        assert_eq!(answer, "backend0");
    }
    let server = tcp_servers
        .iter()
        .find(|server| server.local_address().is_ipv6())
        .expect("an IPv6 tcp server");
    assert_eq!(server.accepted(), 1, "all rounds on one connection");
    assert_eq!(server.replies(), 5);
    assert_eq!(server.active_connections(), 1);
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(2);
    while server.active_connections() != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(server.active_connections(), 0, "server noticed the close");
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn vip_traffic_is_not_answered_without_a_load_balancer() {
    let topology = build_topology(3);
    let (_tcp_servers, _udp_servers) = start_servers(&topology);
    assert_eq!(
        topology
            .lb()
            .sysctl("net.ipv4.ip_forward")
            .expect("read ip_forward"),
        "0",
        "the lb host must not forward by itself"
    );

    // Sanity: each backend serves the VIP locally (it is on its lo).
    let vip_v4 = SocketAddr::new(IpAddr::V4(topology.vip_v4()), SERVICE_PORT);
    let answer = tcp_request(topology.backend(0), vip_v4, REQUEST_TIMEOUT)
        .unwrap_or_else(|error| panic!("backend0 to its own VIP: {error:#}"));
    assert_eq!(answer, "backend0");

    let vip_v6 = SocketAddr::new(IpAddr::V6(topology.vip_v6()), SERVICE_PORT + 1);
    // Each probe waits for its whole timeout: run them side by side.
    std::thread::scope(|scope| {
        for target in [vip_v4, vip_v6] {
            let client = topology.client();
            scope.spawn(move || {
                let started = Instant::now();
                let result = tcp_request(client, target, UNANSWERED_TIMEOUT);
                match result {
                    Ok(answer) => {
                        panic!("tcp to VIP {target} answered without a load balancer: {answer}")
                    }
                    Err(error) => eprintln!(
                        "tcp to {target} failed as expected after {:?}: {error:#}",
                        started.elapsed()
                    ),
                }
            });
            scope.spawn(move || {
                let result = udp_request(client, target, UNANSWERED_TIMEOUT);
                assert!(result.is_err(), "udp to VIP {target} answered: {result:?}");
            });
        }
    });

    // DSR: the backends must not answer ARP (IPv4) or neighbour solicitations (IPv6) for the
    // VIP. Route the VIPs on-link from the client, bypassing the lb: nobody may claim them.
    let client = topology.client();
    for (vip, prefix_len) in [
        (IpAddr::V4(topology.vip_v4()), 32),
        (IpAddr::V6(topology.vip_v6()), 128),
    ] {
        client
            .ip([
                "route",
                "replace",
                &format!("{vip}/{prefix_len}"),
                "dev",
                "eth0",
            ])
            .expect("route the VIP on-link");
    }
    std::thread::scope(|scope| {
        for target in [vip_v4, vip_v6] {
            scope.spawn(move || {
                let result = tcp_request(client, target, UNANSWERED_TIMEOUT);
                assert!(
                    result.is_err(),
                    "a backend claimed VIP {target}: {result:?}"
                );
            });
        }
    });
    for vip in [IpAddr::V4(topology.vip_v4()), IpAddr::V6(topology.vip_v6())] {
        let neighbours = client
            .ip(["neigh", "show", &vip.to_string()])
            .expect("list neighbours");
        let neighbours = String::from_utf8_lossy(&neighbours.stdout);
        assert!(
            !neighbours.contains("lladdr"),
            "VIP {vip} got resolved to a MAC: {neighbours}"
        );
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn nothing_is_left_after_the_topology_drops() {
    let topology = build_topology(3);
    let prefix = topology.name_prefix().to_owned();
    let (tcp_servers, udp_servers) = start_servers(&topology);
    let found = leftovers(&prefix);
    assert_eq!(
        found.len(),
        6,
        "switch, client, lb and 3 backends exist: {found:?}"
    );
    let mut sleeper = Command::new("sleep");
    sleeper.arg("1000");
    let child = topology
        .lb()
        .spawn(&mut sleeper)
        .expect("spawn sleep in the lb namespace");
    let sleeper_pid = child.id();
    // Servers hold sockets in the backends: drop them first, as tests do.
    drop(tcp_servers);
    drop(udp_servers);
    drop(topology);
    assert_eq!(leftovers(&prefix), Vec::<String>::new());
    let status = std::fs::read_to_string(format!("/proc/{sleeper_pid}/status")).unwrap_or_default();
    assert!(
        status.is_empty(),
        "the spawned process still exists: {status}"
    );
    drop(child);
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn nothing_is_left_after_a_panic() {
    let prefix = std::sync::Mutex::new(String::new());
    let result = std::panic::catch_unwind(|| {
        let topology = build_topology(1);
        *prefix.lock().expect("prefix lock") = topology.name_prefix().to_owned();
        panic!("deliberate panic with a live topology");
    });
    assert!(result.is_err(), "the closure panics");
    let prefix = prefix.into_inner().expect("prefix lock");
    assert!(
        !prefix.is_empty(),
        "the topology was built before the panic"
    );
    assert_eq!(leftovers(&prefix), Vec::<String>::new());
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn namespace_guard_runs_code_and_commands_inside() {
    let namespace = NetNs::new("lbt-ns").expect("create a namespace");
    let name = namespace.name().to_owned();
    assert!(
        name.starts_with(&format!("lbt-ns-{}-", std::process::id())),
        "{name}"
    );

    // A thread in the namespace sees its own lo only.
    let own_inode = |path: &str| {
        std::fs::metadata(path).map(|metadata| std::os::unix::fs::MetadataExt::ino(&metadata))
    };
    let host_inode = own_inode("/proc/thread-self/ns/net").expect("host netns inode");
    let inside_inode = namespace
        .run(|| own_inode("/proc/thread-self/ns/net"))
        .expect("namespace inode");
    let expected_inode = own_inode(&format!("/run/netns/{name}")).expect("bind mount inode");
    assert_ne!(host_inode, inside_inode);
    assert_eq!(inside_inode, expected_inode);

    // sysctl written from a thread is what `ip netns exec sysctl` reads.
    namespace
        .set_sysctl("net.ipv4.conf.all.arp_ignore", "1")
        .expect("set sysctl");
    let output = namespace
        .exec("sysctl", ["-n", "net.ipv4.conf.all.arp_ignore"])
        .expect("read sysctl");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "1");

    // Errors name the command and carry stderr.
    let error = namespace
        .exec("ip", ["link", "show", "dev", "does-not-exist"])
        .expect_err("no such device");
    let text = format!("{error:#}");
    assert!(text.contains("ip netns exec"), "{text}");
    assert!(text.contains("does-not-exist"), "{text}");

    // A spawned thread lives in the namespace too.
    let handle = namespace
        .spawn_thread("probe", move || own_inode("/proc/thread-self/ns/net").ok())
        .expect("spawn a namespace thread");
    assert_eq!(handle.join().expect("join the probe"), Some(expected_inode));

    // A spawned process keeps the host's mount namespace and enters only the network namespace.
    let mut readlink = Command::new("readlink");
    readlink.args(["/proc/self/ns/net", "/proc/self/ns/mnt"]);
    readlink.stdout(std::process::Stdio::piped());
    let child = namespace.spawn(&mut readlink).expect("spawn readlink");
    let output = child.wait_with_output().expect("readlink output");
    let text = String::from_utf8_lossy(&output.stdout);
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some(format!("net:[{expected_inode}]").as_str())
    );
    let host_mount = std::fs::read_link("/proc/self/ns/mnt").expect("own mount namespace");
    assert_eq!(lines.next(), Some(host_mount.to_string_lossy().as_ref()));

    drop(namespace);
    assert!(
        !lb_tests::netns::list_namespaces()
            .expect("list")
            .contains(&name),
        "namespace {name} still listed"
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn xdp_pass_on_the_lb_port_keeps_the_lb_reachable() {
    let object = lb::ebpf_object();
    if object.is_empty() {
        assert_eq!(
            std::env::var("AYA_BUILD_SKIP").as_deref(),
            Ok("1"),
            "the embedded eBPF object is empty although AYA_BUILD_SKIP is not set"
        );
        eprintln!("skipped: built with AYA_BUILD_SKIP=1, no eBPF object");
        return;
    }
    let topology = build_topology(1);
    topology
        .attach_xdp_pass_on_lb_port(object, "xdp_pass")
        .unwrap_or_else(|error| panic!("attach xdp_pass: {error:#}"));
    let port_details = topology
        .switch()
        .ip(["-d", "link", "show", "dev", topology.lb_bridge_port()])
        .expect("show the lb port");
    let port_details = String::from_utf8_lossy(&port_details.stdout);
    assert!(
        port_details.contains("xdp"),
        "no XDP on the lb port: {port_details}"
    );
    for ipv6 in [false, true] {
        topology
            .client()
            .ping(topology.lb_host().ip(ipv6), 1, 2)
            .unwrap_or_else(|error| panic!("ping the lb with xdp_pass attached: {error:#}"));
    }
}
