//! The source and sink seams: what a connector implements for the engine.

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;

use crate::error::Result;

/// A record that could not be used, with where it came from and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeadLetter {
    /// Source (or view, for late events) name.
    pub source: String,
    /// Position in the source, e.g. `clicks.jsonl:17` or `clicks/3@1042`.
    pub position: String,
    /// Why it was rejected.
    pub kind: DeadLetterKind,
    /// A readable explanation.
    pub reason: String,
    /// The record as received (truncated to 4 KiB).
    pub record: String,
}

/// Why a record was rejected. The names (`as_str`, and the `kind` field of
/// a dead-letter file or the `sluice-kind` header of a dead-letter topic) are
/// stable: tools filter on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterKind {
    /// Not JSON, or JSON but not an object, or a message without payload.
    MalformedJson,
    /// A value does not fit its declared column type (event times outside
    /// the supported range included).
    WrongType,
    /// A NOT NULL column is missing or null.
    MissingField,
    /// Larger than the source's `max_record_bytes`.
    Oversized,
    /// Every window holding the event had closed when it arrived.
    LateEvent,
    /// A `CHECK` rule of the source is false for the record.
    CheckFailed,
    /// A view's expression cannot be computed for the record (an integer
    /// division by zero, a cast out of range); the record still feeds the
    /// source's other views.
    ViewError,
    /// An Avro or Protobuf payload that does not decode with its schema, is
    /// not framed as the source says, or names a schema id the source does
    /// not map; a CSV row with more or fewer fields than its header, or
    /// that is not UTF-8.
    MalformedRecord,
}

impl DeadLetterKind {
    /// Every kind, in declaration order.
    pub const ALL: [DeadLetterKind; 8] = [
        DeadLetterKind::MalformedJson,
        DeadLetterKind::WrongType,
        DeadLetterKind::MissingField,
        DeadLetterKind::Oversized,
        DeadLetterKind::LateEvent,
        DeadLetterKind::CheckFailed,
        DeadLetterKind::ViewError,
        DeadLetterKind::MalformedRecord,
    ];

    /// The stable name: `malformed_json`, `wrong_type`, `missing_field`,
    /// `oversized`, `late_event`, `check_failed`, `view_error`,
    /// `malformed_record`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterKind::MalformedJson => "malformed_json",
            DeadLetterKind::WrongType => "wrong_type",
            DeadLetterKind::MissingField => "missing_field",
            DeadLetterKind::Oversized => "oversized",
            DeadLetterKind::LateEvent => "late_event",
            DeadLetterKind::CheckFailed => "check_failed",
            DeadLetterKind::ViewError => "view_error",
            DeadLetterKind::MalformedRecord => "malformed_record",
        }
    }
}

impl std::fmt::Display for DeadLetterKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Rows a source decoded, with the position of each row for error reports.
#[derive(Debug)]
pub struct SourceBatch {
    /// Decoded rows in the source's declared schema.
    pub batch: RecordBatch,
    /// A position label per row (line number, offset).
    pub row_positions: Vec<u64>,
    /// The partition of each row, for per-partition watermarks; empty when
    /// the source has one partition (0).
    pub partitions: Vec<u32>,
}

/// What one poll of a source gave.
#[derive(Debug)]
pub enum Poll {
    /// Rows (possibly none) and rejected records.
    Data {
        /// Decoded rows, if any decoded.
        batch: Option<SourceBatch>,
        /// Records that did not decode or did not fit the schema.
        rejected: Vec<DeadLetter>,
    },
    /// Nothing now; poll again later (unbounded sources).
    Idle,
    /// A bounded source reached its end.
    End,
}

/// A source of events. The engine polls it from one thread; positions are
/// opaque bytes the source can resume from after a restart.
pub trait Source: Send {
    /// The source's name, as declared in the pipeline.
    fn name(&self) -> &str;
    /// The declared schema of the rows it yields.
    fn schema(&self) -> SchemaRef;
    /// Resumes after `position` (from [`Source::position`]); `None` starts at the beginning.
    fn seek(&mut self, position: Option<&[u8]>) -> Result<()>;
    /// Up to `max_rows` rows.
    fn poll(&mut self, max_rows: usize) -> Result<Poll>;
    /// The position after the last row returned by `poll`.
    fn position(&self) -> Vec<u8>;
    /// Describes a row position from [`SourceBatch::row_positions`] for a dead letter.
    fn describe_position(&self, pos: u64) -> String;
    /// The partition and offset of a row position from
    /// [`SourceBatch::row_positions`], as an event archive records them
    /// (default: no partition, the position as the offset).
    fn row_origin(&self, pos: u64) -> (Option<i32>, Option<i64>) {
        (None, i64::try_from(pos).ok())
    }
    /// The partitions this source reads; each holds the watermark back until
    /// it has data or has been idle for the source's `idle_timeout`.
    fn partitions(&self) -> Vec<u32> {
        vec![0]
    }
    /// Why the source cannot make progress now (e.g. its brokers are
    /// unreachable), or `None` when it is healthy.
    fn health(&self) -> Option<String> {
        None
    }
    /// Called after a checkpoint holding [`Source::position`] committed
    /// (e.g. to report offsets to a consumer group for lag monitoring).
    fn committed(&mut self) -> Result<()> {
        Ok(())
    }
}

/// The offline output of one feature view: files of an epoch must be durable
/// when `write_epoch` returns, and invisible if that epoch never commits.
pub trait OfflineSink: Send {
    /// Writes the rows emitted during `epoch`.
    fn write_epoch(&mut self, epoch: u64, batches: &[RecordBatch]) -> Result<usize>;
    /// Takes `writer` (the state dir's id) as the owner of the files it
    /// writes from now on, and removes what this writer wrote in epochs
    /// after `committed` (a crash between writing files and committing),
    /// never another writer's files.
    fn recover(&mut self, writer: &str, committed: u64) -> Result<()>;
}

/// Where dead letters go.
pub trait DeadLetterSink: Send {
    /// Appends one record (buffered).
    fn write(&mut self, letter: &DeadLetter) -> Result<()>;
    /// Makes everything written durable; returns the committed length to record.
    fn commit(&mut self) -> Result<u64>;
    /// Drops whatever was written after `committed_len`.
    fn recover(&mut self, committed_len: u64) -> Result<()>;
}

/// The default of `--dead-letter-limit`: bytes of dead letters written per
/// source over a state dir's life.
pub const DEFAULT_DEAD_LETTER_LIMIT: u64 = 1 << 30;

/// A dead-letter sink with a cap in bytes per source: past it, letters are
/// counted (`sluice_dead_letters_dropped_total`) but not written, so a
/// flood of bad records cannot fill the disk unnoticed. A letter's size is
/// its JSON line's; the bytes used so far are part of each checkpoint, so
/// the cap falls on the same letter in every run of the same input.
pub struct CappedDeadLetters {
    inner: Box<dyn DeadLetterSink>,
    limit: u64,
    used: std::collections::BTreeMap<String, u64>,
    /// Letters dropped since the start of this process.
    dropped: u64,
}

impl CappedDeadLetters {
    /// `inner` capped at `limit` bytes per source, `used` already.
    pub fn new(
        inner: Box<dyn DeadLetterSink>,
        limit: u64,
        used: std::collections::BTreeMap<String, u64>,
    ) -> Self {
        CappedDeadLetters {
            inner,
            limit,
            used,
            dropped: 0,
        }
    }

    /// Bytes written per source (for the checkpoint).
    pub fn used(&self) -> &std::collections::BTreeMap<String, u64> {
        &self.used
    }

    /// Letters dropped by the cap since this process started.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

impl DeadLetterSink for CappedDeadLetters {
    fn write(&mut self, letter: &DeadLetter) -> Result<()> {
        let size = serde_json::to_vec(letter).map_or(0, |v| v.len() as u64 + 1);
        let used = self.used.entry(letter.source.clone()).or_insert(0);
        if used.saturating_add(size) > self.limit {
            if self.dropped == 0 {
                tracing::warn!(source = %letter.source, limit = self.limit, "dead letters past --dead-letter-limit are counted, not written");
            }
            self.dropped += 1;
            metrics::counter!("sluice_dead_letters_dropped_total", "source" => letter.source.clone(), "kind" => letter.kind.as_str())
                .increment(1);
            return Ok(());
        }
        *used += size;
        self.inner.write(letter)
    }

    fn commit(&mut self) -> Result<u64> {
        self.inner.commit()
    }

    fn recover(&mut self, committed_len: u64) -> Result<()> {
        self.inner.recover(committed_len)
    }
}

/// Puts the dead letters of one poll in the order of their records
/// (positions compared with their numbers as numbers: `f.csv:9` before
/// `f.csv:10`, `t/0@7` before `t/1@2`), letters of one record in the order
/// they were made. Written in this order, the letters of a source read in
/// one order (a file, a one-partition topic) come out the same however
/// the input was cut into polls, so the dead-letter cap falls on the same
/// letter in every run.
pub fn sort_by_position(letters: &mut [DeadLetter]) {
    letters.sort_by(|a, b| natural_cmp(&a.position, &b.position));
}

/// Compares texts with their runs of digits as numbers.
fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn runs(s: &str) -> impl Iterator<Item = (bool, &str)> {
        let mut rest = s;
        std::iter::from_fn(move || {
            let first = rest.chars().next()?;
            let digits = first.is_ascii_digit();
            let end = rest
                .find(|c: char| c.is_ascii_digit() != digits)
                .unwrap_or(rest.len());
            let (run, tail) = rest.split_at(end);
            rest = tail;
            Some((digits, run))
        })
    }
    let mut x = runs(a);
    let mut y = runs(b);
    loop {
        match (x.next(), y.next()) {
            (None, None) => return std::cmp::Ordering::Equal,
            (None, Some(_)) => return std::cmp::Ordering::Less,
            (Some(_), None) => return std::cmp::Ordering::Greater,
            (Some((true, p)), Some((true, q))) => {
                let (p, q) = (p.trim_start_matches('0'), q.trim_start_matches('0'));
                let o = p.len().cmp(&q.len()).then_with(|| p.cmp(q));
                if o.is_ne() {
                    return o;
                }
            }
            (Some((_, p)), Some((_, q))) => {
                let o = p.cmp(q);
                if o.is_ne() {
                    return o;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_sort_as_numbers() {
        let mut v: Vec<DeadLetter> = ["f.csv:10", "f.csv:9", "t/1@2", "t/0@7", "f.csv:9"]
            .iter()
            .enumerate()
            .map(|(i, p)| DeadLetter {
                source: "s".into(),
                position: p.to_string(),
                kind: DeadLetterKind::LateEvent,
                reason: i.to_string(),
                record: String::new(),
            })
            .collect();
        sort_by_position(&mut v);
        let got: Vec<(&str, &str)> = v
            .iter()
            .map(|d| (d.position.as_str(), d.reason.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("f.csv:9", "1"),
                ("f.csv:9", "4"),
                ("f.csv:10", "0"),
                ("t/0@7", "3"),
                ("t/1@2", "2")
            ]
        );
    }
}
