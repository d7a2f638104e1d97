//! "How far is it": progress lines for long operations a person waits for, such as a restart
//! that plumbs hundreds of endpoints again. A line at the start, then one per tenth of the
//! work or every two seconds, whichever comes first, then one at the end.

use std::time::{Duration, Instant};

/// Seconds between two lines at most, when the work is slow.
const EVERY: Duration = Duration::from_secs(2);

pub struct Progress {
    what: &'static str,
    total: usize,
    done: usize,
    failed: usize,
    began: Instant,
    said: Instant,
    said_done: usize,
}

impl Progress {
    /// Starts counting `total` items of `what` ("endpoints restored").
    pub fn new(what: &'static str, total: usize, now: Instant) -> Self {
        Self {
            what,
            total,
            done: 0,
            failed: 0,
            began: now,
            said: now,
            said_done: 0,
        }
    }

    /// One item is through (`ok` or not); the line to log, if one is due.
    pub fn step(&mut self, ok: bool, now: Instant) -> Option<String> {
        self.done += 1;
        self.failed += usize::from(!ok);
        let tenth = self.total.div_ceil(10).max(1);
        let due = self.done == self.total
            || self.done - self.said_done >= tenth
            || now.saturating_duration_since(self.said) >= EVERY;
        if !due {
            return None;
        }
        self.said = now;
        self.said_done = self.done;
        let took = now.saturating_duration_since(self.began).as_secs_f64();
        Some(format!(
            "{} of {} {} ({} failed) in {took:.1} s",
            self.done, self.total, self.what, self.failed
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_come_per_tenth_per_two_seconds_and_at_the_end() {
        let t0 = Instant::now();
        let mut p = Progress::new("endpoints restored", 100, t0);
        let lines: Vec<String> = (0..100)
            .filter_map(|i| p.step(i != 5, t0 + Duration::from_millis(i)))
            .collect();
        assert_eq!(lines.len(), 10, "{lines:?}");
        assert!(
            lines[0].starts_with("10 of 100 endpoints restored (1 failed)"),
            "{}",
            lines[0]
        );
        assert!(lines[9].starts_with("100 of 100"), "{}", lines[9]);
        // Slow work: a line every two seconds even within a tenth.
        let mut slow = Progress::new("endpoints restored", 1000, t0);
        assert!(slow.step(true, t0 + Duration::from_millis(10)).is_none());
        assert!(slow.step(true, t0 + Duration::from_secs(3)).is_some());
        // A single item says so once.
        let mut one = Progress::new("endpoints restored", 1, t0);
        assert!(one.step(true, t0).is_some());
    }
}
