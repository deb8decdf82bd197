//! `sluice produce`: writes a clickstream to a Kafka topic at a chosen rate,
//! keyed by user, for the examples, the tests and the benchmarks; as JSON,
//! or as Avro or Protobuf in Confluent's framing (encoded here from the
//! Avro specification and Protobuf's wire format, with the schemas
//! [`CLICKSTREAM_AVSC`] and [`CLICKSTREAM_PROTO`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};

use crate::commands::generate::{ClickContext, Event, Rng, clickstream_json, event};

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
    /// Payload encoding: `json`, `avro` or `protobuf` (the same fields, in
    /// Confluent framing; `--schema-out` writes the schema).
    #[arg(long, default_value = "json", value_parser = ["json", "avro", "protobuf"])]
    pub format: String,
    /// The Confluent schema id in front of each Avro or Protobuf record.
    #[arg(long, default_value_t = 1)]
    pub schema_id: u32,
    /// Write the schema of the records (`.avsc` for Avro, `.proto` with
    /// message `Click` for Protobuf) to this file.
    #[arg(long)]
    pub schema_out: Option<std::path::PathBuf>,
}

/// The Avro schema of `sluice produce --format avro` records: the fields of
/// the JSON clickstream, `ts` as `timestamp-millis`.
pub const CLICKSTREAM_AVSC: &str = r#"{
  "type": "record",
  "name": "Click",
  "namespace": "sluice.clickstream",
  "fields": [
    {"name": "user_id", "type": "string"},
    {"name": "item_id", "type": ["null", "string"], "default": null},
    {"name": "price", "type": ["null", "double"], "default": null},
    {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "session_id", "type": "string"},
    {"name": "page", "type": "string"},
    {"name": "device", "type": "string"},
    {"name": "referrer", "type": "string"}
  ]
}
"#;

/// The Protobuf schema of `sluice produce --format protobuf` records (the
/// message `Click`): the fields of the JSON clickstream, `ts` as a
/// `google.protobuf.Timestamp`.
pub const CLICKSTREAM_PROTO: &str = r#"syntax = "proto3";

package sluice.clickstream;

import "google/protobuf/timestamp.proto";

message Click {
  string user_id = 1;
  optional string item_id = 2;
  optional double price = 3;
  google.protobuf.Timestamp ts = 4;
  string session_id = 5;
  string page = 6;
  string device = 7;
  string referrer = 8;
}
"#;

/// Avro's `long`: zig-zag, then a varint.
fn avro_long(v: i64, out: &mut Vec<u8>) {
    varint(((v << 1) ^ (v >> 63)) as u64, out);
}

fn avro_string(s: &str, out: &mut Vec<u8>) {
    avro_long(s.len() as i64, out);
    out.extend_from_slice(s.as_bytes());
}

/// One event as a Confluent-framed Avro record of [`CLICKSTREAM_AVSC`],
/// the same values as [`clickstream_json`].
pub fn clickstream_avro(e: &Event, schema_id: u32, out: &mut Vec<u8>) {
    out.clear();
    out.push(0);
    out.extend_from_slice(&schema_id.to_be_bytes());
    avro_string(&format!("u{:05}", e.user), out);
    // Union branch 1 of each ["null", T].
    avro_long(1, out);
    avro_string(&format!("i{}", e.item), out);
    avro_long(1, out);
    out.extend_from_slice(&(e.price_cents as f64 / 100.0).to_le_bytes());
    avro_long(e.ts, out);
    let c = ClickContext::of(e);
    avro_string(&c.session_id, out);
    avro_string(&c.page, out);
    avro_string(c.device, out);
    avro_string(c.referrer, out);
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn proto_bytes(field: u64, b: &[u8], out: &mut Vec<u8>) {
    varint(field << 3 | 2, out);
    varint(b.len() as u64, out);
    out.extend_from_slice(b);
}

/// One event as a Confluent-framed Protobuf record of [`CLICKSTREAM_PROTO`]
/// (message indexes `[0]`, one zero byte), the same values as
/// [`clickstream_json`].
pub fn clickstream_protobuf(e: &Event, schema_id: u32, out: &mut Vec<u8>) {
    out.clear();
    out.push(0);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.push(0);
    proto_bytes(1, format!("u{:05}", e.user).as_bytes(), out);
    proto_bytes(2, format!("i{}", e.item).as_bytes(), out);
    // Field 3, wire type 1 (64-bit): the double, little-endian.
    varint(3 << 3 | 1, out);
    out.extend_from_slice(&(e.price_cents as f64 / 100.0).to_le_bytes());
    // google.protobuf.Timestamp: seconds (1) and nanos (2) as varints; a
    // negative int64 is its two's complement.
    let mut ts = Vec::with_capacity(12);
    varint(1 << 3, &mut ts);
    varint(e.ts.div_euclid(1000) as u64, &mut ts);
    let nanos = e.ts.rem_euclid(1000) * 1_000_000;
    if nanos != 0 {
        varint(2 << 3, &mut ts);
        varint(nanos as u64, &mut ts);
    }
    proto_bytes(4, &ts, out);
    let c = ClickContext::of(e);
    proto_bytes(5, c.session_id.as_bytes(), out);
    proto_bytes(6, c.page.as_bytes(), out);
    proto_bytes(7, c.device.as_bytes(), out);
    proto_bytes(8, c.referrer.as_bytes(), out);
}

/// One event as a record of `format` (`json`, `avro` or `protobuf`; the
/// two binary ones framed with `schema_id`), as `sluice produce` writes it.
pub fn clickstream_record(format: &str, e: &Event, schema_id: u32, out: &mut Vec<u8>) {
    match format {
        "avro" => clickstream_avro(e, schema_id, out),
        "protobuf" => clickstream_protobuf(e, schema_id, out),
        _ => {
            out.clear();
            out.extend_from_slice(clickstream_json(e).as_bytes());
        }
    }
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
    if let Some(p) = &a.schema_out {
        let schema = match a.format.as_str() {
            "protobuf" => CLICKSTREAM_PROTO,
            _ => CLICKSTREAM_AVSC,
        };
        std::fs::write(p, schema).with_context(|| format!("writing {}", p.display()))?;
    }
    let json = a.format == "json";
    let mut bytes = Vec::new();
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
        let bad = a.bad_every > 0 && (i + 1).is_multiple_of(a.bad_every);
        clickstream_record(&a.format, &e, a.schema_id, &mut bytes);
        if bad {
            if json {
                bytes = format!("{{\"user_id\":\"{key}\",\"ts\": not json").into_bytes();
            } else {
                // A record cut short.
                bytes.truncate(bytes.len() - 3);
            }
        }
        let mut record = BaseRecord::to(&a.topic).key(&key).payload(bytes.as_slice());
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
