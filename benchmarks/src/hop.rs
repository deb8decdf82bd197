//! `sluice-bench hop`: the figures of the quickstart HOP(5 min, 1 h) view, measured
//! in one run: the engine over in-memory events, the whole `sluice run` path
//! over a JSON-lines file with both sinks, RocksDB state size, online GET
//! latency and rate on loopback, and (with `--flink-python`) Apache Flink SQL
//! on the same file.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::Context;
use arrow::array::{ArrayRef, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use sluice_connectors::MemorySource;
use sluice_engine::Source;
use sluice_engine::job::{Job, JobOptions};

use sluice_cli::commands::generate::{self, Rng, event};

use crate::{fresh, peak_rss_mib};

/// Options of `sluice-bench hop`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Number of events.
    #[arg(long, default_value_t = 10_000_000)]
    events: u64,
    /// Distinct keys.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Event-time span of the events, in minutes.
    #[arg(long, default_value_t = 240)]
    minutes: u64,
    /// Working directory (events file, state, lake).
    #[arg(long, default_value = "sluice-bench")]
    dir: PathBuf,
    /// Python with `apache-flink` installed: also run the Flink SQL baseline.
    #[arg(long)]
    flink_python: Option<PathBuf>,
    /// GET requests for the serving measurement.
    #[arg(long, default_value_t = 200_000)]
    requests: u64,
    /// Concurrent keep-alive clients for the serving measurement.
    #[arg(long, default_value_t = 2)]
    clients: u64,
    /// Worker counts of the whole-run measurement, each in its own run
    /// (the first also runs the other parts).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    workers: Vec<usize>,
}

fn batches(a: &BenchArgs, schema: arrow::datatypes::SchemaRef) -> anyhow::Result<Vec<RecordBatch>> {
    let mut rng = Rng::new(42);
    let mut out = Vec::new();
    let mut i = 0;
    while i < a.events {
        let n = 8192.min(a.events - i);
        let (mut users, mut items, mut prices, mut ts) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for j in 0..n {
            let e = event(&mut rng, i + j, a.events, a.keys, a.minutes);
            users.push(format!("u{:05}", e.user));
            items.push(format!("i{}", e.item));
            prices.push(e.price_cents as f64 / 100.0);
            ts.push(e.ts);
        }
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(users)),
            Arc::new(StringArray::from(items)),
            Arc::new(Float64Array::from(prices)),
            Arc::new(TimestampMillisecondArray::from(ts)),
        ];
        out.push(RecordBatch::try_new(Arc::clone(&schema), cols)?);
        i += n;
    }
    Ok(out)
}

/// Keep-alive GETs of random keys; returns per-request latencies.
fn load(addr: String, keys: u64, n: u64, seed: u64) -> anyhow::Result<Vec<Duration>> {
    let s = TcpStream::connect(&addr)?;
    s.set_nodelay(true)?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let mut rng = Rng::new(seed);
    let mut lat = Vec::with_capacity(n as usize);
    let mut line = String::new();
    for _ in 0..n {
        let key = rng.below(keys);
        let t0 = Instant::now();
        write!(
            w,
            "GET /v1/features/user_activity/u{key:05} HTTP/1.1\r\nHost: {addr}\r\n\r\n"
        )?;
        let mut len = 0usize;
        let mut first = true;
        loop {
            line.clear();
            r.read_line(&mut line)?;
            if first {
                anyhow::ensure!(
                    line.contains(" 200 ") || line.contains(" 404 "),
                    "unexpected response {line}"
                );
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
        lat.push(t0.elapsed());
    }
    Ok(lat)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

/// Runs the benchmark and prints the report.
pub fn run(a: &BenchArgs) -> anyhow::Result<()> {
    fresh(&a.dir)?;
    let dir = a.dir.canonicalize()?;
    let stop = AtomicBool::new(false);
    println!(
        "sluice-bench hop: {} events, {} keys, {} min of event time, HOP(5m, 1h); build profile: {}",
        a.events,
        a.keys,
        a.minutes,
        if cfg!(debug_assertions) {
            "debug (use --release!)"
        } else {
            "release"
        }
    );

    // 1. Engine over in-memory events (online store on, no lake), one thread.
    let sql = sluice_cli::QUICKSTART_SQL.replace(
        "WITH (online = true, offline = 'lake')",
        "WITH (online = true)",
    );
    let plan =
        sluice_sql::plan_pipeline("bench.sql", &sql, &dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let schema = Arc::clone(&plan.sources[0].schema);
    let t = Instant::now();
    let data = batches(a, Arc::clone(&schema))?;
    println!(
        "  generated in-memory batches in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let mem_state = dir.join("mem-state");
    let src: Vec<Box<dyn Source>> = vec![Box::new(MemorySource::new("clicks", schema, data))];
    let mut opts = JobOptions::new(mem_state.clone());
    opts.checkpoint_interval = Duration::from_secs(10);
    let mut job = Job::open(
        &plan,
        src,
        HashMap::new(),
        Box::new(sluice_connectors::dead_letters(&mem_state, &plan)?),
        opts,
    )?;
    let s1 = job.run(&stop)?;
    let engine_rate = s1.events as f64 / s1.elapsed.as_secs_f64();
    drop(job);
    println!(
        "engine (in-memory source, online store, checkpoints every 10s): {} events in {:.2}s = {:.0} events/s; {} rows emitted; peak RSS {:.0} MiB",
        s1.events,
        s1.elapsed.as_secs_f64(),
        engine_rate,
        s1.rows_emitted,
        peak_rss_mib()
    );

    // 2. The whole run: JSON-lines file source, online store and Parquet lake.
    let events = dir.join("events.jsonl");
    let t = Instant::now();
    generate::run(&generate::GenArgs::new(
        a.events,
        a.keys,
        a.minutes,
        events.clone(),
    ))?;
    let file_bytes = std::fs::metadata(&events)?.len();
    println!(
        "  wrote {} ({:.0} MiB) in {:.1}s",
        events.display(),
        file_bytes as f64 / 1048576.0,
        t.elapsed().as_secs_f64()
    );
    std::fs::write(dir.join("pipeline.sql"), sluice_cli::QUICKSTART_SQL)?;
    let mut rates = Vec::new();
    for n in a.workers.iter().skip(1).rev() {
        let _ = std::fs::remove_dir_all(dir.join("state"));
        let _ = std::fs::remove_dir_all(dir.join("lake"));
        let cpu0 = crate::cpu_secs("self");
        let (_, mut job) = crate::open_run_job_with(&dir, Duration::from_secs(10), false, *n)?;
        let s = job.run(&stop)?;
        let cpu = crate::cpu_secs("self") - cpu0;
        drop(job);
        rates.push((
            *n,
            s.events as f64 / s.elapsed.as_secs_f64(),
            cpu / (s.events as f64 / 1e6),
        ));
    }
    let _ = std::fs::remove_dir_all(dir.join("state"));
    let _ = std::fs::remove_dir_all(dir.join("lake"));
    let first = a.workers.first().copied().unwrap_or(1);
    let cpu0 = crate::cpu_secs("self");
    let (_, mut job) = crate::open_run_job_with(&dir, Duration::from_secs(10), false, first)?;
    let s2 = job.run(&stop)?;
    let cpu = crate::cpu_secs("self") - cpu0;
    let file_rate = s2.events as f64 / s2.elapsed.as_secs_f64();
    rates.insert(0, (first, file_rate, cpu / (s2.events as f64 / 1e6)));
    for (n, r, c) in &rates {
        println!(
            "sluice run, {n} worker(s): {r:.0} events/s, {c:.2} CPU-s per million events{}",
            if *n == first {
                String::new()
            } else {
                format!(" ({:.2}x {first} worker(s))", r / file_rate)
            }
        );
    }
    let live = job.live();
    live.store.flush()?;
    let db_bytes = live.store.disk_bytes();
    let lake_bytes = sluice_engine::store::dir_size(&dir.join("lake"));
    println!(
        "sluice run (file source + online store + lake, checkpoints every 10s): {} events in {:.2}s = {:.0} events/s; {} rows emitted; {} dead letters",
        s2.events,
        s2.elapsed.as_secs_f64(),
        file_rate,
        s2.rows_emitted,
        s2.dead_letters
    );
    println!(
        "RocksDB (state + online store) size after flush: {:.1} MiB; lake: {:.1} MiB; peak RSS so far {:.0} MiB",
        db_bytes as f64 / 1048576.0,
        lake_bytes as f64 / 1048576.0,
        peak_rss_mib()
    );

    // 3. Serving: GETs of random keys over loopback keep-alive connections.
    // The server runs as long as `_rt` lives.
    let (_rt, addr) = crate::serve_local(live, sluice_engine::server::ServeLimits::default())?;
    let _ = load(addr.clone(), a.keys, 2000, 1)?; // warm-up
    let per = a.requests / a.clients.max(1);
    let t = Instant::now();
    let handles: Vec<_> = (0..a.clients.max(1))
        .map(|c| {
            let addr = addr.clone();
            let keys = a.keys;
            std::thread::spawn(move || load(addr, keys, per, 100 + c))
        })
        .collect();
    let mut lat = Vec::new();
    for h in handles {
        lat.extend(
            h.join()
                .map_err(|_| anyhow::anyhow!("load thread panicked"))??,
        );
    }
    let secs = t.elapsed().as_secs_f64();
    lat.sort();
    println!(
        "online GET on loopback ({} keep-alive clients, server on 1 worker thread): {} requests in {:.2}s = {:.0} req/s; p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
        a.clients,
        lat.len(),
        secs,
        lat.len() as f64 / secs,
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        pct(&lat, 1.0)
    );
    drop(job);

    // 4. Apache Flink SQL on the same file, same query, at each
    // parallelism equal to a worker count.
    if let Some(py) = &a.flink_python {
        let warm = dir.join("warmup.jsonl");
        let text = std::fs::read_to_string(&events)?;
        let head: String = text
            .lines()
            .take(100_000)
            .map(|l| format!("{l}\n"))
            .collect();
        drop(text);
        std::fs::write(&warm, head)?;
        let script = crate::scripts::write(&dir, crate::scripts::FLINK_HOP)?;
        for (n, rate, _) in &rates {
            let out = std::process::Command::new(py)
                .arg(&script)
                .arg(&warm)
                .arg(&events)
                .arg(n.to_string())
                .output()
                .context("running PyFlink")?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            let line = stdout
                .lines()
                .rev()
                .find(|l| l.starts_with('{'))
                .ok_or_else(|| {
                    anyhow::anyhow!("Flink failed:\n{}", String::from_utf8_lossy(&out.stderr))
                })?;
            let v: serde_json::Value = serde_json::from_str(line)?;
            let flink_rate = v["events_per_sec"].as_f64().unwrap_or(0.0);
            println!(
                "Apache Flink SQL (PyFlink mini-cluster, parallelism {n}, filesystem JSON source, blackhole sink, after a warm-up job): {} events in {:.2}s = {:.0} events/s",
                v["events"],
                v["seconds"].as_f64().unwrap_or(0.0),
                flink_rate
            );
            println!(
                "ratio sluice run ({n} worker(s)) / Flink (parallelism {n}): {:.1}x (engine alone, in-memory source, default workers / Flink: {:.1}x)",
                rate / flink_rate,
                engine_rate / flink_rate
            );
        }
    } else {
        println!(
            "(Flink baseline skipped: pass --flink-python PATH to a python with apache-flink)"
        );
    }
    Ok(())
}
