use std::collections::{HashMap, VecDeque};

use arrow::array::{RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::SchemaRef;

use super::*;
use crate::error::RetryHint;
use crate::source::{DeadLetterSink, Source, SourceBatch};

/// Rows `(user_id = "u", ts)` of the tests' `clicks` source.
fn clicks(schema: &SchemaRef, ts: impl Iterator<Item = i64>) -> Result<RecordBatch> {
    let ts = TimestampMillisecondArray::from_iter_values(ts);
    let users = StringArray::from_iter_values((0..ts.len()).map(|_| "u"));
    RecordBatch::try_new(Arc::clone(schema), vec![Arc::new(users), Arc::new(ts)])
        .map_err(|e| EngineError::arrow("test", e))
}

/// A job of `plan` over `src` in a fresh state dir (kept while the
/// returned guard lives).
fn open_job(plan: &sluice_sql::PipelinePlan, src: Box<dyn Source>) -> (Job, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tmp");
    let job = Job::open(
        plan,
        vec![src],
        HashMap::new(),
        Box::new(NoDead),
        JobOptions::new(dir.path().join("state")),
    )
    .expect("open");
    (job, dir)
}

/// A source with several partitions: scripted batches, then idle polls.
struct Parts {
    schema: SchemaRef,
    parts: Vec<u32>,
    /// Rows `(partition, ts)`; an empty step is 100 ms of idle polls.
    steps: VecDeque<Vec<(u32, i64)>>,
    idle_until: Option<Instant>,
}

impl Source for Parts {
    fn name(&self) -> &str {
        "clicks"
    }
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }
    fn seek(&mut self, _: Option<&[u8]>) -> Result<()> {
        Ok(())
    }
    fn poll(&mut self, _: usize) -> Result<Poll> {
        if let Some(until) = self.idle_until {
            if Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
                return Ok(Poll::Idle);
            }
            self.idle_until = None;
        }
        if let Some(rows) = self.steps.pop_front() {
            if rows.is_empty() {
                self.idle_until = Some(Instant::now() + Duration::from_millis(100));
                return Ok(Poll::Idle);
            }
            let batch = clicks(&self.schema, rows.iter().map(|r| r.1))?;
            return Ok(Poll::Data {
                batch: Some(SourceBatch {
                    batch,
                    row_positions: vec![0; rows.len()],
                    partitions: rows.iter().map(|r| r.0).collect(),
                }),
                rejected: Vec::new(),
            });
        }
        Ok(Poll::End)
    }
    fn position(&self) -> Vec<u8> {
        Vec::new()
    }
    fn describe_position(&self, p: u64) -> String {
        p.to_string()
    }
    fn partitions(&self) -> Vec<u32> {
        self.parts.clone()
    }
}

struct NoDead;
impl DeadLetterSink for NoDead {
    fn write(&mut self, _: &DeadLetter) -> Result<()> {
        Ok(())
    }
    fn commit(&mut self) -> Result<u64> {
        Ok(0)
    }
    fn recover(&mut self, _: u64) -> Result<()> {
        Ok(())
    }
}

/// Runs two-partition input and returns the committed watermark.
fn watermark_after(idle: &str, steps: Vec<Vec<(u32, i64)>>) -> Option<i64> {
    let sql = format!(
        "CREATE SOURCE clicks (user_id TEXT NOT NULL, ts TIMESTAMP NOT NULL,
           WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)
         WITH (connector = 'kafka', topic = 't', brokers = '127.0.0.1:1'{idle});
         CREATE FEATURE VIEW v KEY user_id AS SELECT user_id, COUNT(*) AS n
         FROM clicks GROUP BY user_id, TUMBLE(ts, INTERVAL '1' MINUTE);"
    );
    let plan = sluice_sql::plan_pipeline("t.sql", &sql, std::path::Path::new(".")).expect("plan");
    let src = Parts {
        schema: Arc::clone(&plan.sources[0].schema),
        parts: vec![0, 1],
        steps: steps.into(),
        idle_until: None,
    };
    let (mut job, _dir) = open_job(&plan, Box::new(src));
    job.run(&AtomicBool::new(false)).expect("run");
    job.live().watermark("v")
}

fn rows(p: u32, secs: std::ops::RangeInclusive<i64>) -> Vec<(u32, i64)> {
    secs.map(|s| (p, s * 1000)).collect()
}

#[test]
fn watermark_is_the_minimum_over_partitions() {
    // Partition 0 runs to 120 s, partition 1 only to 30 s.
    let wm = watermark_after("", vec![rows(0, 0..=120), rows(1, 0..=30)]);
    assert_eq!(wm, Some(29_000));
}

#[test]
fn a_partition_without_data_holds_the_watermark() {
    let wm = watermark_after("", vec![rows(0, 0..=120), vec![], rows(0, 121..=180)]);
    assert_eq!(wm, None);
}

#[test]
fn an_idle_partition_stops_holding_it_after_idle_timeout() {
    let steps = vec![
        rows(0, 0..=120),
        rows(1, 0..=30),
        vec![],
        rows(0, 121..=180),
    ];
    // Without idle_timeout partition 1 holds the watermark at 30 s - 1 s.
    assert_eq!(watermark_after("", steps.clone()), Some(29_000));
    // With it, partition 1 is idle after 50 ms; p0's later data moves it.
    let wm = watermark_after(", idle_timeout = '50ms'", steps);
    assert_eq!(wm, Some(179_000));
    // A partition that never had data is idle too.
    let wm = watermark_after(
        ", idle_timeout = '50ms'",
        vec![rows(0, 0..=120), vec![], rows(0, 121..=180)],
    );
    assert_eq!(wm, Some(179_000));
}

/// Rows `0..total` in batches of 10; positions are the row count. After
/// the first batch, `failures` polls fail — each after consuming a batch
/// it never returns — with `error`.
struct Flaky {
    schema: SchemaRef,
    next: i64,
    total: i64,
    failures: usize,
    error: fn() -> EngineError,
}

impl Source for Flaky {
    fn name(&self) -> &str {
        "clicks"
    }
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }
    fn seek(&mut self, pos: Option<&[u8]>) -> Result<()> {
        self.next = pos
            .and_then(|p| p.try_into().ok())
            .map(i64::from_be_bytes)
            .unwrap_or(0);
        Ok(())
    }
    fn poll(&mut self, _: usize) -> Result<Poll> {
        if self.next >= self.total {
            return Ok(Poll::End);
        }
        let from = self.next;
        self.next = (from + 10).min(self.total);
        if from > 0 && self.failures > 0 {
            self.failures -= 1;
            return Err((self.error)());
        }
        let batch = clicks(&self.schema, (from..self.next).map(|i| i * 1000))?;
        Ok(Poll::Data {
            batch: Some(SourceBatch {
                batch,
                row_positions: (from..self.next).map(|i| i as u64).collect(),
                partitions: Vec::new(),
            }),
            rejected: Vec::new(),
        })
    }
    fn position(&self) -> Vec<u8> {
        self.next.to_be_bytes().to_vec()
    }
    fn describe_position(&self, p: u64) -> String {
        p.to_string()
    }
}

fn run_flaky(failures: usize, error: fn() -> EngineError) -> (Result<RunStats>, Duration) {
    let sql = "CREATE SOURCE clicks (user_id TEXT NOT NULL, ts TIMESTAMP NOT NULL,
           WATERMARK FOR ts AS ts) WITH (connector = 'file', path = 'x.jsonl');
         CREATE FEATURE VIEW v KEY user_id AS SELECT user_id, COUNT(*) AS n
         FROM clicks GROUP BY user_id;";
    let plan = sluice_sql::plan_pipeline("t.sql", sql, std::path::Path::new(".")).expect("plan");
    let src = Flaky {
        schema: Arc::clone(&plan.sources[0].schema),
        next: 0,
        total: 100,
        failures,
        error,
    };
    let (mut job, _dir) = open_job(&plan, Box::new(src));
    let t0 = Instant::now();
    let r = job.run(&AtomicBool::new(false));
    (r, t0.elapsed())
}

#[test]
fn an_external_poll_error_is_retried_with_backoff_from_the_last_good_position() {
    let broker_away = || EngineError::Connector {
        what: "source clicks".into(),
        message: "broker away".into(),
    };
    let (r, took) = run_flaky(3, broker_away);
    let stats = r.expect("the job survives the outage");
    // Every row exactly once: the batches consumed by failed polls are read again.
    assert_eq!(stats.events, 100);
    // Backoff 100 + 200 + 400 ms.
    assert!(took >= Duration::from_millis(700), "{took:?}");
}

#[test]
fn an_internal_poll_error_ends_the_job() {
    let bug = || EngineError::Internal("broken invariant".into());
    let (r, _) = run_flaky(1, bug);
    let e = r.expect_err("not retried");
    assert_eq!(e.domain(), crate::error::ErrorDomain::Internal);
    assert_eq!(e.retry(), RetryHint::Never);
}
