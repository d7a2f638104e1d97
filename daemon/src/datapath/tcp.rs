//! NAT's TCP flows as the datapath sees them: each flow's smoltcp socket in the gateway, spliced
//! to the daemon's host socket for it, which sits in the datapath's own epoll set.
//!
//! Bytes move in one copy each way: `read(2)` from the host socket straight into the free part
//! of the flow's send buffer, `write(2)` straight out of its receive buffer. Backpressure needs
//! no queue of our own:
//! - host -> container: when the send buffer is full reading stops, the host socket's receive
//!   buffer fills and the kernel closes the peer's window; the gateway reports the flow again
//!   once an eighth of the buffer is free.
//! - container -> host: when the host socket takes no more (`EAGAIN`) the bytes stay in the
//!   receive buffer and the container's window closes; `EPOLLOUT` resumes.
//!
//! The sockets are registered edge-triggered: `readable` and `writable` remember whether the
//! last attempt stopped at `EAGAIN`, and an event sets them again. A FIN on either side becomes
//! a half-close on the other; a reset, an error or bytes that could not be delivered become a
//! reset.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::time::Instant;

use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};
use vswitch_nat::{FlowId, FlowState, Gateway};

use super::flow::HostStream;

/// Epoll tokens of host sockets carry this bit beside the flow's id (ports' tokens are their
/// small indices, the wake-up's is `u64::MAX`).
pub(super) const FLOW_TOKEN: u64 = 1 << 62;

/// The datapath's half of a TCP flow.
struct FlowIo {
    host: HostStream,
    /// No `EAGAIN` from the host socket since its last event, each way.
    readable: bool,
    writable: bool,
    /// The host closed its sending half, and the FIN was passed on to the container.
    host_eof: bool,
    /// The container's FIN was passed on to the host (after its last byte).
    shut_host: bool,
}

/// What one attempt at moving bytes came to.
enum Moved {
    Bytes,
    NoRoom,
    Again,
    Eof,
    Failed,
}

/// What a read or write of `r` bytes came to; `zero` is what 0 bytes mean (EOF for a read).
fn moved(r: std::io::Result<usize>, zero: Moved) -> (usize, Moved) {
    match r {
        Ok(0) => (0, zero),
        Ok(n) => (n, Moved::Bytes),
        Err(e) if e.kind() == ErrorKind::WouldBlock => (0, Moved::Again),
        // Interrupted: nothing moved, try again.
        Err(e) if e.kind() == ErrorKind::Interrupted => (0, Moved::Bytes),
        Err(_) => (0, Moved::Failed),
    }
}

/// The host sides of the flows the gateway terminates, by flow.
#[derive(Default)]
pub(super) struct TcpFlows {
    flows: HashMap<FlowId, FlowIo>,
}

impl TcpFlows {
    /// Splices `flow` to `host`, registering the socket with `epoll`. On failure the flow is
    /// reset and the host socket closed.
    fn insert(
        &mut self,
        epoll: &Epoll,
        gw: &mut Gateway,
        now: Instant,
        flow: FlowId,
        host: HostStream,
    ) {
        let flags = EpollFlags::EPOLLIN
            | EpollFlags::EPOLLOUT
            | EpollFlags::EPOLLRDHUP
            | EpollFlags::EPOLLET;
        let registered = flow.0 & FLOW_TOKEN == 0
            && gw.tcp_state(flow) != FlowState::Closed
            && epoll
                .add(
                    host.stream.as_fd(),
                    EpollEvent::new(flags, FLOW_TOKEN | flow.0),
                )
                .is_ok();
        if !registered {
            gw.tcp_abort(now, flow);
            Self::reset_unused(host);
            return;
        }
        let io = FlowIo {
            host,
            readable: true,
            writable: true,
            host_eof: false,
            shut_host: false,
        };
        self.flows.insert(flow, io);
        self.service(gw, now, flow);
    }

    /// Opens a flow to a container from `local` to `remote` (a published port's client),
    /// spliced to `host`; without one (the table is full) the client is reset.
    pub(super) fn open(
        &mut self,
        epoll: &Epoll,
        gw: &mut Gateway,
        now: Instant,
        (local, remote): (std::net::SocketAddr, std::net::SocketAddr),
        host: HostStream,
    ) -> Option<FlowId> {
        let flow = gw.tcp_connect(now, local, remote);
        match flow {
            Some(f) => self.insert(epoll, gw, now, f, host),
            None => Self::reset_unused(host),
        }
        flow
    }

    /// The dial of a held outbound connection came back: with its socket the container's SYN
    /// is answered and the flow spliced; without, the container is refused. A container that
    /// gave up meanwhile (or whose SYN waited too long) has its host connection reset.
    pub(super) fn dialed(
        &mut self,
        epoll: &Epoll,
        gw: &mut Gateway,
        now: Instant,
        flow: FlowId,
        host: Option<HostStream>,
    ) {
        match host {
            Some(h) if gw.tcp_established(now, flow) => self.insert(epoll, gw, now, flow, h),
            Some(h) => Self::reset_unused(h),
            None => gw.tcp_abort(now, flow),
        }
    }

    /// The flow of an epoll token, if it is a host socket's.
    pub(super) fn token_flow(token: u64) -> Option<FlowId> {
        (token & FLOW_TOKEN != 0).then_some(FlowId(token & !FLOW_TOKEN))
    }

    /// The host socket of `flow` is ready in the ways `events` says.
    pub(super) fn ready(
        &mut self,
        gw: &mut Gateway,
        now: Instant,
        flow: FlowId,
        events: EpollFlags,
    ) {
        let Some(io) = self.flows.get_mut(&flow) else {
            return;
        };
        let trouble = EpollFlags::EPOLLERR | EpollFlags::EPOLLHUP;
        if events.contains(EpollFlags::EPOLLERR)
            && matches!(io.host.stream.take_error(), Ok(Some(_)) | Err(_))
        {
            // A reset or an error on the host side: the container's side is reset at once,
            // not when the flow next has bytes to move.
            self.abort(gw, now, flow);
            return;
        }
        if events.intersects(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | trouble) {
            io.readable = true;
        }
        if events.intersects(EpollFlags::EPOLLOUT | trouble) {
            io.writable = true;
        }
        self.service(gw, now, flow);
    }

    /// Resets `flow` on both sides.
    pub(super) fn abort(&mut self, gw: &mut Gateway, now: Instant, flow: FlowId) {
        if let Some(io) = self.flows.remove(&flow) {
            reset(io);
        }
        gw.tcp_abort(now, flow);
    }

    /// Closes the host socket of a flow that never came to be, with a reset.
    pub(super) fn reset_unused(host: HostStream) {
        let _ =
            nix::sys::socket::setsockopt(&host.stream, nix::sys::socket::sockopt::Linger, &RESET);
    }

    /// Moves bytes between a flow's smoltcp socket and its host socket, both ways, as far as
    /// each side can take them, and passes closes and resets on.
    pub(super) fn service(&mut self, gw: &mut Gateway, now: Instant, flow: FlowId) {
        let Some(io) = self.flows.get_mut(&flow) else {
            return;
        };
        let mut failed = false;
        // Host -> container, while the send buffer has room.
        while io.readable && !io.host_eof {
            let stream = &mut io.host.stream;
            let moved = gw.tcp_send_with(now, flow, |buf| {
                if buf.is_empty() {
                    return (0, Moved::NoRoom);
                }
                moved(stream.read(buf), Moved::Eof)
            });
            match moved {
                Some(Moved::Bytes) => {}
                // Not established yet, closed for sending, or full: the gateway reports the
                // flow when that changes.
                None | Some(Moved::NoRoom) => break,
                Some(Moved::Again) => io.readable = false,
                Some(Moved::Eof) => {
                    io.host_eof = true;
                    gw.tcp_close(now, flow);
                }
                Some(Moved::Failed) => {
                    failed = true;
                    break;
                }
            }
        }
        // Container -> host, while the host socket takes it.
        while io.writable && !io.shut_host && !failed {
            let stream = &mut io.host.stream;
            // A stream socket that takes nothing without an error is broken.
            let moved =
                gw.tcp_recv_with(now, flow, |data| moved(stream.write(data), Moved::Failed));
            match moved {
                Some(Moved::Bytes) => {}
                None | Some(Moved::NoRoom) | Some(Moved::Eof) => break,
                Some(Moved::Again) => io.writable = false,
                Some(Moved::Failed) => failed = true,
            }
        }
        if failed {
            // The host side broke: the container's side is reset too.
            self.abort(gw, now, flow);
            return;
        }
        if gw.tcp_state(flow) == FlowState::PeerClosed && !io.shut_host {
            // The container is done sending and the host has all of it.
            io.shut_host = true;
            let _ = io.host.stream.shutdown(Shutdown::Write);
        }
    }

    /// The gateway forgot `flow`. Only a clean end (both FINs through, every byte delivered)
    /// closes the host socket gracefully; anything else (a reset, a timeout, bytes the host
    /// never took) resets it.
    pub(super) fn closed(&mut self, flow: FlowId, clean: bool) {
        if let Some(io) = self.flows.remove(&flow)
            && !(clean && io.host_eof)
        {
            reset(io);
        }
    }
}

impl Drop for TcpFlows {
    /// The datapath stops (its network is removed, or the daemon exits): no host connection
    /// may look as if it ended cleanly.
    fn drop(&mut self) {
        for (_, io) in self.flows.drain() {
            reset(io);
        }
    }
}

/// `SO_LINGER` with a zero timeout: closing the socket then resets the connection.
const RESET: libc::linger = libc::linger {
    l_onoff: 1,
    l_linger: 0,
};

/// Closes the host socket with a reset rather than a FIN.
fn reset(io: FlowIo) {
    TcpFlows::reset_unused(io.host);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flows' socket buffers are mapped on their own: their memory comes and goes with the flow.
    #[test]
    fn socket_buffers_are_mapped() {
        const {
            assert!(vswitch_nat::tcp::LARGE_BUF >= vswitch_netdev::MMAP_THRESHOLD);
        }
    }

    #[test]
    fn tokens_of_flows_never_look_like_ports_or_the_wake_up() {
        let flow = FlowId(12345 << 4 | 3);
        let token = FLOW_TOKEN | flow.0;
        assert_eq!(TcpFlows::token_flow(token), Some(flow));
        assert_eq!(TcpFlows::token_flow(7), None, "a port's index");
        assert_ne!(token, u64::MAX);
    }
}
