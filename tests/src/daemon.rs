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

/// A running `lb run`; SIGTERM on drop.
pub struct LbDaemon {
    child: Option<Child>,
    stderr: Arc<Mutex<String>>,
    stdout: Option<std::process::ChildStdout>,
    config_path: PathBuf,
}

impl LbDaemon {
    /// Writes `config` to a temp file, starts `lb run --config` in `namespace` and waits until it
    /// says it is attached.
    pub fn start(namespace: &NetNs, config: &str, launch: Launch) -> Result<Self> {
        let binary = lb_binary();
        if !binary.exists() {
            bail!(
                "{} not found: build it first (`cargo build -p lb-userspace --bins`; `cargo xtask test` does)",
                binary.display()
            );
        }
        let config_path = std::env::temp_dir().join(format!("{}.toml", namespace.name()));
        std::fs::write(&config_path, config)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let mut command = match launch {
            Launch::Nsenter => namespace.nsenter_command(&binary),
            Launch::IpNetnsExec => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", namespace.name()]).arg(&binary);
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
        std::thread::spawn(move || {
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
            config_path,
        };
        daemon.wait_for_log("XDP load balancer attached", Duration::from_secs(20))?;
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

    /// SIGTERM, wait for exit, and return the final counters it printed.
    pub fn stop(mut self) -> Result<FinalCounters> {
        let mut child = self.child.take().context("already stopped")?;
        terminate(&child);
        let status = wait_timeout(&mut child, Duration::from_secs(10))?;
        let mut out = String::new();
        if let Some(mut stdout) = self.stdout.take() {
            stdout
                .read_to_string(&mut out)
                .context("reading lb stdout")?;
        }
        if !status.success() {
            bail!("lb exited with {status}; log:\n{}", self.log());
        }
        FinalCounters::parse(&out)
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }
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
