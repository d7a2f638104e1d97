//! TCP flows terminated on the gateway: the container side of published ports and outbound NAT.
//!
//! Each flow is one smoltcp socket. The gateway only moves bytes between that socket and its
//! caller; the caller (the datapath) moves them straight to and from a host socket, with
//! backpressure in both directions: [`Gateway::tcp_send_with`] takes only what fits the
//! socket's send buffer, and [`Gateway::tcp_recv_with`] is only called while the host side can
//! take more.
//!
//! - **Inbound** (published port): [`Gateway::tcp_connect`] opens a connection to the container
//!   from the client's own address (the gateway runs in any-IP mode, so the container's answers to
//!   that address come back to it), or from the gateway's address for loopback clients.
//! - **Outbound**: a SYN from a container to an outside address is held (no socket yet, see
//!   `gateway/held.rs`) and reported as [`TcpEvent::Syn`]; the caller dials the destination,
//!   then either releases the SYN ([`Gateway::tcp_established`]: a listener for exactly that
//!   address takes it and answers SYN-ACK) or refuses it ([`Gateway::tcp_abort`]: RST), so a
//!   refused destination looks refused to the container.
//!
//! Memory: a held SYN costs its own bytes; an open flow its socket buffers, [`LARGE_BUF`]
//! each way for the first [`MAX_LARGE_FLOWS`] of a network ([`MAX_LARGE_FLOWS_PER_CONTAINER`]
//! of a container) and [`SMALL_BUF`] for the others, of which only the pages written are
//! resident.
//!
//! Sockets are removed as soon as they are closed, so the per-frame socket scan of smoltcp stays
//! proportional to the flows that are really open; the number of flows is bounded.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;
use smoltcp::wire::{IpEndpoint, IpListenEndpoint};

/// Identifies a flow for the life of the gateway (never reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId(pub u64);

/// What happened to flows since the last [`Gateway::poll_tcp_events`](crate::Gateway::poll_tcp_events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcpEvent {
    /// A container sent a SYN to `dst` from `src`, and no flow existed for it yet.
    /// The gateway holds the SYN-ACK (a paused listener, flow `flow`) until the caller calls
    /// `tcp_established` (dial succeeded) or `tcp_abort` (refused: RST).
    Syn {
        flow: FlowId,
        src: SocketAddr,
        dst: SocketAddr,
    },
    /// The flow has something for the caller: data to read, room to write, a state change.
    Activity(FlowId),
    /// The flow is over and forgotten. `clean`: both sides closed with a FIN and the caller
    /// read everything the container sent; otherwise it was reset, timed out or refused.
    Closed { flow: FlowId, clean: bool },
}

/// Where a flow stands, as the caller needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowState {
    /// Handshake in progress (or held for an outbound dial).
    Connecting,
    /// Data can flow both ways.
    Open,
    /// The container sent FIN and everything before it has been read.
    PeerClosed,
    /// Gone (closed or reset); the flow has been forgotten.
    Closed,
}

pub(crate) struct Flow {
    pub(crate) handle: SocketHandle,
    last_state: tcp::State,
    /// The container's address: flows are counted per container (see [`MAX_FLOWS_PER_CONTAINER`]).
    pub(crate) container: IpAddr,
    /// Has [`LARGE_BUF`] buffers.
    pub(crate) large: bool,
    /// A client of a published port (else the container's own outbound flow).
    inbound: bool,
    /// An outbound listener that was given its SYN: back in Listen (the container reset the
    /// handshake), it is over rather than waiting for a SYN that nobody will send.
    armed: bool,
    /// The caller had more to send than fitted: tell it when there is room again.
    pub(crate) want_write: bool,
    /// The container is streaming to us: its ACKs are delayed (see [`BULK_DRAIN`]).
    pub(crate) bulk: bool,
}

/// The flows of one shard of the gateway's sockets.
#[derive(Default)]
pub(crate) struct Flows {
    pub(crate) flows: HashMap<FlowId, Flow>,
}

/// A read of at least this much of what a container sent marks its flow as a stream, whose
/// segments get smoltcp's delayed ACK ([`BULK_ACK_DELAY`], or every second segment, whichever
/// comes first) instead of one each: every ACK is a TAP write that runs the container's stack
/// and wakes its sender, and halving them moved a stream out of a container from 0.64-0.79x
/// to 0.77-0.89x of the kernel's NAT (BENCHMARKS.md). A short read that empties the buffer
/// (the container sent little) marks it interactive again, with immediate ACKs, so a request
/// split over two writes behind Nagle's algorithm does not wait for the timer. A timer already
/// running then still runs out: at most one ACK per burst waits up to the delay, which a Linux
/// sender's Nagle (Minshall's variant) does not wait for after full-sized segments.
pub const BULK_DRAIN: usize = 32 * 1024;
pub const BULK_ACK_DELAY: smoltcp::time::Duration = smoltcp::time::Duration::from_millis(1);

/// Most TCP flows per network; beyond it new ones are refused.
pub const MAX_FLOWS: usize = 16384;
/// Most TCP flows of one container address each way: its own outbound ones (held SYNs
/// included), and those of clients of its published ports. A quarter of the table each, so
/// neither one container (with an IPv4 and an IPv6 address) nor one client hammering its
/// port can lock the others out, and clients hammering a container's port cannot take the
/// container's own way out.
pub const MAX_FLOWS_PER_CONTAINER: u32 = (MAX_FLOWS / 4) as u32;
/// A handshake the container does not answer is given up after this long (a published-port
/// client is reset, the slot freed).
pub const CONNECT_TIMEOUT: smoltcp::time::Duration = smoltcp::time::Duration::from_secs(10);
/// An established flow whose container stops answering (gone, or its namespace cut off) is
/// aborted after this long without a packet from it; keep-alive probes every
/// [`KEEP_ALIVE`] make sure a live but quiet container is heard from. Without these a flow
/// whose container vanished would hold its slot and host socket for ever.
pub const IDLE_TIMEOUT: smoltcp::time::Duration = smoltcp::time::Duration::from_secs(120);
pub const KEEP_ALIVE: smoltcp::time::Duration = smoltcp::time::Duration::from_secs(45);
/// Socket buffers (each way) of a flow with full windows. They are the flow's only buffers
/// (the datapath reads and writes the host socket straight from them), so they are the window
/// a fast stream needs: 264 KiB carried a remote client's stream at 11-14 Gbit/s, 1 MiB at
/// 18 (`benches/nat.sh`). Allocated zeroed and over the daemon's mmap threshold
/// (`vswitch_netdev::MMAP_THRESHOLD`, 260 KiB), so each gets pages of its own: a flow costs
/// what it has buffered, and a closed one gives it back.
pub const LARGE_BUF: usize = 1024 * 1024;
/// Socket buffers (each way) of the flows beyond the large ones: 32 KiB windows (16 KiB, with
/// no queue beside them, held a stream behind 4000 idle flows to 2.8 Gbit/s).
pub const SMALL_BUF: usize = 32 * 1024;
/// Flows per network, and per container, that get [`LARGE_BUF`] buffers. With these, a
/// network's flows hold at most 256 x 2 MiB + (16 384 - 256) x 64 KiB, about 1.5 GiB, however
/// its containers and clients use them (one container address: 64 x 2 MiB and, of its 4096
/// outbound and 4096 inbound flows, the rest at 64 KiB, about 640 MiB); a held SYN costs its
/// headers and a table entry.
pub const MAX_LARGE_FLOWS: usize = 256;
pub const MAX_LARGE_FLOWS_PER_CONTAINER: u32 = 64;
/// A SYN held for a dial that never reports is answered with a RST after this long (the dial
/// itself gives up sooner).
pub const HELD_SYN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, Default, Clone, Copy)]
struct Count {
    outbound: u32,
    inbound: u32,
    large: u32,
}

impl Count {
    fn of(&mut self, inbound: bool) -> &mut u32 {
        if inbound {
            &mut self.inbound
        } else {
            &mut self.outbound
        }
    }
}

/// What the flows of a network hold: flows (held SYNs included) and large buffers, in all and
/// per container.
#[derive(Debug, Default)]
pub(crate) struct Budget {
    flows: usize,
    large: usize,
    per_container: HashMap<IpAddr, Count>,
    /// Flows refused for want of room (in the table or the container's share).
    refused: u64,
}

impl Budget {
    /// Counts a new flow of `container` (`inbound`: a client of its published port), if it
    /// fits in the table and the container's share that way.
    pub(crate) fn admit(&mut self, container: IpAddr, inbound: bool) -> bool {
        let mut count = self
            .per_container
            .get(&container)
            .copied()
            .unwrap_or_default();
        if self.flows >= MAX_FLOWS || *count.of(inbound) >= MAX_FLOWS_PER_CONTAINER {
            self.refused += 1;
            return false;
        }
        self.flows += 1;
        *self.per_container.entry(container).or_default().of(inbound) += 1;
        true
    }

    /// Flows refused so far.
    pub(crate) fn refused(&self) -> u64 {
        self.refused
    }

    /// Whether an admitted flow of `container` gets large buffers (counted if so).
    pub(crate) fn take_large(&mut self, container: IpAddr) -> bool {
        let Some(count) = self.per_container.get_mut(&container) else {
            return false;
        };
        if self.large >= MAX_LARGE_FLOWS || count.large >= MAX_LARGE_FLOWS_PER_CONTAINER {
            return false;
        }
        count.large += 1;
        self.large += 1;
        true
    }

    /// A flow of `container` is gone.
    pub(crate) fn release(&mut self, container: IpAddr, inbound: bool, large: bool) {
        let std::collections::hash_map::Entry::Occupied(mut e) =
            self.per_container.entry(container)
        else {
            return;
        };
        let c = e.get_mut();
        let n = c.of(inbound);
        *n = n.saturating_sub(1);
        if large {
            c.large = c.large.saturating_sub(1);
            self.large = self.large.saturating_sub(1);
        }
        self.flows = self.flows.saturating_sub(1);
        if c.outbound == 0 && c.inbound == 0 {
            e.remove();
        }
    }

    pub(crate) fn flows(&self) -> usize {
        self.flows
    }

    pub(crate) fn large(&self) -> usize {
        self.large
    }

    pub(crate) fn flows_of(&self, container: IpAddr) -> u32 {
        self.per_container
            .get(&container)
            .map_or(0, |c| c.outbound + c.inbound)
    }
}

impl Flows {
    pub(crate) fn insert(
        &mut self,
        id: FlowId,
        handle: SocketHandle,
        state: tcp::State,
        container: IpAddr,
        large: bool,
        inbound: bool,
    ) {
        self.flows.insert(
            id,
            Flow {
                handle,
                last_state: state,
                container,
                large,
                inbound,
                // An outbound listener is given its SYN as it is made.
                armed: !inbound,
                want_write: false,
                bulk: false,
            },
        );
    }

    /// Whether an outbound flow for this exact pair exists already (a retransmitted SYN).
    pub(crate) fn has_listener_for(
        &self,
        sockets: &smoltcp::iface::SocketSet<'static>,
        src: IpEndpoint,
        dst: IpEndpoint,
    ) -> bool {
        self.flows.values().any(|f| {
            let s = sockets.get::<tcp::Socket>(f.handle);
            let local_matches = s.local_endpoint() == Some(dst)
                || (s.is_listening()
                    && s.listen_endpoint()
                        == IpListenEndpoint {
                            addr: Some(dst.addr),
                            port: dst.port,
                        });
            local_matches && s.remote_endpoint().is_none_or(|r| r == src)
        })
    }

    /// Flows whose socket changed state, has data to read, or has room the caller was waiting
    /// for. Closed flows are reported once more and then forgotten (their socket removed, and
    /// their count in `budget` lowered).
    pub(crate) fn activity(
        &mut self,
        sockets: &mut smoltcp::iface::SocketSet<'static>,
        out: &mut Vec<TcpEvent>,
        budget: &mut Budget,
    ) {
        let mut closed = Vec::new();
        for (id, f) in &mut self.flows {
            let s = sockets.get_mut::<tcp::Socket>(f.handle);
            let state = s.state();
            // Room is reported once an eighth of the buffer is free, not at every byte an ACK
            // frees: the caller then moves bytes in a few large pieces, not many small ones.
            let free = s.send_capacity().saturating_sub(s.send_queue());
            let room = f.want_write && free >= (s.send_capacity() / 8).max(1);
            if state == tcp::State::Established && f.last_state != tcp::State::Established {
                // Past the handshake: from now on, the idle limit (keep-alive keeps a quiet but
                // live container heard from).
                s.set_timeout(Some(IDLE_TIMEOUT));
            }
            // TIME-WAIT would keep a socket (and its place in smoltcp's per-frame scan) for
            // seconds after the flow is over, so it goes as soon as the caller has read what the
            // container sent last. An armed listener back in Listen was reset by the container:
            // over, too.
            // The same holds after a passive close: the container's FIN, then ours acknowledged,
            // may leave bytes the host side has not taken yet.
            let after_fins = state == tcp::State::TimeWait
                || (state == tcp::State::Closed && f.last_state == tcp::State::LastAck);
            let over = (after_fins && !s.can_recv())
                || (state == tcp::State::Closed && f.last_state != tcp::State::LastAck)
                || (f.armed && state == tcp::State::Listen);
            if over {
                // Clean: both FINs went through, the caller read everything, and the container
                // acknowledged everything sent to it. Closed from any other state is a reset
                // or a timeout (smoltcp's own TIME-WAIT expiry resets the socket, buffers and
                // all, so unread bytes there end unclean too).
                let clean = after_fins && s.send_queue() == 0;
                out.push(TcpEvent::Closed { flow: *id, clean });
                closed.push(*id);
                continue;
            }
            if state != f.last_state || s.can_recv() || room {
                // A socket closed after LAST-ACK keeps that as its last state while its last
                // bytes are read: that is what makes its end clean.
                if state != tcp::State::Closed {
                    f.last_state = state;
                }
                if room {
                    f.want_write = false;
                }
                out.push(TcpEvent::Activity(*id));
            }
        }
        for id in closed {
            if let Some(f) = self.flows.remove(&id) {
                sockets.remove(f.handle);
                budget.release(f.container, f.inbound, f.large);
            }
        }
    }
}

/// A flow's socket, with [`LARGE_BUF`] or [`SMALL_BUF`] buffers.
pub(crate) fn new_socket(large: bool) -> tcp::Socket<'static> {
    let size = if large { LARGE_BUF } else { SMALL_BUF };
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; size]),
        tcp::SocketBuffer::new(vec![0; size]),
    );
    s.set_nagle_enabled(false);
    s.set_ack_delay(None);
    // Until the handshake is done; `Flows::activity` switches to the idle limit after. Set
    // now, keep-alive first runs from the handshake's last packet (set on an established
    // socket it would probe at once).
    s.set_timeout(Some(CONNECT_TIMEOUT));
    s.set_keep_alive(Some(KEEP_ALIVE));
    s
}

pub(crate) fn flow_state(s: &tcp::Socket<'_>) -> FlowState {
    use tcp::State::*;
    match s.state() {
        Listen | SynSent | SynReceived => FlowState::Connecting,
        Established | FinWait1 | FinWait2 => FlowState::Open,
        CloseWait | LastAck | Closing => {
            if s.can_recv() {
                FlowState::Open
            } else {
                FlowState::PeerClosed
            }
        }
        // The last bytes before the container's FIN may still wait to be read.
        TimeWait | Closed if s.can_recv() => FlowState::Open,
        Closed | TimeWait => FlowState::Closed,
    }
}
