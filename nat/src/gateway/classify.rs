//! Which frames are TCP, and of which connection: the gateway polls only that connection's
//! shard of sockets.

use std::net::{IpAddr, SocketAddr};

use smoltcp::wire::{EthernetProtocol, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket};

/// What [`Gateway::handle_frame`] needs to know to pick a shard.
pub(super) enum Classified {
    Tcp(Segment),
    /// IPv4 TCP that is fragmented: no ports to hash.
    TcpFragment,
    Other,
}

pub(super) fn is_icmpv6(eth_payload: &[u8], ethertype: EthernetProtocol) -> bool {
    ethertype == EthernetProtocol::Ipv6
        && Ipv6Packet::new_checked(eth_payload)
            .is_ok_and(|ip| ip.next_header() == IpProtocol::Icmpv6)
}

/// The endpoints of a TCP segment in an IP packet, and whether it is a bare SYN.
pub(super) struct Segment {
    pub(super) src: SocketAddr,
    pub(super) dst: SocketAddr,
    pub(super) syn_only: bool,
}

pub(super) fn tcp_segment(eth_payload: &[u8], ethertype: EthernetProtocol) -> Classified {
    let (src_ip, dst_ip, tcp_bytes): (IpAddr, IpAddr, &[u8]) = match ethertype {
        EthernetProtocol::Ipv4 => {
            let Ok(ip) = Ipv4Packet::new_checked(eth_payload) else {
                return Classified::Other;
            };
            if ip.next_header() != IpProtocol::Tcp {
                return Classified::Other;
            }
            if ip.more_frags() || ip.frag_offset() != 0 {
                return Classified::TcpFragment;
            }
            (
                IpAddr::V4(ip.src_addr()),
                IpAddr::V4(ip.dst_addr()),
                ip.payload(),
            )
        }
        EthernetProtocol::Ipv6 => {
            let Ok(ip) = Ipv6Packet::new_checked(eth_payload) else {
                return Classified::Other;
            };
            if ip.next_header() != IpProtocol::Tcp {
                return Classified::Other;
            }
            (
                IpAddr::V6(ip.src_addr()),
                IpAddr::V6(ip.dst_addr()),
                ip.payload(),
            )
        }
        _ => return Classified::Other,
    };
    let Ok(tcp) = TcpPacket::new_checked(tcp_bytes) else {
        return Classified::Other;
    };
    Classified::Tcp(Segment {
        src: SocketAddr::new(src_ip, tcp.src_port()),
        dst: SocketAddr::new(dst_ip, tcp.dst_port()),
        syn_only: tcp.syn() && !tcp.ack() && !tcp.rst(),
    })
}
