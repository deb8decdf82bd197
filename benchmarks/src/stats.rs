//! `sluice-bench stats`: `sluice stats` over a generated lake of the
//! quickstart view (10M rows by default), whole range, by day and against
//! a reference range, with DuckDB's same aggregates over the same files as
//! the baseline, measured in the same run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use arrow::array::{
    ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use sluice_connectors::stats::{StatsInput, StatsRequest, feature_stats};
use sluice_engine::OfflineSink;

/// Options of `sluice-bench stats`.
#[derive(clap::Args, Debug)]
pub struct BenchStatsArgs {
    /// Lake rows.
    #[arg(long, default_value_t = 10_000_000)]
    rows: u64,
    /// Keys per window (rows per 5-minute window_end).
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Working directory (the lake is kept and reused between runs).
    #[arg(long, default_value = "sluice-bench-stats")]
    dir: PathBuf,
    /// Python with `duckdb` (default: the venv `.ci/run` makes).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Skip DuckDB.
    #[arg(long)]
    no_duckdb: bool,
}

const T0: i64 = 1_704_067_200_000;
const FEATURES: [&str; 4] = ["clicks_1h", "spend_1h", "avg_price_1h", "distinct_items_1h"];

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// Writes `rows` lake rows of the quickstart view: `keys` keys per
/// 5-minute window end, skewed counts, 2% NULL spend.
fn write_lake(
    plan: &sluice_sql::PipelinePlan,
    root: &std::path::Path,
    rows: u64,
    keys: u64,
) -> anyhow::Result<()> {
    let view = plan.view("user_activity").context("quickstart view")?;
    let schema = sluice_engine::output::emitted_schema(&view.output_schema);
    let mut lake = sluice_connectors::LakeWriter::new(root, "user_activity", Arc::clone(&schema));
    let chunk = 1_000_000u64;
    let mut epoch = 0;
    let mut i = 0u64;
    while i < rows {
        let n = chunk.min(rows - i);
        let idx: Vec<u64> = (i..i + n).collect();
        let end: Vec<i64> = idx
            .iter()
            .map(|r| T0 + (r / keys) as i64 * 300_000)
            .collect();
        let clicks: Vec<i64> = idx
            .iter()
            .map(|r| 1 + (mix(*r) % 60).pow(2) as i64 / 60)
            .collect();
        let spend: Vec<Option<f64>> = idx
            .iter()
            .map(|r| (r % 50 != 0).then(|| (mix(r * 7) % 300_000) as f64 / 100.0))
            .collect();
        let avg: Vec<f64> = idx
            .iter()
            .map(|r| (mix(r * 3) % 10_000) as f64 / 100.0)
            .collect();
        // APPROX_DISTINCT is cast to BIGINT in the view's output.
        let distinct: Vec<i64> = clicks
            .iter()
            .zip(&idx)
            .map(|(c, r)| 1 + (mix(r * 5) % (*c as u64)) as i64)
            .collect();
        let cols: Vec<ArrayRef> = vec![
            Arc::new(
                TimestampMillisecondArray::from(
                    end.iter().map(|e| e - 3_600_000).collect::<Vec<_>>(),
                )
                .with_timezone("UTC"),
            ),
            Arc::new(TimestampMillisecondArray::from(end).with_timezone("UTC")),
            Arc::new(StringArray::from(
                idx.iter()
                    .map(|r| format!("u{:06}", r % keys))
                    .collect::<Vec<_>>(),
            )),
            Arc::new(Int64Array::from(clicks)),
            Arc::new(Float64Array::from(spend)),
            Arc::new(Float64Array::from(avg)),
            Arc::new(Int64Array::from(distinct)),
        ];
        let batch = RecordBatch::try_new(Arc::clone(&schema), cols)?;
        epoch += 1;
        lake.write_epoch(epoch, &[batch])?;
        i += n;
    }
    Ok(())
}

/// Runs the benchmark.
pub fn run(a: &BenchStatsArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.dir)?;
    let dir = a.dir.canonicalize()?;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "sluice-bench stats ({} build), {threads} cores",
        if cfg!(debug_assertions) {
            "debug (use --release!)"
        } else {
            "release"
        }
    );
    let pipeline = dir.join("pipeline.sql");
    std::fs::write(&pipeline, sluice_cli::QUICKSTART_SQL)?;
    std::fs::write(dir.join("events.jsonl"), "")?;
    let plan = sluice_cli::plan(&pipeline)?;
    let root = dir.join("lake");
    let view_dir = root.join("user_activity");
    let marker = dir.join(format!("lake-{}-{}.done", a.rows, a.keys));
    if !marker.exists() {
        let _ = std::fs::remove_dir_all(&root);
        let t = Instant::now();
        write_lake(&plan, &root, a.rows, a.keys)?;
        std::fs::write(&marker, "")?;
        println!(
            "lake: {} rows written in {:.1} s",
            a.rows,
            t.elapsed().as_secs_f64()
        );
    }
    let days = std::fs::read_dir(&view_dir)?.count();
    println!(
        "lake: {} rows, {days} day folders, {:.0} MiB",
        a.rows,
        crate::backfill::mib(&view_dir)
    );
    let view = plan.view("user_activity").context("view")?;
    let lake = |from: Option<i64>, to: Option<i64>| StatsInput::Lake {
        dir: view_dir.clone(),
        from,
        to,
    };
    let mid = T0 + (a.rows / a.keys / 2) as i64 * 300_000;
    let cases = [
        ("whole lake", lake(None, None), false, None),
        ("by day", lake(None, None), true, None),
        (
            "second half against the first (PSI)",
            lake(Some(mid), None),
            false,
            Some(lake(None, Some(mid))),
        ),
    ];
    println!(
        "\n{:<40} {:>10} {:>9} {:>14}",
        "sluice stats", "rows", "seconds", "rows/s"
    );
    let mut sluice_secs = Vec::new();
    for (name, input, by_day, reference) in cases {
        let req = StatsRequest {
            features: Vec::new(),
            input,
            by_day,
            reference,
            threads,
        };
        let t = Instant::now();
        let r = feature_stats(view, &req)?;
        let secs = t.elapsed().as_secs_f64();
        let rows: u64 = r.groups.iter().map(|g| g.rows).sum::<u64>()
            + r.reference.as_ref().map_or(0, |(_, g)| g.rows);
        if rows == 0 {
            bail!("{name}: no rows");
        }
        println!(
            "{name:<40} {rows:>10} {secs:>9.2} {:>14.0}",
            rows as f64 / secs
        );
        sluice_secs.push(secs);
    }
    if a.no_duckdb {
        return Ok(());
    }
    let py = a
        .python
        .clone()
        .unwrap_or_else(crate::backfill::default_python);
    let script = crate::scripts::write(&dir, crate::scripts::DUCKDB_STATS)?;
    let out = std::process::Command::new(&py)
        .arg(&script)
        .arg(&view_dir)
        .args(FEATURES)
        .output()
        .context("running DuckDB")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "DuckDB failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or("{}"))
        .with_context(|| format!("DuckDB output: {stdout}"))?;
    let duck = [v["seconds"].as_f64(), v["seconds_by_day"].as_f64()];
    println!("\nbaseline: DuckDB, the same aggregates over the same files (approx_quantile)");
    for ((name, d), s) in ["whole lake", "by day"].iter().zip(duck).zip(&sluice_secs) {
        let d = d.unwrap_or(f64::NAN);
        println!(
            "{name:<40} DuckDB {d:>6.2} s   sluice {s:>6.2} s   sluice/DuckDB {:.2}x",
            s / d
        );
    }
    Ok(())
}
