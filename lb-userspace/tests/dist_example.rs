//! The example config shipped in `dist/` is valid and shows every key.

use std::path::Path;

use lb::config::{CheckKind, Config, Protocol};

fn example_path() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../dist/lb.toml.example"
    ))
}

#[test]
fn the_example_config_loads() {
    let config = Config::load(example_path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.interface, "eth0");
    assert_eq!(config.api, Path::new("/run/lb/lb.sock"));
    assert_eq!(config.metrics, Some("127.0.0.1:9100".parse().unwrap()));
    assert_eq!(config.announce.route_table, Some(200));
    assert_eq!(
        config.announce.health_file.as_deref(),
        Some(Path::new("/run/lb/health"))
    );
    let dns = config.dns.as_ref().expect("the example has [dns]");
    assert_eq!(dns.zone, "svc.example.");
    assert!(dns.names[0].health.is_some());
    assert!(config.vips.iter().any(|v| v.address.is_ipv6()));
    assert!(config.vips.iter().any(|v| v.protocol == Protocol::Udp));
    assert!(
        config
            .vips
            .iter()
            .flat_map(|v| &v.backends)
            .any(|b| b.standby)
    );
    // A check of each kind that has settings of its own, so each kind's keys are shown valid.
    for kind in [
        CheckKind::Tcp,
        CheckKind::Http,
        CheckKind::Udp,
        CheckKind::Exec,
    ] {
        assert!(
            config
                .vips
                .iter()
                .flat_map(|v| &v.backends)
                .any(|b| b.health.check == kind),
            "no backend checked with {kind}"
        );
    }
}

/// Every key the config knows is written in the example (as `key =`, outside a comment), so an
/// operator finds them all there. A key added to the config belongs here and in the example.
#[test]
fn the_example_config_shows_every_key() {
    let text = std::fs::read_to_string(example_path()).expect("read the example");
    let written: Vec<&str> = text
        .lines()
        .map(|line| line.split('#').next().unwrap_or_default())
        .collect();
    let keys = [
        // top level
        "interface",
        "xdp_mode",
        "ring_size",
        "max_vips",
        "max_backends",
        "flow_table_size",
        "api",
        "metrics",
        // [announce]
        "route_table",
        "health_file",
        // [dns] and [[dns.name]]
        "listen",
        "zone",
        "ttl",
        "addresses",
        // [[vip]]
        "name",
        "address",
        "port",
        "protocol",
        "min_healthy",
        "on_all_down",
        // [vip.health] and a backend's health = { ... }
        "check",
        "interval",
        "timeout",
        "rise",
        "fall",
        "path",
        "expect_status",
        "host",
        "send",
        "expect",
        "command",
        // [[vip.backend]]
        "weight",
        "standby",
        "health",
    ];
    for key in keys {
        let assignment = format!("{key} =");
        let inline = format!("{{ {key} =");
        let inline_later = format!(", {key} =");
        assert!(
            written.iter().any(|line| {
                line.trim_start().starts_with(&assignment)
                    || line.contains(&inline)
                    || line.contains(&inline_later)
            }),
            "the example does not show `{key}`"
        );
    }
    for table in ["[[vip]]", "[vip.health]", "[[vip.backend]]"] {
        assert!(text.contains(table), "the example has no {table}");
    }
}
