//! Finding a packet's VIP: its `VIP_INDEX` slot first (one array read and a key comparison, for
//! VIP traffic and the host's own alike), `VIPS` only when the slot says another VIP of the same
//! slot lives there.

use lb_common::{
    FAMILY_V4, FlowKey, VIP_INDEX_SLOTS, VIP_SLOT_OVERFLOW, VIP_SLOT_VALID, VipInfo, VipKey,
    vip_index_slot_of, vip_key_tail,
};

use crate::maps::{VIP_INDEX, VIPS};

/// The VIP record of the packet's destination (address, port, protocol), if it is a VIP.
///
/// The key is compared word by word straight from the flow's fields (a `VipKey` is built only
/// for the rare `VIPS` lookup): a derived `==` on byte arrays may become a call to a
/// byte-by-byte `bcmp` in BPF.
#[inline(always)]
pub fn lookup(flow: &FlowKey) -> Option<&'static VipInfo> {
    // SAFETY: `FlowKey` is 8-byte aligned and `dst` (bytes 16..32) is four whole words.
    let dst = unsafe { &*(flow.dst.as_ptr() as *const [u32; 4]) };
    let tail = vip_key_tail(flow.dport_be, flow.proto, flow.family);
    let folded = if flow.family == FAMILY_V4 {
        dst[0]
    } else {
        dst[0] ^ dst[1] ^ dst[2] ^ dst[3]
    };
    // The slot number is below VIP_INDEX_SLOTS by construction; the mask shows the verifier.
    let slot = VIP_INDEX.get(vip_index_slot_of(folded, tail) & (VIP_INDEX_SLOTS - 1))?;
    // SAFETY: a plain read of a map value; see `VipSlot` for the order the daemon writes in.
    let state = unsafe { core::ptr::read_volatile(&slot.state) };
    // SAFETY: `VipKey` is 20 bytes with 4-byte alignment: five whole words.
    let key = unsafe { &*(&slot.key as *const VipKey as *const [u32; 5]) };
    if state & VIP_SLOT_VALID != 0
        && key[0] == dst[0]
        && key[1] == dst[1]
        && key[2] == dst[2]
        && key[3] == dst[3]
        && key[4] == tail
    {
        return Some(&slot.info);
    }
    if state & VIP_SLOT_OVERFLOW != 0 {
        // SAFETY: VIP records are written whole by the daemon with one map update; a
        // concurrent update at worst shows us the previous record, which is still a valid one.
        return unsafe { VIPS.get(flow.vip_key()) };
    }
    None
}
