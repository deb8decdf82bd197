//! `sluice backfill`: the pipeline's feature views over bounded history.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::flags::parse_time;
use sluice_connectors::{FilesSource, LakeWriter, expand_paths};
use sluice_engine::Source;
use sluice_engine::backfill::{
    BackfillOptions, BackfillOutputs, BackfillStats, Progress, backfill,
};
use sluice_engine::output::emitted_schema;
use sluice_engine::store::Store;

/// File (in the state dir) the dead letters of a backfill go to.
pub const BACKFILL_DEAD_LETTERS: &str = "backfill_dead_letters.jsonl";

/// Arguments of `sluice backfill`.
#[derive(clap::Args, Debug)]
pub struct BackfillArgs {
    /// The pipeline file.
    pub pipeline: PathBuf,
    /// Input of a source: `NAME=PATH`, PATH a file, a folder (read recursively,
    /// Hive `col=value` folders allowed) or a glob; .jsonl/.json/.ndjson,
    /// .parquet or .csv. Repeat for more paths or sources. Without any,
    /// each `connector = 'file'` source reads its own `path`.
    #[arg(long = "source", value_name = "NAME=PATH")]
    pub sources: Vec<String>,
    /// Emit windows starting at or after T (RFC 3339, YYYY-MM-DD or epoch ms).
    #[arg(long, value_name = "T")]
    pub from: Option<String>,
    /// Close every window ending at or before T and emit none later.
    #[arg(long, value_name = "T")]
    pub to: Option<String>,
    /// State directory: dead letters, and the online store with `--online`.
    #[arg(long, default_value = "sluice-state")]
    pub state_dir: PathBuf,
    /// Also write each key's latest row into the online store.
    #[arg(long)]
    pub online: bool,
    /// Fold events streaming would drop as late into their windows.
    #[arg(long)]
    pub include_late: bool,
    /// Delete the lake files of an earlier backfill of these views first.
    #[arg(long)]
    pub replace: bool,
    /// Worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Rows per read.
    #[arg(long, default_value_t = 8192)]
    pub batch_rows: usize,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
    /// Bytes of dead letters written per source (`1GiB` by default); past
    /// it letters are counted, not written.
    #[arg(long, value_parser = crate::flags::parse_bytes, default_value = "1GiB")]
    pub dead_letter_limit: u64,
}

/// The files of `--source NAME=PATH` arguments, per source.
pub fn source_inputs(
    plan: &sluice_sql::PipelinePlan,
    specs: &[String],
) -> anyhow::Result<BTreeMap<String, Vec<sluice_connectors::files::InputFile>>> {
    let mut inputs: BTreeMap<String, Vec<sluice_connectors::files::InputFile>> = BTreeMap::new();
    for s in specs {
        let Some((name, path)) = s.split_once('=') else {
            bail!("--source `{s}`: expected NAME=PATH");
        };
        if plan.source(name).is_none() {
            let known: Vec<&str> = plan.sources.iter().map(|s| s.name.as_str()).collect();
            bail!(
                "--source {name}: the pipeline declares no source `{name}` (sources: {})",
                known.join(", ")
            );
        }
        let files = expand_paths(path).with_context(|| format!("--source {s}"))?;
        inputs.entry(name.to_string()).or_default().extend(files);
    }
    Ok(inputs)
}

/// Lake files an earlier backfill of `view` wrote under `dir`.
fn backfill_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(parts) = std::fs::read_dir(dir) else {
        return out;
    };
    for p in parts.flatten() {
        let Ok(files) = std::fs::read_dir(p.path()) else {
            continue;
        };
        for f in files.flatten() {
            if f.file_name().to_string_lossy().starts_with("backfill-") {
                out.push(f.path());
            }
        }
    }
    out
}

/// Runs `sluice backfill`.
pub fn run(a: &BackfillArgs) -> anyhow::Result<BackfillStats> {
    let progress = if a.quiet {
        Progress::Off
    } else {
        Progress::auto()
    };
    run_with(a, progress)
}

/// Runs `sluice backfill` with its progress shown by `progress` (the
/// Python package's progress bar).
pub fn run_with(a: &BackfillArgs, progress: Progress) -> anyhow::Result<BackfillStats> {
    let plan = crate::plan(&a.pipeline)?;
    let from = a.from.as_deref().map(parse_time).transpose()?;
    let to = a.to.as_deref().map(parse_time).transpose()?;
    if let (Some(f), Some(t)) = (from, to)
        && f >= t
    {
        bail!("--from must be before --to");
    }
    let mut inputs = source_inputs(&plan, &a.sources)?;
    if a.sources.is_empty() {
        // No --source at all: each file source reads its own `path`.
        for sp in plan.sources.iter().filter(|s| s.connector == "file") {
            let o = sluice_connectors::FileOptions::parse(sp)?;
            let files = sluice_connectors::files::source_files(&o)
                .with_context(|| format!("source {} (path = '{}')", sp.name, o.path.display()))?;
            inputs.insert(sp.name.clone(), files);
        }
    }
    let views: Vec<_> = plan
        .views
        .iter()
        .filter(|v| inputs.contains_key(&v.source))
        .collect();
    if views.is_empty() {
        if a.sources.is_empty() {
            bail!(
                "give the history of a source with --source NAME=PATH (no file source reads its own path here)"
            );
        }
        bail!("no feature view reads the sources given");
    }
    for v in plan
        .views
        .iter()
        .filter(|v| !inputs.contains_key(&v.source))
    {
        eprintln!(
            "note: view `{}` skipped: no --source {}=PATH given",
            v.name, v.source
        );
    }
    for v in &views {
        let Some(root) = &v.offline else { continue };
        let old = backfill_files(&root.join(&v.name));
        if old.is_empty() {
            continue;
        }
        if !a.replace {
            bail!(
                "the lake of view `{}` ({}) already holds {} file(s) of an earlier backfill; pass --replace to delete them first",
                v.name,
                root.join(&v.name).display(),
                old.len()
            );
        }
        for f in old {
            std::fs::remove_file(&f).with_context(|| format!("removing {}", f.display()))?;
        }
    }
    std::fs::create_dir_all(&a.state_dir)
        .with_context(|| format!("creating {}", a.state_dir.display()))?;
    let dl_path = a.state_dir.join(BACKFILL_DEAD_LETTERS);
    if dl_path.exists() {
        std::fs::remove_file(&dl_path)
            .with_context(|| format!("removing {}", dl_path.display()))?;
    }
    let run_id = chrono::Utc::now().timestamp_millis();
    let lake = move |v: &sluice_sql::ViewPlan, shard: usize| {
        Ok(v.offline.as_ref().map(|root| {
            Box::new(
                LakeWriter::new(root, &v.name, emitted_schema(&v.output_schema))
                    .with_prefix(&format!("backfill-{run_id}-{shard}")),
            ) as Box<dyn sluice_engine::OfflineSink>
        }))
    };
    let store = if a.online {
        let names: Vec<String> = plan.views.iter().map(|v| v.name.clone()).collect();
        Some(Store::open(&a.state_dir, &names)?)
    } else {
        None
    };
    let sources: Vec<Box<dyn Source>> = inputs
        .into_iter()
        .filter_map(|(name, files)| {
            plan.source(&name)
                .map(|sp| Box::new(FilesSource::new(sp, files)) as Box<dyn Source>)
        })
        .collect();
    let mut opts = BackfillOptions {
        from,
        to,
        include_late: a.include_late,
        batch_rows: a.batch_rows.max(1),
        progress,
        ..BackfillOptions::default()
    };
    if let Some(t) = a.threads {
        opts.threads = t.max(1);
    }
    let outputs = BackfillOutputs {
        lake: &lake,
        dead: Box::new(sluice_engine::CappedDeadLetters::new(
            Box::new(sluice_connectors::DeadLetterFile::at(&dl_path)),
            a.dead_letter_limit,
            Default::default(),
        )),
        online: store.as_ref(),
    };
    let stats = backfill(&plan, sources, outputs, &opts)?;
    let secs = stats.elapsed.as_secs_f64().max(1e-9);
    eprintln!(
        "backfill done: {} events in {:.2} s ({:.0} events/s), {} late, {} dead letters{}",
        stats.events,
        secs,
        stats.events as f64 / secs,
        stats.late,
        stats.dead_letters,
        if stats.dead_letters > 0 {
            format!(" (in {})", dl_path.display())
        } else {
            String::new()
        }
    );
    for v in &stats.views {
        let lake = plan
            .view(&v.name)
            .and_then(|p| p.offline.as_ref())
            .map(|r| format!(" -> {}", r.join(&v.name).display()))
            .unwrap_or_default();
        let online = if a.online {
            format!(", {} keys online", v.online_keys)
        } else {
            String::new()
        };
        eprintln!("  view {}: {} rows{lake}{online}", v.name, v.rows);
        for (rule, n) in &v.expect_failures {
            eprintln!("    expect {rule}: {n} of {} rows fail it", v.rows);
        }
    }
    // Daily statistics of every day the backfill's lake now holds whole:
    // those ending at or before the later of `--to` and the data's watermark.
    for mut dv in crate::commands::daily_stats::DailyView::all(&plan)? {
        let Some(vp) = plan.view(dv.name()) else {
            continue;
        };
        if !views.iter().any(|v| v.name == vp.name) {
            continue;
        }
        let wm = stats
            .watermarks
            .iter()
            .find(|(s, _)| *s == vp.source)
            .and_then(|(_, w)| *w);
        let Some(clock) = wm.max(to) else { continue };
        let days = dv.describe_through(clock, true);
        if !days.is_empty() {
            eprintln!(
                "  view {}: statistics of {} day(s) ({} .. {})",
                vp.name,
                days.len(),
                days.first().map_or("", String::as_str),
                days.last().map_or("", String::as_str)
            );
        }
    }
    Ok(stats)
}
