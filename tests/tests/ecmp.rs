//! Several lb nodes behind an ECMP router: BGP with BFD via BIRD, routes from lb's kernel table
//! (issue 9). Real BIRD on the router and on every node, real `lb run`, real connections.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant, SystemTime};

use lb_tests::ecmp::{
    EcmpLab, EcmpVip, LB_ROUTE_PROTO, ROUTE_TABLE, Recovery, SESSION_TIMEOUT, leftovers,
    status_vip, vip_flows,
};
use lb_tests::load::{Attempt, Load, LoadOptions};
use lb_tests::servers::{TcpLineClient, tcp_requests};

const WEB: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 100);
const API: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 101);
const TIMEOUT: Duration = Duration::from_secs(3);
/// Node failures in the failover test.
const FAILURES: usize = 10;
/// Long-lived connections kept open across all of them.
const LONG_LIVED: usize = 16;
/// A new connection's connect, send and read bound: below the 1 s SYN retransmission, so a SYN
/// lost on a dead node is one failed attempt, not a slow success.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(700);

fn web() -> EcmpVip {
    EcmpVip::new("web", WEB, 80)
}

fn api() -> EcmpVip {
    EcmpVip::new("api", API, 81)
}

/// A lab with both nodes running and announcing every VIP to the router.
fn running_lab(prefix: &str, vips: Vec<EcmpVip>) -> EcmpLab {
    let mut lab = EcmpLab::new(prefix, 2, 3, vips).expect("ECMP lab");
    for node in 0..2 {
        lab.start_node(node)
            .unwrap_or_else(|e| panic!("node {node}: {e:#}"));
    }
    for node in 0..2 {
        lab.wait_for_session(node)
            .unwrap_or_else(|e| panic!("router's session with node {node}: {e:#}"));
    }
    for vip in lab.vips.clone() {
        lab.topo
            .wait_for_router_next_hops(vip.address, &[0, 1], SESSION_TIMEOUT)
            .unwrap_or_else(|e| {
                panic!(
                    "both nodes announce {}: {e:#}\nrouter: {}",
                    vip.address,
                    lab.router_bird.show_route(None, None).unwrap_or_default()
                )
            });
    }
    lab
}

fn health_value(lab: &EcmpLab, node: usize) -> String {
    let path = lab.health_file(node);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("node {node}'s health file {}: {e}", path.display()))
        .trim()
        .to_owned()
}

/// Asserts node `node`'s health file says `expected` within a second: the daemon writes the file
/// right after the route change it follows, so a reader that saw the route may be a few
/// milliseconds early.
fn assert_health_value(lab: &EcmpLab, node: usize, expected: &str) {
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut value = health_value(lab, node);
    while value != expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        value = health_value(lab, node);
    }
    assert_eq!(value, expected, "node {node}'s health file");
}

/// `[vip.health]` checks of `port` from node `node` are refused (an nftables rule in that node's
/// namespace only: the backends are fine, and so is every other node's view of them).
fn block_checks(lab: &EcmpLab, node: usize, port: u16) {
    let namespace = lab.topo.node(node).namespace();
    let port = port.to_string();
    let commands: [&[&str]; 3] = [
        &["add", "table", "inet", "lbtest"],
        &[
            "add",
            "chain",
            "inet",
            "lbtest",
            "out",
            "{ type filter hook output priority 0; }",
        ],
        &[
            "add", "rule", "inet", "lbtest", "out", "tcp", "dport", &port, "reject", "with", "tcp",
            "reset",
        ],
    ];
    for command in commands {
        namespace
            .exec("nft", command)
            .unwrap_or_else(|e| panic!("nft on node {node}: {e:#}"));
    }
}

fn unblock_checks(lab: &EcmpLab, node: usize) {
    lab.topo
        .node(node)
        .namespace()
        .exec("nft", ["delete", "table", "inet", "lbtest"])
        .unwrap_or_else(|e| panic!("nft on node {node}: {e:#}"));
}

fn median(sorted: &[Duration]) -> Duration {
    sorted[sorted.len() / 2]
}

fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 10_000.0).round() / 10.0
}

/// One node failure as the client saw it.
struct Outage {
    victim: usize,
    /// Until the router's route lost the dead node (polled every 20 ms).
    withdrawn: Duration,
    /// Until new connections succeeded again: the start of the first attempt that succeeded after
    /// the last one that failed (zero when none failed).
    recovered: Duration,
    failed: usize,
    attempts: usize,
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn ecmp_spreads_over_both_nodes_and_survives_node_failures_without_breaking_connections() {
    let prefix = "lbecmp";
    {
        let mut lab = running_lab(prefix, vec![web()]);
        let vip = web().socket_address();

        // Every node builds the same ring: equal digests.
        let digests: Vec<String> = (0..2)
            .map(|node| {
                let status = lab.status(node).expect("lb status");
                let web = status_vip(&status, "web").expect("vip web");
                assert_eq!(web["announced"], true, "node {node}: {web}");
                web["ring_digest"]
                    .as_str()
                    .unwrap_or_else(|| panic!("node {node}: no ring_digest in {web}"))
                    .to_owned()
            })
            .collect();
        assert_eq!(digests[0], digests[1], "the nodes' rings differ");
        assert_eq!(digests[0].len(), 16, "{digests:?}");
        for node in 0..2 {
            assert_eq!(
                lab.topo.node_table_routes(node).expect("table 200"),
                ["10.100.0.100"],
                "node {node}'s table {ROUTE_TABLE}"
            );
        }

        let options = LoadOptions {
            period: Duration::from_millis(10),
            workers: 32,
            timeout: CONNECT_TIMEOUT,
            long_lived_period: Duration::from_millis(50),
        };
        let load = Load::start(lab.topo.client(), vip, options).expect("load");
        // Long-lived connections, each remembered with the node the router hashes it to.
        let mut carried_by = BTreeMap::<usize, usize>::new();
        for i in 0..LONG_LIVED {
            let mut client = TcpLineClient::connect(lab.topo.client(), vip, TIMEOUT)
                .unwrap_or_else(|e| panic!("long-lived connection {i}: {e:#}"));
            let backend = client
                .request("hello")
                .unwrap_or_else(|e| panic!("long-lived connection {i}: {e:#}"));
            let port = client.local_address().expect("local address").port();
            let node = lab
                .topo
                .node_for_flow(port, vip)
                .expect("ip route get")
                .unwrap_or_else(|| panic!("the router has no node for port {port}"));
            *carried_by.entry(node).or_default() += 1;
            load.add_long_lived(client, backend);
        }
        let served: BTreeSet<String> = load
            .long_lived()
            .iter()
            .map(|l| l.expected.clone())
            .collect();
        assert_eq!(
            carried_by.len(),
            2,
            "long-lived connections per node: {carried_by:?}"
        );
        assert!(
            served.len() >= 2,
            "{LONG_LIVED} long-lived connections on {served:?}"
        );

        // New connections reach both nodes and every backend.
        let before: Vec<u64> = (0..2)
            .map(|n| vip_flows(&lab.status(n).expect("status"), "web").expect("flows"))
            .collect();
        let since = Instant::now();
        std::thread::sleep(Duration::from_secs(1));
        let first_second = load.new_connections_since(since);
        let after: Vec<u64> = (0..2)
            .map(|n| vip_flows(&lab.status(n).expect("status"), "web").expect("flows"))
            .collect();
        for node in 0..2 {
            assert!(
                after[node] > before[node] + 10,
                "node {node} counted {} -> {} flows: ECMP did not use it",
                before[node],
                after[node]
            );
        }
        let backends: BTreeSet<&str> = first_second.iter().filter_map(Attempt::identity).collect();
        assert_eq!(backends.len(), 3, "new connections reached {backends:?}");
        assert!(
            first_second.iter().all(|a| !a.failed()),
            "before any failure: {:?}",
            first_second.iter().find(|a| a.failed())
        );
        println!(
            "ecmp: {} new connections in 1 s; node flows {before:?} -> {after:?}; \
             {LONG_LIVED} long-lived connections, per node {carried_by:?}, on {served:?}",
            first_second.len()
        );

        let mut outages = Vec::with_capacity(FAILURES);
        let mut revivals = Vec::with_capacity(FAILURES);
        for failure in 0..FAILURES {
            let victim = failure % 2;
            let survivor = 1 - victim;
            let survivor_flows =
                vip_flows(&lab.status(survivor).expect("status"), "web").expect("flows");
            let died = lab.kill_node(victim).expect("kill node");
            let withdrawn = lab
                .topo
                .wait_for_router_next_hops(WEB, &[survivor], Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("failure {failure}: router kept node {victim}: {e:#}"));
            // Long enough for attempts whose SYN went to the dead node to time out, and for a
            // second of traffic after the withdrawal.
            std::thread::sleep(CONNECT_TIMEOUT + Duration::from_secs(1));
            let until = Instant::now();
            let Recovery {
                recovered,
                failed,
                attempts,
            } = Recovery::measure(
                &load.new_connections(),
                died,
                until - CONNECT_TIMEOUT,
                CONNECT_TIMEOUT,
            );
            let after_recovery: Vec<Attempt> = load
                .new_connections_since(died + recovered)
                .into_iter()
                .filter(|a| a.start < until - CONNECT_TIMEOUT)
                .collect();
            assert!(
                after_recovery.iter().all(|a| !a.failed()),
                "failure {failure}: a new connection failed after the recovery: {:?}",
                after_recovery.iter().find(|a| a.failed())
            );
            let survivor_now =
                vip_flows(&lab.status(survivor).expect("status"), "web").expect("flows");
            assert!(
                survivor_now > survivor_flows + 50,
                "failure {failure}: survivor {survivor} counted {survivor_flows} -> {survivor_now}"
            );
            let broken: Vec<usize> = load
                .long_lived()
                .iter()
                .filter(|l| !l.alive() || !l.moved().is_empty())
                .map(|l| l.index)
                .collect();
            assert!(
                broken.is_empty(),
                "failure {failure} (node {victim}): long-lived connections {broken:?} broke or \
                 moved: {:?}",
                load.long_lived()
                    .iter()
                    .filter(|l| broken.contains(&l.index))
                    .map(|l| (l.broken().cloned(), l.moved().len()))
                    .collect::<Vec<_>>()
            );
            println!(
                "failure {failure}: node {victim} died; router withdrew it after {:.0} ms; new \
                 connections succeed again after {:.0} ms ({failed} of {attempts} failed)",
                millis(withdrawn),
                millis(recovered)
            );
            outages.push(Outage {
                victim,
                withdrawn,
                recovered,
                failed,
                attempts,
            });

            // The node comes back (a fresh lb with no flow state, a fresh BIRD) and takes its
            // share again: long-lived connections that the router now hashes to it keep their
            // backend because its ring is the same.
            let revived = lab.revive_node(victim).expect("revive node");
            let since = Instant::now();
            std::thread::sleep(Duration::from_millis(500));
            let returned = vip_flows(&lab.status(victim).expect("status"), "web").expect("flows");
            assert!(
                returned > 0,
                "failure {failure}: the revived node {victim} gets no new flows"
            );
            let failed_after: Vec<Attempt> = load
                .new_connections_since(since)
                .into_iter()
                .filter(Attempt::failed)
                .collect();
            assert!(
                failed_after.is_empty(),
                "failure {failure}: after node {victim} came back: {failed_after:?}"
            );
            println!(
                "  node {victim} back at the router {:.0} ms after its link came up",
                millis(revived)
            );
            revivals.push(revived);
        }

        let records = load.stop();
        let lb_tests::load::LongLivedTally {
            broken,
            moved,
            answers,
        } = records.long_lived_tally();
        let mut recovered: Vec<Duration> = outages.iter().map(|o| o.recovered).collect();
        recovered.sort();
        let mut withdrawn: Vec<Duration> = outages.iter().map(|o| o.withdrawn).collect();
        withdrawn.sort();
        revivals.sort();
        let failed_total: usize = outages.iter().map(|o| o.failed).sum();
        let attempts_total: usize = outages.iter().map(|o| o.attempts).sum();
        println!(
            "ecmp failover over {FAILURES} node failures: new connections succeed again after \
             median {:.0} ms, worst {:.0} ms; router withdrew the dead node after median {:.0} ms, \
             worst {:.0} ms; {failed_total} of {attempts_total} new connections in the windows \
             failed; long-lived connections: {LONG_LIVED} kept across all failures, {broken} \
             broken, {moved} moved, {answers} answers",
            millis(median(&recovered)),
            millis(*recovered.last().expect("failures")),
            millis(median(&withdrawn)),
            millis(*withdrawn.last().expect("failures")),
        );
        let report = serde_json::json!({
            "failures": FAILURES,
            "bfd": "100 ms x 3",
            "new_connection_period_ms": 10,
            "recovered_ms": {
                "median": millis(median(&recovered)),
                "worst": millis(*recovered.last().expect("failures")),
                "each": outages.iter().map(|o| millis(o.recovered)).collect::<Vec<_>>(),
            },
            "router_withdrew_ms": {
                "median": millis(median(&withdrawn)),
                "worst": millis(*withdrawn.last().expect("failures")),
            },
            "revived_at_router_ms": {
                "median": millis(median(&revivals)),
                "worst": millis(*revivals.last().expect("failures")),
            },
            "victims": outages.iter().map(|o| o.victim).collect::<Vec<_>>(),
            "new_connections_failed": failed_total,
            "new_connections_in_windows": attempts_total,
            "long_lived": LONG_LIVED,
            "long_lived_broken": broken,
            "long_lived_moved": moved,
            "long_lived_answers": answers,
        });
        let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
        std::fs::create_dir_all(&target).expect("target directory");
        let path = target.join("ecmp-failover.json");
        std::fs::write(&path, format!("{report:#}\n")).expect("write the report");
        println!("written to {}", path.display());

        assert_eq!(broken, 0, "long-lived connections broke");
        assert_eq!(moved, 0, "long-lived connections changed backend");
        assert!(
            *recovered.last().expect("failures") < Duration::from_secs(2),
            "worst recovery {:?}",
            recovered.last()
        );
        assert!(
            *withdrawn.last().expect("failures") < Duration::from_secs(1),
            "worst withdrawal {:?} (BFD 100 ms x 3)",
            withdrawn.last()
        );
    }
    assert_eq!(leftovers(prefix), Vec::<String>::new());
}

/// Waits (polling every 2 ms) until node `node`'s table 200 has exactly `wanted`; returns when.
fn wait_for_table(lab: &EcmpLab, node: usize, wanted: &[&str]) -> SystemTime {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let routes = lab.topo.node_table_routes(node).expect("table 200");
        if routes == wanted {
            return SystemTime::now();
        }
        assert!(
            Instant::now() < deadline,
            "node {node}'s table {ROUTE_TABLE} is {routes:?}, not {wanted:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_vip_one_node_cannot_serve_is_withdrawn_by_that_node_only_and_the_other_carries_it() {
    let prefix = "lbecmpw";
    {
        let mut lab = running_lab(prefix, vec![web(), api()]);
        for node in 0..2 {
            assert_health_value(&lab, node, "0");
        }

        // Node 0 cannot reach api's port any more (its checks are refused there only).
        let blocked = SystemTime::now();
        block_checks(&lab, 0, 81);
        let removed_at = wait_for_table(&lab, 0, &["10.100.0.100"]);
        let down = lab
            .lb(0)
            .transitions()
            .into_iter()
            .filter(|t| t.vip == "api" && t.to == "down" && t.at >= blocked)
            .map(|t| t.at)
            .max()
            .expect("node 0 logged api's backends going down");
        let route_removed = removed_at.duration_since(down).unwrap_or_default();
        lab.topo
            .wait_for_router_next_hops(API, &[1], Duration::from_secs(2))
            .expect("the router drops node 0 for api only");
        assert_eq!(
            lab.topo.router_next_hops(WEB).expect("route"),
            [lab.topo.node(0).ipv4(), lab.topo.node(1).ipv4()].into(),
            "web stays on both nodes"
        );
        assert_eq!(
            lab.topo.node_table_routes(1).expect("table 200"),
            ["10.100.0.100", "10.100.0.101"],
            "node 1 still announces both"
        );
        let status = lab.status(0).expect("status");
        let api_status = status_vip(&status, "api").expect("api");
        assert_eq!(api_status["announced"], false, "{api_status}");
        assert_eq!(status_vip(&status, "web").expect("web")["announced"], true);
        assert_eq!(status["announce"]["route_table"], ROUTE_TABLE);
        assert_eq!(
            status["announce"]["health_value"], 1,
            "{}",
            status["announce"]
        );
        assert_health_value(&lab, 0, "1");
        assert_health_value(&lab, 1, "0");
        println!(
            "node 0: api's last backend down -> its route gone from table {ROUTE_TABLE} in {:.1} ms; \
             announce: {}",
            millis(route_removed),
            status["announce"]
        );

        // All of api's traffic goes through node 1, and works.
        let flows_before: Vec<u64> = (0..2)
            .map(|n| vip_flows(&lab.status(n).expect("status"), "api").expect("flows"))
            .collect();
        let batch =
            tcp_requests(lab.topo.client(), api().socket_address(), 60, TIMEOUT).expect("client");
        assert!(batch.failures.is_empty(), "{:?}", batch.failures);
        assert_eq!(batch.per_identity.len(), 3, "{:?}", batch.per_identity);
        let flows_after: Vec<u64> = (0..2)
            .map(|n| vip_flows(&lab.status(n).expect("status"), "api").expect("flows"))
            .collect();
        assert_eq!(
            flows_after[0], flows_before[0],
            "node 0 still got api flows"
        );
        assert!(
            flows_after[1] >= flows_before[1] + 60,
            "node 1: {flows_before:?} -> {flows_after:?}"
        );
        // web still uses both.
        let batch =
            tcp_requests(lab.topo.client(), web().socket_address(), 60, TIMEOUT).expect("client");
        assert!(batch.failures.is_empty(), "{:?}", batch.failures);

        // The checks pass again: node 0 announces api again.
        let unblocked = SystemTime::now();
        unblock_checks(&lab, 0);
        let added_at = wait_for_table(&lab, 0, &["10.100.0.100", "10.100.0.101"]);
        let up = lab
            .lb(0)
            .transitions()
            .into_iter()
            .filter(|t| t.vip == "api" && t.to == "up" && t.at >= unblocked)
            .map(|t| t.at)
            .min()
            .expect("node 0 logged api's backends coming up");
        lab.topo
            .wait_for_router_next_hops(API, &[0, 1], SESSION_TIMEOUT)
            .expect("the router has node 0 for api again");
        assert_health_value(&lab, 0, "0");
        println!(
            "node 0: api's first backend up -> its route back in table {ROUTE_TABLE} in {:.1} ms",
            millis(added_at.duration_since(up).unwrap_or_default())
        );
        assert!(
            route_removed < Duration::from_millis(100),
            "route removed {route_removed:?} after the health decision"
        );
    }
    assert_eq!(leftovers(prefix), Vec::<String>::new());
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_node_starting_while_its_backends_fail_announces_nothing_until_they_pass() {
    let prefix = "lbecmps";
    {
        let mut lab = EcmpLab::new(prefix, 2, 3, vec![web()]).expect("ECMP lab");
        lab.start_node(1).expect("node 1");
        lab.wait_for_session(1).expect("session with node 1");
        lab.topo
            .wait_for_router_next_hops(WEB, &[1], SESSION_TIMEOUT)
            .expect("node 1 announces web");

        // Node 0 comes up while it cannot reach web's backends: its first checks fail.
        block_checks(&lab, 0, 80);
        lab.start_node(0).expect("node 0");
        lab.wait_for_session(0).expect("session with node 0");
        // Its BGP session is up, its lb runs, and for a while (more than `rise` intervals, longer
        // than BIRD needs to pass a route on) nothing is announced.
        let watch_until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < watch_until {
            assert_eq!(
                lab.topo.node_table_routes(0).expect("table 200"),
                Vec::<String>::new(),
                "node 0 announced before its backends passed"
            );
            assert_eq!(
                lab.topo.router_next_hops(WEB).expect("route"),
                [lab.topo.node(1).ipv4()].into(),
                "the router learned web from node 0"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let status = lab.status(0).expect("status");
        let web_status = status_vip(&status, "web").expect("web");
        assert_eq!(web_status["announced"], false, "{web_status}");
        assert_health_value(&lab, 0, "1");
        assert!(
            lab.bird(0)
                .prefixes("lb4")
                .expect("BIRD's table")
                .is_empty(),
            "node 0's BIRD learned something"
        );
        // No new connection fails meanwhile: node 1 carries them all.
        let batch =
            tcp_requests(lab.topo.client(), web().socket_address(), 40, TIMEOUT).expect("client");
        assert!(batch.failures.is_empty(), "{:?}", batch.failures);

        // The backends pass from node 0 too: now it announces, and the router uses it.
        unblock_checks(&lab, 0);
        wait_for_table(&lab, 0, &["10.100.0.100"]);
        let took = lab
            .topo
            .wait_for_router_next_hops(WEB, &[0, 1], SESSION_TIMEOUT)
            .expect("node 0 at the router");
        assert_health_value(&lab, 0, "0");
        println!(
            "node 0 announced web once its checks passed; the router had it {:.0} ms after it \
             appeared in table {ROUTE_TABLE} (proto {LB_ROUTE_PROTO})",
            millis(took)
        );
    }
    assert_eq!(leftovers(prefix), Vec::<String>::new());
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn without_announcements_the_router_keeps_sending_to_a_dead_node() {
    let prefix = "lbecmpn";
    {
        // The same nodes, but the router has a static multipath route: nobody tells it that a
        // node is gone.
        let mut lab = EcmpLab::new(prefix, 2, 3, vec![web()]).expect("ECMP lab");
        for node in 0..2 {
            let namespace = lab.topo.node(node).namespace();
            let lb = lb_tests::daemon::LbDaemon::start(
                namespace,
                &lab.lb_config(node),
                lb_tests::daemon::Launch::Nsenter,
            )
            .expect("lb run");
            lab.nodes[node].lb = Some(lb);
        }
        lab.topo
            .router()
            .ip([
                "route",
                "add",
                "10.100.0.100/32",
                "nexthop",
                "via",
                &lab.topo.node(0).ipv4().to_string(),
                "nexthop",
                "via",
                &lab.topo.node(1).ipv4().to_string(),
            ])
            .expect("static multipath route");
        let options = LoadOptions {
            period: Duration::from_millis(10),
            workers: 32,
            timeout: CONNECT_TIMEOUT,
            long_lived_period: Duration::from_millis(50),
        };
        let load = Load::start(lab.topo.client(), web().socket_address(), options).expect("load");
        std::thread::sleep(Duration::from_millis(500));
        let died = lab.kill_node(0).expect("kill node 0");
        std::thread::sleep(Duration::from_secs(3));
        let records = load.stop();
        let late: Vec<&Attempt> = records
            .new_connections
            .iter()
            .filter(|a| a.start >= died + Duration::from_secs(1))
            .filter(|a| a.start + CONNECT_TIMEOUT <= died + Duration::from_secs(3))
            .collect();
        let failed = late.iter().filter(|a| a.failed()).count();
        println!(
            "without announcements: {failed} of {} new connections failed between 1 s and 2.3 s \
             after node 0 died",
            late.len()
        );
        assert!(
            failed * 4 >= late.len(),
            "expected about half to fail: {failed} of {}",
            late.len()
        );
    }
    assert_eq!(leftovers(prefix), Vec::<String>::new());
}
