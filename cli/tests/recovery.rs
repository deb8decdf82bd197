//! Restart and crash recovery on the real binary: a run killed with
//! SIGKILL at arbitrary moments and restarted ends with the same lake,
//! online store and dead letters as a run that never crashed.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Outcome, bin, online_match, rows_match, sluice};

const PIPELINE: &str = "
CREATE SOURCE clicks (user_id TEXT NOT NULL, item_id TEXT, price DOUBLE, ts TIMESTAMP NOT NULL,
    WATERMARK FOR ts AS ts - INTERVAL '5' SECOND) WITH (connector = 'file', path = 'events.jsonl');
CREATE FEATURE VIEW activity KEY user_id WITH (offline = 'lake') AS
    SELECT user_id, COUNT(*) AS n, SUM(price) AS spend, APPROX_DISTINCT(item_id) AS items
    FROM clicks WHERE price >= 0 GROUP BY user_id, HOP(ts, INTERVAL '1' MINUTE, INTERVAL '5' MINUTE);
CREATE FEATURE VIEW last_click KEY user_id WITH (offline = 'lake') AS
    SELECT user_id, item_id, price FROM clicks;
CREATE FEATURE VIEW lifetime KEY user_id AS
    SELECT user_id, COUNT(*) AS n, MAX(price) AS top FROM clicks GROUP BY user_id;
CREATE FEATURE VIEW recent KEY user_id AS
    SELECT user_id, COUNT(*) AS n, SUM(price) AS spend, MAX(price) AS top, LAST_VALUE(item_id ORDER BY ts) AS last_item
    FROM clicks GROUP BY user_id, HOP(ts, INTERVAL '1' MINUTE, INTERVAL '10' MINUTE);
";

fn outcome(dir: &Path) -> Outcome {
    common::outcome(
        dir,
        &["activity", "last_click"],
        &["activity", "last_click", "lifetime", "recent"],
    )
}

fn setup(dir: &Path, events: &Path) {
    std::fs::write(dir.join("p.sql"), PIPELINE).expect("pipeline");
    std::fs::copy(events, dir.join("events.jsonl")).expect("events");
}

fn run_args(dir: &Path) -> Vec<String> {
    vec![
        "run".into(),
        dir.join("p.sql").display().to_string(),
        "--state-dir".into(),
        dir.join("state").display().to_string(),
        "--batch-rows".into(),
        "300".into(),
        "--checkpoint-interval-ms".into(),
        "30".into(),
    ]
}

/// Runs the pipeline in `dir` until its input ends; it must succeed.
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

fn make_events(dir: &Path) -> std::path::PathBuf {
    let events = dir.join("events.jsonl");
    let out = sluice(&[
        "gen",
        "--events",
        "40000",
        "--keys",
        "200",
        "--minutes",
        "60",
        "--seed",
        "3",
        "--out",
        &events.display().to_string(),
    ]);
    assert!(out.status.success());
    // Some bad and late records so dead letters are part of the comparison.
    let mut text = std::fs::read_to_string(&events).expect("events");
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines.insert(1000, "{not json".into());
    lines.insert(
        20000,
        r#"{"user_id": "late", "price": 1, "ts": "2024-01-01T00:00:00Z"}"#.into(),
    );
    text = lines.join("\n") + "\n";
    std::fs::write(&events, text).expect("events");
    events
}

#[test]
fn kill_9_and_restart_matches_uninterrupted_run() {
    let root = tempfile::tempdir().expect("tmp");
    let events = make_events(root.path());

    let clean = root.path().join("clean");
    std::fs::create_dir_all(&clean).expect("dir");
    setup(&clean, &events);
    run_to_end(&clean);
    let want = outcome(&clean);
    assert!(
        want.lake[0].1.len() > 1000 && want.lake[1].1.len() > 39_000,
        "the clean run emitted rows"
    );
    assert_eq!(
        want.dead.len(),
        3,
        "one malformed record, one record late for both windowed views"
    );

    let crashy = root.path().join("crashy");
    std::fs::create_dir_all(&crashy).expect("dir");
    setup(&crashy, &events);
    // Reads go on throughout: `sluice get` opens the state read-only while
    // the job writes it, crashes and recovers; every answer is a committed
    // value of some checkpoint (a clock and features) or "not found".
    let reading = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let reader = {
        let reading = std::sync::Arc::clone(&reading);
        let state = crashy.join("state").display().to_string();
        std::thread::spawn(move || {
            let (mut found, mut clocks) = (0, Vec::new());
            while reading.load(std::sync::atomic::Ordering::Relaxed) {
                let out = sluice(&["get", "recent", "u00007", "--state-dir", &state]);
                if out.status.success() {
                    let v: serde_json::Value =
                        serde_json::from_slice(&out.stdout).expect("a read is JSON");
                    assert!(v["features"]["n"].as_i64().is_some_and(|n| n >= 0), "{v}");
                    clocks.push(v["as_of"].as_str().expect("as_of").to_string());
                    found += 1;
                } else {
                    let err = String::from_utf8_lossy(&out.stderr);
                    assert!(
                        err.contains("not found")
                            || err.contains("no feature view")
                            || err.contains("no state")
                            || err.contains("LOCK")
                            || err.contains("state store"),
                        "a failed read says why: {err}"
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (found, clocks)
        })
    };
    let mut kills = 0;
    for delay_ms in [150u64, 400, 250, 700, 350, 500] {
        let mut args = run_args(&crashy);
        args.extend(["--throttle-ms".to_string(), "2".to_string()]);
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
    }
    assert!(
        kills >= 3,
        "the run should have been killed mid-way several times ({kills})"
    );
    run_to_end(&crashy);
    reading.store(false, std::sync::atomic::Ordering::Relaxed);
    let (found, clocks) = reader.join().expect("reader");
    assert!(found > 0, "reads during the run found the key");
    // Clocks only move forward across crashes: a restart resumes from the
    // last committed checkpoint, never before what a reader already saw.
    assert!(clocks.windows(2).all(|w| w[0] <= w[1]), "{clocks:?}");
    let got = outcome(&crashy);
    for ((view, w), g) in ["activity", "last_click"]
        .iter()
        .zip(want.lake.iter())
        .zip(got.lake.iter())
    {
        assert_eq!(w.0, g.0, "{view}: header");
        assert!(
            rows_match(&w.1, &g.1),
            "{view}: lake rows differ after crashes ({} vs {})",
            w.1.len(),
            g.1.len()
        );
    }
    for ((view, w), (_, g)) in want.online.iter().zip(got.online.iter()) {
        assert!(
            online_match(w, g),
            "{view}: online store differs after crashes ({} vs {} keys)",
            w.len(),
            g.len()
        );
    }
    assert_eq!(want.dead, got.dead, "dead letters differ after crashes");
    // No stray temporary lake files.
    fn tmp_files(p: &Path) -> usize {
        std::fs::read_dir(p)
            .map(|rd| {
                rd.flatten()
                    .map(|e| {
                        if e.path().is_dir() {
                            tmp_files(&e.path())
                        } else {
                            usize::from(e.file_name().to_string_lossy().ends_with(".tmp"))
                        }
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    assert_eq!(tmp_files(&crashy.join("lake")), 0);
}

#[test]
fn rerun_after_end_of_input_is_a_no_op_and_appended_input_continues() {
    let root = tempfile::tempdir().expect("tmp");
    let events = make_events(root.path());
    let all = std::fs::read_to_string(&events).expect("events");
    let lines: Vec<&str> = all.lines().collect();
    let (first, second) = lines.split_at(lines.len() / 2);

    // One run over all events.
    let whole = root.path().join("whole");
    std::fs::create_dir_all(&whole).expect("dir");
    setup(&whole, &events);
    run_to_end(&whole);

    // The same events in two halves, with a restart in between (and a no-op rerun).
    let split = root.path().join("split");
    std::fs::create_dir_all(&split).expect("dir");
    setup(&split, &events);
    std::fs::write(split.join("events.jsonl"), first.join("\n") + "\n").expect("first half");
    for _ in 0..2 {
        run_to_end(&split);
    }
    let mut text = std::fs::read_to_string(split.join("events.jsonl")).expect("read");
    text.push_str(&(second.join("\n") + "\n"));
    std::fs::write(split.join("events.jsonl"), text).expect("second half");
    run_to_end(&split);

    let (a, b) = (outcome(&whole), outcome(&split));
    for (x, y) in a.lake.iter().zip(&b.lake) {
        assert_eq!(x.0, y.0);
        assert!(
            rows_match(&x.1, &y.1),
            "lake differs between one run and a restarted run"
        );
    }
    for ((view, x), (_, y)) in a.online.iter().zip(&b.online) {
        assert!(online_match(x, y), "{view}: online store differs");
    }
    assert_eq!(a.dead, b.dead);
}
