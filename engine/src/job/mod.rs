//! The streaming job: the driver of `sluice run`. It polls the sources,
//! takes their rows through the ingest stage (`crate::ingest`: rules, event
//! time, watermark, views' stages and late rule, dead letters), hands each
//! view's rows to the worker that owns their key group (`crate::worker`),
//! and orders the epochs: at a checkpoint every worker hands back its
//! changes at one barrier, and the job makes the epoch durable (lake and
//! archive files first, then the vector indexes, then one RocksDB write
//! batch with state, online rows, positions and watermarks).

mod epoch;
mod open;
mod sources;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::error::{EngineError, Result};
use crate::live::Live;
use crate::online::ViewMeta;
use crate::source::{DeadLetter, DeadLetterSink, OfflineSink, Poll};
use crate::tiles::TileMemory;
use crate::worker::Workers;
use epoch::Archive;
use sources::SourceRt;

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
mod tests;
