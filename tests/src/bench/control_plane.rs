//! Control-plane speed: how long the Maglev table build takes, and how long a backend state
//! change takes to become the live ring in the data plane.
//!
//! - `maglev_build/backends=N/ring=M`: `lb::maglev::build_table` for N equal-weight backends
//!   (keyed by their address strings, as the daemon keys them), one build per trial.
//! - `state_change/backends=N/ring=65537`: a real data plane (the program and maps loaded, filled
//!   by the daemon's `Balancer` through `PacketLab`) with one VIP of N healthy backends; each
//!   sample is one `Balancer::set_health(vip, b, Down)` or `(.., Up)`, alternately, and its
//!   `PublishReport::elapsed`: from the start of the VIP's rewrite (its backend records, the
//!   Maglev build, the inactive table written through the mmap) to the VIP record's flip, the
//!   moment new flows use the new ring. The wall time around the whole call is a param.
//! - `state_change_prepared/backends=N/ring=65537`: the same change after
//!   `Balancer::prepare_health(vip, b, Down)` (or `Up`), as the daemon calls it on the check
//!   result before the deciding one (`rise`/`fall` of 2 or more, the defaults): the Maglev build
//!   is done then, so the sample is records + table write + flip. The preparation is not timed;
//!   each sample checks that `PublishReport::prepared` says the table was used. Interleaved
//!   with the cold samples: for each backend, cold down, cold up, prepared down, prepared up.
//!
//! Trials are interleaved: trial k of every case before trial k+1.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Instant};

use anyhow::{Result, ensure};
use lb::{
    health::Health,
    maglev::{MaglevBackend, build_table},
};

use super::Figure;
use crate::packet_lab::PacketLab;

/// The group of every figure made here.
pub const GROUP: &str = "control_plane";
/// Backend counts measured.
pub const BACKENDS: [u32; 3] = [10, 100, 1000];
/// Ring sizes of the Maglev build.
pub const RING_SIZES: [u32; 2] = [65537, 16381];
/// Ring size of the state-change measurement (the production default).
pub const STATE_CHANGE_RING: u32 = 65537;

#[derive(Clone, Debug)]
pub struct ControlPlaneOptions {
    /// Small counts, for smoke tests.
    pub quick: bool,
    /// Interleaved trials (at least 5 for the medians the issue asks for).
    pub trials: usize,
}

pub fn maglev_name(backends: u32, ring: u32) -> String {
    format!("maglev_build/backends={backends}/ring={ring}")
}

pub fn state_change_name(backends: u32) -> String {
    format!("state_change/backends={backends}/ring={STATE_CHANGE_RING}")
}

pub fn state_change_prepared_name(backends: u32) -> String {
    format!("state_change_prepared/backends={backends}/ring={STATE_CHANGE_RING}")
}

fn backend_address(j: u32) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        50 + (j / 40_000) as u8,
        (j / 200 % 200) as u8,
        (j % 200) as u8 + 1,
    )
}

fn lab_config(backends: u32) -> String {
    let mut toml = format!(
        "interface = \"bench0\"\nring_size = {STATE_CHANGE_RING}\nmax_vips = 2\n\
         max_backends = {}\nflow_table_size = 1024\n\n[[vip]]\nname = \"web\"\n\
         address = \"10.49.0.1\"\nport = 80\nprotocol = \"tcp\"\n[vip.health]\ncheck = \"none\"\n",
        backends.max(16)
    );
    for j in 0..backends {
        toml.push_str(&format!(
            "[[vip.backend]]\naddress = \"{}\"\n",
            backend_address(j)
        ));
    }
    toml
}

fn figure(name: String, samples: Vec<f64>, params: BTreeMap<String, String>) -> Figure {
    Figure {
        group: GROUP.to_owned(),
        name,
        unit: "ms".to_owned(),
        samples,
        baseline: None,
        params,
    }
}

/// Maglev build times (no privileges needed).
pub fn run_maglev(opts: &ControlPlaneOptions) -> Result<Vec<Figure>> {
    ensure!(opts.trials >= 1, "at least one trial");
    let keys: Vec<Vec<u8>> = (0..*BACKENDS.iter().max().expect("not empty"))
        .map(|j| backend_address(j).to_string().into_bytes())
        .collect();
    let cases: Vec<(u32, u32)> = RING_SIZES
        .iter()
        .flat_map(|&m| BACKENDS.iter().map(move |&n| (n, m)))
        .collect();
    let mut samples = vec![Vec::new(); cases.len()];
    // One untimed build of each case first (allocator and caches).
    for trial in 0..=opts.trials {
        for (c, &(n, m)) in cases.iter().enumerate() {
            let backends: Vec<MaglevBackend<'_>> = keys[..n as usize]
                .iter()
                .map(|key| MaglevBackend { key, weight: 100 })
                .collect();
            let started = Instant::now();
            let table = build_table(&backends, m);
            let elapsed = started.elapsed();
            std::hint::black_box(&table);
            ensure!(table.len() == m as usize, "table of the wrong size");
            if trial > 0 {
                samples[c].push(elapsed.as_secs_f64() * 1e3);
            }
        }
    }
    Ok(cases
        .iter()
        .zip(samples)
        .map(|(&(n, m), samples)| {
            let params = BTreeMap::from([
                ("backends".to_owned(), n.to_string()),
                ("ring_size".to_owned(), m.to_string()),
                ("weights".to_owned(), "equal (100)".to_owned()),
                (
                    "what".to_owned(),
                    "lb::maglev::build_table, one build per trial".to_owned(),
                ),
            ]);
            figure(maglev_name(n, m), samples, params)
        })
        .collect())
}

/// State change to live ring, on a loaded data plane (needs root).
pub fn run_state_change(opts: &ControlPlaneOptions) -> Result<Vec<Figure>> {
    ensure!(opts.trials >= 1, "at least one trial");
    // Two changes (down, then up) per round; more rounds than trials where it is cheap.
    let rounds = if opts.quick {
        opts.trials
    } else {
        opts.trials.max(10)
    };
    let mut labs: Vec<(u32, PacketLab)> = BACKENDS
        .iter()
        .map(|&n| (n, PacketLab::new(&lab_config(n))))
        .collect();
    // Per lab: [cold, prepared].
    let mut published = vec![[Vec::new(), Vec::new()]; labs.len()];
    let mut wall = vec![[Vec::new(), Vec::new()]; labs.len()];
    for round in 0..=rounds {
        for (c, (n, lab)) in labs.iter_mut().enumerate() {
            let b = round % *n as usize;
            for prepared in [false, true] {
                for health in [Health::Down, Health::Up] {
                    if prepared {
                        lab.balancer.prepare_health(0, b, health)?;
                    }
                    let started = Instant::now();
                    let report = lab.balancer.set_health(0, b, health)?;
                    let call = started.elapsed();
                    let expected = if health == Health::Down { *n - 1 } else { *n };
                    ensure!(
                        report.in_ring == expected as usize,
                        "{} backends in the ring after marking one {health:?}, expected {expected}",
                        report.in_ring
                    );
                    ensure!(
                        report.prepared == prepared,
                        "the publish {} the prepared table",
                        if prepared { "did not use" } else { "used" }
                    );
                    if round > 0 {
                        let k = usize::from(prepared);
                        published[c][k].push(report.elapsed.as_secs_f64() * 1e3);
                        wall[c][k].push(call.as_secs_f64() * 1e3);
                    }
                }
            }
        }
    }
    let cases = labs.iter().zip(published.into_iter().zip(wall));
    Ok(cases
        .flat_map(|((n, _), ([cold, prepared], [cold_wall, prepared_wall]))| {
            [
                (state_change_name(*n), *n, cold, cold_wall, false),
                (
                    state_change_prepared_name(*n),
                    *n,
                    prepared,
                    prepared_wall,
                    true,
                ),
            ]
        })
        .map(|(name, n, samples, wall, prepared)| {
            let wall_median = figure(String::new(), wall, BTreeMap::new()).median();
            let params = BTreeMap::from([
                ("backends".to_owned(), n.to_string()),
                ("ring_size".to_owned(), STATE_CHANGE_RING.to_string()),
                ("changes".to_owned(), samples.len().to_string()),
                ("prepared".to_owned(), prepared.to_string()),
                ("wall_median_ms".to_owned(), format!("{wall_median:.4}")),
                (
                    "what".to_owned(),
                    if prepared {
                        "Balancer::prepare_health (untimed), then Balancer::set_health \
                         down/up alternately on a loaded data plane; PublishReport::elapsed \
                         (backend records + prepared table + table write + VIP record flip)"
                    } else {
                        "Balancer::set_health down/up alternately on a loaded data plane; \
                         PublishReport::elapsed (backend records + Maglev build + table write + \
                         VIP record flip)"
                    }
                    .to_owned(),
                ),
            ]);
            figure(name, samples, params)
        })
        .collect())
}

/// Both parts.
pub fn run(opts: &ControlPlaneOptions) -> Result<Vec<Figure>> {
    let mut figures = run_maglev(opts)?;
    figures.extend(run_state_change(opts)?);
    Ok(figures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_config_parses() {
        let config = lb::config::Config::parse(&lab_config(1000), std::path::Path::new("t.toml"))
            .expect("valid");
        assert_eq!(config.vips[0].backends.len(), 1000);
    }
}
