//! `sluice-bench backfill`: backfill and training-set figures against DuckDB,
//! measured in one run on the same files.
//!
//! 1. Backfill of the quickstart HOP(5 min, 1 h) view over N events in one
//!    Parquet file, into the Parquet lake, vs DuckDB computing the same
//!    windows the usual way (time_bucket + unnest(range(12))) from the same
//!    file into Parquet.
//! 2. Training set: M spine rows joined with F feature rows of that view's
//!    lake (100k keys, a row per key per window), vs DuckDB's ASOF LEFT JOIN.
//! 3. The default training set: M spine rows over the N events of part 1,
//!    replayed (what an online read at each spine time returns), vs DuckDB
//!    computing the same sawtooth values with a range join.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use arrow::array::{
    ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray,
    UInt64Array,
};
use arrow::datatypes::DataType;
use sluice_engine::output::emitted_schema;

use crate::peak_rss_mib;
use sluice_cli::commands::backfill::BackfillArgs;
use sluice_cli::commands::generate::{self, BASE_TS, Rng};

/// Options of `sluice-bench backfill`.
#[derive(clap::Args, Debug)]
pub struct BenchBackfillArgs {
    /// Events in the backfill input.
    #[arg(long, default_value_t = 10_000_000)]
    events: u64,
    /// Distinct keys.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Event-time span of the events, in minutes.
    #[arg(long, default_value_t = 240)]
    minutes: u64,
    /// Spine rows of the training-set join.
    #[arg(long, default_value_t = 1_000_000)]
    spine_rows: u64,
    /// Feature rows of the training-set join.
    #[arg(long, default_value_t = 10_000_000)]
    feature_rows: u64,
    /// Working directory (inputs are kept and reused between runs).
    #[arg(long, default_value = "sluice-bench-backfill")]
    dir: PathBuf,
    /// Python with `duckdb` (default: the venv `.ci/run` makes).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Skip DuckDB.
    #[arg(long)]
    no_duckdb: bool,
}

/// Size of a file or of the files under a folder, MiB.
pub(crate) fn mib(p: &Path) -> f64 {
    let bytes = match std::fs::metadata(p) {
        Ok(m) if m.is_file() => m.len(),
        _ => sluice_engine::store::dir_size(p),
    };
    bytes as f64 / (1024.0 * 1024.0)
}

struct Duck {
    seconds: f64,
    rows: u64,
    max_rss_mib: f64,
}

/// Runs the DuckDB script; it reports its own time and peak RSS.
fn duckdb(dir: &Path, py: &Path, args: &[String]) -> anyhow::Result<Duck> {
    let script = crate::scripts::write(dir, crate::scripts::DUCKDB_BACKFILL)?;
    let out = std::process::Command::new(py)
        .arg(&script)
        .args(args)
        .output()
        .context("running DuckDB")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("DuckDB failed: {stdout}{stderr}");
    }
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or("{}"))
        .with_context(|| format!("DuckDB output: {stdout}"))?;
    Ok(Duck {
        seconds: v["seconds"].as_f64().unwrap_or(f64::NAN),
        rows: v["rows"].as_u64().unwrap_or(0),
        max_rss_mib: v["max_rss_mib"].as_f64().unwrap_or(0.0),
    })
}

pub(crate) fn default_python() -> PathBuf {
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/sluice/venv/bin/python"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// Runs the benchmark.
pub fn run(a: &BenchBackfillArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.dir)?;
    let dir = a.dir.canonicalize()?;
    let py = a.python.clone().unwrap_or_else(default_python);
    println!(
        "sluice-bench backfill ({} build), {} cores",
        if cfg!(debug_assertions) {
            "debug (use --release!)"
        } else {
            "release"
        },
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );

    // Inputs, kept between runs.
    let events = dir.join(format!(
        "events-{}-{}-{}.parquet",
        a.events, a.keys, a.minutes
    ));
    if !events.exists() {
        let t = Instant::now();
        let tmp = dir.join("events.tmp.parquet");
        generate::run(&generate::GenArgs::new(
            a.events,
            a.keys,
            a.minutes,
            tmp.clone(),
        ))?;
        std::fs::rename(&tmp, &events)?;
        println!(
            "  generated {} ({:.0} MiB) in {:.1}s",
            events.display(),
            mib(&events),
            t.elapsed().as_secs_f64()
        );
    }
    let pipeline = dir.join("pipeline.sql");
    std::fs::write(
        &pipeline,
        sluice_cli::QUICKSTART_SQL.replace(
            "WITH (online = true, offline = 'lake')",
            "WITH (offline = 'lake')",
        ),
    )?;

    // 1. Backfill vs DuckDB.
    println!(
        "\n1. backfill of user_activity (HOP 5 min / 1 h; COUNT, SUM, AVG, APPROX_DISTINCT) over {} events, {} keys, {} min, Parquet input ({:.0} MiB)",
        a.events,
        a.keys,
        a.minutes,
        mib(&events)
    );
    let lake = dir.join("lake");
    if lake.exists() {
        std::fs::remove_dir_all(&lake)?;
    }
    let args = BackfillArgs {
        pipeline: pipeline.clone(),
        sources: vec![format!("clicks={}", events.display())],
        from: None,
        to: None,
        state_dir: dir.join("state"),
        online: false,
        include_late: false,
        replace: true,
        threads: None,
        batch_rows: 8192,
        dead_letter_limit: sluice_engine::DEFAULT_DEAD_LETTER_LIMIT,
        quiet: true,
    };
    let t = Instant::now();
    let stats = sluice_cli::commands::backfill::run(&args)?;
    let ours = t.elapsed().as_secs_f64();
    let rows: u64 = stats.views.iter().map(|v| v.rows).sum();
    println!(
        "  sluice backfill: {ours:.2} s = {:.0} events/s, {rows} window rows, lake {:.0} MiB, peak RSS {:.0} MiB",
        a.events as f64 / ours,
        mib(&lake),
        peak_rss_mib()
    );
    if !a.no_duckdb {
        let out = dir.join("duckdb_hop.parquet");
        let d = duckdb(
            &dir,
            &py,
            &[
                "hop".into(),
                events.display().to_string(),
                out.display().to_string(),
                "5000".into(),
            ],
        )?;
        println!(
            "  DuckDB time_bucket + unnest(range(12)): {:.2} s = {:.0} events/s, {} window rows, peak RSS {:.0} MiB",
            d.seconds,
            a.events as f64 / d.seconds,
            d.rows,
            d.max_rss_mib
        );
        println!(
            "  ratio DuckDB / sluice: {:.2}x{}",
            d.seconds / ours,
            if d.rows == rows {
                ""
            } else {
                "  (row counts differ!)"
            }
        );
    }

    // 2. Training set vs DuckDB ASOF JOIN.
    println!(
        "\n2. training set: {} spine rows x {} feature rows of user_activity ({} keys)",
        a.spine_rows, a.feature_rows, a.keys
    );
    let flake = dir.join(format!("feature-lake-{}-{}", a.feature_rows, a.keys));
    let spine = dir.join(format!("spine-{}-{}.parquet", a.spine_rows, a.keys));
    let plan = sluice_cli::plan(&pipeline)?;
    let view = plan
        .view("user_activity")
        .context("quickstart view user_activity")?;
    let windows = a.feature_rows.div_ceil(a.keys.max(1));
    let slide = 5 * 60_000i64;
    if !flake.exists() {
        let t = Instant::now();
        write_feature_lake(&flake, view, a.keys, windows, slide)?;
        println!(
            "  wrote {} ({:.0} MiB) in {:.1}s",
            flake.display(),
            mib(&flake),
            t.elapsed().as_secs_f64()
        );
    }
    if !spine.exists() {
        write_spine(&spine, a.spine_rows, a.keys, windows, slide)?;
    }
    let out = dir.join("training_set.parquet");
    let req = sluice_connectors::training::TrainingSetRequest {
        spine: spine.clone(),
        features: vec![
            "user_activity"
                .parse()
                .map_err(|e: String| anyhow::anyhow!(e))?,
        ],
        keys: Default::default(),
        time_column: Some("ts".into()),
        out: out.clone(),
        // This benchmark measures the lake join of closed windows.
        closed_windows: true,
        sources: Default::default(),
        dead_letters: dir.join("training_dead_letters.jsonl"),
        archive_writers: Default::default(),
    };
    // The lake of the synthetic view.
    let mut p2 = plan.clone();
    for v in p2.views.iter_mut() {
        v.offline = Some(flake.clone());
    }
    let t = Instant::now();
    let st = sluice_connectors::training::training_set(&p2, &req)?;
    let ours = t.elapsed().as_secs_f64();
    let v = &st.views[0];
    println!(
        "  sluice training-set: {ours:.2} s, {} rows out ({} found, {} empty windows, {} NULL), read {} lake rows from {} files",
        st.rows, v.found, v.empty, v.null, v.lake_rows, v.files
    );
    if !a.no_duckdb {
        let dout = dir.join("duckdb_asof.parquet");
        let d = duckdb(
            &dir,
            &py,
            &[
                "asof".into(),
                spine.display().to_string(),
                format!("{}/user_activity/**/*.parquet", flake.display()),
                dout.display().to_string(),
            ],
        )?;
        println!(
            "  DuckDB ASOF LEFT JOIN: {:.2} s, {} rows out, peak RSS {:.0} MiB",
            d.seconds, d.rows, d.max_rss_mib
        );
        println!("  ratio DuckDB / sluice: {:.2}x", d.seconds / ours);
    }
    replayed_training_set(a, &dir, &py, &pipeline, &events)?;
    println!(
        "\npeak RSS of this process (all sluice parts): {:.0} MiB",
        peak_rss_mib()
    );
    Ok(())
}

/// Part 3, the default training set: the spine's values as online reads at
/// each spine time, replayed from the backfill's events, against DuckDB
/// computing the same sawtooth values with SQL over the same file.
fn replayed_training_set(
    a: &BenchBackfillArgs,
    dir: &Path,
    py: &Path,
    pipeline: &Path,
    events: &Path,
) -> anyhow::Result<()> {
    println!(
        "\n3. training set replayed from history: {} spine rows over the {} events of part 1",
        a.spine_rows, a.events
    );
    let spine = dir.join(format!(
        "spine-replay-{}-{}-{}.parquet",
        a.spine_rows, a.keys, a.minutes
    ));
    if !spine.exists() {
        let slide = 5 * 60_000i64;
        write_spine(&spine, a.spine_rows, a.keys, a.minutes / 5, slide)?;
    }
    let plan = sluice_cli::plan(pipeline)?;
    let out = dir.join("training_set_replayed.parquet");
    let req = sluice_connectors::training::TrainingSetRequest {
        spine: spine.clone(),
        features: vec![
            "user_activity:clicks_1h,spend_1h,avg_price_1h"
                .parse()
                .map_err(|e: String| anyhow::anyhow!(e))?,
        ],
        keys: Default::default(),
        time_column: Some("ts".into()),
        out: out.clone(),
        closed_windows: false,
        sources: [(
            "clicks".to_string(),
            sluice_connectors::expand_paths(&events.display().to_string())?,
        )]
        .into_iter()
        .collect(),
        dead_letters: dir.join("training_replay_dead_letters.jsonl"),
        archive_writers: Default::default(),
    };
    let t = Instant::now();
    let st = sluice_connectors::training::training_set(&plan, &req)?;
    let ours = t.elapsed().as_secs_f64();
    let v = &st.views[0];
    let r = st.replays.first().cloned().unwrap_or_default();
    println!(
        "  sluice training-set (replay): {ours:.2} s, {} rows out ({} found, {} NULL, {} beyond the history), {} events replayed ({} late), {} clocks, peak RSS {:.0} MiB",
        st.rows,
        v.found,
        v.null,
        v.beyond,
        r.events,
        r.late,
        r.flushes,
        peak_rss_mib()
    );
    if a.no_duckdb {
        return Ok(());
    }
    let dout = dir.join("duckdb_sawtooth.parquet");
    let d = duckdb(
        dir,
        py,
        &[
            "sawtooth".into(),
            events.display().to_string(),
            spine.display().to_string(),
            dout.display().to_string(),
            "5000".into(),
        ],
    )?;
    println!(
        "  DuckDB range join (sawtooth formula in SQL): {:.2} s, {} rows out, peak RSS {:.0} MiB",
        d.seconds, d.rows, d.max_rss_mib
    );
    println!("  ratio DuckDB / sluice: {:.2}x", d.seconds / ours);
    // Same values, row for row.
    let ours = sluice_connectors::training::read_table(&out, None)?;
    let theirs = sluice_connectors::training::read_table(&dout, None)?;
    let col = |b: &RecordBatch, n: &str| -> anyhow::Result<Vec<Option<f64>>> {
        let c = b.column_by_name(n).with_context(|| format!("column {n}"))?;
        let c = arrow::compute::cast(c, &DataType::Float64)?;
        let c = c
            .as_any()
            .downcast_ref::<Float64Array>()
            .context("f64")?
            .clone();
        Ok(c.iter().collect())
    };
    let mut differ = 0usize;
    for (mine, duck) in [
        ("user_activity__clicks_1h", "clicks_1h"),
        ("user_activity__spend_1h", "spend_1h"),
    ] {
        let (x, y) = (col(&ours, mine)?, col(&theirs, duck)?);
        differ += x
            .iter()
            .zip(&y)
            .filter(|(p, q)| match (p, q) {
                (Some(p), Some(q)) => (p - q).abs() > 1e-6 * p.abs().max(1.0),
                (p, q) => p.is_some() != q.is_some(),
            })
            .count();
    }
    println!(
        "  values compared with DuckDB's: {} of {} differ",
        differ,
        2 * ours.num_rows()
    );
    Ok(())
}

/// A lake of `keys × windows` rows of the view (a row per key per window
/// end), shaped like what a backfill writes: one file per 1M rows, by day.
fn write_feature_lake(
    root: &Path,
    view: &sluice_sql::ViewPlan,
    keys: u64,
    windows: u64,
    slide: i64,
) -> anyhow::Result<()> {
    let schema = emitted_schema(&view.output_schema);
    let mut lake = sluice_connectors::LakeWriter::new(root, &view.name, Arc::clone(&schema));
    let mut rng = Rng::new(7);
    let start = BASE_TS + slide;
    let chunk = 1_000_000u64;
    let mut pending: Vec<(i64, u64)> = Vec::new();
    let mut epoch = 0;
    let flush = |pending: &mut Vec<(i64, u64)>,
                 epoch: &mut u64,
                 lake: &mut sluice_connectors::LakeWriter,
                 rng: &mut Rng|
     -> anyhow::Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let n = pending.len();
        let ends: Vec<i64> = pending.iter().map(|p| p.0).collect();
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(
                TimestampMillisecondArray::from(
                    ends.iter().map(|e| e - 3_600_000).collect::<Vec<_>>(),
                )
                .with_timezone("UTC"),
            ),
            Arc::new(TimestampMillisecondArray::from(ends).with_timezone("UTC")),
        ];
        for f in schema.fields().iter().skip(2) {
            let col: ArrayRef = match f.data_type() {
                DataType::Utf8 => Arc::new(StringArray::from_iter_values(
                    pending.iter().map(|p| format!("u{:05}", p.1)),
                )),
                DataType::Int64 => Arc::new(Int64Array::from_iter_values(
                    (0..n).map(|_| 1 + rng.below(50) as i64),
                )),
                DataType::UInt64 => Arc::new(UInt64Array::from_iter_values(
                    (0..n).map(|_| 1 + rng.below(40)),
                )),
                DataType::Float64 => Arc::new(Float64Array::from_iter_values(
                    (0..n).map(|_| rng.below(100_000) as f64 / 100.0),
                )),
                other => bail!("bench lake: no generator for {other}"),
            };
            cols.push(col);
        }
        let b = RecordBatch::try_new(Arc::clone(&schema), cols)?;
        *epoch += 1;
        sluice_engine::OfflineSink::write_epoch(lake, *epoch, &[b])?;
        pending.clear();
        Ok(())
    };
    for w in 0..windows {
        for k in 0..keys {
            pending.push((start + w as i64 * slide, k));
            if pending.len() as u64 >= chunk {
                flush(&mut pending, &mut epoch, &mut lake, &mut rng)?;
            }
        }
    }
    flush(&mut pending, &mut epoch, &mut lake, &mut rng)?;
    Ok(())
}

/// Spine rows: random known keys (1% unknown), times uniformly over the
/// lake's span (ms resolution), a label.
fn write_spine(path: &Path, rows: u64, keys: u64, windows: u64, slide: i64) -> anyhow::Result<()> {
    let mut rng = Rng::new(99);
    let span = windows as i64 * slide;
    let mut users = Vec::with_capacity(rows as usize);
    let mut ts = Vec::with_capacity(rows as usize);
    let mut labels = Vec::with_capacity(rows as usize);
    for _ in 0..rows {
        let k = rng.below(keys + keys / 100);
        users.push(format!("u{k:05}"));
        ts.push(BASE_TS + rng.below(span as u64 + 2 * slide as u64) as i64);
        labels.push(rng.below(2) as i64);
    }
    let schema = Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("user_id", DataType::Utf8, false),
        arrow::datatypes::Field::new(
            "ts",
            DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
        arrow::datatypes::Field::new("label", DataType::Int64, false),
    ]));
    let b = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(users)),
            Arc::new(TimestampMillisecondArray::from(ts).with_timezone("UTC")),
            Arc::new(Int64Array::from(labels)),
        ],
    )?;
    sluice_connectors::training::write_table(path, &b)?;
    Ok(())
}
