//! Relaying the queries the embedded DNS server cannot answer to the upstream servers.

use prometheus_client::metrics::histogram::Histogram;
use vswitch_dns::upstream::Forwarder;

use crate::datapath::ForwardJob;

/// Relays queries upstream as the datapaths hand them over, one task per query; each answer
/// goes back to the datapath that asked.
/// How long each took goes to `latency`.
pub async fn run_forwarder(
    forwarder: Forwarder,
    mut jobs: tokio::sync::mpsc::UnboundedReceiver<ForwardJob>,
    latency: Histogram,
) {
    while let Some(job) = jobs.recv().await {
        let f = forwarder.clone();
        let latency = latency.clone();
        tokio::spawn(async move {
            let tcp = job.reply.is_tcp();
            let began = std::time::Instant::now();
            let answer = match &job.upstreams {
                Some(servers) => f.forward_to(servers, &job.query, tcp).await,
                None => f.forward(&job.query, tcp).await,
            };
            latency.observe(began.elapsed().as_secs_f64());
            job.injector.deliver(job.reply, answer);
            drop(job.permit);
        });
    }
}
