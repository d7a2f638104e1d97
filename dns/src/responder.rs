//! Answering one query, given as raw bytes, from the catalog.
//!
//! The responder is synchronous and does no I/O: the datapath thread calls it for every query
//! that arrives as a frame, and the host-side listener calls it for queries on host sockets.
//! What it cannot answer itself it hands back as [`Outcome::Forward`]; the caller relays the
//! query bytes upstream (see [`crate::upstream`]).
//!
//! hickory-server's `RequestHandler` is async and built around its own server loop; answering
//! inline in the datapath thread needs a plain function, so this module builds on hickory-proto's
//! `Message` directly, as aardvark-dns does.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU32, Ordering};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use crate::catalog::{Catalog, SharedCatalog, Upstreams, Zone};

mod special;

pub use special::HOST_NAMES;

/// Default TTL of container records, in seconds. Short, because a container that restarts may
/// come back with another address and clients that cache should notice soon; not zero, so a
/// burst of lookups by one client (happy eyeballs: A and AAAA, then a retry) is answered from
/// its cache. Configurable with `vswitch daemon --dns-ttl`.
pub const DEFAULT_TTL: u32 = 5;

/// Largest UDP answer without EDNS (RFC 1035).
const CLASSIC_UDP_MAX: usize = 512;
/// The EDNS buffer size we advertise and cap answers at (the DNS flag day 2020 value).
const EDNS_UDP_MAX: u16 = 1232;

/// Who asked.
#[derive(Debug, Clone, Copy)]
pub enum Asker<'a> {
    /// An endpoint (or anything else) on the virtual network `network_id`, from address
    /// `client`. `namespace`: the scope key of the port the query came in on, when the caller
    /// knows it; it decides what the asker sees, not the address, which a port without
    /// port security could spoof.
    Network {
        network_id: &'a str,
        client: IpAddr,
        namespace: Option<&'a str>,
    },
    /// A process on the host, through `--dns-listen`: sees every network, but only as
    /// `name.network`.
    Host,
}

/// How the query arrived; UDP answers are size-limited and may be truncated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What to do with a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Not ours: relay the query upstream (unchanged, keeping the transport), to these
    /// servers (a network's own), or to the daemon's (`None`).
    Forward(Option<Upstreams>),
    /// Not a query at all (a response, or too short to answer): send nothing.
    Drop,
}

/// Answers queries from a shared catalog.
#[derive(Debug)]
pub struct Responder {
    catalog: SharedCatalog,
    ttl: u32,
    rotation: AtomicU32,
}

impl Responder {
    pub fn new(catalog: SharedCatalog, ttl: u32) -> Self {
        Self {
            catalog,
            ttl,
            rotation: AtomicU32::new(0),
        }
    }

    pub fn catalog(&self) -> &SharedCatalog {
        &self.catalog
    }

    /// Answers `query`, or says to forward or drop it. Never panics on any input.
    pub fn answer(&self, asker: Asker<'_>, transport: Transport, query: &[u8]) -> Outcome {
        // Header: id (2), flags (2), counts (8). Without a full header there is nothing to
        // answer; with the QR bit set it is a response, and answering responses invites loops.
        let Some(header) = query.first_chunk::<12>() else {
            return Outcome::Drop;
        };
        if header[2] & 0x80 != 0 {
            return Outcome::Drop;
        }
        let id = u16::from_be_bytes([header[0], header[1]]);
        let request = match Message::from_vec(query) {
            Ok(m) => m,
            Err(_) => return Outcome::Reply(error(id, ResponseCode::FormErr)),
        };
        // Every error below echoes the opcode, the RD bit and the question (RFC 1035 4.1.1),
        // and an OPT record to a query that had one.
        let all = request.queries.clone();
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            // RFC 6891 6.1.3: only version 0 is spoken here.
            return self.reply(&request, &all, ResponseCode::BADVERS, vec![], transport);
        }
        if request.metadata.op_code != OpCode::Query {
            return self.reply(&request, &all, ResponseCode::NotImp, vec![], transport);
        }
        let [question] = request.queries.as_slice() else {
            return self.reply(&request, &all, ResponseCode::FormErr, vec![], transport);
        };
        let catalog = self.catalog.read();
        let decision = self.resolve(&catalog, asker, question);
        drop(catalog);
        let (rcode, answers) = match decision {
            Resolution::Forward(via) => match asker {
                Asker::Host => (ResponseCode::Refused, vec![]),
                Asker::Network { .. } => return Outcome::Forward(via),
            },
            Resolution::Refused => (ResponseCode::Refused, vec![]),
            Resolution::NxDomain => (ResponseCode::NXDomain, vec![]),
            Resolution::Answer(records) => (ResponseCode::NoError, records),
        };
        self.reply(
            &request,
            std::slice::from_ref(question),
            rcode,
            answers,
            transport,
        )
    }

    /// A REFUSED answer to `query` (for example when too many forwards are in flight), or
    /// nothing if the query is unparsable.
    pub fn refuse(&self, query: &[u8]) -> Option<Vec<u8>> {
        let request = Message::from_vec(query).ok()?;
        let question = request.queries.first()?.clone();
        match self.reply(
            &request,
            &[question],
            ResponseCode::Refused,
            vec![],
            Transport::Tcp,
        ) {
            Outcome::Reply(b) => Some(b),
            _ => None,
        }
    }

    fn resolve(&self, catalog: &Catalog, asker: Asker<'_>, q: &Query) -> Resolution {
        let qtype = q.query_type();
        if matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
            // No zone transfers, of our zones or through us, in any class.
            return Resolution::Refused;
        }
        let zones: Vec<&Zone> = match asker {
            Asker::Network {
                network_id,
                namespace: Some(key),
                ..
            } => catalog.scope_of(network_id, key),
            Asker::Network {
                network_id, client, ..
            } => catalog.scope(network_id, client),
            Asker::Host => catalog.zones().collect(),
        };
        if q.query_class() != DNSClass::IN {
            // Not ours (CH, HS, ANY...), but no way out of an internal network either.
            return way_out(asker, &zones);
        }
        let name = q.name().to_lowercase().to_ascii();
        let name = name.strip_suffix('.').unwrap_or(&name);
        // Asked as an address: a single label is then a container name or nothing. Any other
        // type of a single label (DS, NS, DNSKEY of a TLD) is the upstream's, even when a
        // network or container has that name: an NXDOMAIN or NODATA for `com` would deny or
        // break the validation of every name under it.
        let address = matches!(qtype, RecordType::A | RecordType::AAAA | RecordType::ANY);
        let ours_to_answer = address || name.contains('.');
        if name.is_empty() {
            // The root (its NS, DNSKEY, SOA...) is the upstream's, whatever the type: a
            // validating resolver in a container starts there.
            return way_out(asker, &zones);
        }
        if let Some(special) = special::resolve(name, qtype, asker, &zones) {
            return match special {
                special::Special::Addresses(addrs) => Resolution::Answer(
                    addrs
                        .into_iter()
                        .map(|rdata| Record::from_rdata(q.name().clone(), self.ttl, rdata))
                        .collect(),
                ),
                special::Special::Nothing => Resolution::NxDomain,
            };
        }

        if let Some(ip) = reverse_name_to_ip(name) {
            if matches!(qtype, RecordType::PTR | RecordType::ANY) {
                for z in zones.iter().filter(|z| z.names) {
                    if let Some(target) = z.reverse(ip) {
                        let Ok(target) = Name::from_ascii(target) else {
                            continue;
                        };
                        return Resolution::Answer(vec![Record::from_rdata(
                            q.name().clone(),
                            self.ttl,
                            RData::PTR(PTR(target)),
                        )]);
                    }
                }
            }
            // An address of one of our networks that nobody (visible) holds: our business, not
            // the upstream's.
            if catalog.zones().any(|z| z.contains_addr(ip)) {
                return Resolution::NxDomain;
            }
            return way_out(asker, &zones);
        }

        let visible = |z: &&&Zone| match asker {
            Asker::Host => z.names && name.ends_with(&format!(".{}", z.name)),
            Asker::Network { .. } => z.names,
        };
        let mut found: Option<Vec<IpAddr>> = None;
        for z in zones.iter().filter(|z| visible(z)) {
            if let Some(entries) = z.lookup(name) {
                found
                    .get_or_insert_with(Vec::new)
                    .extend(entries.iter().map(|(_, a)| *a));
            }
        }
        if let Some(mut addrs) = found {
            addrs.dedup();
            if addrs.len() > 1 {
                let turn = self.rotation.fetch_add(1, Ordering::Relaxed) as usize;
                let n = addrs.len();
                addrs.rotate_left(turn % n);
            }
            let records = addrs
                .into_iter()
                .filter_map(|a| match (a, qtype) {
                    (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => Some(RData::A(A(v4))),
                    (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => {
                        Some(RData::AAAA(AAAA(v6)))
                    }
                    _ => None,
                })
                .map(|rdata| Record::from_rdata(q.name().clone(), self.ttl, rdata))
                .collect();
            // A known name without records of this type is NODATA (NOERROR, no answers), never
            // NXDOMAIN: NXDOMAIN would make resolvers give up on the A record too.
            return Resolution::Answer(records);
        }
        // A network's own name, with names under it, exists (an empty non-terminal): NODATA.
        // NXDOMAIN would deny every name under it (RFC 8020).
        if ours_to_answer
            && zones
                .iter()
                .any(|z| z.names && z.name == name && z.has_names())
        {
            return Resolution::Answer(vec![]);
        }

        // Not found in any zone the asker can see. A name another network holds does not
        // exist for this asker: NXDOMAIN here, never forwarded (upstream could be the host's
        // resolver, which may route that network's domain back to us as the host). But a
        // network's name is not a domain we own outright: `pkg.go.dev` must still resolve next
        // to a network called `dev`, so a name no zone holds goes upstream like any other (as
        // Docker's resolver does). Only the host, which routes exactly these domains to us,
        // gets NXDOMAIN for all of them.
        let own_domain = catalog
            .zones()
            .any(|z| z.names && (name == z.name || name.ends_with(&format!(".{}", z.name))));
        let held_elsewhere = || catalog.zones().any(|z| z.names && z.lookup(name).is_some());
        match asker {
            Asker::Host if own_domain => Resolution::NxDomain,
            Asker::Host => Resolution::Refused,
            Asker::Network { .. } if ours_to_answer && held_elsewhere() => Resolution::NxDomain,
            Asker::Network { .. } => {
                // An unknown single label asked as an address: answered at once on networks
                // with names (the default bridge has none and forwards everything, like
                // Docker).
                if address && !name.contains('.') && zones.first().is_some_and(|z| z.names) {
                    return Resolution::NxDomain;
                }
                way_out(asker, &zones)
            }
        }
    }

    /// The answer to `request`: its id, opcode and RD bit, the `questions` echoed, and an OPT
    /// record if it had one (version 0, our buffer size).
    fn reply(
        &self,
        request: &Message,
        questions: &[Query],
        rcode: ResponseCode,
        answers: Vec<Record>,
        transport: Transport,
    ) -> Outcome {
        let mut msg = Message::response(request.metadata.id, request.metadata.op_code);
        msg.metadata.recursion_desired = request.metadata.recursion_desired;
        msg.metadata.recursion_available = true;
        msg.metadata.authoritative =
            matches!(rcode, ResponseCode::NoError | ResponseCode::NXDomain);
        msg.metadata.response_code = rcode;
        msg.add_queries(questions.iter().cloned());
        msg.insert_answers(answers);
        let limit = match (&request.edns, transport) {
            (_, Transport::Tcp) => usize::from(u16::MAX),
            (Some(edns), Transport::Udp) => usize::from(
                edns.max_payload()
                    .clamp(CLASSIC_UDP_MAX as u16, EDNS_UDP_MAX),
            ),
            (None, Transport::Udp) => CLASSIC_UDP_MAX,
        };
        if request.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(EDNS_UDP_MAX);
            msg.set_edns(edns);
        }
        let Ok(mut bytes) = msg.to_vec() else {
            return Outcome::Reply(error(request.metadata.id, ResponseCode::ServFail));
        };
        if bytes.len() > limit {
            let mut cut = msg.truncate();
            cut.metadata.truncation = true;
            bytes = cut
                .to_vec()
                .unwrap_or_else(|_| error(request.metadata.id, ResponseCode::ServFail));
        }
        Outcome::Reply(bytes)
    }
}

enum Resolution {
    Answer(Vec<Record>),
    NxDomain,
    Refused,
    Forward(Option<Upstreams>),
}

/// What leaves the network for a name that is not ours: forwarded upstream, unless every
/// network of the asker's namespace is internal. An internal network has no way out, but a
/// namespace also on another network does: its queries are forwarded whichever gateway they
/// were sent to (as Docker forwards when any of the container's networks has external
/// access). The host never gets anything forwarded.
///
/// The way out is through the first of those networks that has one, so its own upstreams
/// (`network create --dns`), if it has any, are the ones asked.
fn way_out(asker: Asker<'_>, zones: &[&Zone]) -> Resolution {
    match asker {
        Asker::Host => Resolution::Refused,
        Asker::Network { .. } if !zones.is_empty() && zones.iter().all(|z| z.internal) => {
            Resolution::Refused
        }
        Asker::Network { .. } => Resolution::Forward(
            zones
                .iter()
                .find(|z| !z.internal)
                .and_then(|z| z.upstreams.clone()),
        ),
    }
}

/// A bare error response (no question section) for queries too broken to echo.
fn error(id: u16, rcode: ResponseCode) -> Vec<u8> {
    let mut msg = Message::new(id, MessageType::Response, OpCode::Query);
    msg.metadata.response_code = rcode;
    msg.metadata.recursion_available = true;
    msg.to_vec().unwrap_or_else(|_| {
        // Hand-made fallback: header only, QR set, rcode in the low nibble.
        let [a, b] = id.to_be_bytes();
        vec![
            a,
            b,
            0x80,
            0x80 | (u16::from(rcode) as u8 & 0x0f),
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ]
    })
}

/// `4.3.2.1.in-addr.arpa` -> 1.2.3.4; `b.a.9.8...ip6.arpa` -> the IPv6 address.
fn reverse_name_to_ip(name: &str) -> Option<IpAddr> {
    if let Some(rest) = name.strip_suffix(".in-addr.arpa") {
        let mut octets = [0u8; 4];
        let parts: Vec<&str> = rest.split('.').collect();
        if parts.len() != 4 {
            return None;
        }
        for (i, p) in parts.iter().rev().enumerate() {
            octets[i] = p.parse().ok()?;
        }
        return Some(IpAddr::V4(Ipv4Addr::from(octets)));
    }
    if let Some(rest) = name.strip_suffix(".ip6.arpa") {
        let nibbles: Vec<&str> = rest.split('.').collect();
        if nibbles.len() != 32 {
            return None;
        }
        let mut value: u128 = 0;
        for n in nibbles.iter().rev() {
            let d = u8::from_str_radix(n, 16).ok()?;
            if n.len() != 1 {
                return None;
            }
            value = (value << 4) | u128::from(d);
        }
        return Some(IpAddr::V6(Ipv6Addr::from(value)));
    }
    None
}

#[cfg(test)]
mod tests;
