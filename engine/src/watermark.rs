//! The watermark of a source: the rule `sluice run` and `sluice backfill`
//! both apply, row by row.
//!
//! Each partition's watermark input is the largest event time it has given.
//! The source's watermark is the minimum of those over the partitions that
//! are not idle, less the source's watermark delay, and it never goes back.
//! A partition that has given no row yet holds it (there is no watermark
//! until every live partition has data); one silent for `idle_timeout`
//! stops holding it. A backfill reads one ordered stream: one partition,
//! no idleness.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// No watermark yet.
pub const NO_WATERMARK: i64 = i64::MIN;

#[derive(Debug, Clone)]
struct Partition {
    id: u32,
    /// Largest event time seen in the partition.
    max: Option<i64>,
    /// When it last gave a row (or was first assigned).
    seen: Instant,
}

/// Tracks one source's watermark.
#[derive(Debug, Clone)]
pub struct WatermarkTracker {
    delay: i64,
    idle: Option<Duration>,
    wm: i64,
    max: Option<i64>,
    parts: Vec<Partition>,
}

impl WatermarkTracker {
    /// A tracker for a source with this watermark delay (ms) and idle timeout.
    pub fn new(delay_ms: i64, idle: Option<Duration>) -> Self {
        WatermarkTracker {
            delay: delay_ms,
            idle,
            wm: NO_WATERMARK,
            max: None,
            parts: Vec::new(),
        }
    }

    /// Restores what a checkpoint recorded.
    pub fn restore(
        &mut self,
        watermark: Option<i64>,
        max: Option<i64>,
        partitions: &BTreeMap<u32, i64>,
        now: Instant,
    ) {
        self.wm = watermark.unwrap_or(NO_WATERMARK);
        self.max = max;
        self.parts = partitions
            .iter()
            .map(|(id, m)| Partition {
                id: *id,
                max: Some(*m),
                seen: now,
            })
            .collect();
    }

    /// The watermark (ms), [`NO_WATERMARK`] before there is one.
    pub fn watermark(&self) -> i64 {
        self.wm
    }

    /// The watermark, `None` before there is one.
    pub fn get(&self) -> Option<i64> {
        (self.wm != NO_WATERMARK).then_some(self.wm)
    }

    /// The largest event time seen over all partitions.
    pub fn max_event_time(&self) -> Option<i64> {
        self.max
    }

    /// Largest event time per partition that has given rows.
    pub fn partitions(&self) -> BTreeMap<u32, i64> {
        self.parts
            .iter()
            .filter_map(|p| p.max.map(|m| (p.id, m)))
            .collect()
    }

    /// Makes a partition known (it holds the watermark until it gives rows
    /// or goes idle).
    pub fn add_partition(&mut self, id: u32, now: Instant) {
        self.index(id, now);
    }

    fn index(&mut self, id: u32, now: Instant) -> usize {
        match self.parts.iter().position(|p| p.id == id) {
            Some(i) => i,
            None => {
                self.parts.push(Partition {
                    id,
                    max: None,
                    seen: now,
                });
                self.parts.len() - 1
            }
        }
    }

    /// The watermark the partitions allow: `None` while a live partition
    /// has no data yet, or when every partition is idle.
    fn candidate(&self, now: Instant) -> Option<i64> {
        let mut min: Option<i64> = None;
        for p in &self.parts {
            if self
                .idle
                .is_some_and(|d| now.saturating_duration_since(p.seen) >= d)
            {
                continue;
            }
            let m = p.max?;
            min = Some(min.map_or(m, |x| x.min(m)));
        }
        min.map(|m| m.saturating_sub(self.delay))
    }

    /// Observes rows in arrival order (event times `ts`, the partition of
    /// each; none: partition 0) and returns the watermark each row arrived
    /// at (before it was seen), which the late rule judges it by.
    pub fn observe(&mut self, ts: &[i64], partitions: &[u32], now: Instant) -> Vec<i64> {
        let mut before = Vec::with_capacity(ts.len());
        let mut pid = u32::MAX;
        let mut pi = 0usize;
        let mut max = self.max.unwrap_or(i64::MIN);
        for (r, t) in ts.iter().enumerate() {
            let id = partitions.get(r).copied().unwrap_or(0);
            if id != pid {
                pid = id;
                pi = self.index(id, now);
                self.parts[pi].seen = now;
            }
            before.push(self.wm);
            max = max.max(*t);
            if self.parts[pi].max.is_none_or(|m| *t > m) {
                self.parts[pi].max = Some(*t);
                if let Some(c) = self.candidate(now) {
                    self.wm = self.wm.max(c);
                }
            }
        }
        if !ts.is_empty() {
            self.max = Some(max);
        }
        before
    }

    /// Lets idle partitions stop holding the watermark back; returns the
    /// new watermark when it moved.
    pub fn refresh(&mut self, now: Instant) -> Option<i64> {
        self.idle?;
        let c = self.candidate(now)?;
        if c <= self.wm {
            return None;
        }
        self.wm = c;
        Some(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_partition_is_the_largest_time_less_the_delay() {
        let mut w = WatermarkTracker::new(10, None);
        let now = Instant::now();
        let before = w.observe(&[100, 90, 130, 120], &[], now);
        assert_eq!(before, vec![NO_WATERMARK, 90, 90, 120]);
        assert_eq!(w.get(), Some(120));
        assert_eq!(w.max_event_time(), Some(130));
    }

    #[test]
    fn the_slowest_live_partition_holds_it() {
        let mut w = WatermarkTracker::new(0, Some(Duration::from_millis(50)));
        let t0 = Instant::now();
        w.add_partition(1, t0);
        w.observe(&[100, 200], &[0, 0], t0);
        assert_eq!(w.get(), None, "partition 1 has no data");
        w.observe(&[50], &[1], t0);
        assert_eq!(w.get(), Some(50));
        w.observe(&[210], &[0], t0 + Duration::from_millis(30));
        assert_eq!(w.get(), Some(50));
        // Partition 1 idle: partition 0 alone decides.
        assert_eq!(w.refresh(t0 + Duration::from_millis(60)), Some(210));
    }
}
