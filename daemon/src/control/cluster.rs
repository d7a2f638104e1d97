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
use crate::cluster::records::{EndpointRecord, Key, NetworkRecord, NodeRecord};
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

    /// After (re)connecting: this node's overlay endpoints, their addresses claimed (or moved
    /// to the new lease) and published again. An error ends the session, and the next one
    /// tries again.
    pub async fn cluster_republish(&self) -> crate::error::Result<()> {
        let Some(c) = self.cluster.clone() else {
            return Ok(());
        };
        let eps: Vec<Endpoint> = {
            let inner = self.inner.lock().await;
            inner
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
                .collect()
        };
        for ep in &eps {
            if !c.claim(&ep.network_id, &addrs_of(ep), &ep.id).await? {
                // Another host took the address while this one was away: its claim stands,
                // and this endpoint is not announced (the log says which).
                tracing::error!(endpoint = %ep.name, ip = %ep.ipv4, "another host of the cluster holds this endpoint's address; not published");
                continue;
            }
            if let Some(rec) = self.endpoint_record(ep) {
                c.publish(&ep.network_id, &ep.id, &rec).await?;
            }
        }
        Ok(())
    }

    /// Everything the store holds, read after (re)connecting: networks are created where
    /// missing, and the other hosts' endpoints replace what was known of them. Unless
    /// `authoritative` (a saved view, not the store itself), networks missing from it stay
    /// and the networks' peers stay as they are.
    pub async fn cluster_sync(&self, entries: Vec<(String, Vec<u8>)>, authoritative: bool) {
        let own = self.node().unwrap_or_default().to_owned();
        let mut remote = Remote::new();
        let mut networks = Vec::new();
        let mut nodes = HashMap::new();
        let mut peers: HashMap<String, Vec<IpAddr>> = HashMap::new();
        for (key, value) in &entries {
            match Key::parse(key) {
                Some(Key::Peer { network, addr }) => peers.entry(network).or_default().push(addr),
                Some(Key::Node(node)) if node != own => {
                    if let Ok(rec) = serde_json::from_slice::<NodeRecord>(value) {
                        nodes.insert(node, rec.advertise);
                    }
                }
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
        let names: BTreeSet<String> = networks.iter().map(|r| r.name.clone()).collect();
        let mut inner = self.inner.lock().await;
        // Overlay networks removed while this host was away go here too, if nothing uses them;
        // first, so that one of them cannot stand in the way of a new one with its subnet.
        let missing: Vec<Network> = inner
            .store
            .networks
            .values()
            .filter(|_| authoritative)
            .filter(|n| n.overlay.is_some() && !names.contains(&n.name))
            .filter(|n| inner.store.endpoints_of(&n.id).next().is_none())
            .cloned()
            .collect();
        for net in missing {
            tracing::info!(network = %net.name, "removed from the cluster meanwhile");
            let _ = self.drop_network(&mut inner, net).await;
        }
        drop(inner);
        for rec in networks {
            self.cluster_network(rec).await;
        }
        let mut inner = self.inner.lock().await;
        inner.nodes = nodes;
        // The cluster's peers of each overlay network are the ones that count.
        let overlays: Vec<Network> = inner
            .store
            .networks
            .values()
            .filter(|n| authoritative && n.overlay.is_some())
            .cloned()
            .collect();
        for net in overlays {
            let mut want = peers.remove(&net.id).unwrap_or_default();
            want.sort();
            let mut have = net
                .overlay
                .as_ref()
                .map(|o| o.peers.clone())
                .unwrap_or_default();
            have.sort();
            if want != have
                && let Err(e) = self.set_peers(&mut inner, &net, want)
            {
                tracing::warn!(network = %net.name, error = %e, "cannot take the cluster's peers");
            }
        }
        let gone: Vec<_> = inner
            .remote
            .keys()
            .filter(|k| !remote.contains_key(*k))
            .cloned()
            .collect();
        // In one pass: members and held addresses are worked out once at the end, not once
        // per record.
        let mut touched: BTreeSet<String> = BTreeSet::new();
        for k in gone {
            if let Some(rec) = inner.remote.remove(&k) {
                self.unplug_remote(&inner, &k, &rec);
                touched.insert(k.0);
            }
        }
        for (k, rec) in remote {
            let net = k.0.clone();
            if self.put_remote(&mut inner, k, rec) {
                touched.insert(net);
            }
        }
        for net in &touched {
            self.refresh_members(&inner, net);
        }
        super::docker_ipam::refresh_held(&mut inner);
    }

    /// A key the watch saw written.
    pub async fn cluster_put(&self, key: &str, value: &[u8]) {
        match Key::parse(key) {
            Some(Key::Node(node)) if Some(node.as_str()) != self.node() => {
                if let Ok(rec) = serde_json::from_slice::<NodeRecord>(value) {
                    let mut inner = self.inner.lock().await;
                    inner.nodes.insert(node.clone(), rec.advertise);
                    self.replug_node(&mut inner, &node);
                }
            }
            Some(Key::Peer { network, addr }) => self.cluster_peer(&network, addr, true).await,
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
            Some(Key::Node(node)) => {
                let mut inner = self.inner.lock().await;
                inner.nodes.remove(&node);
                self.replug_node(&mut inner, &node);
            }
            Some(Key::Peer { network, addr }) => self.cluster_peer(&network, addr, false).await,
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

    /// A peer another host (or this one) registered or removed for the whole cluster.
    async fn cluster_peer(&self, net_id: &str, peer: IpAddr, add: bool) {
        let mut inner = self.inner.lock().await;
        let Some(net) = inner.store.networks.get(net_id).cloned() else {
            return;
        };
        let Some(o) = &net.overlay else {
            return;
        };
        let mut peers = o.peers.clone();
        match (add, peers.contains(&peer)) {
            (true, false) if peers.len() < 64 => peers.push(peer),
            (false, true) => peers.retain(|p| *p != peer),
            _ => return,
        }
        if let Err(e) = self.set_peers(&mut inner, &net, peers) {
            tracing::warn!(network = %net.name, error = %e, "cannot take the cluster's peer");
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
        if let Err(why) = check_network(&inner, &rec) {
            tracing::error!(network = %rec.name, why, "the cluster's network is not created here");
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
        let net = key.0.clone();
        if self.put_remote(inner, key, rec) {
            self.refresh_members(inner, &net);
            super::docker_ipam::refresh_held(inner);
        }
    }

    /// Records and plugs a remote endpoint; returns whether anything changed (the caller
    /// then refreshes the network's members and the held addresses).
    fn put_remote(
        &self,
        inner: &mut Inner,
        key: (String, String, String),
        rec: EndpointRecord,
    ) -> bool {
        if inner.remote.get(&key) == Some(&rec) {
            return false;
        }
        if let Some(old) = inner.remote.get(&key).cloned() {
            self.unplug_remote(inner, &key, &old);
        } else if inner.remote.len() >= MAX_REMOTE {
            tracing::warn!(node = %key.1, "{MAX_REMOTE} remote endpoints known already; one more ignored");
            return false;
        }
        inner.remote.insert(key.clone(), rec.clone());
        self.plug_remote(inner, &key, &rec);
        true
    }

    fn remove_remote(&self, inner: &mut Inner, key: &(String, String, String)) {
        let Some(rec) = inner.remote.remove(key) else {
            return;
        };
        self.unplug_remote(inner, key, &rec);
        self.refresh_members(inner, &key.0);
        super::docker_ipam::refresh_held(inner);
    }

    /// A remote endpoint into its network's tunnel and DNS, if the network is here, its node
    /// is registered, and the record holds up: nothing a local endpoint or another remote one
    /// holds, addresses inside the network, valid names.
    fn plug_remote(&self, inner: &Inner, key: &(String, String, String), rec: &EndpointRecord) {
        let (net_id, node, ep) = key;
        let Some(net) = inner
            .store
            .networks
            .get(net_id)
            .filter(|n| n.overlay.is_some())
        else {
            return;
        };
        let Some(host) = inner.nodes.get(node).copied() else {
            return;
        };
        let Ok(mac) = rec.mac.parse::<MacAddr>() else {
            return;
        };
        let taken_here = inner.store.endpoints_of(net_id).any(|e| {
            e.mac == mac || e.ipv4 == rec.ipv4 || (rec.ipv6.is_some() && e.ipv6 == rec.ipv6)
        });
        let taken_there = inner
            .remote
            .iter()
            .any(|(k, r)| k != key && k.0 == *net_id && (r.mac == rec.mac || r.ipv4 == rec.ipv4));
        let inside = crate::ipam::is_host4(net.subnet, rec.ipv4)
            && rec.ipv4 != net.gateway
            && rec
                .ipv6
                .is_none_or(|a| net.subnet6.is_some_and(|s| crate::ipam::is_host6(s, a)));
        let names_ok = crate::plan::valid_name(&rec.name)
            && rec.aliases.len() <= 16
            && rec.aliases.iter().all(|a| crate::plan::valid_name(a));
        if mac.is_multicast()
            || mac.is_zero()
            || mac == net.gateway_mac()
            || taken_here
            || taken_there
            || !inside
            || !names_ok
        {
            tracing::warn!(network = %net.name, %node, name = %rec.name, mac = %mac, "a remote endpoint's record clashes with what is here; ignored");
            return;
        }
        if let Some(live) = inner.live.get(net_id) {
            let _ = live.datapath.set_remote(mac.0, Some(host));
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

    /// A node's address changed (or it went): its endpoints are plugged again.
    fn replug_node(&self, inner: &mut Inner, node: &str) {
        let mine: Vec<_> = inner
            .remote
            .iter()
            .filter(|(k, _)| k.1 == node)
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect();
        let mut nets = BTreeSet::new();
        for (k, r) in &mine {
            self.unplug_remote(inner, k, r);
            self.plug_remote(inner, k, r);
            nets.insert(k.0.clone());
        }
        for n in nets {
            self.refresh_members(inner, &n);
        }
        self.refresh_vteps(inner);
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

    /// The hosts with endpoints on a network, to its tunnel and the VXLAN receiver (with the
    /// network's peers).
    pub(super) fn refresh_members(&self, inner: &Inner, net_id: &str) -> Vec<IpAddr> {
        let members: BTreeSet<IpAddr> = inner
            .remote
            .keys()
            .filter(|k| k.0 == net_id)
            .filter_map(|k| inner.nodes.get(&k.1).copied())
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
        self.refresh_vteps(inner);
        members
    }

    /// The VXLAN endpoints that trust this host's address (peers, and the other nodes): no
    /// container's UDP may reach them through NAT.
    pub(super) fn refresh_vteps(&self, inner: &Inner) {
        let port = self.vxlan.config.port;
        let vteps = inner
            .store
            .networks
            .values()
            .filter_map(|n| n.overlay.as_ref())
            .flat_map(|o| o.peers.iter().copied())
            .chain(inner.nodes.values().copied())
            .map(|ip| std::net::SocketAddr::new(ip, port))
            .collect();
        self.policy.write().vteps = vteps;
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
            tracing::warn!(endpoint = %ep.name, error = %e, "not published yet; tried again shortly");
            c.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Withdraws a local endpoint of an overlay network and gives its addresses back.
    pub(super) async fn cluster_withdraw(&self, ep: &Endpoint) {
        if let Some(c) = &self.cluster {
            c.withdraw(&ep.network_id, &ep.id).await;
            c.release(&ep.network_id, &addrs_of(ep), &ep.id).await;
        }
    }
}

/// Most endpoints of other hosts one daemon keeps.
const MAX_REMOTE: usize = 16_384;
/// Most overlay networks the cluster may give this host.
const MAX_OVERLAYS: usize = 1024;

/// Whether an overlay network from the store may be created here: a valid VNI no local network
/// has, a usable subnet that overlaps none here, a sane MTU, and room.
fn check_network(inner: &Inner, rec: &NetworkRecord) -> Result<(), String> {
    if rec.vni == 0 || rec.vni > vswitch_switch::vxlan::MAX_VNI {
        return Err(format!("invalid VNI {}", rec.vni));
    }
    if !(576..=65_520).contains(&rec.mtu) {
        return Err(format!("invalid MTU {}", rec.mtu));
    }
    crate::ipam::check_usable4(rec.subnet)?;
    if !crate::ipam::is_host4(rec.subnet, rec.gateway) {
        return Err(format!("gateway {} outside {}", rec.gateway, rec.subnet));
    }
    let nets = inner.store.networks.values();
    let mut overlays = 0;
    for n in nets {
        overlays += usize::from(n.overlay.is_some());
        if n.overlay.as_ref().is_some_and(|o| o.vni == rec.vni) {
            return Err(format!("VNI {} is network {}'s here", rec.vni, n.name));
        }
        if crate::ipam::overlaps4(n.subnet, rec.subnet) {
            return Err(format!(
                "subnet {} overlaps network {} here",
                rec.subnet, n.name
            ));
        }
    }
    if overlays >= MAX_OVERLAYS {
        return Err(format!("{MAX_OVERLAYS} overlay networks here already"));
    }
    Ok(())
}

fn addrs_of(ep: &Endpoint) -> Vec<IpAddr> {
    std::iter::once(IpAddr::V4(ep.ipv4))
        .chain(ep.ipv6.map(IpAddr::V6))
        .collect()
}
