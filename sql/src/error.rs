//! Errors in pipeline files, with the place they occur and a suggestion.

use std::fmt;

/// A position in a pipeline file (1-based line and column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    /// 1-based line.
    pub line: u64,
    /// 1-based column.
    pub column: u64,
}

impl From<datafusion::sql::sqlparser::tokenizer::Location> for Pos {
    fn from(l: datafusion::sql::sqlparser::tokenizer::Location) -> Self {
        Pos {
            line: l.line,
            column: l.column,
        }
    }
}

/// An error in a pipeline file: what is wrong, where, and what would be
/// valid. Always the user's to fix (a retry does not help).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", Rendered(self))]
pub struct PipelineError {
    /// The pipeline file's path as the user gave it.
    pub file: String,
    /// Where the error is; `None` when it concerns the whole file.
    pub pos: Option<Pos>,
    /// What is wrong and what was expected.
    pub message: String,
    /// The nearest valid name, when there is one.
    pub help: Option<String>,
}

impl PipelineError {
    /// An error at a position.
    pub fn at(file: &str, pos: Option<Pos>, message: impl Into<String>) -> Self {
        PipelineError {
            file: file.to_string(),
            pos,
            message: message.into(),
            help: None,
        }
    }

    /// Adds a "did you mean" hint built from the nearest candidate, if any.
    pub fn suggest<'a>(
        mut self,
        word: &str,
        candidates: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        if let Some(best) = nearest(word, candidates) {
            self.help = Some(format!("did you mean `{best}`?"));
        }
        self
    }

    /// Adds a free-form hint.
    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

/// `file:line:column: message`, then `  help: …` when there is a hint.
struct Rendered<'a>(&'a PipelineError);

impl fmt::Display for Rendered<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = self.0;
        match e.pos {
            Some(p) if p.line > 0 => {
                write!(f, "{}:{}:{}: {}", e.file, p.line, p.column, e.message)?
            }
            _ => write!(f, "{}: {}", e.file, e.message)?,
        }
        if let Some(h) = &e.help {
            write!(f, "\n  help: {h}")?;
        }
        Ok(())
    }
}

/// The candidate closest to `word` by edit distance (case-insensitive), when
/// it is close enough to be a plausible typo.
pub fn nearest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let w = word.to_ascii_lowercase();
    let mut best: Option<(usize, &'a str)> = None;
    for c in candidates {
        let d = levenshtein(&w, &c.to_ascii_lowercase());
        if best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    let limit = (w.chars().count() / 3).max(2);
    best.filter(|(d, _)| *d <= limit).map(|(_, c)| c)
}

/// Optimal-string-alignment distance: edits, with a swap of neighbours as one.
fn levenshtein(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let w = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * w];
    for i in 0..=a.len() {
        d[i * w] = i;
    }
    for (j, v) in d.iter_mut().enumerate().take(w) {
        *v = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[(i - 1) * w + j] + 1)
                .min(d[i * w + j - 1] + 1)
                .min(d[(i - 1) * w + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[(i - 2) * w + j - 2] + 1);
            }
            d[i * w + j] = v;
        }
    }
    d[a.len() * w + b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_finds_typos_and_rejects_strangers() {
        assert_eq!(nearest("pricee", ["user_id", "price", "ts"]), Some("price"));
        assert_eq!(nearest("COUNTT", ["count", "sum"]), Some("count"));
        assert_eq!(nearest("zebra", ["user_id", "price"]), None);
        assert_eq!(nearest("cuont", ["cot", "count"]), Some("count"));
    }
}
