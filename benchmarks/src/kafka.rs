//! `sluice-bench kafka`: the quickstart HOP(5 min, 1 h) view fed from a Kafka
//! topic, against the ceiling of a plain rdkafka consumer that only counts
//! the same topic's messages, measured in the same run; plus recovery time
//! after `kill -9` with a large keyed state.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::fresh;
use sluice_cli::commands::produce::{self, ProduceArgs};

/// Options of `sluice-bench kafka`.
#[derive(clap::Args, Debug)]
pub struct BenchKafkaArgs {
    /// Kafka bootstrap servers (loopback).
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    /// Events pre-loaded per topic.
    #[arg(long, default_value_t = 10_000_000)]
    events: u64,
    /// Distinct keys.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Event-time span, in minutes.
    #[arg(long, default_value_t = 240)]
    minutes: u64,
    /// Partition counts to measure (one topic each).
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    partitions: Vec<i32>,
    /// Milliseconds between checkpoints in the pipeline runs.
    #[arg(long, default_value_t = 1000)]
    checkpoint_interval_ms: u64,
    /// Keys of the recovery measurement (0 skips it).
    #[arg(long, default_value_t = 1_000_000)]
    recovery_keys: u64,
    /// Events of the recovery measurement.
    #[arg(long, default_value_t = 3_000_000)]
    recovery_events: u64,
    /// Working directory (state, lake).
    #[arg(long, default_value = "sluice-bench-kafka")]
    dir: PathBuf,
    /// librdkafka settings `name=value` for both the count-only consumer and
    /// the pipeline (repeatable), e.g. fetch sizes.
    #[arg(long = "kafka", value_name = "NAME=VALUE")]
    kafka: Vec<String>,
    /// Payload formats to measure, each on its own topic: `json` (with the
    /// archive run), `avro` and `protobuf` (Confluent-framed, the same events).
    #[arg(long, value_delimiter = ',', default_value = "json")]
    formats: Vec<String>,
    /// Before the broker runs: decode this many clickstream records of each
    /// of `--formats` on one thread, with the Kafka source's own decoder
    /// (0 skips it).
    #[arg(long, default_value_t = 1_000_000)]
    decode_records: u64,
    /// Only the decoding measurement; no broker needed.
    #[arg(long)]
    decode_only: bool,
    /// In the decoding measurement, also a poll with every Nth record cut
    /// in half (does not decode), against the all-good poll (0: not).
    #[arg(long, default_value_t = 2)]
    bad_every: usize,
    /// Worker threads of the pipeline runs (`sluice run --workers`).
    #[arg(long, default_value_t = sluice_engine::job::default_workers())]
    workers: usize,
}

/// Decoding alone, one thread: `n` clickstream records of each format
/// (encoded as `sluice produce` writes them, all eight fields declared)
/// through [`sluice_connectors::PayloadDecoder`] in polls of 8192, best of 3.
fn decode_only(a: &BenchKafkaArgs, dir: &Path) -> anyhow::Result<()> {
    use sluice_cli::commands::generate::{Rng, event};
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("clicks.avsc"), produce::CLICKSTREAM_AVSC)?;
    std::fs::write(dir.join("clicks.proto"), produce::CLICKSTREAM_PROTO)?;
    println!(
        "decoding alone, one thread: {} clickstream records per format, polls of 8192, best of 3",
        a.decode_records
    );
    let mut json_rate = None;
    for format in &a.formats {
        let options = match format.as_str() {
            "avro" => "format = 'avro', schema = 'clicks.avsc'",
            "protobuf" => "format = 'protobuf', schema = 'clicks.proto', message = 'Click'",
            _ => "format = 'json'",
        };
        let sql = format!(
            "CREATE SOURCE clicks (user_id TEXT NOT NULL, item_id TEXT, price DOUBLE, ts TIMESTAMP NOT NULL,
                session_id TEXT, page TEXT, device TEXT, referrer TEXT)
             WITH (connector = 'kafka', topic = 'clicks', brokers = '127.0.0.1:1', {options});
             CREATE FEATURE VIEW v KEY user_id AS SELECT user_id, price FROM clicks;"
        );
        let plan = sluice_sql::plan_pipeline("decode.sql", &sql, dir)?;
        let mut decoder = sluice_connectors::PayloadDecoder::new(&plan.sources[0])?;
        let mut rng = Rng::new(42);
        let records: Vec<Vec<u8>> = (0..a.decode_records)
            .map(|i| {
                let e = event(&mut rng, i, a.decode_records, a.keys, a.minutes);
                let mut out = Vec::new();
                produce::clickstream_record(format, &e, 1, &mut out);
                out
            })
            .collect();
        let bytes: usize = records.iter().map(Vec::len).sum();
        // The same poll with every `bad_every`-th record cut in half (a
        // record that does not decode): the slow path's rate.
        let mut broken = records.clone();
        let mut n_bad = 0;
        if a.bad_every > 0 {
            for r in broken.iter_mut().skip(a.bad_every - 1).step_by(a.bad_every) {
                r.truncate(r.len() / 2);
                n_bad += 1;
            }
        }
        let mut measure = |recs: &[Vec<u8>], want_bad: usize| -> anyhow::Result<f64> {
            let mut best = f64::INFINITY;
            for _ in 0..3 {
                let t = Instant::now();
                let (mut rows, mut bad) = (0, 0);
                for chunk in recs.chunks(8192) {
                    let refs: Vec<&[u8]> = chunk.iter().map(Vec::as_slice).collect();
                    let (batch, rejected) = decoder.decode_records(&refs)?;
                    bad += rejected.len();
                    rows += batch.map_or(0, |(b, _)| b.num_rows());
                }
                if rows + bad != recs.len() || bad > want_bad {
                    bail!(
                        "{format}: {rows} rows and {bad} rejected from {} records ({want_bad} bad)",
                        recs.len()
                    );
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            Ok(recs.len() as f64 / best)
        };
        let rate = measure(&records, 0)?;
        let vs = match (format.as_str(), json_rate) {
            ("json", _) => {
                json_rate = Some(rate);
                String::new()
            }
            (_, Some(j)) => format!(" ({:.2}x JSON)", rate / j),
            _ => String::new(),
        };
        println!(
            "  {format:>8}: {rate:>10.0} records/s{vs}, {:.0} B/record",
            bytes as f64 / records.len() as f64,
        );
        if n_bad > 0 {
            let slow = measure(&broken, n_bad)?;
            println!(
                "  {format:>8}, every {}th record bad: {slow:>10.0} records/s = {:.2}x slower than all good (aim: within 2x)",
                a.bad_every,
                rate / slow
            );
        }
    }
    Ok(())
}

fn end_offsets(brokers: &str, topic: &str) -> anyhow::Result<HashMap<i32, i64>> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut out = HashMap::new();
    for t in md.topics() {
        if t.error().is_some() {
            continue;
        }
        for p in t.partitions() {
            let (_, hi) = c.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
            out.insert(p.id(), hi);
        }
    }
    Ok(out)
}

/// Writes `events` clickstream events into a new topic.
fn preload(
    a: &BenchKafkaArgs,
    topic: &str,
    partitions: i32,
    events: u64,
    keys: u64,
    format: &str,
) -> anyhow::Result<u64> {
    if end_offsets(&a.brokers, topic).is_ok_and(|m| m.values().any(|o| *o > 0)) {
        bail!("topic {topic} already holds events");
    }
    let t = Instant::now();
    let n = produce::run(&ProduceArgs {
        brokers: a.brokers.clone(),
        topic: topic.to_string(),
        partitions,
        events,
        keys,
        rate: 0,
        live: false,
        minutes: a.minutes,
        seed: 42,
        first: 0,
        of: None,
        bad_every: 0,
        kafka: Vec::new(),
        format: format.to_string(),
        schema_id: 1,
        schema_out: None,
    })?;
    println!(
        "  topic {topic}: produced {n} events in {:.1}s ({:.0}/s)",
        t.elapsed().as_secs_f64(),
        n as f64 / t.elapsed().as_secs_f64()
    );
    Ok(n)
}

/// The ceiling: a plain consumer that reads every message and counts it.
fn count_only(
    brokers: &str,
    topic: &str,
    events: u64,
    settings: &[(String, String)],
) -> anyhow::Result<(f64, f64, u64)> {
    let cpu0 = crate::cpu_secs("self");
    let t = Instant::now();
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers)
        .set("group.id", "sluice-bench-count")
        .set("enable.auto.commit", "false");
    for (k, v) in settings {
        cfg.set(k, v);
    }
    let c: BaseConsumer = cfg.create()?;
    let mut tpl = TopicPartitionList::new();
    for p in end_offsets(brokers, topic)?.keys() {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    let (mut n, mut bytes) = (0u64, 0u64);
    let mut last = Instant::now();
    while n < events {
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                n += 1;
                bytes += m.payload_len() as u64;
                last = Instant::now();
            }
            Some(Err(e)) => bail!("count-only consumer: {e}"),
            None if last.elapsed() > Duration::from_secs(30) => {
                bail!("count-only consumer stalled at {n} of {events}")
            }
            None => {}
        }
    }
    Ok((
        t.elapsed().as_secs_f64(),
        crate::cpu_secs("self") - cpu0,
        bytes,
    ))
}

fn settings(a: &BenchKafkaArgs) -> anyhow::Result<Vec<(String, String)>> {
    a.kafka
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--kafka takes NAME=VALUE, found `{kv}`"))
        })
        .collect()
}

fn pipeline_sql(brokers: &str, topic: &str, settings: &[(String, String)]) -> String {
    let extra: String = settings
        .iter()
        .map(|(k, v)| format!(" kafka.{k} = '{v}',"))
        .collect();
    sluice_cli::QUICKSTART_SQL
        .replace("connector = 'file',", "connector = 'kafka',")
        .replace(
            "path = 'events.jsonl',",
            &format!("topic = '{topic}', brokers = '{brokers}', group_id = 'sluice-bench',{extra}"),
        )
}

/// One pipeline run over the topic in a fresh `pdir`; prints its figures
/// and returns its rate (events/s).
fn pipeline_run(a: &BenchKafkaArgs, pdir: &Path, sql: &str, what: &str) -> anyhow::Result<f64> {
    fresh(pdir)?;
    std::fs::write(pdir.join("pipeline.sql"), sql)?;
    let cpu0 = crate::cpu_secs("self");
    let (plan, mut job) = crate::open_run_job_with(
        pdir,
        Duration::from_millis(a.checkpoint_interval_ms),
        true,
        a.workers,
    )
    .context("opening the pipeline")?;
    for sp in &plan.sources {
        if let Some(w) = sluice_connectors::archive::archive_writer(sp)? {
            job.set_archive(&sp.name, Box::new(w))?;
        }
    }
    let s = job.run(&AtomicBool::new(false))?;
    let cpu = crate::cpu_secs("self") - cpu0;
    let rate = s.events as f64 / s.elapsed.as_secs_f64();
    let live = job.live();
    live.store.flush()?;
    let db = live.store.disk_bytes();
    let lake = sluice_engine::store::dir_size(&pdir.join("lake"));
    let archive = sluice_engine::store::dir_size(&pdir.join("archive"));
    drop(job);
    println!(
        "  sluice pipeline{what}, {} worker(s) (Kafka -> HOP view -> RocksDB state + online store + Parquet lake): {} events in {:.2}s = {rate:.0} events/s; {:.2} CPU-s per M events; {} rows emitted; {} dead letters",
        a.workers,
        s.events,
        s.elapsed.as_secs_f64(),
        cpu / (s.events as f64 / 1e6),
        s.rows_emitted,
        s.dead_letters
    );
    println!(
        "  checkpoints: {} taken, mean {:.1} ms, max {:.1} ms; RocksDB {:.0} MiB, lake {:.1} MiB, archive {:.1} MiB",
        s.checkpoints,
        s.checkpoint_time.as_secs_f64() * 1000.0 / s.checkpoints.max(1) as f64,
        s.checkpoint_max.as_secs_f64() * 1000.0,
        db as f64 / 1048576.0,
        lake as f64 / 1048576.0,
        archive as f64 / 1048576.0
    );
    Ok(rate)
}

fn http_status(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, buf.split("\r\n\r\n").nth(1).unwrap_or("").to_string()))
}

fn metric_sum(addr: &str, name: &str) -> Option<f64> {
    let (_, body) = http_status(addr, "/metrics")?;
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

/// Runs the binary on a topic with many keys, kills it with SIGKILL once it
/// has read everything and checkpointed, and times the restart until
/// `/readyz` answers 200.
fn recovery(a: &BenchKafkaArgs, dir: &Path) -> anyhow::Result<()> {
    let topic = format!(
        "bench-recovery-{}k-{}",
        a.recovery_keys / 1000,
        a.recovery_events
    );
    println!(
        "recovery: {} events over 60 min, {} keys, 1 partition",
        a.recovery_events, a.recovery_keys
    );
    let saved_minutes = a.minutes;
    let args = BenchKafkaArgs {
        minutes: 60,
        brokers: a.brokers.clone(),
        events: a.recovery_events,
        keys: a.recovery_keys,
        partitions: vec![1],
        checkpoint_interval_ms: a.checkpoint_interval_ms,
        recovery_keys: 0,
        recovery_events: 0,
        dir: a.dir.clone(),
        kafka: a.kafka.clone(),
        formats: vec!["json".into()],
        decode_records: 0,
        decode_only: false,
        bad_every: 0,
        workers: 1,
    };
    preload(&args, &topic, 1, a.recovery_events, a.recovery_keys, "json")?;
    let _ = saved_minutes;
    let rdir = dir.join("recovery");
    fresh(&rdir)?;
    std::fs::write(
        rdir.join("pipeline.sql"),
        pipeline_sql(&a.brokers, &topic, &settings(a)?),
    )?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let http = format!("127.0.0.1:{port}");
    let exe = crate::sluice_exe()?;
    let spawn = || {
        Command::new(&exe)
            .args([
                "run",
                "pipeline.sql",
                "--state-dir",
                "state",
                "--serve",
                &http,
            ])
            .args([
                "--checkpoint-interval-ms",
                &a.checkpoint_interval_ms.to_string(),
            ])
            .current_dir(&rdir)
            .env("SLUICE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
    };
    let mut child = spawn()?;
    let t = Instant::now();
    loop {
        if metric_sum(&http, "sluice_events_in_total") == Some(a.recovery_events as f64) {
            break;
        }
        if t.elapsed() > Duration::from_secs(1800) {
            let _ = child.kill();
            bail!("recovery run did not read its topic within 30 min");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let read_secs = t.elapsed().as_secs_f64();
    // Let a checkpoint commit the last batch, then kill -9.
    std::thread::sleep(Duration::from_millis(a.checkpoint_interval_ms * 3));
    child.kill()?;
    child.wait()?;
    let state_bytes = sluice_engine::store::dir_size(&rdir.join("state"));
    println!(
        "  first run read {} events in {read_secs:.1}s, killed with SIGKILL; state dir {:.0} MiB",
        a.recovery_events,
        state_bytes as f64 / 1048576.0
    );
    let t = Instant::now();
    let mut child = spawn()?;
    loop {
        if http_status(&http, "/readyz").is_some_and(|(c, _)| c == 200) {
            break;
        }
        if t.elapsed() > Duration::from_secs(600) {
            let _ = child.kill();
            bail!("restart not ready within 10 min");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let ready = t.elapsed().as_secs_f64();
    let cpu = crate::cpu_secs(&child.id().to_string());
    let open_keys = metric_sum(&http, "sluice_state_keys");
    child.kill()?;
    child.wait()?;
    println!(
        "  restart after kill -9: ready (state restored, partitions assigned) in {ready:.2}s, {cpu:.1} CPU-s{}",
        open_keys
            .map(|k| format!("; {k:.0} keys in open windows"))
            .unwrap_or_default()
    );
    Ok(())
}

/// Runs the benchmark and prints the comparison.
pub fn run(a: &BenchKafkaArgs) -> anyhow::Result<()> {
    fresh(&a.dir)?;
    let dir = a.dir.canonicalize()?;
    println!(
        "sluice-bench kafka: {} events ({} keys, {} min) per topic, brokers {}, HOP(5m, 1h), checkpoints every {} ms, client settings {:?}; build: {}",
        a.events,
        a.keys,
        a.minutes,
        a.brokers,
        a.checkpoint_interval_ms,
        a.kafka,
        if cfg!(debug_assertions) {
            "debug (use --release!)"
        } else {
            "release"
        }
    );
    for format in &a.formats {
        if !matches!(format.as_str(), "json" | "avro" | "protobuf") {
            bail!("--formats takes json, avro and protobuf, not `{format}`");
        }
    }
    if a.decode_records > 0 {
        decode_only(a, &dir.join("decode"))?;
    }
    if a.decode_only {
        return Ok(());
    }
    // Fresh topics per run: every measurement reads exactly what it wrote.
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for &parts in &a.partitions {
        let mut rates: Vec<(String, f64)> = Vec::new();
        for format in &a.formats {
            let rate = measure(a, &dir, parts, format, stamp)?;
            rates.push((format.clone(), rate));
        }
        if let Some((_, json)) = rates.iter().find(|(f, _)| f == "json") {
            for (f, rate) in rates.iter().filter(|(f, _)| f != "json") {
                println!(
                    "  => {f} pipeline / json pipeline = {:.1}% ({rate:.0} vs {json:.0} events/s)",
                    rate / json * 100.0
                );
            }
        }
    }
    if a.recovery_keys > 0 {
        recovery(a, &dir)?;
    }
    Ok(())
}

/// One topic of `parts` partitions in `format`: the count-only ceiling and
/// the pipeline over it (JSON: also with an event archive); returns the
/// pipeline's rate.
fn measure(
    a: &BenchKafkaArgs,
    dir: &Path,
    parts: i32,
    format: &str,
    stamp: u64,
) -> anyhow::Result<f64> {
    {
        let topic = format!(
            "bench-{}-{}k-p{parts}-{format}-{stamp}",
            a.events,
            a.keys / 1000
        );
        println!("{parts} partition(s), {format} records:");
        let n = preload(a, &topic, parts, a.events, a.keys, format)?;
        let (base_secs, base_cpu, bytes) = count_only(&a.brokers, &topic, n, &settings(a)?)?;
        let base_rate = n as f64 / base_secs;
        println!(
            "  count-only rdkafka consumer: {n} messages ({:.0} MiB payload, {:.0} B/message) in {base_secs:.2}s = {base_rate:.0} msg/s; {:.2} CPU-s per M",
            bytes as f64 / 1048576.0,
            bytes as f64 / n as f64,
            base_cpu / (n as f64 / 1e6)
        );

        let pdir = dir.join(format!("p{parts}-{format}"));
        let mut sql = pipeline_sql(&a.brokers, &topic, &settings(a)?);
        // The schema beside the run's folder, which the run starts afresh.
        if format == "avro" {
            let schema = dir.join("clicks.avsc");
            std::fs::write(&schema, produce::CLICKSTREAM_AVSC)?;
            sql = sql.replace(
                "format = 'json'",
                &format!("format = 'avro', schema = '{}'", schema.display()),
            );
        } else if format == "protobuf" {
            let schema = dir.join("clicks.proto");
            std::fs::write(&schema, produce::CLICKSTREAM_PROTO)?;
            sql = sql.replace(
                "format = 'json'",
                &format!(
                    "format = 'protobuf', schema = '{}', message = 'Click'",
                    schema.display()
                ),
            );
        }
        let plain = pipeline_run(a, &pdir, &sql, &format!(" ({format})"))?;
        println!(
            "  => pipeline / count-only consumer = {:.1}% (goal >= 50%)",
            plain / base_rate * 100.0
        );
        if format != "json" {
            return Ok(plain);
        }
        // The same run keeping an event archive of the source.
        let archived = pipeline_run(
            a,
            &dir.join(format!("p{parts}-archive")),
            &sql.replace("format = 'json'", "format = 'json', archive = 'archive'"),
            " with archive = 'archive'",
        )?;
        println!(
            "  => archive cost: {:.1}% of the throughput without it (aim < 10%)",
            (1.0 - archived / plain) * 100.0
        );
        Ok(plain)
    }
}
