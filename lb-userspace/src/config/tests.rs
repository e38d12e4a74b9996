//! Config tests: a full valid file, defaults, and every error with its exact line and column.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use super::*;

const FILE: &str = "lb.toml";

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new(FILE))
}

fn parse_ok(text: &str) -> Config {
    parse(text).unwrap_or_else(|error| panic!("expected a valid config, got: {error}"))
}

/// Asserts `text` is rejected at `line:column` with a message containing `needle`, on one line.
#[track_caller]
fn assert_error(text: &str, line: usize, column: usize, needle: &str) {
    let error = match parse(text) {
        Ok(config) => panic!("expected an error containing {needle:?}, got a config: {config:?}"),
        Err(error) => error.to_string(),
    };
    let prefix = format!("{FILE}:{line}:{column}: ");
    assert!(
        error.starts_with(&prefix),
        "expected the error at {prefix:?}, got: {error}"
    );
    assert!(
        error.contains(needle),
        "expected the error to contain {needle:?}, got: {error}"
    );
    assert!(
        !error.contains('\n'),
        "the error is not one line: {error:?}"
    );
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// A valid config with one VIP and one backend, to which a test appends what it needs. Lines 1-9.
const BASE: &str = r#"interface = "eth0"

[[vip]]
name = "web"
address = "10.0.0.100"
port = 80
protocol = "tcp"
[[vip.backend]]
address = "10.0.0.11"
"#;

#[test]
fn full_example() {
    let config = parse_ok(
        r#"
interface = "eth1"
xdp_mode = "native"
ring_size = 16381
max_vips = 8
max_backends = 16
flow_table_size = 4096
tcp_idle_timeout = "1h"
udp_idle_timeout = "2m"
api = "/var/run/lb/control.sock"
metrics = "[::1]:9101"

[announce]
route_table = 200
health_file = "/run/lb/health"

[[vip]]
name = "web"
address = "10.0.0.100"
port = 80
protocol = "tcp"

  [[vip.backend]]
  address = "10.0.0.11"
  weight = 200

  [[vip.backend]]
  address = "10.0.0.12"
  weight = 0

[[vip]]
name = "dns.v6-1"
address = "2001:db8::53"
port = 53
protocol = "udp"
backend = [{ address = "2001:db8::1" }]

[[vip]]
name = "empty"
address = "10.0.0.101"
port = 65535
protocol = "udp"
"#,
    );
    let expected = Config {
        interface: "eth1".into(),
        xdp_mode: XdpModeSetting::Native,
        ring_size: 16381,
        max_vips: 8,
        max_backends: 16,
        flow_table_size: 4096,
        tcp_idle_timeout: Duration::from_secs(3600),
        udp_idle_timeout: Duration::from_secs(120),
        api: "/var/run/lb/control.sock".into(),
        metrics: Some("[::1]:9101".parse().unwrap()),
        announce: AnnounceConfig {
            route_table: Some(200),
            health_file: Some("/run/lb/health".into()),
        },
        sync: None,
        dns: None,
        vips: vec![
            VipConfig {
                name: "web".into(),
                address: ip("10.0.0.100"),
                port: 80,
                protocol: Protocol::Tcp,
                min_healthy: 1,
                on_all_down: OnAllDown::Drop,
                forward: crate::config::Forward::L2,
                encap_source: Vec::new(),
                check_through_tunnel: false,
                health: HealthConfig::defaults(80, Protocol::Tcp),
                backends: vec![
                    BackendConfig {
                        address: ip("10.0.0.11"),
                        weight: 200,
                        standby: false,
                        health: HealthConfig::defaults(80, Protocol::Tcp),
                    },
                    BackendConfig {
                        address: ip("10.0.0.12"),
                        weight: 0,
                        standby: false,
                        health: HealthConfig::defaults(80, Protocol::Tcp),
                    },
                ],
            },
            VipConfig {
                name: "dns.v6-1".into(),
                address: ip("2001:db8::53"),
                port: 53,
                protocol: Protocol::Udp,
                min_healthy: 1,
                on_all_down: OnAllDown::Drop,
                forward: crate::config::Forward::L2,
                encap_source: Vec::new(),
                check_through_tunnel: false,
                health: HealthConfig::defaults(53, Protocol::Udp),
                backends: vec![BackendConfig {
                    address: ip("2001:db8::1"),
                    weight: DEFAULT_WEIGHT,
                    standby: false,
                    health: HealthConfig::defaults(53, Protocol::Udp),
                }],
            },
            VipConfig {
                name: "empty".into(),
                address: ip("10.0.0.101"),
                port: 65535,
                protocol: Protocol::Udp,
                min_healthy: 1,
                on_all_down: OnAllDown::Drop,
                forward: crate::config::Forward::L2,
                encap_source: Vec::new(),
                check_through_tunnel: false,
                health: HealthConfig::defaults(65535, Protocol::Udp),
                backends: vec![],
            },
        ],
    };
    assert_eq!(config, expected);
}

#[test]
fn defaults() {
    let config = parse_ok(BASE);
    assert_eq!(config.interface, "eth0");
    assert_eq!(config.xdp_mode, XdpModeSetting::Auto);
    assert_eq!(config.ring_size, lb_common::DEFAULT_RING_SIZE);
    assert_eq!(config.max_vips, lb_common::DEFAULT_MAX_VIPS);
    assert_eq!(config.max_backends, lb_common::DEFAULT_MAX_BACKENDS);
    assert_eq!(config.flow_table_size, lb_common::DEFAULT_FLOW_TABLE_SIZE);
    assert_eq!(config.tcp_idle_timeout, Duration::from_secs(600));
    assert_eq!(config.udp_idle_timeout, Duration::from_secs(30));
    assert_eq!(config.api, Path::new("/run/lb/lb.sock"));
    assert_eq!(config.metrics, None);
    assert_eq!(config.vips.len(), 1);
    assert_eq!(config.vips[0].backends[0].weight, 100);

    let bare = parse_ok("interface = \"lo\"\n");
    assert!(bare.vips.is_empty());
}

#[test]
fn ipv6_vip() {
    let config = parse_ok(
        r#"interface = "eth0"
[[vip]]
name = "v6"
address = "2001:db8::100"
port = 443
protocol = "tcp"
[[vip.backend]]
address = "2001:db8::11"
[[vip.backend]]
address = "fd00::12"
weight = 7
"#,
    );
    let vip = &config.vips[0];
    assert_eq!(vip.address, ip("2001:db8::100"));
    assert!(vip.address.is_ipv6());
    assert_eq!(vip.port, 443);
    assert_eq!(
        vip.backends,
        vec![
            BackendConfig {
                address: ip("2001:db8::11"),
                weight: 100,
                standby: false,
                health: HealthConfig::defaults(443, Protocol::Tcp),
            },
            BackendConfig {
                address: ip("fd00::12"),
                weight: 7,
                standby: false,
                health: HealthConfig::defaults(443, Protocol::Tcp),
            },
        ]
    );
}

#[test]
fn protocol_and_mode_spellings() {
    assert_eq!(Protocol::Tcp.number(), 6);
    assert_eq!(Protocol::Udp.number(), 17);
    assert_eq!(Protocol::Tcp.to_string(), "tcp");
    assert_eq!(Protocol::Udp.to_string(), "udp");
    assert_eq!(XdpModeSetting::Skb.to_string(), "skb");
    let config = parse_ok(&BASE.replace(
        "interface = \"eth0\"",
        "interface = \"eth0\"\nxdp_mode = \"skb\"",
    ));
    assert_eq!(config.xdp_mode, XdpModeSetting::Skb);
}

#[test]
fn missing_file() {
    let path = Path::new("/nonexistent/lb-config-test/lb.toml");
    let error = Config::load(path).expect_err("loading a missing file succeeded");
    let text = error.to_string();
    assert!(
        text.starts_with("/nonexistent/lb-config-test/lb.toml: cannot read: "),
        "unexpected message: {text}"
    );
    assert!(
        matches!(error, ConfigError::Read { .. }),
        "unexpected error: {error:?}"
    );
}

#[test]
fn load_reads_a_file() {
    let path = std::env::temp_dir().join(format!("lb-config-test-{}.toml", std::process::id()));
    std::fs::write(&path, BASE).unwrap();
    let loaded = Config::load(&path);
    std::fs::remove_file(&path).unwrap();
    let config = loaded.unwrap_or_else(|error| panic!("load failed: {error}"));
    assert_eq!(config.vips[0].name, "web");
}

// ---- TOML-level errors: syntax, unknown keys, types, enum values, missing keys ----

#[test]
fn syntax_error_is_one_line() {
    assert_error(
        "interface = \"eth0\"\n[vip\n",
        2,
        5,
        "invalid table header: expected",
    );
}

#[test]
fn single_bracket_vip_gets_a_hint() {
    let text = BASE.replace("[[vip]]", "[vip]");
    assert_error(
        &text,
        3,
        1,
        "expected a sequence (each VIP is a `[[vip]]` table",
    );
}

#[test]
fn unknown_key_at_root() {
    assert_error(
        "interface = \"eth0\"\nring = 5\n",
        2,
        1,
        "unknown field `ring`, expected one of",
    );
}

#[test]
fn unknown_key_in_vip() {
    let text = BASE.replace("protocol = \"tcp\"", "prot = \"tcp\"");
    assert_error(&text, 7, 1, "unknown field `prot`, expected one of `name`");
}

#[test]
fn unknown_key_in_backend() {
    let text = format!("{BASE}wieght = 5\n");
    assert_error(&text, 10, 1, "unknown field `wieght`");
}

#[test]
fn wrong_xdp_mode() {
    assert_error(
        "interface = \"eth0\"\nxdp_mode = \"fast\"\n",
        2,
        12,
        "unknown variant `fast`, expected one of `auto`, `native`, `skb`",
    );
}

#[test]
fn wrong_protocol() {
    let text = BASE.replace("protocol = \"tcp\"", "protocol = \"sctp\"");
    assert_error(
        &text,
        7,
        12,
        "unknown variant `sctp`, expected `tcp` or `udp`",
    );
}

#[test]
fn wrong_type() {
    let text = BASE.replace("port = 80", "port = \"80\"");
    assert_error(&text, 6, 8, "invalid type: string \"80\", expected i64");
}

#[test]
fn missing_interface_points_at_the_root() {
    assert_error("xdp_mode = \"auto\"\n", 1, 1, "missing field `interface`");
}

#[test]
fn missing_port_points_at_the_vip() {
    let text = BASE.replace("port = 80\n", "");
    assert_error(&text, 3, 1, "missing field `port`");
}

#[test]
fn missing_backend_address_points_at_the_backend() {
    let text = format!("{BASE}[[vip.backend]]\nweight = 3\n");
    assert_error(&text, 10, 1, "missing field `address`");
}

// ---- Semantic errors ----

#[test]
fn api_and_metrics() {
    let config = parse_ok(&BASE.replace(
        "interface = \"eth0\"",
        "interface = \"eth0\"\napi = \"/tmp/lb test/é.sock\"\nmetrics = \"0.0.0.0:9100\"",
    ));
    assert_eq!(config.api, Path::new("/tmp/lb test/é.sock"));
    assert_eq!(config.metrics, Some("0.0.0.0:9100".parse().unwrap()));
    let config = parse_ok("interface = \"eth0\"\nmetrics = \"[2001:db8::1]:80\"\n");
    assert_eq!(config.metrics, Some("[2001:db8::1]:80".parse().unwrap()));
    let longest = format!("/{}", "s".repeat(MAX_API_PATH_BYTES - 1));
    let config = parse_ok(&format!("interface = \"eth0\"\napi = \"{longest}\"\n"));
    assert_eq!(config.api, Path::new(&longest));
}

#[test]
fn api_must_be_an_absolute_socket_path() {
    assert_error(
        "interface = \"eth0\"\napi = \"run/lb.sock\"\n",
        2,
        7,
        "api `run/lb.sock` is not an absolute path",
    );
    assert_error(
        "interface = \"eth0\"\napi = \"\"\n",
        2,
        7,
        "api `` is not an absolute path",
    );
    assert_error(
        "interface = \"eth0\"\n  api =   \"/run/lb/\"\n",
        2,
        11,
        "api `/run/lb/` names a directory, not a socket file",
    );
    let too_long = format!("/{}", "s".repeat(MAX_API_PATH_BYTES));
    assert_error(
        &format!("interface = \"eth0\"\napi = \"{too_long}\"\n"),
        2,
        7,
        "is longer than 107 bytes, the most a Unix socket path can have",
    );
    assert_error(
        "interface = \"eth0\"\napi = 5\n",
        2,
        7,
        "invalid type: integer `5`, expected a string",
    );
}

#[test]
fn metrics_must_be_an_address_and_port() {
    for bad in [
        "localhost:9100",
        "127.0.0.1",
        "9100",
        "::1:9100",
        "127.0.0.1:70000",
        "",
    ] {
        assert_error(
            &format!("interface = \"eth0\"\nmetrics = \"{bad}\"\n"),
            2,
            11,
            &format!(
                "metrics `{bad}` is not an address and port such as \"127.0.0.1:9100\" or \"[::1]:9100\""
            ),
        );
    }
    assert_error(
        "interface = \"eth0\"\nmetrics = \"127.0.0.1:0\"\n",
        2,
        11,
        "metrics `127.0.0.1:0` has port 0",
    );
    // The error points at the value in the file, wherever it is.
    let text = BASE.replace(
        "interface = \"eth0\"",
        "interface = \"eth0\"\nring_size = 1021\n\n   metrics=\"[::1]\"",
    );
    assert_error(&text, 4, 12, "metrics `[::1]` is not an address and port");
    assert_error(
        "interface = \"eth0\"\nmetrics = 9100\n",
        2,
        11,
        "invalid type: integer `9100`, expected a string",
    );
}

#[test]
fn port_zero() {
    let text = BASE.replace("port = 80", "port = 0");
    assert_error(&text, 6, 8, "port 0 is out of range 1..=65535");
}

#[test]
fn port_too_large() {
    let text = BASE.replace("port = 80", "  port   = 70000");
    assert_error(&text, 6, 12, "port 70000 is out of range 1..=65535");
}

#[test]
fn port_negative() {
    let text = BASE.replace("port = 80", "port = -1");
    assert_error(&text, 6, 8, "port -1 is out of range 1..=65535");
}

#[test]
fn invalid_vip_address() {
    let text = BASE.replace("10.0.0.100", "10.0.0.300");
    assert_error(
        &text,
        5,
        11,
        "vip address `10.0.0.300` is not an IPv4 or IPv6 address",
    );
}

#[test]
fn invalid_backend_address() {
    let text = BASE.replace("10.0.0.11", "backend-1");
    assert_error(
        &text,
        9,
        11,
        "backend address `backend-1` is not an IPv4 or IPv6 address",
    );
}

#[test]
fn backend_of_the_wrong_family() {
    let text = BASE.replace("\"10.0.0.11\"", "\"2001:db8::1\"");
    assert_error(
        &text,
        9,
        11,
        "backend 2001:db8::1 is IPv6 but vip `web` is IPv4",
    );
}

#[test]
fn ipv4_backend_of_an_ipv6_vip() {
    let text = BASE.replace("10.0.0.100", "2001:db8::100");
    assert_error(
        &text,
        9,
        11,
        "backend 10.0.0.11 is IPv4 but vip `web` is IPv6",
    );
}

#[test]
fn duplicate_backend() {
    let text = format!(
        "{BASE}[[vip.backend]]\naddress = \"10.0.0.12\"\n[[vip.backend]]\naddress = \"10.0.0.11\"\n"
    );
    assert_error(
        &text,
        13,
        11,
        "backend 10.0.0.11 is listed twice in vip `web` (first on line 9)",
    );
}

#[test]
fn same_backend_in_two_vips_is_fine() {
    let text = format!(
        "{BASE}[[vip]]\nname = \"web2\"\naddress = \"10.0.0.100\"\nport = 81\nprotocol = \"tcp\"\n[[vip.backend]]\naddress = \"10.0.0.11\"\n"
    );
    assert_eq!(parse_ok(&text).vips.len(), 2);
}

#[test]
fn duplicate_vip() {
    let text = format!(
        "{BASE}\n[[vip]]\nname = \"web2\"\naddress = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\n"
    );
    assert_error(
        &text,
        13,
        11,
        "vip `web2` has the same address, port and protocol (10.0.0.100:80/tcp) as vip `web` on line 3",
    );
}

#[test]
fn same_address_and_port_with_another_protocol_is_fine() {
    let text = format!(
        "{BASE}[[vip]]\nname = \"web-udp\"\naddress = \"10.0.0.100\"\nport = 80\nprotocol = \"udp\"\n"
    );
    assert_eq!(parse_ok(&text).vips.len(), 2);
}

#[test]
fn duplicate_ipv6_vip() {
    let text = r#"interface = "eth0"
[[vip]]
name = "a"
address = "2001:db8::1"
port = 53
protocol = "udp"
[[vip]]
name = "b"
address = "2001:db8:0::1"
port = 53
protocol = "udp"
"#;
    assert_error(text, 9, 11, "([2001:db8::1]:53/udp) as vip `a` on line 2");
}

#[test]
fn duplicate_vip_name() {
    let text = format!(
        "{BASE}[[vip]]\nname = \"web\"\naddress = \"10.0.0.101\"\nport = 80\nprotocol = \"tcp\"\n"
    );
    assert_error(
        &text,
        11,
        8,
        "duplicate vip name `web`: the vip on line 3 has it",
    );
}

#[test]
fn empty_vip_name() {
    let text = BASE.replace("name = \"web\"", "name = \"\"");
    assert_error(&text, 4, 8, "vip name must not be empty");
}

#[test]
fn vip_name_with_a_forbidden_character() {
    let text = BASE.replace("name = \"web\"", "name = \"web front\"");
    assert_error(
        &text,
        4,
        8,
        "vip name `web front` contains ' '; only letters, digits",
    );
}

#[test]
fn unspecified_vip_address() {
    let text = BASE.replace("10.0.0.100", "0.0.0.0");
    assert_error(
        &text,
        5,
        11,
        "vip address 0.0.0.0 is the unspecified address",
    );
}

#[test]
fn unspecified_ipv6_backend_address() {
    let text = BASE
        .replace("10.0.0.100", "2001:db8::100")
        .replace("\"10.0.0.11\"", "\"::\"");
    assert_error(
        &text,
        9,
        11,
        "backend address :: is the unspecified address",
    );
}

#[test]
fn multicast_vip_address() {
    let text = BASE.replace("10.0.0.100", "239.1.2.3");
    assert_error(&text, 5, 11, "vip address 239.1.2.3 is a multicast address");
}

#[test]
fn multicast_ipv6_backend_address() {
    let text = BASE
        .replace("10.0.0.100", "2001:db8::100")
        .replace("\"10.0.0.11\"", "\"ff02::1\"");
    assert_error(
        &text,
        9,
        11,
        "backend address ff02::1 is a multicast address",
    );
}

#[test]
fn broadcast_backend_address() {
    let text = BASE.replace("10.0.0.11", "255.255.255.255");
    assert_error(
        &text,
        9,
        11,
        "backend address 255.255.255.255 is the broadcast address",
    );
}

#[test]
fn weight_out_of_range() {
    let text = format!("{BASE}weight = 4294967296\n");
    assert_error(
        &text,
        10,
        10,
        "weight 4294967296 is out of range 0..=4294967295",
    );
    let text = format!("{BASE}weight = -5\n");
    assert_error(&text, 10, 10, "weight -5 is out of range 0..=4294967295");
}

#[test]
fn ring_size_not_prime() {
    let text = BASE.replace(
        "interface = \"eth0\"",
        "interface = \"eth0\"\nring_size = 65536",
    );
    assert_error(
        &text,
        2,
        13,
        "ring_size 65536 is not prime (Maglev needs a prime table size; the nearest primes are 65521 and 65537)",
    );
}

#[test]
fn ring_size_too_small_or_too_large() {
    let text = BASE.replace(
        "interface = \"eth0\"",
        "interface = \"eth0\"\nring_size = 1019",
    );
    assert_error(
        &text,
        2,
        13,
        "ring_size 1019 is out of range 1021..=1000003",
    );
    let text = BASE.replace(
        "interface = \"eth0\"",
        "interface = \"eth0\"\nring_size = 1000033",
    );
    assert_error(
        &text,
        2,
        13,
        "ring_size 1000033 is out of range 1021..=1000003",
    );
}

#[test]
fn smallest_and_largest_ring_sizes_are_accepted() {
    for size in [MIN_RING_SIZE, MAX_RING_SIZE] {
        let text = BASE.replace(
            "interface = \"eth0\"",
            &format!("interface = \"eth0\"\nring_size = {size}"),
        );
        assert_eq!(parse_ok(&text).ring_size, size);
    }
}

#[test]
fn flow_table_too_small() {
    let text = BASE.replace(
        "interface = \"eth0\"",
        "interface = \"eth0\"\nflow_table_size = 1000",
    );
    assert_error(
        &text,
        2,
        19,
        "flow_table_size 1000 is out of range 1024..=4294967295",
    );
}

#[test]
fn max_vips_zero() {
    let text = "interface = \"eth0\"\nmax_vips = 0\n";
    assert_error(text, 2, 12, "max_vips 0 is out of range 1..=4294967295");
}

#[test]
fn too_many_vips() {
    let text = format!(
        "max_vips = 1\n{BASE}[[vip]]\nname = \"second\"\naddress = \"10.0.0.101\"\nport = 80\nprotocol = \"tcp\"\n"
    );
    assert_error(
        &text,
        12,
        8,
        "too many VIPs: max_vips is 1 (line 1) and vip `second` is number 2",
    );
}

#[test]
fn too_many_backends() {
    let text = format!(
        "max_backends = 2\n{BASE}[[vip.backend]]\naddress = \"10.0.0.12\"\n\n[[vip]]\nname = \"b\"\naddress = \"10.0.0.101\"\nport = 80\nprotocol = \"tcp\"\n[[vip.backend]]\naddress = \"10.0.0.13\"\n"
    );
    assert_error(
        &text,
        20,
        11,
        "too many backends: max_backends is 2 (line 1) and backend 10.0.0.13 of vip `b` is number 3 over all VIPs",
    );
}

#[test]
fn too_many_vips_for_the_default() {
    let mut text = String::from("interface = \"eth0\"\n");
    for i in 0..=lb_common::DEFAULT_MAX_VIPS {
        text.push_str(&format!(
            "[[vip]]\nname = \"v{i}\"\naddress = \"10.0.1.{}\"\nport = 80\nprotocol = \"tcp\"\n",
            i + 1
        ));
    }
    let line = 2 + 5 * lb_common::DEFAULT_MAX_VIPS as usize + 1;
    assert_error(
        &text,
        line,
        8,
        "too many VIPs: max_vips is 64 (the default) and vip `v64` is number 65",
    );
}

#[test]
fn ring_map_too_large() {
    let text = "interface = \"eth0\"\nring_size = 1000003\nmax_vips = 3000\n";
    assert_error(
        text,
        3,
        12,
        "max_vips 3000 × 2 × ring_size 1000003 = 6000018000 ring slots",
    );
}

#[test]
fn bad_interface_names() {
    assert_error(
        "interface = \"\"\n",
        1,
        13,
        "interface name `` must not be empty",
    );
    assert_error(
        "interface = \"a-very-long-interface\"\n",
        1,
        13,
        "is longer than 15 bytes",
    );
    assert_error(
        "interface = \"eth0:1\"\n",
        1,
        13,
        "cannot contain `/`, `:` or whitespace",
    );
}

#[test]
fn columns_count_characters_not_bytes() {
    // "é" is two bytes but one column: `prot` starts at byte 22, column 22.
    let text = "interface = \"eth0\"\nvip = [{ name = \"é\", prot = 1 }]\n";
    assert_error(text, 2, 22, "unknown field `prot`");
}

// ---- Health checks and failover pools ----

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

#[test]
fn health_full_example() {
    let config = parse_ok(
        r#"interface = "eth0"

[[vip]]
name = "web"
address = "10.0.0.100"
port = 80
protocol = "tcp"
min_healthy = 1
on_all_down = "drop"
[vip.health]
check = "http"
interval = "1s"
timeout = "500ms"
rise = 2
fall = 3
port = 8080
path = "/healthz"
expect_status = [200, 204]
host = "www.example.com"
[[vip.backend]]
address = "10.0.0.11"
weight = 100
[[vip.backend]]
address = "10.0.0.13"
weight = 100
standby = true
health = { check = "http", interval = "2s", path = "/ready" }

[[vip]]
name = "dns"
address = "10.0.0.53"
port = 53
protocol = "udp"
min_healthy = 2
on_all_down = "pass"
[vip.health]
check = "tcp"
interval = "1.5s"
timeout = "100ms"
rise = 4
fall = 5
[[vip.backend]]
address = "10.0.0.21"
health = { check = "udp", interval = "200ms", send = "ping", expect = "pong" }
[[vip.backend]]
address = "10.0.0.22"
standby = false
health = { check = "exec", command = ["/usr/local/bin/check", "--fast"], port = 5353 }
[[vip.backend]]
address = "10.0.0.23"
standby = true
health.check = "none"
"#,
    );

    let web_health = HealthConfig {
        check: CheckKind::Http,
        interval: ms(1000),
        timeout: ms(500),
        rise: 2,
        fall: 3,
        port: 8080,
        path: "/healthz".into(),
        expect_status: vec![200, 204],
        host: Some("www.example.com".into()),
        send: vec![],
        expect: None,
        command: vec![],
    };
    let web = &config.vips[0];
    assert_eq!(web.min_healthy, 1);
    assert_eq!(web.on_all_down, OnAllDown::Drop);
    assert_eq!(web.health, web_health);
    assert_eq!(
        web.backends,
        vec![
            BackendConfig {
                address: ip("10.0.0.11"),
                weight: 100,
                standby: false,
                health: web_health.clone(),
            },
            BackendConfig {
                address: ip("10.0.0.13"),
                weight: 100,
                standby: true,
                // Only the overridden keys change.
                health: HealthConfig {
                    interval: ms(2000),
                    path: "/ready".into(),
                    ..web_health.clone()
                },
            },
        ]
    );

    let dns_health = HealthConfig {
        check: CheckKind::Tcp,
        interval: ms(1500),
        timeout: ms(100),
        rise: 4,
        fall: 5,
        ..HealthConfig::defaults(53, Protocol::Udp)
    };
    let dns = &config.vips[1];
    assert_eq!(dns.min_healthy, 2);
    assert_eq!(dns.on_all_down, OnAllDown::Pass);
    assert_eq!(dns.health, dns_health);
    // Overriding check and interval keeps the VIP's timeout, rise, fall and port.
    assert_eq!(
        dns.backends[0].health,
        HealthConfig {
            check: CheckKind::Udp,
            interval: ms(200),
            timeout: ms(100),
            rise: 4,
            fall: 5,
            port: 53,
            path: "/".into(),
            expect_status: vec![200],
            host: None,
            send: b"ping".to_vec(),
            expect: Some(b"pong".to_vec()),
            command: vec![],
        }
    );
    assert!(!dns.backends[0].standby);
    assert_eq!(
        dns.backends[1].health,
        HealthConfig {
            check: CheckKind::Exec,
            port: 5353,
            command: vec!["/usr/local/bin/check".into(), "--fast".into()],
            ..dns_health.clone()
        }
    );
    assert!(!dns.backends[1].standby);
    assert_eq!(
        dns.backends[2].health,
        HealthConfig {
            check: CheckKind::None,
            ..dns_health.clone()
        }
    );
    assert!(dns.backends[2].standby);
}

#[test]
fn health_defaults_without_a_health_table() {
    let config = parse_ok(BASE);
    let vip = &config.vips[0];
    assert_eq!(vip.min_healthy, 1);
    assert_eq!(vip.on_all_down, OnAllDown::Drop);
    let defaults = HealthConfig {
        check: CheckKind::Tcp,
        interval: ms(1000),
        timeout: ms(500),
        rise: 2,
        fall: 3,
        port: 80,
        path: "/".into(),
        expect_status: vec![200],
        host: None,
        send: vec![],
        expect: None,
        command: vec![],
    };
    assert_eq!(HealthConfig::defaults(80, Protocol::Tcp), defaults);
    assert_eq!(vip.health, defaults);
    assert!(!vip.backends[0].standby);
    assert_eq!(vip.backends[0].health, defaults);
}

#[test]
fn health_port_defaults_to_the_vips_port() {
    let text = format!("{BASE}health = {{ rise = 1 }}\n").replace("port = 80", "port = 443");
    let config = parse_ok(&text);
    assert_eq!(config.vips[0].health.port, 443);
    assert_eq!(config.vips[0].backends[0].health.port, 443);
    assert_eq!(config.vips[0].backends[0].health.rise, 1);
}

#[test]
fn backend_override_in_a_sub_table() {
    let text = format!("{BASE}[vip.backend.health]\ncheck = \"none\"\n");
    let health = &parse_ok(&text).vips[0].backends[0].health;
    assert_eq!(health.check, CheckKind::None);
}

#[test]
fn check_kind_and_on_all_down_spellings() {
    let kinds = [
        (CheckKind::Tcp, "tcp"),
        (CheckKind::Http, "http"),
        (CheckKind::Udp, "udp"),
        (CheckKind::Exec, "exec"),
        (CheckKind::None, "none"),
    ];
    for (kind, text) in kinds {
        assert_eq!(kind.as_str(), text);
        assert_eq!(kind.to_string(), text);
    }
    assert_eq!(OnAllDown::Drop.to_string(), "drop");
    assert_eq!(OnAllDown::Pass.as_str(), "pass");
}

#[test]
fn idle_timeouts_out_of_range() {
    assert_error(
        "interface = \"eth0\"\ntcp_idle_timeout = \"1s\"",
        2,
        20,
        "tcp_idle_timeout 1s is out of range 2s..=1day",
    );
    assert_error(
        "interface = \"eth0\"\nudp_idle_timeout = \"25h\"",
        2,
        20,
        "udp_idle_timeout 1day 1h is out of range 2s..=1day",
    );
    assert_error(
        "interface = \"eth0\"\nudp_idle_timeout = 30",
        2,
        20,
        "expected a number and a unit",
    );
}

#[test]
fn durations_in_humantime_format() {
    for (text, expected) in [
        ("100ms", ms(100)),
        ("1.5s", ms(1500)),
        ("2m", Duration::from_secs(120)),
        ("1s 250ms", ms(1250)),
        ("10ms", ms(10)),
    ] {
        let config = parse_ok(&format!(
            "{BASE}[vip.health]\ninterval = \"{text}\"\ntimeout = \"10ms\"\n"
        ));
        assert_eq!(config.vips[0].health.interval, expected, "{text}");
    }
}

/// The example in the module documentation is a valid config.
#[test]
fn module_doc_example_parses() {
    let source = include_str!("mod.rs");
    let start = source.find("//! ```toml\n").expect("no toml example") + "//! ```toml\n".len();
    let end = start
        + source[start..]
            .find("//! ```\n")
            .expect("unterminated example");
    let example: String = source[start..end]
        .lines()
        .map(|line| {
            line.strip_prefix("//!")
                .unwrap_or(line)
                .trim_start_matches(' ')
        })
        .map(|line| format!("{line}\n"))
        .collect();
    // The example's key file, at a path that exists here.
    let key = TempKey::new("doc", KEY);
    let example = example.replace("/etc/lb/sync.key", &key.0.display().to_string());
    let config = parse_ok(&example);
    assert_eq!(
        config.sync.as_ref().map(|s| s.peers.len()),
        Some(1),
        "the example's [sync]"
    );
    assert_eq!(config.api, Path::new(DEFAULT_API));
    assert_eq!(config.metrics, Some("127.0.0.1:9100".parse().unwrap()));
    let vip = &config.vips[0];
    assert_eq!(vip.health.check, CheckKind::Http);
    assert!(vip.backends[1].standby);
    assert_eq!(vip.backends[1].health.port, 8081);
    assert_eq!(vip.backends[1].health.path, "/healthz");
}

// ---- Health and pool errors ----

#[test]
fn min_healthy_above_the_primaries() {
    let text = format!(
        "{BASE}[[vip.backend]]\naddress = \"10.0.0.12\"\n[[vip.backend]]\naddress = \"10.0.0.13\"\nstandby = true\n"
    )
    .replace("protocol = \"tcp\"", "protocol = \"tcp\"\nmin_healthy = 3");
    assert_error(
        &text,
        8,
        15,
        "min_healthy = 3 but vip `web` has only 2 primary backends",
    );
}

#[test]
fn min_healthy_equal_to_the_primaries_is_fine() {
    let text = format!("{BASE}[[vip.backend]]\naddress = \"10.0.0.12\"\n")
        .replace("protocol = \"tcp\"", "protocol = \"tcp\"\nmin_healthy = 2");
    assert_eq!(parse_ok(&text).vips[0].min_healthy, 2);
}

#[test]
fn min_healthy_without_backends_is_fine() {
    let text = "interface = \"eth0\"\n[[vip]]\nname = \"a\"\naddress = \"10.0.0.1\"\nport = 80\nprotocol = \"tcp\"\nmin_healthy = 5\n";
    assert_eq!(parse_ok(text).vips[0].min_healthy, 5);
}

#[test]
fn min_healthy_zero() {
    let text = BASE.replace("protocol = \"tcp\"", "protocol = \"tcp\"\nmin_healthy = 0");
    assert_error(&text, 8, 15, "min_healthy 0 is out of range 1..=4294967295");
}

#[test]
fn only_standby_backends() {
    let text = format!("{BASE}standby = true\n");
    assert_error(
        &text,
        10,
        11,
        "min_healthy = 1 (the default) but vip `web` has only 0 primary backends",
    );
}

#[test]
fn wrong_on_all_down() {
    let text = BASE.replace(
        "protocol = \"tcp\"",
        "protocol = \"tcp\"\non_all_down = \"reject\"",
    );
    assert_error(
        &text,
        8,
        15,
        "unknown variant `reject`, expected `drop` or `pass`",
    );
}

#[test]
fn wrong_standby_type() {
    let text = format!("{BASE}standby = \"yes\"\n");
    assert_error(
        &text,
        10,
        11,
        "invalid type: string \"yes\", expected a boolean",
    );
}

#[test]
fn wrong_check_kind() {
    let text = format!("{BASE}[vip.health]\ncheck = \"grpc\"\n");
    assert_error(
        &text,
        11,
        9,
        "unknown variant `grpc`, expected one of `tcp`, `http`, `udp`, `exec`, `none`",
    );
}

#[test]
fn unknown_key_in_vip_health() {
    let text = format!("{BASE}[vip.health]\nintervall = \"1s\"\n");
    assert_error(&text, 11, 1, "unknown field `intervall`, expected one of");
}

#[test]
fn unknown_key_in_backend_health() {
    let text = format!("{BASE}health = {{ check = \"tcp\", retries = 3 }}\n");
    assert_error(&text, 10, 27, "unknown field `retries`");
}

#[test]
fn health_that_is_not_a_table() {
    let text = format!("{BASE}health = \"tcp\"\n");
    assert_error(&text, 10, 10, "expected a table of health-check settings");
}

#[test]
fn duration_without_a_unit() {
    let text = format!("{BASE}[vip.health]\ninterval = \"10\"\n");
    assert_error(
        &text,
        11,
        12,
        "interval \"10\" is not a duration (it has no unit): write a number and a unit, such as \"100ms\"",
    );
    let text = format!("{BASE}[vip.health]\ntimeout = \"fast\"\n");
    assert_error(
        &text,
        11,
        11,
        "timeout \"fast\" is not a duration (a number is missing): write a number and a unit",
    );
    let text = format!("{BASE}health = {{ interval = \"1 parsec\" }}\n");
    assert_error(&text, 10, 23, "(unknown unit `parsec`)");
    let text = format!("{BASE}health = {{ interval = \"0.5ns\" }}\n");
    assert_error(&text, 10, 23, "(too large, or finer than a nanosecond)");
}

#[test]
fn huge_durations_are_errors_not_panics() {
    for huge in [
        "18446744073709551615s 1000ms",
        "9999999999s",
        "1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s",
    ] {
        let text = format!("{BASE}[vip.health]\ninterval = \"{huge}\"\n");
        assert_error(&text, 11, 12, "(too many digits)");
    }
    let text = format!("{BASE}[vip.health]\ninterval = \"999999999years\"\n");
    assert_eq!(
        parse_ok(&text).vips[0].health.interval,
        Duration::from_secs(999_999_999 * 31_557_600)
    );
}

#[test]
fn duration_that_is_not_a_string() {
    let text = format!("{BASE}[vip.health]\ninterval = 10\n");
    assert_error(
        &text,
        11,
        12,
        "invalid type: integer `10`, expected a number and a unit, such as \"100ms\", \"1s\", \"1.5s\" or \"2m\"",
    );
}

#[test]
fn interval_too_short() {
    let text = format!("{BASE}[vip.health]\ninterval = \"5ms\"\ntimeout = \"1ms\"\n");
    assert_error(
        &text,
        11,
        12,
        "interval 5ms is shorter than the minimum, 10ms",
    );
}

#[test]
fn timeout_zero() {
    let text = format!("{BASE}[vip.health]\ntimeout = \"0s\"\n");
    assert_error(&text, 11, 11, "timeout must be greater than 0");
}

#[test]
fn timeout_longer_than_interval() {
    let text = format!("{BASE}[vip.health]\ninterval = \"1s\"\ntimeout = \"1.5s\"\n");
    assert_error(
        &text,
        12,
        11,
        "timeout 1s 500ms (line 12) is longer than interval 1s (line 11) for vip `web`",
    );
}

#[test]
fn default_timeout_follows_a_shorter_interval() {
    // Nobody wrote a timeout: the default 500ms would exceed the interval, so it is the interval.
    let text = format!("{BASE}[vip.health]\ninterval = \"200ms\"\n");
    let config = parse_ok(&text);
    assert_eq!(config.vips[0].health.timeout, Duration::from_millis(200));
    assert_eq!(
        config.vips[0].backends[0].health.timeout,
        Duration::from_millis(200)
    );
}

#[test]
fn a_backends_shorter_interval_caps_the_vips_timeout() {
    // The VIP's timeout is fine for the VIP; under the backend's own shorter interval it is
    // capped to that interval rather than refused.
    let text =
        format!("{BASE}health = {{ interval = \"200ms\" }}\n[vip.health]\ntimeout = \"300ms\"\n");
    let config = parse_ok(&text);
    assert_eq!(config.vips[0].health.timeout, Duration::from_millis(300));
    let backend = &config.vips[0].backends[0].health;
    assert_eq!(
        (backend.interval, backend.timeout),
        (Duration::from_millis(200), Duration::from_millis(200))
    );
    // Written next to the interval, a longer timeout is still an error.
    let text = format!("{BASE}health = {{ interval = \"200ms\", timeout = \"300ms\" }}\n");
    assert_error(
        &text,
        10,
        42,
        "timeout 300ms (line 10) is longer than interval 200ms (line 10)",
    );
}

#[test]
fn rise_and_fall_zero() {
    let text = format!("{BASE}[vip.health]\nrise = 0\n");
    assert_error(&text, 11, 8, "rise 0 is out of range 1..=4294967295");
    let text = format!("{BASE}health = {{ fall = 0 }}\n");
    assert_error(&text, 10, 19, "fall 0 is out of range 1..=4294967295");
}

#[test]
fn health_port_out_of_range() {
    let text = format!("{BASE}[vip.health]\nport = 70000\n");
    assert_error(&text, 11, 8, "port 70000 is out of range 1..=65535");
}

#[test]
fn path_must_start_with_a_slash() {
    let text = format!("{BASE}[vip.health]\ncheck = \"http\"\npath = \"healthz\"\n");
    assert_error(&text, 12, 8, "path `healthz` must start with `/`");
    let text = format!("{BASE}[vip.health]\ncheck = \"http\"\npath = \"/a b\"\n");
    assert_error(&text, 12, 8, "must not contain whitespace");
}

#[test]
fn expect_status_rules() {
    let text = format!("{BASE}[vip.health]\ncheck = \"http\"\nexpect_status = []\n");
    assert_error(&text, 12, 17, "expect_status must not be empty");
    let text = format!("{BASE}[vip.health]\ncheck = \"http\"\nexpect_status = [200, 600]\n");
    assert_error(&text, 12, 23, "expect_status 600 is out of range 100..=599");
    let text = format!("{BASE}[vip.health]\ncheck = \"http\"\nexpect_status = [99]\n");
    assert_error(&text, 12, 18, "expect_status 99 is out of range 100..=599");
}

#[test]
fn empty_host() {
    let text = format!("{BASE}[vip.health]\ncheck = \"http\"\nhost = \"\"\n");
    assert_error(
        &text,
        12,
        8,
        "host \"\" must be a non-empty Host header value",
    );
}

#[test]
fn key_of_another_check_kind() {
    let text = format!("{BASE}[vip.health]\ncheck = \"tcp\"\npath = \"/healthz\"\n");
    assert_error(
        &text,
        12,
        1,
        "`path` only applies to check = \"http\", but vip `web` has check = \"tcp\" (line 11)",
    );
    // Without `check`: the default, tcp.
    let text = format!("{BASE}[vip.health]\nsend = \"ping\"\n");
    assert_error(
        &text,
        11,
        1,
        "`send` only applies to check = \"udp\", but vip `web` has check = \"tcp\" (the default)",
    );
    let text = format!("{BASE}[vip.health]\ncheck = \"http\"\ncommand = [\"/bin/true\"]\n");
    assert_error(&text, 12, 1, "`command` only applies to check = \"exec\"");
    let text = format!(
        "{BASE}[vip.health]\ncheck = \"exec\"\ncommand = [\"/bin/true\"]\nexpect = \"x\"\n"
    );
    assert_error(&text, 13, 1, "`expect` only applies to check = \"udp\"");
    let text = format!("{BASE}[vip.health]\ncheck = \"none\"\nhost = \"a\"\n");
    assert_error(&text, 12, 1, "`host` only applies to check = \"http\"");
    let text =
        format!("{BASE}[vip.health]\ncheck = \"udp\"\nsend = \"x\"\nexpect_status = [200]\n");
    assert_error(
        &text,
        13,
        1,
        "`expect_status` only applies to check = \"http\"",
    );
}

#[test]
fn backend_key_of_the_vips_other_check_kind() {
    // The key is in the backend's table, the check kind comes from the VIP: point at the key.
    let text = format!("{BASE}health = {{ path = \"/ready\" }}\n[vip.health]\ncheck = \"tcp\"\n");
    assert_error(
        &text,
        10,
        12,
        "`path` only applies to check = \"http\", but backend 10.0.0.11 of vip `web` has check = \"tcp\" (line 12)",
    );
    // A dotted key, and a quoted one: still the key.
    let text = format!("{BASE}health.path = \"/ready\"\n");
    assert_error(&text, 10, 8, "`path` only applies to check = \"http\"");
    let text = format!("{BASE}health = {{ \"host\" = \"a\" }}\n");
    assert_error(&text, 10, 12, "`host` only applies to check = \"http\"");
}

#[test]
fn a_backend_with_another_check_kind_ignores_the_vips_keys_for_the_old_kind() {
    // The issue's own example: an http VIP, one backend checked with tcp at its own interval.
    let text = format!(
        "{BASE}health = {{ check = \"tcp\", interval = \"200ms\" }}\n[vip.health]\ncheck = \"http\"\npath = \"/healthz\"\nexpect_status = [200]\n"
    );
    let config = parse_ok(&text);
    let vip = &config.vips[0].health;
    assert_eq!(
        (vip.check, vip.path.as_str()),
        (CheckKind::Http, "/healthz")
    );
    let backend = &config.vips[0].backends[0].health;
    let mut expected = HealthConfig::defaults(80, Protocol::Tcp);
    expected.interval = Duration::from_millis(200);
    expected.timeout = Duration::from_millis(200);
    assert_eq!(
        *backend, expected,
        "http keys do not leak into the tcp backend"
    );
}

#[test]
fn udp_check_needs_send() {
    let text = format!("{BASE}[vip.health]\ncheck = \"udp\"\n");
    assert_error(
        &text,
        11,
        9,
        "check = \"udp\" needs `send`, the payload to send (a non-empty string), and vip `web` has none",
    );
    let text = format!("{BASE}health = {{ check = \"udp\" }}\n");
    assert_error(
        &text,
        10,
        20,
        "check = \"udp\" needs `send`, the payload to send (a non-empty string), and backend 10.0.0.11 of vip `web` has none",
    );
    let text = format!("{BASE}[vip.health]\ncheck = \"udp\"\nsend = \"\"\n");
    assert_error(&text, 12, 8, "send must not be empty");
    let text = format!("{BASE}[vip.health]\ncheck = \"udp\"\nsend = \"a\"\nexpect = \"\"\n");
    assert_error(&text, 13, 10, "expect must not be empty");
}

#[test]
fn exec_check_needs_a_command() {
    let text = format!("{BASE}[vip.health]\ncheck = \"exec\"\n");
    assert_error(&text, 11, 9, "check = \"exec\" needs `command`");
    let text = format!("{BASE}[vip.health]\ncheck = \"exec\"\ncommand = []\n");
    assert_error(&text, 12, 11, "command must not be empty");
    let text = format!("{BASE}[vip.health]\ncheck = \"exec\"\ncommand = [\"\", \"-x\"]\n");
    assert_error(
        &text,
        12,
        12,
        "the program (the first word of command) must not be empty",
    );
}

#[test]
fn announce_is_off_by_default() {
    assert_eq!(parse_ok(BASE).announce, AnnounceConfig::default());
    let only_file = parse_ok(&format!("{BASE}[announce]\nhealth_file = \"/run/lb/h\"\n"));
    assert_eq!(only_file.announce.route_table, None);
    assert_eq!(only_file.announce.health_file, Some("/run/lb/h".into()));
}

#[test]
fn announce_route_table_must_be_lbs_own() {
    for (table, needle) in [
        ("0", "route_table 0 is unspec"),
        ("253", "`default` table"),
        ("254", "`main` table"),
        ("255", "`local` table"),
        ("-1", "route_table -1 is out of range"),
        ("4294967296", "out of range"),
    ] {
        assert_error(
            &format!("{BASE}[announce]\nroute_table = {table}\n"),
            11,
            15,
            needle,
        );
    }
    for table in [1u32, 200, 252, 256, u32::MAX] {
        let config = parse_ok(&format!("{BASE}[announce]\nroute_table = {table}\n"));
        assert_eq!(config.announce.route_table, Some(table));
    }
}

#[test]
fn announce_rejects_bad_health_files_and_unknown_keys() {
    assert_error(
        &format!("{BASE}[announce]\nhealth_file = \"run/lb/health\"\n"),
        11,
        15,
        "health_file `run/lb/health` is not an absolute path",
    );
    assert_error(
        &format!("{BASE}[announce]\nhealth_file = \"/run/lb/\"\n"),
        11,
        15,
        "names a directory",
    );
    assert_error(
        &format!("{BASE}[announce]\nroute_tabel = 200\n"),
        11,
        1,
        "route_tabel",
    );
}

#[test]
fn the_flow_hold_is_twice_the_longest_interval_in_a_group_and_zero_alone() {
    use crate::announce::flow_hold;
    assert_eq!(
        flow_hold(&parse_ok(BASE)),
        Duration::ZERO,
        "a node on its own"
    );
    let group = |extra: &str| {
        parse_ok(&format!(
            "{BASE}health = {{ interval = \"{extra}\", timeout = \"10ms\" }}\n[announce]\nhealth_file = \"/run/lb/h\"\n"
        ))
    };
    assert_eq!(
        flow_hold(&group("100ms")),
        Duration::from_secs(1),
        "at least 1 s"
    );
    assert_eq!(flow_hold(&group("3s")), Duration::from_secs(6));
    assert_eq!(
        flow_hold(&group("1m")),
        Duration::from_secs(10),
        "at most 10 s"
    );
}

// ---- found by tests/config_fuzz.rs ----

#[test]
fn a_value_with_a_newline_is_escaped_in_the_one_line_error() {
    assert_error(
        "interface = '''\nmulti\nline'''\n",
        1,
        13,
        "interface name `multi\\nline`",
    );
}

#[test]
fn invalid_utf8_is_an_error_at_the_first_invalid_byte() {
    let error = Config::parse_bytes(b"interface = \"eth0\"\n# caf\xe9\n", Path::new(FILE))
        .expect_err("invalid UTF-8 parsed")
        .to_string();
    assert!(
        error.starts_with(&format!("{FILE}:2:6: not valid UTF-8 (byte 0xe9)")),
        "{error}"
    );
}

/// A key file for the `[sync]` tests, removed on drop.
struct TempKey(std::path::PathBuf);

impl TempKey {
    fn new(name: &str, content: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("lb-config-test-{name}-{}.key", std::process::id()));
        std::fs::write(&path, content).expect("write the key file");
        Self(path)
    }
}

impl Drop for TempKey {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n";

fn sync_section(listen: &str, peers: &str, key_file: &str) -> String {
    format!("{BASE}[sync]\nlisten = \"{listen}\"\npeers = [{peers}]\nkey_file = \"{key_file}\"\n")
}

#[test]
fn sync_is_off_by_default_and_reads_its_key() {
    assert_eq!(parse_ok(BASE).sync, None);
    let key = TempKey::new("good", KEY);
    let path = key.0.display().to_string();
    let config = parse_ok(&sync_section(
        "10.0.0.2:7946",
        "\"10.0.0.3:7946\", \"10.0.0.4:7946\"",
        &path,
    ));
    let sync = config.sync.expect("[sync] is on");
    assert_eq!(sync.listen, "10.0.0.2:7946".parse().unwrap());
    assert_eq!(
        sync.peers,
        vec![
            "10.0.0.3:7946".parse().unwrap(),
            "10.0.0.4:7946".parse().unwrap()
        ]
    );
    assert_eq!(sync.key_file, key.0);
    assert_eq!(
        sync.key,
        crate::sync::key::SyncKey::from_hex(KEY.trim()).unwrap()
    );
    let v6 = parse_ok(&sync_section("[fd00::2]:7946", "\"[fd00::3]:7946\"", &path));
    assert_eq!(v6.sync.expect("on").peers.len(), 1);
}

#[test]
fn sync_errors_point_at_the_value() {
    let key = TempKey::new("errors", KEY);
    let path = key.0.display().to_string();
    // `[sync]` is the line after BASE, then listen, peers and key_file.
    let line = BASE.lines().count();
    assert_error(
        &sync_section("10.0.0.2", "", &path),
        line + 2,
        10,
        "listen `10.0.0.2` is not an address and port",
    );
    assert_error(
        &sync_section("0.0.0.0:7946", "", &path),
        line + 2,
        10,
        "is the unspecified address 0.0.0.0",
    );
    assert_error(
        &sync_section("10.0.0.2:0", "", &path),
        line + 2,
        10,
        "has port 0",
    );
    assert_error(
        &sync_section("10.0.0.2:7946", "\"10.0.0.2:7946\"", &path),
        line + 3,
        10,
        "is this node's own listen address",
    );
    assert_error(
        &sync_section(
            "10.0.0.2:7946",
            "\"10.0.0.3:7946\", \"10.0.0.3:7946\"",
            &path,
        ),
        line + 3,
        27,
        "peer 10.0.0.3:7946 is listed twice",
    );
    assert_error(
        &sync_section("10.0.0.2:7946", "\"[fd00::3]:7946\"", &path),
        line + 3,
        10,
        "of another address family",
    );
    assert_error(
        &sync_section("10.0.0.2:7946", "", "sync.key"),
        line + 4,
        12,
        "key_file `sync.key` is not an absolute path",
    );
    assert_error(
        &sync_section("10.0.0.2:7946", "", "/nonexistent/lb/sync.key"),
        line + 4,
        12,
        "can't read the sync key",
    );
    let short = TempKey::new("short", "0011223344\n");
    assert_error(
        &sync_section("10.0.0.2:7946", "", &short.0.display().to_string()),
        line + 4,
        12,
        "expected 64 hex characters (32 bytes, e.g. `openssl rand -hex 32`), found 10 characters",
    );
    assert_error(
        &format!("{BASE}[sync]\nlisten = \"10.0.0.2:7946\"\nkey_file = \"{path}\"\nport = 1\n"),
        line + 4,
        1,
        "unknown field `port`",
    );
}

/// `[dns]` after BASE: `[dns]` on line 10, listen on 11, zone on 12, `names` from line 13.
fn dns_section(listen: &str, zone: &str, names: &str) -> String {
    format!("{BASE}[dns]\nlisten = [{listen}]\nzone = \"{zone}\"\n{names}")
}

const WWW: &str =
    "[[dns.name]]\nname = \"www\"\naddresses = [\"10.0.0.100\", \"192.0.2.1\", \"2001:db8::1\"]\n";

#[test]
fn dns_is_off_by_default_and_reads_names() {
    assert_eq!(parse_ok(BASE).dns, None);
    let config = parse_ok(&dns_section(
        "\"10.0.0.2:53\", \"[fd00::2]:53\"",
        "Svc.Example.",
        &format!(
            "{WWW}on_all_down = \"none\"\nhealth = {{ check = \"tcp\", port = 443, rise = 1 }}\n"
        ),
    ));
    let dns = config.dns.expect("[dns] is on");
    assert_eq!(dns.listen.len(), 2);
    assert_eq!(dns.zone, "svc.example.", "lower case");
    assert_eq!(dns.ttl, super::DEFAULT_DNS_TTL);
    let www = &dns.names[0];
    assert_eq!(www.name, "www");
    assert_eq!(www.addresses[2], ip("2001:db8::1"));
    assert_eq!(www.on_all_down, super::DnsAllDown::None);
    let health = www.health.as_ref().expect("health");
    assert_eq!(
        (health.check, health.port, health.rise),
        (CheckKind::Tcp, 443, 1)
    );
    let plain = parse_ok(&dns_section("\"10.0.0.2:53\"", "svc.example.", WWW));
    assert_eq!(
        plain.dns.unwrap().names[0].on_all_down,
        super::DnsAllDown::All
    );
}

#[test]
fn dns_errors_point_at_the_value() {
    assert_error(
        &dns_section("\"10.0.0.2\"", "svc.example.", WWW),
        11,
        11,
        "listen `10.0.0.2` is not an address and port",
    );
    assert_error(
        &dns_section("", "svc.example.", WWW),
        11,
        10,
        "listen is empty",
    );
    assert_error(
        &dns_section("\"10.0.0.2:53\", \"10.0.0.2:53\"", "svc.example.", WWW),
        11,
        26,
        "listed twice",
    );
    assert_error(
        &dns_section("\"10.0.0.2:53\"", "svc.example", WWW),
        12,
        8,
        "does not end in `.`",
    );
    assert_error(
        &dns_section("\"10.0.0.2:53\"", "svc..example.", WWW),
        12,
        8,
        "empty label",
    );
    let named = |name: &str| WWW.replace("name = \"www\"", &format!("name = \"{name}\""));
    assert_error(
        &dns_section("\"10.0.0.2:53\"", "svc.example.", &named("w w")),
        14,
        8,
        "dns name `w w` has label `w w`",
    );
    assert_error(
        &dns_section("\"10.0.0.2:53\"", "svc.example.", &named("-www")),
        14,
        8,
        "starts or ends with `-`",
    );
    assert_error(
        &dns_section("\"10.0.0.2:53\"", "svc.example.", &named("www.")),
        14,
        8,
        "names are relative to the zone",
    );
    assert_error(
        &dns_section(
            "\"10.0.0.2:53\"",
            "svc.example.",
            &WWW.replace("\"192.0.2.1\"", "\"192.0.2.300\""),
        ),
        15,
        28,
        "dns address `192.0.2.300` is not an IPv4 or IPv6 address",
    );
    assert_error(
        &dns_section("\"10.0.0.2:53\"", "svc.example.", &format!("{WWW}{WWW}")),
        17,
        8,
        "duplicate dns name `www`: the name on line 13 has it",
    );
    // Health for a name whose only address is a VIP of this node.
    assert_error(
        &dns_section(
            "\"10.0.0.2:53\"",
            "svc.example.",
            "[[dns.name]]\nname = \"web\"\naddresses = [\"10.0.0.100\"]\nhealth = { check = \"tcp\", port = 80 }\n",
        ),
        14,
        8,
        "every address of it is a VIP of this node",
    );
    assert_error(
        &dns_section(
            "\"10.0.0.2:53\"",
            "svc.example.",
            &format!("{WWW}health = {{ check = \"tcp\" }}\n"),
        ),
        14,
        8,
        "a tcp check needs `port`",
    );
    assert_error(
        &dns_section(
            "\"10.0.0.2:53\"",
            "svc.example.",
            &format!("{WWW}health = {{ port = 443, colour = 1 }}\n"),
        ),
        16,
        24,
        "unknown field `colour`",
    );
}

/// A one-VIP config with `extra` keys in the `[[vip]]` table and one backend at `backend`.
fn forwarding_vip(address: &str, protocol: &str, extra: &str, backend: &str) -> String {
    format!(
        "interface = \"eth0\"\n[[vip]]\nname = \"web\"\naddress = \"{address}\"\nport = 80\n\
         protocol = \"{protocol}\"\n{extra}\n[[vip.backend]]\naddress = \"{backend}\"\n"
    )
}

#[test]
fn forward_defaults_to_l2_and_gue_to_port_6080() {
    let plain = parse_ok(&forwarding_vip("10.0.0.100", "tcp", "", "10.0.0.11"));
    assert_eq!(plain.vips[0].forward, Forward::L2);
    assert!(plain.vips[0].encap_source.is_empty());
    assert!(!plain.vips[0].check_through_tunnel);
    let gue = parse_ok(&forwarding_vip(
        "10.0.0.100",
        "tcp",
        "forward = \"gue\"\ncheck_through_tunnel = true",
        "172.16.0.11",
    ));
    assert_eq!(gue.vips[0].forward, Forward::Gue { port: 6080 });
    assert!(gue.vips[0].check_through_tunnel);
    let ipip = parse_ok(&forwarding_vip(
        "10.0.0.100",
        "udp",
        "forward = \"ipip\"\nencap_source = [\"10.1.0.2\", \"2001:db8::2\"]",
        "2001:db8:5::11",
    ));
    assert_eq!(ipip.vips[0].forward, Forward::Ipip);
    assert_eq!(
        ipip.vips[0].encap_source,
        vec![
            "10.1.0.2".parse::<IpAddr>().unwrap(),
            "2001:db8::2".parse().unwrap()
        ]
    );
}

#[test]
fn encapsulation_keys_are_refused_where_they_do_not_apply() {
    assert_error(
        &forwarding_vip("10.0.0.100", "tcp", "gue_port = 7000", "10.0.0.11"),
        7,
        12,
        "gue_port is only for forward = \"gue\"; vip `web` forwards with l2",
    );
    assert_error(
        &forwarding_vip(
            "10.0.0.100",
            "tcp",
            "encap_source = \"10.1.0.2\"",
            "10.0.0.11",
        ),
        7,
        16,
        "encap_source is only for encapsulating VIPs",
    );
    assert_error(
        &forwarding_vip(
            "10.0.0.100",
            "udp",
            "forward = \"ipip\"\ncheck_through_tunnel = true",
            "10.0.0.11",
        ),
        8,
        24,
        "check_through_tunnel needs a TCP VIP",
    );
    assert_error(
        &forwarding_vip(
            "10.0.0.100",
            "tcp",
            "forward = \"ipip\"\nencap_source = [\"10.1.0.2\", \"10.1.0.3\"]",
            "10.0.0.11",
        ),
        8,
        16,
        "encap_source has two IPv4 addresses",
    );
    assert_error(
        &forwarding_vip("10.0.0.100", "tcp", "forward = \"vxlan\"", "10.0.0.11"),
        7,
        11,
        "unknown variant `vxlan`",
    );
    // IPv4 in IPv6 is a wire format; L2 still wants one family.
    parse_ok(&forwarding_vip(
        "10.0.0.100",
        "tcp",
        "forward = \"ipip\"",
        "2001:db8::11",
    ));
    assert_error(
        &forwarding_vip("10.0.0.100", "tcp", "", "2001:db8::11"),
        9,
        11,
        "backend 2001:db8::11 is IPv6 but vip `web` is IPv4",
    );
}
