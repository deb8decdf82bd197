//! Training sets: a spine file (entity keys, a timestamp, labels) joined
//! point-in-time-correctly with feature views read from their lakes.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::sync_channel;

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, TimestampMillisecondArray};
use arrow::compute::{CastOptions, cast_with_options, concat_batches};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ArrowPredicateFn, ParquetRecordBatchReaderBuilder, RowFilter};
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use sluice_engine::output::emitted_schema;
use sluice_engine::replay::{History, SpineRows, ViewValues, replay};
use sluice_engine::time::event_time_problem;
use sluice_engine::training::{AsOf, Found, Probe, time_millis};
use sluice_engine::view::ViewOp;
use sluice_engine::{EngineError, Result};
use sluice_sql::PipelinePlan;

use crate::files::{FileFormat, FilesSource, InputFile};
use crate::lake::{day_string, io};

/// The features asked of one view: `VIEW` (all) or `VIEW:COL,COL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureRequest {
    /// Feature view.
    pub view: String,
    /// Feature columns; empty: all of them.
    pub columns: Vec<String>,
}

impl std::str::FromStr for FeatureRequest {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (view, cols) = match s.split_once(':') {
            Some((v, c)) => (v, c),
            None => (s, ""),
        };
        if view.is_empty() {
            return Err(format!("`{s}`: expected VIEW or VIEW:COL,COL"));
        }
        Ok(FeatureRequest {
            view: view.to_string(),
            columns: cols
                .split(',')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect(),
        })
    }
}

/// What `sluice training-set` is asked.
#[derive(Debug, Clone)]
pub struct TrainingSetRequest {
    /// The spine file (.parquet, .csv, .jsonl).
    pub spine: PathBuf,
    /// Views and their columns.
    pub features: Vec<FeatureRequest>,
    /// View key column → spine column, where the names differ.
    pub keys: HashMap<String, String>,
    /// The spine's time column (default: its only timestamp column).
    pub time_column: Option<String>,
    /// Output file (.parquet, .csv, .jsonl).
    pub out: PathBuf,
    /// Windowed views from the closed-window rows of their lake instead of
    /// a replay of their history.
    pub closed_windows: bool,
    /// A source's history for replays, given as files (`--source NAME=PATH`).
    pub sources: HashMap<String, Vec<InputFile>>,
    /// Where replays dead-letter undecodable and late events.
    pub dead_letters: PathBuf,
    /// Per source, the writer (state dir id) whose event archive a replay
    /// reads when several state dirs archived into it (default: the one
    /// that wrote last).
    pub archive_writers: HashMap<String, String>,
}

/// What a training-set join did, per view.
#[derive(Debug, Clone, Default)]
pub struct TrainingSetStats {
    /// Spine rows (= output rows).
    pub rows: usize,
    /// Spine rows whose time is outside the supported event-time range
    /// (years 1677 to 2262): their features are NULL.
    pub times_out_of_range: usize,
    /// Per view: (name, lake files read, lake rows read, rows found, empty-set rows, NULL rows).
    pub views: Vec<ViewJoinStats>,
    /// Per replayed source: what the replay read and where its history came from.
    pub replays: Vec<ReplayReport>,
    /// Dead letters the replays wrote (to the request's `dead_letters`).
    pub dead_letters: u64,
}

/// What the replay of one source's history did.
#[derive(Debug, Clone, Default)]
pub struct ReplayReport {
    /// The source.
    pub source: String,
    /// Where its events came from (files, or the event archive).
    pub history: String,
    /// Events read.
    pub events: u64,
    /// Events late for a replayed view (dead-lettered, not folded in).
    pub late: u64,
    /// Clocks the tiles were flushed at.
    pub flushes: u64,
}

/// One view's part of a training set.
#[derive(Debug, Clone, Default)]
pub struct ViewJoinStats {
    /// View name.
    pub view: String,
    /// Lake files read.
    pub files: usize,
    /// Lake rows read.
    pub lake_rows: usize,
    /// Spine rows that got a lake row.
    pub found: usize,
    /// Spine rows whose window was empty (aggregate over the empty set).
    pub empty: usize,
    /// Spine rows left NULL (no key, or a time outside the lake).
    pub null: usize,
    /// Replayed views: spine rows whose time the history's watermark never reached (NULL).
    pub beyond: usize,
    /// The values come from a replay of the view's history (not the lake).
    pub replayed: bool,
}

fn cerr(what: impl Into<String>, message: impl Into<String>) -> EngineError {
    EngineError::Connector {
        what: what.into(),
        message: message.into(),
    }
}

/// Reads a whole table file; `text_column` is read as text whatever its inferred type (CSV).
pub fn read_table(path: &Path, text_column: Option<&str>) -> Result<RecordBatch> {
    let format = FileFormat::of(path).ok_or_else(|| {
        cerr(
            format!("{}", path.display()),
            "unknown format: name it .parquet, .csv or .jsonl",
        )
    })?;
    let ctx = format!("reading {}", path.display());
    // Text columns that hold times, converted to TIMESTAMP (UTC) after reading.
    let mut times: Vec<String> = text_column.map(|c| vec![c.to_string()]).unwrap_or_default();
    let (schema, batches): (SchemaRef, Vec<RecordBatch>) = match format {
        FileFormat::Parquet => {
            let f = File::open(path).map_err(|e| io(path, e))?;
            let b = ParquetRecordBatchReaderBuilder::try_new(f)
                .map_err(|e| cerr(ctx.clone(), e.to_string()))?;
            let schema = Arc::clone(b.schema());
            let r = b
                .with_batch_size(65536)
                .build()
                .map_err(|e| cerr(ctx.clone(), e.to_string()))?;
            let batches = r
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| EngineError::arrow(ctx.clone(), e))?;
            (schema, batches)
        }
        FileFormat::Csv => {
            let mut f = File::open(path).map_err(|e| io(path, e))?;
            let (inferred, _) = arrow::csv::reader::Format::default()
                .with_header(true)
                .infer_schema(&mut f, Some(10_000))
                .map_err(|e| EngineError::arrow(ctx.clone(), e))?;
            // Timestamps are parsed by us (any offset, epoch ms): read them as text.
            let fields: Vec<Field> = inferred
                .fields()
                .iter()
                .map(|fl| {
                    if matches!(
                        fl.data_type(),
                        DataType::Timestamp(_, _) | DataType::Date32 | DataType::Date64
                    ) || Some(fl.name().as_str()) == text_column
                    {
                        times.push(fl.name().clone());
                        Field::new(fl.name(), DataType::Utf8, true)
                    } else {
                        fl.as_ref().clone().with_nullable(true)
                    }
                })
                .collect();
            let schema = Arc::new(Schema::new(fields));
            f.seek(SeekFrom::Start(0)).map_err(|e| io(path, e))?;
            let r = arrow::csv::ReaderBuilder::new(Arc::clone(&schema))
                .with_header(true)
                .with_batch_size(65536)
                .build(f)
                .map_err(|e| EngineError::arrow(ctx.clone(), e))?;
            let batches = r
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| EngineError::arrow(ctx.clone(), e))?;
            (schema, batches)
        }
        FileFormat::JsonLines => {
            let f = File::open(path).map_err(|e| io(path, e))?;
            let mut br = BufReader::new(f);
            let (inferred, _) =
                arrow::json::reader::infer_json_schema_from_seekable(&mut br, Some(10_000))
                    .map_err(|e| EngineError::arrow(ctx.clone(), e))?;
            br.seek(SeekFrom::Start(0)).map_err(|e| io(path, e))?;
            let schema = Arc::new(inferred);
            let r = arrow::json::ReaderBuilder::new(Arc::clone(&schema))
                .with_batch_size(65536)
                .build(br)
                .map_err(|e| EngineError::arrow(ctx.clone(), e))?;
            let batches = r
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| EngineError::arrow(ctx.clone(), e))?;
            (schema, batches)
        }
    };
    let table =
        concat_batches(&schema, &batches).map_err(|e| EngineError::arrow(ctx.clone(), e))?;
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    let mut cols = table.columns().to_vec();
    for (i, f) in schema.fields().iter().enumerate() {
        if times.contains(f.name()) && matches!(f.data_type(), DataType::Utf8 | DataType::LargeUtf8)
        {
            let ms = time_millis(&cols[i])?;
            cols[i] = Arc::new(TimestampMillisecondArray::from(ms).with_timezone("UTC"));
            fields[i] = Field::new(f.name(), cols[i].data_type().clone(), true);
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)
        .map_err(|e| EngineError::arrow(ctx, e))
}

/// Writes a table by the file's extension (.parquet, .csv, .jsonl/.json).
pub fn write_table(path: &Path, batch: &RecordBatch) -> Result<()> {
    let format = FileFormat::of(path).ok_or_else(|| {
        cerr(
            format!("{}", path.display()),
            "unknown output format: name it .parquet, .csv or .jsonl",
        )
    })?;
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).map_err(|e| io(d, e))?;
    }
    let f = File::create(path).map_err(|e| io(path, e))?;
    let ctx = format!("writing {}", path.display());
    match format {
        FileFormat::Parquet => {
            let props = WriterProperties::builder()
                .set_compression(Compression::SNAPPY)
                .build();
            let mut w = ArrowWriter::try_new(f, batch.schema(), Some(props))
                .map_err(|e| cerr(ctx.clone(), e.to_string()))?;
            w.write(batch)
                .map_err(|e| cerr(ctx.clone(), e.to_string()))?;
            w.close().map_err(|e| cerr(ctx, e.to_string()))?;
        }
        FileFormat::Csv => {
            let mut w = arrow::csv::WriterBuilder::new().with_header(true).build(f);
            w.write(batch).map_err(|e| EngineError::arrow(ctx, e))?;
        }
        FileFormat::JsonLines => {
            let mut w = arrow::json::WriterBuilder::new()
                .with_explicit_nulls(true)
                .build::<_, arrow::json::writer::LineDelimited>(f);
            w.write(batch)
                .map_err(|e| EngineError::arrow(ctx.clone(), e))?;
            w.finish().map_err(|e| EngineError::arrow(ctx, e))?;
        }
    }
    Ok(())
}

/// The Parquet files of a view's lake with the day of their `date=` folder
/// (`None` for the NULL partition or unpartitioned files), in path order.
pub fn lake_files(dir: &Path) -> Result<Vec<(PathBuf, Option<String>)>> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(out);
    };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = e.path();
        if path.is_dir() {
            let day = name
                .strip_prefix("date=")
                .filter(|d| d.len() == 10)
                .map(str::to_string);
            let mut files: Vec<_> = std::fs::read_dir(&path)
                .map_err(|er| io(&path, er))?
                .flatten()
                .filter(|f| {
                    let n = f.file_name().to_string_lossy().into_owned();
                    !n.starts_with('.') && n.ends_with(".parquet")
                })
                .map(|f| f.path())
                .collect();
            files.sort();
            out.extend(files.into_iter().map(|f| (f, day.clone())));
        } else if name.ends_with(".parquet") {
            out.push((path, None));
        }
    }
    Ok(out)
}

/// Builds a training set: every spine row, with each requested view's
/// features as of the row's time.
pub fn training_set(plan: &PipelinePlan, req: &TrainingSetRequest) -> Result<TrainingSetStats> {
    let spine = read_table(&req.spine, req.time_column.as_deref())?;
    let what = format!("spine {}", req.spine.display());
    let (out, stats) = join_spine(plan, req, &spine, &what)?;
    write_table(&req.out, &out)?;
    Ok(stats)
}

/// Joins a spine held in memory (`what` names it in errors): the training
/// set [`training_set`] would write, returned instead. `req.spine` and
/// `req.out` are not read.
pub fn join_spine(
    plan: &PipelinePlan,
    req: &TrainingSetRequest,
    spine: &RecordBatch,
    what: &str,
) -> Result<(RecordBatch, TrainingSetStats)> {
    let sschema = spine.schema();
    let time_col = match &req.time_column {
        Some(c) => sschema.index_of(c).map_err(|_| {
            cerr(
                what,
                format!("no column `{c}` (columns: {})", names(&sschema)),
            )
        })?,
        None => {
            let ts: Vec<usize> = (0..sschema.fields().len())
                .filter(|i| matches!(sschema.field(*i).data_type(), DataType::Timestamp(_, _)))
                .collect();
            match ts.as_slice() {
                [one] => *one,
                _ => {
                    return Err(cerr(
                        what,
                        format!(
                            "{} timestamp columns; name the time column with --time-column (columns: {})",
                            ts.len(),
                            names(&sschema)
                        ),
                    ));
                }
            }
        }
    };
    let mut ts = time_millis(spine.column(time_col))?;
    // A time no event can have joins nothing: NULL features, counted, and
    // NULL in the output's time column too (no format writes such an instant).
    let mut times_out_of_range = 0;
    let mut out_of_range = Vec::with_capacity(ts.len());
    for t in ts.iter_mut() {
        let bad = t.is_some_and(|t| event_time_problem(t).is_some());
        if bad {
            *t = None;
            times_out_of_range += 1;
        }
        out_of_range.push(bad);
    }
    let mut stats = TrainingSetStats {
        rows: spine.num_rows(),
        times_out_of_range,
        ..Default::default()
    };
    let mut fields: Vec<Field> = sschema
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    let mut cols: Vec<ArrayRef> = spine.columns().to_vec();
    if times_out_of_range > 0 {
        cols[time_col] = arrow::compute::nullif(&cols[time_col], &BooleanArray::from(out_of_range))
            .map_err(|e| EngineError::arrow("spine time column", e))?;
        fields[time_col] = fields[time_col].clone().with_nullable(true);
    }
    // Every request is checked before any history is replayed.
    for fr in &req.features {
        select(plan, fr)?;
    }
    let replayed = replay_views(plan, req, spine, &ts, &mut stats)?;
    for fr in &req.features {
        let (f, c, s) = join_view(plan, req, fr, spine, &ts, &replayed)?;
        fields.extend(f);
        cols.extend(c);
        stats.views.push(s);
    }
    let out = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)
        .map_err(|e| EngineError::arrow("training set", e))?;
    Ok((out, stats))
}

fn names(s: &Schema) -> String {
    s.fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

type Joined = (Vec<Field>, Vec<ArrayRef>, ViewJoinStats);

/// Does a training set replay this view (a windowed view, unless the
/// request asks for closed-window lake rows)?
fn replays(req: &TrainingSetRequest, vp: &sluice_sql::ViewPlan) -> bool {
    !req.closed_windows
        && matches!(
            vp.window(),
            Some(sluice_sql::WindowSpec::Hop { .. } | sluice_sql::WindowSpec::Tumble { .. })
        )
}

/// Per spine row: a key column held a value that its cast to the view's
/// key type turned into NULL.
fn unfit_keys(
    vp: &sluice_sql::ViewPlan,
    req: &TrainingSetRequest,
    spine: &RecordBatch,
    cast: &[ArrayRef],
) -> Vec<bool> {
    let mut bad = vec![false; spine.num_rows()];
    for (k, c) in vp.keys.iter().zip(cast) {
        let col = req.keys.get(k).unwrap_or(k);
        let Some(orig) = spine.column_by_name(col) else {
            continue;
        };
        for (i, b) in bad.iter_mut().enumerate() {
            *b |= orig.is_valid(i) && c.is_null(i);
        }
    }
    bad
}

/// The spine's key columns for `vp`, cast to the view's key types.
fn spine_keys(
    vp: &sluice_sql::ViewPlan,
    req: &TrainingSetRequest,
    spine: &RecordBatch,
    what: &str,
) -> Result<Vec<ArrayRef>> {
    let emitted = emitted_schema(&vp.output_schema);
    let sschema = spine.schema();
    let opts = CastOptions {
        safe: true,
        ..Default::default()
    };
    let mut out = Vec::new();
    for k in &vp.keys {
        let ki = emitted
            .index_of(k)
            .map_err(|e| EngineError::arrow("view keys", e))?;
        let col = req.keys.get(k).cloned().unwrap_or_else(|| k.clone());
        let idx = sschema.index_of(&col).map_err(|_| {
            cerr(
                what.to_string(),
                format!(
                    "the spine has no column `{col}` for key `{k}` of view `{}`; map it with --key {k}=SPINECOL (spine columns: {})",
                    vp.name,
                    names(&sschema)
                ),
            )
        })?;
        let t = emitted.field(ki).data_type();
        out.push(
            cast_with_options(spine.column(idx), t, &opts)
                .map_err(|e| EngineError::arrow(format!("spine column `{col}` as {t}"), e))?,
        );
    }
    Ok(out)
}

/// Where the history of source `sp` comes from for a replay: `--source`
/// files, else its event archive, else a file source's own file.
fn history_of(
    req: &TrainingSetRequest,
    sp: &sluice_sql::SourcePlan,
    view: &str,
) -> Result<(History, String)> {
    if let Some(files) = req.sources.get(&sp.name) {
        let label = format!("{} file(s) given with --source", files.len());
        return Ok((
            History {
                source: Box::new(FilesSource::new(sp, files.clone())),
                recorded: false,
            },
            label,
        ));
    }
    let archive = crate::archive::archive_dir(sp)
        .map_err(|e| cerr(format!("source {}", sp.name), e.to_string()))?;
    if let Some(dir) = archive {
        let a = crate::archive::ArchiveSource::open(
            sp,
            &dir,
            req.archive_writers.get(&sp.name).map(String::as_str),
        )?;
        let mut label = format!(
            "event archive {} ({} checkpoints",
            dir.display(),
            a.epochs()
        );
        if a.writers().len() > 1 {
            label.push_str(&format!(
                " of writer {}; the archive's writers: {}; choose with --archive-writer {}=ID",
                a.writer(),
                crate::archive::describe_writers(a.writers()),
                sp.name
            ));
        }
        label.push(')');
        return Ok((
            History {
                source: Box::new(a),
                recorded: true,
            },
            label,
        ));
    }
    if sp.connector == "file" {
        let o = crate::FileOptions::parse(sp)
            .map_err(|e| cerr(format!("source {}", sp.name), e.to_string()))?;
        let files = crate::files::source_files(&o)?;
        let label = format!("{} (the source's files)", o.path.display());
        return Ok((
            History {
                source: Box::new(FilesSource::new(sp, files)),
                recorded: false,
            },
            label,
        ));
    }
    Err(cerr(
        format!("--features {view}"),
        format!(
            "view `{view}` reads {} source `{}`, whose history this training set cannot replay: give its events with --source {}=PATH, or declare archive = 'path' on the source so `sluice run` keeps what it accepts (--closed-windows reads the view's lake instead)",
            sp.connector, sp.name, sp.name
        ),
    ))
}

/// Replays the history of every source a requested windowed view reads,
/// once per source for all of its requested views.
fn replay_views(
    plan: &PipelinePlan,
    req: &TrainingSetRequest,
    spine: &RecordBatch,
    ts: &[Option<i64>],
    stats: &mut TrainingSetStats,
) -> Result<HashMap<String, ViewValues>> {
    let mut by_source: Vec<(String, Vec<SpineRows>)> = Vec::new();
    for fr in &req.features {
        let Some(vp) = plan.view(&fr.view) else {
            continue;
        };
        if !replays(req, vp) {
            continue;
        }
        let what = format!("--features {}", fr.view);
        let keys = spine_keys(vp, req, spine, &what)?;
        // A NULL key column is the key's `\N`, as the view's GROUP BY
        // groups it and an online read of `\N` answers it.
        // A spine value its key type cannot hold matches no key.
        let unfit = unfit_keys(vp, req, spine, &keys);
        let keys: Vec<Option<String>> = sluice_engine::keys::key_strings(&keys)?
            .into_iter()
            .zip(unfit)
            .map(|(k, bad)| (!bad).then_some(k))
            .collect();
        let rows = SpineRows {
            view: vp.name.clone(),
            keys,
            times: ts.to_vec(),
        };
        match by_source.iter_mut().find(|(s, _)| *s == vp.source) {
            Some((_, v)) => {
                if !v.iter().any(|r| r.view == rows.view) {
                    v.push(rows);
                }
            }
            None => by_source.push((vp.source.clone(), vec![rows])),
        }
    }
    let mut out = HashMap::new();
    if by_source.is_empty() {
        return Ok(out);
    }
    if req.dead_letters.exists() {
        std::fs::remove_file(&req.dead_letters).map_err(|e| io(&req.dead_letters, e))?;
    }
    let mut dead = crate::DeadLetterFile::at(&req.dead_letters);
    for (source, spines) in by_source {
        let Some(sp) = plan.source(&source) else {
            continue;
        };
        let (history, label) = history_of(req, sp, &spines[0].view)?;
        let (values, rs) = replay(plan, history, &spines, &mut dead)?;
        stats.dead_letters += rs.dead_letters;
        stats.replays.push(ReplayReport {
            source: source.clone(),
            history: label,
            events: rs.events,
            late: rs.late,
            flushes: rs.flushes,
        });
        for v in values {
            out.insert(v.view.clone(), v);
        }
    }
    Ok(out)
}

/// A feature request checked against the pipeline: the view, its emitted
/// schema, the key columns' and the requested features' indexes in it.
struct Selected<'p> {
    what: String,
    vp: &'p sluice_sql::ViewPlan,
    emitted: SchemaRef,
    keys: Vec<usize>,
    features: Vec<usize>,
}

fn select<'p>(plan: &'p PipelinePlan, fr: &FeatureRequest) -> Result<Selected<'p>> {
    let what = format!("--features {}", fr.view);
    let Some(vp) = plan.view(&fr.view) else {
        let known: Vec<&str> = plan.views.iter().map(|v| v.name.as_str()).collect();
        return Err(cerr(
            what,
            format!(
                "no feature view `{}` (views: {})",
                fr.view,
                known.join(", ")
            ),
        ));
    };
    let emitted = emitted_schema(&vp.output_schema);
    let keys: Vec<usize> = vp
        .keys
        .iter()
        .map(|k| emitted.index_of(k))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| EngineError::arrow("view keys", e))?;
    let all_features: Vec<usize> = (2..emitted.fields().len())
        .filter(|i| !keys.contains(i))
        .collect();
    let features: Vec<usize> = if fr.columns.is_empty() {
        all_features.clone()
    } else {
        fr.columns
            .iter()
            .map(|c| {
                emitted
                    .index_of(c)
                    .ok()
                    .filter(|i| all_features.contains(i))
                    .ok_or_else(|| {
                        let known: Vec<&str> = all_features
                            .iter()
                            .map(|i| emitted.field(*i).name().as_str())
                            .collect();
                        cerr(
                            what.clone(),
                            format!(
                                "view `{}` has no feature `{c}` (features: {})",
                                vp.name,
                                known.join(", ")
                            ),
                        )
                    })
            })
            .collect::<Result<_>>()?
    };
    Ok(Selected {
        what,
        vp,
        emitted,
        keys,
        features,
    })
}

fn join_view(
    plan: &PipelinePlan,
    req: &TrainingSetRequest,
    fr: &FeatureRequest,
    spine: &RecordBatch,
    ts: &[Option<i64>],
    replayed: &HashMap<String, ViewValues>,
) -> Result<Joined> {
    let Selected {
        what,
        vp,
        emitted,
        keys,
        features,
    } = select(plan, fr)?;
    let out_field = |i: usize| {
        let f = emitted.field(i);
        Field::new(
            format!("{}__{}", vp.name, f.name()),
            f.data_type().clone(),
            true,
        )
    };
    if let Some(v) = replayed.get(&vp.name) {
        let cols = features
            .iter()
            .map(|i| {
                let name = emitted.field(*i).name();
                v.batch
                    .column_by_name(name)
                    .cloned()
                    .ok_or_else(|| cerr(what.clone(), format!("replay lacks `{name}`")))
            })
            .collect::<Result<Vec<_>>>()?;
        let js = ViewJoinStats {
            view: vp.name.clone(),
            found: v.found,
            null: v.null,
            beyond: v.beyond,
            replayed: true,
            ..Default::default()
        };
        return Ok((features.iter().map(|i| out_field(*i)).collect(), cols, js));
    }
    let Some(root) = &vp.offline else {
        return Err(cerr(
            what,
            format!("view `{}` has no lake (WITH offline = '…')", vp.name),
        ));
    };
    let spine_keys = spine_keys(vp, req, spine, &what)?;
    let feat_schema = Arc::new(Schema::new(
        features
            .iter()
            .map(|i| emitted.field(*i).as_ref().clone().with_nullable(true))
            .collect::<Vec<_>>(),
    ));
    let op = ViewOp::new(vp)?;
    let empty = match op.agg() {
        Some(a) => match a.kernel().empty_row()? {
            Some(row) => {
                let cols = features
                    .iter()
                    .map(|i| {
                        let name = emitted.field(*i).name();
                        row.column_by_name(name)
                            .cloned()
                            .ok_or_else(|| cerr(what.clone(), format!("empty row lacks `{name}`")))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Some(
                    RecordBatch::try_new(Arc::clone(&feat_schema), cols)
                        .map_err(|e| EngineError::arrow("empty-set row", e))?,
                )
            }
            None => None,
        },
        None => None,
    };
    let slide = vp.window().and_then(|w| w.slide_ms());
    let mut asof = AsOf::new(
        &vp.name,
        slide,
        &spine_keys,
        ts,
        Arc::clone(&feat_schema),
        empty,
    )?;
    // Only date folders that can hold a row valid at some spine time.
    let valid_ts: Vec<i64> = ts.iter().flatten().copied().collect();
    let max_day = valid_ts
        .iter()
        .max()
        .map(|t| day_string(t.div_euclid(86_400_000)));
    let min_day = match slide {
        Some(s) => valid_ts
            .iter()
            .min()
            .map(|t| day_string((t.div_euclid(s) * s).div_euclid(86_400_000))),
        None => None,
    };
    let dir = root.join(&vp.name);
    let mut files = Vec::new();
    let (mut earlier, mut later) = (false, false);
    for (f, day) in lake_files(&dir)? {
        match (&day, &max_day) {
            (Some(d), Some(m)) if d > m => {
                later = true;
                continue;
            }
            _ => {}
        }
        if let (Some(d), Some(m)) = (&day, &min_day)
            && d < m
        {
            earlier = true;
            continue;
        }
        files.push(f);
    }
    let mut js = ViewJoinStats {
        view: vp.name.clone(),
        files: files.len(),
        ..Default::default()
    };
    let mut proj = vec![1usize];
    proj.extend(&keys);
    proj.extend(&features);
    let names: Vec<String> = proj
        .iter()
        .map(|i| emitted.field(*i).name().clone())
        .collect();
    // Two threads decode the lake, dropping rows no spine row can use
    // before their features are decoded; this one collects the rest.
    let (tx, rx) = sync_channel::<Result<RecordBatch>>(4);
    let probe = asof.probe();
    let nk = keys.len();
    std::thread::scope(|scope| -> Result<()> {
        let names = &names;
        for part in 0..2usize {
            let tx = tx.clone();
            let probe = Arc::clone(&probe);
            let mine: Vec<PathBuf> = files.iter().skip(part).step_by(2).cloned().collect();
            scope.spawn(move || {
                for f in &mine {
                    if let Err(e) = read_lake_file(f, names, nk, &probe, &tx) {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            });
        }
        drop(tx);
        for b in rx {
            let b = b?;
            let ends = b
                .column(0)
                .as_any()
                .downcast_ref::<TimestampMillisecondArray>()
                .cloned()
                .ok_or_else(|| cerr(what.clone(), "lake window_end is not TIMESTAMP(ms)"))?;
            let kcols: Vec<ArrayRef> = (1..=nk).map(|i| Arc::clone(b.column(i))).collect();
            let fcols: Vec<ArrayRef> = (nk + 1..b.num_columns())
                .map(|i| Arc::clone(b.column(i)))
                .collect();
            let fb = RecordBatch::try_new(Arc::clone(&feat_schema), fcols)
                .map_err(|e| EngineError::arrow("lake features", e))?;
            asof.push(&ends, &kcols, &fb)?;
        }
        Ok(())
    })?;
    js.lake_rows = probe.scanned() as usize;
    let (cols, found) = asof.finish((earlier, later))?;
    for f in &found {
        match f {
            Found::Row => js.found += 1,
            Found::Empty => js.empty += 1,
            Found::Null => js.null += 1,
        }
    }
    let fields = features.iter().map(|i| out_field(*i)).collect();
    Ok((fields, cols, js))
}

fn read_lake_file(
    path: &Path,
    names: &[String],
    nk: usize,
    probe: &Arc<Probe>,
    tx: &std::sync::mpsc::SyncSender<Result<RecordBatch>>,
) -> Result<()> {
    let ctx = format!("lake file {}", path.display());
    let f = File::open(path).map_err(|e| io(path, e))?;
    let b = ParquetRecordBatchReaderBuilder::try_new(f)
        .map_err(|e| cerr(ctx.clone(), e.to_string()))?;
    let schema = Arc::clone(b.schema());
    let idx: Vec<usize> = names
        .iter()
        .map(|n| {
            schema.index_of(n).map_err(|_| {
                cerr(
                    ctx.clone(),
                    format!("no column `{n}`: written by another version of the view?"),
                )
            })
        })
        .collect::<Result<_>>()?;
    // Decoded columns come in file order: where each requested one lands.
    let order = |wanted: &[usize]| -> Vec<usize> {
        let mut sorted = wanted.to_vec();
        sorted.sort_unstable();
        wanted
            .iter()
            .map(|i| sorted.binary_search(i).unwrap_or(0))
            .collect()
    };
    // Late materialization: window_end and the keys first; features only
    // for the rows the spine can use.
    let probe_cols = &idx[..=nk];
    let probe_order = order(probe_cols);
    let p = Arc::clone(probe);
    let predicate = ArrowPredicateFn::new(
        ProjectionMask::roots(b.parquet_schema(), probe_cols.to_vec()),
        move |batch: RecordBatch| {
            let ends = batch
                .column(probe_order[0])
                .as_any()
                .downcast_ref::<TimestampMillisecondArray>()
                .cloned()
                .ok_or_else(|| {
                    arrow::error::ArrowError::SchemaError("window_end is not TIMESTAMP(ms)".into())
                })?;
            let keys: Vec<ArrayRef> = probe_order[1..]
                .iter()
                .map(|i| Arc::clone(batch.column(*i)))
                .collect();
            p.matches(&ends, &keys)
                .map_err(|e| arrow::error::ArrowError::ExternalError(Box::new(e)))
        },
    );
    let projection = ProjectionMask::roots(b.parquet_schema(), idx.clone());
    let r = b
        .with_projection(projection)
        .with_row_filter(RowFilter::new(vec![Box::new(predicate)]))
        .with_batch_size(65536)
        .build()
        .map_err(|e| cerr(ctx.clone(), e.to_string()))?;
    let out_order = order(&idx);
    for b in r {
        let b = b.map_err(|e| EngineError::arrow(ctx.clone(), e))?;
        if b.num_rows() == 0 {
            continue;
        }
        let b = b
            .project(&out_order)
            .map_err(|e| EngineError::arrow(ctx.clone(), e))?;
        if tx.send(Ok(b)).is_err() {
            return Ok(());
        }
    }
    Ok(())
}
