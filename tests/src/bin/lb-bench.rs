//! `lb-bench` (run by `cargo xtask bench`): per-packet cost, throughput, control-plane speed
//! and flow-state replication (sync), each figure beside a baseline measured in the same run
//! where there is one; writes `report.json`, `report.md`
//! and SVG plots into `--out` (default `target/bench`) and prints a table and issue 4's targets.
//!
//! Needs root (BPF programs, network namespaces). A missed target is reported, never an error:
//! the exit status is non-zero only when a benchmark could not run.

use std::{path::PathBuf, process::ExitCode, time::Instant};

use clap::{Parser, ValueEnum};
use lb_tests::bench::{
    Figure,
    control_plane::{self, ControlPlaneOptions},
    per_packet::{self, PerPacketOptions},
    report::{self, Machine},
    sync::{self, SyncOptions},
    throughput::{self, Generator, ThroughputOptions},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum Part {
    PerPacket,
    Throughput,
    ControlPlane,
    Sync,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum GeneratorArg {
    LiveFrames,
    Pktgen,
}

#[derive(Parser, Debug)]
#[command(
    name = "lb-bench",
    about = "Benchmarks of the XDP load balancer (issues 4, 11, 12): per-packet cost, throughput, control plane, sync"
)]
struct Cli {
    /// Run only these parts (repeatable); default: all four.
    #[arg(long, value_enum)]
    only: Vec<Part>,
    /// Small counts, for smoke tests: the figures exist but mean little.
    #[arg(long)]
    quick: bool,
    /// Interleaved trials per figure (default 7, or 5 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    trials: Option<u32>,
    /// Traffic generator of the throughput part.
    #[arg(long, value_enum, default_value = "live-frames")]
    generator: GeneratorArg,
    /// Where report.json, report.md and the SVG plots go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = std::iter::once("lb-bench".to_owned())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let mut parts = if cli.only.is_empty() {
        vec![
            Part::PerPacket,
            Part::ControlPlane,
            Part::Throughput,
            Part::Sync,
        ]
    } else {
        cli.only.clone()
    };
    parts.dedup();
    let trials = cli.trials.unwrap_or(if cli.quick { 5 } else { 7 }) as usize;
    let machine = Machine::detect();
    eprintln!(
        "lb-bench: {} ({} cores), kernel {}; parts {parts:?}, {trials} trials{}",
        machine.cpu,
        machine.cores,
        machine.kernel,
        if cli.quick { ", quick" } else { "" }
    );

    let mut figures: Vec<Figure> = Vec::new();
    let mut failed = Vec::new();
    for part in parts {
        let started = Instant::now();
        let result = match part {
            Part::PerPacket => per_packet::run(&PerPacketOptions {
                quick: cli.quick,
                trials,
                dump_dir: Some(cli.out.join("programs")),
            }),
            Part::ControlPlane => control_plane::run(&ControlPlaneOptions {
                quick: cli.quick,
                trials,
            }),
            Part::Throughput => throughput::run(&ThroughputOptions {
                trials,
                generator: match cli.generator {
                    GeneratorArg::LiveFrames => Generator::LiveFrames,
                    GeneratorArg::Pktgen => Generator::Pktgen,
                },
                packets_per_trial: if cli.quick {
                    200_000
                } else {
                    ThroughputOptions::default().packets_per_trial
                },
                ..ThroughputOptions::default()
            }),
            Part::Sync => sync::run(&SyncOptions { quick: cli.quick }),
        };
        match result {
            Ok(f) => {
                eprintln!(
                    "lb-bench: {part:?}: {} figures in {:.1} s",
                    f.len(),
                    started.elapsed().as_secs_f64()
                );
                figures.extend(f);
            }
            Err(e) => {
                eprintln!("lb-bench: {part:?} failed: {e:#}");
                failed.push(part);
            }
        }
    }

    match report::write(&cli.out, &machine, &command, &figures) {
        Ok((table, written)) => {
            println!("{table}");
            for file in &written.files {
                println!("wrote {}", file.display());
            }
            for skipped in &written.skipped {
                println!("not written: {skipped}");
            }
        }
        Err(e) => {
            eprintln!("lb-bench: writing the report failed: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("lb-bench: these parts could not run: {failed:?}");
        ExitCode::FAILURE
    }
}
