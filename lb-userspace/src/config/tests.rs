//! Config tests: a full valid file, defaults, and every error with its exact line and column.

use std::net::IpAddr;
use std::path::Path;

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
        vips: vec![
            VipConfig {
                name: "web".into(),
                address: ip("10.0.0.100"),
                port: 80,
                protocol: Protocol::Tcp,
                backends: vec![
                    BackendConfig {
                        address: ip("10.0.0.11"),
                        weight: 200,
                    },
                    BackendConfig {
                        address: ip("10.0.0.12"),
                        weight: 0,
                    },
                ],
            },
            VipConfig {
                name: "dns.v6-1".into(),
                address: ip("2001:db8::53"),
                port: 53,
                protocol: Protocol::Udp,
                backends: vec![BackendConfig {
                    address: ip("2001:db8::1"),
                    weight: DEFAULT_WEIGHT,
                }],
            },
            VipConfig {
                name: "empty".into(),
                address: ip("10.0.0.101"),
                port: 65535,
                protocol: Protocol::Udp,
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
                weight: 100
            },
            BackendConfig {
                address: ip("fd00::12"),
                weight: 7
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
