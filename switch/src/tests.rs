//! Byte-fixture tests of the bridge with a fake clock (a base instant plus offsets).

use super::*;

const HDR: usize = 12;
const A: [u8; 6] = [0x02, 0x42, 0xac, 0x11, 0x00, 0x02];
const B: [u8; 6] = [0x02, 0x42, 0xac, 0x11, 0x00, 0x03];
const C: [u8; 6] = [0x02, 0x42, 0xac, 0x11, 0x00, 0x04];
const BCAST: [u8; 6] = [0xff; 6];
const MCAST: [u8; 6] = [0x33, 0x33, 0x00, 0x00, 0x00, 0x01];

/// A frame as a vnet TAP delivers it: 12-byte virtio-net header, Ethernet header, payload.
fn frame(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; HDR];
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&[0x45; 46]);
    f
}

struct Lab {
    bridge: Bridge,
    t0: Instant,
    ports: Vec<PortId>,
}

impl Lab {
    fn new(ports: usize, config: Config) -> Self {
        let mut bridge = Bridge::new(config);
        let ports = (0..ports).map(|_| bridge.add_port()).collect();
        Self {
            bridge,
            t0: Instant::now(),
            ports,
        }
    }

    fn at(&self, secs: u64) -> Instant {
        self.t0 + Duration::from_secs(secs)
    }

    fn send(&mut self, secs: u64, port: usize, f: &[u8]) -> Decision {
        let now = self.at(secs);
        self.bridge.handle_frame(now, self.ports[port], f)
    }
}

fn lab(ports: usize) -> Lab {
    Lab::new(ports, Config::default())
}

#[test]
fn unknown_unicast_floods_then_learned_address_is_forwarded() {
    let mut lab = lab(3);
    assert_eq!(lab.send(0, 0, &frame(B, A)), Decision::Flood);
    let flooded: Vec<_> = lab.bridge.flood_ports(lab.ports[0]).collect();
    assert_eq!(
        flooded,
        vec![lab.ports[1], lab.ports[2]],
        "no hairpin to ingress"
    );
    // B answers from port 1: A is known now, so the reply goes straight to port 0.
    assert_eq!(
        lab.send(0, 1, &frame(A, B)),
        Decision::Forward(lab.ports[0])
    );
    // And A to B is now unicast to port 1.
    assert_eq!(
        lab.send(0, 0, &frame(B, A)),
        Decision::Forward(lab.ports[1])
    );
}

#[test]
fn broadcast_and_multicast_always_flood() {
    let mut lab = lab(3);
    let _ = lab.send(0, 1, &frame(A, B));
    assert_eq!(lab.send(0, 0, &frame(BCAST, A)), Decision::Flood);
    assert_eq!(lab.send(0, 0, &frame(MCAST, A)), Decision::Flood);
    assert_eq!(lab.bridge.stats().flooded, 3);
}

#[test]
fn moved_address_follows_its_new_port() {
    let mut lab = lab(3);
    let _ = lab.send(0, 0, &frame(BCAST, A));
    assert_eq!(
        lab.send(0, 1, &frame(A, B)),
        Decision::Forward(lab.ports[0])
    );
    // A shows up behind port 2 (a container was re-attached elsewhere).
    let _ = lab.send(1, 2, &frame(BCAST, A));
    assert_eq!(
        lab.send(1, 1, &frame(A, B)),
        Decision::Forward(lab.ports[2])
    );
    // Learned A and B, and A moved once.
    let e = lab.bridge.fdb_events();
    assert_eq!((e.learned, e.moved, e.aged), (2, 1, 0));
}

#[test]
fn a_pinned_address_cannot_be_taken_over_and_never_ages() {
    let mut lab = lab(3);
    let gw = lab.ports[0];
    assert!(lab.bridge.pin(lab.at(0), MacAddr(A), gw));
    // Known before it ever sent: frames to it go straight to its port.
    assert_eq!(lab.send(0, 1, &frame(A, B)), Decision::Forward(gw));
    // Port 2 sends with A as its source: dropped and counted, and A stays where it is.
    assert_eq!(
        lab.send(1, 2, &frame(BCAST, A)),
        Decision::Drop(DropReason::PinnedElsewhere)
    );
    assert_eq!(lab.bridge.stats().invalid_source, 1);
    assert_eq!(
        lab.bridge.port_stats(lab.ports[2]).map(|s| s.rx_dropped),
        Some(1)
    );
    assert_eq!(lab.send(2, 1, &frame(A, B)), Decision::Forward(gw));
    // Its own port may send from it, and long past the aging time it is still there.
    assert_eq!(
        lab.send(3, 0, &frame(B, A)),
        Decision::Forward(lab.ports[1])
    );
    let late = 10 * Config::default().aging.as_secs();
    lab.bridge.handle_timeout(lab.at(late));
    assert_eq!(lab.send(late, 1, &frame(A, B)), Decision::Forward(gw));
    assert!(
        lab.bridge
            .fdb()
            .iter(lab.at(late))
            .any(|(mac, port, _)| mac == MacAddr(A) && port == gw),
        "listed"
    );
    // The pin goes with its port.
    lab.bridge.remove_port(gw);
    assert_eq!(lab.send(late, 1, &frame(A, B)), Decision::Flood);
    assert!(
        !lab.bridge.pin(lab.at(late), MacAddr(A), gw),
        "no pin on a removed port"
    );
}

#[test]
fn destination_on_ingress_port_is_dropped_not_hairpinned() {
    let mut lab = lab(2);
    let _ = lab.send(0, 0, &frame(BCAST, A));
    assert_eq!(
        lab.send(0, 0, &frame(A, C)),
        Decision::Drop(DropReason::SamePort)
    );
    assert_eq!(
        lab.bridge.port_stats(lab.ports[0]).map(|s| s.rx_dropped),
        Some(1)
    );
}

#[test]
fn entries_age_out_and_the_sweep_reclaims_them() {
    let mut lab = Lab::new(
        2,
        Config {
            aging: Duration::from_secs(10),
            ..Config::default()
        },
    );
    assert_eq!(
        lab.bridge.poll_timeout(),
        None,
        "idle bridge wants no timer"
    );
    let _ = lab.send(0, 0, &frame(BCAST, A));
    assert_eq!(
        lab.send(9, 1, &frame(A, B)),
        Decision::Forward(lab.ports[0])
    );
    // At 10 s A has not been seen for the whole aging time: unknown again, so flooded.
    assert_eq!(lab.send(10, 1, &frame(A, B)), Decision::Flood);
    assert!(lab.bridge.poll_timeout().is_some());
    // B was refreshed at 10 s; the sweep at 15 s removes A only.
    lab.bridge.handle_timeout(lab.at(15));
    let live: Vec<_> = lab
        .bridge
        .fdb()
        .iter(lab.at(15))
        .map(|(m, _, _)| m)
        .collect();
    assert_eq!(live, vec![MacAddr(B)]);
    assert_eq!(lab.bridge.fdb().len(), 1);
    // Once everything aged out the bridge stops asking for timers.
    lab.bridge.handle_timeout(lab.at(30));
    assert!(lab.bridge.fdb().is_empty());
    assert_eq!(lab.bridge.fdb_events().aged, 2, "A, then B");
    assert_eq!(lab.bridge.poll_timeout(), None);
}

#[test]
fn fdb_reports_age() {
    let mut lab = lab(2);
    let _ = lab.send(3, 1, &frame(BCAST, B));
    let entries: Vec<_> = lab.bridge.fdb().iter(lab.at(5)).collect();
    assert_eq!(
        entries,
        vec![(MacAddr(B), lab.ports[1], Duration::from_secs(2))]
    );
}

#[test]
fn full_table_refuses_new_addresses_but_keeps_delivering() {
    let mut lab = Lab::new(
        2,
        Config {
            fdb_capacity: 4,
            aging: Duration::from_secs(60),
            ..Config::default()
        },
    );
    for i in 0..10u8 {
        let src = [0x02, 0, 0, 0, 0, i];
        let _ = lab.send(0, 0, &frame(BCAST, src));
    }
    assert_eq!(lab.bridge.fdb().len(), 4, "bounded");
    assert_eq!(lab.bridge.stats().learn_refused, 6);
    // A station that could not be learned is still reached, by flooding.
    assert_eq!(
        lab.send(0, 1, &frame([0x02, 0, 0, 0, 0, 9], B)),
        Decision::Flood
    );
    // Once the old entries age out, new addresses are learned again.
    let _ = lab.send(61, 1, &frame(BCAST, C));
    assert_eq!(
        lab.send(61, 0, &frame(C, A)),
        Decision::Forward(lab.ports[1])
    );
}

#[test]
fn removing_a_port_flushes_its_entries_and_reused_ids_start_clean() {
    let mut lab = lab(3);
    let _ = lab.send(0, 1, &frame(BCAST, B));
    assert_eq!(
        lab.send(0, 0, &frame(B, A)),
        Decision::Forward(lab.ports[1])
    );
    let stats = lab.bridge.remove_port(lab.ports[1]).expect("was there");
    assert_eq!(stats.rx_frames, 1);
    assert_eq!(lab.bridge.remove_port(lab.ports[1]), None, "only once");
    assert_eq!(lab.send(0, 0, &frame(B, A)), Decision::Flood);
    assert_eq!(
        lab.bridge.flood_ports(lab.ports[0]).collect::<Vec<_>>(),
        vec![lab.ports[2]]
    );
    let again = lab.bridge.add_port();
    assert_eq!(again, lab.ports[1], "id reused");
    assert_eq!(lab.bridge.port_stats(again), Some(&PortStats::default()));
    assert_eq!(
        lab.bridge.handle_frame(lab.at(0), PortId(99), &frame(B, A)),
        Decision::Drop(DropReason::UnknownPort)
    );
}

#[test]
fn separate_bridges_are_isolated() {
    let mut red = lab(2);
    let mut blue = lab(2);
    let _ = red.send(0, 0, &frame(BCAST, A));
    // Blue never saw A: to blue it is unknown, and nothing red learned leaks.
    assert_eq!(blue.send(0, 1, &frame(A, B)), Decision::Flood);
    assert_eq!(blue.bridge.fdb().iter(blue.at(0)).count(), 1);
    assert_eq!(red.bridge.fdb().lookup(red.at(0), MacAddr(B)), None);
}

#[test]
fn counters_follow_frames() {
    let mut lab = lab(3);
    let f = frame(BCAST, A);
    let len = f.len() as u64;
    let _ = lab.send(0, 0, &f);
    let _ = lab.send(0, 1, &frame(A, B));
    let p0 = *lab.bridge.port_stats(lab.ports[0]).expect("p0");
    let p1 = *lab.bridge.port_stats(lab.ports[1]).expect("p1");
    let p2 = *lab.bridge.port_stats(lab.ports[2]).expect("p2");
    assert_eq!(
        (p0.rx_frames, p0.rx_bytes, p0.tx_frames, p0.tx_bytes),
        (1, len, 1, len)
    );
    assert_eq!((p1.rx_frames, p1.tx_frames, p1.tx_bytes), (1, 1, len));
    assert_eq!((p2.rx_frames, p2.tx_frames), (0, 1));
    lab.bridge.note_tx_failed(lab.ports[2], f.len());
    let p2 = *lab.bridge.port_stats(lab.ports[2]).expect("p2");
    assert_eq!((p2.tx_frames, p2.tx_bytes, p2.tx_dropped), (0, 0, 1));
}

#[test]
fn malformed_frames_are_counted_and_dropped() {
    let mut lab = lab(2);
    for short in [&[][..], &[0u8; HDR][..], &[0u8; HDR + 13][..]] {
        assert_eq!(lab.send(0, 0, short), Decision::Drop(DropReason::Malformed));
    }
    assert_eq!(lab.bridge.stats().malformed, 3);
    assert_eq!(
        lab.bridge.port_stats(lab.ports[0]).map(|s| s.rx_dropped),
        Some(3)
    );
    assert!(lab.bridge.fdb().is_empty(), "nothing learned from garbage");
    // Multicast, broadcast and zero sources are invalid and never learned.
    for src in [MCAST, BCAST, [0; 6]] {
        assert_eq!(
            lab.send(0, 0, &frame(A, src)),
            Decision::Drop(DropReason::InvalidSource)
        );
    }
    assert_eq!(lab.bridge.stats().invalid_source, 3);
    assert!(lab.bridge.fdb().is_empty());
}

#[test]
fn frame_offset_zero_reads_plain_ethernet() {
    let mut lab = Lab::new(
        2,
        Config {
            frame_offset: 0,
            ..Config::default()
        },
    );
    let f = frame(BCAST, A);
    assert_eq!(lab.send(0, 0, &f[HDR..]), Decision::Flood);
    assert_eq!(
        lab.bridge.fdb().lookup(lab.at(0), MacAddr(A)),
        Some(lab.ports[0])
    );
}

#[test]
fn arbitrary_bytes_never_panic() {
    // A cheap deterministic fuzz: xorshift-generated frames of every length up to 80 bytes.
    let mut lab = lab(4);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..20_000u64 {
        let len = (i % 81) as usize;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let port = (i % 4) as usize;
        let _ = lab.send(i / 1000, port, &bytes);
    }
    assert!(lab.bridge.fdb().len() <= lab.bridge.fdb().capacity());
}
