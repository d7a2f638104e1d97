//! Held SYNs: what a pending outbound connection costs, and how it ends.

use super::*;

const FAR: [u8; 4] = [198, 51, 100, 7];

fn ctr() -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(CTR))
}

/// A gateway that has seen the container's ARP, and the flow of a SYN from `port` to FAR:443.
fn held_syn(t: Instant, gw: &mut Gateway, port: u16) -> FlowId {
    gw.handle_frame(
        t,
        &tcp_between((CTR, port), (FAR, 443), 500, None, true, b""),
    );
    gw.poll_tcp_events()
        .into_iter()
        .find_map(|e| match e {
            crate::TcpEvent::Syn { flow, .. } => Some(flow),
            _ => None,
        })
        .expect("a Syn event")
}

fn ready(t: Instant) -> Gateway {
    let mut gw = gateway(t);
    gw.handle_frame(t, &arp_request(GW));
    drain(&mut gw);
    gw
}

#[test]
fn a_container_that_resets_the_handshake_leaves_no_listener_behind() {
    let t = Instant::now();
    let mut gw = ready(t);
    let flow = held_syn(t, &mut gw, 40010);
    assert!(gw.tcp_established(t, flow));
    let synack = drain(&mut gw)
        .iter()
        .find_map(|f| tcp_of(f))
        .expect("SYN-ACK");
    assert!(synack.0 && synack.1);
    // The container has given up on the connection: its stack answers the SYN-ACK with a RST.
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CTR_MAC, GW_MAC)
        .ipv4(CTR, FAR, 64)
        .tcp(40010, 443, synack.4, 0)
        .rst()
        .write(&mut out, b"")
        .expect("write");
    gw.handle_frame(t, &with_vnet(out));
    let events = gw.poll_tcp_events();
    assert!(
        events.contains(&crate::TcpEvent::Closed { flow, clean: false }),
        "{events:?}"
    );
    assert_eq!(gw.tcp_state(flow), crate::FlowState::Closed);
    assert_eq!(
        gw.tcp_flows(),
        0,
        "the listener is gone, not back in Listen"
    );
    assert_eq!(gw.tcp_flows_of(ctr()), 0);
    // A new SYN for the same pair is a new connection.
    let again = held_syn(t, &mut gw, 40010);
    assert_ne!(again, flow);
}

#[test]
fn a_held_syn_whose_dial_never_reports_is_refused_in_time() {
    let t = Instant::now();
    let mut gw = ready(t);
    let flow = held_syn(t, &mut gw, 40011);
    assert_eq!(gw.tcp_state(flow), crate::FlowState::Connecting);
    let due = gw.poll_timeout(t).expect("a deadline for the held SYN");
    assert!(due <= t + crate::tcp::HELD_SYN_TIMEOUT);
    gw.handle_timeout(t + crate::tcp::HELD_SYN_TIMEOUT);
    let rst = drain(&mut gw).iter().filter_map(|f| tcp_of(f)).any(|s| s.2);
    assert!(rst, "refused with a RST");
    assert_eq!(gw.tcp_state(flow), crate::FlowState::Closed);
    assert_eq!(gw.tcp_flows(), 0);
    assert_eq!(gw.poll_timeout(t + crate::tcp::HELD_SYN_TIMEOUT), None);
    // The dial reports after all: too late, the caller is told to drop its side.
    assert!(!gw.tcp_established(t + crate::tcp::HELD_SYN_TIMEOUT, flow));
}

#[test]
fn retransmitted_syns_of_a_held_flow_are_dropped_without_an_answer() {
    let t = Instant::now();
    let mut gw = ready(t);
    let flow = held_syn(t, &mut gw, 40012);
    for _ in 0..3 {
        gw.handle_frame(
            t,
            &tcp_between((CTR, 40012), (FAR, 443), 500, None, true, b""),
        );
    }
    assert!(
        drain(&mut gw).is_empty(),
        "no SYN-ACK, no RST while dialling"
    );
    assert!(gw.poll_tcp_events().is_empty());
    assert_eq!(gw.tcp_flows(), 1);
    assert!(gw.tcp_established(t, flow));
    assert_eq!(
        gw.tcp_large_flows(),
        1,
        "buffers come with the socket, at the dial"
    );
}

#[test]
fn only_the_first_flows_get_large_buffers_and_held_ones_none() {
    let t = Instant::now();
    let mut gw = ready(t);
    let n = crate::tcp::MAX_LARGE_FLOWS_PER_CONTAINER as u16 + 10;
    let flows: Vec<FlowId> = (0..n).map(|i| held_syn(t, &mut gw, 41000 + i)).collect();
    assert_eq!(gw.tcp_large_flows(), 0);
    for &f in &flows {
        assert!(gw.tcp_established(t, f));
    }
    drain(&mut gw);
    assert_eq!(
        gw.tcp_large_flows(),
        crate::tcp::MAX_LARGE_FLOWS_PER_CONTAINER as usize,
        "one container's share of large buffers"
    );
    assert_eq!(gw.tcp_flows_of(ctr()), u32::from(n));
    // Closing flows gives their share back.
    for &f in &flows {
        gw.tcp_abort(t, f);
    }
    let _ = gw.poll_tcp_events();
    assert_eq!((gw.tcp_flows(), gw.tcp_large_flows()), (0, 0));
}

#[test]
fn a_syn_padded_to_be_held_is_dropped() {
    let t = Instant::now();
    let mut gw = ready(t);
    gw.handle_frame(
        t,
        &tcp_between((CTR, 40013), (FAR, 443), 500, None, true, &[0u8; 1000]),
    );
    assert!(gw.poll_tcp_events().is_empty());
    assert_eq!(gw.tcp_flows(), 0, "nothing held");
    assert!(drain(&mut gw).is_empty());
}
