//! A view whose definition changed over an existing state dir is refused,
//! and the error names what changed (window, query, key).

mod common;

const BASE: &str = "CREATE SOURCE clicks (
    user_id TEXT NOT NULL, item_id TEXT, price DOUBLE, ts TIMESTAMP NOT NULL,
    WATERMARK FOR ts AS ts - INTERVAL '5' SECOND
) WITH (connector = 'file', path = 'events.jsonl', format = 'json');
CREATE FEATURE VIEW user_activity KEY user_id WITH (online = true) AS
SELECT user_id, COUNT(*) AS clicks_1h, SUM(price) AS spend_1h
FROM clicks WHERE price >= 0
GROUP BY user_id, HOP(ts, INTERVAL '5' MINUTE, INTERVAL '1' HOUR);
";

#[test]
fn a_changed_view_over_old_state_is_refused_naming_the_difference() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = tmp.path();
    let ev = d.join("events.jsonl").display().to_string();
    let o = common::sluice(&["gen", "--events", "2000", "--keys", "50", "--out", &ev]);
    assert!(o.status.success());
    let state = d.join("state").display().to_string();
    let run = |sql: &str| {
        let p = d.join("p.sql");
        std::fs::write(&p, sql).expect("pipeline");
        common::sluice(&["run", &p.display().to_string(), "--state-dir", &state])
    };
    assert!(run(BASE).status.success());
    // The same definition continues.
    assert!(run(BASE).status.success());
    for (changed, want) in [
        (
            BASE.replace("INTERVAL '1' HOUR", "INTERVAL '2' HOUR"),
            "its window was HOP(slide=5m, size=1h) and is HOP(slide=5m, size=2h)",
        ),
        (
            BASE.replace("WHERE price >= 0", "WHERE price >= 10"),
            "its query had `0` where it now has `10`",
        ),
        (
            BASE.replace(
                "SUM(price) AS spend_1h",
                "SUM(price) AS spend_1h, MAX(price) AS top_1h",
            ),
            "its query had `spend_1h` where it now has `spend_1h, MAX(price) AS top_1h`",
        ),
    ] {
        let o = run(&changed);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains("feature view `user_activity` changed since this state was written"),
            "{err}"
        );
        assert!(err.contains(want), "want `{want}` in: {err}");
    }
}

const V2: &str = "
CREATE FEATURE VIEW user_activity VERSION 2 KEY user_id WITH (online = true, offline = 'lake') AS
SELECT user_id, COUNT(*) AS clicks_1h, SUM(price) AS spend_1h, MAX(price) AS top_price_1h
FROM clicks WHERE price >= 0
GROUP BY user_id, HOP(ts, INTERVAL '5' MINUTE, INTERVAL '2' HOUR);
";

fn serve_and_read(
    d: &std::path::Path,
    state: &str,
    paths: &[&str],
) -> Vec<(u16, serde_json::Value)> {
    let mut cmd = std::process::Command::new(common::bin());
    cmd.current_dir(d).args([
        "run",
        "p.sql",
        "--state-dir",
        state,
        "--serve",
        "127.0.0.1:0",
    ]);
    let mut srv = common::spawn_serving(cmd);
    srv.done
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("run done");
    let out = paths
        .iter()
        .map(|p| {
            let (status, body) = common::http(&srv.addr, "GET", p, None, &[]);
            (status, serde_json::from_str(&body).unwrap_or_default())
        })
        .collect();
    let _ = srv.child.kill();
    let _ = srv.child.wait();
    out
}

#[test]
fn versions_of_a_view_run_side_by_side() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = tmp.path();
    let ev = d.join("events.jsonl").display().to_string();
    let o = common::sluice(&["gen", "--events", "3000", "--keys", "50", "--out", &ev]);
    assert!(o.status.success());
    let v1 = BASE.replace(
        "WITH (online = true)",
        "WITH (online = true, offline = 'lake')",
    );
    std::fs::write(d.join("p.sql"), format!("{v1}{V2}")).expect("pipeline");

    // explain lists both versions and what differs.
    let o = common::sluice(&["explain", &d.join("p.sql").display().to_string()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("FeatureView user_activity@2"), "{text}");
    assert!(
        text.contains("version 2 of user_activity (versions 1, 2); against version 1: its window was HOP(slide=5m, size=1h) and is HOP(slide=5m, size=2h)"),
        "{text}"
    );

    // One run, both versions: each read by name, the unversioned name the
    // newest (a fresh state dir: it saw the stream from its start).
    let reads = serve_and_read(
        d,
        "state",
        &[
            "/v1/features/user_activity/u00007",
            "/v1/features/user_activity@2/u00007",
            "/v1/features/user_activity@1/u00007",
        ],
    );
    assert_eq!(reads[0].0, 200);
    assert_eq!(reads[1].0, 200);
    assert_eq!(reads[2].0, 200, "{:?}", reads[2]);
    assert!(
        reads[2].1["features"].get("top_price_1h").is_none(),
        "@1 reads version 1: {:?}",
        reads[2]
    );
    assert!(
        reads[1].1["features"]["top_price_1h"].is_number(),
        "{:?}",
        reads[1]
    );
    assert_eq!(reads[0].1, reads[1].1, "unversioned reads version 2");
    // `sluice get` reads what the server serves; `@1` names version 1.
    let newest = common::get(&d.join("state"), "user_activity", "u00007").expect("newest");
    assert!(newest["features"]["top_price_1h"].is_number(), "{newest}");
    let v1_only = common::get(&d.join("state"), "user_activity@1", "u00007").expect("v1");
    assert!(
        v1_only["features"].get("top_price_1h").is_none(),
        "{v1_only}"
    );
    assert!(
        v1_only["features"]["clicks_1h"].as_i64() <= reads[1].1["features"]["clicks_1h"].as_i64()
    );
    // The lake keeps the versions apart.
    for v in ["user_activity", "user_activity@2"] {
        assert!(
            !common::parquet_files(&d.join("lake").join(v)).is_empty(),
            "no lake files for {v}"
        );
    }

    // Version 2 added to a state dir version 1 wrote: it starts at the
    // source's watermark, so until it has seen a whole window the
    // unversioned name keeps reading version 1.
    std::fs::write(d.join("p.sql"), &v1).expect("pipeline");
    let o = common::sluice(&[
        "run",
        &d.join("p.sql").display().to_string(),
        "--state-dir",
        &d.join("late").display().to_string(),
    ]);
    assert!(o.status.success());
    std::fs::write(d.join("p.sql"), format!("{v1}{V2}")).expect("pipeline");
    let reads = serve_and_read(
        d,
        "late",
        &[
            "/v1/features/user_activity/u00007",
            "/v1/features/user_activity@2/u00007",
        ],
    );
    assert_eq!(reads[0].0, 200);
    assert!(
        reads[0].1["features"].get("top_price_1h").is_none(),
        "{:?}",
        reads[0]
    );
    assert_eq!(
        reads[1].0, 404,
        "version 2 saw no event yet: {:?}",
        reads[1]
    );

    // More events, 20 minutes of them: version 2 has a watermark now but
    // has not seen a whole 2-hour window, and its catch-up point is kept
    // across the restart, so the unversioned name still reads version 1.
    let text = std::fs::read_to_string(d.join("events.jsonl")).expect("events");
    let last: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("a line")).expect("json");
    let last_ms = chrono::DateTime::parse_from_rfc3339(last["ts"].as_str().expect("ts"))
        .expect("rfc3339")
        .timestamp_millis();
    let mut more = text.clone();
    for i in 1..=20i64 {
        more.push_str(&format!(
            "{{\"user_id\":\"u00007\",\"item_id\":\"i1\",\"price\":2.5,\"ts\":\"{}\"}}\n",
            sluice_connectors::rfc3339_ms(last_ms + i * 60_000)
        ));
    }
    std::fs::write(d.join("events.jsonl"), more).expect("events");
    let reads = serve_and_read(
        d,
        "late",
        &[
            "/v1/features/user_activity/u00007",
            "/v1/features/user_activity@2/u00007",
        ],
    );
    assert_eq!(reads[1].0, 200, "version 2 saw events: {:?}", reads[1]);
    assert!(
        reads[0].1["features"].get("top_price_1h").is_none(),
        "not caught up, yet the unversioned name reads version 2: {:?}",
        reads[0]
    );
}
