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
            capacity,
            aging,
            next_full_sweep: None,
        }
    }

    /// Records that `mac` was seen on `port` at `now`. Returns false if the table was full.
    pub fn learn(&mut self, now: Instant, mac: MacAddr, port: PortId) -> bool {
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

    /// The port `mac` was last seen on, unless that was longer ago than the aging time.
    pub fn lookup(&self, now: Instant, mac: MacAddr) -> Option<PortId> {
        let entry = self.entries.get(&mac)?;
        self.is_live(now, entry).then_some(entry.port)
    }

    /// Removes entries older than the aging time.
    pub fn expire(&mut self, now: Instant) {
        let aging = self.aging;
        self.entries
            .retain(|_, e| now.saturating_duration_since(e.last_seen) < aging);
    }

    /// Removes every entry that points at `port`.
    pub fn flush_port(&mut self, port: PortId) {
        self.entries.retain(|_, e| e.port != port);
    }

    /// Live entries with their age at `now`, in no particular order.
    pub fn iter(&self, now: Instant) -> impl Iterator<Item = (MacAddr, PortId, Duration)> + '_ {
        self.entries
            .iter()
            .filter(move |(_, e)| self.is_live(now, e))
            .map(move |(mac, e)| (*mac, e.port, now.saturating_duration_since(e.last_seen)))
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
