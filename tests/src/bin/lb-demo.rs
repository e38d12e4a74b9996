//! `cargo xtask demo`: the load balancer on a built-in topology, with real servers and traffic.
//!
//! Builds network namespaces (a bridge "switch", a client, the LB and three backends running TCP
//! servers with the VIP on their loopback), starts `lb run` on the LB's eth0, sends a few hundred
//! connections from the client, and prints what the LB counted beside what the backends saw.
//! Everything is removed on exit, also on Ctrl-C.

use std::{
    net::{IpAddr, SocketAddr},
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use lb_tests::{
    daemon::{Launch, LbDaemon},
    servers::{TcpIdentityServer, tcp_request},
    topology::{DsrTopology, DsrTopologyOptions, leftovers},
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

const REQUESTS: usize = 300;
const PREFIX: &str = "lbdemo";

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
    let result = demo();
    let left = leftovers(PREFIX);
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

fn demo() -> Result<()> {
    let started = Instant::now();
    println!("building the topology: switch (bridge), client, lb, 3 backends ...");
    let options = DsrTopologyOptions {
        name_prefix: PREFIX.to_owned(),
        ..Default::default()
    };
    let topology = DsrTopology::new(3, options).context("building namespaces (are you root?)")?;
    topology
        .attach_xdp_pass_on_lb_port(lb::ebpf_object(), "xdp_pass")
        .context("attaching XDP_PASS on the LB's bridge port")?;
    let servers: Vec<TcpIdentityServer> = topology
        .backend_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            TcpIdentityServer::start(
                topology.backend(i),
                "0.0.0.0:80".parse().expect("addr"),
                host.ipv4().to_string(),
            )
        })
        .collect::<Result<_>>()?;
    let vip = topology.vip_v4();
    for host in topology.hosts() {
        println!(
            "  {:<10} {:<14} {}",
            host.namespace().name().rsplit('-').next().unwrap_or(""),
            host.ipv4(),
            host.mac()
        );
    }
    println!(
        "  VIP {vip}:80/tcp on every backend's lo (ARP for it suppressed), routed by the client via the LB"
    );
    interrupted()?;

    let config = demo_config(&topology);
    println!("\nstarting `lb run` in the LB namespace with:\n{config}");
    let daemon = LbDaemon::start(topology.lb(), &config, Launch::Nsenter)?;
    println!("lb attached after {:.1} s", started.elapsed().as_secs_f64());

    println!("\nsending {REQUESTS} TCP connections from the client to {vip}:80 ...");
    let target = SocketAddr::new(IpAddr::V4(vip), 80);
    let traffic_started = Instant::now();
    let mut failures = Vec::new();
    let mut client_saw = std::collections::BTreeMap::<String, u64>::new();
    for i in 0..REQUESTS {
        interrupted()?;
        match tcp_request(topology.client(), target, Duration::from_secs(2)) {
            Ok(identity) => *client_saw.entry(identity).or_default() += 1,
            Err(e) => failures.push(format!("request {i}: {e:#}")),
        }
    }
    let took = traffic_started.elapsed();
    println!(
        "{} answered, {} failed, in {:.2} s",
        REQUESTS - failures.len(),
        failures.len(),
        took.as_secs_f64()
    );
    for f in failures.iter().take(5) {
        println!("  {f}");
    }

    let counters = daemon.stop()?;
    println!(
        "\n{:<14} {:>12} {:>12} {:>12} {:>14} {:>12}",
        "backend", "lb flows", "lb packets", "lb bytes", "server accepts", "client saw"
    );
    for (i, server) in servers.iter().enumerate() {
        let address = topology.backend_host(i).ipv4().to_string();
        let (packets, bytes, flows) = counters
            .backends
            .get(&("web".to_owned(), address.clone()))
            .copied()
            .unwrap_or_default();
        println!(
            "{address:<14} {flows:>12} {packets:>12} {bytes:>12} {:>14} {:>12}",
            server.accepted(),
            client_saw.get(&address).copied().unwrap_or(0)
        );
    }
    let (packets, bytes, flows) = counters.vips.get("web").copied().unwrap_or_default();
    println!("{:<14} {flows:>12} {packets:>12} {bytes:>12}", "VIP total");
    println!("(lb counts client->VIP packets only: with direct server return, replies bypass it)");
    if !failures.is_empty() {
        bail!("{} of {REQUESTS} connections failed", failures.len());
    }
    Ok(())
}

fn demo_config(topology: &DsrTopology) -> String {
    let mut config = format!(
        "interface = \"eth0\"\nxdp_mode = \"auto\"\nflow_table_size = 65536\nmax_vips = 4\n\n[[vip]]\nname = \"web\"\naddress = \"{}\"\nport = 80\nprotocol = \"tcp\"\n",
        topology.vip_v4()
    );
    for host in topology.backend_hosts() {
        config.push_str(&format!(
            "[[vip.backend]]\naddress = \"{}\"\nweight = 100\n",
            host.ipv4()
        ));
    }
    config
}
