//! Every shell block of `README.md` and `examples/*/README.md`, run as
//! written, in order, from a copy of the repository's documents and
//! examples, with small generated inputs. A command that exits non-zero
//! fails the test, naming the file, the line and the command.
//!
//! The commands are run through `bash -c` after these rewrites (and only
//! these), which a reader of the docs would make on this machine too:
//!
//! - `cargo run --release -p sluice --` and `target/release/sluice` are the
//!   `sluice` binary the tests built;
//! - `cargo build`, `cargo install`, `bash .ci/run` (this test is part of
//!   it), `docker compose` (no Docker engine here; `.ci/run` validates the
//!   compose file) and `tansu broker` (the test starts its own broker)
//!   are skipped;
//! - the broker `127.0.0.1:9092` / `localhost:9092` is the test's broker
//!   (also `$KAFKA_BROKERS`, and `--brokers` for a `produce` that names
//!   none), port 8080 a free port, `/tmp/` a folder of the test;
//! - sizes shrink: `--events N` to at most 20,000 (0, "until
//!   interrupted", stays), `--clicks N` to at most 3,000, and `demo` gets
//!   `--events 20000`;
//! - a command that serves (`--serve`, `demo`) or runs until interrupted
//!   (`--live`, a trailing `&`) runs in the background, a server until it
//!   answers (the previous one on its port is stopped first), the rest
//!   until the file is done;
//! - `curl` is retried for up to 30 seconds while it fails (a server still
//!   starting, a metric not reported yet).
//!
//! A README whose pipeline reads a Kafka topic that no command of it
//! fills gets the records from `sluice produce` first (named in
//! [`FIXTURES`]).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Broker, bin, repo_root};

/// Records a README's commands expect on a topic without producing them:
/// (README, `sluice produce` arguments).
const FIXTURES: &[(&str, &str)] = &[(
    "examples/avro/README.md",
    "produce --topic clicks_avro --format avro --schema-id 2 --events 2000",
)];

/// A shell block: its file, and each command with the line it starts on.
struct Block {
    commands: Vec<(usize, String)>,
}

/// The ```sh / ```bash / ```shell blocks of a Markdown file, continuation
/// lines joined, comment lines dropped.
fn blocks(text: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut cur: Option<Block> = None;
    let mut pending: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(b) = cur.as_mut() {
            if t.starts_with("```") {
                if let Some(p) = pending.take() {
                    b.commands.push(p);
                }
                out.extend(cur.take());
                continue;
            }
            let (start, mut cmd) = pending.take().unwrap_or((i + 1, String::new()));
            if cmd.is_empty() && (t.is_empty() || t.starts_with('#')) {
                continue;
            }
            let (body, more) = match t.strip_suffix('\\') {
                Some(b) => (b, true),
                None => (t, false),
            };
            cmd.push_str(body.trim_end());
            cmd.push(' ');
            if more {
                pending = Some((start, cmd));
            } else {
                b.commands.push((start, cmd.trim().to_string()));
            }
        } else if matches!(t, "```sh" | "```bash" | "```shell") {
            cur = Some(Block {
                commands: Vec::new(),
            });
        }
    }
    out
}

/// What the harness does with one command.
enum Step {
    Skip(&'static str),
    Run { cmd: String, background: Background },
}

#[derive(PartialEq)]
enum Background {
    No,
    /// Serves on the test's port: wait until it answers.
    Server,
    /// Runs until stopped.
    Until,
}

struct Env {
    work: PathBuf,
    broker: String,
    port: u16,
}

fn shrink(cmd: &str, flag: &str, max: u64) -> String {
    let words: Vec<&str> = cmd.split(' ').collect();
    let mut out = Vec::with_capacity(words.len());
    let mut it = words.iter().peekable();
    while let Some(w) = it.next() {
        out.push(w.to_string());
        if *w == flag
            && let Some(n) = it.peek().and_then(|v| v.parse::<u64>().ok())
        {
            it.next();
            out.push(if n == 0 { n } else { n.min(max) }.to_string());
        }
    }
    out.join(" ")
}

/// `cmd` without a trailing `# comment` (a `#` after a blank, outside quotes).
fn strip_comment(cmd: &str) -> &str {
    let (mut single, mut double) = (false, false);
    let mut prev = ' ';
    for (i, c) in cmd.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && prev.is_whitespace() => return cmd[..i].trim_end(),
            _ => {}
        }
        prev = c;
    }
    cmd
}

fn rewrite(raw: &str, env: &Env) -> Step {
    let t = strip_comment(raw.trim());
    let first = t
        .split_whitespace()
        .find(|w| !w.contains('='))
        .unwrap_or_default();
    if t.starts_with("cargo build") {
        return Step::Skip("the tests built the binary");
    }
    if t.starts_with("cargo install") {
        return Step::Skip("the test runs the broker .ci/run installed");
    }
    if t.starts_with("bash .ci/run") {
        return Step::Skip("this test is part of .ci/run");
    }
    if t.starts_with("docker compose") || t.starts_with("docker-compose") {
        return Step::Skip("no Docker engine here; .ci/run validates the compose file");
    }
    if first == "tansu" {
        return Step::Skip("the test runs its own broker");
    }
    if first == "pip" {
        return Step::Skip("the Python package has its own pytest suite");
    }
    let bin = bin().display().to_string();
    let mut cmd = t
        .replace("cargo run --release -p sluice --", &bin)
        .replace("target/release/sluice", &bin)
        .replace("127.0.0.1:9092", &env.broker)
        .replace("localhost:9092", &env.broker)
        .replace(":8080", &format!(":{}", env.port))
        .replace("/tmp/", &format!("{}/tmp/", env.work.display()));
    cmd = shrink(&cmd, "--events", 20_000);
    cmd = shrink(&cmd, "--clicks", 3_000);
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let sub = words
        .iter()
        .position(|w| *w == bin)
        .and_then(|i| words.get(i + 1))
        .map(|w| w.to_string())
        .unwrap_or_default();
    if sub == "demo" && !cmd.contains("--serve") {
        cmd.push_str(&format!(" --serve 127.0.0.1:{} --events 20000", env.port));
    }
    if sub == "produce" && !cmd.contains("--brokers") {
        cmd.push_str(&format!(" --brokers {}", env.broker));
    }
    let trailing_amp = cmd.trim_end().ends_with('&');
    if trailing_amp {
        cmd = cmd.trim_end().trim_end_matches('&').trim_end().to_string();
    }
    let background = if cmd.contains("--serve") || sub == "demo" {
        Background::Server
    } else if trailing_amp || cmd.contains("--live") {
        Background::Until
    } else {
        Background::No
    };
    if first == "curl" {
        // A server may still be starting, a metric not reported yet.
        cmd =
            format!("for i in $(seq 1 60); do if {cmd}; then exit 0; fi; sleep 0.5; done; exit 1");
    }
    Step::Run { cmd, background }
}

fn shell(cmd: &str, env: &Env) -> Command {
    let mut c = Command::new("bash");
    c.arg("-c")
        .arg(cmd)
        .current_dir(&env.work)
        .env("KAFKA_BROKERS", &env.broker)
        .env("SLUICE_LOG", "warn");
    c
}

/// Waits for `/healthz` on the test's port (a server up) and, when the
/// run's input is bounded (its log says `still serving`), for its end; at
/// most 120 s. A Kafka pipeline's input has no end: its server is waited
/// for only.
fn wait_serving(port: u16, child: &mut Child, log: &Path, bounded: bool) -> Result<(), String> {
    let t0 = Instant::now();
    let mut up = false;
    while t0.elapsed() < Duration::from_secs(120) {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!(
                "the server exited with {st}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            ));
        }
        if !up && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            let (st, _) = common::http(&format!("127.0.0.1:{port}"), "GET", "/healthz", None, &[]);
            up = st == 200;
        }
        let done =
            !bounded || std::fs::read_to_string(log).is_ok_and(|l| l.contains("still serving"));
        if up && done {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err("the server did not answer /healthz (or finish its input) in 120 s".into())
}

/// Whether the pipeline a command runs reads only files (its input ends).
fn bounded(cmd: &str, work: &Path) -> bool {
    let Some(sql) = cmd.split_whitespace().find(|w| w.ends_with(".sql")) else {
        // `demo` runs the quickstart's file source.
        return true;
    };
    !std::fs::read_to_string(work.join(sql)).is_ok_and(|t| t.contains("'kafka'"))
}

fn stop(children: &mut Vec<Child>) {
    for mut c in children.drain(..) {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Stops commands that run until interrupted; one that ended by itself
/// must have ended well.
fn stop_checked(children: &mut Vec<(String, Child)>) {
    for (what, mut c) in children.drain(..) {
        if let Ok(Some(st)) = c.try_wait() {
            assert!(st.success(), "{what}: exit {st}");
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Runs every shell block of `doc` (relative to the repository root).
fn run_doc(doc: &str, broker: &str) {
    let root = repo_root();
    let tmp = tempfile::tempdir().expect("tmp");
    let work = tmp.path().to_path_buf();
    copy_dir(&root.join("examples"), &work.join("examples"));
    copy_dir(&root.join("docker"), &work.join("docker"));
    std::fs::copy(root.join("README.md"), work.join("README.md")).expect("README");
    std::fs::create_dir_all(work.join("tmp")).expect("tmp");
    let env = Env {
        work,
        broker: broker.to_string(),
        port: common::free_port(),
    };
    for (file, args) in FIXTURES.iter().filter(|(f, _)| *f == doc) {
        let cmd = format!("{} {args} --brokers {}", bin().display(), env.broker);
        let out = shell(&cmd, &env).output().expect("fixture");
        assert!(
            out.status.success(),
            "{file}: fixture `{cmd}`: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = std::fs::read_to_string(root.join(doc)).expect("doc");
    let mut servers: Vec<Child> = Vec::new();
    let mut others: Vec<(String, Child)> = Vec::new();
    let mut ran = 0;
    for block in blocks(&text) {
        for (line, raw) in block.commands {
            let where_ = format!("{doc}:{line}: `{raw}`");
            let (cmd, background) = match rewrite(&raw, &env) {
                Step::Skip(why) => {
                    eprintln!("{where_}: skipped ({why})");
                    continue;
                }
                Step::Run { cmd, background } => (cmd, background),
            };
            eprintln!("{where_}");
            ran += 1;
            match background {
                Background::Server => {
                    stop(&mut servers);
                    let log = env.work.join(format!("server-{line}.log"));
                    let file = std::fs::File::create(&log).expect("log");
                    let mut child = shell(&cmd, &env)
                        .env("SLUICE_LOG", "info")
                        .stdout(Stdio::null())
                        .stderr(file)
                        .spawn()
                        .expect("spawn");
                    let bounded = bounded(&cmd, &env.work);
                    if let Err(why) = wait_serving(env.port, &mut child, &log, bounded) {
                        let _ = child.kill();
                        panic!("{where_}: {why}");
                    }
                    servers.push(child);
                }
                Background::Until => {
                    others.push((
                        where_.clone(),
                        shell(&cmd, &env)
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .spawn()
                            .expect("spawn"),
                    ));
                    // Let it make a start (a producer fills its topic).
                    std::thread::sleep(Duration::from_secs(3));
                }
                Background::No => {
                    let mut child = shell(&cmd, &env)
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped())
                        .spawn()
                        .expect("spawn");
                    let t0 = Instant::now();
                    let status = loop {
                        if let Some(st) = child.try_wait().expect("wait") {
                            break st;
                        }
                        if t0.elapsed() > Duration::from_secs(300) {
                            let _ = child.kill();
                            stop(&mut servers);
                            stop_checked(&mut others);
                            panic!("{where_}: still running after 300 s");
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    };
                    let out = child.wait_with_output().expect("output");
                    if !status.success() {
                        stop(&mut servers);
                        stop_checked(&mut others);
                        panic!(
                            "{where_}: exit {status}\nstdout: {}\nstderr: {}",
                            String::from_utf8_lossy(&out.stdout),
                            String::from_utf8_lossy(&out.stderr)
                        );
                    }
                }
            }
        }
    }
    stop(&mut servers);
    stop_checked(&mut others);
    assert!(ran > 0, "{doc}: no command ran");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir").flatten() {
        let p = e.path();
        let name = e.file_name();
        let n = name.to_string_lossy();
        // Data a developer generated into the checkout is not the docs'.
        if n.ends_with(".jsonl") || n.ends_with(".parquet") || n == "lake" || n.ends_with("-state")
        {
            continue;
        }
        if p.is_dir() {
            copy_dir(&p, &to.join(&name));
        } else {
            std::fs::copy(&p, to.join(&name)).expect("copy");
        }
    }
}

#[test]
fn the_blocks_are_parsed_as_a_reader_would_type_them() {
    let b = blocks(
        "text\n```sh\n# a comment\ncmd one \\\n    --flag x\n\ncmd two &\n```\n```sql\nSELECT 1\n```\n",
    );
    assert_eq!(b.len(), 1);
    assert_eq!(
        b[0].commands,
        vec![
            (4, "cmd one --flag x".to_string()),
            (7, "cmd two &".to_string())
        ]
    );
    assert_eq!(
        shrink("gen --events 1000000 --keys 5", "--events", 20_000),
        "gen --events 20000 --keys 5"
    );
    assert_eq!(
        shrink("produce --events 0 --live", "--events", 20_000),
        "produce --events 0 --live"
    );
    assert_eq!(
        strip_comment("curl -s x/readyz   # 503 while down"),
        "curl -s x/readyz"
    );
    assert_eq!(
        strip_comment("grep '\"user7\"' f   # {\"a\": 1}"),
        "grep '\"user7\"' f"
    );
    assert_eq!(strip_comment("echo 'a # b'"), "echo 'a # b'");
}

#[test]
fn readme() {
    run_doc("README.md", "127.0.0.1:9");
}

#[test]
fn examples_without_a_broker() {
    for doc in ["examples/recsys/README.md", "examples/training/README.md"] {
        run_doc(doc, "127.0.0.1:9");
    }
}

#[test]
fn examples_with_a_broker() {
    let broker = Broker::start();
    for doc in [
        "examples/clickstream/README.md",
        "examples/avro/README.md",
        "examples/protobuf/README.md",
    ] {
        run_doc(doc, &broker.addr());
    }
}
