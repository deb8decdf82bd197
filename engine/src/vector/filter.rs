//! Filters of nearest-neighbour queries: a SQL boolean expression over the
//! index's filter columns (`index_filter_columns`), evaluated over the
//! bitmaps of their values into the set of item ids a query may return.
//!
//! NULL follows SQL: a comparison with a NULL value is unknown, `NOT` of
//! unknown is unknown, and only rows where the whole filter is true pass.
//! Each sub-expression therefore yields two sets, the ids where it is true
//! and the ids where it is false; the rest are unknown.

use datafusion::sql::sqlparser::ast::{BinaryOperator, Expr, UnaryOperator, Value};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;
use roaring::RoaringBitmap;
use sluice_sql::vector::{FilterColumn, FilterKind};

use super::snapshot::{Attr, Snapshot};
use crate::error::{EngineError, Result};

/// A parsed filter, checked against the index's filter columns.
#[derive(Debug, Clone)]
pub struct Filter {
    text: String,
    expr: Node,
}

#[derive(Debug, Clone)]
enum Node {
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
    Not(Box<Node>),
    /// `col op value`.
    Cmp(usize, Cmp, Attr),
    /// `col [NOT] IN (…)`.
    In(usize, Vec<Attr>, bool),
    /// `col IS [NOT] NULL`.
    IsNull(usize, bool),
}

#[derive(Debug, Clone, Copy)]
enum Cmp {
    Eq,
    NotEq,
    Lt,
    LtEq,
    Gt,
    GtEq,
}

impl Cmp {
    fn flip(self) -> Cmp {
        match self {
            Cmp::Lt => Cmp::Gt,
            Cmp::LtEq => Cmp::GtEq,
            Cmp::Gt => Cmp::Lt,
            Cmp::GtEq => Cmp::LtEq,
            c => c,
        }
    }
}

fn bad(m: impl Into<String>) -> EngineError {
    EngineError::BadRequest(m.into())
}

impl Filter {
    /// Parses `text` against `columns` (the index's filter columns).
    pub fn parse(text: &str, columns: &[FilterColumn]) -> Result<Filter> {
        if columns.is_empty() {
            return Err(bad(
                "this index has no filter columns: declare them with index_filter_columns = 'col, …' on the view",
            ));
        }
        let expr = Parser::new(&GenericDialect {})
            .try_with_sql(text)
            .and_then(|mut p| p.parse_expr())
            .map_err(|e| bad(format!("filter `{text}`: {e}")))?;
        let expr = lower(&expr, columns, text)?;
        Ok(Filter {
            text: text.to_string(),
            expr,
        })
    }

    /// The filter as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The ids of `snap` the filter is true for.
    pub fn eval(&self, snap: &Snapshot) -> RoaringBitmap {
        eval(&self.expr, snap).0
    }
}

fn column_names(columns: &[FilterColumn]) -> String {
    columns
        .iter()
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn column(e: &Expr, columns: &[FilterColumn]) -> Option<Result<usize>> {
    let name = match e {
        Expr::Identifier(i) => i.value.clone(),
        Expr::CompoundIdentifier(parts) if parts.len() == 1 => parts[0].value.clone(),
        _ => return None,
    };
    Some(
        columns
            .iter()
            .position(|c| c.name.eq_ignore_ascii_case(&name))
            .ok_or_else(|| {
                bad(format!(
                    "filter: `{name}` is not a filter column of this index (filter columns: {})",
                    column_names(columns)
                ))
            }),
    )
}

/// A literal as a value of column `c`'s kind.
fn literal(e: &Expr, c: &FilterColumn) -> Result<Attr> {
    let (neg, e) = match e {
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => (true, expr.as_ref()),
        e => (false, e),
    };
    let Expr::Value(v) = e else {
        return Err(bad(format!(
            "filter: `{e}` is not a literal; compare `{}` with a constant",
            c.name
        )));
    };
    let v = &v.value;
    match (c.kind, v) {
        (_, Value::Null) => Ok(Attr::Null),
        (FilterKind::Integer, Value::Number(n, _)) => {
            let n: i64 = n.parse().map_err(|_| {
                bad(format!(
                    "filter: `{}` is an integer column; `{n}` is not an integer",
                    c.name
                ))
            })?;
            Ok(Attr::Int(if neg { -n } else { n }))
        }
        (FilterKind::Text, Value::SingleQuotedString(s) | Value::DoubleQuotedString(s)) if !neg => {
            Ok(Attr::Text(s.clone()))
        }
        (FilterKind::Boolean, Value::Boolean(b)) if !neg => Ok(Attr::Bool(*b)),
        (k, v) => Err(bad(format!(
            "filter: `{}` is {} and cannot be compared with `{v}`",
            c.name,
            match k {
                FilterKind::Integer => "an integer column",
                FilterKind::Text => "a text column ('quoted' strings)",
                FilterKind::Boolean => "a boolean column (true, false)",
            }
        ))),
    }
}

fn lower(e: &Expr, columns: &[FilterColumn], text: &str) -> Result<Node> {
    let rec = |e: &Expr| lower(e, columns, text);
    match e {
        Expr::Nested(e) => rec(e),
        Expr::UnaryOp {
            op: UnaryOperator::Not,
            expr,
        } => Ok(Node::Not(Box::new(rec(expr)?))),
        Expr::BinaryOp { left, op, right } => {
            let cmp = match op {
                BinaryOperator::And => {
                    return Ok(Node::And(Box::new(rec(left)?), Box::new(rec(right)?)));
                }
                BinaryOperator::Or => {
                    return Ok(Node::Or(Box::new(rec(left)?), Box::new(rec(right)?)));
                }
                BinaryOperator::Eq => Cmp::Eq,
                BinaryOperator::NotEq => Cmp::NotEq,
                BinaryOperator::Lt => Cmp::Lt,
                BinaryOperator::LtEq => Cmp::LtEq,
                BinaryOperator::Gt => Cmp::Gt,
                BinaryOperator::GtEq => Cmp::GtEq,
                other => {
                    return Err(bad(format!(
                        "filter `{text}`: operator `{other}` is not supported (use =, <>, <, <=, >, >=, IN, BETWEEN, IS NULL, AND, OR, NOT)"
                    )));
                }
            };
            let (c, lit, cmp) = match (column(left, columns), column(right, columns)) {
                (Some(c), None) => (c?, right, cmp),
                (None, Some(c)) => (c?, left, cmp.flip()),
                _ => {
                    return Err(bad(format!(
                        "filter `{text}`: `{e}` must compare one filter column with a constant"
                    )));
                }
            };
            Ok(Node::Cmp(c, cmp, literal(lit, &columns[c])?))
        }
        Expr::InList {
            expr,
            list,
            negated,
        } => {
            let Some(c) = column(expr, columns) else {
                return Err(bad(format!(
                    "filter `{text}`: IN needs a filter column on its left"
                )));
            };
            let c = c?;
            let vals = list
                .iter()
                .map(|v| literal(v, &columns[c]))
                .collect::<Result<Vec<_>>>()?;
            Ok(Node::In(c, vals, *negated))
        }
        Expr::Between {
            expr,
            negated,
            low,
            high,
        } => {
            let Some(c) = column(expr, columns) else {
                return Err(bad(format!(
                    "filter `{text}`: BETWEEN needs a filter column on its left"
                )));
            };
            let c = c?;
            let range = Node::And(
                Box::new(Node::Cmp(c, Cmp::GtEq, literal(low, &columns[c])?)),
                Box::new(Node::Cmp(c, Cmp::LtEq, literal(high, &columns[c])?)),
            );
            Ok(if *negated {
                Node::Not(Box::new(range))
            } else {
                range
            })
        }
        Expr::IsNull(inner) | Expr::IsNotNull(inner) => {
            let Some(c) = column(inner, columns) else {
                return Err(bad(format!(
                    "filter `{text}`: IS NULL needs a filter column"
                )));
            };
            Ok(Node::IsNull(c?, matches!(e, Expr::IsNotNull(_))))
        }
        Expr::Identifier(_) | Expr::CompoundIdentifier(_) => {
            let c = column(e, columns).unwrap_or_else(|| Err(bad("filter: column")))?;
            if columns[c].kind != FilterKind::Boolean {
                return Err(bad(format!(
                    "filter `{text}`: `{}` is not boolean; compare it with a constant",
                    columns[c].name
                )));
            }
            Ok(Node::Cmp(c, Cmp::Eq, Attr::Bool(true)))
        }
        other => Err(bad(format!(
            "filter `{text}`: `{other}` is not supported (use =, <>, <, <=, >, >=, IN, BETWEEN, IS NULL, AND, OR, NOT over the filter columns)"
        ))),
    }
}

/// The ids where `n` is true and where it is false.
fn eval(n: &Node, snap: &Snapshot) -> (RoaringBitmap, RoaringBitmap) {
    match n {
        Node::And(a, b) => {
            let (ta, fa) = eval(a, snap);
            let (tb, fb) = eval(b, snap);
            (ta & tb, fa | fb)
        }
        Node::Or(a, b) => {
            let (ta, fa) = eval(a, snap);
            let (tb, fb) = eval(b, snap);
            (ta | tb, fa & fb)
        }
        Node::Not(a) => {
            let (t, f) = eval(a, snap);
            (f, t)
        }
        Node::IsNull(c, negated) => {
            let nulls = snap.facet_value(*c, &Attr::Null);
            let rest = snap.live() - &nulls;
            if *negated {
                (rest, nulls)
            } else {
                (nulls, rest)
            }
        }
        Node::In(c, vals, negated) => {
            let nulls = snap.facet_value(*c, &Attr::Null);
            let mut t = RoaringBitmap::new();
            for v in vals.iter().filter(|v| **v != Attr::Null) {
                t |= snap.facet_value(*c, v);
            }
            // `x IN (…, NULL)` is unknown where it is not true.
            let unknown = if vals.contains(&Attr::Null) {
                snap.live() - &t
            } else {
                nulls
            };
            let f = snap.live() - &t - &unknown;
            if *negated { (f, t) } else { (t, f) }
        }
        Node::Cmp(c, cmp, v) => {
            if *v == Attr::Null {
                return (RoaringBitmap::new(), RoaringBitmap::new());
            }
            let nulls = snap.facet_value(*c, &Attr::Null);
            let t = match cmp {
                Cmp::Eq => snap.facet_value(*c, v),
                Cmp::NotEq => snap.live() - &nulls - &snap.facet_value(*c, v),
                Cmp::Lt => snap.facet_range(*c, v, std::cmp::Ordering::Less, false),
                Cmp::LtEq => snap.facet_range(*c, v, std::cmp::Ordering::Less, true),
                Cmp::Gt => snap.facet_range(*c, v, std::cmp::Ordering::Greater, false),
                Cmp::GtEq => snap.facet_range(*c, v, std::cmp::Ordering::Greater, true),
            };
            let f = snap.live() - &nulls - &t;
            (t, f)
        }
    }
}
