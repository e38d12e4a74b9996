//! Differential fuzzer of the data plane (`cargo xtask fuzz`): generated frames through the real
//! XDP program and the reference model. Needs root. Exit status 1 on any difference.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use lb_tests::fuzz::{self, FuzzLab, Options, corpus};

#[derive(Parser)]
#[command(name = "lb-fuzz", about = "Differential fuzzer of the XDP data plane")]
struct Args {
    /// Frames to generate.
    #[arg(long, default_value_t = 1_000_000)]
    packets: u64,
    /// RNG seed: the same seed replays the same frames and control-plane changes.
    #[arg(long, default_value_t = fuzz::FIXED_SEED)]
    seed: u64,
    /// Report up to this many differences before stopping.
    #[arg(long, default_value_t = 10)]
    max_differences: usize,
    /// Replay one frame (hex) on a fresh lab instead of fuzzing.
    #[arg(long, value_name = "HEX")]
    frame: Option<String>,
    /// Replay every frame of a corpus directory instead of fuzzing.
    #[arg(long, value_name = "DIR")]
    corpus: Option<PathBuf>,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> anyhow::Result<bool> {
    if let Some(hex) = &args.frame {
        let frame = corpus::from_hex(hex).map_err(anyhow::Error::msg)?;
        return replay(&[("command line".into(), frame)]);
    }
    if let Some(dir) = &args.corpus {
        let entries = corpus::load(dir)?;
        let frames: Vec<(String, Vec<u8>)> = entries
            .into_iter()
            .map(|e| (e.path.display().to_string(), e.frame))
            .collect();
        return replay(&frames);
    }
    let report = fuzz::run(Options {
        seed: args.seed,
        packets: args.packets,
        max_differences: args.max_differences,
    })?;
    println!("{report}");
    Ok(report.differences.is_empty())
}

fn replay(frames: &[(String, Vec<u8>)]) -> anyhow::Result<bool> {
    let mut lab = FuzzLab::new(fuzz::FIXED_SEED)?;
    let mut clean = true;
    for (name, frame) in frames {
        let (reason, what) = lab.check(frame)?;
        if what.is_empty() {
            println!("{name}: agrees ({})", reason.name());
        } else {
            clean = false;
            let d = fuzz::Difference {
                seed: None,
                index: 0,
                frame: frame.clone(),
                what,
            };
            println!("{name}: {d}");
        }
    }
    Ok(clean)
}
