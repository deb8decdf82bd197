//! Tiles: the state of a windowed view and what its online reads merge.
//!
//! A tile is the partial aggregate of one key over one aligned period of
//! event time: the accumulators' `state()` row, as DataFusion defines it for
//! every aggregate function. Level 0 tiles are one slide long (`TUMBLE`: one
//! period); coarser levels (an hour, a day) cover many slides and exist when
//! the window is long enough to need them. An event updates its tile at
//! every level, so a tile of any level always holds every accepted event of
//! its period and a read of a long window merges a few coarse tiles in the
//! middle and fine tiles only at the edges: tens of merges for 30 days of
//! 5-minute slides, not 8,640.
//!
//! Writes cost O(events): staged rows wait in memory until the watermark
//! passes them, then fold into their tiles at the next checkpoint: old
//! states come from a bounded in-memory cache or from the store, are merged
//! with the new rows, and are written back in the checkpoint's write batch.
//! Rows at or after the watermark stay pending (and are saved with the
//! checkpoint), so a committed tile holds exactly the events before the
//! committed watermark and a read at that clock counts each accepted event
//! once. A tile leaves the store when the watermark passes the end of the
//! last window that holds it.
//!
//! A stored tile is the state row followed by 8 bytes: the newest event time
//! it holds (little-endian ms). A read takes the newest over the tiles it
//! merges, the newest event in the key's window, which is how old a served
//! value is (`sluice_served_value_age_seconds`).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, Int64Array, RecordBatch, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use serde_json::{Value, json};
use sluice_sql::{ViewPlan, WindowSpec};

use crate::aggregate::AggKernel;
use crate::error::{EngineError, Result};
use crate::exec::Rows;
use crate::keys::{KeyDict, key_strings};
use crate::output::{emitted_features, key_and_feature_columns};
use crate::store::{StateStore, TileWrites, expiry_key, tile_key};
use crate::time::fmt_ts;

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;
/// A coarser level is kept when the window spans at least this many of its tiles.
const MIN_TILES_PER_LEVEL: i64 = 4;
/// Rows folded per accumulator update while flushing.
const FLUSH_SLICE: usize = 4096;

/// Does this view keep tiles (a windowed view served online)?
pub fn is_tiled(plan: &ViewPlan) -> bool {
    plan.online
        && matches!(
            plan.window(),
            Some(WindowSpec::Hop { .. } | WindowSpec::Tumble { .. })
        )
}

pub use crate::checkpoint::clock_key;

/// Metadata key of a tiled view's pending rows (at or after the committed
/// clock) of key group `group`.
pub fn pending_key(view: &str, group: u16) -> String {
    format!("pending/{view}/{group}")
}

/// The tile levels of a window and the arithmetic of reads and expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TileLayout {
    /// The window's slide (its size for `TUMBLE`).
    pub slide: i64,
    /// The window's size.
    pub size: i64,
    /// `TUMBLE` (periods) rather than `HOP`.
    pub tumble: bool,
    /// Tile length per level, finest first (level 0 is the slide).
    pub levels: Vec<i64>,
}

/// Which value a read answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// `HOP`: the window ending at the last slide boundary plus the head
    /// slide up to the clock (the default of `HOP` views).
    Fresh,
    /// The last closed window (`HOP`) or period (`TUMBLE`, its default).
    Closed,
    /// `TUMBLE`: the current period so far.
    Current,
}

impl ReadMode {
    /// Parses the `window` query parameter.
    pub fn parse(s: &str) -> Option<ReadMode> {
        match s {
            "fresh" => Some(ReadMode::Fresh),
            "closed" => Some(ReadMode::Closed),
            "current" => Some(ReadMode::Current),
            _ => None,
        }
    }

    /// The parameter's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ReadMode::Fresh => "fresh",
            ReadMode::Closed => "closed",
            ReadMode::Current => "current",
        }
    }
}

impl TileLayout {
    /// The layout of a windowed view (`None` for lifetime views).
    pub fn new(window: WindowSpec) -> Option<Self> {
        let (slide, size, tumble) = match window {
            WindowSpec::Hop { slide_ms, size_ms } => (slide_ms, size_ms, false),
            WindowSpec::Tumble { size_ms } => (size_ms, size_ms, true),
            WindowSpec::Lifetime => return None,
        };
        let mut levels = vec![slide];
        for c in [HOUR, DAY] {
            let last = *levels.last().unwrap_or(&slide);
            if c > last && c % last == 0 && size >= MIN_TILES_PER_LEVEL * c {
                levels.push(c);
            }
        }
        Some(TileLayout {
            slide,
            size,
            tumble,
            levels,
        })
    }

    /// The start of the level-`level` tile holding time `ts`.
    pub fn tile_start(&self, level: usize, ts: i64) -> i64 {
        let l = self.levels[level];
        ts.div_euclid(l) * l
    }

    /// The watermark from which a tile is in no window any reader asks for:
    /// the window starting at its end has closed.
    pub fn expires_at(&self, level: usize, start: i64) -> i64 {
        start
            .saturating_add(self.levels[level])
            .saturating_add(self.size)
    }

    /// The mode a read without one answers.
    pub fn default_mode(&self) -> ReadMode {
        if self.tumble {
            ReadMode::Closed
        } else {
            ReadMode::Fresh
        }
    }

    /// Whether the window offers `mode`.
    pub fn offers(&self, mode: ReadMode) -> bool {
        match mode {
            ReadMode::Closed => true,
            ReadMode::Fresh => !self.tumble,
            ReadMode::Current => self.tumble,
        }
    }

    /// The event-time bounds of a read at clock `t`: `[from, to)` in slide
    /// units (the head slide's tile only holds events before `t`).
    pub fn bounds(&self, mode: ReadMode, t: i64) -> (i64, i64) {
        let e = t.div_euclid(self.slide).saturating_mul(self.slide);
        match mode {
            ReadMode::Fresh => (e.saturating_sub(self.size), e.saturating_add(self.slide)),
            ReadMode::Closed => (e.saturating_sub(self.size), e),
            ReadMode::Current => (e, e.saturating_add(self.slide)),
        }
    }

    /// The tiles that cover `[from, to)` (multiples of the slide): per level,
    /// a range of tile starts. Coarse tiles where they fit whole, finer ones
    /// at the edges.
    pub fn cover(&self, from: i64, to: i64) -> Vec<(u8, i64, i64)> {
        let mut out = Vec::new();
        self.cover_level(self.levels.len() - 1, from, to, &mut out);
        out
    }

    fn cover_level(&self, level: usize, from: i64, to: i64, out: &mut Vec<(u8, i64, i64)>) {
        if from >= to {
            return;
        }
        if level == 0 {
            out.push((0, from, to));
            return;
        }
        let l = self.levels[level];
        let a = from
            .div_euclid(l)
            .saturating_add(i64::from(from.rem_euclid(l) != 0))
            * l;
        let b = to.div_euclid(l) * l;
        if a < b {
            out.push((level as u8, a, b));
            self.cover_level(level - 1, from, a, out);
            self.cover_level(level - 1, b, to, out);
        } else {
            self.cover_level(level - 1, from, to, out);
        }
    }
}

/// Tile states kept in memory between checkpoints, within a byte budget.
/// Entries written since the last commit are pinned; clean ones are evicted
/// (second chance) when the cache is over its budget after a commit.
struct TileCache {
    map: HashMap<Box<[u8]>, CacheEntry, ahash::RandomState>,
    bytes: usize,
    budget: usize,
    dirty: Vec<Box<[u8]>>,
}

struct CacheEntry {
    state: Box<[u8]>,
    dirty: bool,
    referenced: bool,
}

/// Bytes an entry costs beyond its key and state (map slot, allocations).
const ENTRY_OVERHEAD: usize = 64;

impl TileCache {
    fn new(budget: usize) -> Self {
        TileCache {
            map: HashMap::with_hasher(ahash::RandomState::new()),
            bytes: 0,
            budget,
            dirty: Vec::new(),
        }
    }

    fn get(&mut self, k: &[u8]) -> Option<&[u8]> {
        let e = self.map.get_mut(k)?;
        e.referenced = true;
        Some(&e.state)
    }

    fn put_dirty(&mut self, k: Vec<u8>, state: Vec<u8>) {
        let k: Box<[u8]> = k.into();
        let add = k.len() + state.len() + ENTRY_OVERHEAD;
        let entry = CacheEntry {
            state: state.into(),
            dirty: true,
            referenced: true,
        };
        match self.map.insert(k.clone(), entry) {
            Some(old) => {
                self.bytes = self.bytes + add - (k.len() + old.state.len() + ENTRY_OVERHEAD);
                if !old.dirty {
                    self.dirty.push(k);
                }
            }
            None => {
                self.bytes += add;
                self.dirty.push(k);
            }
        }
    }

    fn remove(&mut self, k: &[u8]) {
        if let Some(e) = self.map.remove(k) {
            self.bytes -= k.len() + e.state.len() + ENTRY_OVERHEAD;
        }
    }

    /// After a commit: nothing is dirty; evict down to the budget.
    fn committed(&mut self) -> u64 {
        for k in std::mem::take(&mut self.dirty) {
            if let Some(e) = self.map.get_mut(&k) {
                e.dirty = false;
            }
        }
        let mut evicted = 0u64;
        if self.bytes <= self.budget {
            return 0;
        }
        let target = self.budget - self.budget / 5;
        for _pass in 0..2 {
            let mut freed = 0usize;
            let over = self.bytes.saturating_sub(target);
            self.map.retain(|k, e| {
                if freed >= over || e.dirty {
                    return true;
                }
                if e.referenced {
                    e.referenced = false;
                    return true;
                }
                freed += k.len() + e.state.len() + ENTRY_OVERHEAD;
                evicted += 1;
                false
            });
            self.bytes -= freed;
            if self.bytes <= target {
                break;
            }
        }
        evicted
    }
}

/// What a flush did (for metrics and tests).
#[derive(Debug, Default, Clone, Copy)]
pub struct FlushStats {
    /// Rows folded into tiles.
    pub rows: u64,
    /// Tiles written.
    pub tiles_written: u64,
    /// Tiles whose old state came from the store (not the cache).
    pub store_reads: u64,
    /// Tiles that left every window and were deleted.
    pub expired: u64,
}

/// The tiles of one view: pending rows, the cache, and the flush into the store.
pub struct TileAgg {
    view: String,
    kernel: Arc<AggKernel>,
    layout: TileLayout,
    pending: Vec<Rows>,
    pending_bytes: usize,
    /// Key groups whose pending rows the last checkpoint wrote.
    pending_groups: std::collections::BTreeSet<u16>,
    /// `(worker, workers)`: this worker's key groups are those with
    /// `group % workers == worker` (`None`: every group).
    share: Option<(usize, usize)>,
    cache: TileCache,
    /// Accumulator bytes at which a flush writes what it has and starts over.
    flush_limit: usize,
    /// The clock the store's tiles were flushed through, when known: no
    /// tile starting at or after it can be in the store (a flush folds
    /// only rows before its clock), so a flush does not look for one.
    flushed_through: Option<i64>,
}

impl std::fmt::Debug for TileAgg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TileAgg({}, {:?})", self.view, self.layout.levels)
    }
}

/// Memory a view's tiles may use.
#[derive(Debug, Clone, Copy)]
pub struct TileMemory {
    /// Bytes of cached tile states.
    pub cache: usize,
    /// Accumulator bytes of one flush step.
    pub flush: usize,
    /// Bytes of pending rows after which the job checkpoints early.
    pub pending: usize,
}

impl Default for TileMemory {
    fn default() -> Self {
        TileMemory {
            cache: 256 << 20,
            flush: 64 << 20,
            pending: 128 << 20,
        }
    }
}

impl TileAgg {
    /// The tiles of a windowed view.
    pub fn new(plan: &ViewPlan, kernel: Arc<AggKernel>, mem: TileMemory) -> Result<Self> {
        let layout = plan
            .window()
            .and_then(TileLayout::new)
            .ok_or_else(|| EngineError::Internal(format!("view `{}` has no window", plan.name)))?;
        Ok(TileAgg {
            view: plan.name.clone(),
            kernel,
            layout,
            pending: Vec::new(),
            pending_bytes: 0,
            pending_groups: std::collections::BTreeSet::new(),
            share: None,
            cache: TileCache::new(mem.cache),
            flush_limit: mem.flush.max(1 << 20),
            flushed_through: None,
        })
    }

    /// Keeps to the key groups of worker `worker` of `workers`: expired
    /// tiles of other groups are theirs to delete.
    pub fn share(&mut self, worker: usize, workers: usize) {
        self.share = (workers > 1).then_some((worker, workers));
    }

    fn owns_tile(&self, tile: &[u8]) -> bool {
        let Some((w, n)) = self.share else {
            return true;
        };
        let g = tile
            .get(..2)
            .and_then(|b| b.try_into().ok())
            .map(u16::from_be_bytes)
            .unwrap_or(0);
        usize::from(g) % n == w
    }

    /// Tells the tiles the clock the store's tiles were committed through
    /// (`None`: the view has none in the store), so flushes skip looking
    /// up tiles that start at or after it: they cannot exist.
    pub fn restore_clock(&mut self, committed: Option<i64>) {
        self.flushed_through = Some(committed.unwrap_or(i64::MIN));
    }

    /// The layout.
    pub fn layout(&self) -> &TileLayout {
        &self.layout
    }

    /// The view's name.
    pub fn view(&self) -> &str {
        &self.view
    }

    /// Adds staged rows (none late) to fold in once the watermark passes them.
    pub fn push(&mut self, rows: Rows) {
        if rows.is_empty() {
            return;
        }
        self.pending_bytes += rows.batch.get_array_memory_size();
        self.pending.push(rows);
    }

    /// Bytes of rows waiting for the watermark.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    /// Bytes of cached tile states.
    pub fn cached_bytes(&self) -> usize {
        self.cache.bytes
    }

    /// Folds the pending rows before `wm` into their tiles and deletes the
    /// tiles `wm` expires; the changes go into `out` for the checkpoint.
    /// Call [`TileAgg::committed`] once that checkpoint is durable.
    pub fn flush(
        &mut self,
        store: &dyn StateStore,
        wm: i64,
        out: &mut TileWrites,
    ) -> Result<FlushStats> {
        let mut stats = FlushStats::default();
        let mut ready = Vec::new();
        let mut keep = Vec::new();
        for r in std::mem::take(&mut self.pending) {
            let ts = times(&self.view, &r)?;
            let before = ts.values().iter().filter(|t| **t < wm).count();
            if before == r.len() {
                ready.push(r);
            } else if before == 0 {
                keep.push(r);
            } else {
                let mask: BooleanArray = ts.values().iter().map(|t| Some(*t < wm)).collect();
                ready.push(r.filter(&mask)?);
                let rest = arrow::compute::not(&mask)
                    .map_err(|e| EngineError::arrow("pending rows", e))?;
                keep.push(r.filter(&rest)?);
            }
        }
        self.pending_bytes = keep.iter().map(|r| r.batch.get_array_memory_size()).sum();
        self.pending = keep;
        let mut step = FlushStep::new(&self.kernel)?;
        for r in &ready {
            let mut off = 0;
            while off < r.len() {
                let len = FLUSH_SLICE.min(r.len() - off);
                step.update(&self.kernel, &self.layout, &self.view, &r.slice(off, len))?;
                stats.rows += len as u64;
                off += len;
                if step.accumulator_bytes() >= self.flush_limit {
                    let s = std::mem::replace(&mut step, FlushStep::new(&self.kernel)?);
                    self.write_step(s, store, wm, out, &mut stats)?;
                }
            }
        }
        self.write_step(step, store, wm, out, &mut stats)?;
        for k in store.expired_tiles(&self.view, wm)? {
            if !self.owns_tile(&k) {
                continue;
            }
            self.cache.remove(&k);
            out.deletes.push(k);
            stats.expired += 1;
        }
        out.expired_through = Some(wm);
        if let Some(f) = self.flushed_through.as_mut() {
            *f = (*f).max(wm);
        }
        metrics::counter!("sluice_tiles_expired_total", "view" => self.view.clone())
            .increment(stats.expired);
        metrics::counter!("sluice_tiles_written_total", "view" => self.view.clone())
            .increment(stats.tiles_written);
        metrics::counter!("sluice_tile_store_reads_total", "view" => self.view.clone())
            .increment(stats.store_reads);
        Ok(stats)
    }

    fn write_step(
        &mut self,
        mut step: FlushStep,
        store: &dyn StateStore,
        wm: i64,
        out: &mut TileWrites,
        stats: &mut FlushStats,
    ) -> Result<()> {
        if step.tiles.is_empty() {
            return Ok(());
        }
        let ids: Vec<u32> = (0..step.keys.len() as u32).collect();
        let names = key_strings(&step.keys.arrays(&ids)?)?;
        let store_keys: Vec<Vec<u8>> = step
            .tiles
            .iter()
            .map(|(id, level, start)| tile_key(&names[*id as usize], *level, *start))
            .collect();
        // Old states: the cache first, then one batched read of the rest.
        let mut old: Vec<Option<Vec<u8>>> = Vec::with_capacity(store_keys.len());
        let mut misses = Vec::new();
        let known_new = self.flushed_through;
        for (g, k) in store_keys.iter().enumerate() {
            match self.cache.get(k) {
                Some(s) => old.push(Some(s.to_vec())),
                None => {
                    old.push(None);
                    let start = step.tiles[g].2;
                    if known_new.is_none_or(|f| start < f) {
                        misses.push(g);
                    }
                }
            }
        }
        if !misses.is_empty() {
            let keys: Vec<Vec<u8>> = misses.iter().map(|g| store_keys[*g].clone()).collect();
            for (g, v) in misses.iter().zip(store.get_tiles(&self.view, &keys)?) {
                stats.store_reads += u64::from(v.is_some());
                old[*g] = v;
            }
        }
        let groups: Vec<usize> = (0..old.len()).filter(|g| old[*g].is_some()).collect();
        let total = step.tiles.len();
        if !groups.is_empty() {
            let mut old_states = Vec::with_capacity(groups.len());
            for g in &groups {
                if let Some(b) = old[*g].as_deref() {
                    let (state, newest) = split_tile(&self.view, b)?;
                    step.newest[*g] = step.newest[*g].max(newest);
                    old_states.push(state);
                }
            }
            let states = crate::aggregate::decode_rows(
                &self.kernel.state_conv,
                &format!(
                    "tiles of view `{}` (column family `tiles.{}`)",
                    self.view, self.view
                ),
                old_states.iter().copied(),
            )?;
            merge_into(
                &self.kernel,
                &self.view,
                &mut step.accs,
                &states,
                &groups,
                total,
            )?;
        }
        let states = self.kernel.state_of(&mut step.accs)?;
        let rows = self
            .kernel
            .state_conv
            .convert_columns(&states)
            .map_err(|e| EngineError::arrow("encoding tile states", e))?;
        for (g, (k, (_, level, start))) in store_keys.into_iter().zip(&step.tiles).enumerate() {
            let at = self.layout.expires_at(*level as usize, *start);
            if at <= wm {
                // Already out of every window: never written.
                continue;
            }
            let state = join_tile(rows.row(g).as_ref(), step.newest[g]);
            if old[g].is_none() {
                out.expiry.push(expiry_key(at, &k));
            }
            out.puts.push((k.clone(), state.clone()));
            self.cache.put_dirty(k, state);
            stats.tiles_written += 1;
        }
        Ok(())
    }

    /// The checkpoint holding the last flush is durable: cached tiles are
    /// clean and may be evicted down to the budget.
    pub fn committed(&mut self) {
        let evicted = self.cache.committed();
        metrics::counter!("sluice_tile_cache_evictions_total", "view" => self.view.clone())
            .increment(evicted);
        metrics::gauge!("sluice_tile_cache_bytes", "view" => self.view.clone())
            .set(self.cache.bytes as f64);
    }

    /// The pending rows, encoded for the checkpoint by key group (Arrow
    /// IPC, event time as an extra last column): one value per group that
    /// has rows, and an empty one for each group that had rows at the last
    /// checkpoint and has none now.
    pub fn encode_pending(&mut self) -> Result<Vec<(u16, Vec<u8>)>> {
        let mut by_group: std::collections::BTreeMap<u16, Vec<Rows>> =
            std::collections::BTreeMap::new();
        for r in &self.pending {
            let groups = crate::keys::key_groups(&self.kernel.key_columns(&r.batch)?)?;
            let first = groups.first().copied().unwrap_or(0);
            if groups.iter().all(|g| *g == first) {
                by_group.entry(first).or_default().push(r.clone());
                continue;
            }
            let distinct: std::collections::BTreeSet<u16> = groups.iter().copied().collect();
            for g in distinct {
                let mask: BooleanArray = groups.iter().map(|x| Some(*x == g)).collect();
                by_group.entry(g).or_default().push(r.filter(&mask)?);
            }
        }
        let mut out = Vec::with_capacity(by_group.len());
        for (g, rows) in &by_group {
            let schema = with_time_column(rows[0].batch.schema_ref());
            let mut w = arrow::ipc::writer::StreamWriter::try_new(Vec::new(), &schema)
                .map_err(|e| EngineError::arrow("encoding pending rows", e))?;
            for r in rows {
                let mut cols = r.batch.columns().to_vec();
                cols.push(Arc::new(times(&self.view, r)?.clone()));
                let b = RecordBatch::try_new(Arc::clone(&schema), cols)
                    .map_err(|e| EngineError::arrow("encoding pending rows", e))?;
                w.write(&b)
                    .map_err(|e| EngineError::arrow("encoding pending rows", e))?;
            }
            out.push((
                *g,
                w.into_inner()
                    .map_err(|e| EngineError::arrow("encoding pending rows", e))?,
            ));
        }
        let now: std::collections::BTreeSet<u16> = by_group.keys().copied().collect();
        for g in self.pending_groups.difference(&now) {
            out.push((*g, Vec::new()));
        }
        self.pending_groups = now;
        Ok(out)
    }

    /// Restores the pending rows of key group `group` saved by
    /// [`TileAgg::encode_pending`].
    pub fn restore_pending(&mut self, group: u16, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.pending_groups.insert(group);
        let what = format!("pending rows of view `{}`", self.view);
        let bad = |e: arrow::error::ArrowError| EngineError::Incompatible {
            path: what.clone(),
            reason: e.to_string(),
        };
        let r = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
            .map_err(bad)?;
        for b in r {
            let b = b.map_err(bad)?;
            let n = b.num_columns();
            let ts = b
                .column(n - 1)
                .as_any()
                .downcast_ref::<Int64Array>()
                .cloned()
                .ok_or_else(|| EngineError::Incompatible {
                    path: what.clone(),
                    reason: "no event-time column".into(),
                })?;
            let mut b = b;
            b.remove_column(n - 1);
            let len = b.num_rows();
            self.push(Rows {
                batch: b,
                ts: Some(ts),
                wm: None,
                rowid: UInt32Array::from_iter_values(0..len as u32),
            });
        }
        Ok(())
    }
}

fn with_time_column(schema: &SchemaRef) -> SchemaRef {
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new("__sluice_event_time", DataType::Int64, false));
    Arc::new(Schema::new(fields))
}

fn times<'a>(view: &str, r: &'a Rows) -> Result<&'a Int64Array> {
    r.ts.as_ref().ok_or_else(|| {
        EngineError::Internal(format!("rows of windowed view `{view}` have no event time"))
    })
}

/// Bytes after a tile's state row: the newest event time it holds.
const NEWEST_BYTES: usize = 8;

/// A stored tile's state row and the newest event time it holds.
fn split_tile<'a>(view: &str, bytes: &'a [u8]) -> Result<(&'a [u8], i64)> {
    let cut = bytes
        .len()
        .checked_sub(NEWEST_BYTES)
        .ok_or_else(|| EngineError::Incompatible {
            path: format!("tiles of view `{view}` (column family `tiles.{view}`)"),
            reason: format!(
                "a tile of {} bytes has no event time: the stored value is corrupt",
                bytes.len()
            ),
        })?;
    let (state, newest) = bytes.split_at(cut);
    let mut b = [0u8; NEWEST_BYTES];
    b.copy_from_slice(newest);
    Ok((state, i64::from_le_bytes(b)))
}

/// A tile as stored: its state row, then the newest event time it holds.
fn join_tile(state: &[u8], newest: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(state.len() + NEWEST_BYTES);
    out.extend_from_slice(state);
    out.extend_from_slice(&newest.to_le_bytes());
    out
}

fn merge_into(
    kernel: &AggKernel,
    view: &str,
    accs: &mut [Box<dyn datafusion::logical_expr::GroupsAccumulator>],
    states: &[ArrayRef],
    groups: &[usize],
    total: usize,
) -> Result<()> {
    let mut off = 0;
    for (acc, w) in accs.iter_mut().zip(&kernel.state_widths) {
        acc.merge_batch(&states[off..off + w], groups, total)
            .map_err(|e| EngineError::df(view, e))?;
        off += w;
    }
    Ok(())
}

/// The tiles one flush step updates: keys interned for the step, one
/// accumulator group per (key, level, tile start).
struct FlushStep {
    keys: KeyDict,
    accs: Vec<Box<dyn datafusion::logical_expr::GroupsAccumulator>>,
    index: HashMap<(u32, u8, i64), usize, ahash::RandomState>,
    tiles: Vec<(u32, u8, i64)>,
    /// Per tile, the newest event time folded in this step.
    newest: Vec<i64>,
    ids: Vec<u32>,
    groups: Vec<usize>,
}

impl FlushStep {
    fn new(kernel: &AggKernel) -> Result<Self> {
        Ok(FlushStep {
            keys: KeyDict::new(kernel.key_types())?,
            accs: kernel.new_accs()?,
            index: HashMap::with_hasher(ahash::RandomState::new()),
            tiles: Vec::new(),
            newest: Vec::new(),
            ids: Vec::new(),
            groups: Vec::new(),
        })
    }

    fn accumulator_bytes(&self) -> usize {
        self.accs.iter().map(|a| a.size()).sum()
    }

    fn update(
        &mut self,
        kernel: &AggKernel,
        layout: &TileLayout,
        view: &str,
        r: &Rows,
    ) -> Result<()> {
        let ts = times(view, r)?;
        let key_cols = kernel.key_columns(&r.batch)?;
        self.keys.intern(&key_cols, &mut self.ids)?;
        let inputs = kernel.inputs(&r.batch)?;
        for level in 0..layout.levels.len() {
            self.groups.clear();
            for (id, t) in self.ids.iter().zip(ts.values().iter()) {
                let tile = (*id, level as u8, layout.tile_start(level, *t));
                let next = self.tiles.len();
                let g = *self.index.entry(tile).or_insert(next);
                if g == next {
                    self.tiles.push(tile);
                    self.newest.push(*t);
                } else if self.newest[g] < *t {
                    self.newest[g] = *t;
                }
                self.groups.push(g);
            }
            for ((acc, vals), f) in self
                .accs
                .iter_mut()
                .zip(&inputs.values)
                .zip(&inputs.filters)
            {
                acc.update_batch(vals, &self.groups, f.as_ref(), self.tiles.len())
                    .map_err(|e| EngineError::df(view, e))?;
            }
        }
        Ok(())
    }
}

/// Reads a tiled view's values: merges one key's committed tiles.
pub struct TileReader {
    view: String,
    kernel: Arc<AggKernel>,
    layout: TileLayout,
    schema: SchemaRef,
    feature_idx: Vec<usize>,
    /// The output row of a key whose range holds no events.
    empty_row: Option<RecordBatch>,
}

impl std::fmt::Debug for TileReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TileReader({})", self.view)
    }
}

impl TileReader {
    /// The reader of a tiled view.
    pub fn new(plan: &ViewPlan, kernel: Arc<AggKernel>) -> Result<Self> {
        let layout = plan
            .window()
            .and_then(TileLayout::new)
            .ok_or_else(|| EngineError::Internal(format!("view `{}` has no window", plan.name)))?;
        let schema = crate::output::emitted_schema(&plan.output_schema);
        let (_, feature_idx) = key_and_feature_columns(plan);
        let empty_row = kernel.empty_row()?;
        Ok(TileReader {
            view: plan.name.clone(),
            kernel,
            layout,
            schema,
            feature_idx,
            empty_row,
        })
    }

    /// Builds the reader of `view` from a planned pipeline.
    pub fn for_view(plan: &sluice_sql::PipelinePlan, view: &str) -> Result<Option<Self>> {
        let Some(vp) = plan.views.iter().find(|v| v.name == view) else {
            return Ok(None);
        };
        if !is_tiled(vp) {
            return Ok(None);
        }
        let sluice_sql::ViewKind::Aggregate(a) = &vp.kind else {
            return Ok(None);
        };
        let kernel = Arc::new(AggKernel::new(&vp.name, a, vp.event_time.as_deref())?);
        Self::new(vp, kernel).map(Some)
    }

    /// The layout.
    pub fn layout(&self) -> &TileLayout {
        &self.layout
    }

    /// The value of `key` at the view's committed clock: `None` for a key
    /// without tiles (never seen, or all expired) or one `HAVING` drops.
    pub fn read(&self, store: &dyn StateStore, key: &str, mode: ReadMode) -> Result<Option<Value>> {
        Ok(self.read_aged(store, key, mode)?.0)
    }

    /// [`TileReader::read`], and how old the value is: the clock minus the
    /// newest event in the key's window, in ms (`None` when not found or
    /// the window holds no events).
    pub fn read_aged(
        &self,
        store: &dyn StateStore,
        key: &str,
        mode: ReadMode,
    ) -> Result<(Option<Value>, Option<i64>)> {
        let v = self.read_many(store, &[key], mode)?;
        let (Some(t), Some(Some(row))) = (v.clock, v.rows.first()) else {
            return Ok((None, None));
        };
        let age = v
            .newest
            .first()
            .copied()
            .flatten()
            .map(|n| t.saturating_sub(n).max(0));
        let Some(features) =
            emitted_features(&self.schema, &self.feature_idx, &v.batch.slice(*row, 1))?
        else {
            return Ok((None, None));
        };
        let layout = &self.layout;
        let (from, to) = layout.bounds(mode, t);
        let mut out = json!({"key": key, "as_of": fmt_ts(t), "window_start": fmt_ts(from)});
        if let Some(o) = out.as_object_mut() {
            if mode == ReadMode::Closed {
                o.insert("window_end".into(), fmt_ts(to));
                o.insert(
                    "valid_until".into(),
                    fmt_ts(to.saturating_add(layout.slide)),
                );
            }
            o.insert("features".into(), features);
        }
        Ok((Some(out), age))
    }

    /// The values of several keys at the view's committed clock, merged in
    /// one pass (the online read and training-set replays both come here).
    /// Each key's tiles come from one snapshot of the store.
    pub fn read_many(
        &self,
        store: &dyn StateStore,
        keys: &[&str],
        mode: ReadMode,
    ) -> Result<KeyValues> {
        let layout = &self.layout;
        let mut clock = None;
        let mut states: Vec<Vec<u8>> = Vec::new();
        let mut groups: Vec<usize> = Vec::new();
        // Per key: its group among merged keys, or the empty-set value.
        let mut slot: Vec<Option<Option<usize>>> = Vec::with_capacity(keys.len());
        let mut merged_keys: Vec<&str> = Vec::new();
        let mut newest: Vec<Option<i64>> = Vec::with_capacity(keys.len());
        for key in keys {
            let r = store.read_tiles(&self.view, key, &clock_key(&self.view), &|t| {
                let (from, to) = layout.bounds(mode, t);
                layout.cover(from, to)
            })?;
            if clock.is_none() {
                clock = r.clock;
            }
            if r.clock.is_none() || !r.exists {
                slot.push(None);
                newest.push(None);
            } else if r.states.is_empty() {
                slot.push(Some(None));
                newest.push(None);
            } else {
                let g = merged_keys.len();
                merged_keys.push(key);
                groups.extend(std::iter::repeat_n(g, r.states.len()));
                let mut n = i64::MIN;
                for b in &r.states {
                    n = n.max(split_tile(&self.view, b)?.1);
                }
                newest.push(Some(n));
                states.extend(r.states);
                slot.push(Some(Some(g)));
            }
        }
        let mut parts = Vec::new();
        // Group index → row of the merged batch (HAVING may drop groups).
        let mut row_of = vec![None; merged_keys.len()];
        if !merged_keys.is_empty() {
            let mut rows = Vec::with_capacity(states.len());
            for b in &states {
                rows.push(split_tile(&self.view, b)?.0);
            }
            let arrays = crate::aggregate::decode_rows(
                &self.kernel.state_conv,
                &format!(
                    "tiles of view `{}` (column family `tiles.{}`)",
                    self.view, self.view
                ),
                rows.into_iter(),
            )?;
            let mut accs = self.kernel.new_accs()?;
            merge_into(
                &self.kernel,
                &self.view,
                &mut accs,
                &arrays,
                &groups,
                merged_keys.len(),
            )?;
            let key_cols = key_columns_of(&merged_keys, self.kernel.key_types());
            let out = self.kernel.finish_rows(key_cols, &mut accs)?;
            for (row, g) in out.rowid.values().iter().enumerate() {
                row_of[*g as usize] = Some(row);
            }
            parts.push(out.batch);
        }
        let merged_rows = parts.first().map_or(0, |b| b.num_rows());
        let wants_empty = slot.iter().any(|s| matches!(s, Some(None)));
        if let (true, Some(e)) = (wants_empty, &self.empty_row) {
            parts.push(e.clone());
        }
        let rows = slot
            .into_iter()
            .map(|s| match s {
                None => None,
                Some(Some(g)) => row_of[g],
                Some(None) => self.empty_row.as_ref().map(|_| merged_rows),
            })
            .collect();
        let batch = match parts.as_slice() {
            [] => RecordBatch::new_empty(Arc::new(Schema::empty())),
            [one] => one.clone(),
            _ => {
                // The empty-set row's columns are nullable (MIN of nothing is NULL).
                let schema = Arc::new(Schema::new(
                    parts[0]
                        .schema()
                        .fields()
                        .iter()
                        .map(|f| f.as_ref().clone().with_nullable(true))
                        .collect::<Vec<_>>(),
                ));
                let cols = (0..schema.fields().len())
                    .map(|i| {
                        let arrays: Vec<&dyn Array> =
                            parts.iter().map(|p| p.column(i).as_ref()).collect();
                        arrow::compute::concat(&arrays)
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| EngineError::arrow("feature rows", e))?;
                RecordBatch::try_new(schema, cols)
                    .map_err(|e| EngineError::arrow("feature rows", e))?
            }
        };
        Ok(KeyValues {
            clock,
            batch,
            rows,
            newest,
        })
    }
}

/// What [`TileReader::read_many`] found.
#[derive(Debug)]
pub struct KeyValues {
    /// The committed clock the values are read at (`None`: no checkpoint yet).
    pub clock: Option<i64>,
    /// The view's output rows (keys and features).
    pub batch: RecordBatch,
    /// Per requested key, its row in `batch`; `None` for a key without
    /// tiles (never seen, or all expired) or one `HAVING` drops.
    pub rows: Vec<Option<usize>>,
    /// Per requested key, the newest event time in its window (`None`
    /// when the window holds no events).
    pub newest: Vec<Option<i64>>,
}

/// Key columns (one row per key) from keys as the API spells them
/// ([`crate::keys::KeyText`]), each cast from text to its type (NULL where
/// it does not parse).
fn key_columns_of(keys: &[&str], types: &[DataType]) -> Vec<ArrayRef> {
    let parts: Vec<Vec<Option<String>>> = keys
        .iter()
        .map(|k| crate::keys::KeyText::parse(k).map_or_else(|_| Vec::new(), |t| t.0))
        .collect();
    types
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let s: ArrayRef = Arc::new(arrow::array::StringArray::from_iter(
                parts.iter().map(|p| p.get(i).cloned().flatten()),
            ));
            arrow::compute::cast(&s, t)
                .unwrap_or_else(|_| arrow::array::new_null_array(t, keys.len()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    #[test]
    fn levels_follow_the_window_length() {
        let l = |slide, size| {
            TileLayout::new(WindowSpec::Hop {
                slide_ms: slide,
                size_ms: size,
            })
            .map(|l| l.levels)
        };
        assert_eq!(l(5 * MIN, HOUR), Some(vec![5 * MIN]));
        assert_eq!(l(5 * MIN, DAY), Some(vec![5 * MIN, HOUR]));
        assert_eq!(l(5 * MIN, 30 * DAY), Some(vec![5 * MIN, HOUR, DAY]));
        // 7 minutes do not divide an hour: one level.
        assert_eq!(l(7 * MIN, 7 * DAY), Some(vec![7 * MIN]));
    }

    #[test]
    fn a_30_day_read_merges_tens_of_tiles() {
        let l = TileLayout::new(WindowSpec::Hop {
            slide_ms: 5 * MIN,
            size_ms: 30 * DAY,
        })
        .expect("layout");
        // The worst case: the window starts 5 minutes after a day and an hour boundary.
        let t = 100 * DAY + 5 * MIN + 7;
        let (from, to) = l.bounds(ReadMode::Fresh, t);
        let cover = l.cover(from, to);
        let tiles: i64 = cover
            .iter()
            .map(|(lv, a, b)| (b - a) / l.levels[*lv as usize])
            .sum();
        assert!(tiles < 120, "{tiles} tiles: {cover:?}");
        // The cover tiles [from, to) exactly, without overlap.
        let mut spans: Vec<(i64, i64)> = cover.iter().map(|(_, a, b)| (*a, *b)).collect();
        spans.sort();
        assert_eq!(spans.first().map(|s| s.0), Some(from));
        assert_eq!(spans.last().map(|s| s.1), Some(to));
        for w in spans.windows(2) {
            assert_eq!(w[0].1, w[1].0);
        }
    }
}
