//! Header sizes, ethertypes and protocol numbers of the wire formats every program here reads and
//! writes (one definition for the balancer's parser, its encapsulation and `lb_decap`).

pub const ETH_LEN: usize = 14;
pub const VLAN_LEN: usize = 4;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const IPV4_LEN: usize = 20;
pub const IPV6_LEN: usize = 40;
pub const UDP_LEN: usize = 8;
/// IPv4 "don't fragment", "more fragments" and fragment offset, in the host-order `frags` word.
pub const IPV4_DF: u16 = 0x4000;
pub const IPV4_MF: u16 = 0x2000;
pub const IPV4_OFFSET_MASK: u16 = 0x1fff;
/// IP protocol numbers of what an outer header carries.
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_UDP: u8 = 17;
