//! `sluice nearest`: nearest neighbours from a state dir's vector index.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use serde_json::json;
use sluice_engine::vector::{Query, Search, VectorIndex};

/// Arguments of `sluice nearest`.
#[derive(clap::Args)]
pub struct NearestArgs {
    /// The view with a vector index.
    view: String,
    /// Neighbours of this key's current vector (the key itself left out).
    #[arg(long, conflicts_with = "vector")]
    key: Option<String>,
    /// Take `--key`'s vector from this view's index instead (e.g. a user's
    /// taste vector, searched among items).
    #[arg(long, requires = "key")]
    key_view: Option<String>,
    /// Neighbours of this vector, as a JSON array.
    #[arg(long)]
    vector: Option<String>,
    /// How many neighbours.
    #[arg(short, long, default_value_t = 10)]
    k: usize,
    /// Scan every vector instead of the trees (exact, slower).
    #[arg(long)]
    exact: bool,
    /// Candidates inspected per neighbour and tree (default: the view's `search_k`).
    #[arg(long)]
    search_k: Option<usize>,
    /// Only neighbours this SQL condition over the index's filter columns
    /// (`index_filter_columns`) is true for, e.g. "category = 'shoes'".
    #[arg(long)]
    filter: Option<String>,
    /// Also print each neighbour's features from the online store.
    #[arg(long)]
    features: bool,
    /// Print every indexed key and vector instead (JSON lines).
    #[arg(long, conflicts_with_all = ["key", "vector"])]
    dump: bool,
    /// State directory of the pipeline.
    #[arg(long, default_value = "sluice-state")]
    state_dir: PathBuf,
}

/// Runs `sluice nearest`.
pub fn run(a: &NearestArgs) -> anyhow::Result<()> {
    let idx = VectorIndex::open_existing(&a.state_dir, &a.view)?;
    let mut out = std::io::stdout().lock();
    if a.dump {
        for (k, v) in idx.dump()? {
            if writeln!(out, "{}", json!({"key": k, "vector": v})).is_err() {
                break;
            }
        }
        return Ok(());
    }
    let parsed: Option<Vec<f32>> = match &a.vector {
        Some(v) => {
            Some(serde_json::from_str(v).context("--vector must be a JSON array of numbers")?)
        }
        None => None,
    };
    let other: Option<Vec<f32>> = match (&a.key, &a.key_view) {
        (Some(k), Some(view)) => {
            let oi = VectorIndex::open_existing(&a.state_dir, view)?;
            match oi.vector(k)? {
                Some(v) => Some(v),
                None => bail!("key `{k}` has no current vector in view `{view}`"),
            }
        }
        _ => None,
    };
    let query = match (&parsed, &other, &a.key) {
        (Some(v), _, _) => Query::Vector(v),
        (None, Some(v), _) => Query::Vector(v),
        (None, None, Some(k)) => Query::Key(k),
        (None, None, None) => bail!("give --key KEY or --vector '[…]' (or --dump)"),
    };
    let filter = a.filter.as_deref().map(|f| idx.filter(f)).transpose()?;
    let search = Search {
        search_k: a.search_k,
        exact: a.exact,
        filter: filter.as_ref(),
        ..Search::one(query, a.k)
    };
    let Some(found) = idx.search(&search)?.results.pop().flatten() else {
        bail!(
            "key `{}` has no current vector in view `{}`",
            a.key.as_deref().unwrap_or_default(),
            a.view
        );
    };
    let store = if a.features {
        Some(crate::open_view(&a.state_dir, &a.view)?)
    } else {
        None
    };
    for n in found {
        let mut o = json!({"key": n.key, "distance": n.distance});
        if let Some((dir, view)) = &store
            && let Some(m) = o.as_object_mut()
        {
            use sluice_engine::reader::Features;
            let f = dir
                .read(view, &n.key, None)?
                .0
                .and_then(|r| r.get("features").cloned())
                .unwrap_or(serde_json::Value::Null);
            m.insert("features".into(), f);
        }
        if writeln!(out, "{o}").is_err() {
            break;
        }
    }
    Ok(())
}
