use super::*;
use etherparse::{ArpHardwareId, ArpOperation, ArpPacket as EpArp, EtherType, PacketBuilder};
use etherparse::{LinkSlice, NetSlice, SlicedPacket, TransportSlice};
use std::net::SocketAddr;

const GW_MAC: [u8; 6] = [0x02, 0x42, 10, 88, 0, 1];
const CTR_MAC: [u8; 6] = [0x02, 0x42, 10, 88, 0, 2];
const GW: [u8; 4] = [10, 88, 0, 1];
const CTR: [u8; 4] = [10, 88, 0, 2];

fn gateway(now: Instant) -> Gateway {
    Gateway::new(
        &GatewayConfig {
            mac: GW_MAC,
            ipv4: Some((Ipv4Addr::from(GW), 16)),
            ipv6: None,
            mtu: 1500,
            nat: true,
        },
        now,
    )
    .expect("a valid gateway")
}

fn with_vnet(eth: Vec<u8>) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend(eth);
    f
}

fn arp_request(target: [u8; 4]) -> Vec<u8> {
    let arp = EpArp::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        ArpOperation::REQUEST,
        &CTR_MAC,
        &CTR,
        &[0; 6],
        &target,
    )
    .expect("arp");
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CTR_MAC, [0xff; 6])
        .arp(arp)
        .write(&mut out)
        .expect("write");
    with_vnet(out)
}

fn echo_request(seq: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CTR_MAC, GW_MAC)
        .ipv4(CTR, GW, 64)
        .icmpv4_echo_request(7, seq)
        .write(&mut out, b"ping payload")
        .expect("write");
    with_vnet(out)
}

#[test]
fn answers_arp_for_its_own_address_only() {
    let t = Instant::now();
    let mut gw = gateway(t);
    gw.handle_frame(t, &arp_request([10, 88, 0, 77]));
    assert!(
        gw.poll_transmit().is_none(),
        "ARP for another host is not answered"
    );
    assert_eq!(gw.stats().ignored, 1);

    gw.handle_frame(t, &arp_request(GW));
    let reply = gw.poll_transmit().expect("ARP reply");
    assert_eq!(&reply[..VNET_HDR_LEN], &[0; VNET_HDR_LEN]);
    let p = SlicedPacket::from_ethernet(&reply[VNET_HDR_LEN..]).expect("parses");
    let Some(LinkSlice::Ethernet2(eth)) = p.link else {
        panic!("ethernet")
    };
    assert_eq!((eth.source(), eth.destination()), (GW_MAC, CTR_MAC));
    let Some(NetSlice::Arp(arp)) = p.net else {
        panic!("arp")
    };
    assert_eq!(arp.operation(), ArpOperation::REPLY);
    assert_eq!(arp.sender_hw_addr(), &GW_MAC);
    assert_eq!(arp.sender_protocol_addr(), &GW);
}

#[test]
fn answers_ping() {
    let t = Instant::now();
    let mut gw = gateway(t);
    gw.handle_frame(t, &arp_request(GW));
    let _ = gw.poll_transmit();
    gw.handle_frame(t, &echo_request(3));
    let reply = gw.poll_transmit().expect("echo reply");
    let p = SlicedPacket::from_ethernet(&reply[VNET_HDR_LEN..]).expect("parses");
    let Some(NetSlice::Ipv4(ip)) = p.net else {
        panic!("ipv4")
    };
    assert_eq!(ip.header().source(), GW);
    assert_eq!(ip.header().destination(), CTR);
    let Some(TransportSlice::Icmpv4(icmp)) = p.transport else {
        panic!("icmp")
    };
    assert!(matches!(
        icmp.icmp_type(),
        etherparse::Icmpv4Type::EchoReply(e) if e.id == 7 && e.seq == 3
    ));
    assert_eq!(icmp.payload(), b"ping payload");
}

#[test]
fn ignores_frames_for_other_macs_and_garbage() {
    let t = Instant::now();
    let mut gw = gateway(t);
    let mut other = echo_request(1);
    other[VNET_HDR_LEN..VNET_HDR_LEN + 6].copy_from_slice(&[0x02, 0, 0, 0, 0, 9]);
    gw.handle_frame(t, &other);
    for junk in [&[][..], &[0u8; 20][..], &[0xffu8; 40][..]] {
        gw.handle_frame(t, junk);
    }
    // Unicast to the gateway MAC but truncated IP: the stack drops it quietly.
    let mut cut = echo_request(2);
    cut.truncate(VNET_HDR_LEN + 20);
    gw.handle_frame(t, &cut);
    assert!(gw.poll_transmit().is_none());
    assert_eq!(gw.stats().ignored, 4);
}

fn tcp_frame(seq: u32, ack: Option<u32>, syn: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let b = PacketBuilder::ethernet2(CTR_MAC, GW_MAC)
        .ipv4(CTR, GW, 64)
        .tcp(40000, 53, seq, 64240);
    let b = if syn { b.syn() } else { b };
    let b = match ack {
        Some(a) => b.ack(a),
        None => b,
    };
    b.write(&mut out, payload).expect("write");
    with_vnet(out)
}

fn tcp_of(frame: &[u8]) -> Option<(bool, bool, bool, u32, u32, Vec<u8>)> {
    let p = SlicedPacket::from_ethernet(&frame[VNET_HDR_LEN..]).ok()?;
    let Some(TransportSlice::Tcp(t)) = p.transport else {
        return None;
    };
    Some((
        t.syn(),
        t.ack(),
        t.rst(),
        t.sequence_number(),
        t.acknowledgment_number(),
        t.payload().to_vec(),
    ))
}

/// A gateway with a stream service on port 53 (2 connections, 5 s idle) and one client
/// connected to it from sequence number 1000; returns the gateway and the server's sequence.
fn stream_client(t: Instant) -> (Gateway, u32) {
    let mut gw = gateway(t);
    gw.enable_stream_service(t, 53, 2, Duration::from_secs(5));
    // The gateway must know the client's MAC to answer: it learns it from ARP.
    gw.handle_frame(t, &arp_request(GW));
    let _ = gw.poll_transmit();
    gw.handle_frame(t, &tcp_frame(1000, None, true, b""));
    let synack = gw.poll_transmit().expect("SYN-ACK");
    let (syn, ack, rst, srv_seq, ackno, _) = tcp_of(&synack).expect("tcp");
    assert!(syn && ack && !rst, "got a SYN-ACK");
    assert_eq!(ackno, 1001);
    (gw, srv_seq)
}

#[test]
fn stream_service_accepts_frames_messages_and_answers() {
    let t = Instant::now();
    let (mut gw, srv_seq) = stream_client(t);
    // One length-prefixed message in two pieces.
    let msg = b"\x00\x05hello";
    gw.handle_frame(t, &tcp_frame(1001, Some(srv_seq + 1), false, &msg[..3]));
    assert!(
        gw.poll_stream_messages().is_empty(),
        "incomplete message held back"
    );
    gw.handle_frame(t, &tcp_frame(1004, Some(srv_seq + 1), false, &msg[3..]));
    let got = gw.poll_stream_messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message, b"hello");
    assert_eq!(got[0].peer, std::net::IpAddr::from(CTR));
    while gw.poll_transmit().is_some() {}
    gw.stream_reply(t, got[0].conn, b"world!");
    let mut answered = Vec::new();
    while let Some(f) = gw.poll_transmit() {
        if let Some((_, _, _, _, _, payload)) = tcp_of(&f) {
            answered.extend(payload);
        }
    }
    assert_eq!(answered, b"\x00\x06world!");
    assert_eq!(gw.stream_connections(), 1);
    // Idle past the deadline: the connection is cut (RST) and forgotten.
    let later = t + Duration::from_secs(6);
    gw.handle_timeout(later);
    let mut saw_rst = false;
    while let Some(f) = gw.poll_transmit() {
        saw_rst |= tcp_of(&f).is_some_and(|x| x.2);
    }
    gw.handle_timeout(later + Duration::from_millis(10));
    assert!(saw_rst, "idle client cut");
    assert_eq!(gw.stream_connections(), 0);
}

fn tcp_between(
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    seq: u32,
    ack: Option<u32>,
    syn: bool,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    let b = PacketBuilder::ethernet2(CTR_MAC, GW_MAC)
        .ipv4(src.0, dst.0, 64)
        .tcp(src.1, dst.1, seq, 64240);
    let b = if syn { b.syn() } else { b };
    let b = match ack {
        Some(a) => b.ack(a),
        None => b,
    };
    b.write(&mut out, payload).expect("write");
    with_vnet(out)
}

fn ip_pair(frame: &[u8]) -> Option<([u8; 4], [u8; 4])> {
    let p = SlicedPacket::from_ethernet(&frame[VNET_HDR_LEN..]).ok()?;
    let Some(NetSlice::Ipv4(ip)) = p.net else {
        return None;
    };
    Some((ip.header().source(), ip.header().destination()))
}

fn drain(gw: &mut Gateway) -> Vec<Vec<u8>> {
    std::iter::from_fn(|| gw.poll_transmit()).collect()
}

#[test]
fn outbound_syn_is_held_until_the_dial_succeeds() {
    let t = Instant::now();
    let mut gw = gateway(t);
    gw.handle_frame(t, &arp_request(GW));
    drain(&mut gw);
    let far = [198, 51, 100, 7];
    gw.handle_frame(
        t,
        &tcp_between((CTR, 40001), (far, 443), 500, None, true, b""),
    );
    assert!(drain(&mut gw).is_empty(), "no SYN-ACK before the dial");
    let events = gw.poll_tcp_events();
    let Some(crate::TcpEvent::Syn { flow, src, dst }) = events.first().cloned() else {
        panic!("expected a Syn event, got {events:?}")
    };
    assert_eq!(src, "10.88.0.2:40001".parse().expect("sa"));
    assert_eq!(dst, "198.51.100.7:443".parse().expect("sa"));
    // A retransmitted SYN does not make a second flow.
    gw.handle_frame(
        t,
        &tcp_between((CTR, 40001), (far, 443), 500, None, true, b""),
    );
    assert!(
        gw.poll_tcp_events()
            .iter()
            .all(|e| !matches!(e, crate::TcpEvent::Syn { .. }))
    );
    assert_eq!(gw.tcp_flows(), 1);
    gw.tcp_established(t, flow);
    let out = drain(&mut gw);
    let synack = out.iter().find_map(|f| tcp_of(f)).expect("SYN-ACK");
    assert!(synack.0 && synack.1, "SYN-ACK from the far side");
    assert_eq!(
        ip_pair(&out[0]),
        Some((far, CTR)),
        "answers as the destination"
    );
    // The container completes the handshake and sends data; the caller reads it.
    gw.handle_frame(
        t,
        &tcp_between(
            (CTR, 40001),
            (far, 443),
            501,
            Some(synack.3 + 1),
            false,
            b"GET /",
        ),
    );
    assert_eq!(gw.tcp_state(flow), crate::FlowState::Open);
    let mut buf = [0u8; 64];
    let n = gw.tcp_recv(t, flow, &mut buf);
    assert_eq!(&buf[..n], b"GET /");
    assert_eq!(gw.tcp_send(t, flow, b"200 OK"), 6);
    let data: Vec<u8> = drain(&mut gw)
        .iter()
        .filter_map(|f| tcp_of(f))
        .flat_map(|x| x.5)
        .collect();
    assert_eq!(data, b"200 OK");
}

#[test]
fn refused_dial_resets_the_container() {
    let t = Instant::now();
    let mut gw = gateway(t);
    gw.handle_frame(t, &arp_request(GW));
    drain(&mut gw);
    gw.handle_frame(
        t,
        &tcp_between((CTR, 40002), ([198, 51, 100, 8], 81), 900, None, true, b""),
    );
    let Some(crate::TcpEvent::Syn { flow, .. }) = gw.poll_tcp_events().first().cloned() else {
        panic!("syn")
    };
    gw.tcp_abort(t, flow);
    let _ = gw.poll_tcp_events();
    // The held SYN is answered with a RST once the listener is gone.
    gw.handle_frame(
        t,
        &tcp_between((CTR, 40002), ([198, 51, 100, 8], 81), 900, None, true, b""),
    );
    let _ = gw.poll_tcp_events();
    let rst = drain(&mut gw).iter().filter_map(|f| tcp_of(f)).any(|x| x.2);
    assert!(rst, "refusal seen as RST");
}

/// A published-port connection from 203.0.113.5:50000 to the container's port 8080, with the
/// handshake completed by the container: returns the gateway (ARP done) and the flow.
fn inbound_connection(t: Instant) -> (Gateway, FlowId) {
    let mut gw = gateway(t);
    gw.handle_frame(t, &arp_request(GW));
    drain(&mut gw);
    let client = [203, 0, 113, 5];
    let flow = gw
        .tcp_connect(
            t,
            "203.0.113.5:50000".parse().expect("sa"),
            "10.88.0.2:8080".parse().expect("sa"),
        )
        .expect("flow");
    let out = drain(&mut gw);
    let syn = out.iter().find_map(|f| tcp_of(f)).expect("SYN");
    assert!(syn.0 && !syn.1);
    assert_eq!(
        ip_pair(&out[0]),
        Some((client, CTR)),
        "the container sees the client"
    );
    // The container answers the client's address; the any-IP gateway takes it.
    let mut synack = Vec::new();
    PacketBuilder::ethernet2(CTR_MAC, GW_MAC)
        .ipv4(CTR, client, 64)
        .tcp(8080, 50000, 7000, 64240)
        .syn()
        .ack(syn.3 + 1)
        .write(&mut synack, b"")
        .expect("write");
    gw.handle_frame(t, &with_vnet(synack));
    (gw, flow)
}

#[test]
fn inbound_connection_uses_the_clients_address() {
    let t = Instant::now();
    let (gw, flow) = inbound_connection(t);
    assert_eq!(gw.tcp_state(flow), crate::FlowState::Open);
}

#[test]
fn pings_to_the_outside_are_not_faked() {
    let t = Instant::now();
    let mut gw = gateway(t);
    gw.handle_frame(t, &arp_request(GW));
    drain(&mut gw);
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CTR_MAC, GW_MAC)
        .ipv4(CTR, [198, 51, 100, 9], 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut out, b"x")
        .expect("write");
    gw.handle_frame(t, &with_vnet(out));
    assert!(drain(&mut gw).is_empty());
}

#[test]
fn thousands_of_flows_spread_over_shards_each_reach_their_own_socket() {
    let t = Instant::now();
    let mut gw = gateway(t);
    gw.handle_frame(t, &arp_request(GW));
    drain(&mut gw);
    let far = [198, 51, 100, 7];
    let mut flows = Vec::new();
    for i in 0..3000u16 {
        let port = 20000 + i;
        gw.handle_frame(
            t,
            &tcp_between((CTR, port), (far, 443), 1000, None, true, b""),
        );
        let events = gw.poll_tcp_events();
        let syns: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                crate::TcpEvent::Syn { flow, src, .. } => Some((*flow, src.port())),
                _ => None,
            })
            .collect();
        match syns.as_slice() {
            [(flow, p)] if *p == port => flows.push(*flow),
            other => panic!("SYN {i}: {other:?}"),
        }
    }
    assert_eq!(gw.tcp_flows(), 3000);
    let used = gw.shards.iter().filter(|s| !s.held.is_empty()).count();
    assert!(used > SHARDS * 3 / 4, "flows spread over {used} shards");
    assert_eq!(gw.held_of(IpAddr::V4(Ipv4Addr::from(CTR))), 3000);
    assert_eq!(gw.tcp_large_flows(), 0, "held SYNs have no buffers");
    // A sample of them completes the handshake and carries data to the right flow.
    for (i, &flow) in flows.iter().enumerate().step_by(97) {
        let port = 20000 + i as u16;
        gw.tcp_established(t, flow);
        let out = drain(&mut gw);
        let synack = out
            .iter()
            .filter_map(|f| tcp_of(f))
            .find(|s| s.0)
            .expect("SYN-ACK");
        assert!(synack.1, "flow {i}: {synack:?}");
        let hello = format!("hello {i}");
        gw.handle_frame(
            t,
            &tcp_between(
                (CTR, port),
                (far, 443),
                1001,
                Some(synack.3 + 1),
                false,
                hello.as_bytes(),
            ),
        );
        let mut buf = [0u8; 32];
        let n = gw.tcp_recv(t, flow, &mut buf);
        assert_eq!(&buf[..n], hello.as_bytes(), "flow {i}");
        assert_eq!(gw.tcp_state(flow), crate::FlowState::Open);
    }
    // Aborted flows leave their shard at once.
    for &flow in &flows {
        gw.tcp_abort(t, flow);
    }
    let _ = gw.poll_tcp_events();
    assert_eq!(gw.tcp_flows(), 0);
}

#[test]
fn an_arp_answer_releases_waiting_sockets_in_every_shard_at_once() {
    let t = Instant::now();
    let mut gw = gateway(t);
    // No ARP seen yet: the gateway does not know the container's MAC. Pick a client port whose
    // connection lives in a shard other than 0, where ARP answers are polled.
    let container: SocketAddr = "10.88.0.2:8080".parse().expect("sa");
    let local = (50_000..51_000)
        .map(|p| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 5)), p))
        .find(|l| gw.shard_for(*l, container) != 0)
        .expect("a non-zero shard");
    let flow = gw.tcp_connect(t, local, container).expect("flow");
    let out = drain(&mut gw);
    assert!(
        out.iter().all(|f| tcp_of(f).is_none()),
        "no SYN before the neighbour is known"
    );
    // The container answers the gateway's ARP request; the SYN must go out now, not after
    // smoltcp's one-second back-off.
    let arp = EpArp::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        ArpOperation::REPLY,
        &CTR_MAC,
        &CTR,
        &GW_MAC,
        &GW,
    )
    .expect("arp");
    let mut reply = Vec::new();
    PacketBuilder::ethernet2(CTR_MAC, GW_MAC)
        .arp(arp)
        .write(&mut reply)
        .expect("write");
    gw.handle_frame(t, &with_vnet(reply));
    let out = drain(&mut gw);
    let syn = out
        .iter()
        .find_map(|f| tcp_of(f))
        .expect("SYN right after the ARP reply");
    assert!(syn.0 && !syn.1);
    assert_eq!(gw.tcp_state(flow), crate::FlowState::Connecting);
}

/// Drives the gateway's timers from `from` to `to` in one-second steps, dropping what it sends.
fn run_timers(gw: &mut Gateway, from: Instant, to: Instant) {
    let mut now = from;
    while now <= to {
        gw.handle_timeout(now);
        drain(gw);
        now += Duration::from_secs(1);
    }
}

#[test]
fn a_handshake_the_container_never_answers_is_given_up() {
    let t = Instant::now();
    let mut gw = gateway(t);
    gw.handle_frame(t, &arp_request(GW));
    drain(&mut gw);
    let flow = gw
        .tcp_connect(
            t,
            "203.0.113.5:50000".parse().expect("sa"),
            "10.88.0.2:8080".parse().expect("sa"),
        )
        .expect("flow");
    drain(&mut gw);
    run_timers(&mut gw, t, t + Duration::from_secs(12));
    assert_eq!(gw.tcp_state(flow), crate::FlowState::Closed);
    assert_eq!(gw.tcp_flows(), 0, "the slot is free again");
    assert_eq!(gw.tcp_flows_of(IpAddr::from(CTR)), 0);
}

#[test]
fn an_established_flow_whose_container_vanished_is_aborted_after_the_idle_limit() {
    let t = Instant::now();
    let (mut gw, flow) = inbound_connection(t);
    assert_eq!(gw.tcp_state(flow), crate::FlowState::Open);
    // Past the connect timeout: established flows are not cut by it.
    run_timers(&mut gw, t, t + Duration::from_secs(30));
    assert_eq!(gw.tcp_state(flow), crate::FlowState::Open, "quiet is fine");
    // The container never answers the keep-alive probes: aborted within the idle limit.
    run_timers(
        &mut gw,
        t + Duration::from_secs(31),
        t + Duration::from_secs(31 + 45 + 120 + 5),
    );
    assert_eq!(gw.tcp_state(flow), crate::FlowState::Closed);
    assert_eq!(gw.tcp_flows(), 0);
}

#[test]
fn one_container_cannot_take_more_than_a_quarter_of_the_flow_table_each_way() {
    let t = Instant::now();
    let mut gw = gateway(t);
    gw.handle_frame(t, &arp_request(GW));
    drain(&mut gw);
    let far = [198, 51, 100, 7];
    let cap = crate::tcp::MAX_FLOWS_PER_CONTAINER;
    assert_eq!(cap as usize, crate::tcp::MAX_FLOWS / 4);
    // Outbound SYNs from one container, each to its own destination port.
    for i in 0..cap + 10 {
        let src_port = 10000 + u16::try_from(i).expect("fits a port");
        gw.handle_frame(
            t,
            &tcp_between((CTR, src_port), (far, 443), 1, None, true, b""),
        );
        gw.poll_tcp_events();
    }
    assert_eq!(gw.tcp_flows_of(IpAddr::from(CTR)), cap, "capped");
    // Another container still gets flows, in and out.
    let other: [u8; 4] = [10, 88, 0, 3];
    assert!(
        gw.tcp_connect(
            t,
            "203.0.113.5:50000".parse().expect("sa"),
            SocketAddr::from((other, 8080)),
        )
        .is_some()
    );
    // The capped one still gets clients of its published port (their own quarter), but only
    // a quarter of them: clients hammering its port take neither its way out nor the table.
    let inbound = (0..cap + 10)
        .filter(|i| {
            let client = SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9)),
                20000 + u16::try_from(*i).expect("port"),
            );
            gw.tcp_connect(t, client, SocketAddr::from((CTR, 8080)))
                .is_some()
        })
        .count();
    assert_eq!(inbound, cap as usize);
    assert_eq!(gw.tcp_flows_of(IpAddr::from(CTR)), 2 * cap);
    // Every flow over a share was refused and counted (the outbound SYN retransmissions of
    // one flow are not new flows).
    assert_eq!(gw.tcp_flows_refused(), 20);
}

#[test]
fn stream_messages_left_unanswered_do_not_pin_the_connection() {
    let t = Instant::now();
    let (mut gw, srv_seq) = stream_client(t);
    // Twenty pipelined messages in one segment: only MAX_PENDING are taken while unanswered.
    let msgs: Vec<u8> = (0..20).flat_map(|_| *b"\x00\x02ab").collect();
    gw.handle_frame(t, &tcp_frame(1001, Some(srv_seq + 1), false, &msgs));
    let got = gw.poll_stream_messages();
    assert_eq!(got.len(), 16, "the rest waits for answers");
    // The caller will answer none of them (malformed, say) and says so.
    for m in &got {
        gw.stream_unanswered(t, m.conn);
    }
    gw.handle_timeout(t);
    let more = gw.poll_stream_messages();
    assert_eq!(more.len(), 4, "the rest is taken now");
    for m in &more {
        gw.stream_unanswered(t, m.conn);
    }
    while gw.poll_transmit().is_some() {}
    // Nothing pending: the idle limit applies and the connection goes.
    let later = t + Duration::from_secs(6);
    gw.handle_timeout(later);
    while gw.poll_transmit().is_some() {}
    gw.handle_timeout(later + Duration::from_millis(10));
    assert_eq!(gw.stream_connections(), 0);
}

/// Addresses an interface cannot have are refused, not a panic in smoltcp.
#[test]
fn a_gateway_needs_unicast_addresses() {
    let t = Instant::now();
    let config = |mac: [u8; 6], ip: [u8; 4]| GatewayConfig {
        mac,
        ipv4: Some((Ipv4Addr::from(ip), 24)),
        ipv6: None,
        mtu: 1500,
        nat: true,
    };
    for ip in [[224, 0, 0, 1], [255, 255, 255, 255], [0, 0, 0, 0]] {
        assert!(matches!(
            Gateway::new(&config(GW_MAC, ip), t),
            Err(GatewayError::Address(_))
        ));
    }
    let v6 = GatewayConfig {
        ipv6: Some(("ff02::1".parse().expect("ip"), 64)),
        ..config(GW_MAC, GW)
    };
    assert!(matches!(
        Gateway::new(&v6, t),
        Err(GatewayError::Address(_))
    ));
    for mac in [[0xff; 6], [0x01, 0, 0x5e, 0, 0, 1], [0; 6]] {
        assert!(matches!(
            Gateway::new(&config(mac, GW), t),
            Err(GatewayError::Mac(_))
        ));
    }
    assert!(Gateway::new(&config(GW_MAC, GW), t).is_ok());
}

mod acks;
mod held;
