//! The streaming job: polls sources, advances watermarks, runs the views,
//! and takes checkpoints (lake files durable first, then one RocksDB write
//! batch with state, online rows, source positions and watermarks).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use arrow::array::{Int64Array, RecordBatch, UInt32Array};
use arrow::datatypes::SchemaRef;
use sluice_sql::PipelinePlan;

use crate::checkpoint::{Checkpoint, STATE_FORMAT, SourceProgress, ViewProgress};
use crate::error::RetryHint;
use crate::error::{EngineError, Result};
use crate::exec::Rows;
use crate::online::{ViewMeta, read_view_meta, view_meta_key};
use crate::rules::SourceRules;
use crate::source::{DeadLetter, DeadLetterKind, DeadLetterSink, OfflineSink, Poll, Source};
use crate::store::{Commit, Store};
use crate::tiles::{TileMemory, TileReader, is_tiled, pending_key};
use crate::time::event_times;
use crate::vector::VectorIndex;
use crate::view::{ViewOp, features_json};
use crate::watermark::WatermarkTracker;

/// How often a running job logs its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Sleep of an idle loop, doubling up to `MAX_IDLE_SLEEP` while idle.
const MIN_IDLE_SLEEP: Duration = Duration::from_millis(2);
const MAX_IDLE_SLEEP: Duration = Duration::from_millis(100);
/// The shortest time between checkpoints taken early for the memory budget.
const MIN_EARLY_CHECKPOINT: Duration = Duration::from_millis(100);
/// Rows one poll asks for at most (`--batch-rows` above it is cut to it).
pub const MAX_POLL_ROWS: usize = 1 << 20;
/// How often a source is asked for its partitions (new partitions appear).
const PARTITION_REFRESH: Duration = Duration::from_secs(5);

pub use crate::watermark::NO_WATERMARK;

/// The store key of a view's catch-up point: the watermark from which a
/// version added to an existing state dir serves its unversioned name.
pub(crate) fn catch_up_key(view: &str) -> String {
    format!("catch_up/{view}")
}

/// Metadata key of the pipeline's text (readers rebuild tiled views' aggregates from it).
pub const PIPELINE_KEY: &str = "pipeline";

/// The dead letter of source row `row` of `batch`, late for `view`: its
/// event time `ts` was behind the watermark `wm` when it arrived.
pub fn late_letter(
    source: &str,
    position: String,
    view: &str,
    batch: &RecordBatch,
    row: usize,
    ts: Option<i64>,
    wm: Option<i64>,
) -> Result<DeadLetter> {
    Ok(DeadLetter {
        source: source.to_string(),
        position,
        kind: DeadLetterKind::LateEvent,
        reason: format!(
            "late for view `{view}`: event time {} is behind the watermark {}; every window holding it had closed",
            ts.map(crate::online::fmt_ts).unwrap_or_default(),
            wm.map(crate::online::fmt_ts).unwrap_or_default()
        ),
        record: row_json(batch, row)?,
    })
}

/// Row `row` of `batch` as a JSON object (a dead letter's record).
fn row_json(batch: &RecordBatch, row: usize) -> Result<String> {
    let all: Vec<usize> = (0..batch.num_columns()).collect();
    let rec = features_json(&batch.slice(row, 1), &all)?
        .pop()
        .unwrap_or_default();
    Ok(String::from_utf8_lossy(&rec).into_owned())
}

/// The dead letter of source-batch row `row`, which view `view` cannot
/// compute (`why`).
pub fn view_error_letter(
    source: &str,
    position: String,
    view: &str,
    batch: &RecordBatch,
    row: usize,
    why: &str,
) -> Result<DeadLetter> {
    metrics::counter!("sluice_view_errors_total", "view" => view.to_string()).increment(1);
    Ok(DeadLetter {
        source: source.to_string(),
        position,
        kind: DeadLetterKind::ViewError,
        reason: format!("view `{view}` cannot compute it: {why}"),
        record: row_json(batch, row)?,
    })
}

/// How a job runs.
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// Where RocksDB and the dead-letter file live.
    pub state_dir: PathBuf,
    /// Time between checkpoints.
    pub checkpoint_interval: Duration,
    /// Rows per source poll.
    pub batch_rows: usize,
    /// Pause after each batch (tests use it to make a run last).
    pub throttle: Option<Duration>,
    /// Bytes the job's state may hold in memory (tile caches, pending rows,
    /// RocksDB's caches and memtables); the rest of the state stays on disk.
    pub memory_budget: u64,
    /// Bytes of dead letters written per source over the state dir's life
    /// (`--dead-letter-limit`); past it letters are counted, not written.
    pub dead_letter_limit: u64,
}

/// The memory budget of a job that names none.
pub const DEFAULT_MEMORY_BUDGET: u64 = 1 << 30;

/// How a memory budget is shared: RocksDB's block cache and memtables get an
/// eighth each; the tiled views share a quarter for cached tiles, an eighth
/// for the accumulators of one flush step and an eighth for rows waiting for
/// the watermark (past it, the job checkpoints early).
pub fn split_budget(
    budget: u64,
    tiled_views: usize,
) -> (crate::store::StoreOptions, crate::tiles::TileMemory) {
    let b = budget as usize;
    let n = tiled_views.max(1);
    (
        crate::store::StoreOptions {
            block_cache: (b / 8).max(8 << 20),
            write_buffers: (b / 8).max(16 << 20),
        },
        crate::tiles::TileMemory {
            cache: b / 4 / n,
            flush: b / 8 / n,
            pending: b / 8 / n,
        },
    )
}

impl JobOptions {
    /// Defaults for a state dir.
    pub fn new(state_dir: PathBuf) -> Self {
        JobOptions {
            state_dir,
            checkpoint_interval: Duration::from_secs(1),
            batch_rows: 8192,
            throttle: None,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            dead_letter_limit: crate::source::DEFAULT_DEAD_LETTER_LIMIT,
        }
    }
}

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
                    crate::online::fmt_ts(w).as_str().unwrap_or("?"),
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

    /// The view an unversioned name reads: the newest version that has
    /// caught up (its watermark has covered a whole window since it was
    /// added), else the oldest; a versioned or single name as it is.
    pub fn resolve<'a>(&'a self, view: &'a str) -> &'a str {
        // `name@1` names version 1, whose view keeps the plain name.
        if let Some(base) = view.strip_suffix("@1")
            && (self.versions.contains_key(base) || self.views.contains_key(base))
        {
            return base;
        }
        let Some(vs) = self.versions.get(view) else {
            return view;
        };
        for (_, name) in vs {
            let wm = self.watermark(name);
            let ready = match (wm, self.catch_up.get(name)) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some(w), Some(at)) => w >= *at,
            };
            if ready {
                return name;
            }
        }
        vs.last().map_or(view, |(_, n)| n.as_str())
    }

    /// The committed watermark of `view`, if it has one.
    pub fn watermark(&self, view: &str) -> Option<i64> {
        self.watermarks
            .get(view)
            .map(|w| w.load(Ordering::Acquire))
            .filter(|w| *w != NO_WATERMARK)
    }
}

struct SourceRt {
    src: Box<dyn Source>,
    name: String,
    event_time: Option<usize>,
    watermark: WatermarkTracker,
    done: bool,
    views: Vec<usize>,
    last_parts_refresh: Instant,
    down: Option<String>,
    /// The position after the last rows a poll returned: where a poll that
    /// failed is retried from, so a retry loses and repeats nothing.
    last_good: Vec<u8>,
    /// A poll failed with an error worth retrying: why, when to retry, and
    /// the backoff to double if it fails again.
    retry: Option<Retry>,
    /// The source's event archive, and the rows accepted since the last checkpoint.
    archive: Option<Archive>,
    /// Event-time range and `CHECK` rules.
    rules: SourceRules,
}

/// A source's event archive: the rows it accepted, written with each
/// checkpoint (see [`crate::replay::archive_schema`]).
struct Archive {
    sink: Box<dyn OfflineSink>,
    schema: SchemaRef,
    /// Source rows since the last checkpoint.
    rows: Vec<ArchivedRows>,
    /// The clock of the last committed checkpoint.
    clock: Option<i64>,
}

struct Retry {
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
    fn failed(&mut self, e: EngineError) -> Result<()> {
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

    fn add_partitions(&mut self, now: Instant) {
        for id in self.src.partitions() {
            self.watermark.add_partition(id, now);
        }
        self.last_parts_refresh = now;
    }

    fn progress(&self) -> SourceProgress {
        SourceProgress {
            position: self.src.position(),
            watermark: self.watermark.get(),
            max_event_time: self.watermark.max_event_time(),
            partitions: self.watermark.partitions(),
        }
    }
}

/// Source rows, their origins (partition, offset) and the watermark their late rule used.
type ArchivedRows = (RecordBatch, Vec<(Option<i32>, Option<i64>)>, Int64Array);

impl Archive {
    /// Writes the rows of checkpoint `epoch`, whose clock is `clock`.
    fn write(&mut self, epoch: u64, clock: Option<i64>) -> Result<()> {
        let rows = std::mem::take(&mut self.rows);
        let before = self.clock;
        self.clock = clock;
        if rows.is_empty() {
            return Ok(());
        }
        let mut seq = 0u64;
        let mut out = Vec::with_capacity(rows.len());
        for (b, origins, wm) in rows {
            let n = b.num_rows();
            let mut cols = b.columns().to_vec();
            let seqs = arrow::array::UInt64Array::from_iter_values(seq..seq + n as u64);
            seq += n as u64;
            cols.push(Arc::new(arrow::array::UInt64Array::from(vec![epoch; n])));
            cols.push(Arc::new(seqs));
            cols.push(Arc::new(arrow::array::Int32Array::from_iter(
                origins.iter().map(|o| o.0),
            )));
            cols.push(Arc::new(Int64Array::from_iter(origins.iter().map(|o| o.1))));
            cols.push(Arc::new(Int64Array::from_iter(
                wm.values()
                    .iter()
                    .map(|w| (*w != NO_WATERMARK).then_some(*w)),
            )));
            cols.push(Arc::new(Int64Array::from(vec![before; n])));
            cols.push(Arc::new(Int64Array::from(vec![clock; n])));
            out.push(
                RecordBatch::try_new(Arc::clone(&self.schema), cols)
                    .map_err(|e| EngineError::arrow("event archive rows", e))?,
            );
        }
        self.sink.write_epoch(epoch, &out)?;
        Ok(())
    }
}

/// Figures of a finished run.
#[derive(Debug, Default, Clone)]
pub struct RunStats {
    /// Rows decoded from sources.
    pub events: u64,
    /// Records dead-lettered (bad input and late events).
    pub dead_letters: u64,
    /// Rows emitted by views.
    pub rows_emitted: u64,
    /// Checkpoints committed.
    pub checkpoints: u64,
    /// Time spent in checkpoints, in total and the longest one.
    pub checkpoint_time: Duration,
    /// The longest checkpoint.
    pub checkpoint_max: Duration,
    /// Wall time of the run.
    pub elapsed: Duration,
}

/// Fault injection for the crash tests: `SLUICE_FAULT_ABORT_BEFORE_STATE_COMMIT=N`
/// aborts the process after checkpoint N's index commit, before its state commit.
fn abort_before_state_commit(epoch: u64) -> bool {
    static AT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    AT.get_or_init(|| {
        std::env::var("SLUICE_FAULT_ABORT_BEFORE_STATE_COMMIT")
            .ok()
            .and_then(|v| v.parse().ok())
    })
    .is_some_and(|n| n == epoch)
}

/// A running pipeline.
pub struct Job {
    sources: Vec<SourceRt>,
    views: Vec<ViewOp>,
    lakes: Vec<Vec<Box<dyn OfflineSink>>>,
    dead: crate::source::CappedDeadLetters,
    epoch: u64,
    live: Arc<Live>,
    opts: JobOptions,
    last_checkpoint: Instant,
    stats: RunStats,
    /// The pipeline's text, kept with the state for readers.
    pipeline_text: String,
    tile_memory: TileMemory,
    /// The state dir's id: the owner name of the files this job writes.
    state_id: String,
    /// Dead letters of the poll being processed.
    letters: Vec<DeadLetter>,
}

impl Job {
    /// Opens the state dir, recovers the last checkpoint and prepares to run.
    /// `sources` are in the plan's source order; `lakes` map view name to its offline sink.
    pub fn open(
        plan: &PipelinePlan,
        sources: Vec<Box<dyn Source>>,
        mut lakes: HashMap<String, Vec<Box<dyn OfflineSink>>>,
        mut dead: Box<dyn DeadLetterSink>,
        opts: JobOptions,
    ) -> Result<Job> {
        let view_names: Vec<String> = plan.views.iter().map(|v| v.name.clone()).collect();
        let tiled = plan.views.iter().filter(|v| is_tiled(v)).count();
        let (store_limits, tile_memory) = split_budget(opts.memory_budget, tiled);
        let store = Arc::new(Store::open_with(
            &opts.state_dir,
            &view_names,
            store_limits,
        )?);
        let cp = Checkpoint::load(&store, &opts.state_dir)?.unwrap_or_default();
        let epoch = cp.epoch;
        let state_id = crate::checkpoint::state_id(&store, &opts.state_dir)?;
        let mut views = Vec::new();
        let mut metas = HashMap::new();
        let mut catch_up = HashMap::new();
        let mut indexes = HashMap::new();
        let mut readers = HashMap::new();
        for vp in &plan.views {
            let mut op = ViewOp::with_tiles(vp, Some(tile_memory))?;
            if let (Some(k), true) = (op.kernel(), is_tiled(vp)) {
                readers.insert(
                    vp.name.clone(),
                    Arc::new(TileReader::new(vp, Arc::clone(k))?),
                );
            }
            if let Some(t) = op.tiles_mut()
                && let Some(p) = store.meta(&pending_key(&vp.name))?
            {
                t.restore_pending(&p)?;
            }
            if let Some(vi) = &vp.vector_index {
                let idx = VectorIndex::open(&opts.state_dir, &vp.name, vi)?;
                if idx.epoch()? != Some(epoch) {
                    let wm = cp.sources.get(&vp.source).and_then(|s| s.watermark);
                    let st = crate::vector::rebuild_from_store(&idx, &store, epoch, wm)?;
                    tracing::info!(view = %vp.name, keys = st.upserts, "vector index rebuilt from the online store");
                }
                op.keep_vector_updates();
                indexes.insert(vp.name.clone(), Arc::new(idx));
            }
            let meta = op.meta()?;
            // A view added to a state dir earlier keeps its catch-up point.
            if let Some(at) = store.meta_i64(&catch_up_key(&vp.name))? {
                catch_up.insert(vp.name.clone(), at);
            }
            // A view new to an existing state dir starts at the source's
            // watermark: it has caught up once that moved a window past it.
            if epoch > 0 && read_view_meta(&store, &vp.name)?.is_none() {
                let start = cp.sources.get(&vp.source).and_then(|s| s.watermark);
                let size = match vp.window() {
                    Some(sluice_sql::WindowSpec::Hop { size_ms, .. }) => Some(size_ms),
                    Some(sluice_sql::WindowSpec::Tumble { size_ms }) => Some(size_ms),
                    _ => None,
                };
                if let Some(start) = start {
                    catch_up.insert(
                        vp.name.clone(),
                        size.map_or(i64::MAX, |s| start.saturating_add(s)),
                    );
                }
            }
            if epoch > 0
                && let Some(old) = read_view_meta(&store, &vp.name)?
                && (old.query != meta.query || old.window != meta.window || old.keys != meta.keys)
            {
                return Err(EngineError::Incompatible {
                    path: opts.state_dir.display().to_string(),
                    reason: format!(
                        "feature view `{}` changed since this state was written: {}; run it with a new --state-dir (or backfill), or give the changed view a new name",
                        vp.name,
                        view_change(&old, &meta)
                    ),
                });
            }
            if let Some(agg) = op.agg_mut() {
                agg.restore_emitted(cp.views.get(&vp.name).and_then(|v| v.emitted_through));
                let entries = store.state_entries(&vp.name)?;
                let mut by_pane: BTreeMap<i64, Vec<crate::aggregate::StateEntry>> = BTreeMap::new();
                for (p, e) in entries {
                    by_pane.entry(p).or_default().push(e);
                }
                for (p, e) in by_pane {
                    agg.restore_pane(p, &e)?;
                }
            }
            metas.insert(vp.name.clone(), meta);
            views.push(op);
        }
        let mut lake_vec = Vec::new();
        for vp in &plan.views {
            let mut sinks = lakes.remove(&vp.name).unwrap_or_default();
            for l in sinks.iter_mut() {
                l.recover(&state_id, epoch)?;
            }
            lake_vec.push(sinks);
        }
        dead.recover(cp.dead_letter_len)?;
        let dead = crate::source::CappedDeadLetters::new(
            dead,
            opts.dead_letter_limit,
            cp.dead_letter_bytes.clone(),
        );
        let mut rts = Vec::new();
        let now = Instant::now();
        for (sp, mut src) in plan.sources.iter().zip(sources) {
            let progress = cp.sources.get(&sp.name).cloned().unwrap_or_default();
            src.seek((!progress.position.is_empty()).then_some(progress.position.as_slice()))?;
            let mut watermark = WatermarkTracker::new(
                sp.watermark_delay_ms,
                sp.idle_timeout_ms
                    .map(|ms| Duration::from_millis(ms.max(0) as u64)),
            );
            watermark.restore(
                progress.watermark,
                progress.max_event_time,
                &progress.partitions,
                now,
            );
            let mut rt = SourceRt {
                src,
                name: sp.name.clone(),
                event_time: sp.event_time,
                watermark,
                done: false,
                views: plan
                    .views
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.source == sp.name)
                    .map(|(i, _)| i)
                    .collect(),
                last_parts_refresh: now,
                down: None,
                last_good: Vec::new(),
                retry: None,
                archive: None,
                rules: SourceRules::new(sp)?,
            };
            rt.last_good = rt.src.position();
            rt.add_partitions(now);
            rts.push(rt);
        }
        let watermarks = plan
            .views
            .iter()
            .map(|v| {
                let wm = rts
                    .iter()
                    .find(|s| s.name == v.source)
                    .map(|s| s.watermark.watermark())
                    .unwrap_or(NO_WATERMARK);
                (v.name.clone(), AtomicI64::new(wm))
            })
            .collect();
        let live = Arc::new(Live {
            store,
            watermarks,
            views: metas,
            ready: AtomicBool::new(false),
            unready: Mutex::new(BTreeMap::new()),
            indexes,
            readers,
            freshness: Freshness {
                slo_ms: plan
                    .views
                    .iter()
                    .filter_map(|v| v.freshness_slo_ms.map(|ms| (v.name.clone(), ms)))
                    .collect(),
                newest: plan
                    .views
                    .iter()
                    .map(|v| {
                        let t = rts
                            .iter()
                            .find(|s| s.name == v.source)
                            .and_then(|s| s.watermark.max_event_time())
                            .unwrap_or(NO_WATERMARK);
                        (v.name.clone(), AtomicI64::new(t))
                    })
                    .collect(),
                last_checkpoint_ms: AtomicI64::new(0),
            },
            catch_up,
            versions: {
                let mut m: HashMap<String, Vec<(u32, String)>> = HashMap::new();
                for v in &plan.views {
                    m.entry(v.base_name.clone())
                        .or_default()
                        .push((v.version, v.name.clone()));
                }
                m.retain(|b, vs| vs.len() > 1 || vs.iter().all(|(_, n)| n != b));
                for vs in m.values_mut() {
                    vs.sort_by_key(|v| std::cmp::Reverse(v.0));
                }
                m
            },
            served: plan
                .views
                .iter()
                .filter_map(|v| {
                    v.log_served
                        .map(|f| (v.name.clone(), Arc::new(crate::served::ServedLog::new(f))))
                })
                .collect(),
        });
        Ok(Job {
            sources: rts,
            views,
            lakes: lake_vec,
            dead,
            epoch,
            live,
            opts,
            last_checkpoint: Instant::now(),
            stats: RunStats::default(),
            pipeline_text: plan.text.clone(),
            tile_memory,
            state_id,
            letters: Vec::new(),
        })
    }

    /// State shared with the serving API.
    pub fn live(&self) -> Arc<Live> {
        Arc::clone(&self.live)
    }

    /// The last committed epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The state dir's id, which names the lake and archive files it writes.
    pub fn state_id(&self) -> &str {
        &self.state_id
    }

    /// `(view, rule, emitted rows failing it)` for every `expect` rule,
    /// since this process started.
    pub fn expectation_failures(&self) -> Vec<(String, String, u64)> {
        self.views
            .iter()
            .flat_map(|op| {
                op.expectations
                    .failures()
                    .into_iter()
                    .map(|(rule, n)| (op.plan.name.clone(), rule, n))
            })
            .collect()
    }

    /// Keeps an event archive of source `source`: every row it accepts,
    /// written to `sink` with each checkpoint (exactly once: files of an
    /// epoch that did not commit are removed here).
    pub fn set_archive(&mut self, source: &str, mut sink: Box<dyn OfflineSink>) -> Result<()> {
        let epoch = self.epoch;
        let s = self
            .sources
            .iter_mut()
            .find(|s| s.name == source)
            .ok_or_else(|| EngineError::Connector {
                what: format!("archive of source {source}"),
                message: "no such source in the pipeline".into(),
            })?;
        sink.recover(&self.state_id, epoch)?;
        s.archive = Some(Archive {
            sink,
            schema: crate::replay::archive_schema(&s.src.schema()),
            rows: Vec::new(),
            clock: s.watermark.get(),
        });
        Ok(())
    }

    /// Runs until every source ends (or `stop` is set), then takes a final checkpoint.
    pub fn run(&mut self, stop: &AtomicBool) -> Result<RunStats> {
        let started = Instant::now();
        let mut last_progress = Instant::now();
        let mut last_events = 0u64;
        let mut idle_sleep = MIN_IDLE_SLEEP;
        // Readers see the views' metadata from the start.
        self.checkpoint()?;
        self.live.ready.store(true, Ordering::Release);
        while !stop.load(Ordering::Relaxed) {
            let mut any = false;
            let mut all_done = true;
            for si in 0..self.sources.len() {
                if self.sources[si].done {
                    continue;
                }
                all_done = false;
                let mut got_rows = false;
                let Some(polled) = self.poll_source(si)? else {
                    self.check_health(si);
                    continue;
                };
                match polled {
                    Poll::Data { batch, rejected } => {
                        any = true;
                        for d in &rejected {
                            self.dead_letter(d)?;
                            metrics::counter!("sluice_decode_errors_total", "source" => self.sources[si].name.clone(), "kind" => d.kind.as_str()).increment(1);
                        }
                        let s = &self.sources[si];
                        let describe = |p| s.src.describe_position(p);
                        let (batch, bad) = s.rules.apply(batch, &describe)?;
                        for d in &bad {
                            self.dead_letter(d)?;
                        }
                        if let Some(b) = batch {
                            got_rows = true;
                            self.on_batch(si, b.batch, &b.row_positions, &b.partitions)?;
                        }
                    }
                    Poll::Idle => {}
                    Poll::End => self.sources[si].done = true,
                }
                self.write_letters()?;
                if !got_rows {
                    self.refresh_watermark(si)?;
                }
                self.check_health(si);
            }
            if all_done {
                break;
            }
            // Early checkpoints (pending rows over budget) at most every
            // 100 ms: rows the watermark has not passed cannot be folded,
            // and a stuck watermark must not turn into a checkpoint storm.
            let since = self.last_checkpoint.elapsed();
            if since >= self.opts.checkpoint_interval
                || (since >= MIN_EARLY_CHECKPOINT && self.tiles_over_budget())
            {
                self.checkpoint()?;
            }
            if last_progress.elapsed() >= PROGRESS_EVERY {
                self.log_progress(started, &mut last_progress, &mut last_events);
            }
            if let Some(t) = self.opts.throttle {
                std::thread::sleep(t);
            } else if !any {
                // Back off while nothing arrives (a source's own poll may
                // also wait); start again at once when data comes.
                std::thread::sleep(idle_sleep);
                idle_sleep = (idle_sleep * 2).min(MAX_IDLE_SLEEP);
            } else {
                idle_sleep = MIN_IDLE_SLEEP;
            }
        }
        self.checkpoint()?;
        self.stats.elapsed = started.elapsed();
        Ok(self.stats.clone())
    }

    /// Rows waiting for the watermark have outgrown their share of the
    /// memory budget: time to fold what the watermark passed into tiles.
    fn tiles_over_budget(&self) -> bool {
        self.views.iter().any(|v| {
            v.tiles()
                .is_some_and(|t| t.pending_bytes() > self.tile_memory.pending)
        })
    }

    fn log_progress(&self, started: Instant, last: &mut Instant, last_events: &mut u64) {
        let rate =
            (self.stats.events - *last_events) as f64 / last.elapsed().as_secs_f64().max(1e-9);
        let event_time: Vec<String> = self
            .sources
            .iter()
            .map(|s| {
                format!(
                    "{}={}",
                    s.name,
                    s.watermark
                        .max_event_time()
                        .map(|t| crate::online::fmt_ts(t).to_string())
                        .unwrap_or_else(|| "-".into())
                )
            })
            .collect();
        tracing::info!(
            events = self.stats.events,
            rate = format!("{rate:.0}/s"),
            event_time = event_time.join(","),
            dead_letters = self.stats.dead_letters,
            epoch = self.epoch,
            elapsed_s = started.elapsed().as_secs(),
            "progress"
        );
        *last = Instant::now();
        *last_events = self.stats.events;
    }

    /// Counts a dead letter and keeps it for [`Job::write_letters`].
    fn dead_letter(&mut self, d: &DeadLetter) -> Result<()> {
        self.stats.dead_letters += 1;
        metrics::counter!("sluice_dead_letters_total", "source" => d.source.clone(), "kind" => d.kind.as_str()).increment(1);
        self.letters.push(d.clone());
        Ok(())
    }

    /// Writes the dead letters of a poll, in the order of their records.
    fn write_letters(&mut self) -> Result<()> {
        if self.letters.is_empty() {
            return Ok(());
        }
        let mut letters = std::mem::take(&mut self.letters);
        crate::source::sort_by_position(&mut letters);
        for d in &letters {
            self.dead.write(d)?;
        }
        letters.clear();
        self.letters = letters;
        Ok(())
    }

    /// Marks a source down or up again (for `/readyz` and metrics).
    /// Polls source `si`. An error the outside world may fix (a broker, a
    /// file system) is not the end of the job: the source is marked down
    /// (`/readyz`, `sluice_source_up`), retried with doubling backoff from
    /// the position after its last good poll; `None` while it waits.
    fn poll_source(&mut self, si: usize) -> Result<Option<Poll>> {
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

    fn check_health(&mut self, si: usize) {
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
    fn refresh_watermark(&mut self, si: usize) -> Result<()> {
        let now = Instant::now();
        let s = &mut self.sources[si];
        if now.saturating_duration_since(s.last_parts_refresh) >= PARTITION_REFRESH {
            s.add_partitions(now);
        }
        let Some(c) = s.watermark.refresh(now) else {
            return Ok(());
        };
        metrics::gauge!("sluice_watermark_ms", "source" => s.name.clone()).set(c as f64);
        for vi in s.views.clone() {
            self.views[vi].advance(c)?;
        }
        Ok(())
    }

    fn on_batch(
        &mut self,
        si: usize,
        batch: RecordBatch,
        positions: &[u64],
        partitions: &[u32],
    ) -> Result<()> {
        let n = batch.num_rows();
        if n == 0 {
            return Ok(());
        }
        self.stats.events += n as u64;
        let s = &mut self.sources[si];
        metrics::counter!("sluice_events_in_total", "source" => s.name.clone()).increment(n as u64);
        let (ts, wm) = match s.event_time {
            Some(idx) => {
                let ts = event_times(&s.name, &batch, idx)?;
                let wm = s.watermark.observe(ts.values(), partitions, Instant::now());
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
        let s = &mut self.sources[si];
        if let Some(a) = s.archive.as_mut() {
            let origins = positions.iter().map(|p| s.src.row_origin(*p)).collect();
            let wm = rows
                .wm
                .clone()
                .unwrap_or_else(|| Int64Array::from(vec![NO_WATERMARK; n]));
            a.rows.push((batch.clone(), origins, wm));
        }
        let new_wm = self.sources[si].watermark.watermark();
        let view_ids = self.sources[si].views.clone();
        for vi in view_ids {
            let done = self.views[vi].process(rows.clone())?;
            for (rid, why) in &done.failed {
                let r = *rid as usize;
                let s = &self.sources[si];
                let d = view_error_letter(
                    &s.name,
                    s.src
                        .describe_position(positions.get(r).copied().unwrap_or(0)),
                    self.views[vi].name(),
                    &batch,
                    r,
                    why,
                )?;
                self.dead_letter(&d)?;
            }
            let late = done.late;
            if !late.is_empty() {
                metrics::counter!("sluice_late_events_total", "view" => self.views[vi].name().to_string()).increment(late.len() as u64);
                for rid in late {
                    let r = rid as usize;
                    let s = &self.sources[si];
                    let d = late_letter(
                        &s.name,
                        s.src
                            .describe_position(positions.get(r).copied().unwrap_or(0)),
                        self.views[vi].name(),
                        &batch,
                        r,
                        rows.ts.as_ref().map(|a| a.value(r)),
                        rows.wm.as_ref().map(|a| a.value(r)),
                    )?;
                    self.dead_letter(&d)?;
                }
            }
            if new_wm != NO_WATERMARK {
                self.views[vi].advance(new_wm)?;
            }
        }
        if new_wm != NO_WATERMARK {
            metrics::gauge!("sluice_watermark_ms", "source" => self.sources[si].name.clone())
                .set(new_wm as f64);
        }
        Ok(())
    }

    /// Takes a checkpoint: lake files of the epoch made durable, then one
    /// RocksDB write batch with state, online rows, positions and watermarks.
    pub fn checkpoint(&mut self) -> Result<()> {
        let t0 = Instant::now();
        let epoch = self.epoch + 1;
        self.write_letters()?;
        for v in self.views.iter_mut() {
            let end = self
                .sources
                .iter()
                .find(|s| s.name == v.plan.source)
                .and_then(|s| s.watermark.max_event_time());
            v.before_checkpoint(end)?;
        }
        for (v, lake) in self.views.iter_mut().zip(self.lakes.iter_mut()) {
            let batches = std::mem::take(&mut v.pending_lake);
            if batches.is_empty() {
                continue;
            }
            for l in lake.iter_mut() {
                l.write_epoch(epoch, &batches)?;
            }
        }
        for s in self.sources.iter_mut() {
            let clock = s.watermark.get();
            if let Some(a) = s.archive.as_mut() {
                a.write(epoch, clock)?;
            }
        }
        let dl_len = self.dead.commit()?;
        let mut c = Commit::default();
        let mut cp = Checkpoint {
            format: STATE_FORMAT,
            epoch,
            dead_letter_len: dl_len,
            dead_letter_bytes: self.dead.used().clone(),
            ..Checkpoint::default()
        };
        for v in self.views.iter_mut() {
            let wm = self
                .sources
                .iter()
                .find(|s| s.name == v.plan.source)
                .map(|s| s.watermark.watermark())
                .unwrap_or(NO_WATERMARK);
            let name = v.name().to_string();
            let mut progress = ViewProgress::default();
            if let Some(t) = v.tiles_mut() {
                if wm != NO_WATERMARK {
                    let mut w = crate::store::TileWrites::default();
                    t.flush(self.live.store.as_ref(), wm, &mut w)?;
                    c.tiles.push((name.clone(), w));
                    progress.clock = Some(wm);
                }
                c.meta.push((pending_key(&name), t.encode_pending()?));
            }
            let mut ops = Vec::new();
            v.checkpoint(&mut ops)?;
            c.state.push((v.name().to_string(), ops));
            let rows = std::mem::take(&mut v.pending_online);
            metrics::counter!("sluice_online_writes_total", "view" => v.name().to_string())
                .increment(rows.len() as u64);
            c.online.push((v.name().to_string(), rows));
            progress.emitted_through = v.agg().and_then(|a| a.emitted_through());
            cp.views.insert(name, progress);
            if let Some(m) = self.live.views.get(v.name())
                && let Ok(j) = serde_json::to_vec(m)
            {
                c.meta.push((view_meta_key(v.name()), j));
            }
            if let Some(at) = self.live.catch_up.get(v.name()) {
                c.meta
                    .push((catch_up_key(v.name()), at.to_be_bytes().to_vec()));
            }
        }
        for s in &self.sources {
            cp.sources.insert(s.name.clone(), s.progress());
        }
        c.meta.extend(cp.entries()?);
        c.meta
            .push((PIPELINE_KEY.into(), self.pipeline_text.as_bytes().to_vec()));
        // The indexes commit first: a crash before the state commit leaves
        // them one epoch ahead, and the next start rebuilds them.
        for v in self.views.iter_mut() {
            let Some(idx) = self.live.indexes.get(v.name()) else {
                continue;
            };
            let updates = std::mem::take(&mut v.pending_vectors);
            let wm = self
                .sources
                .iter()
                .find(|s| s.name == v.plan.source)
                .and_then(|s| s.watermark.get());
            let t = Instant::now();
            let st = idx.apply(epoch, &updates, wm, false)?;
            metrics::counter!("sluice_index_updates_total", "view" => v.name().to_string())
                .increment(st.upserts + st.removals);
            metrics::counter!("sluice_index_expired_total", "view" => v.name().to_string())
                .increment(st.expired);
            metrics::histogram!("sluice_index_commit_seconds", "view" => v.name().to_string())
                .record(t.elapsed().as_secs_f64());
        }
        if abort_before_state_commit(epoch) {
            std::process::abort();
        }
        self.live.store.commit(c)?;
        self.epoch = epoch;
        for v in self.views.iter_mut() {
            if let Some(t) = v.tiles_mut() {
                t.committed();
            }
        }
        for s in self.sources.iter_mut() {
            // Only informs outside tools (consumer-group lag); the offsets
            // that count are the ones just committed with the state.
            if let Err(e) = s.src.committed() {
                tracing::warn!(source = %s.name, error = %e, "could not report committed positions");
            }
        }
        for v in &self.views {
            if let (Some(w), Some(s)) = (
                self.live.watermarks.get(v.name()),
                self.sources.iter().find(|s| s.name == v.plan.source),
            ) {
                w.store(s.watermark.watermark(), Ordering::Release);
                if let (Some(n), Some(t)) = (
                    self.live.freshness.newest.get(v.name()),
                    s.watermark.max_event_time(),
                ) {
                    n.store(t, Ordering::Release);
                }
            }
        }
        self.live
            .freshness
            .last_checkpoint_ms
            .store(wall_ms(), Ordering::Release);
        self.stats.checkpoints += 1;
        self.stats.rows_emitted = self.views.iter().map(|v| v.emitted_rows).sum();
        for (view, _, keys) in self.state_sizes() {
            metrics::gauge!("sluice_state_keys", "view" => view).set(keys as f64);
        }
        let took = t0.elapsed();
        self.stats.checkpoint_time += took;
        self.stats.checkpoint_max = self.stats.checkpoint_max.max(took);
        self.last_checkpoint = Instant::now();
        metrics::counter!("sluice_checkpoints_total").increment(1);
        metrics::histogram!("sluice_checkpoint_duration_seconds")
            .record(t0.elapsed().as_secs_f64());
        Ok(())
    }

    /// Open panes and keys per view (for reports).
    pub fn state_sizes(&self) -> Vec<(String, usize, usize)> {
        self.views
            .iter()
            .filter_map(|v| {
                v.agg()
                    .map(|a| (v.name().to_string(), a.sizes().0, a.sizes().1))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use arrow::array::{StringArray, TimestampMillisecondArray};
    use arrow::datatypes::SchemaRef;

    use super::*;
    use crate::source::SourceBatch;

    /// Rows `(user_id = "u", ts)` of the tests' `clicks` source.
    fn clicks(schema: &SchemaRef, ts: impl Iterator<Item = i64>) -> Result<RecordBatch> {
        let ts = TimestampMillisecondArray::from_iter_values(ts);
        let users = StringArray::from_iter_values((0..ts.len()).map(|_| "u"));
        RecordBatch::try_new(Arc::clone(schema), vec![Arc::new(users), Arc::new(ts)])
            .map_err(|e| EngineError::arrow("test", e))
    }

    /// A job of `plan` over `src` in a fresh state dir (kept while the
    /// returned guard lives).
    fn open_job(plan: &sluice_sql::PipelinePlan, src: Box<dyn Source>) -> (Job, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tmp");
        let job = Job::open(
            plan,
            vec![src],
            HashMap::new(),
            Box::new(NoDead),
            JobOptions::new(dir.path().join("state")),
        )
        .expect("open");
        (job, dir)
    }

    /// A source with several partitions: scripted batches, then idle polls.
    struct Parts {
        schema: SchemaRef,
        parts: Vec<u32>,
        /// Rows `(partition, ts)`; an empty step is 100 ms of idle polls.
        steps: VecDeque<Vec<(u32, i64)>>,
        idle_until: Option<Instant>,
    }

    impl Source for Parts {
        fn name(&self) -> &str {
            "clicks"
        }
        fn schema(&self) -> SchemaRef {
            Arc::clone(&self.schema)
        }
        fn seek(&mut self, _: Option<&[u8]>) -> Result<()> {
            Ok(())
        }
        fn poll(&mut self, _: usize) -> Result<Poll> {
            if let Some(until) = self.idle_until {
                if Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(5));
                    return Ok(Poll::Idle);
                }
                self.idle_until = None;
            }
            if let Some(rows) = self.steps.pop_front() {
                if rows.is_empty() {
                    self.idle_until = Some(Instant::now() + Duration::from_millis(100));
                    return Ok(Poll::Idle);
                }
                let batch = clicks(&self.schema, rows.iter().map(|r| r.1))?;
                return Ok(Poll::Data {
                    batch: Some(SourceBatch {
                        batch,
                        row_positions: vec![0; rows.len()],
                        partitions: rows.iter().map(|r| r.0).collect(),
                    }),
                    rejected: Vec::new(),
                });
            }
            Ok(Poll::End)
        }
        fn position(&self) -> Vec<u8> {
            Vec::new()
        }
        fn describe_position(&self, p: u64) -> String {
            p.to_string()
        }
        fn partitions(&self) -> Vec<u32> {
            self.parts.clone()
        }
    }

    struct NoDead;
    impl DeadLetterSink for NoDead {
        fn write(&mut self, _: &DeadLetter) -> Result<()> {
            Ok(())
        }
        fn commit(&mut self) -> Result<u64> {
            Ok(0)
        }
        fn recover(&mut self, _: u64) -> Result<()> {
            Ok(())
        }
    }

    /// Runs two-partition input and returns the committed watermark.
    fn watermark_after(idle: &str, steps: Vec<Vec<(u32, i64)>>) -> Option<i64> {
        let sql = format!(
            "CREATE SOURCE clicks (user_id TEXT NOT NULL, ts TIMESTAMP NOT NULL,
               WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)
             WITH (connector = 'kafka', topic = 't', brokers = '127.0.0.1:1'{idle});
             CREATE FEATURE VIEW v KEY user_id AS SELECT user_id, COUNT(*) AS n
             FROM clicks GROUP BY user_id, TUMBLE(ts, INTERVAL '1' MINUTE);"
        );
        let plan =
            sluice_sql::plan_pipeline("t.sql", &sql, std::path::Path::new(".")).expect("plan");
        let src = Parts {
            schema: Arc::clone(&plan.sources[0].schema),
            parts: vec![0, 1],
            steps: steps.into(),
            idle_until: None,
        };
        let (mut job, _dir) = open_job(&plan, Box::new(src));
        job.run(&AtomicBool::new(false)).expect("run");
        job.live().watermark("v")
    }

    fn rows(p: u32, secs: std::ops::RangeInclusive<i64>) -> Vec<(u32, i64)> {
        secs.map(|s| (p, s * 1000)).collect()
    }

    #[test]
    fn watermark_is_the_minimum_over_partitions() {
        // Partition 0 runs to 120 s, partition 1 only to 30 s.
        let wm = watermark_after("", vec![rows(0, 0..=120), rows(1, 0..=30)]);
        assert_eq!(wm, Some(29_000));
    }

    #[test]
    fn a_partition_without_data_holds_the_watermark() {
        let wm = watermark_after("", vec![rows(0, 0..=120), vec![], rows(0, 121..=180)]);
        assert_eq!(wm, None);
    }

    #[test]
    fn an_idle_partition_stops_holding_it_after_idle_timeout() {
        let steps = vec![
            rows(0, 0..=120),
            rows(1, 0..=30),
            vec![],
            rows(0, 121..=180),
        ];
        // Without idle_timeout partition 1 holds the watermark at 30 s - 1 s.
        assert_eq!(watermark_after("", steps.clone()), Some(29_000));
        // With it, partition 1 is idle after 50 ms; p0's later data moves it.
        let wm = watermark_after(", idle_timeout = '50ms'", steps);
        assert_eq!(wm, Some(179_000));
        // A partition that never had data is idle too.
        let wm = watermark_after(
            ", idle_timeout = '50ms'",
            vec![rows(0, 0..=120), vec![], rows(0, 121..=180)],
        );
        assert_eq!(wm, Some(179_000));
    }

    /// Rows `0..total` in batches of 10; positions are the row count. After
    /// the first batch, `failures` polls fail — each after consuming a batch
    /// it never returns — with `error`.
    struct Flaky {
        schema: SchemaRef,
        next: i64,
        total: i64,
        failures: usize,
        error: fn() -> EngineError,
    }

    impl Source for Flaky {
        fn name(&self) -> &str {
            "clicks"
        }
        fn schema(&self) -> SchemaRef {
            Arc::clone(&self.schema)
        }
        fn seek(&mut self, pos: Option<&[u8]>) -> Result<()> {
            self.next = pos
                .and_then(|p| p.try_into().ok())
                .map(i64::from_be_bytes)
                .unwrap_or(0);
            Ok(())
        }
        fn poll(&mut self, _: usize) -> Result<Poll> {
            if self.next >= self.total {
                return Ok(Poll::End);
            }
            let from = self.next;
            self.next = (from + 10).min(self.total);
            if from > 0 && self.failures > 0 {
                self.failures -= 1;
                return Err((self.error)());
            }
            let batch = clicks(&self.schema, (from..self.next).map(|i| i * 1000))?;
            Ok(Poll::Data {
                batch: Some(SourceBatch {
                    batch,
                    row_positions: (from..self.next).map(|i| i as u64).collect(),
                    partitions: Vec::new(),
                }),
                rejected: Vec::new(),
            })
        }
        fn position(&self) -> Vec<u8> {
            self.next.to_be_bytes().to_vec()
        }
        fn describe_position(&self, p: u64) -> String {
            p.to_string()
        }
    }

    fn run_flaky(failures: usize, error: fn() -> EngineError) -> (Result<RunStats>, Duration) {
        let sql = "CREATE SOURCE clicks (user_id TEXT NOT NULL, ts TIMESTAMP NOT NULL,
               WATERMARK FOR ts AS ts) WITH (connector = 'file', path = 'x.jsonl');
             CREATE FEATURE VIEW v KEY user_id AS SELECT user_id, COUNT(*) AS n
             FROM clicks GROUP BY user_id;";
        let plan =
            sluice_sql::plan_pipeline("t.sql", sql, std::path::Path::new(".")).expect("plan");
        let src = Flaky {
            schema: Arc::clone(&plan.sources[0].schema),
            next: 0,
            total: 100,
            failures,
            error,
        };
        let (mut job, _dir) = open_job(&plan, Box::new(src));
        let t0 = Instant::now();
        let r = job.run(&AtomicBool::new(false));
        (r, t0.elapsed())
    }

    #[test]
    fn an_external_poll_error_is_retried_with_backoff_from_the_last_good_position() {
        let broker_away = || EngineError::Connector {
            what: "source clicks".into(),
            message: "broker away".into(),
        };
        let (r, took) = run_flaky(3, broker_away);
        let stats = r.expect("the job survives the outage");
        // Every row exactly once: the batches consumed by failed polls are read again.
        assert_eq!(stats.events, 100);
        // Backoff 100 + 200 + 400 ms.
        assert!(took >= Duration::from_millis(700), "{took:?}");
    }

    #[test]
    fn an_internal_poll_error_ends_the_job() {
        let bug = || EngineError::Internal("broken invariant".into());
        let (r, _) = run_flaky(1, bug);
        let e = r.expect_err("not retried");
        assert_eq!(e.domain(), crate::error::ErrorDomain::Internal);
        assert_eq!(e.retry(), RetryHint::Never);
    }
}
