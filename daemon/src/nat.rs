//! The host side of published ports and outbound NAT: tokio sockets spliced to TCP flows that
//! the gateway terminates in the datapath thread.
//!
//! Backpressure both ways, with no unbounded buffer:
//! - host -> container: the reader takes byte credits from [`FlowShared::credits`] before each
//!   read; the datapath returns them as bytes enter the smoltcp socket. Each queued chunk is
//!   also charged [`CHUNK_OVERHEAD`] (returned when the datapath has used it up), and a short
//!   chunk is shrunk to its length, so at most about [`WINDOW`] bytes of memory per flow are ever
//!   queued between the two, however small the pieces a peer sends.
//! - container -> host: the datapath hands chunks through a bounded channel
//!   ([`CHANNEL_CHUNKS`]); when it is full it stops reading from the socket (the container's
//!   window closes) and sets `blocked`; the writer, after writing a chunk, wakes it up again.
//!
//! A FIN on either side becomes a half-close on the other; a reset or error becomes a reset.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use vswitch_nat::FlowId;

use super::datapath::Injector;

/// Bytes of one flow in flight from the host to the datapath, read in chunks of [`CHUNK`].
/// Fewer, larger chunks mean fewer hand-offs and wake-ups per byte: 64 KiB / 512 KiB carried a
/// remote client's stream at 5.4-6.4 Gbit/s, 256 KiB / 1 MiB at 6.8-7.5 (interleaved runs).
const WINDOW: usize = 1024 * 1024;
const CHUNK: usize = 256 * 1024;
/// What a queued chunk costs beyond its bytes (allocation, queue slot, command), charged
/// against the window: a peer trickling 1-byte segments can queue 4096 chunks, not a million.
pub const CHUNK_OVERHEAD: usize = 256;
/// Chunks of one flow queued from the datapath to the host.
const CHANNEL_CHUNKS: usize = 8;
/// Receive buffer of each outbound UDP or ping flow: up to 4096 flows per network each hold
/// one, so it is sized for what can reach a container unfragmented (and EDNS answers), not
/// for 64 KiB; a longer datagram is dropped.
const FLOW_DATAGRAM_MAX: usize = 4096;
/// How long an outbound dial may take before the container is refused.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Where containers may go through NAT. Shared by the daemon (which keeps it current) and the
/// datapaths and dial tasks (which consult it for every new flow).
///
/// - The gateway's own address means "the host": only the published ports are reachable there
///   (that is hairpin), unless the daemon runs with `--allow-host-loopback`, which opens every
///   service listening on the host's loopback. Safe by default: a container cannot reach a
///   database or admin socket bound to 127.0.0.1 on the host.
/// - Addresses inside any vswitch network are refused: networks stay isolated even through
///   NAT, and such traffic never leaks to a LAN that happens to use the same range.
/// - Everything else is dialled from the daemon's namespace.
#[derive(Debug, Default)]
pub struct Policy {
    pub subnets: Vec<ipnet::IpNet>,
    pub published: std::collections::HashSet<(vswitch_nat::Proto, u16)>,
    pub host_loopback: bool,
}

pub type SharedPolicy = Arc<std::sync::RwLock<Policy>>;

impl Policy {
    /// The host address to dial for a container's connection to `dst`, or `None` if refused.
    pub fn outbound_target(
        &self,
        proto: vswitch_nat::Proto,
        dst: SocketAddr,
        gateway: &[IpAddr],
    ) -> Option<SocketAddr> {
        let ip = dst.ip();
        if gateway.contains(&ip) {
            if !self.host_loopback && !self.published.contains(&(proto, dst.port())) {
                return None;
            }
            let lo: IpAddr = match ip {
                IpAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
                IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            };
            return Some(SocketAddr::new(lo, dst.port()));
        }
        if self.subnets.iter().any(|n| n.contains(&ip)) || ip.is_loopback() || ip.is_unspecified() {
            return None;
        }
        Some(dst)
    }
}

/// Reads a shared policy, tolerating poisoning (the data is plain sets).
pub fn read_policy(p: &SharedPolicy) -> std::sync::RwLockReadGuard<'_, Policy> {
    match p.read() {
        Ok(g) => g,
        Err(e) => e.into_inner(),
    }
}

/// State shared by the two halves of a flow's splice.
#[derive(Debug)]
pub struct FlowShared {
    pub credits: Semaphore,
    pub blocked: AtomicBool,
    pub reset: AtomicBool,
}

/// What the datapath keeps of a flow's host side.
#[derive(Debug)]
pub struct FlowChannel {
    pub to_host: tokio::sync::mpsc::Sender<Vec<u8>>,
    pub shared: Arc<FlowShared>,
}

fn channel() -> (
    FlowChannel,
    tokio::sync::mpsc::Receiver<Vec<u8>>,
    Arc<FlowShared>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(CHANNEL_CHUNKS);
    let shared = Arc::new(FlowShared {
        credits: Semaphore::new(WINDOW),
        blocked: AtomicBool::new(false),
        reset: AtomicBool::new(false),
    });
    (
        FlowChannel {
            to_host: tx,
            shared: shared.clone(),
        },
        rx,
        shared,
    )
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
    Udp { key: (SocketAddr, SocketAddr) },
    /// (container, echo id, destination); raw sockets see IP headers and everybody's replies.
    Icmp {
        key: (IpAddr, u16, IpAddr),
        raw: bool,
    },
}

/// Work the datapath hands to tokio.
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

/// Runs NAT jobs as they come, one task each.
pub async fn run_jobs(mut jobs: tokio::sync::mpsc::UnboundedReceiver<NatJob>) {
    while let Some(job) = jobs.recv().await {
        match job {
            NatJob::Receive(job) => {
                tokio::spawn(receive(job));
            }
            NatJob::Dial {
                flow,
                src,
                dst,
                gateway,
                policy,
                injector,
            } => {
                let target =
                    read_policy(&policy).outbound_target(vswitch_nat::Proto::Tcp, dst, &gateway);
                match target {
                    Some(target) => {
                        tokio::spawn(dial(flow, src, dst, target, injector));
                    }
                    None => {
                        tracing::debug!(%src, %dst, "outbound connection not allowed");
                        injector.nat_dialed(flow, None);
                    }
                }
            }
        }
    }
}

async fn dial(
    flow: FlowId,
    src: SocketAddr,
    dst: SocketAddr,
    target: SocketAddr,
    injector: Injector,
) {
    match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(stream)) => {
            let (ch, rx, shared) = channel();
            injector.nat_dialed(flow, Some(ch));
            splice(stream, flow, injector, rx, shared).await;
        }
        Ok(Err(e)) => {
            tracing::debug!(%src, %dst, error = %e, "outbound connection refused");
            injector.nat_dialed(flow, None);
        }
        Err(_) => {
            tracing::debug!(%src, %dst, "outbound connection timed out");
            injector.nat_dialed(flow, None);
        }
    }
}

/// Copies bytes between a host TCP stream and a gateway flow until both directions are done.
pub async fn splice(
    mut stream: TcpStream,
    flow: FlowId,
    injector: Injector,
    mut to_host: tokio::sync::mpsc::Receiver<Vec<u8>>,
    shared: Arc<FlowShared>,
) {
    let _ = stream.set_nodelay(true);
    let reset = {
        let (mut rd, mut wr) = stream.split();
        let up = async {
            loop {
                // Credits first: never read more than the datapath can queue.
                let Ok(permit) = shared
                    .credits
                    .acquire_many((CHUNK + CHUNK_OVERHEAD) as u32)
                    .await
                else {
                    return; // the flow is gone
                };
                permit.forget();
                // Read straight into the chunk that travels to the datapath: no zeroing, no copy.
                let mut buf = Vec::with_capacity(CHUNK);
                match rd.read_buf(&mut buf).await {
                    Ok(0) => {
                        shared.credits.add_permits(CHUNK + CHUNK_OVERHEAD);
                        injector.host_eof(flow);
                        return;
                    }
                    Ok(n) => {
                        // Kept: n bytes plus the overhead, returned by the datapath.
                        shared.credits.add_permits(CHUNK - n);
                        if n < CHUNK / 2 {
                            buf.shrink_to_fit();
                        }
                        if !injector.host_data(flow, buf) {
                            return;
                        }
                    }
                    Err(_) => {
                        injector.host_reset(flow);
                        return;
                    }
                }
            }
        };
        let down = async {
            while let Some(chunk) = to_host.recv().await {
                if wr.write_all(&chunk).await.is_err() {
                    injector.host_reset(flow);
                    shared.credits.close();
                    return false;
                }
                if shared.blocked.swap(false, Ordering::AcqRel) {
                    injector.resume(flow);
                }
            }
            if shared.reset.load(Ordering::Acquire) {
                shared.credits.close();
                return true;
            }
            let _ = wr.shutdown().await;
            false
        };
        tokio::pin!(up);
        tokio::pin!(down);
        // A reset from the container ends everything at once; a FIN from it leaves the host's
        // sending half running until the host closes too.
        tokio::select! {
            reset = &mut down => {
                if !reset {
                    (&mut up).await;
                }
                reset
            }
            () = &mut up => down.await,
        }
    };
    if reset {
        // The container reset the connection: reset the host side too.
        let _ = stream.set_zero_linger();
    }
}

/// Whether a published-port client can appear to the container as itself. The container sees
/// the real client address, except for clients it could not answer directly: loopback, the
/// other address family, or an address of its own network. Those appear as the gateway.
fn shown_as_itself(ip: IpAddr, container: SocketAddr, subnet: &ipnet::IpNet) -> bool {
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_ipv4() != container.is_ipv4()
        || subnet.contains(&ip))
}

/// Accepts connections on a published TCP port and carries each to the container.
///
/// Clients the container can see as themselves go through the gateway's TCP stack, which
/// originates the connection from the client's address. The others (see [`shown_as_itself`])
/// take the in-kernel path of [`super::direct`] when `direct` is given, and otherwise go
/// through the gateway too, appearing as the gateway. Connection tasks belong to this loop:
/// aborting it (detach, GC) ends them.
pub async fn serve_published_tcp(
    listener: TcpListener,
    container: SocketAddr,
    gateway: IpAddr,
    subnet: ipnet::IpNet,
    injector: Injector,
    direct: Option<super::direct::Inside>,
) {
    static EPHEMERAL: AtomicU16 = AtomicU16::new(0);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            Some(_) = conns.join_next() => continue,
        };
        let (stream, client) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept on a published port failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ip = client.ip().to_canonical();
        let itself = shown_as_itself(ip, container, &subnet);
        let injector = injector.clone();
        let direct = direct.clone().filter(|_| !itself);
        conns.spawn(async move {
            let stream = match direct {
                Some(d) => match super::direct::connect(&d, container).await {
                    Ok(Some(inner)) => {
                        return super::direct::splice_streams(stream, inner).await;
                    }
                    Ok(None) => {
                        // Refused or unanswered in the container: the client sees a reset.
                        let _ = stream.set_zero_linger();
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "in-kernel path unavailable; using the gateway");
                        stream
                    }
                },
                None => stream,
            };
            let local = if itself {
                SocketAddr::new(ip, client.port())
            } else {
                let port = 32768 + EPHEMERAL.fetch_add(1, Ordering::Relaxed) % 28000;
                SocketAddr::new(gateway, port)
            };
            let (ch, rx, shared) = channel();
            match injector.nat_open(local, container, ch).await {
                Some(flow) => splice(stream, flow, injector, rx, shared).await,
                None => drop(stream),
            }
        });
    }
}

/// The receive loop of an outbound flow: one socket read per answer, turned into a frame.
async fn receive(job: FlowReceive) {
    let Ok(sock) = job
        .socket
        .try_clone()
        .and_then(tokio::net::UdpSocket::from_std)
    else {
        return;
    };
    let mut buf = vec![0u8; FLOW_DATAGRAM_MAX];
    while job.alive.load(Ordering::Acquire) {
        let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), sock.recv(&mut buf)).await
        else {
            continue;
        };
        let delivered = match job.kind {
            ReceiveKind::Udp {
                key: (container, peer),
            } => {
                let Some(frame) = super::datapath::build_udp_frame(
                    job.gateway_mac,
                    job.container_mac,
                    peer,
                    container,
                    &buf[..n],
                ) else {
                    continue;
                };
                job.injector.udp_in((container, peer), frame, None)
            }
            ReceiveKind::Icmp { key, raw } => {
                let Some(frame) = echo_reply_frame(&job, key, raw, &buf[..n]) else {
                    continue;
                };
                job.injector.icmp_in(key, frame)
            }
        };
        if !delivered {
            return;
        }
    }
}

/// The frame for the container from an echo reply read on a flow's ICMP socket, or `None` if
/// the datagram is not a reply of this flow.
fn echo_reply_frame(
    job: &FlowReceive,
    (container, id, dst): (IpAddr, u16, IpAddr),
    raw: bool,
    datagram: &[u8],
) -> Option<Vec<u8>> {
    let (IpAddr::V4(container), IpAddr::V4(dst)) = (container, dst) else {
        return None;
    };
    // Raw sockets deliver the IP header too.
    let icmp_bytes = if raw {
        let ihl = usize::from(datagram.first()? & 0x0f) * 4;
        datagram.get(ihl..)?
    } else {
        datagram
    };
    let (header, payload) = etherparse::Icmpv4Header::from_slice(icmp_bytes).ok()?;
    let etherparse::Icmpv4Type::EchoReply(echo) = header.icmp_type else {
        return None;
    };
    if raw && echo.id != id {
        return None; // a raw socket sees every reply from dst, not just ours
    }
    let mut frame = vec![0u8; super::datapath::VNET_HDR];
    etherparse::PacketBuilder::ethernet2(job.gateway_mac, job.container_mac)
        .ipv4(dst.octets(), container.octets(), 64)
        .icmpv4_echo_reply(id, echo.seq)
        .write(&mut frame, payload)
        .ok()?;
    Some(frame)
}

/// Receives datagrams on a published UDP port and carries them to the container, each client
/// as its own flow (its replies go back to it through the same socket).
pub async fn serve_published_udp(
    socket: std::net::UdpSocket,
    container: SocketAddr,
    container_mac: [u8; 6],
    gateway: IpAddr,
    gateway_mac: [u8; 6],
    subnet: ipnet::IpNet,
    injector: Injector,
) {
    let Ok(send) = socket.try_clone().map(Arc::new) else {
        return;
    };
    let Ok(sock) = tokio::net::UdpSocket::from_std(socket) else {
        return;
    };
    let mut buf = vec![0u8; 65_535];
    // Clients that cannot be shown as themselves get a gateway port each, remembered so that
    // their replies find them (bounded; the oldest half is forgotten when full).
    let mut masq: std::collections::HashMap<SocketAddr, SocketAddr> = Default::default();
    let mut next_port: u16 = 0;
    loop {
        let Ok((n, client)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        let ip = client.ip().to_canonical();
        let seen_as = if !shown_as_itself(ip, container, &subnet) {
            if masq.len() >= 4096 {
                masq.clear();
            }
            *masq.entry(client).or_insert_with(|| {
                next_port = next_port.wrapping_add(1);
                SocketAddr::new(gateway, 32768 + next_port % 28000)
            })
        } else {
            SocketAddr::new(ip, client.port())
        };
        let Some(frame) = super::datapath::build_udp_frame(
            gateway_mac,
            container_mac,
            seen_as,
            container,
            &buf[..n],
        ) else {
            continue;
        };
        if !injector.udp_in((container, seen_as), frame, Some((send.clone(), client))) {
            return;
        }
    }
}

/// An ICMP socket connected to `dst`: an unprivileged ping socket if the namespace allows it
/// (`net.ipv4.ping_group_range`), else a raw socket (needs CAP_NET_RAW). The bool says raw.
pub fn icmp_socket(dst: IpAddr) -> Option<(Arc<std::net::UdpSocket>, bool)> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockProtocol, SockType, SockaddrIn, connect, socket,
    };
    let IpAddr::V4(v4) = dst else { return None };
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
        &SockaddrIn::from(std::net::SocketAddrV4::new(v4, 0)),
    )
    .ok()?;
    // A datagram socket of another protocol: std's UdpSocket is only a wrapper over send/recv.
    Some((Arc::new(std::net::UdpSocket::from(fd)), raw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vswitch_nat::Proto;

    /// A peer that sends one byte at a time to a container that reads nothing: the chunks it
    /// makes are charged their overhead, so the reader stops after a bounded number of them
    /// instead of queueing a 256 KiB buffer (or even a small one) per byte without end.
    #[test]
    fn trickled_bytes_queue_a_bounded_number_of_small_chunks() {
        use std::io::Write;
        let (injector, captured) = Injector::capturing().expect("injector");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut peer =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        peer.set_nodelay(true).expect("nodelay");
        let (ours, _) = listener.accept().expect("accept");
        ours.set_nonblocking(true).expect("nonblocking");
        let (flow_channel, to_host, shared) = channel();
        let credits = shared.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let splicer = std::thread::spawn(move || {
            rt.block_on(async move {
                let stream = TcpStream::from_std(ours).expect("tokio stream");
                tokio::time::timeout(
                    Duration::from_secs(20),
                    splice(stream, FlowId(1), injector, to_host, shared),
                )
                .await
            })
        });

        // One byte per chunk: each is written only once the one before has arrived. The reader
        // needs a whole chunk's credits before each read, so it stops after this many.
        let expected = (WINDOW - (CHUNK + CHUNK_OVERHEAD)) / (1 + CHUNK_OVERHEAD) + 1;
        assert!(
            expected <= 4096,
            "thousands of small chunks at most, not a million"
        );
        let mut chunks = Vec::new();
        for i in 0..expected {
            peer.write_all(b"x").expect("write");
            let chunk = captured
                .next_data(Duration::from_secs(10))
                .unwrap_or_else(|| panic!("chunk {i} of {expected} never came"));
            assert_eq!(chunk.len(), 1);
            chunks.push(chunk);
        }
        peer.write_all(b"x").expect("write");
        assert!(
            captured.next_data(Duration::from_millis(500)).is_none(),
            "still reading after {expected} one-byte chunks"
        );
        let held: usize = chunks.iter().map(|c| c.capacity()).sum();
        assert!(
            held <= chunks.len() * 8,
            "short chunks shrunk: {held} bytes held"
        );

        // As the datapath uses chunks up, their credits come back and reading resumes.
        credits
            .credits
            .add_permits(CHUNK + CHUNK_OVERHEAD + chunks.len());
        assert_eq!(
            captured.next_data(Duration::from_secs(5)).map(|c| c.len()),
            Some(1),
            "the pending byte is read once credits return"
        );
        // Both sides closing ends the splice.
        drop(peer);
        drop(flow_channel);
        assert!(splicer.join().expect("splicer").is_ok(), "splice ended");
    }

    #[test]
    fn policy() {
        let gw: Vec<IpAddr> = vec!["10.1.0.1".parse().expect("ip")];
        let mut p = Policy {
            subnets: vec![
                "10.1.0.0/24".parse().expect("net"),
                "10.2.0.0/24".parse().expect("net"),
            ],
            ..Default::default()
        };
        p.published.insert((Proto::Tcp, 8081));
        let sa = |s: &str| s.parse::<SocketAddr>().expect("sa");
        assert_eq!(
            p.outbound_target(Proto::Tcp, sa("10.1.0.1:8081"), &gw),
            Some(sa("127.0.0.1:8081"))
        );
        assert_eq!(
            p.outbound_target(Proto::Udp, sa("10.1.0.1:8081"), &gw),
            None,
            "UDP 8081 not published"
        );
        assert_eq!(
            p.outbound_target(Proto::Tcp, sa("10.1.0.1:22"), &gw),
            None,
            "host loopback closed"
        );
        assert_eq!(
            p.outbound_target(Proto::Tcp, sa("10.2.0.5:80"), &gw),
            None,
            "other network"
        );
        assert_eq!(p.outbound_target(Proto::Tcp, sa("127.0.0.1:80"), &gw), None);
        assert_eq!(
            p.outbound_target(Proto::Tcp, sa("192.0.2.2:80"), &gw),
            Some(sa("192.0.2.2:80"))
        );
        p.host_loopback = true;
        assert_eq!(
            p.outbound_target(Proto::Tcp, sa("10.1.0.1:22"), &gw),
            Some(sa("127.0.0.1:22"))
        );
    }
}
