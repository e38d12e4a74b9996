//! Data-plane ids (VIP and backend slots) handed out and taken back across reloads.
//!
//! A released id goes to the back of the queue, so it is reused as late as possible: an idle
//! flow-table entry may still name it, and the later the reuse, the likelier that entry has aged
//! out of the LRU first.

use std::collections::VecDeque;

#[derive(Clone, Debug)]
pub struct IdPool {
    capacity: u32,
    /// Never handed out below this.
    next: u32,
    /// Released (or skipped) ids below `next`, oldest first.
    free: VecDeque<u32>,
}

impl IdPool {
    pub fn new(capacity: u32) -> Self {
        Self {
            capacity,
            next: 0,
            free: VecDeque::new(),
        }
    }

    /// A free id, or `None` when all `capacity` are in use.
    pub fn allocate(&mut self) -> Option<u32> {
        if self.next < self.capacity {
            self.next += 1;
            return Some(self.next - 1);
        }
        self.free.pop_front()
    }

    /// Marks `id` as in use (an id a restarted daemon found in the pinned maps). False if it is
    /// out of range or already in use.
    pub fn reserve(&mut self, id: u32) -> bool {
        if id >= self.capacity {
            return false;
        }
        if id >= self.next {
            self.free.extend(self.next..id);
            self.next = id + 1;
            return true;
        }
        match self.free.iter().position(|&f| f == id) {
            Some(at) => {
                self.free.remove(at);
                true
            }
            None => false,
        }
    }

    pub fn release(&mut self, id: u32) {
        debug_assert!(
            id < self.next && !self.free.contains(&id),
            "double release of {id}"
        );
        self.free.push_back(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_ids_first_then_released_ones_oldest_first() {
        let mut pool = IdPool::new(4);
        let ids: Vec<u32> = (0..4).map(|_| pool.allocate().unwrap()).collect();
        assert_eq!(ids, [0, 1, 2, 3]);
        assert_eq!(pool.allocate(), None, "all four in use");
        pool.release(2);
        pool.release(0);
        assert_eq!(pool.allocate(), Some(2));
        assert_eq!(pool.allocate(), Some(0));
        assert_eq!(pool.allocate(), None);
    }

    #[test]
    fn reserved_ids_are_skipped_and_the_gap_stays_usable() {
        let mut pool = IdPool::new(8);
        assert!(pool.reserve(3));
        assert!(!pool.reserve(3), "already in use");
        assert!(!pool.reserve(8), "out of range");
        assert!(pool.reserve(1));
        let ids: Vec<u32> = (0..6).map(|_| pool.allocate().unwrap()).collect();
        assert_eq!(ids, [4, 5, 6, 7, 0, 2]);
        assert_eq!(pool.allocate(), None);
    }
}
