//! The embedded DNS server's data: which names resolve to which addresses on which network.
//!
//! The daemon keeps one [`Records`] per network and updates it as endpoints attach and detach;
//! the responder that answers queries arriving as frames on the virtual network (and on host
//! sockets) reads from it. Names are case-insensitive and stored lower-case.

use std::collections::BTreeMap;
use std::net::IpAddr;

/// Names of one network.
#[derive(Debug, Default, Clone)]
pub struct Records {
    names: BTreeMap<String, Vec<(String, IpAddr)>>,
}

impl Records {
    /// Registers `name` for the endpoint `owner` with the given addresses. A name may be held
    /// by several endpoints at once (an alias shared by replicas); lookups return all of them.
    pub fn insert(&mut self, name: &str, owner: &str, addrs: &[IpAddr]) {
        let entry = self.names.entry(name.to_ascii_lowercase()).or_default();
        entry.retain(|(o, _)| o != owner);
        entry.extend(addrs.iter().map(|a| (owner.to_owned(), *a)));
    }

    /// Removes every name held by `owner`.
    pub fn remove_owner(&mut self, owner: &str) {
        self.names.retain(|_, v| {
            v.retain(|(o, _)| o != owner);
            !v.is_empty()
        });
    }

    /// All addresses registered under `name` (case-insensitive, a trailing dot ignored).
    pub fn lookup(&self, name: &str) -> Vec<IpAddr> {
        let key = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        self.names
            .get(&key)
            .map(|v| v.iter().map(|(_, a)| *a).collect())
            .unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_case_insensitive_shared_and_removed_by_owner() {
        let mut r = Records::default();
        let a: IpAddr = "172.18.0.2".parse().expect("ip");
        let b: IpAddr = "172.18.0.3".parse().expect("ip");
        r.insert("Tomcat81", "ep1", &[a]);
        r.insert("web", "ep1", &[a]);
        r.insert("web", "ep2", &[b]);
        assert_eq!(r.lookup("tomcat81."), vec![a]);
        assert_eq!(r.lookup("WEB"), vec![a, b]);
        r.remove_owner("ep1");
        assert!(r.lookup("tomcat81").is_empty());
        assert_eq!(r.lookup("web"), vec![b]);
        r.remove_owner("ep2");
        assert!(r.is_empty());
    }
}
