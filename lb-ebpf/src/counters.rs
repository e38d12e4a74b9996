//! Per-CPU counters: no atomics needed, the daemon sums the CPUs.

use lb_common::{Counters, Reason};

use crate::maps::{BACKEND_STATS, REASONS, VIP_STATS};

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

#[inline(always)]
pub fn count_reason(reason: Reason, bytes: u64) {
    bump(REASONS.get_ptr_mut(reason as u32), bytes, false);
}

#[inline(always)]
pub fn count_forwarded(vip_id: u32, backend_id: u32, bytes: u64, new_flow: bool) {
    bump(VIP_STATS.get_ptr_mut(vip_id), bytes, new_flow);
    bump(BACKEND_STATS.get_ptr_mut(backend_id), bytes, new_flow);
}
