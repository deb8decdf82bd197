//! The options of a file source, typed, parsed and checked in one place.

use std::path::{Path, PathBuf};

use sluice_sql::{OptionReader, PipelineError, SourcePlan};

/// Records larger than this are dead-lettered unless `max_record_bytes` says otherwise.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 1 << 20;

/// A file source's `WITH` options.
#[derive(Debug, Clone)]
pub struct FileOptions {
    /// `path`, resolved against the pipeline file's folder: a file, a
    /// folder (read recursively) or a glob.
    pub path: PathBuf,
    /// `format`: 'json' (JSON lines), 'parquet' or 'csv'; when not given,
    /// each file's extension says.
    pub format: Option<FileFormat>,
    /// `max_record_bytes`: longer lines are dead-lettered.
    pub max_record_bytes: usize,
}

impl FileOptions {
    /// The options a file source takes.
    pub const KEYS: &'static [&'static str] =
        &["connector", "path", "format", "max_record_bytes", "archive"];

    /// Reads and checks `source`'s options; an error names the option's
    /// line and column in the pipeline file.
    pub fn parse(source: &SourcePlan) -> Result<Self, PipelineError> {
        let r = OptionReader::new(source, "file sources");
        r.check_known(Self::KEYS, None)?;
        let path = r.path("path")?;
        let format = match r.get("format") {
            None => None,
            Some(f) => Some(match f.to_ascii_lowercase().as_str() {
                "json" | "jsonl" | "ndjson" => FileFormat::JsonLines,
                "parquet" => FileFormat::Parquet,
                "csv" => FileFormat::Csv,
                _ => {
                    return Err(r
                        .error(
                            "format",
                            format!(
                                "unknown file format `{f}`; file sources read 'json' (JSON lines), 'parquet' or 'csv'"
                            ),
                        )
                        .suggest(f, ["json", "parquet", "csv"]));
                }
            }),
        };
        Ok(FileOptions {
            path,
            format,
            max_record_bytes: max_record_bytes(&r)?,
        })
    }
}

/// `max_record_bytes`, a whole number of bytes (default 1 MiB).
pub(crate) fn max_record_bytes(r: &OptionReader<'_>) -> Result<usize, PipelineError> {
    Ok(r.parse("max_record_bytes", |v| {
        v.trim()
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                format!("max_record_bytes must be a positive number of bytes, found `{v}`")
            })
    })?
    .unwrap_or(DEFAULT_MAX_RECORD_BYTES))
}

/// The formats a file can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    /// One JSON object per line.
    JsonLines,
    /// Apache Parquet.
    Parquet,
    /// Comma-separated values with a header line.
    Csv,
}

impl FileFormat {
    /// The format a file name implies, if any.
    pub fn of(path: &Path) -> Option<Self> {
        let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();
        let name = name.strip_suffix(".gz").map(str::to_string).unwrap_or(name);
        let ext = name.rsplit('.').next()?;
        match ext {
            "json" | "jsonl" | "ndjson" => Some(FileFormat::JsonLines),
            "parquet" | "pq" => Some(FileFormat::Parquet),
            "csv" => Some(FileFormat::Csv),
            _ => None,
        }
    }
}
