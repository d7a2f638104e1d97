//! The datapath thread: its epoll loop over the ports and the command eventfd, switching, and
//! the commands of [`super::protocol`].

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use vswitch_nat::flows::{IcmpFlows, UdpFlows};
use vswitch_nat::frame::{link_local_beyond_link, slice_udp};
use vswitch_nat::{Gateway, TcpEvent};
use vswitch_switch::vnet::VNET_HDR_LEN;
use vswitch_switch::{Bridge, Config as BridgeConfig, Decision, MacAddr, PortGuard, PortId};

use super::busy_poll::BusyPoll;
use super::protocol::{Command, Commands, DNS_PORT, Event, Injector, tunnel_cost};
use super::services::{Detour, Services, StreamAnswer};
use super::tcp::TcpFlows;
use super::tunnel::TunnelPort;

mod report;
use super::{DatapathSpec, Links};

/// Frames read from one port before the loop looks at the others.
const BATCH: usize = 64;
/// Largest frame a vnet TAP hands over: a 64 KiB GSO frame plus Ethernet and virtio headers.
const FRAME_BUF: usize = VNET_HDR_LEN + 14 + 65_535 + 64;
const WAKE_TOKEN: u64 = u64::MAX;
/// Rounds of TCP events one flush takes at most (each round's servicing may raise a few
/// more); what is left waits for the next wake-up, which `Gateway::poll_timeout` makes
/// immediate.
const EVENT_ROUNDS: usize = 8;
const GATEWAY_NAME: &str = "(gateway)";
const TUNNEL_NAME: &str = "(tunnel)";
/// DNS over TCP on the virtual network: connections per network, and how long a client may take
/// to send a complete query.
const DNS_TCP_CONNS: usize = 32;
const DNS_TCP_IDLE: Duration = Duration::from_secs(5);

struct PortIo {
    fd: OwnedFd,
    endpoint_id: String,
    endpoint_name: String,
    /// The DNS scope key of the endpoint's namespace.
    namespace: String,
    addrs: Vec<IpAddr>,
}

/// Everything one network's datapath thread owns.
pub(super) struct Worker {
    network_id: String,
    network_name: String,
    nice: i32,
    busy_poll: BusyPoll,
    epoll: Epoll,
    wake: Arc<EventFd>,
    /// Shared with the senders (see `Commands`): cleared before each drain.
    armed: Arc<std::sync::atomic::AtomicBool>,
    commands: mpsc::Receiver<Command>,
    /// The sending half of `commands`, for the injectors this thread hands out.
    injector: Injector,
    /// The same, with a budget of its own, for packets from the tunnel: a VXLAN flood must not
    /// crowd out the network's DNS answers.
    tunnel_injector: Injector,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    bridge: Bridge,
    gateway: Gateway,
    gateway_port: PortId,
    /// DNS over UDP and UDP and ping NAT, ahead of the gateway's stack.
    services: Services,
    /// The host sides of the TCP flows the gateway terminates.
    tcp: TcpFlows,
    /// Indexed by `PortId::index()`; `None` for the gateway port and free slots.
    ports: Vec<Option<PortIo>>,
    /// Reused list of flood targets, so flooding allocates nothing.
    scratch: Vec<PortId>,
    /// An overlay network's way to the other hosts.
    tunnel: Option<TunnelPort>,
    running: bool,
}

impl Worker {
    /// A worker for `spec`'s network, and the queue that commands it.
    pub(super) fn new(spec: DatapathSpec, links: Links) -> io::Result<(Self, Commands)> {
        let DatapathSpec {
            network_id,
            network_name,
            gateway,
            nice,
            busy_poll,
            tunnel,
        } = spec;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let wake = Arc::new(EventFd::from_flags(
            EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
        )?);
        epoll.add(
            wake.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, WAKE_TOKEN),
        )?;
        let (tx, rx) = mpsc::channel();
        let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let commands = Commands::new(tx, wake.clone(), armed.clone());
        let now = Instant::now();
        // Frames longer than the network's MTU are dropped at the port they come in on.
        let mut bridge = Bridge::new(BridgeConfig {
            frame_offset: VNET_HDR_LEN,
            mtu: Some(gateway.mtu),
            ..BridgeConfig::default()
        });
        let gateway_port = bridge.add_port();
        // The gateway's MAC is its own for good: a container sending from it is dropped rather
        // than taking the others' traffic to the gateway (NAT, DNS) for itself.
        bridge.pin(now, MacAddr(gateway.mac), gateway_port);
        let gateway_ips: Vec<IpAddr> = gateway
            .ipv4
            .map(|(ip, _)| IpAddr::V4(ip))
            .into_iter()
            .chain(gateway.ipv6.map(|(ip, _)| IpAddr::V6(ip)))
            .collect();
        let mut gw = Gateway::new(&gateway, now).map_err(io::Error::other)?;
        if links.dns.is_some() {
            gw.enable_stream_service(now, DNS_PORT, DNS_TCP_CONNS, DNS_TCP_IDLE);
        }
        let tunnel = tunnel.map(|t| TunnelPort::new(bridge.add_port(), gateway.mtu, t));
        let mut ports = Vec::new();
        let top = tunnel
            .as_ref()
            .map_or(gateway_port, |t| t.port.max(gateway_port));
        ports.resize_with(top.index() + 1, || None);
        let injector = Injector::new(commands.clone());
        let tunnel_injector = Injector::new(commands.clone());
        let services = Services {
            network_id: network_id.clone(),
            dns: links.dns,
            nat_jobs: links.nat_jobs,
            policy: links.policy,
            injector: injector.clone(),
            gateway_mac: gateway.mac,
            gateway_ips,
            nat: gateway.nat,
            udp: UdpFlows::default(),
            icmp: IcmpFlows::default(),
            dns_cache: vswitch_dns::AnswerCache::default(),
            dns_local: [0; 16],
            dns_refused: 0,
            udp_evicted: 0,
            icmp_refused: 0,
        };
        let worker = Self {
            network_id,
            network_name,
            nice,
            busy_poll: BusyPoll::new(busy_poll),
            epoll,
            wake,
            armed,
            commands: rx,
            injector,
            tunnel_injector,
            events: links.events,
            bridge,
            gateway: gw,
            gateway_port,
            services,
            tcp: TcpFlows::default(),
            ports,
            scratch: Vec::new(),
            tunnel,
            running: true,
        };
        Ok((worker, commands))
    }

    pub(super) fn injector(&self) -> Injector {
        self.injector.clone()
    }

    pub(super) fn tunnel_injector(&self) -> Injector {
        self.tunnel_injector.clone()
    }

    /// Runs the worker on a thread of its own until [`Command::Shutdown`].
    pub(super) fn spawn(mut self) -> io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("dp-{}", self.network_name))
            .spawn(move || {
                // Forwarding ahead of the containers' threads, as the kernel's softirqs would:
                // on a busy machine a datapath that waits behind the senders it serves slows
                // them all down (measured in ARCHITECTURE.md).
                if self.nice != 0
                    && let Err(e) = vswitch_netdev::set_thread_nice(self.nice)
                {
                    tracing::debug!(nice = self.nice, error = %e, "datapath keeps the default priority");
                }
                self.run();
            })
    }

    fn run(&mut self) {
        tracing::debug!(network = %self.network_name, "datapath started");
        let mut buf = vec![0u8; FRAME_BUF];
        let mut events = vec![EpollEvent::empty(); 64];
        while self.running {
            let now = Instant::now();
            let spinning = self.busy_poll.spinning(now);
            let timeout = if spinning {
                EpollTimeout::ZERO
            } else {
                self.next_timeout(now)
            };
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(Errno::EINTR) => 0,
                Err(e) => {
                    tracing::error!(network = %self.network_name, error = %e, "epoll_wait failed; datapath stops");
                    return;
                }
            };
            for ev in &events[..n] {
                let token = ev.data();
                if token == WAKE_TOKEN {
                    let _ = self.wake.read();
                    self.armed.store(false, std::sync::atomic::Ordering::SeqCst);
                    self.drain_commands();
                    continue;
                }
                if let Some(flow) = TcpFlows::token_flow(token) {
                    self.tcp
                        .ready(&mut self.gateway, Instant::now(), flow, ev.events());
                    continue;
                }
                let Some(port) = usize::try_from(token)
                    .ok()
                    .and_then(|i| self.bridge.port_at(i))
                else {
                    continue;
                };
                if ev
                    .events()
                    .intersects(EpollFlags::EPOLLERR | EpollFlags::EPOLLHUP)
                {
                    self.port_gone(port);
                    continue;
                }
                self.read_port(port, &mut buf);
            }
            if n == 0 && spinning {
                // Nothing yet: poll again, leaving timers for when the thread goes to sleep
                // (their deadlines are whole milliseconds, the spin a few microseconds). Yield
                // first: the process whose answer we wait for may have been woken on this very
                // CPU, and spinning over it would delay the answer we spin for.
                std::thread::yield_now();
                continue;
            }
            let now = Instant::now();
            if n > 0 {
                // The window opens when the frames have been handled, not when the wait began:
                // after a long sleep that would already be over, and the answer to the frame
                // just forwarded would have to wake the thread again.
                self.busy_poll.traffic(now);
            }
            self.bridge.handle_timeout(now);
            self.gateway.handle_timeout(now);
            self.services.udp.sweep(now);
            self.services.icmp.sweep(now);
            self.flush_gateway(now);
        }
        tracing::debug!(network = %self.network_name, "datapath stopped");
    }

    fn next_timeout(&mut self, now: Instant) -> EpollTimeout {
        let due = [
            self.bridge.poll_timeout(),
            self.gateway.poll_timeout(now),
            self.services.udp.next_sweep(),
            self.services.icmp.next_sweep(),
        ]
        .into_iter()
        .flatten()
        .min();
        match due {
            None => EpollTimeout::NONE,
            Some(t) => {
                let wait = t.saturating_duration_since(now);
                // Round up to whole milliseconds so we never wake just before the deadline.
                let ms = wait.as_micros().div_ceil(1000).min(60_000) as u16;
                EpollTimeout::from(ms)
            }
        }
    }

    fn read_port(&mut self, port: PortId, buf: &mut [u8]) {
        for _ in 0..BATCH {
            let Some(Some(io)) = self.ports.get(port.index()) else {
                return;
            };
            match nix::unistd::read(&io.fd, buf) {
                Ok(0) => return,
                Ok(n) => {
                    let now = Instant::now();
                    self.switch(now, port, &buf[..n]);
                    self.flush_gateway(now);
                }
                Err(Errno::EAGAIN) => return,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    // EBADFD (device gone) and friends: the port is dead.
                    tracing::debug!(network = %self.network_name, error = %e, "read failed");
                    self.port_gone(port);
                    return;
                }
            }
        }
    }

    pub(super) fn switch(&mut self, now: Instant, ingress: PortId, frame: &[u8]) {
        match self.bridge.handle_frame(now, ingress, frame) {
            Decision::Forward(p) => self.deliver(now, ingress, p, frame),
            Decision::Flood => {
                let mut targets = std::mem::take(&mut self.scratch);
                targets.clear();
                targets.extend(self.bridge.flood_ports(ingress));
                for &p in &targets {
                    self.deliver(now, ingress, p, frame);
                }
                self.scratch = targets;
            }
            Decision::Drop(_) => {}
        }
    }

    fn deliver(&mut self, now: Instant, ingress: PortId, port: PortId, frame: &[u8]) {
        if port == self.gateway_port {
            if link_local_beyond_link(frame) {
                return;
            }
            // DNS answers what the namespace behind the ingress port may see, whatever source
            // address the query claims.
            let namespace = match self.ports.get(ingress.index()) {
                Some(Some(io)) => Some(io.namespace.as_str()),
                // Other hosts' containers see this network's names and no more, whatever
                // source address they claim.
                _ if self.tunnel.as_ref().is_some_and(|t| t.port == ingress) => Some(TUNNEL_NAME),
                _ => None,
            };
            let detour = match slice_udp(frame) {
                Some(u) => match self.services.dns_udp(&u, namespace) {
                    Detour::Pass => self.services.nat_udp(now, &u),
                    taken => taken,
                },
                None => self.services.nat_icmp(now, frame),
            };
            match detour {
                Detour::Pass => self.gateway.handle_frame(now, frame),
                Detour::Taken => {}
                Detour::Send(reply) => self.switch(now, self.gateway_port, &reply),
            }
            return;
        }
        if let Some(t) = self.tunnel.as_mut()
            && t.port == port
        {
            t.send(now, ingress, frame);
            return;
        }
        let Some(Some(io)) = self.ports.get(port.index()) else {
            return;
        };
        match nix::unistd::write(&io.fd, frame) {
            Ok(n) if n == frame.len() => {}
            _ => self.bridge.note_tx_failed(port, frame.len()),
        }
    }

    /// Answers DNS-over-TCP queries the gateway collected, hands new outbound TCP flows to the
    /// host side, services flows with activity, then sends what the gateway emitted into the
    /// network, as frames from the gateway port.
    fn flush_gateway(&mut self, now: Instant) {
        for m in self.gateway.poll_stream_messages() {
            let conn = m.conn;
            match self.services.dns_stream(m) {
                StreamAnswer::Reply(answer) => self.gateway.stream_reply(now, conn, &answer),
                StreamAnswer::Forwarded => {}
                StreamAnswer::Unanswered => self.gateway.stream_unanswered(now, conn),
            }
        }
        // Servicing a flow polls the gateway, which may raise more events (a flow drained of
        // its last bytes closes): take those too, or they would wait for the next wake-up.
        for _ in 0..EVENT_ROUNDS {
            let events = self.gateway.poll_tcp_events();
            if events.is_empty() {
                break;
            }
            for ev in events {
                match ev {
                    TcpEvent::Syn { flow, src, dst } => self.services.dial(flow, src, dst),
                    TcpEvent::Activity(flow) => self.tcp.service(&mut self.gateway, now, flow),
                    TcpEvent::Closed { flow, clean } => self.tcp.closed(flow, clean),
                }
            }
        }
        while let Some(frame) = self.gateway.poll_transmit() {
            self.switch(now, self.gateway_port, &frame);
        }
    }

    fn port_gone(&mut self, port: PortId) {
        let Some(io) = self.unplug(port) else { return };
        tracing::info!(network = %self.network_name, endpoint = %io.endpoint_name, "endpoint's device is gone");
        let _ = self.events.send(Event::PortGone {
            network_id: self.network_id.clone(),
            endpoint_id: io.endpoint_id,
        });
    }

    fn unplug(&mut self, port: PortId) -> Option<PortIo> {
        let io = self.ports.get_mut(port.index())?.take()?;
        let _ = self.epoll.delete(io.fd.as_fd());
        // Its TCP flows end with it. Their RSTs leave while its MAC is still pinned to the
        // port, which has no device any more: dropped here, never flooded to the others.
        let now = Instant::now();
        for &a in &io.addrs {
            self.gateway.tcp_abort_container(now, a);
        }
        self.flush_gateway(now);
        self.bridge.remove_port(port);
        if let Some(t) = self.tunnel.as_mut() {
            t.port_gone(port);
        }
        Some(io)
    }

    /// Plugs `io` in as a new port, with the endpoint's MAC pinned to it.
    fn add_port(
        &mut self,
        io: PortIo,
        mac: [u8; 6],
        guard: Option<PortGuard>,
    ) -> io::Result<PortId> {
        let port = self.bridge.add_port();
        self.bridge.pin(Instant::now(), MacAddr(mac), port);
        if let Some(g) = guard {
            self.bridge.guard(port, g);
        }
        let token = port.index() as u64;
        if let Err(e) = self
            .epoll
            .add(io.fd.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, token))
        {
            self.bridge.remove_port(port);
            return Err(e.into());
        }
        if self.ports.len() <= port.index() {
            self.ports.resize_with(port.index() + 1, || None);
        }
        self.ports[port.index()] = Some(io);
        Ok(port)
    }

    fn drain_commands(&mut self) {
        while let Ok(cmd) = self.commands.try_recv() {
            self.command(cmd);
        }
    }

    fn command(&mut self, cmd: Command) {
        let now = Instant::now();
        match cmd {
            Command::AddPort { fd, spec, reply } => {
                let io = PortIo {
                    fd,
                    endpoint_id: spec.endpoint_id,
                    endpoint_name: spec.endpoint_name,
                    namespace: spec.namespace,
                    addrs: spec.addrs,
                };
                let r = self.add_port(io, spec.mac, spec.guard);
                let _ = reply.send(r);
                return;
            }
            Command::RemovePort { port, reply } => {
                // If the control plane is gone, the fd is closed here after all.
                let _ = reply.send(self.unplug(port).map(|io| io.fd));
                return;
            }
            Command::Fdb(reply) => {
                let _ = reply.send(self.fdb_rows(now));
                return;
            }
            Command::Stats(reply) => {
                let _ = reply.send(self.stats());
                return;
            }
            Command::InjectFrame(frame) => {
                self.injector.taken(frame.len());
                self.switch(now, self.gateway_port, &frame);
                return;
            }
            Command::TunnelIn(packets) => {
                self.tunnel_injector.taken(tunnel_cost(&packets));
                let Some(t) = self.tunnel.as_mut() else {
                    return;
                };
                let port = t.port;
                let frames = t.receive(now, &packets);
                for frame in frames.iter() {
                    self.switch(now, port, frame);
                }
                if let Some(t) = self.tunnel.as_mut() {
                    t.recycle(frames);
                }
                return;
            }
            Command::TunnelPeers(peers) => {
                if let Some(t) = self.tunnel.as_mut() {
                    t.set_peers(peers);
                }
                return;
            }
            Command::TunnelMembers(members) => {
                if let Some(t) = self.tunnel.as_mut() {
                    t.set_members(members);
                }
                return;
            }
            Command::TunnelRemote { mac, host } => {
                if let Some(t) = self.tunnel.as_mut() {
                    let mac = MacAddr(mac);
                    match host {
                        Some(h) => {
                            t.set_remote(mac, h);
                            self.bridge.pin(now, mac, t.port);
                        }
                        None => {
                            t.remove_remote(mac);
                            self.bridge.unpin(mac, t.port);
                        }
                    }
                }
                return;
            }
            Command::StreamUnanswered { conn } => self.gateway.stream_unanswered(now, conn),
            Command::StreamReply { conn, answer } => {
                self.injector.taken(answer.len());
                self.gateway.stream_reply(now, conn, &answer);
            }
            Command::NatOpen {
                local,
                remote,
                host,
                reply,
            } => {
                let flow =
                    self.tcp
                        .open(&self.epoll, &mut self.gateway, now, (local, remote), host);
                let _ = reply.send(flow);
            }
            Command::NatDialed { flow, host } => {
                self.tcp
                    .dialed(&self.epoll, &mut self.gateway, now, flow, host)
            }
            Command::NatAbort { flow } => self.tcp.abort(&mut self.gateway, now, flow),
            Command::IcmpIn { key, frame } => {
                self.injector.taken(frame.len());
                if self.services.icmp.touch(now, &key).is_some() {
                    self.switch(now, self.gateway_port, &frame);
                }
                return;
            }
            Command::UdpIn {
                key,
                frame,
                published,
            } => {
                self.injector.taken(frame.len());
                if self.services.udp.touch(now, &key).is_none() {
                    // A late datagram of an expired outbound flow is dropped; a published
                    // port's new client becomes a flow.
                    let Some((socket, client)) = published else {
                        return;
                    };
                    self.services.published_udp(now, key, socket, client);
                }
                self.switch(now, self.gateway_port, &frame);
                return;
            }
            Command::Shutdown => {
                self.running = false;
                return;
            }
        }
        self.flush_gateway(now);
    }
}
