//! `sluice run --workers N`: the same input gives the same lake (as a
//! multiset of rows), online reads and dead letters with 1, 2 and 4
//! workers, from a file and from a 4-partition Kafka topic, with bad
//! records and late events; and so does a run killed five times with the
//! worker count changed at each restart.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Broker, Outcome, bin, online_match, rows_match, sluice};

const VIEWS: &str = "
CREATE FEATURE VIEW activity KEY user_id WITH (offline = 'lake') AS
    SELECT user_id, COUNT(*) AS n, SUM(price) AS spend, APPROX_DISTINCT(item_id) AS items
    FROM clicks WHERE price >= 0 GROUP BY user_id, HOP(ts, INTERVAL '1' MINUTE, INTERVAL '5' MINUTE);
CREATE FEATURE VIEW last_click KEY user_id WITH (offline = 'lake') AS
    SELECT user_id, item_id, price FROM clicks;
CREATE FEATURE VIEW lifetime KEY user_id WITH (offline = 'lake') AS
    SELECT user_id, COUNT(*) AS n, MAX(price) AS top FROM clicks GROUP BY user_id;
CREATE FEATURE VIEW recent KEY user_id AS
    SELECT user_id, COUNT(*) AS n, SUM(price) AS spend, MAX(price) AS top
    FROM clicks GROUP BY user_id, HOP(ts, INTERVAL '1' MINUTE, INTERVAL '10' MINUTE);
CREATE FEATURE VIEW by_item KEY item_id WITH (offline = 'lake') AS
    SELECT item_id, COUNT(*) AS n FROM clicks GROUP BY item_id, TUMBLE(ts, INTERVAL '2' MINUTE);
";

fn outcome(dir: &Path) -> Outcome {
    common::outcome(
        dir,
        &["activity", "last_click", "lifetime", "by_item"],
        &["activity", "last_click", "lifetime", "recent", "by_item"],
    )
}

/// A lifetime view's lake rows are snapshots taken at checkpoints, so
/// their number depends on checkpoint timing (docs/semantics.md): what must
/// agree is each key's last snapshot (latest `window_end`, then largest
/// count), sorted.
fn last_snapshots(rows: &[String]) -> Vec<String> {
    let mut last: std::collections::BTreeMap<String, (String, i64, String)> =
        std::collections::BTreeMap::new();
    for r in rows {
        let cols: Vec<&str> = r.split(" | ").collect();
        let (end, key, n) = (
            cols[1].to_string(),
            cols[2].to_string(),
            cols[3].parse().unwrap_or(0),
        );
        let newer = last.get(&key).is_none_or(|(e, c, _)| (&end, n) > (e, *c));
        if newer {
            last.insert(key, (end, n, r.clone()));
        }
    }
    last.into_values().map(|(_, _, r)| r).collect()
}

/// Lake rows as multisets (sorted; a lifetime view's last snapshot per
/// key), online reads and dead letters of two runs.
fn assert_same(a: &Outcome, b: &Outcome, what: &str) {
    for ((va, ra), (vb, rb)) in a.lake.iter().zip(&b.lake) {
        assert_eq!(va, vb);
        let (ra, rb) = if va.starts_with("window_start | window_end | user_id | n | top") {
            (last_snapshots(ra), last_snapshots(rb))
        } else {
            (ra.clone(), rb.clone())
        };
        assert!(
            rows_match(&ra, &rb),
            "{what}: lake of {va} differs ({} rows against {})",
            ra.len(),
            rb.len()
        );
    }
    for ((va, ra), (vb, rb)) in a.online.iter().zip(&b.online) {
        assert_eq!(va, vb);
        assert!(
            online_match(ra, rb),
            "{what}: online reads of {va} differ ({} keys against {})",
            ra.len(),
            rb.len()
        );
    }
    let key = |d: &serde_json::Value| {
        format!(
            "{}|{}|{}",
            d["position"].as_str().unwrap_or(""),
            d["kind"].as_str().unwrap_or(""),
            d["reason"].as_str().unwrap_or("")
        )
    };
    let mut da: Vec<String> = a.dead.iter().map(key).collect();
    let mut db: Vec<String> = b.dead.iter().map(key).collect();
    da.sort();
    db.sort();
    assert_eq!(da, db, "{what}: dead letters differ");
}

/// Events with a malformed record and late ones: far behind the watermark
/// (late for every window) at several places.
fn make_events(dir: &Path) -> PathBuf {
    let events = dir.join("events.jsonl");
    let out = sluice(&[
        "gen",
        "--events",
        "30000",
        "--keys",
        "300",
        "--minutes",
        "60",
        "--seed",
        "5",
        "--out",
        &events.display().to_string(),
    ]);
    assert!(out.status.success());
    let text = std::fs::read_to_string(&events).expect("events");
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines.insert(700, "{not json".into());
    for (i, at) in [12000usize, 18000, 24000, 29000].iter().enumerate() {
        lines.insert(
            *at,
            format!(
                r#"{{"user_id": "late{i}", "item_id": "i1", "price": 1, "ts": "2024-01-01T00:00:0{i}Z"}}"#
            ),
        );
    }
    std::fs::write(&events, lines.join("\n") + "\n").expect("events");
    events
}

fn file_pipeline(dir: &Path, events: &Path) {
    std::fs::create_dir_all(dir).expect("dir");
    let sql = format!(
        "CREATE SOURCE clicks (user_id TEXT NOT NULL, item_id TEXT, price DOUBLE, ts TIMESTAMP NOT NULL,
            WATERMARK FOR ts AS ts - INTERVAL '5' SECOND) WITH (connector = 'file', path = '{}');
        {VIEWS}",
        events.display()
    );
    std::fs::write(dir.join("p.sql"), sql).expect("pipeline");
}

fn run_args(dir: &Path, workers: usize, extra: &[&str]) -> Vec<String> {
    let mut a = vec![
        "run".to_string(),
        dir.join("p.sql").display().to_string(),
        "--state-dir".into(),
        dir.join("state").display().to_string(),
        "--batch-rows".into(),
        "400".into(),
        "--checkpoint-interval-ms".into(),
        "40".into(),
        "--workers".into(),
        workers.to_string(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// The source position of the state dir's last checkpoint, if it has one.
fn checkpointed(dir: &Path) -> Option<Vec<u8>> {
    let state = dir.join("state");
    let store = sluice_engine::store::Store::open_read_only(&state).ok()?;
    let cp = sluice_engine::checkpoint::Checkpoint::load(&store, &state).ok()??;
    cp.sources.get("clicks").map(|s| s.position.clone())
}

fn run_to_end(dir: &Path, workers: usize, extra: &[&str]) {
    let out = Command::new(bin())
        .args(run_args(dir, workers, extra))
        .env("SLUICE_LOG", "warn")
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn one_two_and_four_workers_agree_on_a_file() {
    let root = tempfile::tempdir().expect("tmp");
    let events = make_events(root.path());
    let mut outs = Vec::new();
    for n in [1usize, 2, 4] {
        let dir = root.path().join(format!("w{n}"));
        file_pipeline(&dir, &events);
        run_to_end(&dir, n, &[]);
        outs.push(outcome(&dir));
    }
    let first = &outs[0];
    assert!(first.lake[0].1.len() > 1000, "the runs emitted rows");
    assert_eq!(
        first.dead.len(),
        1 + 4 * 3,
        "one malformed record, four late ones for each of three windowed views"
    );
    assert_same(first, &outs[1], "2 workers");
    assert_same(first, &outs[2], "4 workers");
    // The dead-letter files are equal byte for byte: written in record order.
    let f = |n: usize| {
        std::fs::read(root.path().join(format!("w{n}/state/dead_letters.jsonl"))).expect("dl")
    };
    assert_eq!(f(1), f(4));
}

#[test]
fn kill_9_with_the_worker_count_changed_at_each_restart() {
    let root = tempfile::tempdir().expect("tmp");
    let events = make_events(root.path());
    let clean = root.path().join("clean");
    file_pipeline(&clean, &events);
    run_to_end(&clean, 1, &[]);
    let want = outcome(&clean);

    let crashy = root.path().join("crashy");
    file_pipeline(&crashy, &events);
    let counts = [2usize, 4, 1, 3, 2];
    let mut progress = vec![None];
    for (i, n) in counts.iter().enumerate() {
        let mut child = Command::new(bin())
            .args(run_args(&crashy, *n, &["--throttle-ms", "2"]))
            .env("SLUICE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run");
        std::thread::sleep(Duration::from_millis(250 + 90 * i as u64));
        let _ = child.kill();
        let _ = child.wait();
        progress.push(checkpointed(&crashy));
    }
    // The kills fell mid-run: the lives moved the input on, and the last
    // run still had some of it left.
    let moved = progress.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(moved >= 2, "the killed runs made progress: {progress:?}");
    let before_last = progress.last().cloned().flatten();
    run_to_end(&crashy, 4, &[]);
    assert_ne!(
        before_last,
        checkpointed(&crashy),
        "the last run had input left"
    );
    assert_same(
        &want,
        &outcome(&crashy),
        "killed five times, 2, 4, 1, 3, 2, then 4 workers",
    );
}

/// Sends JSON-lines records to a 4-partition topic, keyed by `user_id`
/// (librdkafka's partitioner spreads the users over the partitions).
fn send(broker: &str, topic: &str, lines: &[String]) {
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    sluice_connectors::kafka::ensure_topic(broker, topic, 4, &Default::default()).expect("topic");
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", broker)
        .set("acks", "all")
        .create()
        .expect("producer");
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
        let key = v["user_id"].as_str().unwrap_or("").to_string();
        let mut record = BaseRecord::<str, str>::to(topic)
            .key(&key)
            .payload(l.as_str());
        loop {
            match p.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    p.poll(Duration::from_millis(50));
                }
            }
        }
        p.poll(Duration::ZERO);
    }
    p.flush(Duration::from_secs(60)).expect("flush");
}

fn kafka_pipeline(dir: &Path, broker: &str, topic: &str) {
    std::fs::create_dir_all(dir).expect("dir");
    let sql = format!(
        "CREATE SOURCE clicks (user_id TEXT NOT NULL, item_id TEXT, price DOUBLE, ts TIMESTAMP NOT NULL,
            WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)
         WITH (connector = 'kafka', topic = '{topic}', brokers = '{broker}', start = 'earliest');
        {VIEWS}"
    );
    std::fs::write(dir.join("p.sql"), sql).expect("pipeline");
}

#[test]
fn one_two_and_four_workers_agree_on_a_four_partition_topic() {
    let broker = Broker::start();
    let root = tempfile::tempdir().expect("tmp");
    let events = make_events(root.path());
    let lines: Vec<String> = std::fs::read_to_string(&events)
        .expect("events")
        .lines()
        .map(str::to_string)
        .collect();
    let (late, bulk): (Vec<String>, Vec<String>) =
        lines.into_iter().partition(|l| l.contains("\"late"));
    // The bulk first; each run reads it to its end, so the restored
    // watermark is far past the late events however the partitions were
    // interleaved; then the late events into every partition.
    send(&broker.addr(), "clicks4", &bulk);
    let dirs: Vec<(usize, PathBuf)> = [1usize, 2, 4]
        .iter()
        .map(|n| (*n, root.path().join(format!("k{n}"))))
        .collect();
    for (n, dir) in &dirs {
        kafka_pipeline(dir, &broker.addr(), "clicks4");
        let t0 = Instant::now();
        run_to_end(dir, *n, &["--stop-at-end"]);
        eprintln!("{n} workers: {:?}", t0.elapsed());
    }
    let mut more = late.clone();
    for (i, user) in ["a", "b", "c", "d", "e", "f", "g", "h"].iter().enumerate() {
        more.push(format!(
            r#"{{"user_id": "late-{user}", "item_id": "i2", "price": 2, "ts": "2024-01-01T00:01:0{i}Z"}}"#
        ));
    }
    send(&broker.addr(), "clicks4", &more);
    let mut outs = Vec::new();
    for (n, dir) in &dirs {
        run_to_end(dir, *n, &["--stop-at-end"]);
        outs.push(outcome(dir));
    }
    assert_same(&outs[0], &outs[1], "kafka, 2 workers");
    assert_same(&outs[0], &outs[2], "kafka, 4 workers");
    let late = outs[0]
        .dead
        .iter()
        .filter(|d| d["kind"] == "late_event")
        .count();
    // 12 late records, each late for the three windowed views.
    assert_eq!(late, 12 * 3, "{:?}", outs[0].dead);
}
