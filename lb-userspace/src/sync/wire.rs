//! The sync datagram: sealing (encode + authenticate) and opening (check + decode).
//!
//! ```text
//! [magic "LBS1" 4 bytes][body_len u16 big-endian][body: postcard(Message), body_len bytes]
//! [tag: HMAC-SHA256(key, magic || body_len || body), 32 bytes]
//! ```
//!
//! Addresses use serde's compact (non-human-readable) form: a variant byte, the octets, and the
//! port as a postcard varint. An IPv6 address's flowinfo and scope id are not sent.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::key::SyncKey;
use super::replay::ReplayGuard;

pub const MAGIC: [u8; 4] = *b"LBS1";
/// Largest datagram we send: fits a 1500-byte MTU with IPv6 and UDP headers.
pub const MAX_DATAGRAM: usize = 1400;
/// Magic and body length.
pub const HEADER_LEN: usize = 6;
/// HMAC-SHA256's output.
pub const TAG_LEN: usize = 32;
/// A datagram whose `sent_unix_ms` is further than this from the receiver's clock, either way,
/// is dropped: it bounds how long a captured datagram can be replayed across a receiver restart
/// (which forgets the replay state), and how far apart the nodes' clocks may be.
pub const STALE_AFTER: Duration = Duration::from_millis(STALE_AFTER_MS);
const STALE_AFTER_MS: u64 = 60_000;

type HmacSha256 = Hmac<Sha256>;

/// One flow, as the XDP program on the sender recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// VIP address + port.
    pub vip: SocketAddr,
    /// 6 TCP, 17 UDP.
    pub proto: u8,
    /// Source address + port.
    pub client: SocketAddr,
    pub backend: IpAddr,
    /// Since the flow was last seen on the sender.
    pub age_ms: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    Heartbeat,
    Flows(Vec<FlowRecord>),
    PullRequest,
    /// Part of a full copy answering a PullRequest.
    PullFlows(Vec<FlowRecord>),
    /// The full copy is over: this many flows were sent in PullFlows.
    PullDone {
        flows: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The sender's sync listen address, its identity.
    pub from: SocketAddr,
    /// The sender's start time, unix ns: larger after a restart.
    pub session: u64,
    /// Per datagram, from 0 within a session.
    pub seq: u64,
    pub sent_unix_ms: u64,
    pub body: Body,
}

/// [`Message`] borrowing its body, so sealing need not clone it. Same fields in the same order,
/// so the same encoding (postcard ignores names).
#[derive(Serialize)]
struct MessageRef<'a> {
    from: SocketAddr,
    session: u64,
    seq: u64,
    sent_unix_ms: u64,
    body: &'a Body,
}

/// Why a received datagram was dropped; `label` is the metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    Truncated,
    Malformed,
    Unauthenticated,
    Replayed,
    Stale,
    UnknownPeer,
    /// Not produced here: for the service's receive queue.
    QueueFull,
}

impl DropReason {
    pub const ALL: [DropReason; 7] = [
        DropReason::Truncated,
        DropReason::Malformed,
        DropReason::Unauthenticated,
        DropReason::Replayed,
        DropReason::Stale,
        DropReason::UnknownPeer,
        DropReason::QueueFull,
    ];

    pub fn label(self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::Malformed => "malformed",
            DropReason::Unauthenticated => "unauthenticated",
            DropReason::Replayed => "replayed",
            DropReason::Stale => "stale",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::QueueFull => "queue_full",
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Milliseconds since the unix epoch by the system clock (0 before the epoch).
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn keyed_mac(key: &SyncKey) -> HmacSha256 {
    // HMAC takes keys of any length; 32 bytes is never refused.
    <HmacSha256 as KeyInit>::new_from_slice(key.as_bytes()).expect("HMAC accepts a 32-byte key")
}

/// The sending side of one node: numbers and authenticates its datagrams.
pub struct Sealer {
    mac: HmacSha256,
    from: SocketAddr,
    session: u64,
    next_seq: u64,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("from", &self.from)
            .field("session", &self.session)
            .field("next_seq", &self.next_seq)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    pub fn new(key: SyncKey, from: SocketAddr, session: u64) -> Self {
        Sealer {
            mac: keyed_mac(&key),
            from,
            session,
            next_seq: 0,
        }
    }

    /// One datagram with the next seq and the current time.
    ///
    /// # Panics
    /// If the datagram would exceed [`MAX_DATAGRAM`]: only a `Flows`/`PullFlows` body can, and
    /// those go through [`Sealer::seal_flows`].
    pub fn seal(&mut self, body: &Body) -> Vec<u8> {
        self.seal_at(body, now_unix_ms())
    }

    /// [`Sealer::seal`] stamped `sent_unix_ms` instead of now (tests of the stale check).
    pub fn seal_at(&mut self, body: &Body, sent_unix_ms: u64) -> Vec<u8> {
        let message = MessageRef {
            from: self.from,
            session: self.session,
            seq: self.next_seq,
            sent_unix_ms,
            body,
        };
        // Serializing plain data into a Vec cannot fail.
        let encoded = postcard::to_stdvec(&message).expect("postcard encodes a Message");
        assert!(
            HEADER_LEN + encoded.len() + TAG_LEN <= MAX_DATAGRAM,
            "sync body of {} bytes does not fit one datagram; use seal_flows for flows",
            encoded.len()
        );
        self.next_seq += 1;
        self.frame(&encoded)
    }

    /// Header, body, tag. The body is not checked: tests use this to authenticate garbage.
    fn frame(&self, body: &[u8]) -> Vec<u8> {
        let body_len = u16::try_from(body.len()).expect("body length fits the u16 length field");
        let mut datagram = Vec::with_capacity(HEADER_LEN + body.len() + TAG_LEN);
        datagram.extend_from_slice(&MAGIC);
        datagram.extend_from_slice(&body_len.to_be_bytes());
        datagram.extend_from_slice(body);
        let mut mac = self.mac.clone();
        mac.update(&datagram);
        datagram.extend_from_slice(&mac.finalize().into_bytes());
        datagram
    }

    /// `records` as few datagrams as fit [`MAX_DATAGRAM`] each (`Body::Flows`, or
    /// `Body::PullFlows` when `pulled`), every one with its own seq, in order. None for no records.
    pub fn seal_flows(&mut self, records: &[FlowRecord], pulled: bool) -> Vec<Vec<u8>> {
        self.seal_flows_at(records, pulled, now_unix_ms())
    }

    pub(crate) fn seal_flows_at(
        &mut self,
        records: &[FlowRecord],
        pulled: bool,
        sent_unix_ms: u64,
    ) -> Vec<Vec<u8>> {
        let budget = MAX_DATAGRAM - self.flows_overhead_bound();
        let mut datagrams = Vec::new();
        let mut start = 0;
        let mut used = 0;
        for (i, record) in records.iter().enumerate() {
            let size = record_size(record);
            if used + size > budget && i > start {
                datagrams.push(self.seal_chunk(&records[start..i], pulled, sent_unix_ms));
                start = i;
                used = 0;
            }
            used += size;
        }
        if start < records.len() {
            datagrams.push(self.seal_chunk(&records[start..], pulled, sent_unix_ms));
        }
        datagrams
    }

    fn seal_chunk(&mut self, chunk: &[FlowRecord], pulled: bool, sent_unix_ms: u64) -> Vec<u8> {
        let body = if pulled {
            Body::PullFlows(chunk.to_vec())
        } else {
            Body::Flows(chunk.to_vec())
        };
        self.seal_at(&body, sent_unix_ms)
    }

    /// Bytes of a flows datagram besides its records, at most: the varints at their longest
    /// (seq and time), and a record count of up to 2 bytes (a count below 16384, which any
    /// datagram's is) where an empty list takes 1.
    fn flows_overhead_bound(&self) -> usize {
        let empty = MessageRef {
            from: self.from,
            session: self.session,
            seq: u64::MAX,
            sent_unix_ms: u64::MAX,
            body: &Body::Flows(Vec::new()),
        };
        let message =
            postcard::experimental::serialized_size(&empty).expect("postcard sizes a Message");
        HEADER_LEN + message + 1 + TAG_LEN
    }
}

/// A record's encoded size, as it is inside a flows body.
pub fn record_size(record: &FlowRecord) -> usize {
    postcard::experimental::serialized_size(record).expect("postcard sizes a FlowRecord")
}

/// The receiving side: the key, the allowed peers and a replay guard for each.
pub struct Opener {
    mac: HmacSha256,
    peers: HashMap<SocketAddr, ReplayGuard>,
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener")
            .field("peers", &self.peers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// How an address compares once it went over the wire (see the module doc).
fn as_sent(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip(), addr.port())
}

impl Opener {
    pub fn new(key: SyncKey, peers: &[SocketAddr]) -> Self {
        Opener {
            mac: keyed_mac(&key),
            peers: peers
                .iter()
                .map(|&p| (as_sent(p), ReplayGuard::new()))
                .collect(),
        }
    }

    /// Checks, in this order: shorter than the header -> Truncated; magic differs -> Malformed;
    /// shorter than header + body_len + tag -> Truncated, longer -> Malformed; tag mismatch ->
    /// Unauthenticated; body does not decode, or has bytes after the message -> Malformed;
    /// `from` not a peer -> UnknownPeer; `sent_unix_ms` more than [`STALE_AFTER`] from
    /// `now_unix_ms` -> Stale; seen before or older than the peer's replay window/session ->
    /// Replayed. Only a datagram that passes everything changes the replay state.
    pub fn open(&mut self, datagram: &[u8], now_unix_ms: u64) -> Result<Message, DropReason> {
        let Some((header, rest)) = datagram.split_first_chunk::<HEADER_LEN>() else {
            return Err(DropReason::Truncated);
        };
        if header[..4] != MAGIC {
            return Err(DropReason::Malformed);
        }
        let body_len = usize::from(u16::from_be_bytes([header[4], header[5]]));
        let expected = body_len + TAG_LEN;
        if rest.len() < expected {
            return Err(DropReason::Truncated);
        }
        if rest.len() > expected {
            return Err(DropReason::Malformed);
        }
        let (signed, tag) = datagram.split_at(HEADER_LEN + body_len);
        let mut mac = self.mac.clone();
        mac.update(signed);
        // Constant time, so a forger learns nothing from how fast a guess is refused.
        mac.verify_slice(tag)
            .map_err(|_| DropReason::Unauthenticated)?;

        let body = &signed[HEADER_LEN..];
        let message = match postcard::take_from_bytes::<Message>(body) {
            Ok((message, [])) => message,
            _ => return Err(DropReason::Malformed),
        };
        let guard = self
            .peers
            .get_mut(&message.from)
            .ok_or(DropReason::UnknownPeer)?;
        if message.sent_unix_ms.abs_diff(now_unix_ms) > STALE_AFTER_MS {
            return Err(DropReason::Stale);
        }
        if !guard.check_and_record(message.session, message.seq) {
            return Err(DropReason::Replayed);
        }
        Ok(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6};

    const NOW: u64 = 1_750_000_000_000;
    const SESSION: u64 = 1_750_000_000_000_000_000;

    fn key() -> SyncKey {
        SyncKey::from_bytes([7; 32])
    }

    fn me() -> SocketAddr {
        "192.0.2.1:7946".parse().unwrap()
    }

    fn peer() -> SocketAddr {
        "192.0.2.2:7946".parse().unwrap()
    }

    fn peer6() -> SocketAddr {
        "[2001:db8::2]:7946".parse().unwrap()
    }

    fn opener() -> Opener {
        Opener::new(key(), &[me(), peer(), peer6()])
    }

    fn v4_record(i: u32) -> FlowRecord {
        FlowRecord {
            vip: "10.0.0.1:80".parse().unwrap(),
            proto: 6,
            client: SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(0xc633_6400 + i)),
                32768 + (i % 28000) as u16,
            ),
            backend: IpAddr::V4(Ipv4Addr::new(10, 1, 0, (i % 250) as u8)),
            age_ms: i * 17,
        }
    }

    fn v6_record(i: u32) -> FlowRecord {
        FlowRecord {
            vip: "[2001:db8::80]:443".parse().unwrap(),
            proto: 17,
            client: SocketAddr::new(
                IpAddr::V6(Ipv6Addr::new(
                    0x2001,
                    0xdb8,
                    1,
                    2,
                    3,
                    4,
                    (i >> 16) as u16,
                    i as u16,
                )),
                49152 + (i % 16000) as u16,
            ),
            backend: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xb, 0, 0, 0, 0, i as u16)),
            age_ms: i * 31,
        }
    }

    /// The largest a record can encode to.
    fn worst_v6_record() -> FlowRecord {
        FlowRecord {
            vip: SocketAddr::new(IpAddr::V6(Ipv6Addr::from(u128::MAX)), u16::MAX),
            proto: 255,
            client: SocketAddr::new(IpAddr::V6(Ipv6Addr::from(u128::MAX)), u16::MAX),
            backend: IpAddr::V6(Ipv6Addr::from(u128::MAX)),
            age_ms: u32::MAX,
        }
    }

    fn all_bodies() -> Vec<Body> {
        vec![
            Body::Heartbeat,
            Body::Flows(vec![v4_record(1), v6_record(2)]),
            Body::Flows(Vec::new()),
            Body::PullRequest,
            Body::PullFlows(vec![v6_record(3), v4_record(4), v4_record(5)]),
            Body::PullDone { flows: 123_456 },
        ]
    }

    fn open_ok(opener: &mut Opener, datagram: &[u8], now: u64) -> Message {
        opener
            .open(datagram, now)
            .unwrap_or_else(|r| panic!("dropped as {r}: {datagram:02x?}"))
    }

    fn assert_drop(opener: &mut Opener, datagram: &[u8], now: u64, want: DropReason, what: &str) {
        match opener.open(datagram, now) {
            Err(got) => assert_eq!(got, want, "{what}: {datagram:02x?}"),
            Ok(m) => panic!("{what}: accepted {m:?}, expected {want}"),
        }
    }

    #[test]
    fn every_body_round_trips() {
        let mut sealer = Sealer::new(key(), peer(), SESSION);
        let mut opener = opener();
        for (seq, body) in all_bodies().into_iter().enumerate() {
            let datagram = sealer.seal_at(&body, NOW + seq as u64);
            let message = open_ok(&mut opener, &datagram, NOW);
            assert_eq!(
                message,
                Message {
                    from: peer(),
                    session: SESSION,
                    seq: seq as u64,
                    sent_unix_ms: NOW + seq as u64,
                    body,
                }
            );
        }
    }

    #[test]
    fn seal_uses_the_clock() {
        let mut sealer = Sealer::new(key(), peer6(), SESSION);
        let before = now_unix_ms();
        let datagram = sealer.seal(&Body::Heartbeat);
        let message = open_ok(&mut opener(), &datagram, now_unix_ms());
        assert!(message.sent_unix_ms >= before && message.sent_unix_ms <= now_unix_ms());
        assert_eq!(message.from, peer6());
    }

    #[test]
    fn header_layout_and_tag_position() {
        let mut sealer = Sealer::new(key(), peer(), SESSION);
        let body = Body::Flows(vec![v4_record(9)]);
        let datagram = sealer.seal_at(&body, NOW);
        assert_eq!(&datagram[..4], b"LBS1");
        let body_len = datagram.len() - HEADER_LEN - TAG_LEN;
        assert_eq!(
            datagram[4..6],
            [(body_len >> 8) as u8, body_len as u8],
            "length is big-endian"
        );
        let message: Message = postcard::from_bytes(&datagram[6..6 + body_len])
            .unwrap_or_else(|e| panic!("body does not decode alone: {e}"));
        assert_eq!(message.body, body);
        // The tag is the last 32 bytes, over everything before it.
        let mut mac = HmacSha256::new_from_slice(&[7; 32]).unwrap();
        mac.update(&datagram[..datagram.len() - TAG_LEN]);
        assert_eq!(
            &datagram[datagram.len() - TAG_LEN..],
            &mac.finalize().into_bytes()[..]
        );
    }

    #[test]
    fn body_length_above_255_uses_both_bytes() {
        let mut sealer = Sealer::new(key(), peer(), SESSION);
        let records: Vec<_> = (0..10).map(v6_record).collect();
        let datagram = sealer.seal_at(&Body::Flows(records), NOW);
        let body_len = datagram.len() - HEADER_LEN - TAG_LEN;
        assert!(body_len > 255, "{body_len}");
        assert_eq!(
            u16::from_be_bytes([datagram[4], datagram[5]]) as usize,
            body_len
        );
    }

    #[test]
    fn other_key_is_unauthenticated() {
        let mut sealer = Sealer::new(SyncKey::from_bytes([8; 32]), peer(), SESSION);
        let datagram = sealer.seal_at(&Body::Heartbeat, NOW);
        assert_drop(
            &mut opener(),
            &datagram,
            NOW,
            DropReason::Unauthenticated,
            "other key",
        );
    }

    #[test]
    fn tampered_body_or_tag_is_unauthenticated() {
        let mut sealer = Sealer::new(key(), peer(), SESSION);
        let datagram = sealer.seal_at(&Body::PullDone { flows: 5 }, NOW);
        let mut opener = opener();
        for i in HEADER_LEN..datagram.len() {
            let mut bad = datagram.clone();
            bad[i] ^= 0x01;
            assert_drop(
                &mut opener,
                &bad,
                NOW,
                DropReason::Unauthenticated,
                &format!("byte {i}"),
            );
        }
        open_ok(&mut opener, &datagram, NOW);
    }

    #[test]
    fn replays_and_sessions() {
        let mut opener = opener();
        let mut old = Sealer::new(key(), peer(), SESSION);
        let first = old.seal_at(&Body::Heartbeat, NOW);
        let second = old.seal_at(&Body::Heartbeat, NOW);
        open_ok(&mut opener, &second, NOW);
        open_ok(&mut opener, &first, NOW); // reordered: fine
        assert_drop(&mut opener, &first, NOW, DropReason::Replayed, "replay");
        assert_drop(&mut opener, &second, NOW, DropReason::Replayed, "replay");

        // The peer restarts: a newer session, seq from 0 again.
        let mut new = Sealer::new(key(), peer(), SESSION + 1);
        let restarted = new.seal_at(&Body::Heartbeat, NOW);
        open_ok(&mut opener, &restarted, NOW);
        let third = old.seal_at(&Body::Heartbeat, NOW);
        assert_drop(
            &mut opener,
            &third,
            NOW,
            DropReason::Replayed,
            "older session",
        );

        // Peers have their own guards: the same (session, seq) from another peer is fine.
        let mut other = Sealer::new(key(), peer6(), SESSION);
        open_ok(&mut opener, &other.seal_at(&Body::Heartbeat, NOW), NOW);
    }

    #[test]
    fn unknown_sender_is_refused() {
        let stranger: SocketAddr = "192.0.2.99:7946".parse().unwrap();
        let mut sealer = Sealer::new(key(), stranger, SESSION);
        let datagram = sealer.seal_at(&Body::Heartbeat, NOW);
        assert_drop(
            &mut opener(),
            &datagram,
            NOW,
            DropReason::UnknownPeer,
            "stranger",
        );
        // Same address, other port: another identity.
        let mut sealer = Sealer::new(key(), "192.0.2.2:7947".parse().unwrap(), SESSION);
        let datagram = sealer.seal_at(&Body::Heartbeat, NOW);
        assert_drop(
            &mut opener(),
            &datagram,
            NOW,
            DropReason::UnknownPeer,
            "other port",
        );
    }

    #[test]
    fn scope_id_of_a_configured_peer_does_not_matter() {
        let link_local = SocketAddr::V6(SocketAddrV6::new("fe80::2".parse().unwrap(), 7946, 0, 3));
        let mut opener = Opener::new(key(), &[link_local]);
        let mut sealer = Sealer::new(key(), link_local, SESSION);
        let message = open_ok(&mut opener, &sealer.seal_at(&Body::Heartbeat, NOW), NOW);
        assert_eq!(message.from, as_sent(link_local));
    }

    #[test]
    fn stale_either_way() {
        let mut opener = opener();
        let mut sealer = Sealer::new(key(), peer(), SESSION);
        let limit = STALE_AFTER.as_millis() as u64;
        for (sent, stale) in [
            (NOW - limit - 1, true),
            (NOW + limit + 1, true),
            (NOW - limit, false),
            (NOW + limit, false),
            (0, true),
        ] {
            let datagram = sealer.seal_at(&Body::Heartbeat, sent);
            if stale {
                assert_drop(
                    &mut opener,
                    &datagram,
                    NOW,
                    DropReason::Stale,
                    &format!("sent {sent}"),
                );
            } else {
                open_ok(&mut opener, &datagram, NOW);
            }
        }
    }

    #[test]
    fn refused_datagrams_leave_the_replay_state_alone() {
        let mut opener = opener();
        // A stale datagram of a newer session must not reset the peer's session...
        let mut newer = Sealer::new(key(), peer(), SESSION + 1);
        let stale = newer.seal_at(&Body::Heartbeat, NOW - 2 * STALE_AFTER_MS);
        assert_drop(&mut opener, &stale, NOW, DropReason::Stale, "stale");
        let mut current = Sealer::new(key(), peer(), SESSION);
        open_ok(&mut opener, &current.seal_at(&Body::Heartbeat, NOW), NOW);
        // ...nor mark its seq as seen: the same datagram, in time, is accepted.
        open_ok(&mut opener, &stale, NOW - 2 * STALE_AFTER_MS);
    }

    #[test]
    fn every_truncation_is_truncated() {
        let mut sealer = Sealer::new(key(), peer(), SESSION);
        let datagram = sealer.seal_at(&Body::Flows(vec![v4_record(1), v6_record(1)]), NOW);
        let mut opener = opener();
        for len in 0..datagram.len() {
            assert_drop(
                &mut opener,
                &datagram[..len],
                NOW,
                DropReason::Truncated,
                &format!("first {len} of {} bytes", datagram.len()),
            );
        }
        open_ok(&mut opener, &datagram, NOW);
    }

    #[test]
    fn extra_byte_and_garbage_are_malformed() {
        let mut sealer = Sealer::new(key(), peer(), SESSION);
        let mut opener = opener();
        let mut datagram = sealer.seal_at(&Body::Heartbeat, NOW);
        datagram.push(0);
        assert_drop(
            &mut opener,
            &datagram,
            NOW,
            DropReason::Malformed,
            "one extra byte",
        );

        assert_drop(
            &mut opener,
            &[0xab; 100],
            NOW,
            DropReason::Malformed,
            "garbage",
        );
        assert_drop(
            &mut opener,
            b"LBS2\0\0",
            NOW,
            DropReason::Malformed,
            "other magic",
        );
        let mut framed = b"LBS1\x00\x00".to_vec();
        framed.extend_from_slice(&[0; 40]);
        assert_drop(
            &mut opener,
            &framed,
            NOW,
            DropReason::Malformed,
            "length too small",
        );
    }

    #[test]
    fn authenticated_bodies_that_do_not_decode_are_malformed() {
        let sealer = Sealer::new(key(), peer(), SESSION);
        let mut opener = opener();
        let good = postcard::to_stdvec(&Message {
            from: peer(),
            session: SESSION,
            seq: 0,
            sent_unix_ms: NOW,
            body: Body::Heartbeat,
        })
        .unwrap();
        let mut trailing = good.clone();
        trailing.push(0);
        let mut bad_variant = good.clone();
        *bad_variant.last_mut().unwrap() = 5; // Body has variants 0..=4
        for (what, body) in [
            ("empty", Vec::new()),
            ("trailing byte", trailing),
            ("cut short", good[..good.len() - 1].to_vec()),
            ("unknown variant", bad_variant),
            ("garbage", vec![0xff; 50]),
        ] {
            assert_drop(
                &mut opener,
                &sealer.frame(&body),
                NOW,
                DropReason::Malformed,
                what,
            );
        }
        // The same framing of the good body is accepted: the cases above differ only in it.
        open_ok(&mut opener, &sealer.frame(&good), NOW);
    }

    #[test]
    fn record_sizes() {
        let v4 = v4_record(1000);
        let v6 = v6_record(1000);
        // vip 1+4+1 (port 80), proto 1, client 1+4+3, backend 1+4, age 3.
        assert_eq!(record_size(&v4), 23, "{v4:?}");
        // vip 1+16+2 (port 443), proto 1, client 1+16+3, backend 1+16, age 3.
        assert_eq!(record_size(&v6), 60, "{v6:?}");
        assert_eq!(record_size(&worst_v6_record()), 63);
        let sealer = Sealer::new(key(), peer(), SESSION);
        assert_eq!(
            sealer.flows_overhead_bound(),
            6 + (1 + 4 + 2) + 9 + 10 + 10 + 1 + 2 + 32
        );
        let sealer = Sealer::new(key(), peer6(), SESSION);
        assert_eq!(
            sealer.flows_overhead_bound(),
            6 + (1 + 16 + 2) + 9 + 10 + 10 + 1 + 2 + 32
        );
    }

    #[test]
    fn seal_flows_splits_1000_records_in_order() {
        let records: Vec<_> = (0..1000)
            .map(|i| {
                if i % 3 == 0 {
                    v6_record(i)
                } else {
                    v4_record(i)
                }
            })
            .collect();
        for pulled in [false, true] {
            let mut sealer = Sealer::new(key(), peer6(), SESSION);
            let mut opener = opener();
            let datagrams = sealer.seal_flows_at(&records, pulled, NOW);
            let mut chunks: Vec<Vec<FlowRecord>> = Vec::new();
            for (i, datagram) in datagrams.iter().enumerate() {
                assert!(
                    datagram.len() <= MAX_DATAGRAM,
                    "datagram {i}: {} bytes",
                    datagram.len()
                );
                let message = open_ok(&mut opener, datagram, NOW);
                assert_eq!(message.seq, i as u64);
                match (pulled, message.body) {
                    (false, Body::Flows(r)) | (true, Body::PullFlows(r)) => {
                        assert!(!r.is_empty(), "datagram {i} is empty");
                        chunks.push(r);
                    }
                    (_, body) => panic!("datagram {i}, pulled {pulled}: body {body:?}"),
                }
            }
            assert_eq!(chunks.concat(), records, "pulled {pulled}");
            // As few as fit: the next record would not have fitted, but for the slack of the
            // overhead bound (longest varints) over the actual overhead.
            for i in 1..datagrams.len() {
                let next = record_size(&chunks[i][0]);
                assert!(
                    datagrams[i - 1].len() + next > MAX_DATAGRAM - 16,
                    "datagram {}: {} bytes, next record {next}",
                    i - 1,
                    datagrams[i - 1].len()
                );
            }
        }
    }

    #[test]
    fn seal_flows_worst_case_records_fit() {
        for (from, record) in [
            (peer6(), worst_v6_record()),
            (peer(), v4_record(7)),
            (peer6(), v6_record(7)),
        ] {
            let records = vec![record; 500];
            let mut sealer = Sealer::new(key(), from, u64::MAX);
            sealer.next_seq = u64::MAX - 100;
            let datagrams = sealer.seal_flows_at(&records, false, u64::MAX);
            let per = records.len().div_ceil(datagrams.len());
            for (i, d) in datagrams.iter().enumerate() {
                assert!(
                    d.len() <= MAX_DATAGRAM,
                    "{from} datagram {i}: {} bytes",
                    d.len()
                );
                if i + 1 < datagrams.len() {
                    // Full ones are within one record of the limit.
                    assert!(
                        d.len() + record_size(&records[0]) > MAX_DATAGRAM - 16,
                        "{i}: {}",
                        d.len()
                    );
                }
            }
            assert!(per >= 20, "{from}: {per} records per datagram");
        }
    }

    #[test]
    fn seal_flows_of_nothing_sends_nothing() {
        let mut sealer = Sealer::new(key(), peer(), SESSION);
        assert!(sealer.seal_flows(&[], false).is_empty());
        assert!(sealer.seal_flows(&[], true).is_empty());
        assert_eq!(sealer.next_seq, 0, "a seq was spent");
    }

    #[test]
    #[should_panic(expected = "does not fit one datagram")]
    fn seal_refuses_oversized_bodies() {
        let mut sealer = Sealer::new(key(), peer(), SESSION);
        sealer.seal_at(&Body::Flows((0..100).map(v6_record).collect()), NOW);
    }

    #[test]
    fn drop_reason_labels() {
        let labels: Vec<_> = DropReason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(
            labels,
            [
                "truncated",
                "malformed",
                "unauthenticated",
                "replayed",
                "stale",
                "unknown_peer",
                "queue_full"
            ]
        );
        assert_eq!(DropReason::UnknownPeer.to_string(), "unknown_peer");
    }

    /// xorshift64: deterministic, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn byte(&mut self) -> u8 {
            self.next() as u8
        }

        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.byte()).collect()
        }
    }

    #[test]
    fn fuzz_open_never_panics_and_refuses_mutations() {
        const ROUNDS: usize = 200_000;
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut sealer = Sealer::new(key(), peer(), SESSION);
        let mut opener = opener();
        let mut pool: Vec<Vec<u8>> = all_bodies()
            .iter()
            .map(|b| sealer.seal_at(b, NOW))
            .collect();
        // One full datagram and one short: larger ones cost MAC time (sha2 is unoptimised in
        // debug builds) without reaching more code.
        let big: Vec<_> = (0..65).map(v4_record).collect();
        pool.extend(sealer.seal_flows_at(&big, true, NOW));
        assert_eq!(pool.len(), 8, "the full datagram did not split as planned");
        // Open each once: from then on a byte-identical copy is a replay, so every fuzzed
        // datagram below must be refused.
        for d in &pool {
            open_ok(&mut opener, d, NOW);
        }
        let strangers: [SocketAddr; 2] = [
            "192.0.2.99:7946".parse().unwrap(),
            "[2001:db8::99]:1".parse().unwrap(),
        ];

        let bodies = all_bodies();
        let mut counts: HashMap<(&str, Result<(), DropReason>), usize> = HashMap::new();
        for round in 0..ROUNDS {
            let base = &pool[rng.below(pool.len())];
            let (kind, datagram) = match rng.below(11) {
                0 => {
                    let mut d = base.clone();
                    for _ in 0..1 + rng.below(4) {
                        let bit = rng.below(d.len() * 8);
                        d[bit / 8] ^= 1 << (bit % 8);
                    }
                    ("bit flips", d)
                }
                1 => {
                    let mut d = base.clone();
                    for _ in 0..1 + rng.below(4) {
                        let i = rng.below(d.len());
                        d[i] = rng.byte();
                    }
                    ("overwrites", d)
                }
                2 => ("truncation", base[..rng.below(base.len())].to_vec()),
                9 | 10 => {
                    // The magic and length field: refused before the MAC is computed.
                    let mut d = base.clone();
                    let i = rng.below(HEADER_LEN);
                    d[i] = d[i].wrapping_add(1 + rng.below(255) as u8);
                    ("header", d)
                }
                3 => {
                    let mut d = base.clone();
                    let at = rng.below(d.len() + 1);
                    let n = 1 + rng.below(8);
                    let extra = rng.bytes(n);
                    d.splice(at..at, extra);
                    ("insertion", d)
                }
                4 => {
                    // Random bytes, sometimes behind a real magic and a consistent length so
                    // they get as far as the MAC.
                    let max = if rng.below(8) == 0 {
                        MAX_DATAGRAM + 100
                    } else {
                        200
                    };
                    let n = rng.below(max);
                    let mut d = rng.bytes(n);
                    if d.len() >= HEADER_LEN + TAG_LEN && rng.below(2) == 0 {
                        d[..4].copy_from_slice(&MAGIC);
                        let body_len = (d.len() - HEADER_LEN - TAG_LEN) as u16;
                        d[4..6].copy_from_slice(&body_len.to_be_bytes());
                    }
                    ("garbage", d)
                }
                5 => ("replay", base.clone()),
                6 => {
                    // Authentic random bodies: exercise the postcard decoder.
                    let n = rng.below(120);
                    let body = rng.bytes(n);
                    ("random body", sealer.frame(&body))
                }
                7 => {
                    // An authentic message with its encoding cut or extended by a byte.
                    let mut body = base[HEADER_LEN..base.len() - TAG_LEN].to_vec();
                    if rng.below(2) == 0 {
                        body.pop();
                    } else {
                        body.push(rng.byte());
                    }
                    ("bad body length", sealer.frame(&body))
                }
                _ => {
                    // Well-formed messages with random identities, times and numbering.
                    let from = match rng.below(4) {
                        0 => strangers[rng.below(2)],
                        1 => peer6(),
                        _ => peer(),
                    };
                    let sent = NOW - 90_000 + rng.below(180_000) as u64;
                    // One keyed MAC reused: keying costs as much as a short datagram.
                    let mut s = Sealer {
                        from,
                        session: SESSION - 2 + rng.below(4) as u64,
                        next_seq: rng.below(3000) as u64,
                        mac: sealer.mac.clone(),
                    };
                    let d = s.seal_at(&bodies[rng.below(bodies.len())], sent);
                    let result = opener.open(&d, NOW);
                    if strangers.contains(&from) {
                        assert_eq!(result, Err(DropReason::UnknownPeer), "round {round}");
                    } else if sent.abs_diff(NOW) > STALE_AFTER_MS {
                        assert_eq!(result, Err(DropReason::Stale), "round {round}");
                    } else {
                        assert!(
                            matches!(result, Ok(_) | Err(DropReason::Replayed)),
                            "round {round}: {result:?}"
                        );
                    }
                    *counts
                        .entry(("structured", result.map(|_| ())))
                        .or_default() += 1;
                    continue;
                }
            };
            let result = opener.open(&datagram, NOW);
            assert!(
                result.is_err(),
                "round {round}: {kind} of a valid datagram accepted: {datagram:02x?}"
            );
            *counts.entry((kind, result.map(|_| ()))).or_default() += 1;
        }

        let mut report: Vec<_> = counts.iter().collect();
        report.sort_by_key(|((kind, r), _)| (*kind, format!("{r:?}")));
        let hit =
            |kind: &str, reason: DropReason| counts.get(&(kind, Err(reason))).copied().unwrap_or(0);
        let any = |reason: DropReason| {
            counts
                .iter()
                .filter(|((_, r), _)| *r == Err(reason))
                .map(|(_, n)| n)
                .sum::<usize>()
        };
        for reason in DropReason::ALL {
            if reason != DropReason::QueueFull {
                assert!(any(reason) > 0, "{reason} never hit: {report:?}");
            }
        }
        assert!(hit("random body", DropReason::Malformed) > 0, "{report:?}");
        assert!(
            hit("bad body length", DropReason::Malformed) > 0,
            "{report:?}"
        );
        assert!(
            hit("bit flips", DropReason::Unauthenticated) > 0,
            "{report:?}"
        );
        assert!(hit("replay", DropReason::Replayed) > 0, "{report:?}");
        assert!(hit("header", DropReason::Truncated) > 0, "{report:?}");
        assert!(hit("header", DropReason::Malformed) > 0, "{report:?}");
        assert!(
            counts.get(&("structured", Ok(()))).copied().unwrap_or(0) > 0,
            "{report:?}"
        );
        let total: usize = counts.values().sum();
        assert_eq!(total, ROUNDS);
    }
}
