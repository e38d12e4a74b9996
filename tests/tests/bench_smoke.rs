//! The benchmark binary runs end to end in quick mode and writes a well-formed report. No timing
//! is asserted: speed is measured by `cargo xtask bench`, never asserted in tests.

use std::{path::PathBuf, process::Command};

use lb_tests::bench::{
    control_plane::{self, maglev_name, state_change_name, state_change_prepared_name},
    per_packet::{self, names},
    sync,
};
use serde_json::Value;

/// Removes the output directory even when an assertion fails.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn expected_names() -> Vec<String> {
    let mut expected: Vec<String> = [
        names::TRIVIAL_REPEAT,
        names::TRIVIAL_LOOP,
        names::REFLECTOR_REPEAT,
        names::REFLECTOR_LOOP,
        names::TRIVIAL_CALL,
        names::REFLECTOR_CALL,
    ]
    .map(str::to_owned)
    .to_vec();
    let rep_b = per_packet::REPRESENTATIVE_BACKENDS;
    let flows = per_packet::QUICK_FLOWS;
    let rep_f = flows[flows.len() / 2];
    // Every VIP path over the whole backends × flows grid; the non-VIP path at every fill level.
    for path in names::GRID_PATHS {
        for b in per_packet::BACKENDS {
            for f in flows {
                expected.push(names::point(path, b, f));
            }
        }
    }
    for f in flows {
        expected.push(names::flows_point(names::NON_VIP_PASS, f));
    }
    // The call method (issue 11): the same grid for its VIP paths, the non-VIP path and the
    // changed-slot flow-table hit at every fill level.
    for path in names::CALL_GRID_PATHS {
        for b in per_packet::BACKENDS {
            for f in flows {
                expected.push(names::point(path, b, f));
            }
        }
    }
    for f in flows {
        expected.push(names::flows_point(names::CALL_NON_VIP, f));
        expected.push(names::point(
            names::CALL_ACK_V4_CHANGED,
            per_packet::CHANGED_VIP_BACKENDS,
            f,
        ));
        // Issue 13: the same ACK through encapsulating VIPs.
        for path in [names::CALL_ACK_V4_IPIP, names::CALL_ACK_V4_GUE] {
            expected.push(names::point(path, rep_b, f));
        }
        // Issue 12: new UDP flows with flow events on and off.
        for path in [
            names::NEW_FLOW_UDP_EVENTS_ON,
            names::NEW_FLOW_UDP_EVENTS_OFF,
        ] {
            expected.push(names::point(path, rep_b, f));
        }
    }
    expected.push(names::point(names::ESTABLISHED_V4_LOOP, rep_b, rep_f));
    for m in control_plane::RING_SIZES {
        for n in control_plane::BACKENDS {
            expected.push(maglev_name(n, m));
        }
    }
    for n in control_plane::BACKENDS {
        expected.push(state_change_name(n));
        expected.push(state_change_prepared_name(n));
    }
    expected
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn quick_per_packet_and_control_plane_write_a_complete_report() {
    let out = TempDir(std::env::temp_dir().join(format!("lb-bench-smoke-{}", std::process::id())));
    let output = Command::new(env!("CARGO_BIN_EXE_lb-bench"))
        .args([
            "--quick",
            "--only",
            "per-packet",
            "--only",
            "control-plane",
            "--out",
        ])
        .arg(&out.0)
        .output()
        .expect("lb-bench starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "lb-bench failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(stdout.contains("[targets]"), "no targets in:\n{stdout}");

    let text = std::fs::read_to_string(out.0.join("report.json")).expect("report.json written");
    let report: Value = serde_json::from_str(&text).expect("report.json parses");
    for key in ["cpu", "cores", "kernel", "date"] {
        assert!(
            !report["machine"][key].is_null(),
            "machine.{key} missing: {}",
            report["machine"]
        );
    }
    let figures = report["figures"].as_array().expect("figures array");
    let by_name = |name: &str| figures.iter().find(|f| f["name"] == name);
    for name in expected_names() {
        let figure = by_name(&name).unwrap_or_else(|| panic!("no figure {name} in the report"));
        let median = figure["median"]
            .as_f64()
            .unwrap_or_else(|| panic!("{name}: median is not a finite number: {figure}"));
        let samples = figure["samples"].as_array().expect("samples");
        assert!(samples.len() >= 5, "{name}: {} samples", samples.len());
        for key in ["min", "max", "unit"] {
            assert!(!figure[key].is_null(), "{name}: {key} missing");
        }
        // The reflector's figures are the net cost of a 3-instruction program over the trivial
        // one: a few ns, which noise can push to or below zero. Everything else costs far more.
        if !name.starts_with("reflector/") {
            assert!(median > 0.0, "{name}: median {median}");
        }
        if let Some(baseline) = figure["baseline"].as_str() {
            assert!(
                by_name(baseline).is_some(),
                "{name}: baseline {baseline} not in the report"
            );
        }
    }
    let targets = report["targets"].as_array().expect("targets array");
    // Issues 4 and 11 (the state change twice: cold and prepared), the two encapsulation rows and
    // the next-hop row (issue 13), the flow-event row, and four sync rows (not measured here).
    assert_eq!(targets.len(), 21, "{targets:?}");
    // The prepared state change is measured as such: every sample used its prepared table.
    for n in control_plane::BACKENDS {
        let name = state_change_prepared_name(n);
        let figure = by_name(&name).expect("checked above");
        assert_eq!(figure["params"]["prepared"], "true", "{figure}");
        let cold = by_name(&state_change_name(n)).expect("checked above");
        assert_eq!(cold["params"]["prepared"], "false", "{cold}");
    }
    for mode in ["ipip", "gue"] {
        let row = targets
            .iter()
            .find(|t| {
                t["name"]
                    .as_str()
                    .is_some_and(|n| n.contains(&format!("forward = {mode}")))
            })
            .unwrap_or_else(|| panic!("no {mode} row in {targets:?}"));
        assert!(
            row["value"].as_f64().is_some_and(|v| v > 1.0),
            "{mode}: measured beside the MAC-swap program: {row}"
        );
    }
    // Per-packet and control plane ran: every target of theirs has a verdict.
    for target in targets {
        let name = target["name"].as_str().unwrap_or_default();
        if !name.contains("throughput") && target["info"] == false {
            assert!(target["reached"].is_boolean(), "{target}");
        }
    }

    // The grid, and nothing else, in the per-packet and per-call groups.
    let in_group = |group: &str| figures.iter().filter(|f| f["group"] == group).count();
    let expected_per_packet = expected_names()
        .iter()
        .filter(|n| {
            !n.starts_with("maglev_build/")
                && !n.starts_with("state_change/")
                && !n.starts_with("state_change_prepared/")
        })
        .count();
    assert_eq!(
        in_group(per_packet::GROUP) + in_group(per_packet::CALL_GROUP),
        expected_per_packet
    );
    // Call-method figures are gross, each beside the reflector measured the same way.
    for figure in figures
        .iter()
        .filter(|f| f["group"] == per_packet::CALL_GROUP)
    {
        assert_eq!(figure["params"]["method"], "call", "{figure}");
        if !figure["name"]
            .as_str()
            .unwrap_or_default()
            .contains("/call")
        {
            assert_eq!(figure["baseline"], names::REFLECTOR_CALL, "{figure}");
        }
    }
    for f in per_packet::QUICK_FLOWS {
        let name = names::flows_point(names::NON_VIP_PASS, f);
        let params = &by_name(&name).expect("checked above")["params"];
        assert!(
            params["backends"]
                .as_str()
                .is_some_and(|b| b.starts_with("n/a")),
            "{name}: {params}"
        );
    }

    let md = std::fs::read_to_string(out.0.join("report.md")).expect("report.md written");
    assert!(md.contains("vip_established_v4/backends=1000"), "{md}");
    assert!(
        md.contains("net median ns by path, backends and flows"),
        "{md}"
    );
    let svg = std::fs::read_to_string(out.0.join("cost_vs_flows.svg")).expect("SVG written");
    assert!(svg.starts_with("<svg") && svg.contains("</svg>"), "{svg}");
}

/// The sync part on its own, quick: two real daemons replicate every generated flow, and the
/// report has its figures and rows with values.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn quick_sync_replicates_every_flow_and_reports_it() {
    let out = TempDir(std::env::temp_dir().join(format!("lb-bench-sync-{}", std::process::id())));
    let output = Command::new(env!("CARGO_BIN_EXE_lb-bench"))
        .args(["--quick", "--only", "sync", "--out"])
        .arg(&out.0)
        .output()
        .expect("lb-bench starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "lb-bench failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let text = std::fs::read_to_string(out.0.join("report.json")).expect("report.json written");
    let report: Value = serde_json::from_str(&text).expect("report.json parses");
    let figures = report["figures"].as_array().expect("figures array");
    let by_name = |name: &str| {
        figures
            .iter()
            .find(|f| f["name"] == name)
            .unwrap_or_else(|| panic!("no figure {name} in the report"))
    };
    for rate in sync::RATES {
        let lag = by_name(&sync::names::lag(rate));
        assert_eq!(lag["group"], sync::GROUP);
        assert!(lag["median"].as_f64().is_some_and(|m| m > 0.0), "{lag}");
        // The counts behind the figures hang together (losses are measured, not asserted:
        // they depend on the machine's load).
        let count = |key: &str| -> u64 {
            lag["params"][key]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{key} in {lag}"))
        };
        let generated = count("flows_generated");
        assert!(generated > 0, "{lag}");
        assert!(count("recorded_by_a") * 2 >= generated, "{lag}");
        assert!(count("flows_installed_b") > 0, "{lag}");
        assert!(
            count("flows_installed_b") <= count("flows_received_b"),
            "{lag}"
        );
        assert!(count("flows_received_b") <= count("flows_sent_a"), "{lag}");
        assert!(count("flows_sent_a") <= count("recorded_by_a"), "{lag}");
        for name in [
            sync::names::reached_peer(rate),
            sync::names::cpu_sender(rate),
            sync::names::cpu_receiver(rate),
            sync::names::bytes_per_flow(rate),
        ] {
            let figure = by_name(&name);
            assert!(
                figure["median"].as_f64().is_some_and(|m| m > 0.0),
                "{figure}"
            );
        }
    }
    let targets = report["targets"].as_array().expect("targets array");
    let sync_rows: Vec<&Value> = targets
        .iter()
        .filter(|t| {
            let name = t["name"].as_str().unwrap_or_default();
            name.starts_with("replication lag")
                || name.starts_with("daemon CPU")
                || name == "bytes per replicated flow"
        })
        .collect();
    assert_eq!(sync_rows.len(), 4, "{targets:?}");
    for row in sync_rows {
        assert!(row["value"].as_f64().is_some(), "{row}");
        assert_eq!(row["info"], true, "{row}");
    }
    assert_eq!(
        lb_tests::ecmp::leftovers(sync::LAB_PREFIX),
        Vec::<String>::new()
    );
}
