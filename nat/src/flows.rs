//! The UDP and ICMP flow tables of NAT: which host socket carries a container's conversation,
//! and when a conversation has been idle long enough to forget.
//!
//! Sans-IO like the rest of the crate: a table holds the caller's value for each flow (the
//! daemon keeps a host socket there) and is told the time; it never touches a socket. Dropping
//! a value is how a flow ends, so an evicted or expired flow's socket closes with it.
//!
//! Both tables are bounded:
//! - UDP flows come in two kinds, published (a client from anywhere reaching a published port)
//!   and outbound (a container's own). Each kind gets half of the table, and a new flow of a
//!   full half evicts the flows of its kind idle longest, a sixteenth of the half at once (one
//!   scan per that many new flows under a spray). A peer spraying source ports at a published
//!   port can then neither lock the containers out of the outside nor shut out the port's
//!   other clients.
//!   Within the outbound half, a container holds at most a quarter of it: past that its new
//!   flows evict its own idle ones, and when the half is full a new flow evicts those of the
//!   container holding most, so one container spraying destinations never evicts a quiet
//!   neighbour's conversation.
//! - ICMP echo flows: a new flow is refused while the table, or the container's share of it
//!   (64 flows), is full; flows expire when idle.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// A UDP conversation: (container address, peer as the container sees it).
pub type UdpKey = (SocketAddr, SocketAddr);
/// An outbound ping conversation: (container address, echo id, destination).
pub type IcmpKey = (IpAddr, u16, IpAddr);

/// Most UDP flows per network.
pub const MAX_UDP_FLOWS: usize = 4096;
/// How long an idle UDP flow lives (Docker's conntrack keeps unreplied UDP 30 s and replied
/// 120 s; one minute for both is between).
pub const UDP_IDLE: Duration = Duration::from_secs(60);
/// Most ping flows per network, and how long an idle one lives.
pub const MAX_ICMP_FLOWS: usize = 4096;
/// Most ping flows of one container address (a flow is one echo id to one destination: a
/// `ping` each). Without ping sockets the daemon's echo ids are one pool for all networks
/// (`echo::MAX_ECHO_FLOWS`), which this keeps out of one tenant's reach.
pub const MAX_ICMP_FLOWS_PER_CONTAINER: usize = 64;
pub const ICMP_IDLE: Duration = Duration::from_secs(30);
/// How often a table that holds flows looks for idle ones.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Which half of the UDP table a flow lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UdpKind {
    /// A client of a published port.
    Published,
    /// A container's own conversation with the outside.
    Outbound,
}

#[derive(Debug)]
struct Entry<V> {
    value: V,
    kind: UdpKind,
    last: Instant,
}

/// A bounded table of flows keyed by `K`, each holding a `V`.
#[derive(Debug)]
struct Table<K, V> {
    flows: HashMap<K, Entry<V>>,
    idle: Duration,
    next_sweep: Option<Instant>,
}

impl<K: Eq + Hash + Copy, V> Table<K, V> {
    fn new(idle: Duration) -> Self {
        Self {
            flows: HashMap::new(),
            idle,
            next_sweep: None,
        }
    }

    fn touch(&mut self, now: Instant, key: &K) -> Option<&mut V> {
        let e = self.flows.get_mut(key)?;
        e.last = now;
        Some(&mut e.value)
    }

    fn insert(&mut self, now: Instant, key: K, kind: UdpKind, value: V) {
        self.flows.insert(
            key,
            Entry {
                value,
                kind,
                last: now,
            },
        );
        self.next_sweep.get_or_insert(now + self.idle);
    }

    /// Removes the flows idle for [`Table::idle`] or more, if a sweep is due.
    fn sweep(&mut self, now: Instant) -> bool {
        if self.next_sweep.is_none_or(|t| now < t) {
            return false;
        }
        let idle = self.idle;
        self.flows
            .retain(|_, e| now.saturating_duration_since(e.last) < idle);
        self.next_sweep = (!self.flows.is_empty()).then(|| now + SWEEP_EVERY);
        true
    }

    /// Evicts the `n` flows of `kind` idle longest among those `which` picks.
    fn evict_oldest(&mut self, kind: UdpKind, which: impl Fn(&K) -> bool, n: usize) -> Vec<K> {
        let mut ages: Vec<(Instant, K)> = self
            .flows
            .iter()
            .filter(|(k, e)| e.kind == kind && which(k))
            .map(|(k, e)| (e.last, *k))
            .collect();
        let n = n.min(ages.len());
        if n < ages.len() {
            ages.select_nth_unstable_by_key(n, |(last, _)| *last);
        }
        for (_, key) in &ages[..n] {
            self.flows.remove(key);
        }
        ages.truncate(n);
        ages.into_iter().map(|(_, k)| k).collect()
    }
}

/// Flows per container, for the per-container shares.
#[derive(Debug, Default)]
struct PerContainer(HashMap<IpAddr, usize>);

impl PerContainer {
    fn of(&self, c: IpAddr) -> usize {
        self.0.get(&c).copied().unwrap_or(0)
    }

    fn add(&mut self, c: IpAddr) {
        *self.0.entry(c).or_default() += 1;
    }

    fn remove(&mut self, c: IpAddr) {
        if let std::collections::hash_map::Entry::Occupied(mut e) = self.0.entry(c) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }

    /// The container holding most flows.
    fn heaviest(&self) -> Option<IpAddr> {
        self.0.iter().max_by_key(|(_, n)| **n).map(|(c, _)| *c)
    }

    fn recount<'a>(&mut self, containers: impl Iterator<Item = IpAddr> + 'a) {
        self.0.clear();
        for c in containers {
            self.add(c);
        }
    }
}

/// The UDP flows of one network (see the module docs).
#[derive(Debug)]
pub struct UdpFlows<V> {
    table: Table<UdpKey, V>,
    published: usize,
    /// Outbound flows by container.
    outbound: PerContainer,
    capacity: usize,
}

impl<V> Default for UdpFlows<V> {
    fn default() -> Self {
        Self::with_capacity(MAX_UDP_FLOWS)
    }
}

impl<V> UdpFlows<V> {
    /// A table of at most `capacity` flows, half of them of each kind.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            table: Table::new(UDP_IDLE),
            published: 0,
            outbound: PerContainer::default(),
            capacity,
        }
    }

    /// The flow `key`, marked as used at `now`.
    pub fn touch(&mut self, now: Instant, key: &UdpKey) -> Option<&mut V> {
        self.table.touch(now, key)
    }

    pub fn contains(&self, key: &UdpKey) -> bool {
        self.table.flows.contains_key(key)
    }

    /// Adds a flow (replacing one with the same key), first evicting the longest idle flows of
    /// its kind if that kind has its half of the table (for outbound flows: the container's
    /// own past its quarter of the half, else the heaviest container's). Returns how many were
    /// evicted.
    pub fn insert(&mut self, now: Instant, key: UdpKey, kind: UdpKind, value: V) -> usize {
        if let Some(old) = self.table.flows.remove(&key) {
            self.forget(&key, old.kind);
        }
        let half = (self.capacity / 2).max(1);
        let evicted = match kind {
            UdpKind::Published if self.published >= half => {
                let gone = self.table.evict_oldest(kind, |_| true, (half / 16).max(1));
                self.published -= gone.len();
                gone.len()
            }
            UdpKind::Outbound => {
                let container = key.0.ip();
                let share = (half / 4).max(1);
                let victim = if self.outbound.of(container) >= share {
                    Some((container, (share / 16).max(1)))
                } else if self.of_kind(UdpKind::Outbound) >= half {
                    self.outbound.heaviest().map(|c| (c, (half / 16).max(1)))
                } else {
                    None
                };
                match victim {
                    Some((c, n)) => {
                        let gone = self.table.evict_oldest(kind, |k| k.0.ip() == c, n);
                        for k in &gone {
                            self.outbound.remove(k.0.ip());
                        }
                        gone.len()
                    }
                    None => 0,
                }
            }
            UdpKind::Published => 0,
        };
        match kind {
            UdpKind::Published => self.published += 1,
            UdpKind::Outbound => self.outbound.add(key.0.ip()),
        }
        self.table.insert(now, key, kind, value);
        evicted
    }

    /// Outbound flows of the container at `addr`.
    pub fn outbound_of(&self, addr: IpAddr) -> usize {
        self.outbound.of(addr)
    }

    /// Ends the flows idle for [`UDP_IDLE`], if a sweep is due.
    pub fn sweep(&mut self, now: Instant) {
        if self.table.sweep(now) {
            self.published = self
                .table
                .flows
                .values()
                .filter(|e| e.kind == UdpKind::Published)
                .count();
            self.outbound.recount(
                self.table
                    .flows
                    .iter()
                    .filter(|(_, e)| e.kind == UdpKind::Outbound)
                    .map(|(k, _)| k.0.ip()),
            );
        }
    }

    /// When [`UdpFlows::sweep`] next has something to do.
    pub fn next_sweep(&self) -> Option<Instant> {
        self.table.next_sweep
    }

    pub fn len(&self) -> usize {
        self.table.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.flows.is_empty()
    }

    /// How many flows of `kind` there are.
    pub fn of_kind(&self, kind: UdpKind) -> usize {
        match kind {
            UdpKind::Published => self.published,
            UdpKind::Outbound => self.len() - self.published,
        }
    }

    fn forget(&mut self, key: &UdpKey, kind: UdpKind) {
        match kind {
            UdpKind::Published => self.published -= 1,
            UdpKind::Outbound => self.outbound.remove(key.0.ip()),
        }
    }
}

/// The outbound ping flows of one network.
#[derive(Debug)]
pub struct IcmpFlows<V> {
    table: Table<IcmpKey, V>,
    per_container: PerContainer,
    capacity: usize,
}

impl<V> Default for IcmpFlows<V> {
    fn default() -> Self {
        Self {
            table: Table::new(ICMP_IDLE),
            per_container: PerContainer::default(),
            capacity: MAX_ICMP_FLOWS,
        }
    }
}

impl<V> IcmpFlows<V> {
    /// The flow `key`, marked as used at `now`.
    pub fn touch(&mut self, now: Instant, key: &IcmpKey) -> Option<&mut V> {
        self.table.touch(now, key)
    }

    pub fn contains(&self, key: &IcmpKey) -> bool {
        self.table.flows.contains_key(key)
    }

    /// Whether a new flow of `container` would be refused: the table or the container's share
    /// of it ([`MAX_ICMP_FLOWS_PER_CONTAINER`]) is full.
    pub fn is_full_for(&self, container: IpAddr) -> bool {
        self.table.flows.len() >= self.capacity
            || self.per_container.of(container) >= MAX_ICMP_FLOWS_PER_CONTAINER
    }

    /// Adds a flow; hands the value back if the table, or its container's share, is full.
    pub fn insert(&mut self, now: Instant, key: IcmpKey, value: V) -> Result<(), V> {
        if self.contains(&key) {
            self.table.insert(now, key, UdpKind::Outbound, value);
            return Ok(());
        }
        if self.is_full_for(key.0) {
            return Err(value);
        }
        self.per_container.add(key.0);
        self.table.insert(now, key, UdpKind::Outbound, value);
        Ok(())
    }

    /// Ends the flows idle for [`ICMP_IDLE`], if a sweep is due.
    pub fn sweep(&mut self, now: Instant) {
        if self.table.sweep(now) {
            self.per_container
                .recount(self.table.flows.keys().map(|k| k.0));
        }
    }

    pub fn next_sweep(&self) -> Option<Instant> {
        self.table.next_sweep
    }

    pub fn len(&self) -> usize {
        self.table.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.flows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> UdpKey {
        (
            "10.0.0.2:5000".parse().expect("addr"),
            SocketAddr::new([192, 0, 2, 1].into(), port),
        )
    }

    /// A flow of the container 10.0.0.`c` to 192.0.2.1:`port`.
    fn key_of(c: u8, port: u16) -> UdpKey {
        (
            SocketAddr::new([10, 0, 0, c].into(), 5000),
            SocketAddr::new([192, 0, 2, 1].into(), port),
        )
    }

    #[test]
    fn a_full_half_evicts_its_own_longest_idle_flows_only() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut t: UdpFlows<u16> = UdpFlows::with_capacity(64);
        // 32 outbound flows of four containers (a full half), the first ones idle longest.
        for p in 0..32u16 {
            let k = key_of(2 + (p % 4) as u8, p);
            assert_eq!(t.insert(t0 + s(p.into()), k, UdpKind::Outbound, p), 0);
        }
        // Published flows have their own half: no outbound flow goes for them.
        for p in 1000..1032 {
            assert_eq!(t.insert(t0 + s(40), key(p), UdpKind::Published, p), 0);
        }
        assert_eq!(t.len(), 64);
        // The next outbound flow (a fifth container's) evicts 32 / 16 = 2 flows of the
        // heaviest container (all hold 8: one of them), the two it left idle longest.
        assert_eq!(
            t.insert(t0 + s(60), key_of(9, 99), UdpKind::Outbound, 99),
            2
        );
        assert_eq!(t.of_kind(UdpKind::Outbound), 31);
        let shrunk: Vec<u8> = (2..6)
            .filter(|&c| t.outbound_of([10, 0, 0, c].into()) == 6)
            .collect();
        assert_eq!(shrunk.len(), 1, "one container lost two flows");
        assert_eq!(
            t.of_kind(UdpKind::Published),
            32,
            "the other half untouched"
        );
        // And the same the other way round.
        assert_eq!(t.insert(t0 + s(61), key(2000), UdpKind::Published, 1), 2);
        assert_eq!(t.of_kind(UdpKind::Published), 31);
        assert_eq!(t.of_kind(UdpKind::Outbound), 31);
    }

    #[test]
    fn a_spraying_container_evicts_its_own_flows_never_a_quiet_neighbours() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut t: UdpFlows<u16> = UdpFlows::with_capacity(64);
        // The neighbour's two conversations, idle longest of all.
        t.insert(t0, key_of(2, 1), UdpKind::Outbound, 1);
        t.insert(t0, key_of(2, 2), UdpKind::Outbound, 2);
        // Four containers spray destinations.
        for i in 0..400u16 {
            let c = 10 + (i % 4) as u8;
            t.insert(
                t0 + s(1 + u64::from(i)),
                key_of(c, 100 + i),
                UdpKind::Outbound,
                i,
            );
            assert!(
                t.outbound_of([10, 0, 0, c].into()) <= 32 / 4,
                "a quarter of the half"
            );
            assert!(t.of_kind(UdpKind::Outbound) <= 32);
        }
        assert!(t.contains(&key_of(2, 1)) && t.contains(&key_of(2, 2)));
        assert_eq!(t.outbound_of([10, 0, 0, 2].into()), 2);
    }

    #[test]
    fn idle_flows_are_swept_and_counts_stay_right() {
        let t0 = Instant::now();
        let mut t: UdpFlows<()> = UdpFlows::default();
        assert_eq!(t.next_sweep(), None, "an empty table wants no timer");
        t.insert(t0, key(1), UdpKind::Published, ());
        t.insert(t0, key(2), UdpKind::Outbound, ());
        assert_eq!(t.next_sweep(), Some(t0 + UDP_IDLE));
        t.sweep(t0 + UDP_IDLE - Duration::from_secs(1));
        assert_eq!(t.len(), 2, "not due yet");
        t.touch(t0 + Duration::from_secs(30), &key(2));
        t.sweep(t0 + UDP_IDLE);
        assert!(!t.contains(&key(1)) && t.contains(&key(2)));
        assert_eq!(t.of_kind(UdpKind::Published), 0);
        assert_eq!(t.next_sweep(), Some(t0 + UDP_IDLE + SWEEP_EVERY));
        t.sweep(t0 + Duration::from_secs(200));
        assert!(t.is_empty());
        assert_eq!(t.next_sweep(), None);
        // Replacing a flow keeps the counts.
        t.insert(t0, key(3), UdpKind::Published, ());
        t.insert(t0, key(3), UdpKind::Outbound, ());
        assert_eq!(t.of_kind(UdpKind::Published), 0);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn ping_flows_are_refused_when_full_and_expire() {
        let t0 = Instant::now();
        let k = |id: u16| -> IcmpKey { ([10, 0, 0, 2].into(), id, [192, 0, 2, 1].into()) };
        let mut t: IcmpFlows<u16> = IcmpFlows::default();
        // One container gets its share of the table.
        let share = MAX_ICMP_FLOWS_PER_CONTAINER as u16;
        for id in 0..share {
            assert!(t.insert(t0, k(id), id).is_ok());
        }
        assert!(t.is_full_for([10, 0, 0, 2].into()));
        assert_eq!(t.insert(t0, k(u16::MAX), 1), Err(1));
        assert!(t.insert(t0, k(0), 0).is_ok(), "an existing flow is not new");
        assert!(
            !t.is_full_for([10, 0, 0, 3].into()),
            "a neighbour still pings"
        );
        // Enough containers fill the table.
        let others = (MAX_ICMP_FLOWS / MAX_ICMP_FLOWS_PER_CONTAINER) as u16;
        for c in 1..others {
            let ip = IpAddr::from([10, 1, (c >> 8) as u8, c as u8]);
            for id in 0..share {
                assert!(t.insert(t0, (ip, id, [192, 0, 2, 1].into()), id).is_ok());
            }
        }
        assert!(t.is_full_for([10, 0, 0, 9].into()));
        assert_eq!(t.touch(t0, &k(5)).copied(), Some(5));
        t.sweep(t0 + ICMP_IDLE);
        assert!(t.is_empty());
        assert!(
            !t.is_full_for([10, 0, 0, 2].into()),
            "counts go with the flows"
        );
    }
}
