//! Reading the online store: stored rows, the valid-until rule, and the
//! per-view facts a reader needs (kept in the state dir so `sluice get`
//! needs nothing else).

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::Result;
use crate::store::Store;

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

/// Metadata key of a source's watermark.
pub fn watermark_key(source: &str) -> String {
    format!("wm/{source}")
}

/// Reads a view's metadata.
pub fn read_view_meta(store: &Store, view: &str) -> Result<Option<ViewMeta>> {
    Ok(store
        .meta(&view_meta_key(view))?
        .and_then(|b| serde_json::from_slice(&b).ok()))
}

/// Milliseconds as an RFC 3339 UTC timestamp.
pub fn fmt_ts(ms: i64) -> Value {
    match chrono_like(ms) {
        Some(s) => Value::String(s),
        None => Value::Null,
    }
}

fn chrono_like(ms: i64) -> Option<String> {
    let a = arrow::array::TimestampMillisecondArray::from(vec![ms]).with_timezone("UTC");
    let opts = arrow::util::display::FormatOptions::default()
        .with_timestamp_tz_format(Some("%Y-%m-%dT%H:%M:%S%.3fZ"));
    let f = arrow::util::display::ArrayFormatter::try_new(&a, &opts).ok()?;
    Some(f.value(0).to_string())
}

/// The feature value of `key` as of watermark `wm`: the stored row while it
/// is valid, the empty-set aggregate once its window has passed, `None` for a
/// key never seen.
pub fn read_feature(
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
