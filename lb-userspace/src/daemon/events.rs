//! Applying health results to the data plane, and the log line of every change.

use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::RunError;
use crate::{
    balancer::{Balancer, PublishReport},
    health::{Health, Transition, schedule::CheckReport, supervisor::Supervisor},
    pool::ActivePool,
};

/// Applies a batch of check results. Every transition is recorded first, then each VIP that
/// changed is rewritten once, so a mass failure costs one Maglev build per VIP, not one per
/// backend. Each change is logged with the map update that made it live, and, once the program is
/// attached, each pool flip too (before that no packet sees a pool; the start-up summary reports
/// each VIP's). Returns whether a backend came up without a known L2 path (its MAC was lost,
/// say while a link was down): it is out of the ring until its path is resolved again.
pub(super) fn on_check_reports(
    balancer: &mut Balancer,
    supervisor: &mut Supervisor,
    reports: &[CheckReport],
    attached: bool,
) -> Result<bool, RunError> {
    let mut changes: Vec<HealthChange<'_>> = Vec::new();
    // (VIP index, backend index, the health one more result will give it).
    let mut brinks: Vec<(usize, usize, Health)> = Vec::new();
    for report in reports {
        // A result for a backend a reload just removed finds no place in the model.
        let Some(place) = balancer.locate(report.checker.backend) else {
            continue;
        };
        if let Some(transition) = supervisor.record(report) {
            let held = balancer.mark_health(place.0, place.1, transition.to)?;
            changes.push(HealthChange {
                report,
                place,
                transition,
                held,
            });
        } else if supervisor.is_current(report.checker)
            && let Some(next) = supervisor.on_the_brink(report.checker.backend)
        {
            brinks.push((place.0, place.1, next));
        }
    }
    let mut vips: Vec<usize> = changes.iter().map(|c| c.place.0).collect();
    vips.sort_unstable();
    vips.dedup();
    for v in vips {
        let published = balancer.publish(v)?;
        for change in changes.iter().filter(|c| c.place.0 == v) {
            log_transition(balancer, change, &published);
        }
        if attached {
            log_flip(balancer, v, &published);
        }
    }
    prepare_next_tables(balancer, &brinks);
    let up_unresolved = changes.iter().any(|c| {
        let (v, b) = c.place;
        c.transition.to == Health::Up && balancer.vips[v].backends[b].path.is_none()
    });
    Ok(up_unresolved)
}

/// A VIP whose table was prepared this long ago is not prepared again: when many backends fail
/// at once, preparing a table for each would double the builds the failures cost anyway (each
/// still publishes), for tables of which at most one gets used.
const PREPARE_AT_MOST_EVERY: Duration = Duration::from_millis(100);

/// Builds, for each VIP with a backend one result away from a health change, the table that
/// change will need (after this batch's changes are live, so from the model as it is now): the
/// deciding result then goes live without a Maglev build (`balancer::prepare`). One table per
/// VIP and batch, for the last such backend of the batch. A failure only costs the speed-up, so
/// it is logged, not returned: the batch's changes are live already.
fn prepare_next_tables(balancer: &mut Balancer, brinks: &[(usize, usize, Health)]) {
    for (i, &(v, b, next)) in brinks.iter().enumerate() {
        let last_of_its_vip = brinks[i + 1..].iter().all(|&(other, ..)| other != v);
        let recently = balancer
            .prepared_age(v)
            .is_some_and(|age| age < PREPARE_AT_MOST_EVERY);
        if last_of_its_vip
            && !recently
            && let Err(e) = balancer.prepare_health(v, b, next)
        {
            // `e` names the VIP or backend it could not find.
            warn!("preparing the next Maglev table failed: {e}");
        }
    }
}

/// One backend's health transition in a batch of check results.
struct HealthChange<'a> {
    report: &'a CheckReport,
    /// (VIP index, backend index).
    place: (usize, usize),
    transition: Transition,
    /// Until when its established flows are held on it (it went down in a group).
    held: Option<Instant>,
}

fn log_transition(balancer: &Balancer, change: &HealthChange<'_>, published: &PublishReport) {
    let HealthChange {
        report,
        place: (v, b),
        transition: t,
        held,
    } = *change;
    let vip = &balancer.vips[v];
    let backend = &vip.backends[b];
    let map_update_us = published.elapsed.as_micros() as u64;
    let prepared = if published.prepared {
        " (table prepared on the check before)"
    } else {
        ""
    };
    let hold = match held {
        Some(until) => format!(
            "; out of the ring, its established flows stay on it for {:?} (several nodes: \
             another node may take the VIP over first)",
            until.saturating_duration_since(Instant::now())
        ),
        None => String::new(),
    };
    let message = format!(
        "backend {} of vip {}: {} -> {} ({}); map updated in {}us{prepared}{hold}",
        backend.address, vip.name, t.from, t.to, report.outcome.reason, map_update_us
    );
    let fields = (
        vip.name.as_str(),
        backend.address,
        t.from.as_str(),
        t.to.as_str(),
    );
    if t.to == Health::Down {
        warn!(vip = fields.0, backend = %fields.1, from = fields.2, to = fields.3,
              reason = %report.outcome.reason, map_update_us, "{message}");
    } else {
        info!(vip = fields.0, backend = %fields.1, from = fields.2, to = fields.3,
              reason = %report.outcome.reason, map_update_us, "{message}");
    }
}

/// One line per backend whose flow hold ended: its flows are re-chosen from now on.
pub(super) fn log_released(balancer: &Balancer, released: &[(usize, usize)]) {
    for &(v, b) in released {
        let vip = &balancer.vips[v];
        let backend = &vip.backends[b];
        if backend.reachable() {
            continue;
        }
        info!(
            vip = %vip.name, backend = %backend.address,
            "backend {} of vip {}: flow hold over; its flows are re-chosen from the ring",
            backend.address, vip.name
        );
    }
}

pub(super) fn log_flip(balancer: &Balancer, v: usize, published: &PublishReport) {
    if published.pool_before == published.pool_after {
        return;
    }
    let vip = &balancer.vips[v];
    let primaries = vip.backends.iter().filter(|b| !b.standby).count();
    let healthy = vip
        .backends
        .iter()
        .filter(|b| !b.standby && b.reachable())
        .count();
    let message = format!(
        "vip {}: pool {} -> {} ({healthy} of {primaries} primaries healthy, min_healthy {}; {} backends in the ring)",
        vip.name, published.pool_before, published.pool_after, vip.min_healthy, published.in_ring
    );
    let (from, to) = (
        published.pool_before.as_str(),
        published.pool_after.as_str(),
    );
    match published.pool_after {
        ActivePool::Primary => info!(vip = %vip.name, from, to, "{message}"),
        ActivePool::Standby => warn!(vip = %vip.name, from, to, "{message}"),
        ActivePool::None => warn!(
            vip = %vip.name, from, to, on_all_down = vip.on_all_down.as_str(),
            "{message}; nothing healthy: on_all_down = {}", vip.on_all_down
        ),
    }
}
