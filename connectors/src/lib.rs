//! `sluice-connectors`: everything that touches the outside world. Kafka and
//! file sources, Kafka outputs, the Parquet lake writer and the dead-letter
//! file, implementing
//! the engine's [`sluice_engine::Source`], [`sluice_engine::OfflineSink`]
//! and [`sluice_engine::DeadLetterSink`] traits.

pub mod archive;
pub mod avro;
pub mod consistency;
mod deadletter;
mod error;
mod file;
pub mod files;
mod json;
pub mod kafka;
mod lake;
mod memory;
pub mod protobuf;
mod quantiles;
mod rows;
pub mod served;
pub mod stats;
pub mod training;

use std::collections::HashMap;
use std::path::Path;

use sluice_engine::output::emitted_schema;
use sluice_engine::{DeadLetter, DeadLetterSink, EngineError, OfflineSink, Result, Source};
use sluice_sql::{OptionReader, PipelineError, PipelinePlan, SourcePlan};

pub use deadletter::{DEAD_LETTER_FILE, DeadLetterFile};
pub use error::Error;
pub use file::{FileOptions, JsonFileSource};
pub use files::{FilesSource, expand_paths, file_source};
pub use kafka::{DeadLetterTopic, FeatureTopic, KafkaOptions, KafkaSource, PayloadDecoder};
pub use lake::{LakeWriter, day_start_ms, rfc3339_ms};
pub use memory::MemorySource;

/// Checks a source's connector options (each connector owns and parses its
/// own: [`FileOptions`], [`KafkaOptions`]); an error names the option's
/// line and column. Pass it to [`sluice_sql::plan_file`].
pub fn check_source(s: &SourcePlan) -> std::result::Result<(), PipelineError> {
    match s.connector.as_str() {
        "file" => FileOptions::parse(s).and_then(|_| archive::archive_dir(s).map(|_| ())),
        "kafka" => KafkaOptions::parse(s).and_then(|_| archive::archive_dir(s).map(|_| ())),
        other => Err(OptionReader::new(s, "sources")
            .error(
                "connector",
                format!("unknown connector `{other}`; expected 'file' or 'kafka'"),
            )
            .suggest(other, CONNECTORS.iter().copied())),
    }
}

/// The connectors a source can name.
pub const CONNECTORS: &[&str] = &["file", "kafka"];

/// Builds the sources of a plan, in plan order.
pub fn build_sources(plan: &PipelinePlan) -> Result<Vec<Box<dyn Source>>> {
    build_sources_with(plan, false)
}

/// Builds the sources of a plan; with `stop_at_end`, Kafka sources end at
/// the offsets current when they start instead of running forever.
pub fn build_sources_with(plan: &PipelinePlan, stop_at_end: bool) -> Result<Vec<Box<dyn Source>>> {
    plan.sources
        .iter()
        .map(|s| match s.connector.as_str() {
            "file" => files::file_source(s),
            "kafka" => {
                let k = KafkaSource::new(s)?;
                let k = if stop_at_end { k.stop_at_end() } else { k };
                Ok(Box::new(k) as Box<dyn Source>)
            }
            other => Err(EngineError::Connector {
                what: format!("source {}", s.name),
                message: format!("connector `{other}` is not available"),
            }),
        })
        .collect()
}

/// Builds the outputs of each view besides the online store: its lake
/// writer (`offline`) and its feature-update topic (`kafka_topic`).
pub fn build_lakes(plan: &PipelinePlan) -> Result<HashMap<String, Vec<Box<dyn OfflineSink>>>> {
    let mut out = HashMap::new();
    for v in &plan.views {
        let mut sinks: Vec<Box<dyn OfflineSink>> = Vec::new();
        if let Some(root) = &v.offline {
            sinks.push(Box::new(LakeWriter::new(
                root,
                &v.name,
                emitted_schema(&v.output_schema),
            )));
        }
        let options = plan
            .source(&v.source)
            .filter(|s| s.connector == "kafka")
            .map(|s| s.options.clone())
            .unwrap_or_default();
        if let Some(t) = FeatureTopic::new(v, &options)? {
            sinks.push(Box::new(t));
        }
        out.insert(v.name.clone(), sinks);
    }
    Ok(out)
}

/// The dead-letter output: `{state_dir}/dead_letters.jsonl`, except for
/// sources with a `dead_letter_topic`, whose dead letters go to that topic.
pub fn dead_letters(state_dir: &Path, plan: &PipelinePlan) -> Result<DeadLetters> {
    let mut topics = HashMap::new();
    for s in &plan.sources {
        if let Some(t) = DeadLetterTopic::new(s)? {
            topics.insert(s.name.clone(), t);
        }
    }
    Ok(DeadLetters {
        file: DeadLetterFile::new(state_dir),
        topics,
    })
}

/// Dead letters routed by source: a topic where one is configured, else the file.
pub struct DeadLetters {
    file: DeadLetterFile,
    topics: HashMap<String, DeadLetterTopic>,
}

impl DeadLetterSink for DeadLetters {
    fn write(&mut self, letter: &DeadLetter) -> Result<()> {
        match self.topics.get_mut(&letter.source) {
            Some(t) => t.send(letter),
            None => self.file.write(letter),
        }
    }

    fn commit(&mut self) -> Result<u64> {
        for t in self.topics.values_mut() {
            t.flush()?;
        }
        self.file.commit()
    }

    fn recover(&mut self, committed_len: u64) -> Result<()> {
        self.file.recover(committed_len)
    }
}
