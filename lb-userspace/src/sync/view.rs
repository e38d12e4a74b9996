//! What the sync service needs of the balancer's model to name a data-plane event by address:
//! a snapshot that the daemon's loop replaces whenever its VIPs or backends change (data flows
//! one way: the loop publishes, the service reads).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use lb_common::FlowEvent;

use super::wire::FlowRecord;
use crate::balancer::{Balancer, flow_key};
use crate::config::Protocol;

/// Data-plane ids to addresses, for the flows this node's data plane records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowView {
    /// VIP id → (address and port, IP protocol).
    vips: HashMap<u32, (SocketAddr, u8)>,
    /// Backend id → (VIP id, address).
    backends: HashMap<u32, (u32, IpAddr)>,
}

impl FlowView {
    /// The ids of `balancer`'s model.
    pub fn of(balancer: &Balancer) -> Self {
        let mut view = Self::default();
        for vip in &balancer.vips {
            let proto = match vip.protocol {
                Protocol::Tcp => lb_common::PROTO_TCP,
                Protocol::Udp => lb_common::PROTO_UDP,
            };
            view.vips
                .insert(vip.id, (SocketAddr::new(vip.address, vip.port), proto));
            for backend in &vip.backends {
                view.backends.insert(backend.id, (vip.id, backend.address));
            }
        }
        view
    }

    /// The record of a flow the data plane just inserted; `None` when its ids are not (or no
    /// longer) this view's, or the event does not match its VIP.
    pub fn record(&self, event: &FlowEvent) -> Option<FlowRecord> {
        let FlowEvent {
            key,
            backend,
            vip_id,
        } = event;
        let &(vip, proto) = self.vips.get(vip_id)?;
        let &(backend_vip, backend) = self.backends.get(backend)?;
        if backend_vip != *vip_id || key.proto != proto {
            return None;
        }
        let client_port = u16::from_be(key.sport_be);
        let client_ip = match vip.ip() {
            IpAddr::V4(_) => {
                let [a, b, c, d, ..] = key.src;
                IpAddr::from([a, b, c, d])
            }
            IpAddr::V6(_) => IpAddr::from(key.src),
        };
        let client = SocketAddr::new(client_ip, client_port);
        // The event's key must be the one this record maps back to (same VIP address and port).
        if flow_key(vip, proto, client).as_ref() != Some(key) {
            return None;
        }
        Some(FlowRecord {
            vip,
            proto,
            client,
            backend,
            age_ms: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{PROTO_TCP, PROTO_UDP};

    fn view() -> FlowView {
        let mut view = FlowView::default();
        view.vips
            .insert(1, ("10.0.0.100:80".parse().unwrap(), PROTO_TCP));
        view.vips
            .insert(2, ("[2001:db8::100]:53".parse().unwrap(), PROTO_UDP));
        view.backends.insert(7, (1, "10.0.0.11".parse().unwrap()));
        view.backends
            .insert(9, (2, "2001:db8::11".parse().unwrap()));
        view
    }

    fn event(
        vip: SocketAddr,
        proto: u8,
        client: SocketAddr,
        backend: u32,
        vip_id: u32,
    ) -> FlowEvent {
        FlowEvent {
            key: flow_key(vip, proto, client).expect("same family"),
            backend,
            vip_id,
        }
    }

    #[test]
    fn an_event_is_named_by_address() {
        let vip: SocketAddr = "10.0.0.100:80".parse().unwrap();
        let client: SocketAddr = "192.0.2.1:40000".parse().unwrap();
        assert_eq!(
            view().record(&event(vip, PROTO_TCP, client, 7, 1)),
            Some(FlowRecord {
                vip,
                proto: PROTO_TCP,
                client,
                backend: "10.0.0.11".parse().unwrap(),
                age_ms: 0,
            })
        );
        let vip6: SocketAddr = "[2001:db8::100]:53".parse().unwrap();
        let client6: SocketAddr = "[2001:db8::1]:5353".parse().unwrap();
        let record = view()
            .record(&event(vip6, PROTO_UDP, client6, 9, 2))
            .expect("an IPv6 record");
        assert_eq!(
            (record.client, record.backend),
            (client6, "2001:db8::11".parse().unwrap())
        );
    }

    #[test]
    fn events_that_do_not_match_the_model_are_not_named() {
        let vip: SocketAddr = "10.0.0.100:80".parse().unwrap();
        let client: SocketAddr = "192.0.2.1:40000".parse().unwrap();
        let view = view();
        assert_eq!(
            view.record(&event(vip, PROTO_TCP, client, 7, 3)),
            None,
            "unknown VIP id"
        );
        assert_eq!(
            view.record(&event(vip, PROTO_TCP, client, 8, 1)),
            None,
            "unknown backend id"
        );
        assert_eq!(
            view.record(&event(vip, PROTO_TCP, client, 9, 1)),
            None,
            "another VIP's backend"
        );
        assert_eq!(
            view.record(&event(vip, PROTO_UDP, client, 7, 1)),
            None,
            "other protocol"
        );
        let other_port: SocketAddr = "10.0.0.100:81".parse().unwrap();
        assert_eq!(
            view.record(&event(other_port, PROTO_TCP, client, 7, 1)),
            None,
            "a key to another port than the VIP's"
        );
    }
}
