//! `sluice explain`: the streaming plan of a pipeline file.

use std::io::Write;
use std::path::PathBuf;

/// Options of `sluice explain`.
#[derive(clap::Args, Debug)]
pub struct ExplainArgs {
    /// The pipeline file.
    pub pipeline: PathBuf,
}

/// Prints the plan (secrets masked) to stdout.
pub fn run(a: &ExplainArgs) -> anyhow::Result<()> {
    let text = crate::plan(&a.pipeline)?.to_string();
    // A closed pipe (`sluice explain p.sql | head`) is not an error.
    let _ = std::io::stdout().write_all(text.as_bytes());
    Ok(())
}
