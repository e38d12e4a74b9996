//! The control API against a running `lb` in a namespace: `lb status`, `lb drain`,
//! `lb disable`, `lb enable`, `lb reload` (and SIGHUP), through the real binary and the daemon's
//! Unix socket.

use std::{collections::BTreeSet, process::Command, time::Duration};

use lb_tests::{
    daemon::{Launch, LbDaemon, api_socket_for, lb_binary},
    servers::{TcpLineClient, tcp_requests},
    topology::{DsrTopology, DsrTopologyOptions, leftovers},
    web_lab::WebLab,
};

const TIMEOUT: Duration = Duration::from_secs(3);
/// Fast checks, so backends are up (and reloaded ones join) quickly.
const HEALTH: &str = "interval = \"200ms\"\ntimeout = \"200ms\"";

fn lb(args: &[&str], socket: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(lb_binary())
        .args(args)
        .arg("--api")
        .arg(socket)
        .output()
        .expect("run lb");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn status(socket: &std::path::Path) -> serde_json::Value {
    let (code, stdout, stderr) = lb(&["status", "--json"], socket);
    assert_eq!(code, 0, "lb status --json: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("status is not JSON ({e}): {stdout}"))
}

fn backend_state(status: &serde_json::Value, address: &str) -> String {
    status["vips"][0]["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .find(|b| b["address"] == address)
        .unwrap_or_else(|| panic!("no backend {address} in {status}"))["state"]
        .as_str()
        .expect("state")
        .to_owned()
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn status_drain_disable_enable_against_a_running_daemon() {
    let prefix = "lbctl";
    {
        let lab = WebLab::new(prefix, 3);
        let topo = &lab.topo;
        let config = lab.config_all("", HEALTH);
        let daemon = LbDaemon::start(topo.lb(), &config, Launch::Nsenter).expect("lb run");
        let socket = api_socket_for(topo.lb());
        let vip = lab.vip();

        // Status: the JSON shape, every backend up, counters that follow traffic.
        let outcome = tcp_requests(topo.client(), vip, 30, TIMEOUT).expect("client");
        assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
        let report = status(&socket);
        let web = &report["vips"][0];
        assert_eq!(
            (
                web["name"].as_str(),
                web["port"].as_u64(),
                web["protocol"].as_str()
            ),
            (Some("web"), Some(80), Some("tcp"))
        );
        assert_eq!(web["address"], topo.vip_v4().to_string());
        assert_eq!(web["active_pool"], "primary");
        let mut flows = 0;
        for b in web["backends"].as_array().expect("backends") {
            for key in [
                "address", "standby", "state", "weight", "packets", "bytes", "flows",
            ] {
                assert!(b.get(key).is_some(), "backend without `{key}`: {b}");
            }
            assert_eq!(b["state"], "up", "{b}");
            assert_eq!(b["weight"], 100);
            flows += b["flows"].as_u64().expect("flows");
        }
        assert_eq!(flows, 30, "flows in status vs connections made");
        let (code, table, _) = lb(&["status"], &socket);
        assert_eq!(code, 0);
        assert!(
            table.contains("web") && table.contains(&topo.backend_host(0).ipv4().to_string()),
            "{table}"
        );

        // Drain the backend of a long-lived connection: it stays, new connections go elsewhere.
        let mut long_lived =
            TcpLineClient::connect(topo.client(), vip, TIMEOUT).expect("long-lived connection");
        let pinned = long_lived.request("hello").expect("first reply");
        let (code, stdout, stderr) = lb(&["drain", "web", &pinned], &socket);
        assert_eq!(code, 0, "drain: {stdout} {stderr}");
        let drained_status = status(&socket);
        assert_eq!(backend_state(&drained_status, &pinned), "draining");
        // Its third of web's ring went to the others: those slots changed (and keep sending the
        // connections that began on it there); the flow table's size is reported too.
        let web = &drained_status["vips"][0];
        let changed = web["ring_slots_changed"]
            .as_u64()
            .unwrap_or_else(|| panic!("no ring_slots_changed in {web}"));
        assert!(
            changed > 15_000,
            "ring_slots_changed {changed} after draining a third"
        );
        assert!(web["flow_table_entries"].as_u64().is_some(), "{web}");
        let after = tcp_requests(topo.client(), vip, 40, TIMEOUT).expect("client");
        assert!(after.failures.is_empty(), "{:?}", after.failures);
        assert!(
            !after.per_identity.contains_key(&pinned),
            "a new connection reached the drained {pinned}: {:?}",
            after.per_identity
        );
        assert_eq!(
            long_lived
                .request("still there?")
                .expect("drained backend keeps its connection"),
            pinned
        );

        // Disable another backend: out of service whatever its health; enable: back.
        let others: BTreeSet<String> = after.per_identity.keys().cloned().collect();
        let disabled = others.iter().next().expect("another backend").clone();
        assert_eq!(lb(&["disable", "web", &disabled], &socket).0, 0);
        assert_eq!(backend_state(&status(&socket), &disabled), "disabled");
        let only = tcp_requests(topo.client(), vip, 20, TIMEOUT).expect("client");
        assert!(only.failures.is_empty(), "{:?}", only.failures);
        assert_eq!(
            only.per_identity.len(),
            1,
            "only the third backend serves: {:?}",
            only.per_identity
        );
        for backend in [&pinned, &disabled] {
            assert_eq!(lb(&["enable", "web", backend], &socket).0, 0);
        }
        let back = tcp_requests(topo.client(), vip, 60, TIMEOUT).expect("client");
        assert_eq!(
            back.per_identity.len(),
            3,
            "all three serve again: {:?}",
            back.per_identity
        );

        // Errors: an unknown VIP or backend is refused with a message and exit 1.
        let (code, _, stderr) = lb(&["drain", "web", "10.9.9.9"], &socket);
        assert_eq!(code, 1);
        assert!(stderr.contains("10.9.9.9"), "{stderr}");
        let (code, _, stderr) = lb(&["drain", "nope", &pinned], &socket);
        assert_eq!(code, 1);
        assert!(stderr.contains("nope"), "{stderr}");
        // A second daemon configured with the same socket still balances, without an API.
        let second_topo = DsrTopology::new(
            1,
            DsrTopologyOptions {
                name_prefix: format!("{prefix}2"),
                ..Default::default()
            },
        )
        .expect("second topology");
        let second_config = format!(
            "api = \"{}\"\ninterface = \"eth0\"\nflow_table_size = 4096\nmax_vips = 1\n",
            socket.display()
        );
        let second = LbDaemon::start(second_topo.lb(), &second_config, Launch::Nsenter)
            .expect("second lb run");
        assert!(
            second
                .log()
                .contains("control API disabled: another lb is already serving"),
            "{}",
            second.log()
        );
        assert_eq!(
            status(&socket)["vips"][0]["name"],
            "web",
            "the first daemon keeps its socket"
        );
        second.stop().expect("second lb stops");
        drop(second_topo);

        drop(long_lived);
        daemon.stop().expect("lb stops");
        assert!(
            !socket.exists(),
            "the control socket is removed when lb exits"
        );
    }
    assert_eq!(leftovers(prefix), Vec::<String>::new());
    assert_eq!(leftovers(&format!("{prefix}2")), Vec::<String>::new());
}

fn backend_addresses(status: &serde_json::Value) -> Vec<String> {
    status["vips"][0]["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| b["address"].as_str().expect("address").to_owned())
        .collect()
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn reload_applies_only_the_difference_and_refuses_a_bad_file() {
    let prefix = "lbrld";
    {
        let lab = WebLab::new(prefix, 3);
        let topo = &lab.topo;
        let address = |i: usize| lab.address(i);
        let web_config = |backends: &[(String, u32)]| lab.config("", HEALTH, backends);
        let v1 = web_config(&[(address(0), 100), (address(1), 100)]);
        let mut daemon = LbDaemon::start(topo.lb(), &v1, Launch::Nsenter).expect("lb run");
        let socket = api_socket_for(topo.lb());
        let vip = lab.vip();

        // A long-lived connection, and an operator drain of the other backend.
        let mut long_lived =
            TcpLineClient::connect(topo.client(), vip, TIMEOUT).expect("long-lived connection");
        let pinned = long_lived.request("hello").expect("first reply");
        let drained = [address(0), address(1)]
            .into_iter()
            .find(|a| *a != pinned)
            .expect("the other backend");
        assert_eq!(lb(&["drain", "web", &drained], &socket).0, 0);

        // An invalid file: refused with its position, through `lb reload` and through SIGHUP;
        // the old config keeps running.
        daemon
            .rewrite_config(topo.lb(), &v1.replace("weight = 100", "weight = \"heavy\""))
            .expect("write");
        let (code, stdout, stderr) = lb(&["reload"], &socket);
        assert_eq!(code, 1, "an invalid config must be refused: {stdout}");
        let position = format!("reload refused: {}:", daemon.config_path().display());
        assert!(
            stderr.starts_with(&position) && stderr.contains("the daemon keeps running"),
            "{stderr}"
        );
        let line_col = &stderr[position.len()..];
        let digits = |s: &str| s.split(':').take(2).all(|n| n.parse::<u32>().is_ok());
        assert!(digits(line_col), "no LINE:COL after the file: {stderr}");
        daemon.signal(libc::SIGHUP);
        daemon
            .wait_for_log("reload refused", Duration::from_secs(5))
            .expect("SIGHUP with a bad file is refused");
        // A setting only a restart can change is refused too.
        daemon
            .rewrite_config(
                topo.lb(),
                &v1.replace("flow_table_size = 65536", "flow_table_size = 4096"),
            )
            .expect("write");
        let (code, _, stderr) = lb(&["reload"], &socket);
        assert_eq!(code, 1);
        assert!(
            stderr.contains("`flow_table_size` changed (65536 -> 4096)"),
            "{stderr}"
        );
        let report = status(&socket);
        assert_eq!(backend_addresses(&report), [address(0), address(1)]);
        assert_eq!(backend_state(&report, &drained), "draining");
        assert_eq!(
            long_lived.request("still?").expect("after refusals"),
            pinned
        );

        // A valid file: a third backend with twice the weight. Applied through `lb reload`.
        let v2 = web_config(&[(address(0), 100), (address(1), 100), (address(2), 200)]);
        daemon.rewrite_config(topo.lb(), &v2).expect("write");
        let (code, stdout, stderr) = lb(&["reload"], &socket);
        assert_eq!(code, 0, "{stderr}");
        assert!(
            stdout.starts_with(&format!(
                "reloaded {}: 1 change\n",
                daemon.config_path().display()
            )) && stdout.contains(&format!("vip web: backend {} added", address(2))),
            "{stdout}"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while backend_state(&status(&socket), &address(2)) != "up" {
            assert!(
                std::time::Instant::now() < deadline,
                "the added backend did not come up: {}",
                status(&socket)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let report = status(&socket);
        assert_eq!(
            backend_state(&report, &drained),
            "draining",
            "the drain survives the reload"
        );
        let after = tcp_requests(topo.client(), vip, 60, TIMEOUT).expect("client");
        assert!(after.failures.is_empty(), "{:?}", after.failures);
        assert!(
            !after.per_identity.contains_key(&drained),
            "a new connection reached the drained backend: {:?}",
            after.per_identity
        );
        assert!(
            after.per_identity.get(&address(2)).copied().unwrap_or(0) > 20,
            "the added backend (weight 200 of 300 in the ring) serves: {:?}",
            after.per_identity
        );
        assert_eq!(
            long_lived.request("and now?").expect("no flow-table flush"),
            pinned
        );

        // SIGHUP: the drained backend leaves the config.
        let v3 = web_config(&[(pinned.clone(), 100), (address(2), 200)]);
        daemon.rewrite_config(topo.lb(), &v3).expect("write");
        daemon.signal(libc::SIGHUP);
        daemon
            .wait_for_log(
                &format!("reload: vip web: backend {drained} removed"),
                Duration::from_secs(5),
            )
            .expect("SIGHUP applies the file");
        assert_eq!(
            backend_addresses(&status(&socket)),
            [pinned.clone(), address(2)]
        );
        assert_eq!(long_lived.request("last").expect("still pinned"), pinned);

        // No checker of an unchanged backend was restarted: each logged exactly one
        // transition, its first result.
        let transitions = daemon.transitions();
        for backend in [&pinned, &drained, &address(2)] {
            let mine: Vec<_> = transitions
                .iter()
                .filter(|t| &t.backend == backend && !t.from.starts_with("admin"))
                .map(|t| (t.from.as_str(), t.to.as_str()))
                .collect();
            assert_eq!(mine, [("unknown", "up")], "transitions of {backend}");
        }
        drop(long_lived);
        daemon.stop().expect("lb stops");
    }
    assert_eq!(leftovers(prefix), Vec::<String>::new());
}
