//! Backfill: a pipeline's feature views over bounded history.
//!
//! One reader thread decodes the input in order (files sorted by path) and
//! computes, row by row, the watermark `sluice run` would have had: the
//! source's largest event time so far less its watermark delay. The
//! late-event rule is applied with it exactly as streaming applies it, so an
//! event streaming drops as late is dead-lettered here too (`include_late`
//! keeps every window open until the end instead).
//!
//! Rows are then hashed by the view's key onto one worker per core. Each
//! worker runs the same pane-based window operator as the streaming job:
//! per-slide partial aggregates in DataFusion accumulators, merged with
//! `merge_batch` when a window closes, so an event is aggregated once however
//! many hop windows hold it, and the output equals streaming's row for row.
//! What only a long-running job needs is skipped: no RocksDB writes per
//! checkpoint, the online store written once at the end with each key's
//! latest row. Memory is bounded by the open windows (keys × panes of one
//! window), not by the input.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use arrow::array::{BooleanArray, RecordBatch};
use sluice_sql::{PipelinePlan, SourcePlan, ViewPlan};

use crate::error::{EngineError, Result};
use crate::exec::Rows;
use crate::ingest::Ingest;
use crate::online::{ViewMeta, view_meta_key, watermark_key};
use crate::output::OnlineRow;
use crate::source::{DeadLetter, DeadLetterSink, OfflineSink, Poll, Source};
use crate::store::{Commit, Store};
use crate::time::fmt_ts;
use crate::view::ViewOp;
use crate::watermark::{NO_WATERMARK, WatermarkTracker};

/// A caller's progress display: called about twice a second with the
/// source's name, the rows read so far and the newest event time (ms), and
/// once more with `done` set when the source is read.
pub type ProgressFn = std::sync::Arc<dyn Fn(&ProgressReport<'_>) + Send + Sync>;

/// What a [`ProgressFn`] is told.
#[derive(Debug, Clone, Copy)]
pub struct ProgressReport<'a> {
    /// The source being read.
    pub source: &'a str,
    /// Rows read so far.
    pub rows: u64,
    /// The newest event time read so far (ms).
    pub event_time: Option<i64>,
    /// The source is read to its end.
    pub done: bool,
}

/// How progress is shown.
#[derive(Clone)]
pub enum Progress {
    /// A line redrawn in place twice a second (a terminal).
    Terminal,
    /// A log line every 10 seconds.
    Log,
    /// Nothing.
    Off,
    /// The caller's display (a notebook's progress bar).
    Report(ProgressFn),
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Progress::Terminal => "Terminal",
            Progress::Log => "Log",
            Progress::Off => "Off",
            Progress::Report(_) => "Report",
        })
    }
}

impl Progress {
    /// `Terminal` when standard error is a terminal, else `Log`.
    pub fn auto() -> Self {
        if std::io::stderr().is_terminal() {
            Progress::Terminal
        } else {
            Progress::Log
        }
    }
}

/// What a backfill covers and how it runs.
#[derive(Debug, Clone)]
pub struct BackfillOptions {
    /// Emit only windows starting at or after this time (ms); earlier events are skipped.
    pub from: Option<i64>,
    /// Close every window ending at or before this time (ms) and emit nothing later.
    pub to: Option<i64>,
    /// Fold late events in instead of dead-lettering them.
    pub include_late: bool,
    /// Worker threads (key shards).
    pub threads: usize,
    /// Rows per source poll.
    pub batch_rows: usize,
    /// Emitted rows buffered per worker and view before a lake file is written.
    pub flush_rows: usize,
    /// Progress display.
    pub progress: Progress,
}

impl Default for BackfillOptions {
    fn default() -> Self {
        BackfillOptions {
            from: None,
            to: None,
            include_late: false,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            batch_rows: 8192,
            flush_rows: 1 << 20,
            progress: Progress::Off,
        }
    }
}

/// Opens the lake output of a view for one worker (`None`: the view has no lake).
pub type LakeFactory<'a> =
    dyn Fn(&ViewPlan, usize) -> Result<Option<Box<dyn OfflineSink>>> + Sync + 'a;

/// Where a backfill writes.
pub struct BackfillOutputs<'a> {
    /// The lake writer of a view for a worker.
    pub lake: &'a LakeFactory<'a>,
    /// Dead letters (undecodable and late records).
    pub dead: Box<dyn DeadLetterSink>,
    /// The online store, for `--online`: each key's latest row.
    pub online: Option<&'a Store>,
}

/// What one view produced.
#[derive(Debug, Clone, Default)]
pub struct ViewStats {
    /// View name.
    pub name: String,
    /// Rows emitted (lake rows).
    pub rows: u64,
    /// Keys written to the online store.
    pub online_keys: u64,
    /// `(rule, emitted rows failing it)` per `expect` rule.
    pub expect_failures: Vec<(String, u64)>,
}

/// What a backfill did.
#[derive(Debug, Clone, Default)]
pub struct BackfillStats {
    /// Rows decoded from the sources.
    pub events: u64,
    /// Records dead-lettered (undecodable, late).
    pub dead_letters: u64,
    /// Late events (also counted in `dead_letters` unless `include_late`).
    pub late: u64,
    /// Per view.
    pub views: Vec<ViewStats>,
    /// Wall time.
    pub elapsed: Duration,
    /// The watermark each source ended with (ms).
    pub watermarks: Vec<(String, Option<i64>)>,
}

/// Runs every view of `plan` whose source is in `sources` over that input.
pub fn backfill(
    plan: &PipelinePlan,
    sources: Vec<Box<dyn Source>>,
    outputs: BackfillOutputs<'_>,
    opts: &BackfillOptions,
) -> Result<BackfillStats> {
    let started = Instant::now();
    let mut stats = BackfillStats::default();
    let mut dead = outputs.dead;
    let mut online_rows: Vec<(String, Vec<OnlineRow>)> = Vec::new();
    let mut metas = Vec::new();
    for mut src in sources {
        let Some(sp) = plan.source(src.name()) else {
            return Err(EngineError::Connector {
                what: format!("source {}", src.name()),
                message: "not declared in the pipeline".into(),
            });
        };
        let views: Vec<&ViewPlan> = plan.views.iter().filter(|v| v.source == sp.name).collect();
        let out = run_source(
            src.as_mut(),
            sp,
            &views,
            outputs.lake,
            outputs.online,
            dead.as_mut(),
            opts,
            &mut stats,
        )?;
        for ((v, rows), meta) in views.iter().zip(out.online).zip(out.metas) {
            if outputs.online.is_some() && v.online {
                let meta = serde_json::to_vec(&meta).map_err(|e| EngineError::Connector {
                    what: format!("online store, view `{}`", v.name),
                    message: e.to_string(),
                })?;
                metas.push((view_meta_key(&v.name), meta));
                online_rows.push((v.name.clone(), rows));
            }
        }
        if let Some(w) = out.watermark {
            metas.push((watermark_key(&sp.name), w.to_be_bytes().to_vec()));
        }
        stats.watermarks.push((sp.name.clone(), out.watermark));
    }
    dead.commit()?;
    if let Some(store) = outputs.online {
        for (view, rows) in &online_rows {
            if let Some(s) = stats.views.iter_mut().find(|s| &s.name == view) {
                s.online_keys = rows.len() as u64;
            }
        }
        metas.push((
            crate::checkpoint::PIPELINE_KEY.into(),
            plan.text.as_bytes().to_vec(),
        ));
        let c = Commit {
            meta: metas,
            online: online_rows,
            ..Commit::default()
        };
        store.commit(c)?;
        store.flush()?;
        // Tiled views seed tiles, not rows: their keys are the tiles' keys.
        for v in plan.views.iter().filter(|v| crate::tiles::is_tiled(v)) {
            if let Some(s) = stats.views.iter_mut().find(|s| s.name == v.name) {
                s.online_keys = store.tile_keys(&v.name)?;
            }
        }
    }
    stats.elapsed = started.elapsed();
    Ok(stats)
}

/// Writes a poll's dead letters in the order of their records, and counts them.
fn write_letters(
    dead: &mut dyn DeadLetterSink,
    letters: &mut Vec<DeadLetter>,
    stats: &mut BackfillStats,
) -> Result<()> {
    crate::source::sort_by_position(letters);
    for d in letters.drain(..) {
        stats.dead_letters += 1;
        metrics::counter!("sluice_dead_letters_total", "source" => d.source.clone(), "kind" => d.kind.as_str()).increment(1);
        dead.write(&d)?;
    }
    Ok(())
}

fn poisoned() -> EngineError {
    EngineError::Connector {
        what: "backfill".into(),
        message: "a worker thread panicked".into(),
    }
}

enum Msg {
    /// Staged, non-late rows of view `view` for this worker.
    Rows { view: usize, rows: Box<Rows> },
    /// The source watermark moved: fire the windows it closes.
    Advance(i64),
    /// End of input: close windows through `fire`, emit lifetime rows as of `end`.
    Finish { fire: Option<i64>, end: Option<i64> },
}

struct SourceOut {
    /// Per view: each key's latest online row.
    online: Vec<Vec<OnlineRow>>,
    /// Per view: what a reader of the online store needs.
    metas: Vec<ViewMeta>,
    watermark: Option<i64>,
}

struct WorkerOut {
    rows: Vec<u64>,
    online: Vec<HashMap<String, Vec<u8>>>,
    /// Per view, failures per `expect` rule.
    expect: Vec<Vec<(String, u64)>>,
}

#[allow(clippy::too_many_arguments)]
fn run_source(
    src: &mut dyn Source,
    sp: &SourcePlan,
    views: &[&ViewPlan],
    lake: &LakeFactory<'_>,
    online: Option<&Store>,
    dead: &mut dyn DeadLetterSink,
    opts: &BackfillOptions,
    stats: &mut BackfillStats,
) -> Result<SourceOut> {
    let shards = opts.threads.max(1);
    let probes: Vec<ViewOp> = views
        .iter()
        .map(|v| ViewOp::with_tiles(v, None))
        .collect::<Result<_>>()?;
    let mut worker_views = Vec::new();
    for shard in 0..shards {
        let mut ops = Vec::new();
        for v in views {
            let mut op = ViewOp::with_tiles(v, None)?;
            op.window_range = Some((opts.from, opts.to));
            let sink = lake(v, shard)?;
            ops.push((op, sink));
        }
        worker_views.push(ops);
    }
    std::thread::scope(|scope| -> Result<SourceOut> {
        let mut senders: Vec<SyncSender<Msg>> = Vec::new();
        let mut handles = Vec::new();
        for ops in worker_views {
            let (tx, rx) = sync_channel::<Msg>(4);
            senders.push(tx);
            let flush = opts.flush_rows.max(1);
            let online = online.is_some();
            handles.push(scope.spawn(move || worker(rx, ops, flush, online)));
        }
        let mut tiles = Vec::new();
        for v in views {
            tiles.push(match (online, crate::tiles::is_tiled(v), v.kind.clone()) {
                (Some(_), true, sluice_sql::ViewKind::Aggregate(a)) => {
                    let k = std::sync::Arc::new(crate::aggregate::AggKernel::new(
                        &v.name,
                        &a,
                        v.event_time.as_deref(),
                    )?);
                    Some(crate::tiles::TileAgg::new(
                        v,
                        k,
                        crate::tiles::TileMemory::default(),
                    )?)
                }
                _ => None,
            });
        }
        let mut seeds = TileSeeds {
            store: online,
            tiles,
        };
        let read = read_source(src, sp, &probes, &senders, dead, opts, stats, &mut seeds);
        let read = match read {
            Ok(r) => seeds.finish(r.watermark).map(|()| r),
            Err(e) => Err(e),
        };
        // Finish (or, after an error, just stop) the workers.
        if let Ok(r) = &read {
            for tx in &senders {
                let _ = tx.send(Msg::Finish {
                    fire: r.fire,
                    end: r.max_ts,
                });
            }
        }
        drop(senders);
        let mut rows = vec![0u64; views.len()];
        let mut expect: Vec<Vec<(String, u64)>> =
            probes.iter().map(|op| op.expectations.failures()).collect();
        let mut latest: Vec<HashMap<String, Vec<u8>>> = vec![HashMap::new(); views.len()];
        let mut first_err = None;
        for h in handles {
            match h.join() {
                Ok(Ok(w)) => {
                    for (i, n) in w.rows.into_iter().enumerate() {
                        rows[i] += n;
                    }
                    for (i, f) in w.expect.into_iter().enumerate() {
                        for (k, (_, n)) in f.into_iter().enumerate() {
                            if let Some(slot) = expect.get_mut(i).and_then(|e| e.get_mut(k)) {
                                slot.1 += n;
                            }
                        }
                    }
                    for (i, m) in w.online.into_iter().enumerate() {
                        latest[i].extend(m);
                    }
                }
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(poisoned());
                }
            }
        }
        // A worker's own error explains a reader's "worker stopped early".
        if let Some(e) = first_err {
            return Err(e);
        }
        let read = read?;
        for ((v, n), expect_failures) in views.iter().zip(rows).zip(expect) {
            stats.views.push(ViewStats {
                name: v.name.clone(),
                rows: n,
                online_keys: 0,
                expect_failures,
            });
        }
        Ok(SourceOut {
            metas: probes.iter().map(ViewOp::meta).collect::<Result<_>>()?,
            online: latest
                .into_iter()
                .map(|m| m.into_iter().collect())
                .collect(),
            watermark: read.watermark,
        })
    })
}

struct ReadOut {
    /// Where the final watermark (or `--to`) closes windows.
    fire: Option<i64>,
    /// Largest event time of the rows folded in (lifetime rows' time).
    max_ts: Option<i64>,
    /// The source's final watermark, as streaming would have it.
    watermark: Option<i64>,
}

/// The tiles a backfill with `--online` seeds, one per tiled view (in the
/// order of the source's views).
struct TileSeeds<'a> {
    store: Option<&'a Store>,
    tiles: Vec<Option<crate::tiles::TileAgg>>,
}

impl TileSeeds<'_> {
    fn push(&mut self, view: usize, rows: &Rows) {
        if let Some(Some(t)) = self.tiles.get_mut(view) {
            t.push(rows.clone());
        }
    }

    /// Folds what the watermark passed into the store when rows pile up.
    fn maybe_flush(&mut self, wm: i64) -> Result<()> {
        let limit = crate::tiles::TileMemory::default().pending;
        if self
            .tiles
            .iter()
            .flatten()
            .any(|t| t.pending_bytes() > limit)
        {
            self.flush(wm, false)?;
        }
        Ok(())
    }

    fn flush(&mut self, wm: i64, last: bool) -> Result<()> {
        let Some(store) = self.store else {
            return Ok(());
        };
        if wm == NO_WATERMARK && !last {
            return Ok(());
        }
        let mut c = Commit::default();
        for t in self.tiles.iter_mut().flatten() {
            let view = t.view().to_string();
            if wm != NO_WATERMARK {
                let mut w = crate::store::TileWrites::default();
                t.flush(store, wm, &mut w)?;
                c.tiles.push((view.clone(), w));
                c.meta
                    .push((crate::tiles::clock_key(&view), wm.to_be_bytes().to_vec()));
            }
            if last {
                for (g, rows) in t.encode_pending()? {
                    c.meta.push((crate::tiles::pending_key(&view, g), rows));
                }
            }
        }
        if c.tiles.is_empty() && c.meta.is_empty() {
            return Ok(());
        }
        store.commit(c)?;
        for t in self.tiles.iter_mut().flatten() {
            t.committed();
        }
        Ok(())
    }

    fn finish(&mut self, watermark: Option<i64>) -> Result<()> {
        self.flush(watermark.unwrap_or(NO_WATERMARK), true)
    }
}

#[allow(clippy::too_many_arguments)]
fn read_source(
    src: &mut dyn Source,
    sp: &SourcePlan,
    probes: &[ViewOp],
    senders: &[SyncSender<Msg>],
    dead: &mut dyn DeadLetterSink,
    opts: &BackfillOptions,
    stats: &mut BackfillStats,
    seeds: &mut TileSeeds<'_>,
) -> Result<ReadOut> {
    let shards = senders.len();
    let gone = || EngineError::Connector {
        what: format!("backfill of source {}", sp.name),
        message: "a worker stopped early".into(),
    };
    // One ordered stream: one partition, never idle.
    let stages = probes
        .iter()
        .map(ViewOp::stage)
        .collect::<Result<Vec<_>>>()?;
    let clock = WatermarkTracker::new(sp.watermark_delay_ms, None);
    let mut ingest = Ingest::new(sp, stages, clock)?.with_range(opts.from, opts.to);
    if opts.include_late {
        ingest = ingest.without_late_rule();
    }
    let mut max_in: Option<i64> = None;
    let mut progress = ProgressLine::new(&sp.name, opts.progress.clone());
    src.seek(None)?;
    // The letters of one poll, written in the order of their records.
    let mut letters: Vec<DeadLetter> = Vec::new();
    loop {
        write_letters(dead, &mut letters, stats)?;
        let (batch, rejected) =
            match src.poll(opts.batch_rows.clamp(1, crate::job::MAX_POLL_ROWS))? {
                Poll::End => break,
                Poll::Idle => {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                Poll::Data { batch, rejected } => (batch, rejected),
            };
        let describe = |p| src.describe_position(p);
        let Some(acc) = ingest.accept(batch, rejected, &describe, None, &mut letters)? else {
            continue;
        };
        stats.events += acc.rows.len() as u64;
        // The largest event time folded in (lifetime rows' time).
        if let Some(ts) = &acc.rows.ts {
            let (from, to) = (opts.from, opts.to);
            let m = ts
                .values()
                .iter()
                .filter(|t| from.is_none_or(|f| **t >= f) && to.is_none_or(|e| **t < e))
                .max();
            if let Some(m) = m {
                max_in = Some(max_in.map_or(*m, |x| x.max(*m)));
            }
        }
        for (vi, staged) in acc.views.into_iter().enumerate() {
            if staged.is_empty() {
                continue;
            }
            seeds.push(vi, &staged);
            if shards == 1 {
                senders[0]
                    .send(Msg::Rows {
                        view: vi,
                        rows: Box::new(staged),
                    })
                    .map_err(|_| gone())?;
                continue;
            }
            let shard_of: Vec<usize> = ingest.views()[vi]
                .key_groups(&staged)?
                .into_iter()
                .map(|g| usize::from(g) % shards)
                .collect();
            for (s, tx) in senders.iter().enumerate() {
                let mask: BooleanArray = shard_of.iter().map(|x| Some(*x == s)).collect();
                if mask.true_count() == 0 {
                    continue;
                }
                let part = staged.filter(&mask)?;
                tx.send(Msg::Rows {
                    view: vi,
                    rows: Box::new(part),
                })
                .map_err(|_| gone())?;
            }
        }
        let wm = ingest.clock().watermark();
        if !opts.include_late && wm != NO_WATERMARK {
            for tx in senders {
                tx.send(Msg::Advance(wm)).map_err(|_| gone())?;
            }
        }
        seeds.maybe_flush(wm)?;
        progress.update(stats.events, ingest.clock().max_event_time());
    }
    write_letters(dead, &mut letters, stats)?;
    stats.late += ingest.counts.late;
    progress.done(stats.events, ingest.clock().max_event_time());
    let watermark = ingest.clock().get();
    let fire = match (opts.to, opts.include_late) {
        (Some(t), _) => Some(t),
        (None, true) => watermark,
        (None, false) => None,
    };
    Ok(ReadOut {
        fire,
        max_ts: max_in,
        watermark: match (opts.to, watermark) {
            (Some(t), Some(w)) => Some(t.max(w)),
            (t, w) => t.or(w),
        },
    })
}

fn worker(
    rx: Receiver<Msg>,
    mut ops: Vec<(ViewOp, Option<Box<dyn OfflineSink>>)>,
    flush_rows: usize,
    online: bool,
) -> Result<WorkerOut> {
    let n = ops.len();
    let mut out = WorkerOut {
        rows: vec![0; n],
        online: vec![HashMap::new(); n],
        expect: Vec::new(),
    };
    let mut buffered: Vec<Vec<RecordBatch>> = vec![Vec::new(); n];
    let mut buffered_rows = vec![0usize; n];
    let mut seq = vec![0u64; n];
    let mut drain = |i: usize,
                     op: &mut ViewOp,
                     sink: &mut Option<Box<dyn OfflineSink>>,
                     out: &mut WorkerOut,
                     force: bool|
     -> Result<()> {
        for b in op.pending_lake.drain(..) {
            out.rows[i] += b.num_rows() as u64;
            buffered_rows[i] += b.num_rows();
            buffered[i].push(b);
        }
        for (k, v) in op.pending_online.drain(..) {
            if online && op.plan.online {
                out.online[i].insert(k, v);
            }
        }
        if (force && buffered_rows[i] > 0) || buffered_rows[i] >= flush_rows {
            let batches = std::mem::take(&mut buffered[i]);
            buffered_rows[i] = 0;
            if let Some(s) = sink.as_mut() {
                seq[i] += 1;
                s.write_epoch(seq[i], &batches)?;
            }
        }
        Ok(())
    };
    for msg in rx {
        match msg {
            Msg::Rows { view, rows } => {
                let (op, sink) = &mut ops[view];
                op.push(*rows)?;
                drain(view, op, sink, &mut out, false)?;
            }
            Msg::Advance(wm) => {
                for (i, (op, sink)) in ops.iter_mut().enumerate() {
                    op.advance(wm)?;
                    drain(i, op, sink, &mut out, false)?;
                }
            }
            Msg::Finish { fire, end } => {
                for (i, (op, sink)) in ops.iter_mut().enumerate() {
                    if let Some(w) = fire {
                        op.advance(w)?;
                    }
                    op.before_checkpoint(end)?;
                    drain(i, op, sink, &mut out, true)?;
                }
            }
        }
    }
    out.expect = ops
        .iter()
        .map(|(op, _)| op.expectations.failures())
        .collect();
    Ok(out)
}

/// Rows read, rate and event time reached, redrawn on a terminal.
struct ProgressLine {
    source: String,
    mode: Progress,
    started: Instant,
    last: Instant,
}

impl ProgressLine {
    fn new(source: &str, mode: Progress) -> Self {
        let now = Instant::now();
        ProgressLine {
            source: source.to_string(),
            mode,
            started: now,
            last: now,
        }
    }

    fn line(&self, rows: u64, ts: Option<i64>) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let t = ts
            .map(|t| fmt_ts(t).as_str().unwrap_or_default().to_string())
            .unwrap_or_else(|| "-".into());
        format!(
            "backfill {}: {} rows, {:.0} rows/s, event time {}",
            self.source,
            rows,
            rows as f64 / secs,
            t
        )
    }

    fn update(&mut self, rows: u64, ts: Option<i64>) {
        let every = match self.mode {
            Progress::Terminal | Progress::Report(_) => Duration::from_millis(500),
            Progress::Log => Duration::from_secs(10),
            Progress::Off => return,
        };
        if self.last.elapsed() < every {
            return;
        }
        self.last = Instant::now();
        let mut e = std::io::stderr();
        let _ = match &self.mode {
            Progress::Terminal => write!(e, "\r\x1b[2K{}", self.line(rows, ts)),
            Progress::Log => writeln!(e, "{}", self.line(rows, ts)),
            Progress::Report(f) => {
                f(&self.report(rows, ts, false));
                Ok(())
            }
            Progress::Off => Ok(()),
        };
    }

    fn report(&self, rows: u64, ts: Option<i64>, done: bool) -> ProgressReport<'_> {
        ProgressReport {
            source: &self.source,
            rows,
            event_time: ts,
            done,
        }
    }

    fn done(&mut self, rows: u64, ts: Option<i64>) {
        match &self.mode {
            Progress::Terminal => {
                let l = self.line(rows, ts);
                let _ = writeln!(std::io::stderr(), "\r\x1b[2K{l}");
            }
            Progress::Report(f) => f(&self.report(rows, ts, true)),
            Progress::Log | Progress::Off => {}
        }
    }
}
