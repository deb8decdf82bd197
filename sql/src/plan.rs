//! Lowering of parsed statements into a streaming plan. DataFusion plans each
//! view's `SELECT` (its parser output, its functions, its type coercion); the
//! window call is lifted out of `GROUP BY` first and becomes the view's
//! [`WindowSpec`].
//!
//! ```text
//! parse_pipeline ─▶ Statement::Source ─▶ sources::lower_source ─▶ SourcePlan
//!                └▶ Statement::View ───▶ views::lower_view ─────▶ ViewPlan
//!                                          ├ options::ViewOptions::parse
//!                                          ├ windows::take_window
//!                                          └ DataFusion: SELECT → LogicalPlan → stages
//! explain: Display of PipelinePlan
//! ```

mod explain;
mod options;
mod sources;
mod views;
mod windows;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::{DataType, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::empty::EmptyTable;
use datafusion::common::DFSchemaRef;
use datafusion::logical_expr::Expr;
use datafusion::prelude::SessionContext;

use crate::error::{PipelineError, Pos};
use crate::parser::{Statement, parse_pipeline};

use options::Env;
pub use options::{MASKED, OptionPos, OptionReader, expand_env, is_secret_option};

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

/// The name a view's version goes by: `name` for version 1 (so state and
/// lakes of views written before versions keep theirs), `name@N` after.
pub fn versioned_name(base: &str, version: u32) -> String {
    if version == 1 {
        base.to_string()
    } else {
        format!("{base}@{version}")
    }
}

/// What differs between two definitions of a view, each given as its key
/// columns, its window (as [`WindowSpec`] displays it) and its query text:
/// the key, the window, and the first stretch of the query that differs.
pub fn view_difference(old: (&[String], &str, &str), new: (&[String], &str, &str)) -> String {
    let mut out = Vec::new();
    if old.0 != new.0 {
        out.push(format!(
            "its key was ({}) and is ({})",
            old.0.join(", "),
            new.0.join(", ")
        ));
    }
    if old.1 != new.1 {
        out.push(format!("its window was {} and is {}", old.1, new.1));
    }
    let words = |q: &str| q.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    let (a, b) = (words(old.2), words(new.2));
    if a != b {
        let pre = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        let suf = a[pre..]
            .iter()
            .rev()
            .zip(b[pre..].iter().rev())
            .take_while(|(x, y)| x == y)
            .count();
        let part = |w: &[String]| {
            let s = w.join(" ");
            if s.chars().count() > 120 {
                format!("{}…", s.chars().take(120).collect::<String>())
            } else {
                s
            }
        };
        let (was, is) = (part(&a[pre..a.len() - suf]), part(&b[pre..b.len() - suf]));
        let at = part(&a[pre.saturating_sub(3)..pre]);
        out.push(match (was.is_empty(), is.is_empty()) {
            (true, _) => format!("its query gained `{is}` after `{at}`"),
            (_, true) => format!("its query lost `{was}` after `{at}`"),
            _ => format!("its query had `{was}` where it now has `{is}`"),
        });
    }
    if out.is_empty() {
        "nothing in its key, window or query".into()
    } else {
        out.join("; ")
    }
}

/// The columns of the served-value log besides the view's own: when the
/// read's clock was, whether the key was found, the request, the wall clock.
pub const SERVED_LOG_COLUMNS: [&str; 4] = ["as_of", "found", "request_id", "served_at"];

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
    /// `connector` option: `file` or `kafka`; the connector validates the
    /// other options (`sluice_connectors::check_source`).
    pub connector: String,
    /// All `WITH` options, `${ENV}` references expanded.
    pub options: BTreeMap<String, String>,
    /// Where each option was written, for the connector's error messages.
    pub option_positions: BTreeMap<String, OptionPos>,
    /// The pipeline file, as the user named it.
    pub file: String,
    /// Where the source's name is written.
    pub name_pos: Pos,
    /// The pipeline file's folder: relative paths in options resolve against it.
    pub base_dir: PathBuf,
    /// Columns filled from record metadata instead of the payload.
    pub metadata: Vec<MetadataColumn>,
    /// A partition with no new records for this long stops holding the
    /// source's watermark back (`idle_timeout`); `None`: never.
    pub idle_timeout_ms: Option<i64>,
    /// `CHECK` rules: a row for which one is false is dead-lettered.
    pub checks: Vec<CheckRule>,
}

/// One `CHECK` rule of a source, planned by DataFusion over the source's
/// columns (types coerced), or one `expect` rule of a view, over the rows
/// it emits.
#[derive(Debug, Clone)]
pub struct CheckRule {
    /// The rule's name in metrics and dead letters: `CONSTRAINT name`, else
    /// the expression as written.
    pub label: String,
    /// The expression as written.
    pub text: String,
    /// Where it is written.
    pub pos: Pos,
    /// The boolean expression.
    pub predicate: Expr,
    /// The schema `predicate` reads (the source's declared columns).
    pub schema: DFSchemaRef,
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
    /// View name: the name as written for version 1, `name@N` for `VERSION N`.
    pub name: String,
    /// The name as written, shared by every version.
    pub base_name: String,
    /// `VERSION n`; 1 when not given.
    pub version: u32,
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
    /// How far (ms) the view's watermark may trail the wall clock before
    /// the view counts as stale (`freshness_slo`).
    pub freshness_slo_ms: Option<i64>,
    /// `expect` rules over the rows the view emits: a row failing one is
    /// counted, and kept.
    pub expectations: Vec<CheckRule>,
    /// Share of keys whose online reads are logged to the lake's
    /// `_served/{view}` folder (`log_served`), chosen by key hash.
    pub log_served: Option<f64>,
    /// Describe each day of the view's lake once it is complete, into the
    /// lake's `_stats/{view}` folder and `/metrics` (`stats = 'daily'`).
    pub stats_daily: bool,
    /// What each described day is measured against (`stats_reference`).
    pub stats_reference: Option<StatsReference>,
}

/// The rows a view's daily statistics are measured against.
#[derive(Debug, Clone, PartialEq)]
pub enum StatsReference {
    /// A range of the view's own lake, as written (`FROM..TO`, either end
    /// may be empty; times as `sluice stats --reference` takes them).
    Range {
        /// First `window_end` included, as written.
        from: String,
        /// First `window_end` excluded, as written.
        to: String,
    },
    /// A training set or another table file.
    File(std::path::PathBuf),
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
    /// The pipeline file's text (kept with the state so readers can rebuild a view's aggregates).
    pub text: String,
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

/// Checks a source's connector options as soon as the source is lowered
/// (the connectors crate owns them: `sluice_connectors::check_source`).
pub type SourceCheck<'a> = &'a dyn Fn(&SourcePlan) -> Result<(), PipelineError>;

/// Reads, parses and plans a pipeline file, each source's options checked
/// by `check`.
pub fn plan_file(path: &Path, check: SourceCheck<'_>) -> Result<PipelinePlan, PipelineError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        PipelineError::at(
            &file,
            Some(Pos { line: 1, column: 1 }),
            format!("cannot read the pipeline file: {e}"),
        )
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    plan_pipeline_checked(&file, &text, base, check)
}

/// Parses and plans pipeline text. Relative paths in options resolve
/// against `base_dir`. Connector options are not checked: see
/// [`plan_pipeline_checked`].
pub fn plan_pipeline(
    file: &str,
    text: &str,
    base_dir: &Path,
) -> Result<PipelinePlan, PipelineError> {
    plan_pipeline_checked(file, text, base_dir, &|_| Ok(()))
}

/// [`plan_pipeline`], each source's options checked by `check` right after
/// the source is lowered, so errors come in the order of the file.
pub fn plan_pipeline_checked(
    file: &str,
    text: &str,
    base_dir: &Path,
    check: SourceCheck<'_>,
) -> Result<PipelinePlan, PipelineError> {
    plan_with(file, text, base_dir, check, Env::Process)
}

/// Plans a pipeline kept with a state dir, for reading that state: option
/// values keep their `${NAME}` references as written, so a reader needs
/// none of the environment (credentials) the job ran with.
pub fn plan_stored(text: &str) -> Result<PipelinePlan, PipelineError> {
    plan_with(
        "pipeline.sql",
        text,
        Path::new("."),
        &|_| Ok(()),
        Env::Unexpanded,
    )
}

fn plan_with(
    file: &str,
    text: &str,
    base_dir: &Path,
    check: SourceCheck<'_>,
    env: Env,
) -> Result<PipelinePlan, PipelineError> {
    let statements = parse_pipeline(file, text)?;
    let mut plan = PipelinePlan {
        file: file.to_string(),
        text: text.to_string(),
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
                let mut sp = sources::lower_source(file, &s, base_dir, env)?;
                check(&sp)?;
                ctx.register_table(
                    sp.name.as_str(),
                    Arc::new(EmptyTable::new(Arc::clone(&sp.schema))),
                )
                .map_err(|e| PipelineError::at(file, Some(s.name.pos), e.to_string()))?;
                sp.checks = sources::plan_checks(file, text, &s, &sp, &ctx)?;
                plan.sources.push(sp);
            }
            Statement::View(v) => {
                let version = v.version.map_or(1, |(n, _)| n);
                let name = versioned_name(&v.name.value, version);
                if !names.insert(name.clone()) || plan.source(&v.name.value).is_some() {
                    return Err(PipelineError::at(
                        file,
                        Some(v.version.map_or(v.name.pos, |(_, p)| p)),
                        if version == 1 {
                            format!("`{}` is defined twice", v.name.value)
                        } else {
                            format!("version {version} of `{}` is defined twice", v.name.value)
                        },
                    ));
                }
                let vp = views::lower_view(file, text, &v, &plan, &ctx, base_dir, env)?;
                plan.views.push(vp);
            }
        }
    }
    if plan.views.is_empty() {
        let end = Pos {
            line: text.lines().count().max(1) as u64,
            column: 1,
        };
        return Err(PipelineError::at(
            file,
            Some(end),
            "the pipeline defines no CREATE FEATURE VIEW",
        ));
    }
    Ok(plan)
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
        assert_eq!(p.sources[0].options["path"], "c.jsonl");
        assert_eq!(p.sources[0].base_dir, Path::new("/tmp"));
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
