//! The baseline scripts (DuckDB, PyFlink), compiled into the benchmark
//! binary and written next to the data they read, so the binary runs from
//! any directory.

use std::path::{Path, PathBuf};

/// A script: its file name and text.
pub struct Script {
    name: &'static str,
    text: &'static str,
}

/// DuckDB's HOP windows and as-of join (`backfill`).
pub const DUCKDB_BACKFILL: Script = Script {
    name: "duckdb_backfill.py",
    text: include_str!("../scripts/duckdb_backfill.py"),
};

/// DuckDB's per-feature statistics over a lake (`stats`).
pub const DUCKDB_STATS: Script = Script {
    name: "duckdb_stats.py",
    text: include_str!("../scripts/duckdb_stats.py"),
};

/// Apache Flink SQL's HOP view over the same JSON file (`hop --flink-python`).
pub const FLINK_HOP: Script = Script {
    name: "flink_hop.py",
    text: include_str!("../scripts/flink_hop.py"),
};

/// Writes `script` into `dir` and returns its path.
pub fn write(dir: &Path, script: Script) -> anyhow::Result<PathBuf> {
    let p = dir.join(script.name);
    std::fs::write(&p, script.text)?;
    Ok(p)
}
