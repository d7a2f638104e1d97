//! Property tests: whatever frames arrive, on whatever ports, at whatever times, the bridge
//! never panics, never sends a frame back where it came from or to a port that is gone, keeps
//! its table within its bound, and its counters add up.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use vswitch_switch::vnet::{VNET_HDR_LEN, VnetHdr};
use vswitch_switch::{Bridge, Config, Decision, DropReason, MacAddr, PortGuard, PortId};

/// A few MACs, so that frames meet each other's addresses: unicast, broadcast, multicast,
/// zero.
fn mac() -> impl Strategy<Value = [u8; 6]> {
    prop_oneof![
        (0u8..6).prop_map(|i| [0x02, 0x42, 0, 0, 0, i]),
        Just([0xff; 6]),
        Just([0x01, 0x00, 0x5e, 0, 0, 1]),
        Just([0; 6]),
        any::<[u8; 6]>(),
    ]
}

/// A frame: arbitrary bytes, or a virtio-net header and Ethernet header with some payload,
/// possibly cut short.
fn frame() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..40),
        (
            mac(),
            mac(),
            prop::collection::vec(any::<u8>(), 0..64),
            any::<usize>()
        )
            .prop_map(|(dst, src, payload, cut)| {
                let mut f = vec![0u8; VNET_HDR_LEN];
                f.extend_from_slice(&dst);
                f.extend_from_slice(&src);
                f.extend_from_slice(&[0x08, 0x00]);
                f.extend_from_slice(&payload);
                if cut % 4 == 0 {
                    f.truncate(cut % (f.len() + 1));
                }
                f
            }),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    Frame { port: usize, frame: Vec<u8> },
    Wait(u64),
    AddPort,
    RemovePort(usize),
    Pin { port: usize, mac: [u8; 6] },
    Guard { port: usize, host: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0usize..6, frame()).prop_map(|(port, frame)| Op::Frame { port, frame }),
        1 => (0u64..400_000).prop_map(Op::Wait),
        1 => Just(Op::AddPort),
        1 => (0usize..6).prop_map(Op::RemovePort),
        1 => (0usize..6, mac()).prop_map(|(port, mac)| Op::Pin { port, mac }),
        1 => (0usize..6, 0u8..6).prop_map(|(port, host)| Op::Guard { port, host }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn any_sequence_of_frames_keeps_the_bridge_consistent(ops in prop::collection::vec(op(), 1..64)) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut bridge = Bridge::new(Config {
            frame_offset: VNET_HDR_LEN,
            fdb_capacity: 4,
            aging: Duration::from_secs(300),
            mtu: Some(48),
        });
        let mut guards = std::collections::HashMap::<PortId, PortGuard>::new();
        let mut ports: Vec<Option<PortId>> = (0..3).map(|_| Some(bridge.add_port())).collect();
        // Per live port: frames in, frames dropped on the way in.
        let mut rx = std::collections::HashMap::<PortId, (u64, u64)>::new();
        let mut floods = 0u64;
        let mut pins = 0usize;
        for op in ops {
            match op {
                Op::Frame { port, frame } => {
                    let Some(Some(p)) = ports.get(port).copied() else {
                        // A port that is not there: refused, nothing counted.
                        continue;
                    };
                    let d = bridge.handle_frame(now, p, &frame);
                    let e = rx.entry(p).or_default();
                    e.0 += 1;
                    if let Some(g) = guards.get(&p)
                        && !matches!(d, Decision::Drop(_))
                    {
                        prop_assert_eq!(g.check(&frame[VNET_HDR_LEN..]), Ok(()), "a spoofed frame got through");
                    }
                    if !matches!(d, Decision::Drop(_)) {
                        let l3 = frame.len() - VNET_HDR_LEN - 14;
                        prop_assert!(l3 <= 48 || VnetHdr::parse(&frame).is_some_and(|h| h.is_gso()), "{l3} bytes over an MTU of 48");
                    }
                    match d {
                        Decision::Forward(out) => {
                            prop_assert_ne!(out, p, "hairpin");
                            prop_assert!(ports.contains(&Some(out)), "to a port that is gone");
                        }
                        Decision::Flood => {
                            floods += 1;
                            prop_assert!(bridge.flood_ports(p).all(|q| q != p));
                        }
                        Decision::Drop(DropReason::UnknownPort) => {
                            prop_assert!(false, "a live port is unknown");
                        }
                        Decision::Drop(_) => e.1 += 1,
                    }
                }
                Op::Wait(ms) => {
                    now += Duration::from_millis(ms);
                    bridge.handle_timeout(now);
                }
                Op::AddPort => ports.push(Some(bridge.add_port())),
                Op::RemovePort(i) => {
                    if let Some(slot) = ports.get_mut(i)
                        && let Some(p) = slot.take()
                    {
                        bridge.remove_port(p);
                        rx.remove(&p);
                        guards.remove(&p);
                        prop_assert!(bridge.fdb().iter(now).all(|(_, q, _)| q != p));
                    }
                }
                Op::Guard { port, host } => {
                    if let Some(Some(p)) = ports.get(port).copied() {
                        let g = PortGuard {
                            mac: MacAddr([0x02, 0x42, 0, 0, 0, host]),
                            ipv4: vec![std::net::Ipv4Addr::new(10, 0, 0, host)],
                            ipv6: vec![],
                        };
                        prop_assert!(bridge.guard(p, g.clone()));
                        guards.insert(p, g);
                    }
                }
                Op::Pin { port, mac } => {
                    if let Some(Some(p)) = ports.get(port).copied() {
                        let _ = bridge.pin(now, MacAddr(mac), p);
                        pins += 1;
                    }
                }
            }
            for (p, (frames, dropped)) in &rx {
                let s = bridge.port_stats(*p).expect("live port has stats");
                prop_assert_eq!(s.rx_frames, *frames);
                prop_assert_eq!(s.rx_dropped, *dropped);
            }
            prop_assert_eq!(bridge.stats().flooded, floods);
            // Learning stops at the capacity; only pins (the daemon's own addresses) go past it.
            let entries = bridge.fdb().len();
            prop_assert!(entries <= 4 + pins, "{entries} entries, capacity 4, {pins} pins");
        }
    }

    #[test]
    fn virtio_net_headers_round_trip(bytes in any::<[u8; VNET_HDR_LEN]>()) {
        let h = VnetHdr::parse(&bytes).expect("long enough");
        let mut out = [0u8; VNET_HDR_LEN];
        h.write(&mut out).expect("fits");
        prop_assert_eq!(&out[..10], &bytes[..10], "every field but num_buffers survives");
        prop_assert_eq!(VnetHdr::parse(&out), Some(h));
    }

    #[test]
    fn short_buffers_are_not_headers(bytes in prop::collection::vec(any::<u8>(), 0..VNET_HDR_LEN)) {
        prop_assert_eq!(VnetHdr::parse(&bytes), None);
        let mut out = bytes.clone();
        prop_assert_eq!(VnetHdr::default().write(&mut out), None);
    }
}

/// A tunnel fed arbitrary packets from members, peers and strangers: it never panics, never
/// believes a member's frame from a MAC the store did not give that member, never learns past
/// its bound, and every packet is counted once.
mod tunnel {
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::{Duration, Instant};

    use proptest::prelude::*;
    use vswitch_switch::MacAddr;
    use vswitch_switch::vxlan::{self, Tunnel, TunnelConfig};

    fn host(i: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, i))
    }

    fn packet() -> impl Strategy<Value = (u8, Vec<u8>)> {
        let vxlan = (
            0u32..3,
            any::<[u8; 6]>(),
            prop_oneof![(0u8..8).prop_map(|i| [2, 0, 0, 0, 0, i]), any::<[u8; 6]>()],
            prop::collection::vec(any::<u8>(), 0..40),
        )
            .prop_map(|(vni, dst, src, rest)| {
                let mut p = vxlan::header(vni).to_vec();
                p.extend_from_slice(&dst);
                p.extend_from_slice(&src);
                p.extend_from_slice(&rest);
                p
            });
        (
            0u8..6,
            prop_oneof![vxlan, prop::collection::vec(any::<u8>(), 0..30)],
        )
    }

    proptest! {
        #[test]
        fn arbitrary_packets(packets in prop::collection::vec((packet(), 0u64..20), 1..200)) {
            let mut now = Instant::now();
            let cap = 8;
            let mut t = Tunnel::new(1, Some(host(1)), TunnelConfig { capacity: cap, aging: Duration::from_secs(30) });
            t.set_members([host(1), host(2), host(3)]);
            t.add_peer(host(4));
            t.set_remote(MacAddr([2, 0, 0, 0, 0, 2]), host(2));
            t.set_remote(MacAddr([2, 0, 0, 0, 0, 3]), host(3));
            for (i, ((from, p), dt)) in packets.into_iter().enumerate() {
                let seen = i as u64 + 1;
                now += Duration::from_secs(dt);
                let from = host(from);
                if let Ok(inner) = t.ingress(now, from, &p) {
                    let src = MacAddr(inner[6..12].try_into().unwrap());
                    if from == host(2) || from == host(3) {
                        prop_assert_eq!(t.remotes().find(|(m, _)| *m == src).map(|(_, h)| h), Some(from));
                    } else {
                        prop_assert_eq!(from, host(4), "only members and the peer are believed");
                    }
                }
                prop_assert!(t.learned_len() <= cap);
                let s = t.stats();
                prop_assert_eq!(
                    s.rx_packets + s.rx_malformed + s.rx_foreign_vni + s.rx_not_member
                        + s.rx_spoofed,
                    seen
                );
            }
        }
    }
}
