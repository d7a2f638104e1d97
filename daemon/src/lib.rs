//! The daemon: control API, state, IPAM and attach orchestration around the per-network
//! datapaths.
//!
//! All control-plane changes go through [`Daemon`], which holds the state behind one async
//! mutex: a request either completes every step (namespace plumbing, datapath port, DNS names,
//! persisted state) or undoes the ones it did, and no other request sees the half-way state.

pub mod api;
pub mod container_init;
mod containers;
pub mod datapath;
pub mod direct;
pub mod ipam;
pub mod nat;
pub mod plumb;
mod server;
pub mod state;
mod watch;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::Context;
use tokio::sync::Mutex;
use vswitch_dns::upstream::{Forwarder, Upstreams};
use vswitch_dns::{Catalog, EndpointRecords, Responder, Zone};
use vswitch_nat::GatewayConfig;
use vswitch_netdev::ns::{NetNs, NsId};
use vswitch_switch::{MacAddr, PortId};

use crate::api::{
    AttachRequest, ContainerEntry, Created, EndpointInfo, FdbRow, Ipam, IpamConfig, NetworkCreate,
    NetworkInspect, NetworkStats, Target,
};
use datapath::{Datapath, DnsHook, Event, ForwardJob};
use plumb::Plumbing;
use state::{Endpoint, Network, StateDir, Store};

pub use server::serve;

pub use server::Options;

pub const DEFAULT_NETWORK: &str = "bridge";
const DEFAULT_MTU: u32 = 1500;

/// An error for an API client: an HTTP status and one line of text.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: m.into(),
        }
    }
    pub fn forbidden(m: impl Into<String>) -> Self {
        Self {
            status: 403,
            message: m.into(),
        }
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self {
            status: 404,
            message: m.into(),
        }
    }
    pub fn conflict(m: impl Into<String>) -> Self {
        Self {
            status: 409,
            message: m.into(),
        }
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Self {
            status: 500,
            message: m.into(),
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        Self::internal(format!("{e:#}"))
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// A network that is up: its datapath thread and the endpoints plugged into it.
struct LiveNetwork {
    datapath: Datapath,
    ports: HashMap<String, PortId>,
    /// Accept loops of published ports, per endpoint.
    published: HashMap<String, Vec<tokio::task::AbortHandle>>,
}

impl Drop for LiveNetwork {
    fn drop(&mut self) {
        for h in self.published.values().flatten() {
            h.abort();
        }
    }
}

/// DNS and NAT settings of the daemon.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// `--dns-upstream`; empty means the nameservers of `resolv_conf`.
    pub upstreams: Vec<SocketAddr>,
    pub resolv_conf: PathBuf,
    pub ttl: u32,
    /// Most queries relayed upstream at once; beyond it clients get REFUSED.
    pub max_forwards: usize,
    /// `--allow-host-loopback`: containers reach every service on the host's loopback through
    /// the gateway address, not only published ports.
    pub host_loopback: bool,
    /// `--datapath-nice`: scheduling weight of the datapath threads.
    pub datapath_nice: i32,
    /// `--datapath-busy-poll`: how long a datapath polls after traffic before it sleeps.
    pub datapath_busy_poll: std::time::Duration,
}

struct Inner {
    store: Store,
    /// Exit watchers of running containers, by container id.
    watchers: HashMap<String, tokio::task::AbortHandle>,
    live: HashMap<String, LiveNetwork>,
}

pub struct Daemon {
    inner: Mutex<Inner>,
    state_dir: StateDir,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    own_netns: NsId,
    catalog: Arc<RwLock<Catalog>>,
    dns: DnsHook,
    nat_jobs: tokio::sync::mpsc::UnboundedSender<nat::NatJob>,
    policy: nat::SharedPolicy,
    /// Running without root: TAPs are made by a helper inside the target's namespaces.
    rootless: bool,
    /// Collects endpoints whose target (process or namespace file) is gone.
    targets: watch::TargetWatch,
    /// Sockets inside containers' namespaces for the in-kernel path of published TCP ports
    /// (root; a rootless daemon cannot enter them and starts a helper per endpoint instead).
    ns_sockets: Option<direct::SocketFactory>,
    datapath_nice: i32,
    datapath_busy_poll: std::time::Duration,
}

impl Daemon {
    /// Loads (or initialises) the state, starts every network's datapath and re-plumbs the
    /// endpoints whose namespaces still exist. Returns the daemon and the receiver of datapath
    /// events, which the caller feeds back through [`Daemon::handle_event`].
    pub async fn start(
        state_dir: &Path,
        dns: &RuntimeOptions,
    ) -> anyhow::Result<(Arc<Self>, tokio::sync::mpsc::UnboundedReceiver<Event>)> {
        let state_dir = StateDir::new(state_dir)?;
        raise_fd_limit();
        let host_loopback = dns.host_loopback;
        let datapath_nice = dns.datapath_nice;
        let datapath_busy_poll = dns.datapath_busy_poll;
        let rootless = !nix::unistd::geteuid().is_root();
        let catalog = Arc::new(RwLock::new(Catalog::default()));
        let responder = Arc::new(Responder::new(catalog.clone(), dns.ttl));
        let upstreams = Arc::new(Upstreams::new(
            dns.upstreams.clone(),
            dns.resolv_conf.clone(),
        ));
        let forwarder = Forwarder::new(upstreams, dns.max_forwards);
        let (jobs, job_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(run_forwarder(forwarder.clone(), job_rx));
        let dns = DnsHook {
            responder,
            forwarder,
            jobs,
        };
        let (nat_jobs, nat_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(nat::run_jobs(nat_rx));
        let policy = Arc::new(RwLock::new(nat::Policy {
            host_loopback,
            ..Default::default()
        }));
        let (events, rx) = tokio::sync::mpsc::unbounded_channel();
        let targets = watch::TargetWatch::start(events.clone());
        let own_netns = NetNs::current()
            .context("cannot open the daemon's own network namespace")?
            .id();
        let loaded = state_dir.load()?;
        let fresh = loaded.is_none();
        let store = loaded.unwrap_or_default();
        let daemon = Arc::new(Self {
            inner: Mutex::new(Inner {
                store,
                live: HashMap::new(),
                watchers: HashMap::new(),
            }),
            state_dir,
            events,
            own_netns,
            catalog,
            dns,
            nat_jobs,
            policy,
            rootless,
            targets,
            ns_sockets: if !rootless {
                match direct::SocketFactory::start() {
                    Ok(f) => Some(f),
                    Err(e) => {
                        tracing::warn!(error = %e, "in-kernel published ports unavailable");
                        None
                    }
                }
            } else {
                None
            },
            datapath_nice,
            datapath_busy_poll,
        });
        {
            let mut inner = daemon.inner.lock().await;
            if inner.store.find_network(DEFAULT_NETWORK).is_none() {
                let bridge = Network {
                    id: random_id(),
                    name: DEFAULT_NETWORK.to_owned(),
                    created: now_rfc3339(),
                    subnet: "172.17.0.0/16".parse().context("bridge subnet")?,
                    gateway: Ipv4Addr::new(172, 17, 0, 1),
                    ip_range: None,
                    subnet6: None,
                    gateway6: None,
                    internal: false,
                    mtu: DEFAULT_MTU,
                    dns_names: false,
                };
                tracing::info!(id = %bridge.id, "created the default network bridge (172.17.0.0/16)");
                inner.store.networks.insert(bridge.id.clone(), bridge);
            }
            let networks: Vec<Network> = inner.store.networks.values().cloned().collect();
            for net in &networks {
                let live = daemon.start_network(net)?;
                inner.live.insert(net.id.clone(), live);
            }
            if !fresh {
                daemon.restore_endpoints(&mut inner).await;
            }
            daemon.refresh_policy_ports(&inner.store);
            daemon.adopt_containers(&mut inner);
            daemon.state_dir.save(&inner.store)?;
        }
        Ok((daemon, rx))
    }

    fn start_network(&self, net: &Network) -> anyhow::Result<LiveNetwork> {
        let gateway = GatewayConfig {
            mac: gateway_mac(net).0,
            ipv4: Some((net.gateway, net.subnet.prefix_len())),
            ipv6: net
                .subnet6
                .zip(net.gateway6)
                .map(|(s, g)| (g, s.prefix_len())),
            mtu: net.mtu as usize,
            nat: !net.internal,
        };
        let datapath = Datapath::start(
            datapath::DatapathSpec {
                network_id: net.id.clone(),
                network_name: net.name.clone(),
                gateway,
                nice: self.datapath_nice,
                busy_poll: self.datapath_busy_poll,
            },
            Some(self.dns.clone()),
            self.nat_jobs.clone(),
            self.policy.clone(),
            self.events.clone(),
        )
        .with_context(|| format!("cannot start the datapath of network {}", net.name))?;
        self.refresh_policy_subnets_with(net);
        let mut subnets = vec![(IpAddr::V4(net.subnet.network()), net.subnet.prefix_len())];
        if let Some(s6) = net.subnet6 {
            subnets.push((IpAddr::V6(s6.network()), s6.prefix_len()));
        }
        self.catalog_mut().add_network(
            &net.id,
            Zone::new(&net.name, net.dns_names, net.internal, subnets),
        );
        Ok(LiveNetwork {
            datapath,
            ports: HashMap::new(),
            published: HashMap::new(),
        })
    }

    /// After a restart: plug every stored endpoint in again, or drop it if its namespace is gone.
    async fn restore_endpoints(&self, inner: &mut Inner) {
        let mut endpoints: Vec<Endpoint> = inner.store.endpoints.values().cloned().collect();
        // Lower metrics first, so that they get theirs back even when a route that is not ours
        // pushes some up.
        // Stores from before metrics: eth0 before eth1, the order they were attached in.
        let order = |e: &Endpoint| (e.route_metric.unwrap_or(u32::MAX), e.ifname.len());
        endpoints.sort_by(|a, b| (order(a), &a.ifname).cmp(&(order(b), &b.ifname)));
        for ep in endpoints {
            let Some(net) = inner.store.networks.get(&ep.network_id).cloned() else {
                inner.store.endpoints.remove(&ep.id);
                continue;
            };
            match self.replumb(inner, &net, &ep).await {
                Ok(()) => {
                    tracing::info!(endpoint = %ep.name, network = %net.name, "endpoint restored")
                }
                Err(e) => {
                    tracing::warn!(endpoint = %ep.name, network = %net.name, error = %e.message, "endpoint dropped at restart");
                    // The stored copy: an earlier drop may have handed it the resolv.conf.
                    let ep = inner.store.endpoints.remove(&ep.id).unwrap_or(ep);
                    release_resolv_conf(&mut inner.store, &ep);
                }
            }
        }
    }

    async fn replumb(&self, inner: &mut Inner, net: &Network, ep: &Endpoint) -> ApiResult<()> {
        let ns = open_target(&ep.target)?;
        if ns.id()
            != (NsId {
                dev: ep.ns_dev,
                ino: ep.ns_ino,
            })
        {
            return Err(ApiError::not_found(format!(
                "{} is no longer the namespace the endpoint was attached to",
                ep.target
            )));
        }
        let mac: MacAddr = ep
            .mac
            .parse()
            .map_err(|_| ApiError::internal("bad stored MAC"))?;
        let mut ep = ep.clone();
        if ep.route_metric.is_none() && !net.internal {
            // Stored before route metrics existed: take the next free one, and keep it.
            let metric = route_metric_for(&inner.store, ns.id());
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
                    tracing::warn!(endpoint = %ep.name, error = %e.error.message, "published port dropped at restart")
                }
                Err(e) => {
                    tracing::warn!(endpoint = %ep.name, error = %e.error.message, "published port not bound this time");
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
        let ep = &ep;
        let plumbing = plumbing_for(net, ep, mac);
        let plumbed = self.plumb(ns, &ep.target, plumbing).await?;
        if let Some(stored) = inner.store.endpoints.get_mut(&ep.id) {
            stored.route_metric = plumbed.made.route_metric;
        }
        self.plug(inner, net, ep, plumbed.fd).await?;
        self.publish(inner, net, ep, listeners);
        self.watch_target(ep);
        Ok(())
    }

    /// Starts the accept loops of an endpoint's published ports.
    fn publish(&self, inner: &mut Inner, net: &Network, ep: &Endpoint, listeners: Vec<Bound>) {
        let Some(live) = inner.live.get_mut(&net.id) else {
            return;
        };
        let injector = live.datapath.injector();
        let subnet = ipnet::IpNet::V4(net.subnet);
        let id = NsId {
            dev: ep.ns_dev,
            ino: ep.ns_ino,
        };
        let has_tcp = listeners.iter().any(|b| matches!(b, Bound::Tcp(..)));
        let direct = match (
            &self.ns_sockets,
            netns_path(&ep.target),
            target_pid(&ep.target),
        ) {
            _ if !has_tcp => None,
            (Some(factory), Ok(path), _) => Some(direct::Inside::Enter {
                factory: factory.clone(),
                target: direct::NsTarget { path, id },
            }),
            (None, _, Some(pid)) if self.rootless => match direct::HelperSockets::start(pid, id) {
                Ok(h) => Some(direct::Inside::Helper(h)),
                Err(e) => {
                    tracing::warn!(error = %e, "in-kernel published ports unavailable");
                    None
                }
            },
            _ => None,
        };
        let mut handles = Vec::new();
        for b in listeners {
            match b {
                Bound::Tcp(listener, m) => {
                    let container = SocketAddr::new(IpAddr::V4(ep.ipv4), m.container_port);
                    let task = tokio::spawn(nat::serve_published_tcp(
                        listener,
                        container,
                        IpAddr::V4(net.gateway),
                        subnet,
                        injector.clone(),
                        direct.clone(),
                    ));
                    handles.push(task.abort_handle());
                }
                Bound::Udp(socket, m) => {
                    let Ok(mac) = ep.mac.parse::<MacAddr>() else {
                        continue;
                    };
                    let container = SocketAddr::new(IpAddr::V4(ep.ipv4), m.container_port);
                    let task = tokio::spawn(nat::serve_published_udp(
                        socket,
                        container,
                        mac.0,
                        IpAddr::V4(net.gateway),
                        gateway_mac(net).0,
                        subnet,
                        injector.clone(),
                    ));
                    handles.push(task.abort_handle());
                }
            }
        }
        live.published.insert(ep.id.clone(), handles);
    }

    async fn plug(
        &self,
        inner: &mut Inner,
        net: &Network,
        ep: &Endpoint,
        fd: std::os::fd::OwnedFd,
    ) -> ApiResult<()> {
        let live = inner
            .live
            .get_mut(&net.id)
            .ok_or_else(|| ApiError::internal("network has no datapath"))?;
        let mac: MacAddr = ep
            .mac
            .parse()
            .map_err(|_| ApiError::internal("bad stored MAC"))?;
        let port = live
            .datapath
            .add_port(fd, &ep.id, &ep.name, mac.0)
            .await
            .map_err(|e| ApiError::internal(format!("cannot plug the endpoint in: {e}")))?;
        live.ports.insert(ep.id.clone(), port);
        // Records go in for every network (the bridge's zone keeps them for PTR scoping but
        // resolves no names); they resolve from here on, before attach returns.
        let addrs: Vec<IpAddr> = std::iter::once(IpAddr::V4(ep.ipv4))
            .chain(ep.ipv6.map(IpAddr::V6))
            .collect();
        self.catalog_mut().add_endpoint(
            &net.id,
            &EndpointRecords {
                id: ep.id.clone(),
                scope: format!("{}:{}", ep.ns_dev, ep.ns_ino),
                name: ep.name.clone(),
                aliases: ep.aliases.clone(),
                addrs,
            },
        );
        Ok(())
    }

    /// Creates and configures the endpoint's TAP in its namespace: directly as root, through the
    /// single-threaded helper process when rootless.
    async fn plumb(
        &self,
        ns: NetNs,
        target: &Target,
        plumbing: Plumbing,
    ) -> anyhow::Result<plumb::Plumbed> {
        if !self.rootless {
            return tokio::task::spawn_blocking(move || plumb::plumb(&ns, &plumbing)).await?;
        }
        let Some(pid) = target_pid(target) else {
            anyhow::bail!(
                "as an unprivileged user, attach needs a PID (or /proc/PID/ns/net) whose user namespace is yours"
            );
        };
        tokio::task::spawn_blocking(move || plumb::plumb_via_helper(pid, &plumbing)).await?
    }

    /// Ties the endpoint's life to its target: the process, or the namespace file (see
    /// [`watch`]). Every TAP pins its namespace, so the device never goes away by itself.
    fn watch_target(&self, ep: &Endpoint) {
        let anchor = match (target_pid(&ep.target), netns_path(&ep.target)) {
            (Some(pid), _) => watch::Anchor::Process(pid),
            (None, Ok(path)) => watch::Anchor::Path(path),
            (None, Err(_)) => return,
        };
        let ns = NsId {
            dev: ep.ns_dev,
            ino: ep.ns_ino,
        };
        self.targets.watch(&ep.id, anchor, ns);
    }

    fn policy_mut(&self) -> std::sync::RwLockWriteGuard<'_, nat::Policy> {
        match self.policy.write() {
            Ok(p) => p,
            Err(e) => e.into_inner(),
        }
    }

    /// Adds a network's subnets to the NAT policy's isolation list.
    fn refresh_policy_subnets_with(&self, net: &Network) {
        let mut p = self.policy_mut();
        p.subnets.push(ipnet::IpNet::V4(net.subnet));
        if let Some(s6) = net.subnet6 {
            p.subnets.push(ipnet::IpNet::V6(s6));
        }
    }

    /// Recomputes the published ports of the NAT policy from the store.
    fn refresh_policy_ports(&self, store: &Store) {
        let ports = store
            .endpoints
            .values()
            .flat_map(|e| e.ports.iter().map(|m| (m.proto, m.host_port)))
            .collect();
        self.policy_mut().published = ports;
    }

    fn catalog_mut(&self) -> std::sync::RwLockWriteGuard<'_, Catalog> {
        match self.catalog.write() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        }
    }

    pub fn responder(&self) -> Arc<Responder> {
        self.dns.responder.clone()
    }

    pub async fn handle_event(&self, event: Event) {
        match event {
            Event::TargetGone { endpoint_id } => {
                let mut inner = self.inner.lock().await;
                let Some(ep) = inner.store.endpoints.get(&endpoint_id).cloned() else {
                    return;
                };
                self.unplug(&mut inner, &ep).await;
                tracing::info!(endpoint = %ep.name, target = %ep.target, "endpoint removed: its target is gone");
                if let Err(e) = self.state_dir.save(&inner.store) {
                    tracing::error!(error = %e, "cannot save state");
                }
            }
            Event::PortGone {
                network_id,
                endpoint_id,
            } => {
                let mut inner = self.inner.lock().await;
                let Some(ep) = inner.store.endpoints.remove(&endpoint_id) else {
                    return;
                };
                self.targets.forget(&endpoint_id);
                if let Some(live) = inner.live.get_mut(&network_id) {
                    live.ports.remove(&endpoint_id);
                    for h in live.published.remove(&endpoint_id).into_iter().flatten() {
                        h.abort();
                    }
                }
                self.catalog_mut()
                    .remove_endpoint(&network_id, &endpoint_id);
                release_resolv_conf(&mut inner.store, &ep);
                self.refresh_policy_ports(&inner.store);
                tracing::info!(endpoint = %ep.name, ip = %ep.ipv4, "endpoint removed: its device is gone");
                if let Err(e) = self.state_dir.save(&inner.store) {
                    tracing::error!(error = %e, "cannot save state");
                }
            }
        }
    }

    pub async fn networks(&self) -> Vec<NetworkInspect> {
        let inner = self.inner.lock().await;
        let mut nets: Vec<&Network> = inner.store.networks.values().collect();
        nets.sort_by(|a, b| {
            (a.name != DEFAULT_NETWORK, &a.name).cmp(&(b.name != DEFAULT_NETWORK, &b.name))
        });
        nets.into_iter().map(|n| inspect(&inner.store, n)).collect()
    }

    pub async fn network(&self, key: &str) -> ApiResult<NetworkInspect> {
        let inner = self.inner.lock().await;
        let net = find_network(&inner.store, key)?;
        Ok(inspect(&inner.store, net))
    }

    pub async fn create_network(&self, req: NetworkCreate) -> ApiResult<Created> {
        let mut inner = self.inner.lock().await;
        let host_routes = ipam::host_routes();
        let net = plan_network(&inner.store, req, &host_routes)?;
        let live = self.start_network(&net)?;
        inner.live.insert(net.id.clone(), live);
        inner.store.networks.insert(net.id.clone(), net.clone());
        if let Err(e) = self.state_dir.save(&inner.store) {
            inner.store.networks.remove(&net.id);
            inner.live.remove(&net.id);
            return Err(e.into());
        }
        tracing::info!(name = %net.name, id = %net.id, subnet = %net.subnet, "network created");
        Ok(Created { id: net.id })
    }

    pub async fn remove_network(&self, key: &str) -> ApiResult<()> {
        let mut inner = self.inner.lock().await;
        let net = find_network(&inner.store, key)?.clone();
        if net.name == DEFAULT_NETWORK {
            return Err(ApiError::forbidden(
                "bridge is a pre-defined network and cannot be removed",
            ));
        }
        if inner.store.endpoints_of(&net.id).next().is_some() {
            return Err(ApiError::forbidden(format!(
                "network {} has active endpoints",
                net.name
            )));
        }
        inner.store.networks.remove(&net.id);
        if let Err(e) = self.state_dir.save(&inner.store) {
            inner.store.networks.insert(net.id.clone(), net);
            return Err(e.into());
        }
        inner.live.remove(&net.id);
        self.catalog_mut().remove_network(&net.id);
        {
            let mut p = self.policy_mut();
            p.subnets.retain(|s| {
                *s != ipnet::IpNet::V4(net.subnet)
                    && net.subnet6.is_none_or(|s6| *s != ipnet::IpNet::V6(s6))
            });
        }
        tracing::info!(name = %net.name, "network removed");
        Ok(())
    }

    pub async fn attach(&self, network: &str, mut req: AttachRequest) -> ApiResult<EndpointInfo> {
        let mut inner = self.inner.lock().await;
        // `network connect NET web`, with web a container of ours (and no `ip netns` of that
        // name): its namespace, through its init process, and remembered for its next start.
        let container = match &req.target {
            Target::Name(n) if !Path::new("/run/netns").join(n).exists() => inner
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
        if !matches!(
            containers::mode_of(&c.network),
            containers::Mode::Network(_)
        ) {
            return Err(ApiError::bad_request(format!(
                "container {} runs with --network {}: only containers on a network can join another",
                c.name, c.network
            )));
        }
        let Some(pid) = c.pid else {
            return Err(ApiError::conflict(format!(
                "container {} is not running",
                c.name
            )));
        };
        if req.name.as_ref().is_some_and(|n| n != &c.name) {
            return Err(ApiError::bad_request(format!(
                "a container's endpoints carry its name ({}): no --name",
                c.name
            )));
        }
        if !req.ports.is_empty() {
            return Err(ApiError::bad_request(
                "publish a container's ports when it is created (vswitch run -p), not when it joins a network",
            ));
        }
        // What is kept for its next starts: the network, --ip and --alias; nothing else is
        // taken rather than forgotten at the first restart.
        if req.ipv6_address.is_some() || req.mac_address.is_some() || req.ifname.is_some() {
            return Err(ApiError::bad_request(
                "a container joins a network with --ip and --alias only (no --ip6, --mac or --ifname)",
            ));
        }
        let net_id = find_network(&inner.store, network)?.id.clone();
        req.target = Target::Pid(pid);
        req.name = Some(c.name.clone());
        // Recorded before the attach, whose one save then covers both; taken back if it fails.
        let before = c.connected.clone();
        if let Some(stored) = inner.store.containers.get_mut(&c.id) {
            stored.connected.retain(|x| x.network_id != net_id);
            stored.connected.push(state::Connected {
                network_id: net_id.clone(),
                ip: req.ipv4_address.clone(),
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

    async fn attach_locked(
        &self,
        inner: &mut Inner,
        network: &str,
        mut req: AttachRequest,
    ) -> ApiResult<EndpointInfo> {
        // `/run/netns/X` is the `ip netns` X, when X can name an endpoint.
        if let Target::Name(n) = req.target.clone().normalized()
            && valid_name(&n)
        {
            req.target = Target::Name(n);
        }
        let net = find_network(&inner.store, network)?.clone();
        let ns = open_target(&req.target)?;
        if ns.id() == self.own_netns {
            return Err(ApiError::bad_request(format!(
                "{} is the daemon's own network namespace; attach a container's namespace instead",
                req.target
            )));
        }
        let mut ep = plan_endpoint(&inner.store, &net, &req, ns.id())?;
        ep.ports = plan_ports(&net, &req.ports)?;
        // Bind before plumbing: a host port in use fails the attach with nothing to undo.
        let listeners = bind_published(&ep.ports).await?;
        for (m, b) in ep.ports.iter_mut().zip(&listeners) {
            m.host_port = b.port();
            m.host_port_end = None;
        }
        let mac: MacAddr = ep
            .mac
            .parse()
            .map_err(|_| ApiError::internal("bad planned MAC"))?;
        let plumbing = plumbing_for(&net, &ep, mac);
        let started = std::time::Instant::now();
        let mut plumbing = plumbing;
        plumbing.ifname_auto = req.ifname.is_none();
        let made = self
            .plumb(ns, &req.target, plumbing)
            .await
            .map_err(|e| ApiError::bad_request(format!("cannot attach {}: {e:#}", req.target)))?;
        let plumbed = started.elapsed();
        ep.route_metric = made.made.route_metric;
        ep.ifname = made.made.ifname;
        self.plug(inner, &net, &ep, made.fd).await?;
        self.publish(inner, &net, &ep, listeners);
        self.watch_target(&ep);
        ep.wrote_resolv_conf = match &ep.target {
            Target::Name(name)
                if !inner.store.endpoints.values().any(|o| {
                    o.ns_ino == ep.ns_ino && o.ns_dev == ep.ns_dev && o.wrote_resolv_conf
                }) =>
            {
                match write_resolv_conf(name, &net) {
                    Ok(written) => written,
                    Err(e) => {
                        tracing::warn!(netns = %name, error = %e, "cannot write resolv.conf");
                        false
                    }
                }
            }
            _ => false,
        };
        inner.store.endpoints.insert(ep.id.clone(), ep.clone());
        self.refresh_policy_ports(&inner.store);
        if let Err(e) = self.state_dir.save(&inner.store) {
            self.unplug(inner, &ep).await;
            return Err(e.into());
        }
        tracing::info!(
            endpoint = %ep.name, network = %net.name, ip = %ep.ipv4, target = %ep.target,
            plumb_ms = plumbed.as_secs_f64() * 1e3, total_ms = started.elapsed().as_secs_f64() * 1e3,
            "endpoint attached"
        );
        Ok(endpoint_info(&net, &ep))
    }

    /// Removes an endpoint's port, names and resolv.conf, and forgets it (not persisted here).
    async fn unplug(&self, inner: &mut Inner, ep: &Endpoint) {
        self.targets.forget(&ep.id);
        self.catalog_mut().remove_endpoint(&ep.network_id, &ep.id);
        if let Some(live) = inner.live.get_mut(&ep.network_id) {
            for h in live.published.remove(&ep.id).into_iter().flatten() {
                h.abort();
            }
        }
        if let Some(live) = inner.live.get_mut(&ep.network_id)
            && let Some(port) = live.ports.remove(&ep.id)
            && let Err(e) = live.datapath.remove_port(port).await
        {
            tracing::warn!(endpoint = %ep.name, error = %e, "cannot unplug");
        }
        inner.store.endpoints.remove(&ep.id);
        release_resolv_conf(&mut inner.store, ep);
        self.refresh_policy_ports(&inner.store);
    }

    /// Detaches endpoints: all endpoints called `name`, or only the one on `network`.
    pub async fn detach(&self, name: &str, network: Option<&str>) -> ApiResult<()> {
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
                self.state_dir.save(&inner.store)?;
                return Ok(());
            }
            return Err(ApiError::not_found(match network {
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
        self.state_dir.save(&inner.store)?;
        Ok(())
    }

    pub async fn endpoints(&self) -> Vec<EndpointInfo> {
        let inner = self.inner.lock().await;
        inner
            .store
            .endpoints
            .values()
            .filter_map(|e| Some(endpoint_info(inner.store.networks.get(&e.network_id)?, e)))
            .collect()
    }

    pub async fn fdb(&self, key: &str) -> ApiResult<Vec<FdbRow>> {
        let inner = self.inner.lock().await;
        let net = find_network(&inner.store, key)?;
        let live = inner
            .live
            .get(&net.id)
            .ok_or_else(|| ApiError::internal("network has no datapath"))?;
        live.datapath
            .fdb()
            .await
            .map_err(|e| ApiError::internal(e.to_string()))
    }

    pub async fn stats(&self, key: Option<&str>) -> ApiResult<Vec<NetworkStats>> {
        let inner = self.inner.lock().await;
        let ids: Vec<String> = match key {
            Some(k) => vec![find_network(&inner.store, k)?.id.clone()],
            None => {
                let mut nets: Vec<&Network> = inner.store.networks.values().collect();
                nets.sort_by(|a, b| a.name.cmp(&b.name));
                nets.into_iter().map(|n| n.id.clone()).collect()
            }
        };
        let mut out = Vec::new();
        for id in ids {
            if let Some(live) = inner.live.get(&id) {
                out.push(
                    live.datapath
                        .stats()
                        .await
                        .map_err(|e| ApiError::internal(e.to_string()))?,
                );
            }
        }
        Ok(out)
    }

    /// Stops every datapath (closing the TAPs). Endpoints stay in the state and are restored at
    /// the next start.
    pub async fn shutdown(&self) {
        let mut inner = self.inner.lock().await;
        inner.live.clear();
    }
}

/// Relays queries upstream as the datapaths hand them over, one task per query.
async fn run_forwarder(
    forwarder: Forwarder,
    mut jobs: tokio::sync::mpsc::UnboundedReceiver<ForwardJob>,
) {
    while let Some(job) = jobs.recv().await {
        let f = forwarder.clone();
        tokio::spawn(async move {
            let answer = f.forward(&job.query, job.reply.is_tcp()).await;
            job.injector.deliver(job.reply, answer);
            drop(job.permit);
        });
    }
}

fn find_network<'a>(store: &'a Store, key: &str) -> ApiResult<&'a Network> {
    store
        .find_network(key)
        .ok_or_else(|| ApiError::not_found(format!("network {key} not found")))
}

/// Docker's rule for names: a letter or digit, then letters, digits, `_`, `.` or `-`.
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && name.len() <= 128
}

fn check_name(kind: &str, name: &str) -> ApiResult<()> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "invalid {kind} name {name:?}: only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"
        )))
    }
}

/// Validates a `network create` request against the current state and builds the network.
/// `host_routes`: the daemon namespace's routes, which automatic subnets stay clear of.
fn plan_network(
    store: &Store,
    req: NetworkCreate,
    host_routes: &[ipnet::Ipv4Net],
) -> ApiResult<Network> {
    check_name("network", &req.name)?;
    if matches!(req.name.as_str(), "host" | "none") || req.name.starts_with("container:") {
        return Err(ApiError::forbidden(format!(
            "network name {} is reserved for a network mode",
            req.name
        )));
    }
    if store
        .find_network(&req.name)
        .is_some_and(|n| n.name == req.name)
    {
        return Err(ApiError::conflict(format!(
            "network with name {} already exists",
            req.name
        )));
    }
    let (mut v4, mut v6) = (None, None);
    for s in &req.subnets {
        if s.contains(':') {
            if v6
                .replace(ipam::parse_subnet6(s).map_err(ApiError::bad_request)?)
                .is_some()
            {
                return Err(ApiError::bad_request("at most one IPv6 --subnet"));
            }
        } else if v4
            .replace(ipam::parse_subnet4(s).map_err(ApiError::bad_request)?)
            .is_some()
        {
            return Err(ApiError::bad_request("at most one IPv4 --subnet"));
        }
    }
    let (mut gw4, mut gw6) = (None, None);
    for g in &req.gateways {
        match g.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) if gw4.is_none() => gw4 = Some(a),
            Ok(IpAddr::V6(a)) if gw6.is_none() => gw6 = Some(a),
            Ok(_) => {
                return Err(ApiError::bad_request(
                    "at most one --gateway per address family",
                ));
            }
            Err(_) => {
                return Err(ApiError::bad_request(format!(
                    "invalid gateway address {g:?}"
                )));
            }
        }
    }
    if v6.is_some() && !req.enable_ipv6 {
        return Err(ApiError::bad_request("an IPv6 --subnet needs --ipv6"));
    }
    if gw4.is_some() && v4.is_none() {
        return Err(ApiError::bad_request("--gateway needs --subnet"));
    }
    if gw6.is_some() && v6.is_none() {
        return Err(ApiError::bad_request(
            "an IPv6 --gateway needs an IPv6 --subnet",
        ));
    }
    let id = random_id();
    // Automatic picks avoid other networks and whatever the host already routes (a LAN or VPN
    // on 172.18/16 would otherwise become unreachable from every container), as Docker does.
    let taken4: Vec<_> = store
        .networks
        .values()
        .map(|n| n.subnet)
        .chain(host_routes.iter().copied())
        .collect();
    let subnet = match v4 {
        Some(s) => {
            if let Some(other) = store
                .networks
                .values()
                .find(|n| ipam::overlaps4(n.subnet, s))
            {
                return Err(ApiError::conflict(format!(
                    "subnet {s} overlaps with network {} ({})",
                    other.name, other.subnet
                )));
            }
            s
        }
        None => ipam::pick_subnet(&taken4).ok_or_else(|| {
            ApiError::conflict("no free subnet left in the default pools; give one with --subnet")
        })?,
    };
    let gateway = match gw4 {
        Some(g) if ipam::is_host4(subnet, g) => g,
        Some(g) => {
            return Err(ApiError::bad_request(format!(
                "gateway {g} is not a host address of subnet {subnet}"
            )));
        }
        None => Ipv4Addr::from(u32::from(subnet.network()) + 1),
    };
    let ip_range = match &req.ip_range {
        None => None,
        Some(_) if v4.is_none() => return Err(ApiError::bad_request("--ip-range needs --subnet")),
        Some(r) => {
            let range: ipnet::Ipv4Net = r.parse().map_err(|_| {
                ApiError::bad_request(format!("invalid --ip-range {r:?}: expected IPv4 CIDR"))
            })?;
            if !subnet.contains(&range) {
                return Err(ApiError::bad_request(format!(
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
            return Err(ApiError::conflict(format!(
                "subnet {s6} overlaps with network {}",
                other.name
            )));
        }
        let g6 = match gw6 {
            Some(g) if ipam::is_host6(s6, g) => g,
            Some(g) => {
                return Err(ApiError::bad_request(format!(
                    "gateway {g} is not a host address of subnet {s6}"
                )));
            }
            None => Ipv6Addr::from(u128::from(s6.network()) + 1),
        };
        (Some(s6), Some(g6))
    } else {
        (None, None)
    };
    let mtu = req.mtu.unwrap_or(DEFAULT_MTU);
    let min_mtu = if req.enable_ipv6 { 1280 } else { 576 };
    if !(min_mtu..=65_520).contains(&mtu) {
        return Err(ApiError::bad_request(format!(
            "invalid MTU {mtu}: expected {min_mtu} to 65520"
        )));
    }
    Ok(Network {
        id,
        name: req.name,
        created: now_rfc3339(),
        subnet,
        gateway,
        ip_range,
        subnet6,
        gateway6,
        internal: req.internal,
        mtu,
        dns_names: true,
    })
}

/// Validates an attach request and picks the endpoint's name, interface and addresses.
fn plan_endpoint(
    store: &Store,
    net: &Network,
    req: &AttachRequest,
    ns: NsId,
) -> ApiResult<Endpoint> {
    let same_ns = |e: &&Endpoint| e.ns_dev == ns.dev && e.ns_ino == ns.ino;
    if let Some(e) = store.endpoints_of(&net.id).find(same_ns) {
        return Err(ApiError::conflict(format!(
            "{} is already attached to network {} as {}",
            req.target, net.name, e.name
        )));
    }
    let id = random_id();
    let name = match (&req.name, &req.target) {
        (Some(n), _) => n.clone(),
        (None, Target::Name(n)) => n.clone(),
        (None, _) => store
            .endpoints
            .values()
            .find(same_ns)
            .map(|e| e.name.clone())
            .unwrap_or_else(|| id[..12].to_owned()),
    };
    check_name("endpoint", &name)?;
    if store.endpoints_of(&net.id).any(|e| e.name == name) {
        return Err(ApiError::conflict(format!(
            "endpoint name {name} is already in use on network {}",
            net.name
        )));
    }
    if store
        .endpoints
        .values()
        .any(|e| e.name == name && !same_ns(&e))
    {
        return Err(ApiError::conflict(format!(
            "name {name} is already used by another namespace"
        )));
    }
    for alias in &req.aliases {
        check_name("alias", alias)?;
    }
    check_aliases_allowed(net, &req.aliases)?;
    let ifname = match &req.ifname {
        Some(i) => {
            if i.is_empty()
                || i.len() > 15
                || i == "."
                || i == ".."
                || i.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
            {
                return Err(ApiError::bad_request(format!(
                    "invalid interface name {i:?}: 1 to 15 characters, no '/', ':' or spaces"
                )));
            }
            if store
                .endpoints
                .values()
                .filter(same_ns)
                .any(|e| &e.ifname == i)
            {
                return Err(ApiError::conflict(format!(
                    "interface {i} is already used by another vswitch endpoint in that namespace"
                )));
            }
            i.clone()
        }
        None => (0..)
            .map(|n| format!("eth{n}"))
            .find(|cand| {
                !store
                    .endpoints
                    .values()
                    .filter(same_ns)
                    .any(|e| &e.ifname == cand)
            })
            .unwrap_or_else(|| "eth0".to_owned()),
    };
    let used4: HashSet<Ipv4Addr> = store
        .endpoints_of(&net.id)
        .map(|e| e.ipv4)
        .chain([net.gateway])
        .collect();
    let ipv4 = match &req.ipv4_address {
        Some(s) => {
            let ip: Ipv4Addr = s
                .parse()
                .map_err(|_| ApiError::bad_request(format!("invalid IPv4 address {s:?}")))?;
            if !ipam::is_host4(net.subnet, ip) {
                return Err(ApiError::bad_request(format!(
                    "address {ip} is not a host address of network {} ({})",
                    net.name, net.subnet
                )));
            }
            if used4.contains(&ip) {
                return Err(ApiError::conflict(format!(
                    "address {ip} is already in use on network {}",
                    net.name
                )));
            }
            ip
        }
        None => ipam::allocate4(net.subnet, net.ip_range, &used4).ok_or_else(|| {
            ApiError::conflict(format!("no free address left on network {}", net.name))
        })?,
    };
    let ipv6 = match (net.subnet6, &req.ipv6_address) {
        (None, Some(_)) => {
            return Err(ApiError::bad_request(format!(
                "network {} has no IPv6 subnet",
                net.name
            )));
        }
        (None, None) => None,
        (Some(s6), want) => {
            let used6: HashSet<Ipv6Addr> = store
                .endpoints_of(&net.id)
                .filter_map(|e| e.ipv6)
                .chain(net.gateway6)
                .collect();
            Some(match want {
                Some(s) => {
                    let ip: Ipv6Addr = s.parse().map_err(|_| {
                        ApiError::bad_request(format!("invalid IPv6 address {s:?}"))
                    })?;
                    if !ipam::is_host6(s6, ip) {
                        return Err(ApiError::bad_request(format!(
                            "address {ip} is not inside {s6}"
                        )));
                    }
                    if used6.contains(&ip) {
                        return Err(ApiError::conflict(format!(
                            "address {ip} is already in use"
                        )));
                    }
                    ip
                }
                None => ipam::allocate6(s6, &used6)
                    .ok_or_else(|| ApiError::conflict("no free IPv6 address left"))?,
            })
        }
    };
    let mac = match &req.mac_address {
        Some(s) => {
            let mac: MacAddr = s
                .parse()
                .map_err(|e: vswitch_switch::ParseMacError| ApiError::bad_request(e.to_string()))?;
            if mac.is_multicast() || mac.is_zero() {
                return Err(ApiError::bad_request(format!(
                    "MAC address {mac} is not a unicast address"
                )));
            }
            mac
        }
        None => MacAddr::from_ipv4(ipv4),
    };
    if mac == gateway_mac(net)
        || store
            .endpoints_of(&net.id)
            .any(|e| e.mac == mac.to_string())
    {
        return Err(ApiError::conflict(format!(
            "MAC address {mac} is already in use on network {}",
            net.name
        )));
    }
    Ok(Endpoint {
        endpoint_id: random_id(),
        id,
        name,
        network_id: net.id.clone(),
        target: req.target.clone(),
        ns_dev: ns.dev,
        ns_ino: ns.ino,
        ifname,
        mac: mac.to_string(),
        ipv4,
        ipv6,
        aliases: req.aliases.clone(),
        wrote_resolv_conf: false,
        ports: Vec::new(),
        route_metric: (!net.internal).then(|| route_metric_for(store, ns)),
    })
}

/// Aliases are names, and a network without names (the default `bridge`) could not resolve
/// them: refused, as Docker does, rather than stored and ignored.
fn check_aliases_allowed(net: &Network, aliases: &[String]) -> ApiResult<()> {
    if !net.dns_names && !aliases.is_empty() {
        return Err(ApiError::bad_request(format!(
            "network-scoped aliases need a user-defined network: {} does not resolve names",
            net.name
        )));
    }
    Ok(())
}

/// The metric for a new endpoint's default routes in namespace `ns`: above every other
/// endpoint's there, so that joining a network never takes the way out from one that was
/// there first; [`FIRST_ROUTE_METRIC`] for the first.
fn route_metric_for(store: &Store, ns: NsId) -> u32 {
    store
        .endpoints
        .values()
        .filter(|e| e.ns_dev == ns.dev && e.ns_ino == ns.ino)
        .filter_map(|e| e.route_metric)
        .max()
        .map_or(FIRST_ROUTE_METRIC, |m| m.saturating_add(1))
}

/// Metric of the default route of a namespace's first network (podman/netavark use the same).
const FIRST_ROUTE_METRIC: u32 = 100;

/// A bound host socket of a published port.
enum Bound {
    Tcp(tokio::net::TcpListener, vswitch_nat::PortMapping),
    Udp(std::net::UdpSocket, vswitch_nat::PortMapping),
}

impl Bound {
    fn port(&self) -> u16 {
        match self {
            Bound::Tcp(l, m) => l.local_addr().map(|a| a.port()).unwrap_or(m.host_port),
            Bound::Udp(s, m) => s.local_addr().map(|a| a.port()).unwrap_or(m.host_port),
        }
    }
}

/// Parses and checks `-p` specs against the network.
fn plan_ports(net: &Network, specs: &[String]) -> ApiResult<Vec<vswitch_nat::PortMapping>> {
    let mut out = Vec::new();
    for spec in specs {
        out.extend(vswitch_nat::parse_publish(spec).map_err(ApiError::bad_request)?);
    }
    if !out.is_empty() && net.internal {
        return Err(ApiError::bad_request(format!(
            "network {} is internal: it cannot publish ports",
            net.name
        )));
    }
    let mut seen = HashSet::new();
    for m in out.iter().filter(|m| m.host_port != 0) {
        if !seen.insert((m.host_ip, m.host_port, m.proto)) {
            return Err(ApiError::bad_request(format!(
                "host port {}/{} is given twice",
                m.host_port, m.proto
            )));
        }
    }
    Ok(out)
}

/// Why a published port's host socket could not be bound.
struct BindError {
    /// The port is taken (something else listens there), as opposed to any other failure.
    in_use: bool,
    error: ApiError,
}

impl From<BindError> for ApiError {
    fn from(e: BindError) -> Self {
        e.error
    }
}

/// Binds every published port's host socket, or none: the first failure is the error. A host
/// port range for one container port binds the first free port of the range.
async fn bind_published(ports: &[vswitch_nat::PortMapping]) -> ApiResult<Vec<Bound>> {
    let mut out = Vec::new();
    for m in ports {
        let Some(end) = m.host_port_end else {
            out.push(bind_one(m).await?);
            continue;
        };
        let mut bound = None;
        for port in m.host_port..=end {
            let one = vswitch_nat::PortMapping {
                host_port: port,
                host_port_end: None,
                ..*m
            };
            match bind_one(&one).await {
                Ok(b) => {
                    bound = Some(b);
                    break;
                }
                Err(e) if e.in_use => continue,
                Err(e) => return Err(e.into()),
            }
        }
        out.push(bound.ok_or_else(|| {
            ApiError::conflict(format!(
                "no free host port in {}-{end} ({}): all are already in use",
                m.host_port, m.proto
            ))
        })?);
    }
    Ok(out)
}

/// Binds the host socket of one published port (a single port, not a range).
async fn bind_one(m: &vswitch_nat::PortMapping) -> Result<Bound, BindError> {
    let ip = m.host_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let addr = SocketAddr::new(ip, m.host_port);
    let fail = |e: std::io::Error| {
        let in_use = e.kind() == std::io::ErrorKind::AddrInUse;
        let why = match e.kind() {
            std::io::ErrorKind::AddrInUse => "is already in use".to_owned(),
            std::io::ErrorKind::PermissionDenied => {
                format!("needs privileges (ports below net.ipv4.ip_unprivileged_port_start): {e}")
            }
            _ => format!("cannot be bound: {e}"),
        };
        BindError {
            in_use,
            error: ApiError::conflict(format!("host port {addr} ({}) {why}", m.proto)),
        }
    };
    // No host IP: every address of both families, like Docker, with one dual-stack socket
    // on [::] (so a port taken in either family is a conflict); 0.0.0.0 if the host has no
    // IPv6.
    let dual = m.host_ip.is_none();
    match m.proto {
        vswitch_nat::Proto::Tcp => {
            let listener = match dual.then(|| dual_stack(m.host_port, true)) {
                Some(Ok(fd)) => {
                    let l = std::net::TcpListener::from(fd);
                    tokio::net::TcpListener::from_std(l).map_err(fail)?
                }
                Some(Err(e)) if e.raw_os_error() != Some(libc::EAFNOSUPPORT) => {
                    return Err(fail(e));
                }
                _ => tokio::net::TcpListener::bind(addr).await.map_err(fail)?,
            };
            Ok(Bound::Tcp(listener, *m))
        }
        vswitch_nat::Proto::Udp => {
            let socket = match dual.then(|| dual_stack(m.host_port, false)) {
                Some(Ok(fd)) => std::net::UdpSocket::from(fd),
                Some(Err(e)) if e.raw_os_error() != Some(libc::EAFNOSUPPORT) => {
                    return Err(fail(e));
                }
                _ => std::net::UdpSocket::bind(addr)
                    .and_then(|s| s.set_nonblocking(true).map(|()| s))
                    .map_err(fail)?,
            };
            Ok(Bound::Udp(socket, *m))
        }
    }
}

/// A non-blocking socket bound to `[::]:port` that also takes IPv4 (IPV6_V6ONLY off); a TCP
/// one is listening.
fn dual_stack(port: u16, tcp: bool) -> std::io::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn6, bind, listen, setsockopt, socket,
        sockopt,
    };
    use std::os::fd::AsRawFd;
    let kind = if tcp {
        SockType::Stream
    } else {
        SockType::Datagram
    };
    let fd = socket(
        AddressFamily::Inet6,
        kind,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::Ipv6V6Only, &false)?;
    if tcp {
        setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    }
    let any = std::net::SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0);
    bind(fd.as_raw_fd(), &SockaddrIn6::from(any))?;
    if tcp {
        listen(&fd, Backlog::new(1024)?)?;
    }
    Ok(fd)
}

fn plumbing_for(net: &Network, ep: &Endpoint, mac: MacAddr) -> Plumbing {
    Plumbing {
        ifname: ep.ifname.clone(),
        mac: mac.0,
        mtu: net.mtu,
        ipv4: (ep.ipv4, net.subnet.prefix_len()),
        gateway4: net.gateway,
        ipv6: ep.ipv6.zip(net.subnet6).map(|(ip, s)| (ip, s.prefix_len())),
        gateway6: net.gateway6,
        route_metric: ep.route_metric,
        ifname_auto: false,
    }
}

/// The gateway's MAC: derived from its IPv4 address like an endpoint's, so it is the same on
/// every start and never borrowed from an endpoint (IPAM never hands out the gateway address,
/// so no endpoint derives the same one).
fn gateway_mac(net: &Network) -> MacAddr {
    MacAddr::from_ipv4(net.gateway)
}

/// Raises the soft limit on open files to the hard one. Every published-port connection holds
/// sockets and pipes, and the default soft limit (1024) would cap the daemon at a few hundred
/// connections; the hard limit is what the administrator allows.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, soft, hard, "cannot raise the open-file limit");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-file limit"),
    }
}

/// The PID behind a target, for PID targets and `/proc/PID/ns/net` paths.
fn target_pid(target: &Target) -> Option<u32> {
    match target {
        Target::Pid(p) => Some(*p),
        Target::Path(p) => p
            .strip_prefix("/proc/")?
            .strip_suffix("/ns/net")?
            .parse()
            .ok(),
        Target::Name(_) => None,
    }
}

fn netns_path(target: &Target) -> ApiResult<PathBuf> {
    Ok(match target {
        Target::Pid(pid) => PathBuf::from(format!("/proc/{pid}/ns/net")),
        Target::Path(p) => PathBuf::from(p),
        Target::Name(n) => {
            if n.is_empty() || n == "." || n == ".." || n.contains('/') {
                return Err(ApiError::bad_request(format!("invalid netns name {n:?}")));
            }
            PathBuf::from("/run/netns").join(n)
        }
    })
}

fn open_target(target: &Target) -> ApiResult<NetNs> {
    let path = netns_path(target)?;
    NetNs::open(&path).map_err(|e| {
        ApiError::not_found(format!(
            "cannot open the network namespace of {target} ({}): {e}",
            path.display()
        ))
    })
}

fn resolv_conf_path(netns: &str) -> PathBuf {
    PathBuf::from("/etc/netns").join(netns).join("resolv.conf")
}

/// First line of every resolv.conf vswitch writes: files without it are somebody else's and
/// are neither overwritten nor removed.
const RESOLV_CONF_HEADER: &str = "# written by vswitch";

fn ours(path: &std::path::Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|t| t.starts_with(RESOLV_CONF_HEADER))
}

/// `/etc/netns/NAME/resolv.conf`, which `ip netns exec NAME` binds over /etc/resolv.conf.
/// Returns false, writing nothing, if the file is there and not ours.
fn write_resolv_conf(netns: &str, net: &Network) -> std::io::Result<bool> {
    let path = resolv_conf_path(netns);
    if path.exists() && !ours(&path) {
        tracing::info!(path = %path.display(), "keeping a resolv.conf vswitch did not write");
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut text = format!(
        "{RESOLV_CONF_HEADER} for network {}\nnameserver {}\n",
        net.name, net.gateway
    );
    if net.dns_names {
        text.push_str(&format!("search {}\n", net.name));
    }
    text.push_str("options ndots:0\n");
    let tmp = path.with_extension("vswitch-tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &path)?;
    Ok(true)
}

/// Endpoint `ep`, already out of the store, no longer holds its namespace's resolv.conf: it
/// goes to another endpoint of that namespace, rewritten for that one's network (the
/// namespace still needs a nameserver), or, with none left, it is removed.
fn release_resolv_conf(store: &mut Store, ep: &Endpoint) {
    let (true, Target::Name(name)) = (ep.wrote_resolv_conf, &ep.target) else {
        return;
    };
    let heir = store
        .endpoints
        .values_mut()
        .find(|o| o.ns_dev == ep.ns_dev && o.ns_ino == ep.ns_ino && o.target == ep.target);
    if let Some(heir) = heir
        && let Some(net) = store.networks.get(&heir.network_id)
    {
        match write_resolv_conf(name, net) {
            Ok(written) => heir.wrote_resolv_conf = written,
            Err(e) => tracing::warn!(netns = %name, error = %e, "cannot rewrite resolv.conf"),
        }
        return;
    }
    remove_resolv_conf(ep);
}

fn remove_resolv_conf(ep: &Endpoint) {
    if let (true, Target::Name(name)) = (ep.wrote_resolv_conf, &ep.target) {
        let path = resolv_conf_path(name);
        if !ours(&path) {
            return;
        }
        let _ = std::fs::remove_file(&path);
        if let Some(dir) = path.parent() {
            // Only succeeds if nothing else lives there.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn inspect(store: &Store, net: &Network) -> NetworkInspect {
    let mut config = vec![IpamConfig {
        subnet: net.subnet.to_string(),
        gateway: net.gateway.to_string(),
        ip_range: net.ip_range.map(|r| r.to_string()),
    }];
    if let (Some(s6), Some(g6)) = (net.subnet6, net.gateway6) {
        config.push(IpamConfig {
            subnet: s6.to_string(),
            gateway: g6.to_string(),
            ip_range: None,
        });
    }
    let containers = store
        .endpoints_of(&net.id)
        .map(|e| {
            (
                e.id.clone(),
                ContainerEntry {
                    name: e.name.clone(),
                    endpoint_id: e.endpoint_id.clone(),
                    mac_address: e.mac.clone(),
                    ipv4_address: format!("{}/{}", e.ipv4, net.subnet.prefix_len()),
                    ipv6_address: e
                        .ipv6
                        .zip(net.subnet6)
                        .map(|(ip, s)| format!("{ip}/{}", s.prefix_len()))
                        .unwrap_or_default(),
                    ports: e.ports.iter().map(ToString::to_string).collect(),
                },
            )
        })
        .collect();
    let mut options = BTreeMap::new();
    options.insert(
        "com.docker.network.driver.mtu".to_owned(),
        net.mtu.to_string(),
    );
    if net.name == DEFAULT_NETWORK {
        options.insert(
            "com.docker.network.bridge.default_bridge".to_owned(),
            "true".to_owned(),
        );
    }
    NetworkInspect {
        name: net.name.clone(),
        id: net.id.clone(),
        created: net.created.clone(),
        scope: "local".to_owned(),
        driver: "vswitch".to_owned(),
        enable_ipv6: net.enable_ipv6(),
        ipam: Ipam {
            driver: "default".to_owned(),
            config,
        },
        internal: net.internal,
        attachable: true,
        containers,
        options,
        labels: BTreeMap::new(),
    }
}

fn endpoint_info(net: &Network, e: &Endpoint) -> EndpointInfo {
    EndpointInfo {
        id: e.id.clone(),
        endpoint_id: e.endpoint_id.clone(),
        name: e.name.clone(),
        network: net.name.clone(),
        network_id: net.id.clone(),
        target: e.target.clone(),
        ifname: e.ifname.clone(),
        mac_address: e.mac.clone(),
        ipv4_address: format!("{}/{}", e.ipv4, net.subnet.prefix_len()),
        ipv6_address: e
            .ipv6
            .zip(net.subnet6)
            .map(|(ip, s)| format!("{ip}/{}", s.prefix_len()))
            .unwrap_or_default(),
        gateway: net.gateway.to_string(),
        aliases: e.aliases.clone(),
        ports: e.ports.clone(),
    }
}

/// 64 hex digits from the kernel's random source, like Docker's ids.
fn random_id() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_err()
    {
        // Without /dev/urandom, fall back to the std hasher's per-process random keys.
        use std::hash::{BuildHasher, Hasher};
        for chunk in bytes.chunks_mut(8) {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0),
            );
            chunk.copy_from_slice(&h.finish().to_le_bytes()[..chunk.len()]);
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string()
}
