//! BIRD 2 inside a namespace, as a drop guard, and what the tests ask it over `birdc`.
//!
//! Each [`Bird`] has its own directory (config, control socket, pid file, log), so several run
//! side by side, one per namespace (DESIGN §7): `bird -c FILE -s SOCK -P PID -f`, started with
//! [`NetNs::spawn`] (network namespace only, like `nsenter --net`). Its output goes to a log file
//! in that directory ([`Bird::log`]). Dropping the guard kills BIRD (SIGKILL, as a crash would:
//! nothing it installed in the kernel is cleaned up, the namespace goes anyway) and removes the
//! directory; [`Bird::kill`] does the same on purpose, for "the node dies" tests.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::links::wait_until;
use crate::netns::{NetNs, run_checked};

/// How long [`Bird::start`] waits for the control socket to answer.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// One BGP (or other) protocol line of `birdc show protocols`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProtocolState {
    pub name: String,
    pub protocol: String,
    /// `up`, `down`, `start`, ...
    pub state: String,
    /// The Info column: `Established`, `Active`, `Connect`, `Passive`... (empty for most
    /// non-BGP protocols).
    pub info: String,
}

impl ProtocolState {
    /// A BGP session that exchanges routes.
    pub fn established(&self) -> bool {
        self.state == "up" && self.info.starts_with("Established")
    }
}

/// A running BIRD (see the module documentation).
#[derive(Debug)]
pub struct Bird {
    child: Option<Child>,
    namespace: String,
    dir: PathBuf,
}

impl Bird {
    /// Checks `config` with `bird -p`, then starts BIRD in `namespace` and waits until its control
    /// socket answers. `name` tells this BIRD apart from others in the same namespace (the
    /// directory is `$TMPDIR/lb-bird-<namespace>-<name>`).
    pub fn start(namespace: &NetNs, name: &str, config: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("lb-bird-{}-{name}", namespace.name()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("removing the old {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let config_path = dir.join("bird.conf");
        std::fs::write(&config_path, config)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let mut bird = Self {
            child: None,
            namespace: namespace.name().to_owned(),
            dir,
        };
        // A syntax error should say so, not "the socket never appeared".
        run_checked(Command::new("bird").arg("-p").arg("-c").arg(&config_path))
            .with_context(|| format!("BIRD rejects its config:\n{config}"))?;
        let log = std::fs::File::create(bird.log_path()).context("creating BIRD's log")?;
        let mut command = Command::new("bird");
        command
            .arg("-c")
            .arg(&config_path)
            .arg("-s")
            .arg(bird.socket())
            .arg("-P")
            .arg(bird.dir.join("bird.pid"))
            .arg("-f")
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("BIRD's log")?)
            .stderr(log);
        bird.child = Some(namespace.spawn(&mut command)?);
        wait_until(
            &format!("BIRD in {} to answer on its socket", bird.namespace),
            START_TIMEOUT,
            || {
                if let Some(status) = bird
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    bail!("BIRD exited with {status}; its log:\n{}", bird.log());
                }
                Ok(bird
                    .birdc(["show", "status"])
                    .is_ok_and(|out| out.contains("Daemon is up")))
            },
        )?;
        Ok(bird)
    }

    /// The control socket (`birdc -s` takes it).
    pub fn socket(&self) -> PathBuf {
        self.dir.join("bird.ctl")
    }

    /// The config file it runs with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("bird.conf")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("bird.log")
    }

    /// Everything BIRD logged so far (with `log stderr all;` in the config).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `birdc -s SOCK args...`; its output without the `BIRD x.y.z ready.` banner. An error when
    /// birdc fails or BIRD answers with an error (lines starting with a code `8xxx`/`9xxx`).
    pub fn birdc<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut command = Command::new("birdc");
        command.arg("-s").arg(self.socket()).args(args);
        let output = run_checked(&mut command)?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let body: Vec<&str> = text
            .lines()
            .filter(|line| !(line.starts_with("BIRD ") && line.ends_with(" ready.")))
            .collect();
        let body = body.join("\n");
        if body.contains("syntax error") || body.starts_with("Unable to connect") {
            bail!("birdc {}: {body}", describe_args(&command));
        }
        Ok(body)
    }

    /// `show protocols`, parsed.
    pub fn protocols(&self) -> Result<Vec<ProtocolState>> {
        let text = self.birdc(["show", "protocols"])?;
        Ok(parse_protocols(&text))
    }

    /// The state of protocol `name`.
    pub fn protocol(&self, name: &str) -> Result<ProtocolState> {
        self.protocols()?
            .into_iter()
            .find(|p| p.name == name)
            .with_context(|| format!("BIRD in {} has no protocol {name}", self.namespace))
    }

    /// Waits until every protocol in `names` is an established BGP session.
    pub fn wait_established(&self, names: &[&str], timeout: Duration) -> Result<()> {
        wait_until(
            &format!(
                "BGP sessions {names:?} in {} to be Established",
                self.namespace
            ),
            timeout,
            || {
                let protocols = self.protocols()?;
                Ok(names
                    .iter()
                    .all(|name| protocols.iter().any(|p| p.name == *name && p.established())))
            },
        )
        .with_context(|| {
            format!(
                "protocols now: {:?}; BIRD's log:\n{}",
                self.protocols(),
                self.log()
            )
        })
    }

    /// `show route [table TABLE] [for ADDRESS] all` as text (for failure messages and prints).
    pub fn show_route(&self, table: Option<&str>, address: Option<IpAddr>) -> Result<String> {
        let mut args = vec!["show".to_owned(), "route".to_owned()];
        if let Some(table) = table {
            args.extend(["table".to_owned(), table.to_owned()]);
        }
        if let Some(address) = address {
            args.extend(["for".to_owned(), address.to_string()]);
        }
        args.push("all".to_owned());
        self.birdc(&args)
    }

    /// The prefixes (`10.100.0.100/32`) in BIRD's table `table` (e.g. `master4`).
    pub fn prefixes(&self, table: &str) -> Result<Vec<String>> {
        let text = self.birdc(["show", "route", "table", table])?;
        Ok(parse_prefixes(&text))
    }

    /// SIGKILL and reap: the node's routing daemon dies with no goodbye (no BGP NOTIFICATION is
    /// sent; the TCP socket closes with the process).
    pub fn kill(mut self) -> Result<()> {
        self.kill_now()
    }

    fn kill_now(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("SIGKILL bird")?;
            child.wait().context("reaping bird")?;
        }
        Ok(())
    }

    /// The directory holding its config, socket, pid file and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        if let Err(error) = self.kill_now() {
            eprintln!("warning: stopping BIRD in {}: {error:#}", self.namespace);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn describe_args(command: &Command) -> String {
    command
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Parses `birdc show protocols`: `Name Proto Table State Since Info`, where Since is one or two
/// words (a time, or a date and a time) and Info may be empty.
fn parse_protocols(text: &str) -> Vec<ProtocolState> {
    text.lines()
        .filter(|line| !line.starts_with("Name ") && !line.trim().is_empty())
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let [name, protocol, _table, state, rest @ ..] = words.as_slice() else {
                return None;
            };
            // Since: `HH:MM:SS.mmm` or `YYYY-MM-DD HH:MM:SS`; the rest is Info.
            let mut rest = rest.iter().peekable();
            while rest
                .peek()
                .is_some_and(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))
            {
                rest.next();
            }
            Some(ProtocolState {
                name: (*name).to_owned(),
                protocol: (*protocol).to_owned(),
                state: (*state).to_owned(),
                info: rest.copied().collect::<Vec<_>>().join(" "),
            })
        })
        .collect()
}

/// The prefixes at the start of `show route` lines (`10.100.0.100/32  unicast [...]`).
fn parse_prefixes(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|word| word.contains('/') && word.parse::<IpAddrPrefix>().is_ok())
        .map(str::to_owned)
        .collect()
}

/// Just enough to tell a prefix from other words.
struct IpAddrPrefix;

impl std::str::FromStr for IpAddrPrefix {
    type Err = ();
    fn from_str(text: &str) -> Result<Self, ()> {
        let (address, length) = text.split_once('/').ok_or(())?;
        address.parse::<IpAddr>().map_err(|_| ())?;
        length.parse::<u8>().map_err(|_| ())?;
        Ok(Self)
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn protocols_are_parsed_with_and_without_info() {
        let text = "Name       Proto      Table      State  Since         Info\n\
                    device1    Device     ---        up     22:55:03.483  \n\
                    kernel1    Kernel     master4    up     22:55:03.483  \n\
                    n1         BGP        ---        up     22:55:04.367  Established   \n\
                    n2         BGP        ---        start  2026-12-01 22:55:04  Active        Socket: Connection refused\n";
        let protocols = parse_protocols(text);
        assert_eq!(protocols.len(), 4, "{protocols:?}");
        assert_eq!(protocols[0].info, "");
        assert!(protocols[2].established());
        assert_eq!(protocols[3].state, "start");
        assert_eq!(protocols[3].info, "Active Socket: Connection refused");
        assert!(!protocols[3].established());
    }

    #[test]
    fn prefixes_are_the_first_words_of_route_lines() {
        let text = "Table master4:\n10.100.0.100/32      unicast [n1 22:55:08.380] * (100) [AS65001i]\n\
                    \tvia 10.100.0.2 on eth0\n                     unicast [n2 22:55:08.385] (100) [AS65001i]\n\
                    \tvia 10.100.0.3 on eth0\n";
        assert_eq!(parse_prefixes(text), ["10.100.0.100/32"]);
    }
}
