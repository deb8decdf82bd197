//! One feature view at run time: its stages, its aggregation, and the rows it
//! emitted since the last checkpoint (for the lake and the online store).

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, TimestampMillisecondArray};
use arrow::datatypes::SchemaRef;
use arrow::json::WriterBuilder;
use arrow::json::writer::LineDelimited;
use sluice_sql::{ViewKind, ViewPlan, WindowSpec};

use crate::aggregate::{AggKernel, Fired, StateOp, WindowAgg, emitted_schema, late_rows};
use crate::error::{EngineError, Result};
use crate::exec::{PhysStage, Rows, compile_stages, run_stages};
use crate::keys::key_strings;
use crate::tiles::{TileAgg, TileMemory, is_tiled};

/// An online-store write: the key and its encoded value.
pub type OnlineRow = (String, Vec<u8>);

/// Staged rows of a view, and the source-batch rows it could not compute.
#[derive(Debug)]
pub struct Staged {
    /// Rows that passed the view's filters, projected.
    pub rows: Rows,
    /// `(source-batch row, why)` for rows whose expressions failed.
    pub failed: Vec<(u32, String)>,
}

/// What [`ViewOp::process`] did not fold in.
#[derive(Debug, Default)]
pub struct Processed {
    /// Source-batch rows late for every window holding them.
    pub late: Vec<u32>,
    /// `(source-batch row, why)` for rows the view could not compute.
    pub failed: Vec<(u32, String)>,
}

/// A feature view's operator chain.
pub struct ViewOp {
    /// The plan it runs.
    pub plan: ViewPlan,
    stages: Vec<PhysStage>,
    /// The aggregate functions, shared by the window operator, the tiles and their readers.
    kernel: Option<Arc<AggKernel>>,
    /// Whether computing the kernel's keys and inputs can fail for a row, so
    /// [`ViewOp::stage`] checks them before rows reach any state.
    inputs_can_fail: bool,
    /// Closed-window rows (lake, Kafka, vector index) and lifetime values.
    agg: Option<WindowAgg>,
    /// The online state of a windowed view.
    tiles: Option<TileAgg>,
    /// Schema of emitted rows (`window_start`, `window_end`, keys, features).
    pub schema: SchemaRef,
    key_idx: Vec<usize>,
    feature_idx: Vec<usize>,
    /// Rows emitted since the last checkpoint, for the lake.
    pub pending_lake: Vec<RecordBatch>,
    /// Online writes since the last checkpoint, in order (later wins).
    pub pending_online: Vec<OnlineRow>,
    fired: Vec<Fired>,
    /// Column of the indexed vector in emitted rows, when the view has a
    /// vector index and the job keeps it (see [`ViewOp::keep_vector_updates`]).
    vector_col: Option<usize>,
    /// The index's filter columns: position in the output, value kind.
    filter_cols: Vec<(usize, sluice_sql::vector::FilterKind)>,
    /// Index changes since the last checkpoint, in order (later wins).
    pub pending_vectors: Vec<crate::vector::VectorUpdate>,
    /// Emit only windows with `window_start >= .0` and `window_end <= .1`
    /// (backfill `--from` / `--to`); `None`: everything.
    pub window_range: Option<(Option<i64>, Option<i64>)>,
    /// The view's `expect` rules, counted over emitted rows.
    pub expectations: crate::rules::ViewExpectations,
    /// Rows emitted since the operator started.
    pub emitted_rows: u64,
}

impl ViewOp {
    /// Compiles a view, with tiles when it is windowed and served online.
    pub fn new(plan: &ViewPlan) -> Result<Self> {
        Self::with_tiles(plan, Some(TileMemory::default()))
    }

    /// Compiles a view; `tiles: None` leaves out the online tiles (a backfill
    /// worker, which only emits closed-window rows).
    pub fn with_tiles(plan: &ViewPlan, tiles: Option<TileMemory>) -> Result<Self> {
        let stages = compile_stages(&plan.name, &plan.stages)?;
        let kernel = match &plan.kind {
            ViewKind::Aggregate(a) => Some(Arc::new(AggKernel::new(
                &plan.name,
                a,
                plan.event_time.as_deref(),
            )?)),
            ViewKind::PerEvent => None,
        };
        let tiled = is_tiled(plan);
        // The pane operator runs where closed-window rows are wanted, and for lifetime views.
        let panes = !tiled
            || plan.offline.is_some()
            || plan.kafka_topic.is_some()
            || plan.vector_index.is_some();
        let agg = match (&plan.kind, &kernel) {
            (ViewKind::Aggregate(a), Some(k)) if panes => {
                Some(WindowAgg::with_kernel(Arc::clone(k), a.window)?)
            }
            _ => None,
        };
        let tiles = match (&kernel, tiles) {
            (Some(k), Some(mem)) if tiled => Some(TileAgg::new(plan, Arc::clone(k), mem)?),
            _ => None,
        };
        let schema = emitted_schema(&plan.output_schema);
        let (key_idx, feature_idx) = key_and_feature_columns(plan);
        Ok(ViewOp {
            plan: plan.clone(),
            stages,
            inputs_can_fail: kernel.as_ref().is_some_and(|k| k.inputs_can_fail()),
            kernel,
            agg,
            tiles,
            schema,
            key_idx,
            feature_idx,
            pending_lake: Vec::new(),
            pending_online: Vec::new(),
            fired: Vec::new(),
            vector_col: None,
            filter_cols: Vec::new(),
            pending_vectors: Vec::new(),
            window_range: None,
            expectations: crate::rules::ViewExpectations::new(plan)?,
            emitted_rows: 0,
        })
    }

    /// Collects, with each online write, the change of the view's vector
    /// index (for the streaming job, which keeps the index).
    pub fn keep_vector_updates(&mut self) {
        self.vector_col = self
            .plan
            .vector_index
            .as_ref()
            .and_then(|vi| self.schema.index_of(&vi.column).ok());
        self.filter_cols = self
            .plan
            .vector_index
            .iter()
            .flat_map(|vi| &vi.filter_columns)
            .filter_map(|c| Some((self.schema.index_of(&c.name).ok()?, c.kind)))
            .collect();
    }

    /// The view's name.
    pub fn name(&self) -> &str {
        &self.plan.name
    }

    /// The aggregation, for aggregate views.
    pub fn agg(&self) -> Option<&WindowAgg> {
        self.agg.as_ref()
    }

    /// Mutable aggregation, for restore.
    pub fn agg_mut(&mut self) -> Option<&mut WindowAgg> {
        self.agg.as_mut()
    }

    /// The compiled aggregate functions, for aggregate views.
    pub fn kernel(&self) -> Option<&Arc<AggKernel>> {
        self.kernel.as_ref()
    }

    /// The online tiles, for windowed views served online.
    pub fn tiles(&self) -> Option<&TileAgg> {
        self.tiles.as_ref()
    }

    /// Mutable tiles (flush, restore).
    pub fn tiles_mut(&mut self) -> Option<&mut TileAgg> {
        self.tiles.as_mut()
    }

    /// Indices of staged rows that are late for this view (see [`late_rows`]).
    pub fn late_rows(&self, rows: &Rows) -> Vec<usize> {
        match self.plan.window() {
            Some(w) => late_rows(w, rows),
            None => Vec::new(),
        }
    }

    /// Runs source rows through the view. Returns the source-batch row indices
    /// of late events (not folded in) and of rows the view cannot compute.
    pub fn process(&mut self, rows: Rows) -> Result<Processed> {
        let Staged { rows, failed } = self.stage(rows)?;
        let late = self.process_staged(rows)?;
        Ok(Processed { late, failed })
    }

    /// Runs the view's stages (filters, projections) over source rows, and
    /// makes sure its keys and aggregate inputs can be computed for every
    /// staged row. When DataFusion cannot compute them for the batch (an
    /// integer division by zero, a cast out of range), the rows are tried one
    /// by one: those that fail alone leave this view (the caller
    /// dead-letters them), the others go on. An error that no single row
    /// causes is returned.
    pub fn stage(&self, rows: Rows) -> Result<Staged> {
        let err = match self.try_stage(rows.clone()) {
            Ok(staged) => {
                return Ok(Staged {
                    rows: staged,
                    failed: Vec::new(),
                });
            }
            Err(e) => e,
        };
        let mut keep = vec![true; rows.len()];
        let mut failed = Vec::new();
        for (i, k) in keep.iter_mut().enumerate() {
            if let Err(e) = self.try_stage(rows.slice(i, 1)) {
                *k = false;
                failed.push((rows.rowid.value(i), e.root_message()));
            }
        }
        if failed.is_empty() {
            return Err(err);
        }
        let staged = self.try_stage(rows.filter(&arrow::array::BooleanArray::from(keep))?)?;
        Ok(Staged {
            rows: staged,
            failed,
        })
    }

    fn try_stage(&self, rows: Rows) -> Result<Rows> {
        let staged = run_stages(&self.plan.name, &self.stages, rows)?;
        if let Some(k) = self.kernel.as_ref()
            && self.inputs_can_fail
            && !staged.is_empty()
        {
            k.key_columns(&staged.batch)?;
            k.inputs(&staged.batch)?;
        }
        Ok(staged)
    }

    /// Where each staged row goes when the view runs as `shards` key-disjoint
    /// copies: a hash of its key.
    pub fn shard_of(&self, rows: &Rows, shards: usize, out: &mut Vec<usize>) -> Result<()> {
        out.clear();
        let n = rows.len();
        if shards <= 1 {
            out.resize(n, 0);
            return Ok(());
        }
        let keys = match self.kernel.as_ref() {
            Some(k) => k.key_columns(&rows.batch)?,
            // Per-event views: the key columns of the projected rows.
            None => {
                self.plan
                    .keys
                    .iter()
                    .map(|k| {
                        rows.batch.column_by_name(k).cloned().ok_or_else(|| {
                            EngineError::Connector {
                                what: format!("view `{}`", self.plan.name),
                                message: format!("key column `{k}` is not in the view's output"),
                            }
                        })
                    })
                    .collect::<Result<Vec<_>>>()?
            }
        };
        let mut hashes = vec![0u64; n];
        let state = datafusion::common::hash_utils::RandomState::with_seed(17);
        datafusion::common::hash_utils::create_hashes(&keys, &state, &mut hashes)
            .map_err(|e| EngineError::df(&self.plan.name, e))?;
        out.extend(hashes.iter().map(|h| (h % shards as u64) as usize));
        Ok(())
    }

    /// Like [`ViewOp::process`] for rows that already went through [`ViewOp::stage`].
    pub fn process_staged(&mut self, rows: Rows) -> Result<Vec<u32>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        if self.kernel.is_none() {
            let ts = rows.ts.as_ref().map(|t| {
                Arc::new(TimestampMillisecondArray::from(t.values().to_vec()).with_timezone("UTC"))
                    as ArrayRef
            });
            let ts = ts.unwrap_or_else(|| {
                arrow::array::new_null_array(self.schema.field(0).data_type(), rows.len())
            });
            self.emit_rows(&rows.batch, Arc::clone(&ts), ts, None)?;
            return Ok(Vec::new());
        };
        let late = self.late_rows(&rows);
        let late_ids: Vec<u32> = late.iter().map(|i| rows.rowid.value(*i)).collect();
        let rows = if late.is_empty() {
            rows
        } else {
            let mut keep = vec![true; rows.len()];
            for i in &late {
                keep[*i] = false;
            }
            rows.filter(&arrow::array::BooleanArray::from(keep))?
        };
        if let Some(t) = self.tiles.as_mut() {
            t.push(rows.clone());
        }
        if let Some(agg) = self.agg.as_mut() {
            let mut fired = std::mem::take(&mut self.fired);
            let r = agg.process(&rows, &mut fired);
            self.emit_fired(&mut fired)?;
            self.fired = fired;
            r?;
        }
        Ok(late_ids)
    }

    /// Fires the windows the watermark `wm` closes.
    pub fn advance(&mut self, wm: i64) -> Result<()> {
        let Some(agg) = self.agg.as_mut() else {
            return Ok(());
        };
        let mut fired = std::mem::take(&mut self.fired);
        let r = agg.fire_until(wm, &mut fired);
        self.emit_fired(&mut fired)?;
        self.fired = fired;
        r
    }

    /// Before a checkpoint: lifetime views emit the keys that changed, as of `end`.
    pub fn before_checkpoint(&mut self, end: Option<i64>) -> Result<()> {
        let Some(agg) = self.agg.as_mut() else {
            return Ok(());
        };
        if let Some(f) = agg.changed_rows(end)? {
            let mut v = vec![f];
            self.emit_fired(&mut v)?;
        }
        Ok(())
    }

    /// State changes for the checkpoint.
    pub fn checkpoint(&mut self, ops: &mut Vec<StateOp>) -> Result<()> {
        match self.agg.as_mut() {
            Some(a) => a.checkpoint(ops),
            None => Ok(()),
        }
    }

    fn emit_fired(&mut self, fired: &mut Vec<Fired>) -> Result<()> {
        for f in fired.drain(..) {
            let n = f.batch.num_rows();
            let col = |v: Option<i64>| {
                Arc::new(TimestampMillisecondArray::from(vec![v; n]).with_timezone("UTC"))
                    as ArrayRef
            };
            let ends = match &f.row_ends {
                Some(e) => arrow::compute::cast(e, self.schema.field(1).data_type())
                    .map_err(|e| EngineError::arrow("window_end", e))?,
                None => col(f.end),
            };
            self.emit_rows(&f.batch, col(f.start), ends, f.valid_until)?;
        }
        Ok(())
    }

    fn emit_rows(
        &mut self,
        batch: &RecordBatch,
        start: ArrayRef,
        end: ArrayRef,
        valid_until: Option<i64>,
    ) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let mut cols = vec![start, end];
        cols.extend(batch.columns().iter().cloned());
        let mut out = RecordBatch::try_new(Arc::clone(&self.schema), cols)
            .map_err(|e| EngineError::arrow(format!("output of view `{}`", self.plan.name), e))?;
        if let Some((from, to)) = self.window_range {
            out = in_range(&out, from, to)?;
            if out.num_rows() == 0 {
                return Ok(());
            }
        }
        metrics::counter!("sluice_rows_emitted_total", "view" => self.plan.name.clone())
            .increment(out.num_rows() as u64);
        self.emitted_rows += out.num_rows() as u64;
        if !self.expectations.is_empty() {
            self.expectations.observe(&out)?;
        }
        // Tiled views are read from their tiles; their closed-window rows
        // go to the online store only to rebuild a vector index from.
        if self.plan.online && (!is_tiled(&self.plan) || self.plan.vector_index.is_some()) {
            let keys: Vec<ArrayRef> = self
                .key_idx
                .iter()
                .map(|i| Arc::clone(out.column(*i)))
                .collect();
            let keys = key_strings(&keys)?;
            let feats = features_json(&out, &self.feature_idx)?;
            let ends = out
                .column(1)
                .as_any()
                .downcast_ref::<TimestampMillisecondArray>();
            let starts = out
                .column(0)
                .as_any()
                .downcast_ref::<TimestampMillisecondArray>();
            let ms = |a: Option<&TimestampMillisecondArray>, i: usize| match a {
                Some(a) if a.is_valid(i) => a.value(i).to_string(),
                _ => "null".to_string(),
            };
            let vu = valid_until
                .map(|v| v.to_string())
                .unwrap_or_else(|| "null".into());
            if let Some(c) = self.vector_col {
                let vu = valid_until;
                let vectors = vectors_of(out.column(c))?;
                let mut attrs = crate::vector::attrs_of(&out, &self.filter_cols)?.into_iter();
                for (k, v) in keys.iter().zip(vectors) {
                    self.pending_vectors.push(crate::vector::VectorUpdate {
                        key: k.clone(),
                        vector: v,
                        valid_until: vu,
                        attrs: attrs.next().unwrap_or_default(),
                    });
                }
            }
            for (i, (k, f)) in keys.into_iter().zip(feats).enumerate() {
                let v = format!(
                    "{{\"window_start\":{},\"window_end\":{},\"valid_until\":{vu},\"features\":{}}}",
                    ms(starts, i),
                    ms(ends, i),
                    String::from_utf8_lossy(&f)
                );
                self.pending_online.push((k, v.into_bytes()));
            }
        }
        if self.plan.offline.is_some() || self.plan.kafka_topic.is_some() {
            self.pending_lake.push(out);
        }
        Ok(())
    }

    /// The JSON features a key reads as when its window is empty.
    pub fn empty_features(&self) -> Result<Option<serde_json::Value>> {
        let Some(kernel) = self.kernel.as_ref() else {
            return Ok(None);
        };
        let Some(b) = kernel.empty_row()? else {
            return Ok(None);
        };
        emitted_features(&self.schema, &self.feature_idx, &b)
    }

    /// What a reader of the online store needs to know about the view.
    pub fn meta(&self) -> Result<crate::online::ViewMeta> {
        let vp = &self.plan;
        Ok(crate::online::ViewMeta {
            name: vp.name.clone(),
            source: vp.source.clone(),
            keys: vp.keys.clone(),
            slide_ms: vp.window().and_then(|w| w.slide_ms()),
            empty_features: self.empty_features()?,
            query: vp.query.clone(),
            window: vp
                .window()
                .map(|w| w.to_string())
                .unwrap_or_else(|| "PER EVENT".into()),
        })
    }

    /// The window, for aggregate views.
    pub fn window(&self) -> Option<WindowSpec> {
        self.plan.window()
    }
}

/// The emitted rows whose window starts at or after `from` and ends at or
/// before `to` (rows without a window start, e.g. lifetime rows, are
/// judged by their window end).
fn in_range(out: &RecordBatch, from: Option<i64>, to: Option<i64>) -> Result<RecordBatch> {
    let ts = |i: usize| {
        out.column(i)
            .as_any()
            .downcast_ref::<TimestampMillisecondArray>()
            .cloned()
    };
    let (Some(starts), Some(ends)) = (ts(0), ts(1)) else {
        return Ok(out.clone());
    };
    let keep: arrow::array::BooleanArray = (0..out.num_rows())
        .map(|i| {
            let s = if starts.is_valid(i) {
                Some(starts.value(i))
            } else if ends.is_valid(i) {
                Some(ends.value(i))
            } else {
                None
            };
            let e = ends.is_valid(i).then(|| ends.value(i));
            let ok = from.is_none_or(|f| s.is_none_or(|s| s >= f))
                && to.is_none_or(|t| e.is_none_or(|e| e <= t));
            Some(ok)
        })
        .collect();
    arrow::compute::filter_record_batch(out, &keep)
        .map_err(|e| EngineError::arrow("window range", e))
}

/// The features of the first row of `batch` (a view's keys and features),
/// as JSON, with `schema` the view's emitted schema.
pub fn emitted_features(
    schema: &SchemaRef,
    feature_idx: &[usize],
    batch: &RecordBatch,
) -> Result<Option<serde_json::Value>> {
    let n = batch.num_rows();
    let mut cols: Vec<ArrayRef> =
        vec![arrow::array::new_null_array(schema.field(0).data_type(), n); 2];
    cols.extend(batch.columns().iter().cloned());
    let out = RecordBatch::try_new(Arc::clone(schema), cols)
        .map_err(|e| EngineError::arrow("feature row", e))?;
    let f = features_json(&out, feature_idx)?;
    f.first()
        .map(|j| {
            serde_json::from_slice(j)
                .map_err(|e| EngineError::Internal(format!("feature JSON: {e}")))
        })
        .transpose()
}

/// Indexes, in a view's emitted rows (`window_start`, `window_end`, then
/// its output columns), of the key columns and of the feature columns.
pub fn key_and_feature_columns(plan: &ViewPlan) -> (Vec<usize>, Vec<usize>) {
    let schema = emitted_schema(&plan.output_schema);
    let keys: Vec<usize> = plan
        .keys
        .iter()
        .filter_map(|k| schema.index_of(k).ok())
        .collect();
    let features = (2..schema.fields().len())
        .filter(|i| !keys.contains(i))
        .collect();
    (keys, features)
}

/// The rows of a vector column (`FLOAT[n]`) as vectors, NULL as `None`.
pub fn vectors_of(col: &ArrayRef) -> Result<Vec<Option<Vec<f32>>>> {
    let not_vector = || EngineError::Connector {
        what: "vector index".into(),
        message: format!("the indexed column is {}, not FLOAT[n]", col.data_type()),
    };
    let l = col
        .as_any()
        .downcast_ref::<arrow::array::FixedSizeListArray>()
        .ok_or_else(not_vector)?;
    let vals = l
        .values()
        .as_any()
        .downcast_ref::<arrow::array::Float32Array>()
        .ok_or_else(not_vector)?;
    let n = l.value_length() as usize;
    Ok((0..l.len())
        .map(|i| {
            l.is_valid(i).then(|| {
                let start = l.value_offset(i) as usize;
                vals.values()[start..start + n].to_vec()
            })
        })
        .collect())
}

/// One JSON object per row with the given columns (NULLs explicit).
pub fn features_json(batch: &RecordBatch, cols: &[usize]) -> Result<Vec<Vec<u8>>> {
    let proj = batch
        .project(cols)
        .map_err(|e| EngineError::arrow("feature columns", e))?;
    let mut w = WriterBuilder::new()
        .with_explicit_nulls(true)
        .build::<_, LineDelimited>(Vec::new());
    w.write(&proj)
        .map_err(|e| EngineError::arrow("encoding features as JSON", e))?;
    w.finish()
        .map_err(|e| EngineError::arrow("encoding features as JSON", e))?;
    let buf = w.into_inner();
    let mut out: Vec<Vec<u8>> = buf
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| l.to_vec())
        .collect();
    if proj.num_columns() == 0 {
        out = vec![b"{}".to_vec(); batch.num_rows()];
    }
    Ok(out)
}
