//! `CHECK` rules on a source, end to end: `run`, `backfill` and
//! `training-set` over a history with rows that break rules give the
//! results of the same pipeline without rules over the history without
//! those rows; every broken row is one `check_failed` dead letter naming
//! the rules it fails, and `/metrics` counts the failures per rule.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use arrow::array::Array;

use common::{bin, http, json_match, lake_rows, read_parquet, rows_match, spawn_serving};
use sluice_cli::commands::generate::Rng;

const T0: i64 = 1_704_067_200_000; // 2024-01-01T00:00:00Z

const COUNTRY: &str = "country IN ('us', 'de', 'fr')";
const PRICE: &str = "price >= 0";
const TS: &str = "ts > TIMESTAMP '2020-01-01 00:00:00'";
const QTY: &str = "sane_qty";

fn pipeline(checked: bool) -> String {
    let (country, price, ts, qty) = if checked {
        (
            format!(" CHECK ({COUNTRY})"),
            format!(" CHECK ({PRICE})"),
            format!(",\n    CHECK ({TS})"),
            ",\n    CONSTRAINT sane_qty CHECK (qty BETWEEN 1\n        AND 100)".to_string(),
        )
    } else {
        Default::default()
    };
    format!(
        "CREATE SOURCE orders (
    user_id TEXT NOT NULL,
    country TEXT{country},
    price   DOUBLE{price},
    qty     BIGINT,
    ts      TIMESTAMP NOT NULL,
    WATERMARK FOR ts AS ts - INTERVAL '1' MINUTE{ts}{qty}
) WITH (connector = 'file', path = 'events.jsonl');
CREATE FEATURE VIEW hop KEY user_id WITH (offline = 'lake') AS
    SELECT user_id, COUNT(*) AS n, SUM(price) AS s, SUM(qty) AS q FROM orders
    GROUP BY user_id, HOP(ts, INTERVAL '1' MINUTE, INTERVAL '10' MINUTE);
CREATE FEATURE VIEW tum KEY user_id WITH (offline = 'lake') AS
    SELECT user_id, COUNT(*) AS n, MAX(price) AS hi FROM orders
    GROUP BY user_id, TUMBLE(ts, INTERVAL '5' MINUTE);
"
    )
}

/// One generated order and the rules the generator made it break.
struct Order {
    line: String,
    breaks: Vec<&'static str>,
}

fn orders() -> Vec<Order> {
    let mut rng = Rng::new(14);
    let mut out = Vec::new();
    for i in 0..4000i64 {
        let user = format!("u{:02}", rng.below(25));
        let mut country = ["us", "de", "fr"][rng.below(3) as usize].to_string();
        let mut price = rng.below(100) as f64;
        let mut qty = Some(1 + rng.below(10) as i64);
        // Arrival jitter inside the watermark delay: nothing is late.
        let mut ts = T0 + i * 700 + rng.below(20_000) as i64;
        let mut breaks = Vec::new();
        if i % 11 == 5 {
            match rng.below(6) {
                0 => {
                    country = "xx".into();
                    breaks.push(COUNTRY);
                }
                1 => {
                    price = -1.0 - rng.below(50) as f64;
                    breaks.push(PRICE);
                }
                2 => {
                    ts = T0 - 5 * 365 * 86_400_000;
                    breaks.push(TS);
                }
                3 => {
                    qty = Some(if rng.below(2) == 0 { 0 } else { 500 });
                    breaks.push(QTY);
                }
                4 => {
                    // Several at once.
                    price = -3.0;
                    qty = Some(101);
                    country = "zz".into();
                    breaks.extend([COUNTRY, PRICE, QTY]);
                }
                _ => {
                    // NULLs pass, as in SQL.
                    qty = None;
                }
            }
        }
        let qty = qty.map_or("null".to_string(), |q| q.to_string());
        let ts = chrono::DateTime::from_timestamp_millis(ts)
            .expect("time")
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        out.push(Order {
            line: format!(
                "{{\"user_id\":\"{user}\",\"country\":\"{country}\",\"price\":{price},\"qty\":{qty},\"ts\":\"{ts}\"}}"
            ),
            breaks,
        });
    }
    out
}

/// A pipeline folder: the pipeline (with or without rules) and its events.
fn folder(d: &Path, checked: bool, orders: &[Order]) {
    std::fs::create_dir_all(d).expect("dir");
    std::fs::write(d.join("p.sql"), pipeline(checked)).expect("pipeline");
    let mut text = String::new();
    for o in orders.iter().filter(|o| checked || o.breaks.is_empty()) {
        writeln!(text, "{}", o.line).expect("fmt");
    }
    std::fs::write(d.join("events.jsonl"), text).expect("events");
}

/// The expected dead letters: (line, rules) of each broken order.
fn expected_letters(orders: &[Order]) -> Vec<(String, Vec<&'static str>)> {
    orders
        .iter()
        .enumerate()
        .filter(|(_, o)| !o.breaks.is_empty())
        .map(|(i, o)| (format!("events.jsonl:{}", i + 1), o.breaks.clone()))
        .collect()
}

/// The rule as a dead letter's reason names it.
fn named(rule: &str) -> String {
    if rule == QTY {
        "`sane_qty`: CHECK (qty BETWEEN 1 AND 100)".to_string()
    } else {
        format!("CHECK ({rule})")
    }
}

fn check_letters(text: &str, expected: &[(String, Vec<&'static str>)]) {
    let letters: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("dead letter"))
        .collect();
    assert_eq!(letters.len(), expected.len(), "{text}");
    for (l, (pos, rules)) in letters.iter().zip(expected) {
        assert_eq!(l["kind"], "check_failed", "{l}");
        assert_eq!(l["source"], "orders", "{l}");
        // `run` names the file as the pipeline does, a replay by its path.
        let at = l["position"].as_str().unwrap_or("");
        assert!(
            at == pos || at.ends_with(&format!("/{pos}")),
            "{l}: not at {pos}"
        );
        // Rules are named in the order the source declares them.
        let order = [COUNTRY, PRICE, TS, QTY];
        let mut rules = rules.clone();
        rules.sort_by_key(|r| order.iter().position(|o| o == r));
        let names: Vec<String> = rules.iter().map(|r| named(r)).collect();
        let want = if names.len() == 1 {
            format!("fails the rule {}", names[0])
        } else {
            format!("fails the rules {}", names.join(", "))
        };
        assert_eq!(l["reason"].as_str(), Some(want.as_str()), "{l}");
    }
}

fn training_set(d: &Path) -> Vec<arrow::array::RecordBatch> {
    let mut spine = String::from("uid,ts\n");
    for u in 0..25 {
        for m in (0..50).step_by(3) {
            writeln!(spine, "u{u:02},{}", T0 + m * 60_000 + 17_000).expect("fmt");
        }
    }
    std::fs::write(d.join("spine.csv"), spine).expect("spine");
    let out = d.join("train.parquet");
    let o = Command::new(bin())
        .args([
            "training-set",
            &d.join("p.sql").display().to_string(),
            "--spine",
            &d.join("spine.csv").display().to_string(),
            "--key",
            "user_id=uid",
            "--time-column",
            "ts",
            "--features",
            "hop",
            "--features",
            "tum",
            "--out",
            &out.display().to_string(),
        ])
        .output()
        .expect("training-set");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    read_parquet(&out)
}

#[test]
fn check_rules_dead_letter_in_run_backfill_and_training_set_alike() {
    let dir = tempfile::tempdir().expect("tmp");
    let orders = orders();
    let expected = expected_letters(&orders);
    assert!(expected.len() > 250, "broken rows: {}", expected.len());
    let mut per_rule: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, rules) in &expected {
        for r in rules {
            *per_rule.entry(r).or_default() += 1;
        }
    }
    assert_eq!(per_rule.len(), 4, "{per_rule:?}");

    // run: with rules over everything, without over the clean rows.
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    folder(&a, true, &orders);
    folder(&b, false, &orders);
    let mut cmd = Command::new(bin());
    cmd.current_dir(&a).args([
        "run",
        "p.sql",
        "--state-dir",
        "state",
        "--serve",
        "127.0.0.1:0",
    ]);
    let mut srv = spawn_serving(cmd);
    srv.done
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("run done");
    let (status, metrics) = http(&srv.addr, "GET", "/metrics", None, &[]);
    assert_eq!(status, 200);
    for (rule, n) in &per_rule {
        let m = format!("sluice_check_failures_total{{source=\"orders\",rule=\"{rule}\"}} {n}\n");
        assert!(metrics.contains(&m), "metrics lack {m}:\n{metrics}");
    }
    let m = format!(
        "sluice_dead_letters_total{{source=\"orders\",kind=\"check_failed\"}} {}\n",
        expected.len()
    );
    assert!(metrics.contains(&m), "metrics lack {m}:\n{metrics}");
    let _ = srv.child.kill();
    let _ = srv.child.wait();
    let o = Command::new(bin())
        .current_dir(&b)
        .args(["run", "p.sql", "--state-dir", "state"])
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    check_letters(
        &std::fs::read_to_string(a.join("state/dead_letters.jsonl")).unwrap_or_default(),
        &expected,
    );
    assert!(
        !b.join("state/dead_letters.jsonl").exists()
            || common::dead_letters(&b.join("state")).is_empty()
    );
    for view in ["hop", "tum"] {
        let (ha, ra) = lake_rows(&a.join("lake"), view);
        let (hb, rb) = lake_rows(&b.join("lake"), view);
        assert_eq!(ha, hb);
        assert!(ra.len() > 100, "{view}: {} lake rows", ra.len());
        assert!(rows_match(&ra, &rb), "{view}: lake rows differ");
        for u in 0..25 {
            let key = format!("u{u:02}");
            let (ga, gb) = (
                common::get(&a.join("state"), view, &key),
                common::get(&b.join("state"), view, &key),
            );
            let (ga, gb) = (ga.expect("read a"), gb.expect("read b"));
            assert!(json_match(&ga, &gb), "{view}/{key}: {ga} vs {gb}");
        }
    }

    // backfill: the same dead letters, the same lake as without the rows.
    for (d, checked) in [(&a, true), (&b, false)] {
        for sub in ["lake", "state"] {
            std::fs::remove_dir_all(d.join(sub)).expect("clean");
        }
        let o = Command::new(bin())
            .current_dir(d)
            .args([
                "backfill",
                "p.sql",
                "--source",
                "orders=events.jsonl",
                "--state-dir",
                "state",
                "--quiet",
            ])
            .output()
            .expect("backfill");
        let log = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{log}");
        let n = if checked { expected.len() } else { 0 };
        assert!(log.contains(&format!("{n} dead letters")), "{log}");
    }
    check_letters(
        &std::fs::read_to_string(a.join("state/backfill_dead_letters.jsonl")).unwrap_or_default(),
        &expected,
    );
    for view in ["hop", "tum"] {
        let (_, ra) = lake_rows(&a.join("lake"), view);
        let (_, rb) = lake_rows(&b.join("lake"), view);
        assert!(rows_match(&ra, &rb), "{view}: backfilled lake rows differ");
    }

    // training-set (a replay of the source's file): the same rows, the
    // broken ones dead-lettered beside the output.
    let (ta, tb) = (training_set(&a), training_set(&b));
    let (ta, tb) = (
        arrow::compute::concat_batches(&ta[0].schema(), &ta).expect("concat"),
        arrow::compute::concat_batches(&tb[0].schema(), &tb).expect("concat"),
    );
    assert_eq!(ta.num_rows(), 25 * 17);
    let n = ta.column_by_name("hop__n").expect("hop__n");
    assert!(
        n.null_count() < ta.num_rows() / 2,
        "{} NULLs",
        n.null_count()
    );
    assert_eq!(ta, tb, "training sets differ");
    check_letters(
        &std::fs::read_to_string(a.join("train.parquet.dead_letters.jsonl")).unwrap_or_default(),
        &expected,
    );
    assert_eq!(
        std::fs::read_to_string(b.join("train.parquet.dead_letters.jsonl")).unwrap_or_default(),
        ""
    );
}

/// A pipeline over the same orders whose `hop` view has `expect` rules
/// (or not): one always computable, one named, one that cannot be computed
/// for windows of one order (integer division by zero).
fn expect_pipeline(expect: bool) -> String {
    let rules = if expect {
        ",\n    expect = 'n >= 3',\n    expect.cheap = 's < 500 OR s IS NULL',\n    expect.per_order = 'CAST(s AS BIGINT) / (n - 1) >= 0'"
    } else {
        ""
    };
    format!(
        "CREATE SOURCE orders (
    user_id TEXT NOT NULL, country TEXT, price DOUBLE, qty BIGINT, ts TIMESTAMP NOT NULL,
    WATERMARK FOR ts AS ts - INTERVAL '1' MINUTE
) WITH (connector = 'file', path = 'events.jsonl');
CREATE FEATURE VIEW hop KEY user_id WITH (offline = 'lake'{rules}) AS
    SELECT user_id, COUNT(*) AS n, SUM(price) AS s FROM orders
    GROUP BY user_id, HOP(ts, INTERVAL '1' MINUTE, INTERVAL '10' MINUTE);
"
    )
}

#[test]
fn expect_rules_count_emitted_rows_that_fail_them_and_keep_them() {
    let dir = tempfile::tempdir().expect("tmp");
    let orders = orders();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for (d, expect) in [(&a, true), (&b, false)] {
        std::fs::create_dir_all(d).expect("dir");
        let lines: Vec<&str> = orders.iter().map(|o| o.line.as_str()).collect();
        std::fs::write(d.join("events.jsonl"), lines.join("\n") + "\n").expect("events");
        std::fs::write(d.join("p.sql"), expect_pipeline(expect)).expect("pipeline");
    }
    let mut cmd = Command::new(bin());
    cmd.current_dir(&a).args([
        "run",
        "p.sql",
        "--state-dir",
        "state",
        "--serve",
        "127.0.0.1:0",
    ]);
    let mut srv = spawn_serving(cmd);
    srv.done
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("run done");
    let (status, metrics) = http(&srv.addr, "GET", "/metrics", None, &[]);
    assert_eq!(status, 200);
    let _ = srv.child.kill();
    let _ = srv.child.wait();
    let o = Command::new(bin())
        .current_dir(&b)
        .args(["run", "p.sql", "--state-dir", "state"])
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Rows are kept: the lake is the rule-less pipeline's.
    let (ha, ra) = lake_rows(&a.join("lake"), "hop");
    let (hb, rb) = lake_rows(&b.join("lake"), "hop");
    assert_eq!(ha, hb);
    assert!(rows_match(&ra, &rb), "lake rows differ");

    // The counts are what the lake rows say.
    let (mut few, mut dear, mut single) = (0u64, 0u64, 0u64);
    let mut total = 0;
    for f in common::parquet_files(&a.join("lake").join("hop")) {
        for batch in read_parquet(&f) {
            let n = common::f64s(&batch, "n");
            let s = common::f64s(&batch, "s");
            for (n, s) in n.iter().zip(&s) {
                total += 1;
                let n = n.expect("n");
                few += u64::from(n < 3.0);
                dear += u64::from(s.is_some_and(|s| s >= 500.0));
                single += u64::from(n == 1.0 && s.is_some());
            }
        }
    }
    assert!(
        total > 100 && few > 0 && dear > 0 && single > 0,
        "{total} {few} {dear} {single}"
    );
    for (rule, n) in [("n >= 3", few), ("cheap", dear), ("per_order", single)] {
        let m = format!("sluice_expectation_failures_total{{view=\"hop\",rule=\"{rule}\"}} {n}\n");
        assert!(metrics.contains(&m), "metrics lack {m}:\n{metrics}");
    }

    // backfill counts the same rows and says so.
    std::fs::remove_dir_all(a.join("lake")).expect("clean");
    let o = Command::new(bin())
        .current_dir(&a)
        .args([
            "backfill",
            "p.sql",
            "--source",
            "orders=events.jsonl",
            "--state-dir",
            "bf",
            "--quiet",
        ])
        .output()
        .expect("backfill");
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    for (rule, n) in [("n >= 3", few), ("cheap", dear), ("per_order", single)] {
        let line = format!("expect {rule}: {n} of {total} rows fail it");
        assert!(log.contains(&line), "no `{line}` in:\n{log}");
    }
    let (_, rf) = lake_rows(&a.join("lake"), "hop");
    assert!(rows_match(&rf, &rb), "backfilled lake rows differ");
}
