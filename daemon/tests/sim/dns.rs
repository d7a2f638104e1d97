//! The embedded DNS server as containers reach it: over UDP (answered inline by the datapath)
//! and TCP (through the gateway's stack), scoped per network, forwarding what it does not know.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::str::FromStr;

use etherparse::{SlicedPacket, TransportSlice};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::harness::{Port, Sim, secs, tcp_exchange};

fn query(id: u16, name: &str) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(
        Name::from_str(name).expect("name"),
        RecordType::A,
    ));
    m.to_vec().expect("encode")
}

/// Asks the gateway over UDP and returns the answer.
fn ask_udp(port: &Port, id: u16, name: &str) -> Message {
    let dns = SocketAddr::new(port.gateway.into(), 53);
    port.send(&port.udp_via_gateway(40_000 + id, dns, &query(id, name)));
    let frame = port
        .recv_matching(secs(3), |p| {
            matches!(&p.transport, Some(TransportSlice::Udp(u))
                if u.source_port() == 53 && u.destination_port() == 40_000 + id)
        })
        .unwrap_or_else(|| panic!("no answer for {name}"));
    let p = SlicedPacket::from_ethernet(&frame).expect("parse");
    let Some(TransportSlice::Udp(u)) = &p.transport else {
        unreachable!()
    };
    let answer = Message::from_vec(u.payload()).expect("a DNS message");
    assert_eq!(answer.metadata.id, id);
    answer
}

fn addresses(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

#[test]
fn names_on_the_network_resolve_over_udp() {
    let sim = Sim::new(vec![]);
    let mut net = sim.network("app", 21);
    let web = sim.plug(&mut net, "web");
    let db = sim.plug(&mut net, "db");
    let a = ask_udp(&web, 1, "db.");
    assert_eq!(a.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addresses(&a), vec![db.ip]);
    let a = ask_udp(&web, 2, "db.app.");
    assert_eq!(addresses(&a), vec![db.ip], "name.network resolves too");
    let a = ask_udp(&db, 3, "WEB.");
    assert_eq!(addresses(&a), vec![web.ip], "names are case-insensitive");
}

#[test]
fn a_client_sees_only_the_names_of_its_own_networks() {
    let sim = Sim::new(vec![]);
    let mut red = sim.network("red", 22);
    let mut blue = sim.network("blue", 23);
    let r = sim.plug(&mut red, "r");
    let _b = sim.plug(&mut blue, "b");
    let a = ask_udp(&r, 4, "b.");
    assert_eq!(a.metadata.response_code, ResponseCode::NXDomain);
    assert!(addresses(&a).is_empty(), "{a:?}");
}

#[test]
fn names_resolve_over_tcp_through_the_gateways_stack() {
    let sim = Sim::new(vec![]);
    let mut net = sim.network("tcpdns", 24);
    let web = sim.plug(&mut net, "web");
    let db = sim.plug(&mut net, "db");
    web.arp_gateway();
    let q = query(7, "db.");
    let mut request = (q.len() as u16).to_be_bytes().to_vec();
    request.extend_from_slice(&q);
    let complete =
        |b: &[u8]| b.len() >= 2 && b.len() >= 2 + usize::from(u16::from_be_bytes([b[0], b[1]]));
    let answer = tcp_exchange(
        &web,
        45_000,
        SocketAddrV4::new(net.gateway, 53),
        &request,
        complete,
    );
    let m = Message::from_vec(&answer[2..]).expect("a DNS message");
    assert_eq!(m.metadata.id, 7);
    assert_eq!(addresses(&m), vec![db.ip]);
}

/// An upstream server on loopback that answers every A query with 192.0.2.7.
fn upstream() -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = sock.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut r = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
            r.metadata.recursion_desired = q.metadata.recursion_desired;
            r.metadata.recursion_available = true;
            for question in &q.queries {
                r.add_query(question.clone());
                r.add_answer(Record::from_rdata(
                    question.name().clone(),
                    60,
                    RData::A(A::new(192, 0, 2, 7)),
                ));
            }
            let _ = sock.send_to(&r.to_vec().expect("encode"), from);
        }
    });
    addr
}

#[test]
fn unknown_names_are_forwarded_upstream_and_the_answer_comes_back() {
    let sim = Sim::new(vec![upstream()]);
    let mut net = sim.network("fwd", 25);
    let web = sim.plug(&mut net, "web");
    let a = ask_udp(&web, 9, "example.com.");
    assert_eq!(a.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addresses(&a), vec![Ipv4Addr::new(192, 0, 2, 7)]);
    // A name of the network is still answered locally, not forwarded.
    let _db = sim.plug(&mut net, "db");
    let a = ask_udp(&web, 10, "db.");
    assert_eq!(addresses(&a), vec![Ipv4Addr::new(10, 25, 0, 3)]);
}
