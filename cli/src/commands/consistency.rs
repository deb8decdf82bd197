//! `sluice consistency`: the reads a view's `log_served` kept, recomputed
//! with the training-set path and compared feature by feature.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use serde_json::json;
use sluice_connectors::consistency::{ConsistencyRequest, consistency, write_differences};

use crate::flags::parse_time;

/// The exit code of a run that found differences.
pub const DIFFERENCES_EXIT: i32 = 3;

/// Options of `sluice consistency`.
#[derive(clap::Args, Debug)]
pub struct ConsistencyArgs {
    /// The pipeline file (it says where each view's lake, and log, is).
    pub pipeline: PathBuf,
    /// The feature view (it needs `log_served`).
    #[arg(long)]
    pub view: String,
    /// Only reads whose `as_of` is at or after this (RFC 3339, YYYY-MM-DD or epoch ms).
    #[arg(long)]
    pub from: Option<String>,
    /// Only reads whose `as_of` is before this.
    #[arg(long)]
    pub to: Option<String>,
    /// History of a source for the recomputation: `NAME=PATH`, as
    /// `training-set` takes it (default: the source's event archive, or a
    /// file source's own file).
    #[arg(long = "source", value_name = "NAME=PATH")]
    pub sources: Vec<String>,
    /// Numbers within this relative difference are equal.
    #[arg(long, default_value_t = 1e-9)]
    pub tolerance: f64,
    /// Every differing (read, feature) to this file (.parquet, .csv or .jsonl).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Compares, prints, and returns whether anything differed.
pub fn run(a: &ConsistencyArgs) -> anyhow::Result<bool> {
    let p = crate::plan(&a.pipeline)?;
    let sources: HashMap<_, _> = crate::commands::backfill::source_inputs(&p, &a.sources)?
        .into_iter()
        .collect();
    let t = |s: &Option<String>| s.as_deref().map(parse_time).transpose();
    let work = tempdir()?;
    let req = ConsistencyRequest {
        view: a.view.clone(),
        from: t(&a.from)?,
        to: t(&a.to)?,
        sources,
        tolerance: a.tolerance,
        work_dir: work.clone(),
    };
    let t0 = std::time::Instant::now();
    let r = consistency(&p, &req);
    let _ = std::fs::remove_dir_all(&work);
    let r = r?;
    let secs = t0.elapsed().as_secs_f64();
    if let Some(out) = &a.out {
        write_differences(out, &r.differences)?;
    }
    let differ = !r.differences.is_empty();
    let mut text = String::new();
    if a.json {
        let j = json!({
            "view": r.view,
            "reads": r.reads,
            "files": r.files,
            "served_found": r.served_found,
            "served_not_found": r.served_not_found,
            "served_before_first_watermark": r.unclocked,
            "features": r.features.iter().map(|f| json!({
                "feature": f.feature, "compared": f.compared, "mismatches": f.mismatches,
                "mismatch_rate": f.mismatch_rate(), "missing": f.missing, "extra": f.extra,
                "smape_percent": f.smape,
            })).collect::<Vec<_>>(),
            "samples": r.samples,
            "explanations": r.explanations,
            "seconds": secs,
        });
        text = format!("{}\n", serde_json::to_string_pretty(&j)?);
    } else {
        text.push_str(&format!(
            "view {}: {} logged reads ({} found, {} not found) from {} files\n",
            r.view, r.reads, r.served_found, r.served_not_found, r.files
        ));
        if r.unclocked > 0 {
            text.push_str(&format!(
                "  {} more reads were served before the view's first checkpoint (no as_of, nothing found): not compared\n",
                r.unclocked
            ));
        }
        let rows: Vec<[String; 6]> = std::iter::once(
            [
                "feature",
                "compared",
                "mismatches",
                "rate",
                "missing/extra",
                "smape%",
            ]
            .map(str::to_string),
        )
        .chain(r.features.iter().map(|f| {
            [
                f.feature.clone(),
                f.compared.to_string(),
                f.mismatches.to_string(),
                format!("{:.4}", f.mismatch_rate()),
                format!("{}/{}", f.missing, f.extra),
                f.smape.map_or("-".into(), |s| format!("{s:.6}")),
            ]
        }))
        .collect();
        let w: Vec<usize> = (0..6)
            .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
            .collect();
        for row in &rows {
            let cells: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(c, s)| {
                    if c == 0 {
                        format!("{s:<w$}", w = w[c])
                    } else {
                        format!("{s:>w$}", w = w[c])
                    }
                })
                .collect();
            text.push_str(&cells.join("  "));
            text.push('\n');
        }
        for s in r.samples.iter().take(10) {
            text.push_str(&format!(
                "  {} {} at {}: served {}, recomputed {} ({})\n",
                s["kind"].as_str().unwrap_or(""),
                s["feature"].as_str().unwrap_or(""),
                s["as_of"].as_str().unwrap_or("-"),
                s["served"].as_str().unwrap_or(""),
                s["recomputed"].as_str().unwrap_or(""),
                s["key"].as_str().unwrap_or("")
            ));
        }
        for e in &r.explanations {
            text.push_str(&format!("why: {e}\n"));
        }
    }
    let _ = std::io::stdout().write_all(text.as_bytes());
    eprintln!(
        "consistency: {} reads recomputed in {secs:.2} s; {} differences{}",
        r.reads,
        r.differences.len(),
        a.out
            .as_ref()
            .map(|o| format!(" (in {})", o.display()))
            .unwrap_or_default()
    );
    Ok(differ)
}

fn tempdir() -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!(
        "sluice-consistency-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
