//! Networks: create, remove, list and inspect, and each datapath's FDB and counters.

use std::net::IpAddr;
use std::time::Duration;

use super::{Daemon, Inner, find_network, ids, render, subnets};
use crate::api::{Created, FdbRow, NetworkCreate, NetworkInspect, NetworkStats};
use crate::cluster::records::NetworkRecord;
use crate::error::{Error, Result};
use crate::ipam;
use crate::plan::{self, DEFAULT_NETWORK, HostFacts};
use crate::state::Network;

/// Most external VTEPs one overlay network takes.
const MAX_PEERS: usize = 64;

/// What the daemon's network namespace has: its IPv4 routes, which automatic subnets stay
/// clear of, and its addresses, which no subnet may contain (empty if they cannot be read).
pub(super) fn host_facts(loopback_open: bool, advertise: Option<IpAddr>) -> HostFacts {
    let routes = std::fs::read_to_string("/proc/net/route")
        .map(|t| ipam::parse_proc_net_route(&t))
        .unwrap_or_default();
    let addrs = nix::ifaddrs::getifaddrs()
        .map(|ifs| {
            ifs.filter_map(|i| {
                let a = i.address?;
                a.as_sockaddr_in()
                    .map(|v4| IpAddr::V4(v4.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
            })
            .collect()
        })
        .unwrap_or_default();
    HostFacts {
        routes,
        addrs,
        loopback_open,
        // An IPv6 outer header is 20 bytes longer than the IPv4 one VXLAN's 50 count.
        underlay_mtu: underlay_mtu(advertise).unwrap_or(1500).saturating_sub(
            if advertise.is_some_and(|a| a.is_ipv6()) {
                20
            } else {
                0
            },
        ),
    }
}

/// The MTU of the link holding `advertise` (or, without one, of the default route's link).
fn underlay_mtu(advertise: Option<IpAddr>) -> Option<u32> {
    let dev = match advertise {
        Some(a) => nix::ifaddrs::getifaddrs().ok()?.find_map(|i| {
            let addr = i.address?;
            let ip = addr
                .as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))?;
            (ip == a).then_some(i.interface_name)
        })?,
        None => std::fs::read_to_string("/proc/net/route")
            .ok()?
            .lines()
            .skip(1)
            .find_map(|l| {
                let mut f = l.split_whitespace();
                let dev = f.next()?;
                (f.next()? == "00000000").then(|| dev.to_owned())
            })?,
    };
    std::fs::read_to_string(format!("/sys/class/net/{dev}/mtu"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

impl Daemon {
    pub async fn networks(&self) -> Vec<NetworkInspect> {
        let inner = self.inner.lock().await;
        let mut nets: Vec<&Network> = inner.store.networks.values().collect();
        nets.sort_by(|a, b| {
            (a.name != DEFAULT_NETWORK, &a.name).cmp(&(b.name != DEFAULT_NETWORK, &b.name))
        });
        nets.into_iter()
            .map(|n| render::inspect(&inner.store, n))
            .collect()
    }

    pub async fn network(&self, key: &str) -> Result<NetworkInspect> {
        let inner = self.inner.lock().await;
        let net = find_network(&inner.store, key)?;
        Ok(render::inspect(&inner.store, net))
    }

    pub async fn create_network(&self, req: NetworkCreate) -> Result<Created> {
        let mut inner = self.inner.lock().await;
        let mut net = plan::plan_network(
            &inner.store,
            req,
            &host_facts(
                self.policy.read().host_loopback,
                self.vxlan.config.advertise,
            ),
            ids::random_id(),
            ids::now(),
        )?;
        if let (Some(c), Some(_)) = (self.cluster(), &net.overlay) {
            // The name and the VNI are claimed for the whole cluster; a VNI another host took
            // meanwhile is skipped.
            let mut tries = 0;
            loop {
                let rec =
                    NetworkRecord::of(&net).ok_or_else(|| Error::internal("not an overlay"))?;
                if c.create_network(&rec).await? {
                    break;
                }
                if c.network_exists(&net.name).await? {
                    return Err(Error::conflict(format!(
                        "network {} exists in the cluster already",
                        net.name
                    )));
                }
                tries += 1;
                if tries >= 64 {
                    return Err(Error::conflict("no free VXLAN network identifier"));
                }
                if let Some(o) = net.overlay.as_mut() {
                    o.vni += 1;
                }
            }
        }
        self.add_network(&mut inner, net).await
    }

    /// Starts a planned network and stores it.
    pub(super) async fn add_network(&self, inner: &mut Inner, net: Network) -> Result<Created> {
        let live = self.start_network(&net)?;
        inner.live.insert(net.id.clone(), live);
        inner.store.networks.insert(net.id.clone(), net.clone());
        if let Err(e) = self.persist(&inner.store) {
            inner.store.networks.remove(&net.id);
            inner.live.remove(&net.id);
            self.forget_network(&net);
            return Err(e);
        }
        tracing::info!(name = %net.name, id = %net.id, subnet = %net.subnet, "network created");
        Ok(Created { id: net.id })
    }

    pub async fn remove_network(&self, key: &str) -> Result<()> {
        let mut inner = self.inner.lock().await;
        let net = find_network(&inner.store, key)?.clone();
        if let (Some(c), Some(rec)) = (self.cluster(), NetworkRecord::of(&net)) {
            if inner.store.endpoints_of(&net.id).next().is_some() {
                return Err(Error::forbidden(format!(
                    "network {} has active endpoints",
                    net.name
                )));
            }
            if let Some(node) = c.remove_network(&rec).await? {
                return Err(Error::forbidden(format!(
                    "network {} has endpoints on host {node}",
                    net.name
                )));
            }
        }
        if let Some(d) = &net.docker {
            return Err(Error::forbidden(format!(
                "network {} belongs to Docker (network {}): remove it with docker network rm",
                net.name,
                &d.id[..d.id.len().min(12)]
            )));
        }
        self.drop_network(&mut inner, net).await
    }

    /// Removes a network without endpoints.
    pub(super) async fn drop_network(&self, inner: &mut Inner, net: Network) -> Result<()> {
        inner.remote.retain(|k, _| k.0 != net.id);
        if net.name == DEFAULT_NETWORK {
            return Err(Error::forbidden(
                "bridge is a pre-defined network and cannot be removed",
            ));
        }
        if inner.store.endpoints_of(&net.id).next().is_some() {
            return Err(Error::forbidden(format!(
                "network {} has active endpoints",
                net.name
            )));
        }
        inner.store.networks.remove(&net.id);
        if let Err(e) = self.persist(&inner.store) {
            inner.store.networks.insert(net.id.clone(), net);
            return Err(e);
        }
        inner.live.remove(&net.id);
        self.forget_network(&net);
        tracing::info!(name = %net.name, "network removed");
        Ok(())
    }

    /// Takes a network out of the DNS catalog and the NAT policy.
    fn forget_network(&self, net: &Network) {
        if let Some(o) = &net.overlay
            && let Ok(sockets) = self.vxlan.sockets()
        {
            sockets.unregister(o.vni);
        }
        self.catalog.write().remove_network(&net.id);
        let gone: Vec<ipnet::IpNet> = subnets(net).collect();
        self.policy.write().subnets.retain(|s| !gone.contains(s));
    }

    /// `network peer add` / `peer rm`: an external VTEP of an overlay network.
    pub async fn set_peer(&self, key: &str, peer: IpAddr, add: bool) -> Result<()> {
        let mut inner = self.inner.lock().await;
        let net = find_network(&inner.store, key)?.clone();
        let Some(overlay) = &net.overlay else {
            return Err(Error::bad_request(format!(
                "network {} is not an overlay network",
                net.name
            )));
        };
        if peer.is_unspecified() || peer.is_multicast() || peer.is_loopback() {
            return Err(Error::bad_request(format!(
                "{peer} cannot be a VXLAN peer (a unicast address of another host)"
            )));
        }
        if add {
            if host_facts(false, None).addrs.contains(&peer) {
                return Err(Error::bad_request(format!(
                    "{peer} is an address of this host, not a peer"
                )));
            }
            let v6 = self.vxlan.config.advertise.is_some_and(|a| a.is_ipv6());
            if peer.is_ipv6() != v6 {
                return Err(Error::bad_request(format!(
                    "{peer} is not of the underlay's address family (that of --advertise-addr)"
                )));
            }
        }
        let mut peers = overlay.peers.clone();
        match (add, peers.contains(&peer)) {
            (true, true) | (false, false) => return Ok(()),
            (true, false) if peers.len() >= MAX_PEERS => {
                return Err(Error::conflict(format!(
                    "network {} has {MAX_PEERS} peers already",
                    net.name
                )));
            }
            (true, false) => peers.push(peer),
            (false, true) => peers.retain(|p| *p != peer),
        }
        // In a cluster, peers are the whole cluster's: every host replicates to them.
        if let Some(c) = self.cluster() {
            c.set_peer(&net.id, peer, add).await?;
        }
        self.set_peers(&mut inner, &net, peers)?;
        tracing::info!(network = %net.name, %peer, add, "overlay peers changed");
        Ok(())
    }

    /// Gives an overlay network these peers: stored, and applied to its tunnel and to who may
    /// send its VXLAN (members and peers).
    pub(super) fn set_peers(
        &self,
        inner: &mut Inner,
        net: &Network,
        peers: Vec<IpAddr>,
    ) -> Result<()> {
        let mut changed = net.clone();
        if let Some(o) = changed.overlay.as_mut() {
            o.peers.clone_from(&peers);
        }
        inner.store.networks.insert(net.id.clone(), changed);
        if let Err(e) = self.persist(&inner.store) {
            inner.store.networks.insert(net.id.clone(), net.clone());
            return Err(e);
        }
        if let Some(live) = inner.live.get(&net.id) {
            live.datapath
                .set_peers(peers)
                .map_err(|e| Error::failed("cannot reach the datapath", e))?;
        }
        self.refresh_members(inner, &net.id);
        Ok(())
    }

    pub async fn fdb(&self, key: &str) -> Result<Vec<FdbRow>> {
        let inner = self.inner.lock().await;
        let net = find_network(&inner.store, key)?;
        let live = inner
            .live
            .get(&net.id)
            .ok_or_else(|| Error::internal("network has no datapath"))?;
        live.datapath
            .fdb()
            .await
            .map_err(|e| Error::failed("cannot read the FDB", e))
    }

    pub async fn stats(&self, key: Option<&str>) -> Result<Vec<NetworkStats>> {
        let inner = self.inner.lock().await;
        let ids: Vec<String> = match key {
            Some(k) => vec![find_network(&inner.store, k)?.id.clone()],
            None => {
                let mut nets: Vec<&Network> = inner.store.networks.values().collect();
                nets.sort_by(|a, b| a.name.cmp(&b.name));
                nets.into_iter().map(|n| n.id.clone()).collect()
            }
        };
        // Asked under the lock, awaited without it: a slow answer holds up no attach.
        let asked = ask_counters(&inner, &ids);
        drop(inner);
        let mut out = Vec::new();
        for rx in asked {
            let stats = rx
                .await
                .map_err(|e| Error::failed("cannot read the counters", e))?;
            out.push(stats);
        }
        Ok(out)
    }

    /// `GET /metrics`: the counters of every network's datapath and the daemon's histograms,
    /// as OpenMetrics text. The datapaths are asked by message under the control lock, which
    /// is let go before the answers are awaited (a second at most each): a scraper never
    /// holds up attaches. A datapath that does not answer is left out; its endpoints are
    /// still counted.
    pub async fn metrics_text(&self) -> String {
        let inner = self.inner.lock().await;
        let mut nets: Vec<&Network> = inner.store.networks.values().collect();
        nets.sort_by(|a, b| a.name.cmp(&b.name));
        let endpoints: Vec<(String, usize)> = nets
            .iter()
            .map(|n| (n.name.clone(), inner.store.endpoints_of(&n.id).count()))
            .collect();
        let ids: Vec<String> = nets.iter().map(|n| n.id.clone()).collect();
        let asked = ask_counters(&inner, &ids);
        drop(inner);
        let mut networks = Vec::new();
        for rx in asked {
            if let Ok(Ok(stats)) = tokio::time::timeout(Duration::from_secs(1), rx).await {
                networks.push(stats);
            }
        }
        let snapshot = crate::metrics::Snapshot {
            networks,
            endpoints,
        };
        crate::metrics::render(&snapshot, &self.metrics)
    }

    /// `GET /info`.
    pub async fn info(&self) -> crate::api::DaemonInfo {
        let inner = self.inner.lock().await;
        let mut features: Vec<String> = ["dns", "nat", "published-ports", "cni", "metrics"]
            .map(String::from)
            .to_vec();
        if self.vxlan.config.advertise.is_some() || self.cluster.is_some() {
            features.push("overlay".into());
        }
        if self.cluster.is_some() {
            features.push("cluster".into());
        }
        crate::api::DaemonInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            state_dir: self.state_dir.path().display().to_string(),
            rootless: self.rootless,
            upstreams: self
                .dns
                .forwarder
                .upstreams()
                .iter()
                .map(ToString::to_string)
                .collect(),
            networks: inner.store.networks.len(),
            endpoints: inner.store.endpoints.len(),
            containers: inner.store.containers.len(),
            running_containers: inner
                .store
                .containers
                .values()
                .filter(|c| c.pid.is_some())
                .count(),
            features,
            node: self.node().map(str::to_owned),
        }
    }
}

/// Asks the running datapaths of networks `ids` for their counters, in that order, and returns
/// where the answers will arrive: the caller lets go of the control lock before it waits.
fn ask_counters(
    inner: &Inner,
    ids: &[String],
) -> Vec<tokio::sync::oneshot::Receiver<NetworkStats>> {
    ids.iter()
        .filter_map(|id| inner.live.get(id)?.datapath.request_stats())
        .collect()
}
