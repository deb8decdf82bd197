//! Avro payloads of Kafka sources (`format = 'avro'`), decoded straight
//! into Arrow by arrow-avro, record by record so one that does not decode
//! is dead-lettered alone.
//!
//! The source's `schema` file is the reader schema: its fields, resolved
//! by name, become the declared columns. Records are framed as Confluent's
//! serializers write them (`framing = 'confluent'`: a zero byte and a
//! 4-byte big-endian schema id before the Avro body) or carry the body
//! alone (`framing = 'none'`). The writer schema of an id is the file's
//! own unless `schema.<id> = 'FILE'` options name writer schemas; then
//! only those ids are read (a record with another id is dead-lettered) and
//! each is resolved to the reader schema by Avro's rules (fields added
//! with defaults, removed, reordered, promoted `int` → `long` → `double`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, new_null_array};
use arrow::compute::{CastOptions, cast_with_options, concat_batches};
use arrow::datatypes::{DataType, Schema, SchemaRef};
use arrow_avro::reader::{Decoder, ReaderBuilder};
use arrow_avro::schema::{AvroSchema, Fingerprint, FingerprintAlgorithm, SchemaStore};
use sluice_engine::{DeadLetter, DeadLetterKind, EngineError, Result};

use crate::json::{Reject, Span};
use crate::rows::{BadRows, keep_good_rows, mark_bad_rows, mark_non_finite};

mod shape;
use shape::Shape;

/// Rows decoded before a decoder's batch is flushed.
const DECODER_ROWS: usize = 8192;

/// The schema id each decoder knows its one writer schema by. Records are
/// fed as this 5-byte prefix and then their body, so bytes left over after
/// a record are taken for the next prefix and fail (an unknown id, no zero
/// byte), unless they are exactly this prefix: hence an unlikely id.
const DECODER_ID: u32 = 0x51CE_A7D0;

/// How records are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Confluent's wire format: byte 0, a 4-byte big-endian schema id, the body.
    Confluent,
    /// The Avro body alone.
    None,
}

/// The Avro options of a Kafka source.
#[derive(Debug, Clone)]
pub struct AvroOptions {
    /// `schema`: the reader schema (`.avsc`), resolved against the
    /// pipeline's folder.
    pub schema: PathBuf,
    /// `framing` (default `confluent`).
    pub framing: Framing,
    /// `schema.<id>`: writer schemas by Confluent schema id.
    pub writers: BTreeMap<u32, PathBuf>,
}

/// A schema file's text, parsed and checked by building a decoder from it.
fn load(path: &Path) -> std::result::Result<AvroSchema, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read Avro schema {}: {e}", path.display()))?;
    serde_json::from_str::<serde_json::Value>(&text)
        .map_err(|e| format!("{} is not an Avro schema (JSON): {e}", path.display()))?;
    Ok(AvroSchema::new(text))
}

fn decoder(
    reader: &AvroSchema,
    writer: &AvroSchema,
    rows: usize,
) -> std::result::Result<Decoder, String> {
    let mut store = SchemaStore::new_with_type(FingerprintAlgorithm::Id);
    store
        .set(Fingerprint::Id(DECODER_ID), writer.clone())
        .map_err(|e| e.to_string())?;
    ReaderBuilder::new()
        .with_batch_size(rows)
        .with_reader_schema(reader.clone())
        .with_writer_schema_store(store)
        .with_active_fingerprint(Fingerprint::Id(DECODER_ID))
        .build_decoder()
        .map_err(|e| e.to_string())
}

/// The SQL name of a declared type, for errors.
fn sql_type(t: &DataType) -> String {
    match t {
        DataType::Utf8 => "TEXT".into(),
        DataType::Float64 => "DOUBLE".into(),
        DataType::Float32 => "FLOAT".into(),
        DataType::Int64 => "BIGINT".into(),
        DataType::Int32 => "INT".into(),
        DataType::Int16 => "SMALLINT".into(),
        DataType::Boolean => "BOOLEAN".into(),
        DataType::Timestamp(..) => "TIMESTAMP".into(),
        DataType::Date32 => "DATE".into(),
        DataType::FixedSizeList(_, n) => format!("FLOAT[{n}]"),
        other => other.to_string(),
    }
}

/// Whether an Avro-decoded column of type `got` can fill a declared column
/// of type `want` (values that do not fit are then rejected row by row).
fn fits(want: &DataType, got: &DataType) -> bool {
    use DataType as T;
    let text = |t: &T| {
        matches!(t, T::Utf8 | T::LargeUtf8 | T::Utf8View)
            || matches!(t, T::Dictionary(_, v) if matches!(v.as_ref(), T::Utf8 | T::LargeUtf8))
    };
    match want {
        T::Utf8 => text(got),
        T::Int64 => matches!(got, T::Int32 | T::Int64),
        T::Int32 | T::Int16 => matches!(got, T::Int32),
        T::Float64 => matches!(got, T::Float32 | T::Float64 | T::Int32 | T::Int64),
        T::Float32 => matches!(got, T::Float32 | T::Int32),
        T::Boolean => matches!(got, T::Boolean),
        T::Date32 => matches!(got, T::Date32),
        T::Timestamp(..) => matches!(got, T::Timestamp(..)),
        T::FixedSizeList(..) => match got {
            T::List(f) | T::LargeList(f) | T::FixedSizeList(f, _) => {
                matches!(f.data_type(), T::Float32 | T::Float64)
            }
            _ => false,
        },
        _ => false,
    }
}

/// Checks the declared payload columns against what the reader schema
/// decodes to; the error names the column, both types and the file.
fn check_columns(
    payload: &Schema,
    decoded: &Schema,
    file: &Path,
) -> std::result::Result<(), String> {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| file.display().to_string());
    for f in payload.fields() {
        let Ok(got) = decoded.field_with_name(f.name()) else {
            let fields: Vec<&str> = decoded.fields().iter().map(|f| f.name().as_str()).collect();
            return Err(format!(
                "column `{}` is not a field of the Avro schema {name} (its fields: {})",
                f.name(),
                fields.join(", ")
            ));
        };
        if !fits(f.data_type(), got.data_type()) {
            return Err(format!(
                "column `{}` is {} in the pipeline but {} in the Avro schema {name}",
                f.name(),
                sql_type(f.data_type()),
                got.data_type()
            ));
        }
    }
    Ok(())
}

/// The reader schema and the writer schemas by id (with their files).
type Schemas = (AvroSchema, BTreeMap<u32, (AvroSchema, String)>);

/// Loads and checks the schemas of `o` for a source of `payload` columns:
/// every file is an Avro schema, each writer schema resolves to the reader
/// schema, and the reader schema decodes to types that fill the columns.
/// The error is a message for the option it names (`schema` or
/// `schema.<id>`).
fn load_checked(
    o: &AvroOptions,
    payload: &Schema,
) -> std::result::Result<Schemas, (String, String)> {
    let reader = load(&o.schema).map_err(|e| ("schema".to_string(), e))?;
    let d = decoder(&reader, &reader, 1).map_err(|e| {
        (
            "schema".to_string(),
            format!("{} is not a usable Avro schema: {e}", o.schema.display()),
        )
    })?;
    check_columns(payload, &d.schema(), &o.schema).map_err(|e| ("schema".to_string(), e))?;
    let mut writers = BTreeMap::new();
    for (id, path) in &o.writers {
        let key = format!("schema.{id}");
        let w = load(path).map_err(|e| (key.clone(), e))?;
        decoder(&reader, &w, 1).map_err(|e| {
            (
                key.clone(),
                format!(
                    "writer schema {} does not resolve to the reader schema {}: {e}",
                    path.display(),
                    o.schema.display()
                ),
            )
        })?;
        writers.insert(*id, (w, path.display().to_string()));
    }
    Ok((reader, writers))
}

/// [`load_checked`] at plan time: whether the schemas of `o` fit.
pub(crate) fn check(
    o: &AvroOptions,
    payload: &Schema,
) -> std::result::Result<(), (String, String)> {
    load_checked(o, payload).map(|_| ())
}

/// Decodes a source's Avro records into batches of its payload columns.
pub(crate) struct AvroRecords {
    source: String,
    payload: SchemaRef,
    framing: Framing,
    reader: AvroSchema,
    reader_label: String,
    /// Writer schemas by id; empty: the reader schema for every id.
    writers: BTreeMap<u32, (AvroSchema, String)>,
    /// One decoder per writer schema (`None`: the reader schema's own).
    decoders: HashMap<Option<u32>, Decoder>,
    /// The encoding each writer schema gives a record: records are checked
    /// against it before they reach a decoder, so one that would stop the
    /// decoder part-way (or fail its batch, as a string that is not UTF-8
    /// does) is dead-lettered without rebuilding the decoder.
    shapes: HashMap<Option<u32>, Shape>,
}

impl AvroRecords {
    /// A decoder for a source's payload columns.
    pub(crate) fn new(source: &str, payload: SchemaRef, o: &AvroOptions) -> Result<Self> {
        let (reader, writers) =
            load_checked(o, &payload).map_err(|(_, m)| EngineError::Connector {
                what: format!("source {source}"),
                message: m,
            })?;
        let mut shapes = HashMap::new();
        if let Some(s) = Shape::of(&reader.json_string) {
            shapes.insert(None, s);
        }
        for (id, (w, _)) in &writers {
            if let Some(s) = Shape::of(&w.json_string) {
                shapes.insert(Some(*id), s);
            }
        }
        Ok(AvroRecords {
            source: source.to_string(),
            payload,
            framing: o.framing,
            reader,
            reader_label: o.schema.display().to_string(),
            writers,
            decoders: HashMap::new(),
            shapes,
        })
    }

    /// The writer schema key of a record and its Avro body, or why not.
    fn frame<'a>(&self, payload: &'a [u8]) -> std::result::Result<(Option<u32>, &'a [u8]), String> {
        match self.framing {
            Framing::None => Ok((None, payload)),
            Framing::Confluent => {
                if payload.len() < 5 || payload[0] != 0 {
                    return Err(
                        "not in Confluent framing (a zero byte, then a 4-byte schema id)".into(),
                    );
                }
                let id = u32::from_be_bytes([payload[1], payload[2], payload[3], payload[4]]);
                if self.writers.is_empty() {
                    return Ok((None, &payload[5..]));
                }
                if self.writers.contains_key(&id) {
                    Ok((Some(id), &payload[5..]))
                } else {
                    let ids: Vec<String> = self.writers.keys().map(u32::to_string).collect();
                    Err(format!(
                        "schema id {id} has no writer schema (the source maps ids {})",
                        ids.join(", ")
                    ))
                }
            }
        }
    }

    fn fresh(&self, key: Option<u32>) -> Result<Decoder> {
        let writer = match key.and_then(|id| self.writers.get(&id)) {
            Some((w, _)) => w,
            None => &self.reader,
        };
        decoder(&self.reader, writer, DECODER_ROWS).map_err(|m| EngineError::Connector {
            what: format!("source {}", self.source),
            message: m,
        })
    }

    fn writer_label(&self, key: Option<u32>) -> String {
        match key.and_then(|id| self.writers.get(&id).map(|w| (id, w))) {
            Some((id, (_, path))) => format!("writer schema {id} ({path})"),
            None => format!("schema {}", self.reader_label),
        }
    }

    /// Decodes the records `spans` of `buf`. Returns the rows that decode
    /// and fit the columns, and for each row the index of its span; the
    /// others go to `rejected`.
    pub(crate) fn decode(
        &mut self,
        buf: &[u8],
        spans: &[Span],
        reject: Reject<'_>,
        rejected: &mut Vec<DeadLetter>,
    ) -> Result<Option<(RecordBatch, Vec<usize>)>> {
        let mut batches: Vec<RecordBatch> = Vec::new();
        let mut rows: Vec<usize> = Vec::with_capacity(spans.len());
        // The decoder in use, its writer key and the spans it holds.
        let mut cur: Option<(Option<u32>, Decoder, Vec<usize>)> = None;
        for (i, sp) in spans.iter().enumerate() {
            let record = &buf[sp.start..sp.end];
            let (key, body) = match self.frame(record) {
                Ok(f) => f,
                Err(reason) => {
                    rejected.push(reject(
                        sp.pos,
                        record,
                        DeadLetterKind::MalformedRecord,
                        reason,
                    ));
                    continue;
                }
            };
            if let Some(Err(reason)) = self.shapes.get(&key).map(|s| s.check(body)) {
                rejected.push(reject(
                    sp.pos,
                    record,
                    DeadLetterKind::MalformedRecord,
                    format!("does not decode with {}: {reason}", self.writer_label(key)),
                ));
                continue;
            }
            if cur.as_ref().is_some_and(|c| c.0 != key)
                && let Some((k, d, held)) = cur.take()
            {
                self.finish(k, d, held, &mut batches, &mut rows)?;
            }
            if cur.is_none() {
                let d = match self.decoders.remove(&key) {
                    Some(d) => d,
                    None => self.fresh(key)?,
                };
                cur = Some((key, d, Vec::new()));
            }
            let Some((_, d, held)) = cur.as_mut() else {
                continue;
            };
            if d.batch_is_full() {
                flush(d, held, &mut batches, &mut rows)?;
            }
            match feed(d, body) {
                Ok(()) => held.push(i),
                Err(reason) => {
                    rejected.push(reject(
                        sp.pos,
                        record,
                        DeadLetterKind::MalformedRecord,
                        format!("does not decode with {}: {reason}", self.writer_label(key)),
                    ));
                    // The decoder may hold part of the record: a fresh one
                    // takes the records before it again and hands them on
                    // at once, so no record is decoded more than twice
                    // however the bad ones are spread (linear in the poll).
                    // Records whose shape is wrong never get here: this is
                    // for values the decoder refuses (an unknown enum
                    // symbol's default, a UUID that does not parse).
                    let mut fresh = self.fresh(key)?;
                    for &j in held.iter() {
                        let r = &buf[spans[j].start..spans[j].end];
                        let b = self.frame(r).map(|(_, b)| b).unwrap_or(r);
                        feed(&mut fresh, b).map_err(|m| EngineError::Connector {
                            what: format!("source {}", self.source),
                            message: format!("re-decoding a record that decoded before: {m}"),
                        })?;
                    }
                    *d = fresh;
                    flush(d, held, &mut batches, &mut rows)?;
                }
            }
        }
        if let Some((k, d, held)) = cur.take() {
            self.finish(k, d, held, &mut batches, &mut rows)?;
        }
        if batches.is_empty() {
            return Ok(None);
        }
        let schema = batches[0].schema();
        let all = concat_batches(&schema, &batches)
            .map_err(|e| EngineError::arrow(format!("source {}", self.source), e))?;
        self.conform(&all, rows, buf, spans, reject, rejected)
    }

    fn finish(
        &mut self,
        key: Option<u32>,
        mut d: Decoder,
        mut held: Vec<usize>,
        batches: &mut Vec<RecordBatch>,
        rows: &mut Vec<usize>,
    ) -> Result<()> {
        flush(&mut d, &mut held, batches, rows)?;
        self.decoders.insert(key, d);
        Ok(())
    }

    /// Casts the decoded columns to the declared ones; a row with a NULL
    /// in a NOT NULL column, or a value its column cannot hold, is
    /// rejected.
    fn conform(
        &self,
        all: &RecordBatch,
        rows: Vec<usize>,
        buf: &[u8],
        spans: &[Span],
        reject: Reject<'_>,
        rejected: &mut Vec<DeadLetter>,
    ) -> Result<Option<(RecordBatch, Vec<usize>)>> {
        let n = all.num_rows();
        let opts = CastOptions {
            safe: true,
            ..Default::default()
        };
        let mut bad: BadRows = vec![None; n];
        let mut cols: Vec<ArrayRef> = Vec::with_capacity(self.payload.fields().len());
        for f in self.payload.fields() {
            let src = all.column_by_name(f.name());
            let col = match src {
                Some(c) if c.data_type() == f.data_type() => Arc::clone(c),
                Some(c) => cast_with_options(c, f.data_type(), &opts).map_err(|e| {
                    EngineError::arrow(format!("source {}: column `{}`", self.source, f.name()), e)
                })?,
                None => new_null_array(f.data_type(), n),
            };
            mark_bad_rows(f, src, &col, &mut bad);
            mark_non_finite(f, &col, &mut bad);
            cols.push(col);
        }
        let ctx = format!("source {}", self.source);
        if bad.iter().all(Option::is_none) {
            let batch = RecordBatch::try_new(Arc::clone(&self.payload), cols)
                .map_err(|e| EngineError::arrow(&ctx, e))?;
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
        let Some(batch) = keep_good_rows(&self.payload, cols, &bad, &ctx)? else {
            return Ok(None);
        };
        let rows = rows
            .into_iter()
            .zip(&bad)
            .filter(|(_, b)| b.is_none())
            .map(|(r, _)| r)
            .collect();
        Ok(Some((batch, rows)))
    }
}

/// Feeds one record body to `d`: exactly one row must come out of exactly
/// these bytes.
fn feed(d: &mut Decoder, body: &[u8]) -> std::result::Result<(), String> {
    let before = d.capacity();
    let id = DECODER_ID.to_be_bytes();
    let prefix = [0u8, id[0], id[1], id[2], id[3]];
    match d.decode(&prefix) {
        Ok(5) => {}
        Ok(_) => return Err("the decoder did not take the record's start".into()),
        Err(e) => return Err(e.to_string()),
    }
    let res = d.decode(body);
    let decoded = d.capacity() + 1 == before;
    match (res, decoded) {
        (Ok(used), true) if used == body.len() => Ok(()),
        (Ok(used), true) => Err(format!(
            "{} bytes left over after the record's {used}",
            body.len() - used
        )),
        // A whole record, then bytes that are not another one.
        (Err(_), true) => Err("bytes left over after the record".into()),
        (Ok(_), false) => Err(format!("the record ends early ({} bytes)", body.len())),
        (Err(e), false) => Err(e.to_string()),
    }
}

fn flush(
    d: &mut Decoder,
    held: &mut Vec<usize>,
    batches: &mut Vec<RecordBatch>,
    rows: &mut Vec<usize>,
) -> Result<()> {
    if held.is_empty() {
        return Ok(());
    }
    let b = d
        .flush()
        .map_err(|e| EngineError::Connector {
            what: "Avro decoder".into(),
            message: e.to_string(),
        })?
        .ok_or_else(|| EngineError::Connector {
            what: "Avro decoder".into(),
            message: format!("{} decoded records were lost", held.len()),
        })?;
    if b.num_rows() != held.len() {
        return Err(EngineError::Connector {
            what: "Avro decoder".into(),
            message: format!("{} rows from {} decoded records", b.num_rows(), held.len()),
        });
    }
    batches.push(b);
    rows.append(held);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::{spans_of, test_reject};
    use arrow::datatypes::{Field, TimeUnit};

    fn zigzag(v: i64, out: &mut Vec<u8>) {
        let mut z = ((v << 1) ^ (v >> 63)) as u64;
        loop {
            let b = (z & 0x7f) as u8;
            z >>= 7;
            if z == 0 {
                out.push(b);
                break;
            }
            out.push(b | 0x80);
        }
    }

    /// A record of the test schema, encoded by hand from the Avro spec.
    fn record(user: &str, price: Option<f64>, ts: i64) -> Vec<u8> {
        let mut out = Vec::new();
        zigzag(user.len() as i64, &mut out);
        out.extend_from_slice(user.as_bytes());
        match price {
            None => zigzag(0, &mut out),
            Some(p) => {
                zigzag(1, &mut out);
                out.extend_from_slice(&p.to_le_bytes());
            }
        }
        zigzag(ts, &mut out);
        out
    }

    const SCHEMA: &str = r#"{"type":"record","name":"Click","fields":[
        {"name":"user_id","type":"string"},
        {"name":"price","type":["null","double"],"default":null},
        {"name":"ts","type":{"type":"long","logicalType":"timestamp-millis"}}]}"#;

    fn payload() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("user_id", DataType::Utf8, false),
            Field::new("price", DataType::Float64, true),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                false,
            ),
        ]))
    }

    fn options(dir: &Path, framing: Framing) -> AvroOptions {
        let p = dir.join("click.avsc");
        std::fs::write(&p, SCHEMA).expect("schema");
        AvroOptions {
            schema: p,
            framing,
            writers: BTreeMap::new(),
        }
    }

    #[test]
    fn bad_records_are_rejected_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = AvroRecords::new("s", payload(), &options(dir.path(), Framing::Confluent))
            .expect("records");
        let framed = |body: Vec<u8>| {
            let mut v = vec![0, 0, 0, 0, 7];
            v.extend(body);
            v
        };
        let good1 = framed(record("u1", Some(2.5), 1000));
        let mut truncated = framed(record("u2", Some(1.0), 2000));
        truncated.truncate(truncated.len() - 3);
        let good2 = framed(record("u3", None, 3000));
        let mut extra = framed(record("u4", None, 4000));
        extra.push(9);
        let unframed = record("u5", None, 5000);
        let good3 = framed(record("u6", Some(-1.0), 6000));
        // A string that is not UTF-8 decodes, but fails the batch it is in.
        let mut latin1 = framed(record("uX", Some(1.0), 7000));
        let x = latin1.iter().position(|b| *b == b'X').expect("X");
        latin1[x] = 0xE9;
        let (buf, spans) = spans_of(&[good1, truncated, good2, extra, unframed, good3, latin1]);
        let mut rejected = Vec::new();
        let (b, rows) = a
            .decode(&buf, &spans, &test_reject, &mut rejected)
            .expect("decode")
            .expect("rows");
        assert_eq!(rows, vec![0, 2, 5]);
        assert_eq!(b.num_rows(), 3);
        let users = b
            .column(0)
            .as_any()
            .downcast_ref::<arrow::array::StringArray>();
        let users: Vec<&str> = users.expect("text").iter().flatten().collect();
        assert_eq!(users, ["u1", "u3", "u6"]);
        assert_eq!(b.column(1).null_count(), 1);
        let kinds: Vec<_> = rejected
            .iter()
            .map(|d| (d.position.clone(), d.kind))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("1".to_string(), DeadLetterKind::MalformedRecord),
                ("3".to_string(), DeadLetterKind::MalformedRecord),
                ("4".to_string(), DeadLetterKind::MalformedRecord),
                ("6".to_string(), DeadLetterKind::MalformedRecord),
            ]
        );
        assert!(rejected[3].reason.contains("UTF-8"), "{:?}", rejected[3]);
        assert!(
            rejected[0].reason.contains("ends early"),
            "{:?}",
            rejected[0]
        );
        assert!(
            rejected[1].reason.contains("left over"),
            "{:?}",
            rejected[1]
        );
        assert!(
            rejected[2].reason.contains("Confluent"),
            "{:?}",
            rejected[2]
        );
        // The next poll decodes on.
        let (buf, spans) = spans_of(&[framed(record("u7", Some(3.0), 7000))]);
        let (b, _) = a
            .decode(&buf, &spans, &test_reject, &mut rejected)
            .expect("decode")
            .expect("rows");
        assert_eq!(b.num_rows(), 1);
    }

    #[test]
    fn unframed_records_and_mapped_ids() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a =
            AvroRecords::new("s", payload(), &options(dir.path(), Framing::None)).expect("records");
        let (buf, spans) = spans_of(&[record("u1", None, 1), vec![0xff, 0xff]]);
        let mut rejected = Vec::new();
        let (b, rows) = a
            .decode(&buf, &spans, &test_reject, &mut rejected)
            .expect("decode")
            .expect("rows");
        assert_eq!((b.num_rows(), rows), (1, vec![0]));
        assert_eq!(rejected.len(), 1, "{rejected:?}");

        // With schema.<id> options only the mapped ids are read.
        let mut o = options(dir.path(), Framing::Confluent);
        o.writers.insert(3, o.schema.clone());
        let mut a = AvroRecords::new("s", payload(), &o).expect("records");
        let framed = |id: u32, body: Vec<u8>| {
            let mut v = vec![0];
            v.extend_from_slice(&id.to_be_bytes());
            v.extend(body);
            v
        };
        let (buf, spans) = spans_of(&[
            framed(3, record("u1", Some(1.0), 1)),
            framed(4, record("u2", Some(1.0), 2)),
        ]);
        let mut rejected = Vec::new();
        let (b, _) = a
            .decode(&buf, &spans, &test_reject, &mut rejected)
            .expect("decode")
            .expect("rows");
        assert_eq!(b.num_rows(), 1);
        assert!(
            rejected[0]
                .reason
                .contains("schema id 4 has no writer schema"),
            "{rejected:?}"
        );
    }

    #[test]
    fn columns_are_checked_against_the_schema() {
        let dir = tempfile::tempdir().expect("tempdir");
        let o = options(dir.path(), Framing::None);
        let wrong = Arc::new(Schema::new(vec![Field::new(
            "user_id",
            DataType::Int64,
            false,
        )]));
        let e = check(&o, &wrong).expect_err("type");
        assert!(e.1.contains("column `user_id` is BIGINT"), "{e:?}");
        let missing = Arc::new(Schema::new(vec![Field::new("item", DataType::Utf8, true)]));
        let e = check(&o, &missing).expect_err("missing");
        assert!(
            e.1.contains("not a field") && e.1.contains("user_id, price, ts"),
            "{e:?}"
        );
        assert!(check(&o, &payload()).is_ok());
    }
}
