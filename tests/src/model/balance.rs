//! VIP, ring slot and flow table: which backend a parsed packet goes to, or why it does not
//! (README "How it behaves", DESIGN §8).
//!
//! - Not a VIP (address, port, protocol, family): pass.
//! - The packet's slot is `flow_hash % M` of the VIP's live table (`2*id + active`); a slot past
//!   the ring array, or an owner past the backend array, drops as a bad backend. An empty owner
//!   drops (or passes, for a VIP that passes when empty).
//! - TCP, slot unchanged (`prior == NO_BACKEND`): the owner, and the flow table is not touched.
//! - TCP, slot changed: a recorded flow whose backend exists, is up and serves this VIP keeps
//!   it; a recorded flow on any other backend is re-chosen (the owner). An unrecorded SYN without
//!   ACK goes to the owner; any other unrecorded packet goes to the prior owner if that is up in
//!   this VIP, else to the owner. The flow table then holds the flow on that backend.
//! - UDP: a recorded flow keeps a usable backend; otherwise the owner, recorded.

use lb_common::{
    BACKEND_F_UP, Backend, FlowKey, NO_BACKEND, PROTO_TCP, Reason, RingSlot, VIP_F_PASS_WHEN_EMPTY,
    VipInfo, VipKey, flow_hash,
};

use super::{Expected, Forwarded, MapsView, XDP_DROP, XDP_PASS, parse::Packet, rewrite};

pub fn forward(packet: &Packet, maps: &impl MapsView) -> Expected {
    let key = &packet.key;
    let vip_key = VipKey {
        addr: key.dst,
        port_be: key.dport_be,
        proto: key.proto,
        family: key.family,
    };
    let Some(vip) = maps.vip(&vip_key) else {
        return untouched(XDP_PASS, Reason::PassNotVip);
    };
    let m = maps.ring_size();
    // The program guards against a ring of fewer than two slots (the daemon never loads one).
    if m < 2 {
        return empty(vip.flags);
    }
    let table = u64::from(vip.id) * 2 + u64::from(vip.active_ring & 1);
    let Some(slot) = maps.ring_slot(table * u64::from(m) + u64::from(flow_hash(key) % m)) else {
        return untouched(XDP_DROP, Reason::DropBadBackend);
    };
    let choice = if key.proto == PROTO_TCP {
        tcp(packet, &vip, slot, maps)
    } else {
        udp(key, &vip, slot, maps)
    };
    let (backend_id, backend, new_flow, records) = match choice {
        Ok(choice) => choice,
        Err(Reason::DropNoBackend) => return empty(vip.flags),
        Err(reason) => return untouched(XDP_DROP, reason),
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
            records,
            key: *key,
        }),
    }
}

/// (backend id, record, counted as new, recorded in the flow table).
type Choice = (u32, Backend, bool, bool);

fn tcp(
    packet: &Packet,
    vip: &VipInfo,
    slot: RingSlot,
    maps: &impl MapsView,
) -> Result<Choice, Reason> {
    if slot.prior == NO_BACKEND {
        let backend = owner(slot, maps)?;
        return Ok((slot.owner, backend, packet.opens, false));
    }
    let prior = match maps.flow(&packet.key) {
        Some(state) => match usable(state.backend, vip, maps) {
            Some(backend) => return Ok((state.backend, backend, false, false)),
            None => None,
        },
        None => usable(slot.prior, vip, maps),
    };
    match prior {
        Some(backend) if !packet.opens => Ok((slot.prior, backend, false, true)),
        _ => Ok((slot.owner, owner(slot, maps)?, true, true)),
    }
}

fn udp(
    key: &FlowKey,
    vip: &VipInfo,
    slot: RingSlot,
    maps: &impl MapsView,
) -> Result<Choice, Reason> {
    if let Some(state) = maps.flow(key)
        && let Some(backend) = usable(state.backend, vip, maps)
    {
        return Ok((state.backend, backend, false, false));
    }
    Ok((slot.owner, owner(slot, maps)?, true, true))
}

fn owner(slot: RingSlot, maps: &impl MapsView) -> Result<Backend, Reason> {
    if slot.owner == NO_BACKEND {
        return Err(Reason::DropNoBackend);
    }
    maps.backend(slot.owner).ok_or(Reason::DropBadBackend)
}

fn usable(id: u32, vip: &VipInfo, maps: &impl MapsView) -> Option<Backend> {
    maps.backend(id)
        .filter(|b| b.flags & BACKEND_F_UP != 0 && b.vip_id == vip.id)
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
