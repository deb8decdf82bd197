//! Engine errors.

use datafusion::common::DataFusionError;

/// An error of the runtime. Bad input records are not errors: they are
/// dead-lettered and counted.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// DataFusion failed to plan or evaluate an expression or aggregate.
    #[error("evaluating view `{view}`: {source}")]
    DataFusion {
        /// The feature view involved.
        view: String,
        /// The underlying error.
        #[source]
        source: DataFusionError,
    },
    /// Arrow failed on a batch.
    #[error("{context}: {source}")]
    Arrow {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: arrow::error::ArrowError,
    },
    /// The state store failed.
    #[error("state store at {path}: {source}")]
    Store {
        /// The state directory.
        path: String,
        /// The underlying error.
        #[source]
        source: rocksdb::Error,
    },
    /// The state on disk does not fit this pipeline.
    #[error("state in {path} cannot be used: {reason}")]
    Incompatible {
        /// The state directory.
        path: String,
        /// Why.
        reason: String,
    },
    /// A source or sink failed (I/O, broker).
    #[error("{what}: {message}")]
    Connector {
        /// The connector instance, e.g. `source clicks`.
        what: String,
        /// What went wrong.
        message: String,
    },
    /// The nearest-neighbour index of a view (LMDB / arroy) failed.
    #[error("vector index {path}: {message}")]
    Index {
        /// The index directory.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// A request a client can fix (wrong vector length, unknown view).
    #[error("{0}")]
    BadRequest(String),
    /// I/O on a path.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl EngineError {
    /// A DataFusion error in `view`.
    pub fn df(view: &str, source: DataFusionError) -> Self {
        EngineError::DataFusion {
            view: view.to_string(),
            source,
        }
    }
    /// An Arrow error with what was being done.
    pub fn arrow(context: impl Into<String>, source: arrow::error::ArrowError) -> Self {
        EngineError::Arrow {
            context: context.into(),
            source,
        }
    }
}

/// Result with [`EngineError`].
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
