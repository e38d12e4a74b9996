//! Watching node B's flow table for the sampled flows: the time from a flow's t0 (just before
//! its packet left the generator) until its key is in B's pinned `FLOWS` map, found by key
//! lookup (one `bpf(BPF_MAP_LOOKUP_ELEM)` per pending key and round).
//!
//! Rounds are [`POLL`] apart (with the thread's timer slack cut to 1 µs), so a lag is
//! overstated by at most one round plus the lookups: a busy-polling watcher would take a core
//! from the daemons it measures on this 2-core machine.

use std::path::Path;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData, MapError};
use lb_common::{FlowKey, FlowState};

/// Pause between lookup rounds.
pub const POLL: Duration = Duration::from_micros(100);

/// What the watcher saw.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// Per sampled flow found on B: t0 to found.
    pub lags: Vec<Duration>,
    /// Sampled flows not found within the timeout.
    pub missed: usize,
    pub rounds: u64,
}

/// Looks up every sample `(key, t0)` that arrives on `samples` in the `FLOWS` map pinned at
/// `flows_pin` until found or `timeout` after its t0; returns when the sender is gone and
/// nothing is pending.
pub fn watch(
    flows_pin: &Path,
    samples: &Receiver<(FlowKey, Instant)>,
    timeout: Duration,
) -> Result<Seen> {
    let data = MapData::from_pin(flows_pin)
        .with_context(|| format!("opening the pinned {}", flows_pin.display()))?;
    let flows: HashMap<MapData, FlowKey, FlowState> = HashMap::try_from(Map::LruHashMap(data))
        .with_context(|| format!("{} is not an LRU hash of flows", flows_pin.display()))?;
    // SAFETY: prctl(PR_SET_TIMERSLACK) on this thread only; no memory is involved.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1_000 as libc::c_ulong);
    }
    let mut seen = Seen::default();
    let mut pending: Vec<(FlowKey, Instant)> = Vec::new();
    let mut open = true;
    while open || !pending.is_empty() {
        loop {
            match samples.try_recv() {
                Ok(sample) => pending.push(sample),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        let mut error = None;
        pending.retain(|(key, t0)| match flows.get(key, 0) {
            Ok(_) => {
                seen.lags.push(t0.elapsed());
                false
            }
            Err(MapError::KeyNotFound) if t0.elapsed() < timeout => true,
            Err(MapError::KeyNotFound) => {
                seen.missed += 1;
                false
            }
            Err(e) => {
                error.get_or_insert(e);
                true
            }
        });
        if let Some(e) = error {
            return Err(e).context("looking up a sampled flow on node B");
        }
        seen.rounds += 1;
        std::thread::sleep(POLL);
    }
    Ok(seen)
}
