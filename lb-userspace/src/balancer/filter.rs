//! The `VIP_FILTER` bitmap in front of the data plane's `VIPS` lookup. It must always hold a
//! bit for every address in `VIPS` (a clear bit passes the packet to the host without a lookup),
//! so a VIP's bit is set before its record goes in, and bits are cleared only by a rebuild from
//! the records that are left. A stale set bit only costs a `VIPS` lookup.

use lb_common::{VIP_FILTER_WORDS, VipKey, vip_filter_bit};

use super::{Balancer, PublishError};

impl Balancer {
    /// The words as the map holds them, read once.
    fn filter_words(&mut self) -> &mut Vec<u64> {
        let map = &self.dataplane.maps.vip_filter;
        self.filter.get_or_insert_with(|| {
            (0..VIP_FILTER_WORDS)
                .map(|i| map.get(&i, 0).unwrap_or(u64::MAX))
                .collect()
        })
    }

    fn write_filter_word(&mut self, index: u32, word: u64) -> Result<(), PublishError> {
        self.map_write("VIP_FILTER")?;
        self.dataplane
            .maps
            .vip_filter
            .set(index, word, 0)
            .map_err(|source| PublishError::Map {
                what: "VIP_FILTER",
                source,
            })?;
        self.filter_words()[index as usize] = word;
        Ok(())
    }

    /// Sets the bit of `key`'s address; called before its VIP record is written.
    pub(super) fn filter_admit(&mut self, key: &VipKey) -> Result<(), PublishError> {
        let bit = vip_filter_bit(&key.addr);
        let (index, mask) = (bit / 64, 1u64 << (bit % 64));
        let word = self.filter_words()[index as usize];
        if word & mask == 0 {
            self.write_filter_word(index, word | mask)?;
        }
        Ok(())
    }

    /// Makes the filter hold exactly the bits of the addresses in `VIPS`: called after records
    /// went out (a reload removed VIPs, a restart dropped stale ones).
    pub(super) fn filter_rebuild(&mut self) -> Result<(), PublishError> {
        let mut wanted = vec![0u64; VIP_FILTER_WORDS as usize];
        for key in self.dataplane.maps.vips.keys() {
            let key = key.map_err(|source| PublishError::Map {
                what: "VIPS",
                source,
            })?;
            let bit = vip_filter_bit(&key.addr);
            wanted[(bit / 64) as usize] |= 1 << (bit % 64);
        }
        for (index, word) in wanted.into_iter().enumerate() {
            if self.filter_words()[index] != word {
                self.write_filter_word(index as u32, word)?;
            }
        }
        Ok(())
    }
}
