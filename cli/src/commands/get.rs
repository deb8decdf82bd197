//! `sluice get`: a key's features from a state dir's online store.

use std::io::Write;
use std::path::PathBuf;

use anyhow::bail;
use sluice_engine::online::read_feature;

/// Options of `sluice get`.
#[derive(clap::Args, Debug)]
pub struct GetArgs {
    /// Feature view.
    pub view: String,
    /// Entity key (multi-column keys joined by `|`).
    pub key: String,
    /// State directory of the pipeline.
    #[arg(long, default_value = "sluice-state")]
    pub state_dir: PathBuf,
}

/// Prints the key's online value as JSON; an unknown key is an error.
pub fn run(a: &GetArgs) -> anyhow::Result<()> {
    let (store, meta, wm) = crate::open_view(&a.state_dir, &a.view)?;
    match read_feature(&store, &meta, &a.key, wm)? {
        Some(v) => {
            let text = serde_json::to_string_pretty(&v)? + "\n";
            // A closed pipe (`sluice get v k | head`) is not an error.
            let _ = std::io::stdout().write_all(text.as_bytes());
            Ok(())
        }
        None => bail!("key `{}` not found in view `{}`", a.key, a.view),
    }
}
