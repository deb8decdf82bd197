//! Event times at and beyond the edges: `i64` extremes and the
//! nanosecond-timestamp range, in numeric and text form. In `run` (also on
//! restart) and `backfill` each bad record is dead-lettered as `wrong_type`
//! and nothing panics or vanishes; in a training-set spine such times get
//! NULL features.

mod common;

use std::path::Path;

use common::{dead_letters, get, read_parquet, sluice};

const PIPELINE: &str = "CREATE SOURCE clicks (
    user_id TEXT NOT NULL,
    ts      TIMESTAMP NOT NULL,
    WATERMARK FOR ts AS ts - INTERVAL '5' SECOND
) WITH (connector = 'file', path = 'clicks.jsonl');
CREATE FEATURE VIEW per_min KEY user_id WITH (offline = 'lake') AS
SELECT user_id, COUNT(*) AS n FROM clicks
GROUP BY user_id, HOP(ts, INTERVAL '1' MINUTE, INTERVAL '2' MINUTE);
CREATE FEATURE VIEW seen KEY user_id AS
SELECT user_id, COUNT(*) AS n FROM clicks GROUP BY user_id;
";

/// Records whose event time no window can hold, by line (1-based).
const BAD: &[(usize, &str)] = &[
    (2, r#"{"user_id": "max", "ts": 9223372036854775807}"#),
    (3, r#"{"user_id": "huge", "ts": 1e300}"#),
    (4, r#"{"user_id": "min", "ts": -9223372036854775808}"#),
    (5, r#"{"user_id": "text-max", "ts": "9223372036854775807"}"#),
    (
        6,
        r#"{"user_id": "text-min", "ts": "-9223372036854775808"}"#,
    ),
    (
        7,
        r#"{"user_id": "year-9999", "ts": "9999-12-31T23:59:59Z"}"#,
    ),
    (
        8,
        r#"{"user_id": "below-1677", "ts": "1677-09-21T00:12:43.145Z"}"#,
    ),
    (9, r#"{"user_id": "past-2262", "ts": 9223372036855}"#),
    (10, r#"{"user_id": "minus-1e300", "ts": -1e300}"#),
];

fn events() -> String {
    let mut lines = vec![r#"{"user_id": "a", "ts": "2024-01-01T00:00:10Z"}"#.to_string()];
    lines.extend(BAD.iter().map(|(_, l)| l.to_string()));
    lines.push(r#"{"user_id": "a", "ts": "2024-01-01T00:01:10Z"}"#.into());
    lines.push(r#"{"user_id": "b", "ts": 1704067330000}"#.into());
    lines.push(r#"{"user_id": "z", "ts": "2024-01-01T00:10:00Z"}"#.into());
    lines.join("\n") + "\n"
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("pipeline.sql"), PIPELINE).expect("write pipeline");
    std::fs::write(dir.path().join("clicks.jsonl"), events()).expect("write events");
    dir
}

fn ok(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The dead letters are exactly the bad records, as `wrong_type`. (Within
/// a batch, records the decoder refuses come before those whose time it
/// read but that are out of range, so they are compared by line.)
fn check_dead(letters: &[serde_json::Value]) {
    let mut got: Vec<(String, String)> = letters
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap_or("?").to_string(),
                // Backfill names the file as given on the command line.
                d["position"]
                    .as_str()
                    .and_then(|p| p.rsplit('/').next())
                    .unwrap_or("?")
                    .to_string(),
            )
        })
        .collect();
    let line = |p: &str| -> usize {
        p.rsplit(':')
            .next()
            .and_then(|l| l.parse().ok())
            .unwrap_or(0)
    };
    got.sort_by_key(|(_, p)| line(p));
    let want: Vec<(String, String)> = BAD
        .iter()
        .map(|(line, _)| ("wrong_type".to_string(), format!("clicks.jsonl:{line}")))
        .collect();
    assert_eq!(got, want, "{letters:#?}");
}

fn lake_count(dir: &Path) -> usize {
    common::parquet_files(&dir.join("lake/per_min"))
        .iter()
        .flat_map(|f| read_parquet(f))
        .map(|b| b.num_rows())
        .sum()
}

#[test]
fn run_dead_letters_out_of_range_event_times_and_survives_restart() {
    let dir = setup();
    let p = dir.path().join("pipeline.sql").display().to_string();
    let state = dir.path().join("state");
    let s = state.display().to_string();
    ok(&sluice(&["run", &p, "--state-dir", &s]), "sluice run");
    check_dead(&dead_letters(&state));
    // The good events count; the bad ones are nowhere else.
    let a = get(&state, "seen", "a").expect("a is online");
    assert_eq!(a["features"]["n"], 2);
    for (_, rec) in BAD {
        let v: serde_json::Value = serde_json::from_str(rec).unwrap();
        let key = v["user_id"].as_str().unwrap();
        assert!(
            get(&state, "seen", key).is_none(),
            "{key} reached the online store"
        );
    }
    let windows = lake_count(dir.path());
    assert!(windows > 0);
    // A restart over the same input resumes after it: no panic, nothing twice.
    ok(&sluice(&["run", &p, "--state-dir", &s]), "sluice run again");
    check_dead(&dead_letters(&state));
    assert_eq!(lake_count(dir.path()), windows);
}

#[test]
fn backfill_dead_letters_the_same_records() {
    let dir = setup();
    let p = dir.path().join("pipeline.sql").display().to_string();
    let state = dir.path().join("state");
    let src = format!("clicks={}", dir.path().join("clicks.jsonl").display());
    ok(
        &sluice(&[
            "backfill",
            &p,
            "--source",
            &src,
            "--state-dir",
            &state.display().to_string(),
            "--online",
            "--quiet",
        ]),
        "sluice backfill",
    );
    let text = std::fs::read_to_string(state.join("backfill_dead_letters.jsonl")).unwrap();
    let letters: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    check_dead(&letters);
    assert_eq!(get(&state, "seen", "a").expect("a")["features"]["n"], 2);
}

#[test]
fn training_set_spine_times_out_of_range_get_null_features() {
    let dir = setup();
    let p = dir.path().join("pipeline.sql").display().to_string();
    let s = dir.path().join("state").display().to_string();
    ok(&sluice(&["run", &p, "--state-dir", &s]), "sluice run");
    let spine = dir.path().join("spine.csv");
    std::fs::write(
        &spine,
        "user_id,t\n\
         a,2024-01-01T00:02:00Z\n\
         a,9223372036854775807\n\
         a,-9223372036854775808\n\
         a,9999-12-31T23:59:59Z\n\
         a,1e300\n\
         a,1704067320000\n",
    )
    .unwrap();
    let out_path = dir.path().join("train.jsonl");
    let out = sluice(&[
        "training-set",
        &p,
        "--spine",
        &spine.display().to_string(),
        "--features",
        "per_min",
        "--time-column",
        "t",
        "--out",
        &out_path.display().to_string(),
    ]);
    ok(&out, "sluice training-set");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("3 spine rows have a time outside years 1677-2262"),
        "{stderr}"
    );
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&out_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let n: Vec<Option<i64>> = rows.iter().map(|r| r["per_min__n"].as_i64()).collect();
    // 00:02 holds both of a's events ([00:00, 00:02)); the edges are NULL;
    // `1e300` is no time at all (NULL too); epoch ms 00:02 equals the first row.
    assert_eq!(
        n,
        vec![Some(2), None, None, None, None, Some(2)],
        "{rows:#?}"
    );
}
