//! Per-CPU counters: no atomics needed, the daemon sums the CPUs.
//!
//! A forwarded packet is counted once, on its backend: the VIP's totals and the `tx` reason are
//! sums the daemon makes (with a carry for removed backends and VIPs), which saves two
//! counter updates per packet.

use lb_common::{Counters, Reason};

use crate::maps::{BACKEND_STATS, REASONS};

#[inline(always)]
fn bump(counters: Option<*mut Counters>, bytes: u64, new_flow: bool) {
    if let Some(c) = counters {
        // SAFETY: a per-CPU array slot is only touched by this CPU, and the pointer comes from a
        // successful map lookup, so it is valid and not aliased for the program's run.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            if new_flow {
                (*c).new_flows += 1;
            }
        }
    }
}

/// Counts a verdict that is not a forward (see [`Reason::is_forwarded`]), or a redirect's
/// outcome, with `bytes` as received.
#[inline(always)]
pub fn count_reason(reason: Reason, bytes: u64) {
    bump(REASONS.get_ptr_mut(reason as u32), bytes, false);
}

/// Counts a packet forwarded to `backend_id`, `bytes` as received (before any encapsulation).
#[inline(always)]
pub fn count_forwarded(backend_id: u32, bytes: u64, new_flow: bool) {
    bump(BACKEND_STATS.get_ptr_mut(backend_id), bytes, new_flow);
}
