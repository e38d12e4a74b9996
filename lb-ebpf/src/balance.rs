//! Backend choice: an established flow keeps its backend (flow table); a new flow, or one whose
//! backend went down, takes the backend in its slot of the VIP's live Maglev table.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_ktime_get_coarse_ns, programs::XdpContext};
use lb_common::{
    BACKEND_F_REDIRECT, BACKEND_F_UP, Backend, FLOW_REFRESH_NS, FlowKey, FlowState, NO_BACKEND,
    Reason, VIP_F_PASS_WHEN_EMPTY, VipInfo, flow_hash,
};

use crate::{
    RING_SIZE, counters,
    maps::{BACKENDS, FLOWS, RINGS, TX_PORTS, VIPS},
    parse, rewrite,
};

/// Forwards a parsed packet if it is addressed to a VIP; returns the verdict and why.
#[inline(always)]
pub fn forward(ctx: &XdpContext, flow: &FlowKey) -> (u32, Reason) {
    // SAFETY: VIP records are written whole by the daemon with one map update; a concurrent
    // update at worst shows us the previous record, which is still a valid one.
    let Some(vip) = (unsafe { VIPS.get(flow.vip_key()) }) else {
        return (xdp_action::XDP_PASS, Reason::PassNotVip);
    };
    let (backend_id, backend, new_flow) = match established(flow, vip) {
        Some((id, backend)) => (id, backend, false),
        None => match choose_new(flow, vip) {
            Ok((id, backend)) => (id, backend, true),
            Err(Reason::DropNoBackend) if vip.flags & VIP_F_PASS_WHEN_EMPTY != 0 => {
                return (xdp_action::XDP_PASS, Reason::PassAllDown);
            }
            Err(reason) => return (xdp_action::XDP_DROP, reason),
        },
    };
    counters::count_forwarded(vip.id, backend_id, parse::frame_len(ctx), new_flow);
    if !rewrite::set_macs(ctx, &backend.dst_mac, &backend.src_mac) {
        // Unreachable: the parser already proved the Ethernet header is there.
        return (xdp_action::XDP_PASS, Reason::PassMalformed);
    }
    if backend.flags & BACKEND_F_REDIRECT != 0 {
        match TX_PORTS.redirect(backend_id, u64::from(xdp_action::XDP_DROP)) {
            Ok(verdict) => (verdict, Reason::Redirect),
            Err(verdict) => (verdict, Reason::DropRedirectFailed),
        }
    } else {
        (xdp_action::XDP_TX, Reason::Tx)
    }
}

/// The flow's pinned backend, if the flow is known and its backend is still up and still serves
/// this VIP. Refreshes `last_seen_ns` only when it is stale, to keep the entry's cache line quiet.
#[inline(always)]
fn established(flow: &FlowKey, vip: &VipInfo) -> Option<(u32, Backend)> {
    let state = FLOWS.get_ptr_mut(flow)?;
    // SAFETY: the pointer comes from a successful lookup; LRU entries stay valid for the
    // program's run (RCU), and a racing update of the same entry writes the same field types.
    let backend_id = unsafe { (*state).backend };
    let backend = *BACKENDS.get(backend_id)?;
    if backend.flags & BACKEND_F_UP == 0 || backend.vip_id != vip.id {
        return None;
    }
    // SAFETY: `bpf_ktime_get_coarse_ns` has no preconditions; `state` is valid as above.
    unsafe {
        let now = bpf_ktime_get_coarse_ns();
        if now.wrapping_sub((*state).last_seen_ns) > FLOW_REFRESH_NS {
            (*state).last_seen_ns = now;
        }
    }
    Some((backend_id, backend))
}

/// Picks the backend in the flow's slot of the live ring and records the flow.
#[inline(always)]
fn choose_new(flow: &FlowKey, vip: &VipInfo) -> Result<(u32, Backend), Reason> {
    // SAFETY: reading a read-only global; volatile so the compiler keeps the load that the
    // daemon's `set_global` patches instead of folding the compiled-in default.
    let ring_size = unsafe { core::ptr::read_volatile(&RING_SIZE) };
    if ring_size == 0 {
        return Err(Reason::DropNoBackend);
    }
    let table = vip.id * 2 + (vip.active_ring & 1);
    let slot = table * ring_size + flow_hash(flow) % ring_size;
    let backend_id = RINGS.get(slot).ok_or(Reason::DropBadBackend)?.backend;
    if backend_id == NO_BACKEND {
        return Err(Reason::DropNoBackend);
    }
    let backend = *BACKENDS.get(backend_id).ok_or(Reason::DropBadBackend)?;
    let state = FlowState {
        backend: backend_id,
        vip_id: vip.id,
        // SAFETY: helper without arguments or side effects.
        last_seen_ns: unsafe { bpf_ktime_get_coarse_ns() },
    };
    // A full table evicts its least recently used entry, so the insert only fails on memory
    // pressure; the packet is forwarded anyway and the next one retries.
    let _ = FLOWS.insert(flow, state, 0);
    Ok((backend_id, backend))
}
