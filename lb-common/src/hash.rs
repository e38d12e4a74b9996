//! The flow hash that picks a new flow's Maglev slot. It lives here so the daemon and the tests
//! can compute, byte for byte, which slot (and so which backend) the XDP program will choose.

use crate::{FlowKey, VipKey};

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;
const SEED: u32 = 0x9747_b28c;

#[inline(always)]
fn mix(h: u32, word: u32) -> u32 {
    let k = word.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn word(b: &[u8; 16], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// MurmurHash3 (x86, 32-bit) over the 5-tuple: both addresses (16 bytes each, IPv4 zero-padded),
/// both ports as on the wire, and the protocol. Fixed-size and loop-free for the verifier.
///
/// An IPv4 key's padding words are known to be zero, so that case mixes constant zeros instead
/// of loading them (LLVM folds the multiplications away); the result is the same.
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    let ports =
        (u32::from(u16::from_be(key.sport_be)) << 16) | u32::from(u16::from_be(key.dport_be));
    let h = if key.family == crate::FAMILY_V4 {
        let h = mix(SEED, word(&key.src, 0));
        let h = mix(mix(mix(h, 0), 0), 0);
        let h = mix(h, word(&key.dst, 0));
        mix(mix(mix(h, 0), 0), 0)
    } else {
        let mut h = SEED;
        for i in [0, 4, 8, 12] {
            h = mix(h, word(&key.src, i));
        }
        for i in [0, 4, 8, 12] {
            h = mix(h, word(&key.dst, i));
        }
        h
    };
    finish(mix(mix(h, ports), u32::from(key.proto)))
}

/// `floor(2^32 / ring_size)`, for [`ring_index`] (`ring_size` >= 2).
pub const fn ring_size_inverse(ring_size: u32) -> u64 {
    (1u64 << 32) / ring_size as u64
}

/// `hash % ring_size`, exactly, without a division: BPF (without 32-bit ALU) divides in 64
/// bits, tens of cycles per packet. `inverse` is [`ring_size_inverse`]`(ring_size)`.
///
/// With m = floor(2^32 / M), h·m / 2^32 lies in (h/M − 1, h/M], so the estimated quotient is
/// the true one or one less, and one conditional subtraction fixes the remainder. For M >= 2,
/// m <= 2^31 and h < 2^32, so h·m stays below 2^64.
#[inline(always)]
pub fn ring_index(hash: u32, ring_size: u32, inverse: u64) -> u32 {
    let h = u64::from(hash);
    let m = u64::from(ring_size);
    let quotient = (h * inverse) >> 32;
    let mut rest = h - quotient * m;
    if rest >= m {
        rest -= m;
    }
    rest as u32
}

/// MurmurHash3's finaliser (`fmix32`) after the length (40 bytes).
#[inline(always)]
fn finish(mut h: u32) -> u32 {
    h ^= 40;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The `VIP_INDEX` slot of a VIP key: the address's four 32-bit words folded with XOR, then the
/// key's last word (port, protocol, family: [`vip_key_tail`]), and a multiplicative hash to
/// `VIP_INDEX_SLOTS` slots. The data plane computes the same from a flow's fields
/// ([`vip_index_slot_of`]) without building the key.
#[inline(always)]
pub fn vip_index_slot(key: &VipKey) -> u32 {
    let folded = word(&key.addr, 0) ^ word(&key.addr, 4) ^ word(&key.addr, 8) ^ word(&key.addr, 12);
    vip_index_slot_of(folded, vip_key_tail(key.port_be, key.proto, key.family))
}

/// Bytes 16..20 of a [`VipKey`] as a little-endian word: port (as on the wire), protocol,
/// family.
#[inline(always)]
pub fn vip_key_tail(port_be: u16, proto: u8, family: u8) -> u32 {
    u32::from(port_be) | u32::from(proto) << 16 | u32::from(family) << 24
}

/// [`vip_index_slot`] from the XOR of the address's four words (an IPv4 address: its one word)
/// and the key's [`vip_key_tail`].
#[inline(always)]
pub fn vip_index_slot_of(folded_address: u32, tail: u32) -> u32 {
    (folded_address ^ tail.rotate_left(7)).wrapping_mul(0x9e37_79b1) >> (32 - VIP_INDEX_BITS)
}

/// `VIP_INDEX_SLOTS` is `1 << VIP_INDEX_BITS`.
const VIP_INDEX_BITS: u32 = 12;
const _: () = assert!(crate::VIP_INDEX_SLOTS == 1 << VIP_INDEX_BITS);

#[cfg(test)]
mod tests {
    use super::*;

    fn key(sport: u16) -> FlowKey {
        FlowKey {
            src: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst: [10, 0, 0, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            sport_be: sport.to_be(),
            dport_be: 80u16.to_be(),
            proto: crate::PROTO_TCP,
            family: crate::FAMILY_V4,
            _pad: [0; 2],
        }
    }

    #[test]
    fn hash_is_stable_across_builds() {
        // Golden value: changing the hash remaps every flow of a running fleet, so it must be a
        // deliberate change of this constant, never an accident.
        assert_eq!(flow_hash(&key(40000)), 0xb311_937d);
    }

    #[test]
    fn index_slot_of_an_ipv4_key_is_that_of_its_padded_form() {
        for a in [
            [10, 0, 0, 100],
            [192, 0, 2, 1],
            [255, 255, 255, 255],
            [0, 0, 0, 0],
        ] {
            for (port, proto) in [(80, 6), (53, 17), (65535, 6)] {
                let key = crate::VipKey::v4(a, port, proto);
                let slot = vip_index_slot(&key);
                let tail = vip_key_tail(key.port_be, key.proto, key.family);
                assert_eq!(
                    slot,
                    vip_index_slot_of(u32::from_le_bytes(a), tail),
                    "{a:?}"
                );
                assert!(slot < crate::VIP_INDEX_SLOTS);
            }
        }
    }

    #[test]
    fn ring_index_is_the_remainder() {
        let mut h: u32 = 0x1234_5678;
        for m in [
            2u32,
            3,
            7,
            1021,
            16381,
            65537,
            131_071,
            1_000_003,
            u32::MAX - 4,
        ] {
            let inverse = ring_size_inverse(m);
            for special in [0, 1, m - 1, m, m.wrapping_add(1), u32::MAX, u32::MAX - 1] {
                assert_eq!(
                    ring_index(special, m, inverse),
                    special % m,
                    "{special} % {m}"
                );
            }
            for _ in 0..200_000 {
                h = h.wrapping_mul(0x9e37_79b1).wrapping_add(0x7f4a_7c15);
                assert_eq!(ring_index(h, m, inverse), h % m, "{h} % {m}");
            }
        }
    }

    #[test]
    fn ipv6_hash_is_stable_and_ipv4_equals_the_general_form() {
        let mut v6 = key(40000);
        v6.family = crate::FAMILY_V6;
        v6.src[15] = 7;
        v6.dst[8] = 0x20;
        assert_eq!(
            flow_hash(&v6),
            0x0f0e_19c5,
            "the value of the hash before the IPv4 shortcut"
        );
        // The IPv4 shortcut is the general loop over zero padding.
        let v4 = key(40000);
        let mut as_v6 = v4;
        as_v6.family = crate::FAMILY_V6;
        assert_eq!(flow_hash(&v4), flow_hash(&as_v6));
    }

    #[test]
    fn hash_spreads_source_ports_evenly() {
        let mut buckets = [0u32; 16];
        for p in 0..16_000u16 {
            buckets[(flow_hash(&key(p)) % 16) as usize] += 1;
        }
        for (i, n) in buckets.iter().enumerate() {
            assert!(
                (900..=1100).contains(n),
                "bucket {i} has {n} of 16000 (expected ~1000)"
            );
        }
    }
}
