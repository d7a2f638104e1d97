use super::*;
use crate::catalog::{EndpointRecords, Zone};
use hickory_proto::op::Message;

const RED: &str = "net-red";
const BLUE: &str = "net-blue";
const BRIDGE: &str = "net-bridge";
const SEALED: &str = "net-sealed";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn ep(id: &str, scope: &str, name: &str, aliases: &[&str], addrs: &[&str]) -> EndpointRecords {
    EndpointRecords {
        id: id.into(),
        scope: scope.into(),
        name: name.into(),
        aliases: aliases.iter().map(|a| a.to_string()).collect(),
        addrs: addrs.iter().map(|a| ip(a)).collect(),
    }
}

fn responder() -> Responder {
    let mut c = Catalog::default();
    c.add_network(
        RED,
        Zone::new("red", true, false, vec![(ip("10.1.0.0"), 16)])
            .with_gateways(vec![ip("10.1.0.1"), ip("fd00::1")]),
    );
    c.add_network(
        BLUE,
        Zone::new("blue", true, false, vec![(ip("10.2.0.0"), 16)]),
    );
    c.add_network(
        BRIDGE,
        Zone::new("bridge", false, false, vec![(ip("172.17.0.0"), 16)])
            .with_gateways(vec![ip("172.17.0.1")]),
    );
    c.add_network(
        SEALED,
        Zone::new("sealed", true, true, vec![(ip("10.3.0.0"), 16)])
            .with_gateways(vec![ip("10.3.0.1")]),
    );
    c.add_endpoint(
        RED,
        &ep("e1", "ns1", "Tomcat81", &["web"], &["10.1.0.2", "fd00::2"]),
    );
    c.add_endpoint(RED, &ep("e2", "ns2", "tomcat82", &["web"], &["10.1.0.3"]));
    c.add_endpoint(BLUE, &ep("e3", "ns3", "db", &[], &["10.2.0.2"]));
    // ns1 is on blue as well.
    c.add_endpoint(BLUE, &ep("e4", "ns1", "Tomcat81", &[], &["10.2.0.3"]));
    c.add_endpoint(BRIDGE, &ep("e5", "ns5", "plain", &[], &["172.17.0.2"]));
    c.add_endpoint(SEALED, &ep("e6", "ns6", "vault", &[], &["10.3.0.2"]));
    Responder::new(c.shared(), DEFAULT_TTL)
}

fn query(name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = 0x4242;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
    m.to_vec().expect("encode")
}

fn from(net: &str, client: &str) -> Asker<'static> {
    let net: &'static str = Box::leak(net.to_owned().into_boxed_str());
    Asker::Network {
        network_id: net,
        client: ip(client),
        namespace: None,
    }
}

fn ask(r: &Responder, asker: Asker<'_>, name: &str, qtype: RecordType) -> Message {
    match r.answer(asker, Transport::Udp, &query(name, qtype)) {
        Outcome::Reply(b) => Message::from_vec(&b).expect("valid reply"),
        other => panic!("{name} {qtype}: expected a reply, got {other:?}"),
    }
}

fn addrs(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .map(|r| match &r.data {
            RData::A(a) => a.0.to_string(),
            RData::AAAA(a) => a.0.to_string(),
            RData::PTR(p) => p.0.to_string(),
            other => format!("{other:?}"),
        })
        .collect()
}

#[test]
fn a_record_case_insensitive_with_ttl_and_flags() {
    let r = responder();
    let m = ask(&r, from(RED, "10.1.0.3"), "TOMCAT81", RecordType::A);
    assert_eq!(m.metadata.id, 0x4242);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative && m.metadata.recursion_available);
    assert_eq!(addrs(&m), vec!["10.1.0.2"]);
    assert_eq!(m.answers[0].ttl, DEFAULT_TTL);
    assert_eq!(
        m.answers[0].name.to_ascii(),
        "TOMCAT81.",
        "owner name as asked"
    );
    let m = ask(&r, from(RED, "10.1.0.3"), "tomcat81.red.", RecordType::A);
    assert_eq!(addrs(&m), vec!["10.1.0.2"], "name.network");
}

#[test]
fn aaaa_and_nodata() {
    let r = responder();
    let m = ask(&r, from(RED, "10.1.0.3"), "tomcat81", RecordType::AAAA);
    assert_eq!(addrs(&m), vec!["fd00::2"]);
    let m = ask(&r, from(RED, "10.1.0.2"), "tomcat82", RecordType::AAAA);
    assert_eq!(
        m.metadata.response_code,
        ResponseCode::NoError,
        "NODATA, not NXDOMAIN"
    );
    assert!(m.answers.is_empty());
    let m = ask(&r, from(RED, "10.1.0.2"), "tomcat82", RecordType::MX);
    assert_eq!(
        (m.metadata.response_code, m.answers.len()),
        (ResponseCode::NoError, 0)
    );
}

#[test]
fn shared_alias_returns_every_address_round_robin() {
    let r = responder();
    let first = addrs(&ask(&r, from(RED, "10.1.0.2"), "web", RecordType::A));
    let second = addrs(&ask(&r, from(RED, "10.1.0.2"), "web", RecordType::A));
    let mut a = first.clone();
    a.sort();
    assert_eq!(a, vec!["10.1.0.2", "10.1.0.3"]);
    assert_ne!(first, second, "order rotates between answers");
    let m = ask(&r, from(RED, "10.1.0.2"), "web.red", RecordType::A);
    assert_eq!(m.answers.len(), 2);
}

#[test]
fn ptr_points_to_name_dot_network_once() {
    let r = responder();
    let m = ask(
        &r,
        from(RED, "10.1.0.3"),
        "2.0.1.10.in-addr.arpa",
        RecordType::PTR,
    );
    assert_eq!(addrs(&m), vec!["tomcat81.red."]);
    assert_eq!(m.answers[0].name.to_ascii(), "2.0.1.10.in-addr.arpa.");
    // An unassigned address of one of our subnets: NXDOMAIN, not forwarded.
    let m = ask(
        &r,
        from(RED, "10.1.0.3"),
        "99.0.1.10.in-addr.arpa",
        RecordType::PTR,
    );
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    // Anybody else's address goes upstream.
    let q = query("8.8.8.8.in-addr.arpa", RecordType::PTR);
    assert_eq!(
        r.answer(from(RED, "10.1.0.3"), Transport::Udp, &q),
        Outcome::Forward(None)
    );
    // IPv6 reverse.
    let v6 = "2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa";
    let m = ask(&r, from(RED, "10.1.0.3"), v6, RecordType::PTR);
    assert_eq!(addrs(&m), vec!["tomcat81.red."]);
}

#[test]
fn unknown_single_label_is_nxdomain_at_once_and_the_rest_is_forwarded() {
    let r = responder();
    let m = ask(&r, from(RED, "10.1.0.2"), "nosuch", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    // Anything with a dot that no visible zone holds goes upstream, under a network's name too.
    for name in ["example.com", "nosuch.red"] {
        let q = query(name, RecordType::A);
        assert_eq!(
            r.answer(from(RED, "10.1.0.2"), Transport::Udp, &q),
            Outcome::Forward(None),
            "{name}"
        );
    }
}

#[test]
fn a_network_name_does_not_hide_the_public_domain_of_that_name() {
    let mut c = Catalog::default();
    c.add_network(
        "dev-id",
        Zone::new("dev", true, false, vec![(ip("10.9.0.0"), 16)]),
    );
    c.add_endpoint("dev-id", &ep("e9", "ns9", "web", &[], &["10.9.0.2"]));
    let r = Responder::new(c.shared(), DEFAULT_TTL);
    for name in ["pkg.go.dev", "go.dev", "api.web.dev"] {
        let q = query(name, RecordType::A);
        assert_eq!(
            r.answer(from("dev-id", "10.9.0.2"), Transport::Udp, &q),
            Outcome::Forward(None),
            "{name}"
        );
    }
    // The container names themselves still answer, bare and as name.network.
    for name in ["web", "web.dev"] {
        let m = ask(&r, from("dev-id", "10.9.0.2"), name, RecordType::A);
        assert_eq!(addrs(&m), vec!["10.9.0.2"], "{name}");
    }
}

#[test]
fn scoping_hides_other_networks() {
    let r = responder();
    // tomcat82 is on red only: blue's db does not exist for it, in any form, and is not
    // forwarded either (upstream may be the host's resolver, which may ask us as the host).
    for name in ["db", "db.blue"] {
        let m = ask(&r, from(RED, "10.1.0.3"), name, RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
    }
    // A name under blue's domain that blue does not hold is upstream's business.
    let q = query("nosuch.blue", RecordType::A);
    assert_eq!(
        r.answer(from(RED, "10.1.0.3"), Transport::Udp, &q),
        Outcome::Forward(None)
    );
    // tomcat81's namespace is on red and blue: it sees both.
    let m = ask(&r, from(RED, "10.1.0.2"), "db", RecordType::A);
    assert_eq!(addrs(&m), vec!["10.2.0.2"]);
    // db (blue only) cannot see red's tomcat82.
    let m = ask(&r, from(BLUE, "10.2.0.2"), "tomcat82", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    // PTR is scoped too: db cannot map tomcat82's address to its name.
    let m = ask(
        &r,
        from(BLUE, "10.2.0.2"),
        "3.0.1.10.in-addr.arpa",
        RecordType::PTR,
    );
    assert!(m.answers.is_empty());
}

#[test]
fn default_bridge_has_no_names_but_forwards() {
    let r = responder();
    for name in ["plain", "plain.bridge", "example.com"] {
        let q = query(name, RecordType::A);
        assert_eq!(
            r.answer(from(BRIDGE, "172.17.0.2"), Transport::Udp, &q),
            Outcome::Forward(None),
            "{name}"
        );
    }
}

#[test]
fn internal_networks_do_not_forward() {
    let r = responder();
    let m = ask(&r, from(SEALED, "10.3.0.2"), "example.com", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    let m = ask(&r, from(SEALED, "10.3.0.2"), "vault", RecordType::A);
    assert_eq!(addrs(&m), vec!["10.3.0.2"]);
}

#[test]
fn a_namespace_also_on_an_outside_network_forwards_from_the_internal_one() {
    let r = responder();
    {
        let mut c = r.catalog.write();
        c.add_endpoint(SEALED, &ep("e7", "ns7", "both", &[], &["10.3.0.7"]));
        c.add_endpoint(RED, &ep("e8", "ns7", "both", &[], &["10.1.0.7"]));
    }
    let q = query("example.com", RecordType::A);
    assert_eq!(
        r.answer(from(SEALED, "10.3.0.7"), Transport::Udp, &q),
        Outcome::Forward(None),
        "asked on the internal network, but red leads out"
    );
    // Its neighbour on the internal network alone still gets REFUSED.
    let m = ask(&r, from(SEALED, "10.3.0.2"), "example.com", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
}

#[test]
fn host_sees_every_network_as_name_dot_network_only() {
    let r = responder();
    let m = ask(&r, Asker::Host, "tomcat82.red", RecordType::A);
    assert_eq!(addrs(&m), vec!["10.1.0.3"]);
    let m = ask(&r, Asker::Host, "db.blue", RecordType::A);
    assert_eq!(addrs(&m), vec!["10.2.0.2"]);
    let m = ask(&r, Asker::Host, "tomcat82", RecordType::A);
    assert_eq!(
        m.metadata.response_code,
        ResponseCode::Refused,
        "bare names are not the host's"
    );
    let m = ask(&r, Asker::Host, "nope.red", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    let m = ask(&r, Asker::Host, "example.com", RecordType::A);
    assert_eq!(
        m.metadata.response_code,
        ResponseCode::Refused,
        "not a forwarder for the host"
    );
    let m = ask(&r, Asker::Host, "plain.bridge", RecordType::A);
    assert_eq!(
        m.metadata.response_code,
        ResponseCode::Refused,
        "bridge has no names"
    );
}

#[test]
fn names_follow_attach_and_detach() {
    let r = responder();
    r.catalog()
        .write()
        .add_endpoint(RED, &ep("e9", "ns9", "late", &[], &["10.1.0.9"]));
    assert_eq!(
        addrs(&ask(&r, from(RED, "10.1.0.2"), "late", RecordType::A)),
        vec!["10.1.0.9"]
    );
    r.catalog().write().remove_endpoint(RED, "e9");
    let m = ask(&r, from(RED, "10.1.0.2"), "late", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    r.catalog().write().remove_endpoint(RED, "e2");
    assert_eq!(
        addrs(&ask(&r, from(RED, "10.1.0.2"), "web", RecordType::A)),
        vec!["10.1.0.2"]
    );
}

#[test]
fn malformed_and_odd_queries() {
    let r = responder();
    let asker = from(RED, "10.1.0.2");
    assert_eq!(r.answer(asker, Transport::Udp, &[]), Outcome::Drop);
    assert_eq!(r.answer(asker, Transport::Udp, &[1, 2, 3]), Outcome::Drop);
    // A response (QR set) is never answered.
    let mut resp = query("tomcat81", RecordType::A);
    resp[2] |= 0x80;
    assert_eq!(r.answer(asker, Transport::Udp, &resp), Outcome::Drop);
    // Header fine, body garbage: FORMERR with the same id.
    let mut junk = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    junk.extend_from_slice(&[0xff; 40]);
    let Outcome::Reply(b) = r.answer(asker, Transport::Udp, &junk) else {
        panic!("formerr")
    };
    let m = Message::from_vec(&b).expect("reply parses");
    assert_eq!(
        (m.metadata.id, m.metadata.response_code),
        (0x1234, ResponseCode::FormErr)
    );
    // Two questions: FORMERR.
    let mut two = Message::query();
    two.add_query(Query::query(
        Name::from_ascii("a").expect("n"),
        RecordType::A,
    ));
    two.add_query(Query::query(
        Name::from_ascii("b").expect("n"),
        RecordType::A,
    ));
    let Outcome::Reply(b) = r.answer(asker, Transport::Udp, &two.to_vec().expect("enc")) else {
        panic!("formerr")
    };
    assert_eq!(
        Message::from_vec(&b).expect("parse").metadata.response_code,
        ResponseCode::FormErr
    );
    // Not a query opcode: NOTIMP.
    let mut notify = query("tomcat81", RecordType::A);
    notify[2] = (notify[2] & 0x87) | (4 << 3);
    let Outcome::Reply(b) = r.answer(asker, Transport::Udp, &notify) else {
        panic!("notimp")
    };
    assert_eq!(
        Message::from_vec(&b).expect("parse").metadata.response_code,
        ResponseCode::NotImp
    );
    // Random bytes never panic.
    let mut x: u32 = 12345;
    for len in 0..600usize {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let _ = r.answer(asker, Transport::Udp, &bytes);
    }
}

#[test]
fn big_answers_are_truncated_over_udp_only() {
    let mut c = Catalog::default();
    c.add_network(
        RED,
        Zone::new("red", true, false, vec![(ip("10.1.0.0"), 16)]),
    );
    for i in 0..60 {
        c.add_endpoint(
            RED,
            &ep(
                &format!("e{i}"),
                &format!("s{i}"),
                &format!("n{i}"),
                &["farm"],
                &[&format!("10.1.1.{i}")],
            ),
        );
    }
    let r = Responder::new(c.shared(), DEFAULT_TTL);
    let q = query("farm-that-is-long-enough-to-matter", RecordType::A);
    let _ = q;
    let q = query("farm", RecordType::A);
    let Outcome::Reply(udp) = r.answer(from(RED, "10.1.1.1"), Transport::Udp, &q) else {
        panic!()
    };
    assert!(udp.len() <= 512);
    let m = Message::from_vec(&udp).expect("parse");
    assert!(m.metadata.truncation, "TC set");
    let Outcome::Reply(tcp) = r.answer(from(RED, "10.1.1.1"), Transport::Tcp, &q) else {
        panic!()
    };
    let m = Message::from_vec(&tcp).expect("parse");
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 60);
}

fn forwarded(r: &Responder, asker: Asker<'_>, name: &str, qtype: RecordType) -> bool {
    r.answer(asker, Transport::Udp, &query(name, qtype)) == Outcome::Forward(None)
}

/// A validating resolver starts at the root and walks down: the root and the delegations of
/// one-label names (`com DS`) are the upstream's. Only an address query for an unknown single
/// label (a container name that is not there) is answered NXDOMAIN at once.
#[test]
fn the_root_and_one_label_names_other_than_addresses_go_upstream() {
    let r = responder();
    let asker = from(RED, "10.1.0.2");
    for (name, qtype) in [
        (".", RecordType::NS),
        (".", RecordType::DNSKEY),
        (".", RecordType::SOA),
        (".", RecordType::A),
        ("com", RecordType::DS),
        ("com", RecordType::NS),
        ("arpa", RecordType::NS),
        ("nosuch", RecordType::MX),
        ("nosuch", RecordType::TXT),
    ] {
        assert!(forwarded(&r, asker, name, qtype), "{name} {qtype}");
    }
    for qtype in [RecordType::A, RecordType::AAAA, RecordType::ANY] {
        let m = ask(&r, asker, "nosuch", qtype);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{qtype}");
    }
    // From an internal network the root is not forwarded either.
    let m = ask(&r, from(SEALED, "10.3.0.2"), ".", RecordType::NS);
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
}

/// RFC 6761: localhost names are the loopback addresses, answered here, never asked upstream.
#[test]
fn localhost_is_the_loopback_address() {
    let r = responder();
    let asker = from(RED, "10.1.0.2");
    for name in ["localhost", "LocalHost.", "db.localhost"] {
        assert_eq!(
            addrs(&ask(&r, asker, name, RecordType::A)),
            vec!["127.0.0.1"]
        );
        assert_eq!(addrs(&ask(&r, asker, name, RecordType::AAAA)), vec!["::1"]);
    }
    let m = ask(&r, asker, "localhost", RecordType::MX);
    assert_eq!(
        (m.metadata.response_code, m.answers.len()),
        (ResponseCode::NoError, 0)
    );
}

/// `host.containers.internal` and `host.docker.internal` are the gateway of a network with a
/// way out; a namespace with none has no host to reach.
#[test]
fn the_host_names_are_the_gateway_of_a_network_with_a_way_out() {
    let r = responder();
    for name in ["host.containers.internal", "host.docker.internal"] {
        let m = ask(&r, from(RED, "10.1.0.2"), name, RecordType::A);
        assert_eq!(addrs(&m), vec!["10.1.0.1"], "{name}");
        let m = ask(&r, from(RED, "10.1.0.2"), name, RecordType::AAAA);
        assert_eq!(addrs(&m), vec!["fd00::1"], "{name}");
        let m = ask(&r, from(BRIDGE, "172.17.0.2"), name, RecordType::A);
        assert_eq!(addrs(&m), vec!["172.17.0.1"], "the default bridge too");
        let m = ask(&r, from(SEALED, "10.3.0.2"), name, RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "internal");
    }
    // The host itself asks through --dns-listen: nothing special for it.
    let m = ask(&r, Asker::Host, "host.docker.internal", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
}

/// RFC 1035 4.1.1: an answer carries the query's opcode, RD bit and question, NOTIMP included
/// (`dig +opcode=notify` checks them).
#[test]
fn errors_echo_the_opcode_the_rd_bit_and_the_question() {
    let r = responder();
    let asker = from(RED, "10.1.0.2");
    let mut notify = Message::new(0x77, MessageType::Query, OpCode::Notify);
    notify.metadata.recursion_desired = true;
    notify.add_query(Query::query(
        Name::from_ascii("red.").expect("n"),
        RecordType::SOA,
    ));
    let Outcome::Reply(b) = r.answer(asker, Transport::Udp, &notify.to_vec().expect("enc")) else {
        panic!("no answer to NOTIFY");
    };
    let m = Message::from_vec(&b).expect("parse");
    assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
    assert_eq!(m.metadata.op_code, OpCode::Notify);
    assert!(m.metadata.recursion_desired);
    assert_eq!(m.queries, notify.queries);
    // FORMERR for two questions echoes both.
    let mut two = Message::query();
    for n in ["a.", "b."] {
        two.add_query(Query::query(Name::from_ascii(n).expect("n"), RecordType::A));
    }
    let Outcome::Reply(b) = r.answer(asker, Transport::Udp, &two.to_vec().expect("enc")) else {
        panic!("formerr");
    };
    let m = Message::from_vec(&b).expect("parse");
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    assert_eq!(m.queries.len(), 2);
}

/// RFC 6891: a query of an EDNS version above 0 gets BADVERS, with an OPT record of version 0.
#[test]
fn an_edns_version_above_zero_gets_badvers() {
    let r = responder();
    let mut q = Message::query();
    q.metadata.id = 9;
    q.add_query(Query::query(
        Name::from_ascii("tomcat81.").expect("n"),
        RecordType::A,
    ));
    let mut edns = Edns::new();
    edns.set_version(1);
    q.set_edns(edns);
    let Outcome::Reply(b) = r.answer(
        from(RED, "10.1.0.3"),
        Transport::Udp,
        &q.to_vec().expect("enc"),
    ) else {
        panic!("no answer");
    };
    let m = Message::from_vec(&b).expect("parse");
    // 16 on the wire: BADVERS in a response to a query with OPT (hickory reads it as BADSIG,
    // which shares the number).
    assert_eq!(u16::from(m.metadata.response_code), 16);
    assert!(m.answers.is_empty());
    assert_eq!(m.edns.as_ref().map(Edns::version), Some(0));
    // Version 0 is answered as usual, with an OPT record back.
    q.set_edns(Edns::new());
    let Outcome::Reply(b) = r.answer(
        from(RED, "10.1.0.3"),
        Transport::Udp,
        &q.to_vec().expect("enc"),
    ) else {
        panic!("no answer");
    };
    let m = Message::from_vec(&b).expect("parse");
    assert_eq!(addrs(&m), vec!["10.1.0.2"]);
    assert!(m.edns.is_some());
}

#[test]
fn zone_transfers_are_refused() {
    let r = responder();
    for name in ["red.", "example.com.", "tomcat81."] {
        for qtype in [RecordType::AXFR, RecordType::IXFR] {
            let m = ask(&r, from(RED, "10.1.0.2"), name, qtype);
            assert_eq!(
                m.metadata.response_code,
                ResponseCode::Refused,
                "{name} {qtype}"
            );
        }
    }
}

/// RFC 8020: a network's name with names under it exists, so it is NODATA, never NXDOMAIN
/// (which would deny `tomcat81.red` too), for the host as well. Asked as anything but an
/// address it goes upstream: a network called `dev` must not break `dev DS` for validators.
#[test]
fn a_network_name_with_names_under_it_is_nodata() {
    let r = responder();
    for qtype in [RecordType::A, RecordType::AAAA, RecordType::ANY] {
        let m = ask(&r, from(RED, "10.1.0.2"), "red", qtype);
        assert_eq!(
            (m.metadata.response_code, m.answers.len()),
            (ResponseCode::NoError, 0),
            "{qtype}"
        );
        let m = ask(&r, Asker::Host, "red", qtype);
        assert_eq!(
            m.metadata.response_code,
            ResponseCode::NoError,
            "host {qtype}"
        );
    }
    for qtype in [
        RecordType::DS,
        RecordType::NS,
        RecordType::SOA,
        RecordType::DNSKEY,
    ] {
        assert!(
            forwarded(&r, from(RED, "10.1.0.2"), "red", qtype),
            "{qtype}"
        );
    }
    // Another network's name is not visible from here: its container names are not either.
    let m = ask(&r, from(RED, "10.1.0.3"), "db.blue", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    // A container called like a TLD on another network does not deny that TLD's delegation.
    assert!(forwarded(&r, from(RED, "10.1.0.3"), "db", RecordType::DS));
    let m = ask(&r, from(RED, "10.1.0.3"), "db", RecordType::A);
    assert_eq!(
        m.metadata.response_code,
        ResponseCode::NXDomain,
        "as an address it is ours"
    );
}

/// Other classes go upstream like other names, but never out of an internal network, and a
/// zone transfer is refused in any class.
#[test]
fn other_classes_follow_the_way_out_and_no_class_transfers_zones() {
    let r = responder();
    let class_query = |name: &str, qtype: RecordType, class: DNSClass| {
        let mut m = Message::query();
        m.metadata.id = 5;
        let mut q = Query::query(Name::from_ascii(name).expect("name"), qtype);
        q.set_query_class(class);
        m.add_query(q);
        m.to_vec().expect("encode")
    };
    let q = class_query("version.bind.", RecordType::TXT, DNSClass::CH);
    assert_eq!(
        r.answer(from(RED, "10.1.0.2"), Transport::Udp, &q),
        Outcome::Forward(None)
    );
    let Outcome::Reply(b) = r.answer(from(SEALED, "10.3.0.2"), Transport::Udp, &q) else {
        panic!("an internal network forwarded a CH query");
    };
    let m = Message::from_vec(&b).expect("parse");
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    let q = class_query("red.", RecordType::AXFR, DNSClass::CH);
    let Outcome::Reply(b) = r.answer(from(RED, "10.1.0.2"), Transport::Tcp, &q) else {
        panic!("a CH zone transfer was forwarded");
    };
    let m = Message::from_vec(&b).expect("parse");
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
}

/// A network's own upstreams are the ones asked, and for a namespace on an internal network
/// too, those of its network with a way out, whichever gateway it asked.
#[test]
fn forwards_go_to_the_upstreams_of_the_network_with_the_way_out() {
    let own: Vec<std::net::SocketAddr> = vec!["192.0.2.53:53".parse().expect("sa")];
    let mut c = Catalog::default();
    c.add_network(
        "out",
        Zone::new("out", true, false, vec![(ip("10.5.0.0"), 16)]).with_upstreams(&own),
    );
    c.add_network(
        "in",
        Zone::new("in", true, true, vec![(ip("10.6.0.0"), 16)]),
    );
    c.add_network(
        "plain",
        Zone::new("plain", true, false, vec![(ip("10.7.0.0"), 16)]),
    );
    c.add_endpoint("out", &ep("e1", "both", "a", &[], &["10.5.0.2"]));
    c.add_endpoint("in", &ep("e2", "both", "a", &[], &["10.6.0.2"]));
    c.add_endpoint("plain", &ep("e3", "p", "b", &[], &["10.7.0.2"]));
    let r = Responder::new(c.shared(), DEFAULT_TTL);
    let q = query("example.com", RecordType::A);
    let via = |net: &str, client: &str| match r.answer(from(net, client), Transport::Udp, &q) {
        Outcome::Forward(via) => via.map(|v| v.to_vec()),
        other => panic!("{other:?}"),
    };
    assert_eq!(via("out", "10.5.0.2"), Some(own.clone()));
    assert_eq!(
        via("in", "10.6.0.2"),
        Some(own),
        "asked on the internal network"
    );
    assert_eq!(via("plain", "10.7.0.2"), None, "the daemon's");
}
