//! Several hosts: overlay networks whose shared state lives in etcd v3 (`--cluster-store`).
//!
//! Each daemon registers itself under a lease (`--cluster-ttl`) and publishes its overlay
//! endpoints under that lease; it watches the store and feeds the other hosts' endpoints to its
//! tunnels (static FDB entries) and DNS. Overlay networks, their VNIs and their addresses are
//! claimed with transactions (create if absent), so two hosts never take the same one. When a
//! host stops renewing its lease, etcd deletes its keys and every other host forgets its
//! endpoints.
//!
//! etcd being unreachable stops nothing that runs: traffic between known endpoints flows on.
//! Changes to overlay networks fail with one line until it is back; then the daemon takes a new
//! lease, publishes its own entries again and re-reads the rest ([`sync::run`]).

mod cache;
pub mod records;
pub mod sync;

use std::net::IpAddr;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp};
use tokio::sync::Mutex;

use crate::error::{Error, ErrorKind, Result};
use records::{EndpointRecord, Key, NetworkRecord, NodeRecord};

/// `--cluster-store`, `--advertise-addr`, `--node-name`, `--cluster-ttl`.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `HOST:PORT` of etcd's client URLs.
    pub endpoints: Vec<String>,
    pub node: String,
    pub advertise: IpAddr,
    pub ttl: i64,
}

impl ClusterConfig {
    /// Parses `etcd://HOST:PORT[,HOST:PORT...]`.
    pub fn parse_store(url: &str) -> std::result::Result<Vec<String>, String> {
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| format!("the cluster store must be etcd://HOST:PORT, not {url:?}"))?;
        let endpoints: Vec<String> = rest
            .split(',')
            .map(|e| e.trim().trim_end_matches('/').to_owned())
            .collect();
        if endpoints
            .iter()
            .any(|e| e.is_empty() || !e.contains(':') || e.contains('/'))
        {
            return Err(format!(
                "invalid etcd endpoint list {rest:?}: expected HOST:PORT[,HOST:PORT]"
            ));
        }
        Ok(endpoints)
    }
}

/// How long one call to etcd may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// The connection, when there is one.
struct Session {
    client: Client,
    lease: i64,
}

/// The control plane's handle on the store.
pub struct Cluster {
    pub config: ClusterConfig,
    session: Mutex<Option<Session>>,
    /// The previous session's lease: revoked once this node's entries are under the new one,
    /// which takes whatever of them was left behind.
    old_lease: Mutex<Option<i64>>,
    /// An endpoint could not be published or withdrawn: publish everything again.
    pub(crate) dirty: std::sync::atomic::AtomicBool,
}

fn unreachable(e: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Unavailable,
        format!("the cluster store is unreachable ({e}); overlay networks cannot change now"),
    )
}

impl Cluster {
    pub fn new(config: ClusterConfig) -> Self {
        Self {
            config,
            session: Mutex::new(None),
            old_lease: Mutex::new(None),
            dirty: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The client and lease of the current session.
    async fn session(&self) -> Result<(Client, i64)> {
        match &*self.session.lock().await {
            Some(s) => Ok((s.client.clone(), s.lease)),
            None => Err(unreachable("not connected")),
        }
    }

    async fn set_session(&self, s: Option<Session>) {
        *self.session.lock().await = s;
    }

    async fn txn(&self, txn: Txn) -> Result<bool> {
        let (mut client, _) = self.session().await?;
        let r = tokio::time::timeout(CALL_TIMEOUT, client.txn(txn))
            .await
            .map_err(unreachable)?
            .map_err(unreachable)?;
        Ok(r.succeeded())
    }

    /// Claims `rec`'s name and VNI for it. `Ok(false)`: one of them is taken.
    pub async fn create_network(&self, rec: &NetworkRecord) -> Result<bool> {
        let value = serde_json::to_vec(rec).map_err(|e| Error::internal(e.to_string()))?;
        let net = Key::Network(rec.name.clone()).render();
        let vni = Key::Vni(rec.vni).render();
        self.txn(
            Txn::new()
                .when([
                    Compare::version(net.clone(), CompareOp::Equal, 0),
                    Compare::version(vni.clone(), CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::put(net, value, None),
                    TxnOp::put(vni, rec.id.clone(), None),
                ]),
        )
        .await
    }

    /// Which record holds a network name or a VNI, if any (to say which was taken).
    pub async fn network_exists(&self, name: &str) -> Result<bool> {
        let (mut client, _) = self.session().await?;
        let r = tokio::time::timeout(
            CALL_TIMEOUT,
            client.get(Key::Network(name.to_owned()).render(), None),
        )
        .await
        .map_err(unreachable)?
        .map_err(unreachable)?;
        Ok(!r.kvs().is_empty())
    }

    /// Removes a network everywhere, in one transaction that holds only if the stored network
    /// is this one and no host has endpoints on it. `Ok(Some(node))`: that node has one.
    pub async fn remove_network(&self, rec: &NetworkRecord) -> Result<Option<String>> {
        let (mut client, _) = self.session().await?;
        let net_key = Key::Network(rec.name.clone()).render();
        let current = tokio::time::timeout(CALL_TIMEOUT, client.get(net_key.clone(), None))
            .await
            .map_err(unreachable)?
            .map_err(unreachable)?;
        let Some(stored) = current.kvs().first().map(|kv| kv.value().to_vec()) else {
            return Ok(None);
        };
        if serde_json::from_slice::<NetworkRecord>(&stored)
            .ok()
            .map(|r| r.id)
            != Some(rec.id.clone())
        {
            // Another network of that name: not ours to remove.
            return Ok(None);
        }
        let removed = self
            .txn(
                Txn::new()
                    .when([
                        Compare::version(records::endpoints_of(&rec.id), CompareOp::Equal, 0)
                            .with_prefix(),
                        Compare::value(net_key.clone(), CompareOp::Equal, stored),
                    ])
                    .and_then([
                        TxnOp::delete(net_key, None),
                        TxnOp::delete(Key::Vni(rec.vni).render(), None),
                        TxnOp::delete(
                            records::ipam_of(&rec.id),
                            Some(DeleteOptions::new().with_prefix()),
                        ),
                    ]),
            )
            .await?;
        if removed {
            return Ok(None);
        }
        let eps = tokio::time::timeout(
            CALL_TIMEOUT,
            client.get(
                records::endpoints_of(&rec.id),
                Some(GetOptions::new().with_prefix().with_limit(1)),
            ),
        )
        .await
        .map_err(unreachable)?
        .map_err(unreachable)?;
        let node = eps
            .kvs()
            .first()
            .and_then(|kv| kv.key_str().ok().and_then(Key::parse))
            .map(|k| match k {
                Key::Endpoint { node, .. } => node,
                _ => String::new(),
            })
            .unwrap_or_else(|| "another host (changed meanwhile)".to_owned());
        Ok(Some(node))
    }

    /// Claims addresses on a network for `owner`, under this session's lease: each is created
    /// if absent, or moved to this lease if `owner` holds it already (after a reconnection).
    /// `Ok(false)`: one is another's, and none is claimed.
    pub async fn claim(&self, network: &str, addrs: &[IpAddr], owner: &str) -> Result<bool> {
        let (_, lease) = self.session().await?;
        let mut done: Vec<IpAddr> = Vec::new();
        for a in addrs {
            let key = Key::Ipam {
                network: network.to_owned(),
                addr: *a,
            }
            .render();
            let put = || {
                TxnOp::put(
                    key.clone(),
                    owner,
                    Some(PutOptions::new().with_lease(lease)),
                )
            };
            let mine = Txn::new()
                .when([Compare::value(key.clone(), CompareOp::Equal, owner)])
                .and_then([put()]);
            let free = Txn::new()
                .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
                .and_then([put()]);
            if self.txn(mine).await? || self.txn(free).await? {
                done.push(*a);
                continue;
            }
            self.release(network, &done, owner).await;
            return Ok(false);
        }
        Ok(true)
    }

    /// Gives back addresses `owner` holds (best effort: they go with the lease anyway; an
    /// address another holds is left alone).
    pub async fn release(&self, network: &str, addrs: &[IpAddr], owner: &str) {
        for a in addrs {
            let key = Key::Ipam {
                network: network.to_owned(),
                addr: *a,
            }
            .render();
            let _ = self
                .txn(
                    Txn::new()
                        .when([Compare::value(key.clone(), CompareOp::Equal, owner)])
                        .and_then([TxnOp::delete(key, None)]),
                )
                .await;
        }
    }

    /// Publishes one of this node's endpoints under its lease.
    pub async fn publish(&self, network: &str, endpoint: &str, rec: &EndpointRecord) -> Result<()> {
        let (mut client, lease) = self.session().await?;
        let key = Key::Endpoint {
            network: network.to_owned(),
            node: self.config.node.clone(),
            endpoint: endpoint.to_owned(),
        }
        .render();
        let value = serde_json::to_vec(rec).map_err(|e| Error::internal(e.to_string()))?;
        tokio::time::timeout(
            CALL_TIMEOUT,
            client.put(key, value, Some(PutOptions::new().with_lease(lease))),
        )
        .await
        .map_err(unreachable)?
        .map_err(unreachable)?;
        Ok(())
    }

    /// Withdraws one of this node's endpoints (best effort: it goes with the lease anyway, and
    /// the next publication of everything takes what is left).
    pub async fn withdraw(&self, network: &str, endpoint: &str) {
        let Ok((mut client, _)) = self.session().await else {
            self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
            return;
        };
        let key = Key::Endpoint {
            network: network.to_owned(),
            node: self.config.node.clone(),
            endpoint: endpoint.to_owned(),
        }
        .render();
        let _ = tokio::time::timeout(CALL_TIMEOUT, client.delete(key, None)).await;
    }

    /// Registers (or removes) an external VTEP of a network for every host.
    pub async fn set_peer(&self, network: &str, peer: IpAddr, add: bool) -> Result<()> {
        let (mut client, _) = self.session().await?;
        let key = Key::Peer {
            network: network.to_owned(),
            addr: peer,
        }
        .render();
        let call = async {
            if add {
                client.put(key, "", None).await.map(|_| ())
            } else {
                client.delete(key, None).await.map(|_| ())
            }
        };
        tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(unreachable)?
            .map_err(unreachable)
    }

    /// This node's record.
    fn node_record(&self) -> NodeRecord {
        NodeRecord {
            advertise: self.config.advertise,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls() {
        assert_eq!(
            ClusterConfig::parse_store("etcd://10.0.0.1:2379,10.0.0.2:2379").unwrap(),
            ["10.0.0.1:2379", "10.0.0.2:2379"]
        );
        for bad in [
            "http://x:1",
            "etcd://",
            "etcd://host",
            "etcd://a:1,",
            "etcd://a:1/x",
        ] {
            assert!(ClusterConfig::parse_store(bad).is_err(), "{bad}");
        }
    }
}
