//! JSON-lines file source. Bounded: it ends at the end of the file. Each
//! record's line number is its position in dead letters; the byte offset
//! after the last returned line is the resume position. The file is read
//! and decoded one poll ahead on a thread of its own, so decoding overlaps
//! the job's work on the rows before.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use arrow::datatypes::SchemaRef;
use sluice_engine::{DeadLetter, DeadLetterKind, EngineError, Poll, Result, Source, SourceBatch};
use sluice_sql::SourcePlan;

use crate::json::{JsonRecords, Span, preview};

pub(crate) mod csv;
pub mod options;
pub use options::FileOptions;

/// Bytes of records one poll holds at most (and one record more).
const POLL_BYTES: usize = 64 << 20;

/// A JSON-lines file read from start to end.
pub struct JsonFileSource {
    name: String,
    label: String,
    schema: SchemaRef,
    /// What reads and decodes the file: here until the first poll after a
    /// seek, then on the read-ahead thread (and back when it stops).
    reader: Option<Reader>,
    ahead: Option<ReadAhead>,
    /// The position after the last poll returned.
    offset: u64,
    line: u64,
}

/// The file's reader and decoder, from a position on.
struct Reader {
    name: String,
    path: PathBuf,
    label: String,
    file: Option<BufReader<File>>,
    offset: u64,
    line: u64,
    max_record_bytes: usize,
    records: JsonRecords,
    buf: Vec<u8>,
}

/// One poll read ahead, with the position after it.
struct Chunk {
    poll: Poll,
    offset: u64,
    line: u64,
}

/// The read-ahead thread: it sends each poll's chunk (one waits in the
/// channel while the job works on the one before) until the file ends, a
/// read fails or it is stopped.
struct ReadAhead {
    rx: Receiver<Result<Chunk>>,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Reader>,
    max_rows: usize,
}

impl ReadAhead {
    fn start(mut reader: Reader, max_rows: usize) -> Result<ReadAhead> {
        let (tx, rx): (SyncSender<Result<Chunk>>, _) = sync_channel(1);
        let stop = Arc::new(AtomicBool::new(false));
        let halt = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name(format!("read-{}", reader.name))
            .spawn(move || {
                while !halt.load(Ordering::Relaxed) {
                    let chunk = reader.poll(max_rows).map(|poll| Chunk {
                        poll,
                        offset: reader.offset,
                        line: reader.line,
                    });
                    let last = !matches!(
                        chunk,
                        Ok(Chunk {
                            poll: Poll::Data { .. },
                            ..
                        })
                    );
                    if tx.send(chunk).is_err() || last {
                        break;
                    }
                }
                reader
            })
            .map_err(|e| EngineError::Internal(format!("starting a file reader thread: {e}")))?;
        Ok(ReadAhead {
            rx,
            stop,
            handle,
            max_rows,
        })
    }

    /// Stops the thread and takes the reader back.
    fn stop(self) -> Result<Reader> {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver ends a send the thread is blocked in.
        drop(self.rx);
        self.handle
            .join()
            .map_err(|_| EngineError::Internal("a file reader thread panicked".into()))
    }
}

impl Drop for JsonFileSource {
    fn drop(&mut self) {
        if let Some(a) = self.ahead.take() {
            let _ = a.stop();
        }
    }
}

impl JsonFileSource {
    /// A source for a planned `connector = 'file'` source.
    pub fn new(plan: &SourcePlan) -> Result<Self> {
        let FileOptions {
            path,
            max_record_bytes,
            ..
        } = FileOptions::parse(plan)?;
        let label = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        Ok(JsonFileSource {
            name: plan.name.clone(),
            label: label.clone(),
            schema: Arc::clone(&plan.schema),
            reader: Some(Reader {
                name: plan.name.clone(),
                path,
                label,
                file: None,
                offset: 0,
                line: 0,
                max_record_bytes,
                records: JsonRecords::new(&plan.name, Arc::clone(&plan.schema))?,
                buf: Vec::new(),
            }),
            ahead: None,
            offset: 0,
            line: 0,
        })
    }

    /// The reader, the read-ahead thread stopped.
    fn reader(&mut self) -> Result<&mut Reader> {
        if let Some(a) = self.ahead.take() {
            self.reader = Some(a.stop()?);
        }
        self.reader
            .as_mut()
            .ok_or_else(|| EngineError::Internal(format!("source {}: reader lost", self.name)))
    }

    /// Names the file `label` in dead letters (instead of its file name).
    pub fn with_label(mut self, label: &str) -> Self {
        self.label = label.to_string();
        if let Some(r) = self.reader.as_mut() {
            r.label = label.to_string();
        }
        self
    }
}

impl Reader {
    fn io(&self, e: std::io::Error) -> EngineError {
        EngineError::Io {
            path: self.path.display().to_string(),
            source: e,
        }
    }

    fn reject(&self, line: u64, bytes: &[u8], kind: DeadLetterKind, reason: String) -> DeadLetter {
        file_reject(&self.name, &self.label, line, bytes, kind, reason)
    }
}

/// What [`read_line_bounded`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LineRead {
    /// Bytes consumed from the reader, newline included (0: end of input).
    pub consumed: u64,
    /// The line was longer than the limit: only its first bytes (up to
    /// the dead letter's preview) were kept.
    pub oversized: bool,
}

/// Reads one line (through its newline, or to the end of input) onto
/// `buf`, keeping at most `max` bytes of it plus the newline: a longer
/// line is read through and dropped but for a preview, so a line of any
/// length costs bounded memory.
pub(crate) fn read_line_bounded(
    r: &mut impl BufRead,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<LineRead> {
    let start = buf.len();
    let keep = max.saturating_add(2);
    let mut consumed = 0u64;
    let mut oversized = false;
    loop {
        let chunk = match r.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            break;
        }
        let (take, done) = match memchr::memchr(b'\n', chunk) {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        let have = buf.len() - start;
        if !oversized {
            let room = keep.saturating_sub(have);
            buf.extend_from_slice(&chunk[..take.min(room)]);
            if take > room {
                oversized = true;
            }
        }
        r.consume(take);
        consumed += take as u64;
        if done {
            break;
        }
    }
    let mut len = buf.len() - start;
    while len > 0 && matches!(buf[start + len - 1], b'\n' | b'\r') {
        len -= 1;
    }
    if len > max {
        oversized = true;
    }
    if oversized {
        buf.truncate(start + len.min(crate::json::RECORD_PREVIEW));
    }
    Ok(LineRead {
        consumed,
        oversized,
    })
}

fn file_reject(
    name: &str,
    label: &str,
    line: u64,
    bytes: &[u8],
    kind: DeadLetterKind,
    reason: String,
) -> DeadLetter {
    DeadLetter {
        source: name.to_string(),
        position: format!("{label}:{line}"),
        kind,
        reason,
        record: preview(bytes),
    }
}

impl Reader {
    /// Positions the reader after `position` (`None`: the file's start).
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
        self.file = Some(BufReader::with_capacity(1 << 20, f));
        self.offset = offset;
        self.line = line;
        Ok(())
    }

    /// Reads and decodes up to `max_rows` records.
    fn poll(&mut self, max_rows: usize) -> Result<Poll> {
        if self.file.is_none() {
            self.seek(None)?;
        }
        let mut rejected = Vec::new();
        let mut lines: Vec<Span> = Vec::new();
        self.buf.clear();
        let mut eof = false;
        // A poll ends after `max_rows` records (rows and rejects), once it
        // holds `POLL_BYTES` of them, or after as many blank lines.
        let mut blank = 0usize;
        while lines.len() + rejected.len() < max_rows
            && self.buf.len() < POLL_BYTES
            && blank < max_rows.saturating_mul(16)
        {
            let start = self.buf.len();
            let Some(reader) = self.file.as_mut() else {
                break;
            };
            let got =
                read_line_bounded(reader, &mut self.buf, self.max_record_bytes).map_err(|e| {
                    EngineError::Io {
                        path: self.path.display().to_string(),
                        source: e,
                    }
                })?;
            if got.consumed == 0 {
                eof = true;
                break;
            }
            self.offset += got.consumed;
            self.line += 1;
            let mut end = self.buf.len();
            while end > start && matches!(self.buf[end - 1], b'\n' | b'\r') {
                end -= 1;
            }
            let line = &self.buf[start..end];
            if got.oversized {
                let d = self.reject(
                    self.line,
                    line,
                    DeadLetterKind::Oversized,
                    format!(
                        "record of {} bytes exceeds max_record_bytes = {}",
                        got.consumed, self.max_record_bytes
                    ),
                );
                rejected.push(d);
                self.buf.truncate(start);
                continue;
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                self.buf.truncate(start);
                blank += 1;
                continue;
            }
            lines.push(Span {
                start,
                end,
                pos: self.line,
            });
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
        let buf = std::mem::take(&mut self.buf);
        let (name, label) = (&self.name, &self.label);
        let reject = |pos: u64, bytes: &[u8], kind: DeadLetterKind, reason: String| {
            file_reject(name, label, pos, bytes, kind, reason)
        };
        let decoded = self.records.decode(&buf, &lines, &reject, &mut rejected);
        self.buf = buf;
        let batch = decoded?.map(|(batch, rows)| SourceBatch {
            batch,
            row_positions: rows.iter().map(|r| lines[*r].pos).collect(),
            partitions: Vec::new(),
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
}

impl Source for JsonFileSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn seek(&mut self, position: Option<&[u8]>) -> Result<()> {
        let r = self.reader()?;
        r.seek(position)?;
        (self.offset, self.line) = (r.offset, r.line);
        Ok(())
    }

    fn poll(&mut self, max_rows: usize) -> Result<Poll> {
        if self.ahead.as_ref().is_some_and(|a| a.max_rows != max_rows) {
            self.reader()?;
        }
        if self.ahead.is_none() {
            let mut r = match self.reader.take() {
                Some(r) => r,
                None => {
                    return Err(EngineError::Internal(format!(
                        "source {}: reader lost",
                        self.name
                    )));
                }
            };
            if r.file.is_none() {
                // Never opened, or stopped at a failed read: from the
                // position after the last poll returned.
                if let Err(e) = r.seek(Some(&self.position())) {
                    self.reader = Some(r);
                    return Err(e);
                }
            }
            self.ahead = Some(ReadAhead::start(r, max_rows)?);
        }
        let got = self.ahead.as_ref().map(|a| a.rx.recv());
        match got {
            Some(Ok(Ok(c))) => {
                (self.offset, self.line) = (c.offset, c.line);
                if matches!(c.poll, Poll::End) {
                    self.reader()?;
                }
                Ok(c.poll)
            }
            Some(Ok(Err(e))) => {
                // The thread stopped at the error; the next poll (or a
                // seek to the last good position) starts it again.
                self.reader()?.file = None;
                Err(e)
            }
            _ => {
                self.reader()?;
                Err(EngineError::Internal(format!(
                    "source {}: the file reader thread ended without its data",
                    self.name
                )))
            }
        }
    }

    fn position(&self) -> Vec<u8> {
        format!("{}:{}", self.offset, self.line).into_bytes()
    }

    fn describe_position(&self, pos: u64) -> String {
        format!("{}:{pos}", self.label)
    }
}
