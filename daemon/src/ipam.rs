//! Address management: choosing subnets for new networks and addresses for new endpoints.
//!
//! Pure functions over the current state, so they are unit-tested without a daemon.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// The pools Docker draws automatic subnets from: 172.17-31.0.0/16, then 192.168.0.0/16 in /20s.
/// 172.17.0.0/16 belongs to the default `bridge` network, so automatic picks start at 172.18.
pub fn auto_subnet_candidates() -> impl Iterator<Item = Ipv4Net> {
    let b16 = (18u8..=31).filter_map(|b| Ipv4Net::new(Ipv4Addr::new(172, b, 0, 0), 16).ok());
    let c20 = (0u8..16).filter_map(|i| Ipv4Net::new(Ipv4Addr::new(192, 168, i * 16, 0), 20).ok());
    b16.chain(c20)
}

/// The first automatic subnet that overlaps none of `taken`.
pub fn pick_subnet(taken: &[Ipv4Net]) -> Option<Ipv4Net> {
    auto_subnet_candidates().find(|c| !taken.iter().any(|t| overlaps4(*c, *t)))
}

/// The IPv4 routes of the calling thread's network namespace, default routes and other very
/// wide ones left out (OpenVPN's `def1` pair, 0.0.0.0/1 and 128.0.0.0/1, overlaps everything
/// too); empty if they cannot be read.
pub fn host_routes() -> Vec<Ipv4Net> {
    std::fs::read_to_string("/proc/net/route")
        .map(|t| parse_proc_net_route(&t))
        .unwrap_or_default()
}

/// Destinations of `/proc/net/route` (hex words, as the kernel prints them), except default
/// routes. Lines that do not parse are skipped.
pub fn parse_proc_net_route(text: &str) -> Vec<Ipv4Net> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let dst = u32::from_str_radix(f.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(f.get(7)?, 16).ok()?;
            // The kernel prints the network-order word as a native integer: its native bytes
            // are the address.
            let dst = Ipv4Addr::from(dst.to_ne_bytes());
            let len = u8::try_from(mask.count_ones()).ok()?;
            (len >= MIN_HOST_ROUTE_PREFIX)
                .then(|| Ipv4Net::new(dst, len).ok().map(|n| n.trunc()))?
        })
        .collect()
}

/// Host routes wider than this are ways out, not networks to stay clear of.
const MIN_HOST_ROUTE_PREFIX: u8 = 8;

pub fn overlaps4(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

pub fn overlaps6(a: Ipv6Net, b: Ipv6Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Parses an IPv4 CIDR, insisting that the host bits are zero (`172.30.0.0/16`, not
/// `172.30.0.1/16`), and that the subnet leaves room for a gateway and at least one endpoint.
pub fn parse_subnet4(s: &str) -> Result<Ipv4Net, String> {
    let net: Ipv4Net = s
        .parse()
        .map_err(|_| format!("invalid subnet {s:?}: expected IPv4 CIDR like 172.30.0.0/16"))?;
    if net.trunc() != net {
        return Err(format!("invalid subnet {s}: it should be {}", net.trunc()));
    }
    if net.prefix_len() > 29 {
        return Err(format!(
            "subnet {s} is too small: at most /29 (a gateway and a few endpoints)"
        ));
    }
    check_usable4(net)?;
    Ok(net)
}

/// IPv4 ranges no network may overlap: they mean something else on every host.
const RESERVED4: [(Ipv4Addr, u8, &str); 5] = [
    (Ipv4Addr::new(0, 0, 0, 0), 8, "\"this network\" (0.0.0.0/8)"),
    (Ipv4Addr::new(127, 0, 0, 0), 8, "loopback (127.0.0.0/8)"),
    (
        Ipv4Addr::new(169, 254, 0, 0),
        16,
        "link-local (169.254.0.0/16)",
    ),
    (Ipv4Addr::new(224, 0, 0, 0), 4, "multicast (224.0.0.0/4)"),
    (
        Ipv4Addr::new(240, 0, 0, 0),
        4,
        "reserved (240.0.0.0/4, broadcast included)",
    ),
];

/// IPv6 ranges no network may overlap.
const RESERVED6: [(Ipv6Addr, u8, &str); 5] = [
    (
        Ipv6Addr::UNSPECIFIED,
        127,
        "the unspecified or loopback address",
    ),
    (
        Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0),
        96,
        "IPv4-mapped (::ffff:0:0/96)",
    ),
    (
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0),
        10,
        "link-local (fe80::/10)",
    ),
    (
        Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0),
        8,
        "multicast (ff00::/8)",
    ),
    (
        Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0),
        10,
        "site-local (fec0::/10, deprecated)",
    ),
];

/// Refuses an IPv4 subnet that overlaps a special-purpose range (multicast, loopback,
/// link-local, "this network", reserved): its addresses cannot be a network's hosts.
pub fn check_usable4(net: Ipv4Net) -> Result<(), String> {
    for (addr, len, what) in RESERVED4 {
        if overlaps4(net, Ipv4Net::new_assert(addr, len)) {
            return Err(format!(
                "subnet {net} overlaps {what}: not usable for a network"
            ));
        }
    }
    Ok(())
}

/// Refuses an IPv6 subnet that overlaps a special-purpose range.
pub fn check_usable6(net: Ipv6Net) -> Result<(), String> {
    for (addr, len, what) in RESERVED6 {
        if overlaps6(net, Ipv6Net::new_assert(addr, len)) {
            return Err(format!(
                "subnet {net} overlaps {what}: not usable for a network"
            ));
        }
    }
    Ok(())
}

pub fn parse_subnet6(s: &str) -> Result<Ipv6Net, String> {
    let net: Ipv6Net = s
        .parse()
        .map_err(|_| format!("invalid subnet {s:?}: expected IPv6 CIDR like fd00:1::/64"))?;
    if net.trunc() != net {
        return Err(format!("invalid subnet {s}: it should be {}", net.trunc()));
    }
    if net.prefix_len() > 120 {
        return Err(format!("IPv6 subnet {s} is too small: at most /120"));
    }
    check_usable6(net)?;
    Ok(net)
}

/// Whether `ip` is a usable host address of `net` (not its network or broadcast address).
pub fn is_host4(net: Ipv4Net, ip: Ipv4Addr) -> bool {
    net.contains(&ip) && ip != net.network() && ip != net.broadcast()
}

pub fn is_host6(net: Ipv6Net, ip: Ipv6Addr) -> bool {
    net.contains(&ip) && ip != net.network()
}

/// The first free host address in `range` (which lies in `subnet`), skipping `used`.
pub fn allocate4(
    subnet: Ipv4Net,
    range: Option<Ipv4Net>,
    used: &HashSet<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    let range = range.unwrap_or(subnet);
    let (lo, hi) = (u32::from(range.network()), u32::from(range.broadcast()));
    // The first and last address of a range are skipped as well (unless the range is a /31 or
    // /32): `10.80.5.0` is a valid host in 10.80.0.0/16, but software that sees a `.0` address
    // often misbehaves, and nobody expects the first container of 10.80.5.0/24 to get it.
    let edge = |ip: u32| range.prefix_len() < 31 && (ip == lo || ip == hi);
    (lo..=hi)
        .filter(|ip| !edge(*ip))
        .map(Ipv4Addr::from)
        .find(|ip| is_host4(subnet, *ip) && !used.contains(ip))
}

/// The first free address of `subnet` counting up from `::2`, skipping `used`. Bounded: a
/// /64 is never walked further than 65 536 addresses.
pub fn allocate6(subnet: Ipv6Net, used: &HashSet<Ipv6Addr>) -> Option<Ipv6Addr> {
    let base = u128::from(subnet.network());
    let size = 1u128 << (128 - u32::from(subnet.prefix_len())).min(127);
    (1..size.min(65_536))
        .map(|i| Ipv6Addr::from(base + i))
        .find(|ip| !used.contains(ip))
}

/// A unique-local /64 (RFC 4193) derived from a network id, for `--ipv6` without a subnet.
pub fn ula_for(id: &str) -> Ipv6Net {
    let mut bytes = [0u8; 16];
    bytes[0] = 0xfd;
    for (i, pair) in id.as_bytes().chunks(2).take(7).enumerate() {
        let hex = std::str::from_utf8(pair).unwrap_or("00");
        bytes[1 + i] = u8::from_str_radix(hex, 16).unwrap_or(0);
    }
    // A /64: bytes 8.. are the interface part and stay zero. (Prefix bits 8..64: 7 bytes.)
    Ipv6Net::new(Ipv6Addr::from(bytes), 64).unwrap_or_else(|_| Ipv6Net::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("cidr")
    }

    #[test]
    fn automatic_subnets_skip_taken_ones() {
        assert_eq!(
            pick_subnet(&[net("172.17.0.0/16")]),
            Some(net("172.18.0.0/16"))
        );
        assert_eq!(
            pick_subnet(&[net("172.18.0.0/16"), net("172.19.5.0/24")]),
            Some(net("172.20.0.0/16"))
        );
        // A user network covering all of 172.16/12 pushes automatic picks to 192.168.
        assert_eq!(
            pick_subnet(&[net("172.16.0.0/12")]),
            Some(net("192.168.0.0/20"))
        );
    }

    #[test]
    fn host_routes_from_proc_net_route() {
        let text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                    eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                    eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                    tun0\t000012AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
                    tun0\t00000000\t00000000\t0001\t0\t0\t0\t00000080\t0\t0\t0\n\
                    tun0\t00000080\t00000000\t0001\t0\t0\t0\t00000080\t0\t0\t0\n\
                    garbage\n";
        if cfg!(target_endian = "little") {
            assert_eq!(
                parse_proc_net_route(text),
                vec![net("192.0.2.0/24"), net("172.18.0.0/16")],
                "the default route and the def1 halves are left out"
            );
        }
        // A VPN on 172.18/16: automatic subnets skip it.
        assert_eq!(
            pick_subnet(&[net("172.17.0.0/16"), net("172.18.0.0/16")]),
            Some(net("172.19.0.0/16"))
        );
    }

    #[test]
    fn subnet_parsing_is_strict() {
        assert!(parse_subnet4("10.1.0.0/16").is_ok());
        assert!(
            parse_subnet4("10.1.0.1/16")
                .unwrap_err()
                .contains("should be 10.1.0.0/16")
        );
        assert!(parse_subnet4("10.1.0.0/31").is_err());
        assert!(parse_subnet4("banana").is_err());
        assert!(parse_subnet4("10.1.0.0/33").is_err());
        assert!(parse_subnet6("fd00:1::/64").is_ok());
        assert!(parse_subnet6("fd00:1::1/64").is_err());
    }

    #[test]
    fn special_purpose_ranges_are_not_networks() {
        for bad in [
            "224.0.0.0/24",
            "239.1.0.0/16",
            "127.0.0.0/16",
            "0.0.0.0/16",
            "169.254.0.0/16",
            "240.0.0.0/8",
            "255.255.255.0/24",
            "224.0.0.0/3",
        ] {
            let e = parse_subnet4(bad).expect_err(bad);
            assert!(e.contains("not usable"), "{bad}: {e}");
        }
        for ok in [
            "10.0.0.0/8",
            "172.17.0.0/16",
            "100.64.0.0/10",
            "192.0.2.0/24",
        ] {
            assert!(parse_subnet4(ok).is_ok(), "{ok}");
        }
        for bad in [
            "ff02::/64",
            "fe80::/64",
            "::/120",
            "::ffff:10.0.0.0/120",
            "fec0::/64",
        ] {
            let e = parse_subnet6(bad).expect_err(bad);
            assert!(e.contains("not usable"), "{bad}: {e}");
        }
        for ok in ["fd00:1::/64", "2001:db8::/64", "64:ff9b::/96"] {
            assert!(parse_subnet6(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn overlap() {
        assert!(overlaps4(net("10.0.0.0/8"), net("10.2.0.0/16")));
        assert!(overlaps4(net("10.2.0.0/16"), net("10.0.0.0/8")));
        assert!(!overlaps4(net("10.2.0.0/16"), net("10.3.0.0/16")));
    }

    #[test]
    fn allocation_skips_gateway_used_and_network_address() {
        let subnet = net("10.9.0.0/29");
        let mut used: HashSet<_> = [Ipv4Addr::new(10, 9, 0, 1)].into();
        assert_eq!(
            allocate4(subnet, None, &used),
            Some(Ipv4Addr::new(10, 9, 0, 2))
        );
        used.extend((2..=6).map(|i| Ipv4Addr::new(10, 9, 0, i)));
        assert_eq!(allocate4(subnet, None, &used), None, ".7 is broadcast");
        let range = net("10.9.0.4/30");
        let used: HashSet<_> = [Ipv4Addr::new(10, 9, 0, 4)].into();
        assert_eq!(
            allocate4(subnet, Some(range), &used),
            Some(Ipv4Addr::new(10, 9, 0, 5))
        );
    }

    #[test]
    fn ipv6_allocation_and_ula() {
        let subnet: Ipv6Net = "fd00:1::/64".parse().expect("cidr");
        let used: HashSet<Ipv6Addr> = ["fd00:1::1".parse().expect("ip")].into();
        assert_eq!(allocate6(subnet, &used), "fd00:1::2".parse().ok());
        let ula = ula_for("0123456789abcdef");
        assert_eq!(ula.to_string(), "fd01:2345:6789:abcd::/64");
    }
}
