//! The control API's client: one HTTP/1.1 request per connection to the daemon's Unix socket,
//! with errors an operator can act on (no daemon there, not root, the daemon's refusal).

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::header::HOST;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use super::admin_path;
use super::model::{Admin, ReloadReport, StatusReport};

/// How long a request may take, connecting included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The pauses before each new attempt of a `GET` whose connection the daemon closed before
/// answering (or whose connect found the accept queue full). The daemon closes idle
/// connections to make room when a flood of them reaches its cap (`http_server`), and a
/// connection it has just accepted may look idle for the moment before its request is read; a
/// read is safe to repeat, so `lb status` repeats it rather than fail during such a flood.
/// Changes (`POST`) are never repeated.
const GET_RETRY_PAUSES: [Duration; 4] = [
    Duration::from_millis(10),
    Duration::from_millis(40),
    Duration::from_millis(100),
    Duration::from_millis(250),
];

/// Why a request to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing at the socket path, or nothing listening on it.
    #[error(
        "no lb daemon at {} (is `lb run` running? is `api` set to another path?)",
        socket.display()
    )]
    NoDaemon { socket: PathBuf },

    /// The socket is root only (mode 0600).
    #[error(
        "permission denied on {}: the control API is root only; run this as root (e.g. with sudo)",
        socket.display()
    )]
    PermissionDenied { socket: PathBuf },

    /// Any other failure to connect.
    #[error("cannot connect to the lb daemon at {}: {error}", socket.display())]
    Connect { socket: PathBuf, error: io::Error },

    /// The connection failed mid-request.
    #[error("talking to the lb daemon at {}: {error}", socket.display())]
    Http {
        socket: PathBuf,
        error: hyper::Error,
    },

    /// No full answer within [`REQUEST_TIMEOUT`].
    #[error(
        "the lb daemon at {} did not answer within {}s",
        socket.display(),
        REQUEST_TIMEOUT.as_secs()
    )]
    Timeout { socket: PathBuf },

    /// The daemon answered with an error status; `message` is its `error` text.
    #[error("{message}")]
    Refused { status: u16, message: String },

    /// The daemon's answer is not what the API promises.
    #[error("unexpected answer from the lb daemon at {}: {message}", socket.display())]
    BadAnswer { socket: PathBuf, message: String },
}

impl ClientError {
    fn connect(socket: &Path, error: io::Error) -> Self {
        let socket = socket.to_path_buf();
        match error.kind() {
            io::ErrorKind::NotFound
            | io::ErrorKind::NotADirectory
            | io::ErrorKind::ConnectionRefused => ClientError::NoDaemon { socket },
            io::ErrorKind::PermissionDenied => ClientError::PermissionDenied { socket },
            _ => ClientError::Connect { socket, error },
        }
    }
}

/// Sends `method path` (no body) to the daemon at `socket`; returns the status code and the
/// body, whatever the status. A `GET` cut off before its answer is tried again (see
/// [`GET_RETRY_PAUSES`]).
pub async fn request(
    socket: &Path,
    method: Method,
    path: &str,
) -> Result<(u16, String), ClientError> {
    let retries: &[Duration] = if method == Method::GET {
        &GET_RETRY_PAUSES
    } else {
        &[]
    };
    let mut pauses = retries.iter();
    loop {
        let answer = request_once(socket, method.clone(), path).await;
        // Cut off, or a full accept queue (a Unix socket refuses with EAGAIN then).
        let again = match &answer {
            Err(ClientError::Http { .. }) => true,
            Err(ClientError::Connect { error, .. }) => error.kind() == io::ErrorKind::WouldBlock,
            _ => false,
        };
        match pauses.next() {
            Some(&pause) if again => tokio::time::sleep(pause).await,
            _ => return answer,
        }
    }
}

/// One attempt of [`request`], on a connection of its own.
async fn request_once(
    socket: &Path,
    method: Method,
    path: &str,
) -> Result<(u16, String), ClientError> {
    let http = |error| ClientError::Http {
        socket: socket.to_path_buf(),
        error,
    };
    let exchange = async {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| ClientError::connect(socket, e))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        // Drives the connection; it ends when `sender` is dropped or the daemon hangs up.
        let driver = tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, "lb")
            .body(Empty::<Bytes>::new())
            .map_err(|e| ClientError::BadAnswer {
                socket: socket.to_path_buf(),
                message: format!("cannot build a request for {path}: {e}"),
            })?;
        let answered = async {
            let response = sender.send_request(request).await.map_err(http)?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.map_err(http)?;
            Ok((
                status,
                String::from_utf8_lossy(&body.to_bytes()).into_owned(),
            ))
        }
        .await;
        drop(sender);
        driver.abort();
        answered
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(ClientError::Timeout {
                socket: socket.to_path_buf(),
            })
        })
}

/// Sends `method path` and returns the body of a 2xx answer; any other status becomes
/// [`ClientError::Refused`] with the daemon's `{"error": ...}` text (or the raw body).
pub async fn call(socket: &Path, method: Method, path: &str) -> Result<String, ClientError> {
    let (status, body) = request(socket, method, path).await?;
    if (200..300).contains(&status) {
        return Ok(body);
    }
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("error")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("the daemon answered {status}: {}", body.trim()));
    Err(ClientError::Refused { status, message })
}

/// `GET /status`, as JSON (every field the daemon sends, known to this client or not).
pub async fn status_json(socket: &Path) -> Result<serde_json::Value, ClientError> {
    let body = call(socket, Method::GET, "/status").await?;
    serde_json::from_str(&body).map_err(|e| ClientError::BadAnswer {
        socket: socket.to_path_buf(),
        message: format!("GET /status is not JSON: {e}"),
    })
}

/// `GET /status`.
pub async fn status(socket: &Path) -> Result<StatusReport, ClientError> {
    let body = call(socket, Method::GET, "/status").await?;
    serde_json::from_str(&body).map_err(|e| ClientError::BadAnswer {
        socket: socket.to_path_buf(),
        message: format!("GET /status is not a status report: {e}"),
    })
}

/// `POST /vips/{vip}/backends/{backend}/{drain|disable|enable}`.
pub async fn set_admin(
    socket: &Path,
    vip: &str,
    backend: &str,
    admin: Admin,
) -> Result<(), ClientError> {
    call(socket, Method::POST, &admin_path(vip, backend, admin))
        .await
        .map(drop)
}

/// `POST /reload`: the daemon re-reads its config file; a refusal (invalid file, a setting a
/// reload cannot change) is [`ClientError::Refused`] with the reason.
pub async fn reload(socket: &Path) -> Result<ReloadReport, ClientError> {
    let body = call(socket, Method::POST, "/reload").await?;
    serde_json::from_str(&body).map_err(|e| ClientError::BadAnswer {
        socket: socket.to_path_buf(),
        message: format!("POST /reload is not a reload report: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    use super::*;

    /// A daemon stand-in that hangs up on its first `cut` connections without a word, then
    /// answers every request `200 ok`. Returns its socket and its connection count.
    fn flaky_daemon(name: &str, cut: usize) -> (PathBuf, Arc<AtomicUsize>) {
        let socket =
            std::env::temp_dir().join(format!("lb-client-{name}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).expect("bind");
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&connections);
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.expect("accept");
                let n = counted.fetch_add(1, Ordering::SeqCst);
                if n < cut {
                    drop(stream);
                    continue;
                }
                tokio::spawn(async move {
                    let mut buffer = [0u8; 1024];
                    let _ = stream.read(&mut buffer).await;
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                });
            }
        });
        (socket, connections)
    }

    #[tokio::test]
    async fn a_get_cut_off_before_its_answer_is_tried_again() {
        let (socket, connections) = flaky_daemon("get", 2);
        let answer = request(&socket, Method::GET, "/status").await;
        assert_eq!(
            answer.expect("answered on the third connection"),
            (200, "ok".to_owned())
        );
        assert_eq!(connections.load(Ordering::SeqCst), 3);
        let _ = std::fs::remove_file(&socket);
    }

    #[tokio::test]
    async fn a_get_gives_up_after_its_retries_and_a_post_is_never_repeated() {
        let (socket, connections) = flaky_daemon("give-up", usize::MAX);
        let answer = request(&socket, Method::GET, "/status").await;
        assert!(
            matches!(answer, Err(ClientError::Http { .. })),
            "{answer:?}"
        );
        assert_eq!(
            connections.load(Ordering::SeqCst),
            1 + GET_RETRY_PAUSES.len()
        );

        let (socket_post, posts) = flaky_daemon("post", 1);
        let answer = request(&socket_post, Method::POST, "/reload").await;
        assert!(
            matches!(answer, Err(ClientError::Http { .. })),
            "{answer:?}"
        );
        assert_eq!(posts.load(Ordering::SeqCst), 1, "a POST was repeated");
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(&socket_post);
    }
}
