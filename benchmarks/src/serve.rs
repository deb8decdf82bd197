//! `sluice-bench serve`: the serving API with its limits against the same
//! server without them (the baseline, measured in the same run), at a
//! fixed request rate on loopback; then the time the limits take to turn
//! away a filter bomb and a flood of keys.
//!
//! The load is open-loop, from one thread (so it takes one core's share at
//! most from the server on this two-core machine): each keep-alive
//! connection sends on a schedule (rate / connections requests per
//! second), and a request's latency counts from when it was due, so a
//! stall shows as latency, not as a lower rate.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_cli::commands::generate::{self, Rng};
use sluice_engine::server::ServeLimits;

use crate::fresh;

/// Options of `sluice-bench serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchServeArgs {
    /// Events of the quickstart view's state.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Distinct users (keys read).
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// GET requests per second, over all clients.
    #[arg(long, default_value_t = 20_000.0)]
    rate: f64,
    /// Keep-alive connections sending them (from one client thread).
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Seconds of load per server per round.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Rounds, alternating the two servers.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Working directory.
    #[arg(long, default_value = "target/bench-serve")]
    dir: PathBuf,
}

/// One connection's requests on its schedule: latencies from each
/// request's due time (so a stall shows as latency, not as a lower rate).
async fn connection(
    addr: String,
    keys: u64,
    rate: f64,
    secs: f64,
    seed: u64,
) -> anyhow::Result<Vec<Duration>> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let s = tokio::net::TcpStream::connect(&addr).await?;
    s.set_nodelay(true)?;
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let mut rng = Rng::new(seed);
    let n = (rate * secs) as u64;
    let mut lat = Vec::with_capacity(n as usize);
    let mut line = String::new();
    let mut body = Vec::new();
    let start = tokio::time::Instant::now();
    for i in 0..n {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due).await;
        let key = rng.below(keys);
        let req =
            format!("GET /v1/features/user_activity/u{key:05} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        w.write_all(req.as_bytes()).await?;
        let mut len = 0usize;
        let mut first = true;
        loop {
            line.clear();
            r.read_line(&mut line).await?;
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
        body.resize(len, 0);
        r.read_exact(&mut body).await?;
        lat.push(due.elapsed());
    }
    Ok(lat)
}

/// `rate` GETs per second for `seconds` against `addr`, from one thread
/// driving `clients` keep-alive connections; sorted latencies.
fn load(a: &BenchServeArgs, addr: &str, round: usize) -> anyhow::Result<Vec<Duration>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let per = a.rate / a.clients as f64;
    let mut all = rt.block_on(async {
        let tasks: Vec<_> = (0..a.clients)
            .map(|c| {
                tokio::spawn(connection(
                    addr.to_string(),
                    a.keys,
                    per,
                    a.seconds,
                    (round * 1000 + c) as u64,
                ))
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await??);
        }
        anyhow::Ok(all)
    })?;
    all.sort();
    Ok(all)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e6
}

/// One POST; its status and how long the answer took.
fn post(addr: &str, path: &str, body: &[u8]) -> anyhow::Result<(u16, Duration)> {
    let mut s = TcpStream::connect(addr)?;
    let t0 = Instant::now();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    // The server may answer (and close) before the body is all sent.
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let took = t0.elapsed();
    let text = String::from_utf8_lossy(&out);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, took))
}

/// A small vector view served with the default limits: the filter bomb
/// and the flood against it.
fn abuse(dir: &Path) -> anyhow::Result<()> {
    fresh(dir)?;
    std::fs::write(
        dir.join("pipeline.sql"),
        "CREATE SOURCE items (item_id TEXT NOT NULL, category TEXT, emb FLOAT[4] NOT NULL,
            ts TIMESTAMP NOT NULL, WATERMARK FOR ts AS ts)
         WITH (connector = 'file', path = 'items.jsonl');
         CREATE FEATURE VIEW user_activity KEY item_id
           WITH (vector_index = 'emb', index_filter_columns = 'category')
         AS SELECT item_id, LAST_VALUE(emb) AS emb, LAST_VALUE(category) AS category
         FROM items GROUP BY item_id;",
    )?;
    let mut text = String::new();
    for i in 0..10_000 {
        let f = i as f64;
        text.push_str(&format!(
            "{{\"item_id\": \"i{i}\", \"category\": \"c{}\", \"emb\": [{}, {}, 1.0, 0.5], \"ts\": {i}}}\n",
            i % 10,
            f.sin(),
            f.cos()
        ));
    }
    std::fs::write(dir.join("items.jsonl"), text)?;
    let (_, mut job) = crate::open_run_job(dir, Duration::from_secs(1), false)?;
    job.run(&std::sync::atomic::AtomicBool::new(false))?;
    let (_rt, addr) = crate::serve_local(job.live(), ServeLimits::default())?;
    let bomb = vec!["category = 'c1'"; 50_000].join(" AND ");
    let body = format!(r#"{{"vector": [1, 0, 0, 1], "k": 10, "filter": "{bomb}"}}"#);
    let (st, took) = post(&addr, "/v1/features/user_activity/nearest", body.as_bytes())?;
    println!(
        "filter bomb (50,000 terms, {} KB): answered {st} in {:.2} ms",
        body.len() / 1000,
        took.as_secs_f64() * 1e3
    );
    let keys: Vec<String> = (0..400_000).map(|i| format!("\"u{i:07}\"")).collect();
    let body = format!("{{\"keys\": [{}]}}", keys.join(","));
    let (st, took) = post(&addr, "/v1/features/user_activity", body.as_bytes())?;
    println!(
        "flood (a batch of 400,000 keys, {} KB): answered {st} in {:.2} ms",
        body.len() / 1000,
        took.as_secs_f64() * 1e3
    );
    let keys: Vec<String> = (0..10_001).map(|i| format!("\"i{i}\"")).collect();
    let body = format!("{{\"keys\": [{}]}}", keys.join(","));
    let (st, took) = post(&addr, "/v1/features/user_activity", body.as_bytes())?;
    println!(
        "a batch one key past --max-batch-keys ({} KB): answered {st} in {:.2} ms",
        body.len() / 1000,
        took.as_secs_f64() * 1e3
    );
    Ok(())
}

/// Runs the benchmark and prints the report.
pub fn run(a: &BenchServeArgs) -> anyhow::Result<()> {
    let dir = a.dir.join("hop");
    fresh(&dir)?;
    std::fs::write(dir.join("pipeline.sql"), sluice_cli::QUICKSTART_SQL)?;
    generate::run(&generate::GenArgs::new(
        a.events,
        a.keys,
        120,
        dir.join("events.jsonl"),
    ))?;
    let (_, mut job) = crate::open_run_job(&dir, Duration::from_secs(10), false)?;
    let st = job.run(&std::sync::atomic::AtomicBool::new(false))?;
    println!(
        "state: the quickstart view over {} events, {} keys; load: {:.0} GET/s from {} keep-alive clients, {:.0} s per server per round, {} rounds",
        st.events, a.keys, a.rate, a.clients, a.seconds, a.rounds
    );
    let live = job.live();
    let (_rt1, limited) = crate::serve_local(Arc::clone(&live), ServeLimits::default())?;
    let (_rt2, open) = crate::serve_local(Arc::clone(&live), ServeLimits::unlimited())?;
    type Percentiles = Vec<(f64, f64, f64)>;
    // Warm-up: the block cache and the blocking pool of both servers.
    let warm = BenchServeArgs {
        seconds: 3.0,
        ..a.clone()
    };
    for addr in [&open, &limited] {
        load(&warm, addr, 99)?;
    }
    let mut rows: Vec<(&str, Percentiles)> = vec![
        ("no limits (baseline)", Vec::new()),
        ("default limits", Vec::new()),
    ];
    for round in 0..a.rounds {
        for (i, addr) in [&open, &limited].into_iter().enumerate() {
            let lat = load(a, addr, round)?;
            rows[i]
                .1
                .push((pct(&lat, 0.5), pct(&lat, 0.99), pct(&lat, 0.999)));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut p99s = Vec::new();
    for (name, r) in &rows {
        let mut p50: Vec<f64> = r.iter().map(|x| x.0).collect();
        let mut p99: Vec<f64> = r.iter().map(|x| x.1).collect();
        let mut p999: Vec<f64> = r.iter().map(|x| x.2).collect();
        let (m50, m99, m999) = (median(&mut p50), median(&mut p99), median(&mut p999));
        p99s.push(m99);
        println!(
            "  {name:>22}: p50 {m50:.0} µs, p99 {m99:.0} µs, p99.9 {m999:.0} µs (median of {} rounds; p99 per round {:?})",
            r.len(),
            r.iter().map(|x| x.1.round()).collect::<Vec<_>>()
        );
    }
    println!(
        "  p99 with limits / without: {:.2} (aim: within 1.10)",
        p99s[1] / p99s[0].max(1e-9)
    );
    abuse(&a.dir.join("abuse"))?;
    Ok(())
}
