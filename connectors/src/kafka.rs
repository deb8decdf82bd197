//! Kafka in and out (rdkafka over the vendored librdkafka).
//!
//! The source assigns every partition of its topic to itself (no group
//! rebalancing) and starts each at the offset stored in the last checkpoint,
//! so state, online rows and offsets move together: after a crash the same
//! records are read again into the same state. The consumer group only hears
//! about offsets after a checkpoint, for lag monitoring.
//!
//! The outputs (dead-letter topic, feature-update topic) produce at least
//! once: each checkpoint waits until its records are acknowledged, and a crash
//! after that but before the checkpoint commits sends them again.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::{
    Array, ArrayRef, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use arrow::datatypes::{DataType, SchemaRef};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use sluice_engine::keys::key_strings;
use sluice_engine::output::{features_json, key_and_feature_columns};
use sluice_engine::{
    DeadLetter, DeadLetterKind, EngineError, OfflineSink, Poll, Result, Source, SourceBatch,
};
use sluice_sql::{MetadataKind, SourcePlan, ViewPlan};

use crate::avro::AvroRecords;
use crate::error::Error;
use crate::json::{JsonRecords, Reject, Span, spans_of};
use crate::protobuf::ProtobufRecords;

pub mod options;
pub use options::{KafkaOptions, PayloadFormat, Start};

/// How long start-up waits for the brokers to answer before it reports why not.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a poll waits for the first message.
const POLL_WAIT: Duration = Duration::from_millis(50);
/// How long a poll keeps filling a batch after its first message.
const BATCH_WAIT: Duration = Duration::from_millis(10);
/// A bounded run ends this long after it has read up to its end offsets.
const END_QUIET: Duration = Duration::from_millis(500);
/// How often consumer lag is published.
const LAG_EVERY: Duration = Duration::from_secs(1);
/// Offsets are packed as `partition << 48 | offset` in row positions.
const OFFSET_BITS: u32 = 48;

fn conn_err(what: &str, message: impl Into<String>) -> EngineError {
    EngineError::Connector {
        what: what.to_string(),
        message: message.into(),
    }
}

/// What the librdkafka callbacks saw, shared with the source.
#[derive(Debug, Default)]
struct Seen {
    /// The last error librdkafka reported.
    last_error: Option<String>,
    /// Set while no broker connection is up.
    down: Option<String>,
    /// High watermark per partition, from statistics.
    hi: HashMap<i32, i64>,
}

/// librdkafka callbacks: errors, statistics and logs into metrics and tracing.
pub struct Context {
    label: String,
    seen: Mutex<Seen>,
    delivery_failures: AtomicU64,
}

impl Context {
    fn new(label: &str) -> Self {
        Context {
            label: label.to_string(),
            seen: Mutex::new(Seen::default()),
            delivery_failures: AtomicU64::new(0),
        }
    }

    fn with_seen<T>(&self, f: impl FnOnce(&mut Seen) -> T) -> Option<T> {
        self.seen.lock().ok().map(|mut s| f(&mut s))
    }

    fn last_error(&self) -> Option<String> {
        self.with_seen(|s| s.last_error.clone()).flatten()
    }
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(client = %self.label, facility = fac, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(client = %self.label, facility = fac, "librdkafka: {message}")
            }
            _ => tracing::debug!(client = %self.label, facility = fac, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let code = error
            .rdkafka_error_code()
            .map(|c| format!("{c:?}"))
            .unwrap_or_else(|| "other".into());
        metrics::counter!("sluice_kafka_errors_total", "client" => self.label.clone(), "code" => code)
            .increment(1);
        let text = format!("{error}: {reason}");
        tracing::warn!(client = %self.label, "Kafka: {text}");
        let all_down = error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown);
        self.with_seen(|s| {
            if all_down {
                s.down = Some(format!("no broker reachable ({reason})"));
            }
            s.last_error = Some(text);
        });
    }

    fn stats(&self, st: Statistics) {
        let any_up = st.brokers.values().any(|b| b.state == "UP");
        let hi: HashMap<i32, i64> = st
            .topics
            .values()
            .flat_map(|t| t.partitions.iter())
            .filter(|(p, v)| **p >= 0 && v.hi_offset >= 0)
            .map(|(p, v)| (*p, v.hi_offset))
            .collect();
        metrics::counter!("sluice_kafka_bytes_received_total", "client" => self.label.clone())
            .absolute(st.rx_bytes.max(0) as u64);
        self.with_seen(|s| {
            if any_up {
                s.down = None;
            } else if !st.brokers.is_empty() && s.down.is_none() {
                s.down = Some(format!(
                    "no broker connection up{}",
                    s.last_error
                        .as_ref()
                        .map(|e| format!(" (last error: {e})"))
                        .unwrap_or_default()
                ));
            }
            s.hi.extend(hi);
        });
    }
}

impl ConsumerContext for Context {
    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, _: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::debug!(client = %self.label, error = %e, "offset report to the consumer group failed");
        }
    }
}

impl ProducerContext for Context {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.delivery_failures.fetch_add(1, Ordering::Relaxed);
            self.with_seen(|s| s.last_error = Some(format!("delivery failed: {e}")));
        }
    }
}

/// Client settings common to consumers and producers.
fn client_config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("statistics.interval.ms", "1000")
        .set("log_level", "4");
    c
}

/// The user's `kafka.*` options, passed to librdkafka unchanged (they win
/// over ours).
fn apply_user_options(c: &mut ClientConfig, options: &BTreeMap<String, String>) {
    for (k, v) in options {
        if let Some(k) = k.strip_prefix("kafka.") {
            c.set(k, v);
        }
    }
}

/// Per-message metadata kept for the metadata columns.
#[derive(Debug, Clone)]
struct MsgMeta {
    partition: i32,
    offset: i64,
    timestamp: Option<i64>,
    key: Option<String>,
}

/// The decoder of a topic's records.
enum Payload {
    Json(Box<JsonRecords>),
    Avro(Box<AvroRecords>),
    Protobuf(Box<ProtobufRecords>),
}

/// What [`PayloadDecoder::decode_records`] returns: the rows that decode,
/// each with the index of its record, and the dead letters of the others.
pub type Decoded = (Option<(RecordBatch, Vec<usize>)>, Vec<DeadLetter>);

/// The decoder of a Kafka source's payloads, by its `format` (JSON, Avro
/// or Protobuf), into batches of its payload columns (metadata columns
/// left out). [`KafkaSource`] decodes with it; it also runs alone, on
/// records from anywhere (to measure decoding, say).
pub struct PayloadDecoder {
    source: String,
    payload: Payload,
}

impl PayloadDecoder {
    /// The decoder of `plan`'s payload columns (its options parsed and its
    /// schema files read and checked).
    pub fn new(plan: &SourcePlan) -> Result<Self> {
        let o = KafkaOptions::parse(plan)?;
        Self::of(plan, &o.format)
    }

    fn of(plan: &SourcePlan, format: &PayloadFormat) -> Result<Self> {
        let schema = plan.payload_schema();
        let payload = match format {
            PayloadFormat::Json => Payload::Json(Box::new(JsonRecords::new(&plan.name, schema)?)),
            PayloadFormat::Avro(a) => {
                Payload::Avro(Box::new(AvroRecords::new(&plan.name, schema, a)?))
            }
            PayloadFormat::Protobuf(p) => {
                Payload::Protobuf(Box::new(ProtobufRecords::new(&plan.name, schema, p)?))
            }
        };
        Ok(PayloadDecoder {
            source: plan.name.clone(),
            payload,
        })
    }

    fn decode(
        &mut self,
        buf: &[u8],
        spans: &[Span],
        reject: Reject<'_>,
        rejected: &mut Vec<DeadLetter>,
    ) -> Result<Option<(RecordBatch, Vec<usize>)>> {
        match &mut self.payload {
            Payload::Json(r) => r.decode(buf, spans, reject, rejected),
            Payload::Avro(r) => r.decode(buf, spans, reject, rejected),
            Payload::Protobuf(r) => r.decode(buf, spans, reject, rejected),
        }
    }

    /// Decodes `records` (one payload each): a batch of those that decode,
    /// with the index of each row's record, and the dead letters of the
    /// others (positions are record indexes).
    pub fn decode_records(&mut self, records: &[&[u8]]) -> Result<Decoded> {
        let (buf, spans) = spans_of(records);
        let source = self.source.clone();
        let reject = |pos: u64, bytes: &[u8], kind: DeadLetterKind, reason: String| DeadLetter {
            source: source.clone(),
            position: pos.to_string(),
            kind,
            reason,
            record: String::from_utf8_lossy(bytes).into_owned(),
        };
        let mut rejected = Vec::new();
        let batch = self.decode(&buf, &spans, &reject, &mut rejected)?;
        Ok((batch, rejected))
    }
}

/// A Kafka topic as a source of JSON, Avro or Protobuf records.
pub struct KafkaSource {
    name: String,
    topic: String,
    brokers: String,
    start: Start,
    schema: SchemaRef,
    records: PayloadDecoder,
    /// For each schema column: `Ok(payload column index)` or `Err(metadata)`.
    columns: Vec<std::result::Result<usize, MetadataKind>>,
    consumer: BaseConsumer<Context>,
    ctx: Arc<Context>,
    /// Next offset to read, per assigned partition.
    next: BTreeMap<i32, i64>,
    reported: BTreeMap<i32, i64>,
    max_record_bytes: usize,
    buf: Vec<u8>,
    last_lag: Instant,
    assigned: bool,
    /// A `METADATA FROM 'key'` column exists.
    wants_key: bool,
    /// When a bounded run had read up to its end offsets.
    reached_end_at: Option<Instant>,
    /// Bounded run: the offsets to stop at, fixed when the source starts.
    stop_at: Option<BTreeMap<i32, i64>>,
    bounded: bool,
}

impl KafkaSource {
    /// A source for a planned `connector = 'kafka'` source. Nothing touches
    /// the network until [`Source::seek`].
    pub fn new(plan: &SourcePlan) -> Result<Self> {
        let what = format!("source {}", plan.name);
        let o = KafkaOptions::parse(plan)?;
        let mut cfg = client_config(&o.brokers);
        cfg.set("group.id", &o.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest");
        apply_user_options(&mut cfg, &o.client);
        let ctx = Context::new(&plan.name);
        let consumer: BaseConsumer<Context> = cfg
            .create_with_context(ctx)
            .map_err(|e| Error::kafka(format!("{}: invalid Kafka client settings", &what), e))?;
        let ctx = Arc::clone(consumer.context());
        let mut columns = Vec::new();
        let mut pi = 0;
        for i in 0..plan.schema.fields().len() {
            match plan.metadata.iter().find(|m| m.index == i) {
                Some(m) => columns.push(Err(m.kind)),
                None => {
                    columns.push(Ok(pi));
                    pi += 1;
                }
            }
        }
        Ok(KafkaSource {
            name: plan.name.clone(),
            topic: o.topic,
            brokers: o.brokers,
            start: o.start,
            schema: Arc::clone(&plan.schema),
            records: PayloadDecoder::of(plan, &o.format)?,
            columns,
            consumer,
            ctx,
            next: BTreeMap::new(),
            reported: BTreeMap::new(),
            max_record_bytes: o.max_record_bytes,
            buf: Vec::new(),
            last_lag: Instant::now(),
            assigned: false,
            stop_at: None,
            bounded: false,
            wants_key: plan.metadata.iter().any(|m| m.kind == MetadataKind::Key),
            reached_end_at: None,
        })
    }

    /// Makes the source bounded: it ends once it has read every partition
    /// up to the end offsets current when it starts (a catch-up run).
    pub fn stop_at_end(mut self) -> Self {
        self.bounded = true;
        self
    }

    /// A bounded source has read every partition up to its end offset, and
    /// `END_QUIET` has passed since (some brokers, e.g. tansu 0.6, report a
    /// high watermark at the start of the last record batch, not after it;
    /// the grace period reads that batch to its end). With `idle`, the
    /// consumer's fetch position counts too (it steps over control records).
    fn at_end(&mut self, idle: bool) -> bool {
        let Some(stop) = &self.stop_at else {
            return false;
        };
        let pos: BTreeMap<i32, i64> = if idle {
            self.consumer
                .position()
                .map(|tpl| offsets_of(&tpl))
                .unwrap_or_default()
        } else {
            BTreeMap::new()
        };
        let reached = stop.iter().all(|(p, end)| {
            let n = self.next.get(p).copied().unwrap_or(0);
            n.max(pos.get(p).copied().unwrap_or(0)) >= *end
        });
        if !reached {
            return false;
        }
        let at = *self.reached_end_at.get_or_insert_with(Instant::now);
        at.elapsed() >= END_QUIET
    }

    fn what(&self) -> String {
        format!(
            "source {} (topic `{}` at {})",
            self.name, self.topic, self.brokers
        )
    }

    fn with_last_error(&self, msg: String) -> String {
        match self.ctx.last_error() {
            Some(e) => format!("{msg}; last broker error: {e}"),
            None => msg,
        }
    }

    /// The topic's partitions, or an error that says why they cannot be read.
    fn fetch_partitions(&self) -> Result<Vec<i32>> {
        // Short tries, serving librdkafka's error events in between, so an
        // authentication failure ends the wait at once and is reported.
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let md = loop {
            match self
                .consumer
                .fetch_metadata(Some(&self.topic), Duration::from_millis(1000))
            {
                Ok(md) => break md,
                Err(e) => {
                    // Serve queued events (logs, statistics, errors): each
                    // poll call handles what arrives within its timeout.
                    let _ = self.consumer.poll(Duration::from_millis(100));
                    let auth = self
                        .ctx
                        .last_error()
                        .is_some_and(|m| m.contains("Authentication") || m.contains("SSL"));
                    if auth || Instant::now() >= deadline {
                        return Err(conn_err(
                            &self.what(),
                            self.with_last_error(format!(
                                "cannot read topic metadata{}: {e}; check `brokers`, the network and kafka.* security settings",
                                if auth {
                                    String::new()
                                } else {
                                    format!(" within {} s", CONNECT_TIMEOUT.as_secs())
                                }
                            )),
                        ));
                    }
                }
            }
        };
        let t = md
            .topics()
            .iter()
            .find(|t| t.name() == self.topic)
            .ok_or_else(|| {
                conn_err(
                    &self.what(),
                    "the brokers returned no metadata for the topic",
                )
            })?;
        if let Some(e) = t.error() {
            let code = RDKafkaErrorCode::from(e);
            let msg = if code == RDKafkaErrorCode::UnknownTopicOrPartition {
                "the topic does not exist; create it first (e.g. kafka-topics.sh --create --topic NAME --partitions N)".to_string()
            } else {
                format!("the topic cannot be read: {code}")
            };
            return Err(conn_err(&self.what(), self.with_last_error(msg)));
        }
        if t.partitions().is_empty() {
            return Err(conn_err(&self.what(), "the topic has no partitions"));
        }
        Ok(t.partitions().iter().map(|p| p.id()).collect())
    }

    fn resolve_start(&self, partitions: &[i32], start: Start) -> Result<BTreeMap<i32, i64>> {
        let mut out = BTreeMap::new();
        let committed = if start == Start::Committed {
            let mut tpl = TopicPartitionList::new();
            for p in partitions {
                tpl.add_partition(&self.topic, *p);
            }
            let c = self
                .consumer
                .committed_offsets(tpl, CONNECT_TIMEOUT)
                .map_err(|e| {
                    conn_err(
                        &self.what(),
                        self.with_last_error(format!(
                            "cannot read the group's committed offsets: {e}"
                        )),
                    )
                })?;
            offsets_of(&c)
        } else {
            BTreeMap::new()
        };
        for p in partitions {
            if let Some(o) = committed.get(p) {
                out.insert(*p, *o);
                continue;
            }
            let (lo, hi) = self
                .consumer
                .fetch_watermarks(&self.topic, *p, CONNECT_TIMEOUT)
                .map_err(|e| {
                    conn_err(
                        &self.what(),
                        self.with_last_error(format!(
                            "cannot read the offsets of partition {p}: {e}"
                        )),
                    )
                })?;
            out.insert(*p, if start == Start::Latest { hi } else { lo });
        }
        Ok(out)
    }

    /// The next offset of every assigned partition, as a partition list.
    fn next_offsets(&self) -> Result<TopicPartitionList> {
        let mut tpl = TopicPartitionList::new();
        for (p, o) in &self.next {
            tpl.add_partition_offset(&self.topic, *p, Offset::Offset(*o))
                .map_err(|e| conn_err(&self.what(), format!("partition {p}: {e}")))?;
        }
        Ok(tpl)
    }

    fn assign(&mut self) -> Result<()> {
        let tpl = self.next_offsets()?;
        self.consumer
            .assign(&tpl)
            .map_err(|e| Error::kafka(format!("{}: cannot assign partitions", &self.what()), e))?;
        metrics::counter!("sluice_kafka_rebalances_total", "source" => self.name.clone())
            .increment(1);
        self.assigned = true;
        Ok(())
    }

    fn publish_lag(&mut self) {
        if self.last_lag.elapsed() < LAG_EVERY {
            return;
        }
        self.last_lag = Instant::now();
        let hi = self.ctx.with_seen(|s| s.hi.clone()).unwrap_or_default();
        for (p, next) in &self.next {
            if let Some(h) = hi.get(p) {
                metrics::gauge!("sluice_kafka_consumer_lag", "source" => self.name.clone(), "partition" => p.to_string())
                    .set((h - next).max(0) as f64);
            }
        }
    }

    fn reject(&self, pos: u64, bytes: &[u8], kind: DeadLetterKind, reason: String) -> DeadLetter {
        kafka_reject(&self.name, &self.topic, pos, bytes, kind, reason)
    }
}

fn kafka_reject(
    source: &str,
    topic: &str,
    pos: u64,
    bytes: &[u8],
    kind: DeadLetterKind,
    reason: String,
) -> DeadLetter {
    DeadLetter {
        source: source.to_string(),
        position: describe(topic, pos),
        kind,
        reason,
        // A Kafka dead letter keeps the whole record so it can be replayed.
        record: String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// The concrete offsets of a partition list (logical ones such as
/// "beginning" or "invalid" left out).
fn offsets_of(tpl: &TopicPartitionList) -> BTreeMap<i32, i64> {
    tpl.elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect()
}

fn pack(partition: i32, offset: i64) -> u64 {
    ((partition.max(0) as u64) << OFFSET_BITS) | (offset.max(0) as u64 & ((1 << OFFSET_BITS) - 1))
}

fn describe(topic: &str, pos: u64) -> String {
    format!(
        "{topic}/{}@{}",
        pos >> OFFSET_BITS,
        pos & ((1 << OFFSET_BITS) - 1)
    )
}

/// What a Kafka source stores in a checkpoint.
#[derive(serde::Serialize, serde::Deserialize)]
struct Position {
    topic: String,
    /// Next offset to read per partition.
    offsets: BTreeMap<i32, i64>,
}

impl Source for KafkaSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn seek(&mut self, position: Option<&[u8]>) -> Result<()> {
        let saved = match position {
            None => BTreeMap::new(),
            Some(b) => {
                let p: Position = serde_json::from_slice(b).map_err(|e| {
                    conn_err(
                        &self.what(),
                        format!("unreadable checkpointed offsets: {e}"),
                    )
                })?;
                if p.topic != self.topic {
                    return Err(conn_err(
                        &self.what(),
                        format!(
                            "this state dir holds offsets of topic `{}`; reading another topic needs a new --state-dir",
                            p.topic
                        ),
                    ));
                }
                p.offsets
            }
        };
        let partitions = self.fetch_partitions()?;
        let missing: Vec<i32> = partitions
            .iter()
            .copied()
            .filter(|p| !saved.contains_key(p))
            .collect();
        // `start` applies to a fresh state dir. After a checkpoint, a
        // partition it does not know was added since: all its records are
        // new to this pipeline, so it is read from its beginning.
        let start = if saved.is_empty() {
            self.start
        } else {
            Start::Earliest
        };
        let mut next = saved;
        next.extend(self.resolve_start(&missing, start)?);
        self.next = next;
        self.reported = self.next.clone();
        if self.bounded {
            let mut stop = BTreeMap::new();
            for p in &partitions {
                let (_, hi) = self
                    .consumer
                    .fetch_watermarks(&self.topic, *p, CONNECT_TIMEOUT)
                    .map_err(|e| {
                        conn_err(
                            &self.what(),
                            format!("cannot read the end offset of partition {p}: {e}"),
                        )
                    })?;
                stop.insert(*p, hi);
            }
            tracing::info!(source = %self.name, end = ?stop, "bounded run: stopping at these offsets");
            self.stop_at = Some(stop);
        }
        self.assign()?;
        tracing::info!(source = %self.name, topic = %self.topic, offsets = ?self.next, "Kafka source assigned");
        Ok(())
    }

    fn poll(&mut self, max_rows: usize) -> Result<Poll> {
        if !self.assigned {
            self.seek(None)?;
        }
        if self.bounded && self.at_end(false) {
            return Ok(Poll::End);
        }
        let mut rejected = Vec::new();
        let mut spans: Vec<Span> = Vec::new();
        let mut meta: Vec<MsgMeta> = Vec::new();
        self.buf.clear();
        let mut received = 0usize;
        let mut bytes = 0u64;
        // Wait up to POLL_WAIT for the first message, then fill the batch
        // for at most BATCH_WAIT more (bigger batches, bounded latency).
        let mut fill_until: Option<Instant> = None;
        while received < max_rows {
            // What is already fetched is taken without waiting (and without
            // reading the clock per message); only an empty queue waits.
            let mut m = match fill_until {
                None => self.consumer.poll(POLL_WAIT),
                Some(_) => self.consumer.poll(Duration::ZERO),
            };
            if m.is_none()
                && let Some(t) = fill_until
            {
                let left = t.saturating_duration_since(Instant::now());
                if !left.is_zero() {
                    m = self.consumer.poll(left);
                }
            }
            let m = match m {
                None => break,
                Some(Err(e)) => {
                    let code = e
                        .rdkafka_error_code()
                        .map(|c| format!("{c:?}"))
                        .unwrap_or_else(|| "other".into());
                    metrics::counter!("sluice_kafka_fetch_errors_total", "source" => self.name.clone(), "code" => code)
                        .increment(1);
                    tracing::warn!(source = %self.name, error = %e, "Kafka fetch error");
                    self.ctx.with_seen(|s| s.last_error = Some(e.to_string()));
                    break;
                }
                Some(Ok(m)) => m,
            };
            received += 1;
            fill_until.get_or_insert_with(|| Instant::now() + BATCH_WAIT);
            let (p, off) = (m.partition(), m.offset());
            if self.next.get(&p).is_some_and(|n| off < *n) {
                // Already read (a re-fetch after a reconnect): skip.
                continue;
            }
            self.next.insert(p, off + 1);
            let pos = pack(p, off);
            let Some(payload) = m.payload() else {
                rejected.push(self.reject(
                    pos,
                    b"",
                    DeadLetterKind::MalformedJson,
                    "the message has no payload (a tombstone)".into(),
                ));
                continue;
            };
            bytes += payload.len() as u64;
            if payload.len() > self.max_record_bytes {
                rejected.push(self.reject(
                    pos,
                    &payload[..payload.len().min(crate::json::RECORD_PREVIEW)],
                    DeadLetterKind::Oversized,
                    format!(
                        "record of {} bytes exceeds max_record_bytes = {}",
                        payload.len(),
                        self.max_record_bytes
                    ),
                ));
                continue;
            }
            let start = self.buf.len();
            self.buf.extend_from_slice(payload);
            let end = self.buf.len();
            self.buf.push(b'\n');
            spans.push(Span { start, end, pos });
            meta.push(MsgMeta {
                partition: p,
                offset: off,
                timestamp: m.timestamp().to_millis(),
                // Only copied when a metadata column asks for it.
                key: if self.wants_key {
                    m.key().map(|k| String::from_utf8_lossy(k).into_owned())
                } else {
                    None
                },
            });
        }
        if received > 0 {
            self.ctx.with_seen(|s| s.down = None);
            metrics::counter!("sluice_kafka_messages_total", "source" => self.name.clone())
                .increment(received as u64);
            metrics::counter!("sluice_kafka_payload_bytes_total", "source" => self.name.clone())
                .increment(bytes);
        }
        self.publish_lag();
        if received == 0 {
            return Ok(if self.at_end(true) {
                Poll::End
            } else {
                Poll::Idle
            });
        }
        let buf = std::mem::take(&mut self.buf);
        let (name, topic) = (&self.name, &self.topic);
        let reject = |pos: u64, bytes: &[u8], kind: DeadLetterKind, reason: String| {
            kafka_reject(name, topic, pos, bytes, kind, reason)
        };
        let decoded = self.records.decode(&buf, &spans, &reject, &mut rejected);
        self.buf = buf;
        let Some((payload, rows)) = decoded? else {
            return Ok(Poll::Data {
                batch: None,
                rejected,
            });
        };
        // Metadata columns; a NOT NULL one without a value rejects the row.
        let mut keep: Vec<bool> = vec![true; rows.len()];
        let mut cols: Vec<ArrayRef> = Vec::with_capacity(self.columns.len());
        for (i, c) in self.columns.iter().enumerate() {
            let field = self.schema.field(i);
            let col: ArrayRef = match c {
                Ok(pi) => Arc::clone(payload.column(*pi)),
                Err(MetadataKind::Key) => Arc::new(StringArray::from_iter(
                    rows.iter().map(|r| meta[*r].key.clone()),
                )),
                Err(MetadataKind::Partition) => match field.data_type() {
                    DataType::Int32 => Arc::new(Int32Array::from_iter_values(
                        rows.iter().map(|r| meta[*r].partition),
                    )),
                    _ => Arc::new(Int64Array::from_iter_values(
                        rows.iter().map(|r| meta[*r].partition as i64),
                    )),
                },
                Err(MetadataKind::Offset) => Arc::new(Int64Array::from_iter_values(
                    rows.iter().map(|r| meta[*r].offset),
                )),
                Err(MetadataKind::Timestamp) => Arc::new(TimestampMillisecondArray::from_iter(
                    rows.iter().map(|r| meta[*r].timestamp),
                )),
            };
            if c.is_err() && !field.is_nullable() && col.null_count() > 0 {
                for (j, k) in keep.iter_mut().enumerate() {
                    if *k && col.is_null(j) {
                        *k = false;
                        let sp = spans[rows[j]];
                        rejected.push(self.reject(
                            sp.pos,
                            &self.buf[sp.start..sp.end],
                            DeadLetterKind::MissingField,
                            format!("required metadata `{}` is missing", field.name()),
                        ));
                    }
                }
            }
            cols.push(col);
        }
        let batch = RecordBatch::try_new(Arc::clone(&self.schema), cols)
            .map_err(|e| EngineError::arrow(format!("source {}", self.name), e))?;
        let (batch, rows) = if keep.iter().all(|k| *k) {
            (batch, rows)
        } else {
            let b = arrow::compute::filter_record_batch(
                &batch,
                &arrow::array::BooleanArray::from(keep.clone()),
            )
            .map_err(|e| EngineError::arrow("dropping rows without metadata", e))?;
            let rows = rows
                .into_iter()
                .zip(keep)
                .filter(|(_, k)| *k)
                .map(|(r, _)| r)
                .collect();
            (b, rows)
        };
        let batch = (batch.num_rows() > 0).then(|| SourceBatch {
            row_positions: rows.iter().map(|r| spans[*r].pos).collect(),
            partitions: rows.iter().map(|r| meta[*r].partition as u32).collect(),
            batch,
        });
        Ok(Poll::Data { batch, rejected })
    }

    fn position(&self) -> Vec<u8> {
        serde_json::to_vec(&Position {
            topic: self.topic.clone(),
            offsets: self.next.clone(),
        })
        .unwrap_or_default()
    }

    fn describe_position(&self, pos: u64) -> String {
        describe(&self.topic, pos)
    }

    fn row_origin(&self, pos: u64) -> (Option<i32>, Option<i64>) {
        (
            i32::try_from(pos >> OFFSET_BITS).ok(),
            i64::try_from(pos & ((1 << OFFSET_BITS) - 1)).ok(),
        )
    }

    fn partitions(&self) -> Vec<u32> {
        self.next.keys().map(|p| *p as u32).collect()
    }

    fn health(&self) -> Option<String> {
        self.ctx.with_seen(|s| s.down.clone()).flatten()
    }

    fn committed(&mut self) -> Result<()> {
        for (p, o) in &self.next {
            metrics::gauge!("sluice_kafka_checkpoint_offset", "source" => self.name.clone(), "partition" => p.to_string())
                .set(*o as f64);
        }
        if self.next == self.reported || self.health().is_some() {
            return Ok(());
        }
        let tpl = self.next_offsets()?;
        self.consumer
            .commit(&tpl, CommitMode::Async)
            .map_err(|e| Error::kafka(format!("{}: offset report", &self.what()), e))?;
        self.reported = self.next.clone();
        Ok(())
    }
}

/// A producer that waits for acknowledgements at each checkpoint.
pub struct TopicWriter {
    label: String,
    topic: String,
    producer: BaseProducer<Context>,
    pending: u64,
}

impl TopicWriter {
    /// A producer to `topic` on `brokers`, with `kafka.*` options passed on.
    pub fn new(
        label: &str,
        brokers: &str,
        topic: &str,
        options: &BTreeMap<String, String>,
    ) -> Result<Self> {
        // An output topic that does not exist yet is created (one
        // partition); where clients may not create topics this fails with
        // the broker's reason.
        if ensure_topic(brokers, topic, 1, options)? {
            tracing::info!(client = %label, %topic, "created output topic");
        }
        let mut cfg = client_config(brokers);
        // No delivery deadline: while the broker is away a checkpoint waits
        // (and says so in the log) instead of failing the pipeline; errors
        // the broker reports for good (e.g. authorization) still fail it.
        cfg.set("acks", "all")
            .set("linger.ms", "20")
            .set("message.timeout.ms", "0");
        apply_user_options(&mut cfg, options);
        let producer: BaseProducer<Context> =
            cfg.create_with_context(Context::new(label)).map_err(|e| {
                // Through `Error::kafka`, which masks a secret setting's value.
                let e = crate::Error::kafka(label, e);
                conn_err(
                    label,
                    format!("invalid Kafka producer settings for topic `{topic}`: {e}"),
                )
            })?;
        Ok(TopicWriter {
            label: label.to_string(),
            topic: topic.to_string(),
            producer,
            pending: 0,
        })
    }

    /// Queues one record (waits while librdkafka's queue is full).
    pub fn send(&mut self, key: &[u8], payload: &[u8], headers: &[(&str, &str)]) -> Result<()> {
        let mut h = OwnedHeaders::new_with_capacity(headers.len());
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut record = BaseRecord::to(&self.topic)
            .key(key)
            .payload(payload)
            .headers(h);
        loop {
            match self.producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    self.producer.poll(Duration::from_millis(50));
                }
                Err((e, _)) => {
                    return Err(conn_err(
                        &self.label,
                        format!("cannot queue a record for topic `{}`: {e}", self.topic),
                    ));
                }
            }
        }
        self.pending += 1;
        self.producer.poll(Duration::ZERO);
        Ok(())
    }

    /// Waits until every queued record is acknowledged (or failed for good,
    /// after librdkafka's `message.timeout.ms`).
    pub fn flush(&mut self) -> Result<()> {
        if self.pending == 0 {
            return Ok(());
        }
        let ctx = self.producer.context();
        let before = ctx.delivery_failures.load(Ordering::Relaxed);
        loop {
            match self.producer.flush(Duration::from_secs(10)) {
                Ok(()) => break,
                Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut)) => {
                    tracing::warn!(client = %self.label, topic = %self.topic, "still waiting for Kafka to acknowledge records");
                }
                Err(e) => {
                    return Err(conn_err(
                        &self.label,
                        format!("flushing records to topic `{}`: {e}", self.topic),
                    ));
                }
            }
        }
        let failed = ctx.delivery_failures.load(Ordering::Relaxed) - before;
        self.pending = 0;
        if failed > 0 {
            return Err(conn_err(
                &self.label,
                format!(
                    "{failed} records could not be delivered to topic `{}`: {}",
                    self.topic,
                    ctx.last_error().unwrap_or_default()
                ),
            ));
        }
        Ok(())
    }
}

/// A feature view's rows published to a topic as JSON, keyed by entity key.
pub struct FeatureTopic {
    view: String,
    keys: Vec<usize>,
    features: Vec<usize>,
    writer: TopicWriter,
}

impl FeatureTopic {
    /// The feature-update output of `view` (`kafka_topic` set).
    pub fn new(view: &ViewPlan, options: &BTreeMap<String, String>) -> Result<Option<Self>> {
        let (Some(topic), Some(brokers)) = (&view.kafka_topic, &view.kafka_brokers) else {
            return Ok(None);
        };
        let (keys, features) = key_and_feature_columns(view);
        Ok(Some(FeatureTopic {
            view: view.name.clone(),
            keys,
            features,
            writer: TopicWriter::new(&format!("view {}", view.name), brokers, topic, options)?,
        }))
    }
}

impl OfflineSink for FeatureTopic {
    fn write_epoch(&mut self, epoch: u64, batches: &[RecordBatch]) -> Result<usize> {
        let mut n = 0;
        let epoch_s = epoch.to_string();
        for b in batches {
            let keys: Vec<ArrayRef> = self.keys.iter().map(|i| Arc::clone(b.column(*i))).collect();
            let keys = key_strings(&keys)?;
            let feats = features_json(b, &self.features)?;
            let ms = |c: usize, i: usize| {
                b.column(c)
                    .as_any()
                    .downcast_ref::<TimestampMillisecondArray>()
                    .filter(|a| a.is_valid(i))
                    .map(|a| a.value(i).to_string())
                    .unwrap_or_else(|| "null".into())
            };
            for (i, (k, f)) in keys.iter().zip(feats).enumerate() {
                let key_json = serde_json::to_string(k).unwrap_or_default();
                let v = format!(
                    "{{\"view\":\"{}\",\"key\":{key_json},\"window_start\":{},\"window_end\":{},\"features\":{}}}",
                    self.view,
                    ms(0, i),
                    ms(1, i),
                    String::from_utf8_lossy(&f)
                );
                self.writer.send(
                    k.as_bytes(),
                    v.as_bytes(),
                    &[("sluice-view", &self.view), ("sluice-epoch", &epoch_s)],
                )?;
                n += 1;
            }
        }
        self.writer.flush()?;
        metrics::counter!("sluice_kafka_feature_updates_total", "view" => self.view.clone())
            .increment(n as u64);
        Ok(n)
    }

    fn recover(&mut self, _writer: &str, _committed: u64) -> Result<()> {
        // Records of an uncommitted epoch cannot be taken back; they are
        // sent again with the same key, window and values (at least once).
        Ok(())
    }
}

/// Dead letters of one source to a topic, with headers naming source,
/// partition, offset and reason.
pub struct DeadLetterTopic {
    writer: TopicWriter,
}

impl DeadLetterTopic {
    /// For a source with `dead_letter_topic` set.
    pub fn new(plan: &SourcePlan) -> Result<Option<Self>> {
        if plan.connector != "kafka" {
            return Ok(None);
        }
        let o = KafkaOptions::parse(plan)?;
        let Some(topic) = &o.dead_letter_topic else {
            return Ok(None);
        };
        Ok(Some(DeadLetterTopic {
            writer: TopicWriter::new(
                &format!("dead letters of {}", plan.name),
                &o.brokers,
                topic,
                &o.client,
            )?,
        }))
    }

    /// Queues one dead letter.
    pub fn send(&mut self, d: &DeadLetter) -> Result<()> {
        // Position `topic/partition@offset`.
        let (partition, offset) = d
            .position
            .rsplit_once('/')
            .and_then(|(_, po)| po.split_once('@'))
            .unwrap_or(("", ""));
        self.writer.send(
            d.position.as_bytes(),
            d.record.as_bytes(),
            &[
                ("sluice-source", &d.source),
                ("sluice-position", &d.position),
                ("sluice-partition", partition),
                ("sluice-offset", offset),
                ("sluice-kind", d.kind.as_str()),
                ("sluice-reason", &d.reason),
            ],
        )
    }

    /// Waits for acknowledgements.
    pub fn flush(&mut self) -> Result<()> {
        self.writer.flush()
    }
}

/// Creates `topic` with `partitions` partitions unless it exists; returns
/// whether it was created.
pub fn ensure_topic(
    brokers: &str,
    topic: &str,
    partitions: i32,
    options: &BTreeMap<String, String>,
) -> Result<bool> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let what = format!("topic `{topic}` at {brokers}");
    let mut cfg = client_config(brokers);
    apply_user_options(&mut cfg, options);
    let admin: AdminClient<Context> = cfg
        .create_with_context(Context::new("admin"))
        .map_err(|e| Error::kafka(format!("{}: invalid Kafka client settings", &what), e))?;
    let md = admin
        .inner()
        .fetch_metadata(Some(topic), CONNECT_TIMEOUT)
        .map_err(|e| {
            conn_err(
                &what,
                format!(
                    "cannot reach the brokers within {} s: {e}",
                    CONNECT_TIMEOUT.as_secs()
                ),
            )
        })?;
    if md
        .topics()
        .iter()
        .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
    {
        return Ok(false);
    }
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(CONNECT_TIMEOUT));
    let res = futures::executor::block_on(admin.create_topics([&new], &opts))
        .map_err(|e| Error::kafka(format!("{}: cannot create the topic", &what), e))?;
    for r in res {
        match r {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => return Ok(false),
            Err((_, code)) => {
                return Err(conn_err(&what, format!("cannot create the topic: {code}")));
            }
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::DefaultProducerContext;

    use super::*;

    fn plan(brokers: &str) -> SourcePlan {
        let sql = format!(
            "CREATE SOURCE clicks (user_id TEXT NOT NULL, n BIGINT, k TEXT METADATA FROM 'key',
               p BIGINT METADATA FROM 'partition', ts TIMESTAMP NOT NULL,
               WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)
             WITH (connector = 'kafka', topic = 'clicks', brokers = '{brokers}');
             CREATE FEATURE VIEW v KEY user_id AS SELECT user_id, n FROM clicks;"
        );
        let p = sluice_sql::plan_pipeline("t.sql", &sql, std::path::Path::new(".")).expect("plan");
        p.sources[0].clone()
    }

    fn produce(brokers: &str, records: &[(i32, &str, &str)]) {
        let p: BaseProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .expect("producer");
        for (part, key, payload) in records {
            p.send(
                BaseRecord::to("clicks")
                    .partition(*part)
                    .key(*key)
                    .payload(*payload),
            )
            .map_err(|(e, _)| e)
            .expect("send");
        }
        p.flush(Duration::from_secs(10)).expect("flush");
    }

    /// Polls until `n` rows and rejects arrived (or 10 s passed).
    fn poll_rows(src: &mut KafkaSource, n: usize) -> (Vec<RecordBatch>, Vec<u32>, Vec<DeadLetter>) {
        let (mut batches, mut parts, mut dead) = (Vec::new(), Vec::new(), Vec::new());
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = 0;
        while got < n && Instant::now() < deadline {
            if let Poll::Data { batch, rejected } = src.poll(100).expect("poll") {
                got += rejected.len();
                dead.extend(rejected);
                if let Some(b) = batch {
                    got += b.batch.num_rows();
                    parts.extend(b.partitions);
                    batches.push(b.batch);
                }
            }
        }
        (batches, parts, dead)
    }

    #[test]
    fn reads_partitions_with_metadata_and_resumes_from_its_position() {
        let mock = MockCluster::new(1).expect("mock cluster");
        mock.create_topic("clicks", 2, 1).expect("topic");
        let brokers = mock.bootstrap_servers();
        let ev = |u: &str, n: i64| {
            format!(r#"{{"user_id":"{u}","n":{n},"ts":"2024-01-01T00:00:0{n}Z"}}"#)
        };
        let (a, b, c) = (ev("a", 1), ev("b", 2), ev("c", 3));
        produce(
            &brokers,
            &[
                (0, "a", &a),
                (1, "b", &b),
                (1, "x", "{broken"),
                (0, "c", &c),
            ],
        );

        let mut src = KafkaSource::new(&plan(&brokers)).expect("source");
        src.seek(None).expect("seek");
        assert_eq!(src.partitions(), vec![0, 1]);
        let (batches, parts, dead) = poll_rows(&mut src, 4);
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        assert_eq!(rows, 3);
        let mut sorted = parts.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 0, 1]);
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].position, "clicks/1@1");
        assert_eq!(dead[0].kind, DeadLetterKind::MalformedJson);
        // Metadata columns: key and partition.
        for batch in &batches {
            let users = batch
                .column(0)
                .as_any()
                .downcast_ref::<StringArray>()
                .expect("users");
            let keys = batch
                .column(2)
                .as_any()
                .downcast_ref::<StringArray>()
                .expect("keys");
            let ps = batch
                .column(3)
                .as_any()
                .downcast_ref::<Int64Array>()
                .expect("parts");
            for i in 0..batch.num_rows() {
                assert_eq!(users.value(i), keys.value(i));
                assert_eq!(ps.value(i), if users.value(i) == "b" { 1 } else { 0 });
            }
        }
        let pos = src.position();
        let p: Position = serde_json::from_slice(&pos).expect("position");
        assert_eq!(p.offsets, BTreeMap::from([(0, 2), (1, 2)]));

        // A new source from that position reads only what came later.
        drop(src);
        let d = ev("d", 4);
        produce(&brokers, &[(1, "d", &d)]);
        let mut src = KafkaSource::new(&plan(&brokers)).expect("source");
        src.seek(Some(&pos)).expect("seek");
        let (batches, parts, dead) = poll_rows(&mut src, 1);
        assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
        assert_eq!(parts, vec![1]);
        assert!(dead.is_empty());
    }

    #[test]
    fn a_partition_the_checkpoint_does_not_know_is_read_from_its_beginning() {
        let mock = MockCluster::new(1).expect("mock cluster");
        mock.create_topic("clicks", 2, 1).expect("topic");
        let brokers = mock.bootstrap_servers();
        let ev = r#"{"user_id":"a","n":1,"ts":"2024-01-01T00:00:01Z"}"#;
        produce(&brokers, &[(0, "a", ev), (1, "b", ev), (1, "c", ev)]);
        // A checkpoint from when the topic had one partition; start = latest.
        let mut p = plan(&brokers);
        p.options.insert("start".into(), "latest".into());
        let pos = br#"{"topic":"clicks","offsets":{"0":1}}"#;
        let mut src = KafkaSource::new(&p).expect("source");
        src.seek(Some(pos)).expect("seek");
        let (batches, parts, _) = poll_rows(&mut src, 2);
        assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 2);
        assert_eq!(parts, vec![1, 1], "both records of the new partition");
        // On a fresh state dir, `latest` skips what is there.
        let mut src = KafkaSource::new(&p).expect("source");
        src.seek(None).expect("seek");
        let p: Position = serde_json::from_slice(&src.position()).expect("position");
        assert_eq!(p.offsets, BTreeMap::from([(0, 1), (1, 2)]));
    }

    #[test]
    fn broker_down_is_reported_and_recovers() {
        let mock = MockCluster::new(1).expect("mock cluster");
        mock.create_topic("clicks", 1, 1).expect("topic");
        let brokers = mock.bootstrap_servers();
        let mut src = KafkaSource::new(&plan(&brokers)).expect("source");
        src.seek(None).expect("seek");
        let wait = |src: &mut KafkaSource, down: bool| {
            let deadline = Instant::now() + Duration::from_secs(20);
            while src.health().is_some() != down {
                assert!(Instant::now() < deadline, "health never became down={down}");
                let _ = src.poll(10).expect("poll");
            }
        };
        wait(&mut src, false);
        mock.broker_down(1).expect("down");
        wait(&mut src, true);
        mock.broker_up(1).expect("up");
        wait(&mut src, false);
    }

    #[test]
    fn missing_topic_and_bad_settings_are_clear_errors() {
        let mock = MockCluster::new(1).expect("mock cluster");
        let brokers = mock.bootstrap_servers();
        let mut src = KafkaSource::new(&plan(&brokers)).expect("source");
        let e = src.seek(None).expect_err("no topic").to_string();
        assert!(e.contains("does not exist") && e.contains("clicks"), "{e}");

        let mut p = plan(&brokers);
        p.options.insert("kafka.no.such.setting".into(), "1".into());
        let e = KafkaSource::new(&p).err().expect("bad setting").to_string();
        assert!(e.contains("no.such.setting"), "{e}");
    }
}
