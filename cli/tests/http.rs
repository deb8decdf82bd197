//! The serving API over real loopback sockets, against a running `sluice run --serve`.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, http, sluice};
use serde_json::{Value, json};

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path, extra: &[&str]) -> Server {
    let mut args = vec![
        "run".to_string(),
        dir.join("p.sql").display().to_string(),
        "--state-dir".into(),
        dir.join("state").display().to_string(),
        "--serve".into(),
        "127.0.0.1:0".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut child = Command::new(bin())
        .args(&args)
        .env("SLUICE_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut addr_sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !addr_sent && let Some(a) = line.strip_prefix("serving on http://") {
                let _ = tx.send(Some(a.trim().to_string()));
                addr_sent = true;
            }
            if line.contains("still serving") {
                let _ = tx.send(None);
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("server address")
        .expect("address first");
    // Wait until the (bounded) input is fully processed.
    assert!(
        rx.recv_timeout(Duration::from_secs(120)).is_ok(),
        "the run finished its input"
    );
    Server { child, addr }
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tmp");
    let events = dir.path().join("events.jsonl");
    assert!(
        sluice(&[
            "gen",
            "--events",
            "20000",
            "--keys",
            "100",
            "--minutes",
            "90",
            "--out",
            &events.display().to_string()
        ])
        .status
        .success()
    );
    let sql = format!(
        "{}\nCREATE FEATURE VIEW by_item_user KEY user_id, item_id AS SELECT user_id, item_id, COUNT(*) AS n FROM clicks GROUP BY user_id, item_id;",
        include_str!("../../examples/quickstart/pipeline.sql")
    );
    std::fs::write(dir.path().join("p.sql"), sql).expect("pipeline");
    dir
}

#[test]
fn serving_api_over_loopback() {
    let dir = setup();
    let srv = start(dir.path(), &[]);
    let a = srv.addr.as_str();

    assert_eq!(http(a, "GET", "/healthz", None, &[]).0, 200);
    assert_eq!(http(a, "GET", "/readyz", None, &[]), (200, "ready".into()));

    let (st, body) = http(a, "GET", "/v1/features/user_activity/u00042", None, &[]);
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["key"], "u00042");
    // A HOP view answers its fresh value at the committed watermark.
    let as_of = v["as_of"].as_str().expect("as_of").to_string();
    assert!(as_of.starts_with("2024-01-01T"), "{v}");
    assert!(v["window_start"].is_string(), "{v}");
    assert!(v.get("window_end").is_none(), "{v}");
    let f = &v["features"];
    assert!(f["clicks_1h"].as_i64().is_some_and(|n| n > 0), "{v}");
    for k in ["spend_1h", "avg_price_1h", "distinct_items_1h"] {
        assert!(f.get(k).is_some(), "feature {k} in {v}");
    }
    // The CLI reads the same value from the same store.
    let cli: Value = serde_json::from_slice(
        &sluice(&[
            "get",
            "user_activity",
            "u00042",
            "--state-dir",
            &dir.path().join("state").display().to_string(),
        ])
        .stdout,
    )
    .expect("get json");
    assert_eq!(cli, v);

    // The closed window on request: bounds one slide apart, at the same clock.
    let (st, body) = http(
        a,
        "GET",
        "/v1/features/user_activity/u00042?window=closed",
        None,
        &[],
    );
    assert_eq!(st, 200, "{body}");
    let c: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(c["as_of"], as_of.as_str());
    assert_eq!(c["window_start"], v["window_start"]);
    assert!(
        c["window_end"]
            .as_str()
            .is_some_and(|e| e <= as_of.as_str()),
        "{c}"
    );
    assert!(
        c["valid_until"]
            .as_str()
            .is_some_and(|e| e > as_of.as_str()),
        "{c}"
    );
    assert!(
        c["features"]["clicks_1h"].as_i64() <= f["clicks_1h"].as_i64(),
        "the closed window holds no more than the fresh one: {c} {v}"
    );
    for bad in ["current", "yesterday"] {
        let (st, body) = http(
            a,
            "GET",
            &format!("/v1/features/user_activity/u00042?window={bad}"),
            None,
            &[],
        );
        assert_eq!(st, 400, "window={bad}: {body}");
    }

    let (st, body) = http(a, "GET", "/v1/features/user_activity/nobody", None, &[]);
    assert_eq!(st, 404);
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("json")["error"],
        "key not found"
    );
    let (st, body) = http(a, "GET", "/v1/features/no_such_view/u1", None, &[]);
    assert_eq!(st, 404);
    assert!(body.contains("user_activity"), "lists the views: {body}");

    let (st, body) = http(
        a,
        "POST",
        "/v1/features/user_activity",
        Some(r#"{"keys": ["u00001", "nobody", "u00002"]}"#),
        &[],
    );
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    let r = v["results"].as_array().expect("results");
    assert_eq!(r.len(), 3);
    assert_eq!(
        (r[0]["key"].clone(), r[0]["found"].clone()),
        (json!("u00001"), json!(true))
    );
    assert_eq!(r[1], json!({"key": "nobody", "found": false}));
    assert_eq!(r[2]["key"], "u00002");

    // Multi-column keys: as an array or joined by `|`.
    let (st, body) = http(
        a,
        "POST",
        "/v1/features/by_item_user",
        Some(r#"{"keys": [["u00001", "i1"], "u00001|i1"]}"#),
        &[],
    );
    assert_eq!(st, 200);
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["results"][0]["key"], "u00001|i1");
    assert_eq!(v["results"][0], v["results"][1]);

    assert_eq!(
        http(
            a,
            "POST",
            "/v1/features/user_activity",
            Some("{not json"),
            &[]
        )
        .0,
        400
    );

    let (st, metrics) = http(a, "GET", "/metrics", None, &[]);
    assert_eq!(st, 200);
    for m in [
        "sluice_events_in_total{source=\"clicks\"} 20000",
        "sluice_watermark_ms{source=\"clicks\"}",
        "sluice_rows_emitted_total{view=\"user_activity\"}",
        "sluice_online_writes_total{view=\"user_activity\"}",
        "sluice_lake_rows_total{view=\"user_activity\"}",
        "sluice_checkpoint_duration_seconds_bucket",
        "sluice_serving_requests_total{route=\"get\",status=\"200\"}",
        "sluice_serving_latency_seconds_bucket{route=\"get\"",
    ] {
        assert!(metrics.contains(m), "metrics lack {m}:\n{metrics}");
    }
}

#[test]
fn bearer_token_guards_the_feature_api() {
    let dir = setup();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").expect("token");
    let srv = start(
        dir.path(),
        &["--auth-token-file", &token.display().to_string()],
    );
    let a = srv.addr.as_str();
    assert_eq!(
        http(a, "GET", "/v1/features/user_activity/u00042", None, &[]).0,
        401
    );
    assert_eq!(
        http(
            a,
            "GET",
            "/v1/features/user_activity/u00042",
            None,
            &[("Authorization", "Bearer nope")]
        )
        .0,
        401
    );
    assert_eq!(
        http(
            a,
            "GET",
            "/v1/features/user_activity/u00042",
            None,
            &[("Authorization", "Bearer s3cret")]
        )
        .0,
        200
    );
    // Probes stay open for orchestrators.
    assert_eq!(http(a, "GET", "/healthz", None, &[]).0, 200);
    let t0 = Instant::now();
    assert_eq!(http(a, "GET", "/readyz", None, &[]).0, 200);
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[test]
fn bad_input_is_counted_in_metrics() {
    let dir = setup();
    let mut text = std::fs::read_to_string(dir.path().join("events.jsonl")).expect("events");
    text.push_str("{broken\n{\"user_id\": 5, \"price\": 1, \"ts\": \"2024-01-01T00:00:00Z\"}\n{\"price\": 1, \"ts\": \"2024-01-01T00:00:00Z\"}\n");
    std::fs::write(dir.path().join("events.jsonl"), text).expect("events");
    let srv = start(dir.path(), &[]);
    let (_, metrics) = http(&srv.addr, "GET", "/metrics", None, &[]);
    for m in [
        "sluice_decode_errors_total{source=\"clicks\",kind=\"malformed_json\"} 1",
        "sluice_decode_errors_total{source=\"clicks\",kind=\"wrong_type\"} 1",
        "sluice_decode_errors_total{source=\"clicks\",kind=\"missing_field\"} 1",
        "sluice_dead_letters_total{source=\"clicks\",kind=\"missing_field\"} 1",
    ] {
        assert!(metrics.contains(m), "metrics lack {m}:\n{metrics}");
    }
    let dl = common::dead_letters(&dir.path().join("state"));
    assert_eq!(dl.len(), 3);
    assert!(dl.iter().all(|d| d["source"] == "clicks" && d["reason"].as_str().is_some_and(|r| !r.is_empty())));
    assert_eq!(dl[0]["position"], "events.jsonl:20001");
}

/// `name{view="view"}` (or `name{view="view",le="le"}`) from a metrics text.
fn served_age(metrics: &str, suffix: &str, view: &str, le: Option<&str>) -> Option<f64> {
    let labels = match le {
        Some(le) => format!("{{view=\"{view}\",le=\"{le}\"}} "),
        None => format!("{{view=\"{view}\"}} "),
    };
    let prefix = format!("sluice_served_value_age_seconds{suffix}{labels}");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse::<f64>().ok())
}

/// Each served value's age is its clock minus the newest event it holds:
/// the newest in the key's window for a windowed view, the row's event time
/// for a lifetime view. Reads that find nothing record nothing.
#[test]
fn served_values_report_their_age() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(
        dir.path().join("p.sql"),
        "CREATE SOURCE clicks (user_id TEXT NOT NULL, price DOUBLE, ts TIMESTAMP NOT NULL,
    WATERMARK FOR ts AS ts)
  WITH (connector = 'file', path = 'events.jsonl');
CREATE FEATURE VIEW w KEY user_id AS
    SELECT user_id, COUNT(*) AS n FROM clicks
    GROUP BY user_id, HOP(ts, INTERVAL '1' MINUTE, INTERVAL '10' MINUTE);
CREATE FEATURE VIEW life KEY user_id AS
    SELECT user_id, SUM(price) AS spend FROM clicks GROUP BY user_id;",
    )
    .expect("sql");
    // The watermark ends at 10:01:00, so z's event is not yet in w's tiles,
    // and c's click left w's window long ago.
    let events = [
        ("c", "09:40:00"),
        ("a", "10:00:00"),
        ("b", "10:00:10"),
        ("a", "10:00:30"),
        ("z", "10:01:00"),
    ];
    let lines: String = events
        .iter()
        .map(|(k, t)| {
            format!("{{\"user_id\": \"{k}\", \"price\": 1.0, \"ts\": \"2024-01-01T{t}Z\"}}\n")
        })
        .collect();
    std::fs::write(dir.path().join("events.jsonl"), lines).expect("events");
    let srv = start(dir.path(), &[]);
    let (_, before) = http(&srv.addr, "GET", "/metrics", None, &[]);
    assert_eq!(
        served_age(&before, "_count", "w", None),
        None,
        "no reads yet"
    );
    for (k, want) in [
        ("a", 200),
        ("b", 200),
        ("c", 404),
        ("z", 404),
        ("never", 404),
    ] {
        let (status, body) = http(&srv.addr, "GET", &format!("/v1/features/w/{k}"), None, &[]);
        assert_eq!(status, want, "w/{k}: {body}");
    }
    for (k, want) in [
        ("a", 200),
        ("b", 200),
        ("c", 200),
        ("z", 200),
        ("never", 404),
    ] {
        let (status, body) = http(
            &srv.addr,
            "GET",
            &format!("/v1/features/life/{k}"),
            None,
            &[],
        );
        assert_eq!(status, want, "life/{k}: {body}");
    }
    let (_, m) = http(&srv.addr, "GET", "/metrics", None, &[]);
    // w: a is 30 s old (its click at 10:00:30), b 50 s.
    assert_eq!(served_age(&m, "_count", "w", None), Some(2.0), "{m}");
    assert_eq!(served_age(&m, "_sum", "w", None), Some(80.0), "{m}");
    assert_eq!(served_age(&m, "_bucket", "w", Some("30")), Some(1.0), "{m}");
    assert_eq!(served_age(&m, "_bucket", "w", Some("60")), Some(2.0), "{m}");
    // life: a 30 s, b 50 s, c 21 minutes, z 0 (its event is at the watermark).
    assert_eq!(served_age(&m, "_count", "life", None), Some(4.0), "{m}");
    assert_eq!(served_age(&m, "_sum", "life", None), Some(1340.0), "{m}");
    assert_eq!(
        served_age(&m, "_bucket", "life", Some("1")),
        Some(1.0),
        "{m}"
    );
    // A batch read records each key it finds.
    let (status, _) = http(
        &srv.addr,
        "POST",
        "/v1/features/w",
        Some(r#"{"keys": ["a", "never"]}"#),
        &[],
    );
    assert_eq!(status, 200);
    let (_, m) = http(&srv.addr, "GET", "/metrics", None, &[]);
    assert_eq!(served_age(&m, "_count", "w", None), Some(3.0), "{m}");
    assert_eq!(served_age(&m, "_sum", "w", None), Some(110.0), "{m}");
}
