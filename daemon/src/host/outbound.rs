//! The host side of outbound NAT: dialling a container's TCP destinations, and receiving the
//! answers of its UDP and ping flows, which go back to the datapath as frames.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpStream;
use vswitch_nat::FlowId;
use vswitch_nat::frame::{EchoFlow, echo_reply_frame, udp_frame};

use crate::datapath::{FlowReceive, HostStream, Injector, NatJob, ReceiveKind};

/// Receive buffer of each outbound UDP or ping flow: up to 4096 flows per network each hold
/// one, so it is sized for what can reach a container unfragmented (and EDNS answers), not
/// for 64 KiB; a longer datagram is dropped.
const FLOW_DATAGRAM_MAX: usize = 4096;
/// How long an outbound dial may take before the container is refused.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs NAT jobs as they come, one task each.
pub async fn run_jobs(mut jobs: tokio::sync::mpsc::UnboundedReceiver<NatJob>) {
    while let Some(job) = jobs.recv().await {
        match job {
            NatJob::Receive(job) => {
                tokio::spawn(receive(job));
            }
            NatJob::Dial {
                flow,
                src,
                dst,
                gateway,
                policy,
                injector,
            } => {
                let target = policy
                    .read()
                    .outbound_target(vswitch_nat::Proto::Tcp, dst, &gateway);
                match target {
                    Some(target) => {
                        tokio::spawn(dial(flow, src, dst, target, injector));
                    }
                    None => {
                        tracing::debug!(%src, %dst, "outbound connection not allowed");
                        injector.nat_dialed(flow, None);
                    }
                }
            }
        }
    }
}

async fn dial(
    flow: FlowId,
    src: SocketAddr,
    dst: SocketAddr,
    target: SocketAddr,
    injector: Injector,
) {
    match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(stream)) => injector.nat_dialed(flow, HostStream::new(stream).ok()),
        Ok(Err(e)) => {
            tracing::debug!(%src, %dst, error = %e, "outbound connection refused");
            injector.nat_dialed(flow, None);
        }
        Err(_) => {
            tracing::debug!(%src, %dst, "outbound connection timed out");
            injector.nat_dialed(flow, None);
        }
    }
}

/// The receive loop of an outbound flow: one socket read per answer, turned into a frame.
async fn receive(job: FlowReceive) {
    let Ok(sock) = job
        .socket
        .try_clone()
        .and_then(tokio::net::UdpSocket::from_std)
    else {
        return;
    };
    let mut buf = vec![0u8; FLOW_DATAGRAM_MAX];
    while job.alive.load(Ordering::Acquire) {
        let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), sock.recv(&mut buf)).await
        else {
            continue;
        };
        let delivered = match job.kind {
            ReceiveKind::Udp {
                key: (container, peer),
            } => {
                let Some(frame) = udp_frame(
                    job.gateway_mac,
                    job.container_mac,
                    peer,
                    container,
                    &buf[..n],
                ) else {
                    continue;
                };
                job.injector.udp_in((container, peer), frame, None)
            }
            ReceiveKind::Icmp { key } => {
                let (container, id, dst) = key;
                let flow = EchoFlow {
                    gateway_mac: job.gateway_mac,
                    container_mac: job.container_mac,
                    container,
                    dst,
                    id,
                };
                let Some(frame) = echo_reply_frame(&flow, &buf[..n]) else {
                    continue;
                };
                job.injector.icmp_in(key, frame)
            }
        };
        if !delivered {
            return;
        }
    }
}
