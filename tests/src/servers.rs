//! Real servers for the backends, and clients that talk to them, all inside namespaces.
//!
//! Protocol (TCP): the client sends lines; for every line the server answers `"<identity>\n"`. A
//! client that half-closes without sending anything still gets one answer, so `nc -N` style probes
//! work, and a client that just connects and closes (a TCP health check) is fine too. The
//! connection stays open until the peer closes it, so long-lived flows are possible.
//!
//! Protocol (UDP): every datagram is answered with `"<identity>\n"` to its sender.
//!
//! Servers bind the wildcard address (`0.0.0.0:port` or `[::]:port`), so they also accept traffic
//! for the VIPs on the backends' `lo`. They stop, and their threads are joined, when dropped.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, ErrorKind, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use crate::netns::NetNs;

/// How often server threads look at their stop flag.
const STOP_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The line a client sends with each request.
pub const REQUEST_LINE: &str = "hello\n";

/// A server's thread and the flag that stops it: set and joined on drop.
#[derive(Debug)]
struct ServerThread {
    /// `tcp server 10.0.0.11`, for the warning if the thread panicked.
    what: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ServerThread {
    /// Starts `body` on a thread named `name`; it must return soon after its flag is set.
    fn spawn(
        name: String,
        what: String,
        body: impl FnOnce(Arc<AtomicBool>) + Send + 'static,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || body(flag))
            .with_context(|| format!("cannot start the thread of {what}"))?;
        Ok(Self {
            what,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("warning: the thread of {} panicked", self.what);
        }
    }
}

/// Counters shared between a server and its threads.
#[derive(Debug, Default)]
struct ServerCounters {
    accepted: AtomicU64,
    active: AtomicU64,
    replies: AtomicU64,
}

/// A TCP server that answers every line with its identity (see the module documentation).
#[derive(Debug)]
pub struct TcpIdentityServer {
    local_address: SocketAddr,
    identity: String,
    counters: Arc<ServerCounters>,
    _acceptor: ServerThread,
}

impl TcpIdentityServer {
    /// Binds `bind` inside `namespace` (port 0 picks a free port: see
    /// [`TcpIdentityServer::local_address`]) and starts accepting.
    pub fn start(namespace: &NetNs, bind: SocketAddr, identity: impl Into<String>) -> Result<Self> {
        let identity = identity.into();
        let listener = namespace
            .try_run(|| TcpListener::bind(bind))?
            .with_context(|| format!("cannot listen on tcp {bind} in {}", namespace.name()))?;
        listener
            .set_nonblocking(true)
            .context("cannot make the listener non-blocking")?;
        let local_address = listener.local_addr().context("listener has no address")?;
        let counters = Arc::new(ServerCounters::default());
        let acceptor = {
            let counters = Arc::clone(&counters);
            let identity = identity.clone();
            ServerThread::spawn(
                format!("tcp-{identity}"),
                format!("tcp server {identity}"),
                move |stop| accept_loop(&listener, &identity, &counters, &stop),
            )?
        };
        Ok(Self {
            local_address,
            identity,
            counters,
            _acceptor: acceptor,
        })
    }

    /// The bound address (with the real port if `bind` had port 0).
    pub fn local_address(&self) -> SocketAddr {
        self.local_address
    }
    /// The identity this server answers with.
    pub fn identity(&self) -> &str {
        &self.identity
    }
    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.counters.accepted.load(Ordering::Relaxed)
    }
    /// Connections currently open.
    pub fn active_connections(&self) -> u64 {
        self.counters.active.load(Ordering::Relaxed)
    }
    /// Answers sent so far, over all connections.
    pub fn replies(&self) -> u64 {
        self.counters.replies.load(Ordering::Relaxed)
    }
}

fn accept_loop(
    listener: &TcpListener,
    identity: &str,
    counters: &Arc<ServerCounters>,
    stop: &Arc<AtomicBool>,
) {
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _peer)) => {
                counters.accepted.fetch_add(1, Ordering::Relaxed);
                counters.active.fetch_add(1, Ordering::Relaxed);
                let counters = Arc::clone(counters);
                let stop = Arc::clone(stop);
                let connection_identity = identity.to_owned();
                let spawned = std::thread::Builder::new()
                    .name(format!("tcp-{identity}-conn"))
                    .spawn(move || {
                        let identity = connection_identity;
                        if let Err(error) = serve_connection(stream, &identity, &counters, &stop) {
                            // Peers resetting or vanishing is normal in these tests.
                            if !matches!(
                                error.kind(),
                                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
                            ) {
                                eprintln!("tcp server {identity}: connection error: {error}");
                            }
                        }
                        counters.active.fetch_sub(1, Ordering::Relaxed);
                    });
                match spawned {
                    Ok(handle) => connections.push(handle),
                    Err(error) => {
                        eprintln!("tcp server {identity}: cannot start a thread: {error}")
                    }
                }
                connections.retain(|handle| !handle.is_finished());
            }
            Err(error) if error.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(STOP_POLL_INTERVAL);
            }
            Err(error) => {
                eprintln!("tcp server {identity}: accept failed: {error}");
                std::thread::sleep(STOP_POLL_INTERVAL);
            }
        }
    }
    for connection in connections {
        let _ = connection.join();
    }
}

fn serve_connection(
    stream: TcpStream,
    identity: &str,
    counters: &ServerCounters,
    stop: &AtomicBool,
) -> io::Result<()> {
    // Accepted sockets do not inherit the listener's non-blocking mode on Linux; make sure.
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(STOP_POLL_INTERVAL))?;
    let answer = format!("{identity}\n");
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    let mut answered_any = false;
    while !stop.load(Ordering::Relaxed) {
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => {
                // End of stream: a leftover partial line, or a client that sent nothing at all,
                // still gets its answer.
                if !line.is_empty() || !answered_any {
                    // Counted before sending, so a client that has its answer sees it counted.
                    counters.replies.fetch_add(1, Ordering::Relaxed);
                    writer.write_all(answer.as_bytes())?;
                }
                break;
            }
            Ok(_) if line.ends_with(b"\n") => {
                counters.replies.fetch_add(1, Ordering::Relaxed);
                writer.write_all(answer.as_bytes())?;
                answered_any = true;
                line.clear();
            }
            // Bytes without a newline so far: `read_until` keeps them in `line`; read on.
            Ok(_) => {}
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    let _ = writer.shutdown(Shutdown::Both);
    Ok(())
}

/// A UDP server that answers every datagram with `"<identity>\n"`.
#[derive(Debug)]
pub struct UdpIdentityServer {
    local_address: SocketAddr,
    identity: String,
    received: Arc<AtomicU64>,
    _worker: ServerThread,
}

impl UdpIdentityServer {
    /// Binds `bind` inside `namespace` and starts answering.
    pub fn start(namespace: &NetNs, bind: SocketAddr, identity: impl Into<String>) -> Result<Self> {
        let identity = identity.into();
        let socket = namespace
            .try_run(|| UdpSocket::bind(bind))?
            .with_context(|| format!("cannot bind udp {bind} in {}", namespace.name()))?;
        socket
            .set_read_timeout(Some(STOP_POLL_INTERVAL))
            .context("cannot set the socket's read timeout")?;
        let local_address = socket.local_addr().context("socket has no address")?;
        let received = Arc::new(AtomicU64::new(0));
        let worker = {
            let received = Arc::clone(&received);
            let answer = format!("{identity}\n");
            ServerThread::spawn(
                format!("udp-{identity}"),
                format!("udp server {identity}"),
                move |stop| {
                    let mut buffer = [0u8; 65536];
                    while !stop.load(Ordering::Relaxed) {
                        match socket.recv_from(&mut buffer) {
                            Ok((_, peer)) => {
                                received.fetch_add(1, Ordering::Relaxed);
                                if let Err(error) = socket.send_to(answer.as_bytes(), peer) {
                                    eprintln!("udp server: cannot answer {peer}: {error}");
                                }
                            }
                            Err(error)
                                if matches!(
                                    error.kind(),
                                    ErrorKind::WouldBlock
                                        | ErrorKind::TimedOut
                                        | ErrorKind::Interrupted
                                ) => {}
                            Err(error) => {
                                eprintln!("udp server: receive failed: {error}");
                                std::thread::sleep(STOP_POLL_INTERVAL);
                            }
                        }
                    }
                },
            )?
        };
        Ok(Self {
            local_address,
            identity,
            received,
            _worker: worker,
        })
    }

    /// The bound address (with the real port if `bind` had port 0).
    pub fn local_address(&self) -> SocketAddr {
        self.local_address
    }
    /// The identity this server answers with.
    pub fn identity(&self) -> &str {
        &self.identity
    }
    /// Datagrams received (and answered) so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// Outcome of a batch of requests: answers counted per identity, and every failure's error text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    pub per_identity: BTreeMap<String, u64>,
    pub failures: Vec<String>,
}

impl BatchOutcome {
    /// Number of requests that got an answer.
    pub fn answered(&self) -> u64 {
        self.per_identity.values().sum()
    }

    fn record(&mut self, request_number: usize, result: Result<String>) {
        match result {
            Ok(identity) => *self.per_identity.entry(identity).or_default() += 1,
            Err(error) => self
                .failures
                .push(format!("request {request_number}: {error:#}")),
        }
    }
}

/// One TCP request from inside the current thread's namespace.
fn tcp_request_here(target: SocketAddr, timeout: Duration) -> Result<String> {
    let mut client = TcpLineClient::connect_here(target, timeout)?;
    client.request("hello")
}

/// Connects to `target` from inside `namespace`, sends `"hello\n"` and returns the answer line
/// (without its newline).
pub fn tcp_request(namespace: &NetNs, target: SocketAddr, timeout: Duration) -> Result<String> {
    namespace.try_run(|| tcp_request_here(target, timeout))?
}

/// `count` sequential [`tcp_request`]s (each a new connection, so a new source port and flow) on
/// one thread inside `namespace`.
pub fn tcp_requests(
    namespace: &NetNs,
    target: SocketAddr,
    count: usize,
    timeout: Duration,
) -> Result<BatchOutcome> {
    namespace.try_run(|| {
        let mut outcome = BatchOutcome::default();
        for request_number in 0..count {
            outcome.record(request_number, tcp_request_here(target, timeout));
        }
        outcome
    })
}

/// One UDP request from inside the current thread's namespace, from a fresh socket (new source
/// port).
fn udp_request_here(target: SocketAddr, timeout: Duration) -> Result<String> {
    let wildcard: SocketAddr = if target.is_ipv6() {
        "[::]:0".parse().context("IPv6 wildcard")?
    } else {
        "0.0.0.0:0".parse().context("IPv4 wildcard")?
    };
    let socket = UdpSocket::bind(wildcard).context("cannot bind a udp socket")?;
    socket
        .set_read_timeout(Some(timeout))
        .context("cannot set the read timeout")?;
    socket
        .connect(target)
        .with_context(|| format!("cannot connect udp to {target}"))?;
    socket
        .send(REQUEST_LINE.as_bytes())
        .with_context(|| format!("cannot send to {target}"))?;
    let mut buffer = [0u8; 2048];
    let length = socket
        .recv(&mut buffer)
        .map_err(|error| match error.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                anyhow!("no answer from udp {target} within {timeout:?}")
            }
            _ => anyhow!(error).context(format!("cannot receive from udp {target}")),
        })?;
    let answer = std::str::from_utf8(&buffer[..length]).context("answer is not UTF-8")?;
    Ok(answer.trim_end_matches('\n').to_owned())
}

/// Sends `"hello\n"` to `target` from a fresh UDP socket inside `namespace` and returns the
/// answer (without its newline).
pub fn udp_request(namespace: &NetNs, target: SocketAddr, timeout: Duration) -> Result<String> {
    namespace.try_run(|| udp_request_here(target, timeout))?
}

/// `count` sequential [`udp_request`]s, each from a fresh socket (new source port, new flow), on
/// one thread inside `namespace`.
pub fn udp_requests(
    namespace: &NetNs,
    target: SocketAddr,
    count: usize,
    timeout: Duration,
) -> Result<BatchOutcome> {
    namespace.try_run(|| {
        let mut outcome = BatchOutcome::default();
        for request_number in 0..count {
            outcome.record(request_number, udp_request_here(target, timeout));
        }
        outcome
    })
}

/// A TCP connection from `local` to `target` (`SO_REUSEADDR`, so a test may reuse a port
/// whose earlier connection is in TIME_WAIT); Linux bounds a blocking connect by the socket's
/// send timeout, set to `timeout`.
fn connect_bound(local: SocketAddr, target: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, setsockopt, socket,
        sockopt,
    };
    use std::os::fd::AsRawFd;
    let family = if local.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .context("cannot create a TCP socket")?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).context("cannot set SO_REUSEADDR")?;
    let micros = i64::try_from(timeout.as_micros()).unwrap_or(i64::MAX);
    setsockopt(
        &fd,
        sockopt::SendTimeout,
        &nix::sys::time::TimeVal::new(micros / 1_000_000, (micros % 1_000_000) as _),
    )
    .context("cannot set SO_SNDTIMEO")?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(local))
        .with_context(|| format!("cannot bind {local}"))?;
    connect(fd.as_raw_fd(), &SockaddrStorage::from(target)).with_context(|| {
        format!("cannot connect from {local} to tcp {target} within {timeout:?}")
    })?;
    Ok(TcpStream::from(fd))
}

/// A long-lived TCP connection made from inside a namespace: each [`TcpLineClient::request`]
/// sends a line and reads the answer line on the same connection (same flow).
#[derive(Debug)]
pub struct TcpLineClient {
    target: SocketAddr,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl TcpLineClient {
    /// Connects to `target` from inside `namespace`; `timeout` bounds the connect and every read
    /// and write later.
    pub fn connect(namespace: &NetNs, target: SocketAddr, timeout: Duration) -> Result<Self> {
        namespace.try_run(|| Self::connect_here(target, timeout))?
    }

    /// [`TcpLineClient::connect`] from the fixed address and port `local` (so the test knows
    /// the flow's 5-tuple before it begins).
    pub fn connect_from(
        namespace: &NetNs,
        local: SocketAddr,
        target: SocketAddr,
        timeout: Duration,
    ) -> Result<Self> {
        namespace.try_run(|| {
            let stream = connect_bound(local, target, timeout)?;
            Self::with_stream(stream, target, timeout)
        })?
    }

    fn connect_here(target: SocketAddr, timeout: Duration) -> Result<Self> {
        let stream = TcpStream::connect_timeout(&target, timeout)
            .with_context(|| format!("cannot connect to tcp {target} within {timeout:?}"))?;
        Self::with_stream(stream, target, timeout)
    }

    fn with_stream(stream: TcpStream, target: SocketAddr, timeout: Duration) -> Result<Self> {
        stream
            .set_read_timeout(Some(timeout))
            .context("cannot set the read timeout")?;
        stream
            .set_write_timeout(Some(timeout))
            .context("cannot set the write timeout")?;
        stream.set_nodelay(true).context("cannot set TCP_NODELAY")?;
        let writer = stream.try_clone().context("cannot clone the stream")?;
        Ok(Self {
            target,
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// The server's address.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// The client's own address (its source port identifies the flow).
    pub fn local_address(&self) -> Result<SocketAddr> {
        self.writer
            .local_addr()
            .context("socket has no local address")
    }

    /// Sends `line` (a newline is appended) and returns the answer line without its newline.
    pub fn request(&mut self, line: &str) -> Result<String> {
        let target = self.target;
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .with_context(|| format!("cannot send to tcp {target}"))?;
        let mut answer = String::new();
        let length = self
            .reader
            .read_line(&mut answer)
            .map_err(|error| match error.kind() {
                ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                    anyhow!("no answer from tcp {target} in time")
                }
                _ => anyhow!(error).context(format!("cannot read from tcp {target}")),
            })?;
        if length == 0 {
            bail!("tcp {target} closed the connection without answering");
        }
        if !answer.ends_with('\n') {
            bail!("tcp {target} sent a partial line {answer:?} and closed");
        }
        answer.pop();
        Ok(answer)
    }
}
