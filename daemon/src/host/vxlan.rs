//! The daemon's VXLAN sockets: one receiving socket on the VXLAN port (`--vxlan-port`, 4789)
//! whose packets go to the overlay network of their VNI, and a small pool of sending sockets,
//! picked by a hash of the inner flow, so that a flow keeps one outer source port and flows
//! spread over the underlay's paths, as the kernel's vxlan does.
//!
//! The sockets are opened when the first overlay network starts. Receiving is a thread of its
//! own that only demultiplexes; every check is the network's tunnel's, on its datapath thread.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};

use crate::datapath::Injector;

/// Sending sockets: distinct outer source ports for distinct flows.
const TX_SOCKETS: usize = 16;
/// Largest UDP payload read: a jumbo inner frame plus the VXLAN header.
const RX_BUF: usize = 65_536;

/// `--vxlan-port` and `--advertise-addr`.
#[derive(Debug, Clone, Copy)]
pub struct VxlanConfig {
    pub port: u16,
    pub advertise: Option<IpAddr>,
}

impl Default for VxlanConfig {
    fn default() -> Self {
        Self {
            port: vswitch_switch::vxlan::VXLAN_PORT,
            advertise: None,
        }
    }
}

/// The daemon's VXLAN endpoint, opened on first use.
pub struct VxlanHost {
    pub config: VxlanConfig,
    open: Mutex<Option<Arc<Sockets>>>,
}

impl VxlanHost {
    pub fn new(config: VxlanConfig) -> Self {
        Self {
            config,
            open: Mutex::new(None),
        }
    }

    /// The sockets, opened (and the receiving thread started) on the first call.
    pub fn sockets(&self) -> io::Result<Arc<Sockets>> {
        let mut open = self.open.lock();
        if let Some(s) = &*open {
            return Ok(s.clone());
        }
        let s = Arc::new(Sockets::open(self.config)?);
        let rx = s.clone();
        std::thread::Builder::new()
            .name("vxlan-rx".into())
            .spawn(move || rx.receive())?;
        *open = Some(s.clone());
        Ok(s)
    }
}

/// Where packets of one VNI go, and who may send them.
struct Route {
    injector: Injector,
    /// Members and peers: packets from anybody else are dropped here, before they are copied
    /// or queued (the tunnel checks again, with the frame).
    senders: HashSet<IpAddr>,
    /// Packets dropped for coming from somebody else.
    strangers: AtomicU64,
}

pub struct Sockets {
    rx: UdpSocket,
    tx: Vec<UdpSocket>,
    /// The port VTEPs listen on (ours and everybody's).
    pub port: u16,
    /// The family of the underlay (the sockets').
    pub ipv6: bool,
    routes: RwLock<HashMap<u32, Route>>,
    /// Packets for a VNI no network here has.
    unknown_vni: AtomicU64,
    /// Packets that were not VXLAN at all.
    malformed: AtomicU64,
}

impl Sockets {
    fn open(config: VxlanConfig) -> io::Result<Self> {
        let any = match config.advertise {
            Some(IpAddr::V6(_)) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        let local = config.advertise.unwrap_or(any);
        let rx = UdpSocket::bind(SocketAddr::new(local, config.port)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot listen for VXLAN on {local} port {}: {e}",
                    config.port
                ),
            )
        })?;
        let tx = (0..TX_SOCKETS)
            .map(|_| {
                let s = UdpSocket::bind(SocketAddr::new(local, 0))?;
                s.set_nonblocking(true)?;
                Ok(s)
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self {
            rx,
            tx,
            port: config.port,
            ipv6: local.is_ipv6(),
            routes: RwLock::new(HashMap::new()),
            unknown_vni: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
        })
    }

    /// Hands packets of `vni` from `senders` to a network's datapath from now on.
    pub fn register(
        &self,
        vni: u32,
        injector: Injector,
        senders: impl IntoIterator<Item = IpAddr>,
    ) {
        let route = Route {
            injector,
            senders: senders.into_iter().collect(),
            strangers: AtomicU64::new(0),
        };
        if self.routes.write().insert(vni, route).is_some() {
            tracing::error!(vni, "two overlay networks with one VNI; the later one wins");
        }
    }

    /// Who may send packets of `vni` (members and peers).
    pub fn set_senders(&self, vni: u32, senders: impl IntoIterator<Item = IpAddr>) {
        if let Some(r) = self.routes.write().get_mut(&vni) {
            r.senders = senders.into_iter().collect();
        }
    }

    /// Packets of `vni` dropped for coming from neither a member nor a peer.
    pub fn strangers(&self, vni: u32) -> u64 {
        self.routes
            .read()
            .get(&vni)
            .map_or(0, |r| r.strangers.load(Ordering::Relaxed))
    }

    pub fn unregister(&self, vni: u32) {
        self.routes.write().remove(&vni);
    }

    /// How many sending sockets there are (the range of [`Sockets::send`]'s `flow`).
    pub fn senders(&self) -> usize {
        self.tx.len()
    }

    /// Sends one VXLAN packet to `host` from the sending socket of `flow`. Never blocks: a full
    /// socket buffer drops the packet (the caller counts it).
    pub fn send(&self, flow: usize, packet: &[u8], host: IpAddr) -> io::Result<()> {
        let s = &self.tx[flow % self.tx.len()];
        s.send_to(packet, SocketAddr::new(host, self.port))
            .map(|_| ())
    }

    /// Packets for no network here, and packets that were not VXLAN.
    pub fn dropped(&self) -> (u64, u64) {
        (
            self.unknown_vni.load(Ordering::Relaxed),
            self.malformed.load(Ordering::Relaxed),
        )
    }

    fn receive(&self) {
        let mut buf = vec![0u8; RX_BUF];
        loop {
            let (n, from) = match self.rx.recv_from(&mut buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Memory pressure and the like pass; the socket stays.
                    tracing::warn!(error = %e, "VXLAN receive failed");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                }
            };
            let packet = &buf[..n];
            let Some((vni, _)) = vswitch_switch::vxlan::parse(packet) else {
                self.malformed.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let routes = self.routes.read();
            match routes.get(&vni) {
                Some(r) if !r.senders.contains(&from.ip()) => {
                    r.strangers.fetch_add(1, Ordering::Relaxed);
                }
                // The network's tunnel checks the frame; the tunnel's own backlog drops what
                // does not fit (counted), so a flood never grows memory or crowds out the
                // network's DNS answers.
                Some(r) => {
                    r.injector.tunnel_in(from.ip(), packet.to_vec());
                }
                None => {
                    self.unknown_vni.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}
