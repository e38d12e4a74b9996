//! What the control API speaks: the JSON of `lb status --json` and the commands the daemon's loop
//! answers.

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// An operator's override of a backend, on top of its health.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Admin {
    /// Health-checked as configured.
    Enabled,
    /// Weight 0: no new flows, existing flows stay.
    Drained,
    /// Forced down: out of service, its flows move.
    Disabled,
}

/// `GET /status`: `{"vips":[{"name","address","port","protocol","active_pool","announced",
/// "ring_digest",...,"backends":[...]}],"announce":{...}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub vips: Vec<VipStatus>,
    /// What this node announces (route table, health file), per VIP address.
    #[serde(default)]
    pub announce: AnnounceStatus,
    /// Orphaned pinned state in the daemon's bpffs: instances whose interface or named network
    /// namespace is gone, each holding its maps' memory until `lb detach --orphans`.
    #[serde(default)]
    pub orphans: Vec<crate::dataplane::pins::orphans::Orphan>,
    /// Flow-state replication (`[sync]`); `null` when off.
    #[serde(default)]
    pub sync: Option<SyncStatus>,
    /// The DNS responder (`[dns]`); `null` when off.
    #[serde(default)]
    pub dns: Option<DnsStatus>,
}

/// `[dns]` as it runs: each name's addresses and which are answered, and the queries so far.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DnsStatus {
    /// `svc.example.`
    pub zone: String,
    pub listen: Vec<String>,
    pub ttl_seconds: u32,
    /// In config order.
    pub names: Vec<DnsNameStatus>,
    /// Queries answered, by query type and rcode (`dropped`: no reply was sent).
    pub queries: Vec<DnsQueryCount>,
    /// UDP answers sent with TC set (too large; the client retries over TCP).
    pub truncated: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DnsNameStatus {
    /// Fully qualified: `www.svc.example.`
    pub name: String,
    /// What the name answers with now, in config order (before rotation).
    pub answer: Vec<String>,
    /// `all` or `none`: what it answers when no address is up.
    pub on_all_down: String,
    pub addresses: Vec<DnsAddressStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DnsAddressStatus {
    pub address: String,
    pub up: bool,
    /// Why: "vip web: 2 backends take new flows (pool primary)", "tcp check: up", "not checked".
    pub reason: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DnsQueryCount {
    pub qtype: String,
    pub rcode: String,
    pub count: u64,
}

/// `[sync]` as it runs: what this node sent and received, and each peer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncStatus {
    /// This node's listen address (its identity to its peers).
    pub listen: String,
    /// The start-up pull of the peers' flows is over (nothing is announced before).
    pub pulled: bool,
    /// Flows the start-up pull received.
    pub pulled_flows: u64,
    /// Flow records sent, over all peers.
    pub flows_sent: u64,
    /// Flow records received in authenticated datagrams, over all peers.
    pub flows_received: u64,
    /// Received flows written into this node's flow table.
    pub flows_installed: u64,
    /// Received flows not installed, by reason: `unknown_vip`, `unknown_backend` (this node has
    /// no such VIP or backend), `local_newer` (this node saw the flow more recently).
    pub flows_skipped: std::collections::BTreeMap<String, u64>,
    /// Datagrams (or, for `queue_full`, records) dropped, by reason, over all sources.
    pub drops: std::collections::BTreeMap<String, u64>,
    /// Flow inserts the data plane could not report (its event ring was full).
    pub events_lost: u64,
    /// In config order.
    pub peers: Vec<PeerStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub address: String,
    /// Heard from within the last 3 seconds (peers send a heartbeat every second).
    pub up: bool,
    /// Milliseconds since its last authenticated datagram; `null`: never heard.
    pub last_heard_ms: Option<u64>,
    pub flows_sent: u64,
    pub flows_received: u64,
    pub datagrams_sent: u64,
    pub datagrams_received: u64,
    /// UDP payload bytes sent to it and received from it (authenticated datagrams).
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Records waiting in its queue.
    pub queued: u64,
    /// Datagrams from its address dropped, by reason (and records for it its full queue
    /// dropped, `queue_full`).
    pub drops: std::collections::BTreeMap<String, u64>,
}

/// `[announce]` as it runs: the table and the file, and every VIP address with whether this
/// node announces it and why.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AnnounceStatus {
    /// The kernel table lb's VIP routes are in; `null` without `route_table`.
    pub route_table: Option<u32>,
    pub health_file: Option<String>,
    /// What the health file says: the number of VIPs that cannot serve.
    pub health_value: Option<u32>,
    /// False until the first health results are in (nothing is announced before).
    pub ready: bool,
    /// In address order.
    pub addresses: Vec<AddressStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AddressStatus {
    pub address: String,
    /// At least one VIP on the address can serve new flows on this node. With `route_table`,
    /// lb's route to it is in that table exactly while this is true.
    pub announced: bool,
    /// Why: "vip web: 2 backends take new flows (pool primary)".
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VipStatus {
    pub name: String,
    pub address: String,
    pub port: u16,
    pub protocol: String,
    /// `l2`, `ipip` or `gue:PORT` (the VIP's `forward`, with its `gue_port`).
    #[serde(default)]
    pub forward: String,
    /// `primary`, `standby` or `none`.
    pub active_pool: String,
    /// This VIP can serve new flows on this node (a backend in its ring, or `on_all_down =
    /// "pass"`).
    #[serde(default)]
    pub can_serve: bool,
    /// This node announces the VIP's address (some VIP on it can serve).
    #[serde(default)]
    pub announced: bool,
    /// Why the VIP can or cannot serve.
    #[serde(default)]
    pub announce_reason: String,
    /// 16 hex digits of the live ring by backend address: nodes with equal digests send each
    /// new flow of the VIP to the same backend.
    #[serde(default)]
    pub ring_digest: String,
    /// Slots of the live ring whose owner changed within `tcp_idle_timeout` (TCP VIPs; always 0
    /// for UDP): only their connections use the flow table.
    #[serde(default)]
    pub ring_slots_changed: u64,
    /// Flows the flow table holds for this VIP, as of the last flow sweep.
    #[serde(default)]
    pub flow_table_entries: u64,
    pub packets: u64,
    pub bytes: u64,
    pub flows: u64,
    pub backends: Vec<BackendStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: String,
    pub standby: bool,
    /// `up`, `down`, `draining` or `disabled` (`unknown` before the first check).
    pub state: String,
    /// The weight new flows see (0 while draining).
    pub weight: u32,
    /// The configured weight.
    pub configured_weight: u32,
    /// Result of the last check ("ok", "connection refused", ...), if any yet.
    pub last_check: Option<String>,
    /// Its latency in milliseconds.
    pub last_check_latency_ms: Option<f64>,
    pub packets: u64,
    pub bytes: u64,
    pub flows: u64,
}

/// `POST /reload`: what the reload changed, one line each (`vip web: backend 10.0.0.13 added`);
/// empty when the file matches what runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReloadReport {
    /// The file that was read.
    pub config: String,
    pub changes: Vec<String>,
}

/// A request the API server hands to the daemon's loop (which owns the data plane).
#[derive(Debug)]
pub enum Command {
    Status(oneshot::Sender<StatusReport>),
    SetAdmin {
        vip: String,
        backend: String,
        admin: Admin,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Re-read the config file the daemon was started with; `Err` carries why it was refused
    /// (`FILE:LINE:COL: ...` for an invalid file), and the old config keeps running.
    Reload(oneshot::Sender<Result<ReloadReport, String>>),
}
