//! `sluice-bench tiles`: the figures of tiled feature views, in one run.
//!
//! - `sparse`: 500,000 users, 2 days, one event per user per day, through
//!   the whole `sluice run` (a child process, JSON-lines file, no lake):
//!   `HOP(5 min, 1 day)` COUNT/SUM, and the `HOP(5 min, 1 h)` view over the
//!   same events (the ratio the issue asks for).
//! - `dense`: 1,000,000 users, 2 hours, 4,000,000 events, `HOP(5 min, 1 h)`
//!   COUNT/SUM/AVG.
//! - `budget`: 10,000,000 users, 20,000,000 events over 2 hours, with
//!   `--memory-budget 512MiB` and with an unbounded budget; then a
//!   `sluice get` on each state dir (wall time, peak RSS).
//! - `serve`: GET latency on loopback at a fixed request rate for a 1-hour
//!   and a 30-day view (COUNT/SUM/AVG/MAX, then with APPROX_DISTINCT).
//! - `fresh`: time from an event's arrival to the first read that counts it,
//!   with an in-process job fed in real time.
//!
//! Peak RSS of a child is its `VmHWM`, sampled from `/proc` while it runs.

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::Context;
use arrow::array::{ArrayRef, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::SchemaRef;
use sluice_cli::commands::generate::Rng;
use sluice_engine::job::{Job, JobOptions};
use sluice_engine::{Poll, Result as EngineResult, Source, SourceBatch};

use crate::{fresh, sluice_exe};

const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;
const DAY: i64 = 24 * HOUR;
const T0: i64 = 1_704_067_200_000; // 2024-01-01T00:00:00Z

/// Options of `sluice-bench tiles`.
#[derive(clap::Args, Debug)]
pub struct BenchTilesArgs {
    /// Working directory (events files, state dirs).
    #[arg(long, default_value = "sluice-bench-tiles")]
    dir: PathBuf,
    /// Which parts to run: sparse, dense, budget, serve, fresh.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "sparse,dense,budget,serve,fresh"
    )]
    parts: Vec<String>,
    /// Users of the `budget` part (events: twice as many).
    #[arg(long, default_value_t = 10_000_000)]
    budget_users: u64,
    /// Users of the `sparse` part (one event each per day, two days).
    #[arg(long, default_value_t = 500_000)]
    sparse_users: u64,
    /// Worker threads of the `sluice run` children (`--workers`; default:
    /// one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Requests per second of the `serve` part.
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// Seconds of load per view in the `serve` part.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

fn pipeline(path: &Path, view: &str) -> String {
    format!(
        "CREATE SOURCE clicks (user_id TEXT NOT NULL, item_id TEXT, price DOUBLE, ts TIMESTAMP NOT NULL,
           WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)
         WITH (connector = 'file', path = '{}');
         {view}",
        path.display()
    )
}

fn view(name: &str, aggs: &str, window: &str) -> String {
    format!(
        "CREATE FEATURE VIEW {name} KEY user_id AS SELECT user_id, {aggs} FROM clicks GROUP BY user_id, {window};"
    )
}

const HOP_1D: &str = "HOP(ts, INTERVAL '5' MINUTE, INTERVAL '1' DAY)";
const HOP_1H: &str = "HOP(ts, INTERVAL '5' MINUTE, INTERVAL '1' HOUR)";
const HOP_30D: &str = "HOP(ts, INTERVAL '5' MINUTE, INTERVAL '30' DAY)";

/// Writes events sorted by time (with up to 2 s of disorder): `(user, ts)`
/// pairs from `gen`, in chunks so the whole set never sits in memory.
fn write_events(
    path: &Path,
    mut chunk: impl FnMut(&mut Rng, &mut Vec<(u64, i64)>) -> bool,
) -> anyhow::Result<u64> {
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut rng = Rng::new(11);
    let mut buf = Vec::new();
    let mut n = 0;
    loop {
        buf.clear();
        let more = chunk(&mut rng, &mut buf);
        buf.sort_by_key(|e| e.1);
        for (u, t) in &buf {
            let t = t - rng.below(2000) as i64;
            let ts = sluice_engine::time::fmt_ts(t);
            let ts = ts.as_str().unwrap_or_default();
            writeln!(
                w,
                "{{\"user_id\":\"u{u:08}\",\"item_id\":\"i{}\",\"price\":{}.{:02},\"ts\":\"{ts}\"}}",
                rng.below(5000),
                rng.below(100),
                rng.below(100)
            )?;
            n += 1;
        }
        if !more {
            break;
        }
    }
    w.flush()?;
    Ok(n)
}

/// `users` events per day over `days`, each user once a day at a random time.
fn sparse_daily(path: &Path, users: u64, days: i64) -> anyhow::Result<u64> {
    let mut day = 0;
    write_events(path, |rng, buf| {
        for u in 0..users {
            buf.push((u, T0 + day * DAY + rng.below(DAY as u64) as i64));
        }
        day += 1;
        day < days
    })
}

/// `events` events of `users` random users, uniform over `span`.
fn uniform(path: &Path, users: u64, events: u64, span: i64) -> anyhow::Result<u64> {
    // One-minute chunks, sorted within each.
    let minutes = (span / MIN).max(1);
    let per = events / minutes as u64;
    let mut m = 0;
    write_events(path, |rng, buf| {
        for _ in 0..per {
            buf.push((
                rng.below(users),
                T0 + m * MIN + rng.below(MIN as u64) as i64,
            ));
        }
        m += 1;
        m < minutes
    })
}

/// Peak RSS (MiB) of a running child, sampled until it exits.
struct Watch {
    peak: Arc<Mutex<f64>>,
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watch {
    fn new(pid: u32) -> Self {
        let peak = Arc::new(Mutex::new(0.0f64));
        let done = Arc::new(AtomicBool::new(false));
        let (p, d) = (Arc::clone(&peak), Arc::clone(&done));
        let thread = std::thread::spawn(move || {
            while !d.load(Ordering::Relaxed) {
                if let Some(mib) = crate::vm_hwm_mib(&format!("/proc/{pid}/status"))
                    && let Ok(mut m) = p.lock()
                {
                    *m = (*m).max(mib);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Watch {
            peak,
            done,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> f64 {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.lock().map(|p| *p).unwrap_or(0.0)
    }
}

struct RunFigures {
    events: u64,
    secs: f64,
    rss_mib: f64,
}

/// `--workers` of the `sluice run` children (`None`: their default).
static WORKERS: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();

/// `sluice run` of `sql` to the end of its file, in a child process.
fn run_child(
    dir: &Path,
    name: &str,
    sql: &str,
    extra: &[&str],
    events: u64,
) -> anyhow::Result<RunFigures> {
    let p = dir.join(format!("{name}.sql"));
    std::fs::write(&p, sql)?;
    let state = dir.join(format!("{name}-state"));
    let _ = std::fs::remove_dir_all(&state);
    let mut cmd = Command::new(sluice_exe()?);
    cmd.arg("run")
        .arg(&p)
        .arg("--state-dir")
        .arg(&state)
        .args(extra)
        .env("SLUICE_LOG", "warn")
        .stdout(Stdio::null());
    if let Some(n) = WORKERS.get().copied().flatten() {
        cmd.arg("--workers").arg(n.to_string());
    }
    let t = Instant::now();
    let mut child = cmd.spawn().context("starting sluice run")?;
    let watch = Watch::new(child.id());
    let st = child.wait()?;
    let secs = t.elapsed().as_secs_f64();
    let rss = watch.finish();
    anyhow::ensure!(st.success(), "sluice run {name} failed: {st}");
    Ok(RunFigures {
        events,
        secs,
        rss_mib: rss,
    })
}

fn report(what: &str, f: &RunFigures) -> f64 {
    let rate = f.events as f64 / f.secs;
    println!(
        "  {what}: {} events in {:.2}s = {:.0} events/s; peak RSS {:.0} MiB",
        f.events, f.secs, rate, f.rss_mib
    );
    rate
}

fn sparse(dir: &Path, users: u64) -> anyhow::Result<()> {
    println!("sparse: {users} users x 2 days, one event per user per day; sluice run, no lake");
    let events = dir.join("sparse.jsonl");
    let n = sparse_daily(&events, users, 2)?;
    let day = run_child(
        dir,
        "sparse-1d",
        &pipeline(
            &events,
            &view("v", "COUNT(*) AS n, SUM(price) AS s", HOP_1D),
        ),
        &[],
        n,
    )?;
    let r1 = report("HOP(5m, 1d) COUNT/SUM", &day);
    let hour = run_child(
        dir,
        "sparse-1h",
        &pipeline(
            &events,
            &view("v", "COUNT(*) AS n, SUM(price) AS s", HOP_1H),
        ),
        &[],
        n,
    )?;
    let r2 = report("HOP(5m, 1h) COUNT/SUM, same events", &hour);
    println!(
        "  1-day view at {:.2}x the 1-hour view's rate (baselines: 100,000 users before tiles 3,379 events/s and 1.31 GB; 500,000 users before the workers 78k events/s and 1.28 GB against 234k for the 1-hour view)",
        r1 / r2
    );
    Ok(())
}

fn dense(dir: &Path) -> anyhow::Result<()> {
    println!("dense: 1,000,000 users, 4,000,000 events over 2 hours; sluice run, no lake");
    let events = dir.join("dense.jsonl");
    let n = uniform(&events, 1_000_000, 4_000_000, 2 * HOUR)?;
    let f = run_child(
        dir,
        "dense",
        &pipeline(
            &events,
            &view(
                "v",
                "COUNT(*) AS n, SUM(price) AS s, AVG(price) AS a",
                HOP_1H,
            ),
        ),
        &[],
        n,
    )?;
    let r = report("HOP(5m, 1h) COUNT/SUM/AVG", &f);
    println!(
        "  baseline (main before tiles, from the issue): 58,900 events/s, 1.58 GB; now {:.2}x",
        r / 58_900.0
    );
    Ok(())
}

fn budget(dir: &Path, users: u64) -> anyhow::Result<()> {
    println!(
        "budget: {users} users, {} events over 2 hours, HOP(5m, 1h) COUNT/SUM/AVG",
        2 * users
    );
    let events = dir.join("budget.jsonl");
    let n = uniform(&events, users, 2 * users, 2 * HOUR)?;
    let sql = pipeline(
        &events,
        &view(
            "v",
            "COUNT(*) AS n, SUM(price) AS s, AVG(price) AS a",
            HOP_1H,
        ),
    );
    let small = run_child(dir, "budget-512", &sql, &["--memory-budget", "512MiB"], n)?;
    let r1 = report("--memory-budget 512MiB", &small);
    get_figures(&dir.join("budget-512-state"))?;
    let big = run_child(dir, "budget-16g", &sql, &["--memory-budget", "16GiB"], n)?;
    let r2 = report("--memory-budget 16GiB (unbounded here)", &big);
    get_figures(&dir.join("budget-16g-state"))?;
    println!("  bounded run at {:.2}x the unbounded rate", r1 / r2);
    Ok(())
}

/// `sluice get` of one key on a finished run's state dir, in a child: the
/// wall time and peak RSS of opening the dir for one read (RSS from GNU
/// time's `%M` where `/usr/bin/time` exists). Baseline before the runs
/// left an empty WAL: 6-13 s and 0.36-0.77 GB on a 2M-key dir.
fn get_figures(state: &Path) -> anyhow::Result<()> {
    let gnu_time = Path::new("/usr/bin/time");
    let mut cmd = if gnu_time.exists() {
        let mut c = Command::new(gnu_time);
        c.args(["-f", "%M"]).arg(sluice_exe()?);
        c
    } else {
        Command::new(sluice_exe()?)
    };
    cmd.args(["get", "v", "u00000001", "--state-dir"])
        .arg(state)
        .env("SLUICE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let t = Instant::now();
    let out = cmd.output().context("running sluice get")?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    let err = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(out.status.success(), "sluice get failed: {err}");
    let rss = err
        .lines()
        .last()
        .and_then(|l| l.trim().parse::<f64>().ok())
        .filter(|_| gnu_time.exists())
        .map_or("not measured (no /usr/bin/time)".to_string(), |kb| {
            format!("{:.0} MiB", kb / 1024.0)
        });
    println!("  sluice get on that state dir: {ms:.0} ms, peak RSS {rss}");
    Ok(())
}

/// Starts `sluice run --serve` and waits until its file is consumed.
fn serving(dir: &Path, name: &str, sql: &str, events: u64) -> anyhow::Result<(Child, String)> {
    let p = dir.join(format!("{name}.sql"));
    std::fs::write(&p, sql)?;
    let state = dir.join(format!("{name}-state"));
    let _ = std::fs::remove_dir_all(&state);
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let child = Command::new(sluice_exe()?)
        .arg("run")
        .arg(&p)
        .arg("--state-dir")
        .arg(&state)
        .arg("--serve")
        .arg(&addr)
        .env("SLUICE_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?;
    // Done when every event is in and the final checkpoint has had time.
    let t = Instant::now();
    loop {
        let seen = metric(&addr, "sluice_events_in_total").unwrap_or(0.0);
        if seen >= events as f64 {
            std::thread::sleep(Duration::from_secs(3));
            break;
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(1800),
            "server did not settle"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok((child, addr))
}

/// A metric's value from `/metrics` (the first series of that name).
fn metric(addr: &str, name: &str) -> Option<f64> {
    let mut s = TcpStream::connect(addr).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}

/// Paced keep-alive GETs of random users: `rate` per second over `clients`
/// connections for `secs`. Latency is from a request's scheduled send time,
/// so a slow answer also delays (and counts against) the ones behind it.
fn paced_load(
    addr: &str,
    view: &str,
    users: u64,
    rate: u64,
    secs: u64,
    clients: u64,
) -> anyhow::Result<(Vec<Duration>, u64)> {
    let per = rate / clients;
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let addr = addr.to_string();
            let view = view.to_string();
            std::thread::spawn(move || -> anyhow::Result<(Vec<Duration>, u64)> {
                let s = TcpStream::connect(&addr)?;
                s.set_nodelay(true)?;
                let mut w = s.try_clone()?;
                let mut r = BufReader::new(s);
                let mut rng = Rng::new(1000 + c);
                let gap = Duration::from_secs_f64(1.0 / per as f64);
                let n = per * secs;
                let mut lat = Vec::with_capacity(n as usize);
                let mut found = 0;
                let start = Instant::now();
                let mut line = String::new();
                for i in 0..n {
                    let at = start + gap * i as u32;
                    let now = Instant::now();
                    if at > now {
                        std::thread::sleep(at - now);
                    }
                    let key = rng.below(users);
                    write!(
                        w,
                        "GET /v1/features/{view}/u{key:08} HTTP/1.1\r\nHost: b\r\n\r\n"
                    )?;
                    let mut len = 0usize;
                    let mut first = true;
                    loop {
                        line.clear();
                        r.read_line(&mut line)?;
                        if first {
                            if line.contains(" 200 ") {
                                found += 1;
                            }
                            first = false;
                        }
                        if line == "\r\n" || line.is_empty() {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse()?;
                        }
                    }
                    let mut body = vec![0u8; len];
                    r.read_exact(&mut body)?;
                    lat.push(at.elapsed());
                }
                Ok((lat, found))
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut found = 0;
    for h in handles {
        let (l, f) = h
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
        all.extend(l);
        found += f;
    }
    all.sort();
    Ok((all, found))
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn serve(dir: &Path, rate: u64, secs: u64) -> anyhow::Result<()> {
    println!("serve: GET of random users on loopback at {rate} requests/s for {secs}s per view");
    let base = "COUNT(*) AS n, SUM(price) AS s, AVG(price) AS a, MAX(price) AS hi";
    let with_hll = format!("{base}, APPROX_DISTINCT(item_id) AS d");
    // (name, users, events, event-time span, window, aggregates). The
    // 30-day views see 31 days of events, ~90 per user; APPROX_DISTINCT's
    // state is 16 KiB per tile (DataFusion's HyperLogLog registers), so its
    // runs hold fewer users and events.
    let cases = [
        (
            "serve-1h",
            100_000u64,
            1_000_000u64,
            2 * HOUR,
            HOP_1H,
            base.to_string(),
        ),
        (
            "serve-30d",
            100_000,
            9_300_000,
            31 * DAY,
            HOP_30D,
            base.to_string(),
        ),
        (
            "serve-1h-hll",
            20_000,
            200_000,
            2 * HOUR,
            HOP_1H,
            with_hll.clone(),
        ),
        (
            "serve-30d-hll",
            10_000,
            500_000,
            31 * DAY,
            HOP_30D,
            with_hll.clone(),
        ),
    ];
    for (name, users, events, span, window, aggs) in cases {
        let file = dir.join(format!("{name}.jsonl"));
        let n = uniform(&file, users, events, span)?;
        let t = Instant::now();
        let (mut child, addr) = serving(dir, name, &pipeline(&file, &view("v", &aggs, window)), n)?;
        println!(
            "  {name}: {users} users, {n} events loaded in {:.1}s",
            t.elapsed().as_secs_f64()
        );
        let _ = paced_load(&addr, "v", users, rate / 4, 1, 2)?; // warm-up
        let r = paced_load(&addr, "v", users, rate, secs, 2);
        let _ = child.kill();
        let _ = child.wait();
        let (lat, found) = r?;
        println!(
            "  {name} ({window}; {aggs}): {} requests ({found} found), p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms",
            lat.len(),
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            pct(&lat, 0.999)
        );
    }
    Ok(())
}

/// A source fed through a channel, in real time.
struct Feed {
    schema: SchemaRef,
    rx: mpsc::Receiver<RecordBatch>,
    n: u64,
}

impl Source for Feed {
    fn name(&self) -> &str {
        "clicks"
    }
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }
    fn seek(&mut self, _: Option<&[u8]>) -> EngineResult<()> {
        Ok(())
    }
    fn poll(&mut self, _: usize) -> EngineResult<Poll> {
        match self.rx.recv_timeout(Duration::from_millis(5)) {
            Ok(b) => {
                let rows = b.num_rows();
                self.n += rows as u64;
                Ok(Poll::Data {
                    batch: Some(SourceBatch {
                        batch: b,
                        row_positions: vec![self.n; rows],
                        partitions: Vec::new(),
                    }),
                    rejected: Vec::new(),
                })
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(Poll::Idle),
            Err(mpsc::RecvTimeoutError::Disconnected) => Ok(Poll::End),
        }
    }
    fn position(&self) -> Vec<u8> {
        self.n.to_be_bytes().to_vec()
    }
    fn describe_position(&self, p: u64) -> String {
        p.to_string()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn fresh_part(dir: &Path) -> anyhow::Result<()> {
    println!(
        "fresh: events stamped with the wall clock, watermark delay 1 s, checkpoints every 1 s"
    );
    let state = dir.join("fresh-state");
    let _ = std::fs::remove_dir_all(&state);
    let sql = "CREATE SOURCE clicks (user_id TEXT NOT NULL, item_id TEXT, price DOUBLE, ts TIMESTAMP NOT NULL,
           WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) WITH (connector = 'file', path = 'x.jsonl');"
        .to_string()
        + &view("v", "COUNT(*) AS n", HOP_1H);
    let plan =
        sluice_sql::plan_pipeline("fresh.sql", &sql, dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let schema = Arc::clone(&plan.sources[0].schema);
    let (tx, rx) = mpsc::sync_channel(64);
    let src = Feed {
        schema: Arc::clone(&schema),
        rx,
        n: 0,
    };
    let mut job = Job::open(
        &plan,
        vec![Box::new(src)],
        Default::default(),
        Box::new(sluice_connectors::dead_letters(&state, &plan)?),
        JobOptions::new(state.clone()),
    )?;
    let live = job.live();
    let stop = Arc::new(AtomicBool::new(false));
    let st = Arc::clone(&stop);
    let runner = std::thread::spawn(move || job.run(&st));
    // The server runs as long as `_rt` lives.
    let (_rt, addr) = crate::serve_local(live, sluice_engine::server::ServeLimits::default())?;
    let batch = |users: Vec<String>, ts: Vec<i64>| -> anyhow::Result<RecordBatch> {
        let n = users.len();
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(users)),
            Arc::new(StringArray::from(vec!["i"; n])),
            Arc::new(Float64Array::from(vec![1.0; n])),
            Arc::new(TimestampMillisecondArray::from(ts)),
        ];
        Ok(RecordBatch::try_new(Arc::clone(&schema), cols)?)
    };
    // Background traffic: 100 events every 10 ms, moving the watermark in real time.
    let bg_stop = Arc::new(AtomicBool::new(false));
    let bs = Arc::clone(&bg_stop);
    let btx = tx.clone();
    let schema_bg = Arc::clone(&schema);
    let bg = std::thread::spawn(move || {
        let mut i = 0u64;
        while !bs.load(Ordering::Relaxed) {
            let users: Vec<String> = (0..100)
                .map(|j| format!("bg{}", (i * 100 + j) % 10_000))
                .collect();
            let ts = vec![now_ms(); 100];
            let n = users.len();
            let cols: Vec<ArrayRef> = vec![
                Arc::new(StringArray::from(users)),
                Arc::new(StringArray::from(vec!["i"; n])),
                Arc::new(Float64Array::from(vec![1.0; n])),
                Arc::new(TimestampMillisecondArray::from(ts)),
            ];
            if let Ok(b) = RecordBatch::try_new(Arc::clone(&schema_bg), cols)
                && btx.send(b).is_err()
            {
                break;
            }
            i += 1;
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    std::thread::sleep(Duration::from_secs(3));
    let mut waits = Vec::new();
    for probe in 0..20 {
        let key = format!("probe{probe}");
        let sent = Instant::now();
        tx.send(batch(vec![key.clone()], vec![now_ms()])?)
            .map_err(|_| anyhow::anyhow!("job stopped"))?;
        loop {
            let mut s = TcpStream::connect(&addr)?;
            write!(
                s,
                "GET /v1/features/v/{key} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            if body.starts_with("HTTP/1.1 200") {
                waits.push(sent.elapsed());
                break;
            }
            anyhow::ensure!(
                sent.elapsed() < Duration::from_secs(30),
                "probe never showed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(137));
    }
    bg_stop.store(true, Ordering::Relaxed);
    let _ = bg.join();
    drop(tx);
    stop.store(true, Ordering::Relaxed);
    runner
        .join()
        .map_err(|_| anyhow::anyhow!("job thread panicked"))??;
    waits.sort();
    println!(
        "  arrival to first read counting it, 20 probes: min {:.0} ms, p50 {:.0} ms, max {:.0} ms (aim: delay 1 s + one checkpoint interval 1 s)",
        waits[0].as_secs_f64() * 1000.0,
        pct(&waits, 0.5),
        waits[waits.len() - 1].as_secs_f64() * 1000.0
    );
    Ok(())
}

/// Runs the parts asked for.
pub fn run(a: &BenchTilesArgs) -> anyhow::Result<()> {
    fresh(&a.dir)?;
    let dir = a.dir.canonicalize()?;
    let _ = WORKERS.set(a.workers);
    println!(
        "sluice-bench tiles; build profile: {}",
        if cfg!(debug_assertions) {
            "debug (use --release!)"
        } else {
            "release"
        }
    );
    for p in &a.parts {
        match p.as_str() {
            "sparse" => sparse(&dir, a.sparse_users)?,
            "dense" => dense(&dir)?,
            "budget" => budget(&dir, a.budget_users)?,
            "serve" => serve(&dir, a.rate, a.seconds)?,
            "fresh" => fresh_part(&dir)?,
            other => anyhow::bail!("unknown part `{other}` (sparse, dense, budget, serve, fresh)"),
        }
    }
    Ok(())
}
