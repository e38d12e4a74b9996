//! `cargo xtask bench`: build the release binaries and run `lb-bench` (per-packet cost,
//! throughput, control plane, flow-state replication; report in `target/bench`).
//!
//! A benchmark, not a test: missed speed targets are reported by `lb-bench`, never turned into a
//! failure. The exit status is `lb-bench`'s, non-zero only when a part could not run.

use std::process::ExitCode;

use anyhow::{Context, Result};

use crate::cmd;

const BENCH_BIN: &str = "lb-bench";

/// Builds the release binaries (`lb` for the throughput setups, `lb-bench`), runs `lb-bench`
/// with `args` and returns its exit code.
pub fn run(ebpf_toolchain: &str, args: &[String]) -> Result<ExitCode> {
    let mut child = cmd::build_and_spawn_release_bin(ebpf_toolchain, BENCH_BIN, args)?;
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
