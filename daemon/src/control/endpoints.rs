//! Endpoints: attach (plan, bind published ports, plumb the TAP, plug it into the datapath,
//! names, state), detach, garbage collection of endpoints whose target is gone, and restoring
//! every endpoint after a restart.

use std::net::IpAddr;

use vswitch_dns::EndpointRecords;
use vswitch_netdev::ns::NetNs;

use super::publish::{bind_one, bind_published};
use super::{Daemon, Inner, find_network, ids, render};
use crate::api::{AttachRequest, EndpointInfo, Target};
use crate::datapath::PortSpec;
use crate::error::{Error, ErrorKind, Result};
use crate::netns::plumb::{self, PlumbError, Plumbed, Plumbing};
use crate::netns::target::{NETNS_DIR, netns_path, open_target, target_pid};
use crate::netns::watch::Anchor;
use crate::nsfiles;
use crate::plan::{self, Mode};
use crate::state::{CniOwner, Connected, Endpoint, Network};

impl Daemon {
    /// `attach` and `network connect`. With a container's name as the target (and no
    /// `ip netns` of that name), the container joins the network through its init process, and
    /// joins it again at each of its later starts.
    pub async fn attach(&self, network: &str, req: AttachRequest) -> Result<EndpointInfo> {
        let began = std::time::Instant::now();
        let r = self.attach_request(network, req).await;
        if r.is_ok() {
            self.metrics
                .attach_duration
                .observe(began.elapsed().as_secs_f64());
        }
        r
    }

    async fn attach_request(&self, network: &str, mut req: AttachRequest) -> Result<EndpointInfo> {
        let mut inner = self.inner.lock().await;
        let container = match &req.target {
            Target::Name(n) if !std::path::Path::new(NETNS_DIR).join(n).exists() => inner
                .store
                .containers
                .values()
                .find(|c| &c.name == n)
                .cloned(),
            _ => None,
        };
        let Some(c) = container else {
            return self.attach_locked(&mut inner, network, req).await;
        };
        if !matches!(Mode::of(&c.network), Mode::Network(_)) {
            return Err(Error::bad_request(format!(
                "container {} runs with --network {}: only containers on a network can join another",
                c.name, c.network
            )));
        }
        let Some(pid) = c.pid else {
            return Err(Error::conflict(format!(
                "container {} is not running",
                c.name
            )));
        };
        if req.name.as_ref().is_some_and(|n| n != &c.name) {
            return Err(Error::bad_request(format!(
                "a container's endpoints carry its name ({}): no --name",
                c.name
            )));
        }
        if !req.ports.is_empty() {
            return Err(Error::bad_request(
                "publish a container's ports when it is created (vswitch run -p), not when it joins a network",
            ));
        }
        // What is kept for its next starts: the network, --ip and --alias; nothing else is
        // taken rather than forgotten at the first restart.
        if req.ipv6_address.is_some() || req.mac_address.is_some() || req.ifname.is_some() {
            return Err(Error::bad_request(
                "a container joins a network with --ip and --alias only (no --ip6, --mac or --ifname)",
            ));
        }
        let ip = match &req.ipv4_address {
            Some(s) => Some(
                s.parse()
                    .map_err(|_| Error::bad_request(format!("invalid IPv4 address {s:?}")))?,
            ),
            None => None,
        };
        let net_id = find_network(&inner.store, network)?.id.clone();
        req.target = Target::Pid(pid);
        req.name = Some(c.name.clone());
        // Recorded before the attach, whose one save then covers both; taken back if it fails.
        let before = c.connected.clone();
        if let Some(stored) = inner.store.containers.get_mut(&c.id) {
            stored.connected.retain(|x| x.network_id != net_id);
            stored.connected.push(Connected {
                network_id: net_id,
                ip,
                aliases: req.aliases.clone(),
            });
        }
        let attached = self.attach_locked(&mut inner, network, req).await;
        if attached.is_err()
            && let Some(stored) = inner.store.containers.get_mut(&c.id)
        {
            stored.connected = before;
        }
        attached
    }

    pub(super) async fn attach_locked(
        &self,
        inner: &mut Inner,
        network: &str,
        req: AttachRequest,
    ) -> Result<EndpointInfo> {
        self.attach_owned(inner, network, req, None).await
    }

    /// Attaches as `attach_locked`, for `owner` when a container engine asks through CNI: the
    /// namespace is then the engine's (its path is kept as given, and no resolv.conf is
    /// written: the engine writes the container's from the CNI result).
    pub(super) async fn attach_owned(
        &self,
        inner: &mut Inner,
        network: &str,
        mut req: AttachRequest,
        owner: Option<CniOwner>,
    ) -> Result<EndpointInfo> {
        // `/run/netns/X` is the `ip netns` X, when X can name an endpoint.
        if owner.is_none()
            && let Target::Name(n) = req.target.clone().normalized()
            && plan::valid_name(&n)
        {
            req.target = Target::Name(n);
        }
        let net = find_network(&inner.store, network)?.clone();
        let ns = open_target(&req.target)?;
        if ns.id() == self.own_netns {
            return Err(Error::bad_request(format!(
                "{} is the daemon's own network namespace; attach a container's namespace instead",
                req.target
            )));
        }
        if self.host_netns.contains(&ns.id()) && !req.force {
            return Err(Error::bad_request(format!(
                "{} is the host's initial network namespace (that of PID 1); add --force to \
                 attach it anyway",
                req.target
            )));
        }
        let ids = (ids::random_id(), ids::random_id());
        let mut ep = plan::plan_endpoint(&inner.store, &net, &req, ns.id(), ids.clone())?;
        // In a cluster, an overlay's addresses are claimed in the store first: another host
        // may have taken the one planned (then it is planned again, without it).
        let clustered = net.overlay.is_some() && self.node().is_some();
        if clustered {
            let mut tries = 0;
            while !self.cluster_claim(&ep).await? {
                tries += 1;
                if req.ipv4_address.is_some() || tries >= 16 {
                    return Err(Error::conflict(format!(
                        "address {} is taken by another host of the cluster",
                        ep.ipv4
                    )));
                }
                let held = inner.store.held.entry(net.id.clone()).or_default();
                held.addrs.insert(std::net::IpAddr::V4(ep.ipv4));
                held.addrs.extend(ep.ipv6.map(std::net::IpAddr::V6));
                ep = plan::plan_endpoint(&inner.store, &net, &req, ns.id(), ids.clone())?;
            }
        }
        let made = self
            .attach_planned(inner, &net, &req, ep.clone(), owner, ns)
            .await;
        if clustered {
            match &made {
                Ok(_) => self.cluster_publish(&ep).await,
                Err(_) => self.cluster_withdraw(&ep).await,
            }
        }
        made
    }

    /// The rest of [`Self::attach_owned`], once the endpoint is planned (and its addresses
    /// claimed in a cluster).
    async fn attach_planned(
        &self,
        inner: &mut Inner,
        net: &Network,
        req: &AttachRequest,
        mut ep: Endpoint,
        owner: Option<CniOwner>,
        ns: NetNs,
    ) -> Result<EndpointInfo> {
        let net = net.clone();
        ep.ports = plan::plan_ports(&net, &req.ports)?;
        ep.cni = owner;
        // Bind before plumbing: a host port in use fails the attach with nothing to undo.
        let listeners = bind_published(&ep.ports).await?;
        for (m, b) in ep.ports.iter_mut().zip(&listeners) {
            m.host_port = b.port();
            m.host_port_end = None;
        }
        let started = std::time::Instant::now();
        let mut plumbing = plumbing_for(&net, &ep);
        plumbing.ifname_auto = req.ifname.is_none();
        let made = self
            .plumb(ns, &req.target, plumbing)
            .await
            .map_err(|e| plumb_error(&req.target, e))?;
        let plumbed = started.elapsed();
        ep.route_metric = made.made.route_metric;
        ep.ifname = made.made.ifname;
        self.plug(inner, &net, &ep, made.fd).await?;
        self.publish(inner, &net, &ep, listeners);
        self.watch_target(&ep);
        ep.wrote_resolv_conf = nsfiles::may_claim_resolv_conf(&inner.store, &ep);
        inner.store.endpoints.insert(ep.id.clone(), ep.clone());
        self.refresh_policy_ports(&inner.store);
        if let Err(e) = self.persist(&inner.store) {
            self.unplug(inner, &ep).await;
            return Err(e);
        }
        // Stored first: a crash from here on restores the file at restart.
        if ep.wrote_resolv_conf && !nsfiles::write_claimed_resolv_conf(&ep, &net) {
            ep.wrote_resolv_conf = false;
            if let Some(stored) = inner.store.endpoints.get_mut(&ep.id) {
                stored.wrote_resolv_conf = false;
            }
            let _ = self.persist(&inner.store);
        }
        tracing::info!(
            endpoint = %ep.name, network = %net.name, ip = %ep.ipv4, target = %ep.target,
            plumb_ms = plumbed.as_secs_f64() * 1e3, total_ms = started.elapsed().as_secs_f64() * 1e3,
            "endpoint attached"
        );
        Ok(render::endpoint_info(&net, &ep))
    }

    /// Plugs an endpoint's TAP into its network's datapath and enters its names in the DNS
    /// catalog (for every network: the bridge's zone keeps them for PTR scoping but resolves
    /// no names). They resolve from here on, before attach returns.
    pub(super) async fn plug(
        &self,
        inner: &mut Inner,
        net: &Network,
        ep: &Endpoint,
        fd: std::os::fd::OwnedFd,
    ) -> Result<()> {
        let live = inner
            .live
            .get_mut(&net.id)
            .ok_or_else(|| Error::internal("network has no datapath"))?;
        let port = live
            .datapath
            .add_port(
                fd,
                PortSpec {
                    endpoint_id: ep.id.clone(),
                    endpoint_name: ep.name.clone(),
                    namespace: scope_key(ep),
                    mac: ep.mac.0,
                    guard: guard(net, ep),
                    addrs: std::iter::once(std::net::IpAddr::V4(ep.ipv4))
                        .chain(ep.ipv6.map(std::net::IpAddr::V6))
                        .collect(),
                },
            )
            .await
            .map_err(|e| Error::failed("cannot plug the endpoint in", e))?;
        live.ports.insert(ep.id.clone(), port);
        self.catalog.write().add_endpoint(&net.id, &records(ep));
        Ok(())
    }

    /// Creates and configures the endpoint's TAP in its namespace: directly as root, through the
    /// single-threaded helper process when rootless.
    async fn plumb(
        &self,
        ns: NetNs,
        target: &Target,
        plumbing: Plumbing,
    ) -> anyhow::Result<Plumbed> {
        if !self.rootless {
            return tokio::task::spawn_blocking(move || plumb::plumb(&ns, &plumbing)).await?;
        }
        let Some(pid) = target_pid(target) else {
            return Err(PlumbError::NeedsPid.into());
        };
        tokio::task::spawn_blocking(move || plumb::plumb_via_helper(pid, &plumbing)).await?
    }

    /// Ties the endpoint's life to its target: the process, or the namespace file (see
    /// [`crate::netns::watch`]). Every TAP pins its namespace, so the device never goes away
    /// by itself.
    pub(super) fn watch_target(&self, ep: &Endpoint) {
        let anchor = match (target_pid(&ep.target), netns_path(&ep.target)) {
            (Some(pid), _) => Anchor::Process(pid),
            (None, Ok(path)) => Anchor::Path(path),
            (None, Err(_)) => return,
        };
        self.targets.watch(&ep.id, anchor, ep.ns);
    }

    /// Removes an endpoint's port, names, published ports and resolv.conf, and forgets it (the
    /// caller saves the state).
    pub(super) async fn unplug(&self, inner: &mut Inner, ep: &Endpoint) {
        let overlay = inner
            .store
            .networks
            .get(&ep.network_id)
            .is_some_and(|n| n.overlay.is_some());
        if overlay {
            self.cluster_withdraw(ep).await;
        }
        self.targets.forget(&ep.id);
        self.catalog.write().remove_endpoint(&ep.network_id, &ep.id);
        if let Some(live) = inner.live.get_mut(&ep.network_id) {
            for h in live.published.remove(&ep.id).into_iter().flatten() {
                h.abort();
            }
            if let Some(port) = live.ports.remove(&ep.id)
                && let Err(e) = live.datapath.remove_port(port).await
            {
                tracing::warn!(endpoint = %ep.name, error = %e, "cannot unplug");
            }
        }
        inner.store.endpoints.remove(&ep.id);
        nsfiles::release_resolv_conf(&mut inner.store, ep);
        self.refresh_policy_ports(&inner.store);
    }

    /// Detaches endpoints: all endpoints called `name`, or only the one on `network`.
    pub async fn detach(&self, name: &str, network: Option<&str>) -> Result<()> {
        let mut inner = self.inner.lock().await;
        let net_id = match network {
            Some(key) => Some(find_network(&inner.store, key)?.id.clone()),
            None => None,
        };
        let victims: Vec<Endpoint> = inner
            .store
            .endpoints
            .values()
            .filter(|e| e.name == name || e.id == name)
            .filter(|e| net_id.as_ref().is_none_or(|n| &e.network_id == n))
            .cloned()
            .collect();
        if victims.is_empty() {
            // A stopped container leaves a network it joined with `network connect`.
            if let Some(id) = &net_id
                && let Some(c) = inner
                    .store
                    .containers
                    .values_mut()
                    .find(|c| c.name == name && c.connected.iter().any(|x| &x.network_id == id))
            {
                c.connected.retain(|x| &x.network_id != id);
                return self.persist(&inner.store);
            }
            return Err(Error::not_found(match network {
                Some(n) => format!("endpoint {name} not found on network {n}"),
                None => format!("endpoint {name} not found"),
            }));
        }
        for ep in &victims {
            self.unplug(&mut inner, ep).await;
            tracing::info!(endpoint = %ep.name, "endpoint detached");
            // A container leaves a network it joined later for good, not until its next start.
            for c in inner.store.containers.values_mut() {
                if matches!(ep.target, Target::Pid(p) if c.pid == Some(p)) {
                    c.connected.retain(|x| x.network_id != ep.network_id);
                }
            }
        }
        self.persist(&inner.store)
    }

    pub async fn endpoints(&self) -> Vec<EndpointInfo> {
        let inner = self.inner.lock().await;
        inner
            .store
            .endpoints
            .values()
            .filter_map(|e| {
                Some(render::endpoint_info(
                    inner.store.networks.get(&e.network_id)?,
                    e,
                ))
            })
            .collect()
    }

    /// After a restart: plug every stored endpoint in again, or drop it (logged) if its
    /// namespace is gone.
    pub(super) async fn restore_endpoints(&self, inner: &mut Inner) {
        let mut endpoints: Vec<Endpoint> = inner.store.endpoints.values().cloned().collect();
        // Lower metrics first, so that they get theirs back even when a route that is not ours
        // pushes some up. Stores from before metrics: eth0 before eth1, the order they were
        // attached in.
        let order = |e: &Endpoint| (e.route_metric.unwrap_or(u32::MAX), e.ifname.len());
        endpoints.sort_by(|a, b| (order(a), &a.ifname).cmp(&(order(b), &b.ifname)));
        if !endpoints.is_empty() {
            tracing::info!(endpoints = endpoints.len(), "restoring endpoints");
        }
        let mut progress = super::progress::Progress::new(
            "endpoints restored",
            endpoints.len(),
            std::time::Instant::now(),
        );
        for ep in endpoints {
            // The state file was checked at load: every endpoint's network is there.
            let Some(net) = inner.store.networks.get(&ep.network_id).cloned() else {
                continue;
            };
            let r = self.replumb(inner, &net, &ep).await;
            if let Some(line) = progress.step(r.is_ok(), std::time::Instant::now()) {
                tracing::info!("{line}");
            }
            match r {
                Ok(()) => {
                    tracing::debug!(endpoint = %ep.name, network = %net.name, "endpoint restored");
                    nsfiles::restore_netns_resolv_conf(&ep, &net);
                }
                Err(e) => {
                    tracing::warn!(endpoint = %ep.name, network = %net.name, error = %e, "endpoint dropped at restart: its namespace is gone");
                    // The stored copy: an earlier drop may have handed it the resolv.conf.
                    let ep = inner.store.endpoints.remove(&ep.id).unwrap_or(ep);
                    nsfiles::release_resolv_conf(&mut inner.store, &ep);
                }
            }
        }
    }

    async fn replumb(&self, inner: &mut Inner, net: &Network, ep: &Endpoint) -> Result<()> {
        let ns = open_target(&ep.target)?;
        let mut ep = ep.clone();
        let unsettled = ep.docker.is_some() && ep.ns == super::docker_ep::UNKNOWN_NS;
        if unsettled {
            // Joined, and the daemon stopped before Docker had made the sandbox: take it now,
            // unless it is the daemon's or the host's own.
            if ns.id() == self.own_netns || self.host_netns.contains(&ns.id()) {
                return Err(Error::forbidden(format!(
                    "{} is the daemon's or the host's namespace",
                    ep.target
                )));
            }
            ep.ns = ns.id();
            if let Some(stored) = inner.store.endpoints.get_mut(&ep.id) {
                stored.ns = ep.ns;
            }
        }
        if ns.id() != ep.ns {
            return Err(Error::not_found(format!(
                "{} is no longer the namespace the endpoint was attached to",
                ep.target
            )));
        }
        if ep.route_metric.is_none() && !net.internal {
            // Stored before route metrics existed: take the next free one, and keep it.
            let metric = plan::route_metric_for(&inner.store, ep.ns);
            if let Some(stored) = inner.store.endpoints.get_mut(&ep.id) {
                stored.route_metric = Some(metric);
            }
            ep.route_metric = Some(metric);
        }
        // A host port taken while the daemon was down costs that mapping, not the endpoint:
        // the container keeps its network (logged; `vswitch port` stops listing it).
        let mut listeners = Vec::new();
        let mut kept = Vec::new();
        for m in &ep.ports {
            // Stored mappings are single ports (a range was settled when first bound).
            match bind_one(m).await {
                Ok(bound) => {
                    listeners.push(bound);
                    kept.push(*m);
                }
                // Taken by something else: gone for good. Anything else (the host address
                // not up yet at boot, say) keeps the mapping for the next start.
                Err(e) if e.in_use => {
                    tracing::warn!(endpoint = %ep.name, error = %e.error, "published port dropped at restart")
                }
                Err(e) => {
                    tracing::warn!(endpoint = %ep.name, error = %e.error, "published port not bound this time");
                    kept.push(*m);
                }
            }
        }
        if kept.len() != ep.ports.len() {
            if let Some(stored) = inner.store.endpoints.get_mut(&ep.id) {
                stored.ports.clone_from(&kept);
            }
            ep.ports = kept;
        }
        let mut plumbing = plumbing_for(net, &ep);
        // Its name in the sandbox was never learnt: take the next free `ethN`.
        plumbing.ifname_auto = unsettled;
        let plumbed = self
            .plumb(ns, &ep.target, plumbing)
            .await
            .map_err(|e| plumb_error(&ep.target, e))?;
        if let Some(stored) = inner.store.endpoints.get_mut(&ep.id) {
            stored.route_metric = plumbed.made.route_metric;
            stored.ifname = plumbed.made.ifname.clone();
        }
        self.plug(inner, net, &ep, plumbed.fd).await?;
        self.publish(inner, net, &ep, listeners);
        self.watch_target(&ep);
        Ok(())
    }
}

/// The namespace an endpoint's DNS scope is keyed by. A Docker endpoint's namespace is not
/// there yet when it joins (dockerd makes it with the container), so its sandbox's path
/// stands for it: every endpoint of one container has the same.
pub(super) fn scope_key(ep: &Endpoint) -> String {
    match (&ep.docker, &ep.target) {
        (Some(_), Target::Path(p)) => format!("sandbox:{p}"),
        _ => ep.ns.to_string(),
    }
}

/// An endpoint's entry in the DNS catalog.
pub(super) fn records(ep: &Endpoint) -> EndpointRecords {
    EndpointRecords {
        id: ep.id.clone(),
        scope: scope_key(ep),
        name: ep.name.clone(),
        aliases: ep.aliases.clone(),
        addrs: std::iter::once(IpAddr::V4(ep.ipv4))
            .chain(ep.ipv6.map(IpAddr::V6))
            .collect(),
    }
}

/// What `ep`'s port may send from, on a network with port security.
fn guard(net: &Network, ep: &Endpoint) -> Option<vswitch_switch::PortGuard> {
    net.port_security
        .is_strict()
        .then(|| vswitch_switch::PortGuard {
            mac: ep.mac,
            ipv4: vec![ep.ipv4],
            ipv6: ep.ipv6.into_iter().collect(),
        })
}

/// What the device of `ep` on `net` should look like.
fn plumbing_for(net: &Network, ep: &Endpoint) -> Plumbing {
    Plumbing {
        ifname: ep.ifname.clone(),
        mac: ep.mac.0,
        mtu: net.mtu,
        // Overlay frames that leave in the tunnel are segmented and checksummed there.
        offloads: true,
        ipv4: (ep.ipv4, net.subnet.prefix_len()),
        gateway4: net.gateway,
        ipv6: ep.ipv6.zip(net.subnet6).map(|(ip, s)| (ip, s.prefix_len())),
        gateway6: net.gateway6,
        route_metric: ep.route_metric,
        ifname_auto: false,
    }
}

/// A failed plumbing as the client sees it: what the request got wrong where it is known,
/// a failure of the daemon otherwise.
fn plumb_error(target: &Target, e: anyhow::Error) -> Error {
    let kind = match e.downcast_ref::<PlumbError>() {
        Some(p) => p.kind(),
        None => ErrorKind::Internal,
    };
    Error::new(kind, format!("cannot attach {target}: {e:#}"))
}
