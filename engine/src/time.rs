//! Event time: the range of event times the engine accepts, and window
//! arithmetic that cannot overflow.
//!
//! Event times are milliseconds since the Unix epoch in an `i64`. The
//! engine accepts the instants a nanosecond timestamp can hold, years 1677
//! to 2262 ([`MIN_EVENT_TIME_MS`]..=[`MAX_EVENT_TIME_MS`]): what pandas,
//! Spark and DuckDB's `TIMESTAMP_NS` read back from the lake without
//! wrapping. A record outside it is a bad record (dead-lettered as
//! `wrong_type`), never an event: with it out of the way, an event time
//! plus or minus any window the planner accepts fits in an `i64`.

use std::sync::Arc;

use arrow::array::{Array, BooleanArray, Int64Array, RecordBatch, TimestampMillisecondArray};
use arrow::compute::filter_record_batch;

use crate::error::{EngineError, Result};
use crate::output::features_json;
use crate::source::{DeadLetter, DeadLetterKind, SourceBatch};

/// The earliest event time accepted: 1677-09-21T00:12:43.146Z.
pub const MIN_EVENT_TIME_MS: i64 = i64::MIN / 1_000_000;
/// The latest event time accepted: 2262-04-11T23:47:16.854Z.
pub const MAX_EVENT_TIME_MS: i64 = i64::MAX / 1_000_000;

/// Why an event time is not accepted, or `None` when it is.
pub fn event_time_problem(t: i64) -> Option<String> {
    if (MIN_EVENT_TIME_MS..=MAX_EVENT_TIME_MS).contains(&t) {
        return None;
    }
    let text = |ms: i64| fmt_ts(ms).as_str().map(str::to_string).unwrap_or_default();
    Some(format!(
        "event time {t} ms is outside the supported range {} to {} (years 1677 to 2262)",
        text(MIN_EVENT_TIME_MS),
        text(MAX_EVENT_TIME_MS)
    ))
}

/// `a + b` for window arithmetic on event times; an overflow is a bug
/// (event times and window sizes are range-checked before they meet).
pub fn add(a: i64, b: i64) -> Result<i64> {
    a.checked_add(b).ok_or_else(|| overflow(a, "+", b))
}

/// `a - b` for window arithmetic on event times; see [`add`].
pub fn sub(a: i64, b: i64) -> Result<i64> {
    a.checked_sub(b).ok_or_else(|| overflow(a, "-", b))
}

fn overflow(a: i64, op: &str, b: i64) -> EngineError {
    EngineError::Internal(format!(
        "window arithmetic overflowed: {a} {op} {b} (event times are range-checked, so this is a bug)"
    ))
}

/// The event times (ms) of a source batch, from its event-time column
/// `idx`. Every value is in range once [`drop_bad_event_times`] ran.
pub fn event_times(source: &str, batch: &RecordBatch, idx: usize) -> Result<Int64Array> {
    let tsa = timestamp_column(source, batch, idx)?;
    Ok(Int64Array::new(tsa.values().clone(), None))
}

fn timestamp_column<'a>(
    source: &str,
    batch: &'a RecordBatch,
    idx: usize,
) -> Result<&'a TimestampMillisecondArray> {
    let col = batch.column(idx);
    col.as_any()
        .downcast_ref::<TimestampMillisecondArray>()
        .ok_or_else(|| {
            EngineError::Internal(format!(
                "source {source}: event-time column has type {}",
                col.data_type()
            ))
        })
}

/// Takes the rows whose event time (column `event_time`) is NULL or outside
/// the supported range out of `sb` and returns them as dead letters
/// (`missing_field`, `wrong_type`), positions described by `describe`.
/// A batch without such rows, or a source without event time, comes back
/// unchanged.
pub fn drop_bad_event_times(
    source: &str,
    sb: Option<SourceBatch>,
    event_time: Option<usize>,
    describe: &dyn Fn(u64) -> String,
) -> Result<(Option<SourceBatch>, Vec<DeadLetter>)> {
    let (sb, idx) = match (sb, event_time) {
        (Some(sb), Some(idx)) => (sb, idx),
        (sb, _) => return Ok((sb, Vec::new())),
    };
    let tsa = timestamp_column(source, &sb.batch, idx)?;
    let field = sb.batch.schema().field(idx).name().clone();
    let mut bad: Vec<(usize, DeadLetterKind, String)> = Vec::new();
    for (r, t) in tsa.iter().enumerate() {
        match t {
            None => bad.push((
                r,
                DeadLetterKind::MissingField,
                format!("event-time field `{field}` is missing or null"),
            )),
            Some(t) => {
                if let Some(why) = event_time_problem(t) {
                    bad.push((
                        r,
                        DeadLetterKind::WrongType,
                        format!("field `{field}`: {why}"),
                    ));
                }
            }
        }
    }
    drop_rows(source, sb, bad, describe)
}

/// Takes rows `bad` (row, kind, reason; rows in increasing order) out of
/// `sb` and returns them as dead letters, positions described by
/// `describe`; `None` when no row is left.
pub fn drop_rows(
    source: &str,
    sb: SourceBatch,
    bad: Vec<(usize, DeadLetterKind, String)>,
    describe: &dyn Fn(u64) -> String,
) -> Result<(Option<SourceBatch>, Vec<DeadLetter>)> {
    if bad.is_empty() {
        return Ok((Some(sb), Vec::new()));
    }
    let all: Vec<usize> = (0..sb.batch.num_columns()).collect();
    let mut letters = Vec::with_capacity(bad.len());
    let mut keep = vec![true; sb.batch.num_rows()];
    for (r, kind, reason) in bad {
        keep[r] = false;
        let rec = features_json(&sb.batch.slice(r, 1), &all)?
            .pop()
            .unwrap_or_default();
        letters.push(DeadLetter {
            source: source.to_string(),
            position: describe(sb.row_positions.get(r).copied().unwrap_or(0)),
            kind,
            reason,
            record: String::from_utf8_lossy(&rec).into_owned(),
        });
    }
    let mask = BooleanArray::from(keep.clone());
    let batch = filter_record_batch(&sb.batch, &mask)
        .map_err(|e| EngineError::arrow(format!("source {source}: dropping rejected rows"), e))?;
    if batch.num_rows() == 0 {
        return Ok((None, letters));
    }
    // An empty partition list (one partition) stays empty.
    let row_positions = kept(&sb.row_positions, &keep);
    let partitions = kept(&sb.partitions, &keep);
    let batch = RecordBatch::try_new(Arc::clone(&sb.batch.schema()), batch.columns().to_vec())
        .map_err(|e| EngineError::arrow(format!("source {source}"), e))?;
    Ok((
        Some(SourceBatch {
            batch,
            row_positions,
            partitions,
        }),
        letters,
    ))
}

/// The items of `v` whose flag in `keep` is set.
fn kept<T: Copy>(v: &[T], keep: &[bool]) -> Vec<T> {
    v.iter()
        .zip(keep)
        .filter(|(_, k)| **k)
        .map(|(x, _)| *x)
        .collect()
}

/// Milliseconds as an RFC 3339 UTC timestamp.
pub fn fmt_ts(ms: i64) -> serde_json::Value {
    match chrono_like(ms) {
        Some(s) => serde_json::Value::String(s),
        None => serde_json::Value::Null,
    }
}

fn chrono_like(ms: i64) -> Option<String> {
    let a = arrow::array::TimestampMillisecondArray::from(vec![ms]).with_timezone("UTC");
    let opts = arrow::util::display::FormatOptions::default()
        .with_timestamp_tz_format(Some("%Y-%m-%dT%H:%M:%S%.3fZ"));
    let f = arrow::util::display::ArrayFormatter::try_new(&a, &opts).ok()?;
    Some(f.value(0).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::StringArray;
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};

    #[test]
    fn range_is_what_a_nanosecond_timestamp_holds() {
        assert_eq!(fmt_ts(MIN_EVENT_TIME_MS), "1677-09-21T00:12:43.146Z");
        assert_eq!(fmt_ts(MAX_EVENT_TIME_MS), "2262-04-11T23:47:16.854Z");
        assert!(MIN_EVENT_TIME_MS.checked_mul(1_000_000).is_some());
        assert!(MAX_EVENT_TIME_MS.checked_mul(1_000_000).is_some());
        assert!(event_time_problem(MIN_EVENT_TIME_MS).is_none());
        assert!(event_time_problem(MAX_EVENT_TIME_MS).is_none());
        assert!(event_time_problem(MIN_EVENT_TIME_MS - 1).is_some());
        assert!(event_time_problem(MAX_EVENT_TIME_MS + 1).is_some());
        assert!(event_time_problem(i64::MIN).is_some());
        assert!(event_time_problem(i64::MAX).is_some());
    }

    #[test]
    fn checked_arithmetic_reports_overflow() {
        assert_eq!(add(1, 2).ok(), Some(3));
        assert!(add(i64::MAX, 1).is_err());
        assert!(sub(i64::MIN, 1).is_err());
    }

    #[test]
    fn bad_rows_become_dead_letters_and_the_rest_keeps_positions() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), true),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(StringArray::from(vec!["a", "b", "c", "d"])),
                Arc::new(TimestampMillisecondArray::from(vec![
                    Some(1),
                    Some(i64::MAX),
                    None,
                    Some(i64::MIN),
                ])),
            ],
        )
        .unwrap();
        let sb = SourceBatch {
            batch,
            row_positions: vec![10, 11, 12, 13],
            partitions: vec![0, 1, 2, 3],
        };
        let (kept, letters) =
            drop_bad_event_times("s", Some(sb), Some(1), &|p| format!("f:{p}")).unwrap();
        let kept = kept.unwrap();
        assert_eq!(kept.batch.num_rows(), 1);
        assert_eq!(kept.row_positions, vec![10]);
        assert_eq!(kept.partitions, vec![0]);
        let got: Vec<(String, DeadLetterKind)> = letters
            .iter()
            .map(|d| (d.position.clone(), d.kind))
            .collect();
        assert_eq!(
            got,
            vec![
                ("f:11".to_string(), DeadLetterKind::WrongType),
                ("f:12".to_string(), DeadLetterKind::MissingField),
                ("f:13".to_string(), DeadLetterKind::WrongType),
            ]
        );
        assert!(letters[0].reason.contains("outside the supported range"));
    }
}
