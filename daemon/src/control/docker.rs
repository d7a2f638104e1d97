//! dockerd's networks through the plugin (`crate::docker`): `NetworkDriver`'s CreateNetwork
//! and DeleteNetwork, and the names dockerd gives them. Pools and addresses are in
//! `docker_ipam`, endpoints in `docker_ep`.

use ipnet::IpNet;

use super::docker_ipam::{adoptable, refresh_held};
use super::networks::host_facts;
use super::{Daemon, Inner, ids};
use crate::api::NetworkCreate;
use crate::docker::wire;
use crate::error::{Error, Result};
use crate::ipam;
use crate::plan;
use crate::state::{DockerNetwork, Network, Store};

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

impl Daemon {
    /// NetworkDriver.CreateNetwork: a vswitch network for Docker's, or vswitch's own network of
    /// exactly that subnet adopted. Returns whether its name is still to be learnt.
    pub async fn docker_create_network(&self, req: wire::CreateNetwork) -> Result<bool> {
        wire::check_id("network", &req.network_id).map_err(Error::bad_request)?;
        let data4 = req.ipv4_data.as_deref().and_then(<[_]>::first);
        let Some(data4) = data4 else {
            return Err(Error::bad_request(
                "vswitch networks need an IPv4 pool (use --ipam-driver vswitch)",
            ));
        };
        if !data4.address_space.starts_with("vswitch-") {
            return Err(Error::bad_request(
                "vswitch networks take their addresses from vswitch's IPAM: add --ipam-driver vswitch",
            ));
        }
        let subnet = ipam::parse_subnet4(&data4.pool).map_err(Error::bad_request)?;
        let gateway = strip_len(&data4.gateway);
        let data6 = req.ipv6_data.as_deref().and_then(<[_]>::first);
        let mut inner = self.inner.lock().await;
        let inner = &mut *inner;
        if let Ok(net) = docker_network(&inner.store, &req.network_id) {
            return Ok(net.docker.as_ref().is_some_and(|d| d.unnamed));
        }
        let mut generic = wire::generic(&req.options);
        let mtu: Option<u32> = match generic.remove(wire::MTU) {
            Some(m) => Some(
                m.parse()
                    .map_err(|_| Error::bad_request(format!("invalid MTU {m:?}")))?,
            ),
            None => None,
        };
        let internal = wire::flag(&req.options, wire::INTERNAL);
        if let Some(net) = adoptable(&inner.store, IpNet::V4(subnet)).cloned() {
            let subnet6 = data6.map(|d| d.pool.clone());
            let mismatch = if !gateway.is_empty() && gateway != net.gateway.to_string() {
                Some(format!("gateway {}, not {gateway}", net.gateway))
            } else if internal != net.internal {
                Some(format!("internal {}, not {internal}", net.internal))
            } else if subnet6 != net.subnet6.map(|s| s.to_string()) {
                Some(format!(
                    "IPv6 subnet {}, not {}",
                    net.subnet6.map(|s| s.to_string()).unwrap_or("none".into()),
                    subnet6.unwrap_or("none".into())
                ))
            } else if mtu.is_some_and(|m| m != net.mtu) {
                Some(format!("MTU {}", net.mtu))
            } else if generic
                .get("port-security")
                .is_some_and(|p| p != net.port_security.as_str())
            {
                Some(format!("port-security {}", net.port_security.as_str()))
            } else {
                None
            };
            if let Some(m) = mismatch {
                return Err(Error::conflict(format!(
                    "vswitch network {} has subnet {subnet} but {m}: Docker cannot adopt it as asked",
                    net.name
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
            internal,
            mtu,
            enable_ipv6: data6.is_some(),
            dns_servers: Vec::new(),
            options: generic,
            driver: None,
        };
        let mut net = plan::plan_network(
            &inner.store,
            create,
            &host_facts(self.policy.read().host_loopback, None),
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

    /// NetworkDriver.DeleteNetwork: removes the network, or lets go of an adopted one. dockerd
    /// forgets its network whatever the driver answers, so this never leaves a network that
    /// only Docker could remove: Docker's endpoints still on it go, and a network vswitch's
    /// own endpoints have joined stays as an ordinary vswitch network.
    pub async fn docker_delete_network(&self, id: &str) -> Result<()> {
        let mut inner = self.inner.lock().await;
        let inner = &mut *inner;
        let Ok(net) = docker_network(&inner.store, id).cloned() else {
            return Ok(());
        };
        let theirs: Vec<crate::state::Endpoint> = inner
            .store
            .endpoints_of(&net.id)
            .filter(|e| e.docker.is_some())
            .cloned()
            .collect();
        for ep in &theirs {
            self.unplug(inner, ep).await;
        }
        inner.docker.pending.retain(|_, p| p.network_id != net.id);
        refresh_held(inner);
        let adopted = net.docker.as_ref().is_some_and(|d| d.adopted);
        if adopted || inner.store.endpoints_of(&net.id).next().is_some() {
            let mut kept = net.clone();
            kept.docker = None;
            if !adopted {
                tracing::warn!(name = %net.name, "Docker removed its network, which vswitch endpoints still use; it stays as a vswitch network");
            }
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
        plan::check_network_name(name)?;
        if inner
            .store
            .networks
            .values()
            .any(|n| n.name == name && n.id != net.id)
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

    /// Docker networks whose names dockerd has not told yet (the daemon stopped first).
    pub async fn docker_unnamed(&self) -> Vec<String> {
        let inner = self.inner.lock().await;
        inner
            .store
            .networks
            .values()
            .filter_map(|n| {
                n.docker
                    .as_ref()
                    .filter(|d| d.unnamed)
                    .map(|d| d.id.clone())
            })
            .collect()
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
