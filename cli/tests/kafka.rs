//! Kafka end to end against a real Kafka-protocol broker (tansu, started by
//! each test on its own loopback port): Kafka input equals file input,
//! exactly-once state under `kill -9` while a producer writes, broker
//! outages, clear start-up errors, dead letters and feature updates to topics.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    Broker, Outcome, bin, dead_letters, lake_rows, online_match, produce, rows_match, sluice,
};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use sluice_engine::store::Store;

const VIEWS: &str = "
CREATE FEATURE VIEW activity KEY user_id WITH (offline = 'lake') AS
    SELECT user_id, COUNT(*) AS n, SUM(price) AS spend, APPROX_DISTINCT(item_id) AS items
    FROM clicks WHERE price >= 0 GROUP BY user_id, HOP(ts, INTERVAL '1' MINUTE, INTERVAL '5' MINUTE);
CREATE FEATURE VIEW last_click KEY user_id WITH (offline = 'lake') AS
    SELECT user_id, item_id, price FROM clicks;
";

fn kafka_pipeline(broker: &str, topic: &str, extra_columns: &str, extra_options: &str) -> String {
    format!(
        "CREATE SOURCE clicks (user_id TEXT NOT NULL, item_id TEXT, price DOUBLE, ts TIMESTAMP NOT NULL,{extra_columns}
    WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)
  WITH (connector = 'kafka', topic = '{topic}', brokers = '{broker}', format = 'json'{extra_options});
{VIEWS}"
    )
}

fn run_cmd(dir: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.args([
        "run",
        &dir.join("p.sql").display().to_string(),
        "--state-dir",
        &dir.join("state").display().to_string(),
    ])
    .args(extra)
    .env("SLUICE_LOG", "warn");
    c
}

/// A bounded run (`--stop-at-end`) that must succeed.
fn catch_up(dir: &Path, extra: &[&str]) {
    let mut args = vec!["--stop-at-end"];
    args.extend_from_slice(extra);
    let out = run_cmd(dir, &args).output().expect("run");
    assert!(
        out.status.success(),
        "run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn outcome(dir: &Path) -> Outcome {
    common::outcome(
        dir,
        &["activity", "last_click"],
        &["activity", "last_click"],
    )
}

fn assert_same(a: &Outcome, b: &Outcome, what: &str) {
    for (i, ((ha, ra), (hb, rb))) in a.lake.iter().zip(&b.lake).enumerate() {
        assert!(!ra.is_empty(), "{what}: lake {i} is empty");
        assert_eq!(ha, hb, "{what}: lake {i} columns");
        assert!(
            rows_match(ra, rb),
            "{what}: lake rows of view {i} differ ({} vs {} rows)",
            ra.len(),
            rb.len()
        );
    }
    for ((va, ra), (_, rb)) in a.online.iter().zip(&b.online) {
        assert!(
            online_match(ra, rb),
            "{what}: online store of {va} differs ({} vs {} keys)",
            ra.len(),
            rb.len()
        );
    }
    // Across partitions the order of dead letters depends on fetch timing;
    // the set must be the same.
    let sorted = |d: &[serde_json::Value]| {
        let mut v: Vec<String> = d.iter().map(|x| x.to_string()).collect();
        v.sort();
        v
    };
    let (da, db) = (sorted(&a.dead), sorted(&b.dead));
    assert!(
        da == db,
        "{what}: dead letters differ ({} vs {})",
        da.len(),
        db.len()
    );
}

/// The same events through a 4-partition topic and through a JSON-lines
/// file give the same lake and online store; metadata columns are filled.
#[test]
fn kafka_source_equals_file_source() {
    let broker = Broker::start();
    let root = tempfile::tempdir().expect("tmp");
    let gen_args = [
        "--events",
        "30000",
        "--keys",
        "300",
        "--minutes",
        "60",
        "--seed",
        "7",
    ];
    let mut p = vec!["--partitions", "4"];
    p.extend_from_slice(&gen_args);
    produce(&broker.addr(), "clicks", &p);

    let kdir = root.path().join("kafka");
    std::fs::create_dir_all(&kdir).expect("dir");
    let meta_view = "
CREATE FEATURE VIEW meta KEY user_id WITH (online = false, offline = 'lake') AS
    SELECT user_id, k, part, off, kts FROM clicks;";
    std::fs::write(
        kdir.join("p.sql"),
        kafka_pipeline(
            &broker.addr(),
            "clicks",
            "\n    k TEXT METADATA FROM 'key', part INT METADATA FROM 'partition', off BIGINT METADATA FROM 'offset', kts TIMESTAMP METADATA FROM 'timestamp',",
            "",
        ) + meta_view,
    )
    .expect("pipeline");
    catch_up(&kdir, &["--checkpoint-interval-ms", "200"]);

    let fdir = root.path().join("file");
    std::fs::create_dir_all(&fdir).expect("dir");
    let mut g = vec!["gen", "--out"];
    let events = fdir.join("events.jsonl").display().to_string();
    g.push(&events);
    g.extend_from_slice(&gen_args);
    assert!(sluice(&g).status.success());
    std::fs::write(
        fdir.join("p.sql"),
        "CREATE SOURCE clicks (user_id TEXT NOT NULL, item_id TEXT, price DOUBLE, ts TIMESTAMP NOT NULL,
    WATERMARK FOR ts AS ts - INTERVAL '5' SECOND) WITH (connector = 'file', path = 'events.jsonl');"
            .to_string()
            + VIEWS,
    )
    .expect("pipeline");
    catch_up(&fdir, &[]);

    // Four partitions end at another watermark than one file (in the same
    // slide): compare the closed windows, which do not depend on it.
    let closed = |d: &Path| {
        common::outcome_in(
            d,
            &["activity", "last_click"],
            &["activity", "last_click"],
            Some(sluice_engine::tiles::ReadMode::Closed),
        )
    };
    assert_same(&closed(&kdir), &closed(&fdir), "kafka vs file");

    // Metadata: key = user_id, 4 partitions, (partition, offset) unique.
    let (h, rows) = lake_rows(&kdir.join("lake"), "meta");
    assert!(h.ends_with("user_id | k | part | off | kts"), "{h}");
    assert_eq!(rows.len(), 30000);
    let mut seen = std::collections::HashSet::new();
    let mut parts = std::collections::HashSet::new();
    for r in &rows {
        let f: Vec<&str> = r.split(" | ").collect();
        assert_eq!(f[2], f[3], "message key is the user: {r}");
        assert!(f[6] != "NULL", "Kafka timestamp present: {r}");
        parts.insert(f[4].to_string());
        assert!(seen.insert((f[4].to_string(), f[5].to_string())), "{r}");
    }
    assert_eq!(parts.len(), 4, "events of all 4 partitions: {parts:?}");

    // The offsets were also reported to the consumer group (for lag tools).
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.addr())
        .set("group.id", "sluice-clicks")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..4 {
        tpl.add_partition("clicks", p);
    }
    let committed = c
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    let total: i64 = committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum();
    assert_eq!(total, 30000, "group offsets: {committed:?}");
}

fn spawn_run(dir: &Path, extra: &[&str]) -> Child {
    run_cmd(dir, extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn run")
}

/// `kill -9` of `sluice run` at random moments while a producer is still
/// writing, then a catch-up run: the lake, online store and dead letters
/// equal one uninterrupted run over the same topic.
#[test]
fn kill_nine_while_producing_is_exactly_once() {
    let broker = Broker::start();
    let root = tempfile::tempdir().expect("tmp");
    let addr = broker.addr();
    // The producer writes ~8 s of events (some malformed) into 3 partitions.
    let producer = common::spawn_produce(
        &addr,
        "clicks",
        &[
            "--partitions",
            "3",
            "--events",
            "40000",
            "--keys",
            "200",
            "--minutes",
            "60",
            "--rate",
            "5000",
            "--bad-every",
            "997",
        ],
    );
    let crashed = root.path().join("crashed");
    std::fs::create_dir_all(&crashed).expect("dir");
    std::fs::write(
        crashed.join("p.sql"),
        kafka_pipeline(&addr, "clicks", "", ""),
    )
    .expect("sql");
    // Wait for the topic to exist.
    std::thread::sleep(Duration::from_millis(1500));
    let mut seed = 0x5eed_u64;
    let mut kills = 0;
    while kills < 5 {
        let mut child = spawn_run(
            &crashed,
            &["--checkpoint-interval-ms", "50", "--batch-rows", "500"],
        );
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let ms = 700 + (seed >> 33) % 1200;
        std::thread::sleep(Duration::from_millis(ms));
        child.kill().expect("kill -9");
        child.wait().expect("wait");
        kills += 1;
    }
    {
        // The killed runs did commit checkpoints (the kills hit a working job).
        let state = crashed.join("state");
        let store = Store::open_read_only(&state).expect("state");
        let epoch = sluice_engine::checkpoint::Checkpoint::load(&store, &state)
            .expect("checkpoint")
            .map_or(0, |c| c.epoch);
        assert!(epoch > 5, "checkpoints before the last kill: {epoch}");
    }
    let pout = producer.wait_with_output().expect("producer");
    assert!(
        pout.status.success(),
        "producer: {}",
        String::from_utf8_lossy(&pout.stderr)
    );
    catch_up(&crashed, &["--checkpoint-interval-ms", "50"]);

    let clean = root.path().join("clean");
    std::fs::create_dir_all(&clean).expect("dir");
    std::fs::write(clean.join("p.sql"), kafka_pipeline(&addr, "clicks", "", "")).expect("sql");
    catch_up(&clean, &[]);

    let a = outcome(&crashed);
    let b = outcome(&clean);
    assert_eq!(b.dead.len(), 40000 / 997, "malformed records dead-lettered");
    assert_same(&a, &b, "after 5 kills");
}

/// A free loopback address for `--serve`.
fn loopback_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    format!("127.0.0.1:{port}")
}

fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (code, body)
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn metric(addr: &str, name: &str) -> Option<f64> {
    let (_, body) = http_get(addr, "/metrics");
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

/// The broker dies under a running pipeline: `/readyz` turns 503 and
/// `sluice_source_up` 0; once it is back the pipeline catches up with
/// nothing lost (same lake as a clean run).
#[test]
fn broker_outage_then_catch_up() {
    let mut broker = Broker::start();
    let addr = broker.addr();
    let root = tempfile::tempdir().expect("tmp");
    let common_args = ["--keys", "100", "--minutes", "30", "--of", "20000"];
    let mut a = vec!["--partitions", "2", "--events", "10000"];
    a.extend_from_slice(&common_args);
    produce(&addr, "clicks", &a);

    let dir = root.path().join("live");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("p.sql"), kafka_pipeline(&addr, "clicks", "", "")).expect("sql");
    let http = loopback_addr();
    let mut run = spawn_run(&dir, &["--serve", &http, "--checkpoint-interval-ms", "200"]);
    wait_for("10k events", 60, || {
        metric(&http, "sluice_events_in_total") == Some(10000.0)
    });
    assert_eq!(http_get(&http, "/readyz").0, 200);

    broker.stop();
    wait_for("readyz 503", 60, || http_get(&http, "/readyz").0 == 503);
    let (_, why) = http_get(&http, "/readyz");
    assert!(why.contains("clicks"), "readyz names the source: {why}");
    assert_eq!(metric(&http, "sluice_source_up"), Some(0.0));
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        run.try_wait().expect("status").is_none(),
        "pipeline kept running"
    );

    broker.restart();
    let mut a = vec!["--first", "10000", "--events", "10000"];
    a.extend_from_slice(&common_args);
    produce(&addr, "clicks", &a);
    wait_for("20k events after the outage", 120, || {
        metric(&http, "sluice_events_in_total") == Some(20000.0)
    });
    wait_for("readyz 200 again", 60, || {
        http_get(&http, "/readyz").0 == 200
    });
    assert_eq!(metric(&http, "sluice_source_up"), Some(1.0));
    // Stop it cleanly (SIGTERM), then compare with a clean catch-up run.
    let _ = Command::new("kill")
        .args(["-TERM", &run.id().to_string()])
        .status();
    let st = run.wait().expect("wait");
    assert!(st.success(), "clean shutdown: {st:?}");
    catch_up(&dir, &[]);

    let clean = root.path().join("clean");
    std::fs::create_dir_all(&clean).expect("dir");
    std::fs::write(clean.join("p.sql"), kafka_pipeline(&addr, "clicks", "", "")).expect("sql");
    catch_up(&clean, &[]);
    assert_same(&outcome(&dir), &outcome(&clean), "after a broker outage");
}

/// Wrong broker address, a missing topic and refused credentials end the
/// run with a message that says so, within seconds.
#[test]
fn startup_errors_are_clear() {
    let broker = Broker::start();
    let root = tempfile::tempdir().expect("tmp");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let cases = [
        (
            format!("127.0.0.1:{closed}"),
            "clicks",
            "cannot read topic metadata",
            "",
        ),
        (broker.addr(), "no_such_topic", "does not exist", ""),
        // SASL credentials the broker does not accept.
        (
            broker.addr(),
            "clicks",
            "Authentication",
            ", kafka.security.protocol = 'SASL_PLAINTEXT', kafka.sasl.mechanism = 'SCRAM-SHA-256', kafka.sasl.username = 'nobody', kafka.sasl.password = 'wrong'",
        ),
    ];
    for (i, (addr, topic, expect, options)) in cases.into_iter().enumerate() {
        let dir = root.path().join(format!("case{i}"));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("p.sql"), kafka_pipeline(&addr, topic, "", options)).expect("sql");
        let t = Instant::now();
        let out = run_cmd(&dir, &[]).output().expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{topic}: must fail");
        assert!(err.contains(expect), "{topic}: {err}");
        assert!(err.contains(topic) && err.contains(&addr), "{err}");
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    }
}

/// Key, payload and headers of a consumed record.
type TopicRecord = (Vec<u8>, Vec<u8>, Vec<(String, String)>);

fn read_topic(addr: &str, topic: &str, want: usize) -> Vec<TopicRecord> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", addr)
        .set("group.id", "test-reader")
        .create()
        .expect("consumer");
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
            .expect("tpl");
    }
    c.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < want && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|x| {
                            (
                                x.key.to_string(),
                                String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push((
                m.key().unwrap_or_default().to_vec(),
                m.payload().unwrap_or_default().to_vec(),
                headers,
            ));
        }
    }
    // Nothing beyond what was expected.
    std::thread::sleep(Duration::from_millis(500));
    while let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
        out.push((m.key().unwrap_or_default().to_vec(), Vec::new(), Vec::new()));
    }
    out
}

/// `dead_letter_topic` receives the bad records with headers naming source,
/// partition, offset and reason; `kafka_topic` receives every emitted row
/// keyed by the entity key.
#[test]
fn dead_letters_and_feature_updates_to_topics() {
    let broker = Broker::start();
    let addr = broker.addr();
    let root = tempfile::tempdir().expect("tmp");
    produce(
        &addr,
        "clicks",
        &[
            "--partitions",
            "2",
            "--events",
            "5000",
            "--keys",
            "50",
            "--minutes",
            "30",
            "--bad-every",
            "500",
        ],
    );
    let dir = root.path().join("p");
    std::fs::create_dir_all(&dir).expect("dir");
    let sql = format!(
        "CREATE SOURCE clicks (user_id TEXT NOT NULL, item_id TEXT, price DOUBLE, ts TIMESTAMP NOT NULL,
    WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)
  WITH (connector = 'kafka', topic = 'clicks', brokers = '{addr}', dead_letter_topic = 'clicks_dlq');
CREATE FEATURE VIEW activity KEY user_id WITH (offline = 'lake', kafka_topic = 'features') AS
    SELECT user_id, COUNT(*) AS n FROM clicks GROUP BY user_id, TUMBLE(ts, INTERVAL '5' MINUTE);"
    );
    std::fs::write(dir.join("p.sql"), sql).expect("sql");
    catch_up(&dir, &[]);
    // Then a record far behind both partitions' watermarks (restored from
    // the checkpoint): late for every window.
    {
        use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
        let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", &addr)
            .create()
            .expect("producer");
        let late = r#"{"user_id":"late","price":1,"ts":"2024-01-01T00:00:00Z"}"#;
        p.send(
            BaseRecord::<str, str>::to("clicks")
                .partition(0)
                .key("late")
                .payload(late),
        )
        .map_err(|(e, _)| e)
        .expect("send");
        p.flush(Duration::from_secs(10)).expect("flush");
    }
    catch_up(&dir, &[]);
    assert!(
        dead_letters(&dir.join("state")).is_empty(),
        "dead letters went to the topic, not the file"
    );
    let mut dlq = read_topic(&addr, "clicks_dlq", 11);
    assert_eq!(dlq.len(), 11, "5000 / 500 malformed records and one late");
    let late_at = dlq
        .iter()
        .position(|(_, _, h)| {
            h.iter()
                .any(|(k, v)| k == "sluice-kind" && v == "late_event")
        })
        .expect("the late record is in the dead-letter topic");
    let (_, payload, headers) = dlq.remove(late_at);
    assert!(String::from_utf8_lossy(&payload).contains("\"late\""));
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "sluice-reason" && v.contains("watermark")),
        "{headers:?}"
    );
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "sluice-partition" && v == "0")
    );
    for (_, payload, headers) in &dlq {
        let h: std::collections::HashMap<_, _> = headers.iter().cloned().collect();
        assert_eq!(h.get("sluice-source").map(String::as_str), Some("clicks"));
        assert_eq!(
            h.get("sluice-kind").map(String::as_str),
            Some("malformed_json")
        );
        assert!(
            h.get("sluice-partition")
                .is_some_and(|p| p == "0" || p == "1")
        );
        assert!(
            h.get("sluice-offset")
                .is_some_and(|o| o.parse::<u64>().is_ok())
        );
        assert!(h.get("sluice-reason").is_some_and(|r| r.contains("JSON")));
        assert!(String::from_utf8_lossy(payload).contains("not json"));
    }
    let (_, lake) = lake_rows(&dir.join("lake"), "activity");
    let updates = read_topic(&addr, "features", lake.len());
    assert_eq!(updates.len(), lake.len(), "one update per emitted row");
    for (key, payload, _) in &updates {
        let v: serde_json::Value = serde_json::from_slice(payload).expect("json");
        assert_eq!(v["view"], "activity");
        assert_eq!(v["key"].as_str().map(str::as_bytes), Some(key.as_slice()));
        assert!(v["features"]["n"].as_i64().is_some_and(|n| n > 0), "{v}");
    }
}

/// `--stop-at-end` ends at the offsets current when it starts even while a
/// producer keeps writing.
#[test]
fn stop_at_end_ends_while_a_producer_writes() {
    let broker = Broker::start();
    let addr = broker.addr();
    let root = tempfile::tempdir().expect("tmp");
    let mut producer = common::spawn_produce(
        &addr,
        "clicks",
        &["--events", "30000", "--keys", "50", "--rate", "2000"],
    );
    std::thread::sleep(Duration::from_secs(3));
    let dir = root.path().join("p");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("p.sql"), kafka_pipeline(&addr, "clicks", "", "")).expect("sql");
    let t = Instant::now();
    catch_up(&dir, &[]);
    let took = t.elapsed();
    let still_writing = producer.try_wait().expect("status").is_none();
    let _ = producer.kill();
    let _ = producer.wait();
    assert!(
        still_writing,
        "the run ended before the producer (after {took:?})"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
}

/// A Kafka source with an event archive, `kill -9` five times while a
/// producer writes and a reader logs served values: the archive holds every
/// accepted event exactly once (by partition and offset), and a training
/// set replayed from it equals every logged read.
#[test]
fn archive_under_kill_nine_replays_what_was_served() {
    let broker = Broker::start();
    let root = tempfile::tempdir().expect("tmp");
    let d = root.path();
    let addr = broker.addr();
    let mut producer = Some(common::spawn_produce(
        &addr,
        "clicks",
        &[
            "--partitions",
            "3",
            "--events",
            "30000",
            "--keys",
            "50",
            "--minutes",
            "60",
            "--rate",
            "4000",
            "--bad-every",
            "997",
        ],
    ));
    let sql = format!(
        "CREATE SOURCE clicks (user_id TEXT NOT NULL, item_id TEXT, price DOUBLE, ts TIMESTAMP NOT NULL,
            WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)
          WITH (connector = 'kafka', topic = 'clicks', brokers = '{addr}', format = 'json', archive = 'archive');
        CREATE FEATURE VIEW hop KEY user_id AS
            SELECT user_id, COUNT(*) AS n, SUM(price) AS spend FROM clicks
            GROUP BY user_id, HOP(ts, INTERVAL '1' MINUTE, INTERVAL '5' MINUTE);
        CREATE FEATURE VIEW tum KEY user_id AS
            SELECT user_id, COUNT(*) AS n, MAX(price) AS hi FROM clicks
            GROUP BY user_id, TUMBLE(ts, INTERVAL '2' MINUTE);"
    );
    std::fs::write(d.join("p.sql"), sql).expect("sql");
    std::thread::sleep(Duration::from_millis(1500));
    let mut served = Vec::new();
    let mut seed = 0x7a11_u64;
    for kill in 0..6 {
        let mut cmd = run_cmd(
            d,
            &["--checkpoint-interval-ms", "50", "--batch-rows", "300"],
        );
        cmd.args(["--serve", "127.0.0.1:0"]);
        if kill == 5 {
            cmd.arg("--stop-at-end");
        }
        let mut run = common::spawn_serving(cmd);
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let until = Instant::now() + Duration::from_millis(800 + (seed >> 33) % 1200);
        let done = &run.done;
        served.extend(common::log_reads(
            &run.addr,
            &["hop", "tum"],
            |k| format!("u{k:05}"),
            50,
            seed | 1,
            || {
                if kill == 5 {
                    done.try_recv().is_ok()
                } else {
                    Instant::now() >= until
                }
            },
        ));
        // The last run ends at the end of the topic; the others are killed.
        run.child.kill().expect("kill -9");
        run.child.wait().expect("wait");
        if kill == 4
            && let Some(p) = producer.take()
        {
            let pout = p.wait_with_output().expect("producer");
            assert!(
                pout.status.success(),
                "{}",
                String::from_utf8_lossy(&pout.stderr)
            );
        }
    }
    // Every accepted event once: 30,000 records less the malformed ones.
    let mut seen = std::collections::HashSet::new();
    let mut rows = 0usize;
    for f in common::parquet_files(&d.join("archive")) {
        for b in common::read_parquet(&f) {
            let p = b.column_by_name("_sluice_partition").expect("partition");
            let o = b.column_by_name("_sluice_offset").expect("offset");
            let p = arrow::compute::cast(p, &arrow::datatypes::DataType::Int64).expect("p");
            let p = p
                .as_any()
                .downcast_ref::<arrow::array::Int64Array>()
                .expect("p");
            let o = o
                .as_any()
                .downcast_ref::<arrow::array::Int64Array>()
                .expect("o");
            for i in 0..b.num_rows() {
                assert!(
                    seen.insert((p.value(i), o.value(i))),
                    "partition {} offset {} archived twice",
                    p.value(i),
                    o.value(i)
                );
                rows += 1;
            }
        }
    }
    assert_eq!(rows, 30000 - 30000 / 997, "accepted events in the archive");
    assert!(served.len() > 200, "{} reads logged", served.len());
    let mut spine = String::from("uid,ts\n");
    for s in &served {
        spine.push_str(&format!("{},{}\n", s.key, s.as_of));
    }
    std::fs::write(d.join("spine.csv"), spine).expect("spine");
    let out = d.join("train.parquet");
    let o = sluice(&[
        "training-set",
        &d.join("p.sql").display().to_string(),
        "--spine",
        &d.join("spine.csv").display().to_string(),
        "--features",
        "hop",
        "--features",
        "tum",
        "--key",
        "user_id=uid",
        "--time-column",
        "ts",
        "--out",
        &out.display().to_string(),
    ]);
    let log = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{log}");
    assert!(log.contains("event archive"), "{log}");
    let b = common::read_parquet(&out);
    let b = arrow::compute::concat_batches(&b[0].schema(), &b).expect("concat");
    let mut diffs = 0;
    for (view, features) in [("hop", ["n", "spend"]), ("tum", ["n", "hi"])] {
        for f in features {
            let col = common::f64s(&b, &format!("{view}__{f}"));
            for (r, s) in served.iter().enumerate().filter(|(_, s)| s.view == view) {
                let want = s.features[f].as_f64();
                let got = col[r];
                let same = match (want, got) {
                    (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * a.abs().max(1.0),
                    (a, b) => a.is_none() && b.is_none(),
                };
                if !same {
                    diffs += 1;
                    eprintln!(
                        "row {r} {view}__{f} at {}: served {want:?}, trained {got:?}",
                        s.as_of
                    );
                }
            }
        }
    }
    assert_eq!(diffs, 0, "of {} served reads\n{log}", served.len());
}

/// `name{view="view"}` from `/metrics`.
fn view_metric(addr: &str, name: &str, view: &str) -> Option<f64> {
    let (_, body) = http_get(addr, "/metrics");
    let prefix = format!("{name}{{view=\"{view}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse::<f64>().ok())
}

/// Live traffic, a stall, live traffic again: the freshness gauges follow
/// the wall clock, and `/readyz` names the view past its `freshness_slo`
/// while the producer is paused, and only that view.
#[test]
fn freshness_follows_a_stalling_stream() {
    let broker = Broker::start();
    let addr = broker.addr();
    let root = tempfile::tempdir().expect("tmp");
    let dir = root.path().join("live");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(
        dir.join("p.sql"),
        format!(
            "CREATE SOURCE clicks (user_id TEXT NOT NULL, item_id TEXT, price DOUBLE, ts TIMESTAMP NOT NULL,
    WATERMARK FOR ts AS ts)
  WITH (connector = 'kafka', topic = 'clicks', brokers = '{addr}', format = 'json');
CREATE FEATURE VIEW activity KEY user_id WITH (freshness_slo = '3 seconds') AS
    SELECT user_id, COUNT(*) AS n FROM clicks GROUP BY user_id, HOP(ts, INTERVAL '1' SECOND, INTERVAL '10' SECOND);
CREATE FEATURE VIEW spend KEY user_id AS
    SELECT user_id, SUM(price) AS spend FROM clicks GROUP BY user_id;"
        ),
    )
    .expect("sql");
    let live = |events: &str| {
        common::spawn_produce(
            &addr,
            "clicks",
            &[
                "--live", "--rate", "200", "--events", events, "--keys", "20",
            ],
        )
    };
    // The topic exists before the run starts (the producer would create it,
    // racing the run's start-up, which refuses a missing topic).
    sluice_connectors::kafka::ensure_topic(&addr, "clicks", 1, &Default::default()).expect("topic");
    // Traffic until the test stops it (a slow start still sees it flow).
    let mut p1 = live("0");
    let http = loopback_addr();
    let mut run = spawn_run(&dir, &["--serve", &http, "--checkpoint-interval-ms", "200"]);
    // Fresh while events flow: the watermark is within the SLO of now.
    let mut last = (0, String::new());
    let deadline = Instant::now() + Duration::from_secs(60);
    while last.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "not ready while producing: {last:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
        last = http_get(&http, "/readyz");
    }
    assert_eq!(
        view_metric(&http, "sluice_view_fresh", "activity"),
        Some(1.0)
    );
    let lag = view_metric(&http, "sluice_view_event_lag_seconds", "activity").expect("lag");
    assert!((0.0..3.0).contains(&lag), "lag while producing: {lag}");
    assert!(
        view_metric(&http, "sluice_view_fresh", "spend").is_none(),
        "no SLO, no gauge"
    );
    let newest = view_metric(&http, "sluice_view_newest_event_ms", "activity").expect("newest");
    let wm = view_metric(&http, "sluice_view_watermark_ms", "activity").expect("watermark");
    assert!(
        newest >= wm,
        "newest event {newest} before the watermark {wm}"
    );
    let age = metric(&http, "sluice_checkpoint_age_seconds").expect("checkpoint age");
    assert!(age < 2.0, "checkpoint age while running: {age}");

    // The producer stops: the lag grows past the SLO, /readyz names the view.
    assert!(
        p1.try_wait().expect("producer").is_none(),
        "the producer stopped early"
    );
    p1.kill().expect("stop the producer");
    let _ = p1.wait();
    wait_for("readyz 503 after the stall", 30, || {
        http_get(&http, "/readyz").0 == 503
    });
    let (_, why) = http_get(&http, "/readyz");
    assert!(
        why.contains("view activity: not fresh") && why.contains("freshness_slo 3s"),
        "{why}"
    );
    assert!(
        !why.contains("spend"),
        "a view without an SLO is never stale: {why}"
    );
    assert_eq!(
        view_metric(&http, "sluice_view_fresh", "activity"),
        Some(0.0)
    );
    let a = view_metric(&http, "sluice_view_event_lag_seconds", "activity").expect("lag");
    std::thread::sleep(Duration::from_millis(1500));
    let b = view_metric(&http, "sluice_view_event_lag_seconds", "activity").expect("lag");
    assert!(
        a > 3.0 && b >= a + 1.0,
        "lag grows while stalled: {a} then {b}"
    );
    // Checkpoints go on while stalled (the age stays small).
    let age = metric(&http, "sluice_checkpoint_age_seconds").expect("checkpoint age");
    assert!(age < 2.0, "checkpoint age while stalled: {age}");

    // Traffic again: fresh and ready again.
    let p2 = live("600");
    wait_for("ready again", 30, || http_get(&http, "/readyz").0 == 200);
    assert_eq!(
        view_metric(&http, "sluice_view_fresh", "activity"),
        Some(1.0)
    );
    let out = p2.wait_with_output().expect("producer");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = run.kill();
    let _ = run.wait();
}
