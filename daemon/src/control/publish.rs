//! Published ports: binding their host sockets (all or none, before an attach plumbs anything)
//! and starting their accept loops once the endpoint is plugged in.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use vswitch_nat::{PortMapping, Proto};

use super::{Daemon, Inner};
use crate::error::{Error, Result};
use crate::host::direct;
use crate::host::published::{Family, Leads, UdpTarget, serve_published_tcp, serve_published_udp};
use crate::netns::target::{netns_path, target_pid};
use crate::state::{Endpoint, Network};

/// A bound host socket of a published port.
pub(super) enum Bound {
    Tcp(tokio::net::TcpListener, PortMapping),
    Udp(std::net::UdpSocket, PortMapping),
}

impl Bound {
    /// The host port bound (the one picked, for a range).
    pub(super) fn port(&self) -> u16 {
        match self {
            Bound::Tcp(l, m) => l.local_addr().map(|a| a.port()).unwrap_or(m.host_port),
            Bound::Udp(s, m) => s.local_addr().map(|a| a.port()).unwrap_or(m.host_port),
        }
    }
}

/// Why a published port's host socket could not be bound.
pub(super) struct BindError {
    /// The port is taken (something else listens there), as opposed to any other failure.
    pub(super) in_use: bool,
    pub(super) error: Error,
}

impl From<BindError> for Error {
    fn from(e: BindError) -> Self {
        e.error
    }
}

/// Binds every published port's host socket, or none: the first failure is the error. A host
/// port range for one container port binds the first free port of the range.
pub(super) async fn bind_published(ports: &[PortMapping]) -> Result<Vec<Bound>> {
    let mut out = Vec::new();
    for m in ports {
        let Some(end) = m.host_port_end else {
            out.push(bind_one(m).await?);
            continue;
        };
        let mut bound = None;
        for port in m.host_port..=end {
            let one = PortMapping {
                host_port: port,
                host_port_end: None,
                ..*m
            };
            match bind_one(&one).await {
                Ok(b) => {
                    bound = Some(b);
                    break;
                }
                Err(e) if e.in_use => continue,
                Err(e) => return Err(e.into()),
            }
        }
        out.push(bound.ok_or_else(|| {
            Error::conflict(format!(
                "no free host port in {}-{end} ({}): all are already in use",
                m.host_port, m.proto
            ))
        })?);
    }
    Ok(out)
}

/// Binds the host socket of one published port (a single port, not a range).
pub(super) async fn bind_one(m: &PortMapping) -> Result<Bound, BindError> {
    let ip = m.host_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let addr = SocketAddr::new(ip, m.host_port);
    let fail = |e: std::io::Error| {
        let in_use = e.kind() == std::io::ErrorKind::AddrInUse;
        let why = match e.kind() {
            std::io::ErrorKind::AddrInUse => "is already in use".to_owned(),
            std::io::ErrorKind::PermissionDenied => {
                format!("needs privileges (ports below net.ipv4.ip_unprivileged_port_start): {e}")
            }
            _ => format!("cannot be bound: {e}"),
        };
        BindError {
            in_use,
            error: Error::conflict(format!("host port {addr} ({}) {why}", m.proto)),
        }
    };
    // No host IP: every address of both families, like Docker, with one dual-stack socket
    // on [::] (so a port taken in either family is a conflict); 0.0.0.0 if the host has no
    // IPv6.
    let dual = m.host_ip.is_none();
    match m.proto {
        Proto::Tcp => {
            let listener = match dual.then(|| dual_stack(m.host_port, true)) {
                Some(Ok(fd)) => {
                    let l = std::net::TcpListener::from(fd);
                    tokio::net::TcpListener::from_std(l).map_err(fail)?
                }
                Some(Err(e)) if e.raw_os_error() != Some(libc::EAFNOSUPPORT) => {
                    return Err(fail(e));
                }
                _ => tokio::net::TcpListener::bind(addr).await.map_err(fail)?,
            };
            Ok(Bound::Tcp(listener, *m))
        }
        Proto::Udp => {
            let socket = match dual.then(|| dual_stack(m.host_port, false)) {
                Some(Ok(fd)) => std::net::UdpSocket::from(fd),
                Some(Err(e)) if e.raw_os_error() != Some(libc::EAFNOSUPPORT) => {
                    return Err(fail(e));
                }
                _ => std::net::UdpSocket::bind(addr)
                    .and_then(|s| s.set_nonblocking(true).map(|()| s))
                    .map_err(fail)?,
            };
            Ok(Bound::Udp(socket, *m))
        }
    }
}

/// A non-blocking socket bound to `[::]:port` that also takes IPv4 (IPV6_V6ONLY off); a TCP
/// one is listening.
fn dual_stack(port: u16, tcp: bool) -> std::io::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn6, bind, listen, setsockopt, socket,
        sockopt,
    };
    use std::os::fd::AsRawFd;
    let kind = if tcp {
        SockType::Stream
    } else {
        SockType::Datagram
    };
    let fd = socket(
        AddressFamily::Inet6,
        kind,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::Ipv6V6Only, &false)?;
    if tcp {
        setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    }
    let any = std::net::SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0);
    bind(fd.as_raw_fd(), &SockaddrIn6::from(any))?;
    if tcp {
        listen(&fd, Backlog::new(1024)?)?;
    }
    Ok(fd)
}

impl Daemon {
    /// Starts the accept loops of an endpoint's published ports.
    pub(super) fn publish(
        &self,
        inner: &mut Inner,
        net: &Network,
        ep: &Endpoint,
        listeners: Vec<Bound>,
    ) {
        let Some(live) = inner.live.get_mut(&net.id) else {
            return;
        };
        let injector = live.datapath.injector();
        let subnet = ipnet::IpNet::V4(net.subnet);
        let has_tcp = listeners.iter().any(|b| matches!(b, Bound::Tcp(..)));
        let inside = match (
            &self.ns_sockets,
            netns_path(&ep.target),
            target_pid(&ep.target),
        ) {
            _ if !has_tcp => None,
            (Some(factory), Ok(path), _) => Some(direct::Inside::Enter {
                factory: factory.clone(),
                target: direct::NsTarget { path, id: ep.ns },
            }),
            (None, _, Some(pid)) if self.rootless => {
                match direct::HelperSockets::start(pid, ep.ns) {
                    Ok(h) => Some(direct::Inside::Helper(h)),
                    Err(e) => {
                        tracing::warn!(error = %e, "in-kernel published ports unavailable");
                        None
                    }
                }
            }
            _ => None,
        };
        let leads = |port: u16| Leads {
            v4: Family {
                container: SocketAddr::new(IpAddr::V4(ep.ipv4), port),
                gateway: IpAddr::V4(net.gateway),
                subnet,
            },
            v6: match (ep.ipv6, net.gateway6, net.subnet6) {
                (Some(ip), Some(gw), Some(sub)) => Some(Family {
                    container: SocketAddr::new(IpAddr::V6(ip), port),
                    gateway: IpAddr::V6(gw),
                    subnet: ipnet::IpNet::V6(sub),
                }),
                _ => None,
            },
        };
        let mut handles = Vec::new();
        // Gateway ports of the endpoint's clients shown as the gateway, one pool for all its
        // published ports.
        let ports = crate::host::masq::Ports::default();
        for b in listeners {
            let task = match b {
                Bound::Tcp(listener, m) => tokio::spawn(serve_published_tcp(
                    listener,
                    leads(m.container_port),
                    injector.clone(),
                    inside.clone(),
                    ports.clone(),
                )),
                Bound::Udp(socket, m) => tokio::spawn(serve_published_udp(
                    socket,
                    UdpTarget {
                        leads: leads(m.container_port),
                        container_mac: ep.mac.0,
                        gateway_mac: net.gateway_mac().0,
                    },
                    injector.clone(),
                    ports.clone(),
                )),
            };
            handles.push(task.abort_handle());
        }
        live.published.insert(ep.id.clone(), handles);
    }
}
