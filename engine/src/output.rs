//! What a view emits, as data: the schema of its rows (`window_start`,
//! `window_end`, then its columns), its features as JSON, its vectors,
//! and the online store's row. The view operator, the tiles' readers,
//! the lake and the dead letters all shape rows here.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::json::WriterBuilder;
use arrow::json::writer::LineDelimited;
use sluice_sql::ViewPlan;

use crate::error::{EngineError, Result};

/// The schema of emitted rows: `window_start`, `window_end`, then the view's columns.
pub fn emitted_schema(output: &Schema) -> SchemaRef {
    let ts = DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, Some("UTC".into()));
    let mut fields = vec![
        Field::new("window_start", ts.clone(), true),
        Field::new("window_end", ts, true),
    ];
    fields.extend(output.fields().iter().map(|f| f.as_ref().clone()));
    Arc::new(Schema::new(fields))
}

/// An online-store write: the key and its encoded value.
pub type OnlineRow = (String, Vec<u8>);

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
