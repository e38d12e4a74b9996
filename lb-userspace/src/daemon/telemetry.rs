//! Prometheus metrics of a running daemon: the HTTP endpoint (when `metrics` is configured), the
//! periodic copy of the data plane's counters into it, and the flow-table census.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::maps::{HashMap, Map, MapData};
use lb_common::{FlowKey, FlowState};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tracing::warn;

use super::RunError;
use crate::{balancer::Balancer, health::schedule::CheckReport, metrics::Metrics, stats::Snapshot};

/// How often the flow table is counted: walking a full LRU table key by key takes a while, so
/// it happens on a blocking thread and not often.
pub(super) const FLOW_CENSUS_INTERVAL: Duration = Duration::from_secs(10);

pub(super) struct Telemetry {
    metrics: Arc<Metrics>,
    flow_entries: Arc<AtomicU64>,
    flows_map_id: Option<u32>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("metrics: cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl Telemetry {
    /// Binds the metrics address (failing start-up if it cannot) and starts serving.
    pub(super) async fn start(address: SocketAddr, balancer: &Balancer) -> Result<Self, RunError> {
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| TelemetryError::Bind { address, source })?;
        let metrics = Arc::new(Metrics::new());
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(crate::metrics::serve_on(
            listener,
            Arc::clone(&metrics),
            async {
                let _ = stopped.await;
            },
        ));
        let flows_map_id = aya::maps::IterableMap::map(&balancer.dataplane.maps.flows)
            .info()
            .map(|info| info.id())
            .ok();
        Ok(Self {
            metrics,
            flow_entries: Arc::new(AtomicU64::new(0)),
            flows_map_id,
            stop: Some(stop),
            server,
        })
    }

    /// Copies the data plane's counters, the backends' states and what is announced into the
    /// metrics.
    pub(super) fn refresh(&self, balancer: &Balancer, announced: &crate::announce::Decision) {
        self.metrics.set_announcements(announced);
        match Snapshot::read(balancer) {
            Ok(snapshot) => self.metrics.update_from(
                &snapshot,
                &balancer.vips,
                self.flow_entries.load(Ordering::Relaxed),
            ),
            Err(e) => warn!("metrics: reading the data plane's counters failed: {e}"),
        }
    }

    /// Records the latency of each check.
    pub(super) fn observe(&self, balancer: &Balancer, reports: &[CheckReport]) {
        for report in reports {
            if let Some((v, b)) = balancer.locate(report.checker.backend) {
                let backend = &balancer.vips[v].backends[b];
                self.metrics.observe_check(
                    &balancer.vips[v].name,
                    &backend.address.to_string(),
                    report.outcome.latency,
                );
            }
        }
    }

    /// Counts the flow table's entries on a blocking thread (its own handle on the map).
    pub(super) fn census(&self) {
        let Some(id) = self.flows_map_id else { return };
        let entries = Arc::clone(&self.flow_entries);
        tokio::task::spawn_blocking(move || match count_flows(id) {
            Ok(n) => entries.store(n, Ordering::Relaxed),
            Err(e) => warn!("metrics: counting the flow table failed: {e}"),
        });
    }

    pub(super) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = self.server.await;
    }
}

fn count_flows(id: u32) -> Result<u64, aya::maps::MapError> {
    let flows: HashMap<MapData, FlowKey, FlowState> =
        HashMap::try_from(Map::LruHashMap(MapData::from_id(id)?))?;
    Ok(crate::dataplane::maps::count_flows(&flows) as u64)
}
