//! JSON records to Arrow, shared by the file and Kafka sources: a chunk of
//! records is decoded in one pass by arrow-json; only when that fails are the
//! records decoded one by one to find and dead-letter the bad ones.

use std::sync::Arc;

use arrow::array::{Array, RecordBatch};
use arrow::compute::concat_batches;
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
///
/// A poll's records are fed to arrow-json's decoder one at a time, each
/// checked to have produced exactly one complete object, so no row is
/// ever attributed to another record (two objects in one Kafka message,
/// one object split over two, or an empty message are dead letters). The
/// decoder reads a value that does not fit its column as NULL; a column
/// that came out NULL where the record holds a value for it marks the row
/// `wrong_type`. When a record is not one JSON object, every record of
/// the poll is first checked alone by a decoder of no columns (its parse
/// only), and the good ones decoded together: linear in the poll's size,
/// however the bad records are spread.
pub struct JsonRecords {
    name: String,
    /// The declared schema (NOT NULL columns non-nullable).
    schema: SchemaRef,
    /// The same columns, all nullable, so a missing field is found by us.
    decode_schema: SchemaRef,
    decoder: Decoder,
    /// A decoder of no columns: a record's JSON parse and object count.
    probe: Decoder,
    /// `"name"` of each column, to look for in a record whose value came out NULL.
    quoted: Vec<Vec<u8>>,
}

/// Records a probe decoder holds before it is flushed (its memory).
const PROBE_ROWS: usize = 4096;

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
        let probe = new_decoder(&Arc::new(Schema::empty()), name)?;
        let quoted = schema
            .fields()
            .iter()
            .map(|f| serde_json::to_vec(f.name()).unwrap_or_default())
            .collect();
        Ok(JsonRecords {
            name: name.to_string(),
            schema,
            decode_schema,
            decoder,
            probe,
            quoted,
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
        // Fast path: every record one object.
        let mut fast = true;
        for sp in spans {
            if !one_object(&mut self.decoder, &buf[sp.start..sp.end]) {
                fast = false;
                break;
            }
        }
        let decoded = if fast {
            match self.decoder.flush() {
                Ok(Some(b)) if b.num_rows() == spans.len() => {
                    Some((b, (0..spans.len()).collect::<Vec<_>>()))
                }
                _ => None,
            }
        } else {
            None
        };
        let (batch, rows) = match decoded {
            Some(d) => d,
            None => {
                self.decoder = new_decoder(&self.decode_schema, &self.name)?;
                match self.decode_good(buf, spans, reject, rejected)? {
                    Some(d) => d,
                    None => return Ok(None),
                }
            }
        };
        self.conform(batch, rows, buf, spans, reject, rejected)
    }

    /// The slow path: each record parsed alone by the probe; those that are
    /// one object each decoded together.
    fn decode_good(
        &mut self,
        buf: &[u8],
        spans: &[Span],
        reject: Reject<'_>,
        rejected: &mut Vec<DeadLetter>,
    ) -> Result<Option<(RecordBatch, Vec<usize>)>> {
        let mut good = Vec::with_capacity(spans.len());
        for (i, sp) in spans.iter().enumerate() {
            let rec = &buf[sp.start..sp.end];
            if self.probe.len() >= PROBE_ROWS && self.probe.flush().is_err() {
                self.probe = new_decoder(&Arc::new(Schema::empty()), &self.name)?;
            }
            if one_object(&mut self.probe, rec) {
                good.push(i);
            } else {
                rejected.push(malformed(sp.pos, rec, reject));
                self.probe = new_decoder(&Arc::new(Schema::empty()), &self.name)?;
            }
        }
        if good.is_empty() {
            return Ok(None);
        }
        for &i in &good {
            let sp = spans[i];
            if !one_object(&mut self.decoder, &buf[sp.start..sp.end]) {
                return Err(EngineError::Internal(format!(
                    "source {}: a record the probe read as one object did not decode as one",
                    self.name
                )));
            }
        }
        match self.decoder.flush() {
            Ok(Some(b)) if b.num_rows() == good.len() => Ok(Some((b, good))),
            _ => {
                // A value arrow-json cannot read even as NULL: find the
                // records one at a time (rare).
                self.decoder = new_decoder(&self.decode_schema, &self.name)?;
                let picked: Vec<Span> = good.iter().map(|&i| spans[i]).collect();
                let (bs, rows) = self.decode_each(buf, &picked, reject, rejected)?;
                if bs.is_empty() {
                    return Ok(None);
                }
                let b = concat_batches(&self.decode_schema, &bs)
                    .map_err(|e| EngineError::arrow("joining decoded rows", e))?;
                Ok(Some((b, rows.into_iter().map(|r| good[r]).collect())))
            }
        }
    }

    /// Rows whose values do not fit (a value read as NULL, a missing NOT
    /// NULL field, a vector element that is not finite) go to `rejected`;
    /// the rest take the declared schema.
    fn conform(
        &self,
        batch: RecordBatch,
        rows: Vec<usize>,
        buf: &[u8],
        spans: &[Span],
        reject: Reject<'_>,
        rejected: &mut Vec<DeadLetter>,
    ) -> Result<Option<(RecordBatch, Vec<usize>)>> {
        let n = batch.num_rows();
        let mut bad: Vec<Option<(DeadLetterKind, String)>> = vec![None; n];
        let mut parsed: Vec<Option<serde_json::Value>> = vec![None; n];
        for (i, f) in self.schema.fields().iter().enumerate() {
            let col = batch.column(i);
            if col.null_count() > 0 {
                for r in 0..n {
                    if bad[r].is_some() || col.is_valid(r) {
                        continue;
                    }
                    let sp = spans[rows[r]];
                    let rec = &buf[sp.start..sp.end];
                    if self.holds_value(rec, i, &mut parsed[r]) {
                        bad[r] = Some((
                            DeadLetterKind::WrongType,
                            format!(
                                "field `{}`: the value does not fit the column's type {}",
                                f.name(),
                                f.data_type()
                            ),
                        ));
                    } else if !f.is_nullable() {
                        bad[r] = Some((
                            DeadLetterKind::MissingField,
                            format!("required field `{}` is missing or null", f.name()),
                        ));
                    }
                }
            }
            crate::rows::mark_non_finite(f, col, &mut bad);
        }
        if bad.iter().all(Option::is_none) {
            let batch = RecordBatch::try_new(Arc::clone(&self.schema), batch.columns().to_vec())
                .map_err(|e| EngineError::arrow(format!("source {}", self.name), e))?;
            return Ok(Some((batch, rows)));
        }
        for (r, b) in bad.iter().enumerate() {
            if let Some((kind, reason)) = b {
                let sp = spans[rows[r]];
                rejected.push(reject(
                    sp.pos,
                    &buf[sp.start..sp.end],
                    *kind,
                    reason.clone(),
                ));
            }
        }
        let rows = rows
            .iter()
            .zip(&bad)
            .filter(|(_, b)| b.is_none())
            .map(|(p, _)| *p)
            .collect();
        let batch = crate::rows::keep_good_rows(
            &self.schema,
            batch.columns().to_vec(),
            &bad,
            &format!("source {}", self.name),
        )?;
        Ok(batch.map(|b| (b, rows)))
    }

    /// Whether record `rec` holds a non-null value for column `i`: its
    /// quoted name cannot be in a record that does not (escapes aside),
    /// else the record is parsed (once per row).
    fn holds_value(&self, rec: &[u8], i: usize, parsed: &mut Option<serde_json::Value>) -> bool {
        let name = &self.quoted[i];
        if memchr::memmem::find(rec, name).is_none() && memchr::memmem::find(rec, b"\\u").is_none()
        {
            return false;
        }
        let v = parsed
            .get_or_insert_with(|| serde_json::from_slice(rec).unwrap_or(serde_json::Value::Null));
        v.get(self.schema.field(i).name())
            .is_some_and(|x| !x.is_null())
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
                    rejected.push(malformed(sp.pos, rec, reject));
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

/// Feeds `rec` to `d`: true when it was exactly one whole JSON object
/// (`d` then holds one more row). On false `d` may hold anything.
fn one_object(d: &mut Decoder, rec: &[u8]) -> bool {
    let first = rec.iter().find(|c| !c.is_ascii_whitespace());
    if first != Some(&b'{') {
        return false;
    }
    let before = d.len();
    matches!(d.decode(rec), Ok(used) if used == rec.len())
        && d.len() == before + 1
        && !d.has_partial_record()
}

/// The dead letter of a record that is not exactly one JSON object.
fn malformed(pos: u64, rec: &[u8], reject: Reject<'_>) -> DeadLetter {
    let reason = match serde_json::from_slice::<serde_json::Value>(rec) {
        Ok(serde_json::Value::Object(_)) => "the record holds no single JSON object".to_string(),
        Ok(_) => "the record is valid JSON but not an object".to_string(),
        Err(e) if e.is_eof() && rec.iter().all(u8::is_ascii_whitespace) => {
            "the record is empty".to_string()
        }
        Err(e)
            if e.classify() == serde_json::error::Category::Syntax
                && e.to_string().contains("trailing characters") =>
        {
            "the record holds more than one JSON value".to_string()
        }
        Err(e) => format!("not valid JSON: {e}"),
    };
    reject(pos, rec, DeadLetterKind::MalformedJson, reason)
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
        .with_ignore_type_conflicts(true)
        .build_decoder()
        .map_err(|e| EngineError::arrow(format!("JSON decoder for source {name}"), e))
}

/// The first `RECORD_PREVIEW` bytes of a record, as text.
pub fn preview(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(RECORD_PREVIEW)]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::AsArray;
    use arrow::datatypes::DataType;

    fn decoder() -> JsonRecords {
        let item = Arc::new(Field::new("item", DataType::Float32, true));
        let schema = Arc::new(Schema::new(vec![
            Field::new("u", DataType::Utf8, false),
            Field::new("n", DataType::Int64, true),
            Field::new("v", DataType::FixedSizeList(item, 2), true),
        ]));
        JsonRecords::new("s", schema).unwrap()
    }

    type Bad = Vec<(u64, DeadLetterKind, String)>;

    fn decode(records: &[&str]) -> (Vec<(u64, String)>, Bad) {
        let (buf, spans) = spans_of(records);
        let mut rejected = Vec::new();
        let out = decoder()
            .decode(&buf, &spans, &test_reject, &mut rejected)
            .unwrap();
        let rows = out
            .map(|(b, rows)| {
                let u = b.column(0).as_string::<i32>();
                rows.iter()
                    .enumerate()
                    .map(|(i, r)| (spans[*r].pos, u.value(i).to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let mut bad: Vec<(u64, DeadLetterKind, String)> = rejected
            .into_iter()
            .map(|d| (d.position.parse().unwrap(), d.kind, d.reason))
            .collect();
        bad.sort_by_key(|b| b.0);
        (rows, bad)
    }

    #[test]
    fn no_row_is_attributed_to_another_record() {
        // Two objects in one message, then an empty one: the row count of
        // the chunk equals the record count, yet neither is one object.
        let (rows, bad) = decode(&[r#"{"u":"a"}{"u":"b"}"#, "", r#"{"u":"c"}"#]);
        assert_eq!(rows, vec![(2, "c".to_string())]);
        let kinds: Vec<(u64, DeadLetterKind)> = bad.iter().map(|b| (b.0, b.1)).collect();
        assert_eq!(
            kinds,
            vec![
                (0, DeadLetterKind::MalformedJson),
                (1, DeadLetterKind::MalformedJson)
            ]
        );
        assert!(bad[0].2.contains("more than one"), "{}", bad[0].2);
        assert!(bad[1].2.contains("empty"), "{}", bad[1].2);
        // One object split over two messages.
        let (rows, bad) = decode(&[r#"{"u":"#, r#""a"}"#, r#"{"u":"b"}"#]);
        assert_eq!(rows, vec![(2, "b".to_string())]);
        assert_eq!(bad.len(), 2);
    }

    #[test]
    fn values_that_do_not_fit_are_wrong_type_and_the_rest_stay() {
        let (rows, bad) = decode(&[
            r#"{"u":"a","n":1}"#,
            r#"{"u":"b","n":"x"}"#,
            r#"{"u":"c","n":null}"#,
            r#"{"u":"d"}"#,
            r#"{"u":"e","v":[1e39, 0]}"#,
            r#"{"u":"f","v":[1, 2]}"#,
            r#"{"n":2}"#,
            r#"{"\u006e":"y","u":"g"}"#,
        ]);
        let names: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
        assert_eq!(names, ["a", "c", "d", "f"]);
        let kinds: Vec<(u64, DeadLetterKind)> = bad.iter().map(|b| (b.0, b.1)).collect();
        assert_eq!(
            kinds,
            vec![
                (1, DeadLetterKind::WrongType),
                (4, DeadLetterKind::WrongType),
                (6, DeadLetterKind::MissingField),
                (7, DeadLetterKind::WrongType),
            ]
        );
        assert!(bad[1].2.contains("`v`"), "{}", bad[1].2);
    }

    #[test]
    fn bad_records_spread_through_a_poll_cost_linear_time() {
        // Alternating good and bad records, 20,000 of them: the slow path
        // decodes each record a bounded number of times.
        let mut recs = Vec::new();
        for i in 0..20_000 {
            recs.push(if i % 2 == 0 {
                format!(r#"{{"u":"k{i}","n":{i}}}"#)
            } else {
                format!("not json {i}")
            });
        }
        let refs: Vec<&str> = recs.iter().map(String::as_str).collect();
        let t0 = std::time::Instant::now();
        let (rows, bad) = decode(&refs);
        assert_eq!((rows.len(), bad.len()), (10_000, 10_000));
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            t0.elapsed()
        );
    }
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
