//! `lb status`, `lb drain`, `lb disable`, `lb enable` and `lb reload`: requests to a running daemon's control
//! API. Each finds the socket through `--api PATH`, else `api` of `--config FILE`, else
//! [`DEFAULT_API`]. Exit 0 when the daemon did it, 1 when it refused or could not be reached
//! (the reason on stderr).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use lb::api::client;
use lb::api::model::{Admin, AnnounceStatus, BackendStatus, StatusReport, SyncStatus, VipStatus};
use lb::config::{Config, DEFAULT_API};

/// Where the daemon's control socket is.
#[derive(Args, Debug)]
pub struct ApiArgs {
    /// The daemon's control socket [default: `api` of --config, else /run/lb/lb.sock].
    #[arg(long, value_name = "PATH", conflicts_with = "config")]
    pub api: Option<PathBuf>,
    /// Take the control socket's path from this config's `api`.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl ApiArgs {
    fn at(socket: PathBuf) -> Self {
        Self {
            api: Some(socket),
            config: None,
        }
    }

    /// `--api`, else `api` of `--config` (its `FILE:LINE:COL` error if it is invalid), else the
    /// default.
    pub fn socket(&self) -> Result<PathBuf, String> {
        match (&self.api, &self.config) {
            (Some(api), _) => Ok(api.clone()),
            (None, Some(config)) => Config::load(config)
                .map(|c| c.api)
                .map_err(|e| e.to_string()),
            (None, None) => Ok(PathBuf::from(DEFAULT_API)),
        }
    }
}

/// `lb drain|disable|enable VIP BACKEND`.
#[derive(Args, Debug)]
pub struct AdminArgs {
    /// The VIP, by name (as in the config).
    #[arg(value_name = "VIP")]
    pub vip: String,
    /// The backend, by address (`10.0.0.11`, `2001:db8::11`).
    #[arg(value_name = "BACKEND")]
    pub backend: String,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `lb status [--json]`: the daemon's report, as a table or (`json`) pretty-printed JSON.
pub fn status(api: &ApiArgs, json: bool) -> ExitCode {
    let printed = with_daemon(api, async |socket| {
        if json {
            let value = client::status_json(&socket)
                .await
                .map_err(|e| e.to_string())?;
            let text = serde_json::to_string_pretty(&value).map_err(|e| e.to_string())?;
            Ok(format!("{text}\n"))
        } else {
            let report = client::status(&socket).await.map_err(|e| e.to_string())?;
            Ok(format_status(&report))
        }
    });
    match printed {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// `lb drain|disable|enable VIP BACKEND`: prints `VIP BACKEND: drained|disabled|enabled`.
pub fn set_admin(args: &AdminArgs, admin: Admin) -> ExitCode {
    // The daemon names backends by their canonical address: `2001:DB8:0::11` is `2001:db8::11`.
    let backend = args
        .backend
        .parse::<std::net::IpAddr>()
        .map_or_else(|_| args.backend.clone(), |a| a.to_string());
    let done = with_daemon(&args.api, async |socket| {
        client::set_admin(&socket, &args.vip, &backend, admin)
            .await
            .map_err(|e| e.to_string())
    });
    match done {
        Ok(()) => {
            let done = match admin {
                Admin::Drained => "drained",
                Admin::Disabled => "disabled",
                Admin::Enabled => "enabled",
            };
            println!("{} {backend}: {done}", args.vip);
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// `lb reload`: the daemon re-reads the config file it was started with and applies the
/// difference. Prints `reloaded FILE: N changes` and one line per change; a refusal (the file's
/// `FILE:LINE:COL` error, or a setting only a restart can change) goes to stderr, exit 1, and
/// the daemon keeps running what it ran.
pub fn reload(api: &ApiArgs) -> ExitCode {
    let kept = "the daemon keeps running its current config";
    let socket = match api.socket() {
        Ok(socket) => socket,
        // `--config` names a file that does not validate: no daemon would take it either.
        Err(e) => {
            return fail(&format!(
                "{e}
reload not sent: {kept}"
            ));
        }
    };
    let answer = with_daemon(&ApiArgs::at(socket), async |socket| {
        client::reload(&socket).await.map_err(|e| match e {
            client::ClientError::Refused { message, .. } => {
                format!(
                    "reload refused: {message}
{kept}"
                )
            }
            other => other.to_string(),
        })
    });
    let report = match answer {
        Ok(report) => report,
        Err(e) => return fail(&e),
    };
    if let Some(asked) = &api.config {
        let same = std::fs::canonicalize(asked).ok() == std::fs::canonicalize(&report.config).ok();
        if !same {
            eprintln!(
                "note: the daemon reloaded {}, the file it was started with, not {}",
                report.config,
                asked.display()
            );
        }
    }
    match report.changes.len() {
        0 => println!("reloaded {}: no changes", report.config),
        1 => println!("reloaded {}: 1 change", report.config),
        n => println!("reloaded {}: {n} changes", report.config),
    }
    for change in &report.changes {
        println!("  {change}");
    }
    ExitCode::SUCCESS
}

/// Finds the socket and runs `f` on it in a one-thread runtime.
fn with_daemon<T>(
    api: &ApiArgs,
    f: impl AsyncFnOnce(PathBuf) -> Result<T, String>,
) -> Result<T, String> {
    let socket = api.socket()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the tokio runtime: {e}"))?;
    runtime.block_on(f(socket))
}

fn fail(message: &str) -> ExitCode {
    eprintln!("{message}");
    ExitCode::FAILURE
}

/// The readable form of `lb status`: per VIP a line
/// `web 10.0.0.100:80/tcp pool=primary announced ring=0123456789abcdef changed_slots=..
/// table_flows=.. packets=.. bytes=.. flows=..` (`changed_slots`: ring slots that use the flow
/// table; `table_flows`: its entries for the VIP; `flows`: new flows counted), then per backend
/// `  10.0.0.11 primary up weight=100 last=ok (0.4ms) packets=.. bytes=.. flows=..`
/// (`weight=0/100` when the weight new flows see is not the configured one, `last=-` before the
/// first check); last, what the node announces
/// (`announce: route_table=200 health_file=/run/lb/health (0)`, then per VIP address
/// `  10.0.0.100 announced: vip web: 2 backends take new flows (pool primary)`).
pub fn format_status(report: &StatusReport) -> String {
    let mut out = String::new();
    if report.vips.is_empty() {
        out.push_str("no VIPs configured\n");
    }
    for vip in &report.vips {
        let _ = writeln!(out, "{}", vip_line(vip));
        for backend in &vip.backends {
            let _ = writeln!(out, "  {}", backend_line(backend));
        }
    }
    out.push_str(&announce_lines(&report.announce));
    if let Some(sync) = &report.sync {
        out.push_str(&sync_lines(sync));
    }
    if let Some(dns) = &report.dns {
        out.push_str(&dns_lines(dns));
    }
    for orphan in &report.orphans {
        let _ = writeln!(out, "warning: {orphan}");
    }
    out
}

fn announce_lines(announce: &AnnounceStatus) -> String {
    let table = announce
        .route_table
        .map_or("none".to_owned(), |t| t.to_string());
    let file = match (&announce.health_file, announce.health_value) {
        (Some(path), Some(value)) => format!("{path} ({value})"),
        (Some(path), None) => format!("{path} (not written)"),
        (None, _) => "none".to_owned(),
    };
    let mut out = format!("announce: route_table={table} health_file={file}\n");
    for address in &announce.addresses {
        let state = if address.announced {
            "announced"
        } else {
            "withdrawn"
        };
        let _ = writeln!(out, "  {} {state}: {}", address.address, address.reason);
    }
    out
}

/// Nonzero counts as `reason=count,...`, or `none`.
fn counts(map: &std::collections::BTreeMap<String, u64>) -> String {
    let nonzero: Vec<String> = map
        .iter()
        .filter(|(_, count)| **count > 0)
        .map(|(reason, count)| format!("{reason}={count}"))
        .collect();
    if nonzero.is_empty() {
        "none".to_owned()
    } else {
        nonzero.join(",")
    }
}

/// `dns: zone=svc.example. listen=10.0.0.2:53 ttl=5s queries=A/NOERROR=10,...`, then per name
/// `  www.svc.example. -> 10.0.0.100, 192.0.2.100` and per address its state and why.
fn dns_lines(dns: &lb::api::model::DnsStatus) -> String {
    let queries: std::collections::BTreeMap<String, u64> = dns
        .queries
        .iter()
        .map(|q| (format!("{}/{}", q.qtype, q.rcode), q.count))
        .collect();
    let mut out = format!(
        "dns: zone={} listen={} ttl={}s queries={} truncated={}\n",
        dns.zone,
        dns.listen.join(","),
        dns.ttl_seconds,
        counts(&queries),
        dns.truncated
    );
    for name in &dns.names {
        let answer = if name.answer.is_empty() {
            "(empty)".to_owned()
        } else {
            name.answer.join(", ")
        };
        let _ = writeln!(out, "  {} -> {answer}", name.name);
        for address in &name.addresses {
            let state = if address.up { "up" } else { "down" };
            let _ = writeln!(out, "    {} {state}: {}", address.address, address.reason);
        }
    }
    out
}

fn sync_lines(sync: &SyncStatus) -> String {
    let pulled = if sync.pulled {
        format!("pulled {} flows at start", sync.pulled_flows)
    } else {
        "pulling".to_owned()
    };
    let mut out = format!(
        "sync: listen={} {pulled} sent={} received={} installed={} skipped={} drops={} events_lost={}\n",
        sync.listen,
        sync.flows_sent,
        sync.flows_received,
        sync.flows_installed,
        counts(&sync.flows_skipped),
        counts(&sync.drops),
        sync.events_lost
    );
    for peer in &sync.peers {
        let state = if peer.up { "up" } else { "down" };
        let heard = peer.last_heard_ms.map_or("never".to_owned(), |ms| {
            format!("{:.1}s ago", ms as f64 / 1000.0)
        });
        let _ = writeln!(
            out,
            "  peer {} {state} last_heard={heard} flows_sent={} flows_received={} queued={} drops={}",
            peer.address,
            peer.flows_sent,
            peer.flows_received,
            peer.queued,
            counts(&peer.drops)
        );
    }
    out
}

fn vip_line(vip: &VipStatus) -> String {
    let host = if vip.address.contains(':') {
        format!("[{}]", vip.address)
    } else {
        vip.address.clone()
    };
    let announced = if vip.announced {
        "announced"
    } else {
        "withdrawn"
    };
    // L2 is the default and says nothing; an encapsulating VIP names its tunnel.
    let forward = match vip.forward.as_str() {
        "" | "l2" => String::new(),
        other => format!(" forward={other}"),
    };
    format!(
        "{} {host}:{}/{}{forward} pool={} {announced} ring={} changed_slots={} table_flows={} packets={} bytes={} flows={}",
        vip.name,
        vip.port,
        vip.protocol,
        vip.active_pool,
        vip.ring_digest,
        vip.ring_slots_changed,
        vip.flow_table_entries,
        vip.packets,
        vip.bytes,
        vip.flows
    )
}

fn backend_line(backend: &BackendStatus) -> String {
    let pool = if backend.standby {
        "standby"
    } else {
        "primary"
    };
    let weight = if backend.weight == backend.configured_weight {
        backend.weight.to_string()
    } else {
        format!("{}/{}", backend.weight, backend.configured_weight)
    };
    let last = match (&backend.last_check, backend.last_check_latency_ms) {
        (Some(result), Some(ms)) => format!("{result} ({ms:.1}ms)"),
        (Some(result), None) => result.clone(),
        (None, _) => "-".to_owned(),
    };
    format!(
        "{} {pool} {} weight={weight} last={last} packets={} bytes={} flows={}",
        backend.address, backend.state, backend.packets, backend.bytes, backend.flows
    )
}

#[cfg(test)]
mod tests {
    use lb::api::model::AddressStatus;

    use super::*;

    fn backend(address: &str, standby: bool, state: &str, weight: u32) -> BackendStatus {
        BackendStatus {
            address: address.into(),
            standby,
            state: state.into(),
            weight,
            configured_weight: 100,
            last_check: Some("ok".into()),
            last_check_latency_ms: Some(0.42),
            packets: 7,
            bytes: 700,
            flows: 2,
        }
    }

    #[test]
    fn the_table() {
        let mut never_checked = backend("2001:db8::11", false, "unknown", 100);
        never_checked.last_check = None;
        never_checked.last_check_latency_ms = None;
        let mut refused = backend("10.0.0.13", true, "down", 100);
        refused.last_check = Some("connection refused".into());
        refused.last_check_latency_ms = None;
        let report = StatusReport {
            orphans: Vec::new(),
            sync: None,
            dns: None,
            announce: AnnounceStatus {
                route_table: Some(200),
                health_file: Some("/run/lb/health".into()),
                health_value: Some(1),
                ready: true,
                addresses: vec![
                    AddressStatus {
                        address: "10.0.0.100".into(),
                        announced: true,
                        reason: "vip web: 2 backends take new flows (pool primary)".into(),
                    },
                    AddressStatus {
                        address: "2001:db8::100".into(),
                        announced: false,
                        reason: "vip v6: no backend takes new flows (1 configured, on_all_down = \"drop\")".into(),
                    },
                ],
            },
            vips: vec![
                VipStatus {
                    name: "web".into(),
                    address: "10.0.0.100".into(),
                    port: 80,
                    protocol: "tcp".into(),
                    forward: "l2".into(),
                    active_pool: "primary".into(),
                    can_serve: true,
                    announced: true,
                    announce_reason: "2 backends take new flows (pool primary)".into(),
                    ring_digest: "00112233445566ff".into(),
                    ring_slots_changed: 12,
                    flow_table_entries: 3,
                    packets: 10,
                    bytes: 1000,
                    flows: 3,
                    backends: vec![
                        backend("10.0.0.11", false, "up", 100),
                        backend("10.0.0.12", false, "draining", 0),
                        refused,
                    ],
                },
                VipStatus {
                    name: "v6".into(),
                    address: "2001:db8::100".into(),
                    port: 53,
                    protocol: "udp".into(),
                    forward: "gue:6080".into(),
                    active_pool: "none".into(),
                    can_serve: false,
                    announced: false,
                    announce_reason: "no backend takes new flows".into(),
                    ring_digest: "89abcdef01234567".into(),
                    ring_slots_changed: 0,
                    flow_table_entries: 0,
                    packets: 0,
                    bytes: 0,
                    flows: 0,
                    backends: vec![never_checked],
                },
            ],
        };
        assert_eq!(
            format_status(&report),
            "web 10.0.0.100:80/tcp pool=primary announced ring=00112233445566ff changed_slots=12 table_flows=3 packets=10 bytes=1000 flows=3\n\
             \x20 10.0.0.11 primary up weight=100 last=ok (0.4ms) packets=7 bytes=700 flows=2\n\
             \x20 10.0.0.12 primary draining weight=0/100 last=ok (0.4ms) packets=7 bytes=700 flows=2\n\
             \x20 10.0.0.13 standby down weight=100 last=connection refused packets=7 bytes=700 flows=2\n\
             v6 [2001:db8::100]:53/udp forward=gue:6080 pool=none withdrawn ring=89abcdef01234567 changed_slots=0 table_flows=0 packets=0 bytes=0 flows=0\n\
             \x20 2001:db8::11 primary unknown weight=100 last=- packets=7 bytes=700 flows=2\n\
             announce: route_table=200 health_file=/run/lb/health (1)\n\
             \x20 10.0.0.100 announced: vip web: 2 backends take new flows (pool primary)\n\
             \x20 2001:db8::100 withdrawn: vip v6: no backend takes new flows (1 configured, on_all_down = \"drop\")\n"
        );
        assert_eq!(
            format_status(&StatusReport {
                announce: AnnounceStatus::default(),
                vips: vec![],
                orphans: Vec::new(),
                sync: None,
                dns: None,
            }),
            "no VIPs configured\nannounce: route_table=none health_file=none\n"
        );
    }

    #[test]
    fn sync_lines_show_each_peer_and_only_the_drops_that_happened() {
        let counts = |pairs: &[(&str, u64)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        let sync = SyncStatus {
            listen: "10.0.0.2:7946".into(),
            pulled: true,
            pulled_flows: 12,
            flows_sent: 40,
            flows_received: 30,
            flows_installed: 28,
            flows_skipped: counts(&[("local_newer", 2), ("unknown_vip", 0)]),
            drops: counts(&[("replayed", 1), ("truncated", 0)]),
            events_lost: 0,
            peers: vec![
                lb::api::model::PeerStatus {
                    address: "10.0.0.3:7946".into(),
                    up: true,
                    last_heard_ms: Some(420),
                    flows_sent: 40,
                    flows_received: 30,
                    drops: counts(&[("replayed", 1)]),
                    ..Default::default()
                },
                lb::api::model::PeerStatus {
                    address: "10.0.0.4:7946".into(),
                    ..Default::default()
                },
            ],
        };
        assert_eq!(
            sync_lines(&sync),
            "sync: listen=10.0.0.2:7946 pulled 12 flows at start sent=40 received=30 installed=28 \
             skipped=local_newer=2 drops=replayed=1 events_lost=0\n\
             \x20 peer 10.0.0.3:7946 up last_heard=0.4s ago flows_sent=40 flows_received=30 queued=0 drops=replayed=1\n\
             \x20 peer 10.0.0.4:7946 down last_heard=never flows_sent=0 flows_received=0 queued=0 drops=none\n"
        );
    }

    #[test]
    fn dns_lines_show_each_name_its_answer_and_why() {
        use lb::api::model::{DnsAddressStatus, DnsNameStatus, DnsQueryCount, DnsStatus};
        let dns = DnsStatus {
            zone: "svc.example.".into(),
            listen: vec!["10.0.0.2:53".into()],
            ttl_seconds: 5,
            names: vec![
                DnsNameStatus {
                    name: "www.svc.example.".into(),
                    answer: vec!["10.0.0.100".into()],
                    on_all_down: "all".into(),
                    addresses: vec![
                        DnsAddressStatus {
                            address: "10.0.0.100".into(),
                            up: true,
                            reason: "vip web: 1 backend takes new flows (pool primary)".into(),
                        },
                        DnsAddressStatus {
                            address: "192.0.2.1".into(),
                            up: false,
                            reason: "tcp check: down (connection refused)".into(),
                        },
                    ],
                },
                DnsNameStatus {
                    name: "none.svc.example.".into(),
                    on_all_down: "none".into(),
                    ..Default::default()
                },
            ],
            queries: vec![DnsQueryCount {
                qtype: "A".into(),
                rcode: "NOERROR".into(),
                count: 7,
            }],
            truncated: 1,
        };
        assert_eq!(
            dns_lines(&dns),
            "dns: zone=svc.example. listen=10.0.0.2:53 ttl=5s queries=A/NOERROR=7 truncated=1\n\
             \x20 www.svc.example. -> 10.0.0.100\n\
             \x20   10.0.0.100 up: vip web: 1 backend takes new flows (pool primary)\n\
             \x20   192.0.2.1 down: tcp check: down (connection refused)\n\
             \x20 none.svc.example. -> (empty)\n"
        );
    }
}
