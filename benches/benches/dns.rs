//! Micro-benchmark of the DNS responder: the cost of answering one query from raw bytes to raw
//! bytes, with 1000 names on the network (what the datapath thread pays per UDP query).

use std::net::{IpAddr, Ipv4Addr};

use divan::Bencher;
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use vswitch_dns::{Asker, Catalog, EndpointRecords, Outcome, Responder, Transport, Zone};

fn main() {
    divan::main();
}

const NAMES: u32 = 1000;

fn responder() -> Responder {
    let mut catalog = Catalog::default();
    let subnet = IpAddr::V4(Ipv4Addr::new(10, 90, 0, 0));
    catalog.add_network("net", Zone::new("bench", true, false, vec![(subnet, 16)]));
    for i in 0..NAMES {
        let [_, _, c, d] = (i + 2).to_be_bytes();
        catalog.add_endpoint(
            "net",
            &EndpointRecords {
                id: format!("ep{i}"),
                scope: format!("ns{i}"),
                name: format!("web{i}"),
                aliases: Vec::new(),
                addrs: vec![IpAddr::V4(Ipv4Addr::new(10, 90, c, d))],
            },
        );
    }
    Responder::new(catalog.shared(), 5)
}

fn query(name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = 0x4242;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
    m.to_vec().expect("encode")
}

fn asker() -> Asker<'static> {
    Asker::Network {
        network_id: "net",
        client: IpAddr::V4(Ipv4Addr::new(10, 90, 0, 2)),
        namespace: None,
    }
}

/// A container name: the answer is built and encoded.
#[divan::bench]
fn a_record(bencher: Bencher) {
    let r = responder();
    let q = query("web500.", RecordType::A);
    bencher.bench_local(|| {
        let out = r.answer(asker(), Transport::Udp, divan::black_box(&q));
        assert!(matches!(out, Outcome::Reply(_)));
    });
}

/// An unknown single label: NXDOMAIN at once, never forwarded.
#[divan::bench]
fn nxdomain(bencher: Bencher) {
    let r = responder();
    let q = query("nosuchname.", RecordType::A);
    bencher.bench_local(|| {
        let out = r.answer(asker(), Transport::Udp, divan::black_box(&q));
        assert!(matches!(out, Outcome::Reply(_)));
    });
}

/// A name outside the networks: the decision to forward it upstream.
#[divan::bench]
fn forward_decision(bencher: Bencher) {
    let r = responder();
    let q = query("example.org.", RecordType::A);
    bencher.bench_local(|| {
        let out = r.answer(asker(), Transport::Udp, divan::black_box(&q));
        assert!(matches!(out, Outcome::Forward(_)));
    });
}
