//! End to end: health checks and failover under continuous load. The real `lb` binary in the
//! namespace topology with four backends (0, 1, 2 primaries, 3 the standby), TCP checks every
//! 100 ms, `rise = 2`, `fall = 2`. "Killing" a backend closes its server's listener (connects are
//! refused, so its check fails); "restarting" it listens again on the same address.
//!
//! The bound every test holds the load balancer to: a change is live within
//! `interval × fall + interval` of the kill (one interval for the phase of the next check), and a
//! restarted backend takes new connections within `interval × rise + interval` plus some slack.
//!
//! The tests of this file run one at a time (a lock), whatever `--test-threads` says: their
//! timings mean something only on an otherwise quiet machine.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use lb_tests::{
    daemon::{BackendTransition, Launch, LbDaemon},
    load::{Attempt, Load, LoadOptions, LoadRecords, connect_once},
    netns::NetNs,
    servers::{TcpIdentityServer, TcpLineClient},
    topology::{DsrTopology, DsrTopologyOptions, leftovers},
};

const INTERVAL: Duration = Duration::from_millis(100);
const RISE: u32 = 2;
const FALL: u32 = 2;
/// `interval × fall + interval`: from the kill to the change being live.
const BOUND: Duration = INTERVAL.saturating_mul(FALL + 1);
/// `interval × rise + interval` and slack: from the restart to new connections reaching it.
const RISE_BOUND: Duration = INTERVAL
    .saturating_mul(RISE + 1)
    .saturating_add(Duration::from_millis(300));
/// Extra allowed on the detection time in the timing test.
const DETECTION_SLACK: Duration = Duration::from_millis(50);
const PRIMARIES: [usize; 3] = [0, 1, 2];
const STANDBY: usize = 3;
const SERVICE_PORT: u16 = 80;
/// For one-off connections and the long-lived ones.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Deadline of every wait for something the daemon should do within a bound (generous: the
/// assertion on the measured time is separate and says what was measured).
const WAIT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(10);
/// Lines of the daemon's log shown with a failure.
const LOG_TAIL: usize = 40;

/// One test at a time (see the module documentation).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn load_options() -> LoadOptions {
    LoadOptions {
        period: Duration::from_millis(10),
        workers: 2,
        timeout: CONNECT_TIMEOUT,
        long_lived_period: Duration::from_millis(50),
    }
}

/// The topology, a server per backend (None while killed), and `lb run`.
struct Lab {
    // Dropped in this order: daemon, servers, then the namespaces.
    daemon: LbDaemon,
    servers: Vec<Option<TcpIdentityServer>>,
    topology: DsrTopology,
}

/// When a kill happened: `start` before the first server began closing, `done` once every
/// listener was closed (from then on connects are refused), `wall` = `done` on the wall clock.
#[derive(Clone, Copy, Debug)]
struct Kill {
    start: Instant,
    done: Instant,
    wall: SystemTime,
}

fn config(topology: &DsrTopology, on_all_down: &str) -> String {
    let backends: String = topology
        .backend_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let standby = if i == STANDBY { "standby = true\n" } else { "" };
            format!("[[vip.backend]]\naddress = \"{}\"\n{standby}", h.ipv4())
        })
        .collect();
    format!(
        r#"interface = "eth0"
flow_table_size = 65536
max_vips = 4

[[vip]]
name = "web"
address = "{vip}"
port = {SERVICE_PORT}
protocol = "tcp"
min_healthy = 1
on_all_down = "{on_all_down}"

[vip.health]
check = "tcp"
interval = "{interval}ms"
timeout = "{interval}ms"
rise = {RISE}
fall = {FALL}

{backends}"#,
        vip = topology.vip_v4(),
        interval = INTERVAL.as_millis(),
    )
}

fn wildcard() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], SERVICE_PORT))
}

/// Starts a TCP identity server, retrying for a moment if the port is not free yet.
fn start_server(namespace: &NetNs, bind: SocketAddr, identity: &str) -> TcpIdentityServer {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match TcpIdentityServer::start(namespace, bind, identity) {
            Ok(server) => return server,
            Err(error) if Instant::now() < deadline => {
                eprintln!("restarting {identity} on {bind}: {error:#}; retrying");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(error) => panic!("cannot start the server {identity} on {bind}: {error:#}"),
        }
    }
}

impl Lab {
    fn new(prefix: &str, on_all_down: &str, before_daemon: impl FnOnce(&DsrTopology)) -> Self {
        let options = DsrTopologyOptions {
            name_prefix: prefix.to_owned(),
            vips_v6: Vec::new(),
            ..Default::default()
        };
        let topology = DsrTopology::new(4, options).expect("building the namespace topology");
        topology
            .attach_xdp_pass_on_lb_port(lb::ebpf_object(), "xdp_pass")
            .expect("XDP_PASS on the LB's bridge port (DESIGN.md §5 trap 1)");
        let servers = (0..topology.backend_count())
            .map(|i| {
                Some(start_server(
                    topology.backend(i),
                    wildcard(),
                    &topology.backend_host(i).ipv4().to_string(),
                ))
            })
            .collect();
        before_daemon(&topology);
        let daemon = LbDaemon::start(
            topology.lb(),
            &config(&topology, on_all_down),
            Launch::Nsenter,
        )
        .expect("lb run");
        let lab = Self {
            daemon,
            servers,
            topology,
        };
        // Every backend passed its first check before the daemon attached.
        lab.wait_for("every backend up", WAIT, || {
            let up = lab.daemon.transitions();
            (0..lab.topology.backend_count()).all(|i| {
                up.iter()
                    .any(|t| t.backend == lab.identity(i) && t.to == "up")
            })
        });
        lab
    }

    fn vip(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.topology.vip_v4()), SERVICE_PORT)
    }

    fn client(&self) -> &NetNs {
        self.topology.client()
    }

    /// A backend's identity (what its server answers): its IPv4 address.
    fn identity(&self, backend: usize) -> String {
        self.topology.backend_host(backend).ipv4().to_string()
    }

    fn backend_of(&self, identity: &str) -> Option<usize> {
        (0..self.topology.backend_count()).find(|&i| self.identity(i) == identity)
    }

    /// Panics with `message`, the daemon's log tail and `details`.
    #[track_caller]
    fn fail(&self, message: &str) -> ! {
        panic!(
            "{message}\n--- last {LOG_TAIL} lines of the lb log ---\n{}",
            self.daemon.log_tail(LOG_TAIL)
        );
    }

    #[track_caller]
    fn check(&self, condition: bool, message: impl FnOnce() -> String) {
        if !condition {
            self.fail(&message());
        }
    }

    /// Polls `done` every few ms until it holds; fails with context after `timeout`.
    #[track_caller]
    fn wait_for(&self, what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !done() {
            if Instant::now() > deadline {
                self.fail(&format!("timed out after {timeout:?} waiting for {what}"));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Sleeps until `instant` (short sleeps; fails early if the daemon died).
    fn wait_until(&mut self, instant: Instant) {
        while Instant::now() < instant {
            if !self.daemon.is_running() {
                self.fail("lb exited during the test");
            }
            std::thread::sleep((instant - Instant::now()).min(Duration::from_millis(50)));
        }
    }

    /// Closes the servers of `backends` (in parallel, so they die at about the same time).
    fn kill(&mut self, backends: &[usize]) -> Kill {
        let mut doomed = Vec::new();
        for &b in backends {
            doomed.push(
                self.servers[b]
                    .take()
                    .unwrap_or_else(|| panic!("backend {b} is already down")),
            );
        }
        let start = Instant::now();
        std::thread::scope(|scope| {
            for server in doomed {
                scope.spawn(move || drop(server));
            }
        });
        let done = Instant::now();
        Kill {
            start,
            done,
            wall: SystemTime::now(),
        }
    }

    /// Listens again on the killed backends; returns when every listener is bound.
    fn restart(&mut self, backends: &[usize]) -> (Instant, SystemTime) {
        for &b in backends {
            assert!(self.servers[b].is_none(), "backend {b} is running");
            let server = start_server(self.topology.backend(b), wildcard(), &self.identity(b));
            self.servers[b] = Some(server);
        }
        (Instant::now(), SystemTime::now())
    }

    /// The first transition of `backend` to `to` logged after the first `skip` transitions.
    fn transition_after(&self, skip: usize, backend: usize, to: &str) -> Option<BackendTransition> {
        let identity = self.identity(backend);
        self.daemon
            .transitions()
            .into_iter()
            .skip(skip)
            .find(|t| t.backend == identity && t.to == to)
    }

    /// Waits until a transition of `backend` to `to` appears after the first `skip` ones.
    #[track_caller]
    fn wait_for_transition(&self, skip: usize, backend: usize, to: &str) -> BackendTransition {
        let mut found = None;
        self.wait_for(&format!("backend {backend} -> {to}"), WAIT, || {
            found = self.transition_after(skip, backend, to);
            found.is_some()
        });
        found.expect("found above")
    }

    /// Pool flips logged so far (pass to [`Lab::wait_for_pool`] to skip them).
    fn flips(&self) -> usize {
        self.daemon.pool_flips().len()
    }

    /// Waits until the daemon logs, after its first `skip` flips, that the pool went to `to`.
    #[track_caller]
    fn wait_for_pool(&self, skip: usize, to: &str) -> SystemTime {
        let mut at = None;
        self.wait_for(&format!("the pool to flip to {to}"), WAIT, || {
            at = self
                .daemon
                .pool_flips()
                .into_iter()
                .skip(skip)
                .find(|f| f.to == to)
                .map(|f| f.at);
            at.is_some()
        });
        at.expect("found above")
    }

    /// Opens long-lived connections until every backend in `wanted` has at least `each` that
    /// are alive in `load`, handing them to `load`; connections that landed elsewhere are
    /// closed.
    fn long_lived_to_each(&self, load: &Load, wanted: &[usize], each: usize) {
        for _ in 0..200 {
            let alive = load.long_lived();
            let missing: Vec<usize> = wanted
                .iter()
                .copied()
                .filter(|&b| {
                    alive
                        .iter()
                        .filter(|l| l.alive() && l.expected == self.identity(b))
                        .count()
                        < each
                })
                .collect();
            if missing.is_empty() {
                return;
            }
            let mut client = TcpLineClient::connect(self.client(), self.vip(), CONNECT_TIMEOUT)
                .unwrap_or_else(|e| self.fail(&format!("opening a long-lived connection: {e:#}")));
            let identity = client.request("hello").unwrap_or_else(|e| {
                self.fail(&format!("first request of a long-lived connection: {e:#}"))
            });
            let backend = self.backend_of(&identity);
            if backend.is_some_and(|b| missing.contains(&b)) {
                load.add_long_lived(client, identity);
            }
        }
        self.fail(&format!(
            "could not open a long-lived connection to each of backends {wanted:?} in 200 tries"
        ));
    }
}

/// Answers per identity and failures of a set of attempts, for messages.
fn summary(attempts: &[&Attempt]) -> String {
    let mut per: BTreeMap<&str, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    for a in attempts {
        match &a.result {
            Ok(identity) => *per.entry(identity.as_str()).or_default() += 1,
            Err(failure) => failures.push(failure.text.as_str()),
        }
    }
    let mut text = format!("{} attempts: {per:?}", attempts.len());
    if !failures.is_empty() {
        let shown: Vec<&str> = failures.iter().take(5).copied().collect();
        let _ = write!(text, "; {} failed, e.g. {shown:?}", failures.len());
    }
    text
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Signed milliseconds from `from` to `to` on the wall clock.
fn wall_ms(from: SystemTime, to: SystemTime) -> f64 {
    match to.duration_since(from) {
        Ok(d) => ms(d),
        Err(e) => -ms(e.duration()),
    }
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

/// `value` with one decimal, or `null` when it is not a number (JSON has no NaN).
fn json_number(value: f64) -> String {
    if value.is_finite() {
        format!("{value:.1}")
    } else {
        "null".to_owned()
    }
}

fn worst(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NAN, f64::max)
}

/// Long-lived connections to `backend`: none broke, none answered from elsewhere.
fn check_long_lived_intact(lab: &Lab, records: &LoadRecords, backends: &[usize]) -> usize {
    let mut checked = 0;
    for b in backends {
        let identity = lab.identity(*b);
        for l in records.long_lived.iter().filter(|l| l.expected == identity) {
            checked += 1;
            lab.check(l.alive() && l.moved().is_empty(), || {
                format!(
                    "long-lived connection {} to backend {b} ({identity}) broke or moved: broken {:?}, \
                     moved to {:?}",
                    l.index,
                    l.broken().map(|a| a.result.clone()),
                    l.moved().iter().map(|a| a.result.clone()).collect::<Vec<_>>()
                )
            });
        }
    }
    checked
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn killing_one_primary_stops_new_flows_to_it_within_the_bound_and_breaks_nothing_else() {
    let _serial = serial();
    let prefix = "lbfo1";
    {
        let mut lab = Lab::new(prefix, "drop", |_| {});
        let load = Load::start(lab.client(), lab.vip(), load_options()).expect("load");
        lab.long_lived_to_each(&load, &PRIMARIES, 1);
        lab.wait_for("baseline load", WAIT, || {
            let all = load.new_connections();
            PRIMARIES.iter().all(|&b| {
                all.iter()
                    .any(|a| a.identity() == Some(lab.identity(b).as_str()))
            })
        });

        let transitions_before = lab.daemon.transitions().len();
        let flips = lab.flips();
        let kill = lab.kill(&[0]);
        let down = lab.wait_for_transition(transitions_before, 0, "down");
        let detection = wall_ms(kill.wall, down.at);
        lab.wait_until(kill.done + Duration::from_millis(1500));

        let after_kill = load.new_connections();
        let settled = kill.done + BOUND;
        let late: Vec<&Attempt> = after_kill.iter().filter(|a| a.start >= settled).collect();
        let healthy = [lab.identity(1), lab.identity(2)];
        lab.check(
            late.len() > 20
                && late.iter().all(|a| {
                    a.identity()
                        .is_some_and(|i| healthy.contains(&i.to_owned()))
                }),
            || {
                format!(
                    "new connections that started {BOUND:?} after the kill did not all reach \
                     primaries 1 and 2: {}",
                    summary(&late)
                )
            },
        );
        // Failures are allowed only around the kill, and only of the kind the dead backend
        // causes: refused connects (or a connection cut while its server was closing).
        let window_failures: Vec<&Attempt> = after_kill
            .iter()
            .filter(|a| a.failed() && a.overlaps(kill.start, settled))
            .collect();
        let timeouts: Vec<&Attempt> = window_failures
            .iter()
            .copied()
            .filter(|a| {
                a.result
                    .as_ref()
                    .err()
                    .is_some_and(|f| f.kind == std::io::ErrorKind::TimedOut)
            })
            .collect();
        lab.check(timeouts.is_empty(), || {
            format!(
                "connections timed out in the kill window (the dead backend refuses or resets, \
                 it does not stay silent): {}",
                summary(&timeouts)
            )
        });
        let other_failures: Vec<&Attempt> = after_kill
            .iter()
            .filter(|a| a.failed() && !a.overlaps(kill.start, settled))
            .collect();
        lab.check(other_failures.is_empty(), || {
            format!(
                "new connections failed outside the kill window: {}",
                summary(&other_failures)
            )
        });
        lab.check(lab.flips() == flips, || {
            "the pool flipped although min_healthy was still met".into()
        });

        // Back: new connections reach primary 0 again, nothing fails.
        let transitions_before = lab.daemon.transitions().len();
        let (restarted, restarted_wall) = lab.restart(&[0]);
        let up = lab.wait_for_transition(transitions_before, 0, "up");
        let zero = lab.identity(0);
        let mut first_to_zero = None;
        lab.wait_for(
            "a new connection to reach the restarted primary 0",
            WAIT,
            || {
                first_to_zero = load
                    .new_connections_since(restarted)
                    .iter()
                    .filter(|a| a.identity() == Some(zero.as_str()))
                    .map(|a| a.start)
                    .min();
                first_to_zero.is_some()
            },
        );
        let back_after = first_to_zero.expect("found above") - restarted;
        lab.wait_until(Instant::now() + Duration::from_millis(500));
        let records = load.stop();

        lab.check(back_after <= RISE_BOUND, || {
            format!("new connections reached primary 0 only {back_after:?} after its restart (bound {RISE_BOUND:?})")
        });
        let since_settled: Vec<&Attempt> = records
            .new_connections
            .iter()
            .filter(|a| a.start >= settled)
            .collect();
        lab.check(since_settled.iter().all(|a| !a.failed()), || {
            format!(
                "new connections failed after the kill window: {}",
                summary(&since_settled)
            )
        });
        // fall = rise = 2: the first failed (passed) check announced the change, so both went
        // live with the table prepared then (no Maglev build in the deciding result's publish).
        lab.check(down.prepared && up.prepared, || {
            format!(
                "the changes did not use a prepared table (down {}, up {}): {down:?} {up:?}",
                down.prepared, up.prepared
            )
        });
        let standby = lab.identity(STANDBY);
        lab.check(
            !records
                .new_connections
                .iter()
                .any(|a| a.identity() == Some(standby.as_str())),
            || "the standby got new connections although 2 of 3 primaries were up".into(),
        );
        let intact = check_long_lived_intact(&lab, &records, &[1, 2]);
        lab.check(intact >= 2, || {
            format!("only {intact} long-lived connections to primaries 1 and 2")
        });
        let broken_zero = records
            .long_lived
            .iter()
            .filter(|l| l.expected == zero && !l.alive())
            .count();
        let all: Vec<&Attempt> = records.new_connections.iter().collect();
        println!(
            "one primary killed: detection {detection:.1} ms (daemon log), map updated in {:?} \
             (prepared: {}); \
             up again {:.1} ms after the restart, first new connection to it after {back_after:?}; \
             {} new connections ({}), {} failed in the kill window [{}]; {intact} long-lived \
             connections to primaries 1 and 2 intact, {broken_zero} to primary 0 cut by the kill",
            down.map_update,
            down.prepared,
            wall_ms(restarted_wall, up.at),
            all.len(),
            summary(&all),
            window_failures.len(),
            window_failures
                .iter()
                .take(3)
                .map(|a| a.result.clone().err().map(|f| f.text).unwrap_or_default())
                .collect::<Vec<_>>()
                .join("; "),
        );
    }
    assert_eq!(leftovers(prefix), Vec::<String>::new(), "left behind");
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn killing_all_primaries_flips_to_the_standby_and_back() {
    let _serial = serial();
    let prefix = "lbfo2";
    {
        let mut lab = Lab::new(prefix, "drop", |_| {});
        let load = Load::start(lab.client(), lab.vip(), load_options()).expect("load");
        lab.wait_for("baseline load", WAIT, || load.new_connections().len() >= 20);

        let flips = lab.flips();
        let kill = lab.kill(&PRIMARIES);
        let flipped_at = lab.wait_for_pool(flips, "standby");
        let settled = kill.done + BOUND;
        // Long-lived connections opened while the standby serves.
        lab.wait_until(settled);
        lab.long_lived_to_each(&load, &[STANDBY], 2);
        lab.wait_until(kill.done + Duration::from_millis(1500));

        let standby = lab.identity(STANDBY);
        let during = load.new_connections();
        let late: Vec<&Attempt> = during.iter().filter(|a| a.start >= settled).collect();
        lab.check(
            late.len() > 20 && late.iter().all(|a| a.identity() == Some(standby.as_str())),
            || {
                format!(
                    "new connections that started {BOUND:?} after all primaries died did not all \
                     reach the standby: {}",
                    summary(&late)
                )
            },
        );
        let outside: Vec<&Attempt> = during
            .iter()
            .filter(|a| a.failed() && !a.overlaps(kill.start, settled))
            .collect();
        lab.check(outside.is_empty(), || {
            format!("failures outside the kill window: {}", summary(&outside))
        });

        let flips = lab.flips();
        let (restarted, restarted_wall) = lab.restart(&PRIMARIES);
        let back_at = lab.wait_for_pool(flips, "primary");
        let primaries: Vec<String> = PRIMARIES.iter().map(|&b| lab.identity(b)).collect();
        let mut first_back = None;
        lab.wait_for("new connections to reach a primary again", WAIT, || {
            first_back = load
                .new_connections_since(restarted)
                .iter()
                .filter(|a| {
                    a.identity()
                        .is_some_and(|i| primaries.iter().any(|p| p == i))
                })
                .map(|a| a.start)
                .min();
            first_back.is_some()
        });
        let back_after = first_back.expect("found above") - restarted;
        let back_settled = restarted + RISE_BOUND;
        lab.wait_until(back_settled + Duration::from_millis(700));
        let records = load.stop();

        lab.check(back_after <= RISE_BOUND, || {
            format!("new connections reached the primaries only {back_after:?} after their restart (bound {RISE_BOUND:?})")
        });
        let after_back: Vec<&Attempt> = records
            .new_connections
            .iter()
            .filter(|a| a.start >= back_settled)
            .collect();
        lab.check(
            !after_back.is_empty()
                && after_back.iter().all(|a| {
                    a.identity()
                        .is_some_and(|i| primaries.iter().any(|p| p == i))
                }),
            || {
                format!(
                    "after the flip back, new connections did not all reach the primaries: {}",
                    summary(&after_back)
                )
            },
        );
        let since_settled: Vec<&Attempt> = records
            .new_connections
            .iter()
            .filter(|a| a.start >= settled)
            .collect();
        lab.check(since_settled.iter().all(|a| !a.failed()), || {
            format!(
                "new connections failed after the kill window: {}",
                summary(&since_settled)
            )
        });
        let intact = check_long_lived_intact(&lab, &records, &[STANDBY]);
        lab.check(intact >= 2, || {
            format!("only {intact} long-lived connections to the standby")
        });
        for l in records.long_lived.iter().filter(|l| l.expected == standby) {
            lab.check(l.last_answer().is_some_and(|t| t > back_settled), || {
                format!(
                    "long-lived connection {} to the standby got no answer after the flip back",
                    l.index
                )
            });
        }
        let window: Vec<&Attempt> = records
            .new_connections
            .iter()
            .filter(|a| a.failed())
            .collect();
        println!(
            "all primaries killed: pool -> standby {:.1} ms after the kill, -> primary {:.1} ms \
             after the restart; first new connection to a primary {back_after:?} after it; \
             {} new connections, {} failed (all in the kill window); {intact} long-lived \
             connections opened to the standby kept it across the flip back",
            wall_ms(kill.wall, flipped_at),
            wall_ms(restarted_wall, back_at),
            records.new_connections.len(),
            window.len(),
        );
    }
    assert_eq!(leftovers(prefix), Vec::<String>::new(), "left behind");
}

/// Connects every 20 ms until an attempt answers with `identity`; returns the first such.
fn poll_until_answer(lab: &Lab, identity: &str, timeout: Duration) -> Attempt {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = connect_once(lab.client(), lab.vip(), Duration::from_millis(200))
            .expect("client namespace");
        if attempt.identity() == Some(identity) {
            return attempt;
        }
        if Instant::now() > deadline {
            lab.fail(&format!(
                "no answer from {identity} within {timeout:?}; last attempt: {:?}",
                attempt.result
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `count` one-off connections in parallel threads (each in the client namespace).
fn parallel_attempts(lab: &Lab, count: usize, timeout: Duration) -> Vec<Attempt> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..count)
            .map(|_| scope.spawn(|| connect_once(lab.client(), lab.vip(), timeout)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("attempt thread").expect("client namespace"))
            .collect()
    })
}

fn all_down_then_one_back(on_all_down: &str, prefix: &str) {
    let _serial = serial();
    let sorry = "sorry";
    {
        let pass = on_all_down == "pass";
        let mut host_server = None;
        let mut lab = Lab::new(prefix, on_all_down, |topology| {
            if pass {
                // The LB host answers for the VIP itself when the program passes the packets.
                topology
                    .lb()
                    .ip([
                        "addr",
                        "add",
                        &format!("{}/32", topology.vip_v4()),
                        "dev",
                        "lo",
                    ])
                    .expect("VIP on the LB's lo");
                host_server = Some(start_server(
                    topology.lb(),
                    SocketAddr::new(IpAddr::V4(topology.vip_v4()), SERVICE_PORT),
                    sorry,
                ));
            }
        });
        let before = parallel_attempts(&lab, 6, CONNECT_TIMEOUT);
        let before_refs: Vec<&Attempt> = before.iter().collect();
        lab.check(
            before
                .iter()
                .all(|a| a.identity().is_some_and(|i| lab.backend_of(i).is_some())),
            || {
                format!(
                    "before the kill, not every connection reached a backend: {}",
                    summary(&before_refs)
                )
            },
        );

        let flips = lab.flips();
        let kill = lab.kill(&[0, 1, 2, STANDBY]);
        let none_at = lab.wait_for_pool(flips, "none");
        let none_after = wall_ms(kill.wall, none_at);
        lab.wait_until(kill.done + BOUND + Duration::from_millis(100));
        let during = parallel_attempts(&lab, 4, CONNECT_TIMEOUT);
        let during_refs: Vec<&Attempt> = during.iter().collect();
        if pass {
            lab.check(during.iter().all(|a| a.identity() == Some(sorry)), || {
                format!(
                    "with on_all_down = pass the LB host should answer every connection: {}",
                    summary(&during_refs)
                )
            });
        } else {
            lab.check(
                during.iter().all(|a| {
                    a.result
                        .as_ref()
                        .err()
                        .is_some_and(|f| f.timed_out_connecting())
                }),
                || {
                    format!(
                        "with on_all_down = drop every connect should time out (no answer, no RST): {}",
                        summary(&during_refs)
                    )
                },
            );
        }

        let (restarted, _) = lab.restart(&[0]);
        let zero = lab.identity(0);
        let first = poll_until_answer(&lab, &zero, WAIT);
        let back_after = first.end.saturating_duration_since(restarted);
        let after = parallel_attempts(&lab, 6, CONNECT_TIMEOUT);
        let after_refs: Vec<&Attempt> = after.iter().collect();
        lab.check(
            after.iter().all(|a| a.identity() == Some(zero.as_str())),
            || {
                format!(
                    "with only primary 0 back, every new connection should reach it: {}",
                    summary(&after_refs)
                )
            },
        );
        lab.check(
            back_after <= RISE_BOUND + Duration::from_millis(200),
            || format!("primary 0 answered only {back_after:?} after its restart"),
        );
        let Lab {
            daemon,
            servers,
            topology,
        } = lab;
        let counters = daemon.stop().expect("lb stops cleanly");
        let reason = if pass {
            "pass_all_down"
        } else {
            "drop_no_backend"
        };
        let counted = counters.reasons.get(reason).copied().unwrap_or(0);
        assert!(
            counted > 0,
            "the LB counted no {reason} packets: {:?}",
            counters.reasons
        );
        println!(
            "on_all_down = {on_all_down}: pool -> none {none_after:.1} ms after the kill; while all \
             were down: {}; primary 0 answered again {back_after:?} after its restart; LB counted \
             {counted} {reason} packets",
            summary(&during_refs)
        );
        drop(servers);
        drop(host_server);
        drop(topology);
    }
    assert_eq!(leftovers(prefix), Vec::<String>::new(), "left behind");
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn with_drop_nothing_answers_while_all_are_down() {
    all_down_then_one_back("drop", "lbfo3");
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn with_pass_the_host_answers_while_all_are_down() {
    all_down_then_one_back("pass", "lbfo4");
}

/// One kill and restart of the timing test.
struct Round {
    backend: usize,
    kill: Kill,
    restarted: Instant,
    /// Kill (listener closed) to the daemon's "-> down" log line.
    detection_ms: f64,
    /// The daemon's "map updated in" of that line.
    map_update_us: u64,
    /// Restart (listening again) to the "-> up" log line.
    rise_ms: f64,
    /// The down transition as an `Instant` (for attributing failures).
    down_at: Instant,
    /// The daemon's "map updated in" of the "-> up" line.
    up_map_update_us: u64,
    /// How many of the two changes went live with a table prepared on the check before.
    prepared: usize,
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn failover_timing_over_20_failovers() {
    const ROUNDS: usize = 20;
    let _serial = serial();
    let prefix = "lbfo5";
    {
        let mut lab = Lab::new(prefix, "drop", |_| {});
        let load = Load::start(lab.client(), lab.vip(), load_options()).expect("load");
        let flips = lab.flips();
        let mut rounds = Vec::with_capacity(ROUNDS);
        for round in 0..ROUNDS {
            let backend = PRIMARIES[round % PRIMARIES.len()];
            lab.long_lived_to_each(&load, &PRIMARIES, 1);
            let skip = lab.daemon.transitions().len();
            let kill = lab.kill(&[backend]);
            let down = lab.wait_for_transition(skip, backend, "down");
            let detection = wall_ms(kill.wall, down.at);
            let down_at = if detection >= 0.0 {
                kill.done + Duration::from_secs_f64(detection / 1000.0)
            } else {
                kill.done
            };
            let skip = lab.daemon.transitions().len();
            let (restarted, restarted_wall) = lab.restart(&[backend]);
            let up = lab.wait_for_transition(skip, backend, "up");
            rounds.push(Round {
                backend,
                kill,
                restarted,
                detection_ms: detection,
                map_update_us: down.map_update.as_micros() as u64,
                rise_ms: wall_ms(restarted_wall, up.at),
                up_map_update_us: up.map_update.as_micros() as u64,
                down_at,
                prepared: usize::from(down.prepared) + usize::from(up.prepared),
            });
        }
        lab.wait_until(Instant::now() + Duration::from_millis(300));
        let records = load.stop();

        // Attribute every failure.
        let mut in_window = [0usize; ROUNDS];
        let mut late_detection = 0usize;
        let mut to_healthy = Vec::new();
        for a in records.new_connections.iter().filter(|a| a.failed()) {
            if let Some(r) = rounds
                .iter()
                .position(|r| a.overlaps(r.kill.start, r.kill.done + BOUND))
            {
                in_window[r] += 1;
            } else if rounds
                .iter()
                .any(|r| a.overlaps(r.kill.done + BOUND, r.down_at))
            {
                late_detection += 1;
            } else {
                to_healthy.push(a.clone());
            }
        }
        let mut long_lived_cut = 0usize;
        for l in &records.long_lived {
            let Some(broken) = l.broken() else { continue };
            let killed = lab.backend_of(&l.expected);
            let expected = rounds.iter().any(|r| {
                Some(r.backend) == killed
                    && broken.overlaps(r.kill.start, r.restarted + CONNECT_TIMEOUT)
            });
            if expected {
                long_lived_cut += 1;
            } else {
                to_healthy.push(broken.clone());
            }
            for moved in l.moved() {
                to_healthy.push(moved.clone());
            }
        }

        let detections: Vec<f64> = rounds.iter().map(|r| r.detection_ms).collect();
        let updates: Vec<f64> = rounds.iter().map(|r| r.map_update_us as f64).collect();
        let rises: Vec<f64> = rounds.iter().map(|r| r.rise_ms).collect();
        let up_updates: Vec<f64> = rounds.iter().map(|r| r.up_map_update_us as f64).collect();
        // Restart to the start of the first new connection that the backend answered.
        let back: Vec<f64> = rounds
            .iter()
            .map(|r| {
                let identity = lab.identity(r.backend);
                records
                    .new_connections
                    .iter()
                    .filter(|a| a.start >= r.restarted && a.identity() == Some(identity.as_str()))
                    .map(|a| ms(a.start - r.restarted))
                    .fold(f64::NAN, f64::min)
            })
            .collect();
        // New connections that started after the "-> up" line and before the first one back,
        // all answered by the other primaries (about 2 expected: the backend gets 1/3 of them).
        let others_first: Vec<usize> = rounds
            .iter()
            .zip(&back)
            .map(|(r, &back_ms)| {
                let up = r.restarted + Duration::from_secs_f64(r.rise_ms.max(0.0) / 1000.0);
                let first = r.restarted + Duration::from_secs_f64(back_ms.max(0.0) / 1000.0);
                records
                    .new_connections
                    .iter()
                    .filter(|a| a.start >= up && a.start < first)
                    .count()
            })
            .collect();
        let kill_durations: Vec<f64> = rounds
            .iter()
            .map(|r| ms(r.kill.done - r.kill.start))
            .collect();
        let total = records.new_connections.len();
        let failed_total = records
            .new_connections
            .iter()
            .filter(|a| a.failed())
            .count();
        let window_total: usize = in_window.iter().sum();

        let mut table = String::from(
            "round backend  kill(ms)  detection(ms)  map update(us)  up after restart(ms)  \
             map update(us)  first flow back(ms)  others first  failed in window\n",
        );
        for (i, r) in rounds.iter().enumerate() {
            let _ = writeln!(
                table,
                "{i:>5} {:>7}  {:>8.1}  {:>13.1}  {:>14}  {:>20.1}  {:>14}  {:>19.1}  {:>12}  {:>16}",
                r.backend,
                ms(r.kill.done - r.kill.start),
                r.detection_ms,
                r.map_update_us,
                r.rise_ms,
                r.up_map_update_us,
                back[i],
                others_first[i],
                in_window[i]
            );
        }
        let _ = writeln!(
            table,
            "detection: median {:.1} ms, worst {:.1} ms (bound {} ms + {} ms slack); \
             map update: median {:.0} us, worst {:.0} us; up after restart: median {:.1} ms, \
             worst {:.1} ms, map update median {:.0} us, worst {:.0} us; first new connection \
             back: median {:.1} ms, worst {:.1} ms after the restart; killing took median {:.1} ms",
            median(&detections),
            worst(&detections),
            BOUND.as_millis(),
            DETECTION_SLACK.as_millis(),
            median(&updates),
            worst(&updates),
            median(&rises),
            worst(&rises),
            median(&up_updates),
            worst(&up_updates),
            median(&back),
            worst(&back),
            median(&kill_durations),
        );
        let _ = writeln!(
            table,
            "new connections: {total}, failed {failed_total}: {window_total} in the kill windows \
             (to the dead backend), {late_detection} after the bound but before the detection, \
             {} to healthy backends; long-lived connections: {} opened, {long_lived_cut} cut \
             because their backend was killed",
            to_healthy.len(),
            records.long_lived.len(),
        );
        println!("{table}");

        let prepared: usize = rounds.iter().map(|r| r.prepared).sum();
        let json = format!(
            "{{\n  \"rounds\": {ROUNDS},\n  \"interval_ms\": {},\n  \"fall\": {FALL},\n  \"rise\": {RISE},\n  \
             \"bound_ms\": {},\n  \"detection_ms\": {{ \"median\": {:.1}, \"worst\": {:.1}, \"all\": [{}] }},\n  \
             \"map_update_us\": {{ \"median\": {:.0}, \"worst\": {:.0}, \"all\": [{}] }},\n  \
             \"up_after_restart_ms\": {{ \"median\": {:.1}, \"worst\": {:.1} }},\n  \
             \"map_update_up_us\": {{ \"median\": {:.0}, \"worst\": {:.0} }},\n  \
             \"first_connection_back_ms\": {{ \"median\": {}, \"worst\": {} }},\n  \
             \"lb_binary\": \"{}\",\n  \"ring_size\": 65537,\n  \
             \"new_connections\": {total},\n  \"failed_connections\": {failed_total},\n  \
             \"failed_in_kill_windows\": {window_total},\n  \"failed_after_bound_before_detection\": {late_detection},\n  \
             \"failed_to_healthy_backends\": {},\n  \"long_lived_connections\": {},\n  \
             \"long_lived_cut_by_kill\": {long_lived_cut},\n  \
             \"changes_with_a_prepared_table\": {prepared}\n}}\n",
            INTERVAL.as_millis(),
            BOUND.as_millis(),
            median(&detections),
            worst(&detections),
            detections
                .iter()
                .map(|d| format!("{d:.1}"))
                .collect::<Vec<_>>()
                .join(", "),
            median(&updates),
            worst(&updates),
            updates
                .iter()
                .map(|d| format!("{d:.0}"))
                .collect::<Vec<_>>()
                .join(", "),
            median(&rises),
            worst(&rises),
            median(&up_updates),
            worst(&up_updates),
            json_number(median(&back)),
            json_number(worst(&back)),
            lb_tests::daemon::lb_binary().display(),
            to_healthy.len(),
            records.long_lived.len(),
        );
        // The workspace's target directory (tests/ is one level below the workspace root).
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
                manifest.parent().unwrap_or(manifest).join("target")
            });
        let path = target.join("failover-timing.json");
        match std::fs::write(&path, &json) {
            Ok(()) => println!("wrote {}", path.display()),
            Err(e) => eprintln!("cannot write {}: {e}", path.display()),
        }

        let slow: Vec<(usize, f64)> = rounds
            .iter()
            .enumerate()
            .filter(|(_, r)| r.detection_ms > ms(BOUND + DETECTION_SLACK))
            .map(|(i, r)| (i, r.detection_ms))
            .collect();
        lab.check(slow.is_empty(), || {
            format!("detections over the bound (round, ms): {slow:?}\n{table}")
        });
        lab.check(to_healthy.is_empty(), || {
            let shown: Vec<&Attempt> = to_healthy.iter().take(10).collect();
            format!(
                "{} failed connections to healthy backends, e.g. {shown:?}\n{table}",
                to_healthy.len()
            )
        });
        lab.check(late_detection == 0, || {
            format!("failures after the bound\n{table}")
        });
        lab.check(lab.flips() == flips, || {
            "the pool flipped although two primaries were always up".into()
        });
    }
    assert_eq!(leftovers(prefix), Vec::<String>::new(), "left behind");
}
