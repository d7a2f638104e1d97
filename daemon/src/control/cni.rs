//! Attachments made by container engines through CNI (`vswitch` as a CNI plugin, see
//! `cli/src/cni.rs`): the engine owns them and names each by (container id, interface).
//!
//! - ADD attaches the engine's namespace like `attach` would, keyed. The same key again is an
//!   error while its namespace lives; when the namespace has gone (a container restarted
//!   before vswitch's own collection noticed) the stale attachment is replaced.
//! - DEL is idempotent: an unknown key, network or a namespace that has gone is success.
//! - CHECK answers what the attachment is, if it still is what was made.
//! - GC removes the network's attachments the engine no longer lists.
//!
//! Like any endpoint, an attachment is collected when its namespace goes away (the engine's
//! DEL then finds nothing, which is success) and survives a daemon restart.

use std::net::IpAddr;

use super::{Daemon, Inner, find_network, render};
use crate::api::{
    AttachRequest, CniAddRequest, CniAttachment, CniGcReply, CniGcRequest, CniKey, CniRequest,
    Target,
};
use crate::error::{Error, ErrorKind, Result};
use crate::netns::target::open_target;
use crate::state::{CniOwner, Endpoint, Store};

fn owner(key: &CniKey) -> CniOwner {
    CniOwner {
        container_id: key.container_id.clone(),
        ifname: key.ifname.clone(),
    }
}

/// The attachment `owner` made on network `network_id`.
fn owned<'a>(store: &'a Store, network_id: &str, owner: &CniOwner) -> Option<&'a Endpoint> {
    store
        .endpoints
        .values()
        .find(|e| e.network_id == network_id && e.cni.as_ref() == Some(owner))
}

/// Whether `ep`'s namespace is still the one it was attached to.
fn alive(ep: &Endpoint) -> bool {
    open_target(&ep.target).is_ok_and(|ns| ns.id() == ep.ns)
}

/// The static addresses of a CNI request (`runtimeConfig.ips`, `CNI_ARGS` `IP`): at most one
/// per family, with or without a prefix length.
fn static_ips(ips: &[String]) -> Result<(Option<String>, Option<String>)> {
    let (mut v4, mut v6) = (None, None);
    for s in ips {
        let addr = s.split_once('/').map_or(s.as_str(), |(a, _)| a);
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| Error::bad_request(format!("invalid IP address {s:?}")))?;
        let slot = if ip.is_ipv4() { &mut v4 } else { &mut v6 };
        if slot.replace(ip.to_string()).is_some() {
            return Err(Error::bad_request(format!(
                "more than one IPv{} address asked for",
                if ip.is_ipv4() { 4 } else { 6 }
            )));
        }
    }
    Ok((v4, v6))
}

impl Daemon {
    /// CNI ADD.
    pub async fn cni_add(&self, req: CniAddRequest) -> Result<CniAttachment> {
        if req.key.container_id.is_empty() {
            return Err(Error::bad_request("no container id"));
        }
        if !req.netns.starts_with('/') {
            return Err(Error::bad_request(format!(
                "the network namespace must be a path, not {:?}",
                req.netns
            )));
        }
        let (ipv4_address, ipv6_address) = static_ips(&req.ips)?;
        let mut inner = self.inner.lock().await;
        let net = find_network(&inner.store, &req.network)?;
        let (net_id, internal) = (net.id.clone(), net.internal);
        let owner = owner(&req.key);
        if let Some(old) = owned(&inner.store, &net_id, &owner).cloned() {
            let same_ns =
                open_target(&Target::Path(req.netns.clone())).is_ok_and(|ns| ns.id() == old.ns);
            if same_ns && alive(&old) {
                return Err(Error::conflict(format!(
                    "container {} already has {} on network {}",
                    req.key.container_id, req.key.ifname, req.network
                )));
            }
            tracing::info!(endpoint = %old.name, "replacing a CNI attachment whose namespace has gone");
            self.remove_owned(&mut inner, &old).await?;
        }
        let attach = AttachRequest {
            target: Target::Path(req.netns),
            name: Some(req.name),
            ipv4_address,
            ipv6_address,
            aliases: req.aliases,
            mac_address: req.mac,
            ifname: Some(req.key.ifname.clone()),
            ports: req.ports,
            force: false,
        };
        let endpoint = self
            .attach_owned(&mut inner, &net_id, attach, Some(owner))
            .await?;
        Ok(CniAttachment { endpoint, internal })
    }

    /// CNI DEL: success whether or not the attachment (or its network) is there.
    pub async fn cni_del(&self, req: CniRequest) -> Result<()> {
        let mut inner = self.inner.lock().await;
        let net_id = match find_network(&inner.store, &req.network) {
            Ok(n) => n.id.clone(),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        match owned(&inner.store, &net_id, &owner(&req.key)).cloned() {
            Some(ep) => self.remove_owned(&mut inner, &ep).await,
            None => Ok(()),
        }
    }

    /// CNI CHECK: the attachment as it is, if it is still attached to its namespace.
    pub async fn cni_check(&self, req: CniRequest) -> Result<CniAttachment> {
        let inner = self.inner.lock().await;
        let net = find_network(&inner.store, &req.network)?;
        let Some(ep) = owned(&inner.store, &net.id, &owner(&req.key)) else {
            return Err(Error::not_found(format!(
                "container {} has no {} on network {}",
                req.key.container_id, req.key.ifname, req.network
            )));
        };
        if !alive(ep) {
            return Err(Error::not_found(format!(
                "the namespace of container {} has gone",
                req.key.container_id
            )));
        }
        Ok(CniAttachment {
            endpoint: render::endpoint_info(net, ep),
            internal: net.internal,
        })
    }

    /// CNI GC: removes the network's attachments that are not in `valid`.
    pub async fn cni_gc(&self, req: CniGcRequest) -> Result<CniGcReply> {
        let mut inner = self.inner.lock().await;
        let net_id = match find_network(&inner.store, &req.network) {
            Ok(n) => n.id.clone(),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Ok(CniGcReply { removed: vec![] });
            }
            Err(e) => return Err(e),
        };
        let valid: Vec<CniOwner> = req.valid.iter().map(owner).collect();
        let stale: Vec<Endpoint> = inner
            .store
            .endpoints
            .values()
            .filter(|e| e.network_id == net_id)
            .filter(|e| e.cni.as_ref().is_some_and(|o| !valid.contains(o)))
            .cloned()
            .collect();
        let mut removed = Vec::new();
        for ep in &stale {
            self.remove_owned(&mut inner, ep).await?;
            if let Some(o) = &ep.cni {
                removed.push(CniKey {
                    container_id: o.container_id.clone(),
                    ifname: o.ifname.clone(),
                });
            }
        }
        Ok(CniGcReply { removed })
    }

    /// Detaches an engine's endpoint and saves the state.
    async fn remove_owned(&self, inner: &mut Inner, ep: &Endpoint) -> Result<()> {
        self.unplug(inner, ep).await;
        tracing::info!(endpoint = %ep.name, "CNI attachment removed");
        self.persist(&inner.store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_addresses_are_one_per_family_with_or_without_a_prefix() {
        let s = |v: &[&str]| static_ips(&v.iter().map(|x| x.to_string()).collect::<Vec<_>>());
        assert_eq!(
            s(&["10.1.0.5/24", "fd00::5"]).expect("ok"),
            (Some("10.1.0.5".into()), Some("fd00::5".into()))
        );
        assert_eq!(s(&[]).expect("ok"), (None, None));
        assert!(s(&["10.1.0.5", "10.1.0.6"]).is_err());
        assert!(s(&["ten"]).is_err());
    }
}
