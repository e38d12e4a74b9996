//! The pre-filter in front of the `VIPS` lookup: one bit per destination-address hash, set by
//! the daemon for every VIP address before the VIP's record goes in. Most traffic that is not
//! for a VIP (the host's own) finds its bit clear and is passed without hashing a 20-byte key
//! into the VIP table; a set bit only means "look it up".

use lb_common::{FAMILY_V4, FlowKey, VIP_FILTER_WORDS, vip_filter_bit, vip_filter_bit_v4};

use crate::maps::VIP_FILTER;

/// False when no VIP has the flow's destination address.
#[inline(always)]
pub fn may_be_vip(flow: &FlowKey) -> bool {
    let bit = if flow.family == FAMILY_V4 {
        let [a0, a1, a2, a3, ..] = flow.dst;
        vip_filter_bit_v4([a0, a1, a2, a3])
    } else {
        vip_filter_bit(&flow.dst)
    };
    // The bit index is below VIP_FILTER_WORDS * 64 by construction; the mask keeps the
    // verifier's view of the word index in range too.
    match VIP_FILTER.get((bit / 64) & (VIP_FILTER_WORDS - 1)) {
        Some(word) => word & (1u64 << (bit % 64)) != 0,
        // Cannot happen (a fixed-size array); looking the VIP up is the safe answer.
        None => true,
    }
}
