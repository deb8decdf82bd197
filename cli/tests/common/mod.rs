//! Helpers shared by the integration tests: running the real `sluice`
//! binary and reading what it wrote (lake Parquet files, online store,
//! dead letters).

#![allow(dead_code, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use arrow::array::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sluice"))
}

pub fn sluice(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env("SLUICE_LOG", "warn")
        .output()
        .expect("run sluice")
}

/// Every Parquet file under `dir`, recursively, sorted by path.
pub fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(parquet_files(&p));
        } else if p.extension().is_some_and(|x| x == "parquet") {
            out.push(p);
        }
    }
    out.sort();
    out
}

pub fn read_parquet(path: &Path) -> Vec<RecordBatch> {
    let f = std::fs::File::open(path).expect("open parquet");
    let r = ParquetRecordBatchReaderBuilder::try_new(f)
        .expect("parquet reader")
        .build()
        .expect("build reader");
    r.map(|b| b.expect("read batch")).collect()
}

/// Rows of batches as `a | b | c` lines (NULL for nulls), plus the header line.
pub fn format_rows(batches: &[RecordBatch]) -> (String, Vec<String>) {
    let opts = FormatOptions::default().with_null("NULL");
    let mut header = String::new();
    let mut rows = Vec::new();
    for b in batches {
        header = b
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect::<Vec<_>>()
            .join(" | ");
        let fmts: Vec<ArrayFormatter> = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts).expect("formatter"))
            .collect();
        for i in 0..b.num_rows() {
            rows.push(
                fmts.iter()
                    .map(|f| f.value(i).to_string())
                    .collect::<Vec<_>>()
                    .join(" | "),
            );
        }
    }
    (header, rows)
}

/// All lake rows of a view, sorted, and the header.
pub fn lake_rows(lake: &Path, view: &str) -> (String, Vec<String>) {
    let mut batches = Vec::new();
    for f in parquet_files(&lake.join(view)) {
        batches.extend(read_parquet(&f));
    }
    let (h, mut rows) = format_rows(&batches);
    rows.sort();
    (h, rows)
}

/// Dead letters as parsed JSON values.
pub fn dead_letters(state: &Path) -> Vec<serde_json::Value> {
    let Ok(text) = std::fs::read_to_string(state.join("dead_letters.jsonl")) else {
        return Vec::new();
    };
    text.lines()
        .map(|l| serde_json::from_str(l).expect("dead letter is JSON"))
        .collect()
}

/// `sluice get` output as JSON, or None when the key is missing.
pub fn get(state: &Path, view: &str, key: &str) -> Option<serde_json::Value> {
    let out = sluice(&[
        "get",
        view,
        key,
        "--state-dir",
        &state.display().to_string(),
    ]);
    if !out.status.success() {
        return None;
    }
    Some(serde_json::from_slice(&out.stdout).expect("get prints JSON"))
}

fn close(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// Rows equal field by field, numbers up to floating-point summation order
/// (partial aggregates merged in a different order differ in the last bits).
pub fn rows_match(a: &[String], b: &[String]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            let (xs, ys): (Vec<&str>, Vec<&str>) =
                (x.split(" | ").collect(), y.split(" | ").collect());
            xs.len() == ys.len()
                && xs
                    .iter()
                    .zip(&ys)
                    .all(|(p, q)| match (p.parse::<f64>(), q.parse::<f64>()) {
                        (Ok(p), Ok(q)) => close(p, q),
                        _ => p == q,
                    })
        })
}

/// JSON values equal, numbers up to floating-point summation order.
pub fn json_match(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => close(x, y),
            _ => x == y,
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_match(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_match(v, w)))
        }
        _ => a == b,
    }
}
