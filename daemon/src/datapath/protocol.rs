//! How the rest of the daemon talks to a datapath thread, and what the thread hands out.
//!
//! In: [`Command`]s through an mpsc queue, each followed by a write to the thread's eventfd
//! (which wakes its `epoll_wait`). The control plane sends port changes and queries; tokio
//! tasks on the host side send frames and TCP stream data through an [`Injector`].
//!
//! Out: [`Event`]s to the control plane, [`ForwardJob`]s to the DNS forwarder and
//! [`NatJob`]s to the host side of NAT, each over a tokio channel.
//!
//! Frames from host sockets (UDP datagrams, echo replies, DNS answers over UDP and TCP) can be
//! sent by anyone on the network faster than the datapath takes them, so they queue under a
//! byte budget ([`Backlog`]): past it they are dropped and counted, as a NIC drops on a full
//! ring. TCP data of NAT flows has its own per-flow credits instead ([`super::flow`]).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;

use nix::sys::eventfd::EventFd;
use tokio::sync::oneshot;
use vswitch_nat::flows::{IcmpKey, UdpKey};
use vswitch_nat::{FlowId, Policy};
use vswitch_switch::{PortGuard, PortId};

use super::flow::HostStream;
use crate::api::{FdbRow, NetworkStats};

/// The NAT policy as the datapaths and dial tasks share it (read once per new flow).
pub type SharedPolicy = Arc<parking_lot::RwLock<Policy>>;

/// What a queued packet costs beyond its bytes (the command and the allocation), so that a
/// flood of tiny packets is bounded too.
pub const QUEUED_COST: usize = 64;

/// Bytes of frames from host sockets queued for one datapath at most.
pub const MAX_BACKLOG_BYTES: usize = 4 * 1024 * 1024;

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
    /// file was removed (see `netns::watch`). The port is still plugged.
    TargetGone { endpoint_id: String },
}

pub(super) enum Command {
    AddPort {
        fd: OwnedFd,
        spec: PortSpec,
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
    /// VXLAN packets (UDP payloads) from one host, for this network's tunnel to check.
    TunnelIn(super::Datagrams),
    /// The network's external VTEPs (replaces the previous list).
    TunnelPeers(Vec<std::net::IpAddr>),
    /// The member hosts with endpoints on the network (replaces the previous list).
    TunnelMembers(Vec<std::net::IpAddr>),
    /// An endpoint on another host (`Some(host)`), or no longer (`None`).
    TunnelRemote {
        mac: [u8; 6],
        host: Option<std::net::IpAddr>,
    },
    /// A forwarded answer for a DNS-over-TCP connection of the gateway.
    StreamReply {
        conn: u64,
        answer: Vec<u8>,
    },
    /// A forwarded answer for a DNS-over-TCP connection that was dropped (the backlog was
    /// full): the connection must not wait for it.
    StreamUnanswered {
        conn: u64,
    },
    /// Open a TCP connection to a container for a published port, spliced to `host`.
    NatOpen {
        local: SocketAddr,
        remote: SocketAddr,
        host: HostStream,
        reply: oneshot::Sender<Option<FlowId>>,
    },
    /// The outcome of dialling an outbound destination: the connected socket, or refusal.
    NatDialed {
        flow: FlowId,
        host: Option<HostStream>,
    },
    /// Reset a flow (its published port or endpoint went away).
    NatAbort {
        flow: FlowId,
    },
    /// A datagram from the host side of a UDP flow, as a frame ready for the container.
    UdpIn {
        key: UdpKey,
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

/// What a port is: whose, and what it may send from.
#[derive(Debug, Clone)]
pub struct PortSpec {
    pub endpoint_id: String,
    pub endpoint_name: String,
    /// The scope key of the endpoint's namespace in the DNS catalog: what a DNS query that
    /// comes in on this port may see.
    pub namespace: String,
    /// The endpoint's assigned MAC, pinned to its port.
    pub mac: [u8; 6],
    /// What the port may send from, on networks with port security.
    pub guard: Option<PortGuard>,
    /// The endpoint's addresses: its NAT flows end with its port.
    pub addrs: Vec<std::net::IpAddr>,
}

/// The sending half of a datapath's command queue: wakes the thread after each command.
#[derive(Clone)]
pub(super) struct Commands {
    queue: mpsc::Sender<Command>,
    wake: Arc<EventFd>,
    /// The eventfd has been written and the thread has not yet begun draining: further
    /// commands need no write of their own (under load, one system call wakes the thread for
    /// many commands rather than one each).
    armed: Arc<std::sync::atomic::AtomicBool>,
}

impl Commands {
    pub(super) fn new(
        queue: mpsc::Sender<Command>,
        wake: Arc<EventFd>,
        armed: Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        Self { queue, wake, armed }
    }

    /// False if the datapath is gone.
    pub(super) fn send(&self, cmd: Command) -> bool {
        if self.queue.send(cmd).is_err() {
            return false;
        }
        // The thread clears `armed` before it drains, so a command queued after that point
        // always writes, and one queued before it is drained.
        if !self.armed.swap(true, Ordering::SeqCst) {
            let _ = self.wake.write(1);
        }
        true
    }
}

/// What a batch of tunnel packets costs the backlog while it waits.
pub(super) fn tunnel_cost(packets: &super::Datagrams) -> usize {
    packets.bytes() + packets.count() * QUEUED_COST
}

/// Frames from host sockets waiting for the datapath, and those dropped because the budget
/// was spent.
#[derive(Default)]
struct Backlog {
    bytes: AtomicUsize,
    dropped: AtomicU64,
    /// Forwarded DNS answers delivered, by response code (counted by the relay's tasks).
    upstream_rcodes: [AtomicU64; 16],
}

/// Hands frames and stream data to a datapath thread from elsewhere (tokio tasks of published
/// ports, NAT and the DNS forwarder).
#[derive(Clone)]
pub struct Injector {
    commands: Commands,
    backlog: Arc<Backlog>,
}

impl Injector {
    pub(super) fn new(commands: Commands) -> Self {
        Self {
            commands,
            backlog: Arc::default(),
        }
    }

    /// An injector with no datapath behind it, and the queue its commands land in, for tests
    /// of what the host side hands over.
    #[cfg(test)]
    pub(crate) fn capturing() -> io::Result<(Self, Captured)> {
        use nix::sys::eventfd::EfdFlags;
        let (queue, rx) = mpsc::channel();
        let wake = Arc::new(EventFd::from_flags(EfdFlags::EFD_NONBLOCK)?);
        Ok((
            Self::new(Commands::new(queue, wake, Arc::default())),
            Captured(rx),
        ))
    }

    fn send(&self, cmd: Command) -> bool {
        self.commands.send(cmd)
    }

    /// Queues a command carrying `len` bytes of frame or answer, or drops it (counted) when the
    /// backlog is full. False only if the datapath is gone.
    fn send_charged(&self, len: usize, cmd: Command) -> bool {
        self.try_send_charged(len, cmd).unwrap_or(true)
    }

    /// Like [`Injector::send_charged`], but says whether it was queued: `None` if it was
    /// dropped for the budget.
    fn try_send_charged(&self, len: usize, cmd: Command) -> Option<bool> {
        if self.backlog.bytes.fetch_add(len, Ordering::Relaxed) + len > MAX_BACKLOG_BYTES {
            self.backlog.bytes.fetch_sub(len, Ordering::Relaxed);
            self.backlog.dropped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if self.send(cmd) {
            return Some(true);
        }
        self.backlog.bytes.fetch_sub(len, Ordering::Relaxed);
        Some(false)
    }

    /// Hands VXLAN packets to the network's tunnel, or drops them (counted) when the backlog
    /// is full. False only if the datapath is gone.
    pub fn tunnel_in(&self, packets: super::Datagrams) -> bool {
        let n = packets.count() as u64;
        match self.try_send_charged(tunnel_cost(&packets), Command::TunnelIn(packets)) {
            Some(queued) => queued,
            None => {
                // One was counted for the message; count every packet in it.
                self.backlog
                    .dropped
                    .fetch_add(n.saturating_sub(1), Ordering::Relaxed);
                true
            }
        }
    }

    /// The datapath took `len` charged bytes off the backlog.
    pub(super) fn taken(&self, len: usize) {
        self.backlog.bytes.fetch_sub(len, Ordering::Relaxed);
    }

    /// Frames from host sockets dropped so far because the backlog was full.
    pub fn dropped(&self) -> u64 {
        self.backlog.dropped.load(Ordering::Relaxed)
    }

    /// Asks the datapath to open a flow to a container, spliced to `host`; `None` if it cannot
    /// (table full, gone), and then `host` is closed.
    pub async fn nat_open(
        &self,
        local: SocketAddr,
        remote: SocketAddr,
        host: HostStream,
    ) -> Option<FlowId> {
        let (reply, rx) = oneshot::channel();
        if !self.send(Command::NatOpen {
            local,
            remote,
            host,
            reply,
        }) {
            return None;
        }
        rx.await.ok().flatten()
    }

    pub fn nat_dialed(&self, flow: FlowId, host: Option<HostStream>) {
        self.send(Command::NatDialed { flow, host });
    }

    pub fn nat_abort(&self, flow: FlowId) {
        self.send(Command::NatAbort { flow });
    }

    /// Hands an echo reply (as a frame) for the ping flow `key` to the datapath.
    pub fn icmp_in(&self, key: IcmpKey, frame: Vec<u8>) -> bool {
        self.send_charged(frame.len(), Command::IcmpIn { key, frame })
    }

    /// Hands a datagram for a container to the datapath. `key` is (container, peer as the
    /// container sees it); `published` registers the flow of a published port.
    pub fn udp_in(
        &self,
        key: UdpKey,
        frame: Vec<u8>,
        published: Option<(Arc<std::net::UdpSocket>, SocketAddr)>,
    ) -> bool {
        self.send_charged(
            frame.len(),
            Command::UdpIn {
                key,
                frame,
                published,
            },
        )
    }

    /// Forwarded DNS answers delivered so far, by response code.
    pub(super) fn upstream_rcodes(&self) -> Vec<u64> {
        let c = &self.backlog.upstream_rcodes;
        c.iter().map(|a| a.load(Ordering::Relaxed)).collect()
    }

    /// Delivers a forwarded DNS answer to whoever asked.
    pub fn deliver(&self, to: ReplyTo, answer: Vec<u8>) {
        self.backlog.upstream_rcodes[crate::api::dns_rcode(&answer)]
            .fetch_add(1, Ordering::Relaxed);
        match to {
            ReplyTo::Udp(peer) => {
                if let Some(frame) = peer.frame(&answer) {
                    self.send_charged(frame.len(), Command::InjectFrame(frame));
                }
            }
            ReplyTo::Tcp(conn) => {
                let len = answer.len();
                if self
                    .try_send_charged(len, Command::StreamReply { conn, answer })
                    .is_none()
                {
                    // Dropped for the budget: the connection is told, so that it does not
                    // wait for the answer (its bounded queue of questions moves on).
                    self.send(Command::StreamUnanswered { conn });
                }
            }
        }
    }
}

/// What an [`Injector`] made by [`Injector::capturing`] sent.
#[cfg(test)]
pub(crate) struct Captured(mpsc::Receiver<Command>);

/// Where a forwarded DNS answer goes.
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

/// A DNS client on the network that asked over UDP, and the gateway address it asked.
#[derive(Debug, Clone)]
pub struct UdpPeer {
    pub(super) client_mac: [u8; 6],
    pub(super) client: SocketAddr,
    pub(super) gw_mac: [u8; 6],
    pub(super) gw_ip: IpAddr,
}

/// The port DNS is served on.
pub(super) const DNS_PORT: u16 = 53;

impl UdpPeer {
    /// An answer as a datagram from the gateway's port 53 to the client.
    pub(super) fn frame(&self, payload: &[u8]) -> Option<Vec<u8>> {
        vswitch_nat::frame::udp_frame(
            self.gw_mac,
            self.client_mac,
            SocketAddr::new(self.gw_ip, DNS_PORT),
            self.client,
            payload,
        )
    }
}

/// A query to relay upstream; the answer goes back through `injector`.
pub struct ForwardJob {
    pub query: Vec<u8>,
    pub reply: ReplyTo,
    /// The network's own upstream servers (`network create --dns`); `None`: the daemon's.
    pub upstreams: Option<vswitch_dns::Upstreams>,
    pub injector: Injector,
    /// Held until the answer is delivered: bounds the forwards in flight.
    pub permit: vswitch_dns::fair::Permit,
}

/// Work the datapath hands to the host side of NAT.
pub enum NatJob {
    /// Receive the answers of an outbound UDP or ping flow and hand them back as frames.
    Receive(FlowReceive),
    /// A container's SYN to `dst` is held; dial it and report back.
    Dial {
        flow: FlowId,
        src: SocketAddr,
        dst: SocketAddr,
        /// The network's gateway addresses: a dial to one of them means the daemon's host side.
        gateway: Vec<IpAddr>,
        policy: SharedPolicy,
        injector: Injector,
    },
}

/// An outbound UDP or ping flow's host socket, whose answers a task turns into frames for the
/// container until the datapath lets the flow expire (`alive` false).
pub struct FlowReceive {
    pub socket: Arc<std::net::UdpSocket>,
    pub kind: ReceiveKind,
    pub container_mac: [u8; 6],
    pub gateway_mac: [u8; 6],
    pub alive: Arc<AtomicBool>,
    pub injector: Injector,
}

pub enum ReceiveKind {
    /// (container, peer as the container sees it).
    Udp { key: UdpKey },
    /// (container, echo id, destination), on a ping socket of its own.
    Icmp { key: IcmpKey },
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

    /// DNS answers for TCP clients are charged like frames: a flood of forwarded queries over
    /// TCP cannot queue more than the budget either.
    #[test]
    fn stream_answers_are_charged_to_the_backlog() {
        let (injector, captured) = Injector::capturing().expect("injector");
        let answer = vec![0u8; 64 * 1024];
        let fit = MAX_BACKLOG_BYTES / answer.len();
        for _ in 0..fit + 10 {
            injector.deliver(ReplyTo::Tcp(1), answer.clone());
        }
        assert_eq!(injector.dropped(), 10);
        let queued: Vec<Command> = captured.0.try_iter().collect();
        let replies = queued
            .iter()
            .filter(|c| matches!(c, Command::StreamReply { .. }))
            .count();
        let unanswered = queued
            .iter()
            .filter(|c| matches!(c, Command::StreamUnanswered { conn: 1 }))
            .count();
        assert_eq!(replies, fit);
        assert_eq!(
            unanswered, 10,
            "a dropped answer still frees its connection"
        );
    }
}
