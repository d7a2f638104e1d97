//! What the cluster store holds, and where: keys under `/vswitch/v1/` and their JSON values.
//! Pure, so the layout is unit-tested.
//!
//! - `nodes/<node>`: a daemon (its advertise address), under its lease.
//! - `networks/<name>`: an overlay network, the same on every host.
//! - `vni/<vni>`: which network has the VNI (so two never get one).
//! - `endpoints/<network id>/<node>/<endpoint id>`: an endpoint, under its node's lease.
//! - `ipam/<network id>/<address>`: who holds the address, under the holder's lease.
//! - `peers/<network id>/<address>`: an external VTEP of the network, for every host.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::state::{Network, Overlay, PortSecurity};

pub const PREFIX: &str = "/vswitch/v1/";

/// A node's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub advertise: IpAddr,
}

/// An overlay network as every host creates it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    pub id: String,
    pub name: String,
    pub created: String,
    pub vni: u32,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    #[serde(default)]
    pub ip_range: Option<Ipv4Net>,
    #[serde(default)]
    pub subnet6: Option<Ipv6Net>,
    #[serde(default)]
    pub gateway6: Option<Ipv6Addr>,
    pub internal: bool,
    pub mtu: u32,
    #[serde(default)]
    pub port_security: PortSecurity,
}

impl NetworkRecord {
    /// The record of a local overlay network; `None` for any other.
    pub fn of(net: &Network) -> Option<Self> {
        let o = net.overlay.as_ref()?;
        Some(Self {
            id: net.id.clone(),
            name: net.name.clone(),
            created: net.created.clone(),
            vni: o.vni,
            subnet: net.subnet,
            gateway: net.gateway,
            ip_range: net.ip_range,
            subnet6: net.subnet6,
            gateway6: net.gateway6,
            internal: net.internal,
            mtu: net.mtu,
            port_security: net.port_security,
        })
    }

    /// The local network this record describes (without peers).
    pub fn network(&self) -> Network {
        Network {
            id: self.id.clone(),
            name: self.name.clone(),
            created: self.created.clone(),
            subnet: self.subnet,
            gateway: self.gateway,
            ip_range: self.ip_range,
            subnet6: self.subnet6,
            gateway6: self.gateway6,
            internal: self.internal,
            mtu: self.mtu,
            dns_names: true,
            dns: Vec::new(),
            port_security: self.port_security,
            docker: None,
            overlay: Some(Overlay {
                vni: self.vni,
                peers: Vec::new(),
            }),
        }
    }
}

/// An endpoint on some host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub node: String,
    /// The node's advertise address: where its VXLAN goes.
    pub host: IpAddr,
    pub name: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    pub mac: String,
    pub ipv4: Ipv4Addr,
    #[serde(default)]
    pub ipv6: Option<Ipv6Addr>,
}

/// A key of the store, understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Node(String),
    Network(String),
    Vni(u32),
    Endpoint {
        network: String,
        node: String,
        endpoint: String,
    },
    Ipam {
        network: String,
        addr: IpAddr,
    },
    Peer {
        network: String,
        addr: IpAddr,
    },
}

impl Key {
    pub fn parse(key: &str) -> Option<Self> {
        let rest = key.strip_prefix(PREFIX)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let ok = |s: &&str| !s.is_empty();
        match parts.as_slice() {
            ["nodes", n] if ok(n) => Some(Self::Node((*n).to_owned())),
            ["networks", n] if ok(n) => Some(Self::Network((*n).to_owned())),
            ["vni", v] => v.parse().ok().map(Self::Vni),
            ["endpoints", net, node, ep] if ok(net) && ok(node) && ok(ep) => Some(Self::Endpoint {
                network: (*net).to_owned(),
                node: (*node).to_owned(),
                endpoint: (*ep).to_owned(),
            }),
            ["ipam", net, addr] if ok(net) => addr.parse().ok().map(|addr| Self::Ipam {
                network: (*net).to_owned(),
                addr,
            }),
            ["peers", net, addr] if ok(net) => addr.parse().ok().map(|addr| Self::Peer {
                network: (*net).to_owned(),
                addr,
            }),
            _ => None,
        }
    }

    pub fn render(&self) -> String {
        match self {
            Self::Node(n) => format!("{PREFIX}nodes/{n}"),
            Self::Network(n) => format!("{PREFIX}networks/{n}"),
            Self::Vni(v) => format!("{PREFIX}vni/{v}"),
            Self::Endpoint {
                network,
                node,
                endpoint,
            } => format!("{PREFIX}endpoints/{network}/{node}/{endpoint}"),
            Self::Ipam { network, addr } => format!("{PREFIX}ipam/{network}/{addr}"),
            Self::Peer { network, addr } => format!("{PREFIX}peers/{network}/{addr}"),
        }
    }
}

/// The prefix of a network's endpoints (all hosts).
pub fn endpoints_of(network_id: &str) -> String {
    format!("{PREFIX}endpoints/{network_id}/")
}

/// The prefix of a network's address claims.
pub fn ipam_of(network_id: &str) -> String {
    format!("{PREFIX}ipam/{network_id}/")
}

/// Whether `name` can name a node (it becomes a key segment).
pub fn valid_node(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_strangers_are_not_keys() {
        let keys = [
            Key::Node("h1".into()),
            Key::Network("ov".into()),
            Key::Vni(4097),
            Key::Endpoint {
                network: "abc".into(),
                node: "h2".into(),
                endpoint: "e1".into(),
            },
            Key::Ipam {
                network: "abc".into(),
                addr: "10.0.0.5".parse().unwrap(),
            },
            Key::Ipam {
                network: "abc".into(),
                addr: "fd00::5".parse().unwrap(),
            },
            Key::Peer {
                network: "abc".into(),
                addr: "192.0.2.7".parse().unwrap(),
            },
        ];
        for k in keys {
            assert_eq!(Key::parse(&k.render()), Some(k.clone()), "{k:?}");
        }
        for bad in [
            "/vswitch/v1/",
            "/vswitch/v1/nodes/",
            "/vswitch/v1/vni/x",
            "/vswitch/v1/endpoints/a/b",
            "/vswitch/v1/ipam/a/not-an-ip",
            "/other/nodes/h1",
            "/vswitch/v1/nodes/h1/extra",
        ] {
            assert_eq!(Key::parse(bad), None, "{bad}");
        }
        assert!(valid_node("host-1.example"));
        assert!(!valid_node("a/b") && !valid_node(""));
    }

    #[test]
    fn a_network_survives_its_record() {
        let rec = NetworkRecord {
            id: "n1".into(),
            name: "ov".into(),
            created: "now".into(),
            vni: 4097,
            subnet: "10.55.0.0/24".parse().unwrap(),
            gateway: "10.55.0.1".parse().unwrap(),
            ip_range: None,
            subnet6: None,
            gateway6: None,
            internal: false,
            mtu: 1450,
            port_security: PortSecurity::Strict,
        };
        let net = rec.network();
        assert_eq!(NetworkRecord::of(&net), Some(rec.clone()));
        let json = serde_json::to_string(&rec).unwrap();
        assert_eq!(serde_json::from_str::<NetworkRecord>(&json).unwrap(), rec);
    }
}
