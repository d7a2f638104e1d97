//! `--metrics-addr`: `GET /metrics` over TCP for a Prometheus server, and nothing else. The
//! control API stays on its owner-only Unix socket; this listener answers every other path
//! with 404 and every other method with 405. Connections are bounded in number
//! ([`MAX_CONNECTIONS`]), carry one request each, and have 5 s for their headers and 15 s in
//! all. What it shows (network and endpoint names, counters) is for whoever can reach the
//! address: bind it to an address only the scraper reaches.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::control::Daemon;

const MAX_CONNECTIONS: usize = 16;

/// Serves scrapes on `listener` for as long as the daemon runs.
pub async fn serve(daemon: Arc<Daemon>, listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Over the limit: the connection is closed at once.
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let daemon = daemon.clone();
                async move { Ok::<_, Infallible>(answer(&daemon, &req).await) }
            });
            let mut builder = http1::Builder::new();
            // One request per connection, and little time for it: a client that holds
            // connections open cannot keep the scraper out for long.
            builder
                .timer(TokioTimer::new())
                .keep_alive(false)
                .header_read_timeout(Duration::from_secs(5))
                .max_buf_size(16 * 1024);
            let served = builder.serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(Duration::from_secs(15), served).await;
            drop(permit);
        });
    }
}

async fn answer(daemon: &Daemon, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, body, kind) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            let (body, kind) = super::negotiate(req.headers(), daemon.metrics_text().await);
            (StatusCode::OK, Bytes::from(body), kind)
        }
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            Bytes::from_static(b"only GET\n"),
            "text/plain",
        ),
        _ => (
            StatusCode::NOT_FOUND,
            Bytes::from_static(b"only /metrics here\n"),
            "text/plain",
        ),
    };
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(kind),
    );
    r
}
