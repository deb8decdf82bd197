//! The serving API: features by key over HTTP, plus `/metrics`, `/healthz`
//! and `/readyz`. Reads go straight to RocksDB, on the blocking pool and
//! never on the async threads; the clock of the valid-until rule is the
//! view's committed watermark.
//!
//! Every request passes, in order: the host check ([`HostPolicy`]), the
//! bearer token, its deadline (`request_timeout`), and a slot of its
//! route's [`Gate`]; what it asks for is bounded by [`ServeLimits`].
//! Connections are accepted by [`serve`] (header and idle timeouts, a cap
//! on open connections). Errors of this machine (paths, store messages)
//! go to the log with the request id, never into an answer.

mod limits;
mod listen;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, Extension, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::{Value, json};

pub use limits::{
    Busy, DEFAULT_CONCURRENCY, Gate, Gates, HostPolicy, RouteConcurrency, ServeLimits,
    token_matches,
};
pub use listen::{ConnLimits, default_max_connections, raise_fd_limit};

use crate::error::EngineError;
use crate::live::Live;
use crate::reader::Features;
use crate::tiles::ReadMode;

/// What the server needs.
#[derive(Clone)]
pub struct ServeState {
    /// The running job's shared state.
    pub live: Arc<Live>,
    /// Renders `/metrics`.
    pub metrics: Option<PrometheusHandle>,
    /// Required bearer token for `/v1/…` (and `/metrics` with
    /// `auth_metrics`), if set.
    pub token: Option<Arc<str>>,
    /// What a client may ask.
    pub limits: Arc<ServeLimits>,
    /// The routes' slots.
    pub gates: Gates,
    /// The hosts answered.
    pub hosts: Arc<HostPolicy>,
}

impl ServeState {
    /// The state of a server of `live` bound to `addr`.
    pub fn new(
        live: Arc<Live>,
        metrics: Option<PrometheusHandle>,
        token: Option<Arc<str>>,
        limits: ServeLimits,
        addr: std::net::SocketAddr,
    ) -> Self {
        let hosts = HostPolicy::new(addr, limits.allowed_hosts.as_deref());
        ServeState {
            live,
            metrics,
            token,
            gates: Gates::new(&limits),
            limits: Arc::new(limits),
            hosts: Arc::new(hosts),
        }
    }
}

/// Serves `state` on `listener` (bound already) until the runtime stops:
/// the router of [`router`] behind the connection limits of its
/// [`ServeLimits`].
pub async fn serve(listener: tokio::net::TcpListener, state: ServeState) {
    let limits = ConnLimits {
        max_connections: state.limits.max_connections,
        header_timeout: state.limits.header_timeout,
        // A request in progress moves no byte: the idle timeout never
        // cuts one short of its deadline.
        idle_timeout: state
            .limits
            .idle_timeout
            .max(state.limits.request_timeout + std::time::Duration::from_secs(1)),
    };
    listen::serve(listener, router(state), limits).await
}

/// The router.
pub fn router(state: ServeState) -> Router {
    let api = Router::new()
        .route("/v1/features/{view}/{key}", get(get_feature))
        .route("/v1/features/{view}", post(post_features))
        .route("/v1/features/{view}/nearest", post(post_nearest));
    let metrics = Router::new().route("/metrics", get(metrics_text));
    let metrics = if state.limits.auth_metrics {
        metrics.route_layer(middleware::from_fn_with_state(state.clone(), auth))
    } else {
        metrics
    };
    Router::new()
        .merge(api.route_layer(middleware::from_fn_with_state(state.clone(), auth)))
        .merge(metrics)
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .layer(middleware::from_fn_with_state(state.clone(), deadline))
        .layer(middleware::from_fn_with_state(state.clone(), hosts))
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .with_state(state)
}

/// 503 with `Retry-After`: the server is at a limit, not broken.
fn busy(route: &str, why: Busy) -> Response {
    metrics::counter!("sluice_serving_rejected_total", "route" => route.to_string(), "reason" => match why {
        Busy::Saturated => "saturated",
        Busy::Deadline => "deadline",
    })
    .increment(1);
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, HeaderValue::from_static("1"))],
        Json(json!({"error": why.message(route)})),
    )
        .into_response()
}

/// Answers only the hosts of the [`HostPolicy`] (421 otherwise).
async fn hosts(State(s): State<ServeState>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .map(|h| h.to_str().unwrap_or("\u{fffd}"));
    if !s.hosts.allows(host) {
        metrics::counter!("sluice_serving_rejected_total", "route" => "any", "reason" => "host")
            .increment(1);
        return (
            StatusCode::MISDIRECTED_REQUEST,
            Json(json!({"error": "this server does not answer that Host (a server bound to a loopback address answers localhost, 127.0.0.1 and [::1]; see --allowed-hosts)"})),
        )
            .into_response();
    }
    next.run(req).await
}

/// The request's deadline: the whole of it (body read, wait for a slot,
/// work) within `request_timeout`, else 503.
async fn deadline(State(s): State<ServeState>, mut req: Request, next: Next) -> Response {
    let route = route_of(req.method(), req.uri().path());
    let at = Instant::now() + s.limits.request_timeout;
    req.extensions_mut().insert(Deadline(at));
    // A body announced past the limit is refused before it is read (a
    // body without a length is cut off at the limit as it is read).
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = announced
        && n > s.limits.max_body_bytes as u64
    {
        metrics::counter!("sluice_serving_rejected_total", "route" => route, "reason" => "body")
            .increment(1);
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            [(header::CONNECTION, HeaderValue::from_static("close"))],
            Json(json!({"error": format!("a body of {n} bytes; the server takes at most {} (--max-body-bytes)", s.limits.max_body_bytes)})),
        )
            .into_response();
    }
    match tokio::time::timeout(s.limits.request_timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => busy(route, Busy::Deadline),
    }
}

fn route_of(method: &axum::http::Method, path: &str) -> &'static str {
    if path.ends_with("/nearest") {
        "nearest"
    } else if path.starts_with("/v1/") && method == axum::http::Method::POST {
        "batch"
    } else if path.starts_with("/v1/") {
        "get"
    } else {
        "other"
    }
}

/// When a request must be answered by, from its arrival (set by the
/// `deadline` layer, read by the handlers and their blocking work).
#[derive(Debug, Clone, Copy)]
struct Deadline(Instant);

async fn auth(
    State(s): State<ServeState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    if let Some(t) = &s.token {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .map(<[u8]>::trim_ascii)
            .unwrap_or_default();
        if !token_matches(presented, t.as_bytes()) {
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "missing or wrong bearer token"})),
            )
                .into_response();
        }
    }
    next.run(req).await
}

/// An error as its answer: a client's mistake says what it was; anything
/// else is logged with the request id and answered without its message,
/// which may name this machine's paths.
fn error_answer(e: EngineError, rid: &str) -> (StatusCode, Value) {
    match e {
        EngineError::BadRequest(m) => (StatusCode::BAD_REQUEST, json!({"error": m})),
        EngineError::Overloaded(m) => (StatusCode::SERVICE_UNAVAILABLE, json!({"error": m})),
        e => {
            tracing::error!(request_id = %rid, error = %e, "request failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": format!("{} error; the server's log has it under request id {rid}", match e.domain() {
                    crate::error::ErrorDomain::Internal => "internal",
                    _ => "storage",
                }), "request_id": rid}),
            )
        }
    }
}

/// Runs `work` on the blocking pool in a slot of `gate`, within `deadline`.
async fn blocking<T: Send + 'static>(
    gate: &Gate,
    route: &'static str,
    deadline: Instant,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Response> {
    let slot = gate.enter(deadline).await.map_err(|b| busy(route, b))?;
    let task = tokio::task::spawn_blocking(move || {
        // The slot is held until the work ends, even if the client left.
        let _slot = slot;
        work()
    });
    match task.await {
        Ok(v) => Ok(v),
        Err(e) => {
            tracing::error!(route, error = %e, "a request's work failed");
            Err((
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"error": "internal error: the request's work failed; see the server's log"})),
            )
                .into_response())
        }
    }
}

fn observe(route: &'static str, status: StatusCode, t0: Instant) {
    metrics::counter!("sluice_serving_requests_total", "route" => route, "status" => status.as_u16().to_string()).increment(1);
    metrics::histogram!("sluice_serving_latency_seconds", "route" => route)
        .record(t0.elapsed().as_secs_f64());
}

/// Reads `key` of `view` (on a blocking thread).
fn lookup(
    s: &ServeState,
    view: &str,
    key: &str,
    mode: Option<ReadMode>,
    rid: &str,
) -> Result<Option<Value>, (StatusCode, Value)> {
    let view = s.live.resolve(view);
    if s.live.meta(&view).is_none() {
        return Err((
            StatusCode::NOT_FOUND,
            json!({"error": format!("no feature view `{view}`"), "views": s.live.view_names()}),
        ));
    }
    s.live
        .read(&view, key, mode)
        .map(|(value, age)| {
            if let Some(ms) = age {
                metrics::histogram!("sluice_served_value_age_seconds", "view" => view.clone())
                    .record(ms as f64 / 1000.0);
            }
            value
        })
        .map_err(|e| error_answer(e, rid))
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
    Extension(Deadline(deadline)): Extension<Deadline>,
    Path((view, key)): Path<(String, String)>,
    Query(q): Query<ReadQuery>,
    headers: HeaderMap,
) -> Response {
    let t0 = Instant::now();
    let rid = request_id(&headers);
    let mode = match read_mode(&q) {
        Ok(m) => m,
        Err((status, body)) => {
            observe("get", status, t0);
            return (status, Json(body)).into_response();
        }
    };
    let st = s.clone();
    let r = rid.clone();
    let read = blocking(&s.gates.get, "get", deadline, move || {
        let read = lookup(&st, &view, &key, mode, &r);
        if let Ok(v) = &read {
            log_read(&st, &view, &key, mode, v.as_ref(), &r);
        }
        (key, read)
    })
    .await;
    let (key, read) = match read {
        Ok(r) => r,
        Err(resp) => {
            observe("get", resp.status(), t0);
            return resp;
        }
    };
    let (status, body) = match read {
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

/// A key of a batch body: its text, or an array of column values (strings,
/// numbers or nulls) turned into it.
fn batch_key(k: &Value) -> Result<String, String> {
    match k {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let cols = parts
                .iter()
                .map(|p| match p {
                    Value::String(s) => Ok(Some(s.clone())),
                    Value::Null => Ok(None),
                    Value::Number(n) => Ok(Some(n.to_string())),
                    other => Err(format!(
                        "a key column is a string, a number or null, not `{other}`"
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(crate::keys::key_text(&cols))
        }
        Value::Number(n) => Ok(n.to_string()),
        other => Err(format!(
            "a key is a string or an array of column values, not `{other}`"
        )),
    }
}

async fn post_features(
    State(s): State<ServeState>,
    Extension(Deadline(deadline)): Extension<Deadline>,
    Path(view): Path<String>,
    Query(q): Query<ReadQuery>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let t0 = Instant::now();
    let rid = request_id(&headers);
    let refuse = |status: StatusCode, body: Value| {
        observe("batch", status, t0);
        (status, Json(body)).into_response()
    };
    let mode = match read_mode(&q) {
        Ok(m) => m,
        Err((status, body)) => return refuse(status, body),
    };
    // Any content type: `curl -d` sends form encoding by default.
    let Ok(req) = serde_json::from_slice::<Keys>(&body) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            json!({"error": "expected a JSON body {\"keys\": [...]}"}),
        );
    };
    drop(body);
    if req.keys.len() > s.limits.max_batch_keys {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            json!({"error": format!("{} keys in one request; the server takes at most {} (--max-batch-keys)", req.keys.len(), s.limits.max_batch_keys)}),
        );
    }
    let keys = match req
        .keys
        .iter()
        .map(batch_key)
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(k) => k,
        Err(m) => return refuse(StatusCode::BAD_REQUEST, json!({"error": m})),
    };
    let st = s.clone();
    let r = rid.clone();
    let done = blocking(&s.gates.batch, "batch", deadline, move || {
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            if Instant::now() >= deadline {
                return Err(None);
            }
            let read = lookup(&st, &view, &key, mode, &r);
            if let Ok(v) = &read {
                log_read(&st, &view, &key, mode, v.as_ref(), &r);
            }
            match read {
                Ok(Some(mut v)) => {
                    if let Some(o) = v.as_object_mut() {
                        o.insert("found".into(), Value::Bool(true));
                    }
                    out.push(v)
                }
                Ok(None) => out.push(json!({"key": key, "found": false})),
                Err(e) => return Err(Some(Box::new(e))),
            }
        }
        Ok(out)
    })
    .await;
    match done {
        Ok(Ok(out)) => {
            observe("batch", StatusCode::OK, t0);
            (
                StatusCode::OK,
                [("x-request-id", rid)],
                Json(json!({"results": out})),
            )
                .into_response()
        }
        // The deadline passed between keys, or a key's read failed.
        Ok(Err(None)) => {
            let resp = busy("batch", Busy::Deadline);
            observe("batch", resp.status(), t0);
            resp
        }
        Ok(Err(Some(e))) => {
            let (status, body) = *e;
            observe("batch", status, t0);
            (status, Json(body)).into_response()
        }
        Err(resp) => {
            observe("batch", resp.status(), t0);
            resp
        }
    }
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

fn nearest_response(
    s: &ServeState,
    view: &str,
    body: &[u8],
    rid: &str,
    deadline: Instant,
) -> (StatusCode, Value) {
    let bad = |m: String| (StatusCode::BAD_REQUEST, json!({"error": m}));
    let internal = |e: EngineError| error_answer(e, rid);
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
    let queries_asked = req.vectors.as_ref().map_or(1, Vec::len);
    if k.saturating_mul(queries_asked) > s.limits.max_nearest_work {
        return bad(format!(
            "k × query vectors is {}; the server takes at most {} (--max-nearest-work)",
            k.saturating_mul(queries_asked),
            s.limits.max_nearest_work
        ));
    }
    let filter = match req
        .filter
        .as_deref()
        .map(|f| idx.filter_limited(f, s.limits.filter))
    {
        None => None,
        Some(Ok(f)) => Some(f),
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
        deadline: Some(deadline),
    };
    let found = match idx.search(&search) {
        Ok(f) => f,
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
            if req.features && Instant::now() >= deadline {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"error": Busy::Deadline.message("nearest")}),
                );
            }
            if req.features {
                let f = match lookup(s, view, &n.key, None, rid) {
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
    Extension(Deadline(deadline)): Extension<Deadline>,
    Path(view): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let t0 = Instant::now();
    let rid = request_id(&headers);
    let st = s.clone();
    let r = rid.clone();
    let done = blocking(&s.gates.nearest, "nearest", deadline, move || {
        nearest_response(&st, &view, &body, &r, deadline)
    })
    .await;
    match done {
        Ok((status, body)) => {
            observe("nearest", status, t0);
            if status == StatusCode::SERVICE_UNAVAILABLE {
                return (
                    status,
                    [(header::RETRY_AFTER, HeaderValue::from_static("1"))],
                    Json(body),
                )
                    .into_response();
            }
            (status, [("x-request-id", rid)], Json(body)).into_response()
        }
        Err(resp) => {
            observe("nearest", resp.status(), t0);
            resp
        }
    }
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
