//! `cargo xtask fuzz --packets N [--seed S]`: build the release binaries and run `lb-fuzz`, the
//! differential fuzzer of the data plane (real XDP program vs the reference model). Needs root.
//! The exit status is `lb-fuzz`'s: 1 when the program and the model disagree.

use std::process::ExitCode;

use anyhow::{Context, Result};

use crate::cmd;

const FUZZ_BIN: &str = "lb-fuzz";

pub fn run(ebpf_toolchain: &str, args: &[String]) -> Result<ExitCode> {
    let mut child = cmd::build_and_spawn_release_bin(ebpf_toolchain, FUZZ_BIN, args)?;
    let status = child.wait().context("waiting for lb-fuzz failed")?;
    Ok(cmd::exit_code(status))
}

/// `lb-fuzz`'s arguments for `--packets N [--seed S]` plus whatever else was given.
pub fn args(packets: u64, seed: Option<u64>, rest: &[String]) -> Vec<String> {
    let mut args = vec!["--packets".to_string(), packets.to_string()];
    if let Some(seed) = seed {
        args.extend(["--seed".to_string(), seed.to_string()]);
    }
    args.extend(rest.iter().cloned());
    args
}
