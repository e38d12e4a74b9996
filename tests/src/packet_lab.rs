//! Runs the real XDP program on hand-built frames through `BPF_PROG_TEST_RUN`, with real maps
//! filled by the daemon's own `Balancer` from a config. No namespace or NIC involved.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use aya::{TestRun as _, TestRunOptions};
use lb::{
    balancer::{
        Adopted, Balancer, Change, L2Path, ReconcileError, TunnelEnd, capacity_of, ring_for,
        vip_key,
    },
    config::Config,
    dataplane::DataPlane,
    health::Health,
};
use lb_common::{FAMILY_V4, FAMILY_V6, FlowKey, FlowState, RingSlot, flow_hash};

use crate::frames::LB_MAC;

/// XDP verdicts.
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// The tunnel source the lab gives encapsulated backends (as if the route to them said so).
pub const LAB_TUNNEL_SOURCE_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const LAB_TUNNEL_SOURCE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// The egress MTU the lab gives encapsulated backends.
pub const LAB_MTU: u16 = 1500;

/// The MAC the lab gives backend number `id`.
pub fn backend_mac(id: u32) -> [u8; 6] {
    [0x02, 0xbe, 0, 0, (id >> 8) as u8, id as u8]
}

pub struct PacketLab {
    pub balancer: Balancer,
}

impl PacketLab {
    /// Loads the program with the capacities of `config_toml`, marks every backend healthy and
    /// gives it a known path (`backend_mac(id)`, same interface, so `XDP_TX`).
    pub fn new(config_toml: &str) -> Self {
        let config = Config::parse(config_toml, Path::new("lab.toml"))
            .unwrap_or_else(|e| panic!("lab config is invalid: {e}"));
        let dataplane = DataPlane::load(capacity_of(&config))
            .unwrap_or_else(|e| panic!("loading the XDP program failed (run as root): {e:#}"));
        let balancer = Balancer::new(dataplane, &config).expect("the model of a valid config");
        let mut lab = Self { balancer };
        lab.bring_up_new_backends();
        lab
    }

    /// Applies `config_toml` as `lb reload` does (reconcile); backends it adds come up at once
    /// with the lab's path, as if their first check had passed. Returns the changes.
    pub fn reload(&mut self, config_toml: &str) -> Vec<Change> {
        self.try_reload(config_toml)
            .unwrap_or_else(|e| panic!("reconciling the lab config: {e}"))
    }

    /// [`PacketLab::reload`] that hands back a failed reconcile (which rolled back). An injected
    /// map-write failure the reconcile did not reach is cleared before the lab's own writes.
    pub fn try_reload(&mut self, config_toml: &str) -> Result<Vec<Change>, Box<ReconcileError>> {
        let config = Config::parse(config_toml, Path::new("lab.toml"))
            .unwrap_or_else(|e| panic!("lab config is invalid: {e}"));
        let changes = self.balancer.reconcile(&config).map_err(Box::new)?;
        self.balancer.inject_map_write_failure(None);
        self.bring_up_new_backends();
        Ok(changes)
    }

    /// What a restarted daemon does with the same maps: a new model adopts what they hold for
    /// `config_toml` ([`Balancer::adopt`]), then reconciles the rest; backends it adds come up at
    /// once as in [`PacketLab::reload`]. (Pinning is not involved: the maps are simply handed
    /// over, as pins hand them to the next process.)
    pub fn restart(self, config_toml: &str) -> (Self, Adopted, Vec<Change>) {
        let config = Config::parse(config_toml, Path::new("lab.toml"))
            .unwrap_or_else(|e| panic!("lab config is invalid: {e}"));
        let Balancer { dataplane, .. } = self.balancer;
        let mut balancer = Balancer::empty(dataplane);
        let adopted = balancer
            .adopt(&config)
            .unwrap_or_else(|e| panic!("adopting the lab's maps: {e}"));
        let changes = balancer
            .reconcile(&config)
            .unwrap_or_else(|e| panic!("reconciling the lab config: {e}"));
        let mut lab = Self { balancer };
        lab.bring_up_new_backends();
        (lab, adopted, changes)
    }

    /// Marks every backend without a path healthy with path `backend_mac(id)` (same interface,
    /// so `XDP_TX`) and republishes.
    fn bring_up_new_backends(&mut self) {
        let balancer = &mut self.balancer;
        for vip in &mut balancer.vips {
            let encapsulates = vip.forward.encapsulates();
            for backend in vip.backends.iter_mut().filter(|b| b.path.is_none()) {
                let tunnel = encapsulates.then_some(TunnelEnd {
                    source: match backend.address {
                        IpAddr::V4(_) => IpAddr::V4(LAB_TUNNEL_SOURCE_V4),
                        IpAddr::V6(_) => IpAddr::V6(LAB_TUNNEL_SOURCE_V6),
                    },
                    mtu: LAB_MTU,
                });
                backend.health = Health::Up;
                backend.path = Some(L2Path {
                    dst_mac: backend_mac(backend.id),
                    src_mac: LB_MAC,
                    ifindex: 1,
                    redirect: false,
                    tunnel,
                });
            }
        }
        balancer
            .publish_all()
            .unwrap_or_else(|e| panic!("publishing the lab config: {e}"));
    }

    /// Runs the program once on `frame`; returns the verdict and the frame as the program left it.
    pub fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 256];
        let result = self
            .balancer
            .dataplane
            .program()
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::new()
            })
            .unwrap_or_else(|e| {
                panic!(
                    "BPF_PROG_TEST_RUN failed on a {}-byte frame: {e}",
                    frame.len()
                )
            });
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// Runs the program on `frame`, asserts `XDP_TX`, and returns the backend the frame was
    /// sent to (read from its destination MAC, see [`backend_mac`]).
    pub fn backend_of(&mut self, frame: &[u8]) -> u32 {
        let (verdict, out) = self.run(frame);
        assert_eq!(verdict, XDP_TX, "verdict (1=DROP 2=PASS 3=TX 4=REDIRECT)");
        let capacity = self.balancer.dataplane.capacity.max_backends;
        (0..capacity)
            .find(|&id| backend_mac(id) == out[0..6])
            .unwrap_or_else(|| {
                panic!(
                    "frame left with unknown destination MAC {:02x?}",
                    &out[0..6]
                )
            })
    }

    /// The backend id the program must pick for a new flow, computed from the daemon's own
    /// Maglev table and the shared flow hash.
    pub fn expected_backend(&self, vip_index: usize, flow: &FlowKey) -> u32 {
        let vip = &self.balancer.vips[vip_index];
        let table = ring_for(vip, self.balancer.dataplane.capacity.ring_size);
        table[(flow_hash(flow) % self.balancer.dataplane.capacity.ring_size) as usize]
    }
}

impl PacketLab {
    /// The VIP's live ring as the data plane reads it (owner and prior of every slot).
    pub fn live_ring(&self, vip_index: usize) -> Vec<RingSlot> {
        let vip = &self.balancer.vips[vip_index];
        self.balancer
            .dataplane
            .maps
            .rings
            .read_table(vip.id * 2 + (vip.active_ring & 1))
            .unwrap_or_else(|e| panic!("reading the live ring: {e}"))
    }

    /// The live slot `flow` falls in.
    pub fn live_slot(&self, vip_index: usize, flow: &FlowKey) -> RingSlot {
        let m = self.balancer.dataplane.capacity.ring_size;
        self.live_ring(vip_index)[(flow_hash(flow) % m) as usize]
    }

    /// Every entry of the flow table.
    pub fn flow_entries(&self) -> Vec<(FlowKey, FlowState)> {
        lb::dataplane::flows::read_flows(&self.balancer.dataplane.maps.flows)
            .unwrap_or_else(|e| panic!("reading FLOWS: {e}"))
    }

    /// Packets counted for `reason` so far, summed over the CPUs.
    pub fn reason_packets(&self, reason: lb_common::Reason) -> u64 {
        self.balancer
            .reason_counters(reason)
            .unwrap_or_else(|e| panic!("reading the {} counters: {e}", reason.name()))
            .packets
    }

    /// The data-plane id of `vip`'s backend at `address`.
    pub fn id(&self, vip: &str, address: &str) -> u32 {
        let address: IpAddr = address.parse().expect("backend address");
        self.balancer
            .backend_id(vip, address)
            .unwrap_or_else(|| panic!("no backend {address} in vip {vip}"))
    }
}

/// The flow key the program builds for a packet.
pub fn flow_key(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, proto: u8) -> FlowKey {
    let vip = vip_key(dst, dport, proto);
    let (src_bytes, family) = match src {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            (b, FAMILY_V4)
        }
        IpAddr::V6(a) => (a.octets(), FAMILY_V6),
    };
    FlowKey {
        src: src_bytes,
        dst: vip.addr,
        sport_be: sport.to_be(),
        dport_be: dport.to_be(),
        proto,
        family,
        _pad: [0; 2],
    }
}

/// A two-VIP config for packet tests: `web` (TCP, 10.0.0.100:80) over `backends` backends from
/// 10.0.0.11 on, and `dns` (UDP, 10.0.0.100:53) over 10.0.0.51 and 10.0.0.52; `extra` holds more
/// top-level keys (one per line).
pub fn two_vip_config(
    ring_size: u32,
    max_backends: u32,
    flow_table_size: u32,
    backends: u32,
    extra: &str,
) -> String {
    let mut text = format!(
        "interface = \"lab0\"\nring_size = {ring_size}\nmax_vips = 4\nmax_backends = {max_backends}\n\
         flow_table_size = {flow_table_size}\n{extra}\n\
         [[vip]]\nname = \"web\"\naddress = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\n"
    );
    for i in 0..backends {
        text.push_str(&format!(
            "[[vip.backend]]\naddress = \"10.0.0.{}\"\n",
            11 + i
        ));
    }
    text.push_str(
        "\n[[vip]]\nname = \"dns\"\naddress = \"10.0.0.100\"\nport = 53\nprotocol = \"udp\"\n\
         [[vip.backend]]\naddress = \"10.0.0.51\"\n[[vip.backend]]\naddress = \"10.0.0.52\"\n",
    );
    text
}
