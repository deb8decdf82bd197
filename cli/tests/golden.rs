//! SQL golden tests: every `testdata/golden/*.slt` file is a script of
//! pipeline, input events, runs of the real binary and expected output.
//! The format is described in `testdata/README.md`.

mod common;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use common::{dead_letters, get, lake_rows, sluice};

struct Record {
    line: usize,
    head: String,
    body: Vec<String>,
    expected: Vec<String>,
}

fn records(text: &str) -> Vec<Record> {
    let mut out = Vec::new();
    let mut cur: Option<Record> = None;
    let mut in_expected = false;
    for (i, l) in text.lines().enumerate() {
        if l.trim().is_empty() {
            if let Some(r) = cur.take() {
                out.push(r);
            }
            in_expected = false;
            continue;
        }
        match cur.as_mut() {
            None => {
                if l.starts_with('#') {
                    continue;
                }
                cur = Some(Record {
                    line: i + 1,
                    head: l.trim().to_string(),
                    body: Vec::new(),
                    expected: Vec::new(),
                });
            }
            Some(r) => {
                if l.trim() == "----" {
                    in_expected = true;
                } else if in_expected {
                    r.expected.push(l.to_string());
                } else {
                    r.body.push(l.to_string());
                }
            }
        }
    }
    if let Some(r) = cur {
        out.push(r);
    }
    out
}

fn run_script(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let pipeline = dir.path().join("pipeline.sql");
    let state = dir.path().join("state");
    let lake = dir.path().join("lake");
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for r in records(&text) {
        let at = format!("{name}:{}", r.line);
        let words: Vec<&str> = r.head.split_whitespace().collect();
        match words.as_slice() {
            ["pipeline"] => {
                std::fs::write(&pipeline, r.body.join("\n")).map_err(|e| e.to_string())?
            }
            ["pipeline", "error"] => {
                std::fs::write(&pipeline, r.body.join("\n")).map_err(|e| e.to_string())?;
                let out = sluice(&["explain", &pipeline.display().to_string()]);
                let err = String::from_utf8_lossy(&out.stderr);
                if out.status.success() {
                    return Err(format!("{at}: expected the pipeline to be rejected"));
                }
                for want in &r.expected {
                    if !err.contains(want.trim()) {
                        return Err(format!(
                            "{at}: error output lacks `{}`; it was:\n{err}",
                            want.trim()
                        ));
                    }
                }
            }
            ["events", source] => {
                let p = dir.path().join(format!("{source}.jsonl"));
                let mut cur = std::fs::read_to_string(&p).unwrap_or_default();
                for l in &r.body {
                    cur.push_str(l);
                    cur.push('\n');
                }
                std::fs::write(&p, cur).map_err(|e| e.to_string())?;
            }
            ["run", extra @ ..] => {
                let (p, s) = (pipeline.display().to_string(), state.display().to_string());
                let mut args = vec!["run", p.as_str(), "--state-dir", s.as_str()];
                args.extend(extra.iter().copied());
                let out = sluice(&args);
                if !out.status.success() {
                    return Err(format!(
                        "{at}: sluice run failed:\n{}",
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
            }
            ["query", "lake", view] => {
                let (h, rows) = lake_rows(&lake, view);
                let mut actual = vec![h];
                actual.extend(rows);
                if rows_differ(&actual, &r.expected) {
                    return Err(format!(
                        "{at}: lake rows of `{view}` differ\nexpected:\n{}\nactual:\n{}",
                        r.expected.join("\n"),
                        actual.join("\n")
                    ));
                }
            }
            ["query", "online", view, key] => {
                let got = get(&state, view, key);
                let want = r.expected.join("\n");
                let ok = match (&got, want.trim()) {
                    (None, "NOT FOUND") => true,
                    (Some(g), w) => serde_json::from_str::<serde_json::Value>(w)
                        .map(|w| &w == g)
                        .unwrap_or(false),
                    _ => false,
                };
                if !ok {
                    let g = got
                        .map(|g| g.to_string())
                        .unwrap_or_else(|| "NOT FOUND".into());
                    return Err(format!(
                        "{at}: online `{view}` `{key}`\nexpected: {want}\nactual:   {g}"
                    ));
                }
            }
            ["query", "dead_letters"] => {
                let actual: Vec<String> = dead_letters(&state)
                    .iter()
                    .map(|d| {
                        format!(
                            "{} {}",
                            d["kind"].as_str().unwrap_or("?"),
                            d["position"].as_str().unwrap_or("?")
                        )
                    })
                    .collect();
                let want: Vec<String> = r.expected.iter().map(|s| s.trim().to_string()).collect();
                if actual != want {
                    return Err(format!(
                        "{at}: dead letters differ\nexpected:\n{}\nactual:\n{}",
                        want.join("\n"),
                        actual.join("\n")
                    ));
                }
            }
            _ => return Err(format!("{at}: unknown directive `{}`", r.head)),
        }
    }
    Ok(())
}

fn rows_differ(actual: &[String], expected: &[String]) -> bool {
    let norm = |v: &[String]| {
        let mut rows: Vec<String> = v
            .iter()
            .map(|s| s.split('|').map(str::trim).collect::<Vec<_>>().join(" | "))
            .collect();
        if rows.len() > 1 {
            rows[1..].sort();
        }
        rows
    };
    norm(actual) != norm(expected)
}

fn scripts() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/golden");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("testdata/golden exists")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "slt"))
        .collect();
    v.sort();
    v
}

#[test]
fn golden_scripts() {
    let filter = std::env::var("SLUICE_GOLDEN").ok();
    let mut failures = String::new();
    let mut ran = 0;
    for s in scripts() {
        if filter
            .as_ref()
            .is_some_and(|f| !s.display().to_string().contains(f.as_str()))
        {
            continue;
        }
        ran += 1;
        if let Err(e) = run_script(&s) {
            let _ = writeln!(failures, "--- {}\n{e}\n", s.display());
        }
    }
    assert!(ran > 0, "no golden scripts found");
    assert!(failures.is_empty(), "{failures}");
}
