//! Port security: a container sends only from the MAC and addresses it was given. Spoofed
//! frames get it nothing: no NAT, no DNS scope of another namespace, no gateway neighbour
//! entry pointing at it, no router advertisement reaching the others.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};

use etherparse::PacketBuilder;

use crate::harness::{BROADCAST, Port, Sim, arp_frame, ms, secs, tcp_exchange};

/// A UDP datagram from `port` with `src` as its source address, through the gateway.
fn udp_from(port: &Port, src: Ipv4Addr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let std::net::IpAddr::V4(dst_ip) = dst.ip() else {
        panic!("IPv4 only");
    };
    let mut out = Vec::new();
    PacketBuilder::ethernet2(port.mac.0, port.gw_mac.0)
        .ipv4(src.octets(), dst_ip.octets(), 64)
        .udp(5000, dst.port())
        .write(&mut out, payload)
        .expect("udp");
    out
}

fn echo_server() -> (UdpSocket, SocketAddr) {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.set_read_timeout(Some(ms(300))).expect("timeout");
    let addr = sock.local_addr().expect("addr");
    (sock, addr)
}

#[test]
fn spoofed_sources_are_not_carried_out() {
    let sim = Sim::new(vec![]);
    sim.policy.write().host_loopback = true;
    let mut net = sim.network("nat", 51);
    let a = sim.plug(&mut net, "a");
    let b = sim.plug(&mut net, "b");
    let (server, addr) = echo_server();
    let via_gateway = SocketAddr::new(net.gateway.into(), addr.port());
    let mut buf = [0u8; 64];
    for spoofed in [b.ip, Ipv4Addr::new(8, 8, 8, 8), Ipv4Addr::LOCALHOST] {
        a.send(&udp_from(&a, spoofed, via_gateway, b"spoofed"));
        assert!(
            server.recv_from(&mut buf).is_err(),
            "{spoofed} reached the outside"
        );
    }
    assert_eq!(sim.stats_when(&net, secs(2), |s| s.spoofed >= 3).spoofed, 3);
    // From its own address it goes out.
    a.send(&udp_from(&a, a.ip, via_gateway, b"own"));
    let (n, _) = server
        .recv_from(&mut buf)
        .expect("its own address goes out");
    assert_eq!(&buf[..n], b"own");
}

/// Container a says "b's address is at my MAC" to the gateway. Without port security the
/// gateway would believe it and send b's TCP answers to a.
#[test]
fn arp_spoofing_cannot_take_another_containers_gateway_traffic() {
    let sim = Sim::new(vec![]);
    let mut net = sim.network("arp", 52);
    let a = sim.plug(&mut net, "a");
    let b = sim.plug(&mut net, "b");
    // b has talked to the gateway; then a claims b's address, by reply and by request.
    b.arp_gateway();
    for _ in 0..3 {
        a.send(&arp_frame(
            2,
            a.mac.0,
            net.gw_mac.0,
            b.ip,
            net.gw_mac.0,
            net.gateway,
        ));
        a.send(&arp_frame(1, a.mac.0, BROADCAST, b.ip, [0; 6], net.gateway));
    }
    let stats = sim.stats_when(&net, secs(2), |s| s.spoofed >= 6);
    assert_eq!(stats.spoofed, 6);
    // b's DNS over TCP: the gateway's SYN-ACK must find b, not a.
    let q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a\x00\x00\x01\x00\x01";
    let mut request = (q.len() as u16).to_be_bytes().to_vec();
    request.extend_from_slice(q);
    let answer = tcp_exchange(
        &b,
        46_000,
        SocketAddrV4::new(net.gateway, 53),
        &request,
        |r| r.len() >= 2 && r.len() >= 2 + usize::from(u16::from_be_bytes([r[0], r[1]])),
    );
    assert_eq!(&answer[2..4], &[0x12, 0x34], "b got its answer");
    let tcp = a.recv_matching(ms(200), |p| {
        matches!(p.transport, Some(etherparse::TransportSlice::Tcp(_)))
    });
    assert!(tcp.is_none(), "a got b's TCP traffic");
}

/// Namespace e is on red and blue; a is on red only. Posing as e, a would resolve blue's
/// names: the query never gets past its port.
#[test]
fn a_dns_scope_cannot_be_borrowed_with_another_address() {
    let sim = Sim::new(vec![]);
    let mut red = sim.network("red", 53);
    let mut blue = sim.network("blue", 54);
    let a = sim.plug(&mut red, "a");
    let e = sim.plug(&mut red, "e");
    let _e_blue = sim.plug(&mut blue, "e");
    let _secret = sim.plug(&mut blue, "secret");
    let dns = SocketAddr::new(red.gateway.into(), 53);
    let query = b"\x00\x07\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x06secret\x00\x00\x01\x00\x01";
    a.send(&udp_from(&a, e.ip, dns, query));
    assert!(
        a.silent_for(ms(300)),
        "an answer came back for a spoofed query"
    );
    assert!(e.silent_for(ms(100)));
    assert_eq!(sim.stats_when(&red, secs(2), |s| s.spoofed >= 1).spoofed, 1);
}

#[test]
fn router_advertisements_from_a_container_reach_nobody() {
    let sim = Sim::new(vec![]);
    let mut net = sim.network("ra", 55);
    let a = sim.plug(&mut net, "a");
    let b = sim.plug(&mut net, "b");
    let mut ra = Vec::new();
    let link_local = [
        0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0x42, 0xa, 0xff, 0xfe, 0, 0, 2,
    ];
    let all_nodes = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    PacketBuilder::ethernet2(a.mac.0, [0x33, 0x33, 0, 0, 0, 1])
        .ipv6(link_local, all_nodes, 255)
        .icmpv6(etherparse::Icmpv6Type::Unknown {
            type_u8: 134,
            code_u8: 0,
            bytes5to8: [64, 0, 0x07, 0x08],
        })
        .write(&mut ra, &[0; 8])
        .expect("ra");
    a.send(&ra);
    assert!(b.silent_for(ms(300)), "a router advertisement reached b");
    assert_eq!(sim.stats_when(&net, secs(2), |s| s.spoofed >= 1).spoofed, 1);
}

/// Without port security, a query can claim any source address; the answer still follows the
/// port it came in on, so posing as e gets a only its own scope.
#[test]
fn a_dns_scope_follows_the_port_not_the_address() {
    let sim = Sim::new(vec![]);
    let mut red = sim.network_open("red", 56);
    let mut blue = sim.network("blue", 57);
    let a = sim.plug(&mut red, "a");
    let e = sim.plug(&mut red, "e");
    let _e_blue = sim.plug(&mut blue, "e");
    let _secret = sim.plug(&mut blue, "secret");
    let dns = SocketAddr::new(red.gateway.into(), 53);
    let query = b"\x00\x07\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x06secret\x00\x00\x01\x00\x01";
    a.send(&udp_from(&a, e.ip, dns, query));
    let answer = a
        .recv_matching(secs(2), |p| {
            matches!(&p.transport, Some(etherparse::TransportSlice::Udp(u)) if u.source_port() == 53)
        })
        .expect("an answer");
    let p = etherparse::SlicedPacket::from_ethernet(&answer).expect("parse");
    let Some(etherparse::TransportSlice::Udp(u)) = &p.transport else {
        unreachable!()
    };
    let dns = u.payload();
    assert_eq!(dns[3] & 0x0f, 3, "NXDOMAIN: blue's names are not a's");
    assert_eq!(&dns[6..8], &[0, 0], "no answer records");
}
