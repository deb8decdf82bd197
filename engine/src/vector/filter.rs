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
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::parser::Parser;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
use roaring::RoaringBitmap;
use sluice_sql::vector::{FilterColumn, FilterKind};

use super::snapshot::{Attr, Snapshot};
use crate::error::{EngineError, Result};

/// Limits on a filter's size, checked before it is parsed (its length)
/// and after (its nodes): a request cannot make the server parse, hold or
/// evaluate an unbounded expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterLimits {
    /// Bytes of the filter's text.
    pub max_bytes: usize,
    /// Nodes of the lowered filter (comparisons, `IN`, `IS NULL`, `AND`,
    /// `OR`, `NOT`; a `BETWEEN` counts three).
    pub max_nodes: usize,
}

/// The most nodes a filter may be given, whatever the limits say: the
/// parser's tree of a longer chain would be as deep as the chain.
pub const MAX_FILTER_NODES: usize = 4096;

impl Default for FilterLimits {
    fn default() -> Self {
        FilterLimits {
            max_bytes: 16 << 10,
            max_nodes: 1000,
        }
    }
}

/// A parsed filter, checked against the index's filter columns: a postfix
/// program over the bitmaps, evaluated with an explicit stack (no
/// recursion, however deep the expression).
#[derive(Debug, Clone)]
pub struct Filter {
    text: String,
    program: Vec<Op>,
}

#[derive(Debug, Clone)]
enum Op {
    /// Pops two, pushes their conjunction.
    And,
    /// Pops two, pushes their disjunction.
    Or,
    /// Pops one, pushes its negation.
    Not,
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

/// The start of a filter's text, for messages about filters too long to quote.
fn preview(text: &str) -> String {
    let mut end = text.len().min(60);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    if end < text.len() {
        format!("{}…", &text[..end])
    } else {
        text.to_string()
    }
}

impl Filter {
    /// Parses `text` against `columns` (the index's filter columns), with
    /// the default [`FilterLimits`].
    pub fn parse(text: &str, columns: &[FilterColumn]) -> Result<Filter> {
        Filter::parse_limited(text, columns, FilterLimits::default())
    }

    /// Parses `text` against `columns` within `limits`.
    pub fn parse_limited(
        text: &str,
        columns: &[FilterColumn],
        limits: FilterLimits,
    ) -> Result<Filter> {
        if columns.is_empty() {
            return Err(bad(
                "this index has no filter columns: declare them with index_filter_columns = 'col, …' on the view",
            ));
        }
        if text.len() > limits.max_bytes {
            return Err(bad(format!(
                "filter `{}` is {} bytes; the server takes at most {} (--max-filter-bytes)",
                preview(text),
                text.len(),
                limits.max_bytes
            )));
        }
        // The parser's tree is as deep as the chain of operators: a text
        // with more operators than the node limit is refused before it is
        // parsed (and before a deep tree would have to be dropped).
        let tokens = Tokenizer::new(&GenericDialect {}, text)
            .tokenize()
            .map_err(|e| bad(format!("filter `{}`: {e}", preview(text))))?;
        let max_nodes = limits.max_nodes.min(MAX_FILTER_NODES);
        // Only what a filter can be made of: names, constants, comparisons
        // and parentheses (no arithmetic, casts or paths, whose chains the
        // parser would nest as deep as they are long). Every keyword
        // counts as an operator (AND, OR, NOT, IS, IN, BETWEEN, and any
        // other a chain could be made of), as do comparisons and `(`.
        let words: Vec<&Token> = tokens
            .iter()
            .filter(|t| !matches!(t, Token::Whitespace(_)))
            .collect();
        let mut operators = 0usize;
        for (i, t) in words.iter().enumerate() {
            let ok = match t {
                Token::Word(w) => {
                    if w.keyword != Keyword::NoKeyword && w.quote_style.is_none() {
                        operators += 1;
                    }
                    true
                }
                Token::Eq
                | Token::DoubleEq
                | Token::Neq
                | Token::Lt
                | Token::Gt
                | Token::LtEq
                | Token::GtEq
                | Token::LParen => {
                    operators += 1;
                    true
                }
                Token::Number(..)
                | Token::SingleQuotedString(_)
                | Token::RParen
                | Token::Comma
                | Token::EOF => true,
                // A sign, directly before a number.
                Token::Minus => matches!(words.get(i + 1), Some(Token::Number(..))),
                _ => false,
            };
            if !ok {
                return Err(bad(format!(
                    "filter `{}`: `{t}` has no place in a filter (use =, <>, <, <=, >, >=, IN, BETWEEN, IS NULL, AND, OR, NOT over the filter columns and constants)",
                    preview(text)
                )));
            }
        }
        if operators > max_nodes {
            return Err(bad(format!(
                "filter `{}` has {operators} operators; the server takes filters of at most {max_nodes} nodes (--max-filter-nodes)",
                preview(text),
            )));
        }
        let expr = Parser::new(&GenericDialect {})
            .with_tokens(tokens)
            .parse_expr()
            .map_err(|e| bad(format!("filter `{}`: {e}", preview(text))))?;
        let program = lower(&expr, columns, text, max_nodes)?;
        Ok(Filter {
            text: text.to_string(),
            program,
        })
    }

    /// The filter as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Nodes of the lowered filter.
    pub fn nodes(&self) -> usize {
        self.program.len()
    }

    /// The ids of `snap` the filter is true for.
    pub fn eval(&self, snap: &Snapshot) -> RoaringBitmap {
        eval(&self.program, snap).0
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
        return Err(bad(format!("filter: compare `{}` with a constant", c.name)));
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

/// What the lowering does next: look at an expression, or emit an
/// operator whose operands are already emitted.
enum Task<'a> {
    Visit(&'a Expr),
    Emit(Op),
}

/// Lowers `e` into a postfix program with an explicit work list (no
/// recursion), refusing programs of more than `max_nodes` operators.
fn lower(e: &Expr, columns: &[FilterColumn], text: &str, max_nodes: usize) -> Result<Vec<Op>> {
    let text = &preview(text);
    let mut out = Vec::new();
    let mut work = vec![Task::Visit(e)];
    while let Some(task) = work.pop() {
        let e = match task {
            Task::Emit(op) => {
                out.push(op);
                if out.len() > max_nodes {
                    return Err(bad(format!(
                        "filter `{text}` has more than {max_nodes} nodes (--max-filter-nodes)"
                    )));
                }
                continue;
            }
            Task::Visit(e) => e,
        };
        match e {
            Expr::Nested(inner) => work.push(Task::Visit(inner)),
            Expr::UnaryOp {
                op: UnaryOperator::Not,
                expr,
            } => {
                work.push(Task::Emit(Op::Not));
                work.push(Task::Visit(expr));
            }
            Expr::BinaryOp { left, op, right } => {
                let cmp = match op {
                    BinaryOperator::And | BinaryOperator::Or => {
                        work.push(Task::Emit(if *op == BinaryOperator::And {
                            Op::And
                        } else {
                            Op::Or
                        }));
                        work.push(Task::Visit(right));
                        work.push(Task::Visit(left));
                        continue;
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
                            "filter `{text}`: a comparison must be between one filter column and a constant"
                        )));
                    }
                };
                work.push(Task::Emit(Op::Cmp(c, cmp, literal(lit, &columns[c])?)));
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
                work.push(Task::Emit(Op::In(c, vals, *negated)));
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
                // Emitted in reverse: low bound, high bound, AND, [NOT].
                if *negated {
                    work.push(Task::Emit(Op::Not));
                }
                work.push(Task::Emit(Op::And));
                work.push(Task::Emit(Op::Cmp(
                    c,
                    Cmp::LtEq,
                    literal(high, &columns[c])?,
                )));
                work.push(Task::Emit(Op::Cmp(
                    c,
                    Cmp::GtEq,
                    literal(low, &columns[c])?,
                )));
            }
            Expr::IsNull(inner) | Expr::IsNotNull(inner) => {
                let Some(c) = column(inner, columns) else {
                    return Err(bad(format!(
                        "filter `{text}`: IS NULL needs a filter column"
                    )));
                };
                work.push(Task::Emit(Op::IsNull(c?, matches!(e, Expr::IsNotNull(_)))));
            }
            Expr::Identifier(_) | Expr::CompoundIdentifier(_) => {
                let c = column(e, columns).unwrap_or_else(|| Err(bad("filter: column")))?;
                if columns[c].kind != FilterKind::Boolean {
                    return Err(bad(format!(
                        "filter `{text}`: `{}` is not boolean; compare it with a constant",
                        columns[c].name
                    )));
                }
                work.push(Task::Emit(Op::Cmp(c, Cmp::Eq, Attr::Bool(true))));
            }
            _ => {
                return Err(bad(format!(
                    "filter `{text}`: this expression is not supported (use =, <>, <, <=, >, >=, IN, BETWEEN, IS NULL, AND, OR, NOT over the filter columns)"
                )));
            }
        }
    }
    Ok(out)
}

/// The ids where the program is true and where it is false, evaluated
/// on a stack of (true, false) pairs.
fn eval(program: &[Op], snap: &Snapshot) -> (RoaringBitmap, RoaringBitmap) {
    let mut stack: Vec<(RoaringBitmap, RoaringBitmap)> = Vec::new();
    for op in program {
        let v = match op {
            Op::And | Op::Or => {
                let (tb, fb) = stack.pop().unwrap_or_default();
                let (ta, fa) = stack.pop().unwrap_or_default();
                if matches!(op, Op::And) {
                    (ta & tb, fa | fb)
                } else {
                    (ta | tb, fa & fb)
                }
            }
            Op::Not => {
                let (t, f) = stack.pop().unwrap_or_default();
                (f, t)
            }
            Op::IsNull(c, negated) => {
                let nulls = snap.facet_value(*c, &Attr::Null);
                let rest = snap.live() - &nulls;
                if *negated {
                    (rest, nulls)
                } else {
                    (nulls, rest)
                }
            }
            Op::In(c, vals, negated) => {
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
            Op::Cmp(c, cmp, v) => {
                if *v == Attr::Null {
                    (RoaringBitmap::new(), RoaringBitmap::new())
                } else {
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
        };
        stack.push(v);
    }
    stack.pop().unwrap_or_default()
}
