//! `cargo xtask bench`: build the release binaries and run `lb-bench` (per-packet cost,
//! throughput, control plane; report in `target/bench`).
//!
//! A benchmark, not a test: missed speed targets are reported by `lb-bench`, never turned into a
//! failure. The exit status is `lb-bench`'s, non-zero only when a part could not run.

use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

use crate::cmd;

const BENCH_BIN: &str = "lb-bench";

/// Builds the release binaries (`lb` for the throughput setups, `lb-bench`), runs `lb-bench`
/// with `args` and returns its exit code.
pub fn run(ebpf_toolchain: &str, args: &[String]) -> Result<ExitCode> {
    let mut build = cmd::cargo(ebpf_toolchain);
    build.args([
        "build",
        "--release",
        "-p",
        "lb-userspace",
        "-p",
        "tests",
        "--bins",
    ]);
    println!("building: {}", cmd::display(&build));
    cmd::run(&mut build)?;
    let bin = cmd::target_dir().join("release").join(BENCH_BIN);
    if !bin.is_file() {
        bail!(
            "{} was not built: the `tests` crate must provide a `{BENCH_BIN}` binary",
            bin.display()
        );
    }
    let mut bench = Command::new(&bin);
    bench.args(args).current_dir(cmd::workspace_root());
    println!("running: {}", cmd::display(&bench));
    let mut child = bench
        .spawn()
        .with_context(|| format!("could not start {}", bin.display()))?;
    // A Ctrl-C reaches lb-bench too (same process group); xtask waits for it to finish.
    let previous = ignore_sigint();
    let status = child.wait().context("waiting for lb-bench failed");
    restore_sigint(previous);
    Ok(cmd::exit_code(status?))
}

fn ignore_sigint() -> libc::sighandler_t {
    // SAFETY: installing SIG_IGN for SIGINT has no preconditions.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) }
}

fn restore_sigint(previous: libc::sighandler_t) {
    if previous != libc::SIG_ERR {
        // SAFETY: restores the disposition signal(2) returned for SIGINT.
        unsafe {
            libc::signal(libc::SIGINT, previous);
        }
    }
}
