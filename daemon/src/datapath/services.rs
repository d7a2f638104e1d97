//! What the gateway port does with a frame before (or instead of) its TCP/IP stack: DNS over
//! UDP answered inline, and UDP and ping NAT carried through host sockets.
//!
//! These detours never reach smoltcp: the frame is sliced once ([`vswitch_nat::frame`]), the
//! flow looked up in a bounded table ([`vswitch_nat::flows`]) and the payload sent through the
//! flow's host socket. Answers come back from tokio tasks as frames, through the command queue.
//! The NAT policy (a lock shared with the control plane) is read once per new flow.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use vswitch_dns::{Asker, Outcome, Transport};
use vswitch_nat::flows::UdpKind;
use vswitch_nat::frame::{UdpView, slice_echo_request};

use super::protocol::{DNS_PORT, FlowReceive, ForwardJob, NatJob, ReceiveKind, ReplyTo, UdpPeer};
use super::worker::Worker;

/// A UDP conversation between a container address and a peer, carried by a host socket.
pub(super) struct UdpFlow {
    socket: Arc<std::net::UdpSocket>,
    /// For published ports: the real client (the socket is the shared listener). `None` for
    /// outbound flows, whose socket is connected to the destination.
    reply_to: Option<SocketAddr>,
    /// Tells the flow's receive task (outbound flows) to stop once the flow is gone.
    alive: Arc<AtomicBool>,
}

impl UdpFlow {
    /// The flow of a published port's client, on the port's listening socket.
    pub(super) fn published(socket: Arc<std::net::UdpSocket>, client: SocketAddr) -> Self {
        Self {
            socket,
            reply_to: Some(client),
            alive: Arc::new(AtomicBool::new(true)),
        }
    }
}

impl Drop for UdpFlow {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::Release);
    }
}

/// A container's pings to one destination, carried by a host ICMP socket.
pub(super) struct IcmpFlow {
    socket: Arc<std::net::UdpSocket>,
    alive: Arc<AtomicBool>,
}

impl Drop for IcmpFlow {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::Release);
    }
}

impl Worker {
    /// Answers a UDP query to the gateway's port 53 in place. Returns false if the frame is not
    /// one (it then goes on to NAT or the gateway's stack).
    pub(super) fn dns_udp(&mut self, now: Instant, u: &UdpView<'_>) -> bool {
        let Some(hook) = &self.links.dns else {
            return false;
        };
        if u.dst.port() != DNS_PORT || !self.gateway_ips.contains(&u.dst.ip()) {
            return false;
        }
        let peer = UdpPeer {
            client_mac: u.src_mac,
            client: u.src,
            gw_mac: self.gateway_mac,
            gw_ip: u.dst.ip(),
        };
        let asker = Asker::Network {
            network_id: &self.network_id,
            client: u.src.ip(),
        };
        match hook.responder.answer(asker, Transport::Udp, u.payload) {
            Outcome::Reply(answer) => {
                if let Some(f) = peer.frame(&answer) {
                    self.switch(now, self.gateway_port, &f);
                }
            }
            Outcome::Forward => self.forward(now, u.payload.to_vec(), ReplyTo::Udp(peer)),
            Outcome::Drop => {}
        }
        true
    }

    /// Hands a query to the forwarder task, or answers REFUSED if too many are in flight.
    pub(super) fn forward(&mut self, now: Instant, query: Vec<u8>, reply: ReplyTo) {
        let Some(hook) = &self.links.dns else {
            if let ReplyTo::Tcp(conn) = reply {
                self.gateway.stream_unanswered(now, conn);
            }
            return;
        };
        let Some(permit) = hook.forwarder.try_acquire() else {
            tracing::debug!(network = %self.network_name, "too many DNS forwards in flight; REFUSED");
            match (hook.responder.refuse(&query), reply) {
                (Some(answer), ReplyTo::Udp(peer)) => {
                    if let Some(f) = peer.frame(&answer) {
                        self.switch(now, self.gateway_port, &f);
                    }
                }
                (Some(answer), ReplyTo::Tcp(conn)) => {
                    self.gateway.stream_reply(now, conn, &answer);
                }
                (None, ReplyTo::Tcp(conn)) => self.gateway.stream_unanswered(now, conn),
                (None, ReplyTo::Udp(_)) => {}
            }
            return;
        };
        let _ = hook.jobs.send(ForwardJob {
            query,
            reply,
            injector: self.injector(),
            permit,
        });
    }

    /// Carries a container's UDP datagram to its peer through the flow's host socket,
    /// creating an outbound flow for a new destination. Returns false if the frame is not UDP
    /// for NAT (it then goes to the gateway's stack).
    pub(super) fn nat_udp(&mut self, now: Instant, u: &UdpView<'_>) -> bool {
        if !self.nat_enabled {
            return false;
        }
        let (src, dst) = (u.src, u.dst);
        if dst.ip().is_multicast() || matches!(dst.ip(), IpAddr::V4(v4) if v4.is_broadcast()) {
            return false;
        }
        let key = (src, dst);
        if let Some(flow) = self.udp.touch(now, &key) {
            let _ = match flow.reply_to {
                Some(client) => flow.socket.send_to(u.payload, client),
                None => flow.socket.send(u.payload),
            };
            return true;
        }
        let target = self.links.policy.read().outbound_target(
            vswitch_nat::Proto::Udp,
            dst,
            &self.gateway_ips,
        );
        let Some(target) = target else {
            return true; // not allowed: dropped
        };
        let bind: SocketAddr = match dst.ip() {
            IpAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = match std::net::UdpSocket::bind(bind)
            .and_then(|s| s.connect(target).map(|()| s))
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
        {
            Ok(s) => Arc::new(s),
            Err(e) => {
                tracing::debug!(%dst, error = %e, "cannot open an outbound UDP socket");
                return true;
            }
        };
        let _ = socket.send(u.payload);
        let alive = Arc::new(AtomicBool::new(true));
        let _ = self.links.nat_jobs.send(NatJob::Receive(FlowReceive {
            socket: socket.clone(),
            kind: ReceiveKind::Udp { key },
            container_mac: u.src_mac,
            gateway_mac: self.gateway_mac,
            alive: alive.clone(),
            injector: self.injector(),
        }));
        let flow = UdpFlow {
            socket,
            reply_to: None,
            alive,
        };
        self.udp.insert(now, key, UdpKind::Outbound, flow);
        true
    }

    /// Sends a container's echo request to the outside through a host ICMP socket (an
    /// unprivileged ping socket, or a raw socket when those are not allowed and we are root).
    /// Returns false if the frame is not an outbound IPv4 echo request.
    pub(super) fn nat_icmp(&mut self, now: Instant, frame: &[u8]) -> bool {
        if !self.nat_enabled {
            return false;
        }
        let Some(echo) = slice_echo_request(frame) else {
            return false;
        };
        let (src, dst) = (IpAddr::V4(echo.src), IpAddr::V4(echo.dst));
        if self.gateway_ips.contains(&dst) || dst.is_multicast() {
            return false;
        }
        let key = (src, echo.id, dst);
        if let Some(flow) = self.icmp.touch(now, &key) {
            let _ = flow.socket.send(&echo.message);
            return true;
        }
        if self.icmp.is_full() || self.links.policy.read().is_network(dst) {
            return true; // over the bound, or another vswitch network (isolated): dropped
        }
        let Some((socket, raw)) = icmp_socket(echo.dst) else {
            return true;
        };
        let _ = socket.send(&echo.message);
        let alive = Arc::new(AtomicBool::new(true));
        let _ = self.links.nat_jobs.send(NatJob::Receive(FlowReceive {
            socket: socket.clone(),
            kind: ReceiveKind::Icmp { key, raw },
            container_mac: echo.src_mac,
            gateway_mac: self.gateway_mac,
            alive: alive.clone(),
            injector: self.injector(),
        }));
        let _ = self.icmp.insert(now, key, IcmpFlow { socket, alive });
        true
    }
}

/// An ICMP socket connected to `dst`: an unprivileged ping socket if the namespace allows it
/// (`net.ipv4.ping_group_range`), else a raw socket (needs CAP_NET_RAW). The bool says raw.
fn icmp_socket(dst: std::net::Ipv4Addr) -> Option<(Arc<std::net::UdpSocket>, bool)> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockProtocol, SockType, SockaddrIn, connect, socket,
    };
    let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
    let (fd, raw) = match socket(
        AddressFamily::Inet,
        SockType::Datagram,
        flags,
        SockProtocol::Icmp,
    ) {
        Ok(fd) => (fd, false),
        Err(e) => match socket(
            AddressFamily::Inet,
            SockType::Raw,
            flags,
            SockProtocol::Icmp,
        ) {
            Ok(fd) => (fd, true),
            Err(_) => {
                tracing::warn!(error = %e, "cannot open an ICMP socket: outbound ping needs net.ipv4.ping_group_range to include the daemon's group, or CAP_NET_RAW");
                return None;
            }
        },
    };
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(std::net::SocketAddrV4::new(dst, 0)),
    )
    .ok()?;
    // A datagram socket of another protocol: std's UdpSocket is only a wrapper over send/recv.
    Some((Arc::new(std::net::UdpSocket::from(fd)), raw))
}
