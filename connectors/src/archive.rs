//! Event archives: what a source accepted while it streamed, written with
//! each checkpoint (`archive = 'path'` on `CREATE SOURCE`), and read back in
//! arrival order for training-set replays.
//!
//! Layout: `{archive}/date=YYYY-MM-DD/part-{epoch}-{writer}-{n}.parquet`,
//! by the UTC date of the event time, the source's columns followed by
//! [`sluice_engine::archive::archive_columns`]; `writer` is the id of the
//! state dir whose job archived the file. Files of a checkpoint that did
//! not commit are removed when that job restarts, so every accepted event
//! is in its writer's archive once. An archive that several state dirs
//! wrote into (a new `--state-dir` after a view changed) holds one stream
//! per writer: a replay reads one of them.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, Int32Array, Int64Array, RecordBatch};
use arrow::compute::{concat_batches, sort_to_indices, take_record_batch};
use arrow::datatypes::SchemaRef;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use sluice_engine::archive::{archive_columns, archive_schema};
use sluice_engine::{EngineError, Poll, Result, Source, SourceBatch};
use sluice_sql::{OptionReader, PipelineError, SourcePlan};

use crate::lake::{LakeWriter, PartName, io};

/// Bits of a row position that hold the offset (the partition above them).
const OFFSET_BITS: u32 = 40;

/// The `archive` option of a source, resolved against the pipeline's folder.
pub fn archive_dir(source: &SourcePlan) -> std::result::Result<Option<PathBuf>, PipelineError> {
    let r = OptionReader::new(source, "sources");
    if r.get("archive").is_none() {
        return Ok(None);
    }
    if source.event_time.is_none() {
        return Err(r.error(
            "archive",
            "an event archive needs the source's event time: declare WATERMARK FOR a column",
        ));
    }
    r.path("archive").map(Some)
}

/// The archive writer of a source with an `archive` option.
pub fn archive_writer(source: &SourcePlan) -> Result<Option<LakeWriter>> {
    let dir = archive_dir(source).map_err(|e| EngineError::Connector {
        what: format!("source {}", source.name),
        message: e.to_string(),
    })?;
    let (Some(dir), Some(et)) = (dir, source.event_time) else {
        return Ok(None);
    };
    Ok(Some(LakeWriter::archive(
        &dir,
        &source.name,
        archive_schema(&source.schema),
        et,
    )))
}

/// Reads an event archive in arrival order: one batch per checkpoint, rows
/// sorted by their sequence number.
pub struct ArchiveSource {
    name: String,
    dir: PathBuf,
    schema: SchemaRef,
    /// Files per epoch.
    epochs: BTreeMap<u64, Vec<PathBuf>>,
    next: Option<u64>,
    /// The epoch the last poll returned.
    last: Option<u64>,
    /// The writer read.
    writer: String,
    /// Every writer with its checkpoints.
    writers: Vec<(String, usize)>,
}

/// `id (N checkpoints), …` of an archive's writers (`""`: files of builds
/// before writer ids).
pub fn describe_writers(writers: &[(String, usize)]) -> String {
    writers
        .iter()
        .map(|(w, n)| {
            let w = if w.is_empty() {
                "(unnamed)"
            } else {
                w.as_str()
            };
            format!("{w} ({n} checkpoints)")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One writer's files in an archive.
#[derive(Debug, Default)]
struct WriterFiles {
    epochs: BTreeMap<u64, Vec<PathBuf>>,
    /// Modification time of its newest file.
    newest: Option<std::time::SystemTime>,
}

impl ArchiveSource {
    /// The archive of `source` in `dir`; an error when it holds no files.
    /// With files of several writers, it reads `writer`'s, or by default
    /// the writer whose newest file is the newest (the stream that wrote
    /// last); [`ArchiveSource::writers`] tells which there are.
    pub fn open(source: &SourcePlan, dir: &Path, writer: Option<&str>) -> Result<Self> {
        let mut writers: BTreeMap<String, WriterFiles> = BTreeMap::new();
        let parts = std::fs::read_dir(dir).map_err(|e| io(dir, e))?;
        for p in parts.flatten() {
            let Ok(files) = std::fs::read_dir(p.path()) else {
                continue;
            };
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                let Some(part) = PartName::parse(&name) else {
                    continue;
                };
                let w = writers.entry(part.writer.to_string()).or_default();
                w.epochs.entry(part.epoch).or_default().push(f.path());
                let mtime = f.metadata().and_then(|m| m.modified()).ok();
                w.newest = w.newest.max(mtime);
            }
        }
        if writers.is_empty() {
            return Err(EngineError::Connector {
                what: format!("event archive {}", dir.display()),
                message: format!(
                    "holds no archived events of source `{}` (has `sluice run` committed a checkpoint with this archive?)",
                    source.name
                ),
            });
        }
        let chosen = match writer {
            Some(w) => w.to_string(),
            None => writers
                .iter()
                .max_by_key(|(_, f)| f.newest)
                .map(|(w, _)| w.clone())
                .unwrap_or_default(),
        };
        let all: Vec<(String, usize)> = writers
            .iter()
            .map(|(w, f)| (w.clone(), f.epochs.len()))
            .collect();
        let Some(files) = writers.remove(&chosen) else {
            return Err(EngineError::Connector {
                what: format!("event archive {}", dir.display()),
                message: format!(
                    "holds no files of writer `{chosen}`; its writers: {}",
                    describe_writers(&all)
                ),
            });
        };
        Ok(ArchiveSource {
            name: source.name.clone(),
            dir: dir.to_path_buf(),
            schema: archive_schema(&source.schema),
            next: files.epochs.keys().next().copied(),
            last: None,
            epochs: files.epochs,
            writer: chosen,
            writers: all,
        })
    }

    /// The writer (state dir id) whose stream this reads.
    pub fn writer(&self) -> &str {
        &self.writer
    }

    /// Every writer of the archive, with its checkpoints.
    pub fn writers(&self) -> &[(String, usize)] {
        &self.writers
    }

    /// Checkpoints (epochs) in the archive.
    pub fn epochs(&self) -> usize {
        self.epochs.len()
    }

    fn read_epoch(&self, files: &[PathBuf]) -> Result<RecordBatch> {
        let mut batches = Vec::new();
        for f in files {
            let what = format!("event archive file {}", f.display());
            let file = File::open(f).map_err(|e| io(f, e))?;
            let b = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| {
                EngineError::Connector {
                    what: what.clone(),
                    message: e.to_string(),
                }
            })?;
            let fs = b.schema();
            let same = fs.fields().len() == self.schema.fields().len()
                && fs
                    .fields()
                    .iter()
                    .zip(self.schema.fields())
                    .all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type());
            if !same {
                return Err(EngineError::Incompatible {
                    path: f.display().to_string(),
                    reason: format!(
                        "archived with other columns than source `{}` declares now (archive: {}; source: {})",
                        self.name,
                        names(fs),
                        names(&self.schema)
                    ),
                });
            }
            let r = b
                .with_batch_size(65536)
                .build()
                .map_err(|e| EngineError::Connector {
                    what: what.clone(),
                    message: e.to_string(),
                })?;
            for b in r {
                let b = b.map_err(|e| EngineError::arrow(what.clone(), e))?;
                // The file's own schema may differ in metadata only.
                batches.push(
                    RecordBatch::try_new(Arc::clone(&self.schema), b.columns().to_vec())
                        .map_err(|e| EngineError::arrow(what.clone(), e))?,
                );
            }
        }
        let all = concat_batches(&self.schema, &batches)
            .map_err(|e| EngineError::arrow("event archive", e))?;
        let seq = all
            .column_by_name(archive_columns::SEQ)
            .cloned()
            .ok_or_else(|| EngineError::Internal("archive without sequence column".into()))?;
        let order = sort_to_indices(&seq, None, None)
            .map_err(|e| EngineError::arrow("event archive order", e))?;
        take_record_batch(&all, &order).map_err(|e| EngineError::arrow("event archive order", e))
    }
}

fn names(s: &SchemaRef) -> String {
    s.fields()
        .iter()
        .map(|f| format!("{} {}", f.name(), f.data_type()))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Source for ArchiveSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn seek(&mut self, position: Option<&[u8]>) -> Result<()> {
        self.next = match position.filter(|p| !p.is_empty()) {
            None => self.epochs.keys().next().copied(),
            Some(p) => {
                let after = u64::from_be_bytes(p.try_into().map_err(|_| {
                    EngineError::Internal("archive position is not an epoch".into())
                })?);
                self.epochs.range(after + 1..).next().map(|(e, _)| *e)
            }
        };
        Ok(())
    }

    fn poll(&mut self, _max_rows: usize) -> Result<Poll> {
        let Some(epoch) = self.next else {
            return Ok(Poll::End);
        };
        let files = self.epochs.get(&epoch).cloned().unwrap_or_default();
        let batch = self.read_epoch(&files)?;
        self.next = self.epochs.range(epoch + 1..).next().map(|(e, _)| *e);
        self.last = Some(epoch);
        let part = batch
            .column_by_name(archive_columns::PARTITION)
            .and_then(|c| c.as_any().downcast_ref::<Int32Array>().cloned());
        let off = batch
            .column_by_name(archive_columns::OFFSET)
            .and_then(|c| c.as_any().downcast_ref::<Int64Array>().cloned());
        let row_positions = (0..batch.num_rows())
            .map(|i| {
                let p = part
                    .as_ref()
                    .filter(|a| a.is_valid(i))
                    .map_or(0, |a| a.value(i).max(0) as u64);
                let o = off
                    .as_ref()
                    .filter(|a| a.is_valid(i))
                    .map_or(0, |a| a.value(i).max(0) as u64);
                (p << OFFSET_BITS) | (o & ((1 << OFFSET_BITS) - 1))
            })
            .collect();
        Ok(Poll::Data {
            batch: Some(SourceBatch {
                batch,
                row_positions,
                partitions: Vec::new(),
            }),
            rejected: Vec::new(),
        })
    }

    fn position(&self) -> Vec<u8> {
        self.last
            .map(|e| e.to_be_bytes().to_vec())
            .unwrap_or_default()
    }

    fn describe_position(&self, pos: u64) -> String {
        format!(
            "{} (archive {}) partition {} offset {}",
            self.name,
            self.dir.display(),
            pos >> OFFSET_BITS,
            pos & ((1 << OFFSET_BITS) - 1)
        )
    }
}
