//! `sluice run` over Parquet and CSV files, single or a folder of them,
//! leaves the same lake, online store and dead letters as over the same
//! events as JSON lines; a second run over the same state resumes where
//! the first stopped (nothing read twice, files added to the folder read).

mod common;

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Float64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use parquet::arrow::ArrowWriter;

/// 2024-01-01T00:00:00Z.
const T0: i64 = 1_704_067_200_000;

const VIEWS: &str = r#"
CREATE FEATURE VIEW hourly KEY user_id WITH (online = true, offline = 'lake') AS
SELECT user_id, COUNT(*) AS n, SUM(price) AS spend, MAX(item_id) AS top_item,
       APPROX_DISTINCT(item_id) AS items
FROM clicks
GROUP BY user_id, TUMBLE(ts, INTERVAL '1' HOUR);

CREATE FEATURE VIEW totals KEY user_id WITH (online = true, offline = 'lake') AS
SELECT user_id, COUNT(*) AS n, MAX(price) AS top_price FROM clicks GROUP BY user_id;
"#;

fn pipeline(dir: &Path, with: &str) -> String {
    let text = format!(
        "CREATE SOURCE clicks (\n    user_id TEXT NOT NULL,\n    item_id TEXT,\n    price DOUBLE,\n    ts TIMESTAMP NOT NULL,\n    WATERMARK FOR ts AS ts - INTERVAL '5' SECOND\n) WITH (connector = 'file', {with});\n{VIEWS}"
    );
    let p = dir.join("p.sql");
    std::fs::write(&p, text).expect("pipeline");
    p.display().to_string()
}

struct Event {
    user: String,
    item: Option<String>,
    price: Option<f64>,
    ts: i64,
}

/// `n` clicks from `start_ms`, one every 1.5 s, by 40 users; every 7th
/// item and every 11th price NULL.
fn events(seed: u64, start_ms: i64, n: usize) -> Vec<Event> {
    let mut x = seed | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|i| Event {
            user: format!("u{:02}", next() % 40),
            item: (i % 7 != 0).then(|| format!("i{:03}", next() % 300)),
            price: (i % 11 != 0).then(|| (next() % 100_000) as f64 / 100.0),
            ts: start_ms + i as i64 * 1_500,
        })
        .collect()
}

fn rfc3339(ms: i64) -> String {
    sluice_connectors::rfc3339_ms(ms)
}

fn json_lines(events: &[Event]) -> String {
    let mut out = String::new();
    for e in events {
        let item = e
            .item
            .as_ref()
            .map_or("null".to_string(), |i| format!("\"{i}\""));
        let price = e.price.map_or("null".to_string(), |p| p.to_string());
        writeln!(
            out,
            r#"{{"user_id":"{}","item_id":{item},"price":{price},"ts":"{}"}}"#,
            e.user,
            rfc3339(e.ts)
        )
        .expect("write");
    }
    out
}

/// Columns in another order than the declaration: files are read by name.
fn csv(events: &[Event]) -> String {
    let mut out = String::from("ts,price,user_id,item_id\n");
    for e in events {
        writeln!(
            out,
            "{},{},{},{}",
            rfc3339(e.ts),
            e.price.map_or(String::new(), |p| p.to_string()),
            e.user,
            e.item.clone().unwrap_or_default()
        )
        .expect("write");
    }
    out
}

fn parquet(path: &Path, events: &[Event]) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("user_id", DataType::Utf8, false),
        Field::new("item_id", DataType::Utf8, true),
        Field::new("price", DataType::Float64, true),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
    ]));
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![
            Arc::new(StringArray::from_iter_values(
                events.iter().map(|e| e.user.as_str()),
            )),
            Arc::new(StringArray::from_iter(
                events.iter().map(|e| e.item.as_deref()),
            )),
            Arc::new(Float64Array::from_iter(events.iter().map(|e| e.price))),
            Arc::new(
                TimestampMillisecondArray::from_iter_values(events.iter().map(|e| e.ts))
                    .with_timezone("UTC"),
            ),
        ],
    )
    .expect("batch");
    let f = std::fs::File::create(path).expect("create parquet");
    // Small row groups: a checkpoint falls inside a file.
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(1000))
        .build();
    let mut w = ArrowWriter::try_new(f, schema, Some(props)).expect("writer");
    w.write(&batch).expect("write");
    w.close().expect("close");
}

fn run(p: &str, dir: &Path) {
    let state = dir.join("state").display().to_string();
    let o = common::sluice(&[
        "run",
        p,
        "--state-dir",
        &state,
        "--batch-rows",
        "700",
        "--checkpoint-interval-ms",
        "1",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Lake rows, online rows and dead-letter kinds of two runs are the same.
fn same_outcome(a: &Path, b: &Path, what: &str) {
    // The lifetime view's lake rows are snapshots per checkpoint (their
    // number depends on checkpoint timing): its online values are compared.
    let lake_views = ["hourly"];
    let views = ["hourly", "totals"];
    let (x, y) = (
        common::outcome(a, &lake_views, &views),
        common::outcome(b, &lake_views, &views),
    );
    for (v, ((ha, ra), (hb, rb))) in lake_views.iter().zip(x.lake.iter().zip(&y.lake)) {
        assert_eq!(ha, hb, "{what}: lake columns of {v}");
        assert!(!ra.is_empty(), "{what}: no lake rows for {v}");
        assert!(
            common::rows_match(ra, rb),
            "{what}: lake rows of {v} differ ({} vs {})",
            ra.len(),
            rb.len()
        );
    }
    for ((v, oa), (_, ob)) in x.online.iter().zip(&y.online) {
        assert!(!oa.is_empty(), "{what}: no online rows for {v}");
        assert!(
            common::online_match(oa, ob),
            "{what}: online rows of {v} differ"
        );
    }
    // Kinds only: the JSON and CSV readers word the reason differently.
    let kinds = |d: &[serde_json::Value]| {
        let mut k: Vec<String> = d.iter().map(|l| l["kind"].to_string()).collect();
        k.sort();
        k
    };
    assert_eq!(kinds(&x.dead), kinds(&y.dead), "{what}: dead letters");
}

#[test]
fn parquet_and_csv_runs_equal_the_json_lines_run() {
    let root = tempfile::tempdir().expect("tempdir");
    let first = events(7, T0, 6_000);
    let later = events(11, T0 + 6_000 * 1_500 + 3_600_000, 3_000);

    // JSON lines: one run, then the later events appended and a second run.
    let json = root.path().join("json");
    std::fs::create_dir_all(&json).expect("mkdir");
    let mut text = json_lines(&first);
    // A price that is not a number: dead-lettered by every reader.
    text.push_str(
        "{\"user_id\":\"u01\",\"item_id\":\"i001\",\"price\":\"lots\",\"ts\":\"2024-01-01T00:00:01Z\"}\n",
    );
    std::fs::write(json.join("events.jsonl"), &text).expect("events");
    let p = pipeline(&json, "path = 'events.jsonl', format = 'json'");
    run(&p, &json);
    text.push_str(&json_lines(&later));
    std::fs::write(json.join("events.jsonl"), &text).expect("events");
    run(&p, &json);

    // CSV, one file (named by extension) then a second file in its folder.
    let c = root.path().join("csv");
    std::fs::create_dir_all(c.join("in")).expect("mkdir");
    let mut body = csv(&first);
    body.push_str("2024-01-01T00:00:01Z,lots,u01,i001\n");
    std::fs::write(c.join("in/a.csv"), body).expect("csv");
    let p = pipeline(&c, "path = 'in'");
    run(&p, &c);
    run(&p, &c);
    std::fs::write(c.join("in/b.csv"), csv(&later)).expect("csv");
    run(&p, &c);

    // Parquet: a folder of two files, then a third added.
    let pq = root.path().join("parquet");
    std::fs::create_dir_all(pq.join("in")).expect("mkdir");
    parquet(&pq.join("in/part-0.parquet"), &first[..2_500]);
    parquet(&pq.join("in/part-1.parquet"), &first[2_500..]);
    let p = pipeline(&pq, "path = 'in/*.parquet', format = 'parquet'");
    run(&p, &pq);
    parquet(&pq.join("in/part-2.parquet"), &later);
    run(&p, &pq);

    // The parquet folder has no bad row: compare it with a JSON run
    // without one.
    let clean = root.path().join("clean");
    std::fs::create_dir_all(&clean).expect("mkdir");
    let mut text = json_lines(&first);
    std::fs::write(clean.join("events.jsonl"), &text).expect("events");
    let p = pipeline(&clean, "path = 'events.jsonl'");
    run(&p, &clean);
    text.push_str(&json_lines(&later));
    std::fs::write(clean.join("events.jsonl"), &text).expect("events");
    run(&p, &clean);

    same_outcome(&json, &c, "csv");
    same_outcome(&clean, &pq, "parquet");

    // The same source definition in `sluice backfill`, without --source:
    // it reads the source's own glob, and its lake equals the run's.
    let bf = root.path().join("backfill");
    std::fs::create_dir_all(bf.join("in")).expect("mkdir");
    for f in ["part-0.parquet", "part-1.parquet", "part-2.parquet"] {
        std::fs::copy(pq.join("in").join(f), bf.join("in").join(f)).expect("copy");
    }
    let p = pipeline(&bf, "path = 'in/*.parquet', format = 'parquet'");
    let o = common::sluice(&[
        "backfill",
        &p,
        "--state-dir",
        &bf.join("state").display().to_string(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (run_rows, back_rows) = (
        common::lake_rows(&pq.join("lake"), "hourly"),
        common::lake_rows(&bf.join("lake"), "hourly"),
    );
    assert_eq!(run_rows.0, back_rows.0);
    assert!(
        common::rows_match(&run_rows.1, &back_rows.1),
        "backfill rows {} vs run rows {}",
        back_rows.1.len(),
        run_rows.1.len()
    );
    let dead = common::dead_letters(&c.join("state"));
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["kind"], "wrong_type", "{dead:?}");
    assert!(
        dead[0]["position"]
            .as_str()
            .is_some_and(|p| p.contains("a.csv")),
        "{dead:?}"
    );
}

#[test]
fn one_parquet_file_resumes_inside_it() {
    // A run stopped after a checkpoint inside the file resumes after the
    // checkpointed row: the same result as one run to the end.
    let root = tempfile::tempdir().expect("tempdir");
    let all = events(5, T0, 8_000);
    let whole = root.path().join("whole");
    let split = root.path().join("split");
    for d in [&whole, &split] {
        std::fs::create_dir_all(d).expect("mkdir");
        parquet(&d.join("events.parquet"), &all);
    }
    let p = pipeline(&whole, "path = 'events.parquet'");
    run(&p, &whole);

    let p = pipeline(&split, "path = 'events.parquet'");
    let state = split.join("state").display().to_string();
    let mut child = std::process::Command::new(common::bin())
        .args([
            "run",
            &p,
            "--state-dir",
            &state,
            "--batch-rows",
            "500",
            "--checkpoint-interval-ms",
            "1",
            "--throttle-ms",
            "40",
        ])
        .env("SLUICE_LOG", "warn")
        .spawn()
        .expect("spawn");
    std::thread::sleep(std::time::Duration::from_millis(300));
    // SIGKILL: no final checkpoint, so the restart begins at the last one.
    child.kill().expect("kill");
    let _ = child.wait();
    let o = std::process::Command::new(common::bin())
        .args(["run", &p, "--state-dir", &state])
        .env("SLUICE_LOG", "info")
        .env("NO_COLOR", "1")
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let read: u64 = err
        .split("events=")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no event count in {err}"));
    assert!(
        read > 0 && read < 8_000,
        "the restart read {read} of 8000 events: it did not resume inside the file"
    );
    same_outcome(&whole, &split, "resumed parquet");
}
