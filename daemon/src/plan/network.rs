//! `network create`: validating the request and choosing the subnets and gateways.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{DEFAULT_NETWORK, check_name};
use crate::api::NetworkCreate;
use crate::error::{Error, Result};
use crate::ipam;
use crate::state::{Network, PortSecurity, Store};

pub const DEFAULT_MTU: u32 = 1500;

/// The default `bridge` network (172.17.0.0/16, no names), as docker0.
pub fn default_bridge(id: String, created: String) -> Network {
    Network {
        id,
        name: DEFAULT_NETWORK.to_owned(),
        created,
        subnet: ipnet::Ipv4Net::new_assert(Ipv4Addr::new(172, 17, 0, 0), 16),
        gateway: Ipv4Addr::new(172, 17, 0, 1),
        ip_range: None,
        subnet6: None,
        gateway6: None,
        internal: false,
        mtu: DEFAULT_MTU,
        dns_names: false,
        dns: Vec::new(),
        port_security: PortSecurity::Strict,
        docker: None,
        overlay: None,
    }
}

/// What the daemon's own network namespace has, which new networks stay clear of.
#[derive(Debug, Clone, Default)]
pub struct HostFacts {
    /// Its IPv4 routes: automatic subnets avoid them (a LAN or VPN stays reachable).
    pub routes: Vec<ipnet::Ipv4Net>,
    /// Its own addresses: no subnet may contain one (the host would route its own address
    /// into the network).
    pub addrs: Vec<IpAddr>,
    /// The daemon runs with `--allow-host-loopback`: a network may also forward DNS to the
    /// host's loopback.
    pub loopback_open: bool,
    /// MTU of the link overlay networks' tunnels leave by (their own default is 50 less).
    pub underlay_mtu: u32,
}

/// VNIs of overlay networks start here (Docker's overlay driver counts from 4096 too).
pub const FIRST_VNI: u32 = 4097;

/// Validates a `network create` request against the current state and builds the network
/// with the given id and creation time.
/// A name a network may have: valid, and not one of a network mode or one the DNS server
/// answers itself.
pub fn check_network_name(name: &str) -> Result<()> {
    check_name("network", name)?;
    if matches!(name, "host" | "none") || name.starts_with("container:") {
        return Err(Error::forbidden(format!(
            "network name {name} is reserved for a network mode"
        )));
    }
    // Names the DNS server answers itself: a network of that name could never resolve its
    // containers (`web.localhost` is 127.0.0.1, RFC 6761).
    let lower = name.to_ascii_lowercase();
    if lower == "localhost"
        || lower.ends_with(".localhost")
        || matches!(lower.as_str(), "containers.internal" | "docker.internal")
    {
        return Err(Error::forbidden(format!(
            "network name {name} is reserved: the DNS server answers it itself"
        )));
    }
    Ok(())
}

pub fn plan_network(
    store: &Store,
    req: NetworkCreate,
    host: &HostFacts,
    id: String,
    created: String,
) -> Result<Network> {
    check_network_name(&req.name)?;
    if store
        .find_network(&req.name)
        .is_some_and(|n| n.name == req.name)
    {
        return Err(Error::conflict(format!(
            "network with name {} already exists",
            req.name
        )));
    }
    let (v4, v6) = subnets(&req.subnets)?;
    let (gw4, gw6) = gateways(&req.gateways)?;
    if v6.is_some() && !req.enable_ipv6 {
        return Err(Error::bad_request("an IPv6 --subnet needs --ipv6"));
    }
    if gw4.is_some() && v4.is_none() {
        return Err(Error::bad_request("--gateway needs --subnet"));
    }
    if gw6.is_some() && v6.is_none() {
        return Err(Error::bad_request(
            "an IPv6 --gateway needs an IPv6 --subnet",
        ));
    }
    // Automatic picks avoid other networks and whatever the host already routes (a LAN or VPN
    // on 172.18/16 would otherwise become unreachable from every container), as Docker does.
    let taken4: Vec<_> = store
        .networks
        .values()
        .map(|n| n.subnet)
        .chain(host.routes.iter().copied())
        .collect();
    let subnet = match v4 {
        Some(s) => {
            if let Some(other) = store
                .networks
                .values()
                .find(|n| ipam::overlaps4(n.subnet, s))
            {
                return Err(Error::conflict(format!(
                    "subnet {s} overlaps with network {} ({})",
                    other.name, other.subnet
                )));
            }
            s
        }
        None => ipam::pick_subnet(&taken4).ok_or_else(|| {
            Error::conflict("no free subnet left in the default pools; give one with --subnet")
        })?,
    };
    let gateway = match gw4 {
        Some(g) if ipam::is_host4(subnet, g) => g,
        Some(g) => {
            return Err(Error::bad_request(format!(
                "gateway {g} is not a host address of subnet {subnet}"
            )));
        }
        None => Ipv4Addr::from(u32::from(subnet.network()) + 1),
    };
    let ip_range = match &req.ip_range {
        None => None,
        Some(_) if v4.is_none() => return Err(Error::bad_request("--ip-range needs --subnet")),
        Some(r) => {
            let range: ipnet::Ipv4Net = r.parse().map_err(|_| {
                Error::bad_request(format!("invalid --ip-range {r:?}: expected IPv4 CIDR"))
            })?;
            if !subnet.contains(&range) {
                return Err(Error::bad_request(format!(
                    "ip-range {range} is not inside subnet {subnet}"
                )));
            }
            Some(range.trunc())
        }
    };
    let (subnet6, gateway6) = if req.enable_ipv6 {
        let s6 = v6.unwrap_or_else(|| ipam::ula_for(&id));
        if let Some(other) = store
            .networks
            .values()
            .find(|n| n.subnet6.is_some_and(|o| ipam::overlaps6(o, s6)))
        {
            return Err(Error::conflict(format!(
                "subnet {s6} overlaps with network {}",
                other.name
            )));
        }
        let g6 = match gw6 {
            Some(g) if ipam::is_host6(s6, g) => g,
            Some(g) => {
                return Err(Error::bad_request(format!(
                    "gateway {g} is not a host address of subnet {s6}"
                )));
            }
            None => Ipv6Addr::from(u128::from(s6.network()) + 1),
        };
        (Some(s6), Some(g6))
    } else {
        (None, None)
    };
    let own = |net: ipnet::IpNet| host.addrs.iter().find(|a| net.contains(*a)).copied();
    let subnets = std::iter::once(ipnet::IpNet::V4(subnet)).chain(subnet6.map(ipnet::IpNet::V6));
    for net in subnets {
        if let Some(a) = own(net) {
            return Err(Error::conflict(format!(
                "subnet {net} contains {a}, an address of this host"
            )));
        }
    }
    let overlay = match req.driver.as_deref() {
        None | Some("" | "vswitch" | "bridge") => None,
        Some("overlay") => {
            let used: std::collections::HashSet<u32> = store
                .networks
                .values()
                .filter_map(|n| n.overlay.as_ref().map(|o| o.vni))
                .collect();
            let vni = (FIRST_VNI..=vswitch_switch::vxlan::MAX_VNI)
                .find(|v| !used.contains(v))
                .ok_or_else(|| Error::conflict("no free VXLAN network identifier"))?;
            Some(crate::state::Overlay {
                vni,
                peers: Vec::new(),
            })
        }
        Some(d) => {
            return Err(Error::bad_request(format!(
                "unknown driver {d:?}: expected vswitch (the default) or overlay"
            )));
        }
    };
    let default_mtu = match overlay {
        Some(_) => host
            .underlay_mtu
            .saturating_sub(vswitch_switch::vxlan::OVERHEAD as u32),
        None => DEFAULT_MTU,
    };
    let mtu = req.mtu.unwrap_or(default_mtu);
    let min_mtu = if req.enable_ipv6 { 1280 } else { 576 };
    if !(min_mtu..=65_520).contains(&mtu) {
        return Err(Error::bad_request(format!(
            "invalid MTU {mtu}: expected {min_mtu} to 65520"
        )));
    }
    let dns = dns_servers(&req.dns_servers, req.internal, host.loopback_open)?;
    let port_security = options(&req.options)?;
    Ok(Network {
        id,
        name: req.name,
        created,
        subnet,
        gateway,
        ip_range,
        subnet6,
        gateway6,
        internal: req.internal,
        mtu,
        dns_names: true,
        dns,
        port_security,
        docker: None,
        overlay,
    })
}

/// The network's own upstream DNS servers: `IP` or `IP:PORT`, at most as many as the daemon
/// takes; an internal network forwards nothing, so it takes none. Queries are sent from the
/// daemon's namespace, so the host's loopback is a server only where containers may reach it
/// anyway (`--allow-host-loopback`); "any address", multicast and port 0 are never one.
fn dns_servers(
    given: &[String],
    internal: bool,
    loopback_open: bool,
) -> Result<Vec<std::net::SocketAddr>> {
    if !given.is_empty() && internal {
        return Err(Error::bad_request(
            "an internal network forwards no DNS: --dns needs a network with a way out",
        ));
    }
    if given.len() > vswitch_dns::upstream::MAX_UPSTREAMS {
        return Err(Error::bad_request(format!(
            "at most {} --dns servers",
            vswitch_dns::upstream::MAX_UPSTREAMS
        )));
    }
    let mut out = Vec::new();
    for s in given {
        let sa = vswitch_dns::upstream::parse_upstream(s).map_err(Error::bad_request)?;
        let ip = sa.ip().to_canonical();
        if ip.is_unspecified() || ip.is_multicast() || sa.port() == 0 {
            return Err(Error::bad_request(format!(
                "--dns {s}: not an address a DNS server can have"
            )));
        }
        if ip.is_loopback() && !loopback_open {
            return Err(Error::bad_request(format!(
                "--dns {s}: the host's loopback is closed to containers (the daemon runs \
                 without --allow-host-loopback)"
            )));
        }
        out.push(sa);
    }
    Ok(out)
}

/// The driver options of `network create -o KEY=VALUE`: `port-security=strict|off`.
fn options(given: &std::collections::BTreeMap<String, String>) -> Result<PortSecurity> {
    let mut port_security = PortSecurity::Strict;
    for (key, value) in given {
        match (key.as_str(), value.as_str()) {
            ("port-security", "strict") => port_security = PortSecurity::Strict,
            ("port-security", "off") => port_security = PortSecurity::Off,
            ("port-security", _) => {
                return Err(Error::bad_request(format!(
                    "invalid port-security {value:?}: expected strict or off"
                )));
            }
            _ => {
                return Err(Error::bad_request(format!(
                    "unknown network option {key:?} (known: port-security)"
                )));
            }
        }
    }
    Ok(port_security)
}

/// At most one IPv4 and one IPv6 subnet, told apart by their text.
fn subnets(given: &[String]) -> Result<(Option<ipnet::Ipv4Net>, Option<ipnet::Ipv6Net>)> {
    let (mut v4, mut v6) = (None, None);
    for s in given {
        if s.contains(':') {
            if v6
                .replace(ipam::parse_subnet6(s).map_err(Error::bad_request)?)
                .is_some()
            {
                return Err(Error::bad_request("at most one IPv6 --subnet"));
            }
        } else if v4
            .replace(ipam::parse_subnet4(s).map_err(Error::bad_request)?)
            .is_some()
        {
            return Err(Error::bad_request("at most one IPv4 --subnet"));
        }
    }
    Ok((v4, v6))
}

/// At most one gateway per address family.
fn gateways(given: &[String]) -> Result<(Option<Ipv4Addr>, Option<Ipv6Addr>)> {
    let (mut gw4, mut gw6) = (None, None);
    for g in given {
        match g.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) if gw4.is_none() => gw4 = Some(a),
            Ok(IpAddr::V6(a)) if gw6.is_none() => gw6 = Some(a),
            Ok(_) => {
                return Err(Error::bad_request(
                    "at most one --gateway per address family",
                ));
            }
            Err(_) => {
                return Err(Error::bad_request(format!("invalid gateway address {g:?}")));
            }
        }
    }
    Ok((gw4, gw6))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind::{self, BadRequest, Conflict, Forbidden};
    use crate::plan::HostFacts;

    fn store_with(nets: &[(&str, &str)]) -> Store {
        let mut store = Store::default();
        let bridge = default_bridge("b".repeat(64), String::new());
        store.networks.insert(bridge.id.clone(), bridge);
        for (i, (name, subnet)) in nets.iter().enumerate() {
            let req = NetworkCreate {
                name: (*name).to_owned(),
                subnets: vec![(*subnet).to_owned()],
                ..Default::default()
            };
            let n = plan_network(
                &store,
                req,
                &HostFacts::default(),
                format!("{i:064}"),
                String::new(),
            )
            .expect("fixture network");
            store.networks.insert(n.id.clone(), n);
        }
        store
    }

    fn req(name: &str) -> NetworkCreate {
        NetworkCreate {
            name: name.to_owned(),
            ..Default::default()
        }
    }

    fn plan(store: &Store, r: NetworkCreate) -> Result<Network> {
        plan_network(
            store,
            r,
            &HostFacts::default(),
            "a".repeat(64),
            "now".into(),
        )
    }

    #[test]
    fn bad_requests_get_their_status_and_change_nothing() {
        let store = store_with(&[("dev", "10.1.0.0/16")]);
        let with = |f: &dyn Fn(&mut NetworkCreate)| {
            let mut r = req("new");
            f(&mut r);
            r
        };
        let cases: Vec<(NetworkCreate, ErrorKind, &str)> = vec![
            (req("bad name"), BadRequest, "invalid network name"),
            (req("host"), Forbidden, "reserved"),
            (req("localhost"), Forbidden, "answers it itself"),
            (req("docker.internal"), Forbidden, "answers it itself"),
            (req("container:x"), BadRequest, "invalid network name"),
            (req("dev"), Conflict, "already exists"),
            (
                with(&|r| r.subnets = vec!["10.1.5.0/24".into()]),
                Conflict,
                "overlaps with network dev",
            ),
            (
                with(&|r| r.subnets = vec!["10.9.0.1/16".into()]),
                BadRequest,
                "should be 10.9.0.0/16",
            ),
            (
                with(&|r| r.subnets = vec!["10.9.0.0/16".into(), "10.8.0.0/16".into()]),
                BadRequest,
                "at most one IPv4",
            ),
            (
                with(&|r| r.gateways = vec!["10.9.0.1".into()]),
                BadRequest,
                "--gateway needs --subnet",
            ),
            (
                with(&|r| {
                    r.subnets = vec!["10.9.0.0/16".into()];
                    r.gateways = vec!["10.10.0.1".into()];
                }),
                BadRequest,
                "not a host address",
            ),
            (
                with(&|r| r.gateways = vec!["banana".into()]),
                BadRequest,
                "invalid gateway",
            ),
            (
                with(&|r| r.subnets = vec!["fd00::/64".into()]),
                BadRequest,
                "needs --ipv6",
            ),
            (
                with(&|r| r.ip_range = Some("10.9.1.0/24".into())),
                BadRequest,
                "--ip-range needs --subnet",
            ),
            (
                with(&|r| {
                    r.subnets = vec!["10.9.0.0/16".into()];
                    r.ip_range = Some("10.10.1.0/24".into());
                }),
                BadRequest,
                "not inside subnet",
            ),
            (with(&|r| r.mtu = Some(100)), BadRequest, "invalid MTU"),
            (
                with(&|r| r.options = [("port-security".into(), "loose".into())].into()),
                BadRequest,
                "invalid port-security",
            ),
            (
                with(&|r| r.options = [("vlan".into(), "7".into())].into()),
                BadRequest,
                "unknown network option",
            ),
            (
                with(&|r| r.dns_servers = vec!["dns.example".into()]),
                BadRequest,
                "invalid DNS upstream",
            ),
            (
                with(&|r| r.dns_servers = vec!["192.0.2.1".into(); 4]),
                BadRequest,
                "at most 3",
            ),
            (
                with(&|r| {
                    r.internal = true;
                    r.dns_servers = vec!["192.0.2.1".into()];
                }),
                BadRequest,
                "internal network forwards no DNS",
            ),
            (
                with(&|r| r.dns_servers = vec!["127.0.0.1:5353".into()]),
                BadRequest,
                "loopback is closed",
            ),
            (
                with(&|r| r.dns_servers = vec!["[::ffff:127.0.0.1]:53".into()]),
                BadRequest,
                "loopback is closed",
            ),
            (
                with(&|r| r.dns_servers = vec!["0.0.0.0".into()]),
                BadRequest,
                "not an address",
            ),
            (
                with(&|r| r.dns_servers = vec!["224.0.0.251:5353".into()]),
                BadRequest,
                "not an address",
            ),
            (
                with(&|r| r.dns_servers = vec!["192.0.2.1:0".into()]),
                BadRequest,
                "not an address",
            ),
            (
                with(&|r| {
                    r.enable_ipv6 = true;
                    r.mtu = Some(1000);
                }),
                BadRequest,
                "expected 1280",
            ),
        ];
        for (r, kind, text) in cases {
            let what = format!("{r:?}");
            let e = plan(&store, r).expect_err(&what);
            assert_eq!(e.kind(), kind, "{what}: {e}");
            assert!(e.message().contains(text), "{what}: {e}");
        }
    }

    #[test]
    fn automatic_choices() {
        let store = store_with(&[("a", "172.18.0.0/16")]);
        let n = plan(&store, req("new")).expect("plan");
        assert_eq!(n.subnet.to_string(), "172.19.0.0/16", "next free /16");
        assert_eq!(n.gateway, Ipv4Addr::new(172, 19, 0, 1));
        assert_eq!((n.mtu, n.dns_names, n.internal), (1500, true, false));
        assert_eq!((n.id.len(), n.created.as_str()), (64, "now"));
        assert_eq!(n.subnet6, None);
        // Routes of the host push automatic picks further.
        let host = HostFacts {
            routes: vec!["172.19.0.0/16".parse().expect("net")],
            addrs: vec!["10.0.2.15".parse().expect("ip")],
            loopback_open: true,
            underlay_mtu: 9000,
        };
        // With the host's loopback open to containers, a network may use a server there.
        let mut r = req("local");
        r.dns_servers = vec!["127.0.0.1:5353".into()];
        assert!(plan_network(&store, r, &host, "c".into(), String::new()).is_ok());
        let n = plan_network(&store, req("new"), &host, "a".into(), String::new()).expect("plan");
        assert_eq!(n.subnet.to_string(), "172.20.0.0/16");
        // A subnet with one of the host's addresses in it is refused.
        let mut r = req("lan");
        r.subnets = vec!["10.0.2.0/24".into()];
        let e = plan_network(&store, r, &host, "b".into(), String::new()).expect_err("own address");
        assert_eq!(e.kind(), crate::error::ErrorKind::Conflict);
        assert!(
            e.message().contains("10.0.2.15, an address of this host"),
            "{e}"
        );
        // An overlay takes the next free VNI, and the underlay's MTU less VXLAN's 50 bytes.
        let mut r = req("over");
        r.driver = Some("overlay".into());
        let n = plan_network(&store, r, &host, "d".into(), String::new()).expect("overlay");
        assert_eq!(n.overlay.as_ref().map(|o| o.vni), Some(FIRST_VNI));
        assert_eq!(n.mtu, 8950);
        let mut r = req("odd");
        r.driver = Some("macvlan".into());
        let e = plan_network(&store, r, &host, "e".into(), String::new()).expect_err("driver");
        assert!(e.message().contains("unknown driver"), "{e}");
        // IPv6 without a subnet gets a ULA /64 from the id, gateway ::1.
        let mut r = req("six");
        r.enable_ipv6 = true;
        let n = plan(&store, r).expect("plan");
        let s6 = n.subnet6.expect("v6");
        assert_eq!(s6.prefix_len(), 64);
        assert_eq!(s6.network().segments()[0] >> 8, 0xfd);
        assert_eq!(
            n.gateway6,
            Some(Ipv6Addr::from(u128::from(s6.network()) + 1))
        );
    }

    #[test]
    fn given_values_are_kept() {
        let store = store_with(&[]);
        let r = NetworkCreate {
            name: "lab".into(),
            subnets: vec!["10.80.0.0/16".into(), "fd00:80::/64".into()],
            gateways: vec!["10.80.0.254".into(), "fd00:80::fe".into()],
            ip_range: Some("10.80.5.7/24".into()),
            internal: true,
            mtu: Some(9000),
            enable_ipv6: true,
            dns_servers: vec![],
            options: [("port-security".to_owned(), "off".to_owned())].into(),
            driver: None,
        };
        let n = plan(&store, r).expect("plan");
        assert_eq!(n.gateway, Ipv4Addr::new(10, 80, 0, 254));
        assert_eq!(
            n.ip_range.map(|r| r.to_string()).as_deref(),
            Some("10.80.5.0/24")
        );
        assert_eq!(
            n.gateway6.map(|g| g.to_string()).as_deref(),
            Some("fd00:80::fe")
        );
        assert!(n.internal);
        assert_eq!(n.mtu, 9000);
        assert_eq!(n.port_security, PortSecurity::Off);
        // A network's own upstreams, port 53 unless given.
        let mut r = req("out");
        r.dns_servers = vec!["192.0.2.53".into(), "[2001:db8::53]:5353".into()];
        let n = plan(&store, r).expect("plan");
        let dns: Vec<String> = n.dns.iter().map(ToString::to_string).collect();
        assert_eq!(dns, ["192.0.2.53:53", "[2001:db8::53]:5353"]);
    }
}
