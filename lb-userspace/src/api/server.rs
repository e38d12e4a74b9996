//! The control API's server: HTTP/1.1 on a Unix socket, each request handed to the daemon's loop
//! as a [`Command`] (routes in [the module docs](super)).
//!
//! [`bind`] prepares the socket (parent directory 0700 if missing, a stale socket replaced, a
//! live one refused, the new one 0600), so the daemon fails at startup when the socket cannot be
//! had; [`serve_on`] then answers on it until shutdown and removes the socket file.

use std::fs::{self, DirBuilder, Permissions};
use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::model::{Admin, Command};
use super::{action, admin_for, decode_segment};

/// Mode of the socket file: the API changes what the data plane does, so root only.
pub const SOCKET_MODE: u32 = 0o600;
/// Mode of the socket's directory when [`bind`] creates it.
pub const DIRECTORY_MODE: u32 = 0o700;
/// How long a request waits for the daemon's loop to take and answer its command.
pub const DAEMON_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the API socket at `path` and serves it until `shutdown` completes (see [`bind`] and
/// [`serve_on`]). Fails only if the socket cannot be bound.
pub async fn serve(
    path: &Path,
    commands: mpsc::Sender<Command>,
    shutdown: impl Future,
) -> io::Result<()> {
    let listener = bind(path)?;
    serve_on(listener, commands, shutdown).await;
    Ok(())
}

/// Binds the API's Unix socket at `path`, mode 0600. Creates the parent directory (mode 0700)
/// when it is missing. A socket file already there is removed first if nothing listens on it
/// (a daemon that died); if something does, fails with `another lb is already serving PATH`
/// ([`io::ErrorKind::AddrInUse`]). Anything else at `path` is left alone and refused. Every
/// error names `path`. Must be called within a tokio runtime.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    let at = |e: io::Error, what: &str| {
        io::Error::new(e.kind(), format!("{}: {what}: {e}", path.display()))
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.exists()
    {
        DirBuilder::new()
            .recursive(true)
            .mode(DIRECTORY_MODE)
            .create(parent)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("{}: creating the directory: {e}", parent.display()),
                )
            })?;
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{}: exists and is not a socket; not replacing it",
                    path.display()
                ),
            ));
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("another lb is already serving {}", path.display()),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                fs::remove_file(path).map_err(|e| at(e, "removing the stale socket"))?;
                info!(
                    "removed the stale control socket {} (nothing answered on it)",
                    path.display()
                );
            }
            Err(e) => return Err(at(e, "checking whether a daemon answers there")),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(at(e, "cannot inspect")),
    }
    let listener = UnixListener::bind(path).map_err(|e| at(e, "binding the control socket"))?;
    if let Err(e) = fs::set_permissions(path, Permissions::from_mode(SOCKET_MODE)) {
        let _ = fs::remove_file(path);
        return Err(at(e, "setting the control socket's mode"));
    }
    Ok(listener)
}

/// Serves the control API on a bound `listener` until `shutdown` completes, then closes every
/// connection and removes the socket file (if it is still the one bound: a file put there since
/// is left alone). HTTP/1.1 with keep-alive, within [`crate::http_server::LIMITS`] (64
/// connections, 5 s to send headers, bodies over 64 KiB refused 413, ...); 10 s for the
/// daemon's loop to answer a command (else 503).
pub async fn serve_on(
    listener: UnixListener,
    commands: mpsc::Sender<Command>,
    shutdown: impl Future,
) {
    let socket = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf));
    let _remove = socket.as_deref().and_then(RemoveOnDrop::new);
    if let Some(socket) = &socket {
        info!("serving the control API on {}", socket.display());
    }
    let respond = move |request: Request<Incoming>| {
        let commands = commands.clone();
        async move { respond(&commands, request).await }
    };
    crate::http_server::serve("control API", listener, respond, shutdown).await;
}

/// Removes the socket file when dropped (the server stopped, or its task was aborted), unless
/// another file has replaced it.
struct RemoveOnDrop {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl RemoveOnDrop {
    fn new(path: &Path) -> Option<Self> {
        let meta = fs::symlink_metadata(path).ok()?;
        Some(Self {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let ours = fs::symlink_metadata(&self.path)
            .is_ok_and(|meta| meta.dev() == self.dev && meta.ino() == self.ino);
        if ours && let Err(e) = fs::remove_file(&self.path) {
            warn!("control API: removing {} failed: {e}", self.path.display());
        }
    }
}

/// What a request path names.
#[derive(Debug, PartialEq)]
enum Route {
    Status,
    Reload,
    SetAdmin {
        vip: String,
        backend: String,
        admin: Admin,
    },
    /// A path of the API whose VIP or backend segment is not valid percent-encoded UTF-8.
    BadSegment,
    NotFound,
}

fn route(path: &str) -> Route {
    let segments: Vec<&str> = match path.strip_prefix('/') {
        Some(rest) => rest.split('/').collect(),
        None => return Route::NotFound,
    };
    match segments.as_slice() {
        ["status"] => Route::Status,
        ["reload"] => Route::Reload,
        ["vips", vip, "backends", backend, action] if !vip.is_empty() && !backend.is_empty() => {
            let Some(admin) = admin_for(action) else {
                return Route::NotFound;
            };
            match (decode_segment(vip), decode_segment(backend)) {
                (Some(vip), Some(backend)) => Route::SetAdmin {
                    vip,
                    backend,
                    admin,
                },
                _ => Route::BadSegment,
            }
        }
        _ => Route::NotFound,
    }
}

async fn respond(
    commands: &mpsc::Sender<Command>,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    match (route(request.uri().path()), method) {
        (Route::Status, Method::GET) => {
            let (reply, answer) = oneshot::channel();
            match ask(commands, Command::Status(reply), answer).await {
                Ok(report) => json(StatusCode::OK, &report),
                Err(response) => response,
            }
        }
        (Route::Status, _) => method_not_allowed("GET"),
        (Route::Reload, Method::POST) => {
            let (reply, answer) = oneshot::channel();
            match ask(commands, Command::Reload(reply), answer).await {
                Ok(Ok(report)) => json(StatusCode::OK, &report),
                Ok(Err(message)) => error(StatusCode::UNPROCESSABLE_ENTITY, &message),
                Err(response) => response,
            }
        }
        (
            Route::SetAdmin {
                vip,
                backend,
                admin,
            },
            Method::POST,
        ) => {
            let (reply, answer) = oneshot::channel();
            let command = Command::SetAdmin {
                vip: vip.clone(),
                backend: backend.clone(),
                admin,
                reply,
            };
            match ask(commands, command, answer).await {
                Ok(Ok(())) => {
                    debug!("control API: {vip} {backend}: {}", action(admin));
                    json(StatusCode::OK, &serde_json::json!({"ok": true}))
                }
                Ok(Err(message)) => {
                    debug!(
                        "control API: {vip} {backend}: {} refused: {message}",
                        action(admin)
                    );
                    error(refusal_status(&message), &message)
                }
                Err(response) => response,
            }
        }
        (Route::BadSegment, Method::POST) => error(
            StatusCode::BAD_REQUEST,
            "the VIP or backend in the path is not valid percent-encoded UTF-8",
        ),
        (Route::SetAdmin { .. } | Route::BadSegment | Route::Reload, _) => {
            method_not_allowed("POST")
        }
        (Route::NotFound, _) => error(
            StatusCode::NOT_FOUND,
            &format!(
                "not found: {}; the API has GET /status, POST /reload and POST \
                 /vips/VIP/backends/BACKEND/drain|disable|enable",
                request.uri().path()
            ),
        ),
    }
}

/// Hands `command` to the daemon's loop and waits for its answer; a 503 response when the loop
/// is gone or does not answer within [`DAEMON_TIMEOUT`].
async fn ask<T>(
    commands: &mpsc::Sender<Command>,
    command: Command,
    answer: oneshot::Receiver<T>,
) -> Result<T, Response<Full<Bytes>>> {
    let gone = || {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon is not taking commands (shutting down?)",
        )
    };
    let asked = async {
        commands.send(command).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())
    };
    match tokio::time::timeout(DAEMON_TIMEOUT, asked).await {
        Ok(answered) => answered,
        Err(_) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "the daemon did not answer within {}s",
                DAEMON_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// 404 for the daemon's "no such VIP / backend" refusals (`no vip named X`, `vip X has no
/// backend Y`), 400 for every other.
fn refusal_status(message: &str) -> StatusCode {
    let unknown_vip = message.starts_with("no vip named ");
    let unknown_backend = message.starts_with("vip ") && message.contains(" has no backend ");
    if unknown_vip || unknown_backend {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::BAD_REQUEST
    }
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() = status;
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("encoding the answer: {e}"),
        ),
    }
}

/// `{"error": message}` with `status`.
fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    // A map of one string always serialises.
    let body = serde_json::json!({ "error": message }).to_string();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = error(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("method not allowed: use {allow}"),
    );
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("/status"), Route::Status);
        assert_eq!(
            route("/vips/web/backends/2001:db8::11/drain"),
            Route::SetAdmin {
                vip: "web".into(),
                backend: "2001:db8::11".into(),
                admin: Admin::Drained
            }
        );
        assert_eq!(
            route("/vips/a%2Fb/backends/x/enable"),
            Route::SetAdmin {
                vip: "a/b".into(),
                backend: "x".into(),
                admin: Admin::Enabled
            }
        );
        assert_eq!(route("/vips/web/backends/%zz/disable"), Route::BadSegment);
        for path in [
            "",
            "/",
            "/status/",
            "/statusx",
            "/vips/web/backends/10.0.0.11",
            "/vips/web/backends/10.0.0.11/drained",
            "/vips//backends/10.0.0.11/drain",
            "/vips/web/backends//drain",
            "/vips/web/backends/10.0.0.11/drain/",
            "/vips/web/backend/10.0.0.11/drain",
        ] {
            assert_eq!(route(path), Route::NotFound, "{path}");
        }
    }

    #[test]
    fn unknown_names_are_404_other_refusals_400() {
        assert_eq!(refusal_status("no vip named api"), StatusCode::NOT_FOUND);
        assert_eq!(
            refusal_status("vip web has no backend 10.9.9.9"),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            refusal_status("backend 10.0.0.11 is already drained"),
            StatusCode::BAD_REQUEST
        );
    }
}
