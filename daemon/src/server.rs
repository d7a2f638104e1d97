//! The control socket: HTTP/1.1 on a Unix socket, one task per connection.
//!
//! Requests are bounded (64 KiB of headers, 1 MiB of body, 10 s to send the headers and 5 s
//! for the body, at most [`MAX_CONNECTIONS`] at once, a 503 beyond), so a client that sends
//! garbage, sends too much, sends nothing or stops halfway costs a connection for a while,
//! never the daemon.

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use nix::fcntl::{Flock, FlockArg};
use serde::Serialize;
use tokio::net::UnixListener;
use tokio::sync::Semaphore;

use crate::api::{
    AttachRequest, CniAddRequest, CniGcRequest, CniRequest, DisconnectRequest, ErrorBody,
    NetworkCreate, RunRequest,
};
use crate::control::{Daemon, RuntimeOptions};
use crate::error::{Error, ErrorKind};

const MAX_BODY: usize = 1 << 20;
const MAX_HEADERS: usize = 64 << 10;
const MAX_CONNECTIONS: usize = 256;

pub struct Options {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub dns: RuntimeOptions,
    /// `--dns-listen`: serve `<name>.<network>` to the host on this address.
    pub dns_listen: Option<std::net::SocketAddr>,
    /// `--docker-plugin`: serve dockerd as its network and IPAM driver.
    pub docker_plugin: Option<crate::docker::PluginOptions>,
    /// `--metrics-addr`: serve `GET /metrics` over TCP on this address too.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// How long a starting daemon waits for the previous one to let go of the state directory:
/// a daemon killed with SIGKILL holds its lock until the kernel has closed all its files.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Takes the state directory's lock, waiting up to [`LOCK_WAIT`] for a dying daemon.
async fn lock_state_dir(dir: &std::path::Path) -> anyhow::Result<Flock<std::fs::File>> {
    let path = dir.join("lock");
    let deadline = tokio::time::Instant::now() + LOCK_WAIT;
    let mut said = false;
    loop {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) if tokio::time::Instant::now() < deadline => {
                if !said {
                    tracing::info!(state = %dir.display(), "waiting for the previous daemon to let go of the state directory");
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err((_, e)) => anyhow::bail!(
                "state directory {} is in use by another vswitch daemon ({e})",
                dir.display()
            ),
        }
    }
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn serve(opts: Options) -> anyhow::Result<()> {
    // Flows' socket buffers are freed back to the kernel, not kept by the allocator.
    if let Err(e) = vswitch_netdev::return_large_blocks_to_the_kernel() {
        tracing::warn!(error = %e, "freed TCP buffers may stay with the daemon");
    }
    // And what flows leave on the heap goes back too, every few seconds.
    tokio::spawn(async {
        let mut every = tokio::time::interval(Duration::from_secs(10));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let _ = tokio::task::spawn_blocking(vswitch_netdev::release_free_memory).await;
        }
    });
    crate::state::create_private_dir(&opts.state_dir)?;
    let _lock = lock_state_dir(&opts.state_dir).await?;

    let listener = bind(&opts.socket).await?;
    // Ours from here: removed however this function ends (a failed start included, which
    // would otherwise leave a socket nobody answers).
    let _socket_file = RemoveOnDrop(opts.socket.clone());
    let host_dns = match opts.dns_listen {
        Some(addr) => Some(
            vswitch_dns::server::HostListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for DNS on {addr}"))?,
        ),
        None => None,
    };
    let metrics_listener = match opts.metrics_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for metrics on {addr}"))?,
        ),
        None => None,
    };
    let (daemon, mut events) = Daemon::start(&opts.state_dir, &opts.dns).await?;
    if let Some(cluster) = daemon.cluster() {
        let cache = opts.state_dir.join("cluster.json");
        tokio::spawn(crate::cluster::sync::run(daemon.clone(), cluster, cache));
    }
    let mut _plugin_file = None;
    if let Some(plugin) = &opts.docker_plugin {
        let listener = crate::docker::bind(plugin).await?;
        _plugin_file = Some(RemoveOnDrop(plugin.socket()));
        tracing::info!(socket = %plugin.socket().display(), "serving dockerd as network driver {}", plugin.name);
        tokio::spawn(crate::docker::serve(
            daemon.clone(),
            listener,
            plugin.clone(),
        ));
    }
    if let Some(l) = metrics_listener {
        tracing::info!(addr = %l.local_addr()?, "serving metrics");
        tokio::spawn(crate::metrics::http::serve(daemon.clone(), l));
    }
    if let Some(l) = host_dns {
        tracing::info!(addr = %l.local_addr()?, "serving container names to the host");
        tokio::spawn(l.run(daemon.responder()));
    }
    tracing::info!(socket = %opts.socket.display(), state = %opts.state_dir.display(), "vswitch daemon ready");

    let event_daemon = daemon.clone();
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            event_daemon.handle_event(ev).await;
        }
    });

    use tokio::signal::unix::{SignalKind, signal};
    // Created once, before the loop: a signal between two passes is not lost.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    tracing::warn!("too many control connections; refusing one");
                    // Said in one line, so that the client does not just see a closed socket.
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut stream = stream;
                        // Take the request's head first (an HTTP client may not accept an
                        // answer before it has sent its request), answer, then drain what
                        // else comes before closing: closing with data unread resets the
                        // connection, and the client could lose the answer. All briefly.
                        let _ = tokio::time::timeout(Duration::from_secs(2), async {
                            let mut head = Vec::new();
                            let mut buf = [0u8; 4096];
                            while !head.windows(4).any(|w| w == b"\r\n\r\n")
                                && head.len() < MAX_HEADERS
                            {
                                let n = stream.read(&mut buf).await?;
                                if n == 0 {
                                    break;
                                }
                                head.extend_from_slice(&buf[..n]);
                            }
                            stream.write_all(BUSY_REPLY.as_bytes()).await?;
                            stream.shutdown().await?;
                            while stream.read(&mut buf).await? > 0 {}
                            Ok::<_, std::io::Error>(())
                        })
                        .await;
                    });
                    continue;
                };
                let daemon = daemon.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let daemon = daemon.clone();
                        async move { Ok::<_, Infallible>(route(&daemon, req).await) }
                    });
                    let mut builder = http1::Builder::new();
                    builder
                        .timer(TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(10))
                        // A client that shuts down its write side after the request (as
                        // `nc -N` or a script might) still gets its answer.
                        .half_close(true)
                        .max_buf_size(MAX_HEADERS);
                    if let Err(e) = builder.serve_connection(TokioIo::new(stream), service).await {
                        tracing::debug!(error = %e, "control connection ended with an error");
                    }
                    drop(permit);
                });
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => break,
        }
    }
    tracing::info!("shutting down");
    daemon.shutdown().await;
    Ok(())
}

/// What a client over the connection limit gets before its connection is closed.
const BUSY_REPLY: &str = "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
    content-length: 57\r\nconnection: close\r\n\r\n\
    {\"Message\":\"the daemon has too many control connections\"}";

/// Removes a file when dropped.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds the control socket, owner-only. A socket file nobody listens on (left by a killed
/// daemon) is replaced; a live one is an error.
async fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    bind_socket(path, 0o700).await
}

/// Binds an owner-only socket at `path`, making its directory with `dir_mode` if it is missing.
pub(crate) async fn bind_socket(path: &Path, dir_mode: u32) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            anyhow::bail!(
                "another vswitch daemon is already listening on {}",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    // Created owner-only from the start: no window in which others could connect.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener.with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

type Reply = Response<Full<Bytes>>;

async fn route(daemon: &Arc<Daemon>, req: Request<Incoming>) -> Reply {
    match dispatch(daemon, req).await {
        Ok(r) => r,
        Err(e) => error_reply(e),
    }
}

async fn dispatch(daemon: &Arc<Daemon>, req: Request<Incoming>) -> Result<Reply, Error> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let segments: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(percent_decode)
        .collect::<Result<_, _>>()?;
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    // Accept an optional Docker-style version prefix (/v1.45/networks).
    let segs: &[&str] = match segs.split_first() {
        Some((first, rest)) if first.starts_with('v') && first[1..].contains('.') => rest,
        _ => &segs,
    };
    match (&method, segs) {
        (&Method::GET, ["_ping"]) => Ok(text(StatusCode::OK, "OK")),
        (&Method::GET, ["networks"]) => json(StatusCode::OK, &daemon.networks().await),
        (&Method::POST, ["networks", "create"]) => {
            let body: NetworkCreate = read_json(req).await?;
            json(StatusCode::CREATED, &daemon.create_network(body).await?)
        }
        (&Method::GET, ["networks", key]) => json(StatusCode::OK, &daemon.network(key).await?),
        (&Method::DELETE, ["networks", key]) => {
            daemon.remove_network(key).await?;
            Ok(text(StatusCode::NO_CONTENT, ""))
        }
        (&Method::POST, ["networks", key, "connect"]) => {
            let key = key.to_string();
            let body: AttachRequest = read_json(req).await?;
            json(StatusCode::OK, &daemon.attach(&key, body).await?)
        }
        (&Method::POST, ["networks", key, "disconnect"]) => {
            let key = key.to_string();
            let body: DisconnectRequest = read_json(req).await?;
            daemon.detach(&body.container, Some(&key)).await?;
            Ok(text(StatusCode::NO_CONTENT, ""))
        }
        (&Method::GET, ["networks", key, "fdb"]) => json(StatusCode::OK, &daemon.fdb(key).await?),
        (&Method::POST, ["networks", key, "peers", verb @ ("add" | "rm")]) => {
            let (key, add) = (key.to_string(), *verb == "add");
            let body: crate::api::PeerRequest = read_json(req).await?;
            daemon.set_peer(&key, body.address, add).await?;
            Ok(text(StatusCode::NO_CONTENT, ""))
        }
        (&Method::GET, ["endpoints"]) => json(StatusCode::OK, &daemon.endpoints().await),
        (&Method::POST, ["cni", "add"]) => {
            let body: CniAddRequest = read_json(req).await?;
            json(StatusCode::OK, &daemon.cni_add(body).await?)
        }
        (&Method::POST, ["cni", "del"]) => {
            let body: CniRequest = read_json(req).await?;
            daemon.cni_del(body).await?;
            Ok(text(StatusCode::NO_CONTENT, ""))
        }
        (&Method::POST, ["cni", "check"]) => {
            let body: CniRequest = read_json(req).await?;
            json(StatusCode::OK, &daemon.cni_check(body).await?)
        }
        (&Method::POST, ["cni", "gc"]) => {
            let body: CniGcRequest = read_json(req).await?;
            json(StatusCode::OK, &daemon.cni_gc(body).await?)
        }
        (&Method::DELETE, ["endpoints", name]) => {
            daemon.detach(name, None).await?;
            Ok(text(StatusCode::NO_CONTENT, ""))
        }
        (&Method::POST, ["containers", "run"]) => {
            let body: RunRequest = read_json(req).await?;
            json(StatusCode::CREATED, &daemon.run_container(body).await?)
        }
        (&Method::GET, ["containers"]) => json(StatusCode::OK, &daemon.containers().await),
        (&Method::GET, ["containers", key]) => json(StatusCode::OK, &daemon.container(key).await?),
        (&Method::POST, ["containers", key, "start"]) => {
            let key = key.to_string();
            json(StatusCode::OK, &daemon.start_container(&key).await?)
        }
        (&Method::POST, ["containers", key, "stop"]) => {
            let t = match query_param(&query, "t")? {
                Some(t) => t
                    .parse::<u64>()
                    .map_err(|_| Error::bad_request(format!("invalid timeout {t:?}")))?,
                None => crate::control::STOP_TIMEOUT.as_secs(),
            };
            json(
                StatusCode::OK,
                &daemon.stop_container(key, Duration::from_secs(t)).await?,
            )
        }
        (&Method::POST, ["containers", key, "kill"]) => {
            let sig = query_param(&query, "signal")?.unwrap_or_else(|| "SIGKILL".into());
            daemon.kill_container(key, &sig).await?;
            Ok(text(StatusCode::NO_CONTENT, ""))
        }
        (&Method::DELETE, ["containers", key]) => {
            let force = query_param(&query, "force")?.is_some_and(|v| v == "1" || v == "true");
            daemon.remove_container(key, force).await?;
            Ok(text(StatusCode::NO_CONTENT, ""))
        }
        (&Method::GET, ["containers", key, "logs"]) => {
            let offset = query_param(&query, "offset")?
                .map(|o| {
                    o.parse::<u64>()
                        .map_err(|_| Error::bad_request("invalid offset"))
                })
                .transpose()?
                .unwrap_or(0);
            json(StatusCode::OK, &daemon.container_logs(key, offset).await?)
        }
        (&Method::GET, ["info"]) => json(StatusCode::OK, &daemon.info().await),
        (&Method::GET, ["metrics"]) => Ok(metrics_reply(daemon, req.headers()).await),
        (&Method::GET, ["stats"]) => {
            let network = query_param(&query, "network")?;
            json(StatusCode::OK, &daemon.stats(network.as_deref()).await?)
        }
        _ => Err(Error::not_found(format!("no such API: {method} {path}"))),
    }
}

/// How long a request body may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) async fn read_json<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
) -> Result<T, Error> {
    let body = read_body(req).await?;
    serde_json::from_slice(&body)
        .map_err(|e| Error::bad_request(format!("invalid request body: {e}")))
}

/// A request's body, bounded in size and time.
pub(crate) async fn read_body(req: Request<Incoming>) -> Result<Bytes, Error> {
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(Error::new(
            ErrorKind::TooLarge,
            format!("request body too large (limit {MAX_BODY} bytes)"),
        ));
    }
    // Bounded in time as in size: a client that stops halfway must not hold its connection
    // slot (there are 256) for ever.
    let body = tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(req.into_body(), MAX_BODY).collect(),
    )
    .await
    .map_err(|_| {
        Error::new(
            ErrorKind::Timeout,
            format!(
                "request body not received within {} s",
                BODY_TIMEOUT.as_secs()
            ),
        )
    })?
    .map_err(|e| Error::bad_request(format!("cannot read request body: {e}")))?
    .to_bytes();
    Ok(body)
}

fn query_param(query: &str, key: &str) -> Result<Option<String>, Error> {
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == key {
            return percent_decode(v).map(Some);
        }
    }
    Ok(None)
}

fn percent_decode(s: &str) -> Result<String, Error> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| Error::bad_request("bad percent-encoding in the path"))?;
                out.push(hex);
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| Error::bad_request("path is not UTF-8"))
}

async fn metrics_reply(daemon: &Daemon, headers: &hyper::HeaderMap) -> Reply {
    let (body, kind) = crate::metrics::negotiate(headers, daemon.metrics_text().await);
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(kind),
    );
    r
}

fn text(status: StatusCode, body: &'static str) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Result<Reply, Error> {
    let body = serde_json::to_vec(value).map_err(|e| Error::failed("cannot encode", e))?;
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(r)
}

fn error_reply(e: Error) -> Reply {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = ErrorBody {
        message: e.message().to_owned(),
    };
    json(status, &body).unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "error"))
}
