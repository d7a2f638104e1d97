//! A length-prefixed message service over TCP on the gateway (DNS over TCP on port 53).
//!
//! smoltcp has no listen backlog: one socket accepts one connection. The service keeps one idle
//! listening socket while it has room, turns it into a connection when a client arrives, and
//! opens the next listener. Connections are bounded ([`StreamService::max_conns`]), each has a
//! small fixed buffer, and a client that does not complete a message within the idle time (one
//! that sends nothing, or trickles bytes) is cut, so slow clients cannot hold the service.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp;

/// Largest message accepted (the 2-byte length prefix allows 65535).
const MAX_MESSAGE: usize = 65_535;
/// Messages of one connection waiting for an answer at most; beyond, the rest stays unread
/// (TCP pushes back on the client) until answers go out.
const MAX_PENDING: u32 = 16;
const RX_BUFFER: usize = 8 * 1024;
const TX_BUFFER: usize = 66 * 1024;

/// A complete message received on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamMessage {
    /// Pass back to [`crate::Gateway::stream_reply`].
    pub conn: u64,
    pub peer: IpAddr,
    pub message: Vec<u8>,
}

struct Conn {
    id: u64,
    buf: Vec<u8>,
    deadline: Instant,
    /// Messages handed out and not yet answered.
    pending: u32,
}

pub(crate) struct StreamService {
    port: u16,
    max_conns: usize,
    idle: Duration,
    listener: Option<SocketHandle>,
    conns: HashMap<SocketHandle, Conn>,
    by_id: HashMap<u64, SocketHandle>,
    next_id: u64,
    inbox: Vec<StreamMessage>,
    closing: Vec<SocketHandle>,
}

impl StreamService {
    pub(crate) fn new(port: u16, max_conns: usize, idle: Duration) -> Self {
        Self {
            port,
            max_conns,
            idle,
            listener: None,
            conns: HashMap::new(),
            by_id: HashMap::new(),
            next_id: 1,
            inbox: Vec::new(),
            closing: Vec::new(),
        }
    }

    /// Promotes an accepted listener, reads what arrived, cuts idle and closed connections, and
    /// keeps a listener open while there is room. Call after every `Interface::poll`.
    pub(crate) fn service(&mut self, now: Instant, sockets: &mut SocketSet<'static>) {
        if let Some(h) = self.listener {
            let s = sockets.get_mut::<tcp::Socket>(h);
            if !s.is_listening() {
                self.listener = None;
                let id = self.next_id;
                self.next_id += 1;
                self.conns.insert(
                    h,
                    Conn {
                        id,
                        buf: Vec::new(),
                        deadline: now + self.idle,
                        pending: 0,
                    },
                );
                self.by_id.insert(id, h);
            }
        }

        let mut dead = Vec::new();
        for (&h, conn) in &mut self.conns {
            if self.closing.contains(&h) {
                continue;
            }
            let s = sockets.get_mut::<tcp::Socket>(h);
            let mut chunk = [0u8; 2048];
            while s.can_recv() {
                let Ok(n) = s.recv_slice(&mut chunk) else {
                    break;
                };
                if n == 0 {
                    break;
                }
                conn.buf.extend_from_slice(&chunk[..n]);
                if conn.buf.len() > MAX_MESSAGE + 2 {
                    break;
                }
            }
            while let Some(len) = conn
                .buf
                .first_chunk::<2>()
                .map(|l| usize::from(u16::from_be_bytes(*l)))
                .filter(|_| conn.pending < MAX_PENDING)
            {
                if conn.buf.len() < 2 + len {
                    break;
                }
                let message = conn.buf[2..2 + len].to_vec();
                conn.buf.drain(..2 + len);
                conn.pending += 1;
                conn.deadline = now + self.idle;
                if let Some(ep) = s.remote_endpoint() {
                    self.inbox.push(StreamMessage {
                        conn: conn.id,
                        peer: ep.addr.into(),
                        message,
                    });
                }
            }
            // The client closed its side and everything it asked is answered and sent.
            let finished =
                s.state() == tcp::State::CloseWait && conn.pending == 0 && s.send_queue() == 0;
            let idle = now >= conn.deadline && conn.pending == 0;
            if idle || conn.buf.len() > MAX_MESSAGE + 2 {
                s.abort();
            } else if finished && s.is_open() {
                s.close();
            }
            if !s.is_open() || idle {
                dead.push(h);
            }
        }
        // An aborted socket still owes its RST, which the next interface poll sends; the caller
        // reaps these sockets after that poll (see `reap`).
        self.closing.extend(dead);

        if self.listener.is_none() && self.conns.len() < self.max_conns {
            let mut s = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; RX_BUFFER]),
                tcp::SocketBuffer::new(vec![0; TX_BUFFER]),
            );
            if s.listen(self.port).is_ok() {
                self.listener = Some(sockets.add(s));
            }
        }
    }

    /// Drops the sockets of finished connections once they are fully closed. Call after the
    /// interface poll that follows [`Self::service`].
    pub(crate) fn reap(&mut self, sockets: &mut SocketSet<'static>) {
        let mut still = Vec::new();
        for h in self.closing.drain(..) {
            let closed = sockets.get_mut::<tcp::Socket>(h).state() == tcp::State::Closed;
            match self.conns.get(&h) {
                Some(_) if !closed => still.push(h),
                Some(_) => {
                    if let Some(c) = self.conns.remove(&h) {
                        self.by_id.remove(&c.id);
                    }
                    sockets.remove(h);
                }
                None => {}
            }
        }
        still.sort();
        still.dedup();
        self.closing = still;
    }

    pub(crate) fn take_messages(&mut self) -> Vec<StreamMessage> {
        std::mem::take(&mut self.inbox)
    }

    /// Queues an answer on connection `conn`. Unknown (already closed) connections are ignored;
    /// an answer that does not fit the send buffer aborts the connection.
    pub(crate) fn reply(
        &mut self,
        now: Instant,
        sockets: &mut SocketSet<'static>,
        conn: u64,
        message: &[u8],
    ) {
        let Some(&h) = self.by_id.get(&conn) else {
            return;
        };
        let Some(c) = self.conns.get_mut(&h) else {
            return;
        };
        c.pending = c.pending.saturating_sub(1);
        c.deadline = now + self.idle;
        let s = sockets.get_mut::<tcp::Socket>(h);
        let Ok(len) = u16::try_from(message.len()) else {
            s.abort();
            return;
        };
        if s.send_capacity() - s.send_queue() < message.len() + 2 || !s.may_send() {
            s.abort();
            return;
        }
        let _ = s.send_slice(&len.to_be_bytes());
        let _ = s.send_slice(message);
    }

    /// The message of connection `conn` the caller will not answer (malformed, say): it no
    /// longer holds the connection open. Without this, a client could pin a connection, and
    /// with enough of them the whole service, by sending messages that get no answer.
    pub(crate) fn unanswered(&mut self, now: Instant, conn: u64) {
        if let Some(&h) = self.by_id.get(&conn)
            && let Some(c) = self.conns.get_mut(&h)
        {
            c.pending = c.pending.saturating_sub(1);
            c.deadline = now + self.idle;
        }
    }

    /// The earliest idle deadline of a connection, for the caller's timer.
    /// Connections waiting for an answer, and ones already closing (smoltcp times those), do
    /// not count: a deadline in the past must never make the caller spin.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.conns
            .iter()
            .filter(|(h, c)| c.pending == 0 && !self.closing.contains(h))
            .map(|(_, c)| c.deadline)
            .min()
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    pub(crate) fn connections(&self) -> usize {
        self.conns.len()
    }
}
