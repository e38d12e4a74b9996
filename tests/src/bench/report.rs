//! The benchmark report: a table on stdout, `report.json`, `report.md`, the targets of issues 4
//! and 11 (reached or missed; information rows, `info`, have no goal), the programs' sizes
//! (translated instructions, JIT bytes, instructions the verifier processed), and the SVG plots
//! `cost_vs_flows.svg` and `throughput.svg`.
//!
//! Issue 12's rows (all `info`): replication lag per rate of the sync part (median, with the
//! worst and the counts of flows generated, recorded, sent, received and installed in the
//! detail), the daemons' CPU at the highest rate, and bytes per replicated flow.
//!
//! Issue 11's per-packet targets are ratios of the call method (`per_call` group: repeat=1 calls
//! on the same frame, gross, over the MAC-swap reflector measured the same way), the worst grid
//! point of each path; each target's detail also gives the path's figures by the repeat method
//! (net of the trivial program; the loop method for the SYN), so both methods are side by side.
//!
//! `report.md` has, after the per-packet table, the same medians as a grid: a row per path and
//! backend count, a column per fill level. `cost_vs_flows.svg` plots the established IPv4 path (a
//! line per backend count) and, dashed, the established IPv6 and UDP paths at
//! `REPRESENTATIVE_BACKENDS`.
//!
//! `report.json`:
//!
//! ```json
//! {
//!   "machine": { "cpu": "AMD EPYC", "cores": 2, "kernel": "6.18.44", "date": "2026-01-01T00:00:00Z" },
//!   "command": "lb-bench --trials 7",
//!   "figures": [
//!     { "group": "per_packet", "name": "vip_established_v4/backends=1/flows=1000", "unit": "ns",
//!       "min": 30.1, "median": 31.0, "max": 33.2, "samples": [31.0, ...],
//!       "baseline": "reflector/repeat", "baseline_median": 2.1, "ratio": 14.7,
//!       "params": { "backends": "1", ... } }
//!   ],
//!   "targets": [ { "name": "...", "goal": "...", "value": 14.7, "unit": "x", "reached": false,
//!                  "detail": "..." } ]
//! }
//! ```
//!
//! `ratio` is the figure's median over its baseline's median (`null` without a baseline, or when
//! the baseline's median is not above zero: a net cost lost in the noise has no ratio).
//! `reached` is `null` for a target whose figures were not measured in this run.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use plotters::prelude::*;
use serde_json::{Value, json};

use super::{
    Figure,
    control_plane::{maglev_name, state_change_name, state_change_prepared_name},
    per_packet::{self, REPRESENTATIVE_BACKENDS, names},
    sync,
};

/// The machine a run was made on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Machine {
    /// `model name` from /proc/cpuinfo.
    pub cpu: String,
    /// Online CPUs.
    pub cores: usize,
    /// `uname -r`.
    pub kernel: String,
    /// UTC, ISO 8601.
    pub date: String,
}

impl Machine {
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| {
                let (key, value) = l.split_once(':')?;
                (key.trim() == "model name").then(|| value.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let cores = cpuinfo
            .lines()
            .filter(|l| l.split(':').next().is_some_and(|k| k.trim() == "processor"))
            .count()
            .max(1);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".to_owned());
        Self {
            cpu,
            cores,
            kernel,
            date: utc_now(),
        }
    }
}

/// Now as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// One of issue 4's targets, evaluated on this run's figures.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub name: String,
    /// The goal in words, e.g. "<= 2x".
    pub goal: String,
    /// The value compared with the goal, if measured.
    pub value: Option<f64>,
    pub unit: String,
    /// `None`: not measured in this run.
    pub reached: Option<bool>,
    /// Where the value comes from.
    pub detail: String,
    /// A figure shown beside the targets, with no goal of its own.
    pub info: bool,
}

impl Target {
    pub fn verdict(&self) -> &'static str {
        match self.reached {
            _ if self.info => "info",
            Some(true) => "reached",
            Some(false) => "MISSED",
            None => "not measured",
        }
    }
}

fn find<'a>(figures: &'a [Figure], name: &str) -> Option<&'a Figure> {
    figures.iter().find(|f| f.name == name)
}

fn baseline_median(figures: &[Figure], figure: &Figure) -> Option<f64> {
    let base = find(figures, figure.baseline.as_deref()?)?;
    Some(base.median())
}

/// The figure's median over its baseline's median; `None` without a baseline or when the
/// baseline's median is not above zero (a net cost lost in the noise has no meaningful ratio).
pub fn ratio(figures: &[Figure], figure: &Figure) -> Option<f64> {
    let base = baseline_median(figures, figure)?;
    (base > 0.0).then(|| figure.median() / base)
}

fn param(figure: &Figure, key: &str) -> Option<u64> {
    figure.params.get(key)?.parse().ok()
}

/// The established-IPv4 grid: (backends, flows, figure).
fn established_grid<'a>(figures: &'a [Figure], path: &str) -> Vec<(u64, u64, &'a Figure)> {
    let prefix = format!("{path}/");
    let mut grid: Vec<_> = figures
        .iter()
        .filter(|f| f.name.starts_with(&prefix))
        .filter_map(|f| Some((param(f, "backends")?, param(f, "flows")?, f)))
        .collect();
    grid.sort_by_key(|&(b, f, _)| (b, f));
    grid
}

/// The figures of `path` (named `path/...`), in report order.
fn points<'a>(figures: &'a [Figure], path: &str) -> Vec<&'a Figure> {
    let prefix = format!("{path}/");
    figures
        .iter()
        .filter(|f| f.name.starts_with(&prefix))
        .collect()
}

/// A figure's point in the grid, for details: "b=100 f=1000", "f=1000".
fn point_label(f: &Figure) -> String {
    match (param(f, "backends"), param(f, "flows")) {
        (Some(b), Some(fl)) => format!("b={b} f={fl}"),
        (None, Some(fl)) => format!("f={fl}"),
        _ => f.name.clone(),
    }
}

fn gross_of(f: &Figure) -> f64 {
    f.params
        .get("gross_median_ns")
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// (worst, best, worst figure) of the ratios of `figs` to their baselines.
fn worst_ratio<'a>(figures: &[Figure], figs: &[&'a Figure]) -> Option<(f64, f64, &'a Figure)> {
    let rated: Vec<(f64, &Figure)> = figs
        .iter()
        .filter_map(|f| Some((ratio(figures, f)?, *f)))
        .collect();
    let worst = rated
        .iter()
        .copied()
        .reduce(|a, b| if b.0 > a.0 { b } else { a })?;
    let best = rated.iter().map(|r| r.0).fold(f64::INFINITY, f64::min);
    Some((worst.0, best, worst.1))
}

/// Issue 11's per-call target for `path` (call method, gross, worst grid point), with the
/// other method's figures of the same path (`other`: repeat or loop, net) in the detail.
fn call_target(
    figures: &[Figure],
    name: &str,
    path: &str,
    max: f64,
    other: &str,
    other_method: &str,
) -> Target {
    let figs = points(figures, path);
    let worst = worst_ratio(figures, &figs);
    let reflector = find(figures, names::REFLECTOR_CALL).map(Figure::median);
    let detail = match (worst, reflector) {
        (Some((w, b, fig)), Some(r)) => {
            let mut d = format!(
                "call method (repeat=1 on the same frame, gross): worst of {} points {} = \
                 {} ns vs reflector/call {} ns = {}x (best {}x); net of trivial/call {} ns",
                figs.len(),
                point_label(fig),
                fmt_num(fig.median()),
                fmt_num(r),
                fmt_num(w),
                fmt_num(b),
                fig.params.get("net_median_ns").map_or("-", String::as_str),
            );
            let others = points(figures, other);
            if let Some((ow, ob, ofig)) = worst_ratio(figures, &others) {
                let base = ofig.baseline.as_deref().and_then(|n| find(figures, n));
                let _ = write!(
                    d,
                    "; {other_method} method ({other}, net): worst {}x at {} ({} ns vs {} ns net, \
                     best {}x), gross {} ns vs {} ns = {}x",
                    fmt_num(ow),
                    point_label(ofig),
                    fmt_num(ofig.median()),
                    fmt_num(base.map_or(f64::NAN, Figure::median)),
                    fmt_num(ob),
                    fmt_num(gross_of(ofig)),
                    fmt_num(base.map_or(f64::NAN, gross_of)),
                    fmt_num(gross_of(ofig) / base.map_or(f64::NAN, gross_of)),
                );
            }
            d
        }
        _ => "per-call figures not measured".to_owned(),
    };
    let value = worst.map(|w| w.0);
    Target {
        name: name.to_owned(),
        goal: format!("<= {max}x"),
        value,
        unit: "x".to_owned(),
        reached: value.map(|v| v <= max),
        detail,
        info: false,
    }
}

/// A throughput ratio figure (`throughput/<numerator>_vs_<denominator>`): its median, and a
/// detail naming what it divides.
fn throughput_ratio(figures: &[Figure], ratio_name: &str) -> (Option<f64>, String) {
    let Some(figure) = find(figures, ratio_name) else {
        return (None, "throughput not measured".to_owned());
    };
    let named = |key: &str| figure.params.get(key).cloned().unwrap_or_default();
    let (numerator, denominator) = (named("numerator"), named("denominator"));
    let mpps = |n: &str| fmt_num(find(figures, n).map_or(f64::NAN, Figure::median));
    (
        Some(figure.median()),
        format!(
            "{ratio_name} (median of per-trial ratios); {numerator} {} Mpps, {denominator} {} Mpps",
            mpps(&numerator),
            mpps(&denominator)
        ),
    )
}

/// The targets of issues 4 and 11, and information rows (no goal) beside them.
pub fn targets(figures: &[Figure]) -> Vec<Target> {
    let mut out = vec![
        call_target(
            figures,
            "IPv4 TCP ACK, established, unchanged slot, vs MAC-swap per call",
            names::CALL_ACK_V4,
            2.0,
            names::ESTABLISHED_V4,
            "repeat",
        ),
        call_target(
            figures,
            "IPv6 TCP ACK, established, unchanged slot, vs MAC-swap per call",
            names::CALL_ACK_V6,
            2.1,
            names::ESTABLISHED_V6,
            "repeat",
        ),
        call_target(
            figures,
            "IPv4 TCP SYN, new flow, unchanged slot, vs MAC-swap per call",
            names::CALL_SYN_V4,
            2.0,
            names::NEW_FLOW_V4,
            "loop (a fresh SYN per call)",
        ),
        call_target(
            figures,
            "non-VIP IPv4 TCP (passed to the host) vs MAC-swap per call",
            names::CALL_NON_VIP,
            1.35,
            names::NON_VIP_PASS,
            "repeat",
        ),
    ];

    // Flat within 10% over flows and backends (issue 4; repeat method, net).
    let grid = established_grid(figures, names::ESTABLISHED_V4);
    let medians: Vec<f64> = grid.iter().map(|(_, _, f)| f.median()).collect();
    let flat = (medians.len() >= 2).then(|| {
        let max = medians.iter().copied().fold(f64::MIN, f64::max);
        let min = medians.iter().copied().fold(f64::MAX, f64::min);
        (max / min - 1.0) * 100.0
    });
    out.push(Target {
        name: "established IPv4 path flat over 1k..1M flows and 1..1000 backends".to_owned(),
        goal: "max/min - 1 <= 10%".to_owned(),
        value: flat,
        unit: "%".to_owned(),
        reached: flat.map(|v| v <= 10.0),
        detail: if medians.is_empty() {
            "per-packet not measured".to_owned()
        } else {
            format!(
                "repeat method, net medians over {} grid points: {}",
                medians.len(),
                grid.iter()
                    .map(|(b, f, fig)| format!("b={b} f={f}: {:.1}", fig.median()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
        info: false,
    });

    let (tcp, tcp_detail) = throughput_ratio(figures, "throughput/lb_tcp_vs_reflector_tcp");
    let (udp, udp_detail) = throughput_ratio(figures, "throughput/lb_vs_reflector");
    out.push(Target {
        name: "live-frames throughput, lb vs MAC-swap reflector (TCP ACK frames)".to_owned(),
        goal: ">= 0.8x".to_owned(),
        value: tcp,
        unit: "x".to_owned(),
        reached: tcp.map(|v| v >= 0.8),
        detail: tcp_detail,
        info: false,
    });
    out.push(Target {
        name: "live-frames throughput, lb vs MAC-swap reflector (UDP frames)".to_owned(),
        goal: "info".to_owned(),
        value: udp,
        unit: "x".to_owned(),
        reached: None,
        detail: udp_detail,
        info: true,
    });
    let (nft, nft_detail) = throughput_ratio(figures, "throughput/lb_vs_nftables_dnat");
    out.push(Target {
        name: "throughput: lb vs nftables DNAT".to_owned(),
        goal: ">= 5x".to_owned(),
        value: nft,
        unit: "x".to_owned(),
        reached: nft.map(|v| v >= 5.0),
        detail: nft_detail,
        info: false,
    });

    let maglev = find(figures, &maglev_name(1000, 65537)).map(Figure::median);
    out.push(Target {
        name: "Maglev build, 1000 backends, M=65537".to_owned(),
        goal: "< 10 ms".to_owned(),
        value: maglev,
        unit: "ms".to_owned(),
        reached: maglev.map(|v| v < 10.0),
        detail: maglev.map_or("control plane not measured".to_owned(), |_| {
            maglev_name(1000, 65537)
        }),
        info: false,
    });

    for (name_of, title) in [
        (
            state_change_name as fn(u32) -> String,
            "backend state change -> live ring, 1000 backends, M=65537 (cold: the Maglev build \
             in the change; operator changes, reloads, rise/fall = 1)",
        ),
        (
            state_change_prepared_name,
            "backend state change -> live ring, 1000 backends, M=65537 (health-driven, rise/fall \
             >= 2: the table prepared on the check before)",
        ),
    ] {
        let changes: Vec<(u32, f64)> = super::control_plane::BACKENDS
            .iter()
            .filter_map(|&n| Some((n, find(figures, &name_of(n))?.median())))
            .collect();
        let at_1000 = find(figures, &name_of(1000)).map(Figure::median);
        out.push(Target {
            name: title.to_owned(),
            goal: "< 1 ms".to_owned(),
            value: at_1000,
            unit: "ms".to_owned(),
            reached: at_1000.map(|v| v < 1.0),
            detail: if changes.is_empty() {
                "control plane not measured".to_owned()
            } else {
                format!(
                    "{}; medians: {}",
                    name_of(1000),
                    changes
                        .iter()
                        .map(|(n, v)| format!("{n} backends {v:.3} ms"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
            info: false,
        });
    }

    let syn = find(figures, "throughput/lb_tcp_syn");
    out.push(Target {
        name: "new TCP flows per second through the program (live frames, every frame a SYN)"
            .to_owned(),
        goal: "info".to_owned(),
        value: syn.map(Figure::median),
        unit: " M/s".to_owned(),
        reached: None,
        detail: syn.map_or("throughput not measured".to_owned(), |f| {
            format!(
                "throughput/lb_tcp_syn (SYNs forwarded per second); the TCP VIP counted {} new \
                 flows in {} packets (fraction {}), warm-ups included",
                f.params
                    .get("tcp_vip_new_flows")
                    .map_or("?", String::as_str),
                f.params.get("tcp_vip_packets").map_or("?", String::as_str),
                f.params
                    .get("tcp_vip_new_flow_fraction")
                    .map_or("?", String::as_str),
            )
        }),
        info: true,
    });

    // What the flow table costs: a changed slot's flow-table hit against the unchanged-slot ACK
    // of a VIP with as many backends, at each fill level.
    let changed = points(figures, names::CALL_ACK_V4_CHANGED);
    let worst = worst_ratio(figures, &changed);
    let extra: Vec<String> = changed
        .iter()
        .filter_map(|c| {
            let flows = param(c, "flows")?;
            let unchanged = find(
                figures,
                &names::point(
                    names::CALL_ACK_V4,
                    per_packet::CHANGED_VIP_BACKENDS,
                    flows as u32,
                ),
            )?;
            Some(format!(
                "f={flows}: {} ns vs {} ns unchanged (+{} ns)",
                fmt_num(c.median()),
                fmt_num(unchanged.median()),
                fmt_num(c.median() - unchanged.median())
            ))
        })
        .collect();
    out.push(Target {
        name: "IPv4 TCP ACK, changed slot, flow-table hit, vs MAC-swap per call".to_owned(),
        goal: "info".to_owned(),
        value: worst.map(|w| w.0),
        unit: "x".to_owned(),
        reached: None,
        detail: if extra.is_empty() {
            "per-call figures not measured".to_owned()
        } else {
            format!(
                "call method, gross, {} backends: {}",
                per_packet::CHANGED_VIP_BACKENDS,
                extra.join("; ")
            )
        },
        info: true,
    });
    out.extend(encap_targets(figures));
    out.push(next_hop_target(figures));
    out.push(flow_events_target(figures));
    out.extend(sync_targets(figures));
    out
}

/// Issue 13 (information rows): the ipip and gue paths per call, beside the MAC-swap program and
/// the L2 path of the same frame at the same point.
fn encap_targets(figures: &[Figure]) -> Vec<Target> {
    [
        ("ipip", names::CALL_ACK_V4_IPIP),
        ("gue", names::CALL_ACK_V4_GUE),
    ]
    .into_iter()
    .map(|(mode, path)| {
        let figs = points(figures, path);
        let worst = worst_ratio(figures, &figs);
        let beside_l2: Vec<String> = figs
            .iter()
            .filter_map(|c| {
                let flows = param(c, "flows")?;
                let l2 = find(
                    figures,
                    &names::point(
                        names::CALL_ACK_V4,
                        per_packet::REPRESENTATIVE_BACKENDS,
                        flows as u32,
                    ),
                )?;
                Some(format!(
                    "f={flows}: {} ns vs {} ns l2 ({}x, +{} ns)",
                    fmt_num(c.median()),
                    fmt_num(l2.median()),
                    fmt_num(c.median() / l2.median()),
                    fmt_num(c.median() - l2.median())
                ))
            })
            .collect();
        Target {
            name: format!("IPv4 TCP ACK, forward = {mode}, unchanged slot, vs MAC-swap per call"),
            goal: "info".to_owned(),
            value: worst.map(|w| w.0),
            unit: "x".to_owned(),
            reached: None,
            detail: if beside_l2.is_empty() {
                "per-call figures not measured".to_owned()
            } else {
                format!(
                    "call method, gross, {} backends, beside the l2 path of the same frame: {}",
                    per_packet::REPRESENTATIVE_BACKENDS,
                    beside_l2.join("; ")
                )
            },
            info: true,
        }
    })
    .collect()
}

/// "1k", "50k" (rates in the sync rows' names).
fn rate_label(rate: u32) -> String {
    if rate >= 1000 && rate.is_multiple_of(1000) {
        format!("{}k", rate / 1000)
    } else {
        rate.to_string()
    }
}

fn param_text<'a>(figure: &'a Figure, key: &str) -> &'a str {
    figure.params.get(key).map_or("?", String::as_str)
}

/// Issue 12 under load (information rows): replication lag per rate, the daemons' CPU at the
/// highest rate, bytes per replicated flow.
fn sync_targets(figures: &[Figure]) -> Vec<Target> {
    let info = |name: String, value: Option<f64>, unit: &str, detail: String| Target {
        name,
        goal: "info".to_owned(),
        value,
        unit: unit.to_owned(),
        reached: None,
        detail,
        info: true,
    };
    let not_measured = || "sync not measured".to_owned();
    let mut out = Vec::new();
    for rate in sync::RATES {
        let lag = find(figures, &sync::names::lag(rate));
        let reached = find(figures, &sync::names::reached_peer(rate));
        let detail = lag.map_or_else(not_measured, |f| {
            let achieved: f64 = param_text(f, "achieved_rate").parse().unwrap_or(f64::NAN);
            let shortfall = if achieved < f64::from(rate) * 0.95 {
                format!(
                    "; RATE NOT REACHED: the generator achieved {achieved:.0} flows/s of {rate}"
                )
            } else {
                String::new()
            };
            format!(
                "median {} ms, worst {} ms, p99 {} ms over {} sampled flows (one in {}; {} \
                 not seen within 2 s) of {} generated at {} flows/s achieved{shortfall}; A \
                 recorded {}, sent {} (events lost {}, queue_full {}); B received {}, installed \
                 {} ({}% of the generated flows); poll every {} us",
                fmt_num(f.median()),
                fmt_num(f.max()),
                param_text(f, "p99_ms"),
                f.samples.len(),
                param_text(f, "sample_every"),
                param_text(f, "sampled_missed"),
                param_text(f, "flows_generated"),
                param_text(f, "achieved_rate"),
                param_text(f, "recorded_by_a"),
                param_text(f, "flows_sent_a"),
                param_text(f, "events_lost_a"),
                param_text(f, "queue_full_a"),
                param_text(f, "flows_received_b"),
                param_text(f, "flows_installed_b"),
                reached.map_or("-".to_owned(), |r| fmt_num(r.median())),
                param_text(f, "poll_us"),
            )
        });
        out.push(info(
            format!(
                "replication lag at {} flows/s (median / worst)",
                rate_label(rate)
            ),
            lag.map(Figure::median),
            " ms",
            detail,
        ));
    }
    let top = *sync::RATES.last().expect("not empty");
    let sender = find(figures, &sync::names::cpu_sender(top));
    let receiver = find(figures, &sync::names::cpu_receiver(top));
    let window =
        |f: &Figure| -> f64 { param_text(f, "window_percent").parse().unwrap_or(f64::NAN) };
    let range = |f: &Figure| format!("{}..{}", fmt_num(f.min()), fmt_num(f.max()));
    out.push(info(
        format!(
            "daemon CPU at {} flows/s (sender / receiver)",
            rate_label(top)
        ),
        sender.map(window),
        "%",
        match (sender, receiver) {
            (Some(s), Some(r)) => format!(
                "sender (A) {}% / receiver (B) {}% of one core (utime+stime over the {} s \
                 window at {} flows/s achieved; per second {}% / {}%)",
                fmt_num(window(s)),
                fmt_num(window(r)),
                param_text(s, "window_s"),
                param_text(s, "achieved_rate"),
                range(s),
                range(r),
            ),
            _ => not_measured(),
        },
    ));
    let bytes: Vec<(u32, &Figure)> = sync::RATES
        .iter()
        .filter_map(|&rate| Some((rate, find(figures, &sync::names::bytes_per_flow(rate))?)))
        .collect();
    out.push(info(
        "bytes per replicated flow".to_owned(),
        bytes.last().map(|(_, f)| f.median()),
        " B",
        if bytes.is_empty() {
            not_measured()
        } else {
            format!(
                "A's bytes_sent to B over its flows_sent (UDP payload, heartbeats included; \
                 value: at the highest rate); {}",
                bytes
                    .iter()
                    .map(|(rate, f)| format!(
                        "at {} flows/s: {} B payload, {} B with IPv4+UDP headers (+{} per \
                         datagram), {} flows per datagram",
                        rate_label(*rate),
                        fmt_num(f.median()),
                        param_text(f, "with_ip_udp_headers"),
                        sync::HEADER_BYTES,
                        param_text(f, "flows_per_datagram"),
                    ))
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        },
    ));
    out
}

/// The median of per-trial differences `on[k] - off[k]` (the two are measured in the same
/// trials, so pairing them cancels what a trial shares: the machine's load at that moment);
/// the difference of the medians where the trial counts differ.
fn paired_difference(on: &Figure, off: &Figure) -> f64 {
    if on.samples.len() != off.samples.len() || on.samples.is_empty() {
        return on.median() - off.median();
    }
    let mut d: Vec<f64> = on
        .samples
        .iter()
        .zip(&off.samples)
        .map(|(a, b)| a - b)
        .collect();
    d.sort_by(f64::total_cmp);
    let n = d.len();
    if n % 2 == 1 {
        d[n / 2]
    } else {
        (d[n / 2 - 1] + d[n / 2]) / 2.0
    }
}

/// Issue 12: new UDP flows with flow events on against off (loop method, net), at each fill
/// level: the median of the per-trial differences; the value is the largest of them.
fn flow_events_target(figures: &[Figure]) -> Target {
    let points: Vec<(u64, f64, f64, f64)> = points(figures, names::NEW_FLOW_UDP_EVENTS_ON)
        .into_iter()
        .filter_map(|on| {
            let flows = param(on, "flows")?;
            let backends = param(on, "backends")?;
            let off = find(
                figures,
                &names::point(
                    names::NEW_FLOW_UDP_EVENTS_OFF,
                    backends as u32,
                    flows as u32,
                ),
            )?;
            Some((flows, on.median(), off.median(), paired_difference(on, off)))
        })
        .collect();
    let value = points.iter().map(|p| p.3).reduce(f64::max);
    Target {
        name: "flow-insert notification (sync on) vs off, per new flow".to_owned(),
        goal: "info".to_owned(),
        value,
        unit: "ns".to_owned(),
        reached: None,
        detail: if points.is_empty() {
            "per-packet not measured".to_owned()
        } else {
            format!(
                "loop method, net of trivial/loop, a new IPv4 UDP flow per call, {} backends; \
                 per fill level the medians and the median of per-trial differences (value: \
                 the largest of those): {}",
                REPRESENTATIVE_BACKENDS,
                points
                    .iter()
                    .map(|&(flows, on, off, diff)| {
                        let sign = if diff >= 0.0 { "+" } else { "" };
                        format!(
                            "f={flows}: {} ns on vs {} ns off ({sign}{} ns, {:+.1}%)",
                            fmt_num(on),
                            fmt_num(off),
                            fmt_num(diff),
                            diff / off * 100.0
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        },
        info: true,
    }
}

/// Program sizes as the kernel holds them, from the per-packet figures' params: (program,
/// translated instructions, JIT bytes, instructions the verifier processed).
pub fn programs(figures: &[Figure]) -> Vec<[String; 4]> {
    let mut out: Vec<[String; 4]> = Vec::new();
    for f in figures {
        let get = |k: &str| f.params.get(k).cloned();
        let Some(program) = get("program") else {
            continue;
        };
        if out.iter().any(|p| p[0] == program) {
            continue;
        }
        out.push([
            program,
            get("program_xlated_insns").unwrap_or_else(|| "?".to_owned()),
            get("program_jited_bytes").unwrap_or_else(|| "?".to_owned()),
            get("program_verified_insns").unwrap_or_else(|| "?".to_owned()),
        ]);
    }
    out
}

/// A number for a table: about four significant digits.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "-".to_owned();
    }
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 10.0 {
        format!("{v:.2}")
    } else if a >= 0.01 || a == 0.0 {
        format!("{v:.3}")
    } else {
        format!("{v:.2e}")
    }
}

fn groups(figures: &[Figure]) -> Vec<&str> {
    let mut groups: Vec<&str> = Vec::new();
    for f in figures {
        if !groups.contains(&f.group.as_str()) {
            groups.push(&f.group);
        }
    }
    groups
}

struct Row {
    cells: Vec<String>,
}

fn rows(figures: &[Figure], group: &str) -> Vec<Row> {
    figures
        .iter()
        .filter(|f| f.group == group)
        .map(|f| Row {
            cells: vec![
                f.name.clone(),
                f.unit.clone(),
                fmt_num(f.min()),
                fmt_num(f.median()),
                fmt_num(f.max()),
                f.samples.len().to_string(),
                f.baseline.clone().unwrap_or_else(|| "-".to_owned()),
                baseline_median(figures, f).map_or("-".to_owned(), fmt_num),
                ratio(figures, f).map_or("-".to_owned(), |r| format!("{}x", fmt_num(r))),
            ],
        })
        .collect()
}

const HEADER: [&str; 9] = [
    "figure", "unit", "min", "median", "max", "n", "baseline", "base med", "ratio",
];

/// The plain-text table printed on stdout, then the targets.
pub fn text_table(machine: &Machine, figures: &[Figure], targets: &[Target]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "machine: {} ({} cores), kernel {}, {}",
        machine.cpu, machine.cores, machine.kernel, machine.date
    );
    for group in groups(figures) {
        let rows = rows(figures, group);
        let mut widths: Vec<usize> = HEADER.iter().map(|h| h.len()).collect();
        for row in &rows {
            for (w, c) in widths.iter_mut().zip(&row.cells) {
                *w = (*w).max(c.chars().count());
            }
        }
        let _ = writeln!(out, "\n[{group}]");
        let line = |cells: &[String]| {
            cells
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(i, (c, w))| {
                    if i == 0 || i == 1 || i == 6 {
                        format!("{c:<w$}")
                    } else {
                        format!("{c:>w$}")
                    }
                })
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_owned()
        };
        let header: Vec<String> = HEADER.iter().map(|h| (*h).to_owned()).collect();
        let _ = writeln!(out, "{}", line(&header));
        for row in &rows {
            let _ = writeln!(out, "{}", line(&row.cells));
        }
    }
    let programs = programs(figures);
    if !programs.is_empty() {
        let _ = writeln!(
            out,
            "\n[programs] (xlated insns, JIT bytes, insns the verifier processed)"
        );
        for [name, xlated, jited, verified] in &programs {
            let _ = writeln!(out, "{name:<16} {xlated:>6} {jited:>7} {verified:>7}");
        }
    }
    let _ = writeln!(out, "\n[targets]");
    for t in targets {
        let _ = writeln!(
            out,
            "{:<12} {} {}: {} ({})",
            t.verdict(),
            t.name,
            t.goal,
            t.value
                .map_or("-".to_owned(), |v| format!("{}{}", fmt_num(v), t.unit)),
            t.detail
        );
    }
    out
}

/// `report.md`.
pub fn markdown(
    machine: &Machine,
    command: &str,
    figures: &[Figure],
    targets: &[Target],
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Benchmark report\n");
    let _ = writeln!(out, "| machine | |\n|---|---|");
    let _ = writeln!(out, "| CPU | {} |", machine.cpu);
    let _ = writeln!(out, "| cores | {} |", machine.cores);
    let _ = writeln!(out, "| kernel | {} |", machine.kernel);
    let _ = writeln!(out, "| date | {} |", machine.date);
    let _ = writeln!(out, "| command | `{command}` |\n");
    let _ = writeln!(out, "## Targets\n");
    let _ = writeln!(
        out,
        "| target | goal | value | | from |\n|---|---|---|---|---|"
    );
    for t in targets {
        let _ = writeln!(
            out,
            "| {} | {} | {} | **{}** | {} |",
            t.name,
            t.goal,
            t.value
                .map_or("-".to_owned(), |v| format!("{}{}", fmt_num(v), t.unit)),
            t.verdict(),
            t.detail
        );
    }
    for group in groups(figures) {
        let _ = writeln!(out, "\n## {group}\n");
        let _ = writeln!(out, "| {} |", HEADER.join(" | "));
        let _ = writeln!(out, "|---|---|--:|--:|--:|--:|---|--:|--:|");
        for row in rows(figures, group) {
            let mut cells = row.cells;
            cells[0] = format!("`{}`", cells[0]);
            if cells[6] != "-" {
                cells[6] = format!("`{}`", cells[6]);
            }
            let _ = writeln!(out, "| {} |", cells.join(" | "));
        }
        if group == per_packet::GROUP || group == per_packet::CALL_GROUP {
            out.push_str(&per_packet_grid(figures, group));
        }
    }
    let programs = programs(figures);
    if !programs.is_empty() {
        let _ = writeln!(out, "\n## Programs\n");
        let _ = writeln!(
            out,
            "| program | xlated insns | JIT bytes | insns processed by the verifier |\n\
             |---|--:|--:|--:|"
        );
        for [name, xlated, jited, verified] in &programs {
            let _ = writeln!(out, "| `{name}` | {xlated} | {jited} | {verified} |");
        }
    }
    out
}

/// The medians of `group` as a grid (Markdown): a row per path and backend count, a column per
/// fill level; empty without figures of the load balancer in that group.
fn per_packet_grid(figures: &[Figure], group: &str) -> String {
    let kind = if group == per_packet::CALL_GROUP {
        "gross"
    } else {
        "net"
    };
    let points: Vec<(&str, String, u64, f64)> = figures
        .iter()
        .filter(|f| f.group == group)
        .filter_map(|f| {
            let path = f.name.split('/').next()?;
            let flows = param(f, "flows")?;
            let backends = match param(f, "backends") {
                Some(b) => b.to_string(),
                None => "n/a".to_owned(),
            };
            Some((path, backends, flows, f.median()))
        })
        .collect();
    let mut flows: Vec<u64> = points.iter().map(|p| p.2).collect();
    flows.sort_unstable();
    flows.dedup();
    let mut rows: Vec<(&str, &str)> = Vec::new();
    for (path, backends, _, _) in &points {
        if !rows.contains(&(path, backends.as_str())) {
            rows.push((path, backends));
        }
    }
    if rows.is_empty() {
        return String::new();
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n### {group}: {kind} median ns by path, backends and flows\n"
    );
    let _ = writeln!(
        out,
        "| path | backends | {} |",
        flows
            .iter()
            .map(|f| format!("flows={f}"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(out, "|---|--:|{}", "--:|".repeat(flows.len()));
    for (path, backends) in rows {
        let cells: Vec<String> = flows
            .iter()
            .map(|&f| {
                points
                    .iter()
                    .find(|p| p.0 == path && p.1 == backends && p.2 == f)
                    .map_or("-".to_owned(), |p| fmt_num(p.3))
            })
            .collect();
        let _ = writeln!(out, "| `{path}` | {backends} | {} |", cells.join(" | "));
    }
    out
}

fn num(v: f64) -> Value {
    if v.is_finite() { json!(v) } else { Value::Null }
}

/// `report.json`.
pub fn json(machine: &Machine, command: &str, figures: &[Figure], targets: &[Target]) -> Value {
    let figures_json: Vec<Value> = figures
        .iter()
        .map(|f| {
            json!({
                "group": f.group,
                "name": f.name,
                "unit": f.unit,
                "min": num(f.min()),
                "median": num(f.median()),
                "max": num(f.max()),
                "samples": f.samples.iter().map(|&s| num(s)).collect::<Vec<_>>(),
                "baseline": f.baseline,
                "baseline_median": baseline_median(figures, f).map_or(Value::Null, num),
                "ratio": ratio(figures, f).map_or(Value::Null, num),
                "params": f.params,
            })
        })
        .collect();
    let targets_json: Vec<Value> = targets
        .iter()
        .map(|t| {
            json!({
                "name": t.name,
                "goal": t.goal,
                "value": t.value.map_or(Value::Null, num),
                "unit": t.unit,
                "reached": t.reached,
                "info": t.info,
                "detail": t.detail,
            })
        })
        .collect();
    json!({
        "machine": {
            "cpu": machine.cpu,
            "cores": machine.cores,
            "kernel": machine.kernel,
            "date": machine.date,
        },
        "command": command,
        "figures": figures_json,
        "targets": targets_json,
    })
}

const COLORS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

fn plot_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {e}")
}

/// One panel of `cost_vs_flows.svg`: net ns against flows (log x), a line per backend count,
/// min..max bars, the reflector's net cost as a grey line, and `dashed` other paths (path,
/// label) at `REPRESENTATIVE_BACKENDS`, medians only.
fn cost_panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    figures: &[Figure],
    path: &str,
    title: &str,
    reflector: Option<&Figure>,
    dashed: &[(&str, &str)],
) -> Result<()> {
    let grid = established_grid(figures, path);
    let dashed: Vec<(&str, Vec<(f64, f64)>)> = dashed
        .iter()
        .map(|&(path, label)| {
            let points: Vec<(f64, f64)> = established_grid(figures, path)
                .iter()
                .filter(|g| g.0 == u64::from(REPRESENTATIVE_BACKENDS))
                .map(|g| (g.1 as f64, g.2.median()))
                .collect();
            (label, points)
        })
        .filter(|(_, points)| !points.is_empty())
        .collect();
    let dashed_y = || dashed.iter().flat_map(|d| d.1.iter().map(|p| p.1));
    let flows: Vec<f64> = grid.iter().map(|g| g.1 as f64).collect();
    let x_min = flows.iter().copied().fold(f64::MAX, f64::min) / 2.0;
    let x_max = flows.iter().copied().fold(f64::MIN, f64::max) * 2.0;
    // Head-room above the highest bar for the legend (upper left).
    let y_max = grid
        .iter()
        .map(|g| g.2.max())
        .chain(reflector.map(Figure::max))
        .chain(dashed_y())
        .fold(0.0, f64::max)
        * 1.5;
    let y_min = grid
        .iter()
        .map(|g| g.2.min())
        .chain(reflector.map(Figure::min))
        .chain(dashed_y())
        .fold(0.0, f64::min);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d((x_min..x_max).log_scale(), y_min..y_max.max(1.0))
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("flows in the flow table (log)")
        .y_desc("net ns per packet (minus trivial)")
        .x_label_formatter(&|x| {
            if *x >= 1e6 {
                format!("{}M", x / 1e6)
            } else if *x >= 1e3 {
                format!("{}k", x / 1e3)
            } else {
                format!("{x}")
            }
        })
        .draw()
        .map_err(plot_error)?;
    let mut backends: Vec<u64> = grid.iter().map(|g| g.0).collect();
    backends.dedup();
    for (i, b) in backends.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<(f64, f64)> = grid
            .iter()
            .filter(|g| g.0 == *b)
            .map(|g| (g.1 as f64, g.2.median()))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(plot_error)?
            .label(if *b == 1 {
                "IPv4 TCP, 1 backend".to_owned()
            } else {
                format!("IPv4 TCP, {b} backends")
            })
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(plot_error)?;
        chart
            .draw_series(grid.iter().filter(|g| g.0 == *b).map(|g| {
                ErrorBar::new_vertical(g.1 as f64, g.2.min(), g.2.median(), g.2.max(), color, 6)
            }))
            .map_err(plot_error)?;
    }
    for (i, (label, points)) in dashed.iter().enumerate() {
        let color = COLORS[(backends.len() + i) % COLORS.len()];
        chart
            .draw_series(DashedLineSeries::new(
                points.clone(),
                8,
                5,
                color.stroke_width(2),
            ))
            .map_err(plot_error)?
            .label(format!(
                "{label}, {REPRESENTATIVE_BACKENDS} backends (dashed)"
            ))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(plot_error)?;
    }
    if let Some(r) = reflector {
        let grey = RGBColor(0x80, 0x80, 0x80);
        chart
            .draw_series(DashedLineSeries::new(
                vec![(x_min, r.median()), (x_max, r.median())],
                6,
                4,
                grey.stroke_width(1),
            ))
            .map_err(plot_error)?
            .label(format!("reflector ({})", r.name))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()
        .map_err(plot_error)?;
    Ok(())
}

/// `cost_vs_flows.svg`; `false` when there is nothing to plot.
pub fn plot_cost_vs_flows(figures: &[Figure], path: &Path) -> Result<bool> {
    if established_grid(figures, names::ESTABLISHED_V4).is_empty() {
        return Ok(false);
    }
    let spread = !established_grid(figures, names::ESTABLISHED_V4_SPREAD).is_empty();
    let size = if spread { (1200, 500) } else { (700, 500) };
    let root = SVGBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let panels = if spread {
        let (a, b) = root.split_horizontally(600);
        vec![a, b]
    } else {
        vec![root.clone()]
    };
    cost_panel(
        &panels[0],
        figures,
        names::ESTABLISHED_V4,
        "established flow, one hot flow (repeat=N)",
        find(figures, names::REFLECTOR_REPEAT),
        &[
            (names::ESTABLISHED_V6, "IPv6 TCP"),
            (names::ESTABLISHED_UDP, "IPv4 UDP"),
        ],
    )?;
    if spread {
        cost_panel(
            &panels[1],
            figures,
            names::ESTABLISHED_V4_SPREAD,
            "established, a different flow per call (repeat=1)",
            find(figures, names::REFLECTOR_LOOP),
            &[
                (names::ESTABLISHED_V6_SPREAD, "IPv6 TCP"),
                (names::ESTABLISHED_UDP_SPREAD, "IPv4 UDP"),
            ],
        )?;
    }
    root.present().map_err(plot_error)?;
    Ok(true)
}

/// `throughput.svg`: Mpps per setup (median bars, min..max whiskers); `false` without figures.
pub fn plot_throughput(figures: &[Figure], path: &Path) -> Result<bool> {
    let bars: Vec<&Figure> = figures
        .iter()
        .filter(|f| f.group == "throughput" && f.unit == "Mpps")
        .collect();
    if bars.is_empty() {
        return Ok(false);
    }
    let labels: Vec<String> = bars
        .iter()
        .map(|f| f.name.trim_start_matches("throughput/").to_owned())
        .collect();
    let y_max = bars.iter().map(|f| f.max()).fold(0.0, f64::max) * 1.2;
    let root = SVGBackend::new(path, (160 * bars.len() as u32 + 200, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let n = bars.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "throughput per setup (median, min..max over trials)",
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..y_max.max(0.1))
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() {
                labels[i as usize].clone()
            } else {
                String::new()
            }
        })
        .y_desc("Mpps (one core)")
        .draw()
        .map_err(plot_error)?;
    for (i, f) in bars.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let x = i as f64;
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(x - 0.3, 0.0), (x + 0.3, f.median())],
                color.mix(0.8).filled(),
            )))
            .map_err(plot_error)?;
        chart
            .draw_series(std::iter::once(ErrorBar::new_vertical(
                x,
                f.min(),
                f.median(),
                f.max(),
                BLACK,
                10,
            )))
            .map_err(plot_error)?;
        chart
            .draw_series(std::iter::once(Text::new(
                fmt_num(f.median()),
                (x - 0.15, f.max() + y_max * 0.03),
                ("sans-serif", 13),
            )))
            .map_err(plot_error)?;
    }
    root.present().map_err(plot_error)?;
    Ok(true)
}

/// What `write` produced.
#[derive(Clone, Debug, Default)]
pub struct Written {
    pub files: Vec<PathBuf>,
    pub skipped: Vec<String>,
}

/// Writes `report.json`, `report.md` and the plots into `out`, returns the stdout table too.
pub fn write(
    out: &Path,
    machine: &Machine,
    command: &str,
    figures: &[Figure],
) -> Result<(String, Written)> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let targets = targets(figures);
    let mut written = Written::default();
    let json_path = out.join("report.json");
    let text = serde_json::to_string_pretty(&json(machine, command, figures, &targets))?;
    std::fs::write(&json_path, text + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    written.files.push(json_path);
    let md_path = out.join("report.md");
    std::fs::write(&md_path, markdown(machine, command, figures, &targets))
        .with_context(|| format!("writing {}", md_path.display()))?;
    written.files.push(md_path);
    for (file, plot) in [
        (
            "cost_vs_flows.svg",
            plot_cost_vs_flows as fn(&[Figure], &Path) -> Result<bool>,
        ),
        ("throughput.svg", plot_throughput),
    ] {
        let path = out.join(file);
        if plot(figures, &path)? {
            written.files.push(path);
        } else {
            // A stale plot of an earlier run would contradict this report.
            let _ = std::fs::remove_file(&path);
            written
                .skipped
                .push(format!("{file}: no figures for it in this run"));
        }
    }
    Ok((text_table(machine, figures, &targets), written))
}

/// Issue 13 (information row): what a `bpf_fib_lookup` per packet would cost, beside the MAC
/// swap: the next hop the daemon resolves instead costs the data plane nothing.
fn next_hop_target(figures: &[Figure]) -> Target {
    let fib = find(figures, super::next_hop::FIB_LOOKUP).map(Figure::median);
    let reflector = find(figures, super::next_hop::REFLECTOR).map(Figure::median);
    let value = fib.zip(reflector).map(|(f, r)| f / r);
    Target {
        name: "bpf_fib_lookup per packet (the next hop not chosen) vs MAC-swap per call".to_owned(),
        goal: "info".to_owned(),
        value,
        unit: "x".to_owned(),
        reached: None,
        detail: match fib.zip(reflector) {
            Some((f, r)) => format!(
                "next_hop/fib_lookup {} ns vs next_hop/reflector {} ns (+{} ns per packet, \
                 BPF_FIB_LKUP_RET_SUCCESS); encapsulating VIPs read the next hop's MAC from the \
                 backend record instead, at no extra cost",
                fmt_num(f),
                fmt_num(r),
                fmt_num(f - r)
            ),
            None => "not measured".to_owned(),
        },
        info: true,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn fig(group: &str, name: &str, samples: &[f64], baseline: Option<&str>) -> Figure {
        let mut params = BTreeMap::new();
        let mut parts = name.split('/');
        parts.next();
        for p in parts {
            if let Some((k, v)) = p.split_once('=') {
                params.insert(k.to_owned(), v.to_owned());
            }
        }
        Figure {
            group: group.to_owned(),
            name: name.to_owned(),
            unit: "ns".to_owned(),
            samples: samples.to_vec(),
            baseline: baseline.map(str::to_owned),
            params,
        }
    }

    #[test]
    fn date_is_iso() {
        let d = utc_now();
        assert_eq!(d.len(), 20, "{d}");
        assert!(d.starts_with("20") && d.ends_with('Z'), "{d}");
    }

    #[test]
    fn the_flow_event_row_is_the_largest_on_minus_off() {
        let mut figures = Vec::new();
        // Per-trial pairs: the differences are 10, 10, 40 (f=1000) and 15, 15, -30 (f=10000).
        for (flows, on, off) in [
            (1000, [130.0, 200.0, 150.0], [120.0, 190.0, 110.0]),
            (10000, [150.0, 250.0, 100.0], [135.0, 235.0, 130.0]),
        ] {
            for (path, v) in [
                (names::NEW_FLOW_UDP_EVENTS_ON, on),
                (names::NEW_FLOW_UDP_EVENTS_OFF, off),
            ] {
                figures.push(fig(
                    "per_packet",
                    &names::point(path, REPRESENTATIVE_BACKENDS, flows),
                    &v,
                    None,
                ));
            }
        }
        let t = flow_events_target(&figures);
        assert_eq!(
            t.name,
            "flow-insert notification (sync on) vs off, per new flow"
        );
        assert_eq!(t.verdict(), "info");
        assert_eq!(t.value, Some(15.0));
        assert!(
            t.detail
                .contains("f=1000: 150.0 ns on vs 120.0 ns off (+10.00 ns, +8.3%)"),
            "{}",
            t.detail
        );
        assert!(targets(&figures).iter().any(|x| x.name == t.name));
        assert_eq!(flow_events_target(&[]).value, None);
    }

    #[test]
    fn sync_rows_from_figures() {
        let sync_fig = |name: String, samples: &[f64], params: &[(&str, &str)]| Figure {
            group: sync::GROUP.to_owned(),
            name,
            unit: "ms".to_owned(),
            samples: samples.to_vec(),
            baseline: None,
            params: params
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        let lag_params = |achieved: &'static str| {
            vec![
                ("achieved_rate", achieved),
                ("p99_ms", "0.900"),
                ("sample_every", "1"),
                ("flows_installed_b", "3000"),
            ]
        };
        let figures = vec![
            sync_fig(
                sync::names::lag(1000),
                &[0.2, 0.3, 0.9],
                &lag_params("1000"),
            ),
            sync_fig(sync::names::reached_peer(1000), &[100.0], &[]),
            sync_fig(
                sync::names::lag(50_000),
                &[1.0, 2.0, 5.0],
                &lag_params("30000"),
            ),
            sync_fig(
                sync::names::cpu_sender(50_000),
                &[10.0, 14.0],
                &[("window_percent", "12.50"), ("window_s", "3.00")],
            ),
            sync_fig(
                sync::names::cpu_receiver(50_000),
                &[20.0, 22.0],
                &[("window_percent", "21.00")],
            ),
            sync_fig(
                sync::names::bytes_per_flow(1000),
                &[90.0],
                &[("with_ip_udp_headers", "110.00")],
            ),
            sync_fig(
                sync::names::bytes_per_flow(50_000),
                &[40.0],
                &[("with_ip_udp_headers", "41.00")],
            ),
        ];
        let t = targets(&figures);
        let row = |name: &str| {
            t.iter()
                .find(|x| x.name == name)
                .unwrap_or_else(|| panic!("no row {name:?} in {t:?}"))
        };
        let lag_1k = row("replication lag at 1k flows/s (median / worst)");
        assert_eq!(lag_1k.verdict(), "info");
        assert_eq!(lag_1k.value, Some(0.3));
        assert!(
            lag_1k.detail.contains("median 0.300 ms, worst 0.900 ms"),
            "{}",
            lag_1k.detail
        );
        assert!(
            lag_1k.detail.contains("(100.0% of the generated"),
            "{}",
            lag_1k.detail
        );
        assert!(!lag_1k.detail.contains("NOT REACHED"), "{}", lag_1k.detail);
        let lag_50k = row("replication lag at 50k flows/s (median / worst)");
        assert_eq!(lag_50k.value, Some(2.0));
        assert!(
            lag_50k
                .detail
                .contains("RATE NOT REACHED: the generator achieved 30000"),
            "{}",
            lag_50k.detail
        );
        let cpu = row("daemon CPU at 50k flows/s (sender / receiver)");
        assert_eq!(cpu.value, Some(12.5));
        assert!(
            cpu.detail
                .contains("sender (A) 12.50% / receiver (B) 21.00%"),
            "{}",
            cpu.detail
        );
        let bytes = row("bytes per replicated flow");
        assert_eq!(bytes.value, Some(40.0));
        assert!(
            bytes
                .detail
                .contains("at 1k flows/s: 90.00 B payload, 110.00 B with IPv4+UDP"),
            "{}",
            bytes.detail
        );
        // Without sync figures the rows are there, unmeasured.
        let empty = targets(&[]);
        let rows: Vec<&Target> = empty
            .iter()
            .filter(|x| x.detail == "sync not measured")
            .collect();
        assert_eq!(rows.len(), 4, "{empty:?}");
        assert!(rows.iter().all(|r| r.value.is_none()));
    }

    #[test]
    fn targets_from_figures() {
        let figures = vec![
            fig("per_call", "reflector/call", &[2.0, 2.0, 2.0], None),
            fig(
                "per_call",
                "tcp_ack_v4_unchanged/backends=1/flows=1000",
                &[3.0, 3.0, 3.0],
                Some("reflector/call"),
            ),
            fig(
                "per_call",
                "tcp_ack_v4_unchanged/backends=1000/flows=1000000",
                &[3.2, 3.3, 3.1],
                Some("reflector/call"),
            ),
            fig("per_packet", "reflector/repeat", &[2.0, 2.0, 2.0], None),
            fig(
                "per_packet",
                "vip_established_v4/backends=1/flows=1000",
                &[3.0, 3.0, 3.0],
                Some("reflector/repeat"),
            ),
            fig(
                "per_packet",
                "vip_established_v4/backends=1000/flows=1000000",
                &[3.2, 3.3, 3.1],
                Some("reflector/repeat"),
            ),
        ];
        let t = targets(&figures);
        assert_eq!(t[0].value, Some(1.6));
        assert_eq!(t[0].reached, Some(true));
        assert!(t[0].detail.contains("repeat method"), "{}", t[0].detail);
        assert_eq!(t[1].reached, None, "no IPv6 figures");
        assert!((t[4].value.unwrap() - 6.666).abs() < 0.01);
        assert_eq!(t[4].reached, Some(true));
        assert_eq!(t[5].reached, None);
        assert_eq!(t[6].verdict(), "info");
        assert!(t.iter().filter(|t| t.info).all(|t| t.reached.is_none()));
        let v = json(&Machine::detect(), "x", &figures, &t);
        assert_eq!(v["figures"][1]["ratio"], json!(1.5));
        let md = markdown(&Machine::detect(), "x", &figures, &t);
        assert!(md.contains("| **reached** |"), "{md}");
        assert!(
            md.contains("| path | backends | flows=1000 | flows=1000000 |\n|---|--:|--:|--:|\n"),
            "{md}"
        );
        assert!(
            md.contains("| `vip_established_v4` | 1 | 3.000 | - |\n"),
            "{md}"
        );
        assert!(
            md.contains("| `vip_established_v4` | 1000 | - | 3.200 |\n"),
            "{md}"
        );
        assert!(md.contains("### per_call: gross median ns"), "{md}");
    }
}
