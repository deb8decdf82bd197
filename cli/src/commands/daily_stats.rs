//! Daily feature statistics (`stats = 'daily'`): once the watermark has
//! passed the end of a UTC day, the view's lake folder of that day is
//! complete, and it is described by the same DataFusion queries as
//! `sluice stats` (measured against `stats_reference` when there is one).
//! Each day's report goes to `{lake}/_stats/{view}/date=D/stats.json` and
//! the newest day's figures to `/metrics`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use sluice_connectors::stats::{
    FeatureKind, ReferenceProfile, StatsInput, StatsRequest, feature_stats_against,
    reference_profile,
};
use sluice_connectors::{day_start_ms, rfc3339_ms};
use sluice_engine::live::Live;
use sluice_sql::{PipelinePlan, StatsReference, ViewPlan};

use crate::commands::stats::{lake_input, report_json};

/// The lake's folder of daily statistics (no view can take the name).
pub const STATS_DIR: &str = "_stats";
const DAY_MS: i64 = 86_400_000;

/// Where the statistics of `view`'s day `day` (`YYYY-MM-DD`) go.
pub fn stats_file(lake_root: &Path, view: &str, day: &str) -> PathBuf {
    lake_root
        .join(STATS_DIR)
        .join(view)
        .join(format!("date={day}"))
        .join("stats.json")
}

/// One view with daily statistics, and the days it has described.
pub struct DailyView {
    plan: ViewPlan,
    root: PathBuf,
    reference: Option<StatsInput>,
    /// The reference, profiled once it can no longer change (a file, or a
    /// range of the lake that ends at or before the clock).
    profile: Option<ReferenceProfile>,
    /// Days that failed in this process (not tried again until a restart).
    failed: HashSet<String>,
    /// The newest day described so far (its figures are the ones in `/metrics`).
    newest: Option<i64>,
}

impl DailyView {
    /// The views of `p` with `stats = 'daily'`; a reference that does not
    /// parse is an error here, before the job starts.
    pub fn all(p: &PipelinePlan) -> anyhow::Result<Vec<DailyView>> {
        let mut out = Vec::new();
        for v in p.views.iter().filter(|v| v.stats_daily) {
            let Some(root) = &v.offline else { continue };
            let reference = match &v.stats_reference {
                None => None,
                Some(StatsReference::File(f)) => Some(StatsInput::File(f.clone())),
                Some(StatsReference::Range { from, to }) => Some(
                    lake_input(p, &v.name, Some(from), Some(to))
                        .with_context(|| format!("view `{}`: stats_reference", v.name))?,
                ),
            };
            out.push(DailyView {
                plan: v.clone(),
                root: root.clone(),
                reference,
                profile: None,
                failed: HashSet::new(),
                newest: None,
            });
        }
        Ok(out)
    }

    /// The view's name.
    pub fn name(&self) -> &str {
        &self.plan.name
    }

    /// Describes each day of the lake that ends at or before `clock` and
    /// has no statistics yet (every such day when `again`); returns the
    /// days described.
    pub fn describe_through(&mut self, clock: i64, again: bool) -> Vec<String> {
        let mut days: Vec<(i64, String)> = lake_days(&self.root.join(&self.plan.name))
            .into_iter()
            .filter(|(start, _)| start.saturating_add(DAY_MS) <= clock)
            .filter(|(_, d)| {
                !self.failed.contains(d)
                    && (again || !stats_file(&self.root, &self.plan.name, d).exists())
            })
            .collect();
        days.sort();
        let mut done = Vec::new();
        for (start, day) in days {
            match self.describe_day(start, &day, clock) {
                Ok(()) => done.push(day),
                Err(e) => {
                    tracing::error!(view = %self.plan.name, day = %day, "daily statistics: {e:#}");
                    metrics::counter!("sluice_stats_errors_total", "view" => self.plan.name.clone())
                        .increment(1);
                    self.failed.insert(day);
                }
            }
        }
        done
    }

    fn describe_day(&mut self, start: i64, day: &str, clock: i64) -> anyhow::Result<()> {
        let view = &self.plan.name;
        let req = StatsRequest {
            features: Vec::new(),
            input: StatsInput::Lake {
                dir: self.root.join(view),
                from: Some(start),
                to: Some(start + DAY_MS),
            },
            by_day: false,
            reference: None,
            // One worker: the stream keeps the other cores.
            threads: 1,
        };
        let fresh;
        let profile = match (&self.reference, &self.profile) {
            (None, _) => None,
            (Some(_), Some(p)) => Some(p),
            (Some(r), None) => {
                let p = reference_profile(&self.plan, &[], r, 1)?;
                let fixed = match r {
                    StatsInput::File(_) => true,
                    StatsInput::Lake { to, .. } => to.is_some_and(|t| t <= clock),
                };
                if fixed {
                    Some(&*self.profile.insert(p))
                } else {
                    fresh = p;
                    Some(&fresh)
                }
            }
        };
        let report = feature_stats_against(&self.plan, &req, profile)?;
        let mut j = report_json(&report);
        j["day"] = json!(day);
        j["watermark"] = json!(rfc3339_ms(clock));
        j["described_at"] = json!(rfc3339_ms(chrono::Utc::now().timestamp_millis()));
        let path = stats_file(&self.root, view, day);
        let dir = path.parent().context("stats file has a folder")?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = dir.join(format!(".stats-{}.json.tmp", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec_pretty(&j)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
        metrics::counter!("sluice_stats_days_total", "view" => view.clone()).increment(1);
        if self.newest.is_some_and(|n| n > start) {
            return Ok(());
        }
        self.newest = Some(start);
        metrics::gauge!("sluice_stats_day_ms", "view" => view.clone()).set(start as f64);
        let (Some(g), drift) = (report.groups.first(), report.drift.first()) else {
            return Ok(());
        };
        metrics::gauge!("sluice_stats_rows", "view" => view.clone()).set(g.rows as f64);
        for (k, f) in g.features.iter().enumerate() {
            let labels = [("view", view.clone()), ("feature", f.name.clone())];
            metrics::gauge!("sluice_feature_null_rate", &labels).set(f.null_rate());
            if f.kind == FeatureKind::Numeric
                && let Some(m) = f.mean
            {
                metrics::gauge!("sluice_feature_mean", &labels).set(m);
            }
            if let Some(p) = drift.and_then(|d| d.get(k)).and_then(|d| d.psi) {
                metrics::gauge!("sluice_feature_psi", &labels).set(p);
            }
        }
        tracing::info!(view = %view, day = %day, rows = g.rows, "daily statistics written to {}", path.display());
        Ok(())
    }
}

/// Statistics are background work: on Linux the thread (and the
/// DataFusion workers it starts, which inherit its policy) runs under
/// `SCHED_IDLE`. It gets a core only when no other thread wants one, and a
/// thread of the stream or the server that wakes takes the core from it at
/// once. At nice 19 the same work slowed the stream more in
/// `sluice-bench quality` (see docs/benchmarks.md).
fn background_priority() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a valid `sched_param` for the whole call, and
        // pid 0 names the calling thread; nothing else is touched.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
        if rc != 0 {
            tracing::debug!(
                "daily statistics at normal priority: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// The `date=` folders of a view's lake, with each day's start (ms).
fn lake_days(dir: &Path) -> Vec<(i64, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let day = name.strip_prefix("date=")?.to_string();
            Some((day_start_ms(&day)?, day))
        })
        .collect()
}

/// The thread of `sluice run` that describes each day once the view's
/// committed watermark has passed it.
pub struct DailyStats {
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DailyStats {
    /// Starts the thread for the views of `p` with `stats = 'daily'`
    /// (none: no thread). Days complete before the start that have no
    /// statistics yet are described first.
    pub fn start(p: &PipelinePlan, live: &Arc<Live>) -> anyhow::Result<Self> {
        let done = Arc::new(AtomicBool::new(false));
        let mut views = DailyView::all(p)?;
        if views.is_empty() {
            return Ok(DailyStats { done, thread: None });
        }
        let (flag, live) = (Arc::clone(&done), Arc::clone(live));
        let thread = std::thread::Builder::new()
            .name("daily-stats".into())
            .spawn(move || {
                background_priority();
                loop {
                    let last = flag.load(Ordering::SeqCst);
                    for v in &mut views {
                        if let Some(wm) = live.watermark(v.name()) {
                            v.describe_through(wm, false);
                        }
                    }
                    if last {
                        return;
                    }
                    // Wake often enough to stop quickly, look at the lake every 2 s.
                    for _ in 0..20 {
                        if flag.load(Ordering::SeqCst) {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            })?;
        Ok(DailyStats {
            done,
            thread: Some(thread),
        })
    }

    /// Describes the days the final checkpoint completed, and stops.
    pub fn finish(mut self) -> anyhow::Result<()> {
        self.done.store(true, Ordering::SeqCst);
        match self.thread.take().map(|t| t.join()) {
            Some(Err(_)) => anyhow::bail!("the daily statistics thread panicked"),
            _ => Ok(()),
        }
    }
}
