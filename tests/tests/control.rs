//! The control API against a running `lb` in a namespace: `lb status`, `lb drain`,
//! `lb disable`, `lb enable`, through the real binary and the daemon's Unix socket.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    process::Command,
    time::Duration,
};

use lb_tests::{
    daemon::{Launch, LbDaemon, api_socket_for, lb_binary},
    servers::{TcpIdentityServer, TcpLineClient, tcp_requests},
    topology::{DsrTopology, DsrTopologyOptions, leftovers},
};

const TIMEOUT: Duration = Duration::from_secs(3);

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
        let options = DsrTopologyOptions {
            name_prefix: prefix.to_owned(),
            ..Default::default()
        };
        let topo = DsrTopology::new(3, options).expect("topology");
        let _servers: Vec<TcpIdentityServer> = (0..3)
            .map(|i| {
                TcpIdentityServer::start(
                    topo.backend(i),
                    "0.0.0.0:80".parse().unwrap(),
                    topo.backend_host(i).ipv4().to_string(),
                )
                .expect("server")
            })
            .collect();
        let mut config = format!(
            "interface = \"eth0\"\nflow_table_size = 65536\nmax_vips = 2\n\n[[vip]]\nname = \"web\"\naddress = \"{}\"\nport = 80\nprotocol = \"tcp\"\n[vip.health]\ninterval = \"200ms\"\ntimeout = \"200ms\"\n",
            topo.vip_v4()
        );
        for host in topo.backend_hosts() {
            config.push_str(&format!("[[vip.backend]]\naddress = \"{}\"\n", host.ipv4()));
        }
        let daemon = LbDaemon::start(topo.lb(), &config, Launch::Nsenter).expect("lb run");
        let socket = api_socket_for(topo.lb());
        let vip = SocketAddr::new(IpAddr::V4(topo.vip_v4()), 80);

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
        assert_eq!(backend_state(&status(&socket), &pinned), "draining");
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
