//! The nearest-neighbour index of a view's vector feature: arroy's random
//! projection trees in an LMDB environment (heed) under the state dir, at
//! `index/<view>/`.
//!
//! The index mirrors the online store: for each key whose current row holds
//! a non-NULL vector, one arroy item. Entity keys map to arroy's `u32` item
//! ids through two LMDB tables (`keys`: key → id and valid-until, `ids`:
//! id → key); ids of removed keys are reused. Every checkpoint applies the
//! rows the view emitted since the last one, removes the keys whose row
//! expired under the checkpoint's watermark, rebuilds the trees that changed
//! and records the checkpoint epoch, all in one LMDB write transaction that
//! commits just before the RocksDB checkpoint. On open, an index whose epoch
//! is not the state's is rebuilt from the online store, so after a crash
//! between the two commits the index never disagrees with what `sluice get`
//! serves.
//!
//! Queries run against a [`Snapshot`] of one committed epoch held in
//! memory (the vectors in contiguous chunks, the id → key map and the
//! bitmaps of the filter columns) together with an arroy reader opened on
//! a read transaction of that same epoch. Each commit publishes the next
//! snapshot (copy on write of the chunks it touched); readers are pooled
//! per snapshot, so a query opens neither a transaction nor a reader.

pub mod filter;
mod snapshot;

use std::collections::BTreeSet;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use arroy::distances::{Cosine, DotProduct, Euclidean};
use arroy::internals::{KeyCodec, NodeCodec};
use arroy::{Reader, Writer};
use heed::types::{Bytes, Str, U32, Unit};
use heed::{CommitOrAbort, Database, Env, EnvOpenOptions, RoTxn, RwTxn, WithoutTls};
use rand::SeedableRng;
use rand::rngs::StdRng;
use roaring::RoaringBitmap;
use sluice_sql::vector::{Distance, FilterKind, VectorIndexPlan};

use crate::error::{EngineError, Result};
pub use filter::Filter;
pub use snapshot::{Attr, Snapshot};
use snapshot::{Change, Prepared};

/// arroy's index number inside the environment (one index per environment).
const INDEX: u16 = 0;
/// Address space reserved for an index; LMDB files only grow as pages are written.
const MAP_SIZE: usize = 1 << 40;
/// Default candidates a query inspects per requested neighbour and tree
/// (`search_k`); see `docs/vectors.md` for the measured trade-off.
pub const DEFAULT_SEARCH_K: usize = 10;
/// How long a query waits for the snapshot of an epoch LMDB already
/// committed (the writer publishes it right after the commit).
const SNAPSHOT_WAIT: Duration = Duration::from_secs(10);
/// A tree search inspecting more than 1/SCAN_RATIO of the set it searches
/// is answered by the exact scan instead.
const SCAN_RATIO: u64 = 16;
/// Readers kept open per snapshot.
const POOL: usize = 64;
/// Query vectors an exact scan takes at a time between deadline checks.
const SCAN_CHUNK: usize = 8;

type Db<K, V> = Database<'static, K, V>;

/// The environment's tables, in this order.
const TABLES: [&str; 6] = ["arroy", "keys", "ids", "free", "meta", "attrs"];

/// A row change the index applies: key, its vector (`None`: NULL, the key
/// leaves the index) and the time its row stops being valid.
#[derive(Debug, Clone, PartialEq)]
pub struct VectorUpdate {
    /// Entity key (as the online store spells it).
    pub key: String,
    /// The current vector, if not NULL.
    pub vector: Option<Vec<f32>>,
    /// `valid_until` of the row (windowed views), in ms.
    pub valid_until: Option<i64>,
    /// The row's values of the index's filter columns, in their order
    /// (missing ones are NULL).
    pub attrs: Vec<Attr>,
}

/// One neighbour found.
#[derive(Debug, Clone, PartialEq)]
pub struct Neighbour {
    /// Entity key.
    pub key: String,
    /// Distance to the query (cosine: 1 − cos; euclidean: L2; dot: −dot).
    pub distance: f32,
}

/// A view's vector index.
pub struct VectorIndex {
    view: String,
    path: PathBuf,
    env: Env<WithoutTls>,
    arroy: Db<Bytes, Bytes>,
    keys: Db<Bytes, Bytes>,
    ids: Db<U32<heed::byteorder::BE>, Bytes>,
    free: Db<U32<heed::byteorder::BE>, Unit>,
    meta: Db<Str, Bytes>,
    /// id → the JSON array of its filter values (absent in indexes written
    /// before filter columns existed).
    attrs: Option<Db<U32<heed::byteorder::BE>, Bytes>>,
    plan: VectorIndexPlan,
    /// (valid_until, id) of indexed keys, to find expired rows.
    expiry: Mutex<BTreeSet<(i64, u32)>>,
    /// The newest committed epoch, as queries see it.
    snapshot: RwLock<Arc<Snapshot>>,
    /// Whether this process writes the index (it then publishes every
    /// snapshot itself); a reader loads the snapshot of whatever epoch
    /// LMDB holds.
    writer: bool,
}

impl std::fmt::Debug for VectorIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VectorIndex({}, {})", self.view, self.path.display())
    }
}

/// The directory of `view`'s index under a state dir.
pub fn index_dir(state_dir: &Path, view: &str) -> PathBuf {
    state_dir.join("index").join(view)
}

/// Longest entity key stored as itself in the `keys` table (LMDB takes
/// keys of 1 to 511 bytes).
const RAW_KEY_MAX: usize = 480;

/// The `keys` table's key of an entity key: a tag byte, then the key
/// itself when it is short, else its SHA-256 digest. Every key the online
/// store accepts fits, the empty one and one of a megabyte alike; the `ids`
/// table keeps the whole key.
fn lmdb_key(key: &str) -> Vec<u8> {
    use sha2::Digest;
    let b = key.as_bytes();
    if b.len() <= RAW_KEY_MAX {
        let mut k = Vec::with_capacity(b.len() + 1);
        k.push(0);
        k.extend_from_slice(b);
        k
    } else {
        let mut k = Vec::with_capacity(33);
        k.push(1);
        k.extend_from_slice(&sha2::Sha256::digest(b));
        k
    }
}

fn encode_entry(id: u32, valid_until: Option<i64>) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..4].copy_from_slice(&id.to_be_bytes());
    b[4..].copy_from_slice(&valid_until.unwrap_or(i64::MAX).to_be_bytes());
    b
}

fn decode_entry(b: &[u8]) -> Option<(u32, i64)> {
    let id = u32::from_be_bytes(b.get(..4)?.try_into().ok()?);
    let vu = i64::from_be_bytes(b.get(4..12)?.try_into().ok()?);
    Some((id, vu))
}

/// Runs `$body` with `$D` bound to the arroy distance type of `$dist`.
macro_rules! with_distance {
    ($dist:expr, $D:ident, $body:expr) => {
        match $dist {
            Distance::Cosine => {
                type $D = Cosine;
                $body
            }
            Distance::Euclidean => {
                type $D = Euclidean;
                $body
            }
            Distance::Dot => {
                type $D = DotProduct;
                $body
            }
        }
    };
}

/// Our distance units from arroy's.
fn from_arroy(d: Distance, v: f32) -> f32 {
    match d {
        // arroy: (1 − cos) / 2.
        Distance::Cosine => 2.0 * v,
        Distance::Euclidean => v,
        // arroy: the dot product (larger is nearer).
        Distance::Dot => -v,
    }
}

/// An arroy reader of one distance type.
enum AnyReader {
    Cosine(Reader<'static, Cosine>),
    Euclidean(Reader<'static, Euclidean>),
    Dot(Reader<'static, DotProduct>),
    /// The trees were never built (an empty index).
    None,
}

impl AnyReader {
    /// Trees of the index it reads (0 before the first build).
    fn n_trees(&self) -> usize {
        match self {
            AnyReader::Cosine(r) => r.n_trees(),
            AnyReader::Euclidean(r) => r.n_trees(),
            AnyReader::Dot(r) => r.n_trees(),
            AnyReader::None => 0,
        }
    }
}

/// The arroy distance types the index uses, and their reader slot.
trait Pick: arroy::Distance + Sized {
    fn wrap(r: Reader<'static, Self>) -> AnyReader;
    fn get(r: &AnyReader) -> Option<&Reader<'static, Self>>;
}

macro_rules! pick {
    ($D:ty, $v:ident) => {
        impl Pick for $D {
            fn wrap(r: Reader<'static, Self>) -> AnyReader {
                AnyReader::$v(r)
            }
            fn get(r: &AnyReader) -> Option<&Reader<'static, Self>> {
                match r {
                    AnyReader::$v(r) => Some(r),
                    _ => None,
                }
            }
        }
    };
}
pick!(Cosine, Cosine);
pick!(Euclidean, Euclidean);
pick!(DotProduct, Dot);

/// A read transaction with the arroy reader opened on it, both of one
/// epoch, kept in its snapshot's pool between queries.
pub(crate) struct PooledReader {
    // Declared before `txn`: the reader borrows the transaction and is
    // dropped first.
    reader: AnyReader,
    txn: Box<RoTxn<'static, WithoutTls>>,
    epoch: Option<u64>,
}

/// What to search around.
#[derive(Debug, Clone, Copy)]
pub enum Query<'a> {
    /// A vector of the index's dimension.
    Vector(&'a [f32]),
    /// The current vector of a key in the index (the key itself is left out).
    Key(&'a str),
}

/// A nearest-neighbour request: one or more queries answered against one
/// epoch.
#[derive(Debug, Clone)]
pub struct Search<'a> {
    /// What to search around.
    pub queries: Vec<Query<'a>>,
    /// Neighbours per query.
    pub k: usize,
    /// Overrides the candidates per neighbour and tree of the tree search.
    pub search_k: Option<usize>,
    /// Scan every (filtered) vector instead of the trees.
    pub exact: bool,
    /// Only keys this filter is true for.
    pub filter: Option<&'a Filter>,
    /// Threads of an exact scan (0: by the size of the set).
    pub threads: usize,
    /// Past this instant the search stops between query vectors with
    /// [`EngineError::Overloaded`] (a request's deadline).
    pub deadline: Option<Instant>,
}

impl<'a> Search<'a> {
    /// One query, `k` neighbours, defaults otherwise.
    pub fn one(query: Query<'a>, k: usize) -> Search<'a> {
        Search {
            queries: vec![query],
            k,
            search_k: None,
            exact: false,
            filter: None,
            threads: 0,
            deadline: None,
        }
    }
}

/// The answer to a [`Search`].
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// Per query, in order: its neighbours, nearest first (`None`: the
    /// query key has no vector in the index).
    pub results: Vec<Option<Vec<Neighbour>>>,
    /// The epoch answered from.
    pub epoch: Option<u64>,
    /// Whether it was answered by an exact scan: asked for, a filter
    /// selecting less than half of the index, or a tree search that would
    /// have inspected more than a sixteenth of the set.
    pub exact: bool,
    /// Keys the filter selected (`None`: no filter).
    pub selected: Option<u64>,
}

impl VectorIndex {
    fn err(&self, what: &str, e: impl std::fmt::Display) -> EngineError {
        index_err(&self.path, what, e)
    }

    /// Opens (or creates) the index of `view` under `state_dir`, for this
    /// process to write.
    pub fn open(state_dir: &Path, view: &str, plan: &VectorIndexPlan) -> Result<Self> {
        let path = index_dir(state_dir, view);
        std::fs::create_dir_all(&path).map_err(|e| EngineError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        let env = open_env(&path)?;
        let wtxn = env.write_txn().map_err(|e| index_err(&path, "open", e))?;
        let created = env
            .create_databases_and_commit(wtxn, |dbo, wtxn| -> heed::Result<_> {
                let [a, b, c, d, e, f] = TABLES;
                Ok(CommitOrAbort::<_, ()>::Commit((
                    dbo.create_database::<Bytes, Bytes>(wtxn, Some(a))?,
                    dbo.create_database::<Bytes, Bytes>(wtxn, Some(b))?,
                    dbo.create_database::<Bytes, Bytes>(wtxn, Some(c))?,
                    dbo.create_database::<Bytes, Bytes>(wtxn, Some(d))?,
                    dbo.create_database::<Bytes, Bytes>(wtxn, Some(e))?,
                    dbo.create_database::<Bytes, Bytes>(wtxn, Some(f))?,
                )))
            })
            .map_err(|e| index_err(&path, "open", e))?;
        let CommitOrAbort::Commit((arroy, keys, ids, free, meta, attrs)) = created else {
            return Err(index_err(&path, "open", "creating the tables was aborted"));
        };
        let ids = ids.remap_key_type::<U32<heed::byteorder::BE>>();
        let free = free.remap_types::<U32<heed::byteorder::BE>, Unit>();
        let meta = meta.remap_key_type::<Str>();
        let attrs = attrs.remap_key_type::<U32<heed::byteorder::BE>>();
        let mut wtxn = env.write_txn().map_err(|e| index_err(&path, "open", e))?;
        // A changed dimension, distance or set of filter columns
        // invalidates the items: start over (the job then rebuilds the
        // index from the online store).
        let shape = shape(plan);
        let old = meta
            .get(&wtxn, "shape")
            .map_err(|e| index_err(&path, "open", e))?
            .map(|b| b.to_vec());
        if old.as_deref() != Some(shape.as_bytes()) {
            for db in [arroy, keys] {
                db.clear(&mut wtxn)
                    .map_err(|e| index_err(&path, "open", e))?;
            }
            ids.clear(&mut wtxn)
                .map_err(|e| index_err(&path, "open", e))?;
            attrs
                .clear(&mut wtxn)
                .map_err(|e| index_err(&path, "open", e))?;
            free.clear(&mut wtxn)
                .map_err(|e| index_err(&path, "open", e))?;
            meta.clear(&mut wtxn)
                .map_err(|e| index_err(&path, "open", e))?;
            meta.put(&mut wtxn, "shape", shape.as_bytes())
                .map_err(|e| index_err(&path, "open", e))?;
        }
        // Readers in other processes (`sluice nearest`) learn the settings here.
        let plan_json = serde_json::to_vec(plan).map_err(|e| index_err(&path, "open", e))?;
        meta.put(&mut wtxn, "plan", &plan_json)
            .map_err(|e| index_err(&path, "open", e))?;
        let mut expiry = BTreeSet::new();
        for e in keys.iter(&wtxn).map_err(|e| index_err(&path, "open", e))? {
            let (_, v) = e.map_err(|e| index_err(&path, "open", e))?;
            if let Some((id, vu)) = decode_entry(v)
                && vu != i64::MAX
            {
                expiry.insert((vu, id));
            }
        }
        wtxn.commit().map_err(|e| index_err(&path, "open", e))?;
        let mut idx = VectorIndex {
            view: view.to_string(),
            path,
            env,
            arroy,
            keys,
            ids,
            free,
            meta,
            attrs: Some(attrs),
            plan: plan.clone(),
            expiry: Mutex::new(expiry),
            snapshot: RwLock::new(Arc::new(Snapshot::empty(
                None,
                plan.dims,
                plan.distance,
                plan.filter_columns.len(),
            ))),
            writer: true,
        };
        idx.load()?;
        Ok(idx)
    }

    /// Opens an existing index for reading, with the settings it was
    /// written with (another process may be writing it).
    pub fn open_existing(state_dir: &Path, view: &str) -> Result<Self> {
        let path = index_dir(state_dir, view);
        if !path.join("data.mdb").exists() {
            return Err(EngineError::BadRequest(format!(
                "view `{view}` has no vector index in {} (is vector_index set, and has the pipeline run?)",
                state_dir.display()
            )));
        }
        let env = open_env(&path)?;
        let rtxn = env.read_txn().map_err(|e| index_err(&path, "open", e))?;
        let opened = env
            .open_databases_and_commit(rtxn, |dbo, rtxn| -> heed::Result<_> {
                let [a, b, c, d, e, f] = TABLES;
                Ok(CommitOrAbort::<_, ()>::Commit([
                    dbo.open_database::<Bytes, Bytes>(rtxn, Some(a))?,
                    dbo.open_database::<Bytes, Bytes>(rtxn, Some(b))?,
                    dbo.open_database::<Bytes, Bytes>(rtxn, Some(c))?,
                    dbo.open_database::<Bytes, Bytes>(rtxn, Some(d))?,
                    dbo.open_database::<Bytes, Bytes>(rtxn, Some(e))?,
                    dbo.open_database::<Bytes, Bytes>(rtxn, Some(f))?,
                ]))
            })
            .map_err(|e| index_err(&path, "open", e))?;
        let CommitOrAbort::Commit(dbs) = opened else {
            return Err(index_err(&path, "open", "opening the tables was aborted"));
        };
        let mut dbs = Vec::from(dbs);
        let attrs = dbs
            .pop()
            .flatten()
            .map(|d| d.remap_key_type::<U32<heed::byteorder::BE>>());
        let dbs: Vec<Db<Bytes, Bytes>> = dbs
            .into_iter()
            .zip(TABLES)
            .map(|(d, t)| d.ok_or_else(|| index_err(&path, "open", format!("table `{t}` missing"))))
            .collect::<Result<_>>()?;
        let [arroy, keys, ids, free, meta]: [Db<Bytes, Bytes>; 5] = dbs
            .try_into()
            .map_err(|_| index_err(&path, "open", "table count"))?;
        let ids = ids.remap_key_type::<U32<heed::byteorder::BE>>();
        let free = free.remap_types::<U32<heed::byteorder::BE>, Unit>();
        let meta = meta.remap_key_type::<Str>();
        let rtxn = env.read_txn().map_err(|e| index_err(&path, "open", e))?;
        let plan: VectorIndexPlan = meta
            .get(&rtxn, "plan")
            .map_err(|e| index_err(&path, "open", e))?
            .and_then(|b| serde_json::from_slice(b).ok())
            .ok_or_else(|| index_err(&path, "open", "no settings recorded"))?;
        // An index whose `keys` table holds untagged keys (before
        // `lmdb_key`) cannot be read by key: the job rebuilds it.
        let current = meta
            .get(&rtxn, "shape")
            .map_err(|e| index_err(&path, "open", e))?
            .is_some_and(|b| b == shape(&plan).as_bytes());
        if !current {
            return Err(EngineError::Incompatible {
                path: path.display().to_string(),
                reason: "the index was written by an older Sluice build; `sluice run` on this state dir rebuilds it".into(),
            });
        }
        drop(rtxn);
        let mut idx = VectorIndex {
            view: view.to_string(),
            path,
            env,
            arroy,
            keys,
            ids,
            free,
            meta,
            attrs,
            snapshot: RwLock::new(Arc::new(Snapshot::empty(
                None,
                plan.dims,
                plan.distance,
                plan.filter_columns.len(),
            ))),
            plan,
            expiry: Mutex::new(BTreeSet::new()),
            writer: false,
        };
        idx.load()?;
        Ok(idx)
    }

    /// Loads the snapshot of the epoch LMDB holds now.
    fn load(&mut self) -> Result<()> {
        let rtxn = self.env.read_txn().map_err(|e| self.err("read", e))?;
        let epoch = self.epoch_in(&rtxn)?;
        let snap = self.snapshot_of(&rtxn, epoch)?;
        drop(rtxn);
        let path = self.path.clone();
        *self
            .snapshot
            .get_mut()
            .map_err(|_| index_err(&path, "read", "a writer panicked"))? = Arc::new(snap);
        Ok(())
    }

    /// Reads every item of the index into a snapshot.
    fn snapshot_of(&self, rtxn: &RoTxn, epoch: Option<u64>) -> Result<Snapshot> {
        let mut snap = Snapshot::empty(
            epoch,
            self.plan.dims,
            self.plan.distance,
            self.plan.filter_columns.len(),
        );
        let nf = self.plan.filter_columns.len();
        with_distance!(self.plan.distance, D, {
            let db: arroy::Database<D> = self.arroy.remap_types::<KeyCodec, NodeCodec<D>>();
            let w = Writer::<D>::new(db, INDEX, self.plan.dims);
            for e in self.ids.iter(rtxn).map_err(|e| self.err("read", e))? {
                let (id, key) = e.map_err(|e| self.err("read", e))?;
                let key: Arc<str> = String::from_utf8_lossy(key).into();
                let vector = w
                    .item_vector(rtxn, id)
                    .map_err(|e| self.err("read", e))?
                    .ok_or_else(|| self.err("read", format!("key {key} has no item {id}")))?;
                let mut attrs: Vec<Attr> = match (&self.attrs, nf) {
                    (Some(db), 1..) => db
                        .get(rtxn, &id)
                        .map_err(|e| self.err("read", e))?
                        .and_then(|b| serde_json::from_slice(b).ok())
                        .unwrap_or_default(),
                    _ => Vec::new(),
                };
                attrs.resize(nf, Attr::Null);
                snap.apply(&Change::Put {
                    id,
                    key,
                    vector,
                    attrs,
                });
            }
        });
        Ok(snap)
    }

    /// The view it indexes.
    pub fn view(&self) -> &str {
        &self.view
    }

    /// The index's settings.
    pub fn plan(&self) -> &VectorIndexPlan {
        &self.plan
    }

    fn epoch_in(&self, rtxn: &RoTxn) -> Result<Option<u64>> {
        Ok(self
            .meta
            .get(rtxn, "epoch")
            .map_err(|e| self.err("read", e))?
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes))
    }

    /// The checkpoint epoch the index was last committed with (`None`: never).
    pub fn epoch(&self) -> Result<Option<u64>> {
        let rtxn = self.env.read_txn().map_err(|e| self.err("read", e))?;
        self.epoch_in(&rtxn)
    }

    /// The snapshot queries see now.
    pub fn snapshot(&self) -> Result<Arc<Snapshot>> {
        self.snapshot
            .read()
            .map(|s| Arc::clone(&s))
            .map_err(|_| self.err("read", "a writer panicked"))
    }

    /// Trees of the committed index (0 before the first build).
    pub fn trees(&self) -> Result<usize> {
        let (snap, r) = self.consistent()?;
        let n = r.reader.n_trees();
        Self::give_back(&snap, r);
        Ok(n)
    }

    /// Number of indexed keys.
    pub fn len(&self) -> Result<u64> {
        Ok(self.consistent()?.0.len())
    }

    /// Whether no key is indexed.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Applies a checkpoint's row changes, removes the keys whose rows
    /// expire at watermark `wm`, rebuilds the trees and records `epoch`, in
    /// one LMDB transaction, then publishes the epoch's snapshot. `reset`
    /// first empties the index (a rebuild).
    pub fn apply(
        &self,
        epoch: u64,
        updates: &[VectorUpdate],
        wm: Option<i64>,
        reset: bool,
    ) -> Result<ApplyStats> {
        let mut wtxn = self.env.write_txn().map_err(|e| self.err("write", e))?;
        let mut expiry = self
            .expiry
            .lock()
            .map_err(|_| self.err("write", "a writer panicked"))?
            .clone();
        let mut stats = ApplyStats::default();
        let mut changes = Vec::new();
        let nf = self.plan.filter_columns.len();
        with_distance!(self.plan.distance, D, {
            let db: arroy::Database<D> = self.arroy.remap_types::<KeyCodec, NodeCodec<D>>();
            let writer = Writer::<D>::new(db, INDEX, self.plan.dims);
            if reset {
                writer.clear(&mut wtxn).map_err(|e| self.err("clear", e))?;
                self.keys
                    .clear(&mut wtxn)
                    .map_err(|e| self.err("clear", e))?;
                self.ids
                    .clear(&mut wtxn)
                    .map_err(|e| self.err("clear", e))?;
                if let Some(a) = &self.attrs {
                    a.clear(&mut wtxn).map_err(|e| self.err("clear", e))?;
                }
                self.free
                    .clear(&mut wtxn)
                    .map_err(|e| self.err("clear", e))?;
                self.meta
                    .delete(&mut wtxn, "next_id")
                    .map_err(|e| self.err("clear", e))?;
                expiry.clear();
            }
            for u in updates {
                let old = self
                    .keys
                    .get(&wtxn, &lmdb_key(&u.key))
                    .map_err(|e| self.err("read", e))?
                    .and_then(decode_entry);
                match (&u.vector, old) {
                    (Some(v), old)
                        if v.len() != self.plan.dims || v.iter().any(|x| !x.is_finite()) =>
                    {
                        // A value the index cannot hold never fails the
                        // checkpoint: the key leaves the index, counted.
                        tracing::warn!(view = %self.view, key = %u.key, len = v.len(), "vector not indexed: wrong length or not finite");
                        metrics::counter!("sluice_index_rejected_total", "view" => self.view.clone())
                            .increment(1);
                        stats.rejected += 1;
                        if let Some((id, vu)) = old {
                            expiry.remove(&(vu, id));
                            self.remove(&mut wtxn, &writer, &u.key, id)?;
                            changes.push(Change::Remove { id });
                            stats.removals += 1;
                        }
                    }
                    (Some(v), old) => {
                        let id = match old {
                            Some((id, vu)) => {
                                expiry.remove(&(vu, id));
                                id
                            }
                            None => self.allocate(&mut wtxn)?,
                        };
                        writer
                            .add_item(&mut wtxn, id, v)
                            .map_err(|e| self.err("add", e))?;
                        self.keys
                            .put(
                                &mut wtxn,
                                &lmdb_key(&u.key),
                                &encode_entry(id, u.valid_until),
                            )
                            .map_err(|e| self.err("add", e))?;
                        if old.is_none() {
                            self.ids
                                .put(&mut wtxn, &id, u.key.as_bytes())
                                .map_err(|e| self.err("add", e))?;
                        }
                        let mut attrs = u.attrs.clone();
                        attrs.resize(nf, Attr::Null);
                        if let (Some(db), 1..) = (&self.attrs, nf) {
                            let j = serde_json::to_vec(&attrs).map_err(|e| self.err("add", e))?;
                            db.put(&mut wtxn, &id, &j).map_err(|e| self.err("add", e))?;
                        }
                        if let Some(vu) = u.valid_until {
                            expiry.insert((vu, id));
                        }
                        changes.push(Change::Put {
                            id,
                            key: u.key.as_str().into(),
                            vector: v.clone(),
                            attrs,
                        });
                        stats.upserts += 1;
                    }
                    (None, Some((id, vu))) => {
                        expiry.remove(&(vu, id));
                        self.remove(&mut wtxn, &writer, &u.key, id)?;
                        changes.push(Change::Remove { id });
                        stats.removals += 1;
                    }
                    (None, None) => {}
                }
            }
            if let Some(wm) = wm {
                // A row expires once the watermark reaches its valid-until
                // (the online store then serves the empty-set aggregate).
                let gone: Vec<(i64, u32)> = expiry.range(..=(wm, u32::MAX)).copied().collect();
                for (vu, id) in gone {
                    expiry.remove(&(vu, id));
                    let key = self
                        .ids
                        .get(&wtxn, &id)
                        .map_err(|e| self.err("read", e))?
                        .map(|k| k.to_vec());
                    if let Some(k) = key {
                        let k = String::from_utf8_lossy(&k).into_owned();
                        self.remove(&mut wtxn, &writer, &k, id)?;
                        changes.push(Change::Remove { id });
                        stats.expired += 1;
                    }
                }
            }
            if writer.need_build(&wtxn).map_err(|e| self.err("build", e))? || reset {
                let mut rng = StdRng::seed_from_u64(epoch);
                let mut b = writer.builder(&mut rng);
                if let Some(n) = self.plan.trees {
                    b.n_trees(n);
                }
                b.build(&mut wtxn).map_err(|e| self.err("build", e))?;
            }
        });
        self.meta
            .put(&mut wtxn, "epoch", &epoch.to_be_bytes())
            .map_err(|e| self.err("write", e))?;
        // The next snapshot is made before the commit, so that queries wait
        // for it as briefly as possible.
        let t = Instant::now();
        let next = if reset {
            Snapshot::empty(
                Some(epoch),
                self.plan.dims,
                self.plan.distance,
                self.plan.filter_columns.len(),
            )
            .next(Some(epoch), &changes)
        } else {
            self.snapshot()?.next(Some(epoch), &changes)
        };
        metrics::histogram!("sluice_index_snapshot_seconds", "view" => self.view.clone())
            .record(t.elapsed().as_secs_f64());
        metrics::gauge!("sluice_index_keys", "view" => self.view.clone()).set(next.len() as f64);
        wtxn.commit().map_err(|e| self.err("commit", e))?;
        match self.snapshot.write() {
            Ok(mut g) => *g = Arc::new(next),
            Err(_) => return Err(self.err("commit", "a reader panicked")),
        }
        if let Ok(mut g) = self.expiry.lock() {
            *g = expiry;
        }
        Ok(stats)
    }

    fn allocate(&self, wtxn: &mut RwTxn) -> Result<u32> {
        let reused = self
            .free
            .first(wtxn)
            .map_err(|e| self.err("allocate", e))?
            .map(|(id, _)| id);
        if let Some(id) = reused {
            self.free
                .delete(wtxn, &id)
                .map_err(|e| self.err("allocate", e))?;
            return Ok(id);
        }
        let next = self
            .meta
            .get(wtxn, "next_id")
            .map_err(|e| self.err("allocate", e))?
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
            .unwrap_or(0);
        let after = next
            .checked_add(1)
            .ok_or_else(|| self.err("allocate", "more than 2^32 keys"))?;
        self.meta
            .put(wtxn, "next_id", &after.to_be_bytes())
            .map_err(|e| self.err("allocate", e))?;
        Ok(next)
    }

    fn remove<D: arroy::Distance>(
        &self,
        wtxn: &mut RwTxn,
        writer: &Writer<D>,
        key: &str,
        id: u32,
    ) -> Result<()> {
        writer
            .del_item(wtxn, id)
            .map_err(|e| self.err("remove", e))?;
        self.keys
            .delete(wtxn, &lmdb_key(key))
            .map_err(|e| self.err("remove", e))?;
        self.ids
            .delete(wtxn, &id)
            .map_err(|e| self.err("remove", e))?;
        if let Some(a) = &self.attrs {
            a.delete(wtxn, &id).map_err(|e| self.err("remove", e))?;
        }
        self.free
            .put(wtxn, &id, &())
            .map_err(|e| self.err("remove", e))?;
        Ok(())
    }

    fn id_of(&self, rtxn: &RoTxn, key: &str) -> Result<Option<u32>> {
        Ok(self
            .keys
            .get(rtxn, &lmdb_key(key))
            .map_err(|e| self.err("read", e))?
            .and_then(decode_entry)
            .map(|(id, _)| id))
    }

    /// Opens a read transaction and the arroy reader on it.
    fn open_reader(&self) -> Result<PooledReader> {
        let txn = Box::new(
            self.env
                .clone()
                .static_read_txn()
                .map_err(|e| self.err("read", e))?,
        );
        // SAFETY: the transaction lives on the heap, owned by the returned
        // PooledReader, which drops the reader (declared first) before it;
        // the box is never moved out or replaced, so the reference stays
        // valid for as long as the reader that holds it.
        #[allow(unsafe_code)]
        let t: &'static RoTxn<'static, WithoutTls> =
            unsafe { &*(txn.as_ref() as *const RoTxn<'static, WithoutTls>) };
        let epoch = self.epoch_in(t)?;
        let reader = with_distance!(self.plan.distance, D, {
            let db: arroy::Database<D> = self.arroy.remap_types::<KeyCodec, NodeCodec<D>>();
            match Reader::<D>::open(t, INDEX, db) {
                Ok(r) => <D as Pick>::wrap(r),
                Err(arroy::Error::MissingMetadata(_)) => AnyReader::None,
                Err(e) => return Err(self.err("read", e)),
            }
        });
        Ok(PooledReader { reader, txn, epoch })
    }

    /// A snapshot and a reader of one and the same epoch.
    fn consistent(&self) -> Result<(Arc<Snapshot>, PooledReader)> {
        let t0 = Instant::now();
        loop {
            let snap = self.snapshot()?;
            let pooled = snap.readers.lock().ok().and_then(|mut p| p.pop());
            if let Some(r) = pooled {
                return Ok((snap, r));
            }
            let r = self.open_reader()?;
            if r.epoch == snap.epoch() {
                return Ok((snap, r));
            }
            if !self.writer {
                // Another process wrote a newer epoch: load it.
                let s = Arc::new(self.snapshot_of(&r.txn, r.epoch)?);
                if let Ok(mut g) = self.snapshot.write() {
                    *g = Arc::clone(&s);
                }
                return Ok((s, r));
            }
            // This process committed an epoch it has not published yet
            // (or published one after this transaction began): try again.
            if t0.elapsed() > SNAPSHOT_WAIT {
                return Err(self.err(
                    "read",
                    format!(
                        "the index is at epoch {:?} but its snapshot at {:?}",
                        r.epoch,
                        snap.epoch()
                    ),
                ));
            }
            drop(r);
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    fn give_back(snap: &Snapshot, r: PooledReader) {
        if let Ok(mut p) = snap.readers.lock()
            && p.len() < POOL
        {
            p.push(r);
        }
    }

    /// The indexed vector of `key`.
    pub fn vector(&self, key: &str) -> Result<Option<Vec<f32>>> {
        let (snap, r) = self.consistent()?;
        let id = self.id_of(&r.txn, key)?;
        let v = id.and_then(|id| snap.vector(id)).map(|v| v.to_vec());
        Self::give_back(&snap, r);
        Ok(v)
    }

    /// Every indexed key with its vector, in key order.
    pub fn dump(&self) -> Result<Vec<(String, Vec<f32>)>> {
        let (snap, r) = self.consistent()?;
        Self::give_back(&snap, r);
        let mut out: Vec<(String, Vec<f32>)> = snap
            .live()
            .iter()
            .filter_map(|id| Some((snap.key(id)?.to_string(), snap.vector(id)?.to_vec())))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// The `k` nearest keys to `query` through the trees (approximate);
    /// `search_k` overrides the candidates per neighbour and tree.
    /// `Ok(None)`: the query key is not in the index.
    pub fn nearest(
        &self,
        query: Query<'_>,
        k: usize,
        search_k: Option<usize>,
    ) -> Result<Option<Vec<Neighbour>>> {
        let mut s = Search::one(query, k);
        s.search_k = search_k;
        Ok(self.search(&s)?.results.pop().flatten())
    }

    /// The exact `k` nearest keys, by scanning every vector in memory.
    pub fn nearest_exact(&self, query: Query<'_>, k: usize) -> Result<Option<Vec<Neighbour>>> {
        let mut s = Search::one(query, k);
        s.exact = true;
        Ok(self.search(&s)?.results.pop().flatten())
    }

    /// Parses a filter against this index's filter columns.
    pub fn filter(&self, text: &str) -> Result<Filter> {
        Filter::parse(text, &self.plan.filter_columns)
    }

    /// [`VectorIndex::filter`] within `limits`.
    pub fn filter_limited(&self, text: &str, limits: filter::FilterLimits) -> Result<Filter> {
        Filter::parse_limited(text, &self.plan.filter_columns, limits)
    }

    /// Answers every query of `s` against one committed epoch.
    pub fn search(&self, s: &Search<'_>) -> Result<Found> {
        let (snap, r) = self.consistent()?;
        let out = self.search_in(&snap, &r, s);
        Self::give_back(&snap, r);
        out
    }

    fn search_in(&self, snap: &Snapshot, r: &PooledReader, s: &Search<'_>) -> Result<Found> {
        let k = s.k.max(1);
        // The query vectors, with the item each leaves out.
        let mut prepared: Vec<Option<Prepared>> = Vec::with_capacity(s.queries.len());
        for q in &s.queries {
            prepared.push(match q {
                Query::Vector(v) => {
                    if v.len() != self.plan.dims {
                        return Err(EngineError::BadRequest(format!(
                            "the query vector has {} elements; view `{}` indexes {}",
                            v.len(),
                            self.view,
                            self.plan.dims
                        )));
                    }
                    Some(Prepared::new(v.to_vec(), None))
                }
                Query::Key(key) => self
                    .id_of(&r.txn, key)?
                    .and_then(|id| Some(Prepared::new(snap.vector(id)?.to_vec(), Some(id)))),
            });
        }
        let candidates: Option<RoaringBitmap> = s.filter.map(|f| f.eval(snap));
        let selected = candidates.as_ref().map(|c| c.len());
        // A filter keeping less than half of the index is answered exactly:
        // arroy itself stops using its trees there and reads every
        // candidate; memory is faster, and the answer is exact.
        let per = s
            .search_k
            .or(self.plan.search_k)
            .unwrap_or(DEFAULT_SEARCH_K);
        let trees = r.reader.n_trees();
        // The tree search reads each candidate from LMDB, about 30 times
        // the cost of a vector in the scan: when it would inspect more than
        // a sixteenth of the set, the exact scan is both faster and exact.
        let set_len = candidates.as_ref().map_or(snap.len(), |c| c.len());
        let budget = (k + 1).saturating_mul(trees.max(1)).saturating_mul(per) as u64;
        let exact = s.exact
            || matches!(&candidates, Some(c) if c.len() * 2 < snap.len())
            || trees == 0
            || budget.saturating_mul(SCAN_RATIO) >= set_len;
        let mut results: Vec<Option<Vec<Neighbour>>> = vec![None; prepared.len()];
        let neighbours = |found: Vec<(f32, u32)>| -> Vec<Neighbour> {
            found
                .into_iter()
                .filter_map(|(d, id)| {
                    Some(Neighbour {
                        key: snap.key(id)?.to_string(),
                        distance: d,
                    })
                })
                .collect()
        };
        let past_deadline = || {
            s.deadline.is_some_and(|d| Instant::now() >= d).then(|| {
                EngineError::Overloaded(format!(
                    "the nearest-neighbour search of view `{}` passed its deadline; retry later or ask for less",
                    self.view
                ))
            })
        };
        if exact {
            let set = candidates.as_ref().unwrap_or(snap.live());
            let qs: Vec<Prepared> = prepared.iter().flatten().cloned().collect();
            // Scanned a few queries at a time, so a deadline stops it.
            let mut found = Vec::with_capacity(qs.len());
            for chunk in qs.chunks(SCAN_CHUNK) {
                if let Some(e) = past_deadline() {
                    return Err(e);
                }
                found.extend(snap.scan(chunk, k, set, s.threads));
            }
            let mut found = found.into_iter();
            for (slot, p) in results.iter_mut().zip(&prepared) {
                if p.is_some() {
                    *slot = Some(neighbours(found.next().unwrap_or_default()));
                }
            }
        } else {
            let per = s
                .search_k
                .or(self.plan.search_k)
                .unwrap_or(DEFAULT_SEARCH_K);
            with_distance!(self.plan.distance, D, {
                let Some(reader) = <D as Pick>::get(&r.reader) else {
                    return Err(self.err("query", "the reader has another distance"));
                };
                for (slot, p) in results.iter_mut().zip(&prepared) {
                    let Some(p) = p else { continue };
                    if let Some(e) = past_deadline() {
                        return Err(e);
                    }
                    let want = k + usize::from(p.skip.is_some());
                    let mut q = reader.nns(want);
                    let nodes = want
                        .saturating_mul(reader.n_trees().max(1))
                        .saturating_mul(per);
                    if let Some(n) = NonZeroUsize::new(nodes) {
                        q.search_k(n);
                    }
                    if let Some(c) = &candidates {
                        q.candidates(c);
                    }
                    let found = q
                        .by_vector(&r.txn, &p.vector)
                        .map_err(|e| self.err("query", e))?;
                    let found: Vec<(f32, u32)> = found
                        .into_iter()
                        .filter(|(id, _)| Some(*id) != p.skip)
                        .take(k)
                        .map(|(id, d)| (from_arroy(self.plan.distance, d), id))
                        .collect();
                    *slot = Some(neighbours(found));
                }
            });
        }
        Ok(Found {
            results,
            epoch: snap.epoch(),
            exact,
            selected,
        })
    }
}

/// The settings whose change invalidates an index's items.
fn shape(plan: &VectorIndexPlan) -> String {
    // `keys2`: the `keys` table holds tagged keys ([`lmdb_key`]).
    let mut s = format!("{}:{}:keys2", plan.dims, plan.distance.name());
    if !plan.filter_columns.is_empty() {
        let cols: Vec<&str> = plan
            .filter_columns
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        s.push_str(":filters=");
        s.push_str(&cols.join(","));
    }
    s
}

/// What one [`VectorIndex::apply`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ApplyStats {
    /// Keys added or changed.
    pub upserts: u64,
    /// Keys whose value became NULL.
    pub removals: u64,
    /// Keys whose row expired.
    pub expired: u64,
    /// Vectors not indexed (wrong length, or not finite).
    pub rejected: u64,
}

/// Opens the LMDB environment of an index.
fn open_env(path: &Path) -> Result<Env<WithoutTls>> {
    let mut opts = EnvOpenOptions::new().read_txn_without_tls();
    // Pooled readers hold a read slot each (at most POOL per snapshot, and
    // a snapshot lives until its last query ends).
    opts.map_size(MAP_SIZE).max_dbs(8).max_readers(1024);
    // SAFETY: LMDB maps the file into memory; the environment is opened
    // once per process (heed refuses a second open of the same path) and
    // no one truncates or rewrites the file behind LMDB's back.
    #[allow(unsafe_code)]
    let env = unsafe { opts.open(path) }.map_err(|e| index_err(path, "open", e))?;
    Ok(env)
}

fn index_err(path: &Path, what: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Index {
        path: path.display().to_string(),
        message: format!("{what}: {e}"),
    }
}

/// A filter value from a JSON feature value.
fn attr_of_json(kind: FilterKind, v: Option<&serde_json::Value>) -> Attr {
    use serde_json::Value;
    match (kind, v) {
        (FilterKind::Integer, Some(Value::Number(n))) => n.as_i64().map_or(Attr::Null, Attr::Int),
        (FilterKind::Text, Some(Value::String(s))) => Attr::Text(s.clone()),
        (FilterKind::Boolean, Some(Value::Bool(b))) => Attr::Bool(*b),
        _ => Attr::Null,
    }
}

/// The filter values of every row of `batch`, for the index's filter
/// columns (`cols`: their positions in `batch`).
pub fn attrs_of(
    batch: &arrow::record_batch::RecordBatch,
    columns: &[(usize, FilterKind)],
) -> Result<Vec<Vec<Attr>>> {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{DataType, Int64Type};
    let mut out = vec![Vec::with_capacity(columns.len()); batch.num_rows()];
    for &(c, kind) in columns {
        let col = batch.column(c);
        let want = match kind {
            FilterKind::Integer => DataType::Int64,
            FilterKind::Text => DataType::Utf8,
            FilterKind::Boolean => DataType::Boolean,
        };
        // Integers out of i64's range become NULL rather than wrapping.
        let cast = arrow::compute::cast_with_options(
            col,
            &want,
            &arrow::compute::CastOptions {
                safe: true,
                ..Default::default()
            },
        )
        .map_err(|e| EngineError::arrow("a filter column of the vector index", e))?;
        for (i, row) in out.iter_mut().enumerate() {
            row.push(if cast.is_null(i) {
                Attr::Null
            } else {
                match kind {
                    FilterKind::Integer => Attr::Int(cast.as_primitive::<Int64Type>().value(i)),
                    FilterKind::Text => Attr::Text(cast.as_string::<i32>().value(i).to_string()),
                    FilterKind::Boolean => Attr::Bool(cast.as_boolean().value(i)),
                }
            });
        }
    }
    Ok(out)
}

/// Rebuilds `idx` from the online store's rows of its view (as of
/// watermark `wm`) and marks it with `epoch`: after a crash between the
/// index and the state commits, or after a backfill wrote the online store.
pub fn rebuild_from_store(
    idx: &VectorIndex,
    store: &crate::store::Store,
    epoch: u64,
    wm: Option<i64>,
) -> Result<ApplyStats> {
    let col = idx.plan.column.clone();
    let mut updates = Vec::new();
    for (key, raw) in store.online_scan(&idx.view)? {
        let Ok(row) = serde_json::from_slice::<serde_json::Value>(&raw) else {
            continue;
        };
        let features = row.get("features");
        let vector = features
            .and_then(|f| f.get(&col))
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .map(|x| x.as_f64().map(|f| f as f32))
                    .collect::<Option<Vec<f32>>>()
            });
        let Some(Some(vector)) = vector else {
            continue;
        };
        let attrs = idx
            .plan
            .filter_columns
            .iter()
            .map(|c| attr_of_json(c.kind, features.and_then(|f| f.get(&c.name))))
            .collect();
        updates.push(VectorUpdate {
            key,
            vector: Some(vector),
            valid_until: row.get("valid_until").and_then(|v| v.as_i64()),
            attrs,
        });
    }
    idx.apply(epoch, &updates, wm, true)
}
