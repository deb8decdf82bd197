//! What a source row must meet to be an event: an event time in range, and
//! the source's `CHECK` rules. The same [`SourceRules`] run in `run`,
//! `backfill` and `training-set`, right after decoding, so the three jobs
//! accept the same rows.

use std::sync::Arc;

use arrow::array::{Array, BooleanArray};
use arrow::record_batch::RecordBatch;
use datafusion::physical_expr::PhysicalExpr;
use sluice_sql::{SourcePlan, ViewPlan};

use crate::error::{EngineError, Result};
use crate::exec::{eval, physical};
use crate::source::{DeadLetter, DeadLetterKind, SourceBatch};
use crate::time::{drop_bad_event_times, drop_rows};

/// One compiled `CHECK`.
#[derive(Debug)]
struct Rule {
    label: String,
    text: String,
    expr: Arc<dyn PhysicalExpr>,
}

/// The row rules of one source.
#[derive(Debug)]
pub struct SourceRules {
    source: String,
    event_time: Option<usize>,
    rules: Vec<Rule>,
}

impl SourceRules {
    /// Compiles the rules of `sp`.
    pub fn new(sp: &SourcePlan) -> Result<Self> {
        let rules = sp
            .checks
            .iter()
            .map(|c| {
                Ok(Rule {
                    label: c.label.clone(),
                    text: c.text.clone(),
                    expr: physical(&sp.name, &c.predicate, &c.schema)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SourceRules {
            source: sp.name.clone(),
            event_time: sp.event_time,
            rules,
        })
    }

    /// Takes the rows that break a rule out of `sb` and returns them as dead
    /// letters: a NULL or out-of-range event time (`missing_field`,
    /// `wrong_type`), then each `CHECK` that is false for the row
    /// (`check_failed`, every failing rule named; as in SQL, a rule that is
    /// NULL for a row passes). Each failure counts in
    /// `sluice_check_failures_total{source, rule}`.
    pub fn apply(
        &self,
        sb: Option<SourceBatch>,
        describe: &dyn Fn(u64) -> String,
    ) -> Result<(Option<SourceBatch>, Vec<DeadLetter>)> {
        let (sb, mut letters) = drop_bad_event_times(&self.source, sb, self.event_time, describe)?;
        let Some(sb) = sb else {
            return Ok((None, letters));
        };
        if self.rules.is_empty() {
            return Ok((Some(sb), letters));
        }
        let n = sb.batch.num_rows();
        // Per row, the rules it fails (as named in the reason).
        let mut failed: Vec<Vec<String>> = vec![Vec::new(); n];
        for rule in &self.rules {
            let mut count = 0u64;
            match decide(&self.source, rule, &sb.batch)? {
                Ok(v) => {
                    // Only false fails; NULL passes.
                    for (r, ok) in v.iter().enumerate() {
                        if ok == Some(false) {
                            failed[r].push(rule_name(rule));
                            count += 1;
                        }
                    }
                }
                // A rule that cannot be computed over the batch (a cast out
                // of range, a division by zero) is decided row by row: a row
                // it cannot be computed for fails it, with the reason.
                Err(_) => {
                    for (r, f) in failed.iter_mut().enumerate() {
                        match decide(&self.source, rule, &sb.batch.slice(r, 1))? {
                            Ok(v) if v.is_valid(0) && !v.value(0) => {
                                f.push(rule_name(rule));
                                count += 1;
                            }
                            Ok(_) => {}
                            Err(e) => {
                                f.push(format!("{} (cannot be computed: {e})", rule_name(rule)));
                                count += 1;
                            }
                        }
                    }
                }
            }
            if count > 0 {
                metrics::counter!(
                    "sluice_check_failures_total",
                    "source" => self.source.clone(),
                    "rule" => rule.label.clone()
                )
                .increment(count);
            }
        }
        let bad: Vec<(usize, DeadLetterKind, String)> = failed
            .into_iter()
            .enumerate()
            .filter(|(_, f)| !f.is_empty())
            .map(|(r, f)| {
                let reason = if f.len() == 1 {
                    format!("fails the rule {}", f[0])
                } else {
                    format!("fails the rules {}", f.join(", "))
                };
                (r, DeadLetterKind::CheckFailed, reason)
            })
            .collect();
        let (sb, more) = drop_rows(&self.source, sb, bad, describe)?;
        letters.extend(more);
        Ok((sb, letters))
    }
}

/// `rule` over `batch`: the booleans, or (inner `Err`) why DataFusion
/// could not compute them for these rows. `owner` names the source or view.
fn decide(
    owner: &str,
    rule: &Rule,
    batch: &RecordBatch,
) -> Result<std::result::Result<BooleanArray, String>> {
    let v = match eval(owner, &rule.expr, batch) {
        Ok(v) => v,
        Err(e) => return Ok(Err(e.root_message())),
    };
    match v.as_any().downcast_ref::<BooleanArray>() {
        Some(b) => Ok(Ok(b.clone())),
        None => Err(EngineError::Internal(format!(
            "{owner}: rule `{}` gave {}, not booleans",
            rule.text,
            v.data_type()
        ))),
    }
}

/// The `expect` rules of a view, over the rows it emits. A row failing a
/// rule (false, or not computable) is counted in
/// `sluice_expectation_failures_total{view, rule}` and kept.
#[derive(Debug)]
pub struct ViewExpectations {
    view: String,
    rules: Vec<Rule>,
    /// Failures per rule since the job started.
    failures: Vec<u64>,
}

impl ViewExpectations {
    /// Compiles the rules of `vp`.
    pub fn new(vp: &ViewPlan) -> Result<Self> {
        let rules = vp
            .expectations
            .iter()
            .map(|c| {
                Ok(Rule {
                    label: c.label.clone(),
                    text: c.text.clone(),
                    expr: physical(&vp.name, &c.predicate, &c.schema)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let failures = vec![0; rules.len()];
        Ok(ViewExpectations {
            view: vp.name.clone(),
            rules,
            failures,
        })
    }

    /// Counts the rows of `batch` (emitted rows) each rule fails.
    pub fn observe(&mut self, batch: &RecordBatch) -> Result<()> {
        for (k, rule) in self.rules.iter().enumerate() {
            let count = match decide(&self.view, rule, batch)? {
                Ok(v) => v.iter().filter(|ok| *ok == Some(false)).count() as u64,
                // Not computable over the batch: row by row, a row it cannot
                // be computed for fails it.
                Err(_) => {
                    let mut n = 0;
                    for r in 0..batch.num_rows() {
                        match decide(&self.view, rule, &batch.slice(r, 1))? {
                            Ok(v) if v.is_valid(0) && !v.value(0) => n += 1,
                            Ok(_) => {}
                            Err(_) => n += 1,
                        }
                    }
                    n
                }
            };
            if count > 0 {
                self.failures[k] += count;
                metrics::counter!(
                    "sluice_expectation_failures_total",
                    "view" => self.view.clone(),
                    "rule" => rule.label.clone()
                )
                .increment(count);
            }
        }
        Ok(())
    }

    /// Whether the view has rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// `(rule, failures)` since the job started, in declaration order.
    pub fn failures(&self) -> Vec<(String, u64)> {
        self.rules
            .iter()
            .zip(&self.failures)
            .map(|(r, n)| (r.label.clone(), *n))
            .collect()
    }
}

/// `CHECK (text)`, with its `CONSTRAINT` name when it has one.
fn rule_name(rule: &Rule) -> String {
    if rule.label == rule.text {
        format!("CHECK ({})", rule.text)
    } else {
        format!("`{}`: CHECK ({})", rule.label, rule.text)
    }
}
