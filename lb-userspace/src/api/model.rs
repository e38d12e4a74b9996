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
