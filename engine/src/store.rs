//! The RocksDB database under the state dir: window state, the online store
//! (a column family per view) and checkpoint metadata, committed together in
//! one write batch.

use std::path::{Path, PathBuf};

use rocksdb::{
    ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions,
};

use crate::aggregate::StateOp;
use crate::error::{EngineError, Result};
use crate::view::OnlineRow;

const META: &str = "meta";
const STATE: &str = "state";

/// The column family holding view `view`'s online rows.
pub fn online_cf(view: &str) -> String {
    format!("online.{view}")
}

fn pane_bytes(p: i64) -> [u8; 8] {
    ((p as u64) ^ (1u64 << 63)).to_be_bytes()
}

fn state_prefix(view: &str) -> Vec<u8> {
    let mut k = view.as_bytes().to_vec();
    k.push(0);
    k
}

/// Version of the encoding of window-state values; a state dir written by a
/// build with another version is refused.
pub const STATE_FORMAT: &[u8] = b"2";
/// Meta key holding [`STATE_FORMAT`].
pub const STATE_FORMAT_KEY: &str = "state_format";

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

fn decode_state(v: &[u8], path: &Path) -> Result<Vec<u8>> {
    let bad = |why: String| EngineError::Incompatible {
        path: path.display().to_string(),
        reason: format!("unreadable window state: {why}"),
    };
    match v.split_first() {
        Some((&RAW, rest)) => Ok(rest.to_vec()),
        Some((&LZ4, rest)) => {
            lz4_flex::block::decompress_size_prepended(rest).map_err(|e| bad(e.to_string()))
        }
        _ => Err(bad("unknown value encoding".into())),
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
    /// Metadata entries (epoch, positions, watermarks …).
    pub meta: Vec<(String, Vec<u8>)>,
}

impl Store {
    fn err(&self, source: rocksdb::Error) -> EngineError {
        EngineError::Store {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// Opens (or creates) the database with a column family per view.
    pub fn open(dir: &Path, views: &[String]) -> Result<Self> {
        let path = dir.join("db");
        std::fs::create_dir_all(&path).map_err(|e| EngineError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let mut names: Vec<String> = vec![META.into(), STATE.into()];
        names.extend(views.iter().map(|v| online_cf(v)));
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
            ColumnFamilyDescriptor::new(n, o)
        });
        let db = DB::open_cf_descriptors(&opts, &path, cfs).map_err(|e| EngineError::Store {
            path: path.display().to_string(),
            source: e,
        })?;
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
        let names = DB::list_cf(&opts, &path).map_err(|e| EngineError::Store {
            path: path.display().to_string(),
            source: e,
        })?;
        let db = DB::open_cf_for_read_only(&opts, &path, names, false).map_err(|e| {
            EngineError::Store {
                path: path.display().to_string(),
                source: e,
            }
        })?;
        Ok(Store { db, path })
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
        self.db.get_cf(cf, key).map_err(|e| self.err(e))
    }

    /// Every online row of `view` (for tests and exports).
    pub fn online_scan(&self, view: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let cf = self.cf(&online_cf(view))?;
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| self.err(e))?;
            out.push((String::from_utf8_lossy(&k).into_owned(), v.to_vec()));
        }
        Ok(out)
    }

    /// The checkpointed state of `view`: (pane start, key row, state row), ordered by pane.
    pub fn state_entries(&self, view: &str) -> Result<Vec<(i64, crate::aggregate::StateEntry)>> {
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
            out.push((pane, (rest[8..].to_vec(), decode_state(&v, &self.path)?)));
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
            // Later rows win: stable sort by key, then keep each key's last row.
            let mut sorted: Vec<&OnlineRow> = rows.iter().collect();
            sorted.sort_by(|x, y| x.0.cmp(&y.0));
            for (i, (k, v)) in sorted.iter().map(|r| (&r.0, &r.1)).enumerate() {
                if sorted.get(i + 1).is_some_and(|next| &next.0 == k) {
                    continue;
                }
                b.put_cf(cf, k, v);
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

    /// Bytes used by the database's files (SST + WAL + manifest).
    pub fn disk_bytes(&self) -> u64 {
        dir_size(&self.path)
    }

    /// Flushes memtables to SST files (for size measurements).
    pub fn flush(&self) -> Result<()> {
        for n in [META, STATE] {
            self.db.flush_cf(self.cf(n)?).map_err(|e| self.err(e))?;
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
        assert_eq!(decode_state(&out, p).expect("decode"), small);
        let mut hll = vec![0u8; 16384];
        hll[17] = 3;
        hll[9000] = 5;
        encode_state(&hll, &mut out);
        assert_eq!(out[0], LZ4);
        assert!(out.len() < 200, "{} bytes", out.len());
        assert_eq!(decode_state(&out, p).expect("decode"), hll);
        assert!(decode_state(&[9, 1, 2], p).is_err());
    }
}
