//! The API's views of the state: `network inspect`, endpoints and containers, shaped as Docker
//! shows them.

use std::collections::BTreeMap;

use crate::api::{ContainerEntry, ContainerInfo, EndpointInfo, Ipam, IpamConfig, NetworkInspect};
use crate::plan::DEFAULT_NETWORK;
use crate::state::{Container, Endpoint, Network, Store};

/// The inspect option that lists a network's own upstream DNS servers.
pub const DNS_OPTION: &str = "com.vswitch.network.dns";
/// The inspect option that says what a network's ports may send from.
pub const PORT_SECURITY_OPTION: &str = "com.vswitch.network.port-security";

pub(super) fn inspect(store: &Store, net: &Network) -> NetworkInspect {
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
                    mac_address: e.mac.to_string(),
                    ipv4_address: net.cidr4(e.ipv4),
                    ipv6_address: net.cidr6(e.ipv6),
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
    options.insert(
        PORT_SECURITY_OPTION.to_owned(),
        net.port_security.as_str().to_owned(),
    );
    if !net.dns.is_empty() {
        let servers: Vec<String> = net.dns.iter().map(ToString::to_string).collect();
        options.insert(DNS_OPTION.to_owned(), servers.join(","));
    }
    if let Some(o) = &net.overlay {
        options.insert(
            "com.docker.network.driver.overlay.vxlanid_list".to_owned(),
            o.vni.to_string(),
        );
        if !o.peers.is_empty() {
            let peers: Vec<String> = o.peers.iter().map(ToString::to_string).collect();
            options.insert("vswitch.overlay.peers".to_owned(), peers.join(","));
        }
    }
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
        scope: if net.overlay.is_some() {
            "global"
        } else {
            "local"
        }
        .to_owned(),
        driver: if net.overlay.is_some() {
            "overlay"
        } else {
            "vswitch"
        }
        .to_owned(),
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

pub(super) fn endpoint_info(net: &Network, e: &Endpoint) -> EndpointInfo {
    EndpointInfo {
        id: e.id.clone(),
        endpoint_id: e.endpoint_id.clone(),
        name: e.name.clone(),
        network: net.name.clone(),
        network_id: net.id.clone(),
        target: e.target.clone(),
        ifname: e.ifname.clone(),
        mac_address: e.mac.to_string(),
        ipv4_address: net.cidr4(e.ipv4),
        ipv6_address: net.cidr6(e.ipv6),
        gateway: net.gateway.to_string(),
        ipv6_gateway: net.gateway6.map(|g| g.to_string()).unwrap_or_default(),
        aliases: e.aliases.clone(),
        ports: e.ports.clone(),
    }
}

pub(super) fn container_info(store: &Store, c: &Container) -> ContainerInfo {
    let eps = store.endpoints.values().filter(|e| e.name == c.name);
    let mut ips = Vec::new();
    let mut ports = Vec::new();
    for e in eps {
        ips.push(e.ipv4.to_string());
        ports.extend(e.ports.iter().map(ToString::to_string));
    }
    ContainerInfo {
        id: c.id.clone(),
        name: c.name.clone(),
        network: c.network.clone(),
        ips,
        ports,
        status: if c.pid.is_some() {
            "running".into()
        } else {
            "exited".into()
        },
        pid: c.pid,
        exit_code: c.exit_code,
        cmd: c.cmd.clone(),
        created: c.created.clone(),
    }
}
