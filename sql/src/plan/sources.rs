//! `CREATE SOURCE` → [`SourcePlan`]: declared columns and their Arrow
//! types, metadata columns, the event-time column and its watermark delay,
//! and the options the engine reads. The connector's own options are the
//! connector's to check (`sluice_connectors::check_source`).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::sql::sqlparser::ast;

use super::options::{Env, MASKED, OptionPos, SOURCE_OPTIONS, check_options, is_secret_option};
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;

use super::{CheckRule, MetadataColumn, MetadataKind, SourcePlan, TIMESTAMP_TYPE};
use crate::error::PipelineError;
use crate::parser::{ColumnDef, SourceDef};

const TYPES: &str = "TEXT, VARCHAR, DOUBLE, FLOAT, REAL, BIGINT, INT, SMALLINT, BOOLEAN, TIMESTAMP, DATE, FLOAT[n] (a vector of n float32)";

/// Lowers one `CREATE SOURCE`.
pub(super) fn lower_source(
    file: &str,
    s: &SourceDef,
    base_dir: &Path,
    env: Env,
) -> Result<SourcePlan, PipelineError> {
    let (schema, metadata) = source_columns(file, s)?;
    let (event_time, watermark_delay_ms) = event_time(file, s, &schema)?;
    let (options, option_positions) = source_options(file, s, env)?;
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
        Some(v) if env.skips(v) => None,
        Some(v) => Some(crate::interval::duration_ms(v).map_err(|m| {
            PipelineError::at(
                file,
                option_positions.get("idle_timeout").map(|p| p.value),
                m,
            )
        })?),
    };
    Ok(SourcePlan {
        name: s.name.value.clone(),
        schema,
        event_time,
        watermark_delay_ms,
        connector,
        options,
        option_positions,
        file: file.to_string(),
        name_pos: s.name.pos,
        base_dir: base_dir.to_path_buf(),
        metadata,
        idle_timeout_ms,
        checks: Vec::new(),
    })
}

/// Plans each `CHECK` of `s` with DataFusion as `SELECT rule FROM source`
/// (so its functions, casts and type coercion are those of a view's query)
/// and refuses rules that are not boolean.
pub(super) fn plan_checks(
    file: &str,
    text: &str,
    s: &SourceDef,
    sp: &SourcePlan,
    ctx: &SessionContext,
) -> Result<Vec<CheckRule>, PipelineError> {
    let mut out = Vec::new();
    let mut labels = HashSet::new();
    for c in &s.checks {
        let dialect = GenericDialect {};
        let mut stmt = Parser::parse_sql(&dialect, &format!("SELECT 1 FROM \"{}\"", sp.name))
            .ok()
            .and_then(|mut v| v.pop())
            .ok_or_else(|| PipelineError::at(file, Some(c.pos), "cannot plan the rule"))?;
        if let ast::Statement::Query(q) = &mut stmt
            && let ast::SetExpr::Select(sel) = q.body.as_mut()
        {
            sel.projection = vec![ast::SelectItem::UnnamedExpr(c.expr.clone())];
        }
        let logical = super::views::plan_statement(file, text, c.pos, &sp.schema, ctx, stmt, false)
            .map_err(|e| {
                if e.help.is_some() {
                    e
                } else {
                    e.with_help(format!(
                        "a CHECK rule is a boolean expression over the columns of `{}`",
                        sp.name
                    ))
                }
            })?;
        let LogicalPlan::Projection(p) = &logical else {
            return Err(PipelineError::at(file, Some(c.pos), "cannot plan the rule"));
        };
        if !matches!(p.input.as_ref(), LogicalPlan::TableScan(_)) {
            return Err(PipelineError::at(
                file,
                Some(c.pos),
                format!(
                    "CHECK ({}) must be decided by each row alone: aggregates, window functions and subqueries cannot be rules",
                    c.text
                ),
            ));
        }
        let (Some(predicate), Some(field)) = (p.expr.first(), p.schema.fields().first()) else {
            return Err(PipelineError::at(file, Some(c.pos), "cannot plan the rule"));
        };
        if field.data_type() != &DataType::Boolean {
            return Err(PipelineError::at(
                file,
                Some(c.pos),
                format!(
                    "CHECK ({}) is of type {}, not BOOLEAN",
                    c.text,
                    field.data_type()
                ),
            )
            .with_help("a rule is a condition each row must meet, such as `price >= 0`"));
        }
        let label = c
            .name
            .as_ref()
            .map(|n| n.value.clone())
            .unwrap_or_else(|| c.text.clone());
        if !labels.insert(label.clone()) {
            return Err(PipelineError::at(
                file,
                Some(c.name.as_ref().map(|n| n.pos).unwrap_or(c.pos)),
                format!("source `{}` has the rule `{label}` twice", sp.name),
            ));
        }
        out.push(CheckRule {
            label,
            text: c.text.clone(),
            pos: c.pos,
            predicate: predicate.clone().unalias(),
            schema: Arc::clone(p.input.schema()),
        });
    }
    Ok(out)
}

/// The declared columns as an Arrow schema (`NOT NULL` columns
/// non-nullable), and which of them come from record metadata.
fn source_columns(
    file: &str,
    s: &SourceDef,
) -> Result<(SchemaRef, Vec<MetadataColumn>), PipelineError> {
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
        if let Some(kind) = metadata_kind(file, c, &dt)? {
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
    Ok((Arc::new(Schema::new(fields)), metadata))
}

/// What a `METADATA FROM '…'` column holds, checked against its type.
fn metadata_kind(
    file: &str,
    c: &ColumnDef,
    dt: &DataType,
) -> Result<Option<MetadataKind>, PipelineError> {
    let Some((m, pos)) = &c.metadata else {
        return Ok(None);
    };
    let (kind, want) = match m.to_ascii_lowercase().as_str() {
        "key" => (MetadataKind::Key, "TEXT"),
        "partition" => (MetadataKind::Partition, "INT or BIGINT"),
        "offset" => (MetadataKind::Offset, "BIGINT"),
        "timestamp" => (MetadataKind::Timestamp, "TIMESTAMP"),
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
        MetadataKind::Key => *dt == DataType::Utf8,
        MetadataKind::Partition => matches!(dt, DataType::Int32 | DataType::Int64),
        MetadataKind::Offset => *dt == DataType::Int64,
        MetadataKind::Timestamp => *dt == TIMESTAMP_TYPE,
    };
    if !ok {
        return Err(PipelineError::at(
            file,
            Some(c.type_pos),
            format!("metadata column `{}` must be {want}", c.name.value),
        ));
    }
    Ok(Some(kind))
}

/// The `WATERMARK FOR` column (a `TIMESTAMP`) and its delay.
fn event_time(
    file: &str,
    s: &SourceDef,
    schema: &SchemaRef,
) -> Result<(Option<usize>, i64), PipelineError> {
    let Some(w) = &s.watermark else {
        return Ok((None, 0));
    };
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
    Ok((Some(idx), w.delay_ms))
}

/// The options with `${ENV}` expanded, and where each was written; a key
/// given twice is refused.
type Options = (BTreeMap<String, String>, BTreeMap<String, OptionPos>);

fn source_options(file: &str, s: &SourceDef, env: Env) -> Result<Options, PipelineError> {
    check_options(file, &s.options, None, "source")?;
    let known: Vec<&str> = SOURCE_OPTIONS.to_vec();
    if !s.options.iter().any(|o| o.key.value == "connector")
        && let Some(o) = s
            .options
            .iter()
            .find(|o| crate::error::nearest(&o.key.value, known.iter().copied()).is_some())
    {
        // `conector = 'file'`: the misspelt key is the likelier mistake
        // than a missing connector.
        return Err(PipelineError::at(
            file,
            Some(o.key.pos),
            format!("unknown source option `{}`", o.key.value),
        )
        .suggest(&o.key.value, known.iter().copied()));
    }
    let mut values = BTreeMap::new();
    let mut positions = BTreeMap::new();
    for o in &s.options {
        let v = env.expand(&o.value).map_err(|m| {
            // The message quotes the value: not a secret's.
            let m = if is_secret_option(&o.key.value) {
                m.replace(o.value.as_str(), MASKED)
            } else {
                m
            };
            PipelineError::at(file, Some(o.value_pos), m)
        })?;
        values.insert(o.key.value.clone(), v);
        positions.insert(
            o.key.value.clone(),
            OptionPos {
                key: o.key.pos,
                value: o.value_pos,
            },
        );
    }
    Ok((values, positions))
}

/// The Arrow type of a declared column type, if supported.
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
