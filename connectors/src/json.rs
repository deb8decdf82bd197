//! JSON records to Arrow, shared by the file and Kafka sources: a chunk of
//! records is decoded in one pass by arrow-json; only when that fails are the
//! records decoded one by one to find and dead-letter the bad ones.

use std::sync::Arc;

use arrow::array::{Array, BooleanArray, RecordBatch};
use arrow::compute::{concat_batches, filter_record_batch};
use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::json::ReaderBuilder;
use arrow::json::reader::Decoder;
use sluice_engine::{DeadLetter, DeadLetterKind, EngineError, Result};

/// How much of a rejected record a dead letter keeps.
pub const RECORD_PREVIEW: usize = 4096;

/// One record inside a chunk buffer: `buf[start..end]`, with the caller's
/// position label.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    /// First byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
    /// The caller's position label (line number, packed partition/offset).
    pub pos: u64,
}

/// Builds a dead letter for a record: `(position, bytes, kind, reason)`.
pub type Reject<'a> = &'a dyn Fn(u64, &[u8], DeadLetterKind, String) -> DeadLetter;

/// `records` laid out in one buffer, each followed by a newline (where a
/// JSON record ends), with their spans; positions are record indexes.
pub(crate) fn spans_of<R: AsRef<[u8]>>(records: &[R]) -> (Vec<u8>, Vec<Span>) {
    let mut buf = Vec::with_capacity(records.iter().map(|r| r.as_ref().len() + 1).sum());
    let mut spans = Vec::with_capacity(records.len());
    for (i, r) in records.iter().enumerate() {
        let start = buf.len();
        buf.extend_from_slice(r.as_ref());
        spans.push(Span {
            start,
            end: buf.len(),
            pos: i as u64,
        });
        buf.push(b'\n');
    }
    (buf, spans)
}

/// A dead letter that keeps only what the decoder tests look at.
#[cfg(test)]
pub(crate) fn test_reject(pos: u64, _: &[u8], kind: DeadLetterKind, reason: String) -> DeadLetter {
    DeadLetter {
        source: "s".into(),
        position: pos.to_string(),
        kind,
        reason,
        record: String::new(),
    }
}

/// Decodes JSON objects into a declared schema.
pub struct JsonRecords {
    name: String,
    /// The declared schema (NOT NULL columns non-nullable).
    schema: SchemaRef,
    /// The same columns, all nullable, so a missing field is found by us.
    decode_schema: SchemaRef,
    decoder: Decoder,
}

impl JsonRecords {
    /// A decoder for the rows of source `name`.
    pub fn new(name: &str, schema: SchemaRef) -> Result<Self> {
        let decode_schema = Arc::new(Schema::new(
            schema
                .fields()
                .iter()
                .map(|f| Field::new(f.name(), f.data_type().clone(), true))
                .collect::<Vec<_>>(),
        ));
        let decoder = new_decoder(&decode_schema, name)?;
        Ok(JsonRecords {
            name: name.to_string(),
            schema,
            decode_schema,
            decoder,
        })
    }

    /// Decodes the records `spans` of `buf` (the bytes between them must be
    /// whitespace). Returns the rows that fit the schema, and for each row the
    /// index of its span; records that do not fit go to `rejected`.
    pub fn decode(
        &mut self,
        buf: &[u8],
        spans: &[Span],
        reject: Reject<'_>,
        rejected: &mut Vec<DeadLetter>,
    ) -> Result<Option<(RecordBatch, Vec<usize>)>> {
        if spans.is_empty() {
            return Ok(None);
        }
        let whole = &buf[spans[0].start..spans[spans.len() - 1].end];
        // Fast path: the whole chunk at once.
        let fast = match self.decoder.decode(whole) {
            Ok(used) if used == whole.len() => match self.decoder.flush() {
                Ok(Some(b)) if b.num_rows() == spans.len() => Some(b),
                _ => None,
            },
            _ => None,
        };
        let (batch, rows) = match fast {
            Some(b) => (b, (0..spans.len()).collect::<Vec<_>>()),
            None => {
                self.decoder = new_decoder(&self.decode_schema, &self.name)?;
                let (bs, rows) = self.decode_each(buf, spans, reject, rejected)?;
                if bs.is_empty() {
                    return Ok(None);
                }
                let b = concat_batches(&self.decode_schema, &bs)
                    .map_err(|e| EngineError::arrow("joining decoded rows", e))?;
                (b, rows)
            }
        };
        // NOT NULL columns: rows missing them are dead letters.
        let mut keep: Option<Vec<bool>> = None;
        for (i, f) in self.schema.fields().iter().enumerate() {
            let col = batch.column(i);
            if f.is_nullable() || col.null_count() == 0 {
                continue;
            }
            let k = keep.get_or_insert_with(|| vec![true; batch.num_rows()]);
            for (r, kr) in k.iter_mut().enumerate() {
                if *kr && col.is_null(r) {
                    *kr = false;
                    let sp = spans[rows[r]];
                    rejected.push(reject(
                        sp.pos,
                        &buf[sp.start..sp.end],
                        DeadLetterKind::MissingField,
                        format!("required field `{}` is missing or null", f.name()),
                    ));
                }
            }
        }
        let (batch, rows) = match keep {
            None => (batch, rows),
            Some(k) => {
                let rows = rows
                    .iter()
                    .zip(&k)
                    .filter(|(_, k)| **k)
                    .map(|(p, _)| *p)
                    .collect();
                let b = filter_record_batch(&batch, &BooleanArray::from(k))
                    .map_err(|e| EngineError::arrow("dropping rows with missing fields", e))?;
                (b, rows)
            }
        };
        if batch.num_rows() == 0 {
            return Ok(None);
        }
        let batch = RecordBatch::try_new(Arc::clone(&self.schema), batch.columns().to_vec())
            .map_err(|e| EngineError::arrow(format!("source {}", self.name), e))?;
        Ok(Some((batch, rows)))
    }

    /// Decodes records one at a time (after a chunk failed) to find the bad ones.
    fn decode_each(
        &mut self,
        buf: &[u8],
        spans: &[Span],
        reject: Reject<'_>,
        rejected: &mut Vec<DeadLetter>,
    ) -> Result<(Vec<RecordBatch>, Vec<usize>)> {
        let mut batches = Vec::new();
        let mut rows = Vec::new();
        for (i, sp) in spans.iter().enumerate() {
            let rec = &buf[sp.start..sp.end];
            let r = self.decoder.decode(rec).and_then(|_| self.decoder.flush());
            match r {
                Ok(Some(b)) if b.num_rows() == 1 => {
                    batches.push(b);
                    rows.push(i);
                }
                Ok(_) => {
                    rejected.push(reject(
                        sp.pos,
                        rec,
                        DeadLetterKind::MalformedJson,
                        "the record holds no single JSON object".into(),
                    ));
                    self.decoder = new_decoder(&self.decode_schema, &self.name)?;
                }
                Err(err) => {
                    rejected.push(classify(sp.pos, rec, &err, reject));
                    self.decoder = new_decoder(&self.decode_schema, &self.name)?;
                }
            }
        }
        Ok((batches, rows))
    }
}

/// Why a record arrow-json refused is bad: not JSON, not an object, or a
/// field of the wrong type.
fn classify(
    pos: u64,
    rec: &[u8],
    err: &arrow::error::ArrowError,
    reject: Reject<'_>,
) -> DeadLetter {
    match serde_json::from_slice::<serde_json::Value>(rec) {
        Ok(serde_json::Value::Object(_)) => reject(
            pos,
            rec,
            DeadLetterKind::WrongType,
            format!("a field does not fit the declared schema: {err}"),
        ),
        Ok(_) => reject(
            pos,
            rec,
            DeadLetterKind::MalformedJson,
            "the record is valid JSON but not an object".into(),
        ),
        Err(e) => reject(
            pos,
            rec,
            DeadLetterKind::MalformedJson,
            format!("not valid JSON: {e}"),
        ),
    }
}

fn new_decoder(schema: &SchemaRef, name: &str) -> Result<Decoder> {
    ReaderBuilder::new(Arc::clone(schema))
        .with_batch_size(1 << 20)
        .build_decoder()
        .map_err(|e| EngineError::arrow(format!("JSON decoder for source {name}"), e))
}

/// The first `RECORD_PREVIEW` bytes of a record, as text.
pub fn preview(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(RECORD_PREVIEW)]).into_owned()
}

#[cfg(test)]
mod props {
    //! Any bytes, as records: each becomes a row or a dead letter, never a
    //! panic, and the rows keep their order.

    use super::*;
    use arrow::datatypes::{DataType, TimeUnit};
    use proptest::prelude::*;

    fn decoder() -> JsonRecords {
        let schema = Arc::new(Schema::new(vec![
            Field::new("user_id", DataType::Utf8, false),
            Field::new("price", DataType::Float64, true),
            Field::new("n", DataType::Int64, true),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Millisecond, None),
                false,
            ),
        ]));
        JsonRecords::new("s", schema).unwrap()
    }

    /// Records that are often almost right: objects with the declared
    /// fields holding values of any JSON type, or arbitrary bytes.
    fn record() -> impl Strategy<Value = Vec<u8>> {
        let value = prop_oneof![
            Just("null".to_string()),
            any::<i64>().prop_map(|v| v.to_string()),
            any::<f64>().prop_map(|v| format!("{v:e}")),
            "[a-z0-9:TZ.-]{0,24}".prop_map(|s| format!("\"{s}\"")),
            Just("[1, 2]".to_string()),
            Just("{\"a\": 1}".to_string()),
            Just("1e300".to_string()),
            Just("-9223372036854775808".to_string()),
            Just("\"2024-01-01T00:00:00Z\"".to_string()),
        ];
        let field = (
            prop::sample::select(&["user_id", "price", "n", "ts", "extra"][..]),
            value,
        );
        prop_oneof![
            prop::collection::vec(field, 0..6).prop_map(|fs| {
                let body: Vec<String> = fs.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
                format!("{{{}}}", body.join(", ")).into_bytes()
            }),
            prop::collection::vec(any::<u8>(), 0..40)
                .prop_map(|b| b.into_iter().filter(|c| *c != b'\n').collect()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn every_record_is_a_row_or_a_dead_letter(records in prop::collection::vec(record(), 1..20)) {
            let mut buf = Vec::new();
            let mut spans = Vec::new();
            for (i, r) in records.iter().enumerate() {
                let start = buf.len();
                buf.extend_from_slice(r);
                spans.push(Span { start, end: buf.len(), pos: i as u64 });
                buf.push(b'\n');
            }
            let reject = |pos: u64, bytes: &[u8], kind: DeadLetterKind, reason: String| DeadLetter {
                source: "s".into(),
                position: pos.to_string(),
                kind,
                reason,
                record: preview(bytes),
            };
            let mut rejected = Vec::new();
            let mut d = decoder();
            let out = d.decode(&buf, &spans, &reject, &mut rejected).unwrap();
            let rows = out.as_ref().map(|(b, r)| {
                assert_eq!(b.num_rows(), r.len());
                r.clone()
            }).unwrap_or_default();
            prop_assert_eq!(rows.len() + rejected.len(), spans.len());
            prop_assert!(rows.windows(2).all(|w| w[0] < w[1]), "rows out of order: {:?}", rows);
            let bad: std::collections::BTreeSet<u64> =
                rejected.iter().map(|d| d.position.parse().unwrap()).collect();
            prop_assert_eq!(bad.len(), rejected.len(), "a record dead-lettered twice");
            for r in &rows {
                prop_assert!(!bad.contains(&(*r as u64)), "record {} is both a row and a dead letter", r);
            }
            // The decoder keeps working after bad input.
            let good = br#"{"user_id": "a", "ts": 1}"#;
            let spans = [Span { start: 0, end: good.len(), pos: 0 }];
            let mut rejected = Vec::new();
            let ok = d.decode(good, &spans, &reject, &mut rejected).unwrap();
            prop_assert!(ok.is_some() && rejected.is_empty());
        }
    }
}
