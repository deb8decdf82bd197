//! Careless operators and hostile input, tried on the real binary: a new
//! state dir over an existing lake and archive, colliding composite keys,
//! keys LMDB cannot hold, CSV rows that do not fit, lines without end,
//! non-finite vectors, secrets in `explain`, a dead-letter flood, a
//! corrupt state dir.

mod common;

use std::path::Path;
use std::process::Command;

use common::{bin, dead_letters, lake_rows, parquet_files, sluice};
use serde_json::Value;

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run(pipeline: &Path, state: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "run".to_string(),
        pipeline.display().to_string(),
        "--state-dir".into(),
        state.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Command::new(bin())
        .args(&args)
        .env("SLUICE_LOG", "warn")
        .output()
        .expect("run")
}

fn get(state: &Path, view: &str, key: &str) -> Option<Value> {
    common::get(state, view, key)
}

const CLICKS: &str = "CREATE SOURCE clicks (
    user_id TEXT NOT NULL, price DOUBLE, ts TIMESTAMP NOT NULL,
    WATERMARK FOR ts AS ts
) WITH (connector = 'file', path = 'events.jsonl', archive = 'archive');
CREATE FEATURE VIEW spend KEY user_id WITH (offline = 'lake') AS
SELECT user_id, SUM(price) AS total FROM clicks
GROUP BY user_id, TUMBLE(ts, INTERVAL '1' MINUTE);
";

fn events(users: &str, minutes: i64) -> String {
    let mut s = String::new();
    for m in 0..minutes {
        for u in users.split(',') {
            s.push_str(&format!(
                "{{\"user_id\": \"{u}\", \"price\": 1.0, \"ts\": {}}}\n",
                m * 60_000 + 1_000
            ));
        }
    }
    s
}

#[test]
fn a_second_state_dir_keeps_the_first_ones_lake_and_archive() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path().join("p.sql");
    std::fs::write(&p, CLICKS).expect("pipeline");
    std::fs::write(dir.path().join("events.jsonl"), events("u0,u1,u2", 5)).expect("events");
    ok(&run(&p, &dir.path().join("s1"), &[]));
    let lake = dir.path().join("lake");
    let archive = dir.path().join("archive");
    let first_lake = parquet_files(&lake);
    let first_archive = parquet_files(&archive);
    assert!(!first_lake.is_empty() && !first_archive.is_empty());
    // What docs/operations.md advises after a view changed: a new state
    // dir over the same lake and archive (here with other events).
    std::fs::write(dir.path().join("events.jsonl"), events("w0,w1", 4)).expect("events");
    ok(&run(&p, &dir.path().join("s2"), &[]));
    for f in first_lake.iter().chain(&first_archive) {
        assert!(f.exists(), "{} of the first run was deleted", f.display());
    }
    let (_, rows) = lake_rows(&lake, "spend");
    assert!(rows.iter().any(|r| r.contains("u0")), "{rows:?}");
    assert!(rows.iter().any(|r| r.contains("w0")), "{rows:?}");
    // Every file names its writer: two writers, no name shared.
    let writers: std::collections::BTreeSet<String> = parquet_files(&lake)
        .iter()
        .filter_map(|f| {
            let n = f.file_name()?.to_string_lossy().into_owned();
            Some(n.split('-').nth(2)?.to_string())
        })
        .collect();
    assert_eq!(writers.len(), 2, "{writers:?}");

    // A restart of the first state dir after a crash removes its own
    // uncommitted files only: a later epoch of its own goes, anything of
    // another writer stays.
    let one = &first_lake[0];
    let name = one
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let parts: Vec<&str> = name.split('-').collect();
    let own_late = one.with_file_name(format!("part-9999999999-{}-0.parquet", parts[2]));
    let other_late = one.with_file_name("part-9999999999-00000000deadbeef-0.parquet");
    std::fs::copy(one, &own_late).expect("copy");
    std::fs::copy(one, &other_late).expect("copy");
    ok(&run(&p, &dir.path().join("s1"), &[]));
    assert!(!own_late.exists(), "its own uncommitted file stays");
    assert!(other_late.exists(), "another writer's file was deleted");

    // A training set replays one writer's archive, the last by default,
    // another when asked.
    let spine = dir.path().join("spine.jsonl");
    std::fs::write(
        &spine,
        "{\"user_id\": \"u0\", \"ts\": \"1970-01-01T00:04:00Z\"}\n",
    )
    .expect("spine");
    let s1_id = parts[2].to_string();
    let out = sluice(&[
        "training-set",
        &p.display().to_string(),
        "--spine",
        &spine.display().to_string(),
        "--features",
        "spend",
        "--out",
        &dir.path().join("t.jsonl").display().to_string(),
        "--time-column",
        "ts",
        "--archive-writer",
        &format!("clicks={s1_id}"),
    ]);
    ok(&out);
    let t = std::fs::read_to_string(dir.path().join("t.jsonl")).expect("out");
    let row: Value = serde_json::from_str(t.lines().next().expect("row")).expect("json");
    assert_eq!(row["spend__total"], 1.0, "{row}");
}

#[test]
fn composite_keys_do_not_collide_and_null_is_not_empty() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path().join("p.sql");
    std::fs::write(
        &p,
        "CREATE SOURCE s (a TEXT, b TEXT, ts TIMESTAMP NOT NULL, WATERMARK FOR ts AS ts)
         WITH (connector = 'file', path = 'in.jsonl');
         CREATE FEATURE VIEW v KEY a, b AS SELECT a, b, COUNT(*) AS n FROM s GROUP BY a, b;",
    )
    .expect("pipeline");
    std::fs::write(
        dir.path().join("in.jsonl"),
        [
            r#"{"a": "x|y", "b": "z", "ts": 1}"#,
            r#"{"a": "x", "b": "y|z", "ts": 2}"#,
            r#"{"a": "x", "b": "y|z", "ts": 3}"#,
            r#"{"a": null, "b": "z", "ts": 4}"#,
            r#"{"a": "", "b": "z", "ts": 5}"#,
            r#"{"a": "", "b": "z", "ts": 6}"#,
            r#"{"a": "", "b": "z", "ts": 7}"#,
            r#"{"a": "\\N", "b": "z", "ts": 8}"#,
        ]
        .join("\n"),
    )
    .expect("events");
    let state = dir.path().join("state");
    ok(&run(&p, &state, &[]));
    let n = |key: &str| {
        get(&state, "v", key)
            .unwrap_or_else(|| panic!("key {key}"))
            .pointer("/features/n")
            .and_then(Value::as_i64)
    };
    assert_eq!(n(r"x\|y|z"), Some(1));
    assert_eq!(n(r"x|y\|z"), Some(2));
    assert_eq!(n(r"\N|z"), Some(1));
    assert_eq!(n("|z"), Some(3));
    assert_eq!(n(r"\\N|z"), Some(1));
    // The old, ambiguous spelling finds nothing: `x|y|z` is three columns.
    let out = sluice(&[
        "get",
        "v",
        "x|y|z",
        "--state-dir",
        &state.display().to_string(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("3 column(s)"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const VECTORS: &str = "CREATE SOURCE items (
    item_id TEXT NOT NULL, category TEXT, emb FLOAT[3] NOT NULL, ts TIMESTAMP NOT NULL,
    WATERMARK FOR ts AS ts
) WITH (connector = 'file', path = 'items.jsonl');
CREATE FEATURE VIEW iv KEY item_id
  WITH (vector_index = 'emb', distance = 'cosine', index_filter_columns = 'category')
AS SELECT item_id, LAST_VALUE(emb) AS emb, LAST_VALUE(category) AS category
FROM items GROUP BY item_id;
";

fn item(id: &str, emb: &str, ts: i64) -> String {
    serde_json::json!({"item_id": id, "category": "c1", "ts": ts})
        .to_string()
        .replace('}', &format!(", \"emb\": {emb}}}"))
}

#[test]
fn keys_lmdb_cannot_hold_are_indexed_and_a_restart_works() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path().join("p.sql");
    std::fs::write(&p, VECTORS).expect("pipeline");
    let long = "k".repeat(600);
    let lines = [
        item("", "[1, 0, 0]", 1),
        item(&long, "[0, 1, 0]", 2),
        item("plain", "[0, 0, 1]", 3),
        // Not finite: dead letters, whatever the JSON says.
        item("inf", "[1e39, 0, 0]", 4),
    ];
    std::fs::write(dir.path().join("items.jsonl"), lines.join("\n") + "\n").expect("items");
    let state = dir.path().join("state");
    ok(&run(&p, &state, &[]));
    let dead = dead_letters(&state);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["kind"], "wrong_type");
    // A restart with more of the same input (the empty key's record is
    // next again after a crash) runs, and the index answers.
    std::fs::write(
        dir.path().join("items.jsonl"),
        lines.join("\n") + "\n" + &item("", "[1, 1, 0]", 5) + "\n",
    )
    .expect("items");
    ok(&run(&p, &state, &[]));
    let near = |key: &str| {
        let out = sluice(&[
            "nearest",
            "iv",
            "--key",
            key,
            "-k",
            "3",
            "--state-dir",
            &state.display().to_string(),
        ]);
        ok(&out)
    };
    let by_long = near(&long);
    assert!(by_long.contains("plain"), "{by_long}");
    let out = near("plain");
    assert!(out.contains(&long), "{out}");
    // The dump lists both odd keys with their vectors.
    let out = ok(&sluice(&[
        "nearest",
        "iv",
        "--dump",
        "--state-dir",
        &state.display().to_string(),
    ]));
    let keys: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("json")["key"]
                .as_str()
                .expect("key")
                .to_string()
        })
        .collect();
    assert!(keys.contains(&String::new()), "{keys:?}");
    assert!(keys.contains(&long), "{keys:?}");
}

#[test]
fn csv_rows_that_do_not_fit_are_dead_letters_by_line() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path().join("p.sql");
    std::fs::write(
        &p,
        "CREATE SOURCE s (user_id TEXT NOT NULL, price DOUBLE, ts TIMESTAMP NOT NULL, WATERMARK FOR ts AS ts)
         WITH (connector = 'file', path = 'in.csv');
         CREATE FEATURE VIEW v KEY user_id AS SELECT user_id, COUNT(*) AS n FROM s GROUP BY user_id;",
    )
    .expect("pipeline");
    let mut csv = b"user_id,price,ts\nu1,1.0,1000\nu1,2.0,2000,extra\nu1,3.0\nu2,\xff\xfe,3000\nu2,4.0,4000\n".to_vec();
    csv.extend(b"u3,");
    csv.extend(std::iter::repeat_n(b'9', 2 << 20));
    csv.extend(b",5000\nu3,5.0,6000\n");
    std::fs::write(dir.path().join("in.csv"), &csv).expect("csv");
    let state = dir.path().join("state");
    ok(&run(&p, &state, &[]));
    let dead = dead_letters(&state);
    let pos: Vec<(&str, &str)> = dead
        .iter()
        .map(|d| {
            (
                d["position"].as_str().unwrap_or(""),
                d["kind"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        pos,
        vec![
            ("in.csv:3", "malformed_record"),
            ("in.csv:4", "malformed_record"),
            ("in.csv:5", "malformed_record"),
            ("in.csv:7", "oversized"),
        ]
    );
    let n = |k| get(&state, "v", k).and_then(|v| v.pointer("/features/n").and_then(Value::as_i64));
    assert_eq!((n("u1"), n("u2"), n("u3")), (Some(1), Some(1), Some(1)));
    // The backfill reads the same file the same way.
    let bf = dir.path().join("bf");
    ok(&sluice(&[
        "backfill",
        &p.display().to_string(),
        "--state-dir",
        &bf.display().to_string(),
    ]));
    let text = std::fs::read_to_string(bf.join("backfill_dead_letters.jsonl")).expect("dl");
    assert_eq!(text.lines().count(), 4, "{text}");
}

#[test]
fn a_line_without_end_costs_bounded_memory_and_is_a_dead_letter() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path().join("p.sql");
    std::fs::write(
        &p,
        "CREATE SOURCE s (user_id TEXT NOT NULL, ts TIMESTAMP NOT NULL, WATERMARK FOR ts AS ts)
         WITH (connector = 'file', path = 'in.jsonl', max_record_bytes = '1000');
         CREATE FEATURE VIEW v KEY user_id AS SELECT user_id, COUNT(*) AS n FROM s GROUP BY user_id;",
    )
    .expect("pipeline");
    // 256 MiB of one line with no newline at the end of the file.
    let mut f = std::fs::File::create(dir.path().join("in.jsonl")).expect("file");
    use std::io::Write;
    f.write_all(b"{\"user_id\": \"u1\", \"ts\": 1}\n{\"user_id\": \"")
        .expect("w");
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..256 {
        f.write_all(&chunk).expect("w");
    }
    drop(f);
    let state = dir.path().join("state");
    let mut child = Command::new(bin())
        .args([
            "run",
            &p.display().to_string(),
            "--state-dir",
            &state.display().to_string(),
        ])
        .env("SLUICE_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run");
    // The peak RSS, read from /proc while it runs.
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_kb = 0u64;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if let Some(kb) = std::fs::read_to_string(&status_file).ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        }) {
            peak_kb = peak_kb.max(kb);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let out = child.wait_with_output().expect("output");
    assert!(status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(peak_kb > 0, "no RSS read");
    assert!(
        peak_kb < 200 * 1024,
        "peak RSS {peak_kb} KiB for a 256 MiB line"
    );
    let dead = dead_letters(&state);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["kind"], "oversized");
    assert_eq!(dead[0]["position"], "in.jsonl:2");
    assert!(dead[0]["record"].as_str().is_some_and(|r| r.len() <= 4096));
}

#[test]
fn explain_shows_no_secret() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path().join("p.sql");
    let secrets = [
        (
            "kafka.ssl.key.pem",
            "-----BEGIN PRIVATE KEY-----MIIEsecretpem",
        ),
        ("kafka.ssl.key.password", "keypass-secret-1"),
        ("kafka.ssl.keystore.password", "storepass-2"),
        ("kafka.ssl.keystore.location", "/etc/keystore-3.p12"),
        ("kafka.sasl.username", "alice-4"),
        ("kafka.sasl.password", "hunter2-5"),
        (
            "kafka.sasl.oauthbearer.config",
            "principal=p clientSecret=oauth-secret-6",
        ),
        ("kafka.sasl.oauthbearer.client.secret", "client-7"),
        ("kafka.sasl.kerberos.keytab", "/etc/krb-8.keytab"),
    ];
    let opts: Vec<String> = secrets
        .iter()
        .map(|(k, v)| format!(", {k} = '{v}'"))
        .collect();
    std::fs::write(
        &p,
        format!(
            "CREATE SOURCE s (user_id TEXT NOT NULL, ts TIMESTAMP NOT NULL, WATERMARK FOR ts AS ts)
             WITH (connector = 'kafka', topic = 't', brokers = '127.0.0.1:1'{});
             CREATE FEATURE VIEW v KEY user_id AS SELECT user_id, COUNT(*) AS n FROM s GROUP BY user_id;",
            opts.concat()
        ),
    )
    .expect("pipeline");
    let out = sluice(&["explain", &p.display().to_string()]);
    let text = ok(&out) + &String::from_utf8_lossy(&out.stderr);
    for (k, v) in secrets {
        assert!(!text.contains(v), "`{k}`'s value shown:\n{text}");
        assert!(text.contains(k), "`{k}` not listed:\n{text}");
    }
    assert!(text.contains("brokers = 127.0.0.1:1"), "{text}");
}

#[test]
fn a_dead_letter_flood_stops_at_the_limit_the_same_way_every_run() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path().join("p.sql");
    std::fs::write(
        &p,
        "CREATE SOURCE s (user_id TEXT NOT NULL, ts TIMESTAMP NOT NULL, WATERMARK FOR ts AS ts)
         WITH (connector = 'file', path = 'in.jsonl');
         CREATE FEATURE VIEW v KEY user_id AS SELECT user_id, COUNT(*) AS n FROM s GROUP BY user_id;",
    )
    .expect("pipeline");
    let mut text = String::new();
    for i in 0..2000 {
        if i % 2 == 0 {
            text.push_str(&format!("{{\"user_id\": \"u{i}\", \"ts\": {i}}}\n"));
        } else {
            text.push_str(&format!("not json {i}\n"));
        }
    }
    std::fs::write(dir.path().join("in.jsonl"), text).expect("in");
    let files: Vec<Vec<u8>> = ["a", "b"]
        .iter()
        .map(|s| {
            let state = dir.path().join(s);
            ok(&run(
                &p,
                &state,
                &[
                    "--dead-letter-limit",
                    "20KiB",
                    "--batch-rows",
                    if *s == "a" { "64" } else { "1000" },
                ],
            ));
            std::fs::read(state.join("dead_letters.jsonl")).expect("dead letters")
        })
        .collect();
    assert!(files[0].len() <= 20 << 10, "{} bytes", files[0].len());
    assert!(files[0].len() > 15 << 10, "{} bytes", files[0].len());
    assert_eq!(files[0], files[1], "the cap falls on another letter");
    // The good records all count.
    let v = get(&dir.path().join("a"), "v", "u1998").expect("last good key");
    assert_eq!(v["features"]["n"], 1);
    // kill -9 twice along the way: the restarts end with the same file.
    let state = dir.path().join("c");
    for _ in 0..2 {
        let mut child = Command::new(bin())
            .args([
                "run",
                &p.display().to_string(),
                "--state-dir",
                &state.display().to_string(),
                "--dead-letter-limit",
                "20KiB",
                "--batch-rows",
                "50",
                "--checkpoint-interval-ms",
                "30",
                "--throttle-ms",
                "5",
            ])
            .env("SLUICE_LOG", "warn")
            .spawn()
            .expect("run");
        std::thread::sleep(std::time::Duration::from_millis(150));
        child.kill().expect("kill -9");
        child.wait().expect("wait");
    }
    ok(&run(
        &p,
        &state,
        &["--dead-letter-limit", "20KiB", "--batch-rows", "50"],
    ));
    let after = std::fs::read(state.join("dead_letters.jsonl")).expect("dead letters");
    assert_eq!(after, files[0], "a restart moved the cap");
}

#[test]
fn a_corrupt_state_dir_is_refused_with_a_message() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path().join("p.sql");
    std::fs::write(dir.path().join("events.jsonl"), events("u0", 3)).expect("events");
    std::fs::write(&p, CLICKS).expect("pipeline");
    let state = dir.path().join("state");
    ok(&run(&p, &state, &[]));
    // Every table file and the manifest overwritten with garbage.
    for e in std::fs::read_dir(state.join("db")).expect("db").flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.ends_with(".sst") || n.starts_with("MANIFEST") {
            std::fs::write(e.path(), vec![0x5a; 4096]).expect("corrupt");
        }
    }
    for out in [
        run(&p, &state, &[]),
        sluice(&[
            "get",
            "spend",
            "u0",
            "--state-dir",
            &state.display().to_string(),
        ]),
    ] {
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{err}");
        assert!(err.contains("state store"), "{err}");
    }
}
