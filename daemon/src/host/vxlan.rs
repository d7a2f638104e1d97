//! The daemon's VXLAN sockets: one receiving socket on the VXLAN port (`--vxlan-port`, 4789)
//! whose packets go to the overlay network of their VNI, and a small pool of sending sockets,
//! picked by a hash of the inner flow, so that a flow keeps one outer source port and flows
//! spread over the underlay's paths, as the kernel's vxlan does.
//!
//! The sockets are opened when the first overlay network starts. Receiving is a thread of its
//! own that only demultiplexes; every check is the network's tunnel's, on its datapath thread.
//!
//! Both directions move packets in batches where the kernel offers it. Sending hands the
//! kernel a run of equal-sized packets in one call (UDP segmentation offload, `UDP_SEGMENT`),
//! which a veth or a NIC with USO carries whole as far as it can. Receiving asks for
//! coalesced runs (`UDP_GRO`) and takes up to [`RX_MSGS`] datagrams per system call
//! (`recvmmsg`); the packets of one sender and VNI go to their datapath in one message.

use std::collections::{HashMap, HashSet};
use std::io::{self, IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use nix::errno::Errno;
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg,
    sendmsg, setsockopt, sockopt,
};
use parking_lot::{Mutex, RwLock};

use crate::datapath::{Datagrams, Injector};

/// Sending sockets: distinct outer source ports for distinct flows.
const TX_SOCKETS: usize = 16;
/// Largest UDP payload read: a jumbo inner frame plus the VXLAN header, or a coalesced run.
const RX_BUF: usize = 65_536;
/// Datagrams taken per `recvmmsg`.
const RX_MSGS: usize = 32;
/// Receive buffer asked for: bursts of coalesced runs (64 KiB each) wait here while the
/// datapaths catch up. Root gets it whole; others up to `net.core.rmem_max`.
const RX_SOCKET_BUF: usize = 8 * 1024 * 1024;
/// Refusals of `UDP_SEGMENT` in a row, with no success between, after which it is not tried
/// again.
const GSO_GIVE_UP: u32 = 64;
/// A batch for one datapath is handed over once it holds this many bytes.
const BATCH_BYTES: usize = 256 * 1024;

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
    /// Whether sending with `UDP_SEGMENT` works (until the kernel refuses it for good).
    gso: AtomicBool,
    /// Refusals of `UDP_SEGMENT` since it last worked.
    gso_refused: AtomicU32,
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
        if setsockopt(&rx, sockopt::RcvBufForce, &RX_SOCKET_BUF).is_err() {
            let _ = setsockopt(&rx, sockopt::RcvBuf, &RX_SOCKET_BUF);
        }
        // Coalesced runs where the kernel has them; without, datagrams come one by one.
        if let Err(e) = setsockopt(&rx, sockopt::UdpGroSegment, &true) {
            tracing::debug!(error = %e, "no UDP GRO on the VXLAN socket");
        }
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
            gso: AtomicBool::new(true),
            gso_refused: AtomicU32::new(0),
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

    /// Sends the VXLAN packets in `packets` (each `size` bytes long, the last perhaps shorter)
    /// to `host` from the sending socket of `flow`, in one call where the kernel takes them so.
    /// Never blocks: a full socket buffer drops packets. Returns how many were dropped.
    pub fn send(&self, flow: usize, packets: &[u8], size: usize, host: IpAddr) -> u64 {
        let s = &self.tx[flow % self.tx.len()];
        let to = SocketAddr::new(host, self.port);
        if packets.len() > size && size > 0 && self.gso.load(Ordering::Relaxed) {
            let dest = SockaddrStorage::from(to);
            let seg = size as u16;
            let cmsg = [ControlMessage::UdpGsoSegments(&seg)];
            let iov = [IoSlice::new(packets)];
            match sendmsg(s.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), Some(&dest)) {
                Ok(_) => {
                    self.gso_refused.store(0, Ordering::Relaxed);
                    return 0;
                }
                // No segmentation offload on this way out (EIO: a route without checksum
                // offload, IPsec), or none at all: these packets leave one by one, and after
                // a run of refusals with no success between, all of them do.
                Err(e @ (Errno::EIO | Errno::EINVAL | Errno::EOPNOTSUPP | Errno::ENOPROTOOPT)) => {
                    let streak = self.gso_refused.fetch_add(1, Ordering::Relaxed) + 1;
                    if streak >= GSO_GIVE_UP || matches!(e, Errno::EOPNOTSUPP | Errno::ENOPROTOOPT)
                    {
                        tracing::info!(error = %e, "UDP segmentation offload refused; VXLAN packets leave one by one");
                        self.gso.store(false, Ordering::Relaxed);
                    }
                }
                Err(_) => return packets.len().div_ceil(size) as u64,
            }
        }
        let mut dropped = 0;
        for p in packets.chunks(size.max(1)) {
            if s.send_to(p, to).is_err() {
                dropped += 1;
            }
        }
        dropped
    }

    /// Packets for no network here, and packets that were not VXLAN.
    pub fn dropped(&self) -> (u64, u64) {
        (
            self.unknown_vni.load(Ordering::Relaxed),
            self.malformed.load(Ordering::Relaxed),
        )
    }

    fn receive(&self) {
        let mut bufs = vec![vec![0u8; RX_BUF]; RX_MSGS];
        // (length, sender, length of each packet in it)
        let mut got: Vec<(usize, Option<IpAddr>, usize)> = Vec::with_capacity(RX_MSGS);
        let mut batches: Vec<(u32, Datagrams)> = Vec::new();
        loop {
            match read_batch(&self.rx, &mut bufs, &mut got) {
                Ok(()) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    // Memory pressure and the like pass; the socket stays.
                    tracing::warn!(error = %e, "VXLAN receive failed");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                }
            }
            for (&(n, from, size), buf) in got.iter().zip(&bufs) {
                let Some(from) = from else {
                    // Dropped when read (cut short, or a run without its segment size).
                    self.malformed.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                for packet in buf[..n.min(RX_BUF)].chunks(size.max(1)) {
                    self.sort(from, packet, &mut batches);
                }
            }
            self.hand_over(&mut batches);
        }
    }

    /// Adds `packet` to the batch of its sender and VNI.
    fn sort(&self, from: IpAddr, packet: &[u8], batches: &mut Vec<(u32, Datagrams)>) {
        let Some((vni, _)) = vswitch_switch::vxlan::parse(packet) else {
            self.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let i = match batches
            .iter()
            .position(|(v, b)| *v == vni && b.from == from)
        {
            Some(i) if batches[i].1.bytes() < BATCH_BYTES => i,
            _ => {
                batches.push((vni, Datagrams::new(from)));
                batches.len() - 1
            }
        };
        batches[i].1.push(packet);
    }

    /// Hands each batch to its network, or drops it (counted) if it comes from somebody the
    /// network does not take packets from.
    fn hand_over(&self, batches: &mut Vec<(u32, Datagrams)>) {
        let routes = self.routes.read();
        for (vni, batch) in batches.drain(..) {
            let n = batch.count() as u64;
            match routes.get(&vni) {
                Some(r) if !r.senders.contains(&batch.from) => {
                    r.strangers.fetch_add(n, Ordering::Relaxed);
                }
                // The network's tunnel checks every frame; the tunnel's own backlog drops what
                // does not fit (counted), so a flood never grows memory or crowds out the
                // network's DNS answers.
                Some(r) => {
                    r.injector.tunnel_in(batch);
                }
                None => {
                    self.unknown_vni.fetch_add(n, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Waits for datagrams and reads as many as are there (up to one per buffer): for each, its
/// length, its sender and the length of the packets in it (a coalesced run holds several).
fn read_batch(
    socket: &UdpSocket,
    bufs: &mut [Vec<u8>],
    got: &mut Vec<(usize, Option<IpAddr>, usize)>,
) -> nix::Result<()> {
    got.clear();
    // Fresh headers every time: the kernel shrinks each header's control and address lengths
    // to what it wrote, and nix does not restore them, so reused headers would truncate the
    // next call's GRO control message (and a longer address).
    let mut headers =
        MultiHeaders::<SockaddrStorage>::preallocate(bufs.len(), Some(nix::cmsg_space!(i32)));
    let mut slices: Vec<[IoSliceMut; 1]> = bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
    let flags = MsgFlags::MSG_WAITFORONE;
    for r in recvmmsg(
        socket.as_raw_fd(),
        &mut headers,
        slices.iter_mut(),
        flags,
        None,
    )? {
        // Without its control message a coalesced run cannot be cut: dropped (no sender).
        let Ok(mut cmsgs) = r.cmsgs() else {
            got.push((0, None, 0));
            continue;
        };
        let gro = cmsgs.find_map(|m| match m {
            ControlMessageOwned::UdpGroSegments(n) => usize::try_from(n).ok(),
            _ => None,
        });
        // Cut short (longer than the buffer): its last packet is incomplete.
        if r.flags.contains(MsgFlags::MSG_TRUNC) {
            got.push((0, None, 0));
            continue;
        }
        let from = r.address.as_ref().and_then(sender);
        got.push((r.bytes, from, gro.filter(|&n| n > 0).unwrap_or(r.bytes)));
    }
    Ok(())
}

/// The IP address of a datagram's sender.
fn sender(addr: &SockaddrStorage) -> Option<IpAddr> {
    if let Some(a) = addr.as_sockaddr_in() {
        return Some(IpAddr::V4(a.ip()));
    }
    Some(IpAddr::V6(addr.as_sockaddr_in6()?.ip()))
}
