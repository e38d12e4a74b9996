//! `cargo xtask bench`: benchmarks of the data plane and the control plane, each figure beside a
//! baseline measured in the same run (this machine is shared and noisy: only same-run ratios are
//! worth quoting).

pub mod control_plane;
pub mod next_hop;
pub mod per_packet;
pub mod report;
pub mod sync;
pub mod throughput;

use std::collections::BTreeMap;

/// One measured quantity: every trial's value, its unit, and what it should be compared with.
#[derive(Clone, Debug, PartialEq)]
pub struct Figure {
    /// "per_packet", "per_call", "throughput", "control_plane" or "sync".
    pub group: String,
    /// Unique within the run, e.g. "vip_established_v4/backends=1000/flows=1000000".
    pub name: String,
    /// "ns", "Mpps", "us", "ms", "%", "B".
    pub unit: String,
    /// One value per trial (at least 5 where the issue asks for a median).
    pub samples: Vec<f64>,
    /// `name` of the figure measured in the same run that this one is compared with, if any.
    pub baseline: Option<String>,
    /// Parameters (path, backends, flows, ring size, setup, ...), for tables and plots.
    pub params: BTreeMap<String, String>,
}

impl Figure {
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.samples.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    pub fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }

    pub fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }

    pub fn median(&self) -> f64 {
        let v = self.sorted();
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }
}
