//! `sluice produce`: writes a clickstream to a Kafka topic at a chosen rate,
//! keyed by user, for the examples, the tests and the benchmarks.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};

use crate::commands::generate::{Rng, clickstream_json, event};

/// Options of `sluice produce`.
#[derive(clap::Args, Debug, Clone)]
pub struct ProduceArgs {
    /// Kafka bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Topic to write (created with --partitions if it does not exist).
    #[arg(long, default_value = "clicks")]
    pub topic: String,
    /// Partitions of the topic when it is created.
    #[arg(long, default_value_t = 1)]
    pub partitions: i32,
    /// Number of events; 0 writes until interrupted.
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    /// Distinct users (the message key).
    #[arg(long, default_value_t = 1000)]
    pub keys: u64,
    /// Events per second; 0 writes as fast as the broker takes them.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Event time from the wall clock (live traffic) instead of a
    /// deterministic history starting 2024-01-01.
    #[arg(long)]
    pub live: bool,
    /// Event-time span of the history in minutes (without --live).
    #[arg(long, default_value_t = 180)]
    pub minutes: u64,
    /// Random seed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Index of the first event (to continue a history across runs).
    #[arg(long, default_value_t = 0)]
    pub first: u64,
    /// Total events of the history the indexes are spread over (default: --events).
    #[arg(long)]
    pub of: Option<u64>,
    /// Every N-th record is not valid JSON (to exercise dead letters); 0: none.
    #[arg(long, default_value_t = 0)]
    pub bad_every: u64,
    /// librdkafka options, `name=value` (repeatable), e.g. security settings.
    #[arg(long = "kafka", value_name = "NAME=VALUE")]
    pub kafka: Vec<String>,
}

struct Counting {
    failed: AtomicU64,
}

impl ClientContext for Counting {}

impl ProducerContext for Counting {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = r
            && self.failed.fetch_add(1, Ordering::Relaxed) == 0
        {
            eprintln!("delivery failed: {e}");
        }
    }
}

/// Writes the events; returns how many were written.
pub fn run(a: &ProduceArgs) -> anyhow::Result<u64> {
    let mut options = BTreeMap::new();
    for kv in &a.kafka {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--kafka takes NAME=VALUE, found `{kv}`"))?;
        options.insert(format!("kafka.{k}"), v.to_string());
    }
    if sluice_connectors::kafka::ensure_topic(&a.brokers, &a.topic, a.partitions, &options)? {
        eprintln!("created topic {} with {} partitions", a.topic, a.partitions);
    }
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &a.brokers)
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "1000000")
        .set("acks", "all");
    for (k, v) in &options {
        cfg.set(k.trim_start_matches("kafka."), v);
    }
    let producer: ThreadedProducer<Counting> = cfg
        .create_with_context(Counting {
            failed: AtomicU64::new(0),
        })
        .context("creating the Kafka producer")?;
    let total = a.of.unwrap_or(a.events).max(1);
    let mut rng = Rng::new(a.seed);
    // Advance the generator to `first` so split runs give one history.
    for i in 0..a.first {
        event(&mut rng, i, total, a.keys, a.minutes);
    }
    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut sent = 0u64;
    let mut i = a.first;
    while a.events == 0 || sent < a.events {
        let mut e = event(&mut rng, i, total, a.keys, a.minutes);
        if a.live {
            e.ts = chrono::Utc::now().timestamp_millis() - (e.ts % 2000);
        }
        let key = format!("u{:05}", e.user);
        let payload = if a.bad_every > 0 && (i + 1).is_multiple_of(a.bad_every) {
            format!("{{\"user_id\":\"{key}\",\"ts\": not json")
        } else {
            clickstream_json(&e)
        };
        let mut record = BaseRecord::to(&a.topic).key(&key).payload(&payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => bail!("producing to {}: {e}", a.topic),
            }
        }
        sent += 1;
        i += 1;
        if a.rate > 0 {
            let due = Duration::from_secs_f64(sent as f64 / a.rate as f64);
            let el = started.elapsed();
            if due > el {
                std::thread::sleep(due - el);
            }
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            eprintln!(
                "produced {sent} events ({:.0}/s)",
                sent as f64 / started.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .context("waiting for the broker to acknowledge")?;
    let failed = producer.context().failed.load(Ordering::Relaxed);
    if failed > 0 {
        bail!("{failed} of {sent} records were not delivered");
    }
    eprintln!(
        "produced {sent} events to {} in {:.2}s ({:.0}/s)",
        a.topic,
        started.elapsed().as_secs_f64(),
        sent as f64 / started.elapsed().as_secs_f64().max(1e-9)
    );
    Ok(sent)
}
