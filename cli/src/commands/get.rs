//! `sluice get`: a key's features from a state dir's online store.

use std::io::Write;
use std::path::PathBuf;

use anyhow::bail;
use sluice_engine::tiles::ReadMode;

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
    /// Which value of a windowed view: `fresh` (HOP's default: the last
    /// closed window plus the head slide up to the watermark), `closed` (the
    /// last closed window; TUMBLE's default) or `current` (TUMBLE: the
    /// period so far).
    #[arg(long, value_parser = parse_mode)]
    pub window: Option<ReadMode>,
}

fn parse_mode(s: &str) -> Result<ReadMode, String> {
    ReadMode::parse(s).ok_or_else(|| format!("expected fresh, closed or current, not `{s}`"))
}

/// Prints the key's online value as JSON; an unknown key is an error.
pub fn run(a: &GetArgs) -> anyhow::Result<()> {
    use sluice_engine::reader::Features;
    let (dir, view) = crate::open_view(&a.state_dir, &a.view)?;
    match dir.read(&view, &a.key, a.window)?.0 {
        Some(v) => {
            let text = serde_json::to_string_pretty(&v)? + "\n";
            // A closed pipe (`sluice get v k | head`) is not an error.
            let _ = std::io::stdout().write_all(text.as_bytes());
            Ok(())
        }
        None => bail!("key `{}` not found in view `{}`", a.key, a.view),
    }
}
