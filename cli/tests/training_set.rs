//! `sluice training-set` against a naive recomputation from the raw events
//! (Chronon-style): for random spine rows (random keys, unknown and NULL
//! keys, duplicates, times before, inside and after the data, in several
//! UTC offsets), every feature equals the aggregate of the key's events in
//! the window valid at the row's time, computed directly from the events
//! (`--closed-windows`: the lake's rows; the default replay of the history
//! is checked in `served_trained.rs`).

mod common;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::process::Command;

use arrow::array::AsArray;
use arrow::datatypes::Int64Type;
use common::{bin, f64s, read_parquet};
use sluice_cli::commands::generate::Rng;

const T0: i64 = 1_704_067_200_000; // 2024-01-01T00:00:00Z
const MIN: i64 = 60_000;
const DELAY: i64 = 60_000;

#[derive(Clone)]
struct Ev {
    user: String,
    item: String,
    price: f64,
    ts: i64,
}

fn rfc3339(ms: i64, offset_h: i64) -> String {
    let off = chrono::FixedOffset::east_opt((offset_h * 3600) as i32).expect("offset");
    chrono::DateTime::from_timestamp_millis(ms)
        .expect("time")
        .with_timezone(&off)
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Events of key `user` in [lo, hi).
fn in_window<'a>(evs: &'a [Ev], key: &'a str, by_item: bool, lo: i64, hi: i64) -> Vec<&'a Ev> {
    evs.iter()
        .filter(|e| (if by_item { &e.item } else { &e.user }) == key && e.ts >= lo && e.ts < hi)
        .collect()
}

fn close(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0),
        _ => false,
    }
}

#[test]
fn training_set_matches_naive_recomputation() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let mut rng = Rng::new(2024);
    // 6,000 events over 3 hours, distinct times, out of order within the
    // watermark delay (so none is late), 15 users, 8 items.
    let mut evs: Vec<Ev> = (0..6000i64)
        .map(|i| Ev {
            user: format!("k{}", rng.below(15)),
            item: format!("i{}", rng.below(8)),
            price: (rng.below(10_000) as f64) / 100.0,
            ts: T0 + i * 1800 + 7 - (rng.below(50) as i64) * 1000,
        })
        .collect();
    evs.sort_by_key(|e| e.ts);
    evs.dedup_by_key(|e| e.ts);
    // Arrival order: each event delayed by up to 40 s, inside the 1 minute
    // watermark delay, so none is late.
    let mut arrival: Vec<(i64, Ev)> = evs
        .iter()
        .map(|e| (e.ts + rng.below(40_000) as i64, e.clone()))
        .collect();
    arrival.sort_by_key(|x| x.0);
    let arrival: Vec<Ev> = arrival.into_iter().map(|x| x.1).collect();
    let mut lines = String::new();
    for e in &arrival {
        writeln!(
            lines,
            "{{\"user_id\":\"{}\",\"item_id\":\"{}\",\"price\":{},\"ts\":\"{}\"}}",
            e.user,
            e.item,
            e.price,
            rfc3339(e.ts, 0)
        )
        .expect("fmt");
    }
    std::fs::write(d.join("events.jsonl"), lines).expect("events");
    let sql = "CREATE SOURCE clicks (user_id TEXT NOT NULL, item_id TEXT NOT NULL, price DOUBLE, ts TIMESTAMP NOT NULL,
            WATERMARK FOR ts AS ts - INTERVAL '1' MINUTE) WITH (connector = 'file', path = 'events.jsonl');
        CREATE FEATURE VIEW hop KEY user_id WITH (offline = 'lake') AS
            SELECT user_id, COUNT(*) AS n, SUM(price) AS s, MIN(price) AS lo, MAX(price) AS hi FROM clicks
            GROUP BY user_id, HOP(ts, INTERVAL '5' MINUTE, INTERVAL '20' MINUTE);
        CREATE FEATURE VIEW tum KEY user_id WITH (offline = 'lake') AS
            SELECT user_id, COUNT(*) AS n, AVG(price) AS avg_price FROM clicks
            GROUP BY user_id, TUMBLE(ts, INTERVAL '15' MINUTE);
        CREATE FEATURE VIEW item_pop KEY item_id WITH (offline = 'lake') AS
            SELECT item_id, COUNT(*) AS n FROM clicks GROUP BY item_id, TUMBLE(ts, INTERVAL '10' MINUTE);
        CREATE FEATURE VIEW last KEY user_id WITH (offline = 'lake') AS
            SELECT user_id, price AS last_price FROM clicks;";
    std::fs::write(d.join("p.sql"), sql).expect("pipeline");
    let p = d.join("p.sql").display().to_string();
    let o = Command::new(bin())
        .args([
            "backfill",
            &p,
            "--source",
            &format!("clicks={}", d.join("events.jsonl").display()),
            "--state-dir",
            &d.join("st").display().to_string(),
            "--quiet",
        ])
        .output()
        .expect("backfill");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(" 0 late, 0 dead letters"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // The spine: random users (some unknown, some NULL), items, times from
    // 30 min before the data to 40 min after it, in UTC, +02:00 and -05:00.
    let span = 6000 * 1800;
    let mut spine = String::from("uid,item,ts,label\n");
    let mut rows: Vec<(Option<String>, String, i64)> = Vec::new();
    for i in 0..3000 {
        let uid = match rng.below(20) {
            0 => None,
            u => Some(format!("k{}", u - 1)),
        };
        let item = format!("i{}", rng.below(9));
        let mut t = T0 - 30 * MIN + rng.below((span + 70 * MIN) as u64) as i64;
        if i % 7 == 0 {
            t = t.div_euclid(5 * MIN) * 5 * MIN; // exactly on a window end
        }
        rows.push((uid, item, t));
    }
    for i in 0..50 {
        let r = rows[i * 13].clone();
        rows.push(r); // duplicate spine rows
    }
    for (i, (uid, item, t)) in rows.iter().enumerate() {
        let off = [0, 2, -5][i % 3];
        writeln!(
            spine,
            "{},{},{},{}",
            uid.clone().unwrap_or_default(),
            item,
            rfc3339(*t, off),
            i
        )
        .expect("fmt");
    }
    std::fs::write(d.join("spine.csv"), spine).expect("spine");
    let out = d.join("train.parquet");
    let o = Command::new(bin())
        .args([
            "training-set",
            &p,
            "--spine",
            &d.join("spine.csv").display().to_string(),
            "--features",
            "hop",
            "--features",
            "tum:n,avg_price",
            "--features",
            "item_pop",
            "--features",
            "last",
            "--key",
            "user_id=uid",
            "--key",
            "item_id=item",
            "--time-column",
            "ts",
            "--closed-windows",
            "--out",
            &out.display().to_string(),
        ])
        .output()
        .expect("training-set");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let b = arrow::compute::concat_batches(&read_parquet(&out)[0].schema(), &read_parquet(&out))
        .expect("concat");
    assert_eq!(b.num_rows(), rows.len(), "one output row per spine row");
    let labels: Vec<i64> = b
        .column_by_name("label")
        .expect("label")
        .as_primitive::<Int64Type>()
        .values()
        .to_vec();
    assert_eq!(
        labels,
        (0..rows.len() as i64).collect::<Vec<_>>(),
        "spine order and labels kept"
    );

    // Windows the lake can hold end at or before the final watermark.
    let wm = evs.iter().map(|e| e.ts).max().expect("events") - DELAY;
    // The lake covers its first to its last window end; outside, features are NULL.
    let first_ts = evs.iter().map(|e| e.ts).min().expect("events");
    let covered = |e: i64, slide: i64, size: i64| -> bool {
        // The last window end at or before wm holding some event.
        let mut last = wm.div_euclid(slide) * slide;
        while evs.iter().all(|x| x.ts < last - size || x.ts >= last) {
            last -= slide;
        }
        let first = first_ts.div_euclid(slide) * slide + slide;
        e >= first && e <= last
    };
    let cols: HashMap<&str, Vec<Option<f64>>> = [
        "hop__n",
        "hop__s",
        "hop__lo",
        "hop__hi",
        "tum__n",
        "tum__avg_price",
        "item_pop__n",
        "last__last_price",
    ]
    .into_iter()
    .map(|c| (c, f64s(&b, c)))
    .collect();
    let mut checked = [0usize; 3];
    for (r, (uid, item, t)) in rows.iter().enumerate() {
        let mut want: Vec<(&str, Option<f64>)> = Vec::new();
        // hop: slide 5, size 20
        let (slide, size) = (5 * MIN, 20 * MIN);
        let e = t.div_euclid(slide) * slide;
        let (n, s, lo, hi) = match uid {
            Some(u) if covered(e, slide, size) => {
                let w = in_window(&evs, u, false, e - size, e);
                let p: Vec<f64> = w.iter().map(|x| x.price).collect();
                if p.is_empty() {
                    checked[1] += 1;
                    (Some(0.0), None, None, None)
                } else {
                    checked[0] += 1;
                    (
                        Some(p.len() as f64),
                        Some(p.iter().sum()),
                        p.iter().copied().reduce(f64::min),
                        p.iter().copied().reduce(f64::max),
                    )
                }
            }
            _ => {
                checked[2] += 1;
                (None, None, None, None)
            }
        };
        want.extend([
            ("hop__n", n),
            ("hop__s", s),
            ("hop__lo", lo),
            ("hop__hi", hi),
        ]);
        // tum: 15 min
        let slide = 15 * MIN;
        let e = t.div_euclid(slide) * slide;
        let (n, avg) = match uid {
            Some(u) if covered(e, slide, slide) => {
                let p: Vec<f64> = in_window(&evs, u, false, e - slide, e)
                    .iter()
                    .map(|x| x.price)
                    .collect();
                (
                    Some(p.len() as f64),
                    (!p.is_empty()).then(|| p.iter().sum::<f64>() / p.len() as f64),
                )
            }
            _ => (None, None),
        };
        want.extend([("tum__n", n), ("tum__avg_price", avg)]);
        // item_pop: by item, 10 min
        let slide = 10 * MIN;
        let e = t.div_euclid(slide) * slide;
        let n = covered(e, slide, slide)
            .then(|| in_window(&evs, item, true, e - slide, e).len() as f64);
        want.push(("item_pop__n", n));
        // last: the latest event at or before t.
        let last = uid.as_ref().and_then(|u| {
            evs.iter()
                .filter(|x| &x.user == u && x.ts <= *t)
                .max_by_key(|x| x.ts)
                .map(|x| x.price)
        });
        want.push(("last__last_price", last));
        for (c, w) in want {
            let got = cols[c][r];
            assert!(
                close(got, w),
                "row {r} (uid {uid:?}, item {item}, t {}): {c} = {got:?}, recomputed {w:?}",
                rfc3339(*t, 0)
            );
        }
    }
    assert!(
        checked.iter().all(|c| *c > 50),
        "cases covered: {checked:?}"
    );
}

#[test]
fn training_set_errors_name_the_fix() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let sql = "CREATE SOURCE clicks (user_id TEXT NOT NULL, ts TIMESTAMP NOT NULL,
            WATERMARK FOR ts AS ts - INTERVAL '1' MINUTE) WITH (connector = 'file', path = 'e.jsonl');
        CREATE FEATURE VIEW v KEY user_id WITH (offline = 'lake') AS
            SELECT user_id, COUNT(*) AS n FROM clicks GROUP BY user_id, TUMBLE(ts, INTERVAL '1' MINUTE);
        CREATE FEATURE VIEW online_only KEY user_id WITH (online = true) AS
            SELECT user_id, COUNT(*) AS n FROM clicks GROUP BY user_id;";
    std::fs::write(d.join("p.sql"), sql).expect("pipeline");
    std::fs::write(
        d.join("spine.csv"),
        "uid,ts,at\nk1,2024-01-01T00:00:00Z,2024-01-01T00:00:00Z\n",
    )
    .expect("spine");
    let run = |extra: &[&str]| -> String {
        let mut a = vec![
            "training-set".to_string(),
            d.join("p.sql").display().to_string(),
            "--spine".into(),
            d.join("spine.csv").display().to_string(),
            "--out".into(),
            d.join("o.csv").display().to_string(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        let o = Command::new(bin()).args(&a).output().expect("run");
        assert!(!o.status.success(), "{extra:?} should fail");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    assert!(run(&["--features", "nope", "--time-column", "ts"]).contains("no feature view `nope`"));
    assert!(run(&["--features", "online_only", "--time-column", "ts"]).contains("has no lake"));
    // The default replays the source's file, which does not exist here.
    assert!(
        run(&[
            "--features",
            "v",
            "--key",
            "user_id=uid",
            "--time-column",
            "ts"
        ])
        .contains("e.jsonl")
    );
    assert!(run(&["--features", "v:zz", "--time-column", "ts"]).contains("has no feature `zz`"));
    assert!(run(&["--features", "v", "--time-column", "ts"]).contains("--key user_id=SPINECOL"));
    std::fs::write(
        d.join("spine.csv"),
        "uid,ts,at\nk1,2024-01-01T00:00:00Z,2024-01-01T00:00:00Z\n",
    )
    .expect("spine");
    assert!(run(&["--features", "v", "--key", "user_id=uid"]).contains("--time-column"));
}

/// The README's "From stream to training set" walk-through, on a small history.
#[test]
fn training_example_runs() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let ex = common::repo_root().join("examples/training");
    let events = d.join("history/date=2024-01-01/events.parquet");
    let o = common::sluice(&[
        "gen",
        "--events",
        "60000",
        "--keys",
        "10",
        "--minutes",
        "180",
        "--late-every",
        "500",
        "--out",
        &events.display().to_string(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let p = ex.join("pipeline.sql").display().to_string();
    let lake = d.join("lake");
    let run = |args: &[&str]| {
        let o = Command::new(bin())
            .args(args)
            .env("SLUICE_LAKE", &lake)
            .output()
            .expect("run");
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let log = run(&[
        "backfill",
        &p,
        "--source",
        &format!("clicks={}", d.join("history").display()),
        "--state-dir",
        &d.join("st").display().to_string(),
        "--online",
    ]);
    assert!(log.contains("backfill done: 60000 events"), "{log}");
    let out = d.join("train.csv");
    let history = format!("clicks={}", d.join("history").display());
    let spine = ex.join("spine.csv").display().to_string();
    let training_set = |extra: &[&str]| {
        let mut a = vec![
            "training-set",
            &p,
            "--spine",
            &spine,
            "--features",
            "user_activity",
            "--features",
            "item_popularity:clicks_30m",
            "--key",
            "user_id=uid",
            "--time-column",
            "ts",
            "--out",
            out.to_str().expect("path"),
        ];
        a.extend(extra);
        run(&a)
    };
    // The lake's closed windows: an unknown user inside the data reads as
    // no activity (0 clicks).
    training_set(&["--closed-windows"]);
    let text = std::fs::read_to_string(&out).expect("output");
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[8].starts_with("u99999,i8,2024-01-01T02:00:00Z,0,0,,"),
        "{}",
        lines[8]
    );
    // The default: what an online read at each time returns, from a
    // replay of the history; the late events are dead-lettered again.
    let log = training_set(&["--source", &history]);
    assert!(log.contains("late (dead-lettered"), "{log}");
    assert!(
        std::fs::read_to_string(d.join("train.csv.dead_letters.jsonl"))
            .expect("dead letters")
            .lines()
            .count()
            > 0
    );
    let text = std::fs::read_to_string(&out).expect("output");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 11, "{text}");
    assert_eq!(
        lines[0],
        "uid,item_id,ts,label,user_activity__clicks_1h,user_activity__spend_1h,user_activity__distinct_items_1h,item_popularity__clicks_30m"
    );
    // u00001 at 01:00 reads the hour ending 01:00; the NULL key and the time
    // after the data (09:00) have no user features.
    assert!(
        lines[1].starts_with("u00001,i17,2024-01-01T01:00:00Z,1,"),
        "{}",
        lines[1]
    );
    assert!(!lines[1].contains(",,"), "{}", lines[1]);
    assert!(
        lines[7].starts_with(",i8,2024-01-01T02:00:00Z,0,,,,"),
        "{}",
        lines[7]
    );
    assert!(
        lines[10].starts_with("u00006,i5,2024-01-01T09:00:00Z,1,,,,"),
        "{}",
        lines[10]
    );
    // An unknown user has no online value: NULL, as a read of it is a 404.
    assert!(
        lines[8].starts_with("u99999,i8,2024-01-01T02:00:00Z,0,,,,"),
        "{}",
        lines[8]
    );
}
