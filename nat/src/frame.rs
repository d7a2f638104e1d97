//! Frames the gateway's services read and write without its TCP/IP stack: UDP datagrams (DNS
//! over UDP, UDP NAT) and ICMP echo (outbound ping).
//!
//! Every frame carries a virtio-net header in front of its Ethernet header ([`VNET_HDR_LEN`]).
//! What is read is sliced with etherparse's checked views; what is written has an all-zero
//! header (complete checksums, no GSO).

use std::net::{IpAddr, SocketAddr};

use etherparse::{Icmpv4Type, LinkSlice, NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use vswitch_switch::vnet::{VNET_HDR_LEN, VnetHdr};

/// A UDP datagram in a frame from a container, sliced once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpView<'a> {
    pub src_mac: [u8; 6],
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: &'a [u8],
}

/// The UDP datagram in `frame`, unless it is something else (or a GSO frame, which is left to
/// the gateway's stack).
pub fn slice_udp(frame: &[u8]) -> Option<UdpView<'_>> {
    if VnetHdr::parse(frame).is_none_or(|h| h.is_gso()) {
        return None;
    }
    let p = SlicedPacket::from_ethernet(frame.get(VNET_HDR_LEN..)?).ok()?;
    let Some(LinkSlice::Ethernet2(eth)) = &p.link else {
        return None;
    };
    let (src_ip, dst_ip) = match &p.net {
        Some(NetSlice::Ipv4(ip)) => (
            IpAddr::V4(ip.header().source_addr()),
            IpAddr::V4(ip.header().destination_addr()),
        ),
        Some(NetSlice::Ipv6(ip)) => (
            IpAddr::V6(ip.header().source_addr()),
            IpAddr::V6(ip.header().destination_addr()),
        ),
        _ => return None,
    };
    let Some(TransportSlice::Udp(udp)) = &p.transport else {
        return None;
    };
    Some(UdpView {
        src_mac: eth.source(),
        src: SocketAddr::new(src_ip, udp.source_port()),
        dst: SocketAddr::new(dst_ip, udp.destination_port()),
        payload: udp.payload(),
    })
}

/// A UDP datagram as a frame (zero virtio-net header, complete checksums); `None` if the two
/// addresses are of different families or the datagram is too long.
pub fn udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
) -> Option<Vec<u8>> {
    let eth = PacketBuilder::ethernet2(src_mac, dst_mac);
    let mut out = Vec::with_capacity(VNET_HDR_LEN + 62 + payload.len());
    out.resize(VNET_HDR_LEN, 0);
    let r = match (src.ip(), dst.ip()) {
        (IpAddr::V4(a), IpAddr::V4(b)) => eth
            .ipv4(a.octets(), b.octets(), 64)
            .udp(src.port(), dst.port())
            .write(&mut out, payload),
        (IpAddr::V6(a), IpAddr::V6(b)) => eth
            .ipv6(a.octets(), b.octets(), 64)
            .udp(src.port(), dst.port())
            .write(&mut out, payload),
        _ => return None,
    };
    r.ok().map(|()| out)
}

/// Whether `frame` is IPv6 from a link-local (or the unspecified) address to an address
/// beyond the link. The gateway takes such packets nowhere: NAT, DNS and its flow budgets count
/// by source address, and a container may use as many link-local addresses as it likes (port
/// security lets them all through: its kernel picks them).
pub fn link_local_beyond_link(frame: &[u8]) -> bool {
    let Some(ip) = frame.get(VNET_HDR_LEN + 12..VNET_HDR_LEN + 14 + 40) else {
        return false;
    };
    if ip[..2] != [0x86, 0xdd] {
        return false;
    }
    let addr = |at: usize| {
        let b: [u8; 16] = ip[at..at + 16].try_into().unwrap_or([0; 16]);
        std::net::Ipv6Addr::from(b)
    };
    let (src, dst) = (addr(2 + 8), addr(2 + 24));
    (src.is_unicast_link_local() || src.is_unspecified())
        && !(dst.is_unicast_link_local() || dst.is_multicast())
}

/// An echo request (ICMP or ICMPv6) in a frame from a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EchoRequest {
    pub src_mac: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub id: u16,
    pub seq: u16,
    /// The ICMP message (header with a fresh checksum, then the payload), ready for a host
    /// ICMP socket.
    pub message: Vec<u8>,
}

/// The echo request (ICMP or ICMPv6) in `frame`, unless it is something else. The message is
/// ready for a host socket: ICMP with a fresh checksum, ICMPv6 with a zero one (the kernel
/// computes ICMPv6 checksums itself).
pub fn slice_echo_request(frame: &[u8]) -> Option<EchoRequest> {
    let p = SlicedPacket::from_ethernet(frame.get(VNET_HDR_LEN..)?).ok()?;
    let Some(LinkSlice::Ethernet2(eth)) = &p.link else {
        return None;
    };
    match (&p.net, &p.transport) {
        (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Icmpv4(icmp))) => {
            let Icmpv4Type::EchoRequest(echo) = icmp.icmp_type() else {
                return None;
            };
            let header = etherparse::Icmpv4Header::with_checksum(
                Icmpv4Type::EchoRequest(echo),
                icmp.payload(),
            );
            let mut message = header.to_bytes().to_vec();
            message.extend_from_slice(icmp.payload());
            Some(EchoRequest {
                src_mac: eth.source(),
                src: IpAddr::V4(ip.header().source_addr()),
                dst: IpAddr::V4(ip.header().destination_addr()),
                id: echo.id,
                seq: echo.seq,
                message,
            })
        }
        (Some(NetSlice::Ipv6(ip)), Some(TransportSlice::Icmpv6(icmp))) => {
            let etherparse::Icmpv6Type::EchoRequest(echo) = icmp.icmp_type() else {
                return None;
            };
            let mut message = vec![128, 0, 0, 0];
            message.extend_from_slice(&echo.id.to_be_bytes());
            message.extend_from_slice(&echo.seq.to_be_bytes());
            message.extend_from_slice(icmp.payload());
            Some(EchoRequest {
                src_mac: eth.source(),
                src: IpAddr::V6(ip.header().source_addr()),
                dst: IpAddr::V6(ip.header().destination_addr()),
                id: echo.id,
                seq: echo.seq,
                message,
            })
        }
        _ => None,
    }
}

/// Who an echo reply read from a host ICMP socket is for: the container's ping `id` to `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EchoFlow {
    pub gateway_mac: [u8; 6],
    pub container_mac: [u8; 6],
    pub container: IpAddr,
    pub dst: IpAddr,
    pub id: u16,
}

/// The frame for the container from an echo reply message (ICMP header and payload, as a
/// ping socket delivers it, or as [`crate::echo::raw_echo_reply`] cuts it from a raw socket's
/// datagram), or `None` if it is not an echo reply. The id is the container's own again
/// (the host socket's was another).
pub fn echo_reply_frame(flow: &EchoFlow, message: &[u8]) -> Option<Vec<u8>> {
    let mut frame = vec![0u8; VNET_HDR_LEN];
    let eth = PacketBuilder::ethernet2(flow.gateway_mac, flow.container_mac);
    match (flow.dst, flow.container) {
        (IpAddr::V4(dst), IpAddr::V4(container)) => {
            let (header, payload) = etherparse::Icmpv4Header::from_slice(message).ok()?;
            let Icmpv4Type::EchoReply(echo) = header.icmp_type else {
                return None;
            };
            eth.ipv4(dst.octets(), container.octets(), 64)
                .icmpv4_echo_reply(flow.id, echo.seq)
                .write(&mut frame, payload)
                .ok()?;
        }
        (IpAddr::V6(dst), IpAddr::V6(container)) => {
            let (_, seq) = crate::echo::raw_echo_reply6(message)?;
            eth.ipv6(dst.octets(), container.octets(), 64)
                .icmpv6_echo_reply(flow.id, seq)
                .write(&mut frame, &message[8..])
                .ok()?;
        }
        _ => return None,
    }
    Some(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 2];

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    #[test]
    fn udp_frames_round_trip_in_both_families() {
        for (src, dst) in [
            (sa("10.0.0.2:5353"), sa("10.0.0.1:53")),
            (sa("[fd00::2]:5353"), sa("[fd00::1]:53")),
        ] {
            let frame = udp_frame(A, B, src, dst, b"hello").expect("frame");
            assert_eq!(
                &frame[..VNET_HDR_LEN],
                &[0; VNET_HDR_LEN],
                "zero vnet header"
            );
            let v = slice_udp(&frame).expect("udp");
            assert_eq!(
                v,
                UdpView {
                    src_mac: A,
                    src,
                    dst,
                    payload: b"hello"
                }
            );
        }
        assert!(udp_frame(A, B, sa("10.0.0.2:1"), sa("[fd00::1]:53"), b"x").is_none());
    }

    #[test]
    fn gso_and_short_frames_are_not_sliced() {
        let mut frame = udp_frame(A, B, sa("10.0.0.2:1"), sa("10.0.0.1:2"), b"x").expect("f");
        frame[1] = vswitch_switch::vnet::GSO_UDP_L4;
        assert!(slice_udp(&frame).is_none(), "GSO goes to the stack");
        assert!(slice_udp(&frame[..5]).is_none());
        assert!(slice_udp(&[]).is_none());
        assert!(slice_echo_request(&frame[..20]).is_none());
    }

    fn echo_request_frame(id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0u8; VNET_HDR_LEN];
        PacketBuilder::ethernet2(A, B)
            .ipv4([10, 0, 0, 2], [192, 0, 2, 9], 64)
            .icmpv4_echo_request(id, seq)
            .write(&mut frame, payload)
            .expect("write");
        frame
    }

    #[test]
    fn echo_requests_are_sliced_with_a_message_for_the_host_socket() {
        let req = slice_echo_request(&echo_request_frame(7, 3, b"ping")).expect("echo");
        assert_eq!((req.id, req.seq, req.src_mac), (7, 3, A));
        assert_eq!(req.src, IpAddr::from([10, 0, 0, 2]));
        assert_eq!(req.dst, IpAddr::from([192, 0, 2, 9]));
        let (h, payload) = etherparse::Icmpv4Header::from_slice(&req.message).expect("icmp");
        assert!(matches!(h.icmp_type, Icmpv4Type::EchoRequest(e) if e.id == 7 && e.seq == 3));
        assert_eq!(payload, b"ping");
    }

    #[test]
    fn icmpv6_echo_requests_are_sliced_and_replies_framed() {
        let (src, dst): (std::net::Ipv6Addr, std::net::Ipv6Addr) = (
            "fd77::2".parse().expect("v6"),
            "2001:db8::2".parse().expect("v6"),
        );
        let mut frame = vec![0u8; VNET_HDR_LEN];
        PacketBuilder::ethernet2(A, B)
            .ipv6(src.octets(), dst.octets(), 64)
            .icmpv6_echo_request(7, 3)
            .write(&mut frame, b"ping6")
            .expect("frame");
        let req = slice_echo_request(&frame).expect("an ICMPv6 echo request");
        assert_eq!((req.src, req.dst), (IpAddr::V6(src), IpAddr::V6(dst)));
        assert_eq!((req.id, req.seq), (7, 3));
        assert_eq!(&req.message[..8], &[128, 0, 0, 0, 0, 7, 0, 3]);
        assert_eq!(&req.message[8..], b"ping6");
        // The reply as a ping socket gives it (another id), back as the container's.
        let flow = EchoFlow {
            gateway_mac: B,
            container_mac: A,
            container: IpAddr::V6(src),
            dst: IpAddr::V6(dst),
            id: 7,
        };
        let mut reply = vec![129, 0, 0, 0, 0x10, 0x92, 0, 3];
        reply.extend_from_slice(b"ping6");
        let f = echo_reply_frame(&flow, &reply).expect("a reply frame");
        let p = SlicedPacket::from_ethernet(&f[VNET_HDR_LEN..]).expect("frame");
        let (Some(NetSlice::Ipv6(ip)), Some(TransportSlice::Icmpv6(icmp))) = (&p.net, &p.transport)
        else {
            panic!("not ICMPv6");
        };
        assert_eq!(ip.header().source_addr(), dst);
        assert_eq!(ip.header().destination_addr(), src);
        assert_eq!(
            icmp.icmp_type(),
            etherparse::Icmpv6Type::EchoReply(etherparse::IcmpEchoHeader { id: 7, seq: 3 })
        );
        assert_eq!(icmp.payload(), b"ping6");
        let want = icmp
            .icmp_type()
            .calc_checksum(
                ip.header().source(),
                ip.header().destination(),
                icmp.payload(),
            )
            .expect("checksum");
        assert_eq!(icmp.checksum(), want);
        // A request is not a reply; families must agree.
        assert!(echo_reply_frame(&flow, &req.message).is_none());
        let mixed = EchoFlow {
            dst: IpAddr::from([192, 0, 2, 9]),
            ..flow
        };
        assert!(echo_reply_frame(&mixed, &reply).is_none());
    }

    #[test]
    fn link_local_sources_reach_only_the_link() {
        let frame = |src: &str, dst: &str| {
            let mut out = vec![0u8; VNET_HDR_LEN];
            PacketBuilder::ethernet2(A, B)
                .ipv6(
                    src.parse::<std::net::Ipv6Addr>().expect("v6").octets(),
                    dst.parse::<std::net::Ipv6Addr>().expect("v6").octets(),
                    64,
                )
                .udp(5000, 53)
                .write(&mut out, b"q")
                .expect("frame");
            out
        };
        assert!(link_local_beyond_link(&frame("fe80::1", "fd00::1")));
        assert!(link_local_beyond_link(&frame("::", "2001:db8::1")));
        assert!(!link_local_beyond_link(&frame("fe80::1", "fe80::2")));
        assert!(!link_local_beyond_link(&frame("fe80::1", "ff02::1:ff00:1")));
        assert!(!link_local_beyond_link(&frame("fd00::2", "fd00::1")));
        assert!(!link_local_beyond_link(&[0u8; 20]));
    }

    #[test]
    fn echo_replies_become_frames_with_the_containers_id() {
        let flow = EchoFlow {
            gateway_mac: B,
            container_mac: A,
            container: IpAddr::from([10, 0, 0, 2]),
            dst: IpAddr::from([192, 0, 2, 9]),
            id: 7,
        };
        // A ping socket's reply: the ICMP message alone, with the socket's own id.
        let reply = |id: u16| {
            let h = etherparse::Icmpv4Header::with_checksum(
                Icmpv4Type::EchoReply(etherparse::IcmpEchoHeader { id, seq: 3 }),
                b"pong",
            );
            let mut m = h.to_bytes().to_vec();
            m.extend_from_slice(b"pong");
            m
        };
        let frame = echo_reply_frame(&flow, &reply(999)).expect("frame");
        let p = SlicedPacket::from_ethernet(&frame[VNET_HDR_LEN..]).expect("slice");
        let Some(TransportSlice::Icmpv4(icmp)) = &p.transport else {
            panic!("not ICMP");
        };
        assert!(matches!(icmp.icmp_type(), Icmpv4Type::EchoReply(e) if e.id == 7 && e.seq == 3));
        assert_eq!(icmp.payload(), b"pong");
        assert!(echo_reply_frame(&flow, b"junk").is_none());
    }
}
