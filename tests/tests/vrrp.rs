//! Active/standby with keepalived (VRRP): two LB nodes, each running `lb run` with the same VIPs
//! and backends and keepalived tracking lb's health file (`[announce] health_file`, keepalived
//! `track_file` with `weight 0`). The master holds the next-hop address the client routes the
//! VIPs via (see `lb_tests::vrrp`); node 0 has the higher priority and preempts.
//!
//! Two kinds of node failure, alternated, each undone again before the next:
//! - **link**: `ip link set eth0 down` in the master: its keepalived goes FAULT, the standby
//!   misses the adverts and takes the address over (gratuitous ARP). Back up, the old master's
//!   `lb` must see its backends pass again (its health file goes back to 0) before keepalived
//!   lets it preempt.
//! - **health**: an nftables rule in the master rejects its own checks of the VIP `web`'s
//!   backends (port 80), so its `lb` finds every backend of `web` down, from that node only,
//!   and writes 1 (one VIP it cannot serve; `alt` on port 8080 stays servable) to the health
//!   file: keepalived goes FAULT and sends priority 0, the standby takes over at once.
//!
//! Every failure is measured from the moment it was made until new connections succeed again
//! (printed, and written to `target/vrrp-failover.json`). Long-lived connections, opened through
//! either node, must survive every failure, of either kind, and every fail-back, on their
//! backend: every one that breaks or answers from another backend fails the test. In a health
//! failure, web's three checks fail at their own phases (up to one interval apart), so node 0,
//! still master for a moment, has some of web's backends down but not all; lb's flow hold (a
//! node with `[announce]`: a backend its checks take down leaves the ring but keeps its
//! established flows for twice the longest check interval, at least 1 s) keeps their
//! connections on them until node 0 has handed over, and node 1 carries them on.
//!
//! The control test runs the health failure without `track_file`: the master keeps the address
//! and new connections fail. The start-up test shows that a node whose lb has no health results
//! yet (keepalived's `init_file 1`, then lb's own start-up value) or cannot serve stays in FAULT.
//!
//! The tests of this file run one at a time (a lock): their timings mean something only on an
//! otherwise quiet machine.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use lb_tests::{
    daemon::{Launch, LbDaemon, api_socket_for, lb_status},
    keepalived::{Keepalived, Unicast, VrrpInstance, VrrpState, holds_address, neighbour_mac},
    load::{Attempt, Load, LoadOptions, LoadRecords, LongLived},
    servers::{TcpIdentityServer, TcpLineClient},
    topology::{DEFAULT_VIP_V4, leftovers},
    vrrp::{NEXT_HOP, NODES, VrrpTopology},
};
use serde_json::{Value, json};

/// keepalived's advert interval.
const ADVERT: Duration = Duration::from_millis(100);
/// Node 0 is the preferred master.
const PRIORITIES: [u8; NODES] = [200, 100];
const VIRTUAL_ROUTER_ID: u8 = 50;
/// How long the backup waits without adverts before it takes over (RFC 5798, 6.1):
/// `3 × advert_int + (256 − priority) × advert_int / 256`.
const MASTER_DOWN: Duration = ADVERT
    .saturating_mul(3)
    .saturating_add(Duration::from_micros(
        (256 - PRIORITIES[1] as u64) * ADVERT.as_micros() as u64 / 256,
    ));
/// The backup's wait when the master sends priority 0 (leaving): the skew time alone.
const SKEW: Duration =
    Duration::from_micros((256 - PRIORITIES[1] as u64) * ADVERT.as_micros() as u64 / 256);

/// A node out of FAULT waits this long before it takes the address back, so that all its
/// backends have risen and its rings match its peer's (dist/keepalived.conf.example). Its
/// health file says 0 as soon as one backend of every VIP is up; the others need `rise ×
/// interval + interval` (300 ms) more, but after the link came back one check in some runs
/// failed first and its backend rose ~0.9 s after the others. A node that preempts before
/// then sends that backend's connections to the others, which reset them (seen with 0.5 s).
/// lb's flow hold does not cover this: it holds a backend's flows only when its checks take it
/// from up to down, and a backend still rising after the repair has long been down (its hold
/// over).
const PREEMPT_DELAY: Duration = Duration::from_secs(2);
/// Health checks: every 100 ms, down after 2 failures, up after 2 passes.
const INTERVAL: Duration = Duration::from_millis(100);
const RISE: u32 = 2;
const FALL: u32 = 2;
/// From a failure to lb's decision: `interval × fall + interval` (README, "Rise and fall").
const DETECTION: Duration = INTERVAL.saturating_mul(FALL + 1);
/// lb writes the health file within this of its decision (issue 9).
const HEALTH_FILE_DELAY: Duration = Duration::from_millis(100);
/// What a loaded, shared 2-core machine adds: the gratuitous ARP reaching the client, thread
/// scheduling of keepalived, lb and the load, and the load's own 10 ms pace.
const SLACK: Duration = Duration::from_millis(400);
/// Link down: the backup takes over after the master-down interval, then sends gratuitous ARP.
const LINK_BOUND: Duration = MASTER_DOWN.saturating_add(SLACK);
/// lb cannot serve: detection, the file, keepalived's priority-0 advert, the backup's skew.
const HEALTH_BOUND: Duration = DETECTION
    .saturating_add(HEALTH_FILE_DELAY)
    .saturating_add(SKEW)
    .saturating_add(SLACK);

/// Failures of each kind.
const ROUNDS: usize = 10;
const WEB_PORT: u16 = 80;
const ALT_PORT: u16 = 8080;
/// New connections: connect, send and read each bounded by this (a dropped SYN fails after it).
const NEW_CONNECTION_TIMEOUT: Duration = Duration::from_millis(500);
/// Long-lived connections may stall through a failover (TCP retransmits); only an error or a
/// stall longer than this counts as broken.
const LONG_LIVED_TIMEOUT: Duration = Duration::from_secs(5);
/// How long every phase runs steadily after its switch-over, so its load is measured.
const STEADY: Duration = Duration::from_millis(1200);
const WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);
const LOG_TAIL: usize = 30;
/// nftables table that blocks node 0's checks.
const BLOCK_TABLE: &str = "lbvrrp";

/// The client's load: a new connection every 10 ms, long-lived ones asked every 100 ms.
fn load_options() -> LoadOptions {
    LoadOptions {
        period: Duration::from_millis(10),
        // Enough that some are always free while others wait out a dropped SYN's timeout: the
        // time back is then seen to within one period.
        workers: 64,
        timeout: NEW_CONNECTION_TIMEOUT,
        long_lived_period: Duration::from_millis(100),
    }
}

/// One test at a time (see the module documentation).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A directory removed on drop (the nodes' health files).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    Link,
    Health,
}

impl Failure {
    fn name(self) -> &'static str {
        match self {
            Self::Link => "link",
            Self::Health => "health",
        }
    }
}

struct Lab {
    // Dropped in this order: keepalived (releases the address), lb, servers, files, namespaces.
    keepalived: [Option<Keepalived>; NODES],
    daemons: [Option<LbDaemon>; NODES],
    _servers: Vec<TcpIdentityServer>,
    health: TempDir,
    topology: VrrpTopology,
}

impl Lab {
    /// Builds the topology, starts the servers and both `lb`s, waits for their health files to
    /// say 0, then starts keepalived on node 0 (waits for MASTER) and node 1 (BACKUP).
    fn new(prefix: &str, track: bool, unicast: bool) -> Self {
        let mut lab = Self::build(prefix);
        for node in 0..NODES {
            lab.start_lb(node);
        }
        for node in 0..NODES {
            lab.wait_for(
                &format!("node {node}'s health file to say 0"),
                WAIT,
                |lab| lab.health_value(node) == Some(0),
            );
        }
        for node in 0..NODES {
            lab.start_keepalived(node, track, unicast);
            let expected = if node == 0 {
                VrrpState::Master
            } else {
                VrrpState::Backup
            };
            lab.wait_for_state(node, expected, 0);
        }
        lab.wait_for("node 0 to hold the next hop alone", WAIT, |lab| {
            lab.holder() == Some(0)
        });
        lab
    }

    /// The topology and the servers; neither lb nor keepalived runs yet.
    fn build(prefix: &str) -> Self {
        let topology = VrrpTopology::new(prefix, 3, &[DEFAULT_VIP_V4]).expect("the topology");
        let dsr = topology.dsr();
        let mut servers = Vec::new();
        for backend in dsr.backend_hosts() {
            for port in [WEB_PORT, ALT_PORT] {
                let server = TcpIdentityServer::start(
                    backend.namespace(),
                    SocketAddr::from(([0, 0, 0, 0], port)),
                    backend.ipv4().to_string(),
                )
                .unwrap_or_else(|e| panic!("server on {}:{port}: {e:#}", backend.ipv4()));
                servers.push(server);
            }
        }
        let health =
            TempDir(std::env::temp_dir().join(format!("lb-vrrp-{}", topology.name_prefix())));
        std::fs::create_dir_all(&health.0).expect("the health files' directory");
        Self {
            keepalived: [None, None],
            daemons: [None, None],
            _servers: servers,
            health,
            topology,
        }
    }

    /// Starts `lb run` on `node` (returns once it has attached).
    fn start_lb(&mut self, node: usize) {
        let namespace = self.topology.node(node).namespace;
        let config = self.lb_config(node);
        let daemon = LbDaemon::start(namespace, &config, Launch::Nsenter)
            .unwrap_or_else(|e| self.fail(&format!("lb run on node {node}: {e:#}")));
        self.daemons[node] = Some(daemon);
    }

    /// Starts keepalived on `node` (returns once its instance has a first state).
    fn start_keepalived(&mut self, node: usize, track: bool, unicast: bool) {
        let instance = self.instance(node, track, unicast);
        let keepalived = Keepalived::start(
            self.topology.node(node).namespace,
            &instance.name,
            &instance.config(),
        )
        .unwrap_or_else(|e| self.fail(&format!("keepalived on node {node}: {e:#}")));
        self.keepalived[node] = Some(keepalived);
    }

    #[track_caller]
    fn lb(&self, node: usize) -> &LbDaemon {
        self.daemons[node]
            .as_ref()
            .unwrap_or_else(|| panic!("lb does not run on node {node}"))
    }

    #[track_caller]
    fn ka(&self, node: usize) -> &Keepalived {
        self.keepalived[node]
            .as_ref()
            .unwrap_or_else(|| panic!("keepalived does not run on node {node}"))
    }

    fn health_path(&self, node: usize) -> PathBuf {
        self.health.0.join(format!("node{node}"))
    }

    /// The number in node `node`'s health file (`None`: missing or not a number).
    fn health_value(&self, node: usize) -> Option<u32> {
        std::fs::read_to_string(self.health_path(node))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn backend_addresses(&self) -> Vec<Ipv4Addr> {
        self.topology
            .dsr()
            .backend_hosts()
            .iter()
            .map(|h| h.ipv4())
            .collect()
    }

    /// The same VIPs and backends on both nodes; only the health file's path differs.
    fn lb_config(&self, node: usize) -> String {
        let backends: String = self
            .backend_addresses()
            .iter()
            .map(|a| format!("[[vip.backend]]\naddress = \"{a}\"\n"))
            .collect();
        let health = format!(
            "[vip.health]\ncheck = \"tcp\"\ninterval = \"{i}ms\"\ntimeout = \"{i}ms\"\nrise = {RISE}\nfall = {FALL}\n",
            i = INTERVAL.as_millis()
        );
        let vip = |name: &str, port: u16| {
            format!(
                "\n[[vip]]\nname = \"{name}\"\naddress = \"{DEFAULT_VIP_V4}\"\nport = {port}\nprotocol = \"tcp\"\n{health}{backends}"
            )
        };
        format!(
            "interface = \"eth0\"\nflow_table_size = 65536\nmax_vips = 4\n\n[announce]\nhealth_file = \"{}\"\n{}{}",
            self.health_path(node).display(),
            vip("web", WEB_PORT),
            vip("alt", ALT_PORT),
        )
    }

    fn instance(&self, node: usize, track: bool, unicast: bool) -> VrrpInstance {
        let me = self.topology.node(node);
        let peer = self.topology.node(1 - node);
        VrrpInstance {
            name: "lb".into(),
            router_id: format!("lb-node{node}"),
            interface: "eth0".into(),
            virtual_router_id: VIRTUAL_ROUTER_ID,
            priority: PRIORITIES[node],
            advert_interval: ADVERT,
            address: NEXT_HOP,
            track_file: track.then(|| self.health_path(node)),
            init_file: track.then_some(1),
            unicast: unicast.then(|| Unicast {
                source: me.ipv4,
                peers: vec![peer.ipv4],
            }),
            preempt: true,
            preempt_delay: Some(PREEMPT_DELAY),
        }
    }

    fn web(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(DEFAULT_VIP_V4), WEB_PORT)
    }

    /// The one node holding the next hop (`None`: neither or both).
    fn holder(&self) -> Option<usize> {
        let holding: Vec<usize> = (0..NODES)
            .filter(|&n| {
                holds_address(self.topology.node(n).namespace, IpAddr::V4(NEXT_HOP))
                    .unwrap_or_else(|e| panic!("addresses of node {n}: {e:#}"))
            })
            .collect();
        match holding.as_slice() {
            [node] => Some(*node),
            _ => None,
        }
    }

    /// The node the client's ARP entry for the next hop points at.
    fn client_next_hop(&self) -> Option<usize> {
        neighbour_mac(self.topology.client(), IpAddr::V4(NEXT_HOP))
            .unwrap_or_else(|e| panic!("the client's neighbour table: {e:#}"))
            .and_then(|mac| self.topology.node_of_mac(mac))
    }

    /// Panics with `message` and the tails of every lb and keepalived log.
    #[track_caller]
    fn fail(&self, message: &str) -> ! {
        let mut text = format!("{message}\n");
        for (node, daemon) in self.daemons.iter().enumerate() {
            let Some(daemon) = daemon else { continue };
            text.push_str(&format!(
                "--- node {node}: last {LOG_TAIL} lines of lb ---\n{}\n",
                daemon.log_tail(LOG_TAIL)
            ));
        }
        for (node, keepalived) in self.keepalived.iter().enumerate() {
            let Some(keepalived) = keepalived else {
                continue;
            };
            text.push_str(&format!(
                "--- node {node}: last {LOG_TAIL} lines of keepalived ---\n{}\n",
                keepalived.log_tail(LOG_TAIL)
            ));
        }
        panic!("{text}");
    }

    #[track_caller]
    fn check(&self, condition: bool, message: impl FnOnce() -> String) {
        if !condition {
            self.fail(&message());
        }
    }

    #[track_caller]
    fn wait_for(&self, what: &str, timeout: Duration, mut done: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            if Instant::now() > deadline {
                self.fail(&format!("timed out after {timeout:?} waiting for {what}"));
            }
            std::thread::sleep(POLL);
        }
    }

    #[track_caller]
    fn wait_for_state(&self, node: usize, state: VrrpState, skip: usize) -> Instant {
        self.ka(node)
            .wait_for_state(state, skip, WAIT)
            .unwrap_or_else(|e| self.fail(&format!("node {node}: {e:#}")))
            .at
    }

    fn state_counts(&self) -> [usize; NODES] {
        [0, 1].map(|n| self.ka(n).state_changes().len())
    }

    /// Makes node 0 fail; returns when the failure is in place.
    fn break_node0(&self, failure: Failure) {
        let node0 = self.topology.node(0).namespace;
        match failure {
            Failure::Link => {
                node0
                    .ip(["link", "set", "eth0", "down"])
                    .expect("ip link set eth0 down in node 0");
            }
            Failure::Health => {
                let backends = self
                    .backend_addresses()
                    .iter()
                    .map(Ipv4Addr::to_string)
                    .collect::<Vec<_>>()
                    .join(", ");
                let script = format!(
                    "add table ip {BLOCK_TABLE}; \
                     add chain ip {BLOCK_TABLE} out {{ type filter hook output priority 0; policy accept; }}; \
                     add rule ip {BLOCK_TABLE} out ip daddr {{ {backends} }} tcp dport {WEB_PORT} reject with tcp reset"
                );
                node0
                    .exec("nft", [script.as_str()])
                    .expect("nft: reject node 0's checks of web's backends");
            }
        }
    }

    fn repair_node0(&self, failure: Failure) {
        let node0 = self.topology.node(0).namespace;
        match failure {
            Failure::Link => {
                node0
                    .ip(["link", "set", "eth0", "up"])
                    .expect("ip link set eth0 up in node 0");
            }
            Failure::Health => {
                node0
                    .exec("nft", ["delete", "table", "ip", BLOCK_TABLE])
                    .expect("nft delete table");
            }
        }
    }

    /// Opens a long-lived connection to `web` and hands it to `load`; returns its backend.
    fn open_long_lived(&self, load: &Load) -> String {
        let mut client =
            TcpLineClient::connect(self.topology.client(), self.web(), LONG_LIVED_TIMEOUT)
                .unwrap_or_else(|e| self.fail(&format!("opening a long-lived connection: {e:#}")));
        let identity = client.request("hello").unwrap_or_else(|e| {
            self.fail(&format!("first request of a long-lived connection: {e:#}"))
        });
        load.add_long_lived(client, identity.clone());
        identity
    }

    /// Opens long-lived connections until every backend has one more than `before` had.
    fn long_lived_to_every_backend(&self, load: &Load) {
        let wanted: Vec<String> = self
            .backend_addresses()
            .iter()
            .map(Ipv4Addr::to_string)
            .collect();
        let before = load.long_lived();
        let count = |all: &[LongLived], b: &str| all.iter().filter(|l| l.expected == b).count();
        for _ in 0..100 {
            let now = load.long_lived();
            if wanted.iter().all(|b| count(&now, b) > count(&before, b)) {
                return;
            }
            self.open_long_lived(load);
        }
        self.fail("could not open a long-lived connection to every backend in 100 tries");
    }

    /// Every VIP's `field` in node `node`'s `lb status --json`, by VIP name.
    fn vip_fields(&self, node: usize, field: &str) -> BTreeMap<String, Value> {
        let status = self.status(node);
        status["vips"]
            .as_array()
            .unwrap_or_else(|| self.fail(&format!("no vips in node {node}'s status: {status}")))
            .iter()
            .map(|v| {
                (
                    v["name"].as_str().unwrap_or("?").to_owned(),
                    v[field].clone(),
                )
            })
            .collect()
    }

    /// Both nodes report the same ring digest for every VIP: they choose alike.
    #[track_caller]
    fn check_rings_agree(&self, when: &str) {
        let digests = [0, 1].map(|node| self.vip_fields(node, "ring_digest"));
        self.check(
            digests[0] == digests[1]
                && digests[0].len() == 2
                && digests[0]
                    .values()
                    .all(|d| d.as_str().is_some_and(|d| !d.is_empty())),
            || format!("{when}: the nodes' ring digests differ or are missing: {digests:?}"),
        );
    }

    fn status(&self, node: usize) -> Value {
        lb_status(&api_socket_for(self.topology.node(node).namespace))
            .unwrap_or_else(|e| self.fail(&format!("lb status on node {node}: {e:#}")))
    }
}

/// One failure and its repair, as measured.
#[derive(Clone, Debug)]
struct Round {
    failure: Failure,
    /// Just before the failure was made.
    broken_at: Instant,
    /// The same moment on the wall clock (lb's log has wall-clock times).
    broken_wall: SystemTime,
    /// Node 1's keepalived entered MASTER.
    standby_master: Instant,
    /// Node 0's keepalived entered FAULT.
    master_fault: Instant,
    /// Node 0's health file value while it was failed.
    health_value: Option<u32>,
    /// Just before the repair.
    repaired_at: Instant,
    /// Node 0 MASTER again.
    master_back: Instant,
    /// The next round's failure (or the end of the run): this round's load ends here.
    end: Instant,
    /// For `health`: the wall-clock time of node 0's last check transition to down before
    /// its FAULT, and of the FAULT (lb's decision → keepalived).
    decision_to_fault: Option<Duration>,
}

/// New connections of a window, and when they succeeded again after the last failure.
#[derive(Clone, Debug, Default)]
struct Window {
    attempts: usize,
    failed: usize,
    /// From the window's start to the start of the first success after the last failure
    /// (the start of the first success when nothing failed).
    recovered: Option<Duration>,
    /// From the first failure's start to the start of the first success after the last failure.
    outage: Option<Duration>,
}

/// The new connections that started in `[from, to)` and ended before `to` (an attempt the next
/// event may have cut belongs to neither window).
fn window(records: &LoadRecords, from: Instant, to: Instant) -> Window {
    let mut attempts: Vec<&Attempt> = records
        .new_connections
        .iter()
        .filter(|a| a.start >= from && a.start < to && a.end < to)
        .collect();
    attempts.sort_by_key(|a| a.start);
    let failed: Vec<&&Attempt> = attempts.iter().filter(|a| a.failed()).collect();
    let last_failure = failed.last().map(|a| a.start);
    let first_success_after = attempts
        .iter()
        .find(|a| !a.failed() && last_failure.is_none_or(|f| a.start > f))
        .map(|a| a.start);
    Window {
        attempts: attempts.len(),
        failed: failed.len(),
        recovered: first_success_after.map(|s| s - from),
        outage: match (failed.first(), first_success_after) {
            (Some(first), Some(back)) => Some(back - first.start),
            (None, Some(_)) => Some(Duration::ZERO),
            _ => None,
        },
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn worst(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NAN, f64::max)
}

fn rounded(value: f64) -> Value {
    if value.is_finite() {
        json!((value * 10.0).round() / 10.0)
    } else {
        Value::Null
    }
}

/// Where `at` falls among the rounds: `round 3 (health), 412.0 ms after the repair`.
fn when(rounds: &[Round], at: Instant) -> String {
    for (i, r) in rounds.iter().enumerate() {
        if at >= r.broken_at && at < r.repaired_at {
            return format!(
                "round {i} ({}), {:.1} ms after the failure",
                r.failure.name(),
                ms(at - r.broken_at)
            );
        }
        if at >= r.repaired_at && at < r.end {
            return format!(
                "round {i} ({}), {:.1} ms after the repair",
                r.failure.name(),
                ms(at - r.repaired_at)
            );
        }
    }
    "outside every round".to_owned()
}

/// What each node's lb last logged about `backend` of `web` before `at` (for a connection that
/// broke or moved then): `node 0: up -> down 312.0 ms before; node 1: none`.
fn views(lab: &Lab, rounds: &[Round], backend: &str, at: Instant) -> String {
    let Some(round) = rounds
        .iter()
        .rev()
        .find(|r| r.broken_at <= at)
        .or(rounds.first())
    else {
        return String::new();
    };
    let wall = if at >= round.broken_at {
        round.broken_wall + (at - round.broken_at)
    } else {
        round.broken_wall - (round.broken_at - at)
    };
    (0..NODES)
        .map(|node| {
            let last = lab
                .lb(node)
                .transitions()
                .into_iter()
                .filter(|t| t.vip == "web" && t.backend == backend && t.at <= wall)
                .max_by_key(|t| t.at);
            match last {
                Some(t) => format!(
                    "node {node}: {} -> {} {:.1} ms before",
                    t.from,
                    t.to,
                    wall.duration_since(t.at).map(ms).unwrap_or_default()
                ),
                None => format!("node {node}: no transition"),
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The longest pause between two answers of any long-lived connection inside `[from, to)`.
fn longest_stall(records: &LoadRecords, from: Instant, to: Instant) -> Duration {
    records
        .long_lived
        .iter()
        .flat_map(|l| {
            l.replies
                .windows(2)
                .filter(|pair| pair[1].end >= from && pair[0].end < to)
                .map(|pair| pair[1].end - pair[0].end)
        })
        .max()
        .unwrap_or_default()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
            manifest.parent().unwrap_or(manifest).join("target")
        })
}

/// Node 0's last backend transition of `web` to down logged before `before` (wall clock).
fn last_down_before(daemon: &LbDaemon, before: SystemTime) -> Option<SystemTime> {
    daemon
        .transitions()
        .into_iter()
        .filter(|t| t.vip == "web" && t.to == "down" && t.at <= before)
        .map(|t| t.at)
        .max()
}

#[test]
#[ignore = "needs root, keepalived and the lb binary: run with cargo xtask test"]
fn the_standby_takes_over_on_link_loss_and_on_a_vip_the_master_cannot_serve() {
    let _serial = serial();
    let prefix = "lbvrrp";
    {
        let lab = Lab::new(prefix, true, false);

        // Both nodes see the same backends the same way: their rings choose alike.
        lab.check_rings_agree("at the start");

        let load = Load::start(lab.topology.client(), lab.web(), load_options())
            .expect("the client's load");
        lab.long_lived_to_every_backend(&load);
        lab.wait_for("the client to reach the VIP via node 0", WAIT, |lab| {
            lab.client_next_hop() == Some(0)
        });

        let mut rounds: Vec<Round> = Vec::new();
        for round in 0..2 * ROUNDS {
            let failure = if round % 2 == 0 {
                Failure::Link
            } else {
                Failure::Health
            };
            let skip = lab.state_counts();
            let broken_at = Instant::now();
            let broken_wall = SystemTime::now();
            lab.break_node0(failure);
            eprintln!(
                "round {round}: {} failure of node 0 at {}",
                failure.name(),
                humantime::format_rfc3339_micros(broken_wall)
            );
            let standby_master = lab.wait_for_state(1, VrrpState::Master, skip[1]);
            let master_fault = lab.wait_for_state(0, VrrpState::Fault, skip[0]);
            lab.wait_for("the client's next hop to move to node 1", WAIT, |lab| {
                lab.client_next_hop() == Some(1) && lab.holder() == Some(1)
            });
            let node1_packets = lab.vip_fields(1, "packets");
            // A connection that only node 1 ever carried at its start.
            lab.open_long_lived(&load);
            std::thread::sleep(STEADY);
            let (status, later) = (lab.status(0), lab.vip_fields(1, "packets"));
            lab.check(later["web"].as_u64() > node1_packets["web"].as_u64(), || {
                format!("round {round}: node 1 forwarded no web packet as master: {node1_packets:?} then {later:?}")
            });
            let can_serve: Vec<(String, bool)> = lab
                .vip_fields(0, "can_serve")
                .into_iter()
                .map(|(name, v)| (name, v.as_bool().unwrap_or(true)))
                .collect();
            let expected_can_serve = match failure {
                Failure::Link => [("alt", false), ("web", false)],
                Failure::Health => [("alt", true), ("web", false)],
            }
            .map(|(name, can)| (name.to_owned(), can));
            lab.check(can_serve == expected_can_serve, || {
                format!("round {round}: node 0 reports can_serve {can_serve:?}, expected {expected_can_serve:?}")
            });
            let health_value = lab.health_value(0);
            let expected = match failure {
                // No check reaches any backend: neither VIP can be served.
                Failure::Link => 2,
                // Only web's checks are rejected.
                Failure::Health => 1,
            };
            lab.check(
                health_value == Some(expected)
                    && status["announce"]["health_value"] == json!(expected),
                || {
                    format!(
                        "round {round} ({failure:?}): node 0's health file says {health_value:?} and \
                         its status {}, expected {expected}",
                        status["announce"]
                    )
                },
            );
            let fault_wall = lab
                .ka(0)
                .state_changes()
                .get(skip[0]..)
                .and_then(|c| c.iter().find(|c| c.state == VrrpState::Fault))
                .map(|c| c.wall)
                .expect("the FAULT waited for above");
            let decision_to_fault = match failure {
                Failure::Health => last_down_before(lab.lb(0), fault_wall)
                    .filter(|&t| t >= broken_wall)
                    .and_then(|t| fault_wall.duration_since(t).ok()),
                Failure::Link => None,
            };

            let skip = lab.state_counts();
            let repaired_at = Instant::now();
            lab.repair_node0(failure);
            eprintln!(
                "round {round}: node 0 repaired at {}",
                humantime::format_rfc3339_micros(SystemTime::now())
            );
            let master_back = lab.wait_for_state(0, VrrpState::Master, skip[0]);
            lab.wait_for_state(1, VrrpState::Backup, skip[1]);
            lab.check(lab.health_value(0) == Some(0), || {
                format!(
                    "round {round}: node 0 became MASTER while its health file says {:?}",
                    lab.health_value(0)
                )
            });
            lab.wait_for(
                "the client's next hop to move back to node 0",
                WAIT,
                |lab| lab.client_next_hop() == Some(0) && lab.holder() == Some(0),
            );
            lab.open_long_lived(&load);
            std::thread::sleep(STEADY);
            lab.check_rings_agree(&format!("after round {round}'s fail-back"));
            if let Some(previous) = rounds.last_mut() {
                previous.end = broken_at;
            }
            rounds.push(Round {
                failure,
                broken_at,
                broken_wall,
                standby_master,
                master_fault,
                health_value,
                repaired_at,
                master_back,
                end: Instant::now(),
                decision_to_fault,
            });
        }
        let records = load.stop();

        // Per round: the failover window [broken, repaired) and the fail-back [repaired, end).
        let mut table = String::from(
            "round kind    standby MASTER(ms)  new conns back(ms)  outage(ms)  failed/attempts  \
             decision->FAULT(ms)  fail-back: MASTER(ms)  failed/attempts  longest stall(ms)  \
             long-lived open/broken/moved\n",
        );
        let mut per_kind: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        let mut json_rounds = Vec::new();
        let mut late = Vec::new();
        let mut failback_failures = 0;
        for (i, r) in rounds.iter().enumerate() {
            let over = window(&records, r.broken_at, r.repaired_at);
            let back = window(&records, r.repaired_at, r.end);
            let recovered = over.recovered.map(ms).unwrap_or(f64::NAN);
            let stall = longest_stall(&records, r.broken_at, r.end);
            // Long-lived connections that were open when the failure was made, and how many of
            // them broke, or answered from another backend, before the round ended.
            let open: Vec<&LongLived> = records
                .long_lived
                .iter()
                .filter(|l| {
                    l.added < r.broken_at && l.broken().is_none_or(|b| b.start >= r.broken_at)
                })
                .collect();
            let cut = open
                .iter()
                .filter(|l| l.broken().is_some_and(|b| b.start < r.end))
                .count();
            let moved = open
                .iter()
                .filter(|l| {
                    l.moved()
                        .iter()
                        .any(|a| a.start >= r.broken_at && a.start < r.end)
                })
                .count();
            per_kind
                .entry(r.failure.name())
                .or_default()
                .push(recovered);
            per_kind.entry("all").or_default().push(recovered);
            let bound = match r.failure {
                Failure::Link => LINK_BOUND,
                Failure::Health => HEALTH_BOUND,
            };
            if over.recovered.is_none_or(|d| d > bound) {
                late.push((i, r.failure, recovered, ms(bound)));
            }
            failback_failures += back.failed;
            table.push_str(&format!(
                "{i:>5} {:<7} {:>18.1}  {:>18.1}  {:>10.1}  {:>7}/{:<7}  {:>19}  {:>21.1}  {:>7}/{:<7}  {:>17.1}  {:>9}/{}/{}\n",
                r.failure.name(),
                ms(r.standby_master - r.broken_at),
                recovered,
                over.outage.map(ms).unwrap_or(f64::NAN),
                over.failed,
                over.attempts,
                r.decision_to_fault.map(|d| format!("{:.1}", ms(d))).unwrap_or_else(|| "-".into()),
                ms(r.master_back - r.repaired_at),
                back.failed,
                back.attempts,
                ms(stall),
                open.len(),
                cut,
                moved,
            ));
            json_rounds.push(json!({
                "kind": r.failure.name(),
                "standby_master_ms": rounded(ms(r.standby_master - r.broken_at)),
                "master_fault_ms": rounded(ms(r.master_fault - r.broken_at)),
                "new_connections_back_ms": rounded(recovered),
                "outage_ms": rounded(over.outage.map(ms).unwrap_or(f64::NAN)),
                "failed_new_connections": over.failed,
                "new_connections": over.attempts,
                "health_value": r.health_value,
                "health_decision_to_fault_ms": r.decision_to_fault.map(|d| rounded(ms(d))),
                "failback_master_ms": rounded(ms(r.master_back - r.repaired_at)),
                "failback_failed_new_connections": back.failed,
                "failback_new_connections": back.attempts,
                "longest_long_lived_stall_ms": rounded(ms(stall)),
                "long_lived_open": open.len(),
                "long_lived_broken": cut,
                "long_lived_moved": moved,
            }));
        }
        // Every long-lived connection that broke or answered from another backend, in any round
        // or fail-back: each one fails the test.
        let broken: Vec<&LongLived> = records
            .long_lived
            .iter()
            .filter(|l| !l.alive() || !l.moved().is_empty())
            .collect();
        let broken_count = broken.iter().filter(|l| !l.alive()).count();
        let moved_count = broken.iter().filter(|l| !l.moved().is_empty()).count();
        let broken: Vec<String> = broken
            .iter()
            .map(|l| {
                let first = l
                    .broken()
                    .into_iter()
                    .chain(l.moved())
                    .map(|a| a.start)
                    .min();
                format!(
                    "#{} to {}: broken {:?} ({}), moved {:?}; {}",
                    l.index,
                    l.expected,
                    l.broken().map(|a| a.result.clone()),
                    l.broken()
                        .map(|a| when(&rounds, a.start))
                        .unwrap_or_default(),
                    l.moved()
                        .iter()
                        .map(|a| format!("{:?} ({})", a.result, when(&rounds, a.start)))
                        .collect::<Vec<_>>(),
                    first
                        .map(|at| views(&lab, &rounds, &l.expected, at))
                        .unwrap_or_default()
                )
            })
            .collect();
        let summary: BTreeMap<&str, Value> = per_kind
            .iter()
            .map(|(kind, values)| {
                (*kind, json!({"failures": values.len(), "median_ms": rounded(median(values)), "worst_ms": rounded(worst(values))}))
            })
            .collect();
        for (kind, values) in &per_kind {
            table.push_str(&format!(
                "{kind}: {} failures, new connections succeed again after median {:.1} ms, worst {:.1} ms\n",
                values.len(),
                median(values),
                worst(values)
            ));
        }
        table.push_str(&format!(
            "bounds: link {:.0} ms (master down {:.0} ms + slack), health {:.0} ms (detection {:.0} + file {:.0} + skew {:.0} + slack); \
             long-lived connections: {} opened, {broken_count} broken, {moved_count} moved to another \
             backend; failed new connections after a fail-back: {failback_failures}\n",
            ms(LINK_BOUND),
            ms(MASTER_DOWN),
            ms(HEALTH_BOUND),
            ms(DETECTION),
            ms(HEALTH_FILE_DELAY),
            ms(SKEW),
            records.long_lived.len(),
        ));
        for line in &broken {
            table.push_str(&format!("  {line}\n"));
        }
        println!("{table}");
        let report = json!({
            "advert_int_ms": ms(ADVERT),
            "check_interval_ms": ms(INTERVAL),
            "rise": RISE,
            "fall": FALL,
            "bounds_ms": {"link": rounded(ms(LINK_BOUND)), "health": rounded(ms(HEALTH_BOUND))},
            "failover": summary,
            "long_lived_connections": records.long_lived.len(),
            "long_lived_broken_or_moved": broken.len(),
            "long_lived_broken": broken_count,
            "long_lived_moved": moved_count,
            "failback_failed_new_connections": failback_failures,
            "new_connections": records.new_connections.len(),
            "rounds": json_rounds,
        });
        let path = target_dir().join("vrrp-failover.json");
        match std::fs::write(&path, serde_json::to_string_pretty(&report).expect("JSON")) {
            Ok(()) => println!("wrote {}", path.display()),
            Err(e) => eprintln!("cannot write {}: {e}", path.display()),
        }

        lab.check(broken.is_empty(), || {
            format!("long-lived connections broke or moved: {broken:#?}\n{table}")
        });
        lab.check(late.is_empty(), || {
            format!("failovers over their bound (round, kind, ms, bound ms): {late:?}\n{table}")
        });
        lab.check(failback_failures == 0, || {
            format!("new connections failed while node 0 took the address back\n{table}")
        });
    }
    assert_eq!(leftovers(prefix), Vec::<String>::new(), "left behind");
}

#[test]
#[ignore = "needs root, keepalived and the lb binary: run with cargo xtask test"]
fn without_track_file_a_master_that_cannot_serve_keeps_the_address_and_connections_fail() {
    let _serial = serial();
    let prefix = "lbvrrpno";
    {
        // Unicast adverts here, so that configuration is exercised too.
        let lab = Lab::new(prefix, false, true);
        let load = Load::start(lab.topology.client(), lab.web(), load_options())
            .expect("the client's load");
        lab.wait_for("a first new connection", WAIT, |_| {
            load.new_connections().iter().any(|a| !a.failed())
        });
        let skip = lab.state_counts();
        lab.break_node0(Failure::Health);
        lab.wait_for("node 0's health file to say 1", WAIT, |lab| {
            lab.health_value(0) == Some(1)
        });
        let unservable = Instant::now();
        // Long enough for keepalived to have reacted many times over if it were going to.
        std::thread::sleep(MASTER_DOWN.saturating_mul(5).max(Duration::from_secs(2)));
        let watched = Instant::now();
        let changes: Vec<usize> = (0..NODES)
            .map(|n| lab.ka(n).state_changes().len() - skip[n])
            .collect();
        lab.check(changes == [0, 0], || {
            format!("without track_file keepalived changed state anyway: {changes:?}")
        });
        lab.check(
            lab.holder() == Some(0) && lab.client_next_hop() == Some(0),
            || "node 0 should still hold the next hop".into(),
        );
        // Settled: from one check interval after the file changed (lb's ring was emptied by
        // then) until now, every new connection failed.
        std::thread::sleep(NEW_CONNECTION_TIMEOUT + Duration::from_millis(100));
        let records = load.stop();
        let from = unservable + INTERVAL;
        let during = window(&records, from, watched);
        println!(
            "without track_file: node 0 kept the address for {:.0} ms with a VIP it cannot serve; \
             {} of {} new connections failed",
            ms(watched - unservable),
            during.failed,
            during.attempts
        );
        // About 190 attempts start in the ~1.9 s watched (one per 10 ms).
        lab.check(during.attempts >= 50 && during.failed == during.attempts, || {
            format!("expected every new connection to fail while node 0 cannot serve web: {during:?}")
        });
        lab.repair_node0(Failure::Health);
    }
    assert_eq!(leftovers(prefix), Vec::<String>::new(), "left behind");
}

#[test]
#[ignore = "needs root, keepalived and the lb binary: run with cargo xtask test"]
fn a_node_takes_the_address_only_once_its_lb_has_health_results_that_say_it_can_serve() {
    let _serial = serial();
    let prefix = "lbvrrpst";
    {
        let mut lab = Lab::build(prefix);
        // Node 1 alone: it becomes master.
        lab.start_lb(1);
        lab.wait_for("node 1's health file to say 0", WAIT, |lab| {
            lab.health_value(1) == Some(0)
        });
        lab.start_keepalived(1, true, false);
        lab.wait_for_state(1, VrrpState::Master, 0);

        // Node 0's keepalived before its lb: `init_file 1` creates the missing file with 1.
        lab.check(lab.health_value(0).is_none(), || {
            "node 0's health file exists before anything ran there".into()
        });
        lab.start_keepalived(0, true, false);
        lab.check(
            lab.ka(0).state() == Some(VrrpState::Fault) && lab.health_value(0) == Some(1),
            || {
                format!(
                    "node 0's keepalived should start in FAULT on the file it created: state {:?}, file {:?}",
                    lab.ka(0).state(),
                    lab.health_value(0)
                )
            },
        );

        // Node 0's lb starts while its checks of web's backends fail: it writes 2 (no health
        // results yet), then 1 (web cannot serve). Node 0 stays in FAULT throughout.
        lab.break_node0(Failure::Health);
        lab.start_lb(0);
        lab.wait_for("node 0's lb to report web unservable", WAIT, |lab| {
            lab.health_value(0) == Some(1)
        });
        // Several preempt delays and master-down intervals: it would have taken over by now.
        std::thread::sleep(PREEMPT_DELAY + MASTER_DOWN.saturating_mul(3));
        let states: Vec<VrrpState> = lab.ka(0).state_changes().iter().map(|c| c.state).collect();
        lab.check(states == [VrrpState::Fault], || {
            format!("node 0 left FAULT while its lb could not serve web: {states:?}")
        });
        lab.check(lab.holder() == Some(1), || {
            "node 1 should hold the next hop alone".into()
        });
        let values: Vec<String> = lab
            .lb(0)
            .log()
            .lines()
            .filter(|line| line.contains("announce: health file"))
            .filter_map(|line| line.split_once(" now ").map(|(_, rest)| rest))
            .filter_map(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
            .collect();
        lab.check(values.first().map(String::as_str) == Some("2"), || {
            format!("node 0's lb should write 2 (both VIPs) before its first results: {values:?}")
        });

        // Its checks pass: the file goes to 0, node 0 leaves FAULT and takes the address back.
        let skip = lab.state_counts();
        lab.repair_node0(Failure::Health);
        let backup = lab.wait_for_state(0, VrrpState::Backup, skip[0]);
        let master = lab.wait_for_state(0, VrrpState::Master, skip[0]);
        lab.wait_for_state(1, VrrpState::Backup, skip[1]);
        lab.check(lab.health_value(0) == Some(0), || {
            format!(
                "node 0 is master with health file {:?}",
                lab.health_value(0)
            )
        });
        lab.check(master - backup >= PREEMPT_DELAY, || {
            format!(
                "node 0 preempted {:?} after leaving FAULT, before its preempt delay {PREEMPT_DELAY:?}",
                master - backup
            )
        });
        lab.wait_for("node 0 to hold the next hop alone", WAIT, |lab| {
            lab.holder() == Some(0)
        });
        let answer = lb_tests::servers::tcp_request(
            lab.topology.client(),
            lab.web(),
            NEW_CONNECTION_TIMEOUT,
        )
        .unwrap_or_else(|e| lab.fail(&format!("a new connection through node 0: {e:#}")));
        lab.check(lab.client_next_hop() == Some(0), || {
            format!("the client answered by {answer} but not via node 0")
        });
    }
    assert_eq!(leftovers(prefix), Vec::<String>::new(), "left behind");
}
