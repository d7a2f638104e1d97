//! Fair shares of the upstream forwarding slots.
//!
//! Every forwarded query holds a slot (a socket and a buffer) until its answer or deadline,
//! and the slots are bounded for the daemon. With one shared pool, a single container flooding
//! random names holds them all and every other network's lookups are refused. Here a network
//! may hold at most its share of the pool, and a client at most its share of its network's:
//!
//! - a network: `limit / max(4, other busy networks + 2)`;
//! - a client: `network share / max(2, other busy clients of the network + 2)`.
//!
//! A lone flooding network thus leaves three quarters of the pool to the others, and a lone
//! flooding client half of its network's share to its neighbours. However many are busy, the
//! shares of those in flight leave room for one more: a newcomer always finds slots, and as
//! it becomes busy the others' shares shrink to make room for the next. Only networks and
//! clients with queries in flight are tracked, so the state is bounded by the limit.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;

#[derive(Debug, Default)]
struct Network {
    inflight: usize,
    clients: HashMap<IpAddr, usize>,
}

#[derive(Debug)]
struct State {
    limit: usize,
    total: usize,
    networks: HashMap<String, Network>,
}

/// The forwarding slots of the daemon, shared fairly.
#[derive(Debug, Clone)]
pub struct FairShare {
    state: Arc<Mutex<State>>,
}

/// One slot, held while a query is forwarded; released when dropped.
#[derive(Debug)]
pub struct Permit {
    state: Arc<Mutex<State>>,
    network: String,
    client: IpAddr,
}

impl FairShare {
    pub fn new(limit: usize) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                limit,
                total: 0,
                networks: HashMap::new(),
            })),
        }
    }

    /// A slot for `client` on `network`, unless the pool, the network's share or the client's
    /// share is used up.
    pub fn try_acquire(&self, network: &str, client: IpAddr) -> Option<Permit> {
        let mut s = self.state.lock();
        if s.total >= s.limit {
            return None;
        }
        let net = s.networks.get(network);
        let others = s.networks.len() - usize::from(net.is_some());
        let network_share = (s.limit / (others + 2).max(4)).max(1);
        if net.map_or(0, |n| n.inflight) >= network_share {
            return None;
        }
        let client_inflight = net.and_then(|n| n.clients.get(&client)).copied();
        let other_clients =
            net.map_or(0, |n| n.clients.len()) - usize::from(client_inflight.is_some());
        let client_share = (network_share / (other_clients + 2)).max(1);
        if client_inflight.unwrap_or(0) >= client_share {
            return None;
        }
        s.total += 1;
        let net = s.networks.entry(network.to_owned()).or_default();
        net.inflight += 1;
        *net.clients.entry(client).or_default() += 1;
        Some(Permit {
            state: self.state.clone(),
            network: network.to_owned(),
            client,
        })
    }

    /// Slots in use.
    pub fn in_use(&self) -> usize {
        self.state.lock().total
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut s = self.state.lock();
        s.total -= 1;
        let Some(net) = s.networks.get_mut(&self.network) else {
            return;
        };
        net.inflight -= 1;
        if let Some(c) = net.clients.get_mut(&self.client) {
            *c -= 1;
            if *c == 0 {
                net.clients.remove(&self.client);
            }
        }
        if net.inflight == 0 {
            s.networks.remove(&self.network);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    fn take(f: &FairShare, network: &str, client: IpAddr) -> Vec<Permit> {
        std::iter::from_fn(|| f.try_acquire(network, client)).collect()
    }

    #[test]
    fn a_flooding_client_leaves_its_network_and_the_others_their_share() {
        let f = FairShare::new(1024);
        let flood = take(&f, "a", ip(2));
        assert_eq!(flood.len(), 128, "half the network's quarter");
        // Its neighbour still gets slots, and so does every other network.
        assert!(f.try_acquire("a", ip(3)).is_some());
        let b = take(&f, "b", ip(2));
        assert!(!b.is_empty());
        assert!(f.try_acquire("c", ip(9)).is_some());
        // All released: nothing is tracked any more.
        drop((flood, b));
        assert_eq!(f.in_use(), 0);
        assert!(f.state.lock().networks.is_empty());
    }

    #[test]
    fn however_many_flood_a_newcomer_finds_slots() {
        let f = FairShare::new(1024);
        // Eight networks with many clients each flood at once, round after round.
        let mut held: Vec<Vec<Permit>> = Vec::new();
        for round in 0..64u8 {
            for n in 0..8 {
                held.push(take(&f, &format!("n{n}"), ip(round)));
            }
        }
        let per_network: Vec<usize> = (0..8)
            .map(|n| {
                let s = f.state.lock();
                s.networks.get(&format!("n{n}")).map_or(0, |x| x.inflight)
            })
            .collect();
        assert!(
            per_network.iter().all(|&n| n > 0 && n <= 1024 / 4),
            "{per_network:?}"
        );
        assert!(f.in_use() < 1024, "room left for a newcomer");
        // A ninth network gets slots at once.
        let late = take(&f, "late", ip(1));
        assert!(late.len() >= 32, "{}", late.len());
    }

    #[test]
    fn tiny_pools_still_give_everyone_one() {
        let f = FairShare::new(1);
        let p = f.try_acquire("a", ip(2)).expect("one");
        assert!(f.try_acquire("b", ip(2)).is_none(), "pool full");
        drop(p);
        assert!(f.try_acquire("b", ip(2)).is_some());
    }
}
