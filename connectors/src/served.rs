//! The served-value log in the lake: the reads a view's `log_served` keeps
//! are written as Parquet under `{lake}/_served/{view}/date=YYYY-MM-DD/`
//! (the UTC day of the read's `as_of`). Columns: the view's key columns
//! (text), `as_of`, `found`, `request_id`, `served_at` and every feature,
//! typed as the view emits it (NULL when the key was not found). A file is
//! written under a hidden name, fsynced and renamed, as lake files are.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use serde_json::{Map, Value};
use sluice_engine::served::ServedRow;
use sluice_engine::{EngineError, Result};
use sluice_sql::ViewPlan;

use crate::lake::{NULL_PARTITION, day_string, io, write_parquet_atomically};

/// The folder under a lake root that holds served-value logs; no view can
/// be named so (names start with a letter).
pub const SERVED_DIR: &str = "_served";

/// `{root}/_served/{view}`.
pub fn served_dir(root: &Path, view: &str) -> PathBuf {
    root.join(SERVED_DIR).join(view)
}

/// The schema of a view's served-value log.
pub fn served_schema(view: &ViewPlan) -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    let mut fields: Vec<Field> = view
        .keys
        .iter()
        .map(|k| Field::new(k, DataType::Utf8, true))
        .collect();
    fields.push(Field::new("as_of", ts.clone(), true));
    fields.push(Field::new("found", DataType::Boolean, false));
    fields.push(Field::new("request_id", DataType::Utf8, false));
    fields.push(Field::new("served_at", ts, false));
    for f in view.output_schema.fields() {
        if !view.keys.iter().any(|k| k == f.name()) {
            fields.push(f.as_ref().clone().with_nullable(true));
        }
    }
    Arc::new(Schema::new(fields))
}

/// Writes one view's logged reads.
#[derive(Debug)]
pub struct ServedWriter {
    dir: PathBuf,
    view: ViewPlan,
    schema: SchemaRef,
    seq: u64,
}

impl ServedWriter {
    /// A writer for `view` (which has a lake: `log_served` requires one).
    pub fn new(view: &ViewPlan) -> Result<Self> {
        let root = view
            .offline
            .as_ref()
            .ok_or_else(|| EngineError::Connector {
                what: format!("view {}", view.name),
                message: "log_served needs offline = 'DIR'".into(),
            })?;
        Ok(ServedWriter {
            dir: served_dir(root, &view.name),
            view: view.clone(),
            schema: served_schema(view),
            seq: 0,
        })
    }

    fn row_json(&self, r: &ServedRow) -> Value {
        let mut o = Map::new();
        // The key's columns from its text (a NULL column is JSON null).
        let parts = sluice_engine::keys::KeyText::parse(&r.key)
            .map(|k| k.0)
            .unwrap_or_else(|_| vec![Some(r.key.clone())]);
        for (k, p) in self.view.keys.iter().zip(parts) {
            o.insert(k.clone(), p.map_or(Value::Null, Value::String));
        }
        o.insert("as_of".into(), r.as_of.map_or(Value::Null, Value::from));
        o.insert("found".into(), Value::Bool(r.features.is_some()));
        o.insert("request_id".into(), Value::String(r.request_id.clone()));
        o.insert("served_at".into(), Value::from(r.served_at));
        if let Some(f) = &r.features {
            for (k, v) in f {
                if !o.contains_key(k) {
                    o.insert(k.clone(), v.clone());
                }
            }
        }
        Value::Object(o)
    }

    /// Writes `rows`, one file per `as_of` day; returns the files written.
    pub fn write(&mut self, rows: &[ServedRow]) -> Result<usize> {
        let mut by_day: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for r in rows {
            let day = r
                .as_of
                .map(|t| format!("date={}", day_string(t.div_euclid(86_400_000))))
                .unwrap_or_else(|| format!("date={NULL_PARTITION}"));
            by_day.entry(day).or_default().push(self.row_json(r));
        }
        let what = format!("served-value log of view {}", self.view.name);
        let mut files = 0;
        for (day, values) in by_day {
            let mut dec = arrow::json::ReaderBuilder::new(Arc::clone(&self.schema))
                .build_decoder()
                .map_err(|e| EngineError::arrow(what.clone(), e))?;
            dec.serialize(&values)
                .map_err(|e| EngineError::arrow(what.clone(), e))?;
            let Some(batch) = dec
                .flush()
                .map_err(|e| EngineError::arrow(what.clone(), e))?
            else {
                continue;
            };
            let dir = self.dir.join(&day);
            std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
            self.seq += 1;
            let first = rows.first().map_or(0, |r| r.served_at);
            let name = format!("served-{first}-{}-{}.parquet", std::process::id(), self.seq);
            write_parquet_atomically(&dir.join(name), &batch)?;
            files += 1;
            metrics::counter!("sluice_served_log_rows_total", "view" => self.view.name.clone())
                .increment(batch.num_rows() as u64);
        }
        Ok(files)
    }
}
