//! Micro-benchmark of the gateway's TCP termination (outbound NAT and published ports): the
//! cost of one data segment on an established flow, with 0, 1000 and 10 000 other flows open.
//! It stays flat because the sockets are sharded (see nat/src/gateway.rs).

use std::net::Ipv4Addr;
use std::time::Instant;

use divan::Bencher;
use etherparse::PacketBuilder;
use vswitch_nat::{FlowId, Gateway, GatewayConfig, TcpEvent};

fn main() {
    divan::main();
}

const GW_MAC: [u8; 6] = [0x02, 0x42, 10, 88, 0, 1];
const CTR_MAC: [u8; 6] = [0x02, 0x42, 10, 88, 0, 2];
const CTR: [u8; 4] = [10, 88, 0, 2];
const FAR: [u8; 4] = [198, 51, 100, 7];
const VNET: usize = 12;

fn segment(sport: u16, seq: u32, ack: Option<u32>, syn: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; VNET];
    let b = PacketBuilder::ethernet2(CTR_MAC, GW_MAC)
        .ipv4(CTR, FAR, 64)
        .tcp(sport, 443, seq, 64240);
    let b = if syn { b.syn() } else { b };
    let b = match ack {
        Some(a) => b.ack(a),
        None => b,
    };
    b.write(&mut out, payload).expect("segment");
    out
}

fn arp_from_container() -> Vec<u8> {
    let mut out = vec![0u8; VNET];
    PacketBuilder::ethernet2(CTR_MAC, [0xff; 6])
        .arp(
            etherparse::ArpPacket::new(
                etherparse::ArpHardwareId::ETHERNET,
                etherparse::EtherType::IPV4,
                etherparse::ArpOperation::REQUEST,
                &CTR_MAC,
                &CTR,
                &[0; 6],
                &[10, 88, 0, 1],
            )
            .expect("arp"),
        )
        .write(&mut out)
        .expect("arp");
    out
}

fn syn_flow(events: Vec<TcpEvent>) -> Option<FlowId> {
    events.into_iter().find_map(|e| match e {
        TcpEvent::Syn { flow, .. } => Some(flow),
        _ => None,
    })
}

/// The SYN-ACK's sequence number among the frames the gateway emitted.
fn synack_seq(gw: &mut Gateway) -> Option<u32> {
    let mut seq = None;
    while let Some(f) = gw.poll_transmit() {
        if let Ok(p) = etherparse::SlicedPacket::from_ethernet(&f[VNET..])
            && let Some(etherparse::TransportSlice::Tcp(t)) = p.transport
            && t.syn()
        {
            seq = Some(t.sequence_number());
        }
    }
    seq
}

#[divan::bench(args = [0, 1000, 10_000])]
fn data_segment_with_other_flows(bencher: Bencher, others: u16) {
    let now = Instant::now();
    let mut gw = Gateway::new(
        &GatewayConfig {
            mac: GW_MAC,
            ipv4: Some((Ipv4Addr::new(10, 88, 0, 1), 16)),
            ipv6: None,
            mtu: 1500,
            nat: true,
        },
        now,
    )
    .expect("a valid gateway");
    gw.handle_frame(now, &arp_from_container());
    while gw.poll_transmit().is_some() {}
    // Idle flows: held outbound connections.
    for i in 0..others {
        gw.handle_frame(now, &segment(20_000 + i, 1, None, true, b""));
        let _ = gw.poll_tcp_events();
    }
    // The busy flow: handshake completed.
    gw.handle_frame(now, &segment(10_000, 1000, None, true, b""));
    let flow = syn_flow(gw.poll_tcp_events()).expect("SYN intercepted");
    gw.tcp_established(now, flow);
    let theirs = synack_seq(&mut gw).expect("SYN-ACK");
    gw.handle_frame(now, &segment(10_000, 1001, Some(theirs + 1), false, b""));
    let payload = [0x5a_u8; 1000];
    let mut seq = 1001_u32;
    let mut buf = vec![0u8; 4096];
    bencher.bench_local(|| {
        let f = segment(10_000, seq, Some(theirs + 1), false, &payload);
        gw.handle_frame(now, divan::black_box(&f));
        seq = seq.wrapping_add(payload.len() as u32);
        let n = gw.tcp_recv(now, flow, &mut buf);
        assert_eq!(n, payload.len());
        while gw.poll_transmit().is_some() {}
        let _ = gw.poll_tcp_events();
    });
}
