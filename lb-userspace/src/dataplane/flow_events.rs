//! The reader of `FLOW_EVENTS` (issue 12): the flows the data plane records, as it records them,
//! for the sync service to send to the peers. Taken out of the [`Maps`](super::maps::Maps) once
//! ([`Maps::take_flow_events`](super::maps::Maps::take_flow_events)) and moved to its own task.
//!
//! The program emits only while `FLOW_EVENTS_ON` is set
//! ([`Maps::set_flow_events`](super::maps::Maps::set_flow_events)), and counts what found the
//! ring full in `FLOW_EVENTS_LOST`
//! ([`Maps::flow_events_lost`](super::maps::Maps::flow_events_lost)).

use std::io;

use aya::maps::{MapData, RingBuf};
use lb_common::FlowEvent;
use tokio::io::unix::AsyncFd;

/// `FLOW_EVENTS`, registered with the tokio reactor. `Send`: it can live in its own task.
pub struct FlowEvents {
    ring: AsyncFd<RingBuf<MapData>>,
    /// Records of another size than a [`FlowEvent`]: written by another build's program into an
    /// adopted ring (its value layout is not part of the pin check), skipped.
    foreign: u64,
}

impl std::fmt::Debug for FlowEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowEvents")
            .field("foreign", &self.foreign)
            .finish_non_exhaustive()
    }
}

impl FlowEvents {
    /// Registers the ring with the current tokio runtime, which must have IO enabled (tokio
    /// panics otherwise).
    pub(super) fn new(ring: RingBuf<MapData>) -> io::Result<Self> {
        // SAFETY: the `RingBuf` owns the map's `MapData`, which owns its fd: it stays open and
        // the same for as long as the `AsyncFd` holds the ring, and `as_raw_fd` always returns it.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Self { ring, foreign: 0 })
    }

    /// Waits until at least one event is there, then appends every available event to `out`.
    ///
    /// Cancel-safe: an event is appended to `out` in the same step that consumes it.
    pub async fn readable_batch(&mut self, out: &mut Vec<FlowEvent>) -> io::Result<()> {
        loop {
            let mut guard = self.ring.readable_mut().await?;
            let read = drain_ring(guard.get_inner_mut(), &mut self.foreign, out);
            // The ring is empty now. The kernel wakes the reader when a record is submitted
            // to a ring it had caught up with (adaptive wake-up), and tokio keeps a wake-up
            // that came after this guard's readiness, so clearing cannot lose one.
            guard.clear_ready();
            if read > 0 {
                return Ok(());
            }
        }
    }

    /// Appends every event available now to `out` without waiting; returns how many.
    pub fn drain(&mut self, out: &mut Vec<FlowEvent>) -> usize {
        drain_ring(self.ring.get_mut(), &mut self.foreign, out)
    }

    /// Records skipped because they were not [`FlowEvent`]-sized (see the field).
    pub fn foreign_records(&self) -> u64 {
        self.foreign
    }
}

fn drain_ring(ring: &mut RingBuf<MapData>, foreign: &mut u64, out: &mut Vec<FlowEvent>) -> usize {
    let mut read = 0;
    while let Some(record) = ring.next() {
        // Dropping `record` advances the consumer position past it.
        match bytemuck::try_pod_read_unaligned::<FlowEvent>(&record) {
            Ok(event) => {
                out.push(event);
                read += 1;
            }
            Err(_) => *foreign += 1,
        }
    }
    read
}
