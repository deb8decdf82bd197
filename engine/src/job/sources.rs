//! A source as the job drives it: polls with retries from the last good
//! position, health for `/readyz`, the watermark told to the workers, and
//! each poll's accepted rows routed to the workers by key group.

use std::time::{Duration, Instant};

use arrow::array::{BooleanArray, Int64Array};

use super::epoch::Archive;
use super::{Job, MAX_POLL_ROWS, PARTITION_REFRESH};
use crate::checkpoint::SourceProgress;
use crate::error::{EngineError, Result, RetryHint};
use crate::ingest::{Accepted, Ingest};
use crate::source::{Poll, Source};
use crate::watermark::{NO_WATERMARK, WatermarkTracker};

pub(super) struct SourceRt {
    pub(super) src: Box<dyn Source>,
    pub(super) name: String,
    /// Rules, clock, the views' stages.
    pub(super) ingest: Ingest,
    pub(super) done: bool,
    /// The views reading it, in the ingest's order.
    pub(super) views: Vec<usize>,
    /// The watermark the workers were last told.
    pub(super) advanced: i64,
    pub(super) last_parts_refresh: Instant,
    pub(super) down: Option<String>,
    /// The position after the last rows a poll returned: where a poll that
    /// failed is retried from, so a retry loses and repeats nothing.
    pub(super) last_good: Vec<u8>,
    /// A poll failed with an error worth retrying: why, when to retry, and
    /// the backoff to double if it fails again.
    pub(super) retry: Option<Retry>,
    /// The source's event archive, and the rows accepted since the last checkpoint.
    pub(super) archive: Option<Archive>,
}

pub(super) struct Retry {
    reason: String,
    at: Instant,
    backoff: Duration,
}

/// The first and the longest wait before polling a failed source again.
const MIN_RETRY_BACKOFF: Duration = Duration::from_millis(100);
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(10);

impl SourceRt {
    /// A failed poll: retried later if the error says a retry can help,
    /// else the job's error.
    pub(super) fn failed(&mut self, e: EngineError) -> Result<()> {
        if e.retry() != RetryHint::Backoff {
            return Err(e);
        }
        let backoff = self
            .retry
            .as_ref()
            .map(|r| (r.backoff * 2).min(MAX_RETRY_BACKOFF))
            .unwrap_or(MIN_RETRY_BACKOFF);
        tracing::warn!(source = %self.name, error = %e, retry_in_ms = backoff.as_millis() as u64, "source failed; retrying");
        metrics::counter!("sluice_source_retries_total", "source" => self.name.clone())
            .increment(1);
        self.retry = Some(Retry {
            reason: e.to_string(),
            at: Instant::now() + backoff,
            backoff,
        });
        Ok(())
    }

    pub(super) fn add_partitions(&mut self, now: Instant) {
        for id in self.src.partitions() {
            self.ingest.clock_mut().add_partition(id, now);
        }
        self.last_parts_refresh = now;
    }

    pub(super) fn clock(&self) -> &WatermarkTracker {
        self.ingest.clock()
    }

    pub(super) fn progress(&self) -> SourceProgress {
        SourceProgress {
            position: self.src.position(),
            watermark: self.clock().get(),
            max_event_time: self.clock().max_event_time(),
            partitions: self.clock().partitions(),
        }
    }
}

impl Job {
    /// Polls source `si`. An error the outside world may fix (a broker, a
    /// file system) is not the end of the job: the source is marked down
    /// (`/readyz`, `sluice_source_up`), retried with doubling backoff from
    /// the position after its last good poll; `None` while it waits.
    pub(super) fn poll_source(&mut self, si: usize) -> Result<Option<Poll>> {
        let max_rows = self.opts.batch_rows.clamp(1, MAX_POLL_ROWS);
        let s = &mut self.sources[si];
        if let Some(r) = &s.retry {
            if Instant::now() < r.at {
                return Ok(None);
            }
            let last_good = s.last_good.clone();
            if let Err(e) = s.src.seek(Some(&last_good)) {
                return s.failed(e).map(|()| None);
            }
        }
        match s.src.poll(max_rows) {
            Ok(p) => {
                if s.retry.take().is_some() {
                    tracing::info!(source = %s.name, "source polls again");
                }
                if matches!(p, Poll::Data { .. }) {
                    s.last_good = s.src.position();
                }
                Ok(Some(p))
            }
            Err(e) => s.failed(e).map(|()| None),
        }
    }

    /// Marks a source down or up again (for `/readyz` and metrics).
    pub(super) fn check_health(&mut self, si: usize) {
        let s = &mut self.sources[si];
        let h = s
            .retry
            .as_ref()
            .map(|r| r.reason.clone())
            .or_else(|| s.src.health());
        if h == s.down {
            return;
        }
        match &h {
            Some(reason) => {
                tracing::warn!(source = %s.name, %reason, "source cannot make progress")
            }
            None => tracing::info!(source = %s.name, "source healthy again"),
        }
        metrics::gauge!("sluice_source_up", "source" => s.name.clone()).set(if h.is_some() {
            0.0
        } else {
            1.0
        });
        if let Ok(mut m) = self.live.unready.lock() {
            match &h {
                Some(r) => m.insert(s.name.clone(), r.clone()),
                None => m.remove(&s.name),
            };
        }
        s.down = h;
    }

    /// Lets idle partitions stop holding the watermark back, and picks up
    /// new partitions.
    pub(super) fn refresh_watermark(&mut self, si: usize) -> Result<()> {
        let now = Instant::now();
        let s = &mut self.sources[si];
        if now.saturating_duration_since(s.last_parts_refresh) >= PARTITION_REFRESH {
            s.add_partitions(now);
        }
        if s.ingest.clock_mut().refresh(now).is_none() {
            return Ok(());
        }
        self.advance(si)
    }

    /// Tells the workers the source's watermark, when it moved.
    pub(super) fn advance(&mut self, si: usize) -> Result<()> {
        let s = &mut self.sources[si];
        let wm = s.clock().watermark();
        if wm == NO_WATERMARK || wm <= s.advanced {
            return Ok(());
        }
        s.advanced = wm;
        metrics::gauge!("sluice_watermark_ms", "source" => s.name.clone()).set(wm as f64);
        self.workers.advance(&s.views, wm)
    }

    /// A poll's accepted rows: into the archive, each view's rows to the
    /// workers that own their key groups, then the watermark.
    pub(super) fn on_accepted(&mut self, si: usize, acc: Accepted) -> Result<()> {
        let n = acc.rows.len();
        self.stats.events += n as u64;
        let s = &mut self.sources[si];
        if let Some(a) = s.archive.as_mut() {
            let origins = acc.positions.iter().map(|p| s.src.row_origin(*p)).collect();
            let wm = acc
                .rows
                .wm
                .clone()
                .unwrap_or_else(|| Int64Array::from(vec![NO_WATERMARK; n]));
            a.rows.push((acc.rows.batch.clone(), origins, wm));
        }
        let workers = self.workers.len();
        for (k, rows) in acc.views.into_iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let s = &self.sources[si];
            let view = s.views[k];
            if workers == 1 {
                self.workers.rows(0, view, rows)?;
                continue;
            }
            let owners: Vec<usize> = s.ingest.views()[k]
                .key_groups(&rows)?
                .into_iter()
                .map(|g| self.workers.owner(g))
                .collect();
            for w in 0..workers {
                let mask: BooleanArray = owners.iter().map(|o| Some(*o == w)).collect();
                if mask.true_count() == 0 {
                    continue;
                }
                let part = if mask.true_count() == rows.len() {
                    rows.clone()
                } else {
                    rows.filter(&mask)?
                };
                self.workers.rows(w, view, part)?;
            }
        }
        self.advance(si)
    }
}
