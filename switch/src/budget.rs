//! How many packets a port may have replicated to other hosts: head-end replication turns one
//! broadcast into a packet per host, so a container that floods at line rate would multiply
//! its traffic onto the underlay by the number of hosts. Each port gets its own token bucket,
//! counted in packets sent, so one port that spends its budget leaves everybody else's ARP and
//! neighbour discovery alone.

use std::time::Instant;

/// Replicated packets a port may send per second, and at once.
#[derive(Debug, Clone, Copy)]
pub struct BudgetConfig {
    pub per_second: u32,
    pub burst: u32,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            per_second: 20_000,
            burst: 4_000,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Per-port token buckets, indexed by port number.
#[derive(Debug, Default)]
pub struct FloodBudget {
    config: BudgetConfig,
    ports: Vec<Option<Bucket>>,
    /// Frames refused for want of budget.
    pub refused: u64,
}

impl FloodBudget {
    pub fn new(config: BudgetConfig) -> Self {
        Self {
            config,
            ports: Vec::new(),
            refused: 0,
        }
    }

    /// Takes `packets` from `port`'s budget; false (and nothing taken) if it has not that many.
    pub fn take(&mut self, now: Instant, port: usize, packets: usize) -> bool {
        if self.ports.len() <= port {
            self.ports.resize(port + 1, None);
        }
        let burst = f64::from(self.config.burst);
        let b = self.ports[port].get_or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * f64::from(self.config.per_second)).min(burst);
        b.at = now;
        let want = packets as f64;
        // A full bucket lets anything go (into debt): a flood to more hosts than the burst
        // still leaves, as rarely as the rate allows.
        if b.tokens < want && b.tokens < burst {
            self.refused += 1;
            return false;
        }
        b.tokens -= want;
        true
    }

    /// Forgets a port (its number may be reused by a new one, which starts with a full bucket).
    pub fn forget(&mut self, port: usize) {
        if let Some(b) = self.ports.get_mut(port) {
            *b = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_port_that_spends_its_budget_waits_and_others_do_not() {
        let t0 = Instant::now();
        let mut b = FloodBudget::new(BudgetConfig {
            per_second: 1000,
            burst: 100,
        });
        // 100 at once, then nothing until time passes.
        for _ in 0..25 {
            assert!(b.take(t0, 3, 4));
        }
        assert!(!b.take(t0, 3, 1));
        assert_eq!(b.refused, 1);
        // Another port has its own bucket.
        assert!(b.take(t0, 1, 100));
        // 10 ms refill 10 packets, never more than the burst.
        assert!(b.take(t0 + Duration::from_millis(10), 3, 10));
        assert!(!b.take(t0 + Duration::from_millis(10), 3, 1));
        assert!(b.take(t0 + Duration::from_secs(60), 3, 100));
        assert!(!b.take(t0 + Duration::from_secs(60), 3, 1));
        // More than the burst goes from a full bucket, and then nothing until the debt is paid.
        assert!(b.take(t0 + Duration::from_secs(120), 5, 150));
        assert!(!b.take(
            t0 + Duration::from_secs(120) + Duration::from_millis(20),
            5,
            1
        ));
        assert!(b.take(
            t0 + Duration::from_secs(120) + Duration::from_millis(52),
            5,
            1
        ));
        // A forgotten port starts again full.
        b.forget(3);
        assert!(b.take(t0 + Duration::from_secs(60), 3, 100));
    }
}
