//! Property tests of the pipeline front end: whatever the text, planning
//! returns a plan or an error that points into the file (never a panic,
//! never an error without a line and column); interval and duration
//! parsing never panic and stay within their bound; `${ENV}` expansion is
//! the identity on text without references and falls back to defaults.

use std::path::Path;

use proptest::prelude::*;
use sluice_sql::interval::{MAX_INTERVAL_MS, duration_ms};
use sluice_sql::{expand_env, plan_pipeline};

const VALID: &str = "CREATE SOURCE clicks (user_id TEXT NOT NULL, price DOUBLE, ts TIMESTAMP NOT NULL,\n    WATERMARK FOR ts AS ts - INTERVAL '5' SECOND) WITH (connector = 'file', path = 'c.jsonl');\nCREATE FEATURE VIEW v KEY user_id WITH (online = true, offline = 'lake') AS\nSELECT user_id, COUNT(*) AS n, SUM(price) AS s FROM clicks WHERE price >= 0\nGROUP BY user_id, HOP(ts, INTERVAL '1' MINUTE, INTERVAL '5' MINUTE);\n";

/// Words and symbols of the dialect, so random statements get past the tokenizer.
const VOCAB: &[&str] = &[
    "CREATE",
    "SOURCE",
    "FEATURE",
    "VIEW",
    "KEY",
    "WITH",
    "AS",
    "SELECT",
    "FROM",
    "WHERE",
    "GROUP",
    "BY",
    "HOP",
    "TUMBLE",
    "SESSION",
    "INTERVAL",
    "'5'",
    "'1'",
    "MINUTE",
    "HOUR",
    "SECOND",
    "WATERMARK",
    "FOR",
    "NOT",
    "NULL",
    "TEXT",
    "DOUBLE",
    "TIMESTAMP",
    "BIGINT",
    "FLOAT[4]",
    "METADATA",
    "'key'",
    "COUNT(*)",
    "SUM",
    "AVG",
    "LAST_VALUE",
    "(",
    ")",
    ",",
    ";",
    "=",
    "-",
    "+",
    "*",
    ">=",
    "clicks",
    "user_id",
    "price",
    "ts",
    "v",
    "n",
    "connector",
    "'file'",
    "'kafka'",
    "path",
    "'c.jsonl'",
    "topic",
    "brokers",
    "online",
    "offline",
    "true",
    "'lake'",
    "0",
    "1e300",
    "9223372036854775807",
    "'${X:-y}'",
];

fn token_soup() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(VOCAB), 0..60).prop_map(|w| w.join(" "))
}

/// The valid pipeline with a few bytes deleted, replaced or inserted.
fn mutated() -> impl Strategy<Value = String> {
    prop::collection::vec((0..VALID.len(), 0u8..3, prop::char::range(' ', '~')), 1..4).prop_map(
        |edits| {
            let mut s: Vec<char> = VALID.chars().collect();
            for (at, op, c) in edits {
                let at = at.min(s.len().saturating_sub(1));
                match op {
                    0 => {
                        s.remove(at);
                    }
                    1 => s[at] = c,
                    _ => s.insert(at, c),
                }
            }
            s.into_iter().collect()
        },
    )
}

fn check(text: &str) -> Result<(), TestCaseError> {
    if let Err(e) = plan_pipeline("p.sql", text, Path::new("/tmp")) {
        let pos = e.pos;
        prop_assert!(
            pos.is_some_and(|p| p.line >= 1 && p.column >= 1),
            "error without a position for {text:?}: {e}"
        );
        prop_assert!(e.to_string().starts_with("p.sql:"), "{e}");
    }
    Ok(())
}

proptest! {
    // No failure files: a failing case is printed, and belongs in a unit test.
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_text_plans_or_fails_with_a_position(text in ".{0,200}") {
        check(&text)?;
    }

    #[test]
    fn token_soup_plans_or_fails_with_a_position(text in token_soup()) {
        check(&text)?;
    }

    #[test]
    fn mutated_pipelines_plan_or_fail_with_a_position(text in mutated()) {
        check(&text)?;
    }

    #[test]
    fn durations_never_panic_and_stay_bounded(text in ".{0,40}", n in any::<f64>(), unit in prop::sample::select(&["ms", "s", "minutes", "h", "days", "weeks", "x"][..])) {
        for t in [text, format!("{n} {unit}"), format!("{n}{unit}")] {
            if let Ok(ms) = duration_ms(&t) {
                prop_assert!(ms.abs() <= MAX_INTERVAL_MS, "{t} -> {ms}");
            }
        }
    }

    #[test]
    fn env_expansion_is_identity_without_references(text in "[^$]{0,80}") {
        prop_assert_eq!(expand_env(&text), Ok(text.clone()));
    }

    #[test]
    fn env_expansion_uses_defaults_of_unset_variables(
        pre in "[^$]{0,20}",
        name in "SLUICE_PROP_UNSET_[A-Z]{1,8}",
        default in "[^}$]{0,20}",
        post in "[^$]{0,20}",
    ) {
        let text = format!("{pre}${{{name}:-{default}}}{post}");
        prop_assert_eq!(expand_env(&text), Ok(format!("{pre}{default}{post}")));
        let unset = format!("{pre}${{{name}}}{post}");
        prop_assert!(expand_env(&unset).is_err());
    }

    #[test]
    fn env_expansion_never_panics(text in ".{0,80}") {
        let _ = expand_env(&text);
    }
}

#[test]
fn the_valid_pipeline_plans() {
    plan_pipeline("p.sql", VALID, Path::new("/tmp")).expect("the base of the mutations plans");
}

/// Found by the mutation property: a parse error at the end of the input
/// pointed nowhere.
#[test]
fn an_error_at_the_end_of_input_points_at_the_end() {
    let text = VALID.replace("INTERVAL '5' MINUTE);", "INTERVAL '5' MINUTE:;");
    let e = plan_pipeline("p.sql", &text, Path::new("/tmp")).expect_err("broken");
    let p = e.pos.expect("a position");
    assert!(p.line >= 5 && p.column >= 1, "{e}");
}
