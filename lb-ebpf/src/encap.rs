//! Encapsulation for VIPs whose backends sit behind routers (`forward = "ipip"` / `"gue"`).
//!
//! The client's IP packet is kept whole and an outer IP header (and, for GUE, a UDP header) is
//! put in front of it, from this node's address (`Backend::encap_src`) to the backend's; the
//! Ethernet header, moved to the new front, gets the next hop's MACs like the L2 path. The
//! backend strips the outer headers (`lb decap`, or the kernel's ipip/ip6tnl/fou devices) and
//! answers the client directly.
//!
//! - Outer IPv4: DF set, id 0, TOS and TTL copied from the inner packet (RFC 6040's normal mode),
//!   header checksum computed. Outer IPv6: traffic class and hop limit from the inner packet,
//!   flow label from the flow hash.
//! - GUE: UDP to `VipInfo::gue_port_be` from `gue_source_port(flow hash)`, checksum 0 (RFC 6935
//!   zero checksums for tunnels; the inner TCP/UDP checksum still covers the payload), the inner
//!   packet right after it (GUE variant 1, "direct IP").
//! - Ethernet padding after the inner datagram is not carried: the outer lengths are the
//!   datagram's own.
//! - A packet that would exceed the egress MTU once encapsulated is answered like a router
//!   would: ICMP "fragmentation needed" (IPv4 with DF) or ICMPv6 "packet too big", from the VIP to
//!   the client, quoting [`TOO_BIG_QUOTE`] bytes, at most [`TOO_BIG_PER_CPU_PER_SEC`] per CPU per
//!   second. IPv4 without DF, which a router would fragment, is dropped.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_csum_diff, bpf_ktime_get_coarse_ns, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    BACKEND_F_ADDR_V6, Backend, FlowKey, Reason, TOO_BIG_PER_CPU_PER_SEC, TOO_BIG_QUOTE,
    TOO_BIG_TOS, TOO_BIG_TTL, VIP_F_ENCAP_GUE, VipInfo, encap_flow_label, flow_hash,
    gue_source_port,
};

use crate::wire::{
    ETH_LEN, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_UDP, IPV4_DF,
    IPV4_LEN, IPV6_LEN, UDP_LEN, VLAN_LEN,
};
use crate::{
    maps::TOO_BIG_BUDGET,
    parse::{bounds, load},
};

const ICMP_LEN: usize = 8;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const NS_PER_SEC: u64 = 1_000_000_000;

/// What the parser already proved about the inner packet, read again here (only encapsulating
/// VIPs pay for it).
struct Inner {
    /// Bytes of L2 header: 14, or 18 with an 802.1Q tag.
    l2_len: usize,
    v6: bool,
    /// The IP datagram's own length (Ethernet padding excluded).
    len: usize,
    /// IPv4 TOS / IPv6 traffic class.
    tos: u8,
    ttl: u8,
    /// IPv4 "don't fragment" (always true for IPv6: routers never fragment it).
    df: bool,
}

/// Puts the outer headers in front of the packet and the next hop's MACs on it; on success the
/// frame is ready for `XDP_TX` or redirect. `Err` is the verdict and reason to return instead
/// (an ICMP answer to send back, or a drop).
#[inline(always)]
pub fn encapsulate(
    ctx: &XdpContext,
    flow: &FlowKey,
    vip: &VipInfo,
    backend: &Backend,
) -> Result<(), (u32, Reason)> {
    let inner = inner(ctx).ok_or((xdp_action::XDP_PASS, Reason::PassMalformed))?;
    let outer_v6 = backend.flags & BACKEND_F_ADDR_V6 != 0;
    let gue = vip.flags & VIP_F_ENCAP_GUE != 0;
    let overhead = match (outer_v6, gue) {
        (false, false) => IPV4_LEN,
        (false, true) => IPV4_LEN + UDP_LEN,
        (true, false) => IPV6_LEN,
        (true, true) => IPV6_LEN + UDP_LEN,
    };
    if inner.len + overhead > usize::from(backend.mtu) {
        return Err(too_big(ctx, flow, &inner, backend.mtu as usize - overhead));
    }
    let hash = flow_hash(flow);
    // SAFETY: `ctx.ctx` is the program's `xdp_md`; growing the head is what the helper is for.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(overhead as i32)) } != 0 {
        return Err((xdp_action::XDP_DROP, Reason::DropEncapFailed));
    }
    let l2 = match write_l2(ctx, &inner, overhead, outer_v6, backend) {
        Some(l2) => l2,
        None => return Err((xdp_action::XDP_DROP, Reason::DropEncapFailed)),
    };
    let outer_len = inner.len + overhead;
    let written = match (outer_v6, gue) {
        (false, false) => write_ipv4::<false>(ctx, l2, &inner, outer_len, backend, hash, vip),
        (false, true) => write_ipv4::<true>(ctx, l2, &inner, outer_len, backend, hash, vip),
        (true, false) => write_ipv6::<false>(ctx, l2, &inner, outer_len, backend, hash, vip),
        (true, true) => write_ipv6::<true>(ctx, l2, &inner, outer_len, backend, hash, vip),
    };
    if written {
        Ok(())
    } else {
        Err((xdp_action::XDP_DROP, Reason::DropEncapFailed))
    }
}

#[inline(always)]
fn inner(ctx: &XdpContext) -> Option<Inner> {
    let (start, end) = bounds(ctx);
    if start + ETH_LEN > end {
        return None;
    }
    // SAFETY: the Ethernet header is inside the frame (checked above).
    let ether_type = u16::from_be(unsafe { load::<u16>(start + 12) });
    let l2_len = if ether_type == ETH_P_8021Q {
        ETH_LEN + VLAN_LEN
    } else {
        ETH_LEN
    };
    let at = start + l2_len;
    if at + IPV4_LEN > end {
        return None;
    }
    // SAFETY (every `load` below): the first 20 bytes of the IP header are inside the frame;
    // the IPv6 ones are checked before they are read.
    let first: u8 = unsafe { load(at) };
    if first >> 4 == 4 {
        let frags = u16::from_be(unsafe { load::<u16>(at + 6) });
        return Some(Inner {
            l2_len,
            v6: false,
            len: usize::from(u16::from_be(unsafe { load::<u16>(at + 2) })),
            tos: unsafe { load(at + 1) },
            ttl: unsafe { load(at + 8) },
            df: frags & IPV4_DF != 0,
        });
    }
    let second: u8 = unsafe { load(at + 1) };
    Some(Inner {
        l2_len,
        v6: true,
        len: IPV6_LEN + usize::from(u16::from_be(unsafe { load::<u16>(at + 4) })),
        tos: (first << 4) | (second >> 4),
        ttl: unsafe { load(at + 7) },
        df: true,
    })
}

/// After the head grew by `overhead`: the L2 header at the new front (the backend's next-hop
/// MACs, the VLAN tag kept, the outer family's ethertype). Returns the L2 length.
#[inline(always)]
fn write_l2(
    ctx: &XdpContext,
    inner: &Inner,
    overhead: usize,
    outer_v6: bool,
    backend: &Backend,
) -> Option<usize> {
    let (start, end) = bounds(ctx);
    // The old L2 header now starts at `start + overhead`; the VLAN tag (if any) moves.
    if start + overhead + ETH_LEN + VLAN_LEN > end {
        return None;
    }
    let ether_type = if outer_v6 { ETH_P_IPV6 } else { ETH_P_IP };
    // SAFETY: every access is inside `start..start + overhead + 18`, checked above.
    unsafe {
        if inner.l2_len == ETH_LEN + VLAN_LEN {
            store::<u16>(start + 12, ETH_P_8021Q.to_be());
            store::<u16>(start + 14, load::<u16>(start + overhead + 14));
            store::<u16>(start + 16, ether_type.to_be());
        } else {
            store::<u16>(start + 12, ether_type.to_be());
        }
    }
    if !crate::rewrite::set_macs(ctx, backend) {
        return None;
    }
    Some(inner.l2_len)
}

#[inline(always)]
fn write_ipv4<const GUE: bool>(
    ctx: &XdpContext,
    l2: usize,
    inner: &Inner,
    outer_len: usize,
    backend: &Backend,
    hash: u32,
    vip: &VipInfo,
) -> bool {
    let (start, end) = bounds(ctx);
    let at = start + l2;
    if at + IPV4_LEN + UDP_LEN > end {
        return false;
    }
    let proto = outer_protocol::<GUE>(inner);
    let word0 = 0x4500u16 | u16::from(inner.tos);
    let ttl_proto = (u16::from(inner.ttl) << 8) | u16::from(proto);
    let src = read_be_u32(&backend.encap_src, 0);
    let dst = read_be_u32(&backend.addr, 0);
    let mut sum = u32::from(word0) + outer_len as u32 + u32::from(IPV4_DF) + u32::from(ttl_proto);
    sum += (src >> 16) + (src & 0xffff) + (dst >> 16) + (dst & 0xffff);
    let checksum = !fold(sum);
    // SAFETY: `at..at + 28` is inside the frame (checked above).
    unsafe {
        store::<u16>(at, word0.to_be());
        store::<u16>(at + 2, (outer_len as u16).to_be());
        store::<u16>(at + 4, 0);
        store::<u16>(at + 6, IPV4_DF.to_be());
        store::<u16>(at + 8, ttl_proto.to_be());
        store::<u16>(at + 10, checksum.to_be());
        store::<u32>(at + 12, src.to_be());
        store::<u32>(at + 16, dst.to_be());
        if GUE {
            write_udp(at + IPV4_LEN, outer_len - IPV4_LEN, hash, vip);
        }
    }
    true
}

#[inline(always)]
fn write_ipv6<const GUE: bool>(
    ctx: &XdpContext,
    l2: usize,
    inner: &Inner,
    outer_len: usize,
    backend: &Backend,
    hash: u32,
    vip: &VipInfo,
) -> bool {
    let (start, end) = bounds(ctx);
    let at = start + l2;
    if at + IPV6_LEN + UDP_LEN > end {
        return false;
    }
    let next_header = outer_protocol::<GUE>(inner);
    let word0 = (6u32 << 28) | (u32::from(inner.tos) << 20) | encap_flow_label(hash);
    let len_next_hop = (((outer_len - IPV6_LEN) as u32) << 16)
        | (u32::from(next_header) << 8)
        | u32::from(inner.ttl);
    // SAFETY: `at..at + 48` is inside the frame (checked above); the addresses are copied as
    // four words each from the 4-aligned record.
    unsafe {
        store::<u32>(at, word0.to_be());
        store::<u32>(at + 4, len_next_hop.to_be());
        let src = backend.encap_src.as_ptr() as *const u32;
        let dst = backend.addr.as_ptr() as *const u32;
        for i in 0..4 {
            store::<u32>(at + 8 + 4 * i, core::ptr::read_volatile(src.add(i)));
            store::<u32>(at + 24 + 4 * i, core::ptr::read_volatile(dst.add(i)));
        }
        if GUE {
            write_udp(at + IPV6_LEN, outer_len - IPV6_LEN, hash, vip);
        }
    }
    true
}

/// What the outer header says it carries: UDP (GUE), or the inner packet's IP version.
#[inline(always)]
fn outer_protocol<const GUE: bool>(inner: &Inner) -> u8 {
    if GUE {
        IPPROTO_UDP
    } else if inner.v6 {
        IPPROTO_IPV6
    } else {
        IPPROTO_IPIP
    }
}

/// The GUE UDP header at `at` (`udp_len` = 8 + the inner datagram).
///
/// # Safety
///
/// `at..at + 8` must lie inside the frame.
#[inline(always)]
unsafe fn write_udp(at: usize, udp_len: usize, hash: u32, vip: &VipInfo) {
    // SAFETY: per the caller.
    unsafe {
        store::<u16>(at, gue_source_port(hash).to_be());
        store::<u16>(at + 2, vip.gue_port_be);
        store::<u16>(at + 4, (udp_len as u16).to_be());
        store::<u16>(at + 6, 0);
    }
}

/// Answers a packet that would not fit the egress MTU once encapsulated (`room` bytes of inner
/// packet fit): rewrites the frame into the ICMP answer and sends it back out.
#[inline(always)]
fn too_big(ctx: &XdpContext, flow: &FlowKey, inner: &Inner, room: usize) -> (u32, Reason) {
    if !inner.df || !take_budget() {
        return (xdp_action::XDP_DROP, Reason::DropTooBig);
    }
    let built = if inner.v6 {
        icmp6_too_big(ctx, flow, inner.l2_len, room as u32)
    } else {
        icmp4_too_big(ctx, flow, inner.l2_len, room as u16)
    };
    if built {
        (xdp_action::XDP_TX, Reason::IcmpTooBig)
    } else {
        (xdp_action::XDP_DROP, Reason::DropEncapFailed)
    }
}

/// One answer from this CPU's budget for the current second.
#[inline(always)]
fn take_budget() -> bool {
    let Some(budget) = TOO_BIG_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a per-CPU entry, only this CPU's program runs touch it (and not concurrently:
    // XDP runs with preemption off); the helper has no preconditions.
    unsafe {
        let now = bpf_ktime_get_coarse_ns();
        if now.wrapping_sub((*budget).window_start_ns) >= NS_PER_SEC {
            (*budget).window_start_ns = now;
            (*budget).sent = 0;
        }
        if (*budget).sent >= TOO_BIG_PER_CPU_PER_SEC {
            return false;
        }
        (*budget).sent += 1;
    }
    true
}

/// Grows the head by `grow` and cuts the tail so the frame is `l2 + grow + TOO_BIG_QUOTE` long;
/// moves the L2 header to the front with the MACs swapped (back to whoever sent the packet).
#[inline(always)]
fn reshape_for_answer(ctx: &XdpContext, l2: usize, grow: usize, ether_type: u16) -> bool {
    // SAFETY: `ctx.ctx` is the program's `xdp_md`.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(grow as i32)) } != 0 {
        return false;
    }
    let (start, end) = bounds(ctx);
    let want = l2 + grow + TOO_BIG_QUOTE;
    if start + grow + ETH_LEN + VLAN_LEN > end {
        return false;
    }
    // SAFETY: every access is inside `start..start + grow + 18`, checked above; the old L2
    // header starts at `start + grow`. Loads come before stores (the regions overlap when
    // `grow` < 12).
    unsafe {
        let old = start + grow;
        let (d0, d1, d2) = (load::<u16>(old), load::<u16>(old + 2), load::<u16>(old + 4));
        let (s0, s1, s2) = (
            load::<u16>(old + 6),
            load::<u16>(old + 8),
            load::<u16>(old + 10),
        );
        let tag = load::<u16>(old + 14);
        store::<u16>(start, s0);
        store::<u16>(start + 2, s1);
        store::<u16>(start + 4, s2);
        store::<u16>(start + 6, d0);
        store::<u16>(start + 8, d1);
        store::<u16>(start + 10, d2);
        if l2 == ETH_LEN + VLAN_LEN {
            store::<u16>(start + 12, ETH_P_8021Q.to_be());
            store::<u16>(start + 14, tag);
            store::<u16>(start + 16, ether_type.to_be());
        } else {
            store::<u16>(start + 12, ether_type.to_be());
        }
    }
    // `black_box`: LLVM would otherwise fold `want` into the pointer subtraction (scalar minus
    // packet pointer, which the verifier refuses).
    let cut = core::hint::black_box(end - start) as i32 - want as i32;
    // SAFETY: as above; `cut` > 0 because the packet was longer than the quote (it did not fit
    // an MTU of at least `TOO_BIG_QUOTE` + headers), and a negative delta only shrinks.
    cut > 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, -cut) } == 0
}

#[inline(always)]
fn icmp4_too_big(ctx: &XdpContext, flow: &FlowKey, l2: usize, room: u16) -> bool {
    if !reshape_for_answer(ctx, l2, IPV4_LEN + ICMP_LEN, ETH_P_IP) {
        return false;
    }
    let (start, end) = bounds(ctx);
    let at = start + l2;
    if at + IPV4_LEN + ICMP_LEN + TOO_BIG_QUOTE > end {
        return false;
    }
    let total = (IPV4_LEN + ICMP_LEN + TOO_BIG_QUOTE) as u16;
    let word0 = 0x4500u16 | u16::from(TOO_BIG_TOS);
    let ttl_proto = (u16::from(TOO_BIG_TTL) << 8) | u16::from(IPPROTO_ICMP);
    // From the VIP (the address the client sent to) back to the client.
    let src = read_be_u32(&flow.dst, 0);
    let dst = read_be_u32(&flow.src, 0);
    let sum = u32::from(word0)
        + u32::from(total)
        + u32::from(ttl_proto)
        + (src >> 16)
        + (src & 0xffff)
        + (dst >> 16)
        + (dst & 0xffff);
    let icmp = at + IPV4_LEN;
    // SAFETY: `at..at + 156` is inside the frame (checked above).
    unsafe {
        store::<u16>(at, word0.to_be());
        store::<u16>(at + 2, total.to_be());
        store::<u32>(at + 4, 0);
        store::<u16>(at + 8, ttl_proto.to_be());
        store::<u16>(at + 10, (!fold(sum)).to_be());
        store::<u32>(at + 12, src.to_be());
        store::<u32>(at + 16, dst.to_be());
        store::<u8>(icmp, ICMP_DEST_UNREACH);
        store::<u8>(icmp + 1, ICMP_FRAG_NEEDED);
        store::<u16>(icmp + 2, 0);
        store::<u16>(icmp + 4, 0);
        store::<u16>(icmp + 6, room.to_be());
    }
    let Some(body) = checksum_of(icmp, ICMP_LEN + TOO_BIG_QUOTE) else {
        return false;
    };
    // SAFETY: as above.
    unsafe { store::<u16>(icmp + 2, (!fold(body)).to_be()) };
    true
}

#[inline(always)]
fn icmp6_too_big(ctx: &XdpContext, flow: &FlowKey, l2: usize, room: u32) -> bool {
    if !reshape_for_answer(ctx, l2, IPV6_LEN + ICMP_LEN, ETH_P_IPV6) {
        return false;
    }
    let (start, end) = bounds(ctx);
    let at = start + l2;
    if at + IPV6_LEN + ICMP_LEN + TOO_BIG_QUOTE > end {
        return false;
    }
    let payload = (ICMP_LEN + TOO_BIG_QUOTE) as u32;
    let icmp = at + IPV6_LEN;
    // SAFETY: `at..at + 176` is inside the frame (checked above); the addresses are copied as
    // four words each from the 8-aligned key.
    unsafe {
        store::<u32>(at, (6u32 << 28).to_be());
        store::<u32>(
            at + 4,
            ((payload << 16) | (u32::from(IPPROTO_ICMPV6) << 8) | u32::from(TOO_BIG_TTL)).to_be(),
        );
        let src = flow.dst.as_ptr() as *const u32;
        let dst = flow.src.as_ptr() as *const u32;
        for i in 0..4 {
            store::<u32>(at + 8 + 4 * i, core::ptr::read_volatile(src.add(i)));
            store::<u32>(at + 24 + 4 * i, core::ptr::read_volatile(dst.add(i)));
        }
        store::<u8>(icmp, ICMPV6_PACKET_TOO_BIG);
        store::<u8>(icmp + 1, 0);
        store::<u16>(icmp + 2, 0);
        store::<u32>(icmp + 4, room.to_be());
    }
    // The pseudo-header: both addresses (in the packet already), the upper-layer length and the
    // next header, the last two as 32-bit big-endian words (folded sums are order-free).
    let Some(addresses) = checksum_of(at + 8, 32) else {
        return false;
    };
    let Some(body) = checksum_of(icmp, ICMP_LEN + TOO_BIG_QUOTE) else {
        return false;
    };
    let sum = addresses + payload + u32::from(IPPROTO_ICMPV6) + body;
    // SAFETY: as above.
    unsafe { store::<u16>(icmp + 2, (!fold(sum)).to_be()) };
    true
}

/// The ones' complement sum of the `len` bytes at packet address `at` (bounds-checked by the
/// caller; `len` a multiple of 4), as a number in network byte order, folded to 16 bits.
#[inline(always)]
fn checksum_of(at: usize, len: usize) -> Option<u32> {
    // SAFETY: the helper only reads `len` bytes at `at`, which the caller proved are inside the
    // frame; `from` is empty.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, at as *mut u32, len as u32, 0) };
    // The helper adds the 16-bit words as they load on this little-endian machine; a ones'
    // complement sum of byte-swapped words is the byte-swapped sum.
    (sum >= 0).then(|| u32::from(fold(sum as u32).swap_bytes()))
}

/// Folds a 32-bit ones' complement sum to 16 bits.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Bytes `at..at + 4` of an address as a big-endian number.
#[inline(always)]
fn read_be_u32(bytes: &[u8; 16], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Stores a `T` at packet address `at`.
///
/// # Safety
///
/// `at..at + size_of::<T>()` must lie inside the frame (see `parse::load` on alignment).
#[inline(always)]
unsafe fn store<T: Copy>(at: usize, value: T) {
    // SAFETY: in bounds per the caller.
    unsafe { core::ptr::write_volatile(at as *mut T, value) }
}
