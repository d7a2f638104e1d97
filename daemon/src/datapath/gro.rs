//! Receive offload for the tunnel: the frames out of one batch of VXLAN packets, with each run
//! of in-order segments of one TCP flow merged into a single super-frame, as a NIC's GRO would.
//! A TAP takes the super-frame whole (its virtio-net header says how to cut it again), so a
//! 64 KiB burst costs the datapath one write instead of forty-five.
//!
//! Segments merge only when nothing but what segmentation changes differs between them: the
//! IPv4 length, id and checksum (the IPv6 length), and the TCP sequence number and checksum.
//! Every segment but the last carries the same payload length, and carries only ACK; the last
//! may be shorter or carry PSH. Anything else (other flags, options that change, a gap in the
//! sequence, IP options that differ, other protocols) passes as it came.

use vswitch_switch::vnet::VNET_HDR_LEN;

use super::offload::{as_tcp_super_frame, checksum_layout, fold, mark_partial, mark_tso, sum16};
use super::packed::Packed;

/// Most segments merged into one frame.
const MAX_SEGMENTS: usize = 64;
/// Largest IPv4 total length (or IPv6 payload length) of a merged frame.
const MAX_IP_LEN: usize = 65_535;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;

/// A TCP segment's layout, as far as merging needs it.
#[derive(Clone, Copy)]
struct Segment {
    v4: bool,
    /// Offset of the TCP header in the Ethernet frame.
    l4: usize,
    /// Offset of the payload.
    head: usize,
    /// Length of the frame without link-layer padding.
    len: usize,
    seq: u32,
    flags: u8,
}

impl Segment {
    fn payload(&self) -> usize {
        self.len - self.head
    }

    fn parse(eth: &[u8]) -> Option<Self> {
        let ethertype = u16::from_be_bytes([*eth.get(12)?, *eth.get(13)?]);
        let ip = eth.get(14..)?;
        let (v4, ip_hdr, ip_len) = match ethertype {
            0x0800 => {
                let ihl = usize::from(*ip.first()? & 0x0f) * 4;
                let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
                let fragmented = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]) & 0x3fff != 0;
                if ip[0] >> 4 != 4 || ip.get(9) != Some(&6) || fragmented || ihl < 20 {
                    return None;
                }
                (true, ihl, total)
            }
            0x86dd => {
                if *ip.first()? >> 4 != 6 || ip.get(6) != Some(&6) {
                    return None;
                }
                let payload = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
                (false, 40, 40 + payload)
            }
            _ => return None,
        };
        let l4 = 14 + ip_hdr;
        let len = 14 + ip_len;
        let tcp_hdr = usize::from(*eth.get(l4 + 12)? >> 4) * 4;
        let head = l4 + tcp_hdr;
        if ip_len < ip_hdr || len > eth.len() || tcp_hdr < 20 || head > len {
            return None;
        }
        Some(Self {
            v4,
            l4,
            head,
            len,
            seq: u32::from_be_bytes(eth[l4 + 4..l4 + 8].try_into().ok()?),
            flags: eth[l4 + 13],
        })
    }
}

/// The run being merged: its frame is the last one in [`Frames`].
struct Run {
    seg: Segment,
    /// Offset of the run's frame (its virtio-net header) in the buffer.
    start: usize,
    /// The payload length of every segment but the last.
    mss: usize,
    next_seq: u32,
    segments: usize,
    /// Whether a segment may still join.
    open: bool,
}

/// Merges the frames of one batch; see the module's documentation.
#[derive(Default)]
pub(super) struct Merger {
    /// The frames (virtio-net header first).
    pub frames: Packed,
    run: Option<Run>,
}

impl Merger {
    /// Adds the next frame of the batch (Ethernet first). `mtu` is the network's: a single
    /// TCP packet longer than that (a local sender's, over veth) is marked for segmenting.
    pub fn push(&mut self, eth: &[u8], mtu: usize) {
        let seg = Segment::parse(eth);
        if let (Some(seg), Some(run)) = (seg, self.run.as_mut())
            && run.open
            && joins(&self.frames.data[run.start + VNET_HDR_LEN..], run, eth, seg)
        {
            self.frames.data.extend_from_slice(&eth[seg.head..seg.len]);
            run.segments += 1;
            run.next_seq = seg.seq.wrapping_add(seg.payload() as u32);
            if seg.flags & TCP_PSH != 0 {
                let at = run.start + VNET_HDR_LEN + run.seg.l4 + 13;
                self.frames.data[at] |= TCP_PSH;
            }
            run.open = seg.payload() == run.mss
                && seg.flags == TCP_ACK
                && run.segments < MAX_SEGMENTS
                && self.frames.data.len() - run.start - VNET_HDR_LEN - 14 + run.mss <= MAX_IP_LEN;
            return;
        }
        self.close(mtu);
        let start = self.frames.data.len();
        self.frames.data.resize(start + VNET_HDR_LEN, 0);
        match seg {
            Some(seg) if seg.payload() > 0 => {
                self.frames.data.extend_from_slice(&eth[..seg.len]);
                self.run = Some(Run {
                    seg,
                    start,
                    mss: seg.payload(),
                    next_seq: seg.seq.wrapping_add(seg.payload() as u32),
                    segments: 1,
                    // A run starts only from a packet that fits the network (a longer one is
                    // a local sender's super-packet: see `close`) and whose IPv4 header is
                    // sound (the merged frame gets a new header checksum).
                    open: seg.flags == TCP_ACK
                        && seg.len - 14 <= mtu
                        && seg.len - 14 + seg.payload() <= MAX_IP_LEN
                        && ip_sound(eth, seg),
                });
            }
            _ => {
                self.frames.data.extend_from_slice(eth);
                mark_partial(&mut self.frames.data[start..]);
                self.frames.seal();
            }
        }
    }

    /// Ends the batch: the last run is closed, and every frame is in [`Merger::frames`].
    pub fn finish(&mut self, mtu: usize) {
        self.close(mtu);
    }

    fn close(&mut self, mtu: usize) {
        let Some(run) = self.run.take() else {
            return;
        };
        let frame = &mut self.frames.data[run.start..];
        if run.segments == 1 {
            if !as_tcp_super_frame(frame, mtu) {
                mark_partial(frame);
            }
        } else {
            mark_merged(frame, &run);
        }
        self.frames.seal();
    }
}

/// Whether `seg` (in `eth`) continues the run whose frame so far is `first` (Ethernet first).
fn joins(first: &[u8], run: &Run, eth: &[u8], seg: Segment) -> bool {
    let r = run.seg;
    if seg.v4 != r.v4
        || seg.head != r.head
        || seg.l4 != r.l4
        || seg.seq != run.next_seq
        || seg.payload() == 0
        || seg.payload() > run.mss
        || (seg.flags & !TCP_PSH) != TCP_ACK
    {
        return false;
    }
    // Link header and the IP header but for what segmentation changes.
    let same = |a: usize, b: usize| first[a..b] == eth[a..b];
    let ip_same = if r.v4 {
        // Total length (16..18), id (18..20) and checksum (24..26) differ.
        same(0, 16) && same(20, 24) && same(26, r.l4)
    } else {
        // Payload length (18..20) differs.
        same(0, 18) && same(20, r.l4)
    };
    // The TCP header but for the sequence number (4..8), flags (13) and checksum (16..18).
    let l4 = r.l4;
    ip_same
        && ip_sound(eth, seg)
        && same(l4, l4 + 4)
        && same(l4 + 8, l4 + 13)
        && same(l4 + 14, l4 + 16)
        && same(l4 + 18, r.head)
}

/// Whether an IPv4 header's checksum holds (IPv6 has none).
fn ip_sound(eth: &[u8], seg: Segment) -> bool {
    !seg.v4 || fold(sum16(&eth[14..seg.l4])) == 0xffff
}

/// Writes a merged frame's IP length (and IPv4 checksum), then marks it for the TAP's kernel
/// to cut again (see `offload::mark_tso`).
fn mark_merged(frame: &mut [u8], run: &Run) {
    let r = run.seg;
    let eth = &mut frame[VNET_HDR_LEN..];
    let l4_len = eth.len() - r.l4;
    if r.v4 {
        let total = (r.l4 - 14 + l4_len) as u16;
        eth[16..18].copy_from_slice(&total.to_be_bytes());
        eth[24..26].copy_from_slice(&[0, 0]);
        let sum = !fold(sum16(&eth[14..r.l4]));
        eth[24..26].copy_from_slice(&sum.to_be_bytes());
    } else {
        eth[18..20].copy_from_slice(&(l4_len as u16).to_be_bytes());
    }
    if let Some(l) = checksum_layout(eth) {
        mark_tso(frame, l, r.head, run.mss);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;
    use vswitch_switch::vnet::{F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, VnetHdr};

    const MTU: usize = 1450;

    fn seg4(seq: u32, payload: &[u8], psh: bool) -> Vec<u8> {
        let mut b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(40000, 80, seq, 1000)
            .ack(77);
        if psh {
            b = b.psh();
        }
        let mut f = Vec::new();
        b.write(&mut f, payload).unwrap();
        f
    }

    fn seg6(seq: u32, payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv6([0xfd; 16], [0xfe; 16], 64)
            .tcp(40000, 80, seq, 1000)
            .ack(77);
        let mut f = Vec::new();
        b.write(&mut f, payload).unwrap();
        f
    }

    fn merge(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut m = Merger::default();
        for f in frames {
            m.push(f, MTU);
        }
        m.finish(MTU);
        m.frames.iter().map(<[u8]>::to_vec).collect()
    }

    /// What the receiving kernel makes of a merged frame: its segments, cut as `tcp_segment`
    /// (the NIC-like cutter, tested on its own) cuts them.
    fn cut(frame: &[u8]) -> Vec<Vec<u8>> {
        let hdr = VnetHdr::parse(frame).unwrap();
        let eth = &frame[VNET_HDR_LEN..];
        if !hdr.is_gso() {
            return vec![finished(frame)];
        }
        let mut out = Vec::new();
        for i in 0.. {
            let mut s = Vec::new();
            let last = super::super::offload::tcp_segment(eth, hdr, i, &mut s, true, MTU).unwrap();
            out.push(s);
            if last {
                break;
            }
        }
        out
    }

    /// `f` with IPv4 id `id` (what a NIC's TSO gives the segments it cuts).
    fn with_id(mut f: Vec<u8>, id: u16) -> Vec<u8> {
        f[18..20].copy_from_slice(&id.to_be_bytes());
        f[24..26].copy_from_slice(&[0, 0]);
        let sum = !fold(sum16(&f[14..34]));
        f[24..26].copy_from_slice(&sum.to_be_bytes());
        f
    }

    /// The frame as the kernel sees it after finishing a checksum marked partial.
    fn finished(frame: &[u8]) -> Vec<u8> {
        let hdr = VnetHdr::parse(frame).unwrap();
        let mut eth = frame[VNET_HDR_LEN..].to_vec();
        if hdr.flags & F_NEEDS_CSUM != 0 {
            assert!(super::super::offload::finish_partial(&mut eth, hdr));
        }
        eth
    }

    fn payload(n: usize, salt: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(7) ^ salt).collect()
    }

    #[test]
    fn a_run_of_segments_becomes_one_frame_that_cuts_back_into_them() {
        let mss = 1398;
        let mut sent = Vec::new();
        for i in 0..5u32 {
            let len = if i == 4 { 100 } else { mss };
            let s = seg4(1000 + i * mss as u32, &payload(len, i as u8), i == 4);
            sent.push(with_id(s, 40 + i as u16));
        }
        let got = merge(&sent);
        assert_eq!(got.len(), 1);
        let hdr = VnetHdr::parse(&got[0]).unwrap();
        assert_eq!(
            (hdr.gso_type, hdr.gso_size, hdr.hdr_len),
            (GSO_TCPV4, 1398, 54)
        );
        let ip = etherparse::Ipv4HeaderSlice::from_slice(&got[0][VNET_HDR_LEN + 14..]).unwrap();
        assert_eq!(usize::from(ip.total_len()), 40 + 4 * mss + 100);
        let h = ip.to_header();
        assert_eq!(h.header_checksum, h.calc_header_checksum());
        assert_eq!(
            cut(&got[0]),
            sent,
            "cut again, the segments are the ones sent"
        );
    }

    #[test]
    fn ipv6_segments_merge_too() {
        let sent: Vec<_> = (0..3u32)
            .map(|i| seg6(5 + i * 1000, &payload(1000, i as u8)))
            .collect();
        let got = merge(&sent);
        assert_eq!(got.len(), 1);
        assert_eq!(VnetHdr::parse(&got[0]).unwrap().gso_type, GSO_TCPV6);
        assert_eq!(cut(&got[0]), sent);
    }

    #[test]
    fn what_may_not_merge_passes_as_it_came() {
        let mss = 1000;
        let a = seg4(1, &payload(mss, 1), false);
        let gap = seg4(1 + 2 * mss as u32, &payload(mss, 2), false);
        let other_port = {
            let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
                .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
                .tcp(40001, 80, 1 + mss as u32, 1000)
                .ack(77);
            let mut f = Vec::new();
            b.write(&mut f, &payload(mss, 3)).unwrap();
            f
        };
        let syn = {
            let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
                .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
                .tcp(40000, 80, 1, 1000)
                .syn();
            let mut f = Vec::new();
            b.write(&mut f, &[]).unwrap();
            f
        };
        let udp = {
            let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
                .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
                .udp(1, 2);
            let mut f = Vec::new();
            b.write(&mut f, &[1, 2, 3]).unwrap();
            f
        };
        let longer = seg4(1 + mss as u32, &payload(mss + 1, 4), false);
        let mut bad_ip = seg4(1 + mss as u32, &payload(mss, 5), false);
        bad_ip[24] ^= 1;
        for (what, pair) in [
            ("a gap in the sequence", [a.clone(), gap]),
            ("another flow", [a.clone(), other_port]),
            ("a SYN", [syn.clone(), a.clone()]),
            ("UDP", [udp, a.clone()]),
            ("a longer second segment", [a.clone(), longer]),
            ("a bad IPv4 header checksum", [a.clone(), bad_ip]),
        ] {
            let got = merge(&pair);
            assert_eq!(got.len(), 2, "{what}");
            for (g, s) in got.iter().zip(&pair) {
                assert!(!VnetHdr::parse(g).unwrap().is_gso(), "{what}");
                assert!(finished(g) == s[..], "{what}: changed");
            }
        }
        // A packet longer than the MTU starts no run (it leaves as a GSO frame of its own).
        let big = seg4(1, &payload(MTU, 8), false);
        let after_big = seg4(1 + MTU as u32, &payload(MTU, 9), false);
        assert_eq!(merge(&[big, after_big]).len(), 2);
        // After a shorter segment (or PSH) the run is over.
        let full = seg4(1, &payload(10, 5), false);
        let short = seg4(11, &payload(5, 6), false);
        let next = seg4(16, &payload(5, 7), false);
        assert_eq!(merge(&[full.clone(), short.clone(), next.clone()]).len(), 2);
        let pushed = seg4(11, &payload(10, 6), true);
        let after = seg4(21, &payload(10, 7), false);
        assert_eq!(merge(&[full, pushed, after]).len(), 2);
    }

    #[test]
    fn malformed_frames_pass_without_panic() {
        let a = seg4(1, &payload(500, 1), false);
        let mut lying = seg4(501, &payload(500, 2), false);
        lying[16..18].copy_from_slice(&9000u16.to_be_bytes());
        let mut frames = vec![a.clone(), lying];
        for n in [0, 1, 13, 14, 20, 34, 40, 53] {
            frames.push(a[..n].to_vec());
        }
        let got = merge(&frames);
        assert_eq!(got.len(), frames.len());
    }

    proptest::proptest! {
        /// Whatever the tunnel lets through (segments of one flow, damaged anywhere, or
        /// bytes that are no frame at all), the merger never panics, never makes frames out of
        /// nothing, and marks a merged frame only with a header the TAP's kernel can follow.
        #[test]
        fn damaged_runs_merge_or_pass_and_never_panic(
            payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..1500),
            segments in 1usize..12,
            damage in proptest::collection::vec((0usize..2000, proptest::prelude::any::<u8>()), 0..6),
            junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120),
            mtu in 68usize..9000,
        ) {
            let mss = payload.len() as u32;
            let mut frames: Vec<Vec<u8>> = (0..segments as u32)
                .map(|i| seg4(1 + i * mss, &payload, false))
                .collect();
            for (i, &(at, x)) in damage.iter().enumerate() {
                let f = &mut frames[i % segments];
                let at = at % f.len();
                f[at] ^= x;
            }
            frames.insert(segments / 2, junk);
            let mut m = Merger::default();
            for f in &frames {
                m.push(f, mtu);
            }
            m.finish(mtu);
            let out: Vec<&[u8]> = m.frames.iter().collect();
            proptest::prop_assert!(!out.is_empty() && out.len() <= frames.len());
            for f in out {
                let h = VnetHdr::parse(f).expect("a header");
                let eth = f.len() - VNET_HDR_LEN;
                if h.flags & F_NEEDS_CSUM != 0 {
                    let end = usize::from(h.csum_start) + usize::from(h.csum_offset) + 2;
                    proptest::prop_assert!(end <= eth);
                }
                if h.is_gso() {
                    proptest::prop_assert!(h.gso_size > 0 && usize::from(h.hdr_len) < eth);
                }
            }
        }
    }
}
