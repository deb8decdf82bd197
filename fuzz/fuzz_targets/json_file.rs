//! Any bytes as a JSON-lines file read by `sluice run`'s file source: every
//! line becomes a row or a dead letter, and the source never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_engine::{Poll, Source};

const PIPELINE: &str = "CREATE SOURCE s (user_id TEXT NOT NULL, price DOUBLE, tags FLOAT[2], ts TIMESTAMP NOT NULL, WATERMARK FOR ts AS ts) WITH (connector = 'file', path = 'in.jsonl', max_record_bytes = '200');\nCREATE FEATURE VIEW v KEY user_id AS SELECT user_id, COUNT(*) AS n FROM s GROUP BY user_id;";

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("in.jsonl"), data).expect("write input");
    let plan = sluice_sql::plan_pipeline("p.sql", PIPELINE, dir.path()).expect("plans");
    let mut src = sluice_connectors::JsonFileSource::new(&plan.sources[0]).expect("source");
    src.seek(None).expect("open");
    let lines = data.split(|b| *b == b'\n').filter(|l| !l.iter().all(u8::is_ascii_whitespace)).count();
    let mut seen = 0;
    loop {
        match src.poll(7).expect("poll") {
            Poll::Data { batch, rejected } => {
                seen += rejected.len() + batch.map(|b| b.batch.num_rows()).unwrap_or(0);
            }
            Poll::Idle => {}
            Poll::End => break,
        }
    }
    assert_eq!(seen, lines, "every non-blank line is a row or a dead letter");
});
