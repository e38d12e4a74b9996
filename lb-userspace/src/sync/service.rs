//! The sync service: one tokio task that owns the UDP socket, the data plane's flow events and
//! a queue per peer. It never touches the balancer: what it receives goes to the daemon's loop
//! as [`FromService`] messages, what the loop wants sent comes back as [`ToService`].
//!
//! - Flow events from the data plane are named by address ([`FlowView`]), queued for every peer
//!   and sent in datagrams of up to [`MAX_DATAGRAM`] bytes as soon as the service gets to them
//!   (events that arrive together go together).
//! - Every peer gets a heartbeat each [`HEARTBEAT_INTERVAL`]; a peer heard within
//!   [`PEER_TIMEOUT`] is up. A peer that comes up (again) is asked for a full copy of its flows
//!   and sent one of this node's.
//! - The start-up pull: the service asks every peer for a full copy at once and reports
//!   [`FromService::Pulled`] when each has answered with its `PullDone` (and the flows it
//!   announced arrived; else it asks again, [`PULL_ATTEMPTS`] times in all), or was silent for
//!   [`PULL_SILENT_TIMEOUT`], or [`PULL_LIMIT`] has passed.
//! - A queue holds at most [`QUEUE_LIMIT`] records: a peer that cannot keep up loses records
//!   (counted as `queue_full`), never the service's time.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lb_common::FlowEvent;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::stats::{ServiceCounters, drop_index};
use super::view::FlowView;
use super::wire::{
    Body, DropReason, FlowRecord, MAX_DATAGRAM, Message, Opener, Sealer, now_unix_ms,
};
use crate::config::SyncConfig;
use crate::dataplane::FlowEvents;

/// How often each peer gets a heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// A peer not heard from for this long is down.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// Records queued per peer at most.
pub const QUEUE_LIMIT: usize = 65_536;
/// The start-up pull stops waiting for a peer that has said nothing for this long (it is down:
/// a node that starts alone must not wait long to serve).
pub const PULL_SILENT_TIMEOUT: Duration = Duration::from_secs(2);
/// The start-up pull stops waiting for any peer after this long.
pub const PULL_LIMIT: Duration = Duration::from_secs(30);
/// How often a silent peer is asked again during the start-up pull.
const PULL_RETRY: Duration = Duration::from_millis(300);
/// Full copies asked of one peer before the pull takes what it got.
pub const PULL_ATTEMPTS: u32 = 3;
/// Timer of the service's housekeeping (heartbeats, peer timeouts, pull retries).
const TICK: Duration = Duration::from_millis(100);
/// Datagrams a full copy sends before yielding, so a big table does not monopolise the task.
const DUMP_BURST: usize = 64;

/// What the service hands to the daemon's loop.
#[derive(Debug)]
pub enum FromService {
    /// Records a peer sent (new flows, a refresh, or part of a full copy): install them.
    Install(Vec<FlowRecord>),
    /// `peer` needs a full copy of this node's flow table: answer with [`ToService::Dump`].
    /// `asked`: it asked for one (a pull); else it came back and gets one unasked.
    Dump { peer: SocketAddr, asked: bool },
    /// The start-up pull is over; this many flows came in.
    Pulled { flows: u64 },
}

/// What the daemon's loop hands to the service.
#[derive(Debug)]
pub enum ToService {
    /// The full copy for `peer` (as [`FromService::Dump`] said: `asked` is a pull's answer, with
    /// its `PullDone`; unasked, the records go as plain flows).
    Dump {
        peer: SocketAddr,
        asked: bool,
        records: Vec<FlowRecord>,
    },
    /// Flows still in use here, for every peer (their copies would otherwise expire).
    Refresh(Vec<FlowRecord>),
}

/// Where a peer is in the start-up pull.
#[derive(Clone, Copy, Debug)]
enum Pull {
    /// Not pulling from it (or done).
    Idle,
    Asked {
        first: Instant,
        last: Instant,
        attempts: u32,
        heard: bool,
        received: u64,
    },
}

struct Peer {
    address: SocketAddr,
    queue: VecDeque<FlowRecord>,
    pull: Pull,
    last_heartbeat: Option<Instant>,
}

pub(super) struct Service {
    socket: UdpSocket,
    sealer: Sealer,
    opener: Opener,
    peers: Vec<Peer>,
    events: Option<FlowEvents>,
    view: watch::Receiver<Arc<FlowView>>,
    to_daemon: mpsc::Sender<FromService>,
    commands: mpsc::Receiver<ToService>,
    counters: Arc<Mutex<ServiceCounters>>,
    /// A start-up pull is running.
    pulling: bool,
    pulled_flows: u64,
}

impl Service {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        config: &SyncConfig,
        socket: UdpSocket,
        events: Option<FlowEvents>,
        view: watch::Receiver<Arc<FlowView>>,
        to_daemon: mpsc::Sender<FromService>,
        commands: mpsc::Receiver<ToService>,
        counters: Arc<Mutex<ServiceCounters>>,
        pull_at_start: bool,
    ) -> Self {
        // The session orders this node's lives: a restarted node's is larger, so its peers
        // accept it and refuse datagrams of an earlier life.
        let session = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        let now = Instant::now();
        let peers = config
            .peers
            .iter()
            .map(|&address| Peer {
                address,
                queue: VecDeque::new(),
                pull: if pull_at_start {
                    Pull::Asked {
                        first: now,
                        // Asked on the first tick.
                        last: now - PULL_RETRY,
                        attempts: 1,
                        heard: false,
                        received: 0,
                    }
                } else {
                    Pull::Idle
                },
                last_heartbeat: None,
            })
            .collect();
        Self {
            socket,
            sealer: Sealer::new(config.key.clone(), config.listen, session),
            opener: Opener::new(config.key.clone(), &config.peers),
            peers,
            events,
            view,
            to_daemon,
            commands,
            counters,
            pulling: pull_at_start,
            pulled_flows: 0,
        }
    }

    /// Runs until the daemon drops its end of the command channel; gives the event reader back.
    pub(super) async fn run(mut self) -> Option<FlowEvents> {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut datagram = vec![0u8; 65_536];
        let mut batch: Vec<FlowEvent> = Vec::new();
        if self.peers.is_empty() {
            self.finish_pull().await;
        }
        loop {
            tokio::select! {
                command = self.commands.recv() => match command {
                    None => break,
                    Some(ToService::Dump { peer, asked, records }) => self.send_dump(peer, asked, &records).await,
                    Some(ToService::Refresh(records)) => self.enqueue(&records),
                },
                received = self.socket.recv_from(&mut datagram) => match received {
                    Ok((len, source)) => {
                        self.receive(&datagram[..len], source).await;
                        // Whatever else is already there, without waiting.
                        while let Ok((len, source)) = self.socket.try_recv_from(&mut datagram) {
                            self.receive(&datagram[..len], source).await;
                        }
                    }
                    Err(e) => debug!("sync: receiving: {e}"),
                },
                ready = next_events(&mut self.events, &mut batch) => {
                    match ready {
                        Ok(()) => self.on_events(&batch),
                        Err(e) => {
                            warn!("sync: reading the data plane's flow events failed: {e}; replication of new flows stops");
                            self.events = None;
                        }
                    }
                    batch.clear();
                },
                _ = tick.tick() => self.housekeeping().await,
            }
            self.flush().await;
        }
        self.events
    }

    /// Events the data plane reported, by address, queued for every peer.
    fn on_events(&mut self, events: &[FlowEvent]) {
        let view = self.view.borrow().clone();
        let mut records = Vec::with_capacity(events.len());
        let mut unnamed = 0;
        for event in events {
            match view.record(event) {
                Some(record) => records.push(record),
                None => unnamed += 1,
            }
        }
        if unnamed > 0 {
            self.counters.lock().expect("sync counters").unnamed_events += unnamed;
        }
        self.enqueue(&records);
    }

    fn enqueue(&mut self, records: &[FlowRecord]) {
        if records.is_empty() {
            return;
        }
        let mut counters = self.counters.lock().expect("sync counters");
        for (peer, stats) in self.peers.iter_mut().zip(counters.peers.iter_mut()) {
            let dropped = push_bounded(&mut peer.queue, records, QUEUE_LIMIT);
            stats.drops[drop_index(DropReason::QueueFull)] += dropped as u64;
            stats.queued = peer.queue.len();
        }
    }

    /// Sends every queued record.
    async fn flush(&mut self) {
        for index in 0..self.peers.len() {
            if self.peers[index].queue.is_empty() {
                continue;
            }
            let records: Vec<FlowRecord> = self.peers[index].queue.drain(..).collect();
            let address = self.peers[index].address;
            let datagrams = self.sealer.seal_flows(&records, false);
            let sent = self.send_all(index, address, &datagrams).await;
            let mut counters = self.counters.lock().expect("sync counters");
            let stats = &mut counters.peers[index];
            stats.queued = 0;
            if sent == datagrams.len() {
                stats.flows_sent += records.len() as u64;
            }
        }
    }

    /// Sends `datagrams` to peer `index`; returns how many went.
    async fn send_all(
        &mut self,
        index: usize,
        address: SocketAddr,
        datagrams: &[Vec<u8>],
    ) -> usize {
        let mut sent = 0;
        let mut bytes = 0;
        for datagram in datagrams {
            match self.socket.send_to(datagram, address).await {
                Ok(_) => {
                    sent += 1;
                    bytes += datagram.len() as u64;
                }
                Err(e) => {
                    // A peer that is gone (no ARP answer, unreachable) costs nothing but this.
                    debug!("sync: sending to {address}: {e}");
                    break;
                }
            }
        }
        let mut counters = self.counters.lock().expect("sync counters");
        counters.peers[index].datagrams_sent += sent as u64;
        counters.peers[index].bytes_sent += bytes;
        sent
    }

    async fn send_body(&mut self, index: usize, body: &Body) {
        let address = self.peers[index].address;
        let datagram = self.sealer.seal(body);
        self.send_all(index, address, &[datagram]).await;
    }

    /// A full copy for `peer`: a pull's answer (`asked`: `PullFlows`, then the count it must
    /// have received), or, unasked, plain flows it counts as replicated ones, not as a pull's.
    async fn send_dump(&mut self, peer: SocketAddr, asked: bool, records: &[FlowRecord]) {
        let Some(index) = self.peers.iter().position(|p| p.address == peer) else {
            return;
        };
        let datagrams = self.sealer.seal_flows(records, asked);
        for burst in datagrams.chunks(DUMP_BURST) {
            self.send_all(index, peer, burst).await;
            tokio::task::yield_now().await;
        }
        self.counters.lock().expect("sync counters").peers[index].flows_sent +=
            records.len() as u64;
        if asked {
            self.send_body(
                index,
                &Body::PullDone {
                    flows: records.len() as u64,
                },
            )
            .await;
        }
        debug!(peer = %peer, flows = records.len(), asked, "sync: sent a full copy");
    }

    async fn receive(&mut self, datagram: &[u8], source: SocketAddr) {
        let message = match self.opener.open(datagram, now_unix_ms()) {
            Ok(message) => message,
            Err(reason) => {
                let mut counters = self.counters.lock().expect("sync counters");
                let index = drop_index(reason);
                match counters.peers.iter_mut().find(|p| p.address == source) {
                    Some(peer) => peer.drops[index] += 1,
                    None => counters.unattributed_drops[index] += 1,
                }
                return;
            }
        };
        let Message { from, body, .. } = message;
        let Some(index) = self.peers.iter().position(|p| p.address == from) else {
            return;
        };
        let came_up = {
            let mut counters = self.counters.lock().expect("sync counters");
            let stats = &mut counters.peers[index];
            let came_up = !stats.up;
            stats.up = true;
            stats.last_heard = Some(Instant::now());
            stats.datagrams_received += 1;
            stats.bytes_received += datagram.len() as u64;
            came_up
        };
        if let Pull::Asked { heard, .. } = &mut self.peers[index].pull {
            *heard = true;
        } else if came_up {
            // A peer that was down (or never heard) may hold flows this node lacks, and lack
            // this node's: a partition healed, or one of the two started while the other was
            // away. Each side gets the other's full copy (a peer that starts asks for it with
            // its first datagram, which is answered below).
            info!(peer = %from, "sync: peer is up; exchanging full copies of the recorded flows");
            self.send_body(index, &Body::PullRequest).await;
            if body != Body::PullRequest
                && self
                    .to_daemon
                    .try_send(FromService::Dump {
                        peer: from,
                        asked: false,
                    })
                    .is_err()
            {
                warn!(peer = %from, "sync: the daemon is busy; the peer gets no full copy now");
            }
        }
        match body {
            Body::Heartbeat => {}
            Body::Flows(records) => self.hand_over(index, records).await,
            Body::PullFlows(records) => {
                if let Pull::Asked { received, .. } = &mut self.peers[index].pull {
                    *received += records.len() as u64;
                }
                self.pulled_flows += records.len() as u64;
                self.hand_over(index, records).await;
            }
            Body::PullRequest => {
                if self
                    .to_daemon
                    .try_send(FromService::Dump {
                        peer: from,
                        asked: true,
                    })
                    .is_err()
                {
                    warn!(peer = %from, "sync: the daemon is busy; the peer's pull request waits for its retry");
                }
            }
            Body::PullDone { flows } => self.pull_done(index, flows).await,
        }
    }

    /// Records from peer `index` go to the daemon's loop. During the start-up pull the service
    /// waits for room (the daemon does nothing but install then, and a full copy arrives faster
    /// than it is installed); otherwise a full hand-over queue drops them, counted.
    async fn hand_over(&mut self, index: usize, records: Vec<FlowRecord>) {
        let count = records.len() as u64;
        self.counters.lock().expect("sync counters").peers[index].flows_received += count;
        let handed = if self.pulling {
            self.to_daemon
                .send(FromService::Install(records))
                .await
                .is_ok()
        } else {
            self.to_daemon
                .try_send(FromService::Install(records))
                .is_ok()
        };
        if !handed {
            self.counters.lock().expect("sync counters").peers[index].drops
                [drop_index(DropReason::QueueFull)] += count;
        }
    }

    async fn pull_done(&mut self, index: usize, flows: u64) {
        let Pull::Asked {
            attempts, received, ..
        } = self.peers[index].pull
        else {
            return;
        };
        let address = self.peers[index].address;
        if received >= flows || attempts >= PULL_ATTEMPTS {
            if received < flows {
                warn!(peer = %address, flows, received, "sync: a full copy arrived incomplete {PULL_ATTEMPTS} times; going on with what came");
            } else {
                info!(peer = %address, flows, "sync: pulled the peer's flows");
            }
            self.peers[index].pull = Pull::Idle;
            self.maybe_pulled().await;
        } else {
            // The next copy counts afresh.
            self.pulled_flows -= received.min(self.pulled_flows);
            let now = Instant::now();
            self.peers[index].pull = Pull::Asked {
                first: now,
                last: now,
                attempts: attempts + 1,
                heard: true,
                received: 0,
            };
            self.send_body(index, &Body::PullRequest).await;
        }
    }

    async fn maybe_pulled(&mut self) {
        if self.pulling && self.peers.iter().all(|p| matches!(p.pull, Pull::Idle)) {
            self.finish_pull().await;
        }
    }

    async fn finish_pull(&mut self) {
        self.pulling = false;
        {
            let mut counters = self.counters.lock().expect("sync counters");
            counters.pulled = true;
            counters.pulled_flows = self.pulled_flows;
        }
        let _ = self
            .to_daemon
            .send(FromService::Pulled {
                flows: self.pulled_flows,
            })
            .await;
    }

    async fn housekeeping(&mut self) {
        let now = Instant::now();
        for index in 0..self.peers.len() {
            {
                let mut counters = self.counters.lock().expect("sync counters");
                let stats = &mut counters.peers[index];
                if stats.up
                    && stats
                        .last_heard
                        .is_none_or(|at| now.duration_since(at) > PEER_TIMEOUT)
                {
                    stats.up = false;
                    warn!(peer = %stats.address, "sync: peer is down (silent for {PEER_TIMEOUT:?})");
                }
            }
            if let Pull::Asked {
                first,
                last,
                heard,
                attempts,
                ..
            } = self.peers[index].pull
            {
                let address = self.peers[index].address;
                let waited = now.duration_since(first);
                if (!heard && waited >= PULL_SILENT_TIMEOUT) || waited >= PULL_LIMIT {
                    warn!(peer = %address, "sync: no full copy from the peer after {waited:?}; going on without it");
                    self.peers[index].pull = Pull::Idle;
                } else if !heard && now.duration_since(last) >= PULL_RETRY {
                    self.peers[index].pull = Pull::Asked {
                        first,
                        last: now,
                        attempts,
                        heard,
                        received: 0,
                    };
                    self.send_body(index, &Body::PullRequest).await;
                }
            }
            // After the pull request: a peer that hears this node first from a heartbeat
            // sends it a copy unasked, and would then answer the request with a second one.
            if self.peers[index]
                .last_heartbeat
                .is_none_or(|at| now.duration_since(at) >= HEARTBEAT_INTERVAL)
            {
                self.peers[index].last_heartbeat = Some(now);
                self.send_body(index, &Body::Heartbeat).await;
            }
        }
        self.maybe_pulled().await;
    }
}

/// Appends what fits of `records` to `queue` (at most `limit` long); returns how many did not
/// fit. The newest records are the ones lost: the queue is for one peer, and what it already
/// holds goes out first.
fn push_bounded(queue: &mut VecDeque<FlowRecord>, records: &[FlowRecord], limit: usize) -> usize {
    let taken = limit.saturating_sub(queue.len()).min(records.len());
    queue.extend(records[..taken].iter().cloned());
    records.len() - taken
}

/// The next batch of data-plane events; pending forever without a reader.
async fn next_events(
    events: &mut Option<FlowEvents>,
    batch: &mut Vec<FlowEvent>,
) -> std::io::Result<()> {
    match events {
        Some(events) => events.readable_batch(batch).await,
        None => std::future::pending().await,
    }
}

const _: () = assert!(MAX_DATAGRAM <= 65_507, "a UDP payload");

#[cfg(test)]
mod tests {
    use super::*;

    fn record(port: u16) -> FlowRecord {
        FlowRecord {
            vip: "10.0.0.100:80".parse().unwrap(),
            proto: lb_common::PROTO_TCP,
            client: std::net::SocketAddr::new("192.0.2.1".parse().unwrap(), port),
            backend: "10.0.0.11".parse().unwrap(),
            age_ms: 0,
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_the_newest_records_only() {
        let mut queue = VecDeque::new();
        let first: Vec<FlowRecord> = (0..3).map(record).collect();
        assert_eq!(push_bounded(&mut queue, &first, 4), 0, "room for all three");
        let more: Vec<FlowRecord> = (3..6).map(record).collect();
        assert_eq!(
            push_bounded(&mut queue, &more, 4),
            2,
            "one fits, two are dropped"
        );
        let ports: Vec<u16> = queue.iter().map(|r| r.client.port()).collect();
        assert_eq!(
            ports,
            vec![0, 1, 2, 3],
            "what was queued first stays, in order"
        );
        assert_eq!(
            push_bounded(&mut queue, &more, 4),
            3,
            "a full queue takes nothing"
        );
        queue.clear();
        assert_eq!(
            push_bounded(&mut queue, &more, 4),
            0,
            "room again once sent"
        );
    }
}
