//! Route health injection and keepalived's health file on one node, with the real daemon in a
//! namespace: nothing is announced before the first health results pass, the VIP's route comes
//! and goes with what the node can serve (timed), nobody else's route in the table is touched,
//! a reload that moves the address moves the route, routes stay while the daemon is stopped or
//! restarting, and `lb detach` withdraws them.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::{
    daemon::{Launch, LbDaemon, api_socket_for, lb_detach, lb_status},
    netns::NetNs,
    servers::TcpIdentityServer,
    topology::leftovers,
    web_lab::WebLab,
};

const TABLE: &str = "200";
/// Somebody else's route in lb's table: it must survive everything lb does.
const FOREIGN: &str = "192.0.2.1 dev eth0 proto static scope link";
const HEALTH: &str = "interval = \"100ms\"\ntimeout = \"100ms\"\nfall = 2\nrise = 2";

/// `ip route show table 200` in `ns`, one route a line.
fn table(ns: &NetNs) -> Vec<String> {
    table_of(ns.name())
}

fn table_of(ns_name: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["-n", ns_name, "route", "show", "table", TABLE])
        .output()
        .expect("ip route show");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_owned())
        .collect()
}

fn lb_route(vip: &str) -> String {
    format!("{vip} dev eth0 proto 76 scope link")
}

/// Waits until `table` holds exactly `routes` (besides the foreign one); returns how long it took.
fn wait_for_table(ns: &NetNs, routes: &[String], timeout: Duration) -> Duration {
    let start = Instant::now();
    let mut wanted: Vec<String> = routes.to_vec();
    wanted.push(FOREIGN.to_owned());
    wanted.sort();
    loop {
        let mut now = table(ns);
        now.sort();
        if now == wanted {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "table {TABLE} is {now:?} after {timeout:?}, expected {wanted:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn health_value(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Waits (briefly: the file follows the routes in the same update) until the file says `value`.
fn wait_for_health_value(path: &Path, value: &str) {
    let start = Instant::now();
    while health_value(path) != value {
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "{} says {:?}, expected {value:?}",
            path.display(),
            health_value(path)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn status(ns: &NetNs) -> serde_json::Value {
    lb_status(&api_socket_for(ns)).unwrap_or_else(|e| panic!("{e:#}"))
}

fn start_servers(lab: &WebLab) -> Vec<TcpIdentityServer> {
    (0..2)
        .map(|i| {
            TcpIdentityServer::start(
                lab.topo.backend(i),
                "0.0.0.0:80".parse().unwrap(),
                lab.address(i),
            )
            .expect("identity server")
        })
        .collect()
}

/// The `route_update_us` of every announcement log line (health decision to kernel table).
fn route_update_times(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| {
            l.contains("announce: ") && (l.contains(" announced (") || l.contains(" withdrawn ("))
        })
        .filter_map(|l| {
            let field = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("route_update_us="))?;
            field.parse().ok()
        })
        .collect()
}

/// Runs `lb detach` when the test ends, also on a panic after a daemon stopped and left its
/// program and pins behind for the next one.
struct DetachOnDrop(PathBuf);

impl Drop for DetachOnDrop {
    fn drop(&mut self) {
        let _ = lb_detach(&self.0, "eth0");
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn routes_and_health_file_follow_what_the_node_can_serve() {
    let prefix = "lban";
    {
        let mut lab = WebLab::new(prefix, 2);
        let lb = lab.topo.lb();
        let _detach = DetachOnDrop(lb.path());
        lb.exec(
            "ip",
            [
                "route",
                "add",
                "192.0.2.1/32",
                "dev",
                "eth0",
                "table",
                TABLE,
                "proto",
                "static",
            ],
        )
        .expect("foreign route");
        let health_file: PathBuf = std::env::temp_dir().join(format!("{}-health", lb.name()));
        let _ = std::fs::remove_file(&health_file);
        let announce = format!(
            "[announce]\nroute_table = {TABLE}\nhealth_file = \"{}\"",
            health_file.display()
        );
        let config = lab.config_all(&announce, HEALTH);
        let vip = lab.topo.vip_v4().to_string();

        // The backends' servers are down when the node starts: their first checks fail.
        lab.servers.clear();
        let daemon = LbDaemon::start(lb, &config, Launch::Nsenter).expect("lb starts");
        assert_eq!(
            health_value(&health_file),
            "1\n",
            "one VIP, and it cannot serve"
        );
        let watch = Instant::now();
        while watch.elapsed() < Duration::from_millis(600) {
            assert_eq!(
                table(lb),
                [FOREIGN],
                "announced before any backend passed a check"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let report = status(lb);
        assert_eq!(report["vips"][0]["announced"], false, "{report}");
        assert_eq!(report["announce"]["ready"], true);
        assert_eq!(report["announce"]["health_value"], 1);
        assert_eq!(
            report["announce"]["addresses"][0]["reason"],
            "vip web: no backend takes new flows (2 configured, on_all_down = \"drop\")"
        );

        // The backends come up: after `rise` passes the address is announced.
        let servers = start_servers(&lab);
        let took = wait_for_table(lb, &[lb_route(&vip)], Duration::from_secs(3));
        wait_for_health_value(&health_file, "0\n");
        let report = status(lb);
        assert_eq!(report["vips"][0]["announced"], true, "{report}");
        let digest = report["vips"][0]["ring_digest"]
            .as_str()
            .expect("ring_digest");
        assert!(
            digest.len() == 16 && digest.chars().all(|c| c.is_ascii_hexdigit()),
            "{digest}"
        );
        println!("announce: route added {took:?} after the servers started (rise 2 x 100ms)");

        // One backend dies: the VIP still serves. Both die: withdrawn within the detection
        // bound (interval x fall + interval = 300 ms) plus scheduling slack.
        drop(servers);
        let took = wait_for_table(lb, &[], Duration::from_secs(2));
        wait_for_health_value(&health_file, "1\n");
        println!("announce: route withdrawn {took:?} after both servers died");
        assert!(
            took < Duration::from_millis(1000),
            "withdrawal took {took:?}"
        );

        // Back again, then a reload moves the VIP to another address: the old route goes,
        // the new one comes.
        let _servers = start_servers(&lab);
        wait_for_table(lb, &[lb_route(&vip)], Duration::from_secs(3));
        let moved = config.replace(
            &format!("address = \"{vip}\""),
            "address = \"10.100.0.101\"",
        );
        daemon.rewrite_config(lb, &moved).expect("rewrite config");
        daemon.signal(libc::SIGHUP);
        wait_for_table(lb, &[lb_route("10.100.0.101")], Duration::from_secs(3));

        // Stopped, the data plane forwards on: the route stays. A restarted daemon adopts and
        // keeps it throughout its start-up.
        let (_, log) = daemon.stop_leaving_attached().expect("lb stops");
        let times = route_update_times(&log);
        assert!(times.len() >= 4, "announcement lines in the log:\n{log}");
        assert!(
            times.iter().all(|&us| us < 100_000),
            "health decision to route change took {times:?} us (limit 100 ms)"
        );
        println!("announce: health decision to kernel table {times:?} us");
        assert_eq!(table(lb), [lb_route("10.100.0.101"), FOREIGN.to_owned()]);
        assert_eq!(health_value(&health_file), "0\n");
        let watcher = {
            let lb_name = lb.name().to_owned();
            let route = lb_route("10.100.0.101");
            std::thread::spawn(move || {
                let start = Instant::now();
                let mut missing = 0;
                while start.elapsed() < Duration::from_secs(3) {
                    if !table_of(&lb_name).contains(&route) {
                        missing += 1;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                missing
            })
        };
        let second = LbDaemon::start(lb, &moved, Launch::Nsenter).expect("lb restarts");
        assert_eq!(
            watcher.join().expect("watcher"),
            0,
            "the route went away during the restart"
        );
        assert_eq!(table(lb), [lb_route("10.100.0.101"), FOREIGN.to_owned()]);

        // lb detach withdraws lb's routes and nobody else's.
        let (_, _) = second.stop_leaving_attached().expect("lb stops");
        let report = lb_detach(&lb.path(), "eth0").expect("lb detach");
        assert!(
            report.contains("withdrew route 10.100.0.101/32 dev #")
                && report.contains("table 200 proto 76"),
            "{report}"
        );
        assert_eq!(table(lb), [FOREIGN]);
        let _ = std::fs::remove_file(&health_file);
    }
    assert_eq!(leftovers(prefix), Vec::<String>::new());
}
