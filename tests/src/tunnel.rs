//! A reference encapsulator for the balancer's tunnels, built with etherparse and independent of
//! the eBPF code: what `lb decap` must accept and what the balancer's encapsulation must send.
//!
//! - [`Tunnel::Ipip`]: outer IPv4 (protocol 4) or IPv6 (next header 41 for an inner IPv6, 4 for
//!   an inner IPv4) straight before the inner packet.
//! - [`Tunnel::Gue`]: outer IP + UDP to `port`, then the inner packet ("direct IP", GUE variant 1).
//! - [`Tunnel::GueV0`]: as `Gue` with a 4-byte GUE version-0 header (hlen 0, proto 4 or 41,
//!   flags 0) before the inner packet.
//!
//! Outer IPv4: DF set, identification 0, correct header checksum. Outer IPv6: flow label 0. UDP
//! checksum 0 (RFC 6935 allows it for tunnels, also over IPv6).

use std::net::IpAddr;

use etherparse::{IpDscp, IpEcn, IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header, UdpHeader};

/// How the inner packet is carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tunnel {
    Ipip,
    Gue { port: u16, source_port: u16 },
    GueV0 { port: u16, source_port: u16 },
}

/// IPv4's and IPv6's IP protocol numbers as payloads.
const PROTO_IPIP: u8 = 4;
const PROTO_IPV6: u8 = 41;
const PROTO_UDP: u8 = 17;

/// The protocol number of an inner IP packet, from its version nibble.
fn inner_protocol(inner_ip_packet: &[u8]) -> u8 {
    match inner_ip_packet.first().map(|b| b >> 4) {
        Some(4) => PROTO_IPIP,
        Some(6) => PROTO_IPV6,
        other => panic!("the inner packet is not IPv4 or IPv6 (version {other:?})"),
    }
}

/// The outer IP packet carrying `inner_ip_packet` through `tunnel` from `outer_src` to
/// `outer_dst` (both the same family), with this TTL / hop limit and TOS / traffic class.
pub fn encapsulate(
    inner_ip_packet: &[u8],
    tunnel: &Tunnel,
    outer_src: IpAddr,
    outer_dst: IpAddr,
    ttl: u8,
    tos_or_traffic_class: u8,
) -> Vec<u8> {
    let inner_proto = inner_protocol(inner_ip_packet);
    let mut payload = Vec::with_capacity(inner_ip_packet.len() + 12);
    let proto = match *tunnel {
        Tunnel::Ipip => inner_proto,
        Tunnel::Gue { port, source_port } | Tunnel::GueV0 { port, source_port } => {
            let gue: &[u8] = match tunnel {
                Tunnel::GueV0 { .. } => &[0, inner_proto, 0, 0],
                _ => &[],
            };
            let length = u16::try_from(8 + gue.len() + inner_ip_packet.len())
                .expect("the UDP datagram fits in 64 KiB");
            let udp = UdpHeader {
                source_port,
                destination_port: port,
                length,
                checksum: 0,
            };
            payload.extend_from_slice(&udp.to_bytes());
            payload.extend_from_slice(gue);
            PROTO_UDP
        }
    };
    payload.extend_from_slice(inner_ip_packet);
    let payload_len = u16::try_from(payload.len()).expect("the payload fits in 64 KiB");
    let mut packet = match (outer_src, outer_dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let mut header = Ipv4Header::new(
                payload_len,
                ttl,
                IpNumber(proto),
                src.octets(),
                dst.octets(),
            )
            .expect("the payload fits");
            header.dscp = IpDscp::try_new(tos_or_traffic_class >> 2).expect("6 bits");
            header.ecn = IpEcn::try_new(tos_or_traffic_class & 3).expect("2 bits");
            header.dont_fragment = true;
            header.identification = 0;
            header.header_checksum = header.calc_header_checksum();
            header.to_bytes().to_vec()
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => Ipv6Header {
            traffic_class: tos_or_traffic_class,
            flow_label: Ipv6FlowLabel::ZERO,
            payload_length: payload_len,
            next_header: IpNumber(proto),
            hop_limit: ttl,
            source: src.octets(),
            destination: dst.octets(),
        }
        .to_bytes()
        .to_vec(),
        _ => panic!("outer addresses of different families: {outer_src} -> {outer_dst}"),
    };
    packet.extend_from_slice(&payload);
    packet
}

/// `ip_packet` in an Ethernet frame from `src_mac` to `dst_mac`, ethertype from its version.
pub fn ethernet(dst_mac: [u8; 6], src_mac: [u8; 6], ip_packet: &[u8]) -> Vec<u8> {
    let ether_type: [u8; 2] = match ip_packet.first().map(|b| b >> 4) {
        Some(6) => [0x86, 0xdd],
        _ => [0x08, 0x00],
    };
    let mut frame = Vec::with_capacity(14 + ip_packet.len());
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&ether_type);
    frame.extend_from_slice(ip_packet);
    frame
}

/// [`ethernet`] with one 802.1Q tag (priority 0) carrying `vlan_id`.
pub fn ethernet_vlan(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    vlan_id: u16,
    ip_packet: &[u8],
) -> Vec<u8> {
    let mut frame = ethernet(dst_mac, src_mac, ip_packet);
    let tag = [0x81, 0x00, (vlan_id >> 8) as u8 & 0x0f, vlan_id as u8];
    frame.splice(12..12, tag);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_outer_is_valid_and_df() {
        let inner = [
            0x45u8, 0, 0, 20, 0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        let packet = encapsulate(
            &inner,
            &Tunnel::Gue {
                port: 6080,
                source_port: 40000,
            },
            "192.0.2.1".parse().unwrap(),
            "192.0.2.2".parse().unwrap(),
            64,
            0,
        );
        let (header, rest) = Ipv4Header::from_slice(&packet).expect("valid IPv4");
        assert!(header.dont_fragment);
        assert_eq!(header.header_checksum, header.calc_header_checksum());
        assert_eq!(usize::from(header.total_len), packet.len());
        assert_eq!(&rest[..8], &[0x9c, 0x40, 0x17, 0xc0, 0, 28, 0, 0]);
        assert_eq!(&rest[8..], &inner);
    }
}
