//! Hand-built encapsulated frames, as a load balancer that tunnels to its backends sends them:
//! IP in IP (IPv4-in-IPv4, IPv6-in-IPv6, IPv4-in-IPv6, IPv6-in-IPv4) and IP in UDP (GUE
//! "direct IP", version 1: the inner IP header right after the UDP header, which is also plain
//! fou's format; UDP checksum 0), plus the TCP SYN they carry. Built with etherparse, so they
//! share no code with the balancer's own encapsulation.

use std::net::IpAddr;

use etherparse::{
    EtherType, Ethernet2Header, IpNumber, Ipv4Header, Ipv6Header, PacketBuilder, UdpHeader,
};

use crate::links::MacAddress;

/// The outer header a frame gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encapsulation {
    /// The inner packet right after the outer IP header (protocol 4 for IPv4 inside, 41 for
    /// IPv6 inside): Linux's ipip, ip6tnl and sit devices.
    Ip,
    /// Outer IP, then UDP to `port` with checksum 0, then the inner packet: GUE direct IP
    /// (Linux: `ip fou add port P gue`) or plain fou (`ip fou add port P ipproto 4|41`).
    Udp { source_port: u16, port: u16 },
}

/// A TCP SYN from `source:sport` to `destination:dport` with sequence number `seq`, as an IP
/// packet (no Ethernet header).
pub fn tcp_syn(source: IpAddr, sport: u16, destination: IpAddr, dport: u16, seq: u32) -> Vec<u8> {
    let builder = match (source, destination) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
        _ => panic!("tcp_syn: {source} and {destination} are of different families"),
    };
    let builder = builder.tcp(sport, dport, seq, 64240).syn();
    let mut packet = Vec::with_capacity(builder.size(0));
    builder
        .write(&mut packet, &[])
        .expect("writing to a Vec cannot fail");
    packet
}

/// `inner` (an IP packet) inside an outer IP header from `outer_source` to
/// `outer_destination`, with `encapsulation`, in an Ethernet frame from `source_mac` to
/// `destination_mac`.
pub fn encapsulate(
    inner: &[u8],
    outer_source: IpAddr,
    outer_destination: IpAddr,
    encapsulation: Encapsulation,
    source_mac: MacAddress,
    destination_mac: MacAddress,
) -> Vec<u8> {
    let inner_protocol = match inner.first().map(|b| b >> 4) {
        Some(4) => IpNumber::IPV4,
        Some(6) => IpNumber::IPV6,
        other => panic!("encapsulate: the inner packet is not IP (version {other:?})"),
    };
    let mut payload = Vec::new();
    let protocol = match encapsulation {
        Encapsulation::Ip => inner_protocol,
        Encapsulation::Udp { source_port, port } => {
            let length = u16::try_from(UdpHeader::LEN + inner.len()).expect("fits in a datagram");
            let udp = UdpHeader {
                source_port,
                destination_port: port,
                length,
                checksum: 0,
            };
            payload.extend_from_slice(&udp.to_bytes());
            IpNumber::UDP
        }
    };
    payload.extend_from_slice(inner);
    let mut frame = Vec::with_capacity(14 + 40 + payload.len());
    let ether_type = if outer_source.is_ipv4() {
        EtherType::IPV4
    } else {
        EtherType::IPV6
    };
    Ethernet2Header {
        source: source_mac.0,
        destination: destination_mac.0,
        ether_type,
    }
    .write(&mut frame)
    .expect("writing to a Vec cannot fail");
    let payload_length = u16::try_from(payload.len()).expect("fits in a packet");
    match (outer_source, outer_destination) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut header = Ipv4Header::new(payload_length, 64, protocol, s.octets(), d.octets())
                .expect("payload fits in IPv4");
            header.header_checksum = header.calc_header_checksum();
            header
                .write(&mut frame)
                .expect("writing to a Vec cannot fail");
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => Ipv6Header {
            traffic_class: 0,
            flow_label: Default::default(),
            payload_length,
            next_header: protocol,
            hop_limit: 64,
            source: s.octets(),
            destination: d.octets(),
        }
        .write(&mut frame)
        .expect("writing to a Vec cannot fail"),
        _ => panic!("encapsulate: outer {outer_source} and {outer_destination} differ in family"),
    }
    frame.extend_from_slice(&payload);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gue_direct_ipv4_layout() {
        let inner = tcp_syn(
            "198.51.100.7".parse().unwrap(),
            40000,
            "10.100.0.100".parse().unwrap(),
            80,
            1,
        );
        let frame = encapsulate(
            &inner,
            "10.77.0.1".parse().unwrap(),
            "10.77.0.2".parse().unwrap(),
            Encapsulation::Udp {
                source_port: 33333,
                port: 6080,
            },
            MacAddress([2, 0, 0, 0, 0, 1]),
            MacAddress([2, 0, 0, 0, 0, 2]),
        );
        assert_eq!(&frame[12..14], &[0x08, 0x00]);
        assert_eq!(frame[14 + 9], 17, "outer protocol UDP");
        let udp = &frame[34..42];
        assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), 6080);
        assert_eq!(&udp[6..8], &[0, 0], "UDP checksum 0");
        assert_eq!(frame[42] >> 6, 1, "GUE version 1 (direct IP)");
        assert_eq!(&frame[42..], &inner[..]);
    }

    #[test]
    fn ip_in_ipv6_next_header() {
        let inner = tcp_syn(
            "198.51.100.7".parse().unwrap(),
            1,
            "10.100.0.100".parse().unwrap(),
            80,
            1,
        );
        let frame = encapsulate(
            &inner,
            "fd00:77::1".parse().unwrap(),
            "fd00:77::2".parse().unwrap(),
            Encapsulation::Ip,
            MacAddress([2, 0, 0, 0, 0, 1]),
            MacAddress([2, 0, 0, 0, 0, 2]),
        );
        assert_eq!(&frame[12..14], &[0x86, 0xdd]);
        assert_eq!(frame[14 + 6], 4, "next header IPv4");
        assert_eq!(&frame[54..], &inner[..]);
    }
}
