//! The daemon's session with the store: connect, take a lease, register, publish this node's
//! endpoints, read everything, then follow the watch and keep the lease alive. Any failure
//! ends the session; the next one starts a second later and catches up by re-reading. What it
//! read is kept in the state directory ([`Cache`]) for a restart that finds etcd unreachable.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};

use super::cache::Cache;
use super::records::{Key, PREFIX};
use super::{CALL_TIMEOUT, Cluster, Session};
use crate::control::Daemon;

/// Follows the store for as long as the daemon runs; `cache` is where the last view is kept.
pub async fn run(daemon: Arc<Daemon>, cluster: Arc<Cluster>, cache: PathBuf) {
    let mut cache = Cache::load(cache);
    if cache.len() > 0 {
        // Until the store answers: the other hosts as they were when this daemon last saw
        // them (the first read replaces this).
        tracing::info!(
            entries = cache.len(),
            "other hosts restored from the last view of the cluster store"
        );
        daemon.cluster_sync(cache.entries(), false).await;
    }
    let mut said = false;
    loop {
        match session(&daemon, &cluster, &mut cache).await {
            Ok(()) => {}
            Err(e) if !said => {
                tracing::warn!(error = %format!("{e:#}"), "cluster store session ended; retrying every second");
                said = true;
            }
            Err(e) => tracing::debug!(error = %format!("{e:#}"), "cluster store still unreachable"),
        }
        cluster.set_session(None).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn within<T, E: Into<anyhow::Error>>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .with_context(|| format!("{what}: no answer"))?
        .map_err(Into::into)
        .with_context(|| what.to_owned())
}

async fn session(
    daemon: &Arc<Daemon>,
    cluster: &Arc<Cluster>,
    cache: &mut Cache,
) -> anyhow::Result<()> {
    let cfg = &cluster.config;
    let options = ConnectOptions::new()
        .with_connect_timeout(CALL_TIMEOUT)
        .with_timeout(CALL_TIMEOUT);
    let mut client = within("connect", Client::connect(&cfg.endpoints, Some(options))).await?;
    let lease = within("lease", client.lease_grant(cfg.ttl, None))
        .await?
        .id();
    // The lease is kept alive on a task of its own from now on: nothing this session waits
    // for (the control lock, a slow read) may let it lapse.
    let (mut keeper, mut alive) = within("keep-alive", client.lease_keep_alive(lease)).await?;
    let ttl = cfg.ttl;
    let mut keepalive = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs((ttl as u64 / 3).max(1)));
        loop {
            every.tick().await;
            within("keep-alive", keeper.keep_alive()).await?;
            match within("keep-alive", alive.message()).await? {
                Some(r) if r.ttl() > 0 => {}
                Some(_) => bail!("the lease expired"),
                None => bail!("the keep-alive stream ended"),
            }
        }
    });
    let result = follow(daemon, cluster, &mut client, lease, &mut keepalive, cache).await;
    keepalive.abort();
    cache.save();
    result
}

/// Registers this node, publishes its entries, reads everything and follows the watch.
async fn follow(
    daemon: &Arc<Daemon>,
    cluster: &Arc<Cluster>,
    client: &mut Client,
    lease: i64,
    keepalive: &mut tokio::task::JoinHandle<anyhow::Result<()>>,
    cache: &mut Cache,
) -> anyhow::Result<()> {
    let cfg = &cluster.config;
    // The node's name is its own: another host registered under it is an error, not a
    // takeover (cloned machines share host names).
    let key = Key::Node(cfg.node.clone()).render();
    let node = serde_json::to_vec(&cluster.node_record())?;
    let put = || {
        TxnOp::put(
            key.clone(),
            node.clone(),
            Some(PutOptions::new().with_lease(lease)),
        )
    };
    let fresh = Txn::new()
        .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
        .and_then([put()]);
    let again = Txn::new()
        .when([Compare::value(key.clone(), CompareOp::Equal, node.clone())])
        .and_then([put()]);
    if !within("register", client.txn(fresh)).await?.succeeded()
        && !within("register", client.txn(again)).await?.succeeded()
    {
        bail!(
            "node name {} is registered by another host (give this one --node-name)",
            cfg.node
        );
    }
    cluster
        .set_session(Some(Session {
            client: client.clone(),
            lease,
        }))
        .await;
    // This node's entries move to the new lease; whatever is left under the old one (an
    // endpoint whose withdrawal failed) goes with it.
    daemon
        .cluster_republish()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let old = cluster.old_lease.lock().await.replace(lease);
    if let Some(old) = old.filter(|o| *o != lease) {
        let _ = within("revoke", client.lease_revoke(old)).await;
    }
    let all = within(
        "read",
        client.get(PREFIX, Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let revision = all.header().map(|h| h.revision()).unwrap_or(0);
    let entries: Vec<(String, Vec<u8>)> = all
        .kvs()
        .iter()
        .filter_map(|kv| Some((kv.key_str().ok()?.to_owned(), kv.value().to_vec())))
        .collect();
    cache.replace(&entries);
    cache.save();
    daemon.cluster_sync(entries, true).await;
    tracing::info!(node = %cfg.node, revision, "joined the cluster store");
    let mut watch = within(
        "watch",
        client.watch(
            PREFIX,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        ),
    )
    .await?;
    let mut retry = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            ended = &mut *keepalive => {
                return match ended {
                    Ok(Err(e)) => Err(e),
                    _ => Err(anyhow::anyhow!("the keep-alive task ended")),
                };
            }
            _ = retry.tick() => {
                cache.save();
                if cluster.dirty.swap(false, std::sync::atomic::Ordering::Relaxed) {
                    daemon
                        .cluster_republish()
                        .await
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                }
            }
            msg = watch.message() => {
                let Some(resp) = msg? else { bail!("the watch ended") };
                if resp.canceled() {
                    bail!("the watch was cancelled: {}", resp.cancel_reason());
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let Ok(key) = kv.key_str() else { continue };
                    match ev.event_type() {
                        EventType::Put => {
                            cache.put(key, kv.value());
                            daemon.cluster_put(key, kv.value()).await;
                        }
                        EventType::Delete => {
                            cache.delete(key);
                            daemon.cluster_delete(key).await;
                        }
                    }
                }
            }
        }
    }
}
