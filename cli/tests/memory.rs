//! The memory budget: a pipeline with many more keys than the budget's
//! tile cache holds runs to the same reads as an unbounded run, with its
//! peak RSS bounded by the budget plus a fixed overhead.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{bin, online_match, sluice};

const PIPELINE: &str = "
CREATE SOURCE clicks (user_id TEXT NOT NULL, item_id TEXT, price DOUBLE, ts TIMESTAMP NOT NULL,
    WATERMARK FOR ts AS ts - INTERVAL '5' SECOND) WITH (connector = 'file', path = 'events.jsonl');
CREATE FEATURE VIEW recent KEY user_id AS
    SELECT user_id, COUNT(*) AS n, SUM(price) AS spend, AVG(price) AS avg_price
    FROM clicks GROUP BY user_id, HOP(ts, INTERVAL '5' MINUTE, INTERVAL '1' HOUR);
";

/// Runs the pipeline in `dir` to the end of its input; returns peak RSS (MiB).
fn run(dir: &Path, budget: &str) -> f64 {
    let mut child = Command::new(bin())
        .args([
            "run",
            &dir.join("p.sql").display().to_string(),
            "--state-dir",
            &dir.join("state").display().to_string(),
            "--memory-budget",
            budget,
            "--checkpoint-interval-ms",
            "200",
        ])
        .env("SLUICE_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn");
    let status = format!("/proc/{}/status", child.id());
    let mut peak_kb = 0f64;
    loop {
        if let Ok(s) = std::fs::read_to_string(&status)
            && let Some(kb) = s
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        {
            peak_kb = peak_kb.max(kb);
        }
        if let Some(st) = child.try_wait().expect("wait") {
            assert!(st.success(), "sluice run --memory-budget {budget} failed");
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    peak_kb / 1024.0
}

#[test]
fn a_small_budget_gives_the_same_reads_within_bounded_memory() {
    let root = tempfile::tempdir().expect("tmp");
    let events = root.path().join("events.jsonl");
    // 200,000 keys, two events each on average, over 2 hours.
    let out = sluice(&[
        "gen",
        "--events",
        "400000",
        "--keys",
        "200000",
        "--minutes",
        "120",
        "--seed",
        "5",
        "--out",
        &events.display().to_string(),
    ]);
    assert!(out.status.success());
    let mut results = Vec::new();
    for (name, budget) in [("small", "48MiB"), ("large", "4GiB")] {
        let dir = root.path().join(name);
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("p.sql"), PIPELINE).expect("pipeline");
        std::fs::hard_link(&events, dir.join("events.jsonl"))
            .or_else(|_| std::fs::copy(&events, dir.join("events.jsonl")).map(|_| ()))
            .expect("events");
        let rss = run(&dir, budget);
        let store = sluice_engine::store::Store::open_read_only(&dir.join("state")).expect("state");
        let values = sluice_engine::online::scan_values(&store, "recent").expect("scan");
        results.push((name, rss, values));
    }
    let (small, large) = (&results[0], &results[1]);
    assert!(large.2.len() > 50_000, "{} keys", large.2.len());
    assert!(
        online_match(&small.2, &large.2),
        "reads differ between a 48MiB and a 4GiB budget ({} vs {} keys)",
        small.2.len(),
        large.2.len()
    );
    eprintln!(
        "peak RSS: 48MiB budget {:.0} MiB, 4GiB budget {:.0} MiB",
        small.1, large.1
    );
    // The budget plus a fixed overhead (binary, DataFusion, allocator slack).
    assert!(small.1 < 48.0 + 200.0, "peak RSS {:.0} MiB", small.1);
    assert!(
        small.1 < large.1,
        "the budget bounds memory: {:.0} vs {:.0} MiB",
        small.1,
        large.1
    );
}
