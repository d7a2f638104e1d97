//! The daemon's session with the store: connect, take a lease, register, publish this node's
//! endpoints, read everything, then follow the watch and keep the lease alive. Any failure
//! ends the session; the next one starts a second later and catches up by re-reading.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};

use super::records::{Key, PREFIX};
use super::{CALL_TIMEOUT, Cluster, Session};
use crate::control::Daemon;

/// Follows the store for as long as the daemon runs.
pub async fn run(daemon: Arc<Daemon>, cluster: Arc<Cluster>) {
    let mut said = false;
    loop {
        match session(&daemon, &cluster).await {
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

async fn session(daemon: &Arc<Daemon>, cluster: &Arc<Cluster>) -> anyhow::Result<()> {
    let cfg = &cluster.config;
    let options = ConnectOptions::new()
        .with_connect_timeout(CALL_TIMEOUT)
        .with_timeout(CALL_TIMEOUT);
    let mut client = within("connect", Client::connect(&cfg.endpoints, Some(options))).await?;
    let lease = within("lease", client.lease_grant(cfg.ttl, None))
        .await?
        .id();
    let node = serde_json::to_vec(&cluster.node_record())?;
    within(
        "register",
        client.put(
            Key::Node(cfg.node.clone()).render(),
            node,
            Some(PutOptions::new().with_lease(lease)),
        ),
    )
    .await?;
    let (mut keeper, mut alive) = within("keep-alive", client.lease_keep_alive(lease)).await?;
    cluster
        .set_session(Some(Session {
            client: client.clone(),
            lease,
        }))
        .await;
    // A new lease: what this node had published under an old one may be gone.
    daemon.cluster_republish().await;
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
    daemon.cluster_sync(entries).await;
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
    let mut every = tokio::time::interval(Duration::from_secs((cfg.ttl as u64 / 3).max(1)));
    loop {
        tokio::select! {
            _ = every.tick() => within("keep-alive", keeper.keep_alive()).await?,
            msg = alive.message() => match msg? {
                Some(r) if r.ttl() > 0 => {}
                Some(_) => bail!("the lease expired"),
                None => bail!("the keep-alive stream ended"),
            },
            msg = watch.message() => {
                let Some(resp) = msg? else { bail!("the watch ended") };
                if resp.canceled() {
                    bail!("the watch was cancelled: {}", resp.cancel_reason());
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let Ok(key) = kv.key_str() else { continue };
                    match ev.event_type() {
                        EventType::Put => daemon.cluster_put(key, kv.value()).await,
                        EventType::Delete => daemon.cluster_delete(key).await,
                    }
                }
            }
        }
    }
}
