//! The gateway's TCP flows as its caller drives them: connections it opens to containers
//! (published ports), outbound connections once their SYN is released (`held`), and the bytes
//! moved through them (see `crate::tcp`).

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use smoltcp::socket::tcp;
use smoltcp::wire::IpEndpoint;

use super::{Gateway, SHARD_BITS, SHARDS, shard_of};
use crate::stream::StreamService;
use crate::tcp::{FlowId, FlowState, TcpEvent};

impl Gateway {
    /// Events of TCP flows since the last call.
    pub fn poll_tcp_events(&mut self) -> Vec<TcpEvent> {
        std::mem::take(&mut self.tcp_events)
    }

    /// Opens a connection to a container (`remote`) from `local` (the client's address, or the
    /// gateway's). `None` if the flow table is full or the addresses do not fit.
    pub fn tcp_connect(
        &mut self,
        now: Instant,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> Option<FlowId> {
        let container = remote.ip();
        if !self.budget.admit(container, true) {
            return None;
        }
        let large = self.budget.take_large(container);
        let mut s = crate::tcp::new_socket(large);
        if s.connect(
            self.iface.context(),
            IpEndpoint::from(remote),
            IpEndpoint::from(local),
        )
        .is_err()
        {
            self.budget.release(container, true, large);
            return None;
        }
        let state = s.state();
        let k = self.shard_for(local, remote);
        self.next_flow += 1;
        let id = FlowId((self.next_flow << SHARD_BITS) | k as u64);
        let shard = &mut self.shards[k];
        let h = shard.sockets.add(s);
        shard.flows.insert(id, h, state, container, large, true);
        self.poll(now, k);
        Some(id)
    }

    /// Which shard holds the connection between `a` and `b` (either order).
    pub(super) fn shard_for(&self, a: SocketAddr, b: SocketAddr) -> usize {
        use std::hash::BuildHasher;
        let svc = self.stream.as_ref().map(StreamService::port);
        let own_svc = |e: SocketAddr| svc == Some(e.port()) && self.is_own(e.ip());
        if own_svc(a) || own_svc(b) {
            return 0;
        }
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        (self.hasher.hash_one((lo, hi)) % SHARDS as u64) as usize
    }

    /// Open TCP flows of the container at `addr` (held SYNs included).
    pub fn tcp_flows_of(&self, addr: IpAddr) -> u32 {
        self.budget.flows_of(addr)
    }

    /// TCP flows with large buffers (see [`crate::tcp::MAX_LARGE_FLOWS`]).
    pub fn tcp_large_flows(&self) -> usize {
        self.budget.large()
    }

    /// The shard and socket of a flow.
    fn flow_socket(&mut self, flow: FlowId) -> Option<(usize, &mut tcp::Socket<'static>)> {
        let k = shard_of(flow);
        let shard = self.shards.get_mut(k)?;
        let f = shard.flows.flows.get(&flow)?;
        Some((k, shard.sockets.get_mut::<tcp::Socket>(f.handle)))
    }

    /// Lets a held outbound connection complete its handshake (the dial succeeded): the flow
    /// gets its socket and the SYN-ACK goes out. Returns false if the flow is gone (the
    /// container gave up, or it waited too long): the caller drops its host side.
    pub fn tcp_established(&mut self, now: Instant, flow: FlowId) -> bool {
        self.release_held(now, flow)
    }

    /// Moves up to `data.len()` bytes into the flow's send buffer; returns how many it took.
    /// If it took less, the flow reports activity once there is room again.
    pub fn tcp_send(&mut self, now: Instant, flow: FlowId, data: &[u8]) -> usize {
        let mut taken = 0;
        while taken < data.len() {
            let rest = &data[taken..];
            let n = self
                .tcp_send_with(now, flow, |buf| {
                    let n = buf.len().min(rest.len());
                    buf[..n].copy_from_slice(&rest[..n]);
                    (n, n)
                })
                .unwrap_or(0);
            if n == 0 {
                break;
            }
            taken += n;
        }
        taken
    }

    /// Lets `fill` write straight into the free part of the flow's send buffer (one contiguous
    /// piece of it, possibly empty); `fill` returns how many bytes it wrote and a result of its
    /// own. `None` if the flow cannot send (gone, not yet established, or closed for sending).
    /// Whenever the buffer is left full, the flow reports activity once it has room again.
    pub fn tcp_send_with<R>(
        &mut self,
        now: Instant,
        flow: FlowId,
        fill: impl FnOnce(&mut [u8]) -> (usize, R),
    ) -> Option<R> {
        let k = shard_of(flow);
        let shard = self.shards.get_mut(k)?;
        let f = shard.flows.flows.get_mut(&flow)?;
        let s = shard.sockets.get_mut::<tcp::Socket>(f.handle);
        if !s.may_send() {
            return None;
        }
        let (n, r) = s
            .send(|buf| {
                let (n, r) = fill(buf);
                let n = n.min(buf.len());
                (n, (n, r))
            })
            .ok()?;
        if s.send_queue() >= s.send_capacity() {
            f.want_write = true;
        }
        if n > 0 {
            self.poll(now, k);
        }
        Some(r)
    }

    /// Reads what the container sent, up to `buf.len()` bytes.
    pub fn tcp_recv(&mut self, now: Instant, flow: FlowId, buf: &mut [u8]) -> usize {
        self.tcp_recv_with(now, flow, |data| {
            let n = data.len().min(buf.len());
            buf[..n].copy_from_slice(&data[..n]);
            (n, n)
        })
        .unwrap_or(0)
    }

    /// Lets `drain` take bytes the container sent straight from the flow's receive buffer (one
    /// contiguous piece of it, never empty); `drain` returns how many it took and a result of
    /// its own. `None` if there is nothing to read.
    pub fn tcp_recv_with<R>(
        &mut self,
        now: Instant,
        flow: FlowId,
        drain: impl FnOnce(&[u8]) -> (usize, R),
    ) -> Option<R> {
        let k = shard_of(flow);
        let shard = self.shards.get_mut(k)?;
        let f = shard.flows.flows.get_mut(&flow)?;
        let s = shard.sockets.get_mut::<tcp::Socket>(f.handle);
        if !s.can_recv() {
            return None;
        }
        let (n, r) = s
            .recv(|data| {
                let (n, r) = drain(data);
                let n = n.min(data.len());
                (n, (n, r))
            })
            .ok()?;
        // Judged by reads that moved something. A short read with more left behind it (the
        // ring wrapped, or the host side took less) says nothing about the container; one that
        // emptied the buffer says it sent little.
        let bulk = if n >= crate::tcp::BULK_DRAIN {
            true
        } else if n > 0 && s.recv_queue() == 0 {
            false
        } else {
            f.bulk
        };
        if bulk != f.bulk {
            f.bulk = bulk;
            s.set_ack_delay(bulk.then_some(crate::tcp::BULK_ACK_DELAY));
        }
        if n > 0 {
            // Window updates go out with the next poll; do it now so the sender is not stalled.
            self.poll(now, k);
        }
        Some(r)
    }

    /// Half-closes the flow towards the container (FIN after the queued data).
    pub fn tcp_close(&mut self, now: Instant, flow: FlowId) {
        if let Some((k, s)) = self.flow_socket(flow) {
            s.close();
            self.poll(now, k);
        }
    }

    /// Resets the flow (RST to the container) and forgets it.
    pub fn tcp_abort(&mut self, now: Instant, flow: FlowId) {
        if self.refuse_held(now, flow) {
            return;
        }
        if let Some((k, s)) = self.flow_socket(flow) {
            s.abort();
            self.poll(now, k);
        }
    }

    /// Resets every TCP flow of the container at `addr`, held SYNs included: its endpoint is
    /// gone, and its connections with it (as when a container leaves a kernel bridge).
    pub fn tcp_abort_container(&mut self, now: Instant, addr: IpAddr) {
        let flows: Vec<FlowId> = self
            .shards
            .iter()
            .flat_map(|sh| {
                let open = sh.flows.flows.iter().filter(|(_, f)| f.container == addr);
                let held = sh.held.iter().filter(|(_, h)| h.src.ip() == addr);
                open.map(|(id, _)| *id).chain(held.map(|(id, _)| *id))
            })
            .collect();
        for flow in flows {
            self.tcp_abort(now, flow);
        }
    }

    pub fn tcp_state(&self, flow: FlowId) -> FlowState {
        if self.is_held(flow) {
            return FlowState::Connecting;
        }
        let Some(shard) = self.shards.get(shard_of(flow)) else {
            return FlowState::Closed;
        };
        match shard.flows.flows.get(&flow) {
            Some(f) => crate::tcp::flow_state(shard.sockets.get::<tcp::Socket>(f.handle)),
            None => FlowState::Closed,
        }
    }

    /// Number of TCP flows, held SYNs included.
    pub fn tcp_flows(&self) -> usize {
        self.budget.flows()
    }

    /// TCP flows refused for want of room (the network's table, or the container's share).
    pub fn tcp_flows_refused(&self) -> u64 {
        self.budget.refused()
    }
}
