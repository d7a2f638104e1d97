//! Property tests: the gateway's input is whatever a container sends. Arbitrary bytes, and
//! valid frames of every kind the gateway handles with bytes flipped and tails cut, never make
//! it panic; every frame is counted once; what it emits is a frame from its own MAC; and the
//! frame slicers of the NAT services take anything.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use etherparse::PacketBuilder;
use proptest::prelude::*;
use vswitch_nat::frame::{EchoFlow, echo_reply_frame, slice_echo_request, slice_udp, udp_frame};
use vswitch_nat::{Gateway, GatewayConfig, TcpEvent};
use vswitch_switch::vnet::VNET_HDR_LEN;

const GW_MAC: [u8; 6] = [0x02, 0x42, 10, 9, 0, 1];
const CTR_MAC: [u8; 6] = [0x02, 0x42, 10, 9, 0, 2];
const GW: [u8; 4] = [10, 9, 0, 1];
const CTR: [u8; 4] = [10, 9, 0, 2];
const GW6: [u8; 16] = [0xfd, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const CTR6: [u8; 16] = [0xfd, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

fn gateway(now: Instant) -> Gateway {
    let mut gw = Gateway::new(
        &GatewayConfig {
            mac: GW_MAC,
            ipv4: Some((Ipv4Addr::from(GW), 24)),
            ipv6: Some((Ipv6Addr::from(GW6), 64)),
            mtu: 1500,
            nat: true,
        },
        now,
    )
    .expect("a valid gateway");
    gw.enable_stream_service(now, 53, 4, Duration::from_secs(5));
    gw
}

/// Valid frames of the kinds the gateway sees (virtio-net header first).
fn templates() -> Vec<Vec<u8>> {
    let eth = || PacketBuilder::ethernet2(CTR_MAC, GW_MAC);
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut push = |build: &dyn Fn(&mut Vec<u8>)| {
        let mut f = vec![0u8; VNET_HDR_LEN];
        build(&mut f);
        out.push(f);
    };
    push(&|f| {
        let arp = etherparse::ArpPacket::new(
            etherparse::ArpHardwareId::ETHERNET,
            etherparse::EtherType::IPV4,
            etherparse::ArpOperation::REQUEST,
            &CTR_MAC,
            &CTR,
            &[0; 6],
            &GW,
        )
        .expect("arp");
        PacketBuilder::ethernet2(CTR_MAC, [0xff; 6])
            .arp(arp)
            .write(f)
            .expect("arp");
    });
    push(&|f| {
        eth()
            .ipv4(CTR, GW, 64)
            .icmpv4_echo_request(1, 1)
            .write(f, b"ping")
            .expect("echo")
    });
    // SYN to the outside (outbound NAT), and to the gateway's DNS over TCP.
    for (dst, port) in [([192, 0, 2, 9], 80), (GW, 53)] {
        push(&|f| {
            eth()
                .ipv4(CTR, dst, 64)
                .tcp(40_000, port, 1, 64_000)
                .syn()
                .write(f, &[])
                .expect("syn")
        });
    }
    push(&|f| {
        eth()
            .ipv4(CTR, GW, 64)
            .tcp(40_000, 53, 2, 64_000)
            .ack(1)
            .psh()
            .write(
                f,
                &[
                    0, 17, 0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 0, 0, 1,
                ],
            )
            .expect("data")
    });
    push(&|f| {
        eth()
            .ipv4(CTR, GW, 64)
            .udp(5353, 53)
            .write(
                f,
                b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a\x00\x00\x01\x00\x01",
            )
            .expect("udp")
    });
    push(&|f| {
        eth()
            .ipv6(CTR6, GW6, 64)
            .icmpv6_echo_request(1, 1)
            .write(f, b"ping6")
            .expect("echo6")
    });
    push(&|f| {
        // A neighbour solicitation for the gateway, to its solicited-node multicast group.
        let mut ns = vec![0u8; 4];
        ns.extend_from_slice(&GW6);
        ns.extend_from_slice(&[1, 1]);
        ns.extend_from_slice(&CTR_MAC);
        let group = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 1];
        PacketBuilder::ethernet2(CTR_MAC, [0x33, 0x33, 0xff, 0, 0, 1])
            .ipv6(CTR6, group, 255)
            .icmpv6(etherparse::Icmpv6Type::Unknown {
                type_u8: 135,
                code_u8: 0,
                bytes5to8: [0; 4],
            })
            .write(f, &ns)
            .expect("ns")
    });
    out
}

/// A frame for the gateway: arbitrary bytes, or a template with bytes flipped and maybe cut.
fn frame() -> impl Strategy<Value = Vec<u8>> {
    let t = templates();
    let n = t.len();
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..128),
        4 => (
            0..n,
            prop::collection::vec((any::<usize>(), any::<u8>()), 0..6),
            prop::option::of(any::<usize>()),
        )
            .prop_map(move |(i, flips, cut)| {
                let mut f = t[i].clone();
                for (at, b) in flips {
                    let len = f.len();
                    f[at % len] ^= b;
                }
                if let Some(c) = cut {
                    f.truncate(c % (f.len() + 1));
                }
                f
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn any_frames_are_counted_once_and_answered_only_from_the_gateway(
        frames in prop::collection::vec((frame(), 0u64..2_000, any::<bool>()), 1..24)
    ) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut gw = gateway(now);
        let mut emitted = 0u64;
        for (f, wait_ms, accept) in &frames {
            now += Duration::from_millis(*wait_ms);
            gw.handle_timeout(now);
            gw.handle_frame(now, f);
            for ev in gw.poll_tcp_events() {
                if let TcpEvent::Syn { flow, .. } = ev {
                    if *accept {
                        gw.tcp_established(now, flow);
                    } else {
                        gw.tcp_abort(now, flow);
                    }
                }
            }
            for m in gw.poll_stream_messages() {
                if *accept {
                    gw.stream_reply(now, m.conn, &m.message);
                } else {
                    gw.stream_unanswered(now, m.conn);
                }
            }
            while let Some(out) = gw.poll_transmit() {
                emitted += 1;
                prop_assert!(out.len() >= VNET_HDR_LEN + 14, "{} bytes", out.len());
                prop_assert_eq!(&out[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12], &GW_MAC);
            }
        }
        let s = *gw.stats();
        prop_assert_eq!(s.accepted + s.ignored + s.malformed, frames.len() as u64);
        prop_assert_eq!(s.emitted, emitted);
        // Timers far ahead run without trouble and leave nothing behind that needs more.
        gw.handle_timeout(now + Duration::from_secs(3600));
        while gw.poll_transmit().is_some() {}
    }

    #[test]
    fn the_nat_slicers_take_anything(f in frame()) {
        if let Some(u) = slice_udp(&f) {
            prop_assert_eq!(u.src.is_ipv4(), u.dst.is_ipv4());
            prop_assert!(u.payload.len() <= f.len());
        }
        if let Some(e) = slice_echo_request(&f) {
            prop_assert!(e.message.len() >= 8);
        }
        let flow = EchoFlow {
            gateway_mac: GW_MAC,
            container_mac: CTR_MAC,
            container: Ipv4Addr::from(CTR).into(),
            dst: Ipv4Addr::from([192, 0, 2, 9]).into(),
            id: 1,
        };
        let _ = echo_reply_frame(&flow, &f);
        let flow6 = EchoFlow {
            container: "fd00::2".parse::<std::net::Ipv6Addr>().expect("v6").into(),
            dst: "2001:db8::9".parse::<std::net::Ipv6Addr>().expect("v6").into(),
            ..flow
        };
        let _ = echo_reply_frame(&flow6, &f);
        let _ = vswitch_nat::echo::raw_echo_reply6(&f);
        let _ = vswitch_nat::echo::raw_echo_reply(&f);
        let _ = vswitch_nat::echo::with_echo_id(&f, 7);
    }

    #[test]
    fn udp_frames_slice_back_to_what_was_built(
        v6 in any::<bool>(),
        a in any::<[u8; 16]>(),
        b in any::<[u8; 16]>(),
        ports in any::<(u16, u16)>(),
        payload in prop::collection::vec(any::<u8>(), 0..1500),
    ) {
        let (src, dst): (IpAddr, IpAddr) = if v6 {
            (Ipv6Addr::from(a).into(), Ipv6Addr::from(b).into())
        } else {
            (
                Ipv4Addr::new(a[0], a[1], a[2], a[3]).into(),
                Ipv4Addr::new(b[0], b[1], b[2], b[3]).into(),
            )
        };
        let src = SocketAddr::new(src, ports.0);
        let dst = SocketAddr::new(dst, ports.1);
        let f = udp_frame(CTR_MAC, GW_MAC, src, dst, &payload).expect("built");
        let u = slice_udp(&f).expect("sliced");
        prop_assert_eq!((u.src_mac, u.src, u.dst), (CTR_MAC, src, dst));
        prop_assert_eq!(u.payload, &payload[..]);
    }
}
