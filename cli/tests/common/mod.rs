//! Helpers shared by the integration tests: running the real `sluice`
//! binary and reading what it wrote (lake Parquet files, online store,
//! dead letters).

#![allow(dead_code, missing_docs)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// The root of the checkout the tests run in. Cargo runs a test with
/// `CARGO_MANIFEST_DIR` set to the package it tests, so a test binary
/// reused from another checkout (CI shares one target dir between clones)
/// still reads this checkout's files; the path compiled in is the fallback.
pub fn repo_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("..")
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sluice"))
}

pub fn sluice(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env("SLUICE_LOG", "warn")
        .output()
        .expect("run sluice")
}

/// Every Parquet file under `dir`, recursively, sorted by path.
pub fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(parquet_files(&p));
        } else if p.extension().is_some_and(|x| x == "parquet") {
            out.push(p);
        }
    }
    out.sort();
    out
}

pub fn read_parquet(path: &Path) -> Vec<RecordBatch> {
    let f = std::fs::File::open(path).expect("open parquet");
    let r = ParquetRecordBatchReaderBuilder::try_new(f)
        .expect("parquet reader")
        .build()
        .expect("build reader");
    r.map(|b| b.expect("read batch")).collect()
}

/// Rows of batches as `a | b | c` lines (NULL for nulls), plus the header line.
pub fn format_rows(batches: &[RecordBatch]) -> (String, Vec<String>) {
    let opts = FormatOptions::default().with_null("NULL");
    let mut header = String::new();
    let mut rows = Vec::new();
    for b in batches {
        header = b
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect::<Vec<_>>()
            .join(" | ");
        let fmts: Vec<ArrayFormatter> = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts).expect("formatter"))
            .collect();
        for i in 0..b.num_rows() {
            rows.push(
                fmts.iter()
                    .map(|f| f.value(i).to_string())
                    .collect::<Vec<_>>()
                    .join(" | "),
            );
        }
    }
    (header, rows)
}

/// All lake rows of a view, sorted, and the header.
pub fn lake_rows(lake: &Path, view: &str) -> (String, Vec<String>) {
    let mut batches = Vec::new();
    for f in parquet_files(&lake.join(view)) {
        batches.extend(read_parquet(&f));
    }
    let (h, mut rows) = format_rows(&batches);
    rows.sort();
    (h, rows)
}

/// Dead letters as parsed JSON values.
pub fn dead_letters(state: &Path) -> Vec<serde_json::Value> {
    let Ok(text) = std::fs::read_to_string(state.join("dead_letters.jsonl")) else {
        return Vec::new();
    };
    text.lines()
        .map(|l| serde_json::from_str(l).expect("dead letter is JSON"))
        .collect()
}

/// `sluice get` output as JSON, or None when the key is missing.
pub fn get(state: &Path, view: &str, key: &str) -> Option<serde_json::Value> {
    let out = sluice(&[
        "get",
        view,
        key,
        "--state-dir",
        &state.display().to_string(),
    ]);
    if !out.status.success() {
        return None;
    }
    Some(serde_json::from_slice(&out.stdout).expect("get prints JSON"))
}

fn close(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// Rows equal field by field, numbers up to floating-point summation order
/// (partial aggregates merged in a different order differ in the last bits).
pub fn rows_match(a: &[String], b: &[String]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            let (xs, ys): (Vec<&str>, Vec<&str>) =
                (x.split(" | ").collect(), y.split(" | ").collect());
            xs.len() == ys.len()
                && xs
                    .iter()
                    .zip(&ys)
                    .all(|(p, q)| match (p.parse::<f64>(), q.parse::<f64>()) {
                        (Ok(p), Ok(q)) => close(p, q),
                        _ => p == q,
                    })
        })
}

/// JSON values equal, numbers up to floating-point summation order.
pub fn json_match(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => close(x, y),
            _ => x == y,
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_match(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_match(v, w)))
        }
        _ => a == b,
    }
}

pub type OnlineRows = Vec<(String, Vec<u8>)>;

/// What a run left behind: lake rows and online rows per view, dead letters.
pub struct Outcome {
    pub lake: Vec<(String, Vec<String>)>,
    pub online: Vec<(String, OnlineRows)>,
    pub dead: Vec<serde_json::Value>,
}

/// Reads the outcome of the pipeline run in `dir` (`dir/state`, `dir/lake`).
pub fn outcome(dir: &Path, lake_views: &[&str], online_views: &[&str]) -> Outcome {
    outcome_in(dir, lake_views, online_views, None)
}

/// [`outcome`] with windowed views read in `mode`; a given mode also drops
/// `as_of`, for runs that end at different watermarks within one slide.
pub fn outcome_in(
    dir: &Path,
    lake_views: &[&str],
    online_views: &[&str],
    mode: Option<sluice_engine::tiles::ReadMode>,
) -> Outcome {
    let state = dir.join("state");
    let store = sluice_engine::store::Store::open_read_only(&state).expect("state");
    Outcome {
        lake: lake_views
            .iter()
            .map(|v| lake_rows(&dir.join("lake"), v))
            .collect(),
        online: online_views
            .iter()
            .map(|v| {
                let rows = sluice_engine::online::scan_values_in(&store, v, mode).expect("scan");
                let rows = match mode {
                    None => rows,
                    Some(_) => rows
                        .into_iter()
                        .map(|(k, b)| {
                            let mut j: serde_json::Value =
                                serde_json::from_slice(&b).expect("json");
                            if let Some(o) = j.as_object_mut() {
                                o.remove("as_of");
                            }
                            (k, serde_json::to_vec(&j).expect("json"))
                        })
                        .collect(),
                };
                (v.to_string(), rows)
            })
            .collect(),
        dead: dead_letters(&state),
    }
}

/// Online rows equal key by key, values as JSON up to summation order.
pub fn online_match(a: &[(String, Vec<u8>)], b: &[(String, Vec<u8>)]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|((ka, va), (kb, vb))| {
            let (x, y): (serde_json::Value, serde_json::Value) = (
                serde_json::from_slice(va).expect("json"),
                serde_json::from_slice(vb).expect("json"),
            );
            ka == kb && json_match(&x, &y)
        })
}

/// The Kafka-protocol broker the tests run against: `tansu` (from
/// crates.io, installed by `.ci/run`) with a file-backed log, on a free
/// loopback port, so it can be stopped and restarted without losing data.
pub struct Broker {
    child: Option<std::process::Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

pub fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SLUICE_TANSU") {
        return PathBuf::from(p);
    }
    if let Ok(home) = std::env::var("HOME") {
        let p = Path::new(&home).join(".cache/sluice/tansu/bin/tansu");
        if p.exists() {
            return p;
        }
    }
    panic!(
        "the Kafka tests need the tansu broker: run `bash .ci/run` once, or \
         `cargo install tansu --version 0.6.0 --features libsql,dynostore --root ~/.cache/sluice/tansu`, \
         or set SLUICE_TANSU to its path"
    );
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl Broker {
    pub fn start() -> Broker {
        let mut b = Broker {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().expect("broker dir"),
        };
        b.spawn();
        b
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("broker.log"))
            .expect("broker log");
        let child = Command::new(tansu_bin())
            .current_dir(self.dir.path())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "sqlite://tansu.db",
            ])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "tansu did not listen on {}",
                self.port
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Kills the broker (SIGKILL: no clean shutdown).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and log.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `sluice produce` into `topic`, left running (stderr piped).
pub fn spawn_produce(broker: &str, topic: &str, extra: &[&str]) -> std::process::Child {
    Command::new(bin())
        .args(["produce", "--brokers", broker, "--topic", topic])
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start sluice produce")
}

/// `sluice produce` into `topic`; panics if it fails.
pub fn produce(broker: &str, topic: &str, extra: &[&str]) {
    let mut args = vec!["produce", "--brokers", broker, "--topic", topic];
    args.extend_from_slice(extra);
    let out = sluice(&args);
    assert!(
        out.status.success(),
        "produce failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A minimal HTTP/1.1 exchange: (status, body).
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    if let Some(b) = body {
        req.push_str(b);
    }
    s.write_all(req.as_bytes()).expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let (head, mut body) = text
        .split_once("\r\n\r\n")
        .map(|(h, b)| (h.to_string(), b.to_string()))
        .expect("head");
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, body)
}

fn dechunk(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
    out
}

/// A `sluice run --serve 127.0.0.1:0` in the background.
pub struct ServingRun {
    pub child: std::process::Child,
    pub addr: String,
    /// Receives `()` once the run says its input is done ("still serving").
    pub done: std::sync::mpsc::Receiver<()>,
}

/// Starts `cmd` (a `sluice run … --serve 127.0.0.1:0`) with info logging and
/// waits for the address it serves on.
pub fn spawn_serving(mut cmd: Command) -> ServingRun {
    let mut child = cmd
        .env("SLUICE_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn run");
    let stderr = child.stderr.take().expect("stderr");
    let (atx, arx) = std::sync::mpsc::channel();
    let (dtx, drx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(a) = line.strip_prefix("serving on http://") {
                let _ = atx.send(a.trim().to_string());
            }
            if line.contains("still serving") {
                let _ = dtx.send(());
            }
        }
    });
    let addr = arx
        .recv_timeout(Duration::from_secs(60))
        .expect("server address");
    ServingRun {
        child,
        addr,
        done: drx,
    }
}

/// One served read: view, key, `as_of`, features.
#[derive(Debug, Clone)]
pub struct Served {
    pub view: String,
    pub key: String,
    pub as_of: String,
    pub features: serde_json::Value,
}

/// Reads random keys (`key(0..keys)`) of random views from `addr` until
/// `stop` says so; logs the found ones. A refused connection (the server
/// was killed) ends the loop.
pub fn log_reads(
    addr: &str,
    views: &[&str],
    key: impl Fn(u64) -> String,
    keys: u64,
    seed: u64,
    mut stop: impl FnMut() -> bool,
) -> Vec<Served> {
    let mut x = seed;
    let mut next = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut log = Vec::new();
    while !stop() {
        let view = views[next(views.len() as u64) as usize];
        let key = key(next(keys));
        if std::net::TcpStream::connect(addr).is_err() {
            break;
        }
        let (status, body) = http(
            addr,
            "GET",
            &format!("/v1/features/{view}/{key}"),
            None,
            &[],
        );
        if status != 200 {
            assert_eq!(status, 404, "{body}");
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        log.push(Served {
            view: view.to_string(),
            key,
            as_of: v["as_of"].as_str().expect("as_of").to_string(),
            features: v["features"].clone(),
        });
    }
    log
}

/// Column `name` of `b` as f64 values (panics if it is missing).
pub fn f64s(b: &RecordBatch, name: &str) -> Vec<Option<f64>> {
    use arrow::array::AsArray;
    let c = b
        .column_by_name(name)
        .unwrap_or_else(|| panic!("column {name}"));
    let c = arrow::compute::cast(c, &arrow::datatypes::DataType::Float64).expect("as f64");
    c.as_primitive::<arrow::datatypes::Float64Type>()
        .iter()
        .collect()
}

/// The Python that has `duckdb` (installed by `.ci/run`).
pub fn duckdb_python() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("SLUICE_PYTHON").map(PathBuf::from),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/sluice/venv/bin/python")),
        Some(PathBuf::from("python3")),
    ];
    candidates.into_iter().flatten().find(|p| {
        Command::new(p)
            .args(["-c", "import duckdb"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// The Python that has `pyspark` and `duckdb` (installed by `.ci/run`).
pub fn spark_python() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("SLUICE_PYTHON").map(PathBuf::from),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/sluice/venv/bin/python")),
    ];
    candidates.into_iter().flatten().find(|p| {
        Command::new(p)
            .args(["-c", "import pyspark, duckdb"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}
