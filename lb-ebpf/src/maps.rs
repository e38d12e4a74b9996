//! The maps shared with the daemon. Capacities here are placeholders: the daemon sets the real
//! ones at load time with `EbpfLoader::set_max_entries`.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_COMMON_LRU},
    macros::map,
    maps::{Array, DevMap, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use lb_common::{
    Backend, Counters, DEFAULT_FLOW_TABLE_SIZE, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS,
    DEFAULT_RING_SIZE, FLOW_EVENTS_BYTES, FlowKey, FlowState, Reason, RingSlot, TooBigBudget,
    VIP_INDEX_SLOTS, VipInfo, VipKey, VipSlot,
};

#[map]
pub static VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// Two Maglev tables per VIP (double buffer): table `t` occupies `[t*M, (t+1)*M)`. Mmapable so
/// the daemon writes a table without a syscall per slot.
#[map]
pub static RINGS: Array<RingSlot> =
    Array::with_max_entries(DEFAULT_MAX_VIPS * 2 * DEFAULT_RING_SIZE, BPF_F_MMAPABLE);

#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Per-CPU LRU lists: no shared lock between CPUs on insert.
#[map]
pub static FLOWS: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, BPF_F_NO_COMMON_LRU);

/// Never touched by the program: the daemon's sums of removed backends and VIPs (see
/// `lb_common::MAP_COUNTER_CARRY`), pinned with the counters they complete.
#[map]
pub static COUNTER_CARRY: Array<Counters> = Array::with_max_entries(DEFAULT_MAX_VIPS + 1, 0);

#[map]
pub static BACKEND_STATS: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

#[map]
pub static REASONS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(Reason::COUNT, 0);

#[map]
pub static TX_PORTS: DevMap = DevMap::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Direct-mapped copy of `VIPS` (see `vips`); fixed size, written by the daemon.
#[map]
pub static VIP_INDEX: Array<VipSlot> = Array::with_max_entries(VIP_INDEX_SLOTS, 0);

/// Flow events for the daemon's flow-state sync (see `events`).
#[map]
pub static FLOW_EVENTS: RingBuf = RingBuf::with_byte_size(FLOW_EVENTS_BYTES, 0);

/// Slot 0 nonzero: emit flow events. Written by the daemon.
#[map]
pub static FLOW_EVENTS_ON: Array<u32> = Array::with_max_entries(1, 0);

/// Slot 0: flow events that found `FLOW_EVENTS` full.
#[map]
pub static FLOW_EVENTS_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Slot 0: this CPU's ICMP "too big" answers in the current second (see `encap`).
#[map]
pub static TOO_BIG_BUDGET: PerCpuArray<TooBigBudget> = PerCpuArray::with_max_entries(1, 0);
