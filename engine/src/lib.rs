//! `sluice-engine`: the runtime. Operators exchange Arrow record batches;
//! filters, projections and aggregates are DataFusion physical expressions
//! and accumulators; window state lives in RocksDB next to the online store.

pub mod aggregate;
pub mod archive;
pub mod backfill;
pub mod checkpoint;
mod error;
mod exec;
mod ingest;
pub mod job;
pub mod keys;
mod letters;
pub mod live;
pub mod metrics_names;
pub mod online;
pub mod output;
pub mod reader;
pub mod replay;
pub mod rules;
pub mod served;
pub mod server;
mod source;
pub mod store;
pub mod tiles;
pub mod time;
pub mod training;
pub mod vector;
pub mod view;
pub mod watermark;
mod worker;

pub use error::{EngineError, ErrorDomain, Result, RetryHint};
pub use exec::Rows;
pub use job::{Job, JobOptions, RunStats};
pub use live::Live;
pub use source::{
    CappedDeadLetters, DEFAULT_DEAD_LETTER_LIMIT, DeadLetter, DeadLetterKind, DeadLetterSink,
    OfflineSink, Poll, Source, SourceBatch,
};
