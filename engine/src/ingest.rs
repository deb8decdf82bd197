//! The ingest stage: what every driver (`run`, `backfill`, training-set
//! replays) does with a source's rows before any view keeps state, written
//! once. For each poll:
//!
//! ```text
//! rejected records ─────────────────────────────────────────────▶ dead letters
//! rows ─▶ rules (event time in range, CHECK) ──────────────────▶ dead letters
//!      ─▶ event times ─▶ the clock (the watermark before each row)
//!      ─▶ per view: stages (WHERE, projections; a row a view cannot
//!         compute ─▶ dead letter) ─▶ the late rule (late ─▶ dead letter)
//!      ─▶ per view: staged, on-time rows, for the view's state
//! ```
//!
//! The clock is the one thing that differs between drivers: a live source's
//! partitions with idleness, one ordered partition (files), or the
//! watermarks an event archive recorded. Which events are late is decided
//! here, by the source's watermark, whatever happens to the rows after.

use std::sync::Arc;
use std::time::Instant;

use arrow::array::{BooleanArray, Int64Array, UInt32Array};
use sluice_sql::{SourcePlan, ViewKind, ViewPlan, WindowSpec};

use crate::aggregate::{AggKernel, late_rows};
use crate::error::Result;
use crate::exec::{PhysStage, Rows, compile_stages, run_stages};
use crate::letters::{late_letter, view_error_letter};
use crate::rules::SourceRules;
use crate::source::{DeadLetter, SourceBatch};
use crate::time::event_times;
use crate::watermark::{NO_WATERMARK, WatermarkTracker};

/// The stateless half of a view: its stages, and what decides whether a
/// staged row can reach its state (its keys and aggregate inputs compute,
/// it is not late).
pub struct ViewStage {
    name: String,
    /// Key columns, for views without a kernel (per-event views).
    keys: Vec<String>,
    stages: Vec<PhysStage>,
    kernel: Option<Arc<AggKernel>>,
    /// Whether computing the kernel's keys and inputs can fail for a row.
    inputs_can_fail: bool,
    window: Option<WindowSpec>,
}

impl ViewStage {
    /// The stages of `plan`, with its aggregate `kernel` (aggregate views).
    pub fn new(plan: &ViewPlan, kernel: Option<Arc<AggKernel>>) -> Result<Self> {
        Ok(ViewStage {
            name: plan.name.clone(),
            keys: plan.keys.clone(),
            stages: compile_stages(&plan.name, &plan.stages)?,
            inputs_can_fail: kernel.as_ref().is_some_and(|k| k.inputs_can_fail()),
            kernel,
            window: match plan.kind {
                ViewKind::Aggregate(_) => plan.window(),
                ViewKind::PerEvent => None,
            },
        })
    }

    /// The view's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs the stages over source rows and makes sure the view's keys and
    /// aggregate inputs can be computed for every staged row. When
    /// DataFusion cannot compute them for the batch (an integer division
    /// by zero, a cast out of range), the rows are tried one by one: those
    /// that fail alone are returned with why (the caller dead-letters
    /// them), the others go on. An error no single row causes is returned.
    pub fn stage(&self, rows: Rows) -> Result<(Rows, Vec<(u32, String)>)> {
        let err = match self.try_stage(rows.clone()) {
            Ok(staged) => return Ok((staged, Vec::new())),
            Err(e) => e,
        };
        let mut keep = vec![true; rows.len()];
        let mut failed = Vec::new();
        for (i, k) in keep.iter_mut().enumerate() {
            if let Err(e) = self.try_stage(rows.slice(i, 1)) {
                *k = false;
                failed.push((rows.rowid.value(i), e.root_message()));
            }
        }
        if failed.is_empty() {
            return Err(err);
        }
        let staged = self.try_stage(rows.filter(&BooleanArray::from(keep))?)?;
        Ok((staged, failed))
    }

    fn try_stage(&self, rows: Rows) -> Result<Rows> {
        let staged = run_stages(&self.name, &self.stages, rows)?;
        if let Some(k) = self.kernel.as_ref()
            && self.inputs_can_fail
            && !staged.is_empty()
        {
            k.key_columns(&staged.batch)?;
            k.inputs(&staged.batch)?;
        }
        Ok(staged)
    }

    /// The key group of each staged row ([`crate::keys::key_group`] of its
    /// key's text): which state it belongs to, and so which worker.
    pub fn key_groups(&self, rows: &Rows) -> Result<Vec<u16>> {
        let keys = match self.kernel.as_ref() {
            Some(k) => k.key_columns(&rows.batch)?,
            // Per-event views: the key columns of the projected rows.
            None => self
                .keys
                .iter()
                .map(|k| {
                    rows.batch.column_by_name(k).cloned().ok_or_else(|| {
                        crate::error::EngineError::Internal(format!(
                            "view `{}`: key column `{k}` is not in its output",
                            self.name
                        ))
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        };
        crate::keys::key_groups(&keys)
    }

    /// Indices of staged rows that are late for this view: every window
    /// holding them had closed when they arrived.
    pub fn late_rows(&self, rows: &Rows) -> Vec<usize> {
        match self.window {
            Some(w) => late_rows(w, rows),
            None => Vec::new(),
        }
    }
}

/// What one poll gave the views.
#[derive(Debug)]
pub struct Accepted {
    /// The source rows that passed the rules, with their event times and
    /// the watermark before each (`rowid`: the row's index here).
    pub rows: Rows,
    /// Each row's position in the source.
    pub positions: Vec<u64>,
    /// Per view (in the order the ingest was given them): its staged rows
    /// that are not late, `rowid` pointing into [`Accepted::rows`].
    pub views: Vec<Rows>,
}

/// What the ingest counted, for a driver's report.
#[derive(Debug, Default, Clone, Copy)]
pub struct IngestCounts {
    /// Rows that passed the rules.
    pub events: u64,
    /// Late events, over all views.
    pub late: u64,
}

/// One source's ingest: rules, clock, and its views' stages.
pub struct Ingest {
    name: String,
    event_time: Option<usize>,
    rules: SourceRules,
    clock: WatermarkTracker,
    /// The late rule applies (a backfill with `--include-late`: not).
    late_rule: bool,
    /// Only events with `from <= ts < to` go on (a backfill's range).
    range: (Option<i64>, Option<i64>),
    views: Vec<ViewStage>,
    /// Counts since the ingest started.
    pub counts: IngestCounts,
}

impl Ingest {
    /// The ingest of source `sp` for `views` (each a view of `sp`, with
    /// its kernel), on `clock`.
    pub fn new(sp: &SourcePlan, views: Vec<ViewStage>, clock: WatermarkTracker) -> Result<Self> {
        Ok(Ingest {
            name: sp.name.clone(),
            event_time: sp.event_time,
            rules: SourceRules::new(sp)?,
            clock,
            late_rule: true,
            range: (None, None),
            views,
            counts: IngestCounts::default(),
        })
    }

    /// No late rule: every event is folded in (`backfill --include-late`).
    pub fn without_late_rule(mut self) -> Self {
        self.late_rule = false;
        self
    }

    /// Only events with `from <= ts < to` go on to the views.
    pub fn with_range(mut self, from: Option<i64>, to: Option<i64>) -> Self {
        self.range = (from, to);
        self
    }

    /// The source's clock.
    pub fn clock(&self) -> &WatermarkTracker {
        &self.clock
    }

    /// The source's clock, to restore, add partitions to or refresh.
    pub fn clock_mut(&mut self) -> &mut WatermarkTracker {
        &mut self.clock
    }

    /// The views' stages.
    pub fn views(&self) -> &[ViewStage] {
        &self.views
    }

    /// Takes one poll's rows through the rules, the clock, and each view's
    /// stages and late rule. `rejected` are the records the source could
    /// not decode; every dead letter goes to `letters`. `recorded`: the
    /// watermark before each row as an event archive recorded it (a replay
    /// of what a stream saw), instead of this ingest's clock. `None` when
    /// no row passed the rules.
    pub fn accept(
        &mut self,
        batch: Option<SourceBatch>,
        rejected: Vec<DeadLetter>,
        describe: &dyn Fn(u64) -> String,
        recorded: Option<&[i64]>,
        letters: &mut Vec<DeadLetter>,
    ) -> Result<Option<Accepted>> {
        for d in &rejected {
            metrics::counter!("sluice_decode_errors_total", "source" => self.name.clone(), "kind" => d.kind.as_str()).increment(1);
        }
        letters.extend(rejected);
        let (batch, bad) = self.rules.apply(batch, describe)?;
        letters.extend(bad);
        let Some(SourceBatch {
            batch,
            row_positions,
            partitions,
        }) = batch
        else {
            return Ok(None);
        };
        let n = batch.num_rows();
        if n == 0 {
            return Ok(None);
        }
        self.counts.events += n as u64;
        metrics::counter!("sluice_events_in_total", "source" => self.name.clone())
            .increment(n as u64);
        let (ts, wm) = match self.event_time {
            Some(idx) => {
                let ts = event_times(&self.name, &batch, idx)?;
                let wm = match recorded {
                    Some(r) => r.to_vec(),
                    None => self.clock.observe(ts.values(), &partitions, Instant::now()),
                };
                let wm = if self.late_rule {
                    wm
                } else {
                    vec![NO_WATERMARK; n]
                };
                (Some(ts), Some(Int64Array::from(wm)))
            }
            None => (None, None),
        };
        let rows = Rows {
            batch: batch.clone(),
            ts,
            wm,
            rowid: UInt32Array::from_iter_values(0..n as u32),
        };
        let in_range = match (&rows.ts, self.range) {
            (Some(ts), (from, to)) if from.is_some() || to.is_some() => {
                let keep: BooleanArray = ts
                    .values()
                    .iter()
                    .map(|t| Some(from.is_none_or(|f| *t >= f) && to.is_none_or(|e| *t < e)))
                    .collect();
                rows.filter(&keep)?
            }
            _ => rows.clone(),
        };
        let position = |r: usize| describe(row_positions.get(r).copied().unwrap_or(0));
        let mut views = Vec::with_capacity(self.views.len());
        for v in &self.views {
            let (staged, failed) = v.stage(in_range.clone())?;
            for (r, why) in &failed {
                let r = *r as usize;
                letters.push(view_error_letter(
                    &self.name,
                    position(r),
                    v.name(),
                    &batch,
                    r,
                    why,
                )?);
            }
            let late = v.late_rows(&staged);
            if late.is_empty() {
                views.push(staged);
                continue;
            }
            self.counts.late += late.len() as u64;
            metrics::counter!("sluice_late_events_total", "view" => v.name().to_string())
                .increment(late.len() as u64);
            let mut keep = vec![true; staged.len()];
            for i in late {
                keep[i] = false;
                let r = staged.rowid.value(i) as usize;
                letters.push(late_letter(
                    &self.name,
                    position(r),
                    v.name(),
                    &batch,
                    r,
                    staged.ts.as_ref().map(|a| a.value(i)),
                    staged.wm.as_ref().map(|a| a.value(i)),
                )?);
            }
            views.push(staged.filter(&BooleanArray::from(keep))?);
        }
        Ok(Some(Accepted {
            rows,
            positions: row_positions,
            views,
        }))
    }
}
