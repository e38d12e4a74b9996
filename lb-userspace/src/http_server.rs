//! The HTTP/1.1 connection loop shared by the daemon's two small servers (metrics on TCP, the
//! control API on a Unix socket), hardened against malformed, huge and slow clients:
//!
//! - at most [`Limits::max_connections`] connections at once; when a new one arrives at the cap,
//!   the oldest connection without a request in flight (a slow or idle client) is closed to make
//!   room, and only when every connection has a request in flight is the new one closed at once;
//! - request headers (and the next request on a keep-alive connection) within
//!   [`Limits::header_read_timeout`], in at most [`Limits::max_header_bytes`] (else 431);
//! - a request body larger than [`Limits::max_body_bytes`] is answered 413 from its
//!   `Content-Length` alone, and the connection closed without reading it (no route reads a
//!   body; an unread one of any size is never buffered);
//! - a connection lives at most [`Limits::max_connection_age`]: it is then asked to close after
//!   its request in flight, and closed regardless [`Limits::close_grace`] later (a client that
//!   never reads its answer);
//! - back-off on accept errors, and a clean stop.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::{convert::Infallible, future::Future, io, time::Duration};

use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    task::{AbortHandle, JoinSet},
    time::Instant,
};
use tracing::{debug, warn};

/// The limits of one server; [`LIMITS`] in the daemon.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers, counted from the connection's
    /// start or the end of its previous answer (so also the keep-alive idle timeout).
    pub header_read_timeout: Duration,
    /// Largest request head (request line and headers) in bytes; hyper's minimum is 8 KiB.
    pub max_header_bytes: usize,
    /// Largest request body (by its `Content-Length`) answered normally; larger gets 413.
    pub max_body_bytes: u64,
    /// How long a connection may stay open before it is asked to close.
    pub max_connection_age: Duration,
    /// How long a connection asked to close may take to finish its request in flight.
    pub close_grace: Duration,
}

/// The daemon's limits. Its clients are `lb` (one short request per connection) and Prometheus
/// (a scrape every few seconds, often on a keep-alive connection): both send their headers in
/// milliseconds and no body, so these only ever stop broken or hostile clients.
pub const LIMITS: Limits = Limits {
    max_connections: 64,
    header_read_timeout: Duration::from_secs(5),
    max_header_bytes: 16 * 1024,
    max_body_bytes: 64 * 1024,
    max_connection_age: Duration::from_secs(30),
    // Longer than the control API's 10 s wait for the daemon's loop, so its answer still arrives.
    close_grace: Duration::from_secs(15),
};

/// Pause after a failed `accept` (out of file descriptors, ...), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A bound listener whose connections can be served.
pub trait Listener {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept_stream(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

impl Listener for TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_stream(&self) -> io::Result<Self::Stream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

impl Listener for UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_stream(&self) -> io::Result<Self::Stream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

/// Serves every connection of `listener` with `respond` within [`LIMITS`] until `shutdown`
/// completes, then closes the connections still open. `name` prefixes the log lines.
pub async fn serve<L, R, F>(name: &'static str, listener: L, respond: R, shutdown: impl Future)
where
    L: Listener,
    R: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    serve_with(name, listener, respond, shutdown, LIMITS).await;
}

/// An open connection, as the accept loop tracks it.
struct Open {
    abort: AbortHandle,
    accepted: Instant,
    /// Requests of the connection being answered (0 or 1: HTTP/1.1 answers in order).
    in_flight: Arc<AtomicUsize>,
}

/// Decrements a connection's in-flight count when its request is answered or abandoned.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn start(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(count))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// [`serve`] with other `limits` (the tests' are short).
pub async fn serve_with<L, R, F>(
    name: &'static str,
    listener: L,
    respond: R,
    shutdown: impl Future,
    limits: Limits,
) where
    L: Listener,
    R: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let mut connections = JoinSet::new();
    let mut open: HashMap<tokio::task::Id, Open> = HashMap::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(joined) = connections.join_next_with_id(), if !connections.is_empty() => {
                let id = match joined {
                    Ok((id, ())) => id,
                    Err(e) => {
                        if e.is_panic() {
                            warn!("{name}: a connection's task panicked: {e}");
                        }
                        e.id()
                    }
                };
                open.remove(&id);
            }
            accepted = listener.accept_stream() => {
                let stream = match accepted {
                    Ok(stream) => stream,
                    Err(e) => {
                        warn!("{name}: accepting a connection failed: {e}");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                if open.len() >= limits.max_connections && !evict_one(&mut open) {
                    debug!(
                        "{name}: {} connections open, each with a request in flight: closing a \
                         new one",
                        open.len()
                    );
                    continue;
                }
                let in_flight = Arc::new(AtomicUsize::new(0));
                let abort = connections.spawn(connection(
                    name,
                    stream,
                    respond.clone(),
                    Arc::clone(&in_flight),
                    limits,
                ));
                open.insert(abort.id(), Open { abort, accepted: Instant::now(), in_flight });
            }
        }
    }
    // Dropping the set aborts the connections still open.
    connections.shutdown().await;
}

/// How long a new connection is spared from eviction: time to send its request. Without it, a
/// client whose connection was just accepted (its task not yet run on a loaded machine) is the
/// one closed once a flood has evicted every older idle connection.
const EVICTION_GRACE: Duration = Duration::from_millis(250);

/// Closes the oldest connection without a request in flight, sparing connections younger than
/// [`EVICTION_GRACE`] while older idle ones exist; false if every one has a request in flight.
fn evict_one(open: &mut HashMap<tokio::task::Id, Open>) -> bool {
    let now = Instant::now();
    let idle = || {
        open.iter()
            .filter(|(_, o)| o.in_flight.load(Ordering::Relaxed) == 0)
    };
    let oldest = idle()
        .filter(|(_, o)| now.duration_since(o.accepted) >= EVICTION_GRACE)
        .min_by_key(|(_, o)| o.accepted)
        .or_else(|| idle().min_by_key(|(_, o)| o.accepted))
        .map(|(id, _)| *id);
    match oldest.and_then(|id| open.remove(&id)) {
        Some(evicted) => {
            evicted.abort.abort();
            true
        }
        None => false,
    }
}

/// Serves one connection within `limits`.
async fn connection<S, R, F>(
    name: &'static str,
    stream: S,
    respond: R,
    in_flight: Arc<AtomicUsize>,
    limits: Limits,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    R: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let service = service_fn(move |request: Request<Incoming>| {
        let busy = InFlight::start(&in_flight);
        let too_large = body_length(&request).is_some_and(|n| n > limits.max_body_bytes);
        let response = (!too_large).then(|| respond(request));
        async move {
            let response = match response {
                Some(response) => response.await,
                None => payload_too_large(limits.max_body_bytes),
            };
            drop(busy);
            Ok::<_, Infallible>(response)
        }
    });
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .serve_connection(TokioIo::new(stream), service);
    let mut served = std::pin::pin!(served);
    let result = tokio::select! {
        result = served.as_mut() => result,
        _ = tokio::time::sleep(limits.max_connection_age) => {
            served.as_mut().graceful_shutdown();
            match tokio::time::timeout(limits.close_grace, served.as_mut()).await {
                Ok(result) => result,
                Err(_) => {
                    debug!(
                        "{name}: closing a connection {:?} old that did not finish its request",
                        limits.max_connection_age + limits.close_grace
                    );
                    return;
                }
            }
        }
    };
    if let Err(e) = result {
        debug!("{name}: connection: {e}");
    }
}

/// The request's `Content-Length`; `None` without one (no body, or a chunked one). An
/// unparsable one never gets here: hyper answers it 400.
fn body_length(request: &Request<Incoming>) -> Option<u64> {
    request
        .headers()
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// 413, and `Connection: close`: the body is not read, so the connection cannot carry another
/// request.
fn payload_too_large(limit: u64) -> Response<Full<Bytes>> {
    let body = format!(
        "{{\"error\":\"request body too large: at most {limit} bytes (no request of this API \
         has a body)\"}}"
    );
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::sync::oneshot;

    use super::*;

    /// Short limits, so each test takes well under a second.
    const TEST: Limits = Limits {
        max_connections: 4,
        header_read_timeout: Duration::from_millis(300),
        max_header_bytes: 8192,
        max_body_bytes: 1024,
        max_connection_age: Duration::from_secs(5),
        close_grace: Duration::from_millis(300),
    };

    /// A server with `limits`: `/hang` never answers, anything else is `200 ok`. Stops when the
    /// returned sender is dropped.
    async fn start(limits: Limits) -> (SocketAddr, oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let respond = |request: Request<Incoming>| async move {
            if request.uri().path() == "/hang" {
                std::future::pending::<()>().await;
            }
            Response::new(Full::new(Bytes::from_static(b"ok")))
        };
        tokio::spawn(serve_with("test", listener, respond, stopped, limits));
        (addr, stop)
    }

    /// Sends `request` and reads until the server closes or `wait` passes: what was read, and
    /// whether the server closed the connection.
    async fn exchange(addr: SocketAddr, request: &[u8], wait: Duration) -> (String, bool) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        read_until_closed(&mut stream, wait).await
    }

    async fn read_until_closed(stream: &mut TcpStream, wait: Duration) -> (String, bool) {
        let mut read = Vec::new();
        let mut buf = [0; 4096];
        let deadline = Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
                Err(_) => return (String::from_utf8_lossy(&read).into_owned(), false),
                Ok(Ok(0) | Err(_)) => return (String::from_utf8_lossy(&read).into_owned(), true),
                Ok(Ok(n)) => read.extend_from_slice(&buf[..n]),
            }
        }
    }

    async fn get_ok(addr: SocketAddr) {
        let (answer, _) = exchange(
            addr,
            b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
            Duration::from_secs(2),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer:?}");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_gets_413_without_being_sent() {
        let (addr, _stop) = start(TEST).await;
        // Claims 10 MB and sends none of it: the answer must not wait for the body.
        let (answer, closed) = exchange(
            addr,
            b"POST /reload HTTP/1.1\r\nhost: x\r\ncontent-length: 10485760\r\n\r\n",
            Duration::from_secs(2),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 413 "), "{answer:?}");
        assert!(answer.contains("at most 1024 bytes"), "{answer:?}");
        assert!(closed, "the connection stayed open after a 413");
        // At the limit it is answered.
        let mut request = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1024\r\n\r\n".to_vec();
        request.extend_from_slice(&[b'{'; 1024]);
        let (answer, _) = exchange(addr, &request, Duration::from_millis(500)).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer:?}");
    }

    #[tokio::test]
    async fn a_10_mb_body_is_answered_413_while_it_is_being_sent() {
        let (addr, _stop) = start(TEST).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let head = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 10485760\r\n\r\n";
        stream.write_all(head).await.unwrap();
        // The server stops reading: writing all 10 MB fails or stalls (the socket buffers fill),
        // but the 413 is there to read.
        let chunk = vec![b'x'; 64 * 1024];
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            for _ in 0..160 {
                if stream.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        })
        .await;
        let (answer, _) = read_until_closed(&mut stream, Duration::from_secs(1)).await;
        assert!(answer.starts_with("HTTP/1.1 413 "), "{answer:?}");
        get_ok(addr).await;
    }

    #[tokio::test]
    async fn slow_headers_are_cut_at_the_header_timeout() {
        let (addr, _stop) = start(TEST).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        // One byte every 50 ms: the headers would take 2 s.
        let request = b"GET / HTTP/1.1\r\nhost: x\r\nx-slow: aaaaaaaaaaaaa\r\n\r\n";
        let mut closed_after = None;
        for byte in request {
            if stream.write_all(&[*byte]).await.is_err() {
                closed_after = Some(started.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            let mut buf = [0; 256];
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_millis(1), stream.read(&mut buf)).await
            {
                closed_after = Some(started.elapsed());
                break;
            }
        }
        let closed_after = closed_after.expect("the slow client was never cut off");
        assert!(
            closed_after >= TEST.header_read_timeout && closed_after < Duration::from_secs(1),
            "closed after {closed_after:?}"
        );
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_at_the_header_timeout() {
        let (addr, _stop) = start(TEST).await;
        let started = Instant::now();
        let (answer, closed) = exchange(addr, b"", Duration::from_secs(2)).await;
        assert!(closed, "an idle connection stayed open");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        // hyper may answer 408 before closing; nothing else.
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
            "{answer:?}"
        );
    }

    #[tokio::test]
    async fn huge_headers_get_431_or_a_close() {
        let (addr, _stop) = start(TEST).await;
        let mut request = b"GET / HTTP/1.1\r\nhost: x\r\nx-big: ".to_vec();
        request.extend(std::iter::repeat_n(b'a', 100_000));
        request.extend_from_slice(b"\r\n\r\n");
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let _ = stream.write_all(&request).await;
        let (answer, closed) = read_until_closed(&mut stream, Duration::from_secs(2)).await;
        assert!(closed);
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
            "{answer:?}"
        );
        get_ok(addr).await;
    }

    #[tokio::test]
    async fn garbage_gets_400_and_the_server_goes_on() {
        let (addr, _stop) = start(TEST).await;
        for garbage in [
            &b"\x00\x01\x02\xff\xfe\r\n\r\n"[..],
            b"GET\r\n\r\n",
            b"GET / HTTP/9.9\r\n\r\n",
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: -1\r\n\r\n",
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 99999999999999999999999\r\n\r\n",
        ] {
            let (answer, _) = exchange(addr, garbage, Duration::from_secs(1)).await;
            assert!(
                answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
                "{:?}: {answer:?}",
                garbage.escape_ascii().to_string()
            );
        }
        // A broken chunked body is never read (no route reads one): answered, then closed.
        let (answer, closed) = exchange(
            addr,
            b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            Duration::from_secs(1),
        )
        .await;
        assert!(
            answer.starts_with("HTTP/1.1 200 OK") && closed,
            "{answer:?}"
        );
        get_ok(addr).await;
    }

    #[tokio::test]
    async fn at_the_cap_the_oldest_idle_connection_makes_room() {
        let limits = Limits {
            header_read_timeout: Duration::from_secs(10),
            ..TEST
        };
        let (addr, _stop) = start(limits).await;
        let mut idle = Vec::new();
        for _ in 0..limits.max_connections {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Idle (slowloris) connections fill every slot, and still a new client is answered.
        get_ok(addr).await;
        let (_, closed) = read_until_closed(&mut idle[0], Duration::from_millis(500)).await;
        assert!(closed, "the oldest idle connection was not closed");
    }

    #[tokio::test]
    async fn at_the_cap_with_every_request_in_flight_a_new_connection_is_closed() {
        let (addr, _stop) = start(TEST).await;
        let mut hanging = Vec::new();
        for _ in 0..TEST.max_connections {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream
                .write_all(b"GET /hang HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            hanging.push(stream);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (answer, closed) = exchange(
            addr,
            b"GET / HTTP/1.1\r\nhost: x\r\n\r\n",
            Duration::from_millis(500),
        )
        .await;
        assert!(closed && answer.is_empty(), "{answer:?}");
    }

    #[tokio::test]
    async fn a_connection_is_closed_after_its_age_and_grace() {
        let limits = Limits {
            max_connection_age: Duration::from_millis(200),
            close_grace: Duration::from_millis(200),
            ..TEST
        };
        let (addr, _stop) = start(limits).await;
        let started = Instant::now();
        // A request that is never answered (or a client that never reads): cut at age + grace.
        let (_, closed) = exchange(
            addr,
            b"GET /hang HTTP/1.1\r\nhost: x\r\n\r\n",
            Duration::from_secs(2),
        )
        .await;
        let elapsed = started.elapsed();
        assert!(closed, "the connection outlived its age");
        assert!(
            elapsed >= Duration::from_millis(400) && elapsed < Duration::from_secs(1),
            "{elapsed:?}"
        );
        // A keep-alive connection answers within its age, then is closed.
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let (answer, closed) = read_until_closed(&mut stream, Duration::from_secs(1)).await;
        assert!(
            answer.starts_with("HTTP/1.1 200 OK") && closed,
            "{answer:?}"
        );
    }
}
