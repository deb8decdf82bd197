//! `sluice run`: the streaming job, its signal handling and its server.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use sluice_engine::Live;
use sluice_engine::job::{Job, JobOptions};
use sluice_engine::server::{ServeLimits, ServeState};

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
    /// How the server answers: its token, hosts and limits.
    #[command(flatten)]
    pub server: ServeArgs,
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
    #[arg(long, value_parser = crate::flags::parse_size, default_value = "1GiB")]
    pub memory_budget: u64,
    /// Bytes of dead letters written per source over the state dir's life
    /// (`1GiB` by default); past it letters are counted
    /// (`sluice_dead_letters_dropped_total`) but not written.
    #[arg(long, value_parser = crate::flags::parse_bytes, default_value = "1GiB")]
    pub dead_letter_limit: u64,
    /// Worker threads holding the views' state, each the key groups `g`
    /// with `g % N == worker` (default: one per core). May change between
    /// restarts of a state dir.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Sleep after every batch (for tests that need a long-running job).
    #[arg(long, hide = true)]
    pub throttle_ms: Option<u64>,
}

/// The serving options of `sluice run`: the bearer token, the hosts
/// answered and every limit a client meets (defaults in
/// [`ServeLimits::default`]).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// File holding a bearer token the serving API requires (an empty or
    /// unreadable file is an error at start).
    #[arg(long)]
    pub auth_token_file: Option<PathBuf>,
    /// `/metrics` requires the bearer token too.
    #[arg(long)]
    pub auth_metrics: bool,
    /// Hosts the server answers (`Host` header), comma-separated; bound to
    /// a loopback address it answers localhost, 127.0.0.1 and [::1] only
    /// unless this is given; bound elsewhere, any host.
    #[arg(long, value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
    /// Largest request body (default 2MiB).
    #[arg(long, value_parser = crate::flags::parse_bytes)]
    pub max_body_bytes: Option<u64>,
    /// Keys of one batch read (default 10000).
    #[arg(long)]
    pub max_batch_keys: Option<usize>,
    /// k × query vectors of one nearest-neighbour request (default 100000).
    #[arg(long)]
    pub max_nearest_work: Option<usize>,
    /// Bytes of a nearest-neighbour filter (default 16384).
    #[arg(long)]
    pub max_filter_bytes: Option<usize>,
    /// Nodes of a nearest-neighbour filter (default 1000, at most 4096).
    #[arg(long)]
    pub max_filter_nodes: Option<usize>,
    /// Point reads in progress at once (default 256).
    #[arg(long)]
    pub max_concurrent_gets: Option<usize>,
    /// Batch reads in progress at once (default 32).
    #[arg(long)]
    pub max_concurrent_batches: Option<usize>,
    /// Nearest-neighbour queries in progress at once (default 8).
    #[arg(long)]
    pub max_concurrent_nearest: Option<usize>,
    /// How long a request waits for a free slot of its route before 503
    /// with Retry-After (default 100).
    #[arg(long)]
    pub queue_timeout_ms: Option<u64>,
    /// A request's deadline from its arrival, body and work included
    /// (default 10000); past it, 503 with Retry-After.
    #[arg(long)]
    pub request_timeout_ms: Option<u64>,
    /// Time a client has to send a request's headers, also the longest
    /// idle time between requests on a connection (default 10000).
    #[arg(long)]
    pub header_timeout_ms: Option<u64>,
    /// A connection that moves no byte for this long is closed (default 60000).
    #[arg(long)]
    pub idle_timeout_ms: Option<u64>,
    /// Open connections at most; one past it gets 503 and is closed
    /// (default: the open-file limit, raised to its hard limit, less 512,
    /// at most 16384).
    #[arg(long)]
    pub max_connections: Option<usize>,
}

impl ServeArgs {
    /// The limits these flags set.
    pub fn limits(&self) -> ServeLimits {
        let d = ServeLimits::default();
        let ms = |v: Option<u64>, def: Duration| v.map_or(def, Duration::from_millis);
        ServeLimits {
            max_body_bytes: self.max_body_bytes.map_or(d.max_body_bytes, |b| {
                usize::try_from(b).unwrap_or(usize::MAX)
            }),
            max_batch_keys: self.max_batch_keys.unwrap_or(d.max_batch_keys),
            max_nearest_work: self.max_nearest_work.unwrap_or(d.max_nearest_work),
            filter: sluice_engine::vector::filter::FilterLimits {
                max_bytes: self.max_filter_bytes.unwrap_or(d.filter.max_bytes),
                max_nodes: self.max_filter_nodes.unwrap_or(d.filter.max_nodes),
            },
            concurrency: sluice_engine::server::RouteConcurrency {
                get: self.max_concurrent_gets.unwrap_or(d.concurrency.get),
                batch: self.max_concurrent_batches.unwrap_or(d.concurrency.batch),
                nearest: self.max_concurrent_nearest.unwrap_or(d.concurrency.nearest),
            },
            queue_timeout: ms(self.queue_timeout_ms, d.queue_timeout),
            request_timeout: ms(self.request_timeout_ms, d.request_timeout),
            header_timeout: ms(self.header_timeout_ms, d.header_timeout),
            idle_timeout: ms(self.idle_timeout_ms, d.idle_timeout),
            max_connections: self.max_connections.unwrap_or(d.max_connections),
            allowed_hosts: (!self.allowed_hosts.is_empty()).then(|| self.allowed_hosts.clone()),
            auth_metrics: self.auth_metrics,
        }
    }

    /// The bearer token: `None` without `--auth-token-file`; an error for
    /// a file that cannot be read or holds no token.
    pub fn token(&self) -> anyhow::Result<Option<String>> {
        let Some(f) = &self.auth_token_file else {
            if self.auth_metrics {
                anyhow::bail!("--auth-metrics needs --auth-token-file");
            }
            return Ok(None);
        };
        let t = std::fs::read_to_string(f)
            .with_context(|| format!("--auth-token-file: reading {}", f.display()))?;
        let t = t.trim();
        if t.is_empty() {
            anyhow::bail!(
                "--auth-token-file {}: the file holds no token (an empty token would let every request in)",
                f.display()
            );
        }
        Ok(Some(t.to_string()))
    }
}

/// Runs the pipeline until its sources end (or a signal), serving if asked.
pub fn run(a: RunArgs) -> anyhow::Result<()> {
    let p = crate::plan(&a.pipeline)?;
    let handle = crate::install_metrics()?;
    let token = a.server.token()?;
    let opts = JobOptions {
        state_dir: a.state_dir.clone(),
        checkpoint_interval: Duration::from_millis(a.checkpoint_interval_ms),
        batch_rows: a.batch_rows.max(1),
        throttle: a.throttle_ms.map(Duration::from_millis),
        memory_budget: a.memory_budget,
        dead_letter_limit: a.dead_letter_limit,
        workers: a
            .workers
            .unwrap_or_else(sluice_engine::job::default_workers)
            .max(1),
    };
    tracing::info!(
        memory_budget = %crate::flags::format_size(a.memory_budget),
        "state memory budget (--memory-budget)"
    );
    let sources = sluice_connectors::build_sources_with(&p, a.stop_at_end)?;
    let serve = a.serve.map(|addr| Serve {
        addr,
        token,
        limits: a.server.limits(),
    });
    run_job(&p, sources, opts, serve, Some(handle))
}

/// Where and how `run_job` serves.
pub struct Serve {
    /// The address to bind.
    pub addr: SocketAddr,
    /// The bearer token, if any.
    pub token: Option<String>,
    /// The limits.
    pub limits: ServeLimits,
}

/// Runs `p` over `sources`: the job, the signal handler and the server.
pub fn run_job(
    p: &sluice_sql::PipelinePlan,
    sources: Vec<Box<dyn sluice_engine::Source>>,
    opts: JobOptions,
    serve: Option<Serve>,
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
    // Two async threads at least (one slow connection never holds up
    // `/healthz`); reads run on the runtime's blocking pool.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("sluice-serve")
        .enable_all()
        .build()?;
    {
        let stop = Arc::clone(&stop);
        rt.spawn(async move {
            shutdown_signal().await;
            stop.store(true, Ordering::SeqCst);
        });
    }
    let serving = serve.is_some();
    if let Some(sv) = serve {
        start_server(&rt, sv, job.live(), handle)?;
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
    if serving && !stop.load(Ordering::SeqCst) {
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
    sv: Serve,
    live: Arc<Live>,
    handle: Option<PrometheusHandle>,
) -> anyhow::Result<()> {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(sv.addr))
        .with_context(|| format!("binding {}", sv.addr))?;
    let bound = listener.local_addr()?;
    tracing::info!(
        max_connections = sv.limits.max_connections,
        max_body_bytes = sv.limits.max_body_bytes,
        max_batch_keys = sv.limits.max_batch_keys,
        request_timeout_ms = sv.limits.request_timeout.as_millis() as u64,
        "serving limits"
    );
    let state = ServeState::new(live, handle, sv.token.map(Arc::from), sv.limits, bound);
    rt.spawn(sluice_engine::server::serve(listener, state));
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
