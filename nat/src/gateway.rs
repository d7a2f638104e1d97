//! The gateway's smoltcp interface: which frames it takes, its shards of sockets, its timers.
//!
//! - `classify`: which connection a TCP frame belongs to (its shard);
//! - `device`: the queue device between the stack and the switch, and TCP offloads;
//! - `flows`: the TCP flow API its caller drives (published ports, outbound NAT).

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use std::net::IpAddr;

use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::wire::{
    ArpPacket, EthernetAddress, EthernetFrame, EthernetProtocol, HardwareAddress, IpCidr,
    IpProtocol, Ipv4Address, Ipv4Packet, Ipv6Address, Ipv6Packet,
};
use vswitch_switch::vnet::VNET_HDR_LEN;

use crate::stream::{StreamMessage, StreamService};
use crate::tcp::{Budget, FlowId, Flows, TcpEvent};
use classify::{Classified, is_icmpv6, tcp_segment};
use device::QueueDevice;

/// Frames waiting for the stack beyond this many are dropped (the stack is polled after every
/// frame, so the queue only fills if something is badly wrong).
const RX_QUEUE_LIMIT: usize = 256;
/// Frames the stack emitted that the caller has not collected yet.
const TX_QUEUE_LIMIT: usize = 1024;
/// TCP sockets are spread over this many socket sets by a keyed hash of the connection's two
/// endpoints. smoltcp walks every socket of the set it is polled with, for every frame and
/// timer; with shards a frame costs a walk of its own shard only, so thousands of idle flows
/// do not slow the busy ones (one set of 4000 sockets cut outbound NAT from 6.5 to 0.8 Gbit/s).
const SHARDS: usize = 256;
const SHARD_BITS: u32 = SHARDS.trailing_zeros();

/// The longest bare SYN taken: Ethernet, IPv6 and TCP headers with the most options.
const MAX_SYN_FRAME: usize = 14 + 40 + 60;

/// One socket set and its flows. Shard 0 also holds the stream (DNS over TCP) service.
struct Shard {
    sockets: SocketSet<'static>,
    flows: Flows,
    /// Outbound SYNs held while their destination is dialled: no socket yet.
    held: HashMap<FlowId, held::Held>,
    /// When this shard next needs a poll for its timers (computed after each poll).
    due: Option<Instant>,
}

/// Addresses of a gateway.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub mac: [u8; 6],
    /// The gateway's IPv4 address and the network's prefix length.
    pub ipv4: Option<(Ipv4Addr, u8)>,
    /// The gateway's IPv6 address and the network's prefix length.
    pub ipv6: Option<(Ipv6Addr, u8)>,
    /// Largest IP packet on the network.
    pub mtu: usize,
    /// Terminate TCP for published ports and outbound NAT (any-IP mode). Off on internal
    /// networks: their gateway answers only for its own addresses.
    pub nat: bool,
}

/// What the gateway did with the frames it was offered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GatewayStats {
    /// Frames handed to the stack.
    pub accepted: u64,
    /// Frames not for the gateway (ARP for other hosts, other MACs), ignored.
    pub ignored: u64,
    /// Frames too short or otherwise unparsable.
    pub malformed: u64,
    /// Frames emitted by the stack.
    pub emitted: u64,
}

/// The gateway of one network. See the crate documentation.
pub struct Gateway {
    iface: Interface,
    device: QueueDevice,
    shards: Vec<Shard>,
    /// Keys the shard hash, so a container cannot aim its connections at one shard.
    hasher: std::collections::hash_map::RandomState,
    next_flow: u64,
    mac: EthernetAddress,
    ipv4: Option<Ipv4Address>,
    ipv6: Option<Ipv6Address>,
    epoch: Instant,
    stats: GatewayStats,
    stream: Option<StreamService>,
    nat: bool,
    tcp_events: Vec<TcpEvent>,
    /// What the TCP flows hold, in all and per container.
    budget: Budget,
    /// When held SYNs are next looked at for expiry.
    held_sweep: Option<Instant>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("mac", &self.mac)
            .field("ipv4", &self.ipv4)
            .field("ipv6", &self.ipv6)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// A gateway that cannot be: smoltcp takes only unicast addresses for an interface.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("the gateway's MAC address {0:02x?} is not a unicast address")]
    Mac([u8; 6]),
    #[error("the gateway's address {0} is not a unicast address")]
    Address(IpAddr),
}

impl Gateway {
    /// Builds the gateway. `now` becomes the stack's time origin. Refuses addresses an
    /// interface cannot have (multicast, broadcast, unspecified), which smoltcp would panic on.
    pub fn new(config: &GatewayConfig, now: Instant) -> Result<Self, GatewayError> {
        let unicast_mac = config.mac[0] & 1 == 0 && config.mac != [0; 6];
        if !unicast_mac {
            return Err(GatewayError::Mac(config.mac));
        }
        for ip in config
            .ipv4
            .map(|(ip, _)| IpAddr::V4(ip))
            .into_iter()
            .chain(config.ipv6.map(|(ip, _)| IpAddr::V6(ip)))
        {
            let bad = match ip {
                IpAddr::V4(v4) => v4.is_multicast() || v4.is_broadcast() || v4.is_unspecified(),
                IpAddr::V6(v6) => v6.is_multicast() || v6.is_unspecified(),
            };
            if bad {
                return Err(GatewayError::Address(ip));
            }
        }
        let mac = EthernetAddress(config.mac);
        let mut device = QueueDevice::new(config.mtu);
        let mut iface_config = Config::new(HardwareAddress::Ethernet(mac));
        iface_config.random_seed = seed(now, config.mac);
        let mut iface = Interface::new(iface_config, &mut device, smol_now(now, now));
        let ipv4 = config.ipv4.map(|(ip, _)| ip);
        let ipv6 = config.ipv6.map(|(ip, _)| ip);
        iface.update_ip_addrs(|addrs| {
            if let Some((ip, len)) = config.ipv4 {
                // Capacity is IFACE_MAX_ADDR_COUNT (2 by default); we add at most two.
                let _ = addrs.push(IpCidr::new(ip.into(), len));
            }
            if let Some((ip, len)) = config.ipv6 {
                let _ = addrs.push(IpCidr::new(ip.into(), len));
            }
        });
        if config.nat {
            // Any-IP: accept packets for addresses that are not ours (outbound NAT, and answers
            // to published-port connections opened from the client's address). smoltcp requires
            // a route via one of our own addresses for that.
            if let Some((ip, _)) = config.ipv4 {
                let _ = iface.routes_mut().add_default_ipv4_route(ip);
            }
            if let Some((ip, _)) = config.ipv6 {
                let _ = iface.routes_mut().add_default_ipv6_route(ip);
            }
            iface.set_any_ip(true);
        }
        Ok(Self {
            iface,
            device,
            shards: (0..SHARDS)
                .map(|_| Shard {
                    sockets: SocketSet::new(Vec::new()),
                    flows: Flows::default(),
                    held: HashMap::new(),
                    due: None,
                })
                .collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            next_flow: 0,
            mac,
            ipv4,
            ipv6,
            epoch: now,
            stats: GatewayStats::default(),
            stream: None,
            nat: config.nat,
            tcp_events: Vec::new(),
            budget: Budget::default(),
            held_sweep: None,
        })
    }

    /// Whether `ip` is one of the gateway's own addresses.
    pub fn is_own(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => self.ipv4 == Some(v4),
            IpAddr::V6(v6) => self.ipv6 == Some(v6),
        }
    }

    /// Accepts length-prefixed messages (DNS over TCP) on `port` of the gateway's addresses, at
    /// most `max_conns` connections at once, each cut after `idle` without a complete message.
    /// Messages come out of [`Self::poll_stream_messages`]; answer with [`Self::stream_reply`].
    /// Call it before traffic flows: from then on connections to `port` on the gateway's own
    /// addresses live in shard 0, and a flow opened there earlier would be looked for in the
    /// wrong shard.
    pub fn enable_stream_service(
        &mut self,
        now: Instant,
        port: u16,
        max_conns: usize,
        idle: Duration,
    ) {
        self.stream = Some(StreamService::new(port, max_conns, idle));
        self.poll(now, 0);
    }

    /// Messages received on the stream service since the last call.
    pub fn poll_stream_messages(&mut self) -> Vec<StreamMessage> {
        self.stream
            .as_mut()
            .map(StreamService::take_messages)
            .unwrap_or_default()
    }

    /// Sends an answer on a stream connection.
    pub fn stream_reply(&mut self, now: Instant, conn: u64, message: &[u8]) {
        if let Some(svc) = self.stream.as_mut() {
            svc.reply(now, &mut self.shards[0].sockets, conn, message);
        }
        self.poll(now, 0);
    }

    /// Says that stream message of `conn` gets no answer (see [`Self::poll_stream_messages`]);
    /// every message must be answered with [`Self::stream_reply`] or this.
    pub fn stream_unanswered(&mut self, now: Instant, conn: u64) {
        if let Some(svc) = self.stream.as_mut() {
            svc.unanswered(now, conn);
        }
        self.poll(now, 0);
    }

    /// Open stream connections (for tests and stats).
    pub fn stream_connections(&self) -> usize {
        self.stream.as_ref().map_or(0, StreamService::connections)
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac.0
    }

    pub fn stats(&self) -> &GatewayStats {
        &self.stats
    }

    /// Whether a frame (starting with the virtio-net header) is one the gateway must see:
    /// unicast to its MAC, ARP asking for one of its addresses, or IPv6 multicast ICMP (neighbour
    /// discovery). Everything else on the segment is none of its business; in particular it never
    /// sees ARP for other hosts, which a stack in any-IP mode would answer.
    pub fn wants(&self, frame: &[u8]) -> bool {
        let Some(eth) = frame
            .get(VNET_HDR_LEN..)
            .and_then(|f| EthernetFrame::new_checked(f).ok())
        else {
            return false;
        };
        let dst = eth.dst_addr();
        if dst == self.mac {
            // In any-IP mode smoltcp would answer echo requests for *every* address itself,
            // faking reachability of the outside; only pings to the gateway's own addresses
            // are its to answer.
            if self.nat && eth.ethertype() == EthernetProtocol::Ipv4 {
                if let Ok(ip) = Ipv4Packet::new_checked(eth.payload())
                    && ip.next_header() == IpProtocol::Icmp
                    && !self.is_own(IpAddr::V4(ip.dst_addr()))
                {
                    return false;
                }
            } else if self.nat
                && eth.ethertype() == EthernetProtocol::Ipv6
                && let Ok(ip) = Ipv6Packet::new_checked(eth.payload())
                && ip.next_header() == IpProtocol::Icmpv6
                && !ip.dst_addr().is_multicast()
                && !self.is_own(IpAddr::V6(ip.dst_addr()))
                && !ip.dst_addr().is_unicast_link_local()
            {
                return false;
            }
            return true;
        }
        match eth.ethertype() {
            EthernetProtocol::Arp if dst.is_broadcast() => {
                let Some(ipv4) = self.ipv4 else { return false };
                ArpPacket::new_checked(eth.payload())
                    .is_ok_and(|arp| arp.target_protocol_addr() == ipv4.octets())
            }
            EthernetProtocol::Ipv6 if dst.is_multicast() && self.ipv6.is_some() => {
                Ipv6Packet::new_checked(eth.payload())
                    .is_ok_and(|ip| ip.next_header() == IpProtocol::Icmpv6)
            }
            _ => false,
        }
    }

    /// Feeds one frame (virtio-net header first) to the stack. Frames the gateway does not
    /// [`want`](Self::wants) are counted and ignored.
    pub fn handle_frame(&mut self, now: Instant, frame: &[u8]) {
        if !self.wants(frame) {
            self.stats.ignored += 1;
            return;
        }
        let Some(eth) = frame.get(VNET_HDR_LEN..) else {
            self.stats.malformed += 1;
            return;
        };
        if self.device.rx.len() >= RX_QUEUE_LIMIT {
            self.stats.ignored += 1;
            return;
        }
        // TCP goes to the shard of its connection; everything else (ARP, NDP, ping) to shard 0.
        let mut k = 0;
        let mut neighbours = false;
        if let Ok(e) = EthernetFrame::new_checked(eth) {
            match tcp_segment(e.payload(), e.ethertype()) {
                Classified::Tcp(seg) => {
                    if seg.syn_only && eth.len() > MAX_SYN_FRAME {
                        // Data on a SYN (TCP Fast Open) needs a cookie this stack never
                        // gives: only a container padding SYNs to be held sends one.
                        self.stats.ignored += 1;
                        return;
                    }
                    if seg.syn_only && self.hold_syn(now, seg.src, seg.dst, eth) {
                        self.stats.accepted += 1;
                        return;
                    }
                    k = self.shard_for(seg.src, seg.dst);
                }
                Classified::TcpFragment => {
                    // Its shard cannot be told from a fragment, and in the wrong shard smoltcp
                    // would reset a live flow. Containers send TCP with DF; drop the odd one.
                    self.stats.ignored += 1;
                    return;
                }
                Classified::Other => {
                    neighbours = matches!(e.ethertype(), EthernetProtocol::Arp)
                        || is_icmpv6(e.payload(), e.ethertype());
                }
            }
        }
        self.stats.accepted += 1;
        self.device.rx.push_back(eth.to_vec());
        self.poll(now, k);
        if neighbours {
            // The neighbour cache is the interface's, shared by all shards, but only the
            // shard polled with the ARP/NDP answer sees it arrive: a socket elsewhere that
            // was waiting for that neighbour would otherwise sit out smoltcp's 1 s back-off.
            for k in 1..self.shards.len() {
                if self.shards[k].due.is_some() {
                    self.poll(now, k);
                }
            }
        }
    }

    /// Runs the stack's timers: polls the shards that are due. Call it when
    /// [`Self::poll_timeout`] says so.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.expire_held(now);
        for k in 0..self.shards.len() {
            if self.shards[k].due.is_some_and(|t| t <= now) {
                self.poll(now, k);
            }
        }
        if self
            .stream
            .as_ref()
            .and_then(StreamService::next_deadline)
            .is_some_and(|t| t <= now)
        {
            self.poll(now, 0);
        }
    }

    /// When the stack next needs [`Self::handle_timeout`]; `None` if it has nothing pending.
    pub fn poll_timeout(&mut self, now: Instant) -> Option<Instant> {
        if !self.tcp_events.is_empty() {
            // Events the caller has not taken yet: it should come back at once.
            return Some(now);
        }
        let stack = self.shards.iter().filter_map(|s| s.due).min();
        let idle = self.stream.as_ref().and_then(StreamService::next_deadline);
        let held = self.held_sweep;
        [stack, idle, held].into_iter().flatten().min()
    }

    /// The next frame the gateway sends, virtio-net header first: for TCP it asks the
    /// receiving kernel to finish the checksum (`F_NEEDS_CSUM`) and, for a segment longer than
    /// the MSS, to segment it (TSO); for everything else it is all zeros (complete checksums,
    /// no segmentation).
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        let frame = self.device.tx.pop_front()?;
        self.stats.emitted += 1;
        Some(frame)
    }

    /// Polls the stack with shard `k`'s sockets: ingress of the queued frame, egress of that
    /// shard, then the flows' events and the shard's next deadline.
    fn poll(&mut self, now: Instant, k: usize) {
        let t = smol_now(self.epoch, now);
        let Some(shard) = self.shards.get_mut(k) else {
            return;
        };
        self.iface.poll(t, &mut self.device, &mut shard.sockets);
        if k == 0
            && let Some(svc) = self.stream.as_mut()
        {
            svc.service(now, &mut shard.sockets);
            // What the service queued (answers, RSTs, a new listener) goes out now.
            self.iface.poll(t, &mut self.device, &mut shard.sockets);
            svc.reap(&mut shard.sockets);
        }
        if !shard.flows.flows.is_empty() {
            shard
                .flows
                .activity(&mut shard.sockets, &mut self.tcp_events, &mut self.budget);
        }
        shard.due = self
            .iface
            .poll_delay(t, &shard.sockets)
            .map(|d| now + Duration::from_micros(d.total_micros()));
    }
}

fn shard_of(flow: FlowId) -> usize {
    (flow.0 & (SHARDS as u64 - 1)) as usize
}

fn smol_now(epoch: Instant, now: Instant) -> smoltcp::time::Instant {
    let micros = now.saturating_duration_since(epoch).as_micros();
    smoltcp::time::Instant::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
}

/// A seed for smoltcp's TCP sequence numbers and ephemeral ports: different per network and
/// per run. It need not be cryptographically strong.
fn seed(now: Instant, mac: [u8; 6]) -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    now.hash(&mut h);
    mac.hash(&mut h);
    h.finish()
}

mod classify;
mod device;
mod flows;
mod held;

#[cfg(test)]
mod tests;
