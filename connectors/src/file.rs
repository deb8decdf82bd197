//! JSON-lines file source. Bounded: it ends at the end of the file. Each
//! record's line number is its position in dead letters; the byte offset
//! after the last returned line is the resume position.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{Array, BooleanArray, RecordBatch};
use arrow::compute::{concat_batches, filter_record_batch};
use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::json::ReaderBuilder;
use arrow::json::reader::Decoder;
use sluice_engine::{DeadLetter, EngineError, Poll, Result, Source, SourceBatch};
use sluice_sql::SourcePlan;

/// Largest record accepted unless `max_record_bytes` says otherwise.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 1 << 20;
const RECORD_PREVIEW: usize = 4096;

/// A JSON-lines file read from start to end.
pub struct JsonFileSource {
    name: String,
    path: PathBuf,
    label: String,
    schema: SchemaRef,
    decode_schema: SchemaRef,
    reader: Option<BufReader<File>>,
    offset: u64,
    line: u64,
    max_record_bytes: usize,
    decoder: Decoder,
    buf: Vec<u8>,
}

impl JsonFileSource {
    /// A source for a planned `connector = 'file'` source.
    pub fn new(plan: &SourcePlan) -> Result<Self> {
        let path = PathBuf::from(plan.options.get("path").cloned().unwrap_or_default());
        let max_record_bytes = plan
            .options
            .get("max_record_bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_MAX_RECORD_BYTES);
        // Decode with every column nullable, then check NOT NULL ourselves so a
        // missing field is a dead letter with a reason, not a failed batch.
        let decode_schema = Arc::new(Schema::new(
            plan.schema
                .fields()
                .iter()
                .map(|f| Field::new(f.name(), f.data_type().clone(), true))
                .collect::<Vec<_>>(),
        ));
        let label = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        let decoder = new_decoder(&decode_schema, &plan.name)?;
        Ok(JsonFileSource {
            name: plan.name.clone(),
            path,
            label,
            schema: Arc::clone(&plan.schema),
            decode_schema,
            reader: None,
            offset: 0,
            line: 0,
            max_record_bytes,
            decoder,
            buf: Vec::new(),
        })
    }

    fn io(&self, e: std::io::Error) -> EngineError {
        EngineError::Io {
            path: self.path.display().to_string(),
            source: e,
        }
    }

    fn reject(&self, line: u64, bytes: &[u8], kind: &str, reason: String) -> DeadLetter {
        let cut = &bytes[..bytes.len().min(RECORD_PREVIEW)];
        DeadLetter {
            source: self.name.clone(),
            position: format!("{}:{line}", self.label),
            kind: kind.to_string(),
            reason,
            record: String::from_utf8_lossy(cut).into_owned(),
        }
    }

    fn classify(&self, line_no: u64, line: &[u8], err: &arrow::error::ArrowError) -> DeadLetter {
        match serde_json::from_slice::<serde_json::Value>(line) {
            Ok(serde_json::Value::Object(_)) => self.reject(
                line_no,
                line,
                "wrong_type",
                format!("a field does not fit the declared schema: {err}"),
            ),
            Ok(_) => self.reject(
                line_no,
                line,
                "malformed_json",
                "the record is valid JSON but not an object".into(),
            ),
            Err(e) => self.reject(
                line_no,
                line,
                "malformed_json",
                format!("not valid JSON: {e}"),
            ),
        }
    }

    /// Decodes lines one at a time (after a batch failed) to find the bad ones.
    fn decode_each(
        &mut self,
        lines: &[(usize, usize, u64)],
        rejected: &mut Vec<DeadLetter>,
    ) -> Result<(Vec<RecordBatch>, Vec<u64>)> {
        let mut batches = Vec::new();
        let mut positions = Vec::new();
        let buf = std::mem::take(&mut self.buf);
        for &(s, e, no) in lines {
            let line = &buf[s..e];
            let r = self.decoder.decode(line).and_then(|_| self.decoder.flush());
            match r {
                Ok(Some(b)) if b.num_rows() == 1 => {
                    batches.push(b);
                    positions.push(no);
                }
                Ok(_) => {
                    rejected.push(self.reject(
                        no,
                        line,
                        "malformed_json",
                        "the line holds no single JSON object".into(),
                    ));
                    self.decoder = new_decoder(&self.decode_schema, &self.name)?;
                }
                Err(err) => {
                    rejected.push(self.classify(no, line, &err));
                    self.decoder = new_decoder(&self.decode_schema, &self.name)?;
                }
            }
        }
        self.buf = buf;
        Ok((batches, positions))
    }
}

fn new_decoder(schema: &SchemaRef, name: &str) -> Result<Decoder> {
    ReaderBuilder::new(Arc::clone(schema))
        .with_batch_size(1 << 20)
        .build_decoder()
        .map_err(|e| EngineError::arrow(format!("JSON decoder for source {name}"), e))
}

impl Source for JsonFileSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn seek(&mut self, position: Option<&[u8]>) -> Result<()> {
        let (offset, line) = match position.map(|p| String::from_utf8_lossy(p).into_owned()) {
            None => (0, 0),
            Some(p) => {
                let mut it = p.split(':');
                let o = it.next().and_then(|x| x.parse().ok());
                let l = it.next().and_then(|x| x.parse().ok());
                match (o, l) {
                    (Some(o), Some(l)) => (o, l),
                    _ => {
                        return Err(EngineError::Connector {
                            what: format!("source {}", self.name),
                            message: format!("bad checkpointed position `{p}`"),
                        });
                    }
                }
            }
        };
        let mut f = File::open(&self.path).map_err(|e| self.io(e))?;
        f.seek(SeekFrom::Start(offset)).map_err(|e| self.io(e))?;
        self.reader = Some(BufReader::with_capacity(1 << 20, f));
        self.offset = offset;
        self.line = line;
        Ok(())
    }

    fn poll(&mut self, max_rows: usize) -> Result<Poll> {
        if self.reader.is_none() {
            self.seek(None)?;
        }
        let mut rejected = Vec::new();
        let mut lines: Vec<(usize, usize, u64)> = Vec::new();
        self.buf.clear();
        let mut eof = false;
        while lines.len() < max_rows {
            let start = self.buf.len();
            let Some(reader) = self.reader.as_mut() else {
                break;
            };
            let n = reader
                .read_until(b'\n', &mut self.buf)
                .map_err(|e| EngineError::Io {
                    path: self.path.display().to_string(),
                    source: e,
                })?;
            if n == 0 {
                eof = true;
                break;
            }
            self.offset += n as u64;
            self.line += 1;
            let mut end = self.buf.len();
            while end > start && matches!(self.buf[end - 1], b'\n' | b'\r') {
                end -= 1;
            }
            let line = &self.buf[start..end];
            if line.iter().all(u8::is_ascii_whitespace) {
                self.buf.truncate(start);
                continue;
            }
            if line.len() > self.max_record_bytes {
                let d = self.reject(
                    self.line,
                    line,
                    "oversized",
                    format!(
                        "record of {} bytes exceeds max_record_bytes = {}",
                        line.len(),
                        self.max_record_bytes
                    ),
                );
                rejected.push(d);
                self.buf.truncate(start);
                continue;
            }
            lines.push((start, end, self.line));
        }
        if lines.is_empty() {
            return Ok(if eof && rejected.is_empty() {
                Poll::End
            } else {
                Poll::Data {
                    batch: None,
                    rejected,
                }
            });
        }
        // Fast path: the whole chunk at once.
        let fast = match self.decoder.decode(&self.buf) {
            Ok(used) if used == self.buf.len() => match self.decoder.flush() {
                Ok(Some(b)) if b.num_rows() == lines.len() => Some(b),
                _ => None,
            },
            _ => None,
        };
        let (batch, positions) = match fast {
            Some(b) => (b, lines.iter().map(|l| l.2).collect::<Vec<_>>()),
            None => {
                self.decoder = new_decoder(&self.decode_schema, &self.name)?;
                let (bs, pos) = self.decode_each(&lines, &mut rejected)?;
                if bs.is_empty() {
                    return Ok(Poll::Data {
                        batch: None,
                        rejected,
                    });
                }
                let b = concat_batches(&self.decode_schema, &bs)
                    .map_err(|e| EngineError::arrow("joining decoded rows", e))?;
                (b, pos)
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
                    let no = positions[r];
                    let raw = lines
                        .iter()
                        .find(|l| l.2 == no)
                        .map(|l| self.buf[l.0..l.1].to_vec())
                        .unwrap_or_default();
                    rejected.push(self.reject(
                        no,
                        &raw,
                        "missing_field",
                        format!("required field `{}` is missing or null", f.name()),
                    ));
                }
            }
        }
        let (batch, positions) = match keep {
            None => (batch, positions),
            Some(k) => {
                let pos = positions
                    .iter()
                    .zip(&k)
                    .filter(|(_, k)| **k)
                    .map(|(p, _)| *p)
                    .collect();
                let b = filter_record_batch(&batch, &BooleanArray::from(k))
                    .map_err(|e| EngineError::arrow("dropping rows with missing fields", e))?;
                (b, pos)
            }
        };
        let batch = RecordBatch::try_new(Arc::clone(&self.schema), batch.columns().to_vec())
            .map_err(|e| EngineError::arrow(format!("source {}", self.name), e))?;
        let batch = (batch.num_rows() > 0).then_some(SourceBatch {
            batch,
            row_positions: positions,
        });
        // Report rejects in file order.
        rejected.sort_by_key(|d| {
            d.position
                .rsplit(':')
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        });
        Ok(Poll::Data { batch, rejected })
    }

    fn position(&self) -> Vec<u8> {
        format!("{}:{}", self.offset, self.line).into_bytes()
    }

    fn describe_position(&self, pos: u64) -> String {
        format!("{}:{pos}", self.label)
    }
}
