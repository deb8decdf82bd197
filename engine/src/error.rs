//! Engine errors, each with a category ([`ErrorDomain`]: the user's, the
//! outside world's, or a bug) and a retry hint ([`RetryHint`]) that the job's
//! source backoff and `/readyz` act on.

use datafusion::common::DataFusionError;
use sluice_sql::PipelineError;

/// Whose problem an error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorDomain {
    /// The user's: a pipeline, an option, a request or a state dir that does
    /// not fit. Fix the input; retrying the same thing fails the same way.
    User,
    /// The outside world's: a broker, the filesystem, the network.
    External,
    /// Sluice's own: a broken invariant. Please report it.
    Internal,
}

/// Whether trying the same operation again can succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryHint {
    /// It will fail the same way.
    Never,
    /// It may succeed later: retry with backoff (a broker away, a full disk).
    Backoff,
}

/// An error of the runtime. Bad input records are not errors: they are
/// dead-lettered and counted.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The pipeline file, or a connector's options in it, is wrong.
    #[error(transparent)]
    Plan(#[from] PipelineError),
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
        source: StoreError,
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
    /// A connector's error (a broker, a client library), its cause kept.
    #[error(transparent)]
    External(Box<dyn std::error::Error + Send + Sync>),
    /// The nearest-neighbour index of a view (LMDB / arroy) failed.
    #[error("vector index {path}: {message}")]
    Index {
        /// The index directory.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// A broken invariant of the engine: a bug, not bad input.
    #[error("internal error: {0}")]
    Internal(String),
    /// A request a client can fix (wrong vector length, unknown view).
    #[error("{0}")]
    BadRequest(String),
    /// A request past a limit of the moment (its deadline, a full queue):
    /// the same request may succeed later.
    #[error("{0}")]
    Overloaded(String),
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
    /// Whose problem this is.
    pub fn domain(&self) -> ErrorDomain {
        match self {
            EngineError::Plan(_)
            | EngineError::Incompatible { .. }
            | EngineError::BadRequest(_) => ErrorDomain::User,
            EngineError::Store { .. }
            | EngineError::External(_)
            | EngineError::Connector { .. }
            | EngineError::Index { .. }
            | EngineError::Overloaded(_)
            | EngineError::Io { .. } => ErrorDomain::External,
            EngineError::DataFusion { .. }
            | EngineError::Arrow { .. }
            | EngineError::Internal(_) => ErrorDomain::Internal,
        }
    }

    /// Whether retrying can help: only for the outside world's errors.
    pub fn retry(&self) -> RetryHint {
        match self.domain() {
            ErrorDomain::External => RetryHint::Backoff,
            ErrorDomain::User | ErrorDomain::Internal => RetryHint::Never,
        }
    }

    /// The innermost message: for a DataFusion error its root cause
    /// (`Arrow error: Divide by zero error`), else the whole message.
    pub fn root_message(&self) -> String {
        match self {
            EngineError::DataFusion { source, .. } => source.find_root().to_string(),
            e => e.to_string(),
        }
    }

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

/// An error of the state store, with RocksDB's message (RocksDB's own types
/// stay inside this module).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub(crate) String);

/// Result with [`EngineError`].
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
