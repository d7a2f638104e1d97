//! The daemon's VXLAN sockets: one receiving socket on the VXLAN port (`--vxlan-port`, 4789)
//! whose packets go to the overlay network of their VNI, and a small pool of sending sockets,
//! picked by a hash of the inner flow, so that a flow keeps one outer source port and flows
//! spread over the underlay's paths, as the kernel's vxlan does.
//!
//! The sockets are opened when the first overlay network starts. Receiving is a thread of its
//! own that only demultiplexes; every check is the network's tunnel's, on its datapath thread.

use std::collections::HashMap;
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

pub struct Sockets {
    rx: UdpSocket,
    tx: Vec<UdpSocket>,
    /// The port VTEPs listen on (ours and everybody's).
    pub port: u16,
    routes: RwLock<HashMap<u32, Injector>>,
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
            routes: RwLock::new(HashMap::new()),
            unknown_vni: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
        })
    }

    /// Hands packets of `vni` to a network's datapath from now on.
    pub fn register(&self, vni: u32, injector: Injector) {
        self.routes.write().insert(vni, injector);
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
                    tracing::error!(error = %e, "VXLAN socket failed; overlay networks receive nothing more");
                    return;
                }
            };
            let packet = &buf[..n];
            let Some((vni, _)) = vswitch_switch::vxlan::parse(packet) else {
                self.malformed.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let routes = self.routes.read();
            match routes.get(&vni) {
                // The network's tunnel checks the sender and the frame; a full backlog drops
                // (counted by the injector), so a flood never grows memory.
                Some(inj) => {
                    inj.tunnel_in(from.ip(), packet.to_vec());
                }
                None => {
                    self.unknown_vni.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}
