//! `cargo xtask test`: formatting, lints and every test (root-only ones included).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::cmd;

/// One check: a name for the summary and the cargo command that runs it.
struct Check {
    name: &'static str,
    cmd: Command,
}

enum Outcome {
    Passed(Duration),
    Failed(Duration, String),
    Skipped,
}

/// The test binary of the VM tests (`cargo xtask test --vm`).
const VM_TESTS: &str = "vm_interop";

/// Runs the checks in order, stopping at the first failure, then prints a summary.
/// `extra` goes to `cargo test`: before a `--` to cargo (e.g. a filter), after it to the harness.
/// `vm_only`: just build `lb` and run the VM tests.
pub fn run(ebpf_toolchain: &str, extra: &[String], vm_only: bool) -> Result<()> {
    let checks = if vm_only {
        vm_checks(ebpf_toolchain, extra)
    } else {
        checks(ebpf_toolchain, extra)
    };
    let mut outcomes = Vec::with_capacity(checks.len());
    let mut failed = None;
    for mut check in checks {
        let outcome = if failed.is_some() {
            Outcome::Skipped
        } else {
            run_check(&mut check)?
        };
        if let Outcome::Failed(..) = outcome {
            failed = Some(check.name);
        }
        outcomes.push((check, outcome));
    }
    print_summary(&outcomes);
    match failed {
        Some(name) => bail!("`{name}` failed: fix it and run `cargo xtask test` again"),
        None => Ok(()),
    }
}

fn checks(ebpf_toolchain: &str, extra: &[String]) -> Vec<Check> {
    let mut fmt = cmd::cargo(ebpf_toolchain);
    fmt.args(["fmt", "--all", "--", "--check"]);
    // Plain `cargo clippy`/`cargo test` at the root use default-members, which leave out
    // lb-ebpf (it only builds for bpfel-unknown-none); `--workspace` would pull it in.
    let mut clippy = cmd::cargo(ebpf_toolchain);
    clippy.args(["clippy", "--all-targets", "--", "-D", "warnings"]);
    // The end-to-end tests run the real `lb` binary from target/debug.
    let mut build = cmd::cargo(ebpf_toolchain);
    build.args(["build", "-p", "lb-userspace", "--bins"]);
    vec![
        Check {
            name: "fmt",
            cmd: fmt,
        },
        Check {
            name: "clippy",
            cmd: clippy,
        },
        Check {
            name: "build",
            cmd: build,
        },
        Check {
            name: "test",
            cmd: test_command(ebpf_toolchain, extra),
        },
    ]
}

/// `cargo xtask test --vm`: the `lb` binary (the VM tests run it) and the VM tests alone.
fn vm_checks(ebpf_toolchain: &str, extra: &[String]) -> Vec<Check> {
    let mut build = cmd::cargo(ebpf_toolchain);
    build.args(["build", "-p", "lb-userspace", "--bins"]);
    let mut only_vm: Vec<String> = ["-p", "tests", "--test", VM_TESTS].map(String::from).into();
    only_vm.extend(extra.iter().cloned());
    vec![
        Check {
            name: "build",
            cmd: build,
        },
        Check {
            name: "vm",
            cmd: test_command(ebpf_toolchain, &only_vm),
        },
    ]
}

fn test_command(ebpf_toolchain: &str, extra: &[String]) -> Command {
    let (cargo_args, harness_args) = match extra.iter().position(|a| a == "--") {
        Some(i) => (&extra[..i], &extra[i + 1..]),
        None => (extra, &[][..]),
    };
    let mut test = cmd::cargo(ebpf_toolchain);
    test.arg("test")
        .args(cargo_args)
        .args(["--", "--include-ignored"])
        .args(harness_args);
    test
}

fn run_check(check: &mut Check) -> Result<Outcome> {
    println!("running: {}", cmd::display(&check.cmd));
    let start = Instant::now();
    let status = cmd::status(&mut check.cmd)?;
    let took = start.elapsed();
    Ok(if status.success() {
        Outcome::Passed(took)
    } else {
        Outcome::Failed(took, status.to_string())
    })
}

fn print_summary(outcomes: &[(Check, Outcome)]) {
    println!("\nsummary:");
    for (check, outcome) in outcomes {
        let line = match outcome {
            Outcome::Passed(took) => {
                format!("pass  {:<7} {:>6.1} s", check.name, took.as_secs_f64())
            }
            Outcome::Failed(took, why) => {
                format!(
                    "FAIL  {:<7} {:>6.1} s  ({why})",
                    check.name,
                    took.as_secs_f64()
                )
            }
            Outcome::Skipped => format!("skip  {:<7}", check.name),
        };
        println!("  {line}  {}", cmd::display(&check.cmd));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_only_runs_the_vm_test_binary() {
        let checks = vm_checks("distro", &[]);
        let names: Vec<_> = checks.iter().map(|c| c.name).collect();
        assert_eq!(names, ["build", "vm"]);
        let test = args(&checks[1].cmd);
        assert_eq!(
            &test[..6],
            ["test", "-p", "tests", "--test", VM_TESTS, "--"]
        );
    }

    fn args(cmd: &Command) -> Vec<String> {
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn extra_args_split_at_double_dash() {
        let extra: Vec<String> = ["maglev", "--", "--nocapture"].map(String::from).into();
        let test = test_command("distro", &extra);
        let with = |before: &[&str], after: &[&str]| -> Vec<String> {
            before
                .iter()
                .chain(after)
                .map(|s| (*s).to_owned())
                .collect()
        };
        assert_eq!(
            args(&test),
            with(
                &["test", "maglev", "--", "--include-ignored"],
                &["--nocapture"]
            )
        );
        assert_eq!(
            args(&test_command("distro", &[])),
            with(&["test", "--", "--include-ignored"], &[])
        );
    }
}
