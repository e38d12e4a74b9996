//! The HTTP/1.1 connection loop shared by the daemon's two small servers (metrics on TCP, the
//! control API on a Unix socket): bounded connections, a header timeout, back-off on accept
//! errors, and a clean stop.

use std::{convert::Infallible, future::Future, io, time::Duration};

use http_body_util::Full;
use hyper::{
    Request, Response,
    body::{Bytes, Incoming},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    task::JoinSet,
};
use tracing::{debug, warn};

/// Most connections served at once; a new one beyond this is closed at once.
const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
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

/// Serves every connection of `listener` with `respond` until `shutdown` completes, then closes
/// the connections still open. `name` prefixes the log lines.
pub async fn serve<L, R, F>(name: &'static str, listener: L, respond: R, shutdown: impl Future)
where
    L: Listener,
    R: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept_stream() => {
                let stream = match accepted {
                    Ok(stream) => stream,
                    Err(e) => {
                        warn!("{name}: accepting a connection failed: {e}");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                if connections.len() >= MAX_CONNECTIONS {
                    debug!("{name}: {MAX_CONNECTIONS} connections open, closing a new one");
                    continue;
                }
                let respond = respond.clone();
                connections.spawn(async move {
                    let service = service_fn(move |request| {
                        let response = respond(request);
                        async move { Ok::<_, Infallible>(response.await) }
                    });
                    let served = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_READ_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    if let Err(e) = served {
                        debug!("{name}: connection: {e}");
                    }
                });
            }
        }
    }
    // Dropping the set aborts the connections still open.
    connections.shutdown().await;
}
