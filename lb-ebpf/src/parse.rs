//! Header parsing: Ethernet (one optional 802.1Q tag), IPv4 (options allowed), IPv6 (fixed header
//! only), TCP/UDP ports. Every access is bounds-checked against `data_end` right before it; any
//! frame that is short, inconsistent or not understood is reported as a pass reason.

use core::mem::size_of;

use crate::wire::{ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPV4_MF, IPV4_OFFSET_MASK};
use aya_ebpf::programs::XdpContext;
use lb_common::{FAMILY_V4, FAMILY_V6, FlowKey, PROTO_TCP, PROTO_UDP, Reason};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

/// TCP flag bits, in byte 13 of the header.
const TCP_FLAGS_OFFSET: usize = 13;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// A TCP or UDP packet whose headers are all present and consistent.
pub struct Packet {
    pub key: FlowKey,
    /// A TCP SYN without ACK: the first packet of a connection (the flow table is told so in
    /// changed ring slots).
    pub opens: bool,
}

pub enum Parsed {
    Flow(Packet),
    /// Hand the frame to the host untouched, for this reason.
    Pass(Reason),
}

/// The frame's start and end pointers, read afresh. Volatile reads keep the compiler from
/// reusing a length computed elsewhere: the verifier only accepts a packet access whose bound was
/// checked on the packet pointer itself, not on an equivalent scalar.
#[inline(always)]
pub(crate) fn bounds(ctx: &XdpContext) -> (usize, usize) {
    // SAFETY: `ctx.ctx` is the `xdp_md` the kernel passed to the program; reading its fields is
    // always allowed.
    unsafe {
        (
            core::ptr::read_volatile(&(*ctx.ctx).data) as usize,
            core::ptr::read_volatile(&(*ctx.ctx).data_end) as usize,
        )
    }
}

/// The frame's length in bytes, for the byte counters.
#[inline(always)]
pub fn frame_len(ctx: &XdpContext) -> u64 {
    let (start, end) = bounds(ctx);
    (end - start) as u64
}

/// A pointer to a `T` at `offset` bytes into the frame, if the whole `T` is inside it.
#[inline(always)]
pub(crate) fn header<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let (start, end) = bounds(ctx);
    let at = start + offset;
    if at + size_of::<T>() > end {
        return None;
    }
    Some(at as *const T)
}

/// Loads a `T` (an integer) at `at`, a packet address the caller bounds-checked.
///
/// Header fields are byte arrays (alignment 1) in `network-types`, and BPF has no unaligned
/// loads, so reading them as fields makes LLVM load every byte on its own and rebuild words with
/// shifts: most of the program's instructions. A word load is what the x86-64 and arm64 JITs and
/// the verifier accept at any packet offset (the kernel enforces alignment only for
/// architectures without efficient unaligned access); volatile keeps LLVM from splitting it.
///
/// # Safety
///
/// `at..at + size_of::<T>()` must lie inside the frame.
#[inline(always)]
pub(crate) unsafe fn load<T: Copy>(at: usize) -> T {
    // SAFETY: in bounds per the caller; see above for alignment.
    unsafe { core::ptr::read_volatile(at as *const T) }
}

/// The key's 32-bit words, for word-sized stores (`FlowKey` is 8-byte aligned, 40 bytes).
#[inline(always)]
fn key_words(key: &mut FlowKey) -> *mut u32 {
    key as *mut FlowKey as *mut u32
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Parsed {
    match parse_l2(ctx) {
        Ok(flow) => Parsed::Flow(flow),
        Err(reason) => Parsed::Pass(reason),
    }
}

#[inline(always)]
fn parse_l2(ctx: &XdpContext) -> Result<Packet, Reason> {
    let eth: *const EthHdr = header(ctx, 0).ok_or(Reason::PassMalformed)?;
    // SAFETY: `header` checked that the Ethernet header lies inside the frame.
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut l3_offset = EthHdr::LEN;
    if ether_type == ETH_P_8021Q {
        let vlan: *const VlanHdr = header(ctx, l3_offset).ok_or(Reason::PassMalformed)?;
        // SAFETY: bounds-checked just above.
        ether_type = u16::from_be(unsafe { (*vlan).ether_type });
        l3_offset += VlanHdr::LEN;
    }
    match ether_type {
        ETH_P_IP => parse_ipv4(ctx, l3_offset),
        ETH_P_IPV6 => parse_ipv6(ctx, l3_offset),
        _ => Err(Reason::PassNotIp),
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, offset: usize) -> Result<Packet, Reason> {
    let ip: *const Ipv4Hdr = header(ctx, offset).ok_or(Reason::PassMalformed)?;
    let at = ip as usize;
    // SAFETY (every `load` below): the fixed 20-byte header is inside the frame (`header`).
    let vihl: u8 = unsafe { load(at) };
    if vihl >> 4 != 4 {
        return Err(Reason::PassMalformed);
    }
    let header_len = usize::from(vihl & 0x0f) * 4;
    let total_len = usize::from(u16::from_be(unsafe { load::<u16>(at + 2) }));
    if header_len < Ipv4Hdr::LEN || total_len < header_len {
        return Err(Reason::PassMalformed);
    }
    // The datagram must be all there; Ethernet padding after it is fine.
    if offset + total_len > frame_len(ctx) as usize {
        return Err(Reason::PassMalformed);
    }
    let frags = u16::from_be(unsafe { load::<u16>(at + 6) });
    if frags & (IPV4_MF | IPV4_OFFSET_MASK) != 0 {
        return Err(Reason::PassFragment);
    }
    let mut key = FlowKey {
        src: [0; 16],
        dst: [0; 16],
        sport_be: 0,
        dport_be: 0,
        proto: unsafe { load(at + 9) },
        family: FAMILY_V4,
        _pad: [0; 2],
    };
    let words = key_words(&mut key);
    // SAFETY: words 0 and 4 are the first four bytes of `src` and `dst` (offsets 0 and 16).
    unsafe {
        *words = load::<u32>(at + 12);
        *words.add(4) = load::<u32>(at + 16);
    }
    let opens = parse_ports(ctx, offset + header_len, offset + total_len, &mut key)?;
    Ok(Packet { key, opens })
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, offset: usize) -> Result<Packet, Reason> {
    let ip: *const Ipv6Hdr = header(ctx, offset).ok_or(Reason::PassMalformed)?;
    let at = ip as usize;
    // SAFETY (every `load` below): the fixed 40-byte header is inside the frame (`header`).
    let version: u8 = unsafe { load(at) };
    if version >> 4 != 6 {
        return Err(Reason::PassMalformed);
    }
    let payload_len = usize::from(u16::from_be(unsafe { load::<u16>(at + 4) }));
    let end = offset + Ipv6Hdr::LEN + payload_len;
    if end > frame_len(ctx) as usize {
        return Err(Reason::PassMalformed);
    }
    let proto: u8 = unsafe { load(at + 6) };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(if is_ipv6_extension(proto) {
            Reason::PassFragment
        } else {
            Reason::PassNotTcpUdp
        });
    }
    let mut key = FlowKey {
        src: [0; 16],
        dst: [0; 16],
        sport_be: 0,
        dport_be: 0,
        proto,
        family: FAMILY_V6,
        _pad: [0; 2],
    };
    let words = key_words(&mut key);
    // SAFETY: words 0..8 are `src` and `dst` (bytes 0..32); the addresses are bytes 8..40 of
    // the header.
    unsafe {
        for i in 0..8 {
            *words.add(i) = load::<u32>(at + 8 + 4 * i);
        }
    }
    let opens = parse_ports(ctx, offset + Ipv6Hdr::LEN, end, &mut key)?;
    Ok(Packet { key, opens })
}

/// Fills in the ports; returns whether the packet is a TCP SYN without ACK. The whole TCP or UDP
/// header must lie inside the IP datagram (`l3_end`), whose own end was already checked against
/// the frame.
#[inline(always)]
fn parse_ports(
    ctx: &XdpContext,
    offset: usize,
    l3_end: usize,
    key: &mut FlowKey,
) -> Result<bool, Reason> {
    let (opens, ports) = match key.proto {
        PROTO_TCP => {
            if offset + TcpHdr::LEN > l3_end {
                return Err(Reason::PassMalformed);
            }
            let tcp: *const TcpHdr = header(ctx, offset).ok_or(Reason::PassMalformed)?;
            let at = tcp as usize;
            // SAFETY: the 20-byte header is inside the frame (`header`).
            let (data_offset, flags): (u8, u8) =
                unsafe { (load(at + 12), load(at + TCP_FLAGS_OFFSET)) };
            // The options too must lie inside the datagram (corpus: tcp-data-offset-*).
            let header_len = usize::from(data_offset >> 4) * 4;
            if header_len < TcpHdr::LEN || offset + header_len > l3_end {
                return Err(Reason::PassMalformed);
            }
            // SAFETY: as above: the two ports are bytes 0..4.
            (flags & (TCP_SYN | TCP_ACK) == TCP_SYN, unsafe {
                load::<u32>(at)
            })
        }
        PROTO_UDP => {
            if offset + UdpHdr::LEN > l3_end {
                return Err(Reason::PassMalformed);
            }
            let udp: *const UdpHdr = header(ctx, offset).ok_or(Reason::PassMalformed)?;
            let at = udp as usize;
            // SAFETY: the 8-byte header is inside the frame (`header`).
            let udp_len = usize::from(u16::from_be(unsafe { load::<u16>(at + 4) }));
            // A length field shorter than the header or past the datagram is inconsistent
            // (corpus: udp-length-*).
            if udp_len < UdpHdr::LEN || offset + udp_len > l3_end {
                return Err(Reason::PassMalformed);
            }
            // SAFETY: as above: the two ports are bytes 0..4.
            (false, unsafe { load::<u32>(at) })
        }
        _ => return Err(Reason::PassNotTcpUdp),
    };
    // Both ports, as on the wire, in one word: key word 8 is `sport_be` and `dport_be`
    // (offset 32).
    // SAFETY: word 8 of the 40-byte, 8-aligned key.
    unsafe { *key_words(key).add(8) = ports };
    Ok(opens)
}

/// IPv6 extension headers (hop-by-hop, routing, fragment, ESP, AH, destination options,
/// mobility, HIP, shim6, and the two experimental ones, RFC 3692): the host handles these
/// (corpus: ipv6-experimental-extension).
#[inline(always)]
fn is_ipv6_extension(next_header: u8) -> bool {
    matches!(
        next_header,
        0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254
    )
}
