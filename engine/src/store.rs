//! The RocksDB database under the state dir: window state, the online store
//! (a column family per view) and checkpoint metadata, committed together in
//! one write batch.

use std::path::{Path, PathBuf};

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options,
    ReadOptions, WriteBatch, WriteOptions,
};

use crate::error::{EngineError, Result, StoreError};
use crate::output::OnlineRow;

const META: &str = "meta";
const STATE: &str = "state";

/// A checkpointed state row: (encoded key, encoded state).
pub type StateEntry = (Vec<u8>, Vec<u8>);

/// A state entry to write or delete in a checkpoint.
#[derive(Debug)]
pub enum StateOp {
    /// Upsert the state row of (pane, key).
    Put {
        /// Pane start (ms).
        pane: i64,
        /// Encoded key row.
        key: Vec<u8>,
        /// Encoded state row.
        value: Vec<u8>,
    },
    /// Delete every row of a pane.
    DropPane(i64),
}

/// The column family holding view `view`'s online rows.
pub fn online_cf(view: &str) -> String {
    format!("online.{view}")
}

/// The column family holding view `view`'s tiles.
fn tiles_cf(view: &str) -> String {
    format!("tiles.{view}")
}

/// The column family indexing view `view`'s tiles by the watermark at which
/// they leave every window.
fn expiry_cf(view: &str) -> String {
    format!("expiry.{view}")
}

fn store_error(path: &Path, e: rocksdb::Error) -> EngineError {
    EngineError::Store {
        path: path.display().to_string(),
        source: StoreError(e.into_string()),
    }
}

/// How often a read-only open is tried while a running job flushes.
const READ_ONLY_ATTEMPTS: u32 = 20;

/// What a read-only open depends on: the MANIFEST named by `CURRENT`, its
/// length, and the WAL files (`None` when a file vanished while looking).
fn files_fingerprint(db: &Path) -> Option<(String, u64, Vec<String>)> {
    let current = std::fs::read_to_string(db.join("CURRENT")).ok()?;
    let manifest = current.trim().to_string();
    let len = std::fs::metadata(db.join(&manifest)).ok()?.len();
    let mut wals: Vec<String> = std::fs::read_dir(db)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".log") && !n.starts_with("LOG"))
        .collect();
    wals.sort_unstable();
    Some((manifest, len, wals))
}

/// The store key of a tile: the key's group, the entity key (its text,
/// length-prefixed, so no key is a prefix of another), the tile level,
/// the tile start. A group's tiles are contiguous, and a key's tiles of one
/// level are contiguous and in time order.
pub fn tile_key(key: &str, level: u8, start: i64) -> Vec<u8> {
    let mut k = tile_prefix(key);
    k.push(level);
    k.extend_from_slice(&pane_bytes(start));
    k
}

/// The common prefix of every tile of `key`.
pub fn tile_prefix(key: &str) -> Vec<u8> {
    let key = key.as_bytes();
    let mut k = Vec::with_capacity(key.len() + 15);
    k.extend_from_slice(&key_group_of(key).to_be_bytes());
    k.extend_from_slice(&(key.len() as u32).to_be_bytes());
    k.extend_from_slice(key);
    k
}

fn key_group_of(key: &[u8]) -> u16 {
    crate::keys::key_group(&String::from_utf8_lossy(key))
}

/// (entity key, level, start) of a tile's store key.
pub fn parse_tile_key(k: &[u8]) -> Option<(&[u8], u8, i64)> {
    let k = k.get(2..)?;
    let len = u32::from_be_bytes(k.get(..4)?.try_into().ok()?) as usize;
    let key = k.get(4..4 + len)?;
    let level = *k.get(4 + len)?;
    let start = k.get(5 + len..13 + len)?;
    let start = (u64::from_be_bytes(start.try_into().ok()?) ^ (1u64 << 63)) as i64;
    Some((key, level, start))
}

/// The store key of an online row: the key's group, then its text.
pub fn online_key(key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 2);
    k.extend_from_slice(&key_group_of(key.as_bytes()).to_be_bytes());
    k.extend_from_slice(key.as_bytes());
    k
}

/// The expiry-index entry of a tile that leaves every window at watermark `at`.
pub fn expiry_key(at: i64, tile: &[u8]) -> Vec<u8> {
    let mut k = pane_bytes(at).to_vec();
    k.extend_from_slice(tile);
    k
}

/// Tile changes of one view in a checkpoint.
#[derive(Debug, Default)]
pub struct TileWrites {
    /// Tile states to write: (tile key, state row).
    pub puts: Vec<(Vec<u8>, Vec<u8>)>,
    /// Expiry-index entries of tiles written for the first time.
    pub expiry: Vec<Vec<u8>>,
    /// Expired tiles to delete.
    pub deletes: Vec<Vec<u8>>,
    /// Delete every expiry entry of tiles expiring at or before this watermark.
    pub expired_through: Option<i64>,
}

/// What a read of one key's tiles found, in one consistent snapshot.
#[derive(Debug, Default)]
pub struct TileRead {
    /// The view's committed clock (watermark) in the snapshot.
    pub clock: Option<i64>,
    /// The key has at least one tile.
    pub exists: bool,
    /// State rows of the tiles in the requested ranges.
    pub states: Vec<Vec<u8>>,
}

/// Memory limits of the store.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// Bytes of RocksDB's block cache (shared by all column families).
    pub block_cache: usize,
    /// Bytes of memtables over all column families.
    pub write_buffers: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            block_cache: 64 << 20,
            write_buffers: 128 << 20,
        }
    }
}

fn pane_bytes(p: i64) -> [u8; 8] {
    ((p as u64) ^ (1u64 << 63)).to_be_bytes()
}

fn state_prefix(view: &str) -> Vec<u8> {
    let mut k = view.as_bytes().to_vec();
    k.push(0);
    k
}

/// State values from this size on are stored LZ4-compressed: accumulator
/// states such as HyperLogLog registers (16 KiB, mostly zeros) shrink a
/// hundredfold, and with them the WAL, memtables and recovery reads.
const COMPRESS_FROM: usize = 256;
const RAW: u8 = 0;
const LZ4: u8 = 1;

fn encode_state(v: &[u8], out: &mut Vec<u8>) {
    out.clear();
    if v.len() >= COMPRESS_FROM {
        let c = lz4_flex::block::compress_prepend_size(v);
        if c.len() < v.len() {
            out.push(LZ4);
            out.extend_from_slice(&c);
            return;
        }
    }
    out.push(RAW);
    out.extend_from_slice(v);
}

/// LZ4 expands a block at most this many times (a run of one byte).
const LZ4_MAX_RATIO: usize = 255;

fn decode_state(v: &[u8], path: &Path, cf: &str) -> Result<Vec<u8>> {
    let bad = |why: String| EngineError::Incompatible {
        path: path.display().to_string(),
        reason: format!("unreadable window state in column family `{cf}`: {why}"),
    };
    match v.split_first() {
        Some((&RAW, rest)) => Ok(rest.to_vec()),
        Some((&LZ4, rest)) => {
            // The size prefix is checked before anything is allocated for it.
            let size = rest
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes)
                .ok_or_else(|| bad("a compressed value without its size".into()))?;
            let body = rest.len() - 4;
            if size as usize > body.saturating_mul(LZ4_MAX_RATIO).saturating_add(16) {
                return Err(bad(format!(
                    "a size prefix of {size} bytes for {body} compressed bytes"
                )));
            }
            lz4_flex::block::decompress_size_prepended(rest).map_err(|e| bad(e.to_string()))
        }
        _ => Err(bad("unknown value encoding".into())),
    }
}

/// What the engine needs of its state database. [`Store`] (RocksDB) is the
/// implementation; nothing of RocksDB's, its errors included, shows through.
pub trait StateStore: Send + Sync {
    /// A metadata value.
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// The stored online row of `key` in `view`.
    fn online_get(&self, view: &str, key: &str) -> Result<Option<Vec<u8>>>;
    /// The committed states of these tiles of `view` (`None`: no such tile).
    fn get_tiles(&self, view: &str, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>>;
    /// Tiles of `view` that leave every window at or before watermark `wm`.
    fn expired_tiles(&self, view: &str, wm: i64) -> Result<Vec<Vec<u8>>>;
    /// One key's tiles in the ranges `ranges` computes from the committed
    /// clock under `clock_key`, clock and tiles from one snapshot.
    fn read_tiles(
        &self,
        view: &str,
        key: &str,
        clock_key: &str,
        ranges: &dyn Fn(i64) -> Vec<(u8, i64, i64)>,
    ) -> Result<TileRead>;
    /// Commits a checkpoint atomically and durably.
    fn commit(&self, c: Commit) -> Result<()>;
}

impl StateStore for Store {
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Store::meta(self, key)
    }
    fn online_get(&self, view: &str, key: &str) -> Result<Option<Vec<u8>>> {
        Store::online_get(self, view, key)
    }
    fn get_tiles(&self, view: &str, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>> {
        Store::get_tiles(self, view, keys)
    }
    fn expired_tiles(&self, view: &str, wm: i64) -> Result<Vec<Vec<u8>>> {
        Store::expired_tiles(self, view, wm)
    }
    fn read_tiles(
        &self,
        view: &str,
        key: &str,
        clock_key: &str,
        ranges: &dyn Fn(i64) -> Vec<(u8, i64, i64)>,
    ) -> Result<TileRead> {
        Store::read_tiles(self, view, key, clock_key, ranges)
    }
    fn commit(&self, c: Commit) -> Result<()> {
        Store::commit(self, c)
    }
}

/// The state database.
pub struct Store {
    db: DB,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.path.display())
    }
}

/// Everything one checkpoint commits.
#[derive(Debug, Default)]
pub struct Commit {
    /// State changes per view.
    pub state: Vec<(String, Vec<StateOp>)>,
    /// Online rows per view.
    pub online: Vec<(String, Vec<OnlineRow>)>,
    /// Tile changes per view.
    pub tiles: Vec<(String, TileWrites)>,
    /// Metadata entries (epoch, positions, watermarks …).
    pub meta: Vec<(String, Vec<u8>)>,
}

impl Store {
    fn err(&self, source: rocksdb::Error) -> EngineError {
        store_error(&self.path, source)
    }

    /// Opens (or creates) the database with a column family per view.
    pub fn open(dir: &Path, views: &[String]) -> Result<Self> {
        Self::open_with(dir, views, StoreOptions::default())
    }

    /// [`Store::open`] within memory limits.
    pub fn open_with(dir: &Path, views: &[String], limits: StoreOptions) -> Result<Self> {
        let path = dir.join("db");
        std::fs::create_dir_all(&path).map_err(|e| EngineError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.set_db_write_buffer_size(limits.write_buffers);
        // A column family written rarely (metadata) would otherwise keep
        // every WAL file alive until RocksDB's default bound (gigabytes),
        // and a reader opening the dir would replay all of it.
        opts.set_max_total_wal_size(limits.write_buffers as u64);
        let cache = Cache::new_lru_cache(limits.block_cache);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);
        table.set_cache_index_and_filter_blocks(true);
        // Most tile lookups of a checkpoint are for tiles that do not exist yet.
        table.set_bloom_filter(10.0, false);
        opts.set_block_based_table_factory(&table);
        let mut names: Vec<String> = vec![META.into(), STATE.into()];
        for v in views {
            names.extend([online_cf(v), tiles_cf(v), expiry_cf(v)]);
        }
        if let Ok(existing) = DB::list_cf(&opts, &path) {
            for n in existing {
                if !names.contains(&n) {
                    names.push(n);
                }
            }
        }
        let cfs = names.iter().map(|n| {
            let mut o = Options::default();
            o.set_compression_type(rocksdb::DBCompressionType::Lz4);
            o.set_block_based_table_factory(&table);
            ColumnFamilyDescriptor::new(n, o)
        });
        let db = DB::open_cf_descriptors(&opts, &path, cfs).map_err(|e| store_error(&path, e))?;
        Ok(Store { db, path })
    }

    /// Opens the database read-only (works while a `sluice run` holds it).
    pub fn open_read_only(dir: &Path) -> Result<Self> {
        let path = dir.join("db");
        if !path.exists() {
            return Err(EngineError::Incompatible {
                path: dir.display().to_string(),
                reason: "no state here; run `sluice run … --state-dir` first".into(),
            });
        }
        let opts = Options::default();
        let names = DB::list_cf(&opts, &path).map_err(|e| store_error(&path, e))?;
        if !names.iter().any(|n| n == META) {
            // A damaged database says so when opened; an intact one
            // without our column families is being created right now.
            if let Err(e) = DB::open_cf_for_read_only(&opts, &path, names.clone(), false) {
                return Err(store_error(&path, e));
            }
            return Err(EngineError::Incompatible {
                path: dir.display().to_string(),
                reason: "no state here yet: the database is still being created".into(),
            });
        }
        // A read-only open reads the MANIFEST, then the WAL files. A flush by
        // the running job in between (new table files in the MANIFEST, the
        // WAL they replace deleted) would leave this open without the
        // flushed writes: an older, possibly torn, state. Every flush and
        // compaction appends to the MANIFEST before it deletes anything, so
        // an open during which the MANIFEST and the WAL files did not change
        // saw one committed state; otherwise it is retried. Table files are
        // all opened during the open (`max_open_files` -1), so later
        // deletions cannot reach an open that passed.
        let mut last = None;
        for attempt in 0..READ_ONLY_ATTEMPTS {
            let before = files_fingerprint(&path);
            let opened = DB::open_cf_for_read_only(&opts, &path, names.clone(), false);
            let after = files_fingerprint(&path);
            match opened {
                Ok(db) if before.is_some() && before == after => return Ok(Store { db, path }),
                Ok(_) => last = None,
                Err(e) => last = Some(e),
            }
            std::thread::sleep(std::time::Duration::from_millis(2 << attempt.min(5)));
        }
        Err(match last {
            Some(e) => store_error(&path, e),
            None => EngineError::Incompatible {
                path: dir.display().to_string(),
                reason: format!(
                    "the state changed under {READ_ONLY_ATTEMPTS} read-only opens in a row (a running job flushing); try again"
                ),
            },
        })
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| EngineError::Incompatible {
                path: self.path.display().to_string(),
                reason: format!("column family `{name}` is missing"),
            })
    }

    /// A metadata value.
    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.db.get_cf(self.cf(META)?, key).map_err(|e| self.err(e))
    }

    /// A metadata value as i64.
    pub fn meta_i64(&self, key: &str) -> Result<Option<i64>> {
        Ok(self
            .meta(key)?
            .and_then(|v| v.try_into().ok())
            .map(i64::from_be_bytes))
    }

    /// The online row of `key` in `view`.
    pub fn online_get(&self, view: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let cf = self
            .db
            .cf_handle(&online_cf(view))
            .ok_or_else(|| EngineError::Incompatible {
                path: self.path.display().to_string(),
                reason: format!("no online store for view `{view}`"),
            })?;
        self.db.get_cf(cf, online_key(key)).map_err(|e| self.err(e))
    }

    /// Every online row of `view` (for tests and exports).
    pub fn online_scan(&self, view: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let cf = self.cf(&online_cf(view))?;
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let text = k.get(2..).unwrap_or_default();
            out.push((String::from_utf8_lossy(text).into_owned(), v.to_vec()));
        }
        // In key order, whatever their groups.
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// The checkpointed state of `view`: (pane start, key row, state row), ordered by pane.
    pub fn state_entries(&self, view: &str) -> Result<Vec<(i64, crate::store::StateEntry)>> {
        let cf = self.cf(STATE)?;
        let prefix = state_prefix(view);
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(cf, IteratorMode::From(&prefix, Direction::Forward))
        {
            let (k, v) = item.map_err(|e| self.err(e))?;
            if !k.starts_with(&prefix) {
                break;
            }
            let rest = &k[prefix.len()..];
            if rest.len() < 8 {
                continue;
            }
            let mut pb = [0u8; 8];
            pb.copy_from_slice(&rest[..8]);
            let pane = (u64::from_be_bytes(pb) ^ (1u64 << 63)) as i64;
            out.push((
                pane,
                (rest[8..].to_vec(), decode_state(&v, &self.path, STATE)?),
            ));
        }
        Ok(out)
    }

    /// Commits a checkpoint atomically and durably. Entries go into the write
    /// batch sorted by key (the memtable's skip list inserts sorted runs far
    /// faster), and only the last online row per key is written.
    pub fn commit(&self, c: Commit) -> Result<()> {
        let mut b = WriteBatch::default();
        let state = self.cf(STATE)?;
        let mut puts: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for (view, ops) in &c.state {
            let prefix = state_prefix(view);
            for op in ops {
                match op {
                    StateOp::Put { pane, key, value } => {
                        let mut k = prefix.clone();
                        k.extend_from_slice(&pane_bytes(*pane));
                        k.extend_from_slice(key);
                        let mut v = Vec::new();
                        encode_state(value, &mut v);
                        puts.push((k, v));
                    }
                    StateOp::DropPane(p) => {
                        let mut from = prefix.clone();
                        from.extend_from_slice(&pane_bytes(*p));
                        let mut to = prefix.clone();
                        to.extend_from_slice(&pane_bytes(p.saturating_add(1)));
                        b.delete_range_cf(state, from, to);
                    }
                }
            }
        }
        puts.sort_unstable_by(|x, y| x.0.cmp(&y.0));
        for (k, v) in &puts {
            b.put_cf(state, k, v);
        }
        for (view, rows) in &c.online {
            let cf = self.cf(&online_cf(view))?;
            // Later rows win: stable sort by stored key, then keep each
            // key's last row. In key order, the memtable inserts each next
            // to the one before.
            let mut sorted: Vec<(Vec<u8>, &[u8])> = rows
                .iter()
                .map(|r| (online_key(&r.0), r.1.as_slice()))
                .collect();
            sorted.sort_by(|x, y| x.0.cmp(&y.0));
            for (i, (k, v)) in sorted.iter().enumerate() {
                if sorted.get(i + 1).is_some_and(|next| &next.0 == k) {
                    continue;
                }
                b.put_cf(cf, k, v);
            }
        }
        for (view, w) in &c.tiles {
            let cf = self.cf(&tiles_cf(view))?;
            let mut v = Vec::new();
            // Stable: a tile put twice in one flush keeps its last state.
            let mut puts: Vec<&(Vec<u8>, Vec<u8>)> = w.puts.iter().collect();
            puts.sort_by(|x, y| x.0.cmp(&y.0));
            for (k, state) in puts {
                encode_state(state, &mut v);
                b.put_cf(cf, k, &v);
            }
            for k in &w.deletes {
                b.delete_cf(cf, k);
            }
            let ex = self.cf(&expiry_cf(view))?;
            let mut expiry: Vec<&Vec<u8>> = w.expiry.iter().collect();
            expiry.sort_unstable();
            for k in expiry {
                b.put_cf(ex, k, []);
            }
            if let Some(t) = w.expired_through {
                b.delete_range_cf(ex, pane_bytes(i64::MIN), pane_bytes(t.saturating_add(1)));
            }
        }
        let meta = self.cf(META)?;
        for (k, v) in &c.meta {
            b.put_cf(meta, k, v);
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(b, &wo).map_err(|e| self.err(e))
    }

    /// The committed states of these tiles of `view` (`None`: no such tile).
    pub fn get_tiles(&self, view: &str, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>> {
        let cf = self.cf(&tiles_cf(view))?;
        // In key order, so RocksDB need not sort them (bytewise, as the
        // column family compares).
        let mut order: Vec<usize> = (0..keys.len()).collect();
        order.sort_unstable_by(|a, b| keys[*a].cmp(&keys[*b]));
        let found = self
            .db
            .batched_multi_get_cf(cf, order.iter().map(|i| &keys[*i]), true);
        let mut out: Vec<Option<Vec<u8>>> = vec![None; keys.len()];
        for (i, r) in order.into_iter().zip(found) {
            if let Some(v) = r.map_err(|e| self.err(e))? {
                out[i] = Some(decode_state(&v, &self.path, &tiles_cf(view))?);
            }
        }
        Ok(out)
    }

    /// Tiles of `view` that leave every window at or before watermark `wm`.
    pub fn expired_tiles(&self, view: &str, wm: i64) -> Result<Vec<Vec<u8>>> {
        let cf = self.cf(&expiry_cf(view))?;
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(pane_bytes(wm.saturating_add(1)).to_vec());
        let mut out = Vec::new();
        for item in self.db.iterator_cf_opt(cf, ro, IteratorMode::Start) {
            let (k, _) = item.map_err(|e| self.err(e))?;
            out.push(k[8..].to_vec());
        }
        Ok(out)
    }

    /// One key's tiles in `ranges` (level, from, to: starts in `[from, to)`),
    /// computed by `ranges` from the view's committed clock, all read from one
    /// snapshot so the clock and the tiles belong to the same checkpoint.
    pub fn read_tiles(
        &self,
        view: &str,
        key: &str,
        clock_key: &str,
        ranges: impl Fn(i64) -> Vec<(u8, i64, i64)>,
    ) -> Result<TileRead> {
        let cf = self
            .db
            .cf_handle(&tiles_cf(view))
            .ok_or_else(|| EngineError::Incompatible {
                path: self.path.display().to_string(),
                // A read-only open can race a `sluice run` that is still
                // creating the view's column families.
                reason: format!(
                    "no tiles for view `{view}`: no state here yet (the database is still being created, or the view is new)"
                ),
            })?;
        let snap = self.db.snapshot();
        let clock = snap
            .get_cf_opt(self.cf(META)?, clock_key, ReadOptions::default())
            .map_err(|e| self.err(e))?
            .and_then(|v| v.try_into().ok())
            .map(i64::from_be_bytes);
        let mut out = TileRead {
            clock,
            ..TileRead::default()
        };
        let Some(clock) = clock else {
            return Ok(out);
        };
        let prefix = tile_prefix(key);
        let mut ro = ReadOptions::default();
        let mut upper = prefix.clone();
        upper.push(u8::MAX);
        ro.set_iterate_upper_bound(upper);
        out.exists = snap
            .iterator_cf_opt(cf, ro, IteratorMode::From(&prefix, Direction::Forward))
            .next()
            .transpose()
            .map_err(|e| self.err(e))?
            .is_some();
        if !out.exists {
            return Ok(out);
        }
        for (level, from, to) in ranges(clock) {
            if from >= to {
                continue;
            }
            let lo = tile_key(key, level, from);
            let mut ro = ReadOptions::default();
            ro.set_iterate_upper_bound(tile_key(key, level, to));
            for item in snap.iterator_cf_opt(cf, ro, IteratorMode::From(&lo, Direction::Forward)) {
                let (_, v) = item.map_err(|e| self.err(e))?;
                out.states
                    .push(decode_state(&v, &self.path, &tiles_cf(view))?);
            }
        }
        Ok(out)
    }

    /// Every tile of `view`: (entity key, level, start) (for tests and tools).
    pub fn tile_scan(&self, view: &str) -> Result<Vec<(String, u8, i64)>> {
        let cf = self.cf(&tiles_cf(view))?;
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, _) = item.map_err(|e| self.err(e))?;
            let (key, level, start) =
                parse_tile_key(&k).ok_or_else(|| EngineError::Incompatible {
                    path: self.path.display().to_string(),
                    reason: "unreadable tile key".into(),
                })?;
            out.push((String::from_utf8_lossy(key).into_owned(), level, start));
        }
        Ok(out)
    }

    /// Distinct keys with at least one tile in `view` (tiles are stored in
    /// key order, so one pass counts them).
    pub fn tile_keys(&self, view: &str) -> Result<u64> {
        let cf = self.cf(&tiles_cf(view))?;
        let mut n = 0;
        let mut last: Option<Vec<u8>> = None;
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, _) = item.map_err(|e| self.err(e))?;
            let Some((key, _, _)) = parse_tile_key(&k) else {
                continue;
            };
            if last.as_deref() != Some(key) {
                n += 1;
                last = Some(key.to_vec());
            }
        }
        Ok(n)
    }

    /// Bytes used by the database's files (SST + WAL + manifest).
    pub fn disk_bytes(&self) -> u64 {
        dir_size(&self.path)
    }

    /// Flushes every column family's memtable to SST files, so the WAL is
    /// empty: a reader opening the dir then replays nothing.
    pub fn flush(&self) -> Result<()> {
        let names = DB::list_cf(&Options::default(), &self.path).map_err(|e| self.err(e))?;
        for n in names {
            if let Some(cf) = self.db.cf_handle(&n) {
                self.db.flush_cf(cf).map_err(|e| self.err(e))?;
            }
        }
        Ok(())
    }
}

/// Total size of the files under a directory.
pub fn dir_size(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_values_round_trip_compressed_or_not() {
        let p = Path::new("x");
        let mut out = Vec::new();
        let small = b"short state".to_vec();
        encode_state(&small, &mut out);
        assert_eq!(out[0], RAW);
        assert_eq!(decode_state(&out, p, "t").expect("decode"), small);
        let mut hll = vec![0u8; 16384];
        hll[17] = 3;
        hll[9000] = 5;
        encode_state(&hll, &mut out);
        assert_eq!(out[0], LZ4);
        assert!(out.len() < 200, "{} bytes", out.len());
        assert_eq!(decode_state(&out, p, "t").expect("decode"), hll);
        assert!(decode_state(&[9, 1, 2], p, "t").is_err());
        // A size prefix of 4 GiB for a few bytes: refused before any allocation.
        assert!(decode_state(&[LZ4, 0xff, 0xff, 0xff, 0xff, 1, 2, 3], p, "t").is_err());
        assert!(decode_state(&[LZ4, 1], p, "t").is_err());
    }

    /// Read-only opens racing a writer that flushes every few commits and
    /// reopens the database (a restart flushes what it recovers from the
    /// WAL and deletes the WAL): each open sees one whole commit (the
    /// metadata counter and the online row written with it agree), never
    /// older than the one an earlier open saw.
    #[test]
    fn read_only_opens_racing_flushes_see_whole_commits_in_order() {
        let dir = tempfile::tempdir().expect("tmp");
        let limits = StoreOptions {
            block_cache: 1 << 20,
            write_buffers: 256 << 10,
        };
        let open = || Store::open_with(dir.path(), &["v".to_string()], limits).expect("open");
        let commit = |w: &Store, n: u64| {
            let filler: Vec<OnlineRow> = (0..8)
                .map(|i| {
                    let v: Vec<u8> = (0..1024u64).map(|j| (j * 31 + n + i) as u8).collect();
                    (format!("f{n}-{i}"), v)
                })
                .chain([("k".to_string(), n.to_be_bytes().to_vec())])
                .collect();
            let c = Commit {
                online: vec![("v".into(), filler)],
                meta: vec![("n".into(), n.to_be_bytes().to_vec())],
                ..Commit::default()
            };
            w.commit(c).expect("commit");
        };
        commit(&open(), 1);
        let done = std::sync::atomic::AtomicBool::new(false);
        let (reads, last) = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let (mut reads, mut last) = (0u64, 0i64);
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = Store::open_read_only(dir.path()).expect("read-only open");
                    let n = r.meta_i64("n").expect("meta").expect("n");
                    let k = r.online_get("v", "k").expect("online").expect("k");
                    let k = i64::from_be_bytes(k.try_into().expect("8 bytes"));
                    assert_eq!(n, k, "one open saw parts of two commits");
                    assert!(
                        n >= last,
                        "a later open saw an older commit: {n} after {last}"
                    );
                    last = n;
                    reads += 1;
                }
                (reads, last)
            });
            let mut n = 2;
            for _restart in 0..150 {
                let w = open();
                for _ in 0..5 {
                    commit(&w, n);
                    n += 1;
                }
            }
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            reader.join().expect("reader")
        });
        assert!(reads > 20, "{reads} reads");
        assert!(last > 1, "{last}");
    }
}
