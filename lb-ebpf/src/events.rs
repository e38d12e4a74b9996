//! Flow events (issue 12): each flow recorded in `FLOWS` is told to the daemon through the
//! `FLOW_EVENTS` ring buffer, so it can replicate the entry on its peers. Only the insert path
//! calls this (a new UDP flow, a TCP flow of a changed slot, a re-chosen flow); with the switch
//! off it costs one inlined array read and no ring-buffer work.

use lb_common::{FlowEvent, FlowKey};

use crate::maps::{FLOW_EVENTS, FLOW_EVENTS_LOST, FLOW_EVENTS_ON};

/// Emits `flow -> backend` in `vip_id` if the daemon turned events on; counts an event the
/// full ring could not take.
#[inline(always)]
pub fn flow_recorded(flow: &FlowKey, backend: u32, vip_id: u32) {
    match FLOW_EVENTS_ON.get(0) {
        Some(&on) if on != 0 => {}
        _ => return,
    }
    // Flags 0: adaptive wake-up (the reader is woken only when it has caught up), so a busy
    // ring costs no wake-up per event.
    match FLOW_EVENTS.reserve::<FlowEvent>(0) {
        Some(mut entry) => {
            write_event(entry.as_mut_ptr(), flow, backend, vip_id);
            entry.submit(0);
        }
        None => {
            if let Some(lost) = FLOW_EVENTS_LOST.get_ptr_mut(0) {
                // SAFETY: a per-CPU slot from a successful lookup, touched only by this CPU for
                // the program's run.
                unsafe { *lost += 1 };
            }
        }
    }
}

/// Fills a reserved record with six 8-byte stores. A plain struct write makes LLVM call a
/// byte-by-byte `memcpy` subprogram for the 40-byte key; volatile keeps it from merging the
/// word copies back into one.
#[inline(always)]
fn write_event(event: *mut FlowEvent, flow: &FlowKey, backend: u32, vip_id: u32) {
    const KEY_WORDS: usize = core::mem::size_of::<FlowKey>() / 8;
    let from = (flow as *const FlowKey).cast::<u64>();
    let to = event.cast::<u64>();
    // SAFETY: `event` is a reserved, 8-byte aligned record of `size_of::<FlowEvent>()` bytes
    // (48: the key's five words, then `backend` and `vip_id` in the sixth, little-endian as BPF
    // is); `flow` is an 8-aligned `FlowKey` of five words (sizes and alignment asserted in
    // lb-common).
    unsafe {
        for i in 0..KEY_WORDS {
            core::ptr::write_volatile(to.add(i), core::ptr::read_volatile(from.add(i)));
        }
        core::ptr::write_volatile(
            to.add(KEY_WORDS),
            u64::from(backend) | u64::from(vip_id) << 32,
        );
    }
}
