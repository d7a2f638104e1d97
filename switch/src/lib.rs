//! The forwarding core of vswitch: a learning Ethernet bridge that does no I/O.
//!
//! A [`Bridge`] is a plain value. The caller owns the file descriptors and the clock; it feeds
//! every frame it reads with [`Bridge::handle_frame`] together with the current time and the
//! port the frame came from, and gets back a [`Decision`] saying where the frame goes. Frames are
//! never copied or rewritten here: the caller writes the very bytes it read (virtio-net header
//! included) to the port(s) the decision names. That keeps GSO super-frames whole between TAPs.
//!
//! Timers are driven the same way: [`Bridge::poll_timeout`] says when the bridge next wants
//! [`Bridge::handle_timeout`] to be called (MAC aging), and returns `None` when nothing is due,
//! so an idle network costs no wake-ups.
//!
//! One `Bridge` is one broadcast domain. Isolation between networks comes from giving each
//! network its own `Bridge`: there is no code path that could carry a frame across.
//!
//! [`vxlan`] carries a network's frames to other hosts (overlay networks).
//!
//! [`vnet`] describes the virtio-net header that every frame of a vswitch port carries in front
//! of its Ethernet header (the switch skips it; the gateway reads and writes it).

pub mod budget;
mod fdb;
mod guard;
mod mac;
pub mod vnet;
pub mod vxlan;

use std::time::{Duration, Instant};

pub use fdb::{Fdb, FdbEntry, FdbEvents, Learned};
pub use guard::{PortGuard, Violation};
pub use mac::{MacAddr, ParseMacError};

/// Length of the Ethernet II header (destination, source, EtherType).
const ETH_HEADER_LEN: usize = 14;

/// Whether `frame` (with `offset` bytes in front of its Ethernet header) is a GSO super-frame,
/// by its virtio-net header: the receiving kernel cuts it into segments that fit.
fn is_gso(offset: usize, frame: &[u8]) -> bool {
    offset >= vnet::VNET_HDR_LEN && vnet::VnetHdr::parse(frame).is_some_and(|h| h.is_gso())
}

/// Settings of one bridge. All ports of a bridge share the same frame layout.
#[derive(Debug, Clone)]
pub struct Config {
    /// Bytes in front of the Ethernet header of every frame (the virtio-net header of a TAP
    /// opened with `IFF_VNET_HDR`; 12 for `virtio_net_hdr_v1`). The switch skips them unread.
    pub frame_offset: usize,
    /// Most MAC addresses the forwarding database holds. Beyond it, new addresses are not
    /// learned (their frames are still delivered by flooding) until old ones age out.
    pub fdb_capacity: usize,
    /// How long a learned address stays valid without being seen as a source again.
    pub aging: Duration,
    /// Largest IP packet a port may send (the network's MTU); a longer frame is dropped, as a
    /// Linux bridge drops what does not fit its egress port. GSO super-frames (their segments
    /// are cut to size by the receiver) are exempt. `None`: no limit.
    pub mtu: Option<usize>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            frame_offset: 12,
            fdb_capacity: 8192,
            aging: Duration::from_secs(300),
            mtu: None,
        }
    }
}

/// Identifies a port of one [`Bridge`]. Ids of removed ports are reused by later ports; the
/// bridge forgets every address learned on a port when the port is removed, so a reused id never
/// inherits stale forwarding entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortId(u32);

impl PortId {
    /// The id as an index, for callers that keep per-port state in a `Vec`.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl std::fmt::Display for PortId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where a frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Decision {
    /// Send the frame, unchanged, to this one port.
    Forward(PortId),
    /// Send the frame, unchanged, to every port that [`Bridge::flood_ports`] yields.
    Flood,
    /// Do not send the frame anywhere.
    Drop(DropReason),
}

/// Why a frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Too short to hold the frame offset and an Ethernet header.
    Malformed,
    /// The source address is multicast, broadcast or all zeros: no station may send from it.
    InvalidSource,
    /// The destination was learned on the port the frame came in on (no hairpin).
    SamePort,
    /// The ingress port is not (or no longer) part of the bridge.
    UnknownPort,
    /// The source address is pinned to another port (see [`Bridge::pin`]): somebody is
    /// impersonating, say, the gateway.
    PinnedElsewhere,
    /// The port's guard refused it: sent from a MAC or address the port was not given (see
    /// [`Bridge::guard`]).
    Spoofed(Violation),
    /// Longer than the network's MTU.
    TooBig,
}

/// Counters of one port, from the port's point of view: `rx` is what the bridge received from
/// the port, `tx` what it sent to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames received on the port that went nowhere (malformed, invalid source, same port).
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames the bridge meant for this port that the caller could not deliver.
    pub tx_dropped: u64,
}

/// Counters of the bridge as a whole.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BridgeStats {
    /// Frames dropped because they were too short.
    pub malformed: u64,
    /// Frames dropped because of their source address (multicast, zero, or pinned to another
    /// port).
    pub invalid_source: u64,
    /// Source addresses not learned because the forwarding database was full.
    pub learn_refused: u64,
    /// Frames flooded (broadcast, multicast or unknown destination).
    pub flooded: u64,
    /// Frames a port's guard refused ([`DropReason::Spoofed`]).
    pub spoofed: u64,
    /// Frames longer than the MTU.
    pub too_big: u64,
}

#[derive(Debug)]
struct Port {
    stats: PortStats,
    /// What the port may send from; `None`: anything (the gateway's port).
    guard: Option<PortGuard>,
}

/// A learning bridge: one broadcast domain. See the crate documentation.
#[derive(Debug)]
pub struct Bridge {
    config: Config,
    ports: Vec<Option<Port>>,
    free: Vec<u32>,
    fdb: Fdb,
    stats: BridgeStats,
    next_sweep: Option<Instant>,
}

impl Bridge {
    pub fn new(config: Config) -> Self {
        let fdb = Fdb::new(config.fdb_capacity, config.aging);
        Self {
            config,
            ports: Vec::new(),
            free: Vec::new(),
            fdb,
            stats: BridgeStats::default(),
            next_sweep: None,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Adds a port and returns its id.
    pub fn add_port(&mut self) -> PortId {
        let port = Port {
            stats: PortStats::default(),
            guard: None,
        };
        if let Some(index) = self.free.pop() {
            self.ports[index as usize] = Some(port);
            PortId(index)
        } else {
            let index = u32::try_from(self.ports.len()).expect("fewer than 2^32 ports");
            self.ports.push(Some(port));
            PortId(index)
        }
    }

    /// Pins `mac` to `port`: frames to it always go there, and frames from it on any other
    /// port are dropped ([`DropReason::PinnedElsewhere`]) instead of moving it, as a Linux
    /// bridge keeps its own address. For addresses only one port may use, like a gateway's.
    /// Returns false if `port` is not part of the bridge.
    pub fn pin(&mut self, now: Instant, mac: MacAddr, port: PortId) -> bool {
        if !matches!(self.ports.get(port.index()), Some(Some(_))) {
            return false;
        }
        self.fdb.pin(now, mac, port);
        true
    }

    /// Unpins `mac` from `port` (a remote endpoint that moved away); returns whether it was
    /// pinned there.
    pub fn unpin(&mut self, mac: MacAddr, port: PortId) -> bool {
        self.fdb.unpin(mac, port)
    }

    /// Guards `port`: from now on it may send only from `guard`'s MAC and addresses, and a frame
    /// that claims anything else is dropped ([`DropReason::Spoofed`]). Returns false if `port`
    /// is not part of the bridge.
    pub fn guard(&mut self, port: PortId, guard: PortGuard) -> bool {
        match self.ports.get_mut(port.index()) {
            Some(Some(p)) => {
                p.guard = Some(guard);
                true
            }
            _ => false,
        }
    }

    /// Removes a port, forgets every address learned or pinned on it and returns its final
    /// counters.
    pub fn remove_port(&mut self, port: PortId) -> Option<PortStats> {
        let slot = self.ports.get_mut(port.index())?;
        let removed = slot.take()?;
        self.fdb.flush_port(port);
        self.fdb.unpin_port(port);
        self.free.push(port.0);
        Some(removed.stats)
    }

    /// Ids of all ports, in increasing order.
    pub fn ports(&self) -> impl Iterator<Item = PortId> + '_ {
        self.ports
            .iter()
            .enumerate()
            .filter(|(_, p)| p.is_some())
            .map(|(i, _)| PortId(i as u32))
    }

    /// The port with this index, if it exists (the inverse of [`PortId::index`]).
    pub fn port_at(&self, index: usize) -> Option<PortId> {
        match self.ports.get(index) {
            Some(Some(_)) => u32::try_from(index).ok().map(PortId),
            _ => None,
        }
    }

    /// Number of ports.
    pub fn port_count(&self) -> usize {
        self.ports.len() - self.free.len()
    }

    /// Decides where a frame received on `ingress` goes, learning its source address on the way.
    ///
    /// `frame` is the frame as read from the port, starting with `config.frame_offset` bytes
    /// that the bridge skips. Counters of the ingress port and of the egress port(s) are updated
    /// as if delivery succeeds; report a failed delivery with [`Bridge::note_tx_failed`].
    pub fn handle_frame(&mut self, now: Instant, ingress: PortId, frame: &[u8]) -> Decision {
        let len = frame.len() as u64;
        let Some(Some(port)) = self.ports.get_mut(ingress.index()) else {
            return Decision::Drop(DropReason::UnknownPort);
        };
        port.stats.rx_frames += 1;
        port.stats.rx_bytes += len;

        let Some((dst, src)) = frame
            .get(self.config.frame_offset..)
            .and_then(|f| f.first_chunk::<ETH_HEADER_LEN>())
            .and_then(|eth| {
                let (dst, rest) = eth.split_first_chunk::<6>()?;
                Some((MacAddr(*dst), MacAddr(*rest.first_chunk::<6>()?)))
            })
        else {
            port.stats.rx_dropped += 1;
            self.stats.malformed += 1;
            return Decision::Drop(DropReason::Malformed);
        };

        if src.is_multicast() || src.is_zero() {
            port.stats.rx_dropped += 1;
            self.stats.invalid_source += 1;
            return Decision::Drop(DropReason::InvalidSource);
        }
        let eth = &frame[self.config.frame_offset..];
        if let Some(guard) = &port.guard
            && let Err(v) = guard.check(eth)
        {
            port.stats.rx_dropped += 1;
            self.stats.spoofed += 1;
            return Decision::Drop(DropReason::Spoofed(v));
        }
        if let Some(mtu) = self.config.mtu
            && eth.len() - ETH_HEADER_LEN > mtu
            && !is_gso(self.config.frame_offset, frame)
        {
            port.stats.rx_dropped += 1;
            self.stats.too_big += 1;
            return Decision::Drop(DropReason::TooBig);
        }

        match self.fdb.learn(now, src, ingress) {
            Learned::Yes => {}
            Learned::Full => self.stats.learn_refused += 1,
            Learned::PinnedElsewhere => {
                port.stats.rx_dropped += 1;
                self.stats.invalid_source += 1;
                return Decision::Drop(DropReason::PinnedElsewhere);
            }
        }
        if self.next_sweep.is_none() {
            self.next_sweep = Some(now + self.sweep_interval());
        }

        if !dst.is_multicast()
            && let Some(egress) = self.fdb.lookup(now, dst)
        {
            if egress == ingress {
                if let Some(Some(p)) = self.ports.get_mut(ingress.index()) {
                    p.stats.rx_dropped += 1;
                }
                return Decision::Drop(DropReason::SamePort);
            }
            if let Some(Some(p)) = self.ports.get_mut(egress.index()) {
                p.stats.tx_frames += 1;
                p.stats.tx_bytes += len;
                return Decision::Forward(egress);
            }
        }

        self.stats.flooded += 1;
        for (i, p) in self.ports.iter_mut().enumerate() {
            if let Some(p) = p
                && i != ingress.index()
            {
                p.stats.tx_frames += 1;
                p.stats.tx_bytes += len;
            }
        }
        Decision::Flood
    }

    /// The ports a flooded frame from `ingress` goes to: every port but `ingress`.
    pub fn flood_ports(&self, ingress: PortId) -> impl Iterator<Item = PortId> + '_ {
        self.ports().filter(move |&p| p != ingress)
    }

    /// Records that a frame of `len` bytes meant for `port` could not be delivered.
    pub fn note_tx_failed(&mut self, port: PortId, len: usize) {
        if let Some(Some(p)) = self.ports.get_mut(port.index()) {
            p.stats.tx_dropped += 1;
            p.stats.tx_frames = p.stats.tx_frames.saturating_sub(1);
            p.stats.tx_bytes = p.stats.tx_bytes.saturating_sub(len as u64);
        }
    }

    /// When [`Bridge::handle_timeout`] should next be called; `None` while nothing is learned.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_sweep
    }

    /// Ages out forwarding entries. Call it at (or after) the instant `poll_timeout` returned.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.next_sweep {
            Some(due) if now >= due => {}
            _ => return,
        }
        self.fdb.expire(now);
        self.next_sweep = if self.fdb.is_empty() {
            None
        } else {
            Some(now + self.sweep_interval())
        };
    }

    /// Forgets every address learned on `port` (for example after its link flapped).
    pub fn flush_port(&mut self, port: PortId) {
        self.fdb.flush_port(port);
    }

    /// The forwarding database.
    pub fn fdb(&self) -> &Fdb {
        &self.fdb
    }

    pub fn port_stats(&self, port: PortId) -> Option<&PortStats> {
        self.ports.get(port.index())?.as_ref().map(|p| &p.stats)
    }

    pub fn stats(&self) -> &BridgeStats {
        &self.stats
    }

    /// What happened to learned MAC table entries so far.
    pub fn fdb_events(&self) -> FdbEvents {
        self.fdb.events
    }

    /// Expired entries are ignored by lookups at once; the sweep only reclaims their memory,
    /// so it can run much less often than the aging time.
    fn sweep_interval(&self) -> Duration {
        self.config
            .aging
            .clamp(Duration::from_millis(10), Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests;
