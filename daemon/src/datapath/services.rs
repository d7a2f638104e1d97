//! What the gateway port does with a frame before (or instead of) its TCP/IP stack: DNS over
//! UDP answered inline, and UDP and ping NAT carried through host sockets; and the DNS and NAT
//! work the stack hands back (queries over TCP, new outbound connections).
//!
//! These detours never reach smoltcp: the frame is sliced once ([`vswitch_nat::frame`]), the
//! flow looked up in a bounded table ([`vswitch_nat::flows`]) and the payload sent through the
//! flow's host socket. Answers come back from tokio tasks as frames, through the command queue.
//! The NAT policy (a lock shared with the control plane) is read once per new flow. The
//! services decide; the worker sends what they return into the network.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use vswitch_dns::{Asker, Outcome, Transport};
use vswitch_nat::flows::{IcmpFlows, UdpFlows, UdpKind};
use vswitch_nat::frame::{EchoFlow, EchoRequest, UdpView, slice_echo_request};
use vswitch_nat::{FlowId, StreamMessage};

use super::DnsHook;
use super::protocol::{
    DNS_PORT, FlowReceive, ForwardJob, Injector, NatJob, ReceiveKind, ReplyTo, SharedPolicy,
    UdpPeer,
};
use super::raw_ping::{RawEcho, RawPinger};

/// What became of a frame offered to a service.
#[derive(Debug)]
pub(super) enum Detour {
    /// Not this service's: the frame goes on (to the next service, then the stack).
    Pass,
    /// Taken; nothing to send now.
    Taken,
    /// Taken; this frame goes into the network from the gateway port.
    Send(Vec<u8>),
}

/// What to do with a DNS message that came over TCP.
#[derive(Debug)]
pub(super) enum StreamAnswer {
    /// Send this answer on the connection.
    Reply(Vec<u8>),
    /// Handed upstream: the answer comes later, through the command queue.
    Forwarded,
    /// No answer will come: the connection may move on.
    Unanswered,
}

/// What became of a query for upstream.
enum Forwarded {
    /// On its way: the answer comes back through the command queue.
    Queued,
    /// Too many in flight: the REFUSED answer to send, if the query can be answered at all.
    Refused(Option<Vec<u8>>),
}

/// A UDP conversation between a container address and a peer, carried by a host socket.
pub(super) struct UdpFlow {
    socket: Arc<std::net::UdpSocket>,
    /// For published ports: the real client (the socket is the shared listener). `None` for
    /// outbound flows, whose socket is connected to the destination.
    reply_to: Option<SocketAddr>,
    /// Tells the flow's receive task (outbound flows) to stop once the flow is gone.
    alive: Arc<AtomicBool>,
}

impl Drop for UdpFlow {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::Release);
    }
}

/// A container's pings to one destination, carried by a host ICMP socket.
pub(super) enum IcmpFlow {
    /// An unprivileged ping socket of its own, connected to the destination (the kernel
    /// hands it its own replies), and the flag that stops its receive task.
    Socket {
        socket: Arc<std::net::UdpSocket>,
        alive: Arc<AtomicBool>,
    },
    /// The daemon's shared raw socket, under an echo id of its own.
    Raw(RawEcho),
}

impl IcmpFlow {
    fn send(&self, echo: &EchoRequest) {
        match self {
            IcmpFlow::Socket { socket, .. } => {
                let _ = socket.send(&echo.message);
            }
            IcmpFlow::Raw(raw) => raw.send(echo.seq, &echo.message),
        }
    }
}

impl Drop for IcmpFlow {
    fn drop(&mut self) {
        if let IcmpFlow::Socket { alive, .. } = self {
            alive.store(false, Ordering::Release);
        }
    }
}

/// The gateway's services of one network.
pub(super) struct Services {
    pub(super) network_id: String,
    pub(super) dns: Option<DnsHook>,
    pub(super) nat_jobs: tokio::sync::mpsc::UnboundedSender<NatJob>,
    pub(super) policy: SharedPolicy,
    pub(super) injector: Injector,
    pub(super) gateway_mac: [u8; 6],
    pub(super) gateway_ips: Vec<IpAddr>,
    /// Off on internal networks: no way out.
    pub(super) nat: bool,
    pub(super) udp: UdpFlows<UdpFlow>,
    pub(super) icmp: IcmpFlows<IcmpFlow>,
    /// Recent local answers to UDP queries, given again for the same query.
    pub(super) dns_cache: vswitch_dns::AnswerCache,
    /// Queries answered here, by response code, and refused for the fair share.
    pub(super) dns_local: [u64; 16],
    pub(super) dns_refused: u64,
    /// UDP flows evicted to make room, and ping flows refused for want of it.
    pub(super) udp_evicted: u64,
    pub(super) icmp_refused: u64,
}

impl Services {
    fn count_local(&mut self, answer: &[u8]) {
        self.dns_local[crate::api::dns_rcode(answer)] += 1;
    }

    /// Answers a UDP query to the gateway's port 53 in place.
    pub(super) fn dns_udp(&mut self, u: &UdpView<'_>, namespace: Option<&str>) -> Detour {
        let Some(hook) = &self.dns else {
            return Detour::Pass;
        };
        if u.dst.port() != DNS_PORT || !self.gateway_ips.contains(&u.dst.ip()) {
            return Detour::Pass;
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
            namespace,
        };
        let answer = match self.dns_cache.answer_udp(&hook.responder, asker, u.payload) {
            Outcome::Reply(answer) => {
                self.count_local(&answer);
                Some(answer)
            }
            Outcome::Forward(via) => {
                match self.forward(
                    u.payload.to_vec(),
                    u.src.ip(),
                    ReplyTo::Udp(peer.clone()),
                    via,
                ) {
                    Forwarded::Queued => None,
                    Forwarded::Refused(answer) => {
                        self.dns_refused += 1;
                        answer
                    }
                }
            }
            Outcome::Drop => None,
        };
        match answer.and_then(|a| peer.frame(&a)) {
            Some(frame) => Detour::Send(frame),
            None => Detour::Taken,
        }
    }

    /// Answers a DNS message that came over TCP on connection `m.conn`.
    pub(super) fn dns_stream(&mut self, m: StreamMessage) -> StreamAnswer {
        let Some(hook) = &self.dns else {
            return StreamAnswer::Unanswered;
        };
        // Over TCP the port is not known here: the peer's address stands for it (port
        // security keeps it the peer's own).
        let asker = Asker::Network {
            network_id: &self.network_id,
            client: m.peer,
            namespace: None,
        };
        match hook.responder.answer(asker, Transport::Tcp, &m.message) {
            Outcome::Reply(answer) => {
                self.count_local(&answer);
                StreamAnswer::Reply(answer)
            }
            Outcome::Forward(via) => {
                match self.forward(m.message, m.peer, ReplyTo::Tcp(m.conn), via) {
                    Forwarded::Queued => StreamAnswer::Forwarded,
                    Forwarded::Refused(r) => {
                        self.dns_refused += 1;
                        r.map_or(StreamAnswer::Unanswered, StreamAnswer::Reply)
                    }
                }
            }
            Outcome::Drop => StreamAnswer::Unanswered,
        }
    }

    /// Hands a query to the forwarder task, or refuses it if too many are in flight.
    fn forward(
        &mut self,
        query: Vec<u8>,
        client: IpAddr,
        reply: ReplyTo,
        upstreams: Option<vswitch_dns::Upstreams>,
    ) -> Forwarded {
        let Some(hook) = self.dns.as_ref() else {
            return Forwarded::Refused(None);
        };
        let Some(permit) = hook.forwarder.try_acquire(&self.network_id, client) else {
            tracing::debug!(network = %self.network_id, %client, "DNS forwards over their share; REFUSED");
            return Forwarded::Refused(hook.responder.refuse(&query));
        };
        let _ = hook.jobs.send(ForwardJob {
            query,
            reply,
            upstreams,
            injector: self.injector.clone(),
            permit,
        });
        Forwarded::Queued
    }

    /// Hands a container's held SYN to the host side, which dials its destination.
    pub(super) fn dial(&self, flow: FlowId, src: SocketAddr, dst: SocketAddr) {
        let _ = self.nat_jobs.send(NatJob::Dial {
            flow,
            src,
            dst,
            gateway: self.gateway_ips.clone(),
            policy: self.policy.clone(),
            injector: self.injector.clone(),
        });
    }

    /// Carries a container's UDP datagram to its peer through the flow's host socket,
    /// creating an outbound flow for a new destination.
    pub(super) fn nat_udp(&mut self, now: Instant, u: &UdpView<'_>) -> Detour {
        if !self.nat {
            return Detour::Pass;
        }
        let (src, dst) = (u.src, u.dst);
        if dst.ip().is_multicast() || matches!(dst.ip(), IpAddr::V4(v4) if v4.is_broadcast()) {
            return Detour::Pass;
        }
        let key = (src, dst);
        if let Some(flow) = self.udp.touch(now, &key) {
            let _ = match flow.reply_to {
                Some(client) => flow.socket.send_to(u.payload, client),
                None => flow.socket.send(u.payload),
            };
            return Detour::Taken;
        }
        let target =
            self.policy
                .read()
                .outbound_target(vswitch_nat::Proto::Udp, dst, &self.gateway_ips);
        let Some(target) = target else {
            return Detour::Taken; // not allowed: dropped
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
                return Detour::Taken;
            }
        };
        let _ = socket.send(u.payload);
        let alive = self.receive(socket.clone(), ReceiveKind::Udp { key }, u.src_mac);
        let flow = UdpFlow {
            socket,
            reply_to: None,
            alive,
        };
        self.udp_evicted += self.udp.insert(now, key, UdpKind::Outbound, flow) as u64;
        Detour::Taken
    }

    /// A published UDP port's new client: its datagrams and the container's answers go
    /// through the port's listening socket.
    pub(super) fn published_udp(
        &mut self,
        now: Instant,
        key: (SocketAddr, SocketAddr),
        socket: Arc<std::net::UdpSocket>,
        client: SocketAddr,
    ) {
        let flow = UdpFlow {
            socket,
            reply_to: Some(client),
            alive: Arc::new(AtomicBool::new(true)),
        };
        self.udp_evicted += self.udp.insert(now, key, UdpKind::Published, flow) as u64;
    }

    /// Sends a container's echo request to the outside through a host ICMP socket (an
    /// unprivileged ping socket, or the daemon's raw socket when those are not allowed and it
    /// has CAP_NET_RAW).
    pub(super) fn nat_icmp(&mut self, now: Instant, frame: &[u8]) -> Detour {
        if !self.nat {
            return Detour::Pass;
        }
        let Some(echo) = slice_echo_request(frame) else {
            return Detour::Pass;
        };
        let (src, dst) = (echo.src, echo.dst);
        // Link-local is the link's; an IPv4-mapped address is no ICMPv6 destination.
        let link_local = matches!(dst, IpAddr::V6(v6)
            if v6.is_unicast_link_local() || v6.to_ipv4_mapped().is_some());
        if self.gateway_ips.contains(&dst) || dst.is_multicast() || link_local {
            return Detour::Pass;
        }
        let key = (src, echo.id, dst);
        if let Some(flow) = self.icmp.touch(now, &key) {
            flow.send(&echo);
            return Detour::Taken;
        }
        if self.icmp.is_full_for(src) {
            self.icmp_refused += 1;
            return Detour::Taken;
        }
        if !self.policy.read().may_reach(dst) {
            // The host's loopback, or another vswitch network: dropped.
            return Detour::Taken;
        }
        let flow = match ping_socket(echo.dst) {
            Some(socket) => {
                let alive = self.receive(socket.clone(), ReceiveKind::Icmp { key }, echo.src_mac);
                IcmpFlow::Socket { socket, alive }
            }
            None => {
                let flow = EchoFlow {
                    gateway_mac: self.gateway_mac,
                    container_mac: echo.src_mac,
                    container: echo.src,
                    dst: echo.dst,
                    id: echo.id,
                };
                let raw = RawPinger::shared(dst.is_ipv6())
                    .and_then(|p| p.register(flow, key, self.injector.clone()));
                match raw {
                    Some(raw) => IcmpFlow::Raw(raw),
                    None => return Detour::Taken,
                }
            }
        };
        flow.send(&echo);
        let _ = self.icmp.insert(now, key, flow);
        Detour::Taken
    }

    /// Has the host side receive a new flow's answers; returns the flag that stops it.
    fn receive(
        &self,
        socket: Arc<std::net::UdpSocket>,
        kind: ReceiveKind,
        container_mac: [u8; 6],
    ) -> Arc<AtomicBool> {
        let alive = Arc::new(AtomicBool::new(true));
        let _ = self.nat_jobs.send(NatJob::Receive(FlowReceive {
            socket,
            kind,
            container_mac,
            gateway_mac: self.gateway_mac,
            alive: alive.clone(),
            injector: self.injector.clone(),
        }));
        alive
    }
}

/// An unprivileged ping socket (ICMP or ICMPv6) connected to `dst`, if the namespace allows
/// those (`net.ipv4.ping_group_range`, which governs both families).
fn ping_socket(dst: IpAddr) -> Option<Arc<std::net::UdpSocket>> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockProtocol, SockType, SockaddrIn, SockaddrIn6, connect, socket,
    };
    static REFUSED: AtomicBool = AtomicBool::new(false);
    if REFUSED.load(Ordering::Relaxed) {
        return None;
    }
    let (family, protocol) = match dst {
        IpAddr::V4(_) => (AddressFamily::Inet, SockProtocol::Icmp),
        IpAddr::V6(_) => (AddressFamily::Inet6, SockProtocol::IcmpV6),
    };
    let fd = match socket(
        family,
        SockType::Datagram,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        protocol,
    ) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::EACCES | nix::errno::Errno::EPERM) => {
            // The sysctl is set at boot or by an administrator: asking again per flow would
            // only cost a syscall each time.
            REFUSED.store(true, Ordering::Relaxed);
            return None;
        }
        Err(_) => return None,
    };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    match dst {
        IpAddr::V4(v4) => connect(raw, &SockaddrIn::from(std::net::SocketAddrV4::new(v4, 0))),
        IpAddr::V6(v6) => connect(
            raw,
            &SockaddrIn6::from(std::net::SocketAddrV6::new(v6, 0, 0, 0)),
        ),
    }
    .ok()?;
    // A datagram socket of another protocol: std's UdpSocket is only a wrapper over send/recv.
    Some(Arc::new(std::net::UdpSocket::from(fd)))
}
