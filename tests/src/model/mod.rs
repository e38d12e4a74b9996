//! A reference model of `lb_xdp`: what the program must do with one frame, given the maps'
//! contents. Written from the README and DESIGN §3, not from the program, and parsing with
//! `etherparse` instead of our parser, so the two cannot share a bug.
//!
//! parse (frame → 5-tuple or a pass reason) → balance (VIP, flow table, ring) → rewrite (verdict
//! and output bytes). Data flows one way: the model reads a [`MapsView`] and never writes it.

pub mod balance;
pub mod parse;
pub mod rewrite;

use std::collections::HashMap;

use lb_common::{Backend, FlowKey, FlowState, Reason, RingSlot, VipInfo, VipKey};

/// XDP verdicts, as the kernel numbers them.
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// What the model reads of the maps. The flow table is asked per frame (it changes with every
/// new flow); the rest is a snapshot taken after each control-plane change.
pub trait MapsView {
    fn vip(&self, key: &VipKey) -> Option<VipInfo>;
    /// `BACKENDS[id]`, `None` past the array's end.
    fn backend(&self, id: u32) -> Option<Backend>;
    /// `RINGS[slot]` (owner and prior), `None` past the array's end.
    fn ring_slot(&self, slot: u64) -> Option<RingSlot>;
    /// The ring size M the program was loaded with.
    fn ring_size(&self) -> u32;
    /// Whether `TX_PORTS[id]` holds an interface (a redirect to it succeeds).
    fn tx_port(&self, id: u32) -> bool;
    fn flow(&self, key: &FlowKey) -> Option<FlowState>;
}

/// A snapshot of every map but the flow table, taken after each control-plane change.
#[derive(Clone, Debug, Default)]
pub struct Tables {
    pub vips: HashMap<VipKey, VipInfo>,
    /// `BACKENDS`, the whole array.
    pub backends: Vec<Backend>,
    /// `RINGS`, the whole array: every VIP's two tables of `ring_size` slots.
    pub rings: Vec<RingSlot>,
    pub ring_size: u32,
    /// Per backend id: whether `TX_PORTS` holds an interface for it.
    pub tx_ports: Vec<bool>,
}

/// The tables plus the live flow table, asked through `flows` (one lookup per VIP packet).
pub struct View<'a, F: Fn(&FlowKey) -> Option<FlowState>> {
    pub tables: &'a Tables,
    pub flows: F,
}

impl<F: Fn(&FlowKey) -> Option<FlowState>> MapsView for View<'_, F> {
    fn vip(&self, key: &VipKey) -> Option<VipInfo> {
        self.tables.vips.get(key).copied()
    }
    fn backend(&self, id: u32) -> Option<Backend> {
        self.tables.backends.get(id as usize).copied()
    }
    fn ring_slot(&self, slot: u64) -> Option<RingSlot> {
        usize::try_from(slot)
            .ok()
            .and_then(|s| self.tables.rings.get(s))
            .copied()
    }
    fn ring_size(&self) -> u32 {
        self.tables.ring_size
    }
    fn tx_port(&self, id: u32) -> bool {
        self.tables
            .tx_ports
            .get(id as usize)
            .copied()
            .unwrap_or(false)
    }
    fn flow(&self, key: &FlowKey) -> Option<FlowState> {
        (self.flows)(key)
    }
}

/// A forwarded packet's effect on the maps, beyond the frame itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forwarded {
    pub vip_id: u32,
    pub backend_id: u32,
    /// Counted as a new flow (a TCP SYN, a flow chosen from the slot's owner, a new UDP flow).
    pub new_flow: bool,
    /// The flow table must now hold the flow on `backend_id`; when false it must be as it was
    /// (TCP in an unchanged slot: not touched at all).
    pub records: bool,
    pub key: FlowKey,
}

/// What the program must do with a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    pub verdict: u32,
    pub reason: Reason,
    /// New (destination, source) MACs; `None`: the frame leaves exactly as it arrived.
    pub macs: Option<([u8; 6], [u8; 6])>,
    pub forwarded: Option<Forwarded>,
}

impl Expected {
    /// The exact bytes the program must leave in the frame, written into `out` (reused).
    pub fn output_into(&self, frame: &[u8], out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(frame);
        if let Some((dst, src)) = self.macs {
            rewrite::set_macs(out, &dst, &src);
        }
    }
}

/// The whole model: one frame, the maps as they are before it.
pub fn expect(frame: &[u8], maps: &impl MapsView) -> Expected {
    match parse::parse(frame) {
        Ok(packet) => balance::forward(&packet, maps),
        Err(reason) => Expected {
            verdict: XDP_PASS,
            reason,
            macs: None,
            forwarded: None,
        },
    }
}
