//! Row-wise stages (filters and projections) as DataFusion physical
//! expressions evaluated on whole batches.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, Int64Array, RecordBatch, RecordBatchOptions, UInt32Array,
};
use arrow::compute::{filter, filter_record_batch};
use arrow::datatypes::SchemaRef;
use datafusion::common::DFSchema;
use datafusion::logical_expr::Expr;
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::physical_expr::execution_props::ExecutionProps;
use datafusion::physical_expr::{PhysicalExpr, create_physical_expr};
use sluice_sql::Stage;

use crate::error::{EngineError, Result};

/// A compiled stage.
#[derive(Debug)]
pub enum PhysStage {
    /// Keep rows where the predicate is true (NULL counts as false).
    Filter(Arc<dyn PhysicalExpr>),
    /// Compute the output columns.
    Project(Vec<Arc<dyn PhysicalExpr>>, SchemaRef),
}

/// Compiles one logical expression against a schema.
pub fn physical(view: &str, e: &Expr, schema: &DFSchema) -> Result<Arc<dyn PhysicalExpr>> {
    create_physical_expr(
        e,
        schema,
        &ExecutionProps::new(),
        &PhysicalPlanningContext::default(),
    )
    .map_err(|err| EngineError::df(view, err))
}

/// Compiles logical stages.
pub fn compile_stages(view: &str, stages: &[Stage]) -> Result<Vec<PhysStage>> {
    stages
        .iter()
        .map(|s| match s {
            Stage::Filter { predicate, schema } => {
                Ok(PhysStage::Filter(physical(view, predicate, schema)?))
            }
            Stage::Project {
                exprs,
                input,
                output,
            } => {
                let e = exprs
                    .iter()
                    .map(|e| physical(view, e, input))
                    .collect::<Result<Vec<_>>>()?;
                Ok(PhysStage::Project(e, Arc::new(output.as_arrow().clone())))
            }
        })
        .collect()
}

/// Evaluates an expression to an array of `num_rows`.
pub fn eval(view: &str, e: &Arc<dyn PhysicalExpr>, batch: &RecordBatch) -> Result<ArrayRef> {
    e.evaluate(batch)
        .and_then(|v| v.into_array(batch.num_rows()))
        .map_err(|err| EngineError::df(view, err))
}

/// A batch travelling through a view, with per-row event time, the
/// watermark just before each row, and the row's index in the source batch.
#[derive(Debug, Clone)]
pub struct Rows {
    /// The data.
    pub batch: RecordBatch,
    /// Event time (ms) per row, when the source has one.
    pub ts: Option<Int64Array>,
    /// Watermark before each row (ms), when the source has event time.
    pub wm: Option<Int64Array>,
    /// Index of each row in the source batch.
    pub rowid: UInt32Array,
}

impl Rows {
    /// Keeps the rows where `mask` is true.
    pub fn filter(&self, mask: &BooleanArray) -> Result<Rows> {
        let f =
            |a: &dyn Array| filter(a, mask).map_err(|e| EngineError::arrow("filtering rows", e));
        Ok(Rows {
            batch: filter_record_batch(&self.batch, mask)
                .map_err(|e| EngineError::arrow("filtering rows", e))?,
            ts: self
                .ts
                .as_ref()
                .map(|t| f(t).map(|a| Int64Array::from(a.to_data())))
                .transpose()?,
            wm: self
                .wm
                .as_ref()
                .map(|t| f(t).map(|a| Int64Array::from(a.to_data())))
                .transpose()?,
            rowid: UInt32Array::from(f(&self.rowid)?.to_data()),
        })
    }

    /// Rows `offset..offset + len`.
    pub fn slice(&self, offset: usize, len: usize) -> Rows {
        Rows {
            batch: self.batch.slice(offset, len),
            ts: self.ts.as_ref().map(|t| t.slice(offset, len)),
            wm: self.wm.as_ref().map(|t| t.slice(offset, len)),
            rowid: self.rowid.slice(offset, len),
        }
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.batch.num_rows()
    }

    /// No rows.
    pub fn is_empty(&self) -> bool {
        self.batch.num_rows() == 0
    }
}

/// Runs stages over rows.
pub fn run_stages(view: &str, stages: &[PhysStage], mut rows: Rows) -> Result<Rows> {
    for s in stages {
        if rows.is_empty() {
            break;
        }
        match s {
            PhysStage::Filter(p) => {
                let v = p
                    .evaluate(&rows.batch)
                    .map_err(|e| EngineError::df(view, e))?;
                let mask = match v
                    .into_array(rows.len())
                    .map_err(|e| EngineError::df(view, e))?
                {
                    a if a.data_type() == &arrow::datatypes::DataType::Boolean => {
                        BooleanArray::from(a.to_data())
                    }
                    a => {
                        return Err(EngineError::df(
                            view,
                            datafusion::common::DataFusionError::Internal(format!(
                                "filter gave {}",
                                a.data_type()
                            )),
                        ));
                    }
                };
                if mask.true_count() != rows.len() || mask.null_count() > 0 {
                    rows = rows.filter(&mask)?;
                }
            }
            PhysStage::Project(exprs, schema) => {
                rows.batch = project(view, exprs, schema, &rows.batch)?
            }
        }
    }
    Ok(rows)
}

/// Evaluates a projection.
pub fn project(
    view: &str,
    exprs: &[Arc<dyn PhysicalExpr>],
    schema: &SchemaRef,
    batch: &RecordBatch,
) -> Result<RecordBatch> {
    let cols = exprs
        .iter()
        .map(|e| eval(view, e, batch))
        .collect::<Result<Vec<_>>>()?;
    RecordBatch::try_new_with_options(
        Arc::clone(schema),
        cols,
        &RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
    )
    .map_err(|e| EngineError::arrow(format!("projecting view `{view}`"), e))
}
