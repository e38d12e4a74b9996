//! Finding a packet's VIP: its `VIP_INDEX` slot first (one array read and a key comparison, for
//! VIP traffic and the host's own alike), `VIPS` only when the slot says another VIP of the same
//! slot lives there.

use lb_common::{
    FAMILY_V4, FlowKey, VIP_INDEX_SLOTS, VIP_SLOT_OVERFLOW, VIP_SLOT_VALID, VipInfo, VipKey,
    vip_index_slot, vip_index_slot_v4,
};

use crate::maps::{VIP_INDEX, VIPS};

/// The VIP record of the packet's destination (address, port, protocol), if it is a VIP.
#[inline(always)]
pub fn lookup(flow: &FlowKey) -> Option<&'static VipInfo> {
    let key = flow.vip_key();
    let index = if flow.family == FAMILY_V4 {
        // SAFETY: `FlowKey` is 8-byte aligned and `dst` starts at byte 16.
        let first = unsafe { *(flow.dst.as_ptr() as *const u32) };
        vip_index_slot_v4(first, &key)
    } else {
        vip_index_slot(&key)
    };
    // The slot number is below VIP_INDEX_SLOTS by construction; the mask shows the verifier.
    let slot = VIP_INDEX.get(index & (VIP_INDEX_SLOTS - 1))?;
    // SAFETY: a plain read of a map value; see `VipSlot` for the order the daemon writes in.
    let state = unsafe { core::ptr::read_volatile(&slot.state) };
    if state & VIP_SLOT_VALID != 0 && same_key(&slot.key, &key) {
        return Some(&slot.info);
    }
    if state & VIP_SLOT_OVERFLOW != 0 {
        // SAFETY: VIP records are written whole by the daemon with one map update; a
        // concurrent update at worst shows us the previous record, which is still a valid one.
        return unsafe { VIPS.get(&key) };
    }
    None
}

/// `a == b` as five word comparisons (a derived `==` on the byte arrays may become a call to a
/// byte-by-byte `bcmp` in BPF).
#[inline(always)]
fn same_key(a: &VipKey, b: &VipKey) -> bool {
    let (a, b) = (
        a as *const VipKey as *const u32,
        b as *const VipKey as *const u32,
    );
    // SAFETY: `VipKey` is 20 bytes with 4-byte alignment: words 0..5 are all of it.
    unsafe {
        *a == *b
            && *a.add(1) == *b.add(1)
            && *a.add(2) == *b.add(2)
            && *a.add(3) == *b.add(3)
            && *a.add(4) == *b.add(4)
    }
}
