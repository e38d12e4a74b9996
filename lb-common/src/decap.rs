//! The backend-side decapsulator (`lb decap`): map names, key and value layouts and counter
//! reasons shared by the `lb_decap` XDP program and the daemon's `lb::decap`.
//!
//! Its maps live in the same object as the balancer's. Every name starts with [`MAP_PREFIX`], so
//! the balancer's pinned-layout check leaves them out (a balancer pinned before `lb decap`
//! existed stays adoptable) and `lb decap` pins only these.

use crate::{FAMILY_V4, FAMILY_V6};

/// What every decap map's name starts with.
pub const MAP_PREFIX: &str = "DECAP_";
/// `DECAP_VIPS`: hash map `DecapVip -> u32` (value unused, 1): the inner destinations that are
/// decapsulated.
pub const MAP_DECAP_VIPS: &str = "DECAP_VIPS";
/// `DECAP_CONFIG`: 1-entry array of [`DecapConfig`].
pub const MAP_DECAP_CONFIG: &str = "DECAP_CONFIG";
/// `DECAP_STATS`: per-CPU array `DecapReason -> Counters`.
pub const MAP_DECAP_STATS: &str = "DECAP_STATS";
/// The decap maps, in name order.
pub const DECAP_MAPS: [&str; 3] = [MAP_DECAP_CONFIG, MAP_DECAP_STATS, MAP_DECAP_VIPS];

/// Whether a map of the object belongs to the decapsulator (and not the balancer).
pub fn is_decap_map(name: &str) -> bool {
    name.len() >= MAP_PREFIX.len() && name.as_bytes()[..MAP_PREFIX.len()] == *MAP_PREFIX.as_bytes()
}

/// Capacity of `DECAP_VIPS`.
pub const DECAP_MAX_VIPS: u32 = 1024;

/// The GUE port when none is configured (the balancer's default too).
pub const DEFAULT_GUE_PORT: u16 = 6080;

/// IP protocol numbers of the two IPIP forms (RFC 2003 IPv4-in-IP, RFC 2473 IPv6-in-IP).
pub const PROTO_IPIP: u8 = 4;
pub const PROTO_IPV6: u8 = 41;

/// `DecapVip`: an inner destination address. IPv4 addresses sit in the first 4 bytes of `addr`,
/// the rest zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DecapVip {
    pub family: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}

impl DecapVip {
    pub const fn v4(addr: [u8; 4]) -> Self {
        Self {
            family: FAMILY_V4,
            _pad: [0; 3],
            addr: crate::maps::ipv4_in_16(addr),
        }
    }

    pub const fn v6(addr: [u8; 16]) -> Self {
        Self {
            family: FAMILY_V6,
            _pad: [0; 3],
            addr,
        }
    }
}

/// `DecapConfig`: slot 0 of `DECAP_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecapConfig {
    /// The GUE UDP destination port, in network byte order (as on the wire); 0 until the daemon
    /// writes it, and no UDP packet has port 0, so an unwritten config decapsulates no GUE.
    pub gue_port_be: u16,
    pub _pad: [u8; 6],
}

/// Why the decapsulator did what it did; the index into `DECAP_STATS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapReason {
    /// IPIP (4in4, 6in6, 4in6) stripped, inner packet passed to the stack.
    DecapIpip = 0,
    /// GUE (direct IP or version 0) stripped, inner packet passed to the stack.
    DecapGue = 1,
    /// Not one of our tunnels (not IP, another protocol, another UDP port, IPv6 extension
    /// headers): passed untouched.
    PassNotEncapsulated = 2,
    /// A tunnel packet whose inner destination is not a configured VIP: passed untouched.
    PassNotVip = 3,
    /// A tunnel packet that is truncated, inconsistent or fragmented: passed untouched.
    PassMalformed = 4,
}

impl DecapReason {
    pub const COUNT: u32 = 5;
    pub const ALL: [DecapReason; 5] = [
        DecapReason::DecapIpip,
        DecapReason::DecapGue,
        DecapReason::PassNotEncapsulated,
        DecapReason::PassNotVip,
        DecapReason::PassMalformed,
    ];

    /// The name `lb decap --status` prints.
    pub const fn name(self) -> &'static str {
        match self {
            DecapReason::DecapIpip => "decapsulated_ipip",
            DecapReason::DecapGue => "decapsulated_gue",
            DecapReason::PassNotEncapsulated => "passed_not_encapsulated",
            DecapReason::PassNotVip => "passed_not_a_vip",
            DecapReason::PassMalformed => "passed_malformed",
        }
    }
}

const _: () = {
    assert!(core::mem::size_of::<DecapVip>() == 20);
    assert!(core::mem::size_of::<DecapConfig>() == 8);
};

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: integers and integer arrays only, `repr(C)`, padding explicit (sizes asserted
    // above): any bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for DecapVip {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DecapConfig {}
    // SAFETY: as above.
    unsafe impl bytemuck::Zeroable for DecapVip {}
    // SAFETY: as above.
    unsafe impl bytemuck::Pod for DecapVip {}
    // SAFETY: as above.
    unsafe impl bytemuck::Zeroable for DecapConfig {}
    // SAFETY: as above.
    unsafe impl bytemuck::Pod for DecapConfig {}
}
