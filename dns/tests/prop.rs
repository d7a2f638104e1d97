//! Property tests: a query is whatever a container sends to port 53. Arbitrary bytes and valid
//! queries with bytes flipped never make the responder panic, and whatever it answers is a DNS
//! response to that query (same id, the response bit set), within the size UDP allows.

use std::net::IpAddr;
use std::str::FromStr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use proptest::prelude::*;
use vswitch_dns::{Asker, Catalog, EndpointRecords, Outcome, Responder, Transport, Zone};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn responder() -> Responder {
    let mut c = Catalog::default();
    c.add_network(
        "n1",
        Zone::new("app", true, false, vec![(ip("10.1.0.0"), 16)]),
    );
    c.add_network(
        "n2",
        Zone::new("db", true, true, vec![(ip("10.2.0.0"), 16)]),
    );
    let records = |id: &str, scope: &str, name: &str, addrs: &[&str]| EndpointRecords {
        id: id.into(),
        scope: scope.into(),
        name: name.into(),
        aliases: vec!["web".into()],
        addrs: addrs.iter().map(|a| ip(a)).collect(),
    };
    c.add_endpoint(
        "n1",
        &records("e1", "s1", "tomcat81", &["10.1.0.2", "fd00::2"]),
    );
    c.add_endpoint("n1", &records("e2", "s2", "tomcat82", &["10.1.0.3"]));
    c.add_endpoint("n2", &records("e3", "s1", "tomcat81", &["10.2.0.2"]));
    Responder::new(c.shared(), 5)
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("tomcat81.".to_owned()),
        Just("web.app.".to_owned()),
        Just("app.".to_owned()),
        Just(".".to_owned()),
        Just("2.0.1.10.in-addr.arpa.".to_owned()),
        Just("example.com.".to_owned()),
        "[a-z0-9-]{1,20}(\\.[a-z0-9]{1,10}){0,3}\\.",
    ]
}

fn qtype() -> impl Strategy<Value = RecordType> {
    prop_oneof![
        Just(RecordType::A),
        Just(RecordType::AAAA),
        Just(RecordType::PTR),
        Just(RecordType::ANY),
        Just(RecordType::NS),
        Just(RecordType::SOA),
        Just(RecordType::AXFR),
        any::<u16>().prop_map(RecordType::from),
    ]
}

/// A valid query, possibly with EDNS, a strange opcode or several questions.
fn query() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<u16>(),
        prop::collection::vec((name(), qtype()), 0..3),
        any::<bool>(),
        0u8..6,
    )
        .prop_filter_map("encodable", |(id, questions, edns, opcode)| {
            let mut m = Message::new(id, MessageType::Query, OpCode::from_u8(opcode));
            m.metadata.recursion_desired = true;
            for (n, t) in questions {
                m.add_query(Query::query(Name::from_str(&n).ok()?, t));
            }
            if edns {
                m.edns = Some(Edns::new());
            }
            m.to_vec().ok()
        })
}

fn input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..64),
        4 => (
            query(),
            prop::collection::vec((any::<usize>(), any::<u8>()), 0..4),
            prop::option::of(any::<usize>()),
        )
            .prop_map(|(mut q, flips, cut)| {
                for (at, b) in flips {
                    let len = q.len();
                    q[at % len] ^= b;
                }
                if let Some(c) = cut {
                    q.truncate(c % (q.len() + 1));
                }
                q
            }),
    ]
}

fn asker() -> impl Strategy<Value = (Option<&'static str>, &'static str)> {
    prop_oneof![
        Just((Some("n1"), "10.1.0.2")),
        Just((Some("n1"), "10.1.0.99")),
        Just((Some("n2"), "10.2.0.2")),
        Just((Some("nope"), "10.9.0.9")),
        Just((None, "127.0.0.1")),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn any_query_gets_a_response_to_it_or_nothing(
        bytes in input(),
        who in asker(),
        tcp in any::<bool>(),
    ) {
        let r = responder();
        let asker = match who {
            (Some(network_id), client) => Asker::Network { network_id, client: ip(client), namespace: None },
            (None, _) => Asker::Host,
        };
        let transport = if tcp { Transport::Tcp } else { Transport::Udp };
        match r.answer(asker, transport, &bytes) {
            Outcome::Reply(answer) => {
                prop_assert!(bytes.len() >= 12, "answered a query without a header");
                prop_assert_eq!(&answer[..2], &bytes[..2], "the id is the query's");
                let m = Message::from_vec(&answer);
                prop_assert!(m.is_ok(), "unparsable answer {:?}", answer);
                let m = m.expect("checked");
                prop_assert_eq!(m.metadata.message_type, MessageType::Response);
                if !tcp {
                    prop_assert!(answer.len() <= 1232, "{} bytes over UDP", answer.len());
                }
            }
            Outcome::Forward(_) => {
                prop_assert!(Message::from_vec(&bytes).is_ok(), "forwarded garbage");
            }
            Outcome::Drop => {}
        }
        if let Some(refused) = r.refuse(&bytes) {
            prop_assert_eq!(&refused[..2], &bytes[..2]);
        }
    }
}
