//! Named network namespaces as drop guards, and ways to run code and processes inside them.
//!
//! A [`NetNs`] is created with `ip netns add` (so it is visible under `/run/netns` and to `ip -n`)
//! and deleted with `ip netns del` when it drops, also when a test panics. Three ways in:
//!
//! - [`NetNs::exec`]: a command under `ip netns exec` (own mount namespace with a fresh `/sys`:
//!   fine for `ip`, `sysctl`, `ethtool`, `ping`; the host's bpffs is not visible there).
//! - [`NetNs::spawn`]: a long-running process that enters only the network namespace (host mount
//!   namespace, so `/sys/fs/bpf` pins are shared with the host; see DESIGN §5). It is killed when
//!   the namespace guard drops.
//! - [`NetNs::run`] / [`NetNs::spawn_thread`]: Rust code on a thread that has `setns`-ed into the
//!   namespace. Sockets created there belong to the namespace for their whole life, whichever thread
//!   later uses them.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use anyhow::{Context, Result, anyhow, bail};
use nix::sched::{CloneFlags, setns};

/// Where `ip netns add` bind-mounts named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Longest interface name the kernel accepts (`IFNAMSIZ` - 1).
pub const MAX_INTERFACE_NAME_LEN: usize = 15;

/// One counter for every unique name this process hands out (namespaces and interfaces).
static NEXT_UNIQUE_ID: AtomicU64 = AtomicU64::new(0);

/// A number unique within this process (never repeats).
pub fn next_unique_id() -> u64 {
    NEXT_UNIQUE_ID.fetch_add(1, Ordering::Relaxed)
}

/// `"<prefix>-<pid>-<counter>"`: unique per process and per call, for namespace names (which have
/// no length limit).
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), next_unique_id())
}

/// A short suffix unique per process and per call, for interface names (at most 15 characters):
/// the pid in 5 base-36 digits (any Linux pid fits) followed by the counter in base 36, e.g.
/// `"02n9c0"`, `"02n9c1z"`.
pub fn short_unique_suffix() -> String {
    let pid = u64::from(std::process::id());
    let mut suffix = to_base36(pid);
    while suffix.len() < 5 {
        suffix.insert(0, '0');
    }
    suffix.push_str(&to_base36(next_unique_id()));
    suffix
}

/// `prefix` followed by [`short_unique_suffix`], checked to fit in an interface name.
pub fn unique_interface_name(prefix: &str) -> Result<String> {
    let name = format!("{prefix}{}", short_unique_suffix());
    if name.len() > MAX_INTERFACE_NAME_LEN {
        bail!(
            "interface name {name:?} is longer than {MAX_INTERFACE_NAME_LEN} characters: \
             use a prefix of at most {} characters",
            MAX_INTERFACE_NAME_LEN.saturating_sub(name.len() - prefix.len())
        );
    }
    Ok(name)
}

fn to_base36(mut value: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut reversed = Vec::new();
    loop {
        reversed.push(DIGITS[(value % 36) as usize]);
        value /= 36;
        if value == 0 {
            break;
        }
    }
    reversed
        .iter()
        .rev()
        .map(|&digit| char::from(digit))
        .collect()
}

/// Runs `program args...` on the host, returning its output or an error that names the command
/// line, the exit status and stderr.
pub fn run_command<I, S>(program: &str, args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = Command::new(program);
    command.args(args);
    run_checked(&mut command)
}

/// Runs a prepared command to completion; a non-zero exit is an error naming the command line and
/// carrying its stderr (and stdout, where tools print their complaints).
pub fn run_checked(command: &mut Command) -> Result<Output> {
    let command_line = describe_command(command);
    let output = command
        .output()
        .with_context(|| format!("cannot start `{command_line}`"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let mut message = format!("`{command_line}` failed ({})", output.status);
        if !stderr.trim().is_empty() {
            let _ = write!(message, "; stderr: {}", stderr.trim());
        }
        if !stdout.trim().is_empty() {
            let _ = write!(message, "; stdout: {}", stdout.trim());
        }
        bail!(message);
    }
    Ok(output)
}

/// The command line of `command`, for error messages.
pub fn describe_command(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A named network namespace that is deleted when dropped (also on panic), after killing the
/// processes started in it with [`NetNs::spawn`].
#[derive(Debug)]
pub struct NetNs {
    name: String,
    spawned: Mutex<Vec<SpawnedProcess>>,
}

/// A child process tracked through a pidfd, so killing it on drop can never hit an unrelated
/// process that reused the pid after the owner of the `Child` reaped it.
#[derive(Debug)]
struct SpawnedProcess {
    pid: u32,
    pidfd: Option<OwnedFd>,
}

impl NetNs {
    /// Creates `"<prefix>-<pid>-<counter>"` with `ip netns add`.
    pub fn new(prefix: &str) -> Result<Self> {
        Self::with_name(&unique_name(prefix))
    }

    /// Creates a namespace with exactly this name (an error if it exists). The caller is
    /// responsible for uniqueness; [`unique_name`] helps.
    pub fn with_name(name: &str) -> Result<Self> {
        if name.is_empty() || name.contains('/') {
            bail!("invalid network namespace name {name:?}");
        }
        run_command("ip", ["netns", "add", name])
            .with_context(|| format!("cannot create network namespace {name}"))?;
        let namespace = Self {
            name: name.to_owned(),
            spawned: Mutex::new(Vec::new()),
        };
        // A fresh namespace has `lo` down; almost everything wants it up.
        namespace
            .ip(["link", "set", "lo", "up"])
            .with_context(|| format!("cannot bring lo up in {name}"))?;
        Ok(namespace)
    }

    /// The namespace's name, as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, the file that `setns` and `nsenter --net=` open.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_RUN_DIR).join(&self.name)
    }

    /// Runs `ip netns exec <name> program args...` to completion.
    pub fn exec<I, S>(&self, program: &str, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.name, program])
            .args(args);
        run_checked(&mut command)
    }

    /// Runs `ip -n <name> args...` (cheaper than `exec("ip", ..)`: no mount namespace set-up).
    pub fn ip<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Command::new("ip");
        command.args(["-n", &self.name]).args(args);
        run_checked(&mut command)
    }

    /// Sets a sysctl inside the namespace, e.g. `("net.ipv4.conf.all.arp_ignore", "1")`, by
    /// writing `/proc/sys/...` from a thread in the namespace (network sysctls are per namespace
    /// and resolved against the writing thread's namespace). Dots in `key` separate path
    /// components, so keys naming interfaces with dots in their names are not supported.
    pub fn set_sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        self.try_run(|| std::fs::write(&path, value))?
            .with_context(|| format!("cannot set {key}={value} in {}", self.name))
    }

    /// Reads a sysctl inside the namespace (trimmed).
    pub fn sysctl(&self, key: &str) -> Result<String> {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        let value = self
            .try_run(|| std::fs::read_to_string(&path))?
            .with_context(|| format!("cannot read {key} in {}", self.name))?;
        Ok(value.trim().to_owned())
    }

    /// Sends `count` pings to `target`, 0.2 s apart, each waiting up to `timeout_seconds` for its
    /// reply (`ip netns exec ... ping`); an error unless at least one reply came back.
    pub fn ping(&self, target: std::net::IpAddr, count: u32, timeout_seconds: u32) -> Result<()> {
        let count = count.to_string();
        let timeout = timeout_seconds.to_string();
        let target_text = target.to_string();
        let mut args = vec!["-n", "-q", "-c", &count, "-W", &timeout, "-i", "0.2"];
        if target.is_ipv6() {
            args.push("-6");
        }
        args.push(&target_text);
        self.exec("ping", args)
            .with_context(|| format!("ping {target} from {} failed", self.name))?;
        Ok(())
    }

    /// A `Command` that runs `program` in this namespace via `nsenter --net=/run/netns/<name>`
    /// (network namespace only: the host's mount namespace and bpffs stay visible). Hand it to
    /// [`NetNs::spawn`] to have it killed when the namespace drops, or run it yourself.
    pub fn nsenter_command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        command
    }

    /// Starts `command` inside this namespace and tracks it: the process is killed (SIGKILL) and
    /// reaped when the namespace guard drops, unless it has ended before.
    ///
    /// Any `Command` works: the child `setns`es into the namespace between fork and exec, exactly
    /// what `nsenter --net=` does, so it keeps the host's mount namespace (and `/sys/fs/bpf`), and
    /// the returned pid is the program itself. A command from [`NetNs::nsenter_command`] is started
    /// as is (entering the same namespace twice is harmless).
    pub fn spawn(&self, command: &mut Command) -> Result<Child> {
        let command_line = describe_command(command);
        let namespace_file = self.open()?;
        // SAFETY: the closure runs in the forked child before exec and only calls `setns(2)`, which
        // is async-signal-safe; it allocates nothing and takes no locks. The namespace file is
        // owned by the closure, so its descriptor stays valid for every spawn of this `Command`.
        unsafe {
            command.pre_exec(move || {
                let flags = libc::CLONE_NEWNET;
                if libc::setns(namespace_file.as_raw_fd(), flags) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start `{command_line}` in {}", self.name))?;
        let pid = child.id();
        self.spawned
            .lock()
            .map_err(|_| anyhow!("the list of processes spawned in {} is poisoned", self.name))?
            .push(SpawnedProcess {
                pid,
                pidfd: open_pidfd(pid),
            });
        Ok(child)
    }

    /// Runs `f` on a fresh thread that has entered this namespace, and returns its result. A
    /// panic in `f` is propagated. Panics if the namespace cannot be entered (use
    /// [`NetNs::try_run`] to get that as an error).
    pub fn run<F, R>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        match self.try_run(f) {
            Ok(result) => result,
            Err(error) => panic!(
                "cannot run code in network namespace {}: {error:#}",
                self.name
            ),
        }
    }

    /// Like [`NetNs::run`], but an error if the namespace cannot be entered.
    pub fn try_run<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let namespace_file = self.open()?;
        let thread_name = format!("netns-{}", self.name);
        std::thread::scope(|scope| {
            let handle = std::thread::Builder::new()
                .name(thread_name)
                .spawn_scoped(scope, move || -> Result<R> {
                    enter(&namespace_file)?;
                    Ok(f())
                })
                .context("cannot start a thread")?;
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
        .with_context(|| format!("in network namespace {}", self.name))
    }

    /// Starts `f` on a named thread that has entered this namespace (for servers). Returns once
    /// the thread is inside the namespace, so an error entering it is reported here.
    pub fn spawn_thread<F, R>(&self, thread_name: &str, f: F) -> Result<JoinHandle<R>>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let namespace_file = self.open()?;
        let (entered_sender, entered_receiver) = mpsc::sync_channel::<Result<()>>(1);
        let handle = std::thread::Builder::new()
            .name(thread_name.to_owned())
            .spawn(move || {
                let entered = enter(&namespace_file);
                let failed = entered.is_err();
                // The receiver waits for exactly this message; it cannot be gone yet.
                let _ = entered_sender.send(entered);
                if failed {
                    // Parked forever would leak; returning needs an `R`. The caller got the error
                    // and does not join this thread, so ending it by unwinding is fine.
                    panic!("thread did not enter its network namespace (reported to the caller)");
                }
                f()
            })
            .with_context(|| format!("cannot start thread {thread_name}"))?;
        entered_receiver
            .recv()
            .context("the namespace thread ended before reporting")?
            .with_context(|| format!("thread {thread_name} cannot enter {}", self.name))?;
        Ok(handle)
    }

    fn open(&self) -> Result<File> {
        let path = self.path();
        File::open(&path).with_context(|| format!("cannot open {}", path.display()))
    }

    fn kill_spawned(&self) {
        let spawned = match self.spawned.lock() {
            Ok(mut guard) => std::mem::take(&mut *guard),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        for process in spawned {
            process.kill_and_reap();
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        self.kill_spawned();
        if let Err(error) = run_command("ip", ["netns", "del", &self.name]) {
            eprintln!(
                "warning: cannot delete network namespace {}: {error:#}",
                self.name
            );
        }
    }
}

/// Moves the calling thread into the network namespace behind `namespace_file`.
fn enter(namespace_file: &File) -> Result<()> {
    setns(namespace_file.as_fd(), CloneFlags::CLONE_NEWNET).context("setns(CLONE_NEWNET) failed")
}

fn open_pidfd(pid: u32) -> Option<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no memory is
    // passed in.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let raw = RawFd::try_from(raw).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: the syscall just returned this descriptor to us and nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(raw) })
}

impl SpawnedProcess {
    fn kill_and_reap(self) {
        match self.pidfd {
            Some(pidfd) => {
                // SAFETY: pidfd_send_signal on a descriptor we own; null siginfo is allowed. It
                // fails with ESRCH if the process has ended, which is fine.
                unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        pidfd.as_raw_fd(),
                        libc::SIGKILL,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    );
                }
                // SAFETY: a zeroed siginfo_t is a valid output buffer for waitid.
                let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
                // SAFETY: waitid on our pidfd with a valid output buffer. It reaps the child if the
                // owner of the `Child` has not; if they already have, it fails with ECHILD.
                unsafe {
                    libc::waitid(
                        libc::P_PIDFD,
                        pidfd.as_raw_fd() as libc::id_t,
                        &mut info,
                        libc::WEXITED,
                    );
                }
            }
            None => {
                // No pidfd (it could not be opened): the process had already ended and may have
                // been reaped, so its pid could belong to someone else now. Leave it alone.
                eprintln!(
                    "warning: no pidfd for spawned process {}, not killing it",
                    self.pid
                );
            }
        }
    }
}

/// Names from `ip netns list` (without the `(id: N)` annotations).
pub fn list_namespaces() -> Result<Vec<String>> {
    let output = run_command("ip", ["netns", "list"])?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Deletes namespaces named `"<prefix>-<pid>-..."` whose `<pid>` is not a running process: what
/// a test run killed by SIGKILL (no destructors) leaves behind. Returns the names deleted.
pub fn remove_stale_namespaces(prefix: &str) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let own_prefix = format!("{prefix}-");
    for name in list_namespaces()? {
        let Some(rest) = name.strip_prefix(&own_prefix) else {
            continue;
        };
        let Some(pid) = rest
            .split('-')
            .next()
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if PathBuf::from(format!("/proc/{pid}")).exists() {
            continue;
        }
        run_command("ip", ["netns", "del", &name])?;
        removed.push(name);
    }
    Ok(removed)
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn base36_round_numbers() {
        assert_eq!(to_base36(0), "0");
        assert_eq!(to_base36(35), "z");
        assert_eq!(to_base36(36), "10");
        assert_eq!(
            to_base36(4_194_304).len(),
            5,
            "the largest Linux pid fits in 5 digits"
        );
    }

    #[test]
    fn short_suffixes_are_unique_and_short() {
        let first = short_unique_suffix();
        let second = short_unique_suffix();
        assert_ne!(first, second);
        assert!(first.len() <= 8, "suffix {first:?} too long");
        let name = unique_interface_name("vethx").expect("short prefix fits");
        assert!(name.len() <= MAX_INTERFACE_NAME_LEN);
        assert!(unique_interface_name("a-very-long-prefix").is_err());
    }

    #[test]
    fn unique_names_carry_pid_and_differ() {
        let first = unique_name("lbt");
        let second = unique_name("lbt");
        assert_ne!(first, second);
        assert!(first.starts_with(&format!("lbt-{}-", std::process::id())));
    }
}
