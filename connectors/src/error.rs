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
        use rdkafka::error::KafkaError;
        // librdkafka's refusal of a setting quotes its value: not a secret's.
        let source = match source {
            KafkaError::ClientConfig(code, desc, key, value) => {
                if sluice_sql::is_secret_option(&format!("kafka.{key}")) {
                    let desc = if value.is_empty() {
                        desc
                    } else {
                        desc.replace(&value, sluice_sql::MASKED)
                    };
                    KafkaError::ClientConfig(code, desc, key, sluice_sql::MASKED.to_string())
                } else {
                    KafkaError::ClientConfig(code, desc, key, value)
                }
            }
            other => other,
        };
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
