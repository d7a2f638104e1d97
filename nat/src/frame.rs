//! Frames the gateway's services read and write without its TCP/IP stack: UDP datagrams (DNS
//! over UDP, UDP NAT) and ICMP echo (outbound ping).
//!
//! Every frame carries a virtio-net header in front of its Ethernet header ([`VNET_HDR_LEN`]).
//! What is read is sliced with etherparse's checked views; what is written has an all-zero
//! header (complete checksums, no GSO).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

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

/// An IPv4 echo request in a frame from a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EchoRequest {
    pub src_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub id: u16,
    pub seq: u16,
    /// The ICMP message (header with a fresh checksum, then the payload), ready for a host
    /// ICMP socket.
    pub message: Vec<u8>,
}

/// The IPv4 echo request in `frame`, unless it is something else.
pub fn slice_echo_request(frame: &[u8]) -> Option<EchoRequest> {
    let p = SlicedPacket::from_ethernet(frame.get(VNET_HDR_LEN..)?).ok()?;
    let Some(LinkSlice::Ethernet2(eth)) = &p.link else {
        return None;
    };
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        return None;
    };
    let Some(TransportSlice::Icmpv4(icmp)) = &p.transport else {
        return None;
    };
    let Icmpv4Type::EchoRequest(echo) = icmp.icmp_type() else {
        return None;
    };
    let header =
        etherparse::Icmpv4Header::with_checksum(Icmpv4Type::EchoRequest(echo), icmp.payload());
    let mut message = header.to_bytes().to_vec();
    message.extend_from_slice(icmp.payload());
    Some(EchoRequest {
        src_mac: eth.source(),
        src: ip.header().source_addr(),
        dst: ip.header().destination_addr(),
        id: echo.id,
        seq: echo.seq,
        message,
    })
}

/// Who an echo reply read from a host ICMP socket is for: the container's ping `id` to `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EchoFlow {
    pub gateway_mac: [u8; 6],
    pub container_mac: [u8; 6],
    pub container: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub id: u16,
}

/// The frame for the container from an echo reply message (ICMP header and payload, as a
/// ping socket delivers it, or as [`crate::echo::raw_echo_reply`] cuts it from a raw socket's
/// datagram), or `None` if it is not an echo reply. The id is the container's own again
/// (the host socket's was another).
pub fn echo_reply_frame(flow: &EchoFlow, message: &[u8]) -> Option<Vec<u8>> {
    let (header, payload) = etherparse::Icmpv4Header::from_slice(message).ok()?;
    let Icmpv4Type::EchoReply(echo) = header.icmp_type else {
        return None;
    };
    let mut frame = vec![0u8; VNET_HDR_LEN];
    PacketBuilder::ethernet2(flow.gateway_mac, flow.container_mac)
        .ipv4(flow.dst.octets(), flow.container.octets(), 64)
        .icmpv4_echo_reply(flow.id, echo.seq)
        .write(&mut frame, payload)
        .ok()?;
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
        assert_eq!(req.src, Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(req.dst, Ipv4Addr::new(192, 0, 2, 9));
        let (h, payload) = etherparse::Icmpv4Header::from_slice(&req.message).expect("icmp");
        assert!(matches!(h.icmp_type, Icmpv4Type::EchoRequest(e) if e.id == 7 && e.seq == 3));
        assert_eq!(payload, b"ping");
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
            container: Ipv4Addr::new(10, 0, 0, 2),
            dst: Ipv4Addr::new(192, 0, 2, 9),
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
