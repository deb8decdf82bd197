//! Point-in-time-correct feature lookup for training sets: for each spine
//! row (entity key, timestamp `t`), a view's features as of `t`, never later.
//!
//! A windowed view's row with `window_end = E` is the key's value from `E`
//! until `E + slide`; at `t` the only row that can be valid is therefore the
//! one ending at `floor(t / slide) * slide`. If the key has no such row its
//! current window holds no events and it reads as the aggregate over the
//! empty set, exactly as the online store answers. The join is a hash join
//! on (key, that window end): spine rows are indexed once, lake rows stream
//! past and only matching rows are kept, so the lake is never sorted or held
//! in memory. Views without windows (lifetime aggregates, per-event views)
//! take their latest row at or before `t`: lake rows of spine keys are
//! collected per key, sorted by time and searched for each spine row; with
//! none, the value is NULL (the lake holds snapshots of such views, so no
//! snapshot means unknown, not zero).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use arrow::array::make_comparator;
use arrow::array::{
    Array, ArrayRef, BooleanArray, RecordBatch, TimestampMillisecondArray, UInt32Array,
    new_null_array,
};
use arrow::compute::SortOptions;
use arrow::compute::{interleave, take_record_batch};
use arrow::datatypes::{DataType, SchemaRef};

use crate::error::{EngineError, Result};

/// How a spine row's features were found (for tests and reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// A lake row valid at the spine time.
    Row,
    /// The key's window was empty: the aggregate over the empty set.
    Empty,
    /// NULL: no key, or a time the lake does not cover yet.
    Null,
}

/// The spine side of one view's as-of lookup: which lake rows can be valid
/// at some spine row's time. Shared (read-only) with the threads decoding
/// the lake, so rows no spine row needs are dropped before their feature
/// columns are decoded.
pub struct Probe {
    view: String,
    slide: Option<i64>,
    /// The spine's key columns (in the lake's key types).
    spine_keys: Vec<ArrayRef>,
    /// Spine row has a complete (non-NULL) key and a time.
    valid: Vec<bool>,
    /// Spine times (ms).
    ts: Vec<i64>,
    /// Windowed: hash of (key, window end valid at t) → spine rows.
    /// Unwindowed: hash of key → key groups.
    /// (First entry of a hash chain; `next` links entries with equal hashes.)
    index: HashMap<u64, u32, NoHash>,
    next: Vec<u32>,
    /// One bit per hash (a one-probe Bloom filter), small enough to stay in
    /// cache: most lake rows match no spine row and stop here.
    bloom: Vec<u64>,
    /// Unwindowed: the key group of each spine row, and a spine row of each group.
    group_of: Vec<u32>,
    group_rep: Vec<u32>,
    /// Smallest and largest `window_end` seen in the lake.
    lo: AtomicI64,
    hi: AtomicI64,
    /// Lake rows looked at.
    scanned: AtomicU64,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Probe({}, {} spine rows)", self.view, self.ts.len())
    }
}

/// The as-of lookup of one view for one spine.
pub struct AsOf {
    probe: Arc<Probe>,
    /// Unwindowed: (time, picked batch, row) per key group.
    cands: Vec<Vec<(i64, u32, u32)>>,
    features: SchemaRef,
    picked: Vec<RecordBatch>,
    /// Windowed: per spine row, (picked batch, row).
    pick: Vec<Option<(u32, u32)>>,
    empty: Option<RecordBatch>,
    scratch: Vec<u32>,
}

/// The hash is computed by us: identity hasher for the index.
#[derive(Default, Clone, Copy)]
struct NoHash;

struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = i;
    }
}

impl BuildHasher for NoHash {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

impl std::fmt::Debug for AsOf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AsOf({:?})", self.probe)
    }
}

/// End of a hash chain.
const NONE: u32 = u32::MAX;

/// The Bloom-filter bit of a hash (`words` a power of two).
fn bloom_bit(h: u64, words: usize) -> usize {
    ((h >> 17) as usize) & (words * 64 - 1)
}

/// Seed of the key hashes (spine and lake must agree).
const HASH_SEED: u64 = 0x5eed;

/// One hash per row over `cols` (vectorized, NULL-aware).
fn row_hashes(view: &str, cols: &[ArrayRef]) -> Result<Vec<u64>> {
    let n = cols.first().map_or(0, |c| c.len());
    let mut h = vec![0u64; n];
    let state = datafusion::common::hash_utils::RandomState::with_seed(HASH_SEED);
    datafusion::common::hash_utils::create_hashes(cols, &state, &mut h)
        .map_err(|e| EngineError::df(view, e))?;
    Ok(h)
}

/// Window ends as plain `Int64` (hashes do not depend on a time zone).
fn as_i64(ends: &TimestampMillisecondArray) -> ArrayRef {
    Arc::new(arrow::array::Int64Array::new(
        ends.values().clone(),
        ends.nulls().cloned(),
    ))
}

/// Compares key rows of `left` (row i) with `right` (row j), column by column.
fn key_eq(left: &[ArrayRef], right: &[ArrayRef]) -> Result<impl Fn(usize, usize) -> bool> {
    let cmps = left
        .iter()
        .zip(right)
        .map(|(l, r)| make_comparator(l.as_ref(), r.as_ref(), SortOptions::default()))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| EngineError::arrow("comparing keys", e))?;
    Ok(move |i: usize, j: usize| cmps.iter().all(|c| c(i, j).is_eq()))
}

impl Probe {
    /// Calls `hit(lake row, spine row | key group)` for every lake row a
    /// spine row can use.
    fn hits(
        &self,
        ends: &TimestampMillisecondArray,
        keys: &[ArrayRef],
        mut hit: impl FnMut(u32, u32),
    ) -> Result<()> {
        let mut cols = keys.to_vec();
        if self.slide.is_some() {
            cols.push(as_i64(ends));
        }
        let hashes = row_hashes(&self.view, &cols)?;
        let same = key_eq(keys, &self.spine_keys)?;
        for (i, h) in hashes.iter().enumerate() {
            let bit = bloom_bit(*h, self.bloom.len());
            if self.bloom[bit / 64] & (1 << (bit % 64)) == 0 {
                continue;
            }
            let Some(first) = self.index.get(h) else {
                continue;
            };
            if !ends.is_valid(i) || keys.iter().any(|k| k.is_null(i)) {
                continue;
            }
            let end = ends.value(i);
            let mut t = *first;
            while t != NONE {
                match self.slide {
                    Some(s) => {
                        let r = t as usize;
                        if self.ts[r].div_euclid(s) * s == end && same(i, r) {
                            hit(i as u32, t);
                        }
                    }
                    None => {
                        if same(i, self.group_rep[t as usize] as usize) {
                            hit(i as u32, t);
                        }
                    }
                }
                t = self.next[t as usize];
            }
        }
        Ok(())
    }

    fn observe(&self, ends: &TimestampMillisecondArray) {
        let mut lo = i64::MAX;
        let mut hi = i64::MIN;
        for i in (0..ends.len()).filter(|i| ends.is_valid(*i)) {
            lo = lo.min(ends.value(i));
            hi = hi.max(ends.value(i));
        }
        self.lo.fetch_min(lo, Ordering::Relaxed);
        self.hi.fetch_max(hi, Ordering::Relaxed);
    }

    /// Which of these lake rows some spine row can use; records the lake's
    /// time range and counts the rows (call it on every lake row once).
    pub fn matches(
        &self,
        ends: &TimestampMillisecondArray,
        keys: &[ArrayRef],
    ) -> Result<BooleanArray> {
        self.observe(ends);
        self.scanned.fetch_add(ends.len() as u64, Ordering::Relaxed);
        let mut keep = vec![false; ends.len()];
        self.hits(ends, keys, |r, _| keep[r as usize] = true)?;
        Ok(BooleanArray::from(keep))
    }

    /// Lake rows passed to [`Probe::matches`].
    pub fn scanned(&self) -> u64 {
        self.scanned.load(Ordering::Relaxed)
    }
}

impl AsOf {
    /// Prepares the lookup of `view` for a spine.
    ///
    /// `slide`: the window slide for windowed views (`None`: lifetime or
    /// per-event). `spine_keys`: the spine's key columns, already in the
    /// lake's key types (NULL where a value did not convert). `spine_ts`:
    /// the spine times in ms. `features`: schema of the feature columns
    /// pushed. `empty`: the one-row aggregate over the empty set, if any.
    pub fn new(
        view: &str,
        slide: Option<i64>,
        spine_keys: &[ArrayRef],
        spine_ts: &[Option<i64>],
        features: SchemaRef,
        empty: Option<RecordBatch>,
    ) -> Result<Self> {
        let n = spine_ts.len();
        let valid: Vec<bool> = (0..n)
            .map(|i| spine_ts[i].is_some() && spine_keys.iter().all(|k| k.is_valid(i)))
            .collect();
        let ts: Vec<i64> = spine_ts.iter().map(|t| t.unwrap_or(0)).collect();
        let slide = slide.filter(|s| *s > 0);
        let mut cols = spine_keys.to_vec();
        if let Some(s) = slide {
            // The one window end valid at t.
            let ends: Vec<i64> = ts.iter().map(|t| t.div_euclid(s) * s).collect();
            cols.push(Arc::new(arrow::array::Int64Array::from(ends)));
        }
        let hashes = row_hashes(view, &cols)?;
        let same = key_eq(spine_keys, spine_keys)?;
        let mut index: HashMap<u64, u32, NoHash> = HashMap::with_capacity_and_hasher(n, NoHash);
        let mut next: Vec<u32> = Vec::with_capacity(n);
        let bloom_words = (n.max(1) * 16).next_power_of_two().div_ceil(64);
        let mut bloom = vec![0u64; bloom_words];
        let mut group_of = vec![NONE; n];
        let mut group_rep: Vec<u32> = Vec::new();
        if slide.is_some() {
            next.resize(n, NONE);
        }
        for i in (0..n).filter(|i| valid[*i]) {
            let h = hashes[i];
            let bit = bloom_bit(h, bloom.len());
            bloom[bit / 64] |= 1 << (bit % 64);
            if slide.is_some() {
                // Windowed: chain spine rows.
                if let Some(old) = index.insert(h, i as u32) {
                    next[i] = old;
                }
                continue;
            }
            // Unwindowed: chain key groups.
            let mut t = index.get(&h).copied().unwrap_or(NONE);
            while t != NONE && !same(group_rep[t as usize] as usize, i) {
                t = next[t as usize];
            }
            if t == NONE {
                t = group_rep.len() as u32;
                group_rep.push(i as u32);
                next.push(index.insert(h, t).unwrap_or(NONE));
            }
            group_of[i] = t;
        }
        let p = Probe {
            view: view.to_string(),
            slide,
            spine_keys: spine_keys.to_vec(),
            valid,
            ts,
            index,
            next,
            bloom,
            group_of,
            group_rep,
            lo: AtomicI64::new(i64::MAX),
            hi: AtomicI64::new(i64::MIN),
            scanned: AtomicU64::new(0),
        };
        let groups = p.group_rep.len();
        Ok(AsOf {
            probe: Arc::new(p),
            cands: vec![Vec::new(); groups],
            features,
            picked: Vec::new(),
            pick: vec![None; n],
            empty,
            scratch: Vec::new(),
        })
    }

    /// The spine side, for filtering lake rows while they are decoded.
    pub fn probe(&self) -> Arc<Probe> {
        Arc::clone(&self.probe)
    }

    /// Feeds lake rows: their `window_end`, key columns (lake types) and
    /// feature columns (the schema given to [`AsOf::new`]). Rows no spine
    /// row uses may be left out (see [`Probe::matches`]) or included.
    pub fn push(
        &mut self,
        ends: &TimestampMillisecondArray,
        keys: &[ArrayRef],
        features: &RecordBatch,
    ) -> Result<()> {
        if ends.is_empty() {
            return Ok(());
        }
        self.probe.observe(ends);
        // (lake row, spine row or key group)
        let mut hits: Vec<(u32, u32)> = Vec::new();
        self.probe.hits(ends, keys, |r, t| hits.push((r, t)))?;
        if hits.is_empty() {
            return Ok(());
        }
        // Keep only the lake rows something matched.
        self.scratch.clear();
        self.scratch.extend(hits.iter().map(|(r, _)| *r));
        self.scratch.sort_unstable();
        self.scratch.dedup();
        let kept = if self.scratch.len() == features.num_rows() {
            features.clone()
        } else {
            let idx = UInt32Array::from(self.scratch.clone());
            take_record_batch(features, &idx).map_err(|e| {
                EngineError::arrow(format!("features of view `{}`", self.probe.view), e)
            })?
        };
        let b = self.picked.len() as u32;
        self.picked.push(kept);
        let windowed = self.probe.slide.is_some();
        for (r, target) in hits {
            let at = self.scratch.binary_search(&r).unwrap_or(0) as u32;
            if windowed {
                self.pick[target as usize] = Some((b, at));
            } else {
                self.cands[target as usize].push((ends.value(r as usize), b, at));
            }
        }
        Ok(())
    }

    /// The feature columns for the spine rows, in spine order, and how each
    /// row was found. A windowed view's empty window reads as the empty-set
    /// aggregate only inside the time the lake covers (its first to its last
    /// window end); outside, nothing is known and the features are NULL.
    /// `covered`: the lake holds rows before / after those pushed (they were
    /// limited to the spine's time range), so that side is covered.
    pub fn finish(mut self, covered: (bool, bool)) -> Result<(Vec<ArrayRef>, Vec<Found>)> {
        let p = Arc::clone(&self.probe);
        let n = p.ts.len();
        let (lo, hi) = (p.lo.load(Ordering::Relaxed), p.hi.load(Ordering::Relaxed));
        let coverage = (lo <= hi).then_some((lo, hi));
        let nb = self.picked.len();
        let (empty_ref, null_ref) = (nb, nb + 1);
        let mut refs: Vec<(usize, usize)> = Vec::with_capacity(n);
        let mut found = Vec::with_capacity(n);
        let (before, after) = covered;
        let covered = |e: i64, coverage: Option<(i64, i64)>| match coverage {
            Some((lo, hi)) => (before || e >= lo) && (after || e <= hi),
            None => before && after,
        };
        let take_empty =
            |found: &mut Vec<Found>, refs: &mut Vec<(usize, usize)>, has_empty: bool| {
                if has_empty {
                    refs.push((empty_ref, 0));
                    found.push(Found::Empty);
                } else {
                    refs.push((null_ref, 0));
                    found.push(Found::Null);
                }
            };
        match p.slide {
            Some(s) => {
                for i in 0..n {
                    if let Some((b, r)) = self.pick[i] {
                        refs.push((b as usize, r as usize));
                        found.push(Found::Row);
                    } else if p.valid[i] && covered(p.ts[i].div_euclid(s) * s, coverage) {
                        take_empty(&mut found, &mut refs, self.empty.is_some());
                    } else {
                        refs.push((null_ref, 0));
                        found.push(Found::Null);
                    }
                }
            }
            None => {
                for c in self.cands.iter_mut() {
                    c.sort_unstable_by_key(|x| x.0);
                }
                for i in 0..n {
                    if !p.valid[i] {
                        refs.push((null_ref, 0));
                        found.push(Found::Null);
                        continue;
                    }
                    let c = &self.cands[p.group_of[i] as usize];
                    let t = p.ts[i];
                    // The latest row with time <= t.
                    let k = c.partition_point(|x| x.0 <= t);
                    if k > 0 {
                        let (_, b, r) = c[k - 1];
                        refs.push((b as usize, r as usize));
                        found.push(Found::Row);
                    } else {
                        // The lake holds snapshots of unwindowed views, not
                        // every change: no snapshot before t is unknown, not zero.
                        refs.push((null_ref, 0));
                        found.push(Found::Null);
                    }
                }
            }
        }
        let mut cols = Vec::with_capacity(self.features.fields().len());
        for (ci, f) in self.features.fields().iter().enumerate() {
            let empty_col = match &self.empty {
                Some(e) => Arc::clone(e.column(ci)),
                None => new_null_array(f.data_type(), 1),
            };
            let null_col = new_null_array(f.data_type(), 1);
            let mut arrays: Vec<&dyn Array> =
                self.picked.iter().map(|b| b.column(ci).as_ref()).collect();
            arrays.push(empty_col.as_ref());
            arrays.push(null_col.as_ref());
            let col = interleave(&arrays, &refs).map_err(|e| {
                EngineError::arrow(format!("feature {} of view `{}`", f.name(), p.view), e)
            })?;
            cols.push(col);
        }
        Ok((cols, found))
    }
}

/// A time column as epoch milliseconds (UTC): timestamps of any unit and
/// time zone (their instants), or text in RFC 3339 / epoch milliseconds.
pub fn time_millis(col: &ArrayRef) -> Result<Vec<Option<i64>>> {
    use arrow::datatypes::TimeUnit;
    let ms = |div: i64, mul: i64| -> Result<Vec<Option<i64>>> {
        let a = arrow::compute::cast(col, &DataType::Int64)
            .map_err(|e| EngineError::arrow("time column", e))?;
        let a = a
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .ok_or_else(|| EngineError::Connector {
                what: "time column".into(),
                message: "not convertible to milliseconds".into(),
            })?
            .clone();
        Ok(a.iter()
            .map(|v| v.map(|v| v.div_euclid(div).saturating_mul(mul)))
            .collect())
    };
    match col.data_type() {
        DataType::Timestamp(TimeUnit::Second, _) => ms(1, 1000),
        DataType::Timestamp(TimeUnit::Millisecond, _) => ms(1, 1),
        DataType::Timestamp(TimeUnit::Microsecond, _) => ms(1000, 1),
        DataType::Timestamp(TimeUnit::Nanosecond, _) => ms(1_000_000, 1),
        DataType::Date32 => {
            let a = arrow::compute::cast(col, &DataType::Int32)
                .map_err(|e| EngineError::arrow("time column", e))?;
            let a = a
                .as_any()
                .downcast_ref::<arrow::array::Int32Array>()
                .cloned()
                .unwrap_or_else(|| arrow::array::Int32Array::from(Vec::<i32>::new()));
            Ok(a.iter()
                .map(|v| v.map(|d| i64::from(d) * 86_400_000))
                .collect())
        }
        DataType::Int64 | DataType::Int32 | DataType::UInt32 | DataType::UInt64 => ms(1, 1),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            let text = arrow::compute::cast(col, &DataType::Utf8)
                .map_err(|e| EngineError::arrow("time column", e))?;
            let text = text
                .as_any()
                .downcast_ref::<arrow::array::StringArray>()
                .cloned()
                .unwrap_or_else(|| arrow::array::StringArray::from(Vec::<&str>::new()));
            let parsed = arrow::compute::cast(
                &(Arc::new(text.clone()) as ArrayRef),
                &DataType::Timestamp(TimeUnit::Millisecond, None),
            )
            .ok();
            let parsed = parsed.as_ref().and_then(|p| {
                p.as_any()
                    .downcast_ref::<arrow::array::TimestampMillisecondArray>()
                    .cloned()
            });
            Ok((0..text.len())
                .map(|i| {
                    if text.is_null(i) {
                        return None;
                    }
                    if let Ok(v) = text.value(i).trim().parse::<i64>() {
                        return Some(v);
                    }
                    parsed
                        .as_ref()
                        .filter(|p| p.is_valid(i))
                        .map(|p| p.value(i))
                })
                .collect())
        }
        other => Err(EngineError::Connector {
            what: "time column".into(),
            message: format!("type {other} is not a time"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};

    fn spine(keys: &[Option<&str>]) -> Vec<ArrayRef> {
        vec![Arc::new(StringArray::from(keys.to_vec())) as ArrayRef]
    }

    fn lake(rows: &[(&str, i64, i64)]) -> (TimestampMillisecondArray, Vec<ArrayRef>, RecordBatch) {
        let ends = TimestampMillisecondArray::from(rows.iter().map(|r| r.1).collect::<Vec<_>>());
        let keys = vec![Arc::new(StringArray::from(
            rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        )) as ArrayRef];
        let f = RecordBatch::try_new(
            schema(),
            vec![Arc::new(Int64Array::from(
                rows.iter().map(|r| r.2).collect::<Vec<_>>(),
            ))],
        )
        .expect("batch");
        (ends, keys, f)
    }

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, true)]))
    }

    fn empty() -> RecordBatch {
        RecordBatch::try_new(schema(), vec![Arc::new(Int64Array::from(vec![0]))]).expect("empty")
    }

    fn values(cols: &[ArrayRef]) -> Vec<Option<i64>> {
        cols[0]
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("i64")
            .iter()
            .collect()
    }

    #[test]
    fn windowed_lookup_uses_the_window_valid_at_t() {
        // slide 10: a row ending at 20 is valid for t in [20, 30).
        let keys = spine(&[
            Some("a"),
            Some("a"),
            Some("a"),
            Some("a"),
            Some("b"),
            None,
            Some("a"),
        ]);
        let ts = [
            Some(20),
            Some(29),
            Some(30),
            Some(19),
            Some(25),
            Some(25),
            Some(20),
        ];
        let mut a = AsOf::new("v", Some(10), &keys, &ts, schema(), Some(empty())).expect("new");
        let (e, k, f) = lake(&[("a", 10, 1), ("a", 20, 2), ("b", 40, 9)]);
        a.push(&e, &k, &f).expect("push");
        let (cols, found) = a.finish((false, false)).expect("finish");
        // t=20: equal timestamps read the window ending at 20; t=30: it expired
        // (no row ending at 30) → empty set; t=19 reads the row ending at 10;
        // b has no row at 20 → empty set; NULL key → NULL; a duplicate spine row repeats.
        assert_eq!(
            values(&cols),
            vec![Some(2), Some(2), Some(0), Some(1), Some(0), None, Some(2)]
        );
        assert_eq!(found[2], Found::Empty);
        assert_eq!(found[5], Found::Null);
    }

    #[test]
    fn times_outside_the_lake_are_null_not_zero() {
        let keys = spine(&[Some("a"), Some("a"), Some("a")]);
        let ts = [Some(45), Some(95), Some(25)];
        let mut a = AsOf::new("v", Some(10), &keys, &ts, schema(), Some(empty())).expect("new");
        let (e, k, f) = lake(&[("a", 30, 3), ("b", 50, 1)]);
        a.push(&e, &k, &f).expect("push");
        let (cols, found) = a.finish((false, false)).expect("finish");
        // t=45: the window ending 40 is inside [30, 50] and empty for a;
        // t=95 is past the lake, t=25 before it.
        assert_eq!(values(&cols), vec![Some(0), None, None]);
        assert_eq!(found, vec![Found::Empty, Found::Null, Found::Null]);
    }

    #[test]
    fn unwindowed_lookup_takes_the_latest_earlier_row() {
        let keys = spine(&[Some("a"), Some("a"), Some("a"), Some("c")]);
        let ts = [Some(5), Some(15), Some(100), Some(100)];
        let mut a = AsOf::new("v", None, &keys, &ts, schema(), Some(empty())).expect("new");
        // Lake rows out of time order, in two pushes.
        let (e, k, f) = lake(&[("a", 15, 2), ("b", 1, 7)]);
        a.push(&e, &k, &f).expect("push");
        let (e, k, f) = lake(&[("a", 10, 1), ("a", 101, 3)]);
        a.push(&e, &k, &f).expect("push");
        let (cols, _) = a.finish((false, false)).expect("finish");
        // t=5: nothing earlier → NULL; t=15 equal time → that row; t=100 → row at 15 (101 is the future).
        assert_eq!(values(&cols), vec![None, Some(2), Some(2), None]);
    }

    #[test]
    fn times_in_any_zone_and_text() {
        let utc = TimestampMillisecondArray::from(vec![1_000]).with_timezone("UTC");
        let ny = arrow::array::TimestampMicrosecondArray::from(vec![1_000_000])
            .with_timezone("America/New_York");
        assert_eq!(
            time_millis(&(Arc::new(utc) as ArrayRef)).expect("utc"),
            vec![Some(1000)]
        );
        assert_eq!(
            time_millis(&(Arc::new(ny) as ArrayRef)).expect("ny"),
            vec![Some(1000)]
        );
        let text: ArrayRef = Arc::new(StringArray::from(vec![
            Some("1970-01-01T02:00:01+02:00"),
            Some("1500"),
            Some("nonsense"),
            None,
        ]));
        assert_eq!(
            time_millis(&text).expect("text"),
            vec![Some(1000), Some(1500), None, None]
        );
    }
}
