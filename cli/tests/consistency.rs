//! The streaming output of `sluice run` on a file equals what DataFusion
//! computes in batch over the same events for the same windows.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Int64Type, Schema, TimeUnit};
use common::{parquet_files, read_parquet, sluice};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;

const FEATURES: &str = "COUNT(*) AS n, SUM(price) AS spend, AVG(price) AS avg_price, MIN(price) AS lo, MAX(price) AS hi, STDDEV(price) AS sd, APPROX_DISTINCT(item_id) AS items";

type Windows = BTreeMap<(i64, String), Vec<Option<f64>>>;

/// (window_start ms, key) → feature values as f64, from batches whose first
/// columns are window_start and user_id followed by the features.
fn collect(
    batches: &[RecordBatch],
    ws_col: usize,
    key_col: usize,
    first_feature: usize,
    out: &mut Windows,
) {
    for b in batches {
        let ws = cast(
            b.column(ws_col),
            &DataType::Timestamp(TimeUnit::Millisecond, None),
        )
        .expect("cast ws");
        let ws = cast(&ws, &DataType::Int64).expect("ws as int");
        let ws = ws.as_primitive::<Int64Type>();
        let keys = cast(b.column(key_col), &DataType::Utf8).expect("key");
        let keys = keys.as_string::<i32>();
        let feats: Vec<_> = (first_feature..b.num_columns())
            .map(|i| cast(b.column(i), &DataType::Float64).expect("feature as f64"))
            .collect();
        for r in 0..b.num_rows() {
            let vals = feats
                .iter()
                .map(|f| {
                    f.is_valid(r)
                        .then(|| f.as_primitive::<arrow::datatypes::Float64Type>().value(r))
                })
                .collect();
            let prev = out.insert((ws.value(r), keys.value(r).to_string()), vals);
            assert!(
                prev.is_none(),
                "window emitted twice: {} {}",
                ws.value(r),
                keys.value(r)
            );
        }
    }
}

fn close(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0),
        _ => false,
    }
}

fn events_batches(path: &std::path::Path) -> (Arc<Schema>, Vec<RecordBatch>) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("user_id", DataType::Utf8, false),
        Field::new("item_id", DataType::Utf8, true),
        Field::new("price", DataType::Float64, true),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            false,
        ),
    ]));
    let f = std::io::BufReader::new(std::fs::File::open(path).expect("events"));
    let r = arrow::json::ReaderBuilder::new(Arc::clone(&schema))
        .build(f)
        .expect("json reader");
    (schema, r.map(|b| b.expect("decode")).collect())
}

#[test]
fn streaming_equals_batch() {
    let dir = tempfile::tempdir().expect("tmp");
    let events = dir.path().join("events.jsonl");
    let out = sluice(&[
        "gen",
        "--events",
        "30000",
        "--keys",
        "40",
        "--minutes",
        "120",
        "--seed",
        "7",
        "--out",
        &events.display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pipeline = dir.path().join("p.sql");
    let sql = format!(
        "CREATE SOURCE clicks (user_id TEXT NOT NULL, item_id TEXT, price DOUBLE, ts TIMESTAMP NOT NULL,
            WATERMARK FOR ts AS ts - INTERVAL '5' SECOND) WITH (connector = 'file', path = 'events.jsonl');
         CREATE FEATURE VIEW hop KEY user_id WITH (offline = 'lake') AS
            SELECT user_id, {FEATURES} FROM clicks WHERE price >= 0
            GROUP BY user_id, HOP(ts, INTERVAL '5' MINUTE, INTERVAL '15' MINUTE);
         CREATE FEATURE VIEW tumble KEY user_id WITH (offline = 'lake') AS
            SELECT user_id, {FEATURES} FROM clicks
            GROUP BY user_id, TUMBLE(ts, INTERVAL '10' MINUTE);"
    );
    std::fs::write(&pipeline, sql).expect("write pipeline");
    let state = dir.path().join("state");
    let out = sluice(&[
        "run",
        &pipeline.display().to_string(),
        "--state-dir",
        &state.display().to_string(),
        "--batch-rows",
        "1000",
        "--checkpoint-interval-ms",
        "20",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        common::dead_letters(&state).is_empty(),
        "generated events are never late"
    );

    let (schema, batches) = events_batches(&events);
    let max_ts = batches
        .iter()
        .flat_map(|b| {
            b.column(3)
                .as_primitive::<arrow::datatypes::TimestampMillisecondType>()
                .values()
                .to_vec()
        })
        .max()
        .expect("events");
    let watermark = max_ts - 5_000;
    let ctx = SessionContext::new();
    ctx.register_table(
        "clicks",
        Arc::new(MemTable::try_new(schema, vec![batches]).expect("memtable")),
    )
    .expect("register");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");

    for (view, slide_min, size_min, filter) in
        [("hop", 5, 15, "WHERE price >= 0"), ("tumble", 10, 10, "")]
    {
        let offsets: Vec<String> = (0..size_min / slide_min)
            .map(|k| format!("(INTERVAL '{} minutes')", k * slide_min))
            .collect();
        let q = format!(
            "SELECT ws, user_id, {FEATURES} FROM (
                SELECT *, date_bin(INTERVAL '{slide_min} minutes', ts) - off AS ws
                FROM clicks CROSS JOIN (VALUES {}) AS o(off) {filter}
             ) GROUP BY ws, user_id",
            offsets.join(", ")
        );
        let batch_out = rt
            .block_on(async { ctx.sql(&q).await?.collect().await })
            .expect("batch query");
        let mut expected = Windows::new();
        collect(&batch_out, 0, 1, 2, &mut expected);
        // Only windows the watermark has closed are emitted by the stream.
        let size_ms = size_min * 60_000;
        expected.retain(|(ws, _), _| ws + size_ms <= watermark);

        let mut actual = Windows::new();
        for f in parquet_files(&dir.path().join("lake").join(view)) {
            collect(&read_parquet(&f), 0, 2, 3, &mut actual);
        }
        assert!(
            expected.len() >= 400,
            "{view}: the workload should close many windows, got {}",
            expected.len()
        );
        assert_eq!(
            actual.len(),
            expected.len(),
            "{view}: number of (window, key) rows"
        );
        for (k, want) in &expected {
            let got = actual
                .get(k)
                .unwrap_or_else(|| panic!("{view}: missing window {k:?}"));
            assert!(
                want.iter().zip(got).all(|(a, b)| close(*a, *b)),
                "{view}: window {k:?}\nbatch:  {want:?}\nstream: {got:?}"
            );
        }
    }
}
