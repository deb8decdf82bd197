//! Feature statistics and drift: per feature of a view, over its lake rows
//! (optionally one group per `date=` day and a time range) or over a
//! training-set file, computed by DataFusion aggregates (`COUNT`, `MIN`,
//! `MAX`, `AVG`, `STDDEV`, `APPROX_DISTINCT`, and `approx_percentile_cont`'s
//! t-digest, one per feature for all its quantiles).
//! Against a reference (another range, or a training set) each feature
//! gets a population stability index over the reference's deciles (or its
//! most frequent values, for text) and its largest quantile shift.
//!
//! Lake files are streamed into DataFusion partition by partition (one
//! partition per worker), so memory does not grow with the lake.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, Float64Array, ListArray, RecordBatch, StringArray,
};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::streaming::StreamingTable;
use datafusion::common::ScalarValue;
use datafusion::datasource::MemTable;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::prelude::{SessionConfig, SessionContext};
use futures::StreamExt;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::{Value, json};
use sluice_engine::training::time_millis;
use sluice_engine::{EngineError, Result};
use sluice_sql::ViewPlan;

use crate::lake::io;
use crate::quantiles::digest_quantiles;
use crate::training::{lake_files, read_table};

/// Quantiles every numeric feature reports.
pub const QUANTILES: [f64; 9] = [0.01, 0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95, 0.99];
/// Reference quantiles whose values bound the bins of a numeric feature's
/// population stability index (ten bins of about equal reference mass).
const DECILES: [f64; 9] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];
/// The aggregates that answer [`QUANTILES`] and [`DECILES`] from one
/// t-digest per feature (see [`crate::quantiles`]).
const QUANTILES_FN: &str = "sluice_quantiles";
const DECILES_FN: &str = "sluice_deciles";
/// A text feature's bins: the reference's most frequent values, then one
/// bin for every other value (and one for NULL, as for numbers).
const TOP_VALUES: usize = 20;
/// The share a bin empty on one side counts as (PSI is undefined at 0).
const PSI_FLOOR: f64 = 1e-4;

/// The rows statistics are computed over.
#[derive(Debug, Clone)]
pub enum StatsInput {
    /// A view's lake folder, rows whose `window_end` is in `[from, to)`
    /// (epoch ms; open ends when `None`).
    Lake {
        /// `{lake}/{view}`.
        dir: PathBuf,
        /// First `window_end` included.
        from: Option<i64>,
        /// First `window_end` excluded.
        to: Option<i64>,
    },
    /// A training set (or any table file) whose columns are the view's
    /// features, named `VIEW__feature` (as `sluice training-set` writes them)
    /// or `feature`.
    File(PathBuf),
}

impl fmt::Display for StatsInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StatsInput::Lake { dir, from, to } => {
                write!(f, "lake {}", dir.display())?;
                let t = |v: &Option<i64>| v.map(crate::lake::rfc3339_ms).unwrap_or_default();
                if from.is_some() || to.is_some() {
                    write!(f, " window_end in [{}, {})", t(from), t(to))?;
                }
                Ok(())
            }
            StatsInput::File(p) => write!(f, "file {}", p.display()),
        }
    }
}

/// What `sluice stats` computes.
#[derive(Debug, Clone)]
pub struct StatsRequest {
    /// Feature columns to describe; empty: every feature of the view.
    pub features: Vec<String>,
    /// The rows described.
    pub input: StatsInput,
    /// One group per `date=` day of the lake instead of one for the range.
    pub by_day: bool,
    /// Rows to compare with (population stability index, quantile shift).
    pub reference: Option<StatsInput>,
    /// Worker threads (DataFusion partitions).
    pub threads: usize,
}

/// How a feature is described.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    /// Integers, floats, decimals: mean, stddev, quantiles, decile PSI.
    Numeric,
    /// Strings: approximate distinct count, PSI over the most frequent values.
    Text,
    /// Timestamps, dates, booleans: count, nulls, min, max.
    Ordered,
    /// Lists (vectors) and the rest: count and nulls.
    Other,
}

impl FeatureKind {
    fn of(t: &DataType) -> Self {
        match t {
            t if t.is_numeric() => FeatureKind::Numeric,
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => FeatureKind::Text,
            DataType::Boolean | DataType::Timestamp(_, _) | DataType::Date32 | DataType::Date64 => {
                FeatureKind::Ordered
            }
            _ => FeatureKind::Other,
        }
    }
}

/// One feature's statistics over one group of rows.
#[derive(Debug, Clone)]
pub struct FeatureStats {
    /// Feature column.
    pub name: String,
    /// Arrow type of the column.
    pub data_type: String,
    /// How it is described.
    pub kind: FeatureKind,
    /// Rows where it is not NULL.
    pub count: u64,
    /// Rows where it is NULL.
    pub nulls: u64,
    /// Smallest value (JSON: numbers stay numbers, times are RFC 3339).
    pub min: Value,
    /// Largest value.
    pub max: Value,
    /// Mean (numbers).
    pub mean: Option<f64>,
    /// Sample standard deviation (numbers).
    pub stddev: Option<f64>,
    /// `(q, value)` for each of [`QUANTILES`] (numbers; t-digest estimates).
    pub quantiles: Vec<(f64, Option<f64>)>,
    /// Approximate distinct count (text; HyperLogLog).
    pub distinct: Option<u64>,
}

impl FeatureStats {
    /// NULLs over rows (0 when there are no rows).
    pub fn null_rate(&self) -> f64 {
        let rows = self.count + self.nulls;
        if rows == 0 {
            0.0
        } else {
            self.nulls as f64 / rows as f64
        }
    }
}

/// The statistics of one group: a day, or the whole range.
#[derive(Debug, Clone)]
pub struct GroupStats {
    /// `YYYY-MM-DD` when grouped by day.
    pub day: Option<String>,
    /// Rows in the group.
    pub rows: u64,
    /// Per feature, in the view's column order.
    pub features: Vec<FeatureStats>,
}

/// One feature of a group measured against the reference.
#[derive(Debug, Clone)]
pub struct Drift {
    /// Feature column.
    pub feature: String,
    /// Population stability index; `None` when either side has no rows.
    pub psi: Option<f64>,
    /// Bins the index was computed over (NULL counts as one).
    pub bins: usize,
    /// The quantile that moved most, for numbers.
    pub shift: Option<QuantileShift>,
}

/// A quantile's value in the current rows against the reference.
#[derive(Debug, Clone)]
pub struct QuantileShift {
    /// The quantile (0.5 = median).
    pub q: f64,
    /// Its value in the described rows.
    pub current: f64,
    /// Its value in the reference.
    pub reference: f64,
    /// `|current − reference|`, in the feature's unit.
    pub shift: f64,
    /// The shift in reference standard deviations, if that is above 0.
    pub shift_sd: Option<f64>,
}

/// What `sluice stats` reports.
#[derive(Debug, Clone)]
pub struct StatsReport {
    /// The view.
    pub view: String,
    /// What was described.
    pub input: String,
    /// Lake or table files read.
    pub files: usize,
    /// One per day, or one for the whole range.
    pub groups: Vec<GroupStats>,
    /// The reference and its statistics.
    pub reference: Option<(String, GroupStats)>,
    /// Per group (same order as `groups`), per feature; empty without a reference.
    pub drift: Vec<Vec<Drift>>,
}

fn cerr(what: impl Into<String>, message: impl Into<String>) -> EngineError {
    EngineError::Connector {
        what: what.into(),
        message: message.into(),
    }
}

fn dferr(view: &str, e: datafusion::error::DataFusionError) -> EngineError {
    EngineError::df(view, e)
}

/// A SQL identifier, quoted.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A SQL string literal.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A finite double as SQL.
fn double(v: f64) -> String {
    format!("CAST('{v:?}' AS DOUBLE)")
}

/// The column of the group a row belongs to.
const GROUP: &str = "_sluice_group";

/// A view's lake files streamed as DataFusion partitions.
#[derive(Debug, Clone)]
struct LakePartition {
    view: String,
    schema: SchemaRef,
    /// Names of the lake columns to read, in `schema` order (without the group).
    columns: Vec<String>,
    files: Vec<(PathBuf, Option<String>)>,
    from: Option<i64>,
    to: Option<i64>,
    by_day: bool,
}

impl LakePartition {
    /// The rows of one lake file in the range, with their group column.
    fn read(&self, path: &Path, day: &Option<String>) -> Result<Vec<RecordBatch>> {
        let ctx = format!("view {}: lake file {}", self.view, path.display());
        let perr = |e: parquet::errors::ParquetError| cerr(ctx.clone(), e.to_string());
        let f = File::open(path).map_err(|e| io(path, e))?;
        let b = ParquetRecordBatchReaderBuilder::try_new(f).map_err(perr)?;
        let fschema = Arc::clone(b.schema());
        let mut wanted: Vec<String> = self.columns.clone();
        let ranged = self.from.is_some() || self.to.is_some();
        if ranged {
            wanted.push("window_end".into());
        }
        let mut roots = Vec::with_capacity(wanted.len());
        for c in &wanted {
            let i = fschema.index_of(c).map_err(|_| {
                cerr(
                    ctx.clone(),
                    format!(
                        "no column `{c}` (the file has {}); was it written by another version of the view?",
                        fschema
                            .fields()
                            .iter()
                            .map(|f| f.name().as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })?;
            roots.push(i);
        }
        let mask = ProjectionMask::roots(b.parquet_schema(), roots.iter().copied());
        let reader = b
            .with_projection(mask)
            .with_batch_size(8192)
            .build()
            .map_err(perr)?;
        let group = if self.by_day {
            day.clone().unwrap_or_else(|| "NULL".into())
        } else {
            String::new()
        };
        let mut out = Vec::new();
        for batch in reader {
            let batch = batch.map_err(|e| EngineError::arrow(ctx.clone(), e))?;
            // The projection keeps file order; look columns up by name.
            let mut cols: Vec<ArrayRef> = Vec::with_capacity(self.columns.len() + 1);
            for (i, c) in self.columns.iter().enumerate() {
                let a = batch.column_by_name(c).cloned().ok_or_else(|| {
                    cerr(
                        ctx.clone(),
                        format!("column `{c}` missing after projection"),
                    )
                })?;
                let want = self.schema.field(i).data_type();
                if a.data_type() != want {
                    return Err(cerr(
                        ctx.clone(),
                        format!(
                            "column `{c}` is {} here but {want} in the first file; was it written by another version of the view?",
                            a.data_type()
                        ),
                    ));
                }
                cols.push(a);
            }
            let n = batch.num_rows();
            cols.push(Arc::new(StringArray::from(vec![group.as_str(); n])));
            let mut out_batch = RecordBatch::try_new(Arc::clone(&self.schema), cols)
                .map_err(|e| EngineError::arrow(ctx.clone(), e))?;
            if ranged {
                let we = batch
                    .column_by_name("window_end")
                    .ok_or_else(|| cerr(ctx.clone(), "no window_end column"))?;
                let t = time_millis(we)?;
                let mask: BooleanArray = t
                    .iter()
                    .map(|t| {
                        Some(t.is_some_and(|t| {
                            self.from.is_none_or(|f| t >= f) && self.to.is_none_or(|e| t < e)
                        }))
                    })
                    .collect();
                out_batch = filter_record_batch(&out_batch, &mask)
                    .map_err(|e| EngineError::arrow(ctx.clone(), e))?;
            }
            if out_batch.num_rows() > 0 {
                out.push(out_batch);
            }
        }
        Ok(out)
    }
}

impl PartitionStream for LakePartition {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        // One file at a time: a file's batches are read when the stream
        // reaches it.
        let files = self.files.clone();
        let me = Arc::new(self.clone());
        let stream = futures::stream::iter(files).flat_map(move |(path, day)| {
            let batches = match me.read(&path, &day) {
                Ok(b) => b.into_iter().map(Ok).collect::<Vec<_>>(),
                Err(e) => vec![Err(datafusion::error::DataFusionError::External(Box::new(
                    e,
                )))],
            };
            futures::stream::iter(batches)
        });
        Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            stream,
        ))
    }
}

/// The features of `view` a request describes, with their types.
fn feature_fields(view: &ViewPlan, wanted: &[String]) -> Result<Vec<Field>> {
    let all: Vec<Field> = view
        .output_schema
        .fields()
        .iter()
        .filter(|f| !view.keys.iter().any(|k| k == f.name()))
        .map(|f| f.as_ref().clone().with_nullable(true))
        .collect();
    if wanted.is_empty() {
        return Ok(all);
    }
    let mut out = Vec::new();
    for w in wanted {
        match all.iter().find(|f| f.name() == w) {
            Some(f) => out.push(f.clone()),
            None => {
                return Err(cerr(
                    format!("view {}", view.name),
                    format!(
                        "no feature `{w}` (features: {})",
                        all.iter()
                            .map(|f| f.name().as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// Registers `input` as table `name` of `ctx`: the features (in the lake's
/// types for lake input, as the file has them otherwise) and the group
/// column. Returns the files read.
fn register(
    ctx: &SessionContext,
    name: &str,
    view: &ViewPlan,
    fields: &[Field],
    input: &StatsInput,
    by_day: bool,
    threads: usize,
) -> Result<(Vec<Field>, usize)> {
    match input {
        StatsInput::Lake { dir, from, to } => {
            let lake_dir = dir.display().to_string();
            let mut files = lake_files(dir)?;
            // A day folder after the range's end, or before its start, holds
            // no row of it (rows are filed by their window_end's day).
            let day_ms = |d: &str| crate::lake::day_start_ms(d);
            files.retain(|(_, d)| match d.as_deref().and_then(day_ms) {
                Some(start) => {
                    from.is_none_or(|f| start + 86_400_000 > f) && to.is_none_or(|t| start < t)
                }
                None => true,
            });
            if files.is_empty() {
                return Err(cerr(
                    format!("view {}", view.name),
                    format!("no lake files under {lake_dir} in the range"),
                ));
            }
            let mut sfields = fields.to_vec();
            sfields.push(Field::new(GROUP, DataType::Utf8, false));
            let schema = Arc::new(Schema::new(sfields));
            let n = files.len();
            let parts = threads.clamp(1, n);
            let mut chunks: Vec<Vec<(PathBuf, Option<String>)>> = vec![Vec::new(); parts];
            for (i, f) in files.into_iter().enumerate() {
                chunks[i % parts].push(f);
            }
            let partitions: Vec<Arc<dyn PartitionStream>> = chunks
                .into_iter()
                .map(|files| {
                    Arc::new(LakePartition {
                        view: view.name.clone(),
                        schema: Arc::clone(&schema),
                        columns: fields.iter().map(|f| f.name().clone()).collect(),
                        files,
                        from: *from,
                        to: *to,
                        by_day,
                    }) as Arc<dyn PartitionStream>
                })
                .collect();
            let table =
                StreamingTable::try_new(schema, partitions).map_err(|e| dferr(&view.name, e))?;
            ctx.register_table(name, Arc::new(table))
                .map_err(|e| dferr(&view.name, e))?;
            Ok((fields.to_vec(), n))
        }
        StatsInput::File(path) => {
            if by_day {
                return Err(cerr(
                    format!("{}", path.display()),
                    "--by-day groups lake rows by their date= folder; a file has none",
                ));
            }
            let batch = read_table(path, None)?;
            let fs = batch.schema();
            let mut cols: Vec<ArrayRef> = Vec::new();
            let mut out_fields = Vec::new();
            for f in fields {
                let prefixed = format!("{}__{}", view.name, f.name());
                let i = fs
                    .index_of(&prefixed)
                    .or_else(|_| fs.index_of(f.name()))
                    .map_err(|_| {
                        cerr(
                            format!("{}", path.display()),
                            format!(
                                "no column `{prefixed}` or `{}` (columns: {})",
                                f.name(),
                                fs.fields()
                                    .iter()
                                    .map(|f| f.name().as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        )
                    })?;
                cols.push(Arc::clone(batch.column(i)));
                out_fields.push(Field::new(
                    f.name(),
                    batch.column(i).data_type().clone(),
                    true,
                ));
            }
            let n = batch.num_rows();
            cols.push(Arc::new(StringArray::from(vec![""; n])));
            let mut sfields = out_fields.clone();
            sfields.push(Field::new(GROUP, DataType::Utf8, false));
            let schema = Arc::new(Schema::new(sfields));
            let b = RecordBatch::try_new(Arc::clone(&schema), cols)
                .map_err(|e| EngineError::arrow(format!("{}", path.display()), e))?;
            let table =
                MemTable::try_new(schema, vec![vec![b]]).map_err(|e| dferr(&view.name, e))?;
            ctx.register_table(name, Arc::new(table))
                .map_err(|e| dferr(&view.name, e))?;
            Ok((out_fields, 1))
        }
    }
}

fn session(threads: usize) -> SessionContext {
    let ctx = SessionContext::new_with_config(
        SessionConfig::new().with_target_partitions(threads.max(1)),
    );
    ctx.register_udaf(digest_quantiles(QUANTILES_FN, &QUANTILES));
    ctx.register_udaf(digest_quantiles(DECILES_FN, &DECILES));
    ctx
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .map_err(|e| EngineError::Internal(format!("starting a runtime: {e}")))
}

async fn query(ctx: &SessionContext, view: &str, sql: &str) -> Result<Vec<RecordBatch>> {
    let df = ctx.sql(sql).await.map_err(|e| dferr(view, e))?;
    df.collect().await.map_err(|e| dferr(view, e))
}

/// The JSON of one aggregate result.
fn json_of(a: &ArrayRef, row: usize) -> Value {
    if a.is_null(row) {
        return Value::Null;
    }
    match ScalarValue::try_from_array(a, row) {
        Ok(ScalarValue::Int8(Some(v))) => json!(v),
        Ok(ScalarValue::Int16(Some(v))) => json!(v),
        Ok(ScalarValue::Int32(Some(v))) => json!(v),
        Ok(ScalarValue::Int64(Some(v))) => json!(v),
        Ok(ScalarValue::UInt8(Some(v))) => json!(v),
        Ok(ScalarValue::UInt16(Some(v))) => json!(v),
        Ok(ScalarValue::UInt32(Some(v))) => json!(v),
        Ok(ScalarValue::UInt64(Some(v))) => json!(v),
        Ok(ScalarValue::Float32(Some(v))) if v.is_finite() => json!(v),
        Ok(ScalarValue::Float64(Some(v))) if v.is_finite() => json!(v),
        Ok(ScalarValue::Boolean(Some(v))) => json!(v),
        Ok(
            ScalarValue::TimestampMillisecond(Some(v), _)
            | ScalarValue::TimestampSecond(Some(v), _)
            | ScalarValue::TimestampMicrosecond(Some(v), _)
            | ScalarValue::TimestampNanosecond(Some(v), _),
        ) => {
            let ms = match a.data_type() {
                DataType::Timestamp(arrow::datatypes::TimeUnit::Second, _) => v * 1000,
                DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, _) => v / 1000,
                DataType::Timestamp(arrow::datatypes::TimeUnit::Nanosecond, _) => v / 1_000_000,
                _ => v,
            };
            json!(crate::lake::rfc3339_ms(ms))
        }
        Ok(s @ (ScalarValue::Utf8(_) | ScalarValue::LargeUtf8(_) | ScalarValue::Utf8View(_))) => {
            match s {
                ScalarValue::Utf8(Some(v))
                | ScalarValue::LargeUtf8(Some(v))
                | ScalarValue::Utf8View(Some(v)) => json!(v),
                _ => Value::Null,
            }
        }
        Ok(other) => json!(other.to_string()),
        Err(_) => Value::Null,
    }
}

fn f64_of(a: &ArrayRef, row: usize) -> Option<f64> {
    if a.is_null(row) {
        return None;
    }
    match ScalarValue::try_from_array(a, row).ok()? {
        ScalarValue::Float64(v) => v,
        ScalarValue::Float32(v) => v.map(f64::from),
        ScalarValue::Int64(v) => v.map(|v| v as f64),
        ScalarValue::UInt64(v) => v.map(|v| v as f64),
        ScalarValue::Int32(v) => v.map(f64::from),
        _ => None,
    }
}

/// The doubles of one list result (empty when NULL).
fn list_of(a: &ArrayRef, row: usize) -> Vec<Option<f64>> {
    match a.as_any().downcast_ref::<ListArray>() {
        Some(l) if l.is_valid(row) => {
            let v = l.value(row);
            v.as_any()
                .downcast_ref::<Float64Array>()
                .map(|v| v.iter().collect())
                .unwrap_or_default()
        }
        _ => Vec::new(),
    }
}

fn u64_of(a: &ArrayRef, row: usize) -> u64 {
    match ScalarValue::try_from_array(a, row) {
        Ok(ScalarValue::Int64(Some(v))) => v.max(0) as u64,
        Ok(ScalarValue::UInt64(Some(v))) => v,
        Ok(ScalarValue::Int32(Some(v))) => v.max(0) as u64,
        _ => 0,
    }
}

fn group_of(a: &ArrayRef, row: usize) -> String {
    match json_of(a, row) {
        Value::String(s) => s,
        _ => String::new(),
    }
}

/// Statistics of every feature of `table`, one [`GroupStats`] per group.
async fn describe(
    ctx: &SessionContext,
    view: &str,
    table: &str,
    fields: &[Field],
    by_day: bool,
) -> Result<Vec<GroupStats>> {
    let mut sel = vec![ident(GROUP), "COUNT(*)".to_string()];
    for f in fields {
        let c = ident(f.name());
        let d = format!("CAST({c} AS DOUBLE)");
        match FeatureKind::of(f.data_type()) {
            FeatureKind::Numeric => {
                sel.push(format!("COUNT({c})"));
                sel.push(format!("MIN({c})"));
                sel.push(format!("MAX({c})"));
                sel.push(format!("AVG({d})"));
                sel.push(format!("STDDEV({d})"));
                sel.push(format!("{QUANTILES_FN}({d})"));
            }
            FeatureKind::Text => {
                sel.push(format!("COUNT({c})"));
                sel.push(format!("MIN({c})"));
                sel.push(format!("MAX({c})"));
                sel.push(format!("APPROX_DISTINCT({c})"));
            }
            FeatureKind::Ordered => {
                sel.push(format!("COUNT({c})"));
                sel.push(format!("MIN({c})"));
                sel.push(format!("MAX({c})"));
            }
            FeatureKind::Other => sel.push(format!("COUNT({c})")),
        }
    }
    let sql = format!(
        "SELECT {} FROM {table} GROUP BY {} ORDER BY {}",
        sel.iter()
            .enumerate()
            .map(|(i, s)| format!("{s} AS c{i}"))
            .collect::<Vec<_>>()
            .join(", "),
        ident(GROUP),
        ident(GROUP)
    );
    let batches = query(ctx, view, &sql).await?;
    let mut out = Vec::new();
    for b in &batches {
        for row in 0..b.num_rows() {
            let g = group_of(b.column(0), row);
            let rows = u64_of(b.column(1), row);
            let mut i = 2;
            let mut features = Vec::new();
            for f in fields {
                let kind = FeatureKind::of(f.data_type());
                let count = u64_of(b.column(i), row);
                let mut s = FeatureStats {
                    name: f.name().clone(),
                    data_type: f.data_type().to_string(),
                    kind,
                    count,
                    nulls: rows.saturating_sub(count),
                    min: Value::Null,
                    max: Value::Null,
                    mean: None,
                    stddev: None,
                    quantiles: Vec::new(),
                    distinct: None,
                };
                i += 1;
                if kind != FeatureKind::Other {
                    s.min = json_of(b.column(i), row);
                    s.max = json_of(b.column(i + 1), row);
                    i += 2;
                }
                match kind {
                    FeatureKind::Numeric => {
                        s.mean = f64_of(b.column(i), row);
                        s.stddev = f64_of(b.column(i + 1), row);
                        let qs = list_of(b.column(i + 2), row);
                        i += 3;
                        for (k, q) in QUANTILES.into_iter().enumerate() {
                            s.quantiles.push((q, qs.get(k).copied().flatten()));
                        }
                    }
                    FeatureKind::Text => {
                        s.distinct = Some(u64_of(b.column(i), row));
                        i += 1;
                    }
                    _ => {}
                }
                features.push(s);
            }
            out.push(GroupStats {
                day: by_day.then_some(g),
                rows,
                features,
            });
        }
    }
    Ok(out)
}

/// How one feature's rows are binned for its stability index.
#[derive(Debug, Clone)]
enum Bins {
    /// `x < e[0]`, `e[0] <= x < e[1]`, …, `x >= e[last]`, then NULL.
    Edges(Vec<f64>),
    /// Each value, then every other value, then NULL.
    Values(Vec<String>),
    /// NULL against not NULL only.
    Nulls,
}

/// The bins of each feature, from the reference table.
async fn reference_bins(
    ctx: &SessionContext,
    view: &str,
    table: &str,
    fields: &[Field],
) -> Result<Vec<Bins>> {
    let mut out = Vec::new();
    // Deciles of every numeric feature in one pass.
    let numeric: Vec<&Field> = fields
        .iter()
        .filter(|f| FeatureKind::of(f.data_type()) == FeatureKind::Numeric)
        .collect();
    let mut deciles: Vec<Vec<f64>> = Vec::new();
    if !numeric.is_empty() {
        let sel: Vec<String> = numeric
            .iter()
            .map(|f| format!("{DECILES_FN}(CAST({} AS DOUBLE))", ident(f.name())))
            .collect();
        let b = query(
            ctx,
            view,
            &format!("SELECT {} FROM {table}", sel.join(", ")),
        )
        .await?;
        for (k, _) in numeric.iter().enumerate() {
            let mut edges: Vec<f64> = b
                .first()
                .filter(|b| b.num_rows() > 0)
                .map(|b| list_of(b.column(k), 0))
                .unwrap_or_default()
                .into_iter()
                .flatten()
                .filter(|v| v.is_finite())
                .collect();
            edges.sort_by(f64::total_cmp);
            edges.dedup();
            deciles.push(edges);
        }
    }
    let mut numeric_k = 0;
    for f in fields {
        match FeatureKind::of(f.data_type()) {
            FeatureKind::Numeric => {
                out.push(Bins::Edges(deciles[numeric_k].clone()));
                numeric_k += 1;
            }
            FeatureKind::Text => {
                let c = ident(f.name());
                let b = query(
                    ctx,
                    view,
                    &format!(
                        "SELECT CAST({c} AS VARCHAR) AS v, COUNT(*) AS n FROM {table} WHERE {c} IS NOT NULL \
                         GROUP BY {c} ORDER BY n DESC, v LIMIT {TOP_VALUES}"
                    ),
                )
                .await?;
                let mut values = Vec::new();
                for b in &b {
                    for r in 0..b.num_rows() {
                        if let Value::String(s) = json_of(b.column(0), r) {
                            values.push(s);
                        }
                    }
                }
                out.push(Bins::Values(values));
            }
            _ => out.push(Bins::Nulls),
        }
    }
    Ok(out)
}

/// Row counts per bin of each feature, per group.
async fn bin_counts(
    ctx: &SessionContext,
    view: &str,
    table: &str,
    fields: &[Field],
    bins: &[Bins],
) -> Result<Vec<(String, Vec<Vec<u64>>)>> {
    // Cumulative counts for edges, one count per value, then the non-NULL
    // count and the row count: bins are differences of these.
    let mut sel = vec![ident(GROUP), "COUNT(*)".to_string()];
    for (f, b) in fields.iter().zip(bins) {
        let c = ident(f.name());
        sel.push(format!("COUNT({c})"));
        match b {
            Bins::Edges(edges) => {
                for e in edges {
                    sel.push(format!(
                        "SUM(CASE WHEN CAST({c} AS DOUBLE) < {} THEN 1 ELSE 0 END)",
                        double(*e)
                    ));
                }
            }
            Bins::Values(values) => {
                for v in values {
                    sel.push(format!(
                        "SUM(CASE WHEN CAST({c} AS VARCHAR) = {} THEN 1 ELSE 0 END)",
                        literal(v)
                    ));
                }
            }
            Bins::Nulls => {}
        }
    }
    let sql = format!(
        "SELECT {} FROM {table} GROUP BY {} ORDER BY {}",
        sel.iter()
            .enumerate()
            .map(|(i, s)| format!("{s} AS c{i}"))
            .collect::<Vec<_>>()
            .join(", "),
        ident(GROUP),
        ident(GROUP)
    );
    let batches = query(ctx, view, &sql).await?;
    let mut out = Vec::new();
    for b in &batches {
        for row in 0..b.num_rows() {
            let g = group_of(b.column(0), row);
            let rows = u64_of(b.column(1), row);
            let mut i = 2;
            let mut per_feature = Vec::new();
            for bins in bins {
                let nonnull = u64_of(b.column(i), row);
                i += 1;
                let mut counts = Vec::new();
                match bins {
                    Bins::Edges(edges) => {
                        let mut below = 0;
                        for _ in edges {
                            let cum = u64_of(b.column(i), row);
                            counts.push(cum.saturating_sub(below));
                            below = cum;
                            i += 1;
                        }
                        counts.push(nonnull.saturating_sub(below));
                    }
                    Bins::Values(values) => {
                        let mut listed = 0;
                        for _ in values {
                            let n = u64_of(b.column(i), row);
                            counts.push(n);
                            listed += n;
                            i += 1;
                        }
                        counts.push(nonnull.saturating_sub(listed));
                    }
                    Bins::Nulls => counts.push(nonnull),
                }
                counts.push(rows.saturating_sub(nonnull));
                per_feature.push(counts);
            }
            out.push((g, per_feature));
        }
    }
    Ok(out)
}

/// Population stability index of `current` against `reference` bin
/// counts: `Σ (c − r) · ln(c / r)` over bin shares, a share of 0 counted
/// as [`PSI_FLOOR`]; bins empty on both sides are left out.
pub fn psi(current: &[u64], reference: &[u64]) -> Option<f64> {
    let ct: u64 = current.iter().sum();
    let rt: u64 = reference.iter().sum();
    if ct == 0 || rt == 0 {
        return None;
    }
    let mut sum = 0.0;
    for (c, r) in current.iter().zip(reference) {
        if *c == 0 && *r == 0 {
            continue;
        }
        let pc = (*c as f64 / ct as f64).max(PSI_FLOOR);
        let pr = (*r as f64 / rt as f64).max(PSI_FLOOR);
        sum += (pc - pr) * (pc / pr).ln();
    }
    Some(sum)
}

fn largest_shift(cur: &FeatureStats, reference: &FeatureStats) -> Option<QuantileShift> {
    let mut best: Option<QuantileShift> = None;
    for ((q, c), (_, r)) in cur.quantiles.iter().zip(&reference.quantiles) {
        let (Some(c), Some(r)) = (c, r) else { continue };
        let shift = (c - r).abs();
        if best.as_ref().is_none_or(|b| shift > b.shift) {
            best = Some(QuantileShift {
                q: *q,
                current: *c,
                reference: *r,
                shift,
                shift_sd: reference.stddev.filter(|s| *s > 0.0).map(|s| shift / s),
            });
        }
    }
    best
}

/// The reference side of a comparison, computed once: its statistics,
/// each feature's bins (its deciles, or its most frequent values) and its
/// counts in them. A daily job measuring many days against one fixed
/// reference computes it once.
#[derive(Debug, Clone)]
pub struct ReferenceProfile {
    input: String,
    fields: Vec<Field>,
    stats: GroupStats,
    bins: Vec<Bins>,
    counts: Vec<Vec<u64>>,
}

/// Profiles `reference` for the features `features` of `view` (all when empty).
pub fn reference_profile(
    view: &ViewPlan,
    features: &[String],
    reference: &StatsInput,
    threads: usize,
) -> Result<ReferenceProfile> {
    let fields = feature_fields(view, features)?;
    let threads = threads.max(1);
    let rt = runtime(threads)?;
    let ctx = session(threads);
    rt.block_on(async {
        let (fields, _) = register(&ctx, "ref", view, &fields, reference, false, threads)?;
        let stats = describe(&ctx, &view.name, "ref", &fields, false)
            .await?
            .into_iter()
            .next()
            .unwrap_or(GroupStats {
                day: None,
                rows: 0,
                features: Vec::new(),
            });
        let bins = reference_bins(&ctx, &view.name, "ref", &fields).await?;
        let counts = bin_counts(&ctx, &view.name, "ref", &fields, &bins)
            .await?
            .into_iter()
            .next()
            .map(|(_, c)| c)
            .unwrap_or_else(|| bins.iter().map(|_| Vec::new()).collect());
        Ok(ReferenceProfile {
            input: reference.to_string(),
            fields,
            stats,
            bins,
            counts,
        })
    })
}

/// Describes the features of `view` over `req.input`, and measures them
/// against `req.reference` when there is one.
pub fn feature_stats(view: &ViewPlan, req: &StatsRequest) -> Result<StatsReport> {
    let profile = req
        .reference
        .as_ref()
        .map(|r| reference_profile(view, &req.features, r, req.threads))
        .transpose()?;
    feature_stats_against(view, req, profile.as_ref())
}

/// [`feature_stats`] against a reference profiled before (`req.reference`
/// is not read).
pub fn feature_stats_against(
    view: &ViewPlan,
    req: &StatsRequest,
    reference: Option<&ReferenceProfile>,
) -> Result<StatsReport> {
    let fields = feature_fields(view, &req.features)?;
    let threads = req.threads.max(1);
    let rt = runtime(threads)?;
    let ctx = session(threads);
    rt.block_on(async {
        let (fields, files) =
            register(&ctx, "cur", view, &fields, &req.input, req.by_day, threads)?;
        let groups = describe(&ctx, &view.name, "cur", &fields, req.by_day).await?;
        let mut report = StatsReport {
            view: view.name.clone(),
            input: req.input.to_string(),
            files,
            groups,
            reference: None,
            drift: Vec::new(),
        };
        let Some(r) = reference else {
            return Ok(report);
        };
        if r.fields.len() != fields.len() {
            return Err(cerr(
                format!("view {}", view.name),
                "the reference was profiled for other features",
            ));
        }
        for (a, b) in fields.iter().zip(&r.fields) {
            if FeatureKind::of(a.data_type()) != FeatureKind::of(b.data_type()) {
                return Err(cerr(
                    format!("view {}", view.name),
                    format!(
                        "feature `{}` is {} in the described rows but {} in the reference",
                        a.name(),
                        a.data_type(),
                        b.data_type()
                    ),
                ));
            }
        }
        let ccounts = bin_counts(&ctx, &view.name, "cur", &fields, &r.bins).await?;
        let empty: Vec<Vec<u64>> = r.bins.iter().map(|_| Vec::new()).collect();
        for g in &report.groups {
            let key = g.day.clone().unwrap_or_default();
            let cc = ccounts
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, c)| c)
                .unwrap_or(&empty);
            let mut drifts = Vec::new();
            for (k, f) in g.features.iter().enumerate() {
                let shift = r.stats.features.get(k).and_then(|x| largest_shift(f, x));
                drifts.push(Drift {
                    feature: f.name.clone(),
                    psi: psi(&cc[k], &r.counts[k]),
                    bins: r.counts[k].len(),
                    shift,
                });
            }
            report.drift.push(drifts);
        }
        report.reference = Some((r.input.clone(), r.stats.clone()));
        Ok(report)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psi_of_a_distribution_against_itself_is_zero() {
        let c = [10, 20, 30, 0, 5];
        assert_eq!(psi(&c, &c), Some(0.0));
        // Scaling the counts does not change the shares.
        let d = [20, 40, 60, 0, 10];
        assert!(psi(&d, &c).is_some_and(|p| p.abs() < 1e-12));
    }

    #[test]
    fn psi_grows_with_the_shift_and_counts_empty_bins_at_the_floor() {
        let r = [100, 100, 100, 100, 0];
        let small = psi(&[110, 100, 95, 95, 0], &r).unwrap_or(f64::NAN);
        let large = psi(&[0, 0, 200, 200, 0], &r).unwrap_or(f64::NAN);
        assert!(small > 0.0 && small < 0.01, "{small}");
        // Two bins at 1e-4 against 0.25: 2 · (0.25 − 1e-4) · ln(2500) ≈ 3.9,
        // plus two at 0.5 against 0.25: 2 · 0.25 · ln 2 ≈ 0.35.
        assert!((large - 4.258).abs() < 0.01, "{large}");
        assert_eq!(psi(&[0, 0], &r[..2]), None);
    }
}
