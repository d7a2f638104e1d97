//! An overlay network's tunnel port on its datapath thread: frames the bridge sends to the
//! port leave in VXLAN for the hosts [`Tunnel`] names, and VXLAN packets the tunnel believes
//! come back as frames of the port.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use vswitch_switch::budget::{BudgetConfig, FloodBudget};
use vswitch_switch::vnet::{VNET_HDR_LEN, VnetHdr};
use vswitch_switch::vxlan::{self, Egress, Tunnel, TunnelConfig, VXLAN_HDR_LEN};
use vswitch_switch::{MacAddr, PortId};

use super::TunnelSpec;
use super::gro::Merger;
use super::offload::{checksum_layout, finish_partial, tcp_segment};
use super::packed::Packed;
use crate::api::TunnelStatsRow;
use crate::host::vxlan::Sockets;

/// Most VXLAN packets sent in one call with UDP segmentation offload (the kernel's limit).
const GSO_MAX_SEGMENTS: usize = 64;
/// Most bytes sent in one such call: what fits one UDP datagram over IPv4 or IPv6.
const GSO_MAX_BYTES: usize = 65_000;

/// VXLAN packets (UDP payloads) from one sender: what the receiving thread hands a network's
/// datapath at once.
pub struct Datagrams {
    pub from: IpAddr,
    packets: Packed,
}

impl Datagrams {
    pub fn new(from: IpAddr) -> Self {
        Self {
            from,
            packets: Packed::default(),
        }
    }

    pub fn push(&mut self, packet: &[u8]) {
        self.packets.push(packet);
    }

    /// How many packets.
    pub fn count(&self) -> usize {
        self.packets.count()
    }

    /// The packets' bytes together.
    pub fn bytes(&self) -> usize {
        self.packets.bytes()
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.packets.iter()
    }
}

pub(super) struct TunnelPort {
    pub port: PortId,
    /// The network's MTU.
    mtu: usize,
    tunnel: Tunnel,
    sockets: Arc<Sockets>,
    /// Reused for outgoing packets.
    out: Vec<u8>,
    /// Reused for the frames of incoming packets.
    merger: Merger,
    /// What each port may have replicated to other hosts.
    budget: FloodBudget,
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
            out: Vec::with_capacity(GSO_MAX_BYTES + VXLAN_HDR_LEN + 65_536),
            merger: Merger::default(),
            budget: FloodBudget::new(BudgetConfig::default()),
            tx_dropped: 0,
        }
    }

    /// Sends a frame of the network (virtio-net header first) that came in on port `ingress`
    /// to the hosts it is for.
    pub fn send(&mut self, now: Instant, ingress: PortId, frame: &[u8]) {
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
        // Another vswitch host marks what it receives for its kernel to check (see
        // `offload::mark_partial`): it is not sent a checksum it would not read. External VTEPs
        // and floods get complete checksums.
        let full = !matches!(egress, Egress::To(h) if self.tunnel.is_member(h));
        self.out.clear();
        if !hdr.is_gso() {
            // Anything but a TSO super-frame leaves as it is, its checksum finished if the
            // sender left it partial.
            self.out.extend_from_slice(&vni);
            self.out.extend_from_slice(eth);
            // A partial checksum is left for a member host only where its `mark_partial` will
            // find it; anything else (a VLAN tag, extension headers, a tunnel inside the
            // container) is finished here.
            let partial = hdr.flags & vswitch_switch::vnet::F_NEEDS_CSUM != 0;
            let leave = !full
                && checksum_layout(eth).map(|l| (l.start, l.offset))
                    == Some((usize::from(hdr.csum_start), usize::from(hdr.csum_offset)));
            if partial && !leave && !finish_partial(&mut self.out[VXLAN_HDR_LEN..], hdr) {
                self.tx_dropped += 1;
                return;
            }
            let len = self.out.len();
            self.emit(now, ingress, egress, flow, len);
            return;
        }
        // A TSO super-frame leaves as the segments its sender's NIC would have cut, as many
        // as the kernel takes in one send (UDP segmentation offload: every packet but the
        // last of a send has the same length).
        let mut i = 0;
        loop {
            self.out.clear();
            let (mut count, mut size, mut last) = (0, 0, false);
            while !last
                && (count == 0
                    || (count < GSO_MAX_SEGMENTS && self.out.len() + size <= GSO_MAX_BYTES))
            {
                let before = self.out.len();
                self.out.extend_from_slice(&vni);
                match tcp_segment(eth, hdr, i, &mut self.out, full, self.mtu) {
                    Some(l) => last = l,
                    None => {
                        self.tx_dropped += 1;
                        return;
                    }
                }
                if count == 0 {
                    size = self.out.len() - before;
                }
                count += 1;
                i += 1;
            }
            self.emit(now, ingress, egress, flow, size);
            if last {
                return;
            }
        }
    }

    /// Sends the packets in `self.out` (each `size` bytes, the last perhaps fewer) to the
    /// hosts `egress` names; a flood only within `ingress`'s replication budget.
    fn emit(&mut self, now: Instant, ingress: PortId, egress: Egress, flow: usize, size: usize) {
        let Self {
            tunnel,
            sockets,
            out,
            tx_dropped,
            budget,
            ..
        } = self;
        match egress {
            Egress::To(host) => *tx_dropped += sockets.send(flow, out, size, host),
            Egress::Flood => {
                let packets = out.len().div_ceil(size.max(1)) * tunnel.flood_list().len();
                if !budget.take(now, ingress.index(), packets) {
                    return;
                }
                for &host in tunnel.flood_list() {
                    *tx_dropped += sockets.send(flow, out, size, host);
                }
            }
        }
    }

    /// The frames (virtio-net header first) inside the VXLAN packets the tunnel believes,
    /// runs of one TCP flow's segments merged. Hand them back with [`TunnelPort::recycle`].
    pub fn receive(&mut self, now: Instant, packets: &Datagrams) -> Packed {
        self.merger.frames.clear();
        for packet in packets.iter() {
            if let Ok(inner) = self.tunnel.ingress(now, packets.from, packet) {
                self.merger.push(inner, self.mtu);
            }
        }
        self.merger.finish(self.mtu);
        std::mem::take(&mut self.merger.frames)
    }

    /// Gives the buffer [`TunnelPort::receive`] returned back, for the next batch.
    pub fn recycle(&mut self, frames: Packed) {
        self.merger.frames = frames;
    }

    /// Forgets what `port` spent (it was unplugged; a new port may get its number).
    pub fn port_gone(&mut self, port: PortId) {
        self.budget.forget(port.index());
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
            tx_flood_limited: self.budget.refused,
            learned_macs: self.tunnel.learned_len(),
            daemon_unknown_vni: unknown_vni,
            daemon_not_vxlan: not_vxlan,
        }
    }
}
