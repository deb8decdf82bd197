//! `sluice stats`: per-feature statistics of a view's lake rows (or a
//! training set), and drift against a reference.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use sluice_connectors::stats::{
    Drift, FeatureKind, FeatureStats, GroupStats, StatsInput, StatsReport, StatsRequest,
    feature_stats,
};

use crate::flags::parse_time;

/// The exit code of a run whose drift passes a threshold.
pub const DRIFT_EXIT: i32 = 3;

/// Options of `sluice stats`.
#[derive(clap::Args, Debug)]
pub struct StatsArgs {
    /// The pipeline file (it says where each view's lake is).
    pub pipeline: PathBuf,
    /// The feature view.
    #[arg(long)]
    pub view: String,
    /// Feature columns to describe (default: all of the view's features).
    #[arg(long, value_delimiter = ',')]
    pub features: Vec<String>,
    /// First `window_end` included (RFC 3339, YYYY-MM-DD or epoch ms).
    #[arg(long)]
    pub from: Option<String>,
    /// First `window_end` excluded.
    #[arg(long)]
    pub to: Option<String>,
    /// One group per day of the lake (its `date=` folders) instead of one for the range.
    #[arg(long)]
    pub by_day: bool,
    /// Describe a training set (or any .parquet/.csv/.jsonl with the view's
    /// features as `VIEW__COL` or `COL` columns) instead of the lake.
    #[arg(long, conflicts_with_all = ["from", "to", "by_day"])]
    pub input: Option<PathBuf>,
    /// Compare with a reference: a training-set file, or a range of the
    /// view's lake as `FROM..TO` (either end may be empty).
    #[arg(long)]
    pub reference: Option<String>,
    /// Exit with code 3 when a feature's population stability index against
    /// the reference is above this.
    #[arg(long, default_value_t = 0.2)]
    pub max_psi: f64,
    /// Exit with code 3 when a feature's largest quantile shift is above
    /// this many reference standard deviations.
    #[arg(long)]
    pub max_shift_sd: Option<f64>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// The rows of `view`'s lake whose `window_end` is in `[from, to)` (times
/// as `--from` takes them; an empty or missing end is open).
pub fn lake_input(
    p: &sluice_sql::PipelinePlan,
    view: &str,
    from: Option<&str>,
    to: Option<&str>,
) -> anyhow::Result<StatsInput> {
    let v = p
        .view(view)
        .with_context(|| format!("no view `{view}` in {}", p.file))?;
    let Some(root) = &v.offline else {
        bail!("view `{view}` has no lake (`offline = '…'`); pass --input FILE");
    };
    let t = |s: Option<&str>| -> anyhow::Result<Option<i64>> {
        s.filter(|s| !s.trim().is_empty())
            .map(parse_time)
            .transpose()
    };
    let (from, to) = (t(from)?, t(to)?);
    if let (Some(f), Some(t)) = (from, to)
        && f >= t
    {
        bail!("the range is empty: --from must be before --to");
    }
    Ok(StatsInput::Lake {
        dir: root.join(view),
        from,
        to,
    })
}

/// Computes, prints, and returns whether a threshold was passed.
pub fn run(a: &StatsArgs) -> anyhow::Result<bool> {
    let p = crate::plan(&a.pipeline)?;
    let view = p
        .view(&a.view)
        .with_context(|| {
            format!(
                "no view `{}` in {} (views: {})",
                a.view,
                a.pipeline.display(),
                p.views
                    .iter()
                    .map(|v| v.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?
        .clone();
    let input = match &a.input {
        Some(f) => StatsInput::File(f.clone()),
        None => lake_input(&p, &a.view, a.from.as_deref(), a.to.as_deref())?,
    };
    let reference = match &a.reference {
        None => None,
        Some(r) => match r.split_once("..") {
            Some((f, t)) if !std::path::Path::new(r).exists() => {
                Some(lake_input(&p, &a.view, Some(f), Some(t))?)
            }
            _ => Some(StatsInput::File(PathBuf::from(r))),
        },
    };
    let threads = a.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let req = StatsRequest {
        features: a.features.clone(),
        input,
        by_day: a.by_day,
        reference,
        threads,
    };
    let t0 = std::time::Instant::now();
    let report = feature_stats(&view, &req)?;
    let secs = t0.elapsed().as_secs_f64();
    let failures = failures(&report, a.max_psi, a.max_shift_sd);
    let mut out = std::io::stdout().lock();
    let text = if a.json {
        let mut j = report_json(&report);
        j["max_psi"] = json!(a.max_psi);
        j["max_shift_sd"] = json!(a.max_shift_sd);
        j["failures"] = json!(failures);
        format!("{}\n", serde_json::to_string_pretty(&j)?)
    } else {
        table(&report)
    };
    // A closed pipe (`sluice stats … | head`) is not an error.
    let _ = out.write_all(text.as_bytes());
    let rows: u64 = report.groups.iter().map(|g| g.rows).sum();
    eprintln!(
        "stats: {} rows of {} from {} files in {secs:.2} s",
        rows, report.input, report.files
    );
    for f in &failures {
        eprintln!("drift: {f}");
    }
    Ok(!failures.is_empty())
}

/// The thresholds passed, one line each.
fn failures(r: &StatsReport, max_psi: f64, max_shift_sd: Option<f64>) -> Vec<String> {
    let mut out = Vec::new();
    for (g, drifts) in r.groups.iter().zip(&r.drift) {
        let at = g
            .day
            .as_ref()
            .map(|d| format!(" on {d}"))
            .unwrap_or_default();
        for d in drifts {
            if let Some(p) = d.psi
                && p > max_psi
            {
                out.push(format!(
                    "{}{at}: population stability index {p:.4} > {max_psi}",
                    d.feature
                ));
            }
            if let (Some(m), Some(s)) = (max_shift_sd, &d.shift)
                && s.shift_sd.is_some_and(|sd| sd > m)
            {
                out.push(format!(
                    "{}{at}: quantile {} moved {} -> {} ({:.3} reference standard deviations > {m})",
                    d.feature,
                    s.q,
                    s.reference,
                    s.current,
                    s.shift_sd.unwrap_or(0.0)
                ));
            }
        }
    }
    out
}

fn feature_json(f: &FeatureStats) -> Value {
    let mut j = json!({
        "feature": f.name,
        "type": f.data_type,
        "count": f.count,
        "nulls": f.nulls,
        "null_rate": f.null_rate(),
        "min": f.min,
        "max": f.max,
    });
    if f.kind == FeatureKind::Numeric {
        j["mean"] = json!(f.mean);
        j["stddev"] = json!(f.stddev);
        j["quantiles"] = Value::Object(
            f.quantiles
                .iter()
                .map(|(q, v)| (format!("{q}"), json!(v)))
                .collect(),
        );
    }
    if let Some(d) = f.distinct {
        j["distinct"] = json!(d);
    }
    j
}

fn group_json(g: &GroupStats, drift: Option<&Vec<Drift>>) -> Value {
    let features: Vec<Value> = g
        .features
        .iter()
        .enumerate()
        .map(|(k, f)| {
            let mut j = feature_json(f);
            if let Some(d) = drift.and_then(|d| d.get(k)) {
                j["psi"] = json!(d.psi);
                j["psi_bins"] = json!(d.bins);
                if let Some(s) = &d.shift {
                    j["largest_quantile_shift"] = json!({
                        "q": s.q, "current": s.current, "reference": s.reference,
                        "shift": s.shift, "shift_sd": s.shift_sd,
                    });
                }
            }
            j
        })
        .collect();
    json!({"day": g.day, "rows": g.rows, "features": features})
}

/// The report as JSON.
pub fn report_json(r: &StatsReport) -> Value {
    let groups: Vec<Value> = r
        .groups
        .iter()
        .enumerate()
        .map(|(i, g)| group_json(g, r.drift.get(i)))
        .collect();
    let mut j = json!({
        "view": r.view,
        "input": r.input,
        "files": r.files,
        "groups": groups,
    });
    if let Some((what, g)) = &r.reference {
        j["reference"] = json!({"input": what, "stats": group_json(g, None)});
    }
    j
}

fn num(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v == v.trunc() && v.abs() < 1e15 => format!("{v}"),
        Some(v) => format!("{v:.4}"),
    }
}

fn val(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => n.as_f64().map_or_else(|| n.to_string(), |f| num(Some(f))),
        other => other.to_string(),
    }
}

/// The report as an aligned table, one per group.
fn table(r: &StatsReport) -> String {
    let mut out = String::new();
    let with_drift = !r.drift.is_empty();
    let mut header = vec![
        "feature", "count", "null%", "min", "max", "mean", "stddev", "p01", "p25", "p50", "p75",
        "p99", "distinct",
    ];
    if with_drift {
        header.extend(["psi", "shift(q)"]);
    }
    let pick = |f: &FeatureStats, q: f64| {
        num(f
            .quantiles
            .iter()
            .find(|(x, _)| (*x - q).abs() < 1e-9)
            .and_then(|(_, v)| *v))
    };
    for (i, g) in r.groups.iter().enumerate() {
        out.push_str(&format!(
            "view {} {}{}: {} rows\n",
            r.view,
            r.input,
            g.day
                .as_ref()
                .map(|d| format!(" day {d}"))
                .unwrap_or_default(),
            g.rows
        ));
        let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
        for (k, f) in g.features.iter().enumerate() {
            let mut row = vec![
                f.name.clone(),
                f.count.to_string(),
                format!("{:.2}", 100.0 * f.null_rate()),
                val(&f.min),
                val(&f.max),
                num(f.mean),
                num(f.stddev),
                pick(f, 0.01),
                pick(f, 0.25),
                pick(f, 0.5),
                pick(f, 0.75),
                pick(f, 0.99),
                f.distinct.map_or("-".into(), |d| d.to_string()),
            ];
            if with_drift {
                let d = r.drift.get(i).and_then(|d| d.get(k));
                row.push(num(d.and_then(|d| d.psi)));
                row.push(d.and_then(|d| d.shift.as_ref()).map_or("-".into(), |s| {
                    format!("{} @{}", num(Some(s.current - s.reference)), s.q)
                }));
            }
            rows.push(row);
        }
        let widths: Vec<usize> = (0..header.len())
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        for row in rows {
            let cells: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(c, s)| {
                    if c == 0 {
                        format!("{s:<w$}", w = widths[c])
                    } else {
                        format!("{s:>w$}", w = widths[c])
                    }
                })
                .collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        }
        out.push('\n');
    }
    if let Some((what, g)) = &r.reference {
        out.push_str(&format!("reference {what}: {} rows\n", g.rows));
    }
    out
}
