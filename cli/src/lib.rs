//! The `sluice` command's library: one module per subcommand under
//! [`commands`], and the few helpers they share. The binary (`main.rs`)
//! only parses arguments and dispatches here; `sluice-benchmarks` reuses the
//! generators and jobs from it.
//!
//! ```text
//! main.rs ──clap──▶ commands::{run, backfill, training_set, explain, get,
//!                              nearest, gen, gen_recsys, produce, demo}
//!                     │ plan()            ▼
//!                 sluice-sql ──▶ sluice-connectors ──▶ sluice-engine
//! ```

pub mod commands;
pub mod flags;

use std::path::Path;

use anyhow::bail;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// The quickstart pipeline, embedded so `sluice demo` runs anywhere.
pub const QUICKSTART_SQL: &str = include_str!("../../examples/quickstart/pipeline.sql");

/// Plans a pipeline file and checks its connectors' options; an error
/// names file, line and column.
pub fn plan(path: &Path) -> anyhow::Result<sluice_sql::PipelinePlan> {
    Ok(sluice_sql::plan_file(
        path,
        &sluice_connectors::check_source,
    )?)
}

/// Logs to stderr, filtered by `SLUICE_LOG` (a `tracing` filter), else
/// `default`; colours only on a terminal.
pub fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Installs the Prometheus recorder (once per process).
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let h = PrometheusBuilder::new()
        // Served values' ages: a second to a week (a full match wins over the suffix).
        .set_buckets_for_metric(
            Matcher::Full("sluice_served_value_age_seconds".into()),
            &[
                1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0,
                86400.0, 604800.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
            ],
        )?
        .install_recorder()?;
    sluice_engine::metrics_names::describe();
    Ok(h)
}

/// A state dir opened for reading `view` (its name resolved as the server
/// resolves it): the reader and the view's name.
pub fn open_view(
    state_dir: &Path,
    view: &str,
) -> anyhow::Result<(sluice_engine::reader::StateDir, String)> {
    use sluice_engine::reader::Features;
    let dir = sluice_engine::reader::StateDir::open(state_dir)?;
    let name = dir.resolve(view);
    if dir.meta(&name).is_none() {
        bail!("no feature view `{name}` in {}", state_dir.display());
    }
    Ok((dir, name))
}
