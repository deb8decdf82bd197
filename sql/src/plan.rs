//! Lowering of parsed statements into a streaming plan. DataFusion plans each
//! view's `SELECT` (its parser output, its functions, its type coercion); the
//! window call is lifted out of `GROUP BY` first and becomes the view's
//! [`WindowSpec`].

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::empty::EmptyTable;
use datafusion::common::{DFSchemaRef, DataFusionError};
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{
    self, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr, SetExpr, Spanned,
};

use crate::error::{PipelineError, Pos};
use crate::interval::interval_ms;
use crate::parser::{OptionDef, SourceDef, Statement, ViewDef, normalize, parse_pipeline};

/// The arrow type of a `TIMESTAMP` column: milliseconds since the epoch.
pub const TIMESTAMP_TYPE: DataType = DataType::Timestamp(TimeUnit::Millisecond, None);

/// How a feature view groups events in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowSpec {
    /// `TUMBLE(ts, size)`: back-to-back windows of `size`.
    Tumble {
        /// Window length in milliseconds.
        size_ms: i64,
    },
    /// `HOP(ts, slide, size)`: windows of `size` starting every `slide`.
    Hop {
        /// Distance between window starts, in milliseconds.
        slide_ms: i64,
        /// Window length in milliseconds (a multiple of `slide_ms`).
        size_ms: i64,
    },
    /// No window: one aggregate per key over all events so far.
    Lifetime,
}

impl WindowSpec {
    /// The pane (tile) length: windows are unions of consecutive panes.
    pub fn slide_ms(&self) -> Option<i64> {
        match *self {
            WindowSpec::Tumble { size_ms } => Some(size_ms),
            WindowSpec::Hop { slide_ms, .. } => Some(slide_ms),
            WindowSpec::Lifetime => None,
        }
    }

    /// The window length.
    pub fn size_ms(&self) -> Option<i64> {
        match *self {
            WindowSpec::Tumble { size_ms } | WindowSpec::Hop { size_ms, .. } => Some(size_ms),
            WindowSpec::Lifetime => None,
        }
    }
}

impl fmt::Display for WindowSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WindowSpec::Tumble { size_ms } => write!(f, "TUMBLE(size={})", fmt_ms(*size_ms)),
            WindowSpec::Hop { slide_ms, size_ms } => {
                write!(
                    f,
                    "HOP(slide={}, size={})",
                    fmt_ms(*slide_ms),
                    fmt_ms(*size_ms)
                )
            }
            WindowSpec::Lifetime => write!(f, "LIFETIME"),
        }
    }
}

/// Formats milliseconds as the largest whole unit (`5m`, `1h`, `1500ms`).
pub fn fmt_ms(ms: i64) -> String {
    for (unit, len) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms != 0 && ms % len == 0 {
            return format!("{}{unit}", ms / len);
        }
    }
    format!("{ms}ms")
}

/// A source: where events come from and how their time is read.
#[derive(Debug, Clone)]
pub struct SourcePlan {
    /// Source name.
    pub name: String,
    /// Declared columns; `NOT NULL` columns are non-nullable fields.
    pub schema: SchemaRef,
    /// Index of the event-time column in `schema`, if a watermark is declared.
    pub event_time: Option<usize>,
    /// How far the watermark trails the largest event time seen.
    pub watermark_delay_ms: i64,
    /// `connector` option: `file` (or `kafka`).
    pub connector: String,
    /// All `WITH` options (validated), relative paths resolved against the pipeline file.
    pub options: BTreeMap<String, String>,
    /// Columns filled from record metadata instead of the payload.
    pub metadata: Vec<MetadataColumn>,
    /// A partition with no new records for this long stops holding the
    /// source's watermark back (`idle_timeout`); `None`: never.
    pub idle_timeout_ms: Option<i64>,
}

/// What a metadata column holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetadataKind {
    /// The Kafka message key (TEXT).
    Key,
    /// The partition number (INT or BIGINT).
    Partition,
    /// The offset within the partition (BIGINT).
    Offset,
    /// The Kafka message timestamp (TIMESTAMP).
    Timestamp,
}

/// A source column filled from record metadata.
#[derive(Debug, Clone)]
pub struct MetadataColumn {
    /// Index in the source schema.
    pub index: usize,
    /// What it holds.
    pub kind: MetadataKind,
}

impl SourcePlan {
    /// The schema of the payload: the declared columns less the metadata ones.
    pub fn payload_schema(&self) -> SchemaRef {
        let fields: Vec<_> = self
            .schema
            .fields()
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.metadata.iter().any(|m| m.index == *i))
            .map(|(_, f)| Arc::clone(f))
            .collect();
        Arc::new(Schema::new(fields))
    }
}

/// A row-wise step evaluated on batches before (or after) aggregation.
#[derive(Debug, Clone)]
pub enum Stage {
    /// Keep the rows where `predicate` is true.
    Filter {
        /// Boolean expression over `schema`.
        predicate: Expr,
        /// The input (and output) schema.
        schema: DFSchemaRef,
    },
    /// Compute new columns.
    Project {
        /// One expression per output column.
        exprs: Vec<Expr>,
        /// Schema the expressions read.
        input: DFSchemaRef,
        /// Schema they produce.
        output: DFSchemaRef,
    },
}

/// The aggregation of a windowed or lifetime view.
#[derive(Debug, Clone)]
pub struct AggregatePlan {
    /// How events are grouped in time.
    pub window: WindowSpec,
    /// The key columns, in the order of the aggregate's output.
    pub group_exprs: Vec<Expr>,
    /// Aggregate function calls (possibly aliased).
    pub aggr_exprs: Vec<Expr>,
    /// The schema the aggregate reads.
    pub input_schema: DFSchemaRef,
    /// Group columns then aggregate columns.
    pub output_schema: DFSchemaRef,
    /// `HAVING` and the final projection, over `output_schema`.
    pub post: Vec<Stage>,
}

/// What a view computes.
#[derive(Debug, Clone)]
pub enum ViewKind {
    /// A transformation of each event; the latest row per key is the feature value.
    PerEvent,
    /// An aggregate per key (and window).
    Aggregate(AggregatePlan),
}

/// One feature view, ready for the engine.
#[derive(Debug, Clone)]
pub struct ViewPlan {
    /// View name.
    pub name: String,
    /// The source it reads.
    pub source: String,
    /// Entity key columns (names in `output_schema`).
    pub keys: Vec<String>,
    /// Write rows to the online store.
    pub online: bool,
    /// Lake root for the offline store, if any.
    pub offline: Option<PathBuf>,
    /// Kafka topic that also receives every emitted row (`kafka_topic`).
    pub kafka_topic: Option<String>,
    /// Brokers for `kafka_topic` (`kafka_brokers`, else the source's).
    pub kafka_brokers: Option<String>,
    /// Schema of the scanned source (qualified by the source name).
    pub scan_schema: DFSchemaRef,
    /// Row-wise stages before aggregation (all stages, for a per-event view).
    pub stages: Vec<Stage>,
    /// Aggregation, if any.
    pub kind: ViewKind,
    /// Output columns (keys and features, without `window_start`/`window_end`).
    pub output_schema: SchemaRef,
    /// The view's query text.
    pub query: String,
    /// The source's event-time column, if it has one.
    pub event_time: Option<String>,
    /// The nearest-neighbour index over a vector column, if any.
    pub vector_index: Option<crate::vector::VectorIndexPlan>,
}

impl ViewPlan {
    /// The window, for aggregate views.
    pub fn window(&self) -> Option<WindowSpec> {
        match &self.kind {
            ViewKind::Aggregate(a) => Some(a.window),
            ViewKind::PerEvent => None,
        }
    }
}

/// A whole pipeline file, lowered.
#[derive(Debug, Clone)]
pub struct PipelinePlan {
    /// The file it came from.
    pub file: String,
    /// Sources by declaration order.
    pub sources: Vec<SourcePlan>,
    /// Views by declaration order.
    pub views: Vec<ViewPlan>,
}

impl PipelinePlan {
    /// The source named `name`.
    pub fn source(&self, name: &str) -> Option<&SourcePlan> {
        self.sources.iter().find(|s| s.name == name)
    }

    /// The feature view called `name`.
    pub fn view(&self, name: &str) -> Option<&ViewPlan> {
        self.views.iter().find(|v| v.name == name)
    }
}

const SOURCE_OPTIONS: &[&str] = &[
    "connector",
    "path",
    "format",
    "max_record_bytes",
    "topic",
    "brokers",
    "start",
    "group_id",
    "idle_timeout",
    "dead_letter_topic",
];
const FILE_OPTIONS: &[&str] = &["connector", "path", "format", "max_record_bytes"];
const KAFKA_OPTIONS: &[&str] = &[
    "connector",
    "topic",
    "brokers",
    "format",
    "group_id",
    "start",
    "idle_timeout",
    "dead_letter_topic",
    "max_record_bytes",
];
const VIEW_OPTIONS: &[&str] = &[
    "online",
    "offline",
    "kafka_topic",
    "kafka_brokers",
    "vector_index",
    "distance",
    "index_trees",
    "search_k",
];
const TYPES: &str = "TEXT, VARCHAR, DOUBLE, FLOAT, REAL, BIGINT, INT, SMALLINT, BOOLEAN, TIMESTAMP, DATE, FLOAT[n] (a vector of n float32)";

/// Reads, parses and plans a pipeline file.
pub fn plan_file(path: &Path) -> Result<PipelinePlan, PipelineError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        PipelineError::at(&file, None, format!("cannot read the pipeline file: {e}"))
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    plan_pipeline(&file, &text, base)
}

/// Parses and plans pipeline text. Relative paths in options resolve against `base_dir`.
pub fn plan_pipeline(
    file: &str,
    text: &str,
    base_dir: &Path,
) -> Result<PipelinePlan, PipelineError> {
    let statements = parse_pipeline(file, text)?;
    let mut plan = PipelinePlan {
        file: file.to_string(),
        sources: Vec::new(),
        views: Vec::new(),
    };
    let ctx = SessionContext::new();
    ctx.register_udaf(crate::vector::VectorAgg::udaf(crate::vector::VectorOp::Sum));
    ctx.register_udaf(crate::vector::VectorAgg::udaf(crate::vector::VectorOp::Avg));
    let mut names = HashSet::new();
    for st in statements {
        match st {
            Statement::Source(s) => {
                if !names.insert(s.name.value.clone()) {
                    return Err(PipelineError::at(
                        file,
                        Some(s.name.pos),
                        format!("`{}` is defined twice", s.name.value),
                    ));
                }
                let sp = lower_source(file, &s, base_dir)?;
                ctx.register_table(
                    sp.name.as_str(),
                    Arc::new(EmptyTable::new(Arc::clone(&sp.schema))),
                )
                .map_err(|e| PipelineError::at(file, Some(s.name.pos), e.to_string()))?;
                plan.sources.push(sp);
            }
            Statement::View(v) => {
                if !names.insert(v.name.value.clone()) {
                    return Err(PipelineError::at(
                        file,
                        Some(v.name.pos),
                        format!("`{}` is defined twice", v.name.value),
                    ));
                }
                let vp = lower_view(file, text, &v, &plan, &ctx, base_dir)?;
                plan.views.push(vp);
            }
        }
    }
    if plan.views.is_empty() {
        return Err(PipelineError::at(
            file,
            None,
            "the pipeline defines no CREATE FEATURE VIEW",
        ));
    }
    Ok(plan)
}

fn arrow_type(dt: &ast::DataType) -> Option<DataType> {
    let s = dt.to_string().to_ascii_uppercase();
    // `FLOAT[n]` / `REAL[n]`: a vector of n float32.
    if let Some((elem, rest)) = s.split_once('[') {
        let dims: i32 = rest.strip_suffix(']')?.trim().parse().ok()?;
        return match elem.trim() {
            "FLOAT" | "REAL" | "FLOAT4" | "FLOAT32" if dims > 0 => {
                Some(crate::vector::vector_type(dims))
            }
            _ => None,
        };
    }
    let base = s.split('(').next().unwrap_or("").trim();
    Some(match base {
        "TEXT" | "STRING" | "VARCHAR" | "CHAR" | "CHARACTER VARYING" => DataType::Utf8,
        "DOUBLE" | "DOUBLE PRECISION" | "FLOAT8" | "FLOAT64" => DataType::Float64,
        "FLOAT" | "REAL" | "FLOAT4" | "FLOAT32" => DataType::Float32,
        "BIGINT" | "INT8" | "INT64" => DataType::Int64,
        "INT" | "INTEGER" | "INT4" => DataType::Int32,
        "SMALLINT" | "INT2" => DataType::Int16,
        "BOOLEAN" | "BOOL" => DataType::Boolean,
        "TIMESTAMP" => TIMESTAMP_TYPE,
        "DATE" => DataType::Date32,
        _ => return None,
    })
}

fn check_options(
    file: &str,
    opts: &[OptionDef],
    known: &[&str],
    what: &str,
) -> Result<(), PipelineError> {
    let mut seen = HashSet::new();
    for o in opts {
        let k = o.key.value.as_str();
        if !seen.insert(k) {
            return Err(PipelineError::at(
                file,
                Some(o.key.pos),
                format!("option `{k}` is given twice"),
            ));
        }
        if what == "source" && k.starts_with("kafka.") {
            continue;
        }
        if !known.contains(&k) {
            return Err(PipelineError::at(
                file,
                Some(o.key.pos),
                format!(
                    "unknown {what} option `{k}`; known options: {}",
                    known.join(", ")
                ),
            )
            .suggest(k, known.iter().copied()));
        }
    }
    Ok(())
}

/// Expands `${NAME}` and `${NAME:-default}` in an option value from the
/// environment (brokers per deployment, credentials kept out of the file).
pub fn expand_env(value: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = value;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unclosed `${{` in `{value}`"))?;
        let spec = &after[..end];
        let (name, default) = match spec.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (spec, None),
        };
        match (std::env::var(name), default) {
            (Ok(v), _) if !v.is_empty() => out.push_str(&v),
            (_, Some(d)) => out.push_str(d),
            _ => {
                return Err(format!(
                    "environment variable `{name}` is not set (write ${{{name}:-default}} for a default)"
                ));
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn lower_source(file: &str, s: &SourceDef, base_dir: &Path) -> Result<SourcePlan, PipelineError> {
    let mut fields = Vec::new();
    let mut metadata = Vec::new();
    let mut seen = HashSet::new();
    for c in &s.columns {
        if !seen.insert(c.name.value.clone()) {
            return Err(PipelineError::at(
                file,
                Some(c.name.pos),
                format!("column `{}` is declared twice", c.name.value),
            ));
        }
        let dt = arrow_type(&c.data_type).ok_or_else(|| {
            PipelineError::at(
                file,
                Some(c.type_pos),
                format!("unsupported column type `{}`", c.data_type),
            )
            .with_help(format!("supported types: {TYPES}"))
        })?;
        if let Some((m, pos)) = &c.metadata {
            let kind = match m.to_ascii_lowercase().as_str() {
                "key" => MetadataKind::Key,
                "partition" => MetadataKind::Partition,
                "offset" => MetadataKind::Offset,
                "timestamp" => MetadataKind::Timestamp,
                other => {
                    return Err(PipelineError::at(
                        file,
                        Some(*pos),
                        format!(
                            "unknown metadata `{other}`; Kafka sources offer key, partition, offset, timestamp"
                        ),
                    )
                    .suggest(other, ["key", "partition", "offset", "timestamp"]));
                }
            };
            let ok = match kind {
                MetadataKind::Key => dt == DataType::Utf8,
                MetadataKind::Partition => matches!(dt, DataType::Int32 | DataType::Int64),
                MetadataKind::Offset => dt == DataType::Int64,
                MetadataKind::Timestamp => dt == TIMESTAMP_TYPE,
            };
            if !ok {
                let want = match kind {
                    MetadataKind::Key => "TEXT",
                    MetadataKind::Partition => "INT or BIGINT",
                    MetadataKind::Offset => "BIGINT",
                    MetadataKind::Timestamp => "TIMESTAMP",
                };
                return Err(PipelineError::at(
                    file,
                    Some(c.type_pos),
                    format!("metadata column `{}` must be {want}", c.name.value),
                ));
            }
            metadata.push(MetadataColumn {
                index: fields.len(),
                kind,
            });
        }
        fields.push(Field::new(&c.name.value, dt, !c.not_null));
    }
    if fields.is_empty() {
        return Err(PipelineError::at(
            file,
            Some(s.name.pos),
            "a source needs at least one column",
        ));
    }
    let schema = Arc::new(Schema::new(fields));
    let (event_time, watermark_delay_ms) = match &s.watermark {
        None => (None, 0),
        Some(w) => {
            let idx = schema.index_of(&w.column.value).map_err(|_| {
                PipelineError::at(
                    file,
                    Some(w.column.pos),
                    format!(
                        "WATERMARK FOR names `{}`, which is not a column of `{}`",
                        w.column.value, s.name.value
                    ),
                )
                .suggest(
                    &w.column.value,
                    schema.fields().iter().map(|f| f.name().as_str()),
                )
            })?;
            if schema.field(idx).data_type() != &TIMESTAMP_TYPE {
                return Err(PipelineError::at(
                    file,
                    Some(w.column.pos),
                    format!(
                        "the event-time column `{}` must be a TIMESTAMP",
                        w.column.value
                    ),
                ));
            }
            (Some(idx), w.delay_ms)
        }
    };
    check_options(file, &s.options, SOURCE_OPTIONS, "source")?;
    let mut options = BTreeMap::new();
    for o in &s.options {
        let v = expand_env(&o.value).map_err(|m| PipelineError::at(file, Some(o.value_pos), m))?;
        options.insert(o.key.value.clone(), v);
    }
    let opt_pos = |k: &str| {
        s.options
            .iter()
            .find(|o| o.key.value == k)
            .map(|o| o.value_pos)
    };
    let connector = options.get("connector").cloned().ok_or_else(|| {
        PipelineError::at(
            file,
            Some(s.name.pos),
            format!(
                "source `{}` needs a `connector` option ('file' or 'kafka')",
                s.name.value
            ),
        )
    })?;
    match connector.as_str() {
        "file" => {
            let path = options.get("path").ok_or_else(|| {
                PipelineError::at(
                    file,
                    Some(s.name.pos),
                    format!("file source `{}` needs a `path` option", s.name.value),
                )
            })?;
            let resolved = base_dir.join(path);
            options.insert("path".into(), resolved.display().to_string());
            for o in &s.options {
                let k = o.key.value.as_str();
                if !FILE_OPTIONS.contains(&k) {
                    return Err(PipelineError::at(
                        file,
                        Some(o.key.pos),
                        format!(
                            "option `{k}` does not apply to file sources; file sources take: {}",
                            FILE_OPTIONS.join(", ")
                        ),
                    ));
                }
            }
            let format = options.get("format").map(String::as_str).unwrap_or("json");
            if format != "json" {
                return Err(PipelineError::at(
                    file,
                    opt_pos("format"),
                    format!(
                        "file format `{format}` is not supported yet; this build reads 'json' (JSON lines)"
                    ),
                ));
            }
        }
        "kafka" => {
            for o in &s.options {
                let k = o.key.value.as_str();
                if !KAFKA_OPTIONS.contains(&k) && !k.starts_with("kafka.") {
                    return Err(PipelineError::at(
                        file,
                        Some(o.key.pos),
                        format!(
                            "option `{k}` does not apply to Kafka sources; they take: {} and kafka.* (passed to librdkafka)",
                            KAFKA_OPTIONS.join(", ")
                        ),
                    ));
                }
            }
            for required in ["topic", "brokers"] {
                if options.get(required).is_none_or(|v| v.trim().is_empty()) {
                    return Err(PipelineError::at(
                        file,
                        Some(s.name.pos),
                        format!(
                            "Kafka source `{}` needs a `{required}` option",
                            s.name.value
                        ),
                    ));
                }
            }
            let format = options.get("format").map(String::as_str).unwrap_or("json");
            if format != "json" {
                return Err(PipelineError::at(
                    file,
                    opt_pos("format"),
                    format!("Kafka format `{format}` is not supported; this build reads 'json'"),
                ));
            }
            let start = options
                .get("start")
                .map(String::as_str)
                .unwrap_or("earliest");
            if !["earliest", "latest", "committed"].contains(&start) {
                return Err(PipelineError::at(
                    file,
                    opt_pos("start"),
                    format!("start must be 'earliest', 'latest' or 'committed', found `{start}`"),
                )
                .suggest(start, ["earliest", "latest", "committed"]));
            }
        }
        other => {
            return Err(PipelineError::at(
                file,
                opt_pos("connector"),
                format!("unknown connector `{other}`; expected 'file' or 'kafka'"),
            )
            .suggest(other, ["file", "kafka"]));
        }
    }
    if let Some(v) = options.get("max_record_bytes")
        && v.parse::<usize>().is_err()
    {
        return Err(PipelineError::at(
            file,
            opt_pos("max_record_bytes"),
            format!("max_record_bytes must be a number of bytes, found `{v}`"),
        ));
    }
    if connector != "kafka"
        && let Some(c) = s.columns.iter().find(|c| c.metadata.is_some())
    {
        return Err(PipelineError::at(
            file,
            c.metadata.as_ref().map(|m| m.1),
            format!(
                "column `{}`: METADATA columns are only offered by Kafka sources",
                c.name.value
            ),
        ));
    }
    let idle_timeout_ms = match options.get("idle_timeout") {
        None => None,
        Some(v) => Some(
            crate::interval::duration_ms(v)
                .map_err(|m| PipelineError::at(file, opt_pos("idle_timeout"), m))?,
        ),
    };
    Ok(SourcePlan {
        name: s.name.value.clone(),
        schema,
        event_time,
        watermark_delay_ms,
        connector,
        options,
        metadata,
        idle_timeout_ms,
    })
}

/// The window call found in `GROUP BY`, with its position.
struct WindowCall {
    spec: WindowSpec,
    time_col: String,
    pos: Pos,
}

fn span_pos(span: datafusion::sql::sqlparser::tokenizer::Span) -> Option<Pos> {
    (span.start.line > 0).then(|| span.start.into())
}

fn take_window(file: &str, query: &mut ast::Query) -> Result<Option<WindowCall>, PipelineError> {
    let SetExpr::Select(select) = query.body.as_mut() else {
        return Ok(None);
    };
    let GroupByExpr::Expressions(exprs, _) = &mut select.group_by else {
        return Ok(None);
    };
    let mut found = None;
    let mut keep = Vec::new();
    for e in exprs.drain(..) {
        let ast::Expr::Function(f) = &e else {
            keep.push(e);
            continue;
        };
        let fname = f.name.to_string().to_ascii_lowercase();
        if !matches!(fname.as_str(), "tumble" | "hop" | "session") {
            keep.push(e);
            continue;
        }
        let pos = span_pos(e.span());
        if fname == "session" {
            return Err(PipelineError::at(
                file,
                pos,
                "SESSION windows are not supported yet; use TUMBLE or HOP",
            ));
        }
        if found.is_some() {
            return Err(PipelineError::at(
                file,
                pos,
                "a feature view has at most one window in GROUP BY",
            ));
        }
        let FunctionArguments::List(list) = &f.args else {
            return Err(PipelineError::at(
                file,
                pos,
                format!("{} needs arguments", fname.to_uppercase()),
            ));
        };
        let mut args = Vec::new();
        for a in &list.args {
            match a {
                FunctionArg::Unnamed(FunctionArgExpr::Expr(x)) => args.push(x.clone()),
                _ => {
                    return Err(PipelineError::at(
                        file,
                        pos,
                        "window arguments must be plain expressions",
                    ));
                }
            }
        }
        let want = if fname == "tumble" { 2 } else { 3 };
        if args.len() != want {
            let usage = if fname == "tumble" {
                "TUMBLE(ts, INTERVAL '5' MINUTE)"
            } else {
                "HOP(ts, INTERVAL '5' MINUTE, INTERVAL '1' HOUR)"
            };
            return Err(PipelineError::at(
                file,
                pos,
                format!("{} takes {want} arguments: {usage}", fname.to_uppercase()),
            ));
        }
        let time_col = match &args[0] {
            ast::Expr::Identifier(i) => normalize(i),
            ast::Expr::CompoundIdentifier(parts) => parts.last().map(normalize).unwrap_or_default(),
            other => {
                return Err(PipelineError::at(
                    file,
                    span_pos(other.span()).or(pos),
                    format!(
                        "the first argument of {} must be the event-time column",
                        fname.to_uppercase()
                    ),
                ));
            }
        };
        let ms = |x: &ast::Expr| {
            interval_ms(x).map_err(|m| PipelineError::at(file, span_pos(x.span()).or(pos), m))
        };
        let spec = if fname == "tumble" {
            let size_ms = ms(&args[1])?;
            if size_ms <= 0 {
                return Err(PipelineError::at(
                    file,
                    pos,
                    "the window size must be positive",
                ));
            }
            WindowSpec::Tumble { size_ms }
        } else {
            let slide_ms = ms(&args[1])?;
            let size_ms = ms(&args[2])?;
            if slide_ms <= 0 || size_ms <= 0 {
                return Err(PipelineError::at(
                    file,
                    pos,
                    "the window slide and size must be positive",
                ));
            }
            if size_ms % slide_ms != 0 {
                return Err(PipelineError::at(
                    file,
                    span_pos(args[2].span()).or(pos),
                    format!(
                        "HOP size ({}) must be a whole multiple of its slide ({})",
                        fmt_ms(size_ms),
                        fmt_ms(slide_ms)
                    ),
                ));
            }
            if size_ms == slide_ms {
                WindowSpec::Tumble { size_ms }
            } else {
                WindowSpec::Hop { slide_ms, size_ms }
            }
        };
        found = Some(WindowCall {
            spec,
            time_col,
            pos: pos.unwrap_or_default(),
        });
    }
    *exprs = keep;
    Ok(found)
}

/// The position of the first word `word` at or after `from` in `text`.
fn locate_word(text: &str, from: Pos, word: &str) -> Option<Pos> {
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
    let tokens = Tokenizer::new(&GenericDialect {}, text)
        .tokenize_with_location()
        .ok()?;
    tokens.into_iter().find_map(|t| {
        let p: Pos = t.span.start.into();
        match &t.token {
            Token::Word(w)
                if (p.line, p.column) >= (from.line, from.column)
                    && w.value.eq_ignore_ascii_case(word) =>
            {
                Some(p)
            }
            _ => None,
        }
    })
}

fn df_error(
    file: &str,
    text: &str,
    fallback: Pos,
    e: DataFusionError,
    candidates: &[String],
    functions: &[String],
) -> PipelineError {
    let diag = e.diagnostic().cloned();
    if let Some(name) = e
        .strip_backtrace()
        .split("Invalid function '")
        .nth(1)
        .and_then(|r| r.split('\'').next())
    {
        let pos = diag
            .as_ref()
            .and_then(|d| d.span)
            .filter(|s| s.start.line > 0)
            .map(|s| Pos {
                line: s.start.line,
                column: s.start.column,
            });
        let pos = pos
            .or_else(|| locate_word(text, fallback, name))
            .unwrap_or(fallback);
        return PipelineError::at(file, Some(pos), format!("unknown function `{name}`"))
            .suggest(name, functions.iter().map(String::as_str));
    }
    let mut msg = e.strip_backtrace().to_string();
    let mut pos = Some(fallback);
    if let Some(d) = &diag {
        if let Some(s) = d.span
            && s.start.line > 0
        {
            pos = Some(Pos {
                line: s.start.line,
                column: s.start.column,
            });
        }
        if !d.message.is_empty() {
            msg = d.message.clone();
        }
    }
    let mut err = PipelineError::at(file, pos, msg.clone());
    if let Some(h) = diag.as_ref().and_then(|d| d.helps.first()) {
        err = err.with_help(h.message.clone());
    } else if msg.contains("window_start") || msg.contains("window_end") {
        err = err.with_help("window_start and window_end are added to every windowed view's output; do not select them");
    } else if let DataFusionError::SchemaError(se, _) = e.find_root()
        && let datafusion::common::SchemaError::FieldNotFound { field, .. } = se.as_ref()
    {
        err = err.suggest(&field.name, candidates.iter().map(String::as_str));
        if err.pos == Some(fallback)
            && let Some(p) = locate_word(text, fallback, &field.name)
        {
            err.pos = Some(p);
        }
    }
    err
}

fn lower_view(
    file: &str,
    text: &str,
    v: &ViewDef,
    plan: &PipelinePlan,
    ctx: &SessionContext,
    base_dir: &Path,
) -> Result<ViewPlan, PipelineError> {
    check_options(file, &v.options, VIEW_OPTIONS, "feature view")?;
    let mut online = true;
    let mut offline = None;
    let mut kafka_topic = None;
    let mut kafka_brokers = None;
    let mut index_col: Option<&OptionDef> = None;
    let mut distance: Option<&OptionDef> = None;
    let mut index_trees = None;
    let mut search_k = None;
    let count = |o: &OptionDef| -> Result<usize, PipelineError> {
        match o.value.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(PipelineError::at(
                file,
                Some(o.value_pos),
                format!(
                    "{} must be a positive integer, found `{}`",
                    o.key.value, o.value
                ),
            )),
        }
    };
    for o in &v.options {
        match o.key.value.as_str() {
            "vector_index" => index_col = Some(o),
            "distance" => distance = Some(o),
            "index_trees" => index_trees = Some(count(o)?),
            "search_k" => search_k = Some(count(o)?),
            "online" => {
                online = match o.value.to_ascii_lowercase().as_str() {
                    "true" => true,
                    "false" => false,
                    other => {
                        return Err(PipelineError::at(
                            file,
                            Some(o.value_pos),
                            format!("online must be true or false, found `{other}`"),
                        ));
                    }
                }
            }
            "offline" => {
                let v = expand_env(&o.value)
                    .map_err(|m| PipelineError::at(file, Some(o.value_pos), m))?;
                offline = Some(base_dir.join(v))
            }
            "kafka_topic" => kafka_topic = Some(o.value.clone()),
            "kafka_brokers" => {
                kafka_brokers = Some(
                    expand_env(&o.value)
                        .map_err(|m| PipelineError::at(file, Some(o.value_pos), m))?,
                )
            }
            _ => {}
        }
    }
    if !online && offline.is_none() && kafka_topic.is_none() {
        return Err(PipelineError::at(
            file,
            Some(v.name.pos),
            format!(
                "view `{}` writes nowhere: set online = true or offline = 'DIR'",
                v.name.value
            ),
        ));
    }

    // The source: exactly one table in FROM.
    let mut query = v.query.clone();
    let source_name = match query.body.as_ref() {
        SetExpr::Select(s) if s.from.len() == 1 && s.from[0].joins.is_empty() => {
            match &s.from[0].relation {
                ast::TableFactor::Table { name, .. } => {
                    let n = name
                        .0
                        .last()
                        .and_then(|p| p.as_ident())
                        .map(normalize)
                        .unwrap_or_default();
                    let pos = span_pos(name.span());
                    if plan.source(&n).is_none() {
                        return Err(PipelineError::at(
                            file,
                            pos.or(Some(v.query_pos)),
                            format!("`{n}` is not a source of this pipeline"),
                        )
                        .suggest(&n, plan.sources.iter().map(|s| s.name.as_str())));
                    }
                    n
                }
                _ => {
                    return Err(PipelineError::at(
                        file,
                        Some(v.query_pos),
                        "a feature view reads one source directly: FROM <source>",
                    ));
                }
            }
        }
        SetExpr::Select(s) if s.from.is_empty() => {
            return Err(PipelineError::at(
                file,
                Some(v.query_pos),
                "a feature view needs FROM <source>",
            ));
        }
        SetExpr::Select(_) => {
            return Err(PipelineError::at(
                file,
                Some(v.query_pos),
                "a feature view reads exactly one source; joins are not supported",
            ));
        }
        _ => {
            return Err(PipelineError::at(
                file,
                Some(v.query_pos),
                "a feature view is a single SELECT (no UNION, VALUES or set operations)",
            ));
        }
    };
    let source = plan
        .source(&source_name)
        .ok_or_else(|| PipelineError::at(file, Some(v.query_pos), "source vanished"))?;
    let window = take_window(file, &mut query)?;
    if let Some(w) = &window {
        let et = source
            .event_time
            .map(|i| source.schema.field(i).name().clone());
        match et {
            None => {
                return Err(PipelineError::at(
                    file,
                    Some(w.pos),
                    format!(
                        "windows need event time, but source `{}` declares no WATERMARK FOR",
                        source.name
                    ),
                ));
            }
            Some(et) if et != w.time_col => {
                return Err(PipelineError::at(
                    file,
                    Some(w.pos),
                    format!(
                        "windows run on the event-time column `{et}` of `{}`, not `{}`",
                        source.name, w.time_col
                    ),
                )
                .with_help(format!("write the window over `{et}`")));
            }
            Some(_) => {}
        }
    }
    let query_text = v.query.to_string();
    let candidates: Vec<String> = source
        .schema
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();

    // DataFusion plans the SELECT (window call removed); its analyzer coerces types.
    let state = ctx.state();
    let statement = DFStatement::Statement(Box::new(ast::Statement::Query(query)));
    let logical = futures::executor::block_on(state.statement_to_plan(statement))
        .and_then(|p| {
            state
                .analyzer()
                .execute_and_check(p, state.config_options(), |_, _| {})
        })
        .map_err(|e| {
            let mut functions: Vec<String> = state.scalar_functions().keys().cloned().collect();
            functions.extend(state.aggregate_functions().keys().cloned());
            functions.extend(state.window_functions().keys().cloned());
            functions.sort();
            df_error(file, text, v.query_pos, e, &candidates, &functions)
        })?;

    let mut post = Vec::new();
    let mut node = &logical;
    let mut aggregate = None;
    let mut stages = Vec::new();
    let scan_schema;
    loop {
        match node {
            LogicalPlan::Projection(p) => {
                let st = Stage::Project {
                    exprs: p.expr.clone(),
                    input: Arc::clone(p.input.schema()),
                    output: Arc::clone(&p.schema),
                };
                if aggregate.is_none() {
                    post.push(st)
                } else {
                    stages.push(st)
                }
                node = p.input.as_ref();
            }
            LogicalPlan::Filter(f) => {
                let st = Stage::Filter {
                    predicate: f.predicate.clone(),
                    schema: Arc::clone(f.input.schema()),
                };
                if aggregate.is_none() {
                    post.push(st)
                } else {
                    stages.push(st)
                }
                node = f.input.as_ref();
            }
            LogicalPlan::SubqueryAlias(s) => node = s.input.as_ref(),
            LogicalPlan::Aggregate(a) if aggregate.is_none() => {
                aggregate = Some(a);
                node = a.input.as_ref();
            }
            LogicalPlan::TableScan(t) => {
                scan_schema = Arc::clone(&t.projected_schema);
                break;
            }
            other => {
                let what = match other {
                    LogicalPlan::Sort(_) => "ORDER BY",
                    LogicalPlan::Limit(_) => "LIMIT",
                    LogicalPlan::Join(_) => "JOIN",
                    LogicalPlan::Window(_) => "window functions (OVER)",
                    LogicalPlan::Distinct(_) => "SELECT DISTINCT",
                    LogicalPlan::Aggregate(_) => "nested aggregation",
                    _ => "this kind of query",
                };
                return Err(PipelineError::at(
                    file,
                    Some(v.query_pos),
                    format!("{what} is not supported in a feature view"),
                ));
            }
        }
    }
    post.reverse();
    stages.reverse();

    let keys: Vec<String> = v.keys.iter().map(|k| k.value.clone()).collect();
    let (kind, out_schema) = match aggregate {
        None => {
            if let Some(w) = &window {
                return Err(PipelineError::at(
                    file,
                    Some(w.pos),
                    "a window needs aggregates and the key in GROUP BY",
                ));
            }
            stages = post;
            let out = stages
                .last()
                .map(stage_output)
                .unwrap_or_else(|| Arc::clone(&scan_schema));
            (ViewKind::PerEvent, out)
        }
        Some(a) => {
            let mut group_names = Vec::new();
            for g in &a.group_expr {
                match g {
                    Expr::Column(c) => group_names.push(c.name.clone()),
                    other => {
                        return Err(PipelineError::at(
                            file,
                            Some(v.query_pos),
                            format!(
                                "GROUP BY takes the key columns and one window; `{other}` is neither"
                            ),
                        ));
                    }
                }
            }
            let mut want = keys.clone();
            want.sort();
            let mut have = group_names.clone();
            have.sort();
            if want != have {
                return Err(PipelineError::at(
                    file,
                    v.keys.first().map(|k| k.pos),
                    format!(
                        "KEY ({}) must name the GROUP BY columns ({})",
                        keys.join(", "),
                        group_names.join(", ")
                    ),
                ));
            }
            let out = post
                .last()
                .map(stage_output)
                .unwrap_or_else(|| Arc::clone(&a.schema));
            let event_time = source
                .event_time
                .map(|i| source.schema.field(i).name().clone());
            let aggr_exprs = a
                .aggr_expr
                .iter()
                .map(|e| order_by_event_time(e, event_time.as_deref(), a.input.schema()))
                .collect();
            let agg = AggregatePlan {
                window: window
                    .as_ref()
                    .map(|w| w.spec)
                    .unwrap_or(WindowSpec::Lifetime),
                group_exprs: a.group_expr.clone(),
                aggr_exprs,
                input_schema: Arc::clone(a.input.schema()),
                output_schema: Arc::clone(&a.schema),
                post,
            };
            (ViewKind::Aggregate(agg), out)
        }
    };
    let output_schema: SchemaRef = Arc::new(out_schema.as_arrow().clone());
    for k in &v.keys {
        if output_schema.index_of(&k.value).is_err() {
            return Err(PipelineError::at(
                file,
                Some(k.pos),
                format!("the SELECT must output the key column `{}`", k.value),
            )
            .suggest(
                &k.value,
                output_schema.fields().iter().map(|f| f.name().as_str()),
            ));
        }
    }
    for f in output_schema.fields() {
        if matches!(f.name().as_str(), "window_start" | "window_end") {
            return Err(PipelineError::at(
                file,
                Some(v.query_pos),
                format!("`{}` is a reserved output column", f.name()),
            ));
        }
    }
    let vector_index = match index_col {
        None => {
            if let Some(o) = [distance].into_iter().flatten().next().or(v
                .options
                .iter()
                .find(|o| matches!(o.key.value.as_str(), "index_trees" | "search_k")))
            {
                return Err(PipelineError::at(
                    file,
                    Some(o.key.pos),
                    format!("`{}` needs vector_index = 'column'", o.key.value),
                ));
            }
            None
        }
        Some(o) => {
            let col = o.value.trim();
            let Ok(field) = output_schema.field_with_name(col) else {
                return Err(PipelineError::at(
                    file,
                    Some(o.value_pos),
                    format!("vector_index: the view has no output column `{col}`"),
                )
                .suggest(
                    col,
                    output_schema.fields().iter().map(|f| f.name().as_str()),
                ));
            };
            let Some(dims) = crate::vector::vector_dims(field.data_type()) else {
                return Err(PipelineError::at(
                    file,
                    Some(o.value_pos),
                    format!(
                        "vector_index: `{col}` is {}, not a vector (FLOAT[n])",
                        field.data_type()
                    ),
                ));
            };
            if !online {
                return Err(PipelineError::at(
                    file,
                    Some(o.key.pos),
                    "vector_index indexes the online store's current values; it needs online = true",
                ));
            }
            let distance = match distance {
                None => crate::vector::Distance::Cosine,
                Some(d) => crate::vector::Distance::parse(&d.value).ok_or_else(|| {
                    PipelineError::at(
                        file,
                        Some(d.value_pos),
                        format!(
                            "distance must be 'cosine', 'euclidean' or 'dot', found `{}`",
                            d.value
                        ),
                    )
                })?,
            };
            Some(crate::vector::VectorIndexPlan {
                column: col.to_string(),
                dims,
                distance,
                trees: index_trees,
                search_k,
            })
        }
    };
    if kafka_topic.is_some() && kafka_brokers.is_none() {
        match plan.source(&source_name) {
            Some(sp) if sp.connector == "kafka" => {
                kafka_brokers = sp.options.get("brokers").cloned();
            }
            _ => {
                return Err(PipelineError::at(
                    file,
                    Some(v.name.pos),
                    format!(
                        "view `{}` sets kafka_topic but its source is not Kafka; add kafka_brokers = 'host:port'",
                        v.name.value
                    ),
                ));
            }
        }
    }
    Ok(ViewPlan {
        name: v.name.value.clone(),
        source: source_name,
        keys,
        online,
        offline,
        kafka_topic,
        kafka_brokers,
        scan_schema,
        stages,
        kind,
        output_schema,
        query: query_text,
        event_time: source
            .event_time
            .map(|i| source.schema.field(i).name().clone()),
        vector_index,
    })
}

/// `LAST_VALUE(x)` / `FIRST_VALUE(x)` without `ORDER BY` mean the value of
/// the latest (earliest) event by event time, not by arrival: panes merged
/// in any order and a replay in another order then agree.
fn order_by_event_time(e: &Expr, event_time: Option<&str>, input: &DFSchemaRef) -> Expr {
    match e {
        Expr::Alias(a) => Expr::Alias(datafusion::logical_expr::expr::Alias {
            expr: Box::new(order_by_event_time(&a.expr, event_time, input)),
            relation: a.relation.clone(),
            name: a.name.clone(),
            metadata: a.metadata.clone(),
        }),
        Expr::AggregateFunction(f)
            if matches!(f.func.name(), "last_value" | "first_value")
                && f.params.order_by.is_empty() =>
        {
            let Some(ts) = event_time else {
                return e.clone();
            };
            let Ok((q, field)) = input.qualified_field_with_unqualified_name(ts) else {
                return e.clone();
            };
            let col = Expr::Column(datafusion::common::Column::new(q.cloned(), field.name()));
            let mut f = f.clone();
            f.params.order_by = vec![datafusion::logical_expr::SortExpr::new(col, true, false)];
            Expr::AggregateFunction(f)
        }
        other => other.clone(),
    }
}

fn stage_output(s: &Stage) -> DFSchemaRef {
    match s {
        Stage::Filter { schema, .. } => Arc::clone(schema),
        Stage::Project { output, .. } => Arc::clone(output),
    }
}

impl fmt::Display for PipelinePlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for s in &self.sources {
            writeln!(f, "Source {} [{}]", s.name, s.connector)?;
            for (i, fl) in s.schema.fields().iter().enumerate() {
                let et = if Some(i) == s.event_time {
                    format!(
                        "  (event time, watermark = max - {})",
                        fmt_ms(s.watermark_delay_ms)
                    )
                } else {
                    String::new()
                };
                let meta = s
                    .metadata
                    .iter()
                    .find(|m| m.index == i)
                    .map(|m| format!("  (metadata: {:?})", m.kind).to_lowercase())
                    .unwrap_or_default();
                writeln!(
                    f,
                    "  {}: {}{}{}{}",
                    fl.name(),
                    fl.data_type(),
                    if fl.is_nullable() { "" } else { " NOT NULL" },
                    et,
                    meta
                )?;
            }
            for (k, v) in &s.options {
                // Credentials passed to librdkafka are not echoed.
                let secret = ["password", "secret", "token"]
                    .iter()
                    .any(|w| k.contains(w));
                let v = if secret { "********" } else { v.as_str() };
                writeln!(f, "  option {k} = {v}")?;
            }
        }
        for v in &self.views {
            writeln!(
                f,
                "FeatureView {} KEY ({}) online={} offline={}{}",
                v.name,
                v.keys.join(", "),
                v.online,
                v.offline
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "-".into()),
                v.kafka_topic
                    .as_ref()
                    .map(|t| format!(" kafka_topic={t}"))
                    .unwrap_or_default()
            )?;
            let mut lines = Vec::new();
            match &v.kind {
                ViewKind::PerEvent => lines.push("EmitPerEvent: latest row per key".to_string()),
                ViewKind::Aggregate(a) => {
                    lines.push(format!("Emit: {}", match a.window {
                        WindowSpec::Lifetime => "changed keys at each checkpoint".to_string(),
                        w => format!("one row per key and window when the watermark passes window_end; valid until window_end + {}", fmt_ms(w.slide_ms().unwrap_or(0))),
                    }));
                    for s in a.post.iter().rev() {
                        lines.push(fmt_stage(s));
                    }
                    let panes = match a.window {
                        WindowSpec::Hop { slide_ms, size_ms } => {
                            format!(" panes={}x{}", size_ms / slide_ms, fmt_ms(slide_ms))
                        }
                        _ => String::new(),
                    };
                    let aggs: Vec<String> = a.aggr_exprs.iter().map(|e| e.to_string()).collect();
                    let groups: Vec<String> = a.group_exprs.iter().map(|e| e.to_string()).collect();
                    lines.push(format!(
                        "WindowAggregate: window={}{panes} key=[{}] aggr=[{}] state=RocksDB",
                        a.window,
                        groups.join(", "),
                        aggs.join(", ")
                    ));
                }
            }
            for s in v.stages.iter().rev() {
                lines.push(fmt_stage(s));
            }
            lines.push(format!("Source: {}", v.source));
            for (depth, l) in lines.iter().enumerate() {
                writeln!(f, "{}{}", "  ".repeat(depth + 1), l)?;
            }
        }
        Ok(())
    }
}

fn fmt_stage(s: &Stage) -> String {
    match s {
        Stage::Filter { predicate, .. } => format!("Filter: {predicate}"),
        Stage::Project { exprs, .. } => {
            let e: Vec<String> = exprs.iter().map(|e| e.to_string()).collect();
            format!("Project: {}", e.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = "CREATE SOURCE clicks (user_id TEXT NOT NULL, item_id TEXT, price DOUBLE, ts TIMESTAMP NOT NULL,\n    WATERMARK FOR ts AS ts - INTERVAL '5' SECOND) WITH (connector = 'file', path = 'c.jsonl');\n";

    fn plan(view: &str) -> Result<PipelinePlan, PipelineError> {
        plan_pipeline("p.sql", &format!("{SRC}{view}"), Path::new("/tmp"))
    }

    #[test]
    fn lowers_hop_view() {
        let p = plan("CREATE FEATURE VIEW v KEY user_id AS SELECT user_id, COUNT(*) AS n, SUM(price) / COUNT(*) AS avg_p FROM clicks WHERE price >= 0 GROUP BY user_id, HOP(ts, INTERVAL '5' MINUTE, INTERVAL '1' HOUR);").expect("plans");
        let v = &p.views[0];
        assert_eq!(
            v.window(),
            Some(WindowSpec::Hop {
                slide_ms: 300_000,
                size_ms: 3_600_000
            })
        );
        assert_eq!(v.stages.len(), 1);
        let names: Vec<&str> = v
            .output_schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        assert_eq!(names, ["user_id", "n", "avg_p"]);
        assert_eq!(p.sources[0].options["path"], "/tmp/c.jsonl");
    }

    #[test]
    fn lowers_lifetime_and_per_event() {
        let p = plan("CREATE FEATURE VIEW a KEY user_id AS SELECT user_id, MAX(price) AS m FROM clicks GROUP BY user_id;\nCREATE FEATURE VIEW b KEY user_id AS SELECT user_id, price * 2 AS p2 FROM clicks WHERE price > 1;").expect("plans");
        assert_eq!(p.views[0].window(), Some(WindowSpec::Lifetime));
        assert!(matches!(p.views[1].kind, ViewKind::PerEvent));
        assert_eq!(p.views[1].stages.len(), 2);
    }

    #[test]
    fn errors_point_at_the_mistake() {
        let e = plan("CREATE FEATURE VIEW v KEY user_id AS SELECT user_id, SUM(pricee) AS s FROM clicks GROUP BY user_id;").expect_err("typo");
        assert_eq!(e.pos.map(|p| p.line), Some(3), "{e}");
        assert!(e.to_string().contains("price"), "{e}");
        let e = plan(
            "CREATE FEATURE VIEW v KEY user_id WITH (onlin = true) AS SELECT user_id FROM clicks;",
        )
        .expect_err("option");
        assert!(e.to_string().contains("did you mean `online`"), "{e}");
        let e = plan("CREATE FEATURE VIEW v KEY user_id AS SELECT user_id, COUNT(*) AS n FROM clickz GROUP BY user_id;").expect_err("source");
        assert!(e.to_string().contains("did you mean `clicks`"), "{e}");
        let e = plan("CREATE FEATURE VIEW v KEY item_id AS SELECT user_id, COUNT(*) AS n FROM clicks GROUP BY user_id;").expect_err("key");
        assert!(e.message.contains("KEY (item_id)"), "{e}");
        let e = plan("CREATE FEATURE VIEW v KEY user_id AS SELECT user_id, COUNT(*) AS n FROM clicks GROUP BY user_id, HOP(ts, INTERVAL '7' MINUTE, INTERVAL '1' HOUR);").expect_err("hop");
        assert!(e.message.contains("multiple"), "{e}");
    }
}

#[cfg(test)]
mod env_tests {
    use super::expand_env;

    #[test]
    fn expands_environment_references() {
        assert_eq!(expand_env("a:1").as_deref(), Ok("a:1"));
        assert_eq!(
            expand_env("${SLUICE_SURELY_UNSET_VAR:-localhost:9092}").as_deref(),
            Ok("localhost:9092")
        );
        let path = std::env::var("PATH").unwrap_or_default();
        assert_eq!(expand_env("x${PATH}y"), Ok(format!("x{path}y")));
        assert!(expand_env("${SLUICE_SURELY_UNSET_VAR}").is_err());
        assert!(expand_env("${OPEN").is_err());
    }
}
