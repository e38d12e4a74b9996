//! Typed handles on every map of the XDP object, taken out of the loaded `Ebpf` so the daemon
//! owns them independently of the program.

use aya::{
    Ebpf,
    maps::{Array, DevMap, HashMap, Map, MapData, PerCpuArray, PerCpuValues, RingBuf},
};
use lb_common::{
    Backend, Counters, FlowKey, FlowState, MAP_BACKEND_STATS, MAP_BACKENDS, MAP_COUNTER_CARRY,
    MAP_FLOW_EVENTS, MAP_FLOW_EVENTS_LOST, MAP_FLOW_EVENTS_ON, MAP_FLOWS, MAP_REASONS, MAP_RINGS,
    MAP_TX_PORTS, MAP_VIP_INDEX, MAP_VIPS, Reason, VipInfo, VipKey, VipSlot,
};

use super::{
    error::{DataPlaneError, map_err},
    flow_events::FlowEvents,
    ring::RingMemory,
};

pub struct Maps {
    pub vips: HashMap<MapData, VipKey, VipInfo>,
    pub backends: Array<MapData, Backend>,
    pub rings: RingMemory,
    pub flows: HashMap<MapData, FlowKey, FlowState>,
    /// What removed backends (per VIP) and removed VIPs (last entry) had counted; written only
    /// here (see [`crate::balancer`]'s counter carry).
    counter_carry: Array<MapData, Counters>,
    pub backend_stats: PerCpuArray<MapData, Counters>,
    pub reasons: PerCpuArray<MapData, Counters>,
    pub tx_ports: DevMap<MapData>,
    /// The direct-mapped copy of `vips` the data plane reads first (written by `Balancer`, see
    /// `balancer::vip_index`).
    pub vip_index: Array<MapData, VipSlot>,
    /// `FLOW_EVENTS` until [`Maps::take_flow_events`] moves it out to its reader.
    flow_events: Option<RingBuf<MapData>>,
    /// Slot 0 nonzero: the data plane emits flow events.
    flow_events_on: Array<MapData, u32>,
    /// Per CPU: flow events that found the ring full.
    flow_events_lost: PerCpuArray<MapData, u64>,
    /// Keeps the `RINGS` map (and so the memory behind `rings`) alive.
    _rings_map: MapData,
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, DataPlaneError> {
    ebpf.take_map(name).ok_or(DataPlaneError::MissingMap(name))
}

impl Maps {
    pub(super) fn take(
        ebpf: &mut Ebpf,
        ring_size: u32,
        ring_tables: u32,
    ) -> Result<Self, DataPlaneError> {
        let rings_map = match take(ebpf, MAP_RINGS)? {
            Map::Array(data) => data,
            _ => return Err(DataPlaneError::MissingMap(MAP_RINGS)),
        };
        let rings = RingMemory::map(rings_map.fd(), ring_size, ring_tables)?;
        Ok(Self {
            vips: HashMap::try_from(take(ebpf, MAP_VIPS)?).map_err(map_err(MAP_VIPS))?,
            backends: Array::try_from(take(ebpf, MAP_BACKENDS)?).map_err(map_err(MAP_BACKENDS))?,
            rings,
            flows: HashMap::try_from(take(ebpf, MAP_FLOWS)?).map_err(map_err(MAP_FLOWS))?,
            counter_carry: Array::try_from(take(ebpf, MAP_COUNTER_CARRY)?)
                .map_err(map_err(MAP_COUNTER_CARRY))?,
            backend_stats: PerCpuArray::try_from(take(ebpf, MAP_BACKEND_STATS)?)
                .map_err(map_err(MAP_BACKEND_STATS))?,
            reasons: PerCpuArray::try_from(take(ebpf, MAP_REASONS)?)
                .map_err(map_err(MAP_REASONS))?,
            tx_ports: DevMap::try_from(take(ebpf, MAP_TX_PORTS)?).map_err(map_err(MAP_TX_PORTS))?,
            vip_index: Array::try_from(take(ebpf, MAP_VIP_INDEX)?)
                .map_err(map_err(MAP_VIP_INDEX))?,
            flow_events: Some(
                RingBuf::try_from(take(ebpf, MAP_FLOW_EVENTS)?)
                    .map_err(map_err(MAP_FLOW_EVENTS))?,
            ),
            flow_events_on: Array::try_from(take(ebpf, MAP_FLOW_EVENTS_ON)?)
                .map_err(map_err(MAP_FLOW_EVENTS_ON))?,
            flow_events_lost: PerCpuArray::try_from(take(ebpf, MAP_FLOW_EVENTS_LOST)?)
                .map_err(map_err(MAP_FLOW_EVENTS_LOST))?,
            _rings_map: rings_map,
        })
    }

    /// Sum over CPUs of one slot of a per-CPU counter array.
    fn sum(
        map: &PerCpuArray<MapData, Counters>,
        name: &'static str,
        index: u32,
    ) -> Result<Counters, DataPlaneError> {
        let per_cpu = map.get(&index, 0).map_err(map_err(name))?;
        Ok(per_cpu.iter().fold(Counters::default(), |sum, &c| sum + c))
    }

    /// Entry `index` of the counter carry: a VIP id, or `max_vips` for removed VIPs.
    pub fn carry(&self, index: u32) -> Result<Counters, DataPlaneError> {
        self.counter_carry
            .get(&index, 0)
            .map_err(map_err(MAP_COUNTER_CARRY))
    }

    /// Sets entry `index` of the counter carry.
    pub fn set_carry(&mut self, index: u32, carry: Counters) -> Result<(), DataPlaneError> {
        self.counter_carry
            .set(index, carry, 0)
            .map_err(map_err(MAP_COUNTER_CARRY))
    }

    pub fn backend_counters(&self, backend_id: u32) -> Result<Counters, DataPlaneError> {
        Self::sum(&self.backend_stats, MAP_BACKEND_STATS, backend_id)
    }

    pub fn reason_counters(&self, reason: Reason) -> Result<Counters, DataPlaneError> {
        Self::sum(&self.reasons, MAP_REASONS, reason as u32)
    }

    /// Number of entries in the flow table (reads the whole table in batches: for start-up
    /// logs and tests, not the hot path).
    pub fn flow_count(&self) -> Result<usize, DataPlaneError> {
        Ok(super::flows::read_flows(&self.flows)?.len())
    }
}

impl Maps {
    /// Zeroes a new backend's counters: its id is new (a reload added it), and whatever a
    /// previous backend counted in that slot is not its traffic. Returns what they held, per
    /// CPU, for a rolled-back reload to put back ([`Maps::put_backend_counters`]).
    pub fn take_backend_counters(
        &mut self,
        backend_id: u32,
    ) -> Result<PerCpuValues<Counters>, DataPlaneError> {
        let held = self
            .backend_stats
            .get(&backend_id, 0)
            .map_err(map_err(MAP_BACKEND_STATS))?;
        let cpus = aya::util::nr_cpus().map_err(|(_, io)| DataPlaneError::PossibleCpus(io))?;
        let zeros = PerCpuValues::try_from(vec![Counters::default(); cpus])
            .map_err(DataPlaneError::PossibleCpus)?;
        self.put_backend_counters(backend_id, zeros)?;
        Ok(held)
    }

    /// Writes a backend's per-CPU counters (see [`Maps::take_backend_counters`]).
    pub fn put_backend_counters(
        &mut self,
        backend_id: u32,
        values: PerCpuValues<Counters>,
    ) -> Result<(), DataPlaneError> {
        self.backend_stats
            .set(backend_id, values, 0)
            .map_err(map_err(MAP_BACKEND_STATS))
    }
}

impl Maps {
    /// Moves the flow-event reader out (once; a second call is an error), registered with the
    /// current tokio runtime, which must have IO enabled (tokio panics otherwise). The ring keeps
    /// filling while nobody reads it: events that find it full are counted, not kept.
    pub fn take_flow_events(&mut self) -> Result<FlowEvents, DataPlaneError> {
        let ring = self
            .flow_events
            .take()
            .ok_or(DataPlaneError::FlowEventsTaken)?;
        FlowEvents::new(ring).map_err(DataPlaneError::FlowEventsPoll)
    }

    /// Turns flow events on or off (`FLOW_EVENTS_ON`). Off, the data plane does no ring-buffer
    /// work; the switch is pinned with the maps, so a restarted daemon must set it again from
    /// its config.
    pub fn set_flow_events(&mut self, on: bool) -> Result<(), DataPlaneError> {
        self.flow_events_on
            .set(0, u32::from(on), 0)
            .map_err(map_err(MAP_FLOW_EVENTS_ON))
    }

    /// Whether the data plane emits flow events.
    pub fn flow_events_on(&self) -> Result<bool, DataPlaneError> {
        let on = self
            .flow_events_on
            .get(&0, 0)
            .map_err(map_err(MAP_FLOW_EVENTS_ON))?;
        Ok(on != 0)
    }

    /// Flow events the data plane could not reserve (ring full), summed over the CPUs, since
    /// the map was created (pinned maps keep counting across daemons).
    pub fn flow_events_lost(&self) -> Result<u64, DataPlaneError> {
        let per_cpu = self
            .flow_events_lost
            .get(&0, 0)
            .map_err(map_err(MAP_FLOW_EVENTS_LOST))?;
        Ok(per_cpu.iter().sum())
    }
}
