//! The gateway port: ARP and ping for its own address, silence for others.

use etherparse::{Icmpv4Type, NetSlice, PacketBuilder, TransportSlice};

use crate::harness::{BROADCAST, Sim, arp_frame, ms, parse_arp, secs};

#[test]
fn the_gateway_answers_arp_for_its_address_with_its_stable_mac() {
    let sim = Sim::new(vec![]);
    let mut net = sim.network("arp", 11);
    let a = sim.plug(&mut net, "a");
    a.send(&arp_frame(1, a.mac.0, BROADCAST, a.ip, [0; 6], net.gateway));
    let frame = a.recv(secs(2)).expect("an ARP reply");
    let arp = parse_arp(&frame).expect("ARP");
    assert_eq!(arp.op, 2);
    assert_eq!(arp.sender_ip, net.gateway);
    assert_eq!(
        arp.sender_mac, net.gw_mac.0,
        "derived from the gateway's address"
    );
    assert_eq!(&frame[..6], &a.mac.0, "unicast to the asker");
    // An address the gateway does not own gets no answer from it.
    let stranger = std::net::Ipv4Addr::new(10, 11, 0, 200);
    a.send(&arp_frame(1, a.mac.0, BROADCAST, a.ip, [0; 6], stranger));
    assert!(a.silent_for(ms(200)));
}

#[test]
fn the_gateway_answers_ping() {
    let sim = Sim::new(vec![]);
    let mut net = sim.network("ping", 12);
    let a = sim.plug(&mut net, "a");
    a.arp_gateway();
    for seq in 1..=3u16 {
        let mut req = Vec::new();
        PacketBuilder::ethernet2(a.mac.0, net.gw_mac.0)
            .ipv4(a.ip.octets(), net.gateway.octets(), 64)
            .icmpv4_echo_request(0x77, seq)
            .write(&mut req, b"sim ping")
            .expect("echo request");
        a.send(&req);
        let reply = a.recv_matching(secs(2), |p| {
            matches!(&p.transport, Some(TransportSlice::Icmpv4(i))
                if matches!(i.icmp_type(), Icmpv4Type::EchoReply(e) if e.id == 0x77 && e.seq == seq))
        });
        let reply = reply.unwrap_or_else(|| panic!("no echo reply to seq {seq}"));
        let p = etherparse::SlicedPacket::from_ethernet(&reply).expect("parse");
        let Some(NetSlice::Ipv4(ip)) = &p.net else {
            panic!("not IPv4");
        };
        assert_eq!(ip.header().source_addr(), net.gateway);
        assert_eq!(ip.header().destination_addr(), a.ip);
        let Some(TransportSlice::Icmpv4(icmp)) = &p.transport else {
            panic!("not ICMP");
        };
        assert_eq!(icmp.payload(), b"sim ping");
    }
}
