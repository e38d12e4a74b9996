//! VIP, flow table and ring: which backend a parsed packet goes to, or why it does not.
//!
//! - Not a VIP (address, port, protocol, family): pass.
//! - A known flow follows its entry while that backend exists, is up and serves this VIP.
//! - Otherwise the flow takes slot `flow_hash % M` of the VIP's live table (`2*id + active`),
//!   and the flow table must then pin it there. An empty slot drops (or passes, for a VIP that
//!   passes when empty); a slot past the ring array or naming a backend past the backend array
//!   drops as a bad backend.

use lb_common::{
    BACKEND_F_UP, FlowKey, NO_BACKEND, Reason, VIP_F_PASS_WHEN_EMPTY, VipKey, flow_hash,
};

use super::{Expected, Forwarded, MapsView, XDP_DROP, XDP_PASS, rewrite};

pub fn forward(key: &FlowKey, maps: &impl MapsView) -> Expected {
    let vip_key = VipKey {
        addr: key.dst,
        port_be: key.dport_be,
        proto: key.proto,
        family: key.family,
    };
    let Some(vip) = maps.vip(&vip_key) else {
        return untouched(XDP_PASS, Reason::PassNotVip);
    };
    let pinned = maps.flow(key).and_then(|state| {
        maps.backend(state.backend)
            .filter(|b| b.flags & BACKEND_F_UP != 0 && b.vip_id == vip.id)
            .map(|b| (state.backend, b))
    });
    let (backend_id, backend, new_flow) = match pinned {
        Some((id, backend)) => (id, backend, false),
        None => {
            let m = maps.ring_size();
            if m == 0 {
                return empty(vip.flags);
            }
            let table = u64::from(vip.id) * 2 + u64::from(vip.active_ring & 1);
            let slot = table * u64::from(m) + u64::from(flow_hash(key) % m);
            let Some(id) = maps.ring_slot(slot) else {
                return untouched(XDP_DROP, Reason::DropBadBackend);
            };
            if id == NO_BACKEND {
                return empty(vip.flags);
            }
            let Some(backend) = maps.backend(id) else {
                return untouched(XDP_DROP, Reason::DropBadBackend);
            };
            (id, backend, true)
        }
    };
    let (verdict, reason) = rewrite::verdict(backend_id, &backend, maps);
    Expected {
        verdict,
        reason,
        macs: Some((backend.dst_mac, backend.src_mac)),
        forwarded: Some(Forwarded {
            vip_id: vip.id,
            backend_id,
            new_flow,
            key: *key,
        }),
    }
}

fn untouched(verdict: u32, reason: Reason) -> Expected {
    Expected {
        verdict,
        reason,
        macs: None,
        forwarded: None,
    }
}

/// No backend to offer: drop, unless the VIP's policy is to pass to the host.
fn empty(vip_flags: u32) -> Expected {
    if vip_flags & VIP_F_PASS_WHEN_EMPTY != 0 {
        untouched(XDP_PASS, Reason::PassAllDown)
    } else {
        untouched(XDP_DROP, Reason::DropNoBackend)
    }
}
