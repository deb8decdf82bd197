//! Criterion micro-benchmarks of the kernels the whole-system benchmarks
//! spend their time in: merging the panes of a hopping window, reading a
//! key from the online store, decoding JSON records. Inputs come from
//! seeded generators; run by hand (`cargo bench -p sluice-benchmarks`),
//! with `-- --save-baseline NAME` / `-- --baseline NAME` to compare commits.

// `criterion_group!` generates an undocumented public function.
#![allow(missing_docs)]

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray,
    UInt32Array,
};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use sluice_connectors::JsonFileSource;
use sluice_engine::online::read_feature;
use sluice_engine::store::{Commit, Store};
use sluice_engine::view::ViewOp;
use sluice_engine::{Poll, Rows, Source};

const PIPELINE: &str = "CREATE SOURCE clicks (user_id TEXT NOT NULL, item_id TEXT, price DOUBLE, ts TIMESTAMP NOT NULL,
    WATERMARK FOR ts AS ts - INTERVAL '5' SECOND) WITH (connector = 'file', path = 'events.jsonl');
CREATE FEATURE VIEW user_activity KEY user_id AS
SELECT user_id, COUNT(*) AS clicks_1h, SUM(price) AS spend_1h, AVG(price) AS avg_price_1h,
       APPROX_DISTINCT(item_id) AS distinct_items_1h
FROM clicks GROUP BY user_id, HOP(ts, INTERVAL '5' MINUTE, INTERVAL '1' HOUR);";

const SLIDE_MS: i64 = 300_000;
const KEYS: usize = 10_000;
const PANES: i64 = 12;

/// xorshift64*: the same inputs every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// One event per key in each of `PANES` consecutive slides.
fn pane_rows() -> Rows {
    let mut rng = Rng(42);
    let (mut users, mut items, mut prices, mut ts) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for p in 0..PANES {
        for k in 0..KEYS {
            users.push(format!("u{k:05}"));
            items.push(format!("i{}", rng.below(1000)));
            prices.push(rng.below(10_000) as f64 / 100.0);
            ts.push(p * SLIDE_MS + rng.below(SLIDE_MS as u64) as i64);
        }
    }
    let n = ts.len();
    let plan = sluice_sql::plan_pipeline("bench.sql", PIPELINE, Path::new(".")).expect("plans");
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(users)),
        Arc::new(StringArray::from(items)),
        Arc::new(Float64Array::from(prices)),
        Arc::new(TimestampMillisecondArray::from(ts.clone())),
    ];
    Rows {
        batch: RecordBatch::try_new(Arc::clone(&plan.sources[0].schema), cols).expect("batch"),
        ts: Some(Int64Array::from(ts)),
        wm: Some(Int64Array::from(vec![i64::MIN; n])),
        rowid: UInt32Array::from_iter_values(0..n as u32),
    }
}

fn pane_merge(c: &mut Criterion) {
    let plan = sluice_sql::plan_pipeline("bench.sql", PIPELINE, Path::new(".")).expect("plans");
    let rows = pane_rows();
    c.bench_function("pane_merge/hop_5m_1h/10k_keys_x_12_panes", |b| {
        b.iter_batched(
            || {
                let mut op = ViewOp::new(&plan.views[0]).expect("view");
                let (staged, _) = op
                    .stage()
                    .expect("stages")
                    .stage(rows.clone())
                    .expect("staged");
                op.push(staged).expect("push");
                op
            },
            // Closes the window holding all 12 panes (and the 11 before it).
            |mut op| op.advance(black_box(PANES * SLIDE_MS)).expect("advance"),
            BatchSize::LargeInput,
        )
    });
}

fn online_read(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let view = "user_activity".to_string();
    let store = Store::open(dir.path(), std::slice::from_ref(&view)).expect("store");
    let rows: Vec<(String, Vec<u8>)> = (0..100_000)
        .map(|k| {
            let row = serde_json::json!({
                "window_end": 3_600_000, "valid_until": 3_900_000,
                "features": {"clicks_1h": k % 50, "spend_1h": k as f64 * 0.5, "avg_price_1h": 12.5, "distinct_items_1h": 7},
            });
            (format!("u{k:06}"), serde_json::to_vec(&row).expect("json"))
        })
        .collect();
    store
        .commit(Commit {
            online: vec![(view.clone(), rows)],
            ..Default::default()
        })
        .expect("commit");
    store.flush().expect("flush");
    let plan = sluice_sql::plan_pipeline("bench.sql", PIPELINE, Path::new(".")).expect("plans");
    let meta = ViewOp::new(&plan.views[0])
        .expect("view")
        .meta()
        .expect("meta");
    let mut rng = Rng(7);
    c.bench_function("online_read/100k_keys/valid_row", |b| {
        b.iter(|| {
            let key = format!("u{:06}", rng.below(100_000));
            black_box(read_feature(&store, &meta, None, &key, Some(3_700_000), None).expect("read"))
        })
    });
    c.bench_function("online_read/100k_keys/expired_row", |b| {
        b.iter(|| {
            let key = format!("u{:06}", rng.below(100_000));
            black_box(read_feature(&store, &meta, None, &key, Some(9_000_000), None).expect("read"))
        })
    });
}

fn json_decode(c: &mut Criterion) {
    let mut rng = Rng(3);
    let lines: Vec<String> = (0..8192)
        .map(|i| {
            format!(
                r#"{{"user_id": "u{:05}", "item_id": "i{}", "price": {}.{:02}, "ts": "2024-01-01T{:02}:{:02}:{:02}Z"}}"#,
                rng.below(100_000),
                rng.below(1000),
                rng.below(100),
                rng.below(100),
                i / 3600 % 24,
                i / 60 % 60,
                i % 60
            )
        })
        .collect();
    for (name, bad) in [("8192_records", false), ("8192_records_one_bad", true)] {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut text = lines.clone();
        if bad {
            text[4096] = r#"{"user_id": "u1", "price": "not a number", "ts": 1}"#.into();
        }
        std::fs::write(dir.path().join("events.jsonl"), text.join("\n") + "\n").expect("write");
        let plan = sluice_sql::plan_pipeline("bench.sql", PIPELINE, dir.path()).expect("plans");
        let mut src = JsonFileSource::new(&plan.sources[0]).expect("source");
        c.bench_function(&format!("json_decode/{name}"), |b| {
            b.iter(|| {
                src.seek(None).expect("seek");
                let mut rows = 0;
                loop {
                    match src.poll(8192).expect("poll") {
                        Poll::Data { batch, rejected } => {
                            rows += rejected.len() + batch.map(|b| b.batch.num_rows()).unwrap_or(0)
                        }
                        Poll::Idle => {}
                        Poll::End => break,
                    }
                }
                assert_eq!(rows, 8192);
            })
        });
    }
}

criterion_group!(kernels, pane_merge, online_read, json_decode);
criterion_main!(kernels);
