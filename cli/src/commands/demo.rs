//! `sluice demo`: an end-to-end run with no outside services.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use sluice_engine::job::JobOptions;

/// Options of `sluice demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Working directory for events, state and lake.
    #[arg(long, default_value = "sluice-demo")]
    pub dir: PathBuf,
    /// Number of events to generate.
    #[arg(long, default_value_t = 200_000)]
    pub events: u64,
    /// Address to serve on; `none` to exit after the run.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub serve: String,
}

/// Generates events, runs the quickstart pipeline on them and serves.
pub fn run(a: &DemoArgs) -> anyhow::Result<()> {
    let (dir, events, serve) = (&a.dir, a.events, a.serve.as_str());
    std::fs::create_dir_all(dir)?;
    let pipeline = dir.join("pipeline.sql");
    std::fs::write(&pipeline, crate::QUICKSTART_SQL)?;
    let events_path = dir.join("events.jsonl");
    let state = dir.join("state");
    let lake = dir.join("lake");
    for d in [&state, &lake] {
        if d.exists() {
            std::fs::remove_dir_all(d)?;
        }
    }
    let g = crate::commands::generate::GenArgs::new(events, 1000, 180, events_path.clone());
    crate::commands::generate::run(&g)?;
    eprintln!("generated {events} events into {}", events_path.display());
    let p = crate::plan(&pipeline)?;
    let handle = crate::install_metrics()?;
    let serve_addr = if serve == "none" {
        None
    } else {
        Some(
            serve
                .parse::<SocketAddr>()
                .with_context(|| format!("--serve {serve}"))?,
        )
    };
    if let Some(a) = serve_addr {
        eprintln!("try: curl http://{a}/v1/features/user_activity/u00042");
    }
    let serve = serve_addr.map(|addr| super::run::Serve {
        addr,
        token: None,
        limits: sluice_engine::server::ServeLimits::default(),
    });
    super::run::run_job(
        &p,
        sluice_connectors::build_sources(&p)?,
        JobOptions::new(state.clone()),
        serve,
        Some(handle),
    )?;
    eprintln!("lake: {}  state: {}", lake.display(), state.display());
    eprintln!(
        "read a key: sluice get user_activity u00042 --state-dir {}",
        state.display()
    );
    Ok(())
}
