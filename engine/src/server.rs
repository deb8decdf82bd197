//! The serving API: features by key over HTTP, plus `/metrics`, `/healthz`
//! and `/readyz`. Reads go straight to RocksDB; the clock of the valid-until
//! rule is the view's committed watermark.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::job::Live;
use crate::online::read_feature;

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

fn lookup(s: &ServeState, view: &str, key: &str) -> Result<Option<Value>, (StatusCode, Value)> {
    let Some(meta) = s.live.views.get(view) else {
        let known: Vec<&String> = s.live.views.keys().collect();
        return Err((
            StatusCode::NOT_FOUND,
            json!({"error": format!("no feature view `{view}`"), "views": known}),
        ));
    };
    read_feature(&s.live.store, meta, key, s.live.watermark(view)).map_err(|e| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": e.to_string()}),
        )
    })
}

async fn get_feature(
    State(s): State<ServeState>,
    Path((view, key)): Path<(String, String)>,
) -> Response {
    let t0 = Instant::now();
    let (status, body) = match lookup(&s, &view, &key) {
        Ok(Some(v)) => (StatusCode::OK, v),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            json!({"error": "key not found", "key": key}),
        ),
        Err(e) => e,
    };
    observe("get", status, t0);
    (status, Json(body)).into_response()
}

#[derive(Deserialize)]
struct Keys {
    keys: Vec<Value>,
}

async fn post_features(
    State(s): State<ServeState>,
    Path(view): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let t0 = Instant::now();
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
        match lookup(&s, &view, &key) {
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
    (StatusCode::OK, Json(json!({"results": out}))).into_response()
}

async fn metrics_text(State(s): State<ServeState>) -> Response {
    match &s.metrics {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics recorder not installed").into_response(),
    }
}

async fn readyz(State(s): State<ServeState>) -> Response {
    match s.live.not_ready() {
        None => (StatusCode::OK, "ready").into_response(),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
    }
}
