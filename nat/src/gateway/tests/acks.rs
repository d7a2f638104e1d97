//! When the gateway acknowledges what a container sends: each segment at once, except on a
//! flow that is streaming, where ACKs are delayed (see `crate::tcp::BULK_DRAIN`).

use super::*;

const FAR: [u8; 4] = [198, 51, 100, 9];

/// Pure ACKs the gateway sent for the container's bytes up to `upto`.
fn acks_up_to(frames: &[Vec<u8>], upto: u32) -> usize {
    frames
        .iter()
        .filter_map(|f| tcp_of(f))
        .filter(|t| t.1 && t.5.is_empty() && t.4 == upto)
        .count()
}

#[test]
fn a_streaming_flow_gets_delayed_acks_and_an_interactive_one_immediate_ones() {
    let t = Instant::now();
    let mut gw = gateway(t);
    gw.handle_frame(t, &arp_request(GW));
    drain(&mut gw);
    gw.handle_frame(
        t,
        &tcp_between((CTR, 40100), (FAR, 443), 500, None, true, b""),
    );
    let flow = gw
        .poll_tcp_events()
        .into_iter()
        .find_map(|e| match e {
            crate::TcpEvent::Syn { flow, .. } => Some(flow),
            _ => None,
        })
        .expect("a Syn event");
    assert!(gw.tcp_established(t, flow));
    let synack = drain(&mut gw)
        .iter()
        .find_map(|f| tcp_of(f))
        .expect("SYN-ACK");
    let ack = Some(synack.3 + 1);
    let mut seq = 501u32;
    let mut send = |gw: &mut Gateway, now: Instant, len: usize| {
        gw.handle_frame(
            now,
            &tcp_between((CTR, 40100), (FAR, 443), seq, ack, false, &vec![7u8; len]),
        );
        seq += len as u32;
        seq
    };
    let read_all = |gw: &mut Gateway, now: Instant| {
        let mut n = 0;
        while let Some(m) = gw.tcp_recv_with(now, flow, |d| (d.len(), d.len())) {
            n += m;
        }
        n
    };

    // Interactive at first: a small segment is acknowledged at once.
    let upto = send(&mut gw, t, 100);
    assert_eq!(acks_up_to(&drain(&mut gw), upto), 1, "an immediate ACK");
    assert_eq!(read_all(&mut gw, t), 100);
    drain(&mut gw);

    // A large read marks the flow as streaming: the next segment's ACK waits.
    send(&mut gw, t, 40_000);
    drain(&mut gw);
    assert_eq!(read_all(&mut gw, t), 40_000);
    // Whatever ACK the stream left pending goes out; from here the timer runs from zero.
    let t1 = t + std::time::Duration::from_millis(2);
    gw.handle_timeout(t1);
    drain(&mut gw);
    let upto_next = send(&mut gw, t1, 1000);
    assert_eq!(
        acks_up_to(&drain(&mut gw), upto_next),
        0,
        "no ACK at once while streaming"
    );
    let later = t1 + std::time::Duration::from_millis(2);
    gw.handle_timeout(later);
    assert_eq!(
        acks_up_to(&drain(&mut gw), upto_next),
        1,
        "the delayed ACK goes out"
    );

    // A small read makes it interactive again: immediate ACKs.
    assert_eq!(read_all(&mut gw, later), 1000);
    drain(&mut gw);
    let upto = send(&mut gw, later, 10);
    assert_eq!(acks_up_to(&drain(&mut gw), upto), 1, "immediate again");
}
