//! The simulation harness: real datapath threads, with `socketpair(SOCK_SEQPACKET)` ends
//! standing in for TAPs (a seqpacket socket keeps frame boundaries, as a TAP does), and the
//! daemon's real DNS responder, forwarder and NAT host side on a tokio runtime. No root, no
//! namespaces: traffic leaves only through the gateway's host sockets, to loopback.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etherparse::{PacketBuilder, SlicedPacket};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use tokio::sync::mpsc::UnboundedReceiver;
use vswitch_daemon::api::{FdbRow, NetworkStats};
use vswitch_daemon::datapath::{
    Datapath, DatapathSpec, DnsHook, Event, Links, PortSpec, SharedPolicy,
};
use vswitch_dns::upstream::{Forwarder, Upstreams};
use vswitch_dns::{Catalog, EndpointRecords, Responder, SharedCatalog, Zone};
use vswitch_nat::{GatewayConfig, Policy};
use vswitch_switch::vnet::VNET_HDR_LEN;
use vswitch_switch::{MacAddr, PortGuard, PortId};

pub use vswitch_tests::secs;

pub fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

/// What the daemon shares between its networks: DNS, NAT policy, the host side's tasks.
pub struct Sim {
    pub rt: tokio::runtime::Runtime,
    pub catalog: SharedCatalog,
    pub policy: SharedPolicy,
    links: Links,
    events: UnboundedReceiver<Event>,
}

impl Sim {
    /// A simulated daemon whose DNS forwards to `upstreams` (none: nothing is forwarded).
    pub fn new(upstreams: Vec<SocketAddr>) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let catalog = Catalog::default().shared();
        let policy: SharedPolicy = Arc::new(parking_lot::RwLock::new(Policy::default()));
        let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
        let (jobs, job_rx) = tokio::sync::mpsc::unbounded_channel();
        let (nat_jobs, nat_rx) = tokio::sync::mpsc::unbounded_channel();
        // An empty resolv.conf path: no upstream unless given.
        let upstreams = Arc::new(Upstreams::new(upstreams, PathBuf::from("/nonexistent")));
        let forwarder = Forwarder::new(upstreams, 64);
        rt.spawn(vswitch_daemon::host::dns::run_forwarder(
            forwarder.clone(),
            job_rx,
            vswitch_daemon::metrics::Metrics::default().upstream_latency,
        ));
        rt.spawn(vswitch_daemon::host::outbound::run_jobs(nat_rx));
        let links = Links {
            dns: Some(DnsHook {
                responder: Arc::new(Responder::new(catalog.clone(), 5)),
                forwarder,
                jobs,
            }),
            nat_jobs,
            policy: policy.clone(),
            events: events_tx,
        };
        Self {
            rt,
            catalog,
            policy,
            links,
            events,
        }
    }

    /// A network `name` on `10.N.0.0/24` (gateway `10.N.0.1`), its datapath not yet running;
    /// its ports are guarded (port security strict).
    pub fn network_paused(&self, name: &str, n: u8) -> Net {
        let gateway = Ipv4Addr::new(10, n, 0, 1);
        let gw_mac = MacAddr::from_ipv4(gateway);
        let spec = DatapathSpec {
            network_id: format!("net-{name}"),
            network_name: name.to_owned(),
            gateway: GatewayConfig {
                mac: gw_mac.0,
                ipv4: Some((gateway, 24)),
                ipv6: None,
                mtu: 1500,
                nat: true,
            },
            nice: 0,
            busy_poll: Duration::ZERO,
            tunnel: None,
        };
        let subnet: ipnet::IpNet = format!("10.{n}.0.0/24").parse().expect("subnet");
        self.policy.write().subnets.push(subnet);
        self.catalog.write().add_network(
            &spec.network_id,
            Zone::new(name, true, false, vec![(subnet.network(), 24)])
                .with_gateways(vec![gateway.into()]),
        );
        let dp = Datapath::new(spec.clone(), self.links.clone()).expect("datapath");
        Net {
            id: spec.network_id,
            n,
            gateway,
            gw_mac,
            dp,
            next_host: 2,
            guarded: true,
        }
    }

    /// A running network whose ports are not guarded (port security off).
    pub fn network_open(&self, name: &str, n: u8) -> Net {
        let mut net = self.network(name, n);
        net.guarded = false;
        net
    }

    /// A running network (see [`Sim::network_paused`]).
    pub fn network(&self, name: &str, n: u8) -> Net {
        let mut net = self.network_paused(name, n);
        net.dp.run().expect("run");
        net
    }

    /// Plugs a new port into `net` for host `name` (the next address, Docker's MAC), with its
    /// DNS records.
    pub fn plug(&self, net: &mut Net, name: &str) -> Port {
        let ip = Ipv4Addr::new(10, net.n, 0, net.next_host);
        net.next_host += 1;
        let mac = MacAddr::from_ipv4(ip);
        let guard = net.guarded.then(|| PortGuard {
            mac,
            ipv4: vec![ip],
            ipv6: vec![],
        });
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair");
        let port_id = format!("ep-{name}-{}", net.id);
        let id = self
            .rt
            .block_on(net.dp.add_port(
                theirs,
                PortSpec {
                    endpoint_id: port_id.clone(),
                    endpoint_name: name.to_owned(),
                    namespace: format!("scope-{name}"),
                    mac: mac.0,
                    guard,
                    addrs: Vec::new(),
                },
            ))
            .expect("add port");
        self.catalog.write().add_endpoint(
            &net.id,
            &EndpointRecords {
                id: port_id,
                scope: format!("scope-{name}"),
                name: name.to_owned(),
                aliases: vec![],
                addrs: vec![IpAddr::V4(ip)],
            },
        );
        Port {
            id,
            fd: ours,
            mac,
            ip,
            gateway: net.gateway,
            gw_mac: net.gw_mac,
        }
    }

    /// The next event of any datapath, waiting up to `timeout`.
    pub fn next_event(&mut self, timeout: Duration) -> Option<Event> {
        let events = &mut self.events;
        self.rt
            .block_on(async { tokio::time::timeout(timeout, events.recv()).await })
            .ok()
            .flatten()
    }

    pub fn stats(&self, net: &Net) -> NetworkStats {
        self.rt.block_on(net.dp.stats()).expect("stats")
    }

    /// The network's counters once `done` holds for them, waiting up to `timeout` (frames and
    /// the counters' request reach the datapath by different ways).
    pub fn stats_when(
        &self,
        net: &Net,
        timeout: Duration,
        done: impl Fn(&NetworkStats) -> bool,
    ) -> NetworkStats {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.stats(net);
            if done(&s) || Instant::now() >= deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn fdb(&self, net: &Net) -> Vec<FdbRow> {
        self.rt.block_on(net.dp.fdb()).expect("fdb")
    }
}

/// One simulated network.
pub struct Net {
    pub id: String,
    n: u8,
    pub gateway: Ipv4Addr,
    pub gw_mac: MacAddr,
    pub dp: Datapath,
    next_host: u8,
    /// Ports plugged from now on are guarded.
    pub guarded: bool,
}

/// A host on a simulated network: our end of its port.
pub struct Port {
    /// The switch port the datapath gave it.
    pub id: PortId,
    pub fd: OwnedFd,
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub gw_mac: MacAddr,
}

pub const BROADCAST: [u8; 6] = [0xff; 6];

impl Port {
    /// Sends an Ethernet frame (a zero virtio-net header goes in front).
    pub fn send(&self, eth: &[u8]) {
        let mut frame = vec![0u8; VNET_HDR_LEN];
        frame.extend_from_slice(eth);
        self.send_raw(&frame);
    }

    /// Sends bytes as they are, virtio-net header or not, waiting (up to two seconds) while
    /// the datapath has not read what came before.
    pub fn send_raw(&self, bytes: &[u8]) {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match nix::unistd::write(&self.fd, bytes) {
                Ok(n) => {
                    assert_eq!(n, bytes.len());
                    return;
                }
                Err(nix::errno::Errno::EAGAIN) if Instant::now() < deadline => {
                    let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLOUT)];
                    let _ = poll(&mut fds, PollTimeout::from(100u16));
                }
                Err(e) => panic!("write to the port: {e}"),
            }
        }
    }

    /// The next frame for this host (its Ethernet part), waiting up to `timeout`; ARP requests
    /// for its address are answered on the way, as a host's kernel would.
    pub fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 70_000];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => panic!("poll: {e}"),
            }
            let n = match nix::unistd::read(&self.fd, &mut buf) {
                Ok(0) => return None,
                Ok(n) => n,
                Err(nix::errno::Errno::EAGAIN) => continue,
                Err(e) => panic!("read: {e}"),
            };
            assert!(n >= VNET_HDR_LEN, "every frame has a virtio-net header");
            let eth = buf[VNET_HDR_LEN..n].to_vec();
            if self.answer_arp(&eth) {
                continue;
            }
            return Some(eth);
        }
    }

    /// The next frame that `want` accepts, skipping others, within `timeout`.
    pub fn recv_matching(
        &self,
        timeout: Duration,
        mut want: impl FnMut(&SlicedPacket<'_>) -> bool,
    ) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = self.recv(left)?;
            if SlicedPacket::from_ethernet(&frame).is_ok_and(|p| want(&p)) {
                return Some(frame);
            }
        }
    }

    /// Whether nothing arrives for `quiet`.
    pub fn silent_for(&self, quiet: Duration) -> bool {
        self.recv(quiet).is_none()
    }

    /// Answers an ARP request for this host's address; true if `eth` was one.
    fn answer_arp(&self, eth: &[u8]) -> bool {
        let Some(arp) = parse_arp(eth) else {
            return false;
        };
        if arp.op != 1 || arp.target_ip != self.ip {
            return false;
        }
        self.send(&arp_frame(
            2,
            self.mac.0,
            arp.sender_mac,
            self.ip,
            arp.sender_mac,
            arp.sender_ip,
        ));
        true
    }

    /// Asks the gateway for its MAC, as a host does before it sends anything through it (the
    /// gateway learns this host's MAC from the request). Panics without an answer.
    pub fn arp_gateway(&self) {
        self.send(&arp_frame(
            1,
            self.mac.0,
            BROADCAST,
            self.ip,
            [0; 6],
            self.gateway,
        ));
        let deadline = Instant::now() + Duration::from_secs(2);
        while let Some(f) = self.recv(deadline.saturating_duration_since(Instant::now())) {
            if parse_arp(&f).is_some_and(|a| a.op == 2 && a.sender_ip == self.gateway) {
                return;
            }
        }
        panic!("the gateway did not answer ARP");
    }

    /// A UDP datagram from this host to `dst`, addressed to the gateway's MAC (the way out).
    pub fn udp_via_gateway(&self, src_port: u16, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
        let IpAddr::V4(dst_ip) = dst.ip() else {
            panic!("IPv4 only");
        };
        let mut out = Vec::new();
        PacketBuilder::ethernet2(self.mac.0, self.gw_mac.0)
            .ipv4(self.ip.octets(), dst_ip.octets(), 64)
            .udp(src_port, dst.port())
            .write(&mut out, payload)
            .expect("udp frame");
        out
    }
}

/// The fields of an ARP packet for IPv4 over Ethernet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arp {
    pub op: u16,
    pub sender_mac: [u8; 6],
    pub sender_ip: Ipv4Addr,
    pub target_ip: Ipv4Addr,
}

pub fn parse_arp(eth: &[u8]) -> Option<Arp> {
    if eth.len() < 42 || eth[12..14] != [0x08, 0x06] {
        return None;
    }
    let a = &eth[14..];
    let ip = |o: usize| Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]);
    Some(Arp {
        op: u16::from_be_bytes([a[6], a[7]]),
        sender_mac: a[8..14].try_into().ok()?,
        sender_ip: ip(14),
        target_ip: ip(24),
    })
}

/// An ARP packet in an Ethernet frame from `src` to `dst`.
pub fn arp_frame(
    op: u16,
    src: [u8; 6],
    dst: [u8; 6],
    sender_ip: Ipv4Addr,
    target_mac: [u8; 6],
    target_ip: Ipv4Addr,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&src);
    f.extend_from_slice(&sender_ip.octets());
    f.extend_from_slice(&target_mac);
    f.extend_from_slice(&target_ip.octets());
    f
}

/// An Ethernet frame of an unregistered EtherType (0x88b5, local experimental) carrying `tag`.
pub fn raw_frame(src: [u8; 6], dst: [u8; 6], tag: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend_from_slice(tag);
    f.resize(f.len().max(60), 0);
    f
}

/// Whether `eth` is the raw frame carrying `tag`.
pub fn carries(eth: &[u8], tag: &[u8]) -> bool {
    eth.len() >= 14 + tag.len() && eth[12..14] == [0x88, 0xb5] && &eth[14..14 + tag.len()] == tag
}

/// A TCP conversation from `port` to `dst` through the gateway, by hand: SYN, the request
/// in one segment, then everything the peer sends (acknowledged as it comes) until `done`
/// says the answer is complete; then a reset. Returns the answer's bytes.
pub fn tcp_exchange(
    port: &Port,
    src_port: u16,
    dst: std::net::SocketAddrV4,
    request: &[u8],
    done: impl Fn(&[u8]) -> bool,
) -> Vec<u8> {
    use etherparse::TransportSlice;
    const ISS: u32 = 1000;
    let segment = |seq: u32,
                   build: &dyn Fn(
        etherparse::PacketBuilderStep<etherparse::TcpHeader>,
    ) -> etherparse::PacketBuilderStep<etherparse::TcpHeader>,
                   payload: &[u8]| {
        let step = PacketBuilder::ethernet2(port.mac.0, port.gw_mac.0)
            .ipv4(port.ip.octets(), dst.ip().octets(), 64)
            .tcp(src_port, dst.port(), seq, 64240);
        let mut out = Vec::new();
        build(step).write(&mut out, payload).expect("tcp segment");
        port.send(&out);
    };
    let from_peer = |p: &SlicedPacket<'_>| {
        matches!(&p.transport, Some(TransportSlice::Tcp(t))
            if t.source_port() == dst.port() && t.destination_port() == src_port)
    };
    segment(ISS, &|s| s.syn(), &[]);
    let synack = port
        .recv_matching(Duration::from_secs(2), from_peer)
        .expect("no SYN-ACK");
    let p = SlicedPacket::from_ethernet(&synack).expect("parse");
    let Some(TransportSlice::Tcp(t)) = &p.transport else {
        unreachable!()
    };
    assert!(
        t.syn() && t.ack(),
        "expected SYN-ACK, got {:?}",
        t.to_header()
    );
    let mut next = t.sequence_number().wrapping_add(1);
    segment(ISS + 1, &|s| s.ack(next).psh(), request);
    let my_next = ISS + 1 + request.len() as u32;
    let mut answer = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done(&answer) {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = port
            .recv_matching(left, from_peer)
            .unwrap_or_else(|| panic!("answer incomplete: {} bytes", answer.len()));
        let p = SlicedPacket::from_ethernet(&frame).expect("parse");
        let Some(TransportSlice::Tcp(t)) = &p.transport else {
            unreachable!()
        };
        assert!(!t.rst(), "the peer reset the connection");
        if t.sequence_number() == next && !t.payload().is_empty() {
            answer.extend_from_slice(t.payload());
            next = next.wrapping_add(t.payload().len() as u32);
            segment(my_next, &|s| s.ack(next), &[]);
        }
    }
    segment(my_next, &|s| s.rst(), &[]);
    answer
}
