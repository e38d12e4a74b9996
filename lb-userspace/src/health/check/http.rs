//! HTTP/1.1 `GET` check, with hyper's client connection (no pooling: one connection per check).

use std::error::Error as _;
use std::io;
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::header::{CONNECTION, HOST, USER_AGENT};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{CheckFuture, CheckOutcome, CheckTarget, HealthCheck, io_reason};

/// The `User-Agent` the check sends.
const USER_AGENT_VALUE: &str = concat!("lb-health-check/", env!("CARGO_PKG_VERSION"));

/// Healthy when `GET path` answers with a status in `expect_status` (reason `ok`); any other
/// status fails with reason `HTTP 503`. An empty `expect_status` accepts no status at all.
///
/// The request carries `Host: host`, or `Host: address:port` (`[v6]:port`) without one, and
/// `Connection: close`. Only the status line and headers are read: the body is ignored and the
/// connection reset as soon as the status is known (`SO_LINGER` 0, as for the TCP check: no
/// TIME_WAIT socket stays on the load balancer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpCheck {
    /// Origin-form request target: `/health`, `/status?full=1`.
    pub path: String,
    pub expect_status: Vec<u16>,
    pub host: Option<String>,
}

impl HttpCheck {
    /// The `Host` header value for `target`.
    pub fn host_header(&self, target: &CheckTarget) -> String {
        match &self.host {
            Some(host) => host.clone(),
            None => target.socket_addr().to_string(),
        }
    }

    /// Connects, sends the request and returns the response's status, or the failure's reason.
    async fn status(&self, target: &CheckTarget) -> Result<StatusCode, String> {
        if !self.path.starts_with('/') {
            return Err(format!("invalid path {:?}: must start with /", self.path));
        }
        let request = Request::builder()
            .method(Method::GET)
            .uri(self.path.as_str())
            .header(HOST, self.host_header(target))
            .header(USER_AGENT, USER_AGENT_VALUE)
            .header(CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|error| format!("invalid request: {error}"))?;

        let stream = TcpStream::connect(target.socket_addr())
            .await
            .map_err(|error| io_reason(&error))?;
        // The request is one small write: send it at once.
        let _ = stream.set_nodelay(true);
        // Dropped with the connection below: a reset, not a FIN (see the type's docs).
        let _ = stream.set_zero_linger();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|error| hyper_reason(&error))?;

        // The connection future does the I/O; drive it here rather than in a spawned task, so
        // dropping this future (at the timeout) closes everything.
        let response = sender.send_request(request);
        tokio::pin!(connection);
        tokio::pin!(response);
        tokio::select! {
            biased;
            response = &mut response => response
                .map(|response| response.status())
                .map_err(|error| hyper_reason(&error)),
            ended = &mut connection => match ended {
                Err(error) => Err(hyper_reason(&error)),
                // Closed without an error: the response future holds why.
                Ok(()) => response
                    .await
                    .map(|response| response.status())
                    .map_err(|error| hyper_reason(&error)),
            },
        }
    }
}

impl HealthCheck for HttpCheck {
    fn check<'a>(&'a self, target: &'a CheckTarget, timeout: Duration) -> CheckFuture<'a> {
        Box::pin(async move {
            let started = Instant::now();
            let result = tokio::time::timeout(timeout, self.status(target)).await;
            let latency = started.elapsed();
            match result {
                Ok(Ok(status)) if self.expect_status.contains(&status.as_u16()) => {
                    CheckOutcome::ok(latency)
                }
                Ok(Ok(status)) => {
                    CheckOutcome::failed(format!("HTTP {}", status.as_u16()), latency)
                }
                Ok(Err(reason)) => CheckOutcome::failed(reason, latency),
                Err(_) => CheckOutcome::timed_out(timeout, latency),
            }
        })
    }

    fn kind(&self) -> &'static str {
        "http"
    }
}

/// A short reason for a hyper error: the socket error under it when there is one.
fn hyper_reason(error: &hyper::Error) -> String {
    let mut source = error.source();
    while let Some(cause) = source {
        if let Some(io_error) = cause.downcast_ref::<io::Error>() {
            return io_reason(io_error);
        }
        source = cause.source();
    }
    if error.is_incomplete_message() {
        "connection closed before response".to_owned()
    } else {
        error.to_string()
    }
}
