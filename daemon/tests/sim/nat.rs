//! UDP NAT through the daemon's host sockets, to a server on loopback (reached through the
//! gateway's address, as with `--allow-host-loopback`), and the policy that refuses the rest.

use std::net::{SocketAddr, UdpSocket};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};

use crate::harness::{Port, Sim, secs};

/// A UDP server on loopback that sends back what it gets, upper-cased.
fn echo_server() -> u16 {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let port = sock.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n].to_ascii_uppercase(), from);
        }
    });
    port
}

/// The payload of the next UDP datagram to `port`'s `local` port, with its source.
fn udp_reply(port: &Port, local: u16) -> Option<(SocketAddr, Vec<u8>)> {
    let frame = port.recv_matching(
        secs(3),
        |p| matches!(&p.transport, Some(TransportSlice::Udp(u)) if u.destination_port() == local),
    )?;
    let p = SlicedPacket::from_ethernet(&frame).ok()?;
    let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Udp(u))) = (&p.net, &p.transport) else {
        return None;
    };
    let src = SocketAddr::new(ip.header().source_addr().into(), u.source_port());
    Some((src, u.payload().to_vec()))
}

#[test]
fn udp_to_a_loopback_server_goes_out_and_its_answers_come_back() {
    let sim = Sim::new(vec![]);
    sim.policy.write().host_loopback = true;
    let mut net = sim.network("udp", 31);
    let a = sim.plug(&mut net, "a");
    let server = SocketAddr::new(net.gateway.into(), echo_server());
    for i in 0..3 {
        let msg = format!("hello {i}");
        a.send(&a.udp_via_gateway(5000, server, msg.as_bytes()));
        let (src, payload) = udp_reply(&a, 5000).expect("an answer");
        assert_eq!(
            src, server,
            "the answer comes from where the container sent it"
        );
        assert_eq!(payload, msg.to_ascii_uppercase().as_bytes());
    }
    // A second conversation of the same container is a flow of its own.
    a.send(&a.udp_via_gateway(5001, server, b"other"));
    assert_eq!(udp_reply(&a, 5001).map(|r| r.1), Some(b"OTHER".to_vec()));
}

#[test]
fn udp_to_the_hosts_loopback_is_refused_by_default() {
    let sim = Sim::new(vec![]);
    let mut net = sim.network("closed", 32);
    let a = sim.plug(&mut net, "a");
    let server = SocketAddr::new(net.gateway.into(), echo_server());
    a.send(&a.udp_via_gateway(5000, server, b"let me in"));
    assert!(udp_reply(&a, 5000).is_none(), "host loopback reached");
    // Opened, the same datagram gets through: the refusal was the policy's.
    sim.policy.write().host_loopback = true;
    a.send(&a.udp_via_gateway(5000, server, b"now"));
    assert_eq!(udp_reply(&a, 5000).map(|r| r.1), Some(b"NOW".to_vec()));
}
