//! Training-set replays: the value an online read at clock `t` returns,
//! computed for each spine row `(key, t)` by running the event history, in
//! arrival order, through the code `sluice run` uses: the same view
//! operator (stages, late rule), the same tiles and their flush, the same
//! reader. The tiles live in an in-memory [`StateStore`] instead of RocksDB;
//! expiry keeps them to what the windows still need.
//!
//! When a spine time is answered decides which events it sees. A stream's
//! read at clock `t` counts the events accepted before its committed
//! watermark reached `t`. A replay of files computes the watermark row by
//! row as `run` does (largest event time less the delay) and answers `t`
//! right after the row that takes the watermark to `t` or past it. A replay
//! of an event archive uses the watermarks the stream recorded: each
//! archived row carries the watermark its late rule used, and each
//! checkpoint's rows carry the checkpoint's clock, so the replay sees each
//! checkpoint exactly as readers of the stream did.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use arrow::array::{Array, ArrayRef, Int64Array, RecordBatch, new_null_array};
use arrow::datatypes::{Field, Schema};
use sluice_sql::{PipelinePlan, ViewPlan};

use crate::error::{EngineError, Result};
use crate::ingest::Ingest;
use crate::source::{DeadLetter, DeadLetterSink, Poll, Source, SourceBatch};
use crate::store::{Commit, StateStore, TileRead, TileWrites, expiry_key, tile_key, tile_prefix};
use crate::tiles::{ReadMode, TileMemory, TileReader, clock_key, is_tiled};
use crate::view::ViewOp;
use crate::watermark::{NO_WATERMARK, WatermarkTracker};

/// Tiles in memory: the [`StateStore`] of a replay.
#[derive(Default)]
pub struct MemStore {
    inner: Mutex<MemInner>,
}

#[derive(Default)]
struct MemInner {
    meta: HashMap<String, Vec<u8>>,
    tiles: HashMap<String, BTreeMap<Vec<u8>, Vec<u8>>>,
    expiry: HashMap<String, BTreeSet<Vec<u8>>>,
}

impl MemStore {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, MemInner>> {
        self.inner
            .lock()
            .map_err(|_| EngineError::Internal("replay store poisoned".into()))
    }

    /// Tiles held (for reports and tests).
    pub fn tiles(&self) -> usize {
        self.lock()
            .map(|g| g.tiles.values().map(BTreeMap::len).sum())
            .unwrap_or(0)
    }
}

impl StateStore for MemStore {
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.lock()?.meta.get(key).cloned())
    }

    fn online_get(&self, _view: &str, _key: &str) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }

    fn get_tiles(&self, view: &str, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>> {
        let g = self.lock()?;
        let t = g.tiles.get(view);
        Ok(keys
            .iter()
            .map(|k| t.and_then(|t| t.get(k)).cloned())
            .collect())
    }

    fn expired_tiles(&self, view: &str, wm: i64) -> Result<Vec<Vec<u8>>> {
        let g = self.lock()?;
        let Some(ex) = g.expiry.get(view) else {
            return Ok(Vec::new());
        };
        let upper = expiry_key(wm.saturating_add(1), &[]);
        Ok(ex.range(..upper).map(|k| k[8..].to_vec()).collect())
    }

    fn read_tiles(
        &self,
        view: &str,
        key: &str,
        clock_key: &str,
        ranges: &dyn Fn(i64) -> Vec<(u8, i64, i64)>,
    ) -> Result<TileRead> {
        let g = self.lock()?;
        let clock = g
            .meta
            .get(clock_key)
            .and_then(|v| v.as_slice().try_into().ok())
            .map(i64::from_be_bytes);
        let mut out = TileRead {
            clock,
            ..TileRead::default()
        };
        let (Some(clock), Some(tiles)) = (clock, g.tiles.get(view)) else {
            return Ok(out);
        };
        let prefix = tile_prefix(key);
        out.exists = tiles
            .range(prefix.clone()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(&prefix));
        if !out.exists {
            return Ok(out);
        }
        for (level, from, to) in ranges(clock) {
            if from >= to {
                continue;
            }
            let lo = tile_key(key, level, from);
            let hi = tile_key(key, level, to);
            out.states
                .extend(tiles.range(lo..hi).map(|(_, v)| v.clone()));
        }
        Ok(out)
    }

    fn commit(&self, c: Commit) -> Result<()> {
        let mut g = self.lock()?;
        for (view, w) in c.tiles {
            let TileWrites {
                puts,
                expiry,
                deletes,
                expired_through,
            } = w;
            let tiles = g.tiles.entry(view.clone()).or_default();
            for (k, v) in puts {
                tiles.insert(k, v);
            }
            for k in &deletes {
                tiles.remove(k);
            }
            let ex = g.expiry.entry(view).or_default();
            ex.extend(expiry);
            if let Some(t) = expired_through {
                let upper = expiry_key(t.saturating_add(1), &[]);
                let keep = ex.split_off(&upper);
                *ex = keep;
            }
        }
        for (k, v) in c.meta {
            g.meta.insert(k, v);
        }
        Ok(())
    }
}

/// Where a replay's events come from.
pub struct History {
    /// The events, in arrival order.
    pub source: Box<dyn Source>,
    /// The source's batches are an event archive (one batch per checkpoint,
    /// [`archive_columns`] at the end): watermarks and clocks as recorded.
    pub recorded: bool,
}

/// The spine rows of one view: the key as the online API spells it and the time.
#[derive(Debug, Clone)]
pub struct SpineRows {
    /// The view.
    pub view: String,
    /// Per spine row, the key (`None`: a NULL key column).
    pub keys: Vec<Option<String>>,
    /// Per spine row, the time (ms; `None`: NULL or out of range).
    pub times: Vec<Option<i64>>,
}

/// What a replay read for one view's spine rows.
#[derive(Debug)]
pub struct ViewValues {
    /// The view.
    pub view: String,
    /// The view's output columns (keys and features, all nullable), one row
    /// per spine row, NULL where the read found nothing.
    pub batch: RecordBatch,
    /// Spine rows with a value.
    pub found: usize,
    /// Spine rows without one: the key had no accepted event the read could
    /// see (or a NULL key or time).
    pub null: usize,
    /// Spine rows whose time the history's watermark never reached (NULL).
    pub beyond: usize,
}

/// What a replay did.
#[derive(Debug, Default, Clone)]
pub struct ReplayStats {
    /// Events read from the history.
    pub events: u64,
    /// Events late for some replayed view (dead-lettered).
    pub late: u64,
    /// Dead letters written (undecodable, bad event times, late).
    pub dead_letters: u64,
    /// Clocks the tiles were flushed at.
    pub flushes: u64,
    /// The history's last watermark.
    pub watermark: Option<i64>,
}

/// Pending rows per view past which a replay folds what the watermark passed.
const PENDING_LIMIT: usize = 64 << 20;

/// One replayed view.
struct Replayed {
    op: ViewOp,
    reader: TileReader,
    mode: ReadMode,
    keys: Vec<Option<String>>,
    /// Spine rows by time (valid key and time only).
    order: Vec<u32>,
    times: Vec<Option<i64>>,
    /// Next entry of `order` to answer.
    next: usize,
    /// Read values: pieces, and per spine row (piece, row).
    pieces: Vec<RecordBatch>,
    pick: Vec<Option<(usize, usize)>>,
    /// The clock the tiles were last flushed at.
    flushed: i64,
}

impl Replayed {
    fn new(plan: &ViewPlan, spine: &SpineRows) -> Result<Self> {
        // Only the tiles: no lake, topic or index output in a replay.
        let mut p = plan.clone();
        p.online = true;
        p.offline = None;
        p.kafka_topic = None;
        p.vector_index = None;
        if !is_tiled(&p) {
            return Err(EngineError::Internal(format!(
                "view `{}` has no window to replay",
                plan.name
            )));
        }
        // The store is memory already: a small cache in front of it.
        let mem = TileMemory {
            cache: 32 << 20,
            ..TileMemory::default()
        };
        let op = ViewOp::with_tiles(&p, Some(mem))?;
        let kernel = op
            .kernel()
            .cloned()
            .ok_or_else(|| EngineError::Internal(format!("view `{}` has no aggregate", p.name)))?;
        let reader = TileReader::new(&p, kernel)?;
        let mode = reader.layout().default_mode();
        let mut order: Vec<u32> = (0..spine.times.len() as u32)
            .filter(|i| spine.times[*i as usize].is_some() && spine.keys[*i as usize].is_some())
            .collect();
        order.sort_by_key(|i| spine.times[*i as usize]);
        Ok(Replayed {
            op,
            reader,
            mode,
            keys: spine.keys.clone(),
            times: spine.times.clone(),
            order,
            next: 0,
            pieces: Vec::new(),
            pick: vec![None; spine.times.len()],
            flushed: NO_WATERMARK,
        })
    }

    fn next_time(&self) -> Option<i64> {
        self.order
            .get(self.next)
            .and_then(|i| self.times[*i as usize])
    }

    /// Folds the pending rows before `clock` into the tiles and commits `clock`.
    fn flush(&mut self, store: &MemStore, clock: i64, stats: &mut ReplayStats) -> Result<()> {
        if clock <= self.flushed {
            return Ok(());
        }
        let Some(t) = self.op.tiles_mut() else {
            return Ok(());
        };
        let view = t.view().to_string();
        let mut w = TileWrites::default();
        t.flush(store, clock, &mut w)?;
        store.commit(Commit {
            tiles: vec![(view.clone(), w)],
            meta: vec![(clock_key(&view), clock.to_be_bytes().to_vec())],
            ..Commit::default()
        })?;
        t.committed();
        self.flushed = clock;
        stats.flushes += 1;
        Ok(())
    }

    /// Answers every spine row whose time the clock `c` has reached.
    fn answer_through(&mut self, store: &MemStore, c: i64, stats: &mut ReplayStats) -> Result<()> {
        while let Some(t) = self.next_time() {
            if t > c {
                break;
            }
            let mut end = self.next;
            while end < self.order.len() && self.times[self.order[end] as usize] == Some(t) {
                end += 1;
            }
            self.flush(store, t, stats)?;
            let rows: Vec<u32> = self.order[self.next..end].to_vec();
            let keys: Vec<&str> = rows
                .iter()
                .filter_map(|r| self.keys[*r as usize].as_deref())
                .collect();
            let v = self.reader.read_many(store, &keys, self.mode)?;
            let piece = self.pieces.len();
            for (r, row) in rows.iter().zip(&v.rows) {
                self.pick[*r as usize] = row.map(|x| (piece, x));
            }
            if v.rows.iter().any(Option::is_some) {
                self.pieces.push(v.batch);
            }
            self.next = end;
        }
        Ok(())
    }

    fn finish(self, plan: &ViewPlan) -> Result<ViewValues> {
        let beyond = self.order.len() - self.next;
        let n = self.pick.len();
        let fields: Vec<Field> = plan
            .output_schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect();
        let schema = Arc::new(Schema::new(fields));
        let found = self.pick.iter().filter(|p| p.is_some()).count();
        let cols = if found == 0 {
            schema
                .fields()
                .iter()
                .map(|f| new_null_array(f.data_type(), n))
                .collect::<Vec<_>>()
        } else {
            // A NULL row to pick for spine rows without a value.
            let nulls = RecordBatch::try_new(
                Arc::clone(&schema),
                schema
                    .fields()
                    .iter()
                    .map(|f| new_null_array(f.data_type(), 1))
                    .collect(),
            )
            .map_err(|e| EngineError::arrow("replay NULL row", e))?;
            let null_piece = self.pieces.len();
            let idx: Vec<(usize, usize)> = self
                .pick
                .iter()
                .map(|p| p.unwrap_or((null_piece, 0)))
                .collect();
            let mut cols = Vec::with_capacity(schema.fields().len());
            for (ci, f) in schema.fields().iter().enumerate() {
                let mut arrays: Vec<ArrayRef> = Vec::with_capacity(self.pieces.len() + 1);
                for p in &self.pieces {
                    let a = p
                        .column_by_name(f.name())
                        .cloned()
                        .unwrap_or_else(|| new_null_array(f.data_type(), p.num_rows()));
                    arrays.push(if a.data_type() == f.data_type() {
                        a
                    } else {
                        arrow::compute::cast(&a, f.data_type())
                            .map_err(|e| EngineError::arrow("replayed features", e))?
                    });
                }
                arrays.push(Arc::clone(nulls.column(ci)));
                let refs: Vec<&dyn Array> = arrays.iter().map(|a| a.as_ref()).collect();
                cols.push(
                    arrow::compute::interleave(&refs, &idx)
                        .map_err(|e| EngineError::arrow("replayed features", e))?,
                );
            }
            cols
        };
        let batch = RecordBatch::try_new(schema, cols)
            .map_err(|e| EngineError::arrow("replayed features", e))?;
        Ok(ViewValues {
            view: plan.name.clone(),
            batch,
            found,
            null: n - found,
            beyond,
        })
    }
}

/// Replays the history of one source for the spine rows of some of its
/// windowed views: each spine row gets what an online read at its time
/// returns (see the module docs). Undecodable and late events go to `dead`.
pub fn replay(
    plan: &PipelinePlan,
    history: History,
    spines: &[SpineRows],
    dead: &mut dyn DeadLetterSink,
) -> Result<(Vec<ViewValues>, ReplayStats)> {
    let History {
        mut source,
        recorded,
    } = history;
    let sp = plan
        .source(source.name())
        .ok_or_else(|| EngineError::Connector {
            what: format!("source {}", source.name()),
            message: "not declared in the pipeline".into(),
        })?;
    let mut views = Vec::new();
    let mut plans = Vec::new();
    for s in spines {
        let vp = plan.view(&s.view).ok_or_else(|| {
            EngineError::Internal(format!("no view `{}` in the pipeline", s.view))
        })?;
        if vp.source != sp.name {
            return Err(EngineError::Internal(format!(
                "view `{}` reads `{}`, not `{}`",
                vp.name, vp.source, sp.name
            )));
        }
        views.push(Replayed::new(vp, s)?);
        plans.push(vp);
    }
    let store = MemStore::default();
    let mut stats = ReplayStats::default();
    let stages = views
        .iter()
        .map(|v| v.op.stage())
        .collect::<Result<Vec<_>>>()?;
    let mut ingest = Ingest::new(
        sp,
        stages,
        WatermarkTracker::new(sp.watermark_delay_ms, None),
    )?;
    let mut clock = NO_WATERMARK;
    let ncols = sp.schema.fields().len();
    let mut letters: Vec<DeadLetter> = Vec::new();
    source.seek(None)?;
    loop {
        for d in letters.drain(..) {
            write_dead(dead, &d, &mut stats)?;
        }
        let (sb, rejected) = match source.poll(8192)? {
            Poll::End => break,
            Poll::Idle => {
                std::thread::sleep(std::time::Duration::from_millis(1));
                continue;
            }
            Poll::Data { batch, rejected } => (batch, rejected),
        };
        // An archive's rows carry the clocks the stream recorded; the
        // views see the source's own columns.
        let (sb, recorded_clocks) = match sb {
            Some(sb) if recorded && sb.batch.num_rows() > 0 => {
                let rc = RecordedClocks::of(&sb.batch, ncols)?;
                let batch = sb
                    .batch
                    .project(&(0..ncols).collect::<Vec<_>>())
                    .map_err(|e| EngineError::arrow("archive rows", e))?;
                (Some(SourceBatch { batch, ..sb }), Some(rc))
            }
            other => (other, None),
        };
        let describe = |p| source.describe_position(p);
        let recorded_wms = recorded_clocks.as_ref().map(|rc| rc.watermarks.as_slice());
        let late_before = ingest.counts.late;
        let accepted = ingest.accept(sb, rejected, &describe, recorded_wms, &mut letters)?;
        stats.late += ingest.counts.late - late_before;
        let Some(acc) = accepted else { continue };
        let n = acc.rows.len();
        stats.events += n as u64;
        if acc.rows.ts.is_none() {
            return Err(EngineError::Internal(format!(
                "source `{}` has no event time to replay windows by",
                sp.name
            )));
        }
        // The clock after each row.
        let after: Vec<i64> = match &recorded_clocks {
            Some(rc) => {
                for v in views.iter_mut() {
                    v.answer_through(&store, rc.before, &mut stats)?;
                }
                let mut after = vec![rc.before; n];
                after[n - 1] = rc.clock;
                after
            }
            None => {
                let w = acc
                    .rows
                    .wm
                    .as_ref()
                    .map(|w| w.values().to_vec())
                    .unwrap_or_default();
                let mut after: Vec<i64> = w.get(1..).map(<[i64]>::to_vec).unwrap_or_default();
                after.push(ingest.clock().watermark());
                after
            }
        };
        // Cut the batch where the clock reaches the next spine time.
        let mut start = 0;
        while start < n {
            let next = views.iter().filter_map(Replayed::next_time).min();
            let end = match next {
                Some(t) => after[start..]
                    .iter()
                    .position(|c| *c >= t)
                    .map_or(n, |p| start + p + 1),
                None => n,
            };
            for (v, rows) in views.iter_mut().zip(&acc.views) {
                // The view's staged rows of source rows `start..end`.
                let ids = rows.rowid.values();
                let a = ids.partition_point(|r| (*r as usize) < start);
                let b = ids.partition_point(|r| (*r as usize) < end);
                if b > a {
                    v.op.push(rows.slice(a, b - a))?;
                }
            }
            let c = after[end - 1];
            clock = clock.max(c);
            for v in views.iter_mut() {
                v.answer_through(&store, clock, &mut stats)?;
            }
            start = end;
        }
        for v in views.iter_mut() {
            let over =
                v.op.tiles()
                    .is_some_and(|t| t.pending_bytes() > PENDING_LIMIT);
            // An archive flushes at every checkpoint, as the stream did.
            if (recorded || over) && clock != NO_WATERMARK {
                v.flush(&store, clock, &mut stats)?;
            }
        }
    }
    dead.commit()?;
    stats.watermark = (clock != NO_WATERMARK).then_some(clock);
    let out = views
        .into_iter()
        .zip(plans)
        .map(|(v, p)| v.finish(p))
        .collect::<Result<Vec<_>>>()?;
    Ok((out, stats))
}

fn write_dead(
    dead: &mut dyn DeadLetterSink,
    d: &DeadLetter,
    stats: &mut ReplayStats,
) -> Result<()> {
    stats.dead_letters += 1;
    dead.write(d)
}

/// The recorded watermarks and clocks of one archived checkpoint.
struct RecordedClocks {
    watermarks: Vec<i64>,
    before: i64,
    clock: i64,
}

impl RecordedClocks {
    fn of(b: &RecordBatch, ncols: usize) -> Result<Self> {
        let col = |name: &str| -> Result<Int64Array> {
            b.column_by_name(name)
                .and_then(|c| c.as_any().downcast_ref::<Int64Array>().cloned())
                .ok_or_else(|| EngineError::Incompatible {
                    path: "event archive".into(),
                    reason: format!("no Int64 column `{name}` after the source's {ncols} columns"),
                })
        };
        let wm = col(crate::archive::archive_columns::WATERMARK)?;
        let before = col(crate::archive::archive_columns::CLOCK_BEFORE)?;
        let clock = col(crate::archive::archive_columns::CLOCK)?;
        let first = |a: &Int64Array| {
            if a.is_empty() || a.is_null(0) {
                NO_WATERMARK
            } else {
                a.value(0)
            }
        };
        Ok(RecordedClocks {
            watermarks: wm.iter().map(|w| w.unwrap_or(NO_WATERMARK)).collect(),
            before: first(&before),
            clock: first(&clock),
        })
    }
}
