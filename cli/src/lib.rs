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
use sluice_engine::online::{ViewMeta, read_view_meta, watermark_key};
use sluice_engine::store::Store;

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

/// A view of a state dir opened for reading.
pub struct OpenView {
    /// The online store, read-only.
    pub store: Store,
    /// The view's metadata as the job that wrote the store left it.
    pub meta: ViewMeta,
    /// The committed watermark of the view's source.
    pub wm: Option<i64>,
    /// The reader of a tiled (windowed, online) view.
    pub tiles: Option<sluice_engine::tiles::TileReader>,
}

impl OpenView {
    /// The value of `key` (see [`sluice_engine::online::read_feature`]).
    pub fn read(
        &self,
        key: &str,
        mode: Option<sluice_engine::tiles::ReadMode>,
    ) -> anyhow::Result<Option<serde_json::Value>> {
        Ok(sluice_engine::online::read_feature(
            &self.store,
            &self.meta,
            self.tiles.as_ref(),
            key,
            self.wm,
            mode,
        )?)
    }
}

/// A state dir's online store opened for reading `view`, with the view's
/// metadata, committed watermark and tile reader.
pub fn open_view(state_dir: &Path, view: &str) -> anyhow::Result<OpenView> {
    let store = Store::open_read_only(state_dir)?;
    // A state dir of another layout version is refused, as `run` refuses it.
    sluice_engine::checkpoint::Checkpoint::load(&store, state_dir)?;
    // An unversioned name reads what the server would serve.
    let view = &sluice_engine::online::resolve_version(&store, view)?;
    let Some(meta) = read_view_meta(&store, view)? else {
        bail!("no feature view `{view}` in {}", state_dir.display());
    };
    let wm = store
        .meta_i64(&watermark_key(&meta.source))?
        .filter(|w| *w != sluice_engine::job::NO_WATERMARK);
    let tiles = sluice_engine::online::open_reader(&store, view)?;
    Ok(OpenView {
        store,
        meta,
        wm,
        tiles,
    })
}
