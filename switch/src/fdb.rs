//! The forwarding database: which port a MAC address was last seen on.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::{MacAddr, PortId};

/// One learned address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdbEntry {
    pub port: PortId,
    pub last_seen: Instant,
}

/// A bounded MAC table with aging.
///
/// Lookups treat an entry older than the aging time as absent, so correctness never waits for a
/// sweep; [`Fdb::expire`] only reclaims the memory. When the table is full, expired entries are
/// reclaimed first and, if none are, the new address is not learned: frames to it are flooded,
/// which is what a hardware switch with a full CAM does, and an attacker sending from random
/// source addresses cannot grow the table or evict live entries.
#[derive(Debug)]
pub struct Fdb {
    entries: HashMap<MacAddr, FdbEntry>,
    /// Addresses that belong to one port for good: never aged, moved or evicted.
    pinned: HashMap<MacAddr, PortId>,
    capacity: usize,
    aging: Duration,
    /// Earliest time a full table is swept again, so a flood of new sources costs one sweep per
    /// second rather than one per frame.
    next_full_sweep: Option<Instant>,
}

impl Fdb {
    pub fn new(capacity: usize, aging: Duration) -> Self {
        Self {
            entries: HashMap::with_capacity(capacity.min(1024)),
            pinned: HashMap::new(),
            capacity,
            aging,
            next_full_sweep: None,
        }
    }

    /// Records that `mac` was seen on `port` at `now`. Returns false if the table was full. A
    /// pinned address is left as it is (true on its own port, false elsewhere).
    pub fn learn(&mut self, now: Instant, mac: MacAddr, port: PortId) -> bool {
        if let Some(&pinned) = self.pinned.get(&mac) {
            return pinned == port;
        }
        if let Some(entry) = self.entries.get_mut(&mac) {
            entry.port = port;
            entry.last_seen = now;
            return true;
        }
        if self.entries.len() >= self.capacity {
            if self.next_full_sweep.is_some_and(|t| now < t) {
                return false;
            }
            self.expire(now);
            self.next_full_sweep = Some(now + Duration::from_secs(1));
            if self.entries.len() >= self.capacity {
                return false;
            }
        }
        self.entries.insert(
            mac,
            FdbEntry {
                port,
                last_seen: now,
            },
        );
        true
    }

    /// Pins `mac` to `port` (see `Bridge::pin`).
    pub fn pin(&mut self, mac: MacAddr, port: PortId) {
        self.entries.remove(&mac);
        self.pinned.insert(mac, port);
    }

    /// The port `mac` is pinned to, if it is.
    pub fn pinned(&self, mac: MacAddr) -> Option<PortId> {
        self.pinned.get(&mac).copied()
    }

    /// The port `mac` is pinned to, or was last seen on unless that was longer ago than the
    /// aging time.
    pub fn lookup(&self, now: Instant, mac: MacAddr) -> Option<PortId> {
        if let Some(&port) = self.pinned.get(&mac) {
            return Some(port);
        }
        let entry = self.entries.get(&mac)?;
        self.is_live(now, entry).then_some(entry.port)
    }

    /// Removes entries older than the aging time.
    pub fn expire(&mut self, now: Instant) {
        let aging = self.aging;
        self.entries
            .retain(|_, e| now.saturating_duration_since(e.last_seen) < aging);
    }

    /// Removes every learned entry that points at `port` (pins stay: they go with the port,
    /// see [`Fdb::unpin_port`]).
    pub fn flush_port(&mut self, port: PortId) {
        self.entries.retain(|_, e| e.port != port);
    }

    /// Removes the pins of `port`.
    pub fn unpin_port(&mut self, port: PortId) {
        self.pinned.retain(|_, p| *p != port);
    }

    /// Live entries with their age at `now` (pinned ones age 0), in no particular order.
    pub fn iter(&self, now: Instant) -> impl Iterator<Item = (MacAddr, PortId, Duration)> + '_ {
        let pinned = self
            .pinned
            .iter()
            .map(|(mac, port)| (*mac, *port, Duration::ZERO));
        self.entries
            .iter()
            .filter(move |(_, e)| self.is_live(now, e))
            .map(move |(mac, e)| (*mac, e.port, now.saturating_duration_since(e.last_seen)))
            .chain(pinned)
    }

    /// Number of stored entries (expired ones included until the next sweep).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn is_live(&self, now: Instant, entry: &FdbEntry) -> bool {
        now.saturating_duration_since(entry.last_seen) < self.aging
    }
}
