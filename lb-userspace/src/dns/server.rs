//! The sockets: one UDP and one TCP listener per `listen` address, each a task that reads
//! queries and writes [`Zone::answer`]'s replies. Tasks end when their [`Listener`] is dropped.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::debug;

use super::answer::{Transport, Zone};
use super::stats::QueryStats;

/// Receive buffer asked for on the UDP socket: a burst of thousands of queries waits here while
/// the task answers (the default ~200 KiB holds a few hundred).
const UDP_RECEIVE_BUFFER: libc::c_int = 4 << 20;
/// Larger datagrams are cut here (a query is tens of bytes; this is EDNS's usual maximum).
const UDP_DATAGRAM_MAX: usize = 4096;
/// TCP connections served at once; more wait in the kernel's accept queue.
const MAX_TCP_CONNECTIONS: usize = 256;
/// A TCP connection that sends nothing for this long is closed (RFC 7766 suggests seconds).
const TCP_IDLE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("dns: cannot listen on {address} ({transport}): {source}")]
    Bind {
        address: SocketAddr,
        transport: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The tasks serving one address; dropping it stops them and closes the sockets.
#[derive(Debug)]
pub struct Listener {
    udp: JoinHandle<()>,
    tcp: JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.udp.abort();
        self.tcp.abort();
    }
}

/// Binds `address` over UDP and TCP and starts answering from `zone`.
pub async fn listen(
    address: SocketAddr,
    zone: Arc<RwLock<Zone>>,
    stats: Arc<QueryStats>,
) -> Result<Listener, ListenError> {
    let bind_error = |transport, source| ListenError::Bind {
        address,
        transport,
        source,
    };
    let udp = UdpSocket::bind(address)
        .await
        .map_err(|e| bind_error("udp", e))?;
    enlarge_receive_buffer(&udp);
    let tcp = TcpListener::bind(address)
        .await
        .map_err(|e| bind_error("tcp", e))?;
    Ok(Listener {
        udp: tokio::spawn(serve_udp(udp, Arc::clone(&zone), Arc::clone(&stats))),
        tcp: tokio::spawn(serve_tcp(tcp, zone, stats)),
    })
}

/// Best effort: SO_RCVBUFFORCE (root may exceed `rmem_max`), else SO_RCVBUF up to `rmem_max`.
fn enlarge_receive_buffer(socket: &UdpSocket) {
    let size = UDP_RECEIVE_BUFFER;
    for option in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: the fd is an open socket owned by `socket` for the whole call, and the value
        // points at a live c_int whose size is passed.
        let result = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&raw const size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if result == 0 {
            return;
        }
    }
}

async fn serve_udp(socket: UdpSocket, zone: Arc<RwLock<Zone>>, stats: Arc<QueryStats>) {
    let mut buffer = vec![0u8; UDP_DATAGRAM_MAX];
    loop {
        let (length, peer) = match socket.recv_from(&mut buffer).await {
            Ok(received) => received,
            // ICMP errors of earlier replies surface here on some kernels; keep serving.
            Err(e) => {
                debug!("dns: udp receive: {e}");
                continue;
            }
        };
        let outcome = read_zone(&zone).answer(&buffer[..length], Transport::Udp);
        stats.count(&outcome);
        if let Some(reply) = outcome.reply
            && let Err(e) = socket.send_to(&reply, peer).await
        {
            debug!("dns: udp reply to {peer}: {e}");
        }
    }
}

async fn serve_tcp(listener: TcpListener, zone: Arc<RwLock<Zone>>, stats: Arc<QueryStats>) {
    let slots = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                debug!("dns: tcp accept: {e}");
                // Out of descriptors, typically: do not spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let zone = Arc::clone(&zone);
        let stats = Arc::clone(&stats);
        tokio::spawn(async move {
            if let Err(e) = serve_connection(stream, &zone, &stats).await {
                debug!("dns: tcp {peer}: {e}");
            }
            drop(permit);
        });
    }
}

/// Length-prefixed messages (RFC 1035 4.2.2) until the client closes, goes quiet or sends one
/// that gets no reply.
async fn serve_connection(
    mut stream: TcpStream,
    zone: &RwLock<Zone>,
    stats: &QueryStats,
) -> std::io::Result<()> {
    loop {
        let mut length = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut length)).await {
            Ok(Ok(_)) => {}
            // EOF between messages is the normal end; the rest are the client's problem.
            Ok(Err(_)) | Err(_) => return Ok(()),
        }
        let mut message = vec![0u8; usize::from(u16::from_be_bytes(length))];
        tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut message))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let outcome = read_zone(zone).answer(&message, Transport::Tcp);
        stats.count(&outcome);
        let Some(reply) = outcome.reply else {
            return Ok(());
        };
        // A TCP reply is at most 65535 bytes by construction (answer's limit).
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&(reply.len() as u16).to_be_bytes());
        framed.extend_from_slice(&reply);
        stream.write_all(&framed).await?;
    }
}

/// The zone for reading; a writer that panicked left a whole zone behind (every update is one
/// assignment), so a poisoned lock is still usable.
fn read_zone(zone: &RwLock<Zone>) -> std::sync::RwLockReadGuard<'_, Zone> {
    zone.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
