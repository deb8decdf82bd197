//! Rows of a decoded batch held against the declared columns: which rows
//! do not fit and why, and the batch of the rows that do. Every decoder
//! (JSON, Avro, Protobuf, Parquet and CSV files) judges its rows here, so
//! a value is refused the same way whatever format it came in.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use sluice_engine::{DeadLetterKind, EngineError, Result};

/// A row's reason for rejection, if any, per row of a batch being cast to
/// the declared columns.
pub(crate) type BadRows = Vec<Option<(DeadLetterKind, String)>>;

/// Marks the rows where `col`, declared `field` and cast from `src` (`None`:
/// the input lacks the column), came out NULL: `wrong_type` when `src` held
/// a value that does not fit, `missing_field` when a NOT NULL column has
/// none. A row already marked keeps its first reason.
pub(crate) fn mark_bad_rows(
    field: &Field,
    src: Option<&ArrayRef>,
    col: &ArrayRef,
    bad: &mut BadRows,
) {
    for (i, b) in bad.iter_mut().enumerate() {
        if b.is_some() || !col.is_null(i) {
            continue;
        }
        if src.is_some_and(|c| c.is_valid(i)) {
            *b = Some((
                DeadLetterKind::WrongType,
                format!(
                    "column `{}`: value is not a {}",
                    field.name(),
                    field.data_type()
                ),
            ));
        } else if !field.is_nullable() {
            *b = Some((
                DeadLetterKind::MissingField,
                format!(
                    "column `{}` is NOT NULL but the value is missing",
                    field.name()
                ),
            ));
        }
    }
}

/// Marks the rows of a vector column (`FLOAT[n]`) holding an element that
/// is NaN or infinite: `wrong_type`, whatever format the record came in
/// (the index and the distances it serves are undefined for them). A row
/// already marked keeps its first reason.
pub(crate) fn mark_non_finite(field: &Field, col: &ArrayRef, bad: &mut BadRows) {
    let DataType::FixedSizeList(_, dims) = field.data_type() else {
        return;
    };
    let Some(list) = col
        .as_any()
        .downcast_ref::<arrow::array::FixedSizeListArray>()
    else {
        return;
    };
    let values = list.values();
    let dims = (*dims).max(0) as usize;
    let check = |row: usize, get: &dyn Fn(usize) -> f64| -> Option<usize> {
        let start = list.value_offset(row).max(0) as usize;
        (0..dims).find(|j| !get(start + j).is_finite())
    };
    for (r, b) in bad.iter_mut().enumerate() {
        if b.is_some() || list.is_null(r) {
            continue;
        }
        let hit = if let Some(v) = values.as_any().downcast_ref::<arrow::array::Float32Array>() {
            check(r, &|i| f64::from(v.value(i)))
        } else if let Some(v) = values.as_any().downcast_ref::<arrow::array::Float64Array>() {
            check(r, &|i| v.value(i))
        } else {
            None
        };
        if let Some(j) = hit {
            *b = Some((
                DeadLetterKind::WrongType,
                format!(
                    "column `{}`: element {j} of the vector is not finite (NaN or infinity)",
                    field.name()
                ),
            ));
        }
    }
}

/// The rows of `cols` no entry of `bad` marks, as a batch of `schema`
/// (`None`: none left); `what` names the rows in errors.
pub(crate) fn keep_good_rows(
    schema: &SchemaRef,
    cols: Vec<ArrayRef>,
    bad: &BadRows,
    what: &str,
) -> Result<Option<RecordBatch>> {
    // NOT NULL columns may hold NULLs until the bad rows are gone.
    let loose = Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect::<Vec<_>>(),
    ));
    let loose_batch = RecordBatch::try_new(loose, cols).map_err(|e| EngineError::arrow(what, e))?;
    let keep: BooleanArray = bad.iter().map(|b| Some(b.is_none())).collect();
    let kept = filter_record_batch(&loose_batch, &keep)
        .map_err(|e| EngineError::arrow("dropping bad rows", e))?;
    if kept.num_rows() == 0 {
        return Ok(None);
    }
    RecordBatch::try_new(Arc::clone(schema), kept.columns().to_vec())
        .map(Some)
        .map_err(|e| EngineError::arrow(what, e))
}
