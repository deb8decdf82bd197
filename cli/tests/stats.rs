//! `sluice stats` against DuckDB on the same lake rows: counts, NULLs,
//! min and max exactly, mean and standard deviation to 1e-9 relative,
//! quantiles within the sketch's rank error, distinct counts within
//! HyperLogLog's; per day and over a range; the population stability index
//! of the lake against itself is 0 and against a shifted copy passes the
//! threshold (exit code 3).

mod common;

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

const PIPELINE: &str = r#"
CREATE SOURCE clicks (
    user_id  TEXT NOT NULL,
    item_id  TEXT,
    price    DOUBLE,
    ts       TIMESTAMP NOT NULL,
    WATERMARK FOR ts AS ts - INTERVAL '5' SECOND
) WITH (connector = 'file', path = 'events.jsonl', format = 'json');

CREATE FEATURE VIEW shop KEY user_id WITH (online = true, offline = 'lake') AS
SELECT user_id, COUNT(*) AS n, SUM(price) AS spend, AVG(price) AS avg_price,
       MAX(item_id) AS top_item, APPROX_DISTINCT(item_id) AS items
FROM clicks
GROUP BY user_id, TUMBLE(ts, INTERVAL '1' HOUR);
"#;

const FEATURES: [&str; 5] = ["n", "spend", "avg_price", "top_item", "items"];
/// 2024-01-01T00:00:00Z.
const T0: i64 = 1_704_067_200_000;

/// 40 hours of clicks by 150 users: prices skewed, every 9th price and
/// every 13th item NULL, and users 0-4 with no price at all (NULL sums).
fn events(path: &Path) {
    let mut out = String::new();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let n = 30_000;
    for i in 0..n {
        let ts = T0 + (i as i64) * (40 * 3_600_000) / n as i64;
        let user = next() % 150;
        let r = (next() % 10_000) as f64 / 10_000.0;
        let price = if i % 9 == 0 || user < 5 {
            "null".to_string()
        } else {
            format!("{:.2}", 1.0 + 200.0 * r * r * r)
        };
        let item = if i % 13 == 0 {
            "null".to_string()
        } else {
            format!("\"i{:03}\"", next() % 400)
        };
        let secs = ts / 1000;
        let day = 1 + secs / 86_400 - T0 / 86_400_000;
        let s = secs % 86_400;
        writeln!(
            out,
            r#"{{"user_id":"u{user:03}","item_id":{item},"price":{price},"ts":"2024-01-{day:02}T{:02}:{:02}:{:02}Z"}}"#,
            s / 3600,
            s / 60 % 60,
            s % 60
        )
        .expect("write");
    }
    std::fs::write(path, out).expect("events");
}

fn stats(args: &[&str]) -> (Option<i32>, Value, String) {
    let o = common::sluice(&[&["stats"], args, &["--json"]].concat());
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let j =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("stats JSON: {e}\n{stderr}"));
    (o.status.code(), j, stderr)
}

fn feature<'a>(group: &'a Value, name: &str) -> &'a Value {
    group["features"]
        .as_array()
        .expect("features")
        .iter()
        .find(|f| f["feature"] == name)
        .unwrap_or_else(|| panic!("no feature {name} in {group}"))
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(1e-300)
}

#[test]
fn statistics_equal_duckdb_and_drift_sets_the_exit_code() {
    let Some(py) = common::duckdb_python() else {
        if std::env::var_os("SLUICE_SKIP_DUCKDB").is_some() {
            eprintln!("SLUICE_SKIP_DUCKDB set: skipped");
            return;
        }
        panic!("no Python with duckdb (set SLUICE_PYTHON; SLUICE_SKIP_DUCKDB=1 skips)");
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    events(&d.join("events.jsonl"));
    let p = d.join("pipeline.sql");
    std::fs::write(&p, PIPELINE).expect("pipeline");
    let p = p.display().to_string();
    let state = d.join("state").display().to_string();
    let o = common::sluice(&["run", &p, "--state-dir", &state]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let lake = d.join("lake").join("shop");
    let script = common::repo_root().join("testdata/lake_stats.py");
    let mut args = vec![
        script.display().to_string(),
        lake.display().to_string(),
        d.display().to_string(),
    ];
    args.extend(FEATURES.iter().map(|f| f.to_string()));
    let o = Command::new(&py).args(&args).output().expect("python");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let duck: Value = serde_json::from_slice(&o.stdout).expect("duckdb JSON");

    // The whole lake.
    let (code, j, err) = stats(&[&p, "--view", "shop"]);
    assert_eq!(code, Some(0), "{err}");
    let groups = j["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), 1);
    let g = &groups[0];
    assert_eq!(g["rows"], duck["rows"]);
    assert!(
        duck["rows"].as_u64().expect("rows") > 2_000,
        "{}",
        duck["rows"]
    );
    let mut worst_rank_error: f64 = 0.0;
    for name in FEATURES {
        let f = feature(g, name);
        let want = &duck["features"][name];
        assert_eq!(f["count"], want["count"], "{name} count");
        assert_eq!(f["nulls"], want["nulls"], "{name} nulls");
        if name == "top_item" {
            assert_eq!(f["min"], want["min"], "{name} min");
            assert_eq!(f["max"], want["max"], "{name} max");
            let (got, exact) = (
                f["distinct"].as_f64().expect("distinct"),
                want["distinct"].as_f64().expect("distinct"),
            );
            assert!(close(got, exact, 0.03), "{name} distinct {got} vs {exact}");
            continue;
        }
        for k in ["min", "max"] {
            assert_eq!(f[k].as_f64(), want[k].as_f64(), "{name} {k}");
        }
        for k in ["mean", "stddev"] {
            let (a, b) = (f[k].as_f64().expect(k), want[k].as_f64().expect(k));
            assert!(close(a, b, 1e-9), "{name} {k}: {a} vs {b}");
        }
        // Each approximate quantile lies where an exact one could, give or
        // take the t-digest's rank error (1%).
        let values: Vec<f64> = want["values"]
            .as_array()
            .expect("values")
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        let m = values.len() as f64;
        for (q, est) in f["quantiles"].as_object().expect("quantiles") {
            let q: f64 = q.parse().expect("q");
            let est = est.as_f64().expect("estimate");
            // The estimate interpolates between two adjacent values (over
            // integers, between ties): its rank is anywhere between theirs.
            let lo = values
                .iter()
                .copied()
                .filter(|v| *v <= est)
                .fold(f64::MIN, f64::max);
            let hi = values
                .iter()
                .copied()
                .filter(|v| *v >= est)
                .fold(f64::MAX, f64::min);
            let below = values.iter().filter(|v| **v < lo).count() as f64 / m;
            let at_most = values.iter().filter(|v| **v <= hi).count() as f64 / m;
            let err = if q < below {
                below - q
            } else if q > at_most {
                q - at_most
            } else {
                0.0
            };
            worst_rank_error = worst_rank_error.max(err);
            assert!(
                err <= 0.01,
                "{name} q{q}: estimate {est} has rank [{below}, {at_most}]"
            );
        }
    }
    eprintln!("worst quantile rank error: {worst_rank_error:.5}");

    // One group per date= folder, with DuckDB's row counts.
    let (_, j, _) = stats(&[&p, "--view", "shop", "--by-day"]);
    let days: Vec<(String, u64)> = j["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .map(|g| {
            (
                g["day"].as_str().expect("day").to_string(),
                g["rows"].as_u64().expect("rows"),
            )
        })
        .collect();
    assert_eq!(days.len(), 2, "{days:?}");
    for (day, rows) in &days {
        assert_eq!(duck["days"][day].as_u64(), Some(*rows), "{day}");
    }

    // A range: the rows whose window_end is in it.
    let (_, j, _) = stats(&[
        &p,
        "--view",
        "shop",
        "--from",
        "2024-01-01T06:00:00Z",
        "--to",
        "2024-01-01T12:00:00Z",
    ]);
    let rows = j["groups"][0]["rows"].as_u64().expect("rows");
    // 6 hourly windows of up to 150 users.
    assert!(rows > 600 && rows <= 900, "{rows}");
    let f = feature(&j["groups"][0], "n");
    assert_eq!(f["count"].as_u64(), Some(rows));

    // Against itself (the lake rows DuckDB copied into a training-set
    // shaped file): every index is 0, exit 0.
    let same = d.join("same.parquet").display().to_string();
    let (code, j, err) = stats(&[&p, "--view", "shop", "--reference", &same]);
    assert_eq!(code, Some(0), "{err}");
    for name in FEATURES {
        let f = feature(&j["groups"][0], name);
        assert_eq!(f["psi"].as_f64(), Some(0.0), "{name}: {f}");
    }
    assert_eq!(j["failures"].as_array().map(Vec::len), Some(0));

    // Against a shifted copy: past the threshold, exit 3, failures named.
    let shifted = d.join("shifted.parquet").display().to_string();
    let (code, j, err) = stats(&[&p, "--view", "shop", "--reference", &shifted]);
    assert_eq!(code, Some(3), "{err}");
    let failures = j["failures"].as_array().expect("failures");
    for name in FEATURES {
        let f = feature(&j["groups"][0], name);
        let psi = f["psi"].as_f64().expect("psi");
        assert!(psi > 0.2, "{name}: psi {psi}");
        assert!(
            failures
                .iter()
                .any(|x| x.as_str().is_some_and(|x| x.starts_with(name))),
            "{name} not among {failures:?}"
        );
        assert!(err.contains(&format!("drift: {name}")), "{err}");
    }
    // A looser threshold passes the same comparison.
    let (code, _, _) = stats(&[
        &p,
        "--view",
        "shop",
        "--reference",
        &shifted,
        "--max-psi",
        "1000",
    ]);
    assert_eq!(code, Some(0));

    // One range of the lake against another, in the table form.
    let o = common::sluice(&[
        "stats",
        &p,
        "--view",
        "shop",
        "--from",
        "2024-01-02",
        "--reference",
        "..2024-01-02",
        "--features",
        "n,spend",
    ]);
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("psi") && table.contains("spend"), "{table}");
    assert!(!table.contains("avg_price"), "{table}");

    // Errors a user can act on.
    for (args, want) in [
        (vec!["--features", "nope"], "no feature `nope`"),
        (vec!["--from", "2030-01-01"], "no lake files"),
        (vec!["--from", "soon"], "is not a time"),
        (vec!["--input", "/nonexistent.parquet"], "nonexistent"),
    ] {
        let o =
            common::sluice(&[&["stats", p.as_str(), "--view", "shop"], args.as_slice()].concat());
        assert_eq!(o.status.code(), Some(1));
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(want), "{want}: {e}");
    }
}

/// `sluice run` with `--serve` until its bounded input is done.
fn serve_run(p: &str, state: &str) -> common::ServingRun {
    let mut cmd = Command::new(common::bin());
    cmd.args(["run", p, "--state-dir", state, "--serve", "127.0.0.1:0"]);
    let run = common::spawn_serving(cmd);
    run.done
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("the run finished its input");
    run
}

fn stats_file(d: &Path, day: &str) -> std::path::PathBuf {
    d.join("lake/_stats/shop")
        .join(format!("date={day}"))
        .join("stats.json")
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .expect("stats JSON")
}

/// `stats = 'daily'`: each day is described once the watermark has passed
/// its end, with the numbers `sluice stats` gives for that day, measured
/// against `stats_reference`; the newest day's figures are in `/metrics`;
/// a later run describes the days it completes and leaves the others; a
/// backfill describes every day again.
#[test]
fn daily_statistics_describe_each_closed_day() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // The clicks up to noon of day 2: day 1 is whole, day 2 is not.
    events(&d.join("all.jsonl"));
    let all = std::fs::read_to_string(d.join("all.jsonl")).expect("events");
    let lines: Vec<&str> = all.lines().collect();
    let cut = lines
        .iter()
        .position(|l| l.contains("2024-01-02T12:"))
        .expect("a click at noon on day 2");
    std::fs::write(d.join("events.jsonl"), lines[..cut].join("\n") + "\n").expect("events");
    let sql = PIPELINE.replace(
        "WITH (online = true, offline = 'lake')",
        "WITH (online = true, offline = 'lake', stats = 'daily', stats_reference = '2024-01-01..2024-01-02')",
    );
    let p = d.join("pipeline.sql");
    std::fs::write(&p, sql).expect("pipeline");
    let p = p.display().to_string();
    let state = d.join("state").display().to_string();

    let mut run = serve_run(&p, &state);
    let addr = run.addr.clone();
    // The final checkpoint completed day 1; the thread looks every 2 s.
    let day1 = stats_file(d, "2024-01-01");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !day1.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no statistics of day 1"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let (_, metrics) = common::http(&addr, "GET", "/metrics", None, &[]);
    let _ = run.child.kill();
    let _ = run.child.wait();
    assert!(
        !stats_file(d, "2024-01-02").exists(),
        "day 2 is not over at the watermark"
    );
    let j = read_json(&day1);
    assert_eq!(j["day"], "2024-01-01");
    let (code, want, err) = stats(&[
        &p,
        "--view",
        "shop",
        "--from",
        "2024-01-01",
        "--to",
        "2024-01-02",
        "--reference",
        "2024-01-01..2024-01-02",
        "--threads",
        "1",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(j["groups"], want["groups"], "the day's statistics");
    let g = &j["groups"][0];
    assert!(g["rows"].as_u64().is_some_and(|r| r > 1000), "{g}");
    for f in FEATURES {
        assert_eq!(feature(g, f)["psi"], 0.0, "{f} against itself");
    }
    // /metrics: the newest day's figures.
    let metric = |name: &str, labels: &str| -> Option<f64> {
        let prefix = format!("{name}{{{labels}}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
    };
    assert_eq!(
        metric("sluice_stats_day_ms", "view=\"shop\""),
        Some(T0 as f64),
        "{metrics}"
    );
    assert_eq!(
        metric("sluice_stats_days_total", "view=\"shop\""),
        Some(1.0)
    );
    assert_eq!(
        metric("sluice_stats_rows", "view=\"shop\""),
        g["rows"].as_f64()
    );
    let spend = feature(g, "spend");
    assert_eq!(
        metric(
            "sluice_feature_null_rate",
            "view=\"shop\",feature=\"spend\""
        ),
        spend["null_rate"].as_f64()
    );
    // Prometheus prints the double in its shortest form.
    let mean = metric("sluice_feature_mean", "view=\"shop\",feature=\"spend\"").expect("mean");
    assert!(
        close(mean, spend["mean"].as_f64().expect("mean"), 1e-12),
        "{mean}"
    );
    assert_eq!(
        metric("sluice_feature_psi", "view=\"shop\",feature=\"top_item\""),
        Some(0.0)
    );

    // The rest of the clicks and one on day 3: a second run completes day 2
    // and leaves day 1.
    let rest = format!(
        "{all}{}\n",
        r#"{"user_id":"u001","item_id":"i001","price":5.0,"ts":"2024-01-03T06:00:00Z"}"#
    );
    std::fs::write(d.join("events.jsonl"), rest).expect("events");
    let o = common::sluice(&["run", &p, "--state-dir", &state]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(read_json(&day1), j, "day 1 is described once");
    let day2 = read_json(&stats_file(d, "2024-01-02"));
    let (_, want2, _) = stats(&[
        &p,
        "--view",
        "shop",
        "--from",
        "2024-01-02",
        "--to",
        "2024-01-03",
        "--reference",
        "2024-01-01..2024-01-02",
        "--threads",
        "1",
    ]);
    assert_eq!(day2["groups"], want2["groups"]);
    // Day 2 against day 1: the same process, so a small index.
    let psi = feature(&day2["groups"][0], "spend")["psi"]
        .as_f64()
        .expect("psi");
    assert!(psi > 0.0 && psi < 0.2, "{psi}");

    // A backfill of the same pipeline into another lake describes every
    // whole day, with the run's numbers; a second one describes them again.
    let p2 = d.join("backfill.sql");
    std::fs::write(
        &p2,
        std::fs::read_to_string(&p)
            .expect("pipeline")
            .replace("offline = 'lake'", "offline = 'lake2'"),
    )
    .expect("pipeline");
    let p2 = p2.display().to_string();
    let day1b = d.join("lake2/_stats/shop/date=2024-01-01/stats.json");
    let mut first = Value::Null;
    for round in 0..2 {
        let bstate = d.join("backfill-state").display().to_string();
        let o = common::sluice(&[
            "backfill",
            &p2,
            "--replace",
            "--to",
            "2024-01-03",
            "--state-dir",
            &bstate,
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        assert!(
            err.contains("view shop: statistics of 2 day(s) (2024-01-01 .. 2024-01-02)"),
            "{err}"
        );
        let b = read_json(&day1b);
        same_day(&b, &j);
        if round == 1 {
            assert_ne!(b["described_at"], first["described_at"], "described again");
        }
        first = b;
    }
    same_day(
        &read_json(&d.join("lake2/_stats/shop/date=2024-01-02/stats.json")),
        &day2,
    );
}

/// Two days' statistics over the same rows written in another order:
/// counts, NULLs, min, max and distinct equal, mean and stddev to 1e-9
/// (sums in another order), quantiles within the sketch's spread.
fn same_day(a: &Value, b: &Value) {
    let (ga, gb) = (&a["groups"][0], &b["groups"][0]);
    assert_eq!(ga["rows"], gb["rows"]);
    for f in FEATURES {
        let (fa, fb) = (feature(ga, f), feature(gb, f));
        for k in ["count", "nulls", "min", "max", "distinct"] {
            assert_eq!(fa[k], fb[k], "{f} {k}");
        }
        for k in ["mean", "stddev"] {
            if let (Some(x), Some(y)) = (fa[k].as_f64(), fb[k].as_f64()) {
                assert!(close(x, y, 1e-9), "{f} {k}: {x} {y}");
            }
        }
        if let (Some(x), Some(y)) = (fa["psi"].as_f64(), fb["psi"].as_f64()) {
            assert!((x - y).abs() < 1e-3, "{f} psi: {x} {y}");
        }
    }
}
