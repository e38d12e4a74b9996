//! The DNS lab: a [`WebLab`] (VIP `web` over backend 0, identity servers on port 80 of both
//! backends) whose daemon also runs `[dns]` on the LB host's address, queried from the client
//! namespace with `dig` (Debian's bind9-dnsutils).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{netns::NetNs, web_lab::WebLab};

/// The zone every lab config serves.
pub const ZONE: &str = "svc.example.";
/// Fast checks: an address is down within interval x fall + timeout (300 ms) plus the loop.
pub const HEALTH: &str = "interval = \"100ms\"\ntimeout = \"100ms\"\nfall = 2\nrise = 2";
/// The same as an inline table, for `[[dns.name]]`.
pub const DNS_HEALTH: &str =
    "{ check = \"tcp\", port = 80, interval = \"100ms\", timeout = \"100ms\", fall = 2, rise = 2 }";

pub struct DnsLab {
    pub lab: WebLab,
}

/// One `dig` answer: its status and the addresses of its answer section, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigAnswer {
    pub status: String,
    pub flags: Vec<String>,
    pub answers: Vec<String>,
    pub authority: Vec<String>,
}

impl DnsLab {
    /// Two backends, namespaces named after `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self {
            lab: WebLab::new(prefix, 2),
        }
    }

    /// The LB host's IPv4 address, where `[dns]` listens.
    pub fn server(&self) -> IpAddr {
        IpAddr::V4(self.lab.topo.lb_host().ipv4())
    }

    pub fn vip(&self) -> String {
        self.lab.topo.vip_v4().to_string()
    }

    /// Backend `i`'s address (a plain, non-VIP address for DNS).
    pub fn backend(&self, i: usize) -> String {
        self.lab.address(i)
    }

    /// The VIP `web` over backend 0 only, `[dns]` on `listen` with `names` (the
    /// `[[dns.name]]` tables, written out).
    pub fn config(&self, listen: &[String], names: &str) -> String {
        let base = self.lab.config("", HEALTH, &[(self.backend(0), 100)]);
        let listen: Vec<String> = listen.iter().map(|l| format!("\"{l}\"")).collect();
        format!(
            "{base}\n[dns]\nlisten = [{}]\nzone = \"{ZONE}\"\nttl = \"5s\"\n{names}",
            listen.join(", ")
        )
    }

    pub fn client(&self) -> &NetNs {
        self.lab.topo.client()
    }

    /// `dig @server -p port NAME TYPE` from the client, one try; `extra` are more dig options.
    pub fn dig(&self, port: u16, name: &str, qtype: &str, extra: &[&str]) -> Result<DigAnswer> {
        dig_in(self.client(), self.server(), port, name, qtype, extra)
    }

    /// Waits until `name`'s A answer is exactly `wanted` (as a set); returns how long it took.
    pub fn wait_for_answer(
        &self,
        name: &str,
        wanted: &[String],
        timeout: Duration,
    ) -> Result<Duration> {
        let start = Instant::now();
        let wanted: BTreeSet<String> = wanted.iter().cloned().collect();
        loop {
            let answer = self.dig(53, name, "A", &[])?;
            let got: BTreeSet<String> = answer.answers.iter().cloned().collect();
            if answer.status == "NOERROR" && got == wanted {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!("{name} answers {answer:?} after {timeout:?}, expected {wanted:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `dig` in `ns`: `+tries=1 +time=2`, so a lost answer shows as an error rather than a retry.
pub fn dig_in(
    ns: &NetNs,
    server: IpAddr,
    port: u16,
    name: &str,
    qtype: &str,
    extra: &[&str],
) -> Result<DigAnswer> {
    let output = Command::new("ip")
        .args(["netns", "exec", ns.name(), "dig"])
        .arg(format!("@{server}"))
        .args(["-p", &port.to_string(), "+tries=1", "+time=2"])
        .args(extra)
        .args([name, qtype])
        .output()
        .context("running dig (install bind9-dnsutils: cargo xtask setup)")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    parse_dig(&text).with_context(|| format!("dig {name} {qtype} {extra:?}:\n{text}"))
}

/// Reads dig's default output: the `status:` and `flags:` of the header line and the records of
/// the ANSWER and AUTHORITY sections (an answer's last field: the address).
pub fn parse_dig(text: &str) -> Result<DigAnswer> {
    let status = text
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .and_then(|rest| rest.split(',').next())
        .context("no status line (no answer?)")?
        .to_owned();
    let flags = text
        .lines()
        .find_map(|l| l.strip_prefix(";; flags: "))
        .and_then(|rest| rest.split(';').next())
        .map(|f| f.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    let mut answers = Vec::new();
    let mut authority = Vec::new();
    let mut section = "";
    for line in text.lines() {
        if let Some(header) = line.strip_prefix(";; ") {
            section = header.split(' ').next().unwrap_or("");
            continue;
        }
        if line.trim().is_empty() || line.starts_with(';') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        match section {
            "ANSWER" => {
                if let Some(last) = fields.last() {
                    answers.push((*last).to_owned());
                }
            }
            "AUTHORITY" => authority.push(fields.get(3).copied().unwrap_or("").to_owned()),
            _ => {}
        }
    }
    Ok(DigAnswer {
        status,
        flags,
        answers,
        authority,
    })
}
