//! `cargo xtask`: set-up, checks, demo and benchmarks for the XDP load balancer.
//!
//! This crate depends on no other workspace crate: `cargo xtask setup` has to build on a
//! machine that has no eBPF toolchain yet.

mod apt;
mod bench;
mod checks;
mod cmd;
mod demo;
mod fuzz;
mod setup;
mod toolchain;
mod vm;

use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Set-up, checks, demo and benchmarks for the XDP load balancer"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing, idempotently: Debian packages, the eBPF Rust toolchain
    /// (rustup `distro` or `nightly`), bpf-linker 0.13, bpffs on /sys/fs/bpf, and the VM tests'
    /// guest kernel (Debian's linux-image, unpacked in /var/cache/lb-vm).
    Setup,
    /// Run setup, then `cargo fmt --check`, `cargo clippy -D warnings` and every test,
    /// including the ones that need root (run as root).
    Test {
        /// Run only the VM tests (tests/tests/vm_interop.rs: Debian's kernel under qemu as a
        /// backend host, decapsulating ipip/ip6tnl/fou), after building `lb`.
        #[arg(long)]
        vm: bool,
        /// Extra `cargo test` arguments (e.g. a filter); after a further `--`, test-harness
        /// arguments: `cargo xtask test -- maglev -- --nocapture`.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<String>,
    },
    /// Run setup, build the release binaries and run the demo (lb-demo) with ARGS (run as root).
    Demo {
        /// Arguments for lb-demo.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<String>,
    },
    /// Run setup, build the release binaries and run the benchmarks (lb-bench) with ARGS (run
    /// as root): per-packet cost, throughput, control plane. Report in target/bench; missed
    /// speed targets are reported, never a failure. `cargo xtask bench -- --help` for the ARGS.
    Bench {
        /// Arguments for lb-bench: --only per-packet|throughput|control-plane, --quick,
        /// --trials N, --generator live-frames|pktgen, --out DIR.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<String>,
    },
    /// Run setup, build the release binaries and run the differential fuzzer of the data plane
    /// (lb-fuzz: the real XDP program against the reference model; run as root). Any
    /// difference is reported with the seed, the frame's index and the frame in hex.
    Fuzz {
        /// Frames to generate.
        #[arg(long, default_value_t = 1_000_000)]
        packets: u64,
        /// RNG seed (default: the seed `cargo xtask test` uses); the same seed replays the run.
        #[arg(long)]
        seed: Option<u64>,
        /// More lb-fuzz arguments: --max-differences N, --frame HEX, --corpus DIR.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().task) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<ExitCode> {
    match task {
        Task::Setup => setup::run().map(|_| ExitCode::SUCCESS),
        Task::Test { vm, args } => {
            require_root_for("test")?;
            let toolchain = setup::run()?;
            checks::run(&toolchain, &args, vm).map(|()| ExitCode::SUCCESS)
        }
        Task::Demo { args } => {
            require_root_for("demo")?;
            let toolchain = setup::run()?;
            demo::run(&toolchain, &args)
        }
        Task::Bench { args } => {
            require_root_for("bench")?;
            let toolchain = setup::run()?;
            bench::run(&toolchain, &args)
        }
        Task::Fuzz {
            packets,
            seed,
            args,
        } => {
            require_root_for("fuzz")?;
            let toolchain = setup::run()?;
            fuzz::run(&toolchain, &fuzz::args(packets, seed, &args))
        }
    }
}

/// The tests, the demo and the benchmarks load XDP programs and create network namespaces.
fn require_root_for(task: &str) -> Result<()> {
    if !cmd::is_root() {
        bail!(
            "`cargo xtask {task}` needs root (network namespaces, XDP, bpffs): run it as root, \
             e.g. `sudo -E env PATH=\"$PATH\" cargo xtask {task}`"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_args(argv: &[&str]) -> Vec<String> {
        match Cli::try_parse_from(argv).expect("parses").task {
            Task::Test { args, .. } => args,
            _ => panic!("not the test task"),
        }
    }

    #[test]
    fn test_args_pass_through() {
        let args = test_args(&["xtask", "test", "--", "maglev", "--", "--nocapture"]);
        assert_eq!(args, ["maglev", "--", "--nocapture"]);
        assert_eq!(
            test_args(&["xtask", "test", "maglev", "--exact"]),
            ["maglev", "--exact"]
        );
        assert!(test_args(&["xtask", "test"]).is_empty());
        assert!(matches!(
            Cli::try_parse_from(["xtask", "test", "--vm"])
                .expect("parses")
                .task,
            Task::Test { vm: true, .. }
        ));
    }

    #[test]
    fn fuzz_args_pass_through() {
        let Task::Fuzz {
            packets,
            seed,
            args,
        } = Cli::try_parse_from(["xtask", "fuzz", "--packets", "5", "--seed", "7"])
            .expect("parses")
            .task
        else {
            panic!("not the fuzz task");
        };
        assert_eq!(
            fuzz::args(packets, seed, &args),
            ["--packets", "5", "--seed", "7"]
        );
    }

    #[test]
    fn bench_args_pass_through() {
        let args = match Cli::try_parse_from(["xtask", "bench", "--quick", "--only", "per-packet"])
            .expect("parses")
            .task
        {
            Task::Bench { args } => args,
            _ => panic!("not the bench task"),
        };
        assert_eq!(args, ["--quick", "--only", "per-packet"]);
    }
}
