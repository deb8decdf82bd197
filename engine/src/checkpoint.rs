//! The checkpoint's metadata as typed values, encoded in one place.
//!
//! A checkpoint commits, in one RocksDB write batch with the state it
//! describes: the epoch, each source's position, watermark, largest event
//! time and per-partition largest event times, each view's progress (the
//! last closed window it emitted, the clock its tiles are complete to) and
//! the dead-letter file's committed length. They are one JSON value under
//! one key; readers that need only a clock (the serving API, `sluice get`)
//! get small copies under their own keys, written in the same batch.
//! Anything unreadable is an error naming the state dir, never a default.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::store::Store;

/// Metadata key of the checkpoint.
const CHECKPOINT_KEY: &str = "checkpoint";
/// Metadata key of the epoch written by builds before the typed checkpoint.
const LEGACY_EPOCH_KEY: &str = "epoch";

/// Version of the state layout; a state dir of another version is refused.
/// Version 5: key texts escape `|` and `\` and spell NULL `\N`;
/// lake and archive files carry the state dir's id.
pub const STATE_FORMAT: u32 = 5;

/// What one checkpoint committed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The state layout version ([`STATE_FORMAT`]).
    pub format: u32,
    /// Checkpoints committed so far, this one included.
    pub epoch: u64,
    /// Per source.
    pub sources: BTreeMap<String, SourceProgress>,
    /// Per feature view.
    pub views: BTreeMap<String, ViewProgress>,
    /// Bytes of the dead-letter file that belong to committed checkpoints.
    pub dead_letter_len: u64,
    /// Bytes of dead letters written per source (the `--dead-letter-limit` budget used).
    #[serde(default)]
    pub dead_letter_bytes: BTreeMap<String, u64>,
}

/// Where a source was at a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceProgress {
    /// The connector's resume position (opaque bytes, hex in the encoding).
    #[serde(with = "hex_bytes")]
    pub position: Vec<u8>,
    /// The watermark (ms); `None` before the first event.
    pub watermark: Option<i64>,
    /// The largest event time seen (ms).
    pub max_event_time: Option<i64>,
    /// Largest event time per partition (ms).
    pub partitions: BTreeMap<u32, i64>,
}

/// How far a view was at a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ViewProgress {
    /// Largest window end the pane operator emitted (ms).
    pub emitted_through: Option<i64>,
    /// The clock the view's tiles are complete up to (ms).
    pub clock: Option<i64>,
}

impl Checkpoint {
    /// The last committed checkpoint of a state dir, `None` for a new one.
    pub fn load(store: &Store, dir: &Path) -> Result<Option<Checkpoint>> {
        let bad = |reason: String| EngineError::Incompatible {
            path: dir.display().to_string(),
            reason,
        };
        let Some(bytes) = store.meta(CHECKPOINT_KEY)? else {
            if store.meta(LEGACY_EPOCH_KEY)?.is_some() {
                return Err(bad("this state was written by an older Sluice build (window state before tiles); run with a new --state-dir".into()));
            }
            return Ok(None);
        };
        let c: Checkpoint = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("unreadable checkpoint metadata: {e}")))?;
        if c.format != STATE_FORMAT {
            let why = match c.format {
                3 => " (tiles without their newest event time)",
                4 => " (keys joined by `|` without escapes, lake files without the state dir's id)",
                _ => "",
            };
            return Err(bad(format!(
                "state layout version {}{why} is not this build's ({STATE_FORMAT}); rebuild it with `sluice backfill --online` into a new --state-dir, or run from the source's start with a new --state-dir",
                c.format
            )));
        }
        Ok(Some(c))
    }

    /// The metadata entries that commit this checkpoint: the checkpoint
    /// itself and the readers' copies of the clocks.
    pub fn entries(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let mut out = vec![(
            CHECKPOINT_KEY.to_string(),
            serde_json::to_vec(self)
                .map_err(|e| EngineError::Internal(format!("encoding the checkpoint: {e}")))?,
        )];
        for (name, s) in &self.sources {
            if let Some(w) = s.watermark {
                out.push((watermark_key(name), w.to_be_bytes().to_vec()));
            }
        }
        for (name, v) in &self.views {
            if let Some(c) = v.clock {
                out.push((clock_key(name), c.to_be_bytes().to_vec()));
            }
        }
        Ok(out)
    }
}

/// Metadata key of the pipeline's text (readers rebuild tiled views' aggregates from it).
pub const PIPELINE_KEY: &str = "pipeline";

/// The store key of a view's catch-up point: the watermark from which a
/// version added to an existing state dir serves its unversioned name.
pub fn catch_up_key(view: &str) -> String {
    format!("catch_up/{view}")
}

/// Metadata key of the state dir's id.
const STATE_ID_KEY: &str = "state_id";

/// The id of a state dir: 16 hex digits made when the state dir is first
/// opened by a job and committed at once, before any file is written. It
/// names the lake and archive files the state dir's job writes
/// (`part-{epoch}-{id}-{n}.parquet`), so its recovery removes its own
/// uncommitted files and nobody else's.
pub fn state_id(store: &Store, dir: &Path) -> Result<String> {
    if let Some(b) = store.meta(STATE_ID_KEY)? {
        return String::from_utf8(b)
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|c| c.is_ascii_hexdigit()))
            .ok_or_else(|| EngineError::Incompatible {
                path: dir.display().to_string(),
                reason: "unreadable state dir id".into(),
            });
    }
    let id = new_state_id(dir);
    store.commit(crate::store::Commit {
        meta: vec![(STATE_ID_KEY.to_string(), id.as_bytes().to_vec())],
        ..Default::default()
    })?;
    Ok(id)
}

/// 64 bits from the process's randomly seeded hasher over the path, the
/// process id and the time, as 16 hex digits.
fn new_state_id(dir: &Path) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let h = ahash::RandomState::new().hash_one((dir, std::process::id(), nanos));
    format!("{h:016x}")
}

/// Metadata key of a source's committed watermark (for readers).
pub fn watermark_key(source: &str) -> String {
    format!("wm/{source}")
}

/// Metadata key of a tiled view's committed clock: the watermark its tiles
/// are complete up to (for readers).
pub fn clock_key(view: &str) -> String {
    format!("clock/{view}")
}

/// A reader's copy of a clock: 8 bytes, big-endian.
pub fn read_clock(store: &Store, key: &str) -> Result<Option<i64>> {
    match store.meta(key)? {
        None => Ok(None),
        Some(b) => {
            let arr: [u8; 8] = b
                .as_slice()
                .try_into()
                .map_err(|_| EngineError::Incompatible {
                    path: format!("metadata `{key}`"),
                    reason: format!("{} bytes, not an 8-byte clock", b.len()),
                })?;
            Ok(Some(i64::from_be_bytes(arr)))
        }
    }
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        let mut out = String::with_capacity(b.len() * 2);
        for x in b {
            out.push_str(&format!("{x:02x}"));
        }
        s.serialize_str(&out)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() % 2 != 0 {
            return Err(serde::de::Error::custom("odd-length hex"));
        }
        (0..s.len())
            .step_by(2)
            .map(|i| {
                u8::from_str_radix(&s[i..i + 2], 16)
                    .map_err(|_| serde::de::Error::custom("not hex"))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_round_trips_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(dir.path(), &[]).expect("store");
        assert_eq!(Checkpoint::load(&store, dir.path()).expect("load"), None);
        let mut c = Checkpoint {
            format: STATE_FORMAT,
            epoch: 7,
            dead_letter_len: 123,
            ..Checkpoint::default()
        };
        c.sources.insert(
            "clicks".into(),
            SourceProgress {
                position: vec![0, 1, 254, 255],
                watermark: Some(-5),
                max_event_time: Some(10),
                partitions: [(0, 10), (3, 9)].into_iter().collect(),
            },
        );
        c.views.insert(
            "v".into(),
            ViewProgress {
                emitted_through: None,
                clock: Some(-5),
            },
        );
        let commit = crate::store::Commit {
            meta: c.entries().expect("entries"),
            ..Default::default()
        };
        store.commit(commit).expect("commit");
        assert_eq!(Checkpoint::load(&store, dir.path()).expect("load"), Some(c));
        assert_eq!(
            read_clock(&store, &clock_key("v")).expect("clock"),
            Some(-5)
        );
        let garbage = crate::store::Commit {
            meta: vec![(CHECKPOINT_KEY.into(), b"{not json".to_vec())],
            ..Default::default()
        };
        store.commit(garbage).expect("commit");
        assert!(Checkpoint::load(&store, dir.path()).is_err());
    }
}
