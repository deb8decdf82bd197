//! One committed epoch of a vector index, held in memory for queries: the
//! vectors in contiguous chunks (item id `i` at chunk `i / CHUNK`, slot
//! `i % CHUNK`), the item id → key map, the set of live ids and, per filter
//! column, a bitmap of the ids holding each value.
//!
//! A commit makes the next epoch's snapshot by copying the chunk list and
//! replacing only the chunks it touches (copy on write), then swaps it in:
//! a query holds one `Arc<Snapshot>` and so never sees half of an epoch.
//!
//! The exact scan runs over these chunks: distance kernels the compiler
//! vectorises (AVX2 when the CPU has it, chosen once per scan), and the
//! ids split over threads for large sets.

use std::collections::{BTreeMap, BinaryHeap};
use std::ops::Bound;
use std::sync::{Arc, Mutex};

use roaring::RoaringBitmap;
use sluice_sql::vector::Distance;

/// Items per chunk.
pub const CHUNK: usize = 1024;

/// Sets smaller than this are scanned on one thread.
const PARALLEL_FROM: u64 = 65_536;

/// A filter column's value for one key.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(untagged)]
pub enum Attr {
    /// NULL.
    Null,
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// Text.
    Text(String),
}

#[derive(Debug, Clone)]
struct Chunk {
    vectors: Vec<f32>,
    norms: Vec<f32>,
    keys: Vec<Option<Arc<str>>>,
    attrs: Vec<Option<Arc<[Attr]>>>,
}

impl Chunk {
    fn new(dims: usize) -> Chunk {
        Chunk {
            vectors: vec![0.0; CHUNK * dims],
            norms: vec![0.0; CHUNK],
            keys: vec![None; CHUNK],
            attrs: vec![None; CHUNK],
        }
    }
}

/// A change one commit makes.
#[derive(Debug, Clone)]
pub(super) enum Change {
    /// `id` now holds `key` with this vector and filter values.
    Put {
        id: u32,
        key: Arc<str>,
        vector: Vec<f32>,
        attrs: Vec<Attr>,
    },
    /// `id` left the index.
    Remove { id: u32 },
}

/// One committed epoch of an index.
pub struct Snapshot {
    epoch: Option<u64>,
    dims: usize,
    distance: Distance,
    chunks: Vec<Arc<Chunk>>,
    live: RoaringBitmap,
    facets: Vec<BTreeMap<Attr, Arc<RoaringBitmap>>>,
    /// Open arroy readers of this epoch, reused across queries.
    pub(super) readers: Mutex<Vec<super::PooledReader>>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Snapshot(epoch {:?}, {} items)",
            self.epoch,
            self.live.len()
        )
    }
}

/// A query vector prepared for the exact scan.
#[derive(Debug, Clone)]
pub(super) struct Prepared {
    pub(super) vector: Vec<f32>,
    pub(super) norm: f32,
    /// An id left out of the answer (the query key's own item).
    pub(super) skip: Option<u32>,
}

impl Prepared {
    pub(super) fn new(vector: Vec<f32>, skip: Option<u32>) -> Prepared {
        let norm = dot(&vector, &vector).sqrt();
        Prepared { vector, norm, skip }
    }
}

/// Best-first candidates of one query: a max-heap of the k smallest.
type Best = BinaryHeap<(Ordered, u32)>;

impl Snapshot {
    /// An empty index at `epoch`.
    pub(super) fn empty(
        epoch: Option<u64>,
        dims: usize,
        distance: Distance,
        filters: usize,
    ) -> Snapshot {
        Snapshot {
            epoch,
            dims,
            distance,
            chunks: Vec::new(),
            live: RoaringBitmap::new(),
            facets: vec![BTreeMap::new(); filters],
            readers: Mutex::new(Vec::new()),
        }
    }

    /// The next epoch's snapshot: this one with `changes` applied; only the
    /// chunks they touch are copied.
    pub(super) fn next(&self, epoch: Option<u64>, changes: &[Change]) -> Snapshot {
        let mut s = Snapshot {
            epoch,
            dims: self.dims,
            distance: self.distance,
            chunks: self.chunks.clone(),
            live: self.live.clone(),
            facets: self.facets.clone(),
            readers: Mutex::new(Vec::new()),
        };
        for c in changes {
            s.apply(c);
        }
        s
    }

    pub(super) fn apply(&mut self, c: &Change) {
        let dims = self.dims;
        match c {
            Change::Put {
                id,
                key,
                vector,
                attrs,
            } => {
                let (ci, slot) = (*id as usize / CHUNK, *id as usize % CHUNK);
                while self.chunks.len() <= ci {
                    self.chunks.push(Arc::new(Chunk::new(dims)));
                }
                let chunk = Arc::make_mut(&mut self.chunks[ci]);
                let old = chunk.attrs[slot].take();
                chunk.vectors[slot * dims..(slot + 1) * dims].copy_from_slice(vector);
                chunk.norms[slot] = dot(vector, vector).sqrt();
                chunk.keys[slot] = Some(Arc::clone(key));
                if !self.facets.is_empty() {
                    chunk.attrs[slot] = Some(attrs.clone().into());
                }
                self.live.insert(*id);
                if let Some(old) = old {
                    self.unindex(*id, &old);
                }
                for (f, a) in self.facets.iter_mut().zip(attrs) {
                    Arc::make_mut(f.entry(a.clone()).or_default()).insert(*id);
                }
            }
            Change::Remove { id } => {
                let (ci, slot) = (*id as usize / CHUNK, *id as usize % CHUNK);
                self.live.remove(*id);
                let Some(chunk) = self.chunks.get_mut(ci) else {
                    return;
                };
                let chunk = Arc::make_mut(chunk);
                chunk.keys[slot] = None;
                if let Some(old) = chunk.attrs[slot].take() {
                    self.unindex(*id, &old);
                }
            }
        }
    }

    fn unindex(&mut self, id: u32, attrs: &[Attr]) {
        for (f, a) in self.facets.iter_mut().zip(attrs) {
            if let Some(b) = f.get_mut(a) {
                Arc::make_mut(b).remove(id);
                if b.is_empty() {
                    f.remove(a);
                }
            }
        }
    }

    /// The epoch it holds.
    pub fn epoch(&self) -> Option<u64> {
        self.epoch
    }

    /// Ids of the indexed keys.
    pub fn live(&self) -> &RoaringBitmap {
        &self.live
    }

    /// Number of indexed keys.
    pub fn len(&self) -> u64 {
        self.live.len()
    }

    /// Whether no key is indexed.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// The key of item `id`.
    pub fn key(&self, id: u32) -> Option<&Arc<str>> {
        if !self.live.contains(id) {
            return None;
        }
        self.chunks
            .get(id as usize / CHUNK)?
            .keys
            .get(id as usize % CHUNK)?
            .as_ref()
    }

    /// The vector of item `id`.
    pub fn vector(&self, id: u32) -> Option<&[f32]> {
        if !self.live.contains(id) {
            return None;
        }
        let (ci, slot) = (id as usize / CHUNK, id as usize % CHUNK);
        self.chunks
            .get(ci)?
            .vectors
            .get(slot * self.dims..(slot + 1) * self.dims)
    }

    /// The ids whose filter column `c` holds `v`.
    pub fn facet_value(&self, c: usize, v: &Attr) -> RoaringBitmap {
        self.facets
            .get(c)
            .and_then(|f| f.get(v))
            .map(|b| (**b).clone())
            .unwrap_or_default()
    }

    /// The ids whose filter column `c` is below (`Less`) or above
    /// (`Greater`) `v`, or equal too when `inclusive`; values of another
    /// kind never match.
    pub fn facet_range(
        &self,
        c: usize,
        v: &Attr,
        side: std::cmp::Ordering,
        inclusive: bool,
    ) -> RoaringBitmap {
        let Some(f) = self.facets.get(c) else {
            return RoaringBitmap::new();
        };
        let (lo, hi): (Bound<Attr>, Bound<Attr>) = match v {
            Attr::Null => return RoaringBitmap::new(),
            Attr::Bool(_) => (
                Bound::Included(Attr::Bool(false)),
                Bound::Included(Attr::Bool(true)),
            ),
            Attr::Int(_) => (
                Bound::Included(Attr::Int(i64::MIN)),
                Bound::Included(Attr::Int(i64::MAX)),
            ),
            Attr::Text(_) => (Bound::Included(Attr::Text(String::new())), Bound::Unbounded),
        };
        let at = |v: &Attr| {
            if inclusive {
                Bound::Included(v.clone())
            } else {
                Bound::Excluded(v.clone())
            }
        };
        let (lo, hi) = match side {
            std::cmp::Ordering::Less => (lo, at(v)),
            _ => (at(v), hi),
        };
        let mut out = RoaringBitmap::new();
        // An empty range (e.g. `x < i64::MIN`) would panic in BTreeMap::range.
        let empty = match (&lo, &hi) {
            (Bound::Included(a) | Bound::Excluded(a), Bound::Included(b) | Bound::Excluded(b)) => {
                a > b
                    || (a == b
                        && !(matches!(lo, Bound::Included(_)) && matches!(hi, Bound::Included(_))))
            }
            _ => false,
        };
        if empty {
            return out;
        }
        for b in f.range((lo, hi)).map(|(_, b)| b) {
            out |= &**b;
        }
        out
    }

    /// The exact `k` nearest items of `set` to each query, nearest first,
    /// with distances in Sluice's units (cosine: 1 − cos, euclidean: L2,
    /// dot: −dot). `threads` = 0 picks by the size of the set.
    pub(super) fn scan(
        &self,
        queries: &[Prepared],
        k: usize,
        set: &RoaringBitmap,
        threads: usize,
    ) -> Vec<Vec<(f32, u32)>> {
        let n = set.len();
        let threads = match threads {
            0 if n >= PARALLEL_FROM => std::thread::available_parallelism()
                .map(|p| p.get())
                .unwrap_or(1),
            0 => 1,
            t => t,
        }
        .min(n.max(1) as usize)
        .max(1);
        let mut best: Vec<Best> = if threads == 1 {
            self.scan_part(queries, k, set.iter())
        } else {
            // Split the set into `threads` runs of equal size.
            let bounds: Vec<u32> = (0..threads)
                .map(|t| {
                    set.select((n * t as u64 / threads as u64) as u32)
                        .unwrap_or(u32::MAX)
                })
                .collect();
            let parts: Vec<Vec<Best>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..threads)
                    .map(|t| {
                        let lo = bounds[t];
                        let hi = bounds.get(t + 1).copied();
                        s.spawn(move || {
                            let it = match hi {
                                Some(hi) => set.range(lo..hi),
                                None => set.range(lo..),
                            };
                            self.scan_part(queries, k, it)
                        })
                    })
                    .collect();
                handles.into_iter().filter_map(|h| h.join().ok()).collect()
            });
            let mut merged: Vec<Best> = vec![BinaryHeap::with_capacity(k + 1); queries.len()];
            for part in parts {
                for (m, p) in merged.iter_mut().zip(part) {
                    for e in p {
                        push_best(m, k, e.0.0, e.1);
                    }
                }
            }
            merged
        };
        best.iter_mut()
            .map(|b| {
                let mut v: Vec<(f32, u32)> = std::mem::take(b)
                    .into_iter()
                    .map(|(d, id)| (self.finish(d.0), id))
                    .collect();
                v.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                v
            })
            .collect()
    }

    /// A raw scan score in Sluice's distance units.
    fn finish(&self, raw: f32) -> f32 {
        match self.distance {
            Distance::Euclidean => raw.max(0.0).sqrt(),
            _ => raw,
        }
    }

    fn scan_part(
        &self,
        queries: &[Prepared],
        k: usize,
        ids: roaring::bitmap::Iter<'_>,
    ) -> Vec<Best> {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU was just checked to have AVX2.
                #[allow(unsafe_code)]
                return unsafe { self.scan_part_avx2(queries, k, ids) };
            }
        }
        self.scan_part_inline(queries, k, ids)
    }

    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    #[target_feature(enable = "avx2")]
    unsafe fn scan_part_avx2(
        &self,
        queries: &[Prepared],
        k: usize,
        ids: roaring::bitmap::Iter<'_>,
    ) -> Vec<Best> {
        self.scan_part_inline(queries, k, ids)
    }

    #[inline(always)]
    fn scan_part_inline(
        &self,
        queries: &[Prepared],
        k: usize,
        ids: roaring::bitmap::Iter<'_>,
    ) -> Vec<Best> {
        let dims = self.dims;
        let mut best: Vec<Best> = vec![BinaryHeap::with_capacity(k + 1); queries.len()];
        let mut worst: Vec<f32> = vec![f32::INFINITY; queries.len()];
        for id in ids {
            let (ci, slot) = (id as usize / CHUNK, id as usize % CHUNK);
            let Some(chunk) = self.chunks.get(ci) else {
                continue;
            };
            let Some(x) = chunk.vectors.get(slot * dims..(slot + 1) * dims) else {
                continue;
            };
            for (qi, q) in queries.iter().enumerate() {
                if q.skip == Some(id) {
                    continue;
                }
                let d = match self.distance {
                    Distance::Cosine => {
                        let nn = q.norm * chunk.norms[slot];
                        if nn > f32::EPSILON {
                            1.0 - (dot(&q.vector, x) / nn).clamp(-1.0, 1.0)
                        } else {
                            0.0
                        }
                    }
                    Distance::Euclidean => l2sq(&q.vector, x),
                    Distance::Dot => -dot(&q.vector, x),
                };
                if d < worst[qi] || best[qi].len() < k {
                    push_best(&mut best[qi], k, d, id);
                    if best[qi].len() == k {
                        worst[qi] = best[qi].peek().map(|b| b.0.0).unwrap_or(f32::INFINITY);
                    }
                }
            }
        }
        best
    }
}

fn push_best(b: &mut Best, k: usize, d: f32, id: u32) {
    if b.len() < k {
        b.push((Ordered(d), id));
    } else if b.peek().is_some_and(|w| (Ordered(d), id) < *w) {
        b.pop();
        b.push((Ordered(d), id));
    }
}

/// Lanes of the distance kernels: independent sums the compiler keeps in
/// vector registers.
const LANES: usize = 16;

/// The dot product of two vectors of one length.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let whole = n / LANES * LANES;
    let mut acc = [0.0f32; LANES];
    for (x, y) in a[..whole]
        .chunks_exact(LANES)
        .zip(b[..whole].chunks_exact(LANES))
    {
        for ((s, x), y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in a[whole..n].iter().zip(&b[whole..n]) {
        s += x * y;
    }
    s
}

/// The squared L2 distance of two vectors of one length.
#[inline(always)]
pub fn l2sq(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let whole = n / LANES * LANES;
    let mut acc = [0.0f32; LANES];
    for (x, y) in a[..whole]
        .chunks_exact(LANES)
        .zip(b[..whole].chunks_exact(LANES))
    {
        for ((s, x), y) in acc.iter_mut().zip(x).zip(y) {
            let d = x - y;
            *s += d * d;
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in a[whole..n].iter().zip(&b[whole..n]) {
        let d = x - y;
        s += d * d;
    }
    s
}

/// A totally ordered f32 for the scan's heaps.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Ordered(f32);

impl Eq for Ordered {}

impl PartialOrd for Ordered {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl Ord for Ordered {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0)
    }
}
