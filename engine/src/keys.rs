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

    /// The key columns for these ids.
    pub fn arrays(&self, ids: &[u32]) -> Result<Vec<ArrayRef>> {
        let parser = self.conv.parser();
        self.conv
            .convert_rows(ids.iter().map(|id| parser.parse(&self.rows[*id as usize])))
            .map_err(|e| EngineError::arrow("decoding keys", e))
    }
}

/// The online-store key of each row: key columns rendered as text, joined by `|`.
pub fn key_strings(cols: &[ArrayRef]) -> Result<Vec<String>> {
    let n = cols.first().map(|c| c.len()).unwrap_or(0);
    let opts = FormatOptions::default().with_null("");
    let fmts = cols
        .iter()
        .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| EngineError::arrow("formatting keys", e))?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = String::new();
        for (j, f) in fmts.iter().enumerate() {
            if j > 0 {
                s.push('|');
            }
            s.push_str(&f.value(i).to_string());
        }
        out.push(s);
    }
    Ok(out)
}
