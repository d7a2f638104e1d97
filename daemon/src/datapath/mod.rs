//! The datapath: one thread per network that moves frames between that network's ports (TAP
//! fds), its [`Bridge`](vswitch_switch::Bridge) and its [`Gateway`](vswitch_nat::Gateway).
//!
//! Why a dedicated thread with its own epoll rather than tokio tasks: the bridge and the gateway
//! are plain values owned by exactly one thread, so forwarding a frame takes no lock, and a
//! frame costs one `read` and one `write` (plus an `epoll_wait` per batch), with no task
//! wake-ups or cross-thread hand-offs. epoll reports only ready fds, so hundreds of idle ports
//! cost nothing, and an idle network sleeps in `epoll_wait` with no timer unless the bridge,
//! the gateway or a flow table has one due.
//!
//! - [`protocol`]: the commands the thread takes and what it hands out;
//! - `worker`: the thread's loop (ports, switching, commands);
//! - `services`: what the gateway port does without its TCP/IP stack (DNS over UDP, UDP and
//!   ping NAT);
//! - `tcp`: moving NAT flows' bytes between smoltcp and the host side.
//!
//! A port is any non-blocking fd that reads and writes whole frames with a virtio-net header in
//! front: a TAP in production, one end of a `socketpair(SOCK_SEQPACKET)` in the simulation
//! tests (`daemon/tests/sim`).

mod busy_poll;
mod flow;
mod gro;
mod offload;
mod packed;
pub mod protocol;
mod raw_ping;
mod services;
mod tcp;
mod tunnel;
mod worker;

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use vswitch_dns::Responder;
use vswitch_dns::upstream::Forwarder;
use vswitch_nat::GatewayConfig;
use vswitch_switch::PortId;

use crate::api::{FdbRow, NetworkStats};
pub use flow::HostStream;
use protocol::{Command, Commands};
pub use protocol::{
    Event, FlowReceive, ForwardJob, Injector, NatJob, PortSpec, ReceiveKind, ReplyTo, SharedPolicy,
};
pub use tunnel::Datagrams;
use worker::Worker;

/// What a datapath is for: its network, its gateway, its thread's nice value and how long it
/// busy-polls after traffic.
#[derive(Debug, Clone)]
pub struct DatapathSpec {
    pub network_id: String,
    pub network_name: String,
    pub gateway: GatewayConfig,
    pub nice: i32,
    pub busy_poll: Duration,
    /// An overlay network's tunnel to other hosts.
    pub tunnel: Option<TunnelSpec>,
}

/// What an overlay network's datapath needs for its tunnel port.
#[derive(Clone)]
pub struct TunnelSpec {
    pub vni: u32,
    /// This host's advertise address (never a destination).
    pub own: Option<std::net::IpAddr>,
    pub peers: Vec<std::net::IpAddr>,
    pub sockets: Arc<crate::host::vxlan::Sockets>,
}

impl std::fmt::Debug for TunnelSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelSpec")
            .field("vni", &self.vni)
            .field("own", &self.own)
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

/// The embedded DNS server as the datapath sees it: queries to the gateway's port 53 are
/// answered inline from the responder; what it cannot answer goes to the forwarder task.
#[derive(Clone)]
pub struct DnsHook {
    pub responder: Arc<Responder>,
    pub forwarder: Forwarder,
    pub jobs: tokio::sync::mpsc::UnboundedSender<ForwardJob>,
}

/// Where a datapath hands what it does not do itself.
#[derive(Clone)]
pub struct Links {
    /// The embedded DNS server; `None`: the gateway serves no DNS.
    pub dns: Option<DnsHook>,
    pub nat_jobs: tokio::sync::mpsc::UnboundedSender<NatJob>,
    pub policy: SharedPolicy,
    pub events: tokio::sync::mpsc::UnboundedSender<Event>,
}

/// The control plane's handle on one network's datapath thread. Dropping it stops the thread
/// and closes the ports.
pub struct Datapath {
    commands: Commands,
    injector: Injector,
    tunnel_injector: Injector,
    /// The worker until [`Datapath::run`] hands it to its thread (behind a lock only so that
    /// the handle can be shared between threads; nothing contends for it).
    worker: parking_lot::Mutex<Option<Worker>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("running", &self.thread.is_some())
            .finish_non_exhaustive()
    }
}

const STOPPED: &str = "datapath thread has stopped";

impl Datapath {
    /// Starts the thread for network `spec.network_id`.
    pub fn start(spec: DatapathSpec, links: Links) -> io::Result<Self> {
        let mut dp = Self::new(spec, links)?;
        dp.run()?;
        Ok(dp)
    }

    /// Makes the datapath without starting its thread: commands queue (and frames from host
    /// sockets count against the backlog) until [`Datapath::run`].
    pub fn new(spec: DatapathSpec, links: Links) -> io::Result<Self> {
        let (worker, commands) = Worker::new(spec, links)?;
        Ok(Self {
            injector: worker.injector(),
            tunnel_injector: worker.tunnel_injector(),
            commands,
            worker: parking_lot::Mutex::new(Some(worker)),
            thread: None,
        })
    }

    /// Starts the thread, if it is not running yet.
    pub fn run(&mut self) -> io::Result<()> {
        let Some(worker) = self.worker.get_mut().take() else {
            return Ok(());
        };
        self.thread = Some(worker.spawn()?);
        Ok(())
    }

    /// A handle for tokio tasks to feed this datapath (published ports, NAT, DNS answers).
    pub fn injector(&self) -> Injector {
        self.injector.clone()
    }

    /// The injector for packets from the network's tunnel (a budget of its own).
    pub fn tunnel_injector(&self) -> Injector {
        self.tunnel_injector.clone()
    }

    async fn ask<T>(&self, cmd: impl FnOnce(oneshot::Sender<T>) -> Command) -> io::Result<T> {
        let (reply, rx) = oneshot::channel();
        if !self.commands.send(cmd(reply)) {
            return Err(io::Error::other(STOPPED));
        }
        rx.await.map_err(|_| io::Error::other(STOPPED))
    }

    /// Plugs a port into the network. The fd must be non-blocking. The endpoint's assigned
    /// MAC is pinned to the port: no other container can take it over by sending from it,
    /// and frames to it are never flooded, however full the table. With a guard, the port
    /// may send only from its MAC and addresses (see [`vswitch_switch::PortGuard`]).
    pub async fn add_port(&self, fd: OwnedFd, spec: PortSpec) -> io::Result<PortId> {
        self.ask(|reply| Command::AddPort { fd, spec, reply })
            .await?
    }

    /// Unplugs a port and closes its fd (for a TAP: removes the device); returns once it is
    /// closed. The close runs on a blocking-pool thread, not on the datapath's.
    pub async fn remove_port(&self, port: PortId) -> io::Result<()> {
        if let Some(fd) = self
            .ask(|reply| Command::RemovePort { port, reply })
            .await?
        {
            tokio::task::spawn_blocking(move || drop(fd))
                .await
                .map_err(io::Error::other)?;
        }
        Ok(())
    }

    pub async fn fdb(&self) -> io::Result<Vec<FdbRow>> {
        self.ask(Command::Fdb).await
    }

    pub async fn stats(&self) -> io::Result<NetworkStats> {
        self.ask(Command::Stats).await
    }

    /// Asks for the counters now and returns where they will arrive, so that the caller can
    /// wait for them without holding anything (`None` if the thread is gone).
    pub fn request_stats(&self) -> Option<oneshot::Receiver<NetworkStats>> {
        let (reply, rx) = oneshot::channel();
        self.commands.send(Command::Stats(reply)).then_some(rx)
    }

    /// Replaces the tunnel's member hosts.
    pub fn set_members(&self, members: Vec<std::net::IpAddr>) -> io::Result<()> {
        self.send(Command::TunnelMembers(members))
    }

    /// Records (or, with `None`, forgets) an endpoint on another host.
    pub fn set_remote(&self, mac: [u8; 6], host: Option<std::net::IpAddr>) -> io::Result<()> {
        self.send(Command::TunnelRemote { mac, host })
    }

    fn send(&self, cmd: Command) -> io::Result<()> {
        if self.commands.send(cmd) {
            Ok(())
        } else {
            Err(io::Error::other(STOPPED))
        }
    }

    /// Replaces the tunnel's external VTEPs.
    pub fn set_peers(&self, peers: Vec<std::net::IpAddr>) -> io::Result<()> {
        if self.commands.send(Command::TunnelPeers(peers)) {
            Ok(())
        } else {
            Err(io::Error::other(STOPPED))
        }
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.commands.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
