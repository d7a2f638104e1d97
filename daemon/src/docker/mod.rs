//! vswitch as dockerd's network and IPAM driver (`vswitch daemon --docker-plugin`): Docker's
//! plugin protocol, HTTP POSTs of JSON on `DIR/NAME.sock`, which dockerd finds by name.
//!
//! The requests are carried out by the control plane (`control::docker`, `control::docker_ep`);
//! this module routes them, bounds them as the control socket does, turns errors into the
//! protocol's `{"Err": "..."}`, and fills in, in the background, what the protocol does not
//! say: the names dockerd knows networks and containers by (`engine`).

pub mod engine;
pub mod wire;

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::UnixListener;
use tokio::sync::Semaphore;

use crate::control::Daemon;
use crate::error::Error;
use crate::netns::target::open_target;
use engine::Engine;

/// `--docker-plugin`.
#[derive(Debug, Clone)]
pub struct PluginOptions {
    /// The driver's name (`docker network create -d NAME`).
    pub name: String,
    /// Where dockerd looks for plugin sockets (`/run/docker/plugins`).
    pub dir: PathBuf,
    /// dockerd's API, asked for network and container names.
    pub engine: String,
}

impl PluginOptions {
    pub fn socket(&self) -> PathBuf {
        self.dir.join(format!("{}.sock", self.name))
    }
}

const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1.2+json";
const MAX_CONNECTIONS: usize = 64;

/// Binds the plugin socket (root-only, as dockerd is root). The caller removes it at exit.
pub async fn bind(opts: &PluginOptions) -> anyhow::Result<UnixListener> {
    crate::server::bind_socket(&opts.socket(), 0o755).await
}

/// Serves the plugin protocol on `listener` until the daemon stops.
pub async fn serve(daemon: Arc<Daemon>, listener: UnixListener, opts: PluginOptions) {
    let engine = match Engine::new(&opts.engine) {
        Ok(e) => Some(Arc::new(e)),
        Err(e) => {
            tracing::warn!(error = %e, "Docker networks and containers keep provisional names");
            None
        }
    };
    // What a restart interrupted is looked up again.
    if let Some(engine) = &engine {
        for id in daemon.docker_unnamed().await {
            tokio::spawn(learn_network_name(daemon.clone(), engine.clone(), id));
        }
    }
    for (network_id, endpoint_id) in daemon.docker_unsettled().await {
        tokio::spawn(learn_endpoint(
            daemon.clone(),
            engine.clone(),
            network_id,
            endpoint_id,
        ));
    }
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "plugin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!("too many plugin connections; refusing one");
            continue;
        };
        let (daemon, engine) = (daemon.clone(), engine.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let (daemon, engine) = (daemon.clone(), engine.clone());
                async move { Ok::<_, Infallible>(route(&daemon, engine, req).await) }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .max_buf_size(64 << 10);
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "plugin connection ended with an error");
            }
            drop(permit);
        });
    }
}

type Reply = Response<Full<Bytes>>;

async fn route(daemon: &Arc<Daemon>, engine: Option<Arc<Engine>>, req: Request<Incoming>) -> Reply {
    let path = req.uri().path().to_owned();
    let result = dispatch(daemon, engine, &path, req).await;
    match result {
        Ok(v) => reply(StatusCode::OK, &v),
        Err(e) => {
            tracing::info!(call = %path, error = %e, "plugin call refused");
            let status = StatusCode::from_u16(e.kind().status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            reply(status, &serde_json::json!({ "Err": e.to_string() }))
        }
    }
}

fn reply<T: Serialize>(status: StatusCode, v: &T) -> Reply {
    let body = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, CONTENT_TYPE)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn json<T: Serialize>(v: T) -> Result<serde_json::Value, Error> {
    serde_json::to_value(v).map_err(|e| Error::internal(e.to_string()))
}

async fn dispatch(
    daemon: &Arc<Daemon>,
    engine: Option<Arc<Engine>>,
    path: &str,
    req: Request<Incoming>,
) -> Result<serde_json::Value, Error> {
    use serde_json::json;
    if req.method() != hyper::Method::POST {
        return Err(Error::bad_request("plugin calls are POSTs"));
    }
    // Plugin.Activate and the capability calls come without a body.
    let raw = crate::server::read_body(req).await?;
    let body: serde_json::Value = if raw.iter().all(u8::is_ascii_whitespace) {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&raw)
            .map_err(|e| Error::bad_request(format!("invalid {path} request: {e}")))?
    };
    macro_rules! body {
        () => {
            serde_json::from_value(body.clone())
                .map_err(|e| Error::bad_request(format!("invalid {path} request: {e}")))?
        };
    }
    match path {
        "/Plugin.Activate" => Ok(json!({"Implements": ["NetworkDriver", "IpamDriver"]})),
        "/NetworkDriver.GetCapabilities" => {
            Ok(json!({"Scope": "local", "ConnectivityScope": "local"}))
        }
        "/NetworkDriver.CreateNetwork" => {
            let req: wire::CreateNetwork = body!();
            let id = req.network_id.clone();
            if daemon.docker_create_network(req).await?
                && let Some(engine) = engine
            {
                tokio::spawn(learn_network_name(daemon.clone(), engine, id));
            }
            Ok(json!({}))
        }
        "/NetworkDriver.DeleteNetwork" => {
            let req: wire::NetworkRef = body!();
            daemon.docker_delete_network(&req.network_id).await?;
            Ok(json!({}))
        }
        "/NetworkDriver.CreateEndpoint" => {
            let req: wire::CreateEndpoint = body!();
            let iface = daemon.docker_create_endpoint(req).await?;
            Ok(json!({ "Interface": iface }))
        }
        "/NetworkDriver.EndpointOperInfo" => {
            let req: wire::EndpointRef = body!();
            Ok(json!({ "Value": daemon.docker_oper_info(&req.endpoint_id).await? }))
        }
        "/NetworkDriver.DeleteEndpoint" => {
            let req: wire::EndpointRef = body!();
            daemon.docker_delete_endpoint(&req.endpoint_id).await?;
            Ok(json!({}))
        }
        "/NetworkDriver.Join" => {
            let req: wire::Join = body!();
            let (net, ep) = (req.network_id.clone(), req.endpoint_id.clone());
            let joined = daemon.docker_join(req).await?;
            tokio::spawn(learn_endpoint(daemon.clone(), engine, net, ep));
            json(joined)
        }
        "/NetworkDriver.Leave" => {
            let req: wire::EndpointRef = body!();
            daemon.docker_leave(&req.endpoint_id).await?;
            Ok(json!({}))
        }
        "/NetworkDriver.ProgramExternalConnectivity" => {
            let req: wire::EndpointRef = body!();
            daemon.docker_program(req).await?;
            Ok(json!({}))
        }
        "/NetworkDriver.RevokeExternalConnectivity" => {
            let req: wire::EndpointRef = body!();
            daemon.docker_revoke(&req.endpoint_id).await?;
            Ok(json!({}))
        }
        "/NetworkDriver.DiscoverNew" | "/NetworkDriver.DiscoverDelete" => Ok(json!({})),
        "/IpamDriver.GetCapabilities" => {
            Ok(json!({"RequiresMACAddress": false, "RequiresRequestReplay": false}))
        }
        "/IpamDriver.GetDefaultAddressSpaces" => Ok(json!({
            "LocalDefaultAddressSpace": "vswitch-local",
            "GlobalDefaultAddressSpace": "vswitch-global"
        })),
        "/IpamDriver.RequestPool" => {
            let req: wire::RequestPool = body!();
            json(daemon.docker_request_pool(req).await?)
        }
        "/IpamDriver.ReleasePool" => {
            let req: wire::PoolRef = body!();
            daemon.docker_release_pool(&req.pool_id).await?;
            Ok(json!({}))
        }
        "/IpamDriver.RequestAddress" => {
            let req: wire::RequestAddress = body!();
            json(daemon.docker_request_address(req).await?)
        }
        "/IpamDriver.ReleaseAddress" => {
            let req: wire::ReleaseAddress = body!();
            daemon.docker_release_address(req).await?;
            Ok(json!({}))
        }
        _ => Err(Error::not_found(format!("unknown plugin call {path}"))),
    }
}

/// How long the background look-ups keep asking.
const LEARN_FOR: Duration = Duration::from_secs(30);
const LEARN_EVERY: Duration = Duration::from_millis(100);

/// Names Docker's new network as dockerd does, once dockerd lists it (right after
/// CreateNetwork returns).
async fn learn_network_name(daemon: Arc<Daemon>, engine: Arc<Engine>, id: String) {
    let deadline = tokio::time::Instant::now() + LEARN_FOR;
    while tokio::time::Instant::now() < deadline {
        match engine.network(&id).await {
            Ok(Some(view)) => {
                if let Err(e) = daemon.docker_name_network(&id, &view.name).await {
                    tracing::warn!(docker = %id, error = %e, "cannot name the Docker network");
                }
                return;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(docker = %id, error = %e, "cannot ask dockerd for the network's name");
                return;
            }
        }
        tokio::time::sleep(LEARN_EVERY).await;
    }
}

/// After a Join: the interface's name in the sandbox (once Docker has moved it there) and the
/// container's name (once dockerd lists the endpoint).
/// At most this many look-ups run at once; the others wait their turn.
static LEARNERS: Semaphore = Semaphore::const_new(32);

async fn learn_endpoint(
    daemon: Arc<Daemon>,
    engine: Option<Arc<Engine>>,
    network_id: String,
    endpoint_id: String,
) {
    let Ok(_turn) = LEARNERS.acquire().await else {
        return;
    };
    let Some((id, target, mac, made_as)) = daemon.docker_endpoint_sandbox(&endpoint_id).await
    else {
        return;
    };
    let deadline = tokio::time::Instant::now() + LEARN_FOR;
    let (mut inside, mut name) = (None, None);
    while tokio::time::Instant::now() < deadline && (inside.is_none() || name.is_none()) {
        if inside.is_none() {
            let (target, made_as) = (target.clone(), made_as.clone());
            // Docker moves the TAP in under the name it had, then renames it: only the new
            // name counts.
            inside = tokio::task::spawn_blocking(move || {
                let ns = open_target(&target).ok()?;
                let ifname = crate::netns::plumb::link_name_by_mac(&ns, mac).ok()??;
                (ifname != made_as).then(|| (ns.id(), ifname))
            })
            .await
            .ok()
            .flatten();
        }
        match (&engine, &name) {
            (Some(engine), None) => match engine.network(&network_id).await {
                Ok(Some(view)) => name = view.container_of(&endpoint_id).map(str::to_owned),
                Ok(None) => {}
                Err(_) => name = Some(String::new()),
            },
            (None, None) => name = Some(String::new()),
            _ => {}
        }
        if inside.is_none() || name.is_none() {
            tokio::time::sleep(LEARN_EVERY).await;
        }
    }
    let name = name.filter(|n| !n.is_empty());
    if let Err(e) = daemon.docker_learn_endpoint(&id, name, inside).await {
        tracing::warn!(endpoint = %endpoint_id, error = %e, "cannot record what Docker did with the endpoint");
    }
}
