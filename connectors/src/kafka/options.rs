//! The options of a Kafka source, typed, parsed and checked in one place.

use std::collections::BTreeMap;

use sluice_sql::{OptionReader, PipelineError, SourcePlan};

use crate::avro::{AvroOptions, Framing};
use crate::file::options::max_record_bytes;
use crate::protobuf::ProtobufOptions;

/// What the records of a topic hold.
#[derive(Debug, Clone)]
pub enum PayloadFormat {
    /// A JSON object per record.
    Json,
    /// An Avro record per record, with its schema options.
    Avro(AvroOptions),
    /// A Protobuf message per record, with its schema options.
    Protobuf(ProtobufOptions),
}

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
    /// `format`: 'json' (default), 'avro' (with `schema`, `framing`,
    /// `schema.<id>`) or 'protobuf' (those and `message`).
    pub format: PayloadFormat,
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
        "schema",
        "framing",
        "message",
    ];

    /// Reads and checks `source`'s options; an error names the option's
    /// line and column in the pipeline file.
    pub fn parse(source: &SourcePlan) -> Result<Self, PipelineError> {
        let r = OptionReader::new(source, "Kafka sources");
        // `schema.<id>` options name Avro or Protobuf writer schemas.
        let mut known: Vec<&str> = Self::KEYS.to_vec();
        known.extend(
            source
                .options
                .keys()
                .filter(|k| k.starts_with("schema."))
                .map(String::as_str),
        );
        r.check_known(&known, Some("kafka."))?;
        let topic = r.require("topic")?.to_string();
        let brokers = r.require("brokers")?.to_string();
        let format = match r.one_of("format", &["json", "avro", "protobuf"])? {
            "avro" => {
                if r.get("message").is_some() {
                    return Err(r.error(
                        "message",
                        "`message` applies to format = 'protobuf'; an Avro schema names its one record",
                    ));
                }
                PayloadFormat::Avro(avro_options(&r, source)?)
            }
            "protobuf" => PayloadFormat::Protobuf(protobuf_options(&r, source)?),
            _ => {
                for k in ["schema", "framing", "message"] {
                    if r.get(k).is_some() {
                        return Err(r.error(
                            k,
                            format!(
                                "`{k}` applies to format = 'avro' or 'protobuf'; this source reads JSON"
                            ),
                        ));
                    }
                }
                PayloadFormat::Json
            }
        };
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
            format,
        })
    }
}

/// The `framing` and `schema.<id>` options of an Avro or Protobuf source.
fn framing_options(
    r: &OptionReader<'_>,
    source: &SourcePlan,
) -> Result<(Framing, BTreeMap<u32, std::path::PathBuf>), PipelineError> {
    let framing = match r.one_of("framing", &["confluent", "none"])? {
        "none" => Framing::None,
        _ => Framing::Confluent,
    };
    let mut writers = BTreeMap::new();
    for k in source.options.keys().filter(|k| k.starts_with("schema.")) {
        let id: u32 = k["schema.".len()..].parse().map_err(|_| {
            r.error(
                k,
                format!("`{k}`: the part after `schema.` is a schema id, a whole number"),
            )
        })?;
        writers.insert(id, r.path(k)?);
    }
    if framing == Framing::None
        && let Some(k) = source.options.keys().find(|k| k.starts_with("schema."))
    {
        return Err(r.error(
            k,
            "schema ids come from Confluent framing; with framing = 'none' every record is read with `schema`",
        ));
    }
    Ok((framing, writers))
}

/// The Avro options of `source`, its schema files read and checked against
/// its columns (an error points at the option it is about).
fn avro_options(r: &OptionReader<'_>, source: &SourcePlan) -> Result<AvroOptions, PipelineError> {
    let schema = r
        .path("schema")
        .map_err(|e| e.with_help("name the reader schema: schema = 'clicks.avsc'"))?;
    let (framing, writers) = framing_options(r, source)?;
    let o = AvroOptions {
        schema,
        framing,
        writers,
    };
    crate::avro::check(&o, &source.payload_schema()).map_err(|(k, m)| r.error(&k, m))?;
    Ok(o)
}

/// The Protobuf options of `source`, its `.proto` files compiled and
/// checked against its columns (an error points at the option).
fn protobuf_options(
    r: &OptionReader<'_>,
    source: &SourcePlan,
) -> Result<ProtobufOptions, PipelineError> {
    let schema = r
        .path("schema")
        .map_err(|e| e.with_help("name the .proto file: schema = 'clicks.proto'"))?;
    let message = r
        .require("message")
        .map_err(|e| e.with_help("name the message each record holds: message = 'Click'"))?
        .to_string();
    let (framing, writers) = framing_options(r, source)?;
    let o = ProtobufOptions {
        schema,
        message,
        framing,
        writers,
    };
    crate::protobuf::check(&o, &source.payload_schema()).map_err(|(k, m)| r.error(&k, m))?;
    Ok(o)
}
