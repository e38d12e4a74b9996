//! `cargo xtask demo`: build the release binaries and run `lb-demo`.

use std::ffi::c_void;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{Context, Result};

use crate::cmd;

const DEMO_BIN: &str = "lb-demo";

/// Builds the release binaries, runs the demo with `args` and returns its exit code.
pub fn run(ebpf_toolchain: &str, args: &[String]) -> Result<ExitCode> {
    let mut child = cmd::build_and_spawn_release_bin(ebpf_toolchain, DEMO_BIN, args)?;
    let forwarding = match SigintForwarding::install(child.id()) {
        Ok(forwarding) => forwarding,
        Err(err) => {
            // Without the handler a Ctrl-C would kill xtask before the demo cleaned up.
            let _ = child.kill();
            let _ = child.wait();
            return Err(err);
        }
    };
    let status = child.wait().context("waiting for the demo failed");
    drop(forwarding);
    Ok(cmd::exit_code(status?))
}

/// The child SIGINT goes to while `SigintForwarding` is installed (0: none).
static CHILD_PID: AtomicI32 = AtomicI32::new(0);

/// While alive, xtask survives SIGINT and hands it to the child so the demo can clean up.
///
/// Ctrl-C in a terminal reaches the whole foreground process group, the child included, so
/// those (sent by the kernel, `si_code == SI_KERNEL`) are only ignored here; a SIGINT sent to
/// xtask alone (`kill -INT`, si_code <= 0) is passed on.
struct SigintForwarding {
    previous: libc::sigaction,
}

impl SigintForwarding {
    fn install(child: u32) -> Result<Self> {
        CHILD_PID.store(i32::try_from(child).unwrap_or(0), Ordering::SeqCst);
        let on_sigint: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut c_void) =
            forward_sigint;
        // SAFETY: both sigaction structs are zero-initialised plain data (valid for the C
        // type), the handler only does async-signal-safe work (an atomic load and kill(2)),
        // and sigaction(2) is given valid pointers for the new and the saved action.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigint as libc::sighandler_t;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            let mut previous: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGINT, &action, &mut previous) != 0 {
                return Err(std::io::Error::last_os_error())
                    .context("installing a SIGINT handler failed");
            }
            Ok(Self { previous })
        }
    }
}

impl Drop for SigintForwarding {
    fn drop(&mut self) {
        // SAFETY: restores the action saved by `install`, a valid sigaction.
        unsafe {
            libc::sigaction(libc::SIGINT, &self.previous, std::ptr::null_mut());
        }
        CHILD_PID.store(0, Ordering::SeqCst);
    }
}

extern "C" fn forward_sigint(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut c_void,
) {
    // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo_t (checked for null anyway).
    let from_terminal = !info.is_null() && unsafe { (*info).si_code } == libc::SI_KERNEL;
    let child = CHILD_PID.load(Ordering::SeqCst);
    if !from_terminal && child > 0 {
        // SAFETY: kill(2) is async-signal-safe; the child has not been reaped while the
        // handler is installed, so the pid still names it.
        unsafe {
            libc::kill(child, libc::SIGINT);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::{Duration, Instant};

    /// A SIGINT sent to xtask alone reaches the child, and xtask itself survives it.
    #[test]
    fn sigint_is_forwarded_to_the_child() {
        let mut command = Command::new("sh");
        // A test run started in the background (nohup, `cmd &` in a script) inherits SIGINT
        // ignored, and a shell cannot trap a signal ignored on entry: restore the default.
        // SAFETY: runs in the forked child before exec; signal(2) is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                Ok(())
            });
        }
        let mut child = command
            .args([
                "-c",
                "trap 'exit 42' INT; echo ready; i=0; while [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; exit 1",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sh runs");
        let forwarding = SigintForwarding::install(child.id()).expect("handler installs");
        // Wait until sh has installed its trap (it says so), however loaded the machine is.
        let mut ready = String::new();
        let stdout = child.stdout.take().expect("piped stdout");
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut ready)
            .expect("reading sh's readiness line");
        assert_eq!(ready.trim(), "ready");
        let start = Instant::now();
        // SAFETY: sends SIGINT to this process, whose handler is installed above.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGINT);
        }
        let status = child.wait().expect("child waits");
        drop(forwarding);
        assert_eq!(status.code(), Some(42));
        assert!(
            start.elapsed() < Duration::from_secs(25),
            "the child waited out its loop"
        );
    }
}
