//! The control plane: the [`Daemon`], which holds the state and carries out every API request
//! and datapath event, split by concern:
//!
//! - this module: the composition root (start, shutdown) and events;
//! - `networks`: create, remove, list, FDB and counters;
//! - `endpoints`: attach, detach, garbage collection and restoring after a restart;
//! - `publish`: binding published ports and starting their accept loops;
//! - `containers` (with `process`): `vswitch run` and the container lifecycle;
//! - `render`: the API's views of networks, endpoints and containers.
//!
//! Every change goes through one async mutex over the state ([`Inner`]): a request either
//! completes every step (namespace plumbing, datapath port, DNS names, persisted state) or
//! undoes the ones it did, and no other request sees the half-way state. The lock is never
//! held across a sleep or a poll: waits for processes and namespaces happen between two
//! holds of it.

mod cluster;
mod cni;
mod docker;
mod docker_ep;
mod docker_ipam;
pub use docker_ipam::DockerState;
mod containers;
pub use containers::STOP_TIMEOUT;
mod endpoints;
mod networks;
mod process;
mod progress;
mod publish;
mod render;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::Mutex;
use vswitch_dns::upstream::{Forwarder, Upstreams};
use vswitch_dns::{Catalog, Responder, SharedCatalog, Zone};
use vswitch_nat::{GatewayConfig, Policy};
use vswitch_netdev::ns::{NetNs, NsId};
use vswitch_switch::PortId;

use crate::datapath::{Datapath, DatapathSpec, DnsHook, Event, Links, SharedPolicy};
use crate::error::{Error, Result};
use crate::host;
use crate::netns::watch::TargetWatch;
use crate::plan::DEFAULT_NETWORK;
use crate::state::{Network, StateDir, Store};

/// DNS, NAT and datapath settings of the daemon.
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
    /// `--vxlan-port` and `--advertise-addr`, for overlay networks.
    pub vxlan: host::vxlan::VxlanConfig,
    /// `--cluster-store` and the rest: overlay networks shared by several hosts.
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

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

/// The state behind the control lock.
struct Inner {
    store: Store,
    live: HashMap<String, LiveNetwork>,
    /// Exit watchers of running containers, by container id.
    watchers: HashMap<String, tokio::task::AbortHandle>,
    /// Containers being started (id -> name): their names are taken and they cannot be
    /// started or removed twice while the lock is released for the waits of a start.
    starting: HashMap<String, String>,
    /// Docker's address pools and endpoints that exist only in Docker's sequence of calls
    /// (made, not yet joined); lost at a restart, as Docker asks again.
    docker: DockerState,
    /// Endpoints on other hosts, from the cluster store.
    remote: cluster::Remote,
    /// The other hosts of the cluster: their advertise addresses, by node.
    nodes: HashMap<String, IpAddr>,
}

pub struct Daemon {
    inner: Mutex<Inner>,
    state_dir: StateDir,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    own_netns: NsId,
    /// The host's initial network namespace (see [`crate::netns::target::host_netns`]).
    host_netns: Vec<NsId>,
    catalog: SharedCatalog,
    dns: DnsHook,
    nat_jobs: tokio::sync::mpsc::UnboundedSender<crate::datapath::NatJob>,
    policy: SharedPolicy,
    /// Running without root: TAPs are made by a helper inside the target's namespaces.
    rootless: bool,
    /// Collects endpoints whose target (process or namespace file) is gone.
    targets: TargetWatch,
    /// Sockets inside containers' namespaces for the in-kernel path of published TCP ports
    /// (root; a rootless daemon cannot enter them and starts a helper per endpoint instead).
    ns_sockets: Option<host::direct::SocketFactory>,
    datapath_nice: i32,
    datapath_busy_poll: std::time::Duration,
    /// The VXLAN sockets of overlay networks.
    vxlan: host::vxlan::VxlanHost,
    /// The cluster store's handle, in a cluster.
    cluster: Option<Arc<crate::cluster::Cluster>>,
    /// `GET /metrics`'s histograms.
    metrics: crate::metrics::Metrics,
}

impl Daemon {
    /// Loads (or initialises) the state, starts every network's datapath and re-plumbs the
    /// endpoints whose namespaces still exist. Returns the daemon and the receiver of datapath
    /// events, which the caller feeds back through [`Daemon::handle_event`].
    pub async fn start(
        state_dir: &Path,
        opts: &RuntimeOptions,
    ) -> anyhow::Result<(Arc<Self>, tokio::sync::mpsc::UnboundedReceiver<Event>)> {
        let state_dir = StateDir::new(state_dir)?;
        raise_fd_limit();
        let rootless = !nix::unistd::geteuid().is_root();
        let catalog = Catalog::default().shared();
        let responder = Arc::new(Responder::new(catalog.clone(), opts.ttl));
        let upstreams = Arc::new(Upstreams::new(
            opts.upstreams.clone(),
            opts.resolv_conf.clone(),
        ));
        let forwarder = Forwarder::new(upstreams, opts.max_forwards);
        let (jobs, job_rx) = tokio::sync::mpsc::unbounded_channel();
        let metrics = crate::metrics::Metrics::default();
        tokio::spawn(host::dns::run_forwarder(
            forwarder.clone(),
            job_rx,
            metrics.upstream_latency.clone(),
        ));
        let (nat_jobs, nat_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(host::outbound::run_jobs(nat_rx));
        let policy = Arc::new(parking_lot::RwLock::new(Policy {
            host_loopback: opts.host_loopback,
            ..Default::default()
        }));
        let (events, rx) = tokio::sync::mpsc::unbounded_channel();
        let targets = TargetWatch::start(events.clone());
        let own_netns = NetNs::current()
            .context("cannot open the daemon's own network namespace")?
            .id();
        let host_netns = crate::netns::target::host_netns();
        let loaded = state_dir.load()?;
        let fresh = loaded.is_none();
        let ns_sockets = match rootless {
            true => None,
            false => host::direct::SocketFactory::start()
                .inspect_err(
                    |e| tracing::warn!(error = %e, "in-kernel published ports unavailable"),
                )
                .ok(),
        };
        let daemon = Arc::new(Self {
            inner: Mutex::new(Inner {
                store: loaded.unwrap_or_default(),
                live: HashMap::new(),
                watchers: HashMap::new(),
                starting: HashMap::new(),
                docker: DockerState::default(),
                remote: cluster::Remote::new(),
                nodes: HashMap::new(),
            }),
            state_dir,
            events,
            own_netns,
            host_netns,
            catalog,
            dns: DnsHook {
                responder,
                forwarder,
                jobs,
            },
            nat_jobs,
            policy,
            rootless,
            targets,
            ns_sockets,
            datapath_nice: opts.datapath_nice,
            datapath_busy_poll: opts.datapath_busy_poll,
            vxlan: host::vxlan::VxlanHost::new(opts.vxlan),
            cluster: opts
                .cluster
                .clone()
                .map(|c| Arc::new(crate::cluster::Cluster::new(c))),
            metrics,
        });
        {
            let mut inner = daemon.inner.lock().await;
            if inner.store.find_network(DEFAULT_NETWORK).is_none() {
                let bridge = crate::plan::default_bridge(ids::random_id(), ids::now());
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
            daemon.refresh_vteps(&inner);
            daemon.adopt_containers(&mut inner);
            daemon.state_dir.save(&inner.store)?;
        }
        Ok((daemon, rx))
    }

    /// Starts a network's datapath and enters it in the NAT policy and the DNS catalog.
    fn start_network(&self, net: &Network) -> Result<LiveNetwork> {
        let gateway = GatewayConfig {
            mac: net.gateway_mac().0,
            ipv4: Some((net.gateway, net.subnet.prefix_len())),
            ipv6: net
                .subnet6
                .zip(net.gateway6)
                .map(|(s, g)| (g, s.prefix_len())),
            mtu: net.mtu as usize,
            nat: !net.internal,
        };
        // An overlay whose VXLAN port cannot be opened (taken, or the advertise address not up
        // yet) still works on this host; the other networks must not suffer for it.
        let tunnel = match &net.overlay {
            Some(o) => match self.vxlan.sockets() {
                Ok(sockets) => Some(crate::datapath::TunnelSpec {
                    vni: o.vni,
                    own: self.vxlan.config.advertise,
                    peers: o.peers.clone(),
                    sockets,
                }),
                Err(e) => {
                    tracing::error!(network = %net.name, error = %e, "overlay network runs without its tunnel: no other host reaches it");
                    None
                }
            },
            None => None,
        };
        let sockets = tunnel
            .as_ref()
            .map(|t| (t.vni, t.sockets.clone(), t.peers.clone()));
        let spec = DatapathSpec {
            network_id: net.id.clone(),
            network_name: net.name.clone(),
            gateway,
            nice: self.datapath_nice,
            busy_poll: self.datapath_busy_poll,
            tunnel,
        };
        let links = Links {
            dns: Some(self.dns.clone()),
            nat_jobs: self.nat_jobs.clone(),
            policy: self.policy.clone(),
            events: self.events.clone(),
        };
        let datapath = Datapath::start(spec, links).map_err(|e| {
            Error::failed(
                &format!("cannot start the datapath of network {}", net.name),
                e,
            )
        })?;
        {
            let mut p = self.policy.write();
            p.subnets.extend(subnets(net));
        }
        if let Some((vni, sockets, peers)) = sockets {
            sockets.register(vni, datapath.tunnel_injector(), peers);
        }
        self.catalog.write().add_network(&net.id, zone_for(net));
        Ok(LiveNetwork {
            datapath,
            ports: HashMap::new(),
            published: HashMap::new(),
        })
    }

    /// Recomputes the published ports of the NAT policy from the store.
    /// Recomputes the published ports of the NAT policy from the store.
    fn refresh_policy_ports(&self, store: &Store) {
        let mut ports: HashMap<_, Vec<_>> = HashMap::new();
        for m in store.endpoints.values().flat_map(|e| &e.ports) {
            ports
                .entry((m.proto, m.host_port))
                .or_default()
                .push(m.host_ip);
        }
        self.policy.write().published = ports;
    }

    /// Writes the state file; a failure is the request's (500), with the reason.
    fn persist(&self, store: &Store) -> Result<()> {
        self.state_dir
            .save(store)
            .map_err(|e| Error::failed("cannot save the state", e))
    }

    /// Writes the state file after a change nobody asked for (GC, an exited container): a
    /// failure can only be logged.
    fn persist_or_log(&self, store: &Store) {
        if let Err(e) = self.state_dir.save(store) {
            tracing::error!(error = %format!("{e:#}"), "cannot save state");
        }
    }

    /// The cluster store's handle, in a cluster.
    pub fn cluster(&self) -> Option<Arc<crate::cluster::Cluster>> {
        self.cluster.clone()
    }

    pub fn responder(&self) -> Arc<Responder> {
        self.dns.responder.clone()
    }

    pub async fn handle_event(&self, event: Event) {
        let mut inner = self.inner.lock().await;
        match event {
            Event::TargetGone { endpoint_id } => {
                let Some(ep) = inner.store.endpoints.get(&endpoint_id).cloned() else {
                    return;
                };
                self.unplug(&mut inner, &ep).await;
                tracing::info!(endpoint = %ep.name, target = %ep.target, "endpoint removed: its target is gone");
            }
            Event::PortGone {
                network_id,
                endpoint_id,
            } => {
                let Some(ep) = inner.store.endpoints.get(&endpoint_id).cloned() else {
                    return;
                };
                // The datapath has unplugged the port already.
                if let Some(live) = inner.live.get_mut(&network_id) {
                    live.ports.remove(&endpoint_id);
                }
                self.unplug(&mut inner, &ep).await;
                tracing::info!(endpoint = %ep.name, ip = %ep.ipv4, "endpoint removed: its device is gone");
            }
        }
        self.persist_or_log(&inner.store);
    }

    /// Stops every datapath (closing the TAPs). Endpoints stay in the state and are restored at
    /// the next start.
    pub async fn shutdown(&self) {
        let mut inner = self.inner.lock().await;
        inner.live.clear();
    }
}

/// A network's subnets, both families.
/// The DNS zone of a network (its endpoints are added one by one).
fn zone_for(net: &Network) -> Zone {
    let zone_subnets = subnets(net)
        .map(|n| (n.network(), n.prefix_len()))
        .collect();
    let gateways = std::iter::once(IpAddr::V4(net.gateway))
        .chain(net.gateway6.map(IpAddr::V6))
        .collect();
    Zone::new(&net.name, net.dns_names, net.internal, zone_subnets)
        .with_gateways(gateways)
        .with_upstreams(&net.dns)
}

fn subnets(net: &Network) -> impl Iterator<Item = ipnet::IpNet> {
    std::iter::once(ipnet::IpNet::V4(net.subnet)).chain(net.subnet6.map(ipnet::IpNet::V6))
}

fn find_network<'a>(store: &'a Store, key: &str) -> Result<&'a Network> {
    store
        .find_network(key)
        .ok_or_else(|| Error::not_found(format!("network {key} not found")))
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

/// Ids and timestamps of new objects.
mod ids {
    /// 64 hex digits from the kernel's random source, like Docker's ids.
    pub fn random_id() -> String {
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

    /// Now, as Docker prints creation times.
    pub fn now() -> String {
        humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string()
    }
}
