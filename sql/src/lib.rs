//! `sluice-sql`: pipeline files (`CREATE SOURCE`, `CREATE FEATURE VIEW`),
//! their validation with precise errors, DataFusion planning of each view's
//! `SELECT`, and the lowering into a streaming plan the engine runs.

mod error;
pub mod interval;
mod parser;
mod plan;
pub mod vector;

pub use error::{PipelineError, Pos};
pub use plan::{
    AggregatePlan, CheckRule, MASKED, MetadataColumn, MetadataKind, OptionPos, OptionReader,
    PipelinePlan, SERVED_LOG_COLUMNS, SourceCheck, SourcePlan, Stage, StatsReference,
    TIMESTAMP_TYPE, ViewKind, ViewPlan, WindowSpec, expand_env, fmt_ms, is_secret_option,
    plan_file, plan_pipeline, plan_pipeline_checked, plan_stored, versioned_name, view_difference,
};
pub use vector::{vector_dims, vector_type};
