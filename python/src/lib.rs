//! `sluice._sluice`: the native half of the `sluice` Python package.
//!
//! It plans pipeline files, joins training sets, runs backfills and reads
//! state dirs with the same code as the `sluice` command; the Python half
//! (`python/sluice/`) adds the typed API, input conversion (pandas, polars,
//! paths), the HTTP client and progress bars. Arrow data crosses in both
//! directions over the Arrow C stream interface (PyCapsules), without copies.
//! Long calls release the interpreter lock.

// pyo3's macros expand to the FFI glue of the module, which is unsafe code.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{RecordBatch, RecordBatchReader};
use arrow::ffi_stream::ArrowArrayStreamReader;
use arrow_pyarrow::{FromPyArrow, IntoPyArrow, Table, ToPyArrow};
use pyo3::exceptions::{PyException, PyKeyError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use sluice_connectors::training::{FeatureRequest, TrainingSetRequest, join_spine, read_table};
use sluice_engine::backfill::{Progress, ProgressReport};
use sluice_engine::tiles::ReadMode;
use sluice_sql::{PipelineError as PlanError, PipelinePlan, ViewKind};

pyo3::create_exception!(
    _sluice,
    SluiceError,
    PyException,
    "An error from the Sluice engine (a job, a state dir, a file)."
);
pyo3::create_exception!(
    _sluice,
    PipelineError,
    SluiceError,
    "A mistake in a pipeline file; `file`, `line`, `column` and `hint` say where and what would be valid."
);
pyo3::create_exception!(
    _sluice,
    NotFound,
    SluiceError,
    "A key, view or state dir that does not exist."
);

/// An engine error as the Python exception a user can act on: pipeline
/// mistakes carry their place and hint as attributes.
fn to_py(py: Python<'_>, e: anyhow::Error) -> PyErr {
    let text = format!("{e:#}");
    let found = e
        .chain()
        .find_map(|c| c.downcast_ref::<PlanError>())
        .or_else(|| {
            e.chain()
                .find_map(|c| c.downcast_ref::<sluice_engine::EngineError>())
                .and_then(|ee| match ee {
                    sluice_engine::EngineError::Plan(p) => Some(p),
                    _ => None,
                })
        });
    let Some(p) = found else {
        return SluiceError::new_err(text);
    };
    let err = PipelineError::new_err(text);
    let v = err.value(py);
    let set = |name: &str, value: Py<PyAny>| {
        let _ = v.setattr(name, value);
    };
    set(
        "file",
        p.file
            .clone()
            .into_pyobject(py)
            .map_or_else(|_| py.None(), |o| o.into_any().unbind()),
    );
    set(
        "line",
        p.pos.map_or_else(
            || py.None(),
            |q| {
                q.line
                    .into_pyobject(py)
                    .map_or_else(|_| py.None(), |o| o.into_any().unbind())
            },
        ),
    );
    set(
        "column",
        p.pos.map_or_else(
            || py.None(),
            |q| {
                q.column
                    .into_pyobject(py)
                    .map_or_else(|_| py.None(), |o| o.into_any().unbind())
            },
        ),
    );
    set(
        "message",
        p.message
            .clone()
            .into_pyobject(py)
            .map_or_else(|_| py.None(), |o| o.into_any().unbind()),
    );
    set(
        "hint",
        p.help.clone().map_or_else(
            || py.None(),
            |h| {
                h.into_pyobject(py)
                    .map_or_else(|_| py.None(), |o| o.into_any().unbind())
            },
        ),
    );
    err
}

/// A planned pipeline file.
#[pyclass(module = "sluice._sluice", frozen)]
struct NativePipeline {
    path: PathBuf,
    plan: PipelinePlan,
}

fn kind(v: &sluice_sql::ViewPlan) -> &'static str {
    match &v.kind {
        ViewKind::PerEvent => "per_event",
        ViewKind::Aggregate(a) => match a.window {
            sluice_sql::WindowSpec::Lifetime => "lifetime",
            _ => "windowed",
        },
    }
}

#[pymethods]
impl NativePipeline {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let plan = py
            .detach(|| sluice_cli::plan(&path))
            .map_err(|e| to_py(py, e))?;
        Ok(NativePipeline { path, plan })
    }

    /// The pipeline file's path.
    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// The streaming plan, as `sluice explain` prints it.
    fn explain(&self) -> String {
        self.plan.to_string()
    }

    /// One dict per feature view, in declaration order.
    fn views<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for v in &self.plan.views {
            let d = PyDict::new(py);
            d.set_item("name", &v.name)?;
            d.set_item("base_name", &v.base_name)?;
            d.set_item("version", v.version)?;
            d.set_item("source", &v.source)?;
            d.set_item("keys", &v.keys)?;
            let features: Vec<&str> = v
                .output_schema
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .filter(|n| !v.keys.iter().any(|k| k == n))
                .collect();
            d.set_item("features", features)?;
            // The rows it emits, as the lake holds them.
            let rows = sluice_engine::output::emitted_schema(&v.output_schema);
            d.set_item("schema", rows.as_ref().to_pyarrow(py)?)?;
            d.set_item("kind", kind(v))?;
            d.set_item("online", v.online)?;
            d.set_item("lake", v.offline.as_ref().map(|p| p.join(&v.name)))?;
            d.set_item("event_time", &v.event_time)?;
            out.append(d)?;
        }
        Ok(out)
    }

    /// Joins `spine` (a path, or any object with `__arrow_c_stream__`) with
    /// the requested features; returns `(pyarrow.Table, stats dict)`.
    #[pyo3(signature = (spine, features, key_map, time_column, sources, closed_windows, dead_letters))]
    #[allow(clippy::too_many_arguments)]
    fn training_set<'py>(
        &self,
        py: Python<'py>,
        spine: &Bound<'py, PyAny>,
        features: Vec<String>,
        key_map: HashMap<String, String>,
        time_column: Option<String>,
        sources: Vec<String>,
        closed_windows: bool,
        dead_letters: PathBuf,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyDict>)> {
        let features = features
            .iter()
            .map(|f| f.parse::<FeatureRequest>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(PyValueError::new_err)?;
        // A path is read by the CLI's reader; anything else arrives as an
        // Arrow stream, its buffers shared, not copied.
        let (batch, what, spine_path) = if let Ok(p) = spine.extract::<PathBuf>() {
            let b = py
                .detach(|| read_table(&p, time_column.as_deref()))
                .map_err(|e| to_py(py, e.into()))?;
            (b, format!("spine {}", p.display()), p)
        } else {
            let reader = ArrowArrayStreamReader::from_pyarrow_bound(spine)?;
            let schema = reader.schema();
            let batches = reader
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| SluiceError::new_err(format!("reading the spine: {e}")))?;
            let b = match batches.len() {
                1 => batches
                    .into_iter()
                    .next()
                    .unwrap_or_else(|| RecordBatch::new_empty(schema)),
                _ => arrow::compute::concat_batches(&schema, &batches).map_err(|e| {
                    SluiceError::new_err(format!("joining the spine's chunks: {e}"))
                })?,
            };
            (
                b,
                "spine (in memory)".to_string(),
                PathBuf::from("<memory>"),
            )
        };
        let plan = &self.plan;
        let result = py.detach(|| -> anyhow::Result<_> {
            let sources = sluice_cli::commands::backfill::source_inputs(plan, &sources)?
                .into_iter()
                .collect();
            let req = TrainingSetRequest {
                spine: spine_path,
                features,
                keys: key_map,
                time_column,
                out: PathBuf::new(),
                closed_windows,
                sources,
                dead_letters,
                archive_writers: Default::default(),
            };
            Ok(join_spine(plan, &req, &batch, &what)?)
        });
        let (out, stats) = result.map_err(|e| to_py(py, e))?;
        let schema = out.schema();
        let table = Table::try_new(vec![out], schema)
            .map_err(|e| SluiceError::new_err(e.to_string()))?
            .into_pyarrow(py)?;
        let d = PyDict::new(py);
        d.set_item("rows", stats.rows)?;
        d.set_item("times_out_of_range", stats.times_out_of_range)?;
        d.set_item("dead_letters", stats.dead_letters)?;
        let views = PyList::empty(py);
        for v in &stats.views {
            let vd = PyDict::new(py);
            vd.set_item("view", &v.view)?;
            vd.set_item("replayed", v.replayed)?;
            vd.set_item("found", v.found)?;
            vd.set_item("null", v.null)?;
            vd.set_item("empty", v.empty)?;
            vd.set_item("lake_rows", v.lake_rows)?;
            vd.set_item("files", v.files)?;
            views.append(vd)?;
        }
        d.set_item("views", views)?;
        let replays = PyList::empty(py);
        for r in &stats.replays {
            let rd = PyDict::new(py);
            rd.set_item("source", &r.source)?;
            rd.set_item("events", r.events)?;
            rd.set_item("late", r.late)?;
            rd.set_item("history", &r.history)?;
            replays.append(rd)?;
        }
        d.set_item("replays", replays)?;
        Ok((table, d))
    }

    /// Runs `sluice backfill`; `progress(source, rows, event_time_ms,
    /// done)` is called about twice a second. Returns a stats dict.
    #[pyo3(signature = (sources, start, end, state_dir, online, include_late, replace, threads, progress))]
    #[allow(clippy::too_many_arguments)]
    fn backfill<'py>(
        &self,
        py: Python<'py>,
        sources: Vec<String>,
        start: Option<String>,
        end: Option<String>,
        state_dir: PathBuf,
        online: bool,
        include_late: bool,
        replace: bool,
        threads: Option<usize>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let args = sluice_cli::commands::backfill::BackfillArgs {
            pipeline: self.path.clone(),
            sources,
            from: start,
            to: end,
            state_dir,
            online,
            include_late,
            replace,
            threads,
            batch_rows: 8192,
            dead_letter_limit: sluice_engine::DEFAULT_DEAD_LETTER_LIMIT,
            quiet: progress.is_none(),
        };
        let mode = match progress {
            None => Progress::Off,
            Some(cb) => {
                let cb = Arc::new(cb);
                Progress::Report(Arc::new(move |r: &ProgressReport<'_>| {
                    Python::attach(|py| {
                        let args = (r.source, r.rows, r.event_time, r.done);
                        if let Err(e) = cb.call1(py, args) {
                            // A broken progress bar does not stop a backfill.
                            e.print(py);
                        }
                    })
                }))
            }
        };
        let stats = py
            .detach(|| sluice_cli::commands::backfill::run_with(&args, mode))
            .map_err(|e| to_py(py, e))?;
        let d = PyDict::new(py);
        d.set_item("events", stats.events)?;
        d.set_item("late", stats.late)?;
        d.set_item("dead_letters", stats.dead_letters)?;
        d.set_item("seconds", stats.elapsed.as_secs_f64())?;
        let views = PyList::empty(py);
        for v in &stats.views {
            let vd = PyDict::new(py);
            vd.set_item("view", &v.name)?;
            vd.set_item("rows", v.rows)?;
            vd.set_item("online_keys", v.online_keys)?;
            vd.set_item("expect_failures", v.expect_failures.clone())?;
            views.append(vd)?;
        }
        d.set_item("views", views)?;
        Ok(d)
    }
}

/// Reads features from a state dir's online store (as `sluice get`);
/// returns one JSON text per key, `None` for a key without a value.
#[pyfunction]
#[pyo3(signature = (state_dir, view, keys, window=None))]
fn read_online(
    py: Python<'_>,
    state_dir: PathBuf,
    view: String,
    keys: Vec<String>,
    window: Option<String>,
) -> PyResult<Vec<Option<String>>> {
    let mode = match window.as_deref() {
        None => None,
        Some(w) => Some(ReadMode::parse(w).ok_or_else(|| {
            PyValueError::new_err(format!(
                "window: expected fresh, closed or current, not `{w}`"
            ))
        })?),
    };
    if !state_dir.join("db").exists() {
        return Err(NotFound::new_err(format!(
            "{} is not a state dir (no online store in it)",
            state_dir.display()
        )));
    }
    let r = py.detach(|| -> anyhow::Result<Vec<Option<String>>> {
        use sluice_engine::reader::Features;
        let (dir, view) = sluice_cli::open_view(&state_dir, &view)?;
        keys.iter()
            .map(|k| Ok(dir.read(&view, k, mode)?.0.map(|j| j.to_string())))
            .collect()
    });
    r.map_err(|e| {
        let text = format!("{e:#}");
        if text.starts_with("no feature view") {
            PyKeyError::new_err(text)
        } else {
            to_py(py, e)
        }
    })
}

#[pymodule]
fn _sluice(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<NativePipeline>()?;
    m.add_function(wrap_pyfunction!(read_online, m)?)?;
    m.add("SluiceError", py.get_type::<SluiceError>())?;
    m.add("PipelineError", py.get_type::<PipelineError>())?;
    m.add("NotFound", py.get_type::<NotFound>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
