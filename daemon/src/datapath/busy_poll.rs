//! When the datapath thread polls instead of sleeping.

use std::time::{Duration, Instant};

/// Busy-polling after traffic: for `window` after the last event the thread polls epoll
/// without sleeping, so the next frame of a conversation finds it awake. Going to sleep and
/// being woken costs a context switch on each side and, on an idle CPU of a VM, an IPI to a
/// halted vCPU: tens of microseconds per frame that a request/response exchange pays every
/// time. The kernel's `net.core.busy_poll` makes the same trade. An idle network still sleeps.
#[derive(Debug, Clone, Copy)]
pub(super) struct BusyPoll {
    window: Duration,
    last_traffic: Option<Instant>,
}

impl BusyPoll {
    pub(super) fn new(window: Duration) -> Self {
        Self {
            window,
            last_traffic: None,
        }
    }

    /// Whether the thread should poll rather than sleep at `now`.
    pub(super) fn spinning(&self, now: Instant) -> bool {
        !self.window.is_zero()
            && self
                .last_traffic
                .is_some_and(|t| now.saturating_duration_since(t) < self.window)
    }

    pub(super) fn traffic(&mut self, now: Instant) {
        self.last_traffic = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_poll_spins_only_within_its_window_after_traffic() {
        let t0 = Instant::now();
        let us = Duration::from_micros;
        let mut bp = BusyPoll::new(us(50));
        assert!(!bp.spinning(t0), "no traffic yet: sleep");
        bp.traffic(t0);
        assert!(bp.spinning(t0));
        assert!(bp.spinning(t0 + us(49)));
        assert!(!bp.spinning(t0 + us(50)), "window over: sleep");
        bp.traffic(t0 + us(200));
        assert!(bp.spinning(t0 + us(230)), "new traffic opens a new window");
        // A clock that seems to go backwards still counts as inside the window.
        assert!(bp.spinning(t0 + us(100)));

        let mut off = BusyPoll::new(Duration::ZERO);
        off.traffic(t0);
        assert!(!off.spinning(t0), "0 turns it off");
    }
}
