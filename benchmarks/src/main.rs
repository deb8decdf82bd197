//! `sluice-bench`: whole-system benchmarks of Sluice against their baselines
//! (Apache Flink SQL, DuckDB, a count-only Kafka consumer, an exact vector
//! scan), each measured in the same run. Run by hand on a release build,
//! never in CI; see `docs/benchmarks.md`.

mod backfill;
mod hop;
mod kafka;
mod quality;
mod scripts;
mod serve;
mod stats;
mod tiles;
mod vectors;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

/// Benchmarks of Sluice, each printing its baseline measured in the same run.
#[derive(Parser)]
#[command(name = "sluice-bench", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The quickstart HOP(5 min, 1 h) view: engine, whole `run`, state size, GET latency; Flink optional.
    Hop(hop::BenchArgs),
    /// Backfill and training-set joins against DuckDB.
    Backfill(backfill::BenchBackfillArgs),
    /// The vector index: update rate, query latency and recall against an exact scan.
    Vectors(vectors::BenchVectorsArgs),
    /// The quickstart view fed from Kafka against a count-only consumer; restart time.
    Kafka(kafka::BenchKafkaArgs),
    /// `sluice stats` over a generated lake against DuckDB's same aggregates.
    Stats(stats::BenchStatsArgs),
    /// Tiled views: sparse daily and dense hourly runs, a memory budget, GET latency, freshness.
    Tiles(tiles::BenchTilesArgs),
    /// The cost of log_served, CHECK and expect rules under a read load, against the run without.
    Quality(quality::BenchQualityArgs),
    /// GET latency at a fixed rate with the serving limits against without; the time to refuse a filter bomb and a flood.
    Serve(serve::BenchServeArgs),
}

fn main() {
    sluice_cli::init_tracing("warn");
    let r = match Cli::parse().cmd {
        Cmd::Hop(a) => hop::run(&a),
        Cmd::Backfill(a) => backfill::run(&a),
        Cmd::Vectors(a) => vectors::run(&a),
        Cmd::Kafka(a) => kafka::run(&a),
        Cmd::Tiles(a) => tiles::run(&a),
        Cmd::Stats(a) => stats::run(&a),
        Cmd::Quality(a) => quality::run(&a),
        Cmd::Serve(a) => serve::run(&a),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Serves `live` with the engine's server on 127.0.0.1 (a free port), with
/// `limits`, from a runtime of two async threads (as `sluice run` on this
/// machine); returns the runtime (the server stops with it) and the address.
pub(crate) fn serve_local(
    live: std::sync::Arc<sluice_engine::Live>,
    limits: sluice_engine::server::ServeLimits,
) -> anyhow::Result<(tokio::runtime::Runtime, String)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let bound = listener.local_addr()?;
    let state = sluice_engine::server::ServeState::new(live, None, None, limits, bound);
    rt.spawn(sluice_engine::server::serve(listener, state));
    Ok((rt, bound.to_string()))
}

/// The job `sluice run` makes of `dir/pipeline.sql`: its sources (Kafka
/// ones bounded with `stop_at_end`), lakes and dead-letter file, state in
/// `dir/state`, a checkpoint every `interval`.
pub(crate) fn open_run_job(
    dir: &Path,
    interval: std::time::Duration,
    stop_at_end: bool,
) -> anyhow::Result<(sluice_sql::PipelinePlan, sluice_engine::job::Job)> {
    open_run_job_with(
        dir,
        interval,
        stop_at_end,
        sluice_engine::job::default_workers(),
    )
}

/// [`open_run_job`] on `workers` worker threads.
pub(crate) fn open_run_job_with(
    dir: &Path,
    interval: std::time::Duration,
    stop_at_end: bool,
    workers: usize,
) -> anyhow::Result<(sluice_sql::PipelinePlan, sluice_engine::job::Job)> {
    let plan = sluice_cli::plan(&dir.join("pipeline.sql"))?;
    let state = dir.join("state");
    let mut opts = sluice_engine::job::JobOptions::new(state.clone());
    opts.checkpoint_interval = interval;
    opts.workers = workers;
    let job = sluice_engine::job::Job::open(
        &plan,
        sluice_connectors::build_sources_with(&plan, stop_at_end)?,
        sluice_connectors::build_lakes(&plan)?,
        Box::new(sluice_connectors::dead_letters(&state, &plan)?),
        opts,
    )?;
    Ok((plan, job))
}

/// CPU seconds (user + system) a process has used so far (`pid`, or
/// `self`), from /proc.
pub(crate) fn cpu_secs(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces).
            let rest = s.rsplit_once(") ")?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ut: f64 = f.get(11)?.parse().ok()?;
            let st: f64 = f.get(12)?.parse().ok()?;
            Some((ut + st) / 100.0)
        })
        .unwrap_or(0.0)
}

/// Peak resident set size of this process (VmHWM), MiB.
pub(crate) fn peak_rss_mib() -> f64 {
    vm_hwm_mib("/proc/self/status").unwrap_or(0.0)
}

/// The `VmHWM` (peak RSS, MiB) of a `/proc/<pid>/status` file.
pub(crate) fn vm_hwm_mib(status: &str) -> Option<f64> {
    std::fs::read_to_string(status).ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
    })
}

/// Empties (or creates) a working directory.
pub(crate) fn fresh(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    Ok(())
}

/// The `sluice` binary the benchmarks start as a child process: `$SLUICE_BIN`,
/// or the `sluice` built beside this binary (`cargo build --release -p sluice
/// -p sluice-benchmarks`).
pub(crate) fn sluice_exe() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("SLUICE_BIN") {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe()?;
    let beside = me.with_file_name("sluice");
    if beside.exists() {
        Ok(beside)
    } else {
        anyhow::bail!(
            "no `sluice` binary beside {}: build it with `cargo build --release -p sluice`, or set SLUICE_BIN",
            me.display()
        )
    }
}
