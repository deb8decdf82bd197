//! A running job's state as its readers see it: the store, each view's
//! committed watermark and metadata, readiness and freshness, the vector
//! indexes and tile readers, the served-value logs and the version rules.
//! The job publishes into it at every checkpoint; the server only reads.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use crate::online::ViewMeta;
use crate::store::Store;
use crate::tiles::TileReader;
use crate::time::fmt_ts;
use crate::vector::VectorIndex;
use crate::watermark::NO_WATERMARK;

/// State shared with the serving API.
#[derive(Debug)]
pub struct Live {
    /// The state database.
    pub store: Arc<Store>,
    /// Committed watermark per view (ms; `NO_WATERMARK` before any).
    pub watermarks: HashMap<String, AtomicI64>,
    /// Per-view reader metadata.
    pub views: HashMap<String, ViewMeta>,
    /// Recovery finished; the job is running or done.
    pub ready: AtomicBool,
    /// Sources that cannot make progress now, with the reason.
    pub unready: Mutex<BTreeMap<String, String>>,
    /// Nearest-neighbour indexes by view.
    pub indexes: HashMap<String, Arc<VectorIndex>>,
    /// Readers of the tiled (windowed, online) views.
    pub readers: HashMap<String, Arc<TileReader>>,
    /// What `/metrics` and `/readyz` say about how fresh the views are.
    pub freshness: Freshness,
    /// The served-value logs of the views with `log_served`.
    pub served: HashMap<String, Arc<crate::served::ServedLog>>,
    /// Per base name with more than one version (or none named so), its
    /// versions, newest first: what an unversioned read chooses from.
    pub versions: HashMap<String, Vec<(u32, String)>>,
    /// Views added to an existing state dir: the watermark at which they
    /// have seen a whole window (`i64::MAX`: lifetime and per-event views,
    /// which never do without a backfill).
    pub catch_up: HashMap<String, i64>,
}

/// What differs between the view a state dir was written by and the view
/// now (see [`sluice_sql::view_difference`]).
pub fn view_change(old: &crate::online::ViewMeta, new: &crate::online::ViewMeta) -> String {
    sluice_sql::view_difference(
        (&old.keys, &old.window, &old.query),
        (&new.keys, &new.window, &new.query),
    )
}

/// How fresh each view is: the newest event time its source delivered, the
/// committed watermark (in [`Live::watermarks`]), the views' freshness SLOs
/// and when the last checkpoint committed.
#[derive(Debug, Default)]
pub struct Freshness {
    /// `freshness_slo` (ms) of the views that set it.
    pub slo_ms: HashMap<String, i64>,
    /// Newest event time (ms) of each view's source at the last checkpoint;
    /// `NO_WATERMARK` before any.
    pub newest: HashMap<String, AtomicI64>,
    /// Wall clock (ms since the epoch) of the last committed checkpoint; 0 before any.
    pub last_checkpoint_ms: AtomicI64,
}

/// One view's freshness at a wall-clock time.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewFreshness {
    /// The view.
    pub view: String,
    /// Newest event time processed (ms).
    pub newest_event_ms: Option<i64>,
    /// Committed watermark (ms).
    pub watermark_ms: Option<i64>,
    /// Wall clock minus the watermark (ms).
    pub lag_ms: Option<i64>,
    /// Its `freshness_slo` (ms).
    pub slo_ms: Option<i64>,
    /// Within its SLO (`None`: the view has none). A view without a
    /// watermark yet is not fresh.
    pub fresh: Option<bool>,
}

/// Milliseconds since the Unix epoch, by the wall clock.
pub fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Live {
    /// Why the job is not ready, or `None` when it is.
    pub fn not_ready(&self) -> Option<String> {
        if !self.ready.load(Ordering::Acquire) {
            return Some("recovering".into());
        }
        let mut why: Vec<String> = match self.unready.lock() {
            Ok(down) => down
                .iter()
                .map(|(s, r)| format!("source {s}: {r}"))
                .collect(),
            Err(_) => Vec::new(),
        };
        for f in self.freshness_at(wall_ms()) {
            if f.fresh != Some(false) {
                continue;
            }
            let slo = sluice_sql::fmt_ms(f.slo_ms.unwrap_or(0));
            why.push(match (f.watermark_ms, f.lag_ms) {
                (Some(w), Some(lag)) => format!(
                    "view {}: not fresh: its watermark {} is {} behind the wall clock (freshness_slo {slo})",
                    f.view,
                    fmt_ts(w).as_str().unwrap_or("?"),
                    format_args!("{:.1}s", lag as f64 / 1000.0)
                ),
                _ => format!(
                    "view {}: not fresh: no watermark yet (freshness_slo {slo})",
                    f.view
                ),
            });
        }
        if why.is_empty() {
            None
        } else {
            Some(why.join("; "))
        }
    }

    /// Every view's freshness at wall-clock time `now_ms`, by view name.
    pub fn freshness_at(&self, now_ms: i64) -> Vec<ViewFreshness> {
        let mut out: Vec<ViewFreshness> = self
            .watermarks
            .keys()
            .map(|v| {
                let watermark_ms = self.watermark(v);
                let newest_event_ms = self
                    .freshness
                    .newest
                    .get(v)
                    .map(|t| t.load(Ordering::Acquire))
                    .filter(|t| *t != NO_WATERMARK);
                let lag_ms = watermark_ms.map(|w| now_ms.saturating_sub(w));
                let slo_ms = self.freshness.slo_ms.get(v).copied();
                let fresh = slo_ms.map(|slo| lag_ms.is_some_and(|l| l <= slo));
                ViewFreshness {
                    view: v.clone(),
                    newest_event_ms,
                    watermark_ms,
                    lag_ms,
                    slo_ms,
                    fresh,
                }
            })
            .collect();
        out.sort_by(|a, b| a.view.cmp(&b.view));
        out
    }

    /// Sets the freshness gauges (called when `/metrics` is scraped, so they
    /// move while a stream stalls).
    pub fn record_freshness(&self) {
        let now = wall_ms();
        for f in self.freshness_at(now) {
            if let Some(t) = f.newest_event_ms {
                metrics::gauge!("sluice_view_newest_event_ms", "view" => f.view.clone())
                    .set(t as f64);
            }
            if let Some(w) = f.watermark_ms {
                metrics::gauge!("sluice_view_watermark_ms", "view" => f.view.clone()).set(w as f64);
            }
            if let Some(l) = f.lag_ms {
                metrics::gauge!("sluice_view_event_lag_seconds", "view" => f.view.clone())
                    .set(l as f64 / 1000.0);
            }
            if let Some(ok) = f.fresh {
                metrics::gauge!("sluice_view_fresh", "view" => f.view.clone()).set(if ok {
                    1.0
                } else {
                    0.0
                });
            }
        }
        let last = self.freshness.last_checkpoint_ms.load(Ordering::Acquire);
        if last > 0 {
            metrics::gauge!("sluice_checkpoint_age_seconds")
                .set(now.saturating_sub(last) as f64 / 1000.0);
        }
    }

    /// The committed watermark of `view`, if it has one.
    pub fn watermark(&self, view: &str) -> Option<i64> {
        self.watermarks
            .get(view)
            .map(|w| w.load(Ordering::Acquire))
            .filter(|w| *w != NO_WATERMARK)
    }
}

impl crate::reader::Features for Live {
    fn resolve(&self, name: &str) -> String {
        crate::reader::resolve(
            name,
            &self.versions,
            |v| self.views.contains_key(v),
            |v| self.watermark(v),
            |v| self.catch_up.get(v).copied(),
        )
    }

    fn meta(&self, view: &str) -> Option<&ViewMeta> {
        self.views.get(view)
    }

    fn view_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.views.keys().cloned().collect();
        v.sort();
        v
    }

    fn read(
        &self,
        view: &str,
        key: &str,
        mode: Option<crate::tiles::ReadMode>,
    ) -> crate::error::Result<(Option<serde_json::Value>, Option<i64>)> {
        let meta = self.views.get(view).ok_or_else(|| {
            crate::error::EngineError::BadRequest(format!("no feature view `{view}`"))
        })?;
        crate::online::read_feature_aged(
            &self.store,
            meta,
            self.readers.get(view).map(|r| r.as_ref()),
            key,
            self.watermark(view),
            mode,
        )
    }
}
