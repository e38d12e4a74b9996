//! Map names, sizes, and the layout of every key and value.

/// `VIPS`: hash map `VipKey -> VipInfo`.
pub const MAP_VIPS: &str = "VIPS";
/// `RINGS`: mmapable array of `RingSlot`s, `max_vips * 2` Maglev tables of `RING_SIZE` slots each.
pub const MAP_RINGS: &str = "RINGS";
/// `BACKENDS`: array `backend id -> Backend`.
pub const MAP_BACKENDS: &str = "BACKENDS";
/// `FLOWS`: LRU hash `FlowKey -> FlowState` (connection tracking).
pub const MAP_FLOWS: &str = "FLOWS";
/// `COUNTER_CARRY`: array of `Counters` written only by the daemon: entry `vip id` holds what the
/// VIP's removed backends had counted, entry `max_vips` what removed VIPs had counted (the
/// program counts a forwarded packet once, on its backend; VIP and `tx` totals are sums).
pub const MAP_COUNTER_CARRY: &str = "COUNTER_CARRY";
/// `BACKEND_STATS`: per-CPU array `backend id -> Counters`.
pub const MAP_BACKEND_STATS: &str = "BACKEND_STATS";
/// `REASONS`: per-CPU array `Reason -> Counters`.
pub const MAP_REASONS: &str = "REASONS";
/// `TX_PORTS`: devmap `backend id -> egress ifindex`, for backends behind another interface.
pub const MAP_TX_PORTS: &str = "TX_PORTS";
/// Per-CPU `TooBigBudget` of ICMP "too big" answers (encapsulating VIPs).
pub const MAP_TOO_BIG_BUDGET: &str = "TOO_BIG_BUDGET";
/// `VIP_INDEX`: array of `VIP_INDEX_SLOTS` [`VipSlot`]s, a direct-mapped copy of `VIPS` indexed
/// by [`vip_index_slot`](crate::vip_index_slot): one array read and a key comparison find a
/// VIP (or tell that a packet is for none) without hashing the key into `VIPS`. A VIP whose slot
/// another VIP holds is found in `VIPS` (the slot is marked `VIP_SLOT_OVERFLOW`).
pub const MAP_VIP_INDEX: &str = "VIP_INDEX";
/// Slots of `VIP_INDEX` (a power of two): with 64 VIPs, about 1.5% share a slot.
pub const VIP_INDEX_SLOTS: u32 = 4096;

/// `FLOW_EVENTS`: BPF ring buffer of [`FlowEvent`]s, one per flow the data plane records in
/// `FLOWS` (flow-state replication, issue 12), written only while `FLOW_EVENTS_ON` is set.
pub const MAP_FLOW_EVENTS: &str = "FLOW_EVENTS";
/// `FLOW_EVENTS_ON`: 1-entry array of `u32`; nonzero: the data plane emits flow events. The
/// daemon sets it when `[sync]` is configured; while it is zero the program does no ring-buffer
/// work at all.
pub const MAP_FLOW_EVENTS_ON: &str = "FLOW_EVENTS_ON";
/// `FLOW_EVENTS_LOST`: 1-entry per-CPU array of `u64`: flow events that found `FLOW_EVENTS`
/// full (the daemon sums the CPUs).
pub const MAP_FLOW_EVENTS_LOST: &str = "FLOW_EVENTS_LOST";
/// Bytes of `FLOW_EVENTS` (the kernel wants a power-of-two multiple of the page size). Each
/// event takes 56 bytes of it (an 8-byte record header and the 48-byte [`FlowEvent`]), so 4 MiB
/// hold about 74,900 events: 1.5 s of 50,000 new flows per second, so a daemon that falls
/// behind by about a second (a busy runtime, a slow peer) loses nothing; 2 MiB would hold only
/// 0.75 s, and 4 MiB is small beside FLOWS. What does not fit is counted in `FLOW_EVENTS_LOST`.
pub const FLOW_EVENTS_BYTES: u32 = 4 << 20;
/// Bytes one [`FlowEvent`] takes in `FLOW_EVENTS` (the kernel's 8-byte header included).
pub const FLOW_EVENT_RECORD_BYTES: u32 = 8 + core::mem::size_of::<FlowEvent>() as u32;

/// Read-only global: Maglev ring size M (a prime). Set at load time with `EbpfLoader::set_global`.
pub const GLOBAL_RING_SIZE: &str = "RING_SIZE";
/// Read-only global: [`ring_size_inverse`](crate::ring_size_inverse) of `RING_SIZE`, so the data
/// plane reduces the flow hash modulo M with multiplications instead of a 64-bit division.
pub const GLOBAL_RING_SIZE_INVERSE: &str = "RING_SIZE_INVERSE";

/// Compiled-in map capacities; the daemon overrides them at load time from the config.
pub const DEFAULT_MAX_VIPS: u32 = 64;
pub const DEFAULT_MAX_BACKENDS: u32 = 4096;
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 1 << 20;
/// Katran's default: a prime comfortably above 100 × the backends of a typical VIP.
pub const DEFAULT_RING_SIZE: u32 = 65537;

/// A flow's `last_seen_ns` is rewritten only when it is older than this, so established flows do
/// not bounce the entry's cache line between CPUs on every packet.
pub const FLOW_REFRESH_NS: u64 = 1_000_000_000;

/// A ring slot holding this value has no backend (the VIP has none to offer).
pub const NO_BACKEND: u32 = u32::MAX;

/// `RingSlot::prior` of a changed slot whose prior owner was removed: the connections it had
/// are gone, so unrecorded packets go to the owner. Never a backend id (ids stay below
/// `NO_BACKEND - 1`, see the daemon's `max_backends` bound), so it is never "up in the VIP".
pub const PRIOR_GONE: u32 = NO_BACKEND - 1;

/// Address families as stored in keys (values of `AF_INET`/`AF_INET6` on Linux).
pub const FAMILY_V4: u8 = 2;
pub const FAMILY_V6: u8 = 10;

/// IP protocol numbers.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// `VipKey`: what a packet is matched on. IPv4 addresses sit in the first 4 bytes of `addr`, the
/// rest zero; `port` is in network byte order, exactly as it is on the wire.
///
/// Aligned to 4 (the layout is the same): BPF has no unaligned loads, so with byte arrays at
/// alignment 1 LLVM copies and hashes keys a byte at a time (hundreds of instructions per packet).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VipKey {
    pub addr: [u8; 16],
    pub port_be: u16,
    pub proto: u8,
    pub family: u8,
}

/// `VipInfo`: per-VIP record. The daemon writes a new Maglev table into ring `2*id + (1-active)`
/// and then flips `active_ring` with one update of this record, so no packet sees a half table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipInfo {
    /// Slot of this VIP in `COUNTER_CARRY` and in `RINGS` (tables `2*id` and `2*id + 1`).
    pub id: u32,
    /// `VIP_F_*` bits.
    pub flags: u32,
    /// Which of the VIP's two tables is live: 0 or 1.
    pub active_ring: u32,
    /// `VIP_F_ENCAP_GUE`: the UDP destination port on the backend, network byte order.
    pub gue_port_be: u16,
    pub _pad: u16,
}

/// `VipSlot`: one slot of `VIP_INDEX`. The daemon writes a slot's key and record first and sets
/// `VIP_SLOT_VALID` with a second write, and clears the bit before the VIP goes, so a reader that
/// sees the bit sees the key and record it came with; a record update of the same VIP changes
/// only small fields (`active_ring`, `flags`) of a slot that stays valid.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipSlot {
    pub key: VipKey,
    /// `VIP_SLOT_*` bits.
    pub state: u32,
    pub info: VipInfo,
}

/// `VipSlot::state`: `key` and `info` are a VIP's.
pub const VIP_SLOT_VALID: u32 = 1 << 0;
/// `VipSlot::state`: some VIP of this slot is not in it; look keys that do not match up in `VIPS`.
pub const VIP_SLOT_OVERFLOW: u32 = 1 << 1;

/// `Backend`: where and how to send a packet chosen for this backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    pub addr: [u8; 16],
    /// The backend's MAC (destination of the rewritten frame).
    pub dst_mac: [u8; 6],
    /// The MAC of the interface the frame leaves by (source of the rewritten frame).
    pub src_mac: [u8; 6],
    /// `BACKEND_F_*` bits.
    pub flags: u32,
    /// Egress interface; used when `BACKEND_F_REDIRECT` is set.
    pub ifindex: u32,
    /// The VIP this backend serves (its `VipInfo::id`).
    pub vip_id: u32,
    /// Encapsulating VIPs: the outer source address (this node's address towards the backend;
    /// IPv4 in the first 4 bytes), the family of `addr` and of this address being
    /// `BACKEND_F_ADDR_V6`.
    pub encap_src: [u8; 16],
    /// Encapsulating VIPs: the MTU of the egress interface; an encapsulated packet longer than
    /// this gets an ICMP "too big" answer instead (see [`TOO_BIG_QUOTE`]).
    pub mtu: u16,
    pub _pad: u16,
}

/// `VipInfo::flags`: when the VIP has no usable backend, pass its packets to the host stack
/// (where a local "sorry" service may answer) instead of dropping them.
pub const VIP_F_PASS_WHEN_EMPTY: u32 = 1 << 0;
/// `VipInfo::flags`: `forward = "ipip"`: packets go to the backend inside an outer IP header
/// (IPv4 in IPv4, IPv6 in IPv6, IPv4 in IPv6), from `Backend::encap_src` to `Backend::addr`.
pub const VIP_F_ENCAP_IPIP: u32 = 1 << 1;
/// `VipInfo::flags`: `forward = "gue"`: as `VIP_F_ENCAP_IPIP` with a UDP header between
/// (destination port `VipInfo::gue_port_be`, source port [`gue_source_port`], checksum 0), the
/// inner packet right after it: GUE's "direct IP" form (variant 1), which Linux's fou accepts.
pub const VIP_F_ENCAP_GUE: u32 = 1 << 2;
/// Either encapsulation.
pub const VIP_F_ENCAP: u32 = VIP_F_ENCAP_IPIP | VIP_F_ENCAP_GUE;

/// GUE's UDP source port: `0xc000 | (flow_hash & 0x3fff)`, an ephemeral-range port that differs
/// between flows, so a backend's NIC spreads the flows over its receive queues (RSS hashes the
/// outer header only).
pub const fn gue_source_port(flow_hash: u32) -> u16 {
    GUE_SOURCE_PORT_BASE | (flow_hash as u16 & GUE_SOURCE_PORT_MASK)
}
pub const GUE_SOURCE_PORT_BASE: u16 = 0xc000;
pub const GUE_SOURCE_PORT_MASK: u16 = 0x3fff;

/// The outer IPv6 flow label of an encapsulated packet: the low 20 bits of the flow hash (for
/// ECMP and RSS on the way to the backend).
pub const fn encap_flow_label(flow_hash: u32) -> u32 {
    flow_hash & 0x000f_ffff
}

/// Bytes of the client's packet an ICMP "fragmentation needed" / ICMPv6 "packet too big" answer
/// quotes (its IP header and the start of its payload: enough for the client to find the
/// connection). A packet too big for an MTU of at least 576 is always longer than this.
pub const TOO_BIG_QUOTE: usize = 128;
/// ICMP "too big" answers each CPU sends per second at most; the rest of the too-big packets are
/// dropped (`drop_too_big`), as routers rate-limit ICMP.
pub const TOO_BIG_PER_CPU_PER_SEC: u32 = 1000;
/// The TTL / hop limit of an ICMP "too big" answer.
pub const TOO_BIG_TTL: u8 = 64;
/// The TOS of an ICMP "fragmentation needed" answer: precedence "internetwork control", as
/// Linux's own ICMP errors carry.
pub const TOO_BIG_TOS: u8 = 0xc0;

/// `TooBigBudget`: one per CPU (`TOO_BIG_BUDGET[0]`): ICMP "too big" answers sent in the current
/// one-second window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TooBigBudget {
    pub window_start_ns: u64,
    pub sent: u32,
    pub _pad: u32,
}

/// The backend may receive traffic: flows pinned to a backend without this bit are re-chosen.
pub const BACKEND_F_UP: u32 = 1 << 0;
/// The backend sits behind another interface: redirect through `TX_PORTS[id]` instead of `XDP_TX`.
pub const BACKEND_F_REDIRECT: u32 = 1 << 1;
/// The operator drained the backend (`lb drain`). The data plane ignores this bit; it is kept in
/// the pinned map so a restarted daemon knows.
pub const BACKEND_F_DRAINED: u32 = 1 << 2;
/// The operator disabled the backend (`lb disable`); ignored by the data plane like
/// `BACKEND_F_DRAINED` (a disabled backend simply has no `BACKEND_F_UP`).
pub const BACKEND_F_DISABLED: u32 = 1 << 3;
/// The backend's checks took it down, but its established flows are held on it for a moment
/// (several nodes: see the daemon's flow hold); it carries `BACKEND_F_UP` meanwhile. Ignored by
/// the data plane; a restarted daemon reads it as "not up".
pub const BACKEND_F_HELD: u32 = 1 << 4;
/// `Backend::addr` and `Backend::encap_src` are IPv6 addresses (encapsulating VIPs: the outer
/// header is IPv6).
pub const BACKEND_F_ADDR_V6: u32 = 1 << 5;

/// `RingSlot`: one Maglev slot. `RINGS` is memory-mapped by the daemon (`BPF_F_MMAPABLE`), so
/// it writes a whole table with one memcpy-like pass instead of 65537 syscalls, and one aligned
/// 8-byte store changes a slot for readers at once.
///
/// TCP (DESIGN §8): a slot whose owner has not changed (`prior == NO_BACKEND`) sends every
/// packet to `owner` without touching the flow table: the ring alone gives an established
/// connection its backend. In a changed slot the flow table decides; a packet of a connection it
/// has not recorded (one that began before the change) goes to `prior`, the owner the slot had
/// when it was last unchanged, if that backend is still up in the VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingSlot {
    /// Backend id that new flows get, or `NO_BACKEND`.
    pub owner: u32,
    /// `NO_BACKEND` while the slot is unchanged; otherwise the owner it had before it changed
    /// (which may equal `owner` again, after A to B and back to A: connections that began on B
    /// are in the flow table and must still be looked up).
    pub prior: u32,
}

impl RingSlot {
    /// A slot whose owner has not changed within the idle window.
    pub const fn unchanged(owner: u32) -> Self {
        Self {
            owner,
            prior: NO_BACKEND,
        }
    }

    /// Whether the flow table must be consulted for TCP packets in this slot.
    pub const fn is_changed(&self) -> bool {
        self.prior != NO_BACKEND
    }
}

/// `FlowKey`: a connection's 5-tuple as seen on the wire (ports in network byte order).
/// Aligned to 8 for word-sized copies and hash loads (see [`VipKey`]); the layout is the same.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// `FlowState`: the backend a connection is pinned to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowState {
    pub backend: u32,
    pub vip_id: u32,
    /// `bpf_ktime_get_coarse_ns()` (tick resolution, cheap) of the last refresh (refreshed at
    /// most every `FLOW_REFRESH_NS`).
    pub last_seen_ns: u64,
}

/// `FlowEvent`: one record of `FLOW_EVENTS`: a flow the data plane just recorded in `FLOWS`
/// (new, or re-chosen because its backend went), and the backend and VIP it was given: what a
/// peer needs to insert the same entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    pub key: FlowKey,
    pub backend: u32,
    pub vip_id: u32,
}

/// `Counters`: one per backend and per reason, per CPU (the daemon sums the CPUs), and the
/// daemon's carries of removed backends and VIPs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    /// New flows assigned (backend counters and the VIP totals made of them only).
    pub new_flows: u64,
}

/// Field by field: the daemon sums CPUs, and backends into VIP totals.
impl core::ops::Add for Counters {
    type Output = Counters;

    fn add(self, other: Counters) -> Counters {
        let Counters {
            packets,
            bytes,
            new_flows,
        } = other;
        Counters {
            packets: self.packets + packets,
            bytes: self.bytes + bytes,
            new_flows: self.new_flows + new_flows,
        }
    }
}

const _: () = {
    assert!(core::mem::size_of::<VipKey>() == 20);
    assert!(core::mem::size_of::<VipInfo>() == 16);
    assert!(core::mem::size_of::<Backend>() == 60);
    assert!(core::mem::size_of::<TooBigBudget>() == 16);
    assert!(core::mem::size_of::<VipSlot>() == 40);
    // The data plane copies both MACs as six 16-bit words starting at `dst_mac`.
    assert!(core::mem::offset_of!(Backend, dst_mac) == 16);
    assert!(core::mem::offset_of!(Backend, src_mac) == 22);
    assert!(core::mem::offset_of!(Backend, encap_src) == 40);
    assert!(core::mem::offset_of!(Backend, mtu) == 56);
    assert!(core::mem::size_of::<RingSlot>() == 8);
    assert!(core::mem::size_of::<FlowKey>() == 40);
    assert!(core::mem::offset_of!(FlowKey, sport_be) == 32);
    assert!(core::mem::offset_of!(VipKey, port_be) == 16);
    assert!(core::mem::size_of::<FlowState>() == 16);
    assert!(core::mem::size_of::<Counters>() == 24);
    assert!(core::mem::size_of::<FlowEvent>() == 48);
    // The ring buffer aligns records to 8 bytes.
    assert!(core::mem::align_of::<FlowEvent>() == 8);
    // The data plane writes an event as the key's five words and then backend | vip_id << 32.
    assert!(core::mem::offset_of!(FlowEvent, backend) == 40);
    assert!(core::mem::offset_of!(FlowEvent, vip_id) == 44);
};

#[cfg(feature = "user")]
mod user {
    use super::*;

    macro_rules! pod {
        ($($t:ty),*) => {$(
            // SAFETY: every field is an integer or an integer array, the struct is `repr(C)` and
            // its padding is explicit (size asserted above), so any bit pattern is valid and no
            // byte is uninitialised.
            unsafe impl aya::Pod for $t {}
            // SAFETY: as above.
            unsafe impl bytemuck::Zeroable for $t {}
            // SAFETY: as above.
            unsafe impl bytemuck::Pod for $t {}
        )*};
    }
    pod!(
        VipKey,
        VipInfo,
        VipSlot,
        Backend,
        RingSlot,
        FlowKey,
        FlowState,
        Counters,
        FlowEvent,
        TooBigBudget
    );
}

/// An IPv4 address as the maps hold it: in the first 4 of 16 bytes, the rest zero.
pub const fn ipv4_in_16(addr: [u8; 4]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[0] = addr[0];
    a[1] = addr[1];
    a[2] = addr[2];
    a[3] = addr[3];
    a
}

impl VipKey {
    /// Key for an IPv4 VIP; `port` in host byte order.
    pub const fn v4(addr: [u8; 4], port: u16, proto: u8) -> Self {
        Self {
            addr: ipv4_in_16(addr),
            port_be: port.to_be(),
            proto,
            family: FAMILY_V4,
        }
    }

    /// Key for an IPv6 VIP; `port` in host byte order.
    pub const fn v6(addr: [u8; 16], port: u16, proto: u8) -> Self {
        Self {
            addr,
            port_be: port.to_be(),
            proto,
            family: FAMILY_V6,
        }
    }
}

impl FlowKey {
    /// The VIP this flow is addressed to.
    pub const fn vip_key(&self) -> VipKey {
        VipKey {
            addr: self.dst,
            port_be: self.dport_be,
            proto: self.proto,
            family: self.family,
        }
    }
}
