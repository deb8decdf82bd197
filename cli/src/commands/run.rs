//! `sluice run`: the streaming job, its signal handling and its server.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use sluice_engine::job::{Job, JobOptions, Live};
use sluice_engine::server::{ServeState, router};

/// Options of `sluice run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The pipeline file.
    pub pipeline: PathBuf,
    /// State directory (RocksDB, dead letters).
    #[arg(long, default_value = "sluice-state")]
    pub state_dir: PathBuf,
    /// Serve the online store on this address (e.g. 127.0.0.1:8080) and keep serving after the sources end.
    #[arg(long)]
    pub serve: Option<SocketAddr>,
    /// File holding a bearer token the serving API requires.
    #[arg(long)]
    pub auth_token_file: Option<PathBuf>,
    /// Milliseconds between checkpoints.
    #[arg(long, default_value_t = 1000)]
    pub checkpoint_interval_ms: u64,
    /// Rows per source poll.
    #[arg(long, default_value_t = 8192)]
    pub batch_rows: usize,
    /// Read Kafka sources up to the offsets current at start, then stop
    /// (a catch-up run); without it a Kafka source runs until interrupted.
    #[arg(long)]
    pub stop_at_end: bool,
    /// Memory the job's state may use (`512MiB`, `2GiB`, `1.5GB`, bytes):
    /// cached tiles, rows waiting for the watermark, RocksDB's caches and
    /// memtables. Keys beyond it live only in RocksDB.
    #[arg(long, value_parser = parse_size, default_value = "1GiB")]
    pub memory_budget: u64,
    /// Sleep after every batch (for tests that need a long-running job).
    #[arg(long, hide = true)]
    pub throttle_ms: Option<u64>,
}

/// Runs the pipeline until its sources end (or a signal), serving if asked.
pub fn run(a: RunArgs) -> anyhow::Result<()> {
    let p = crate::plan(&a.pipeline)?;
    let handle = crate::install_metrics()?;
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
        memory_budget: a.memory_budget,
    };
    tracing::info!(
        memory_budget = %format_size(a.memory_budget),
        "state memory budget (--memory-budget)"
    );
    let sources = sluice_connectors::build_sources_with(&p, a.stop_at_end)?;
    run_job(&p, sources, opts, a.serve, token, Some(handle))
}

/// Runs `p` over `sources`: the job, the signal handler and the server.
pub fn run_job(
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
    for sp in &p.sources {
        if let Some(w) = sluice_connectors::archive::archive_writer(sp)? {
            job.set_archive(&sp.name, Box::new(w))?;
        }
    }
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
    let served = ServedFlusher::start(p, &job.live())?;
    let daily = crate::commands::daily_stats::DailyStats::start(p, &job.live())?;
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
    for (view, rule, n) in job.expectation_failures() {
        tracing::info!(view = %view, rule = %rule, failing_rows = n, "expect rule");
    }
    if serve.is_some() && !stop.load(Ordering::SeqCst) {
        eprintln!("sources done; still serving (Ctrl-C to stop)");
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    daily.finish()?;
    served.finish()
}

/// Writes the served-value logs (`log_served`) into the lake every half
/// second, and what is left when the job stops.
pub struct ServedFlusher {
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl ServedFlusher {
    /// Starts the writer thread for the views of `p` that log served reads
    /// (none: no thread).
    pub fn start(p: &sluice_sql::PipelinePlan, live: &Arc<Live>) -> anyhow::Result<Self> {
        let done = Arc::new(AtomicBool::new(false));
        let mut logs = Vec::new();
        for v in &p.views {
            if let Some(log) = live.served.get(&v.name) {
                logs.push((
                    Arc::clone(log),
                    sluice_connectors::served::ServedWriter::new(v)?,
                ));
            }
        }
        if logs.is_empty() {
            return Ok(ServedFlusher { done, thread: None });
        }
        let flag = Arc::clone(&done);
        let thread = std::thread::Builder::new()
            .name("served-log".into())
            .spawn(move || -> anyhow::Result<()> {
                loop {
                    let last = flag.load(Ordering::SeqCst);
                    for (log, w) in &mut logs {
                        let rows = log.drain();
                        if !rows.is_empty()
                            && let Err(e) = w.write(&rows)
                        {
                            // The reads are lost, the serving goes on.
                            tracing::error!("writing the served-value log: {e}");
                        }
                    }
                    if last {
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            })?;
        Ok(ServedFlusher {
            done,
            thread: Some(thread),
        })
    }

    /// Writes what is left and stops the thread.
    pub fn finish(mut self) -> anyhow::Result<()> {
        self.done.store(true, Ordering::SeqCst);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => anyhow::bail!("the served-value log writer panicked"),
            None => Ok(()),
        }
    }
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

/// Parses a byte size: a number with an optional unit (`B`, `KB`, `MB`,
/// `GB` in powers of 1000; `KiB`, `MiB`, `GiB` in powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size such as 512MiB or 2GiB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        u => {
            return Err(format!(
                "unknown size unit `{u}` (use B, KB, MB, GB, KiB, MiB or GiB)"
            ));
        }
    };
    let bytes = n * mult;
    if bytes.is_nan() || bytes < (16u64 << 20) as f64 {
        return Err(format!("`{s}` is below the smallest budget, 16MiB"));
    }
    Ok(bytes as u64)
}

/// A byte size for people: `512MiB`, `1.5GiB`.
pub fn format_size(b: u64) -> String {
    let mib = b as f64 / (1024.0 * 1024.0);
    if mib >= 1024.0 {
        format!("{:.1}GiB", mib / 1024.0)
    } else {
        format!("{mib:.0}MiB")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_both_unit_systems() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1.5GB"), Ok(1_500_000_000));
        assert_eq!(parse_size("100000000"), Ok(100_000_000));
        assert!(parse_size("1MiB").is_err());
        assert!(parse_size("12 parsecs").is_err());
        assert_eq!(format_size(512 << 20), "512MiB");
    }
}
