//! Published ports: accept loops on host sockets that carry each client to the container.
//!
//! A client appears to the container with its own address where the container can answer it
//! (the gateway terminates the connection in any-IP mode and originates it from the client's
//! address); the others appear as the gateway, or take the in-kernel path of [`super::direct`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use super::masq;
use super::splice::splice;
use crate::datapath::{FlowChannel, Injector};

/// Most clients of one published UDP port that are shown as the gateway and remembered at once
/// (the oldest are forgotten when full).
const MASQUERADED_CLIENTS: usize = 4096;

/// Whether a published-port client can appear to the container as itself. The container sees
/// the real client address, except for clients it could not answer directly: loopback, the
/// other address family, or an address of its own network. Those appear as the gateway.
fn shown_as_itself(ip: IpAddr, container: SocketAddr, subnet: &ipnet::IpNet) -> bool {
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_ipv4() != container.is_ipv4()
        || subnet.contains(&ip))
}

/// Accepts connections on a published TCP port and carries each to the container.
///
/// Clients the container can see as themselves go through the gateway's TCP stack, which
/// originates the connection from the client's address. The others (see [`shown_as_itself`])
/// take the in-kernel path of [`super::direct`] when `direct` is given, and otherwise go
/// through the gateway too, appearing as the gateway. Connection tasks belong to this loop:
/// aborting it (detach, GC) ends them.
pub async fn serve_published_tcp(
    listener: TcpListener,
    container: SocketAddr,
    gateway: IpAddr,
    subnet: ipnet::IpNet,
    injector: Injector,
    direct: Option<super::direct::Inside>,
    ports: masq::Ports,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            Some(_) = conns.join_next() => continue,
        };
        let (stream, client) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept on a published port failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ip = client.ip().to_canonical();
        let itself = shown_as_itself(ip, container, &subnet);
        let injector = injector.clone();
        let direct = direct.clone().filter(|_| !itself);
        let ports = ports.clone();
        conns.spawn(async move {
            let stream = match direct {
                Some(d) => match super::direct::connect(&d, container).await {
                    Ok(Some(inner)) => {
                        return super::direct::splice_streams(stream, inner).await;
                    }
                    Ok(None) => {
                        // Refused or unanswered in the container: the client sees a reset.
                        let _ = stream.set_zero_linger();
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "in-kernel path unavailable; using the gateway");
                        stream
                    }
                },
                None => stream,
            };
            // Shown as the gateway: on a port of its own for as long as the connection lasts.
            let lease = if itself {
                None
            } else {
                match ports.lease() {
                    Some(l) => Some(l),
                    None => return drop(stream),
                }
            };
            let local = match &lease {
                None => SocketAddr::new(ip, client.port()),
                Some(l) => SocketAddr::new(gateway, l.port()),
            };
            let (ch, rx, shared) = FlowChannel::new();
            match injector.nat_open(local, container, ch).await {
                Some(flow) => splice(stream, flow, injector, rx, shared).await,
                None => drop(stream),
            }
            drop(lease);
        });
    }
}

/// Where a published UDP port leads: the container's address and MAC, its gateway's, and its
/// network.
#[derive(Debug, Clone, Copy)]
pub struct UdpTarget {
    pub container: SocketAddr,
    pub container_mac: [u8; 6],
    pub gateway: IpAddr,
    pub gateway_mac: [u8; 6],
    pub subnet: ipnet::IpNet,
}

/// Receives datagrams on a published UDP port and carries them to the container, each client
/// as its own flow (its replies go back to it through the same socket). Clients that cannot be
/// shown as themselves get a gateway port from `ports` each, remembered so that their replies
/// find them.
pub async fn serve_published_udp(
    socket: std::net::UdpSocket,
    target: UdpTarget,
    injector: Injector,
    ports: masq::Ports,
) {
    let UdpTarget {
        container,
        container_mac,
        gateway,
        gateway_mac,
        subnet,
    } = target;
    let Ok(send) = socket.try_clone().map(Arc::new) else {
        return;
    };
    let Ok(sock) = tokio::net::UdpSocket::from_std(socket) else {
        return;
    };
    let mut buf = vec![0u8; 65_535];
    let mut masq = masq::Clients::new(ports, gateway, MASQUERADED_CLIENTS);
    loop {
        let Ok((n, client)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        let ip = client.ip().to_canonical();
        let seen_as = if shown_as_itself(ip, container, &subnet) {
            SocketAddr::new(ip, client.port())
        } else {
            match masq.seen_as(std::time::Instant::now(), client) {
                Some(a) => a,
                None => continue,
            }
        };
        let Some(frame) = vswitch_nat::frame::udp_frame(
            gateway_mac,
            container_mac,
            seen_as,
            container,
            &buf[..n],
        ) else {
            continue;
        };
        if !injector.udp_in((container, seen_as), frame, Some((send.clone(), client))) {
            return;
        }
    }
}
