//! Vector features end to end on the real binary: `FLOAT[n]` sources,
//! `VECTOR_AVG` / `LAST_VALUE` views, the arroy index kept equal to the
//! online store through updates, expiries and `kill -9`, bad vectors
//! dead-lettered, nearest neighbours over the CLI and HTTP.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, dead_letters, sluice};
use sluice_engine::online::{read_row, read_view_meta, watermark_key};
use sluice_engine::store::Store;

fn example() -> PathBuf {
    common::repo_root().join("examples/recsys/pipeline.sql")
}

/// Generates the recsys data into `dir`, with a malformed embedding every
/// `bad_every` clicks and, first in the file, early clicks of ten users who
/// never click again (their taste expires when the hour passes).
fn make_data(dir: &Path, clicks: u64, bad_every: u64) {
    let out = sluice(&[
        "gen-recsys",
        "--dir",
        &dir.display().to_string(),
        "--clicks",
        &clicks.to_string(),
        "--bad-every",
        &bad_every.to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = dir.join("clicks.jsonl");
    let text = std::fs::read_to_string(&path).expect("clicks");
    let first: serde_json::Value =
        serde_json::from_str(text.lines().next().expect("a click")).expect("json");
    let mut early = String::new();
    for g in 0..10 {
        let mut c = first.clone();
        c["user_id"] = format!("ghost{g}").into();
        early.push_str(&c.to_string());
        early.push('\n');
    }
    std::fs::write(&path, early + &text).expect("clicks");
    std::fs::copy(example(), dir.join("pipeline.sql")).expect("pipeline");
}

fn run_args(dir: &Path) -> Vec<String> {
    vec![
        "run".into(),
        dir.join("pipeline.sql").display().to_string(),
        "--state-dir".into(),
        dir.join("state").display().to_string(),
        "--batch-rows".into(),
        "500".into(),
        "--checkpoint-interval-ms".into(),
        "40".into(),
    ]
}

fn run_to_end(dir: &Path) {
    let out = Command::new(bin())
        .args(run_args(dir))
        .env("SLUICE_LOG", "warn")
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `sluice nearest VIEW --dump`: key → vector.
fn dump(state: &Path, view: &str) -> BTreeMap<String, Vec<f64>> {
    let out = sluice(&[
        "nearest",
        view,
        "--dump",
        "--state-dir",
        &state.display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json");
            let vec = v["vector"]
                .as_array()
                .expect("vector")
                .iter()
                .map(|x| x.as_f64().expect("number"))
                .collect();
            (v["key"].as_str().expect("key").to_string(), vec)
        })
        .collect()
}

/// The index holds exactly the keys whose online value (as `sluice get`
/// serves it now) has a non-NULL vector, with that vector. Returns
/// (indexed keys, online keys without a current vector).
fn assert_index_matches_online(state: &Path, view: &str, col: &str) -> (usize, usize) {
    let index = dump(state, view);
    let store = Store::open_read_only(state).expect("state");
    let meta = read_view_meta(&store, view)
        .expect("meta")
        .expect("view meta");
    let wm = store
        .meta_i64(&watermark_key(&meta.source))
        .expect("wm")
        .filter(|w| *w != sluice_engine::watermark::NO_WATERMARK);
    let mut with = 0;
    let mut without = 0;
    for (key, _) in store.online_scan(view).expect("scan") {
        let row = read_row(&store, &meta, &key, wm)
            .expect("read")
            .expect("row");
        match row["features"][col].as_array() {
            Some(v) => {
                with += 1;
                let got = index
                    .get(&key)
                    .unwrap_or_else(|| panic!("{view}: key {key} is online but not indexed"));
                assert_eq!(got.len(), v.len());
                for (a, b) in got.iter().zip(v) {
                    let b = b.as_f64().expect("number");
                    assert!(
                        (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                        "{view}/{key}: {a} vs {b}"
                    );
                }
            }
            None => {
                without += 1;
                assert!(
                    !index.contains_key(&key),
                    "{view}: key {key} has no current vector but is indexed"
                );
            }
        }
    }
    assert_eq!(
        index.len(),
        with,
        "{view}: indexed keys that are not online"
    );
    (with, without)
}

fn nearest(state: &Path, args: &[&str]) -> Vec<serde_json::Value> {
    let mut a = vec!["nearest"];
    a.extend_from_slice(args);
    let s = state.display().to_string();
    a.extend(["--state-dir", s.as_str()]);
    let out = sluice(&a);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect()
}

fn favourites(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(dir.join("users.jsonl"))
        .expect("users")
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json");
            (
                v["user_id"].as_str().expect("id").to_string(),
                v["favourite"].as_str().expect("cat").to_string(),
            )
        })
        .collect()
}

#[test]
fn recsys_example_index_equals_online_and_finds_the_users_category() {
    let root = tempfile::tempdir().expect("tmp");
    let dir = root.path();
    make_data(dir, 20_000, 997);
    run_to_end(dir);
    let state = dir.join("state");

    // Malformed embeddings (one element short) are dead letters, not a crash.
    let dead = dead_letters(&state);
    let bad: Vec<_> = dead
        .iter()
        .filter(|d| {
            d["record"]
                .as_str()
                .is_some_and(|r| r.contains("item_embedding"))
        })
        .collect();
    assert_eq!(bad.len(), 20, "{dead:?}");
    assert!(bad.iter().all(|d| d["kind"] == "wrong_type"), "{bad:?}");

    let (items, _) = assert_index_matches_online(&state, "item_vectors", "embedding");
    assert_eq!(items, 2000);
    let (users, expired) = assert_index_matches_online(&state, "user_taste", "taste");
    assert!(users >= 250, "{users} users with a taste vector");
    assert!(expired >= 10, "the ghost users' taste expired ({expired})");
    for g in 0..10 {
        let out = sluice(&[
            "nearest",
            "user_taste",
            "--key",
            &format!("ghost{g}"),
            "--state-dir",
            &state.display().to_string(),
        ]);
        assert!(!out.status.success(), "ghost{g} must have left the index");
    }

    // A user's taste lands among the items of their favourite category.
    let fav = favourites(dir);
    let mut good = 0;
    let mut total = 0;
    for u in ["user1", "user2", "user5", "user42", "user100"] {
        let found = nearest(
            &state,
            &[
                "item_vectors",
                "--key",
                u,
                "--key-view",
                "user_taste",
                "-k",
                "10",
                "--features",
            ],
        );
        assert_eq!(found.len(), 10);
        for n in &found {
            total += 1;
            if n["features"]["category"] == fav[u].as_str() {
                good += 1;
            }
        }
        // Exact search agrees on the nearest one.
        let exact = nearest(
            &state,
            &[
                "item_vectors",
                "--key",
                u,
                "--key-view",
                "user_taste",
                "-k",
                "1",
                "--exact",
            ],
        );
        assert_eq!(exact[0]["key"], found[0]["key"], "{u}");
    }
    assert!(
        good * 10 >= total * 9,
        "{good}/{total} neighbours in the favourite category"
    );

    // Neighbours of an item are items of its own category.
    let found = nearest(
        &state,
        &["item_vectors", "--key", "item3", "-k", "5", "--features"],
    );
    assert!(found.iter().all(|n| n["key"] != "item3"));
    assert!(
        found.iter().all(|n| n["features"]["category"] == "cat3"),
        "{found:?}"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn post(port: u16, path: &str, body: &str) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    // Not listening yet: status 0.
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, serde_json::Value::Null);
    };
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    let status: u16 = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("");
    // Chunked or not: the JSON object is between the first '{' and the last '}'.
    let json = match (body.find('{'), body.rfind('}')) {
        (Some(a), Some(b)) => &body[a..=b],
        _ => "null",
    };
    (
        status,
        serde_json::from_str(json).unwrap_or(serde_json::Value::Null),
    )
}

#[test]
fn nearest_over_http() {
    let root = tempfile::tempdir().expect("tmp");
    let dir = root.path();
    make_data(dir, 5_000, 0);
    // Ingest everything first, then serve the final state (a second run
    // over the same file has nothing new to read and keeps serving).
    run_to_end(dir);
    let port = free_port();
    let mut args = run_args(dir);
    args.extend(["--serve".into(), format!("127.0.0.1:{port}")]);
    let mut child = Command::new(bin())
        .args(&args)
        .env("SLUICE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let t0 = Instant::now();
    let mut ready = false;
    while t0.elapsed() < Duration::from_secs(60) {
        let (st, v) = post(
            port,
            "/v1/features/item_vectors/nearest",
            r#"{"key": "item0", "k": 3}"#,
        );
        if st == 200 && v["neighbours"].as_array().is_some_and(|n| n.len() == 3) {
            ready = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let result = std::panic::catch_unwind(|| {
        assert!(ready, "the server never answered a nearest query");
        let (st, v) = post(
            port,
            "/v1/features/item_vectors/nearest",
            r#"{"key": "user7", "key_view": "user_taste", "k": 10, "features": true}"#,
        );
        assert_eq!(st, 200, "{v}");
        let n = v["neighbours"].as_array().expect("neighbours");
        assert_eq!(n.len(), 10);
        assert!(n[0]["features"]["category"].is_string(), "{v}");
        assert!(
            n.windows(2)
                .all(|w| w[0]["distance"].as_f64() <= w[1]["distance"].as_f64())
        );
        let q: Vec<f32> = vec![0.1; 32];
        let body = serde_json::json!({"vector": q, "k": 4, "exact": true}).to_string();
        let (st, v) = post(port, "/v1/features/item_vectors/nearest", &body);
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["neighbours"].as_array().map(|n| n.len()), Some(4));
        // Similar items in one category: every neighbour is in it, and the
        // answer equals an exact scan of that category.
        let (_, me) = post(
            port,
            "/v1/features/item_vectors/nearest",
            r#"{"key": "item0", "k": 1, "features": true}"#,
        );
        let cat = me["neighbours"][0]["features"]["category"]
            .as_str()
            .expect("a category")
            .to_string();
        let filter = format!("category = '{cat}'");
        let body = serde_json::json!({"key": "item0", "k": 5, "filter": filter, "features": true})
            .to_string();
        let (st, v) = post(port, "/v1/features/item_vectors/nearest", &body);
        assert_eq!(st, 200, "{v}");
        let n = v["neighbours"].as_array().expect("neighbours");
        assert_eq!(n.len(), 5, "{v}");
        assert!(
            n.iter().all(|x| x["features"]["category"] == cat.as_str()),
            "{v}"
        );
        assert!(v["filtered"].as_u64().is_some_and(|f| f >= 6), "{v}");
        let body = serde_json::json!({"key": "item0", "k": 5, "filter": filter, "exact": true})
            .to_string();
        let (_, e) = post(port, "/v1/features/item_vectors/nearest", &body);
        let keys = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x["key"].as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        assert_eq!(keys(&v["neighbours"]), keys(&e["neighbours"]));
        // A batch: one answer per vector, each equal to its own query.
        let qs: Vec<Vec<f32>> = (0..3)
            .map(|i| (0..32).map(|j| ((i * 32 + j) % 7) as f32 - 3.0).collect())
            .collect();
        let body = serde_json::json!({"vectors": qs, "k": 4, "exact": true}).to_string();
        let (st, b) = post(port, "/v1/features/item_vectors/nearest", &body);
        assert_eq!(st, 200, "{b}");
        let results = b["results"].as_array().expect("results");
        assert_eq!(results.len(), 3);
        for (q, r) in qs.iter().zip(results) {
            let body = serde_json::json!({"vector": q, "k": 4, "exact": true}).to_string();
            let (_, one) = post(port, "/v1/features/item_vectors/nearest", &body);
            assert_eq!(keys(&r["neighbours"]), keys(&one["neighbours"]));
        }
        // Client errors.
        for bad in [
            r#"{"key": "item0", "filter": "colour = 'red'"}"#,
            r#"{"key": "item0", "filter": "category = 3"}"#,
            r#"{"vectors": []}"#,
            r#"{"vector": [1], "vectors": [[1]]}"#,
        ] {
            let (st, v) = post(port, "/v1/features/item_vectors/nearest", bad);
            assert_eq!(st, 400, "{bad}: {v}");
        }
        let (st, v) = post(
            port,
            "/v1/features/user_taste/nearest",
            r#"{"key": "user7", "filter": "clicks_1h > 3"}"#,
        );
        assert_eq!(st, 400, "{v}");
        assert!(
            v["error"]
                .as_str()
                .is_some_and(|e| e.contains("index_filter_columns")),
            "{v}"
        );
        let (st, v) = post(
            port,
            "/v1/features/item_vectors/nearest",
            r#"{"vector": [1, 2], "k": 3}"#,
        );
        assert_eq!(st, 400, "{v}");
        assert!(v["error"].as_str().expect("error").contains("32"), "{v}");
        let (st, _) = post(port, "/v1/features/item_vectors/nearest", r#"{"k": 3}"#);
        assert_eq!(st, 400);
        let (st, _) = post(
            port,
            "/v1/features/item_vectors/nearest",
            r#"{"key": "nope"}"#,
        );
        assert_eq!(st, 404);
        let (st, _) = post(port, "/v1/features/nope/nearest", r#"{"key": "x"}"#);
        assert_eq!(st, 404);
    });
    let _ = child.kill();
    let _ = child.wait();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

#[test]
fn index_equals_online_store_after_kill_9() {
    let root = tempfile::tempdir().expect("tmp");
    let data = root.path().join("data");
    std::fs::create_dir_all(&data).expect("dir");
    make_data(&data, 30_000, 1499);

    let setup = |name: &str| -> PathBuf {
        let d = root.path().join(name);
        std::fs::create_dir_all(&d).expect("dir");
        for f in ["pipeline.sql", "items.jsonl", "clicks.jsonl"] {
            std::fs::copy(data.join(f), d.join(f)).expect("copy");
        }
        d
    };
    let clean = setup("clean");
    run_to_end(&clean);

    let crashy = setup("crashy");
    let mut kills = 0;
    for delay_ms in [300u64, 650, 450, 900, 550, 800] {
        let mut args = run_args(&crashy);
        args.extend(["--throttle-ms".to_string(), "3".to_string()]);
        let mut child = Command::new(bin())
            .args(&args)
            .env("SLUICE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(delay_ms) {
            if child.try_wait().expect("wait").is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if child.try_wait().expect("wait").is_none() {
            child.kill().expect("SIGKILL");
            kills += 1;
        }
        let _ = child.wait();
        // Between crashes the index agrees with the online store as soon as
        // the state is opened again (a crash may land between the commits).
    }
    assert!(kills >= 3, "killed mid-way only {kills} times");
    // A crash exactly between the index commit and the state commit: the
    // index is one checkpoint ahead, and the next start rebuilds it.
    let epoch = {
        let state = crashy.join("state");
        let store = Store::open_read_only(&state).expect("state");
        sluice_engine::checkpoint::Checkpoint::load(&store, &state)
            .expect("checkpoint")
            .expect("some checkpoint")
            .epoch
    };
    let out = Command::new(bin())
        .args(run_args(&crashy))
        .env("SLUICE_LOG", "warn")
        .env(
            "SLUICE_FAULT_ABORT_BEFORE_STATE_COMMIT",
            (epoch + 2).to_string(),
        )
        .output()
        .expect("run");
    assert!(
        !out.status.success(),
        "the fault must abort the run at epoch {}",
        epoch + 2
    );
    run_to_end(&crashy);
    for (view, col) in [("item_vectors", "embedding"), ("user_taste", "taste")] {
        let a = assert_index_matches_online(&clean.join("state"), view, col);
        let b = assert_index_matches_online(&crashy.join("state"), view, col);
        assert_eq!(
            a, b,
            "{view}: (indexed, without vector) differ after crashes"
        );
        let (da, db) = (
            dump(&clean.join("state"), view),
            dump(&crashy.join("state"), view),
        );
        assert_eq!(
            da.keys().collect::<Vec<_>>(),
            db.keys().collect::<Vec<_>>(),
            "{view}"
        );
        for (k, v) in &da {
            for (x, y) in v.iter().zip(&db[k]) {
                assert!((x - y).abs() <= 1e-5, "{view}/{k}: {x} vs {y}");
            }
        }
    }
}
