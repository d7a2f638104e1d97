//! The files vswitch writes for namespaces: `/etc/netns/NAME/resolv.conf` for `ip netns`
//! namespaces (which `ip netns exec` binds over /etc/resolv.conf), and the resolv.conf and
//! hosts files that `vswitch run` binds into a container.
//!
//! A resolv.conf vswitch writes starts with [`RESOLV_CONF_HEADER`]; one without it is somebody
//! else's and is never replaced or removed.

use std::path::{Path, PathBuf};

use crate::api::Target;
use crate::error::{Error, Result};
use crate::state::{Endpoint, Network, Store};

/// First line of every `/etc/netns` resolv.conf vswitch writes.
pub const RESOLV_CONF_HEADER: &str = "# written by vswitch";

/// Where `ip netns exec NAME` finds the namespace's resolv.conf.
fn netns_resolv_conf(netns: &str) -> PathBuf {
    PathBuf::from("/etc/netns").join(netns).join("resolv.conf")
}

/// What a namespace on `net` resolves with: the gateway as nameserver.
pub fn resolv_conf_text(net: &Network) -> String {
    let mut text = format!("nameserver {}\n", net.gateway);
    if net.dns_names {
        text.push_str(&format!("search {}\n", net.name));
    }
    text.push_str("options ndots:0\n");
    text
}

fn ours(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|t| t.starts_with(RESOLV_CONF_HEADER))
}

/// Writes `/etc/netns/NAME/resolv.conf` for network `net`. Returns false, writing nothing, if
/// the file is there and not ours.
pub fn write_netns_resolv_conf(netns: &str, net: &Network) -> std::io::Result<bool> {
    let path = netns_resolv_conf(netns);
    if path.exists() && !ours(&path) {
        tracing::info!(path = %path.display(), "keeping a resolv.conf vswitch did not write");
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text = format!(
        "{RESOLV_CONF_HEADER} for network {}\n{}",
        net.name,
        resolv_conf_text(net)
    );
    let tmp = path.with_extension("vswitch-tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &path)?;
    Ok(true)
}

/// Gives a newly attached endpoint its namespace's resolv.conf, if it is the `ip netns`
/// namespace's first endpoint that writes one. Returns whether it wrote it.
pub fn claim_resolv_conf(store: &Store, ep: &Endpoint, net: &Network) -> bool {
    let Target::Name(name) = &ep.target else {
        return false;
    };
    if store
        .endpoints
        .values()
        .any(|o| o.ns == ep.ns && o.wrote_resolv_conf)
    {
        return false;
    }
    match write_netns_resolv_conf(name, net) {
        Ok(written) => written,
        Err(e) => {
            tracing::warn!(netns = %name, error = %e, "cannot write resolv.conf");
            false
        }
    }
}

/// Endpoint `ep`, already out of the store, no longer holds its namespace's resolv.conf: it
/// goes to another endpoint of that namespace, rewritten for that one's network (the
/// namespace still needs a nameserver), or, with none left, it is removed.
pub fn release_resolv_conf(store: &mut Store, ep: &Endpoint) {
    let (true, Target::Name(name)) = (ep.wrote_resolv_conf, &ep.target) else {
        return;
    };
    let heir = store
        .endpoints
        .values_mut()
        .find(|o| o.ns == ep.ns && o.target == ep.target);
    if let Some(heir) = heir
        && let Some(net) = store.networks.get(&heir.network_id)
    {
        match write_netns_resolv_conf(name, net) {
            Ok(written) => heir.wrote_resolv_conf = written,
            Err(e) => tracing::warn!(netns = %name, error = %e, "cannot rewrite resolv.conf"),
        }
        return;
    }
    let path = netns_resolv_conf(name);
    if !ours(&path) {
        return;
    }
    let _ = std::fs::remove_file(&path);
    if let Some(dir) = path.parent() {
        // Only succeeds if nothing else lives there.
        let _ = std::fs::remove_dir(dir);
    }
}

/// A container's /etc/hosts: localhost, and its hostname and name on its address (127.0.1.1
/// until it has one).
pub fn write_hosts(path: &Path, ip: Option<&str>, hostname: &str, name: &str) -> Result<()> {
    let mut t = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    let names = if hostname == name {
        name.to_owned()
    } else {
        format!("{hostname} {name}")
    };
    match ip {
        Some(ip) => t.push_str(&format!("{ip}\t{names}\n")),
        None => t.push_str(&format!("127.0.1.1\t{names}\n")),
    }
    std::fs::write(path, t)
        .map_err(|e| Error::failed(&format!("cannot write {}", path.display()), e))
}
