//! `sluice backfill` gives what `sluice run` gives on the same events: the
//! same lake rows, the same late events dead-lettered, the same online
//! store; from Parquet, CSV and JSON lines; `--from`/`--to` and
//! `--include-late` do what they say; DuckDB reads both lakes as equal.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use arrow::array::AsArray;
use arrow::datatypes::{Float64Type, TimestampMillisecondType};
use common::{bin, dead_letters, lake_rows, online_match, read_parquet, rows_match, sluice};

const FEATURES: &str = "COUNT(*) AS n, SUM(price) AS spend, AVG(price) AS avg_price, MIN(price) AS lo, MAX(price) AS hi, STDDEV(price) AS sd, APPROX_DISTINCT(item_id) AS items";
const LAKE_VIEWS: [&str; 3] = ["hop", "tumble", "last_click"];
const ONLINE_VIEWS: [&str; 4] = ["hop", "tumble", "last_click", "lifetime"];
/// Watermark delay of the pipeline.
const DELAY_MS: i64 = 30_000;

fn pipeline(dir: &Path) -> PathBuf {
    let sql = format!(
        "CREATE SOURCE clicks (user_id TEXT NOT NULL, item_id TEXT, price DOUBLE, ts TIMESTAMP NOT NULL,
            WATERMARK FOR ts AS ts - INTERVAL '30' SECOND) WITH (connector = 'file', path = 'events.jsonl');
         CREATE FEATURE VIEW hop KEY user_id WITH (online = true, offline = '${{LAKE:-lake}}') AS
            SELECT user_id, {FEATURES} FROM clicks WHERE price >= 0
            GROUP BY user_id, HOP(ts, INTERVAL '5' MINUTE, INTERVAL '15' MINUTE);
         CREATE FEATURE VIEW tumble KEY user_id WITH (online = true, offline = '${{LAKE:-lake}}') AS
            SELECT user_id, COUNT(*) AS n, SUM(price) AS spend FROM clicks
            GROUP BY user_id, TUMBLE(ts, INTERVAL '10' MINUTE) HAVING COUNT(*) > 1;
         CREATE FEATURE VIEW last_click KEY user_id WITH (online = true, offline = '${{LAKE:-lake}}') AS
            SELECT user_id, item_id, price * 2 AS p2 FROM clicks WHERE price > 50;
         CREATE FEATURE VIEW lifetime KEY user_id WITH (online = true) AS
            SELECT user_id, COUNT(*) AS n, MAX(price) AS hi FROM clicks GROUP BY user_id;"
    );
    let p = dir.join("p.sql");
    std::fs::write(&p, sql).expect("write pipeline");
    p
}

fn run_with_lake(lake: &Path, args: &[&str]) -> Output {
    let out = Command::new(bin())
        .args(args)
        .env("SLUICE_LOG", "warn")
        .env("LAKE", lake)
        .output()
        .expect("run sluice");
    assert!(
        out.status.success(),
        "sluice {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn gen_events(out: &Path) {
    let o = sluice(&[
        "gen",
        "--events",
        "40000",
        "--keys",
        "30",
        "--minutes",
        "120",
        "--seed",
        "11",
        "--late-every",
        "53",
        "--late-ms",
        "600000",
        "--out",
        &out.display().to_string(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn late_reasons(letters: &[serde_json::Value]) -> Vec<String> {
    let mut v: Vec<String> = letters
        .iter()
        .filter(|d| d["kind"] == "late_event")
        .map(|d| format!("{} {}", d["reason"], d["record"]))
        .collect();
    v.sort();
    v
}

fn backfill_dead(state: &Path) -> Vec<serde_json::Value> {
    let Ok(text) = std::fs::read_to_string(state.join("backfill_dead_letters.jsonl")) else {
        return Vec::new();
    };
    text.lines()
        .map(|l| serde_json::from_str(l).expect("dead letter is JSON"))
        .collect()
}

fn online(state: &Path, view: &str) -> Vec<(String, Vec<u8>)> {
    let store = sluice_engine::store::Store::open_read_only(state).expect("state");
    sluice_engine::online::scan_values(&store, view).expect("scan")
}

#[test]
fn backfill_equals_streaming() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    for f in ["events.jsonl", "events.parquet", "events.csv"] {
        gen_events(&d.join(f));
    }
    let p = pipeline(d).display().to_string();
    let s = |n: &str| d.join(n).display().to_string();

    // Streaming, in small batches with frequent checkpoints.
    run_with_lake(
        &d.join("lake_stream"),
        &[
            "run",
            &p,
            "--state-dir",
            &s("st_stream"),
            "--batch-rows",
            "1000",
            "--checkpoint-interval-ms",
            "20",
        ],
    );
    // Backfill from Parquet on two workers, and from CSV on one.
    let src_pq = format!("clicks={}", s("events.parquet"));
    run_with_lake(
        &d.join("lake_pq"),
        &[
            "backfill",
            &p,
            "--source",
            &src_pq,
            "--state-dir",
            &s("st_pq"),
            "--online",
            "--threads",
            "2",
            "--batch-rows",
            "777",
            "--quiet",
        ],
    );
    let src_csv = format!("clicks={}", s("events.csv"));
    run_with_lake(
        &d.join("lake_csv"),
        &[
            "backfill",
            &p,
            "--source",
            &src_csv,
            "--state-dir",
            &s("st_csv"),
            "--threads",
            "1",
            "--quiet",
        ],
    );
    let src_json = format!("clicks={}", s("events.jsonl"));
    run_with_lake(
        &d.join("lake_json"),
        &[
            "backfill",
            &p,
            "--source",
            &src_json,
            "--state-dir",
            &s("st_json"),
            "--threads",
            "3",
            "--quiet",
        ],
    );

    for view in LAKE_VIEWS {
        let (h0, want) = lake_rows(&d.join("lake_stream"), view);
        assert!(want.len() > 100, "{view}: only {} rows", want.len());
        for lake in ["lake_pq", "lake_csv", "lake_json"] {
            let (h, got) = lake_rows(&d.join(lake), view);
            assert_eq!(h, h0, "{view} in {lake}: columns");
            assert_eq!(got.len(), want.len(), "{view} in {lake}: row count");
            assert!(
                rows_match(&got, &want),
                "{view} in {lake}: rows differ from streaming"
            );
        }
    }

    // The same events are late, for the same views, with the same reasons.
    let stream_late = late_reasons(&dead_letters(&d.join("st_stream")));
    assert!(
        stream_late.len() > 50,
        "the data should hold late events, got {}",
        stream_late.len()
    );
    for st in ["st_pq", "st_csv", "st_json"] {
        assert_eq!(
            late_reasons(&backfill_dead(&d.join(st))),
            stream_late,
            "{st}: late events"
        );
    }

    // `--online` leaves the online store streaming leaves.
    for view in ONLINE_VIEWS {
        let (a, b) = (
            online(&d.join("st_stream"), view),
            online(&d.join("st_pq"), view),
        );
        assert_eq!(a.len(), 30, "{view}: keys online");
        assert!(online_match(&a, &b), "{view}: online store differs");
    }
    let g = |st: &str| common::get(&d.join(st), "hop", "u00007").expect("get");
    assert!(common::json_match(&g("st_stream"), &g("st_pq")));

    // DuckDB reads the streaming lake and the backfill lake as the same rows.
    duckdb_same(&d.join("lake_stream"), &d.join("lake_pq"), &LAKE_VIEWS);

    // --from/--to: exactly the streaming windows inside the range.
    let from = 1_704_067_200_000i64 + 30 * 60_000;
    let to = 1_704_067_200_000i64 + 90 * 60_000;
    run_with_lake(
        &d.join("lake_range"),
        &[
            "backfill",
            &p,
            "--source",
            &src_pq,
            "--state-dir",
            &s("st_range"),
            "--from",
            "2024-01-01T00:30:00Z",
            "--to",
            &to.to_string(),
            "--quiet",
        ],
    );
    for view in ["hop", "tumble"] {
        let want = window_rows(&d.join("lake_stream"), view, from, to);
        let got = window_rows(&d.join("lake_range"), view, i64::MIN, i64::MAX);
        assert!(!want.is_empty());
        assert_eq!(got.len(), want.len(), "{view}: rows in range");
        assert!(rows_match(&got, &want), "{view}: range rows differ");
    }

    // --include-late: late events are folded in. Every event with price >= 0
    // then counts in each of its 3 hop windows that end by the final watermark.
    run_with_lake(
        &d.join("lake_late"),
        &[
            "backfill",
            &p,
            "--source",
            &src_pq,
            "--state-dir",
            &s("st_late"),
            "--include-late",
            "--quiet",
        ],
    );
    assert!(late_reasons(&backfill_dead(&d.join("st_late"))).is_empty());
    let events = read_parquet(&d.join("events.parquet"));
    let mut ts = Vec::new();
    for b in &events {
        let t = b.column(3).as_primitive::<TimestampMillisecondType>();
        let pr = b.column(2).as_primitive::<Float64Type>();
        for i in 0..b.num_rows() {
            ts.push((t.value(i), pr.value(i)));
        }
    }
    let wm = ts.iter().map(|x| x.0).max().expect("events") - DELAY_MS;
    let slide = 5 * 60_000;
    let expected: i64 = ts
        .iter()
        .filter(|(_, p)| *p >= 0.0)
        .map(|(t, _)| {
            let first_end = t.div_euclid(slide) * slide + slide;
            (0..3).filter(|k| first_end + k * slide <= wm).count() as i64
        })
        .sum();
    let total = |lake: &str| -> i64 {
        common::parquet_files(&d.join(lake).join("hop"))
            .iter()
            .flat_map(|f| read_parquet(f))
            .map(|b| {
                let n = b.column_by_name("n").expect("n");
                n.as_primitive::<arrow::datatypes::Int64Type>()
                    .values()
                    .iter()
                    .sum::<i64>()
            })
            .sum()
    };
    assert_eq!(total("lake_late"), expected, "include-late hop counts");
    assert!(
        total("lake_stream") < expected,
        "streaming dropped the late events"
    );

    // A second backfill into the same lake is refused unless --replace.
    let again = Command::new(bin())
        .args([
            "backfill",
            &p,
            "--source",
            &src_pq,
            "--state-dir",
            &s("st_pq"),
            "--quiet",
        ])
        .env("LAKE", d.join("lake_pq"))
        .output()
        .expect("run");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--replace"));
    run_with_lake(
        &d.join("lake_pq"),
        &[
            "backfill",
            &p,
            "--source",
            &src_pq,
            "--state-dir",
            &s("st_pq"),
            "--replace",
            "--quiet",
        ],
    );
    let (_, want) = lake_rows(&d.join("lake_stream"), "hop");
    let (_, got) = lake_rows(&d.join("lake_pq"), "hop");
    assert!(rows_match(&got, &want), "after --replace");
}

/// Formatted rows of windows inside [from, to], sorted.
fn window_rows(lake: &Path, view: &str, from: i64, to: i64) -> Vec<String> {
    let mut out = Vec::new();
    for f in common::parquet_files(&lake.join(view)) {
        for b in read_parquet(&f) {
            let s = b.column(0).as_primitive::<TimestampMillisecondType>();
            let e = b.column(1).as_primitive::<TimestampMillisecondType>();
            let keep: arrow::array::BooleanArray = (0..b.num_rows())
                .map(|i| Some(s.value(i) >= from && e.value(i) <= to))
                .collect();
            let b = arrow::compute::filter_record_batch(&b, &keep).expect("filter");
            out.extend(common::format_rows(&[b]).1);
        }
    }
    out.sort();
    out
}

#[test]
fn bad_rows_in_parquet_and_csv_are_dead_lettered() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let p = pipeline(d).display().to_string();
    let csv = d.join("in/region=eu/bad.csv");
    std::fs::create_dir_all(csv.parent().expect("parent")).expect("mkdir");
    std::fs::write(
        &csv,
        "user_id,item_id,price,ts\n\
         u1,i1,10.5,2024-01-01T00:00:01Z\n\
         u1,i2,abc,2024-01-01T00:00:02Z\n\
         ,i3,1,2024-01-01T00:00:03Z\n\
         u2,i4,2,not-a-time\n\
         u2,i5,3,1704067204000\n\
         u3,i6,4,2024-01-01T02:00:05+02:00\n",
    )
    .expect("write csv");
    let src = format!("clicks={}/in", d.display());
    let st = d.join("st");
    run_with_lake(
        &d.join("lake"),
        &[
            "backfill",
            &p,
            "--source",
            &src,
            "--state-dir",
            &st.display().to_string(),
            "--online",
            "--quiet",
        ],
    );
    let dead = backfill_dead(&st);
    let kinds: BTreeMap<String, String> = dead
        .iter()
        .map(|d| {
            (
                d["position"]
                    .as_str()
                    .unwrap_or("")
                    .rsplit('/')
                    .next()
                    .unwrap_or("")
                    .to_string(),
                d["kind"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        BTreeMap::from([
            // Lines of the file: the header is line 1.
            ("bad.csv:3".to_string(), "wrong_type".to_string()),
            ("bad.csv:4".to_string(), "missing_field".to_string()),
            ("bad.csv:5".to_string(), "wrong_type".to_string()),
        ]),
        "{dead:?}"
    );
    // The good rows went through: epoch-ms text and a +02:00 offset are times.
    let (_, rows) = lake_rows(&d.join("lake"), "last_click");
    assert!(rows.is_empty(), "no price > 50: {rows:?}");
    let life = online(&st, "lifetime");
    let keys: Vec<&str> = life.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, vec!["u1", "u2", "u3"]);
    let u3: serde_json::Value = serde_json::from_slice(&life[2].1).expect("json");
    assert_eq!(u3["window_end"], 1_704_067_205_000i64, "{u3}");
}

#[test]
fn bad_arguments_are_explained() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = pipeline(dir.path()).display().to_string();
    for (args, msg) in [
        (
            vec!["--source", "nope=x.parquet"],
            "declares no source `nope`",
        ),
        (vec!["--source", "clicks"], "expected NAME=PATH"),
        (
            vec!["--source", "clicks=/definitely/missing.parquet"],
            "missing.parquet",
        ),
        (
            vec!["--source", "clicks=x.parquet", "--from", "yesterday"],
            "is not a time",
        ),
    ] {
        let mut a = vec!["backfill", p.as_str()];
        a.extend(args);
        let o = sluice(&a);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(msg), "{a:?}: {err}");
    }
}

fn duckdb_same(a: &Path, b: &Path, views: &[&str]) {
    let Some(py) = common::duckdb_python() else {
        if std::env::var_os("SLUICE_SKIP_DUCKDB").is_some() {
            eprintln!("SLUICE_SKIP_DUCKDB set: DuckDB lake check skipped");
            return;
        }
        panic!(
            "no Python with duckdb (pip install duckdb, or set SLUICE_PYTHON; SLUICE_SKIP_DUCKDB=1 skips)"
        );
    };
    let script = common::repo_root().join("testdata/lake_diff.py");
    let mut args = vec![
        script.display().to_string(),
        a.display().to_string(),
        b.display().to_string(),
    ];
    args.extend(views.iter().map(|v| v.to_string()));
    let o = Command::new(py).args(&args).output().expect("python");
    assert!(
        o.status.success(),
        "DuckDB sees different lakes:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let report = String::from_utf8_lossy(&o.stdout);
    for v in views {
        assert!(report.contains(&format!("{v}: ")), "{report}");
    }
}

#[test]
fn summary_and_backfill_file_names() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    gen_events(&d.join("events.parquet"));
    let p = pipeline(d).display().to_string();
    let src = format!("clicks={}", d.join("events.parquet").display());
    let o = run_with_lake(
        &d.join("lake"),
        &[
            "backfill",
            &p,
            "--source",
            &src,
            "--state-dir",
            &d.join("st").display().to_string(),
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("backfill done: 40000 events"), "{err}");
    assert!(err.contains("view hop: "), "{err}");
    let files = common::parquet_files(&d.join("lake/hop"));
    assert!(files.iter().all(|f| {
        f.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("backfill-"))
    }));
    assert!(!files.is_empty());
}
