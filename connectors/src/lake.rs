//! The offline lake: Hive-partitioned Parquet,
//! `{root}/{view}/date=YYYY-MM-DD/part-{epoch}-{writer}-{n}.parquet`, where
//! `writer` is the id of the state dir whose job wrote the file. A file is
//! written under a hidden temporary name, fsynced, then renamed, so readers
//! never see a partial file. On recovery a job removes the files of epochs
//! its own state dir never committed, and nothing else: another state dir's
//! files (a new `--state-dir` over the same lake, a second pipeline, a
//! backfill) are never its to delete.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, BooleanArray, RecordBatch, TimestampMillisecondArray};
use arrow::compute::{concat_batches, filter_record_batch};
use arrow::datatypes::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use sluice_engine::{EngineError, OfflineSink, Result};

/// Partition value for rows without a time.
pub const NULL_PARTITION: &str = "__HIVE_DEFAULT_PARTITION__";

/// Writes one view's emitted rows into the lake.
#[derive(Debug)]
pub struct LakeWriter {
    dir: PathBuf,
    view: String,
    schema: SchemaRef,
    /// File name prefix: `part` for streaming epochs.
    prefix: String,
    /// The column whose UTC date names a row's partition folder:
    /// `window_end` (1) for views, the event time for archives.
    date_column: usize,
    /// An event archive (its own metrics), not a view's lake.
    archive: bool,
    /// The id of the state dir whose files these are (set by
    /// [`OfflineSink::recover`]); `None` for writers that never recover
    /// (backfills, whose files are unique by their run).
    writer: Option<String>,
}

/// The parts of a lake or archive file name written by a streaming job:
/// `part-{epoch}-{writer}-{n}.parquet`, or `part-{epoch}-{n}.parquet` of
/// builds before writer ids (writer `""`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartName<'a> {
    /// The checkpoint that committed the file.
    pub epoch: u64,
    /// The writing state dir's id.
    pub writer: &'a str,
}

impl<'a> PartName<'a> {
    /// Parses a file name (`None` for anything else, temporary files included).
    pub fn parse(name: &'a str) -> Option<Self> {
        let rest = name.strip_prefix("part-")?.strip_suffix(".parquet")?;
        let mut it = rest.split('-');
        let epoch = it.next()?.parse().ok()?;
        let (writer, n) = match (it.next()?, it.next(), it.next()) {
            (n, None, None) => ("", n),
            (w, Some(n), None) => (w, n),
            _ => return None,
        };
        n.parse::<u64>().ok()?;
        Some(PartName { epoch, writer })
    }
}

/// An I/O error on `p`.
pub(crate) fn io(p: &Path, e: std::io::Error) -> EngineError {
    EngineError::Io {
        path: p.display().to_string(),
        source: e,
    }
}

/// `YYYY-MM-DD` of a UTC day number.
pub fn day_string(days: i64) -> String {
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    format!("{:04}-{:02}-{:02}", if m <= 2 { y + 1 } else { y }, m, d)
}

/// The epoch milliseconds at the start of UTC day `YYYY-MM-DD`.
pub fn day_start_ms(day: &str) -> Option<i64> {
    // A year before 1 BC is written with its sign (`-0221-…`).
    let (sign, day) = match day.strip_prefix('-') {
        Some(rest) => (-1, rest),
        None => (1, day),
    };
    let mut it = day.splitn(3, '-');
    let y: i64 = sign * it.next()?.parse::<i64>().ok()?;
    let m: i64 = it.next()?.parse().ok()?;
    let d: i64 = it.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    // Days-from-civil (Howard Hinnant's algorithm), the inverse of `day_string`.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some((era * 146_097 + doe - 719_468) * 86_400_000)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` of epoch milliseconds.
pub fn rfc3339_ms(ms: i64) -> String {
    let day = ms.div_euclid(86_400_000);
    let r = ms.rem_euclid(86_400_000);
    format!(
        "{}T{:02}:{:02}:{:02}.{:03}Z",
        day_string(day),
        r / 3_600_000,
        r / 60_000 % 60,
        r / 1000 % 60,
        r % 1000
    )
}

impl LakeWriter {
    /// A writer for `view` under `root`.
    pub fn new(root: &Path, view: &str, schema: SchemaRef) -> Self {
        LakeWriter {
            dir: root.join(view),
            view: view.to_string(),
            schema,
            prefix: "part".into(),
            date_column: 1,
            archive: false,
            writer: None,
        }
    }

    /// The event archive of source `source` in `dir`
    /// (`{dir}/date=YYYY-MM-DD/part-{epoch}-{writer}-{n}.parquet`, by event date).
    pub fn archive(dir: &Path, source: &str, schema: SchemaRef, event_time: usize) -> Self {
        LakeWriter {
            dir: dir.to_path_buf(),
            view: source.to_string(),
            schema,
            prefix: "part".into(),
            date_column: event_time,
            archive: true,
            writer: None,
        }
    }

    /// Names files `{prefix}-{n}-{part}.parquet` instead of `part-…`; a
    /// streaming run's recovery leaves such files alone (backfills).
    pub fn with_prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.to_string();
        self
    }

    fn write_file(&self, path: &Path, batch: &RecordBatch) -> Result<()> {
        write_parquet_atomically(path, batch)
    }
}

/// Writes `batch` to `path` as one Parquet file: under a hidden temporary
/// name, fsynced, renamed, the folder fsynced, so readers never see a
/// partial file (lake files and served-value logs).
pub(crate) fn write_parquet_atomically(path: &Path, batch: &RecordBatch) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let f = File::create(&tmp).map_err(|e| io(&tmp, e))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let perr = |e: parquet::errors::ParquetError| EngineError::Connector {
        what: format!("lake file {}", tmp.display()),
        message: e.to_string(),
    };
    let mut w = ArrowWriter::try_new(f, batch.schema(), Some(props)).map_err(perr)?;
    w.write(batch).map_err(perr)?;
    let f = w.into_inner().map_err(perr)?;
    f.sync_all().map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, e))?;
    Ok(())
}

impl OfflineSink for LakeWriter {
    fn write_epoch(&mut self, epoch: u64, batches: &[RecordBatch]) -> Result<usize> {
        let all = concat_batches(&self.schema, batches)
            .map_err(|e| EngineError::arrow("lake rows", e))?;
        let n = all.num_rows();
        if n == 0 {
            return Ok(0);
        }
        if self.archive {
            metrics::counter!("sluice_archive_rows_total", "source" => self.view.clone())
                .increment(n as u64);
        } else {
            metrics::counter!("sluice_lake_rows_total", "view" => self.view.clone())
                .increment(n as u64);
        }
        // Partition by the UTC date of window_end (views) or the event time (archives).
        let ms = arrow::compute::cast(
            all.column(self.date_column),
            &arrow::datatypes::DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, None),
        )
        .ok();
        let ends = ms
            .as_ref()
            .and_then(|a| a.as_any().downcast_ref::<TimestampMillisecondArray>());
        let day_of = |i: usize| match ends {
            Some(a) if a.is_valid(i) => Some(a.value(i).div_euclid(86_400_000)),
            _ => None,
        };
        let mut days: BTreeMap<Option<i64>, Vec<bool>> = BTreeMap::new();
        for i in 0..n {
            days.entry(day_of(i)).or_insert_with(|| vec![false; n])[i] = true;
        }
        for (part, (day, mask)) in days.into_iter().enumerate() {
            let b = if mask.iter().all(|m| *m) {
                all.clone()
            } else {
                filter_record_batch(&all, &BooleanArray::from(mask))
                    .map_err(|e| EngineError::arrow("lake partition", e))?
            };
            let pdir = match day {
                Some(d) => format!("date={}", day_string(d)),
                None => format!("date={NULL_PARTITION}"),
            };
            let name = match &self.writer {
                Some(w) => format!("{}-{epoch:010}-{w}-{part}.parquet", self.prefix),
                None => format!("{}-{epoch:010}-{part}.parquet", self.prefix),
            };
            let path = self.dir.join(pdir).join(name);
            self.write_file(&path, &b)?;
            metrics::counter!("sluice_lake_files_total").increment(1);
        }
        Ok(n)
    }

    fn recover(&mut self, writer: &str, committed: u64) -> Result<()> {
        self.writer = Some(writer.to_string());
        let Ok(parts) = std::fs::read_dir(&self.dir) else {
            return Ok(());
        };
        for p in parts.flatten() {
            let Ok(files) = std::fs::read_dir(p.path()) else {
                continue;
            };
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                // `.{name}.tmp`: a file this writer was writing when it stopped.
                let (name, tmp) = match name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp"))
                {
                    Some(n) => (n, true),
                    None => (name.as_str(), false),
                };
                let Some(part) = PartName::parse(name) else {
                    continue;
                };
                if part.writer == writer && (tmp || part.epoch > committed) {
                    std::fs::remove_file(f.path()).map_err(|e| io(&f.path(), e))?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{day_start_ms, day_string, rfc3339_ms};

    #[test]
    fn civil_dates() {
        assert_eq!(day_string(0), "1970-01-01");
        assert_eq!(day_string(19_723), "2024-01-01");
        assert_eq!(day_string(-1), "1969-12-31");
        assert_eq!(day_string(19_782), "2024-02-29");
    }

    #[test]
    fn day_starts_invert_day_strings() {
        for d in [-800_000, -1, 0, 19_723, 19_782, 2_000_000] {
            assert_eq!(day_start_ms(&day_string(d)), Some(d * 86_400_000), "{d}");
        }
        assert_eq!(day_start_ms("2024-13-01"), None);
        assert_eq!(day_start_ms("soon"), None);
        assert_eq!(rfc3339_ms(1_704_067_200_123), "2024-01-01T00:00:00.123Z");
        assert_eq!(rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
    }
}
