//! One feature view's state at run time: its aggregation (tiles, panes)
//! and the rows it emitted since the last checkpoint (for the lake, the
//! online store and the vector index). Rows reach it staged and on time:
//! the ingest stage (`crate::ingest`) ran the view's stages and the late
//! rule before.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, TimestampMillisecondArray};
use arrow::datatypes::SchemaRef;
use sluice_sql::{ViewKind, ViewPlan, WindowSpec};

use crate::aggregate::{AggKernel, Fired, WindowAgg};
use crate::error::{EngineError, Result};
use crate::exec::Rows;
use crate::keys::key_strings;
use crate::output::{
    OnlineRow, emitted_features, emitted_schema, features_json, key_and_feature_columns, vectors_of,
};
use crate::store::StateOp;
use crate::tiles::{TileAgg, TileMemory, is_tiled};

/// A feature view's state.
pub struct ViewOp {
    /// The plan it runs.
    pub plan: ViewPlan,
    /// The aggregate functions, shared by the window operator, the tiles and their readers.
    kernel: Option<Arc<AggKernel>>,
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

    /// The stateless half of the view (its stages and late rule), for the
    /// ingest stage, sharing this view's kernel.
    pub fn stage(&self) -> Result<crate::ingest::ViewStage> {
        crate::ingest::ViewStage::new(&self.plan, self.kernel.clone())
    }

    /// Folds staged, on-time rows (from the ingest stage) into the view's
    /// state, firing windows as their per-row watermark passes them.
    pub fn push(&mut self, rows: Rows) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
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
            return Ok(());
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
        Ok(())
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
