//! `EXPLAIN`: the plan as text, secrets masked.

use std::fmt;

use super::{PipelinePlan, Stage, ViewKind, WindowSpec, fmt_ms};

impl fmt::Display for PipelinePlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for s in &self.sources {
            writeln!(f, "Source {} [{}]", s.name, s.connector)?;
            for (i, fl) in s.schema.fields().iter().enumerate() {
                let et = if Some(i) == s.event_time {
                    format!(
                        "  (event time, watermark = max - {})",
                        fmt_ms(s.watermark_delay_ms)
                    )
                } else {
                    String::new()
                };
                let meta = s
                    .metadata
                    .iter()
                    .find(|m| m.index == i)
                    .map(|m| format!("  (metadata: {:?})", m.kind).to_lowercase())
                    .unwrap_or_default();
                writeln!(
                    f,
                    "  {}: {}{}{}{}",
                    fl.name(),
                    fl.data_type(),
                    if fl.is_nullable() { "" } else { " NOT NULL" },
                    et,
                    meta
                )?;
            }
            for (k, v) in &s.options {
                // Credentials passed to librdkafka are not echoed.
                let v = if super::options::is_secret_option(k) {
                    super::options::MASKED
                } else {
                    v.as_str()
                };
                writeln!(f, "  option {k} = {v}")?;
            }
            for c in &s.checks {
                if c.label == c.text {
                    writeln!(f, "  check ({}): {}", c.text, c.predicate)?;
                } else {
                    writeln!(f, "  check {} ({}): {}", c.label, c.text, c.predicate)?;
                }
            }
        }
        for v in &self.views {
            writeln!(
                f,
                "FeatureView {} KEY ({}) online={} offline={}{}",
                v.name,
                v.keys.join(", "),
                v.online,
                v.offline
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "-".into()),
                v.kafka_topic
                    .as_ref()
                    .map(|t| format!(" kafka_topic={t}"))
                    .unwrap_or_default()
                    + &v.freshness_slo_ms
                        .map(|ms| format!(" freshness_slo={}", fmt_ms(ms)))
                        .unwrap_or_default()
                    + &v.log_served
                        .map(|f| format!(" log_served={f}"))
                        .unwrap_or_default()
                    + if v.stats_daily { " stats=daily" } else { "" }
            )?;
            let versions: Vec<&super::ViewPlan> = self
                .views
                .iter()
                .filter(|o| o.base_name == v.base_name)
                .collect();
            if versions.len() > 1 || v.version > 1 {
                let mut nums: Vec<u32> = versions.iter().map(|o| o.version).collect();
                nums.sort_unstable();
                let list: Vec<String> = nums.iter().map(u32::to_string).collect();
                let prev = versions
                    .iter()
                    .filter(|o| o.version < v.version)
                    .max_by_key(|o| o.version);
                let window = |p: &super::ViewPlan| {
                    p.window()
                        .map(|w| w.to_string())
                        .unwrap_or_else(|| "PER EVENT".into())
                };
                match prev {
                    Some(p) => writeln!(
                        f,
                        "  version {} of {} (versions {}); against version {}: {}",
                        v.version,
                        v.base_name,
                        list.join(", "),
                        p.version,
                        crate::view_difference(
                            (&p.keys, &window(p), &p.query),
                            (&v.keys, &window(v), &v.query)
                        )
                    )?,
                    None => writeln!(
                        f,
                        "  version {} of {} (versions {})",
                        v.version,
                        v.base_name,
                        list.join(", ")
                    )?,
                }
            }
            let mut lines = Vec::new();
            match &v.kind {
                ViewKind::PerEvent => lines.push("EmitPerEvent: latest row per key".to_string()),
                ViewKind::Aggregate(a) => {
                    lines.push(format!("Emit: {}", match a.window {
                        WindowSpec::Lifetime => "changed keys at each checkpoint".to_string(),
                        w => format!("one row per key and window when the watermark passes window_end; valid until window_end + {}", fmt_ms(w.slide_ms().unwrap_or(0))),
                    }));
                    for s in a.post.iter().rev() {
                        lines.push(fmt_stage(s));
                    }
                    let panes = match a.window {
                        WindowSpec::Hop { slide_ms, size_ms } => {
                            format!(" panes={}x{}", size_ms / slide_ms, fmt_ms(slide_ms))
                        }
                        _ => String::new(),
                    };
                    let aggs: Vec<String> = a.aggr_exprs.iter().map(|e| e.to_string()).collect();
                    let groups: Vec<String> = a.group_exprs.iter().map(|e| e.to_string()).collect();
                    lines.push(format!(
                        "WindowAggregate: window={}{panes} key=[{}] aggr=[{}] state=RocksDB",
                        a.window,
                        groups.join(", "),
                        aggs.join(", ")
                    ));
                }
            }
            for s in v.stages.iter().rev() {
                lines.push(fmt_stage(s));
            }
            lines.push(format!("Source: {}", v.source));
            for (depth, l) in lines.iter().enumerate() {
                writeln!(f, "{}{}", "  ".repeat(depth + 1), l)?;
            }
            for e in &v.expectations {
                if e.label == e.text {
                    writeln!(
                        f,
                        "  expect ({}): {} (counted, rows kept)",
                        e.text, e.predicate
                    )?;
                } else {
                    writeln!(
                        f,
                        "  expect {} ({}): {} (counted, rows kept)",
                        e.label, e.text, e.predicate
                    )?;
                }
            }
        }
        Ok(())
    }
}

fn fmt_stage(s: &Stage) -> String {
    match s {
        Stage::Filter { predicate, .. } => format!("Filter: {predicate}"),
        Stage::Project { exprs, .. } => {
            let e: Vec<String> = exprs.iter().map(|e| e.to_string()).collect();
            format!("Project: {}", e.join(", "))
        }
    }
}
