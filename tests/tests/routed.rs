//! End to end: backends two routed hops away (client ── r1 ── r2 ── backends, lb beside r1), one
//! VIP per encapsulation and family, decapsulated on every backend by `lb decap`. Real TCP
//! connections from the client, answered by the backends directly (never through lb).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Mutex,
    time::{Duration, Instant},
};

use lb_tests::{
    daemon::{FinalCounters, Launch, LbDaemon, api_socket_for, lb_binary, lb_status},
    leftovers,
    netns::{NetNs, run_checked},
    routed::RoutedTopology,
    servers::{TcpIdentityServer, TcpLineClient, tcp_requests},
};

const PORT: u16 = 80;
const GUE_PORT: u16 = 6080;
const BACKENDS: usize = 3;
const INTERVAL: Duration = Duration::from_millis(100);
const FALL: u32 = 2;
/// `interval × fall + interval`, as the L2 failover tests: from the kill to the change being
/// live.
const BOUND: Duration = INTERVAL.saturating_mul(FALL + 1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const WAIT: Duration = Duration::from_secs(10);

/// (vip name, address, forward): ipip and gue, IPv4 in IPv4, IPv6 in IPv6 and IPv4 in IPv6.
const VIPS: [(&str, &str, &str); 5] = [
    ("ipip4", "10.20.100.1", "ipip"),
    ("gue4", "10.20.100.2", "gue"),
    ("ipip6", "fd20:100::1", "ipip"),
    ("gue6", "fd20:100::2", "gue"),
    ("ipip46", "10.20.100.3", "ipip"),
];

/// One test at a time: the failover timing means something only on a quiet machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn vip_addresses() -> Vec<IpAddr> {
    VIPS.iter()
        .map(|(_, address, _)| address.parse().expect("vip address"))
        .collect()
}

/// `lb decap ARGS` in `namespace`; its stdout.
fn lb_decap(namespace: &NetNs, args: &[&str]) -> String {
    let mut command = namespace.nsenter_command(lb_binary());
    command.arg("decap").args(args);
    let output = run_checked(&mut command).unwrap_or_else(|e| panic!("lb decap {args:?}: {e:#}"));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn config(topology: &RoutedTopology, through_tunnel: bool) -> String {
    let mut text = format!(
        "interface = \"eth0\"\nxdp_mode = \"skb\"\nmax_vips = 8\napi = \"{}\"\n",
        api_socket_for(topology.lb().namespace()).display()
    );
    for (name, address, forward) in VIPS {
        let ipv6_backends = address.contains(':') || name == "ipip46";
        text.push_str(&format!(
            "\n[[vip]]\nname = \"{name}\"\naddress = \"{address}\"\nport = {PORT}\n\
             protocol = \"tcp\"\nforward = \"{forward}\"\n"
        ));
        if forward == "gue" {
            text.push_str(&format!("gue_port = {GUE_PORT}\n"));
        }
        if through_tunnel {
            text.push_str("check_through_tunnel = true\n");
        }
        text.push_str(&format!(
            "[vip.health]\ncheck = \"tcp\"\ninterval = \"{}ms\"\ntimeout = \"{}ms\"\nrise = 1\nfall = {FALL}\n",
            INTERVAL.as_millis(),
            INTERVAL.as_millis()
        ));
        for backend in topology.backends() {
            text.push_str(&format!(
                "[[vip.backend]]\naddress = \"{}\"\n",
                backend.ip(ipv6_backends)
            ));
        }
    }
    text
}

struct Lab {
    // Dropped in this order: daemon, servers, then the namespaces.
    daemon: Option<LbDaemon>,
    servers: Vec<Option<TcpIdentityServer>>,
    topology: RoutedTopology,
}

impl Lab {
    fn new() -> Self {
        Self::with_checks_through_tunnel(false)
    }

    fn with_checks_through_tunnel(through_tunnel: bool) -> Self {
        let topology = RoutedTopology::new(BACKENDS, &vip_addresses()).expect("routed topology");
        let mut decap_args = vec!["--interface", "eth0", "--gue-port", "6080"];
        let vips: Vec<String> = VIPS.iter().map(|(_, a, _)| a.to_string()).collect();
        for vip in &vips {
            decap_args.extend(["--vip", vip.as_str()]);
        }
        for backend in topology.backends() {
            lb_decap(backend.namespace(), &decap_args);
        }
        let servers = (0..BACKENDS)
            .map(|i| Some(Self::server(&topology, i)))
            .collect();
        let daemon = LbDaemon::start(
            topology.lb().namespace(),
            &config(&topology, through_tunnel),
            Launch::Nsenter,
        )
        .expect("lb run");
        let lab = Self {
            daemon: Some(daemon),
            servers,
            topology,
        };
        lab.wait_for_states(|_, _| "up");
        lab
    }

    /// A dual-stack server on port 80 answering with the backend's name.
    fn server(topology: &RoutedTopology, index: usize) -> TcpIdentityServer {
        let bind = SocketAddr::from(([0u16; 8], PORT));
        TcpIdentityServer::start(
            topology.backend(index).namespace(),
            bind,
            format!("b{index}"),
        )
        .unwrap_or_else(|e| panic!("server on backend {index}: {e:#}"))
    }

    fn socket(&self) -> std::path::PathBuf {
        api_socket_for(self.topology.lb().namespace())
    }

    /// Waits until every backend of every VIP has the state `want(vip, backend index)`.
    fn wait_for_states(&self, want: impl Fn(&str, usize) -> &'static str) -> Duration {
        let started = Instant::now();
        loop {
            let status = lb_status(&self.socket()).expect("lb status");
            let mut wrong = Vec::new();
            for vip in status["vips"].as_array().expect("vips") {
                let name = vip["name"].as_str().expect("name");
                for (i, backend) in vip["backends"]
                    .as_array()
                    .expect("backends")
                    .iter()
                    .enumerate()
                {
                    let state = backend["state"].as_str().expect("state");
                    if state != want(name, i) {
                        wrong.push(format!("{name}/{}: {state}", backend["address"]));
                    }
                }
            }
            if wrong.is_empty() {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < WAIT,
                "backends not in the wanted state after {WAIT:?}: {wrong:?}\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn log_tail(&self) -> String {
        let log = self.daemon.as_ref().map(|d| d.log()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn target(&self, vip: &str) -> SocketAddr {
        SocketAddr::new(vip.parse().expect("vip"), PORT)
    }

    /// `count` new connections to `vip`, each answered or not.
    fn connections(&self, vip: &str, count: usize) -> lb_tests::BatchOutcome {
        tcp_requests(
            self.topology.client().namespace(),
            self.target(vip),
            count,
            CONNECT_TIMEOUT,
        )
        .expect("client requests")
    }

    /// Detaches `lb decap` from every backend still running it (its pins would outlive the
    /// namespaces otherwise).
    fn detach_decap(&self) {
        for backend in self.topology.backends() {
            let pins = Path::new("/sys/fs/bpf/lb-decap/netns")
                .join(backend.namespace().name())
                .join("eth0");
            if pins.exists() {
                lb_decap(backend.namespace(), &["--interface", "eth0", "--detach"]);
            }
        }
    }

    fn stop(&mut self) -> FinalCounters {
        self.daemon
            .take()
            .expect("running daemon")
            .stop()
            .expect("lb stops")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.detach_decap();
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn three_hundred_connections_per_mode_are_answered_by_every_routed_backend() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut lab = Lab::new();
    let prefix = lab.topology.name_prefix().to_owned();
    for (name, address, _) in VIPS {
        let outcome = lab.connections(address, 300);
        assert!(
            outcome.failures.is_empty(),
            "{name}: {} of 300 connections failed: {:?}\n{}",
            outcome.failures.len(),
            &outcome.failures[..outcome.failures.len().min(5)],
            lab.log_tail()
        );
        let want: Vec<String> = (0..BACKENDS).map(|i| format!("b{i}")).collect();
        let got: Vec<String> = outcome.per_identity.keys().cloned().collect();
        assert_eq!(got, want, "{name}: answered by {:?}", outcome.per_identity);
    }
    let counters = lab.stop();
    for (name, _, _) in VIPS {
        let flows = counters.vips.get(name).map_or(0, |c| c.2);
        assert_eq!(flows, 300, "{name}: new flows counted by lb");
    }
    // Every backend decapsulated exactly what lb encapsulated to it, per wire form (health
    // checks go to the backend's own address, outside the tunnel).
    for (i, backend) in lab.topology.backends().iter().enumerate() {
        let status = lb_decap(
            backend.namespace(),
            &["--interface", "eth0", "--status", "--json"],
        );
        let status: serde_json::Value =
            serde_json::from_str(&status).unwrap_or_else(|e| panic!("decap status: {e}: {status}"));
        for (reason, forward) in [("decapsulated_ipip", "ipip"), ("decapsulated_gue", "gue")] {
            let sent: u64 = VIPS
                .iter()
                .filter(|(_, _, f)| *f == forward)
                .flat_map(|(name, _, _)| {
                    [backend.ipv4().to_string(), backend.ipv6().to_string()]
                        .map(|address| counters.backends.get(&(name.to_string(), address)))
                })
                .flatten()
                .map(|c| c.0)
                .sum();
            let received = status["counters"][reason]["packets"].as_u64();
            assert!(sent > 0, "backend {i}: lb sent it no {forward} packets");
            assert_eq!(
                received,
                Some(sent),
                "backend {i}: {reason} (lb sent {sent} {forward} packets to it)"
            );
        }
    }
    assert_eq!(
        counters.reasons.get("tx").copied().unwrap_or(0),
        counters.vips.values().map(|c| c.0).sum::<u64>(),
        "every forwarded packet left encapsulated by XDP_TX to r1"
    );
    drop(lab);
    assert_eq!(leftovers(&prefix), Vec::<String>::new(), "namespaces left");
    let pins = lb_tests::bpffs_entries_under(Path::new("/sys/fs/bpf/lb-decap/netns"));
    assert!(
        !pins.iter().any(|p| p.to_string_lossy().contains(&prefix)),
        "lb decap pins left: {pins:?}"
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn path_mtu_discovery_works_through_the_tunnel() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut lab = Lab::new();
    // A request far larger than one segment: its full-sized segments do not fit lb's MTU once
    // encapsulated; lb answers "fragmentation needed" / "packet too big" and the client's TCP
    // sends smaller ones.
    let line = "x".repeat(6000);
    for (name, address, forward) in [VIPS[0], VIPS[1], VIPS[2], VIPS[3]] {
        let mut client =
            TcpLineClient::connect(lab.topology.client().namespace(), lab.target(address), WAIT)
                .unwrap_or_else(|e| panic!("{name}: connect: {e:#}"));
        let answer = client
            .request(&line)
            .unwrap_or_else(|e| panic!("{name}: large request: {e:#}\n{}", lab.log_tail()));
        assert!(answer.starts_with('b'), "{name}: answer {answer:?}");
        // The client's kernel learned the tunnel's MTU for the VIP from lb's answer.
        let overhead = match (address.contains(':'), forward) {
            (false, "ipip") => 20,
            (false, _) => 28,
            (true, "ipip") => 40,
            (true, _) => 48,
        };
        let route = lab
            .topology
            .client()
            .namespace()
            .ip(["route", "get", address])
            .expect("ip route get");
        let route = String::from_utf8_lossy(&route.stdout).into_owned();
        assert!(
            route.contains(&format!("mtu {}", 1500 - overhead)),
            "{name}: the client's route cache for {address} has no mtu {}: {route}",
            1500 - overhead
        );
    }
    let counters = lab.stop();
    let answers = counters.reasons.get("icmp_too_big").copied().unwrap_or(0);
    assert!(answers >= 4, "icmp_too_big answers counted: {answers}");
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_routed_backend_that_dies_is_dropped_within_the_bound_and_returns() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut lab = Lab::new();
    let killed = 1;
    let started = Instant::now();
    lab.servers[killed] = None;
    let detected = lab.wait_for_states(|_, i| if i == killed { "down" } else { "up" });
    assert!(
        detected <= BOUND + Duration::from_millis(100),
        "backend {killed} down after {detected:?} (bound {BOUND:?})\n{}",
        lab.log_tail()
    );
    let mut per_vip: BTreeMap<&str, lb_tests::BatchOutcome> = BTreeMap::new();
    for (name, address, _) in VIPS {
        let outcome = lab.connections(address, 60);
        assert!(
            outcome.failures.is_empty(),
            "{name}: connections failed after the kill was detected: {:?}",
            outcome.failures
        );
        assert!(
            !outcome.per_identity.contains_key(&format!("b{killed}")),
            "{name}: the dead backend answered"
        );
        per_vip.insert(name, outcome);
    }
    lab.servers[killed] = Some(Lab::server(&lab.topology, killed));
    lab.wait_for_states(|_, _| "up");
    for (name, address, _) in VIPS {
        let outcome = lab.connections(address, 60);
        assert!(
            outcome.failures.is_empty(),
            "{name}: {:?}",
            outcome.failures
        );
        assert!(
            outcome.per_identity.contains_key(&format!("b{killed}")),
            "{name}: the restarted backend gets new connections again: {:?}",
            outcome.per_identity
        );
    }
    let elapsed = started.elapsed();
    eprintln!("kill detected in {detected:?}; whole test step {elapsed:?}; {per_vip:?}");
    lab.stop();
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn lb_decap_detach_leaves_nothing_behind() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let lab = Lab::new();
    for backend in lab.topology.backends() {
        lb_decap(backend.namespace(), &["--interface", "eth0", "--detach"]);
        let lo = backend
            .namespace()
            .ip(["-o", "addr", "show", "dev", "lo"])
            .expect("ip addr");
        let lo = String::from_utf8_lossy(&lo.stdout).into_owned();
        for (_, address, _) in VIPS {
            assert!(!lo.contains(address), "{address} still on lo: {lo}");
        }
    }
    // Without decapsulation nothing answers: the test above cannot pass by accident.
    let outcome = lab.connections(VIPS[0].1, 3);
    assert_eq!(
        outcome.answered(),
        0,
        "answers without lb decap: {outcome:?}"
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn check_through_tunnel_takes_down_a_backend_whose_decapsulation_stopped() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let broken = 1;
    for through_tunnel in [false, true] {
        let mut lab = Lab::with_checks_through_tunnel(through_tunnel);
        // Its server still listens, so a check of the backend's own address passes; but it no
        // longer decapsulates, so every connection lb sends it is lost.
        let started = Instant::now();
        lb_decap(
            lab.topology.backend(broken).namespace(),
            &["--interface", "eth0", "--detach"],
        );
        if through_tunnel {
            let detected = lab.wait_for_states(|_, i| if i == broken { "down" } else { "up" });
            assert!(
                detected <= BOUND + Duration::from_millis(300),
                "backend {broken} down after {detected:?} (bound {BOUND:?})\n{}",
                lab.log_tail()
            );
            for (name, address, _) in VIPS {
                let outcome = lab.connections(address, 30);
                assert!(
                    outcome.failures.is_empty(),
                    "{name}: connections failed with the broken backend out: {:?}",
                    outcome.failures
                );
                assert!(!outcome.per_identity.contains_key(&format!("b{broken}")));
            }
        } else {
            // Without the tunnel check the backend stays up and its share of connections fails:
            // what the check is for.
            std::thread::sleep(BOUND * 3);
            let status = lb_status(&lab.socket()).expect("lb status");
            let state = &status["vips"][0]["backends"][broken]["state"];
            assert_eq!(state, "up", "plain checks still pass");
            let outcome = lab.connections(VIPS[0].1, 15);
            assert!(
                !outcome.failures.is_empty(),
                "connections hashed to the broken backend must fail: {outcome:?}"
            );
        }
        eprintln!(
            "through_tunnel = {through_tunnel}: step took {:?}",
            started.elapsed()
        );
        lab.stop();
    }
}
