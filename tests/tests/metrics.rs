//! The metrics endpoint of a running `lb`: Prometheus text whose counters are the data plane's.

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    process::Command,
    time::Duration,
};

use lb_tests::{
    daemon::{Launch, LbDaemon, api_socket_for, lb_binary},
    prometheus::sample,
    servers::tcp_requests,
    topology::{DsrTopology, leftovers},
    web_lab::WebLab,
};

const METRICS: &str = "127.0.0.1:19100";
/// Where a reload moves the endpoint.
const METRICS_MOVED: &str = "127.0.0.1:19101";

fn scrape(topology: &DsrTopology) -> String {
    scrape_at(topology, METRICS)
}

fn scrape_at(topology: &DsrTopology, address: &'static str) -> String {
    lb_tests::prometheus::scrape(topology.lb(), address)
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn the_metrics_endpoint_serves_the_data_planes_counters() {
    let prefix = "lbmetrics";
    {
        let lab = WebLab::new(prefix, 3);
        let topo = &lab.topo;
        topo.attach_xdp_pass_on_lb_port(lb::ebpf_object(), "xdp_pass")
            .expect("xdp_pass");
        let config = lab.config_all(&format!("metrics = \"{METRICS}\""), "");
        let daemon = LbDaemon::start(topo.lb(), &config, Launch::Nsenter).expect("lb run");
        let outcome = tcp_requests(
            topo.client(),
            SocketAddr::new(IpAddr::V4(topo.vip_v4()), 80),
            60,
            Duration::from_secs(3),
        )
        .expect("client");
        assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
        std::thread::sleep(Duration::from_millis(1500)); // one metrics refresh (1 s)

        let response = scrape(topo);
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.1 200"), "status: {head}");
        for line in body
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not `series value`: {line}"));
            assert!(series.starts_with("lb_"), "unexpected series {series}");
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("not a number in {line}"));
        }
        for family in [
            "lb_vip_packets_total",
            "lb_vip_bytes_total",
            "lb_backend_packets_total",
            "lb_backend_bytes_total",
            "lb_backend_new_flows_total",
            "lb_backend_up",
            "lb_vip_active_pool",
            "lb_health_check_duration_seconds",
            "lb_xdp_verdicts_total",
            "lb_flow_table_entries",
            "lb_vip_ring_slots_changed",
            "lb_vip_flow_table_entries",
        ] {
            assert!(
                body.contains(&format!("# TYPE {family}")),
                "no {family} family in:\n{body}"
            );
        }
        // A reload moves the endpoint: the new address serves, the old one is closed.
        daemon
            .rewrite_config(topo.lb(), &config.replace(METRICS, METRICS_MOVED))
            .expect("write");
        let reload = Command::new(lb_binary())
            .args(["reload", "--api"])
            .arg(api_socket_for(topo.lb()))
            .output()
            .expect("lb reload");
        let stdout = String::from_utf8_lossy(&reload.stdout);
        assert!(
            reload.status.success() && stdout.contains("metrics: now served on 127.0.0.1:19101"),
            "{stdout} {}",
            String::from_utf8_lossy(&reload.stderr)
        );
        let moved = scrape_at(topo, METRICS_MOVED);
        assert!(
            moved.starts_with("HTTP/1.1 200") && moved.contains("# TYPE lb_vip_packets_total"),
            "{moved}"
        );
        let old_closed = topo.lb().run(|| TcpStream::connect(METRICS).is_err());
        assert!(
            old_closed,
            "the old metrics address still accepts connections"
        );

        let counters = daemon.stop().expect("lb stops");
        for host in topo.backend_hosts() {
            let address = host.ipv4().to_string();
            let series = |name: &str| format!("{name}{{vip=\"web\",backend=\"{address}\"}}");
            let (packets, bytes, flows) = counters.backends[&("web".to_owned(), address.clone())];
            assert_eq!(
                sample(body, &series("lb_backend_new_flows_total")),
                Some(flows),
                "{address} flows:\n{body}"
            );
            assert_eq!(
                sample(body, &series("lb_backend_packets_total")),
                Some(packets),
                "{address} packets"
            );
            assert_eq!(
                sample(body, &series("lb_backend_bytes_total")),
                Some(bytes),
                "{address} bytes"
            );
            assert_eq!(
                sample(body, &series("lb_backend_up")),
                Some(1),
                "{address} up"
            );
            assert_eq!(
                Some(flows),
                outcome.per_identity.get(&address).copied(),
                "{address}: LB flows vs answers"
            );
        }
        assert_eq!(
            sample(body, "lb_vip_active_pool{vip=\"web\",pool=\"primary\"}"),
            Some(1),
            "active pool:\n{body}"
        );
    }
    assert_eq!(leftovers(prefix), Vec::<String>::new());
}
