//! The dead letters a view makes of rows it received: late events and
//! rows its expressions cannot compute. Every driver (`run`, `backfill`,
//! training-set replays) builds them here, the same way.

use arrow::array::RecordBatch;

use crate::error::Result;
use crate::output::features_json;
use crate::source::{DeadLetter, DeadLetterKind};
use crate::time::fmt_ts;

/// The dead letter of source row `row` of `batch`, late for `view`: its
/// event time `ts` was behind the watermark `wm` when it arrived.
pub fn late_letter(
    source: &str,
    position: String,
    view: &str,
    batch: &RecordBatch,
    row: usize,
    ts: Option<i64>,
    wm: Option<i64>,
) -> Result<DeadLetter> {
    Ok(DeadLetter {
        source: source.to_string(),
        position,
        kind: DeadLetterKind::LateEvent,
        reason: format!(
            "late for view `{view}`: event time {} is behind the watermark {}; every window holding it had closed",
            ts.map(fmt_ts).unwrap_or_default(),
            wm.map(fmt_ts).unwrap_or_default()
        ),
        record: row_json(batch, row)?,
    })
}

/// Row `row` of `batch` as a JSON object (a dead letter's record).
fn row_json(batch: &RecordBatch, row: usize) -> Result<String> {
    let all: Vec<usize> = (0..batch.num_columns()).collect();
    let rec = features_json(&batch.slice(row, 1), &all)?
        .pop()
        .unwrap_or_default();
    Ok(String::from_utf8_lossy(&rec).into_owned())
}

/// The dead letter of source-batch row `row`, which view `view` cannot
/// compute (`why`).
pub fn view_error_letter(
    source: &str,
    position: String,
    view: &str,
    batch: &RecordBatch,
    row: usize,
    why: &str,
) -> Result<DeadLetter> {
    metrics::counter!("sluice_view_errors_total", "view" => view.to_string()).increment(1);
    Ok(DeadLetter {
        source: source.to_string(),
        position,
        kind: DeadLetterKind::ViewError,
        reason: format!("view `{view}` cannot compute it: {why}"),
        record: row_json(batch, row)?,
    })
}
