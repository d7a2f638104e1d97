//! Answers given lately, kept byte for byte for the same query again.
//!
//! A local answer depends only on the query's bytes (apart from its id), on who asked and on
//! the catalog, so a query repeated from the same place, while the catalog has not changed, can
//! have the same answer with its id patched, without parsing or encoding anything. Clients ask
//! the same names over and over (each connection of a service to its database, say), and this
//! is what they cost then.
//!
//! Kept: local answers (never a forward or a drop) to UDP queries of at most
//! [`MAX_QUERY`] bytes, with at most one answer record: a name with several addresses rotates
//! them from one answer to the next, so its answers are never repeated. An entry is good for
//! one catalog generation only. The cache belongs to one caller (a datapath thread), so it
//! needs no lock; it holds at most [`MAX_ENTRIES`] entries, and when full one entry makes way
//! for the next, so a flood of unique queries churns the cache without wiping it at once.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::net::IpAddr;

use crate::responder::{Asker, Outcome, Responder, Transport};

/// Entries at most: about 2 KiB each at worst (a 512-byte query, a 1232-byte answer).
pub const MAX_ENTRIES: usize = 1024;
/// Longest query kept (a question and an OPT record fit many times over).
pub const MAX_QUERY: usize = 512;

struct Entry {
    network_id: Box<str>,
    namespace: Option<Box<str>>,
    client: IpAddr,
    /// The query without its id.
    query: Box<[u8]>,
    answer: Box<[u8]>,
}

/// A caller's recent local answers (see the module docs).
pub struct AnswerCache {
    hasher: RandomState,
    generation: u64,
    entries: HashMap<u64, Entry>,
    hits: u64,
}

impl Default for AnswerCache {
    fn default() -> Self {
        Self {
            hasher: RandomState::new(),
            generation: 0,
            entries: HashMap::new(),
            hits: 0,
        }
    }
}

impl std::fmt::Debug for AnswerCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnswerCache")
            .field("entries", &self.entries.len())
            .field("hits", &self.hits)
            .finish()
    }
}

impl AnswerCache {
    /// What `responder` would answer to `query` over UDP from `asker`: from the cache when it
    /// can be, else from the responder (and kept if it may be).
    pub fn answer_udp(&mut self, responder: &Responder, asker: Asker<'_>, query: &[u8]) -> Outcome {
        let Asker::Network {
            network_id,
            client,
            namespace,
        } = asker
        else {
            return responder.answer(asker, Transport::Udp, query);
        };
        let Some((id, body)) = query.split_first_chunk::<2>() else {
            return responder.answer(asker, Transport::Udp, query);
        };
        if query.len() > MAX_QUERY {
            return responder.answer(asker, Transport::Udp, query);
        }
        let generation = responder.catalog().read().generation();
        if generation != self.generation {
            self.entries.clear();
            self.generation = generation;
        }
        // With the port's scope known, the client's address changes nothing in the answer:
        // it is left out, so spoofed sources cannot multiply the entries.
        let client = match namespace {
            Some(_) => IpAddr::from([0u8; 4]),
            None => client,
        };
        let key = self.key(network_id, namespace, client, body);
        if let Some(e) = self.entries.get(&key)
            && e.client == client
            && *e.network_id == *network_id
            && e.namespace.as_deref() == namespace
            && *e.query == *body
        {
            self.hits += 1;
            let mut answer = e.answer.to_vec();
            answer[..2].copy_from_slice(id);
            return Outcome::Reply(answer);
        }
        let outcome = responder.answer(asker, Transport::Udp, query);
        if let Outcome::Reply(answer) = &outcome
            && repeatable(answer)
        {
            if self.entries.len() >= MAX_ENTRIES
                && !self.entries.contains_key(&key)
                && let Some(&old) = self.entries.keys().next()
            {
                // An arbitrary entry (the map's order follows a random hash) makes way.
                self.entries.remove(&old);
            }
            self.entries.insert(
                key,
                Entry {
                    network_id: network_id.into(),
                    namespace: namespace.map(Into::into),
                    client,
                    query: body.into(),
                    answer: answer.as_slice().into(),
                },
            );
        }
        outcome
    }

    /// Answers given from the cache so far.
    pub fn hits(&self) -> u64 {
        self.hits
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn key(&self, network_id: &str, namespace: Option<&str>, client: IpAddr, body: &[u8]) -> u64 {
        let mut h = self.hasher.build_hasher();
        network_id.hash(&mut h);
        namespace.hash(&mut h);
        client.hash(&mut h);
        body.hash(&mut h);
        h.finish()
    }
}

/// Whether an answer may be given again for the same query: a whole header, and at most one
/// answer record (several rotate).
fn repeatable(answer: &[u8]) -> bool {
    answer
        .get(6..8)
        .is_some_and(|n| u16::from_be_bytes([n[0], n[1]]) <= 1)
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::{Message, Query, ResponseCode};
    use hickory_proto::rr::{Name, RecordType};

    use super::*;
    use crate::catalog::{Catalog, EndpointRecords, Zone};
    use crate::responder::DEFAULT_TTL;

    const NET: &str = "net-red";

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn ep(id: &str, scope: &str, name: &str, aliases: &[&str], addr: &str) -> EndpointRecords {
        EndpointRecords {
            id: id.into(),
            scope: scope.into(),
            name: name.into(),
            aliases: aliases.iter().map(|a| a.to_string()).collect(),
            addrs: vec![ip(addr)],
        }
    }

    fn responder() -> Responder {
        let mut c = Catalog::default();
        c.add_network(
            NET,
            Zone::new("red", true, false, vec![(ip("10.1.0.0"), 16)]),
        );
        c.add_endpoint(NET, &ep("e1", "ns1", "tomcat81", &["web"], "10.1.0.2"));
        c.add_endpoint(NET, &ep("e2", "ns2", "tomcat82", &["web"], "10.1.0.3"));
        Responder::new(c.shared(), DEFAULT_TTL)
    }

    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(
            Name::from_ascii(name).expect("name"),
            RecordType::A,
        ));
        m.to_vec().expect("encode")
    }

    fn asker(client: &str, namespace: &'static str) -> Asker<'static> {
        Asker::Network {
            network_id: NET,
            client: ip(client),
            namespace: Some(namespace),
        }
    }

    fn reply(o: Outcome) -> Vec<u8> {
        match o {
            Outcome::Reply(b) => b,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    fn addrs(b: &[u8]) -> (ResponseCode, Vec<String>) {
        let m = Message::from_vec(b).expect("valid");
        let a = m.answers.iter().map(|r| r.data.to_string()).collect();
        (m.metadata.response_code, a)
    }

    #[test]
    fn a_repeated_query_gets_the_same_answer_under_its_own_id() {
        let r = responder();
        let mut c = AnswerCache::default();
        let first = reply(c.answer_udp(&r, asker("10.1.0.2", "ns1"), &query(1, "tomcat82")));
        let again = reply(c.answer_udp(&r, asker("10.1.0.2", "ns1"), &query(77, "tomcat82")));
        assert_eq!(c.hits(), 1);
        assert_eq!(&again[..2], &77u16.to_be_bytes());
        assert_eq!(first[2..], again[2..]);
        assert_eq!(
            again,
            reply(r.answer(
                asker("10.1.0.2", "ns1"),
                Transport::Udp,
                &query(77, "tomcat82")
            )),
            "what the responder itself says"
        );
    }

    #[test]
    fn a_catalog_change_is_seen_at_once() {
        let r = responder();
        let mut c = AnswerCache::default();
        let ask = |c: &mut AnswerCache| {
            addrs(&reply(c.answer_udp(
                &r,
                asker("10.1.0.2", "ns1"),
                &query(5, "db"),
            )))
        };
        assert_eq!(ask(&mut c), (ResponseCode::NXDomain, vec![]));
        assert_eq!(ask(&mut c), (ResponseCode::NXDomain, vec![]));
        assert_eq!(c.hits(), 1);
        r.catalog()
            .write()
            .add_endpoint(NET, &ep("e3", "ns3", "db", &[], "10.1.0.4"));
        assert_eq!(
            ask(&mut c),
            (ResponseCode::NoError, vec!["10.1.0.4".into()])
        );
        r.catalog().write().remove_endpoint(NET, "e3");
        assert_eq!(ask(&mut c), (ResponseCode::NXDomain, vec![]));
    }

    #[test]
    fn rotating_answers_are_never_repeated() {
        let r = responder();
        let mut c = AnswerCache::default();
        let first = addrs(&reply(c.answer_udp(
            &r,
            asker("10.1.0.2", "ns1"),
            &query(1, "web"),
        )));
        let second = addrs(&reply(c.answer_udp(
            &r,
            asker("10.1.0.2", "ns1"),
            &query(1, "web"),
        )));
        assert_eq!(first.1.len(), 2);
        assert_ne!(first, second, "the order still rotates");
        assert_eq!(c.hits(), 0);
    }

    #[test]
    fn each_asker_has_answers_of_its_own() {
        let mut cat = Catalog::default();
        cat.add_network(
            NET,
            Zone::new("red", true, false, vec![(ip("10.1.0.0"), 16)]),
        );
        cat.add_network(
            "net-blue",
            Zone::new("blue", true, false, vec![(ip("10.2.0.0"), 16)]),
        );
        cat.add_endpoint(NET, &ep("e1", "ns1", "app", &[], "10.1.0.2"));
        cat.add_endpoint(NET, &ep("e2", "ns2", "other", &[], "10.1.0.3"));
        // Only ns1 is on blue too, where "db" lives.
        cat.add_endpoint("net-blue", &ep("e4", "ns1", "app", &[], "10.2.0.3"));
        cat.add_endpoint("net-blue", &ep("e3", "ns3", "db", &[], "10.2.0.2"));
        let r = Responder::new(cat.shared(), DEFAULT_TTL);
        let mut c = AnswerCache::default();
        let inside = reply(c.answer_udp(&r, asker("10.1.0.2", "ns1"), &query(9, "db")));
        let outside = reply(c.answer_udp(&r, asker("10.1.0.3", "ns2"), &query(9, "db")));
        let spoofed = reply(c.answer_udp(&r, asker("10.1.0.2", "ns2"), &query(9, "db")));
        assert_eq!(
            addrs(&inside),
            (ResponseCode::NoError, vec!["10.2.0.2".into()])
        );
        assert_eq!(addrs(&outside).0, ResponseCode::NXDomain);
        assert_eq!(
            addrs(&spoofed).0,
            ResponseCode::NXDomain,
            "ns1's address from ns2's port sees what ns2 sees"
        );
        assert_eq!(c.hits(), 1, "ns2's own entry, whatever the source claims");
    }

    #[test]
    fn the_cache_holds_a_bounded_number_of_answers() {
        let r = responder();
        let mut c = AnswerCache::default();
        for i in 0..MAX_ENTRIES + 100 {
            let _ = c.answer_udp(&r, asker("10.1.0.2", "ns1"), &query(1, &format!("n{i}")));
            assert!(c.len() <= MAX_ENTRIES);
        }
        assert_eq!(c.len(), MAX_ENTRIES, "one entry made way, not all of them");
        let long = vec![0u8; MAX_QUERY + 1];
        let _ = c.answer_udp(&r, asker("10.1.0.2", "ns1"), &long);
        let _ = c.answer_udp(&r, asker("10.1.0.2", "ns1"), &long);
        assert_eq!(c.hits(), 0, "long queries are not kept");
    }

    #[test]
    fn spoofed_sources_share_their_port_s_entry_and_unscoped_askers_have_their_own() {
        let r = responder();
        let mut c = AnswerCache::default();
        for i in 0..50 {
            let a = asker(&format!("10.9.0.{i}"), "ns1");
            let _ = c.answer_udp(&r, a, &query(3, "tomcat82"));
        }
        assert_eq!((c.len(), c.hits()), (1, 49));
        let unscoped = |client: &str| Asker::Network {
            network_id: NET,
            client: ip(client),
            namespace: None,
        };
        let _ = c.answer_udp(&r, unscoped("10.1.0.2"), &query(3, "tomcat82"));
        let _ = c.answer_udp(&r, unscoped("10.1.0.3"), &query(3, "tomcat82"));
        assert_eq!((c.len(), c.hits()), (3, 49));
    }
}
