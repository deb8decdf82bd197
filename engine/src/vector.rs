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

use std::collections::BTreeSet;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use arroy::distances::{Cosine, DotProduct, Euclidean};
use arroy::internals::{KeyCodec, Leaf, NodeCodec, UnalignedVector};
use arroy::{Reader, Writer};
use heed::types::{Bytes, Str, U32, Unit};
use heed::{CommitOrAbort, Database, Env, EnvOpenOptions, RoTxn, RwTxn, WithoutTls};
use rand::SeedableRng;
use rand::rngs::StdRng;
use sluice_sql::vector::{Distance, VectorIndexPlan};

use crate::error::{EngineError, Result};

/// arroy's index number inside the environment (one index per environment).
const INDEX: u16 = 0;
/// Address space reserved for an index; LMDB files only grow as pages are written.
const MAP_SIZE: usize = 1 << 40;
/// Default candidates a query inspects per requested neighbour and tree:
/// recall@10 on 100k uniformly random 64-d vectors (the hardest case: no
/// structure to exploit) was 0.83 at 60, 0.92 at 100, 0.98 at 200, 0.996
/// at 400 (`sluice-bench vectors --sweep`).
pub const DEFAULT_SEARCH_K: usize = 200;

type Db<K, V> = Database<'static, K, V>;

/// The environment's tables, in this order.
const TABLES: [&str; 5] = ["arroy", "keys", "ids", "free", "meta"];

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
}

/// One neighbour found.
#[derive(Debug, Clone, PartialEq)]
pub struct Neighbour {
    /// Entity key.
    pub key: String,
    /// Distance to the query (cosine: 1 − cos; euclidean: L2; dot: −dot).
    pub distance: f32,
}

/// What to search around.
#[derive(Debug, Clone, Copy)]
pub enum Query<'a> {
    /// A vector of the index's dimension.
    Vector(&'a [f32]),
    /// The current vector of a key in the index (the key itself is left out).
    Key(&'a str),
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
    plan: VectorIndexPlan,
    /// (valid_until, id) of indexed keys, to find expired rows.
    expiry: Mutex<BTreeSet<(i64, u32)>>,
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

impl VectorIndex {
    fn err(&self, what: &str, e: impl std::fmt::Display) -> EngineError {
        index_err(&self.path, what, e)
    }

    /// Opens (or creates) the index of `view` under `state_dir`.
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
                let [a, b, c, d, e] = TABLES;
                Ok(CommitOrAbort::<_, ()>::Commit((
                    dbo.create_database::<Bytes, Bytes>(wtxn, Some(a))?,
                    dbo.create_database::<Bytes, Bytes>(wtxn, Some(b))?,
                    dbo.create_database::<Bytes, Bytes>(wtxn, Some(c))?,
                    dbo.create_database::<Bytes, Bytes>(wtxn, Some(d))?,
                    dbo.create_database::<Bytes, Bytes>(wtxn, Some(e))?,
                )))
            })
            .map_err(|e| index_err(&path, "open", e))?;
        let CommitOrAbort::Commit((arroy, keys, ids, free, meta)) = created else {
            return Err(index_err(&path, "open", "creating the tables was aborted"));
        };
        let ids = ids.remap_key_type::<U32<heed::byteorder::BE>>();
        let free = free.remap_types::<U32<heed::byteorder::BE>, Unit>();
        let meta = meta.remap_key_type::<Str>();
        let mut wtxn = env.write_txn().map_err(|e| index_err(&path, "open", e))?;
        // A changed dimension or distance invalidates the items: start over.
        let shape = format!("{}:{}", plan.dims, plan.distance.name());
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
        Ok(VectorIndex {
            view: view.to_string(),
            path,
            env,
            arroy,
            keys,
            ids,
            free,
            meta,
            plan: plan.clone(),
            expiry: Mutex::new(expiry),
        })
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
                let [a, b, c, d, e] = TABLES;
                Ok(CommitOrAbort::<_, ()>::Commit([
                    dbo.open_database::<Bytes, Bytes>(rtxn, Some(a))?,
                    dbo.open_database::<Bytes, Bytes>(rtxn, Some(b))?,
                    dbo.open_database::<Bytes, Bytes>(rtxn, Some(c))?,
                    dbo.open_database::<Bytes, Bytes>(rtxn, Some(d))?,
                    dbo.open_database::<Bytes, Bytes>(rtxn, Some(e))?,
                ]))
            })
            .map_err(|e| index_err(&path, "open", e))?;
        let CommitOrAbort::Commit(dbs) = opened else {
            return Err(index_err(&path, "open", "opening the tables was aborted"));
        };
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
        drop(rtxn);
        Ok(VectorIndex {
            view: view.to_string(),
            path,
            env,
            arroy,
            keys,
            ids,
            free,
            meta,
            plan,
            expiry: Mutex::new(BTreeSet::new()),
        })
    }

    /// The view it indexes.
    pub fn view(&self) -> &str {
        &self.view
    }

    /// The index's settings.
    pub fn plan(&self) -> &VectorIndexPlan {
        &self.plan
    }

    /// The checkpoint epoch the index was last committed with (`None`: never).
    pub fn epoch(&self) -> Result<Option<u64>> {
        let rtxn = self.env.read_txn().map_err(|e| self.err("read", e))?;
        let e = self
            .meta
            .get(&rtxn, "epoch")
            .map_err(|e| self.err("read", e))?
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes);
        Ok(e)
    }

    /// Number of indexed keys.
    pub fn len(&self) -> Result<u64> {
        let rtxn = self.env.read_txn().map_err(|e| self.err("read", e))?;
        self.keys.len(&rtxn).map_err(|e| self.err("read", e))
    }

    /// Whether no key is indexed.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Applies a checkpoint's row changes, removes the keys whose rows
    /// expire at watermark `wm`, rebuilds the trees and records `epoch`, in
    /// one LMDB transaction. `reset` first empties the index (a rebuild).
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
                    .get(&wtxn, u.key.as_bytes())
                    .map_err(|e| self.err("read", e))?
                    .and_then(decode_entry);
                match (&u.vector, old) {
                    (Some(v), old) => {
                        if v.len() != self.plan.dims {
                            return Err(self.err(
                                "update",
                                format!(
                                    "key {}: vector of {} elements, the index has {}",
                                    u.key,
                                    v.len(),
                                    self.plan.dims
                                ),
                            ));
                        }
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
                                u.key.as_bytes(),
                                &encode_entry(id, u.valid_until),
                            )
                            .map_err(|e| self.err("add", e))?;
                        if old.is_none() {
                            self.ids
                                .put(&mut wtxn, &id, u.key.as_bytes())
                                .map_err(|e| self.err("add", e))?;
                        }
                        if let Some(vu) = u.valid_until {
                            expiry.insert((vu, id));
                        }
                        stats.upserts += 1;
                    }
                    (None, Some((id, vu))) => {
                        expiry.remove(&(vu, id));
                        self.remove(&mut wtxn, &writer, &u.key, id)?;
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
        wtxn.commit().map_err(|e| self.err("commit", e))?;
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
            .delete(wtxn, key.as_bytes())
            .map_err(|e| self.err("remove", e))?;
        self.ids
            .delete(wtxn, &id)
            .map_err(|e| self.err("remove", e))?;
        self.free
            .put(wtxn, &id, &())
            .map_err(|e| self.err("remove", e))?;
        Ok(())
    }

    fn id_of(&self, rtxn: &RoTxn, key: &str) -> Result<Option<u32>> {
        Ok(self
            .keys
            .get(rtxn, key.as_bytes())
            .map_err(|e| self.err("read", e))?
            .and_then(decode_entry)
            .map(|(id, _)| id))
    }

    fn key_of(&self, rtxn: &RoTxn, id: u32) -> Result<Option<String>> {
        Ok(self
            .ids
            .get(rtxn, &id)
            .map_err(|e| self.err("read", e))?
            .map(|k| String::from_utf8_lossy(k).into_owned()))
    }

    /// The indexed vector of `key`.
    pub fn vector(&self, key: &str) -> Result<Option<Vec<f32>>> {
        let rtxn = self.env.read_txn().map_err(|e| self.err("read", e))?;
        let Some(id) = self.id_of(&rtxn, key)? else {
            return Ok(None);
        };
        with_distance!(self.plan.distance, D, {
            let db: arroy::Database<D> = self.arroy.remap_types::<KeyCodec, NodeCodec<D>>();
            Writer::<D>::new(db, INDEX, self.plan.dims)
                .item_vector(&rtxn, id)
                .map_err(|e| self.err("read", e))
        })
    }

    /// Every indexed key with its vector, in key order.
    pub fn dump(&self) -> Result<Vec<(String, Vec<f32>)>> {
        let rtxn = self.env.read_txn().map_err(|e| self.err("read", e))?;
        let mut out = Vec::new();
        with_distance!(self.plan.distance, D, {
            let db: arroy::Database<D> = self.arroy.remap_types::<KeyCodec, NodeCodec<D>>();
            let w = Writer::<D>::new(db, INDEX, self.plan.dims);
            for e in self.keys.iter(&rtxn).map_err(|e| self.err("read", e))? {
                let (k, v) = e.map_err(|e| self.err("read", e))?;
                let Some((id, _)) = decode_entry(v) else {
                    continue;
                };
                let vec = w
                    .item_vector(&rtxn, id)
                    .map_err(|e| self.err("read", e))?
                    .ok_or_else(|| {
                        self.err(
                            "read",
                            format!("key {} has no item {id}", String::from_utf8_lossy(k)),
                        )
                    })?;
                out.push((String::from_utf8_lossy(k).into_owned(), vec));
            }
        });
        Ok(out)
    }

    /// The `k` nearest keys to `query` through the trees (approximate);
    /// `search_k` overrides the nodes inspected per neighbour and tree.
    /// `Ok(None)`: the query key is not in the index.
    pub fn nearest(
        &self,
        query: Query<'_>,
        k: usize,
        search_k: Option<usize>,
    ) -> Result<Option<Vec<Neighbour>>> {
        let rtxn = self.env.read_txn().map_err(|e| self.err("read", e))?;
        let k = k.max(1);
        let per = search_k.or(self.plan.search_k).unwrap_or(DEFAULT_SEARCH_K);
        let found = with_distance!(self.plan.distance, D, {
            let db: arroy::Database<D> = self.arroy.remap_types::<KeyCodec, NodeCodec<D>>();
            let reader = match Reader::<D>::open(&rtxn, INDEX, db) {
                Ok(r) => r,
                Err(arroy::Error::MissingMetadata(_)) => return Ok(Some(Vec::new())),
                Err(e) => return Err(self.err("read", e)),
            };
            let (want, skip) = match query {
                Query::Vector(v) => {
                    if v.len() != self.plan.dims {
                        return Err(EngineError::BadRequest(format!(
                            "the query vector has {} elements; view `{}` indexes {}",
                            v.len(),
                            self.view,
                            self.plan.dims
                        )));
                    }
                    (k, None)
                }
                Query::Key(key) => match self.id_of(&rtxn, key)? {
                    Some(id) => (k + 1, Some(id)),
                    None => return Ok(None),
                },
            };
            let mut q = reader.nns(want);
            let nodes = want
                .saturating_mul(reader.n_trees().max(1))
                .saturating_mul(per);
            if let Some(n) = NonZeroUsize::new(nodes) {
                q.search_k(n);
            }
            let found = match (query, skip) {
                (Query::Vector(v), _) => q.by_vector(&rtxn, v),
                (Query::Key(_), Some(id)) => q.by_item(&rtxn, id).map(|r| r.unwrap_or_default()),
                (Query::Key(_), None) => Ok(Vec::new()),
            }
            .map_err(|e| self.err("query", e))?;
            found
                .into_iter()
                .filter(|(id, _)| Some(*id) != skip)
                .take(k)
                .collect::<Vec<_>>()
        });
        let mut out = Vec::with_capacity(found.len());
        for (id, d) in found {
            if let Some(key) = self.key_of(&rtxn, id)? {
                out.push(Neighbour {
                    key,
                    distance: from_arroy(self.plan.distance, d),
                });
            }
        }
        Ok(Some(out))
    }

    /// The exact `k` nearest keys by scanning every vector (for checks and
    /// comparisons; `exact: true` in a request).
    pub fn nearest_exact(&self, query: Query<'_>, k: usize) -> Result<Option<Vec<Neighbour>>> {
        let rtxn = self.env.read_txn().map_err(|e| self.err("read", e))?;
        let d = self.plan.distance;
        with_distance!(d, D, {
            let db: arroy::Database<D> = self.arroy.remap_types::<KeyCodec, NodeCodec<D>>();
            let w = Writer::<D>::new(db, INDEX, self.plan.dims);
            let (q, skip) = match query {
                Query::Vector(v) => {
                    if v.len() != self.plan.dims {
                        return Err(EngineError::BadRequest(format!(
                            "the query vector has {} elements; view `{}` indexes {}",
                            v.len(),
                            self.view,
                            self.plan.dims
                        )));
                    }
                    (v.to_vec(), None)
                }
                Query::Key(key) => {
                    let Some(id) = self.id_of(&rtxn, key)? else {
                        return Ok(None);
                    };
                    match w.item_vector(&rtxn, id).map_err(|e| self.err("read", e))? {
                        Some(v) => (v, Some(id)),
                        None => return Ok(None),
                    }
                }
            };
            // Distances by arroy's own (SIMD) functions, so an exact scan
            // and a tree search rank with the same arithmetic.
            let qv = UnalignedVector::from_slice(&q);
            let ql = Leaf::<D> {
                header: <D as arroy::Distance>::new_header(&qv),
                vector: qv,
            };
            // A bounded max-heap of the k best (distance, id).
            let mut best: std::collections::BinaryHeap<(Ordered, u32)> =
                std::collections::BinaryHeap::with_capacity(k + 1);
            for item in w.iter(&rtxn).map_err(|e| self.err("read", e))? {
                let (id, v) = item.map_err(|e| self.err("read", e))?;
                if Some(id) == skip {
                    continue;
                }
                let vv = UnalignedVector::from_slice(&v);
                let l = Leaf::<D> {
                    header: <D as arroy::Distance>::new_header(&vv),
                    vector: vv,
                };
                let raw = <D as arroy::Distance>::built_distance(&ql, &l);
                let dist = from_arroy(
                    d,
                    <D as arroy::Distance>::normalized_distance(raw, self.plan.dims),
                );
                if best.len() < k {
                    best.push((Ordered(dist), id));
                } else if best.peek().is_some_and(|(w, _)| dist < w.0) {
                    best.pop();
                    best.push((Ordered(dist), id));
                }
            }
            let mut v = best.into_vec();
            v.sort_by(|a, b| a.0.0.total_cmp(&b.0.0).then(a.1.cmp(&b.1)));
            let mut out = Vec::with_capacity(v.len());
            for (dist, id) in v {
                if let Some(key) = self.key_of(&rtxn, id)? {
                    out.push(Neighbour {
                        key,
                        distance: dist.0,
                    });
                }
            }
            Ok(Some(out))
        })
    }
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
}

/// A totally ordered f32 for the exact scan's heap.
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

/// Opens the LMDB environment of an index.
fn open_env(path: &Path) -> Result<Env<WithoutTls>> {
    let mut opts = EnvOpenOptions::new().read_txn_without_tls();
    opts.map_size(MAP_SIZE).max_dbs(8);
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
        let vector = row
            .get("features")
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
        updates.push(VectorUpdate {
            key,
            vector: Some(vector),
            valid_until: row.get("valid_until").and_then(|v| v.as_i64()),
        });
    }
    idx.apply(epoch, &updates, wm, true)
}
