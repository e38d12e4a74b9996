//! Start-up steps of `lb run` besides the loop: loading (pinned, adopting what is there, or
//! unpinned), waiting for the first check results, and the log lines that say what came up.

use tokio::{sync::mpsc, time::Instant};
use tracing::{info, warn};

use super::{FIRST_RESULTS_GRACE, RunError, events};
use crate::{
    balancer::{Adopted, Balancer, capacity_of},
    config::Config,
    dataplane::{
        AttachMode, DataPlane, DataPlaneError, PinDir, PinError, PinnedState, pins::orphans,
    },
    health::{schedule::CheckReport, supervisor::Supervisor},
};

/// Loads the program with its maps pinned in the interface's bpffs directory (adopting what is
/// there), or unpinned when no bpffs can be had (then stopping detaches, and a restart starts
/// with an empty flow table). `None`: unpinned.
pub(super) fn load(config: &Config) -> Result<(DataPlane, Option<PinnedState>), RunError> {
    let capacity = capacity_of(config);
    let pins = match PinDir::open(&config.interface) {
        Ok(Some(pins)) => pins,
        Ok(None) => {
            warn!(
                "no bpffs here (none on /sys/fs/bpf and none reachable through an ancestor \
                 process's root): nothing is pinned, so stopping lb detaches the program and a \
                 restart starts with an empty flow table; mount one (`mount -t bpf bpf \
                 /sys/fs/bpf`) or start lb with `nsenter --net=...` instead of `ip netns exec`"
            );
            return Ok((DataPlane::load(capacity)?, None));
        }
        Err(e @ PinError::Mount { .. }) => {
            warn!("{e}: nothing is pinned, so stopping lb detaches the program");
            return Ok((DataPlane::load(capacity)?, None));
        }
        Err(e) => return Err(DataPlaneError::from(e).into()),
    };
    let top = pins.top();
    let (dataplane, state) = DataPlane::load_pinned(capacity, pins)?;
    warn_orphans(&top);
    Ok((dataplane, Some(state)))
}

/// One warning per orphaned pinned instance in our bpffs (other interfaces or namespaces whose
/// interface or namespace is gone): each holds its maps' memory until removed.
fn warn_orphans(top: &std::path::Path) {
    for orphan in orphans::scan(top) {
        warn!(
            dir = %orphan.dir,
            memory_bytes = orphan.memory_bytes,
            "{orphan}"
        );
    }
}

pub(super) fn log_adopted(balancer: &Balancer, adopted: &Adopted) {
    let flows = balancer.dataplane.maps.flow_count().unwrap_or(0);
    let dir = balancer
        .dataplane
        .pinned()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    info!(
        vips = adopted.vips,
        backends = adopted.backends,
        up = adopted.up,
        flows,
        "adopted the pinned state in {dir}: {} VIPs, {} backends ({} up), {flows} flows; \
         removed {} VIPs and {} backends the config no longer has",
        adopted.vips,
        adopted.backends,
        adopted.up,
        adopted.stale_vips,
        adopted.stale_backends
    );
}

/// Waits until every backend has a first check result (or twice the longest timeout plus a grace
/// period has passed: a check that has not answered by then counts as not passed yet).
pub(super) async fn collect_first_results(
    balancer: &mut Balancer,
    supervisor: &mut Supervisor,
    reports: &mut mpsc::Receiver<CheckReport>,
) -> Result<(), RunError> {
    let longest = supervisor.longest_pending_timeout().unwrap_or_default();
    // Twice: a failed first check is repeated before it is reported.
    let deadline = Instant::now() + 2 * longest + FIRST_RESULTS_GRACE;
    while supervisor.pending() > 0 {
        match tokio::time::timeout_at(deadline, reports.recv()).await {
            Ok(Some(report)) => {
                events::on_check_reports(balancer, supervisor, &[report], false)?;
            }
            Ok(None) | Err(_) => break,
        }
    }
    if supervisor.pending() > 0 {
        warn!(
            "{} backends have no check result yet; they join when their first check passes",
            supervisor.pending()
        );
    }
    Ok(())
}

pub(super) fn log_attached(balancer: &Balancer, interface: &str, mode: AttachMode) {
    let backends: usize = balancer.vips.iter().map(|v| v.backends.len()).sum();
    let up: usize = balancer
        .vips
        .iter()
        .map(|v| v.backends.iter().filter(|b| b.reachable()).count())
        .sum();
    info!(
        interface,
        mode = mode.name(),
        vips = balancer.vips.len(),
        backends,
        up,
        "XDP load balancer attached to {interface} in {} mode ({up} of {backends} backends up)",
        mode.name()
    );
    for vip in &balancer.vips {
        info!(vip = %vip.name, pool = vip.active_pool.as_str(), "vip {}: serving from the {} pool", vip.name, vip.active_pool);
    }
}
