//! The serving API: features by key over HTTP, plus `/metrics`, `/healthz`
//! and `/readyz`. Reads go straight to RocksDB; the clock of the valid-until
//! rule is the view's committed watermark.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::job::Live;
use crate::online::read_feature_aged;
use crate::tiles::ReadMode;

/// What the server needs.
#[derive(Clone)]
pub struct ServeState {
    /// The running job's shared state.
    pub live: Arc<Live>,
    /// Renders `/metrics`.
    pub metrics: Option<PrometheusHandle>,
    /// Required bearer token for `/v1/…`, if set.
    pub token: Option<Arc<str>>,
}

/// The router.
pub fn router(state: ServeState) -> Router {
    let api = Router::new()
        .route("/v1/features/{view}/{key}", get(get_feature))
        .route("/v1/features/{view}", post(post_features))
        .route("/v1/features/{view}/nearest", post(post_nearest))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(api)
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn auth(
    State(s): State<ServeState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    if let Some(t) = &s.token {
        let ok = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|v| v.trim() == t.as_ref());
        if !ok {
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "missing or wrong bearer token"})),
            )
                .into_response();
        }
    }
    next.run(req).await
}

fn observe(route: &'static str, status: StatusCode, t0: Instant) {
    metrics::counter!("sluice_serving_requests_total", "route" => route, "status" => status.as_u16().to_string()).increment(1);
    metrics::histogram!("sluice_serving_latency_seconds", "route" => route)
        .record(t0.elapsed().as_secs_f64());
}

fn lookup(
    s: &ServeState,
    view: &str,
    key: &str,
    mode: Option<ReadMode>,
) -> Result<Option<Value>, (StatusCode, Value)> {
    let view = s.live.resolve(view);
    let Some(meta) = s.live.views.get(view) else {
        let known: Vec<&String> = s.live.views.keys().collect();
        return Err((
            StatusCode::NOT_FOUND,
            json!({"error": format!("no feature view `{view}`"), "views": known}),
        ));
    };
    let tiles = s.live.readers.get(view).map(|r| r.as_ref());
    read_feature_aged(
        &s.live.store,
        meta,
        tiles,
        key,
        s.live.watermark(view),
        mode,
    )
    .map(|(value, age)| {
        if let Some(ms) = age {
            metrics::histogram!("sluice_served_value_age_seconds", "view" => view.to_string())
                .record(ms as f64 / 1000.0);
        }
        value
    })
    .map_err(|e| match e {
        crate::error::EngineError::BadRequest(m) => (StatusCode::BAD_REQUEST, json!({"error": m})),
        e => (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": e.to_string()}),
        ),
    })
}

/// The `window` query parameter: which value of a windowed view to read.
#[derive(Deserialize, Default)]
struct ReadQuery {
    window: Option<String>,
}

fn read_mode(q: &ReadQuery) -> Result<Option<ReadMode>, (StatusCode, Value)> {
    match &q.window {
        None => Ok(None),
        Some(w) => ReadMode::parse(w).map(Some).ok_or_else(|| {
            (
                StatusCode::BAD_REQUEST,
                json!({"error": format!("window must be fresh, closed or current, not `{w}`")}),
            )
        }),
    }
}

/// The request's `x-request-id`, or a new one (wall-clock ms and a counter).
fn request_id(headers: &HeaderMap) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 200)
        .map(str::to_string)
        .unwrap_or_else(|| {
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            format!("{:x}-{n:x}", wall_ms())
        })
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Logs a default-mode read of a sampled key of a view with `log_served`.
fn log_read(
    s: &ServeState,
    view: &str,
    key: &str,
    mode: Option<ReadMode>,
    value: Option<&Value>,
    rid: &str,
) {
    let Some(log) = s.live.served.get(view) else {
        return;
    };
    // Only the default read is what a training set reproduces.
    if mode.is_some() || !log.samples(key) {
        return;
    }
    let as_of = match value.and_then(|v| v.get("as_of")) {
        Some(Value::String(t)) => crate::served::parse_utc_ms(t),
        _ => None,
    }
    .or_else(|| s.live.watermark(view));
    log.push(
        view,
        crate::served::ServedRow {
            key: key.to_string(),
            as_of,
            features: value
                .and_then(|v| v.get("features"))
                .and_then(Value::as_object)
                .cloned(),
            request_id: rid.to_string(),
            served_at: wall_ms(),
        },
    );
}

async fn get_feature(
    State(s): State<ServeState>,
    Path((view, key)): Path<(String, String)>,
    Query(q): Query<ReadQuery>,
    headers: HeaderMap,
) -> Response {
    let t0 = Instant::now();
    let rid = request_id(&headers);
    let read = read_mode(&q).and_then(|m| lookup(&s, &view, &key, m).map(|v| (m, v)));
    if let Ok((m, v)) = &read {
        log_read(&s, &view, &key, *m, v.as_ref(), &rid);
    }
    let (status, body) = match read.map(|(_, v)| v) {
        Ok(Some(v)) => (StatusCode::OK, v),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            json!({"error": "key not found", "key": key}),
        ),
        Err(e) => e,
    };
    observe("get", status, t0);
    (status, [("x-request-id", rid)], Json(body)).into_response()
}

#[derive(Deserialize)]
struct Keys {
    keys: Vec<Value>,
}

async fn post_features(
    State(s): State<ServeState>,
    Path(view): Path<String>,
    Query(q): Query<ReadQuery>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let t0 = Instant::now();
    let rid = request_id(&headers);
    let mode = match read_mode(&q) {
        Ok(m) => m,
        Err((status, body)) => {
            observe("batch", status, t0);
            return (status, Json(body)).into_response();
        }
    };
    // Any content type: `curl -d` sends form encoding by default.
    let Ok(req) = serde_json::from_slice::<Keys>(&body) else {
        observe("batch", StatusCode::BAD_REQUEST, t0);
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "expected a JSON body {\"keys\": [...]}"})),
        )
            .into_response();
    };
    let mut out = Vec::with_capacity(req.keys.len());
    for k in req.keys {
        let key = match &k {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts
                .iter()
                .map(|p| {
                    p.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| p.to_string())
                })
                .collect::<Vec<_>>()
                .join("|"),
            other => other.to_string(),
        };
        let read = lookup(&s, &view, &key, mode);
        if let Ok(v) = &read {
            log_read(&s, &view, &key, mode, v.as_ref(), &rid);
        }
        match read {
            Ok(Some(mut v)) => {
                if let Some(o) = v.as_object_mut() {
                    o.insert("found".into(), Value::Bool(true));
                }
                out.push(v)
            }
            Ok(None) => out.push(json!({"key": key, "found": false})),
            Err((status, body)) => {
                observe("batch", status, t0);
                return (status, Json(body)).into_response();
            }
        }
    }
    observe("batch", StatusCode::OK, t0);
    (
        StatusCode::OK,
        [("x-request-id", rid)],
        Json(json!({"results": out})),
    )
        .into_response()
}

/// A nearest-neighbour request.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NearestRequest {
    vector: Option<Vec<f32>>,
    /// Several query vectors, answered in one pass against one epoch.
    vectors: Option<Vec<Vec<f32>>>,
    key: Option<String>,
    /// The view whose index holds `key` (default: the queried view).
    key_view: Option<String>,
    k: Option<usize>,
    #[serde(default)]
    features: bool,
    #[serde(default)]
    exact: bool,
    search_k: Option<usize>,
    /// A SQL condition over the index's filter columns.
    filter: Option<String>,
}

/// Most neighbours one request may ask for.
const MAX_K: usize = 1000;
/// Most query vectors in one request.
const MAX_BATCH: usize = 1000;

fn nearest_response(s: &ServeState, view: &str, body: &[u8]) -> (StatusCode, Value) {
    let bad = |m: String| (StatusCode::BAD_REQUEST, json!({"error": m}));
    let internal = |e: crate::error::EngineError| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": e.to_string()}),
        )
    };
    let req: NearestRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return bad(format!(
                "expected {{\"vector\": [...]}}, {{\"vectors\": [[...], ...]}} or {{\"key\": \"...\"}} with optional \"k\", \"filter\", \"features\", \"exact\", \"key_view\", \"search_k\": {e}"
            ));
        }
    };
    let Some(idx) = s.live.indexes.get(view) else {
        let indexed: Vec<&String> = s.live.indexes.keys().collect();
        let status = if s.live.views.contains_key(view) {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::NOT_FOUND
        };
        return (
            status,
            json!({"error": format!("view `{view}` has no vector index"), "indexed_views": indexed}),
        );
    };
    let k = req.k.unwrap_or(10);
    if k == 0 || k > MAX_K {
        return bad(format!("k must be between 1 and {MAX_K}"));
    }
    let filter = match req.filter.as_deref().map(|f| idx.filter(f)) {
        None => None,
        Some(Ok(f)) => Some(f),
        Some(Err(crate::error::EngineError::BadRequest(m))) => return bad(m),
        Some(Err(e)) => return internal(e),
    };
    // The queries: vectors, the key's own vector in this index, or a key's
    // vector in another view's index (e.g. a user's taste among items).
    let own: Option<Vec<f32>>;
    let batch = req.vectors.is_some();
    let queries: Vec<crate::vector::Query<'_>> = match (
        &req.vector,
        &req.vectors,
        &req.key,
        &req.key_view,
    ) {
        (Some(v), None, None, None) => vec![crate::vector::Query::Vector(v)],
        (None, Some(vs), None, None) => {
            if vs.is_empty() || vs.len() > MAX_BATCH {
                return bad(format!(
                    "\"vectors\" must hold between 1 and {MAX_BATCH} vectors"
                ));
            }
            vs.iter().map(|v| crate::vector::Query::Vector(v)).collect()
        }
        (None, None, Some(k), None) => vec![crate::vector::Query::Key(k)],
        (None, None, Some(k), Some(other)) => {
            let Some(oi) = s.live.indexes.get(other) else {
                return bad(format!("key_view `{other}` has no vector index"));
            };
            own = match oi.vector(k) {
                Ok(v) => v,
                Err(e) => return internal(e),
            };
            match &own {
                Some(v) => vec![crate::vector::Query::Vector(v)],
                None => {
                    return (
                        StatusCode::NOT_FOUND,
                        json!({"error": format!("key `{k}` has no current vector in view `{other}`"), "key": k}),
                    );
                }
            }
        }
        _ => {
            return bad(
                    "give one of \"vector\", \"vectors\" or \"key\" (with \"key_view\" only alongside \"key\")"
                        .into(),
                );
        }
    };
    let search = crate::vector::Search {
        queries,
        k,
        search_k: req.search_k,
        exact: req.exact,
        filter: filter.as_ref(),
        threads: 0,
    };
    let found = match idx.search(&search) {
        Ok(f) => f,
        Err(crate::error::EngineError::BadRequest(m)) => return bad(m),
        Err(e) => return internal(e),
    };
    let mut results = Vec::with_capacity(found.results.len());
    for r in found.results {
        let Some(r) = r else {
            let key = req.key.unwrap_or_default();
            return (
                StatusCode::NOT_FOUND,
                json!({"error": format!("key `{key}` has no current vector in view `{view}`"), "key": key}),
            );
        };
        let mut out = Vec::with_capacity(r.len());
        for n in r {
            let mut o = json!({"key": n.key, "distance": n.distance});
            if req.features {
                let f = match lookup(s, view, &n.key, None) {
                    Ok(Some(row)) => row.get("features").cloned().unwrap_or(Value::Null),
                    Ok(None) => Value::Null,
                    Err((status, body)) => return (status, body),
                };
                if let Some(m) = o.as_object_mut() {
                    m.insert("features".into(), f);
                }
            }
            out.push(o);
        }
        results.push(Value::Array(out));
    }
    let mut body = json!({
        "view": view,
        "distance": idx.plan().distance.name(),
        "exact": found.exact,
        "epoch": found.epoch,
    });
    if let Some(m) = body.as_object_mut() {
        if let Some(n) = found.selected {
            m.insert("filtered".into(), json!(n));
        }
        if batch {
            let rs: Vec<Value> = results
                .into_iter()
                .map(|r| json!({"neighbours": r}))
                .collect();
            m.insert("results".into(), Value::Array(rs));
        } else {
            m.insert(
                "neighbours".into(),
                results
                    .into_iter()
                    .next()
                    .unwrap_or(Value::Array(Vec::new())),
            );
        }
    }
    (StatusCode::OK, body)
}

async fn post_nearest(
    State(s): State<ServeState>,
    Path(view): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let t0 = Instant::now();
    let st = s.clone();
    let (status, body) =
        match tokio::task::spawn_blocking(move || nearest_response(&st, &view, &body)).await {
            Ok(r) => r,
            Err(e) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": format!("query task failed: {e}")}),
            ),
        };
    observe("nearest", status, t0);
    (status, Json(body)).into_response()
}

async fn metrics_text(State(s): State<ServeState>) -> Response {
    let Some(h) = &s.metrics else {
        return (StatusCode::NOT_FOUND, "metrics recorder not installed").into_response();
    };
    // Freshness gauges are computed now, so they move while a stream stalls.
    s.live.record_freshness();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        h.render(),
    )
        .into_response()
}

async fn readyz(State(s): State<ServeState>) -> Response {
    match s.live.not_ready() {
        None => (StatusCode::OK, "ready").into_response(),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
    }
}
