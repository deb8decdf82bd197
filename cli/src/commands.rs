//! One module per `sluice` subcommand: its clap arguments and its `run`.

pub mod backfill;
pub mod consistency;
pub mod daily_stats;
pub mod demo;
pub mod explain;
pub mod gen_recsys;
pub mod generate;
pub mod get;
pub mod nearest;
pub mod produce;
pub mod run;
pub mod stats;
pub mod training_set;
