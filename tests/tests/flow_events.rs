//! Flow events (issue 12) at the packet level: the real program and maps
//! (`BPF_PROG_TEST_RUN`), filled by the daemon's own `Balancer`, read through the daemon's own
//! `FlowEvents` reader.
//!
//! - With the switch on, each flow the program records in `FLOWS` is one event with its exact
//!   key, backend and VIP: a new UDP flow, a TCP connection of a changed slot. A flow-table hit
//!   and a TCP packet of an unchanged slot (which never touches the table) emit nothing.
//! - With the switch off nothing is emitted (the flows are still recorded).
//! - A full ring counts what it could not take in `FLOW_EVENTS_LOST`, and takes events again
//!   once read.

use std::{net::IpAddr, time::Duration};

use lb::dataplane::FlowEvents;
use lb_common::{
    FLOW_EVENT_RECORD_BYTES, FLOW_EVENTS_BYTES, FlowEvent, FlowKey, PROTO_TCP, PROTO_UDP, flow_hash,
};
use lb_tests::{
    frames::{FrameSpec, LB_MAC},
    packet_lab::{PacketLab, XDP_TX, backend_mac, flow_key, two_vip_config},
};

const WEB: usize = 0;
const DNS: usize = 1;
const M: u32 = 65537;

/// web (TCP) with `backends` backends from 10.0.0.11 on, dns (UDP) with two.
fn config(backends: u32, flow_table_size: u32) -> String {
    two_vip_config(M, 32, flow_table_size, backends, "")
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

/// The lab and its flow-event reader, registered with a runtime of its own.
struct EventLab {
    lab: PacketLab,
    events: FlowEvents,
    /// Dropped after `events` (field order), which deregisters from its reactor.
    runtime: tokio::runtime::Runtime,
}

impl EventLab {
    fn new(config_toml: &str) -> Self {
        let mut lab = PacketLab::new(config_toml);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .expect("a tokio runtime");
        let events = {
            let _entered = runtime.enter();
            lab.balancer
                .dataplane
                .take_flow_events()
                .unwrap_or_else(|e| panic!("taking the flow-event reader: {e}"))
        };
        assert!(
            matches!(
                lab.balancer.dataplane.take_flow_events(),
                Err(lb::dataplane::DataPlaneError::FlowEventsTaken)
            ),
            "the reader can be taken once"
        );
        Self {
            lab,
            events,
            runtime,
        }
    }

    fn switch(&mut self, on: bool) {
        self.lab
            .balancer
            .dataplane
            .set_flow_events(on)
            .unwrap_or_else(|e| panic!("setting FLOW_EVENTS_ON to {on}: {e}"));
    }

    /// Every event available now.
    fn drain(&mut self) -> Vec<FlowEvent> {
        let mut out = Vec::new();
        let n = self.events.drain(&mut out);
        assert_eq!(n, out.len(), "drain's count");
        out
    }

    /// Waits (at most 5 s) for the next batch through the async side.
    fn next_batch(&mut self) -> Vec<FlowEvent> {
        let mut out = Vec::new();
        let events = &mut self.events;
        self.runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), events.readable_batch(&mut out))
                .await
                .expect("an event within 5 s")
                .expect("reading FLOW_EVENTS");
        });
        out
    }

    fn lost(&self) -> u64 {
        self.lab
            .balancer
            .dataplane
            .flow_events_lost()
            .unwrap_or_else(|e| panic!("reading FLOW_EVENTS_LOST: {e}"))
    }

    /// Sends `frame`; asserts XDP_TX; returns the backend id its destination MAC names.
    fn send(&mut self, frame: &FrameSpec) -> u32 {
        let bytes = frame.build();
        let (verdict, out) = self.lab.run(&bytes);
        assert_eq!(verdict, XDP_TX, "verdict for {frame:?}");
        assert_eq!(&out[6..12], &LB_MAC, "source MAC for {frame:?}");
        let id = u32::from(out[4]) << 8 | u32::from(out[5]);
        assert_eq!(
            &out[0..6],
            &backend_mac(id),
            "destination MAC for {frame:?}"
        );
        id
    }

    fn vip_id(&self, vip: usize) -> u32 {
        self.lab.balancer.vips[vip].id
    }
}

fn udp(src: &str, sport: u16) -> (FrameSpec, FlowKey) {
    let frame = FrameSpec::udp(ip(src), sport, ip("10.0.0.100"), 53, b"q");
    let key = flow_key(ip(src), sport, ip("10.0.0.100"), 53, PROTO_UDP);
    (frame, key)
}

fn tcp_key(src: &str, sport: u16) -> FlowKey {
    flow_key(ip(src), sport, ip("10.0.0.100"), 80, PROTO_TCP)
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_new_udp_flow_is_one_event_and_hits_and_unchanged_tcp_slots_are_none() {
    let mut lab = EventLab::new(&config(10, 65536));
    lab.switch(true);
    assert!(lab.drain().is_empty(), "a new ring is empty");

    let (frame, key) = udp("192.0.2.1", 30_000);
    let backend = lab.send(&frame);
    let batch = lab.next_batch();
    assert_eq!(
        batch,
        [FlowEvent {
            key,
            backend,
            vip_id: lab.vip_id(DNS),
        }],
        "one event for the new UDP flow, with its exact key, backend and VIP"
    );
    assert_eq!(
        lab.send(&frame),
        backend,
        "the second packet keeps its backend"
    );
    assert!(lab.drain().is_empty(), "a flow-table hit emits nothing");

    // TCP in unchanged slots (one publish brought every backend up): nothing is recorded, so
    // nothing is told, SYN, ACK or FIN.
    assert_eq!(lab.lab.balancer.changed_slots(WEB), 0);
    for sport in 20_000..20_200 {
        let syn = FrameSpec::tcp_syn(ip("192.0.2.2"), sport, ip("10.0.0.100"), 80);
        let ack = FrameSpec::tcp_ack(ip("192.0.2.2"), sport, ip("10.0.0.100"), 80);
        let b = lab.send(&syn);
        assert_eq!(lab.send(&ack), b, "port {sport}: the ACK follows the SYN");
    }
    assert!(
        lab.drain().is_empty(),
        "TCP packets of unchanged slots emit nothing"
    );
    assert!(
        lab.lab
            .flow_entries()
            .iter()
            .all(|(k, _)| k.proto == PROTO_UDP)
    );

    // Many new UDP flows: one event each, in order, each with its backend.
    let mut expected = Vec::new();
    for sport in 31_000..31_500 {
        let (frame, key) = udp("192.0.2.3", sport);
        let backend = lab.send(&frame);
        expected.push(FlowEvent {
            key,
            backend,
            vip_id: lab.vip_id(DNS),
        });
    }
    assert_eq!(lab.drain(), expected, "one event per new flow, in order");
    assert_eq!(lab.lost(), 0);
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_tcp_connection_recorded_in_a_changed_slot_is_one_event() {
    let mut lab = EventLab::new(&config(10, 65536));
    lab.switch(true);
    // .21 joins: about 1/11 of the slots change owner.
    lab.lab.reload(&config(11, 65536));
    assert!(lab.lab.balancer.changed_slots(WEB) > 4000);
    let ring = lab.lab.live_ring(WEB);
    let changed = (1000..u16::MAX)
        .find(|&sport| ring[(flow_hash(&tcp_key("192.0.2.9", sport)) % M) as usize].is_changed())
        .expect("a connection in a changed slot");
    let slot = ring[(flow_hash(&tcp_key("192.0.2.9", changed)) % M) as usize];

    // A mid-connection ACK the table has not seen: it goes to the prior owner and is recorded.
    let ack = FrameSpec::tcp_ack(ip("192.0.2.9"), changed, ip("10.0.0.100"), 80);
    let backend = lab.send(&ack);
    assert_eq!(
        backend, slot.prior,
        "an unrecorded ACK goes to the prior owner"
    );
    assert_eq!(
        lab.next_batch(),
        [FlowEvent {
            key: tcp_key("192.0.2.9", changed),
            backend,
            vip_id: lab.vip_id(WEB),
        }],
        "one event for the TCP flow recorded in a changed slot"
    );
    assert_eq!(lab.send(&ack), backend);
    assert!(lab.drain().is_empty(), "its next packet is a hit: no event");

    // A new connection in a changed slot goes to the owner and is told too.
    let sport = (changed + 1..u16::MAX)
        .find(|&sport| ring[(flow_hash(&tcp_key("192.0.2.9", sport)) % M) as usize].is_changed())
        .expect("a second connection in a changed slot");
    let owner = ring[(flow_hash(&tcp_key("192.0.2.9", sport)) % M) as usize].owner;
    let syn = FrameSpec::tcp_syn(ip("192.0.2.9"), sport, ip("10.0.0.100"), 80);
    assert_eq!(
        lab.send(&syn),
        owner,
        "a SYN in a changed slot goes to the owner"
    );
    assert_eq!(
        lab.drain(),
        [FlowEvent {
            key: tcp_key("192.0.2.9", sport),
            backend: owner,
            vip_id: lab.vip_id(WEB),
        }]
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn with_the_switch_off_nothing_is_emitted() {
    let mut lab = EventLab::new(&config(10, 65536));
    assert!(
        !lab.lab
            .balancer
            .dataplane
            .maps
            .flow_events_on()
            .expect("read"),
        "events start off"
    );
    for sport in 32_000..32_100 {
        lab.send(&udp("192.0.2.4", sport).0);
    }
    assert_eq!(lab.lab.flow_entries().len(), 100, "the flows are recorded");
    assert!(lab.drain().is_empty(), "nothing is emitted while off");

    lab.switch(true);
    let (frame, key) = udp("192.0.2.4", 32_100);
    let backend = lab.send(&frame);
    assert_eq!(
        lab.drain(),
        [FlowEvent {
            key,
            backend,
            vip_id: lab.vip_id(DNS),
        }],
        "on again: emitted"
    );
    lab.switch(false);
    lab.send(&udp("192.0.2.4", 32_101).0);
    assert!(lab.drain().is_empty(), "off again: nothing");
    assert_eq!(lab.lost(), 0, "nothing was lost either");
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_full_ring_counts_what_it_loses_and_takes_events_again_once_read() {
    // The per-CPU LRU lists evict as the flows pour in; every insert still succeeds, so every
    // one is an event (or a lost one).
    let mut lab = EventLab::new(&config(2, 1 << 18));
    lab.switch(true);
    let fits = u64::from(FLOW_EVENTS_BYTES / FLOW_EVENT_RECORD_BYTES);
    let sent = fits + 500;
    let mut frame = FrameSpec::udp(ip("192.0.2.5"), 1, ip("10.0.0.100"), 53, b"q").build();
    for n in 0..sent {
        // A new flow per call: source address and port patched into the template.
        let src = [198, 18, (n >> 16) as u8, (n >> 8) as u8];
        frame[26..30].copy_from_slice(&src);
        frame[34..36].copy_from_slice(&(1024 + (n & 0xff) as u16).to_be_bytes());
        let (verdict, _) = lab.lab.run(&frame);
        assert_eq!(verdict, XDP_TX, "flow {n}");
    }
    assert_eq!(
        lab.lost(),
        sent - fits,
        "a {FLOW_EVENTS_BYTES}-byte ring holds {fits} events of {FLOW_EVENT_RECORD_BYTES} bytes"
    );
    let events = lab.drain();
    assert_eq!(events.len() as u64, fits, "the ring held what fits");
    assert!(events.iter().all(|e| e.vip_id == lab.vip_id(DNS)));
    assert_eq!(lab.events.foreign_records(), 0);

    // Read, the ring takes events again.
    let (frame, key) = udp("192.0.2.6", 40_000);
    let backend = lab.send(&frame);
    assert_eq!(
        lab.next_batch(),
        [FlowEvent {
            key,
            backend,
            vip_id: lab.vip_id(DNS),
        }]
    );
    assert_eq!(lab.lost(), sent - fits, "nothing more lost");
}
