//! Each checker against loopback servers written here (plain `cargo test`, no root), and one test
//! against servers in a second network namespace (root: `cargo xtask test`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::*;
use crate::testing::netns::{self, End, run};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const LOCALHOST_V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

/// Slack for scheduling on a busy test machine.
const SLACK: Duration = Duration::from_millis(150);

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

fn target(address: SocketAddr) -> CheckTarget {
    CheckTarget::new(address.ip(), address.port())
}

/// A TCP port on `ip` with nothing listening: bound, then released.
async fn free_tcp_port(ip: IpAddr) -> u16 {
    let listener = TcpListener::bind((ip, 0)).await.expect("bind");
    listener.local_addr().expect("local_addr").port()
}

/// A UDP port on `ip` with nothing bound: bound, then released.
async fn free_udp_port(ip: IpAddr) -> u16 {
    let socket = UdpSocket::bind((ip, 0)).await.expect("bind");
    socket.local_addr().expect("local_addr").port()
}

/// Runs `check` and asserts `healthy`, `reason` and that the latency is within `latency`.
async fn assert_check(
    check: &dyn HealthCheck,
    target: &CheckTarget,
    timeout: Duration,
    healthy: bool,
    reason: &str,
    latency: std::ops::Range<Duration>,
) -> CheckOutcome {
    let started = Instant::now();
    let outcome = check.check(target, timeout).await;
    let wall = started.elapsed();
    assert_eq!(
        (outcome.healthy, outcome.reason.as_str()),
        (healthy, reason),
        "{} check of {target:?}: {outcome:?}",
        check.kind()
    );
    assert!(
        latency.contains(&outcome.latency),
        "{} check of {target:?}: latency {:?} not in {latency:?}",
        check.kind(),
        outcome.latency
    );
    // The check returned when it said it did.
    assert!(
        wall < outcome.latency + SLACK,
        "{} check took {wall:?}, reported {:?}",
        check.kind(),
        outcome.latency
    );
    outcome
}

// ---------------------------------------------------------------------------------------------
// Shared pieces
// ---------------------------------------------------------------------------------------------

#[test]
fn durations_are_formatted_with_one_short_unit() {
    for (duration, text) in [
        (Duration::ZERO, "0s"),
        (ms(500), "500ms"),
        (ms(1000), "1s"),
        (ms(1500), "1.5s"),
        (ms(2250), "2.25s"),
        (ms(90_000), "90s"),
        (Duration::from_micros(1500), "1.5ms"),
        (Duration::from_micros(250), "250us"),
        (Duration::from_nanos(1_000_000_001), "1.000000001s"),
        (Duration::from_nanos(7), "7ns"),
    ] {
        assert_eq!(format_duration(duration), text, "{duration:?}");
    }
    assert_eq!(
        CheckOutcome::timed_out(ms(300), ms(301)).reason,
        "timeout after 300ms"
    );
}

#[test]
fn socket_errors_have_short_reasons() {
    let reason = |code| io_reason(&std::io::Error::from_raw_os_error(code));
    assert_eq!(reason(libc::ECONNREFUSED), "connection refused");
    assert_eq!(reason(libc::ENETUNREACH), "network unreachable");
    assert_eq!(reason(libc::EHOSTUNREACH), "host unreachable");
    assert_eq!(reason(libc::ECONNRESET), "Connection reset by peer");
    assert_eq!(
        io_reason(&std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        "connection refused"
    );
}

#[tokio::test]
async fn kinds_and_trait_objects() {
    let checks: Vec<Box<dyn HealthCheck>> = vec![
        Box::new(TcpCheck),
        Box::new(HttpCheck {
            path: "/".into(),
            expect_status: vec![200],
            host: None,
        }),
        Box::new(UdpCheck {
            send: b"ping".to_vec(),
            expect: None,
        }),
        Box::new(ExecCheck {
            command: vec!["true".into()],
            vip_name: "web".into(),
        }),
        Box::new(NoneCheck),
    ];
    let kinds: Vec<_> = checks.iter().map(|check| check.kind()).collect();
    assert_eq!(kinds, ["tcp", "http", "udp", "exec", "none"]);
}

#[tokio::test]
async fn none_is_always_healthy() {
    // Even for a target nobody answers on.
    let target = CheckTarget::new(LOCALHOST, free_tcp_port(LOCALHOST).await);
    let outcome = NoneCheck.check(&target, ms(100)).await;
    assert_eq!(
        outcome,
        CheckOutcome {
            healthy: true,
            reason: "no check".into(),
            latency: Duration::ZERO,
        }
    );
}

// ---------------------------------------------------------------------------------------------
// TCP
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn tcp_connect_to_a_listener_passes() {
    for ip in [LOCALHOST, LOCALHOST_V6] {
        let listener = TcpListener::bind((ip, 0)).await.expect("bind");
        let target = target(listener.local_addr().expect("local_addr"));
        assert_check(
            &TcpCheck,
            &target,
            ms(1000),
            true,
            "ok",
            Duration::ZERO..ms(100),
        )
        .await;
        // The check reset its connection at once (no TIME_WAIT on our side): the server reads
        // the reset.
        let (mut accepted, _) = listener.accept().await.expect("accept");
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(ms(500), accepted.read(&mut buf)).await;
        assert!(
            matches!(&read, Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{read:?}"
        );
    }
}

/// The checker's sockets in TIME_WAIT: those whose remote end is `port` (the backend's; a
/// backend's own TIME_WAIT, after it closed first, is on the backend, not the load balancer).
fn time_wait_sockets(port: u16) -> usize {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|text| text.lines().skip(1).map(str::to_owned).collect::<Vec<_>>())
        .filter(|line| {
            // `sl local_address rem_address st ...`, addresses as HEXIP:HEXPORT, st 06 = TIME_WAIT.
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port_of = |address: &str| {
                address
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            fields.len() > 3 && fields[3] == "06" && port_of(fields[2]) == Some(port)
        })
        .count()
}

/// A backend as real servers behave: it answers `reply` (if any) to whatever it reads first, then
/// reads until the client closes, and closes too. So the client is the first to close, and with a
/// FIN its socket would go to TIME_WAIT.
async fn serve_until_the_client_closes(listener: TcpListener, reply: &'static [u8]) {
    while let Ok((mut stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            if !reply.is_empty() {
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(reply).await;
            }
            while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
        });
    }
}

#[tokio::test]
async fn tcp_and_http_checks_leave_no_time_wait_sockets() {
    const CHECKS: usize = 20;
    // An HTTP answer whose body is still to come: the check stops reading after the status.
    const HTTP_REPLY: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\npartial";
    for (what, reply) in [("tcp", &b""[..]), ("http", HTTP_REPLY)] {
        let listener = TcpListener::bind((LOCALHOST, 0)).await.expect("bind");
        let target = target(listener.local_addr().expect("local_addr"));
        let serving = tokio::spawn(serve_until_the_client_closes(listener, reply));
        for _ in 0..CHECKS {
            let outcome = if reply.is_empty() {
                TcpCheck.check(&target, ms(1000)).await
            } else {
                http("/", &[200], None).check(&target, ms(1000)).await
            };
            assert!(outcome.healthy, "{what}: {outcome:?}");
        }
        // Give the backend's side its moment to close after the check's.
        tokio::time::sleep(ms(100)).await;
        assert_eq!(
            time_wait_sockets(target.port),
            0,
            "{what} checks left TIME_WAIT sockets to port {}",
            target.port
        );
        serving.abort();
    }
}

#[tokio::test]
async fn tcp_without_a_listener_is_refused() {
    let target = CheckTarget::new(LOCALHOST, free_tcp_port(LOCALHOST).await);
    assert_check(
        &TcpCheck,
        &target,
        ms(1000),
        false,
        "connection refused",
        Duration::ZERO..ms(100),
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// What the test HTTP server does after reading a request's head.
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// Answers with this status and a short body.
    Status(u16),
    /// Holds the connection open and never answers.
    Never,
    /// Closes the connection without answering.
    Close,
    /// Sends a 200 with its headers and the start of a long body, then nothing more.
    EndlessBody,
}

/// A request as the server saw it.
#[derive(Debug)]
struct SeenRequest {
    request_line: String,
    host: Option<String>,
}

/// Serves `answer` on `listener` until dropped. With `want_host`, a request with another `Host`
/// gets 400 (and the test also checks what `requests` saw).
async fn serve_http(
    listener: TcpListener,
    answer: Answer,
    want_host: Option<String>,
    requests: mpsc::UnboundedSender<SeenRequest>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let want_host = want_host.clone();
        let requests = requests.clone();
        tokio::spawn(async move {
            let _ = answer_http(stream, answer, want_host, requests).await;
        });
    }
}

async fn answer_http(
    mut stream: TcpStream,
    answer: Answer,
    want_host: Option<String>,
    requests: mpsc::UnboundedSender<SeenRequest>,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() > 16 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_owned();
    let host = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("host"))
        .map(|(_, value)| value.trim().to_owned());
    let host_ok = want_host.is_none() || want_host == host;
    let _ = requests.send(SeenRequest { request_line, host });
    match answer {
        Answer::Status(_) if !host_ok => {
            stream
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .await?;
        }
        Answer::Status(status) => {
            let response = format!(
                "HTTP/1.1 {status} Whatever\r\ncontent-length: 4\r\nconnection: close\r\n\r\nbody"
            );
            stream.write_all(response.as_bytes()).await?;
        }
        Answer::Never => std::future::pending::<()>().await,
        Answer::Close => return Ok(()),
        Answer::EndlessBody => {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100000000\r\n\r\nthe start")
                .await?;
            std::future::pending::<()>().await;
        }
    }
    stream.shutdown().await
}

/// A test HTTP server on `ip`, stopped when dropped.
struct HttpServer {
    address: SocketAddr,
    requests: mpsc::UnboundedReceiver<SeenRequest>,
    task: JoinHandle<()>,
}

impl HttpServer {
    async fn start(ip: IpAddr, answer: Answer, want_host: Option<&str>) -> Self {
        let listener = TcpListener::bind((ip, 0)).await.expect("bind");
        let address = listener.local_addr().expect("local_addr");
        let (tx, requests) = mpsc::unbounded_channel();
        let task = tokio::spawn(serve_http(
            listener,
            answer,
            want_host.map(str::to_owned),
            tx,
        ));
        Self {
            address,
            requests,
            task,
        }
    }

    fn target(&self) -> CheckTarget {
        target(self.address)
    }

    fn seen(&mut self) -> SeenRequest {
        self.requests.try_recv().expect("the server saw a request")
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn http(path: &str, expect_status: &[u16], host: Option<&str>) -> HttpCheck {
    HttpCheck {
        path: path.into(),
        expect_status: expect_status.to_vec(),
        host: host.map(str::to_owned),
    }
}

#[tokio::test]
async fn http_200_passes_with_a_plain_get() {
    let mut server = HttpServer::start(LOCALHOST, Answer::Status(200), None).await;
    let check = http("/health?deep=1", &[200], None);
    assert_check(
        &check,
        &server.target(),
        ms(1000),
        true,
        "ok",
        Duration::ZERO..ms(200),
    )
    .await;
    let seen = server.seen();
    assert_eq!(seen.request_line, "GET /health?deep=1 HTTP/1.1");
    assert_eq!(seen.host, Some(server.address.to_string()));
}

#[tokio::test]
async fn http_503_fails() {
    let server = HttpServer::start(LOCALHOST, Answer::Status(503), None).await;
    let check = http("/", &[200], None);
    assert_check(
        &check,
        &server.target(),
        ms(1000),
        false,
        "HTTP 503",
        Duration::ZERO..ms(200),
    )
    .await;
}

#[tokio::test]
async fn http_status_outside_the_expected_ones_fails() {
    let server = HttpServer::start(LOCALHOST, Answer::Status(200), None).await;
    let check = http("/", &[204], None);
    assert_check(
        &check,
        &server.target(),
        ms(1000),
        false,
        "HTTP 200",
        Duration::ZERO..ms(200),
    )
    .await;
    let check = http("/", &[204, 200], None);
    assert_check(
        &check,
        &server.target(),
        ms(1000),
        true,
        "ok",
        Duration::ZERO..ms(200),
    )
    .await;
}

#[tokio::test]
async fn http_server_that_never_answers_times_out() {
    let server = HttpServer::start(LOCALHOST, Answer::Never, None).await;
    let check = http("/", &[200], None);
    assert_check(
        &check,
        &server.target(),
        ms(300),
        false,
        "timeout after 300ms",
        ms(300)..ms(300) + SLACK,
    )
    .await;
}

#[tokio::test]
async fn http_body_is_not_waited_for() {
    let server = HttpServer::start(LOCALHOST, Answer::EndlessBody, None).await;
    let check = http("/", &[200], None);
    assert_check(
        &check,
        &server.target(),
        ms(1000),
        true,
        "ok",
        Duration::ZERO..ms(200),
    )
    .await;
}

#[tokio::test]
async fn http_connection_closed_without_an_answer_fails() {
    let server = HttpServer::start(LOCALHOST, Answer::Close, None).await;
    let check = http("/", &[200], None);
    assert_check(
        &check,
        &server.target(),
        ms(1000),
        false,
        "connection closed before response",
        Duration::ZERO..ms(200),
    )
    .await;
}

#[tokio::test]
async fn http_without_a_listener_is_refused() {
    let target = CheckTarget::new(LOCALHOST, free_tcp_port(LOCALHOST).await);
    let check = http("/", &[200], None);
    assert_check(
        &check,
        &target,
        ms(1000),
        false,
        "connection refused",
        Duration::ZERO..ms(100),
    )
    .await;
}

#[tokio::test]
async fn http_sends_the_configured_host() {
    let mut server =
        HttpServer::start(LOCALHOST, Answer::Status(200), Some("www.example.test")).await;
    let check = http("/", &[200], Some("www.example.test"));
    assert_check(
        &check,
        &server.target(),
        ms(1000),
        true,
        "ok",
        Duration::ZERO..ms(200),
    )
    .await;
    assert_eq!(server.seen().host.as_deref(), Some("www.example.test"));
    // Without the configured host, the server refuses: the header really is what it checks.
    let check = http("/", &[200], None);
    assert_check(
        &check,
        &server.target(),
        ms(1000),
        false,
        "HTTP 400",
        Duration::ZERO..ms(200),
    )
    .await;
}

#[tokio::test]
async fn http_over_ipv6_loopback_brackets_the_host() {
    let mut server = HttpServer::start(LOCALHOST_V6, Answer::Status(200), None).await;
    let port = server.address.port();
    let check = http("/", &[200], None);
    assert_check(
        &check,
        &server.target(),
        ms(1000),
        true,
        "ok",
        Duration::ZERO..ms(200),
    )
    .await;
    assert_eq!(server.seen().host, Some(format!("[::1]:{port}")));
}

#[tokio::test]
async fn http_path_must_be_origin_form() {
    let target = CheckTarget::new(LOCALHOST, 1);
    let check = http("health", &[200], None);
    let outcome = check.check(&target, ms(100)).await;
    assert!(!outcome.healthy);
    assert_eq!(
        outcome.reason,
        r#"invalid path "health": must start with /"#
    );
}

// ---------------------------------------------------------------------------------------------
// UDP
// ---------------------------------------------------------------------------------------------

/// A UDP server on `bind` that answers each datagram with `reply(datagram)` (None: stays silent).
async fn udp_server(
    bind: impl Into<SocketAddr>,
    reply: fn(&[u8]) -> Option<Vec<u8>>,
) -> (SocketAddr, JoinHandle<()>) {
    let socket = UdpSocket::bind(bind.into()).await.expect("bind");
    let address = socket.local_addr().expect("local_addr");
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        loop {
            let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                continue;
            };
            if let Some(answer) = reply(&buf[..n]) {
                let _ = socket.send_to(&answer, peer).await;
            }
        }
    });
    (address, task)
}

fn udp(send: &[u8], expect: Option<&[u8]>) -> UdpCheck {
    UdpCheck {
        send: send.to_vec(),
        expect: expect.map(<[u8]>::to_vec),
    }
}

#[tokio::test]
async fn udp_echo_passes() {
    for ip in [LOCALHOST, LOCALHOST_V6] {
        let (address, task) = udp_server((ip, 0), |d| Some(d.to_vec())).await;
        let target = target(address);
        for check in [
            udp(b"ping", Some(b"ping")),
            udp(b"ping", None),
            udp(b"xxpingxx", Some(b"ping")),
            udp(b"", None),
        ] {
            assert_check(
                &check,
                &target,
                ms(1000),
                true,
                "ok",
                Duration::ZERO..ms(100),
            )
            .await;
        }
        task.abort();
    }
}

#[tokio::test]
async fn udp_wrong_reply_does_not_match() {
    let (address, task) = udp_server((LOCALHOST, 0), |_| Some(b"nope".to_vec())).await;
    let check = udp(b"ping", Some(b"pong"));
    assert_check(
        &check,
        &target(address),
        ms(1000),
        false,
        "reply did not match",
        Duration::ZERO..ms(100),
    )
    .await;
    task.abort();
}

#[tokio::test]
async fn udp_without_a_listener_is_refused_at_once() {
    let target = CheckTarget::new(LOCALHOST, free_udp_port(LOCALHOST).await);
    // A long timeout: the ICMP port unreachable must end the check, not the timeout.
    let check = udp(b"ping", None);
    assert_check(
        &check,
        &target,
        ms(2000),
        false,
        "connection refused",
        Duration::ZERO..ms(100),
    )
    .await;
}

#[tokio::test]
async fn udp_server_that_never_answers_times_out() {
    let (address, task) = udp_server((LOCALHOST, 0), |_| None).await;
    let check = udp(b"ping", None);
    assert_check(
        &check,
        &target(address),
        ms(200),
        false,
        "timeout after 200ms",
        ms(200)..ms(200) + SLACK,
    )
    .await;
    task.abort();
}

// ---------------------------------------------------------------------------------------------
// Exec
// ---------------------------------------------------------------------------------------------

fn sh(script: &str) -> ExecCheck {
    ExecCheck {
        command: vec!["sh".into(), "-c".into(), script.into()],
        vip_name: "web".into(),
    }
}

/// A path for a test's scratch file, removed when dropped.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(what: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Self(std::env::temp_dir().join(format!("lbchk-{what}-{}-{n}", std::process::id())))
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("UTF-8 temp dir")
    }

    /// The numbers the script wrote, one a line.
    fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(&self.0)
            .expect("the script wrote its pids")
            .lines()
            .map(|line| line.trim().parse().expect("a pid"))
            .collect()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The processes of group `pgid` that still run (`(pid, state)` from `/proc/PID/stat`); zombies
/// (dead, waiting to be reaped) are left out.
fn live_group_members(pgid: i32) -> Vec<(i32, char)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| {
        let pid: i32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) state ppid pgrp ...`; comm may hold spaces and parentheses.
        let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
        let state = fields.next()?.chars().next()?;
        let pgrp: i32 = fields.nth(1)?.parse().ok()?;
        (pgrp == pgid && state != 'Z').then_some((pid, state))
    })
    .collect()
}

/// Waits until nothing of group `pgid` runs any more. A killed orphan (the script's background
/// `sleep`) is reparented to init and stays a zombie, still in the group, until init reaps it,
/// which some inits (this VM's) do only every couple of seconds: so `kill(-pgid, 0)` may still
/// succeed for a while, and the test checks that no member is alive instead of waiting for ESRCH.
fn assert_group_dead(pgid: i32) {
    let deadline = Instant::now() + ms(1000);
    loop {
        let live = live_group_members(pgid);
        if live.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "process group {pgid} still runs: {live:?}"
        );
        std::thread::sleep(ms(10));
    }
}

/// A shell that writes its pid (= the group id) and a background `sleep 30`'s to `file`, then
/// runs `then` (`exit 0`, `wait`).
fn with_background_child(file: &TempFile, then: &str) -> ExecCheck {
    sh(&format!(
        "echo $$ > '{0}'; sleep 30 & echo $! >> '{0}'; {then}",
        file.path()
    ))
}

/// After a check of [`with_background_child`]: nothing of its group runs, the background child
/// included. Returns the two pids.
fn assert_group_and_child_dead(file: &TempFile) -> Vec<i32> {
    let pids = file.pids();
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert_group_dead(pids[0]);
    assert!(
        is_dead(pids[1]),
        "the background child {} still runs",
        pids[1]
    );
    pids
}

/// Whether `pid` is gone or a zombie.
fn is_dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            stat.rfind(')')
                .and_then(|end| stat.get(end + 1..))
                .and_then(|rest| rest.split_whitespace().next())
                == Some("Z")
        }
    }
}

#[tokio::test]
async fn exec_exit_0_is_healthy() {
    let target = CheckTarget::new(LOCALHOST, 8080);
    assert_check(
        &sh("exit 0"),
        &target,
        ms(2000),
        true,
        "ok",
        Duration::ZERO..ms(1000),
    )
    .await;
}

#[tokio::test]
async fn exec_exit_code_is_the_reason() {
    let target = CheckTarget::new(LOCALHOST, 8080);
    assert_check(
        &sh("exit 2"),
        &target,
        ms(2000),
        false,
        "exit 2",
        Duration::ZERO..ms(1000),
    )
    .await;
    assert_check(
        &sh("kill -9 $$"),
        &target,
        ms(2000),
        false,
        "killed by signal 9",
        Duration::ZERO..ms(1000),
    )
    .await;
}

#[tokio::test]
async fn exec_is_killed_at_the_timeout() {
    let target = CheckTarget::new(LOCALHOST, 8080);
    let check = ExecCheck {
        command: vec!["sleep".into(), "5".into()],
        vip_name: "web".into(),
    };
    assert_check(
        &check,
        &target,
        ms(200),
        false,
        "killed after timeout 200ms",
        ms(200)..ms(300),
    )
    .await;
}

#[tokio::test]
async fn exec_that_exits_0_leaves_no_background_child() {
    let target = CheckTarget::new(LOCALHOST, 8080);
    let file = TempFile::new("background");
    // Healthy, but leaves a `sleep 30` running in its group.
    let check = with_background_child(&file, "exit 0");
    assert_check(
        &check,
        &target,
        ms(2000),
        true,
        "ok",
        Duration::ZERO..ms(1000),
    )
    .await;
    let pids = assert_group_and_child_dead(&file);
    assert_eq!(kill(Pid::from_raw(pids[0]), None), Err(Errno::ESRCH));
}

#[tokio::test]
async fn exec_timeout_kills_the_whole_process_group() {
    let target = CheckTarget::new(LOCALHOST, 8080);
    let file = TempFile::new("group");
    // The shell writes its pid (= the group id) and its background child's, then waits.
    let check = with_background_child(&file, "wait");
    assert_check(
        &check,
        &target,
        ms(200),
        false,
        "killed after timeout 200ms",
        ms(200)..ms(300),
    )
    .await;
    // Before the check, the group was there (the leader wrote its pid, the sleep had 30 s to go).
    let pids = assert_group_and_child_dead(&file);
    assert!(is_dead(pids[0]), "{pids:?}");
    // The leader itself was reaped by the check.
    assert_eq!(kill(Pid::from_raw(pids[0]), None), Err(Errno::ESRCH));
}

#[tokio::test]
async fn exec_cancelled_check_kills_the_process_group() {
    let target = CheckTarget::new(LOCALHOST, 8080);
    let file = TempFile::new("cancel");
    let check = with_background_child(&file, "wait");
    // Dropped mid-way, well before its own timeout.
    let cut = tokio::time::timeout(ms(200), check.check(&target, ms(5000))).await;
    assert!(cut.is_err(), "{cut:?}");
    assert_group_and_child_dead(&file);
}

#[tokio::test]
async fn exec_sees_the_backend_in_its_environment() {
    let target = CheckTarget::new(LOCALHOST, 8080);
    let check = sh(
        r#"test "$LB_BACKEND_ADDRESS" = 127.0.0.1 && test "$LB_BACKEND_PORT" = 8080 && test "$LB_VIP_NAME" = web"#,
    );
    assert_check(
        &check,
        &target,
        ms(2000),
        true,
        "ok",
        Duration::ZERO..ms(1000),
    )
    .await;
    let target = CheckTarget::new(LOCALHOST_V6, 53);
    let check = sh(r#"test "$LB_BACKEND_ADDRESS" = ::1 && test "$LB_BACKEND_PORT" = 53"#);
    assert_check(
        &check,
        &target,
        ms(2000),
        true,
        "ok",
        Duration::ZERO..ms(1000),
    )
    .await;
}

#[tokio::test]
async fn exec_of_a_missing_binary_cannot_run() {
    let target = CheckTarget::new(LOCALHOST, 8080);
    let check = ExecCheck {
        command: vec!["/nonexistent/lb-check".into(), "--flag".into()],
        vip_name: "web".into(),
    };
    assert_check(
        &check,
        &target,
        ms(1000),
        false,
        "cannot run /nonexistent/lb-check: No such file or directory",
        Duration::ZERO..ms(100),
    )
    .await;
    let empty = ExecCheck {
        command: Vec::new(),
        vip_name: "web".into(),
    };
    assert_check(
        &empty,
        &target,
        ms(1000),
        false,
        "cannot run: empty command",
        Duration::ZERO..ms(100),
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Against real servers in another network namespace (root)
// ---------------------------------------------------------------------------------------------

/// Two network namespaces joined by a veth pair (see [`crate::testing::netns`]); `Drop` deletes
/// both (and so the veth), also when the test panics.
///
/// ```text
///   lbchk-<pid>-<n>-client             lbchk-<pid>-<n>-server
///   veth0 10.88.0.1/24  ───── veth ─────  veth1 10.88.0.2/24
/// ```
struct NsPair {
    client: String,
    server: String,
    _net: netns::NsPair,
}

const NS_CLIENT_IF: &str = "veth0";
const NS_SERVER: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 2);
const NS_TCP_PORT: u16 = 7001;
const NS_HTTP_PORT: u16 = 7080;
const NS_UDP_PORT: u16 = 7053;
const NS_CLOSED_UDP_PORT: u16 = 7054;

impl NsPair {
    fn new() -> Self {
        let net = netns::NsPair::new(
            "lbchk",
            [
                End::new("client", NS_CLIENT_IF, "10.88.0.1/24"),
                End::new("server", "veth1", "10.88.0.2/24"),
            ],
        );
        let [client, server] = net.names();
        Self {
            client,
            server,
            _net: net,
        }
    }

    /// Runs `body` inside the client namespace (see [`netns::run_in`]) and returns its result.
    fn in_client<F, Fut, T>(&self, body: F) -> T
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
        T: Send + 'static,
    {
        netns::run_in(&self.client, body)
    }
}

/// The servers in the server namespace: a TCP listener, an HTTP server and a UDP echo, on
/// 10.88.0.2. `stop_tcp` closes the TCP listener; `shutdown` ends them all.
struct NsServers {
    stop_tcp: Option<tokio::sync::oneshot::Sender<()>>,
    tcp_stopped: std::sync::mpsc::Receiver<()>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NsServers {
    fn start(pair: &NsPair) -> Self {
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let (tcp_stopped_tx, tcp_stopped) = std::sync::mpsc::channel();
        let (stop_tcp, stop_tcp_rx) = tokio::sync::oneshot::channel::<()>();
        let (shutdown, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = netns::spawn_in(&pair.server, move || async move {
            let tcp = TcpListener::bind((NS_SERVER, NS_TCP_PORT))
                .await
                .expect("bind tcp");
            let http_listener = TcpListener::bind((NS_SERVER, NS_HTTP_PORT))
                .await
                .expect("bind http");
            let (_, echo) = udp_server((NS_SERVER, NS_UDP_PORT), |d| Some(d.to_vec())).await;
            let tcp_task = tokio::spawn(async move {
                loop {
                    let _ = tcp.accept().await;
                }
            });
            let (requests, _seen) = mpsc::unbounded_channel();
            let want_host = format!("{NS_SERVER}:{NS_HTTP_PORT}");
            let http_task = tokio::spawn(serve_http(
                http_listener,
                Answer::Status(200),
                Some(want_host),
                requests,
            ));
            ready_tx.send(()).expect("ready");
            let _ = stop_tcp_rx.await;
            tcp_task.abort();
            let _ = tcp_task.await; // the listener is closed once the task is gone
            let _ = tcp_stopped_tx.send(());
            let _ = shutdown_rx.await;
            http_task.abort();
            echo.abort();
        });
        let servers = Self {
            stop_tcp: Some(stop_tcp),
            tcp_stopped,
            shutdown: Some(shutdown),
            thread: Some(thread),
        };
        ready
            .recv_timeout(Duration::from_secs(5))
            .expect("servers ready");
        servers
    }

    fn stop_tcp(&mut self) {
        if let Some(stop) = self.stop_tcp.take() {
            let _ = stop.send(());
        }
        self.tcp_stopped
            .recv_timeout(Duration::from_secs(5))
            .expect("tcp server stopped");
    }
}

impl Drop for NsServers {
    fn drop(&mut self) {
        // Dropping a sender wakes its receiver too (with an error): the thread goes on to the end
        // even when the test panicked before `stop_tcp`.
        self.stop_tcp.take();
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn each_checker_against_real_servers_in_a_namespace() {
    let pair = NsPair::new();
    let mut servers = NsServers::start(&pair);

    let server = IpAddr::V4(NS_SERVER);
    // Passing, and failing fast, while every server runs.
    pair.in_client(move || async move {
        // The veth has just come up: wait until the server answers at all (ARP done) so the
        // latencies below are the checks', not the link's.
        let deadline = Instant::now() + Duration::from_secs(3);
        while TcpStream::connect((NS_SERVER, NS_TCP_PORT)).await.is_err() {
            assert!(Instant::now() < deadline, "server namespace unreachable");
            tokio::time::sleep(ms(20)).await;
        }
        let tcp_target = CheckTarget::new(server, NS_TCP_PORT);
        let http_target = CheckTarget::new(server, NS_HTTP_PORT);
        let fast = Duration::ZERO..ms(200);
        assert_check(&TcpCheck, &tcp_target, ms(1000), true, "ok", fast.clone()).await;
        let get = http("/", &[200], None);
        assert_check(&get, &http_target, ms(1000), true, "ok", fast.clone()).await;
        let wrong = http("/", &[204], None);
        assert_check(
            &wrong,
            &http_target,
            ms(1000),
            false,
            "HTTP 200",
            fast.clone(),
        )
        .await;
        let ping = udp(b"ping", Some(b"ping"));
        let udp_target = CheckTarget::new(server, NS_UDP_PORT);
        assert_check(&ping, &udp_target, ms(1000), true, "ok", fast.clone()).await;
        // No UDP socket on that port: the server's ICMP port unreachable ends the check at once.
        let closed = CheckTarget::new(server, NS_CLOSED_UDP_PORT);
        assert_check(
            &ping,
            &closed,
            ms(2000),
            false,
            "connection refused",
            fast.clone(),
        )
        .await;
    });

    // The TCP server stopped: refused.
    servers.stop_tcp();
    pair.in_client(move || async move {
        let tcp_target = CheckTarget::new(server, NS_TCP_PORT);
        // A process forked by a parallel test can hold a copy of the closed listener until it
        // execs (close-on-exec): wait until the port really refuses, then check the checker.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::net::TcpStream::connect((server, NS_TCP_PORT))
            .await
            .is_ok()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the stopped listener still accepts"
            );
            tokio::time::sleep(ms(20)).await;
        }
        assert_check(
            &TcpCheck,
            &tcp_target,
            ms(1000),
            false,
            "connection refused",
            Duration::ZERO..ms(200),
        )
        .await;
    });

    // An address on the link that nobody holds: the kernel sends ARP requests (3 of them, 1 s
    // apart: mcast_solicit=3, retrans_time=1s) before it gives up, so every check with a
    // timeout under ~3 s deterministically times out; nothing comes back before.
    pair.in_client(move || async move {
        let nobody = IpAddr::V4(Ipv4Addr::new(10, 88, 0, 99));
        let timeout = ms(300);
        let late = ms(300)..ms(300) + SLACK;
        for check in [
            &TcpCheck as &dyn HealthCheck,
            &http("/", &[200], None),
            &udp(b"ping", None),
        ] {
            let port = if check.kind() == "udp" { 53 } else { 80 };
            assert_check(
                check,
                &CheckTarget::new(nobody, port),
                timeout,
                false,
                "timeout after 300ms",
                late.clone(),
            )
            .await;
        }
        // No route at all (the namespace has no default route): the kernel fails it at once.
        let far = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        for check in [
            &TcpCheck as &dyn HealthCheck,
            &http("/", &[200], None),
            &udp(b"ping", None),
        ] {
            assert_check(
                check,
                &CheckTarget::new(far, 80),
                ms(1000),
                false,
                "network unreachable",
                Duration::ZERO..ms(100),
            )
            .await;
        }
    });

    // With ARP giving up after one 100 ms probe, the kernel reports the failed neighbour to the
    // sockets waiting on it: host unreachable, well before the timeout.
    run(
        "ip",
        &[
            "netns",
            "exec",
            &pair.client,
            "sysctl",
            "-qw",
            &format!("net.ipv4.neigh.{NS_CLIENT_IF}.mcast_solicit=1"),
            &format!("net.ipv4.neigh.{NS_CLIENT_IF}.retrans_time_ms=100"),
        ],
    );
    pair.in_client(move || async move {
        for (last, check) in [
            (98, &TcpCheck as &dyn HealthCheck),
            (97, &http("/", &[200], None)),
            (96, &udp(b"ping", None)),
        ] {
            let nobody = IpAddr::V4(Ipv4Addr::new(10, 88, 0, last));
            assert_check(
                check,
                &CheckTarget::new(nobody, 80),
                ms(2000),
                false,
                "host unreachable",
                ms(50)..ms(1000),
            )
            .await;
        }
    });

    drop(servers);
    let names = [pair.client.clone(), pair.server.clone()];
    drop(pair);
    let left = run("ip", &["netns", "list"]);
    for name in names {
        assert!(
            !left
                .lines()
                .any(|line| line.split_whitespace().next() == Some(name.as_str())),
            "namespace {name} left behind: {left}"
        );
    }
}
