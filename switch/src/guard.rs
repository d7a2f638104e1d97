//! Port security: a port may send only from the MAC and addresses it was given.
//!
//! A container is a hostile tenant. Without a guard it could send from another container's
//! address (and have the gateway NAT it out, or answer DNS for another network's scope), claim
//! another's address in ARP or neighbour discovery (and take its traffic through the gateway),
//! or announce itself as a router. [`PortGuard::check`] looks at the few header fields that
//! carry such claims and refuses the frame; everything else passes untouched. It reads fixed
//! offsets for the common case (an IPv4 or IPv6 source is two comparisons) and goes deeper only
//! for ARP and ICMPv6, which are rare.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::MacAddr;

/// What a guarded port may send from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortGuard {
    pub mac: MacAddr,
    pub ipv4: Vec<Ipv4Addr>,
    pub ipv6: Vec<Ipv6Addr>,
}

/// Why a guard refused a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// Sent from another MAC than the port's.
    Mac,
    /// An IPv4 packet from an address the port was not given.
    Ipv4Source,
    /// An IPv6 packet from an address the port was not given (link-local and, for duplicate
    /// address detection, the unspecified address are its own).
    Ipv6Source,
    /// An ARP message claiming an address or MAC that is not the port's.
    Arp,
    /// A neighbour advertisement or solicitation claiming an address or MAC that is not the
    /// port's, or a router advertisement or redirect (the gateway is the only router).
    Ndp,
    /// A VLAN tag: the network is one broadcast domain, and a tag would hide the real header.
    Vlan,
    /// Too short for the header its EtherType announces.
    Truncated,
}

const ETH: usize = 14;
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const ETHERTYPE_ARP: [u8; 2] = [0x08, 0x06];
const ETHERTYPE_IPV6: [u8; 2] = [0x86, 0xdd];
const ICMPV6: u8 = 58;
const ND_ROUTER_ADVERT: u8 = 134;
const ND_NEIGHBOR_SOLICIT: u8 = 135;
const ND_NEIGHBOR_ADVERT: u8 = 136;
const ND_REDIRECT: u8 = 137;
const ND_OPT_SOURCE_LLADDR: u8 = 1;
const ND_OPT_TARGET_LLADDR: u8 = 2;

impl PortGuard {
    /// Checks an Ethernet frame (from its destination MAC on) that the port sent.
    pub fn check(&self, eth: &[u8]) -> Result<(), Violation> {
        let header = eth.get(..ETH).ok_or(Violation::Truncated)?;
        if header[6..12] != self.mac.0 {
            return Err(Violation::Mac);
        }
        match [header[12], header[13]] {
            ETHERTYPE_IPV4 => {
                let src = eth.get(ETH + 12..ETH + 16).ok_or(Violation::Truncated)?;
                let src = Ipv4Addr::new(src[0], src[1], src[2], src[3]);
                if self.ipv4.contains(&src) {
                    Ok(())
                } else {
                    Err(Violation::Ipv4Source)
                }
            }
            ETHERTYPE_IPV6 => self.check_ipv6(eth),
            ETHERTYPE_ARP => self.check_arp(eth),
            [0x81, 0x00] | [0x88, 0xa8] | [0x91, 0x00] => Err(Violation::Vlan),
            // Other EtherTypes carry no address the network acts on.
            _ => Ok(()),
        }
    }

    fn own_v6(&self, ip: Ipv6Addr) -> bool {
        self.ipv6.contains(&ip) || ip.is_unicast_link_local()
    }

    fn check_ipv6(&self, eth: &[u8]) -> Result<(), Violation> {
        let ip = eth.get(ETH..ETH + 40).ok_or(Violation::Truncated)?;
        let src = v6(&ip[8..24]);
        if !(self.own_v6(src) || src.is_unspecified()) {
            return Err(Violation::Ipv6Source);
        }
        if ip[6] != ICMPV6 {
            return Ok(());
        }
        let icmp = &eth[ETH + 40..];
        let Some(&kind) = icmp.first() else {
            return Err(Violation::Truncated);
        };
        match kind {
            ND_ROUTER_ADVERT | ND_REDIRECT => Err(Violation::Ndp),
            ND_NEIGHBOR_SOLICIT | ND_NEIGHBOR_ADVERT => {
                // Type, code, checksum, flags or reserved (8), target (16), then options.
                let target = icmp.get(8..24).ok_or(Violation::Truncated)?;
                if kind == ND_NEIGHBOR_ADVERT && !self.own_v6(v6(target)) {
                    return Err(Violation::Ndp);
                }
                self.check_nd_options(&icmp[24..])
            }
            _ => Ok(()),
        }
    }

    /// The link-layer address options of a neighbour message must name the port's MAC.
    fn check_nd_options(&self, mut opts: &[u8]) -> Result<(), Violation> {
        while let [kind, len, ..] = *opts {
            let bytes = usize::from(len) * 8;
            if bytes == 0 {
                return Err(Violation::Ndp);
            }
            let opt = opts.get(..bytes).ok_or(Violation::Truncated)?;
            if matches!(kind, ND_OPT_SOURCE_LLADDR | ND_OPT_TARGET_LLADDR)
                && opt.get(2..8) != Some(&self.mac.0[..])
            {
                return Err(Violation::Ndp);
            }
            opts = &opts[bytes..];
        }
        Ok(())
    }

    fn check_arp(&self, eth: &[u8]) -> Result<(), Violation> {
        let arp = eth.get(ETH..ETH + 28).ok_or(Violation::Truncated)?;
        // Ethernet and IPv4 only: hardware type 1, protocol 0x0800, lengths 6 and 4.
        if arp[..6] != [0, 1, 0x08, 0x00, 6, 4] {
            return Err(Violation::Arp);
        }
        let sender_mac = &arp[8..14];
        let sender_ip = Ipv4Addr::new(arp[14], arp[15], arp[16], arp[17]);
        // An address probe (RFC 5227) comes from 0.0.0.0.
        if sender_mac != self.mac.0
            || !(self.ipv4.contains(&sender_ip) || sender_ip.is_unspecified())
        {
            return Err(Violation::Arp);
        }
        Ok(())
    }
}

fn v6(b: &[u8]) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    Ipv6Addr::from(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    const MAC: [u8; 6] = [0x02, 0x42, 10, 0, 0, 2];
    const OTHER_MAC: [u8; 6] = [0x02, 0x42, 10, 0, 0, 3];
    const IP: [u8; 4] = [10, 0, 0, 2];
    const IP6: &str = "fd00::2";

    fn guard() -> PortGuard {
        PortGuard {
            mac: MacAddr(MAC),
            ipv4: vec![Ipv4Addr::from(IP)],
            ipv6: vec![IP6.parse().expect("ip")],
        }
    }

    fn udp4(src_mac: [u8; 6], src: [u8; 4]) -> Vec<u8> {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(src_mac, [0xff; 6])
            .ipv4(src, [10, 0, 0, 1], 64)
            .udp(1, 2)
            .write(&mut f, b"x")
            .expect("udp");
        f
    }

    fn udp6(src: &str) -> Vec<u8> {
        let src: Ipv6Addr = src.parse().expect("ip");
        let mut f = Vec::new();
        PacketBuilder::ethernet2(MAC, [0x33, 0x33, 0, 0, 0, 1])
            .ipv6(
                src.octets(),
                [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                64,
            )
            .udp(1, 2)
            .write(&mut f, b"x")
            .expect("udp");
        f
    }

    fn arp(sender_mac: [u8; 6], sender_ip: [u8; 4]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&MAC);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
        f.extend_from_slice(&sender_mac);
        f.extend_from_slice(&sender_ip);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&[10, 0, 0, 1]);
        f
    }

    /// An ICMPv6 neighbour message of `kind` for `target`, with a link-layer option naming
    /// `lladdr`.
    fn nd(kind: u8, target: &str, lladdr: [u8; 6]) -> Vec<u8> {
        let target: Ipv6Addr = target.parse().expect("ip");
        let mut icmp = vec![kind, 0, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&target.octets());
        let opt = if kind == ND_NEIGHBOR_ADVERT { 2 } else { 1 };
        icmp.extend_from_slice(&[opt, 1]);
        icmp.extend_from_slice(&lladdr);
        let mut f = Vec::new();
        f.extend_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
        f.extend_from_slice(&MAC);
        f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
        f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
        f.extend_from_slice(&[ICMPV6, 255]);
        f.extend_from_slice(
            &"fe80::42:aff:fe00:2"
                .parse::<Ipv6Addr>()
                .expect("ip")
                .octets(),
        );
        f.extend_from_slice(&[0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&icmp);
        f
    }

    #[test]
    fn a_port_sends_only_from_its_own_mac_and_addresses() {
        let g = guard();
        assert_eq!(g.check(&udp4(MAC, IP)), Ok(()));
        assert_eq!(g.check(&udp4(OTHER_MAC, IP)), Err(Violation::Mac));
        for spoofed in [[10, 0, 0, 3], [8, 8, 8, 8], [127, 0, 0, 1], [0, 0, 0, 0]] {
            assert_eq!(g.check(&udp4(MAC, spoofed)), Err(Violation::Ipv4Source));
        }
        assert_eq!(g.check(&udp6(IP6)), Ok(()));
        assert_eq!(
            g.check(&udp6("fe80::1234")),
            Ok(()),
            "link-local is its own"
        );
        assert_eq!(g.check(&udp6("::")), Ok(()), "duplicate address detection");
        assert_eq!(g.check(&udp6("fd00::3")), Err(Violation::Ipv6Source));
        assert_eq!(g.check(&udp6("::1")), Err(Violation::Ipv6Source));
        assert_eq!(
            g.check(&udp6("::ffff:10.0.0.2")),
            Err(Violation::Ipv6Source)
        );
    }

    #[test]
    fn arp_and_neighbour_discovery_claim_only_what_the_port_has() {
        let g = guard();
        assert_eq!(g.check(&arp(MAC, IP)), Ok(()));
        assert_eq!(g.check(&arp(MAC, [0, 0, 0, 0])), Ok(()), "an address probe");
        assert_eq!(g.check(&arp(MAC, [10, 0, 0, 3])), Err(Violation::Arp));
        assert_eq!(g.check(&arp(OTHER_MAC, IP)), Err(Violation::Arp));
        assert_eq!(g.check(&nd(ND_NEIGHBOR_ADVERT, IP6, MAC)), Ok(()));
        assert_eq!(
            g.check(&nd(ND_NEIGHBOR_ADVERT, "fd00::3", MAC)),
            Err(Violation::Ndp)
        );
        assert_eq!(
            g.check(&nd(ND_NEIGHBOR_ADVERT, IP6, OTHER_MAC)),
            Err(Violation::Ndp)
        );
        assert_eq!(g.check(&nd(ND_NEIGHBOR_SOLICIT, "fd00::1", MAC)), Ok(()));
        assert_eq!(
            g.check(&nd(ND_NEIGHBOR_SOLICIT, "fd00::1", OTHER_MAC)),
            Err(Violation::Ndp)
        );
        assert_eq!(
            g.check(&nd(ND_ROUTER_ADVERT, "::", MAC)),
            Err(Violation::Ndp)
        );
        assert_eq!(
            g.check(&nd(ND_REDIRECT, "fd00::1", MAC)),
            Err(Violation::Ndp)
        );
    }

    #[test]
    fn tags_and_short_frames_are_refused_and_other_ethertypes_pass() {
        let g = guard();
        let mut tagged = udp4(MAC, IP);
        tagged[12..14].copy_from_slice(&[0x81, 0x00]);
        assert_eq!(g.check(&tagged), Err(Violation::Vlan));
        assert_eq!(g.check(&udp4(MAC, IP)[..20]), Err(Violation::Truncated));
        assert_eq!(g.check(&arp(MAC, IP)[..30]), Err(Violation::Truncated));
        assert_eq!(g.check(&[0; 10]), Err(Violation::Truncated));
        let mut lldp = udp4(MAC, IP);
        lldp[12..14].copy_from_slice(&[0x88, 0xcc]);
        assert_eq!(g.check(&lldp), Ok(()));
        // Options of length zero would loop for ever; they are refused.
        let mut bad = nd(ND_NEIGHBOR_SOLICIT, "fd00::1", MAC);
        let at = bad.len() - 7;
        bad[at] = 0;
        assert_eq!(g.check(&bad), Err(Violation::Ndp));
    }
}
