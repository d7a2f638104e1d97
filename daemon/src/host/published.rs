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
use crate::datapath::{HostStream, Injector};

/// Most clients of one published UDP port that are shown as the gateway and remembered at once
/// (the oldest are forgotten when full).
const MASQUERADED_CLIENTS: usize = 4096;

/// Whether a published-port client can appear to the container as itself. The container sees
/// the real client address, except for clients it could not answer directly: loopback, the
/// other address family, or an address of its own network. Those appear as the gateway.
fn shown_as_itself(ip: IpAddr, container: SocketAddr, subnet: &ipnet::IpNet) -> bool {
    // An IPv6 link-local client would be answered on the container's own link, where a
    // neighbour could claim its address.
    let link_local = matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local());
    !(ip.is_loopback()
        || link_local
        || ip.is_multicast()
        || ip.is_unspecified()
        || ip.is_ipv4() != container.is_ipv4()
        || subnet.contains(&ip))
}

/// Where a published port leads in one address family: the container's address and port, its
/// gateway, and its network's subnet.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    pub container: SocketAddr,
    pub gateway: IpAddr,
    pub subnet: ipnet::IpNet,
}

/// Where a published port leads: over IPv4, and over IPv6 when the endpoint has an IPv6
/// address.
#[derive(Debug, Clone, Copy)]
pub struct Leads {
    pub v4: Family,
    pub v6: Option<Family>,
}

impl Leads {
    /// The family a client goes to, and whether it is shown as itself there: an IPv6 client
    /// the container can answer over IPv6 goes there, with its own address; everybody else
    /// goes over IPv4 as before.
    fn pick(&self, ip: IpAddr) -> (Family, bool) {
        if let (IpAddr::V6(_), Some(f)) = (ip, self.v6)
            && shown_as_itself(ip, f.container, &f.subnet)
        {
            return (f, true);
        }
        let f = self.v4;
        (f, shown_as_itself(ip, f.container, &f.subnet))
    }
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
    leads: Leads,
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
        let (
            Family {
                container, gateway, ..
            },
            itself,
        ) = leads.pick(ip);
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
            // From here the datapath moves the bytes itself. The lease, and `done`, last as long
            // as the flow; this task waits for `done` to go, so that aborting it (detach, GC)
            // still ends the connection.
            let Ok(host) = HostStream::new(stream) else {
                return;
            };
            let (done, over) = tokio::sync::oneshot::channel::<()>();
            let host = host.keeping((lease, done));
            if let Some(flow) = injector.nat_open(local, container, host).await {
                let abort = AbortOnDrop(Some((injector, flow)));
                let _ = over.await;
                abort.disarm();
            }
        });
    }
}

/// Resets a gateway flow when dropped, unless disarmed: the task carrying it was aborted.
struct AbortOnDrop(Option<(Injector, vswitch_nat::FlowId)>);

impl AbortOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some((injector, flow)) = self.0.take() {
            injector.nat_abort(flow);
        }
    }
}

/// Where a published UDP port leads: the container's addresses and MAC, and its gateway's.
#[derive(Debug, Clone, Copy)]
pub struct UdpTarget {
    pub leads: Leads,
    pub container_mac: [u8; 6],
    pub gateway_mac: [u8; 6],
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
        leads,
        container_mac,
        gateway_mac,
    } = target;
    let Ok(send) = socket.try_clone().map(Arc::new) else {
        return;
    };
    let Ok(sock) = tokio::net::UdpSocket::from_std(socket) else {
        return;
    };
    let mut buf = vec![0u8; 65_535];
    let mut masq = masq::Clients::new(ports, leads.v4.gateway, MASQUERADED_CLIENTS);
    loop {
        let Ok((n, client)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        let ip = client.ip().to_canonical();
        let (Family { container, .. }, itself) = leads.pick(ip);
        let seen_as = if itself {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn leads(v6: bool) -> Leads {
        Leads {
            v4: Family {
                container: "172.18.0.2:8080".parse().expect("addr"),
                gateway: "172.18.0.1".parse().expect("ip"),
                subnet: "172.18.0.0/16".parse().expect("net"),
            },
            v6: v6.then(|| Family {
                container: "[fd79::2]:8080".parse().expect("addr"),
                gateway: "fd79::1".parse().expect("ip"),
                subnet: "fd79::/64".parse().expect("net"),
            }),
        }
    }

    #[test]
    fn clients_go_to_the_family_where_they_can_be_themselves() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        // An IPv6 client of a dual-stack endpoint: over IPv6, as itself.
        let (f, itself) = leads(true).pick(ip("2001:db8::2"));
        assert_eq!((f.container.is_ipv6(), itself), (true, true));
        // Without IPv6 on the endpoint: over IPv4, shown as the gateway.
        let (f, itself) = leads(false).pick(ip("2001:db8::2"));
        assert_eq!((f.container.is_ipv4(), itself), (true, false));
        // IPv6 loopback, link-local, or an address of the network itself: over IPv4, not as
        // itself.
        for c in ["::1", "fe80::1", "fd79::9"] {
            let (f, itself) = leads(true).pick(ip(c));
            assert_eq!((f.container.is_ipv4(), itself), (true, false), "{c}");
        }
        // IPv4 clients as before.
        let (f, itself) = leads(true).pick(ip("192.0.2.2"));
        assert_eq!((f.container.is_ipv4(), itself), (true, true));
    }
}
