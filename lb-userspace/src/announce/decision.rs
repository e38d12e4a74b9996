//! Which VIPs this node can serve, and so which VIP addresses it announces: a pure function of
//! the balancer's model, so it is tested without a kernel.
//!
//! A VIP can serve new flows when its live ring has a backend (healthy, reachable, weight above
//! 0, in the active pool), or when `on_all_down = "pass"` hands its new flows to this host. An
//! address is announced while at least one VIP on it can serve. Before the first health results
//! are in, nothing can serve: a node that (re)starts must not pull traffic it cannot serve yet.

use std::{collections::BTreeMap, net::IpAddr};

use crate::{
    balancer::{Balancer, VipState},
    config::OnAllDown,
};

/// What the node can serve, VIP by VIP and address by address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// In the model's (config) order.
    pub vips: Vec<VipDecision>,
    /// Every VIP address, in address order.
    pub addresses: BTreeMap<IpAddr, AddressDecision>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipDecision {
    pub name: String,
    pub address: IpAddr,
    pub can_serve: bool,
    /// Why, for `lb status` and the log: "2 backends take new flows (pool primary)".
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressDecision {
    pub announce: bool,
    /// "vip web: 2 backends take new flows (pool primary)"; every VIP on the address when none
    /// can serve.
    pub reason: String,
}

impl Decision {
    /// The value of keepalived's health file: how many VIPs cannot serve.
    pub fn unservable_vips(&self) -> u32 {
        self.vips.iter().filter(|v| !v.can_serve).count() as u32
    }

    /// Whether `address` is announced.
    pub fn announces(&self, address: IpAddr) -> bool {
        self.addresses.get(&address).is_some_and(|a| a.announce)
    }
}

/// What `balancer` can serve; `ready` is false until the first health results are in and the
/// program is attached.
pub fn decide(balancer: &Balancer, ready: bool) -> Decision {
    decide_vips(&balancer.vips, ready)
}

/// [`decide`] over a list of VIPs (their `active_pool` as published).
pub fn decide_vips(vips: &[VipState], ready: bool) -> Decision {
    let vips: Vec<VipDecision> = vips.iter().map(|vip| decide_vip(vip, ready)).collect();
    let mut addresses: BTreeMap<IpAddr, AddressDecision> = BTreeMap::new();
    for vip in &vips {
        let line = format!("vip {}: {}", vip.name, vip.reason);
        let entry = addresses.entry(vip.address).or_insert(AddressDecision {
            announce: false,
            reason: String::new(),
        });
        match (entry.announce, vip.can_serve) {
            // The first VIP that can serve explains the announcement.
            (false, true) => {
                entry.announce = true;
                entry.reason = line;
            }
            (true, _) => {}
            // None can serve so far: every VIP's reason, so the operator sees them all.
            (false, false) if entry.reason.is_empty() => entry.reason = line,
            (false, false) => {
                entry.reason.push_str("; ");
                entry.reason.push_str(&line);
            }
        }
    }
    Decision { vips, addresses }
}

fn decide_vip(vip: &VipState, ready: bool) -> VipDecision {
    let (can_serve, reason) = if !ready {
        (false, "waiting for the first health results".to_owned())
    } else {
        let pool = vip.active_pool;
        let taking = vip
            .backends
            .iter()
            .filter(|b| VipState::takes_new_flows(b, pool))
            .count();
        match (taking, vip.on_all_down) {
            (1, _) => (true, format!("1 backend takes new flows (pool {pool})")),
            (n, _) if n > 0 => (true, format!("{n} backends take new flows (pool {pool})")),
            (_, OnAllDown::Pass) => (
                true,
                "no backend takes new flows; on_all_down = \"pass\" hands them to this host"
                    .to_owned(),
            ),
            (_, OnAllDown::Drop) => (
                false,
                format!(
                    "no backend takes new flows ({} configured, on_all_down = \"drop\")",
                    vip.backends.len()
                ),
            ),
        }
    };
    VipDecision {
        name: vip.name.clone(),
        address: vip.address,
        can_serve,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use lb_common::VipKey;

    use super::*;
    use crate::{
        balancer::{Admin, BackendState, L2Path},
        config::Protocol,
        health::Health,
        pool::ActivePool,
    };

    const PATH: L2Path = L2Path {
        dst_mac: [2, 0, 0, 0, 0, 11],
        src_mac: [2, 0, 0, 0, 0, 2],
        ifindex: 2,
        redirect: false,
        tunnel: None,
    };

    fn backend(id: u32, health: Health, standby: bool) -> BackendState {
        BackendState {
            id,
            address: format!("10.0.0.{}", 10 + id).parse().unwrap(),
            weight: 100,
            standby,
            health,
            path: Some(PATH),
            admin: Admin::Enabled,
            held_until: None,
        }
    }

    fn vip(
        name: &str,
        address: &str,
        backends: Vec<BackendState>,
        on_all_down: OnAllDown,
    ) -> VipState {
        let mut vip = VipState {
            id: 0,
            name: name.to_owned(),
            key: VipKey::v4([10, 0, 0, 100], 80, 6),
            address: address.parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            active_ring: 0,
            min_healthy: 1,
            on_all_down,
            forward: crate::config::Forward::L2,
            encap_source: Vec::new(),
            check_through_tunnel: false,
            active_pool: ActivePool::None,
            backends,
        };
        // As after a publish: the live ring is of the pool the model selects.
        vip.active_pool = vip.select_pool();
        vip
    }

    #[test]
    fn nothing_is_served_before_the_first_results() {
        let vips = [vip(
            "web",
            "10.0.0.100",
            vec![backend(1, Health::Up, false)],
            OnAllDown::Pass,
        )];
        let decision = decide_vips(&vips, false);
        assert!(!decision.vips[0].can_serve);
        assert_eq!(
            decision.vips[0].reason,
            "waiting for the first health results"
        );
        assert!(!decision.announces("10.0.0.100".parse().unwrap()));
        assert_eq!(decision.unservable_vips(), 1);
    }

    #[test]
    fn a_vip_serves_with_a_backend_in_its_ring_or_with_pass() {
        let up = vip(
            "up",
            "10.0.0.100",
            vec![
                backend(1, Health::Up, false),
                backend(2, Health::Down, false),
            ],
            OnAllDown::Drop,
        );
        let standby = vip(
            "standby",
            "10.0.0.101",
            vec![
                backend(3, Health::Down, false),
                backend(4, Health::Up, true),
            ],
            OnAllDown::Drop,
        );
        let mut drained = backend(5, Health::Up, false);
        drained.admin = Admin::Drained;
        let mut unresolved = backend(6, Health::Up, false);
        unresolved.path = None;
        let none = vip(
            "none",
            "10.0.0.102",
            vec![drained, unresolved, backend(7, Health::Unknown, false)],
            OnAllDown::Drop,
        );
        let pass = vip(
            "pass",
            "10.0.0.103",
            vec![backend(8, Health::Down, false)],
            OnAllDown::Pass,
        );
        let empty = vip("empty", "10.0.0.104", vec![], OnAllDown::Drop);
        let decision = decide_vips(&[up, standby, none, pass, empty], true);
        let got: Vec<(&str, bool, &str)> = decision
            .vips
            .iter()
            .map(|v| (v.name.as_str(), v.can_serve, v.reason.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("up", true, "1 backend takes new flows (pool primary)"),
                ("standby", true, "1 backend takes new flows (pool standby)"),
                (
                    "none",
                    false,
                    "no backend takes new flows (3 configured, on_all_down = \"drop\")"
                ),
                (
                    "pass",
                    true,
                    "no backend takes new flows; on_all_down = \"pass\" hands them to this host"
                ),
                (
                    "empty",
                    false,
                    "no backend takes new flows (0 configured, on_all_down = \"drop\")"
                ),
            ]
        );
        assert_eq!(decision.unservable_vips(), 2);
        let announced: Vec<(String, bool)> = decision
            .addresses
            .iter()
            .map(|(a, d)| (a.to_string(), d.announce))
            .collect();
        assert_eq!(
            announced,
            [
                ("10.0.0.100".into(), true),
                ("10.0.0.101".into(), true),
                ("10.0.0.102".into(), false),
                ("10.0.0.103".into(), true),
                ("10.0.0.104".into(), false),
            ]
        );
    }

    #[test]
    fn an_address_is_announced_while_any_vip_on_it_can_serve() {
        let http = vip(
            "http",
            "10.0.0.100",
            vec![backend(1, Health::Down, false)],
            OnAllDown::Drop,
        );
        let https = vip(
            "https",
            "10.0.0.100",
            vec![backend(2, Health::Up, false)],
            OnAllDown::Drop,
        );
        let decision = decide_vips(&[http.clone(), https], true);
        let address = &decision.addresses[&"10.0.0.100".parse().unwrap()];
        assert!(address.announce);
        assert_eq!(
            address.reason,
            "vip https: 1 backend takes new flows (pool primary)"
        );
        assert_eq!(decision.unservable_vips(), 1);

        let mut http2 = http.clone();
        http2.name = "http2".into();
        let decision = decide_vips(&[http, http2], true);
        let address = &decision.addresses[&"10.0.0.100".parse().unwrap()];
        assert!(!address.announce);
        assert_eq!(
            address.reason,
            "vip http: no backend takes new flows (1 configured, on_all_down = \"drop\"); \
             vip http2: no backend takes new flows (1 configured, on_all_down = \"drop\")"
        );
    }
}
