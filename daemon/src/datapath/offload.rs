//! Offloads a NIC would do, done in userspace for the tunnel: cutting TCP super-frames into
//! segments, finishing partial checksums, and marking long TCP packets (and merged runs of
//! segments) for the receiving TAP's kernel to segment.

use vswitch_switch::vnet::{VNET_HDR_LEN, VnetHdr};

/// The smallest MSS a TCP sender uses (Linux's `TCP_MIN_MSS`).
const MIN_MSS: u16 = 88;

/// Appends segment `i` of a TCP super-frame (`eth`, Ethernet first, as its virtio-net header
/// `hdr` describes it) to `out`, as a NIC's TSO would cut it: headers copied, the IP length
/// (and IPv4 id and checksum), sequence number and flags of each segment fixed, and the TCP
/// checksum complete (or, unless `full`, only its pseudo-header part, for a receiver that
/// ignores it). Segments are never longer than `mtu`, whatever size the sender asked for; a
/// size below TCP's minimum MSS is refused (it would multiply the packets). Returns whether
/// it was the last; `None` if the frame is not TCP over IP that can be cut, or `i` is past
/// its end.
pub(super) fn tcp_segment(
    eth: &[u8],
    hdr: VnetHdr,
    i: usize,
    out: &mut Vec<u8>,
    full: bool,
    mtu: usize,
) -> Option<bool> {
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
    let mss = usize::from(hdr.gso_size).min(mtu.saturating_sub(ip_len + tcp_len));
    if tcp_len < 20 || hdr.gso_size < MIN_MSS || mss == 0 || eth.len() <= head {
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
    let sum = if full {
        seg[tcp + 16..tcp + 18].copy_from_slice(&[0, 0]);
        !fold(pseudo + sum16(&seg[tcp..]))
    } else {
        fold(pseudo)
    };
    seg[tcp + 16..tcp + 18].copy_from_slice(&sum.to_be_bytes());
    Some(last)
}

/// Finishes a checksum the sender left partial (`F_NEEDS_CSUM`: the sum from `csum_start` on,
/// stored at `csum_start + csum_offset`), as the missing hardware would. False if the header
/// points outside the frame.
pub(super) fn finish_partial(eth: &mut [u8], hdr: VnetHdr) -> bool {
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
    // TCP (its checksum at offset 16), longer than the MTU.
    let Some(l) = checksum_layout(eth).filter(|l| l.offset == 16 && l.end - 14 > mtu) else {
        return false;
    };
    let Some(&off) = eth.get(l.start + 12) else {
        return false;
    };
    let (ip_hdr, tcp_hdr) = (l.start - 14, usize::from(off >> 4) * 4);
    if tcp_hdr < 20 || l.end < l.start + tcp_hdr || ip_hdr + tcp_hdr >= mtu {
        return false;
    }
    mark_tso(frame, l, l.start + tcp_hdr, mtu - ip_hdr - tcp_hdr)
}

/// Marks a TCP frame (virtio-net header first) whose checksum sits as `l` says, and whose
/// payload starts at `head`, for the receiving kernel to cut into `gso_size`-byte segments
/// and finish their checksums (TSO): the field gets the pseudo-header's sum, and the header
/// says the rest.
pub(super) fn mark_tso(frame: &mut [u8], l: Layout, head: usize, gso_size: usize) -> bool {
    use vswitch_switch::vnet::{F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6};
    let field = VNET_HDR_LEN + l.start + l.offset;
    let Some(f) = frame.get_mut(field..field + 2) else {
        return false;
    };
    f.copy_from_slice(&fold(l.pseudo).to_be_bytes());
    let v4 = frame.get(VNET_HDR_LEN + 12..VNET_HDR_LEN + 14) == Some(&[0x08, 0x00][..]);
    let hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: if v4 { GSO_TCPV4 } else { GSO_TCPV6 },
        hdr_len: head as u16,
        gso_size: gso_size as u16,
        csum_start: l.start as u16,
        csum_offset: l.offset as u16,
    };
    hdr.write(frame).is_some()
}

/// Marks the TCP or UDP checksum of a frame from the tunnel (virtio-net header first) for the
/// receiving kernel to finish, as a NIC that verified it would hand it over: the field gets the
/// pseudo-header's sum and the header says where the sum goes. A kernel delivering the packet
/// locally takes it as checked and computes nothing; one forwarding it computes the sum once.
///
/// The inner checksum is never read. A sender on the same machine hands its packets over veth
/// with the sum still partial (no kernel on the way finishes it), and vswitch hosts leave it
/// to the receiver. Corruption on the wire is the underlay's to catch: Ethernet's CRC and the
/// outer UDP checksum, which the kernel checks before the packet reaches the daemon.
///
/// Returns false (frame untouched) for anything but unfragmented TCP or UDP over IPv4 or a
/// bare IPv6 header, and for UDP over IPv4 without a checksum.
pub(super) fn mark_partial(frame: &mut [u8]) -> bool {
    let Some(l) = frame.get(VNET_HDR_LEN..).and_then(checksum_layout) else {
        return false;
    };
    let field = VNET_HDR_LEN + l.start + l.offset;
    frame[field..field + 2].copy_from_slice(&fold(l.pseudo).to_be_bytes());
    let hdr = VnetHdr {
        flags: vswitch_switch::vnet::F_NEEDS_CSUM,
        csum_start: l.start as u16,
        csum_offset: l.offset as u16,
        ..VnetHdr::default()
    };
    hdr.write(frame).is_some()
}

/// Where a frame's (Ethernet first) TCP or UDP checksum lives, as [`mark_partial`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Layout {
    /// Offset of the L4 header.
    pub start: usize,
    /// Offset of the IP packet's end (link-layer padding after it).
    pub end: usize,
    /// Offset of the checksum field in it.
    pub offset: usize,
    /// The pseudo-header's sum, unfolded.
    pub pseudo: u32,
}

/// The checksum layout of unfragmented TCP or UDP over IPv4 or a bare IPv6 header; `None` for
/// anything else, and for UDP over IPv4 without a checksum.
pub(super) fn checksum_layout(eth: &[u8]) -> Option<Layout> {
    let ethertype = u16::from_be_bytes([*eth.get(12)?, *eth.get(13)?]);
    let ip = &eth[14..];
    let (proto, start, l4_len, pseudo) = match ethertype {
        0x0800 if ip.len() >= 20 && ip[0] >> 4 == 4 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let fragmented = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
            if fragmented || ihl < 20 || total < ihl || total > ip.len() {
                return None;
            }
            let len = total - ihl;
            let pseudo = sum16(&ip[12..20]) + u32::from(ip[9]) + len as u32;
            (ip[9], 14 + ihl, len, pseudo)
        }
        0x86dd if ip.len() >= 40 && ip[0] >> 4 == 6 => {
            let len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            if 40 + len > ip.len() {
                return None;
            }
            (
                ip[6],
                14 + 40,
                len,
                sum16(&ip[8..40]) + u32::from(ip[6]) + len as u32,
            )
        }
        _ => return None,
    };
    let offset = match proto {
        6 if l4_len >= 20 => 16,
        17 if l4_len >= 8 => 6,
        _ => return None,
    };
    let field = start + offset;
    if proto == 17 && ethertype == 0x0800 && eth[field] == 0 && eth[field + 1] == 0 {
        return None; // No checksum (UDP over IPv4 may omit it).
    }
    Some(Layout {
        start,
        end: start + l4_len,
        offset,
        pseudo,
    })
}

/// The ones' complement sum of `bytes` as 16-bit words (an odd last byte padded), unfolded.
pub(super) fn sum16(bytes: &[u8]) -> u32 {
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

pub(super) fn fold(mut sum: u32) -> u16 {
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
    fn frames_from_the_tunnel_are_marked_for_the_kernel_to_finish() {
        let good = tcp_frame();
        assert!(valid(&good));
        // Whatever the field held (complete, partial, wrong), what the kernel finishes from
        // the mark is the valid checksum.
        for field in [None, Some([0, 0]), Some([0x12, 0x34])] {
            let mut f = vec![0u8; VNET_HDR_LEN];
            f.extend_from_slice(&good);
            if let Some(v) = field {
                f[VNET_HDR_LEN + 50..VNET_HDR_LEN + 52].copy_from_slice(&v);
            }
            assert!(mark_partial(&mut f));
            let hdr = VnetHdr::parse(&f).unwrap();
            assert_eq!(
                (hdr.flags, hdr.gso_type),
                (vswitch_switch::vnet::F_NEEDS_CSUM, 0)
            );
            assert_eq!((hdr.csum_start, hdr.csum_offset), (34, 16));
            assert!(finish_partial(&mut f[VNET_HDR_LEN..], hdr));
            assert_eq!(&f[VNET_HDR_LEN..], &good[..], "field {field:?}");
        }
        // UDP over IPv4 without a checksum stays without; not IP or cut short: untouched.
        let u = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(1, 2);
        let mut uf = vec![0u8; VNET_HDR_LEN];
        u.write(&mut uf, &[9u8; 30]).unwrap();
        uf[VNET_HDR_LEN + 40..VNET_HDR_LEN + 42].copy_from_slice(&[0, 0]);
        let before = uf.clone();
        assert!(!mark_partial(&mut uf));
        assert_eq!(uf, before);
        for n in [0, 13, 20, 40] {
            let mut short = vec![0u8; VNET_HDR_LEN];
            short.extend_from_slice(&good[..n]);
            let before = short.clone();
            assert!(!mark_partial(&mut short));
            assert_eq!(short, before);
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
            let last = tcp_segment(&eth, hdr, i, &mut out, true, 1500).expect("a segment");
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
        assert!(tcp_segment(&eth, hdr, 3, &mut Vec::new(), true, 1500).is_none());
        // A sender's size is capped by the MTU, and a tiny one refused.
        let mut seg = Vec::new();
        assert_eq!(tcp_segment(&eth, hdr, 0, &mut seg, true, 1040), Some(false));
        assert_eq!(seg.len(), 14 + 1040);
        let tiny = VnetHdr {
            gso_size: 40,
            ..hdr
        };
        assert!(tcp_segment(&eth, tiny, 0, &mut Vec::new(), true, 1500).is_none());
        assert!(tcp_segment(&eth[..40], hdr, 0, &mut Vec::new(), true, 1500).is_none());
    }

    proptest::proptest! {
        /// A container's frame and header, whatever their bytes: cutting, marking and
        /// finishing never panic, and a cut segment is never longer than the MTU allows.
        #[test]
        fn any_frame_and_header_are_handled_without_panic(
            eth in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            fields in proptest::prelude::any::<(u8, u8, u16, u16, u16, u16)>(),
            mtu in 68usize..9000,
        ) {
            let (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) = fields;
            let hdr = VnetHdr { flags, gso_type, hdr_len, gso_size, csum_start, csum_offset };
            for i in 0..3 {
                let mut out = Vec::new();
                if tcp_segment(&eth, hdr, i, &mut out, i == 1, mtu).is_some() {
                    proptest::prop_assert!(out.len() <= 14 + mtu);
                }
            }
            let mut e = eth.clone();
            let _ = finish_partial(&mut e, hdr);
            let _ = checksum_layout(&eth);
            let mut f = vec![0u8; VNET_HDR_LEN];
            f.extend_from_slice(&eth);
            let _ = mark_partial(&mut f.clone());
            let _ = as_tcp_super_frame(&mut f, mtu);
        }
    }
}
