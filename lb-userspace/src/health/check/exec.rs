//! Exec check: run a command, healthy when it exits 0.

use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::time::Instant;

use super::{CheckFuture, CheckOutcome, CheckTarget, HealthCheck, format_duration, os_error_text};

/// How long to wait for a killed command to be reaped before leaving it to tokio's reaper.
const REAP_GRACE: Duration = Duration::from_millis(50);

/// Runs `command[0]` with the arguments `command[1..]` (looked up in `PATH` when it has no `/`),
/// in a process group of its own, with stdin, stdout and stderr on `/dev/null` and the daemon's
/// environment plus `LB_BACKEND_ADDRESS` (`10.0.0.11`, `2001:db8::11`), `LB_BACKEND_PORT` and
/// `LB_VIP_NAME`.
///
/// Healthy when it exits 0; otherwise `exit 2` or `killed by signal 9`. At the timeout the whole
/// process group gets SIGKILL (so a script's children die with it), the command is reaped, and
/// the reason is `killed after timeout 500ms`. A command that cannot be started fails with
/// `cannot run /path: No such file or directory`. Processes the command leaves running in the
/// background after exiting on its own are left alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecCheck {
    pub command: Vec<String>,
    pub vip_name: String,
}

impl HealthCheck for ExecCheck {
    fn check<'a>(&'a self, target: &'a CheckTarget, timeout: Duration) -> CheckFuture<'a> {
        Box::pin(async move {
            let started = Instant::now();
            let Some((program, args)) = self.command.split_first() else {
                return CheckOutcome::failed("cannot run: empty command", started.elapsed());
            };
            let mut command = Command::new(program);
            command
                .args(args)
                .env("LB_BACKEND_ADDRESS", target.address.to_string())
                .env("LB_BACKEND_PORT", target.port.to_string())
                .env("LB_VIP_NAME", &self.vip_name)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .kill_on_drop(true);
            let mut child = match command.spawn() {
                Ok(child) => child,
                Err(error) => {
                    return CheckOutcome::failed(
                        format!("cannot run {program}: {}", os_error_text(&error)),
                        started.elapsed(),
                    );
                }
            };
            // The child leads its own group: its pid is the group's id.
            let mut group = GroupKiller {
                pgid: child
                    .id()
                    .and_then(|pid| i32::try_from(pid).ok())
                    .map(Pid::from_raw),
            };

            match tokio::time::timeout(timeout, child.wait()).await {
                Ok(Ok(status)) => {
                    // Reaped: the id may be reused from now on, so never signal it again.
                    group.disarm();
                    let latency = started.elapsed();
                    match status.code() {
                        Some(0) => CheckOutcome::ok(latency),
                        _ => CheckOutcome::failed(exit_reason(status), latency),
                    }
                }
                Ok(Err(error)) => {
                    group.kill();
                    CheckOutcome::failed(
                        format!("cannot wait for {program}: {}", os_error_text(&error)),
                        started.elapsed(),
                    )
                }
                Err(_) => {
                    let latency = started.elapsed();
                    group.kill();
                    // SIGKILL cannot be caught: the leader is gone in a moment. Should it not be
                    // (stuck in the kernel), `kill_on_drop` leaves the reaping to tokio.
                    if let Ok(Ok(_)) = tokio::time::timeout(REAP_GRACE, child.wait()).await {
                        group.disarm();
                    }
                    CheckOutcome::failed(
                        format!("killed after timeout {}", format_duration(timeout)),
                        latency,
                    )
                }
            }
        })
    }

    fn kind(&self) -> &'static str {
        "exec"
    }
}

/// `exit 2`, `killed by signal 9`.
fn exit_reason(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        format!("exit {code}")
    } else if let Some(signal) = status.signal() {
        format!("killed by signal {signal}")
    } else {
        status.to_string()
    }
}

/// SIGKILLs the command's process group when dropped before the command was reaped, so a check
/// cancelled mid-way (its future dropped) leaves nothing running. Only an unreaped leader keeps
/// the group id from being reused, hence `disarm` right after the leader is reaped.
struct GroupKiller {
    pgid: Option<Pid>,
}

impl GroupKiller {
    fn kill(&self) {
        if let Some(pgid) = self.pgid {
            // ESRCH (the group is already gone) is fine.
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }

    fn disarm(&mut self) {
        self.pgid = None;
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}
