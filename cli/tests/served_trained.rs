//! Served equals trained: `sluice training-set` gives each spine row
//! `(key, t)` of a windowed view what an online read at clock `t` returns.
//!
//! - Against a naive recomputation from the raw events by the sawtooth
//!   formula (random spine times: before a key's first event, on slide
//!   boundaries, between events of the head slide), with late events and
//!   events behind the watermark in the history.
//! - Against the values a running `sluice run --serve` served: reads of
//!   random keys are logged with their `as_of`, and a training set with
//!   those rows as its spine returns the same values, row for row.

mod common;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use arrow::array::RecordBatch;
use common::{Served, bin, f64s, log_reads, read_parquet, spawn_serving};
use serde_json::Value;
use sluice_cli::commands::generate::Rng;
use sluice_engine::tiles::TileLayout;
use sluice_sql::WindowSpec;

const T0: i64 = 1_704_067_200_000; // 2024-01-01T00:00:00Z
const SEC: i64 = 1000;
const MIN: i64 = 60 * SEC;
const HOUR: i64 = 60 * MIN;
const DAY: i64 = 24 * HOUR;
const DELAY: i64 = MIN;

#[derive(Clone, Debug)]
struct Ev {
    user: String,
    price: i64,
    ts: i64,
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .expect("time")
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// `n` events of `keys` users, one every `step` ms of event time, in
/// arrival order: each arrives up to 50 s after its time (inside the
/// 1-minute watermark delay); with `behind`, one in 20 arrives 2 to 15
/// minutes late (behind the watermark, and late for the short windows).
fn events(rng: &mut Rng, n: i64, keys: u64, step: i64, behind: bool) -> Vec<Ev> {
    let mut arrival: Vec<(i64, Ev)> = (0..n)
        .map(|i| {
            let ts = T0 + i * step + rng.below(step as u64) as i64;
            let d = if behind && rng.below(20) == 0 {
                2 * MIN + rng.below((13 * MIN) as u64) as i64
            } else {
                rng.below((50 * SEC) as u64) as i64
            };
            let ev = Ev {
                user: format!("u{}", rng.below(keys)),
                price: 1 + rng.below(100) as i64,
                ts,
            };
            (ts + d, ev)
        })
        .collect();
    arrival.sort_by_key(|x| x.0);
    arrival.into_iter().map(|x| x.1).collect()
}

fn write_events(path: &Path, evs: &[Ev]) {
    let mut lines = String::new();
    for e in evs {
        writeln!(
            lines,
            "{{\"user_id\":\"{}\",\"price\":{},\"ts\":\"{}\"}}",
            e.user,
            e.price,
            rfc3339(e.ts)
        )
        .expect("fmt");
    }
    std::fs::write(path, lines).expect("events");
}

/// The pipeline: HOP, TUMBLE, a 1-day and a 30-day view over one source.
fn pipeline(dir: &Path, archive: bool) {
    let archive = if archive { ", archive = 'archive'" } else { "" };
    let sql = format!(
        "CREATE SOURCE clicks (user_id TEXT NOT NULL, price DOUBLE, ts TIMESTAMP NOT NULL,
            WATERMARK FOR ts AS ts - INTERVAL '1' MINUTE) WITH (connector = 'file', path = 'events.jsonl'{archive});
        CREATE FEATURE VIEW hop KEY user_id AS
            SELECT user_id, COUNT(*) AS n, SUM(price) AS s, MIN(price) AS lo, MAX(price) AS hi FROM clicks
            GROUP BY user_id, HOP(ts, INTERVAL '1' MINUTE, INTERVAL '10' MINUTE);
        CREATE FEATURE VIEW tum KEY user_id AS
            SELECT user_id, COUNT(*) AS n, AVG(price) AS a FROM clicks
            GROUP BY user_id, TUMBLE(ts, INTERVAL '2' MINUTE);
        CREATE FEATURE VIEW day KEY user_id AS
            SELECT user_id, COUNT(*) AS n, SUM(price) AS s FROM clicks
            GROUP BY user_id, HOP(ts, INTERVAL '5' MINUTE, INTERVAL '1' DAY);
        CREATE FEATURE VIEW month KEY user_id AS
            SELECT user_id, COUNT(*) AS n, MAX(price) AS hi FROM clicks
            GROUP BY user_id, HOP(ts, INTERVAL '5' MINUTE, INTERVAL '30' DAY);"
    );
    std::fs::write(dir.join("p.sql"), sql).expect("pipeline");
}

/// (view, window, features) of the pipeline.
fn views() -> Vec<(&'static str, WindowSpec, &'static [&'static str])> {
    vec![
        (
            "hop",
            WindowSpec::Hop {
                slide_ms: MIN,
                size_ms: 10 * MIN,
            },
            &["n", "s", "lo", "hi"],
        ),
        ("tum", WindowSpec::Tumble { size_ms: 2 * MIN }, &["n", "a"]),
        (
            "day",
            WindowSpec::Hop {
                slide_ms: 5 * MIN,
                size_ms: DAY,
            },
            &["n", "s"],
        ),
        (
            "month",
            WindowSpec::Hop {
                slide_ms: 5 * MIN,
                size_ms: 30 * DAY,
            },
            &["n", "hi"],
        ),
    ]
}

fn training_set(dir: &Path, spine: &Path, extra: &[&str]) -> (RecordBatch, String) {
    let out = dir.join("train.parquet");
    let mut args = vec![
        "training-set".to_string(),
        dir.join("p.sql").display().to_string(),
        "--spine".into(),
        spine.display().to_string(),
        "--key".into(),
        "user_id=uid".into(),
        "--time-column".into(),
        "ts".into(),
        "--out".into(),
        out.display().to_string(),
    ];
    for (v, _, _) in views() {
        args.push("--features".into());
        args.push(v.into());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let o = Command::new(bin())
        .args(&args)
        .output()
        .expect("training-set");
    let log = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{log}");
    let b = read_parquet(&out);
    (
        arrow::compute::concat_batches(&b[0].schema(), &b).expect("concat"),
        log,
    )
}

/// The value an online read of `key` at clock `t` returns, from the raw
/// events by the definition: the events accepted (not late) before the
/// watermark first reached `t`, with times in the read's range; NULL when
/// the key has no tile left at `t` (no accepted event before `t`, or all
/// of them out of every window); `None` when the watermark never reaches `t`.
fn sawtooth(
    evs: &[Ev],
    window: WindowSpec,
    key: &str,
    t: i64,
    feature: &str,
) -> Option<Option<f64>> {
    let layout = TileLayout::new(window).expect("layout");
    let (slide, size) = (
        window.slide_ms().expect("slide"),
        window.size_ms().expect("size"),
    );
    let mut max = i64::MIN;
    let mut counted = Vec::new();
    let mut reached = false;
    for e in evs {
        let wm_before = (max != i64::MIN).then(|| max - DELAY);
        let late = wm_before.is_some_and(|w| e.ts.div_euclid(slide) * slide + size <= w);
        if !late && e.user == key && e.ts < t {
            counted.push(e);
        }
        max = max.max(e.ts);
        if max - DELAY >= t {
            reached = true;
            break;
        }
    }
    if !reached {
        return None;
    }
    let top = layout.levels.len() - 1;
    let exists = counted
        .iter()
        .any(|e| layout.expires_at(top, layout.tile_start(top, e.ts)) > t);
    if !exists {
        return Some(None);
    }
    let (lo, hi) = layout.bounds(layout.default_mode(), t);
    let prices: Vec<f64> = counted
        .iter()
        .filter(|e| e.ts >= lo && e.ts < hi)
        .map(|e| e.price as f64)
        .collect();
    let v = match feature {
        "n" => Some(prices.len() as f64),
        "s" => (!prices.is_empty()).then(|| prices.iter().sum()),
        "lo" => prices.iter().copied().reduce(f64::min),
        "hi" => prices.iter().copied().reduce(f64::max),
        "a" => (!prices.is_empty()).then(|| prices.iter().sum::<f64>() / prices.len() as f64),
        other => panic!("feature {other}"),
    };
    Some(v)
}

/// Late events per view by the late rule, over the whole history.
fn late_count(evs: &[Ev], window: WindowSpec) -> usize {
    let (slide, size) = (
        window.slide_ms().expect("slide"),
        window.size_ms().expect("size"),
    );
    let mut max = i64::MIN;
    let mut n = 0;
    for e in evs {
        if max != i64::MIN && e.ts.div_euclid(slide) * slide + size <= max - DELAY {
            n += 1;
        }
        max = max.max(e.ts);
    }
    n
}

#[test]
fn training_set_equals_the_sawtooth_formula() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let mut rng = Rng::new(13);
    // 6,000 events over about 4 hours, 12 users.
    let evs = events(&mut rng, 6000, 12, 2500, true);
    write_events(&d.join("events.jsonl"), &evs);
    pipeline(d, false);
    let first: HashMap<&str, i64> = evs.iter().fold(HashMap::new(), |mut m, e| {
        let f = m.entry(e.user.as_str()).or_insert(e.ts);
        *f = (*f).min(e.ts);
        m
    });
    let end = evs.iter().map(|e| e.ts).max().expect("events");
    let mut spine = String::from("uid,ts\n");
    let mut rows: Vec<(Option<String>, i64)> = Vec::new();
    for i in 0..2400 {
        let uid = match rng.below(16) {
            0 => None,
            1 => Some("nobody".to_string()),
            u => Some(format!("u{}", u % 12)),
        };
        let mut t = T0 - 20 * MIN + rng.below((end - T0 + 40 * MIN) as u64) as i64;
        match i % 5 {
            // On a slide boundary of every view.
            0 => t = t.div_euclid(5 * MIN) * 5 * MIN,
            // Between two events of the head slide.
            1 => {
                let e = &evs[rng.below(evs.len() as u64) as usize];
                t = e.ts + 1 + rng.below(3000) as i64;
            }
            // Before the key's first event.
            2 => {
                if let Some(f) = uid.as_deref().and_then(|u| first.get(u)) {
                    t = f - rng.below((30 * MIN) as u64) as i64;
                }
            }
            _ => {}
        }
        rows.push((uid, t));
    }
    for (uid, t) in &rows {
        writeln!(spine, "{},{}", uid.clone().unwrap_or_default(), rfc3339(*t)).expect("fmt");
    }
    std::fs::write(d.join("spine.csv"), &spine).expect("spine");
    let (b, log) = training_set(d, &d.join("spine.csv"), &[]);
    assert_eq!(b.num_rows(), rows.len(), "one output row per spine row");

    let mut cases = [0usize; 4]; // value, empty window, NULL, beyond the history
    for (view, window, features) in views() {
        let cols: Vec<Vec<Option<f64>>> = features
            .iter()
            .map(|f| f64s(&b, &format!("{view}__{f}")))
            .collect();
        for (r, (uid, t)) in rows.iter().enumerate() {
            for (fi, f) in features.iter().enumerate() {
                let want = match uid {
                    None => None,
                    Some(u) => sawtooth(&evs, window, u, *t, f).flatten(),
                };
                let got = cols[fi][r];
                assert_eq!(
                    got,
                    want,
                    "row {r} (uid {uid:?}, t {}): {view}__{f}",
                    rfc3339(*t)
                );
            }
            let n = uid.as_deref().map(|u| sawtooth(&evs, window, u, *t, "n"));
            match n {
                Some(Some(Some(x))) if x > 0.0 => cases[0] += 1,
                Some(Some(Some(_))) => cases[1] += 1,
                Some(None) => cases[3] += 1,
                _ => cases[2] += 1,
            }
        }
    }
    assert!(
        cases.iter().all(|c| *c > 20),
        "cases covered (value, empty, NULL, beyond): {cases:?}"
    );
    // Late events are dead-lettered by the training-set job, per view, not folded in.
    let letters =
        std::fs::read_to_string(d.join("train.parquet.dead_letters.jsonl")).unwrap_or_default();
    let late: usize = views().iter().map(|(_, w, _)| late_count(&evs, *w)).sum();
    assert!(late > 50, "the history has late events: {late}");
    let kinds: Vec<Value> = letters
        .lines()
        .map(|l| serde_json::from_str(l).expect("dead letter"))
        .collect();
    assert_eq!(kinds.len(), late, "{log}");
    assert!(kinds.iter().all(|k| k["kind"] == "late_event"));
    assert!(log.contains(&format!("{late} late")), "{log}");
}

/// Runs `sluice run --serve` over the events while reading random keys of
/// every view; returns the logged reads once the input is done.
fn serve_and_log(d: &Path, keys: u64) -> Vec<Served> {
    let mut cmd = Command::new(bin());
    cmd.args([
        "run",
        &d.join("p.sql").display().to_string(),
        "--state-dir",
        &d.join("state").display().to_string(),
        "--serve",
        "127.0.0.1:0",
        "--batch-rows",
        "40",
        "--throttle-ms",
        "8",
        "--checkpoint-interval-ms",
        "40",
    ]);
    let mut run = spawn_serving(cmd);
    let names: Vec<&str> = views().iter().map(|v| v.0).collect();
    let done = &run.done;
    let log = log_reads(
        &run.addr,
        &names,
        |k| format!("u{k}"),
        keys,
        99,
        || done.try_recv().is_ok(),
    );
    let _ = run.child.kill();
    let _ = run.child.wait();
    log
}

/// Rows of the training set whose values differ from what was served, and
/// the logged reads: for each read, its view's features compared.
fn compare(b: &RecordBatch, served: &[Served]) -> Vec<(usize, String, f64, f64)> {
    let mut diffs = Vec::new();
    for (view, _, features) in views() {
        for f in features {
            let col = f64s(b, &format!("{view}__{f}"));
            for (r, s) in served.iter().enumerate().filter(|(_, s)| s.view == view) {
                let want = s.features[*f].as_f64();
                // serde_json (without `float_roundtrip`) may parse the
                // served text a few ulps off: equal within 4 ulps.
                let same = match (col[r], want) {
                    (Some(a), Some(b)) => {
                        (a - b).abs() <= 4.0 * f64::EPSILON * a.abs().max(b.abs())
                    }
                    (a, b) => a.is_none() && b.is_none(),
                };
                if !same {
                    diffs.push((
                        r,
                        format!("{view}__{f}"),
                        want.unwrap_or(f64::NAN),
                        col[r].unwrap_or(f64::NAN),
                    ));
                }
            }
        }
    }
    diffs
}

fn spine_of(d: &Path, served: &[Served]) -> std::path::PathBuf {
    let mut spine = String::from("uid,ts\n");
    for s in served {
        writeln!(spine, "{},{}", s.key, s.as_of).expect("fmt");
    }
    let p = d.join("served_spine.csv");
    std::fs::write(&p, spine).expect("spine");
    p
}

#[test]
fn served_values_equal_the_training_set_row_for_row() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let mut rng = Rng::new(7);
    // 20,000 events over about 14 hours of event time, 20 users.
    let evs = events(&mut rng, 20_000, 20, 2500, false);
    write_events(&d.join("events.jsonl"), &evs);
    pipeline(d, false);
    let served = serve_and_log(d, 20);
    let clocks: std::collections::BTreeSet<&str> =
        served.iter().map(|s| s.as_of.as_str()).collect();
    assert!(served.len() > 300, "{} reads logged", served.len());
    assert!(clocks.len() > 20, "reads at {} clocks", clocks.len());
    for (v, _, _) in views() {
        assert!(served.iter().filter(|s| s.view == v).count() > 50, "{v}");
    }
    let (b, log) = training_set(d, &spine_of(d, &served), &[]);
    assert_eq!(b.num_rows(), served.len());
    let diffs = compare(&b, &served);
    assert!(
        diffs.is_empty(),
        "{} of {} reads differ, first: {:?}\n{log}",
        diffs.len(),
        served.len(),
        diffs.iter().take(5).collect::<Vec<_>>()
    );
}

/// With events behind the watermark, a read at clock `T` also counts those
/// that arrived after the watermark first reached `T` but before the
/// checkpoint that published `T`. The event archive records the
/// checkpoints, so its replay equals what was served; a replay of the raw
/// file cannot know where the checkpoints were, and counts only the events
/// that arrived before the watermark reached `T` (never more than served).
#[test]
fn with_events_behind_the_watermark_the_archive_replays_what_was_served() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let mut rng = Rng::new(21);
    let evs = events(&mut rng, 20_000, 20, 2500, true);
    write_events(&d.join("events.jsonl"), &evs);
    pipeline(d, true);
    let served = serve_and_log(d, 20);
    assert!(served.len() > 300, "{} reads logged", served.len());
    let spine = spine_of(d, &served);
    let (b, log) = training_set(d, &spine, &[]);
    assert!(log.contains("event archive"), "{log}");
    let diffs = compare(&b, &served);
    assert!(
        diffs.is_empty(),
        "archive replay: {} of {} reads differ, first: {:?}\n{log}",
        diffs.len(),
        served.len(),
        diffs.iter().take(5).collect::<Vec<_>>()
    );
    // The same spine replayed from the file instead of the archive.
    let file = format!("clicks={}", d.join("events.jsonl").display());
    let (b, log) = training_set(d, &spine, &["--source", &file]);
    assert!(log.contains("--source"), "{log}");
    let diffs = compare(&b, &served);
    for (r, col, want, got) in &diffs {
        if col.ends_with("__n") {
            assert!(
                got.is_nan() || got <= want,
                "row {r}: {col} replayed from the file counts {got}, more than the {want} served"
            );
        }
    }
    eprintln!(
        "file replay: {} of {} served reads differ (events behind the watermark that arrived before their checkpoint)",
        diffs.len(),
        served.len()
    );
}
