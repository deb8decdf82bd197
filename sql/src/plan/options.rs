//! `WITH` options: duplicate and unknown keys refused with a suggestion,
//! `${ENV}` references expanded, the feature view's options as a typed
//! struct, and [`OptionReader`], through which each connector parses its
//! own typed options with errors that point into the pipeline file.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::SourcePlan;
use crate::error::{PipelineError, Pos};
use crate::parser::{OptionDef, ViewDef};

/// Where an option was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OptionPos {
    /// The key.
    pub key: Pos,
    /// The value.
    pub value: Pos,
}

/// Options every source takes, whatever its connector (the engine reads
/// them); the connector's own options are checked by the connector.
pub(super) const SOURCE_OPTIONS: &[&str] = &["connector"];

const VIEW_OPTIONS: &[&str] = &[
    "online",
    "offline",
    "kafka_topic",
    "kafka_brokers",
    "vector_index",
    "distance",
    "index_trees",
    "search_k",
    "index_filter_columns",
    "freshness_slo",
    "expect",
    "log_served",
    "stats",
    "stats_reference",
];

/// Refuses a key given twice and, when `known` is given, a key not in it
/// (naming the nearest known key).
pub(super) fn check_options(
    file: &str,
    opts: &[OptionDef],
    known: Option<&[&str]>,
    what: &str,
) -> Result<(), PipelineError> {
    let mut seen = HashSet::new();
    for o in opts {
        let k = o.key.value.as_str();
        if !seen.insert(k) {
            return Err(PipelineError::at(
                file,
                Some(o.key.pos),
                format!("option `{k}` is given twice"),
            ));
        }
        if let Some(known) = known
            && !known.contains(&k)
        {
            return Err(unknown_option(file, o.key.pos, what, k, known));
        }
    }
    Ok(())
}

fn unknown_option(file: &str, pos: Pos, what: &str, key: &str, known: &[&str]) -> PipelineError {
    PipelineError::at(
        file,
        Some(pos),
        format!(
            "unknown {what} option `{key}`; known options: {}",
            known.join(", ")
        ),
    )
    .suggest(key, known.iter().copied())
}

/// Words that make an option's value a secret wherever they appear in its name.
const SECRET_WORDS: [&str; 9] = [
    "password",
    "secret",
    "token",
    "credential",
    "private",
    "access_key",
    "access.key",
    "api_key",
    "apikey",
];

/// Option prefixes whose every value is key material or credentials:
/// librdkafka's SASL settings (usernames, OAUTHBEARER configs with client
/// secrets, Kerberos keytabs) and its TLS keys and keystores.
const SECRET_PREFIXES: [&str; 5] = [
    "kafka.sasl.",
    "kafka.ssl.key.",
    "kafka.ssl.keystore.",
    "kafka.ssl_key",
    "kafka.ssl.engine.",
];

/// Whether the value of option `key` is a secret, never shown in
/// `EXPLAIN`, logs, errors or metrics: a name containing `password`,
/// `secret`, `token`, `credential`, `private`, an access or API key, and
/// every `kafka.sasl.*`, `kafka.ssl.key.*` and `kafka.ssl.keystore.*`.
pub fn is_secret_option(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    SECRET_WORDS.iter().any(|w| k.contains(w)) || SECRET_PREFIXES.iter().any(|p| k.starts_with(p))
}

/// What `EXPLAIN` and error messages show for a secret option's value.
pub const MASKED: &str = "********";

/// Where the `${NAME}` references of option values are read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Env {
    /// This process's environment (a job, a backfill, `explain`).
    Process,
    /// A reader's: a reference this process's environment sets, or that
    /// has a `:-default`, is expanded; any other stays as written. A
    /// pipeline kept with a state dir is planned this way by readers
    /// (`sluice get`, `nearest`, `open_state`), which never need the
    /// sources' credentials.
    Unexpanded,
}

impl Env {
    /// `value` with its references expanded from this environment.
    pub fn expand(self, value: &str) -> Result<String, String> {
        match self {
            Env::Process => expand_env(value),
            Env::Unexpanded => Ok(expand_env(value).unwrap_or_else(|_| value.to_string())),
        }
    }

    /// Whether an option whose value still holds a reference is left out
    /// (a reader's plan: the option shapes no value it reads).
    pub fn skips(self, value: &str) -> bool {
        self == Env::Unexpanded && value.contains("${")
    }
}

/// Expands `${NAME}` and `${NAME:-default}` in an option value from the
/// environment (brokers per deployment, credentials kept out of the file).
pub fn expand_env(value: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = value;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unclosed `${{` in `{value}`"))?;
        let spec = &after[..end];
        let (name, default) = match spec.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (spec, None),
        };
        match (std::env::var(name), default) {
            (Ok(v), _) if !v.is_empty() => out.push_str(&v),
            (_, Some(d)) => out.push_str(d),
            _ => {
                return Err(format!(
                    "environment variable `{name}` is not set (write ${{{name}:-default}} for a default)"
                ));
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A source's options as its connector reads them: values by key, and
/// errors that name the pipeline file, line and column of the option.
///
/// ```
/// # use sluice_sql::{plan_pipeline, OptionReader};
/// let p = plan_pipeline(
///     "p.sql",
///     "CREATE SOURCE s (k TEXT, ts TIMESTAMP) WITH (connector = 'kafka', topic = 't', brokers = 'b');\n\
///      CREATE FEATURE VIEW v KEY k AS SELECT k, COUNT(*) AS n FROM s GROUP BY k;",
///     std::path::Path::new("."),
/// )
/// .unwrap();
/// let r = OptionReader::new(&p.sources[0], "Kafka sources");
/// assert_eq!(r.require("topic").unwrap(), "t");
/// assert!(r.check_known(&["connector", "topic"], None).is_err()); // `brokers`
/// ```
pub struct OptionReader<'a> {
    source: &'a SourcePlan,
    what: &'static str,
}

impl<'a> OptionReader<'a> {
    /// Reads `source`'s options for a connector described as `what`
    /// (`"Kafka sources"`), as error messages name it.
    pub fn new(source: &'a SourcePlan, what: &'static str) -> Self {
        OptionReader { source, what }
    }

    /// The source's name.
    pub fn source_name(&self) -> &str {
        &self.source.name
    }

    /// The value of `key`, if given.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.source.options.get(key).map(String::as_str)
    }

    /// The value of `key`; missing or blank is an error at the source's name.
    pub fn require(&self, key: &str) -> Result<&'a str, PipelineError> {
        match self.get(key) {
            Some(v) if !v.trim().is_empty() => Ok(v),
            _ => Err(PipelineError::at(
                &self.source.file,
                Some(self.source.name_pos),
                format!(
                    "source `{}` needs a `{key}` option ({} take it)",
                    self.source.name, self.what
                ),
            )),
        }
    }

    /// An error about the value of `key` (at the value, or at the source's
    /// name when the option is not written).
    pub fn error(&self, key: &str, message: impl Into<String>) -> PipelineError {
        let pos = self
            .source
            .option_positions
            .get(key)
            .map(|p| p.value)
            .unwrap_or(self.source.name_pos);
        PipelineError::at(&self.source.file, Some(pos), message)
    }

    /// Refuses any option not in `known` (nor under `prefix`, e.g. `kafka.`),
    /// pointing at it and naming the nearest known option.
    pub fn check_known(&self, known: &[&str], prefix: Option<&str>) -> Result<(), PipelineError> {
        for (k, pos) in &self.source.option_positions {
            if known.contains(&k.as_str()) || prefix.is_some_and(|p| k.starts_with(p)) {
                continue;
            }
            let extra = prefix
                .map(|p| format!(" and {p}* (passed to the client library)"))
                .unwrap_or_default();
            return Err(PipelineError::at(
                &self.source.file,
                Some(pos.key),
                format!(
                    "option `{k}` does not apply to {}; they take: {}{extra}",
                    self.what,
                    known.join(", ")
                ),
            )
            .suggest(k, known.iter().copied()));
        }
        Ok(())
    }

    /// `key`'s value, one of `allowed` (the first when not given).
    pub fn one_of(
        &self,
        key: &str,
        allowed: &[&'static str],
    ) -> Result<&'static str, PipelineError> {
        let Some(v) = self.get(key) else {
            return Ok(allowed[0]);
        };
        allowed
            .iter()
            .find(|a| a.eq_ignore_ascii_case(v.trim()))
            .copied()
            .ok_or_else(|| {
                let list: Vec<String> = allowed.iter().map(|a| format!("'{a}'")).collect();
                let list = match list.split_last() {
                    Some((last, [])) => last.clone(),
                    Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
                    None => String::new(),
                };
                self.error(key, format!("{key} must be {list}, found `{v}`"))
                    .suggest(v, allowed.iter().copied())
            })
    }

    /// `key`'s value parsed by `parse` (its error message explains), if given.
    pub fn parse<T>(
        &self,
        key: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, PipelineError> {
        self.get(key)
            .map(|v| parse(v).map_err(|m| self.error(key, m)))
            .transpose()
    }

    /// `key`'s value as a path, relative to the pipeline file's folder.
    pub fn path(&self, key: &str) -> Result<PathBuf, PipelineError> {
        Ok(self.source.base_dir.join(self.require(key)?))
    }
}

/// A feature view's `WITH` options, typed.
#[derive(Debug, Default)]
pub(super) struct ViewOptions<'a> {
    pub(super) online: bool,
    pub(super) offline: Option<PathBuf>,
    pub(super) kafka_topic: Option<String>,
    pub(super) kafka_brokers: Option<String>,
    /// `vector_index`, with the other index options (as written, for errors).
    pub(super) index_column: Option<&'a OptionDef>,
    pub(super) distance: Option<&'a OptionDef>,
    pub(super) index_trees: Option<usize>,
    pub(super) search_k: Option<usize>,
    pub(super) filter_columns: Option<&'a OptionDef>,
    /// `freshness_slo`, in ms, with where it is written.
    pub(super) freshness_slo: Option<(i64, &'a OptionDef)>,
    /// `log_served`: the share of keys whose reads are logged, with where it is written.
    pub(super) log_served: Option<(f64, &'a OptionDef)>,
    /// `expect = '…'` (no name) and `expect.NAME = '…'` rules, in order.
    pub(super) expect: Vec<(Option<String>, &'a OptionDef)>,
    /// `stats = 'daily'`, with where it is written.
    pub(super) stats: Option<&'a OptionDef>,
    /// `stats_reference = 'FROM..TO' | 'FILE'`.
    pub(super) stats_reference: Option<(crate::plan::StatsReference, &'a OptionDef)>,
}

impl<'a> ViewOptions<'a> {
    /// Parses and checks the options of `v`; paths resolve against `base_dir`.
    pub(super) fn parse(
        file: &str,
        v: &'a ViewDef,
        base_dir: &Path,
        env: Env,
    ) -> Result<Self, PipelineError> {
        // `expect.NAME` keys are rules of any name; the rest must be known.
        let options: Vec<OptionDef> = v
            .options
            .iter()
            .filter(|o| !o.key.value.starts_with("expect."))
            .cloned()
            .collect();
        check_options(file, &options, Some(VIEW_OPTIONS), "feature view")?;
        let mut rule_names = HashSet::new();
        let mut expect = Vec::new();
        for o in &v.options {
            let name = match o.key.value.strip_prefix("expect.") {
                Some(n) => n,
                None if o.key.value == "expect" => "",
                None => continue,
            };
            if !rule_names.insert(name) {
                return Err(PipelineError::at(
                    file,
                    Some(o.key.pos),
                    format!("option `{}` is given twice", o.key.value),
                ));
            }
            if o.key.value != "expect" && name.is_empty() {
                return Err(PipelineError::at(
                    file,
                    Some(o.key.pos),
                    "name the rule: `expect.NAME = '…'`, or write `expect = '…'`",
                ));
            }
            if o.value.trim().is_empty() {
                return Err(PipelineError::at(
                    file,
                    Some(o.value_pos),
                    format!("option `{}` has no rule", o.key.value),
                ));
            }
            expect.push(((!name.is_empty()).then(|| name.to_string()), o));
        }

        let at = |o: &OptionDef, m: String| PipelineError::at(file, Some(o.value_pos), m);
        let count = |o: &OptionDef| -> Result<usize, PipelineError> {
            match o.value.trim().parse::<usize>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(at(
                    o,
                    format!(
                        "{} must be a positive integer, found `{}`",
                        o.key.value, o.value
                    ),
                )),
            }
        };
        let mode = env;
        let env = |o: &OptionDef| mode.expand(&o.value).map_err(|m| at(o, m));
        let mut out = ViewOptions {
            online: true,
            expect,
            ..Default::default()
        };
        for o in &v.options {
            match o.key.value.as_str() {
                "vector_index" => out.index_column = Some(o),
                "distance" => out.distance = Some(o),
                "index_trees" => out.index_trees = Some(count(o)?),
                "search_k" => out.search_k = Some(count(o)?),
                "index_filter_columns" => out.filter_columns = Some(o),
                "online" => {
                    out.online = match o.value.to_ascii_lowercase().as_str() {
                        "true" => true,
                        "false" => false,
                        other => {
                            return Err(at(
                                o,
                                format!("online must be true or false, found `{other}`"),
                            ));
                        }
                    }
                }
                "offline" => out.offline = Some(base_dir.join(env(o)?)),
                "kafka_topic" => out.kafka_topic = Some(o.value.clone()),
                "kafka_brokers" => out.kafka_brokers = Some(env(o)?),
                "log_served" => {
                    let f = o
                        .value
                        .trim()
                        .parse::<f64>()
                        .ok()
                        .filter(|f| *f > 0.0 && *f <= 1.0);
                    let Some(f) = f else {
                        return Err(at(
                            o,
                            format!(
                                "log_served is the share of keys whose reads are logged, a number in (0, 1] such as 0.01; found `{}`",
                                o.value
                            ),
                        ));
                    };
                    out.log_served = Some((f, o));
                }
                "stats" => {
                    if !o.value.trim().eq_ignore_ascii_case("daily") {
                        return Err(at(
                            o,
                            format!(
                                "stats describes each day of the view's lake: write stats = 'daily', found `{}`",
                                o.value
                            ),
                        ));
                    }
                    out.stats = Some(o);
                }
                "stats_reference" => {
                    let value = env(o)?;
                    let file = base_dir.join(&value);
                    let r = match value.split_once("..") {
                        Some((from, to)) if !file.exists() => crate::plan::StatsReference::Range {
                            from: from.trim().to_string(),
                            to: to.trim().to_string(),
                        },
                        _ => crate::plan::StatsReference::File(file),
                    };
                    out.stats_reference = Some((r, o));
                }
                "freshness_slo" if mode.skips(&mode.expand(&o.value).unwrap_or_default()) => {}
                "freshness_slo" => {
                    let ms = crate::interval::duration_ms(&env(o)?)
                        .map_err(|m| at(o, format!("freshness_slo: {m}")))?;
                    if ms <= 0 {
                        return Err(at(o, "freshness_slo must be longer than 0".into()));
                    }
                    out.freshness_slo = Some((ms, o));
                }
                _ => {}
            }
        }
        if !out.online && out.offline.is_none() && out.kafka_topic.is_none() {
            return Err(PipelineError::at(
                file,
                Some(v.name.pos),
                format!(
                    "view `{}` writes nowhere: set online = true or offline = 'DIR'",
                    v.name.value
                ),
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::expand_env;

    #[test]
    fn expands_environment_references() {
        assert_eq!(expand_env("a:1").as_deref(), Ok("a:1"));
        assert_eq!(
            expand_env("${SLUICE_SURELY_UNSET_VAR:-localhost:9092}").as_deref(),
            Ok("localhost:9092")
        );
        let path = std::env::var("PATH").unwrap_or_default();
        assert_eq!(expand_env("x${PATH}y"), Ok(format!("x{path}y")));
        assert!(expand_env("${SLUICE_SURELY_UNSET_VAR}").is_err());
        assert!(expand_env("${OPEN").is_err());
    }
}
