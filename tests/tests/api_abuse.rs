//! Malformed, huge and slow requests on a running `lb`'s control socket and metrics port, while a
//! client keeps connecting to the VIP: every VIP connection succeeds, `lb status` keeps answering
//! within a second, the daemon lives, and its memory stays bounded.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use lb_tests::{
    daemon::{Launch, LbDaemon, api_socket_for, lb_status},
    servers::tcp_requests,
    topology::leftovers,
    web_lab::WebLab,
};

const METRICS: &str = "127.0.0.1:19102";
/// RSS growth allowed over the abuse. The servers hold at most 64 connections each, every one
/// with at most a 16 KiB request head and one answer (a few KiB here) buffered, about 2 MB per
/// server; unread bodies are never buffered. 16 MB leaves room for allocator slack and the
/// tokio tasks of 2,000 short connections, and is far below what buffering one 10 MB body per
/// connection (or 1,000 connections' buffers) would cost.
const RSS_GROWTH_BOUND_KB: u64 = 16 * 1024;

/// Sets its flag when dropped, on success or unwind.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

trait Stream: Read + Write + Send {
    /// A second handle on the same connection (to read while another thread writes).
    fn try_clone_box(&self) -> std::io::Result<Box<dyn Stream>>;
}

impl Stream for UnixStream {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
}

impl Stream for TcpStream {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
}

type Connect = Arc<dyn Fn() -> std::io::Result<Box<dyn Stream>> + Send + Sync>;

/// The lb process: the one whose command line names its config file.
fn lb_pid(config: &Path) -> u32 {
    let needle = config.as_os_str().as_encoded_bytes();
    for entry in std::fs::read_dir("/proc").expect("/proc") {
        let Ok(entry) = entry else { continue };
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let is_lb = args.first().is_some_and(|a| a.ends_with(b"/lb"));
        if is_lb && args.contains(&needle) {
            return pid;
        }
    }
    panic!("no lb process runs {}", config.display());
}

/// VmRSS and VmHWM of `pid`, in kB.
fn memory_kb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Sends `request` and reads the answer until close or 3 s; the status line.
fn exchange(connect: &Connect, request: &[u8]) -> String {
    let Ok(mut stream) = connect() else {
        return "connect failed".into();
    };
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

/// Everything at one endpoint; returns what was observed, for the failure message.
fn abuse(name: &str, connect: Connect) -> Vec<String> {
    let mut seen = Vec::new();
    // A slow client: one byte a second (the 5 s header timeout cuts it).
    let slow = {
        let connect = connect.clone();
        thread::spawn(move || {
            let Ok(mut stream) = connect() else { return 0 };
            let request = b"GET /status HTTP/1.1\r\nhost: lb\r\n\r\n";
            let mut sent = 0;
            for byte in request {
                if stream.write_all(&[*byte]).is_err() {
                    break;
                }
                sent += 1;
                thread::sleep(Duration::from_secs(1));
            }
            sent
        })
    };
    for (what, request) in [
        ("bad JSON", &b"POST /status HTTP/1.1\r\nhost: lb\r\ncontent-type: application/json\r\ncontent-length: 9\r\nconnection: close\r\n\r\n{\"a\": [}"[..]),
        ("unknown path", b"GET /nope/../../etc HTTP/1.1\r\nhost: lb\r\nconnection: close\r\n\r\n"),
        ("unknown method", b"BREW /metrics HTTP/1.1\r\nhost: lb\r\nconnection: close\r\n\r\n"),
        ("garbage", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n"),
        ("huge header", &[b"GET / HTTP/1.1\r\nx: ".as_slice(), &[b'a'; 200_000], b"\r\n\r\n"].concat()),
    ] {
        let status = exchange(&connect, request);
        seen.push(format!("{name} {what}: {status:?}"));
    }
    // A 10 MB body: answered 413 without being read. The answer is read while the body is
    // still being written: the server closes with the body unread, and the reset that follows
    // would discard an answer that waited in the client's buffer until the writes gave up.
    {
        let mut status = String::from("connect failed");
        if let Ok(mut stream) = connect() {
            let mut reader = stream.try_clone_box().expect("a second handle");
            let answer = thread::spawn(move || {
                let mut answer = Vec::new();
                let _ = reader.read_to_end(&mut answer);
                answer
            });
            let _ = stream.write_all(
                b"POST /reload HTTP/1.1\r\nhost: lb\r\ncontent-length: 10485760\r\n\r\n",
            );
            let chunk = vec![b'{'; 1 << 20];
            for _ in 0..10 {
                if stream.write_all(&chunk).is_err() {
                    break;
                }
            }
            let answer = answer.join().expect("the reader");
            status = String::from_utf8_lossy(&answer)
                .lines()
                .next()
                .unwrap_or("")
                .into();
        }
        assert!(
            status.contains(" 413 "),
            "{name}: a 10 MB body got {status:?}"
        );
        seen.push(format!("{name} 10 MB body: {status:?}"));
    }
    // 1,000 connections at once, half with a partial request, held for a second. Opening
    // stops after 20 s: a connect to a full accept queue waits out its timeout, and a thousand
    // of those would hang the test for most of an hour.
    let mut held = Vec::new();
    let opening = Instant::now();
    for i in 0..1000 {
        if opening.elapsed() > Duration::from_secs(20) {
            break;
        }
        if let Ok(mut stream) = connect() {
            if i % 2 == 0 {
                let _ = stream.write_all(b"GET /sta");
            }
            held.push(stream);
        }
    }
    seen.push(format!("{name}: {} of 1000 connections opened", held.len()));
    thread::sleep(Duration::from_secs(1));
    drop(held);
    let sent = slow.join().expect("slow client");
    seen.push(format!(
        "{name}: the slow client sent {sent} bytes before being cut"
    ));
    assert!(sent < 20, "{name}: the slow client was never cut off");
    seen
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn malformed_huge_and_slow_requests_do_not_stop_balancing_or_answering() {
    let prefix = "lbabuse";
    {
        let lab = WebLab::new(prefix, 2);
        let topo = &lab.topo;
        topo.attach_xdp_pass_on_lb_port(lb::ebpf_object(), "xdp_pass")
            .expect("xdp_pass");
        let config = lab.config_all(&format!("metrics = \"{METRICS}\""), "");
        let mut daemon = LbDaemon::start(topo.lb(), &config, Launch::Nsenter).expect("lb run");
        let socket: PathBuf = api_socket_for(topo.lb());
        let pid = lb_pid(daemon.config_path());
        lb_status(&socket).expect("lb status");
        let (rss_before, hwm_before) = memory_kb(pid);

        // VIP traffic all along.
        let stop = Arc::new(AtomicBool::new(false));
        let vip = SocketAddr::new(IpAddr::V4(topo.vip_v4()), 80);
        let traffic = thread::scope(|scope| {
            // A failed assertion below must stop the traffic loop too: the scope joins every
            // thread before it passes the panic on, and would wait for this one forever.
            let _stop_on_unwind = StopOnDrop(&stop);
            let traffic = scope.spawn(|| {
                let mut failures = Vec::new();
                let mut answered = 0;
                while !stop.load(Ordering::Relaxed) {
                    let outcome = tcp_requests(topo.client(), vip, 10, Duration::from_secs(2))
                        .expect("client");
                    answered += outcome.answered();
                    failures.extend(outcome.failures);
                }
                (answered, failures)
            });
            let unix: Connect = {
                let socket = socket.clone();
                Arc::new(move || {
                    let stream = UnixStream::connect(&socket)?;
                    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
                    stream.set_write_timeout(Some(Duration::from_secs(3)))?;
                    Ok(Box::new(stream) as Box<dyn Stream>)
                })
            };
            let tcp: Connect = Arc::new(|| {
                // With a full accept queue a plain connect retries its SYN for minutes.
                let address: SocketAddr = METRICS.parse().expect("metrics address");
                let stream = TcpStream::connect_timeout(&address, Duration::from_secs(3))?;
                stream.set_read_timeout(Some(Duration::from_secs(3)))?;
                stream.set_write_timeout(Some(Duration::from_secs(3)))?;
                Ok(Box::new(stream) as Box<dyn Stream>)
            });
            let control = scope.spawn(move || abuse("control API", unix));
            // Sockets made in the lb namespace (threads started there stay there).
            let metrics = scope.spawn(|| topo.lb().run(move || abuse("metrics", tcp)));
            // `lb status` answers within a second all along.
            let mut slowest = Duration::ZERO;
            while !control.is_finished() || !metrics.is_finished() {
                let started = Instant::now();
                lb_status(&socket).expect("lb status during the abuse");
                slowest = slowest.max(started.elapsed());
                thread::sleep(Duration::from_millis(200));
            }
            for line in control.join().expect("control abuse") {
                eprintln!("{line}");
            }
            for line in metrics.join().expect("metrics abuse") {
                eprintln!("{line}");
            }
            eprintln!("slowest lb status during the abuse: {slowest:?}");
            assert!(
                slowest < Duration::from_secs(1),
                "lb status took {slowest:?}"
            );
            stop.store(true, Ordering::Relaxed);
            traffic.join().expect("traffic")
        });
        let (answered, failures) = traffic;
        eprintln!("{answered} VIP connections during the abuse");
        assert!(failures.is_empty(), "VIP connections failed: {failures:?}");
        assert!(answered >= 20, "only {answered} VIP connections");

        assert!(daemon.is_running(), "lb died: {}", daemon.log_tail(30));
        let started = Instant::now();
        lb_status(&socket).expect("lb status after the abuse");
        assert!(started.elapsed() < Duration::from_secs(1));
        let (rss_after, hwm_after) = memory_kb(pid);
        eprintln!(
            "lb memory: VmRSS {rss_before} kB -> {rss_after} kB, VmHWM {hwm_before} kB -> \
             {hwm_after} kB"
        );
        assert!(
            rss_after.saturating_sub(rss_before) < RSS_GROWTH_BOUND_KB
                && hwm_after <= hwm_before.max(rss_before + RSS_GROWTH_BOUND_KB),
            "lb's memory grew from {rss_before} kB to {rss_after} kB (peak {hwm_after} kB)"
        );
        drop(daemon);
    }
    assert!(leftovers(prefix).is_empty(), "{:?}", leftovers(prefix));
}
