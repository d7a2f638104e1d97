//! The smoltcp device between the gateway's stack and the switch: two queues of frames, and the
//! offloads that let the stack emit TCP super-segments with partial checksums.

use std::collections::VecDeque;

use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket,
};
use vswitch_switch::vnet::VNET_HDR_LEN;

/// A smoltcp device backed by two queues: frames in from the switch, frames out to it.
pub(super) struct QueueDevice {
    pub(super) rx: VecDeque<Vec<u8>>,
    pub(super) tx: VecDeque<Vec<u8>>,
    mtu: usize,
}

impl QueueDevice {
    pub(super) fn new(mtu: usize) -> Self {
        Self {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            mtu,
        }
    }
}

pub(super) struct RxToken(Vec<u8>);

pub(super) struct TxToken<'a>(&'a mut VecDeque<Vec<u8>>, smoltcp::phy::PacketMeta);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn set_meta(&mut self, meta: smoltcp::phy::PacketMeta) {
        self.1 = meta;
    }

    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0u8; VNET_HDR_LEN + len];
        let r = f(&mut frame[VNET_HDR_LEN..]);
        offload_tcp(&mut frame, self.1.segmentation_offload_size);
        if self.0.len() < super::TX_QUEUE_LIMIT {
            self.0.push_back(frame);
        }
        r
    }
}

/// Hands TCP checksumming (and, for super-segments, segmentation) to the receiving kernel
/// through the virtio-net header, as a NIC driver would: the checksum field gets the
/// pseudo-header sum and the header says where to finish it. smoltcp leaves TCP checksums to
/// the device (see `capabilities`), so every TCP frame it emits comes through here.
fn offload_tcp(frame: &mut [u8], mss: Option<std::num::NonZeroU16>) {
    use smoltcp::wire::checksum;
    use vswitch_switch::vnet::{F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, VnetHdr};
    let Some(eth) = frame.get(VNET_HDR_LEN..) else {
        return;
    };
    let Ok(e) = EthernetFrame::new_checked(eth) else {
        return;
    };
    let (ip_len, seed, gso) = match e.ethertype() {
        EthernetProtocol::Ipv4 => {
            let Ok(ip) = Ipv4Packet::new_checked(e.payload()) else {
                return;
            };
            if ip.next_header() != IpProtocol::Tcp {
                return;
            }
            let tcp_len = ip.payload().len() as u32;
            let seed = checksum::pseudo_header_v4(
                &ip.src_addr(),
                &ip.dst_addr(),
                IpProtocol::Tcp,
                tcp_len,
            );
            (usize::from(ip.header_len()), seed, GSO_TCPV4)
        }
        EthernetProtocol::Ipv6 => {
            let Ok(ip) = Ipv6Packet::new_checked(e.payload()) else {
                return;
            };
            if ip.next_header() != IpProtocol::Tcp {
                return;
            }
            let tcp_len = ip.payload().len() as u32;
            let seed = checksum::pseudo_header_v6(
                &ip.src_addr(),
                &ip.dst_addr(),
                IpProtocol::Tcp,
                tcp_len,
            );
            (40, seed, GSO_TCPV6)
        }
        _ => return,
    };
    let l4 = 14 + ip_len;
    let Some(tcp) = frame.get_mut(VNET_HDR_LEN + l4..) else {
        return;
    };
    let Ok(mut t) = TcpPacket::new_checked(&mut *tcp) else {
        return;
    };
    let tcp_hdr = usize::from(t.header_len());
    t.set_checksum(seed);
    let mut hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        csum_start: l4 as u16,
        csum_offset: 16,
        ..VnetHdr::default()
    };
    if let Some(mss) = mss
        && frame.len() - VNET_HDR_LEN - l4 - tcp_hdr > usize::from(mss.get())
    {
        hdr.gso_type = gso;
        hdr.gso_size = mss.get();
        hdr.hdr_len = (l4 + tcp_hdr) as u16;
    }
    let _ = hdr.write(frame);
}

impl phy::Device for QueueDevice {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(
        &mut self,
        _timestamp: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((RxToken(frame), TxToken(&mut self.tx, Default::default())))
    }

    fn transmit(&mut self, _timestamp: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        Some(TxToken(&mut self.tx, Default::default()))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + 14;
        // Frames from a TAP may carry partial TCP/UDP checksums (the sender left them to
        // "hardware"); verifying those would reject good packets. IP and ICMP checksums are
        // always complete and are checked.
        caps.checksum = ChecksumCapabilities::default();
        // TCP: not verified on receive, and left to the kernel on transmit (`offload_tcp`).
        caps.checksum.tcp = Checksum::None;
        caps.checksum.udp = Checksum::Tx;
        // TSO: smoltcp may emit TCP super-segments up to 64 KiB; the receiving kernel segments
        // them (or delivers them whole to a local socket, which is the common case here).
        caps.segmentation.tcpv4 = std::num::NonZeroUsize::new(14 + 65_535 - 100);
        caps.segmentation.tcpv6 = std::num::NonZeroUsize::new(14 + 65_535 - 100);
        caps
    }
}
