//! A snapshot of the data plane's counters, per VIP, per backend and per verdict reason.

use std::fmt;

use lb_common::{Counters, Reason};

use crate::{
    balancer::{Balancer, derive_tx},
    dataplane::DataPlaneError,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendCounters {
    pub address: String,
    pub counters: Counters,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipCounters {
    pub name: String,
    /// `address:port/protocol`, IPv6 in brackets.
    pub endpoint: String,
    pub counters: Counters,
    pub backends: Vec<BackendCounters>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub vips: Vec<VipCounters>,
    pub reasons: Vec<(Reason, Counters)>,
}

impl Snapshot {
    /// Reads every counter once; VIP and `tx` totals are sums of the backends' (see
    /// `balancer::counters`).
    pub fn read(balancer: &Balancer) -> Result<Self, DataPlaneError> {
        let maps = &balancer.dataplane.maps;
        let mut forwarded = balancer.removed_vips_counters()?;
        let vips = balancer
            .vips
            .iter()
            .map(|vip| {
                let backends: Vec<BackendCounters> = vip
                    .backends
                    .iter()
                    .map(|b| {
                        Ok(BackendCounters {
                            address: b.address.to_string(),
                            counters: maps.backend_counters(b.id)?,
                        })
                    })
                    .collect::<Result<_, DataPlaneError>>()?;
                let counters = backends
                    .iter()
                    .fold(maps.carry(vip.id)?, |sum, b| sum + b.counters);
                forwarded = forwarded + counters;
                Ok(VipCounters {
                    name: vip.name.clone(),
                    endpoint: format!(
                        "{}/{}",
                        std::net::SocketAddr::new(vip.address, vip.port),
                        vip.protocol.as_str()
                    ),
                    counters,
                    backends,
                })
            })
            .collect::<Result<_, DataPlaneError>>()?;
        // In discriminant order (`Reason::ALL`), so a reason's entry is at its discriminant.
        let mut reasons: Vec<(Reason, Counters)> = Reason::ALL
            .iter()
            .map(|&r| Ok((r, maps.reason_counters(r)?)))
            .collect::<Result<_, DataPlaneError>>()?;
        reasons[Reason::Tx as usize].1 = derive_tx(
            forwarded,
            reasons[Reason::Redirect as usize].1,
            reasons[Reason::DropRedirectFailed as usize].1,
        );
        Ok(Self { vips, reasons })
    }
}

/// One line per VIP and per backend, then the non-zero verdict reasons:
/// `vip web 10.0.0.100:80/tcp packets=12 bytes=900 new_flows=3`
/// `  backend 10.0.0.11 packets=4 bytes=300 new_flows=1`
/// `reason tx packets=12 bytes=900`
impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for vip in &self.vips {
            let Counters {
                packets,
                bytes,
                new_flows,
            } = vip.counters;
            writeln!(
                f,
                "vip {} {} packets={packets} bytes={bytes} new_flows={new_flows}",
                vip.name, vip.endpoint
            )?;
            for b in &vip.backends {
                let Counters {
                    packets,
                    bytes,
                    new_flows,
                } = b.counters;
                writeln!(
                    f,
                    "  backend {} packets={packets} bytes={bytes} new_flows={new_flows}",
                    b.address
                )?;
            }
        }
        for (reason, c) in &self.reasons {
            if c.packets > 0 {
                writeln!(
                    f,
                    "reason {} packets={} bytes={}",
                    reason.name(),
                    c.packets,
                    c.bytes
                )?;
            }
        }
        Ok(())
    }
}
