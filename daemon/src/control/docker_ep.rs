//! dockerd's endpoints, through the plugin: CreateEndpoint, Join, Leave, DeleteEndpoint,
//! Program/RevokeExternalConnectivity and EndpointOperInfo.
//!
//! Docker creates an endpoint (its address and MAC) before the container's namespace exists,
//! and joins it afterwards. Join makes a TAP in the daemon's own namespace and plugs it in;
//! Docker then moves it into the container, names it `ethN` and sets its addresses and
//! gateway. The TAP's fd keeps working after the move. From then on the endpoint is like any
//! other: its target is the sandbox's namespace file, and a restart of vswitch plumbs it again
//! inside that namespace, under the name Docker gave it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use vswitch_netdev::ns::NsId;
use vswitch_switch::MacAddr;

use super::docker::{docker_network, provisional};
use super::docker_ipam::{MAX_PENDING, refresh_held};
use super::publish::bind_published;
use super::{Daemon, Inner, ids};
use crate::api::Target;
use crate::docker::wire::{self, Interface, InterfaceName, JoinReply, PortBinding};
use crate::error::{Error, Result};
use crate::netns::plumb;
use crate::plan;
use crate::state::Endpoint;

/// The namespace of a Docker endpoint that has joined before its sandbox exists.
pub(super) const UNKNOWN_NS: NsId = NsId { dev: 0, ino: 0 };

/// An endpoint Docker created and has not joined.
#[derive(Debug, Clone)]
pub(super) struct Pending {
    /// vswitch's network id.
    pub network_id: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Option<Ipv6Addr>,
    pub mac: MacAddr,
}

impl Pending {
    pub fn addrs(&self) -> impl Iterator<Item = IpAddr> + '_ {
        std::iter::once(IpAddr::V4(self.ipv4)).chain(self.ipv6.map(IpAddr::V6))
    }
}

/// The TAP's name in the daemon's namespace until Docker renames it.
fn tap_name(endpoint_id: &str) -> String {
    format!("vsd{}", &endpoint_id[..endpoint_id.len().min(11)])
}

fn docker_endpoint<'a>(inner: &'a Inner, endpoint_id: &str) -> Option<&'a Endpoint> {
    inner
        .store
        .endpoints
        .values()
        .find(|e| e.docker.as_deref() == Some(endpoint_id))
}

impl Daemon {
    /// NetworkDriver.CreateEndpoint. Returns the interface fields Docker did not set (the MAC).
    pub async fn docker_create_endpoint(&self, req: wire::CreateEndpoint) -> Result<Interface> {
        wire::check_id("endpoint", &req.endpoint_id).map_err(Error::bad_request)?;
        let iface = req.interface.unwrap_or_default();
        let mut inner = self.inner.lock().await;
        let net = docker_network(&inner.store, &req.network_id)?.clone();
        if inner.docker.pending.contains_key(&req.endpoint_id)
            || docker_endpoint(&inner, &req.endpoint_id).is_some()
        {
            return Err(Error::conflict(format!(
                "endpoint {} exists already",
                req.endpoint_id
            )));
        }
        let ipv4: Ipv4Addr = iface
            .address
            .split('/')
            .next()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| {
                Error::bad_request(format!(
                    "endpoint without an IPv4 address ({:?}): use --ipam-driver vswitch",
                    iface.address
                ))
            })?;
        if !crate::ipam::is_host4(net.subnet, ipv4) || ipv4 == net.gateway {
            return Err(Error::bad_request(format!(
                "{ipv4} is not an endpoint address of {}",
                net.subnet
            )));
        }
        let ipv6: Option<Ipv6Addr> = match iface.address_ipv6.split('/').next() {
            None | Some("") => None,
            Some(a) => Some(
                a.parse()
                    .map_err(|_| Error::bad_request(format!("invalid IPv6 address {a:?}")))?,
            ),
        };
        if let Some(ip6) = ipv6 {
            let Some(s6) = net.subnet6 else {
                return Err(Error::bad_request(format!(
                    "network {} has no IPv6 subnet",
                    net.name
                )));
            };
            if !crate::ipam::is_host6(s6, ip6) || Some(ip6) == net.gateway6 {
                return Err(Error::bad_request(format!(
                    "{ip6} is not an endpoint address of {s6}"
                )));
            }
        }
        let (mac, reply) = match iface.mac_address.as_str() {
            "" => {
                let mac = MacAddr::from_ipv4(ipv4);
                (
                    mac,
                    Interface {
                        mac_address: mac.to_string(),
                        ..Default::default()
                    },
                )
            }
            m => {
                let mac: MacAddr = m
                    .parse()
                    .map_err(|_| Error::bad_request(format!("invalid MAC address {m:?}")))?;
                if mac.is_multicast() || mac.is_zero() {
                    return Err(Error::bad_request(format!(
                        "MAC address {mac} is not a unicast address"
                    )));
                }
                (mac, Interface::default())
            }
        };
        // Nothing another endpoint of the network holds, made or pending: a container must not
        // take the gateway's or a neighbour's MAC or address.
        let taken_mac = mac == net.gateway_mac()
            || inner.store.endpoints_of(&net.id).any(|e| e.mac == mac)
            || inner
                .docker
                .pending
                .values()
                .any(|p| p.network_id == net.id && p.mac == mac);
        if taken_mac {
            return Err(Error::conflict(format!(
                "MAC address {mac} is already in use on network {}",
                net.name
            )));
        }
        let mine = Pending {
            network_id: net.id.clone(),
            ipv4,
            ipv6,
            mac,
        };
        let taken_addr = mine.addrs().find(|a| {
            inner
                .store
                .endpoints_of(&net.id)
                .any(|e| IpAddr::V4(e.ipv4) == *a || e.ipv6.map(IpAddr::V6) == Some(*a))
                || inner
                    .docker
                    .pending
                    .values()
                    .any(|p| p.network_id == net.id && p.addrs().any(|b| b == *a))
        });
        if let Some(a) = taken_addr {
            return Err(Error::conflict(format!(
                "address {a} is already in use on network {}",
                net.name
            )));
        }
        if inner.docker.pending.len() >= MAX_PENDING {
            return Err(Error::new(
                crate::error::ErrorKind::Unavailable,
                format!("{MAX_PENDING} Docker endpoints are created and not joined"),
            ));
        }
        // The ports are checked now, so that a bad mapping fails the create, not the start.
        for b in wire::port_bindings(&req.options).map_err(Error::bad_request)? {
            wire::publish_spec(&b).map_err(Error::bad_request)?;
        }
        inner.docker.pending.insert(req.endpoint_id, mine);
        refresh_held(&mut inner);
        Ok(reply)
    }

    /// NetworkDriver.Join: a TAP for Docker to move into the sandbox.
    pub async fn docker_join(&self, req: wire::Join) -> Result<JoinReply> {
        let mut inner = self.inner.lock().await;
        let inner = &mut *inner;
        let net = docker_network(&inner.store, &req.network_id)?.clone();
        let Some(p) = inner.docker.pending.get(&req.endpoint_id).cloned() else {
            return Err(Error::not_found(format!(
                "endpoint {} was not created (or is joined already)",
                req.endpoint_id
            )));
        };
        if p.network_id != net.id {
            return Err(Error::bad_request(format!(
                "endpoint {} is not on network {}",
                req.endpoint_id, req.network_id
            )));
        }
        check_sandbox_key(&req.sandbox_key)?;
        // dockerd makes the sandbox's namespace with the container, after Join: its file
        // does not exist yet. Docker moves the TAP in when it does.
        let target = Target::Path(req.sandbox_key.clone());
        let name = tap_name(&req.endpoint_id);
        let (tap, mac, mtu) = (name.clone(), p.mac.0, net.mtu);
        let fd = tokio::task::spawn_blocking(move || plumb::make_tap_here(&tap, mac, mtu))
            .await
            .map_err(|e| Error::internal(format!("plumbing task failed: {e}")))?
            .map_err(|e| Error::failed("cannot make the TAP", e))?;
        let ep = Endpoint {
            id: ids::random_id(),
            endpoint_id: req.endpoint_id.clone(),
            name: provisional("docker", &req.endpoint_id),
            network_id: net.id.clone(),
            target,
            ns: UNKNOWN_NS,
            ifname: "eth0".into(),
            mac: p.mac,
            ipv4: p.ipv4,
            ipv6: p.ipv6,
            aliases: Vec::new(),
            wrote_resolv_conf: false,
            ports: Vec::new(),
            // Docker sets the sandbox's one default route itself; this is the one a restart
            // of vswitch adds again (the next metric up if another network's holds it).
            route_metric: (!net.internal).then_some(100),
            cni: None,
            docker: Some(req.endpoint_id.clone()),
        };
        self.plug(inner, &net, &ep, fd).await?;
        inner.store.endpoints.insert(ep.id.clone(), ep.clone());
        if let Err(e) = self.persist(&inner.store) {
            self.unplug(inner, &ep).await;
            return Err(e);
        }
        inner.docker.pending.remove(&req.endpoint_id);
        refresh_held(inner);
        tracing::info!(endpoint = %req.endpoint_id, network = %net.name, ip = %ep.ipv4, "Docker endpoint joined");
        Ok(JoinReply {
            interface_name: InterfaceName {
                src_name: name,
                dst_prefix: "eth".into(),
            },
            gateway: if net.internal {
                String::new()
            } else {
                net.gateway.to_string()
            },
            gateway_ipv6: match (net.internal, net.gateway6) {
                (false, Some(g)) => g.to_string(),
                _ => String::new(),
            },
        })
    }

    /// NetworkDriver.Leave: the TAP goes (Docker has taken it out of the sandbox), the
    /// endpoint is pending again until DeleteEndpoint.
    pub async fn docker_leave(&self, endpoint_id: &str) -> Result<()> {
        let mut inner = self.inner.lock().await;
        let inner = &mut *inner;
        let Some(ep) = docker_endpoint(inner, endpoint_id).cloned() else {
            return Ok(());
        };
        self.unplug(inner, &ep).await;
        inner.docker.pending.insert(
            endpoint_id.to_owned(),
            Pending {
                network_id: ep.network_id.clone(),
                ipv4: ep.ipv4,
                ipv6: ep.ipv6,
                mac: ep.mac,
            },
        );
        refresh_held(inner);
        tracing::info!(endpoint = %ep.name, "Docker endpoint left");
        self.persist(&inner.store)
    }

    /// NetworkDriver.DeleteEndpoint: idempotent.
    pub async fn docker_delete_endpoint(&self, endpoint_id: &str) -> Result<()> {
        let mut inner = self.inner.lock().await;
        let inner = &mut *inner;
        inner.docker.pending.remove(endpoint_id);
        refresh_held(inner);
        if let Some(ep) = docker_endpoint(inner, endpoint_id).cloned() {
            self.unplug(inner, &ep).await;
            return self.persist(&inner.store);
        }
        Ok(())
    }

    /// NetworkDriver.ProgramExternalConnectivity: the container's published ports.
    pub async fn docker_program(&self, req: wire::EndpointRef) -> Result<()> {
        let specs = wire::port_bindings(&req.options)
            .map_err(Error::bad_request)?
            .iter()
            .map(wire::publish_spec)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(Error::bad_request)?;
        let mut inner = self.inner.lock().await;
        let inner = &mut *inner;
        let Some(ep) = docker_endpoint(inner, &req.endpoint_id).cloned() else {
            return Err(Error::not_found(format!(
                "endpoint {} is not joined",
                req.endpoint_id
            )));
        };
        let net = docker_network(&inner.store, &req.network_id)?.clone();
        if ep.network_id != net.id {
            return Err(Error::bad_request(format!(
                "endpoint {} is not on network {}",
                req.endpoint_id, req.network_id
            )));
        }
        if net.internal && !specs.is_empty() {
            return Err(Error::bad_request(format!(
                "network {} is internal: its containers cannot publish ports",
                net.name
            )));
        }
        let mut ports = plan::plan_ports(&net, &specs)?;
        if !ep.ports.is_empty() {
            // Programmed once per join; a repeat changes nothing.
            return Ok(());
        }
        let listeners = bind_published(&ports).await?;
        for (m, b) in ports.iter_mut().zip(&listeners) {
            m.host_port = b.port();
            m.host_port_end = None;
        }
        let mut ep = ep;
        ep.ports = ports;
        inner.store.endpoints.insert(ep.id.clone(), ep.clone());
        self.publish(inner, &net, &ep, listeners);
        self.refresh_policy_ports(&inner.store);
        self.persist(&inner.store)
    }

    /// NetworkDriver.RevokeExternalConnectivity.
    pub async fn docker_revoke(&self, endpoint_id: &str) -> Result<()> {
        let mut inner = self.inner.lock().await;
        let inner = &mut *inner;
        let Some(mut ep) = docker_endpoint(inner, endpoint_id).cloned() else {
            return Ok(());
        };
        self.unpublish(inner, &ep);
        ep.ports.clear();
        inner.store.endpoints.insert(ep.id.clone(), ep);
        self.refresh_policy_ports(&inner.store);
        self.persist(&inner.store)
    }

    fn unpublish(&self, inner: &mut Inner, ep: &Endpoint) {
        if let Some(live) = inner.live.get_mut(&ep.network_id) {
            for h in live.published.remove(&ep.id).into_iter().flatten() {
                h.abort();
            }
        }
    }

    /// NetworkDriver.EndpointOperInfo: the ports as bound (`docker port` shows them) and the MAC.
    pub async fn docker_oper_info(&self, endpoint_id: &str) -> Result<serde_json::Value> {
        let inner = self.inner.lock().await;
        let (ports, mac) = match docker_endpoint(&inner, endpoint_id) {
            Some(ep) => (ep.ports.clone(), ep.mac),
            None => match inner.docker.pending.get(endpoint_id) {
                Some(p) => (Vec::new(), p.mac),
                None => return Ok(serde_json::json!({})),
            },
        };
        let bindings: Vec<PortBinding> = ports
            .iter()
            .map(|m| PortBinding {
                proto: match m.proto {
                    vswitch_nat::Proto::Tcp => 6,
                    vswitch_nat::Proto::Udp => 17,
                },
                ip: String::new(),
                port: m.container_port,
                host_ip: m.host_ip.map(|i| i.to_string()).unwrap_or_default(),
                host_port: m.host_port,
                host_port_end: m.host_port,
            })
            .collect();
        Ok(serde_json::json!({
            wire::PORTMAP: bindings,
            wire::MAC: mac.to_string(),
        }))
    }

    /// What Docker's API and the sandbox tell about a joined endpoint once Docker has
    /// finished: its container's name (for vswitch's DNS), and the sandbox's namespace with
    /// the interface's name there (to plumb it again after a restart; from then on the
    /// endpoint goes when the sandbox does). `id` is vswitch's endpoint id, so that what was
    /// learnt of an earlier join of the same Docker endpoint is not applied to a later one.
    pub async fn docker_learn_endpoint(
        &self,
        id: &str,
        name: Option<String>,
        inside: Option<(NsId, String)>,
    ) -> Result<()> {
        let mut inner = self.inner.lock().await;
        let inner = &mut *inner;
        let Some(mut ep) = inner.store.endpoints.get(id).cloned() else {
            return Ok(());
        };
        let found = inside.is_some();
        if let Some((ns, ifname)) = inside {
            if ns == self.own_netns || self.host_netns.contains(&ns) {
                return Err(Error::forbidden(format!(
                    "the sandbox {} is the daemon's or the host's namespace",
                    ep.target
                )));
            }
            ep.ns = ns;
            ep.ifname = ifname;
        }
        if let Some(name) = name.filter(|n| plan::valid_name(n)) {
            let clash = inner
                .store
                .endpoints_of(&ep.network_id)
                .any(|e| e.name == name && e.id != ep.id);
            if clash {
                tracing::warn!(endpoint = %ep.endpoint_id, %name, "another endpoint has this container's name; keeping the provisional one");
            } else {
                ep.name = name;
            }
        }
        inner.store.endpoints.insert(ep.id.clone(), ep.clone());
        {
            let mut catalog = self.catalog.write();
            catalog.remove_endpoint(&ep.network_id, &ep.id);
            catalog.add_endpoint(&ep.network_id, &super::endpoints::records(&ep));
        }
        if found {
            self.watch_target(&ep);
        }
        tracing::info!(endpoint = %ep.name, ifname = %ep.ifname, "Docker endpoint settled");
        self.persist(&inner.store)
    }

    /// What the background look-up after a Join needs: vswitch's endpoint id, the sandbox,
    /// the MAC and the TAP's name as made (before Docker renames it).
    pub async fn docker_endpoint_sandbox(
        &self,
        endpoint_id: &str,
    ) -> Option<(String, Target, [u8; 6], String)> {
        let inner = self.inner.lock().await;
        docker_endpoint(&inner, endpoint_id).map(|e| {
            (
                e.id.clone(),
                e.target.clone(),
                e.mac.0,
                tap_name(endpoint_id),
            )
        })
    }

    /// Docker endpoints restored at start whose sandbox or name was never learnt (the daemon
    /// stopped first): (Docker network id, Docker endpoint id).
    pub async fn docker_unsettled(&self) -> Vec<(String, String)> {
        let inner = self.inner.lock().await;
        inner
            .store
            .endpoints
            .values()
            .filter(|e| e.ns == UNKNOWN_NS || e.name.starts_with("docker-"))
            .filter_map(|e| {
                let net = inner.store.networks.get(&e.network_id)?.docker.as_ref()?;
                Some((net.id.clone(), e.docker.clone()?))
            })
            .collect()
    }
}

/// Docker's sandbox keys are `<exec-root>/netns/<id>`: an absolute, plain path in a directory
/// called `netns`, outside /proc. Anything else is refused before it is opened.
fn check_sandbox_key(key: &str) -> Result<()> {
    use std::path::{Component, Path};
    let path = Path::new(key);
    let plain = path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    let in_netns = path
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|d| d == "netns");
    if !plain || !in_netns || key.starts_with("/proc/") || key.starts_with("/sys/") {
        return Err(Error::bad_request(format!(
            "invalid sandbox key {key:?}: expected Docker's <exec-root>/netns/<id>"
        )));
    }
    Ok(())
}
