//! The answer to one query: a pure function of the zone as it is now and the query's bytes, so
//! it is tested without sockets. Wire format by hickory-proto; no byte is laid out here.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, NS, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

/// The largest UDP answer without EDNS (RFC 1035).
pub const CLASSIC_UDP_LIMIT: usize = 512;
/// The largest UDP answer whatever the client's EDNS says (the DNS flag day 2020 size is 1232;
/// 4096 is what clients usually offer, and our answers are rarely near either).
pub const MAX_UDP_LIMIT: usize = 4096;
/// The EDNS UDP size we advertise.
const OUR_EDNS_SIZE: u16 = 1232;

/// How a query arrived: UDP answers must fit the client's limit, TCP ones 65535 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// The zone's records as they are now: SOA and NS at the apex, and each name's answer set.
#[derive(Debug)]
pub struct Zone {
    origin: Name,
    ttl: u32,
    soa: SOA,
    ns: Name,
    names: HashMap<Name, NameAnswer>,
    /// Names that exist only because a configured name lies under them (`b` for `a.b`): they
    /// answer NODATA, not NXDOMAIN (RFC 8020).
    empty_non_terminals: std::collections::HashSet<Name>,
}

/// What one name answers with now, and where its round robin stands.
#[derive(Debug, Default)]
pub struct NameAnswer {
    /// The addresses answered now, in config order (up ones, or per `on_all_down`).
    pub addresses: Vec<IpAddr>,
    /// Advanced on every answer: the rotation's starting point.
    next: AtomicUsize,
}

/// Why a zone could not be built: a name hickory refuses (validation should have caught it).
#[derive(Debug, thiserror::Error)]
#[error("dns name `{name}`: {source}")]
pub struct ZoneError {
    name: String,
    #[source]
    source: hickory_proto::ProtoError,
}

/// What became of one query, for the metrics: the reply, if any, and its labels.
#[derive(Debug)]
pub struct Outcome {
    /// `None`: nothing is sent (not a query, or too short to have an id).
    pub reply: Option<Vec<u8>>,
    /// `A`, `AAAA`, `SOA`, `NS`, `ANY`, `other` or `none` (no question could be read).
    pub qtype: &'static str,
    /// `NOERROR`, `NXDOMAIN`, `REFUSED`, `FORMERR`, `NOTIMP`, `SERVFAIL` or `dropped`.
    pub rcode: &'static str,
    /// The UDP answer did not fit and went out with TC set and no records.
    pub truncated: bool,
}

impl Zone {
    /// A zone `origin` (`svc.example.`) with `names` (relative, `www`) and no addresses yet.
    pub fn new<'a>(
        origin: &str,
        ttl: u32,
        serial: u32,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, ZoneError> {
        let parse = |text: &str| {
            Name::from_ascii(text)
                .map(|n| n.to_lowercase())
                .map_err(|source| ZoneError {
                    name: text.to_owned(),
                    source,
                })
        };
        let origin = parse(origin)?;
        let ns = parse(&format!("ns.{origin}"))?;
        let soa = SOA::new(
            ns.clone(),
            parse(&format!("hostmaster.{origin}"))?,
            serial,
            3600,
            600,
            86400,
            // Negative answers are cached for this long (RFC 2308): as long as positive ones.
            ttl,
        );
        let mut map = HashMap::new();
        let mut empty_non_terminals = std::collections::HashSet::new();
        for name in names {
            let full = parse(&format!("{name}.{origin}"))?;
            let mut parent = full.base_name();
            while parent.num_labels() > origin.num_labels() {
                empty_non_terminals.insert(parent.clone());
                parent = parent.base_name();
            }
            map.insert(full, NameAnswer::default());
        }
        Ok(Zone {
            origin,
            ttl,
            soa,
            ns,
            names: map,
            empty_non_terminals,
        })
    }

    /// Sets what `name` (relative) answers with; returns whether it changed.
    pub fn set_addresses(&mut self, name: &str, addresses: Vec<IpAddr>) -> bool {
        let Ok(full) = Name::from_ascii(format!("{name}.{}", self.origin)) else {
            return false;
        };
        match self.names.get_mut(&full.to_lowercase()) {
            Some(entry) if entry.addresses != addresses => {
                entry.addresses = addresses;
                true
            }
            _ => false,
        }
    }

    /// What `name` (relative) answers with now.
    pub fn addresses(&self, name: &str) -> &[IpAddr] {
        Name::from_ascii(format!("{name}.{}", self.origin))
            .ok()
            .and_then(|full| self.names.get(&full.to_lowercase()))
            .map_or(&[][..], |entry| &entry.addresses[..])
    }

    /// Answers the query in `request`.
    pub fn answer(&self, request: &[u8], transport: Transport) -> Outcome {
        let dropped = |qtype| Outcome {
            reply: None,
            qtype,
            rcode: "dropped",
            truncated: false,
        };
        let message = match Message::from_vec(request) {
            Ok(message) => message,
            // Unreadable: FORMERR when there is a header to answer to (and it is not itself a
            // response, which would let two servers bounce errors between them forever).
            Err(_) if request.len() >= 12 && request[2] & 0x80 == 0 => {
                let id = u16::from_be_bytes([request[0], request[1]]);
                let reply = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
                return finish(reply, "none", "FORMERR", None, transport);
            }
            Err(_) => return dropped("none"),
        };
        if message.message_type() != MessageType::Query {
            return dropped("none");
        }
        let limit = udp_limit(&message, transport);
        let edns = message.extensions().as_ref().map(|_| {
            let mut edns = Edns::new();
            edns.set_max_payload(OUR_EDNS_SIZE).set_version(0);
            edns
        });
        let mut reply = Message::error_msg(message.id(), message.op_code(), ResponseCode::NoError);
        reply.set_recursion_desired(message.recursion_desired());
        if message.op_code() != OpCode::Query {
            reply.set_response_code(ResponseCode::NotImp);
            return finish_with(reply, edns, "none", limit);
        }
        let [query] = message.queries() else {
            reply.set_response_code(ResponseCode::FormErr);
            return finish_with(reply, edns, "none", limit);
        };
        let qtype = qtype_label(query.query_type());
        reply.add_query(query.clone());
        if query.query_class() != DNSClass::IN && query.query_class() != DNSClass::ANY {
            reply.set_response_code(ResponseCode::Refused);
            return finish_with(reply, edns, qtype, limit);
        }
        let name = query.name().to_lowercase();
        if !self.origin.zone_of(&name) {
            reply.set_response_code(ResponseCode::Refused);
            return finish_with(reply, edns, qtype, limit);
        }
        reply.set_authoritative(true);
        let records = if name == self.origin {
            self.apex(query.query_type())
        } else if let Some(entry) = self.names.get(&name) {
            self.addresses_of(&name, entry, query.query_type())
        } else if self.empty_non_terminals.contains(&name) {
            Vec::new()
        } else {
            reply.set_response_code(ResponseCode::NXDomain);
            Vec::new()
        };
        if records.is_empty() {
            // NODATA or NXDOMAIN: the SOA says how long the absence may be cached.
            reply.add_name_server(self.soa_record());
        } else {
            reply.add_answers(records);
        }
        finish_with(reply, edns, qtype, limit)
    }

    fn apex(&self, qtype: RecordType) -> Vec<Record> {
        let ns = Record::from_rdata(
            self.origin.clone(),
            self.ttl,
            RData::NS(NS(self.ns.clone())),
        );
        match qtype {
            RecordType::SOA => vec![self.soa_record()],
            RecordType::NS => vec![ns],
            RecordType::ANY => vec![self.soa_record(), ns],
            _ => Vec::new(),
        }
    }

    fn soa_record(&self) -> Record {
        Record::from_rdata(self.origin.clone(), self.ttl, RData::SOA(self.soa.clone()))
    }

    /// The name's addresses of the asked family, rotated: each answer starts one further on.
    fn addresses_of(&self, name: &Name, entry: &NameAnswer, qtype: RecordType) -> Vec<Record> {
        let wanted: Vec<IpAddr> = entry
            .addresses
            .iter()
            .copied()
            .filter(|a| match qtype {
                RecordType::A => a.is_ipv4(),
                RecordType::AAAA => a.is_ipv6(),
                RecordType::ANY => true,
                _ => false,
            })
            .collect();
        if wanted.is_empty() {
            return Vec::new();
        }
        let start = entry.next.fetch_add(1, Ordering::Relaxed) % wanted.len();
        wanted[start..]
            .iter()
            .chain(&wanted[..start])
            .map(|address| {
                let rdata = match address {
                    IpAddr::V4(v4) => RData::A(A(*v4)),
                    IpAddr::V6(v6) => RData::AAAA(AAAA(*v6)),
                };
                Record::from_rdata(name.clone(), self.ttl, rdata)
            })
            .collect()
    }
}

/// The most bytes the reply may have: the client's EDNS size over UDP (at least 512, at most
/// [`MAX_UDP_LIMIT`]), 512 without EDNS; a TCP message's 65535.
fn udp_limit(message: &Message, transport: Transport) -> usize {
    match transport {
        Transport::Tcp => usize::from(u16::MAX),
        Transport::Udp => match message.extensions() {
            Some(edns) => usize::from(edns.max_payload()).clamp(CLASSIC_UDP_LIMIT, MAX_UDP_LIMIT),
            None => CLASSIC_UDP_LIMIT,
        },
    }
}

fn finish_with(reply: Message, edns: Option<Edns>, qtype: &'static str, limit: usize) -> Outcome {
    let rcode = rcode_label(reply.response_code());
    let mut reply = reply;
    if let Some(edns) = edns {
        reply.set_edns(edns);
    }
    encode(reply, qtype, rcode, limit)
}

fn finish(
    reply: Message,
    qtype: &'static str,
    rcode: &'static str,
    edns: Option<Edns>,
    transport: Transport,
) -> Outcome {
    let mut reply = reply;
    if let Some(edns) = edns {
        reply.set_edns(edns);
    }
    let limit = match transport {
        Transport::Udp => CLASSIC_UDP_LIMIT,
        Transport::Tcp => usize::from(u16::MAX),
    };
    encode(reply, qtype, rcode, limit)
}

/// The reply's bytes; over the limit, the same header with TC set, the question and no records
/// (the client retries over TCP, RFC 7766).
fn encode(reply: Message, qtype: &'static str, rcode: &'static str, limit: usize) -> Outcome {
    let (bytes, truncated) = match reply.to_vec() {
        Ok(bytes) if bytes.len() <= limit => (Ok(bytes), false),
        Ok(_) => (reply.truncate().to_vec(), true),
        Err(e) => (Err(e), false),
    };
    match bytes {
        Ok(bytes) => Outcome {
            reply: Some(bytes),
            qtype,
            rcode,
            truncated,
        },
        // Never expected (every record is ours); a server failure rather than silence.
        Err(_) => {
            let failure =
                Message::error_msg(reply.id(), reply.op_code(), ResponseCode::ServFail).to_vec();
            Outcome {
                reply: failure.ok(),
                qtype,
                rcode: "SERVFAIL",
                truncated: false,
            }
        }
    }
}

/// Query types as metric labels: a fixed set, so clients cannot grow the label space.
fn qtype_label(qtype: RecordType) -> &'static str {
    match qtype {
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        RecordType::SOA => "SOA",
        RecordType::NS => "NS",
        RecordType::ANY => "ANY",
        _ => "other",
    }
}

fn rcode_label(rcode: ResponseCode) -> &'static str {
    match rcode {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::NotImp => "NOTIMP",
        _ => "SERVFAIL",
    }
}
