//! Online/offline consistency: each read a view's `log_served` kept is
//! recomputed with the training-set path (a spine of the logged keys at
//! their `as_of`) and compared feature by feature with what was served.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch, UInt64Array};
use arrow::compute::{cast, concat_batches, filter_record_batch};
use arrow::datatypes::{DataType, Float64Type};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use serde_json::{Value, json};
use sluice_engine::training::time_millis;
use sluice_engine::{EngineError, Result};
use sluice_sql::PipelinePlan;

use crate::files::InputFile;
use crate::served::{served_dir, served_schema};
use crate::training::{
    FeatureRequest, TrainingSetRequest, TrainingSetStats, lake_files, read_table, training_set,
};

/// What `sluice consistency` compares.
#[derive(Debug, Clone)]
pub struct ConsistencyRequest {
    /// The view.
    pub view: String,
    /// Logged reads with `as_of` in `[from, to)` (epoch ms; open when `None`).
    pub from: Option<i64>,
    /// See `from`.
    pub to: Option<i64>,
    /// The sources' history for the replay (`--source`), as for training sets.
    pub sources: HashMap<String, Vec<InputFile>>,
    /// Numbers within this relative difference are equal.
    pub tolerance: f64,
    /// Where the recomputation's files go (spine, training set, its dead letters).
    pub work_dir: PathBuf,
}

/// One feature's comparison.
#[derive(Debug, Clone, Default)]
pub struct FeatureConsistency {
    /// Feature column.
    pub feature: String,
    /// Reads found both online and offline, compared.
    pub compared: u64,
    /// Of those, values that differ (NULL against a value differs).
    pub mismatches: u64,
    /// Served a value, recomputed none (offline missing).
    pub missing: u64,
    /// Served "not found", recomputed a value (offline extra).
    pub extra: u64,
    /// Symmetric mean absolute percentage error over compared numbers
    /// (`200 · |a − b| / (|a| + |b|)`, 0 when both are 0), in percent.
    pub smape: Option<f64>,
}

impl FeatureConsistency {
    /// Mismatches over compared reads.
    pub fn mismatch_rate(&self) -> f64 {
        if self.compared == 0 {
            0.0
        } else {
            self.mismatches as f64 / self.compared as f64
        }
    }
}

/// What `sluice consistency` found.
#[derive(Debug, Clone)]
pub struct ConsistencyReport {
    /// The view.
    pub view: String,
    /// Logged reads compared.
    pub reads: u64,
    /// Served-log files read.
    pub files: usize,
    /// Reads served as found / not found.
    pub served_found: u64,
    /// See `served_found`.
    pub served_not_found: u64,
    /// Reads logged before the view had a committed watermark (no `as_of`,
    /// nothing found): not compared.
    pub unclocked: u64,
    /// Per feature.
    pub features: Vec<FeatureConsistency>,
    /// The recomputation's own summary.
    pub training: TrainingSetStats,
    /// Up to 20 differing reads: key, as_of, request, feature, served, recomputed.
    pub samples: Vec<Value>,
    /// Every differing (read, feature), for a Parquet report.
    pub differences: Vec<Difference>,
    /// Why values can differ, from what the recomputation saw.
    pub explanations: Vec<String>,
}

/// One differing feature of one read.
#[derive(Debug, Clone)]
pub struct Difference {
    /// The online key.
    pub key: String,
    /// The read's clock (ms).
    pub as_of: Option<i64>,
    /// The request.
    pub request_id: String,
    /// The feature.
    pub feature: String,
    /// `mismatch`, `missing` or `extra`.
    pub kind: &'static str,
    /// What was served (text; NULL as `null`).
    pub served: String,
    /// What the training-set path gives.
    pub recomputed: String,
}

fn cerr(what: impl Into<String>, message: impl Into<String>) -> EngineError {
    EngineError::Connector {
        what: what.into(),
        message: message.into(),
    }
}

/// The logged reads of `view`, `as_of` in range, in file order.
fn read_log(
    plan: &PipelinePlan,
    view: &sluice_sql::ViewPlan,
    from: Option<i64>,
    to: Option<i64>,
) -> Result<(RecordBatch, usize, u64)> {
    let root = view.offline.as_ref().ok_or_else(|| {
        cerr(
            format!("view {}", view.name),
            "has no lake (offline = 'DIR'), so no served-value log",
        )
    })?;
    let dir = served_dir(root, &view.name);
    let files = lake_files(&dir)?;
    if files.is_empty() {
        return Err(cerr(
            format!("view {}", view.name),
            format!(
                "no served-value log under {} (set log_served on the view in {} and serve reads with `sluice run --serve`)",
                dir.display(),
                plan.file
            ),
        ));
    }
    let schema = served_schema(view);
    let mut batches = Vec::new();
    let mut unclocked = 0;
    for (f, _) in &files {
        let b = read_table(f, None)?;
        if b.schema().fields() != schema.fields() {
            return Err(cerr(
                format!("served-value log {}", f.display()),
                "its columns are not the view's: was it logged by another version of the view?",
            ));
        }
        let t = time_millis(
            b.column(
                schema
                    .index_of("as_of")
                    .map_err(|e| EngineError::arrow("as_of", e))?,
            ),
        )?;
        // A read served before the view had a committed watermark has no
        // clock to recompute it at (it found nothing): counted, not compared.
        unclocked += t.iter().filter(|t| t.is_none()).count() as u64;
        let keep: BooleanArray = t
            .iter()
            .map(|t| {
                Some(t.is_some_and(|t| from.is_none_or(|f| t >= f) && to.is_none_or(|e| t < e)))
            })
            .collect();
        batches.push(filter_record_batch(&b, &keep).map_err(|e| EngineError::arrow("log", e))?);
    }
    let all = concat_batches(&schema, &batches).map_err(|e| EngineError::arrow("log", e))?;
    Ok((all, files.len(), unclocked))
}

fn text_of(a: &ArrayRef) -> Result<Vec<Option<String>>> {
    let opts = FormatOptions::default();
    let f = ArrayFormatter::try_new(a.as_ref(), &opts)
        .map_err(|e| EngineError::arrow("formatting a feature", e))?;
    Ok((0..a.len())
        .map(|i| a.is_valid(i).then(|| f.value(i).to_string()))
        .collect())
}

fn show(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "null".into())
}

/// Recomputes the logged reads of `req.view` and compares.
pub fn consistency(plan: &PipelinePlan, req: &ConsistencyRequest) -> Result<ConsistencyReport> {
    let view = plan.view(&req.view).ok_or_else(|| {
        cerr(
            format!("view {}", req.view),
            format!("not in {}", plan.file),
        )
    })?;
    let (log, files, unclocked) = read_log(plan, view, req.from, req.to)?;
    let n = log.num_rows();
    std::fs::create_dir_all(&req.work_dir).map_err(|e| crate::lake::io(&req.work_dir, e))?;

    // The spine: the logged keys at their as_of, with a row number.
    let mut cols: Vec<ArrayRef> = Vec::new();
    let mut fields = Vec::new();
    for k in view.keys.iter().map(String::as_str).chain(["as_of"]) {
        let i = log
            .schema()
            .index_of(k)
            .map_err(|e| EngineError::arrow(k, e))?;
        cols.push(Arc::clone(log.column(i)));
        fields.push(log.schema().field(i).clone());
    }
    cols.push(Arc::new(UInt64Array::from_iter_values(0..n as u64)));
    fields.push(arrow::datatypes::Field::new(
        "_sluice_read",
        DataType::UInt64,
        false,
    ));
    let spine = RecordBatch::try_new(Arc::new(arrow::datatypes::Schema::new(fields)), cols)
        .map_err(|e| EngineError::arrow("spine", e))?;
    let spine_path = req.work_dir.join("spine.parquet");
    crate::training::write_table(&spine_path, &spine)?;
    let out = req.work_dir.join("recomputed.parquet");
    let training = training_set(
        plan,
        &TrainingSetRequest {
            spine: spine_path,
            features: vec![FeatureRequest {
                view: view.name.clone(),
                columns: Vec::new(),
            }],
            keys: HashMap::new(),
            time_column: Some("as_of".into()),
            out: out.clone(),
            closed_windows: false,
            sources: req.sources.clone(),
            dead_letters: req.work_dir.join("dead_letters.jsonl"),
            archive_writers: Default::default(),
        },
    )?;
    let offline = read_table(&out, None)?;
    if offline.num_rows() != n {
        return Err(EngineError::Internal(format!(
            "the recomputation has {} rows for {n} reads",
            offline.num_rows()
        )));
    }
    let features: Vec<String> = served_schema(view)
        .fields()
        .iter()
        .skip(view.keys.len() + sluice_sql::SERVED_LOG_COLUMNS.len())
        .map(|f| f.name().clone())
        .collect();
    let found = log
        .column_by_name("found")
        .map(|c| c.as_boolean().clone())
        .ok_or_else(|| EngineError::Internal("served log without `found`".into()))?;
    let offline_cols: Vec<ArrayRef> = features
        .iter()
        .map(|f| {
            offline
                .column_by_name(&format!("{}__{f}", view.name))
                .cloned()
                .ok_or_else(|| EngineError::Internal(format!("no {}__{f} recomputed", view.name)))
        })
        .collect::<Result<_>>()?;
    // A read found offline when any of its features is not NULL.
    let offline_found: Vec<bool> = (0..n)
        .map(|r| offline_cols.iter().any(|c| c.is_valid(r)))
        .collect();
    let keys_text: Vec<Vec<Option<String>>> = view
        .keys
        .iter()
        .map(|k| text_of(log.column_by_name(k).unwrap_or(log.column(0))))
        .collect::<Result<_>>()?;
    let key_of = |r: usize| {
        let cols: Vec<Option<&str>> = keys_text.iter().map(|c| c[r].as_deref()).collect();
        sluice_engine::keys::key_text(&cols)
    };
    let as_of = time_millis(log.column_by_name("as_of").unwrap_or(log.column(0)))?;
    let rid = text_of(log.column_by_name("request_id").unwrap_or(log.column(0)))?;

    let mut report = ConsistencyReport {
        view: view.name.clone(),
        reads: n as u64,
        files,
        served_found: found.iter().filter(|f| *f == Some(true)).count() as u64,
        served_not_found: found.iter().filter(|f| *f != Some(true)).count() as u64,
        unclocked,
        features: Vec::new(),
        training,
        samples: Vec::new(),
        differences: Vec::new(),
        explanations: Vec::new(),
    };
    for (f, oc) in features.iter().zip(&offline_cols) {
        let sc = log
            .column_by_name(f)
            .cloned()
            .ok_or_else(|| EngineError::Internal(format!("served log without {f}")))?;
        let numeric = sc.data_type().is_numeric() && oc.data_type().is_numeric();
        let (sn, on) = if numeric {
            let c = |a: &ArrayRef| -> Result<Vec<Option<f64>>> {
                let d =
                    cast(a, &DataType::Float64).map_err(|e| EngineError::arrow(f.clone(), e))?;
                Ok(d.as_primitive::<Float64Type>().iter().collect())
            };
            (c(&sc)?, c(oc)?)
        } else {
            (Vec::new(), Vec::new())
        };
        let (st, ot) = (text_of(&sc)?, text_of(oc)?);
        let mut fc = FeatureConsistency {
            feature: f.clone(),
            ..Default::default()
        };
        let mut smape_sum = 0.0;
        let mut smape_n = 0u64;
        for r in 0..n {
            let served = found.is_valid(r) && found.value(r);
            let kind = match (served, offline_found[r]) {
                (true, true) => {
                    fc.compared += 1;
                    let equal = if numeric {
                        match (sn[r], on[r]) {
                            (Some(a), Some(b)) => {
                                if a != 0.0 || b != 0.0 {
                                    smape_sum += 2.0 * (a - b).abs() / (a.abs() + b.abs());
                                }
                                smape_n += 1;
                                (a - b).abs() <= req.tolerance * a.abs().max(b.abs())
                                    || (a.is_nan() && b.is_nan())
                            }
                            (None, None) => true,
                            _ => false,
                        }
                    } else {
                        st[r] == ot[r]
                    };
                    if equal {
                        continue;
                    }
                    fc.mismatches += 1;
                    "mismatch"
                }
                (true, false) => {
                    fc.missing += 1;
                    "missing"
                }
                (false, true) => {
                    fc.extra += 1;
                    "extra"
                }
                (false, false) => continue,
            };
            let d = Difference {
                key: key_of(r),
                as_of: as_of[r],
                request_id: show(&rid[r]),
                feature: f.clone(),
                kind,
                served: show(&st[r]),
                recomputed: show(&ot[r]),
            };
            if report.samples.len() < 20 {
                report.samples.push(json!({
                    "key": d.key, "as_of": d.as_of.map(crate::lake::rfc3339_ms),
                    "request_id": d.request_id, "feature": d.feature, "kind": d.kind,
                    "served": d.served, "recomputed": d.recomputed,
                }));
            }
            report.differences.push(d);
        }
        fc.smape = (numeric && smape_n > 0).then(|| 100.0 * smape_sum / smape_n as f64);
        report.features.push(fc);
    }
    explain(&mut report);
    Ok(report)
}

/// Why the recomputation can differ from what was served, from its summary.
fn explain(r: &mut ConsistencyReport) {
    let differ = r
        .features
        .iter()
        .any(|f| f.mismatches + f.missing + f.extra > 0);
    for v in &r.training.views {
        if v.beyond > 0 {
            r.explanations.push(format!(
                "{} reads are at an as_of the history's watermark never reached: the history ends before them (pass newer files with --source, or keep an event archive)",
                v.beyond
            ));
        }
    }
    for s in &r.training.replays {
        if s.late > 0 {
            r.explanations.push(format!(
                "the replay of source {} dropped {} late events (dead-lettered, as the stream does)",
                s.source, s.late
            ));
        }
        if differ && !s.history.contains("archive") {
            r.explanations.push(format!(
                "source {} was replayed from {}: a read differs when that history holds events the stream had not accepted when it served the read (events added to the files later, events that reached the stream after the read), or when the view's definition changed since; an event archive (archive = '…') records what the stream saw",
                s.source, s.history
            ));
        }
    }
    if !differ {
        r.explanations
            .push("every logged read equals its recomputation".into());
    }
}

/// Writes the differences as Parquet (or CSV / JSON lines, by extension).
pub fn write_differences(path: &Path, diffs: &[Difference]) -> Result<()> {
    use arrow::array::{StringArray, TimestampMillisecondArray};
    let ts = DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, Some("UTC".into()));
    let schema = Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("key", DataType::Utf8, false),
        arrow::datatypes::Field::new("as_of", ts, true),
        arrow::datatypes::Field::new("request_id", DataType::Utf8, false),
        arrow::datatypes::Field::new("feature", DataType::Utf8, false),
        arrow::datatypes::Field::new("kind", DataType::Utf8, false),
        arrow::datatypes::Field::new("served", DataType::Utf8, false),
        arrow::datatypes::Field::new("recomputed", DataType::Utf8, false),
    ]));
    let s = |f: &dyn Fn(&Difference) -> String| -> ArrayRef {
        Arc::new(StringArray::from(diffs.iter().map(f).collect::<Vec<_>>()))
    };
    let batch = RecordBatch::try_new(
        schema,
        vec![
            s(&|d| d.key.clone()),
            Arc::new(
                TimestampMillisecondArray::from(diffs.iter().map(|d| d.as_of).collect::<Vec<_>>())
                    .with_timezone("UTC"),
            ),
            s(&|d| d.request_id.clone()),
            s(&|d| d.feature.clone()),
            s(&|d| d.kind.to_string()),
            s(&|d| d.served.clone()),
            s(&|d| d.recomputed.clone()),
        ],
    )
    .map_err(|e| EngineError::arrow("differences", e))?;
    crate::training::write_table(path, &batch)
}
