//! `sluice training-set`: spine rows joined with feature values as of each
//! row's time.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::bail;

/// Options of `sluice training-set`.
#[derive(clap::Args, Debug)]
pub struct TrainingSetArgs {
    /// The pipeline file (it says where each view's lake is).
    pub pipeline: PathBuf,
    /// Spine: entity keys, a timestamp and labels (.parquet, .csv or .jsonl).
    #[arg(long)]
    pub spine: PathBuf,
    /// A view and optionally its columns: `VIEW` or `VIEW:COL,COL`. Repeat for more views.
    #[arg(long = "features", value_name = "VIEW[:COL,…]", required = true)]
    pub features: Vec<sluice_connectors::training::FeatureRequest>,
    /// Output file (.parquet, .csv or .jsonl); feature columns are named `VIEW__COL`.
    #[arg(long)]
    pub out: PathBuf,
    /// A view key column read from a differently named spine column: `VIEWCOL=SPINECOL`.
    #[arg(long = "key", value_name = "VIEWCOL=SPINECOL")]
    pub keys: Vec<String>,
    /// The spine's time column (default: its only timestamp column).
    #[arg(long)]
    pub time_column: Option<String>,
    /// History of a source for the replay of windowed views: `NAME=PATH`
    /// (files, folders or globs, as `backfill` takes them). Without it a
    /// replay reads the source's event archive, or a file source's own file.
    #[arg(long = "source", value_name = "NAME=PATH")]
    pub sources: Vec<String>,
    /// Windowed views from the closed-window rows of their lake (each row
    /// valid from its window's end to the next slide's end) instead of the
    /// value an online read at the spine time returns.
    #[arg(long)]
    pub closed_windows: bool,
    /// Where a replay's undecodable and late events go (default: the output
    /// path with `.dead_letters.jsonl` appended).
    #[arg(long)]
    pub dead_letters: Option<PathBuf>,
    /// The writer (state dir id) whose event archive of source NAME a
    /// replay reads, when several state dirs archived into it:
    /// `NAME=ID` (default: the one that wrote last).
    #[arg(long = "archive-writer", value_name = "NAME=ID")]
    pub archive_writers: Vec<String>,
}

/// Writes the training set and prints what each view contributed.
pub fn run(a: &TrainingSetArgs) -> anyhow::Result<()> {
    let p = crate::plan(&a.pipeline)?;
    let mut keys = HashMap::new();
    for k in &a.keys {
        let Some((v, s)) = k.split_once('=') else {
            bail!("--key `{k}`: expected VIEWCOL=SPINECOL");
        };
        keys.insert(v.to_string(), s.to_string());
    }
    let sources: HashMap<_, _> = crate::commands::backfill::source_inputs(&p, &a.sources)?
        .into_iter()
        .collect();
    let dead_letters = a.dead_letters.clone().unwrap_or_else(|| {
        let mut o = a.out.clone().into_os_string();
        o.push(".dead_letters.jsonl");
        PathBuf::from(o)
    });
    let mut archive_writers = HashMap::new();
    for w in &a.archive_writers {
        let Some((s, id)) = w.split_once('=') else {
            bail!("--archive-writer `{w}`: expected NAME=ID");
        };
        archive_writers.insert(s.to_string(), id.to_string());
    }
    let req = sluice_connectors::training::TrainingSetRequest {
        spine: a.spine.clone(),
        features: a.features.clone(),
        keys,
        time_column: a.time_column.clone(),
        out: a.out.clone(),
        closed_windows: a.closed_windows,
        sources,
        dead_letters: dead_letters.clone(),
        archive_writers,
    };
    let t0 = std::time::Instant::now();
    let stats = sluice_connectors::training::training_set(&p, &req)?;
    eprintln!(
        "training set: {} rows -> {} in {:.2} s",
        stats.rows,
        a.out.display(),
        t0.elapsed().as_secs_f64()
    );
    if stats.times_out_of_range > 0 {
        eprintln!(
            "  {} spine rows have a time outside years 1677-2262: their features are NULL",
            stats.times_out_of_range
        );
    }
    for r in &stats.replays {
        eprintln!(
            "  replayed source {}: {} events from {}; {} late (dead-lettered, not folded in), {} clocks",
            r.source, r.events, r.history, r.late, r.flushes
        );
    }
    if stats.dead_letters > 0 {
        eprintln!(
            "  {} dead letters in {}",
            stats.dead_letters,
            dead_letters.display()
        );
    }
    for v in &stats.views {
        if v.replayed {
            eprintln!(
                "  {}: as read online at each spine time: {} rows found, {} NULL (no accepted event the read could see{})",
                v.view,
                v.found,
                v.null,
                if v.beyond > 0 {
                    format!("; {} after the history's last watermark", v.beyond)
                } else {
                    String::new()
                }
            );
        } else {
            eprintln!(
                "  {}: {} lake rows from {} files; {} rows found, {} empty windows, {} NULL (no key, or a time outside the lake)",
                v.view, v.lake_rows, v.files, v.found, v.empty, v.null
            );
        }
    }
    Ok(())
}
