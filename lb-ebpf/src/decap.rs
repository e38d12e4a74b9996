//! `lb_decap`: the backend-side decapsulator (`lb decap`). Strips the balancer's IPIP or GUE outer
//! headers from packets whose inner destination is a configured VIP and passes the inner packet
//! to the stack, so a backend needs no tunnel device. Accepted (and nothing else):
//!
//! - IPIP: IPv4 (protocol 4) carrying IPv4, IPv6 (next header 41) carrying IPv6, IPv6 (next
//!   header 4) carrying IPv4; no IPv6 extension headers on the outer.
//! - GUE: IPv4 or IPv6 + UDP to the configured port, then either the inner packet directly
//!   ("direct IP", variant 1) or a 4-byte version-0 header (hlen 0, proto 4 or 41, flags 0). The
//!   UDP checksum is not looked at (tunnels send zero, RFC 6935).
//!
//! The inner packet's length must be exactly what the outer carries. Ethernet with at most one
//! 802.1Q tag (kept, like the MACs). Every verdict is `XDP_PASS`; a packet that is not
//! decapsulated is left byte for byte as it came.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{Array, HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    Counters, FAMILY_V4, FAMILY_V6, PROTO_UDP,
    decap::{DECAP_MAX_VIPS, DecapConfig, DecapReason, DecapVip, PROTO_IPIP, PROTO_IPV6},
};

use crate::parse::{bounds, frame_len, header, load};
use crate::wire::{
    ETH_LEN, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPV4_LEN, IPV4_MF, IPV4_OFFSET_MASK, IPV6_LEN,
    UDP_LEN,
};

#[map]
pub static DECAP_VIPS: HashMap<DecapVip, u32> = HashMap::with_max_entries(DECAP_MAX_VIPS, 0);

#[map]
pub static DECAP_CONFIG: Array<DecapConfig> = Array::with_max_entries(1, 0);

#[map]
pub static DECAP_STATS: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(DecapReason::COUNT, 0);

const VLAN_ETH_LEN: usize = 18;
const GUE_V0_LEN: usize = 4;

/// Where the inner packet is and what it is.
struct Inner {
    /// Bytes from the frame's start.
    offset: usize,
    /// Bytes the outer headers say follow them: the inner packet must be exactly this long.
    len: usize,
    family: u8,
    kind: DecapReason,
}

#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    let bytes = frame_len(&ctx);
    let reason = match decapsulate(&ctx) {
        Ok(reason) | Err(reason) => reason,
    };
    if let Some(counters) = DECAP_STATS.get_ptr_mut(reason as u32) {
        // SAFETY: a per-CPU slot from a successful lookup: valid, and only this CPU touches it
        // during the program's run.
        unsafe {
            (*counters).packets += 1;
            (*counters).bytes += bytes;
        }
    }
    xdp_action::XDP_PASS
}

/// `Ok`: stripped (IPIP or GUE); `Err`: left untouched, for this reason.
#[inline(always)]
fn decapsulate(ctx: &XdpContext) -> Result<DecapReason, DecapReason> {
    let eth: *const [u8; ETH_LEN] = header(ctx, 0).ok_or(DecapReason::PassNotEncapsulated)?;
    // SAFETY: the 14-byte Ethernet header is inside the frame (`header`); bytes 12..14 are the
    // ethertype.
    let mut ether_type = u16::from_be(unsafe { load::<u16>(eth as usize + 12) });
    let mut l2 = ETH_LEN;
    if ether_type == ETH_P_8021Q {
        let tagged: *const [u8; VLAN_ETH_LEN] =
            header(ctx, 0).ok_or(DecapReason::PassNotEncapsulated)?;
        // SAFETY: the tagged header is inside the frame; bytes 16..18 are the inner ethertype.
        ether_type = u16::from_be(unsafe { load::<u16>(tagged as usize + 16) });
        l2 = VLAN_ETH_LEN;
    }
    let inner = match ether_type {
        ETH_P_IP => outer_v4(ctx, l2)?,
        ETH_P_IPV6 => outer_v6(ctx, l2)?,
        _ => return Err(DecapReason::PassNotEncapsulated),
    };
    let vip = match inner.family {
        FAMILY_V4 => inner_v4(ctx, &inner)?,
        _ => inner_v6(ctx, &inner)?,
    };
    // SAFETY: a read of a hash map value the program does not keep.
    if unsafe { DECAP_VIPS.get(&vip) }.is_none() {
        return Err(DecapReason::PassNotVip);
    }
    strip(ctx, &inner, l2)?;
    Ok(inner.kind)
}

#[inline(always)]
fn outer_v4(ctx: &XdpContext, l2: usize) -> Result<Inner, DecapReason> {
    let ip: *const [u8; IPV4_LEN] = header(ctx, l2).ok_or(DecapReason::PassNotEncapsulated)?;
    let at = ip as usize;
    // SAFETY (every `load` below): the fixed 20-byte header is inside the frame.
    let (vihl, proto): (u8, u8) = unsafe { (load(at), load(at + 9)) };
    if vihl >> 4 != 4 || (proto != PROTO_IPIP && proto != PROTO_UDP) {
        // 6in4 (protocol 41 over IPv4) is not a form the balancer sends.
        return Err(DecapReason::PassNotEncapsulated);
    }
    let header_len = usize::from(vihl & 0x0f) * 4;
    let total_len = usize::from(u16::from_be(unsafe { load::<u16>(at + 2) }));
    let frags = u16::from_be(unsafe { load::<u16>(at + 6) });
    if header_len < IPV4_LEN || total_len < header_len {
        return Err(DecapReason::PassMalformed);
    }
    if frags & IPV4_OFFSET_MASK != 0 {
        // A later fragment: no UDP header to tell a GUE packet from another.
        return Err(if proto == PROTO_UDP {
            DecapReason::PassNotEncapsulated
        } else {
            DecapReason::PassMalformed
        });
    }
    let fragment = frags & IPV4_MF != 0;
    if l2 + total_len > frame_len(ctx) as usize {
        return Err(DecapReason::PassMalformed);
    }
    let offset = l2 + header_len;
    let len = total_len - header_len;
    if proto == PROTO_UDP {
        return gue(ctx, offset, len, fragment);
    }
    if fragment {
        return Err(DecapReason::PassMalformed);
    }
    Ok(Inner {
        offset,
        len,
        family: FAMILY_V4,
        kind: DecapReason::DecapIpip,
    })
}

#[inline(always)]
fn outer_v6(ctx: &XdpContext, l2: usize) -> Result<Inner, DecapReason> {
    let ip: *const [u8; IPV6_LEN] = header(ctx, l2).ok_or(DecapReason::PassNotEncapsulated)?;
    let at = ip as usize;
    // SAFETY (every `load` below): the fixed 40-byte header is inside the frame.
    let (version, next_header): (u8, u8) = unsafe { (load(at), load(at + 6)) };
    if version >> 4 != 6 {
        return Err(DecapReason::PassNotEncapsulated);
    }
    let family = match next_header {
        PROTO_IPV6 => FAMILY_V6,
        PROTO_IPIP => FAMILY_V4,
        PROTO_UDP => 0,
        // Anything else, extension headers (fragments among them) included: not ours.
        _ => return Err(DecapReason::PassNotEncapsulated),
    };
    let len = usize::from(u16::from_be(unsafe { load::<u16>(at + 4) }));
    if l2 + IPV6_LEN + len > frame_len(ctx) as usize {
        return Err(DecapReason::PassMalformed);
    }
    let offset = l2 + IPV6_LEN;
    if family == 0 {
        return gue(ctx, offset, len, false);
    }
    Ok(Inner {
        offset,
        len,
        family,
        kind: DecapReason::DecapIpip,
    })
}

/// A UDP datagram at `offset` of `len` bytes (all inside the frame): GUE if it is for our port.
#[inline(always)]
fn gue(ctx: &XdpContext, offset: usize, len: usize, fragment: bool) -> Result<Inner, DecapReason> {
    if len < UDP_LEN {
        return Err(DecapReason::PassNotEncapsulated);
    }
    let udp: *const [u8; UDP_LEN] = header(ctx, offset).ok_or(DecapReason::PassMalformed)?;
    let at = udp as usize;
    // SAFETY: the 8-byte UDP header is inside the frame; the destination port is bytes 2..4.
    let port_be: u16 = unsafe { load(at + 2) };
    let config = DECAP_CONFIG
        .get(0)
        .ok_or(DecapReason::PassNotEncapsulated)?;
    if port_be != config.gue_port_be {
        return Err(DecapReason::PassNotEncapsulated);
    }
    // SAFETY: as above; the length is bytes 4..6.
    let udp_len = usize::from(u16::from_be(unsafe { load::<u16>(at + 4) }));
    if fragment || udp_len != len {
        return Err(DecapReason::PassMalformed);
    }
    let offset = offset + UDP_LEN;
    let len = len - UDP_LEN;
    // Four bytes: a GUE version-0 header, or the start of an inner IP header (20 bytes or more).
    // (A one-byte check compiles to a `>=` the verifier draws no packet range from.)
    let gue: *const [u8; GUE_V0_LEN] = header(ctx, offset).ok_or(DecapReason::PassMalformed)?;
    // SAFETY: the 4 bytes are inside the frame (`header`).
    let first: u8 = unsafe { load(gue as usize) };
    let (offset, len, family) = match first >> 4 {
        // Direct IP (variant 1): the first nibble is the inner IP version.
        4 => (offset, len, FAMILY_V4),
        6 => (offset, len, FAMILY_V6),
        // Version 0, no flags, no options (hlen 0): 4 bytes, byte 1 the inner protocol.
        0 if first == 0 => {
            // SAFETY: as above.
            let (proto, flags): (u8, u16) =
                unsafe { (load(gue as usize + 1), load(gue as usize + 2)) };
            let family = match proto {
                PROTO_IPIP => FAMILY_V4,
                PROTO_IPV6 => FAMILY_V6,
                _ => return Err(DecapReason::PassMalformed),
            };
            if flags != 0 || len < GUE_V0_LEN {
                return Err(DecapReason::PassMalformed);
            }
            (offset + GUE_V0_LEN, len - GUE_V0_LEN, family)
        }
        _ => return Err(DecapReason::PassMalformed),
    };
    Ok(Inner {
        offset,
        len,
        family,
        kind: DecapReason::DecapGue,
    })
}

/// The inner IPv4 header's destination, once the header is whole and its length is exactly
/// what the outer carries.
#[inline(always)]
fn inner_v4(ctx: &XdpContext, inner: &Inner) -> Result<DecapVip, DecapReason> {
    let ip: *const [u8; IPV4_LEN] = header(ctx, inner.offset).ok_or(DecapReason::PassMalformed)?;
    let at = ip as usize;
    // SAFETY (every `load`): the fixed 20-byte header is inside the frame.
    let vihl: u8 = unsafe { load(at) };
    let total_len = usize::from(u16::from_be(unsafe { load::<u16>(at + 2) }));
    if vihl >> 4 != 4 || usize::from(vihl & 0x0f) * 4 < IPV4_LEN || total_len != inner.len {
        return Err(DecapReason::PassMalformed);
    }
    let mut vip = DecapVip::v4([0; 4]);
    // SAFETY: the destination is bytes 16..20 of the header; `addr` is 4-aligned (offset 4).
    unsafe { *(vip.addr.as_mut_ptr() as *mut u32) = load::<u32>(at + 16) };
    Ok(vip)
}

#[inline(always)]
fn inner_v6(ctx: &XdpContext, inner: &Inner) -> Result<DecapVip, DecapReason> {
    let ip: *const [u8; IPV6_LEN] = header(ctx, inner.offset).ok_or(DecapReason::PassMalformed)?;
    let at = ip as usize;
    // SAFETY (every `load`): the fixed 40-byte header is inside the frame.
    let version: u8 = unsafe { load(at) };
    let payload_len = usize::from(u16::from_be(unsafe { load::<u16>(at + 4) }));
    if version >> 4 != 6 || IPV6_LEN + payload_len != inner.len {
        return Err(DecapReason::PassMalformed);
    }
    let mut vip = DecapVip::v6([0; 16]);
    let words = vip.addr.as_mut_ptr() as *mut u32;
    // SAFETY: the destination is bytes 24..40 of the header; `addr` is 4-aligned (offset 4)
    // and 16 bytes long.
    unsafe {
        for i in 0..4 {
            *words.add(i) = load::<u32>(at + 24 + 4 * i);
        }
    }
    Ok(vip)
}

/// Moves the frame's start to `inner.offset - l2` and writes the L2 header (MACs, and the
/// 802.1Q tag when `l2` is 18) there again, with the inner family's ethertype.
#[inline(always)]
fn strip(ctx: &XdpContext, inner: &Inner, l2: usize) -> Result<(), DecapReason> {
    let eth: *const [u8; VLAN_ETH_LEN] = header(ctx, 0).ok_or(DecapReason::PassMalformed)?;
    // SAFETY: 18 bytes are inside the frame (an outer IP header follows any L2 header); the two
    // MACs are bytes 0..12, a tag bytes 12..16.
    let words: [u32; 4] = unsafe {
        [
            load(eth as usize),
            load(eth as usize + 4),
            load(eth as usize + 8),
            load(eth as usize + 12),
        ]
    };
    let delta = (inner.offset - l2) as i32;
    // SAFETY: `ctx.ctx` is the kernel's `xdp_md`; the helper checks `delta` against the frame
    // itself and fails without changing anything.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        return Err(DecapReason::PassMalformed);
    }
    // Every packet pointer is invalid after the helper: bounds are read and checked anew.
    let (start, end) = bounds(ctx);
    if start + VLAN_ETH_LEN > end {
        // Cannot happen (an inner IP header of 20 bytes or more follows), but the verifier
        // wants to see it.
        return Ok(());
    }
    let ether_type: u16 = if inner.family == FAMILY_V4 {
        ETH_P_IP.to_be()
    } else {
        ETH_P_IPV6.to_be()
    };
    // SAFETY: the 18 bytes at `start` are inside the frame (checked just above).
    unsafe {
        core::ptr::write_volatile(start as *mut u32, words[0]);
        core::ptr::write_volatile((start + 4) as *mut u32, words[1]);
        core::ptr::write_volatile((start + 8) as *mut u32, words[2]);
        if l2 == VLAN_ETH_LEN {
            core::ptr::write_volatile((start + 12) as *mut u32, words[3]);
            core::ptr::write_volatile((start + 16) as *mut u16, ether_type);
        } else {
            core::ptr::write_volatile((start + 12) as *mut u16, ether_type);
        }
    }
    Ok(())
}
