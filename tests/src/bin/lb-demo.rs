//! `cargo xtask demo`: the load balancer on a built-in topology, with real servers and traffic,
//! telling the failover story.
//!
//! Builds network namespaces (a bridge "switch", a client, the LB, three primary backends and one
//! standby running TCP servers with the VIP on their loopback), starts `lb run` on the LB's eth0,
//! and then: spreads connections over the primaries; kills one primary and shows it dropped; kills
//! all primaries and shows the standby serving; restarts them and shows traffic back; kills the
//! daemon itself and shows traffic flowing on while a new daemon adopts the pinned state; prints
//! the LB's own counters (continued across the crash) beside what the backends saw, with the
//! timings. Then two lb nodes behind a router namespace running BIRD: ECMP over both, one node
//! killed under traffic while the other carries on, long-lived connections counted across it.
//! Everything is removed on exit, also on Ctrl-C.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use lb_tests::{
    daemon::{Launch, LbDaemon},
    ecmp::{EcmpLab, EcmpVip, Recovery, SESSION_TIMEOUT, status_vip, vip_flows},
    load::{Attempt, Load, LoadOptions},
    servers::TcpLineClient,
    servers::{TcpIdentityServer, tcp_request},
    topology::{DsrTopology, DsrTopologyOptions},
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted: cleaning up");
    }
    Ok(())
}

const PREFIX: &str = "lbdemo";
const PRIMARIES: usize = 3;
const STANDBY: usize = 3;
const INTERVAL_MS: u64 = 200;
const FALL: u64 = 2;
const RISE: u64 = 2;

fn main() -> ExitCode {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(
                signal,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
    // The single-node story first; its namespaces are gone before the two-node one is built.
    let result = Demo::build()
        .and_then(|mut demo| demo.run())
        .and_then(|()| ecmp_story());
    // Namespaces, links, pins and BIRD processes of both stories.
    let left = lb_tests::ecmp::leftovers(PREFIX);
    if !left.is_empty() {
        eprintln!("warning: left behind: {left:?}");
    }
    match result {
        Ok(()) => {
            println!("\nall namespaces, links and programs removed.");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Demo {
    topology: DsrTopology,
    servers: Vec<Option<TcpIdentityServer>>,
    /// Connections each backend accepted from servers that were stopped since.
    accepted_before: Vec<u64>,
    daemon: Option<LbDaemon>,
    client_saw: BTreeMap<String, u64>,
}

impl Demo {
    fn build() -> Result<Self> {
        println!("building the topology: switch (bridge), client, lb, 3 primaries, 1 standby ...");
        let options = DsrTopologyOptions {
            name_prefix: PREFIX.to_owned(),
            ..Default::default()
        };
        let topology =
            DsrTopology::new(4, options).context("building namespaces (are you root?)")?;
        topology
            .attach_xdp_pass_on_lb_port(lb::ebpf_object(), "xdp_pass")
            .context("attaching XDP_PASS on the LB's bridge port")?;
        let mut demo = Self {
            servers: (0..4).map(|_| None).collect(),
            accepted_before: vec![0; 4],
            topology,
            daemon: None,
            client_saw: BTreeMap::new(),
        };
        for i in 0..4 {
            demo.start_server(i)?;
        }
        for (i, host) in demo.topology.hosts().enumerate() {
            let role = match i {
                0 => "client".to_owned(),
                1 => "lb".to_owned(),
                b if b - 2 == STANDBY => "standby".to_owned(),
                b => format!("primary {}", b - 1),
            };
            println!("  {role:<10} {:<14} {}", host.ipv4(), host.mac());
        }
        println!(
            "  VIP {}:80/tcp on every backend's lo (ARP for it suppressed), routed by the client via the LB",
            demo.topology.vip_v4()
        );
        Ok(demo)
    }

    fn backend_address(&self, i: usize) -> String {
        self.topology.backend_host(i).ipv4().to_string()
    }

    fn start_server(&mut self, i: usize) -> Result<()> {
        let server = TcpIdentityServer::start(
            self.topology.backend(i),
            "0.0.0.0:80".parse().expect("address"),
            self.backend_address(i),
        )?;
        self.servers[i] = Some(server);
        Ok(())
    }

    fn kill_server(&mut self, i: usize) {
        if let Some(server) = self.servers[i].take() {
            self.accepted_before[i] += server.accepted();
        }
    }

    fn config(&self) -> String {
        let mut config = format!(
            "interface = \"eth0\"\nflow_table_size = 65536\nmax_vips = 4\n\n[[vip]]\nname = \"web\"\naddress = \"{}\"\n\
             port = 80\nprotocol = \"tcp\"\nmin_healthy = 1\non_all_down = \"drop\"\n\n[vip.health]\ncheck = \"tcp\"\n\
             interval = \"{INTERVAL_MS}ms\"\ntimeout = \"{INTERVAL_MS}ms\"\nrise = {RISE}\nfall = {FALL}\n",
            self.topology.vip_v4()
        );
        for i in 0..4 {
            config.push_str(&format!(
                "\n[[vip.backend]]\naddress = \"{}\"\n",
                self.backend_address(i)
            ));
            if i == STANDBY {
                config.push_str("standby = true\n");
            }
        }
        config
    }

    fn daemon(&mut self) -> Result<&mut LbDaemon> {
        self.daemon.as_mut().context("lb is not running")
    }

    /// `count` connections from the client; prints how they spread.
    fn traffic(&mut self, count: usize) -> Result<()> {
        let target = SocketAddr::new(IpAddr::V4(self.topology.vip_v4()), 80);
        let mut spread = BTreeMap::<String, u64>::new();
        let mut failures = Vec::new();
        for i in 0..count {
            interrupted()?;
            match tcp_request(self.topology.client(), target, Duration::from_secs(2)) {
                Ok(identity) => *spread.entry(identity).or_default() += 1,
                Err(e) => failures.push(format!("connection {i}: {e:#}")),
            }
        }
        let shown: Vec<String> = spread.iter().map(|(b, n)| format!("{b}: {n}")).collect();
        println!(
            "  {count} connections -> {} ({} failed)",
            shown.join(", "),
            failures.len()
        );
        for f in failures.iter().take(3) {
            println!("    {f}");
        }
        for (backend, n) in spread {
            *self.client_saw.entry(backend).or_default() += n;
        }
        Ok(())
    }

    /// Waits for a daemon log line; returns the time since `since`.
    fn wait_for(&mut self, line: &str, since: Instant) -> Result<Duration> {
        self.daemon()?.wait_for_log(line, Duration::from_secs(10))?;
        Ok(since.elapsed())
    }

    fn run(&mut self) -> Result<()> {
        let config = self.config();
        println!("\nstarting `lb run` in the LB namespace with:\n{config}");
        let started = Instant::now();
        self.daemon = Some(LbDaemon::start(
            self.topology.lb(),
            &config,
            Launch::Nsenter,
        )?);
        println!(
            "lb attached after {:.2} s (first health checks included)",
            started.elapsed().as_secs_f64()
        );
        let bound = Duration::from_millis(INTERVAL_MS * FALL + INTERVAL_MS);
        println!(
            "health: tcp every {INTERVAL_MS} ms, fall {FALL}, rise {RISE}: detection bound {} ms",
            bound.as_millis()
        );

        println!("\n1. traffic spreads over the three primaries; the standby waits");
        self.traffic(150)?;
        interrupted()?;

        let victim = self.backend_address(0);
        println!("\n2. primary {victim} dies (its server stops)");
        let killed = Instant::now();
        self.kill_server(0);
        let took = self.wait_for(&format!("backend {victim} of vip web: up -> down"), killed)?;
        println!(
            "  detected and out of the ring {} ms after it died",
            took.as_millis()
        );
        self.traffic(150)?;
        interrupted()?;

        println!("\n3. the other primaries die too: the standby takes over");
        let killed = Instant::now();
        self.kill_server(1);
        self.kill_server(2);
        let took = self.wait_for("vip web: pool primary -> standby", killed)?;
        println!(
            "  flipped to the standby pool {} ms after they died",
            took.as_millis()
        );
        self.traffic(100)?;
        interrupted()?;

        println!("\n4. the primaries come back: traffic returns to them");
        let restarted = Instant::now();
        for i in 0..PRIMARIES {
            self.start_server(i)?;
        }
        let took = self.wait_for("vip web: pool standby -> primary", restarted)?;
        println!(
            "  back on the primary pool {} ms after they restarted",
            took.as_millis()
        );
        // Let the last primaries pass their `rise` checks too.
        std::thread::sleep(Duration::from_millis(INTERVAL_MS * (RISE + 1)));
        self.traffic(150)?;

        println!("\nthe daemon's log of the story:");
        for line in self.daemon()?.log().lines().filter(|l| l.contains("-> ")) {
            println!("  {line}");
        }
        interrupted()?;

        println!(
            "\n5. the daemon crashes (kill -9): the XDP program keeps forwarding on its pinned maps"
        );
        self.daemon.take().context("lb is not running")?.kill()?;
        self.traffic(100)?;
        println!("  a new `lb run` adopts the maps, flows and counters, and swaps in its program");
        let restarted = Instant::now();
        let daemon = LbDaemon::start(self.topology.lb(), &config, Launch::Nsenter)?;
        println!(
            "  serving again after {:.2} s, with nothing flushed:",
            restarted.elapsed().as_secs_f64()
        );
        for line in daemon.log().lines().filter(|l| {
            l.contains("adopted the pinned state") || l.contains("took over the running XDP link")
        }) {
            println!("  {line}");
        }
        self.daemon = Some(daemon);
        self.traffic(100)?;

        // The counters continued across the crash: the new daemon reports every flow since
        // the first start.
        let counters = self.daemon.take().context("lb is not running")?.stop()?;
        println!(
            "\n{:<14} {:>10} {:>12} {:>12} {:>12}",
            "backend", "lb flows", "lb packets", "lb bytes", "client saw"
        );
        for i in 0..4 {
            let address = self.backend_address(i);
            let (packets, bytes, flows) = counters
                .backends
                .get(&("web".to_owned(), address.clone()))
                .copied()
                .unwrap_or_default();
            let saw = self.client_saw.get(&address).copied().unwrap_or(0);
            println!("{address:<14} {flows:>10} {packets:>12} {bytes:>12} {saw:>12}");
        }
        let (packets, bytes, flows) = counters.vips.get("web").copied().unwrap_or_default();
        println!("{:<14} {flows:>10} {packets:>12} {bytes:>12}", "VIP total");
        println!(
            "(lb counts client->VIP packets only: with direct server return, replies bypass it;"
        );
        println!(" backends also accepted the LB's own TCP health checks, which do not cross XDP)");
        Ok(())
    }
}

/// Long-lived connections kept open across the node failure.
const ECMP_LONG_LIVED: usize = 12;
/// Bound of each new connection in the ECMP story (below TCP's 1 s SYN retransmission).
const ECMP_CONNECT_TIMEOUT: Duration = Duration::from_millis(700);

/// Step 6: two lb nodes behind an ECMP router (BGP with BFD via BIRD); one dies under traffic.
fn ecmp_story() -> Result<()> {
    interrupted()?;
    println!(
        "\n6. no single point of failure: two lb nodes behind a router running BIRD (BGP + BFD \
         100 ms x 3, ECMP with an L4 hash)"
    );
    let vip = EcmpVip::new("web", std::net::Ipv4Addr::new(10, 100, 0, 100), 80);
    let target = vip.socket_address();
    let mut lab = EcmpLab::new(PREFIX, 2, PRIMARIES, vec![vip.clone()])
        .context("building the ECMP namespaces")?;
    println!(
        "  client {} -> router {} -> switch -> lb nodes {}, {} (each: lb run + BIRD, \
         [announce] route_table = 200) and backends {}",
        lb_tests::ecmp::CLIENT_ADDRESS,
        lb_tests::ecmp::ROUTER_ADDRESS,
        lab.topo.node(0).ipv4(),
        lab.topo.node(1).ipv4(),
        lab.topo
            .backends()
            .iter()
            .map(|b| b.ipv4().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let started = Instant::now();
    for node in 0..2 {
        lab.start_node(node)?;
    }
    for node in 0..2 {
        lab.wait_for_session(node)?;
    }
    lab.topo
        .wait_for_router_next_hops(vip.address, &[0, 1], SESSION_TIMEOUT)?;
    println!(
        "  both nodes announce {} after {:.1} s; the router's route:",
        vip.address,
        started.elapsed().as_secs_f64()
    );
    let route = lab
        .topo
        .router()
        .ip(["route", "show", &format!("{}/32", vip.address)])?;
    for line in String::from_utf8_lossy(&route.stdout).lines() {
        println!("    {line}");
    }
    for node in 0..2 {
        let status = lab.status(node)?;
        let web = status_vip(&status, "web")?;
        println!(
            "  node {node}: announced {}, ring digest {}",
            web["announced"], web["ring_digest"]
        );
    }
    interrupted()?;

    let options = LoadOptions {
        period: Duration::from_millis(10),
        workers: 32,
        timeout: ECMP_CONNECT_TIMEOUT,
        long_lived_period: Duration::from_millis(50),
    };
    let load = Load::start(lab.topo.client(), target, options)?;
    let mut per_node = BTreeMap::<usize, usize>::new();
    for i in 0..ECMP_LONG_LIVED {
        let mut client = TcpLineClient::connect(lab.topo.client(), target, Duration::from_secs(3))
            .with_context(|| format!("long-lived connection {i}"))?;
        let backend = client.request("hello")?;
        let port = client.local_address()?.port();
        if let Some(node) = lab.topo.node_for_flow(port, target)? {
            *per_node.entry(node).or_default() += 1;
        }
        load.add_long_lived(client, backend);
    }
    std::thread::sleep(Duration::from_secs(1));
    let flows: Vec<u64> = (0..2)
        .map(|node| vip_flows(&lab.status(node)?, "web"))
        .collect::<Result<_>>()?;
    println!(
        "  a new connection every 10 ms plus {ECMP_LONG_LIVED} long-lived ones (per node: \
         {per_node:?}); new flows so far: node 0 {}, node 1 {}",
        flows[0], flows[1]
    );
    interrupted()?;

    println!("  node 0 dies: cable out, lb and BIRD killed with SIGKILL, its state wiped");
    let died = lab.kill_node(0)?;
    let withdrawn =
        lab.topo
            .wait_for_router_next_hops(vip.address, &[1], Duration::from_secs(5))?;
    std::thread::sleep(ECMP_CONNECT_TIMEOUT + Duration::from_secs(1));
    let until = Instant::now() - ECMP_CONNECT_TIMEOUT;
    let recovery = Recovery::measure(&load.new_connections(), died, until, ECMP_CONNECT_TIMEOUT);
    println!(
        "  BFD noticed and the router withdrew node 0 after {} ms; new connections succeed again \
         after {} ms ({} of {} failed meanwhile: those hashed to the dead node)",
        withdrawn.as_millis(),
        recovery.recovered.as_millis(),
        recovery.failed,
        recovery.attempts
    );
    let survivor = vip_flows(&lab.status(1)?, "web")?;
    println!(
        "  node 1 carries on: {} new flows (was {})",
        survivor, flows[1]
    );
    interrupted()?;

    println!("  node 0 comes back (lb first, then BIRD; it announces after its first checks)");
    let revived = lab.revive_node(0)?;
    let since = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let failed_after = load
        .new_connections_since(since)
        .iter()
        .filter(|a| Attempt::failed(a))
        .count();
    println!(
        "  back at the router {:.1} s after its link came up; new connections since: {} failed",
        revived.as_secs_f64(),
        failed_after
    );
    let records = load.stop();
    let lb_tests::load::LongLivedTally {
        broken,
        moved,
        answers,
    } = records.long_lived_tally();
    println!(
        "  long-lived connections across the failure and the return: {} kept their backend, \
         {broken} broken, {moved} moved ({answers} answers); the nodes' identical rings send a \
         connection to the same backend whichever node the router picks",
        records
            .long_lived
            .iter()
            .filter(|l| l.alive() && l.moved().is_empty())
            .count()
    );
    Ok(())
}
