//! The streaming job: the driver of `sluice run`. It polls the sources,
//! takes their rows through the ingest stage (`crate::ingest`: rules, event
//! time, watermark, views' stages and late rule, dead letters), hands each
//! view's rows to the worker that owns their key group (`crate::worker`),
//! and orders the epochs: at a checkpoint every worker hands back its
//! changes at one barrier, and the job makes the epoch durable (lake and
//! archive files first, then the vector indexes, then one RocksDB write
//! batch with state, online rows, positions and watermarks).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use arrow::array::{BooleanArray, Int64Array, RecordBatch};
use arrow::datatypes::SchemaRef;
use sluice_sql::PipelinePlan;

use crate::checkpoint::{
    Checkpoint, PIPELINE_KEY, STATE_FORMAT, SourceProgress, ViewProgress, catch_up_key,
};
use crate::error::{EngineError, Result, RetryHint};
use crate::ingest::{Accepted, Ingest};
use crate::live::{Freshness, Live, view_change, wall_ms};
use crate::online::{ViewMeta, read_view_meta, view_meta_key};
use crate::source::{DeadLetter, DeadLetterSink, OfflineSink, Poll, Source};
use crate::store::{Commit, Store};
use crate::tiles::{TileMemory, TileReader, is_tiled};
use crate::vector::VectorIndex;
use crate::view::ViewOp;
use crate::watermark::{NO_WATERMARK, WatermarkTracker};
use crate::worker::{ViewMark, Workers};

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

/// The default number of workers: one per core.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
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
    /// Worker threads holding the views' state (`--workers`); at most
    /// [`crate::keys::KEY_GROUPS`].
    pub workers: usize,
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
            workers: default_workers(),
        }
    }
}

struct SourceRt {
    src: Box<dyn Source>,
    name: String,
    /// Rules, clock, the views' stages.
    ingest: Ingest,
    done: bool,
    /// The views reading it, in the ingest's order.
    views: Vec<usize>,
    /// The watermark the workers were last told.
    advanced: i64,
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
}

/// A source's event archive: the rows it accepted, written with each
/// checkpoint (see [`crate::archive::archive_schema`]).
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
            self.ingest.clock_mut().add_partition(id, now);
        }
        self.last_parts_refresh = now;
    }

    fn clock(&self) -> &WatermarkTracker {
        self.ingest.clock()
    }

    fn progress(&self) -> SourceProgress {
        SourceProgress {
            position: self.src.position(),
            watermark: self.clock().get(),
            max_event_time: self.clock().max_event_time(),
            partitions: self.clock().partitions(),
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

/// A view, as the job sees it (its state lives in the workers).
struct ViewRt {
    name: String,
    /// Index of its source.
    source: usize,
    /// Its reader metadata, written with every checkpoint.
    meta: ViewMeta,
}

/// A running pipeline.
pub struct Job {
    sources: Vec<SourceRt>,
    views: Vec<ViewRt>,
    workers: Workers,
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
    /// Per view, each `expect` rule's failing rows, as of the last checkpoint.
    expectations: Vec<Vec<(String, u64)>>,
    /// Per view, open panes and keys of its pane operator, as of the last checkpoint.
    sizes: Vec<Option<(usize, usize)>>,
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
        let mut stages: Vec<Vec<crate::ingest::ViewStage>> =
            plan.sources.iter().map(|_| Vec::new()).collect();
        let mut metas = HashMap::new();
        let mut catch_up = HashMap::new();
        let mut indexes = HashMap::new();
        let mut readers = HashMap::new();
        for vp in &plan.views {
            // The view's stateless half and reader; its state is the workers'.
            let probe = ViewOp::with_tiles(vp, None)?;
            let source = plan
                .sources
                .iter()
                .position(|s| s.name == vp.source)
                .ok_or_else(|| {
                    EngineError::Internal(format!("view `{}` reads no known source", vp.name))
                })?;
            stages[source].push(probe.stage()?);
            if let (Some(k), true) = (probe.kernel(), is_tiled(vp)) {
                readers.insert(
                    vp.name.clone(),
                    Arc::new(TileReader::new(vp, Arc::clone(k))?),
                );
            }
            if let Some(vi) = &vp.vector_index {
                let idx = VectorIndex::open(&opts.state_dir, &vp.name, vi)?;
                if idx.epoch()? != Some(epoch) {
                    let wm = cp.sources.get(&vp.source).and_then(|s| s.watermark);
                    let st = crate::vector::rebuild_from_store(&idx, &store, epoch, wm)?;
                    tracing::info!(view = %vp.name, keys = st.upserts, "vector index rebuilt from the online store");
                }
                indexes.insert(vp.name.clone(), Arc::new(idx));
            }
            let meta = probe.meta()?;
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
            metas.insert(vp.name.clone(), meta.clone());
            views.push(ViewRt {
                name: vp.name.clone(),
                source,
                meta,
            });
        }
        let emitted: Vec<Option<i64>> = plan
            .views
            .iter()
            .map(|v| cp.views.get(&v.name).and_then(|p| p.emitted_through))
            .collect();
        let workers = Workers::start(
            plan,
            opts.workers,
            &store,
            tile_memory,
            &emitted,
            &|op: &mut ViewOp| {
                if op.plan.vector_index.is_some() {
                    op.keep_vector_updates();
                }
            },
        )?;
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
        for ((sp, mut src), stages) in plan.sources.iter().zip(sources).zip(stages) {
            let progress = cp.sources.get(&sp.name).cloned().unwrap_or_default();
            src.seek((!progress.position.is_empty()).then_some(progress.position.as_slice()))?;
            let mut clock = WatermarkTracker::new(
                sp.watermark_delay_ms,
                sp.idle_timeout_ms
                    .map(|ms| Duration::from_millis(ms.max(0) as u64)),
            );
            clock.restore(
                progress.watermark,
                progress.max_event_time,
                &progress.partitions,
                now,
            );
            let advanced = clock.watermark();
            let mut rt = SourceRt {
                src,
                name: sp.name.clone(),
                ingest: Ingest::new(sp, stages, clock)?,
                done: false,
                views: plan
                    .views
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.source == sp.name)
                    .map(|(i, _)| i)
                    .collect(),
                advanced,
                last_parts_refresh: now,
                down: None,
                last_good: Vec::new(),
                retry: None,
                archive: None,
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
                    .map(|s| s.clock().watermark())
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
                            .and_then(|s| s.clock().max_event_time())
                            .unwrap_or(NO_WATERMARK);
                        (v.name.clone(), AtomicI64::new(t))
                    })
                    .collect(),
                last_checkpoint_ms: AtomicI64::new(0),
            },
            catch_up,
            versions: crate::reader::versions_of(plan),
            served: plan
                .views
                .iter()
                .filter_map(|v| {
                    v.log_served
                        .map(|f| (v.name.clone(), Arc::new(crate::served::ServedLog::new(f))))
                })
                .collect(),
        });
        let n = plan.views.len();
        Ok(Job {
            sources: rts,
            views,
            workers,
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
            expectations: vec![Vec::new(); n],
            sizes: vec![None; n],
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

    /// Worker threads holding the views' state.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// `(view, rule, emitted rows failing it)` for every `expect` rule,
    /// since this process started (as of the last checkpoint).
    pub fn expectation_failures(&self) -> Vec<(String, String, u64)> {
        self.views
            .iter()
            .zip(&self.expectations)
            .flat_map(|(v, f)| f.iter().map(|(rule, n)| (v.name.clone(), rule.clone(), *n)))
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
            schema: crate::archive::archive_schema(&s.src.schema()),
            rows: Vec::new(),
            clock: s.clock().get(),
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
                        let mut letters = std::mem::take(&mut self.letters);
                        let s = &mut self.sources[si];
                        let src = &s.src;
                        let describe = |p| src.describe_position(p);
                        let accepted =
                            s.ingest
                                .accept(batch, rejected, &describe, None, &mut letters);
                        self.letters = letters;
                        if let Some(acc) = accepted? {
                            got_rows = true;
                            self.on_accepted(si, acc)?;
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
        // An empty WAL: `sluice get` and Python open the dir at once.
        self.live.store.flush()?;
        self.stats.elapsed = started.elapsed();
        Ok(self.stats.clone())
    }

    /// Rows waiting for the watermark have outgrown their share of the
    /// memory budget: time to fold what the watermark passed into tiles.
    fn tiles_over_budget(&self) -> bool {
        (0..self.views.len())
            .any(|v| self.workers.pending_bytes(v) > self.tile_memory.pending as u64)
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
                    s.clock()
                        .max_event_time()
                        .map(|t| crate::time::fmt_ts(t).to_string())
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

    /// Writes the dead letters of a poll, in the order of their records,
    /// and counts them.
    fn write_letters(&mut self) -> Result<()> {
        if self.letters.is_empty() {
            return Ok(());
        }
        let mut letters = std::mem::take(&mut self.letters);
        crate::source::sort_by_position(&mut letters);
        for d in &letters {
            self.stats.dead_letters += 1;
            metrics::counter!("sluice_dead_letters_total", "source" => d.source.clone(), "kind" => d.kind.as_str()).increment(1);
            self.dead.write(d)?;
        }
        letters.clear();
        self.letters = letters;
        Ok(())
    }

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

    /// Marks a source down or up again (for `/readyz` and metrics).
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
        if s.ingest.clock_mut().refresh(now).is_none() {
            return Ok(());
        }
        self.advance(si)
    }

    /// Tells the workers the source's watermark, when it moved.
    fn advance(&mut self, si: usize) -> Result<()> {
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
    fn on_accepted(&mut self, si: usize, acc: Accepted) -> Result<()> {
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

    /// Takes a checkpoint: every worker's changes at one barrier; lake and
    /// archive files of the epoch made durable, the vector indexes, then
    /// one RocksDB write batch with state, online rows, positions and
    /// watermarks.
    pub fn checkpoint(&mut self) -> Result<()> {
        let t0 = Instant::now();
        let epoch = self.epoch + 1;
        self.write_letters()?;
        let marks: Vec<ViewMark> = self
            .views
            .iter()
            .map(|v| {
                let c = self.sources[v.source].clock();
                ViewMark {
                    wm: c.watermark(),
                    end: c.max_event_time(),
                }
            })
            .collect();
        let mut parts = self.workers.barrier(&marks)?;
        for (vi, lake) in self.lakes.iter_mut().enumerate() {
            let batches: Vec<RecordBatch> = parts
                .iter_mut()
                .flat_map(|p| std::mem::take(&mut p[vi].lake))
                .collect();
            if batches.is_empty() {
                continue;
            }
            for l in lake.iter_mut() {
                l.write_epoch(epoch, &batches)?;
            }
        }
        for s in self.sources.iter_mut() {
            let clock = s.clock().get();
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
        let mut vectors = Vec::with_capacity(self.views.len());
        let mut emitted_rows = 0;
        for (vi, v) in self.views.iter().enumerate() {
            let wm = marks[vi].wm;
            let mut progress = ViewProgress::default();
            let mut rows = Vec::new();
            let mut ops = Vec::new();
            let mut updates = Vec::new();
            let mut expect: BTreeMap<String, u64> = BTreeMap::new();
            let mut sizes: Option<(usize, usize)> = None;
            for p in parts.iter_mut() {
                let vp = &mut p[vi];
                if let Some(w) = vp.tiles.take() {
                    c.tiles.push((v.name.clone(), w));
                    progress.clock = Some(wm);
                }
                c.meta.append(&mut vp.pending);
                ops.append(&mut vp.state);
                rows.append(&mut vp.online);
                updates.append(&mut vp.vectors);
                progress.emitted_through = progress.emitted_through.max(vp.emitted_through);
                emitted_rows += vp.emitted_rows;
                for (rule, n) in vp.expect.drain(..) {
                    *expect.entry(rule).or_default() += n;
                }
                if let Some((panes, keys)) = vp.sizes {
                    let (p0, k0) = sizes.unwrap_or_default();
                    sizes = Some((p0.max(panes), k0 + keys));
                }
            }
            c.state.push((v.name.clone(), ops));
            metrics::counter!("sluice_online_writes_total", "view" => v.name.clone())
                .increment(rows.len() as u64);
            c.online.push((v.name.clone(), rows));
            cp.views.insert(v.name.clone(), progress);
            if let Ok(j) = serde_json::to_vec(&v.meta) {
                c.meta.push((view_meta_key(&v.name), j));
            }
            if let Some(at) = self.live.catch_up.get(&v.name) {
                c.meta
                    .push((catch_up_key(&v.name), at.to_be_bytes().to_vec()));
            }
            self.expectations[vi] = expect.into_iter().collect();
            self.sizes[vi] = sizes;
            vectors.push(updates);
        }
        for s in &self.sources {
            cp.sources.insert(s.name.clone(), s.progress());
        }
        c.meta.extend(cp.entries()?);
        c.meta
            .push((PIPELINE_KEY.into(), self.pipeline_text.as_bytes().to_vec()));
        // The indexes commit first: a crash before the state commit leaves
        // them one epoch ahead, and the next start rebuilds them.
        for ((vi, v), updates) in self.views.iter().enumerate().zip(vectors) {
            let Some(idx) = self.live.indexes.get(&v.name) else {
                continue;
            };
            let wm = (marks[vi].wm != NO_WATERMARK).then_some(marks[vi].wm);
            let t = Instant::now();
            let st = idx.apply(epoch, &updates, wm, false)?;
            metrics::counter!("sluice_index_updates_total", "view" => v.name.clone())
                .increment(st.upserts + st.removals);
            metrics::counter!("sluice_index_expired_total", "view" => v.name.clone())
                .increment(st.expired);
            metrics::histogram!("sluice_index_commit_seconds", "view" => v.name.clone())
                .record(t.elapsed().as_secs_f64());
        }
        if abort_before_state_commit(epoch) {
            std::process::abort();
        }
        self.live.store.commit(c)?;
        self.epoch = epoch;
        self.workers.committed()?;
        for s in self.sources.iter_mut() {
            // Only informs outside tools (consumer-group lag); the offsets
            // that count are the ones just committed with the state.
            if let Err(e) = s.src.committed() {
                tracing::warn!(source = %s.name, error = %e, "could not report committed positions");
            }
        }
        for (vi, v) in self.views.iter().enumerate() {
            if let Some(w) = self.live.watermarks.get(&v.name) {
                w.store(marks[vi].wm, Ordering::Release);
            }
            if let (Some(n), Some(t)) = (self.live.freshness.newest.get(&v.name), marks[vi].end) {
                n.store(t, Ordering::Release);
            }
        }
        self.live
            .freshness
            .last_checkpoint_ms
            .store(wall_ms(), Ordering::Release);
        self.stats.checkpoints += 1;
        self.stats.rows_emitted = emitted_rows;
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

    /// Open panes and keys per view with a pane operator, over the workers
    /// (as of the last checkpoint; for reports).
    pub fn state_sizes(&self) -> Vec<(String, usize, usize)> {
        self.views
            .iter()
            .zip(&self.sizes)
            .filter_map(|(v, s)| s.map(|(p, k)| (v.name.clone(), p, k)))
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
