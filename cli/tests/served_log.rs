//! The served-value log and `sluice consistency`: reads of sampled keys (by
//! key hash) are logged to `_served/{view}`; recomputed with the
//! training-set path they equal what was served. Events injected into the
//! history (ones the stream never saw when it served) and a different
//! window in the recomputing pipeline show up as mismatches, counted per
//! feature and explained.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{bin, http, spawn_serving};
use serde_json::Value;
use sluice_engine::served::{key_share, parse_utc_ms};

const SHARE: f64 = 0.3;

fn pipeline(size: &str) -> String {
    format!(
        "CREATE SOURCE clicks (
    user_id TEXT NOT NULL, item_id TEXT, price DOUBLE, ts TIMESTAMP NOT NULL,
    WATERMARK FOR ts AS ts - INTERVAL '5' SECOND
) WITH (connector = 'file', path = 'events.jsonl', format = 'json');
CREATE FEATURE VIEW user_activity KEY user_id
    WITH (online = true, offline = 'lake', log_served = {SHARE}) AS
SELECT user_id, COUNT(*) AS clicks_1h, SUM(price) AS spend_1h, AVG(price) AS avg_price_1h,
       APPROX_DISTINCT(item_id) AS distinct_items_1h
FROM clicks WHERE price >= 0
GROUP BY user_id, HOP(ts, INTERVAL '5' MINUTE, INTERVAL '{size}' HOUR);
"
    )
}

fn logged_rows(dir: &Path) -> Vec<arrow::array::RecordBatch> {
    common::parquet_files(&dir.join("lake/_served/user_activity"))
        .iter()
        .flat_map(|f| common::read_parquet(f))
        .collect()
}

fn consistency(dir: &Path, args: &[&str]) -> (Option<i32>, Value, String) {
    let o = Command::new(bin())
        .current_dir(dir)
        .args(
            [
                &["consistency"],
                args,
                &["--view", "user_activity", "--json"],
            ]
            .concat(),
        )
        .env("SLUICE_LOG", "warn")
        .output()
        .expect("consistency");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let j = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {err}"));
    (o.status.code(), j, err)
}

fn feature<'a>(j: &'a Value, name: &str) -> &'a Value {
    j["features"]
        .as_array()
        .and_then(|a| a.iter().find(|f| f["feature"] == name))
        .unwrap_or_else(|| panic!("no {name} in {j}"))
}

#[test]
fn served_reads_are_logged_and_recomputed_equal_until_the_history_differs() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = tmp.path();
    let o = common::sluice(&[
        "gen",
        "--events",
        "20000",
        "--keys",
        "300",
        "--out",
        &d.join("events.jsonl").display().to_string(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::write(d.join("p.sql"), pipeline("1")).expect("pipeline");

    let mut cmd = Command::new(bin());
    cmd.current_dir(d).args([
        "run",
        "p.sql",
        "--state-dir",
        "state",
        "--serve",
        "127.0.0.1:0",
    ]);
    let mut srv = spawn_serving(cmd);
    srv.done
        .recv_timeout(Duration::from_secs(120))
        .expect("run done");

    // Every key read once, unknown keys too, and a batch with its own request id.
    let keys: Vec<String> = (0..300).map(|k| format!("u{k:05}")).collect();
    let ghosts: Vec<String> = (0..40).map(|k| format!("ghost{k}")).collect();
    let mut expected = 0;
    let mut found_sampled = Vec::new();
    for k in keys.iter().chain(&ghosts) {
        let (status, _) = http(
            &srv.addr,
            "GET",
            &format!("/v1/features/user_activity/{k}"),
            None,
            &[],
        );
        assert!(status == 200 || status == 404, "{k}: {status}");
        if key_share(k) < SHARE {
            expected += 1;
            if status == 200 {
                found_sampled.push(k.clone());
            }
        }
    }
    let batch: Vec<&String> = keys.iter().take(20).collect();
    let body = serde_json::json!({ "keys": batch }).to_string();
    let (status, _) = http(
        &srv.addr,
        "POST",
        "/v1/features/user_activity",
        Some(&body),
        &[("x-request-id", "batch-1")],
    );
    assert_eq!(status, 200);
    let in_batch = batch.iter().filter(|k| key_share(k) < SHARE).count();
    expected += in_batch;
    // A closed-window read is not what a training set reproduces: not logged.
    let (status, _) = http(
        &srv.addr,
        "GET",
        &format!(
            "/v1/features/user_activity/{}?window=closed",
            found_sampled[0]
        ),
        None,
        &[],
    );
    assert_eq!(status, 200);

    // The log reaches the lake within a second or so.
    let t0 = Instant::now();
    let rows = loop {
        let n: usize = logged_rows(d).iter().map(|b| b.num_rows()).sum();
        if n >= expected || t0.elapsed() > Duration::from_secs(15) {
            break n;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = srv.child.kill();
    let _ = srv.child.wait();
    assert_eq!(rows, expected, "logged reads");
    assert!(
        found_sampled.len() > 50,
        "{} sampled keys found",
        found_sampled.len()
    );
    let batches = logged_rows(d);
    let (_, lines) = common::format_rows(&batches);
    assert_eq!(
        lines.iter().filter(|l| l.contains("batch-1")).count(),
        in_batch,
        "batch reads carry the request id"
    );

    // Clean: every read equals its recomputation.
    let (code, j, err) = consistency(d, &["p.sql"]);
    assert_eq!(code, Some(0), "{err}\n{j}");
    assert_eq!(j["reads"].as_u64(), Some(expected as u64));
    let sampled_ghosts = ghosts.iter().filter(|k| key_share(k) < SHARE).count() as u64;
    assert_eq!(j["served_not_found"].as_u64(), Some(sampled_ghosts));
    for f in ["clicks_1h", "spend_1h", "avg_price_1h", "distinct_items_1h"] {
        let f = feature(&j, f);
        assert!(
            f["compared"].as_u64().unwrap_or(0) >= found_sampled.len() as u64,
            "{f}"
        );
        assert_eq!(f["mismatches"], 0, "{f}");
        assert_eq!(f["missing"], 0, "{f}");
        assert_eq!(f["extra"], 0, "{f}");
        // Sums of doubles folded in other groups differ in the last bits.
        assert!(f["smape_percent"].as_f64().is_some_and(|s| s < 1e-9), "{f}");
    }

    // A read served before the view's first checkpoint has no `as_of` (it
    // found nothing): such a row is counted apart, not compared.
    let first = &batches[0];
    let one = first.slice(0, 1);
    let at = one.schema().index_of("as_of").expect("as_of");
    let mut cols = one.columns().to_vec();
    cols[at] = arrow::array::new_null_array(cols[at].data_type(), 1);
    let unclocked = arrow::array::RecordBatch::try_new(one.schema(), cols).expect("row");
    let folder = d.join("lake/_served/user_activity/date=__HIVE_DEFAULT_PARTITION__");
    std::fs::create_dir_all(&folder).expect("mkdir");
    let file = std::fs::File::create(folder.join("unclocked.parquet")).expect("file");
    let mut w =
        parquet::arrow::ArrowWriter::try_new(file, unclocked.schema(), None).expect("writer");
    w.write(&unclocked).expect("write");
    w.close().expect("close");
    let (code, j, err) = consistency(d, &["p.sql"]);
    assert_eq!(code, Some(0), "{err}\n{j}");
    assert_eq!(j["reads"].as_u64(), Some(expected as u64));
    assert_eq!(j["served_before_first_watermark"].as_u64(), Some(1), "{j}");
    assert_eq!(feature(&j, "clicks_1h")["mismatches"], 0);
    let o = Command::new(bin())
        .current_dir(d)
        .args(["consistency", "p.sql", "--view", "user_activity"])
        .env("SLUICE_LOG", "warn")
        .output()
        .expect("consistency");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("1 more reads were served before the view's first checkpoint"),
        "{text}"
    );

    // Fault 1: the history holds events the stream never saw when it
    // served (one click a minute before the watermark for 25 sampled keys,
    // placed before the event that takes the watermark there, so the replay
    // counts them in the read).
    let text = std::fs::read_to_string(d.join("events.jsonl")).expect("events");
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let times: Vec<i64> = lines
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v["ts"].as_str().and_then(parse_utc_ms))
                .expect("ts")
        })
        .collect();
    let max_ts = *times.iter().max().expect("max ts");
    // The first row with the largest time takes the watermark to the reads'
    // as_of: the replay answers them right after it.
    let first_max = times.iter().position(|t| *t == max_ts).expect("max row");
    let at = sluice_connectors::rfc3339_ms(max_ts - 60_000);
    let injected: Vec<&String> = found_sampled.iter().take(25).collect();
    let extra: Vec<String> = injected
        .iter()
        .map(|k| format!(r#"{{"user_id":"{k}","item_id":"injected","price":1.5,"ts":"{at}"}}"#))
        .collect();
    lines.splice(first_max..first_max, extra);
    std::fs::write(d.join("events_plus.jsonl"), lines.join("\n") + "\n").expect("write");
    let (code, j, err) = consistency(
        d,
        &[
            "p.sql",
            "--source",
            "clicks=events_plus.jsonl",
            "--out",
            "diffs.parquet",
        ],
    );
    assert_eq!(code, Some(3), "{err}\n{j}");
    // Each logged read of an injected key (some were read twice: GET and batch).
    let reads_injected = injected.len() + injected.iter().filter(|k| batch.contains(k)).count();
    for f in ["clicks_1h", "spend_1h", "distinct_items_1h"] {
        let f = feature(&j, f);
        assert_eq!(f["mismatches"].as_u64(), Some(reads_injected as u64), "{f}");
        assert_eq!(f["missing"], 0);
        assert!(f["smape_percent"].as_f64().is_some_and(|s| s > 0.0), "{f}");
    }
    let why = j["explanations"].to_string();
    assert!(why.contains("given with --source"), "{why}");
    assert!(why.contains("had not accepted when it served"), "{why}");
    let diffs = common::read_parquet(&d.join("diffs.parquet"));
    let (_, diff_rows) = common::format_rows(&diffs);
    for k in &injected {
        assert!(
            diff_rows
                .iter()
                .any(|r| r.contains(k.as_str()) && r.contains("clicks_1h")),
            "{k} not among the differences"
        );
    }

    // Fault 2: a recomputation with another window (2 h instead of 1 h)
    // disagrees with most reads.
    std::fs::write(d.join("p2.sql"), pipeline("2")).expect("pipeline");
    let (code, j, _) = consistency(d, &["p2.sql"]);
    assert_eq!(code, Some(3));
    let rate = feature(&j, "clicks_1h")["mismatch_rate"]
        .as_f64()
        .unwrap_or(0.0);
    assert!(rate > 0.5, "mismatch rate {rate}");

    // A range with no reads compares nothing; a view without a log is an error.
    let (code, j, _) = consistency(d, &["p.sql", "--from", "2030-01-01"]);
    assert_eq!(code, Some(0));
    assert_eq!(j["reads"], 0);
}
