//! Parsing of pipeline files: `CREATE SOURCE` and `CREATE FEATURE VIEW`
//! statements. Headers are parsed here over sqlparser's tokens (so every
//! name keeps its position); the `SELECT` of a view is sqlparser's own AST.

use datafusion::sql::sqlparser::ast::{DataType, Expr, Ident, Query};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::{Parser, ParserError};
use datafusion::sql::sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer};

use crate::error::{PipelineError, Pos};
use crate::interval::interval_ms;

/// A name with the place it was written.
#[derive(Debug, Clone)]
pub struct Name {
    /// The normalized name (unquoted identifiers are lower-cased, as DataFusion does).
    pub value: String,
    /// Where it was written.
    pub pos: Pos,
}

/// One column of a `CREATE SOURCE`.
#[derive(Debug, Clone)]
pub struct ColumnDef {
    /// Column name.
    pub name: Name,
    /// Declared SQL type.
    pub data_type: DataType,
    /// Where the type was written.
    pub type_pos: Pos,
    /// `NOT NULL` was given.
    pub not_null: bool,
    /// `METADATA [FROM 'name']`: the column is filled from the record's
    /// metadata (Kafka key, partition, offset, timestamp), not its payload.
    pub metadata: Option<(String, Pos)>,
}

/// `WATERMARK FOR col AS col - INTERVAL …`.
#[derive(Debug, Clone)]
pub struct WatermarkDef {
    /// The event-time column.
    pub column: Name,
    /// How far the watermark trails the largest event time seen, in milliseconds.
    pub delay_ms: i64,
}

/// One `key = 'value'` of a `WITH (…)` list.
#[derive(Debug, Clone)]
pub struct OptionDef {
    /// Option name, lower-cased (dotted names such as `kafka.acks` are kept whole).
    pub key: Name,
    /// Option value as written (quotes removed).
    pub value: String,
    /// Where the value was written.
    pub value_pos: Pos,
}

/// A `CHECK (…)` rule of a `CREATE SOURCE`: written after a column or as an
/// entry of its own (`[CONSTRAINT name] CHECK (…)`), over the whole row.
#[derive(Debug, Clone)]
pub struct CheckDef {
    /// `CONSTRAINT name`, if given.
    pub name: Option<Name>,
    /// The boolean expression, as sqlparser parsed it (positions kept).
    pub expr: Expr,
    /// The expression as written, whitespace runs folded to one space.
    pub text: String,
    /// Where the expression starts.
    pub pos: Pos,
}

/// `CREATE SOURCE`.
#[derive(Debug, Clone)]
pub struct SourceDef {
    /// Source name.
    pub name: Name,
    /// Declared columns, in order.
    pub columns: Vec<ColumnDef>,
    /// The watermark declaration, if any.
    pub watermark: Option<WatermarkDef>,
    /// `WITH` options.
    pub options: Vec<OptionDef>,
    /// `CHECK` rules, in the order written.
    pub checks: Vec<CheckDef>,
}

/// `CREATE FEATURE VIEW`.
#[derive(Debug, Clone)]
pub struct ViewDef {
    /// View name.
    pub name: Name,
    /// `VERSION n`, with where the number is written; none: version 1.
    pub version: Option<(u32, Pos)>,
    /// Entity key columns.
    pub keys: Vec<Name>,
    /// `WITH` options.
    pub options: Vec<OptionDef>,
    /// The defining query, as sqlparser parsed it.
    pub query: Box<Query>,
    /// Where `SELECT` starts.
    pub query_pos: Pos,
}

/// A statement of a pipeline file.
#[derive(Debug, Clone)]
pub enum Statement {
    /// `CREATE SOURCE`.
    Source(SourceDef),
    /// `CREATE FEATURE VIEW`.
    View(ViewDef),
}

/// Parses the text of a pipeline file. `file` names it in errors.
pub fn parse_pipeline(file: &str, text: &str) -> Result<Vec<Statement>, PipelineError> {
    let dialect = GenericDialect {};
    let tokens = Tokenizer::new(&dialect, text)
        .tokenize_with_location()
        .map_err(|e| {
            PipelineError::at(file, Some(e.location.into()), strip_location(&e.message))
        })?;
    let end = Pos {
        line: text.lines().count().max(1) as u64,
        column: text
            .lines()
            .last()
            .map(|l| l.chars().count() as u64 + 1)
            .unwrap_or(1),
    };
    let mut p = P {
        file,
        text,
        parser: Parser::new(&dialect).with_tokens_with_locations(tokens),
        end,
    };
    let mut out = Vec::new();
    loop {
        let t = p.parser.peek_token();
        match &t.token {
            Token::EOF => break,
            Token::SemiColon => {
                p.parser.next_token();
            }
            Token::Word(w) if w.value.eq_ignore_ascii_case("create") => {
                p.parser.next_token();
                let what = p.parser.next_token();
                match word(&what).as_deref() {
                    Some("source") => out.push(Statement::Source(p.source()?)),
                    Some("feature") => {
                        p.expect_word("view")?;
                        out.push(Statement::View(p.view()?));
                    }
                    _ => {
                        return Err(p.err_at(
                            &what,
                            format!(
                                "expected SOURCE or FEATURE VIEW after CREATE, found {}",
                                what.token
                            ),
                        ));
                    }
                }
            }
            _ => {
                return Err(p.err_at(
                    &t,
                    format!(
                        "expected CREATE SOURCE or CREATE FEATURE VIEW, found {}",
                        t.token
                    ),
                ));
            }
        }
    }
    Ok(out)
}

fn word(t: &TokenWithSpan) -> Option<String> {
    match &t.token {
        Token::Word(w) => Some(w.value.to_ascii_lowercase()),
        _ => None,
    }
}

fn strip_location(msg: &str) -> String {
    match msg.find(" at Line: ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// The `at Line: L, Column: C` sqlparser puts in some messages.
fn message_location(msg: &str) -> Option<Pos> {
    let rest = &msg[msg.find(" at Line: ")? + " at Line: ".len()..];
    let (line, rest) = rest.split_once(", Column: ")?;
    let column: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let p = Pos {
        line: line.trim().parse().ok()?,
        column: column.parse().ok()?,
    };
    (p.line > 0 && p.column > 0).then_some(p)
}

/// Normalizes an identifier as DataFusion does: unquoted names are lower-cased.
pub fn normalize(ident: &Ident) -> String {
    if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_ascii_lowercase()
    }
}

struct P<'a> {
    file: &'a str,
    text: &'a str,
    parser: Parser<'a>,
    /// Just past the last character: where errors at the end of input point.
    end: Pos,
}

impl P<'_> {
    fn err_at(&self, t: &TokenWithSpan, msg: impl Into<String>) -> PipelineError {
        let pos = if t.span.start.line > 0 {
            t.span.start.into()
        } else {
            self.end
        };
        PipelineError::at(self.file, Some(pos), msg)
    }

    fn pe(&self, e: ParserError) -> PipelineError {
        let msg = match e {
            ParserError::TokenizerError(m) | ParserError::ParserError(m) => m,
            ParserError::RecursionLimitExceeded => "expression nested too deeply".to_string(),
        };
        // sqlparser's own location, else the next token's, else the end of input.
        let pos = message_location(&msg).or_else(|| {
            let t = self.parser.peek_token();
            (t.span.start.line > 0).then(|| t.span.start.into())
        });
        PipelineError::at(
            self.file,
            Some(pos.unwrap_or(self.end)),
            strip_location(&msg),
        )
    }

    fn expect_word(&mut self, w: &str) -> Result<TokenWithSpan, PipelineError> {
        let t = self.parser.next_token();
        if word(&t).as_deref() == Some(w) {
            Ok(t)
        } else {
            Err(self.err_at(
                &t,
                format!("expected {}, found {}", w.to_uppercase(), t.token),
            ))
        }
    }

    fn expect(&mut self, tok: Token) -> Result<TokenWithSpan, PipelineError> {
        let t = self.parser.next_token();
        if t.token == tok {
            Ok(t)
        } else {
            Err(self.err_at(&t, format!("expected `{tok}`, found `{}`", t.token)))
        }
    }

    fn peek_is_word(&self, w: &str) -> bool {
        word(&self.parser.peek_token()).as_deref() == Some(w)
    }

    fn name(&mut self) -> Result<Name, PipelineError> {
        let t = self.parser.peek_token();
        let ident = self.parser.parse_identifier().map_err(|e| self.pe(e))?;
        Ok(Name {
            value: normalize(&ident),
            pos: t.span.start.into(),
        })
    }

    fn source(&mut self) -> Result<SourceDef, PipelineError> {
        let name = self.name()?;
        self.expect(Token::LParen)?;
        let mut columns = Vec::new();
        let mut watermark = None;
        let mut checks = Vec::new();
        loop {
            if self.peek_is_word("check") {
                self.parser.next_token();
                checks.push(self.check(None)?);
            } else if self.peek_is_word("constraint") {
                self.parser.next_token();
                let name = self.name()?;
                self.expect_word("check")?;
                checks.push(self.check(Some(name))?);
            } else if self.peek_is_word("watermark") {
                let t = self.parser.next_token();
                if watermark.is_some() {
                    return Err(self.err_at(&t, "a source has at most one WATERMARK"));
                }
                self.expect_word("for")?;
                let column = self.name()?;
                self.expect_word("as")?;
                let at = self.parser.peek_token();
                let expr = self.parser.parse_expr().map_err(|e| self.pe(e))?;
                let delay_ms =
                    watermark_delay(&expr, &column.value).map_err(|m| self.err_at(&at, m))?;
                watermark = Some(WatermarkDef { column, delay_ms });
            } else {
                let name = self.name()?;
                let tt = self.parser.peek_token();
                let data_type = self.parser.parse_data_type().map_err(|e| self.pe(e))?;
                let mut not_null = false;
                if self.peek_is_word("not") {
                    self.parser.next_token();
                    self.expect_word("null")?;
                    not_null = true;
                } else if self.peek_is_word("null") {
                    self.parser.next_token();
                }
                let mut metadata = None;
                if self.peek_is_word("metadata") {
                    let t = self.parser.next_token();
                    let pos: Pos = t.span.start.into();
                    if self.peek_is_word("from") {
                        self.parser.next_token();
                        let v = self.parser.next_token();
                        let text = match &v.token {
                            Token::SingleQuotedString(s) => s.clone(),
                            other => {
                                return Err(self.err_at(
                                    &v,
                                    format!(
                                        "expected a quoted metadata name after FROM, found {other}"
                                    ),
                                ));
                            }
                        };
                        metadata = Some((text, v.span.start.into()));
                    } else {
                        metadata = Some((name.value.clone(), pos));
                    }
                }
                while self.peek_is_word("check") {
                    self.parser.next_token();
                    checks.push(self.check(None)?);
                }
                columns.push(ColumnDef {
                    name,
                    data_type,
                    type_pos: tt.span.start.into(),
                    not_null,
                    metadata,
                });
            }
            let t = self.parser.next_token();
            match t.token {
                Token::Comma => continue,
                Token::RParen => break,
                _ => {
                    return Err(self.err_at(&t, format!("expected `,` or `)`, found {}", t.token)));
                }
            }
        }
        let options = self.with_options()?;
        Ok(SourceDef {
            name,
            columns,
            watermark,
            options,
            checks,
        })
    }

    /// `(expr)` after `CHECK`.
    fn check(&mut self, name: Option<Name>) -> Result<CheckDef, PipelineError> {
        self.expect(Token::LParen)?;
        let first = self.parser.peek_token();
        let expr = self.parser.parse_expr().map_err(|e| self.pe(e))?;
        let close = self.expect(Token::RParen)?;
        let pos: Pos = first.span.start.into();
        let text = slice(self.text, pos, close.span.start.into())
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        Ok(CheckDef {
            name,
            expr,
            text,
            pos,
        })
    }

    fn with_options(&mut self) -> Result<Vec<OptionDef>, PipelineError> {
        if !self.peek_is_word("with") {
            return Ok(Vec::new());
        }
        self.parser.next_token();
        self.expect(Token::LParen)?;
        let mut out = Vec::new();
        if self.parser.peek_token().token == Token::RParen {
            self.parser.next_token();
            return Ok(out);
        }
        loop {
            // Option names may be dotted (`kafka.security.protocol`) or quoted.
            let first = self.parser.next_token();
            let mut key = match &first.token {
                Token::Word(w) => normalize(&Ident {
                    value: w.value.clone(),
                    quote_style: w.quote_style,
                    span: first.span,
                }),
                Token::SingleQuotedString(s) => s.clone(),
                _ => {
                    return Err(self.err_at(
                        &first,
                        format!("expected an option name, found {}", first.token),
                    ));
                }
            };
            loop {
                // `schema.1`: the tokenizer reads `.1` as a number.
                if let Token::Number(n, _) = &self.parser.peek_token().token
                    && n.len() > 1
                    && n.starts_with('.')
                    && n[1..].bytes().all(|b| b.is_ascii_digit())
                {
                    key.push_str(n);
                    self.parser.next_token();
                    continue;
                }
                if self.parser.peek_token().token != Token::Period {
                    break;
                }
                self.parser.next_token();
                let part = self.parser.next_token();
                match &part.token {
                    Token::Word(w) => {
                        key.push('.');
                        key.push_str(&w.value.to_ascii_lowercase());
                    }
                    _ => {
                        return Err(self.err_at(
                            &part,
                            format!("expected an option name, found {}", part.token),
                        ));
                    }
                }
            }
            self.expect(Token::Eq)?;
            let vt = self.parser.next_token();
            let value = match &vt.token {
                Token::SingleQuotedString(s) | Token::DoubleQuotedString(s) => s.clone(),
                Token::Number(n, _) => n.clone(),
                Token::Word(w) => w.value.clone(),
                _ => {
                    return Err(
                        self.err_at(&vt, format!("expected an option value, found {}", vt.token))
                    );
                }
            };
            out.push(OptionDef {
                key: Name {
                    value: key,
                    pos: first.span.start.into(),
                },
                value,
                value_pos: vt.span.start.into(),
            });
            let t = self.parser.next_token();
            match t.token {
                Token::Comma => continue,
                Token::RParen => break,
                _ => return Err(self.err_at(&t, format!("expected `,` or `)`, found {}", t.token))),
            }
        }
        Ok(out)
    }

    fn view(&mut self) -> Result<ViewDef, PipelineError> {
        let name = self.name()?;
        let mut version = None;
        let t = self.parser.peek_token();
        if word(&t).as_deref() == Some("version") {
            self.parser.next_token();
            let n = self.parser.next_token();
            match &n.token {
                Token::Number(v, _) if v.parse::<u32>().is_ok_and(|v| v >= 1) => {
                    version = Some((v.parse::<u32>().unwrap_or(1), Pos::from(n.span.start)));
                }
                other => {
                    return Err(self.err_at(
                        &n,
                        format!("expected a version number (1, 2, …) after VERSION, found {other}"),
                    ));
                }
            }
        }
        self.expect_word("key")?;
        let mut keys = vec![self.name()?];
        while self.parser.peek_token().token == Token::Comma {
            self.parser.next_token();
            keys.push(self.name()?);
        }
        let options = self.with_options()?;
        self.expect_word("as")?;
        let qt = self.parser.peek_token();
        let query = self.parser.parse_query().map_err(|e| self.pe(e))?;
        let t = self.parser.peek_token();
        if !matches!(t.token, Token::SemiColon | Token::EOF) {
            return Err(self.err_at(
                &t,
                format!("expected `;` after the view's query, found {}", t.token),
            ));
        }
        Ok(ViewDef {
            name,
            version,
            keys,
            options,
            query,
            query_pos: qt.span.start.into(),
        })
    }
}

/// The text between two positions (line and column count from 1, columns
/// in characters).
fn slice(text: &str, from: Pos, to: Pos) -> &str {
    let offset = |p: Pos| {
        let mut line_start = 0;
        for (i, l) in text.split_inclusive('\n').enumerate() {
            if i as u64 + 1 == p.line {
                let col = l
                    .char_indices()
                    .nth(p.column.saturating_sub(1) as usize)
                    .map(|(c, _)| c)
                    .unwrap_or(l.len());
                return line_start + col;
            }
            line_start += l.len();
        }
        text.len()
    };
    let (a, b) = (offset(from), offset(to));
    text.get(a..b.max(a)).unwrap_or("")
}

fn watermark_delay(expr: &Expr, column: &str) -> Result<i64, String> {
    use datafusion::sql::sqlparser::ast::BinaryOperator;
    let is_col = |e: &Expr| matches!(e, Expr::Identifier(i) if normalize(i) == column);
    match expr {
        e if is_col(e) => Ok(0),
        Expr::BinaryOp {
            left,
            op: BinaryOperator::Minus,
            right,
        } if is_col(left) => {
            let ms = interval_ms(right)?;
            if ms < 0 {
                return Err("the watermark delay must not be negative".into());
            }
            Ok(ms)
        }
        _ => Err(format!(
            "expected `{column}` or `{column} - INTERVAL '…' UNIT` as the watermark expression, found `{expr}`"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_source_and_view() {
        let sql = "CREATE SOURCE clicks (user_id TEXT NOT NULL, price DOUBLE, ts TIMESTAMP NOT NULL,\n WATERMARK FOR ts AS ts - INTERVAL '5' SECOND) WITH (connector = 'file', path = 'a.jsonl', kafka.acks = 'all', schema.12 = 'v1.avsc', expect.a.7 = 'x');\n\
                   CREATE FEATURE VIEW v KEY user_id WITH (online = true) AS SELECT user_id, COUNT(*) AS n FROM clicks GROUP BY user_id;";
        let st = parse_pipeline("p.sql", sql).expect("parses");
        assert_eq!(st.len(), 2);
        let Statement::Source(s) = &st[0] else {
            panic!("source first")
        };
        assert_eq!(s.columns.len(), 3);
        assert!(s.columns[0].not_null && !s.columns[1].not_null);
        let wm = s.watermark.as_ref().expect("watermark");
        assert_eq!((wm.column.value.as_str(), wm.delay_ms), ("ts", 5000));
        assert_eq!(s.options[2].key.value, "kafka.acks");
        // `.12` is one number token to the tokenizer.
        assert_eq!(s.options[3].key.value, "schema.12");
        assert_eq!(s.options[4].key.value, "expect.a.7");
        let Statement::View(v) = &st[1] else {
            panic!("view second")
        };
        assert_eq!(v.keys[0].value, "user_id");
        assert_eq!(v.options[0].value, "true");
    }

    #[test]
    fn parses_check_rules_in_every_place() {
        let sql = "CREATE SOURCE o (id TEXT NOT NULL CHECK (length(id) > 0) CHECK (id <> 'x'),\n\
                   \tprice DOUBLE CHECK (price >= 0), ts TIMESTAMP NOT NULL,\n\
                   CHECK (ts > TIMESTAMP '2020-01-01'),\n\
                   CONSTRAINT small CHECK (price <  1e6\n      OR price IS NULL)) WITH (connector = 'file', path = 'o.jsonl');";
        let st = parse_pipeline("p.sql", sql).expect("parses");
        let Statement::Source(s) = &st[0] else {
            panic!("a source")
        };
        assert_eq!(s.columns.len(), 3);
        let rules: Vec<(Option<&str>, &str, (u64, u64))> = s
            .checks
            .iter()
            .map(|c| {
                (
                    c.name.as_ref().map(|n| n.value.as_str()),
                    c.text.as_str(),
                    (c.pos.line, c.pos.column),
                )
            })
            .collect();
        assert_eq!(
            rules,
            vec![
                (None, "length(id) > 0", (1, 42)),
                (None, "id <> 'x'", (1, 65)),
                (None, "price >= 0", (2, 22)),
                (None, "ts > TIMESTAMP '2020-01-01'", (3, 8)),
                (Some("small"), "price < 1e6 OR price IS NULL", (4, 25)),
            ]
        );
        let e = parse_pipeline("p.sql", "CREATE SOURCE o (a TEXT, CHECK a > 0)").expect_err("bad");
        assert_eq!(e.to_string(), "p.sql:1:32: expected `(`, found `a`");
        let e = parse_pipeline("p.sql", "CREATE SOURCE o (a TEXT, CONSTRAINT c a > 0)")
            .expect_err("bad");
        assert!(e.to_string().starts_with("p.sql:1:39:"), "{e}");
    }

    #[test]
    fn errors_carry_line_and_column() {
        let e = parse_pipeline(
            "p.sql",
            "CREATE SOURCE s (a TEXT,\n  WATERMARK FOR a AS a + 1)",
        )
        .expect_err("bad");
        assert_eq!(e.pos.map(|p| p.line), Some(2));
        let e = parse_pipeline("p.sql", "CREATE TABLE x").expect_err("bad");
        assert!(e.to_string().starts_with("p.sql:1:8:"), "{e}");
    }
}
