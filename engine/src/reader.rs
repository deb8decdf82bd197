//! One way to read features, whoever holds them: a running job
//! ([`crate::live::Live`]) or a state dir opened read-only ([`StateDir`]).
//! The server, `sluice get`, `sluice nearest` and Python's `open_state` all
//! read through [`Features`], so a key reads the same wherever it is read,
//! and an unversioned name picks its version by one rule ([`resolve`]).

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;
use sluice_sql::PipelinePlan;

use crate::checkpoint::{Checkpoint, PIPELINE_KEY, catch_up_key, watermark_key};
use crate::error::{EngineError, Result};
use crate::online::{ViewMeta, read_feature_aged, read_view_meta};
use crate::store::Store;
use crate::tiles::{ReadMode, TileReader};
use crate::watermark::NO_WATERMARK;

/// Features by key.
pub trait Features: Send + Sync {
    /// The view `name` reads (see [`resolve`]).
    fn resolve(&self, name: &str) -> String;
    /// The metadata of view `view`, `None` when there is no such view.
    fn meta(&self, view: &str) -> Option<&ViewMeta>;
    /// The names of the views, sorted.
    fn view_names(&self) -> Vec<String>;
    /// The value of `key` in view `view` (a resolved name) in `mode` (its
    /// default when `None`), and the value's age in ms; `None` when the key
    /// has no value.
    fn read(
        &self,
        view: &str,
        key: &str,
        mode: Option<ReadMode>,
    ) -> Result<(Option<Value>, Option<i64>)>;
}

/// A pipeline's views with more than one version (or none named by its
/// base name): base name → its versions, newest first.
pub fn versions_of(plan: &PipelinePlan) -> HashMap<String, Vec<(u32, String)>> {
    let mut m: HashMap<String, Vec<(u32, String)>> = HashMap::new();
    for v in &plan.views {
        m.entry(v.base_name.clone())
            .or_default()
            .push((v.version, v.name.clone()));
    }
    m.retain(|b, vs| vs.len() > 1 || vs.iter().all(|(_, n)| n != b));
    for vs in m.values_mut() {
        vs.sort_by_key(|v| std::cmp::Reverse(v.0));
    }
    m
}

/// The view a name reads: `name@1` is version 1 (whose view keeps the
/// plain name); an unversioned name of a view with versions is the newest
/// version that has caught up (its watermark has passed its catch-up
/// point; a version the state saw from its start has none), else the
/// oldest; any other name is itself.
pub fn resolve(
    name: &str,
    versions: &HashMap<String, Vec<(u32, String)>>,
    has_view: impl Fn(&str) -> bool,
    watermark: impl Fn(&str) -> Option<i64>,
    catch_up: impl Fn(&str) -> Option<i64>,
) -> String {
    if let Some(base) = name.strip_suffix("@1")
        && (versions.contains_key(base) || has_view(base))
    {
        return base.to_string();
    }
    let Some(vs) = versions.get(name) else {
        return name.to_string();
    };
    for (_, v) in vs {
        let ready = match (watermark(v), catch_up(v)) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(w), Some(at)) => w >= at,
        };
        if ready {
            return v.clone();
        }
    }
    vs.last()
        .map_or_else(|| name.to_string(), |(_, n)| n.clone())
}

/// A state dir opened for reading (works while a `sluice run` holds it):
/// the views as the job that wrote it left them, their committed clocks.
pub struct StateDir {
    store: Store,
    metas: HashMap<String, ViewMeta>,
    readers: HashMap<String, TileReader>,
    versions: HashMap<String, Vec<(u32, String)>>,
    watermarks: HashMap<String, Option<i64>>,
    catch_up: HashMap<String, i64>,
}

impl StateDir {
    /// Opens `dir` read-only. A state dir of another layout version is
    /// refused, as `sluice run` refuses it; the pipeline kept with the
    /// state is planned without the environment (no source credentials).
    pub fn open(dir: &Path) -> Result<StateDir> {
        let store = Store::open_read_only(dir)?;
        Checkpoint::load(&store, dir)?;
        let plan = match store.meta(PIPELINE_KEY)? {
            Some(text) => {
                let text = String::from_utf8(text).map_err(|e| EngineError::Incompatible {
                    path: dir.display().to_string(),
                    reason: format!("unreadable pipeline text: {e}"),
                })?;
                Some(
                    sluice_sql::plan_stored(&text).map_err(|e| EngineError::Incompatible {
                        path: dir.display().to_string(),
                        reason: format!("the pipeline kept with the state no longer plans: {e}"),
                    })?,
                )
            }
            None => None,
        };
        let mut metas = HashMap::new();
        let mut readers = HashMap::new();
        let mut watermarks = HashMap::new();
        let mut catch_up = HashMap::new();
        let mut versions = HashMap::new();
        if let Some(plan) = &plan {
            versions = versions_of(plan);
            for v in &plan.views {
                let Some(meta) = read_view_meta(&store, &v.name)? else {
                    continue;
                };
                let wm = store
                    .meta_i64(&watermark_key(&meta.source))?
                    .filter(|w| *w != NO_WATERMARK);
                watermarks.insert(v.name.clone(), wm);
                if let Some(at) = store.meta_i64(&catch_up_key(&v.name))? {
                    catch_up.insert(v.name.clone(), at);
                }
                if let Some(r) = TileReader::for_view(plan, &v.name)? {
                    readers.insert(v.name.clone(), r);
                }
                metas.insert(v.name.clone(), meta);
            }
        }
        Ok(StateDir {
            store,
            metas,
            readers,
            versions,
            watermarks,
            catch_up,
        })
    }

    /// The store, read-only.
    pub fn store(&self) -> &Store {
        &self.store
    }
}

impl Features for StateDir {
    fn resolve(&self, name: &str) -> String {
        resolve(
            name,
            &self.versions,
            |v| self.metas.contains_key(v),
            |v| self.watermarks.get(v).copied().flatten(),
            |v| self.catch_up.get(v).copied(),
        )
    }

    fn meta(&self, view: &str) -> Option<&ViewMeta> {
        self.metas.get(view)
    }

    fn view_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.metas.keys().cloned().collect();
        v.sort();
        v
    }

    fn read(
        &self,
        view: &str,
        key: &str,
        mode: Option<ReadMode>,
    ) -> Result<(Option<Value>, Option<i64>)> {
        let meta = self
            .metas
            .get(view)
            .ok_or_else(|| EngineError::BadRequest(format!("no feature view `{view}`")))?;
        read_feature_aged(
            &self.store,
            meta,
            self.readers.get(view),
            key,
            self.watermarks.get(view).copied().flatten(),
            mode,
        )
    }
}
