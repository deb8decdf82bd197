//! Avro and Protobuf on Kafka against the real broker: records encoded by
//! fastavro, and by Google's protobuf runtime from protoc-compiled files
//! (Confluent framing, two writer schemas read with the reader schema),
//! leave the same lake and online store as the same events sent as JSON;
//! records with an unknown schema id, the wrong message, cut short or
//! unframed are dead-lettered with the reason; schema mistakes are
//! pipeline errors at the option.

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

/// A Python that imports `module`, from `SLUICE_PYTHON` or the CI venv.
fn python_with(module: &str) -> Option<PathBuf> {
    [
        std::env::var_os("SLUICE_PYTHON").map(PathBuf::from),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/sluice/venv/bin/python")),
    ]
    .into_iter()
    .flatten()
    .find(|p| {
        Command::new(p)
            .args(["-c", &format!("import {module}")])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn testdata() -> PathBuf {
    common::repo_root().join("testdata")
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

/// One encoded format checked against JSON.
struct Case {
    /// The Python module the encoder needs.
    module: &'static str,
    /// The encoder script in testdata/.
    script: &'static str,
    /// The format's name (the topic and folder of the run).
    folder: &'static str,
    /// The folder of the schema files, from the repository's root.
    schemas: &'static str,
    /// The two writer schemas given to the script (ids 1 and 2).
    files: [&'static str; 2],
    /// The source's format options.
    options: &'static str,
    /// Part of each dead letter's reason, in order (the script's bad
    /// records after the events).
    reasons: &'static [&'static str],
}

fn encoded_records_equal_json(case: &Case) {
    let Some(py) = python_with(case.module) else {
        if std::env::var_os("SLUICE_SKIP_FORMATS").is_some() {
            eprintln!("SLUICE_SKIP_FORMATS set: skipped");
            return;
        }
        panic!(
            "no Python with {} (set SLUICE_PYTHON; SLUICE_SKIP_FORMATS=1 skips)",
            case.module
        );
    };
    let root = tempfile::tempdir().expect("tempdir");
    let lines = events();
    let jsonl = root.path().join("events.jsonl");
    let mut text = String::new();
    for l in &lines {
        writeln!(text, "{l}").expect("write");
    }
    std::fs::write(&jsonl, text).expect("events");
    let hex = root.path().join("records.hex");
    let schemas = testdata().join("..").join(case.schemas);
    let o = Command::new(py)
        .arg(testdata().join(case.script))
        .args([&jsonl, &hex])
        .args(case.files.map(|f| schemas.join(f)))
        .output()
        .expect("python");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let encoded: Vec<Vec<u8>> = std::fs::read_to_string(&hex)
        .expect("hex")
        .lines()
        .map(unhex)
        .collect();
    assert_eq!(encoded.len(), lines.len() + case.reasons.len());

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
    send(&addr, case.folder, &encoded);

    let j = root.path().join("json");
    std::fs::create_dir_all(&j).expect("mkdir");
    let pj = pipeline(&j, &addr, "json", "format = 'json'");
    catch_up(&pj, &j.join("state"));

    let a = root.path().join(case.folder);
    std::fs::create_dir_all(&a).expect("mkdir");
    for f in case.files {
        std::fs::copy(schemas.join(f), a.join(f)).expect("copy schema");
    }
    let pa = pipeline(&a, &addr, case.folder, case.options);
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
    assert_eq!(reasons.len(), case.reasons.len(), "{reasons:?}");
    for ((kind, reason), want) in reasons.iter().zip(case.reasons) {
        assert_eq!(kind, "malformed_record", "{reasons:?}");
        assert!(reason.contains(want), "`{want}` not in {reasons:?}");
    }
}

#[test]
fn avro_records_equal_the_same_events_as_json() {
    encoded_records_equal_json(&Case {
        module: "fastavro",
        script: "avro_encode.py",
        folder: "avro",
        schemas: "testdata/avro",
        files: ["clicks_v1.avsc", "clicks.avsc"],
        options: "format = 'avro', schema = 'clicks.avsc', schema.1 = 'clicks_v1.avsc', schema.2 = 'clicks.avsc'",
        reasons: &["schema id 99", "ends early", "Confluent framing"],
    });
}

#[test]
fn protobuf_records_equal_the_same_events_as_json() {
    encoded_records_equal_json(&Case {
        module: "google.protobuf, grpc_tools.protoc",
        script: "protobuf_encode.py",
        folder: "protobuf",
        // The example's files: the example is what the test reads.
        schemas: "examples/protobuf",
        files: ["clicks_v1.proto", "clicks.proto"],
        options: "format = 'protobuf', schema = 'clicks.proto', message = 'Click', schema.1 = 'clicks_v1.proto', schema.2 = 'clicks.proto'",
        reasons: &[
            "schema id 99",
            "name sluice.test.Header in",
            "does not decode as sluice.test.Click",
            "Confluent framing",
        ],
    });
}

/// `sluice explain` refuses each source option string of `cases` with an
/// error holding its text and a position in the pipeline file.
fn refused_at_the_option(d: &Path, cases: &[(&str, &str)]) {
    for (opts, want) in cases {
        let p = pipeline(d, "127.0.0.1:1", "t", opts);
        let o = sluice(&["explain", &p.display().to_string()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{opts}: accepted");
        assert!(err.contains(want), "{opts}: {err}");
        assert!(err.contains("p.sql:"), "{opts}: no position in {err}");
    }
}

/// `sluice explain` of a source of these `columns` and options: its error.
fn explain_error(d: &Path, columns: &str, options: &str) -> String {
    let p = d.join("p.sql");
    std::fs::write(
        &p,
        format!(
            "CREATE SOURCE clicks ({columns})
  WITH (connector = 'kafka', topic = 't', brokers = '127.0.0.1:1', {options});
CREATE FEATURE VIEW v KEY user_id AS SELECT user_id, price FROM clicks;"
        ),
    )
    .expect("pipeline");
    let o = sluice(&["explain", &p.display().to_string()]);
    assert!(!o.status.success(), "{options}: accepted");
    String::from_utf8_lossy(&o.stderr).into_owned()
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
    refused_at_the_option(d, &cases);
    // A declared type the Avro field cannot fill.
    let err = explain_error(
        d,
        "user_id TEXT NOT NULL, price TEXT, ts TIMESTAMP NOT NULL",
        "format = 'avro', schema = 'clicks.avsc'",
    );
    assert!(
        err.contains("column `price` is TEXT in the pipeline but Float64"),
        "{err}"
    );
}

#[test]
fn protobuf_schema_mistakes_are_pipeline_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    for f in ["clicks.proto", "clicks_v1.proto"] {
        std::fs::copy(testdata().join("../examples/protobuf").join(f), d.join(f))
            .expect("copy schema");
    }
    // A writer whose field 3 is text, not a double.
    std::fs::write(
        d.join("text_price.proto"),
        "syntax = \"proto3\"; package sluice.test; message Click { string user_id = 1; string price = 3; }",
    )
    .expect("schema");
    std::fs::write(
        d.join("broken.proto"),
        "syntax = \"proto3\";\nmessage Click {\n  string user_id = 1\n}\n",
    )
    .expect("schema");
    let cases = [
        (
            "format = 'protobuf', message = 'Click'",
            "needs a `schema` option",
        ),
        (
            "format = 'protobuf', schema = 'clicks.proto'",
            "needs a `message` option",
        ),
        (
            "format = 'protobuf', schema = 'missing.proto', message = 'Click'",
            "missing.proto",
        ),
        (
            "format = 'protobuf', schema = 'clicks.proto', message = 'Clack'",
            "defines no message `Clack` (its messages: sluice.test.Click)",
        ),
        (
            "format = 'protobuf', schema = 'broken.proto', message = 'Click'",
            "broken.proto:4:1",
        ),
        (
            "format = 'protobuf', schema = 'clicks.proto', message = 'Click', schema.3 = 'text_price.proto'",
            "field 3 is `price` string",
        ),
        (
            "format = 'protobuf', schema = 'clicks.proto', message = 'Click', framing = 'none', schema.1 = 'clicks_v1.proto'",
            "framing = 'none'",
        ),
        (
            "format = 'avro', schema = 'clicks.proto', message = 'Click'",
            "`message` applies to format = 'protobuf'",
        ),
    ];
    refused_at_the_option(d, &cases);
    // A declared type the field cannot fill.
    let err = explain_error(
        d,
        "user_id TEXT NOT NULL, price TEXT, ts TIMESTAMP NOT NULL",
        "format = 'protobuf', schema = 'clicks.proto', message = 'Click'",
    );
    assert!(
        err.contains(
            "column `price` is TEXT in the pipeline but double in message sluice.test.Click"
        ),
        "{err}"
    );
}

/// `sluice produce --format avro|protobuf` and `--format json` write the
/// same clickstream; every field of it, read through each format's
/// schema, leaves the same lake and online store.
#[test]
fn produced_avro_and_protobuf_equal_produced_json() {
    let root = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start();
    let addr = broker.addr();
    let columns = "user_id TEXT NOT NULL, item_id TEXT, price DOUBLE, ts TIMESTAMP NOT NULL,
        session_id TEXT, page TEXT, device TEXT, referrer TEXT,
        WATERMARK FOR ts AS ts - INTERVAL '5' SECOND";
    let views = "
CREATE FEATURE VIEW pages KEY user_id WITH (online = true, offline = 'lake') AS
    SELECT user_id, COUNT(*) AS n, SUM(price) AS spend, APPROX_DISTINCT(page) AS pages,
           APPROX_DISTINCT(session_id) AS sessions
    FROM clicks GROUP BY user_id, HOP(ts, INTERVAL '1' MINUTE, INTERVAL '5' MINUTE);
CREATE FEATURE VIEW last_click KEY user_id WITH (online = true, offline = 'lake') AS
    SELECT user_id, item_id, price, ts, session_id, page, device, referrer FROM clicks;
";
    let mut outcomes = Vec::new();
    for (format, options) in [
        ("json", "format = 'json'".to_string()),
        (
            "avro",
            "format = 'avro', schema = 'clicks.schema'".to_string(),
        ),
        (
            "protobuf",
            "format = 'protobuf', schema = 'clicks.schema', message = 'Click'".to_string(),
        ),
    ] {
        let d = root.path().join(format);
        std::fs::create_dir_all(&d).expect("mkdir");
        let schema = d.join("clicks.schema");
        let schema_arg = schema.display().to_string();
        common::produce(
            &addr,
            &format!("produced-{format}"),
            &[
                "--events",
                "4000",
                "--keys",
                "40",
                "--minutes",
                "20",
                "--format",
                format,
                "--schema-id",
                "3",
                "--schema-out",
                &schema_arg,
            ],
        );
        let p = d.join("p.sql");
        std::fs::write(
            &p,
            format!(
                "CREATE SOURCE clicks ({columns}) WITH (connector = 'kafka', topic = 'produced-{format}', brokers = '{addr}', {options});
{views}"
            ),
        )
        .expect("pipeline");
        catch_up(&p, &d.join("state"));
        outcomes.push(common::outcome(
            &d,
            &["pages", "last_click"],
            &["pages", "last_click"],
        ));
    }
    let json = &outcomes[0];
    for (other, name) in outcomes[1..].iter().zip(["avro", "protobuf"]) {
        assert!(other.dead.is_empty(), "{name}: {:?}", other.dead);
        for ((ha, ra), (hb, rb)) in json.lake.iter().zip(&other.lake) {
            assert!(!ra.is_empty(), "no lake rows");
            assert_eq!(ha, hb, "{name}: lake columns");
            assert!(rows_match(ra, rb), "{name}: lake rows differ");
        }
        for ((v, oa), (_, ob)) in json.online.iter().zip(&other.online) {
            assert!(!oa.is_empty(), "no online rows for {v}");
            assert!(online_match(oa, ob), "{name}: online rows of {v} differ");
        }
    }
}
