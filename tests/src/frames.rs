//! Hand-built Ethernet frames for packet tests: exact bytes, valid checksums, optional 802.1Q tag.

use std::net::IpAddr;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0x00, 0x00, 0x00, 0x01];
pub const LB_MAC: [u8; 6] = [0x02, 0x1b, 0x00, 0x00, 0x00, 0x02];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    /// A TCP segment with the given flags (0x02 = SYN).
    Tcp {
        flags: u8,
    },
    Udp,
    /// ICMP echo request (ICMPv6 for IPv6).
    IcmpEcho,
}

/// What to put in a frame.
#[derive(Clone, Debug)]
pub struct FrameSpec {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub l4: L4,
    pub payload: Vec<u8>,
    /// IPv4 options (length must be a multiple of 4).
    pub ipv4_options: Vec<u8>,
}

impl FrameSpec {
    pub fn tcp_syn(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Self {
        Self {
            src_mac: CLIENT_MAC,
            dst_mac: LB_MAC,
            vlan: None,
            src,
            dst,
            sport,
            dport,
            l4: L4::Tcp { flags: 0x02 },
            payload: Vec::new(),
            ipv4_options: Vec::new(),
        }
    }

    /// A TCP ACK: a packet of an established connection.
    pub fn tcp_ack(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Self {
        Self {
            l4: L4::Tcp { flags: 0x10 },
            ..Self::tcp_syn(src, sport, dst, dport)
        }
    }

    /// The same flow's next packet once it is under way: an ACK for TCP, the same datagram for
    /// UDP.
    pub fn established(&self) -> Self {
        match self.l4 {
            L4::Tcp { .. } => Self {
                l4: L4::Tcp { flags: 0x10 },
                ..self.clone()
            },
            L4::Udp | L4::IcmpEcho => self.clone(),
        }
    }

    pub fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, payload: &[u8]) -> Self {
        Self {
            l4: L4::Udp,
            payload: payload.to_vec(),
            ..Self::tcp_syn(src, sport, dst, dport)
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        let mut frame = Vec::new();
        frame.extend_from_slice(&self.dst_mac);
        frame.extend_from_slice(&self.src_mac);
        if let Some(vid) = self.vlan {
            frame.extend_from_slice(&0x8100u16.to_be_bytes());
            frame.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
        }
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                frame.extend_from_slice(&0x0800u16.to_be_bytes());
                let ihl = 5 + self.ipv4_options.len() / 4;
                let mut ip = vec![
                    0x40 | ihl as u8,
                    0,
                    0,
                    0,
                    0x12,
                    0x34,
                    0x40, // don't fragment
                    0,
                    64,
                    self.protocol(),
                    0,
                    0,
                ];
                ip.extend_from_slice(&s.octets());
                ip.extend_from_slice(&d.octets());
                ip.extend_from_slice(&self.ipv4_options);
                let total = (ip.len() + l4.len()) as u16;
                ip[2..4].copy_from_slice(&total.to_be_bytes());
                let sum = checksum(&[&ip]);
                ip[10..12].copy_from_slice(&sum.to_be_bytes());
                frame.extend_from_slice(&ip);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                frame.extend_from_slice(&0x86ddu16.to_be_bytes());
                frame.extend_from_slice(&[0x60, 0, 0, 0]);
                frame.extend_from_slice(&(l4.len() as u16).to_be_bytes());
                frame.push(self.protocol());
                frame.push(64);
                frame.extend_from_slice(&s.octets());
                frame.extend_from_slice(&d.octets());
            }
            _ => panic!("mixed address families in {self:?}"),
        }
        frame.extend_from_slice(&l4);
        frame
    }

    fn protocol(&self) -> u8 {
        match (self.l4, self.src) {
            (L4::Tcp { .. }, _) => 6,
            (L4::Udp, _) => 17,
            (L4::IcmpEcho, IpAddr::V4(_)) => 1,
            (L4::IcmpEcho, IpAddr::V6(_)) => 58,
        }
    }

    fn pseudo_header(&self, l4_len: usize) -> Vec<u8> {
        let mut p = Vec::new();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                p.extend_from_slice(&s.octets());
                p.extend_from_slice(&d.octets());
                p.extend_from_slice(&[0, self.protocol()]);
                p.extend_from_slice(&(l4_len as u16).to_be_bytes());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                p.extend_from_slice(&s.octets());
                p.extend_from_slice(&d.octets());
                p.extend_from_slice(&(l4_len as u32).to_be_bytes());
                p.extend_from_slice(&[0, 0, 0, self.protocol()]);
            }
            _ => unreachable!(),
        }
        p
    }

    fn l4_bytes(&self) -> Vec<u8> {
        let (mut l4, checksum_at) = match self.l4 {
            L4::Tcp { flags } => {
                let mut t = Vec::new();
                t.extend_from_slice(&self.sport.to_be_bytes());
                t.extend_from_slice(&self.dport.to_be_bytes());
                t.extend_from_slice(&0x0102_0304u32.to_be_bytes()); // seq
                t.extend_from_slice(&0u32.to_be_bytes()); // ack
                t.extend_from_slice(&[0x50, flags]); // data offset 5
                t.extend_from_slice(&64240u16.to_be_bytes());
                t.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
                (t, 16)
            }
            L4::Udp => {
                let mut u = Vec::new();
                u.extend_from_slice(&self.sport.to_be_bytes());
                u.extend_from_slice(&self.dport.to_be_bytes());
                u.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                u.extend_from_slice(&[0, 0]);
                (u, 6)
            }
            L4::IcmpEcho => {
                let ty = if self.src.is_ipv4() { 8 } else { 128 };
                (vec![ty, 0, 0, 0, 0x12, 0x34, 0, 1], 2)
            }
        };
        l4.extend_from_slice(&self.payload);
        let pseudo = if self.l4 == L4::IcmpEcho && self.src.is_ipv4() {
            Vec::new()
        } else {
            self.pseudo_header(l4.len())
        };
        let sum = checksum(&[&pseudo, &l4]);
        l4[checksum_at..checksum_at + 2].copy_from_slice(&sum.to_be_bytes());
        l4
    }
}

/// The Internet checksum over the concatenation of `parts`.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ARP request from the client for `target`.
pub fn arp_request(sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&sender);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f
}
