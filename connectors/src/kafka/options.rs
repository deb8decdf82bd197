//! The options of a Kafka source, typed, parsed and checked in one place.

use std::collections::BTreeMap;

use sluice_sql::{OptionReader, PipelineError, SourcePlan};

use crate::file::options::max_record_bytes;

/// Where a source starts in a partition the checkpoint does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The partition's first offset.
    Earliest,
    /// Its end: only records written from now on.
    Latest,
    /// The consumer group's committed offset (else earliest).
    Committed,
}

/// A Kafka source's `WITH` options.
#[derive(Debug, Clone)]
pub struct KafkaOptions {
    /// `topic`: every partition of it is read.
    pub topic: String,
    /// `brokers`: bootstrap servers.
    pub brokers: String,
    /// `start`.
    pub start: Start,
    /// `group_id` (default `sluice-<source>`): offsets are committed there
    /// after each checkpoint, for lag tools.
    pub group_id: String,
    /// `dead_letter_topic`: the source's dead letters go there instead of the file.
    pub dead_letter_topic: Option<String>,
    /// `max_record_bytes`: larger records are dead-lettered.
    pub max_record_bytes: usize,
    /// The `kafka.*` options, keys as written: passed to librdkafka unchanged.
    pub client: BTreeMap<String, String>,
}

impl KafkaOptions {
    /// The options a Kafka source takes (besides `kafka.*`).
    pub const KEYS: &'static [&'static str] = &[
        "connector",
        "topic",
        "brokers",
        "format",
        "group_id",
        "start",
        "idle_timeout",
        "dead_letter_topic",
        "max_record_bytes",
        "archive",
    ];

    /// Reads and checks `source`'s options; an error names the option's
    /// line and column in the pipeline file.
    pub fn parse(source: &SourcePlan) -> Result<Self, PipelineError> {
        let r = OptionReader::new(source, "Kafka sources");
        r.check_known(Self::KEYS, Some("kafka."))?;
        let topic = r.require("topic")?.to_string();
        let brokers = r.require("brokers")?.to_string();
        if let Some(f) = r.get("format")
            && f != "json"
        {
            return Err(r.error(
                "format",
                format!("Kafka format `{f}` is not supported; this build reads 'json'"),
            ));
        }
        let start = match r.one_of("start", &["earliest", "latest", "committed"])? {
            "latest" => Start::Latest,
            "committed" => Start::Committed,
            _ => Start::Earliest,
        };
        let group_id = r
            .get("group_id")
            .map(str::to_string)
            .unwrap_or_else(|| format!("sluice-{}", r.source_name()));
        Ok(KafkaOptions {
            topic,
            brokers,
            start,
            group_id,
            dead_letter_topic: r.get("dead_letter_topic").map(str::to_string),
            max_record_bytes: max_record_bytes(&r)?,
            client: source
                .options
                .iter()
                .filter(|(k, _)| k.starts_with("kafka."))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })
    }
}
