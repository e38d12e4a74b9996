//! The `lb_dns_*` families: the DNS responder (`[dns]`), from its status. Without `[dns]` they
//! are printed without samples.

use std::fmt;

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::Family;
use crate::api::model::DnsStatus;

pub(super) fn encode(status: Option<&DnsStatus>, encoder: &mut DescriptorEncoder) -> fmt::Result {
    Family {
        name: "lb_dns_queries",
        help: "DNS queries by query type and response code (dropped: no reply was sent).",
        metric_type: MetricType::Counter,
        samples: status
            .into_iter()
            .flat_map(|s| &s.queries)
            .map(|q| {
                (
                    [("qtype", q.qtype.as_str()), ("rcode", q.rcode.as_str())],
                    ConstCounter::new(q.count),
                )
            })
            .collect(),
    }
    .encode(encoder)?;
    Family {
        name: "lb_dns_truncated",
        help: "UDP answers sent with the TC bit set (too large; the client retries over TCP).",
        metric_type: MetricType::Counter,
        samples: status
            .map(|s| ([("", ""); 0], ConstCounter::new(s.truncated)))
            .into_iter()
            .collect(),
    }
    .encode(encoder)?;
    Family {
        name: "lb_dns_name_up_addresses",
        help: "Addresses each DNS name answers with now.",
        metric_type: MetricType::Gauge,
        samples: status
            .into_iter()
            .flat_map(|s| &s.names)
            .map(|n| {
                (
                    [("name", n.name.as_str())],
                    ConstGauge::new(n.answer.len() as i64),
                )
            })
            .collect(),
    }
    .encode(encoder)?;
    Ok(())
}
