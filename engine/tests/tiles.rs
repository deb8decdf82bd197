//! Fresh reads from tiles against a naive recomputation: random events
//! (several keys, disorder within the watermark delay, late events), random
//! checkpoints, and at each one every key read in every mode its window
//! offers, compared with DataFusion running the same aggregates over the raw
//! accepted events in the read's time bounds (and each read's age with the
//! newest of those events).

use std::collections::HashSet;
use std::sync::Arc;

use arrow::array::{
    Array, AsArray, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray,
    UInt32Array,
};
use arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema, UInt64Type};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::Value;
use sluice_engine::Rows;
use sluice_engine::replay::MemStore;
use sluice_engine::store::{Commit, StateStore, Store, TileWrites};
use sluice_engine::tiles::{FlushStats, ReadMode, TileLayout, TileReader, clock_key};
use sluice_engine::view::ViewOp;

const MIN: i64 = 60_000;
const DAY: i64 = 24 * 60 * MIN;
const KEYS: usize = 6;

#[derive(Clone, Debug)]
struct Event {
    key: String,
    x: Option<f64>,
    item: String,
    ts: i64,
}

fn pipeline(window: &str, delay_s: i64) -> String {
    format!(
        "CREATE SOURCE s (k TEXT NOT NULL, x DOUBLE, item TEXT, ts TIMESTAMP NOT NULL,
           WATERMARK FOR ts AS ts - INTERVAL '{delay_s}' SECOND)
         WITH (connector = 'file', path = 'x.jsonl');
         CREATE FEATURE VIEW v KEY k AS
         SELECT k, COUNT(*) AS n, SUM(x) AS s, AVG(x) AS a, MIN(x) AS lo, MAX(x) AS hi,
                APPROX_DISTINCT(item) AS d, LAST_VALUE(x ORDER BY ts) AS last
         FROM s GROUP BY k, {window};"
    )
}

const NAIVE: &str = "SELECT k, COUNT(*) AS n, SUM(x) AS s, AVG(x) AS a, MIN(x) AS lo, MAX(x) AS hi,
    APPROX_DISTINCT(item) AS d, LAST_VALUE(x ORDER BY ts) AS last FROM ev";

fn source_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("k", DataType::Utf8, false),
        Field::new("x", DataType::Float64, true),
        Field::new("item", DataType::Utf8, true),
        Field::new("ts", sluice_sql::TIMESTAMP_TYPE, false),
    ]))
}

fn rows(events: &[Event], wms: &[i64]) -> Rows {
    let ts: Vec<i64> = events.iter().map(|e| e.ts).collect();
    let batch = RecordBatch::try_new(
        source_schema(),
        vec![
            Arc::new(StringArray::from_iter_values(
                events.iter().map(|e| e.key.clone()),
            )),
            Arc::new(Float64Array::from(
                events.iter().map(|e| e.x).collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from_iter_values(
                events.iter().map(|e| e.item.clone()),
            )),
            Arc::new(TimestampMillisecondArray::from(ts.clone())),
        ],
    )
    .expect("batch");
    Rows {
        batch,
        ts: Some(Int64Array::from(ts)),
        wm: Some(Int64Array::from(wms.to_vec())),
        rowid: UInt32Array::from_iter_values(0..events.len() as u32),
    }
}

/// Random events: times advance by `step` on average, most within the
/// watermark delay of the newest, a few far behind it (late for every window).
fn events(rng: &mut StdRng, n: usize, step: i64, delay: i64, size: i64) -> Vec<Event> {
    let mut used = HashSet::new();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let base = i as i64 * step + 1_700_000_000_000;
        let mut ts = if rng.random_range(0..100) < 3 {
            base - size - delay - rng.random_range(0..size.max(1))
        } else {
            base - rng.random_range(0..delay + delay / 2 + 1)
        };
        while !used.insert(ts) {
            ts += 1;
        }
        out.push(Event {
            key: format!("k{}", rng.random_range(0..KEYS)),
            x: (rng.random_range(0..10) > 0).then(|| rng.random_range(0..100) as f64),
            item: format!("i{}", rng.random_range(0..30)),
            ts,
        });
    }
    out
}

/// A checkpoint at watermark `wm`: pending rows before it fold into tiles,
/// committed with the view's clock.
/// Folds rows into a view as the ingest stage does: stages, then the late
/// rule; returns the row ids (indexes into `rows`) of the late ones.
fn process(op: &mut ViewOp, rows: Rows) -> Vec<u32> {
    let stage = op.stage().expect("stages");
    let (staged, failed) = stage.stage(rows).expect("staged");
    assert!(failed.is_empty(), "{failed:?}");
    let late = stage.late_rows(&staged);
    let keep: arrow::array::BooleanArray = (0..staged.len())
        .map(|i| Some(!late.contains(&i)))
        .collect();
    let ids = late.iter().map(|i| staged.rowid.value(*i)).collect();
    op.push(staged.filter(&keep).expect("filter"))
        .expect("push");
    ids
}

fn checkpoint(op: &mut ViewOp, store: &dyn StateStore, wm: i64) -> FlushStats {
    let mut w = TileWrites::default();
    let st = op
        .tiles_mut()
        .expect("tiles")
        .flush(store, wm, &mut w)
        .expect("flush");
    store
        .commit(Commit {
            tiles: vec![("v".into(), w)],
            meta: vec![(clock_key("v"), wm.to_be_bytes().to_vec())],
            ..Commit::default()
        })
        .expect("commit");
    op.tiles_mut().expect("tiles").committed();
    st
}

struct Naive {
    ctx: SessionContext,
    rt: tokio::runtime::Runtime,
}

impl Naive {
    fn new() -> Self {
        Naive {
            ctx: SessionContext::new(),
            rt: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime"),
        }
    }

    /// The naive value of every key with accepted events in `[from, to)`.
    fn query(&self, accepted: &[Event], from: i64, to: i64) -> Vec<(String, Value)> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("x", DataType::Float64, true),
            Field::new("item", DataType::Utf8, true),
            Field::new("ts", DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(StringArray::from_iter_values(
                    accepted.iter().map(|e| e.key.clone()),
                )),
                Arc::new(Float64Array::from(
                    accepted.iter().map(|e| e.x).collect::<Vec<_>>(),
                )),
                Arc::new(StringArray::from_iter_values(
                    accepted.iter().map(|e| e.item.clone()),
                )),
                Arc::new(Int64Array::from(
                    accepted.iter().map(|e| e.ts).collect::<Vec<_>>(),
                )),
            ],
        )
        .expect("batch");
        let table = MemTable::try_new(schema, vec![vec![batch]]).expect("table");
        let _ = self.ctx.deregister_table("ev");
        self.ctx
            .register_table("ev", Arc::new(table))
            .expect("register");
        let sql = format!("{NAIVE} WHERE ts >= {from} AND ts < {to} GROUP BY k");
        let batches = self
            .rt
            .block_on(async { self.ctx.sql(&sql).await?.collect().await })
            .expect("naive query");
        let mut out = Vec::new();
        for b in batches {
            for i in 0..b.num_rows() {
                let f = |c: usize| {
                    let a = b.column(c).as_primitive::<Float64Type>();
                    if a.is_null(i) {
                        Value::Null
                    } else {
                        serde_json::json!(a.value(i))
                    }
                };
                let v = serde_json::json!({
                    "n": b.column(1).as_primitive::<Int64Type>().value(i),
                    "s": f(2), "a": f(3), "lo": f(4), "hi": f(5),
                    "d": b.column(6).as_primitive::<UInt64Type>().value(i),
                    "last": f(7),
                });
                out.push((b.column(0).as_string::<i32>().value(i).to_string(), v));
            }
        }
        out
    }
}

fn empty() -> Value {
    serde_json::json!({"n": 0, "s": null, "a": null, "lo": null, "hi": null, "d": 0, "last": null})
}

fn same(got: &Value, want: &Value) -> bool {
    let (Some(g), Some(w)) = (got.as_object(), want.as_object()) else {
        return false;
    };
    g.len() == w.len()
        && w.iter().all(|(k, wv)| match (g.get(k), wv) {
            (Some(Value::Null), Value::Null) => true,
            (Some(gv), wv) => match (gv.as_f64(), wv.as_f64()) {
                (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * b.abs().max(1.0),
                _ => false,
            },
            (None, _) => false,
        })
}

/// Runs the differential check of one window against RocksDB; returns
/// (reads compared, late events).
fn differential(window: &str, step: i64, delay: i64, n: usize, seed: u64) -> (usize, usize) {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(dir.path(), &["v".to_string()]).expect("store");
    differential_in(&store, window, step, delay, n, seed)
}

/// The differential check of one window with the tiles in `store`.
fn differential_in(
    store: &dyn StateStore,
    window: &str,
    step: i64,
    delay: i64,
    n: usize,
    seed: u64,
) -> (usize, usize) {
    let plan = sluice_sql::plan_pipeline(
        "t.sql",
        &pipeline(window, delay / 1000),
        std::path::Path::new("."),
    )
    .expect("plan");
    let vp = &plan.views[0];
    let layout = TileLayout::new(vp.window().expect("window")).expect("layout");
    let mut op = ViewOp::new(vp).expect("view");
    let reader = TileReader::new(vp, Arc::clone(op.kernel().expect("kernel"))).expect("reader");
    let naive = Naive::new();
    let mut rng = StdRng::seed_from_u64(seed);
    let evs = events(&mut rng, n, step, delay, layout.size);
    let mut accepted: Vec<Event> = Vec::new();
    let (mut wm, mut max) = (i64::MIN, i64::MIN);
    let (mut i, mut compared, mut late_total, mut restarts) = (0, 0, 0, 0);
    while i < evs.len() {
        let len = rng.random_range(1..40).min(evs.len() - i);
        let chunk = &evs[i..i + len];
        let mut wms = Vec::with_capacity(len);
        for e in chunk {
            wms.push(wm);
            max = max.max(e.ts);
            wm = wm.max(max - delay);
        }
        let late: HashSet<u32> = process(&mut op, rows(chunk, &wms)).into_iter().collect();
        for (j, e) in chunk.iter().enumerate() {
            let rule = wms[j] != i64::MIN
                && (e.ts.div_euclid(layout.slide) * layout.slide) + layout.size <= wms[j];
            assert_eq!(
                late.contains(&(j as u32)),
                rule,
                "late rule for {e:?} at {}",
                wms[j]
            );
            if !rule {
                accepted.push(e.clone());
            }
        }
        late_total += late.len();
        i += len;
        if wm == i64::MIN || (rng.random_range(0..100) >= 15 && i < evs.len()) {
            continue;
        }
        // A checkpoint at the current watermark, then reads at its clock.
        checkpoint(&mut op, store, wm);
        if rng.random_range(0..100) < 30 {
            // A restart from this checkpoint: a new operator with an empty
            // cache and the pending rows restored from their encoding.
            let pending = op
                .tiles_mut()
                .expect("tiles")
                .encode_pending()
                .expect("encode");
            op = ViewOp::new(vp).expect("view");
            for (group, bytes) in &pending {
                op.tiles_mut()
                    .expect("tiles")
                    .restore_pending(*group, bytes)
                    .expect("restore");
            }
            restarts += 1;
        }
        for mode in [ReadMode::Fresh, ReadMode::Closed, ReadMode::Current] {
            if !layout.offers(mode) {
                continue;
            }
            let (from, to) = layout.bounds(mode, wm);
            // Events before the clock only: the head slide ends at the watermark.
            let want = naive.query(&accepted, from, to.min(wm));
            for k in (0..KEYS)
                .map(|k| format!("k{k}"))
                .chain(["never".to_string()])
            {
                let (got, age) = reader.read_aged(store, &k, mode).expect("read");
                // The age: the clock minus the key's newest accepted event in the read's bounds.
                let newest = accepted
                    .iter()
                    .filter(|e| e.key == k && e.ts >= from && e.ts < to.min(wm))
                    .map(|e| e.ts)
                    .max();
                assert_eq!(
                    age,
                    newest.map(|n| wm - n),
                    "{window} {mode:?} key {k} at {wm}: age"
                );
                // The key still has tiles: some accepted event before the clock in a tile not yet expired.
                let live = accepted.iter().any(|e| {
                    e.key == k
                        && e.ts < wm
                        && (0..layout.levels.len())
                            .any(|l| layout.expires_at(l, layout.tile_start(l, e.ts)) > wm)
                });
                let expect = want
                    .iter()
                    .find(|(key, _)| *key == k)
                    .map(|(_, v)| v.clone())
                    .or_else(|| live.then(empty));
                match (&got, &expect) {
                    (None, None) => {}
                    (Some(g), Some(e)) => {
                        assert!(
                            same(&g["features"], e),
                            "{window} {mode:?} key {k} at {wm}: got {g} want {e}"
                        );
                        assert_eq!(g["as_of"], sluice_engine::time::fmt_ts(wm));
                    }
                    _ => panic!("{window} {mode:?} key {k} at {wm}: got {got:?} want {expect:?}"),
                }
                compared += 1;
            }
        }
    }
    assert!(restarts > 0, "no restart exercised");
    (compared, late_total)
}

#[test]
fn hop_reads_equal_a_naive_recomputation() {
    let (n, late) = differential(
        "HOP(ts, INTERVAL '1' MINUTE, INTERVAL '5' MINUTE)",
        2_000,
        30_000,
        3000,
        1,
    );
    assert!(n > 200 && late > 0, "{n} reads, {late} late");
}

#[test]
fn tumble_reads_equal_a_naive_recomputation() {
    let (n, late) = differential("TUMBLE(ts, INTERVAL '2' MINUTE)", 2_000, 30_000, 3000, 2);
    assert!(n > 200 && late > 0, "{n} reads, {late} late");
}

#[test]
fn one_day_window_reads_equal_a_naive_recomputation() {
    // Two days of events, 5-minute slides: hour tiles in the middle.
    let (n, late) = differential(
        "HOP(ts, INTERVAL '5' MINUTE, INTERVAL '1' DAY)",
        2 * DAY / 2500,
        10 * MIN,
        2500,
        3,
    );
    assert!(n > 200 && late > 0, "{n} reads, {late} late");
}

#[test]
fn thirty_day_window_reads_equal_a_naive_recomputation() {
    // 45 days of events, 5-minute slides: day and hour tiles in the middle.
    let (n, late) = differential(
        "HOP(ts, INTERVAL '5' MINUTE, INTERVAL '30' DAY)",
        45 * DAY / 2500,
        10 * MIN,
        2500,
        4,
    );
    assert!(n > 200 && late > 0, "{n} reads, {late} late");
}

/// Training-set replays keep tiles in memory (`MemStore`): the same reads.
#[test]
fn reads_from_tiles_in_memory_equal_a_naive_recomputation() {
    for (i, (window, step, delay)) in [
        (
            "HOP(ts, INTERVAL '1' MINUTE, INTERVAL '5' MINUTE)",
            2_000,
            30_000,
        ),
        ("TUMBLE(ts, INTERVAL '2' MINUTE)", 2_000, 30_000),
        (
            "HOP(ts, INTERVAL '5' MINUTE, INTERVAL '1' DAY)",
            2 * DAY / 2500,
            10 * MIN,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let store = MemStore::default();
        let (n, late) = differential_in(&store, window, step, delay, 3000, 10 + i as u64);
        assert!(n > 200 && late > 0, "{window}: {n} reads, {late} late");
    }
}

#[test]
fn expired_tiles_leave_the_store() {
    let plan = sluice_sql::plan_pipeline(
        "t.sql",
        &pipeline("HOP(ts, INTERVAL '1' MINUTE, INTERVAL '5' MINUTE)", 0),
        std::path::Path::new("."),
    )
    .expect("plan");
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(dir.path(), &["v".to_string()]).expect("store");
    let mut op = ViewOp::new(&plan.views[0]).expect("view");
    let ev = |key: &str, ts: i64| Event {
        key: key.into(),
        x: Some(1.0),
        item: "i".into(),
        ts,
    };
    let step = |op: &mut ViewOp, batch: &[Event], wm: i64| {
        // No watermark yet when they arrive: none is late.
        process(op, rows(batch, &vec![i64::MIN; batch.len()]));
        checkpoint(op, &store, wm)
    };
    // 100 keys with an event in each of 10 minutes: 1,000 tiles.
    let batch: Vec<Event> = (0..10)
        .flat_map(|m| (0..100).map(move |k| (k, m)))
        .map(|(k, m)| ev(&format!("k{k}"), m * MIN + 1))
        .collect();
    step(&mut op, &batch, 10 * MIN + 1);
    let tiles = store.tile_scan("v").expect("scan");
    // A tile [m, m+1) is in no window from m + 1 + 5 on: those of minutes
    // 0-4 are out of every window at 10:00.001 and were never written.
    assert_eq!(tiles.len(), 100 * 5, "tiles of minutes 5-9 remain");
    assert!(tiles.iter().all(|(_, _, start)| *start >= 5 * MIN));
    // The watermark moves past everything: one new key's event at minute 60.
    let st = step(&mut op, &[ev("late-comer", 60 * MIN)], 60 * MIN + 1);
    assert_eq!(st.expired, 500);
    assert_eq!(store.tile_scan("v").expect("scan").len(), 1);
    let reader =
        TileReader::new(&plan.views[0], Arc::clone(op.kernel().expect("kernel"))).expect("reader");
    assert!(
        reader
            .read(&store, "k1", ReadMode::Fresh)
            .expect("read")
            .is_none()
    );
    let got = reader
        .read(&store, "late-comer", ReadMode::Fresh)
        .expect("read")
        .expect("found");
    assert_eq!(got["features"]["n"], 1);
}
