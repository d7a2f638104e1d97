//! The files vswitch writes for namespaces: `/etc/netns/NAME/resolv.conf` for `ip netns`
//! namespaces (which `ip netns exec` binds over /etc/resolv.conf), and the resolv.conf and
//! hosts files that `vswitch run` binds into a container.
//!
//! A resolv.conf vswitch writes starts with [`RESOLV_CONF_HEADER`]; one without it is somebody
//! else's and is never replaced or removed.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use vswitch_dns::responder::HOST_NAMES;

use crate::api::Target;
use crate::error::{Error, Result};
use crate::state::{Endpoint, Network, Store};

/// First line of every `/etc/netns` resolv.conf vswitch writes.
pub const RESOLV_CONF_HEADER: &str = "# written by vswitch";

/// Where `ip netns exec NAME` finds the namespace's resolv.conf.
fn netns_resolv_conf(netns: &str) -> PathBuf {
    PathBuf::from("/etc/netns").join(netns).join("resolv.conf")
}

/// What a namespace on `net` resolves with: the gateway as nameserver. No `search` line: the
/// gateway answers bare container names itself (as Docker's resolver does), and a search
/// domain would send every unknown short name upstream as `<name>.<network>`.
pub fn resolv_conf_text(net: &Network) -> String {
    format!("nameserver {}\noptions ndots:0\n", net.gateway)
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
    let text = netns_resolv_conf_text(net);
    let tmp = path.with_extension("vswitch-tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &path)?;
    Ok(true)
}

/// The text of an `ip netns` namespace's resolv.conf for `net`: ours, marked as such.
fn netns_resolv_conf_text(net: &Network) -> String {
    format!(
        "{RESOLV_CONF_HEADER} for network {}\n{}",
        net.name,
        resolv_conf_text(net)
    )
}

/// What versions before 2026-12 wrote into a resolv.conf for `net`: a `search` line on
/// networks with names.
fn old_resolv_conf_text(net: &Network) -> Option<String> {
    net.dns_names.then(|| {
        format!(
            "nameserver {}\nsearch {}\noptions ndots:0\n",
            net.gateway, net.name
        )
    })
}

/// After a restart: the resolv.conf of `ip netns` namespace `netns`, if an earlier version
/// wrote it for `net` (with a `search` line), is rewritten as this one writes it.
fn refresh_netns_resolv_conf(netns: &str, net: &Network) {
    if let Some(old) = old_resolv_conf_text(net) {
        let old = format!("{RESOLV_CONF_HEADER} for network {}\n{old}", net.name);
        rewrite_if(
            &netns_resolv_conf(netns),
            &old,
            &netns_resolv_conf_text(net),
        );
    }
}

/// After a restart: a running container's resolv.conf, if an earlier version wrote it for
/// `net`, is rewritten as this one writes it.
pub fn refresh_container_resolv_conf(path: &Path, net: &Network) {
    if let Some(old) = old_resolv_conf_text(net) {
        rewrite_if(path, &old, &resolv_conf_text(net));
    }
}

/// Whether a newly attached endpoint is to write its namespace's resolv.conf: it is the first
/// endpoint of an `ip netns` namespace to do so, and the file there is absent or ours. Nothing
/// is written yet: the endpoint is stored first, then [`write_claimed_resolv_conf`] writes, so
/// that a daemon killed in between leaves no file the state does not know of.
pub fn may_claim_resolv_conf(store: &Store, ep: &Endpoint) -> bool {
    let Target::Name(name) = &ep.target else {
        return false;
    };
    let path = netns_resolv_conf(name);
    !store
        .endpoints
        .values()
        .any(|o| o.ns == ep.ns && o.wrote_resolv_conf)
        && (!path.exists() || ours(&path))
}

/// Writes the resolv.conf that stored endpoint `ep` claimed. Returns whether the file is ours.
pub fn write_claimed_resolv_conf(ep: &Endpoint, net: &Network) -> bool {
    let (true, Target::Name(name)) = (ep.wrote_resolv_conf, &ep.target) else {
        return false;
    };
    match write_netns_resolv_conf(name, net) {
        Ok(written) => written,
        Err(e) => {
            tracing::warn!(netns = %name, error = %e, "cannot write resolv.conf");
            false
        }
    }
}

/// After a restart: the resolv.conf that stored endpoint `ep` holds is there (a daemon killed
/// between storing the endpoint and writing the file did not write it), and in this version's
/// words.
pub fn restore_netns_resolv_conf(ep: &Endpoint, net: &Network) {
    let (true, Target::Name(name)) = (ep.wrote_resolv_conf, &ep.target) else {
        return;
    };
    if netns_resolv_conf(name).exists() {
        refresh_netns_resolv_conf(name, net);
    } else {
        write_claimed_resolv_conf(ep, net);
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

/// What a container's /etc/hosts says.
#[derive(Debug, Clone, Copy)]
pub struct Hosts<'a> {
    pub hostname: &'a str,
    pub name: &'a str,
    /// The container's address (127.0.1.1 until it has one).
    pub ip: Option<Ipv4Addr>,
    /// The gateway's addresses, if its network has a way out: `host.containers.internal` and
    /// `host.docker.internal`, as podman writes them.
    pub host_gateways: &'a [IpAddr],
}

/// The text of a container's /etc/hosts: localhost, its hostname and name on its address, and
/// the names of its host.
pub fn hosts_text(h: &Hosts<'_>) -> String {
    let mut t = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    let names = if h.hostname == h.name {
        h.name.to_owned()
    } else {
        format!("{} {}", h.hostname, h.name)
    };
    let ip = h.ip.unwrap_or(Ipv4Addr::new(127, 0, 1, 1));
    t.push_str(&format!("{ip}\t{names}\n"));
    for gw in h.host_gateways {
        t.push_str(&format!("{gw}\t{}\n", HOST_NAMES.join(" ")));
    }
    t
}

/// Writes a container's /etc/hosts in place (it may be bound into the container already).
pub fn write_hosts(path: &Path, h: &Hosts<'_>) -> Result<()> {
    std::fs::write(path, hosts_text(h))
        .map_err(|e| Error::failed(&format!("cannot write {}", path.display()), e))
}

/// Replaces the text of the file at `path` with `new` if it is exactly `old` (so a file
/// somebody edited is left alone), in place: processes that have it bound over
/// /etc/resolv.conf (`ip netns exec`, a running container) see the new text. The new text is
/// written over the old from the start and the file cut after it, so a reader never finds
/// it empty (`new` is never longer here); a symlink is not followed.
fn rewrite_if(path: &Path, old: &str, new: &str) {
    use std::io::{Seek, Write};
    use std::os::unix::fs::OpenOptionsExt;
    if std::fs::read_to_string(path).ok().as_deref() != Some(old) {
        return;
    }
    let done = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .and_then(|mut f| {
            f.seek(std::io::SeekFrom::Start(0))?;
            f.write_all(new.as_bytes())?;
            f.set_len(new.len() as u64)
        });
    match done {
        Ok(()) => {
            tracing::info!(path = %path.display(), "resolv.conf rewritten without its search line")
        }
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot rewrite resolv.conf"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_name_the_container_and_its_host() {
        let mut h = Hosts {
            hostname: "web",
            name: "web",
            ip: None,
            host_gateways: &[],
        };
        assert!(hosts_text(&h).contains("127.0.1.1\tweb\n"));
        assert!(!hosts_text(&h).contains("host."));
        h.ip = Some(Ipv4Addr::new(10, 0, 0, 2));
        h.hostname = "box";
        let gateways = [
            "10.0.0.1".parse().expect("ip"),
            "fd00::1".parse().expect("ip"),
        ];
        h.host_gateways = &gateways;
        let t = hosts_text(&h);
        assert!(t.contains("10.0.0.2\tbox web\n"), "{t}");
        assert!(
            t.contains("10.0.0.1\thost.containers.internal host.docker.internal\n"),
            "{t}"
        );
        assert!(
            t.contains("fd00::1\thost.containers.internal host.docker.internal\n"),
            "{t}"
        );
    }

    #[test]
    fn only_the_old_text_is_rewritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut net = crate::plan::default_bridge("b".repeat(64), String::new());
        net.name = "dev".into();
        net.dns_names = true;
        let path = dir.path().join("resolv.conf");
        let old = "nameserver 172.17.0.1\nsearch dev\noptions ndots:0\n";
        std::fs::write(&path, old).expect("write");
        refresh_container_resolv_conf(&path, &net);
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "nameserver 172.17.0.1\noptions ndots:0\n"
        );
        // Edited by somebody: left alone.
        let edited = "nameserver 172.17.0.1\nsearch dev corp.example\noptions ndots:0\n";
        std::fs::write(&path, edited).expect("write");
        refresh_container_resolv_conf(&path, &net);
        assert_eq!(std::fs::read_to_string(&path).expect("read"), edited);
        // A symlink is not followed.
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, old).expect("write");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        refresh_container_resolv_conf(&link, &net);
        assert_eq!(std::fs::read_to_string(&target).expect("read"), old);
    }

    #[test]
    fn resolv_conf_names_the_gateway_and_no_search_domain() {
        let net = crate::plan::default_bridge("b".repeat(64), String::new());
        let text = resolv_conf_text(&net);
        assert_eq!(text, "nameserver 172.17.0.1\noptions ndots:0\n");
        assert!(!text.contains("search"));
    }
}
