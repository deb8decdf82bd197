//! Errors of the connectors: what failed outside the process, with its
//! cause kept as the error's `source` (never flattened into a string).
//! They reach the engine as [`EngineError::External`], which the job's
//! source backoff and `/readyz` treat as retryable.

use sluice_engine::EngineError;

/// An error talking to the outside world.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// librdkafka refused or failed an operation.
    #[error("{what}: {source}")]
    Kafka {
        /// The client and what it was doing, e.g. `source clicks: cannot assign partitions`.
        what: String,
        /// librdkafka's error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
}

impl Error {
    /// A librdkafka error while doing `what`.
    pub fn kafka(what: impl Into<String>, source: rdkafka::error::KafkaError) -> Self {
        Error::Kafka {
            what: what.into(),
            source,
        }
    }
}

impl From<Error> for EngineError {
    fn from(e: Error) -> Self {
        EngineError::External(Box::new(e))
    }
}
