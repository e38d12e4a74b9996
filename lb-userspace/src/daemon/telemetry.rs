//! Prometheus metrics of a running daemon: the HTTP endpoint (when `metrics` is configured), the
//! periodic copy of the data plane's counters into it, and the flow table's size (from the flow
//! sweep).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tracing::warn;

use super::RunError;
use crate::{balancer::Balancer, health::schedule::CheckReport, metrics::Metrics, stats::Snapshot};

pub(super) struct Telemetry {
    metrics: Arc<Metrics>,
    flow_entries: AtomicU64,
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
        let telemetry = Self {
            metrics,
            flow_entries: AtomicU64::new(0),
            stop: Some(stop),
            server,
        };
        telemetry.set_flow_tables(balancer, 0);
        Ok(telemetry)
    }

    /// Takes the flow table's size and each VIP's changed slots and entries (after a sweep).
    pub(super) fn set_flow_tables(&self, balancer: &Balancer, entries: u64) {
        self.flow_entries.store(entries, Ordering::Relaxed);
        let per_vip = (0..balancer.vips.len())
            .map(|v| {
                (
                    balancer.vips[v].name.clone(),
                    balancer.changed_slots(v) as u64,
                    balancer.recorded_flows(v) as u64,
                )
            })
            .collect();
        self.metrics.set_flow_tables(per_vip);
    }

    /// Copies the data plane's counters, the backends' states and what is announced into the
    /// metrics.
    pub(super) fn refresh(
        &self,
        balancer: &Balancer,
        announced: &crate::announce::Decision,
        sync: Option<&crate::sync::SyncHandle>,
    ) {
        self.metrics.set_announcements(announced);
        self.metrics
            .set_sync(sync.map(|s| s.status(balancer.dataplane.flow_events_lost().unwrap_or(0))));
        match Snapshot::read(balancer) {
            Ok(snapshot) => self.metrics.update_from(
                &snapshot,
                &balancer.vips,
                self.flow_entries.load(Ordering::Relaxed),
            ),
            Err(e) => warn!("metrics: reading the data plane's counters failed: {e}"),
        }
    }

    /// Takes the DNS responder's query counts (`None`: `[dns]` is off).
    pub(super) fn set_dns(&self, dns: Option<&crate::dns::DnsService>) {
        self.metrics
            .set_dns(dns.map(crate::dns::DnsService::status));
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

    pub(super) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = self.server.await;
    }
}
