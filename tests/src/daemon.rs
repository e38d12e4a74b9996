//! Runs the real `lb` binary inside a namespace, as an operator would, and reads what it prints.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

use crate::netns::NetNs;

/// How the daemon enters the namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launch {
    /// `nsenter --net`: the host's mounts (and bpffs) stay visible.
    Nsenter,
    /// `ip netns exec`: a fresh /sys without bpffs, as many operators start things.
    IpNetnsExec,
}

/// Path of the `lb` binary: `$LB_BIN`, else `target/<profile>/lb` next to this test binary.
pub fn lb_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("LB_BIN") {
        return PathBuf::from(path);
    }
    // Test binaries live in target/<profile>/deps/, the demo in target/<profile>/.
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join("lb")
}

/// The control socket a test daemon in `namespace` uses (unless its config says otherwise).
pub fn api_socket_for(namespace: &NetNs) -> PathBuf {
    std::env::temp_dir().join(format!("lb-{}.sock", namespace.name()))
}

/// A running `lb run`. On drop: SIGTERM, then `lb detach` (the daemon leaves its program
/// attached and its maps pinned when it stops, for the next one to adopt).
pub struct LbDaemon {
    child: Option<Child>,
    stderr: Arc<Mutex<String>>,
    stdout: Option<std::process::ChildStdout>,
    stderr_reader: Option<std::thread::JoinHandle<()>>,
    config_path: PathBuf,
    /// The namespace file the daemon runs in, for `lb detach` there.
    namespace: PathBuf,
    /// The interface of its config.
    interface: String,
    /// Whether dropping it runs `lb detach` (once it has attached).
    detach_on_drop: bool,
}

/// `lb status --json --api SOCKET`, parsed.
pub fn lb_status(socket: &Path) -> Result<serde_json::Value> {
    let output = crate::netns::run_checked(
        Command::new(lb_binary())
            .args(["status", "--json", "--api"])
            .arg(socket),
    )?;
    serde_json::from_slice(&output.stdout).context("lb status --json is not JSON")
}

/// `lb reload --api SOCKET`: the daemon re-reads its config file and applies the difference.
/// Returns what it printed (`reloaded FILE: N changes` and one line per change); an error with
/// its stderr when it refused the file.
pub fn lb_reload(socket: &Path) -> Result<String> {
    let output = crate::netns::run_checked(
        Command::new(lb_binary())
            .args(["reload", "--api"])
            .arg(socket),
    )?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `lb detach --interface IF` in `namespace` (a `/run/netns/NAME` path); returns its stdout.
pub fn lb_detach(namespace: &Path, interface: &str) -> Result<String> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", namespace.display()))
        .arg("--")
        .arg(lb_binary())
        .args(["detach", "--interface", interface])
        .output()
        .context("running lb detach")?;
    if !out.status.success() {
        bail!(
            "lb detach --interface {interface} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl LbDaemon {
    /// Writes `config` to a temp file, starts `lb run --config` in `namespace` and waits until it
    /// says it is attached.
    pub fn start(namespace: &NetNs, config: &str, launch: Launch) -> Result<Self> {
        Self::start_wrapped(namespace, config, launch, &[])
    }

    /// [`Self::start`] with `lb` run through `wrapper` (a command and its arguments, `lb run
    /// ...` appended: `setpriv --bounding-set=... --`), inside the namespace.
    pub fn start_wrapped(
        namespace: &NetNs,
        config: &str,
        launch: Launch,
        wrapper: &[String],
    ) -> Result<Self> {
        let binary = lb_binary();
        if !binary.exists() {
            bail!(
                "{} not found: build it first (`cargo build -p lb-userspace --bins`; `cargo xtask test` does)",
                binary.display()
            );
        }
        let config_path = std::env::temp_dir().join(format!("{}.toml", namespace.name()));
        // The daemon's own parser: the interface is where `lb detach` must look afterwards.
        let interface = lb::config::Config::parse(config, &config_path)
            .map_err(|e| anyhow!("the test config is invalid: {e}"))?
            .interface;
        write_config(namespace, &config_path, config)?;
        let mut command = match launch {
            Launch::Nsenter => match wrapper.split_first() {
                None => namespace.nsenter_command(&binary),
                Some((program, args)) => {
                    let mut c = namespace.nsenter_command(program);
                    c.args(args).arg(&binary);
                    c
                }
            },
            Launch::IpNetnsExec => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", namespace.name()])
                    .args(wrapper)
                    .arg(&binary);
                c
            }
        };
        command
            .args(["run", "--config"])
            .arg(&config_path)
            .env("LB_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = match launch {
            Launch::Nsenter => namespace.spawn(&mut command)?,
            Launch::IpNetnsExec => command.spawn().context("starting ip netns exec lb")?,
        };
        let stderr_pipe = child.stderr.take().context("stderr pipe")?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        let stderr_reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
                eprintln!("[lb] {line}");
                sink.lock().expect("stderr buffer").push_str(&(line + "\n"));
            }
        });
        let stdout = child.stdout.take();
        let mut daemon = Self {
            child: Some(child),
            stderr,
            stdout,
            stderr_reader: Some(stderr_reader),
            config_path,
            namespace: namespace.path(),
            interface,
            detach_on_drop: true,
        };
        if let Err(e) = daemon.wait_for_log("XDP load balancer attached", Duration::from_secs(20)) {
            // It never attached: whatever is attached or pinned is not its to remove.
            daemon.detach_on_drop = false;
            return Err(e);
        }
        Ok(daemon)
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        self.stderr.lock().expect("stderr buffer").clone()
    }

    /// Waits until the log contains `needle`; fails early if the daemon exits.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                std::thread::sleep(Duration::from_millis(100));
                bail!(
                    "lb exited with {status} before logging {needle:?}; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(anyhow!(
            "lb did not log {needle:?} within {timeout:?}; its log:\n{}",
            self.log()
        ))
    }

    /// SIGTERM, wait for exit, `lb detach` what it left attached, and return the final
    /// counters it printed.
    pub fn stop(self) -> Result<FinalCounters> {
        let (namespace, interface) = (self.namespace.clone(), self.interface.clone());
        let (counters, _) = self.stop_leaving_attached()?;
        lb_detach(&namespace, &interface)?;
        Ok(counters)
    }

    /// SIGKILL, as a crash would: nothing of the daemon's runs any more, what it pinned stays.
    pub fn kill(mut self) -> Result<()> {
        let mut child = self.child.take().context("already stopped")?;
        child.kill().context("SIGKILL lb")?;
        child.wait().context("reaping lb")?;
        Ok(())
    }

    /// Its process id while it runs (`nsenter` execs `lb`, so this is `lb` itself).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The interface it balances on.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// SIGTERM and wait for exit; the program stays attached on the pinned state. Returns the
    /// final counters it printed and its whole log.
    pub fn stop_leaving_attached(mut self) -> Result<(FinalCounters, String)> {
        let mut child = self.child.take().context("already stopped")?;
        terminate(&child);
        let status = wait_timeout(&mut child, Duration::from_secs(10))?;
        let mut out = String::new();
        if let Some(mut stdout) = self.stdout.take() {
            stdout
                .read_to_string(&mut out)
                .context("reading lb stdout")?;
        }
        // The log is whole once the reader has seen the pipe close.
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join();
        }
        if !status.success() {
            bail!("lb exited with {status}; log:\n{}", self.log());
        }
        Ok((FinalCounters::parse(&out)?, self.log()))
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Replaces the daemon's config file (with the same control socket added as at start), for
    /// `lb reload` or SIGHUP to pick up.
    pub fn rewrite_config(&self, namespace: &NetNs, config: &str) -> Result<()> {
        write_config(namespace, &self.config_path, config)
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) to the daemon.
    pub fn signal(&self, signal: libc::c_int) {
        if let Some(child) = &self.child {
            // SAFETY: sending a signal to our own child's pid; no memory is involved.
            unsafe {
                libc::kill(child.id() as libc::pid_t, signal);
            }
        }
    }
}

/// Writes `config` to `path`, with `api` set to [`api_socket_for`] unless it sets one: daemons
/// of tests running side by side each need their own control socket.
fn write_config(namespace: &NetNs, path: &Path, config: &str) -> Result<()> {
    let config = if config.lines().any(|l| l.trim_start().starts_with("api")) {
        config.to_owned()
    } else {
        format!(
            "api = \"{}\"\n{config}",
            api_socket_for(namespace).display()
        )
    };
    std::fs::write(path, config).with_context(|| format!("writing {}", path.display()))
}

fn terminate(child: &Child) {
    // SAFETY: sending a signal to our own child's pid; no memory is involved.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("waiting for lb")? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("lb did not exit within {timeout:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for LbDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&child);
            let _ = wait_timeout(&mut child, Duration::from_secs(10));
            if self.detach_on_drop
                && let Err(e) = lb_detach(&self.namespace, &self.interface)
            {
                eprintln!("cleaning up after lb: {e:#}");
            }
        }
        let _ = std::fs::remove_file(&self.config_path);
    }
}

/// Counters from the `final counters` block `lb run` prints on exit.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FinalCounters {
    /// (vip name, backend address) → (packets, bytes, new_flows)
    pub backends: BTreeMap<(String, String), (u64, u64, u64)>,
    /// vip name → (packets, bytes, new_flows)
    pub vips: BTreeMap<String, (u64, u64, u64)>,
    /// reason → packets
    pub reasons: BTreeMap<String, u64>,
}

fn field(tokens: &[&str], name: &str) -> Result<u64> {
    tokens
        .iter()
        .find_map(|t| t.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
        .with_context(|| format!("no {name}= in {tokens:?}"))?
        .parse()
        .with_context(|| format!("bad {name} in {tokens:?}"))
}

impl FinalCounters {
    pub fn parse(text: &str) -> Result<Self> {
        let body = text
            .split_once("final counters\n")
            .with_context(|| format!("no `final counters` block in lb's output:\n{text}"))?
            .1;
        let mut counters = Self::default();
        let mut vip = String::new();
        for line in body.lines() {
            let tokens: Vec<&str> = line.split_whitespace().collect();
            match tokens.first().copied() {
                Some("vip") => {
                    vip = tokens.get(1).context("vip name")?.to_string();
                    let c = (
                        field(&tokens, "packets")?,
                        field(&tokens, "bytes")?,
                        field(&tokens, "new_flows")?,
                    );
                    counters.vips.insert(vip.clone(), c);
                }
                Some("backend") => {
                    let address = tokens.get(1).context("backend address")?.to_string();
                    let c = (
                        field(&tokens, "packets")?,
                        field(&tokens, "bytes")?,
                        field(&tokens, "new_flows")?,
                    );
                    counters.backends.insert((vip.clone(), address), c);
                }
                Some("reason") => {
                    let name = tokens.get(1).context("reason name")?.to_string();
                    counters.reasons.insert(name, field(&tokens, "packets")?);
                }
                _ => {}
            }
        }
        Ok(counters)
    }

    /// New flows the LB sent to `backend` of `vip`.
    pub fn new_flows(&self, vip: &str, backend: &str) -> u64 {
        self.backends
            .get(&(vip.to_owned(), backend.to_owned()))
            .map_or(0, |c| c.2)
    }
}

/// A backend state change as `lb run` logs it (see `lb-userspace/src/daemon/events.rs`):
/// `<RFC 3339 time> <LEVEL> <target>: backend <addr> of vip <name>: <from> -> <to> (<reason>); map updated in <N>us ...`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendTransition {
    /// The log line's timestamp (wall clock: compare with `SystemTime::now()` taken in the test).
    pub at: std::time::SystemTime,
    pub vip: String,
    pub backend: String,
    pub from: String,
    pub to: String,
    /// Why the last check passed or failed, as the daemon words it.
    pub reason: String,
    /// The daemon's own measure of how long publishing the change took, up to the VIP record flip.
    pub map_update: Duration,
    /// The table was prepared on the check before (` (table prepared on the check before)`).
    pub prepared: bool,
}

/// A VIP's switch between pools as `lb run` logs it:
/// `<time> <LEVEL> <target>: vip <name>: pool <from> -> <to> (...)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolFlip {
    pub at: std::time::SystemTime,
    pub vip: String,
    pub from: String,
    pub to: String,
}

/// `text` without ANSI escape sequences (`ESC [ ... final byte`), in case the log is coloured.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // Parameters and intermediates, then one final byte in '@'..='~'.
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The timestamp at the start of a log line and the rest after the `target: ` prefix.
fn split_log_line(line: &str) -> Option<(std::time::SystemTime, String)> {
    let line = strip_ansi(line);
    let line = line.trim();
    let (stamp, _) = line.split_once(char::is_whitespace)?;
    let at = humantime::parse_rfc3339(stamp)
        .or_else(|_| humantime::parse_rfc3339_weak(stamp))
        .ok()?;
    Some((at, line.to_owned()))
}

impl BackendTransition {
    /// Parses one log line; `None` if it is not a backend transition.
    pub fn parse(line: &str) -> Option<Self> {
        let (at, line) = split_log_line(line)?;
        let rest = &line[line.find(": backend ")? + ": backend ".len()..];
        let (backend, rest) = rest.split_once(" of vip ")?;
        let (vip, rest) = rest.split_once(": ")?;
        let (from, rest) = rest.split_once(" -> ")?;
        let (to, rest) = rest.split_once(" (")?;
        let marker = "); map updated in ";
        let end_of_reason = rest.find(marker)?;
        let reason = &rest[..end_of_reason];
        let number = &rest[end_of_reason + marker.len()..];
        let digits: String = number.chars().take_while(char::is_ascii_digit).collect();
        let after = number[digits.len()..].strip_prefix("us")?;
        let prepared = after.starts_with(" (table prepared on the check before)");
        Some(Self {
            at,
            vip: vip.to_owned(),
            backend: backend.to_owned(),
            from: from.to_owned(),
            to: to.to_owned(),
            reason: reason.to_owned(),
            map_update: Duration::from_micros(digits.parse().ok()?),
            prepared,
        })
    }
}

impl PoolFlip {
    /// Parses one log line; `None` if it is not a pool flip.
    pub fn parse(line: &str) -> Option<Self> {
        let (at, line) = split_log_line(line)?;
        let rest = &line[line.find(": vip ")? + ": vip ".len()..];
        let (vip, rest) = rest.split_once(": pool ")?;
        let (from, rest) = rest.split_once(" -> ")?;
        let to = rest.split_whitespace().next()?;
        Some(Self {
            at,
            vip: vip.to_owned(),
            from: from.to_owned(),
            to: to.to_owned(),
        })
    }
}

impl LbDaemon {
    /// Every backend state change logged so far, in order.
    pub fn transitions(&self) -> Vec<BackendTransition> {
        self.log()
            .lines()
            .filter_map(BackendTransition::parse)
            .collect()
    }

    /// Every pool flip logged so far, in order.
    pub fn pool_flips(&self) -> Vec<PoolFlip> {
        self.log().lines().filter_map(PoolFlip::parse).collect()
    }

    /// The last `lines` lines of the log (for failure messages).
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

#[cfg(test)]
mod log_parser_tests {
    use super::*;

    #[test]
    fn a_transition_line_is_parsed_with_or_without_colours() {
        let plain = "2026-11-27T02:01:11.816586Z  WARN lb::daemon::events: backend 10.100.0.11 of vip web: up -> down (connect: Connection refused (os error 111)); map updated in 152us vip=\"web\" backend=10.100.0.11";
        let t = BackendTransition::parse(plain).expect("parsed");
        assert_eq!(t.backend, "10.100.0.11");
        assert_eq!(t.vip, "web");
        assert_eq!((t.from.as_str(), t.to.as_str()), ("up", "down"));
        assert_eq!(t.reason, "connect: Connection refused (os error 111)");
        assert_eq!(t.map_update, Duration::from_micros(152));
        assert_eq!(
            t.at,
            humantime::parse_rfc3339("2026-11-27T02:01:11.816586Z").expect("time")
        );
        let coloured = "\u{1b}[2m2026-11-27T02:01:11.816586Z\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m \u{1b}[2mlb::daemon::events\u{1b}[0m\u{1b}[2m:\u{1b}[0m backend 10.100.0.11 of vip web: up -> down (refused); map updated in 7us";
        let c = BackendTransition::parse(coloured).expect("parsed coloured");
        assert_eq!((c.at, c.map_update), (t.at, Duration::from_micros(7)));
        assert!(!t.prepared && !c.prepared);
        assert!(PoolFlip::parse(plain).is_none());
        let prepared = "2026-11-27T02:01:11.816586Z  WARN lb::daemon::events: backend 10.100.0.11 of vip web: up -> down (refused); map updated in 190us (table prepared on the check before) vip=\"web\"";
        let p = BackendTransition::parse(prepared).expect("parsed prepared");
        assert_eq!(
            (p.map_update, p.prepared),
            (Duration::from_micros(190), true)
        );
    }

    #[test]
    fn a_pool_flip_line_is_parsed() {
        let line = "2026-11-27T02:01:12.000001Z  WARN lb::daemon::events: vip web: pool primary -> standby (0 of 3 primaries healthy, min_healthy 1; 1 backends in the ring) vip=web";
        let f = PoolFlip::parse(line).expect("parsed");
        assert_eq!(
            (f.vip.as_str(), f.from.as_str(), f.to.as_str()),
            ("web", "primary", "standby")
        );
        assert!(BackendTransition::parse(line).is_none());
        assert!(PoolFlip::parse("no timestamp: vip web: pool a -> b").is_none());
    }
}
