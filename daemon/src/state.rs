//! The daemon's persistent state: networks and endpoints, stored as one JSON file in the state
//! directory and replaced atomically (write to a temporary file, fsync, rename, fsync the
//! directory) on every change, so a crash at any instant leaves either the old or the new state.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use anyhow::Context;
use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::api::Target;

const STATE_FILE: &str = "state.json";
const STATE_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Network {
    pub id: String,
    pub name: String,
    pub created: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub ip_range: Option<Ipv4Net>,
    pub subnet6: Option<Ipv6Net>,
    pub gateway6: Option<Ipv6Addr>,
    pub internal: bool,
    pub mtu: u32,
    /// Container names resolve on this network (every network but the default `bridge`).
    pub dns_names: bool,
}

impl Network {
    pub fn enable_ipv6(&self) -> bool {
        self.subnet6.is_some()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoint {
    /// The "container" id (`docker network inspect` keys Containers by it).
    pub id: String,
    pub endpoint_id: String,
    pub name: String,
    pub network_id: String,
    pub target: Target,
    /// Identity of the namespace at attach time, to recognise it after a daemon restart.
    pub ns_dev: u64,
    pub ns_ino: u64,
    pub ifname: String,
    pub mac: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Option<Ipv6Addr>,
    pub aliases: Vec<String>,
    /// Whether this endpoint wrote /etc/netns/NAME/resolv.conf (and so removes it at detach).
    pub wrote_resolv_conf: bool,
    /// Published ports (host ports as bound).
    #[serde(default)]
    pub ports: Vec<vswitch_nat::PortMapping>,
    /// Metric of the endpoint's default routes: 100 for the first network a namespace joins,
    /// then the next free one, so the first network stays the default and the next takes over
    /// when it leaves. Kept so that a daemon restart does not reorder them. `None` on internal
    /// networks (no default route) and in stores written before metrics existed.
    #[serde(default)]
    pub route_metric: Option<u32>,
}

/// A container started with `vswitch run`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Container {
    pub id: String,
    pub name: String,
    pub cmd: Vec<String>,
    /// The network mode as given: `bridge`, a network, `host`, `none` or `container:NAME`.
    pub network: String,
    pub ip: Option<String>,
    pub aliases: Vec<String>,
    pub ports: Vec<String>,
    pub hostname: Option<String>,
    pub created: String,
    /// While running: the init process and its start time (clock ticks since boot), which
    /// together identify it across a daemon restart.
    pub pid: Option<u32>,
    pub start_ticks: Option<u64>,
    pub exit_code: Option<i32>,
    /// Further networks joined with `network connect NET CONTAINER`: attached again at every
    /// start, as Docker keeps them.
    #[serde(default)]
    pub connected: Vec<Connected>,
}

/// A network a container was connected to after it was created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connected {
    /// The network's id (its name may change hands).
    pub network_id: String,
    pub ip: Option<String>,
    pub aliases: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Store {
    pub version: u32,
    pub networks: BTreeMap<String, Network>,
    pub endpoints: BTreeMap<String, Endpoint>,
    #[serde(default)]
    pub containers: BTreeMap<String, Container>,
}

impl Store {
    /// Finds a network by exact name, exact id, or unique id prefix (as Docker does).
    pub fn find_network(&self, key: &str) -> Option<&Network> {
        if let Some(n) = self.networks.values().find(|n| n.name == key) {
            return Some(n);
        }
        if let Some(n) = self.networks.get(key) {
            return Some(n);
        }
        let mut matches = self.networks.values().filter(|n| n.id.starts_with(key));
        match (matches.next(), matches.next()) {
            (Some(n), None) if !key.is_empty() => Some(n),
            _ => None,
        }
    }

    pub fn endpoints_of<'a>(&'a self, network_id: &'a str) -> impl Iterator<Item = &'a Endpoint> {
        self.endpoints
            .values()
            .filter(move |e| e.network_id == network_id)
    }
}

/// Loads and saves the store in a state directory.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create state directory {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn load(&self) -> anyhow::Result<Option<Store>> {
        let path = self.dir.join(STATE_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let store: Store = serde_json::from_slice(&bytes)
            .with_context(|| format!("corrupt state file {}", path.display()))?;
        anyhow::ensure!(
            store.version == STATE_VERSION,
            "state file {} has version {}, this vswitch understands {STATE_VERSION}",
            path.display(),
            store.version
        );
        Ok(Some(store))
    }

    pub fn save(&self, store: &Store) -> anyhow::Result<()> {
        let mut store_v = store.clone();
        store_v.version = STATE_VERSION;
        // One buffer, one write: serde_json writes token by token, which unbuffered was one
        // syscall per token (about 800 for a two-endpoint store, growing with every endpoint).
        let mut json = serde_json::to_vec_pretty(&store_v)?;
        json.push(b'\n');
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        tmp.write_all(&json)?;
        tmp.as_file().sync_all()?;
        tmp.persist(self.dir.join(STATE_FILE))?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(())
    }
}
