//! The server under abuse, over real loopback sockets against `sluice run
//! --serve`: a filter bomb, batches at the key cap beside hundreds of idle
//! connections, a client past the connection cap, a client that never
//! finishes its headers, foreign `Host` headers, token rules.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{ServingRun, bin, http, spawn_serving};

const PIPELINE: &str = "CREATE SOURCE items (
    item_id TEXT NOT NULL, category TEXT, emb FLOAT[4] NOT NULL, ts TIMESTAMP NOT NULL,
    WATERMARK FOR ts AS ts
) WITH (connector = 'file', path = 'items.jsonl');
CREATE FEATURE VIEW iv KEY item_id
  WITH (vector_index = 'emb', distance = 'cosine', index_filter_columns = 'category')
AS SELECT item_id, LAST_VALUE(emb) AS emb, LAST_VALUE(category) AS category, COUNT(*) AS n
FROM items GROUP BY item_id;
";

struct Server {
    run: ServingRun,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.run.child.kill();
        let _ = self.run.child.wait();
    }
}

impl Server {
    fn addr(&self) -> &str {
        &self.run.addr
    }

    fn alive(&mut self) -> bool {
        self.run.child.try_wait().ok().flatten().is_none()
    }
}

fn setup(dir: &Path, items: usize) {
    std::fs::write(dir.join("p.sql"), PIPELINE).expect("pipeline");
    let mut text = String::new();
    for i in 0..items {
        let f = i as f64;
        text.push_str(&format!(
            "{{\"item_id\": \"i{i}\", \"category\": \"c{}\", \"emb\": [{}, {}, {}, 1.0], \"ts\": {i}}}\n",
            i % 7,
            f.sin(),
            f.cos(),
            (f * 0.1).sin()
        ));
    }
    std::fs::write(dir.join("items.jsonl"), text).expect("items");
}

fn serve(dir: &Path, extra: &[&str]) -> Server {
    let mut cmd = Command::new(bin());
    cmd.args([
        "run",
        &dir.join("p.sql").display().to_string(),
        "--state-dir",
        &dir.join("state").display().to_string(),
        "--serve",
        "127.0.0.1:0",
    ])
    .args(extra);
    let run = spawn_serving(cmd);
    run.done
        .recv_timeout(Duration::from_secs(120))
        .expect("the run finished its input");
    Server { run }
}

#[test]
fn a_filter_bomb_is_refused_and_the_process_lives() {
    let dir = tempfile::tempdir().expect("tmp");
    setup(dir.path(), 200);
    let mut srv = serve(dir.path(), &[]);
    let a = srv.addr().to_string();
    let ok = r#"{"vector": [1, 0, 0, 1], "k": 3, "filter": "category = 'c1' AND category = 'c1'"}"#;
    let (st, body) = http(&a, "POST", "/v1/features/iv/nearest", Some(ok), &[]);
    assert_eq!(st, 200, "{body}");
    let bomb = vec!["category = 'c1'"; 50_000].join(" AND ");
    let req = format!(r#"{{"vector": [1, 0, 0, 1], "k": 3, "filter": "{bomb}"}}"#);
    assert!(req.len() > 700_000);
    let t0 = Instant::now();
    let (st, body) = http(&a, "POST", "/v1/features/iv/nearest", Some(&req), &[]);
    let took = t0.elapsed();
    assert_eq!(st, 400, "{}", &body[..body.len().min(300)]);
    assert!(
        body.contains("--max-filter-bytes"),
        "{}",
        &body[..body.len().min(300)]
    );
    eprintln!("filter bomb refused in {took:?}");
    // Under the byte limit but past the node limit: refused before parsing.
    let nodes = format!("{}category = 'c1'", "NOT ".repeat(1500));
    let req = format!(r#"{{"vector": [1, 0, 0, 1], "k": 3, "filter": "{nodes}"}}"#);
    let (st, body) = http(&a, "POST", "/v1/features/iv/nearest", Some(&req), &[]);
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("--max-filter-nodes"), "{body}");
    // Arithmetic, which the parser nests as deep as its chain: refused by
    // token before it is parsed.
    let arith = format!("category = 1{}", "+1".repeat(7000));
    let req = format!(r#"{{"vector": [1, 0, 0, 1], "k": 3, "filter": "{arith}"}}"#);
    let (st, body) = http(&a, "POST", "/v1/features/iv/nearest", Some(&req), &[]);
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("no place in a filter"), "{body}");
    // Deep parentheses: sqlparser's own depth limit, still a 400.
    let deep = format!("{}category = 'c1'{}", "(".repeat(500), ")".repeat(500));
    let req = format!(r#"{{"vector": [1, 0, 0, 1], "k": 3, "filter": "{deep}"}}"#);
    let (st, _) = http(&a, "POST", "/v1/features/iv/nearest", Some(&req), &[]);
    assert_eq!(st, 400);
    // k × query vectors past the budget.
    let vs = vec!["[1, 0, 0, 1]"; 200].join(", ");
    let req = format!(r#"{{"vectors": [{vs}], "k": 1000}}"#);
    let (st, body) = http(&a, "POST", "/v1/features/iv/nearest", Some(&req), &[]);
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("--max-nearest-work"), "{body}");
    assert_eq!(http(&a, "GET", "/healthz", None, &[]).0, 200);
    assert!(srv.alive());
}

#[test]
fn healthz_answers_while_batches_run_at_the_key_cap_beside_idle_connections() {
    let dir = tempfile::tempdir().expect("tmp");
    setup(dir.path(), 2000);
    let mut srv = serve(
        dir.path(),
        &["--max-connections", "1000", "--max-batch-keys", "2000"],
    );
    let a = srv.addr().to_string();
    // 900 connections that send nothing.
    let idle: Vec<TcpStream> = (0..900)
        .map(|_| TcpStream::connect(&a).expect("idle connection"))
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let keys: Vec<String> = (0..2000).map(|i| format!("\"i{i}\"")).collect();
    let body = format!("{{\"keys\": [{}]}}", keys.join(","));
    let loader = {
        let stop = std::sync::Arc::clone(&stop);
        let a = a.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (st, _) = http(&a, "POST", "/v1/features/iv", Some(&body), &[]);
                assert_eq!(st, 200);
                n += 1;
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let mut worst = Duration::ZERO;
    for _ in 0..30 {
        let t0 = Instant::now();
        let (st, _) = http(&a, "GET", "/healthz", None, &[]);
        assert_eq!(st, 200);
        worst = worst.max(t0.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let batches = loader.join().expect("loader");
    eprintln!("slowest /healthz {worst:?} beside {batches} batches of 2000 keys");
    assert!(batches > 0);
    assert!(
        worst < Duration::from_millis(100),
        "slowest /healthz {worst:?}"
    );
    // One key past the cap: 413.
    let keys: Vec<String> = (0..2001).map(|i| format!("\"i{i}\"")).collect();
    let (st, body) = http(
        &a,
        "POST",
        "/v1/features/iv",
        Some(&format!("{{\"keys\": [{}]}}", keys.join(","))),
        &[],
    );
    assert_eq!(st, 413, "{body}");
    drop(idle);
    assert!(srv.alive());
}

/// Reads what the server sends until it closes (or `wait` passes).
fn read_until_closed(s: &mut TcpStream, wait: Duration) -> (String, bool) {
    s.set_read_timeout(Some(wait)).expect("timeout");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return (String::from_utf8_lossy(&buf).into_owned(), true),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (String::from_utf8_lossy(&buf).into_owned(), true);
            }
            Err(_) => return (String::from_utf8_lossy(&buf).into_owned(), false),
        }
    }
}

#[test]
fn connections_past_the_cap_are_refused_and_slow_headers_dropped() {
    let dir = tempfile::tempdir().expect("tmp");
    setup(dir.path(), 50);
    let mut srv = serve(
        dir.path(),
        &["--max-connections", "5", "--header-timeout-ms", "500"],
    );
    let a = srv.addr().to_string();
    let held: Vec<TcpStream> = (0..5).map(|_| TcpStream::connect(&a).expect("c")).collect();
    std::thread::sleep(Duration::from_millis(100));
    let mut extra = TcpStream::connect(&a).expect("connect");
    let t0 = Instant::now();
    let (text, closed) = read_until_closed(&mut extra, Duration::from_secs(5));
    assert!(closed, "a connection past the cap waits");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("Retry-After"), "{text}");
    drop(held);
    // The held ones closed, the cap frees up (after the header timeout at
    // the latest).
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(http(&a, "GET", "/healthz", None, &[]).0, 200);

    // Half a request line, then nothing: closed after the header timeout.
    let mut slow = TcpStream::connect(&a).expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: loc")
        .expect("send");
    let t0 = Instant::now();
    let (_, closed) = read_until_closed(&mut slow, Duration::from_secs(5));
    let took = t0.elapsed();
    assert!(closed, "the slow client is still connected");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(srv.alive());
}

#[test]
fn foreign_hosts_tokens_and_metrics() {
    let dir = tempfile::tempdir().expect("tmp");
    setup(dir.path(), 50);
    // An empty token file is an error at start, not an open door.
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").expect("empty");
    let out = Command::new(bin())
        .args([
            "run",
            &dir.path().join("p.sql").display().to_string(),
            "--state-dir",
            &dir.path().join("s0").display().to_string(),
            "--serve",
            "127.0.0.1:0",
            "--auth-token-file",
            &empty.display().to_string(),
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("holds no token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").expect("token");
    let srv = serve(
        dir.path(),
        &[
            "--auth-token-file",
            &token.display().to_string(),
            "--auth-metrics",
        ],
    );
    let a = srv.addr().to_string();
    let port = a.rsplit(':').next().expect("port").to_string();
    let auth = [("Authorization", "Bearer s3cret")];
    // DNS rebinding: a page of evil.example resolving to 127.0.0.1.
    let raw = |host: &str| {
        let mut s = TcpStream::connect(&a).expect("connect");
        write!(
            s,
            "GET /v1/features/iv/i1 HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer s3cret\r\nConnection: close\r\n\r\n"
        )
        .expect("send");
        let (text, _) = read_until_closed(&mut s, Duration::from_secs(5));
        text.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .unwrap_or(0)
    };
    assert_eq!(raw(&format!("evil.example:{port}")), 421);
    assert_eq!(raw("evil.example"), 421);
    assert_eq!(raw(&format!("localhost:{port}")), 200);
    assert_eq!(raw(&format!("[::1]:{port}")), 200);
    assert_eq!(raw("localhost:1"), 421);
    // The token guards reads and, with --auth-metrics, /metrics.
    assert_eq!(http(&a, "GET", "/v1/features/iv/i1", None, &[]).0, 401);
    assert_eq!(http(&a, "GET", "/v1/features/iv/i1", None, &auth).0, 200);
    assert_eq!(
        http(
            &a,
            "GET",
            "/v1/features/iv/i1",
            None,
            &[("Authorization", "Bearer s3cre")]
        )
        .0,
        401
    );
    assert_eq!(http(&a, "GET", "/metrics", None, &[]).0, 401);
    let (st, m) = http(&a, "GET", "/metrics", None, &auth);
    assert_eq!(st, 200);
    assert!(m.contains("sluice_serving_rejected_total"), "{m}");
    assert_eq!(http(&a, "GET", "/healthz", None, &[]).0, 200);
    // A body past the limit: 413, said before the body is read.
    let mut s = TcpStream::connect(&a).expect("connect");
    write!(
        s,
        "POST /v1/features/iv HTTP/1.1\r\nHost: {a}\r\nAuthorization: Bearer s3cret\r\nContent-Length: {}\r\n\r\n",
        3 << 20
    )
    .expect("send");
    let _ = s.write_all(&vec![b' '; 64 << 10]);
    let (text, _) = read_until_closed(&mut s, Duration::from_secs(5));
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
}
