//! The datapath: one thread per network that moves frames between that network's TAP fds, its
//! [`Bridge`] and its [`Gateway`].
//!
//! Why a dedicated thread with its own epoll rather than tokio tasks: the bridge and the gateway
//! are plain values owned by exactly one thread, so the hot path takes no lock, and a frame costs
//! one `read` and one `write` (plus an `epoll_wait` per batch), with no task wake-ups or
//! cross-thread hand-offs. epoll reports only ready fds, so hundreds of idle ports cost nothing,
//! and an idle network sleeps in `epoll_wait` with no timer unless the bridge or the gateway has
//! one due. Ports are read in batches of at most [`BATCH`] frames per readiness report, so one
//! busy port cannot starve the others.
//!
//! The control plane talks to the thread through a command queue plus an eventfd that wakes it,
//! and hears back through an unbounded channel of [`Event`]s (for example "this endpoint's
//! namespace is gone").

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use etherparse::{LinkSlice, NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tokio::sync::{OwnedSemaphorePermit, oneshot};
use vswitch_dns::upstream::Forwarder;
use vswitch_dns::{Asker, Outcome, Responder, Transport};
use vswitch_nat::{FlowId, FlowState, Gateway, GatewayConfig, TcpEvent};

use super::nat::{FlowChannel, FlowReceive, NatJob, ReceiveKind};
use vswitch_switch::vnet::{VNET_HDR_LEN, VnetHdr};
use vswitch_switch::{Bridge, Config as BridgeConfig, Decision, PortId};

use crate::api::{FdbRow, NetworkStats, PortStatsRow};

/// Frames read from one port before the loop looks at the others.
const BATCH: usize = 64;
/// Largest frame a vnet TAP hands over: a 64 KiB GSO frame plus Ethernet and virtio headers.
const FRAME_BUF: usize = VNET_HDR_LEN + 14 + 65_535 + 64;
const WAKE_TOKEN: u64 = u64::MAX;
const GATEWAY_NAME: &str = "(gateway)";
/// Size of the virtio-net header in front of every frame this datapath moves.
pub const VNET_HDR: usize = VNET_HDR_LEN;
const DNS_PORT: u16 = 53;
/// DNS over TCP on the virtual network: connections per network, and how long a client may take
/// to send a complete query.
const DNS_TCP_CONNS: usize = 32;
const DNS_TCP_IDLE: Duration = Duration::from_secs(5);

/// The embedded DNS server as the datapath sees it: queries to the gateway's port 53 are
/// answered inline from the responder; what it cannot answer goes to the forwarder task.
#[derive(Clone)]
pub struct DnsHook {
    pub responder: Arc<Responder>,
    pub forwarder: Forwarder,
    pub jobs: tokio::sync::mpsc::UnboundedSender<ForwardJob>,
}

/// A query to relay upstream; the answer goes back through `injector`.
pub struct ForwardJob {
    pub query: Vec<u8>,
    pub reply: ReplyTo,
    pub injector: Injector,
    /// Held until the answer is delivered: bounds the forwards in flight.
    pub permit: OwnedSemaphorePermit,
}

/// Where a forwarded answer goes.
#[derive(Debug, Clone)]
pub enum ReplyTo {
    /// As a UDP datagram from the gateway to the client that asked.
    Udp(UdpPeer),
    /// On the gateway's TCP connection with this id.
    Tcp(u64),
}

impl ReplyTo {
    pub fn is_tcp(&self) -> bool {
        matches!(self, ReplyTo::Tcp(_))
    }
}

#[derive(Debug, Clone)]
pub struct UdpPeer {
    client_mac: [u8; 6],
    client_ip: IpAddr,
    client_port: u16,
    gw_mac: [u8; 6],
    gw_ip: IpAddr,
}

/// Hands frames and stream answers to a datapath thread from elsewhere (the forwarder task).
#[derive(Clone)]
pub struct Injector {
    commands: mpsc::Sender<Command>,
    wake: Arc<EventFd>,
    backlog: Arc<Backlog>,
}

/// Frames from host sockets (UDP datagrams, echo replies, DNS answers) waiting for the datapath.
/// Anyone on the network can send them, faster than the datapath takes them: past
/// [`MAX_BACKLOG_BYTES`] they are dropped and counted, as a NIC drops on a full ring.
#[derive(Default)]
struct Backlog {
    bytes: std::sync::atomic::AtomicUsize,
    dropped: std::sync::atomic::AtomicU64,
}

/// Bytes of frames from host sockets queued for one datapath at most.
const MAX_BACKLOG_BYTES: usize = 4 * 1024 * 1024;

/// Test double: an injector with no datapath behind it, whose commands a test reads back.
#[cfg(test)]
pub(crate) struct Captured(mpsc::Receiver<Command>);

#[cfg(test)]
impl Captured {
    /// The next chunk of host data a flow handed over, waiting up to `timeout`; `None` if none
    /// came (or something else did).
    pub fn next_data(&self, timeout: Duration) -> Option<Vec<u8>> {
        match self.0.recv_timeout(timeout) {
            Ok(Command::NatHostData { data, .. }) => Some(data),
            _ => None,
        }
    }
}

impl Injector {
    #[cfg(test)]
    pub(crate) fn capturing() -> io::Result<(Self, Captured)> {
        let (commands, rx) = mpsc::channel();
        let wake = Arc::new(EventFd::from_flags(EfdFlags::EFD_NONBLOCK)?);
        let backlog = Arc::default();
        Ok((
            Self {
                commands,
                wake,
                backlog,
            },
            Captured(rx),
        ))
    }

    fn send(&self, cmd: Command) -> bool {
        if self.commands.send(cmd).is_err() {
            return false;
        }
        let _ = self.wake.write(1);
        true
    }

    /// Queues a command carrying a frame of `len` bytes, or drops it (counted) when the
    /// backlog is full. False only if the datapath is gone.
    fn send_frame(&self, len: usize, cmd: Command) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if self.backlog.bytes.fetch_add(len, Relaxed) + len > MAX_BACKLOG_BYTES {
            self.backlog.bytes.fetch_sub(len, Relaxed);
            self.backlog.dropped.fetch_add(1, Relaxed);
            return true;
        }
        if self.send(cmd) {
            return true;
        }
        self.backlog.bytes.fetch_sub(len, Relaxed);
        false
    }

    /// The datapath took a frame of `len` bytes off the backlog.
    fn taken(&self, len: usize) {
        self.backlog
            .bytes
            .fetch_sub(len, std::sync::atomic::Ordering::Relaxed);
    }

    /// Frames from host sockets dropped so far because the backlog was full.
    fn dropped(&self) -> u64 {
        self.backlog
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Asks the datapath to open a flow to a container; `None` if it cannot (table full, gone).
    pub async fn nat_open(
        &self,
        local: std::net::SocketAddr,
        remote: std::net::SocketAddr,
        channel: FlowChannel,
    ) -> Option<FlowId> {
        let (reply, rx) = oneshot::channel();
        if !self.send(Command::NatOpen {
            local,
            remote,
            channel,
            reply,
        }) {
            return None;
        }
        rx.await.ok().flatten()
    }

    pub fn nat_dialed(&self, flow: FlowId, channel: Option<FlowChannel>) {
        self.send(Command::NatDialed { flow, channel });
    }

    pub fn host_data(&self, flow: FlowId, data: Vec<u8>) -> bool {
        self.send(Command::NatHostData { flow, data })
    }

    pub fn host_eof(&self, flow: FlowId) {
        self.send(Command::NatHostEof { flow });
    }

    pub fn host_reset(&self, flow: FlowId) {
        self.send(Command::NatHostReset { flow });
    }

    pub fn resume(&self, flow: FlowId) {
        self.send(Command::NatResume { flow });
    }

    /// Hands an echo reply (as a frame) for the ping flow `key` to the datapath.
    pub fn icmp_in(&self, key: (IpAddr, u16, IpAddr), frame: Vec<u8>) -> bool {
        self.send_frame(frame.len(), Command::IcmpIn { key, frame })
    }

    /// Hands a datagram for a container to the datapath. `key` is (container, peer as the
    /// container sees it); `published` registers the flow of a published port.
    pub fn udp_in(
        &self,
        key: (SocketAddr, SocketAddr),
        frame: Vec<u8>,
        published: Option<(Arc<std::net::UdpSocket>, SocketAddr)>,
    ) -> bool {
        self.send_frame(
            frame.len(),
            Command::UdpIn {
                key,
                frame,
                published,
            },
        )
    }

    /// Delivers a forwarded answer to whoever asked.
    pub fn deliver(&self, to: ReplyTo, answer: Vec<u8>) {
        match to {
            ReplyTo::Udp(peer) => {
                if let Some(frame) = udp_frame(&peer, &answer) {
                    self.send_frame(frame.len(), Command::InjectFrame(frame));
                }
            }
            ReplyTo::Tcp(conn) => {
                self.send(Command::StreamReply { conn, answer });
            }
        }
    }
}

/// A UDP datagram from the gateway's port 53 to the client, as a frame with a zero vnet header.
fn udp_frame(p: &UdpPeer, payload: &[u8]) -> Option<Vec<u8>> {
    build_udp_frame(
        p.gw_mac,
        p.client_mac,
        SocketAddr::new(p.gw_ip, DNS_PORT),
        SocketAddr::new(p.client_ip, p.client_port),
        payload,
    )
}

/// A UDP datagram as a frame with a zero vnet header (complete checksums).
pub fn build_udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
) -> Option<Vec<u8>> {
    let eth = PacketBuilder::ethernet2(src_mac, dst_mac);
    let mut out = Vec::with_capacity(VNET_HDR_LEN + 62 + payload.len());
    out.resize(VNET_HDR_LEN, 0);
    let r = match (src.ip(), dst.ip()) {
        (IpAddr::V4(a), IpAddr::V4(b)) => eth
            .ipv4(a.octets(), b.octets(), 64)
            .udp(src.port(), dst.port())
            .write(&mut out, payload),
        (IpAddr::V6(a), IpAddr::V6(b)) => eth
            .ipv6(a.octets(), b.octets(), 64)
            .udp(src.port(), dst.port())
            .write(&mut out, payload),
        _ => return None,
    };
    r.ok().map(|()| out)
}

/// A UDP datagram in a frame from a container, sliced once (etherparse's checked views).
struct UdpView<'a> {
    src_mac: [u8; 6],
    src: SocketAddr,
    dst: SocketAddr,
    payload: &'a [u8],
}

/// The UDP datagram in `frame`, unless it is something else (or a GSO frame).
fn slice_udp(frame: &[u8]) -> Option<UdpView<'_>> {
    if VnetHdr::parse(frame).is_none_or(|h| h.is_gso()) {
        return None;
    }
    let p = SlicedPacket::from_ethernet(frame.get(VNET_HDR_LEN..)?).ok()?;
    let Some(LinkSlice::Ethernet2(eth)) = &p.link else {
        return None;
    };
    let (src_ip, dst_ip) = match &p.net {
        Some(NetSlice::Ipv4(ip)) => (
            IpAddr::V4(ip.header().source_addr()),
            IpAddr::V4(ip.header().destination_addr()),
        ),
        Some(NetSlice::Ipv6(ip)) => (
            IpAddr::V6(ip.header().source_addr()),
            IpAddr::V6(ip.header().destination_addr()),
        ),
        _ => return None,
    };
    let Some(TransportSlice::Udp(udp)) = &p.transport else {
        return None;
    };
    Some(UdpView {
        src_mac: eth.source(),
        src: SocketAddr::new(src_ip, udp.source_port()),
        dst: SocketAddr::new(dst_ip, udp.destination_port()),
        payload: udp.payload(),
    })
}

/// Most UDP flows per network, and how long an idle one lives (Docker's conntrack keeps
/// unreplied UDP 30 s and replied 120 s; one minute for both is between).
const MAX_UDP_FLOWS: usize = 4096;
/// Each kind of UDP flow, published (a client from anywhere) and outbound (a container's),
/// gets half of the table, and a new flow evicts the one of its kind idle longest: a peer
/// spraying source ports at a published port can neither lock containers out of the outside
/// nor shut out the published port's other clients for a minute.
const MAX_UDP_FLOWS_OF_A_KIND: usize = MAX_UDP_FLOWS / 2;
const UDP_IDLE: Duration = Duration::from_secs(60);
const ICMP_IDLE: Duration = Duration::from_secs(30);

/// An outbound ping conversation: (container address, echo id, destination).
type IcmpKey = (IpAddr, u16, IpAddr);

/// Echo requests of one container ping to one destination, carried by a host ICMP socket.
struct IcmpFlow {
    socket: Arc<std::net::UdpSocket>,
    last: Instant,
    alive: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for IcmpFlow {
    fn drop(&mut self) {
        self.alive
            .store(false, std::sync::atomic::Ordering::Release);
    }
}

/// A UDP conversation between a container address and a peer, carried by a host socket.
struct UdpFlow {
    socket: Arc<std::net::UdpSocket>,
    /// For published ports: the real client (the socket is the shared listener). `None` for
    /// outbound flows, whose socket is connected to the destination.
    reply_to: Option<SocketAddr>,
    last: Instant,
    alive: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for UdpFlow {
    fn drop(&mut self) {
        self.alive
            .store(false, std::sync::atomic::Ordering::Release);
    }
}

/// Something the datapath tells the control plane.
#[derive(Debug)]
pub enum Event {
    /// The TAP of this endpoint reported an error: its device is gone (somebody deleted the
    /// interface). The port has been removed already.
    PortGone {
        network_id: String,
        endpoint_id: String,
    },
    /// What an endpoint was attached through is gone: its process exited, or its namespace
    /// file was removed (see `daemon::watch`). The port is still plugged.
    TargetGone { endpoint_id: String },
}

enum Command {
    AddPort {
        fd: OwnedFd,
        endpoint_id: String,
        endpoint_name: String,
        /// The endpoint's assigned MAC, pinned to its port.
        mac: [u8; 6],
        reply: oneshot::Sender<io::Result<PortId>>,
    },
    RemovePort {
        port: PortId,
        /// Gets the port's fd back: closing a TAP unregisters its device, which takes the kernel
        /// tens of milliseconds (RCU grace periods) that must not stall the datapath.
        reply: oneshot::Sender<Option<OwnedFd>>,
    },
    Fdb(oneshot::Sender<Vec<FdbRow>>),
    Stats(oneshot::Sender<NetworkStats>),
    /// A frame from the gateway (a forwarded DNS answer) to switch into the network.
    InjectFrame(Vec<u8>),
    /// A forwarded answer for a DNS-over-TCP connection of the gateway.
    StreamReply {
        conn: u64,
        answer: Vec<u8>,
    },
    /// Open a TCP connection to a container for a published port.
    NatOpen {
        local: std::net::SocketAddr,
        remote: std::net::SocketAddr,
        channel: FlowChannel,
        reply: oneshot::Sender<Option<FlowId>>,
    },
    /// The outcome of dialling an outbound destination: a channel to splice, or refusal.
    NatDialed {
        flow: FlowId,
        channel: Option<FlowChannel>,
    },
    /// Bytes from the host side of a flow (credits for them were taken).
    NatHostData {
        flow: FlowId,
        data: Vec<u8>,
    },
    /// The host side closed its sending half.
    NatHostEof {
        flow: FlowId,
    },
    /// The host side failed or reset: reset the container side.
    NatHostReset {
        flow: FlowId,
    },
    /// The host side drained its queue: reading from the container may resume.
    NatResume {
        flow: FlowId,
    },
    /// A datagram from the host side of a UDP flow, as a frame ready for the container.
    UdpIn {
        key: (SocketAddr, SocketAddr),
        frame: Vec<u8>,
        /// For published ports, the flow to create if it is new (listener socket, client).
        published: Option<(Arc<std::net::UdpSocket>, SocketAddr)>,
    },
    /// An echo reply for a container's ping, as a frame.
    IcmpIn {
        key: IcmpKey,
        frame: Vec<u8>,
    },
    Shutdown,
}

/// The control plane's handle on one network's datapath thread.
pub struct Datapath {
    commands: mpsc::Sender<Command>,
    wake: Arc<EventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
    injector: Injector,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath").finish_non_exhaustive()
    }
}

/// What a datapath is for: its network, its gateway, its thread's nice value and how long it
/// busy-polls after traffic.
pub struct DatapathSpec {
    pub network_id: String,
    pub network_name: String,
    pub gateway: GatewayConfig,
    pub nice: i32,
    pub busy_poll: Duration,
}

/// Busy-polling after traffic: for `window` after the last event the thread polls epoll
/// without sleeping, so the next frame of a conversation finds it awake. Going to sleep and
/// being woken costs a context switch on each side and, on an idle CPU of a VM, an IPI to a
/// halted vCPU: tens of microseconds per frame that a request/response exchange pays every
/// time. The kernel's `net.core.busy_poll` makes the same trade. An idle network still sleeps.
#[derive(Debug, Clone, Copy)]
struct BusyPoll {
    window: Duration,
    last_traffic: Option<Instant>,
}

impl BusyPoll {
    fn new(window: Duration) -> Self {
        Self {
            window,
            last_traffic: None,
        }
    }

    /// Whether the thread should poll rather than sleep at `now`.
    fn spinning(&self, now: Instant) -> bool {
        !self.window.is_zero()
            && self
                .last_traffic
                .is_some_and(|t| now.saturating_duration_since(t) < self.window)
    }

    fn traffic(&mut self, now: Instant) {
        self.last_traffic = Some(now);
    }
}

impl Datapath {
    /// Starts the thread for network `spec.network_id`.
    pub fn start(
        spec: DatapathSpec,
        dns: Option<DnsHook>,
        nat_jobs: tokio::sync::mpsc::UnboundedSender<NatJob>,
        policy: super::nat::SharedPolicy,
        events: tokio::sync::mpsc::UnboundedSender<Event>,
    ) -> io::Result<Self> {
        let DatapathSpec {
            network_id,
            network_name,
            gateway,
            nice,
            busy_poll,
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
        let now = Instant::now();
        let mut bridge = Bridge::new(BridgeConfig {
            frame_offset: VNET_HDR_LEN,
            ..BridgeConfig::default()
        });
        let gateway_port = bridge.add_port();
        // The gateway's MAC is its own for good: a container sending from it is dropped rather
        // than taking the others' traffic to the gateway (NAT, DNS) for itself.
        bridge.pin(now, vswitch_switch::MacAddr(gateway.mac), gateway_port);
        let mut ports = Vec::new();
        ports.resize_with(gateway_port.index() + 1, || None);
        let gateway_ips: Vec<IpAddr> = gateway
            .ipv4
            .map(|(ip, _)| IpAddr::V4(ip))
            .into_iter()
            .chain(gateway.ipv6.map(|(ip, _)| IpAddr::V6(ip)))
            .collect();
        let mut gw = Gateway::new(&gateway, now);
        if dns.is_some() {
            gw.enable_stream_service(now, DNS_PORT, DNS_TCP_CONNS, DNS_TCP_IDLE);
        }
        let injector = Injector {
            commands: tx.clone(),
            wake: wake.clone(),
            backlog: Arc::default(),
        };
        let mut worker = Worker {
            network_id,
            network_name: network_name.clone(),
            epoll,
            wake: wake.clone(),
            commands: rx,
            events,
            bridge,
            gateway: gw,
            gateway_mac: gateway.mac,
            gateway_ips,
            dns,
            injector: injector.clone(),
            nat_jobs,
            policy,
            flows: std::collections::HashMap::new(),
            udp: std::collections::HashMap::new(),
            published_udp: 0,
            icmp: std::collections::HashMap::new(),
            next_udp_sweep: None,
            nat_enabled: gateway.nat,
            gateway_port,
            ports,
            scratch: Vec::new(),
            busy_poll: BusyPoll::new(busy_poll),
            running: true,
        };
        let thread = std::thread::Builder::new()
            .name(format!("dp-{network_name}"))
            .spawn(move || {
                // Forwarding ahead of the containers' threads, as the kernel's softirqs would:
                // on a busy machine a datapath that waits behind the senders it serves slows
                // them all down (measured in ARCHITECTURE.md).
                if nice != 0
                    && let Err(e) = vswitch_netdev::set_thread_nice(nice)
                {
                    tracing::debug!(nice, error = %e, "datapath keeps the default priority");
                }
                worker.run()
            })?;
        Ok(Self {
            commands: tx,
            wake,
            thread: Some(thread),
            injector,
        })
    }

    /// A handle for tokio tasks to feed this datapath (published ports, NAT, DNS answers).
    pub fn injector(&self) -> Injector {
        self.injector.clone()
    }

    fn send(&self, cmd: Command) -> io::Result<()> {
        self.commands
            .send(cmd)
            .map_err(|_| io::Error::other("datapath thread has stopped"))?;
        self.wake.write(1)?;
        Ok(())
    }

    /// Plugs a TAP fd into the network. The fd must be non-blocking. The endpoint's assigned
    /// `mac` is pinned to the port: no other container can take it over by sending from it,
    /// and frames to it are never flooded, however full the table.
    pub async fn add_port(
        &self,
        fd: OwnedFd,
        endpoint_id: &str,
        endpoint_name: &str,
        mac: [u8; 6],
    ) -> io::Result<PortId> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::AddPort {
            fd,
            endpoint_id: endpoint_id.to_owned(),
            endpoint_name: endpoint_name.to_owned(),
            mac,
            reply,
        })?;
        rx.await
            .map_err(|_| io::Error::other("datapath thread has stopped"))?
    }

    /// Unplugs a port and closes its fd, which removes the TAP device; returns once it is gone.
    /// The close runs on a blocking-pool thread, not on the datapath's.
    pub async fn remove_port(&self, port: PortId) -> io::Result<()> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::RemovePort { port, reply })?;
        let fd = rx
            .await
            .map_err(|_| io::Error::other("datapath thread has stopped"))?;
        if let Some(fd) = fd {
            tokio::task::spawn_blocking(move || drop(fd))
                .await
                .map_err(io::Error::other)?;
        }
        Ok(())
    }

    pub async fn fdb(&self) -> io::Result<Vec<FdbRow>> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Fdb(reply))?;
        rx.await
            .map_err(|_| io::Error::other("datapath thread has stopped"))
    }

    pub async fn stats(&self) -> io::Result<NetworkStats> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Stats(reply))?;
        rx.await
            .map_err(|_| io::Error::other("datapath thread has stopped"))
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        let _ = self.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The datapath's half of a TCP flow's splice.
struct FlowIo {
    /// Chunks for the host side; `None` once the container closed its sending half.
    to_host: Option<tokio::sync::mpsc::Sender<Vec<u8>>>,
    /// A chunk read from the container that the host side had no room for yet.
    stash: Option<Vec<u8>>,
    /// Host bytes waiting for room in the socket, and how much of the first is sent.
    from_host: std::collections::VecDeque<Vec<u8>>,
    offset: usize,
    host_eof: bool,
    fin_sent: bool,
    shared: Arc<super::nat::FlowShared>,
}

impl FlowIo {
    fn new(ch: FlowChannel) -> Self {
        Self {
            to_host: Some(ch.to_host),
            stash: None,
            from_host: std::collections::VecDeque::new(),
            offset: 0,
            host_eof: false,
            fin_sent: false,
            shared: ch.shared,
        }
    }
}

struct PortIo {
    fd: OwnedFd,
    endpoint_id: String,
    endpoint_name: String,
}

struct Worker {
    busy_poll: BusyPoll,
    network_id: String,
    network_name: String,
    epoll: Epoll,
    wake: Arc<EventFd>,
    commands: mpsc::Receiver<Command>,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    bridge: Bridge,
    gateway: Gateway,
    gateway_mac: [u8; 6],
    gateway_ips: Vec<IpAddr>,
    dns: Option<DnsHook>,
    injector: Injector,
    nat_jobs: tokio::sync::mpsc::UnboundedSender<NatJob>,
    policy: super::nat::SharedPolicy,
    /// The host side of each TCP flow terminated on the gateway.
    flows: std::collections::HashMap<FlowId, FlowIo>,
    /// UDP flows: (container address, peer as the container sees it) -> host socket.
    udp: std::collections::HashMap<(SocketAddr, SocketAddr), UdpFlow>,
    /// How many of `udp` are published-port flows (the rest are outbound).
    published_udp: usize,
    icmp: std::collections::HashMap<IcmpKey, IcmpFlow>,
    next_udp_sweep: Option<Instant>,
    nat_enabled: bool,
    gateway_port: PortId,
    /// Indexed by `PortId::index()`; `None` for the gateway port and free slots.
    ports: Vec<Option<PortIo>>,
    /// Reused list of flood targets, so flooding allocates nothing.
    scratch: Vec<PortId>,
    running: bool,
}

impl Worker {
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
                    self.drain_commands();
                    continue;
                }
                let Ok(index) = usize::try_from(token) else {
                    continue;
                };
                let Some(port) = self.bridge.port_at(index) else {
                    continue;
                };
                let flags = ev.events();
                if flags.intersects(EpollFlags::EPOLLERR | EpollFlags::EPOLLHUP) {
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
            self.sweep_udp(now);
            self.flush_gateway(now);
        }
        tracing::debug!(network = %self.network_name, "datapath stopped");
    }

    fn next_timeout(&mut self, now: Instant) -> EpollTimeout {
        let due = [
            self.bridge.poll_timeout(),
            self.gateway.poll_timeout(now),
            self.next_udp_sweep,
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
                    let frame = &buf[..n];
                    self.switch(now, port, frame);
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

    fn switch(&mut self, now: Instant, ingress: PortId, frame: &[u8]) {
        match self.bridge.handle_frame(now, ingress, frame) {
            Decision::Forward(p) => self.deliver(now, p, frame),
            Decision::Flood => {
                let mut targets = std::mem::take(&mut self.scratch);
                targets.clear();
                targets.extend(self.bridge.flood_ports(ingress));
                for &p in &targets {
                    self.deliver(now, p, frame);
                }
                self.scratch = targets;
            }
            Decision::Drop(_) => {}
        }
    }

    fn deliver(&mut self, now: Instant, port: PortId, frame: &[u8]) {
        if port == self.gateway_port {
            let handled = match slice_udp(frame) {
                Some(u) => self.dns_udp(now, &u) || self.nat_udp(now, &u),
                None => self.nat_icmp(now, frame),
            };
            if !handled {
                self.gateway.handle_frame(now, frame);
            }
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

    /// Answers DNS-over-TCP queries the gateway collected, then sends what the gateway emitted
    /// into the network, as frames from the gateway port.
    fn flush_gateway(&mut self, now: Instant) {
        let messages = self.gateway.poll_stream_messages();
        for m in messages {
            let outcome = match &self.dns {
                Some(hook) => hook.responder.answer(
                    Asker::Network {
                        network_id: &self.network_id,
                        client: m.peer,
                    },
                    Transport::Tcp,
                    &m.message,
                ),
                None => Outcome::Drop,
            };
            match outcome {
                Outcome::Reply(answer) => self.gateway.stream_reply(now, m.conn, &answer),
                Outcome::Forward => self.forward(now, m.message, ReplyTo::Tcp(m.conn)),
                Outcome::Drop => self.gateway.stream_unanswered(now, m.conn),
            }
        }
        for ev in self.gateway.poll_tcp_events() {
            match ev {
                TcpEvent::Syn { flow, src, dst } => {
                    let _ = self.nat_jobs.send(NatJob::Dial {
                        flow,
                        src,
                        dst,
                        gateway: self.gateway_ips.clone(),
                        policy: self.policy.clone(),
                        injector: self.injector.clone(),
                    });
                }
                TcpEvent::Activity(flow) => self.service_flow(now, flow),
            }
        }
        while let Some(frame) = self.gateway.poll_transmit() {
            self.switch(now, self.gateway_port, &frame);
        }
    }

    /// Moves bytes between a flow's smoltcp socket and its host side, both ways, as far as
    /// the other side can take them, and propagates closes.
    fn service_flow(&mut self, now: Instant, flow: FlowId) {
        let Some(io) = self.flows.get_mut(&flow) else {
            return;
        };
        // Container -> host, while the host side's queue has room.
        loop {
            if let Some(chunk) = io.stash.take() {
                match io.to_host.as_ref().map(|t| t.try_send(chunk)) {
                    Some(Ok(())) => {}
                    Some(Err(tokio::sync::mpsc::error::TrySendError::Full(c))) => {
                        io.stash = Some(c);
                        io.shared
                            .blocked
                            .store(true, std::sync::atomic::Ordering::Release);
                        break;
                    }
                    _ => break,
                }
            }
            let Some(chunk) = self.gateway.tcp_recv_chunk(now, flow, 64 * 1024) else {
                break;
            };
            io.stash = Some(chunk);
        }
        // Host -> container, as far as the socket's send buffer allows.
        while let Some(front) = io.from_host.front() {
            let n = self.gateway.tcp_send(now, flow, &front[io.offset..]);
            io.shared.credits.add_permits(n);
            io.offset += n;
            if io.offset < front.len() {
                break;
            }
            io.from_host.pop_front();
            io.offset = 0;
            io.shared.credits.add_permits(super::nat::CHUNK_OVERHEAD);
        }
        if io.host_eof && io.from_host.is_empty() && !io.fin_sent {
            io.fin_sent = true;
            self.gateway.tcp_close(now, flow);
        }
        match self.gateway.tcp_state(flow) {
            FlowState::PeerClosed if io.stash.is_none() => {
                // The container is done sending: closing our end of the queue lets the host
                // side shut down its write half after the last byte.
                io.to_host = None;
            }
            FlowState::Closed => {
                if let Some(io) = self.flows.remove(&flow) {
                    if !io.fin_sent || io.stash.is_some() {
                        io.shared
                            .reset
                            .store(true, std::sync::atomic::Ordering::Release);
                    }
                    io.shared.credits.close();
                }
            }
            _ => {}
        }
    }

    /// Answers a UDP query to the gateway's port 53 in place. Returns false if the frame is not
    /// one (it then goes to the gateway's stack as usual).
    fn dns_udp(&mut self, now: Instant, u: &UdpView<'_>) -> bool {
        let Some(hook) = &self.dns else { return false };
        if u.dst.port() != DNS_PORT || !self.gateway_ips.contains(&u.dst.ip()) {
            return false;
        }
        let peer = UdpPeer {
            client_mac: u.src_mac,
            client_ip: u.src.ip(),
            client_port: u.src.port(),
            gw_mac: self.gateway_mac,
            gw_ip: u.dst.ip(),
        };
        let query = u.payload;
        let outcome = hook.responder.answer(
            Asker::Network {
                network_id: &self.network_id,
                client: u.src.ip(),
            },
            Transport::Udp,
            query,
        );
        match outcome {
            Outcome::Reply(answer) => {
                if let Some(f) = udp_frame(&peer, &answer) {
                    self.switch(now, self.gateway_port, &f);
                }
            }
            Outcome::Forward => {
                let query = query.to_vec();
                self.forward(now, query, ReplyTo::Udp(peer));
            }
            Outcome::Drop => {}
        }
        true
    }

    /// Carries a container's UDP datagram to its peer through the flow's host socket,
    /// creating an outbound flow for a new destination. Returns false if the frame is not UDP
    /// for NAT (it then goes to the gateway's stack).
    fn nat_udp(&mut self, now: Instant, u: &UdpView<'_>) -> bool {
        if !self.nat_enabled {
            return false;
        }
        let (src, dst) = (u.src, u.dst);
        if dst.ip().is_multicast() || matches!(dst.ip(), IpAddr::V4(v4) if v4.is_broadcast()) {
            return false;
        }
        let key = (src, dst);
        let payload = u.payload;
        if let Some(flow) = self.udp.get_mut(&key) {
            flow.last = now;
            let _ = match flow.reply_to {
                Some(client) => flow.socket.send_to(payload, client),
                None => flow.socket.send(payload),
            };
            return true;
        }
        let Some(target) = super::nat::read_policy(&self.policy).outbound_target(
            vswitch_nat::Proto::Udp,
            dst,
            &self.gateway_ips,
        ) else {
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
        let _ = socket.send(payload);
        self.make_udp_room(false);
        let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let _ = self.nat_jobs.send(NatJob::Receive(FlowReceive {
            socket: socket.clone(),
            kind: ReceiveKind::Udp { key },
            container_mac: u.src_mac,
            gateway_mac: self.gateway_mac,
            alive: alive.clone(),
            injector: self.injector.clone(),
        }));
        self.udp.insert(
            key,
            UdpFlow {
                socket,
                reply_to: None,
                last: now,
                alive,
            },
        );
        self.next_udp_sweep.get_or_insert(now + UDP_IDLE);
        true
    }

    /// Before a new UDP flow of its kind goes in: if that kind has its half of the table, the
    /// flows of that kind idle longest go (their sockets close with them), a sixteenth of the
    /// half at once, so that under a spray the scan is paid once per 128 new flows, not for
    /// each.
    fn make_udp_room(&mut self, published: bool) {
        let of_kind = if published {
            self.published_udp
        } else {
            self.udp.len() - self.published_udp
        };
        if of_kind < MAX_UDP_FLOWS_OF_A_KIND {
            return;
        }
        let mut ages: Vec<(Instant, (SocketAddr, SocketAddr))> = self
            .udp
            .iter()
            .filter(|(_, f)| f.reply_to.is_some() == published)
            .map(|(k, f)| (f.last, *k))
            .collect();
        let evict = (MAX_UDP_FLOWS_OF_A_KIND / 16).clamp(1, ages.len());
        if evict < ages.len() {
            ages.select_nth_unstable(evict);
        }
        for (_, key) in &ages[..evict] {
            if self.udp.remove(key).is_some() && published {
                self.published_udp -= 1;
            }
        }
    }

    fn sweep_udp(&mut self, now: Instant) {
        if self.next_udp_sweep.is_none_or(|t| now < t) {
            return;
        }
        self.udp
            .retain(|_, f| now.saturating_duration_since(f.last) < UDP_IDLE);
        self.published_udp = self.udp.values().filter(|f| f.reply_to.is_some()).count();
        self.icmp
            .retain(|_, f| now.saturating_duration_since(f.last) < ICMP_IDLE);
        self.next_udp_sweep =
            (!self.udp.is_empty() || !self.icmp.is_empty()).then(|| now + Duration::from_secs(5));
    }

    /// Sends a container's echo request to the outside through a host ICMP socket (an
    /// unprivileged ping socket, or a raw socket when those are not allowed and we are root).
    /// Returns false if the frame is not an outbound IPv4 echo request.
    fn nat_icmp(&mut self, now: Instant, frame: &[u8]) -> bool {
        if !self.nat_enabled {
            return false;
        }
        let Some(Ok(p)) = frame.get(VNET_HDR_LEN..).map(SlicedPacket::from_ethernet) else {
            return false;
        };
        let Some(LinkSlice::Ethernet2(eth)) = &p.link else {
            return false;
        };
        let Some(NetSlice::Ipv4(ip)) = &p.net else {
            return false;
        };
        let Some(TransportSlice::Icmpv4(icmp)) = &p.transport else {
            return false;
        };
        let etherparse::Icmpv4Type::EchoRequest(echo) = icmp.icmp_type() else {
            return false;
        };
        let src = IpAddr::V4(ip.header().source_addr());
        let dst = IpAddr::V4(ip.header().destination_addr());
        if self.gateway_ips.contains(&dst) || dst.is_multicast() {
            return false;
        }
        if super::nat::read_policy(&self.policy)
            .subnets
            .iter()
            .any(|n| n.contains(&dst))
        {
            return true; // another vswitch network: isolated, dropped
        }
        let key = (src, echo.id, dst);
        if !self.icmp.contains_key(&key) {
            if self.icmp.len() >= MAX_UDP_FLOWS {
                return true;
            }
            let Some((socket, raw)) = super::nat::icmp_socket(dst) else {
                return true;
            };
            let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
            let _ = self.nat_jobs.send(NatJob::Receive(FlowReceive {
                socket: socket.clone(),
                kind: ReceiveKind::Icmp { key, raw },
                container_mac: eth.source(),
                gateway_mac: self.gateway_mac,
                alive: alive.clone(),
                injector: self.injector.clone(),
            }));
            self.icmp.insert(
                key,
                IcmpFlow {
                    socket,
                    last: now,
                    alive,
                },
            );
            self.next_udp_sweep.get_or_insert(now + ICMP_IDLE);
        }
        if let Some(flow) = self.icmp.get_mut(&key) {
            flow.last = now;
            let header = etherparse::Icmpv4Header::with_checksum(
                etherparse::Icmpv4Type::EchoRequest(echo),
                icmp.payload(),
            );
            let mut msg = header.to_bytes().to_vec();
            msg.extend_from_slice(icmp.payload());
            let _ = flow.socket.send(&msg);
        }
        true
    }

    /// Hands a query to the forwarder task, or answers REFUSED if too many are in flight.
    fn forward(&mut self, now: Instant, query: Vec<u8>, reply: ReplyTo) {
        let Some(hook) = &self.dns else {
            if let ReplyTo::Tcp(conn) = reply {
                self.gateway.stream_unanswered(now, conn);
            }
            return;
        };
        let Some(permit) = hook.forwarder.try_acquire() else {
            tracing::debug!(network = %self.network_name, "too many DNS forwards in flight; REFUSED");
            match (hook.responder.refuse(&query), reply) {
                (Some(answer), ReplyTo::Udp(peer)) => {
                    if let Some(f) = udp_frame(&peer, &answer) {
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
            injector: self.injector.clone(),
            permit,
        });
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
        self.bridge.remove_port(port);
        Some(io)
    }

    fn drain_commands(&mut self) {
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                Command::AddPort {
                    fd,
                    endpoint_id,
                    endpoint_name,
                    mac,
                    reply,
                } => {
                    let port = self.bridge.add_port();
                    self.bridge
                        .pin(Instant::now(), vswitch_switch::MacAddr(mac), port);
                    let r = self
                        .epoll
                        .add(
                            fd.as_fd(),
                            EpollEvent::new(EpollFlags::EPOLLIN, port.index() as u64),
                        )
                        .map_err(io::Error::from);
                    match r {
                        Ok(()) => {
                            if self.ports.len() <= port.index() {
                                self.ports.resize_with(port.index() + 1, || None);
                            }
                            self.ports[port.index()] = Some(PortIo {
                                fd,
                                endpoint_id,
                                endpoint_name,
                            });
                            let _ = reply.send(Ok(port));
                        }
                        Err(e) => {
                            self.bridge.remove_port(port);
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                Command::RemovePort { port, reply } => {
                    // If the control plane is gone, the fd is closed here after all.
                    let _ = reply.send(self.unplug(port).map(|io| io.fd));
                }
                Command::Fdb(reply) => {
                    let now = Instant::now();
                    let mut rows: Vec<FdbRow> = self
                        .bridge
                        .fdb()
                        .iter(now)
                        .map(|(mac, port, age)| FdbRow {
                            mac_address: mac.to_string(),
                            port: port.index() as u32,
                            endpoint: self.port_name(port),
                            age_seconds: round_ms(age),
                        })
                        .collect();
                    rows.sort_by(|a, b| {
                        a.port.cmp(&b.port).then(a.mac_address.cmp(&b.mac_address))
                    });
                    let _ = reply.send(rows);
                }
                Command::Stats(reply) => {
                    let ports = self
                        .bridge
                        .ports()
                        .filter_map(|p| {
                            let s = self.bridge.port_stats(p)?;
                            // The gateway's frames from host sockets that never got in count
                            // as drops on its way into the switch.
                            let backlog_drops = if p == self.gateway_port {
                                self.injector.dropped()
                            } else {
                                0
                            };
                            Some(PortStatsRow {
                                port: p.index() as u32,
                                endpoint: self.port_name(p),
                                rx_frames: s.rx_frames,
                                rx_bytes: s.rx_bytes,
                                rx_dropped: s.rx_dropped + backlog_drops,
                                tx_frames: s.tx_frames,
                                tx_bytes: s.tx_bytes,
                                tx_dropped: s.tx_dropped,
                            })
                        })
                        .collect();
                    let b = self.bridge.stats();
                    let _ = reply.send(NetworkStats {
                        network: self.network_name.clone(),
                        ports,
                        malformed: b.malformed,
                        invalid_source: b.invalid_source,
                        learn_refused: b.learn_refused,
                        flooded: b.flooded,
                        fdb_entries: self.bridge.fdb().len(),
                    });
                }
                Command::InjectFrame(frame) => {
                    self.injector.taken(frame.len());
                    let now = Instant::now();
                    self.switch(now, self.gateway_port, &frame);
                }
                Command::StreamReply { conn, answer } => {
                    let now = Instant::now();
                    self.gateway.stream_reply(now, conn, &answer);
                    self.flush_gateway(now);
                }
                Command::NatOpen {
                    local,
                    remote,
                    channel,
                    reply,
                } => {
                    let now = Instant::now();
                    let flow = self.gateway.tcp_connect(now, local, remote);
                    if let Some(f) = flow {
                        self.flows.insert(f, FlowIo::new(channel));
                    }
                    let _ = reply.send(flow);
                    self.flush_gateway(now);
                }
                Command::NatDialed { flow, channel } => {
                    let now = Instant::now();
                    match channel {
                        Some(ch) => {
                            self.flows.insert(flow, FlowIo::new(ch));
                            self.gateway.tcp_established(now, flow);
                        }
                        None => self.gateway.tcp_abort(now, flow),
                    }
                    self.flush_gateway(now);
                }
                Command::NatHostData { flow, data } => {
                    let now = Instant::now();
                    if let Some(io) = self.flows.get_mut(&flow) {
                        io.from_host.push_back(data);
                        self.service_flow(now, flow);
                    }
                    self.flush_gateway(now);
                }
                Command::NatHostEof { flow } => {
                    let now = Instant::now();
                    if let Some(io) = self.flows.get_mut(&flow) {
                        io.host_eof = true;
                        self.service_flow(now, flow);
                    }
                    self.flush_gateway(now);
                }
                Command::NatHostReset { flow } => {
                    let now = Instant::now();
                    if let Some(io) = self.flows.remove(&flow) {
                        io.shared.credits.close();
                    }
                    self.gateway.tcp_abort(now, flow);
                    self.flush_gateway(now);
                }
                Command::NatResume { flow } => {
                    let now = Instant::now();
                    self.service_flow(now, flow);
                    self.flush_gateway(now);
                }
                Command::IcmpIn { key, frame } => {
                    self.injector.taken(frame.len());
                    let now = Instant::now();
                    if let Some(flow) = self.icmp.get_mut(&key) {
                        flow.last = now;
                        self.switch(now, self.gateway_port, &frame);
                    }
                }
                Command::UdpIn {
                    key,
                    frame,
                    published,
                } => {
                    self.injector.taken(frame.len());
                    let now = Instant::now();
                    match self.udp.get_mut(&key) {
                        Some(flow) => flow.last = now,
                        None => {
                            if let Some((socket, client)) = published {
                                self.make_udp_room(true);
                                self.published_udp += 1;
                                self.udp.insert(
                                    key,
                                    UdpFlow {
                                        socket,
                                        reply_to: Some(client),
                                        last: now,
                                        alive: Arc::new(std::sync::atomic::AtomicBool::new(true)),
                                    },
                                );
                                self.next_udp_sweep.get_or_insert(now + UDP_IDLE);
                            } else {
                                continue; // the flow expired: drop the late datagram
                            }
                        }
                    }
                    self.switch(now, self.gateway_port, &frame);
                }
                Command::Shutdown => self.running = false,
            }
        }
    }

    fn port_name(&self, port: PortId) -> String {
        if port == self.gateway_port {
            return GATEWAY_NAME.to_owned();
        }
        match self.ports.get(port.index()) {
            Some(Some(io)) => io.endpoint_name.clone(),
            _ => String::new(),
        }
    }
}

fn round_ms(d: Duration) -> f64 {
    (d.as_millis() as f64) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Datagrams from anywhere on the network queue up to a byte budget for the datapath;
    /// past it they are dropped and counted, and a slow datapath never means unbounded memory.
    #[test]
    fn frames_from_host_sockets_queue_a_bounded_backlog() {
        let (injector, captured) = Injector::capturing().expect("injector");
        let sa = |s: &str| s.parse::<SocketAddr>().expect("addr");
        let key = (sa("10.0.0.2:5353"), sa("192.0.2.1:53"));
        let frame = vec![0u8; 1500];
        let fit = MAX_BACKLOG_BYTES / frame.len();
        for _ in 0..fit {
            assert!(injector.udp_in(key, frame.clone(), None));
        }
        assert_eq!(injector.dropped(), 0);
        for _ in 0..100 {
            assert!(
                injector.udp_in(key, frame.clone(), None),
                "dropped, not dead"
            );
        }
        assert_eq!(injector.dropped(), 100);
        assert_eq!(
            captured.0.try_iter().count(),
            fit,
            "only what fits was queued"
        );
        // What the datapath takes makes room again.
        injector.taken(frame.len());
        assert!(injector.udp_in(key, frame.clone(), None));
        assert_eq!(injector.dropped(), 100);
        // With the datapath gone, the sender learns it.
        drop(captured);
        injector.taken(fit * frame.len());
        assert!(!injector.udp_in(key, frame, None));
    }

    #[test]
    fn busy_poll_spins_only_within_its_window_after_traffic() {
        let t0 = Instant::now();
        let us = Duration::from_micros;
        let mut bp = BusyPoll::new(us(50));
        assert!(!bp.spinning(t0), "no traffic yet: sleep");
        bp.traffic(t0);
        assert!(bp.spinning(t0));
        assert!(bp.spinning(t0 + us(49)));
        assert!(!bp.spinning(t0 + us(50)), "window over: sleep");
        bp.traffic(t0 + us(200));
        assert!(bp.spinning(t0 + us(230)), "new traffic opens a new window");
        // A clock that seems to go backwards still counts as inside the window.
        assert!(bp.spinning(t0 + us(100)));

        let mut off = BusyPoll::new(Duration::ZERO);
        off.traffic(t0);
        assert!(!off.spinning(t0), "0 turns it off");
    }
}
