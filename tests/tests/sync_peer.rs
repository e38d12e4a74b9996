//! `[sync]` against a peer played by the test (issue 12): a running `lb` pulls the peer's flows
//! at start-up before it attaches, installs what the peer sends (connections from those client
//! ports reach the backend the peer named, not the one the ring gives), sends the flows it
//! records itself, authenticated, and drops and counts every bad datagram (garbage, truncated,
//! wrong key, replayed, stale, unknown sender) without stopping.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use lb::sync::key::SyncKey;
use lb::sync::wire::{Body, FlowRecord, Message, Opener, Sealer, now_unix_ms};
use lb_tests::{
    daemon::{Launch, LbDaemon, api_socket_for, lb_status},
    prometheus::sample,
    servers::TcpLineClient,
    topology::leftovers,
    web_lab::WebLab,
};

const SYNC_PORT: u16 = 7946;
/// The daemon's metrics endpoint, inside its namespace.
const METRICS: &str = "127.0.0.1:19103";
const TIMEOUT: Duration = Duration::from_secs(3);
const HEALTH: &str = "interval = \"100ms\"\ntimeout = \"100ms\"\nrise = 1";
const KEY_HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const OTHER_KEY_HEX: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";
/// Client ports whose flows the peer hands over (all on backend 0), and ports it does not.
const PULLED_PORTS: [u16; 4] = [41001, 41002, 41003, 41004];
/// More flows in the pulled copy, from clients that never connect (a copy of a hundred
/// datagrams, installed before the program is attached).
const FILLER: usize = 6000;
/// Every flow the peer's full copy holds.
const PULLED: usize = PULLED_PORTS.len() + FILLER;
const SENT_PORTS: [u16; 8] = [42001, 42002, 42003, 42004, 42005, 42006, 42007, 42008];
const CONTROL_PORTS: [u16; 12] = [
    43001, 43002, 43003, 43004, 43005, 43006, 43007, 43008, 43009, 43010, 43011, 43012,
];

/// The key file, removed on drop.
struct KeyFile(PathBuf);

impl KeyFile {
    fn write(name: &str, hex: &str) -> Self {
        let path = std::env::temp_dir().join(format!("lb-sync-{name}-{}.key", std::process::id()));
        std::fs::write(&path, format!("{hex}\n")).expect("write the key file");
        Self(path)
    }
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn sync_status(socket: &std::path::Path) -> serde_json::Value {
    let status = lb_status(socket).unwrap_or_else(|e| panic!("lb status: {e:#}"));
    status["sync"].clone()
}

fn count(map: &serde_json::Value, reason: &str) -> u64 {
    map[reason]
        .as_u64()
        .unwrap_or_else(|| panic!("no count `{reason}` in {map}"))
}

/// Waits until `f` holds for the daemon's sync status, or panics with the last one.
fn wait_for(socket: &std::path::Path, what: &str, f: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = sync_status(socket);
        if f(&status) {
            return;
        }
        if Instant::now() > deadline {
            panic!("{what}: not within 10 s; sync status: {status:#}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET /metrics` of the daemon in the lab's lb namespace.
fn scrape(lab: &WebLab) -> String {
    lb_tests::prometheus::scrape(lab.topo.lb(), METRICS)
}

/// A TCP connection from `client` (a fixed source port) to `vip`: the backend that answers.
fn backend_from(lab: &WebLab, client: SocketAddr, vip: SocketAddr) -> String {
    let mut connection = TcpLineClient::connect_from(lab.topo.client(), client, vip, TIMEOUT)
        .unwrap_or_else(|e| panic!("connect from {client}: {e:#}"));
    connection
        .request("who")
        .unwrap_or_else(|e| panic!("request from {client}: {e:#}"))
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_peer_s_flows_are_pulled_installed_and_followed_and_bad_datagrams_are_counted() {
    let prefix = "lbsyncp";
    {
        let lab = WebLab::new(prefix, 3);
        let topo = &lab.topo;
        topo.attach_xdp_pass_on_lb_port(lb::ebpf_object(), "xdp_pass")
            .expect("xdp_pass");
        let key = KeyFile::write("peer", KEY_HEX);
        let lb_sync = SocketAddr::new(IpAddr::V4(topo.lb_host().ipv4()), SYNC_PORT);
        let peer = SocketAddr::new(IpAddr::V4(topo.client_host().ipv4()), SYNC_PORT);
        let vip = lab.vip();
        let backend0 = lab.address(0);
        let client_ip = IpAddr::V4(topo.client_host().ipv4());
        let record = |port: u16| FlowRecord {
            vip,
            proto: 6,
            client: SocketAddr::new(client_ip, port),
            backend: backend0.parse().expect("backend address"),
            age_ms: 100,
        };
        let socket = topo
            .client()
            .run(|| UdpSocket::bind(peer))
            .unwrap_or_else(|e| panic!("bind the peer's socket {peer}: {e}"));
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("read timeout");
        let key_bytes = SyncKey::from_hex(KEY_HEX).expect("key");
        let mut sealer = Sealer::new(key_bytes.clone(), peer, 1);
        let mut opener = Opener::new(key_bytes.clone(), &[lb_sync]);

        // The peer answers the daemon's start-up pull with four flows, all on backend 0.
        let answer_socket = socket.try_clone().expect("clone the socket");
        let (heard_tx, heard_rx) = mpsc::channel::<Vec<Message>>();
        let mut pulled: Vec<FlowRecord> = PULLED_PORTS.iter().map(|&p| record(p)).collect();
        pulled.extend((0..FILLER).map(|i| FlowRecord {
            client: SocketAddr::new(
                IpAddr::from([10, 250, (i / 250) as u8, (i % 250) as u8 + 1]),
                50_000,
            ),
            backend: lab.address(1).parse().expect("backend address"),
            ..record(0)
        }));
        let mut pull_sealer = Sealer::new(key_bytes.clone(), peer, 0);
        let mut pull_opener = Opener::new(key_bytes.clone(), &[lb_sync]);
        let answerer = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut heard = Vec::new();
            while Instant::now() < deadline {
                let Ok((len, from)) = answer_socket.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(message) = pull_opener.open(&buf[..len], now_unix_ms()) else {
                    continue;
                };
                let is_pull = message.body == Body::PullRequest;
                heard.push(message);
                if is_pull {
                    for datagram in pull_sealer.seal_flows(&pulled, true) {
                        answer_socket
                            .send_to(&datagram, from)
                            .expect("send PullFlows");
                    }
                    let done = pull_sealer.seal(&Body::PullDone {
                        flows: PULLED as u64,
                    });
                    answer_socket.send_to(&done, from).expect("send PullDone");
                    break;
                }
            }
            let _ = heard_tx.send(heard);
        });

        let extra = format!(
            "metrics = \"{METRICS}\"\n[sync]\nlisten = \"{lb_sync}\"\npeers = [\"{peer}\"]\nkey_file = \"{}\"\n",
            key.0.display()
        );
        let backends: Vec<(String, u32)> = (0..2).map(|i| (lab.address(i), 100)).collect();
        let config = lab.config(&extra, HEALTH, &backends);
        let mut daemon = LbDaemon::start(topo.lb(), &config, Launch::Nsenter)
            .unwrap_or_else(|e| panic!("lb run with [sync]: {e:#}"));
        answerer.join().expect("the pull answerer");
        let heard = heard_rx.recv().expect("what the peer heard");
        assert!(
            heard
                .iter()
                .any(|m| m.body == Body::PullRequest && m.from == lb_sync),
            "the daemon asked the peer for its flows before attaching: {heard:?}"
        );
        let api = api_socket_for(topo.lb());
        let status = sync_status(&api);
        assert_eq!(status["pulled"], true, "{status:#}");
        assert_eq!(status["pulled_flows"], PULLED as u64, "{status:#}");
        assert_eq!(status["flows_installed"], PULLED as u64, "{status:#}");
        daemon
            .wait_for_log(&format!("sync: pulled {PULLED} flows"), TIMEOUT)
            .expect("the pull is logged");
        let log = daemon.log();
        let pulled_at = log
            .find(&format!("sync: pulled {PULLED} flows"))
            .expect("pull line");
        let attached_at = log.find("XDP load balancer attached").expect("attach line");
        assert!(
            pulled_at < attached_at,
            "the flows were pulled before the program was attached"
        );

        // The peer's flows of unchanged ring slots, sent now: all must reach backend 0.
        let sent: Vec<FlowRecord> = SENT_PORTS.iter().map(|&p| record(p)).collect();
        for datagram in sealer.seal_flows(&sent, false) {
            socket.send_to(&datagram, lb_sync).expect("send Flows");
        }
        wait_for(&api, "the sent flows are installed", |s| {
            s["flows_installed"] == (PULLED + SENT_PORTS.len()) as u64
        });
        for &port in PULLED_PORTS.iter().chain(&SENT_PORTS) {
            let client = SocketAddr::new(client_ip, port);
            assert_eq!(
                backend_from(&lab, client, vip),
                backend0,
                "a connection from {client}, replicated on backend 0, reaches backend 0"
            );
        }
        // Without a replicated flow the ring decides: some of these reach backend 1, so the
        // ports above did not reach backend 0 by chance.
        let elsewhere = CONTROL_PORTS
            .iter()
            .filter(|&&port| backend_from(&lab, SocketAddr::new(client_ip, port), vip) != backend0)
            .count();
        assert!(
            elsewhere > 0,
            "some of {} unreplicated connections reach another backend than 0",
            CONTROL_PORTS.len()
        );

        // Bad datagrams: each dropped and counted under its reason.
        let good = sealer.seal(&Body::Heartbeat);
        let mut wrong_key = Sealer::new(SyncKey::from_hex(OTHER_KEY_HEX).expect("key"), peer, 1);
        let stranger: SocketAddr = "10.99.0.1:7946".parse().expect("address");
        let mut stranger_sealer = Sealer::new(key_bytes.clone(), stranger, 1);
        let stale = sealer.seal_at(&Body::Heartbeat, now_unix_ms() - 3_600_000);
        let bad: Vec<(&str, Vec<u8>)> = vec![
            ("malformed", b"hello, load balancer".to_vec()),
            ("truncated", good[..good.len() - 5].to_vec()),
            ("truncated", good[..3].to_vec()),
            ("unauthenticated", wrong_key.seal(&Body::Heartbeat)),
            ("unknown_peer", stranger_sealer.seal(&Body::Heartbeat)),
            ("stale", stale),
        ];
        socket.send_to(&good, lb_sync).expect("send");
        for (_, datagram) in &bad {
            socket.send_to(datagram, lb_sync).expect("send");
        }
        // The good one again: a replay.
        socket.send_to(&good, lb_sync).expect("send");
        wait_for(&api, "every bad datagram is counted", |s| {
            let drops = &s["drops"];
            count(drops, "malformed") == 1
                && count(drops, "truncated") == 2
                && count(drops, "unauthenticated") == 1
                && count(drops, "unknown_peer") == 1
                && count(drops, "stale") == 1
                && count(drops, "replayed") == 1
        });
        let status = sync_status(&api);
        let peer_status = &status["peers"][0];
        assert_eq!(peer_status["address"], peer.to_string(), "{status:#}");
        assert_eq!(peer_status["up"], true, "{status:#}");
        assert_eq!(
            peer_status["flows_received"],
            (PULLED + SENT_PORTS.len()) as u64,
            "{status:#}"
        );
        assert_eq!(
            count(&peer_status["drops"], "replayed"),
            1,
            "datagrams from the peer's address count under the peer: {status:#}"
        );

        // The same counts in the metrics (refreshed every second).
        let peer_label = format!("{{peer=\"{peer}\"}}");
        let wanted = [
            ("lb_sync_drops_total{reason=\"malformed\"}".to_owned(), 1),
            ("lb_sync_drops_total{reason=\"truncated\"}".to_owned(), 2),
            (
                "lb_sync_drops_total{reason=\"unauthenticated\"}".to_owned(),
                1,
            ),
            ("lb_sync_drops_total{reason=\"replayed\"}".to_owned(), 1),
            ("lb_sync_drops_total{reason=\"stale\"}".to_owned(), 1),
            ("lb_sync_drops_total{reason=\"unknown_peer\"}".to_owned(), 1),
            (
                format!("lb_sync_flows_received_total{peer_label}"),
                (PULLED + SENT_PORTS.len()) as u64,
            ),
            (
                "lb_sync_flows_installed_total".to_owned(),
                (PULLED + SENT_PORTS.len()) as u64,
            ),
            (format!("lb_sync_peer_up{peer_label}"), 1),
        ];
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let body = scrape(&lab);
            let missing: Vec<&(String, u64)> = wanted
                .iter()
                .filter(|(series, value)| sample(&body, series) != Some(*value))
                .collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "metrics lack {missing:?}:\n{}",
                body.lines()
                    .filter(|l| l.starts_with("lb_sync"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(200));
        }

        // A storm of garbage: counted, and the daemon keeps answering.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..5000usize {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let mut datagram = good.clone();
            let at = (state as usize) % datagram.len();
            datagram[at] ^= 1 << (i % 8);
            datagram.truncate(datagram.len() - (i % 3));
            socket.send_to(&datagram, lb_sync).expect("send");
        }
        wait_for(&api, "the storm is counted", |s| {
            let total: u64 = s["drops"]
                .as_object()
                .expect("drops")
                .values()
                .filter_map(|v| v.as_u64())
                .sum();
            total >= 7 + 5000 - 50
        });

        // The daemon's own recorded flows reach the peer: a third backend joins (slots change),
        // and new connections in changed slots are recorded and sent, each with its backend.
        let all: Vec<(String, u32)> = (0..3).map(|i| (lab.address(i), 100)).collect();
        daemon
            .rewrite_config(topo.lb(), &lab.config(&extra, HEALTH, &all))
            .unwrap_or_else(|e| panic!("rewrite the config with a third backend: {e:#}"));
        daemon.signal(libc::SIGHUP);
        daemon
            .wait_for_log("reloaded", TIMEOUT)
            .expect("the reload is applied");
        std::thread::sleep(Duration::from_millis(500));
        let mut reached = std::collections::HashMap::new();
        for port in 44001..44061u16 {
            let client = SocketAddr::new(client_ip, port);
            reached.insert(port, backend_from(&lab, client, vip));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut received: Vec<FlowRecord> = Vec::new();
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            let Ok((len, _)) = socket.recv_from(&mut buf) else {
                continue;
            };
            if let Ok(Message {
                body: Body::Flows(records),
                ..
            }) = opener.open(&buf[..len], now_unix_ms())
            {
                received.extend(records);
            }
        }
        let ours: Vec<&FlowRecord> = received
            .iter()
            .filter(|r| r.client.ip() == client_ip && (44001..44061).contains(&r.client.port()))
            .collect();
        assert!(
            !ours.is_empty(),
            "connections in slots the new backend took are recorded and sent to the peer"
        );
        for record in &ours {
            assert_eq!(record.vip, vip, "{record:?}");
            assert_eq!(record.proto, 6, "{record:?}");
            assert_eq!(
                record.backend.to_string(),
                reached[&record.client.port()],
                "the record names the backend the connection reached: {record:?}"
            );
        }
        println!(
            "{} of 60 new connections were recorded (changed slots) and replicated",
            ours.len()
        );
        daemon.stop().expect("lb stops");
    }
    assert_eq!(leftovers(prefix), Vec::<String>::new(), "namespaces left");
}

/// Datagrams from the peer, sealed with `key`, until the daemon counts `wanted` of them received.
fn heartbeat_counted(
    socket: &UdpSocket,
    sealer: &mut Sealer,
    lb_sync: SocketAddr,
    api: &std::path::Path,
    wanted: u64,
) {
    socket
        .send_to(&sealer.seal(&Body::Heartbeat), lb_sync)
        .expect("send a heartbeat");
    wait_for(api, "the heartbeat is received", |s| {
        s["peers"][0]["datagrams_received"].as_u64() == Some(wanted)
    });
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_reload_takes_a_new_key_and_refuses_a_bad_key_file_keeping_the_old_one() {
    let prefix = "lbsynck";
    {
        let lab = WebLab::new(prefix, 2);
        let topo = &lab.topo;
        topo.attach_xdp_pass_on_lb_port(lb::ebpf_object(), "xdp_pass")
            .expect("xdp_pass");
        let old_key = KeyFile::write("old", KEY_HEX);
        let new_key = KeyFile::write("new", OTHER_KEY_HEX);
        let lb_sync = SocketAddr::new(IpAddr::V4(topo.lb_host().ipv4()), SYNC_PORT);
        let peer = SocketAddr::new(IpAddr::V4(topo.client_host().ipv4()), SYNC_PORT);
        let socket = topo
            .client()
            .run(|| UdpSocket::bind(peer))
            .unwrap_or_else(|e| panic!("bind the peer's socket {peer}: {e}"));
        let config = |key: &KeyFile| {
            lab.config_all(
                &format!(
                    "[sync]\nlisten = \"{lb_sync}\"\npeers = [\"{peer}\"]\nkey_file = \"{}\"\n",
                    key.0.display()
                ),
                HEALTH,
            )
        };
        // The peer never answers the start-up pull: the daemon goes on without it.
        let started = Instant::now();
        let mut daemon = LbDaemon::start(topo.lb(), &config(&old_key), Launch::Nsenter)
            .unwrap_or_else(|e| panic!("lb run with [sync]: {e:#}"));
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "a silent peer delays the start by at most its 2 s pull timeout (took {:?})",
            started.elapsed()
        );
        assert!(
            daemon.log().contains("going on without it"),
            "the log says the silent peer was not waited for"
        );
        let api = api_socket_for(topo.lb());
        let mut old_sealer = Sealer::new(SyncKey::from_hex(KEY_HEX).expect("key"), peer, 1);
        heartbeat_counted(&socket, &mut old_sealer, lb_sync, &api, 1);

        // A broken key file: the reload is refused at key_file, the old key keeps working.
        std::fs::write(&old_key.0, "not a key\n").expect("break the key file");
        daemon.signal(libc::SIGHUP);
        daemon
            .wait_for_log("reload refused", TIMEOUT)
            .expect("the reload is refused");
        assert!(
            daemon.log().contains("key_file: ")
                && daemon.log().contains("expected 64 hex characters"),
            "the refusal names key_file and what is wrong"
        );
        heartbeat_counted(&socket, &mut old_sealer, lb_sync, &api, 2);

        // A new key file: the old key's datagrams are refused from now on, the new one's taken.
        daemon
            .rewrite_config(topo.lb(), &config(&new_key))
            .expect("rewrite the config");
        daemon.signal(libc::SIGHUP);
        daemon
            .wait_for_log("replicating recorded flows", TIMEOUT)
            .expect("replication restarts");
        wait_for(&api, "the new service runs", |s| {
            s["peers"][0]["datagrams_received"] == 0
        });
        socket
            .send_to(&old_sealer.seal(&Body::Heartbeat), lb_sync)
            .expect("send");
        wait_for(&api, "the old key is refused", |s| {
            count(&s["drops"], "unauthenticated") == 1
        });
        let mut new_sealer = Sealer::new(SyncKey::from_hex(OTHER_KEY_HEX).expect("key"), peer, 2);
        heartbeat_counted(&socket, &mut new_sealer, lb_sync, &api, 1);
        daemon.stop().expect("lb stops");
    }
    assert_eq!(leftovers(prefix), Vec::<String>::new(), "namespaces left");
}
