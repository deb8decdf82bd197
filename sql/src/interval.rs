//! Interval literals (`INTERVAL '5' MINUTE`, `INTERVAL '1 hour 30 minutes'`)
//! as milliseconds, for window sizes and watermark delays.

use datafusion::sql::sqlparser::ast::{Expr, Value};

fn unit_ms(unit: &str) -> Option<i64> {
    let u = unit.trim().to_ascii_lowercase();
    let u = u
        .strip_suffix('s')
        .filter(|s| !s.is_empty() && *s != "m")
        .unwrap_or(&u);
    Some(match u {
        "ms" | "millisecond" => 1,
        "s" | "sec" | "second" => 1_000,
        "m" | "min" | "minute" => 60_000,
        "h" | "hr" | "hour" => 3_600_000,
        "d" | "day" => 86_400_000,
        "w" | "week" => 7 * 86_400_000,
        _ => return None,
    })
}

/// The longest interval accepted (window sizes, slides, delays): 100 years
/// of 365.25 days. Event times span years 1677 to 2262, so an event time
/// plus or minus any accepted interval fits in an `i64` of milliseconds.
pub const MAX_INTERVAL_MS: i64 = 36_525 * 86_400_000;

/// `ms` rounded, if it is a finite number of milliseconds within
/// ±[`MAX_INTERVAL_MS`].
fn bounded(text: &str, ms: f64) -> Result<i64, String> {
    if !ms.is_finite() || ms.abs() > MAX_INTERVAL_MS as f64 {
        return Err(format!(
            "interval `{text}` is longer than the longest supported interval (100 years)"
        ));
    }
    Ok(ms.round() as i64)
}

/// Parses `"5"` with a unit, or `"1 hour 30 minutes"`, into milliseconds.
fn text_ms(text: &str, unit: Option<&str>) -> Result<i64, String> {
    let parts: Vec<&str> = text.split_whitespace().collect();
    let bad = || format!("cannot read `{text}` as an interval");
    match (parts.as_slice(), unit) {
        ([n], Some(u)) => {
            let n: f64 = n.parse().map_err(|_| bad())?;
            let m = unit_ms(u).ok_or_else(|| format!("unknown interval unit `{u}`"))?;
            bounded(text, n * m as f64)
        }
        (parts, None) if !parts.is_empty() && parts.len() % 2 == 0 => {
            let mut total = 0f64;
            for pair in parts.chunks(2) {
                let n: f64 = pair[0].parse().map_err(|_| bad())?;
                let m = unit_ms(pair[1])
                    .ok_or_else(|| format!("unknown interval unit `{}`", pair[1]))?;
                total += n * m as f64;
            }
            bounded(text, total)
        }
        _ => Err(bad()),
    }
}

/// A duration written in an option value: `'30 seconds'`, `'1 minute 30 s'`,
/// `'500ms'` or `'2m'`, in milliseconds.
pub fn duration_ms(text: &str) -> Result<i64, String> {
    let t = text.trim();
    if let [one] = t.split_whitespace().collect::<Vec<_>>().as_slice() {
        let split = one
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(one.len());
        let (n, u) = one.split_at(split);
        if u.is_empty() {
            return Err(format!(
                "`{text}` has no unit; write e.g. '30 seconds' or '500ms'"
            ));
        }
        if n.is_empty() {
            return Err(format!(
                "`{text}` is not a duration; write e.g. '30 seconds' or '500ms'"
            ));
        }
        return text_ms(n, Some(u));
    }
    text_ms(t, None)
}

/// The length of an `INTERVAL` expression, in milliseconds. Months and years
/// have no fixed length and are rejected.
pub fn interval_ms(e: &Expr) -> Result<i64, String> {
    match e {
        Expr::Interval(iv) => {
            if iv.last_field.is_some() {
                return Err(format!(
                    "interval ranges such as `{e}` are not supported; write INTERVAL '90' MINUTE"
                ));
            }
            let text = literal_text(&iv.value)
                .ok_or_else(|| format!("expected a literal interval, found `{e}`"))?;
            let unit = iv.leading_field.as_ref().map(|f| f.to_string());
            text_ms(&text, unit.as_deref())
        }
        Expr::Nested(inner) => interval_ms(inner),
        _ => Err(format!(
            "expected an INTERVAL literal such as INTERVAL '5' MINUTE, found `{e}`"
        )),
    }
}

/// The text of a literal: quoted string or number.
pub(crate) fn literal_text(e: &Expr) -> Option<String> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => Some(s.clone()),
            Value::Number(n, _) => Some(n.to_string()),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_interval_texts() {
        assert_eq!(text_ms("5", Some("MINUTE")), Ok(300_000));
        assert_eq!(text_ms("1 hour 30 minutes", None), Ok(5_400_000));
        assert_eq!(text_ms("2", Some("SECONDS")), Ok(2_000));
        assert!(text_ms("1", Some("MONTH")).is_err());
        assert_eq!(duration_ms("30 seconds"), Ok(30_000));
        assert_eq!(duration_ms("500ms"), Ok(500));
        assert_eq!(duration_ms("2m"), Ok(120_000));
        assert!(duration_ms("30").is_err());
    }
}
