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
