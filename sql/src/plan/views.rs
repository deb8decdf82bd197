//! `CREATE FEATURE VIEW` → [`ViewPlan`]: the view's options, its one
//! source, its window, DataFusion's plan of the `SELECT`, and that plan cut
//! into row-wise stages before and after the aggregate.

use std::path::Path;
use std::sync::Arc;

use arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::{DFSchemaRef, DataFusionError};
use datafusion::logical_expr::{Aggregate, Expr, LogicalPlan, Projection, cast};
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{self, SetExpr, Spanned};

use super::options::{Env, ViewOptions};
use super::windows::{WindowCall, span_pos, take_window};
use super::{AggregatePlan, PipelinePlan, SourcePlan, Stage, ViewKind, ViewPlan, WindowSpec};
use crate::error::{PipelineError, Pos};
use crate::parser::{ViewDef, normalize};

/// Lowers one `CREATE FEATURE VIEW`.
pub(super) fn lower_view(
    file: &str,
    text: &str,
    v: &ViewDef,
    plan: &PipelinePlan,
    ctx: &SessionContext,
    base_dir: &Path,
    env: Env,
) -> Result<ViewPlan, PipelineError> {
    if v.name.value.starts_with('_') {
        return Err(PipelineError::at(
            file,
            Some(v.name.pos),
            format!(
                "view `{}`: names starting with `_` are the lake's own folders (`_served`, `_stats`); rename the view",
                v.name.value
            ),
        ));
    }
    let opts = ViewOptions::parse(file, v, base_dir, env)?;
    let source = view_source(file, v, plan)?;
    let mut query = v.query.clone();
    let window = take_window(file, &mut query)?;
    check_window_time(file, source, window.as_ref())?;
    let logical = plan_select(file, text, v, source, ctx, query)?;
    let logical = signed_outputs(logical)
        .map_err(|e| PipelineError::at(file, Some(v.query_pos), e.to_string()))?;
    let parts = split_plan(file, v, &logical)?;
    let (kind, output_schema) = view_kind(file, v, source, window.as_ref(), parts.clone())?;
    check_outputs(file, v, &output_schema)?;
    let vector_index = vector_index(file, v, &opts, &output_schema)?;
    let expectations = plan_expectations(file, v, &opts, &output_schema)?;
    if let Some((_, o)) = opts.log_served {
        if opts.offline.is_none() || !opts.online {
            return Err(PipelineError::at(
                file,
                Some(o.value_pos),
                format!(
                    "log_served logs online reads into the view's lake: view `{}` needs online = true and offline = 'DIR'",
                    v.name.value
                ),
            ));
        }
        if let Some(c) = output_schema
            .fields()
            .iter()
            .find(|f| crate::SERVED_LOG_COLUMNS.contains(&f.name().as_str()))
        {
            return Err(PipelineError::at(
                file,
                Some(o.value_pos),
                format!(
                    "log_served: the served-value log has its own `{}` column; rename the view's column",
                    c.name()
                ),
            ));
        }
    }
    if let Some(o) = opts.stats
        && opts.offline.is_none()
    {
        return Err(PipelineError::at(
            file,
            Some(o.value_pos),
            format!(
                "stats = 'daily' describes the view's lake: view `{}` needs offline = 'DIR'",
                v.name.value
            ),
        ));
    }
    if let Some((_, o)) = &opts.stats_reference
        && opts.stats.is_none()
    {
        return Err(PipelineError::at(
            file,
            Some(o.key.pos),
            "stats_reference is what daily statistics are measured against: add stats = 'daily'",
        ));
    }
    let kafka_brokers = feature_topic_brokers(file, v, &opts, source)?;
    if let Some((_, o)) = opts.freshness_slo
        && source.event_time.is_none()
    {
        return Err(PipelineError::at(
            file,
            Some(o.value_pos),
            format!(
                "freshness_slo is measured on the watermark, and source `{}` has none; add WATERMARK FOR to it",
                source.name
            ),
        ));
    }
    let version = v.version.map_or(1, |(n, _)| n);
    Ok(ViewPlan {
        name: super::versioned_name(&v.name.value, version),
        base_name: v.name.value.clone(),
        version,
        source: source.name.clone(),
        keys: v.keys.iter().map(|k| k.value.clone()).collect(),
        online: opts.online,
        offline: opts.offline,
        kafka_topic: opts.kafka_topic,
        kafka_brokers,
        scan_schema: parts.scan_schema,
        stages: match kind {
            ViewKind::PerEvent => parts.post,
            ViewKind::Aggregate(_) => parts.stages,
        },
        kind,
        output_schema,
        query: v.query.to_string(),
        event_time: event_time_name(source),
        vector_index,
        freshness_slo_ms: opts.freshness_slo.map(|(ms, _)| ms),
        expectations,
        log_served: opts.log_served.map(|(f, _)| f),
        stats_daily: opts.stats.is_some(),
        stats_reference: opts.stats_reference.map(|(r, _)| r),
    })
}

/// The view's `expect` rules, planned by DataFusion over the rows it emits
/// (`window_start`, `window_end`, keys, features).
fn plan_expectations(
    file: &str,
    v: &ViewDef,
    opts: &ViewOptions<'_>,
    output: &SchemaRef,
) -> Result<Vec<super::CheckRule>, PipelineError> {
    if opts.expect.is_empty() {
        return Ok(Vec::new());
    }
    let ts = arrow::datatypes::DataType::Timestamp(
        arrow::datatypes::TimeUnit::Millisecond,
        Some("UTC".into()),
    );
    let mut fields = vec![
        arrow::datatypes::Field::new("window_start", ts.clone(), true),
        arrow::datatypes::Field::new("window_end", ts, true),
    ];
    fields.extend(output.fields().iter().map(|f| f.as_ref().clone()));
    let emitted: SchemaRef = Arc::new(arrow::datatypes::Schema::new(fields));
    let ctx = SessionContext::new();
    let table = "sluice_view_output";
    ctx.register_table(
        table,
        Arc::new(datafusion::datasource::empty::EmptyTable::new(Arc::clone(
            &emitted,
        ))),
    )
    .map_err(|e| PipelineError::at(file, Some(v.name.pos), e.to_string()))?;
    let mut out = Vec::new();
    for (label, o) in &opts.expect {
        let text = o.value.trim().to_string();
        // The rule's text where the pipeline has it, so DataFusion's spans
        // are the pipeline's lines and columns: `SELECT` on line 1, then the
        // rule at its own line and column (the value starts after the quote).
        let (line, col) = (o.value_pos.line as usize, o.value_pos.column as usize + 1);
        let sql = if line > 1 {
            format!(
                "SELECT{}{}{} FROM {table}",
                "\n".repeat(line - 1),
                " ".repeat(col.saturating_sub(1)),
                o.value
            )
        } else {
            format!("SELECT {} FROM {table}", o.value)
        };
        let dialect = datafusion::sql::sqlparser::dialect::GenericDialect {};
        let stmt =
            datafusion::sql::sqlparser::parser::Parser::parse_sql(&dialect, &sql).map_err(|e| {
                PipelineError::at(
                    file,
                    Some(o.value_pos),
                    format!("expect `{text}` is not an expression: {e}"),
                )
            })?;
        let [stmt] = <[ast::Statement; 1]>::try_from(stmt).map_err(|_| {
            PipelineError::at(
                file,
                Some(o.value_pos),
                format!("expect `{text}` must be one boolean expression"),
            )
        })?;
        let logical = plan_statement(file, &sql, o.value_pos, &emitted, &ctx, stmt, false)
            .map_err(|e| {
                if e.help.is_some() {
                    e
                } else {
                    e.with_help(format!(
                        "an expect rule is a boolean expression over the rows `{}` emits: window_start, window_end, {}",
                        v.name.value,
                        output
                            .fields()
                            .iter()
                            .map(|f| f.name().as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                }
            })?;
        let LogicalPlan::Projection(p) = &logical else {
            return Err(PipelineError::at(
                file,
                Some(o.value_pos),
                "cannot plan the rule",
            ));
        };
        if !matches!(p.input.as_ref(), LogicalPlan::TableScan(_)) {
            return Err(PipelineError::at(
                file,
                Some(o.value_pos),
                format!(
                    "expect `{text}` must be decided by each emitted row alone: aggregates, window functions and subqueries cannot be rules"
                ),
            ));
        }
        let (Some(predicate), Some(field)) = (p.expr.first(), p.schema.fields().first()) else {
            return Err(PipelineError::at(
                file,
                Some(o.value_pos),
                "cannot plan the rule",
            ));
        };
        if field.data_type() != &arrow::datatypes::DataType::Boolean {
            return Err(PipelineError::at(
                file,
                Some(o.value_pos),
                format!(
                    "expect `{text}` is of type {}, not BOOLEAN",
                    field.data_type()
                ),
            )
            .with_help(
                "a rule is a condition each emitted row should meet, such as `spend_1h >= 0`",
            ));
        }
        out.push(super::CheckRule {
            label: label.clone().unwrap_or_else(|| text.clone()),
            text,
            pos: o.value_pos,
            predicate: predicate.clone().unalias(),
            schema: Arc::clone(p.input.schema()),
        });
    }
    Ok(out)
}

fn event_time_name(source: &SourcePlan) -> Option<String> {
    source
        .event_time
        .map(|i| source.schema.field(i).name().clone())
}

/// The view's source: exactly one table in `FROM`, declared before it.
fn view_source<'p>(
    file: &str,
    v: &ViewDef,
    plan: &'p PipelinePlan,
) -> Result<&'p SourcePlan, PipelineError> {
    let at = |m: &str| PipelineError::at(file, Some(v.query_pos), m);
    match v.query.body.as_ref() {
        SetExpr::Select(s) if s.from.len() == 1 && s.from[0].joins.is_empty() => {
            match &s.from[0].relation {
                ast::TableFactor::Table { name, .. } => {
                    let n = name
                        .0
                        .last()
                        .and_then(|p| p.as_ident())
                        .map(normalize)
                        .unwrap_or_default();
                    plan.source(&n).ok_or_else(|| {
                        PipelineError::at(
                            file,
                            span_pos(name.span()).or(Some(v.query_pos)),
                            format!("`{n}` is not a source of this pipeline"),
                        )
                        .suggest(&n, plan.sources.iter().map(|s| s.name.as_str()))
                    })
                }
                _ => Err(at(
                    "a feature view reads one source directly: FROM <source>",
                )),
            }
        }
        SetExpr::Select(s) if s.from.is_empty() => Err(at("a feature view needs FROM <source>")),
        SetExpr::Select(_) => Err(at(
            "a feature view reads exactly one source; joins are not supported",
        )),
        _ => Err(at(
            "a feature view is a single SELECT (no UNION, VALUES or set operations)",
        )),
    }
}

/// A window runs on the source's event-time column, which must exist.
fn check_window_time(
    file: &str,
    source: &SourcePlan,
    window: Option<&WindowCall>,
) -> Result<(), PipelineError> {
    let Some(w) = window else { return Ok(()) };
    match event_time_name(source) {
        None => Err(PipelineError::at(
            file,
            Some(w.pos),
            format!(
                "windows need event time, but source `{}` declares no WATERMARK FOR",
                source.name
            ),
        )),
        Some(et) if et != w.time_col => Err(PipelineError::at(
            file,
            Some(w.pos),
            format!(
                "windows run on the event-time column `{et}` of `{}`, not `{}`",
                source.name, w.time_col
            ),
        )
        .with_help(format!("write the window over `{et}`"))),
        Some(_) => Ok(()),
    }
}

/// DataFusion plans the `SELECT` (window call removed); its analyzer
/// coerces types. Errors become pipeline errors with a position.
fn plan_select(
    file: &str,
    text: &str,
    v: &ViewDef,
    source: &SourcePlan,
    ctx: &SessionContext,
    query: Box<ast::Query>,
) -> Result<LogicalPlan, PipelineError> {
    plan_statement(
        file,
        text,
        v.query_pos,
        &source.schema,
        ctx,
        ast::Statement::Query(query),
        true,
    )
}

/// Unsigned integer outputs (`APPROX_DISTINCT`'s `UInt64`, say) become
/// `BIGINT`: the final projection casts them, so the online store, the lake
/// and training sets all hold signed 64-bit integers, which every Parquet
/// reader maps to a plain integer (Spark reads `UInt64` as `decimal(20,0)`).
/// A value above `i64::MAX` would become NULL; no aggregate Sluice offers
/// produces one.
fn signed_outputs(plan: LogicalPlan) -> Result<LogicalPlan, DataFusionError> {
    let LogicalPlan::Projection(p) = &plan else {
        return Ok(plan);
    };
    if !p.schema.fields().iter().any(|f| is_unsigned(f.data_type())) {
        return Ok(plan);
    }
    let exprs = p
        .expr
        .iter()
        .zip(p.schema.iter())
        .map(|(e, (q, f))| {
            if is_unsigned(f.data_type()) {
                cast(e.clone().unalias(), DataType::Int64).alias_qualified(q.cloned(), f.name())
            } else {
                e.clone()
            }
        })
        .collect();
    Projection::try_new(exprs, Arc::clone(&p.input)).map(LogicalPlan::Projection)
}

fn is_unsigned(t: &DataType) -> bool {
    matches!(
        t,
        DataType::UInt8 | DataType::UInt16 | DataType::UInt32 | DataType::UInt64
    )
}

/// DataFusion plans `statement` over a table of `columns` and its analyzer coerces
/// types. An error becomes a pipeline error at `pos`, suggesting the
/// nearest column or function (aggregate and window functions too when
/// `aggregates`).
pub(super) fn plan_statement(
    file: &str,
    text: &str,
    pos: Pos,
    columns: &SchemaRef,
    ctx: &SessionContext,
    statement: ast::Statement,
    aggregates: bool,
) -> Result<LogicalPlan, PipelineError> {
    let state = ctx.state();
    let statement = DFStatement::Statement(Box::new(statement));
    futures::executor::block_on(state.statement_to_plan(statement))
        .and_then(|p| {
            state
                .analyzer()
                .execute_and_check(p, state.config_options(), |_, _| {})
        })
        .map_err(|e| {
            let candidates: Vec<String> =
                columns.fields().iter().map(|f| f.name().clone()).collect();
            let mut functions: Vec<String> = state.scalar_functions().keys().cloned().collect();
            if aggregates {
                functions.extend(state.aggregate_functions().keys().cloned());
                functions.extend(state.window_functions().keys().cloned());
            }
            functions.sort();
            df_error(file, text, pos, e, &candidates, &functions)
        })
}

/// A logical plan cut at its aggregate: the stages before it (`stages`),
/// the aggregate, the stages after it (`post`), and the scanned schema. A
/// plan without an aggregate has all its stages in `post`.
#[derive(Clone)]
struct PlanParts {
    stages: Vec<Stage>,
    aggregate: Option<Aggregate>,
    post: Vec<Stage>,
    scan_schema: DFSchemaRef,
}

fn split_plan(file: &str, v: &ViewDef, logical: &LogicalPlan) -> Result<PlanParts, PipelineError> {
    let mut post = Vec::new();
    let mut stages = Vec::new();
    let mut aggregate: Option<&Aggregate> = None;
    let mut node = logical;
    let scan_schema = loop {
        let stage = match node {
            LogicalPlan::Projection(p) => {
                node = p.input.as_ref();
                Stage::Project {
                    exprs: p.expr.clone(),
                    input: Arc::clone(p.input.schema()),
                    output: Arc::clone(&p.schema),
                }
            }
            LogicalPlan::Filter(f) => {
                node = f.input.as_ref();
                Stage::Filter {
                    predicate: f.predicate.clone(),
                    schema: Arc::clone(f.input.schema()),
                }
            }
            LogicalPlan::SubqueryAlias(s) => {
                node = s.input.as_ref();
                continue;
            }
            LogicalPlan::Aggregate(a) if aggregate.is_none() => {
                aggregate = Some(a);
                node = a.input.as_ref();
                continue;
            }
            LogicalPlan::TableScan(t) => break Arc::clone(&t.projected_schema),
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
        };
        if aggregate.is_none() {
            post.push(stage)
        } else {
            stages.push(stage)
        }
    };
    post.reverse();
    stages.reverse();
    Ok(PlanParts {
        stages,
        aggregate: aggregate.cloned(),
        post,
        scan_schema,
    })
}

/// Per-event (no aggregate) or aggregate view, and its output schema. The
/// `GROUP BY` of an aggregate view must be exactly the `KEY` columns.
fn view_kind(
    file: &str,
    v: &ViewDef,
    source: &SourcePlan,
    window: Option<&WindowCall>,
    parts: PlanParts,
) -> Result<(ViewKind, SchemaRef), PipelineError> {
    let Some(a) = parts.aggregate else {
        if let Some(w) = window {
            return Err(PipelineError::at(
                file,
                Some(w.pos),
                "a window needs aggregates and the key in GROUP BY",
            ));
        }
        let out = parts
            .post
            .last()
            .map(stage_output)
            .unwrap_or_else(|| Arc::clone(&parts.scan_schema));
        return Ok((ViewKind::PerEvent, Arc::new(out.as_arrow().clone())));
    };
    let mut group_names = Vec::new();
    for g in &a.group_expr {
        match g {
            Expr::Column(c) => group_names.push(c.name.clone()),
            other => {
                return Err(PipelineError::at(
                    file,
                    Some(v.query_pos),
                    format!("GROUP BY takes the key columns and one window; `{other}` is neither"),
                ));
            }
        }
    }
    let keys: Vec<String> = v.keys.iter().map(|k| k.value.clone()).collect();
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
    let out = parts
        .post
        .last()
        .map(stage_output)
        .unwrap_or_else(|| Arc::clone(&a.schema));
    let event_time = event_time_name(source);
    let aggr_exprs = a
        .aggr_expr
        .iter()
        .map(|e| order_by_event_time(e, event_time.as_deref(), a.input.schema()))
        .collect();
    let agg = AggregatePlan {
        window: window.map(|w| w.spec).unwrap_or(WindowSpec::Lifetime),
        group_exprs: a.group_expr.clone(),
        aggr_exprs,
        input_schema: Arc::clone(a.input.schema()),
        output_schema: Arc::clone(&a.schema),
        post: parts.post,
    };
    Ok((ViewKind::Aggregate(agg), Arc::new(out.as_arrow().clone())))
}

/// The output holds every key column and no reserved name.
fn check_outputs(file: &str, v: &ViewDef, output: &SchemaRef) -> Result<(), PipelineError> {
    for k in &v.keys {
        if output.index_of(&k.value).is_err() {
            return Err(PipelineError::at(
                file,
                Some(k.pos),
                format!("the SELECT must output the key column `{}`", k.value),
            )
            .suggest(&k.value, output.fields().iter().map(|f| f.name().as_str())));
        }
    }
    if let Some(f) = output
        .fields()
        .iter()
        .find(|f| matches!(f.name().as_str(), "window_start" | "window_end"))
    {
        return Err(PipelineError::at(
            file,
            Some(v.query_pos),
            format!("`{}` is a reserved output column", f.name()),
        ));
    }
    Ok(())
}

/// The nearest-neighbour index of `vector_index`, checked against the output.
fn vector_index(
    file: &str,
    v: &ViewDef,
    opts: &ViewOptions<'_>,
    output: &SchemaRef,
) -> Result<Option<crate::vector::VectorIndexPlan>, PipelineError> {
    let Some(o) = opts.index_column else {
        let stray = opts.distance.or_else(|| {
            v.options.iter().find(|o| {
                matches!(
                    o.key.value.as_str(),
                    "index_trees" | "search_k" | "index_filter_columns"
                )
            })
        });
        if let Some(o) = stray {
            return Err(PipelineError::at(
                file,
                Some(o.key.pos),
                format!("`{}` needs vector_index = 'column'", o.key.value),
            ));
        }
        return Ok(None);
    };
    let col = o.value.trim();
    let Ok(field) = output.field_with_name(col) else {
        return Err(PipelineError::at(
            file,
            Some(o.value_pos),
            format!("vector_index: the view has no output column `{col}`"),
        )
        .suggest(col, output.fields().iter().map(|f| f.name().as_str())));
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
    if !opts.online {
        return Err(PipelineError::at(
            file,
            Some(o.key.pos),
            "vector_index indexes the online store's current values; it needs online = true",
        ));
    }
    let distance = match opts.distance {
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
    let mut filter_columns = Vec::new();
    if let Some(o) = opts.filter_columns {
        for name in o.value.split(',').map(str::trim) {
            let Ok(f) = output.field_with_name(name) else {
                return Err(PipelineError::at(
                    file,
                    Some(o.value_pos),
                    format!("index_filter_columns: the view has no output column `{name}`"),
                )
                .suggest(name, output.fields().iter().map(|f| f.name().as_str())));
            };
            let Some(kind) = crate::vector::FilterKind::of(f.data_type()) else {
                return Err(PipelineError::at(
                    file,
                    Some(o.value_pos),
                    format!(
                        "index_filter_columns: `{name}` is {}; a filter column is text, an integer or a boolean",
                        f.data_type()
                    ),
                ));
            };
            if name == col
                || filter_columns
                    .iter()
                    .any(|c: &crate::vector::FilterColumn| c.name == name)
            {
                return Err(PipelineError::at(
                    file,
                    Some(o.value_pos),
                    format!("index_filter_columns: `{name}` is the indexed vector or given twice"),
                ));
            }
            filter_columns.push(crate::vector::FilterColumn {
                name: name.to_string(),
                kind,
            });
        }
    }
    Ok(Some(crate::vector::VectorIndexPlan {
        column: col.to_string(),
        dims,
        distance,
        trees: opts.index_trees,
        search_k: opts.search_k,
        filter_columns,
    }))
}

/// Brokers of the view's `kafka_topic`: `kafka_brokers`, else its Kafka
/// source's.
fn feature_topic_brokers(
    file: &str,
    v: &ViewDef,
    opts: &ViewOptions<'_>,
    source: &SourcePlan,
) -> Result<Option<String>, PipelineError> {
    if opts.kafka_topic.is_none() || opts.kafka_brokers.is_some() {
        return Ok(opts.kafka_brokers.clone());
    }
    if source.connector == "kafka" {
        return Ok(source.options.get("brokers").cloned());
    }
    Err(PipelineError::at(
        file,
        Some(v.name.pos),
        format!(
            "view `{}` sets kafka_topic but its source is not Kafka; add kafka_brokers = 'host:port'",
            v.name.value
        ),
    ))
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

pub(super) fn df_error(
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
