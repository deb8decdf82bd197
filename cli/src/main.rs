//! The `sluice` command: wires the SQL front end, the engine and the
//! connectors together.

mod backfill;
mod bench;
mod bench_backfill;
mod bench_kafka;
mod bench_vectors;
mod generate;
mod nearest;
mod produce;
mod recsys;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sluice_engine::job::{Job, JobOptions, Live};
use sluice_engine::online::{read_feature, read_view_meta, watermark_key};
use sluice_engine::server::{ServeState, router};
use sluice_engine::store::Store;

/// Streaming feature pipelines: SQL feature views over event streams, served online and written to a Parquet lake.
#[derive(Parser)]
#[command(name = "sluice", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a pipeline: consume its sources, maintain its feature views, checkpoint, serve.
    Run(RunArgs),
    /// Run the pipeline's feature views over bounded history (files) into the lake.
    Backfill(backfill::BackfillArgs),
    /// Build a training set: spine rows joined with feature values as of each row's time.
    TrainingSet(TrainingSetArgs),
    /// Print the streaming plan of a pipeline file.
    Explain {
        /// The pipeline file.
        pipeline: PathBuf,
    },
    /// Read a key's features from a state dir's online store.
    Get {
        /// Feature view.
        view: String,
        /// Entity key (multi-column keys joined by `|`).
        key: String,
        /// State directory of the pipeline.
        #[arg(long, default_value = "sluice-state")]
        state_dir: PathBuf,
    },
    /// Nearest neighbours in a view's vector index (`vector_index`), from a state dir.
    Nearest(nearest::NearestArgs),
    /// Generate click events as JSON lines (for the quickstart and benchmarks).
    Gen(generate::GenArgs),
    /// Generate the recsys example's item embeddings and clicks (see examples/recsys).
    GenRecsys(recsys::RecsysArgs),
    /// Write a clickstream to a Kafka topic at a chosen rate, keyed by user.
    Produce(produce::ProduceArgs),
    /// Embedded end-to-end demo: generate events, run the quickstart pipeline, serve features.
    Demo {
        /// Working directory for events, state and lake.
        #[arg(long, default_value = "sluice-demo")]
        dir: PathBuf,
        /// Number of events to generate.
        #[arg(long, default_value_t = 200_000)]
        events: u64,
        /// Address to serve on; `none` to exit after the run.
        #[arg(long, default_value = "127.0.0.1:8080")]
        serve: String,
    },
    /// Benchmark the quickstart view (run by hand with --release; see README).
    Bench(bench::BenchArgs),
    /// Benchmark backfill and training-set joins against DuckDB (see README).
    BenchBackfill(bench_backfill::BenchBackfillArgs),
    /// Benchmark the vector index: update rate, query latency and recall vs exact scan (see README).
    BenchVectors(bench_vectors::BenchVectorsArgs),
    /// Benchmark the quickstart view fed from Kafka against a count-only consumer (see README).
    BenchKafka(bench_kafka::BenchKafkaArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// The pipeline file.
    pipeline: PathBuf,
    /// State directory (RocksDB, dead letters).
    #[arg(long, default_value = "sluice-state")]
    state_dir: PathBuf,
    /// Serve the online store on this address (e.g. 127.0.0.1:8080) and keep serving after the sources end.
    #[arg(long)]
    serve: Option<SocketAddr>,
    /// File holding a bearer token the serving API requires.
    #[arg(long)]
    auth_token_file: Option<PathBuf>,
    /// Milliseconds between checkpoints.
    #[arg(long, default_value_t = 1000)]
    checkpoint_interval_ms: u64,
    /// Rows per source poll.
    #[arg(long, default_value_t = 8192)]
    batch_rows: usize,
    /// Read Kafka sources up to the offsets current at start, then stop
    /// (a catch-up run); without it a Kafka source runs until interrupted.
    #[arg(long)]
    stop_at_end: bool,
    /// Sleep after every batch (for tests that need a long-running job).
    #[arg(long, hide = true)]
    throttle_ms: Option<u64>,
}

#[derive(clap::Args)]
struct TrainingSetArgs {
    /// The pipeline file (it says where each view's lake is).
    pipeline: PathBuf,
    /// Spine: entity keys, a timestamp and labels (.parquet, .csv or .jsonl).
    #[arg(long)]
    spine: PathBuf,
    /// A view and optionally its columns: `VIEW` or `VIEW:COL,COL`. Repeat for more views.
    #[arg(long = "features", value_name = "VIEW[:COL,…]", required = true)]
    features: Vec<sluice_connectors::training::FeatureRequest>,
    /// Output file (.parquet, .csv or .jsonl); feature columns are named `VIEW__COL`.
    #[arg(long)]
    out: PathBuf,
    /// A view key column read from a differently named spine column: `VIEWCOL=SPINECOL`.
    #[arg(long = "key", value_name = "VIEWCOL=SPINECOL")]
    keys: Vec<String>,
    /// The spine's time column (default: its only timestamp column).
    #[arg(long)]
    time_column: Option<String>,
}

fn training_set(a: &TrainingSetArgs) -> anyhow::Result<()> {
    let p = plan(&a.pipeline)?;
    let mut keys = HashMap::new();
    for k in &a.keys {
        let Some((v, s)) = k.split_once('=') else {
            bail!("--key `{k}`: expected VIEWCOL=SPINECOL");
        };
        keys.insert(v.to_string(), s.to_string());
    }
    let req = sluice_connectors::training::TrainingSetRequest {
        spine: a.spine.clone(),
        features: a.features.clone(),
        keys,
        time_column: a.time_column.clone(),
        out: a.out.clone(),
    };
    let t0 = std::time::Instant::now();
    let stats = sluice_connectors::training::training_set(&p, &req)?;
    eprintln!(
        "training set: {} rows -> {} in {:.2} s",
        stats.rows,
        a.out.display(),
        t0.elapsed().as_secs_f64()
    );
    for v in &stats.views {
        eprintln!(
            "  {}: {} lake rows from {} files; {} rows found, {} empty windows, {} NULL (no key, or a time outside the lake)",
            v.view, v.lake_rows, v.files, v.found, v.empty, v.null
        );
    }
    Ok(())
}

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => run(a),
        Cmd::Backfill(a) => backfill::run(&a).map(|_| ()),
        Cmd::TrainingSet(a) => training_set(&a),
        Cmd::Explain { pipeline } => explain(&pipeline),
        Cmd::Get {
            view,
            key,
            state_dir,
        } => get(&state_dir, &view, &key),
        Cmd::Nearest(a) => nearest::run(&a),
        Cmd::Gen(a) => generate::run(&a),
        Cmd::GenRecsys(a) => recsys::run(&a),
        Cmd::Produce(a) => produce::run(&a).map(|_| ()),
        Cmd::Demo { dir, events, serve } => demo(&dir, events, &serve),
        Cmd::Bench(a) => bench::run(&a),
        Cmd::BenchKafka(a) => bench_kafka::run(&a),
        Cmd::BenchBackfill(a) => bench_backfill::run(&a),
        Cmd::BenchVectors(a) => bench_vectors::run(&a),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn plan(path: &Path) -> anyhow::Result<sluice_sql::PipelinePlan> {
    sluice_sql::plan_file(path).map_err(|e| anyhow::anyhow!("{e}"))
}

fn explain(path: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    let text = plan(path)?.to_string();
    // A closed pipe (`sluice explain p.sql | head`) is not an error.
    let _ = std::io::stdout().write_all(text.as_bytes());
    Ok(())
}

/// A state dir's online store opened for reading `view`, with the view's
/// metadata and committed watermark.
pub(crate) fn open_view(
    state_dir: &Path,
    view: &str,
) -> anyhow::Result<(Store, sluice_engine::online::ViewMeta, Option<i64>)> {
    let store = Store::open_read_only(state_dir)?;
    let Some(meta) = read_view_meta(&store, view)? else {
        bail!("no feature view `{view}` in {}", state_dir.display());
    };
    let wm = store
        .meta_i64(&watermark_key(&meta.source))?
        .filter(|w| *w != sluice_engine::job::NO_WATERMARK);
    Ok((store, meta, wm))
}

fn get(state_dir: &Path, view: &str, key: &str) -> anyhow::Result<()> {
    let (store, meta, wm) = open_view(state_dir, view)?;
    match read_feature(&store, &meta, key, wm)? {
        Some(v) => {
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        None => bail!("key `{key}` not found in view `{view}`"),
    }
}

/// Installs the Prometheus recorder (once per process).
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let h = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
            ],
        )?
        .install_recorder()?;
    sluice_engine::metrics_names::describe();
    Ok(h)
}

fn run(a: RunArgs) -> anyhow::Result<()> {
    let p = plan(&a.pipeline)?;
    let handle = install_metrics()?;
    let token = match &a.auth_token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading {}", f.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let opts = JobOptions {
        state_dir: a.state_dir.clone(),
        checkpoint_interval: Duration::from_millis(a.checkpoint_interval_ms),
        batch_rows: a.batch_rows.max(1),
        throttle: a.throttle_ms.map(Duration::from_millis),
    };
    let sources = sluice_connectors::build_sources_with(&p, a.stop_at_end)?;
    run_job(&p, sources, opts, a.serve, token, Some(handle))
}

fn run_job(
    p: &sluice_sql::PipelinePlan,
    sources: Vec<Box<dyn sluice_engine::Source>>,
    opts: JobOptions,
    serve: Option<SocketAddr>,
    token: Option<String>,
    handle: Option<PrometheusHandle>,
) -> anyhow::Result<()> {
    let lakes: HashMap<_, _> = sluice_connectors::build_lakes(p)?;
    let dead = Box::new(sluice_connectors::dead_letters(&opts.state_dir, p)?);
    let state_dir = opts.state_dir.clone();
    let mut job = Job::open(p, sources, lakes, dead, opts)?;
    let stop = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    {
        let stop = Arc::clone(&stop);
        rt.spawn(async move {
            shutdown_signal().await;
            stop.store(true, Ordering::SeqCst);
        });
    }
    if let Some(addr) = serve {
        start_server(&rt, addr, job.live(), token, handle)?;
    }
    tracing::info!(epoch = job.epoch(), state_dir = %state_dir.display(), "pipeline started");
    let stats = job.run(&stop)?;
    let rate = stats.events as f64 / stats.elapsed.as_secs_f64().max(1e-9);
    tracing::info!(
        events = stats.events,
        dead_letters = stats.dead_letters,
        rows_emitted = stats.rows_emitted,
        checkpoints = stats.checkpoints,
        secs = format!("{:.2}", stats.elapsed.as_secs_f64()),
        events_per_sec = format!("{rate:.0}"),
        "sources done; final checkpoint committed"
    );
    if serve.is_some() && !stop.load(Ordering::SeqCst) {
        eprintln!("sources done; still serving (Ctrl-C to stop)");
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

fn start_server(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    live: Arc<Live>,
    token: Option<String>,
    handle: Option<PrometheusHandle>,
) -> anyhow::Result<()> {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(addr))
        .with_context(|| format!("binding {addr}"))?;
    let bound = listener.local_addr()?;
    let app = router(ServeState {
        live,
        metrics: handle,
        token: token.map(Arc::from),
    });
    rt.spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("server stopped: {e}");
        }
    });
    eprintln!("serving on http://{bound}");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// The quickstart pipeline, embedded so `sluice demo` runs anywhere.
pub const QUICKSTART_SQL: &str = include_str!("../../examples/quickstart/pipeline.sql");

fn demo(dir: &Path, events: u64, serve: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let pipeline = dir.join("pipeline.sql");
    std::fs::write(&pipeline, QUICKSTART_SQL)?;
    let events_path = dir.join("events.jsonl");
    let state = dir.join("state");
    let lake = dir.join("lake");
    for d in [&state, &lake] {
        if d.exists() {
            std::fs::remove_dir_all(d)?;
        }
    }
    let g = generate::GenArgs::new(events, 1000, 180, events_path.clone());
    generate::run(&g)?;
    eprintln!("generated {events} events into {}", events_path.display());
    let p = plan(&pipeline)?;
    let handle = install_metrics()?;
    let serve_addr = if serve == "none" {
        None
    } else {
        Some(
            serve
                .parse::<SocketAddr>()
                .with_context(|| format!("--serve {serve}"))?,
        )
    };
    if let Some(a) = serve_addr {
        eprintln!("try: curl http://{a}/v1/features/user_activity/u00042");
    }
    run_job(
        &p,
        sluice_connectors::build_sources(&p)?,
        JobOptions::new(state.clone()),
        serve_addr,
        None,
        Some(handle),
    )?;
    eprintln!("lake: {}  state: {}", lake.display(), state.display());
    eprintln!(
        "read a key: sluice get user_activity u00042 --state-dir {}",
        state.display()
    );
    Ok(())
}
