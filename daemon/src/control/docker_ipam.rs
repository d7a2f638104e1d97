//! Docker's address pools through the plugin (`crate::docker`): the `IpamDriver` calls.
//!
//! Docker asks for a pool and its gateway before it creates the network, and for each address
//! before it creates the endpoint. A pool id names its subnet (`10.99.0.0/24` or
//! `10.99.0.0/24 10.99.0.128/25` with an `--ip-range`), so it means the same after a restart
//! of either daemon; addresses come from the network's own IPAM once the network exists, with
//! the ones Docker holds but has not yet made endpoints of kept aside (`Store::held`, which
//! vswitch's own attach respects too).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};

use super::docker_ep::Pending;
use super::networks::host_facts;
use super::{Daemon, Inner, ids};
use crate::docker::wire::{self, AddressReply, PoolReply};
use crate::error::{Error, Result};
use crate::ipam;
use crate::state::Store;

/// What exists only between Docker's calls.
#[derive(Debug, Default)]
pub struct DockerState {
    /// Pools requested and not yet released, by id.
    pub(super) pools: HashMap<String, Pool>,
    /// Addresses given to Docker that no endpoint holds yet, by pool id.
    pub(super) reserved: HashMap<String, HashSet<IpAddr>>,
    /// Endpoints created and not joined (or left and not deleted), by Docker's endpoint id.
    pub(super) pending: HashMap<String, Pending>,
}

/// Bounds on what Docker's calls may keep in memory (a misbehaving engine must not grow the
/// daemon without end).
const MAX_POOLS: usize = 1024;
const MAX_RESERVED: usize = 65_536;
pub(super) const MAX_PENDING: usize = 16_384;

impl DockerState {
    /// Addresses reserved in all pools together.
    fn reserved_count(&self) -> usize {
        self.reserved.values().map(HashSet::len).sum()
    }
}

/// Recomputes what Docker holds on each network ([`Store::held`]) from its pools and pending
/// endpoints, so that vswitch's own attach does not take it.
pub(super) fn refresh_held(inner: &mut Inner) {
    let mut held: std::collections::BTreeMap<String, crate::state::Held> = Default::default();
    for net in inner.store.networks.values() {
        let mine = |p: &str| {
            Pool::parse(p).is_ok_and(|p| {
                p.subnet == IpNet::V4(net.subnet) || Some(p.subnet) == net.subnet6.map(IpNet::V6)
            })
        };
        let addrs: Vec<IpAddr> = inner
            .docker
            .reserved
            .iter()
            .filter(|(p, _)| mine(p))
            .flat_map(|(_, set)| set.iter().copied())
            .collect();
        let entry = held.entry(net.id.clone()).or_default();
        entry.addrs.extend(addrs);
    }
    for p in inner.docker.pending.values() {
        let entry = held.entry(p.network_id.clone()).or_default();
        entry.addrs.extend(p.addrs());
        entry.macs.insert(p.mac.0);
    }
    // Endpoints on other hosts of overlay networks hold theirs too.
    for ((net, _, _), r) in &inner.remote {
        let entry = held.entry(net.clone()).or_default();
        entry.addrs.insert(IpAddr::V4(r.ipv4));
        entry.addrs.extend(r.ipv6.map(IpAddr::V6));
        if let Ok(mac) = r.mac.parse::<vswitch_switch::MacAddr>() {
            entry.macs.insert(mac.0);
        }
    }
    held.retain(|_, h| !h.addrs.is_empty() || !h.macs.is_empty());
    inner.store.held = held;
}

/// A pool as its id spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Pool {
    pub subnet: IpNet,
    pub range: Option<Ipv4Net>,
}

impl Pool {
    pub fn id(&self) -> String {
        match self.range {
            Some(r) => format!("{} {r}", self.subnet),
            None => self.subnet.to_string(),
        }
    }

    pub fn parse(id: &str) -> Result<Self> {
        let bad = || Error::bad_request(format!("unknown pool {id:?}"));
        let mut parts = id.split(' ');
        let subnet: IpNet = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        let range = match parts.next() {
            Some(r) => Some(r.parse::<Ipv4Net>().map_err(|_| bad())?),
            None => None,
        };
        if parts.next().is_some() || subnet.trunc() != subnet {
            return Err(bad());
        }
        Ok(Self { subnet, range })
    }
}

/// Every subnet in use or promised: networks and pools.
fn taken(store: &Store, state: &DockerState) -> Vec<IpNet> {
    store
        .networks
        .values()
        .flat_map(|n| std::iter::once(IpNet::V4(n.subnet)).chain(n.subnet6.map(IpNet::V6)))
        .chain(state.pools.values().map(|p| p.subnet))
        .collect()
}

/// A network Docker may adopt as `subnet`: vswitch's own (not Docker's), exactly that subnet.
pub(super) fn adoptable(store: &Store, subnet: IpNet) -> Option<&crate::state::Network> {
    store.networks.values().find(|n| {
        n.docker.is_none()
            && n.overlay.is_none()
            && n.name != crate::plan::DEFAULT_NETWORK
            && (IpNet::V4(n.subnet) == subnet || n.subnet6.map(IpNet::V6) == Some(subnet))
    })
}

impl Daemon {
    /// IpamDriver.RequestPool.
    pub async fn docker_request_pool(&self, req: wire::RequestPool) -> Result<PoolReply> {
        if let Some((k, _)) = req.options.iter().flatten().next() {
            return Err(Error::bad_request(format!(
                "unknown IPAM option {k:?} (vswitch's IPAM takes none)"
            )));
        }
        let mut inner = self.inner.lock().await;
        let inner = &mut *inner;
        let taken = taken(&inner.store, &inner.docker);
        let subnet: IpNet = match (req.pool.as_str(), req.v6) {
            ("", false) => {
                let mut t4: Vec<Ipv4Net> = taken
                    .iter()
                    .filter_map(|n| match n {
                        IpNet::V4(n) => Some(*n),
                        IpNet::V6(_) => None,
                    })
                    .collect();
                t4.extend(host_facts(false, None).routes);
                IpNet::V4(ipam::pick_subnet(&t4).ok_or_else(|| {
                    Error::conflict("no free subnet left in the automatic pools; pass --subnet")
                })?)
            }
            ("", true) => IpNet::V6(ipam::ula_for(&ids::random_id())),
            (p, false) => IpNet::V4(ipam::parse_subnet4(p).map_err(Error::bad_request)?),
            (p, true) => IpNet::V6(ipam::parse_subnet6(p).map_err(Error::bad_request)?),
        };
        let adopt = !req.pool.is_empty() && adoptable(&inner.store, subnet).is_some();
        if !adopt && let Some(t) = taken.iter().find(|t| overlaps(**t, subnet)) {
            return Err(Error::conflict(format!(
                "subnet {subnet} overlaps {t}, which is in use"
            )));
        }
        let range = match (req.sub_pool.as_str(), subnet) {
            ("", _) => None,
            (r, IpNet::V4(s)) => {
                let r = ipam::parse_subnet4(r).map_err(Error::bad_request)?;
                if !s.contains(&r) {
                    return Err(Error::bad_request(format!("ip range {r} is not in {s}")));
                }
                Some(r)
            }
            (_, IpNet::V6(_)) => {
                return Err(Error::bad_request(
                    "vswitch takes an ip range for IPv4 only",
                ));
            }
        };
        let pool = Pool { subnet, range };
        if inner.docker.pools.len() >= MAX_POOLS && !inner.docker.pools.contains_key(&pool.id()) {
            return Err(Error::new(
                crate::error::ErrorKind::Unavailable,
                format!("{MAX_POOLS} address pools are requested and not released"),
            ));
        }
        inner.docker.pools.insert(pool.id(), pool);
        Ok(PoolReply {
            pool_id: pool.id(),
            pool: subnet.to_string(),
            data: Default::default(),
        })
    }

    /// IpamDriver.ReleasePool.
    pub async fn docker_release_pool(&self, id: &str) -> Result<()> {
        let mut inner = self.inner.lock().await;
        inner.docker.pools.remove(id);
        inner.docker.reserved.remove(id);
        refresh_held(&mut inner);
        Ok(())
    }

    /// IpamDriver.RequestAddress: the gateway (before the network exists), or an endpoint's
    /// address.
    pub async fn docker_request_address(&self, req: wire::RequestAddress) -> Result<AddressReply> {
        let pool = Pool::parse(&req.pool_id)?;
        let gateway = req
            .options
            .as_ref()
            .and_then(|o| o.get(wire::REQUEST_ADDRESS_TYPE))
            .is_some_and(|t| t == wire::GATEWAY_TYPE);
        let wanted: Option<IpAddr> = match req.address.as_str() {
            "" => None,
            a => Some(
                a.split('/')
                    .next()
                    .unwrap_or(a)
                    .parse()
                    .map_err(|_| Error::bad_request(format!("invalid address {a:?}")))?,
            ),
        };
        if let Some(ip) = wanted
            && !is_host(pool.subnet, ip)
        {
            return Err(Error::bad_request(format!(
                "{ip} is not a host address of {}",
                pool.subnet
            )));
        }
        let len = pool.subnet.prefix_len();
        {
            let inner = self.inner.lock().await;
            let known = inner.docker.pools.contains_key(&req.pool_id)
                || inner.store.networks.values().any(|n| {
                    n.docker.is_some()
                        && (IpNet::V4(n.subnet) == pool.subnet
                            || n.subnet6.map(IpNet::V6) == Some(pool.subnet))
                });
            if !known {
                return Err(Error::not_found(format!("unknown pool {:?}", req.pool_id)));
            }
        }
        if gateway {
            let ip = wanted.unwrap_or_else(|| first_host(pool.subnet));
            return Ok(AddressReply {
                address: format!("{ip}/{len}"),
                data: Default::default(),
            });
        }
        let mut inner = self.inner.lock().await;
        let inner = &mut *inner;
        if inner.docker.reserved_count() >= MAX_RESERVED {
            return Err(Error::new(
                crate::error::ErrorKind::Unavailable,
                format!("{MAX_RESERVED} addresses are requested and not released"),
            ));
        }
        let mut used: HashSet<IpAddr> = inner
            .docker
            .reserved
            .get(&req.pool_id)
            .cloned()
            .unwrap_or_default();
        used.extend(inner.docker.pending.values().flat_map(Pending::addrs));
        if let Some(net) = inner.store.networks.values().find(|n| {
            IpNet::V4(n.subnet) == pool.subnet || n.subnet6.map(IpNet::V6) == Some(pool.subnet)
        }) {
            used.insert(IpAddr::V4(net.gateway));
            used.extend(net.gateway6.map(IpAddr::V6));
            for ep in inner.store.endpoints_of(&net.id) {
                used.insert(IpAddr::V4(ep.ipv4));
                used.extend(ep.ipv6.map(IpAddr::V6));
            }
        }
        let ip = match (wanted, pool.subnet) {
            (Some(ip), _) if used.contains(&ip) => {
                return Err(Error::conflict(format!("address {ip} is already in use")));
            }
            (Some(ip), _) => ip,
            (None, IpNet::V4(s)) => {
                let used4 = used
                    .iter()
                    .filter_map(|a| match a {
                        IpAddr::V4(a) => Some(*a),
                        IpAddr::V6(_) => None,
                    })
                    .collect();
                IpAddr::V4(
                    ipam::allocate4(s, pool.range, &used4)
                        .ok_or_else(|| Error::conflict(format!("no free address left in {s}")))?,
                )
            }
            (None, IpNet::V6(s)) => {
                let used6 = used
                    .iter()
                    .filter_map(|a| match a {
                        IpAddr::V6(a) => Some(*a),
                        IpAddr::V4(_) => None,
                    })
                    .collect();
                IpAddr::V6(
                    ipam::allocate6(s, &used6)
                        .ok_or_else(|| Error::conflict(format!("no free address left in {s}")))?,
                )
            }
        };
        inner
            .docker
            .reserved
            .entry(req.pool_id)
            .or_default()
            .insert(ip);
        refresh_held(inner);
        Ok(AddressReply {
            address: format!("{ip}/{len}"),
            data: Default::default(),
        })
    }

    /// IpamDriver.ReleaseAddress.
    pub async fn docker_release_address(&self, req: wire::ReleaseAddress) -> Result<()> {
        let ip: Option<IpAddr> = req.address.split('/').next().and_then(|a| a.parse().ok());
        let mut inner = self.inner.lock().await;
        if let (Some(ip), Some(set)) = (ip, inner.docker.reserved.get_mut(&req.pool_id)) {
            set.remove(&ip);
            if set.is_empty() {
                inner.docker.reserved.remove(&req.pool_id);
            }
        }
        refresh_held(&mut inner);
        Ok(())
    }
}

fn overlaps(a: IpNet, b: IpNet) -> bool {
    match (a, b) {
        (IpNet::V4(a), IpNet::V4(b)) => ipam::overlaps4(a, b),
        (IpNet::V6(a), IpNet::V6(b)) => ipam::overlaps6(a, b),
        _ => false,
    }
}

fn is_host(net: IpNet, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpNet::V4(n), IpAddr::V4(ip)) => ipam::is_host4(n, ip),
        (IpNet::V6(n), IpAddr::V6(ip)) => ipam::is_host6(n, ip),
        _ => false,
    }
}

/// The conventional gateway: the first host address.
fn first_host(net: IpNet) -> IpAddr {
    match net {
        IpNet::V4(n) => IpAddr::V4(Ipv4Addr::from(u32::from(n.network()).saturating_add(1))),
        IpNet::V6(n) => IpAddr::V6(std::net::Ipv6Addr::from(
            u128::from(n.network()).saturating_add(1),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_ids_name_their_subnets() {
        let p = Pool::parse("10.99.0.0/24 10.99.0.128/25").unwrap();
        assert_eq!(p.subnet.to_string(), "10.99.0.0/24");
        assert_eq!(p.range.unwrap().to_string(), "10.99.0.128/25");
        assert_eq!(Pool::parse(&p.id()).unwrap(), p);
        assert!(Pool::parse("fd00::/64").is_ok());
        for bad in [
            "",
            "x",
            "10.99.0.1/24",
            "10.0.0.0/8 y",
            "10.0.0.0/8 10.0.0.0/9 z",
        ] {
            assert!(Pool::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            first_host("10.99.0.0/24".parse().unwrap()).to_string(),
            "10.99.0.1"
        );
        assert_eq!(
            first_host("fd00::/64".parse().unwrap()).to_string(),
            "fd00::1"
        );
        assert_eq!(
            super::super::docker::provisional("docker", "0123456789abcdef"),
            "docker-0123456789ab"
        );
    }
}
