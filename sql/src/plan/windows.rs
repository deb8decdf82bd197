//! The window call of a view's `GROUP BY` (`TUMBLE`, `HOP`), lifted out of
//! the query before DataFusion plans it.

use datafusion::sql::sqlparser::ast::{
    self, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr, SetExpr, Spanned,
};

use super::{WindowSpec, fmt_ms};
use crate::error::{PipelineError, Pos};
use crate::interval::interval_ms;
use crate::parser::normalize;

/// The window call found in `GROUP BY`, with its position.
pub(super) struct WindowCall {
    pub(super) spec: WindowSpec,
    pub(super) time_col: String,
    pub(super) pos: Pos,
}

pub(super) fn span_pos(span: datafusion::sql::sqlparser::tokenizer::Span) -> Option<Pos> {
    (span.start.line > 0).then(|| span.start.into())
}

/// Removes the window call from the query's `GROUP BY` and returns it; a
/// query without one is a lifetime or per-event view.
pub(super) fn take_window(
    file: &str,
    query: &mut ast::Query,
) -> Result<Option<WindowCall>, PipelineError> {
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
        let name = f.name.to_string().to_ascii_lowercase();
        if !matches!(name.as_str(), "tumble" | "hop" | "session") {
            keep.push(e);
            continue;
        }
        let pos = span_pos(e.span());
        if found.is_some() {
            return Err(PipelineError::at(
                file,
                pos,
                "a feature view has at most one window in GROUP BY",
            ));
        }
        found = Some(window_call(file, &name, f, pos)?);
    }
    *exprs = keep;
    Ok(found)
}

/// One `TUMBLE(ts, size)` or `HOP(ts, slide, size)` call, checked.
fn window_call(
    file: &str,
    name: &str,
    f: &ast::Function,
    pos: Option<Pos>,
) -> Result<WindowCall, PipelineError> {
    if name == "session" {
        return Err(PipelineError::at(
            file,
            pos,
            "SESSION windows are not supported yet; use TUMBLE or HOP",
        ));
    }
    let args = window_args(file, name, f, pos)?;
    let time_col = event_time_arg(file, name, &args[0], pos)?;
    let spec = window_spec(file, name, &args[1..], pos)?;
    Ok(WindowCall {
        spec,
        time_col,
        pos: pos.unwrap_or_default(),
    })
}

/// The call's arguments: plain expressions, as many as the window takes.
fn window_args(
    file: &str,
    name: &str,
    f: &ast::Function,
    pos: Option<Pos>,
) -> Result<Vec<ast::Expr>, PipelineError> {
    let upper = name.to_uppercase();
    let FunctionArguments::List(list) = &f.args else {
        return Err(PipelineError::at(
            file,
            pos,
            format!("{upper} needs arguments"),
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
    let (want, usage) = if name == "tumble" {
        (2, "TUMBLE(ts, INTERVAL '5' MINUTE)")
    } else {
        (3, "HOP(ts, INTERVAL '5' MINUTE, INTERVAL '1' HOUR)")
    };
    if args.len() != want {
        return Err(PipelineError::at(
            file,
            pos,
            format!("{upper} takes {want} arguments: {usage}"),
        ));
    }
    Ok(args)
}

/// The first argument: the event-time column.
fn event_time_arg(
    file: &str,
    name: &str,
    arg: &ast::Expr,
    pos: Option<Pos>,
) -> Result<String, PipelineError> {
    match arg {
        ast::Expr::Identifier(i) => Ok(normalize(i)),
        ast::Expr::CompoundIdentifier(parts) => Ok(parts.last().map(normalize).unwrap_or_default()),
        other => Err(PipelineError::at(
            file,
            span_pos(other.span()).or(pos),
            format!(
                "the first argument of {} must be the event-time column",
                name.to_uppercase()
            ),
        )),
    }
}

/// The window from its interval arguments: `[size]` for `TUMBLE`,
/// `[slide, size]` for `HOP` (a `HOP` whose size is its slide is a `TUMBLE`).
fn window_spec(
    file: &str,
    name: &str,
    intervals: &[ast::Expr],
    pos: Option<Pos>,
) -> Result<WindowSpec, PipelineError> {
    let ms = |x: &ast::Expr| {
        interval_ms(x).map_err(|m| PipelineError::at(file, span_pos(x.span()).or(pos), m))
    };
    if name == "tumble" {
        let size_ms = ms(&intervals[0])?;
        if size_ms <= 0 {
            return Err(PipelineError::at(
                file,
                pos,
                "the window size must be positive",
            ));
        }
        return Ok(WindowSpec::Tumble { size_ms });
    }
    let slide_ms = ms(&intervals[0])?;
    let size_ms = ms(&intervals[1])?;
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
            span_pos(intervals[1].span()).or(pos),
            format!(
                "HOP size ({}) must be a whole multiple of its slide ({})",
                fmt_ms(size_ms),
                fmt_ms(slide_ms)
            ),
        ));
    }
    Ok(if size_ms == slide_ms {
        WindowSpec::Tumble { size_ms }
    } else {
        WindowSpec::Hop { slide_ms, size_ms }
    })
}
