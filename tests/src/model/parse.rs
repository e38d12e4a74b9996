//! Frame → 5-tuple, with `etherparse` decoding every header. The rules (README "How it
//! behaves", DESIGN §3), checked layer by layer, each layer's own consistency before its content:
//!
//! - Ethernet II, at most one 802.1Q tag; a second tag (0x8100, 0x88a8, 0x9100) or any other
//!   EtherType is not IP.
//! - IPv4: version 4, IHL ≥ 5 with the options present, total length ≥ the header and the whole
//!   datagram in the frame (Ethernet padding after it is fine); a fragment (MF or an offset) goes
//!   to the host; then the protocol.
//! - IPv6: version 6, the payload length inside the frame; an extension header (etherparse's
//!   list) goes to the host; then the protocol.
//! - TCP: the whole header, options included (data offset ≥ 5), inside the IP payload. UDP: the
//!   8-byte header inside the IP payload, its length field ≥ 8 and ≤ the IP payload.
//! - Checksums are not checked: the IP packet leaves untouched, so the backend's stack judges it
//!   exactly as it would have without the load balancer.

use etherparse::{
    Ethernet2HeaderSlice, IpNumber, Ipv4HeaderSlice, Ipv6HeaderSlice, SingleVlanHeaderSlice,
    TcpHeaderSlice, UdpHeaderSlice, ether_type,
};
use lb_common::{FAMILY_V4, FAMILY_V6, FlowKey, PROTO_TCP, PROTO_UDP, Reason};

/// A TCP/UDP packet whose headers are all there and consistent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub key: FlowKey,
    /// TCP SYN without ACK: a connection's first packet.
    pub opens: bool,
}

/// The packet of a TCP/UDP frame whose headers are all there and consistent, or why the frame
/// goes to the host.
pub fn parse(frame: &[u8]) -> Result<Packet, Reason> {
    let eth = Ethernet2HeaderSlice::from_slice(frame).map_err(|_| Reason::PassMalformed)?;
    let mut rest = &frame[eth.slice().len()..];
    let mut ether_type = eth.ether_type();
    if ether_type == ether_type::VLAN_TAGGED_FRAME {
        let vlan = SingleVlanHeaderSlice::from_slice(rest).map_err(|_| Reason::PassMalformed)?;
        rest = &rest[vlan.slice().len()..];
        ether_type = vlan.ether_type();
    }
    match ether_type {
        ether_type::IPV4 => ipv4(rest),
        ether_type::IPV6 => ipv6(rest),
        // Includes a second VLAN tag: one tag at most (README "Limits").
        _ => Err(Reason::PassNotIp),
    }
}

fn ipv4(packet: &[u8]) -> Result<Packet, Reason> {
    let ip = Ipv4HeaderSlice::from_slice(packet).map_err(|_| Reason::PassMalformed)?;
    let header_len = ip.slice().len();
    let total_len = usize::from(ip.total_len());
    if total_len < header_len || total_len > packet.len() {
        return Err(Reason::PassMalformed);
    }
    if ip.is_fragmenting_payload() {
        return Err(Reason::PassFragment);
    }
    let mut key = FlowKey {
        src: widen(ip.source()),
        dst: widen(ip.destination()),
        sport_be: 0,
        dport_be: 0,
        proto: ip.protocol().0,
        family: FAMILY_V4,
        _pad: [0; 2],
    };
    let opens = ports(&packet[header_len..total_len], &mut key)?;
    Ok(Packet { key, opens })
}

fn ipv6(packet: &[u8]) -> Result<Packet, Reason> {
    let ip = Ipv6HeaderSlice::from_slice(packet).map_err(|_| Reason::PassMalformed)?;
    let header_len = ip.slice().len();
    let end = header_len + usize::from(ip.payload_length());
    if end > packet.len() {
        return Err(Reason::PassMalformed);
    }
    let next = ip.next_header();
    if next.is_ipv6_ext_header_value() {
        return Err(Reason::PassFragment);
    }
    let mut key = FlowKey {
        src: ip.source(),
        dst: ip.destination(),
        sport_be: 0,
        dport_be: 0,
        proto: next.0,
        family: FAMILY_V6,
        _pad: [0; 2],
    };
    let opens = ports(&packet[header_len..end], &mut key)?;
    Ok(Packet { key, opens })
}

/// Fills in the ports from the IP payload (exactly the datagram, without Ethernet padding);
/// returns whether it is a TCP SYN without ACK.
fn ports(payload: &[u8], key: &mut FlowKey) -> Result<bool, Reason> {
    let mut opens = false;
    match IpNumber(key.proto) {
        IpNumber::TCP => {
            let tcp = TcpHeaderSlice::from_slice(payload).map_err(|_| Reason::PassMalformed)?;
            key.sport_be = tcp.source_port().to_be();
            key.dport_be = tcp.destination_port().to_be();
            opens = tcp.syn() && !tcp.ack();
        }
        IpNumber::UDP => {
            let udp = UdpHeaderSlice::from_slice(payload).map_err(|_| Reason::PassMalformed)?;
            let length = usize::from(udp.length());
            if length < udp.slice().len() || length > payload.len() {
                return Err(Reason::PassMalformed);
            }
            key.sport_be = udp.source_port().to_be();
            key.dport_be = udp.destination_port().to_be();
        }
        _ => return Err(Reason::PassNotTcpUdp),
    }
    debug_assert!(key.proto == PROTO_TCP || key.proto == PROTO_UDP);
    Ok(opens)
}

fn widen(a: [u8; 4]) -> [u8; 16] {
    let mut wide = [0u8; 16];
    wide[..4].copy_from_slice(&a);
    wide
}
