//! `sluice-sql`: pipeline files (`CREATE SOURCE`, `CREATE FEATURE VIEW`),
//! their validation with precise errors, DataFusion planning of each view's
//! `SELECT`, and the lowering into a streaming plan the engine runs.

pub mod error;
pub mod interval;
pub mod parser;
pub mod plan;
pub mod vector;

pub use error::{PipelineError, Pos};
pub use plan::{
    AggregatePlan, MetadataColumn, MetadataKind, PipelinePlan, SourcePlan, Stage, TIMESTAMP_TYPE,
    ViewKind, ViewPlan, WindowSpec, fmt_ms, plan_file, plan_pipeline,
};
pub use vector::{vector_dims, vector_type};
