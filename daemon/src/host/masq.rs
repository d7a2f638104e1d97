//! The gateway ports that published-port clients get when the container is shown the gateway
//! instead of them (loopback clients, its own network's, the other address family).
//!
//! Every such client needs a port of its own for as long as it is remembered: two clients on
//! one port would have the container's replies crossed. Ports are leased from one pool per
//! endpoint (its published ports share it, since two of them may lead to one container port),
//! in the ephemeral range as the kernel would pick them, and go back to the pool when the
//! lease is dropped. A UDP client is forgotten after a minute of silence, as its flow is.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// The ephemeral range (as the kernel's default `ip_local_port_range`).
const FIRST: u16 = 32768;
const LAST: u16 = 60999;

#[derive(Debug, Default)]
struct Pool {
    used: HashSet<u16>,
    next: u16,
}

/// A leased port; back in the pool when dropped.
#[derive(Debug)]
pub struct Lease {
    pool: Arc<Mutex<Pool>>,
    port: u16,
}

impl Lease {
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.lock().used.remove(&self.port);
    }
}

/// A pool of gateway ports.
#[derive(Debug, Clone, Default)]
pub struct Ports {
    pool: Arc<Mutex<Pool>>,
}

impl Ports {
    /// A port nobody holds, or `None` when all are taken.
    pub fn lease(&self) -> Option<Lease> {
        let mut p = self.pool.lock();
        let span = usize::from(LAST - FIRST) + 1;
        if p.used.len() >= span {
            return None;
        }
        loop {
            let port = FIRST + p.next % (LAST - FIRST + 1);
            p.next = p.next.wrapping_add(1) % (LAST - FIRST + 1);
            if p.used.insert(port) {
                return Some(Lease {
                    pool: self.pool.clone(),
                    port,
                });
            }
        }
    }
}

/// How long a UDP client shown as the gateway is remembered without a datagram (as long as
/// its flow lives, `vswitch_nat::flows::UDP_IDLE`).
pub const CLIENT_IDLE: Duration = vswitch_nat::flows::UDP_IDLE;

/// The clients of one published UDP port shown as the gateway, each on a port of its own;
/// at most `max`, the oldest forgotten first, and none kept after [`CLIENT_IDLE`] of silence.
#[derive(Debug)]
pub struct Clients {
    ports: Ports,
    gateway: IpAddr,
    seen_as: HashMap<SocketAddr, (Lease, Instant)>,
    order: VecDeque<SocketAddr>,
    max: usize,
}

impl Clients {
    pub fn new(ports: Ports, gateway: IpAddr, max: usize) -> Self {
        Self {
            ports,
            gateway,
            seen_as: HashMap::new(),
            order: VecDeque::new(),
            max: max.max(1),
        }
    }

    /// The address `client` is shown as (a datagram from it at `now`), or `None` when no port
    /// is free.
    pub fn seen_as(&mut self, now: Instant, client: SocketAddr) -> Option<SocketAddr> {
        if let Some((lease, last)) = self.seen_as.get_mut(&client) {
            *last = now;
            return Some(SocketAddr::new(self.gateway, lease.port()));
        }
        self.forget_idle(now);
        if self.seen_as.len() >= self.max
            && let Some(oldest) = self.order.pop_front()
        {
            self.seen_as.remove(&oldest);
        }
        let lease = self.ports.lease()?;
        let addr = SocketAddr::new(self.gateway, lease.port());
        self.seen_as.insert(client, (lease, now));
        self.order.push_back(client);
        Some(addr)
    }

    /// Looks at a few of the oldest clients: the silent ones go, the others to the back.
    fn forget_idle(&mut self, now: Instant) {
        for _ in 0..8 {
            let Some(front) = self.order.pop_front() else {
                return;
            };
            match self.seen_as.get(&front) {
                Some((_, last)) if now.saturating_duration_since(*last) >= CLIENT_IDLE => {
                    self.seen_as.remove(&front);
                }
                Some(_) => self.order.push_back(front),
                None => {}
            }
        }
    }

    pub fn len(&self) -> usize {
        self.seen_as.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen_as.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(port: u16) -> SocketAddr {
        SocketAddr::new([127, 0, 0, 1].into(), port)
    }

    #[test]
    fn clients_of_two_published_ports_never_share_a_gateway_port() {
        let t = Instant::now();
        let ports = Ports::default();
        let gw: IpAddr = [10, 0, 0, 1].into();
        let mut a = Clients::new(ports.clone(), gw, 4);
        let mut b = Clients::new(ports.clone(), gw, 4);
        let mut seen = HashSet::new();
        for p in 0..4 {
            assert!(seen.insert(a.seen_as(t, client(p)).expect("port")));
            assert!(seen.insert(b.seen_as(t, client(p)).expect("port")));
        }
        // A client keeps its port.
        assert_eq!(a.seen_as(t, client(0)), a.seen_as(t, client(0)));
        // Past the bound the oldest is forgotten, and only it: the others keep their ports.
        let kept = a.seen_as(t, client(3));
        let fifth = a.seen_as(t, client(9)).expect("port");
        assert!(seen.insert(fifth));
        assert_eq!(a.seen_as(t, client(3)), kept);
        // A dropped table gives its ports back.
        drop(a);
        drop(b);
        assert!(ports.pool.lock().used.is_empty());
    }

    #[test]
    fn silent_clients_are_forgotten_and_their_ports_go_back() {
        let t = Instant::now();
        let ports = Ports::default();
        let mut c = Clients::new(ports.clone(), [10, 0, 0, 1].into(), 4096);
        for p in 0..100 {
            c.seen_as(t, client(p));
        }
        // One keeps talking; a new client a minute later finds the silent ones gone.
        c.seen_as(t + CLIENT_IDLE / 2, client(50));
        for p in 1000..1100 {
            c.seen_as(t + CLIENT_IDLE, client(p));
        }
        assert!(c.len() < 110, "{} remembered", c.len());
        assert!(c.seen_as.contains_key(&client(50)), "the talking one stays");
        assert_eq!(ports.pool.lock().used.len(), c.len());
    }

    #[test]
    fn the_pool_is_bounded_and_a_port_comes_back_when_released() {
        let ports = Ports::default();
        let span = usize::from(LAST - FIRST) + 1;
        let mut leases: Vec<Lease> = (0..span).map(|_| ports.lease().expect("port")).collect();
        assert!(ports.lease().is_none(), "all taken");
        let freed = leases.swap_remove(100).port();
        assert_eq!(ports.lease().map(|l| l.port()), Some(freed));
    }
}
