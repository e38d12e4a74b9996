//! Differential fuzzing of the data plane: generated frames through the real `lb_xdp`
//! (`BPF_PROG_TEST_RUN`, real maps written by the daemon's `Balancer`) and through the reference
//! [`model`](crate::model); any difference in verdict, reason, output bytes or flow-table effect,
//! and any `XDP_ABORTED`, is reported with the seed, the frame's index and the frame in hex.
//!
//! Data flows one way: generator → (program, model) → comparison. The model only reads the maps.

pub mod corpus;
pub mod generate;
pub mod lab;
pub mod rng;

use std::{fmt, time::Duration};

pub use lab::{FuzzLab, LabError};

/// The seed `cargo xtask test` fuzzes with.
pub const FIXED_SEED: u64 = 0x1b_f022;

#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub seed: u64,
    pub packets: u64,
    /// Stop after this many differences (at least 1).
    pub max_differences: usize,
}

/// A frame on which the program and the model disagree.
#[derive(Clone, Debug)]
pub struct Difference {
    /// The run's seed; `None` for a frame replayed on its own.
    pub seed: Option<u64>,
    pub index: u64,
    pub frame: Vec<u8>,
    pub what: Vec<String>,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.seed {
            Some(seed) => writeln!(f, "frame #{} of seed {seed}:", self.index)?,
            None => writeln!(f, "replayed frame:")?,
        }
        for line in &self.what {
            writeln!(f, "  {line}")?;
        }
        writeln!(
            f,
            "  frame ({} bytes): {}",
            self.frame.len(),
            corpus::to_hex(&self.frame)
        )?;
        match self.seed {
            Some(seed) => write!(
                f,
                "  replay: cargo xtask fuzz --seed {seed} --packets {} (the frame alone: \
                 lb-fuzz --frame <hex>; it may depend on the flow table the run built)",
                self.index + 1
            ),
            None => write!(
                f,
                "  replay: lb-fuzz --frame {}",
                corpus::to_hex(&self.frame)
            ),
        }
    }
}

pub struct Report {
    pub options: Options,
    pub elapsed: Duration,
    /// Frames per model reason, in `Reason::ALL` order: what the run exercised.
    pub reasons: [u64; lb_common::Reason::COUNT as usize],
    pub state_changes: u64,
    pub differences: Vec<Difference>,
}

impl Report {
    pub fn frames_per_second(&self) -> f64 {
        self.options.packets as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} frames, seed {}, {:.2} s, {:.0} frames/s, {} control-plane changes, {} differences",
            self.options.packets,
            self.options.seed,
            self.elapsed.as_secs_f64(),
            self.frames_per_second(),
            self.state_changes,
            self.differences.len()
        )?;
        let reasons: Vec<String> = lb_common::Reason::ALL
            .iter()
            .zip(self.reasons)
            .map(|(r, n)| format!("{}={n}", r.name()))
            .collect();
        write!(f, "model reasons: {}", reasons.join(" "))?;
        for d in &self.differences {
            write!(f, "\n{d}")?;
        }
        Ok(())
    }
}

/// One fuzzing run on a fresh lab: `seed` decides every frame and every control-plane change,
/// so the same seed replays the same run.
pub fn run(options: Options) -> Result<Report, LabError> {
    let mut lab = FuzzLab::new(options.seed)?;
    lab.fuzz(options)
}
