//! What the DNS server knows: per network, the names of its endpoints, and per client, which
//! networks it may see.
//!
//! Scoping follows Docker: an endpoint resolves the names of the networks its namespace is
//! attached to and no others. The catalog therefore records, for every endpoint address, the
//! namespace it belongs to (`scope` key), and for every namespace the networks it is on.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// One endpoint's records on one network.
#[derive(Debug, Clone)]
pub struct EndpointRecords {
    /// Unique id of the endpoint (owner of its records).
    pub id: String,
    /// Key of the namespace the endpoint lives in; endpoints of one namespace on several
    /// networks share it.
    pub scope: String,
    pub name: String,
    pub aliases: Vec<String>,
    pub addrs: Vec<IpAddr>,
}

/// The names of one network.
#[derive(Debug, Clone)]
pub struct Zone {
    /// The network's name, which is also its DNS domain (`tomcat81.you_network`).
    pub name: String,
    /// Whether container names resolve here (false on the default `bridge`, as in Docker).
    pub names: bool,
    /// Internal networks have no way out: nothing is forwarded upstream from them.
    pub internal: bool,
    /// The network's subnets (address, prefix length), to keep reverse lookups of its private
    /// addresses from leaking upstream.
    pub subnets: Vec<(IpAddr, u8)>,
    /// The gateway's addresses: what `host.containers.internal` resolves to.
    pub gateways: Vec<IpAddr>,
    /// The network's own upstream servers (`network create --dns`); `None`: the daemon's.
    pub upstreams: Option<Upstreams>,
    records: BTreeMap<String, Vec<(String, IpAddr)>>,
    reverse: HashMap<IpAddr, String>,
}

impl Zone {
    pub fn new(name: &str, names: bool, internal: bool, subnets: Vec<(IpAddr, u8)>) -> Self {
        Self {
            name: name.to_ascii_lowercase(),
            names,
            internal,
            subnets,
            gateways: Vec::new(),
            upstreams: None,
            records: BTreeMap::new(),
            reverse: HashMap::new(),
        }
    }

    /// The zone with its gateway's addresses.
    pub fn with_gateways(mut self, gateways: Vec<IpAddr>) -> Self {
        self.gateways = gateways;
        self
    }

    /// The zone with the network's own upstream servers (none given: the daemon's).
    pub fn with_upstreams(mut self, servers: &[SocketAddr]) -> Self {
        self.upstreams = (!servers.is_empty()).then(|| servers.into());
        self
    }

    /// Whether any name lives under the zone.
    pub fn has_names(&self) -> bool {
        !self.records.is_empty()
    }

    /// Addresses under `name` (lower-case, no trailing dot), with their owners.
    pub fn lookup(&self, name: &str) -> Option<&[(String, IpAddr)]> {
        self.records.get(name).map(Vec::as_slice)
    }

    /// The name an address points back to (`name.network.`).
    pub fn reverse(&self, ip: IpAddr) -> Option<&str> {
        self.reverse.get(&ip).map(String::as_str)
    }

    pub fn contains_addr(&self, ip: IpAddr) -> bool {
        self.subnets
            .iter()
            .any(|(net, len)| in_subnet(*net, *len, ip))
    }

    fn insert(&mut self, ep: &EndpointRecords) {
        let full = format!("{}.{}", ep.name.to_ascii_lowercase(), self.name);
        let mut names: Vec<String> = vec![ep.name.to_ascii_lowercase(), full.clone()];
        for alias in &ep.aliases {
            let a = alias.to_ascii_lowercase();
            names.push(format!("{a}.{}", self.name));
            names.push(a);
        }
        names.sort();
        names.dedup();
        for n in names {
            let entry = self.records.entry(n).or_default();
            entry.retain(|(o, _)| o != &ep.id);
            entry.extend(ep.addrs.iter().map(|a| (ep.id.clone(), *a)));
        }
        for a in &ep.addrs {
            self.reverse.insert(*a, format!("{full}."));
        }
    }

    fn remove(&mut self, owner: &str) -> Vec<IpAddr> {
        let mut addrs = Vec::new();
        self.records.retain(|_, v| {
            v.retain(|(o, a)| {
                if o == owner {
                    addrs.push(*a);
                    false
                } else {
                    true
                }
            });
            !v.is_empty()
        });
        addrs.sort();
        addrs.dedup();
        for a in &addrs {
            self.reverse.remove(a);
        }
        addrs
    }
}

fn in_subnet(net: IpAddr, len: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(len.min(32)))
                .unwrap_or(0);
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(len.min(128)))
                .unwrap_or(0);
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

/// Upstream DNS servers, shared cheaply with every forward that uses them.
pub type Upstreams = Arc<[SocketAddr]>;

/// The catalog as the control plane (which writes it on attach, detach and GC) and the
/// responders (which read it per query) share it.
pub type SharedCatalog = Arc<parking_lot::RwLock<Catalog>>;

/// A generation number never handed out before in this process.
fn next_generation() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Every network's zone, and which client sees which networks.
#[derive(Debug, Default, Clone)]
pub struct Catalog {
    zones: HashMap<String, Zone>,
    /// network id -> endpoint address -> scope key. Nested so that the per-query lookup in
    /// [`Catalog::scope`] borrows the network id instead of building a key.
    clients: HashMap<String, HashMap<IpAddr, String>>,
    /// scope key -> (network id, endpoint id) of each of its endpoints.
    scopes: HashMap<String, Vec<(String, String)>>,
    /// Set anew by every change, from a counter of the whole process: answers kept from
    /// another generation are stale, even across a catalog replaced wholesale.
    generation: u64,
}

impl Catalog {
    /// This catalog, ready to be shared.
    pub fn shared(self) -> SharedCatalog {
        Arc::new(parking_lot::RwLock::new(self))
    }

    pub fn add_network(&mut self, id: &str, zone: Zone) {
        self.generation = next_generation();
        self.zones.insert(id.to_owned(), zone);
    }

    pub fn remove_network(&mut self, id: &str) {
        self.generation = next_generation();
        self.zones.remove(id);
        self.clients.remove(id);
        for eps in self.scopes.values_mut() {
            eps.retain(|(net, _)| net != id);
        }
        self.scopes.retain(|_, v| !v.is_empty());
    }

    /// Registers an endpoint's names on network `net_id`. They resolve from this call on.
    pub fn add_endpoint(&mut self, net_id: &str, ep: &EndpointRecords) {
        self.generation = next_generation();
        let Some(zone) = self.zones.get_mut(net_id) else {
            return;
        };
        zone.insert(ep);
        let clients = self.clients.entry(net_id.to_owned()).or_default();
        for a in &ep.addrs {
            clients.insert(*a, ep.scope.clone());
        }
        let eps = self.scopes.entry(ep.scope.clone()).or_default();
        if !eps.iter().any(|(n, e)| n == net_id && e == &ep.id) {
            eps.push((net_id.to_owned(), ep.id.clone()));
        }
    }

    /// Removes an endpoint's names. They stop resolving from this call on.
    pub fn remove_endpoint(&mut self, net_id: &str, endpoint_id: &str) {
        self.generation = next_generation();
        let Some(zone) = self.zones.get_mut(net_id) else {
            return;
        };
        let removed = zone.remove(endpoint_id);
        if let Some(clients) = self.clients.get_mut(net_id) {
            for a in removed {
                clients.remove(&a);
            }
        }
        for eps in self.scopes.values_mut() {
            eps.retain(|(n, e)| !(n == net_id && e == endpoint_id));
        }
        self.scopes.retain(|_, v| !v.is_empty());
    }

    /// Changes so far: two reads with the same generation saw the same catalog.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn zone(&self, net_id: &str) -> Option<&Zone> {
        self.zones.get(net_id)
    }

    pub fn zones(&self) -> impl Iterator<Item = &Zone> {
        self.zones.values()
    }

    /// The networks a client at `client` on network `net_id` may resolve names of: every network
    /// its namespace is attached to, the one asked first. An unknown client (not an endpoint)
    /// sees only the network it asked on.
    pub fn scope(&self, net_id: &str, client: IpAddr) -> Vec<&Zone> {
        match self.clients.get(net_id).and_then(|c| c.get(&client)) {
            Some(key) => self.scope_of(net_id, key),
            None => self.zones.get(net_id).into_iter().collect(),
        }
    }

    /// The networks the namespace with scope key `key` may resolve names of, `net_id` first
    /// (its port is on that network).
    pub fn scope_of(&self, net_id: &str, key: &str) -> Vec<&Zone> {
        let mut out: Vec<&Zone> = self.zones.get(net_id).into_iter().collect();
        if let Some(eps) = self.scopes.get(key) {
            for (n, _) in eps {
                if n != net_id
                    && let Some(z) = self.zones.get(n)
                    && !out.iter().any(|o| std::ptr::eq(*o, z))
                {
                    out.push(z);
                }
            }
        }
        out
    }
}
