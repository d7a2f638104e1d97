//! An overlay network's tunnel port on its datapath thread: frames the bridge sends to the
//! port leave in VXLAN for the hosts [`Tunnel`] names, and VXLAN packets the tunnel believes
//! come back as frames of the port.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use vswitch_switch::vnet::{VNET_HDR_LEN, VnetHdr};
use vswitch_switch::vxlan::{self, Egress, Tunnel, TunnelConfig, VXLAN_HDR_LEN};
use vswitch_switch::{MacAddr, PortId};

use super::TunnelSpec;
use crate::api::TunnelStatsRow;
use crate::host::vxlan::Sockets;

pub(super) struct TunnelPort {
    pub port: PortId,
    /// The network's MTU.
    mtu: usize,
    tunnel: Tunnel,
    sockets: Arc<Sockets>,
    /// Reused for the outgoing packet.
    out: Vec<u8>,
    /// Frames that could not leave: offloaded (a GSO super-frame or a partial checksum, which
    /// no receiving kernel would finish) or refused by the socket.
    tx_dropped: u64,
}

impl TunnelPort {
    pub fn new(port: PortId, mtu: usize, spec: TunnelSpec) -> Self {
        let mut tunnel = Tunnel::new(spec.vni, spec.own, TunnelConfig::default());
        for p in spec.peers {
            tunnel.add_peer(p);
        }
        Self {
            port,
            mtu,
            tunnel,
            sockets: spec.sockets,
            out: Vec::with_capacity(VXLAN_HDR_LEN + 65_536),
            tx_dropped: 0,
        }
    }

    /// Sends a frame of the network (virtio-net header first) to the hosts it is for.
    pub fn send(&mut self, now: Instant, frame: &[u8]) {
        let (Some(hdr), Some(eth)) = (
            VnetHdr::parse(frame),
            frame.get(VNET_HDR_LEN..).filter(|e| e.len() >= 14),
        ) else {
            self.tx_dropped += 1;
            return;
        };
        let dst = MacAddr(eth[..6].try_into().unwrap_or_default());
        let egress = self.tunnel.egress(now, dst);
        let flow = usize::from(vxlan::source_port(
            eth,
            0,
            u16::try_from(self.sockets.senders().saturating_sub(1)).unwrap_or(0),
        ));
        let vni = vxlan::header(self.tunnel.vni());
        // A TSO super-frame leaves as the segments its sender's NIC would have cut; anything
        // else as it is, its checksum finished if the sender left it partial.
        let segments = if hdr.is_gso() { usize::MAX } else { 1 };
        for i in 0..segments {
            self.out.clear();
            self.out.extend_from_slice(&vni);
            let last = if hdr.is_gso() {
                match tcp_segment(eth, hdr, i, &mut self.out) {
                    Some(last) => last,
                    None => {
                        self.tx_dropped += 1;
                        return;
                    }
                }
            } else {
                self.out.extend_from_slice(eth);
                let partial = hdr.flags & vswitch_switch::vnet::F_NEEDS_CSUM != 0;
                if partial && !finish_partial(&mut self.out[VXLAN_HDR_LEN..], hdr) {
                    self.tx_dropped += 1;
                    return;
                }
                true
            };
            match egress {
                Egress::To(host) => {
                    if self.sockets.send(flow, &self.out, host).is_err() {
                        self.tx_dropped += 1;
                    }
                }
                Egress::Flood => {
                    for &host in self.tunnel.flood_list() {
                        if self.sockets.send(flow, &self.out, host).is_err() {
                            self.tx_dropped += 1;
                        }
                    }
                }
            }
            if last {
                break;
            }
        }
    }

    /// The frame (virtio-net header first) inside a VXLAN packet from `from`, if the tunnel
    /// believes it.
    pub fn receive(&mut self, now: Instant, from: IpAddr, packet: &[u8]) -> Option<Vec<u8>> {
        let inner = self.tunnel.ingress(now, from, packet).ok()?;
        let mut frame = vec![0u8; VNET_HDR_LEN + inner.len()];
        frame[VNET_HDR_LEN..].copy_from_slice(inner);
        if !as_tcp_super_frame(&mut frame, self.mtu) {
            finish_l4_checksum(&mut frame[VNET_HDR_LEN..]);
        }
        Some(frame)
    }

    pub fn set_peers(&mut self, peers: Vec<IpAddr>) {
        let old: Vec<IpAddr> = self.tunnel.peers().collect();
        for p in old.into_iter().filter(|p| !peers.contains(p)) {
            self.tunnel.remove_peer(p);
        }
        for p in peers {
            self.tunnel.add_peer(p);
        }
    }

    pub fn set_members(&mut self, members: Vec<IpAddr>) {
        self.tunnel.set_members(members);
    }

    pub fn set_remote(&mut self, mac: MacAddr, host: IpAddr) {
        self.tunnel.set_remote(mac, host);
    }

    pub fn remove_remote(&mut self, mac: MacAddr) {
        self.tunnel.remove_remote(mac);
    }

    pub fn stats(&self) -> TunnelStatsRow {
        let s = self.tunnel.stats();
        let (unknown_vni, not_vxlan) = self.sockets.dropped();
        TunnelStatsRow {
            vni: self.tunnel.vni(),
            rx_packets: s.rx_packets,
            rx_malformed: s.rx_malformed,
            rx_foreign_vni: s.rx_foreign_vni,
            rx_not_member: s.rx_not_member + self.sockets.strangers(self.tunnel.vni()),
            rx_spoofed: s.rx_spoofed,
            learn_refused: s.learn_refused,
            tx_unicast: s.tx_unicast,
            tx_flooded: s.tx_flooded,
            tx_dropped: self.tx_dropped,
            learned_macs: self.tunnel.learned_len(),
            daemon_unknown_vni: unknown_vni,
            daemon_not_vxlan: not_vxlan,
        }
    }
}

/// Appends segment `i` of a TCP super-frame (`eth`, Ethernet first, as its virtio-net header
/// `hdr` describes it) to `out`, as a NIC's TSO would cut it: headers copied, the IP length
/// (and IPv4 id and checksum), sequence number and flags of each segment fixed, and the TCP
/// checksum complete. Returns whether it was the last; `None` if the frame is not TCP over IP
/// that can be cut, or `i` is past its end.
pub(super) fn tcp_segment(eth: &[u8], hdr: VnetHdr, i: usize, out: &mut Vec<u8>) -> Option<bool> {
    use vswitch_switch::vnet::{GSO_ECN, GSO_TCPV4, GSO_TCPV6};
    let ethertype = u16::from_be_bytes([*eth.get(12)?, *eth.get(13)?]);
    let v4 = match (hdr.gso_type & !GSO_ECN, ethertype) {
        (GSO_TCPV4, 0x0800) => true,
        (GSO_TCPV6, 0x86dd) => false,
        _ => return None,
    };
    let ip_len = if v4 {
        usize::from(eth.get(14)? & 0x0f) * 4
    } else {
        // Only a bare IPv6 header: TSO is not offered past extension headers here.
        if *eth.get(14 + 6)? != 6 {
            return None;
        }
        40
    };
    if v4 && (ip_len < 20 || eth.get(14 + 9) != Some(&6)) {
        return None;
    }
    let tcp = 14 + ip_len;
    let tcp_len = usize::from(eth.get(tcp + 12)? >> 4) * 4;
    let head = tcp + tcp_len;
    let mss = usize::from(hdr.gso_size);
    if tcp_len < 20 || mss == 0 || eth.len() <= head {
        return None;
    }
    let payload = &eth[head..];
    let start = i.checked_mul(mss)?;
    if start >= payload.len() {
        return None;
    }
    let end = (start + mss).min(payload.len());
    let last = end == payload.len();
    let base = out.len();
    out.extend_from_slice(&eth[..head]);
    out.extend_from_slice(&payload[start..end]);
    let seg = &mut out[base..];
    let l4_len = tcp_len + end - start;
    if v4 {
        let total = (ip_len + l4_len) as u16;
        seg[16..18].copy_from_slice(&total.to_be_bytes());
        let id = u16::from_be_bytes([seg[18], seg[19]]).wrapping_add(i as u16);
        seg[18..20].copy_from_slice(&id.to_be_bytes());
        seg[24..26].copy_from_slice(&[0, 0]);
        let sum = !fold(sum16(&seg[14..14 + ip_len]));
        seg[24..26].copy_from_slice(&sum.to_be_bytes());
    } else {
        seg[18..20].copy_from_slice(&(l4_len as u16).to_be_bytes());
    }
    let seq = u32::from_be_bytes([seg[tcp + 4], seg[tcp + 5], seg[tcp + 6], seg[tcp + 7]])
        .wrapping_add(start as u32);
    seg[tcp + 4..tcp + 8].copy_from_slice(&seq.to_be_bytes());
    // FIN and PSH belong to the last segment, CWR to the first.
    if !last {
        seg[tcp + 13] &= !0x09;
    }
    if i > 0 {
        seg[tcp + 13] &= !0x80;
    }
    let pseudo = if v4 {
        sum16(&seg[14 + 12..14 + 20])
    } else {
        sum16(&seg[14 + 8..14 + 40])
    } + 6
        + l4_len as u32;
    seg[tcp + 16..tcp + 18].copy_from_slice(&[0, 0]);
    let sum = !fold(pseudo + sum16(&seg[tcp..]));
    seg[tcp + 16..tcp + 18].copy_from_slice(&sum.to_be_bytes());
    Some(last)
}

/// Finishes a checksum the sender left partial (`F_NEEDS_CSUM`: the sum from `csum_start` on,
/// stored at `csum_start + csum_offset`), as the missing hardware would. False if the header
/// points outside the frame.
fn finish_partial(eth: &mut [u8], hdr: VnetHdr) -> bool {
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    if start >= eth.len() || at + 2 > eth.len() {
        return false;
    }
    let sum = !fold(sum16(&eth[start..]));
    eth[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    true
}

/// A sender on the same machine also hands over TCP super-packets (its kernel's TSO, which no
/// NIC cut up on the way over veth): longer than the network's MTU, they would be dropped. Such
/// a frame (virtio-net header first, zeroed) is marked for the receiving kernel to segment
/// into `mtu`-sized packets and to finish their checksums, as a TAP accepts. Returns false
/// (frame untouched) for anything else.
pub(super) fn as_tcp_super_frame(frame: &mut [u8], mtu: usize) -> bool {
    let Some(eth) = frame.get(VNET_HDR_LEN..) else {
        return false;
    };
    let Some(ethertype) = eth.get(12..14).map(|t| u16::from_be_bytes([t[0], t[1]])) else {
        return false;
    };
    let ip = &eth[14..];
    let (gso_type, ip_hdr, l4_len, pseudo) = match ethertype {
        0x0800 if ip.len() >= 20 && ip[0] >> 4 == 4 && ip[9] == 6 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let fragmented = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
            if fragmented || ihl < 20 || total <= mtu || total > ip.len() || total < ihl {
                return false;
            }
            let sum = sum16(&ip[12..20]) + 6 + (total - ihl) as u32;
            (vswitch_switch::vnet::GSO_TCPV4, ihl, total - ihl, sum)
        }
        0x86dd if ip.len() >= 40 && ip[6] == 6 => {
            let len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            if 40 + len <= mtu || 40 + len > ip.len() {
                return false;
            }
            let sum = sum16(&ip[8..40]) + 6 + len as u32;
            (vswitch_switch::vnet::GSO_TCPV6, 40, len, sum)
        }
        _ => return false,
    };
    let l4 = 14 + ip_hdr;
    let Some(&off) = eth.get(l4 + 12) else {
        return false;
    };
    let tcp_hdr = usize::from(off >> 4) * 4;
    if tcp_hdr < 20 || l4_len < tcp_hdr || ip_hdr + tcp_hdr >= mtu {
        return false;
    }
    let hdr = VnetHdr {
        flags: vswitch_switch::vnet::F_NEEDS_CSUM,
        gso_type,
        hdr_len: (l4 + tcp_hdr) as u16,
        gso_size: (mtu - ip_hdr - tcp_hdr) as u16,
        csum_start: l4 as u16,
        csum_offset: 16,
    };
    let field = VNET_HDR_LEN + l4 + 16;
    frame[field..field + 2].copy_from_slice(&fold(pseudo).to_be_bytes());
    hdr.write(frame).is_some()
}

/// Makes the TCP or UDP checksum of an inner frame (Ethernet first) valid if it is not: a
/// sender on the same machine hands its tunnel packets over veth with the checksum still
/// partial (`CHECKSUM_PARTIAL`: the field holds the pseudo-header's sum and the "hardware" is
/// to finish it), and no kernel on the way finishes it. Finished as that hardware would. Frames
/// that are not unfragmented TCP or UDP over IP are left alone. Corruption on the wire is the
/// underlay's to catch (Ethernet's CRC, the outer UDP checksum when set).
pub(super) fn finish_l4_checksum(eth: &mut [u8]) {
    let Some(ethertype) = eth.get(12..14).map(|t| u16::from_be_bytes([t[0], t[1]])) else {
        return;
    };
    let ip = &eth[14..];
    let (proto, l4_start, l4_len, pseudo) = match ethertype {
        0x0800 if ip.len() >= 20 && ip[0] >> 4 == 4 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let fragmented = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
            if fragmented || ihl < 20 || total < ihl || total > ip.len() {
                return;
            }
            let len = total - ihl;
            let mut sum = sum16(&ip[12..20]);
            sum += u32::from(ip[9]) + len as u32;
            (ip[9], 14 + ihl, len, sum)
        }
        0x86dd if ip.len() >= 40 => {
            let len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            if 40 + len > ip.len() {
                return;
            }
            let mut sum = sum16(&ip[8..40]);
            sum += u32::from(ip[6]) + len as u32;
            (ip[6], 14 + 40, len, sum)
        }
        _ => return,
    };
    let field = match proto {
        6 if l4_len >= 20 => l4_start + 16,
        17 if l4_len >= 8 => l4_start + 6,
        _ => return,
    };
    let l4 = &eth[l4_start..l4_start + l4_len];
    if proto == 17 && ethertype == 0x0800 && eth[field] == 0 && eth[field + 1] == 0 {
        return; // No checksum (UDP over IPv4 may omit it).
    }
    if fold(pseudo + sum16(l4)) == 0xffff {
        return;
    }
    let mut sum = !fold(sum16(l4));
    if proto == 17 && sum == 0 {
        sum = 0xffff;
    }
    eth[field..field + 2].copy_from_slice(&sum.to_be_bytes());
}

/// The ones' complement sum of `bytes` as 16-bit words (an odd last byte padded), unfolded.
fn sum16(bytes: &[u8]) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    let mut sum: u32 = 0;
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    fn tcp_frame() -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(40000, 80, 1, 1000);
        let payload = b"hello, world!";
        let mut f = Vec::new();
        b.write(&mut f, payload).unwrap();
        f
    }

    fn valid(f: &[u8]) -> bool {
        let p = etherparse::SlicedPacket::from_ethernet(f).unwrap();
        let (Some(etherparse::NetSlice::Ipv4(ip)), Some(etherparse::TransportSlice::Tcp(tcp))) =
            (p.net, p.transport)
        else {
            panic!("not TCP over IPv4");
        };
        let want = tcp
            .to_header()
            .calc_checksum_ipv4(&ip.header().to_header(), tcp.payload())
            .unwrap();
        tcp.checksum() == want
    }

    #[test]
    fn partial_checksums_are_finished_and_complete_ones_kept() {
        let good = tcp_frame();
        assert!(valid(&good));
        let mut same = good.clone();
        finish_l4_checksum(&mut same);
        assert_eq!(same, good, "a valid checksum is left as it is");
        // What CHECKSUM_PARTIAL leaves: the folded pseudo-header sum in the field.
        let mut partial = good.clone();
        let ip = &partial[14..34];
        let pseudo = fold(sum16(&ip[12..20]) + 6 + (partial.len() - 34) as u32);
        partial[34 + 16..34 + 18].copy_from_slice(&pseudo.to_be_bytes());
        assert!(!valid(&partial));
        finish_l4_checksum(&mut partial);
        assert!(valid(&partial));
        assert_eq!(partial, good);
        // Not IP, or cut short: untouched, no panic.
        for n in [0, 13, 20, 40] {
            let mut short = good[..n].to_vec();
            finish_l4_checksum(&mut short);
        }
    }

    #[test]
    fn tcp_super_packets_become_gso_frames() {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(40000, 80, 1, 1000);
        let mut f = vec![0u8; VNET_HDR_LEN];
        b.write(&mut f, &[7u8; 4000]).unwrap();
        let mut small = vec![0u8; VNET_HDR_LEN];
        small.extend_from_slice(&tcp_frame());
        assert!(!as_tcp_super_frame(&mut small, 1450), "fits the MTU");
        assert!(as_tcp_super_frame(&mut f, 1450));
        let h = VnetHdr::parse(&f).unwrap();
        assert!(h.is_gso());
        assert_eq!(h.gso_type, vswitch_switch::vnet::GSO_TCPV4);
        assert_eq!((h.hdr_len, h.gso_size), (14 + 20 + 20, 1450 - 40));
        assert_eq!((h.csum_start, h.csum_offset), (34, 16));
        // The field holds the pseudo-header's sum, for the kernel to finish.
        let field = u16::from_be_bytes([f[VNET_HDR_LEN + 50], f[VNET_HDR_LEN + 51]]);
        let ip = &f[VNET_HDR_LEN + 14..VNET_HDR_LEN + 34];
        assert_eq!(field, fold(sum16(&ip[12..20]) + 6 + 4020));
        // UDP is never made a TCP super-frame.
        let u = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(1, 2);
        let mut uf = vec![0u8; VNET_HDR_LEN];
        u.write(&mut uf, &[0u8; 3000]).unwrap();
        assert!(!as_tcp_super_frame(&mut uf, 1450));
    }

    #[test]
    fn tso_frames_are_cut_as_a_nic_would() {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(40000, 80, 1000, 1000)
            .psh()
            .fin();
        let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let mut eth = Vec::new();
        b.write(&mut eth, &payload).unwrap();
        let hdr = VnetHdr {
            flags: vswitch_switch::vnet::F_NEEDS_CSUM,
            gso_type: vswitch_switch::vnet::GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1400,
            csum_start: 34,
            csum_offset: 16,
        };
        let mut got = Vec::new();
        let mut i = 0;
        loop {
            let mut out = Vec::new();
            let last = tcp_segment(&eth, hdr, i, &mut out).expect("a segment");
            let p = etherparse::SlicedPacket::from_ethernet(&out).unwrap();
            let (Some(etherparse::NetSlice::Ipv4(ip)), Some(etherparse::TransportSlice::Tcp(tcp))) =
                (p.net, p.transport)
            else {
                panic!("not TCP");
            };
            let iph = ip.header().to_header();
            assert_eq!(iph.header_checksum, iph.calc_header_checksum());
            let want = tcp
                .to_header()
                .calc_checksum_ipv4(&iph, tcp.payload())
                .unwrap();
            assert_eq!(tcp.checksum(), want, "segment {i}");
            assert_eq!(tcp.sequence_number(), 1000 + (i as u32) * 1400);
            assert_eq!((tcp.fin(), tcp.psh()), (last, last), "segment {i}");
            got.extend_from_slice(tcp.payload());
            i += 1;
            if last {
                break;
            }
        }
        assert_eq!(i, 3);
        assert_eq!(got, payload);
        assert!(tcp_segment(&eth, hdr, 3, &mut Vec::new()).is_none());
        assert!(tcp_segment(&eth[..40], hdr, 0, &mut Vec::new()).is_none());
    }
}
