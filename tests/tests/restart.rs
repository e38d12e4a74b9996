//! Hitless restart: `kill -9` of the daemon under load, a new `lb run` adopting the pinned state,
//! and `lb detach` removing everything.

use std::{
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use aya::maps::{HashMap, Map, MapData};
use lb_common::{FlowKey, FlowState};
use lb_tests::{
    daemon::{Launch, LbDaemon, api_socket_for, lb_detach, lb_status},
    servers::{BatchOutcome, TcpLineClient, tcp_requests},
    topology::{DsrTopology, LB_NETNS_PINS, leftovers},
    web_lab::WebLab,
};

const TIMEOUT: Duration = Duration::from_secs(3);

fn status(socket: &Path) -> serde_json::Value {
    lb_status(socket).unwrap_or_else(|e| panic!("{e:#}"))
}

/// (packets, flows) per backend address, and the VIP's new flows.
fn counters(status: &serde_json::Value) -> (Vec<(String, u64, u64)>, u64) {
    let web = &status["vips"][0];
    let backends = web["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| {
            (
                b["address"].as_str().expect("address").to_owned(),
                b["packets"].as_u64().expect("packets"),
                b["flows"].as_u64().expect("flows"),
            )
        })
        .collect();
    (backends, web["flows"].as_u64().expect("vip flows"))
}

/// The flow-table entries, read from the pinned map (as an operator's bpftool would).
fn pinned_flows(pins: &Path) -> Vec<(FlowKey, FlowState)> {
    let data = MapData::from_pin(pins.join("FLOWS")).expect("open the pinned FLOWS");
    let flows: HashMap<MapData, FlowKey, FlowState> =
        HashMap::try_from(Map::LruHashMap(data)).expect("FLOWS is an LRU hash");
    flows.iter().filter_map(Result::ok).collect()
}

fn xdp_attached(topo: &DsrTopology) -> bool {
    let out = topo
        .lb()
        .ip(["-d", "link", "show", "dev", "eth0"])
        .expect("ip link show");
    String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn kill_9_under_load_loses_no_connection_and_a_new_daemon_adopts_the_state() {
    let prefix = "lbrst";
    {
        let lab = WebLab::new(prefix, 3);
        let topo = &lab.topo;
        let config = lab.config_all("", "interval = \"200ms\"\ntimeout = \"200ms\"");
        // The first daemon the way many operators start things, the second with nsenter: both
        // find the same pins.
        let first = LbDaemon::start(topo.lb(), &config, Launch::IpNetnsExec).expect("lb run");
        let socket = api_socket_for(topo.lb());
        let pins = Path::new(LB_NETNS_PINS).join(topo.lb().name()).join("eth0");
        let vip = lab.vip();

        let mut long_lived: Vec<(TcpLineClient, String)> = (0..12)
            .map(|i| {
                let mut c = TcpLineClient::connect(topo.client(), vip, TIMEOUT)
                    .unwrap_or_else(|e| panic!("long-lived connection {i}: {e:#}"));
                let backend = c.request("hello").expect("first answer");
                (c, backend)
            })
            .collect();
        let served: std::collections::BTreeSet<&String> =
            long_lived.iter().map(|(_, b)| b).collect();
        assert!(
            served.len() >= 2,
            "12 connections on one backend: {served:?}"
        );

        let stop = AtomicBool::new(false);
        let (before_kill, flows_before, in_the_gap, load, second) = std::thread::scope(|scope| {
            // New connections all along: before the kill, while no daemon runs, during the
            // adoption and after it.
            let load = scope.spawn(|| {
                let mut total = BatchOutcome::default();
                while !stop.load(Ordering::Relaxed) {
                    let batch = tcp_requests(topo.client(), vip, 5, TIMEOUT).expect("client");
                    for (k, v) in batch.per_identity {
                        *total.per_identity.entry(k).or_default() += v;
                    }
                    total.failures.extend(batch.failures);
                    std::thread::sleep(Duration::from_millis(20));
                }
                total
            });
            std::thread::sleep(Duration::from_millis(500));
            let before_kill = counters(&status(&socket));
            let flows_before = pinned_flows(&pins);
            first.kill().expect("kill -9 lb");
            assert!(xdp_attached(topo), "the program must survive its daemon");

            // No daemon: the data plane keeps balancing on its last state.
            let gap = tcp_requests(topo.client(), vip, 30, TIMEOUT).expect("client");
            assert!(
                gap.failures.is_empty(),
                "without a daemon: {:?}",
                gap.failures
            );
            assert_eq!(gap.per_identity.len(), 3, "{:?}", gap.per_identity);
            std::thread::sleep(Duration::from_millis(300));

            let second =
                LbDaemon::start(topo.lb(), &config, Launch::Nsenter).expect("lb run again");
            std::thread::sleep(Duration::from_millis(700));
            stop.store(true, Ordering::Relaxed);
            let load = load.join().expect("load thread");
            (before_kill, flows_before, gap, load, second)
        });

        assert!(
            load.failures.is_empty(),
            "new connections failed across the restart: {:?}",
            load.failures
        );
        assert_eq!(load.per_identity.len(), 3, "{:?}", load.per_identity);
        println!(
            "restart: {} new connections across kill -9 and adoption ({} more while no daemon \
             ran), 0 failed; {} long-lived connections and {} flow entries kept",
            load.answered(),
            in_the_gap.answered(),
            long_lived.len(),
            flows_before.len()
        );
        let log = second.log();
        assert!(
            log.contains("adopted the pinned state") && log.contains("3 backends (3 up)"),
            "{log}"
        );
        assert!(
            log.contains("took over the running XDP link on eth0"),
            "{log}"
        );
        assert!(
            second.transitions().is_empty(),
            "adopted backends start up, no check result changes that: {:?}",
            second.transitions()
        );

        // Established connections kept their backend through the crash and the adoption.
        for (i, (client, backend)) in long_lived.iter_mut().enumerate() {
            let answer = client
                .request("after the restart")
                .unwrap_or_else(|e| panic!("long-lived connection {i}: {e:#}"));
            assert_eq!(&answer, backend, "long-lived connection {i} moved");
        }

        // The flow table was not flushed: every entry from before the kill is still there,
        // with the same backend.
        let flows_after = pinned_flows(&pins);
        for (key, state) in &flows_before {
            let found = flows_after.iter().find(|(k, _)| k == key);
            assert_eq!(
                found.map(|(_, s)| s.backend),
                Some(state.backend),
                "flow {key:?} lost or moved"
            );
        }
        // TCP connections in unchanged ring slots are not recorded (issue 11): the table holds
        // only changed slots' flows, and what it holds is kept exactly.
        assert_eq!(
            flows_after.len(),
            flows_before.len(),
            "the flow table was not flushed"
        );

        // Counters continue from where they were: nothing reset, and the connections made
        // while no daemon ran were counted.
        let (backends_after, vip_flows_after) = counters(&status(&socket));
        let (backends_before, vip_flows_before) = before_kill;
        for ((address, packets, flows), (_, packets_after, flows_after)) in
            backends_before.iter().zip(&backends_after)
        {
            assert!(
                packets_after >= packets && flows_after >= flows,
                "{address}: packets {packets} -> {packets_after}, flows {flows} -> {flows_after}"
            );
        }
        assert!(
            vip_flows_after >= vip_flows_before + in_the_gap.answered(),
            "vip flows {vip_flows_before} -> {vip_flows_after}, {} made without a daemon",
            in_the_gap.answered()
        );

        // `lb detach` does not pull the program from under a running daemon.
        let refused = lb_detach(&topo.lb().path(), "eth0")
            .expect_err("lb detach while lb runs must fail")
            .to_string();
        assert!(refused.contains("still running on eth0"), "{refused}");
        assert!(xdp_attached(topo));

        drop(long_lived);
        let (_, log) = second.stop_leaving_attached().expect("lb stops");
        assert!(log.contains("leaving the XDP program on eth0"), "{log}");

        // A daemon whose maps would be shaped differently (another flow_table_size) refuses
        // to adopt, says why, and leaves the running program and its flows alone.
        let flows_then = pinned_flows(&pins).len();
        let refused = LbDaemon::start(
            topo.lb(),
            &config.replace("flow_table_size = 65536", "flow_table_size = 4096"),
            Launch::Nsenter,
        )
        .err()
        .expect("a config with another flow_table_size must not adopt the pins")
        .to_string();
        assert!(
            refused.contains("does not match this lb")
                && refused.contains("FLOWS holds 65536 entries, this config needs 4096"),
            "{refused}"
        );
        assert!(xdp_attached(topo), "a refused start must not detach");
        assert_eq!(
            pinned_flows(&pins).len(),
            flows_then,
            "a refused start flushed flows"
        );
        let still = tcp_requests(topo.client(), vip, 10, TIMEOUT).expect("client");
        assert!(still.failures.is_empty(), "{:?}", still.failures);
        let report = lb_detach(&topo.lb().path(), "eth0").expect("lb detach");
        assert!(report.starts_with("removed from eth0"), "{report}");
        assert!(!xdp_attached(topo), "lb detach left the program attached");
        assert!(!pins.exists(), "{} is still there", pins.display());
    }
    assert_eq!(leftovers(prefix), Vec::<String>::new());
}
