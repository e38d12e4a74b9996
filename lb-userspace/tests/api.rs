//! The control API and its commands, without root: the real server on a socket in a temporary
//! directory with a fake daemon loop behind it, and the real `lb` binary as the client.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::Method;
use lb::api::model::{
    AddressStatus, Admin, AnnounceStatus, BackendStatus, Command, ReloadReport, StatusReport,
    VipStatus,
};
use lb::api::{client, server};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// A fresh directory under the temp dir (short: a socket path holds at most 107 bytes).
fn temp_dir() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "lb-api-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn backend(address: &str, standby: bool, state: &str, weight: u32) -> BackendStatus {
    BackendStatus {
        address: address.into(),
        standby,
        state: state.into(),
        weight,
        configured_weight: 100,
        last_check: Some("ok".into()),
        last_check_latency_ms: Some(0.4),
        packets: 4200,
        bytes: 420_000,
        flows: 17,
    }
}

/// What the fake daemon reports.
fn fixed_report() -> StatusReport {
    let mut standby = backend("10.0.0.13", true, "down", 100);
    standby.last_check = Some("connection refused".into());
    standby.last_check_latency_ms = Some(1.3);
    standby.packets = 0;
    standby.bytes = 0;
    standby.flows = 0;
    let mut unchecked = backend("2001:db8::11", false, "unknown", 100);
    unchecked.last_check = None;
    unchecked.last_check_latency_ms = None;
    StatusReport {
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
                    reason: "vip dns6: no backend takes new flows".into(),
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
                ring_digest: "0123456789abcdef".into(),
                ring_slots_changed: 5,
                flow_table_entries: 2,
                packets: 8400,
                bytes: 840_000,
                flows: 34,
                backends: vec![
                    backend("10.0.0.11", false, "up", 100),
                    backend("10.0.0.12", false, "draining", 0),
                    standby,
                ],
            },
            VipStatus {
                name: "dns6".into(),
                address: "2001:db8::100".into(),
                port: 53,
                protocol: "udp".into(),
                forward: "l2".into(),
                active_pool: "none".into(),
                can_serve: false,
                announced: false,
                announce_reason: "no backend takes new flows".into(),
                ring_digest: "fedcba9876543210".into(),
                ring_slots_changed: 0,
                flow_table_entries: 0,
                packets: 0,
                bytes: 0,
                flows: 0,
                backends: vec![unchecked],
            },
        ],
    }
}

/// The daemon's refusals, as the real loop words them.
fn fake_set_admin(vip: &str, backend: &str) -> Result<(), String> {
    match (vip, backend) {
        ("web", "10.0.0.11") => Ok(()),
        ("web", "10.0.0.12") => Err("backend 10.0.0.12 of vip web is already draining".into()),
        ("web", _) => Err(format!("vip web has no backend {backend}")),
        _ => Err(format!("no vip named {vip}")),
    }
}

/// The API server on a socket in a temp dir, answered by a fake daemon loop.
struct Daemon {
    dir: PathBuf,
    socket: PathBuf,
    /// Every SetAdmin the loop got.
    commands: Arc<Mutex<Vec<(String, String, Admin)>>>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
}

impl Daemon {
    async fn start() -> Daemon {
        let dir = temp_dir();
        // A directory that does not exist yet: bind creates it, 0700.
        let socket = dir.join("run").join("lb.sock");
        let (commands_tx, mut commands_rx) = mpsc::channel::<Command>(8);
        let commands = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&commands);
        let reloads = AtomicUsize::new(0);
        tokio::spawn(async move {
            while let Some(command) = commands_rx.recv().await {
                match command {
                    Command::Status(reply) => {
                        let _ = reply.send(fixed_report());
                    }
                    Command::SetAdmin {
                        vip,
                        backend,
                        admin,
                        reply,
                    } => {
                        let answer = fake_set_admin(&vip, &backend);
                        seen.lock().unwrap().push((vip, backend, admin));
                        let _ = reply.send(answer);
                    }
                    Command::Reload(reply) => {
                        // The first reload applies two changes, every later one is refused.
                        let n = reloads.fetch_add(1, Ordering::SeqCst);
                        let _ = reply.send(if n == 0 {
                            Ok(ReloadReport {
                                config: "/etc/lb/lb.toml".to_owned(),
                                changes: vec![
                                    "vip web: backend 10.0.0.13 added".to_owned(),
                                    "vip web: backend 10.0.0.11: weight 100 -> 50".to_owned(),
                                ],
                            })
                        } else {
                            Err("/etc/lb/lb.toml:7:11: invalid IP address syntax".to_owned())
                        });
                    }
                }
            }
        });
        let listener = server::bind(&socket).expect("bind");
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(server::serve_on(listener, commands_tx, stopped));
        Daemon {
            dir,
            socket,
            commands,
            stop: Some(stop),
            server,
        }
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), &mut self.server)
            .await
            .expect("the server did not stop")
            .unwrap();
        assert!(
            !self.socket.exists(),
            "the socket is still there after shutdown"
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the `lb` binary as a child (the server answers in this process meanwhile).
async fn lb<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_lb"));
    command.args(args);
    run(command).await
}

async fn run(mut command: tokio::process::Command) -> Output {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        command.env_remove("LB_LOG").output(),
    )
    .await
    .expect("lb did not finish")
    .expect("run lb");
    Output {
        code: out.status.code().expect("exit code"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn api(socket: &Path) -> [&std::ffi::OsStr; 2] {
    ["--api".as_ref(), socket.as_os_str()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_is_the_daemons_report() {
    let daemon = Daemon::start().await;
    let out = lb(["status".as_ref(), "--json".as_ref()]
        .into_iter()
        .chain(api(&daemon.socket)))
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let report: StatusReport = serde_json::from_str(&out.stdout).expect("a StatusReport");
    assert_eq!(report, fixed_report());
    assert!(
        out.stdout.contains("\n  \"vips\": ["),
        "not pretty-printed:\n{}",
        out.stdout
    );

    // The daemon's key order (the structs' order) is kept: a VIP starts with its name.
    let vip_keys = [
        "\"name\"",
        "\"address\"",
        "\"port\"",
        "\"protocol\"",
        "\"active_pool\"",
    ];
    let positions: Vec<usize> = vip_keys
        .iter()
        .map(|k| out.stdout.find(k).expect(k))
        .collect();
    assert!(positions.is_sorted(), "keys out of order:\n{}", out.stdout);

    // The issue's exact keys, with the types it implies.
    let value: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let vip = &value["vips"][0];
    for key in [
        "name",
        "address",
        "port",
        "protocol",
        "active_pool",
        "announced",
        "ring_digest",
        "backends",
    ] {
        assert!(vip.get(key).is_some(), "no {key:?} in {vip}");
    }
    assert_eq!(vip["announced"], true);
    assert_eq!(vip["ring_digest"], "0123456789abcdef");
    assert_eq!(value["announce"]["route_table"], 200);
    assert_eq!(value["announce"]["health_value"], 1);
    assert_eq!(value["announce"]["addresses"][1]["announced"], false);
    assert_eq!(vip["name"], "web");
    assert_eq!(vip["address"], "10.0.0.100");
    assert_eq!(vip["port"], 80);
    assert_eq!(vip["protocol"], "tcp");
    assert_eq!(vip["active_pool"], "primary");
    let backend = &vip["backends"][0];
    for key in [
        "address", "standby", "state", "weight", "packets", "bytes", "flows",
    ] {
        assert!(backend.get(key).is_some(), "no {key:?} in {backend}");
    }
    assert_eq!(backend["address"], "10.0.0.11");
    assert_eq!(backend["standby"], false);
    assert_eq!(backend["state"], "up");
    assert_eq!(backend["weight"], 100);
    assert_eq!(backend["packets"], 4200);
    assert_eq!(backend["bytes"], 420_000);
    assert_eq!(backend["flows"], 17);
    assert_eq!(vip["backends"][2]["standby"], true);
    assert_eq!(value["vips"][1]["active_pool"], "none");

    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_prints_the_changes_and_a_refusal_fails_with_the_files_position() {
    let daemon = Daemon::start().await;
    let out = lb(["reload".as_ref()].into_iter().chain(api(&daemon.socket))).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "reloaded /etc/lb/lb.toml: 2 changes\n  vip web: backend 10.0.0.13 added\n  \
         vip web: backend 10.0.0.11: weight 100 -> 50\n"
    );
    let out = lb(["reload".as_ref()].into_iter().chain(api(&daemon.socket))).await;
    assert_eq!(out.code, 1, "a refused reload must fail: {}", out.stdout);
    assert_eq!(
        out.stderr,
        "reload refused: /etc/lb/lb.toml:7:11: invalid IP address syntax\n\
         the daemon keeps running its current config\n"
    );
    assert_eq!(out.stdout, "");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_with_an_invalid_config_is_not_sent() {
    let dir = temp_dir();
    let config = dir.join("lb.toml");
    std::fs::write(&config, "interface = \"eth0\"\nmax_vips = \"many\"\n").unwrap();
    let out = lb(["reload".as_ref(), "--config".as_ref(), config.as_os_str()]).await;
    assert_eq!(out.code, 1);
    assert!(
        out.stderr
            .starts_with(&format!("{}:2:12: ", config.display()))
            && out
                .stderr
                .ends_with("reload not sent: the daemon keeps running its current config\n"),
        "{}",
        out.stderr
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_a_table() {
    let daemon = Daemon::start().await;
    let out = lb(["status".as_ref()].into_iter().chain(api(&daemon.socket))).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "web 10.0.0.100:80/tcp pool=primary announced ring=0123456789abcdef changed_slots=5 table_flows=2 packets=8400 bytes=840000 flows=34",
            "  10.0.0.11 primary up weight=100 last=ok (0.4ms) packets=4200 bytes=420000 flows=17",
            "  10.0.0.12 primary draining weight=0/100 last=ok (0.4ms) packets=4200 bytes=420000 flows=17",
            "  10.0.0.13 standby down weight=100 last=connection refused (1.3ms) packets=0 bytes=0 flows=0",
            "dns6 [2001:db8::100]:53/udp pool=none withdrawn ring=fedcba9876543210 changed_slots=0 table_flows=0 packets=0 bytes=0 flows=0",
            "  2001:db8::11 primary unknown weight=100 last=- packets=4200 bytes=420000 flows=17",
            "announce: route_table=200 health_file=/run/lb/health (1)",
            "  10.0.0.100 announced: vip web: 2 backends take new flows (pool primary)",
            "  2001:db8::100 withdrawn: vip dns6: no backend takes new flows",
        ],
        "{}",
        out.stdout
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_disable_enable() {
    let daemon = Daemon::start().await;
    for (command, admin, done) in [
        ("drain", Admin::Drained, "drained"),
        ("disable", Admin::Disabled, "disabled"),
        ("enable", Admin::Enabled, "enabled"),
    ] {
        let out = lb([command.as_ref(), "web".as_ref(), "10.0.0.11".as_ref()]
            .into_iter()
            .chain(api(&daemon.socket)))
        .await;
        assert_eq!(out.code, 0, "{command}: {}", out.stderr);
        assert_eq!(out.stdout, format!("web 10.0.0.11: {done}\n"));
        assert_eq!(
            daemon.commands.lock().unwrap().last(),
            Some(&("web".to_owned(), "10.0.0.11".to_owned(), admin))
        );
    }

    // Refusals: exit 1 with the daemon's words on stderr, nothing on stdout.
    for (args, message) in [
        (
            ["drain", "web", "10.9.9.9"],
            "vip web has no backend 10.9.9.9",
        ),
        (["disable", "api", "10.0.0.11"], "no vip named api"),
        (
            ["drain", "web", "10.0.0.12"],
            "backend 10.0.0.12 of vip web is already draining",
        ),
        // Not an address at all: still the daemon's answer, through the percent-encoding.
        (["enable", "web", "a/b c"], "vip web has no backend a/b c"),
    ] {
        let out = lb(args
            .iter()
            .map(std::ffi::OsStr::new)
            .chain(api(&daemon.socket)))
        .await;
        assert_eq!(out.code, 1, "{args:?}: {}", out.stdout);
        assert_eq!(out.stderr.trim(), message, "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}: {}", out.stdout);
    }

    // IPv6 backends are sent in their canonical form.
    let out = lb(["drain", "web", "2001:DB8:0:0::11"]
        .iter()
        .map(std::ffi::OsStr::new)
        .chain(api(&daemon.socket)))
    .await;
    assert_eq!(out.code, 1);
    assert_eq!(out.stderr.trim(), "vip web has no backend 2001:db8::11");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_root_only() {
    let daemon = Daemon::start().await;
    let meta = std::fs::metadata(&daemon.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    // bind created the missing directory, 0700.
    let dir = std::fs::metadata(daemon.socket.parent().unwrap()).unwrap();
    assert_eq!(dir.permissions().mode() & 0o7777, 0o700);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_daemon_the_commands_say_so() {
    for args in [
        vec!["status", "--api", "/nonexistent/sock"],
        vec!["status", "--json", "--api", "/nonexistent/sock"],
        vec!["drain", "web", "10.0.0.11", "--api", "/nonexistent/sock"],
    ] {
        let out = lb(&args).await;
        assert_eq!(out.code, 1, "{args:?}");
        assert_eq!(
            out.stderr.trim(),
            "no lb daemon at /nonexistent/sock (is `lb run` running? is `api` set to another path?)",
            "{args:?}"
        );
        assert!(out.stdout.is_empty());
    }

    // A socket file left behind by a daemon that died: nobody answers, same message.
    let dir = temp_dir();
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let out = lb(["status".as_ref()].into_iter().chain(api(&stale))).await;
    assert_eq!(out.code, 1);
    assert!(out.stderr.starts_with("no lb daemon at "), "{}", out.stderr);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_denied_says_to_run_as_root() {
    let daemon = Daemon::start().await;
    let out = if nix::unistd::geteuid().is_root() {
        // Only the socket's own mode (0600, owned by root) keeps `nobody` out: its directory is
        // opened up for this test.
        let dir = daemon.socket.parent().unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_lb"));
        command.arg("status").args(api(&daemon.socket));
        command.uid(65534).gid(65534);
        run(command).await
    } else {
        // Our own socket: only a mode without write permission keeps us out.
        std::fs::set_permissions(&daemon.socket, std::fs::Permissions::from_mode(0o000)).unwrap();
        lb(["status".as_ref()].into_iter().chain(api(&daemon.socket))).await
    };
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert_eq!(
        out.stderr.trim(),
        format!(
            "permission denied on {}: the control API is root only; run this as root (e.g. with sudo)",
            daemon.socket.display()
        )
    );
    daemon.stop().await;
}

const CONFIG: &str = r#"interface = "eth0"
[[vip]]
name = "web"
address = "10.0.0.100"
port = 80
protocol = "tcp"
[[vip.backend]]
address = "10.0.0.11"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_names_the_socket() {
    let daemon = Daemon::start().await;
    let config = daemon.dir.join("lb.toml");
    std::fs::write(
        &config,
        format!("api = \"{}\"\n{CONFIG}", daemon.socket.display()),
    )
    .unwrap();
    let out = lb(["status".as_ref(), "--config".as_ref(), config.as_os_str()]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.starts_with("web 10.0.0.100:80/tcp"),
        "{}",
        out.stdout
    );
    let out = lb([
        "drain".as_ref(),
        "web".as_ref(),
        "10.0.0.11".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
    ])
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout, "web 10.0.0.11: drained\n");

    // An invalid config: its FILE:LINE:COL error, exit 1.
    let broken = daemon.dir.join("broken.toml");
    std::fs::write(&broken, format!("api = \"relative.sock\"\n{CONFIG}")).unwrap();
    let out = lb(["status".as_ref(), "--config".as_ref(), broken.as_os_str()]).await;
    assert_eq!(out.code, 1);
    let prefix = format!("{}:1:7: ", broken.display());
    assert!(out.stderr.starts_with(&prefix), "{}", out.stderr);

    // --api and --config together: a usage error.
    let out = lb(["status".as_ref(), "--config".as_ref(), config.as_os_str()]
        .into_iter()
        .chain(api(&daemon.socket)))
    .await;
    assert_eq!(out.code, 2, "{}", out.stderr);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_errors_are_json() {
    let daemon = Daemon::start().await;
    let socket = &daemon.socket;
    let error = |body: &str| -> String {
        let value: serde_json::Value = serde_json::from_str(body).expect(body);
        value["error"].as_str().expect(body).to_owned()
    };

    let (status, body) =
        client::request(socket, Method::POST, "/vips/web/backends/10.0.0.11/drain")
            .await
            .unwrap();
    assert_eq!((status, body.as_str()), (200, r#"{"ok":true}"#));

    for (method, path, want) in [
        (Method::POST, "/vips/web/backends/10.9.9.9/drain", 404),
        (Method::POST, "/vips/nope/backends/10.0.0.11/enable", 404),
        (Method::POST, "/vips/web/backends/10.0.0.12/drain", 400),
        (Method::POST, "/vips/web/backends/%zz/drain", 400),
        (Method::GET, "/", 404),
        (Method::GET, "/statu", 404),
        (Method::POST, "/vips/web/backends/10.0.0.11/pause", 404),
        (Method::POST, "/status", 405),
        (Method::DELETE, "/status", 405),
        (Method::GET, "/vips/web/backends/10.0.0.11/drain", 405),
    ] {
        let (status, body) = client::request(socket, method.clone(), path).await.unwrap();
        assert_eq!(status, want, "{method} {path}: {body}");
        assert!(!error(&body).is_empty(), "{method} {path}: {body}");
    }
    let (_, body) = client::request(socket, Method::POST, "/vips/web/backends/10.9.9.9/drain")
        .await
        .unwrap();
    assert_eq!(error(&body), "vip web has no backend 10.9.9.9");

    // The higher-level calls.
    assert_eq!(client::status(socket).await.unwrap(), fixed_report());
    client::set_admin(socket, "web", "10.0.0.11", Admin::Disabled)
        .await
        .unwrap();
    match client::set_admin(socket, "web", "10.0.0.99", Admin::Drained).await {
        Err(client::ClientError::Refused {
            status: 404,
            message,
        }) => {
            assert_eq!(message, "vip web has no backend 10.0.0.99");
        }
        other => panic!("{other:?}"),
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gone_daemon_loop_is_503() {
    let dir = temp_dir();
    let socket = dir.join("lb.sock");
    let (commands, loop_end) = mpsc::channel::<Command>(1);
    drop(loop_end);
    let listener = server::bind(&socket).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(server::serve_on(listener, commands, stopped));
    for (method, path) in [
        (Method::GET, "/status"),
        (Method::POST, "/vips/web/backends/10.0.0.11/drain"),
    ] {
        let (status, body) = client::request(&socket, method, path).await.unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("\"error\""), "{body}");
    }
    let out = lb(["status".as_ref()].into_iter().chain(api(&socket))).await;
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("not taking commands"), "{}", out.stderr);

    // A loop that takes the command but drops the reply: 503 too.
    stop.send(()).unwrap();
    server.await.unwrap();
    let (commands, mut loop_end) = mpsc::channel::<Command>(1);
    tokio::spawn(async move { while loop_end.recv().await.is_some() {} });
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn({
        let socket = socket.clone();
        async move { server::serve(&socket, commands, stopped).await }
    });
    let status = loop {
        match client::request(&socket, Method::GET, "/status").await {
            Ok((status, _)) => break status,
            Err(client::ClientError::NoDaemon { .. }) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(status, 503);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    assert!(!socket.exists());
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_refuses_a_live_socket_and_replaces_a_stale_one() {
    let daemon = Daemon::start().await;
    let error = server::bind(&daemon.socket).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse);
    assert_eq!(
        error.to_string(),
        format!("another lb is already serving {}", daemon.socket.display())
    );
    // The live daemon still answers.
    assert_eq!(
        client::status(&daemon.socket).await.unwrap(),
        fixed_report()
    );

    // Stale: bound by a process that is gone (the listener closed, the file left behind).
    let dir = temp_dir();
    let stale = dir.join("lb.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let listener = server::bind(&stale).expect("a stale socket is replaced");
    let mode = std::fs::metadata(&stale).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600);
    drop(listener);

    // Not a socket: left alone.
    let file = dir.join("file");
    std::fs::write(&file, "keep me").unwrap();
    let error = server::bind(&file).unwrap_err();
    assert!(error.to_string().contains("is not a socket"), "{error}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    let _ = std::fs::remove_dir_all(dir);
    daemon.stop().await;
}
