//! Bounded history for backfills: JSON-lines, Parquet and CSV files, named
//! by path, glob (`*`, `?`, `**`) or folder (read recursively, Hive
//! `column=value` folders filling columns the files lack), read one after
//! the other in path order.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, RecordBatch, StringArray, TimestampMillisecondArray, new_null_array,
};
use arrow::compute::{CastOptions, cast_with_options};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use sluice_engine::output::features_json;
use sluice_engine::training::time_millis;
use sluice_engine::{DeadLetter, EngineError, Poll, Result, Source, SourceBatch};
use sluice_sql::SourcePlan;

use crate::file::{FileOptions, JsonFileSource};
use crate::json::preview;
use crate::lake::io;
use crate::rows::{BadRows, keep_good_rows, mark_bad_rows, mark_non_finite};

/// Row positions pack the file index above this many bits.
const FILE_SHIFT: u32 = 40;

pub use crate::file::options::FileFormat;

/// One input file and the Hive partition values of its folders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputFile {
    /// The file.
    pub path: PathBuf,
    /// Its format.
    pub format: FileFormat,
    /// `column=value` pairs from the folders between the named root and the file.
    pub hive: Vec<(String, String)>,
    /// How dead letters name it (path as given).
    pub label: String,
}

/// The files a `--source NAME=PATH` names: a file, a folder (recursively;
/// names starting with `.` or `_` skipped) or a glob; sorted by path.
pub fn expand_paths(spec: &str) -> Result<Vec<InputFile>> {
    let is_glob = spec.contains(['*', '?', '[']);
    let mut out = Vec::new();
    if is_glob {
        let (root, pattern) = glob_root(spec);
        let pat: Vec<&str> = pattern.split('/').filter(|c| !c.is_empty()).collect();
        walk_glob(&root, &pat, &mut hive_of(&root), &mut out)?;
    } else {
        let p = PathBuf::from(spec);
        let meta = std::fs::metadata(&p).map_err(|e| io(&p, e))?;
        if meta.is_dir() {
            walk_dir(&p, &mut hive_of(&p), &mut out)?;
        } else {
            let format = FileFormat::of(&p).ok_or_else(|| unknown_format(&p))?;
            out.push(InputFile {
                label: p.display().to_string(),
                hive: p.parent().map(hive_of).unwrap_or_default(),
                path: p,
                format,
            });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    if out.is_empty() {
        return Err(EngineError::Connector {
            what: format!("input {spec}"),
            message: "no .json/.jsonl/.ndjson, .parquet or .csv files match".into(),
        });
    }
    Ok(out)
}

/// The files of a `connector = 'file'` source's `path` (a file, a folder
/// or a glob), each in the source's `format` when it names one, else in
/// its extension's (a single file without a known extension: JSON lines).
pub fn source_files(o: &FileOptions) -> Result<Vec<InputFile>> {
    let spec = o.path.display().to_string();
    let glob = spec.contains(['*', '?', '[']);
    let mut files = if !glob && !o.path.is_dir() {
        std::fs::metadata(&o.path).map_err(|e| io(&o.path, e))?;
        let format = o
            .format
            .or_else(|| FileFormat::of(&o.path))
            .unwrap_or(FileFormat::JsonLines);
        vec![InputFile {
            label: o
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| spec.clone()),
            hive: Vec::new(),
            path: o.path.clone(),
            format,
        }]
    } else {
        expand_paths(&spec)?
    };
    if let Some(f) = o.format {
        for x in &mut files {
            x.format = f;
        }
    }
    Ok(files)
}

/// The reader `sluice run` uses for a `connector = 'file'` source. One
/// JSON-lines file is read by [`JsonFileSource`], whose checkpoints name a
/// byte offset (as before Parquet and CSV were read); a Parquet or CSV
/// file, a folder or a glob by [`FilesSource`], whose checkpoints name a
/// file and a row.
pub fn file_source(plan: &SourcePlan) -> Result<Box<dyn Source>> {
    let o = FileOptions::parse(plan)?;
    let files = source_files(&o)?;
    let single_json = matches!(files.as_slice(), [f] if f.format == FileFormat::JsonLines && f.path == o.path && !o.path.is_dir());
    if single_json {
        return Ok(Box::new(JsonFileSource::new(plan)?));
    }
    Ok(Box::new(FilesSource::new(plan, files)))
}

fn unknown_format(p: &Path) -> EngineError {
    EngineError::Connector {
        what: format!("input {}", p.display()),
        message: "unknown file format: name it .jsonl/.json/.ndjson, .parquet or .csv".into(),
    }
}

/// The longest leading part of a glob without wildcards, and the rest.
fn glob_root(spec: &str) -> (PathBuf, String) {
    let parts: Vec<&str> = spec.split('/').collect();
    let first = parts
        .iter()
        .position(|c| c.contains(['*', '?', '[']))
        .unwrap_or(parts.len());
    let root = parts[..first].join("/");
    let root = if root.is_empty() {
        if spec.starts_with('/') {
            PathBuf::from("/")
        } else {
            PathBuf::from(".")
        }
    } else {
        PathBuf::from(root)
    };
    (root, parts[first..].join("/"))
}

/// `column=value` folders of a path named on the command line.
fn hive_of(p: &Path) -> Vec<(String, String)> {
    p.components()
        .filter_map(|c| hive_pair(&c.as_os_str().to_string_lossy()))
        .collect()
}

fn skipped(name: &str) -> bool {
    name.starts_with('.') || name.starts_with('_')
}

fn hive_pair(name: &str) -> Option<(String, String)> {
    let (k, v) = name.split_once('=')?;
    (!k.is_empty()).then(|| (k.to_string(), v.to_string()))
}

fn sorted_entries(dir: &Path) -> Result<Vec<(String, PathBuf, bool)>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let e = e.map_err(|e| io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let is_dir = e.file_type().map_err(|er| io(&e.path(), er))?.is_dir();
        v.push((name, e.path(), is_dir));
    }
    v.sort();
    Ok(v)
}

fn walk_dir(dir: &Path, hive: &mut Vec<(String, String)>, out: &mut Vec<InputFile>) -> Result<()> {
    for (name, path, is_dir) in sorted_entries(dir)? {
        if skipped(&name) {
            continue;
        }
        if is_dir {
            let pair = hive_pair(&name);
            let pushed = pair.is_some();
            if let Some(p) = pair {
                hive.push(p);
            }
            walk_dir(&path, hive, out)?;
            if pushed {
                hive.pop();
            }
        } else if let Some(format) = FileFormat::of(&path) {
            out.push(InputFile {
                label: path.display().to_string(),
                path,
                format,
                hive: hive.clone(),
            });
        }
    }
    Ok(())
}

fn walk_glob(
    dir: &Path,
    pat: &[&str],
    hive: &mut Vec<(String, String)>,
    out: &mut Vec<InputFile>,
) -> Result<()> {
    let Some((first, rest)) = pat.split_first() else {
        return Ok(());
    };
    if *first == "**" {
        // Zero folders, or one more folder and still `**`.
        walk_glob(dir, rest, hive, out)?;
        for (name, path, is_dir) in sorted_entries(dir)? {
            if is_dir && !skipped(&name) {
                let pair = hive_pair(&name);
                let pushed = pair.is_some();
                if let Some(p) = pair {
                    hive.push(p);
                }
                walk_glob(&path, pat, hive, out)?;
                if pushed {
                    hive.pop();
                }
            }
        }
        return Ok(());
    }
    let Ok(entries) = sorted_entries(dir) else {
        return Ok(());
    };
    for (name, path, is_dir) in entries {
        if skipped(&name) && !first.starts_with(['.', '_']) {
            continue;
        }
        if !wildcard(first.as_bytes(), name.as_bytes()) {
            continue;
        }
        if rest.is_empty() {
            if !is_dir && let Some(format) = FileFormat::of(&path) {
                out.push(InputFile {
                    label: path.display().to_string(),
                    path,
                    format,
                    hive: hive.clone(),
                });
            }
        } else if is_dir {
            let pair = hive_pair(&name);
            let pushed = pair.is_some();
            if let Some(p) = pair {
                hive.push(p);
            }
            walk_glob(&path, rest, hive, out)?;
            if pushed {
                hive.pop();
            }
        }
    }
    Ok(())
}

/// `*` (any run), `?` (one character) and `[abc]`/`[a-z]` over one path component.
fn wildcard(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| wildcard(rest, &s[i..])),
        Some((b'?', rest)) => !s.is_empty() && wildcard(rest, &s[1..]),
        Some((b'[', rest)) => {
            let Some(close) = rest.iter().position(|c| *c == b']') else {
                return s.first() == Some(&b'[') && wildcard(rest, &s[1..]);
            };
            let Some(c) = s.first() else { return false };
            let set = &rest[..close];
            let mut hit = false;
            let mut i = 0;
            while i < set.len() {
                if i + 2 < set.len() && set[i + 1] == b'-' {
                    hit |= (set[i]..=set[i + 2]).contains(c);
                    i += 3;
                } else {
                    hit |= set[i] == *c;
                    i += 1;
                }
            }
            hit && wildcard(&rest[close + 1..], &s[1..])
        }
        Some((c, rest)) => s.first() == Some(c) && wildcard(rest, &s[1..]),
    }
}

enum Reader {
    Json(Box<JsonFileSource>),
    Csv {
        records: Box<crate::file::csv::CsvRecords>,
        /// Records of this file read so far (rows and bad ones).
        row: u64,
    },
    Columnar {
        batches: Box<dyn Iterator<Item = Result<RecordBatch>> + Send>,
        /// Rows of this file read so far.
        row: u64,
        /// Rows still to pass over before the first returned one (a
        /// checkpoint's position inside the file).
        skip: u64,
    },
}

/// A source over a list of files, read in order.
pub struct FilesSource {
    plan: SourcePlan,
    files: Vec<InputFile>,
    cur: usize,
    reader: Option<Reader>,
    batch_rows: usize,
    /// Longest CSV record kept (`max_record_bytes`, default 1 MiB).
    max_record_bytes: usize,
}

impl FilesSource {
    /// A source reading `files` as the rows of `plan`'s source.
    pub fn new(plan: &SourcePlan, files: Vec<InputFile>) -> Self {
        let r = sluice_sql::OptionReader::new(plan, "sources");
        let max_record_bytes = crate::file::options::max_record_bytes(&r)
            .unwrap_or(crate::file::options::DEFAULT_MAX_RECORD_BYTES);
        FilesSource {
            plan: plan.clone(),
            files,
            cur: 0,
            reader: None,
            batch_rows: 8192,
            max_record_bytes,
        }
    }

    /// The files, in reading order.
    pub fn files(&self) -> &[InputFile] {
        &self.files
    }

    fn open(&self, f: &InputFile) -> Result<Reader> {
        match f.format {
            FileFormat::JsonLines => {
                // The path as given (relative to the current directory, as a
                // command line's paths are), never re-read against the
                // pipeline file's folder.
                let mut p = self.plan.clone();
                let path = std::path::absolute(&f.path).map_err(|e| io(&f.path, e))?;
                p.options.insert("path".into(), path.display().to_string());
                let mut s = JsonFileSource::new(&p)?;
                s.seek(None)?;
                Ok(Reader::Json(Box::new(s.with_label(&f.label))))
            }
            FileFormat::Parquet => {
                let file = File::open(&f.path).map_err(|e| io(&f.path, e))?;
                let perr = |e: parquet::errors::ParquetError| EngineError::Connector {
                    what: format!("input {}", f.label),
                    message: e.to_string(),
                };
                let b = ParquetRecordBatchReaderBuilder::try_new(file).map_err(perr)?;
                let file_schema = Arc::clone(b.schema());
                let wanted: Vec<usize> = self
                    .plan
                    .schema
                    .fields()
                    .iter()
                    .filter_map(|fl| file_schema.index_of(fl.name()).ok())
                    .collect();
                let mask = ProjectionMask::roots(b.parquet_schema(), wanted);
                let r: ParquetRecordBatchReader = b
                    .with_projection(mask)
                    .with_batch_size(self.batch_rows)
                    .build()
                    .map_err(perr)?;
                let label = f.label.clone();
                Ok(Reader::Columnar {
                    batches: Box::new(r.map(move |b| {
                        b.map_err(|e| EngineError::arrow(format!("reading {label}"), e))
                    })),
                    row: 0,
                    skip: 0,
                })
            }
            FileFormat::Csv => {
                let records =
                    match crate::file::csv::CsvRecords::open(&f.path, self.max_record_bytes)
                        .map_err(|e| io(&f.path, e))?
                    {
                        Ok(r) => r,
                        Err(why) => {
                            return Err(EngineError::Connector {
                                what: format!("input {}", f.label),
                                message: why,
                            });
                        }
                    };
                Ok(Reader::Csv {
                    records: Box::new(records),
                    row: 0,
                })
            }
        }
    }

    /// Casts a file's columns to the declared schema; rows whose values do
    /// not fit are rejected with their position and reason.
    /// `locals` are the rows' positions in the file (row numbers from 1,
    /// or a CSV row's line).
    fn conform(
        &self,
        raw: &RecordBatch,
        file: &InputFile,
        file_idx: usize,
        locals: &[u64],
        rejected: &mut Vec<DeadLetter>,
    ) -> Result<Option<SourceBatch>> {
        let n = raw.num_rows();
        let schema = &self.plan.schema;
        let mut bad: BadRows = vec![None; n];
        let mut cols: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
        let opts = CastOptions {
            safe: true,
            ..Default::default()
        };
        for field in schema.fields() {
            let (src, from_hive) = match raw.column_by_name(field.name()) {
                Some(c) => (Some(Arc::clone(c)), false),
                None => match file.hive.iter().find(|(k, _)| k == field.name()) {
                    Some((_, v)) => (
                        Some(Arc::new(StringArray::from(vec![v.as_str(); n])) as ArrayRef),
                        true,
                    ),
                    None => (None, false),
                },
            };
            let col = match &src {
                Some(c) => cast_column(c, field.data_type(), &opts).map_err(|e| {
                    EngineError::Connector {
                        what: format!("input {}", file.label),
                        message: format!(
                            "column `{}` ({}{}) cannot be read as {}: {e}",
                            field.name(),
                            c.data_type(),
                            if from_hive {
                                ", from its folder name"
                            } else {
                                ""
                            },
                            field.data_type()
                        ),
                    }
                })?,
                None => new_null_array(field.data_type(), n),
            };
            mark_bad_rows(field, src.as_ref(), &col, &mut bad);
            mark_non_finite(field, &col, &mut bad);
            cols.push(col);
        }
        let positions: Vec<u64> = locals
            .iter()
            .map(|l| ((file_idx as u64) << FILE_SHIFT) | l)
            .collect();
        let ctx = || format!("rows of {}", file.label);
        if bad.iter().all(Option::is_none) {
            let batch = RecordBatch::try_new(Arc::clone(schema), cols)
                .map_err(|e| EngineError::arrow(ctx(), e))?;
            return Ok(Some(SourceBatch {
                batch,
                row_positions: positions,
                partitions: Vec::new(),
            }));
        }
        let all: Vec<usize> = (0..raw.num_columns()).collect();
        for (i, b) in bad.iter().enumerate() {
            if let Some((kind, reason)) = b {
                let rec = features_json(&raw.slice(i, 1), &all)?
                    .pop()
                    .unwrap_or_default();
                rejected.push(DeadLetter {
                    source: self.plan.name.clone(),
                    position: format!("{}:{}", file.label, locals.get(i).copied().unwrap_or(0)),
                    kind: *kind,
                    reason: reason.clone(),
                    record: preview(&rec),
                });
            }
        }
        let Some(batch) = keep_good_rows(schema, cols, &bad, &ctx())? else {
            return Ok(None);
        };
        let positions = positions
            .into_iter()
            .zip(bad.iter())
            .filter(|(_, b)| b.is_none())
            .map(|(p, _)| p)
            .collect();
        Ok(Some(SourceBatch {
            batch,
            row_positions: positions,
            partitions: Vec::new(),
        }))
    }
}

/// Casts a column to a declared type. Text becomes a millisecond timestamp
/// as training-set spines read it: RFC 3339 (any offset, stored as UTC) or
/// epoch milliseconds.
fn cast_column(c: &ArrayRef, to: &DataType, opts: &CastOptions<'_>) -> Result<ArrayRef> {
    if c.data_type() == to {
        return Ok(Arc::clone(c));
    }
    if let DataType::Timestamp(TimeUnit::Millisecond, tz) = to
        && matches!(c.data_type(), DataType::Utf8)
    {
        let ms = time_millis(c)?;
        return Ok(Arc::new(
            TimestampMillisecondArray::from(ms).with_timezone_opt(tz.clone()),
        ));
    }
    cast_with_options(c, to, opts).map_err(|e| EngineError::arrow("casting", e))
}

impl Source for FilesSource {
    fn name(&self) -> &str {
        &self.plan.name
    }

    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.plan.schema)
    }

    fn seek(&mut self, position: Option<&[u8]>) -> Result<()> {
        self.cur = 0;
        self.reader = None;
        let Some(position) = position else {
            return Ok(());
        };
        let bad = |why: String| EngineError::Connector {
            what: format!("source {}", self.plan.name),
            message: format!(
                "checkpointed position `{}`: {why}",
                String::from_utf8_lossy(position)
            ),
        };
        let pos: serde_json::Value =
            serde_json::from_slice(position).map_err(|e| bad(e.to_string()))?;
        if let Some(after) = pos.get("after").and_then(|v| v.as_str()) {
            // Every file up to `after` was read; files added since that sort
            // after it are read now.
            let after = PathBuf::from(after);
            self.cur = self
                .files
                .iter()
                .position(|f| f.path > after)
                .unwrap_or(self.files.len());
            return Ok(());
        }
        let Some(file) = pos.get("file").and_then(|v| v.as_str()) else {
            return Err(bad("expected a file".into()));
        };
        let Some(idx) = self.files.iter().position(|f| f.path == Path::new(file)) else {
            return Err(bad(format!(
                "{file} is no longer among the source's files; restore it, or start over with a new --state-dir"
            )));
        };
        let mut reader = self.open(&self.files[idx])?;
        match (&mut reader, pos.get("json").and_then(|v| v.as_str())) {
            (Reader::Json(s), Some(inner)) => s.seek(Some(inner.as_bytes()))?,
            (Reader::Columnar { skip, .. }, None) => {
                *skip = pos.get("row").and_then(|v| v.as_u64()).unwrap_or(0);
            }
            (Reader::Csv { records, row }, None) => {
                let n = pos.get("row").and_then(|v| v.as_u64()).unwrap_or(0);
                records.skip(n).map_err(|e| io(Path::new(file), e))?;
                *row = n;
            }
            (Reader::Json(_), None) if pos.get("row").and_then(|v| v.as_u64()) == Some(0) => {}
            _ => {
                return Err(bad(format!(
                    "{file} was read in another format; its format changed since the checkpoint"
                )));
            }
        }
        self.cur = idx;
        self.reader = Some(reader);
        Ok(())
    }

    fn poll(&mut self, max_rows: usize) -> Result<Poll> {
        self.batch_rows = max_rows.max(1);
        loop {
            let Some(file) = self.files.get(self.cur).cloned() else {
                return Ok(Poll::End);
            };
            if self.reader.is_none() {
                self.reader = Some(self.open(&file)?);
            }
            let idx = self.cur;
            let step = match self.reader.as_mut() {
                Some(Reader::Json(s)) => match s.poll(max_rows)? {
                    Poll::Data {
                        mut batch,
                        rejected,
                    } => {
                        if let Some(b) = batch.as_mut() {
                            for p in b.row_positions.iter_mut() {
                                *p |= (idx as u64) << FILE_SHIFT;
                            }
                        }
                        Some(Poll::Data { batch, rejected })
                    }
                    Poll::Idle => Some(Poll::Idle),
                    Poll::End => None,
                },
                Some(Reader::Columnar { batches, row, skip }) => match batches.next() {
                    Some(raw) => {
                        let mut raw = raw?;
                        if *skip > 0 {
                            let n = (*skip).min(raw.num_rows() as u64);
                            *skip -= n;
                            *row += n;
                            raw = raw.slice(n as usize, raw.num_rows() - n as usize);
                            if raw.num_rows() == 0 {
                                continue;
                            }
                        }
                        let first = *row;
                        *row += raw.num_rows() as u64;
                        let locals: Vec<u64> =
                            (first + 1..=first + raw.num_rows() as u64).collect();
                        let mut rejected = Vec::new();
                        let batch = self.conform(&raw, &file, idx, &locals, &mut rejected)?;
                        Some(Poll::Data { batch, rejected })
                    }
                    None => None,
                },
                Some(Reader::Csv { records, row }) => {
                    match records
                        .next_chunk(max_rows)
                        .map_err(|e| io(&file.path, e))?
                    {
                        None => None,
                        Some(chunk) => {
                            *row += chunk.records;
                            let mut rejected: Vec<DeadLetter> = chunk
                                .bad
                                .iter()
                                .map(|b| DeadLetter {
                                    source: self.plan.name.clone(),
                                    position: format!("{}:{}", file.label, b.line),
                                    kind: b.kind,
                                    reason: b.reason.clone(),
                                    record: preview(&b.bytes),
                                })
                                .collect();
                            let batch = if chunk.lines.is_empty() {
                                None
                            } else {
                                let schema = Arc::new(Schema::new(
                                    records
                                        .header()
                                        .iter()
                                        .map(|n| Field::new(n, DataType::Utf8, true))
                                        .collect::<Vec<_>>(),
                                ));
                                let raw =
                                    RecordBatch::try_new(schema, chunk.columns).map_err(|e| {
                                        EngineError::arrow(format!("reading {}", file.label), e)
                                    })?;
                                self.conform(&raw, &file, idx, &chunk.lines, &mut rejected)?
                            };
                            Some(Poll::Data { batch, rejected })
                        }
                    }
                }
                None => None,
            };
            match step {
                Some(p) => return Ok(p),
                None => {
                    self.cur += 1;
                    self.reader = None;
                }
            }
        }
    }

    /// `{"file": PATH, "row": N}` (rows of a Parquet or CSV file read),
    /// `{"file": PATH, "json": POS}` (a JSON-lines file's own position) or
    /// `{"after": PATH}` once every file up to PATH is read.
    fn position(&self) -> Vec<u8> {
        let path = |f: &InputFile| f.path.display().to_string();
        let v = match (self.files.get(self.cur), &self.reader) {
            (Some(f), Some(Reader::Json(s))) => serde_json::json!({
                "file": path(f),
                "json": String::from_utf8_lossy(&s.position()),
            }),
            (Some(f), Some(Reader::Columnar { row, skip, .. })) => {
                serde_json::json!({"file": path(f), "row": row + skip})
            }
            (Some(f), Some(Reader::Csv { row, .. })) => {
                serde_json::json!({"file": path(f), "row": row})
            }
            (Some(f), None) => serde_json::json!({"file": path(f), "row": 0}),
            (None, _) => serde_json::json!({
                "after": self.files.last().map(path).unwrap_or_default()
            }),
        };
        v.to_string().into_bytes()
    }

    fn describe_position(&self, pos: u64) -> String {
        let idx = (pos >> FILE_SHIFT) as usize;
        let local = pos & ((1u64 << FILE_SHIFT) - 1);
        match self.files.get(idx) {
            Some(f) => format!("{}:{local}", f.label),
            None => format!("?:{local}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows_of(src: &mut FilesSource) -> (Vec<String>, Vec<u8>) {
        let mut users = Vec::new();
        loop {
            match src.poll(3).expect("poll") {
                Poll::Data { batch, .. } => {
                    if let Some(b) = batch {
                        let c = b.batch.column(0).as_any().downcast_ref::<StringArray>();
                        users.extend(c.expect("text").iter().flatten().map(str::to_string));
                    }
                    return (users, src.position());
                }
                Poll::Idle => continue,
                Poll::End => return (users, src.position()),
            }
        }
    }

    #[test]
    fn a_checkpointed_position_resumes_at_its_row_and_after_its_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = "CREATE SOURCE s (user TEXT NOT NULL, ts TIMESTAMP NOT NULL) WITH (connector = 'file', path = 'in');\nCREATE FEATURE VIEW v KEY user AS SELECT user, ts FROM s;";
        let p = sluice_sql::plan_pipeline("t.sql", text, dir.path()).expect("plan");
        let plan = &p.sources[0];
        std::fs::create_dir_all(dir.path().join("in")).expect("mkdir");
        let csv = |name: &str, from: usize, n: usize| {
            let mut body = String::from("user,ts\n");
            for i in from..from + n {
                body.push_str(&format!("u{i},{}\n", 1_000 + i));
            }
            std::fs::write(dir.path().join("in").join(name), body).expect("csv");
        };
        csv("a.csv", 0, 7);
        let files = || expand_paths(&dir.path().join("in").display().to_string()).expect("files");
        let mut src = FilesSource::new(plan, files());
        let (first, pos) = rows_of(&mut src);
        assert_eq!(first, ["u0", "u1", "u2"]);
        // A fresh source at that position reads the rest of the file.
        let mut again = FilesSource::new(plan, files());
        again.seek(Some(&pos)).expect("seek");
        let mut rest = Vec::new();
        let end = loop {
            let (rows, p) = rows_of(&mut again);
            if rows.is_empty() && again.cur >= again.files.len() {
                break p;
            }
            rest.extend(rows);
        };
        assert_eq!(rest, ["u3", "u4", "u5", "u6"]);
        // Read to the end, then a new file: only it is read.
        csv("b.csv", 7, 2);
        let mut later = FilesSource::new(plan, files());
        later.seek(Some(&end)).expect("seek");
        let (rows, _) = rows_of(&mut later);
        assert_eq!(rows, ["u7", "u8"]);
        // A checkpoint naming a file that is gone is an error, not a re-read.
        std::fs::remove_file(dir.path().join("in/a.csv")).expect("rm");
        let mut gone = FilesSource::new(plan, files());
        let e = gone.seek(Some(&pos)).expect_err("gone");
        assert!(e.to_string().contains("no longer"), "{e}");
    }

    #[test]
    fn wildcards_match_one_component() {
        assert!(wildcard(b"*.parquet", b"part-1.parquet"));
        assert!(!wildcard(b"*.parquet", b"part-1.csv"));
        assert!(wildcard(b"date=2024-01-0?", b"date=2024-01-05"));
        assert!(wildcard(b"[ab]*", b"b1"));
        assert!(!wildcard(b"[ab]*", b"c1"));
        assert!(wildcard(b"d[0-9]", b"d7"));
    }

    #[test]
    fn folders_globs_and_hive_values() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        for (d, f) in [
            ("date=2024-01-02/region=eu", "b.jsonl"),
            ("date=2024-01-01/region=us", "a.jsonl"),
            ("date=2024-01-01/region=us", "_SUCCESS"),
            ("date=2024-01-01/region=us", "notes.txt"),
        ] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
            std::fs::write(root.join(d).join(f), "{}\n").expect("write");
        }
        let all = expand_paths(&root.display().to_string()).expect("expand");
        assert_eq!(all.len(), 2);
        assert!(all[0].path.ends_with("date=2024-01-01/region=us/a.jsonl"));
        assert_eq!(
            all[0].hive,
            vec![
                ("date".to_string(), "2024-01-01".to_string()),
                ("region".to_string(), "us".to_string())
            ]
        );
        let g =
            expand_paths(&format!("{}/date=2024-01-02/**/*.jsonl", root.display())).expect("glob");
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].hive.len(), 2);
        assert!(expand_paths(&format!("{}/*.parquet", root.display())).is_err());
    }
}

#[cfg(test)]
mod props {
    //! Globbing: a pattern made from a name by wildcards matches it, a
    //! literal matches only itself, no input panics; `expand_paths` over a
    //! generated folder returns exactly the matching files, sorted.

    use super::*;
    use proptest::prelude::*;

    /// `name` with some characters replaced by `?`, some runs by `*`, and
    /// some characters by a one-character class.
    fn pattern_of(name: &str, edits: &[(usize, u8)]) -> String {
        let orig: Vec<char> = name.chars().collect();
        let mut chars: Vec<String> = orig.iter().map(|c| c.to_string()).collect();
        for (at, op) in edits {
            if chars.is_empty() {
                break;
            }
            let i = at % chars.len();
            chars[i] = match op % 4 {
                0 => "?".into(),
                1 => "*".into(),
                2 => format!("[{}]", orig[i]),
                _ => format!("[{0}-{0}]", orig[i]),
            };
        }
        chars.concat()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn a_pattern_made_from_a_name_matches_it(
            name in "[a-z0-9._=-]{0,16}",
            edits in prop::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        ) {
            let p = pattern_of(&name, &edits);
            prop_assert!(wildcard(p.as_bytes(), name.as_bytes()), "{} !~ {}", p, name);
        }

        #[test]
        fn a_literal_matches_only_itself(a in "[a-z0-9._=-]{0,12}", b in "[a-z0-9._=-]{0,12}") {
            prop_assert_eq!(wildcard(a.as_bytes(), b.as_bytes()), a == b);
        }

        #[test]
        fn any_pattern_and_name_never_panic(p in prop::collection::vec(any::<u8>(), 0..12), s in prop::collection::vec(any::<u8>(), 0..12)) {
            let _ = wildcard(&p, &s);
        }

        #[test]
        fn expand_paths_finds_exactly_the_matching_files(
            names in prop::collection::btree_set("[a-c_.]{1,3}\\.(jsonl|csv|txt)", 1..8),
            pat in "[a-c*?]{0,3}",
        ) {
            let dir = tempfile::tempdir().unwrap();
            for n in &names {
                std::fs::write(dir.path().join(n), b"").unwrap();
            }
            let spec = format!("{}/{pat}*.jsonl", dir.path().display());
            let want: Vec<PathBuf> = names
                .iter()
                .filter(|n| !n.starts_with(['.', '_']) || pat.starts_with(['.', '_']))
                .filter(|n| wildcard(format!("{pat}*.jsonl").as_bytes(), n.as_bytes()))
                .map(|n| dir.path().join(n))
                .collect();
            match expand_paths(&spec) {
                Ok(files) => {
                    let got: Vec<PathBuf> = files.into_iter().map(|f| f.path).collect();
                    prop_assert_eq!(got, want);
                }
                Err(_) => prop_assert!(want.is_empty(), "no match reported, expected {:?}", want),
            }
        }
    }
}
