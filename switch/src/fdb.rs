//! The forwarding database: which port a MAC address was last seen on.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::{MacAddr, PortId};

/// One learned (or pinned) address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdbEntry {
    pub port: PortId,
    pub last_seen: Instant,
    /// Belongs to `port` for good: never aged, moved or evicted (see `Bridge::pin`).
    pub pinned: bool,
}

/// What [`Fdb::learn`] did with a source address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    /// Recorded (or refreshed) on the port.
    Yes,
    /// Not recorded: the table is full.
    Full,
    /// The address is pinned to another port: the frame should not be believed.
    PinnedElsewhere,
}

/// A bounded MAC table with aging.
///
/// Lookups treat an entry older than the aging time as absent, so correctness never waits for a
/// sweep; [`Fdb::expire`] only reclaims the memory. When the table is full, expired entries are
/// reclaimed first and, if none are, the new address is not learned: frames to it are flooded,
/// which is what a hardware switch with a full CAM does, and an attacker sending from random
/// source addresses cannot grow the table or evict live entries. Pinned entries live in the
/// same map (one probe per address either way) and are exempt from all of that.
#[derive(Debug)]
pub struct Fdb {
    entries: HashMap<MacAddr, FdbEntry>,
    capacity: usize,
    aging: Duration,
    /// Earliest time a full table is swept again, so a flood of new sources costs one sweep per
    /// second rather than one per frame.
    next_full_sweep: Option<Instant>,
    /// What happened to learned entries so far.
    pub events: FdbEvents,
}

/// Counts of what happened to learned (not pinned) entries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FdbEvents {
    /// New addresses recorded.
    pub learned: u64,
    /// Known addresses seen on another port than before.
    pub moved: u64,
    /// Entries removed for being older than the aging time.
    pub aged: u64,
}

impl Fdb {
    pub fn new(capacity: usize, aging: Duration) -> Self {
        Self {
            entries: HashMap::with_capacity(capacity.min(1024)),
            capacity,
            aging,
            next_full_sweep: None,
            events: FdbEvents::default(),
        }
    }

    /// Records that `mac` was seen on `port` at `now`. A pinned address is left as it is.
    pub fn learn(&mut self, now: Instant, mac: MacAddr, port: PortId) -> Learned {
        if let Some(entry) = self.entries.get_mut(&mac) {
            if entry.pinned {
                return if entry.port == port {
                    Learned::Yes
                } else {
                    Learned::PinnedElsewhere
                };
            }
            if entry.port != port {
                self.events.moved += 1;
            }
            entry.port = port;
            entry.last_seen = now;
            return Learned::Yes;
        }
        if self.entries.len() >= self.capacity {
            if self.next_full_sweep.is_some_and(|t| now < t) {
                return Learned::Full;
            }
            self.expire(now);
            self.next_full_sweep = Some(now + Duration::from_secs(1));
            if self.entries.len() >= self.capacity {
                return Learned::Full;
            }
        }
        self.entries.insert(
            mac,
            FdbEntry {
                port,
                last_seen: now,
                pinned: false,
            },
        );
        self.events.learned += 1;
        Learned::Yes
    }

    /// Pins `mac` to `port` (see `Bridge::pin`), over any learned entry and the capacity.
    pub fn pin(&mut self, now: Instant, mac: MacAddr, port: PortId) {
        self.entries.insert(
            mac,
            FdbEntry {
                port,
                last_seen: now,
                pinned: true,
            },
        );
    }

    /// Removes `mac` if it is pinned to `port`; returns whether it was.
    pub fn unpin(&mut self, mac: MacAddr, port: PortId) -> bool {
        let pinned_here = self
            .entries
            .get(&mac)
            .is_some_and(|e| e.pinned && e.port == port);
        if pinned_here {
            self.entries.remove(&mac);
        }
        pinned_here
    }

    /// The port `mac` is pinned to, or was last seen on unless that was longer ago than the
    /// aging time.
    pub fn lookup(&self, now: Instant, mac: MacAddr) -> Option<PortId> {
        let entry = self.entries.get(&mac)?;
        self.is_live(now, entry).then_some(entry.port)
    }

    /// Removes learned entries older than the aging time.
    pub fn expire(&mut self, now: Instant) {
        let aging = self.aging;
        let before = self.entries.len();
        self.entries
            .retain(|_, e| e.pinned || now.saturating_duration_since(e.last_seen) < aging);
        self.events.aged += (before - self.entries.len()) as u64;
    }

    /// Removes every learned entry that points at `port` (pins stay: they go with the port,
    /// see [`Fdb::unpin_port`]).
    pub fn flush_port(&mut self, port: PortId) {
        self.entries.retain(|_, e| e.pinned || e.port != port);
    }

    /// Removes the pins of `port`.
    pub fn unpin_port(&mut self, port: PortId) {
        self.entries.retain(|_, e| !(e.pinned && e.port == port));
    }

    /// Live entries with their age at `now` (pinned ones age 0), in no particular order.
    pub fn iter(&self, now: Instant) -> impl Iterator<Item = (MacAddr, PortId, Duration)> + '_ {
        self.entries
            .iter()
            .filter(move |(_, e)| self.is_live(now, e))
            .map(move |(mac, e)| {
                let age = if e.pinned {
                    Duration::ZERO
                } else {
                    now.saturating_duration_since(e.last_seen)
                };
                (*mac, e.port, age)
            })
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
        entry.pinned || now.saturating_duration_since(entry.last_seen) < self.aging
    }
}
