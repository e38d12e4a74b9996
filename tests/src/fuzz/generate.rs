//! Frames for the fuzzer: mostly valid frames to the lab's VIPs (so the balancing paths run),
//! then mutated: header fields, lengths, IHL, IPv4 options, VLAN tags, IPv6 next headers and
//! extension headers, fragments, truncations, bit flips, random bytes.

use std::net::IpAddr;

use crate::frames::{CLIENT_MAC, LB_MAC, checksum};

use super::rng::Rng;

/// A service the generator aims at (usually a VIP of the lab).
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub address: IpAddr,
    pub port: u16,
    pub proto: u8,
}

/// Where the headers of a generated frame start, for targeted mutations.
#[derive(Clone, Copy, Debug, Default)]
struct Layout {
    /// EtherType field of the innermost tag.
    ether_type: usize,
    l3: usize,
    /// First byte after the fixed IPv6 header / the IPv4 header with options.
    l3_payload: usize,
    l4: usize,
    v6: bool,
}

const EXTENSIONS: [u8; 6] = [0, 43, 44, 60, 253, 135];
const NEXT_HEADERS: [u8; 18] = [
    0, 1, 6, 17, 41, 43, 44, 47, 50, 51, 58, 59, 60, 132, 135, 139, 253, 254,
];
const ETHER_TYPES: [u16; 7] = [0x0800, 0x86dd, 0x8100, 0x88a8, 0x9100, 0x0806, 0x88cc];

pub struct Generator {
    pub rng: Rng,
    targets: Vec<Target>,
}

impl Generator {
    pub fn new(seed: u64, targets: Vec<Target>) -> Self {
        assert!(!targets.is_empty(), "the fuzzer needs at least one target");
        Self {
            rng: Rng::new(seed),
            targets,
        }
    }

    /// The next frame, written into `frame` (cleared first); always at least an Ethernet header
    /// long (the kernel refuses shorter test runs) and at most `MAX_FRAME`.
    pub fn next_frame(&mut self, frame: &mut Vec<u8>) {
        frame.clear();
        if self.rng.chance(2) {
            self.random_frame(frame);
        } else {
            let layout = self.valid_frame(frame);
            let mutations = match self.rng.below(10) {
                0..=3 => 0,
                4..=6 => 1,
                7..=8 => 2,
                _ => 1 + self.rng.below(6),
            };
            for _ in 0..mutations {
                self.mutate(frame, &layout);
            }
        }
        if frame.len() < 14 {
            frame.resize(14, 0);
        }
        frame.truncate(MAX_FRAME);
    }

    fn random_frame(&mut self, frame: &mut Vec<u8>) {
        let len = 14 + self.rng.below(200);
        frame.resize(len, 0);
        self.rng.fill(frame);
        if self.rng.chance(70) {
            let t = self.rng.pick(&ETHER_TYPES[..3]);
            frame[12..14].copy_from_slice(&t.to_be_bytes());
        }
    }

    fn valid_frame(&mut self, frame: &mut Vec<u8>) -> Layout {
        let mut target = self.rng.pick(&self.targets);
        if self.rng.chance(10) {
            // Near misses: the VIP's address with another port or protocol.
            match self.rng.below(3) {
                0 => target.port = self.rng.next_u64() as u16,
                1 => target.proto = if target.proto == 6 { 17 } else { 6 },
                _ => target.proto = self.rng.pick(&[1, 58, 132]),
            }
        }
        let v6 = target.address.is_ipv6();
        let client = self.rng.below(8) as u8 + 1;
        let sport = if self.rng.chance(80) {
            40_000 + self.rng.below(24) as u16
        } else {
            self.rng.next_u64() as u16
        };
        let mut layout = Layout {
            v6,
            ..Layout::default()
        };
        frame.extend_from_slice(&LB_MAC);
        frame.extend_from_slice(&CLIENT_MAC);
        let tags = match self.rng.below(20) {
            0..=13 => 0,
            14..=18 => 1,
            _ => 2,
        };
        for t in 0..tags {
            let tpid: u16 = if t == 0 && tags == 2 && self.rng.chance(50) {
                0x88a8
            } else {
                0x8100
            };
            frame.extend_from_slice(&tpid.to_be_bytes());
            frame.extend_from_slice(&(self.rng.next_u64() as u16 & 0x0fff).to_be_bytes());
        }
        layout.ether_type = frame.len();
        frame.extend_from_slice(&(if v6 { 0x86ddu16 } else { 0x0800 }).to_be_bytes());
        layout.l3 = frame.len();

        // The L4 segment first: its length goes into the IP header.
        let mut l4 = Vec::with_capacity(64);
        let payload_len = if self.rng.chance(90) {
            self.rng.below(48)
        } else {
            self.rng.below(1400)
        };
        l4.extend_from_slice(&sport.to_be_bytes());
        l4.extend_from_slice(&target.port.to_be_bytes());
        match target.proto {
            6 => {
                let option_words = if self.rng.chance(15) {
                    1 + self.rng.below(10)
                } else {
                    0
                };
                l4.extend_from_slice(&(self.rng.next_u64() as u32).to_be_bytes());
                l4.extend_from_slice(&0u32.to_be_bytes());
                l4.push(((5 + option_words) as u8) << 4);
                l4.push(self.rng.pick(&[0x02, 0x10, 0x18, 0x11, 0x04]));
                l4.extend_from_slice(&[0xfa, 0xf0, 0, 0, 0, 0]);
                l4.extend(std::iter::repeat_n(1, option_words * 4)); // NOPs
            }
            17 => l4.extend_from_slice(&[0, 0, 0, 0]),
            _ => l4.extend_from_slice(&[8, 0, 0, 0]),
        }
        let at = l4.len();
        l4.resize(at + payload_len, 0);
        self.rng.fill(&mut l4[at..]);
        if target.proto == 17 {
            let len = (l4.len() as u16).to_be_bytes();
            l4[4..6].copy_from_slice(&len);
        }

        match target.address {
            IpAddr::V4(dst) => {
                let src = [192, 0, 2, client];
                let options = if self.rng.chance(15) {
                    4 * (1 + self.rng.below(10))
                } else {
                    0
                };
                let ihl = 5 + options / 4;
                let total = (ihl * 4 + l4.len()) as u16;
                let mut ip = [0u8; 20];
                ip[0] = 0x40 | ihl as u8;
                ip[2..4].copy_from_slice(&total.to_be_bytes());
                ip[4..6].copy_from_slice(&(self.rng.next_u64() as u16).to_be_bytes());
                ip[6] = if self.rng.chance(50) { 0x40 } else { 0 };
                ip[8] = 64;
                ip[9] = target.proto;
                ip[12..16].copy_from_slice(&src);
                ip[16..20].copy_from_slice(&dst.octets());
                let start = frame.len();
                frame.extend_from_slice(&ip);
                for _ in 0..options {
                    let b = if self.rng.chance(70) {
                        1
                    } else {
                        self.rng.byte()
                    };
                    frame.push(b);
                }
                let sum = checksum(&[&frame[start..]]);
                frame[start + 10..start + 12].copy_from_slice(&sum.to_be_bytes());
                layout.l3_payload = frame.len();
            }
            IpAddr::V6(dst) => {
                let mut src = [0u8; 16];
                src[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
                src[5] = 0x0c;
                src[15] = client;
                let extension = self.rng.chance(8).then(|| self.rng.pick(&EXTENSIONS));
                let ext_len = if extension.is_some() { 8 } else { 0 };
                frame.extend_from_slice(&[0x60, 0, 0, 0]);
                frame.extend_from_slice(&((ext_len + l4.len()) as u16).to_be_bytes());
                frame.push(extension.unwrap_or(target.proto));
                frame.push(64);
                frame.extend_from_slice(&src);
                frame.extend_from_slice(&dst.octets());
                layout.l3_payload = frame.len();
                if extension.is_some() {
                    // An 8-byte extension header (next header, length 0, padding).
                    frame.extend_from_slice(&[target.proto, 0, 1, 4, 0, 0, 0, 0]);
                }
            }
        }
        layout.l4 = frame.len();
        frame.extend_from_slice(&l4);
        if self.rng.chance(10) {
            // Ethernet padding after the datagram.
            let n = 1 + self.rng.below(40);
            frame.resize(frame.len() + n, 0);
        }
        layout
    }

    fn mutate(&mut self, frame: &mut Vec<u8>, at: &Layout) {
        let len = frame.len();
        let rng = &mut self.rng;
        match rng.below(16) {
            // A byte of some header (first 100 bytes: L2 to L4).
            0 | 1 => {
                let i = rng.below(len.min(100));
                frame[i] = interesting_byte(rng, frame[i]);
            }
            2 => set_nibble(frame, at.l3, false, rng.below(16) as u8),
            3 => set_nibble(frame, at.l3, true, rng.below(16) as u8),
            // IPv4 total length / IPv6 payload length.
            4 => {
                let field = if at.v6 { at.l3 + 4 } else { at.l3 + 2 };
                let current = read16(frame, field);
                let header = if at.v6 {
                    0
                } else {
                    (at.l3_payload - at.l3) as u16
                };
                let v = interesting_len(rng, current, header);
                write16(frame, field, v);
            }
            // Fragments: MF and/or an offset.
            5 if !at.v6 => {
                let v = match rng.below(4) {
                    0 => 0x2000,
                    1 => 1,
                    2 => 0x1fff,
                    _ => rng.next_u64() as u16,
                };
                write16(frame, at.l3 + 6, v);
            }
            5 | 6 => {
                let field = if at.v6 { at.l3 + 6 } else { at.l3 + 9 };
                if let Some(b) = frame.get_mut(field) {
                    *b = rng.pick(&NEXT_HEADERS);
                }
            }
            // TCP data offset / UDP length.
            7 => set_nibble(frame, at.l4 + 12, true, rng.below(16) as u8),
            8 => {
                let current = read16(frame, at.l4 + 4);
                let v = interesting_len(rng, current, 8);
                write16(frame, at.l4 + 4, v);
            }
            9 => {
                let t = rng.pick(&ETHER_TYPES);
                write16(frame, at.ether_type, t);
            }
            10 | 11 => {
                let keep = 14 + rng.below(len.saturating_sub(14) + 1);
                frame.truncate(keep);
            }
            12 => {
                let n = 1 + rng.below(64);
                for _ in 0..n {
                    frame.push(rng.byte());
                }
            }
            13 => {
                let bit = rng.below(len * 8);
                frame[bit / 8] ^= 1 << (bit % 8);
            }
            14 => {
                let i = rng.below(len);
                frame[i] = rng.byte();
            }
            _ => {
                // Insert or remove 4 bytes after the Ethernet addresses (a VLAN tag more or less).
                if rng.chance(50) {
                    let tag = [0x81, 0x00, rng.byte() & 0x0f, rng.byte()];
                    frame.splice(12..12, tag);
                } else if len >= 18 {
                    frame.drain(12..16);
                }
            }
        }
    }
}

/// The largest frame generated (the kernel's test-run limit is about a page).
pub const MAX_FRAME: usize = 1600;

fn interesting_byte(rng: &mut Rng, current: u8) -> u8 {
    match rng.below(6) {
        0 => 0,
        1 => 0xff,
        2 => current.wrapping_add(1),
        3 => current.wrapping_sub(1),
        4 => current ^ 0x80,
        _ => rng.byte(),
    }
}

fn interesting_len(rng: &mut Rng, current: u16, header: u16) -> u16 {
    match rng.below(9) {
        0 => 0,
        1 => header,
        2 => header.wrapping_sub(1),
        3 => current.wrapping_sub(1),
        4 => current.wrapping_add(1),
        5 => 0xffff,
        6 => current.wrapping_add(rng.below(64) as u16),
        7 => current.wrapping_sub(rng.below(64) as u16),
        _ => rng.next_u64() as u16,
    }
}

fn set_nibble(frame: &mut [u8], i: usize, high: bool, v: u8) {
    if let Some(b) = frame.get_mut(i) {
        *b = if high {
            (*b & 0x0f) | (v << 4)
        } else {
            (*b & 0xf0) | (v & 0x0f)
        };
    }
}

fn read16(frame: &[u8], i: usize) -> u16 {
    match frame.get(i..i + 2) {
        Some(b) => u16::from_be_bytes([b[0], b[1]]),
        None => 0,
    }
}

fn write16(frame: &mut [u8], i: usize, v: u16) {
    if let Some(b) = frame.get_mut(i..i + 2) {
        b.copy_from_slice(&v.to_be_bytes());
    }
}
