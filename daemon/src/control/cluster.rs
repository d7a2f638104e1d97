//! The control plane's side of the cluster store (`crate::cluster`): what the store says is
//! applied here (overlay networks that other hosts created, endpoints on other hosts), and this
//! node's own overlay endpoints are published from here.
//!
//! Another host's endpoint becomes a static entry of the network's tunnel (its MAC pinned to
//! the tunnel port, towards its host), a DNS record, and an address that no local endpoint may
//! take. The network's members, whom flooding reaches and whose packets are believed, are the
//! hosts with endpoints on it.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use vswitch_dns::EndpointRecords;
use vswitch_switch::MacAddr;

use super::{Daemon, Inner};
use crate::cluster::records::{EndpointRecord, Key, NetworkRecord};
use crate::state::{Endpoint, Network};

/// Endpoints on other hosts, by (network id, node, endpoint id).
pub(super) type Remote = HashMap<(String, String, String), EndpointRecord>;

fn remote_id(node: &str, endpoint: &str) -> String {
    format!("remote/{node}/{endpoint}")
}

impl Daemon {
    /// This node's name in the cluster, if it is in one.
    pub(super) fn node(&self) -> Option<&str> {
        self.cluster.as_ref().map(|c| c.config.node.as_str())
    }

    /// The record another host sees of a local endpoint.
    fn endpoint_record(&self, ep: &Endpoint) -> Option<EndpointRecord> {
        let c = self.cluster.as_ref()?;
        Some(EndpointRecord {
            node: c.config.node.clone(),
            host: c.config.advertise,
            name: ep.name.clone(),
            aliases: ep.aliases.clone(),
            mac: ep.mac.to_string(),
            ipv4: ep.ipv4,
            ipv6: ep.ipv6,
        })
    }

    /// After (re)connecting: this node's overlay networks and endpoints, claimed and published
    /// again under the new lease.
    pub async fn cluster_republish(&self) {
        let Some(c) = self.cluster.clone() else {
            return;
        };
        let (nets, eps): (Vec<Network>, Vec<Endpoint>) = {
            let inner = self.inner.lock().await;
            let nets = inner
                .store
                .networks
                .values()
                .filter(|n| n.overlay.is_some())
                .cloned()
                .collect();
            let eps = inner
                .store
                .endpoints
                .values()
                .filter(|e| {
                    inner
                        .store
                        .networks
                        .get(&e.network_id)
                        .is_some_and(|n| n.overlay.is_some())
                })
                .cloned()
                .collect();
            (nets, eps)
        };
        for net in &nets {
            if let Some(rec) = NetworkRecord::of(net) {
                // Known already (the usual case), or this host's own from before the cluster.
                let _ = c.create_network(&rec).await;
            }
        }
        for ep in &eps {
            let addrs = addrs_of(ep);
            match c.claim(&ep.network_id, &addrs, &ep.id).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(endpoint = %ep.name, "another host holds this endpoint's address in the cluster store");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot claim addresses again");
                    return;
                }
            }
            if let Some(rec) = self.endpoint_record(ep)
                && let Err(e) = c.publish(&ep.network_id, &ep.id, &rec).await
            {
                tracing::warn!(error = %e, "cannot publish endpoints again");
                return;
            }
        }
    }

    /// Everything the store holds, read after (re)connecting: networks are created where
    /// missing, and the other hosts' endpoints replace what was known of them.
    pub async fn cluster_sync(&self, entries: Vec<(String, Vec<u8>)>) {
        let own = self.node().unwrap_or_default().to_owned();
        let mut remote = Remote::new();
        let mut networks = Vec::new();
        for (key, value) in &entries {
            match Key::parse(key) {
                Some(Key::Network(_)) => {
                    if let Ok(rec) = serde_json::from_slice::<NetworkRecord>(value) {
                        networks.push(rec);
                    }
                }
                Some(Key::Endpoint {
                    network,
                    node,
                    endpoint,
                }) if node != own => {
                    if let Ok(rec) = serde_json::from_slice::<EndpointRecord>(value) {
                        remote.insert((network, node, endpoint), rec);
                    }
                }
                _ => {}
            }
        }
        for rec in networks {
            self.cluster_network(rec).await;
        }
        let mut inner = self.inner.lock().await;
        let gone: Vec<_> = inner
            .remote
            .keys()
            .filter(|k| !remote.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            self.remove_remote(&mut inner, &k);
        }
        for (k, rec) in remote {
            self.add_remote(&mut inner, k, rec);
        }
    }

    /// A key the watch saw written.
    pub async fn cluster_put(&self, key: &str, value: &[u8]) {
        match Key::parse(key) {
            Some(Key::Network(_)) => {
                if let Ok(rec) = serde_json::from_slice::<NetworkRecord>(value) {
                    self.cluster_network(rec).await;
                }
            }
            Some(Key::Endpoint {
                network,
                node,
                endpoint,
            }) if Some(node.as_str()) != self.node() => {
                if let Ok(rec) = serde_json::from_slice::<EndpointRecord>(value) {
                    let mut inner = self.inner.lock().await;
                    self.add_remote(&mut inner, (network, node, endpoint), rec);
                }
            }
            _ => {}
        }
    }

    /// A key the watch saw deleted (or expired with its lease).
    pub async fn cluster_delete(&self, key: &str) {
        match Key::parse(key) {
            Some(Key::Network(name)) => {
                let mut inner = self.inner.lock().await;
                let Some(net) = inner
                    .store
                    .networks
                    .values()
                    .find(|n| n.name == name && n.overlay.is_some())
                    .cloned()
                else {
                    return;
                };
                if inner.store.endpoints_of(&net.id).next().is_some() {
                    tracing::warn!(network = %name, "removed from the cluster while endpoints here use it; kept");
                    return;
                }
                if let Err(e) = self.drop_network(&mut inner, net).await {
                    tracing::warn!(network = %name, error = %e, "cannot remove the network the cluster removed");
                }
            }
            Some(Key::Endpoint {
                network,
                node,
                endpoint,
            }) => {
                let mut inner = self.inner.lock().await;
                self.remove_remote(&mut inner, &(network, node, endpoint));
            }
            _ => {}
        }
    }

    /// Creates locally an overlay network the store has, if it is not here yet.
    async fn cluster_network(&self, rec: NetworkRecord) {
        let mut inner = self.inner.lock().await;
        if inner.store.networks.contains_key(&rec.id) {
            return;
        }
        if let Some(other) = inner.store.networks.values().find(|n| n.name == rec.name) {
            tracing::error!(network = %rec.name, local = %other.id, "a local network has the cluster network's name; not created here");
            return;
        }
        let net = rec.network();
        match self.add_network(&mut inner, net).await {
            Ok(_) => {
                // Endpoints seen before their network: they apply now.
                self.refresh_members(&inner, &rec.id);
                let keys: Vec<_> = inner
                    .remote
                    .iter()
                    .filter(|(k, _)| k.0 == rec.id)
                    .map(|(k, r)| (k.clone(), r.clone()))
                    .collect();
                for (k, r) in keys {
                    self.plug_remote(&inner, &k, &r);
                }
                tracing::info!(network = %rec.name, vni = rec.vni, "overlay network from the cluster");
            }
            Err(e) => {
                tracing::error!(network = %rec.name, error = %e, "cannot create the cluster's network here");
            }
        }
    }

    fn add_remote(&self, inner: &mut Inner, key: (String, String, String), rec: EndpointRecord) {
        if inner.remote.get(&key) == Some(&rec) {
            return;
        }
        if let Some(old) = inner.remote.get(&key).cloned() {
            self.unplug_remote(inner, &key, &old);
        }
        inner.remote.insert(key.clone(), rec.clone());
        self.plug_remote(inner, &key, &rec);
        self.refresh_members(inner, &key.0);
        super::docker_ipam::refresh_held(inner);
    }

    fn remove_remote(&self, inner: &mut Inner, key: &(String, String, String)) {
        let Some(rec) = inner.remote.remove(key) else {
            return;
        };
        self.unplug_remote(inner, key, &rec);
        self.refresh_members(inner, &key.0);
        super::docker_ipam::refresh_held(inner);
    }

    /// A remote endpoint into its network's tunnel and DNS (if the network is here).
    fn plug_remote(&self, inner: &Inner, key: &(String, String, String), rec: &EndpointRecord) {
        let (net_id, node, ep) = key;
        let Some(net) = inner.store.networks.get(net_id) else {
            return;
        };
        let Ok(mac) = rec.mac.parse::<MacAddr>() else {
            return;
        };
        let local = inner.store.endpoints_of(net_id).any(|e| e.mac == mac);
        if mac.is_multicast() || mac.is_zero() || mac == net.gateway_mac() || local {
            tracing::warn!(network = %net.name, %node, mac = %mac, "a remote endpoint claims a MAC in use here; ignored");
            return;
        }
        if let Some(live) = inner.live.get(net_id) {
            let _ = live.datapath.set_remote(mac.0, Some(rec.host));
        }
        self.catalog.write().add_endpoint(
            net_id,
            &EndpointRecords {
                id: remote_id(node, ep),
                scope: format!("remote/{node}/{ep}"),
                name: rec.name.clone(),
                aliases: rec.aliases.clone(),
                addrs: std::iter::once(IpAddr::V4(rec.ipv4))
                    .chain(rec.ipv6.map(IpAddr::V6))
                    .collect(),
            },
        );
    }

    fn unplug_remote(&self, inner: &Inner, key: &(String, String, String), rec: &EndpointRecord) {
        let (net_id, node, ep) = key;
        if let (Some(live), Ok(mac)) = (inner.live.get(net_id), rec.mac.parse::<MacAddr>()) {
            let _ = live.datapath.set_remote(mac.0, None);
        }
        self.catalog
            .write()
            .remove_endpoint(net_id, &remote_id(node, ep));
    }

    /// The hosts with endpoints on a network, to its tunnel and the VXLAN receiver.
    fn refresh_members(&self, inner: &Inner, net_id: &str) -> Vec<IpAddr> {
        let members: BTreeSet<IpAddr> = inner
            .remote
            .iter()
            .filter(|(k, _)| k.0 == net_id)
            .map(|(_, r)| r.host)
            .collect();
        let members: Vec<IpAddr> = members.into_iter().collect();
        let Some(net) = inner.store.networks.get(net_id) else {
            return members;
        };
        if let Some(live) = inner.live.get(net_id) {
            let _ = live.datapath.set_members(members.clone());
        }
        if let (Some(o), Ok(sockets)) = (&net.overlay, self.vxlan.sockets()) {
            sockets.set_senders(o.vni, members.iter().chain(o.peers.iter()).copied());
        }
        members
    }

    /// Claims an endpoint's addresses in the store before it is made. `Ok(false)`: one is
    /// taken (by another host); the caller plans again.
    pub(super) async fn cluster_claim(&self, ep: &Endpoint) -> crate::error::Result<bool> {
        match &self.cluster {
            Some(c) => c.claim(&ep.network_id, &addrs_of(ep), &ep.id).await,
            None => Ok(true),
        }
    }

    /// Publishes a new local endpoint of an overlay network.
    pub(super) async fn cluster_publish(&self, ep: &Endpoint) {
        if let (Some(c), Some(rec)) = (&self.cluster, self.endpoint_record(ep))
            && let Err(e) = c.publish(&ep.network_id, &ep.id, &rec).await
        {
            tracing::warn!(endpoint = %ep.name, error = %e, "not published; it will be when the store is back");
        }
    }

    /// Withdraws a local endpoint of an overlay network and gives its addresses back.
    pub(super) async fn cluster_withdraw(&self, ep: &Endpoint) {
        if let Some(c) = &self.cluster {
            c.withdraw(&ep.network_id, &ep.id).await;
            c.release(&ep.network_id, &addrs_of(ep)).await;
        }
    }
}

fn addrs_of(ep: &Endpoint) -> Vec<IpAddr> {
    std::iter::once(IpAddr::V4(ep.ipv4))
        .chain(ep.ipv6.map(IpAddr::V6))
        .collect()
}
