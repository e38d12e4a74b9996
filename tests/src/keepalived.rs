//! keepalived (VRRP) inside a namespace, for the active/standby tests: a config for one VRRP
//! instance, a guard that runs the daemon with its own config and pid files and stops it on drop,
//! and its state as it logs it.
//!
//! keepalived runs as `keepalived -f FILE -p PID -r VRRP_PID -c CHECK_PID -n -l -D -G -P`: in the
//! foreground (`-n`), logging to stderr (`-l`, `-D`) and not to syslog (`-G`), VRRP only (`-P`),
//! with pid files of its own so that several instances run side by side (DESIGN §7). It is a
//! parent and a VRRP child process; the guard starts it in a process group of its own, so that
//! killing it ([`Keepalived::kill`], or the drop after a stop that timed out) reaches both.
//!
//! What was checked by hand with Debian bookworm's keepalived 2.2.7 (and what the tests rely on):
//! - `vrrp_version 3` takes a sub-second `advert_int` (0.1 s); a backup takes over after
//!   `3 × advert_int + (256 − priority) × advert_int / 256` without adverts, at once when the
//!   master sends priority 0 (it does when it goes FAULT or stops).
//! - `track_file NAME { file PATH }` at the top level (the older `vrrp_track_file` still parses,
//!   with a deprecation warning) and `track_file { NAME weight 0 }` in the instance: a non-zero
//!   number in the file puts the instance in FAULT (it drops the address and sends priority 0),
//!   zero brings it back. The file is watched with inotify: a write in place and a rename over it
//!   (what `lb` does) are both seen within milliseconds.
//! - A missing, empty or unparsable file counts as 0, that is healthy. `init_file VALUE` makes
//!   keepalived create a missing file with `VALUE` at start-up (without `overwrite` it leaves an
//!   existing file alone): with `init_file 1` a node whose `lb` never wrote the file stays FAULT.
//! - An interface going down puts the instance in FAULT too; when it comes back, the instance
//!   goes BACKUP (or stays FAULT while a tracked file is non-zero) and, with `preempt` (the
//!   default) and the higher priority, MASTER again once it has missed the master's adverts for
//!   its own master-down interval.
//! - It logs `(NAME) Entering MASTER STATE`, `(NAME) Entering BACKUP STATE` (first with
//!   ` (init)`), `(NAME) Entering FAULT STATE`, and `(NAME) entering FAULT state` when it starts
//!   in FAULT (a tracked file non-zero already); the log's own timestamps are whole seconds, so
//!   the guard stamps every line when it reads it.
//! - A SIGKILLed parent leaves its VRRP child running for a while (it notices later and stops);
//!   SIGTERM stops both, the child releasing the address, in about one to two seconds.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};

use crate::links::MacAddress;
use crate::netns::{NetNs, run_checked};

/// The keepalived binary (Debian's package installs it in /usr/sbin).
pub const KEEPALIVED: &str = "keepalived";

/// How long [`Keepalived::start`] waits for the instance's first state.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a SIGTERM gets before the whole process group is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A VRRP instance's state, as keepalived logs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VrrpState {
    Backup,
    Master,
    Fault,
}

impl VrrpState {
    fn parse(word: &str) -> Option<Self> {
        match word {
            "BACKUP" => Some(Self::Backup),
            "MASTER" => Some(Self::Master),
            "FAULT" => Some(Self::Fault),
            _ => None,
        }
    }
}

/// `unicast_src_ip` and `unicast_peer`: VRRP adverts sent to the peers instead of multicast.
#[derive(Clone, Debug)]
pub struct Unicast {
    pub source: Ipv4Addr,
    pub peers: Vec<Ipv4Addr>,
}

/// One VRRP instance (and the global settings it needs), rendered by [`VrrpInstance::config`].
#[derive(Clone, Debug)]
pub struct VrrpInstance {
    /// The instance's name, as it appears in the log: `(NAME) Entering ...`.
    pub name: String,
    /// `router_id` in `global_defs` (names the node in keepalived's own messages).
    pub router_id: String,
    /// The interface the adverts go out of and the address goes on.
    pub interface: String,
    /// `virtual_router_id`: the same on every node of the group.
    pub virtual_router_id: u8,
    /// 1..=254; the highest priority with a clean bill of health is master.
    pub priority: u8,
    /// `advert_int`; VRRP version 3 takes hundredths of a second.
    pub advert_interval: Duration,
    /// The address the instance owns (added as a /32 on [`VrrpInstance::interface`]).
    pub address: Ipv4Addr,
    /// `track_file` with `weight 0`: a non-zero number in this file means FAULT. `None`: no
    /// tracking (the master keeps the address whatever its load balancer can do).
    pub track_file: Option<PathBuf>,
    /// `init_file VALUE` for the tracked file (created with this value if missing at start-up).
    pub init_file: Option<u32>,
    /// Adverts to these peers instead of multicast.
    pub unicast: Option<Unicast>,
    /// `preempt` (keepalived's default) or `nopreempt`.
    pub preempt: bool,
    /// `preempt_delay`: how long a node that became backup (at start-up or out of FAULT) waits
    /// before it preempts a master of lower priority.
    pub preempt_delay: Option<Duration>,
}

impl VrrpInstance {
    /// The name the tracked file has in the config.
    pub const TRACK_NAME: &'static str = "lb_health";

    /// The keepalived config for this instance (every node starts as BACKUP and the priorities
    /// elect the master).
    pub fn config(&self) -> String {
        let mut config = String::new();
        let _ = write!(
            config,
            "global_defs {{\n    router_id {}\n    vrrp_version 3\n}}\n\n",
            self.router_id
        );
        if let Some(file) = &self.track_file {
            let _ = writeln!(config, "track_file {} {{", Self::TRACK_NAME);
            let _ = writeln!(config, "    file \"{}\"", file.display());
            if let Some(value) = self.init_file {
                let _ = writeln!(config, "    init_file {value}");
            }
            config.push_str("}\n\n");
        }
        let _ = writeln!(config, "vrrp_instance {} {{", self.name);
        let _ = writeln!(config, "    state BACKUP");
        let _ = writeln!(config, "    interface {}", self.interface);
        let _ = writeln!(config, "    virtual_router_id {}", self.virtual_router_id);
        let _ = writeln!(config, "    priority {}", self.priority);
        let _ = writeln!(
            config,
            "    advert_int {:.2}",
            self.advert_interval.as_secs_f64()
        );
        if !self.preempt {
            config.push_str("    nopreempt\n");
        }
        if let Some(delay) = self.preempt_delay {
            let _ = writeln!(config, "    preempt_delay {:.2}", delay.as_secs_f64());
        }
        if self.track_file.is_some() {
            let _ = writeln!(
                config,
                "    track_file {{\n        {} weight 0\n    }}",
                Self::TRACK_NAME
            );
        }
        if let Some(unicast) = &self.unicast {
            let _ = writeln!(config, "    unicast_src_ip {}", unicast.source);
            config.push_str("    unicast_peer {\n");
            for peer in &unicast.peers {
                let _ = writeln!(config, "        {peer}");
            }
            config.push_str("    }\n");
        }
        let _ = writeln!(
            config,
            "    virtual_ipaddress {{\n        {}/32 dev {}\n    }}\n}}",
            self.address, self.interface
        );
        config
    }
}

/// One line keepalived logged, stamped when the guard read it.
#[derive(Clone, Debug)]
pub struct LogLine {
    pub at: Instant,
    pub wall: SystemTime,
    pub text: String,
}

/// A state the instance entered, with the time the line was read.
#[derive(Clone, Debug)]
pub struct StateChange {
    pub at: Instant,
    pub wall: SystemTime,
    pub state: VrrpState,
}

/// A running keepalived (see the module documentation). Dropping it stops it (SIGTERM, then
/// SIGKILL to its process group) and removes its config and pid files.
pub struct Keepalived {
    namespace: String,
    instance: String,
    child: Option<Child>,
    dir: PathBuf,
    log: Arc<Mutex<Vec<LogLine>>>,
    reader: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Keepalived {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Keepalived")
            .field("namespace", &self.namespace)
            .field("instance", &self.instance)
            .field("pid", &self.child.as_ref().map(Child::id))
            .finish()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Keepalived {
    /// Checks `config` with `keepalived -t`, starts keepalived with it in `namespace` and waits
    /// until the VRRP instance `instance` has logged its first state.
    pub fn start(namespace: &NetNs, instance: &str, config: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("keepalived-{}", namespace.name()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let config_path = dir.join("keepalived.conf");
        std::fs::write(&config_path, config)
            .with_context(|| format!("writing {}", config_path.display()))?;
        check_config(&config_path)?;
        let mut command = Command::new(KEEPALIVED);
        command
            .arg("-f")
            .arg(&config_path)
            .arg("-p")
            .arg(dir.join("keepalived.pid"))
            .arg("-r")
            .arg(dir.join("vrrp.pid"))
            .arg("-c")
            .arg(dir.join("checkers.pid"))
            .args(["-n", "-l", "-D", "-G", "-P"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own group: one signal reaches the parent and its VRRP child.
            .process_group(0);
        let mut child = namespace.spawn(&mut command)?;
        let stderr = child.stderr.take().context("keepalived's stderr pipe")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        let label = namespace.name().to_owned();
        let reader = std::thread::Builder::new()
            .name(format!("keepalived-{label}"))
            .spawn(move || {
                for text in BufReader::new(stderr).lines().map_while(Result::ok) {
                    // Five of these follow every MASTER transition: not worth echoing.
                    if !text.contains("Sending gratuitous ARP on") {
                        eprintln!("[keepalived {label}] {text}");
                    }
                    lock(&sink).push(LogLine {
                        at: Instant::now(),
                        wall: SystemTime::now(),
                        text,
                    });
                }
            })
            .context("cannot start the keepalived log reader")?;
        let keepalived = Self {
            namespace: namespace.name().to_owned(),
            instance: instance.to_owned(),
            child: Some(child),
            dir,
            log,
            reader: Some(reader),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while keepalived.state().is_none() {
            if !keepalived.is_running() {
                bail!(
                    "keepalived in {} exited before instance {instance} had a state; its log:\n{}",
                    keepalived.namespace,
                    keepalived.log_text()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "keepalived in {}: instance {instance} logged no state within {START_TIMEOUT:?}; \
                     its log:\n{}",
                    keepalived.namespace,
                    keepalived.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(keepalived)
    }

    /// The namespace it runs in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Every line logged so far.
    pub fn log(&self) -> Vec<LogLine> {
        lock(&self.log).clone()
    }

    /// The log as text.
    pub fn log_text(&self) -> String {
        lock(&self.log)
            .iter()
            .map(|line| format!("{}\n", line.text))
            .collect()
    }

    /// The last `lines` lines of the log, without the per-packet gratuitous ARP lines.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = lock(&self.log);
        let kept: Vec<&str> = log
            .iter()
            .map(|line| line.text.as_str())
            .filter(|text| !text.contains("Sending gratuitous ARP on"))
            .collect();
        kept[kept.len().saturating_sub(lines)..].join("\n")
    }

    /// Every state the instance entered, in order.
    pub fn state_changes(&self) -> Vec<StateChange> {
        lock(&self.log)
            .iter()
            .filter_map(|line| {
                Some(StateChange {
                    at: line.at,
                    wall: line.wall,
                    state: parse_state_line(&self.instance, &line.text)?,
                })
            })
            .collect()
    }

    /// The state the instance entered last (`None` before the first).
    pub fn state(&self) -> Option<VrrpState> {
        self.state_changes().last().map(|change| change.state)
    }

    /// Waits until the instance enters `state` after its first `skip` state changes (pass
    /// `state_changes().len()` taken before the event); fails early if keepalived exits.
    pub fn wait_for_state(
        &self,
        state: VrrpState,
        skip: usize,
        timeout: Duration,
    ) -> Result<StateChange> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(change) = self
                .state_changes()
                .into_iter()
                .skip(skip)
                .find(|change| change.state == state)
            {
                return Ok(change);
            }
            if !self.is_running() {
                bail!(
                    "keepalived in {} exited while waiting for {state:?}; its log:\n{}",
                    self.namespace,
                    self.log_tail(40)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "keepalived in {}: instance {} did not enter {state:?} within {timeout:?} \
                     (after {skip} state changes); last lines:\n{}",
                    self.namespace,
                    self.instance,
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether the parent process still runs.
    pub fn is_running(&self) -> bool {
        self.child.as_ref().is_some_and(|child| !has_exited(child))
    }

    /// SIGTERM (keepalived releases the address and sends priority 0), wait for it to exit, and
    /// kill whatever of its process group is left.
    pub fn stop(mut self) -> Result<()> {
        self.shut_down(libc::SIGTERM)
    }

    /// SIGKILL to the whole process group, as a crash of the node's keepalived would be: the
    /// address stays where it is (nobody removes it) and no priority-0 advert goes out.
    pub fn kill(mut self) -> Result<()> {
        self.shut_down(libc::SIGKILL)
    }

    fn shut_down(&mut self, signal: libc::c_int) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = libc::pid_t::try_from(child.id()).context("keepalived's pid")?;
        let mut outcome = Ok(());
        if signal == libc::SIGKILL {
            kill_group(pid);
        } else {
            // SAFETY: a signal to our own, not yet reaped, child; no memory is involved.
            unsafe {
                libc::kill(pid, signal);
            }
            let deadline = Instant::now() + STOP_TIMEOUT;
            while !has_exited(&child) {
                if Instant::now() > deadline {
                    outcome = Err(anyhow!(
                        "keepalived in {} did not exit within {STOP_TIMEOUT:?} of SIGTERM",
                        self.namespace
                    ));
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // The parent is a zombie at most (not reaped yet), so its pid, which is the group's
            // id, cannot have been reused: anything left of the group is keepalived's.
            kill_group(pid);
        }
        child
            .wait()
            .with_context(|| format!("reaping keepalived in {}", self.namespace))?;
        if let Some(reader) = self.reader.take() {
            // The pipe closes once every process of the group has gone.
            let _ = reader.join();
        }
        outcome
    }
}

impl Drop for Keepalived {
    fn drop(&mut self) {
        if let Err(error) = self.shut_down(libc::SIGTERM) {
            eprintln!("warning: {error:#}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The state a log line says instance `instance` entered: `(lb) Entering MASTER STATE`, and at
/// start-up `(lb) entering FAULT state`.
fn parse_state_line(instance: &str, text: &str) -> Option<VrrpState> {
    let marker = format!("({instance}) entering ").to_ascii_lowercase();
    let at = text.to_ascii_lowercase().find(&marker)? + marker.len();
    let (word, rest) = text.get(at..)?.split_once(' ')?;
    if !rest.to_ascii_lowercase().starts_with("state") {
        return None;
    }
    VrrpState::parse(word)
}

/// `keepalived -t -f FILE`: an error with keepalived's complaints if the config is not valid.
pub fn check_config(path: &Path) -> Result<()> {
    let mut command = Command::new(KEEPALIVED);
    command.arg("-t").arg("-f").arg(path);
    run_checked(&mut command).with_context(|| {
        format!(
            "keepalived rejects {} (is keepalived installed? `cargo xtask setup` installs it)",
            path.display()
        )
    })?;
    Ok(())
}

/// Whether `child` has exited, without reaping it (`waitid` with `WNOWAIT`).
fn has_exited(child: &Child) -> bool {
    let pid: libc::id_t = child.id();
    // SAFETY: a zeroed siginfo_t is a valid output buffer for waitid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on our own child with a valid output buffer; WNOWAIT leaves it unreaped.
    let result = unsafe {
        libc::waitid(
            libc::P_PID,
            pid,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // SAFETY: waitid filled `info` (or left it zeroed: si_pid 0 means "not exited yet").
    result != 0 || unsafe { info.si_pid() } != 0
}

/// SIGKILL to process group `group` (ESRCH, nothing left, is fine).
fn kill_group(group: libc::pid_t) {
    // SAFETY: killpg takes a group id and a signal; no memory is involved.
    unsafe {
        libc::killpg(group, libc::SIGKILL);
    }
}

/// Whether `address` is configured on any interface of `namespace`.
pub fn holds_address(namespace: &NetNs, address: IpAddr) -> Result<bool> {
    let output = namespace.ip(["-o", "addr", "show"])?;
    let needle = format!(" {address}/");
    Ok(String::from_utf8_lossy(&output.stdout).contains(&needle))
}

/// The MAC `namespace`'s neighbour table has for `address` (`None` when it has no usable entry:
/// none, `FAILED` or `INCOMPLETE`).
pub fn neighbour_mac(namespace: &NetNs, address: IpAddr) -> Result<Option<MacAddress>> {
    let output = namespace.ip(["neigh", "show", &address.to_string()])?;
    let text = String::from_utf8_lossy(&output.stdout);
    let Some(line) = text.lines().next() else {
        return Ok(None);
    };
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.iter().position(|&word| word == "lladdr") {
        Some(at) => {
            let mac = words
                .get(at + 1)
                .with_context(|| format!("no MAC after lladdr in {line:?}"))?;
            Ok(Some(mac.parse()?))
        }
        None => Ok(None),
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    fn instance() -> VrrpInstance {
        VrrpInstance {
            name: "lb".into(),
            router_id: "node-a".into(),
            interface: "eth0".into(),
            virtual_router_id: 50,
            priority: 200,
            advert_interval: Duration::from_millis(100),
            address: Ipv4Addr::new(10, 100, 0, 50),
            track_file: Some(PathBuf::from("/run/lb/health")),
            init_file: Some(1),
            unicast: None,
            preempt: true,
            preempt_delay: None,
        }
    }

    #[test]
    fn the_config_tracks_the_file_with_weight_zero() {
        let config = instance().config();
        assert_eq!(
            config,
            "global_defs {\n    router_id node-a\n    vrrp_version 3\n}\n\n\
             track_file lb_health {\n    file \"/run/lb/health\"\n    init_file 1\n}\n\n\
             vrrp_instance lb {\n    state BACKUP\n    interface eth0\n    virtual_router_id 50\n    \
             priority 200\n    advert_int 0.10\n    track_file {\n        lb_health weight 0\n    }\n    \
             virtual_ipaddress {\n        10.100.0.50/32 dev eth0\n    }\n}\n"
        );
    }

    #[test]
    fn state_lines_are_recognised() {
        let parse = |text| parse_state_line("lb", text);
        assert_eq!(
            parse("Tue Dec  1 22:54:28 2026: (lb) Entering BACKUP STATE (init)"),
            Some(VrrpState::Backup)
        );
        assert_eq!(
            parse("Tue Dec  1 22:54:28 2026: (lb) Entering MASTER STATE"),
            Some(VrrpState::Master)
        );
        assert_eq!(
            parse("Tue Dec  1 23:20:37 2026: (lb) entering FAULT state"),
            Some(VrrpState::Fault)
        );
        assert_eq!(
            parse(
                "Tue Dec  1 23:20:37 2026: (lb): entering FAULT state (tracked file lb_health has status -254)"
            ),
            None
        );
        assert_eq!(parse("(other) Entering MASTER STATE"), None);
        assert_eq!(parse("(lb) setting VIPs."), None);
    }

    #[test]
    fn unicast_and_nopreempt_are_rendered() {
        let config = VrrpInstance {
            track_file: None,
            unicast: Some(Unicast {
                source: Ipv4Addr::new(10, 100, 0, 2),
                peers: vec![Ipv4Addr::new(10, 100, 0, 3)],
            }),
            preempt: false,
            preempt_delay: Some(Duration::from_millis(500)),
            ..instance()
        }
        .config();
        assert!(!config.contains("track_file"), "{config}");
        assert!(
            config.contains("    nopreempt\n    preempt_delay 0.50\n"),
            "{config}"
        );
        assert!(
            config.contains(
                "    unicast_src_ip 10.100.0.2\n    unicast_peer {\n        10.100.0.3\n    }\n"
            ),
            "{config}"
        );
    }
}
