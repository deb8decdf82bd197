//! The epoch order of a checkpoint: every worker's changes at one barrier,
//! the lake and archive files of the epoch, the vector indexes, then one
//! RocksDB write batch with state, online rows, positions and watermarks.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use arrow::array::{Int64Array, RecordBatch};
use arrow::datatypes::SchemaRef;

use super::Job;
use crate::checkpoint::{Checkpoint, PIPELINE_KEY, STATE_FORMAT, ViewProgress, catch_up_key};
use crate::error::{EngineError, Result};
use crate::live::wall_ms;
use crate::online::view_meta_key;
use crate::source::{DeadLetterSink, OfflineSink};
use crate::store::Commit;
use crate::watermark::NO_WATERMARK;
use crate::worker::ViewMark;

/// A source's event archive: the rows it accepted, written with each
/// checkpoint (see [`crate::archive::archive_schema`]).
pub(super) struct Archive {
    pub(super) sink: Box<dyn OfflineSink>,
    pub(super) schema: SchemaRef,
    /// Source rows since the last checkpoint.
    pub(super) rows: Vec<ArchivedRows>,
    /// The clock of the last committed checkpoint.
    pub(super) clock: Option<i64>,
}

/// Source rows, their origins (partition, offset) and the watermark their late rule used.
type ArchivedRows = (RecordBatch, Vec<(Option<i32>, Option<i64>)>, Int64Array);

impl Archive {
    /// Writes the rows of checkpoint `epoch`, whose clock is `clock`.
    pub(super) fn write(&mut self, epoch: u64, clock: Option<i64>) -> Result<()> {
        let rows = std::mem::take(&mut self.rows);
        let before = self.clock;
        self.clock = clock;
        if rows.is_empty() {
            return Ok(());
        }
        let mut seq = 0u64;
        let mut out = Vec::with_capacity(rows.len());
        for (b, origins, wm) in rows {
            let n = b.num_rows();
            let mut cols = b.columns().to_vec();
            let seqs = arrow::array::UInt64Array::from_iter_values(seq..seq + n as u64);
            seq += n as u64;
            cols.push(Arc::new(arrow::array::UInt64Array::from(vec![epoch; n])));
            cols.push(Arc::new(seqs));
            cols.push(Arc::new(arrow::array::Int32Array::from_iter(
                origins.iter().map(|o| o.0),
            )));
            cols.push(Arc::new(Int64Array::from_iter(origins.iter().map(|o| o.1))));
            cols.push(Arc::new(Int64Array::from_iter(
                wm.values()
                    .iter()
                    .map(|w| (*w != NO_WATERMARK).then_some(*w)),
            )));
            cols.push(Arc::new(Int64Array::from(vec![before; n])));
            cols.push(Arc::new(Int64Array::from(vec![clock; n])));
            out.push(
                RecordBatch::try_new(Arc::clone(&self.schema), cols)
                    .map_err(|e| EngineError::arrow("event archive rows", e))?,
            );
        }
        self.sink.write_epoch(epoch, &out)?;
        Ok(())
    }
}

/// Fault injection for the crash tests: `SLUICE_FAULT_ABORT_BEFORE_STATE_COMMIT=N`
/// aborts the process after checkpoint N's index commit, before its state commit.
fn abort_before_state_commit(epoch: u64) -> bool {
    static AT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    AT.get_or_init(|| {
        std::env::var("SLUICE_FAULT_ABORT_BEFORE_STATE_COMMIT")
            .ok()
            .and_then(|v| v.parse().ok())
    })
    .is_some_and(|n| n == epoch)
}

impl Job {
    /// Takes a checkpoint: every worker's changes at one barrier; lake and
    /// archive files of the epoch made durable, the vector indexes, then
    /// one RocksDB write batch with state, online rows, positions and
    /// watermarks.
    pub fn checkpoint(&mut self) -> Result<()> {
        let t0 = Instant::now();
        let epoch = self.epoch + 1;
        self.write_letters()?;
        let marks: Vec<ViewMark> = self
            .views
            .iter()
            .map(|v| {
                let c = self.sources[v.source].clock();
                ViewMark {
                    wm: c.watermark(),
                    end: c.max_event_time(),
                }
            })
            .collect();
        let mut parts = self.workers.barrier(&marks)?;
        for (vi, lake) in self.lakes.iter_mut().enumerate() {
            let batches: Vec<RecordBatch> = parts
                .iter_mut()
                .flat_map(|p| std::mem::take(&mut p[vi].lake))
                .collect();
            if batches.is_empty() {
                continue;
            }
            for l in lake.iter_mut() {
                l.write_epoch(epoch, &batches)?;
            }
        }
        for s in self.sources.iter_mut() {
            let clock = s.clock().get();
            if let Some(a) = s.archive.as_mut() {
                a.write(epoch, clock)?;
            }
        }
        let dl_len = self.dead.commit()?;
        let mut c = Commit::default();
        let mut cp = Checkpoint {
            format: STATE_FORMAT,
            epoch,
            dead_letter_len: dl_len,
            dead_letter_bytes: self.dead.used().clone(),
            ..Checkpoint::default()
        };
        let mut vectors = Vec::with_capacity(self.views.len());
        let mut emitted_rows = 0;
        for (vi, v) in self.views.iter().enumerate() {
            let wm = marks[vi].wm;
            let mut progress = ViewProgress::default();
            let mut rows = Vec::new();
            let mut ops = Vec::new();
            let mut updates = Vec::new();
            let mut expect: BTreeMap<String, u64> = BTreeMap::new();
            let mut sizes: Option<(usize, usize)> = None;
            for p in parts.iter_mut() {
                let vp = &mut p[vi];
                if let Some(w) = vp.tiles.take() {
                    c.tiles.push((v.name.clone(), w));
                    progress.clock = Some(wm);
                }
                c.meta.append(&mut vp.pending);
                ops.append(&mut vp.state);
                rows.append(&mut vp.online);
                updates.append(&mut vp.vectors);
                progress.emitted_through = progress.emitted_through.max(vp.emitted_through);
                emitted_rows += vp.emitted_rows;
                for (rule, n) in vp.expect.drain(..) {
                    *expect.entry(rule).or_default() += n;
                }
                if let Some((panes, keys)) = vp.sizes {
                    let (p0, k0) = sizes.unwrap_or_default();
                    sizes = Some((p0.max(panes), k0 + keys));
                }
            }
            c.state.push((v.name.clone(), ops));
            metrics::counter!("sluice_online_writes_total", "view" => v.name.clone())
                .increment(rows.len() as u64);
            c.online.push((v.name.clone(), rows));
            cp.views.insert(v.name.clone(), progress);
            if let Ok(j) = serde_json::to_vec(&v.meta) {
                c.meta.push((view_meta_key(&v.name), j));
            }
            if let Some(at) = self.live.catch_up.get(&v.name) {
                c.meta
                    .push((catch_up_key(&v.name), at.to_be_bytes().to_vec()));
            }
            self.expectations[vi] = expect.into_iter().collect();
            self.sizes[vi] = sizes;
            vectors.push(updates);
        }
        for s in &self.sources {
            cp.sources.insert(s.name.clone(), s.progress());
        }
        c.meta.extend(cp.entries()?);
        c.meta
            .push((PIPELINE_KEY.into(), self.pipeline_text.as_bytes().to_vec()));
        // The indexes commit first: a crash before the state commit leaves
        // them one epoch ahead, and the next start rebuilds them.
        for ((vi, v), updates) in self.views.iter().enumerate().zip(vectors) {
            let Some(idx) = self.live.indexes.get(&v.name) else {
                continue;
            };
            let wm = (marks[vi].wm != NO_WATERMARK).then_some(marks[vi].wm);
            let t = Instant::now();
            let st = idx.apply(epoch, &updates, wm, false)?;
            metrics::counter!("sluice_index_updates_total", "view" => v.name.clone())
                .increment(st.upserts + st.removals);
            metrics::counter!("sluice_index_expired_total", "view" => v.name.clone())
                .increment(st.expired);
            metrics::histogram!("sluice_index_commit_seconds", "view" => v.name.clone())
                .record(t.elapsed().as_secs_f64());
        }
        if abort_before_state_commit(epoch) {
            std::process::abort();
        }
        self.live.store.commit(c)?;
        self.epoch = epoch;
        self.workers.committed()?;
        for s in self.sources.iter_mut() {
            // Only informs outside tools (consumer-group lag); the offsets
            // that count are the ones just committed with the state.
            if let Err(e) = s.src.committed() {
                tracing::warn!(source = %s.name, error = %e, "could not report committed positions");
            }
        }
        for (vi, v) in self.views.iter().enumerate() {
            if let Some(w) = self.live.watermarks.get(&v.name) {
                w.store(marks[vi].wm, Ordering::Release);
            }
            if let (Some(n), Some(t)) = (self.live.freshness.newest.get(&v.name), marks[vi].end) {
                n.store(t, Ordering::Release);
            }
        }
        self.live
            .freshness
            .last_checkpoint_ms
            .store(wall_ms(), Ordering::Release);
        self.stats.checkpoints += 1;
        self.stats.rows_emitted = emitted_rows;
        for (view, _, keys) in self.state_sizes() {
            metrics::gauge!("sluice_state_keys", "view" => view).set(keys as f64);
        }
        let took = t0.elapsed();
        self.stats.checkpoint_time += took;
        self.stats.checkpoint_max = self.stats.checkpoint_max.max(took);
        self.last_checkpoint = Instant::now();
        metrics::counter!("sluice_checkpoints_total").increment(1);
        metrics::histogram!("sluice_checkpoint_duration_seconds")
            .record(t0.elapsed().as_secs_f64());
        Ok(())
    }
}
