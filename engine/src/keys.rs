//! The key dictionary: each distinct entity key (one or more columns) gets a
//! dense `u32` id, so per-pane state indexes keys with plain vectors.

use std::collections::HashMap;

use arrow::array::ArrayRef;
use arrow::datatypes::DataType;
use arrow::row::{RowConverter, SortField};
use arrow::util::display::{ArrayFormatter, FormatOptions};

use crate::error::{EngineError, Result};

/// Interns key rows (arrow row format) as dense ids.
pub struct KeyDict {
    conv: RowConverter,
    ids: HashMap<Box<[u8]>, u32, ahash::RandomState>,
    rows: Vec<Box<[u8]>>,
}

impl std::fmt::Debug for KeyDict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyDict({} keys)", self.rows.len())
    }
}

impl KeyDict {
    /// A dictionary for keys of these types.
    pub fn new(types: &[DataType]) -> Result<Self> {
        let conv = RowConverter::new(types.iter().map(|t| SortField::new(t.clone())).collect())
            .map_err(|e| EngineError::arrow("key columns", e))?;
        Ok(KeyDict {
            conv,
            ids: HashMap::with_hasher(ahash::RandomState::new()),
            rows: Vec::new(),
        })
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// No keys yet.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Ids of the keys in `cols`, row by row, interning new ones.
    pub fn intern(&mut self, cols: &[ArrayRef], out: &mut Vec<u32>) -> Result<()> {
        let rows = self
            .conv
            .convert_columns(cols)
            .map_err(|e| EngineError::arrow("encoding keys", e))?;
        out.clear();
        out.reserve(rows.num_rows());
        for r in rows.iter() {
            let b = r.as_ref();
            let id = match self.ids.get(b) {
                Some(id) => *id,
                None => self.intern_bytes(b),
            };
            out.push(id);
        }
        Ok(())
    }

    /// The id of an encoded key row, interning it.
    pub fn intern_bytes(&mut self, b: &[u8]) -> u32 {
        if let Some(id) = self.ids.get(b) {
            return *id;
        }
        let id = self.rows.len() as u32;
        let boxed: Box<[u8]> = b.into();
        self.rows.push(boxed.clone());
        self.ids.insert(boxed, id);
        id
    }

    /// The encoded row of a key.
    pub fn bytes(&self, id: u32) -> &[u8] {
        &self.rows[id as usize]
    }

    /// The converter of the key rows.
    pub fn converter(&self) -> &RowConverter {
        &self.conv
    }

    /// The key columns for these ids.
    pub fn arrays(&self, ids: &[u32]) -> Result<Vec<ArrayRef>> {
        let parser = self.conv.parser();
        self.conv
            .convert_rows(ids.iter().map(|id| parser.parse(&self.rows[*id as usize])))
            .map_err(|e| EngineError::arrow("decoding keys", e))
    }
}

/// The stored and public text of each row's key (see [`KeyText`]).
pub fn key_strings(cols: &[ArrayRef]) -> Result<Vec<String>> {
    let n = cols.first().map(|c| c.len()).unwrap_or(0);
    let opts = FormatOptions::default();
    let fmts = cols
        .iter()
        .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| EngineError::arrow("formatting keys", e))?;
    let mut out = Vec::with_capacity(n);
    let mut value = String::new();
    for i in 0..n {
        let mut s = String::new();
        for (j, (f, c)) in fmts.iter().zip(cols).enumerate() {
            if j > 0 {
                s.push(SEPARATOR);
            }
            if c.is_null(i) {
                s.push_str(NULL_TEXT);
                continue;
            }
            value.clear();
            use std::fmt::Write;
            write!(value, "{}", f.value(i))
                .map_err(|e| EngineError::Internal(format!("formatting a key: {e}")))?;
            escape_into(&value, &mut s);
        }
        out.push(s);
    }
    Ok(out)
}

/// Key groups every state is split into: a view's tiles, pending rows and
/// online rows are stored by group, so a group can be checkpointed,
/// restored and moved on its own. Fixed, for every state dir's life.
pub const KEY_GROUPS: u16 = 256;

/// The key group of a key's text: FNV-1a (64 bits) of its bytes, modulo
/// [`KEY_GROUPS`]. Any process computes the same group for the same key.
pub fn key_group(text: &str) -> u16 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % u64::from(KEY_GROUPS)) as u16
}

/// The key group of each row's key (`cols`: the key columns).
pub fn key_groups(cols: &[ArrayRef]) -> Result<Vec<u16>> {
    Ok(key_strings(cols)?.iter().map(|k| key_group(k)).collect())
}

/// Columns of a key are joined by this character.
pub const SEPARATOR: char = '|';
/// A column that is NULL, alone between separators.
pub const NULL_TEXT: &str = "\\N";

/// Appends `value` to `out` with `\` and `|` escaped.
fn escape_into(value: &str, out: &mut String) {
    if !value.contains(['|', '\\']) {
        out.push_str(value);
        return;
    }
    for c in value.chars() {
        if c == '|' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
}

/// The key text of column values (`None`: NULL), as [`key_strings`]
/// writes it.
pub fn key_text<S: AsRef<str>>(parts: &[Option<S>]) -> String {
    let mut s = String::new();
    for (j, p) in parts.iter().enumerate() {
        if j > 0 {
            s.push(SEPARATOR);
        }
        match p {
            None => s.push_str(NULL_TEXT),
            Some(v) => escape_into(v.as_ref(), &mut s),
        }
    }
    s
}

/// The key text's grammar: columns joined by `|`; inside a value `\|` is
/// a `|` and `\\` a `\`; a column that is exactly `\N` is NULL. Every
/// key has exactly one text and every text at most one key, so two
/// entities never share a stored key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyText(pub Vec<Option<String>>);

impl KeyText {
    /// Parses a key's text; the error says what is wrong, for a 400 answer.
    pub fn parse(text: &str) -> std::result::Result<KeyText, String> {
        let mut parts = Vec::new();
        let mut cur = String::new();
        // The current column was exactly `\N` so far.
        let mut null = false;
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            if null && c != '|' {
                return Err(format!(
                    "key `{text}`: `\\N` stands for NULL only as a whole column (write `\\\\N` for the text)"
                ));
            }
            match c {
                '|' => {
                    parts.push((!null).then(|| std::mem::take(&mut cur)));
                    null = false;
                }
                '\\' => match chars.next() {
                    Some(e @ ('|' | '\\')) => cur.push(e),
                    Some('N') if cur.is_empty() => null = true,
                    Some(e) => {
                        return Err(format!(
                            "key `{text}`: `\\{e}` is not an escape (inside a value write `\\|` for `|` and `\\\\` for `\\`; `\\N` alone is NULL)"
                        ));
                    }
                    None => {
                        return Err(format!(
                            "key `{text}` ends in a lone `\\` (write `\\\\` for a backslash)"
                        ));
                    }
                },
                c => cur.push(c),
            }
        }
        parts.push((!null).then_some(cur));
        Ok(KeyText(parts))
    }

    /// Parses a key of a view keyed by `columns`, checking the column count.
    pub fn parse_for(text: &str, columns: &[String]) -> std::result::Result<KeyText, String> {
        let k = KeyText::parse(text)?;
        if k.0.len() != columns.len() {
            return Err(format!(
                "key `{text}` has {} column(s); the view is keyed by {} ({}): join columns with `|` and write a `|` inside a value as `\\|`",
                k.0.len(),
                columns.len(),
                columns.join(", ")
            ));
        }
        Ok(k)
    }

    /// The canonical text of this key.
    pub fn text(&self) -> String {
        key_text(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, StringArray};

    use super::*;

    fn texts(a: &[Option<&str>], b: &[Option<&str>]) -> Vec<String> {
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(a.to_vec())),
            Arc::new(StringArray::from(b.to_vec())),
        ];
        key_strings(&cols).expect("keys")
    }

    #[test]
    fn composite_keys_that_used_to_collide_are_two_keys() {
        let k = texts(
            &[Some("x|y"), Some("x"), None, Some("")],
            &[Some("z"), Some("y|z"), Some(""), None],
        );
        assert_eq!(k, vec!["x\\|y|z", "x|y\\|z", "\\N|", "|\\N"]);
        let distinct: std::collections::HashSet<_> = k.iter().collect();
        assert_eq!(distinct.len(), 4);
    }

    #[test]
    fn text_round_trips() {
        for parts in [
            vec![Some("a"), Some("b")],
            vec![Some("x|y"), Some("z")],
            vec![Some("\\"), Some("\\N")],
            vec![None, Some("")],
            vec![Some(""), None],
            vec![Some("")],
            vec![None],
            vec![Some("a\\|b\\\\c|")],
        ] {
            let owned: Vec<Option<String>> = parts.iter().map(|p| p.map(str::to_string)).collect();
            let t = key_text(&owned);
            assert_eq!(KeyText::parse(&t), Ok(KeyText(owned.clone())), "{t}");
        }
        let ints: Vec<ArrayRef> = vec![Arc::new(Int64Array::from(vec![Some(7), None]))];
        assert_eq!(key_strings(&ints).expect("keys"), vec!["7", "\\N"]);
    }

    #[test]
    fn bad_texts_say_why() {
        for bad in ["a\\x", "a\\", "\\Nx", "\\N\\N"] {
            assert!(KeyText::parse(bad).is_err(), "{bad}");
        }
        let cols = ["a".to_string(), "b".to_string()];
        assert!(KeyText::parse_for("x", &cols).is_err());
        assert!(KeyText::parse_for("x|y|z", &cols).is_err());
        assert_eq!(
            KeyText::parse_for("\\N|y", &cols).map(|k| k.0),
            Ok(vec![None, Some("y".into())])
        );
    }
}
