//! Flow-state replication between lb nodes (`[sync]`).
//!
//! With identical rings every node sends a connection to the same backend, except where a ring
//! slot changed while the connection was open: such connections are pinned in the flow table of
//! the node they began on (DESIGN §8), and only there. This module sends every flow the data
//! plane records (TCP flows of changed slots, UDP flows) to the other nodes, so that when a node
//! dies the node that gets its connections knows them too.
//!
//! Data flows one way through it:
//!
//! ```text
//! data plane ──FLOW_EVENTS──> service ──datagrams──> peers
//! peers ──datagrams──> service ──FromService::Install──> daemon loop ──> FLOWS (+ ring slots)
//! ```
//!
//! - [`wire`]: the datagram format (authenticated with HMAC-SHA256 over a shared key, [`key`]),
//!   [`replay`]: the per-peer guard against replayed datagrams;
//! - [`view`]: data-plane ids to addresses, a snapshot the daemon's loop publishes;
//! - [`service`]: the task that owns the socket and the queues;
//! - [`stats`]: its counters, for `lb status` and the metrics.
//!
//! Installing a record is the balancer's job (`Balancer::install_replicated`): this module never
//! writes a map.

pub mod key;
pub mod replay;
pub mod service;
pub mod stats;
pub mod view;
pub mod wire;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::api::model::SyncStatus;
use crate::balancer::{Balancer, InstallReport, SkipReason};
use crate::config::SyncConfig;
use crate::dataplane::FlowEvents;

pub use service::{FromService, ToService};
pub use view::FlowView;

/// Messages from the service the daemon's loop has not taken yet, at most (each a datagram's
/// worth of records or a request).
const HANDOVER_QUEUE: usize = 4096;
/// Receive buffer asked of the kernel: a full copy arrives in a burst.
const RECEIVE_BUFFER_BYTES: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("sync: binding {address}: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The daemon's end of a running sync service.
pub struct SyncHandle {
    pub config: SyncConfig,
    commands: mpsc::Sender<ToService>,
    /// What the service hands over: poll it in the daemon's loop.
    pub from_service: mpsc::Receiver<FromService>,
    view: watch::Sender<Arc<FlowView>>,
    counters: Arc<Mutex<stats::ServiceCounters>>,
    installs: stats::InstallCounters,
    task: JoinHandle<Option<FlowEvents>>,
    /// Kernel time of the last refresh sent (see [`SyncHandle::refresh_due`]).
    last_refresh_ns: u64,
}

impl SyncHandle {
    /// Binds `config.listen` and starts the service, with `view` as the first snapshot. With
    /// `pull_at_start` it asks every peer for a full copy at once and reports
    /// [`FromService::Pulled`] when the copies are in.
    pub fn start(
        config: &SyncConfig,
        events: Option<FlowEvents>,
        view: FlowView,
        pull_at_start: bool,
    ) -> Result<Self, SyncError> {
        let socket = bind(config.listen).map_err(|source| SyncError::Bind {
            address: config.listen,
            source,
        })?;
        let (to_daemon, from_service) = mpsc::channel(HANDOVER_QUEUE);
        let (commands, commands_rx) = mpsc::channel(64);
        let (view_tx, view_rx) = watch::channel(Arc::new(view));
        let counters = Arc::new(Mutex::new(stats::ServiceCounters::new(
            config.listen,
            &config.peers,
            pull_at_start,
        )));
        let service = service::Service::new(
            config,
            socket,
            events,
            view_rx,
            to_daemon,
            commands_rx,
            counters.clone(),
            pull_at_start,
        );
        let task = tokio::spawn(service.run());
        Ok(Self {
            config: config.clone(),
            commands,
            from_service,
            view: view_tx,
            counters,
            installs: stats::InstallCounters::default(),
            task,
            last_refresh_ns: crate::dataplane::flows::kernel_now_ns(),
        })
    }

    /// Publishes `balancer`'s ids to the service if they changed.
    pub fn update_view(&self, balancer: &Balancer) {
        let view = FlowView::of(balancer);
        self.view.send_if_modified(|current| {
            if **current == view {
                false
            } else {
                *current = Arc::new(view);
                true
            }
        });
    }

    /// Hands a message to the service; a full command queue (the service is stuck sending)
    /// drops it, as a peer's lost datagram would.
    pub fn send(&self, message: ToService) {
        if self.commands.try_send(message).is_err() {
            tracing::warn!("sync: the service is busy; a full copy or refresh was dropped");
        }
    }

    /// Counts an installation's outcome.
    pub fn count(&mut self, report: &InstallReport) {
        self.installs.installed += report.installed as u64;
        for (total, count) in self.installs.skipped.iter_mut().zip(&report.skipped) {
            *total += *count as u64;
        }
    }

    /// Whether a refresh of the flows in use is due at kernel time `now_ns`, given how long
    /// replicated flows may be idle on the peers (`shortest_timeout_ns`): every half of it,
    /// so a flow that keeps sending here never expires there. Returns the time the previous
    /// refresh was sent (flows seen since then are the ones to send).
    pub fn refresh_due(&mut self, now_ns: u64, shortest_timeout_ns: u64) -> Option<u64> {
        if now_ns.saturating_sub(self.last_refresh_ns) < shortest_timeout_ns / 2 {
            return None;
        }
        Some(std::mem::replace(&mut self.last_refresh_ns, now_ns))
    }

    /// `lb status`'s `sync` object.
    pub fn status(&self, events_lost: u64) -> SyncStatus {
        let counters = self.counters.lock().expect("sync counters").clone();
        stats::status(&counters, &self.installs, events_lost, Instant::now())
    }

    /// A copy of the service's counters (for the metrics).
    pub fn counters(&self) -> (stats::ServiceCounters, stats::InstallCounters) {
        (
            self.counters.lock().expect("sync counters").clone(),
            self.installs.clone(),
        )
    }

    /// Stops the service; returns the data plane's event reader for the next one.
    pub async fn stop(self) -> Option<FlowEvents> {
        drop(self.commands);
        self.task.await.ok().flatten()
    }
}

/// A non-blocking UDP socket on `address` with a large receive buffer.
fn bind(address: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = std::net::UdpSocket::bind(address)?;
    socket.set_nonblocking(true)?;
    set_receive_buffer(&socket, RECEIVE_BUFFER_BYTES);
    UdpSocket::from_std(socket)
}

/// Best effort: the kernel caps it at `net.core.rmem_max` (root may exceed it with
/// `SO_RCVBUFFORCE`).
fn set_receive_buffer(socket: &std::net::UdpSocket, bytes: usize) {
    use std::os::fd::AsRawFd;
    let value = bytes as libc::c_int;
    for option in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: a valid socket descriptor, and a pointer to a c_int of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&value as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

/// Labels of the skip reasons, for the metrics.
pub fn skip_labels() -> impl Iterator<Item = &'static str> {
    SkipReason::ALL.iter().map(|r| r.label())
}
