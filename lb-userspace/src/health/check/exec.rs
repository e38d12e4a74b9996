//! Exec check: run a command, healthy when it exits 0.

use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::signal::unix::{SignalKind, signal};
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
/// `cannot run /path: No such file or directory`. When the command exits on its own, whatever it
/// left running in its group (a background child) gets SIGKILL too, before the command is
/// reaped: nothing of a check outlives it.
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

            let exited = match group.pgid {
                Some(pid) => tokio::time::timeout(timeout, leader_exited(pid)).await,
                // No pid: the child is already reaped (cannot happen before a wait).
                None => Ok(Ok(())),
            };
            match exited {
                Ok(Ok(())) => {
                    let latency = started.elapsed();
                    // The leader has exited but is not reaped, so its pid still names this
                    // group and nobody else's: kill what it left behind, then reap it.
                    group.kill();
                    let status = child.wait().await;
                    group.disarm();
                    match status {
                        Ok(status) if status.code() == Some(0) => CheckOutcome::ok(latency),
                        Ok(status) => CheckOutcome::failed(exit_reason(status), latency),
                        Err(error) => CheckOutcome::failed(
                            format!("cannot wait for {program}: {}", os_error_text(&error)),
                            latency,
                        ),
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

/// How often [`leader_exited`] looks again when no SIGCHLD came (one may come before it listens).
const EXIT_POLL: Duration = Duration::from_millis(10);

/// Waits until the process `pid` (a child of ours) has exited, without reaping it
/// (`waitid(WNOWAIT)`): until it is reaped its pid cannot be handed out again, so its group can
/// still be signalled safely.
async fn leader_exited(pid: Pid) -> std::io::Result<()> {
    let mut sigchld = signal(SignalKind::child()).ok();
    loop {
        match waitid(
            Id::Pid(pid),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT | WaitPidFlag::WNOHANG,
        ) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(_) => return Ok(()),
            Err(errno) => return Err(errno.into()),
        }
        let child_signal = async {
            match &mut sigchld {
                Some(sigchld) => {
                    sigchld.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = child_signal => {}
            () = tokio::time::sleep(EXIT_POLL) => {}
        }
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
