//! Outbound ping through one shared raw ICMP socket.
//!
//! A raw ICMP socket sees every ICMP message the host receives, so whoever reads it must say
//! which container an echo reply is for. Matching on the container's echo id alone gives one
//! container another's replies (two containers, on two networks, may pick the same id), and
//! scanning every flow for each reply costs the square of the flow count.
//!
//! [`EchoIds`] gives every outbound ping flow an echo id of its own, unique across the whole
//! daemon, as the kernel's ping sockets do with their port. Requests leave with that id
//! ([`with_echo_id`]); a reply is for a flow only if its id, its source (the flow's
//! destination) and its sequence number (one of the flow's recent requests) all match, found
//! with one hash lookup ([`EchoIds::reply`]). Sans-IO: the daemon owns the socket.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use etherparse::{IcmpEchoHeader, Icmpv4Header, Icmpv4Type};

/// How many of a flow's latest sequence numbers a reply may answer.
const RECENT: usize = 16;

/// The default bound on flows sharing the id space (of 65 536 ids).
pub const MAX_ECHO_FLOWS: usize = 32_768;

struct Entry<V> {
    dst: IpAddr,
    recent: [Option<u16>; RECENT],
    next_slot: usize,
    value: V,
}

/// The echo ids handed to outbound ping flows, and whose flow each is.
pub struct EchoIds<V> {
    by_id: HashMap<u16, Entry<V>>,
    next: u16,
    capacity: usize,
}

impl<V> Default for EchoIds<V> {
    fn default() -> Self {
        Self::with_capacity(MAX_ECHO_FLOWS)
    }
}

impl<V> EchoIds<V> {
    /// A table that holds at most `capacity` flows (at most 65 535).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            by_id: HashMap::new(),
            next: 1,
            capacity: capacity.min(usize::from(u16::MAX)),
        }
    }

    /// A new flow to `dst`: its echo id, or `None` when the table is full.
    pub fn allocate(&mut self, dst: IpAddr, value: V) -> Option<u16> {
        if self.by_id.len() >= self.capacity {
            return None;
        }
        // At most half the ids are taken, so a free one is a few steps away on average.
        let id = loop {
            let id = self.next;
            self.next = self.next.wrapping_add(1);
            if !self.by_id.contains_key(&id) {
                break id;
            }
        };
        self.by_id.insert(
            id,
            Entry {
                dst,
                recent: [None; RECENT],
                next_slot: 0,
                value,
            },
        );
        Some(id)
    }

    /// Flow `id` sent a request with sequence number `seq`.
    pub fn sent(&mut self, id: u16, seq: u16) {
        if let Some(e) = self.by_id.get_mut(&id) {
            e.recent[e.next_slot] = Some(seq);
            e.next_slot = (e.next_slot + 1) % RECENT;
        }
    }

    /// The flow an echo reply from `src` with `id` and `seq` answers, if any.
    pub fn reply(&self, src: IpAddr, id: u16, seq: u16) -> Option<&V> {
        let e = self.by_id.get(&id)?;
        (e.dst == src && e.recent.contains(&Some(seq))).then_some(&e.value)
    }

    /// Flow `id` has ended; its id may be handed out again.
    pub fn release(&mut self, id: u16) -> Option<V> {
        self.by_id.remove(&id).map(|e| e.value)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// ICMPv6's echo request and reply types.
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

/// An echo request message (ICMP or ICMPv6 header and payload) with its id replaced: an ICMP
/// one with its checksum, an ICMPv6 one with a zero checksum, which the kernel fills in (it
/// does for every ICMPv6 socket); `None` if `message` is not an echo request.
pub fn with_echo_id(message: &[u8], id: u16) -> Option<Vec<u8>> {
    if message.first() == Some(&ICMPV6_ECHO_REQUEST) && message.len() >= 8 && message[1] == 0 {
        let mut out = message.to_vec();
        out[2..4].copy_from_slice(&[0, 0]);
        out[4..6].copy_from_slice(&id.to_be_bytes());
        return Some(out);
    }
    let (header, payload) = Icmpv4Header::from_slice(message).ok()?;
    let Icmpv4Type::EchoRequest(echo) = header.icmp_type else {
        return None;
    };
    let header = Icmpv4Header::with_checksum(
        Icmpv4Type::EchoRequest(IcmpEchoHeader { id, seq: echo.seq }),
        payload,
    );
    let mut out = header.to_bytes().to_vec();
    out.extend_from_slice(payload);
    Some(out)
}

/// An echo reply read from a raw ICMP socket (IP header first): its source, id, sequence
/// number and ICMP message; `None` for anything else.
pub fn raw_echo_reply(datagram: &[u8]) -> Option<(Ipv4Addr, u16, u16, &[u8])> {
    let ip = etherparse::Ipv4Slice::from_slice(datagram).ok()?;
    if ip.header().protocol() != etherparse::IpNumber::ICMP || ip.is_payload_fragmented() {
        return None;
    }
    let message = ip.payload().payload;
    let (header, _) = Icmpv4Header::from_slice(message).ok()?;
    let Icmpv4Type::EchoReply(echo) = header.icmp_type else {
        return None;
    };
    Some((ip.header().source_addr(), echo.id, echo.seq, message))
}

/// An ICMPv6 echo reply as a raw ICMPv6 socket gives it (no IP header: the source comes with
/// the read): its id and sequence number; `None` for anything else.
pub fn raw_echo_reply6(message: &[u8]) -> Option<(u16, u16)> {
    if message.len() < 8 || message[0] != ICMPV6_ECHO_REPLY || message[1] != 0 {
        return None;
    }
    let id = u16::from_be_bytes([message[4], message[5]]);
    let seq = u16::from_be_bytes([message[6], message[7]]);
    Some((id, seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DST4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 9);
    const DST: IpAddr = IpAddr::V4(DST4);

    #[test]
    fn a_reply_is_for_the_flow_whose_id_destination_and_sequence_it_matches() {
        let mut ids = EchoIds::default();
        // Two containers (on two networks) pinging one destination with the same echo id get
        // ids of their own.
        let a = ids.allocate(DST, "a").expect("id");
        let b = ids.allocate(DST, "b").expect("id");
        assert_ne!(a, b);
        ids.sent(a, 1);
        ids.sent(b, 1);
        assert_eq!(ids.reply(DST, a, 1), Some(&"a"));
        assert_eq!(ids.reply(DST, b, 1), Some(&"b"));
        // Another source, or a sequence never sent, answers nothing.
        assert_eq!(
            ids.reply(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)), a, 1),
            None
        );
        assert_eq!(ids.reply(DST, a, 2), None);
        // Only the latest requests are answered.
        for seq in 2..2 + RECENT as u16 {
            ids.sent(a, seq);
        }
        assert_eq!(ids.reply(DST, a, 1), None);
        assert_eq!(ids.reply(DST, a, 2), Some(&"a"));
        // A released id answers nothing, and comes back in time.
        assert_eq!(ids.release(a), Some("a"));
        assert_eq!(ids.reply(DST, a, 2), None);
        assert_eq!(ids.len(), 1);
    }

    #[test]
    fn the_table_is_bounded_and_ids_are_reused_after_wrapping() {
        let mut ids = EchoIds::with_capacity(3);
        let got: Vec<u16> = (0..3).map(|_| ids.allocate(DST, ()).expect("id")).collect();
        assert_eq!(ids.allocate(DST, ()), None, "full");
        ids.release(got[1]);
        let again = ids.allocate(DST, ()).expect("id after a release");
        assert!(!got.contains(&again) || again == got[1]);
        // Wrap around the whole id space: a taken id is never handed out twice.
        let mut ids = EchoIds::with_capacity(usize::MAX);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..u16::MAX {
            assert!(seen.insert(ids.allocate(DST, ()).expect("id")));
        }
        assert_eq!(ids.allocate(DST, ()), None, "every id taken");
    }

    #[test]
    fn requests_leave_with_the_flows_id_and_a_valid_checksum() {
        let h = Icmpv4Header::with_checksum(
            Icmpv4Type::EchoRequest(IcmpEchoHeader { id: 7, seq: 3 }),
            b"ping",
        );
        let mut m = h.to_bytes().to_vec();
        m.extend_from_slice(b"ping");
        let out = with_echo_id(&m, 4242).expect("echo request");
        let (h, payload) = Icmpv4Header::from_slice(&out).expect("ICMP");
        assert_eq!(
            h.icmp_type,
            Icmpv4Type::EchoRequest(IcmpEchoHeader { id: 4242, seq: 3 })
        );
        assert_eq!(payload, b"ping");
        assert_eq!(h.checksum, h.icmp_type.calc_checksum(payload));
        assert_eq!(with_echo_id(b"junk", 1), None);
        // ICMPv6: the id replaced, the checksum left to the kernel.
        let v6 = [128, 0, 0xab, 0xcd, 0, 7, 0, 3, b'p', b'i'];
        let out = with_echo_id(&v6, 4242).expect("ICMPv6 echo request");
        assert_eq!(out, [128, 0, 0, 0, 0x10, 0x92, 0, 3, b'p', b'i']);
        assert_eq!(
            raw_echo_reply6(&[129, 0, 0, 0, 0x10, 0x92, 0, 3]),
            Some((4242, 3))
        );
        assert_eq!(raw_echo_reply6(&[128, 0, 0, 0, 0x10, 0x92, 0, 3]), None);
        assert_eq!(raw_echo_reply6(&[129, 0, 0]), None);
    }

    #[test]
    fn only_echo_replies_are_read_from_the_raw_socket() {
        let reply = |ty| {
            let mut out = Vec::new();
            etherparse::PacketBuilder::ipv4(DST4.octets(), [10, 0, 0, 2], 64)
                .icmpv4(ty)
                .write(&mut out, b"pong")
                .expect("packet");
            out
        };
        let r = reply(Icmpv4Type::EchoReply(IcmpEchoHeader { id: 9, seq: 4 }));
        let (src, id, seq, message) = raw_echo_reply(&r).expect("echo reply");
        assert_eq!((src, id, seq), (DST4, 9, 4));
        assert_eq!(&message[8..], b"pong");
        let q = reply(Icmpv4Type::EchoRequest(IcmpEchoHeader { id: 9, seq: 4 }));
        assert_eq!(raw_echo_reply(&q), None);
        assert_eq!(raw_echo_reply(&r[..10]), None);
        assert_eq!(raw_echo_reply(&[]), None);
    }
}
