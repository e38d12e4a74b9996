//! What each `BACKENDS` slot was last written with, so a publish writes only the records that
//! changed (one syscall each: at 1000 backends, rewriting all costs a millisecond).
//!
//! Indexed by backend id, which the id pool hands out densely below `max_backends`: every
//! publish compares each backend of its VIP with its last record, and at 1000 backends hash
//! lookups made that comparison a tenth of a state change's millisecond.

use lb_common::Backend;

#[derive(Debug, Default)]
pub(super) struct WrittenRecords {
    by_id: Vec<Option<Backend>>,
}

impl WrittenRecords {
    pub(super) fn get(&self, id: u32) -> Option<&Backend> {
        self.by_id.get(id as usize)?.as_ref()
    }

    pub(super) fn insert(&mut self, id: u32, record: Backend) {
        let index = id as usize;
        if index >= self.by_id.len() {
            self.by_id.resize(index + 1, None);
        }
        self.by_id[index] = Some(record);
    }

    pub(super) fn remove(&mut self, id: u32) {
        if let Some(slot) = self.by_id.get_mut(id as usize) {
            *slot = None;
        }
    }

    /// Forgets everything: the next publish of each VIP rewrites all its records.
    pub(super) fn clear(&mut self) {
        self.by_id.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(vip_id: u32) -> Backend {
        Backend {
            vip_id,
            ..bytemuck::Zeroable::zeroed()
        }
    }

    #[test]
    fn holds_what_was_written_by_id() {
        let mut written = WrittenRecords::default();
        assert_eq!(written.get(7), None);
        written.insert(7, record(1));
        written.insert(2, record(3));
        assert_eq!(written.get(7), Some(&record(1)));
        assert_eq!(written.get(2), Some(&record(3)));
        assert_eq!(written.get(5), None, "an id between two written ones");
        written.insert(7, record(4));
        assert_eq!(written.get(7), Some(&record(4)), "the last write counts");
        written.remove(7);
        written.remove(1000);
        assert_eq!(written.get(7), None);
        assert_eq!(written.get(2), Some(&record(3)));
        written.clear();
        assert_eq!(written.get(2), None);
    }
}
