//! `sluice-connectors`: everything that touches the outside world. File
//! sources, the Parquet lake writer and the dead-letter file, implementing
//! the engine's [`sluice_engine::Source`], [`sluice_engine::OfflineSink`]
//! and [`sluice_engine::DeadLetterSink`] traits.

pub mod deadletter;
pub mod file;
pub mod lake;
pub mod memory;

use std::collections::HashMap;
use std::path::Path;

use sluice_engine::aggregate::emitted_schema;
use sluice_engine::{EngineError, OfflineSink, Result, Source};
use sluice_sql::PipelinePlan;

pub use deadletter::{DEAD_LETTER_FILE, DeadLetterFile};
pub use file::JsonFileSource;
pub use lake::LakeWriter;
pub use memory::MemorySource;

/// Builds the sources of a plan, in plan order.
pub fn build_sources(plan: &PipelinePlan) -> Result<Vec<Box<dyn Source>>> {
    plan.sources
        .iter()
        .map(|s| match s.connector.as_str() {
            "file" => Ok(Box::new(JsonFileSource::new(s)?) as Box<dyn Source>),
            other => Err(EngineError::Connector {
                what: format!("source {}", s.name),
                message: format!("connector `{other}` is not available"),
            }),
        })
        .collect()
}

/// Builds the lake writers of the views that have `offline` set.
pub fn build_lakes(plan: &PipelinePlan) -> HashMap<String, Box<dyn OfflineSink>> {
    plan.views
        .iter()
        .filter_map(|v| {
            v.offline.as_ref().map(|root| {
                let w: Box<dyn OfflineSink> = Box::new(LakeWriter::new(
                    root,
                    &v.name,
                    emitted_schema(&v.output_schema),
                ));
                (v.name.clone(), w)
            })
        })
        .collect()
}

/// The dead-letter sink of a state dir.
pub fn dead_letters(state_dir: &Path) -> DeadLetterFile {
    DeadLetterFile::new(state_dir)
}
