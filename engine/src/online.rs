//! Reading the online store: stored rows, the valid-until rule, and the
//! per-view facts a reader needs (kept in the state dir so `sluice get`
//! needs nothing else).

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{EngineError, Result};
use crate::store::Store;
use crate::tiles::{ReadMode, TileReader};
use crate::time::fmt_ts;

/// What a reader needs to know about a view.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ViewMeta {
    /// View name.
    pub name: String,
    /// The source whose watermark is the view's clock.
    pub source: String,
    /// Key column names.
    pub keys: Vec<String>,
    /// Window slide (next emission step), for windowed views.
    pub slide_ms: Option<i64>,
    /// The features of a key whose current window holds no events.
    pub empty_features: Option<Value>,
    /// The view's query, to detect a changed pipeline over old state.
    pub query: String,
    /// The window, as text.
    pub window: String,
}

/// Metadata key of a view's [`ViewMeta`].
pub fn view_meta_key(view: &str) -> String {
    format!("view/{view}")
}

pub use crate::checkpoint::watermark_key;

/// Reads a view's metadata.
pub fn read_view_meta(store: &Store, view: &str) -> Result<Option<ViewMeta>> {
    Ok(store
        .meta(&view_meta_key(view))?
        .and_then(|b| serde_json::from_slice(&b).ok()))
}

/// The reader of a tiled view of a state dir, rebuilt from the pipeline
/// text the job keeps with the state (`None` for views without tiles).
fn open_reader(store: &Store, view: &str) -> Result<Option<TileReader>> {
    let Some(text) = store.meta(crate::checkpoint::PIPELINE_KEY)? else {
        return Ok(None);
    };
    let text = String::from_utf8(text).map_err(|e| EngineError::Incompatible {
        path: "state dir".into(),
        reason: format!("unreadable pipeline text: {e}"),
    })?;
    let plan = sluice_sql::plan_stored(&text).map_err(|e| EngineError::Incompatible {
        path: "state dir".into(),
        reason: format!("the pipeline kept with the state no longer plans: {e}"),
    })?;
    TileReader::for_view(&plan, view)
}

/// The feature value of `key`. A tiled view (windowed, online) answers
/// from its tiles at its committed clock, in `mode` (its default when
/// `None`); other views answer their stored row: the row while it is valid
/// at watermark `wm`, the empty-set aggregate once its window has passed.
/// `None` for a key not found.
pub fn read_feature(
    store: &Store,
    meta: &ViewMeta,
    tiles: Option<&TileReader>,
    key: &str,
    wm: Option<i64>,
    mode: Option<ReadMode>,
) -> Result<Option<Value>> {
    Ok(read_feature_aged(store, meta, tiles, key, wm, mode)?.0)
}

/// [`read_feature`], and the age of the value in ms: its clock minus the
/// newest event it holds (a tiled view: the newest event in the key's
/// window; a lifetime or per-event view: the watermark minus the row's
/// event time). `None` when not found or when the value holds no events.
pub fn read_feature_aged(
    store: &Store,
    meta: &ViewMeta,
    tiles: Option<&TileReader>,
    key: &str,
    wm: Option<i64>,
    mode: Option<ReadMode>,
) -> Result<(Option<Value>, Option<i64>)> {
    crate::keys::KeyText::parse_for(key, &meta.keys).map_err(EngineError::BadRequest)?;
    if let Some(t) = tiles {
        let mode = mode.unwrap_or(t.layout().default_mode());
        if !t.layout().offers(mode) {
            let offered: Vec<&str> = [ReadMode::Fresh, ReadMode::Closed, ReadMode::Current]
                .into_iter()
                .filter(|m| t.layout().offers(*m))
                .map(ReadMode::as_str)
                .collect();
            return Err(EngineError::BadRequest(format!(
                "view `{}` ({}) answers window={}, not window={}",
                meta.name,
                meta.window,
                offered.join(" or window="),
                mode.as_str()
            )));
        }
        return t.read_aged(store, key, mode);
    }
    if let Some(m) = mode {
        return Err(EngineError::BadRequest(format!(
            "view `{}` ({}) has one value per key: no window={}",
            meta.name,
            meta.window,
            m.as_str()
        )));
    }
    let row = read_row(store, meta, key, wm)?;
    let age = match (&row, wm) {
        (Some(v), Some(w)) if v.get("valid_until").is_none_or(Value::is_null) => v
            .get("window_end")
            .and_then(Value::as_str)
            .and_then(crate::served::parse_utc_ms)
            .map(|end| w.saturating_sub(end).max(0)),
        _ => None,
    };
    Ok((row, age))
}

/// The stored online row of `key`: the row while it is valid at watermark
/// `wm`, the empty-set aggregate once its window has passed, `None` for a
/// key without a row. (Tiled views keep rows here only for their vector index.)
pub fn read_row(
    store: &Store,
    meta: &ViewMeta,
    key: &str,
    wm: Option<i64>,
) -> Result<Option<Value>> {
    let Some(raw) = store.online_get(&meta.name, key)? else {
        return Ok(None);
    };
    let Ok(row) = serde_json::from_slice::<Value>(&raw) else {
        return Ok(None);
    };
    let valid_until = row.get("valid_until").and_then(Value::as_i64);
    let window_end = row.get("window_end").and_then(Value::as_i64);
    if let (Some(vu), Some(w), Some(slide)) = (valid_until, wm, meta.slide_ms)
        && w >= vu
    {
        // The key's current window has no events: the aggregate over the empty set.
        let end = w.div_euclid(slide) * slide;
        return Ok(Some(json!({
            "key": key,
            "window_end": fmt_ts(end),
            "valid_until": fmt_ts(end.saturating_add(slide)),
            "features": meta.empty_features.clone().unwrap_or(Value::Null),
        })));
    }
    Ok(Some(json!({
        "key": key,
        "window_end": window_end.map(fmt_ts).unwrap_or(Value::Null),
        "valid_until": valid_until.map(fmt_ts).unwrap_or(Value::Null),
        "features": row.get("features").cloned().unwrap_or(Value::Null),
    })))
}

/// Every key's current value in `view`, as its online reads answer it
/// (tiled views: each key with tiles, read in the view's default mode;
/// other views: the stored rows), sorted by key. For tests and exports.
pub fn scan_values(store: &Store, view: &str) -> Result<Vec<(String, Vec<u8>)>> {
    scan_values_in(store, view, None)
}

/// [`scan_values`], tiled views read in `mode` (their default when `None`).
pub fn scan_values_in(
    store: &Store,
    view: &str,
    mode: Option<ReadMode>,
) -> Result<Vec<(String, Vec<u8>)>> {
    let Some(reader) = open_reader(store, view)? else {
        return store.online_scan(view);
    };
    let mut keys: Vec<String> = store
        .tile_scan(view)?
        .into_iter()
        .map(|(k, _, _)| k)
        .collect();
    keys.sort();
    keys.dedup();
    let mode = mode.unwrap_or(reader.layout().default_mode());
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        if let Some(v) = reader.read(store, &k, mode)? {
            let bytes =
                serde_json::to_vec(&v).map_err(|e| EngineError::Internal(format!("JSON: {e}")))?;
            out.push((k, bytes));
        }
    }
    Ok(out)
}
