//! Backend choice (DESIGN §8). The flow's slot of the VIP's live Maglev table names its `owner`
//! and, when the slot changed recently, its `prior` owner.
//!
//! - TCP, unchanged slot: the owner; the flow table is neither read nor written (the ring
//!   already gives every connection of the slot its backend, and a SYN flood cannot evict
//!   anything).
//! - TCP, changed slot: a recorded flow keeps its backend while that is up in this VIP (else it
//!   is re-chosen: the owner). An unrecorded SYN goes to the owner; any other unrecorded packet
//!   belongs to a connection that began before the change, so it goes to the prior owner if that
//!   is still up in this VIP, else to the owner. Either way the flow is recorded.
//! - UDP (no SYN to tell a new flow): every flow is recorded, and a recorded flow keeps its
//!   backend while that is up in this VIP.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_ktime_get_coarse_ns, programs::XdpContext};
use lb_common::{
    BACKEND_F_REDIRECT, BACKEND_F_UP, Backend, FLOW_REFRESH_NS, FlowKey, FlowState, NO_BACKEND,
    PROTO_TCP, Reason, RingSlot, VIP_F_ENCAP, VIP_F_PASS_WHEN_EMPTY, VipInfo, flow_hash,
    ring_index,
};

use crate::{
    RING_SIZE, RING_SIZE_INVERSE, counters, encap, events,
    maps::{BACKENDS, FLOWS, RINGS, TX_PORTS},
    parse::{self, Packet},
    rewrite, vips,
};

/// The backend a packet goes to.
struct Choice {
    id: u32,
    backend: &'static Backend,
    /// Counted as a new flow of the VIP and the backend: a TCP SYN, a flow (re-)chosen from the
    /// owner, a new UDP flow.
    new_flow: bool,
}

/// Forwards a parsed packet if it is addressed to a VIP; returns the verdict and why.
#[inline(always)]
pub fn forward(ctx: &XdpContext, packet: &Packet) -> (u32, Reason) {
    let flow = &packet.key;
    let Some(vip) = vips::lookup(flow) else {
        return (xdp_action::XDP_PASS, Reason::PassNotVip);
    };
    let chosen = match ring_slot(flow, vip) {
        Ok(slot) if flow.proto == PROTO_TCP => choose_tcp(flow, packet.opens, vip, slot),
        Ok(slot) => choose_recorded(flow, vip, slot),
        Err(reason) => Err(reason),
    };
    let choice = match chosen {
        Ok(choice) => choice,
        Err(Reason::DropNoBackend) if vip.flags & VIP_F_PASS_WHEN_EMPTY != 0 => {
            return (xdp_action::XDP_PASS, Reason::PassAllDown);
        }
        Err(reason) => return (xdp_action::XDP_DROP, reason),
    };
    let Choice {
        id,
        backend,
        new_flow,
    } = choice;
    let received_len = parse::frame_len(ctx);
    if vip.flags & VIP_F_ENCAP != 0 {
        if let Err(answer) = encap::encapsulate(ctx, flow, vip, backend) {
            return answer;
        }
    } else if !rewrite::set_macs(ctx, backend) {
        // Unreachable: the parser already proved the Ethernet header is there.
        return (xdp_action::XDP_PASS, Reason::PassMalformed);
    }
    counters::count_forwarded(id, received_len, new_flow);
    if backend.flags & BACKEND_F_REDIRECT != 0 {
        let (verdict, reason) = match TX_PORTS.redirect(id, u64::from(xdp_action::XDP_DROP)) {
            Ok(verdict) => (verdict, Reason::Redirect),
            Err(verdict) => (verdict, Reason::DropRedirectFailed),
        };
        // As received, like the backend's count that `tx` is derived from.
        counters::count_reason(reason, received_len);
        (verdict, reason)
    } else {
        (xdp_action::XDP_TX, Reason::Tx)
    }
}

/// The flow's slot of the VIP's live table.
#[inline(always)]
fn ring_slot(flow: &FlowKey, vip: &VipInfo) -> Result<RingSlot, Reason> {
    // SAFETY: reading read-only globals; volatile so the compiler keeps the loads that the
    // daemon's `set_global` patches instead of folding the compiled-in defaults.
    let (ring_size, inverse) = unsafe {
        (
            core::ptr::read_volatile(&RING_SIZE),
            core::ptr::read_volatile(&RING_SIZE_INVERSE),
        )
    };
    if ring_size < 2 {
        return Err(Reason::DropNoBackend);
    }
    let table = vip.id * 2 + (vip.active_ring & 1);
    let index = table * ring_size + ring_index(flow_hash(flow), ring_size, inverse);
    // One 8-byte load: the daemon changes a live slot with one aligned store.
    RINGS.get(index).copied().ok_or(Reason::DropBadBackend)
}

#[inline(always)]
fn choose_tcp(
    flow: &FlowKey,
    opens: bool,
    vip: &VipInfo,
    slot: RingSlot,
) -> Result<Choice, Reason> {
    if !slot.is_changed() {
        return Ok(Choice {
            id: slot.owner,
            backend: record(slot.owner)?,
            new_flow: opens,
        });
    }
    let prior = match recorded(flow, vip) {
        Recorded::Usable(choice) => return Ok(choice),
        // The recorded backend is gone: re-chosen, like any flow whose backend went down.
        Recorded::Unusable => None,
        Recorded::No => usable(slot.prior, vip),
    };
    let choice = match prior {
        Some(backend) if !opens => Choice {
            id: slot.prior,
            backend,
            new_flow: false,
        },
        _ => Choice {
            id: slot.owner,
            backend: record(slot.owner)?,
            new_flow: true,
        },
    };
    remember(flow, vip, choice.id);
    Ok(choice)
}

/// UDP: the recorded backend, or the owner (recorded from now on).
#[inline(always)]
fn choose_recorded(flow: &FlowKey, vip: &VipInfo, slot: RingSlot) -> Result<Choice, Reason> {
    if let Recorded::Usable(choice) = recorded(flow, vip) {
        return Ok(choice);
    }
    let backend = record(slot.owner)?;
    remember(flow, vip, slot.owner);
    Ok(Choice {
        id: slot.owner,
        backend,
        new_flow: true,
    })
}

/// The backend record of a slot's owner.
#[inline(always)]
fn record(id: u32) -> Result<&'static Backend, Reason> {
    if id == NO_BACKEND {
        return Err(Reason::DropNoBackend);
    }
    BACKENDS.get(id).ok_or(Reason::DropBadBackend)
}

/// `id`'s record, if that backend is up and serves this VIP.
#[inline(always)]
fn usable(id: u32, vip: &VipInfo) -> Option<&'static Backend> {
    let backend = BACKENDS.get(id)?;
    (backend.flags & BACKEND_F_UP != 0 && backend.vip_id == vip.id).then_some(backend)
}

/// What the flow table says about a flow.
enum Recorded {
    /// Recorded, and its backend is up in this VIP.
    Usable(Choice),
    /// Recorded on a backend that is down, gone or in another VIP.
    Unusable,
    /// Not recorded.
    No,
}

/// The flow's recorded backend. Refreshes `last_seen_ns` only when it is stale, to keep the
/// entry's cache line quiet.
#[inline(always)]
fn recorded(flow: &FlowKey, vip: &VipInfo) -> Recorded {
    let Some(state) = FLOWS.get_ptr_mut(flow) else {
        return Recorded::No;
    };
    // SAFETY: the pointer comes from a successful lookup; LRU entries stay valid for the
    // program's run (RCU), and a racing update of the same entry writes the same field types.
    let id = unsafe { (*state).backend };
    let Some(backend) = usable(id, vip) else {
        return Recorded::Unusable;
    };
    // SAFETY: `bpf_ktime_get_coarse_ns` has no preconditions; `state` is valid as above.
    unsafe {
        let now = bpf_ktime_get_coarse_ns();
        if now.wrapping_sub((*state).last_seen_ns) > FLOW_REFRESH_NS {
            (*state).last_seen_ns = now;
        }
    }
    Recorded::Usable(Choice {
        id,
        backend,
        new_flow: false,
    })
}

/// Records the flow's backend, and tells the daemon (flow events, when it asked for them).
#[inline(always)]
fn remember(flow: &FlowKey, vip: &VipInfo, id: u32) {
    let state = FlowState {
        backend: id,
        vip_id: vip.id,
        // SAFETY: helper without arguments or side effects.
        last_seen_ns: unsafe { bpf_ktime_get_coarse_ns() },
    };
    // A full table evicts its least recently used entry, so the insert only fails on memory
    // pressure; the packet is forwarded anyway and the next one retries (and is told then).
    if FLOWS.insert(flow, state, 0).is_ok() {
        events::flow_recorded(flow, id, vip.id);
    }
}
