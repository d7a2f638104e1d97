//! Where containers may go through NAT: a pure decision per new flow.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::Proto;

/// Where containers may go through NAT. The daemon keeps one current and shares it with the
/// datapaths and dial tasks, which consult it once per new flow (never per packet).
///
/// - The gateway's own address means "the host": only the published ports are reachable there
///   (that is hairpin), and a connection reaches exactly the mapping it names, as a client on
///   the host would: a port published on all addresses through the loopback, one published on
///   a host address through that address, one published on the loopback not at all (as with
///   Docker). Unless the daemon runs with `--allow-host-loopback`, which opens every service
///   listening on the host's loopback. Safe by default: a container cannot reach a database or
///   admin socket bound to 127.0.0.1 on the host, not even through a published port number.
/// - Addresses inside any vswitch network are refused: networks stay isolated even through
///   NAT, and such traffic never leaks to a LAN that happens to use the same range.
/// - Everything else is dialled from the daemon's namespace.
#[derive(Debug, Default)]
pub struct Policy {
    pub subnets: Vec<ipnet::IpNet>,
    /// The published ports: the host addresses each is bound on (`None`: all of them).
    pub published: HashMap<(Proto, u16), Vec<Option<IpAddr>>>,
    pub host_loopback: bool,
    /// VXLAN endpoints that trust this host's address (overlay peers, on the VXLAN port): no
    /// container's UDP goes there, or it would speak for the host.
    pub vteps: std::collections::HashSet<SocketAddr>,
}

impl Policy {
    /// The host address to dial for a container's connection to `dst`, or `None` if refused.
    /// An IPv4 address written as IPv6 (`::ffff:127.0.0.1`) is judged as the IPv4 address it
    /// is: a dual-stack host socket would reach that one.
    pub fn outbound_target(
        &self,
        proto: Proto,
        dst: SocketAddr,
        gateway: &[IpAddr],
    ) -> Option<SocketAddr> {
        let ip = dst.ip().to_canonical();
        if proto == Proto::Udp && self.vteps.contains(&SocketAddr::new(ip, dst.port())) {
            return None;
        }
        if gateway.contains(&ip) {
            let lo: IpAddr = match ip {
                IpAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
                IpAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
            };
            if self.host_loopback {
                return Some(SocketAddr::new(lo, dst.port()));
            }
            let bound = self.published.get(&(proto, dst.port()))?;
            // All addresses: the loopback reaches that listener. A host address (not a
            // loopback one) reaches its own. A mapping only on the loopback is the host's.
            let host = bound.iter().find_map(|b| match b {
                None => Some(lo),
                Some(h) if !h.to_canonical().is_loopback() => Some(*h),
                Some(_) => None,
            })?;
            return Some(SocketAddr::new(host, dst.port()));
        }
        if !self.may_reach(ip) {
            return None;
        }
        Some(dst)
    }

    /// Whether a container may reach `ip` through NAT at all (ping included): not the host's
    /// loopback, not "any address", not a vswitch network, not an IPv6 link-local address (a
    /// link's own, with no meaning on the host's links). (The gateway's own addresses are the
    /// gateway's: see [`Policy::outbound_target`].)
    pub fn may_reach(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let link_local = matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local());
        !(self.is_network(ip) || ip.is_loopback() || ip.is_unspecified() || link_local)
    }

    /// Whether `ip` lies inside a vswitch network (isolated: never reached through NAT).
    pub fn is_network(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.subnets.iter().any(|n| n.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy() {
        let gw: Vec<IpAddr> = vec!["10.1.0.1".parse().expect("ip")];
        let mut p = Policy {
            subnets: vec![
                "10.1.0.0/24".parse().expect("net"),
                "10.2.0.0/24".parse().expect("net"),
            ],
            ..Default::default()
        };
        p.published.insert((Proto::Tcp, 8081), vec![None]);
        let sa = |s: &str| s.parse::<SocketAddr>().expect("sa");
        p.vteps.insert(sa("192.0.2.2:4789"));
        assert_eq!(
            p.outbound_target(Proto::Udp, sa("192.0.2.2:4789"), &gw),
            None,
            "a VTEP that trusts the host"
        );
        assert_eq!(
            p.outbound_target(Proto::Udp, sa("192.0.2.2:4790"), &gw),
            Some(sa("192.0.2.2:4790"))
        );
        assert_eq!(
            p.outbound_target(Proto::Tcp, sa("10.1.0.1:8081"), &gw),
            Some(sa("127.0.0.1:8081"))
        );
        assert_eq!(
            p.outbound_target(Proto::Udp, sa("10.1.0.1:8081"), &gw),
            None,
            "UDP 8081 not published"
        );
        assert_eq!(
            p.outbound_target(Proto::Tcp, sa("10.1.0.1:22"), &gw),
            None,
            "host loopback closed"
        );
        assert_eq!(
            p.outbound_target(Proto::Tcp, sa("10.2.0.5:80"), &gw),
            None,
            "other network"
        );
        assert_eq!(p.outbound_target(Proto::Tcp, sa("127.0.0.1:80"), &gw), None);
        assert_eq!(
            p.outbound_target(Proto::Tcp, sa("192.0.2.2:80"), &gw),
            Some(sa("192.0.2.2:80"))
        );
        p.host_loopback = true;
        assert_eq!(
            p.outbound_target(Proto::Tcp, sa("10.1.0.1:22"), &gw),
            Some(sa("127.0.0.1:22"))
        );
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert!(p.may_reach(ip("2001:db8::2")));
        assert!(!p.may_reach(ip("fe80::1")), "link-local is the link's");
    }

    /// A port published on one host address is reached at that address, not on the loopback
    /// (where a host service of the same number may listen); one published only on the
    /// loopback is not reached at all.
    #[test]
    fn a_connection_to_the_gateway_reaches_exactly_the_mapping_it_names() {
        let gw: Vec<IpAddr> = vec!["10.1.0.1".parse().expect("ip")];
        let mut p = Policy::default();
        let sa = |s: &str| s.parse::<SocketAddr>().expect("sa");
        p.published.insert(
            (Proto::Tcp, 9090),
            vec![Some("192.0.2.5".parse().expect("ip"))],
        );
        p.published.insert(
            (Proto::Tcp, 9091),
            vec![Some("127.0.0.1".parse().expect("ip"))],
        );
        p.published.insert(
            (Proto::Udp, 9092),
            vec![Some("127.0.0.1".parse().expect("ip")), None],
        );
        assert_eq!(
            p.outbound_target(Proto::Tcp, sa("10.1.0.1:9090"), &gw),
            Some(sa("192.0.2.5:9090"))
        );
        assert_eq!(
            p.outbound_target(Proto::Tcp, sa("10.1.0.1:9091"), &gw),
            None
        );
        assert_eq!(
            p.outbound_target(Proto::Udp, sa("10.1.0.1:9092"), &gw),
            Some(sa("127.0.0.1:9092"))
        );
    }

    /// `::ffff:a.b.c.d` is a.b.c.d to a dual-stack socket: it gets no further than a.b.c.d.
    #[test]
    fn ipv4_addresses_written_as_ipv6_get_no_further() {
        let gw: Vec<IpAddr> = vec!["10.1.0.1".parse().expect("ip")];
        let p = Policy {
            subnets: vec!["10.2.0.0/24".parse().expect("net")],
            ..Default::default()
        };
        let sa = |s: &str| s.parse::<SocketAddr>().expect("sa");
        for refused in [
            "[::ffff:127.0.0.1]:22",
            "[::ffff:0.0.0.0]:22",
            "[::ffff:10.2.0.5]:80",
            "[::ffff:10.1.0.1]:22",
            "[::]:22",
            "[::1]:22",
        ] {
            assert_eq!(
                p.outbound_target(Proto::Tcp, sa(refused), &gw),
                None,
                "{refused}"
            );
            assert_eq!(
                p.outbound_target(Proto::Udp, sa(refused), &gw),
                None,
                "{refused}"
            );
        }
        assert!(!p.may_reach("::ffff:127.0.0.1".parse().expect("ip")));
        assert!(!p.may_reach("127.0.0.1".parse().expect("ip")));
        assert!(!p.may_reach("10.2.0.9".parse().expect("ip")));
        assert!(p.may_reach("::ffff:192.0.2.1".parse().expect("ip")));
        assert_eq!(
            p.outbound_target(Proto::Tcp, sa("[::ffff:192.0.2.1]:80"), &gw),
            Some(sa("[::ffff:192.0.2.1]:80"))
        );
    }
}
