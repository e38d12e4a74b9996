//! The answer logic on hickory-built queries: round robin, the rcodes, NODATA's SOA, truncation.

use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

use super::answer::{Outcome, Transport, Zone};

fn zone() -> Zone {
    let mut zone = Zone::new("svc.example.", 5, 42, ["www", "v6", "a.b", "big", "empty"]).unwrap();
    zone.set_addresses(
        "www",
        addrs(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "2001:db8::1"]),
    );
    zone.set_addresses("v6", addrs(&["2001:db8::6"]));
    zone.set_addresses("a.b", addrs(&["10.0.0.9"]));
    zone.set_addresses(
        "big",
        (1..=60).map(|i| IpAddr::from([10, 1, 0, i])).collect(),
    );
    zone
}

fn addrs(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

fn query(name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut message = Message::new();
    message
        .set_id(0x1234)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        message.set_edns(e);
    }
    message.to_vec().unwrap()
}

fn ask(zone: &Zone, name: &str, qtype: RecordType, transport: Transport) -> (Message, Outcome) {
    let outcome = zone.answer(&query(name, qtype, None), transport);
    let reply = Message::from_vec(outcome.reply.as_ref().expect("a reply")).unwrap();
    assert_eq!(reply.id(), 0x1234);
    assert_eq!(reply.message_type(), MessageType::Response);
    (reply, outcome)
}

fn answered(reply: &Message) -> Vec<IpAddr> {
    reply
        .answers()
        .iter()
        .map(|r| match r.data() {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            other => panic!("unexpected record {other:?}"),
        })
        .collect()
}

#[test]
fn a_answers_rotate_through_every_up_address() {
    let zone = zone();
    let mut firsts = Vec::new();
    for _ in 0..3 {
        let (reply, outcome) = ask(&zone, "WWW.svc.example.", RecordType::A, Transport::Udp);
        assert_eq!(reply.response_code(), ResponseCode::NoError);
        assert!(reply.authoritative());
        let got = answered(&reply);
        let mut sorted = got.clone();
        sorted.sort();
        assert_eq!(sorted, addrs(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]));
        assert!(reply.answers().iter().all(|r| r.ttl() == 5));
        assert_eq!((outcome.qtype, outcome.rcode), ("A", "NOERROR"));
        firsts.push(got[0]);
    }
    assert_eq!(firsts, addrs(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]));
    let (reply, _) = ask(&zone, "www.svc.example.", RecordType::AAAA, Transport::Udp);
    assert_eq!(answered(&reply), addrs(&["2001:db8::1"]));
}

#[test]
fn a_changed_answer_set_is_answered_at_once() {
    let mut zone = zone();
    assert!(zone.set_addresses("www", addrs(&["10.0.0.2"])));
    assert!(
        !zone.set_addresses("www", addrs(&["10.0.0.2"])),
        "no change"
    );
    let (reply, _) = ask(&zone, "www.svc.example.", RecordType::A, Transport::Udp);
    assert_eq!(answered(&reply), addrs(&["10.0.0.2"]));
}

#[test]
fn nxdomain_refused_and_nodata_carry_the_right_rcode_and_soa() {
    let zone = zone();
    let (reply, outcome) = ask(&zone, "nope.svc.example.", RecordType::A, Transport::Udp);
    assert_eq!(reply.response_code(), ResponseCode::NXDomain);
    assert_eq!(outcome.rcode, "NXDOMAIN");
    assert!(reply.answers().is_empty());
    assert_eq!(reply.name_servers()[0].record_type(), RecordType::SOA);

    let (reply, _) = ask(&zone, "www.other.example.", RecordType::A, Transport::Udp);
    assert_eq!(reply.response_code(), ResponseCode::Refused);
    assert!(!reply.authoritative());
    assert!(reply.answers().is_empty() && reply.name_servers().is_empty());

    for (name, qtype) in [
        ("www.svc.example.", RecordType::MX),
        ("v6.svc.example.", RecordType::A),
        ("b.svc.example.", RecordType::A),
        ("empty.svc.example.", RecordType::A),
        ("svc.example.", RecordType::A),
    ] {
        let (reply, _) = ask(&zone, name, qtype, Transport::Udp);
        assert_eq!(
            reply.response_code(),
            ResponseCode::NoError,
            "{name} {qtype}"
        );
        assert!(reply.answers().is_empty(), "{name} {qtype}");
        assert_eq!(reply.name_servers().len(), 1, "{name} {qtype}");
        assert_eq!(reply.name_servers()[0].record_type(), RecordType::SOA);
    }
}

#[test]
fn the_apex_answers_soa_and_ns() {
    let zone = zone();
    let (reply, _) = ask(&zone, "svc.example.", RecordType::SOA, Transport::Udp);
    let RData::SOA(soa) = reply.answers()[0].data() else {
        panic!("not an SOA");
    };
    assert_eq!(soa.serial(), 42);
    assert_eq!(soa.mname().to_ascii(), "ns.svc.example.");
    let (reply, _) = ask(&zone, "svc.example.", RecordType::NS, Transport::Udp);
    assert_eq!(reply.answers()[0].record_type(), RecordType::NS);
}

#[test]
fn udp_answers_over_the_limit_are_truncated_and_tcp_ones_are_whole() {
    let zone = zone();
    // 60 A records: 12 + 21 + 60 * 16 bytes, over 512.
    let (reply, outcome) = ask(&zone, "big.svc.example.", RecordType::A, Transport::Udp);
    assert!(reply.truncated() && outcome.truncated);
    assert!(reply.answers().is_empty());
    assert_eq!(reply.queries().len(), 1);
    let (reply, outcome) = ask(&zone, "big.svc.example.", RecordType::A, Transport::Tcp);
    assert!(!reply.truncated() && !outcome.truncated);
    assert_eq!(reply.answers().len(), 60);
    // The client's EDNS size lets it through over UDP.
    let outcome = zone.answer(
        &query("big.svc.example.", RecordType::A, Some(4096)),
        Transport::Udp,
    );
    let reply = Message::from_vec(&outcome.reply.unwrap()).unwrap();
    assert!(!reply.truncated());
    assert_eq!(reply.answers().len(), 60);
    assert!(reply.extensions().is_some(), "EDNS answered with EDNS");
}

#[test]
fn malformed_queries_get_formerr_or_nothing() {
    let zone = zone();
    // Too short for a header: nothing to answer to.
    for bytes in [&[][..], &[0x12][..], &[0x12, 0x34, 0, 0, 0][..]] {
        let outcome = zone.answer(bytes, Transport::Udp);
        assert!(outcome.reply.is_none());
        assert_eq!(outcome.rcode, "dropped");
    }
    // A header that promises a question that is not there.
    let header = [0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    let outcome = zone.answer(&header, Transport::Udp);
    let reply = Message::from_vec(&outcome.reply.unwrap()).unwrap();
    assert_eq!(reply.response_code(), ResponseCode::FormErr);
    assert_eq!(reply.id(), 0x1234);
    // A response is never answered (no error loops between servers).
    let mut response = query("www.svc.example.", RecordType::A, None);
    response[2] |= 0x80;
    assert!(zone.answer(&response, Transport::Udp).reply.is_none());
    // Labels pointing at themselves, and random bytes, for a while.
    let mut looped = header.to_vec();
    looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    let _ = zone.answer(&looped, Transport::Udp);
    let mut state = 0x9e37_79b9_u32;
    for length in 0..2000 {
        let bytes: Vec<u8> = (0..length % 300)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state as u8
            })
            .collect();
        let _ = zone.answer(&bytes, Transport::Udp);
    }
}

#[test]
fn other_opcodes_are_not_implemented_and_two_questions_are_formerr() {
    let zone = zone();
    let mut message = Message::from_vec(&query("www.svc.example.", RecordType::A, None)).unwrap();
    message.set_op_code(OpCode::Update);
    let outcome = zone.answer(&message.to_vec().unwrap(), Transport::Udp);
    assert_eq!(outcome.rcode, "NOTIMP");
    let mut message = Message::from_vec(&query("www.svc.example.", RecordType::A, None)).unwrap();
    message.add_query(Query::query(
        Name::from_ascii("v6.svc.example.").unwrap(),
        RecordType::AAAA,
    ));
    let outcome = zone.answer(&message.to_vec().unwrap(), Transport::Udp);
    assert_eq!(outcome.rcode, "FORMERR");
}
