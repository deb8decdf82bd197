//! SQL golden tests: every `testdata/golden/*.slt` file is a script of
//! pipelines, input events, runs of the real `sluice` binary and expected
//! output (the format is in `testdata/README.md`).
//!
//! Each file with runs is one test per mode: `streaming` (`sluice run`,
//! resuming from its checkpoint at every `run`) and `backfill` (`sluice
//! backfill --online` over all events so far into a fresh state dir at every
//! `run`). Both must give the file's expected output: that is the promise
//! that the stream and the history agree. Every `pipeline error` and
//! `explain` record is a test of its own.
//!
//! `cargo test -p sluice --test slt -- hop` runs the tests whose name holds
//! `hop`. `SLUICE_COMPLETE=1 cargo test -p sluice --test slt` (or `-- --complete`)
//! rewrites the expected output of every record from what streaming mode
//! gives; review the diff, then run the tests again to check backfill.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{bin, format_rows, json_match, parquet_files, read_parquet, rows_match};
use libtest_mimic::{Arguments, Failed, Trial};

/// How a file's runs execute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Streaming,
    Backfill,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Streaming => "streaming",
            Mode::Backfill => "backfill",
        }
    }
}

/// One record of a script.
#[derive(Debug, Clone)]
struct Record {
    /// 1-based line of the head.
    line: usize,
    /// Only in this mode (`onlyif streaming` / `onlyif backfill`).
    only: Option<Mode>,
    head: String,
    body: Vec<String>,
    /// The expected block (after `----`), and its 0-based line range in the file.
    expected: Option<(Vec<String>, std::ops::Range<usize>)>,
}

impl Record {
    fn words(&self) -> Vec<&str> {
        self.head.split_whitespace().collect()
    }

    /// A record that needs no state: each is a test of its own.
    fn is_plan(&self) -> bool {
        matches!(self.words().as_slice(), ["pipeline", "error"] | ["explain"])
    }
}

fn parse(file: &str, text: &str) -> Result<Vec<Record>, String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        if l.trim().is_empty() || l.starts_with('#') {
            i += 1;
            continue;
        }
        let mut only = None;
        let mut head_at = i;
        if let Some(m) = l.strip_prefix("onlyif ") {
            only = Some(match m.trim() {
                "streaming" => Mode::Streaming,
                "backfill" => Mode::Backfill,
                other => {
                    return Err(format!(
                        "{file}:{}: `onlyif {other}`: expected `streaming` or `backfill`",
                        i + 1
                    ));
                }
            });
            head_at += 1;
        }
        let Some(head) = lines.get(head_at) else {
            return Err(format!("{file}:{}: `onlyif` without a record", i + 1));
        };
        let mut r = Record {
            line: head_at + 1,
            only,
            head: head.trim().to_string(),
            body: Vec::new(),
            expected: None,
        };
        let mut j = head_at + 1;
        while j < lines.len() && !lines[j].trim().is_empty() && lines[j].trim() != "----" {
            r.body.push(lines[j].to_string());
            j += 1;
        }
        if j < lines.len() && lines[j].trim() == "----" {
            let start = j + 1;
            let mut k = start;
            while k < lines.len() && !lines[k].trim().is_empty() {
                k += 1;
            }
            let exp = lines[start..k].iter().map(|s| s.to_string()).collect();
            r.expected = Some((exp, start..k));
            j = k;
        }
        out.push(r);
        i = j;
    }
    Ok(out)
}

/// The output a record produced, in the form its expected block is written.
enum Actual {
    /// Compared line for line.
    Exact(Vec<String>),
    /// A header and rows, compared ignoring row order (numbers to 1e-9).
    Rows(Vec<String>),
    /// A JSON value, or `NOT FOUND`.
    Json(Option<serde_json::Value>),
}

impl Actual {
    fn lines(&self) -> Vec<String> {
        match self {
            Actual::Exact(l) | Actual::Rows(l) => l.clone(),
            Actual::Json(None) => vec!["NOT FOUND".into()],
            Actual::Json(Some(v)) => vec![v.to_string()],
        }
    }

    fn matches(&self, expected: &[String]) -> bool {
        match self {
            Actual::Exact(l) => l == expected,
            Actual::Rows(l) => {
                let norm = |v: &[String]| -> Vec<String> {
                    let mut rows: Vec<String> = v
                        .iter()
                        .map(|s| s.split('|').map(str::trim).collect::<Vec<_>>().join(" | "))
                        .collect();
                    if rows.len() > 1 {
                        rows[1..].sort();
                    }
                    rows
                };
                let (a, b) = (norm(l), norm(expected));
                a.first() == b.first() && rows_match(&a, &b)
            }
            Actual::Json(None) => expected.len() == 1 && expected[0].trim() == "NOT FOUND",
            Actual::Json(Some(v)) => {
                serde_json::from_str::<serde_json::Value>(&expected.join("\n"))
                    .is_ok_and(|w| json_match(v, &w))
            }
        }
    }
}

/// A scratch directory a script runs in: `pipeline.sql`, `<source>.jsonl`,
/// `state/`, `lake/`.
struct Scratch {
    dir: tempfile::TempDir,
    /// Sources that have an events file, in order of first appearance.
    sources: Vec<String>,
}

impl Scratch {
    fn new() -> Result<Self, String> {
        Ok(Scratch {
            dir: tempfile::tempdir().map_err(|e| e.to_string())?,
            sources: Vec::new(),
        })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `sluice args…` in the scratch dir; (success, stdout, stderr).
    fn sluice(&self, args: &[&str]) -> Result<(bool, String, String), String> {
        let out = Command::new(bin())
            .args(args)
            .current_dir(self.path())
            .env("SLUICE_LOG", "warn")
            .output()
            .map_err(|e| format!("starting sluice: {e}"))?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    fn write_pipeline(&self, body: &[String]) -> Result<(), String> {
        std::fs::write(self.path().join("pipeline.sql"), body.join("\n") + "\n")
            .map_err(|e| e.to_string())
    }
}

/// Output lines without trailing blanks or empty lines.
fn text_lines(s: &str) -> Vec<String> {
    s.lines()
        .map(|l| l.trim_end().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// `run` flags that only `sluice run` has, and whether each takes a value.
const STREAMING_ONLY_FLAGS: &[(&str, bool)] = &[
    ("--checkpoint-interval-ms", true),
    ("--throttle-ms", true),
    ("--stop-at-end", false),
];

fn backfill_flags<'a>(flags: &[&'a str]) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < flags.len() {
        match STREAMING_ONLY_FLAGS.iter().find(|(f, _)| *f == flags[i]) {
            Some((_, takes_value)) => i += if *takes_value { 2 } else { 1 },
            None => {
                out.push(flags[i]);
                i += 1;
            }
        }
    }
    out
}

/// Executes one record; `Ok(None)` for records without output.
fn execute(s: &mut Scratch, r: &Record, mode: Mode) -> Result<Option<Actual>, String> {
    let words = r.words();
    let state = s.path().join("state");
    Ok(match words.as_slice() {
        ["pipeline"] => {
            s.write_pipeline(&r.body)?;
            None
        }
        ["pipeline", "error"] => {
            s.write_pipeline(&r.body)?;
            let (ok, _, err) = s.sluice(&["explain", "pipeline.sql"])?;
            if ok {
                return Err("expected the pipeline to be rejected, but it planned".into());
            }
            Some(Actual::Exact(text_lines(&err)))
        }
        ["explain"] => {
            s.write_pipeline(&r.body)?;
            let (ok, out, err) = s.sluice(&["explain", "pipeline.sql"])?;
            if !ok {
                return Err(format!("sluice explain failed:\n{err}"));
            }
            Some(Actual::Exact(text_lines(&out)))
        }
        ["events", source] => {
            let p = s.path().join(format!("{source}.jsonl"));
            let mut cur = std::fs::read_to_string(&p).unwrap_or_default();
            for l in &r.body {
                cur.push_str(l);
                cur.push('\n');
            }
            std::fs::write(&p, cur).map_err(|e| e.to_string())?;
            if !s.sources.iter().any(|x| x == source) {
                s.sources.push(source.to_string());
            }
            None
        }
        ["run", flags @ ..] => {
            let (ok, _, err) = match mode {
                Mode::Streaming => {
                    let mut args = vec!["run", "pipeline.sql", "--state-dir", "state"];
                    args.extend(flags.iter().copied());
                    s.sluice(&args)?
                }
                Mode::Backfill => {
                    // All history so far, from scratch: what streaming holds now.
                    for d in ["state", "lake"] {
                        let p = s.path().join(d);
                        if p.exists() {
                            std::fs::remove_dir_all(&p).map_err(|e| e.to_string())?;
                        }
                    }
                    let srcs: Vec<String> =
                        s.sources.iter().map(|n| format!("{n}={n}.jsonl")).collect();
                    let mut args = vec!["backfill", "pipeline.sql", "--state-dir", "state"];
                    args.extend(["--online", "--quiet"]);
                    for x in &srcs {
                        args.extend(["--source", x.as_str()]);
                    }
                    args.extend(backfill_flags(flags));
                    s.sluice(&args)?
                }
            };
            if !ok {
                return Err(format!("sluice {} failed:\n{err}", mode.name()));
            }
            None
        }
        ["query", "lake", view] => {
            let mut batches = Vec::new();
            for f in parquet_files(&s.path().join("lake").join(view)) {
                batches.extend(read_parquet(&f));
            }
            let (h, mut rows) = format_rows(&batches);
            rows.sort();
            let mut lines = vec![h];
            lines.extend(rows);
            Some(Actual::Rows(lines))
        }
        ["query", "online", view, key, rest @ ..] => {
            let st = state.display().to_string();
            let mut args = vec!["get", view, key, "--state-dir", &st];
            match rest {
                [] => {}
                [w] if w.starts_with("window=") => args.extend(["--window", &w[7..]]),
                _ => return Err(format!("unknown record `{}`", r.head)),
            }
            let (ok, out, _) = s.sluice(&args)?;
            let v = if ok {
                Some(serde_json::from_str(&out).map_err(|e| format!("sluice get: {e}: {out}"))?)
            } else {
                None
            };
            Some(Actual::Json(v))
        }
        ["query", "dead_letters", rest @ ..] => {
            let reasons = match rest {
                [] => false,
                ["reasons"] => true,
                _ => return Err(format!("unknown record `{}`", r.head)),
            };
            let file = match mode {
                Mode::Streaming => "dead_letters.jsonl",
                Mode::Backfill => "backfill_dead_letters.jsonl",
            };
            let text = std::fs::read_to_string(state.join(file)).unwrap_or_default();
            let mut lines = Vec::new();
            for l in text.lines() {
                let d: serde_json::Value =
                    serde_json::from_str(l).map_err(|e| format!("dead letter `{l}`: {e}"))?;
                let mut line = format!(
                    "{} {}",
                    d["kind"].as_str().unwrap_or("?"),
                    d["position"].as_str().unwrap_or("?")
                );
                if reasons {
                    line.push_str(": ");
                    line.push_str(d["reason"].as_str().unwrap_or("?"));
                }
                lines.push(line);
            }
            Some(Actual::Exact(lines))
        }
        _ => return Err(format!("unknown record `{}`", r.head)),
    })
}

/// Runs `records` in `mode`; the first mismatch or failure is the error.
fn run_records(file: &str, records: &[Record], mode: Mode) -> Result<(), String> {
    let mut s = Scratch::new()?;
    for r in records {
        if r.only.is_some_and(|m| m != mode) {
            continue;
        }
        let at = format!("{file}:{} ({})", r.line, mode.name());
        let actual = execute(&mut s, r, mode).map_err(|e| format!("{at}: {e}"))?;
        match (actual, &r.expected) {
            (Some(a), Some((want, _))) => {
                if !a.matches(want) {
                    return Err(format!(
                        "{at}: `{}` differs\nexpected:\n{}\nactual:\n{}",
                        r.head,
                        want.join("\n"),
                        a.lines().join("\n")
                    ));
                }
            }
            (Some(a), None) => {
                return Err(format!(
                    "{at}: `{}` has output but no `----` block; it gave:\n{}",
                    r.head,
                    a.lines().join("\n")
                ));
            }
            (None, Some(_)) => {
                return Err(format!("{at}: `{}` has no output to expect", r.head));
            }
            (None, None) => {}
        }
    }
    Ok(())
}

fn golden_dir() -> PathBuf {
    common::repo_root().join("testdata/golden")
}

fn scripts() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| p.extension().is_some_and(|x| x == "slt"));
    v.sort();
    v
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Rewrites every expected block of every script from streaming mode.
fn complete() -> Result<(), String> {
    for path in scripts() {
        let name = file_name(&path);
        let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
        let records = parse(&name, &text)?;
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        // Replacements from the bottom up keep earlier line numbers valid.
        let mut edits: Vec<(std::ops::Range<usize>, Vec<String>)> = Vec::new();
        let mut s = Scratch::new()?;
        for r in &records {
            if r.only == Some(Mode::Backfill) {
                continue;
            }
            let at = format!("{name}:{}", r.line);
            // A plan record runs on its own, as its test does.
            let actual = if r.is_plan() {
                execute(&mut Scratch::new()?, r, Mode::Streaming)
            } else {
                execute(&mut s, r, Mode::Streaming)
            }
            .map_err(|e| format!("{at}: {e}"))?;
            // Blocks that already match stay as written (JSON keeps its layout).
            if let (Some(a), Some((want, range))) = (actual, &r.expected)
                && !a.matches(want)
            {
                edits.push((range.clone(), a.lines()));
            }
        }
        for (range, new) in edits.into_iter().rev() {
            lines.splice(range, new);
        }
        let mut out = lines.join("\n");
        out.push('\n');
        if out != text {
            std::fs::write(&path, out).map_err(|e| e.to_string())?;
            eprintln!("rewrote {}", path.display());
        }
    }
    Ok(())
}

fn trials() -> Vec<Trial> {
    let mut out = Vec::new();
    for path in scripts() {
        let name = file_name(&path);
        let stem = name.trim_end_matches(".slt").to_string();
        let records = match std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|t| parse(&name, &t))
        {
            Ok(r) => r,
            Err(e) => {
                out.push(Trial::test(format!("{stem}::parse"), move || Err(e.into())));
                continue;
            }
        };
        let (plan, state): (Vec<Record>, Vec<Record>) =
            records.into_iter().partition(Record::is_plan);
        for r in plan {
            let file = name.clone();
            out.push(Trial::test(format!("{stem}::line_{}", r.line), move || {
                run_records(&file, std::slice::from_ref(&r), Mode::Streaming).map_err(Failed::from)
            }));
        }
        if state.is_empty() {
            continue;
        }
        for mode in [Mode::Streaming, Mode::Backfill] {
            let (file, recs) = (name.clone(), state.clone());
            out.push(Trial::test(format!("{stem}::{}", mode.name()), move || {
                run_records(&file, &recs, mode).map_err(Failed::from)
            }));
        }
    }
    out
}

fn main() {
    let completing = std::env::var_os("SLUICE_COMPLETE").is_some_and(|v| v != "0")
        || std::env::args().any(|a| a == "--complete");
    if completing {
        if let Err(e) = complete() {
            eprintln!("{e}");
            std::process::exit(1);
        }
        return;
    }
    let args = Arguments::from_args();
    let trials = trials();
    if trials.is_empty() {
        eprintln!("no golden scripts in {}", golden_dir().display());
        std::process::exit(1);
    }
    libtest_mimic::run(&args, trials).exit();
}
