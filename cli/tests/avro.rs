//! Avro on Kafka against the real broker: records encoded by fastavro
//! (Confluent framing, two writer schemas resolved to the reader schema)
//! leave the same lake and online store as the same events sent as JSON;
//! records with an unknown schema id, cut short or unframed are
//! dead-lettered with the reason; schema mistakes are pipeline errors at
//! the option.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Broker, online_match, rows_match, sluice};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

const VIEWS: &str = "
CREATE FEATURE VIEW activity KEY user_id WITH (online = true, offline = 'lake') AS
    SELECT user_id, COUNT(*) AS n, SUM(price) AS spend, APPROX_DISTINCT(item_id) AS items
    FROM clicks GROUP BY user_id, HOP(ts, INTERVAL '1' MINUTE, INTERVAL '5' MINUTE);
CREATE FEATURE VIEW last_click KEY user_id WITH (online = true, offline = 'lake') AS
    SELECT user_id, item_id, price, ts FROM clicks;
";

fn pipeline(dir: &Path, broker: &str, topic: &str, format: &str) -> PathBuf {
    let p = dir.join("p.sql");
    std::fs::write(
        &p,
        format!(
            "CREATE SOURCE clicks (user_id TEXT NOT NULL, item_id TEXT, price DOUBLE, ts TIMESTAMP NOT NULL,
    WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)
  WITH (connector = 'kafka', topic = '{topic}', brokers = '{broker}', {format});
{VIEWS}"
        ),
    )
    .expect("pipeline");
    p
}

/// 3000 clicks by 50 users, one every 200 ms; every 7th item and every
/// 11th price NULL.
fn events() -> Vec<String> {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..3000i64)
        .map(|i| {
            let item = if i % 7 == 0 {
                "null".to_string()
            } else {
                format!("\"i{}\"", next() % 90)
            };
            let price = if i % 11 == 0 {
                "null".to_string()
            } else {
                format!("{}", (next() % 100_000) as f64 / 100.0)
            };
            format!(
                r#"{{"user_id":"u{}","item_id":{item},"price":{price},"ts":"{}"}}"#,
                next() % 50,
                sluice_connectors::rfc3339_ms(1_704_067_200_000 + i * 200)
            )
        })
        .collect()
}

fn send(broker: &str, topic: &str, payloads: &[Vec<u8>]) {
    sluice_connectors::kafka::ensure_topic(broker, topic, 1, &BTreeMap::new()).expect("topic");
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", broker)
        .set("acks", "all")
        .create()
        .expect("producer");
    for pl in payloads {
        let mut record = BaseRecord::<str, [u8]>::to(topic).payload(pl.as_slice());
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
    p.flush(Duration::from_secs(30)).expect("flush");
}

fn unhex(line: &str) -> Vec<u8> {
    (0..line.len() / 2)
        .map(|i| u8::from_str_radix(&line[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

fn python_with_fastavro() -> Option<PathBuf> {
    [
        std::env::var_os("SLUICE_PYTHON").map(PathBuf::from),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/sluice/venv/bin/python")),
    ]
    .into_iter()
    .flatten()
    .find(|p| {
        Command::new(p)
            .args(["-c", "import fastavro"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata")
}

fn catch_up(p: &Path, state: &Path) {
    let o = sluice(&[
        "run",
        &p.display().to_string(),
        "--state-dir",
        &state.display().to_string(),
        "--stop-at-end",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn avro_records_equal_the_same_events_as_json() {
    let Some(py) = python_with_fastavro() else {
        if std::env::var_os("SLUICE_SKIP_AVRO").is_some() {
            eprintln!("SLUICE_SKIP_AVRO set: skipped");
            return;
        }
        panic!("no Python with fastavro (set SLUICE_PYTHON; SLUICE_SKIP_AVRO=1 skips)");
    };
    let root = tempfile::tempdir().expect("tempdir");
    let lines = events();
    let jsonl = root.path().join("events.jsonl");
    let mut text = String::new();
    for l in &lines {
        writeln!(text, "{l}").expect("write");
    }
    std::fs::write(&jsonl, text).expect("events");
    let hex = root.path().join("avro.hex");
    let o = Command::new(py)
        .arg(testdata().join("avro_encode.py"))
        .args([&jsonl, &hex])
        .arg(testdata().join("avro/clicks_v1.avsc"))
        .arg(testdata().join("avro/clicks.avsc"))
        .output()
        .expect("python");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let avro: Vec<Vec<u8>> = std::fs::read_to_string(&hex)
        .expect("hex")
        .lines()
        .map(unhex)
        .collect();
    assert_eq!(avro.len(), lines.len() + 3);

    let broker = Broker::start();
    let addr = broker.addr();
    send(
        &addr,
        "json",
        &lines
            .iter()
            .map(|l| l.as_bytes().to_vec())
            .collect::<Vec<_>>(),
    );
    send(&addr, "avro", &avro);

    let j = root.path().join("json");
    std::fs::create_dir_all(&j).expect("mkdir");
    let pj = pipeline(&j, &addr, "json", "format = 'json'");
    catch_up(&pj, &j.join("state"));

    let a = root.path().join("avro");
    std::fs::create_dir_all(&a).expect("mkdir");
    for f in ["clicks.avsc", "clicks_v1.avsc"] {
        std::fs::copy(testdata().join("avro").join(f), a.join(f)).expect("copy schema");
    }
    let pa = pipeline(
        &a,
        &addr,
        "avro",
        "format = 'avro', schema = 'clicks.avsc', schema.1 = 'clicks_v1.avsc', schema.2 = 'clicks.avsc'",
    );
    catch_up(&pa, &a.join("state"));

    let views = ["activity", "last_click"];
    let (x, y) = (
        common::outcome(&j, &views, &views),
        common::outcome(&a, &views, &views),
    );
    for (v, ((ha, ra), (hb, rb))) in views.iter().zip(x.lake.iter().zip(&y.lake)) {
        assert!(!ra.is_empty(), "no lake rows for {v}");
        assert_eq!(ha, hb, "lake columns of {v}");
        assert!(
            rows_match(ra, rb),
            "lake rows of {v} differ ({} vs {})",
            ra.len(),
            rb.len()
        );
    }
    for ((v, oa), (_, ob)) in x.online.iter().zip(&y.online) {
        assert!(!oa.is_empty(), "no online rows for {v}");
        assert!(online_match(oa, ob), "online rows of {v} differ");
    }
    assert!(x.dead.is_empty(), "{:?}", x.dead);
    let reasons: Vec<(String, String)> = y
        .dead
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap_or_default().to_string(),
                d["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(
        reasons.iter().all(|(k, _)| k == "malformed_record"),
        "{reasons:?}"
    );
    assert!(reasons[0].1.contains("schema id 99"), "{reasons:?}");
    assert!(reasons[1].1.contains("ends early"), "{reasons:?}");
    assert!(reasons[2].1.contains("Confluent framing"), "{reasons:?}");
}

#[test]
fn avro_schema_mistakes_are_pipeline_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    for f in ["clicks.avsc", "clicks_v1.avsc"] {
        std::fs::copy(testdata().join("avro").join(f), d.join(f)).expect("copy schema");
    }
    // A writer schema without `user_id`, which the reader needs (no default).
    std::fs::write(
        d.join("no_user.avsc"),
        r#"{"type":"record","name":"Click","namespace":"sluice.test","fields":[{"name":"ts","type":"long"}]}"#,
    )
    .expect("schema");
    let cases = [
        ("format = 'avro'", "needs a `schema` option"),
        ("format = 'avro', schema = 'missing.avsc'", "missing.avsc"),
        (
            "format = 'avro', schema = 'clicks.avsc', schema.x = 'clicks_v1.avsc'",
            "is a schema id",
        ),
        (
            "format = 'avro', schema = 'clicks.avsc', schema.3 = 'no_user.avsc'",
            "does not resolve",
        ),
        (
            "format = 'avro', schema = 'clicks.avsc', framing = 'none', schema.1 = 'clicks_v1.avsc'",
            "framing = 'none'",
        ),
        (
            "format = 'json', schema = 'clicks.avsc'",
            "applies to format = 'avro'",
        ),
        (
            "format = 'avro', schema = 'clicks.avsc', framing = 'magic'",
            "framing",
        ),
    ];
    for (opts, want) in cases {
        let p = pipeline(d, "127.0.0.1:1", "t", opts);
        let o = sluice(&["explain", &p.display().to_string()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{opts}: accepted");
        assert!(err.contains(want), "{opts}: {err}");
        assert!(err.contains("p.sql:"), "{opts}: no position in {err}");
    }
    // A declared type the Avro field cannot fill.
    let p = d.join("p.sql");
    std::fs::write(
        &p,
        "CREATE SOURCE clicks (user_id TEXT NOT NULL, price TEXT, ts TIMESTAMP NOT NULL)
  WITH (connector = 'kafka', topic = 't', brokers = '127.0.0.1:1', format = 'avro', schema = 'clicks.avsc');
CREATE FEATURE VIEW v KEY user_id AS SELECT user_id, price FROM clicks;",
    )
    .expect("pipeline");
    let o = sluice(&["explain", &p.display().to_string()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("column `price` is TEXT in the pipeline but Float64"),
        "{err}"
    );
}
