//! VXLAN (RFC 7348) for overlay networks, without I/O: the header, the outer UDP source port,
//! and a [`Tunnel`] that decides which hosts a frame goes to and whether a packet that arrives
//! is believed.
//!
//! A network's tunnel is one port of its [`crate::Bridge`]. The MACs of endpoints on other
//! hosts are static: they come from the shared store ([`Tunnel::set_remote`]), are pinned to the
//! tunnel port in the bridge, and are never learned from the wire. A member host may only send
//! from the MACs the store gives it. External VTEPs registered as peers (a kernel vxlan device, a
//! hardware switch) are the exception: the MACs they send from are learned, from them only,
//! within a bound. Broadcast and unknown unicast go to every member host and peer (head-end
//! replication).

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::MacAddr;

/// Length of the VXLAN header.
pub const VXLAN_HDR_LEN: usize = 8;
/// The IANA port for VXLAN.
pub const VXLAN_PORT: u16 = 4789;
/// Outer headers a VXLAN packet adds to an inner Ethernet frame over IPv4: IP (20), UDP (8),
/// VXLAN (8) and the inner Ethernet header (14). An overlay's MTU is the underlay's minus this.
pub const OVERHEAD: usize = 50;
/// Largest VNI (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;
/// The "I" flag: the VNI is valid.
const FLAG_VNI: u8 = 0x08;

/// The VXLAN header for `vni`.
pub fn header(vni: u32) -> [u8; VXLAN_HDR_LEN] {
    let v = (vni & MAX_VNI).to_be_bytes();
    [FLAG_VNI, 0, 0, 0, v[1], v[2], v[3], 0]
}

/// The VNI and the inner Ethernet frame of a VXLAN packet (the UDP payload); `None` unless the
/// "I" flag is set and an Ethernet header follows.
pub fn parse(packet: &[u8]) -> Option<(u32, &[u8])> {
    let (h, inner) = packet.split_first_chunk::<VXLAN_HDR_LEN>()?;
    if h[0] & FLAG_VNI == 0 || inner.len() < 14 {
        return None;
    }
    Some((u32::from_be_bytes([0, h[4], h[5], h[6]]), inner))
}

/// The outer UDP source port for an inner frame: a hash of its flow (MACs, and for IP its
/// addresses, protocol and ports), so that one flow keeps one port and flows spread over the
/// underlay's paths, as the kernel does. In `low..=high`.
pub fn source_port(inner: &[u8], low: u16, high: u16) -> u16 {
    let mut h = Fnv::new();
    h.write(inner.get(..12).unwrap_or(inner));
    let ethertype = inner.get(12..14).map(|t| u16::from_be_bytes([t[0], t[1]]));
    let ip = inner.get(14..).unwrap_or_default();
    let l4 = match ethertype {
        Some(0x0800) if ip.len() >= 20 => {
            h.write(&ip[12..20]);
            h.write(&ip[9..10]);
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            Some((ip[9], ihl))
        }
        Some(0x86dd) if ip.len() >= 40 => {
            h.write(&ip[8..40]);
            h.write(&ip[6..7]);
            Some((ip[6], 40))
        }
        _ => None,
    };
    if let Some((6 | 17, off)) = l4
        && let Some(ports) = ip.get(off..off + 4)
    {
        h.write(ports);
    }
    let span = u64::from(high.saturating_sub(low)) + 1;
    low + (h.finish() % span) as u16
}

/// FNV-1a: small, and good enough to spread flows over ports.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        // Fold the high bits in: the low bits of FNV alone spread poorly over small ranges.
        self.0 ^ (self.0 >> 32)
    }
}

/// Where a frame for the tunnel goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// To this one host.
    To(IpAddr),
    /// To every host of [`Tunnel::flood_list`].
    Flood,
}

/// Why a packet from the underlay was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelDrop {
    /// Not VXLAN, or no Ethernet frame inside.
    Malformed,
    /// For another VNI than this network's.
    ForeignVni,
    /// From a host that is neither a member nor a registered peer.
    NotMember,
    /// From a member, with an inner source MAC the store does not give that host (or a peer
    /// claiming a member's MAC).
    Spoofed,
}

/// Counters of one tunnel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunnelStats {
    pub rx_packets: u64,
    pub rx_malformed: u64,
    pub rx_foreign_vni: u64,
    pub rx_not_member: u64,
    pub rx_spoofed: u64,
    /// New source MACs of peers that did not fit the table (their frames were delivered).
    pub learn_refused: u64,
    pub tx_unicast: u64,
    pub tx_flooded: u64,
}

/// Bounds of the MACs learned from peers.
#[derive(Debug, Clone, Copy)]
pub struct TunnelConfig {
    pub capacity: usize,
    pub aging: Duration,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            capacity: 4096,
            aging: Duration::from_secs(300),
        }
    }
}

/// One overlay network's view of the other hosts.
#[derive(Debug)]
pub struct Tunnel {
    vni: u32,
    config: TunnelConfig,
    /// This host's own address, never a destination.
    own: Option<IpAddr>,
    /// Member hosts with endpoints on the network.
    members: BTreeSet<IpAddr>,
    /// External VTEPs.
    peers: BTreeSet<IpAddr>,
    /// Where broadcast and unknown unicast go: members and peers, without `own`.
    flood: Vec<IpAddr>,
    /// Endpoints on member hosts, from the store.
    remote: HashMap<MacAddr, IpAddr>,
    /// MACs seen from peers: where, and when last.
    learned: HashMap<MacAddr, (IpAddr, Instant)>,
    stats: TunnelStats,
}

impl Tunnel {
    pub fn new(vni: u32, own: Option<IpAddr>, config: TunnelConfig) -> Self {
        Self {
            vni,
            config,
            own,
            members: BTreeSet::new(),
            peers: BTreeSet::new(),
            flood: Vec::new(),
            remote: HashMap::new(),
            learned: HashMap::new(),
            stats: TunnelStats::default(),
        }
    }

    pub fn vni(&self) -> u32 {
        self.vni
    }

    pub fn stats(&self) -> &TunnelStats {
        &self.stats
    }

    /// The hosts a flooded frame goes to.
    pub fn flood_list(&self) -> &[IpAddr] {
        &self.flood
    }

    fn reflood(&mut self) {
        self.flood = self
            .members
            .iter()
            .chain(self.peers.iter())
            .filter(|h| Some(**h) != self.own)
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
    }

    /// The member hosts with endpoints on the network (replaces the previous set).
    pub fn set_members(&mut self, hosts: impl IntoIterator<Item = IpAddr>) {
        self.members = hosts.into_iter().collect();
        self.reflood();
    }

    /// Registers an external VTEP.
    pub fn add_peer(&mut self, peer: IpAddr) {
        self.peers.insert(peer);
        self.reflood();
    }

    /// Forgets an external VTEP and the MACs learned from it.
    pub fn remove_peer(&mut self, peer: IpAddr) {
        self.peers.remove(&peer);
        self.learned.retain(|_, (h, _)| *h != peer);
        self.reflood();
    }

    /// Whether `host` is a member (a vswitch host of the cluster, not an external VTEP).
    pub fn is_member(&self, host: IpAddr) -> bool {
        self.members.contains(&host)
    }

    pub fn peers(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.peers.iter().copied()
    }

    /// Records that the endpoint with `mac` lives on `host`. A MAC learned from a peer gives way.
    pub fn set_remote(&mut self, mac: MacAddr, host: IpAddr) {
        self.learned.remove(&mac);
        self.remote.insert(mac, host);
    }

    /// Forgets a remote endpoint; returns whether it was known.
    pub fn remove_remote(&mut self, mac: MacAddr) -> bool {
        self.remote.remove(&mac).is_some()
    }

    /// The remote endpoints' MACs, with their hosts.
    pub fn remotes(&self) -> impl Iterator<Item = (MacAddr, IpAddr)> + '_ {
        self.remote.iter().map(|(m, h)| (*m, *h))
    }

    /// Where a frame to `dst` goes.
    pub fn egress(&mut self, now: Instant, dst: MacAddr) -> Egress {
        if !dst.is_multicast() {
            if let Some(h) = self.remote.get(&dst) {
                self.stats.tx_unicast += 1;
                return Egress::To(*h);
            }
            if let Some((h, seen)) = self.learned.get(&dst)
                && now.saturating_duration_since(*seen) < self.config.aging
            {
                self.stats.tx_unicast += 1;
                return Egress::To(*h);
            }
        }
        self.stats.tx_flooded += 1;
        Egress::Flood
    }

    /// Checks a VXLAN packet (the UDP payload) that `from` sent, and returns the inner frame if
    /// it is believed.
    pub fn ingress<'a>(
        &mut self,
        now: Instant,
        from: IpAddr,
        packet: &'a [u8],
    ) -> Result<&'a [u8], TunnelDrop> {
        let r = self.check(now, from, packet);
        match r {
            Ok(_) => self.stats.rx_packets += 1,
            Err(TunnelDrop::Malformed) => self.stats.rx_malformed += 1,
            Err(TunnelDrop::ForeignVni) => self.stats.rx_foreign_vni += 1,
            Err(TunnelDrop::NotMember) => self.stats.rx_not_member += 1,
            Err(TunnelDrop::Spoofed) => self.stats.rx_spoofed += 1,
        }
        r
    }

    fn check<'a>(
        &mut self,
        now: Instant,
        from: IpAddr,
        packet: &'a [u8],
    ) -> Result<&'a [u8], TunnelDrop> {
        let (vni, inner) = parse(packet).ok_or(TunnelDrop::Malformed)?;
        if vni != self.vni {
            return Err(TunnelDrop::ForeignVni);
        }
        let src = MacAddr(inner[6..12].try_into().map_err(|_| TunnelDrop::Malformed)?);
        if src.is_multicast() || src.is_zero() {
            return Err(TunnelDrop::Malformed);
        }
        if self.members.contains(&from) && Some(from) != self.own {
            return match self.remote.get(&src) {
                Some(h) if *h == from => Ok(inner),
                _ => Err(TunnelDrop::Spoofed),
            };
        }
        if !self.peers.contains(&from) {
            return Err(TunnelDrop::NotMember);
        }
        if self.remote.contains_key(&src) {
            return Err(TunnelDrop::Spoofed);
        }
        if !self.learned.contains_key(&src) && self.learned.len() >= self.config.capacity {
            self.expire(now);
            if self.learned.len() >= self.config.capacity {
                // Delivered, not learned (frames back to it are flooded), as a full bridge
                // table does: a flood of new sources cannot cut off the ones that follow.
                self.stats.learn_refused += 1;
                return Ok(inner);
            }
        }
        self.learned.insert(src, (from, now));
        Ok(inner)
    }

    /// Forgets MACs learned from peers that were not seen for the aging time.
    pub fn expire(&mut self, now: Instant) {
        let aging = self.config.aging;
        self.learned
            .retain(|_, (_, seen)| now.saturating_duration_since(*seen) < aging);
    }

    /// Number of MACs learned from peers.
    pub fn learned_len(&self) -> usize {
        self.learned.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn mac(last: u8) -> MacAddr {
        MacAddr([2, 0, 0, 0, 0, last])
    }

    /// A VXLAN packet for `vni` with an inner frame from `src` to `dst`.
    fn packet(vni: u32, dst: MacAddr, src: MacAddr) -> Vec<u8> {
        let mut p = header(vni).to_vec();
        p.extend_from_slice(&dst.0);
        p.extend_from_slice(&src.0);
        p.extend_from_slice(&[0x08, 0x06]);
        p.extend_from_slice(&[0; 28]);
        p
    }

    #[test]
    fn header_round_trips() {
        for vni in [0, 1, 4097, MAX_VNI] {
            let p = packet(vni, mac(1), mac(2));
            let (v, inner) = parse(&p).unwrap();
            assert_eq!(v, vni);
            assert_eq!(&inner[..6], &mac(1).0);
        }
        // As RFC 7348 draws it: flags 0x08, 24 reserved bits, VNI, 8 reserved bits.
        assert_eq!(header(0x123456), [0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0]);
        let mut no_flag = packet(5, mac(1), mac(2));
        no_flag[0] = 0;
        assert!(parse(&no_flag).is_none());
        assert!(parse(&header(5)).is_none(), "no inner frame");
        assert!(parse(&[0x08, 0, 0]).is_none());
    }

    #[test]
    fn source_ports_follow_flows() {
        let a = packet(1, mac(1), mac(2));
        let b = packet(1, mac(1), mac(3));
        let (pa, pb) = (
            source_port(&a[8..], 32768, 60999),
            source_port(&b[8..], 32768, 60999),
        );
        assert!((32768..=60999).contains(&pa) && (32768..=60999).contains(&pb));
        assert_eq!(pa, source_port(&a[8..], 32768, 60999), "one flow, one port");
        assert_ne!(pa, pb, "these two flows spread");
        assert_eq!(source_port(&[], 5, 5), 5);
    }

    #[test]
    fn members_send_only_from_their_own_endpoints() {
        let now = Instant::now();
        let mut t = Tunnel::new(7, Some(ip("10.0.0.1")), TunnelConfig::default());
        t.set_members([ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.3")]);
        t.set_remote(mac(2), ip("10.0.0.2"));
        t.set_remote(mac(3), ip("10.0.0.3"));
        assert_eq!(t.flood_list(), [ip("10.0.0.2"), ip("10.0.0.3")]);
        let ok = packet(7, MacAddr::BROADCAST, mac(2));
        assert!(t.ingress(now, ip("10.0.0.2"), &ok).is_ok());
        // h3 claiming h2's endpoint, or an address nobody gave it.
        let claim = packet(7, MacAddr::BROADCAST, mac(2));
        assert_eq!(
            t.ingress(now, ip("10.0.0.3"), &claim),
            Err(TunnelDrop::Spoofed)
        );
        let unknown = packet(7, MacAddr::BROADCAST, mac(9));
        assert_eq!(
            t.ingress(now, ip("10.0.0.3"), &unknown),
            Err(TunnelDrop::Spoofed)
        );
        // Another VNI, a stranger, and our own address.
        let other = packet(8, MacAddr::BROADCAST, mac(2));
        assert_eq!(
            t.ingress(now, ip("10.0.0.2"), &other),
            Err(TunnelDrop::ForeignVni)
        );
        assert_eq!(
            t.ingress(now, ip("192.0.2.9"), &ok),
            Err(TunnelDrop::NotMember)
        );
        assert_eq!(
            t.ingress(now, ip("10.0.0.1"), &ok),
            Err(TunnelDrop::NotMember)
        );
        let s = t.stats();
        assert_eq!(
            (
                s.rx_packets,
                s.rx_spoofed,
                s.rx_foreign_vni,
                s.rx_not_member
            ),
            (1, 2, 1, 2)
        );
        assert_eq!(t.learned_len(), 0, "members' MACs are never learned");
    }

    #[test]
    fn unicast_goes_to_the_host_and_the_rest_floods() {
        let now = Instant::now();
        let mut t = Tunnel::new(7, None, TunnelConfig::default());
        t.set_members([ip("10.0.0.2")]);
        t.set_remote(mac(2), ip("10.0.0.2"));
        assert_eq!(t.egress(now, mac(2)), Egress::To(ip("10.0.0.2")));
        assert_eq!(t.egress(now, mac(9)), Egress::Flood);
        assert_eq!(t.egress(now, MacAddr::BROADCAST), Egress::Flood);
        assert!(t.remove_remote(mac(2)));
        assert_eq!(t.egress(now, mac(2)), Egress::Flood);
    }

    #[test]
    fn peers_are_learned_from_within_bounds_and_age_out() {
        let now = Instant::now();
        let config = TunnelConfig {
            capacity: 2,
            aging: Duration::from_secs(10),
        };
        let mut t = Tunnel::new(7, None, config);
        let peer = ip("192.0.2.7");
        t.set_remote(mac(2), ip("10.0.0.2"));
        let p = |src| packet(7, MacAddr::BROADCAST, src);
        assert_eq!(t.ingress(now, peer, &p(mac(5))), Err(TunnelDrop::NotMember));
        t.add_peer(peer);
        assert_eq!(t.flood_list(), [peer]);
        assert!(t.ingress(now, peer, &p(mac(5))).is_ok());
        assert_eq!(t.egress(now, mac(5)), Egress::To(peer));
        // A peer cannot claim a member's endpoint.
        assert_eq!(t.ingress(now, peer, &p(mac(2))), Err(TunnelDrop::Spoofed));
        assert!(t.ingress(now, peer, &p(mac(6))).is_ok());
        // Full: delivered, not learned.
        assert!(t.ingress(now, peer, &p(mac(7))).is_ok());
        assert_eq!((t.learned_len(), t.stats().learn_refused), (2, 1));
        assert_eq!(t.egress(now, mac(7)), Egress::Flood);
        // Aged out: gone from unicast, and room again.
        let later = now + Duration::from_secs(11);
        assert_eq!(t.egress(later, mac(5)), Egress::Flood);
        assert!(t.ingress(later, peer, &p(mac(7))).is_ok());
        assert_eq!(t.learned_len(), 1);
        t.remove_peer(peer);
        assert_eq!(t.learned_len(), 0);
        assert!(t.flood_list().is_empty());
    }
}
