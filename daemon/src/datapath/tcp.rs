//! NAT's TCP flows as the datapath sees them: bytes move between a flow's smoltcp socket in the
//! gateway and its host side (a tokio task in `host::splice`), with backpressure both ways.
//!
//! - container -> host: chunks go through a bounded channel; when it is full the chunk waits
//!   in `stash`, reading from the socket stops (the container's window closes) and `blocked`
//!   tells the host side to ask for a resume once it has made room.
//! - host -> container: chunks wait in `from_host` until the socket's send buffer takes them;
//!   their credits go back to the host side as they do.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::mpsc::error::TrySendError;
use vswitch_nat::{FlowId, FlowState, Gateway};

use super::flow::{CHUNK_OVERHEAD, FlowChannel, FlowShared};

/// Largest chunk read from a flow's socket at once.
const CHUNK_FROM_CONTAINER: usize = 64 * 1024;

/// The datapath's half of a TCP flow's splice.
struct FlowIo {
    /// Chunks for the host side; `None` once the container closed its sending half.
    to_host: Option<tokio::sync::mpsc::Sender<Vec<u8>>>,
    /// A chunk read from the container that the host side had no room for yet.
    stash: Option<Vec<u8>>,
    /// Host bytes waiting for room in the socket, and how much of the first is sent.
    from_host: VecDeque<Vec<u8>>,
    offset: usize,
    host_eof: bool,
    fin_sent: bool,
    shared: Arc<FlowShared>,
}

impl FlowIo {
    fn new(ch: FlowChannel) -> Self {
        Self {
            to_host: Some(ch.to_host),
            stash: None,
            from_host: VecDeque::new(),
            offset: 0,
            host_eof: false,
            fin_sent: false,
            shared: ch.shared,
        }
    }
}

/// The host sides of the flows the gateway terminates, by flow.
#[derive(Default)]
pub(super) struct TcpFlows {
    flows: HashMap<FlowId, FlowIo>,
}

impl TcpFlows {
    /// Splices `flow` to the host side behind `channel`.
    pub(super) fn insert(&mut self, flow: FlowId, channel: FlowChannel) {
        self.flows.insert(flow, FlowIo::new(channel));
    }

    /// The gateway gave `flow` large socket buffers: so does its splice.
    pub(super) fn make_large(&mut self, flow: FlowId) {
        if let Some(io) = self.flows.get(&flow) {
            io.shared.make_large();
        }
    }

    /// Drops `flow`'s host side, which resets its connection.
    pub(super) fn drop_reset(&mut self, flow: FlowId) {
        if let Some(io) = self.flows.remove(&flow) {
            io.shared.reset.store(true, Ordering::Release);
            io.shared.credits.close();
        }
    }

    /// The host side hands over `data` (its credits were taken).
    pub(super) fn host_data(
        &mut self,
        gw: &mut Gateway,
        now: Instant,
        flow: FlowId,
        data: Vec<u8>,
    ) {
        if let Some(io) = self.flows.get_mut(&flow) {
            io.from_host.push_back(data);
            self.service(gw, now, flow);
        }
    }

    /// The host side is done sending.
    pub(super) fn host_eof(&mut self, gw: &mut Gateway, now: Instant, flow: FlowId) {
        if let Some(io) = self.flows.get_mut(&flow) {
            io.host_eof = true;
            self.service(gw, now, flow);
        }
    }

    /// The host side failed: the flow is reset, and the host side stops waiting for credits.
    pub(super) fn host_reset(&mut self, gw: &mut Gateway, now: Instant, flow: FlowId) {
        if let Some(io) = self.flows.remove(&flow) {
            io.shared.credits.close();
        }
        gw.tcp_abort(now, flow);
    }

    /// Moves bytes between a flow's smoltcp socket and its host side, both ways, as far as
    /// the other side can take them, and propagates closes.
    pub(super) fn service(&mut self, gw: &mut Gateway, now: Instant, flow: FlowId) {
        let Some(io) = self.flows.get_mut(&flow) else {
            return;
        };
        // Container -> host, while the host side's queue has room.
        loop {
            if let Some(chunk) = io.stash.take() {
                let len = chunk.len();
                if io.shared.to_host_full(len) {
                    // The flag, then the room again: see `host::splice`.
                    io.shared.blocked.store(true, Ordering::SeqCst);
                    if io.shared.to_host_full(len) {
                        io.stash = Some(chunk);
                        break;
                    }
                    io.shared.blocked.store(false, Ordering::SeqCst);
                }
                let Some(to_host) = io.to_host.as_ref() else {
                    break;
                };
                // Counted before it is queued, so the host side never counts below zero.
                io.shared.to_host_bytes.fetch_add(len, Ordering::SeqCst);
                let sent = match to_host.try_send(chunk) {
                    Err(TrySendError::Full(c)) => {
                        // The flag, then the queue again: the host side may have emptied it
                        // since, and would then have nothing left to resume us for.
                        io.shared.blocked.store(true, Ordering::SeqCst);
                        to_host.try_send(c)
                    }
                    other => other,
                };
                match sent {
                    Ok(()) => {}
                    Err(TrySendError::Full(c)) => {
                        io.shared.to_host_bytes.fetch_sub(len, Ordering::SeqCst);
                        io.stash = Some(c);
                        break;
                    }
                    Err(TrySendError::Closed(_)) => {
                        io.shared.to_host_bytes.fetch_sub(len, Ordering::SeqCst);
                        break;
                    }
                }
            }
            let Some(chunk) = gw.tcp_recv_chunk(now, flow, CHUNK_FROM_CONTAINER) else {
                break;
            };
            io.stash = Some(chunk);
        }
        // Host -> container, as far as the socket's send buffer allows.
        while let Some(front) = io.from_host.front() {
            let n = gw.tcp_send(now, flow, &front[io.offset..]);
            io.shared.credits.add_permits(n);
            io.offset += n;
            if io.offset < front.len() {
                break;
            }
            io.from_host.pop_front();
            io.offset = 0;
            io.shared.credits.add_permits(CHUNK_OVERHEAD);
        }
        if io.host_eof && io.from_host.is_empty() && !io.fin_sent {
            io.fin_sent = true;
            gw.tcp_close(now, flow);
        }
        match gw.tcp_state(flow) {
            FlowState::PeerClosed if io.stash.is_none() => {
                // The container is done sending: closing our end of the queue lets the host
                // side shut down its write half after the last byte.
                io.to_host = None;
            }
            FlowState::Closed => {
                if let Some(io) = self.flows.remove(&flow) {
                    if !io.fin_sent || io.stash.is_some() {
                        io.shared.reset.store(true, Ordering::Release);
                    }
                    io.shared.credits.close();
                }
            }
            _ => {}
        }
    }
}
