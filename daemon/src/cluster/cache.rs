//! The last view of the store, kept in the state directory (`cluster.json`): a daemon that
//! restarts while etcd is unreachable still knows the other hosts and their endpoints, so
//! traffic to them flows and their names resolve. The first read once etcd answers replaces
//! it. Only keys vswitch knows are kept, at most [`MAX_ENTRIES`] of them, and the file is
//! written at most once per tick of the session, not once per change.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::records::Key;

/// Most entries kept (the control plane accepts fewer remote endpoints than this).
const MAX_ENTRIES: usize = 65_536;
/// Largest file read back.
const MAX_FILE: u64 = 64 * 1024 * 1024;

pub struct Cache {
    path: PathBuf,
    entries: BTreeMap<String, String>,
    dirty: bool,
}

impl Cache {
    /// The view saved at `path`; empty if there is none or it cannot be read (said once).
    pub fn load(path: PathBuf) -> Self {
        let mut cache = Self {
            path,
            entries: BTreeMap::new(),
            dirty: false,
        };
        let raw = match std::fs::metadata(&cache.path) {
            Ok(m) if m.len() <= MAX_FILE => std::fs::read(&cache.path).unwrap_or_default(),
            Ok(_) => {
                tracing::warn!(path = %cache.path.display(), "ignoring an oversized copy of the cluster store");
                return cache;
            }
            Err(_) => return cache,
        };
        match serde_json::from_slice::<BTreeMap<String, String>>(&raw) {
            // Through `put`: what was written by hand or by another version is held to the
            // same keys and bounds.
            Ok(entries) => {
                for (k, v) in entries {
                    cache.put(&k, v.as_bytes());
                }
                cache.dirty = false;
            }
            Err(e) => {
                tracing::warn!(path = %cache.path.display(), error = %e, "ignoring an unreadable copy of the cluster store");
            }
        }
        cache
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn entries(&self) -> Vec<(String, Vec<u8>)> {
        self.entries
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
            .collect()
    }

    /// Everything the store holds now, in place of what was kept.
    pub fn replace(&mut self, entries: &[(String, Vec<u8>)]) {
        self.entries.clear();
        for (k, v) in entries {
            self.put(k, v);
        }
        self.dirty = true;
    }

    pub fn put(&mut self, key: &str, value: &[u8]) {
        // What a restart needs: the hosts, the networks, their endpoints and peers (address
        // claims and VNIs are the store's business alone).
        if !matches!(
            Key::parse(key),
            Some(Key::Node(_) | Key::Network(_) | Key::Endpoint { .. } | Key::Peer { .. })
        ) {
            return;
        }
        let Ok(value) = std::str::from_utf8(value) else {
            return;
        };
        if self.entries.len() >= MAX_ENTRIES && !self.entries.contains_key(key) {
            return;
        }
        self.entries.insert(key.to_owned(), value.to_owned());
        self.dirty = true;
    }

    pub fn delete(&mut self, key: &str) {
        self.dirty |= self.entries.remove(key).is_some();
    }

    /// Writes the file if anything changed since the last time (a new file, renamed over the
    /// old one, so a crash leaves one or the other whole).
    pub fn save(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        let tmp = self.path.with_extension("json.tmp");
        let write = serde_json::to_vec(&self.entries)
            .map_err(std::io::Error::other)
            .and_then(|raw| std::fs::write(&tmp, raw))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = write {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot keep a copy of the cluster store");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_view_survives_a_restart_and_keeps_only_known_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.json");
        let ep = "/vswitch/v1/endpoints/n1/h2/e1";
        let node = "/vswitch/v1/nodes/h2";
        let mut c = Cache::load(path.clone());
        assert_eq!(c.len(), 0);
        c.replace(&[
            (ep.into(), b"{\"a\":1}".to_vec()),
            (node.into(), b"{}".to_vec()),
            ("/somebody/else".into(), b"x".to_vec()),
            ("/vswitch/v1/ipam/n1/10.0.0.2".into(), b"{}".to_vec()),
        ]);
        c.put("/vswitch/v1/nodes/h3", b"{}");
        c.delete(node);
        c.save();
        let back = Cache::load(path.clone());
        let keys: Vec<String> = back.entries().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec![ep.to_owned(), "/vswitch/v1/nodes/h3".to_owned()]);
        // Keys written by something else are not taken back.
        std::fs::write(
            &path,
            br#"{"/vswitch/v1/vni/7":"x","/vswitch/v1/nodes/h4":"{}"}"#,
        )
        .unwrap();
        assert_eq!(Cache::load(path.clone()).len(), 1);
        // A damaged file is an empty view, not a failure.
        std::fs::write(&path, b"{not json").unwrap();
        assert_eq!(Cache::load(path).len(), 0);
    }
}
