//! Windowed aggregation on DataFusion `GroupsAccumulator`s.
//!
//! Time is cut into panes of one slide (`TUMBLE`: the window; `HOP`: the
//! slide; lifetime: one pane). Each pane holds live accumulators (one group
//! per key that had events since the pane was last sealed) and sealed chunks
//! (the accumulators' `state()` arrays with the key of each row). A window
//! is the union of its panes: on close, their chunks are merged with
//! `merge_batch` into fresh accumulators and evaluated, so an event is
//! aggregated once however many windows it belongs to. The same state arrays
//! are what a checkpoint writes to RocksDB and what a restart merges back,
//! so every DataFusion aggregate function works without engine code.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, UInt32Array, new_null_array};
use arrow::compute::take;
use arrow::datatypes::{DataType, Schema, SchemaRef};
use arrow::row::{RowConverter, SortField};
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::{EmitTo, GroupsAccumulator};
use datafusion::physical_expr::aggregate::{AggregateFunctionExpr, LoweredAggregateBuilder};
use datafusion::physical_expr::execution_props::ExecutionProps;
use datafusion::physical_expr::{GroupsAccumulatorAdapter, PhysicalExpr};
use sluice_sql::{AggregatePlan, WindowSpec};

use crate::error::{EngineError, Result};
use crate::exec::{PhysStage, Rows, compile_stages, eval, physical, run_stages};
use crate::keys::KeyDict;
use crate::store::{StateEntry, StateOp};
use crate::time::{add, sub};

/// One accumulator per aggregate function.
type Accs = Vec<Box<dyn GroupsAccumulator>>;

/// The compiled aggregate functions of a view and how to evaluate them.
pub struct AggKernel {
    view: String,
    aggs: Vec<Arc<AggregateFunctionExpr>>,
    args: Vec<Vec<Arc<dyn PhysicalExpr>>>,
    filters: Vec<Option<Arc<dyn PhysicalExpr>>>,
    pub(crate) state_widths: Vec<usize>,
    pub(crate) state_conv: RowConverter,
    group_exprs: Vec<Arc<dyn PhysicalExpr>>,
    group_types: Vec<DataType>,
    agg_schema: SchemaRef,
    post: Vec<PhysStage>,
    /// The last aggregate is a hidden `max(event time)`: a lifetime row's time.
    hidden_ts: bool,
}

impl std::fmt::Debug for AggKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "AggKernel({}, {} aggregates)",
            self.view,
            self.aggs.len()
        )
    }
}

impl AggKernel {
    /// Compiles the aggregate plan of `view`.
    pub fn new(view: &str, plan: &AggregatePlan, event_time: Option<&str>) -> Result<Self> {
        let df = |e| EngineError::df(view, e);
        let input = plan.input_schema.as_arrow().clone();
        let props = ExecutionProps::new();
        let ctx = PhysicalPlanningContext::default();
        let mut aggs = Vec::new();
        let mut args = Vec::new();
        let mut filters = Vec::new();
        let mut state_widths = Vec::new();
        let mut state_fields = Vec::new();
        let mut exprs = plan.aggr_exprs.clone();
        let hidden_ts = match event_time {
            Some(ts) if plan.window == WindowSpec::Lifetime => match plan
                .input_schema
                .columns()
                .into_iter()
                .find(|c| c.name == ts)
            {
                Some(c) => {
                    exprs.push(
                        datafusion::functions_aggregate::expr_fn::max(
                            datafusion::logical_expr::Expr::Column(c),
                        )
                        .alias("__sluice_event_time"),
                    );
                    true
                }
                None => false,
            },
            _ => false,
        };
        for e in &exprs {
            let lowered = LoweredAggregateBuilder::new(e, &plan.input_schema, &input, &props, &ctx)
                .build()
                .map_err(df)?;
            let agg = lowered.aggregate;
            let mut a = agg.expressions();
            a.extend(agg.order_bys().iter().map(|s| Arc::clone(&s.expr)));
            let sf = agg.state_fields().map_err(df)?;
            state_widths.push(sf.len());
            state_fields.extend(sf.iter().map(|f| SortField::new(f.data_type().clone())));
            args.push(a);
            filters.push(lowered.filter);
            aggs.push(agg);
        }
        let state_conv = RowConverter::new(state_fields)
            .map_err(|e| EngineError::arrow(format!("state of view `{view}`"), e))?;
        let group_exprs = plan
            .group_exprs
            .iter()
            .map(|g| physical(view, g, &plan.input_schema))
            .collect::<Result<Vec<_>>>()?;
        let group_types = group_exprs
            .iter()
            .map(|g| g.data_type(&input))
            .collect::<datafusion::common::Result<Vec<_>>>()
            .map_err(df)?;
        Ok(AggKernel {
            view: view.to_string(),
            aggs,
            args,
            filters,
            state_widths,
            state_conv,
            group_exprs,
            group_types,
            agg_schema: Arc::new(plan.output_schema.as_arrow().clone()),
            post: compile_stages(view, &plan.post)?,
            hidden_ts,
        })
    }

    /// Types of the key columns.
    pub fn key_types(&self) -> &[DataType] {
        &self.group_types
    }

    pub(crate) fn new_accs(&self) -> Result<Vec<Box<dyn GroupsAccumulator>>> {
        self.aggs
            .iter()
            .map(|a| {
                if a.groups_accumulator_supported() {
                    a.create_groups_accumulator()
                        .map_err(|e| EngineError::df(&self.view, e))
                } else {
                    let a = Arc::clone(a);
                    Ok(Box::new(GroupsAccumulatorAdapter::new(move || {
                        a.create_accumulator()
                    })) as Box<dyn GroupsAccumulator>)
                }
            })
            .collect()
    }

    /// Whether computing keys or aggregate inputs can fail for some row (an
    /// expression other than a column or a literal: a cast, a division).
    pub fn inputs_can_fail(&self) -> bool {
        let plain = |e: &Arc<dyn PhysicalExpr>| {
            e.is::<datafusion::physical_expr::expressions::Column>()
                || e.is::<datafusion::physical_expr::expressions::Literal>()
        };
        !(self.group_exprs.iter().all(plain)
            && self.args.iter().flatten().all(plain)
            && self.filters.iter().flatten().all(plain))
    }

    /// Evaluates the key (GROUP BY) expressions over staged rows.
    pub fn key_columns(&self, batch: &RecordBatch) -> Result<Vec<ArrayRef>> {
        self.group_exprs
            .iter()
            .map(|g| eval(&self.view, g, batch))
            .collect()
    }

    pub(crate) fn inputs(&self, batch: &RecordBatch) -> Result<Inputs> {
        let mut values = Vec::with_capacity(self.args.len());
        for a in &self.args {
            values.push(
                a.iter()
                    .map(|e| eval(&self.view, e, batch))
                    .collect::<Result<Vec<_>>>()?,
            );
        }
        let mut filters = Vec::with_capacity(self.filters.len());
        for f in &self.filters {
            filters.push(match f {
                None => None,
                Some(f) => Some(BooleanArray::from(eval(&self.view, f, batch)?.to_data())),
            });
        }
        Ok(Inputs { values, filters })
    }

    /// Evaluates accumulators into the view's output rows (keys + features).
    pub(crate) fn finish(
        &self,
        key_cols: Vec<ArrayRef>,
        accs: &mut [Box<dyn GroupsAccumulator>],
    ) -> Result<RecordBatch> {
        Ok(self.finish_with_time(key_cols, accs)?.0)
    }

    /// Like `finish`, keeping which group each surviving row is (`HAVING`
    /// may drop groups): `rowid` is the group index.
    pub(crate) fn finish_rows(
        &self,
        key_cols: Vec<ArrayRef>,
        accs: &mut [Box<dyn GroupsAccumulator>],
    ) -> Result<Rows> {
        Ok(self.finish_all(key_cols, accs)?.0)
    }

    /// Like `finish`, also returning the hidden last-event-time column of lifetime views.
    fn finish_with_time(
        &self,
        key_cols: Vec<ArrayRef>,
        accs: &mut [Box<dyn GroupsAccumulator>],
    ) -> Result<(RecordBatch, Option<ArrayRef>)> {
        let (out, times) = self.finish_all(key_cols, accs)?;
        Ok((out.batch, times))
    }

    /// The output rows (with their group as `rowid`) and, for lifetime
    /// views, the hidden last-event-time column of the surviving rows.
    fn finish_all(
        &self,
        key_cols: Vec<ArrayRef>,
        accs: &mut [Box<dyn GroupsAccumulator>],
    ) -> Result<(Rows, Option<ArrayRef>)> {
        let mut cols = key_cols;
        for acc in accs.iter_mut() {
            cols.push(
                acc.evaluate(EmitTo::All)
                    .map_err(|e| EngineError::df(&self.view, e))?,
            );
        }
        let times = if self.hidden_ts { cols.pop() } else { None };
        let batch = RecordBatch::try_new(Arc::clone(&self.agg_schema), cols)
            .map_err(|e| EngineError::arrow(format!("aggregate output of `{}`", self.view), e))?;
        let n = batch.num_rows();
        let rows = Rows {
            batch,
            ts: None,
            wm: None,
            rowid: UInt32Array::from_iter_values(0..n as u32),
        };
        let out = run_stages(&self.view, &self.post, rows)?;
        // HAVING may have dropped rows: keep the times of the survivors.
        let times = match times {
            Some(t) if out.len() != n => Some(
                take(t.as_ref(), &out.rowid, None)
                    .map_err(|e| EngineError::arrow("event times", e))?,
            ),
            t => t,
        };
        Ok((out, times))
    }

    /// The row a key reads as when its window holds no events: the aggregate
    /// over the empty set (`COUNT` 0, `SUM` NULL …). `None` when `HAVING` drops it.
    pub fn empty_row(&self) -> Result<Option<RecordBatch>> {
        // A fresh (non-grouped) accumulator evaluates to the empty-set value.
        let mut cols: Vec<ArrayRef> = self
            .group_types
            .iter()
            .map(|t| {
                match datafusion::common::ScalarValue::new_default(t)
                    .and_then(|v| v.to_array_of_size(1))
                {
                    Ok(a) => a,
                    Err(_) => new_null_array(t, 1),
                }
            })
            .collect();
        for (a, f) in self
            .aggs
            .iter()
            .zip(self.agg_schema.fields().iter().skip(self.group_types.len()))
        {
            let v = a
                .create_accumulator()
                .and_then(|mut acc| acc.evaluate())
                .map_err(|e| EngineError::df(&self.view, e))?;
            let arr = v
                .to_array_of_size(1)
                .map_err(|e| EngineError::df(&self.view, e))?;
            let arr = if arr.data_type() == f.data_type() {
                arr
            } else {
                arrow::compute::cast(&arr, f.data_type())
                    .map_err(|e| EngineError::arrow("empty-set value", e))?
            };
            cols.push(arr);
        }
        let schema = Arc::new(Schema::new(
            self.agg_schema
                .fields()
                .iter()
                .map(|f| f.as_ref().clone().with_nullable(true))
                .collect::<Vec<_>>(),
        ));
        let batch = RecordBatch::try_new(schema, cols)
            .map_err(|e| EngineError::arrow("empty-set row", e))?;
        let rows = Rows {
            batch,
            ts: None,
            wm: None,
            rowid: UInt32Array::from(vec![0u32]),
        };
        let b = run_stages(&self.view, &self.post, rows)?.batch;
        Ok((b.num_rows() == 1).then_some(b))
    }

    fn merge(&self, chunks: &[&Chunk], scratch: &mut GroupMap) -> Result<(Accs, Vec<u32>)> {
        let mut accs = self.new_accs()?;
        scratch.reset();
        let mut keys = Vec::new();
        let idx: Vec<Vec<usize>> = chunks
            .iter()
            .map(|c| {
                c.keys
                    .iter()
                    .map(|k| scratch.group(*k, &mut keys))
                    .collect()
            })
            .collect();
        for (c, gi) in chunks.iter().zip(&idx) {
            let mut off = 0;
            for (acc, w) in accs.iter_mut().zip(&self.state_widths) {
                acc.merge_batch(&c.states[off..off + w], gi, keys.len())
                    .map_err(|e| EngineError::df(&self.view, e))?;
                off += w;
            }
        }
        Ok((accs, keys))
    }

    pub(crate) fn state_of(
        &self,
        accs: &mut [Box<dyn GroupsAccumulator>],
    ) -> Result<Vec<ArrayRef>> {
        let mut out = Vec::new();
        for acc in accs.iter_mut() {
            out.extend(
                acc.state(EmitTo::All)
                    .map_err(|e| EngineError::df(&self.view, e))?,
            );
        }
        Ok(out)
    }
}

pub(crate) struct Inputs {
    pub(crate) values: Vec<Vec<ArrayRef>>,
    pub(crate) filters: Vec<Option<BooleanArray>>,
}

impl Inputs {
    fn take(&self, idx: &UInt32Array) -> Result<Inputs> {
        let t = |a: &dyn Array| {
            take(a, idx, None).map_err(|e| EngineError::arrow("selecting pane rows", e))
        };
        Ok(Inputs {
            values: self
                .values
                .iter()
                .map(|v| v.iter().map(|a| t(a.as_ref())).collect::<Result<Vec<_>>>())
                .collect::<Result<Vec<_>>>()?,
            filters: self
                .filters
                .iter()
                .map(|f| {
                    f.as_ref()
                        .map(|f| t(f).map(|a| BooleanArray::from(a.to_data())))
                        .transpose()
                })
                .collect::<Result<Vec<_>>>()?,
        })
    }

    pub(crate) fn slice(&self, off: usize, len: usize) -> Inputs {
        Inputs {
            values: self
                .values
                .iter()
                .map(|v| v.iter().map(|a| a.slice(off, len)).collect())
                .collect(),
            filters: self
                .filters
                .iter()
                .map(|f| f.as_ref().map(|f| f.slice(off, len)))
                .collect(),
        }
    }
}

/// Key id → group index for one merge, reset in O(1) with a generation stamp.
#[derive(Default)]
struct GroupMap {
    slot: Vec<(u32, u32)>,
    generation: u32,
}

impl GroupMap {
    fn reset(&mut self) {
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            self.slot.iter_mut().for_each(|s| *s = (0, 0));
            self.generation = 1;
        }
    }

    fn group(&mut self, key: u32, keys: &mut Vec<u32>) -> usize {
        let k = key as usize;
        if self.slot.len() <= k {
            self.slot.resize(k + 1, (0, 0));
        }
        let (g, idx) = self.slot[k];
        if g == self.generation {
            return idx as usize;
        }
        let idx = keys.len();
        keys.push(key);
        self.slot[k] = (self.generation, idx as u32);
        idx
    }
}

/// Accumulator states of some keys, as `state()` returned them.
struct Chunk {
    keys: Vec<u32>,
    states: Vec<ArrayRef>,
}

/// The partial aggregates of one slide of time.
#[derive(Default)]
struct Pane {
    accs: Option<Vec<Box<dyn GroupsAccumulator>>>,
    group_of: Vec<u32>,
    group_keys: Vec<u32>,
    chunks: Vec<Chunk>,
    dirty: HashSet<u32, ahash::RandomState>,
}

const NO_GROUP: u32 = u32::MAX;

impl Pane {
    fn update(
        &mut self,
        k: &AggKernel,
        keys: &[u32],
        inputs: &Inputs,
        groups: &mut Vec<usize>,
    ) -> Result<()> {
        if self.accs.is_none() {
            self.accs = Some(k.new_accs()?);
        }
        groups.clear();
        for &key in keys {
            let ki = key as usize;
            if self.group_of.len() <= ki {
                self.group_of.resize(ki + 1, NO_GROUP);
            }
            let mut g = self.group_of[ki];
            if g == NO_GROUP {
                g = self.group_keys.len() as u32;
                self.group_of[ki] = g;
                self.group_keys.push(key);
                self.dirty.insert(key);
            }
            groups.push(g as usize);
        }
        let n = self.group_keys.len();
        if let Some(accs) = self.accs.as_mut() {
            for ((acc, vals), f) in accs.iter_mut().zip(&inputs.values).zip(&inputs.filters) {
                acc.update_batch(vals, groups, f.as_ref(), n)
                    .map_err(|e| EngineError::df(&k.view, e))?;
            }
        }
        Ok(())
    }

    /// Moves live accumulators into a chunk.
    fn seal(&mut self, k: &AggKernel) -> Result<()> {
        if self.group_keys.is_empty() {
            return Ok(());
        }
        if let Some(mut accs) = self.accs.take() {
            let states = k.state_of(&mut accs)?;
            let keys = std::mem::take(&mut self.group_keys);
            for key in &keys {
                self.group_of[*key as usize] = NO_GROUP;
            }
            self.chunks.push(Chunk { keys, states });
        }
        Ok(())
    }

    /// The merged state of the keys changed since the last checkpoint.
    fn dirty_state(&mut self, k: &AggKernel, scratch: &mut GroupMap) -> Result<Option<Chunk>> {
        self.compact(k, scratch)?;
        let Some(chunk) = self.chunks.first() else {
            return Ok(None);
        };
        let idx: Vec<u32> = chunk
            .keys
            .iter()
            .enumerate()
            .filter(|(_, key)| self.dirty.contains(key))
            .map(|(i, _)| i as u32)
            .collect();
        take_chunk(chunk, &idx).map(Some)
    }

    /// Seals and merges all chunks into one (one row per key).
    fn compact(&mut self, k: &AggKernel, scratch: &mut GroupMap) -> Result<()> {
        self.seal(k)?;
        if self.chunks.len() > 1 {
            let refs: Vec<&Chunk> = self.chunks.iter().collect();
            let (mut accs, keys) = k.merge(&refs, scratch)?;
            let states = k.state_of(&mut accs)?;
            self.chunks = vec![Chunk { keys, states }];
        }
        Ok(())
    }
}

/// The windowed (or lifetime) aggregation of one view.
pub struct WindowAgg {
    kernel: Arc<AggKernel>,
    window: WindowSpec,
    keys: KeyDict,
    panes: BTreeMap<i64, Pane>,
    dropped: Vec<i64>,
    /// Largest window end already fired (windows ending at or before it never fire again).
    emitted_through: Option<i64>,
    scratch: GroupMap,
    ids: Vec<u32>,
    groups: Vec<usize>,
}

/// A window's output rows, before the window columns are added.
pub struct Fired {
    /// `window_start` (ms); `None` for lifetime aggregates.
    pub start: Option<i64>,
    /// `window_end` (ms).
    pub end: Option<i64>,
    /// When the value expires: the next window end (ms); `None` never.
    pub valid_until: Option<i64>,
    /// Per-row `window_end` (lifetime rows: each key's latest event time), overriding `end`.
    pub row_ends: Option<ArrayRef>,
    /// Keys and features.
    pub batch: RecordBatch,
}

impl WindowAgg {
    /// Aggregation for `view`.
    pub fn new(view: &str, plan: &AggregatePlan, event_time: Option<&str>) -> Result<Self> {
        Self::with_kernel(
            Arc::new(AggKernel::new(view, plan, event_time)?),
            plan.window,
        )
    }

    /// Aggregation over `window` with compiled aggregate functions.
    pub fn with_kernel(kernel: Arc<AggKernel>, window: WindowSpec) -> Result<Self> {
        let keys = KeyDict::new(kernel.key_types())?;
        Ok(WindowAgg {
            kernel,
            window,
            keys,
            panes: BTreeMap::new(),
            dropped: Vec::new(),
            emitted_through: None,
            scratch: GroupMap::default(),
            ids: Vec::new(),
            groups: Vec::new(),
        })
    }

    /// The compiled kernel.
    pub fn kernel(&self) -> &AggKernel {
        &self.kernel
    }

    /// Largest window end fired so far.
    pub fn emitted_through(&self) -> Option<i64> {
        self.emitted_through
    }

    /// Number of open panes and distinct keys (for metrics and tests).
    pub fn sizes(&self) -> (usize, usize) {
        (self.panes.len(), self.keys.len())
    }

    fn pane_of(&self, ts: i64) -> i64 {
        match self.window.slide_ms() {
            Some(s) => ts.div_euclid(s) * s,
            None => 0,
        }
    }

    /// Indices of rows that are late: all their windows already closed when they arrived.
    pub fn late_rows(&self, rows: &Rows) -> Vec<usize> {
        late_rows(self.window, rows)
    }

    /// Folds rows (none late) in, firing windows as the per-row watermark passes their ends.
    pub fn process(&mut self, rows: &Rows, out: &mut Vec<Fired>) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let key_cols = self.kernel.key_columns(&rows.batch)?;
        let mut ids = std::mem::take(&mut self.ids);
        self.keys.intern(&key_cols, &mut ids)?;
        let inputs = self.kernel.inputs(&rows.batch)?;
        let result = self.process_segments(rows, &ids, &inputs, out);
        self.ids = ids;
        result
    }

    fn process_segments(
        &mut self,
        rows: &Rows,
        ids: &[u32],
        inputs: &Inputs,
        out: &mut Vec<Fired>,
    ) -> Result<()> {
        let n = rows.len();
        let (Some(slide), Some(ts), Some(wm)) =
            (self.window.slide_ms(), rows.ts.as_ref(), rows.wm.as_ref())
        else {
            // Lifetime: one pane, nothing fires.
            return self.apply(0, n, ids, inputs, None);
        };
        // Segments of rows that see the same set of closed windows.
        let seg_of = |w: i64| w.div_euclid(slide);
        let mut start = 0;
        while start < n {
            let s = seg_of(wm.value(start));
            let mut end = start + 1;
            while end < n && seg_of(wm.value(end)) == s {
                end += 1;
            }
            self.fire_until(wm.value(start), out)?;
            self.apply(
                start,
                end - start,
                ids,
                inputs,
                Some(&ts.slice(start, end - start)),
            )?;
            start = end;
        }
        Ok(())
    }

    fn apply(
        &mut self,
        off: usize,
        len: usize,
        ids: &[u32],
        inputs: &Inputs,
        ts: Option<&arrow::array::Int64Array>,
    ) -> Result<()> {
        let ids = &ids[off..off + len];
        let inputs = inputs.slice(off, len);
        let Some(ts) = ts else {
            let pane = self.panes.entry(0).or_default();
            return pane.update(&self.kernel, ids, &inputs, &mut self.groups);
        };
        let first = self.pane_of(ts.value(0));
        if (0..len).all(|i| self.pane_of(ts.value(i)) == first) {
            let pane = self.panes.entry(first).or_default();
            return pane.update(&self.kernel, ids, &inputs, &mut self.groups);
        }
        let mut by_pane: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
        for i in 0..len {
            by_pane
                .entry(self.pane_of(ts.value(i)))
                .or_default()
                .push(i as u32);
        }
        for (p, idx) in by_pane {
            let sel_ids: Vec<u32> = idx.iter().map(|i| ids[*i as usize]).collect();
            let sel = inputs.take(&UInt32Array::from(idx))?;
            let pane = self.panes.entry(p).or_default();
            pane.update(&self.kernel, &sel_ids, &sel, &mut self.groups)?;
        }
        Ok(())
    }

    /// Fires every window whose end is at or before `wm`, then drops panes no open window needs.
    pub fn fire_until(&mut self, wm: i64, out: &mut Vec<Fired>) -> Result<()> {
        let (Some(slide), Some(size)) = (self.window.slide_ms(), self.window.size_ms()) else {
            return Ok(());
        };
        let last = wm.div_euclid(slide).saturating_mul(slide);
        if self.emitted_through.is_some_and(|e| e >= last) {
            return Ok(());
        }
        if let Some((&first, _)) = self.panes.iter().next() {
            let mut e = add(first, slide)?;
            if let Some(done) = self.emitted_through {
                e = e.max(add(done, slide)?);
            }
            while e <= last {
                let lo = sub(e, size)?;
                if self.panes.range(lo..e).next().is_none() {
                    // No pane in this window: jump to the first window holding the next pane.
                    match self.panes.range(e..).next() {
                        Some((&p, _)) => {
                            e = add(p, slide)?;
                            continue;
                        }
                        None => break,
                    }
                }
                self.fire(lo, e, slide, out)?;
                e = add(e, slide)?;
            }
        }
        self.emitted_through = Some(last);
        let keep_from = wm.saturating_sub(size);
        // A pane starting at p is needed until the window [p, p + size) closes.
        let old: Vec<i64> = self
            .panes
            .range(..=keep_from)
            .map(|(p, _)| *p)
            .filter(|p| p.saturating_add(size) <= wm)
            .collect();
        for p in old {
            self.panes.remove(&p);
            self.dropped.push(p);
        }
        Ok(())
    }

    fn fire(&mut self, lo: i64, end: i64, slide: i64, out: &mut Vec<Fired>) -> Result<()> {
        for (_, pane) in self.panes.range_mut(lo..end) {
            pane.seal(&self.kernel)?;
        }
        let chunks: Vec<&Chunk> = self
            .panes
            .range(lo..end)
            .flat_map(|(_, p)| p.chunks.iter())
            .collect();
        if chunks.is_empty() {
            return Ok(());
        }
        let (mut accs, keys) = self.kernel.merge(&chunks, &mut self.scratch)?;
        let batch = self.kernel.finish(self.keys.arrays(&keys)?, &mut accs)?;
        for (_, pane) in self.panes.range_mut(lo..end) {
            if pane.chunks.len() > 3 {
                pane.compact(&self.kernel, &mut self.scratch)?;
            }
        }
        if batch.num_rows() > 0 {
            out.push(Fired {
                start: Some(lo),
                end: Some(end),
                valid_until: Some(add(end, slide)?),
                row_ends: None,
                batch,
            });
        }
        Ok(())
    }

    /// Lifetime aggregates: the current value of every key changed since the last checkpoint.
    pub fn changed_rows(&mut self, end: Option<i64>) -> Result<Option<Fired>> {
        if self.window != WindowSpec::Lifetime {
            return Ok(None);
        }
        let Some(pane) = self.panes.get_mut(&0) else {
            return Ok(None);
        };
        if pane.dirty.is_empty() {
            return Ok(None);
        }
        let Some(sel) = pane.dirty_state(&self.kernel, &mut self.scratch)? else {
            return Ok(None);
        };
        let (mut accs, keys) = self.kernel.merge(&[&sel], &mut self.scratch)?;
        let (batch, row_ends) = self
            .kernel
            .finish_with_time(self.keys.arrays(&keys)?, &mut accs)?;
        Ok(Some(Fired {
            start: None,
            end: if row_ends.is_some() { None } else { end },
            valid_until: None,
            row_ends,
            batch,
        }))
    }

    /// The state changes since the last checkpoint; clears the dirty sets.
    pub fn checkpoint(&mut self, ops: &mut Vec<StateOp>) -> Result<()> {
        for p in self.dropped.drain(..) {
            ops.push(StateOp::DropPane(p));
        }
        for (&start, pane) in self.panes.iter_mut() {
            if pane.dirty.is_empty() {
                continue;
            }
            if let Some(sel) = pane.dirty_state(&self.kernel, &mut self.scratch)? {
                let rows = self
                    .kernel
                    .state_conv
                    .convert_columns(&sel.states)
                    .map_err(|e| EngineError::arrow("encoding state", e))?;
                for (i, key) in sel.keys.iter().enumerate() {
                    ops.push(StateOp::Put {
                        pane: start,
                        key: self.keys.bytes(*key).to_vec(),
                        value: rows.row(i).as_ref().to_vec(),
                    });
                }
            }
            pane.dirty.clear();
        }
        Ok(())
    }

    /// Restores one pane's state rows (from a checkpoint).
    pub fn restore_pane(&mut self, pane: i64, entries: &[StateEntry]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let what = format!(
            "pane state of view `{}` (column family `state`)",
            self.kernel.view
        );
        let states = decode_rows(
            &self.kernel.state_conv,
            &what,
            entries.iter().map(|(_, v)| v.as_slice()),
        )?;
        // The keys are checked now, not when the pane fires.
        decode_rows(
            self.keys.converter(),
            &what,
            entries.iter().map(|(k, _)| k.as_slice()),
        )?;
        let keys = entries
            .iter()
            .map(|(k, _)| self.keys.intern_bytes(k))
            .collect();
        self.panes
            .entry(pane)
            .or_default()
            .chunks
            .push(Chunk { keys, states });
        Ok(())
    }

    /// The entries of a pane whose keys are in the key groups `owns` keeps
    /// (a worker's share, restored when the job starts).
    pub fn owned_entries(
        &self,
        entries: Vec<StateEntry>,
        owns: impl Fn(u16) -> bool,
    ) -> Result<Vec<StateEntry>> {
        if entries.is_empty() {
            return Ok(entries);
        }
        let what = format!(
            "pane state of view `{}` (column family `state`)",
            self.kernel.view
        );
        let cols = decode_rows(
            self.keys.converter(),
            &what,
            entries.iter().map(|(k, _)| k.as_slice()),
        )?;
        let groups = crate::keys::key_groups(&cols)?;
        Ok(entries
            .into_iter()
            .zip(groups)
            .filter(|(_, g)| owns(*g))
            .map(|(e, _)| e)
            .collect())
    }

    /// Restores the fired-through mark.
    pub fn restore_emitted(&mut self, e: Option<i64>) {
        self.emitted_through = e;
    }
}

fn take_chunk(c: &Chunk, idx: &[u32]) -> Result<Chunk> {
    if idx.len() == c.keys.len() {
        return Ok(Chunk {
            keys: c.keys.clone(),
            states: c.states.clone(),
        });
    }
    let ia = UInt32Array::from(idx.to_vec());
    let states = c
        .states
        .iter()
        .map(|a| {
            take(a.as_ref(), &ia, None).map_err(|e| EngineError::arrow("selecting state rows", e))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Chunk {
        keys: idx.iter().map(|i| c.keys[*i as usize]).collect(),
        states,
    })
}

/// The late rule, the one every job applies: a row is late when the
/// watermark `W` at its arrival has closed every window holding it,
/// `W >= floor(ts / slide) * slide + size`. Returns the indices of late rows.
pub fn late_rows(window: WindowSpec, rows: &Rows) -> Vec<usize> {
    let (Some(slide), Some(size), Some(ts), Some(wm)) = (
        window.slide_ms(),
        window.size_ms(),
        rows.ts.as_ref(),
        rows.wm.as_ref(),
    ) else {
        return Vec::new();
    };
    (0..rows.len())
        .filter(|&i| (ts.value(i).div_euclid(slide) * slide).saturating_add(size) <= wm.value(i))
        .collect()
}

/// Decodes stored rows (Arrow's row format) with `conv`. Bytes that are
/// not rows of `conv` (a corrupt or foreign value) are an error naming
/// `what`, never a panic: Arrow's decoder trusts its input, so the decode
/// runs behind a panic guard after the rows' lengths are checked.
pub fn decode_rows<'a>(
    conv: &arrow::row::RowConverter,
    what: &str,
    rows: impl Iterator<Item = &'a [u8]>,
) -> Result<Vec<ArrayRef>> {
    let rows: Vec<&[u8]> = rows.collect();
    let corrupt = |why: String| EngineError::Incompatible {
        path: what.to_string(),
        reason: format!(
            "a stored value is corrupt ({why}); restore the state dir from a backup or rebuild it with `sluice backfill --online`"
        ),
    };
    if let Some(r) = rows.iter().find(|r| r.is_empty()) {
        return Err(corrupt(format!("a row of {} bytes", r.len())));
    }
    let parser = conv.parser();
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        conv.convert_rows(rows.iter().map(|r| parser.parse(r)))
    }));
    match decoded {
        Ok(Ok(cols)) => Ok(cols),
        Ok(Err(e)) => Err(corrupt(e.to_string())),
        Err(_) => Err(corrupt("not a row of this view's state".into())),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use arrow::array::{AsArray, Float64Array, Int64Array, StringArray, TimestampMillisecondArray};
    use arrow::datatypes::{Field, Int64Type};
    use sluice_sql::{ViewKind, plan_pipeline};

    use super::*;

    const MIN: i64 = 60_000;

    fn agg() -> WindowAgg {
        let sql = "CREATE SOURCE s (k TEXT NOT NULL, x DOUBLE, ts TIMESTAMP NOT NULL, WATERMARK FOR ts AS ts) WITH (connector = 'file', path = 'x');
                   CREATE FEATURE VIEW v KEY k AS SELECT k, COUNT(*) AS n, SUM(x) AS s FROM s GROUP BY k, HOP(ts, INTERVAL '1' MINUTE, INTERVAL '3' MINUTE);";
        let plan = plan_pipeline("t.sql", sql, std::path::Path::new(".")).expect("plan");
        let ViewKind::Aggregate(a) = &plan.views[0].kind else {
            panic!("aggregate view")
        };
        WindowAgg::new("v", a, Some("ts")).expect("agg")
    }

    fn rows(events: &[(&str, f64, i64)], wm: i64) -> Rows {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("x", DataType::Float64, true),
            Field::new("ts", sluice_sql::TIMESTAMP_TYPE, false),
        ]));
        let ts: Vec<i64> = events.iter().map(|e| e.2).collect();
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(
                    events.iter().map(|e| e.0).collect::<Vec<_>>(),
                )),
                Arc::new(Float64Array::from(
                    events.iter().map(|e| e.1).collect::<Vec<_>>(),
                )),
                Arc::new(TimestampMillisecondArray::from(ts.clone())),
            ],
        )
        .expect("batch");
        Rows {
            batch,
            ts: Some(Int64Array::from(ts)),
            wm: Some(Int64Array::from(vec![wm; events.len()])),
            rowid: UInt32Array::from_iter_values(0..events.len() as u32),
        }
    }

    /// (window end, key) → count
    fn counts(fired: &[Fired]) -> BTreeMap<(i64, String), i64> {
        let mut out = BTreeMap::new();
        for f in fired {
            let keys = f.batch.column(0).as_string::<i32>();
            let n = f.batch.column(1).as_primitive::<Int64Type>();
            for i in 0..f.batch.num_rows() {
                out.insert(
                    (f.end.unwrap_or(0) / MIN, keys.value(i).to_string()),
                    n.value(i),
                );
            }
        }
        out
    }

    #[test]
    fn hop_windows_combine_panes() {
        let mut a = agg();
        let mut fired = Vec::new();
        a.process(
            &rows(
                &[
                    ("a", 1.0, 10_000),
                    ("a", 2.0, MIN + 10_000),
                    ("b", 5.0, 2 * MIN + 1),
                ],
                i64::MIN,
            ),
            &mut fired,
        )
        .expect("process");
        a.fire_until(10 * MIN, &mut fired).expect("fire");
        let c = counts(&fired);
        let want: BTreeMap<(i64, String), i64> = [
            ((1, "a"), 1),
            ((2, "a"), 2),
            ((3, "a"), 2),
            ((4, "a"), 1),
            ((3, "b"), 1),
            ((4, "b"), 1),
            ((5, "b"), 1),
        ]
        .into_iter()
        .map(|((e, k), n)| ((e, k.to_string()), n))
        .collect();
        assert_eq!(c, want);
        // Every pane's last window has closed: nothing is kept.
        assert_eq!(a.sizes().0, 0);
    }

    #[test]
    fn state_survives_checkpoint_and_restore() {
        let events = [("a", 1.0, 10_000), ("b", 2.0, 20_000), ("a", 3.0, MIN + 5)];
        let mut whole = agg();
        let mut want = Vec::new();
        whole
            .process(&rows(&events, i64::MIN), &mut want)
            .expect("process");
        whole.fire_until(10 * MIN, &mut want).expect("fire");

        let mut first = agg();
        let mut fired = Vec::new();
        first
            .process(&rows(&events[..2], i64::MIN), &mut fired)
            .expect("process");
        let mut ops = Vec::new();
        first.checkpoint(&mut ops).expect("checkpoint");
        let mut restored = agg();
        let mut by_pane: BTreeMap<i64, Vec<StateEntry>> = BTreeMap::new();
        for op in ops {
            if let StateOp::Put { pane, key, value } = op {
                by_pane.entry(pane).or_default().push((key, value));
            }
        }
        for (p, e) in by_pane {
            restored.restore_pane(p, &e).expect("restore");
        }
        restored
            .process(&rows(&events[2..], i64::MIN), &mut fired)
            .expect("process");
        restored.fire_until(10 * MIN, &mut fired).expect("fire");
        assert_eq!(counts(&fired), counts(&want));
    }

    #[test]
    fn late_rows_are_those_whose_windows_all_closed() {
        let a = agg();
        // Watermark 00:05: a 00:01:30 event's last window [00:01, 00:04) closed; a 00:03 event's [00:03, 00:06) has not.
        let r = rows(&[("a", 1.0, 90_000), ("a", 1.0, 3 * MIN)], 5 * MIN);
        assert_eq!(a.late_rows(&r), vec![0]);
    }
}
