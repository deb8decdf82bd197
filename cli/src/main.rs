//! The `sluice` command: parses its arguments and dispatches to
//! `sluice_cli::commands`.

use clap::{Parser, Subcommand};
use sluice_cli::commands::{
    backfill, consistency, demo, explain, gen_recsys, generate, get, nearest, produce, run, stats,
    training_set,
};

/// Streaming feature pipelines: SQL feature views over event streams, served online and written to a Parquet lake.
#[derive(Parser)]
#[command(name = "sluice", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a pipeline: consume its sources, maintain its feature views, checkpoint, serve.
    Run(run::RunArgs),
    /// Run the pipeline's feature views over bounded history (files) into the lake.
    Backfill(backfill::BackfillArgs),
    /// Build a training set: spine rows joined with feature values as of each row's time.
    TrainingSet(training_set::TrainingSetArgs),
    /// Recompute the reads a view's log_served kept with the training-set path and compare.
    Consistency(consistency::ConsistencyArgs),
    /// Per-feature statistics of a view's lake rows or a training set, and drift against a reference.
    Stats(stats::StatsArgs),
    /// Print the streaming plan of a pipeline file.
    Explain(explain::ExplainArgs),
    /// Read a key's features from a state dir's online store.
    Get(get::GetArgs),
    /// Nearest neighbours in a view's vector index (`vector_index`), from a state dir.
    Nearest(nearest::NearestArgs),
    /// Generate click events as JSON lines, Parquet or CSV (for the quickstart and examples).
    Gen(generate::GenArgs),
    /// Generate the recsys example's item embeddings and clicks (see examples/recsys).
    GenRecsys(gen_recsys::RecsysArgs),
    /// Write a clickstream to a Kafka topic at a chosen rate, keyed by user.
    Produce(produce::ProduceArgs),
    /// Embedded end-to-end demo: generate events, run the quickstart pipeline, serve features.
    Demo(demo::DemoArgs),
}

fn main() {
    sluice_cli::init_tracing("info");
    let r = match Cli::parse().cmd {
        Cmd::Run(a) => run::run(a),
        Cmd::Backfill(a) => backfill::run(&a).map(|_| ()),
        Cmd::TrainingSet(a) => training_set::run(&a),
        Cmd::Explain(a) => explain::run(&a),
        Cmd::Consistency(a) => match consistency::run(&a) {
            Ok(true) => std::process::exit(consistency::DIFFERENCES_EXIT),
            other => other.map(|_| ()),
        },
        Cmd::Stats(a) => match stats::run(&a) {
            Ok(true) => std::process::exit(stats::DRIFT_EXIT),
            other => other.map(|_| ()),
        },
        Cmd::Get(a) => get::run(&a),
        Cmd::Nearest(a) => nearest::run(&a),
        Cmd::Gen(a) => generate::run(&a),
        Cmd::GenRecsys(a) => gen_recsys::run(&a),
        Cmd::Produce(a) => produce::run(&a).map(|_| ()),
        Cmd::Demo(a) => demo::run(&a),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
