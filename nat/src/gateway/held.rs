//! Outbound SYNs held while the caller dials their destination.
//!
//! A held SYN has no socket: it costs its own bytes and a table entry, not a socket's
//! buffers, so a container opening thousands of connections to a destination that never
//! answers holds next to no memory. When the dial succeeds the flow gets its socket, a
//! listener for exactly that destination, and the SYN is fed to it (the SYN-ACK goes out
//! then); when it fails the SYN is fed to the stack with no listener, which answers with a RST,
//! so a refused destination looks refused. Retransmissions of a held SYN are dropped.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use smoltcp::socket::tcp;
use smoltcp::wire::IpListenEndpoint;

use super::{Gateway, SHARD_BITS, shard_of};
use crate::tcp::{FlowId, HELD_SYN_TIMEOUT, TcpEvent};

/// A SYN waiting for its dial.
pub(super) struct Held {
    pub(super) src: SocketAddr,
    dst: SocketAddr,
    /// The SYN as it came (Ethernet header first), to feed to the stack later.
    syn: Vec<u8>,
    /// Refused if still held then.
    deadline: Instant,
}

impl Gateway {
    /// A container's bare SYN (`eth`) from `src` to `dst`: if it starts (or repeats) an
    /// outbound connection, hold it, report a new one as [`TcpEvent::Syn`], and return true;
    /// false if the stack is to see it (a flow of its own, the DNS service, no NAT, or the
    /// table full, which the stack answers with a RST).
    pub(super) fn hold_syn(
        &mut self,
        now: Instant,
        src: SocketAddr,
        dst: SocketAddr,
        eth: &[u8],
    ) -> bool {
        if !self.nat {
            return false;
        }
        if self.is_own(dst.ip()) && self.stream.as_ref().is_some_and(|s| s.port() == dst.port()) {
            return false;
        }
        let k = self.shard_for(src, dst);
        let shard = &self.shards[k];
        if shard.held.values().any(|h| h.src == src && h.dst == dst) {
            return true;
        }
        if shard
            .flows
            .has_listener_for(&shard.sockets, src.into(), dst.into())
        {
            return false;
        }
        if !self.budget.admit(src.ip(), false) {
            return false;
        }
        self.next_flow += 1;
        let flow = FlowId((self.next_flow << SHARD_BITS) | k as u64);
        self.shards[k].held.insert(
            flow,
            Held {
                src,
                dst,
                syn: eth.to_vec(),
                deadline: now + HELD_SYN_TIMEOUT,
            },
        );
        self.held_sweep.get_or_insert(now + HELD_SYN_TIMEOUT);
        self.tcp_events.push(TcpEvent::Syn { flow, src, dst });
        true
    }

    /// The dial of held flow `flow` succeeded: it gets its socket and its SYN. Returns false if
    /// `flow` is not held (gone meanwhile) or its listener could not be made.
    pub(super) fn release_held(&mut self, now: Instant, flow: FlowId) -> bool {
        let k = shard_of(flow);
        let Some(h) = self.shards.get_mut(k).and_then(|s| s.held.remove(&flow)) else {
            return false;
        };
        let container = h.src.ip();
        let large = self.budget.take_large(container);
        let mut s = crate::tcp::new_socket(large);
        let listen = IpListenEndpoint {
            addr: Some(h.dst.ip().into()),
            port: h.dst.port(),
        };
        if s.listen(listen).is_err() {
            self.budget.release(container, false, large);
            return false;
        }
        let shard = &mut self.shards[k];
        let handle = shard.sockets.add(s);
        shard
            .flows
            .insert(flow, handle, tcp::State::Listen, container, large, false);
        self.device.rx.push_back(h.syn);
        self.poll(now, k);
        self.shards[k].flows.flows.contains_key(&flow)
    }

    /// Refuses held flow `flow` (the dial failed, or took too long): the stack answers its SYN
    /// with a RST. Returns false if it was not held.
    pub(super) fn refuse_held(&mut self, now: Instant, flow: FlowId) -> bool {
        let k = shard_of(flow);
        let Some(h) = self.shards.get_mut(k).and_then(|s| s.held.remove(&flow)) else {
            return false;
        };
        self.budget.release(h.src.ip(), false, false);
        self.device.rx.push_back(h.syn);
        self.poll(now, k);
        true
    }

    /// Whether `flow` is a held SYN.
    pub(super) fn is_held(&self, flow: FlowId) -> bool {
        self.shards
            .get(shard_of(flow))
            .is_some_and(|s| s.held.contains_key(&flow))
    }

    /// Refuses the held SYNs whose dial has not reported in [`HELD_SYN_TIMEOUT`]. A sweep
    /// walks every held SYN, so sweeps are at least a second apart.
    pub(super) fn expire_held(&mut self, now: Instant) {
        if self.held_sweep.is_none_or(|t| t > now) {
            return;
        }
        let expired: Vec<FlowId> = self
            .shards
            .iter()
            .flat_map(|s| s.held.iter())
            .filter(|(_, h)| h.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for flow in expired {
            self.refuse_held(now, flow);
        }
        let next = self
            .shards
            .iter()
            .flat_map(|s| s.held.values())
            .map(|h| h.deadline)
            .min();
        self.held_sweep = next.map(|t| t.max(now + Duration::from_secs(1)));
    }

    /// Held SYNs of `container`.
    #[cfg(test)]
    pub(super) fn held_of(&self, container: std::net::IpAddr) -> usize {
        self.shards
            .iter()
            .flat_map(|s| s.held.values())
            .filter(|h| h.src.ip() == container)
            .count()
    }
}
