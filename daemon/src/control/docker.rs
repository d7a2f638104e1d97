//! dockerd's networks and address pools, through the plugin (`crate::docker`): the
//! `IpamDriver` calls and `NetworkDriver`'s CreateNetwork and DeleteNetwork. Endpoints are in
//! `docker_ep`.
//!
//! Docker asks for a pool and its gateway before it creates the network, and for each address
//! before it creates the endpoint. A pool id names its subnet (`10.99.0.0/24` or
//! `10.99.0.0/24 10.99.0.128/25` with an `--ip-range`), so it means the same after a restart
//! of either daemon; addresses come from the network's own IPAM once the network exists, with
//! the ones Docker holds but has not yet made endpoints of kept aside.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};

use super::networks::host_facts;
use super::{Daemon, Inner, ids};
use crate::api::NetworkCreate;
use crate::docker::wire::{self, AddressReply, PoolReply};
use crate::error::{Error, Result};
use crate::ipam;
use crate::plan;
use crate::state::{DockerNetwork, Network, Store};

use super::docker_ep::Pending;

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

/// The provisional name of a Docker network until dockerd tells its own.
pub(super) fn provisional(prefix: &str, id: &str) -> String {
    format!("{prefix}-{}", &id[..id.len().min(12)])
}

/// The vswitch network of Docker network `id`.
pub(super) fn docker_network<'a>(store: &'a Store, id: &str) -> Result<&'a Network> {
    store
        .networks
        .values()
        .find(|n| n.docker.as_ref().is_some_and(|d| d.id == id))
        .ok_or_else(|| Error::not_found(format!("no vswitch network for Docker network {id}")))
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
fn adoptable(store: &Store, subnet: IpNet) -> Option<&Network> {
    store.networks.values().find(|n| {
        n.docker.is_none()
            && n.name != plan::DEFAULT_NETWORK
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
                t4.extend(host_facts(false).routes);
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
        if gateway {
            let ip = wanted.unwrap_or_else(|| first_host(pool.subnet));
            return Ok(AddressReply {
                address: format!("{ip}/{len}"),
                data: Default::default(),
            });
        }
        let mut inner = self.inner.lock().await;
        let inner = &mut *inner;
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
        }
        Ok(())
    }

    /// NetworkDriver.CreateNetwork: a vswitch network for Docker's, or vswitch's own network of
    /// exactly that subnet adopted. Returns whether its name is still to be learnt.
    pub async fn docker_create_network(&self, req: wire::CreateNetwork) -> Result<bool> {
        let data4 = req.ipv4_data.as_deref().and_then(<[_]>::first);
        let Some(data4) = data4 else {
            return Err(Error::bad_request(
                "vswitch networks need an IPv4 pool (use --ipam-driver vswitch)",
            ));
        };
        let subnet = ipam::parse_subnet4(&data4.pool).map_err(Error::bad_request)?;
        let gateway = strip_len(&data4.gateway);
        let data6 = req.ipv6_data.as_deref().and_then(<[_]>::first);
        let mut inner = self.inner.lock().await;
        let inner = &mut *inner;
        if let Ok(net) = docker_network(&inner.store, &req.network_id) {
            return Ok(net.docker.as_ref().is_some_and(|d| d.unnamed));
        }
        if let Some(net) = adoptable(&inner.store, IpNet::V4(subnet)).cloned() {
            if !gateway.is_empty() && gateway != net.gateway.to_string() {
                return Err(Error::conflict(format!(
                    "network {} has subnet {subnet} with gateway {}, not {gateway}",
                    net.name, net.gateway
                )));
            }
            let mut adopted = net.clone();
            adopted.docker = Some(DockerNetwork {
                id: req.network_id.clone(),
                adopted: true,
                unnamed: false,
            });
            inner.store.networks.insert(adopted.id.clone(), adopted);
            if let Err(e) = self.persist(&inner.store) {
                inner.store.networks.insert(net.id.clone(), net);
                return Err(e);
            }
            tracing::info!(name = %net.name, docker = %req.network_id, "Docker adopted a network");
            return Ok(false);
        }
        let range = inner
            .docker
            .pools
            .values()
            .find(|p| p.subnet == IpNet::V4(subnet))
            .and_then(|p| p.range);
        let mut generic = wire::generic(&req.options);
        let mtu = match generic.remove(wire::MTU) {
            Some(m) => Some(
                m.parse()
                    .map_err(|_| Error::bad_request(format!("invalid MTU {m:?}")))?,
            ),
            None => None,
        };
        let mut subnets = vec![subnet.to_string()];
        let mut gateways = vec![gateway];
        if let Some(d6) = data6 {
            subnets.push(d6.pool.clone());
            gateways.push(strip_len(&d6.gateway));
        }
        gateways.retain(|g| !g.is_empty());
        let create = NetworkCreate {
            name: provisional("docker", &req.network_id),
            subnets,
            gateways,
            ip_range: range.map(|r| r.to_string()),
            internal: wire::flag(&req.options, wire::INTERNAL),
            mtu,
            enable_ipv6: data6.is_some(),
            dns_servers: Vec::new(),
            options: generic,
        };
        let mut net = plan::plan_network(
            &inner.store,
            create,
            &host_facts(self.policy.read().host_loopback),
            ids::random_id(),
            ids::now(),
        )?;
        net.docker = Some(DockerNetwork {
            id: req.network_id.clone(),
            adopted: false,
            unnamed: true,
        });
        self.add_network(inner, net).await?;
        inner
            .docker
            .pools
            .retain(|_, p| p.subnet != IpNet::V4(subnet));
        Ok(true)
    }

    /// NetworkDriver.DeleteNetwork: removes the network, or lets go of an adopted one.
    pub async fn docker_delete_network(&self, id: &str) -> Result<()> {
        let mut inner = self.inner.lock().await;
        let inner = &mut *inner;
        let Ok(net) = docker_network(&inner.store, id).cloned() else {
            return Ok(());
        };
        let gone: Vec<String> = inner
            .docker
            .pending
            .iter()
            .filter(|(_, p)| p.network_id == net.id)
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            inner.docker.pending.remove(&k);
        }
        if net.docker.as_ref().is_some_and(|d| d.adopted) {
            let mut kept = net.clone();
            kept.docker = None;
            inner.store.networks.insert(kept.id.clone(), kept);
            return self.persist(&inner.store);
        }
        self.drop_network(inner, net).await
    }

    /// Gives Docker network `id` the name dockerd knows it by, if it is still provisional and
    /// no other network has that name.
    pub async fn docker_name_network(&self, id: &str, name: &str) -> Result<()> {
        let mut inner = self.inner.lock().await;
        let inner = &mut *inner;
        let net = docker_network(&inner.store, id)?.clone();
        if !net.docker.as_ref().is_some_and(|d| d.unnamed) {
            return Ok(());
        }
        plan::check_name("network", name)?;
        if let Some(other) = inner.store.find_network(name)
            && other.id != net.id
        {
            return Err(Error::conflict(format!(
                "vswitch already has a network named {name}; Docker's stays {}",
                net.name
            )));
        }
        let mut named = net.clone();
        named.name = name.to_owned();
        if let Some(d) = named.docker.as_mut() {
            d.unnamed = false;
        }
        inner.store.networks.insert(named.id.clone(), named.clone());
        if let Err(e) = self.persist(&inner.store) {
            inner.store.networks.insert(net.id.clone(), net);
            return Err(e);
        }
        self.rezone(inner, &named);
        tracing::info!(name, docker = %id, "Docker network named");
        Ok(())
    }

    /// Rebuilds a network's DNS zone (after a rename).
    pub(super) fn rezone(&self, inner: &Inner, net: &Network) {
        let mut catalog = self.catalog.write();
        catalog.remove_network(&net.id);
        catalog.add_network(&net.id, super::zone_for(net));
        for ep in inner.store.endpoints_of(&net.id) {
            catalog.add_endpoint(&net.id, &super::endpoints::records(ep));
        }
    }
}

fn strip_len(cidr: &str) -> String {
    cidr.split('/').next().unwrap_or_default().to_owned()
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
            provisional("docker", "0123456789abcdef"),
            "docker-0123456789ab"
        );
    }
}
