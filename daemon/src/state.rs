//! The daemon's persistent state: networks, endpoints and containers, stored as one JSON file in
//! the state directory and replaced atomically (write to a temporary file, fsync, rename, fsync
//! the directory) on every change, so a crash at any instant leaves either the old or the new
//! state.
//!
//! Fields are typed (addresses, MACs, namespace identities), so a value is parsed once, when
//! the file is loaded, and a file that does not parse, or that contradicts itself (an endpoint
//! on a network it does not have), is a start-up error naming the file: nothing is dropped or
//! guessed silently. Files written by earlier versions load as they are; fields added since
//! have defaults.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use vswitch_netdev::ns::NsId;
use vswitch_switch::MacAddr;

use crate::api::Target;

const STATE_FILE: &str = "state.json";
const STATE_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// The network's own upstream DNS servers (`network create --dns`); empty: the daemon's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<std::net::SocketAddr>,
    /// Whether a port may send only from its own MAC and addresses (`--opt port-security`).
    /// Networks stored before the option existed get the default.
    #[serde(default, skip_serializing_if = "PortSecurity::is_strict")]
    pub port_security: PortSecurity,
    /// The Docker network this one is, when dockerd made it through the plugin (or adopted it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<DockerNetwork>,
    /// An overlay network: its frames reach other hosts in VXLAN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<Overlay>,
}

/// What makes a network an overlay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overlay {
    /// The VXLAN network identifier.
    pub vni: u32,
    /// External VTEPs (`network peer add`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<std::net::IpAddr>,
}

/// How dockerd knows a network it drives through vswitch's plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerNetwork {
    /// Docker's network id.
    pub id: String,
    /// The vswitch network existed before (same subnet): `docker network rm` lets go of it
    /// rather than removing it.
    #[serde(default)]
    pub adopted: bool,
    /// The name is still the provisional `docker-<id>`: dockerd has not told it yet.
    #[serde(default)]
    pub unnamed: bool,
}

/// What a network's ports may send from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortSecurity {
    /// Only from the MAC and addresses the endpoint was given: a frame that claims anything
    /// else (an IP or ARP or neighbour-discovery source, a router advertisement) is dropped
    /// and counted, between containers as towards the gateway.
    #[default]
    Strict,
    /// From anything, as on a Linux bridge: for containers that route or move addresses
    /// (a VPN server, a floating address of keepalived). The gateway still answers only for
    /// its own addresses.
    Off,
}

impl PortSecurity {
    pub fn is_strict(&self) -> bool {
        *self == PortSecurity::Strict
    }

    /// As `--opt port-security=` spells it.
    pub fn as_str(&self) -> &'static str {
        match self {
            PortSecurity::Strict => "strict",
            PortSecurity::Off => "off",
        }
    }
}

impl Network {
    pub fn enable_ipv6(&self) -> bool {
        self.subnet6.is_some()
    }

    /// The gateway's MAC: derived from its IPv4 address like an endpoint's, so it is the same on
    /// every start and never borrowed from an endpoint (IPAM never hands out the gateway
    /// address, so no endpoint derives the same one).
    pub fn gateway_mac(&self) -> MacAddr {
        MacAddr::from_ipv4(self.gateway)
    }

    /// `ADDRESS/PREFIX` of an IPv4 address on this network.
    pub fn cidr4(&self, ip: Ipv4Addr) -> String {
        format!("{ip}/{}", self.subnet.prefix_len())
    }

    /// `ADDRESS/PREFIX` of an IPv6 address on this network; empty without one (as Docker
    /// shows it).
    pub fn cidr6(&self, ip: Option<Ipv6Addr>) -> String {
        ip.zip(self.subnet6)
            .map(|(ip, s)| format!("{ip}/{}", s.prefix_len()))
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// The "container" id (`docker network inspect` keys Containers by it).
    pub id: String,
    pub endpoint_id: String,
    pub name: String,
    pub network_id: String,
    pub target: Target,
    /// Identity of the namespace at attach time, to recognise it after a daemon restart
    /// (stored as `ns_dev` and `ns_ino`).
    #[serde(flatten, with = "ns_fields")]
    pub ns: NsId,
    pub ifname: String,
    #[serde(with = "mac_text")]
    pub mac: MacAddr,
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
    /// Attached by a container engine through CNI: the engine owns it and names it by
    /// (container id, interface). `None` for endpoints of vswitch's own CLI and containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni: Option<CniOwner>,
    /// Docker's endpoint id, for an endpoint dockerd joined through the plugin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<String>,
}

/// How a container engine knows an endpoint it attached through CNI.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CniOwner {
    pub container_id: String,
    pub ifname: String,
}

/// A container started with `vswitch run`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    pub id: String,
    pub name: String,
    pub cmd: Vec<String>,
    /// The network mode as given: `bridge`, a network, `host`, `none` or `container:NAME`.
    pub network: String,
    pub ip: Option<Ipv4Addr>,
    pub aliases: Vec<String>,
    /// `-p` specs as given: host port ranges are settled again at every start.
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
    pub ip: Option<Ipv4Addr>,
    pub aliases: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Store {
    pub version: u32,
    pub networks: BTreeMap<String, Network>,
    pub endpoints: BTreeMap<String, Endpoint>,
    #[serde(default)]
    pub containers: BTreeMap<String, Container>,
    /// Addresses and MACs promised to Docker on each network (by network id) that no endpoint
    /// holds yet: new endpoints must not take them. Kept in memory only; Docker asks again.
    #[serde(skip)]
    pub held: BTreeMap<String, Held>,
}

/// What Docker holds on one network.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    pub addrs: std::collections::BTreeSet<std::net::IpAddr>,
    pub macs: std::collections::BTreeSet<[u8; 6]>,
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

    /// The endpoints in namespace `ns`.
    pub fn endpoints_in(&self, ns: NsId) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.values().filter(move |e| e.ns == ns)
    }

    /// What makes a store contradict itself: each a line naming what is wrong.
    fn inconsistencies(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (key, n) in &self.networks {
            if key != &n.id {
                problems.push(format!("network {} is stored under the key {key}", n.id));
            }
            // What a network's gateway could not be (smoltcp panicked on a multicast subnet).
            let usable = crate::ipam::check_usable4(n.subnet)
                .and_then(|()| n.subnet6.map_or(Ok(()), crate::ipam::check_usable6));
            if let Err(e) = usable {
                problems.push(format!("network {}: {e}", n.name));
            }
            if !crate::ipam::is_host4(n.subnet, n.gateway) {
                problems.push(format!(
                    "network {}: gateway {} is not a host address of {}",
                    n.name, n.gateway, n.subnet
                ));
            }
        }
        let mut ids = HashSet::new();
        for (key, e) in &self.endpoints {
            if key != &e.id {
                problems.push(format!("endpoint {} is stored under the key {key}", e.id));
            }
            if !self.networks.contains_key(&e.network_id) {
                problems.push(format!(
                    "endpoint {} ({}) is on network {}, which is not in the file",
                    e.name, e.id, e.network_id
                ));
            }
            if !ids.insert((&e.network_id, e.ipv4)) {
                problems.push(format!(
                    "address {} is given twice on network {}",
                    e.ipv4, e.network_id
                ));
            }
        }
        for (key, c) in &self.containers {
            if key != &c.id {
                problems.push(format!("container {} is stored under the key {key}", c.id));
            }
        }
        problems
    }
}

/// Creates `dir` (and its parents) and makes it 0700: it holds every tenant's addresses,
/// container logs and the control plane's lock, which are nobody else's business.
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create state directory {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot make state directory {} private", dir.display()))
}

/// Loads and saves the store in a state directory.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        create_private_dir(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The stored state, `None` on a first start (no file yet).
    pub fn load(&self) -> anyhow::Result<Option<Store>> {
        let path = self.dir.join(STATE_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        parse(&bytes).with_context(|| {
            format!(
                "state file {} cannot be used (fix or move it away; vswitch never drops what it \
                 holds)",
                path.display()
            )
        })
        .map(Some)
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

/// Parses a state file's bytes and checks that it holds together.
fn parse(bytes: &[u8]) -> anyhow::Result<Store> {
    let store: Store = serde_json::from_slice(bytes).context("it is not a valid state file")?;
    if store.version != STATE_VERSION {
        bail!(
            "it has version {}, this vswitch understands {STATE_VERSION}",
            store.version
        );
    }
    let problems = store.inconsistencies();
    if !problems.is_empty() {
        bail!("it contradicts itself: {}", problems.join("; "));
    }
    Ok(store)
}

/// A namespace identity as the two fields `ns_dev` and `ns_ino`.
mod ns_fields {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use vswitch_netdev::ns::NsId;

    #[derive(Serialize, Deserialize)]
    struct Fields {
        ns_dev: u64,
        ns_ino: u64,
    }

    pub fn serialize<S: Serializer>(ns: &NsId, s: S) -> Result<S::Ok, S::Error> {
        Fields {
            ns_dev: ns.dev,
            ns_ino: ns.ino,
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<NsId, D::Error> {
        let f = Fields::deserialize(d)?;
        Ok(NsId {
            dev: f.ns_dev,
            ino: f.ns_ino,
        })
    }
}

/// A MAC address as its usual text, `02:42:ac:11:00:02`.
mod mac_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use vswitch_switch::MacAddr;

    pub fn serialize<S: Serializer>(mac: &MacAddr, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(mac)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<MacAddr, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CURRENT: &str = include_str!("../tests/fixtures/state-v1-2026-12.json");
    const EARLY: &str = include_str!("../tests/fixtures/state-v1-early.json");

    /// A file written by the daemon before fields were typed loads with every value in place,
    /// and is written back the same.
    #[test]
    fn a_state_file_of_the_previous_version_loads_unchanged() {
        let store = parse(CURRENT.as_bytes()).expect("loads");
        assert_eq!(store.networks.len(), 3);
        assert_eq!(store.endpoints.len(), 5);
        let fxb: Vec<&Endpoint> = store
            .endpoints
            .values()
            .filter(|e| e.name == "fxb")
            .collect();
        assert_eq!(fxb.len(), 2);
        assert_eq!(fxb[0].ns, fxb[1].ns, "one namespace");
        assert_eq!(fxb[0].ns.ino, 4026532315);
        let custom = fxb.iter().find(|e| e.ifname == "eth0").expect("eth0");
        assert_eq!(custom.mac.to_string(), "02:11:22:33:44:55");
        let c = store.containers.values().next().expect("container");
        assert_eq!(c.connected[0].ip, Some(Ipv4Addr::new(10, 77, 0, 50)));
        // Saved again, it reads back the same, field for field.
        let again: serde_json::Value = serde_json::to_value(&store).expect("serialises");
        let original: serde_json::Value = serde_json::from_str(CURRENT).expect("json");
        assert_eq!(again, original);
    }

    #[test]
    fn a_state_file_from_before_ports_metrics_and_containers_loads() {
        let store = parse(EARLY.as_bytes()).expect("loads");
        assert_eq!(store.endpoints.len(), 3);
        assert!(store.containers.is_empty());
        assert!(
            store
                .endpoints
                .values()
                .all(|e| e.route_metric.is_none() && e.ports.is_empty())
        );
    }

    fn broken(edit: impl Fn(&mut serde_json::Value)) -> String {
        let mut v: serde_json::Value = serde_json::from_str(CURRENT).expect("json");
        edit(&mut v);
        let err = parse(v.to_string().as_bytes()).expect_err("refused");
        format!("{err:#}")
    }

    fn first_endpoint(v: &mut serde_json::Value) -> &mut serde_json::Value {
        v["endpoints"]
            .as_object_mut()
            .and_then(|m| m.values_mut().next())
            .expect("an endpoint")
    }

    /// A bad value is a clear error, never a silently dropped endpoint.
    #[test]
    fn a_corrupt_state_file_is_refused_with_the_reason() {
        let e = broken(|v| first_endpoint(v)["mac"] = "02:42:zz:00:00:01".into());
        assert!(e.contains("MAC"), "{e}");
        let e = broken(|v| first_endpoint(v)["ipv4"] = "172.30.0.300".into());
        assert!(e.contains("invalid"), "{e}");
        let e = broken(|v| {
            first_endpoint(v)
                .as_object_mut()
                .expect("object")
                .remove("ns_ino");
        });
        assert!(e.contains("ns_ino"), "{e}");
        let e = broken(|v| first_endpoint(v)["network_id"] = "f00".into());
        assert!(e.contains("not in the file"), "{e}");
        let e = broken(|v| {
            let net = v["networks"]
                .as_object_mut()
                .and_then(|m| m.values_mut().next())
                .expect("a network");
            net["subnet"] = "224.0.0.0/24".into();
            net["gateway"] = "224.0.0.1".into();
        });
        assert!(e.contains("multicast"), "{e}");
        let e = broken(|v| v["version"] = 9.into());
        assert!(e.contains("version 9"), "{e}");
        let truncated = &CURRENT[..CURRENT.len() / 2];
        assert!(parse(truncated.as_bytes()).is_err());
        assert!(parse(b"").is_err());
    }

    #[test]
    fn load_names_the_file_and_a_missing_file_is_a_first_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sd = StateDir::new(dir.path()).expect("state dir");
        assert_eq!(sd.load().expect("no file"), None);
        std::fs::write(dir.path().join(STATE_FILE), &CURRENT[..100]).expect("write");
        let err = format!("{:#}", sd.load().expect_err("truncated"));
        assert!(err.contains("state.json"), "{err}");
        let store = parse(CURRENT.as_bytes()).expect("loads");
        sd.save(&store).expect("save");
        assert_eq!(sd.load().expect("load"), Some(store));
    }
}
