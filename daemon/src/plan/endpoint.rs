//! `attach`: validating the request and choosing the endpoint's name, interface, addresses,
//! MAC, route metric and published ports.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use vswitch_nat::PortMapping;
use vswitch_netdev::ns::NsId;
use vswitch_switch::MacAddr;

use super::{check_aliases_allowed, check_name};
use crate::api::{AttachRequest, Target};
use crate::error::{Error, Result};
use crate::ipam;
use crate::state::{Endpoint, Network, Store};

/// Metric of the default route of a namespace's first network (podman/netavark use the same).
pub const FIRST_ROUTE_METRIC: u32 = 100;

/// Validates an attach of namespace `ns` to `net` and plans the endpoint, with the given ids.
/// Its ports are planned separately ([`plan_ports`]) and bound before it is made.
pub fn plan_endpoint(
    store: &Store,
    net: &Network,
    req: &AttachRequest,
    ns: NsId,
    (id, endpoint_id): (String, String),
) -> Result<Endpoint> {
    if let Some(e) = store.endpoints_of(&net.id).find(|e| e.ns == ns) {
        return Err(Error::conflict(format!(
            "{} is already attached to network {} as {}",
            req.target, net.name, e.name
        )));
    }
    let name = match (&req.name, &req.target) {
        (Some(n), _) => n.clone(),
        (None, Target::Name(n)) => n.clone(),
        (None, _) => store
            .endpoints_in(ns)
            .next()
            .map(|e| e.name.clone())
            .unwrap_or_else(|| id.chars().take(12).collect()),
    };
    check_name("endpoint", &name)?;
    if store.endpoints_of(&net.id).any(|e| e.name == name) {
        return Err(Error::conflict(format!(
            "endpoint name {name} is already in use on network {}",
            net.name
        )));
    }
    if store
        .endpoints
        .values()
        .any(|e| e.name == name && e.ns != ns)
    {
        return Err(Error::conflict(format!(
            "name {name} is already used by another namespace"
        )));
    }
    for alias in &req.aliases {
        check_name("alias", alias)?;
    }
    check_aliases_allowed(net, &req.aliases)?;
    let ifname = ifname(store, ns, req.ifname.as_deref())?;
    let ipv4 = ipv4(store, net, req.ipv4_address.as_deref())?;
    let ipv6 = ipv6(store, net, req.ipv6_address.as_deref())?;
    let mac = match &req.mac_address {
        Some(s) => {
            let mac: MacAddr = s
                .parse()
                .map_err(|e: vswitch_switch::ParseMacError| Error::bad_request(e.to_string()))?;
            if mac.is_multicast() || mac.is_zero() {
                return Err(Error::bad_request(format!(
                    "MAC address {mac} is not a unicast address"
                )));
            }
            mac
        }
        None => MacAddr::from_ipv4(ipv4),
    };
    let held = store.held.get(&net.id);
    if mac == net.gateway_mac()
        || store.endpoints_of(&net.id).any(|e| e.mac == mac)
        || held.is_some_and(|h| h.macs.contains(&mac.0))
    {
        return Err(Error::conflict(format!(
            "MAC address {mac} is already in use on network {}",
            net.name
        )));
    }
    Ok(Endpoint {
        id,
        endpoint_id,
        name,
        network_id: net.id.clone(),
        target: req.target.clone(),
        ns,
        ifname,
        mac,
        ipv4,
        ipv6,
        aliases: req.aliases.clone(),
        wrote_resolv_conf: false,
        ports: Vec::new(),
        route_metric: (!net.internal).then(|| route_metric_for(store, ns)),
        cni: None,
        docker: None,
    })
}

/// The interface name: the one given (checked), or the first `ethN` no endpoint of ours uses
/// in that namespace.
fn ifname(store: &Store, ns: NsId, given: Option<&str>) -> Result<String> {
    let taken = |name: &str| store.endpoints_in(ns).any(|e| e.ifname == name);
    let Some(i) = given else {
        return Ok((0..)
            .map(|n| format!("eth{n}"))
            .find(|cand| !taken(cand))
            .unwrap_or_else(|| "eth0".to_owned()));
    };
    if i.is_empty()
        || i.len() > 15
        || i == "."
        || i == ".."
        || i.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(Error::bad_request(format!(
            "invalid interface name {i:?}: 1 to 15 characters, no '/', ':' or spaces"
        )));
    }
    if taken(i) {
        return Err(Error::conflict(format!(
            "interface {i} is already used by another vswitch endpoint in that namespace"
        )));
    }
    Ok(i.to_owned())
}

/// Addresses Docker holds on `net` (see [`Store::held`]).
fn held_addrs<'a>(store: &'a Store, net: &Network) -> impl Iterator<Item = std::net::IpAddr> + 'a {
    store
        .held
        .get(&net.id)
        .into_iter()
        .flat_map(|h| h.addrs.iter().copied())
}

fn ipv4(store: &Store, net: &Network, given: Option<&str>) -> Result<Ipv4Addr> {
    let used: HashSet<Ipv4Addr> = store
        .endpoints_of(&net.id)
        .map(|e| e.ipv4)
        .chain([net.gateway])
        .chain(held_addrs(store, net).filter_map(|a| match a {
            std::net::IpAddr::V4(a) => Some(a),
            std::net::IpAddr::V6(_) => None,
        }))
        .collect();
    let Some(s) = given else {
        return ipam::allocate4(net.subnet, net.ip_range, &used).ok_or_else(|| {
            Error::conflict(format!("no free address left on network {}", net.name))
        });
    };
    let ip: Ipv4Addr = s
        .parse()
        .map_err(|_| Error::bad_request(format!("invalid IPv4 address {s:?}")))?;
    if !ipam::is_host4(net.subnet, ip) {
        return Err(Error::bad_request(format!(
            "address {ip} is not a host address of network {} ({})",
            net.name, net.subnet
        )));
    }
    if used.contains(&ip) {
        return Err(Error::conflict(format!(
            "address {ip} is already in use on network {}",
            net.name
        )));
    }
    Ok(ip)
}

fn ipv6(store: &Store, net: &Network, given: Option<&str>) -> Result<Option<Ipv6Addr>> {
    let Some(s6) = net.subnet6 else {
        return match given {
            Some(_) => Err(Error::bad_request(format!(
                "network {} has no IPv6 subnet",
                net.name
            ))),
            None => Ok(None),
        };
    };
    let used: HashSet<Ipv6Addr> = store
        .endpoints_of(&net.id)
        .filter_map(|e| e.ipv6)
        .chain(net.gateway6)
        .chain(held_addrs(store, net).filter_map(|a| match a {
            std::net::IpAddr::V6(a) => Some(a),
            std::net::IpAddr::V4(_) => None,
        }))
        .collect();
    let Some(s) = given else {
        return ipam::allocate6(s6, &used)
            .map(Some)
            .ok_or_else(|| Error::conflict("no free IPv6 address left"));
    };
    let ip: Ipv6Addr = s
        .parse()
        .map_err(|_| Error::bad_request(format!("invalid IPv6 address {s:?}")))?;
    if !ipam::is_host6(s6, ip) {
        return Err(Error::bad_request(format!(
            "address {ip} is not inside {s6}"
        )));
    }
    if used.contains(&ip) {
        return Err(Error::conflict(format!("address {ip} is already in use")));
    }
    Ok(Some(ip))
}

/// The metric for a new endpoint's default routes in namespace `ns`: above every other
/// endpoint's there, so that joining a network never takes the way out from one that was
/// there first; [`FIRST_ROUTE_METRIC`] for the first.
pub fn route_metric_for(store: &Store, ns: NsId) -> u32 {
    store
        .endpoints_in(ns)
        .filter_map(|e| e.route_metric)
        .max()
        .map_or(FIRST_ROUTE_METRIC, |m| m.saturating_add(1))
}

/// Parses and checks `-p` specs against the network.
pub fn plan_ports(net: &Network, specs: &[String]) -> Result<Vec<PortMapping>> {
    let mut out = Vec::new();
    for spec in specs {
        out.extend(vswitch_nat::parse_publish(spec).map_err(Error::bad_request)?);
    }
    if !out.is_empty() && net.internal {
        return Err(Error::bad_request(format!(
            "network {} is internal: it cannot publish ports",
            net.name
        )));
    }
    let mut seen = HashSet::new();
    for m in out.iter().filter(|m| m.host_port != 0) {
        if !seen.insert((m.host_ip, m.host_port, m.proto)) {
            return Err(Error::bad_request(format!(
                "host port {}/{} is given twice",
                m.host_port, m.proto
            )));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::NetworkCreate;
    use crate::error::ErrorKind::{self, BadRequest, Conflict};
    use crate::plan::{HostFacts, default_bridge, plan_network};

    const NS_A: NsId = NsId { dev: 4, ino: 1 };
    const NS_B: NsId = NsId { dev: 4, ino: 2 };

    /// A store with the bridge, `web` (10.5.0.0/24, IPv6) and `lab` (internal), and endpoint
    /// `a` of namespace A on web.
    fn fixture() -> (Store, Network, Network) {
        let mut store = Store::default();
        let bridge = default_bridge("b".repeat(64), String::new());
        store.networks.insert(bridge.id.clone(), bridge);
        let web = plan_network(
            &store,
            NetworkCreate {
                name: "web".into(),
                subnets: vec!["10.5.0.0/24".into(), "fd00:5::/64".into()],
                enable_ipv6: true,
                ..Default::default()
            },
            &HostFacts::default(),
            "1".repeat(64),
            String::new(),
        )
        .expect("web");
        store.networks.insert(web.id.clone(), web.clone());
        let lab = plan_network(
            &store,
            NetworkCreate {
                name: "lab".into(),
                internal: true,
                ..Default::default()
            },
            &HostFacts::default(),
            "2".repeat(64),
            String::new(),
        )
        .expect("lab");
        store.networks.insert(lab.id.clone(), lab.clone());
        let a = plan_endpoint(
            &store,
            &web,
            &attach(Target::Name("a".into())),
            NS_A,
            ids(1),
        )
        .expect("a");
        store.endpoints.insert(a.id.clone(), a);
        (store, web, lab)
    }

    fn attach(target: Target) -> AttachRequest {
        AttachRequest {
            target,
            name: None,
            ipv4_address: None,
            ipv6_address: None,
            aliases: vec![],
            mac_address: None,
            ifname: None,
            ports: vec![],
            force: false,
        }
    }

    fn ids(n: u8) -> (String, String) {
        (format!("{n:064}"), format!("{:064}", u32::from(n) + 100))
    }

    #[test]
    fn first_endpoint_gets_the_first_address_and_dockers_mac() {
        let (store, web, lab) = fixture();
        let a = store.endpoints.values().next().expect("a");
        assert_eq!(a.name, "a");
        assert_eq!(a.ipv4, Ipv4Addr::new(10, 5, 0, 2), "the gateway has .1");
        assert_eq!(a.ipv6.map(|i| i.to_string()).as_deref(), Some("fd00:5::2"));
        assert_eq!(a.mac.to_string(), "02:42:0a:05:00:02");
        assert_eq!((a.ifname.as_str(), a.route_metric), ("eth0", Some(100)));
        // Namespace A joins lab too: eth1, no default route (internal), same name.
        let mut store = store;
        let l = plan_endpoint(&store, &lab, &attach(Target::Pid(7)), NS_A, ids(2)).expect("lab");
        assert_eq!((l.name.as_str(), l.ifname.as_str()), ("a", "eth1"));
        assert_eq!(l.route_metric, None);
        store.endpoints.insert(l.id.clone(), l);
        // A third network would get metric 101 (the highest is 100).
        assert_eq!(route_metric_for(&store, NS_A), 101);
        assert_eq!(route_metric_for(&store, NS_B), FIRST_ROUTE_METRIC);
        // Without a name or netns name, a new namespace is named after its id.
        let b = plan_endpoint(&store, &web, &attach(Target::Pid(8)), NS_B, ids(3)).expect("b");
        assert_eq!(b.name, "000000000000");
        assert_eq!(b.ipv4, Ipv4Addr::new(10, 5, 0, 3));
    }

    #[test]
    fn attach_requests_that_clash_or_are_invalid_are_refused() {
        let (store, web, lab) = fixture();
        let with = |f: &dyn Fn(&mut AttachRequest)| {
            let mut r = attach(Target::Name("b".into()));
            f(&mut r);
            r
        };
        let cases: Vec<(AttachRequest, NsId, &Network, ErrorKind, &str)> = vec![
            (
                attach(Target::Pid(1)),
                NS_A,
                &web,
                Conflict,
                "already attached",
            ),
            (
                attach(Target::Name("a".into())),
                NS_B,
                &web,
                Conflict,
                "already in use",
            ),
            (
                attach(Target::Name("a".into())),
                NS_B,
                &lab,
                Conflict,
                "another namespace",
            ),
            (
                with(&|r| r.name = Some("-x".into())),
                NS_B,
                &web,
                BadRequest,
                "invalid endpoint",
            ),
            (
                with(&|r| r.aliases = vec!["a b".into()]),
                NS_B,
                &web,
                BadRequest,
                "invalid alias",
            ),
            (
                with(&|r| r.ipv4_address = Some("10.5.0.2".into())),
                NS_B,
                &web,
                Conflict,
                "in use",
            ),
            (
                with(&|r| r.ipv4_address = Some("10.5.0.1".into())),
                NS_B,
                &web,
                Conflict,
                "in use",
            ),
            (
                with(&|r| r.ipv4_address = Some("10.6.0.2".into())),
                NS_B,
                &web,
                BadRequest,
                "not a host",
            ),
            (
                with(&|r| r.ipv4_address = Some("10.5.0.255".into())),
                NS_B,
                &web,
                BadRequest,
                "not a host",
            ),
            (
                with(&|r| r.ipv4_address = Some("x".into())),
                NS_B,
                &web,
                BadRequest,
                "invalid IPv4",
            ),
            (
                with(&|r| r.ipv6_address = Some("fd00:5::2".into())),
                NS_B,
                &web,
                Conflict,
                "in use",
            ),
            (
                with(&|r| r.ipv6_address = Some("fd00:6::2".into())),
                NS_B,
                &web,
                BadRequest,
                "not inside",
            ),
            (
                with(&|r| r.ipv6_address = Some("fd00:6::2".into())),
                NS_B,
                &lab,
                BadRequest,
                "no IPv6",
            ),
            (
                with(&|r| r.mac_address = Some("02:42:0a:05:00:02".into())),
                NS_B,
                &web,
                Conflict,
                "MAC",
            ),
            (
                with(&|r| r.mac_address = Some("02:42:0a:05:00:01".into())),
                NS_B,
                &web,
                Conflict,
                "MAC",
            ),
            (
                with(&|r| r.mac_address = Some("01:00:5e:00:00:01".into())),
                NS_B,
                &web,
                BadRequest,
                "unicast",
            ),
            (
                with(&|r| r.mac_address = Some("zz".into())),
                NS_B,
                &web,
                BadRequest,
                "MAC",
            ),
            (
                with(&|r| r.ifname = Some("a/b".into())),
                NS_B,
                &web,
                BadRequest,
                "interface name",
            ),
            (
                with(&|r| r.ifname = Some("x".repeat(16))),
                NS_B,
                &web,
                BadRequest,
                "interface name",
            ),
            (
                with(&|r| r.ifname = Some("eth0".into())),
                NS_A,
                &lab,
                Conflict,
                "interface eth0",
            ),
        ];
        for (r, ns, net, kind, text) in cases {
            let what = format!("{r:?} on {}", net.name);
            let e = plan_endpoint(&store, net, &r, ns, ids(9)).expect_err(&what);
            assert_eq!(e.kind(), kind, "{what}: {e}");
            assert!(e.message().contains(text), "{what}: {e}");
        }
        // The bridge resolves no names, so it takes no aliases.
        let bridge = store.find_network("bridge").expect("bridge").clone();
        let e = plan_endpoint(
            &store,
            &bridge,
            &with(&|r| r.aliases = vec!["x".into()]),
            NS_B,
            ids(9),
        )
        .expect_err("alias on bridge");
        assert!(e.message().contains("user-defined network"), "{e}");
    }

    #[test]
    fn published_ports_are_checked_against_the_network() {
        let (_, web, lab) = fixture();
        let specs = |s: &[&str]| s.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        let ports = plan_ports(&web, &specs(&["8081:8080", "127.0.0.1:53:53/udp"])).expect("ok");
        assert_eq!(ports.len(), 2);
        let e = plan_ports(&lab, &specs(&["8081:8080"])).expect_err("internal");
        assert!(e.message().contains("internal"), "{e}");
        let e = plan_ports(&web, &specs(&["8081:80", "8081:81"])).expect_err("twice");
        assert!(e.message().contains("given twice"), "{e}");
        assert!(plan_ports(&web, &specs(&["8081:80", "8081:81/udp"])).is_ok());
        let e = plan_ports(&web, &specs(&["x:80"])).expect_err("bad spec");
        assert_eq!(e.status(), 400);
    }
}
